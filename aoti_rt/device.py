"""Devices: what a device is (:class:`Device`) and what aoti_rt holds for it (:class:`DeviceRuntime`).

A :class:`DeviceRuntime` owns one device's allocator and weight cache, and composes one part
per job: the driver's view of the device (:class:`DeviceDriver`), the loader's copy engines and
pinned stores (:class:`CopyEngines`), the memory counters (:class:`MemoryCounters`) and the
share candidates (:class:`ShareCandidates`); :func:`get` gives the one per device, created on
first use. :func:`current_context` makes a CUDA context current for a block. CUDA is driven through cuda-python's driver bindings: ``cuInit``, the device's primary
context (the one PyTorch and AOTI use), and ``cuGetProcAddress`` for the entry points the
Cython core calls directly. Without an NVIDIA driver, :func:`cuda_available` is False and
asking for a CUDA device raises a clear error.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import _cache, _load, _memory
from .errors import CudaError, DeviceError

_lock = threading.Lock()
_devices: dict["Device", "DeviceRuntime"] = {}
_cuda_state: dict[str, object] = {}

#: page-lock staging buffers and pinned stores as mappings advised to use transparent huge
#: pages, registered with cuMemHostRegister, instead of cuMemHostAlloc: on the H200 host 256 MiB
#: took 40 ms instead of 85, 1 GiB 200 ms instead of 349 (``$AOTI_RT_HUGE_PAGES=0``: off)
HUGE_PAGES = os.environ.get("AOTI_RT_HUGE_PAGES", "1") != "0"

#: cudaVersion passed to cuGetProcAddress (12.0: the _v2 entry points)
_PROC_VERSION = 12000


def _driver():
    from cuda.bindings import driver

    return driver


def _ok(result, what: str):
    """Unpack a cuda-python ``(CUresult, *values)`` tuple, raising on error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaError(what, int(err))
    return rest[0] if len(rest) == 1 else rest


def cuda_available() -> bool:
    """True when an NVIDIA driver and at least one CUDA device are present."""
    try:
        _init_cuda()
    except Exception:  # noqa: BLE001 - no driver, no device, or cuda-python missing
        return False
    return int(_cuda_state.get("count", 0)) > 0


def _init_cuda() -> None:
    with _lock:
        if "count" in _cuda_state:
            return
        try:
            drv = _driver()
            _ok(drv.cuInit(0), "cuInit")
        except Exception as e:  # DynamicLibNotFoundError without a driver
            _cuda_state["count"] = 0
            _cuda_state["error"] = f"{type(e).__name__}: {e}"
            raise
        count = _ok(drv.cuDeviceGetCount(), "cuDeviceGetCount")
        pointers = {}
        flags = drv.CUdriverProcAddress_flags.CU_GET_PROC_ADDRESS_DEFAULT
        for sym in _memory.DRIVER_SYMBOLS:
            res = drv.cuGetProcAddress(sym.encode(), _PROC_VERSION, flags)
            pointers[sym] = int(_ok(res, f"cuGetProcAddress({sym})")[0])
        for sym in _memory.VMM_SYMBOLS:        # optional: only share= needs them
            try:
                pointers[sym] = int(_ok(drv.cuGetProcAddress(sym.encode(), _PROC_VERSION, flags),
                                        f"cuGetProcAddress({sym})")[0])
            except CudaError:
                pointers[sym] = 0
        _memory.install_driver(pointers)
        _cuda_state["count"] = int(count)


def _current_index() -> int:
    """torch's current CUDA device index (what ``"cuda"`` means to torch); 0 where CUDA is
    absent (the caller then refuses the device)."""
    try:
        _init_cuda()
    except Exception:  # noqa: BLE001 - no driver: Device.parse says so
        return 0
    if not _cuda_state.get("count"):
        return 0
    try:
        import torch

        return int(torch.cuda.current_device())
    except Exception:  # noqa: BLE001 - a CPU-only torch next to a driver
        return 0


@dataclass(frozen=True)
class Device:
    """A device aoti_rt runs on: ``Device("cpu")`` or ``Device("cuda", n)``.

    Frozen and hashable, so it keys per-device state; ``str(device)`` is the spelling torch
    and AOTI use (``"cpu"``, ``"cuda:0"``). :meth:`parse` turns what users write into one.
    """

    kind: Literal["cpu", "cuda"]
    index: int = 0

    @classmethod
    def parse(cls, spec: "str | Device | None", default: "str | Device" = "cpu", *,
              check: bool = True) -> "Device":
        """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (or a Device, or a ``torch.device``) as a
        Device that exists on this machine; ``None`` means ``default``. ``"cuda"`` is torch's
        current CUDA device, as it is for torch (``torch.cuda.set_device(rank)`` in each
        process of a ``torchrun`` job makes ``"cuda"`` that rank's GPU).

        Raises:
            DeviceError: not a device name aoti_rt knows, or (unless ``check=False``) a CUDA
                device this machine does not have (the message says why). A ``ValueError``
                and an ``AotiRtError``.
        """
        spec = default if spec is None else spec
        if isinstance(spec, Device):
            dev = spec
        else:
            text = str(spec).strip().lower()
            kind, _, num = text.partition(":")
            if text == "cpu":
                return cls("cpu")
            if kind != "cuda" or (num and not num.isdigit()) or (_ and not num):
                raise DeviceError(f"unknown device {spec!r}: use 'cpu', 'cuda' or 'cuda:N'")
            dev = cls("cuda", int(num) if num else _current_index())
        if dev.is_cuda and check:
            try:
                _init_cuda()
            except Exception:  # noqa: BLE001
                pass
            count = int(_cuda_state.get("count", 0))
            if dev.index >= count:
                why = _cuda_state.get("error") or f"{count} CUDA device(s) present"
                raise DeviceError(f"device {dev} is not available ({why}); load on 'cpu' or on an "
                                  f"existing GPU (cuda:0 to cuda:{count - 1})" if count else
                                  f"device {dev} is not available ({why}); load on 'cpu'")
        return dev

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.is_cuda else "cpu"


def parse_devices(spec: "Sequence[str | Device]", default: "str | Device" = "cpu") -> list[Device]:
    """A list of devices (what ``load(..., device=[...])`` takes) as Devices that exist here.

    Raises:
        DeviceError: the list is empty, names a device twice (``"cuda"`` is ``"cuda:0"``),
            mixes the CPU with GPUs, or names a device that is unknown or absent.
    """
    if isinstance(spec, (str, Device)) or not isinstance(spec, Sequence):
        raise DeviceError(f"expected a list of devices, got {spec!r}")
    devs = [Device.parse(s, default=default, check=False) for s in spec]
    if not devs:
        raise DeviceError("an empty list of devices: name at least one, e.g. ['cuda:0', 'cuda:1']")
    seen: set[Device] = set()
    for d in devs:
        if d in seen:
            raise DeviceError(f"device {d} appears twice in {[str(s) for s in spec]}: each device holds one "
                              f"copy of the weights, so list each once")
        seen.add(d)
    if len({d.kind for d in devs}) > 1:
        raise DeviceError(f"{[str(d) for d in devs]} mixes the CPU with GPUs: an AOTI .so runs only on the "
                          f"device type it was compiled for; list only CUDA devices (or only 'cpu')")
    return [Device.parse(d) for d in devs]       # each one must exist


@contextlib.contextmanager
def device_guard(device: "Device | str") -> Iterator[None]:
    """Make ``device`` torch's current CUDA device inside the block, and the previous one
    current again after it (a no-op for the CPU).

    AOTI's ``CreateWithDevice("cuda:N")`` calls ``cudaSetDevice(N)`` on the calling thread,
    and torch's runner makes CUDA calls on the current device: every call of that kind
    aoti_rt makes runs inside this guard, so loading a model on cuda:1 leaves the caller's
    current device as it was, and nothing of cuda:1 is created on another device.
    """
    dev = device if isinstance(device, Device) else Device.parse(device)
    if not dev.is_cuda:
        yield
        return
    import torch

    with torch.cuda.device(dev.index):
        yield


@dataclass(frozen=True)
class ShareCandidate:
    """Where a bundle-scoped cached weight was loaded from, to verify it on demand."""

    key: str                 # its cache key (bundle-scoped)
    store: str               # the store file it was read from
    identity: tuple | None   # the store's (size, mtime, inode) when it was read
    offset: int
    nbytes: int


@contextlib.contextmanager
def current_context(context: int) -> Iterator[None]:
    """Make the CUDA context ``context`` (a ``CUcontext`` as an int) current on the calling
    thread inside the block (``cuCtxPushCurrent``), and the one current before it after it
    (``cuCtxPopCurrent``). The Python twin of ``ctx_enter``/``ctx_leave`` in ``_memory.pxd``.

    Raises:
        CudaError: the context could not be made current (nothing is popped then).
    """
    drv = _driver()
    _ok(drv.cuCtxPushCurrent(drv.CUcontext(context)), "cuCtxPushCurrent")
    try:
        yield
    finally:
        drv.cuCtxPopCurrent()


class DeviceDriver:
    """A device as the CUDA driver sees it: its primary context (0 on the CPU), what names it
    across processes, whether it can share memory with other processes, its device-wide
    memory, and which other GPUs' memory its copies may read (peer access)."""

    def __init__(self, device: Device, context: int = 0) -> None:
        self.device = device
        self.context = context
        #: other device -> whether this device's copies may read its memory directly
        self.peers: dict = {}
        self.lock = threading.Lock()

    def identity(self) -> str:
        """What names this device across processes: ``"cpu"``, or ``"cuda:GPU-<uuid>"`` (the
        physical GPU, whatever ordinal ``CUDA_VISIBLE_DEVICES`` gives it in each process)."""
        if not self.device.is_cuda:
            return "cpu"
        drv = _driver()
        handle = _ok(drv.cuDeviceGet(self.device.index), "cuDeviceGet")
        get_uuid = getattr(drv, "cuDeviceGetUuid_v2", None) or drv.cuDeviceGetUuid
        raw = bytes(_ok(get_uuid(handle), "cuDeviceGetUuid").bytes)
        h = raw.hex()
        return f"cuda:GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"

    def check_shareable(self) -> None:
        """Raise :class:`aoti_rt.errors.ShareUnavailableError` (a ShareError) unless this device
        can share weights with other processes: the host can (memfd); a GPU needs the driver's
        virtual memory management with POSIX file-descriptor handles."""
        from .errors import ShareUnavailableError

        if not self.device.is_cuda:
            return
        if not _memory.vmm_available():
            why = ("its struct layouts do not match this platform" if not _memory.VMM_LAYOUT_OK else
                   "the driver lacks the virtual memory management entry points (driver >= 10.2)")
            raise ShareUnavailableError(f"{self.device} cannot share weights across processes: {why}; load without share=")
        drv = _driver()
        handle = _ok(drv.cuDeviceGet(self.device.index), "cuDeviceGet")
        # CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED (102; its name differs between
        # cuda-bindings releases) and CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED
        for code, what in ((102, "virtual memory management"), (103, "POSIX file-descriptor memory handles")):
            if not _ok(drv.cuDeviceGetAttribute(drv.CUdevice_attribute(code), handle),
                       f"cuDeviceGetAttribute({code})"):
                raise ShareUnavailableError(f"{self.device} does not support {what} (needed to share weights across "
                                 f"processes: a MIG instance or a driver setting can disable it); load without share=")

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of a CUDA device, device-wide (cuMemGetInfo in its primary context)."""
        with current_context(self.context):
            free, total = _ok(_driver().cuMemGetInfo(), "cuMemGetInfo")
        return int(free), int(total)

    def peer_access(self, other: "DeviceDriver") -> bool:
        """Whether this GPU can read ``other``'s memory directly (NVLink or PCIe peer to peer),
        enabling that access for this device's context the first time (``cuCtxEnablePeerAccess``;
        a process-wide setting torch makes the same way when it copies between GPUs). False for
        the CPU, for the same device and where the hardware cannot."""
        if not (self.device.is_cuda and other.device.is_cuda) or other.device == self.device:
            return False
        with self.lock:
            known = self.peers.get(other.device)
        if known is not None:
            return known
        drv = _driver()
        ok = False
        try:
            can = _ok(drv.cuDeviceCanAccessPeer(_ok(drv.cuDeviceGet(self.device.index), "cuDeviceGet"),
                                                _ok(drv.cuDeviceGet(other.device.index), "cuDeviceGet")),
                      "cuDeviceCanAccessPeer")
            if can:
                with current_context(self.context):
                    res = drv.cuCtxEnablePeerAccess(drv.CUcontext(other.context), 0)
                err = res[0] if isinstance(res, tuple) else res
                # 704: CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED (by torch, say)
                ok = int(err) in (0, 704)
        except CudaError:
            ok = False
        with self.lock:
            self.peers[other.device] = ok
        return ok


class CopyEngines:
    """The loader's pooled copy engines of one device (:class:`aoti_rt._load.Stager`: pinned
    staging buffers, a stream, events), the background thread that pins the first ones ahead
    of a load, and the stores pinned for the device (:func:`aoti_rt.pin_store`)."""

    def __init__(self, device: Device, context: int, pinned: "_memory.Allocator | None") -> None:
        self.device = device
        self.context = context
        #: host memory for staging and pinned stores
        self.pinned = pinned
        self.stagers: list = []
        self.lock = threading.Lock()
        #: a background thread is pinning the staging pool ahead of the first load
        self.staging_thread: threading.Thread | None = None
        #: a load has taken stagers since: the background thread stops (workers pin their own)
        self.staging_taken = False
        #: resolved store path -> PinnedStore (loader.pin_store) whose image loads copy from
        self.pinned_stores: dict = {}

    def take_stagers(self, n: int, chunk_bytes: int, depth: int = 2, *, create: bool = True) -> list:
        """Borrow ``n`` copy engines with staging of at least ``chunk_bytes`` x ``depth``
        from the pool (kept from earlier loads); those the pool lacks are made now, or, with
        ``create=False``, left as None for the worker to make (:meth:`new_stager`) in its own
        thread, so pinning staging memory overlaps the other workers' reads."""
        with self.lock:
            self.staging_taken = True
            fit = [s for s in self.stagers if s.chunk_bytes >= chunk_bytes and s.depth >= depth][:n]
            for s in fit:
                self.stagers.remove(s)
        got: list = list(fit)
        while len(got) < n:
            got.append(self.new_stager(chunk_bytes, depth) if create else None)
        return got

    def prepare_stagers(self, n: int, chunk_bytes: int, depth: int = 2) -> None:
        """Start pinning ``n`` copy engines in a background thread, once per device.

        Page-locking host memory is most of a process's first load; started when a model
        load begins, it overlaps reading the manifest, opening the .so files and creating
        the containers. The thread stops once the pool holds ``n`` or a load takes from it
        (that load's workers pin what they lack themselves)."""
        with self.lock:
            if not self.device.is_cuda or self.staging_thread is not None:
                return

            def fill() -> None:
                try:
                    while True:
                        with self.lock:
                            fit = sum(s.chunk_bytes >= chunk_bytes and s.depth >= depth for s in self.stagers)
                            if self.staging_taken or fit >= n:
                                return
                        self.give_stagers([self.new_stager(chunk_bytes, depth)])
                except Exception:  # noqa: BLE001 - out of pinned memory, say: the loader retries and reports
                    return

            self.staging_thread = threading.Thread(target=fill, name="aoti_rt-staging", daemon=True)
            self.staging_thread.start()

    def new_stager(self, chunk_bytes: int, depth: int = 2) -> "_load.Stager":
        """A new copy engine: ``depth`` pinned staging buffers of ``chunk_bytes``, a stream
        (``chunk_bytes=0``: no staging, a stream and events only)."""
        return _load.Stager(self.pinned if chunk_bytes else None, self.context, chunk_bytes, depth,
                            str(self.device))

    def take_copy_engines(self, n: int, depth: int = 2) -> list:
        """Borrow ``n`` copy engines for a replicated load's other devices: only their streams
        and events are used (the first device's staging buffers are read), so the pool's
        engines without staging go first, then any pooled one, then new ones without staging
        (no host memory pinned for them). Give them back with :meth:`give_stagers`."""
        with self.lock:
            bare = sorted((s for s in self.stagers if s.depth >= depth), key=lambda s: s.chunk_bytes)[:n]
            for s in bare:
                self.stagers.remove(s)
        got: list = list(bare)
        try:
            while len(got) < n:
                got.append(self.new_stager(0, depth))
        except BaseException:
            self.give_stagers(got)
            raise
        return got

    def give_stagers(self, stagers: list) -> None:
        """Return borrowed copy engines to the pool (None entries are skipped)."""
        with self.lock:
            self.stagers.extend(s for s in stagers if s is not None)

    def free_staging(self) -> None:
        """Drop the pooled pinned staging buffers (they are re-created on the next load)."""
        with self.lock:
            self.stagers.clear()

    def pinned_store(self, store: Path):
        """The open :class:`aoti_rt.loader.PinnedStore` of ``store`` (resolved), or None."""
        return self.pinned_stores.get(store)

    def add_pinned_store(self, pinned) -> None:
        self.pinned_stores[pinned.path] = pinned

    def remove_pinned_store(self, pinned) -> None:
        if self.pinned_stores.get(pinned.path) is pinned:
            del self.pinned_stores[pinned.path]

    def pinned_store_bytes(self) -> int:
        """Host bytes of the stores pinned for this device."""
        return sum(p.nbytes for p in list(self.pinned_stores.values()))


class MemoryCounters:
    """What :mod:`aoti_rt.memory` reports beyond the allocator's own counters: the methods
    whose .so holds private weights (legacy) and their bytes, and the sampled device-wide peak."""

    def __init__(self) -> None:
        self.legacy_methods = 0
        self.legacy_bytes = 0
        #: the largest device-wide used bytes sampled (cuMemGetInfo), None before any sample
        self.peak_used: int | None = None
        self.lock = threading.Lock()

    def count_legacy(self, methods: int, nbytes: int) -> None:
        """Count a method whose .so holds its own private weights (negative: one less)."""
        with self.lock:
            self.legacy_methods += methods
            self.legacy_bytes += nbytes

    def fold_used(self, used: int) -> None:
        """Fold a sample of device-wide used bytes into :attr:`peak_used`."""
        with self.lock:
            if self.peak_used is None or used > self.peak_used:
                self.peak_used = used

    def reset_peak(self) -> None:
        with self.lock:
            self.peak_used = None


class ShareCandidates:
    """Content key -> :class:`ShareCandidate`: a bundle's own, not yet verified copy of a weight
    that another bundle may share once the copy's store bytes hash to the digest. A candidate
    lives while its entry is in ``cache``."""

    def __init__(self, cache: _cache.WeightCache) -> None:
        self.cache = cache
        self.candidates: dict = {}
        self.lock = threading.Lock()

    def offer(self, content_key: str, candidate: ShareCandidate) -> None:
        """Remember a bundle-scoped cache entry as the copy of ``content_key`` that other
        bundles may share once verified (the first offer stays while its entry lives)."""
        with self.lock:
            old = self.candidates.get(content_key)
            if old is None or old.key not in self.cache:
                self.candidates[content_key] = candidate
            if len(self.candidates) > 4 * len(self.cache) + 1024:    # drop dead ones
                self.candidates = {k: c for k, c in self.candidates.items() if c.key in self.cache}

    def get(self, content_key: str) -> "ShareCandidate | None":
        """The live candidate copy for ``content_key``, or None."""
        with self.lock:
            c = self.candidates.get(content_key)
            if c is not None and c.key not in self.cache:
                del self.candidates[content_key]
                c = None
            return c

    def forget(self, content_key: str, candidate: ShareCandidate) -> None:
        """Drop a candidate whose store no longer holds what its digest claims."""
        with self.lock:
            if self.candidates.get(content_key) is candidate:
                del self.candidates[content_key]


class DeviceRuntime:
    """Everything aoti_rt holds for one device; :func:`get` gives the one per device.

    It owns the device's allocator and weight cache, and composes one part per job:
    :attr:`driver` (:class:`DeviceDriver`: the context, identity, shareability, device-wide
    memory, peer access), :attr:`engines` (:class:`CopyEngines`: the loader's pooled copy
    engines and the stores pinned for the device), :attr:`counters` (:class:`MemoryCounters`:
    what legacy methods hold, the sampled peak; :mod:`aoti_rt.memory` only reports them) and
    :attr:`sharing` (:class:`ShareCandidates`, for on-demand verification). The methods and
    attributes below that name a part's are kept for the modules that use them.
    """

    def __init__(self, device: Device, allocator: _memory.Allocator, cache: _cache.WeightCache,
                 context: int = 0, pinned: "_memory.Allocator | None" = None) -> None:
        self.device = device
        self.allocator = allocator
        self.cache = cache
        self.driver = DeviceDriver(device, context)
        self.engines = CopyEngines(device, context, pinned)
        self.counters = MemoryCounters()
        self.sharing = ShareCandidates(cache)
        #: the arena allocators of models that share weights with other processes (load(share=))
        self.arena_allocators: "weakref.WeakSet[_arena.ArenaAllocator]" = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"DeviceRuntime({self.device})"

    @property
    def is_cuda(self) -> bool:
        return self.device.is_cuda

    @property
    def index(self) -> int:
        return self.device.index

    @property
    def context(self) -> int:
        """The device's primary context (a ``CUcontext`` as an int; 0 on the CPU)."""
        return self.driver.context

    @property
    def pinned(self) -> "_memory.Allocator | None":
        """Host memory for staging and pinned stores."""
        return self.engines.pinned

    # -- memory ---------------------------------------------------------------------------

    @property
    def legacy_methods(self) -> int:
        return self.counters.legacy_methods

    @property
    def legacy_bytes(self) -> int:
        return self.counters.legacy_bytes

    @property
    def peak_used(self) -> int | None:
        return self.counters.peak_used

    def count_legacy(self, methods: int, nbytes: int) -> None:
        """Count a method whose .so holds its own private weights (negative: one less)."""
        self.counters.count_legacy(methods, nbytes)

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of a CUDA device, device-wide (cuMemGetInfo in its primary context)."""
        return self.driver.memory_info()

    def sample(self) -> int | None:
        """Read device-wide used bytes now and fold them into :attr:`peak_used`; None on the CPU."""
        if not self.is_cuda:
            return None
        free, total = self.driver.memory_info()
        used = total - free
        self.counters.fold_used(used)
        return used

    def reset_peak(self) -> None:
        """Start new high-water marks: own bytes allocated and reserved, and the sampled peak."""
        self.allocator.reset_peak()
        self.counters.reset_peak()

    def shared_bytes(self) -> tuple[int, int]:
        """Bytes of the arenas mapped on this device for weights shared across processes:
        ``(exported, imported)`` (an exporter's arenas live in its own device memory; imported
        ones are another process's memory, mapped here)."""
        exported = imported = 0
        for alloc in list(self.arena_allocators):
            for arena in list(alloc.arenas):
                if arena.imported:
                    imported += arena.nbytes
                else:
                    exported += arena.nbytes
        return exported, imported

    # -- the driver -----------------------------------------------------------------------

    def identity(self) -> str:
        """See :meth:`DeviceDriver.identity`."""
        return self.driver.identity()

    def check_shareable(self) -> None:
        """See :meth:`DeviceDriver.check_shareable`."""
        self.driver.check_shareable()

    def peer_access(self, other: "DeviceRuntime") -> bool:
        """See :meth:`DeviceDriver.peer_access`."""
        return self.driver.peer_access(other.driver)

    # -- copy engines and pinned stores ---------------------------------------------------

    def take_stagers(self, n: int, chunk_bytes: int, depth: int = 2, *, create: bool = True) -> list:
        """See :meth:`CopyEngines.take_stagers`."""
        return self.engines.take_stagers(n, chunk_bytes, depth, create=create)

    def prepare_stagers(self, n: int, chunk_bytes: int, depth: int = 2) -> None:
        """See :meth:`CopyEngines.prepare_stagers`."""
        self.engines.prepare_stagers(n, chunk_bytes, depth)

    def new_stager(self, chunk_bytes: int, depth: int = 2) -> "_load.Stager":
        """See :meth:`CopyEngines.new_stager`."""
        return self.engines.new_stager(chunk_bytes, depth)

    def take_copy_engines(self, n: int, depth: int = 2) -> list:
        """See :meth:`CopyEngines.take_copy_engines`."""
        return self.engines.take_copy_engines(n, depth)

    def give_stagers(self, stagers: list) -> None:
        """See :meth:`CopyEngines.give_stagers`."""
        self.engines.give_stagers(stagers)

    def free_staging(self) -> None:
        """See :meth:`CopyEngines.free_staging`."""
        self.engines.free_staging()

    def pinned_store(self, store: Path):
        """See :meth:`CopyEngines.pinned_store`."""
        return self.engines.pinned_store(store)

    def add_pinned_store(self, pinned) -> None:
        self.engines.add_pinned_store(pinned)

    def remove_pinned_store(self, pinned) -> None:
        self.engines.remove_pinned_store(pinned)

    def pinned_store_bytes(self) -> int:
        """See :meth:`CopyEngines.pinned_store_bytes`."""
        return self.engines.pinned_store_bytes()

    # -- on-demand sharing ----------------------------------------------------------------

    def offer_shared(self, content_key: str, candidate: ShareCandidate) -> None:
        """See :meth:`ShareCandidates.offer`."""
        self.sharing.offer(content_key, candidate)

    def shared_candidate(self, content_key: str) -> "ShareCandidate | None":
        """See :meth:`ShareCandidates.get`."""
        return self.sharing.get(content_key)

    def forget_shared(self, content_key: str, candidate: ShareCandidate) -> None:
        """See :meth:`ShareCandidates.forget`."""
        self.sharing.forget(content_key, candidate)


def get(device: "str | Device") -> DeviceRuntime:
    """The runtime of a device (a :class:`Device` or its name), created on first use."""
    dev = device if isinstance(device, Device) else Device.parse(device)
    with _lock:
        rt = _devices.get(dev)
        if rt is not None:
            return rt
    if not dev.is_cuda:
        rt = DeviceRuntime(dev, _memory.HostAllocator("cpu"), _cache.WeightCache(),
                           pinned=_memory.HostAllocator("host"))
    else:
        import torch

        _init_cuda()
        drv = _driver()
        torch.cuda.init()
        handle = _ok(drv.cuDeviceGet(dev.index), "cuDeviceGet")
        ctx = int(_ok(drv.cuDevicePrimaryCtxRetain(handle), "cuDevicePrimaryCtxRetain"))
        rt = DeviceRuntime(dev, _memory.CudaAllocator(str(dev), dev.index, ctx), _cache.WeightCache(),
                           context=ctx, pinned=_memory.PinnedAllocator(f"pinned:{dev.index}", ctx,
                                                                       huge_pages=HUGE_PAGES))
    with _lock:
        return _devices.setdefault(dev, rt)


def all_runtimes() -> dict[Device, DeviceRuntime]:
    """The runtimes created so far, by device."""
    with _lock:
        return dict(_devices)
