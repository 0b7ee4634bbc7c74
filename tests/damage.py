"""Helpers that damage a copy of a bundle (the ``copy_bundle`` fixture makes the copy)."""

from __future__ import annotations

import json
from pathlib import Path


def edit_manifest(bundle: Path, fn) -> None:
    """Decode the bundle's manifest, let ``fn`` change it in place, write it back."""
    p = bundle / "manifest.json"
    raw = json.loads(p.read_text())
    fn(raw)
    p.write_text(json.dumps(raw))
