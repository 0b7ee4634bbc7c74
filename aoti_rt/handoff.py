"""How a compile worker gets its method's ExportedProgram from the process that exported it.

A worker is another process, so the program travels through a file. Saved whole
(``torch.export.save``), a 2 GiB CUDA program took 10 s to write and 4 s to read back on the
H200 host, and the worker then held a second copy of its weights on the device. So a CUDA
program goes without its tensors' bytes instead (:func:`write_program`): it is saved with its
CUDA parameters, buffers and constants on ``meta``, and beside it goes, for each device
allocation they live in, a legacy CUDA IPC handle (``cuIpcGetMemHandle``). The worker
(:func:`read_program`) maps those allocations (``cuIpcOpenMemHandle``) and rebuilds each
tensor over the exporting process's own memory: no bytes are copied or written.

Why legacy IPC here (the serving share uses ``cuMemCreate`` + POSIX file descriptors): the
tensors are PyTorch's, allocated by its caching allocator with ``cudaMalloc``, which legacy IPC
exports as they are; the exporter outlives the worker (the compile waits for it, or kills
it), and the driver unmaps everything when the worker exits, so there are no lifetimes to
count. Each tensor keeps its own storage (the allocation's bytes from its storage's start,
its storage's size), as AOTI serialises a constant's whole storage. Buffers the program
mutates are copied in the worker, so nothing the worker does can write the exporter's state.

The handles are written into the compile's private temporary directory (mode 0700), which
goes when the compile ends.

Where IPC cannot be used (a CPU program, tensors in expandable segments, no legacy IPC on the
platform), the program is saved whole, as before; a worker that cannot map the handles says
so with :class:`HandoffError`, and the compile hands that method over again, saved whole.
"""

from __future__ import annotations

import copy
import ctypes
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AotiRtError

if TYPE_CHECKING:
    from torch.export import ExportedProgram

#: the file beside a saved program that lists its tensors' IPC handles
HANDLES_SUFFIX = ".ipc"
_HANDLE_BYTES = 64


class HandoffError(AotiRtError):
    """A worker could not map the exporting process's memory (legacy CUDA IPC)."""


@dataclass(frozen=True)
class _SharedTensor:
    """One CUDA tensor of the program, as the worker rebuilds it."""

    table: str                  # "state_dict" or "constants"
    name: str
    allocation: int             # index into the handles
    start: int                  # its storage's first byte, from the allocation's base
    storage_bytes: int
    dtype: str                  # torch dtype name, e.g. "bfloat16"
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    parameter: bool
    requires_grad: bool
    private: bool               # a buffer the program mutates: the worker copies it


def _driver():
    from cuda.bindings import driver

    return driver


def _ok(result: Any, what: str) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise HandoffError(f"{what} failed (CUresult {int(err)})")
    return rest[0] if len(rest) == 1 else rest


def write_program(ep: ExportedProgram, path: Path, mutated: set[str], *, whole: bool = False) -> bool:
    """Save ``ep`` at ``path`` for a worker: with its CUDA tensors as IPC handles (True), or,
    where that cannot be done or ``whole`` asks it (a worker could not map them), whole
    (False). ``mutated``: FQNs of the buffers it mutates."""
    import torch

    handles_path = Path(str(path) + HANDLES_SUFFIX)
    handles_path.unlink(missing_ok=True)
    shared = _export_tensors(ep, mutated) if not whole and _cuda_tensors(ep) else None
    if shared is not None:
        tensors, handles = shared
        light = copy.copy(ep)                  # the same graph, its CUDA tensors on meta
        light._state_dict = _on_meta(ep.state_dict, "state_dict", tensors)
        light._constants = _on_meta(ep.constants, "constants", tensors)
        try:
            torch.export.save(light, path)
        except Exception:  # noqa: BLE001 - a program this torch cannot save with meta tensors
            shared = None
    if shared is None:
        torch.export.save(ep, path)
        return False
    with open(handles_path, "wb") as f:
        pickle.dump((handles, tensors), f)
    return True


def read_program(path: Path) -> ExportedProgram:
    """The program :func:`write_program` saved at ``path``, its CUDA tensors mapped from the
    exporting process's memory where it saved handles. Raises :class:`HandoffError` when
    they cannot be mapped."""
    import torch

    ep = torch.export.load(path)
    handles_path = Path(str(path) + HANDLES_SUFFIX)
    if not handles_path.is_file():
        return ep
    with open(handles_path, "rb") as f:
        handles, tensors = pickle.load(f)
    rebuilt = _map_tensors(handles, tensors)
    state, consts = dict(ep.state_dict), dict(ep.constants)
    for t in tensors:
        (state if t.table == "state_dict" else consts)[t.name] = rebuilt[t.name, t.table]
    ep._state_dict, ep._constants = state, consts
    return ep


def _cuda_tensors(ep: ExportedProgram) -> bool:
    import torch

    if not (hasattr(ep, "_state_dict") and hasattr(ep, "_constants")):
        return False                          # a torch whose ExportedProgram keeps them elsewhere
    values = [*ep.state_dict.values(), *ep.constants.values()]
    return any(isinstance(v, torch.Tensor) and v.is_cuda for v in values)


def _export_tensors(ep: ExportedProgram, mutated: set[str]
                    ) -> tuple[list[_SharedTensor], list[tuple[int, bytes]]] | None:
    """Each CUDA tensor of ``ep`` as a :class:`_SharedTensor`, and each allocation they live in
    as ``(device index, IPC handle)``; None where one cannot be exported."""
    import torch

    drv = _driver()
    allocations: dict[int, int] = {}           # allocation base -> index into handles
    handles: list[tuple[int, bytes]] = []
    tensors: list[_SharedTensor] = []
    for table, values in (("state_dict", ep.state_dict), ("constants", ep.constants)):
        for name, v in values.items():
            if not (isinstance(v, torch.Tensor) and v.is_cuda):
                continue
            if type(v) not in (torch.Tensor, torch.nn.Parameter) or v.is_sparse or v.is_quantized:
                return None                    # a subclass or layout the worker cannot rebuild
            storage = v.untyped_storage()
            ptr = storage.data_ptr()
            if storage.nbytes() == 0:
                continue                       # nothing to share: saved as it is
            try:
                with torch.cuda.device(v.device):
                    base, _ = _ok(drv.cuMemGetAddressRange(ptr), "cuMemGetAddressRange")
                    base = int(base)
                    if base not in allocations:
                        h = _ok(drv.cuIpcGetMemHandle(base), "cuIpcGetMemHandle")
                        allocations[base] = len(handles)
                        handles.append((v.device.index, ctypes.string_at(h.getPtr(), _HANDLE_BYTES)))
            except (HandoffError, RuntimeError):
                return None                    # expandable segments, or no legacy IPC here
            tensors.append(_SharedTensor(
                table, name, allocations[base], ptr - base, storage.nbytes(), str(v.dtype).removeprefix("torch."),
                tuple(v.shape), tuple(v.stride()), v.storage_offset(), isinstance(v, torch.nn.Parameter),
                v.requires_grad, table == "state_dict" and name in mutated))
    return tensors, handles


def _on_meta(values: dict[str, Any], table: str, shared: list[_SharedTensor]) -> dict[str, Any]:
    import torch

    names = {t.name for t in shared if t.table == table}
    out = {}
    for name, v in values.items():
        if name in names:
            m = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
            v = torch.nn.Parameter(m, requires_grad=v.requires_grad) if isinstance(v, torch.nn.Parameter) else m
        out[name] = v
    return out


class _Mapped:
    """Bytes of a mapped allocation as a CUDA array (``torch.as_tensor`` wraps it, no copy)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


def _map_tensors(handles: list[tuple[int, bytes]], tensors: list[_SharedTensor]) -> dict[tuple[str, str], Any]:
    """The tensors, over the exporting process's allocations mapped into this one."""
    import torch

    drv = _driver()
    bases: dict[int, int] = {}
    current: set[int] = set()                    # devices whose primary context is current here
    storages: dict[tuple[int, int, bool], Any] = {}   # (allocation, start, private) -> storage: tied stay tied
    out = {}
    for t in tensors:
        index, raw = handles[t.allocation]
        device = torch.device("cuda", index)
        if t.allocation not in bases:
            if index not in current:
                torch.cuda.set_device(device)
                torch.cuda.synchronize(device)  # the device's primary context, current here
                current.add(index)
            h = drv.CUipcMemHandle()
            ctypes.memmove(h.getPtr(), raw, _HANDLE_BYTES)
            flags = drv.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
            bases[t.allocation] = int(_ok(drv.cuIpcOpenMemHandle(h, flags),
                                          "mapping the exporting process's memory (cuIpcOpenMemHandle)"))
        key = (t.allocation, t.start, t.private)
        if key not in storages:
            u8 = torch.as_tensor(_Mapped(bases[t.allocation] + t.start, t.storage_bytes), device=device)
            storages[key] = (u8.clone() if t.private else u8).untyped_storage()   # the same storage size
        dtype = getattr(torch, t.dtype)
        v = torch.empty(0, dtype=dtype, device=device).set_(storages[key], t.storage_offset, t.size, t.stride)
        if t.parameter:
            v = torch.nn.Parameter(v, requires_grad=t.requires_grad)
        out[t.name, t.table] = v
    return out
