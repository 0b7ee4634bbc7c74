"""How a method's buffers reach its AOTI container: one binder, chosen when the method is built.

* :class:`PairsBinder`: the direct path. One ``UpdateUserManagedConstantBufferPairs`` call
  binds every buffer (:meth:`aoti_rt._bind.BindPlan.bind`); calls go through aoti_rt's own Run.
* :class:`RunnerBinder`: a .so that calls operators through AOTI's proxy executor (custom ops,
  fallback kernels: ``<method>.json`` beside it) runs through torch's own runner, which builds
  the executor; the same buffers are bound to the runner's container.
* a .so without the Pairs entry point keeps its weights private to AOTI
  (:func:`bind_private`): loaded from a blob laid out with the .so's sizes, or, for a .so that
  embeds them, the copy ``CreateWithDevice`` made.

A :class:`MethodFiles` describes what a method is built from (its .so, the kernel folder passed
to ``CreateWithDevice``, whether the .so embeds its weights, a folder lock held while open), so
that bundles, packages and stock artifacts build the same :class:`aoti_rt.runtime.Method`.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _bind, _memory, device as _device
from .abi import SharedObject, blob_layout, first_run, torch_shim
from .bundle import ConstantSpec, MethodSpec, is_regular_file
from .store import open_regular, pread_all
from .errors import AOTIError, BundleError


@dataclass(frozen=True)
class MethodFiles:
    """What a method is built from, besides its spec and weights.

    Attributes:
        so: the method's shared object.
        kernel_dir: the folder AOTI's ``CreateWithDevice`` is given (where a CUDA .so finds its
            kernel binaries), or None: the .so's own folder.
        embedded: the .so embeds its weights (a ``.pt2`` built with the constants in the .so):
            ``CreateWithDevice`` loads AOTI's private copy, which is freed where the .so can
            swap constant buffers, else kept (and counted).
        hold: a file descriptor (a lock on ``kernel_dir``) the method closes when it closes,
            or None: AOTI reads kernels from the folder lazily, so it is held while open.
        private_blob: without the Pairs entry point, AOTI may load a private copy of weights
            stored outside the .so from a blob built from the store (a bundle, a stock
            artifact); False: such a .so is refused (a package's weights are bound by Pairs only).
        compiled_views: the constants' views are the ones the .so was compiled with, read from
            torch's own runner (a package's), not an untrusted manifest's claim: a view starting
            off a 16-byte boundary is bound as AOTI binds it (:class:`aoti_rt._bind.BindPlan`).
    """

    so: Path
    kernel_dir: Path | None = None
    embedded: bool = False
    hold: int | None = None
    private_blob: bool = True
    compiled_views: bool = False


def extern_kernels(so: SharedObject, name: str, pairs: bool) -> Path | None:
    """The extern-kernel JSON beside a .so that calls operators through a proxy executor
    (``torch.library`` custom ops, fallback kernels), else None; a .so that needs one
    without it is refused here rather than at its first call.

    torch's runner looks for exactly ``<so stem>.json``, so that is where it must be. A .so
    that does not import the proxy executor's entry point runs directly, JSON or not."""
    path = so.path.with_suffix(".json")
    needs = so.calls_proxy_executor
    if needs is False:
        return None
    if not is_regular_file(path):
        if needs:
            raise BundleError(f"method {name!r}: {so.path.name} calls operators (custom ops or "
                              f"fallback kernels) through AOTI's proxy executor, which is built from "
                              f"the extern-kernel JSON AOTI wrote with it; {path.name} is missing beside "
                              f"it. Recompile the bundle with this aoti_rt (it keeps that file), or put "
                              f"the <key>.wrapper.json from the AOTI build there as {path.name}")
        return None
    if not pairs:
        raise AOTIError(f"method {name!r}: {so.path.name} calls operators through a proxy "
                        f"executor but lacks UpdateUserManagedConstantBufferPairs, so its weights "
                        f"cannot be shared; recompile it with torch >= 2.10")
    return path


class Binder:
    """Binds a method's buffers (one per constant, manifest order) to its container."""

    #: torch's runner runs the calls (else aoti_rt's direct Run on the container handle)
    runner: Any = None

    def bind(self, buffers: Sequence[_memory.Buffer]) -> None:
        raise NotImplementedError


class PairsBinder(Binder):
    """The direct path: one ``UpdateUserManagedConstantBufferPairs`` call per bind."""

    def __init__(self, so: SharedObject, handle: int, plan: _bind.BindPlan, rt: _device.DeviceRuntime):
        self.so, self.handle, self.plan, self.rt = so, handle, plan, rt

    def bind(self, buffers: Sequence[_memory.Buffer]) -> None:
        torch_shim()
        self.plan.bind(self.so.abi, self.handle, list(buffers), 1 if self.rt.is_cuda else 0, self.rt.index)


class RunnerBinder(Binder):
    """Binds through torch's own AOTI runner, which builds the proxy executor from the
    extern-kernel JSON and passes it to every Run (aoti_rt's direct Run has none to pass).

    Its container binds the cache's buffers user-managed (a shallow tensor per constant, no
    copy: one copy of each weight, as on the direct path); the tensors own no memory, so the
    shallow copies AOTI never frees keep no weight alive."""

    def __init__(self, so: SharedObject, extern: Path, constants: Sequence[ConstantSpec],
                 rt: _device.DeviceRuntime, name: str):
        import torch

        self.constants, self.rt, self.so = list(constants), rt, so
        #: one call at a time: see :meth:`run`
        self.lock = threading.Lock()
        try:
            if rt.is_cuda:
                self.runner = torch._C._aoti.AOTIModelContainerRunnerCuda(str(so.path), 1, str(rt.device))
            else:
                self.runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(so.path), 1)
        except RuntimeError as e:
            raise AOTIError(f"method {name!r}: torch's AOTI runner could not load {so.path.name} with the "
                            f"operators it calls ({extern.name}): {e}. Register those operators in this "
                            f"process (import the module or load the library that defines them) before "
                            f"loading") from e

    def bind(self, buffers: Sequence[_memory.Buffer]) -> None:
        views = {c.name: unowned_view(buf, c) for c, buf in zip(self.constants, buffers)}
        with self.lock:
            self.runner.update_constant_buffer(views, False, True, True)

    def run(self, leaves: Sequence[Any], stream: int, where: str) -> list:
        """One call through torch's runner, one at a time per method.

        The runner's ``run`` holds the GIL, and a container of one model makes a second call
        wait for the first inside it; the first needs the GIL back whenever its custom op runs
        Python: the two would wait for each other for ever. Waiting on this lock instead
        releases the GIL."""
        try:
            with self.lock, _device.device_guard(self.rt.device):
                # the runner's container is of the same loaded .so: its first Run sets its checks
                return first_run(self.so, lambda: self.runner.run(list(leaves), _capsule(stream) if stream else None))
        except RuntimeError as e:
            raise AOTIError(f"{where} failed in AOTI Run: {e}") from e


def free_embedded_copy(so: SharedObject, handle: int) -> bool:
    """Free AOTI's private copy of the weights a .so embeds (made by ``CreateWithDevice``)
    before anything is loaded; False where the .so cannot swap constant buffers.

    The first buffer is the active one again afterwards, when the shared weights are bound
    into it. Binding into the second buffer and leaving it active breaks torch 2.11, whose
    RunSingleThreaded checks the *first* buffer's fold state from the second call on
    ("Unknown constant state: ConstantState::NONE")."""
    abi = so.abi
    if not (abi.has("SwapConstantBuffer") and abi.has("FreeInactiveConstantBuffer")):
        return False
    abi.swap_constant_buffer(handle)
    abi.free_inactive_constant_buffer(handle)
    abi.swap_constant_buffer(handle)
    return True


def so_owned(so: SharedObject, handle: int, name: str, spec: MethodSpec, plan: _bind.BindPlan,
             rt: _device.DeviceRuntime, embedded: bool, source: Any) -> int:
    """Settle what AOTI keeps of a method whose constants aoti_rt binds (Pairs), before it binds
    them, and count it in the device's legacy bytes (the method's own until it closes); returns
    the bytes counted.

    * constants the .so folds at run time (``aot_inductor.use_runtime_constant_folding``): it
      computes them from the bound weights at its first run, and again at the first run after
      every re-binding, into memory of its own (freed with its container): their data sizes;
    * AOTI's copy of weights embedded in the .so (made by ``CreateWithDevice``): freed where
      the .so can swap constant buffers (:func:`free_embedded_copy`). Where the .so keeps
      opaque constants (oneDNN weights prepacked by ``freezing``, which aoti_rt cannot bind),
      they live in that copy, which is one allocation: it stays, whole (the weights aoti_rt
      binds from its cache are then resident twice for this method: in the cache, shared, and
      in AOTI's copy, unused), and is counted;
    * opaque constants of a .so whose weights lie outside it: AOTI loads its whole blob (the
      store's bytes at ``spec.so_blob``) into a private copy, as torch's runner does, before
      aoti_rt binds the others over it; that copy is counted.
    """
    constants = spec.constants
    n = plan.folded_bytes if plan.checked else 0
    opaque = plan.so_owned > plan.folded
    if opaque and not embedded:
        # AOTI reads every non-folded constant's data size from the blob, whatever it is given
        need = sum(plan.so_size(i) for i in range(len(constants))) + plan.so_owned_bytes - plan.folded_bytes
        n += load_so_blob(so, handle, name, spec, source, need)
    elif embedded and (constants or opaque):
        if opaque:
            n += sum(plan.so_size(i) for i in range(len(constants))) + plan.so_owned_bytes - plan.folded_bytes
        elif not free_embedded_copy(so, handle):
            return n + keep_private(so, name, constants, plan, rt,
                                    "it lacks SwapConstantBuffer/FreeInactiveConstantBuffer", count=n)
    if n:
        rt.count_legacy(1, n)
    return n


def load_so_blob(so: SharedObject, handle: int, name: str, spec: MethodSpec, source: Any, need: int) -> int:
    """Load the .so's own ``binary_blob`` (``spec.so_blob`` of the store, at least ``need``
    bytes: what AOTI reads) into AOTI's private copy (``AOTInductorModelUpdateConstantsFromBlob``);
    the bytes loaded."""
    if len(spec.so_blob) != 2 or spec.so_blob[1] < need or not so.has("AOTInductorModelUpdateConstantsFromBlob"):
        raise BundleError(f"method {name!r}: {so.path.name} keeps constants aoti_rt cannot bind "
                          f"({', '.join(spec.so_owned[:4])}), and the record does not say where the {need} bytes of "
                          f"its weights blob are, or the .so cannot load one; the record is damaged or the "
                          f".so too old: re-create the package with its weights in the .so")
    offset, nbytes = spec.so_blob
    fd, _ = open_regular(source.store, "weight store")       # never blocks on a FIFO
    try:
        blob = pread_all(fd, nbytes, offset, source.store)
    finally:
        os.close(fd)
    if len(blob) != nbytes:
        raise BundleError(f"weight store {source.store} is truncated: {name!r}'s weights blob needs bytes up to "
                          f"{offset + nbytes}")
    so.abi.update_constants_from_blob(handle, blob)
    return nbytes


def refold(methods: Sequence[Any]) -> None:
    """Make each method whose .so folds constants at run time fold them again at its next call
    (after its weights were written in place): its buffers are bound again as they are
    (:meth:`~aoti_rt.runtime.Method.rebind` with none changed), which is what tells AOTI its
    folded constants are stale. The others are left alone (a re-binding makes AOTI's next call
    synchronize its stream). Call with the methods' launch locks held (no call runs meanwhile)."""
    for m in methods:
        if m.shared and m.folds:
            m.rebind({}, release=False)


def keep_private(so: SharedObject, name: str, constants: Sequence[ConstantSpec], plan: _bind.BindPlan,
                 rt: _device.DeviceRuntime, why: str, count: int = 0) -> int:
    """AOTI keeps its own copy of the weights a .so embeds: counted (with ``count`` more bytes
    the method keeps), and the user warned. Returns the bytes of the copy."""
    n = sum(plan.so_size(i) if plan.checked else c.data_size for i, c in enumerate(constants))
    rt.count_legacy(1, n + count)
    warnings.warn(f"method {name!r}: {so.path.name} keeps AOTI's private copy of its embedded weights "
                  f"({n} bytes, counted in cache_stats() legacy_bytes) because {why}; recompile it with "
                  f"torch >= 2.10 to share them", stacklevel=5)
    return n


def bind_private(so: SharedObject, handle: int, name: str, constants: Sequence[ConstantSpec],
                 plan: _bind.BindPlan, source: Any, rt: _device.DeviceRuntime, embedded: bool,
                 private_blob: bool = True) -> int:
    """No Pairs entry point: AOTI holds a private copy of the weights (unshared); the bytes
    it holds (counted in the device's legacy bytes).

    A .so that embeds them loaded them in ``CreateWithDevice``; otherwise AOTI reads
    ``GetConstantDataSize`` bytes per constant from a blob, so the blob is laid out with the
    .so's sizes, never the manifest's."""
    if not constants:
        return 0
    if embedded:
        return keep_private(so, name, constants, plan, rt, "it lacks UpdateUserManagedConstantBufferPairs")
    if not private_blob:
        raise AOTIError(f"method {name!r}: {so.path.name} lacks UpdateUserManagedConstantBufferPairs, so "
                        f"weights packaged outside the .so cannot be bound; recompile the package with "
                        f"torch >= 2.10")
    if not so.has("AOTInductorModelUpdateConstantsFromBlob"):
        return 0   # the .so embeds its weights: CreateWithDevice loaded them
    if not plan.checked:
        raise AOTIError(f"method {name!r}: {so.path.name} lacks GetConstantDataSize, so its "
                        f"blob layout is unknown; recompile it with a newer torch")
    slots = [plan.so_size(i) for i in range(len(constants))]
    offsets, total = blob_layout(slots)
    blob = bytearray(total)
    fd, _ = open_regular(source.store, "weight store")       # never blocks on a FIFO
    try:
        for c, at, size in zip(constants, offsets, slots):
            w = source.weights[c.weight]
            data = pread_all(fd, min(w.nbytes, size), w.offset, source.store)
            if len(data) != min(w.nbytes, size):
                raise BundleError(f"weight store {source.store} is truncated")
            blob[at:at + len(data)] = data
    finally:
        os.close(fd)
    so.abi.update_constants_from_blob(handle, blob)
    rt.count_legacy(1, total)
    return total


def unowned_view(buf: _memory.Buffer, c: ConstantSpec):
    """A tensor with a constant's view of a cache Buffer that owns nothing (no reference to the
    Buffer: whoever binds it keeps the Buffer alive while it is bound)."""
    import torch

    device = torch.device(buf.device)
    storage = torch._C._construct_storage_from_data_pointer(buf.ptr, device, buf.nbytes)
    return torch.empty(0, dtype=getattr(torch, c.dtype), device=device).set_(
        storage, c.storage_offset, c.shape, c.stride)


_new_capsule = None


def _capsule(pointer: int):
    """A PyCapsule holding ``pointer`` (how torch's runner takes a stream handle)."""
    global _new_capsule
    if _new_capsule is None:
        import ctypes

        proto = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
        _new_capsule = proto(("PyCapsule_New", ctypes.pythonapi))
    return _new_capsule(pointer, None, None)
