"""The shape of the package: one Device type, the AOTI ABI bound once per .so, no import cycle."""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import pytest

import aoti_rt
from aoti_rt import _bind
from aoti_rt.abi import SharedObject, blob_layout
from aoti_rt.bundle import read_bundle
from aoti_rt.device import Device

PKG = Path(aoti_rt.__file__).parent


def test_device_parses_what_users_write():
    assert Device.parse("cpu") == Device("cpu") and Device.parse(" CPU ") == Device("cpu")
    assert Device.parse(None) == Device("cpu")
    assert Device.parse(None, default=Device("cpu")) is not None
    d = Device("cuda", 3)
    assert str(d) == "cuda:3" and d.is_cuda and not Device("cpu").is_cuda
    assert {Device("cuda", 3): 1}[Device("cuda", 3)] == 1          # hashable: keys per-device state
    assert pickle.loads(pickle.dumps(d)) == d
    with pytest.raises(AttributeError):
        d.index = 4                                                 # frozen
    for bad in ("gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:0:1", "cpu:0", ""):
        with pytest.raises(ValueError, match="unknown device"):
            Device.parse(bad)


@pytest.mark.skipif(aoti_rt.cuda_available(), reason="checks the refusal on a machine without a GPU")
def test_device_that_does_not_exist_is_refused():
    for spec in ("cuda", "cuda:0", Device("cuda", 0)):
        with pytest.raises(aoti_rt.AotiRtError, match="not available"):
            Device.parse(spec)


def test_model_abi_is_bound_once_and_refuses_after_unload(three_bundle, device):
    b = read_bundle(three_bundle)
    so = SharedObject(b.so_path("a"))
    abi = so.abi
    assert abi.has("UpdateUserManagedConstantBufferPairs") and abi.has("Run")
    assert set(_bind.ENTRY_POINTS) >= abi.available
    handle = abi.create(str(Device.parse(device)))
    try:
        assert abi.num_constants(handle) == len(b.manifest.methods["a"].constants)
        assert abi.num_inputs(handle) == len(b.manifest.methods["a"].inputs)
        rows = so.constants(handle)
        assert [r.name for r in rows] == [c.name for c in b.manifest.methods["a"].constants]
    finally:
        abi.delete(handle)
        so.close()
    # the library is unmapped: a call must raise, not jump into freed code
    with pytest.raises(aoti_rt.AOTIError, match="unloaded"):
        abi.create("cpu")
    with pytest.raises(aoti_rt.AOTIError, match="unloaded"):
        abi.run(0, [], 1, 0)


def test_model_abi_names_missing_entry_points():
    with pytest.raises(aoti_rt.AOTIError, match="lacks AOTInductorModelContainerCreateWithDevice"):
        _bind.ModelABI({}, "empty.so")


def test_blob_layout_is_prefix_sums():
    assert blob_layout([]) == ([], 0)
    assert blob_layout([64, 0, 128, 64]) == ([0, 64, 64, 192], 256)


def _imports(path: Path) -> set[str]:
    """aoti_rt modules a module imports when it is imported (module level, not in functions)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aoti_rt."):
            out.add(node.module.split(".")[1])
    return out


def _cimports(path: Path) -> set[str]:
    return set(re.findall(r"^from aoti_rt\.(\w+) cimport", path.read_text(), re.M))


def test_no_import_cycle():
    """Data flows one way: each module imports only modules below it (Python and Cython)."""
    graph = {p.stem: _imports(p) for p in PKG.glob("*.py")}
    for p in list(PKG.glob("*.pyx")) + list(PKG.glob("*.pxd")):
        graph.setdefault(p.stem, set()).update(_cimports(p))
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    # the Cython core: memory at the bottom, the others on top of it, never of each other except
    # the load path's own layers (byte steps, the plan and its loop, the engines)
    assert graph["_memory"] == set()
    assert graph["_cache"] == graph["_bind"] == graph["_pieces"] == graph["_arena"] == {"_memory"}
    assert graph["_plan"] == {"_memory", "_pieces"} and graph["_load"] == {"_memory", "_plan"}
    # the load path does not import the compiler
    for m in ("runtime", "loader", "stock", "device", "abi", "bundle"):
        assert "compiler" not in graph[m], m


def test_cli_reports_a_bad_bundle_without_a_traceback(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "aoti_rt", "inspect", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "BundleError" in r.stderr and "not an aoti_rt bundle" in r.stderr and "Traceback" not in r.stderr
