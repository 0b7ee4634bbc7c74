"""Property test of the allocator's accounting under arbitrary alloc/free sequences (CPU)."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis", reason="pip install -e '.[test]' installs hypothesis")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from aoti_rt import _memory  # noqa: E402

SMALL, SLAB = _memory.SMALL_MAX, _memory.SLAB_BYTES


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 3 * SMALL).map(lambda n: ("alloc", n)),
                          st.integers(0, 1000).map(lambda i: ("free", i))), max_size=80))
def test_accounting_under_any_alloc_free_sequence(ops):
    """Property (CPU): the counters equal what the live buffers imply, and all returns to 0."""
    a = _memory.HostAllocator("cpu")
    live: list[_memory.Buffer] = []
    for op, x in ops:
        if op == "alloc":
            live.append(a.allocate(x))
        elif live:
            live.pop(x % len(live))
        assert a.bytes_allocated == sum(b.nbytes for b in live)
        assert a.num_allocations == len(live)
        large = sum(b.nbytes for b in live if b.nbytes > SMALL)
        assert a.bytes_reserved == large + a.num_slabs * SLAB
        assert a.num_slabs <= len([b for b in live if b.nbytes <= SMALL])
        spans = sorted((b.ptr, b.ptr + b.nbytes) for b in live)
        assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:])), "two live buffers overlap"
    live.clear()
    assert (a.bytes_allocated, a.bytes_reserved, a.num_slabs) == (0, 0, 0)
