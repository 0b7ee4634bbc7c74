"""Fuzz aoti_rt.load with mutated real bundles (tests/fuzz_bundle.py) and .pt2 packages
(tests/fuzz_package.py), in subprocesses.

Each batch is one run of a driver in its own process: a crash is a negative exit status, a
hang is the batch's timeout, and the driver's own oracles (nothing but an AotiRtError
escapes; the intact model's outputs stay bitwise the same; no allocation is left behind)
come back in its JSON line. CI runs 4 batches of 75 bundle cases (two on the three-method
MLP, two on the demo LM with its in-place KV cache) and 2 batches of 50 package cases per
weight format torch writes; ``AOTI_RT_FUZZ_CASES=10000`` runs more (in batches of at most
250; packages 4/3 of that, or ``AOTI_RT_FUZZ_PACKAGE_CASES``), ``AOTI_RT_FUZZ_SEED`` picks
other cases, ``AOTI_RT_FUZZ_DIFFERENTIAL=1`` also compares every package that loads with
torch's own loader of the same file.

A failing batch is reproduced with the command the failure message prints; the scratch
bundle it names is left as the failing case wrote it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FORMATS

FUZZ = Path(__file__).with_name("fuzz_bundle.py")
FUZZ_PACKAGE = Path(__file__).with_name("fuzz_package.py")
ROOT = FUZZ.parents[1]
CASES = int(os.environ.get("AOTI_RT_FUZZ_CASES", "300"))     # in all, over both bundles
#: in all, over the package formats (AOTI_RT_FUZZ_CASES scales it too)
PACKAGE_CASES = int(os.environ.get("AOTI_RT_FUZZ_PACKAGE_CASES", str(CASES * 4 // 3)))
#: a package that loads must also compute what torch's own loader computes (~1 s a case)
DIFFERENTIAL = os.environ.get("AOTI_RT_FUZZ_DIFFERENTIAL", "") not in ("", "0")
SEED = int(os.environ.get("AOTI_RT_FUZZ_SEED", "0"))
MAX_BATCH = 250


def _batches(total: int) -> list[int]:
    n = max(2, math.ceil(total / MAX_BATCH))
    per = math.ceil(total / n)
    return [per] * n


def _run_batch(target: Path, scratch: Path, seed: int, cases: int) -> tuple[dict | None, str]:
    """Run one batch on a bundle (a directory) or a package (a .pt2 file); returns (its JSON
    result, the command that reruns it) or (None, what went wrong)."""
    script, flag = (FUZZ, "--bundle") if target.is_dir() else (FUZZ_PACKAGE, "--package")
    cmd = [sys.executable, str(script), flag, str(target), "--scratch", str(scratch),
           "--seed", str(seed), "--cases", str(cases)]
    if script is FUZZ_PACKAGE and DIFFERENTIAL:
        cmd.append("--differential")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    repro = " ".join(cmd)
    timeout = 120 + 2 * cases
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"HANG: no result after {timeout} s; last case {_last_case(scratch)}\n  rerun: {repro}"
    if p.returncode != 0:
        how = (f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0
               else f"exit status {p.returncode}")
        at = p.stderr.find("Fatal Python error")      # faulthandler: the frames that crashed
        excerpt = p.stderr[at:at + 1200] if at >= 0 else p.stderr[-1200:]
        return None, (f"CRASH ({how}); last case {_last_case(scratch)}\n  rerun: {repro}\n"
                      f"  stderr: {excerpt}")
    try:
        return json.loads(p.stdout.strip().splitlines()[-1]), repro
    except (ValueError, IndexError):
        return None, f"no JSON result; stdout ...{p.stdout[-500:]}\n  rerun: {repro}"


def _last_case(scratch: Path) -> str:
    try:
        return (scratch / "last_case.json").read_text()
    except OSError:
        return "(none recorded)"


def _fuzz(target: Path, tmp_path: Path, label: str, total: int, seed_base: int) -> None:
    """Fuzz ``target`` in batches of ``total`` cases in all; fail on any oracle's finding."""
    problems: list[str] = []
    totals = {"cases": 0, "loaded": 0, "rejected": 0}
    for k, cases in enumerate(_batches(total)):
        seed = seed_base + k * 16
        result, info = _run_batch(target, tmp_path / f"scratch-{k}", seed, cases)
        if result is None:
            problems.append(f"batch {k} (seed {seed}): {info}")
            continue
        totals["cases"] += result["cases"]
        totals["loaded"] += result["loaded"]
        totals["rejected"] += sum(result["rejected"].values())
        if "compared_with_torch" in result:
            totals["compared_with_torch"] = totals.get("compared_with_torch", 0) + result["compared_with_torch"]
        for f in result["non_aoti_errors"]:
            problems.append(f"batch {k} (seed {seed}): {f['error']}: {f['message']}\n  case {json.dumps(f['case'])}"
                            f"\n  rerun: {info}")
        if result["wrong_results"]:
            problems.append(f"batch {k} (seed {seed}): {result['wrong_results']} case(s) changed the intact "
                            f"model's outputs, e.g. {json.dumps(result['wrong_result_cases'][:2])}\n  rerun: {info}")
        if result["leaks"]:
            problems.append(f"batch {k} (seed {seed}): {result['leaks']} case(s) left memory allocated\n  rerun: {info}")
    print(f"fuzz {label}: {totals}")
    assert not problems, "\n".join(problems)
    assert totals["cases"] >= total and totals["rejected"] > 0 and totals["loaded"] > 0


@pytest.mark.parametrize("which", ["three", "lm"])
def test_fuzz_load(which, request, device, tmp_path):
    if device != "cpu":
        pytest.skip("the fuzzer loads on the CPU")
    _fuzz(request.getfixturevalue(f"{which}_bundle"), tmp_path, which, CASES // 2,
          SEED * 1000 + (which == "lm"))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fuzz_package(fmt, stack_pt2, device, tmp_path):
    """A .pt2 of each weight format torch writes (tests/fuzz_package.py), mutated."""
    if device != "cpu":
        pytest.skip("the fuzzer loads on the CPU")
    _fuzz(stack_pt2[fmt], tmp_path, f"package {fmt}", PACKAGE_CASES // len(FORMATS),
          SEED * 1000 + 2 + list(FORMATS).index(fmt))
