# cython: language_level=3
"""The weight cache: a reference-counted registry ``key -> Buffer`` (see ``_cache.pyx``)."""

from aoti_rt._memory cimport Allocator, Buffer


cdef class WeightKey:
    cdef readonly object scope     # Scope
    cdef int _scope                # its value, compared in C
    cdef readonly object owner
    cdef readonly str weight
    cdef readonly Py_ssize_t nbytes
    cdef readonly Py_ssize_t need
    cdef Py_hash_t _hash


cdef class _Entry:
    cdef readonly object key
    cdef readonly Buffer buffer
    cdef readonly Py_ssize_t refs
    cdef bint loading      # True while the first user fills it
    cdef str error         # why the fill failed, for waiters (a message: no traceback cycles)
    cdef object error_type # the failed fill's exception class, re-raised for waiters
    cdef list aliases      # further keys that name this entry (WeightCache.alias), or None


cdef class Acquisition:
    cdef readonly list keys
    cdef readonly list buffers
    cdef readonly list to_fill
    cdef readonly list pending
    cdef list entries
    cdef bint released


cdef class WeightCache:
    cdef dict _entries
    cdef object _lock
    cdef object _filled    # Condition on _lock: some fill finished
    cdef readonly long long hits
    cdef readonly long long misses
    cdef readonly long long bytes_read

    cdef _unlink_locked(self, _Entry e)
    cdef _release_locked(self, Acquisition acq)
