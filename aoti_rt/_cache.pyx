# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The weight cache: a reference-counted registry ``key -> Buffer``, one per device.

Ownership, in one line each: the :class:`WeightCache` holds one :class:`_Entry` per key, and
the entry holds the :class:`~aoti_rt._memory.Buffer`; an :class:`Acquisition` holds one
reference to each entry a method binds, given back whole by :meth:`WeightCache.release`; an
entry leaves the cache when its count reaches zero, and its memory goes with the last Python
reference to the Buffer (a tensor view handed to a user keeps it alive).
"""

cimport cython
from cpython.object cimport Py_EQ, Py_NE

import threading
from enum import IntEnum

from aoti_rt._memory cimport Allocator, Buffer
from aoti_rt.errors import AotiRtError


class Scope(IntEnum):
    """Which kind of memory a cached buffer is (docs/contract.md): who owns it, who binds it.

    A lookup in one scope never finds a buffer put in another: the scope is part of the key."""

    STORE = 1       #: immutable weight of one store file, shared by the models loaded from it
    CONTENT = 2     #: immutable weight verified against its digest, shared by every model
    INSTANCE = 3    #: a model instance's own state (a buffer some method writes in place)
    PRIVATE = 4     #: a model's own copy of a weight, made by an update
    EXPORT = 5      #: an exporting model's weight in a shared arena
    ATTACHED = 6    #: a client's read-only mapping of an exporter's arena


@cython.final
@cython.no_gc
cdef class WeightKey:
    """A cache key: ``(scope, owner, weight, nbytes, need)``, hashed once at construction.

    ``scope``: a :class:`Scope`; ``owner``: the store's identity (``STORE``), the model
    instance's token (``INSTANCE``, ``PRIVATE``), the exporter's or the attachment's token
    (``EXPORT``, ``ATTACHED``), None for ``CONTENT``; ``weight``: the weight's digest (or its
    id, for a model's own state); ``nbytes``: the weight's bytes; ``need``: its buffer's
    bytes (at least ``nbytes``). Keys are made by the key policy of :mod:`aoti_rt.acquire`,
    one function per scope, never from strings.
    """

    def __init__(self, scope, owner, str weight, Py_ssize_t nbytes, Py_ssize_t need):
        if need < nbytes or nbytes < 0:
            raise ValueError(f"a weight key needs 0 <= nbytes <= need, not {nbytes}, {need}")
        if type(scope) is not Scope:
            scope = Scope(scope)
        self.scope = scope
        self._scope = scope._value_
        if (owner is None) != (self._scope == 2):          # CONTENT
            raise ValueError(f"a {scope.name} key {'has no' if self._scope == 2 else 'needs an'} owner")
        self.owner = owner
        self.weight = weight
        self.nbytes = nbytes
        self.need = need
        self._hash = hash((self._scope, owner, weight, nbytes, need))

    def __hash__(self):
        return self._hash

    def __richcmp__(self, other, int op):
        if op != Py_EQ and op != Py_NE:
            return NotImplemented
        if not isinstance(other, WeightKey):
            return op == Py_NE
        cdef WeightKey o = <WeightKey>other
        cdef bint same = self is o or (self._hash == o._hash and self._scope == o._scope and self.nbytes == o.nbytes
                                       and self.need == o.need and self.weight == o.weight
                                       and (self.owner is o.owner or self.owner == o.owner))
        return same if op == Py_EQ else not same

    def __repr__(self):
        size = f"{self.nbytes}" if self.need == self.nbytes else f"{self.nbytes}+{self.need - self.nbytes}"
        return f"WeightKey({self.scope.name}, {self.owner!r}, {self.weight!r}, {size})"

    def __reduce__(self):
        return (WeightKey, (int(self.scope), self.owner, self.weight, self.nbytes, self.need))


# Not tracked by the cyclic GC: a model with 100k weights makes 100k entries and buffers, and
# the collector re-walking them made acquiring 10x slower. An entry refers to its key (str),
# its Buffer and an error message (str), none of which can lead back to it.
@cython.no_gc
cdef class _Entry:
    """One cached weight: its key, its Buffer and its reference count."""


cdef class Acquisition:
    """What :meth:`WeightCache.acquire` hands back: one Buffer per key, and the work left.

    ``to_fill`` lists the indices of keys this caller created and must fill, then
    :meth:`WeightCache.publish`; ``pending`` those another thread is filling now. The
    acquisition is given back whole with :meth:`WeightCache.release`.
    """


cdef inline void _start(Acquisition acq, list keys):
    """An empty acquisition of ``keys``: no buffer, no entry, nothing to fill or wait for yet."""
    acq.keys = keys
    acq.buffers = [None] * len(keys)
    acq.entries = []
    acq.to_fill = []
    acq.pending = []


cdef class WeightCache:
    """Reference-counted registry ``key -> Buffer`` shared by every method in the process.

    Keys are :class:`WeightKey` objects made by the runtime's key policy (its scope, owner,
    weight and sizes): a lookup in one scope never finds an entry of another. All operations are
    thread-safe; an entry is created once however many threads ask for it at the same time.
    References are held by :class:`Acquisition` objects, so a release always drops exactly
    the entries that were acquired, even if a failed entry has since been replaced.
    """

    def __init__(self):
        self._entries = {}
        self._lock = threading.Lock()
        self._filled = threading.Condition(self._lock)

    def __len__(self):
        return len(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def refcount(self, key) -> int:
        cdef _Entry e = self._entries.get(key)
        return 0 if e is None else e.refs

    def acquire(self, list keys, list sizes, Allocator allocator, list allocators=None) -> Acquisition:
        """Take one reference to each key, allocating (not filling) those not cached.

        A key not cached is allocated by ``allocators[i]`` where that is given and not None
        (weights an exporter places in a shared arena), else by ``allocator``. On allocation
        failure every reference taken by this call is given back and the error propagates, so
        a failed acquire leaves the cache as it was.
        """
        cdef Acquisition acq = Acquisition.__new__(Acquisition)
        cdef Py_ssize_t i, n = len(keys)
        cdef _Entry e
        cdef Allocator alloc
        if len(sizes) != n or (allocators is not None and len(allocators) != n):
            raise ValueError("keys, sizes and allocators differ in length")
        _start(acq, keys)
        with self._lock:
            try:
                for i in range(n):
                    key = keys[i]
                    e = self._entries.get(key)
                    if e is not None:
                        e.refs += 1
                        self.hits += 1
                        if e.loading:
                            acq.pending.append(i)
                    else:
                        alloc = allocator if allocators is None or allocators[i] is None else allocators[i]
                        e = _Entry.__new__(_Entry)
                        e.key = key
                        e.buffer = alloc.allocate(<size_t>sizes[i])
                        e.refs = 1
                        e.loading = True
                        self._entries[key] = e
                        self.misses += 1
                        acq.to_fill.append(i)
                    acq.entries.append(e)
                    acq.buffers[i] = e.buffer
            except BaseException:
                created = set(acq.to_fill)
                for i in range(len(acq.entries)):
                    if i in created:
                        self.misses -= 1
                    else:
                        self.hits -= 1
                self._release_locked(acq)
                raise
        return acq

    def adopt(self, list keys, list buffers) -> Acquisition:
        """Take one reference to each key, caching ``buffers[i]`` under ``keys[i]`` where the key
        is not cached: Buffers whose bytes are there already (mapped from another process that
        exports them). A key that is cached keeps its own entry (``buffers[i]`` is not used).

        Nothing is counted as a hit or a miss (the method that acquires the keys next counts
        its hits) and nothing is left to fill; give the references back with :meth:`release`.
        """
        cdef Acquisition acq = Acquisition.__new__(Acquisition)
        cdef Py_ssize_t i, n = len(keys)
        cdef _Entry e
        if len(buffers) != n:
            raise ValueError("keys and buffers differ in length")
        for b in buffers:
            if not isinstance(b, Buffer):
                raise TypeError(f"adopt() takes Buffers, not {type(b).__name__}")
        _start(acq, keys)
        with self._lock:
            for i in range(n):
                key = keys[i]
                e = self._entries.get(key)
                if e is None:
                    e = _Entry.__new__(_Entry)
                    e.key = key
                    e.buffer = <Buffer>buffers[i]
                    self._entries[key] = e
                elif e.loading:
                    acq.pending.append(i)
                e.refs += 1
                acq.entries.append(e)
                acq.buffers[i] = e.buffer
        return acq

    cdef _unlink_locked(self, _Entry e):
        """No key names ``e`` any more (its own and its aliases); its holders keep it."""
        if self._entries.get(e.key) is e:
            del self._entries[e.key]
        if e.aliases is not None:
            for k in e.aliases:
                if self._entries.get(k) is e:
                    del self._entries[k]

    cdef _release_locked(self, Acquisition acq):
        cdef _Entry e
        if acq.released:
            return
        acq.released = True
        for e in acq.entries:
            e.refs -= 1
            if e.refs <= 0:
                self._unlink_locked(e)
        acq.entries = []
        acq.buffers = []

    def publish(self, Acquisition acq, error=None):
        """Mark the entries this caller filled as ready, or as failed with ``error``.

        A failed entry is unlinked at once, so no later caller finds it; a thread waiting
        on it is woken and raises.
        """
        cdef _Entry e
        with self._lock:
            for i in acq.to_fill:
                e = acq.entries[i]
                e.loading = False
                if error is not None:
                    e.error = f"{type(error).__name__}: {error}"
                    e.error_type = type(error)
                    if self._entries.get(e.key) is e:
                        del self._entries[e.key]
            if acq.to_fill:
                self._filled.notify_all()

    def wait(self, Acquisition acq, timeout=None):
        """Block until entries filled by other threads are ready; raise if a fill failed."""
        cdef _Entry e
        with self._lock:
            for i in acq.pending:
                e = acq.entries[i]
                while e.loading:
                    if not self._filled.wait(timeout):
                        raise AotiRtError(f"timed out after {timeout} s waiting for weight {e.key!r}, "
                                          f"which another thread is loading")
                if e.error is not None:
                    # the filler's own error class where it is one of ours (BundleError for a
                    # corrupt store, CudaError, ...), so callers handle both threads alike
                    cls = e.error_type if isinstance(e.error_type, type) and \
                        issubclass(e.error_type, AotiRtError) else AotiRtError
                    msg = f"loading weight {e.key!r} failed in another thread: {e.error}"
                    try:
                        err = cls(msg)
                    except Exception:        # a class whose constructor takes other arguments
                        err = AotiRtError(msg)
                    raise err

    def release(self, Acquisition acq):
        """Give back every reference ``acq`` holds; entries at zero leave the cache.

        Their memory is freed when the last Python reference to the Buffer (a tensor view
        handed to a user, say) goes too. Releasing twice is a no-op.
        """
        with self._lock:
            self._release_locked(acq)

    def alias(self, WeightKey key, WeightKey new_key) -> bool:
        """Let ``new_key`` name the filled entry cached under ``key`` too, so acquiring either
        shares one Buffer and one reference count; the entry leaves under all its names.

        The runtime names a weight by content in the whole process only once its bytes were
        verified, so it aliases a store's own entry rather than copying it: ``key`` must be a
        ``STORE`` key and ``new_key`` the ``CONTENT`` key of the same weight and sizes (no other
        scope is ever reachable from another; a ValueError says so). Returns False (and
        changes nothing) if ``key`` is not a filled entry or ``new_key`` names another.
        """
        cdef _Entry e
        if key._scope != 1 or new_key._scope != 2 or key.weight != new_key.weight \
                or key.nbytes != new_key.nbytes or key.need != new_key.need:
            raise ValueError(f"only a STORE entry may also be named by its CONTENT key, not {key!r} by {new_key!r}")
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.loading or e.error is not None:
                return False
            other = self._entries.get(new_key)
            if other is not None:
                return other is e
            self._entries[new_key] = e
            if e.aliases is None:
                e.aliases = []
            e.aliases.append(new_key)
            return True

    def forget(self, key) -> bool:
        """Unlink the entry named ``key`` (and its aliases) so that no later :meth:`acquire`
        finds it; whoever holds it keeps it (its references and Buffer are untouched).

        For memory whose bytes no longer are what the key says (``update_weights`` wrote new
        values into it). Returns False if no entry has that name."""
        cdef _Entry e
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return False
            self._unlink_locked(e)
            return True

    def replace(self, Acquisition acq, Py_ssize_t i, Buffer buffer):
        """Give back ``acq``'s reference to its ``i``-th entry and hold ``buffer`` there
        instead, as a private entry no key names (a copy-on-write replacement); it goes with
        the acquisition's release like the others."""
        cdef _Entry e, mine
        with self._lock:
            if acq.released:
                raise AotiRtError("the acquisition was released")
            e = acq.entries[i]
            e.refs -= 1
            if e.refs <= 0:
                self._unlink_locked(e)
            mine = _Entry.__new__(_Entry)
            mine.key = None
            mine.buffer = buffer
            mine.refs = 1
            acq.entries[i] = mine
            acq.buffers[i] = buffer

    def take_over(self, key, Py_ssize_t refs) -> bool:
        """Unlink the entry named ``key`` (and its aliases) if its reference count is ``refs``,
        all of them held by the caller, so that no later :meth:`acquire` finds it; the holders
        keep the Buffer. Returns False (and changes nothing) if the entry is not cached, not
        filled, or has other holders.

        How an update makes a weight it holds alone its own (written in place, no copy)."""
        cdef _Entry e
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.loading or e.error is not None or e.refs != refs:
                return False
            self._unlink_locked(e)
            return True

    def buffer(self, key):
        """The Buffer cached under ``key``, or None (the cache count is unchanged)."""
        cdef _Entry e = self._entries.get(key)
        return None if e is None else e.buffer

    def stats(self) -> dict:
        with self._lock:
            unique = {id(e): e for e in self._entries.values()}.values()    # aliases once
            return {"entries": len(unique), "hits": self.hits,
                    "misses": self.misses, "bytes_read": self.bytes_read,
                    "cached_bytes": sum((<_Entry>e).buffer.nbytes for e in unique)}

    def add_bytes_read(self, long long n):
        with self._lock:
            self.bytes_read += n

    def lookup_many(self, list keys) -> int:
        """Count how many of ``keys`` are cached (the lookup the bench times per key)."""
        cdef Py_ssize_t found = 0
        cdef dict entries = self._entries
        for key in keys:
            if key in entries:
                found += 1
        return found

