"""Start-up: the first load of a process, repeat loads, a cold disk, and loading next to a
model that is serving. Every row runs in a fresh Python process.

Each child process imports torch and aoti_rt and brings the CUDA context up (``torch.cuda.init``
and one tiny tensor: a serving process has both before it loads a model; the import seconds
are reported apart), then times what its row names, up to a device synchronise:

  first load       ``aoti_rt.load(bundle)`` (prefill + decode) the first time in the process,
                   from the call to usable methods (aoti_rt's own device set-up included)
  repeat load      the same load again in that process (the model closed in between), median
  stock AOTI       ``AOTIModelContainerRunnerCuda(so)`` + ``update_constant_buffer_from_blob``
                   on the stock artifact of prefill, first in the process
  safetensors      ``safetensors.torch.load_file(store, device=...)``, first in the process
  copy ceiling     a pinned host tensor of the same bytes ``.to(device)`` (pinning not timed)
  cold rows        the same after dropping the page cache (``/proc/sys/vm/drop_caches``; the
                   rows are skipped, saying why, where that is not allowed): aoti_rt as it
                   chooses (O_DIRECT when the pages are not cached), aoti_rt forced through the
                   page cache, safetensors, and ``dd iflag=direct`` of the store (the disk)
  serving rows     model A (the bundle) runs decode steps in a loop; step time idle, then
                   while a second bundle (a hard-linked copy, loaded with ``verify=False``: 2 GiB
                   moved) loads uncapped and capped with ``max_load_gbps``

``--configs`` runs the first/repeat rows once per loader configuration
(``chunk_mib,depth,workers[,huge_pages]``; 0 keeps the default), to size the staging pool on a
new host. Two rows without a GPU show what the host's memory allows: the loader's workers
reading the store from the page cache into host memory, and one large memcpy.
Full size: 16 x Linear(8192, 8192, bias=False) bf16 = 2 GiB (the bench_load model).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import child  # noqa: E402 (light: no torch)

# the children import torch and aoti_rt themselves, timed: nothing heavy is imported up here

COLUMNS = [
    ("row", "row", "{}"),
    ("config", "loader config", "{}"),
    ("ms_first", "ms first", "{:.1f}"),
    ("gbps_first", "GB/s first", "{:.2f}"),
    ("ms_median", "ms repeat (median)", "{:.1f}"),
    ("gbps_median", "GB/s repeat", "{:.2f}"),
]


# ---------------------------------------------------------------------------------------
# children: one measurement each, in a fresh process

def _child(kind: str, a: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    import aoti_rt

    t2 = time.perf_counter()
    dev = a["device"]
    cuda = dev != "cpu"
    if cuda:
        torch.cuda.init()
        torch.empty(1, device=dev)
        torch.cuda.synchronize(dev)
    out: dict[str, Any] = {"import_torch_s": t1 - t0, "import_aoti_rt_s": t2 - t1}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    if kind == "aoti":
        times = []
        for i in range(1 + a["repeats"]):
            if i == 0 and a.get("profile"):
                import cProfile
                import io
                import pstats

                prof = cProfile.Profile()
                prof.enable()
            s = time.perf_counter()
            m = aoti_rt.load(a["bundle"], device=dev, progress=False)
            sync()
            times.append(time.perf_counter() - s)
            if i == 0 and a.get("profile"):
                prof.disable()
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
                out["profile"] = buf.getvalue()
            m.close()
        out.update(first_s=times[0], repeat_s=times[1:], nbytes=a["nbytes"],
                   staging_bytes=aoti_rt.cache_stats(dev)["staging_bytes"])
    elif kind == "stock":
        s = time.perf_counter()
        runner = torch._C._aoti.AOTIModelContainerRunnerCuda(a["so"], 1, dev)
        runner.update_constant_buffer_from_blob(a["blob"])
        sync()
        out.update(first_s=time.perf_counter() - s, repeat_s=[], nbytes=a["nbytes"])
    elif kind == "safetensors":
        from safetensors.torch import load_file

        times = []
        for _ in range(1 + a["repeats"]):
            s = time.perf_counter()
            loaded = load_file(a["store"], device=dev)
            sync()
            times.append(time.perf_counter() - s)
            del loaded
            if cuda:
                torch.cuda.empty_cache()
        out.update(first_s=times[0], repeat_s=times[1:], nbytes=a["nbytes"])
    elif kind == "ceiling":
        times = child.pinned_copy_times(a["nbytes"], dev, a["repeats"], sync)
        out.update(first_s=times[0], repeat_s=times[1:], nbytes=a["nbytes"])
    elif kind == "pin":
        from aoti_rt import _memory
        from aoti_rt.device import get as runtime

        rt = runtime(dev)
        rows = []
        for huge in (False, True):
            alloc = _memory.PinnedAllocator(f"pin-test:{huge}", rt.context, huge_pages=huge)
            for mib in a["sizes_mib"]:
                s = time.perf_counter()
                buf = alloc.allocate(mib << 20)
                took = time.perf_counter() - s
                s = time.perf_counter()
                del buf
                rows.append({"huge_pages": huge, "mib": mib, "alloc_ms": took * 1e3,
                             "free_ms": (time.perf_counter() - s) * 1e3})
        out["rows"] = rows
    elif kind == "host":
        # what the host's memory allows without a GPU: page cache -> host buffers (the loader's
        # CPU path, its worker threads) and one big memcpy (torch's threads)
        from aoti_rt import loader
        from aoti_rt.bundle import read_bundle
        from aoti_rt.device import get as runtime

        rt = runtime("cpu")
        b = read_bundle(a["bundle"])
        ws = list(b.manifest.weights.values())
        bufs = [rt.allocator.allocate(w.nbytes) for w in ws]
        reads = []
        for _ in range(1 + a["repeats"]):
            s = time.perf_counter()
            loader.read_weights(rt, b.store_path, [w.offset for w in ws], [w.nbytes for w in ws], bufs,
                                progress=False)
            reads.append(time.perf_counter() - s)
        del bufs
        src = torch.ones(a["nbytes"], dtype=torch.uint8)
        dst = torch.empty_like(src)
        copies = []
        for _ in range(1 + a["repeats"]):
            s = time.perf_counter()
            dst.copy_(src)
            copies.append(time.perf_counter() - s)
        out.update(read_s=reads, memcpy_s=copies, threads=torch.get_num_threads(), nbytes=a["nbytes"])
    elif kind == "serve-child":
        out["load_t0"] = time.time()
        s = time.perf_counter()
        b = aoti_rt.load(a["second"], device=dev, methods=["decode"], verify=False, progress=False,
                         max_load_gbps=a.get("cap"))
        sync()
        out["load_s"] = time.perf_counter() - s
        out["load_t1"] = time.time()
        b.close()
    elif kind == "serve":
        out.update(_serve(aoti_rt, torch, a, sync))
    else:
        raise ValueError(kind)
    return out


def _serve(aoti_rt: Any, torch: Any, a: dict[str, Any], sync) -> dict[str, Any]:
    """Decode step times of model A: idle, then while model B loads (uncapped, then capped)."""
    import threading

    dev = a["device"]
    model = aoti_rt.load(a["bundle"], device=dev, methods=["decode"], progress=False)
    x = torch.randn(1, a["dim"], device=dev, dtype=getattr(torch, a["dtype"]))

    def step() -> float:
        s = time.perf_counter()
        model.decode(x)
        sync()
        return time.perf_counter() - s

    for _ in range(20):
        step()
    idle = [step() for _ in range(300)]
    out: dict[str, Any] = {"idle_ms": _stats(idle)}
    for label, cap in (("uncapped", None), (f"capped {a['cap']} GB/s", a["cap"])):
        done = threading.Event()
        took: list[float] = []

        def load_b() -> None:
            s = time.perf_counter()
            b = aoti_rt.load(a["second"], device=dev, methods=["decode"], verify=False,
                             progress=False, max_load_gbps=cap)
            sync()
            took.append(time.perf_counter() - s)
            b.close()
            done.set()

        t = threading.Thread(target=load_b)
        t.start()
        during = []
        while not done.is_set():
            during.append(step())
        t.join()
        out[label] = {"step_ms": _stats(during), "load_s": took[0], "steps": len(during)}
    # B loads in another process: the copy engine shared, not this process's GIL
    for label, cap in (("other process, uncapped", None), (f"other process, capped {a['cap']} GB/s", a["cap"])):
        args = {**a, "cap": cap}
        p = subprocess.Popen(child.command(__file__, "serve-child", args), stdout=subprocess.PIPE, text=True)
        stamped = []
        while p.poll() is None:
            stamped.append((time.time(), step()))
        text = p.stdout.read() if p.stdout else ""
        res = child.result_of(text) or {}
        # only the steps that overlap B's load count (B's import and CUDA start-up come first)
        t0, t1 = res.get("load_t0", 0.0), res.get("load_t1", float("inf"))
        during = [d for at, d in stamped if at + d >= t0 and at <= t1]
        out[label] = {"step_ms": _stats(during or [0.0]), "load_s": res.get("load_s"), "steps": len(during)}
    model.close()
    return out


def _stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50": statistics.median(s) * 1e3, "p99": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3,
            "max": s[-1] * 1e3}


# ---------------------------------------------------------------------------------------
# the parent

def _spawn(kind: str, a: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    return child.spawn(__file__, kind, a, env=env)


def _drop_caches() -> str | None:
    """Drop the page cache; None if done, else why it cannot be."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return None
    except OSError as e:
        return f"cannot drop the page cache here ({e.strerror}): needs root on the host"


def _configs(text: str | None) -> list[tuple[str, dict[str, str]]]:
    if not text:
        return [("default", {})]
    out = []
    for item in text.split(";"):
        chunk, depth, workers, huge = ([int(v) for v in item.split(",")] + [0])[:4]
        env = {k: str(v) for k, v in (("AOTI_RT_CHUNK_MIB", chunk), ("AOTI_RT_STAGING_DEPTH", depth),
                                      ("AOTI_RT_LOAD_WORKERS", workers), ("AOTI_RT_HUGE_PAGES", huge)) if v}
        out.append((f"chunk {chunk or 'dflt'} MiB, depth {depth or 'dflt'}, {workers or 'dflt'} workers"
                    f"{', huge pages' if huge else ''}", env))
    return out


def run(args: argparse.Namespace, report: Any) -> None:
    import aoti_rt

    from bench import common
    from bench.bench_load import spec_for

    dev = args.device
    if not common.is_cuda(dev):
        report.notes.append("start-up rows need a CUDA device: nothing measured")
        return
    spec = spec_for(args.size, args.layers)
    report.params.update(spec.params())
    built = common.build_model(args.cache, "load", spec.params(), partial(spec.programs, dev), dev)
    full = args.rows == "all"
    if full:
        _, so, blob = common.build_stock(args.cache, "load_prefill", spec.params(),
                                         lambda: spec.programs(dev)["prefill"], dev)
    bundle = aoti_rt.read_bundle(built.path)
    nbytes = bundle.manifest.unique_weight_bytes(list(bundle.manifest.methods))
    prefill_bytes = bundle.manifest.unique_weight_bytes(["prefill"])
    base = {"device": dev, "bundle": str(built.path), "repeats": args.repeats, "nbytes": nbytes}
    table = report.table(f"start-up, each row a fresh process: {spec.layers} x Linear({spec.dim}, {spec.dim}) "
                         f"{spec.dtype}, {nbytes / common.GB:.2f} GB of unique weights", COLUMNS)

    def add(row: str, config: str, r: dict[str, Any]) -> None:
        n = r["nbytes"]
        med = statistics.median(r["repeat_s"]) if r.get("repeat_s") else None
        table.add(row=row, config=config, ms_first=r["first_s"] * 1e3, gbps_first=n / r["first_s"] / common.GB,
                  ms_median=None if med is None else med * 1e3,
                  gbps_median=None if med is None else n / med / common.GB,
                  import_torch_s=r["import_torch_s"], import_aoti_rt_s=r["import_aoti_rt_s"],
                  repeat_s=r.get("repeat_s"), staging_bytes=r.get("staging_bytes"))

    def warm() -> None:
        for p in (bundle.store_path, blob) if full else (bundle.store_path,):
            common.read_file(p)

    warm()
    first = True
    for label, env in _configs(args.configs):
        r = _spawn("aoti", {**base, "profile": first}, env)
        if first:
            report.notes.append("profile of the first load (default config):\n" + r.get("profile", ""))
            first = False
        add("aoti_rt.load (page cache warm)", label, r)
    if full:
        add("stock AOTI runner + blob (prefill)", "-",
            _spawn("stock", {**base, "so": str(so), "blob": str(blob), "nbytes": prefill_bytes}))
    add("safetensors.torch.load_file", "-", _spawn("safetensors", {**base, "store": str(bundle.store_path)}))
    add("host->device copy, pinned (ceiling)", "-", _spawn("ceiling", base))
    r = _spawn("host", base)
    for label, key in (("page cache -> host memory, loader workers (no GPU)", "read_s"),
                       (f"host memcpy, {r['threads']} torch threads (no GPU)", "memcpy_s")):
        add(label, "-", {**r, "first_s": r[key][0], "repeat_s": r[key][1:]})
    r = _spawn("aoti", {**base, "repeats": 0})
    report.notes.append(f"import torch {r['import_torch_s']:.2f} s, then import aoti_rt "
                        f"{r['import_aoti_rt_s']:.2f} s (not in the rows)")
    if not full:
        report.notes.append("--rows first: the stock, cold, pinning and serving rows were not run")
        return

    # a cold page cache
    why = _drop_caches()
    if why is not None:
        report.notes.append(f"cold rows skipped: {why}")
    else:
        cold = {**base, "repeats": 0}
        add("aoti_rt.load, cold page cache (auto: O_DIRECT)", "default", _spawn("aoti", cold))
        _drop_caches()
        add("aoti_rt.load, cold page cache, buffered (AOTI_RT_DIRECT=0)", "default",
            _spawn("aoti", cold, {"AOTI_RT_DIRECT": "0"}))
        _drop_caches()
        add("safetensors.torch.load_file, cold", "-", _spawn("safetensors", {**cold, "store": str(bundle.store_path)}))
        _drop_caches()
        s = time.perf_counter()
        subprocess.run(["dd", f"if={bundle.store_path}", "of=/dev/null", "bs=8M", "iflag=direct"],
                       check=True, capture_output=True)
        sec = time.perf_counter() - s
        size = bundle.store_path.stat().st_size
        table.add(row="dd iflag=direct of the store (the disk)", config="bs=8M", ms_first=sec * 1e3,
                  gbps_first=size / sec / common.GB)
        warm()

    # what page-locking host memory costs (the staging pool of a first load)
    r = _spawn("pin", {**base, "sizes_mib": [64, 256, 1024]})
    pin = report.table("page-locking host memory, fresh process", [
        ("huge_pages", "huge pages (THP + cuMemHostRegister)", "{}"), ("mib", "MiB", "{}"),
        ("alloc_ms", "allocate ms", "{:.1f}"), ("free_ms", "free ms", "{:.1f}")])
    for row in r["rows"]:
        pin.add(**row)

    # loading next to a model that serves
    with tempfile.TemporaryDirectory(dir=built.path.parent) as tmp:
        second = Path(tmp) / "second"
        shutil.copytree(built.path, second, copy_function=os.link)
        r = _spawn("serve", {**base, "second": str(second), "cap": args.serve_cap, "dim": spec.dim,
                             "dtype": spec.dtype})
    serve = report.table("decode step of model A while model B (2 GiB) loads, same GPU", [
        ("case", "case", "{}"), ("p50", "step ms p50", "{:.3f}"), ("p99", "step ms p99", "{:.3f}"),
        ("max", "step ms max", "{:.3f}"), ("load_s", "B's load s", "{:.3f}"), ("steps", "steps", "{}")])
    serve.add(case="idle", **r["idle_ms"])
    for k, v in r.items():
        if k != "idle_ms" and isinstance(v, dict) and "step_ms" in v:
            serve.add(case=f"B loading, {k}", load_s=v["load_s"], steps=v["steps"], **v["step_ms"])


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", default=None,
                   help="loader configurations to compare, 'chunk_mib,depth,workers[,huge_pages];...' "
                        "(0: default)")
    p.add_argument("--layers", type=int, default=None,
                   help="depth of the model (default 16 on --size full; 80 gives a 10.7 GB model)")
    p.add_argument("--rows", choices=("all", "first"), default="all",
                   help="first: only the page-cache rows (first/repeat load, safetensors, copy ceiling)")
    p.add_argument("--serve-cap", type=float, default=10.0, help="max_load_gbps of the capped serving row")
    child.add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """Run the start-up rows (the parent: it spawns one child process per row)."""
    from bench import common

    return common.main_of("bench_start", __doc__, run, _extra)(argv)


if __name__ == "__main__":
    child.run_if_child(_child)
    sys.exit(main())
