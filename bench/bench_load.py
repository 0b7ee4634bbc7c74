"""Load throughput of the same weights, side by side in one run.

Variants (GB/s = the bytes a variant moves / its seconds; 1 GB = 1e9 bytes):

  aoti_rt.load cold             a fresh ``aoti_rt.load`` whose weights are not cached yet
                                (the page cache is warm: every file is read once first);
                                bytes = the unique weight bytes of the loaded methods
  aoti_rt.loader.read_weights   the loader alone (no .so, no binding) into buffers from the
                                device allocator, from the bundle's store and from a copy in
                                /dev/shm when there is room (bytes already in host memory)
  stock AOTI                    ``AOTIModelContainerRunnerCuda(so, 1, dev)`` +
                                ``update_constant_buffer_from_blob(blob)`` on an artifact from
                                ``torch._inductor.aot_compile`` (binary_blob); also the blob
                                call alone, and Python ``open().read()`` of the blob
  safetensors                   ``safetensors.torch.load_file(store, device=dev)``
  fastsafetensors               ``fastsafe_open(..., nogds=True)`` (only when importable)
  host->device copy             a pinned (and a pageable) uint8 tensor of the same size,
                                ``.to(dev, non_blocking=True)`` + synchronize: the ceiling

A second table times loading a fully cached second method: with ``prefill`` open,
``aoti_rt.load(bundle, methods=["decode"])`` must read and allocate nothing.

Full size: 16 x Linear(8192, 8192, bias=False) bf16 = 2 GiB; small: 4 x Linear(256, 256).
"""

from __future__ import annotations

import argparse
import ctypes
import filecmp
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import aoti_rt
import aoti_rt.loader
from aoti_rt.bundle import human_bytes
from aoti_rt.device import get as device_runtime
from bench import common

COLUMNS = [
    ("variant", "variant", "{}"),
    ("mib", "MiB", "{:.1f}"),
    ("gbps_best", "GB/s best", "{:.2f}"),
    ("gbps_median", "GB/s median", "{:.2f}"),
    ("ms_best", "ms best", "{:.2f}"),
    ("ms_median", "ms median", "{:.2f}"),
]


def spec_for(size: str) -> common.StackSpec:
    layers, dim = (16, 8192) if size == "full" else (4, 256)
    return common.StackSpec(layers, dim, (("prefill", 0, layers, 4), ("decode", 0, layers, 1)))


def _add(table: common.Table, variant: str, nbytes: int, samples: list[float], **extra: object) -> None:
    best, median = common.best_median(samples)
    table.add(variant=variant, mib=nbytes / common.MiB, bytes=nbytes, gbps_best=nbytes / best / common.GB,
              gbps_median=nbytes / median / common.GB, ms_best=best * 1e3, ms_median=median * 1e3,
              samples_s=samples, **extra)


def _timed(dev: str, body: Callable[[], object]) -> float:
    """Seconds of ``body()`` up to a device synchronize; its result is dropped afterwards."""
    t0 = time.perf_counter()
    result = body()
    common.synchronize(dev)
    seconds = time.perf_counter() - t0
    del result
    common.free_memory(dev)
    return seconds


def run(args: argparse.Namespace, report: common.Report) -> None:
    dev, reps = args.device, args.repeats
    spec = spec_for(args.size)
    report.params.update(spec.params())
    built = common.build_model(args.cache, "load", spec.params(), lambda: spec.programs(dev), dev)
    stock, so, blob = common.build_stock(args.cache, "load_prefill", spec.params(),
                                         lambda: spec.programs(dev)["prefill"], dev)
    report.params.update(bundle=str(built.path), stock_so=str(so), stock_blob=str(blob),
                         bundle_compile_s=built.compile_seconds, stock_compile_s=stock.compile_seconds)
    bundle = aoti_rt.read_bundle(built.path)
    man = bundle.manifest
    unique = man.unique_weight_bytes(["prefill"])
    blob_bytes = blob.stat().st_size
    rt = device_runtime(dev)
    for p in (bundle.store_path, blob):   # warm the page cache: every variant reads from memory
        common.read_file(p)

    table = report.table(f"load throughput: {spec.layers} x Linear({spec.dim}, {spec.dim}) {spec.dtype}, "
                         f"{human_bytes(unique)} of unique weights, page cache warm", COLUMNS)

    # -- aoti_rt: cold loads --------------------------------------------------------------
    def aoti_cold(methods: list[str], read: list[int]) -> Callable[[], float]:
        def once() -> float:
            if any(w.digest in rt.cache for w in man.weights.values()):
                raise RuntimeError("the weights are already cached: the load would not be cold")
            before = aoti_rt.cache_stats(dev)["bytes_read"]
            t0 = time.perf_counter()
            model = aoti_rt.load(built.path, device=dev, methods=methods)
            common.synchronize(dev)
            seconds = time.perf_counter() - t0
            read.append(aoti_rt.cache_stats(dev)["bytes_read"] - before)
            model.close()   # frees the weights: the next load is cold again
            common.free_memory(dev)
            return seconds
        return once

    for methods in (["prefill"], ["prefill", "decode"]):
        read: list[int] = []
        samples = common.repeat(aoti_cold(methods, read), reps)
        _add(table, f"aoti_rt.load cold ({'+'.join(methods)})", man.unique_weight_bytes(methods), samples,
             bytes_read=read[-1])
        if read[-1] != man.unique_weight_bytes(methods):
            table.notes.append(f"aoti_rt.load ({'+'.join(methods)}) read {read[-1]} bytes, "
                               f"expected {man.unique_weight_bytes(methods)}")

    # -- aoti_rt: the loader alone ----------------------------------------------------------
    weights = [man.weights[i] for i in sorted({c.weight for c in man.methods["prefill"].constants})]

    def loader_from(store: Path) -> Callable[[], float]:
        def once() -> float:
            bufs = [rt.allocator.allocate(w.nbytes) for w in weights]
            t0 = time.perf_counter()
            aoti_rt.loader.read_weights(rt, store, [w.offset for w in weights], [w.nbytes for w in weights],
                                        bufs, progress=False)
            seconds = time.perf_counter() - t0
            del bufs
            return seconds
        return once

    _add(table, "aoti_rt.loader.read_weights (page cache)", unique, common.repeat(loader_from(bundle.store_path), reps))
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > bundle.store_path.stat().st_size + (256 << 20):
        copy = shm / f"aoti_rt-bench-{os.getpid()}.safetensors"
        try:
            shutil.copyfile(bundle.store_path, copy)
            _add(table, "aoti_rt.loader.read_weights (/dev/shm)", unique, common.repeat(loader_from(copy), reps))
        finally:
            copy.unlink(missing_ok=True)
    else:
        table.notes.append("no /dev/shm with room for the store: the in-memory loader row is skipped")
    table.notes.append("aoti_rt has no API to load from bytes already in host memory; "
                       "read_weights from /dev/shm stands in for it")

    # -- stock AOTI ---------------------------------------------------------------------------
    blob_only: list[float] = []

    def stock_once() -> float:
        def body() -> object:
            runner = common.stock_runner(so, dev)
            t1 = time.perf_counter()
            runner.update_constant_buffer_from_blob(str(blob))
            common.synchronize(dev)
            blob_only.append(time.perf_counter() - t1)
            return runner
        return _timed(dev, body)

    _add(table, "stock AOTI: runner + update_constant_buffer_from_blob", blob_bytes,
         common.repeat(stock_once, reps))
    _add(table, "stock AOTI: update_constant_buffer_from_blob alone", blob_bytes, blob_only[-reps:])

    def read_blob() -> float:
        t0 = time.perf_counter()
        with open(blob, "rb") as f:
            data = f.read()
        seconds = time.perf_counter() - t0
        del data
        return seconds

    _add(table, "python open().read() of the blob (host only)", blob_bytes, common.repeat(read_blob, reps))
    same = filecmp.cmp(blob, common.stock_blob(built.path, "prefill"), shallow=False)
    table.notes.append(f"the aot_compile blob is {'byte-identical to' if same else 'DIFFERENT from'} the blob "
                       f"bench_memory/bench_call build from the bundle manifest")

    # -- safetensors, fastsafetensors -------------------------------------------------------
    from safetensors.torch import load_file

    store_bytes = sum(w.nbytes for w in man.weights.values())
    _add(table, "safetensors.torch.load_file", store_bytes,
         common.repeat(lambda: _timed(dev, lambda: load_file(str(bundle.store_path), device=dev)), reps))
    try:
        from fastsafetensors import fastsafe_open
    except ImportError:
        table.notes.append("fastsafetensors is not installed: its row is skipped")
    else:
        def fast_once() -> float:
            def body() -> object:
                with fastsafe_open(filenames=[str(bundle.store_path)], nogds=True, device=dev) as f:
                    return {k: f.get_tensor(k) for k in f.keys()}
            return _timed(dev, body)
        try:
            _add(table, "fastsafetensors (nogds)", store_bytes, common.repeat(fast_once, reps))
        except Exception as e:  # noqa: BLE001 - a third-party loader failing is a note, not a crash
            table.notes.append(f"fastsafetensors failed: {type(e).__name__}: {e}")

    # -- copy ceilings --------------------------------------------------------------------------
    if common.is_cuda(dev):
        pinned = torch.ones(unique, dtype=torch.uint8, pin_memory=True)
        _add(table, "host->device copy, pinned (ceiling)", unique,
             common.repeat(lambda: _copy(pinned, dev), reps))
        del pinned
        pageable = torch.ones(unique, dtype=torch.uint8)
        _add(table, "host->device copy, pageable", unique, common.repeat(lambda: _copy(pageable, dev), reps))
        del pageable
    else:
        src = torch.ones(unique, dtype=torch.uint8)
        dst = torch.zeros_like(src)

        def memcpy() -> float:
            t0 = time.perf_counter()
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), unique)
            return time.perf_counter() - t0

        _add(table, "host memcpy (CPU ceiling)", unique, common.repeat(memcpy, reps))
        del src, dst
    common.free_memory(dev)

    cached_second_method(report, built.path, dev, reps)


def _copy(src: torch.Tensor, dev: str) -> float:
    """One host->device copy, timed to the synchronize (the destination is freed after)."""
    t0 = time.perf_counter()
    dst = src.to(dev, non_blocking=True)
    torch.cuda.synchronize(torch.device(dev))
    seconds = time.perf_counter() - t0
    del dst
    return seconds


def cached_second_method(report: common.Report, path: Path, dev: str, reps: int) -> None:
    """Time ``aoti_rt.load(path, methods=["decode"])`` while ``prefill`` holds every weight."""
    table = report.table("second method, all weights cached: aoti_rt.load(bundle, methods=['decode']) "
                         "while prefill is open", [
                             ("case", "case", "{}"), ("ms_best", "ms best", "{:.3f}"),
                             ("ms_median", "ms median", "{:.3f}"), ("bytes_read", "bytes read", "{:d}"),
                             ("bytes_allocated", "bytes allocated", "{:d}"), ("hits", "cache hits", "{:d}")])
    deltas: list[tuple[int, int, int]] = []
    with aoti_rt.load(path, device=dev, methods=["prefill"]):
        def once() -> float:
            aoti_rt.reset_peak(dev)
            s0 = aoti_rt.cache_stats(dev)
            t0 = time.perf_counter()
            second = aoti_rt.load(path, device=dev, methods=["decode"])
            common.synchronize(dev)
            seconds = time.perf_counter() - t0
            s1 = aoti_rt.cache_stats(dev)
            second.close()
            deltas.append((s1["bytes_read"] - s0["bytes_read"],
                           s1["peak_bytes_allocated"] - s0["bytes_allocated"], s1["hits"] - s0["hits"]))
            return seconds
        samples = common.repeat(once, reps)
    best, median = common.best_median(samples)
    read, allocated, hits = deltas[-1]
    table.add(case="aoti_rt.load(methods=['decode'])", ms_best=best * 1e3, ms_median=median * 1e3,
              bytes_read=read, bytes_allocated=allocated, hits=hits, samples_s=samples)
    if any(d[0] or d[1] for d in deltas):
        table.notes.append(f"FAILED: the cached second method read or allocated bytes: {deltas}")
    else:
        table.notes.append("bytes read and allocated are 0 in every repetition, as they must be")
    table.notes.append("loading the same method the stock way costs a whole blob load again "
                       "(the 'stock AOTI' rows above)")


main = common.main_of("bench_load", __doc__, run)

if __name__ == "__main__":
    sys.exit(main())
