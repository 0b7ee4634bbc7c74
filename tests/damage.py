"""Helpers that damage a copy of a bundle (the ``copy_bundle`` fixture makes the copy), or what a
compile hands its workers."""

from __future__ import annotations

import json
from pathlib import Path


def edit_manifest(bundle: Path, fn) -> None:
    """Decode the bundle's manifest, let ``fn`` change it in place, write it back."""
    p = bundle / "manifest.json"
    raw = json.loads(p.read_text())
    fn(raw)
    p.write_text(json.dumps(raw))


def garble_ipc_handles(monkeypatch) -> None:
    """Make every CUDA IPC handle a compile hands its workers 64 zero bytes (what a platform
    without legacy CUDA IPC leaves a worker unable to open)."""
    from aoti_rt import handoff

    real = handoff._export_tensors

    def garbled(ep, mutated):
        tensors, handles = real(ep, mutated)
        return tensors, [(index, bytes(64)) for index, _ in handles]
    monkeypatch.setattr(handoff, "_export_tensors", garbled)
