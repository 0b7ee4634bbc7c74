"""Compile one method: AOTInductor's compile of its ExportedProgram into a .so without its
weights, then the probe of that .so's constants (:func:`compile_method`).

It is the same work in every mode of :func:`aoti_rt.compile`: in the calling process, or in a
worker process (:mod:`aoti_rt.compile_workers`), independently of the other methods. Its timing
records (``log``) are the compiler's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bundle import FixedInput, InputSpec, MethodSpec
from .errors import AOTIError, AotiRtError, CompileError, NoShimError
from .probe import FileSpan, opaque_note, probe_method

if TYPE_CHECKING:
    from torch.export import ExportedProgram

#: DEBUG records of where a compile's time goes, each with ``phase`` ("aoti": AOTInductor's
#: compile of a method, "probe": aoti_rt reading its constants, "store": writing the bundle;
#: "warm-up": inductor's start-up before the first method (the zygote's with CUDA workers),
#: "isa": its vector-ISA checks; with worker processes also "save": a program written for a
#: worker, "load": the worker reading it (and mapping its tensors), "handback": a worker
#: writing its constants' bytes),
#: ``method`` (or None) and ``seconds`` as attributes; a worker's records are emitted here
#: when it hands back its result
log = logging.getLogger("aoti_rt.compiler")


@contextlib.contextmanager
def quiet_torch_deprecations():
    """Hide torch's own internal deprecation warnings (raised inside torch.export and AOTI,
    not by the caller's code) so that compile output shows progress, not noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..*deprecated.*", category=DeprecationWarning)
        yield


#: ops whose AOTI C shim arrived in a known torch release: op -> (release, what to do before it)
SHIM_SINCE = {"_grouped_mm": ("2.12", "for transformers' MoE experts, experts_implementation='batched_mm'")}
# g++ quotes the name with ASCII quotes in the C locale and with typographic ones (U+2018/U+2019)
# in a UTF-8 locale, as on the GPU host
_NO_SHIM = re.compile(r"aoti_torch_(cuda|cpu|xpu|mps)_(\w+)['\u2019] was not declared")


def missing_shim(compiler_output: str, torch_version: str) -> str | None:
    """The user's-terms reason when ``compiler_output`` (AOTI's C++ compile error) fails on a
    C shim this torch does not have: the op, the device, the torch that has it where known
    (:data:`SHIM_SINCE`) and the alternative; None for another compile error."""
    m = _NO_SHIM.search(compiler_output)
    if m is None:
        return None
    device, op = m.groups()
    known = SHIM_SINCE.get(op)
    where = (f"it arrives in torch {known[0]}; upgrade torch, or use {known[1]}" if known else
             "a later torch may have it (torchgen's fallback_ops list); upgrade torch or avoid the op")
    return (f"the program calls aten.{op}, which AOTInductor cannot compile for {device} on torch "
            f"{torch_version} (no C shim aoti_torch_{device}_{op}): {where}")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
    # The .so's own input checks would refuse a dynamic size below inductor's lower bound of 2
    # (its 0/1 specialisation) where export proved 1 (Dim(min=1)); the manifest's ranges are
    # checked before each call. A default: the caller may set it.
    defaults = {"aot_inductor.check_lowerbound": False}
    # Only pass what this torch knows (older releases lack some keys).
    def known(opts: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in opts.items()
                if (hasattr(cfg.aot_inductor, k.split(".", 1)[1]) if k.startswith("aot_inductor.")
                    else hasattr(cfg, k))}
    return {**known(defaults), **(extra or {}), **known(opts)}


@dataclass
class Job:
    """What compiling one method needs besides its ExportedProgram (picklable: a worker gets it)."""

    name: str
    workdir: Path            # AOTI's output and the worker's result files
    out: Path                # where the method's .so goes (the staging directory)
    device: str
    mutated: set[str]
    inputs: list[InputSpec]
    fixed: list[FixedInput]
    options: dict[str, Any]


def compile_method(job: Job, ep: ExportedProgram, keep_files: bool = False
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
        missing = missing_shim(str(e), torch.__version__)
        if missing is not None:
            raise NoShimError(f"method {name!r}: {missing}") from e
        raise CompileError(f"method {name!r}: AOTInductor failed to compile it ({type(e).__name__}: "
                           f"{first_line(e)}); see the chained error for where") from e
    timed("aoti", name, t0)
    t0 = time.perf_counter()
    blobs = sorted(aoti_dir.rglob("*_weights.blob"))
    try:
        probed = probe_method(so_tmp, blobs[0] if blobs else None, job.device, {prefix + f for f in job.mutated})
    except AOTIError as e:
        if "undefined symbol" not in str(e):
            raise
        # a kernel AOTI compiled but left out of the one self-contained .so a bundle needs
        # (aot_inductor.embed_kernel_binary): torch 2.11 does so for the folding graph on CUDA
        why = (" (with aot_inductor.use_runtime_constant_folding, whose folding kernels this torch does not "
               "embed: compile without it)" if job.options.get("aot_inductor.use_runtime_constant_folding") else "")
        raise CompileError(f"method {name!r}: AOTInductor built a .so that does not link{why}: "
                           f"{str(e).rpartition(': ')[2]}; or package the program with "
                           f"torch._inductor.aoti_compile_and_package and load the .pt2") from None
    if probed.kept:
        raise CompileError(f"method {name!r}: the .so holds constants aoti_rt cannot bind "
                           f"({opaque_note(probed.kept)}); compile without the inductor option freezing=True "
                           f"on the CPU (or package the program with torch._inductor.aoti_compile_and_package "
                           f"and load the .pt2, where the .so keeps them)")
    consts, so_spec, n_in = probed.constants, probed.call_spec, probed.num_inputs
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
    # for its parent (compile_workers._run_job)
    if keep_files:
        _keep_span_files((data for _, data in consts), job.workdir)
    shutil.rmtree(aoti_dir, ignore_errors=True)
    timed("probe", name, t0)
    return method, [data for _, data in consts]


def _keep_span_files(data, workdir: Path) -> None:
    """Move each file that spans in ``data`` read into ``workdir``, named ``span<i>.bin``: the
    names a worker hands back (:func:`aoti_rt.compile_workers._run_job`)."""
    files = {id(d.file): d.file for d in data if isinstance(d, FileSpan)}
    for i, f in enumerate(files.values()):
        target = workdir / f"span{i}.bin"
        os.replace(f.path, target)           # the open file is the same one
        f.path = target


def timed(phase: str, method: str | None, since: float) -> None:
    record(phase, method, time.perf_counter() - since)


def record(phase: str, method: str | None, seconds: float) -> None:
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
