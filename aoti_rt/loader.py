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
#: loads at least this big show a progress bar on a terminal by default
PROGRESS_BYTES = 4 << 30
#: worker threads
WORKERS = max(1, min(8, os.cpu_count() or 1))

_ERRORS = {1: "making the device context current", 2: "waiting for a staging buffer",
           3: "reading the store", 4: "copying to the device", 5: "recording a copy event",
           6: "synchronising the copy stream"}


def read_weights(rt: DeviceRuntime, store: Path, offsets: Sequence[int], sizes: Sequence[int],
                 buffers: Sequence[_cache.Buffer], *, workers: int | None = None,
                 chunk_bytes: int | None = None, progress: bool | None = None,
                 method: str | None = None) -> int:
    """Fill ``buffers[i]`` with ``sizes[i]`` bytes at ``offsets[i]`` of ``store``.

    ``method`` (CUDA only; default ``$AOTI_RT_LOAD_METHOD`` or "staged"): "staged" reads
    into pinned staging buffers on worker threads; "register" maps the store and registers
    the mapping with the driver so the copy engine reads the page cache directly (falls back
    to "staged" where the driver refuses). Returns the bytes read. Raises :class:`BundleError` if the store is shorter than
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
        method = method or os.environ.get("AOTI_RT_LOAD_METHOD", "staged")
        if rt.is_cuda and method == "register":
            stager = rt.take_stagers(1, chunk)
            try:
                step, rc = _cache.copy_registered(plan, fd, os.fstat(fd).st_size, rt.context, stager[0])
            finally:
                rt.give_stagers(stager)
            if step == 0:
                return total
            if step not in (7, 8):
                raise _cache.CudaError(_ERRORS.get(step, "loading"), rc)
        if rt.is_cuda:
            stagers = rt.take_stagers(nworkers, chunk)
            try:
                results = _run_workers(nworkers, lambda w: stagers[w].run(plan, fd, w, nworkers),
                                       plan, bar)
            finally:
                rt.give_stagers(stagers)
            for step, rc in results:
                if step == 3:
                    _raise_read(store, rc)
                if step:
                    raise _cache.CudaError(_ERRORS.get(step, "loading"), rc)
        else:
            for rc in _run_workers(nworkers, lambda w: plan.run_host(fd, w, nworkers), plan, bar):
                if rc:
                    _raise_read(store, rc)
    finally:
        os.close(fd)
        if bar is not None:
            bar.update(total - bar.n)
            bar.close()
    return total


def _run_workers(n: int, fn, plan: _cache.LoadPlan, bar):
    """Run ``fn(worker)`` for each worker; the calling thread keeps the progress bar moving."""
    if n == 1 and bar is None:
        return [fn(0)]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="aoti_rt-load") as pool:
        futures = [pool.submit(fn, w) for w in range(n)]
        if bar is not None:
            while not all(f.done() for f in futures):
                time.sleep(0.1)
                bar.update(plan.bytes_done - bar.n)
        return [f.result() for f in futures]


def _raise_read(store: Path, rc: int):
    if rc == -100000:
        raise BundleError(f"weight store {store} ended early: it is truncated; recompile or re-copy the bundle")
    raise BundleError(f"reading weight store {store} failed: {os.strerror(-rc)}")


def _progress(total: int, progress: bool | None):
    """A tqdm bar for loads big enough to take about a second, on a terminal."""
    if progress is None:      # about a second of loading, on a terminal
        progress = total >= PROGRESS_BYTES and sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="aoti_rt load")
