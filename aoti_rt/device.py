"""Devices: one allocator, one weight cache and (for CUDA) the copy engines per device.

CUDA is driven through cuda-python's driver bindings: ``cuInit``, the device's primary
context (the one PyTorch and AOTI use), and ``cuGetProcAddress`` for the entry points the
Cython cache calls directly. Without an NVIDIA driver, :func:`cuda_available` is False and
asking for a CUDA device raises a clear error.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from . import _cache
from .errors import AotiRtError

_lock = threading.Lock()
_devices: dict[str, "DeviceRuntime"] = {}
_cuda_state: dict[str, object] = {}

#: cudaVersion passed to cuGetProcAddress (12.0: the _v2 entry points)
_PROC_VERSION = 12000


def _driver():
    from cuda.bindings import driver

    return driver


def _ok(result, what: str):
    """Unpack a cuda-python ``(CUresult, *values)`` tuple, raising on error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise _cache.CudaError(what, int(err))
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
        for sym in _cache.DRIVER_SYMBOLS:
            res = drv.cuGetProcAddress(sym.encode(), _PROC_VERSION, flags)
            pointers[sym] = int(_ok(res, f"cuGetProcAddress({sym})")[0])
        _cache.install_driver(pointers)
        _cuda_state["count"] = int(count)


def normalize(device: str | None, default: str = "cpu") -> str:
    """"cuda" -> "cuda:0"; checks the device exists."""
    dev = (device or default).strip().lower()
    if dev == "cpu":
        return "cpu"
    if dev == "cuda":
        dev = "cuda:0"
    if not dev.startswith("cuda:") or not dev[5:].isdigit():
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")
    try:
        _init_cuda()
    except Exception:  # noqa: BLE001
        pass
    count = int(_cuda_state.get("count", 0))
    if int(dev[5:]) >= count:
        why = _cuda_state.get("error") or f"{count} CUDA device(s) present"
        raise AotiRtError(f"device {dev} is not available ({why}); load on 'cpu' or on an existing GPU")
    return dev


@dataclass(frozen=True)
class ShareCandidate:
    """Where a bundle-scoped cached weight was loaded from, to verify it on demand."""

    key: str                 # its cache key (bundle-scoped)
    store: str               # the store file it was read from
    identity: tuple | None   # the store's (size, mtime, inode) when it was read
    offset: int
    nbytes: int


@dataclass
class DeviceRuntime:
    """Everything aoti_rt holds for one device."""

    device: str
    allocator: _cache.Allocator
    cache: _cache.WeightCache
    context: int = 0
    pinned: _cache.Allocator | None = None     # host memory for staging and pinned stores
    stagers: list = field(default_factory=list)
    stager_lock: threading.Lock = field(default_factory=threading.Lock)
    #: resolved store path -> PinnedStore (loader.pin_store) whose image loads copy from
    pinned_stores: dict = field(default_factory=dict)
    #: content key -> ShareCandidate: a bundle's own, not yet verified copy of a weight that
    #: another bundle may share once the copy's store bytes hash to the digest
    share_candidates: dict = field(default_factory=dict)
    share_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def is_cuda(self) -> bool:
        return self.device != "cpu"

    @property
    def index(self) -> int:
        return int(self.device[5:]) if self.is_cuda else 0

    def offer_shared(self, content_key: str, candidate: "ShareCandidate") -> None:
        """Remember a bundle-scoped cache entry as the copy of ``content_key`` that other
        bundles may share once verified (the first offer stays while its entry lives)."""
        with self.share_lock:
            old = self.share_candidates.get(content_key)
            if old is None or old.key not in self.cache:
                self.share_candidates[content_key] = candidate
            if len(self.share_candidates) > 4 * len(self.cache) + 1024:    # drop dead ones
                self.share_candidates = {k: c for k, c in self.share_candidates.items()
                                         if c.key in self.cache}

    def shared_candidate(self, content_key: str) -> "ShareCandidate | None":
        """The live candidate copy for ``content_key``, or None."""
        with self.share_lock:
            c = self.share_candidates.get(content_key)
            if c is not None and c.key not in self.cache:
                del self.share_candidates[content_key]
                c = None
            return c

    def forget_shared(self, content_key: str, candidate: "ShareCandidate") -> None:
        """Drop a candidate whose store no longer holds what its digest claims."""
        with self.share_lock:
            if self.share_candidates.get(content_key) is candidate:
                del self.share_candidates[content_key]

    def take_stagers(self, n: int, chunk_bytes: int) -> list:
        """Borrow ``n`` copy engines (created on first use and kept for later loads)."""
        with self.stager_lock:
            fit = [s for s in self.stagers if s.chunk_bytes >= chunk_bytes]
            for s in fit[:n]:
                self.stagers.remove(s)
            got = fit[:n]
        while len(got) < n:
            got.append(_cache.Stager(self.pinned, self.context, chunk_bytes))
        return got

    def give_stagers(self, stagers: list) -> None:
        with self.stager_lock:
            self.stagers.extend(stagers)

    def free_staging(self) -> None:
        """Drop the pooled pinned staging buffers (they are re-created on the next load)."""
        with self.stager_lock:
            self.stagers.clear()


def get(device: str) -> DeviceRuntime:
    """The runtime of a normalized device string, created on first use."""
    with _lock:
        rt = _devices.get(device)
        if rt is not None:
            return rt
    if device == "cpu":
        rt = DeviceRuntime("cpu", _cache.HostAllocator("cpu"), _cache.WeightCache(),
                           pinned=_cache.HostAllocator("host"))
    else:
        import torch

        _init_cuda()
        drv = _driver()
        idx = int(device[5:])
        torch.cuda.init()
        dev = _ok(drv.cuDeviceGet(idx), "cuDeviceGet")
        ctx = int(_ok(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain"))
        rt = DeviceRuntime(device, _cache.CudaAllocator(device, idx, ctx), _cache.WeightCache(),
                           context=ctx, pinned=_cache.PinnedAllocator(f"pinned:{idx}", ctx))
    with _lock:
        return _devices.setdefault(device, rt)


def all_runtimes() -> dict[str, DeviceRuntime]:
    with _lock:
        return dict(_devices)


def device_memory_info(device: str) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device, device-wide (cuMemGetInfo in its primary context)."""
    rt = get(device)
    drv = _driver()
    _ok(drv.cuCtxPushCurrent(drv.CUcontext(rt.context)), "cuCtxPushCurrent")
    try:
        free, total = _ok(drv.cuMemGetInfo(), "cuMemGetInfo")
    finally:
        drv.cuCtxPopCurrent()
    return int(free), int(total)
