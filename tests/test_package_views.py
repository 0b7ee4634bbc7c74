"""Stock packages whose constants are views with an offset into a larger tensor.

``t[0]`` and ``t[0][5:]`` of one ``(2, 15, 10)`` tensor, as parameters and as plain tensor
attributes (lifted constants): AOTI stores the whole ``(2, 15, 10)`` storage once per constant
and binds each view at its offset into it (``t[0][5:]`` starts 200 bytes in, off a 16-byte
boundary). aoti_rt binds the stored buffer and the offset the same way, one copy for all the
views of one storage, and still refuses a view that would read past the bytes it holds.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import aoti_rt
from aoti_rt import package
from aoti_rt.bundle import ITEMSIZE
from aoti_rt.errors import BundleError
from aoti_rt.runtime import bind_plan

from conftest import FORMATS, _package

#: weight formats tested here: in the .so and pickled (a blob and ``force_mmap_weights`` are in
#: the differential test's matrix)
VIEW_FORMATS = ("embedded", "pickle")

pytestmark = pytest.mark.usefixtures("pt2_cache_here")

#: the bytes of the whole (2, 15, 10) float32 storage every view lies in
STORAGE = 2 * 15 * 10 * 4


class ViewsOfOne(torch.nn.Module):
    """Parameters ``a = t[0]``, ``b = t[0][5:]``, ``whole = t`` and tensor constants
    ``c = u[1]``, ``d = u[1][5:]``: two storages, views with offsets 0, 50, 0, 150 and 200
    elements."""

    def __init__(self, device: str):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        t = torch.randn(2, 15, 10, generator=g).to(device)
        u = torch.randn(2, 15, 10, generator=g).to(device)
        self.a = torch.nn.Parameter(t[0], requires_grad=False)
        self.b = torch.nn.Parameter(t[0][5:], requires_grad=False)
        self.whole = torch.nn.Parameter(t, requires_grad=False)
        self.c = u[1]
        self.d = u[1][5:]

    def forward(self, x):
        # matrix products only: no generated kernel reads a constant, whatever its alignment
        return x @ self.a.t(), x @ self.b.t(), x @ self.c.t(), x @ self.d.t(), x @ self.whole[1].t()


def views_example(device: str) -> tuple[torch.nn.Module, tuple]:
    g = torch.Generator().manual_seed(1)
    return ViewsOfOne(device).eval(), (torch.randn(3, 10, generator=g).to(device),)


def views_package(workdir: Path, device: str, fmt: str) -> Path:
    """The views model packaged by torch in ``fmt`` (compiled once per session and format)."""
    module, args = views_example(device)
    path = workdir / f"views-{fmt}-{device.replace(':', '')}.pt2"
    if not path.is_file():
        with torch.no_grad():
            program = torch.export.export(module, args)
            _package(path, program, FORMATS[fmt])
    return path


def stock_run(path: Path, device: str, *args, **kwargs):
    """torch's own loader of a package's one model, and what its first call computes.

    ``load_pt2(..., load_weights_from_disk=True)`` is what ``aoti_load_package`` runs, and
    also loads pickled weights (without them ``aoti_load_package`` runs a ``pickle_weights``
    .so with no constants and crashes). ``import aoti_rt`` switches on the .so's input checks
    process-wide; a .so reads that switch once, at its first call, so the first call runs
    without it: the input checks are as torch leaves them."""
    from torch.export.pt2_archive._package import load_pt2

    index = torch.device(device).index
    saved = os.environ.pop("AOTI_RUNTIME_CHECK_INPUTS", None)
    try:
        loaded = load_pt2(str(path), device_index=-1 if index is None else index, load_weights_from_disk=True)
        (runner,) = loaded.aoti_runners.values()
        return runner, runner(*args, **kwargs)
    finally:
        if saved is not None:
            os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = saved


@pytest.fixture(scope="module", params=[pytest.param(f, id=f) for f in VIEW_FORMATS])
def views_pt2(request, workdir, device) -> tuple[Path, str]:
    return views_package(workdir, device, request.param), request.param


def test_views_compute_what_torch_computes_from_one_copy_of_each_storage(views_pt2, device):
    path, fmt = views_pt2
    _, args = views_example(device)
    _, want = stock_run(path, device, *args)
    records, _ = package.inspect_package(path, device)
    (rec,) = records
    consts = {c.fqn: c for c in rec.method.constants}
    assert {f: consts[f].storage_offset for f in ("a", "b")} == {"a": 0, "b": 50}
    # the views of one storage (and the tensor itself) name one weight: the whole storage
    ab = {consts[f].weight for f in ("a", "b", "whole")}
    cd = {consts[f].weight for f in consts if f not in ("a", "b", "whole")}
    assert len(ab) == 1 and len(cd) == 1 and ab != cd
    for wid in ab | cd:
        assert rec.weights[wid].nbytes >= STORAGE
    before = aoti_rt.cache_stats(device)
    with aoti_rt.load(path, device=device) as m:
        got = m.model(*args)
        assert len(got) == len(want) == 5
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)
        s = aoti_rt.cache_stats(device)
        # one buffer per storage, as large as its farthest-starting view may reach
        held = sum(max(rec.weights[wid].nbytes, *(c.storage_offset * ITEMSIZE[c.dtype] + c.data_size
                                                   for c in consts.values() if c.weight == wid))
                   for wid in ab | cd)
        assert s["bytes_allocated"] - before["bytes_allocated"] == held < 2 * 2 * (STORAGE + 64)
        assert s["num_allocations"] - before["num_allocations"] == 2
        assert s["legacy_bytes"] == before["legacy_bytes"]
        torch.testing.assert_close(m.weight("b"), views_example(device)[0].b, rtol=0, atol=0)
    assert aoti_rt.cache_stats(device)["bytes_allocated"] == before["bytes_allocated"]


def _raw_record(path: Path, device: str) -> dict:
    (rec,), _ = package.inspect_package(path, device)
    return {"name": rec.name, "device": rec.device, "dir": rec.dir, "files": rec.files, "so": rec.so,
            "store": rec.store, "embedded": rec.embedded, "method": asdict(rec.method),
            "weights": {k: asdict(w) for k, w in rec.weights.items()}}


def _constant(raw: dict, fqn: str) -> dict:
    return next(c for c in raw["method"]["constants"] if c["fqn"] == fqn)


def test_a_view_reaching_past_its_stored_bytes_is_still_refused(workdir, device):
    """Binding the whole stored buffer at the view's offset does not loosen the record's view
    checks: a view past its weight's bytes, past what the .so keeps for it, or a weight cut
    to the view's own bytes while the .so keeps the whole storage, is refused."""
    raw = _raw_record(views_package(workdir, device, "embedded"), device)
    package._parse_record(copy.deepcopy(raw), "views")         # as probed: accepted

    past = copy.deepcopy(raw)
    _constant(past, "b")["storage_offset"] = 250                # 10 x 10 from element 250 of 300
    with pytest.raises(BundleError, match="reaches"):
        package._parse_record(past, "views")

    cut = copy.deepcopy(raw)
    b = _constant(cut, "b")
    cut["weights"][b["weight"]]["nbytes"] = 600                 # the view's own bytes
    with pytest.raises(BundleError, match="more than its weight"):
        package._parse_record(cut, "views")


def test_only_the_sos_own_views_may_start_off_a_16_byte_boundary(workdir, device):
    """A manifest's view starting off a 16-byte boundary is refused (a kernel specialised on
    aligned constants faults); the one a package's .so was compiled with is bound as AOTI
    binds it."""
    (rec,), _ = package.inspect_package(views_package(workdir, device, "embedded"), device)
    b = next(c for c in rec.method.constants if c.fqn == "b")
    assert b.storage_offset * ITEMSIZE[b.dtype] % 16 == 8
    with pytest.raises(ValueError, match="not a multiple of 16"):
        bind_plan(rec.method.constants, "views")
    assert bind_plan(rec.method.constants, "views", compiled=True).n == len(rec.method.constants)


class OverlappingViews(torch.nn.Module):
    """Parameters ``a = t[0:10]`` and ``b = t[5:15]`` of one ``(15, 10)`` tensor: two views of
    one shape whose rows 5..9 are the same memory."""

    def __init__(self, device: str):
        super().__init__()
        t = torch.randn(15, 10, generator=torch.Generator().manual_seed(0)).to(device)
        self.a = torch.nn.Parameter(t[0:10], requires_grad=False)
        self.b = torch.nn.Parameter(t[5:15], requires_grad=False)

    def forward(self, x):
        return x @ self.a.t(), x @ self.b.t()


def test_overlapping_views_updated_to_one_value_each_hold_it(workdir, device):
    """Overlapping views of one stored buffer given the same tensor (or equal ones) cannot hold
    it in that one buffer: each gets a buffer of its own, and computes with the value given
    (written in place, the second view's write changed half of the first)."""
    path = workdir / f"overlap-{device.replace(':', '')}.pt2"
    x = torch.randn(3, 10, device=device)
    if not path.is_file():
        with torch.no_grad():
            _package(path, torch.export.export(OverlappingViews(device).eval(), (x,)), FORMATS["embedded"])
    with aoti_rt.load(path, device=device) as m:
        (a, b) = sorted((c for c in m.model.bindings() if c.fqn in ("a", "b")), key=lambda c: c.fqn)
        assert a.buffer is b.buffer and (a.constant.storage_offset, b.constant.storage_offset) == (0, 50)
        for same in (True, False):
            v = torch.randn(10, 10, device=device)
            m.update_weights({"a": v, "b": v if same else v.clone()})
            assert torch.equal(m.weight("a"), v) and torch.equal(m.weight("b"), v)
            got = m.model(x)
            for out in got:
                torch.testing.assert_close(out, x @ v.t(), rtol=0, atol=0)
