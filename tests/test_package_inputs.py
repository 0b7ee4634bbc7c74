"""The inputs of stock ``.pt2`` packages and bundles: dynamic sizes exported with
``Dim(min=1)`` and non-tensor inputs fixed by export, compared with torch's own loader.

One small model (a weight, a dynamic batch from 1, a ``bool`` argument) is compiled once per
device by AOTI and packaged twice from the same files: as ``aoti_compile_and_package`` writes
it (no exported program) and with its exported program (``package_pt2(exported_programs=)``);
and twice by ``aoti_rt.compile``: as it compiles now and with the ``.so``'s lower bounds of
older releases.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

import aoti_rt
from aoti_rt.abi import CHECK_INPUTS
from aoti_rt.input_checks import so_lower_bounds, wrapper_inputs
from aoti_rt.method_compiler import quiet_torch_deprecations
from conftest import _once

pytestmark = pytest.mark.usefixtures("pt2_cache_here")

MAX_BATCH = 32


class Gate(nn.Module):
    """A weight, a batch exported from 1, and a bool export fixes to True."""

    def __init__(self, device: str):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w = nn.Parameter(torch.randn(16, 8, generator=g).to(device))

    def forward(self, x, flag: bool):
        return torch.relu(x @ self.w.t()) + 1 if flag else x - 1


def _program(device: str):
    x = torch.randn(4, 8, device=device)
    with quiet_torch_deprecations(), torch.no_grad():
        return torch.export.export(Gate(device).eval(), (x, True),
                                   dynamic_shapes={"x": {0: Dim("batch", min=1, max=MAX_BATCH)}, "flag": None})


@pytest.fixture(scope="session")
def gate_pt2(workdir, device) -> dict[str, Path]:
    """``plain``: as aoti_compile_and_package writes it; ``exported``: the same AOTI files with
    the exported program beside them."""
    from torch.export.pt2_archive._package import package_pt2

    tag = device.replace(":", "")
    out = {"plain": workdir / f"gate-plain-{tag}.pt2", "exported": workdir / f"gate-exported-{tag}.pt2"}

    def build():
        ep = _program(device)
        with quiet_torch_deprecations():
            files = torch._inductor.aot_compile(ep.module(), *ep.example_inputs,
                                                options={"aot_inductor.package": True})
            package_pt2(str(out["plain"]), aoti_files={"model": files})
            package_pt2(str(out["exported"]), exported_programs={"model": ep}, aoti_files={"model": files})
        (workdir / f"gate-{tag}.done").touch()     # both files written
    _once(workdir / f"gate-{tag}", workdir / f"gate-{tag}.done", build)
    return out


@pytest.fixture(scope="session")
def gate_bundles(workdir, device) -> dict[str, Path]:
    """``new``: compiled by this aoti_rt; ``old``: with the .so's lower bounds on dynamic
    sizes, as aoti_rt compiled bundles before."""
    tag = device.replace(":", "")
    out = {}
    for kind, opts in (("new", None), ("old", {"aot_inductor.check_lowerbound": True})):
        path = workdir / f"gate-{kind}-{tag}"
        _once(path, path / "manifest.json",
              lambda: aoti_rt.compile({"gate": _program(device)}, path, progress=False, inductor_configs=opts))
        out[kind] = path
    return out


def _torch_loader(path: Path):
    return torch._inductor.aoti_load_package(str(path))


def _libc_env() -> bytes | None:
    getenv = ctypes.CDLL(None).getenv
    getenv.restype, getenv.argtypes = ctypes.c_char_p, [ctypes.c_char_p]
    return getenv(CHECK_INPUTS.encode())


def _batches(device: str):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(b, 8, generator=g).to(device) for b in (1, 2, 5, MAX_BATCH)]


# -- Dim(min=1) --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["plain", "exported"])
def test_stock_package_runs_the_exported_range_from_1_as_torch_does(gate_pt2, device, kind):
    """Size 1 is in the exported range: aoti_rt runs it (the .so's own check, whose bound
    inductor raised to 2, is off) and computes bitwise what torch's loader computes, which
    importing aoti_rt leaves as it was (the variable it reads is not set)."""
    assert _libc_env() is None and CHECK_INPUTS not in os.environ
    with aoti_rt.load(gate_pt2[kind], device=device) as m:
        got = [m.model(x, True) for x in _batches(device)]
    ref = _torch_loader(gate_pt2[kind])
    for x, g in zip(_batches(device), got):
        assert torch.equal(g, ref(x, True)), x.shape
    assert _libc_env() is None and CHECK_INPUTS not in os.environ


def test_stock_package_inputs_are_checked_before_aoti_runs(gate_pt2, device):
    """With the .so's own checks off, aoti_rt checks what they checked (read from the
    package's wrapper source): dtype, static sizes, the range, device; a layout the kernels
    do not take is copied to the one they do, a size-1 dimension's stride is any."""
    ref = _torch_loader(gate_pt2["plain"])
    with aoti_rt.load(gate_pt2["plain"], device=device) as m:
        for bad, match in ((torch.randn(0, 8), "size 0 in dimension 0"),
                           (torch.randn(MAX_BATCH + 1, 8), f"size {MAX_BATCH + 1} in dimension 0"),
                           (torch.randn(2, 9), r"shape \['\*', 8\]"),
                           (torch.randn(2, 8, 1), "shape"),
                           (torch.randn(2, 8, dtype=torch.float64), "must be float32")):
            with pytest.raises(aoti_rt.InputError, match=match):
                m.model(bad.to(device), True)
        wide = torch.randn(8, 3, device=device).t()                 # (3, 8), not contiguous
        assert torch.equal(m.model(wide, True), ref(wide.contiguous(), True))
        column = torch.randn(8, 1, device=device).t()               # (1, 8) with strides (1, 1)
        assert column.stride() == (1, 1)
        assert torch.equal(m.model(column, True), ref(column.contiguous(), True))


def test_stock_record_states_the_so_checks(gate_pt2, device):
    """What the record read from the wrapper source: the dtype, the static size, the strides
    and a range from 1 where the .so's bound is inductor's 2; with the exported program,
    the exported names and range."""
    plain, _ = aoti_rt.package.inspect_package(gate_pt2["plain"], device)
    exported, _ = aoti_rt.package.inspect_package(gate_pt2["exported"], device)
    (p,), (e,) = plain[0].method.inputs, exported[0].method.inputs
    assert (p.dtype, p.shape, p.stride) == ("float32", [None, 8], [8, 1])
    assert (p.dims[0].min, p.dims[0].max) == (1, MAX_BATCH)
    assert e.name == "x" and (e.dims[0].min, e.dims[0].max) == (1, MAX_BATCH)
    assert plain[0].method.fixed_inputs == []
    assert [(f.index, f.name, f.value) for f in exported[0].method.fixed_inputs] == [(1, "flag", True)]


def test_wrapper_lower_bounds_read_as_exported():
    """Only inductor's own lower bound of 2 on a plain symbol reads as 1; a bound export set
    (3) stays, and text of another form claims nothing."""
    def source(lower: int) -> str:
        return ("AOTI_NOINLINE static void check_input_0(\n    AtenTensorHandle* input_handles\n) {\n"
                "    ConstantHandle a = ConstantHandle(input_handles[0]);\n"
                "    int32_t a_expected_dtype = aoti_torch_dtype_bfloat16();\n"
                f"    if (a_size[0] < {lower}) {{\n    if (a_size[0] > 9) {{\n"
                "    if (4 != a_size[1]) {\n    if (1 != a_stride[1]) {\n"
                "    int32_t a_expected_device_type = 1;\n}\n"
                "static bool _check_aoti_runtime_check_inputs_env() {\n"
                '    if (_check_aoti_runtime_check_inputs_env()) { assert_size_stride(a, {s3, 4L}, {4L, 1L}, "input"); }\n')
    (two,), (three,) = wrapper_inputs(source(2)), wrapper_inputs(source(3))
    assert (two.dtype, two.device, two.shape, two.stride) == ("bfloat16", "cuda", [None, 4], [None, 1])
    assert (two.dims[0].min, two.dims[0].max, two.dims[0].symbol) == (1, 9, "s3")
    assert three.dims[0].min == 3
    # the Run body's assert absent (torch 2.11 on CUDA): the bound of 2 is still inductor's, the
    # symbol the one Run reads from the size
    no_assert = source(2).split("    if (_check_aoti_runtime_check_inputs_env()) {")[0]
    (bare,), (named,) = wrapper_inputs(no_assert), wrapper_inputs(no_assert + "    int64_t s5 = a_size[0];\n")
    assert (bare.dims[0].min, bare.dims[0].max, bare.dims[0].symbol) == (1, 9, "")
    assert (named.dims[0].min, named.dims[0].symbol) == (1, "s5")
    assert wrapper_inputs(source(3).split("    if (_check_aoti_runtime_check_inputs_env()) {")[0])[0].dims[0].min == 3
    assert wrapper_inputs(source(2), 2) is None
    assert wrapper_inputs(source(2).replace("aoti_torch_dtype_bfloat16", "aoti_torch_dtype_quux")) is None


# -- non-tensor inputs fixed by export -----------------------------------------------------

def test_stock_package_without_program_drops_non_tensors_as_torch_does(gate_pt2, device):
    """A package without its exported program does not record the value export fixed: the
    non-tensor input is dropped, as torch's loader drops it, and the .so computes what it was
    compiled for, whatever was passed; a call without it, or with a tensor in its place, does
    not have the exported structure or the .so's tensors: InputError."""
    ref = _torch_loader(gate_pt2["plain"])
    x = torch.randn(3, 8, device=device)
    with aoti_rt.load(gate_pt2["plain"], device=device) as m:
        for flag in (True, False):
            assert torch.equal(m.model(x, flag), ref(x, flag))
        with pytest.raises(aoti_rt.InputError):
            m.model(x)
        with pytest.raises(aoti_rt.InputError, match="takes 1 tensor inputs, got 2 tensors"):
            m.model(x, x)


def test_stock_package_with_program_checks_the_fixed_value(gate_pt2, device):
    """With the exported program in the package, the fixed value is known: that value runs
    (by position or by name) as torch's loader runs it; another is an InputError."""
    ref = _torch_loader(gate_pt2["exported"])
    x = torch.randn(1, 8, device=device)
    with aoti_rt.load(gate_pt2["exported"], device=device) as m:
        assert torch.equal(m.model(x, True), ref(x, True))
        assert torch.equal(m.model(x=x, flag=True), ref(x, True))
        with pytest.raises(aoti_rt.InputError, match="'flag' was fixed to True"):
            m.model(x, False)


# -- bundles ---------------------------------------------------------------------------

def test_bundle_runs_the_exported_range_from_1(gate_bundles, device):
    """aoti_rt.compile leaves inductor's lower bound out of the .so's checks (the manifest's
    range is checked before each call): size 1 runs, on a (1, 8) of any size-1 stride too,
    and the .so's own checks still guard every call."""
    eager = Gate(device).eval()
    with aoti_rt.load(gate_bundles["new"], device=device) as m:
        assert so_lower_bounds(gate_bundles["new"] / "gate.so") == set()
        for x in _batches(device) + [torch.randn(8, 1, device=device).t()]:
            with torch.no_grad():
                torch.testing.assert_close(m.gate(x, True), eager(x, True))
        with pytest.raises(aoti_rt.InputError, match="size 0 in dimension 0"):
            m.gate(torch.randn(0, 8, device=device), True)
        with pytest.raises(aoti_rt.InputError, match="fixed to True"):
            m.gate(torch.randn(2, 8, device=device), False)
    assert _libc_env() is None and CHECK_INPUTS not in os.environ


def test_old_bundle_refuses_size_1_before_aoti_runs(gate_bundles, device):
    """A bundle whose .so checks inductor's lower bound of 2 (as aoti_rt compiled them
    before) refuses size 1 as an InputError that says to recompile, not as AOTI's error;
    sizes from 2 run."""
    assert so_lower_bounds(gate_bundles["old"] / "gate.so") == {(0, 0)}
    eager = Gate(device).eval()
    with aoti_rt.load(gate_bundles["old"], device=device) as m:
        with pytest.raises(aoti_rt.InputError, match="compile the bundle again"):
            m.gate(torch.randn(1, 8, device=device), True)
        x = torch.randn(2, 8, device=device)
        with torch.no_grad():
            torch.testing.assert_close(m.gate(x, True), eager(x, True))


# -- the variable AOTI reads -------------------------------------------------------------------

@pytest.mark.parametrize("user", [None, "1", "0"])
def test_first_run_sets_the_variable_for_that_run_only(monkeypatch, user):
    """A .so's first Run sees the variable as aoti_rt chose for it (an explicit "0" from the
    user keeps checks off); before and after, the process sees the user's value; a later Run
    of the same .so is not touched."""
    from types import SimpleNamespace

    from aoti_rt.abi import first_run

    if user is None:
        monkeypatch.delenv(CHECK_INPUTS, raising=False)
    else:
        monkeypatch.setenv(CHECK_INPUTS, user)
    before = _libc_env()
    for wanted in (True, False):
        so = SimpleNamespace(checks_wanted=wanted, input_checks=None)
        seen = first_run(so, _libc_env)
        assert seen == (b"1" if wanted and user != "0" else b"0")
        assert so.input_checks is (seen == b"1")
        assert _libc_env() == before
        assert first_run(so, _libc_env) == before       # decided: run as is
    so = SimpleNamespace(checks_wanted=True, input_checks=None)
    with pytest.raises(ZeroDivisionError):
        first_run(so, lambda: 1 / 0)
    assert so.input_checks is None and _libc_env() == before   # not run: the next Run decides
