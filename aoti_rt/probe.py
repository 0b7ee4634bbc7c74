"""Describe a compiled AOTI ``.so``'s constants: the one place aoti_rt runs torch's own AOTI
runner.

The C ABI gives each constant's internal name, FQN, dtype, kind and data size, but not its
shape, stride or storage offset (they are compiled into the .so). :func:`probe_method` loads
the method once the stock way (``AOTIModelContainerRunner*`` + ``binary_blob``) and reads the
exact views AOTI holds. A constant's bytes are a read-only view of the ``binary_blob`` the
runner loaded them from (AOTI's slot for it, :func:`aoti_rt.abi.blob_layout`), or of the same
layout inside the .so for weights packaged in it; the start, middle and end of each are checked
against what the runner loaded. They are not copied back from the device: for a 2 GiB CUDA
method that copy and its host first-touch cost seconds. Only a method whose weights are in
neither place has its bytes copied from the runner's tensors. The compiler probes each method
it builds; ``load_method`` probes a stock artifact once and caches the result beside it.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from pathlib import Path

from .abi import blob_layout
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


def _storage_u8(t):
    """A tensor's whole storage as a flat uint8 tensor on its device (no copy)."""
    import torch

    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def storage_bytes(t) -> bytes:
    """The bytes of a tensor's whole storage, on the host."""
    import ctypes

    u8 = _storage_u8(t).cpu()
    return ctypes.string_at(u8.data_ptr(), u8.numel()) if u8.numel() else b""


#: bytes compared at each end and in the middle of a constant taken from the blob
_SPOT = 64


def _same_as_loaded(t, data: memoryview) -> bool:
    """Whether the runner's tensor ``t`` holds ``data`` at its start, middle and end: a layout
    that put another constant's bytes in this slot differs there (three small copies, not the
    whole storage back from the device)."""
    import torch

    n = len(data)
    if n == 0:
        return True
    u8 = _storage_u8(t)
    spans = sorted({(a, min(n, a + _SPOT)) for a in (0, max(0, n // 2 - _SPOT // 2), max(0, n - _SPOT))})
    got = torch.cat([u8[a:b] for a, b in spans]).cpu().numpy().tobytes()
    return got == b"".join(bytes(data[a:b]) for a, b in spans)


def _file_view(path: Path, start: int = 0, length: int | None = None) -> memoryview | None:
    """Bytes ``start`` to ``start + length`` (default: to the end) of ``path``, mapped
    read-only; None for no bytes."""
    size = path.stat().st_size
    end = size if length is None else min(size, start + length)
    if end <= start:
        return None
    with open(path, "rb") as f:
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))[start:end]


def probe_method(so_path: Path, blob: Path | None, device: str, mutated: set[str],
                 embedded: Callable[[int], tuple[int, int]] | None = None):
    """Describe a compiled method's constants: ([(ConstantSpec, storage bytes)], call spec, n_in).

    The bytes are read-only views of ``blob`` where the blob holds them (see the module's
    docstring), else ``bytes`` copied from the runner's tensors. For a .so that keeps its
    weights inside, ``embedded(need)`` gives ``(file offset, size)`` of that blob in the .so
    (``need``: the sum of the constants' data sizes), so they are views of the .so instead.
    """
    from .abi import describe

    d = describe(so_path, device)
    infos, spec, n_in = d.constants, d.call_spec, d.num_inputs
    if blob is not None:
        view, source = _file_view(blob), blob.name
    elif embedded is not None and infos:
        view, source = _file_view(so_path, *embedded(sum(i.data_size for i in infos))), f"{so_path.name}'s weights"
    else:
        view, source = None, ""
    runner, tensors = _probe(so_path, blob, device)
    slots, _ = blob_layout([info.data_size for info in infos])
    out = []
    try:
        for info, slot in zip(infos, slots):
            if info.folded:
                raise CompileError(f"{so_path.name}: constant {info.fqn} is folded at run time; aoti_rt "
                                   f"does not support aot_inductor.use_runtime_constant_folding")
            t = tensors.get(info.fqn)
            if t is None:
                t = tensors.get(info.name)
            if t is None:
                raise CompileError(f"{so_path.name}: AOTI reports constant {info.fqn} but holds no tensor for it")
            nbytes = t.untyped_storage().nbytes()
            if view is not None and nbytes <= info.data_size and slot + nbytes <= len(view):
                data = view[slot:slot + nbytes]       # the bytes the runner loaded this constant from
                if not _same_as_loaded(t, data):
                    raise CompileError(f"{so_path.name}: constant {info.fqn} is not at byte {slot} of "
                                       f"{source}, where aoti_rt's reading of AOTI's blob layout puts it; "
                                       f"this torch's layout differs: please report it with the torch version")
            else:
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
