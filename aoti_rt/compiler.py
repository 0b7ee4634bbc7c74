"""Compile a model's methods into one bundle with each distinct weight stored once.

Each method is compiled by AOTInductor into a shared object *without* its weights
(``package_constants_in_so=False``, ``binary_blob``). The .so is then probed once: its C ABI
gives each constant's internal name, FQN, dtype, kind and data size; torch's own AOTI runner,
loaded with the method's blob, gives the exact view (shape, stride, storage offset) and bytes
AOTI expects. Storages are keyed by content digest, so a weight used by several methods, or
tied under two FQNs, is written to the store once.

``_compile`` is the outline: export the programs, check every method's signature
(:func:`_signature`: tensors, fixed non-tensor inputs, dynamic ranges) before any AOTI work,
resolve the device, compile each method (:func:`_compile_method`: its .so and MethodSpec,
independent of the other methods; several at once in worker processes, :func:`_build_methods`),
bind its constants to weights in method order (:class:`_WeightTable`), write the store, then
the manifest, last. Everything is written into a staging directory inside the output
directory and moved into place only when the whole bundle is complete (:func:`compile`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import keyword
import logging
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .bundle import (FIXED_INPUT_TYPES, ITEMSIZE, MANIFEST, MAX_INT, MAX_NAME, ST_DTYPES, STORE, ConstantSpec,
                     DimRange, FixedInput, InputSpec, Manifest, MethodSpec, WeightSpec, contiguous_strides,
                     divergent_fqns, dtype_name, read_store_header, safe_tensor_name, weight_id)
from .errors import AotiRtError, CompileError
from .handoff import HandoffError, read_program, write_program
from .probe import FileSpan, OpenFile, probe_method

#: DEBUG records of where a compile's time goes, each with ``phase`` ("aoti": AOTInductor's
#: compile of a method, "probe": aoti_rt reading its constants, "store": writing the bundle;
#: with worker processes also "warm-up": the zygote's, "save": a program saved for a worker,
#: "load": a worker loading it, "handback": a worker writing its constants' bytes),
#: ``method`` (or None) and ``seconds`` as attributes; a worker's records are emitted here
#: when it hands back its result
log = logging.getLogger(__name__)

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


#: inductor options aoti_rt sets itself, and why a caller may not: the bundle depends on them
RESERVED_OPTIONS = {
    "aot_inductor.output_path": "aoti_rt chooses where each method's .so is written",
    "aot_inductor.package_constants_in_so": "the weights live once in the bundle's store, not in each .so",
    "aot_inductor.package_constants_on_disk_format": "aoti_rt reads AOTI's binary_blob to probe each constant",
    "aot_inductor.embed_kernel_binary": "a bundle holds one self-contained .so per method",
    "aot_inductor.package": "aoti_rt writes a bundle, not a .pt2 package",
    "aot_inductor.package_cpp_only": "a bundle needs compiled .so files, not C++ sources",
    "aot_inductor.use_runtime_constant_folding": "constants folded at run time cannot be shared",
    "always_keep_tensor_constants": "every weight stays a constant that can be shared and updated (inductor "
                                    "otherwise compiles tensors of up to 8 values into the code as literals)",
}


def _aoti_options(so_path: Path, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options for one method's ``aot_compile``: the caller's (checked by
    :func:`_check_options`) and the ones a bundle needs, which win."""
    import torch._inductor.config as cfg

    opts = {
        "aot_inductor.output_path": str(so_path),
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.package_constants_on_disk_format": "binary_blob",
        "aot_inductor.embed_kernel_binary": True,   # one self-contained .so per method
        # a weight of up to 8 values would otherwise become literals in the generated code:
        # no constant to share, and update_weights could not change what the method computes
        "always_keep_tensor_constants": True,
    }
    # Only pass what this torch knows (older releases lack some keys).
    ours = {k: v for k, v in opts.items()
            if (hasattr(cfg.aot_inductor, k.split(".", 1)[1]) if k.startswith("aot_inductor.") else hasattr(cfg, k))}
    return {**(extra or {}), **ours}


def _check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The caller's inductor options as a dict, refused (CompileError) if one is reserved to
    aoti_rt or unknown to this torch's ``torch._inductor.config``."""
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise CompileError("inductor_configs must be a mapping of option name (str) -> value, as "
                           "torch._inductor.aoti_compile_and_package takes")
    reserved = sorted(k for k in options if k in RESERVED_OPTIONS)
    if reserved:
        why = "; ".join(f"{k}: {RESERVED_OPTIONS[k]}" for k in reserved)
        raise CompileError(f"inductor_configs sets {', '.join(reserved)}, which aoti_rt controls ({why}); "
                           f"remove {'it' if len(reserved) == 1 else 'them'}")
    import torch._inductor.config as cfg

    known = cfg.get_config_copy()
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise CompileError(f"inductor_configs has options this torch does not know: {', '.join(unknown)}; "
                           f"see torch._inductor.config for the names (dotted, e.g. 'aot_inductor.metadata')")
    return dict(options)


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
        try:
            return torch.export.export(module, args, kwargs, dynamic_shapes=dyn)
        except Exception as e:  # noqa: BLE001 - torch's own errors, of many types
            raise CompileError(f"method {name!r}: torch.export.export failed ({type(e).__name__}: "
                               f"{_first_line(e)}); fix the module or its example inputs, or pass "
                               f"an ExportedProgram") from e
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
    """Where a program's tensors are: "cpu" or "cuda:N" (the GPU it was exported on)."""
    import torch

    tensors = [t for t in list(ep.state_dict.values()) + list(ep.constants.values()) if isinstance(t, torch.Tensor)]
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            tensors.append(val)
    devices = {"cpu" if t.device.type == "cpu" else f"{t.device.type}:{t.device.index or 0}"
               for t in tensors if t.device.type != "meta"}
    if len(devices) > 1:
        raise CompileError(f"the program mixes devices {sorted(devices)}; export it on one device")
    return devices.pop() if devices else "cpu"


def _mutated_fqns(ep) -> set[str]:
    from torch.export.graph_signature import OutputKind

    sig = ep.run_decompositions().graph_signature
    out = {s.target for s in sig.output_specs if s.kind == OutputKind.BUFFER_MUTATION}
    return out | set(sig.buffers_to_mutate.values())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _signature(name: str, ep: ExportedProgram) -> tuple[list[InputSpec], list[FixedInput]]:
    """A method's call signature, checked before any AOTI work: its tensor inputs (the .so's,
    with the ranges of their dynamic dimensions) and the non-tensor inputs export fixed.

    Raises:
        CompileError: an input is neither a tensor nor a value a bundle can record (a
            dynamic int, an object), or the program's inputs do not match its call spec.
    """
    import torch
    from torch.export.graph_signature import ConstantArgument, InputKind, TensorArgument

    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    user = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    inputs: list[InputSpec] = []
    fixed: list[FixedInput] = []
    for pos, spec in enumerate(user):
        arg = spec.arg
        arg_name = getattr(arg, "name", "") or f"#{pos}"
        if isinstance(arg, TensorArgument):
            val = nodes[arg.name].meta.get("val") if arg.name in nodes else None
            if not isinstance(val, torch.Tensor):
                raise CompileError(f"method {name!r}: input {arg_name!r} has no example tensor in the "
                                   f"exported graph; re-export the program")
            inputs.append(_input_spec(arg.name, val, ep.range_constraints))
        elif isinstance(arg, ConstantArgument):
            v = arg.value
            if (type(v) not in FIXED_INPUT_TYPES or (type(v) is float and not math.isfinite(v))
                    or (type(v) is int and not -MAX_INT < v < MAX_INT)
                    or (type(v) is str and len(v) > MAX_NAME)):
                raise CompileError(
                    f"method {name!r}: input {arg_name!r} is the {type(v).__name__} {v!r:.60}, which export "
                    f"fixed and a bundle cannot record (it keeps None, bools, ints, finite floats and "
                    f"strings); pass it as a tensor, or make it an attribute of the module")
            fixed.append(FixedInput(index=pos, name=arg_name, value=v))
        else:
            kind = type(arg).__name__.removesuffix("Argument")
            raise CompileError(
                f"method {name!r}: input {arg_name!r} is a {kind} (a dynamic non-tensor input); an "
                f"AOTInductor .so takes only tensors, so pass it as a tensor (e.g. torch.tensor(n)) or "
                f"export it as a fixed value (no dynamic_shapes entry for it)")
    leaves = ep.call_spec.in_spec.num_leaves if ep.call_spec.in_spec is not None else len(user)
    if leaves != len(user):
        raise CompileError(f"method {name!r}: its call spec has {leaves} inputs but the program {len(user)}; "
                           f"re-export it with torch.export.export")
    return inputs, fixed


def _input_spec(name: str, val, ranges) -> InputSpec:
    """A tensor input: dtype, shape (None for a dynamic dimension) and the dynamic ranges."""
    shape: list[int | None] = []
    dims: list[DimRange | None] = []
    for d in val.shape:
        expr = d.node.expr if hasattr(d, "node") else None
        if expr is None or expr.is_number:
            shape.append(int(d) if expr is None else int(expr))
            dims.append(None)
        else:
            shape.append(None)
            dims.append(_dim_range(expr, ranges))
    return InputSpec(name, dtype_name(val.dtype), shape, val.device.type,
                     dims if None in shape else None)


def _dim_range(expr, ranges) -> DimRange | None:
    """The sizes a dynamic dimension ``expr`` takes: ``step * s + offset`` over the range export
    proved for its one symbol ``s``; None for any other expression (AOTI's own check stays)."""
    import sympy
    from torch.utils._sympy.numbers import int_oo

    def bound(v) -> int | None:
        if v in (int_oo, -int_oo, sympy.oo, -sympy.oo) or not getattr(v, "is_integer", False):
            return None
        return int(v)

    if len(expr.free_symbols) != 1:
        return None
    (sym,) = expr.free_symbols
    try:
        poly = sympy.Poly(expr, sym)
    except Exception:  # noqa: BLE001 - not a polynomial (FloorDiv, Mod, ...)
        return None
    if poly.degree() != 1:
        return None
    step, offset = poly.all_coeffs()
    vr = ranges.get(sym)
    if vr is None or not (step.is_Integer and offset.is_Integer) or step < 1:
        return None
    lo, hi = bound(vr.lower), bound(vr.upper)
    if lo is None:
        return None
    lo_size = int(step) * lo + int(offset)
    hi_size = None if hi is None else int(step) * hi + int(offset)
    if not 0 <= lo_size < MAX_INT:
        return None
    if hi_size is not None and hi_size >= MAX_INT:
        hi_size = None
    return DimRange(min=lo_size, max=hi_size, step=int(step), symbol=str(sym))


def compile(programs: Mapping[str, Any], path: str | os.PathLike[str], *, device: str | None = None,
            overwrite: bool = False, progress: bool = True,
            inductor_configs: Mapping[str, Any] | None = None, jobs: int | None = None) -> Path:
    """Compile several methods of one model into an aoti_rt bundle at ``path``.

    Every method's signature is checked before any AOTI work: tensor inputs are recorded with
    the ranges of their dynamic dimensions (``torch.export.Dim``), which calls must respect;
    non-tensor inputs (``None``, bools, ints, floats, strings) are fixed to their example
    value, as export and AOTI specialise them, and calls must pass that value.

    Args:
        programs: method name -> ``torch.export.ExportedProgram``, or a ``(module, args)``,
            ``(module, args, kwargs)`` or ``(module, args, kwargs, dynamic_shapes)`` tuple.
        path: the bundle directory to write (must not exist, or be empty, unless ``overwrite``).
        device: "cpu" or "cuda[:N]"; default: the device the programs were exported on.
        overwrite: replace an existing bundle directory (only once the new one is complete).
        progress: show a progress bar (methods take seconds each to compile).
        inductor_configs: inductor options for every method's AOTI compile, as
            ``torch._inductor.aoti_compile_and_package`` takes them (dotted names, e.g.
            ``{"max_autotune": True}``); those in :data:`RESERVED_OPTIONS` are aoti_rt's.
        jobs: how many methods to compile at once, each in a worker process that inherits a
            warm inductor (a fork of this process for CPU programs; for CUDA programs a fork of
            a fresh interpreter that warmed up without CUDA, and which maps the program's
            tensors from this process, :mod:`aoti_rt.handoff`). Default: for CPU programs one
            per core, at most one per method; for CUDA programs 1, one after another in this
            process (see ``_default_jobs``: workers are faster for a process's first compile).
            A CUDA method that calls an op a fresh interpreter may not have (a custom op, a
            user Triton kernel) makes the compile run in this process.

    Returns:
        The bundle directory. It is written in a staging directory inside ``path`` and moved
        into place, manifest last, once complete: a failed compile leaves ``path`` as it was
        (a directory the call created is removed).

    Raises:
        CompileError: bad arguments, an input a bundle cannot express, a reserved or unknown
            inductor option, an export or AOTI compile that failed, an unwritable ``path``.
    """
    if not isinstance(programs, Mapping) or not programs:
        raise CompileError("programs must be a non-empty mapping of method name -> ExportedProgram")
    for name in programs:
        _check_name(name)
    options = _check_options(inductor_configs)
    jobs = _check_jobs(jobs, len(programs))
    out = Path(path)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise CompileError(f"{out} exists and is not an empty directory; pass overwrite=True to replace it")
    created = _first_missing(out)
    stage = None
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=out))
        except OSError as e:
            raise CompileError(f"cannot write the bundle to {out}: {e}") from e
        try:
            with quiet_torch_deprecations():
                _compile(programs, stage, device, progress, options, jobs)
            _publish(stage, out, overwrite)
        except OSError as e:            # writing the bundle (AOTI's own errors are wrapped below)
            raise CompileError(f"cannot write the bundle to {out}: {e}; free space or fix the "
                               f"permissions and compile again") from e
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return out


#: the staging directory's name starts so (a dot: no bundle file name can start with one)
_STAGE_PREFIX = ".aoti_rt-partial-"


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (what mkdir would create)."""
    p, missing = path.absolute(), None
    while not os.path.lexists(p):
        missing, p = p, p.parent
    return missing


def _publish(stage: Path, out: Path, overwrite: bool) -> None:
    """Move the complete bundle from ``stage`` into ``out``, its manifest last; with
    ``overwrite``, what ``out`` held before goes first."""
    if overwrite:
        for child in out.iterdir():
            if child != stage:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for p in sorted(stage.iterdir(), key=lambda p: p.name == MANIFEST):
        os.replace(p, out / p.name)
    stage.rmdir()


def _check_jobs(jobs: int | None, n_methods: int) -> int | None:
    """``jobs`` checked and capped at the method count; None (the default) is decided once the
    device is known (see :func:`_default_jobs`)."""
    if jobs is None:
        return None
    if type(jobs) is not int or jobs < 1:
        raise CompileError(f"jobs must be a positive int (methods compiled at once), not {jobs!r}")
    return min(jobs, n_methods)


def _default_jobs(device: str, n_methods: int) -> int:
    """One worker per core for CPU programs (forks of this process, which share its warm-up).
    CUDA programs compile one after another in this process unless ``jobs`` asks otherwise.
    Measured on the H200 host on a 2 GiB pair, each row a fresh process (README, "Compile
    time"): jobs=2 (a warm zygote's workers, mapping the tensors) took 46.9 s and jobs=1
    51.6 s, beside stock's 93.6 s. The workers win only once per process: each compile starts
    a zygote that pays inductor's start-up again (~25 s there), which a process that has
    compiled before no longer pays in itself; they also cost a CUDA context each."""
    if device != "cpu":
        return 1
    return max(1, min(n_methods, os.cpu_count() or 1))


def _compile(programs: Mapping[str, Any], out: Path, device: str | None, progress: bool,
             options: dict[str, Any], jobs: int | None) -> Path:
    """The work of :func:`compile`, once its arguments and output directory are checked."""
    import torch

    eps = _export_programs(programs)
    signatures = {name: _signature(name, ep) for name, ep in eps.items()}   # before any AOTI work
    device = _resolve_device(eps, device)
    if jobs is None:
        jobs = _default_jobs(device, len(eps))
    mutated = set().union(*(_mutated_fqns(ep) for ep in eps.values()))
    with _Progress(len(eps) + 1, progress) as bar, tempfile.TemporaryDirectory(prefix="aoti_rt_") as tmp:
        todo = [_Job(name, Path(tmp) / name, out, device, mutated, *signatures[name], options)
                for name in eps]
        built = _build_methods(eps, todo, jobs, bar)
        methods: dict[str, MethodSpec] = {}
        weights = _WeightTable()
        for job in todo:                         # in method order: it names the store tensors
            method, data = built.pop(job.name)
            weights.bind(method, data)
            methods[job.name] = method
        _warn_divergent_fqns(methods)
        _warn_unknown_kinds(methods)
        bar.phase("writing the weight store")
        t0 = time.perf_counter()
        weights.write_store(out)
        _write_manifest(out, Manifest(device=device, methods=methods, weights=weights.specs, store=STORE,
                                      torch_version=torch.__version__, aoti_rt_version=__version__))
        _timed("store", None, t0)
        bar.step()
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
    exported = devices.pop()                 # "cpu" or "cuda:N": the probe runs there too
    dev_type = torch.device(exported).type
    if device is None:
        return exported
    if torch.device(device).type != dev_type:
        raise CompileError(f"device={device!r} but the programs were exported on {dev_type}; "
                           f"export them on {device}")
    if torch.device(device).type == "cuda" and torch.device(device).index is None:
        return exported
    return device


@dataclass
class _Job:
    """What compiling one method needs besides its ExportedProgram (picklable: a worker gets it)."""

    name: str
    workdir: Path            # AOTI's output and the worker's result files
    out: Path                # where the method's .so goes (the staging directory)
    device: str
    mutated: set[str]
    inputs: list[InputSpec]
    fixed: list[FixedInput]
    options: dict[str, Any]


def _compile_method(job: _Job, ep: ExportedProgram, keep_files: bool = False
                    ) -> tuple[MethodSpec, list[bytes | FileSpan]]:
    """Compile one method to ``job.out/<name>.so``, independently of the others: its
    MethodSpec and its constants' storage bytes (spans of AOTI's blob, or bytes).
    ``keep_files``: move the files the spans read into ``job.workdir`` (a worker hands them
    to its parent by name) rather than unlink them."""
    import torch

    name = job.name
    aoti_dir = job.workdir / "aoti"             # AOTI's output: the .so, the blob, its sources
    aoti_dir.mkdir(parents=True, exist_ok=True)
    args, kwargs = ep.example_inputs if ep.example_inputs is not None else ((), {})
    module, prefix = _rooted(ep.module())
    t0 = time.perf_counter()
    try:
        so_tmp = Path(torch._inductor.aot_compile(module, args, kwargs,
                                                  options=_aoti_options(aoti_dir / f"{name}.so", job.options)))
    except AotiRtError:
        raise
    except Exception as e:  # noqa: BLE001 - inductor's errors are of many types
        raise CompileError(f"method {name!r}: AOTInductor failed to compile it ({type(e).__name__}: "
                           f"{_first_line(e)}); see the chained error for where") from e
    _timed("aoti", name, t0)
    t0 = time.perf_counter()
    blobs = sorted(aoti_dir.rglob("*_weights.blob"))
    consts, so_spec, n_in = probe_method(so_tmp, blobs[0] if blobs else None, job.device,
                                         {prefix + f for f in job.mutated})
    for c, _ in consts:
        c.fqn = c.fqn.removeprefix(prefix)
    if len(job.inputs) != n_in:
        raise CompileError(f"method {name!r}: the .so takes {n_in} tensor inputs but the program has "
                           f"{len(job.inputs)}; this torch's AOTI does not take the inputs export "
                           f"describes, so aoti_rt cannot call it")
    in_spec, out_spec = _call_spec(ep, so_spec)
    method = MethodSpec(so=f"{name}.so", inputs=job.inputs, outputs=list(ep.graph_signature.user_outputs),
                        in_spec=in_spec, out_spec=out_spec, constants=[c for c, _ in consts],
                        fixed_inputs=job.fixed)
    extern = _extern_kernels(name, so_tmp, aoti_dir)
    shutil.copyfile(so_tmp, job.out / method.so)
    if extern is not None:
        # torch's runner finds it by the .so's stem and builds the proxy executor from it
        shutil.copyfile(extern, (job.out / method.so).with_suffix(".json"))
    # the constants' bytes are spans of the blob (probe_method), open, which outlives its
    # name: unlinked now, the file is not written back behind the store's write (dirty pages of
    # a GB-size blob slowed that write 4x) and is gone once the spans are; a worker keeps it
    # for its parent (_run_job)
    if keep_files:
        _keep_span_files((data for _, data in consts), job.workdir)
    shutil.rmtree(aoti_dir, ignore_errors=True)
    _timed("probe", name, t0)
    return method, [data for _, data in consts]


def _timed(phase: str, method: str | None, since: float) -> None:
    _record(phase, method, time.perf_counter() - since)


def _record(phase: str, method: str | None, seconds: float) -> None:
    log.debug("%s%s: %.2f s", phase, f" {method}" if method else "", seconds,
              extra={"phase": phase, "method": method, "seconds": seconds})


#: the attribute :func:`_rooted` puts a module under
_ROOT = "aoti_rt_root"


def _rooted(gm: Any) -> tuple[Any, str]:
    """``(module, prefix)`` to compile: ``gm`` itself (prefix ``""``) unless a weight's FQN
    starts with a digit (a top-level ``nn.Sequential`` or ``nn.ModuleList``). Inductor names
    such a constant ``constant_0_weight`` and then fails to find it among the parameters, so
    the .so reports no kind for it and the runtime cannot share it beyond its bundle; under an
    attribute (``aoti_rt_root.0.weight``) the names match. The caller strips the prefix from
    the FQNs the .so reports."""
    import copy

    import torch

    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)] + \
            [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    if not any(n[:1].isdigit() for n in names):
        return gm, ""
    if hasattr(gm, "_guards_fn"):                # as aot_compile does: it would not find it below
        node = next(iter(gm.graph.find_nodes(op="call_module", target="_guards_fn")))
        gm.graph.erase_node(node)
        delattr(gm, "_guards_fn")
        gm.recompile()
    root = torch.nn.Module()
    setattr(root, _ROOT, gm)
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            node.target = f"{_ROOT}.{node.target}"
    return torch.fx.GraphModule(root, graph), _ROOT + "."


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


# -- compiling methods at once -----------------------------------------------------------------
#
# What overlaps: inductor's lowering is Python (it holds the GIL and patches global state, e.g.
# torch.fx.traceback's node meta, so two lowerings in threads of one process break each other),
# and on the CPU most of a method's time is g++ on its generated C++ (one process, one core).
# So each method compiles in a worker process, all of it (lowering, C++ build, probe).
#
# How a worker starts: a fork, which inherits a warm inductor instead of paying a process's
# start-up again. A first AOTI compile in a process pays inductor's imports and the C++
# compiler's vector-ISA checks (g++ builds, a process per ISA that loads the result): on the
# H200 host about 40 s of a 52 s first compile, where the same process's second method took
# 12 s. For CPU programs the worker is a fork of this process, warmed once here (nothing to
# serialise). CUDA cannot be forked once initialised, and this process exported CUDA programs;
# so CUDA workers are forks of a *zygote*: a fresh interpreter started at once, which warms up
# without touching CUDA (its warm-up overlaps this process saving the programs with
# torch.export.save), then forks a worker per method; each worker initialises CUDA itself and
# loads its program. A worker hands back its MethodSpec (pickle) and its constants' bytes: the
# AOTI blob they lie in, kept under its work directory, which the parent opens (no copy); the
# parent binds the methods in their order, so a bundle is the same whatever finished first.

#: "fork" or "zygote" to force how workers start (tests); None: fork for CPU programs
WORKER_START: str | None = None


def _build_methods(eps: Mapping[str, ExportedProgram], todo: list[_Job], jobs: int,
                   bar: _Progress) -> dict[str, tuple[MethodSpec, list[Any]]]:
    """Each method's MethodSpec and constant bytes: in this process one after another
    (``jobs == 1`` or one method), else in up to ``jobs`` worker processes at once."""
    serial = jobs == 1 or len(todo) == 1
    zygote = prebuild = None
    if serial or _use_fork(todo[0].device):   # this process compiles, or its forks do
        t0 = time.perf_counter()
        isa = _warm_up_inductor(todo[0].options)    # the first compile's start-up, its ISA checks at once
        _timed("warm-up", None, t0)
        _record("isa", None, isa)
    else:
        local = {job.name: op for job in todo if (op := _op_of_this_process(eps[job.name]))}
        if local:
            serial = True
            log.info("compiling in this process, one method after another: %s", "; ".join(
                f"method {m} calls {op}, which a worker (a fresh interpreter) may not have" for m, op in local.items()))
            t0 = time.perf_counter()
            _record("isa", None, _warm_up_inductor(todo[0].options))
            _timed("warm-up", None, t0)
        else:
            zygote = _Zygote(todo[0])             # warms up while the programs are handed over
            prebuild = _prebuild_isa_checks(todo[0].options)
    if serial:
        built = {}
        for job in todo:
            bar.phase(f"compiling {job.name}")
            built[job.name] = _compile_method(job, eps[job.name])
            bar.step()
        return built
    pending = list(todo)
    whole: set[str] = set()                   # methods whose tensors a worker could not map
    running: dict[str, _Worker] = {}
    built = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                job = pending.pop(0)
                running[job.name] = _start_fork(job, eps[job.name]) if zygote is None else zygote.start(
                    job, eps[job.name], whole=job.name in whole)
                bar.phase(f"compiling {', '.join(running)}")
            time.sleep(0.05)
            for name, w in list(running.items()):
                if w.poll() is None:
                    continue
                del running[name]
                try:
                    built[name] = w.result()
                except HandoffError as e:
                    if name in whole:
                        raise CompileError(f"method {name!r}: {e}") from e
                    log.info("method %s: a worker could not map this process's tensors (%s); handing "
                             "its program over saved whole", name, e)
                    whole.add(name)
                    pending.insert(0, dataclasses.replace(w.job, workdir=w.job.workdir.with_name(name + ".whole")))
                    continue
                bar.step()
                if running:
                    bar.phase(f"compiling {', '.join(running)}")
    finally:
        for w in running.values():
            w.kill()
        if zygote is not None:
            zygote.close()
        if prebuild is not None:
            prebuild.join()
    return built


def _warm_up_inductor(options: Mapping[str, Any] | None = None) -> float:
    """What every first AOTI compile in a process does (import inductor's modules, check the
    CPU's vector ISAs with the C++ compiler), done once here so forked workers inherit it
    instead of each repeating it. ``options``: the caller's inductor options, in force as they
    will be for the compiles (the checks use the C++ compiler they name; a process keeps its
    first results). It does not initialise CUDA. Best effort: a torch without these modules
    skips it. Returns the seconds the ISA checks took (a timing record)."""
    t0 = t1 = time.perf_counter()
    with contextlib.suppress(Exception):
        import importlib

        import torch._inductor.config as cfg
        from torch._inductor import cpu_vec_isa

        importlib.import_module("torch._inductor.compile_fx")
        t1 = time.perf_counter()
        _check_vec_isas(cpu_vec_isa, options)
        with cfg.patch(dict(options or {})):
            cpu_vec_isa.pick_vec_isa()
    return time.perf_counter() - t1 if t1 > t0 else 0.0


def _op_of_this_process(ep: ExportedProgram) -> str | None:
    """The first op ``ep`` calls that a fresh interpreter may not have, or None: an operator
    outside torch's own ``aten`` and ``prims`` (a ``torch.library.custom_op``, an extension's
    op: registered by code this process ran) or a user Triton kernel (kept in this process's
    kernel table). A zygote's worker could not load such a program."""
    import torch

    for gm in ep.graph_module.modules():                  # higher-order ops' bodies too
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, torch._ops.OpOverload) and target.namespace not in ("aten", "prims"):
                return str(target)
            if isinstance(target, torch._ops.HigherOrderOperator) and "triton" in target.name():
                return target.name()
    return None


def _prebuild_isa_checks(options: Mapping[str, Any] | None) -> threading.Thread:
    """Start the ISA checks' builds in this process, beside the zygote's start-up (its imports
    take ~11 s on the H200 host): they land in the inductor cache the zygote shares, so its own
    checks wait for them (inductor's file lock per check) and then only load the results."""
    def run() -> None:
        with contextlib.suppress(Exception):
            from torch._inductor import cpu_vec_isa

            _check_vec_isas(cpu_vec_isa, options)

    t = threading.Thread(target=run, name="aoti_rt-isa-prebuild", daemon=True)
    t.start()
    return t


def _check_vec_isas(cpu_vec_isa: Any, options: Mapping[str, Any] | None = None) -> None:
    """Run inductor's check of each vector ISA this CPU has at once, in threads. Each check is
    a g++ build and a process that loads the result (both wait outside the GIL), and torch
    runs them one after another in a process's first compile; their results are cached per
    ISA, so pick_vec_isa then only reads them. On this repository's 2-core machine the three
    ISAs of its CPU took 2.8 s at once against 5.8 s in turn (an empty inductor cache).
    ``options`` are in force in each thread (inductor's config patches are per thread)."""
    import platform
    from concurrent.futures import ThreadPoolExecutor

    import torch._inductor.config as cfg

    if platform.machine() not in ("x86_64", "AMD64") or not hasattr(cpu_vec_isa, "x86_isa_checker"):
        return

    def check(isa: Any) -> bool:
        with cfg.patch(dict(options or {})):
            return bool(isa)

    flags = cpu_vec_isa.x86_isa_checker()
    isas = [isa for isa in getattr(cpu_vec_isa, "supported_vec_isa_list", ())
            if all(flag in flags for flag in str(isa).split())]
    if len(isas) > 1:
        with ThreadPoolExecutor(len(isas), thread_name_prefix="aoti_rt-isa") as pool:
            list(pool.map(check, isas))


def _use_fork(device: str) -> bool:
    if WORKER_START is not None:
        return WORKER_START == "fork"
    import torch

    return (device == "cpu" and sys.platform == "linux" and hasattr(os, "fork")
            and not torch.cuda.is_initialized())


class _Worker:
    """One method compiling in a worker process; :meth:`result` reads what it handed back.
    A fork of this process is waited for here; a zygote's worker through its zygote."""

    def __init__(self, job: _Job, pid: int | None = None, zygote: _Zygote | None = None):
        self.job = job
        self.pid = pid
        self.zygote = zygote
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            if self.zygote is not None:
                self.returncode = self.zygote.exit_status(self.job)
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        """Stop it (a failure elsewhere, or an interrupt) and reap it."""
        if self.poll() is not None:
            return
        if self.zygote is not None:
            self.zygote.kill(self.job)           # the zygote reaps it
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)

    def result(self) -> tuple[MethodSpec, list[Any]]:
        """The worker's MethodSpec and constant bytes (spans of the files it kept), or its error."""
        wd, name = self.job.workdir, self.job.name
        if self.returncode == 0 and (wd / "result.pkl").is_file():
            with open(wd / "result.pkl", "rb") as f:
                method, spans, records = pickle.load(f)
            for phase, m, seconds in records:
                _record(phase, m, seconds)
            return method, _open_spans(wd, spans)
        if (wd / "error.pkl").is_file():
            with open(wd / "error.pkl", "rb") as f:
                kind, message, tb = pickle.load(f)
            if kind == "CompileError":
                raise CompileError(message)
            if kind == "HandoffError":
                raise HandoffError(message)
            raise CompileError(f"method {name!r}: compiling it in a worker process failed with {kind}: "
                               f"{message}; compile(..., jobs=1) raises it in this process. The worker's "
                               f"traceback:\n{tb}")
        raise CompileError(f"method {name!r}: the worker process compiling it died (exit status "
                           f"{self.returncode}) without a result; compile(..., jobs=1) compiles in this process")


class _Records(logging.Handler):
    """A worker's timing records, handed back to the parent with its result."""

    def __init__(self, records: list[tuple[str, str | None, float]]):
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, r: logging.LogRecord) -> None:
        if hasattr(r, "phase"):
            self.records.append((r.phase, r.method, r.seconds))


def _keep_span_files(data, workdir: Path) -> None:
    """Move each file that spans in ``data`` read into ``workdir``, named ``span<i>.bin``: the
    names a worker hands back (:func:`_run_job`)."""
    files = {id(d.file): d.file for d in data if isinstance(d, FileSpan)}
    for i, f in enumerate(files.values()):
        target = workdir / f"span{i}.bin"
        os.replace(f.path, target)           # the open file is the same one
        f.path = target


def _open_spans(workdir: Path, spans: list[tuple[str, int, int]]) -> list[FileSpan]:
    """A worker's constants' bytes (file name in ``workdir``, offset, size) as spans of those
    files, open; each file is then unlinked (it lives while its spans do)."""
    files: dict[str, OpenFile] = {}
    for name, _, _ in spans:
        if name not in files:
            files[name] = OpenFile(workdir / name)
    for f in files.values():
        f.path.unlink()                      # no writeback behind the store's write
    return [FileSpan(files[name], offset, n) for name, offset, n in spans]


def _run_job(job: _Job, ep: ExportedProgram | Path) -> None:
    """In a worker: compile the method (``ep``, or the program saved there) and write its
    result files (renamed into place last). Constants read from AOTI's blob are handed back
    as spans of that file, kept in the work directory; bytes copied from the device are
    written to ``data.bin``."""
    records: list[tuple[str, str | None, float]] = []
    handler = _Records(records)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        if isinstance(ep, Path):
            t0 = time.perf_counter()
            ep = read_program(ep)
            _timed("load", job.name, t0)
        method, data = _compile_method(job, ep, keep_files=True)
        t0 = time.perf_counter()
        spans, offset = [], 0
        with open(job.workdir / "data.bin", "wb") as f:
            for d in data:
                if isinstance(d, FileSpan):
                    spans.append((d.file.path.name, d.offset, d.nbytes))
                else:
                    f.write(d)
                    spans.append(("data.bin", offset, len(d)))
                    offset += len(d)
        _timed("handback", job.name, t0)
    finally:
        log.removeHandler(handler)
    with open(job.workdir / "result.tmp", "wb") as f:
        pickle.dump((method, spans, records), f)
    os.replace(job.workdir / "result.tmp", job.workdir / "result.pkl")


def _write_error(job: _Job, e: BaseException) -> None:
    with contextlib.suppress(Exception):
        with open(job.workdir / "error.pkl", "wb") as f:
            pickle.dump((type(e).__name__, str(e), traceback.format_exc()), f)


def _start_fork(job: _Job, ep: ExportedProgram) -> _Worker:
    job.workdir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Python 3.12+ warns on fork() with threads (the progress bar's); the worker only
        # compiles, and touches no lock those threads hold
        warnings.filterwarnings("ignore", message=r".*multi-threaded.*fork", category=DeprecationWarning)
        pid = os.fork()
    if pid == 0:                                 # the worker: never returns
        code = 1
        try:
            _run_job(job, ep)
            code = 0
        except BaseException as e:  # noqa: BLE001 - handed to the parent
            _write_error(job, e)
        finally:
            os._exit(code)
    return _Worker(job, pid=pid)


class _Zygote:
    """A fresh interpreter that warms inductor up once, without initialising CUDA, and then
    forks a worker per method (:func:`_zygote_main`). The parent writes a job's work directory
    as a line to its stdin; it answers with JSON lines on its stdout: ``{"pid": ..., "dir": ...}``
    when it forked a job's worker, ``{"exit": code, "dir": ...}`` when the worker ended. Closing
    its stdin ends it once its workers have; it kills them if this process goes first."""

    def __init__(self, first: _Job) -> None:
        warm = first.workdir.parent / "warm-up.pkl"    # the caller's inductor options, for its warm-up
        try:
            with open(warm, "wb") as f:
                pickle.dump(first.options, f)
        except (pickle.PicklingError, TypeError, AttributeError):
            warm.unlink(missing_ok=True)          # the job's own pickling says what is wrong
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])       # the aoti_rt this process runs
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        if "PYTORCH_NVML_BASED_CUDA_CHECK" not in env:        # torch.cuda.is_available() without cuInit;
            env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"        # its workers drop it (_zygote_main)
            env[_NVML_SET] = "1"
        code = "import sys; from aoti_rt.compiler import _zygote_main; sys.exit(_zygote_main(sys.argv[1]))"
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code, str(warm)], env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE)
        except OSError as e:
            raise CompileError(f"cannot start a worker process ({e}); compile with jobs=1") from e
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._buf = b""
        self._pids: dict[str, int] = {}
        self._exits: dict[str, int] = {}

    def start(self, job: _Job, ep: ExportedProgram, whole: bool = False) -> _Worker:
        """Write ``ep`` (its CUDA tensors as IPC handles, or ``whole``) and ``job`` in the job's
        work directory and have a worker compile it."""
        import torch

        job.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if whole:
            torch.export.save(ep, job.workdir / "program.pt2")
        else:
            write_program(ep, job.workdir / "program.pt2", job.mutated)
        _timed("save", job.name, t0)
        try:
            with open(job.workdir / "job.pkl", "wb") as f:
                pickle.dump(job, f)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise CompileError(f"method {job.name!r}: an inductor option cannot be handed to a worker "
                               f"process ({e}); compile with jobs=1") from e
        try:
            self.proc.stdin.write(os.fsencode(job.workdir) + b"\n")
            self.proc.stdin.flush()
        except OSError:
            pass                                  # it died: exit_status says so
        return _Worker(job, zygote=self)

    def _read(self) -> None:
        while True:
            try:
                chunk = self.proc.stdout.read()
            except OSError:
                chunk = None
            if not chunk:
                break
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            msg = json.loads(line)
            if "warm" in msg:
                _record("warm-up", None, msg["warm"])
                _record("isa", None, msg.get("isa", 0.0))
            elif "pid" in msg:
                self._pids[msg["dir"]] = msg["pid"]
            else:
                self._exits[msg["dir"]] = msg["exit"]

    def exit_status(self, job: _Job) -> int | None:
        """The exit status of ``job``'s worker, None while it runs (-1: the zygote died)."""
        self._read()
        key = os.fsdecode(job.workdir)
        if key in self._exits:
            return self._exits[key]
        if self.proc.poll() is not None:
            self._read()
            return self._exits.get(key, -1)
        return None

    def kill(self, job: _Job) -> None:
        self._read()
        pid = self._pids.get(os.fsdecode(job.workdir))
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def close(self) -> None:
        """End it: once its workers have ended, or at once (with them) within 10 s."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


#: set in the zygote's environment when aoti_rt (not the caller) set PYTORCH_NVML_BASED_CUDA_CHECK
_NVML_SET = "AOTI_RT_ZYGOTE_SET_NVML_CHECK"


def _zygote_main(warm: str) -> int:
    """The zygote's loop (see :class:`_Zygote`): warm up (with the inductor options pickled in
    ``warm``, if it exists), then fork a worker per line read."""
    import select

    import torch

    proto = os.dup(1)                      # the answers; anything else printed goes to stderr
    os.dup2(2, 1)
    t0 = time.perf_counter()
    options = None
    with contextlib.suppress(OSError, pickle.UnpicklingError, EOFError):
        with open(warm, "rb") as f:
            options = pickle.load(f)
    isa = _warm_up_inductor(options)
    # a fork of a process that initialised CUDA cannot use it; were the warm-up ever to, the
    # workers are fresh interpreters instead (they pay the start-up, but work)
    fork = not torch.cuda.is_initialized()
    workers: dict[int, str] = {}           # pid -> work directory
    procs: dict[str, subprocess.Popen] = {}
    buf, stdin_open = b"", True

    def send(msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the parent gone: its stdin's end kills the workers
            os.write(proto, json.dumps(msg).encode() + b"\n")

    send({"warm": time.perf_counter() - t0, "isa": isa})

    while stdin_open or workers or procs:
        ready = select.select([0], [], [], 0.05)[0] if stdin_open else []
        if ready:
            chunk = os.read(0, 65536)
            if not chunk:                  # the parent closed it, or died: workers still
                stdin_open = False         # running are not wanted (a failure elsewhere)
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                for p in procs.values():
                    p.kill()
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                workdir = os.fsdecode(line)
                if fork:
                    pid = os.fork()
                    if pid == 0:
                        code = 1
                        try:
                            os.close(proto)
                            os.close(0)
                            if os.environ.pop(_NVML_SET, None):   # the worker as the caller's env has it
                                os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
                            code = _worker_main(workdir)
                        finally:
                            sys.stderr.flush()
                            os._exit(code)
                    workers[pid] = workdir
                else:
                    code = "import sys; from aoti_rt.compiler import _worker_main; sys.exit(_worker_main(sys.argv[1]))"
                    p = subprocess.Popen([sys.executable, "-c", code, workdir], stdin=subprocess.DEVNULL)
                    procs[workdir], pid = p, p.pid
                send({"pid": pid, "dir": workdir})
        for pid in list(workers):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                send({"exit": os.waitstatus_to_exitcode(status), "dir": workers.pop(pid)})
        for workdir, p in list(procs.items()):
            if p.poll() is not None:
                send({"exit": p.returncode, "dir": workdir})
                del procs[workdir]
    return 0


def _worker_main(workdir: str) -> int:
    """A worker's entry point (forked by the zygote): load the job and the saved program, run it."""
    with open(Path(workdir) / "job.pkl", "rb") as f:
        job = pickle.load(f)
    try:
        with quiet_torch_deprecations():
            _run_job(job, Path(workdir) / "program.pt2")
        return 0
    except BaseException as e:  # noqa: BLE001 - handed to the parent
        _write_error(job, e)
        return 1


class _Progress:
    """The compile's progress bar: a step per method compiled and one for the store; while a
    step runs, its phase and the seconds it has taken are redrawn twice a second, so the bar
    moves during a long AOTI compile too."""

    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="aoti_rt compile", unit="step", disable=not enabled)
        self._text = ""
        self._since = time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if enabled:
            self._thread = threading.Thread(target=self._tick, name="aoti_rt-progress", daemon=True)
            self._thread.start()

    def phase(self, text: str) -> None:
        self._text, self._since = text, time.monotonic()
        self._show()

    def step(self) -> None:
        self.bar.update(1)

    def _show(self) -> None:
        if not self.bar.disable:
            self.bar.set_postfix_str(f"{self._text} ({time.monotonic() - self._since:.0f} s)")

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self._show()

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.bar.close()


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
        self._entries: list[tuple[str, str, list[int], Any]] = []   # store tensor: name, dtype, shape, bytes
        self._by_digest: dict[str, str] = {}      # digest -> store tensor name
        self._taken: set[str] = set()             # store tensor names (safe_tensor_name's set)

    def bind(self, method: MethodSpec, data: list[Any]) -> None:
        """Bind a method's constants (``data``: their storage bytes) to weights, adding new ones."""
        for c, storage in zip(method.constants, data):
            wid = weight_id(c.fqn, c.digest, c.mutable)
            if wid not in self.specs:
                self.specs[wid] = WeightSpec(id=wid, tensor=self._tensor_for(c, storage), offset=-1,
                                             nbytes=len(storage), digest=c.digest, mutable=c.mutable)
            if c.fqn not in self.specs[wid].fqns:
                self.specs[wid].fqns.append(c.fqn)
            c.weight = wid

    def _tensor_for(self, c: ConstantSpec, storage: Any) -> str:
        """The name of the store tensor with ``c``'s digest, added (holding ``storage``) if new."""
        name = self._by_digest.get(c.digest)
        if name is None:
            name = self._by_digest[c.digest] = safe_tensor_name(c.fqn, self._taken)
            self._entries.append((name, *_store_layout(c, len(storage)), storage))
        return name

    def write_store(self, out: Path) -> None:
        """Write ``out/STORE`` and set each weight's offset from the header as written."""
        _write_safetensors(out / STORE, self._entries, {"format": "pt", "writer": f"aoti_rt {__version__}"})
        self._entries = []                        # the bytes are on disk: let them go
        header = read_store_header(out / STORE)
        for w in self.specs.values():
            _, _, b, e = header.tensors[w.tensor]
            w.offset = b
            assert e - b == w.nbytes, (w.tensor, e - b, w.nbytes)


_ST_ITEMSIZE = {st: ITEMSIZE[dt] for dt, st in ST_DTYPES.items()}


def _store_layout(c: ConstantSpec, nbytes: int) -> tuple[str, list[int]]:
    """How the store holds a storage: typed (its dtype and shape) if the constant covers it
    contiguously and safetensors names the dtype, else as ``nbytes`` U8 bytes."""
    numel = math.prod(c.shape)
    if (c.storage_offset == 0 and c.dtype in ST_DTYPES and numel > 0
            and numel * ITEMSIZE[c.dtype] == nbytes and c.stride == contiguous_strides(c.shape)):
        return ST_DTYPES[c.dtype], list(c.shape)
    return "U8", [nbytes]


def _write_safetensors(path: Path, entries: list[tuple[str, str, list[int], Any]],
                       metadata: dict[str, str]) -> None:
    """Write a safetensors file straight from the entries' buffers (no copy of the bytes), with
    the permissions the umask gives, through a rename. Wider dtypes first, so every typed
    tensor starts at a multiple of its item size, as the safetensors library orders them."""
    order = sorted(entries, key=lambda e: -_ST_ITEMSIZE[e[1]])      # stable: method order within a size
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, data in order:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for *_, data in order:
            if isinstance(data, FileSpan):
                _copy_span(data, f)
            else:
                f.write(data)
    os.replace(tmp, path)


def _copy_span(span: FileSpan, f) -> None:
    """Append ``span``'s bytes to the open file ``f``: copied by the kernel where it can
    (``copy_file_range``: no pass through this process), else read and written in chunks."""
    f.flush()
    at, done = f.tell(), 0
    kernel = hasattr(os, "copy_file_range")
    while done < span.nbytes:
        n = min(span.nbytes - done, 1 << 30)
        got = 0
        if kernel:
            try:
                got = os.copy_file_range(span.file.fd, f.fileno(), n, span.offset + done, at + done)
            except OSError:                  # another filesystem, an old kernel: copy by hand
                kernel = False
        if got <= 0:
            chunk = span.file.pread(min(n, 64 << 20), span.offset + done)
            got = os.pwrite(f.fileno(), chunk, at + done)
        done += got
    f.seek(at + span.nbytes)


def _warn_divergent_fqns(methods: dict[str, MethodSpec]) -> None:
    """Warn (at the caller of :func:`compile`) for each FQN two methods bind to different weights."""
    for fqn, first, other in divergent_fqns(methods):
        warnings.warn(f"constant {fqn} differs between methods {first!r} and {other!r}; "
                      f"it is kept as two weights", stacklevel=4)


def _warn_unknown_kinds(methods: dict[str, MethodSpec]) -> None:
    """Warn (at the caller of :func:`compile`) where AOTI reports weights of no known kind:
    the runtime shares a weight beyond its own bundle (another bundle, another process) only
    when the .so calls it a parameter or tensor constant, never a buffer it might write."""
    unknown = sorted({c.fqn for m in methods.values() for c in m.constants if c.kind == "unknown" and not c.mutable})
    if unknown:
        warnings.warn(f"AOTI reports no kind for {len(unknown)} weights ({', '.join(unknown[:3])}"
                      f"{', ...' if len(unknown) > 3 else ''}), so they are shared within this bundle only: "
                      f"not with other bundles, not across processes (share=). Inductor matches constant "
                      f"names to parameter and buffer names to find the kind; aoti_rt already compiles a "
                      f"module whose FQNs start with a digit under an attribute for this, so this is "
                      f"another mismatch: please report it with the FQNs", stacklevel=4)


def _write_manifest(out: Path, manifest: Manifest) -> None:
    """Write ``out/MANIFEST`` through a rename, last, so that a bundle with a manifest is complete."""
    tmp_manifest = out / (MANIFEST + ".tmp")
    tmp_manifest.write_text(manifest.to_json())
    os.replace(tmp_manifest, out / MANIFEST)


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
