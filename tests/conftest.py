"""Shared fixtures: real AOTI models, compiled once per test session and device.

Every bundle fixture is parametrized over the devices: "cpu" always, "cuda" when a GPU is
present (marked ``cuda``; skipped cleanly otherwise). Compiles are the slow part (~10 s a
method on CPU), so each model is compiled once and shared by the tests that need it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import filelock
import pytest
import torch
from torch import nn

import aoti_rt
from aoti_rt import demo
from aoti_rt.method_compiler import _aoti_options, quiet_torch_deprecations

from models import METHOD_LAYERS, Subset, make_stack

os.environ.setdefault("OMP_NUM_THREADS", "2")
# pytest-xdist workers compiling one graph into one inductor cache race on its files (a package
# written while another worker rewrote them held an empty metadata json): a cache per worker
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor-{os.getuid()}-{os.environ['PYTEST_XDIST_WORKER']}"))

CUDA = aoti_rt.cuda_available() and torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda:0", id="cuda",
                 marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU")]),
]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """Where the session's models are compiled: one folder for all pytest-xdist workers of the
    session (the parent of each worker's base temp), so each model compiles once, not once a
    worker (see :func:`_once`). Tests never change what is in it (``copy_bundle`` first)."""
    base = tmp_path_factory.getbasetemp()
    d = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "bundles"
    d.mkdir(exist_ok=True)
    return d


def _once(path: Path, done: Path, build) -> None:
    """Run ``build()`` unless ``done`` exists, under a file lock on ``path``: a worker that
    needs a model another worker is compiling waits for it instead of compiling it again."""
    with filelock.FileLock(f"{path}.lock"):
        if not done.exists():
            build()


def _compile(workdir: Path, name: str, device: str, programs) -> Path:
    """``programs`` (a callable giving them: nothing is exported when the model is compiled
    already) compiled into ``workdir``."""
    path = workdir / f"{name}-{device.replace(':', '')}"
    _once(path, path / "manifest.json", lambda: aoti_rt.compile(programs(), path, progress=False))
    return path


# -- the demo LM: prefill + decode, in-place KV cache, tied head ---------------------------

@pytest.fixture(scope="session", params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def lm_bundle(workdir, device) -> Path:
    return _compile(workdir, "lm", device, lambda: demo.export_methods(demo.make_model(device)))


@pytest.fixture(scope="session")
def lm_other_bundle(workdir, device) -> Path:
    """Same architecture and FQNs as lm_bundle, other values (seed 1), decode only."""
    return _compile(workdir, "lm-other", device,
                    lambda: {"decode": demo.export_methods(demo.make_model(device, seed=1))["decode"]})


# -- an MLP stack with three partially overlapping methods (tests/models.py) -----------

@pytest.fixture(scope="session")
def three_bundle(workdir, device) -> Path:
    def programs():
        s = make_stack(device)
        x = torch.randn(3, 64, device=device)
        return {name: torch.export.export(Subset(s, layers), (x,)) for name, layers in METHOD_LAYERS.items()}
    return _compile(workdir, "three", device, programs)


@pytest.fixture(scope="session")
def diverge_bundle(workdir, device) -> Path:
    """Two methods whose FQNs are the same but whose values differ."""
    def build():
        x = torch.randn(3, 64, device=device)
        progs = {"a": torch.export.export(Subset(make_stack(device, 0), [0]), (x,)),
                 "b": torch.export.export(Subset(make_stack(device, 1), [0]), (x,))}
        with pytest.warns(UserWarning, match="differs between methods"):
            aoti_rt.compile(progs, path, progress=False)
    path = workdir / f"diverge-{device.replace(':', '')}"
    _once(path, path / "manifest.json", build)
    return path


def _stock(workdir: Path, device: str, name: str, seed: int) -> tuple[Path, Path, nn.Module]:
    """A plain AOTI .so + *_weights.blob from torch._inductor.aot_compile (no bundle) of
    layers 0..2 of the stack made with ``seed``."""
    mod = Subset(make_stack(device, seed=seed), [0, 1, 2]).eval()
    out = workdir / f"{name}-{device.replace(':', '')}"

    def build():
        x = torch.randn(3, 64, device=device)
        out.mkdir()
        ep = torch.export.export(mod, (x,))
        # the stock options: no weights in the .so, binary_blob beside it
        so = torch._inductor.aot_compile(ep.module(), (x,), options=_aoti_options(out / "model.so"))
        (out / "so.txt").write_text(str(so))
    _once(out, out / "so.txt", build)
    return Path((out / "so.txt").read_text()), next(out.rglob("*_weights.blob")), mod


@pytest.fixture(scope="session")
def stock_artifact(workdir, device) -> tuple[Path, Path, nn.Module]:
    """A stock artifact whose weights (seed 3) differ from three_bundle's."""
    return _stock(workdir, device, "stock", seed=3)


@pytest.fixture(scope="session")
def stock_shared_artifact(workdir, device) -> tuple[Path, Path, nn.Module]:
    """A stock artifact of the same weights (seed 0) as three_bundle's layers 0..2."""
    return _stock(workdir, device, "stock-shared", seed=0)


#: the ways torch's packaging stores a model's weights (each a set of inductor options)
FORMATS = {
    "embedded": {},
    "blob": {"aot_inductor.package_constants_in_so": False,
             "aot_inductor.package_constants_on_disk_format": "binary_blob"},
    "pickle": {"aot_inductor.package_constants_in_so": False,
               "aot_inductor.package_constants_on_disk_format": "pickle_weights"},
    "mmap": {"aot_inductor.force_mmap_weights": True},
}


def _package(path: Path, program, options: dict) -> Path:
    """``program`` (or a callable giving it) packaged by torch at ``path``, once a session; the
    file appears whole (another worker may test that it exists without the lock)."""
    def build():
        ep = program if isinstance(program, torch.export.ExportedProgram) else program()
        tmp = path.with_name(path.stem + ".partial.pt2")      # torch takes only a .pt2 name
        with quiet_torch_deprecations():
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs=dict(options))
        os.replace(tmp, path)
    _once(path, path, build)
    return path


def _stack_program(device: str, layers: list[int]):
    x = torch.randn(3, 64, device=device)
    with quiet_torch_deprecations():
        return torch.export.export(Subset(make_stack(device), layers).eval(), (x,))


@pytest.fixture(scope="session")
def stack_pt2(workdir, device) -> dict[str, Path]:
    """Layers 0..2 of the stack (seed 0), one single-model package per weight format."""
    programs: list = []
    def program():
        programs[:] = programs or [_stack_program(device, [0, 1, 2])]
        return programs[0]
    tag = device.replace(":", "")
    return {fmt: _package(workdir / f"stack-{fmt}-{tag}.pt2", program, opts) for fmt, opts in FORMATS.items()}


@pytest.fixture(scope="session")
def pt2_cache(tmp_path_factory) -> Path:
    """The session's scratch .pt2 extraction cache (never the user's)."""
    return tmp_path_factory.mktemp("pt2-cache")


@pytest.fixture
def pt2_cache_here(pt2_cache, monkeypatch):
    """Extracted files and probe records go to the session's scratch cache: a package test
    file uses it with ``pytestmark = pytest.mark.usefixtures("pt2_cache_here")``."""
    monkeypatch.setenv("AOTI_RT_CACHE", str(pt2_cache))


@pytest.fixture
def copy_bundle(tmp_path):
    """Copy a bundle to a scratch dir so a test can damage it."""
    def copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst
    return copy


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test must leave aoti_rt's allocations where it found them (and the arenas of
    weights shared across processes)."""
    import gc

    def held():
        return {d: (rt.allocator.bytes_allocated, rt.allocator.bytes_reserved)
                for d, rt in aoti_rt.device.all_runtimes().items()}

    before = held()
    arenas = aoti_rt._memory.arena_totals()
    yield
    gc.collect()
    for d, (n, r) in held().items():
        n0, r0 = before.get(d, (0, 0))
        assert n == n0, f"{d}: {n - n0} bytes left allocated"
        assert r == r0, f"{d}: {r - r0} bytes left reserved"
    assert aoti_rt._memory.arena_totals() == arenas, "shared arenas left mapped"
