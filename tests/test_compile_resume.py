"""``aoti_rt.compile(..., resume=True)``: a compile stopped after some of its methods goes on
from there, and takes nothing from the earlier compile that changed since.

Real AOTI compiles on the CPU, one method after another (``jobs=1``); the stop is a
KeyboardInterrupt raised as the second method starts, as Ctrl-C or a time limit would.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import aoti_rt
from aoti_rt import compile_workers
from aoti_rt.bundle import read_bundle
from aoti_rt.compile_resume import STAGE
from models import METHOD_LAYERS, Subset, make_stack

X = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))


def _programs(stack):
    return {name: torch.export.export(Subset(stack, METHOD_LAYERS[name]).eval(), (X,)) for name in ("a", "b")}


@pytest.fixture
def compiled(monkeypatch):
    """Which methods AOTI compiled, in order; ``stop_at``: a method whose compile is stopped."""
    real = compile_workers.compile_method
    calls: list[str] = []
    stop_at: set[str] = set()

    def compile_method(job, ep, keep_files=False):
        calls.append(job.name)
        if job.name in stop_at:
            raise KeyboardInterrupt
        return real(job, ep, keep_files=keep_files)
    monkeypatch.setattr(compile_workers, "compile_method", compile_method)
    return calls, stop_at


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A resumable compile of ``_programs(make_stack("cpu"))`` stopped as its second method
    started (once; each test resumes a copy of it)."""
    path = tmp_path_factory.mktemp("stopped") / "b"
    real = compile_workers.compile_method
    calls = []

    def compile_method(job, ep, keep_files=False):
        calls.append(job.name)
        if job.name == "b":
            raise KeyboardInterrupt
        return real(job, ep, keep_files=keep_files)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compile_workers, "compile_method", compile_method)
        with pytest.raises(KeyboardInterrupt):
            aoti_rt.compile(_programs(make_stack("cpu")), path, progress=False, jobs=1, resume=True)
    assert calls == ["a", "b"] and (path / STAGE).is_dir() and not (path / "manifest.json").exists()
    return path


def _stopped(path: Path, stopped: Path) -> None:
    shutil.copytree(stopped, path)           # modes too: the stage stays this user's alone


def test_a_stopped_compile_resumes_from_its_finished_methods(tmp_path, compiled, stopped):
    stack = make_stack("cpu")
    path = tmp_path / "b"
    _stopped(path, stopped)
    calls, _ = compiled
    aoti_rt.compile(_programs(stack), path, progress=False, jobs=1, resume=True)   # exported again
    assert calls == ["b"]                                          # "a" came from the stage
    assert sorted(os.listdir(path)) == ["a.so", "b.so", "manifest.json", "weights.safetensors"]
    manifest = read_bundle(path).manifest
    assert sorted(manifest.methods) == ["a", "b"]
    held = {f for w in manifest.weights.values() for f in w.fqns}
    assert {c.fqn for m in manifest.methods.values() for c in m.constants} <= held    # a's and b's alike
    with aoti_rt.load(path) as model, torch.no_grad():
        for name in ("a", "b"):
            assert torch.equal(getattr(model, name)(X), Subset(stack, METHOD_LAYERS[name])(X))


def test_changed_weights_are_compiled_again(tmp_path, compiled, stopped):
    """Same graph, other weight values: the stage's method would hold the old bytes."""
    stack = make_stack("cpu")
    path = tmp_path / "b"
    _stopped(path, stopped)
    calls, _ = compiled
    with torch.no_grad():
        stack.layers[0].weight.add_(1.0)                  # a weight of method "a" only
    aoti_rt.compile(_programs(stack), path, progress=False, jobs=1, resume=True)
    assert calls == ["a", "b"]
    with aoti_rt.load(path) as model, torch.no_grad():
        assert torch.equal(model.a(X), Subset(stack, METHOD_LAYERS["a"])(X))


def test_without_resume_a_stopped_compile_leaves_nothing_and_a_stage_is_not_a_bundle(tmp_path, compiled, stopped):
    stack = make_stack("cpu")
    calls, stop_at = compiled
    stop_at.add("b")
    with pytest.raises(KeyboardInterrupt):
        aoti_rt.compile(_programs(stack), tmp_path / "plain", progress=False, jobs=1)
    assert not (tmp_path / "plain").exists()
    calls.clear()
    _stopped(tmp_path / "b", stopped)
    with pytest.raises(aoti_rt.CompileError, match="not an empty directory"):     # only resume goes on
        aoti_rt.compile(_programs(stack), tmp_path / "b", progress=False, jobs=1)
    with pytest.raises(aoti_rt.BundleError):
        aoti_rt.load(tmp_path / "b")


def test_a_stage_others_could_write_is_refused(tmp_path):
    path = tmp_path / "b"
    (path / STAGE).mkdir(parents=True, mode=0o700)
    os.chmod(path / STAGE, 0o777)                          # its pickles could be anyone's
    with pytest.raises(aoti_rt.CompileError, match="remove it"):
        aoti_rt.compile(_programs(make_stack("cpu")), path, progress=False, jobs=1, resume=True)


def test_the_disk_check_counts_only_the_methods_left(tmp_path, compiled, stopped, monkeypatch):
    """The finished methods' constants are on the disk already: a resumed compile needs room for
    the methods it still compiles and the store, where a compile from the start needs more."""
    from collections import namedtuple

    from aoti_rt import compiler

    stack = make_stack("cpu")
    path = tmp_path / "b"
    _stopped(path, stopped)
    w = compiler._weight_bytes(_programs(stack))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(compiler.shutil, "disk_usage", lambda p: usage(1 << 40, 1 << 40, int(2.5 * w)))
    with pytest.raises(aoti_rt.CompileError, match="each of the 2 methods"):       # 3 W from the start
        aoti_rt.compile(_programs(stack), tmp_path / "fresh", progress=False, jobs=1)
    aoti_rt.compile(_programs(stack), path, progress=False, jobs=1, resume=True)  # 2 W: "b" and the store
    assert (path / "manifest.json").is_file()


def test_a_method_that_cannot_be_fingerprinted_is_compiled_again_and_says_so(caplog):
    """A value of the program's state the fingerprint cannot hash: no reuse (never a wrong
    one), and a warning that names the method."""
    from aoti_rt.compile_resume import Fingerprints
    from aoti_rt.method_compiler import Job

    ep = _programs(make_stack("cpu"))["a"]
    job = Job("a", Path("work"), Path("out"), "cpu", set(), [], [], {})
    assert Fingerprints().of(ep, job) == Fingerprints().of(ep, job) is not None
    ep.constants["odd"] = object()
    with caplog.at_level("WARNING", logger="aoti_rt"):
        assert Fingerprints().of(ep, job) is None
    assert "method a: no fingerprint (TypeError" in caplog.text


def test_the_fingerprint_covers_a_view_weights_whole_storage():
    """AOTI serialises a constant's whole storage: bytes outside a view weight's own elements
    are in the method's result too, so changing them must change the fingerprint."""
    from aoti_rt.compile_resume import Fingerprints
    from aoti_rt.method_compiler import Job

    ep = _programs(make_stack("cpu"))["a"]
    job = Job("a", Path("work"), Path("out"), "cpu", set(), [], [], {})
    name = sorted(ep.state_dict)[0]
    w = ep.state_dict[name]
    big = torch.cat([w.detach().reshape(-1), torch.zeros(8)])
    ep.state_dict[name] = big[: w.numel()].view(w.shape)       # the same values, a larger storage
    first = Fingerprints().of(ep, job)
    big[-1] = 1.0                                            # outside the view
    assert first is not None and Fingerprints().of(ep, job) != first
