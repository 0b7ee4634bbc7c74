"""Compile a model's methods into one bundle with each distinct weight stored once.

Each method is compiled by AOTInductor into a shared object *without* its weights
(``package_constants_in_so=False``, ``binary_blob``). The .so is then probed once: its C ABI
gives each constant's internal name, FQN, dtype, kind and data size; torch's own AOTI runner,
loaded with the method's blob, gives the exact view (shape, stride, storage offset) and bytes
AOTI expects. Storages are keyed by content digest, so a weight used by several methods, or
tied under two FQNs, is written to the store once.

``_compile`` is the outline: export the programs, check every method's signature
(:func:`_signature`: tensors, fixed non-tensor inputs, dynamic ranges) before any AOTI work,
resolve the device, compile each method (:func:`aoti_rt.method_compiler.compile_method`: its .so
and MethodSpec, independent of the other methods; several at once in worker processes,
:func:`aoti_rt.compile_workers.build_methods`),
bind its constants to weights in method order (:class:`_WeightTable`), write the store, then
the manifest, last. Everything is written into a staging directory inside the output
directory and moved into place only when the whole bundle is complete (:func:`compile`).
"""

from __future__ import annotations

import json
import keyword
import math
import os
import re
import shutil
import struct
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .bundle import (FIXED_INPUT_TYPES, ITEMSIZE, MANIFEST, MAX_INT, MAX_NAME, ST_DTYPES, STORE, ConstantSpec,
                     DimRange, FixedInput, InputSpec, Manifest, MethodSpec, WeightSpec, contiguous_strides,
                     divergent_fqns, dtype_name, read_store_header, safe_tensor_name, weight_id)
from . import compile_resume
from .compile_workers import build_methods
from .errors import CompileError
from .method_compiler import Job, first_line, quiet_torch_deprecations, timed
from .probe import FileSpan


if TYPE_CHECKING:
    from torch.export import ExportedProgram

_METHOD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
#: names a method may not take: they are attributes of Model
RESERVED = {"close", "methods", "device", "bundle", "manifest", "memory", "weight", "state",
            "path"}



#: inductor options aoti_rt sets itself, and why a caller may not: the bundle depends on them
RESERVED_OPTIONS = {
    "aot_inductor.output_path": "aoti_rt chooses where each method's .so is written",
    "aot_inductor.package_constants_in_so": "the weights live once in the bundle's store, not in each .so",
    "aot_inductor.package_constants_on_disk_format": "aoti_rt reads AOTI's binary_blob to probe each constant",
    "aot_inductor.embed_kernel_binary": "a bundle holds one self-contained .so per method",
    "aot_inductor.package": "aoti_rt writes a bundle, not a .pt2 package",
    "aot_inductor.package_cpp_only": "a bundle needs compiled .so files, not C++ sources",
    "always_keep_tensor_constants": "every weight stays a constant that can be shared and updated (inductor "
                                    "otherwise compiles tensors of up to 8 values into the code as literals)",
}



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
                               f"{first_line(e)}); fix the module or its example inputs, or pass "
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


def check_target(path: "str | os.PathLike[str]", overwrite: bool, resume: bool = False) -> Path:
    """``path`` as a Path a bundle may be written to: absent, an empty directory (with
    ``resume``, one holding only the stage of an earlier compile), or (with ``overwrite``) a
    directory; else a :class:`CompileError`."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or (
            any(p.name != compile_resume.STAGE or not resume for p in out.iterdir()) and not overwrite)):
        raise CompileError(f"{out} exists and is not an empty directory; pass overwrite=True to replace it")
    return out


def compile(programs: Mapping[str, Any], path: str | os.PathLike[str], *, device: str | None = None,
            overwrite: bool = False, progress: bool = True,
            inductor_configs: Mapping[str, Any] | None = None, jobs: int | None = None,
            resume: bool = False) -> Path:
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
            user Triton kernel), or whose weights are tensor subclasses (torchao's quantized
            weights), makes the compile run in this process.
        resume: keep each method as it is compiled, and take the methods an earlier
            ``resume=True`` compile into ``path`` finished, where their program, weights and
            options are unchanged (:mod:`aoti_rt.compile_resume`): a compile that failed or was
            stopped goes on from where it was. The work in progress stays in
            ``path/.aoti_rt-partial-resume`` until the bundle is complete.

    Returns:
        The bundle directory. It is written in a staging directory inside ``path`` and moved
        into place, manifest last, once complete: a failed compile leaves ``path`` as it was
        (a directory the call created is removed), or with ``resume`` holding only the stage.

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
    out = check_target(path, overwrite, resume)
    created = _first_missing(out)
    stage = None
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
            stage = compile_resume.open_stage(out) if resume else Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=out))
        except OSError as e:
            raise CompileError(f"cannot write the bundle to {out}: {e}") from e
        try:
            with quiet_torch_deprecations():
                _compile(programs, stage, device, progress, options, jobs, resume)
            _publish(stage, out, overwrite)
        except OSError as e:            # writing the bundle (AOTI's own errors are wrapped below)
            raise CompileError(f"cannot write the bundle to {out}: {e}; free space or fix the "
                               f"permissions and compile again") from e
    except BaseException:
        if not resume:                       # a resumable compile keeps its stage for the next
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
             options: dict[str, Any], jobs: int | None, resume: bool = False) -> Path:
    """The work of :func:`compile`, once its arguments and output directory are checked."""
    import torch

    eps = _export_programs(programs)
    signatures = {name: _signature(name, ep) for name, ep in eps.items()}   # before any AOTI work
    device = _resolve_device(eps, device)
    if jobs is None:
        jobs = _default_jobs(device, len(eps))
    mutated = set().union(*(_mutated_fqns(ep) for ep in eps.values()))
    if not resume:
        _check_disk(eps, len(eps), out, Path(tempfile.gettempdir()))
    with _Progress(len(eps) + 1, progress) as bar, tempfile.TemporaryDirectory(prefix="aoti_rt_") as tmp:
        work = out / "work" if resume else Path(tmp)     # a resumable compile keeps its methods
        todo = [Job(name, work / name, out, device, mutated, *signatures[name], options) for name in eps]
        built = compile_resume.resumed(eps, todo, bar) if resume else {}
        if resume:                               # what the finished methods hold is on disk already
            _check_disk(eps, len(eps) - len(built), out, out)
        built.update(build_methods(eps, [j for j in todo if j.name not in built], jobs, bar, keep=resume)
                     if len(built) < len(todo) else {})
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
        if resume:                               # the store holds the bytes the work held
            shutil.rmtree(work, ignore_errors=True)
        _write_manifest(out, Manifest(device=device, methods=methods, weights=weights.specs, store=STORE,
                                      torch_version=torch.__version__, aoti_rt_version=__version__))
        timed("store", None, t0)
        bar.step()
    return out


def _check_disk(eps: Mapping[str, ExportedProgram], to_compile: int, out: Path, tmp: Path) -> None:
    """Refuse, before any AOTI work, a compile the disks cannot hold: AOTI writes the
    constants of each of the ``to_compile`` methods (up to all the weights, W) to a file in
    ``tmp``, all held until the store (W) is written into ``out``. Advisory: a size it cannot
    estimate is not refused."""
    try:
        total = _weight_bytes(eps)
        need: dict[int, list[Any]] = {}          # per file system: bytes, a folder on it
        for path, n in ((tmp, to_compile * total), (out, total)):
            need.setdefault(os.stat(path).st_dev, [0, path])[0] += n
        short = [(n, p, shutil.disk_usage(p).free) for n, p in need.values()]
    except Exception:  # noqa: BLE001 - an estimate that fails never stops a compile
        return
    for n, path, free in short:
        if free < n:
            raise CompileError(
                f"compiling needs about {n / 1e9:.1f} GB free on the disk of {path} and it has {free / 1e9:.1f} GB "
                f"(AOTI writes the constants of each of the {to_compile} methods it compiles, up to "
                f"{total / 1e9:.1f} GB, to {tmp}, held until the store is written into the bundle); free space, or "
                f"set TMPDIR to a larger disk (a resumable compile keeps them in the bundle's path)")


def _weight_bytes(eps: Mapping[str, ExportedProgram]) -> int:
    """The bytes of the distinct storages of the programs' weights and constants."""
    import torch

    seen: set[tuple[int, str]] = set()
    total = 0
    todo = [t for ep in eps.values() for t in (*ep.state_dict.values(), *ep.constants.values())]
    while todo:
        t = todo.pop()
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        if hasattr(type(t), "__tensor_flatten__"):          # a tensor subclass: its inner tensors
            todo.extend(getattr(t, a) for a in t.__tensor_flatten__()[0])
            continue
        s = t.untyped_storage()
        key = (s.data_ptr(), str(t.device))
        if key not in seen:
            seen.add(key)
            total += s.nbytes()
    return total


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
    when the .so calls it a parameter or tensor constant, never a buffer it might write. Scalars
    (0-d: lifted Python numbers such as transformers' cache indices) are a few bytes, whose
    sharing saves nothing: no warning for them."""
    unknown = sorted({c.fqn for m in methods.values() for c in m.constants
                      if c.kind == "unknown" and not c.mutable and len(c.shape) > 0})
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
