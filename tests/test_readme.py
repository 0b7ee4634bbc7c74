"""The README's quickstart runs as written (in a fresh process, in an empty directory)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart() -> str:
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_as_written(tmp_path):
    code = _quickstart()
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "aoti_rt.memory device=" in r.stdout and "'hits'" in r.stdout
    assert (tmp_path / "lm.aoti" / "manifest.json").is_file()
