"""Move weight bytes from a store file into cache buffers.

The needed weights become a :class:`aoti_rt._cache.LoadPlan` (pieces sorted by file offset,
grouped into chunks read with one ``pread`` each). Worker threads run the plan without the
GIL: on the CPU they read straight into the weights' buffers; on CUDA each worker reads into
its pinned staging buffers and enqueues async copies on its own stream, so reads overlap
copies and no weight is synchronised on its own. Exactly the requested bytes are read.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import _cache
from .device import DeviceRuntime
from .errors import BundleError

#: bytes per chunk (one pread, one staging buffer)
CHUNK_BYTES = 32 << 20
#: worker threads
WORKERS = max(1, min(8, os.cpu_count() or 1))

_ERRORS = {1: "making the device context current", 2: "waiting for a staging buffer",
           3: "reading the store", 4: "copying to the device", 5: "recording a copy event",
           6: "synchronising the copy stream"}


def read_weights(rt: DeviceRuntime, store: Path, offsets: Sequence[int], sizes: Sequence[int],
                 buffers: Sequence[_cache.Buffer], *, workers: int | None = None,
                 chunk_bytes: int | None = None, progress: bool | None = None) -> int:
    """Fill ``buffers[i]`` with ``sizes[i]`` bytes at ``offsets[i]`` of ``store``.

    Returns the bytes read. Raises :class:`BundleError` if the store is shorter than
    promised or cannot be read, and :class:`aoti_rt.errors.CudaError` if a copy fails.
    """
    total = int(sum(sizes))
    if total == 0:
        return 0
    chunk = int(chunk_bytes or CHUNK_BYTES)
    nworkers = int(workers or WORKERS)
    plan = _cache.LoadPlan(list(offsets), list(sizes), [b.ptr for b in buffers], chunk)
    nworkers = max(1, min(nworkers, plan.num_chunks))
    try:
        fd = os.open(store, os.O_RDONLY)
    except OSError as e:
        raise BundleError(f"cannot open weight store {store}: {e}") from e
    bar = _progress(total, progress)
    try:
        if rt.is_cuda:
            stagers = rt.take_stagers(nworkers, chunk)
            try:
                results = _run_workers(nworkers, lambda w: stagers[w].run(plan, fd, w, nworkers))
            finally:
                rt.give_stagers(stagers)
            for step, rc in results:
                if step == 3:
                    _raise_read(store, rc)
                if step:
                    raise _cache.CudaError(_ERRORS.get(step, "loading"), rc)
        else:
            for rc in _run_workers(nworkers, lambda w: plan.run_host(fd, w, nworkers)):
                if rc:
                    _raise_read(store, rc)
    finally:
        os.close(fd)
        if bar is not None:
            bar.update(total)
            bar.close()
    return total


def _run_workers(n: int, fn):
    if n == 1:
        return [fn(0)]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="aoti_rt-load") as pool:
        return list(pool.map(fn, range(n)))


def _raise_read(store: Path, rc: int):
    if rc == -100000:
        raise BundleError(f"weight store {store} ended early: it is truncated; recompile or re-copy the bundle")
    raise BundleError(f"reading weight store {store} failed: {os.strerror(-rc)}")


def _progress(total: int, progress: bool | None):
    """A tqdm bar for loads big enough to take about a second, on a terminal."""
    if progress is None:
        progress = total >= (2 << 30) and sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="aoti_rt load")


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
