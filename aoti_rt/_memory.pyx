# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Raw memory for one device: the CUDA driver table, allocators, and the Buffer that owns
one allocation (the habits of CuPy's ``memory.pyx``).

Ownership, in one line each:

* an :class:`Allocator` hands out raw memory for one device and keeps its accounting
  (:class:`HostAllocator` ``posix_memalign``, :class:`CudaAllocator` ``cuMemAlloc``,
  :class:`PinnedAllocator` ``cuMemHostAlloc``);
* a :class:`Buffer` owns one allocation and frees it in ``__dealloc__``, so any Python
  object that holds the Buffer (a cache entry, a load plan, a tensor view given to a user)
  keeps the memory alive;
* a :class:`~aoti_rt._arena.SharedArena` (module :mod:`aoti_rt._arena`) is one mapping of
  memory that other processes can map too, and an :class:`~aoti_rt._arena.ArenaAllocator`
  carves Buffers out of arenas (each Buffer keeps its arena alive, as slab Buffers keep their
  slab); the module says how weights are shared across processes.

CUDA is reached through driver entry points that cuda-python resolved
(``cuGetProcAddress``); :func:`install_driver` receives their addresses, so this module
needs no CUDA header to build and imports on machines without a GPU.
"""

cimport cython
from cpython.buffer cimport PyBUF_WRITABLE
from libc.stdint cimport uintptr_t
from libc.stdlib cimport free

from aoti_rt.errors import AllocationError, CudaError

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)

cdef extern from "sys/mman.h" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    int madvise(void* addr, size_t length, int advice)
    void* MAP_FAILED
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MADV_HUGEPAGE


# ----------------------------------------------------------------------------------------
# CUDA driver entry points (filled by install_driver from cuda-python's cuGetProcAddress)

drv_ready = False

#: driver symbol -> the Driver field it fills; cuda.py resolves exactly these names.
DRIVER_SYMBOLS = (
    "cuCtxPushCurrent", "cuCtxPopCurrent", "cuMemAlloc", "cuMemFree", "cuMemHostAlloc",
    "cuMemFreeHost", "cuMemHostRegister", "cuMemHostUnregister", "cuMemcpyHtoDAsync", "cuStreamCreate",
    "cuStreamDestroy", "cuStreamSynchronize", "cuEventCreate", "cuEventRecord",
    "cuEventSynchronize", "cuEventDestroy", "cuMemcpyPeerAsync", "cuStreamWaitEvent",
)


#: the virtual memory management entry points of weights shared across processes: optional (a
#: driver without them loads without ``share=``); cuda.py resolves them where it can
VMM_SYMBOLS = (
    "cuMemCreate", "cuMemRelease", "cuMemAddressReserve", "cuMemAddressFree", "cuMemMap",
    "cuMemUnmap", "cuMemSetAccess", "cuMemGetAllocationGranularity", "cuMemExportToShareableHandle",
    "cuMemImportFromShareableHandle",
)

drv_vmm = False

#: the VMM structs declared in _memory.pxd have cuda.h's sizes on this platform (8, 32, 12 bytes);
#: where they do not, VMM stays off rather than passing the driver a misread struct
VMM_LAYOUT_OK = (sizeof(CUmemLocation) == 8 and sizeof(CUmemAllocationProp) == 32
                 and sizeof(CUmemAccessDesc) == 12)


def vmm_available() -> bool:
    """Whether the installed driver table has every VMM entry point (:data:`VMM_SYMBOLS`)."""
    return drv_ready and drv_vmm


def install_driver(dict pointers):
    """Install the CUDA driver entry points, ``{symbol: address}`` for DRIVER_SYMBOLS and,
    where present (non-zero), VMM_SYMBOLS."""
    global drv_ready, drv_vmm
    missing = [s for s in DRIVER_SYMBOLS if not pointers.get(s)]
    if missing:
        raise CudaError(f"resolving the CUDA driver entry points {missing}", 500)
    drv.ctx_push = <f_ctx_push><uintptr_t>pointers["cuCtxPushCurrent"]
    drv.ctx_pop = <f_ctx_pop><uintptr_t>pointers["cuCtxPopCurrent"]
    drv.mem_alloc = <f_mem_alloc><uintptr_t>pointers["cuMemAlloc"]
    drv.mem_free = <f_mem_free><uintptr_t>pointers["cuMemFree"]
    drv.host_alloc = <f_host_alloc><uintptr_t>pointers["cuMemHostAlloc"]
    drv.host_free = <f_host_free><uintptr_t>pointers["cuMemFreeHost"]
    drv.host_register = <f_host_register><uintptr_t>pointers["cuMemHostRegister"]
    drv.host_unregister = <f_host_unregister><uintptr_t>pointers["cuMemHostUnregister"]
    drv.memcpy_htod_async = <f_memcpy_htod_async><uintptr_t>pointers["cuMemcpyHtoDAsync"]
    drv.memcpy_peer_async = <f_memcpy_peer_async><uintptr_t>pointers["cuMemcpyPeerAsync"]
    drv.stream_wait_event = <f_stream_wait_event><uintptr_t>pointers["cuStreamWaitEvent"]
    drv.stream_create = <f_stream_create><uintptr_t>pointers["cuStreamCreate"]
    drv.stream_destroy = <f_stream_destroy><uintptr_t>pointers["cuStreamDestroy"]
    drv.stream_sync = <f_stream_sync><uintptr_t>pointers["cuStreamSynchronize"]
    drv.event_create = <f_event_create><uintptr_t>pointers["cuEventCreate"]
    drv.event_record = <f_event_record><uintptr_t>pointers["cuEventRecord"]
    drv.event_sync = <f_event_sync><uintptr_t>pointers["cuEventSynchronize"]
    drv.event_destroy = <f_event_destroy><uintptr_t>pointers["cuEventDestroy"]
    vmm = {s: int(pointers.get(s) or 0) for s in VMM_SYMBOLS}
    drv_vmm = all(vmm.values()) and VMM_LAYOUT_OK
    if drv_vmm:
        drv.mem_create = <f_mem_create><uintptr_t>vmm["cuMemCreate"]
        drv.mem_release = <f_mem_release><uintptr_t>vmm["cuMemRelease"]
        drv.mem_address_reserve = <f_mem_address_reserve><uintptr_t>vmm["cuMemAddressReserve"]
        drv.mem_address_free = <f_mem_address_free><uintptr_t>vmm["cuMemAddressFree"]
        drv.mem_map = <f_mem_map><uintptr_t>vmm["cuMemMap"]
        drv.mem_unmap = <f_mem_unmap><uintptr_t>vmm["cuMemUnmap"]
        drv.mem_set_access = <f_mem_set_access><uintptr_t>vmm["cuMemSetAccess"]
        drv.mem_granularity = <f_mem_granularity><uintptr_t>vmm["cuMemGetAllocationGranularity"]
        drv.mem_export = <f_mem_export><uintptr_t>vmm["cuMemExportToShareableHandle"]
        drv.mem_import = <f_mem_import><uintptr_t>vmm["cuMemImportFromShareableHandle"]
    drv_ready = True


cdef int check(CUresult rc, str what) except -1:
    if rc != 0:
        raise CudaError(what, rc)
    return 0


# ----------------------------------------------------------------------------------------
# Allocators and buffers

cdef enum:
    _SLAB_ALIGN = 256
    # CU_MEMHOSTALLOC_PORTABLE and CU_MEMHOSTREGISTER_PORTABLE (cuda.h): both 0x01
    _HOST_PORTABLE = 0x01

#: buffers up to this size are carved from shared slabs (one raw allocation per slab, not
#: per weight: a model with 10k small constants pays ~10 cuMemAlloc calls, not 10k)
SMALL_MAX = 64 << 10
#: bytes of one slab
SLAB_BYTES = 2 << 20
#: alignment of a buffer inside a slab (cuMemAlloc's own is 256; Triton kernels assume 16)
SLAB_ALIGN = _SLAB_ALIGN


cdef class _Slab:
    """One raw allocation that small Buffers are carved from, returned when its last goes."""



cdef class Allocator:
    """Raw memory for one device, with exact accounting of what is live.

    ``bytes_allocated`` and ``peak_bytes_allocated`` count the bytes of live Buffers;
    ``bytes_reserved`` and ``peak_bytes_reserved`` the raw memory behind them (slabs
    included, so at most one partly used slab more than the live bytes when nothing was
    freed). Buffers of at most ``small_max`` bytes (0: none) share :data:`SLAB_BYTES` slabs,
    a slab being returned when its last Buffer goes. ``limit`` (0: none) caps
    ``bytes_allocated``: an allocation past it raises :class:`AllocationError` as a full
    device would.
    """


    def __cinit__(self, *args, **kwargs):
        self.small_max = SMALL_MAX

    def __init__(self, str device):
        self.device = device

    cdef int _raw_alloc(self, size_t nbytes, uintptr_t* out) noexcept nogil:
        return -1

    cdef void _raw_free(self, uintptr_t ptr, size_t nbytes) noexcept nogil:
        pass

    cdef uintptr_t _reserve(self, size_t n) except 0:
        """Raw memory of ``n`` bytes, counted in ``bytes_reserved``."""
        cdef uintptr_t ptr = 0
        cdef int rc
        with nogil:
            rc = self._raw_alloc(n, &ptr)
        if rc != 0 or ptr == 0:
            raise AllocationError(
                f"could not allocate {n} bytes on {self.device} (error {rc}, "
                f"{self.bytes_reserved} bytes held by aoti_rt); free device memory "
                f"or close unused models")
        self.bytes_reserved += n
        if self.bytes_reserved > self.peak_bytes_reserved:
            self.peak_bytes_reserved = self.bytes_reserved
        return ptr

    cdef void _unreserve(self, uintptr_t ptr, size_t n) noexcept:
        with nogil:
            self._raw_free(ptr, n)
        self.bytes_reserved -= n

    cpdef Buffer allocate(self, size_t nbytes):
        """Allocate ``nbytes`` (at least 1) and return the owning :class:`Buffer`."""
        cdef size_t n = nbytes if nbytes > 0 else 1
        cdef size_t need = (n + _SLAB_ALIGN - 1) & ~(<size_t>_SLAB_ALIGN - 1)
        cdef _Slab slab
        cdef Buffer buf = Buffer.__new__(Buffer)
        if self.limit and self.bytes_allocated + <Py_ssize_t>n > self.limit:
            raise AllocationError(
                f"allocating {n} bytes on {self.device} would exceed the aoti_rt memory "
                f"limit ({self.bytes_allocated} of {self.limit} bytes in use); close "
                f"unused models or raise the limit with aoti_rt.set_memory_limit()")
        if n <= self.small_max:
            slab = self._slab
            if slab is None or slab.used + need > slab.size:
                slab = _Slab.__new__(_Slab)
                slab.ptr = self._reserve(SLAB_BYTES)     # the GIL is released in here
                slab.size = SLAB_BYTES
                self.num_slabs += 1
                self._slab = slab
            buf.ptr = slab.ptr + slab.used
            slab.used += need
            slab.live += 1
            buf.slab = slab
        else:
            buf.ptr = self._reserve(n)
        buf.nbytes = n
        buf.allocator = self
        self.bytes_allocated += n
        self.num_allocations += 1
        if self.bytes_allocated > self.peak_bytes_allocated:
            self.peak_bytes_allocated = self.bytes_allocated
        return buf

    cdef void _free(self, Buffer buf) noexcept:
        cdef _Slab slab = buf.slab
        cdef uintptr_t ptr
        self.bytes_allocated -= buf.nbytes
        self.num_allocations -= 1
        if slab is None:
            self._unreserve(buf.ptr, buf.nbytes)
            return
        slab.live -= 1
        if slab.live == 0:
            # Retire the slab before the raw free lets go of the GIL: another thread must not
            # carve a buffer out of memory that is being returned.
            ptr = slab.ptr
            slab.ptr = 0
            if self._slab is slab:
                self._slab = None
            self.num_slabs -= 1
            self._unreserve(ptr, slab.size)

    def reset_peak(self):
        """Start new high-water marks from the bytes live (and reserved) now."""
        self.peak_bytes_allocated = self.bytes_allocated
        self.peak_bytes_reserved = self.bytes_reserved


cdef class HostAllocator(Allocator):
    """256-byte aligned host memory (``posix_memalign``): the CPU twin of cuMemAlloc."""

    cdef int _raw_alloc(self, size_t nbytes, uintptr_t* out) noexcept nogil:
        cdef void* p = NULL
        cdef int rc = posix_memalign(&p, _SLAB_ALIGN, nbytes)
        if rc == 0:
            out[0] = <uintptr_t>p
        return rc

    cdef void _raw_free(self, uintptr_t ptr, size_t nbytes) noexcept nogil:
        free(<void*>ptr)


cdef class CudaAllocator(Allocator):
    """Device memory from ``cuMemAlloc`` in the device's primary context."""


    def __init__(self, str device, int ordinal, uintptr_t context):
        if not drv_ready:
            raise CudaError("the CUDA driver is not initialised (aoti_rt.device.get initialises it)", 3)
        self.device = device
        self.ordinal = ordinal
        self.ctx = <CUcontext>context
        self.is_cuda = True

    cdef int _raw_alloc(self, size_t nbytes, uintptr_t* out) noexcept nogil:
        cdef CUdeviceptr p = 0
        cdef CUresult rc = ctx_enter(self.ctx)
        if rc != 0:
            return rc
        rc = drv.mem_alloc(&p, nbytes)
        ctx_leave()
        if rc == 0:
            out[0] = <uintptr_t>p
        return rc

    cdef void _raw_free(self, uintptr_t ptr, size_t nbytes) noexcept nogil:
        if ctx_enter(self.ctx) == 0:
            drv.mem_free(<CUdeviceptr>ptr)
            ctx_leave()


cdef class PinnedAllocator(Allocator):
    """Page-locked host memory for staging copies to a device.

    By default ``cuMemHostAlloc``. With ``huge_pages=True``: an anonymous mapping advised to
    use transparent huge pages, page-locked with ``cuMemHostRegister`` (pinning is per page,
    so 2 MiB pages may pin faster; :mod:`bench.bench_start` compares both on a host).

    Either way the memory is *portable* (``CU_MEMHOSTALLOC_PORTABLE``,
    ``CU_MEMHOSTREGISTER_PORTABLE``): pinned for every CUDA context, not only the one that
    allocated it, so a replicated load's staging buffer feeds copies to every device at the
    pinned rate (under unified addressing cuMemHostAlloc memory is portable anyway; a
    registration is not unless asked).
    """

    def __init__(self, str device, uintptr_t context, bint huge_pages=False):
        if not drv_ready:
            raise CudaError("the CUDA driver is not initialised (aoti_rt.device.get initialises it)", 3)
        self.device = device
        self.ctx = <CUcontext>context
        self.huge_pages = huge_pages
        self.small_max = 0      # staging buffers and pinned stores are large: no slabs

    cdef int _raw_alloc(self, size_t nbytes, uintptr_t* out) noexcept nogil:
        cdef void* p = NULL
        cdef size_t n
        cdef CUresult rc = ctx_enter(self.ctx)
        if rc != 0:
            return rc
        if self.huge_pages:
            n = _huge_round(nbytes)
            p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            if p == MAP_FAILED:
                rc = 2                                  # CUDA_ERROR_OUT_OF_MEMORY
            else:
                madvise(p, n, MADV_HUGEPAGE)            # a hint: 4 KiB pages where THP is off
                rc = drv.host_register(p, n, _HOST_PORTABLE)
                if rc != 0:
                    munmap(p, n)
        else:
            rc = drv.host_alloc(&p, nbytes, _HOST_PORTABLE)
        ctx_leave()
        if rc == 0:
            out[0] = <uintptr_t>p
        return rc

    cdef void _raw_free(self, uintptr_t ptr, size_t nbytes) noexcept nogil:
        # in the allocating context, as allocation was: a thread with no current context (a
        # worker, a finalizer) gets CUDA_ERROR_INVALID_CONTEXT and the pages stay pinned
        cdef bint pushed = ctx_enter(self.ctx) == 0
        if not self.huge_pages:
            drv.host_free(<void*>ptr)
        elif pushed:
            drv.host_unregister(<void*>ptr)
        if pushed:
            ctx_leave()
        if self.huge_pages:
            munmap(<void*>ptr, _huge_round(nbytes))


cdef inline size_t _huge_round(size_t n) noexcept nogil:
    return (n + (<size_t>2 << 20) - 1) & ~((<size_t>2 << 20) - 1)


# ----------------------------------------------------------------------------------------
# Shared arenas (aoti_rt._arena) mapped in this process: counted here, where the Buffers are

#: arenas mapped in this process now, and their bytes (a test's proof that nothing leaked)
cdef long long _arenas_live = 0
cdef long long _arena_bytes_live = 0


cdef void count_arena(int n, long long nbytes) noexcept:
    global _arenas_live, _arena_bytes_live
    _arenas_live += n
    _arena_bytes_live += nbytes


def arena_totals() -> tuple:
    """``(arenas, bytes)`` mapped in this process now, exported and imported: back to what it
    was once every model that shared weights is closed and its Buffers are gone."""
    return _arenas_live, _arena_bytes_live


@cython.no_gc     # refers only to its allocator and slab, which never refer back: no cycles
cdef class Buffer:
    """One allocation, freed when this object goes.

    Host buffers export the buffer protocol (``memoryview(buf)``, ``torch.frombuffer``);
    CUDA buffers export ``__cuda_array_interface__`` (``torch.as_tensor(buf, device=...)``).
    Either way the consumer holds a reference to the Buffer, so a tensor view of a cached
    weight keeps its memory alive after the cache has let it go.
    """


    def __cinit__(self):
        self.ptr = 0

    def __dealloc__(self):
        if self.ptr != 0 and self.allocator is not None:
            self.allocator._free(self)
            self.ptr = 0

    @property
    def device(self) -> str:
        return self.allocator.device

    def __repr__(self):
        return f"<aoti_rt Buffer {self.nbytes} bytes on {self.allocator.device} at 0x{self.ptr:x}>"

    @property
    def arena(self):
        """The :class:`~aoti_rt._arena.SharedArena` it was carved from, or None."""
        return self.slab if self.slab is not None and self.slab.is_arena else None

    @property
    def read_only(self) -> bool:
        """Whether its memory is mapped read-only (weights shared across processes)."""
        return self.slab is not None and self.slab.read_only

    def __getbuffer__(self, Py_buffer* view, int flags):
        if self.allocator.is_cuda:
            raise BufferError("a CUDA buffer has no host buffer interface")
        cdef bint ro = self.read_only
        if ro and (flags & PyBUF_WRITABLE):
            raise BufferError("this buffer holds weights shared read-only across processes")
        self._shape[0] = <Py_ssize_t>self.nbytes
        view.buf = <void*>self.ptr
        view.obj = self
        view.len = <Py_ssize_t>self.nbytes
        view.readonly = ro
        view.itemsize = 1
        view.format = "B"
        view.ndim = 1
        view.shape = self._shape
        view.strides = NULL
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer* view):
        pass

    @property
    def __cuda_array_interface__(self):
        if not self.allocator.is_cuda:
            raise AttributeError("__cuda_array_interface__ is only defined for CUDA buffers")
        # "data": (ptr, False) even for a read-only arena: torch refuses the read-only flag
        # (a write through such a view faults on the GPU, which enforces the mapping)
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False),
                "version": 3, "strides": None, "stream": None}
