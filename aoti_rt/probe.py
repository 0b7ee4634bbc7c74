"""Describe a compiled AOTI ``.so``'s constants: the one place aoti_rt runs torch's own AOTI
runner.

The C ABI gives each constant's internal name, FQN, dtype, kind and data size, but not its
shape, stride or storage offset (they are compiled into the .so). :func:`probe_method` loads
the method once the stock way (``AOTIModelContainerRunner*`` + ``binary_blob``) and reads the
exact views and bytes AOTI holds. The compiler probes each method it builds; ``load_method``
probes a stock artifact once and caches the result beside it.
"""

from __future__ import annotations

from pathlib import Path

from .bundle import ConstantSpec, dtype_name
from .digest import weight_digest
from .errors import CompileError


def _probe(so_path: Path, blob: Path, device: str):
    """Load the method the stock way in torch's runner; return fqn -> tensor as AOTI holds it."""
    import torch

    from .device import device_guard

    if device == "cpu":
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(so_path), 1)
    else:
        with device_guard(device):      # the runner's container makes its device current
            runner = torch._C._aoti.AOTIModelContainerRunnerCuda(str(so_path), 1, device)
    with device_guard(device):
        if blob is not None and blob.stat().st_size > 0:    # a method without weights has an empty blob
            runner.update_constant_buffer_from_blob(str(blob))
        tensors = dict(runner.extract_constants_map(False))
    return runner, tensors


def storage_bytes(t) -> bytes:
    """The bytes of a tensor's whole storage, on the host."""
    import ctypes

    import torch

    u8 = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage()).cpu()
    return ctypes.string_at(u8.data_ptr(), u8.numel()) if u8.numel() else b""


def probe_method(so_path: Path, blob: Path | None, device: str, mutated: set[str]):
    """Describe a compiled method's constants: ([(ConstantSpec, storage bytes)], call spec, n_in)."""
    from .abi import describe

    d = describe(so_path, device)
    infos, spec, n_in = d.constants, d.call_spec, d.num_inputs
    runner, tensors = _probe(so_path, blob, device)
    out = []
    try:
        for info in infos:
            if info.folded:
                raise CompileError(f"{so_path.name}: constant {info.fqn} is folded at run time; aoti_rt "
                                   f"does not support aot_inductor.use_runtime_constant_folding")
            t = tensors.get(info.fqn)
            if t is None:
                t = tensors.get(info.name)
            if t is None:
                raise CompileError(f"{so_path.name}: AOTI reports constant {info.fqn} but holds no tensor for it")
            data = storage_bytes(t)
            digest = weight_digest(data)
            out.append((ConstantSpec(
                name=info.name, fqn=info.fqn, dtype=dtype_name(t.dtype), shape=list(t.shape),
                stride=list(t.stride()), storage_offset=t.storage_offset(),
                data_size=info.data_size or len(data), kind=info.kind,
                mutable=info.fqn in mutated, digest=digest, weight=""), data))
    finally:
        from .device import device_guard

        with device_guard(device):      # the container frees its weights on their device
            del runner, tensors
    return out, spec, n_in
