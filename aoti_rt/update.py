"""Live weight updates: :meth:`aoti_rt.Model.update_weights`, as ``docs/contract.md`` states them.

An update names FQNs and changes exactly those FQNs of one model:

* memory the model owns alone is written in place: its instance state (a KV cache) and its
  private copies;
* an exporter's shared arena (``share=``) gets a new generation (``atomic=True``, the default):
  a copy of the arenas with the new values, which this model and every attached process switch
  to as one step (:mod:`aoti_rt.generations`), so a call in any process reads all old or all new
  weights; ``atomic=False`` writes the arena in place instead (no second copy of it: a client's
  call running meanwhile may read a mix);
* a weight the device's cache owns (shared by every model loaded from the same store, or by
  verified content) becomes the model's own: taken over where this model holds every reference
  (the cache stops naming it; no copy), else copied; other models keep the old values;
* a buffer bound under several FQNs (the compiler stores equal bytes once) is split on the first
  divergent write: FQNs written with another value than the rest get a buffer of their own;
* a weight mapped read-only from another process is refused (``shared=False``: a private copy).

Every name and value (or a safetensors file's header) is checked before anything is allocated
or written. The writes and rebinds of one update happen while every method of the model holds
its launch lock, after the calls already launched have finished (CUDA: the device is
synchronised), so a call of the model sees all old or all new weights. Updates of one model
run one at a time: each plans against what the one before it bound.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import loader, serving
from .bundle import ITEMSIZE, ST_DTYPES, ConstantSpec, contiguous_strides, read_store_header, view_bytes
from .errors import AotiRtError, ClosedError, InputError
from .binders import refold
from .generations import rebind_methods
from .views import buffer_view, raw_view

if TYPE_CHECKING:
    from .runtime import BoundConstant, Method, Model


@dataclass
class UpdateReport:
    """What :func:`update_weights` did."""

    #: the FQNs written
    fqns: list[str] = field(default_factory=list)
    #: bytes of new values written (each buffer once, however many methods bind it)
    nbytes: int = 0
    #: of those, bytes the load pipeline read from a safetensors file into device memory
    bytes_read: int = 0
    #: weights that got a buffer of this model's own by copying (the others were written in
    #: place: state, private copies, an exporter's arena, or cache entries taken over)
    copied_on_write: int = 0
    #: cache-owned weights this model held alone and took over without a copy
    taken_over: int = 0
    #: an exporter's atomic update: the generation of its shared arenas served from now on
    #: (None: no shared arena was updated, or it was written in place: ``atomic=False``)
    generation: int | None = None
    #: client processes (pids) that switched to that generation before the update returned,
    #: and those that did not in time or could not (each computes with the previous
    #: generation, all of it, until it switches; a warning names them)
    switched: list[int] = field(default_factory=list)
    unswitched: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def gbps(self) -> float:
        """Bytes written per second, in GB/s."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


@dataclass
class _Holder:
    method: "Method"
    bound: "BoundConstant"


@dataclass
class _Target:
    """One destination buffer and what goes into it.

    ``source`` is the buffer bound now; ``dest`` the buffer written: ``source`` itself (in place)
    or a fresh one (a copy of ``source``'s bytes first). ``holders`` are the constants that will
    be bound to ``dest``; ``writes`` the (view, value) pairs written into it, once per FQN."""

    source: Any
    holders: list[_Holder]
    writes: list[tuple[ConstantSpec, Any]]
    copy: bool = False
    take_key: Any = None          # a cache key to take over before writing in place
    take_refs: int = 0
    dest: Any = None
    arena: bool = False           # an exporter's shared arena buffer, every FQN of it written
    swap: bool = False            # written in the arena's next generation (atomic), not in place


def _contiguous(c: ConstantSpec) -> bool:
    return list(c.stride) == contiguous_strides(c.shape) or 0 in c.shape


def _methods(model: "Model") -> "list[Method]":
    ms = model.method_list()
    for m in ms:
        if m.closed:
            raise ClosedError(f"method {m.name!r} is closed")
        if not m.shared:
            raise AotiRtError(f"method {m.name!r} runs a .so without UpdateUserManagedConstantBufferPairs: "
                              f"AOTI holds its weights privately and aoti_rt cannot update them; "
                              f"recompile it with torch >= 2.10")
    return ms


def _check_value(fqn: str, c: ConstantSpec, value: Any) -> None:
    """A value must be a plain dense tensor with the constant's dtype and shape, on a real device."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise InputError(f"update_weights: {fqn} must be a torch.Tensor, not {type(value).__name__}")
    if type(value) not in (torch.Tensor, torch.nn.Parameter):
        raise InputError(f"update_weights: {fqn} is a {type(value).__name__} (a tensor subclass); pass a plain "
                         f"tensor (e.g. the subclass's dense value)")
    if value.layout != torch.strided:
        raise InputError(f"update_weights: {fqn} is a {value.layout} tensor; pass a dense one (.to_dense())")
    if value.is_quantized:
        raise InputError(f"update_weights: {fqn} is a quantized tensor; pass the plain {c.dtype} values")
    if value.device.type == "meta":
        raise InputError(f"update_weights: {fqn} is on the meta device and holds no data; pass a tensor "
                         f"with values")
    if str(value.dtype).removeprefix("torch.") != c.dtype or list(value.shape) != list(c.shape):
        raise InputError(f"update_weights: {fqn} is {c.dtype}{list(c.shape)} in the model; the new value is "
                         f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}")


def _check_entry(fqn: str, c: ConstantSpec, entry: tuple[str, list[int], int, int], path: Path) -> None:
    dtype, shape, start, end = entry
    if ST_DTYPES.get(c.dtype) != dtype or list(shape) != list(c.shape):
        raise InputError(f"update_weights: {fqn} is {c.dtype}{list(c.shape)} in the model; {path.name} "
                         f"holds {dtype}{list(shape)}")


def _given(weights: Any) -> tuple[dict[str, Any], Path | None]:
    """The values to write by FQN, and the safetensors file they come from (or None)."""
    if isinstance(weights, Mapping):
        given = dict(weights)
        for k in given:
            if type(k) is not str:
                raise InputError(f"update_weights: names must be FQN strings, not {type(k).__name__} {k!r:.40}")
        return given, None
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        return dict(read_store_header(path).tensors), path      # untrusted: checked like a store
    raise InputError(f"update_weights takes {{fqn: tensor}} or the path of a safetensors file, not "
                     f"{type(weights).__name__}")


def _value_id(value: Any, path: Path | None) -> Any:
    """What makes two FQNs' new values one value: the same tensor object, or the same bytes of
    the file."""
    return (value[2], value[3]) if path is not None else id(value)


def _view_of(value: Any) -> tuple | None:
    """Where a dense tensor's elements are (its storage, offset, shape, strides, dtype, device)."""
    import torch

    if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_quantized \
            or value.device.type == "meta":
        return None
    return (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
            value.dtype, value.device)


def _unknown(given: dict[str, Any], bound: set[str], path: Path | None) -> list[str]:
    """The names the model does not bind, less those whose value is the very tensor given for an
    FQN it binds: a weight tied under two names (``head.weight = emb.weight``), which AOTI
    compiles as one constant under one of them; a state_dict holds both, and writing the bound
    name writes the tensor."""
    unknown = sorted(k for k in given if k not in bound)
    if not unknown or path is not None:
        return unknown
    views = {_view_of(v) for k, v in given.items() if k in bound} - {None}
    return [k for k in unknown if _view_of(given[k]) not in views]


def _merge_equal(groups: dict[Any, list[_Holder]], given: dict[str, Any]) -> dict[Any, list[_Holder]]:
    """Groups of FQNs of one buffer whose new values are equal bit for bit become one group: they
    still hold one value (nine LayerNorm weights updated to nine tensors of ones), so no split is
    needed, and an exporter may write them."""
    import torch

    out: dict[Any, list[_Holder]] = {}
    firsts: list[tuple[Any, Any]] = []          # (group key, its value)
    for vid, hs in groups.items():
        if vid is None:
            out[None] = hs
            continue
        value = given[hs[0].bound.fqn].detach().contiguous().reshape(-1).view(torch.uint8)
        for key, first in firsts:
            if torch.equal(value.to(first.device), first):      # bit for bit
                out[key].extend(hs)
                break
        else:
            firsts.append((vid, value))
            out[vid] = list(hs)
    return out


def _split_overlapping(groups: dict[Any, list[_Holder]]) -> dict[Any, list[_Holder]]:
    """FQNs given one value keep one buffer only where their views of it are the same or lie
    apart: views that overlap (``t[0:10]`` and ``t[5:15]`` of one storage, in a package) cannot
    both hold that value in one buffer, so each such view gets a group, and a buffer, of its own."""
    out: dict[Any, list[_Holder]] = {}
    for vid, hs in groups.items():
        views: dict[tuple, list[_Holder]] = {}
        for h in hs:
            c = h.bound.constant
            views.setdefault((c.storage_offset, tuple(c.shape), tuple(c.stride)), []).append(h)
        spans = sorted(_byte_span(vhs[0].bound.constant) for vhs in views.values())
        apart = all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
        if vid is None or apart:
            out[vid] = hs
        else:
            out.update(((vid, view), vhs) for view, vhs in views.items())
    return out


def _byte_span(c: ConstantSpec) -> tuple[int, int]:
    """The bytes of its storage a constant's view starts and ends at."""
    size = ITEMSIZE[c.dtype]
    return c.storage_offset * size, view_bytes(list(c.shape), list(c.stride), c.storage_offset, size)


def _kind(bound: "BoundConstant") -> str:
    """Which of the contract's kinds of memory a bound constant is (docs/contract.md)."""
    arena = getattr(bound.buffer, "arena", None)
    if bound.mutable:
        return "instance"
    if arena is not None:
        return "attached" if arena.imported else "export"
    return "private" if bound.key is None else "cache"


def _plan(model: "Model", methods: "list[Method]", given: dict[str, Any], path: Path | None,
          shared: bool) -> list[_Target]:
    """Decide, before anything is allocated or written, where each new value goes."""
    by_buffer: dict[int, list[_Holder]] = {}
    for m in methods:
        for b in m.bindings():
            by_buffer.setdefault(id(b.buffer), []).append(_Holder(m, b))
    targets: list[_Target] = []
    for holders in by_buffer.values():
        written = [h for h in holders if h.bound.fqn in given]
        if not written:
            continue
        for h in written:
            value = given[h.bound.fqn]
            if path is None:
                _check_value(h.bound.fqn, h.bound.constant, value)
            else:
                _check_entry(h.bound.fqn, h.bound.constant, value, path)
        named = [h for h in holders if h.bound.key is not None]
        kind = _kind((named or holders)[0].bound)
        # the FQNs this buffer holds, by the value each gets (None: not written)
        groups: dict[Any, list[_Holder]] = {}
        for h in holders:
            fqn = h.bound.fqn
            groups.setdefault(None if fqn not in given else _value_id(given[fqn], path), []).append(h)
        if path is None and len(groups) - (None in groups) > 1:
            groups = _merge_equal(groups, given)
        groups = _split_overlapping(groups)
        whole = None not in groups and len(groups) == 1
        if kind == "attached" and shared:
            raise InputError("update_weights: this model's weights are mapped read-only from another process "
                             "(share=); update them in the process that exports them, or pass shared=False "
                             "for a private copy")
        if kind == "export" and shared and not whole:
            fqns = sorted({h.bound.fqn for h in holders})
            raise InputError(f"update_weights: {', '.join(fqns[:6])}{' ...' if len(fqns) > 6 else ''} are one "
                             f"buffer of the exported arena (their values were equal when compiled); other "
                             f"processes map it as one, so an exporter updates them together: give all "
                             f"{len(fqns)} the same tensor, or pass shared=False for a copy of this process's own")
        source = holders[0].bound.buffer
        for n, (vid, hs) in enumerate(groups.items()):
            if vid is None:
                continue                                   # kept: these FQNs keep the old buffer
            t = _Target(source, hs, [])
            seen: set[str] = set()
            for h in hs:
                if h.bound.fqn not in seen:
                    seen.add(h.bound.fqn)
                    t.writes.append((h.bound.constant, given[h.bound.fqn]))
            # the one group that may keep the buffer: the only one, when every FQN is written
            keeps = whole and n == 0
            if not keeps or (kind == "export" and not shared) or kind == "attached":
                t.copy = True
            elif kind == "cache":
                t.take_key = named[0].bound.key
                t.take_refs = len({id(h.method) for h in named})
            t.arena = kind == "export" and not t.copy
            targets.append(t)
    return targets


@contextlib.contextmanager
def _quiesced(methods: "list[Method]", rt: Any):
    """Every method's launch lock held, and (CUDA) the calls launched before done."""
    import torch

    with contextlib.ExitStack() as stack:
        for m in methods:
            stack.enter_context(m.launch_lock())
        if rt.is_cuda:
            torch.cuda.synchronize(rt.index)
        yield
        if rt.is_cuda:
            torch.cuda.synchronize(rt.index)


@dataclass
class _Swap:
    """An exporter's atomic update: the generation it writes, once installed (bound, served)."""

    exporter: Any = None
    gen: Any = None
    installed: bool = False


@contextlib.contextmanager
def _generation(exporter: Any, report: UpdateReport):
    """Hold ``exporter``'s generation lock (None: no exporter's arena is written, or in place);
    on the way out, after the launch locks are given back, publish the generation installed to
    its clients (waiting for them to switch), or let go of one that was not installed."""
    swap = _Swap(exporter)
    if exporter is None:
        yield swap
        return
    with exporter.swapping():
        try:
            yield swap
        finally:
            if swap.installed:
                result = exporter.publish(swap.gen)
                report.generation = swap.gen.number
                report.switched = sorted(result.acknowledged)
                report.unswitched = sorted(result.late + list(result.failed))
            elif swap.gen is not None:
                swap.gen.discard()


#: one lock a model: its updates run one at a time (a plan made beside another update's would
#: copy, and on a failure restore, buffers that update has since replaced)
_serial: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_serial_guard = threading.Lock()


def _one_at_a_time(model: "Model") -> threading.Lock:
    with _serial_guard:
        return _serial.setdefault(model, threading.Lock())


def update_weights(model: "Model", weights: "Mapping[str, Any] | str | os.PathLike[str]", *,
                   shared: bool = True, strict: bool = True, progress: bool | None = None,
                   atomic: bool = True) -> UpdateReport:
    """Write new values into ``model``'s weights; see :meth:`aoti_rt.Model.update_weights`.

    ``atomic`` (an exporter's shared arena, ``shared=True``): True writes the new values in a new
    generation of the arenas that this model and its client processes switch to as one step
    (:mod:`aoti_rt.generations`; the arenas' bytes twice until every client has switched);
    False writes the arenas in place (no second copy; a client's call running meanwhile may
    read a mix of old and new weights)."""
    with _one_at_a_time(model):
        return _update(model, weights, shared, strict, progress, atomic)


def _update(model: "Model", weights: Any, shared: bool, strict: bool, progress: bool | None,
            atomic: bool) -> UpdateReport:
    import torch

    t0 = time.perf_counter()
    methods = _methods(model)
    given, path = _given(weights)
    bound = {b.fqn for m in methods for b in m.bindings()}
    unknown = _unknown(given, bound, path)
    if unknown and strict:
        raise InputError(f"update_weights: the model binds no {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} unknown); it binds "
                         f"{len(bound)} FQNs, e.g. {', '.join(sorted(bound)[:3])} (strict=False ignores them)")
    targets = _plan(model, methods, given, path, shared)
    report = UpdateReport(fqns=sorted(k for k in given if k in bound))
    rt = methods[0].runtime
    fresh: list[Any] = []
    try:
        for t in targets:                       # allocation fails here, before anything is written
            if t.copy:
                t.dest = rt.allocator.allocate(t.source.nbytes)
                fresh.append(t.dest)
    except BaseException:
        fresh.clear()
        raise
    arena = [t for t in targets if t.arena]
    exporter = serving.exporter_of(arena[0].source) if atomic and arena else None
    for t in arena:
        t.swap = exporter is not None
    done: list[str] = []
    with _generation(exporter, report) as swap, _quiesced(methods, rt), torch.no_grad():
        try:
            if exporter is not None:     # allocation and the copy of the arenas: nothing changed if they fail
                swap.gen = exporter.new_generation()
                for t in arena:
                    t.dest = swap.gen.buffer(t.source)
            for t in targets:
                if t.copy or t.swap:
                    continue
                if t.take_key is not None and not rt.cache.take_over(t.take_key, t.take_refs):
                    # another model holds it: this model gets a copy of its own
                    t.dest = rt.allocator.allocate(t.source.nbytes)
                    t.copy = True
                else:
                    t.dest = t.source
                    report.taken_over += t.take_key is not None
            if path is None:
                _snapshot_aliases(targets)
            # copies first: filled with the old bytes and the new values, then bound (all methods
            # or none), so a failure up to here changes nothing this model computes
            for t in targets:
                if t.copy:
                    raw_view(t.dest).copy_(raw_view(t.source))
            if rt.is_cuda:       # the old bytes land before the load pipeline writes on its own streams
                torch.cuda.synchronize(rt.index)
            staged = [t for t in targets if t.copy or t.swap]
            n1, r1 = _write(rt, staged, path, progress, [])
            if rt.is_cuda:
                torch.cuda.synchronize(rt.index)
            if swap.gen is not None:
                swap.gen.freeze()
            _rebind(targets, methods, swap.gen)
            if swap.gen is not None:
                exporter.install(swap.gen)       # served from now on: published once the locks are given back
                swap.installed = True
            done.extend(c.fqn for t in staged for c, _ in t.writes)
            # then what is written in place (state, memory this model owns, an exporter's arena
            # with atomic=False)
            in_place = [t for t in targets if not t.copy and not t.swap]
            arenas = {id(t.dest.arena): t.dest.arena for t in in_place
                      if getattr(t.dest, "arena", None) is not None and t.dest.read_only}
            for a in arenas.values():
                a.unprotect()
            try:
                n2, r2 = _write(rt, in_place, path, progress, done)
                if rt.is_cuda:
                    torch.cuda.synchronize(rt.index)
            finally:
                for a in arenas.values():
                    a.protect()
            refold(methods)      # constants a .so folds from these weights are made again at its next call
            report.nbytes, report.bytes_read = n1 + n2, r1 + r2
        except BaseException as e:
            if done:
                note = (f"update_weights was interrupted after writing {len(done)} of its FQNs "
                        f"({', '.join(done[:8])}{' ...' if len(done) > 8 else ''}); the others hold their old "
                        f"values. Every weight is still bound and the model usable: update again to finish")
                if hasattr(e, "add_note"):
                    e.add_note(note)
                if isinstance(e, Exception) and not isinstance(e, AotiRtError):
                    raise AotiRtError(f"{type(e).__name__}: {e}. {note}") from e
            raise
    report.copied_on_write = sum(t.copy for t in targets)
    report.seconds = time.perf_counter() - t0
    return report


def _snapshot_aliases(targets: list[_Target]) -> None:
    """Copy each value that lies in memory this update writes in place (a live view of a KV
    cache from ``model.weight()``) before anything is written, so every FQN gets the value it
    was given, whatever the order of the writes (swapping two caches through their views)."""
    spans = [(t.dest.ptr, t.dest.ptr + t.dest.nbytes) for t in targets if t.dest is t.source]
    if not spans:
        return
    for t in targets:
        t.writes = [(c, v.clone() if _overlaps(v, spans) else v) for c, v in t.writes]


def _overlaps(value: Any, spans: list[tuple[int, int]]) -> bool:
    storage = value.untyped_storage()
    lo = storage.data_ptr()
    hi = lo + storage.nbytes()
    return any(lo < end and start < hi for start, end in spans)


def _rebind(targets: list[_Target], methods: "list[Method]", gen: Any) -> None:
    """Bind every constant whose weight got a buffer of its own to it, and, with a new
    generation ``gen`` of an exporter's arenas, every constant bound to the arenas served now
    to its buffer there (the launch locks are held, so :meth:`~aoti_rt.runtime.Method.rebind`
    does not take them again): each method in one Pairs call, all methods or none."""
    per_method: dict[int, tuple["Method", dict[int, Any], dict[int, Any]]] = {}
    for t in targets:
        if t.dest is t.source:
            continue
        for h in t.holders:
            m, new, old = per_method.setdefault(id(h.method), (h.method, {}, {}))
            new[h.bound.index] = t.dest
            old[h.bound.index] = t.source
    for m in methods if gen is not None else ():
        for b in m.bindings():
            moved = gen.buffer(b.buffer)
            if moved is not None:
                _, new, old = per_method.setdefault(id(m), (m, {}, {}))
                new.setdefault(b.index, moved)
                old.setdefault(b.index, b.buffer)
    rebind_methods(list(per_method.values()))


def _write(rt: Any, targets: list[_Target], path: Path | None, progress: bool | None,
           done: list[str]) -> tuple[int, int]:
    """Write every target's new values into its destination; returns the bytes written and the
    bytes the load pipeline read from ``path``. ``done`` collects the FQNs written in place."""
    written = 0
    direct: list[tuple[int, int, Any]] = []          # (file offset, bytes, buffer): the load pipeline
    direct_fqns: list[str] = []
    for t in targets:
        for c, value in t.writes:
            if path is not None and c.storage_offset == 0 and _contiguous(c):
                _, _, start, end = value
                direct.append((start, end - start, t.dest))
                direct_fqns.append(c.fqn)
            else:
                if path is not None:
                    value = _read_host(path, value, c)
                buffer_view(t.dest, c).copy_(value)
                if not t.copy:
                    done.append(c.fqn)
            written += view_bytes(c.shape, c.stride, c.storage_offset, ITEMSIZE[c.dtype])
    read = 0
    if direct:
        read = loader.read_weights(rt, path, [d[0] for d in direct], [d[1] for d in direct],
                                   [d[2] for d in direct], progress=progress)
        done.extend(direct_fqns)
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
