"""Rows that run in a fresh Python process: the parent spawns its own script with ``--child KIND
--child-args JSON``; the child does one row's work and prints one result line.

Imports nothing heavy (no torch, no aoti_rt): a child times its own imports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: the line a child prints its JSON result after
RESULT = "AOTI_RT_BENCH_RESULT "


def command(script: str, kind: str, payload: dict[str, Any]) -> list[str]:
    """The command line of a child of ``script`` doing ``kind`` with ``payload``."""
    return [sys.executable, str(Path(script).resolve()), "--child", kind, "--child-args", json.dumps(payload)]


def result_of(stdout: str) -> dict[str, Any] | None:
    """The result a child printed, or None."""
    return next((json.loads(x[len(RESULT):]) for x in stdout.splitlines() if x.startswith(RESULT)), None)


def spawn(script: str, kind: str, payload: dict[str, Any], *, env: dict[str, str] | None = None,
          timeout: float = 600) -> dict[str, Any]:
    """Run one child to its end and return its result; RuntimeError with its stderr if it gave none."""
    p = subprocess.run(command(script, kind, payload), capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=timeout)
    r = result_of(p.stdout)
    if r is None:
        raise RuntimeError(f"{kind} child failed (rc {p.returncode}): {p.stderr[-3000:]}")
    return r


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The hidden options by which a script runs as a child."""
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-args", default=None, help=argparse.SUPPRESS)


def run_if_child(work: Callable[[str, dict[str, Any]], dict[str, Any]], argv: Sequence[str] | None = None) -> None:
    """In a child (``--child`` on the command line): do ``work(kind, payload)``, print its result
    and exit; otherwise return."""
    argv = list(sys.argv if argv is None else argv)
    if "--child" not in argv:
        return
    kind = argv[argv.index("--child") + 1]
    payload = json.loads(argv[argv.index("--child-args") + 1])
    print(RESULT + json.dumps(work(kind, payload)), flush=True)
    sys.exit(0)


def pinned_copy_times(nbytes: int, device: str, repeats: int, sync: Callable[[], None]) -> list[float]:
    """Seconds of ``1 + repeats`` copies of ``nbytes`` from pinned host memory to ``device``, each
    up to ``sync()``: the copy ceiling a load is measured against (the first copy warms up)."""
    import time

    import torch

    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    host.fill_(1)
    times = []
    for _ in range(1 + repeats):
        s = time.perf_counter()
        copied = host.to(device, non_blocking=True)
        sync()
        times.append(time.perf_counter() - s)
        del copied
    return times
