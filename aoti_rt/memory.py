"""What aoti_rt holds in memory: cache statistics and the memory report."""

from __future__ import annotations

from . import device as _device
from . import runtime as _runtime


def _default_device(device: str | None) -> str:
    if device is not None:
        return _device.normalize(device)
    cuda = sorted(d for d in _device.all_runtimes() if d != "cpu")
    return cuda[0] if cuda else "cpu"


def cache_stats(device: str | None = None) -> dict:
    """Counters of the weight cache of one device (default: the first GPU in use, else CPU).

    Keys: ``entries`` (cached weight buffers), ``bytes_allocated`` and
    ``peak_bytes_allocated`` (exact bytes of aoti_rt's live allocations, and their
    high-water mark), ``num_allocations``, ``hits`` and ``misses`` (weight acquisitions found
    in / added to the cache), ``bytes_read`` (weight bytes read from disk),
    ``legacy_methods`` and ``legacy_bytes`` (methods whose .so lacks the Pairs entry point
    and hold a private, unshared copy inside AOTI).
    """
    dev = _default_device(device)
    rt = _device.get(dev)
    stats = rt.cache.stats()
    a = rt.allocator
    legacy_methods, legacy_bytes = _runtime._legacy.get(dev, (0, 0))
    stats.update(device=dev, bytes_allocated=a.bytes_allocated,
                 peak_bytes_allocated=a.peak_bytes_allocated, num_allocations=a.num_allocations,
                 legacy_methods=legacy_methods, legacy_bytes=legacy_bytes)
    return stats


def reset_peak(device: str | None = None) -> None:
    """Start a new high-water mark for ``peak_bytes_allocated``."""
    _device.get(_default_device(device)).allocator.reset_peak()


def set_memory_limit(nbytes: int, device: str | None = None) -> None:
    """Cap the bytes aoti_rt may allocate for weights on a device (0: no cap).

    An allocation past the cap raises :class:`aoti_rt.AllocationError` and leaves nothing
    allocated, as a full device would.
    """
    _device.get(_default_device(device)).allocator.limit = int(nbytes)
