"""Move weight bytes from a store file into cache buffers, verifying them on the way.

:func:`read_weights` fills one device's buffers; :func:`read_replicated` fills the same weights
on several devices at once, reading each byte of the store once.

The needed weights become a :class:`aoti_rt._load.LoadPlan` (pieces of at most one hash
block, sorted by file offset, grouped into chunks read with one ``pread`` each). Worker
threads run the plan without the GIL: on the CPU they read straight into the weights'
buffers; on CUDA each worker reads into its pinned staging buffers and enqueues async copies
on its own stream, so reads overlap copies and no weight is synchronised on its own. Exactly
the requested bytes are read.

Given the weights' digests, the workers hash every block (BLAKE3, :mod:`aoti_rt.digest`)
right after it lands in host memory, and :func:`read_weights` raises :class:`BundleError`
unless every weight's bytes have the digest the manifest declares: the weight cache keys
immutable weights by digest, so a store whose bytes do not match must never fill an entry.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import _load, _memory
from .bundle import file_identity, open_regular
from .device import Device, DeviceRuntime
from .digest import PREFIX, is_verifiable
from .errors import BundleError

#: bytes per chunk (one pread, one staging buffer); a multiple of the hash block
#: (``$AOTI_RT_CHUNK_MIB`` overrides). Page-locking the staging pool is most of a process's
#: first load, so it is small: on the H200 host (bench_start, 2 GiB, 16 workers, depth 2) the
#: first load / repeat load took 610 / 74 ms with 32 MiB chunks, 157 / 52 ms with 4 MiB, and
#: 107 / 48 ms with 4 MiB pinned as huge pages (device.HUGE_PAGES)
CHUNK_BYTES = (int(os.environ.get("AOTI_RT_CHUNK_MIB", 0)) or 4) << 20
#: staging buffers per CUDA worker: reads run ahead of copies by depth - 1 chunks
#: (``$AOTI_RT_STAGING_DEPTH`` overrides)
STAGING_DEPTH = int(os.environ.get("AOTI_RT_STAGING_DEPTH", 0)) or 2
#: how a replicated load reaches its other devices (``$AOTI_RT_REPLICATE``): "host", each
#: device copies every chunk from the pinned staging buffer (the host link carries the bytes
#: once per device); "peer", only the first device copies from the host and the others copy
#: the chunk from its memory (``cuMemcpyPeerAsync``: NVLink, the host link carries them once),
#: where every device has peer access to the first (else "host")
REPLICATE = os.environ.get("AOTI_RT_REPLICATE", "host")
#: loads smaller than this never show a progress bar by default (they take well under a second)
PROGRESS_MIN_BYTES = 256 << 20
#: worker threads (``$AOTI_RT_LOAD_WORKERS`` overrides)
WORKERS = int(os.environ.get("AOTI_RT_LOAD_WORKERS", 0)) or max(1, min(16, os.cpu_count() or 1))
#: when verifying, pieces up to this many bytes per worker are hashed by aoti_rt's own C BLAKE3
#: without the GIL (at most _load.C_HASH_MAX); larger ones by the blake3 package, which is
#: several times faster per byte but takes the GIL once per piece. Measured on 4 KiB pieces:
#: ~3.5 us each in C vs ~2.2 us through blake3 on one core, but the blake3 calls are
#: serialised by the GIL (2 workers: no faster than 1), while the C path scales with workers.
C_HASH_PER_WORKER = 1 << 10


def prepare(rt: DeviceRuntime) -> None:
    """Begin pinning the device's staging pool in the background (see
    :meth:`DeviceRuntime.prepare_stagers`); a load calls it first thing."""
    rt.prepare_stagers(WORKERS, CHUNK_BYTES, STAGING_DEPTH)


def read_weights(rt: DeviceRuntime, store: Path, offsets: Sequence[int], sizes: Sequence[int],
                 buffers: Sequence[_memory.Buffer], *, digests: Sequence[str | None] | None = None,
                 names: Sequence[str] | None = None, workers: int | None = None,
                 chunk_bytes: int | None = None, progress: bool | None = None,
                 max_bytes_per_s: float | None = None, direct: bool | None = None) -> int:
    """Fill ``buffers[i]`` with ``sizes[i]`` bytes at ``offsets[i]`` of ``store``.

    With ``digests`` (one per weight, ``"b3t:..."`` as :func:`aoti_rt.digest.weight_digest`
    gives; ``None`` skips a weight), the bytes are hashed while they load and a weight whose
    bytes do not have its digest raises :class:`BundleError` naming it (``names[i]``, else
    its index); the buffers' contents are then garbage. ``digests=None``: nothing is hashed.

    On CUDA, worker threads read into pinned staging buffers and enqueue async copies (faster
    than registering an mmap of the page cache: 30.7 vs 21.8 GB/s on an H200 host). If the store is pinned in host memory (:func:`pin_store`), the bytes are
    copied (and hashed) from that image and nothing is read (returns 0); otherwise returns
    the bytes read. Raises :class:`BundleError` if the store is not a regular file, is
    shorter than the weights need, cannot be read or does not match the digests, and
    :class:`aoti_rt.errors.CudaError` if a copy fails. Whatever interrupts it (Ctrl-C), no
    worker touches the file or the buffers once it has returned or raised.

    ``max_bytes_per_s`` caps the workers' rate together (a load next to a model that is
    serving leaves it host->device bandwidth). ``direct``: read with ``O_DIRECT`` (True), through
    the page cache (False), or, by default (None, ``$AOTI_RT_DIRECT`` overrides), with
    ``O_DIRECT`` on CUDA when a sample of the weights' pages is not in the page cache: a
    cold read then goes from the disk straight into the pinned staging buffers, without
    filling the page cache on the way.
    """
    n = len(offsets)
    if len(sizes) != n or len(buffers) != n or (digests is not None and len(digests) != n) \
            or (names is not None and len(names) != n):
        raise ValueError("offsets, sizes, buffers (and digests, names) must have the same length")
    offsets, sizes, buffers = list(offsets), list(sizes), list(buffers)
    store = Path(store)
    label = (lambda i: f"weight {names[i]!r}") if names is not None else (lambda i: f"weight {i}")
    verify = _check_verifiable(digests, store, label)
    total = int(sum(sizes))
    chunk = int(chunk_bytes or CHUNK_BYTES)
    source = f"weight store {store}"
    pinned = rt.pinned_store(store.resolve())
    image = pinned.image if pinned is not None else None    # our reference keeps it alive
    if image is not None and pinned.current():
        _check_extents(offsets, sizes, image.nbytes, store, label)
        plan = _load.LoadPlan(offsets, sizes, buffers, chunk, verify=verify, source=source,
                              max_bytes_per_s=max_bytes_per_s or 0)
        # unverified: one thread, one stream, as fast as the copy engine; verified: the
        # workers hash their chunks from the image while their copies run
        nworkers = max(1, min(int(workers or WORKERS), plan.num_chunks)) if verify else 1
        _tune(plan, nworkers)
        if plan.num_pieces:
            stagers = rt.take_stagers(nworkers, chunk) if rt.is_cuda else [None] * nworkers
            try:
                _load.run_workers(plan, nworkers, lambda w: _load.copy_from_host(
                    plan, image, stagers[w], w, nworkers))
            finally:
                if rt.is_cuda:
                    rt.give_stagers(stagers)
        if verify:
            _check_digests(plan, digests, store, label)
        return 0
    with _reading(store, offsets, sizes, label, total, progress) as (fd, bar):
        plan = _load.LoadPlan(offsets, sizes, buffers, chunk, verify=verify, source=source,
                              max_bytes_per_s=max_bytes_per_s or 0)
        nworkers = max(1, min(int(workers or WORKERS), plan.num_chunks))
        _tune(plan, nworkers)
        if not plan.num_pieces:
            pass
        elif rt.is_cuda:
            # pooled copy engines where there are; a worker without one pins its own staging
            # in its thread, so a process's first load pins memory while other workers read
            stagers = rt.take_stagers(nworkers, chunk, STAGING_DEPTH, create=False)
            dfd = _open_direct(store, fd, offsets, sizes, direct)

            def work(w: int) -> None:
                if stagers[w] is None:
                    stagers[w] = rt.new_stager(chunk, STAGING_DEPTH)
                stagers[w].run(plan, dfd if dfd is not None else fd, w, nworkers, dfd is not None)

            try:
                _run(plan, nworkers, work, bar)
            finally:
                rt.give_stagers(stagers)
                if dfd is not None:
                    os.close(dfd)
        else:
            _run(plan, nworkers, lambda w: plan.run_host(fd, w, nworkers), bar)
    if verify:
        _check_digests(plan, digests, store, label)
    return total


def read_replicated(rts: Sequence[DeviceRuntime], store: Path, offsets: Sequence[int], sizes: Sequence[int],
                    buffers: Sequence[Sequence[_memory.Buffer]], *,
                    digests: Sequence[str | None] | None = None, names: Sequence[str] | None = None,
                    workers: int | None = None, chunk_bytes: int | None = None, progress: bool | None = None,
                    max_bytes_per_s: float | None = None, direct: bool | None = None,
                    relay: bool | None = None) -> list[int]:
    """Fill ``buffers[d][i]`` (memory of device ``rts[d]``) with ``sizes[i]`` bytes at
    ``offsets[i]`` of ``store`` on every device at once, reading each byte of the store once.

    The same contract as :func:`read_weights` (``digests`` checked once: every device gets the
    bytes that were hashed; the same errors; nothing touches the file or the buffers once it
    has returned or raised), for several devices: each worker reads a chunk into one pinned
    (portable) staging buffer of the first device's pool and enqueues its host->device copies
    on every device's own stream (:func:`aoti_rt._load.run_replicated`), reusing the buffer
    only once every device's copies are done. ``max_bytes_per_s`` paces the chunks, so each
    device receives at most that rate. The first device's pool lends the staging buffers;
    the others lend only streams and events (:meth:`DeviceRuntime.take_copy_engines`).
    ``relay`` (default :data:`REPLICATE` == "peer"): the other devices copy each chunk from the
    first device's memory instead (peer to peer), where all of them have peer access to it.

    Returns the bytes read from the store for each device: all of them for the first, as the
    store is read once, however many devices, and 0 for the others. If a device holds the
    store pinned (:func:`pin_store`), each device is filled on its own (:func:`read_weights`:
    from its image, or read) and has its own count. On the CPU (one device: ``rts``
    ``[cpu]``) a chunk is read into a host staging buffer and copied to the destinations.
    """
    n = len(offsets)
    nd = len(rts)
    if nd < 1 or len(buffers) != nd or any(len(b) != n for b in buffers):
        raise ValueError("one list of buffers per device, each with one buffer per weight")
    if len(sizes) != n or (digests is not None and len(digests) != n) or (names is not None and len(names) != n):
        raise ValueError("offsets, sizes (and digests, names) must have the same length")
    if len({rt.device for rt in rts}) != nd or len({rt.is_cuda for rt in rts}) != 1:
        raise ValueError("a replicated read needs distinct devices, all CUDA or the one CPU")
    store = Path(store)
    if any(rt.pinned_store(store.resolve()) is not None for rt in rts):
        return [read_weights(rt, store, offsets, sizes, bufs, digests=digests, names=names, workers=workers,
                             chunk_bytes=chunk_bytes, progress=progress, max_bytes_per_s=max_bytes_per_s,
                             direct=direct) for rt, bufs in zip(rts, buffers)]
    offsets, sizes = list(offsets), list(sizes)
    label = (lambda i: f"weight {names[i]!r}") if names is not None else (lambda i: f"weight {i}")
    verify = _check_verifiable(digests, store, label)
    total = int(sum(sizes))
    chunk = int(chunk_bytes or CHUNK_BYTES)
    source = f"weight store {store}"
    with _reading(store, offsets, sizes, label, total, progress) as (fd, bar):
        plans = tuple(_load.LoadPlan(offsets, sizes, list(bufs), chunk, verify=verify and d == 0, source=source,
                                     max_bytes_per_s=(max_bytes_per_s or 0) if d == 0 else 0)
                      for d, bufs in enumerate(buffers))
        primary = plans[0]
        nworkers = max(1, min(int(workers or WORKERS), primary.num_chunks))
        _tune(primary, nworkers)
        if not primary.num_pieces:
            pass
        elif rts[0].is_cuda:
            if relay is None:
                relay = REPLICATE == "peer"
            relay = bool(relay) and all(rt.peer_access(rts[0]) for rt in rts[1:])
            first = rts[0].take_stagers(nworkers, chunk, STAGING_DEPTH, create=False)
            others: list[list] = []
            dfd = None
            try:
                for rt in rts[1:]:
                    others.append(rt.take_copy_engines(nworkers, STAGING_DEPTH))
                dfd = _open_direct(store, fd, offsets, sizes, direct)

                def work(w: int) -> None:
                    if first[w] is None:      # pinned in the worker's own thread (see read_weights)
                        first[w] = rts[0].new_stager(chunk, STAGING_DEPTH)
                    _load.run_replicated(plans, (first[w], *(o[w] for o in others)),
                                         dfd if dfd is not None else fd, w, nworkers, dfd is not None,
                                         None, relay)

                _run(primary, nworkers, work, bar)
            finally:
                rts[0].give_stagers(first)
                for rt, engines in zip(rts[1:], others):
                    rt.give_stagers(engines)
                if dfd is not None:
                    os.close(dfd)
        else:
            host = rts[0].pinned

            def work(w: int) -> None:
                staging = host.allocate(chunk + 2 * _load.DIRECT_ALIGN)
                _load.run_replicated(plans, (), fd, w, nworkers, False, (staging,), bool(relay))

            _run(primary, nworkers, work, bar)
    if verify:
        _check_digests(primary, digests, store, label)
    return [total] + [0] * (nd - 1)


def _check_verifiable(digests: Sequence[str | None] | None, store: Path, label) -> bool:
    """Whether any weight is to be hashed; a digest the loader cannot check is a BundleError."""
    verify = digests is not None and any(d is not None for d in digests)
    if verify:
        for i, d in enumerate(digests):
            if d is not None and not is_verifiable(d):
                raise BundleError(
                    f"{label(i)} of {store} declares digest {str(d)[:20]!r}..., which aoti_rt cannot "
                    f"verify while loading (it checks {PREFIX!r} BLAKE3 digests); recompile the bundle "
                    f"with this version of aoti_rt")
    return verify


def _open_store(store: Path) -> tuple[int, int]:
    """Open a weight store for reading: ``(fd, size)``. Never blocks on a FIFO; refuses
    anything but a regular file (:func:`aoti_rt.bundle.open_regular`); reads then block."""
    fd, st = open_regular(Path(store), "weight store")
    try:
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def page_cache_cold(fd: int, offsets: Sequence[int], sizes: Sequence[int], samples: int = 16) -> bool:
    """Whether most of a sample of the weights' pages are not in the page cache.

    Reads one page at up to ``samples`` places spread over the weights with
    ``RWF_NOWAIT``, which fails instead of going to the disk: no I/O, a few microseconds."""
    if not hasattr(os, "RWF_NOWAIT") or not offsets:
        return False
    order = sorted(range(len(offsets)), key=offsets.__getitem__)
    spots = []
    for k in range(samples):
        i = order[k * len(order) // samples] if len(order) >= samples else order[k % len(order)]
        if sizes[i]:
            spots.append(offsets[i] + (sizes[i] * (k % 3)) // 3)
    page = bytearray(4096)
    missed = 0
    for off in spots:
        try:
            os.preadv(fd, [page], off, os.RWF_NOWAIT)
        except BlockingIOError:
            missed += 1
        except OSError:
            return False        # RWF_NOWAIT not supported here: assume warm
    return bool(spots) and 2 * missed >= len(spots)


def _open_direct(store: Path, fd: int, offsets: Sequence[int], sizes: Sequence[int],
                 direct: bool | None) -> int | None:
    """An ``O_DIRECT`` fd of the store when it should be read that way (see read_weights), else None.

    A file system without O_DIRECT (tmpfs) reads through the page cache instead."""
    env = os.environ.get("AOTI_RT_DIRECT")
    if direct is None and env in ("0", "1"):
        direct = env == "1"
    if direct is None:
        direct = page_cache_cold(fd, offsets, sizes)
    if not direct or not hasattr(os, "O_DIRECT"):
        return None
    try:
        dfd = os.open(store, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    if os.fstat(dfd).st_ino != os.fstat(fd).st_ino:     # replaced since it was checked
        os.close(dfd)
        return None
    return dfd


def _check_extents(offsets: list[int], sizes: list[int], size: int, store: Path, label) -> None:
    """Every weight must lie inside the ``size``-byte store; checked before anything is read."""
    if not offsets:
        return
    if min(offsets) >= 0 and min(sizes) >= 0 and max(map(int.__add__, offsets, sizes)) <= size:
        return
    for i, (off, n) in enumerate(zip(offsets, sizes)):
        if off < 0 or n < 0:
            raise BundleError(f"{label(i)} of {store} has offset {off} and size {n}; the manifest is corrupt")
        if off + n > size:
            raise BundleError(f"weight store {store} is truncated: {label(i)} needs bytes up to {off + n}, "
                              f"the file has {size}; re-copy or recompile the bundle")


def _tune(plan: _load.LoadPlan, nworkers: int) -> None:
    """Which pieces the workers hash in C (see C_HASH_PER_WORKER)."""
    if plan.verify and plan.c_hash_max:
        plan.c_hash_max = min(plan.c_hash_max, nworkers * C_HASH_PER_WORKER)


def _check_digests(plan: _load.LoadPlan, digests: Sequence[str | None], store: Path, label) -> None:
    i = plan.first_mismatch(list(digests))
    if i >= 0:
        raise BundleError(f"{label(i)} of {store}: its bytes do not match its digest: the store is "
                          f"corrupt or was tampered with; re-copy or recompile the bundle")


def _run(plan: _load.LoadPlan, nworkers: int, fn, bar) -> list:
    """Run the plan's workers (see :func:`aoti_rt._load.run_workers`), moving the bar."""
    update = None if bar is None else (lambda done: bar.update(done - bar.n))
    return _load.run_workers(plan, nworkers, fn, update)


class PinnedStore:
    """A bundle's weight store held in page-locked host memory for one device.

    While it is open, loads of that bundle onto the device copy each needed weight from this
    image at the host->device copy ceiling and read nothing from disk (re-loading a model
    after closing it, or swapping models in and out of the GPU). The image is read once, in
    parallel; :meth:`close` (or leaving the ``with`` block) frees it.
    """

    def __init__(self, rt: DeviceRuntime, store: Path, *, progress: bool | None = None):
        self.rt = rt
        self.path = Path(store).resolve()
        self.image = None
        fd, size = _open_store(self.path)
        try:
            st = os.fstat(fd)
            self._stat = (st.st_size, st.st_mtime_ns, st.st_ino)    # as bundle.file_identity
            self.image = rt.pinned.allocate(size)
            bar = _progress(size, progress)
            try:
                plan = _load.LoadPlan([0], [size], [self.image], CHUNK_BYTES,
                                       source=f"weight store {self.path}")
                nworkers = max(1, min(WORKERS, plan.num_chunks))
                _run(plan, nworkers, lambda w: plan.run_host(fd, w, nworkers), bar)
            finally:
                if bar is not None:
                    _close_bar(bar, size)
        except BaseException:
            self.image = None
            raise
        finally:
            os.close(fd)
        self.nbytes = size
        rt.cache.add_bytes_read(size)
        rt.add_pinned_store(self)

    def current(self) -> bool:
        """True while the file on disk is the one that was pinned."""
        return self.image is not None and file_identity(self.path) == self._stat

    def close(self) -> None:
        self.rt.remove_pinned_store(self)
        self.image = None

    def __enter__(self) -> "PinnedStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _progress(total: int, progress: bool | None):
    """A tqdm bar: by default on a terminal, appearing once a load has taken a second."""
    delay = 0.0
    if progress is None:
        progress, delay = sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES, 1.0
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="aoti_rt load", delay=delay)


@contextlib.contextmanager
def _reading(store: Path, offsets: Sequence[int], sizes: Sequence[int], label, total: int,
             progress: bool | None) -> Iterator[tuple[int, Any]]:
    """The store open for reading, every weight's extent checked to lie inside it, and a
    progress bar (or None): both closed after the block, the bar filled if it succeeded."""
    fd, size = _open_store(store)
    bar = None
    try:
        _check_extents(offsets, sizes, size, store, label)
        bar = _progress(total, progress)
        yield fd, bar
        _close_bar(bar, total)
        bar = None
    finally:
        os.close(fd)
        if bar is not None:
            bar.close()


def _close_bar(bar, total: int) -> None:
    if bar is not None:
        bar.update(total - bar.n)
        bar.close()


def pin_store(path: str | os.PathLike[str], *, device: "str | Device | None" = None,
              progress: bool | None = None) -> PinnedStore:
    """Hold a bundle's weight store in page-locked host memory for ``device``.

    ``path`` is a bundle directory (or its ``weights.safetensors``). Until the returned
    :class:`PinnedStore` is closed, loading that bundle onto ``device`` copies its weights
    from host memory instead of reading the file. Costs host memory equal to the store size.
    """
    from . import device as _device
    from .bundle import read_bundle

    p = Path(path)
    store, default = p, "cpu"
    if p.is_dir():
        bundle = read_bundle(p)
        store, default = bundle.store_path, "cpu" if bundle.manifest.device == "cpu" else "cuda"
    rt = _device.get(Device.parse(device, default=default))
    return PinnedStore(rt, store, progress=progress)
