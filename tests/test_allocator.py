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


# -- the device runtime's parts -------------------------------------------------------------

def test_device_runtime_parts_hold_their_jobs(device):
    """The runtime composes one part per job; what other modules read through the runtime is
    the part's own state (counters, copy engines, peak, context), not a copy of it."""
    from aoti_rt.device import CopyEngines, DeviceDriver, MemoryCounters, ShareCandidate, ShareCandidates

    rt = aoti_rt.device.get(device)
    assert isinstance(rt.driver, DeviceDriver) and isinstance(rt.engines, CopyEngines)
    assert isinstance(rt.counters, MemoryCounters) and isinstance(rt.sharing, ShareCandidates)
    assert rt.context == rt.driver.context == rt.engines.context and (rt.context != 0) == rt.is_cuda
    assert rt.pinned is rt.engines.pinned and rt.sharing.cache is rt.cache
    methods, nbytes = rt.legacy_methods, rt.legacy_bytes
    rt.count_legacy(2, 1000)
    try:
        assert (rt.legacy_methods, rt.legacy_bytes) == (methods + 2, nbytes + 1000)
        assert (rt.counters.legacy_methods, rt.counters.legacy_bytes) == (methods + 2, nbytes + 1000)
    finally:
        rt.count_legacy(-2, -1000)
    assert (rt.legacy_methods, rt.legacy_bytes) == (methods, nbytes)
    used = rt.sample()
    assert (used is None) == (not rt.is_cuda)
    assert rt.peak_used == rt.counters.peak_used and (rt.peak_used is None or rt.peak_used >= used)
    rt.reset_peak()
    assert rt.peak_used is None
    # a candidate lives while its cache entry does
    cand = ShareCandidate("no-such-key", "store", None, 0, 8)
    rt.offer_shared("content", cand)
    assert rt.shared_candidate("content") is None and "content" not in rt.sharing.candidates
    if rt.is_cuda:
        got = rt.take_copy_engines(1)
        assert len(got) == 1 and got[0].device == str(rt.device) and got[0] not in rt.engines.stagers
        rt.give_stagers(got)
        assert got[0] in rt.engines.stagers
        rt.free_staging()
        assert rt.engines.stagers == []


@pytest.mark.cuda
@pytest.mark.skipif(not (aoti_rt.cuda_available() and torch.cuda.is_available()), reason="no CUDA GPU")
def test_current_context_makes_the_device_current_and_restores_the_previous():
    from cuda.bindings import driver as drv

    from aoti_rt.device import current_context

    rt = aoti_rt.device.get("cuda:0")
    torch.cuda.init()
    before = drv.cuCtxGetCurrent()[1]
    with current_context(rt.context):
        assert int(drv.cuCtxGetCurrent()[1]) == rt.context
        free, total = (int(x) for x in drv.cuMemGetInfo()[1:])
        assert 0 < free <= total
    assert int(drv.cuCtxGetCurrent()[1]) == int(before)
    # a failing block still pops the context it pushed
    with pytest.raises(RuntimeError, match="inside"):
        with current_context(rt.context):
            raise RuntimeError("inside")
    assert int(drv.cuCtxGetCurrent()[1]) == int(before)
