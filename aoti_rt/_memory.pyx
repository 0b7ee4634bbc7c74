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
* a :class:`SharedArena` is one mapping of memory that other processes can map too, and an
  :class:`ArenaAllocator` carves Buffers out of arenas (each Buffer keeps its arena alive, as
  slab Buffers keep their slab).

Weights shared across processes (``aoti_rt.load(..., share=name)``) live in arenas. On CUDA an
arena is one VMM allocation (``cuMemCreate`` with a POSIX file-descriptor handle type,
``cuMemAddressReserve`` + ``cuMemMap`` + ``cuMemSetAccess``), exported as a file descriptor
(``cuMemExportToShareableHandle``) and imported by another process
(``cuMemImportFromShareableHandle``), which maps it with ``CU_MEM_ACCESS_FLAGS_PROT_READ``.
Why this and not the legacy ``cuIpcGetMemHandle``:

* the driver reference-counts the physical allocation across processes: it lives until the
  last process unmaps and releases it, so an exporter that exits first leaves its clients
  running on well-defined memory (a legacy handle's memory is undefined once the exporter
  frees it);
* the handle is a file descriptor, a capability that only passes over a Unix socket
  (``SCM_RIGHTS``) to a peer the exporter chose; a legacy handle is 64 bytes that anyone who
  learns them can open;
* a client maps it read-only, enforced by the GPU (legacy IPC cannot map read-only).

The CPU twin, so that the whole mechanism runs in CI: ``memfd_create`` + ``ftruncate`` +
``mmap(MAP_SHARED)`` for the exporter, sealed against shrinking (a client cannot make the
exporter fault); clients get a read-only reopen of it and ``mmap(PROT_READ, MAP_SHARED)`` it, so
no client can map it writable, while the exporter can make its own mapping writable again for
an in-place weight update (:meth:`SharedArena.unprotect`). The kernel keeps the pages while any
process maps them.

CUDA is reached through driver entry points that cuda-python resolved
(``cuGetProcAddress``); :func:`install_driver` receives their addresses, so this module
needs no CUDA header to build and imports on machines without a GPU.
"""

cimport cython
from cpython.buffer cimport PyBUF_WRITABLE
from libc.stdint cimport uintptr_t
from libc.stdlib cimport free
from libc.string cimport memset

import os

from aoti_rt.errors import AllocationError, CudaError, ShareError

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)

cdef extern from "sys/mman.h" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    int mprotect(void* addr, size_t length, int prot)
    int madvise(void* addr, size_t length, int advice)
    void* MAP_FAILED
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_SHARED, MAP_ANONYMOUS, MADV_HUGEPAGE

cdef extern from "errno.h":
    int errno

cdef extern from "unistd.h" nogil:
    int close(int fd)


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
# Memory shared across processes (see the module docstring for the mechanism and why)

cdef enum:
    _CU_LOCATION_DEVICE = 1
    _CU_ALLOCATION_PINNED = 1
    _CU_HANDLE_POSIX_FD = 1
    _CU_ACCESS_READ = 1
    _CU_ACCESS_READWRITE = 3
    _CU_GRANULARITY_MINIMUM = 0
    _CU_ERROR_OUT_OF_MEMORY = 2

#: fcntl's sealing commands and seals (linux/fcntl.h), not names in every Python's fcntl module
_F_ADD_SEALS = 1033
_F_GET_SEALS = 1034
_F_SEAL_SHRINK = 0x2
_F_SEAL_GROW = 0x4

#: arenas mapped in this process now, and their bytes (a test's proof that nothing leaked)
cdef long long _arenas_live = 0
cdef long long _arena_bytes_live = 0


def arena_totals() -> tuple:
    """``(arenas, bytes)`` mapped in this process now, exported and imported: back to what it
    was once every model that shared weights is closed and its Buffers are gone."""
    return _arenas_live, _arena_bytes_live


cdef inline size_t _round_up(size_t n, size_t to) noexcept nogil:
    return (n + to - 1) // to * to


cdef inline void _vmm_prop(CUmemAllocationProp* prop, int ordinal) noexcept nogil:
    memset(prop, 0, sizeof(CUmemAllocationProp))
    prop.type = _CU_ALLOCATION_PINNED
    prop.requestedHandleTypes = _CU_HANDLE_POSIX_FD
    prop.location.type = _CU_LOCATION_DEVICE
    prop.location.id = ordinal


cdef inline CUresult _vmm_access(CUdeviceptr ptr, size_t size, int ordinal, int flags) noexcept nogil:
    cdef CUmemAccessDesc desc
    memset(&desc, 0, sizeof(CUmemAccessDesc))
    desc.location.type = _CU_LOCATION_DEVICE
    desc.location.id = ordinal
    desc.flags = flags
    return drv.mem_set_access(ptr, size, &desc, 1)


cdef enum:
    _STEP_RESERVE = 1
    _STEP_MAP = 2
    _STEP_ACCESS = 3

#: the driver call each _vmm_map step names in an error
_STEPS = {0: "cuCtxPushCurrent", _STEP_RESERVE: "cuMemAddressReserve", _STEP_MAP: "cuMemMap",
          _STEP_ACCESS: "cuMemSetAccess"}


cdef CUresult _vmm_map(CUmemGenericAllocationHandle h, size_t size, size_t align, int ordinal, int flags,
                       CUdeviceptr* out, int* step) noexcept nogil:
    """Reserve an address range for ``h``, map it and grant ``flags`` access to the device; on
    failure undo what was done and set ``step`` to the failing call (_STEP_*)."""
    cdef CUdeviceptr ptr = 0
    cdef CUresult rc = drv.mem_address_reserve(&ptr, size, align, 0, 0)
    if rc != 0:
        step[0] = _STEP_RESERVE
        return rc
    rc = drv.mem_map(ptr, size, 0, h, 0)
    if rc != 0:
        drv.mem_address_free(ptr, size)
        step[0] = _STEP_MAP
        return rc
    rc = _vmm_access(ptr, size, ordinal, flags)
    if rc != 0:
        drv.mem_unmap(ptr, size)
        drv.mem_address_free(ptr, size)
        step[0] = _STEP_ACCESS
        return rc
    out[0] = ptr
    return 0


def _vmm_check(str device):
    if not (drv_ready and drv_vmm):
        why = ("its struct layouts do not match this platform" if not VMM_LAYOUT_OK else
               "the driver lacks the virtual memory management entry points (cuMemCreate and others: "
               "driver >= 10.2 needed)")
        raise ShareError(f"{device} cannot share weights across processes: {why}; load without share=")


@cython.no_gc     # refers only to a str: no cycles
cdef class SharedArena(_Slab):
    """One mapping of memory that other processes can map too: the weights a model exports, or
    the weights it maps from the process that exports them (the module docstring says how).

    It owns its memfd (host) or its VMM allocation handle (CUDA) and its mapping; they go when
    the arena object goes, which is after its last Buffer (every Buffer carved from it holds
    it). The memory itself lives while any process maps it: the kernel (memfd) or the driver
    (VMM) counts them. Made by :meth:`create` (to export) or :meth:`attach` (an exported one).
    """

    def __cinit__(self):
        self.fd = -1
        self.handle = 0
        self.mapped = False

    def __init__(self, *args, **kwargs):
        raise TypeError("make a SharedArena with SharedArena.create() or SharedArena.attach()")

    @staticmethod
    def create(str device, size_t nbytes, int ordinal=-1, uintptr_t context=0) -> SharedArena:
        """A new writable arena of at least ``nbytes`` on ``device`` (``ordinal`` -1: host memory
        in a memfd; else the CUDA device of that ordinal, ``context`` its primary context),
        rounded up to a page or to the VMM allocation granularity.

        Raises :class:`AllocationError` when the memory is not there, :class:`ShareError` when
        the driver cannot share memory, :class:`CudaError` for another driver failure.
        """
        cdef SharedArena a = SharedArena.__new__(SharedArena)
        a._setup(device, ordinal, context)
        if a.is_cuda:
            a._create_cuda(nbytes)
        else:
            a._create_host(nbytes)
        a._mapped()
        return a

    @staticmethod
    def attach(str device, int fd, size_t nbytes, int ordinal=-1, uintptr_t context=0) -> SharedArena:
        """Map ``nbytes`` of the arena another process exported as ``fd`` (see :meth:`export`),
        read-only where the platform enforces it (:attr:`read_only` says). ``fd`` stays the
        caller's to close (the mapping does not need it).

        Raises :class:`ShareError` when the descriptor is not what an exporter sends (too short,
        not sealed against shrinking, not a whole number of VMM granules) and
        :class:`CudaError` when the driver refuses it.
        """
        cdef SharedArena a = SharedArena.__new__(SharedArena)
        a._setup(device, ordinal, context)
        a.imported = True
        if nbytes == 0:
            raise ShareError("an exported arena of 0 bytes: the exporter is not an aoti_rt of this version")
        if a.is_cuda:
            a._attach_cuda(fd, nbytes)
        else:
            a._attach_host(fd, nbytes)
        a._mapped()
        return a

    cdef _setup(self, str device, int ordinal, uintptr_t context):
        self.device = device
        self.ordinal = ordinal
        self.ctx = <CUcontext>context
        self.is_cuda = ordinal >= 0

    cdef _mapped(self):
        global _arenas_live, _arena_bytes_live
        self.mapped = True
        _arenas_live += 1
        _arena_bytes_live += <long long>self.size

    # -- host (memfd) ---------------------------------------------------------------------

    cdef _create_host(self, size_t nbytes):
        import fcntl

        cdef size_t size = _round_up(max(nbytes, <size_t>1), <size_t>os.sysconf("SC_PAGE_SIZE"))
        cdef void* p = NULL
        cdef int fd = os.memfd_create("aoti_rt-weights", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # take the pages now: a memfd short of memory fails here, not with a SIGBUS when
            # the loader writes a weight
            os.posix_fallocate(fd, 0, size)
            # no process that holds the descriptor can shrink it under a mapping (a SIGBUS)
            fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SHRINK | _F_SEAL_GROW)
            with nogil:
                p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            if p == MAP_FAILED:
                raise OSError(errno, os.strerror(errno))
        except OSError as e:
            os.close(fd)
            raise AllocationError(f"could not allocate a shared arena of {size} bytes of host memory "
                                  f"({e}); free memory or close unused models") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.ptr = <uintptr_t>p
        self.size = size

    cdef _attach_host(self, int fd, size_t nbytes):
        import fcntl
        import stat

        cdef void* p = NULL
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or <size_t>st.st_size < nbytes:
            raise ShareError(f"the exporter sent a descriptor of {st.st_size} bytes for an arena of {nbytes}; "
                             f"refusing to map it (reading past its end would be a SIGBUS)")
        if not fcntl.fcntl(fd, _F_GET_SEALS) & _F_SEAL_SHRINK:
            raise ShareError("the exporter sent a descriptor that is not sealed against shrinking; refusing "
                             "to map memory that could vanish under this process")
        with nogil:
            p = mmap(NULL, nbytes, PROT_READ, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise ShareError(f"mapping {nbytes} bytes of the exported arena failed: {os.strerror(errno)}")
        self.ptr = <uintptr_t>p
        self.size = nbytes
        self.read_only = True

    # -- CUDA (VMM) -----------------------------------------------------------------------

    cdef _create_cuda(self, size_t nbytes):
        cdef CUmemAllocationProp prop
        cdef CUmemGenericAllocationHandle h = 0
        cdef CUdeviceptr ptr = 0
        cdef CUcontext prev
        cdef size_t gran = 0, size = 0
        cdef int step = 0
        cdef CUresult rc
        cdef int ordinal = self.ordinal
        _vmm_check(self.device)
        _vmm_prop(&prop, ordinal)
        with nogil:
            rc = drv.ctx_push(self.ctx)
            if rc == 0:
                step = -1
                rc = drv.mem_granularity(&gran, &prop, _CU_GRANULARITY_MINIMUM)
                if rc == 0 and gran == 0:
                    rc = 1
                if rc == 0:
                    size = _round_up(max(nbytes, <size_t>1), gran)
                    step = -2
                    rc = drv.mem_create(&h, size, &prop, 0)
                    if rc == 0:
                        rc = _vmm_map(h, size, gran, ordinal, _CU_ACCESS_READWRITE, &ptr, &step)
                        if rc != 0:
                            drv.mem_release(h)
                drv.ctx_pop(&prev)
        what = {-1: "cuMemGetAllocationGranularity", -2: "cuMemCreate"}.get(step) or _STEPS[step]
        if rc == _CU_ERROR_OUT_OF_MEMORY:
            raise AllocationError(f"could not allocate a shared arena of {size} bytes on {self.device} "
                                  f"({what}: out of memory); free device memory or close unused models")
        if rc != 0:
            raise CudaError(f"{what} for a shared arena of {size or nbytes} bytes on {self.device}", rc)
        self.handle = h
        self.ptr = <uintptr_t>ptr
        self.size = size

    cdef _attach_cuda(self, int fd, size_t nbytes):
        cdef CUmemAllocationProp prop
        cdef CUmemGenericAllocationHandle h = 0
        cdef CUdeviceptr ptr = 0
        cdef CUcontext prev
        cdef size_t gran = 0
        cdef int step = 0
        cdef CUresult rc
        cdef int ordinal = self.ordinal
        cdef bint read_only = True
        cdef bint unaligned = False
        _vmm_check(self.device)
        _vmm_prop(&prop, ordinal)
        with nogil:
            rc = drv.ctx_push(self.ctx)
            if rc == 0:
                step = -1
                rc = drv.mem_granularity(&gran, &prop, _CU_GRANULARITY_MINIMUM)
                if rc == 0 and (gran == 0 or nbytes % gran != 0):
                    unaligned = True
                if rc == 0 and not unaligned:
                    step = -2
                    rc = drv.mem_import(&h, <void*><uintptr_t>fd, _CU_HANDLE_POSIX_FD)
                    if rc == 0:
                        rc = _vmm_map(h, nbytes, gran, ordinal, _CU_ACCESS_READ, &ptr, &step)
                        if rc != 0 and step == _STEP_ACCESS:
                            # a driver that cannot map read-only: map read-write, and say so in
                            # read_only (the share info and the CUDA tests report it)
                            read_only = False
                            rc = _vmm_map(h, nbytes, gran, ordinal, _CU_ACCESS_READWRITE, &ptr, &step)
                        if rc != 0:
                            drv.mem_release(h)
                drv.ctx_pop(&prev)
        if unaligned:
            raise ShareError(f"the exporter sent an arena of {nbytes} bytes, not a multiple of this device's "
                             f"allocation granularity ({gran} bytes); refusing to map it")
        what = {-1: "cuMemGetAllocationGranularity", -2: "cuMemImportFromShareableHandle"}.get(step) or _STEPS[step]
        if rc != 0:
            raise CudaError(f"{what} of an arena of {nbytes} bytes shared by another process, on "
                            f"{self.device}", rc)
        self.handle = h
        self.ptr = <uintptr_t>ptr
        self.size = nbytes
        self.read_only = read_only

    # -- both -----------------------------------------------------------------------------

    def export(self) -> int:
        """A new file descriptor for this arena, the caller's to send (``SCM_RIGHTS``) and close
        (host: opened read-only; CUDA: the VMM allocation's shareable handle, which the
        receiving process maps with the access it asks for: :meth:`attach` asks read-only)."""
        cdef int fd = -1
        cdef CUcontext prev
        cdef CUresult rc
        if not self.mapped or self.imported:
            raise ShareError("only a mapped arena this process created can be exported")
        if not self.is_cuda:
            # a read-only open of the memfd, not a dup of the exporter's read-write descriptor:
            # a client cannot map it writable: the exporter's own mapping can be made writable
            # again for an in-place update (unprotect), so the memfd is not sealed against writes
            try:
                return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:      # no /proc: the seals alone keep clients from writing
                return os.dup(self.fd)
        with nogil:
            rc = drv.ctx_push(self.ctx)
            if rc == 0:
                rc = drv.mem_export(&fd, self.handle, _CU_HANDLE_POSIX_FD, 0)
                drv.ctx_pop(&prev)
        if rc != 0:
            raise CudaError(f"cuMemExportToShareableHandle of a shared arena on {self.device}", rc)
        return fd

    def protect(self) -> bool:
        """Make this process's mapping read-only (an exporter, once its weights are written).
        Returns :attr:`read_only` (False where the driver cannot map read-only: then it stays
        writable). Clients cannot map the memfd writable whatever this process does: they get
        a read-only descriptor (:meth:`export`)."""
        cdef CUcontext prev
        cdef CUresult rc = 0
        if not self.mapped or self.read_only:
            return self.read_only
        if not self.is_cuda:
            if mprotect(<void*>self.ptr, self.size, PROT_READ) != 0:
                return False
            self.read_only = True
            return True
        with nogil:
            rc = drv.ctx_push(self.ctx)
            if rc == 0:
                rc = _vmm_access(<CUdeviceptr>self.ptr, self.size, self.ordinal, _CU_ACCESS_READ)
                drv.ctx_pop(&prev)
        self.read_only = rc == 0
        return self.read_only

    def unprotect(self) -> None:
        """Make the exporter's own mapping writable again (an in-place weight update; then
        :meth:`protect` again). Clients' mappings stay read-only. Raises :class:`ShareError` for
        an arena mapped from another process."""
        cdef CUcontext prev
        cdef CUresult rc = 0
        if self.imported:
            raise ShareError("weights mapped from another process are read-only here; update them in "
                             "the process that exports them")
        if not self.mapped or not self.read_only:
            return
        if not self.is_cuda:
            if mprotect(<void*>self.ptr, self.size, PROT_READ | PROT_WRITE) != 0:
                raise ShareError(f"could not make a shared arena of {self.size} bytes writable again")
            self.read_only = False
            return
        with nogil:
            rc = drv.ctx_push(self.ctx)
            if rc == 0:
                rc = _vmm_access(<CUdeviceptr>self.ptr, self.size, self.ordinal, _CU_ACCESS_READWRITE)
                drv.ctx_pop(&prev)
        if rc != 0:
            raise CudaError(f"cuMemSetAccess (read-write) of a shared arena on {self.device}", rc)
        self.read_only = False

    cdef int _unmap(self) noexcept:
        global _arenas_live, _arena_bytes_live
        cdef CUcontext prev
        if not self.mapped:
            return 0
        self.mapped = False
        if self.is_cuda:
            with nogil:
                if drv.ctx_push(self.ctx) == 0:
                    drv.mem_unmap(<CUdeviceptr>self.ptr, self.size)
                    drv.mem_address_free(<CUdeviceptr>self.ptr, self.size)
                    drv.mem_release(self.handle)
                    drv.ctx_pop(&prev)
            self.handle = 0
        else:
            with nogil:
                munmap(<void*>self.ptr, self.size)
                if self.fd >= 0:
                    close(self.fd)
            self.fd = -1
        self.ptr = 0
        _arenas_live -= 1
        _arena_bytes_live -= <long long>self.size
        return 0

    def __dealloc__(self):
        self._unmap()

    @property
    def address(self) -> int:
        """Where it is mapped in this process."""
        return self.ptr

    @property
    def nbytes(self) -> int:
        """Its bytes (a whole number of pages or VMM granules)."""
        return self.size

    @property
    def kind(self) -> str:
        """``"cuda-vmm"`` or ``"memfd"``: how it is shared."""
        return "cuda-vmm" if self.is_cuda else "memfd"

    @property
    def buffers(self) -> int:
        """Buffers carved from it and alive."""
        return self.live

    def __repr__(self):
        how = "imported" if self.imported else "exported"
        ro = "read-only" if self.read_only else "writable"
        return f"<aoti_rt SharedArena {self.kind} {self.size} bytes on {self.device}, {how}, {ro}>"


cdef class ArenaAllocator(Allocator):
    """Buffers carved at 256-byte alignment out of :class:`SharedArena` mappings, with an
    :class:`Allocator`'s exact accounting: ``bytes_allocated`` / ``num_allocations`` count
    live Buffers, ``bytes_reserved`` / ``num_slabs`` the arenas it holds.

    An exporter's allocator opens its arenas: :meth:`reserve` one arena for what a model will
    load (one arena, not one VMM allocation per weight: the 2 MiB granularity would waste most
    of a small weight's allocation), :meth:`allocate` carves from it and opens another only for
    a weight that does not fit; :meth:`freeze` then makes them read-only and ends carving. A
    client's allocator :meth:`attach`\\ es the arenas another process exported and makes
    Buffers at the offsets that process gave (:meth:`carve`). An arena leaves :attr:`arenas`
    (and the counts) once it is not the one being carved and its last Buffer has gone; its
    memory goes with its last reference (a Buffer, or a caller holding it).

    New arenas respect the memory limit of ``parent`` (the device's allocator): its live
    bytes plus this allocator's arenas stay within ``parent.limit``.
    """

    def __init__(self, str device, int ordinal=-1, uintptr_t context=0, Allocator parent=None):
        if ordinal >= 0 and not drv_ready:
            raise CudaError("the CUDA driver is not initialised (aoti_rt.device.get initialises it)", 3)
        self.device = device
        self.ordinal = ordinal
        self.ctx = <CUcontext>context
        self.is_cuda = ordinal >= 0
        self.parent = parent
        self.arenas = []
        self.small_max = 0
        self.grow_bytes = SLAB_BYTES

    cdef SharedArena _open(self, size_t nbytes):
        cdef SharedArena arena, old
        cdef Allocator parent = self.parent
        if self.frozen:
            raise AllocationError(f"the shared arenas on {self.device} are frozen (exported, read-only): "
                                  f"no more weights can be carved from them")
        if parent is not None and parent.limit and \
                parent.bytes_allocated + self.bytes_reserved + <Py_ssize_t>nbytes > parent.limit:
            raise AllocationError(
                f"a shared arena of {nbytes} bytes on {self.device} would exceed the aoti_rt memory limit "
                f"({parent.bytes_allocated + self.bytes_reserved} of {parent.limit} bytes in use); close "
                f"unused models or raise the limit with aoti_rt.set_memory_limit()")
        arena = SharedArena.create(self.device, nbytes, self.ordinal, <uintptr_t>self.ctx)
        old = self._current
        self.arenas.append(arena)
        self._current = arena
        self._count_arena(arena)
        if old is not None and old.live == 0:
            self._drop(old)
        return arena

    cdef _count_arena(self, SharedArena arena):
        self.bytes_reserved += arena.size
        self.num_slabs += 1
        if self.bytes_reserved > self.peak_bytes_reserved:
            self.peak_bytes_reserved = self.bytes_reserved

    cdef void _drop(self, SharedArena arena) noexcept:
        cdef Py_ssize_t i
        for i in range(len(self.arenas)):
            if self.arenas[i] is arena:
                del self.arenas[i]
                self.bytes_reserved -= arena.size
                self.num_slabs -= 1
                return

    def reserve(self, size_t nbytes) -> SharedArena | None:
        """Open the arena the next allocations carve from, of at least ``nbytes`` (0: none)."""
        if nbytes == 0:
            return None
        return self._open(nbytes)

    cpdef Buffer allocate(self, size_t nbytes):
        """Carve ``nbytes`` (at least 1) from the current arena, opening one of at least
        :attr:`grow_bytes` if it does not fit; the Buffer keeps its arena alive."""
        cdef size_t n = nbytes if nbytes > 0 else 1
        cdef size_t need = _round_up(n, _SLAB_ALIGN)
        cdef SharedArena arena = self._current
        if self.frozen:
            raise AllocationError(f"the shared arenas on {self.device} are frozen (exported, read-only): "
                                  f"no more weights can be carved from them")
        if arena is None or arena.used + need > arena.size:
            arena = self._open(max(need, self.grow_bytes))
        cdef Buffer buf = self._buffer(arena, arena.used, n)
        arena.used += need
        return buf

    cdef Buffer _buffer(self, SharedArena arena, size_t offset, size_t n):
        cdef Buffer buf = Buffer.__new__(Buffer)
        buf.ptr = arena.ptr + offset
        buf.nbytes = n
        buf.slab = arena
        buf.allocator = self
        arena.live += 1
        self.bytes_allocated += n
        self.num_allocations += 1
        if self.bytes_allocated > self.peak_bytes_allocated:
            self.peak_bytes_allocated = self.bytes_allocated
        return buf

    def attach(self, int fd, size_t nbytes) -> SharedArena:
        """Map an arena another process exported (``fd``, stays the caller's to close) and hold
        it: see :meth:`SharedArena.attach`."""
        if self.closed:
            raise ShareError("the allocator is closed")
        arena = SharedArena.attach(self.device, fd, nbytes, self.ordinal, <uintptr_t>self.ctx)
        self.arenas.append(arena)
        self._count_arena(arena)
        return arena

    def carve(self, SharedArena arena, size_t offset, size_t nbytes) -> Buffer:
        """A Buffer of ``nbytes`` at ``offset`` of an arena this allocator holds (the layout an
        exporter sent: checked to lie inside the arena, 256-byte aligned)."""
        if not any(a is arena for a in self.arenas):
            raise ValueError("carve() takes an arena this allocator holds")
        if nbytes == 0 or offset % _SLAB_ALIGN or offset > arena.size or nbytes > arena.size - offset:
            raise ShareError(f"the exporter placed a weight of {nbytes} bytes at offset {offset} of an arena "
                             f"of {arena.size} bytes; refusing a layout outside the arena or off its "
                             f"{_SLAB_ALIGN}-byte alignment")
        return self._buffer(arena, offset, nbytes)

    def freeze(self) -> bool:
        """End carving and make every arena read-only in this process (the exporter, once its
        weights are written). Returns whether all of them are read-only now."""
        cdef SharedArena cur = self._current
        cdef SharedArena a
        cdef bint ok = True
        self.frozen = True
        for a in self.arenas:
            ok = a.protect() and ok
        self._current = None
        if cur is not None and cur.live == 0:
            self._drop(cur)
        return ok

    def close(self) -> None:
        """Hold no arena any more: those without Buffers go now, the others with their last Buffer."""
        cdef SharedArena a
        self.closed = True
        self.frozen = True
        self._current = None
        for a in list(self.arenas):
            if a.live == 0:
                self._drop(a)

    cdef void _free(self, Buffer buf) noexcept:
        cdef SharedArena arena = <SharedArena>buf.slab
        self.bytes_allocated -= buf.nbytes
        self.num_allocations -= 1
        arena.live -= 1
        if arena.live == 0 and arena is not self._current:
            self._drop(arena)


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
        """The :class:`SharedArena` it was carved from, or None."""
        return self.slab if isinstance(self.slab, SharedArena) else None

    @property
    def read_only(self) -> bool:
        """Whether its memory is mapped read-only (weights shared across processes)."""
        return isinstance(self.slab, SharedArena) and (<SharedArena>self.slab).read_only

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


# ----------------------------------------------------------------------------------------
# The weight cache

