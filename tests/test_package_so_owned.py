"""Stock ``.pt2`` packages whose .so keeps constants of its own, through ``aoti_rt.load``.

* run-time constant folding (``aot_inductor.use_runtime_constant_folding``): the .so computes
  its folded constants from the weights at its first run, and again after a re-binding;
* ``freezing=True``: on the CPU, inductor prepacks linear weights into opaque oneDNN tensors
  that have no strided storage; on CUDA, freezing gives plain constants.

Each package is loaded by ``torch._inductor.aoti_load_package`` too and the outputs compared
bitwise. aoti_rt turns AOTI's input checks on process-wide (AOTI_RUNTIME_CHECK_INPUTS), which
torch's loader then also runs: the checks only refuse inputs (they compute nothing), and the
inputs here are the ones the packages were compiled for, so torch's outputs are unaffected.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import aoti_rt
from aoti_rt import package
from aoti_rt.abi import describe
from aoti_rt.method_compiler import quiet_torch_deprecations

from conftest import FORMATS, _once, _package

#: the weight formats folding is checked in (the blob format too in test_package_differential's
#: whole matrix, AOTI_RT_DIFF_ALL=1)
FOLD_FORMATS = ("embedded", "pickle")

pytestmark = pytest.mark.usefixtures("pt2_cache_here")


class Folded(nn.Module):
    """Constant subexpressions of the weights (``w.t() * 2 + 1``, ``b.sum()``) that run-time
    constant folding computes in the .so."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))
        self.b = nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.w.t() * 2 + 1) + self.b.sum()


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(64, 32)
        self.m = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(torch.relu(self.l(x)))


def _export(module: nn.Module, x: torch.Tensor):
    with torch.no_grad(), quiet_torch_deprecations():
        return torch.export.export(module.eval(), (x,))


@pytest.fixture(scope="session")
def fold_pt2(workdir, device) -> dict[str, Path]:
    """The folding model, one package per weight format in FOLD_FORMATS."""
    torch.manual_seed(0)
    ep = _export(Folded().to(device), torch.randn(4, 8, device=device))
    tag = device.replace(":", "")
    opts = {"aot_inductor.use_runtime_constant_folding": True}
    return {fmt: _package(workdir / f"fold-{fmt}-{tag}.pt2", ep, {**FORMATS[fmt], **opts}) for fmt in FOLD_FORMATS}


#: the weight formats freezing is checked in (torch cannot package pickle_weights of opaque
#: tensors: "Cannot access storage of OpaqueTensorImpl")
FREEZE_FORMATS = ("embedded", "blob")


@pytest.fixture(scope="session")
def frozen_pt2(workdir, device) -> dict[str, Path]:
    """The MLP compiled with freezing=True, one package per weight format in FREEZE_FORMATS."""
    torch.manual_seed(0)
    ep = _export(Mlp().to(device), torch.randn(4, 64, device=device))
    tag = device.replace(":", "")
    with torch.no_grad():      # inductor prepacks frozen weights for oneDNN only without autograd
        return {fmt: _package(workdir / f"frozen-{fmt}-{tag}.pt2", ep, {**FORMATS[fmt], "freezing": True})
                for fmt in FREEZE_FORMATS}


def _stock(path: Path, device: str):
    """torch's own loader of the package."""
    index = torch.device(device).index
    return torch._inductor.aoti_load_package(str(path), device_index=-1 if index is None else index)


def _record(path: Path, device: str) -> package.ModelRecord:
    records, _ = package.inspect_package(path, device)
    (rec,) = records
    return rec


@pytest.mark.parametrize("fmt", FOLD_FORMATS)
def test_folded_constants_match_torch(fold_pt2, device, fmt):
    """A package built with run-time constant folding loads, computes bitwise what torch's
    loader computes (the first call folds, the second reuses), holds its weights once in the
    cache and counts the folded constants as the .so's own.

    torch's loader (2.13) crashes calling a pickle_weights package that folds constants: the
    reference there is the same program packaged with its weights in the .so."""
    path = fold_pt2[fmt]
    x = torch.randn(4, 8, device=device)
    want = _stock(fold_pt2["embedded"] if fmt == "pickle" else path, device)(x)
    rec = _record(path, device)
    assert [c.fqn for c in rec.method.constants] == ["w", "b"]      # the folded ones are the .so's
    held = sum(w.nbytes for w in rec.weights.values())
    assert held == (16 * 8 + 16) * 4
    before = aoti_rt.cache_stats(device)
    with aoti_rt.load(path, device=device) as m:
        first, second = m.model(x), m.model(x)
        s = aoti_rt.cache_stats(device)
    assert torch.equal(first, want) and torch.equal(second, want)
    assert s["bytes_allocated"] - before["bytes_allocated"] == held
    # the folded constants (w.t() * 2 + 1 and b.sum()) are the .so's own: their data sizes
    folded = [c for c in describe(rec.folder() / rec.so, device).constants if c.folded]
    assert len(folded) == 2
    assert s["legacy_bytes"] - before["legacy_bytes"] == sum(c.data_size for c in folded)
    assert s["legacy_methods"] - before["legacy_methods"] == 1
    assert aoti_rt.cache_stats(device)["legacy_bytes"] == before["legacy_bytes"]


def test_update_of_a_folded_weight_refolds(fold_pt2, device):
    """update_weights of a weight that feeds a folded constant makes the .so fold again: the
    next call computes what torch's loader computes with the same new weight."""
    path = fold_pt2["embedded"]
    x = torch.randn(4, 8, device=device)
    new = torch.randn(16, 8, device=device)
    ref = _stock(path, device)
    old = ref(x)
    ref.load_constants({"w": new}, check_full_update=False)
    want = ref(x)
    assert not torch.equal(want, old)
    with aoti_rt.load(path, device=device) as m:
        assert torch.equal(m.model(x), old)         # folded from the old weight
        m.update_weights({"w": new})
        assert torch.equal(m.model(x), want)


@pytest.mark.parametrize("fmt", FREEZE_FORMATS)
def test_frozen_package_matches_torch(frozen_pt2, device, fmt):
    """A package compiled with freezing=True loads and computes bitwise what torch's loader
    computes. On the CPU its linear weights are opaque oneDNN tensors the .so keeps (AOTI's
    copy of its weights stays: embedded, or loaded from its blob; counted as the .so's own);
    the plain ones are held in the cache. On CUDA freezing gives plain constants, all held by
    aoti_rt."""
    path = frozen_pt2[fmt]
    x = torch.randn(4, 64, device=device)
    want = _stock(path, device)(x)
    rec = _record(path, device)
    held = sum(w.nbytes for w in rec.weights.values())
    before = aoti_rt.cache_stats(device)
    with aoti_rt.load(path, device=device) as m:
        got = m.model(x), m.model(x)
        s = aoti_rt.cache_stats(device)
    assert torch.equal(got[0], want) and torch.equal(got[1], want)
    assert s["bytes_allocated"] - before["bytes_allocated"] == held
    if device == "cpu":
        assert rec.method.so_owned, "the CPU package's prepacked weights are the .so's own"
        assert [c.fqn for c in rec.method.constants] == ["l.bias"]
        # AOTI's embedded copy: every non-folded constant's data size, the opaque ones included
        assert s["legacy_bytes"] - before["legacy_bytes"] > held
    else:
        assert not rec.method.so_owned
        assert s["legacy_bytes"] == before["legacy_bytes"]
    assert aoti_rt.cache_stats(device)["legacy_bytes"] == before["legacy_bytes"]


def test_frozen_record_that_misplaces_the_blob_is_refused(frozen_pt2, device):
    """A record whose .so blob (where the .so loads its opaque constants from) is shorter than
    what AOTI reads is refused before AOTI reads it, with nothing left allocated."""
    if device != "cpu":
        pytest.skip("freezing gives plain constants on CUDA")
    path = frozen_pt2["blob"]
    assert _record(path, device).method.so_blob      # probed and recorded
    rp = package._record_path(path)
    good = rp.read_text()
    raw = json.loads(good)
    raw["models"][0]["method"]["so_blob"][1] -= 64
    rp.write_text(json.dumps(raw))
    try:
        with pytest.raises(aoti_rt.BundleError, match="weights blob"):
            aoti_rt.load(path, device=device)
    finally:
        rp.write_text(good)


def test_compile_with_freezing_names_the_setting(tmp_path):
    """aoti_rt.compile of a program whose frozen weights inductor prepacks (CPU, no autograd)
    is refused with a CompileError that names freezing, and leaves no bundle behind."""
    torch.manual_seed(0)
    ep = _export(Mlp(), torch.randn(4, 64))
    out = tmp_path / "frozen-bundle"
    with torch.no_grad(), pytest.raises(aoti_rt.CompileError, match="freezing=True"):
        aoti_rt.compile({"m": ep}, out, inductor_configs={"freezing": True}, progress=False)
    assert not out.exists()


def test_compile_with_constant_folding(workdir, device):
    """aoti_rt.compile with run-time constant folding: the bundle binds the weights, the .so
    folds the rest at its first call and again after update_weights."""
    torch.manual_seed(0)
    module = Folded().to(device).eval()
    x = torch.randn(4, 8, device=device)
    out = workdir / f"fold-bundle-{device.replace(':', '')}"

    def build():
        with torch.no_grad():
            aoti_rt.compile({"f": _export(module, x)}, out, progress=False,
                            inductor_configs={"aot_inductor.use_runtime_constant_folding": True})
    try:
        _once(out, out / "manifest.json", build)
    except aoti_rt.CompileError as e:
        # torch 2.11 leaves the folding kernels out of the self-contained .so on CUDA: that
        # must be said in the user's terms, with nothing left behind
        assert device != "cpu", e
        assert "use_runtime_constant_folding" in str(e) and "aoti_compile_and_package" in str(e)
        assert not out.exists()
        return
    new = torch.randn(16, 8, device=device)
    with aoti_rt.load(out, device=device) as m, torch.no_grad():
        assert [c.fqn for c in m.manifest.methods["f"].constants] == ["w", "b"]
        torch.testing.assert_close(m.f(x), module(x))
        m.update_weights({"w": new})
        module.w.copy_(new)
        torch.testing.assert_close(m.f(x), module(x))
