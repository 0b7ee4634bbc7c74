"""Compile time: ``aoti_rt.compile`` of a prefill/decode pair against stock
``torch._inductor.aoti_compile_and_package`` of each method, side by side in one run.

Model: the bench_load stack (16 x Linear(8192, 8192) bf16 = 2 GiB on ``--size full``,
``--layers`` to change the depth; 4 x Linear(256, 256) on ``--size small``), methods prefill
(batch 4) and decode (batch 1) over the same weights. Every row runs in a **fresh process with
an empty inductor cache** (its own ``TORCHINDUCTOR_CACHE_DIR``), so no row reuses another's
kernels; exporting is done before the clock starts, in every row alike. Rows run in this order,
stock last (the first row on a fresh machine pays its cold file caches, headers and libraries):

  aoti_rt.compile, jobs=1  the whole bundle, one method after another
  aoti_rt.compile, jobs=N  the whole bundle, each method in its own worker process (forked from
                           this process on the CPU, its default; on CUDA from a warm zygote,
                           mapping the program's tensors from this process)
  stock, per method        ``aoti_compile_and_package(ep)`` of each method in turn (the weights
                           packaged in each .so, torch's default): seconds of each

Each row splits its time (the compiler's DEBUG timing records, the workers' included): the
jobs=1 row AOTInductor's compile of each method (and, beside it, the warm-up: inductor's
imports and vector-ISA checks, which aoti_rt runs at once before the first method) against
aoti_rt's own work (probing each .so's constants and hashing them, then writing the store and
manifest); the jobs=N row, in a note, each worker's phases (loading its program, AOTI, probe,
handing its constants back) beside the warm-up (the zygote's on CUDA) and the parent's writing
of the programs for them.

The goal: aoti_rt's wall time at most the slowest method's stock compile plus 1 s per GB of
unique weights (aoti_rt's own work: probing each method, hashing and writing the store).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import child  # noqa: E402 (light: no torch)


def _child(kind: str, a: dict[str, Any]) -> dict[str, Any]:
    """One row in this fresh process: export the methods, then time the compile."""
    import torch

    from bench import common

    dev = a["device"]
    spec = common.StackSpec(a["layers"], a["dim"], tuple(tuple(m) for m in a["methods"]))
    eps = {name: torch.export.export(module, args) for name, (module, args) in spec.programs(dev).items()}
    out = Path(a["out"])
    if kind == "stock":
        seconds = {}
        for name, ep in eps.items():
            t0 = time.perf_counter()
            torch._inductor.aoti_compile_and_package(ep, package_path=str(out / f"{name}.pt2"))
            seconds[name] = time.perf_counter() - t0
        return {"seconds": seconds}
    import logging

    import aoti_rt
    from aoti_rt import method_compiler

    phases: dict[str, float] = {}
    records: list[list[Any]] = []

    class Phases(logging.Handler):                  # the compiler's timing records (its workers' too)
        def emit(self, r: logging.LogRecord) -> None:
            if hasattr(r, "phase"):
                phases[r.phase] = phases.get(r.phase, 0.0) + r.seconds
                records.append([r.phase, r.method, r.seconds])

    method_compiler.log.addHandler(Phases())
    method_compiler.log.setLevel(logging.DEBUG)
    t0 = time.perf_counter()
    aoti_rt.compile(eps, out / "bundle", progress=False, jobs=a["jobs"])
    seconds = time.perf_counter() - t0
    unique = aoti_rt.read_bundle(out / "bundle").manifest.unique_weight_bytes()
    return {"seconds": seconds, "unique": unique, "phases": phases, "records": records}


def run(args: argparse.Namespace, report: Any) -> None:
    from bench import common
    from bench.bench_load import spec_for

    dev = args.device
    spec = spec_for(args.size, args.layers)
    report.params.update(spec.params())
    base = {"device": dev, "layers": spec.layers, "dim": spec.dim, "methods": [list(m) for m in spec.methods]}
    table = report.table(f"compile wall time: {spec.layers} x Linear({spec.dim}, {spec.dim}) {spec.dtype}, "
                         f"{len(spec.methods)} methods, each row a fresh process with an empty inductor cache",
                         [("variant", "variant", "{}"), ("seconds", "s", "{:.1f}"),
                          ("per_method", "per method s", "{}"), ("aoti", "AOTI compile s", "{}"),
                          ("own", "aoti_rt's own s (probe, store)", "{}")])
    n = len(spec.methods)
    # stock runs last: the first row on a fresh machine pays its cold file caches (headers,
    # libraries), which would favour the rows after it
    rows = [("aoti_rt.compile, jobs=1", "aoti_rt", {"jobs": 1}),
            (f"aoti_rt.compile, jobs={n}", "aoti_rt", {"jobs": n}),
            ("stock aoti_compile_and_package, per method", "stock", {})]
    got: dict[str, dict[str, Any]] = {}
    keys = ("serial", "parallel", "stock")
    if args.rows != "all":
        report.notes.append(f"--rows {args.rows}: only the rows named were run")
    for key, (label, kind, extra) in zip(keys, rows):
        if args.rows != "all" and key not in args.rows.split(","):
            continue
        with tempfile.TemporaryDirectory(prefix="aoti_rt-bench-compile-") as tmp:
            env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "inductor")}
            common.log(f"{label} ...")
            try:
                r = child.spawn(__file__, kind, {**base, **extra, "out": tmp}, env=env, timeout=1800)
            except RuntimeError as e:
                table.notes.append(f"{label}: {str(e)[-800:]}")
                continue
        got[label] = r
        if kind == "stock":
            per = r["seconds"]
            table.add(variant=label, seconds=sum(per.values()), aoti="", own="",
                      per_method=", ".join(f"{k} {v:.1f}" for k, v in per.items()), per_method_s=per)
        else:
            ph = r.get("phases") or {}
            per_phase: dict[str, dict[str, float]] = {}      # method -> phase -> seconds
            for phase, method, sec in r.get("records") or []:
                if method:
                    d = per_phase.setdefault(method, {})
                    d[phase] = d.get(phase, 0.0) + sec
            in_process = extra.get("jobs") == 1        # the phases add up to the wall time
            table.add(variant=label, seconds=r["seconds"], unique_bytes=r["unique"], phases=ph,
                      records=r.get("records"),
                      per_method="" if in_process else ", ".join(f"{m} {sum(d.values()):.1f}"
                                                                  for m, d in per_phase.items()),
                      aoti=(f"{ph['aoti']:.1f} (+ warm-up {ph.get('warm-up', 0):.1f}, ISA checks "
                            f"{ph.get('isa', 0):.1f} of it)") if in_process else "",
                      own=(f"{ph.get('probe', 0) + ph.get('store', 0):.1f} (probe {ph.get('probe', 0):.1f}, "
                           f"store {ph.get('store', 0):.1f})") if in_process else "")
            if not in_process:                     # the workers' phases, each method's in its worker
                table.notes.append(f"{label}: warm-up {ph.get('warm-up', 0):.1f} s (ISA checks {ph.get('isa', 0):.1f} of it; "
                                   f"on CUDA the zygote's, beside "
                                   f"the programs' save); " + "; ".join(f"{m}: " + ", ".join(f"{k} {v:.1f}" for k, v in d.items())
                                                        for m, d in per_phase.items())
                                   + f"; store {ph.get('store', 0):.1f} s")
    stock = got.get(rows[2][0])
    ours = [(label, got[label]) for label, kind, _ in rows if kind == "aoti_rt" and label in got]
    if stock and ours:
        slowest = max(stock["seconds"].values())
        gb = ours[0][1]["unique"] / common.GB
        goal = slowest + gb
        report.params.update(unique_weight_bytes=ours[0][1]["unique"], goal_seconds=goal)
        table.notes.append(f"goal: at most the slowest stock method ({slowest:.1f} s) + 1 s/GB x {gb:.2f} GB "
                           f"= {goal:.1f} s; " + "; ".join(
                               f"{label}: {r['seconds']:.1f} s ({'met' if r['seconds'] <= goal else 'NOT met'})"
                               for label, r in ours))
    table.notes.append("stock keeps the weights in each .so (torch's default), i.e. writes them once per "
                       "method; aoti_rt writes them once into the bundle's store")


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=None, help="stack depth (default: 16 full, 4 small)")
    p.add_argument("--rows", default="all", help="'all', or some of stock,serial,parallel (comma-separated)")
    child.add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """Run the compile rows."""
    from bench import common

    return common.main_of("bench_compile", __doc__, run, _extra)(argv)


if __name__ == "__main__":
    child.run_if_child(_child)
    sys.exit(main())
