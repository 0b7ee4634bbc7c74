"""Several GPUs: one bundle loaded onto cuda:0 alone, replicated onto cuda:0 + cuda:1 (the store
read once, copied to both), and as two separate loads. Every row runs in a fresh Python process
with the CUDA contexts of its devices up, the page cache warm; first load in the process and
the median of the repeat loads (the model closed in between):

  cuda:0 alone            ``aoti_rt.load(bundle, device="cuda:0")``
  replicated              ``aoti_rt.load(bundle, device=["cuda:0", "cuda:1"])``: each chunk of
                          the store read once into one pinned staging buffer, copied to both
  replicated, peer relay  the same with ``AOTI_RT_REPLICATE=peer``: the chunk copied to cuda:0
                          from the host, to cuda:1 from cuda:0 (NVLink, where the GPUs have
                          peer access; the row says whether they had)
  two loads, one by one   ``load(bundle, device="cuda:0")`` then ``device="cuda:1"`` (the store
                          read twice)
  two loads at once       the same two loads from two threads
  copy ceiling            a pinned host buffer of the model's bytes (at most 4 GiB) copied to
                          cuda:0, then to cuda:0 and cuda:1 at once (two streams): whether the
                          two GPUs share the host link (pinning not timed)

The figure to watch is the ratio replicated / alone (goal: at most 1.15 for a 10 GB bundle,
``--layers 80``). The replicated rows also check that both devices compute the same decode
output: a difference fails the run (after the table is written). With fewer than 2 GPUs it
measures nothing and says so (exit status 0).
Model: the bench_load model, ``--layers`` x Linear(8192, 8192) bf16 (16 = 2 GiB by default on
``--size full``; 80 = 10.7 GB).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import child  # noqa: E402 (light: no torch)

# the children import torch and aoti_rt themselves: nothing heavy is imported up here

COLUMNS = [
    ("row", "row", "{}"),
    ("devices", "devices", "{}"),
    ("ms_first", "ms first", "{:.1f}"),
    ("gbps_first", "GB/s first", "{:.2f}"),
    ("ms_median", "ms repeat (median)", "{:.1f}"),
    ("gbps_median", "GB/s repeat", "{:.2f}"),
    ("ratio_first", "x alone (first)", "{:.3f}"),
    ("ratio_median", "x alone (repeat)", "{:.3f}"),
    ("read_gb", "GB read from the store", "{:.2f}"),
]
PAIR = ["cuda:0", "cuda:1"]


# ---------------------------------------------------------------------------------------
# children: one row each, in a fresh process

def _child(kind: str, a: dict[str, Any]) -> dict[str, Any]:
    import threading

    import torch

    import aoti_rt

    devices = a["devices"]
    for d in devices:                       # a serving process has its contexts up
        torch.empty(1, device=d)
        torch.cuda.synchronize(d)

    def sync() -> None:
        for d in devices:
            torch.cuda.synchronize(d)

    def read_bytes() -> int:
        return sum(aoti_rt.cache_stats(d)["bytes_read"] for d in devices)

    out: dict[str, Any] = {}
    if kind == "load":
        mode = a["mode"]

        def load_all() -> list:
            if mode == "replicated":
                return aoti_rt.load(a["bundle"], device=devices, progress=False)
            if mode == "threads":
                got: dict[str, Any] = {}

                def one(d: str) -> None:
                    try:
                        got[d] = aoti_rt.load(a["bundle"], device=d, progress=False)
                    except BaseException as e:  # noqa: BLE001 - re-raised below
                        got[d] = e

                ts = [threading.Thread(target=one, args=(d,)) for d in devices]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                models = [got[d] for d in devices]
                errors = [m for m in models if isinstance(m, BaseException)]
                if errors:
                    for m in models:
                        if not isinstance(m, BaseException):
                            m.close()
                    raise errors[0]
                return models
            return [aoti_rt.load(a["bundle"], device=d, progress=False) for d in devices]

        times, reads = [], []
        for i in range(1 + a["repeats"]):
            r0 = read_bytes()
            s = time.perf_counter()
            models = load_all()
            sync()
            times.append(time.perf_counter() - s)
            reads.append(read_bytes() - r0)
            if i == 0 and len(models) > 1:
                # the same decode input on every device: the outputs must agree
                torch.manual_seed(1)
                x = torch.randn(1, a["dim"], dtype=getattr(torch, a["dtype"]))
                ys = [m.decode(x.to(m.device)).float().cpu() for m in models]
                out["max_diff"] = max(float((y - ys[0]).abs().max()) for y in ys)
            for m in models:
                m.close()
        out.update(first_s=times[0], repeat_s=times[1:], read=reads,
                   staging_bytes=aoti_rt.cache_stats(devices[0])["staging_bytes"])
        if mode == "replicated":
            from aoti_rt import loader
            from aoti_rt.device import get as runtime

            out["replicate"] = loader.REPLICATE
            out["peer_access"] = {str(k): v for k, v in runtime(devices[1]).peers.items()}
    elif kind == "ceiling":
        host = torch.empty(a["nbytes"], dtype=torch.uint8).pin_memory()
        host.fill_(1)
        streams = {d: torch.cuda.Stream(d) for d in devices}
        dst = {d: torch.empty(a["nbytes"], dtype=torch.uint8, device=d) for d in devices}
        times = []
        for _ in range(1 + a["repeats"]):
            s = time.perf_counter()
            for d in devices:
                with torch.cuda.stream(streams[d]):
                    dst[d].copy_(host, non_blocking=True)
            sync()
            times.append(time.perf_counter() - s)
        out.update(first_s=times[0], repeat_s=times[1:])
    else:
        raise ValueError(kind)
    return out


# ---------------------------------------------------------------------------------------
# the parent

def _spawn(kind: str, a: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    return child.spawn(__file__, kind, a, env=env, timeout=1800)


def _spec(size: str, layers: int | None):
    """The bench_load model, ``layers`` deep when given (as bench_start's ``--layers``)."""
    from bench import common
    from bench.bench_load import spec_for

    spec = spec_for(size)
    if not layers or layers == spec.layers:
        return spec
    return common.StackSpec(layers, spec.dim, (("prefill", 0, layers, 4), ("decode", 0, layers, 1)))


def run(args: argparse.Namespace, report: Any) -> None:
    import torch

    import aoti_rt

    from bench import common

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        report.notes.append(f"needs 2 GPUs, this host has {count}: nothing measured")
        common.log(f"bench_multigpu: needs 2 GPUs, this host has {count}; nothing measured")
        return
    dev = PAIR[0]
    spec = _spec(args.size, args.layers)
    report.params.update(spec.params())
    built = common.build_model(args.cache, "load", spec.params(), partial(spec.programs, dev), dev)
    if args.build_only:
        report.notes.append(f"--build-only: the bundle is in the cache ({common.in_cache(built.path, args.cache)}, "
                            f"compiled in {built.compile_seconds:.0f} s); nothing measured")
        return
    bundle = aoti_rt.read_bundle(built.path)
    nbytes = bundle.manifest.unique_weight_bytes(list(bundle.manifest.methods))
    base = {"bundle": str(built.path), "repeats": args.repeats, "dim": spec.dim, "dtype": spec.dtype}
    table = report.table(f"load onto GPUs, each row a fresh process, page cache warm: {spec.layers} x "
                         f"Linear({spec.dim}, {spec.dim}) {spec.dtype}, {nbytes / common.GB:.2f} GB of unique "
                         f"weights per GPU", COLUMNS)
    common.read_file(bundle.store_path)          # warm the page cache

    alone: dict[str, float] = {}

    def add(row: str, devices: list[str], r: dict[str, Any], moved: int) -> None:
        med = statistics.median(r["repeat_s"]) if r.get("repeat_s") else None
        first = r["first_s"]
        if not alone:
            alone.update(first=first, median=med or first)
        read = r.get("read")
        table.add(row=row, devices="+".join(devices), ms_first=first * 1e3, gbps_first=moved / first / common.GB,
                  ms_median=None if med is None else med * 1e3,
                  gbps_median=None if med is None else moved / med / common.GB,
                  ratio_first=first / alone["first"], ratio_median=None if med is None else med / alone["median"],
                  read_gb=None if not read else statistics.median(read) / common.GB,
                  repeat_s=r.get("repeat_s"), max_diff=r.get("max_diff"), staging_bytes=r.get("staging_bytes"),
                  bytes_to_devices=moved, replicate=r.get("replicate"), peer_access=r.get("peer_access"))

    add("aoti_rt.load, cuda:0 alone", PAIR[:1], _spawn("load", {**base, "devices": PAIR[:1], "mode": "one"}),
        nbytes)
    r = _spawn("load", {**base, "devices": PAIR, "mode": "replicated"}, {"AOTI_RT_REPLICATE": "host"})
    add("aoti_rt.load, replicated (store read once)", PAIR, r, 2 * nbytes)
    report.notes.append(f"replicated: max |decode output cuda:0 - cuda:1| = {r.get('max_diff')}")
    r = _spawn("load", {**base, "devices": PAIR, "mode": "replicated"}, {"AOTI_RT_REPLICATE": "peer"})
    relayed = all(r.get("peer_access", {}).values()) and bool(r.get("peer_access"))
    add(f"aoti_rt.load, replicated, peer relay ({'cuda:1 <- cuda:0' if relayed else 'no peer access: from the host'})",
        PAIR, r, 2 * nbytes)
    report.notes.append(f"replicated, peer relay: peer access {r.get('peer_access')}, max |decode output "
                        f"cuda:0 - cuda:1| = {r.get('max_diff')}")
    add("two aoti_rt.load, one after the other", PAIR, _spawn("load", {**base, "devices": PAIR, "mode": "one"}),
        2 * nbytes)
    add("two aoti_rt.load at once (two threads)", PAIR, _spawn("load", {**base, "devices": PAIR, "mode": "threads"}),
        2 * nbytes)
    n = min(nbytes, 4 << 30)
    add("host->device copy, pinned, cuda:0 (ceiling)", PAIR[:1],
        _spawn("ceiling", {**base, "devices": PAIR[:1], "nbytes": n}), n)
    add("host->device copy, pinned, both GPUs at once", PAIR,
        _spawn("ceiling", {**base, "devices": PAIR, "nbytes": n}), 2 * n)
    table.notes.append("GB/s count the bytes that reach the devices (both GPUs: twice the model); the x-alone "
                       "columns divide each row's time by the cuda:0-alone row's (the copy rows included, "
                       "for scale)")
    wrong = [row["row"] for row in table.rows if row.get("max_diff") not in (None, 0.0)]
    if wrong:      # after every row is in the report: a replicated load that differs fails the run
        raise RuntimeError(f"the devices' decode outputs differ in: {', '.join(wrong)}")


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=None,
                   help="depth of the model (default 16 on --size full; 80 gives a 10.7 GB model)")
    p.add_argument("--build-only", action="store_true",
                   help="only compile the model into --cache (a host where one command may not run long)")
    child.add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """Run the rows (the parent: it spawns one child process per row)."""
    from bench import common

    return common.main_of("bench_multigpu", __doc__, run, _extra)(argv)


if __name__ == "__main__":
    child.run_if_child(_child)
    sys.exit(main())
