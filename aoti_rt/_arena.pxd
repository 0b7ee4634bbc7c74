# cython: language_level=3
"""Memory shared across processes: :class:`SharedArena` and :class:`ArenaAllocator`; see
``_arena.pyx``. cimports the driver table, Allocator and Buffer from ``_memory``."""

from libc.stdint cimport uintptr_t

from aoti_rt._memory cimport (Allocator, Buffer, CUcontext, CUmemGenericAllocationHandle, _Slab)


cdef class SharedArena(_Slab):
    # _Slab's ptr/size/used/live/read_only: its mapping, its bytes (rounded up to a page or the VMM
    # granularity), the bump offset of the next Buffer and the Buffers carved from it and alive
    cdef readonly str device
    cdef readonly bint is_cuda
    cdef readonly bint imported    # mapped from another process's handle
    cdef int fd                    # host: the memfd it maps (owned); -1 otherwise
    cdef CUmemGenericAllocationHandle handle   # cuda: the VMM allocation (owned); 0 otherwise
    cdef CUcontext ctx
    cdef int ordinal
    cdef bint mapped

    cdef _setup(self, str device, int ordinal, uintptr_t context)
    cdef _mapped(self)
    cdef _create_host(self, size_t nbytes)
    cdef _attach_host(self, int fd, size_t nbytes)
    cdef _create_cuda(self, size_t nbytes)
    cdef _attach_cuda(self, int fd, size_t nbytes)
    cdef int _unmap(self) noexcept



cdef class ArenaAllocator(Allocator):
    cdef readonly list arenas      # the SharedArenas it counts in bytes_reserved
    cdef readonly int ordinal      # the CUDA device's ordinal; -1: host memory (memfd)
    cdef CUcontext ctx
    cdef readonly Allocator parent # whose memory limit its new arenas respect (or None)
    cdef readonly bint frozen      # no more carving: its arenas are exported (and read-only)
    cdef readonly bint closed
    cdef public size_t grow_bytes  # the least size of an arena opened when the current is full
    cdef SharedArena _current      # the arena allocate() carves from now (None: none)
    cdef object __weakref__

    cdef SharedArena _open(self, size_t nbytes)
    cdef _count_arena(self, SharedArena arena)
    cdef void _drop(self, SharedArena arena) noexcept
    cdef Buffer _buffer(self, SharedArena arena, size_t offset, size_t n)
