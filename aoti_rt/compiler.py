"""Compile a model's methods into one bundle with each distinct weight stored once.

Each method is compiled by AOTInductor into a shared object *without* its weights
(``package_constants_in_so=False``, ``binary_blob``). The .so is then probed once: its C ABI
gives each constant's internal name, FQN, dtype, kind and data size; torch's own AOTI runner,
loaded with the method's blob, gives the exact view (shape, stride, storage offset) and bytes
AOTI expects. Storages are keyed by content digest, so a weight used by several methods, or
tied under two FQNs, is written to the store once.

``_compile`` is the outline: export the programs, resolve the device, compile each method
(:func:`_compile_method`: its .so and MethodSpec, independent of the other methods), bind its
constants to weights in method order (:class:`_WeightTable`), write the store, then the
manifest, last.
"""

from __future__ import annotations

import contextlib
import keyword
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .bundle import (MANIFEST, STORE, ConstantSpec, InputSpec, Manifest, MethodSpec, WeightSpec,
                     divergent_fqns, dtype_name, read_store_header, safe_tensor_name, weight_id)
from .errors import CompileError
from .probe import probe_method

if TYPE_CHECKING:
    from torch.export import ExportedProgram

_METHOD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
#: names a method may not take: they are attributes of Model
RESERVED = {"close", "methods", "device", "bundle", "manifest", "memory", "weight", "state",
            "path"}


@contextlib.contextmanager
def quiet_torch_deprecations():
    """Hide torch's own internal deprecation warnings (raised inside torch.export and AOTI,
    not by the caller's code) so that compile output shows progress, not noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..*deprecated.*", category=DeprecationWarning)
        yield


def _aoti_options(so_path: Path) -> dict[str, Any]:
    import torch._inductor.config as cfg

    opts = {
        "aot_inductor.output_path": str(so_path),
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.package_constants_on_disk_format": "binary_blob",
        "aot_inductor.embed_kernel_binary": True,   # one self-contained .so per method
    }
    # Only pass what this torch knows (older releases lack some keys).
    return {k: v for k, v in opts.items() if hasattr(cfg.aot_inductor, k.split(".", 1)[1])}


def _as_exported(name: str, prog: Any):
    import torch

    if isinstance(prog, torch.export.ExportedProgram):
        return prog
    if isinstance(prog, tuple) and 2 <= len(prog) <= 4 and isinstance(prog[0], torch.nn.Module):
        module, args = prog[0], prog[1]
        kwargs = prog[2] if len(prog) > 2 else None
        dyn = prog[3] if len(prog) > 3 else None
        if not isinstance(args, tuple):
            args = (args,)
        return torch.export.export(module, args, kwargs, dynamic_shapes=dyn)
    raise CompileError(
        f"method {name!r}: expected a torch.export.ExportedProgram or a (module, args[, kwargs"
        f"[, dynamic_shapes]]) tuple, got {type(prog).__name__}; export it with torch.export.export")


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _METHOD_NAME.match(name) or keyword.iskeyword(name) \
            or name in RESERVED:
        raise CompileError(
            f"bad method name {name!r}: it becomes an attribute and a file name, so use a Python "
            f"identifier that starts with a letter and is not one of {sorted(RESERVED)}")


def _program_device(ep) -> str:
    import torch

    devices = {t.device.type for t in list(ep.state_dict.values()) + list(ep.constants.values())
               if isinstance(t, torch.Tensor)}
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            devices.add(val.device.type)
    devices.discard("meta")
    if len(devices) > 1:
        raise CompileError(f"the program mixes devices {sorted(devices)}; export it on one device")
    return devices.pop() if devices else "cpu"


def _mutated_fqns(ep) -> set[str]:
    from torch.export.graph_signature import OutputKind

    sig = ep.run_decompositions().graph_signature
    out = {s.target for s in sig.output_specs if s.kind == OutputKind.BUFFER_MUTATION}
    return out | set(sig.buffers_to_mutate.values())


def _inputs(ep) -> list[InputSpec]:
    import torch

    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    specs = []
    for name in ep.graph_signature.user_inputs:
        val = nodes[name].meta.get("val")
        if isinstance(val, torch.Tensor):
            shape = [int(d) if isinstance(d, int) or str(d).isdigit() else None for d in val.shape]
            specs.append(InputSpec(name, dtype_name(val.dtype), shape, val.device.type))
    return specs


def compile(programs: Mapping[str, Any], path: str | os.PathLike[str], *, device: str | None = None,
            overwrite: bool = False, progress: bool = True) -> Path:
    """Compile several methods of one model into an aoti_rt bundle at ``path``.

    Args:
        programs: method name -> ``torch.export.ExportedProgram``, or a ``(module, args)``,
            ``(module, args, kwargs)`` or ``(module, args, kwargs, dynamic_shapes)`` tuple.
        path: the bundle directory to write (must not exist, or be empty, unless ``overwrite``).
        device: "cpu" or "cuda[:N]"; default: the device the programs were exported on.
        overwrite: replace an existing bundle directory.
        progress: show a progress bar (methods take seconds each to compile).

    Returns:
        The bundle directory. Its ``manifest.json`` is written last, so a bundle with a
        manifest is complete.
    """
    if not isinstance(programs, Mapping) or not programs:
        raise CompileError("programs must be a non-empty mapping of method name -> ExportedProgram")
    for name in programs:
        _check_name(name)
    out = Path(path)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise CompileError(f"{out} exists and is not an empty directory; pass overwrite=True to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_file = out / ".aoti_rt_write_test"
        probe_file.write_bytes(b"")
        probe_file.unlink()
    except OSError as e:
        raise CompileError(f"cannot write the bundle to {out}: {e}") from e
    if overwrite:
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()

    with quiet_torch_deprecations():
        return _compile(programs, out, device, progress)


def _compile(programs: Mapping[str, Any], out: Path, device: str | None, progress: bool) -> Path:
    """The work of :func:`compile`, once its arguments and output directory are checked."""
    import torch
    from tqdm.auto import tqdm

    eps = _export_programs(programs)
    device = _resolve_device(eps, device)
    mutated = set().union(*(_mutated_fqns(ep) for ep in eps.values()))
    methods: dict[str, MethodSpec] = {}
    weights = _WeightTable()
    bar = tqdm(list(eps.items()), desc="aoti_rt compile", unit="method", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="aoti_rt_") as tmp:
        for name, ep in bar:
            bar.set_postfix_str(name)
            method, data = _compile_method(name, ep, Path(tmp) / name, out, device, mutated)
            weights.bind(method, data)          # in method order: it names the store tensors
            methods[name] = method
    _warn_divergent_fqns(methods)
    weights.write_store(out)
    _write_manifest(out, Manifest(device=device, methods=methods, weights=weights.specs, store=STORE,
                                  torch_version=torch.__version__, aoti_rt_version=__version__))
    return out


def _export_programs(programs: Mapping[str, Any]) -> dict[str, ExportedProgram]:
    """Each method's ExportedProgram (tuples are exported), warning where example inputs alias."""
    eps = {name: _as_exported(name, prog) for name, prog in programs.items()}
    for name, ep in eps.items():
        _warn_aliased_examples(name, ep)
    return eps


def _resolve_device(eps: Mapping[str, ExportedProgram], device: str | None) -> str:
    """The manifest's device: ``device`` (checked against the programs') or theirs; cuda is cuda:N."""
    import torch

    devices = {_program_device(ep) for ep in eps.values()}
    if len(devices) > 1:
        raise CompileError(f"methods were exported on different devices {sorted(devices)}")
    dev_type = devices.pop()
    if device is None:
        return "cuda:0" if dev_type == "cuda" else "cpu"
    if torch.device(device).type != dev_type:
        raise CompileError(f"device={device!r} but the programs were exported on {dev_type}; "
                           f"export them on {device}")
    if torch.device(device).type == "cuda" and torch.device(device).index is None:
        return "cuda:0"
    return device


def _compile_method(name: str, ep: ExportedProgram, workdir: Path, out: Path, device: str,
                    mutated: set[str]) -> tuple[MethodSpec, list[bytes]]:
    """Compile one method to ``out/<name>.so``, independently: its MethodSpec and constants' bytes."""
    import torch

    workdir.mkdir()
    args, kwargs = ep.example_inputs if ep.example_inputs is not None else ((), {})
    so_tmp = Path(torch._inductor.aot_compile(ep.module(), args, kwargs,
                                              options=_aoti_options(workdir / f"{name}.so")))
    blobs = sorted(workdir.rglob("*_weights.blob"))
    consts, so_spec, n_in = probe_method(so_tmp, blobs[0] if blobs else None, device, mutated)
    inputs = _inputs(ep)
    if len(inputs) != n_in:
        raise CompileError(f"method {name!r}: the .so takes {n_in} inputs but the program has "
                           f"{len(inputs)} tensor inputs; non-tensor inputs are not supported")
    in_spec, out_spec = _call_spec(ep, so_spec)
    method = MethodSpec(so=f"{name}.so", inputs=inputs, outputs=list(ep.graph_signature.user_outputs),
                        in_spec=in_spec, out_spec=out_spec, constants=[c for c, _ in consts])
    extern = _extern_kernels(name, so_tmp, workdir)
    shutil.copyfile(so_tmp, out / method.so)
    if extern is not None:
        # torch's runner finds it by the .so's stem and builds the proxy executor from it
        shutil.copyfile(extern, (out / method.so).with_suffix(".json"))
    return method, [data for _, data in consts]


def _extern_kernels(name: str, so: Path, workdir: Path) -> Path | None:
    """The extern-kernel JSON AOTI wrote for a method whose .so calls operators through the
    proxy executor (``torch.library`` custom ops, fallback kernels without a C shim), else None.

    AOTI writes it beside the wrapper source (``<key>.wrapper.json``) only when there are such
    nodes; the .so then imports the proxy executor's entry point. The two must agree: a .so
    that needs a proxy executor without the JSON would fail at its first call, so it is
    refused here."""
    import json

    import torch

    from .abi import PROXY_EXECUTOR_CALL
    from .elf import imports_symbol

    objs = sorted(workdir.rglob("custom_objs_config.json"))
    if objs:
        held = ", ".join(sorted(json.loads(objs[0].read_text()))) or "?"
        raise CompileError(f"method {name!r} holds torchbind objects ({held}); aoti_rt cannot run "
                           f"methods with torchbind constants: keep the object out of the exported "
                           f"method (pass tensors instead)")
    found = sorted(p for p in workdir.rglob("*.json") if p.with_suffix(".cpp").is_file())
    if len(found) > 1:
        raise CompileError(f"method {name!r}: AOTI wrote {len(found)} extern-kernel JSON files "
                           f"({', '.join(p.name for p in found)}) for one .so; report this with "
                           f"your torch version (torch {torch.__version__})")
    needs = imports_symbol(so, PROXY_EXECUTOR_CALL)
    if needs is False:
        return None            # nothing in the .so calls a proxy executor: it runs directly
    if not found and needs:
        raise CompileError(f"method {name!r}: {so.name} calls operators through AOTI's proxy "
                           f"executor but AOTI wrote no extern-kernel JSON for them, so it could "
                           f"not run; export it without custom ops, or report this with your "
                           f"torch version (torch {torch.__version__})")
    return found[0] if found else None


def _call_spec(ep: ExportedProgram, so_spec: tuple[str, str] | None) -> tuple[str | None, str | None]:
    """The method's (in_spec, out_spec) pytree specs as torch serialises them, else the .so's own."""
    import torch

    in_spec = out_spec = None
    try:
        in_spec = torch.utils._pytree.treespec_dumps(ep.call_spec.in_spec)
        out_spec = torch.utils._pytree.treespec_dumps(ep.call_spec.out_spec)
    except Exception:  # noqa: BLE001 - fall back to the .so's own spec
        if so_spec is not None:
            in_spec, out_spec = so_spec
    return in_spec, out_spec


class _WeightTable:
    """The manifest's WeightSpecs, one per weight id, and the STORE's tensors, one per digest."""

    def __init__(self) -> None:
        self.specs: dict[str, WeightSpec] = {}
        self._tensors: dict[str, Any] = {}        # store tensor name -> tensor
        self._by_digest: dict[str, str] = {}      # digest -> store tensor name
        self._taken: set[str] = set()             # store tensor names (safe_tensor_name's set)

    def bind(self, method: MethodSpec, data: list[bytes]) -> None:
        """Bind a method's constants (``data``: their storage bytes) to weights, adding new ones."""
        for c, storage in zip(method.constants, data):
            wid = weight_id(c.fqn, c.digest, c.mutable)
            if wid not in self.specs:
                self.specs[wid] = WeightSpec(id=wid, tensor=self._tensor_for(c, storage), offset=-1,
                                             nbytes=len(storage), digest=c.digest, mutable=c.mutable)
            if c.fqn not in self.specs[wid].fqns:
                self.specs[wid].fqns.append(c.fqn)
            c.weight = wid

    def _tensor_for(self, c: ConstantSpec, storage: bytes) -> str:
        """The name of the store tensor with ``c``'s digest, added (holding ``storage``) if new."""
        name = self._by_digest.get(c.digest)
        if name is None:
            name = self._by_digest[c.digest] = safe_tensor_name(c.fqn, self._taken)
            self._tensors[name] = _store_tensor(c, storage)
        return name

    def write_store(self, out: Path) -> None:
        """Write ``out/STORE`` and set each weight's offset from the header as written."""
        from safetensors.torch import save_file

        save_file(self._tensors, str(out / STORE), metadata={"format": "pt", "writer": f"aoti_rt {__version__}"})
        header = read_store_header(out / STORE)
        for w in self.specs.values():
            _, _, b, e = header.tensors[w.tensor]
            w.offset = b
            assert e - b == w.nbytes, (w.tensor, e - b, w.nbytes)


def _warn_divergent_fqns(methods: dict[str, MethodSpec]) -> None:
    """Warn (at the caller of :func:`compile`) for each FQN two methods bind to different weights."""
    for fqn, first, other in divergent_fqns(methods):
        warnings.warn(f"constant {fqn} differs between methods {first!r} and {other!r}; "
                      f"it is kept as two weights", stacklevel=4)


def _write_manifest(out: Path, manifest: Manifest) -> None:
    """Write ``out/MANIFEST`` through a rename, last, so that a bundle with a manifest is complete."""
    tmp_manifest = out / (MANIFEST + ".tmp")
    tmp_manifest.write_text(manifest.to_json())
    os.replace(tmp_manifest, out / MANIFEST)


def _store_tensor(c: ConstantSpec, data: bytes):
    """The tensor written to the store: typed if the constant covers its storage, else bytes."""
    import torch

    u8 = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    dtype = getattr(torch, c.dtype)
    numel = 1
    for s in c.shape:
        numel *= s
    contiguous = all(st == exp for st, exp in zip(c.stride, _contig_strides(c.shape)))
    if (c.storage_offset == 0 and contiguous and numel * dtype.itemsize == len(data)
            and c.dtype not in ("complex32", "uint16", "uint32", "uint64") and numel > 0):
        return u8.view(dtype).reshape(c.shape)
    return u8


def _contig_strides(shape: list[int]) -> list[int]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(s, 1)
    return out[::-1]


def _warn_aliased_examples(name: str, ep) -> None:
    """One tensor passed as two example inputs makes export treat the inputs as aliases: the
    compiled method then computes the wrong thing for distinct inputs (seen with torch 2.13)."""
    import torch

    leaves = torch.utils._pytree.tree_leaves(ep.example_inputs) if ep.example_inputs else []
    seen: dict[int, int] = {}
    for i, t in enumerate(leaves):
        if isinstance(t, torch.Tensor) and t.numel():
            j = seen.setdefault(t.untyped_storage().data_ptr(), i)
            if j != i:
                warnings.warn(f"method {name!r}: example inputs {j} and {i} share memory, so the exported "
                              f"program assumes they alias; export with distinct tensors (e.g. .clone())",
                              stacklevel=5)
