"""Fuzz aoti_rt.load with mutated real bundles (tests/fuzz_bundle.py), in subprocesses.

Each batch is one run of the driver in its own process: a crash is a negative exit status, a
hang is the batch's timeout, and the driver's own oracles (nothing but an AotiRtError
escapes; the intact bundle's outputs stay bitwise the same; no allocation is left behind)
come back in its JSON line. CI runs 4 batches of 75 cases (two on the three-method MLP, two
on the demo LM with its in-place KV cache); ``AOTI_RT_FUZZ_CASES=10000`` runs more (in
batches of at most 250), ``AOTI_RT_FUZZ_SEED`` picks other cases.

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

FUZZ = Path(__file__).with_name("fuzz_bundle.py")
ROOT = FUZZ.parents[1]
CASES = int(os.environ.get("AOTI_RT_FUZZ_CASES", "300"))     # in all, over both bundles
SEED = int(os.environ.get("AOTI_RT_FUZZ_SEED", "0"))
MAX_BATCH = 250


def _batches(total: int) -> list[int]:
    n = max(2, math.ceil(total / MAX_BATCH))
    per = math.ceil(total / n)
    return [per] * n


def _run_batch(bundle: Path, scratch: Path, seed: int, cases: int) -> tuple[dict | None, str]:
    """Run one batch; returns (its JSON result, "") or (None, what went wrong)."""
    cmd = [sys.executable, str(FUZZ), "--bundle", str(bundle), "--scratch", str(scratch),
           "--seed", str(seed), "--cases", str(cases)]
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


@pytest.mark.parametrize("which", ["three", "lm"])
def test_fuzz_load(which, request, device, tmp_path):
    if device != "cpu":
        pytest.skip("the fuzzer loads on the CPU")
    bundle = request.getfixturevalue(f"{which}_bundle")
    problems: list[str] = []
    totals = {"cases": 0, "loaded": 0, "rejected": 0}
    for k, cases in enumerate(_batches(CASES // 2)):
        seed = SEED * 1000 + k * 2 + (which == "lm")
        result, info = _run_batch(bundle, tmp_path / f"scratch-{k}", seed, cases)
        if result is None:
            problems.append(f"batch {k} (seed {seed}): {info}")
            continue
        totals["cases"] += result["cases"]
        totals["loaded"] += result["loaded"]
        totals["rejected"] += sum(result["rejected"].values())
        for f in result["non_aoti_errors"]:
            problems.append(f"batch {k} (seed {seed}): {f['error']}: {f['message']}\n  case {json.dumps(f['case'])}"
                            f"\n  rerun: {info}")
        if result["wrong_results"]:
            problems.append(f"batch {k} (seed {seed}): {result['wrong_results']} case(s) changed the intact "
                            f"bundle's outputs, e.g. {json.dumps(result['wrong_result_cases'][:2])}\n  rerun: {info}")
        if result["leaks"]:
            problems.append(f"batch {k} (seed {seed}): {result['leaks']} case(s) left memory allocated\n  rerun: {info}")
    print(f"fuzz {which}: {totals}")
    assert not problems, "\n".join(problems)
    assert totals["cases"] >= CASES // 2 and totals["rejected"] > 0 and totals["loaded"] > 0
