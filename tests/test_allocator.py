"""The allocators (exact accounting, small buffers carved from slabs, slabs freed with their
last buffer) and the weight cache's fill protocol between threads."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

import aoti_rt
from aoti_rt import _cache, _memory

SMALL, SLAB, ALIGN = _memory.SMALL_MAX, _memory.SLAB_BYTES, _memory.SLAB_ALIGN


def fresh_allocator(device: str) -> _memory.Allocator:
    """An allocator of its own (not the device runtime's), so counts start at zero."""
    if device == "cpu":
        return _memory.HostAllocator("cpu")
    rt = aoti_rt.device.get(device)
    return _memory.CudaAllocator(device, rt.index, rt.context)


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
        except aoti_rt.AotiRtError as e:
            seen.append(e)
        finally:
            cache.release(second)

    t = threading.Thread(target=waiter)
    t.start()
    deadline = time.monotonic() + 30
    while cache.refcount("k") < 2:
        assert time.monotonic() < deadline, "the waiting thread never acquired the key"
        threading.Event().wait(0.001)
    cache.publish(first, OSError("disk on fire"))
    cache.release(first)
    t.join(30)
    assert len(seen) == 1 and "OSError: disk on fire" in str(seen[0])
    assert "k" not in cache and a.bytes_allocated == 0 and a.bytes_reserved == 0


def test_threads_allocating_and_freeing_small_buffers(device):
    """Slabs are created and retired while other threads carve from them (the raw allocator
    runs without the GIL): live buffers never overlap and everything returns at the end."""
    a = fresh_allocator(device)
    errors: list[str] = []
    live: list[list[_memory.Buffer]] = [[] for _ in range(8)]

    def worker(w: int) -> None:
        mine = live[w]
        try:
            for i in range(3000):
                mine.append(a.allocate(200 + 37 * ((i + w) % 50)))
                if i % 3:
                    mine.pop(0)
                if len(mine) > 40:
                    del mine[:30]      # often the last buffers of a slab: it is retired
        except BaseException as e:     # a thread's exception would otherwise only be printed
            errors.append(f"worker {w}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a worker did not finish in 120 s"
    assert not errors, errors
    spans = sorted((b.ptr, b.ptr + b.nbytes) for mine in live for b in mine)
    if any(e > s for (_, e), (s, _) in zip(spans, spans[1:])):
        errors.append("two live buffers overlap")
    assert a.bytes_allocated == sum(b.nbytes for mine in live for b in mine)
    assert a.bytes_reserved == a.num_slabs * SLAB
    for mine in live:
        mine.clear()
    assert (a.bytes_allocated, a.bytes_reserved, a.num_slabs, a.num_allocations) == (0, 0, 0, 0)
    assert not errors, errors
