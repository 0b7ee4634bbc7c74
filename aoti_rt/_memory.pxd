# cython: language_level=3
"""Raw memory: the CUDA driver table, allocators and the Buffer that owns one allocation.

cimported by the cache (``_cache``), the load pipeline (``_load``) and the shared arenas
(``_arena``); see ``_memory.pyx``.
"""

from libc.stdint cimport uintptr_t

# ---- the CUDA driver entry points aoti_rt calls (filled by install_driver) ---------------

ctypedef int CUresult
ctypedef unsigned long long CUdeviceptr
ctypedef void* CUcontext
ctypedef void* CUstream
ctypedef void* CUevent

ctypedef CUresult (*f_ctx_push)(CUcontext) noexcept nogil
ctypedef CUresult (*f_ctx_pop)(CUcontext*) noexcept nogil
ctypedef CUresult (*f_mem_alloc)(CUdeviceptr*, size_t) noexcept nogil
ctypedef CUresult (*f_mem_free)(CUdeviceptr) noexcept nogil
ctypedef CUresult (*f_host_alloc)(void**, size_t, unsigned int) noexcept nogil
ctypedef CUresult (*f_host_free)(void*) noexcept nogil
ctypedef CUresult (*f_host_register)(void*, size_t, unsigned int) noexcept nogil
ctypedef CUresult (*f_host_unregister)(void*) noexcept nogil
ctypedef CUresult (*f_memcpy_htod_async)(CUdeviceptr, const void*, size_t, CUstream) noexcept nogil
ctypedef CUresult (*f_memcpy_peer_async)(CUdeviceptr, CUcontext, CUdeviceptr, CUcontext, size_t,
                                         CUstream) noexcept nogil
ctypedef CUresult (*f_stream_wait_event)(CUstream, CUevent, unsigned int) noexcept nogil
ctypedef CUresult (*f_stream_create)(CUstream*, unsigned int) noexcept nogil
ctypedef CUresult (*f_stream_destroy)(CUstream) noexcept nogil
ctypedef CUresult (*f_stream_sync)(CUstream) noexcept nogil
ctypedef CUresult (*f_event_create)(CUevent*, unsigned int) noexcept nogil
ctypedef CUresult (*f_event_record)(CUevent, CUstream) noexcept nogil
ctypedef CUresult (*f_event_sync)(CUevent) noexcept nogil
ctypedef CUresult (*f_event_destroy)(CUevent) noexcept nogil

# CUDA virtual memory management (VMM): the layouts of cuda.h (12.x and 13.0), declared here so
# that no CUDA header is needed to build. Enum-typed fields are C ints (4 bytes); the sizes are
# checked at compile time in _memory.pyx (8, 32 and 12 bytes).
ctypedef unsigned long long CUmemGenericAllocationHandle

cdef struct CUmemLocation:
    int type                   # CUmemLocationType: 1 = CU_MEM_LOCATION_TYPE_DEVICE
    int id                     # the device ordinal

cdef struct CUmemAllocFlags:
    unsigned char compressionType
    unsigned char gpuDirectRDMACapable
    unsigned short usage
    unsigned char reserved[4]

cdef struct CUmemAllocationProp:
    int type                   # CUmemAllocationType: 1 = CU_MEM_ALLOCATION_TYPE_PINNED
    int requestedHandleTypes   # CUmemAllocationHandleType: 1 = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    CUmemLocation location
    void* win32HandleMetaData
    CUmemAllocFlags allocFlags

cdef struct CUmemAccessDesc:
    CUmemLocation location
    int flags                  # CUmemAccess_flags: 1 = PROT_READ, 3 = PROT_READWRITE

ctypedef CUresult (*f_mem_create)(CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*,
                                  unsigned long long) noexcept nogil
ctypedef CUresult (*f_mem_release)(CUmemGenericAllocationHandle) noexcept nogil
ctypedef CUresult (*f_mem_address_reserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr,
                                           unsigned long long) noexcept nogil
ctypedef CUresult (*f_mem_address_free)(CUdeviceptr, size_t) noexcept nogil
ctypedef CUresult (*f_mem_map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                               unsigned long long) noexcept nogil
ctypedef CUresult (*f_mem_unmap)(CUdeviceptr, size_t) noexcept nogil
ctypedef CUresult (*f_mem_set_access)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t) noexcept nogil
ctypedef CUresult (*f_mem_granularity)(size_t*, const CUmemAllocationProp*, int) noexcept nogil
ctypedef CUresult (*f_mem_export)(void*, CUmemGenericAllocationHandle, int, unsigned long long) noexcept nogil
ctypedef CUresult (*f_mem_import)(CUmemGenericAllocationHandle*, void*, int) noexcept nogil

cdef struct Driver:
    f_ctx_push ctx_push
    f_ctx_pop ctx_pop
    f_mem_alloc mem_alloc
    f_mem_free mem_free
    f_host_alloc host_alloc
    f_host_free host_free
    f_host_register host_register
    f_host_unregister host_unregister
    f_memcpy_htod_async memcpy_htod_async
    f_memcpy_peer_async memcpy_peer_async
    f_stream_wait_event stream_wait_event
    f_stream_create stream_create
    f_stream_destroy stream_destroy
    f_stream_sync stream_sync
    f_event_create event_create
    f_event_record event_record
    f_event_sync event_sync
    f_event_destroy event_destroy
    # optional: VMM, for weights shared across processes (NULL where the driver lacks them)
    f_mem_create mem_create
    f_mem_release mem_release
    f_mem_address_reserve mem_address_reserve
    f_mem_address_free mem_address_free
    f_mem_map mem_map
    f_mem_unmap mem_unmap
    f_mem_set_access mem_set_access
    f_mem_granularity mem_granularity
    f_mem_export mem_export
    f_mem_import mem_import

#: the process's driver table, whether install_driver filled it, and whether it found every
#: VMM entry point
cdef Driver drv
cdef bint drv_ready
cdef bint drv_vmm

#: raise CudaError(what, rc) unless rc is CUDA_SUCCESS
cdef int check(CUresult rc, str what) except -1

# ---- the current context: every push/pop pair of the Cython modules goes through these ---

cdef inline CUresult ctx_enter(CUcontext ctx) noexcept nogil:
    """Make ``ctx`` the calling thread's current context (cuCtxPushCurrent); only where this
    returns 0 must :func:`ctx_leave` follow."""
    return drv.ctx_push(ctx)

cdef inline void ctx_leave() noexcept nogil:
    """Make the context current before the matching :func:`ctx_enter` current again."""
    cdef CUcontext prev
    drv.ctx_pop(&prev)

# ---- atomics on a long long, for counters shared by worker threads ----------------------

cdef extern from *:
    """
    static inline void aoti_rt_atomic_add(long long* p, long long v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
    static inline long long aoti_rt_atomic_load(long long* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline long long aoti_rt_atomic_load_acq(long long* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline long long aoti_rt_atomic_add_acqrel(long long* p, long long v) { return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL); }
    static inline long long aoti_rt_atomic_or(long long* p, long long v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
    static inline int aoti_rt_atomic_cas(long long* p, long long expect, long long desired) {
        return __atomic_compare_exchange_n(p, &expect, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    """
    void aoti_rt_atomic_add(long long* p, long long v) nogil
    long long aoti_rt_atomic_load(long long* p) nogil
    long long aoti_rt_atomic_load_acq(long long* p) nogil
    long long aoti_rt_atomic_add_acqrel(long long* p, long long v) nogil
    long long aoti_rt_atomic_or(long long* p, long long v) nogil
    int aoti_rt_atomic_cas(long long* p, long long expect, long long desired) nogil

# ---- allocators and buffers -------------------------------------------------------------

cdef class _Slab:
    cdef uintptr_t ptr
    cdef size_t size
    cdef size_t used       # bump offset of the next buffer
    cdef Py_ssize_t live   # Buffers carved from it and still alive
    cdef readonly bint is_arena    # a SharedArena (aoti_rt._arena)
    cdef readonly bint read_only   # mapped read-only in this process (a SharedArena's)

#: count an arena mapped (n=1, its bytes) or unmapped (n=-1, minus its bytes): arena_totals()
cdef void count_arena(int n, long long nbytes) noexcept


cdef class Allocator:
    cdef readonly str device
    cdef readonly Py_ssize_t bytes_allocated
    cdef readonly Py_ssize_t peak_bytes_allocated
    cdef readonly Py_ssize_t bytes_reserved
    cdef readonly Py_ssize_t peak_bytes_reserved
    cdef readonly Py_ssize_t num_allocations
    cdef readonly Py_ssize_t num_slabs
    cdef public Py_ssize_t limit
    cdef public size_t small_max
    cdef readonly bint is_cuda
    cdef _Slab _slab       # the slab small Buffers are carved from now (None: none)

    cdef int _raw_alloc(self, size_t nbytes, uintptr_t* out) noexcept nogil
    cdef void _raw_free(self, uintptr_t ptr, size_t nbytes) noexcept nogil
    cdef uintptr_t _reserve(self, size_t n) except 0
    cdef void _unreserve(self, uintptr_t ptr, size_t n) noexcept
    cpdef Buffer allocate(self, size_t nbytes)
    cdef void _free(self, Buffer buf) noexcept


cdef class HostAllocator(Allocator):
    pass


cdef class CudaAllocator(Allocator):
    cdef CUcontext ctx
    cdef readonly int ordinal


cdef class PinnedAllocator(Allocator):
    cdef CUcontext ctx
    cdef readonly bint huge_pages     # page-locked by cuMemHostRegister over huge-page mmaps


cdef class Buffer:
    cdef readonly uintptr_t ptr
    cdef readonly size_t nbytes
    cdef readonly Allocator allocator
    cdef _Slab slab        # the slab or SharedArena it was carved from (kept alive by this
                           # reference), or None: it owns its raw memory
    cdef Py_ssize_t _shape[1]
