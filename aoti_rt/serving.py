"""One copy of a bundle's weights across the processes of one device: a model's side of
``aoti_rt.load(bundle, share=name)``.

The first process to load ``name`` *exports*: its immutable weights (those the ``.so`` reports
as parameters or tensor constants and the manifest as never written) go into one shared arena
(:class:`aoti_rt._arena.ArenaAllocator`: a VMM allocation on CUDA, a memfd on the host), and it
serves ``name`` (:mod:`aoti_rt.share`). Every later process on the device *attaches*: it maps
the arenas read-only, caches each weight's Buffer under a key of the client model's own scope
(never a content key), so its methods find every weight cached and read nothing from the store,
while any other model of that process (a plain ``load`` of the same bundle) keeps its own copy;
and it allocates only its own mutable state (a KV cache), which is never shared.

When sharing is impossible (:class:`~aoti_rt.errors.ShareUnavailableError`: the name squatted
by another user, no answer by the deadline, a device or kernel that cannot share memory),
``aoti_rt.load`` loads privately with a warning, or raises with ``share_required=True``.

Updates: an exporter's ``update_weights`` (``atomic=True``, the default) never writes the arenas
it serves: it serves a new generation of them, which every client switches to as one step
(:mod:`aoti_rt.generations`; :meth:`Exporter.new_generation`, :meth:`Exporter.publish`, and each
client's listener thread, started by :meth:`Client.ready`).

Lifetimes: a client is attached while its connection is open (closing the model, exiting or
being killed closes it). The memory lives while any process maps it: the driver (VMM) or the
kernel (memfd) counts the mappings, so a client keeps computing after the exporter has closed
or exited, and the memory goes with the last process. An exporter that closes stops serving at
once; a later load of ``name`` exports anew.

Identity: a client attaches only to an exporter of the same bundle on the same device (the
GPU's UUID, whatever ordinal it has in each process), else :class:`ShareError`. The same
bundle is the same manifest (its SHA-256, which covers every weight's digest) and either the
same store file (device, inode, size, modification time: the very bytes the client would read)
or, for a copy of the bundle elsewhere, an exporter that checked every weight against its
digest while loading (``verify="load"``, as ``serve-weights`` loads): the rule by which one
process shares weights between bundles only once their bytes are verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from . import _arena, _cache, _memory, share as _share
from .acquire import attached_key, export_key
from .bundle import ITEMSIZE, MANIFEST, Bundle, WeightSpec
from .store import read_manifest_bytes
from .device import DeviceRuntime
from .errors import ShareError, ShareUnavailableError
from .generations import Generation, Listener, switch_methods, warn_unswitched

#: seconds a process waits for the exporter's answer by default (the exporter may still be
#: loading); ``AOTI_RT_SHARE_TIMEOUT`` overrides it (read at each load: :func:`attach_timeout`)
ATTACH_TIMEOUT = 600.0
#: seconds an exporter's atomic update waits for its clients to switch generations, by default
#: (``AOTI_RT_SWAP_TIMEOUT`` overrides it; never longer than :func:`attach_timeout`)
SWAP_TIMEOUT = 60.0
#: seconds a name may stay bound by a process that accepts no connection before a load gives up
#: on it (an exporter binds and listens at once: only a squatter stays so)
SILENT_HOLDER = 2.0
#: manifest kinds that the runtime may place in a shared arena (the .so must agree at bind)
_ARENA_KINDS = ("parameter", "tensor_constant")
#: the largest arena, offset or weight an exporter's answer may name (2**48 bytes: 256 TiB)
_MAX_BYTES = 1 << 48
_scopes = itertools.count(1)

#: a model's part in sharing: it exports its weights, or maps the exporter's
ShareRole = Literal["exporter", "client"]


def _seconds(var: str, default: float) -> float:
    raw = os.environ.get(var)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ShareError(f"{var}={raw!r:.40}: set it to a positive number of seconds")
    return value


def attach_timeout() -> float:
    """Seconds a load waits for the exporter's whole answer: ``$AOTI_RT_SHARE_TIMEOUT`` if set,
    else :data:`ATTACH_TIMEOUT`."""
    return _seconds("AOTI_RT_SHARE_TIMEOUT", ATTACH_TIMEOUT)


def swap_timeout() -> float:
    """Seconds an exporter's atomic update waits for its clients to switch to the new
    generation: ``$AOTI_RT_SWAP_TIMEOUT`` if set, else :data:`SWAP_TIMEOUT`, at most
    :func:`attach_timeout`."""
    return min(_seconds("AOTI_RT_SWAP_TIMEOUT", SWAP_TIMEOUT), attach_timeout())


@dataclass(frozen=True)
class ShareInfo:
    """What ``model.share`` says about a model loaded with ``share=name``.

    Attributes:
        name: the share name.
        role: ``"exporter"`` (its memory, served to others) or ``"client"`` (mapped from the
            exporter's).
        device: the device, as torch spells it.
        exporter_pid: the exporting process.
        clients: processes attached now (exporter; None for a client).
        attached: clients answered so far (exporter; None for a client).
        arenas, arena_bytes: the shared arenas this process maps, and their bytes.
        weights, weight_bytes: the weights bound from them (an exporter's: placed in them).
        private_weights: immutable weights a client read from its own store because the
            exporter did not load them (it loaded fewer methods); 0 for an exporter.
        read_only: whether the arenas are mapped read-only in this process.
        generation: the generation of the arenas this process maps (1: as loaded; each
            atomic update of the exporter serves the next).
    """

    name: str
    role: ShareRole
    device: str
    exporter_pid: int
    clients: int | None
    attached: int | None
    arenas: int
    arena_bytes: int
    weights: int
    weight_bytes: int
    private_weights: int
    read_only: bool
    generation: int = 1


def bundle_identity(bundle: Bundle) -> dict[str, Any]:
    """What names a bundle to other processes: the manifest's SHA-256 (every weight's digest,
    every method) and the identity of its store file (see the module docstring)."""
    manifest = read_manifest_bytes(bundle.root / MANIFEST)
    st = os.stat(bundle.store_path)
    return {"manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "store": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]}


def _arena_estimate(bundle: Bundle, methods: list[str]) -> int:
    """Bytes of the arena that holds the immutable weights of ``methods``: each distinct
    (digest, buffer size) once, each buffer as large as its constants reach (the manifest's
    data sizes, which the .so checks at bind), at 256-byte alignment."""
    man = bundle.manifest
    need: dict[str, int] = {}
    arena: dict[str, bool] = {}
    for name in methods:
        for c in man.methods[name].constants:
            w = man.weights[c.weight]
            n = max(need.get(w.id, w.nbytes), c.storage_offset * ITEMSIZE[c.dtype] + c.data_size)
            need[w.id] = n
            arena[w.id] = arena.get(w.id, True) and not w.mutable and c.kind in _ARENA_KINDS
    distinct = {(man.weights[i].digest, n) for i, n in need.items() if arena[i]}
    align = _memory.SLAB_ALIGN
    return sum(-(-n // align) * align for _, n in distinct)


class _Role:
    """How a model's weights take part in sharing: the hooks ``Method._bind_shared`` calls."""

    name: str
    rt: DeviceRuntime
    #: whether the model reads most of its weights from its store (the loader pre-pins staging)
    reads_store = True

    def route(self, keys: list[_cache.WeightKey], content: list[_cache.WeightKey | None], weights: list[WeightSpec],
              need: list[int], fixed: list[bool]
              ) -> tuple[list[_cache.WeightKey], list[_cache.WeightKey | None], list[Any] | None]:
        """The keys a method acquires, its content keys, and per key the allocator of a weight
        not cached (None: the device's)."""
        return keys, content, None

    def adopt(self, cache: _cache.WeightCache, keys: list[_cache.WeightKey], weights: list[WeightSpec], need: list[int],
              fixed: list[bool]) -> _cache.Acquisition | None:
        """Cache what this process has without reading it (held until the method acquired)."""
        return None

    def filled(self, keys: list[_cache.WeightKey], acq: _cache.Acquisition, weights: list[WeightSpec], need: list[int],
               fixed: list[bool]) -> None:
        """A method has acquired and filled its weights."""

    def ready(self, model: Any = None) -> None:
        """Every method of ``model`` is loaded."""

    def stop(self) -> None:
        """The model is closing: stop serving (an exporter)."""

    def close(self) -> None:
        """The model is closed: let go of the connection and the arenas (idempotent)."""

    def info(self) -> ShareInfo:
        raise NotImplementedError


class Exporter(_Role):
    """The process that holds a bundle's weights for the others: one arena for its immutable
    weights, then a :class:`~aoti_rt.share.ShareServer` answering clients with it, and a new
    generation of the arenas for each atomic update (:meth:`new_generation`)."""

    def __init__(self, server: _share.ShareServer, bundle: Bundle, rt: DeviceRuntime, methods: list[str],
                 verified: bool = False):
        self.name = server.name
        self.rt = rt
        self.server = server
        self.bundle = bundle
        # its own scope of cache keys (EXPORT, owned by this token): its weights are the arena's,
        # even where this process caches the same bundle privately already (a plain load's
        # copy cannot be exported)
        self.scope = f"share:{self.name}:{os.getpid()}:{next(_scopes)}"
        #: verified: every weight read was hashed against its digest (verify="load"), so
        #: copies of the bundle may attach, not only loads of this very store file
        self.identity = {**bundle_identity(bundle), "verified": bool(verified)}
        rt.check_shareable()
        dev = rt.device
        self.allocator = _arena.ArenaAllocator(str(dev), dev.index if dev.is_cuda else -1, rt.context,
                                                parent=rt.allocator)
        rt.arena_allocators.add(self.allocator)
        self.allocator.reserve(_arena_estimate(bundle, methods))
        #: cache key -> (digest, buffer bytes, Buffer) of each weight placed in the arena
        self.records: dict[_cache.WeightKey, tuple[str, int, _memory.Buffer]] = {}
        self.read_only = False
        #: the generation served now: 1 as loaded, one more for each atomic update
        self.generation = 1
        #: the cache's EXPORT entries of a later generation (the methods hold the first's)
        self.hold: _cache.Acquisition | None = None
        self._swap = threading.Lock()
        self._stopped = False
        _EXPORTERS.add(self)

    def route(self, keys, content, weights, need, fixed):
        keys, content = list(keys), list(content)
        allocators: list[Any] = [None] * len(keys)
        for j, f in enumerate(fixed):
            if f:
                keys[j] = export_key(self.scope, weights[j], need[j])
                content[j] = None        # never a content key: that entry may not be the arena's
                allocators[j] = self.allocator
        return keys, content, allocators

    def filled(self, keys, acq, weights, need, fixed):
        for j, f in enumerate(fixed):
            buf = acq.buffers[j]
            if f and buf.allocator is self.allocator:
                self.records[keys[j]] = (weights[j].digest, need[j], buf)

    def ready(self, model: Any = None) -> None:
        """Make the arenas read-only and start serving them."""
        self.read_only = self.allocator.freeze()
        self.server.serve(*self._offer())

    def _offer(self) -> tuple[dict[str, Any], Any]:
        """What a client is sent: the arenas of the generation served now (sizes, kinds, and a
        function making their descriptors) and where each weight is in them."""
        arenas = list(self.allocator.arenas)
        where = {id(a): i for i, a in enumerate(arenas)}
        table = [[digest, nbytes, where[id(buf.arena)], buf.ptr - buf.arena.address]
                 for digest, nbytes, buf in self.records.values()]
        payload = {"name": self.name, "pid": os.getpid(), "identity": self.identity,
                   "device": self.rt.identity(), "generation": self.generation,
                   "arenas": [{"size": a.nbytes, "kind": a.kind} for a in arenas], "weights": table}

        def descriptors() -> list[int]:
            fds: list[int] = []
            try:
                for a in arenas:
                    fds.append(a.export())
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            return fds

        return payload, descriptors

    # -- generations (atomic updates: aoti_rt.generations) ------------------------------------

    @contextlib.contextmanager
    def swapping(self) -> Iterator[None]:
        """Hold this exporter's generation lock: one atomic update at a time, from
        :meth:`new_generation` to :meth:`publish`."""
        with self._swap:
            yield

    def new_generation(self) -> Generation:
        """The next generation: a copy of the arenas served now, writable, each weight at its
        offset (:meth:`aoti_rt.generations.Generation.copy_of`); nothing served is written."""
        gen = Generation.copy_of(self.generation + 1, self.allocator, [r[2] for r in self.records.values()],
                                 self.rt.allocator, self.rt.context, f"the shared arenas of {self.name!r}")
        self.rt.arena_allocators.add(gen.allocator)        # counted in cache_stats() from now
        return gen

    def install(self, gen: Generation) -> None:
        """Serve ``gen`` in this process from now on (the methods are bound to it already): the
        records and the cache's EXPORT keys name its Buffers. The previous generation is held
        until :meth:`publish`."""
        cache = self.rt.cache
        records = {k: (d, n, gen.moved[id(buf)]) for k, (d, n, buf) in self.records.items()}
        gen.retired = [self.allocator, self.records, self.hold]
        if self.hold is not None:
            cache.release(self.hold)
        self.hold = cache.adopt(list(records), [r[2] for r in records.values()])
        self.records = records
        self.allocator = gen.allocator
        self.read_only = all(a.read_only for a in gen.allocator.arenas)
        self.generation = gen.number

    def publish(self, gen: Generation) -> _share.PushResult:
        """Send the installed generation to every client attached and wait for each to switch
        (:func:`swap_timeout`), warning about any that did not; then let go of this process's
        mapping of the previous generation (clients that did not switch keep theirs)."""
        payload, descriptors = self._offer()
        timeout = swap_timeout()
        try:
            result = self.server.push(payload, descriptors, gen.number, timeout)
        finally:
            if self.rt.is_cuda:
                import torch

                torch.cuda.synchronize(self.rt.index)
            old = gen.retired[0] if gen.retired else None
            gen.retired = []
            if old is not None:
                old.close()         # unmapped here with its last Buffer, now
        warn_unswitched(self.name, result, timeout)
        return result

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.server.close()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def close(self) -> None:
        self.stop()
        if self.hold is not None:
            self.rt.cache.release(self.hold)
            self.hold = None
        self.records = {}
        self.allocator.close()

    def info(self) -> ShareInfo:
        s = self.server.stats()
        arenas = list(self.allocator.arenas)
        return ShareInfo(self.name, "exporter", str(self.rt.device), os.getpid(), s["clients"], s["attached"],
                         len(arenas), sum(a.nbytes for a in arenas), len(self.records),
                         sum(n for _, n, _ in self.records.values()), 0, self.read_only, self.generation)


def exporter_of(buffer: Any) -> Exporter | None:
    """The exporter in this process that serves the arena ``buffer`` is carved from (None: no
    exporter does, or it stopped serving)."""
    alloc = getattr(buffer, "allocator", None)
    for e in list(_EXPORTERS):
        if e.allocator is alloc and not e.stopped:
            return e
    return None


_EXPORTERS: "weakref.WeakSet[Exporter]" = weakref.WeakSet()


class Client(_Role):
    """A process that maps the arenas of the exporter of its bundle and reads only what the
    exporter does not hold (its own mutable state).

    The Buffers it maps are cached under keys of its own scope (``Scope.ATTACHED``, owned by this
    attachment; no content key), found only by this model's methods: a plain ``load`` of the
    same bundle in this process, or a ``verify="load"`` load of a copy, reads its own weights and
    never binds the exporter's memory.

    Once its model is loaded (:meth:`ready`) a listener thread waits on the connection for the
    exporter's new generations: it maps each read-only, rebinds every method of the model to it
    at once (all launch locks held), lets go of the previous one once the calls launched on it
    are done, and acknowledges. It never raises into the caller's threads: a generation it
    cannot take is a warning, and the model keeps the one it has."""

    reads_store = False

    def __init__(self, attachment: _share.Attachment, bundle: Bundle, rt: DeviceRuntime):
        self.attachment = attachment
        self.rt = rt
        msg = attachment.payload
        self.exporter_pid = attachment.server_pid
        self.name = str(msg.get("name"))[:64]
        self.scope = f"share-client:{self.name}:{os.getpid()}:{next(_scopes)}"
        fds = attachment.take_fds()
        try:
            theirs, mine = msg.get("identity"), bundle_identity(bundle)
            theirs = theirs if isinstance(theirs, dict) else {}
            if theirs.get("manifest_sha256") != mine["manifest_sha256"]:
                raise ShareError(f"share {self.name!r} is served by pid {self.exporter_pid} for another bundle "
                                 f"(its manifest differs from {bundle.root}'s); load that bundle, or use another "
                                 f"share name")
            if theirs.get("store") != mine["store"] and theirs.get("verified") is not True:
                raise ShareError(f"share {self.name!r} is served by pid {self.exporter_pid} from another copy of "
                                 f"this bundle whose weights it did not verify; load the same bundle directory, "
                                 f"or have the exporter load with verify='load' (serve-weights does)")
            want = rt.identity()
            if msg.get("device") != want:
                raise ShareError(f"share {self.name!r} is served by pid {self.exporter_pid} on device "
                                 f"{str(msg.get('device'))[:80]}, this load is on {rt.device} ({want}); load on "
                                 f"that device, or use another share name")
            rt.check_shareable()
            self.allocator, self.arenas, self.table = self._map(msg, fds)
        finally:
            for fd in fds:
                os.close(fd)
        gen = msg.get("generation", 1)
        self.generation = gen if type(gen) is int else 1
        self.read_only = all(a.read_only for a in self.arenas)
        if not self.read_only:
            warnings.warn(f"share {self.name!r}: the driver mapped the shared weights writable (it cannot map "
                          f"them read-only here); this process must not write them", stacklevel=4)
        self.weights = 0
        self.weight_bytes = 0
        self.private = 0
        #: each weight mapped from the generation mapped now, by its ATTACHED key
        self.mapped: dict[_cache.WeightKey, _memory.Buffer] = {}
        #: the cache's ATTACHED entries of a later generation (the methods hold the first's)
        self.hold: _cache.Acquisition | None = None
        self._model: Any = None
        self._listener: Listener | None = None

    def _map(self, msg: dict[str, Any], fds: list[int]
             ) -> tuple[_arena.ArenaAllocator, list[_arena.SharedArena], dict[tuple[str, int], tuple[int, int]]]:
        """Map the arenas an exporter's answer (or new generation) names, read-only; the
        descriptors stay the caller's."""
        rt = self.rt
        sizes, table = _layout(self.name, msg, len(fds), "cuda-vmm" if rt.is_cuda else "memfd")
        dev = rt.device
        allocator = _arena.ArenaAllocator(str(dev), dev.index if dev.is_cuda else -1, rt.context)
        rt.arena_allocators.add(allocator)
        try:
            arenas = [allocator.attach(fd, n) for fd, n in zip(fds, sizes)]
        except BaseException:
            allocator.close()
            raise
        #: (digest, buffer bytes) -> (arena index, offset)
        return allocator, arenas, table

    def route(self, keys, content, weights, need, fixed):
        keys, content = list(keys), list(content)
        for j, f in enumerate(fixed):
            if f and (weights[j].digest, need[j]) in self.table:
                keys[j] = attached_key(self.scope, weights[j], need[j])
                content[j] = None        # the exporter's memory: never found by content
        return keys, content, None

    def adopt(self, cache, keys, weights, need, fixed):
        ks: list[_cache.WeightKey] = []
        bufs: list[_memory.Buffer] = []
        for j, f in enumerate(fixed):
            if not f or keys[j] in cache:
                continue
            where = self.table.get((weights[j].digest, need[j]))
            if where is None:
                self.private += 1          # the exporter did not load it: read from the store
                continue
            ks.append(keys[j])
            bufs.append(self.allocator.carve(self.arenas[where[0]], where[1], need[j]))
            self.mapped[keys[j]] = bufs[-1]
            self.weights += 1
            self.weight_bytes += need[j]
        return cache.adopt(ks, bufs) if ks else None

    # -- new generations ------------------------------------------------------------------

    def ready(self, model: Any = None) -> None:
        """Start the listener that switches ``model`` (the model whose methods bind this
        client's buffers) to the exporter's new generations."""
        if model is None or self._listener is not None:
            return
        self._model = weakref.ref(model)       # the model may be dropped: its finalizer closes this
        self._listener = Listener(self.attachment, self.name, self._switch, lambda: self.generation, swap_timeout)

    def stop(self) -> None:
        """Stop following the exporter's generations (a switch under way finishes first)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()

    def _switch(self, gen: int, msg: dict[str, Any], fds: list[int]) -> None:
        """Map generation ``gen``, rebind every method of the model to it at once, let go of the
        one mapped now once the calls launched on it are done."""
        try:
            model = self._model() if self._model is not None else None
            if gen <= self.generation or model is None:
                return                   # what it has (it attached after the exporter's update)
            allocator, arenas, table = self._map(msg, fds)
        finally:
            for fd in fds:
                os.close(fd)

        def carve(key: _cache.WeightKey) -> _memory.Buffer:
            where = table.get((key.weight, key.need))
            if where is None:
                raise ShareError(f"the exporter's generation {gen} lacks a weight this process maps "
                                 f"({key.weight[:16]}, {key.need} bytes); refusing it")
            return allocator.carve(arenas[where[0]], where[1], key.need)

        try:
            moved, changes = switch_methods(model.method_list(), self.mapped, carve)
        except BaseException:
            allocator.close()
            raise
        cache = self.rt.cache
        # the previous generation, held until the calls launched on it are done
        retired = [self.allocator, self.mapped, self.hold, changes]
        if self.hold is not None:
            cache.release(self.hold)
        self.hold = cache.adopt(list(moved), list(moved.values()))
        self.allocator, self.arenas, self.table, self.mapped = allocator, arenas, table, moved
        self.generation = gen
        self.read_only = all(a.read_only for a in arenas)
        if self.rt.is_cuda:
            import torch

            torch.cuda.synchronize(self.rt.index)
        retired[0].close()
        retired.clear()                  # unmapped with its last Buffer, here

    def close(self) -> None:
        self.stop()
        if self.hold is not None:
            self.rt.cache.release(self.hold)
            self.hold = None
        self.mapped = {}
        self.attachment.close()            # detached: the exporter's count drops
        self.arenas = []
        self.allocator.close()

    def info(self) -> ShareInfo:
        arenas = list(self.allocator.arenas)
        return ShareInfo(self.name, "client", str(self.rt.device), self.exporter_pid, None, None, len(arenas),
                         sum(a.nbytes for a in arenas), self.weights, self.weight_bytes, self.private,
                         self.read_only, self.generation)


def _layout(name: str, msg: dict[str, Any], nfds: int, kind: str
            ) -> tuple[list[int], dict[tuple[str, int], tuple[int, int]]]:
    """The arena sizes and the weight table of an exporter's answer, checked field by field:
    anything else is a :class:`ShareError` (what it sent is quoted, cut short)."""
    def bad(what: str, value: Any) -> ShareError:
        return ShareError(f"the exporter of {name!r} sent {what} {str(value)[:80]!r}; refusing it (is it the same "
                          f"aoti_rt version?)")

    arenas = msg.get("arenas")
    if not isinstance(arenas, list) or len(arenas) != nfds:
        raise ShareError(f"the exporter of {name!r} sent {nfds} descriptors for "
                         f"{len(arenas) if isinstance(arenas, list) else 'no list of'} arenas; refusing it")
    sizes: list[int] = []
    for a in arenas:
        size = a.get("size") if isinstance(a, dict) else None
        if type(size) is not int or not 0 < size <= _MAX_BYTES:
            raise bad("an arena size", a)
        if a.get("kind") != kind:
            raise bad(f"an arena that is not {kind}", a)
        sizes.append(size)
    rows = msg.get("weights")
    if not isinstance(rows, list):
        raise bad("a weight table that is not a list:", rows)
    table: dict[tuple[str, int], tuple[int, int]] = {}
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str)
                and all(type(v) is int for v in row[1:]) and 0 < row[1] <= _MAX_BYTES
                and 0 <= row[2] < len(sizes) and 0 <= row[3] <= _MAX_BYTES):
            raise bad("a weight entry", row)
        table[(row[0], row[1])] = (row[2], row[3])
    return sizes, table


def begin(bundle: Bundle, rt: DeviceRuntime, name: str, methods: list[str], *, verify: bool | str = True,
          timeout: float | None = None) -> Exporter | Client:
    """Attach to the process that serves ``name``, or claim ``name`` and become its exporter
    (of ``methods``, loaded with ``verify``).

    A process that claims the name first serves it once its load completes; one that finds it
    claimed waits for that answer (``timeout``, default :func:`attach_timeout`: one deadline for
    the whole handshake, whatever the exporter does). If the exporter gives up before answering
    (its load failed, or it closed), this tries again.

    Raises:
        ShareUnavailableError: sharing is impossible now (the name squatted by another user or
            by a process that accepts no connection, no answer by the deadline, a device or
            kernel that cannot share memory): the caller may load privately instead.
        ShareNameError: ``name`` cannot name a share.
        ShareError: the exporter serves another bundle or device, or answered what this
            protocol does not say.
    """
    _share.check_name(name)
    rt.check_shareable()              # ShareUnavailableError: the caller may load privately
    timeout = attach_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    silent_since: float | None = None      # the name bound by a process that accepts nothing
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ShareUnavailableError(f"could neither attach to nor serve share {name!r} in {timeout} s: its "
                                        f"exporters kept going away before answering")
        att = _share.attach(name, timeout=left)
        if att is not None:
            try:
                return Client(att, bundle, rt)
            except BaseException:
                att.close()
                raise
        server = _share.ShareServer.bind(name)
        if server is None:
            now = time.monotonic()
            silent_since = now if silent_since is None else silent_since
            if now - silent_since > SILENT_HOLDER:
                raise ShareUnavailableError(f"share name {name!r} is bound by a process that accepts no "
                                            f"connection (not an aoti_rt exporter); use another share name")
            time.sleep(0.01)          # claimed in between: attach to that process
            continue
        try:
            return Exporter(server, bundle, rt, methods, verified=verify == "load")
        except BaseException:
            server.close()
            raise


__all__ = ["ShareInfo", "ShareRole", "Exporter", "Client", "begin", "bundle_identity", "attach_timeout",
           "ATTACH_TIMEOUT"]
