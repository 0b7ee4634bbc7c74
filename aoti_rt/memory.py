"""What aoti_rt holds in memory: cache statistics and the memory report."""

from __future__ import annotations

from dataclasses import dataclass

from . import device as _device
from .device import Device


def _runtime(device: "str | Device | None") -> _device.DeviceRuntime:
    """The runtime a report is about: ``device``, else the first GPU in use, else the CPU."""
    if device is not None:
        return _device.get(Device.parse(device))
    cuda = sorted((d for d in _device.all_runtimes() if d.is_cuda), key=lambda d: d.index)
    return _device.get(cuda[0] if cuda else Device("cpu"))


def cache_stats(device: "str | Device | None" = None) -> dict:
    """Counters of the weight cache of one device (default: the first GPU in use, else CPU).

    Keys: ``entries`` (cached weight buffers), ``bytes_allocated`` and
    ``peak_bytes_allocated`` (exact bytes of aoti_rt's live weight buffers, and their
    high-water mark), ``bytes_reserved`` and ``peak_bytes_reserved`` (the device memory
    behind them: small weights share 2 MiB slabs), ``num_allocations`` (live buffers),
    ``num_slabs``, ``hits`` and ``misses`` (weight acquisitions found
    in / added to the cache), ``bytes_read`` (weight bytes read from disk),
    ``legacy_methods`` and ``legacy_bytes`` (methods whose .so holds constants of its own
    inside AOTI, unshared, and their bytes: a .so without the Pairs entry point (a private copy
    of its weights); constants it folds at run time (computed at its first call); AOTI's copy
    of the weights embedded in a .so that keeps opaque prepacked weights, or cannot free it),
    ``pinned_store_bytes`` (host memory of
    stores held by :func:`aoti_rt.pin_store`), ``staging_bytes`` (pooled pinned staging
    buffers of the loader; :func:`free_staging` returns them), ``shared_exported_bytes`` and
    ``shared_imported_bytes`` (arenas of weights shared across processes with
    ``load(..., share=)``: exported from this process's memory, or another process's mapped
    here; neither is in ``bytes_allocated``).
    """
    rt = _runtime(device)
    stats = rt.cache.stats()
    a = rt.allocator
    pinned_stores = rt.pinned_store_bytes()
    stats.update(device=str(rt.device), pinned_store_bytes=pinned_stores,
                 staging_bytes=rt.pinned.bytes_allocated - pinned_stores if rt.pinned else 0,
                 bytes_allocated=a.bytes_allocated,
                 peak_bytes_allocated=a.peak_bytes_allocated, bytes_reserved=a.bytes_reserved,
                 peak_bytes_reserved=a.peak_bytes_reserved, num_allocations=a.num_allocations,
                 num_slabs=a.num_slabs,
                 legacy_methods=rt.legacy_methods, legacy_bytes=rt.legacy_bytes)
    stats["shared_exported_bytes"], stats["shared_imported_bytes"] = rt.shared_bytes()
    return stats


def free_staging(device: "str | Device | None" = None) -> None:
    """Free the loader's pooled pinned staging buffers (re-created by the next load)."""
    _runtime(device).free_staging()


def reset_peak(device: "str | Device | None" = None) -> None:
    """Start new high-water marks: own bytes allocated and reserved, and the sampled device peak."""
    _runtime(device).reset_peak()


def set_memory_limit(nbytes: int, device: "str | Device | None" = None) -> None:
    """Cap the bytes aoti_rt may allocate for weights on a device (0: no cap).

    An allocation past the cap raises :class:`aoti_rt.AllocationError` and leaves nothing
    allocated, as a full device would.
    """
    _runtime(device).allocator.limit = int(nbytes)


# -- device-wide memory -------------------------------------------------------------------

def sample(device: "str | Device") -> int | None:
    """Read device-wide used bytes now (cuMemGetInfo) and fold it into the sampled peak.

    aoti_rt samples after every weight load and bind; :class:`Sampler` samples in the
    background while a block of code runs. Returns None on the CPU.
    """
    return _device.get(device).sample()


class Sampler:
    """Sample device-wide used memory every ``interval`` seconds while the block runs.

    >>> with Sampler("cuda:0"):
    ...     model.prefill(x)
    >>> memory_report("cuda:0").device_peak_used_bytes
    """

    def __init__(self, device: "str | Device", interval: float = 0.001):
        import threading

        self._rt = _device.get(device)
        self.device = str(self._rt.device)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="aoti_rt-sampler")

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._rt.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        if self._rt.is_cuda:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._rt.sample()


@dataclass(frozen=True)
class MemoryReport:
    """aoti_rt's own memory (exact) and the device's (sampled, device-wide).

    ``bytes_allocated`` / ``peak_bytes_allocated`` count aoti_rt's live weight buffers and
    their high-water mark, byte-exact; ``bytes_reserved`` / ``peak_bytes_reserved`` the
    device memory aoti_rt holds for them (small weights share slabs, so this can exceed the
    live bytes by the unused part of the slabs). ``device_used_bytes`` and
    ``device_peak_used_bytes`` are device-wide (cuMemGetInfo: they include the CUDA context,
    PyTorch's caching allocator, AOTI's scratch memory and other processes); the peak is the
    largest sample taken during loads, binds and :class:`Sampler` blocks.
    """

    device: str
    bytes_allocated: int
    peak_bytes_allocated: int
    bytes_reserved: int
    peak_bytes_reserved: int
    cached_weights: int
    device_used_bytes: int | None
    device_peak_used_bytes: int | None
    device_total_bytes: int | None

    def line(self) -> str:
        """One line for logs and scripts; :meth:`parse` reads it back.

        Format: ``aoti_rt.memory`` then space-separated ``key=value`` fields, in this order:
        ``device`` (e.g. ``cuda:0``), ``allocated``, ``peak_allocated``, ``reserved``,
        ``peak_reserved`` (aoti_rt's own, exact), ``weights`` (cached weight count),
        ``device_used``, ``device_peak_used``, ``device_total`` (device-wide, sampled).
        Every value but ``device`` is an integer byte count (``weights`` a count), ``-`` when
        unknown (device-wide fields on the CPU). New fields may be appended; parse by key.
        """
        def v(x):
            return "-" if x is None else str(x)
        return (f"aoti_rt.memory device={self.device} allocated={self.bytes_allocated} "
                f"peak_allocated={self.peak_bytes_allocated} reserved={self.bytes_reserved} "
                f"peak_reserved={self.peak_bytes_reserved} weights={self.cached_weights} "
                f"device_used={v(self.device_used_bytes)} device_peak_used={v(self.device_peak_used_bytes)} "
                f"device_total={v(self.device_total_bytes)}")

    @staticmethod
    def parse(line: str) -> dict[str, int | str | None]:
        """Parse :meth:`line` output back into a dict."""
        head, *fields = line.split()
        if head != "aoti_rt.memory":
            raise ValueError("not an aoti_rt.memory line")
        out: dict[str, int | str | None] = {}
        for f in fields:
            k, _, val = f.partition("=")
            out[k] = None if val == "-" else (val if k == "device" else int(val))
        return out


def memory_report(device: "str | Device | None" = None) -> MemoryReport:
    """The memory report of one device (default as in :func:`cache_stats`)."""
    rt = _runtime(device)
    used = total = peak = None
    if rt.is_cuda:
        free, total = rt.memory_info()
        used = total - free
        peak = max(rt.peak_used or 0, used)
    a = rt.allocator
    return MemoryReport(str(rt.device), a.bytes_allocated, a.peak_bytes_allocated, a.bytes_reserved,
                        a.peak_bytes_reserved, len(rt.cache), used, peak, total)
