"""Live weight updates: new values written into the memory a loaded model's methods are bound to.

:meth:`aoti_rt.Model.update_weights` calls :func:`update_weights`. Two ways, chosen per call:

* ``shared=True`` (in place): the new bytes go into the buffers the methods are bound to. No
  method is rebound; every model in the process bound to the same buffers (the same weights,
  shared by content) and every process attached to them sees the new values, as RL weight
  sync wants. The cache stops naming those buffers by their old content, so a model loaded
  later reads the old values from its own store instead of binding the updated memory.
* ``shared=False`` (copy on write): each updated weight gets a private buffer holding the old
  bytes with the new values written over them, and this model's methods are rebound to it
  (under each method's launch lock, so no call launches halfway); the shared buffer is given
  back and nothing else changes.

A model's own state (buffers a method writes in place, a KV cache) is private to the instance
already: it is always written in place. Values come from tensors (any device; each is checked
against the constant's dtype and shape, then ``copy_`` into a view of the buffer on the
current stream) or from a safetensors file: its header is checked like a store's, and tensors
that cover their buffer whole are read by the load pipeline straight into device memory (the
loader's speed), the others through a host tensor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import loader
from .bundle import ITEMSIZE, ST_DTYPES, ConstantSpec, contiguous_strides, read_store_header, view_bytes
from .errors import AotiRtError, ClosedError, InputError
from .views import buffer_view, raw_view

if TYPE_CHECKING:
    from .runtime import Method, Model


@dataclass
class UpdateReport:
    """What :func:`update_weights` did."""

    #: the FQNs written
    fqns: list[str] = field(default_factory=list)
    #: bytes of new values written (each buffer once, however many methods bind it)
    nbytes: int = 0
    #: of those, bytes the load pipeline read from a safetensors file into device memory
    bytes_read: int = 0
    #: weights that got a private copy (``shared=False``)
    copied_on_write: int = 0
    seconds: float = 0.0

    @property
    def gbps(self) -> float:
        """Bytes written per second, in GB/s."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


@dataclass
class _Target:
    """One buffer to write: who binds it (method, index in its acquisition) and the views."""

    buffer: Any
    mutable: bool
    holders: list[tuple["Method", int, Any]] = field(default_factory=list)   # (method, constant, key)
    writes: list[tuple[ConstantSpec, Any]] = field(default_factory=list)   # (view, value or file entry)


def _contiguous(c: ConstantSpec) -> bool:
    return list(c.stride) == contiguous_strides(c.shape) or 0 in c.shape


def _bound(model: "Model") -> dict[str, list[tuple["Method", int, ConstantSpec, Any, bool, Any]]]:
    """fqn -> every (method, constant index, constant, buffer, mutable, cache key) that binds it."""
    out: dict[str, list] = {}
    for m in model.method_list():
        if m.closed:
            raise ClosedError(f"method {m.name!r} is closed")
        if not m.shared:
            raise AotiRtError(f"method {m.name!r} runs a .so without UpdateUserManagedConstantBufferPairs: "
                              f"AOTI holds its weights privately and aoti_rt cannot update them; "
                              f"recompile it with torch >= 2.10")
        for b in m.bindings():
            out.setdefault(b.fqn, []).append((m, b.index, b.constant, b.buffer, b.mutable, b.key))
    return out


def _check_value(fqn: str, c: ConstantSpec, value: Any) -> None:
    import torch

    if not isinstance(value, torch.Tensor):
        raise InputError(f"update_weights: {fqn} must be a torch.Tensor, not {type(value).__name__}")
    if str(value.dtype).removeprefix("torch.") != c.dtype or list(value.shape) != list(c.shape):
        raise InputError(f"update_weights: {fqn} is {c.dtype}{list(c.shape)} in the model; the new value is "
                         f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}")


def _check_entry(fqn: str, c: ConstantSpec, entry: tuple[str, list[int], int, int], path: Path) -> None:
    dtype, shape, start, end = entry
    if ST_DTYPES.get(c.dtype) != dtype or list(shape) != list(c.shape):
        raise InputError(f"update_weights: {fqn} is {c.dtype}{list(c.shape)} in the model; {path.name} "
                         f"holds {dtype}{list(shape)}")


def update_weights(model: "Model", weights: "Mapping[str, Any] | str | os.PathLike[str]", *,
                   shared: bool = True, strict: bool = True, progress: bool | None = None) -> UpdateReport:
    """Write new values into ``model``'s weights; see :meth:`aoti_rt.Model.update_weights`."""
    import torch

    t0 = time.perf_counter()
    bound = _bound(model)
    path: Path | None = None
    if isinstance(weights, Mapping):
        given = dict(weights)
    else:
        path = Path(weights)
        header = read_store_header(path)             # untrusted: checked like a store
        given = dict(header.tensors)
    unknown = sorted(k for k in given if k not in bound)
    if unknown and strict:
        raise InputError(f"update_weights: the model binds no {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} unknown); it binds "
                         f"{len(bound)} FQNs, e.g. {', '.join(sorted(bound)[:3])} (strict=False ignores them)")
    targets: dict[int, _Target] = {}
    for fqn, value in given.items():
        if fqn not in bound:
            continue
        for m, i, c, buf, mutable, key in bound[fqn]:
            if path is None:
                _check_value(fqn, c, value)
            else:
                _check_entry(fqn, c, value, path)
            t = targets.get(id(buf))
            if t is None:
                t = targets[id(buf)] = _Target(buf, mutable)
            t.holders.append((m, i, key))
            if all(c.fqn != w.fqn for w, _ in t.writes):
                t.writes.append((c, value))
    # shared arenas written in place: an exporter's own, made writable for the update
    arenas: dict[int, Any] = {}
    if shared:
        for t in targets.values():
            arena = t.buffer.arena
            if arena is None or not t.buffer.read_only:
                continue
            if arena.imported:
                raise InputError("update_weights: this model's weights are mapped read-only from another "
                                 "process (share=); update them in the process that exports them, or pass "
                                 "shared=False for a private copy")
            arenas[id(arena)] = arena
    report = UpdateReport(fqns=sorted(k for k in given if k in bound))
    rt = model.method_list()[0].runtime
    # copy on write: a private buffer with the old bytes, for each shared weight
    fresh: dict[int, Any] = {}
    if not shared:
        for key, t in targets.items():
            if t.mutable:
                continue
            new = rt.allocator.allocate(t.buffer.nbytes)
            raw_view(new).copy_(raw_view(t.buffer))
            fresh[key] = new
    if rt.is_cuda:
        # the calls already queued on the current stream read the old values, and the copies
        # above must land before the new values: the load pipeline writes on its own streams
        torch.cuda.current_stream(rt.index).synchronize()
    # the old content keys stop describing the buffers written in place before any byte is
    # written: an update that fails halfway (a truncated file, Ctrl-C) leaves no later load
    # binding half-new memory under the old content's name
    for key, t in targets.items():
        if key not in fresh and not t.mutable:
            for _, _, k in t.holders:
                if k is not None:
                    rt.cache.forget(k)
    for arena in arenas.values():
        arena.unprotect()
    try:
        with torch.no_grad():
            report.nbytes, report.bytes_read = _write(rt, targets, fresh, path, progress)
        if rt.is_cuda:
            torch.cuda.current_stream(rt.index).synchronize()
    finally:
        for arena in arenas.values():
            arena.protect()
    # rebind the methods whose weights got private copies: every constant of theirs bound to
    # a copied buffer (FQNs of one buffer move together, as the buffer did)
    per_method: dict[int, tuple["Method", dict[int, Any], list]] = {}
    for key, new in fresh.items():
        t = targets[key]
        for m, _, _ in t.holders:
            _, rebind, rows = per_method.setdefault(id(m), (m, {}, m.bindings()))
            for b in rows:
                if b.buffer is t.buffer:
                    rebind[b.index] = new
    _rebind_all([(m, rebind) for m, rebind, _ in per_method.values()])
    report.copied_on_write = len(fresh)
    report.seconds = time.perf_counter() - t0
    return report


def _rebind_all(rebinds: "list[tuple[Method, dict[int, Any]]]") -> None:
    """Rebind every method to its private copies (:meth:`Method.rebind`): all methods or none.
    A method that fails to rebind undoes the ones rebound before it (they are bound to the
    buffers they had again); one that cannot be undone keeps its private copies (memory it
    points at is never freed under it) and the error says so."""
    done: list[tuple["Method", dict[int, Any]]] = []
    try:
        for m, replaced in rebinds:
            old = {b.index: b.buffer for b in m.bindings() if b.index in replaced}
            m.rebind(replaced)
            done.append((m, old))
    except BaseException as e:
        stuck = []
        for m, old in done:
            try:
                m.rebind(old)
            except Exception:  # noqa: BLE001 - it keeps the copies it points at
                stuck.append(m.name)
        if stuck:
            raise AotiRtError(f"update_weights(shared=False) failed ({e}) and could not be undone for "
                              f"{', '.join(stuck)}: those methods compute with the new values, the others "
                              f"with the old; update again or load the model anew") from e
        raise


def _write(rt: Any, targets: dict[int, _Target], fresh: dict[int, Any], path: Path | None,
           progress: bool | None) -> tuple[int, int]:
    """Write every target's new values (into its private copy where it has one); returns the
    bytes written and the bytes the load pipeline read from ``path``."""
    written = 0
    direct: list[tuple[int, int, Any]] = []          # (file offset, bytes, buffer): the load pipeline
    for key, t in targets.items():
        dest = fresh.get(key, t.buffer)
        for c, value in t.writes:
            if path is not None and c.storage_offset == 0 and _contiguous(c):
                _, _, start, end = value
                direct.append((start, end - start, dest))
            else:
                if path is not None:
                    value = _read_host(path, value, c)
                buffer_view(dest, c).copy_(value)
            written += view_bytes(c.shape, c.stride, c.storage_offset, ITEMSIZE[c.dtype])
    read = 0
    if direct:
        read = loader.read_weights(rt, path, [d[0] for d in direct], [d[1] for d in direct],
                                   [d[2] for d in direct], progress=progress)
    return written, read


def _read_host(path: Path, entry: tuple[str, list[int], int, int], c: ConstantSpec):
    """One safetensors entry as a host tensor of the constant's dtype and shape."""
    import torch

    from .bundle import open_regular, pread_all

    _, _, start, end = entry
    fd, _ = open_regular(path, "safetensors file")
    try:
        data = bytearray(pread_all(fd, end - start, start, path))
    finally:
        os.close(fd)
    if len(data) != end - start:
        raise AotiRtError(f"update_weights: {path} shrank while being read")
    return torch.frombuffer(data, dtype=getattr(torch, c.dtype)).reshape(c.shape) if data else \
        torch.empty(c.shape, dtype=getattr(torch, c.dtype))
