"""Inputs checked at compile and at call, and compile as users expect it.

Real AOTI models throughout: each bundle is compiled once per session (per device where the
test runs on one). A test that must see that no AOTI work happened arms a tripwire on
``torch._inductor.aot_compile`` (it raises if called); nothing stands in for AOTI.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

import aoti_rt
from aoti_rt import compile_workers, compiler
from aoti_rt.bundle import read_bundle

from conftest import _compile
from damage import edit_manifest, garble_ipc_handles
from models import METHOD_LAYERS, Subset, make_stack


class Steps(nn.Module):
    """``x[T, 8]`` and ``y[2T, 8]`` (one Dim), a None and an int that export fixes, keywords
    (exported in another order than the signature's)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, y, mask=None, n: int = 1, *, pos, bias):
        out = self.lin(x) * n + y[: x.shape[0]] + y[x.shape[0]:] + pos - bias
        return out if mask is None else out + mask


T = Dim("T", min=2, max=32)


def _steps(device: str):
    torch.manual_seed(0)
    return Steps().to(device).eval()


def _inputs(t: int, device: str, n: int = 3):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, 8, generator=g).to(device)
    y = torch.randn(2 * t, 8, generator=g).to(device)
    kwargs = {"bias": torch.randn(8, generator=g).to(device), "pos": torch.randn(8, generator=g).to(device)}
    return (x, y, None, n), kwargs


@pytest.fixture(scope="session")
def steps_bundle(workdir, device):
    def programs():
        args, kwargs = _inputs(4, device)
        return {"steps": torch.export.export(_steps(device), args, kwargs,
                                             dynamic_shapes={"x": {0: T}, "y": {0: 2 * T}, "mask": None, "n": None,
                                                             "bias": None, "pos": None})}
    return _compile(workdir, "steps", device, programs)


@pytest.fixture
def steps(steps_bundle):
    with aoti_rt.load(steps_bundle) as model:
        yield model.steps


@pytest.fixture
def no_aoti(monkeypatch):
    """A tripwire: any AOTI compile from here on fails the test."""
    def tripped(*a, **k):
        raise AssertionError("torch._inductor.aot_compile was called")
    monkeypatch.setattr(torch._inductor, "aot_compile", tripped)


# -- dynamic dimensions: recorded, enforced ----------------------------------------------------

def test_dim_ranges_are_recorded(steps_bundle):
    x, y, bias, pos = read_bundle(steps_bundle).manifest.methods["steps"].inputs
    assert (x.shape, y.shape, bias.name, pos.shape) == ([None, 8], [None, 8], "bias", [8])
    rx, ry = x.dims[0], y.dims[0]
    assert (rx.min, rx.max, rx.step) == (2, 32, 1)
    assert (ry.min, ry.max, ry.step) == (4, 64, 2)            # y is 2 * T
    assert rx.symbol and rx.symbol == ry.symbol               # one Dim: they move together
    assert x.dims[1] is None and pos.dims is None


@pytest.mark.parametrize("t", [2, 32])
def test_sizes_inside_the_range_run_and_match_eager(steps, device, t):
    args, kwargs = _inputs(t, device)
    torch.testing.assert_close(steps(*args, **kwargs), _steps(device)(*args, **kwargs))


@pytest.mark.parametrize("t", [1, 33])
def test_sizes_outside_the_range_are_input_errors(steps, device, t):
    args, kwargs = _inputs(t, device)
    with pytest.raises(aoti_rt.InputError, match=rf"input 0 \(x\) has size {t} in dimension 0; it was "
                                                 rf"exported for sizes 2\.\.32"):
        steps(*args, **kwargs)


def test_a_derived_dimension_keeps_its_step(steps, device):
    (x, _, mask, n), kwargs = _inputs(4, device)
    with pytest.raises(aoti_rt.InputError, match=r"input 1 \(y\) has size 9 .* in steps of 2"):
        steps(x, torch.randn(9, 8, device=device), mask, n, **kwargs)


def test_dimensions_of_one_dim_must_agree(steps, device):
    (x, _, mask, n), kwargs = _inputs(4, device)
    y = torch.randn(10, 8, device=device)                     # 2 * 5, but x says T = 4
    with pytest.raises(aoti_rt.InputError, match=r"input 1 \(y\) has size 10 .* input 0 \(x\) has 4 .* "
                                                 r"one torch\.export\.Dim, which makes it 8"):
        steps(x, y, mask, n, **kwargs)


def test_a_bundle_without_ranges_still_loads(steps_bundle, copy_bundle, device):
    """Bundles written before ranges and fixed inputs were recorded (same format version)."""
    old = copy_bundle(steps_bundle)

    def strip(raw):
        for inp in raw["methods"]["steps"]["inputs"]:
            del inp["dims"]
    edit_manifest(old, strip)
    assert raw_version(old) == 2
    with aoti_rt.load(old) as model:
        assert all(i.dims is None for i in model.steps.spec.inputs)
        args, kwargs = _inputs(2, device)
        torch.testing.assert_close(model.steps(*args, **kwargs), _steps(device)(*args, **kwargs))


def raw_version(bundle) -> int:
    return json.loads((bundle / "manifest.json").read_text())["version"]


@pytest.mark.parametrize("field, value, match", [
    ("dims", [{"min": 5, "max": 4}, None], r"dims\[0\] has max 4 below min 5"),
    ("dims", [{"min": -1, "max": 4}, None], r"dims\[0\]\.min must be an integer in \[0"),
    ("dims", [{"min": 2, "max": 4, "step": 0}, None], r"dims\[0\]\.step must be an integer in \[1"),
    ("dims", [{"min": 2, "max": 4.5}, None], r"dims\[0\]\.max must be an integer"),
    ("dims", [None, {"min": 2, "max": 4}], r"dims\[1\] gives a range for static dimension 1"),
    ("dims", [None], r"dims has 1 entries for a shape of rank 2"),
    ("dims", {"min": 2}, r"dims must be a list"),
])
def test_bad_ranges_are_bundle_errors(steps_bundle, copy_bundle, field, value, match):
    bad = copy_bundle(steps_bundle)
    edit_manifest(bad, lambda raw: raw["methods"]["steps"]["inputs"][0].__setitem__(field, value))
    with pytest.raises(aoti_rt.BundleError, match=match):
        read_bundle(bad)


@pytest.mark.parametrize("fixed, match", [
    ([{"index": 2, "name": "mask", "value": None}, {"index": 2, "name": "n", "value": 3}],
     r"fixed_inputs\[1\]\.index is 2: positions of fixed inputs are distinct and below 6"),
    ([{"index": 5, "name": "n", "value": 3}], r"fixed_inputs\[0\]\.index is 5"),
    ([{"index": 2, "name": "n", "value": [3]}], r"fixed_inputs\[0\]\.value must be null, a boolean"),
    ([{"index": 2, "name": "n", "value": 1e999}], r"fixed_inputs\[0\]\.value must be a finite number"),
    ([{"index": 2, "name": "n"}], r"fixed_inputs\[0\]\.value is missing"),
])
def test_bad_fixed_inputs_are_bundle_errors(steps_bundle, copy_bundle, fixed, match):
    bad = copy_bundle(steps_bundle)
    raw = json.loads((bad / "manifest.json").read_text())
    raw["methods"]["steps"]["fixed_inputs"] = fixed
    text = json.dumps(raw).replace("Infinity", "1e999")       # what a hand-edited file may hold
    (bad / "manifest.json").write_text(text)
    with pytest.raises(aoti_rt.BundleError, match=match):
        read_bundle(bad)


# -- non-tensor inputs: fixed at export, checked at call, or refused before AOTI ----------------

def test_non_tensor_inputs_are_fixed_to_their_example(steps_bundle):
    fixed = read_bundle(steps_bundle).manifest.methods["steps"].fixed_inputs
    assert [(f.index, f.name, f.value) for f in fixed] == [(2, "mask", None), (3, "n", 3)]


def test_a_fixed_input_must_be_passed_its_value(steps, device):
    (x, y, mask, _), kwargs = _inputs(4, device)
    with pytest.raises(aoti_rt.InputError, match=r"input 'n' was fixed to 3 .* got 4; pass 3"):
        steps(x, y, mask, 4, **kwargs)
    with pytest.raises(aoti_rt.InputError, match=r"input 'mask' was fixed to None"):
        steps(x, y, torch.zeros(8, device=device), 3, **kwargs)
    with pytest.raises(aoti_rt.InputError, match=r"input 'n' was fixed to 3 .* got True"):
        steps(x, y, mask, True, **kwargs)


def test_unsupported_inputs_are_refused_before_any_aoti_work(tmp_path, no_aoti):
    class Scale(nn.Module):
        def forward(self, x, k):
            return x * k

    x = torch.randn(4)
    bad = {
        "a dynamic int": (Scale(), (x, 3), None, {"x": None, "k": Dim.DYNAMIC}),
        "a non-finite float": (Scale(), (x, float("inf"))),
    }
    for what, prog in bad.items():
        with pytest.raises(aoti_rt.CompileError, match=r"method 'fwd': input 'k' is ") as e:
            aoti_rt.compile({"fwd": prog}, tmp_path / "b", progress=False)
        assert "tensor" in str(e.value), what
        assert not (tmp_path / "b").exists(), what


# -- keyword arguments -------------------------------------------------------------------------

def test_keywords_equal_positional(steps, three_bundle, device):
    (x, y, mask, n), kwargs = _inputs(4, device)
    want = steps(x, y, mask, n, **kwargs)
    assert torch.equal(steps(pos=kwargs["pos"], n=n, mask=mask, bias=kwargs["bias"], y=y, x=x), want)
    assert torch.equal(steps(x, y, n=n, mask=mask, pos=kwargs["pos"], bias=kwargs["bias"]), want)
    with aoti_rt.load(three_bundle) as model:              # exported positionally: x
        z = torch.randn(3, 64, device=device)
        assert torch.equal(model.a(x=z), model.a(z))


@pytest.mark.parametrize("call, match", [
    (lambda f, x, y, p: f(x, y, None, 3, pos=p, bias=p, scale=2),
     r"has no input named 'scale'; its inputs are 'x', 'y', 'mask', 'n', 'bias', 'pos'"),
    (lambda f, x, y, p: f(x, n=3, mask=None, pos=p, bias=p), r"is missing input 'y'"),
    (lambda f, x, y, p: f(x, y, None, 3, bias=p), r"is missing input 'pos'"),
    (lambda f, x, y, p: f(x, y, None, 3, x=x, pos=p, bias=p), r"got input 'x' twice"),
    (lambda f, x, y, p: f(x, y, None, 3, p, p), r"takes 4 positional inputs .* pass 'bias', 'pos' by keyword"),
])
def test_keyword_errors_name_the_inputs(steps, device, call, match):
    (x, y, _, _), kwargs = _inputs(4, device)
    with pytest.raises(aoti_rt.InputError, match=match) as e:
        call(steps, x, y, kwargs["pos"])
    assert "TreeSpec" not in str(e.value)


def test_a_wrong_structure_is_described_in_words(three_bundle, device):
    with aoti_rt.load(three_bundle) as model:
        z = torch.randn(3, 64, device=device)
        with pytest.raises(aoti_rt.InputError, match=r"got 2 as \(input, \[input\]\); call it as \('x'\)"):
            model.a(z, [z])


# -- requires_grad -----------------------------------------------------------------------------

def test_requires_grad_warns_once(steps, device):
    (x, y, mask, n), kwargs = _inputs(4, device)
    xg = x.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            steps(xg, y, mask, n, **kwargs)                # no grad wanted: nothing to say
        assert not [w for w in caught if "requires grad" in str(w.message)]
        for _ in range(3):
            out = steps(xg, y, mask, n, **kwargs)
    assert not out.requires_grad
    ours = [w for w in caught if "requires grad" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "no autograd" in str(ours[0].message) and ours[0].filename == __file__


# -- inductor options --------------------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(compiler.RESERVED_OPTIONS))
def test_reserved_inductor_options_are_refused(tmp_path, no_aoti, key):
    with pytest.raises(aoti_rt.CompileError, match=rf"sets {re.escape(key)}, which aoti_rt controls"):
        aoti_rt.compile({"fwd": (nn.Linear(2, 2), (torch.randn(1, 2),))}, tmp_path / "b",
                        inductor_configs={key: None, "max_autotune": False})
    assert not (tmp_path / "b").exists()


def test_unknown_inductor_options_are_refused(tmp_path, no_aoti):
    with pytest.raises(aoti_rt.CompileError, match=r"options this torch does not know: no_such\.option"):
        aoti_rt.compile({"fwd": (nn.Linear(2, 2), (torch.randn(1, 2),))}, tmp_path / "b",
                        inductor_configs={"no_such.option": 1})


class Affine(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(5)))

    def forward(self, a):
        return a * self.w + 1


@pytest.fixture(scope="module")
def debug_bundle(tmp_path_factory):
    """A bundle compiled with an inductor option (print intermediate values) under umask 027."""
    path = tmp_path_factory.mktemp("opts") / "b"
    old = os.umask(0o027)
    try:
        aoti_rt.compile({"fwd": (Affine(), (torch.randn(64),))}, path, progress=False,
                        inductor_configs={"aot_inductor.debug_intermediate_value_printer": "2"})
    finally:
        os.umask(old)
    return path


def test_inductor_configs_reach_inductor(debug_bundle, three_bundle, device, capfd):
    """The option makes the generated code print its inputs as it runs (C++ stdout)."""
    a = torch.randn(64)
    with aoti_rt.load(debug_bundle) as model:
        torch.testing.assert_close(model.fwd(a), Affine()(a))
    assert "aoti_model_inputs" in capfd.readouterr().out
    with aoti_rt.load(three_bundle) as model:              # compiled without it: silent
        model.a(torch.randn(3, 64, device=device))
    assert "aoti_model_inputs" not in capfd.readouterr().out


def test_bundle_files_follow_the_umask(debug_bundle):
    modes = {p.name: p.stat().st_mode & 0o777 for p in debug_bundle.iterdir()}
    assert modes == {"fwd.so": 0o640, "manifest.json": 0o640, "weights.safetensors": 0o640}
    assert debug_bundle.stat().st_mode & 0o777 == 0o750


# -- a failed compile leaves nothing behind ----------------------------------------------------

class Boom(nn.Module):
    def forward(self, x):
        if x.sum() > 0:                                  # data-dependent: export refuses it
            return x
        return -x


def _bogus_cxx():
    return {"cpp.cxx": (None, "/nonexistent/bin/g++")}


def test_a_failed_compile_removes_what_it_created(tmp_path):
    good = (nn.Linear(4, 4), (torch.randn(2, 4),))
    target = tmp_path / "new" / "deeper" / "b"
    with pytest.raises(aoti_rt.CompileError, match=r"method 'bad': torch\.export\.export failed"):
        aoti_rt.compile({"good": good, "bad": (Boom(), (torch.randn(3),))}, target, progress=False)
    assert list(tmp_path.iterdir()) == []
    # AOTI itself fails (no C++ compiler): the staging directory goes too
    with pytest.raises(aoti_rt.CompileError, match=r"AOTInductor failed to compile it .*InvalidCxxCompiler"):
        aoti_rt.compile({"good": good}, target, progress=False, inductor_configs=_bogus_cxx(), jobs=1)
    assert list(tmp_path.iterdir()) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(aoti_rt.CompileError):
        aoti_rt.compile({"good": good}, empty, progress=False, inductor_configs=_bogus_cxx())
    assert empty.is_dir() and list(empty.iterdir()) == []


def test_a_failure_after_the_so_files_leaves_the_old_bundle(tmp_path, monkeypatch):
    """A bundle being replaced (overwrite=True) survives a compile that fails at its last step."""
    x = torch.randn(2, 4)
    path = aoti_rt.compile({"f": (nn.Linear(4, 4), (x,))}, tmp_path / "b", progress=False)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def fail(out, manifest):
        assert (out / "g.so").is_file() and (out / "weights.safetensors").is_file()
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(compiler, "_write_manifest", fail)
    with pytest.raises(aoti_rt.CompileError, match=r"cannot write the bundle to .*No space left"):
        aoti_rt.compile({"g": (nn.Linear(4, 4), (x,))}, path, overwrite=True, progress=False, jobs=1)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


# -- compiling methods at once -----------------------------------------------------------------

def _three_programs(device: str):
    s = make_stack(device)
    x = torch.randn(3, 64, device=device)
    return {name: torch.export.export(Subset(s, layers), (x,)) for name, layers in METHOD_LAYERS.items()}


def test_parallel_and_serial_compiles_write_the_same_bundle(three_bundle, tmp_path, monkeypatch, capsys):
    """three_bundle is compiled with the default jobs (workers where there are 2+ cores)."""
    device = read_bundle(three_bundle).manifest.device
    progs = _three_programs(device)
    serial = aoti_rt.compile(progs, tmp_path / "serial", jobs=1, progress=True)
    bar = capsys.readouterr().err
    monkeypatch.setattr(compile_workers, "WORKER_START", "zygote")   # as for a CUDA program
    handed = _spy_handoff(monkeypatch)
    zygote = aoti_rt.compile(progs, tmp_path / "zygote", jobs=2, progress=False)
    # a CUDA program's tensors went as IPC handles (aoti_rt.handoff), a CPU one's saved whole
    assert handed == [device != "cpu"] * 3
    for other in (three_bundle, zygote):
        assert (other / "manifest.json").read_bytes() == (serial / "manifest.json").read_bytes()
        assert (other / "weights.safetensors").read_bytes() == (serial / "weights.safetensors").read_bytes()
    # the bar moved while the first method compiled: its seconds counted up before a step ended
    first = bar.split("1/4")[0]
    assert re.search(r"0/4 .*compiling a \([1-9]\d* s\)", first), first[-400:]


def _spy_handoff(monkeypatch) -> list[bool]:
    """What each program handed to a worker went as (True: IPC handles), in order."""
    handed: list[bool] = []
    real = compile_workers.write_program

    def spy(ep, path, mutated, **kw):
        handed.append(real(ep, path, mutated, **kw))
        return handed[-1]
    monkeypatch.setattr(compile_workers, "write_program", spy)
    return handed


def test_a_worker_that_cannot_map_the_tensors_gets_the_program_whole(three_bundle, tmp_path, monkeypatch):
    """Handles a worker cannot open (a platform without legacy CUDA IPC) cost a second
    hand-over, saved whole, not the compile: the bundle is the same."""
    device = read_bundle(three_bundle).manifest.device
    if device == "cpu":
        pytest.skip("CPU programs are always saved whole")
    garble_ipc_handles(monkeypatch)
    monkeypatch.setattr(compile_workers, "WORKER_START", "zygote")
    out = aoti_rt.compile(_three_programs(device), tmp_path / "b", jobs=3, progress=False)
    for name in ("manifest.json", "weights.safetensors"):
        assert (out / name).read_bytes() == (three_bundle / name).read_bytes()


def test_jobs_must_be_positive(tmp_path, no_aoti):
    for jobs in (0, -1, 1.5, "2", True):
        with pytest.raises(aoti_rt.CompileError, match="jobs must be a positive int"):
            aoti_rt.compile({"fwd": (nn.Linear(2, 2), (torch.randn(1, 2),))}, tmp_path / "b", jobs=jobs)


def _children() -> list[str]:
    """This process's live child processes (pid: command line)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            out.append(f"{stat.parent.name}: {(stat.parent / 'cmdline').read_bytes()[:200]!r}")
    return out


@pytest.mark.parametrize("start", ["fork", "zygote"])
def test_a_failing_worker_is_a_compile_error(tmp_path, monkeypatch, start):
    """Both ways a worker starts (zygote: as for CUDA programs) hand its error back, and leave
    no process behind."""
    monkeypatch.setattr(compile_workers, "WORKER_START", start)
    before = _children()
    progs = {"a": (nn.Linear(4, 4), (torch.randn(2, 4),)), "b": (nn.Linear(4, 4), (torch.randn(2, 4),))}
    with pytest.raises(aoti_rt.CompileError, match=r"method '[ab]': AOTInductor failed to compile it"):
        aoti_rt.compile(progs, tmp_path / "b", progress=False, jobs=2, inductor_configs=_bogus_cxx())
    assert not (tmp_path / "b").exists()
    assert _children() == before


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="x86 vector ISAs")
def test_vector_isa_checks_run_at_once(no_aoti):
    """A fast timing check beside the real one below: with ISA objects whose check sleeps,
    every ISA the CPU has is checked at once, not in turn; ISAs it lacks are skipped."""
    import threading
    import time
    import types

    class Isa:
        def __init__(self, name):
            self.name, self.checked = name, threading.Event()

        def __str__(self):
            return self.name

        def __bool__(self):
            time.sleep(0.5)
            self.checked.set()
            return True

    isas = [Isa("avx512 avx512_vnni"), Isa("avx512"), Isa("avx2"), Isa("amx_tile")]
    fake = types.SimpleNamespace(x86_isa_checker=lambda: ["avx2", "avx512", "avx512_vnni"],
                                 supported_vec_isa_list=isas)
    t0 = time.perf_counter()
    compile_workers._check_vec_isas(fake)
    assert time.perf_counter() - t0 < 1.2
    assert [i.checked.is_set() for i in isas] == [True, True, True, False]


_ISA_RUN = """
import json, os, sys
from aoti_rt.compile_workers import warm_up_inductor
from torch._inductor import config, cpu_vec_isa

options = {"cpp.cxx": (sys.argv[1],)}
flags = cpu_vec_isa.x86_isa_checker()
mine = [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
if sys.argv[2] == "warm":
    warm_up_inductor(options)
    calls = len(open(sys.argv[3]).readlines()) if os.path.exists(sys.argv[3]) else 0
    print(json.dumps({"isas": [str(i) for i in mine], "calls_after_warm_up": calls}))
with config.patch(options):       # what a compile then asks: answered by the warm-up's results
    results = [bool(isa) for isa in mine]
    picked = str(cpu_vec_isa.pick_vec_isa())
print(json.dumps({"results": results, "picked": picked}))
"""


def _isa_builds(log: Path) -> list[tuple[float, float, str]]:
    """(start, end, source) of each build of a .cpp file the logging compiler ran."""
    starts, out = {}, []
    for line in log.read_text().splitlines() if log.is_file() else []:
        what, pid, at, *args = line.split(" ", 3) + [""]
        if what == "start":
            starts[pid] = (float(at), next((a for a in args[0].split() if a.endswith(".cpp")), ""))
        elif what == "end" and pid in starts:
            begin, src = starts.pop(pid)
            if src:
                out.append((begin, float(at), src))
    return out


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="x86 vector ISAs")
def test_the_warm_up_checks_each_isa_once_at_once_with_the_callers_compiler(tmp_path, no_aoti):
    """torch's own vector-ISA objects and a real compiler: the warm-up builds inductor's check of
    each ISA this CPU has exactly once, with the C++ compiler the caller's options name, all at
    once; the results land in inductor's cache, so the checks a compile makes afterwards, in
    this process or another one sharing the cache, build nothing."""
    import shutil
    import subprocess
    import sys

    gxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if gxx is None:
        pytest.skip("no C++ compiler")
    log = tmp_path / "calls"
    cxx = tmp_path / "logging-g++"
    cxx.write_text(f'#!/bin/sh\necho "start $$ $(date +%s.%N) $*" >> {log}\n{gxx} "$@"\nrc=$?\n'
                   f'echo "end $$ $(date +%s.%N)" >> {log}\nexit $rc\n')
    cxx.chmod(0o755)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}

    def run(*args: str) -> list[dict]:
        r = subprocess.run([sys.executable, "-c", _ISA_RUN, str(cxx), *args], env=env, check=True, timeout=300,
                           capture_output=True, text=True)
        return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]

    warm, after = run("warm", str(log))
    builds = _isa_builds(log)
    isas = warm["isas"]
    if not isas:
        pytest.skip("this CPU has none of inductor's vector ISAs")
    # each ISA the CPU has is checked, through the caller's compiler, each check built once (an
    # ISA's check may be several builds: avx512 also tries bf16, avx512_vnni its vnni code)
    assert len(builds) >= len(isas) and len({src for _, _, src in builds}) == len(builds), (isas, builds)
    first = sorted(builds)[:len(isas)]      # at once: each ISA's first build starts before any ends
    assert max(b for b, _, _ in first) < min(e for _, e, _ in builds), builds
    # the answers are cached: the same process asks again and nothing is built
    assert len(log.read_text().splitlines()) == warm["calls_after_warm_up"], "a check after the warm-up built again"
    assert after["results"] == [True] * len(isas) and after["picked"] == isas[0]
    # another process with the same inductor cache finds the builds there
    again = _isa_builds(log)
    other, = run("other")
    assert _isa_builds(log) == again == builds and other == after
