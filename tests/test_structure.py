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


def test_one_rule_picks_the_default_device():
    """Bundles, packages and stock artifacts ask one function for their device."""
    from aoti_rt.runtime import device_for

    assert device_for("cpu", "cuda") == Device("cpu")             # a device given wins
    assert device_for(None, "cpu") == Device("cpu")               # else the compiled type
    assert device_for(None) == (Device.parse("cuda") if aoti_rt.cuda_available() else Device("cpu"))
    if aoti_rt.cuda_available():
        assert device_for(None, "cuda") == Device.parse("cuda")
    else:
        with pytest.raises(aoti_rt.DeviceError, match="not available"):
            device_for(None, "cuda")


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


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (imports for annotations: never run)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                out.update(id(n) for n in ast.walk(child))
    return out


def _imports(path: Path) -> set[str]:
    """aoti_rt modules a module imports, anywhere: at module level and inside functions (an
    import in a function is an edge all the same: it runs when the function does), but not
    under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aoti_rt."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("aoti_rt."))
    return out


def _cimports(path: Path) -> set[str]:
    return set(re.findall(r"^from aoti_rt\.(\w+) cimport", path.read_text(), re.M))


def test_no_import_cycle():
    """Data flows one way: each module imports only modules below it (Python and Cython), with
    imports inside functions counted."""
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


def test_import_walk_sees_imports_inside_functions(tmp_path):
    """The cycle check above reads imports in function bodies too (they are edges)."""
    mod = tmp_path / "m.py"
    mod.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .update import X\n"
                   "def f():\n    from .package import load_package\n    import aoti_rt.serving\n")
    assert _imports(mod) == {"package", "serving"}


#: ``x._name`` uses across modules that are allowed, as (module, attribute): each with a reason.
#: Keep it empty or tiny.
PRIVATE_ACCESS_ALLOWED: set[tuple[str, str]] = set()


def _defined_private(path: Path) -> set[str]:
    """The ``_names`` a module defines: functions, classes, attributes it sets on ``self``/
    ``cls``, module-level names; in Cython, its ``def``/``cdef`` names and fields."""
    if path.suffix in (".pyx", ".pxd"):
        return set(re.findall(r"^\s*(?:cp?def|cdef class|class)\b[^#\n]*?\b(_\w+)\b", path.read_text(), re.M))
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in ("self", "cls") and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
        elif isinstance(node, ast.Assign):
            out.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return {n for n in out if n.startswith("_") and not n.endswith("__")}


def _private_uses(path: Path, others: set[str]) -> list[str]:
    """``x._name`` in a module, where ``x`` is not ``self``/``cls``, ``_name`` is not a
    dunder and is a private name another aoti_rt module defines (and this one does not): a
    reach into another module's objects. Private names of torch or the standard library
    (``ep._constants``, ``zipfile._EndRecData``) are not aoti_rt's and not checked here."""
    own = _defined_private(path)
    tree = ast.parse(path.read_text())
    # names bound to modules outside aoti_rt (``os._exit`` is the standard library's)
    foreign = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
               for a in n.names if not a.name.startswith("aoti_rt")}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or node.attr not in others or node.attr in own:
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", *foreign):
            continue
        if (path.stem, node.attr) not in PRIVATE_ACCESS_ALLOWED:
            out.append(f"{path.name}:{node.lineno}: .{node.attr}")
    return out


def test_no_module_uses_another_modules_private_attributes():
    """A module reaches into another's objects only through their public API."""
    files = sorted(list(PKG.glob("*.py")) + list(PKG.glob("*.pyx")) + list(PKG.glob("*.pxd")))
    defined = {p: _defined_private(p) for p in files}
    found = []
    for p in files:
        if p.suffix != ".py":
            continue
        others = set().union(*(d for q, d in defined.items() if q.stem != p.stem))
        found += _private_uses(p, others)
    assert not found, "private attributes used across modules:\n" + "\n".join(found)


MAX_LINES = 700


def _long_modules() -> dict[str, int]:
    out = {}
    for p in sorted(list(PKG.glob("*.py")) + list(PKG.glob("*.pyx"))):
        n = len(p.read_text().splitlines())
        if n > MAX_LINES:
            out[p.name] = n
    return out


def test_no_module_is_over_700_lines():
    """Every module of aoti_rt fits in one reading: at most 700 lines."""
    assert not _long_modules(), f"modules over {MAX_LINES} lines: {_long_modules()}"


def test_cli_reports_a_bad_bundle_without_a_traceback(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "aoti_rt", "inspect", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "BundleError" in r.stderr and "not an aoti_rt bundle" in r.stderr and "Traceback" not in r.stderr
