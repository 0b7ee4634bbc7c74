"""Weight-cache lookup cost per key, and the cost of binding a method whose weights are cached.

Table 1, ``aoti_rt._cache.WeightCache`` with K = 1k, 10k and 100k keys (``WeightKey`` of sha256-style digests),
each a 256-byte buffer from the device's own allocator (``aoti_rt.device.get(dev).allocator``;
cuMemAlloc on CUDA): ns per key of

  acquire, all misses   creates the entries and allocates their buffers
  acquire, all hits     what a method whose weights are cached pays per weight
  release               giving those references back
  lookup_many           membership test only

Table 2, bind: a many-expert, MoE-like model with N expert matrices of 16x16 float32 applied in
turn (``x = x @ w_i``: N constants, one method ``step``; each product is a library matmul, so
AOTI generates no kernel per constant), per N measured: a cold ``aoti_rt.load``; a second
``aoti_rt.load`` while the first is open (every weight cached: nothing read); ``Method``
construction alone, i.e. the bind path; and the pieces of it that can be timed on their own
(the constant-table check, the cache acquire of N keys, ``BindPlan`` + one
``UpdateUserManagedConstantBufferPairs`` call, and for comparison the table walk over ctypes).
Per-constant cost = time / N. N defaults to 1000 with ``--size small`` and to 1000 and 4000
with ``--size full`` (``--bind-n`` picks others). AOTI's generated C++ grows by ~15 lines per
constant (11 of them in the model constructor's constant table), and g++ -O1 on it grows
faster than linearly: 1000 constants build in ~20 s, a 10k-constant method makes a 150k-line
wrapper that g++ did not finish in 25 minutes on a 2-core host. So the bind rows stop where
AOTI compiles in reasonable time; table 1 carries the 10k and 100k key figures.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import aoti_rt
from aoti_rt import _bind, _cache
from aoti_rt.device import DeviceRuntime
from aoti_rt.device import get as device_runtime
from bench import common

KEY_COUNTS = (1_000, 10_000, 100_000)
BUFFER_BYTES = 256
CONST_SHAPE = (16, 16)


class ExpertChain(torch.nn.Module):
    """``x @ w0 @ w1 @ ... @ w(N-1)``: N small constants, one library matmul each."""

    def __init__(self, n: int, device: str):
        super().__init__()
        self.w = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(*CONST_SHAPE, device=device) / CONST_SHAPE[0] ** 0.5)
            for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w in self.w:
            x = x @ w
        return x


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bind-n", type=int, nargs="+", default=None,
                   help="constant counts of the bind models (default: 1000 small, 1000 4000 full)")


def lookup_table(report: common.Report, rt: DeviceRuntime, reps: int) -> None:
    table = report.table(f"WeightCache cost per key ({BUFFER_BYTES}-byte buffers from {rt.allocator.device}'s "
                         f"{type(rt.allocator).__name__})", [
                             ("keys", "keys", "{:d}"), ("op", "operation", "{}"),
                             ("ns_best", "ns/key best", "{:.1f}"), ("ns_median", "ns/key median", "{:.1f}")])
    for k in KEY_COUNTS:
        _lookup_rows(table, rt, k, reps)
        common.free_memory(str(rt.device))


def _lookup_rows(table: common.Table, rt: DeviceRuntime, k: int, reps: int) -> None:
    # typed keys, as the runtime makes them (aoti_rt.acquire's key policy: a content key)
    keys = [_cache.WeightKey(_cache.Scope.CONTENT, None, f"sha256:{hashlib.sha256(str(i).encode()).hexdigest()}",
                             BUFFER_BYTES, BUFFER_BYTES) for i in range(k)]
    sizes = [BUFFER_BYTES] * k
    inner = max(1, 100_000 // k)   # passes per sample: a sample covers at least 100k keys

    def add(op: str, seconds_per_pass: list[float]) -> None:
        ns = [s / k * 1e9 for s in seconds_per_pass]
        best, median = common.best_median(ns)
        table.add(keys=k, op=op, ns_best=best, ns_median=median, samples_ns=ns)

    def misses() -> float:
        cache = _cache.WeightCache()
        t0 = time.perf_counter()
        acq = cache.acquire(keys, sizes, rt.allocator)
        seconds = time.perf_counter() - t0
        cache.publish(acq)
        cache.release(acq)
        return seconds

    add("acquire, all misses (allocates)", common.repeat(misses, min(reps, 3)))   # 100k device allocations each
    cache = _cache.WeightCache()
    held = cache.acquire(keys, sizes, rt.allocator)
    cache.publish(held)
    try:
        acquire_s: list[float] = []
        release_s: list[float] = []

        def hits() -> float:
            got = rel = 0.0
            for _ in range(inner):
                t0 = time.perf_counter()
                acq = cache.acquire(keys, sizes, rt.allocator)
                t1 = time.perf_counter()
                cache.release(acq)
                got += t1 - t0
                rel += time.perf_counter() - t1
            acquire_s.append(got / inner)
            release_s.append(rel / inner)
            return got / inner

        def lookups() -> float:
            t0 = time.perf_counter()
            found = [cache.lookup_many(keys) for _ in range(inner)]
            seconds = (time.perf_counter() - t0) / inner
            if found[-1] != k:
                raise RuntimeError(f"lookup_many found {found[-1]} of {k} cached keys")
            return seconds

        add("acquire, all hits", common.repeat(hits, reps))
        add("release", release_s[-reps:])
        add("lookup_many", common.repeat(lookups, reps))
    finally:
        cache.release(held)


def bind_table(report: common.Report, args: argparse.Namespace, rt: DeviceRuntime) -> None:
    counts = args.bind_n or ([1000] if args.size == "small" else [1000, 4000])
    report.params["bind_n"] = counts
    table = report.table(f"bind cost, N constants of {list(CONST_SHAPE)} float32 (N measured: "
                         f"{', '.join(map(str, counts))})", [
                             ("n", "N", "{:d}"), ("step", "step", "{}"), ("ms_best", "ms best", "{:.3f}"),
                             ("ms_median", "ms median", "{:.3f}"), ("us_per_const", "us/constant", "{:.2f}")])
    for n in counts:
        _bind_rows(table, args, rt, n)
    table.notes.append("us/constant is from the median")


def _bind_rows(table: common.Table, args: argparse.Namespace, rt: DeviceRuntime, n: int) -> None:
    dev, reps = args.device, args.repeats
    params = {"kind": "expert_chain", "n": n, "shape": list(CONST_SHAPE), "dtype": "float32", "seed": 0}

    def programs() -> dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]:
        torch.manual_seed(0)
        return {"step": (ExpertChain(n, dev).eval(), (torch.randn(*CONST_SHAPE, device=dev),))}

    built = common.build_model(args.cache, f"bind{n}", params, programs, dev)
    table.notes.append(f"N={n}: aoti_rt.compile took {built.compile_seconds:.1f} s"
                       f"{' (when the cached bundle was built)' if built.reused else ''}")

    def row(step: str, samples: list[float]) -> None:
        best, median = common.best_median(samples)
        table.add(n=n, step=step, ms_best=best * 1e3, ms_median=median * 1e3,
                  us_per_const=median / n * 1e6, samples_s=samples)

    def load() -> float:
        t0 = time.perf_counter()
        model = aoti_rt.load(built.path, device=dev)
        seconds = time.perf_counter() - t0
        model.close()
        common.free_memory(dev)
        return seconds

    row("aoti_rt.load, cold (reads N weights)", common.repeat(load, reps))
    with aoti_rt.load(built.path, device=dev) as first:
        read0 = aoti_rt.cache_stats(dev)["bytes_read"]
        row("aoti_rt.load, all cached (second instance)", common.repeat(load, reps))
        if aoti_rt.cache_stats(dev)["bytes_read"] != read0:
            table.notes.append(f"N={n}: FAILED: the cached loads read weight bytes")
        try:
            _bind_pieces(row, first, rt, reps)
        except (AttributeError, ImportError, TypeError, KeyError) as e:
            table.notes.append(f"N={n}: the bind breakdown uses aoti_rt internals that changed: "
                               f"{type(e).__name__}: {e}")


def _bind_pieces(row: Callable[[str, list[float]], None], first: aoti_rt.Model, rt: DeviceRuntime,
                 reps: int) -> None:
    """Time Method construction with every weight cached, and the parts of it that stand alone.

    Uses aoti_rt internals (``runtime.Method``/``weight_source``, ``abi.SharedObject``,
    ``_bind.BindPlan``) the way ``Method._bind_shared`` does.
    """
    from aoti_rt.abi import SharedObject, torch_shim
    from aoti_rt.bundle import read_bundle
    from aoti_rt.runtime import Method, bind_plan, weight_source

    name = first.methods[0]
    bundle = first.bundle
    spec = bundle.manifest.methods[name]
    so_path = bundle.so_path(name)
    weights = bundle.manifest.weights
    source = weight_source(bundle.store_path, weights)
    cs = spec.constants

    def method() -> float:
        t0 = time.perf_counter()
        m = Method(name, spec, so_path, source, rt)
        seconds = time.perf_counter() - t0
        m.close()
        return seconds

    bound = first[name].bindings()             # what the loaded method holds: its keys, buffers
    held = {b.key: b.buffer for b in bound if b.key is not None}
    keys = list(held)
    sizes = [b.nbytes for b in held.values()]
    buffers = [b.buffer for b in bound]
    torch_shim()
    dev = str(rt.device)

    def create_delete() -> None:
        s = SharedObject(so_path)
        s.abi.delete(s.abi.create(dev))
        s.close()

    def acquire_release() -> None:
        rt.cache.release(rt.cache.acquire(keys, sizes, rt.allocator))

    def make_plan() -> _bind.BindPlan:
        return bind_plan(cs)

    def check(so: SharedObject, handle: int, plan: _bind.BindPlan) -> None:
        plan.check(so.abi, handle)       # raises on any difference

    def bind(so: SharedObject, handle: int) -> None:
        plan = make_plan()
        check(so, handle, plan)        # bind needs what check reads (the sizes the .so assumes)
        plan.bind(so.abi, handle, buffers, 1 if rt.is_cuda else 0, rt.index)

    row("Method(...) construction, all cached (bind path)", common.repeat(method, reps))
    row("  read_bundle (manifest parse + checks; in load, not Method)",
        common.repeat(common.stopwatch(lambda: read_bundle(bundle.root)), reps))
    row("  SharedObject + CreateWithDevice + Delete", common.repeat(common.stopwatch(create_delete), reps))
    row("  WeightCache.acquire (hits) + release", common.repeat(common.stopwatch(acquire_release), reps))
    so = SharedObject(so_path)
    handle = so.abi.create(dev)
    try:
        plan = make_plan()
        row("  BindPlan from the manifest", common.repeat(common.stopwatch(make_plan), reps))
        row("  constant-table check (BindPlan.check, one nogil loop)",
            common.repeat(common.stopwatch(lambda: check(so, handle, plan)), reps))
        row("  (for comparison) the same table read into Python objects (SharedObject.constants)",
            common.repeat(common.stopwatch(lambda: so.constants(handle)), reps))
        row("  BindPlan + check + bind (one Pairs call)", common.repeat(common.stopwatch(lambda: bind(so, handle)), reps))
    finally:
        so.abi.delete(handle)
        so.close()


def run(args: argparse.Namespace, report: common.Report) -> None:
    rt = device_runtime(args.device)
    lookup_table(report, rt, max(args.repeats, 5))
    bind_table(report, args, rt)


main = common.main_of("bench_lookup", __doc__, run, _extra)

if __name__ == "__main__":
    sys.exit(main())
