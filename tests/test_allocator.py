"""The allocators (exact accounting, small buffers carved from slabs, slabs freed with their
last buffer) and the weight cache's fill protocol between threads."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import aoti_rt
from aoti_rt import _cache

SMALL, SLAB, ALIGN = _cache.SMALL_MAX, _cache.SLAB_BYTES, _cache.SLAB_ALIGN


def fresh_allocator(device: str) -> _cache.Allocator:
    """An allocator of its own (not the device runtime's), so counts start at zero."""
    if device == "cpu":
        return _cache.HostAllocator("cpu")
    rt = aoti_rt.device.get(device)
    return _cache.CudaAllocator(device, rt.index, rt.context)


def test_small_buffers_share_slabs(device):
    a = fresh_allocator(device)
    bufs = [a.allocate(1000) for _ in range(100)]          # 100 x 1024 B after alignment
    assert a.num_slabs == 1 and a.bytes_reserved == SLAB
    assert a.bytes_allocated == 100 * 1000 and a.num_allocations == 100
    ptrs = sorted(b.ptr for b in bufs)
    assert all(p % ALIGN == 0 for p in ptrs)
    assert all(q - p >= 1000 for p, q in zip(ptrs, ptrs[1:]))   # no overlap
    big = a.allocate(SMALL + 1)                             # past small_max: its own allocation
    assert a.bytes_reserved == SLAB + SMALL + 1 and a.num_slabs == 1
    del bufs[:99]
    assert a.bytes_reserved == SLAB + SMALL + 1             # one buffer still holds the slab
    del bufs, big
    gc.collect()
    assert (a.bytes_allocated, a.bytes_reserved, a.num_slabs, a.num_allocations) == (0, 0, 0, 0)
    assert a.peak_bytes_reserved == SLAB + SMALL + 1 and a.peak_bytes_allocated == 100 * 1000 + SMALL + 1


def test_slab_bytes_are_usable_and_distinct(device):
    """Write a pattern through each carved buffer and read it back: no two buffers alias."""
    a = fresh_allocator(device)
    bufs = [a.allocate(n) for n in (1, 255, 256, 257, 4096, SMALL)]
    views = [torch.as_tensor(b, device=device) if device != "cpu" else torch.frombuffer(b, dtype=torch.uint8)
             for b in bufs]
    for i in range(len(views)):
        views[i].fill_(i + 1)
    for i in range(len(views)):
        assert bool((views[i] == i + 1).all()), f"buffer {i} was overwritten"
    del views, bufs
    gc.collect()
    assert a.bytes_reserved == 0


def test_small_max_zero_disables_slabs(device):
    a = fresh_allocator(device)
    a.small_max = 0
    b = a.allocate(100)
    assert a.num_slabs == 0 and a.bytes_reserved == 100
    del b
    assert a.bytes_reserved == 0


def test_limit_counts_live_bytes(device):
    a = fresh_allocator(device)
    a.limit = 3000
    keep = [a.allocate(1000), a.allocate(1000)]
    with pytest.raises(aoti_rt.AllocationError, match="set_memory_limit"):
        a.allocate(1001)
    assert a.bytes_allocated == 2000
    del keep
    assert a.bytes_reserved == 0


def test_a_failed_fill_reaches_the_waiting_thread_and_frees_everything():
    """Thread A allocates a weight and fails to fill it; thread B, waiting on the same key,
    gets A's reason, and once both let go nothing is held."""
    a = fresh_allocator("cpu")
    cache = _cache.WeightCache()
    first = cache.acquire(["k"], [1000], a)
    assert first.to_fill == [0]
    seen: list[BaseException] = []

    def waiter() -> None:
        second = cache.acquire(["k"], [1000], a)
        try:
            assert second.pending == [0]
            cache.wait(second, timeout=30)
        except RuntimeError as e:
            seen.append(e)
        finally:
            cache.release(second)

    t = threading.Thread(target=waiter)
    t.start()
    while cache.refcount("k") < 2:
        threading.Event().wait(0.001)
    cache.publish(first, OSError("disk on fire"))
    cache.release(first)
    t.join(30)
    assert len(seen) == 1 and "OSError: disk on fire" in str(seen[0])
    assert "k" not in cache and a.bytes_allocated == 0 and a.bytes_reserved == 0
