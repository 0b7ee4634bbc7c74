# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Memory, the shared weight cache and the per-constant C loops of aoti_rt.

Ownership, in one line each (the habits of CuPy's ``memory.pyx``):

* an :class:`Allocator` hands out raw memory for one device and keeps its accounting;
* a :class:`Buffer` owns one allocation and frees it in ``__dealloc__``, so any Python
  object that holds the Buffer (a cache entry, a tensor view given to a user) keeps the
  memory alive;
* the :class:`WeightCache` is a reference-counted registry ``key -> Buffer``: a method
  acquires the keys it binds and releases them when it closes; the entry is dropped when
  its count reaches zero, and the memory goes with the last Python reference;
* a :class:`BindPlan` holds one method's constants as C arrays and binds them in one
  ``UpdateUserManagedConstantBufferPairs`` call from a ``nogil`` loop;
* a :class:`LoadPlan` and a :class:`Stager` move weight bytes from the store file to
  their buffers (``pread`` into pinned staging memory, async copies on a CUDA stream).

CUDA is reached through driver entry points that cuda-python resolved
(``cuGetProcAddress``); :func:`install_driver` receives their addresses, so this module
needs no CUDA header to build and imports on machines without a GPU.
"""

cimport cython
from cpython.pycapsule cimport PyCapsule_New, PyCapsule_GetPointer
from libc.stdint cimport int32_t, int64_t, uint8_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset, strcmp
from libc.errno cimport errno, EINTR

import threading

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)

cdef extern from "unistd.h" nogil:
    ssize_t pread(int fd, void* buf, size_t count, long offset)

cdef extern from *:
    """
    static inline void aoti_rt_atomic_add(long long* p, long long v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
    static inline long long aoti_rt_atomic_load(long long* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    """
    void aoti_rt_atomic_add(long long* p, long long v) nogil
    long long aoti_rt_atomic_load(long long* p) nogil


# ----------------------------------------------------------------------------------------
# CUDA driver entry points (filled by install_driver from cuda-python's cuGetProcAddress)

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
ctypedef CUresult (*f_memcpy_htod_async)(CUdeviceptr, const void*, size_t, CUstream) noexcept nogil
ctypedef CUresult (*f_stream_create)(CUstream*, unsigned int) noexcept nogil
ctypedef CUresult (*f_stream_destroy)(CUstream) noexcept nogil
ctypedef CUresult (*f_stream_sync)(CUstream) noexcept nogil
ctypedef CUresult (*f_event_create)(CUevent*, unsigned int) noexcept nogil
ctypedef CUresult (*f_event_record)(CUevent, CUstream) noexcept nogil
ctypedef CUresult (*f_event_sync)(CUevent) noexcept nogil
ctypedef CUresult (*f_event_destroy)(CUevent) noexcept nogil

cdef struct Driver:
    f_ctx_push ctx_push
    f_ctx_pop ctx_pop
    f_mem_alloc mem_alloc
    f_mem_free mem_free
    f_host_alloc host_alloc
    f_host_free host_free
    f_memcpy_htod_async memcpy_htod_async
    f_stream_create stream_create
    f_stream_destroy stream_destroy
    f_stream_sync stream_sync
    f_event_create event_create
    f_event_record event_record
    f_event_sync event_sync
    f_event_destroy event_destroy

cdef Driver drv
cdef bint drv_ready = False

#: driver symbol -> the Driver field it fills; cuda.py resolves exactly these names.
DRIVER_SYMBOLS = (
    "cuCtxPushCurrent", "cuCtxPopCurrent", "cuMemAlloc", "cuMemFree", "cuMemHostAlloc",
    "cuMemFreeHost", "cuMemcpyHtoDAsync", "cuStreamCreate",
    "cuStreamDestroy", "cuStreamSynchronize", "cuEventCreate", "cuEventRecord",
    "cuEventSynchronize", "cuEventDestroy",
)


def install_driver(dict pointers):
    """Install the CUDA driver entry points, ``{symbol: address}`` for DRIVER_SYMBOLS."""
    global drv_ready
    missing = [s for s in DRIVER_SYMBOLS if not pointers.get(s)]
    if missing:
        raise RuntimeError(f"CUDA driver entry points not resolved: {missing}")
    drv.ctx_push = <f_ctx_push><uintptr_t>pointers["cuCtxPushCurrent"]
    drv.ctx_pop = <f_ctx_pop><uintptr_t>pointers["cuCtxPopCurrent"]
    drv.mem_alloc = <f_mem_alloc><uintptr_t>pointers["cuMemAlloc"]
    drv.mem_free = <f_mem_free><uintptr_t>pointers["cuMemFree"]
    drv.host_alloc = <f_host_alloc><uintptr_t>pointers["cuMemHostAlloc"]
    drv.host_free = <f_host_free><uintptr_t>pointers["cuMemFreeHost"]
    drv.memcpy_htod_async = <f_memcpy_htod_async><uintptr_t>pointers["cuMemcpyHtoDAsync"]
    drv.stream_create = <f_stream_create><uintptr_t>pointers["cuStreamCreate"]
    drv.stream_destroy = <f_stream_destroy><uintptr_t>pointers["cuStreamDestroy"]
    drv.stream_sync = <f_stream_sync><uintptr_t>pointers["cuStreamSynchronize"]
    drv.event_create = <f_event_create><uintptr_t>pointers["cuEventCreate"]
    drv.event_record = <f_event_record><uintptr_t>pointers["cuEventRecord"]
    drv.event_sync = <f_event_sync><uintptr_t>pointers["cuEventSynchronize"]
    drv.event_destroy = <f_event_destroy><uintptr_t>pointers["cuEventDestroy"]
    drv_ready = True


# CudaError and AllocationError live in aoti_rt.errors (picklable, AotiRtError subclasses)
from aoti_rt.errors import AllocationError, CudaError


cdef inline void _check(CUresult rc, str what) except *:
    if rc != 0:
        raise CudaError(what, rc)


# ----------------------------------------------------------------------------------------
# Allocators and buffers

cdef enum:
    _SLAB_ALIGN = 256

#: buffers up to this size are carved from shared slabs (one raw allocation per slab, not
#: per weight: a model with 10k small constants pays ~10 cuMemAlloc calls, not 10k)
SMALL_MAX = 64 << 10
#: bytes of one slab
SLAB_BYTES = 2 << 20
#: alignment of a buffer inside a slab (cuMemAlloc's own is 256; Triton kernels assume 16)
SLAB_ALIGN = _SLAB_ALIGN


cdef class _Slab:
    """One raw allocation that small Buffers are carved from, returned when its last goes."""

    cdef uintptr_t ptr
    cdef size_t size
    cdef size_t used       # bump offset of the next buffer
    cdef Py_ssize_t live   # Buffers carved from it and still alive


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

    def __cinit__(self, *args, **kwargs):
        self.small_max = SMALL_MAX

    def __init__(self, str device):
        self.device = device

    cdef int _raw_alloc(self, size_t nbytes, uintptr_t* out) noexcept nogil:
        return -1

    cdef void _raw_free(self, uintptr_t ptr) noexcept nogil:
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
            self._raw_free(ptr)
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

    cdef void _raw_free(self, uintptr_t ptr) noexcept nogil:
        free(<void*>ptr)


cdef class CudaAllocator(Allocator):
    """Device memory from ``cuMemAlloc`` in the device's primary context."""

    cdef CUcontext ctx
    cdef readonly int ordinal

    def __init__(self, str device, int ordinal, uintptr_t context):
        if not drv_ready:
            raise RuntimeError("CUDA driver entry points are not installed")
        self.device = device
        self.ordinal = ordinal
        self.ctx = <CUcontext>context
        self.is_cuda = True

    cdef int _raw_alloc(self, size_t nbytes, uintptr_t* out) noexcept nogil:
        cdef CUdeviceptr p = 0
        cdef CUcontext prev
        cdef CUresult rc = drv.ctx_push(self.ctx)
        if rc != 0:
            return rc
        rc = drv.mem_alloc(&p, nbytes)
        drv.ctx_pop(&prev)
        if rc == 0:
            out[0] = <uintptr_t>p
        return rc

    cdef void _raw_free(self, uintptr_t ptr) noexcept nogil:
        cdef CUcontext prev
        if drv.ctx_push(self.ctx) == 0:
            drv.mem_free(<CUdeviceptr>ptr)
            drv.ctx_pop(&prev)


cdef class PinnedAllocator(Allocator):
    """Page-locked host memory (``cuMemHostAlloc``) for staging copies to a device."""

    cdef CUcontext ctx

    def __init__(self, str device, uintptr_t context):
        if not drv_ready:
            raise RuntimeError("CUDA driver entry points are not installed")
        self.device = device
        self.ctx = <CUcontext>context
        self.small_max = 0      # staging buffers and pinned stores are large: no slabs

    cdef int _raw_alloc(self, size_t nbytes, uintptr_t* out) noexcept nogil:
        cdef void* p = NULL
        cdef CUcontext prev
        cdef CUresult rc = drv.ctx_push(self.ctx)
        if rc != 0:
            return rc
        rc = drv.host_alloc(&p, nbytes, 0)
        drv.ctx_pop(&prev)
        if rc == 0:
            out[0] = <uintptr_t>p
        return rc

    cdef void _raw_free(self, uintptr_t ptr) noexcept nogil:
        drv.host_free(<void*>ptr)


@cython.no_gc     # refers only to its allocator and slab, which never refer back: no cycles
cdef class Buffer:
    """One allocation, freed when this object goes.

    Host buffers export the buffer protocol (``memoryview(buf)``, ``torch.frombuffer``);
    CUDA buffers export ``__cuda_array_interface__`` (``torch.as_tensor(buf, device=...)``).
    Either way the consumer holds a reference to the Buffer, so a tensor view of a cached
    weight keeps its memory alive after the cache has let it go.
    """

    cdef readonly uintptr_t ptr
    cdef readonly size_t nbytes
    cdef readonly Allocator allocator
    cdef _Slab slab        # the slab it was carved from, or None: it owns its raw memory
    cdef Py_ssize_t _shape[1]

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

    def __getbuffer__(self, Py_buffer* view, int flags):
        if self.allocator.is_cuda:
            raise BufferError("a CUDA buffer has no host buffer interface")
        self._shape[0] = <Py_ssize_t>self.nbytes
        view.buf = <void*>self.ptr
        view.obj = self
        view.len = <Py_ssize_t>self.nbytes
        view.readonly = 0
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
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False),
                "version": 3, "strides": None, "stream": None}


# ----------------------------------------------------------------------------------------
# The weight cache

# Not tracked by the cyclic GC: a model with 100k weights makes 100k entries and buffers, and
# the collector re-walking them made acquiring 10x slower. An entry refers to its key (str),
# its Buffer and an error message (str), none of which can lead back to it.
@cython.no_gc
cdef class _Entry:
    cdef readonly object key
    cdef readonly Buffer buffer
    cdef readonly Py_ssize_t refs
    cdef bint loading      # True while the first user fills it
    cdef str error         # why the fill failed, for waiters (a message: no traceback cycles)
    cdef object error_type # the failed fill's exception class, re-raised for waiters
    cdef list aliases      # further keys that name this entry (WeightCache.alias), or None


cdef class Acquisition:
    """What :meth:`WeightCache.acquire` hands back: one Buffer per key, and the work left.

    ``to_fill`` lists the indices of keys this caller created and must fill, then
    :meth:`WeightCache.publish`; ``pending`` those another thread is filling now. The
    acquisition is given back whole with :meth:`WeightCache.release`.
    """

    cdef readonly list keys
    cdef readonly list buffers
    cdef readonly list to_fill
    cdef readonly list pending
    cdef list entries
    cdef bint released


cdef class WeightCache:
    """Reference-counted registry ``key -> Buffer`` shared by every method in the process.

    Keys are opaque strings built by the runtime (a weight's content digest for shared
    weights; a model instance's token and the weight for mutable state). All operations are
    thread-safe; an entry is created once however many threads ask for it at the same time.
    References are held by :class:`Acquisition` objects, so a release always drops exactly
    the entries that were acquired, even if a failed entry has since been replaced.
    """

    cdef dict _entries
    cdef object _lock
    cdef object _filled    # Condition on _lock: some fill finished
    cdef readonly long long hits
    cdef readonly long long misses
    cdef readonly long long bytes_read

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

    def acquire(self, list keys, list sizes, Allocator allocator) -> Acquisition:
        """Take one reference to each key, allocating (not filling) those not cached.

        On allocation failure every reference taken by this call is given back and the
        error propagates, so a failed acquire leaves the cache as it was.
        """
        cdef Acquisition acq = Acquisition.__new__(Acquisition)
        cdef Py_ssize_t i, n = len(keys)
        cdef _Entry e
        if len(sizes) != n:
            raise ValueError("keys and sizes differ in length")
        acq.keys = keys
        acq.buffers = [None] * n
        acq.entries = []
        acq.to_fill = []
        acq.pending = []
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
                        e = _Entry.__new__(_Entry)
                        e.key = key
                        e.buffer = allocator.allocate(<size_t>sizes[i])
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

    cdef _release_locked(self, Acquisition acq):
        cdef _Entry e
        if acq.released:
            return
        acq.released = True
        for e in acq.entries:
            e.refs -= 1
            if e.refs <= 0:
                if self._entries.get(e.key) is e:
                    del self._entries[e.key]
                if e.aliases is not None:
                    for k in e.aliases:
                        if self._entries.get(k) is e:
                            del self._entries[k]
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
        from aoti_rt.errors import AotiRtError
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

    def alias(self, key, new_key) -> bool:
        """Let ``new_key`` name the filled entry cached under ``key`` too, so acquiring either
        shares one Buffer and one reference count; the entry leaves under all its names.

        The runtime names a weight by content in the whole process only once its bytes were
        verified, so it aliases a bundle's own entry rather than copying it. Returns False
        (and changes nothing) if ``key`` is not a filled entry or ``new_key`` names another.
        """
        cdef _Entry e
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


# ----------------------------------------------------------------------------------------
# Binding a method's constants: one Pairs call, fed from a nogil loop over C arrays

ctypedef void* AtenTensorHandle
ctypedef int32_t (*f_create_from_blob_v2)(
    void* data, int64_t ndim, const int64_t* sizes, const int64_t* strides,
    int64_t storage_offset, int32_t dtype, int32_t device_type, int32_t device_index,
    AtenTensorHandle* ret, int32_t layout, const uint8_t* opaque_metadata,
    int64_t opaque_metadata_size) noexcept nogil
ctypedef int32_t (*f_delete_tensor)(AtenTensorHandle) noexcept nogil

cdef struct ConstantMapEntry:
    const char* name
    AtenTensorHandle handle

ctypedef int32_t (*f_get_count)(void* container, size_t* out) noexcept nogil
ctypedef int32_t (*f_get_name)(void* container, size_t idx, const char** out) noexcept nogil
ctypedef int32_t (*f_get_dtype)(void* container, size_t idx, int32_t* out) noexcept nogil
ctypedef int32_t (*f_get_size)(void* container, size_t idx, size_t* out) noexcept nogil
ctypedef int32_t (*f_get_type)(void* container, size_t idx, int32_t* out) noexcept nogil
ctypedef int32_t (*f_update_pairs)(void* container, const ConstantMapEntry* pairs,
                                   size_t num_pairs, unsigned char use_inactive,
                                   unsigned char validate_full_update) noexcept nogil
ctypedef int32_t (*f_run)(void* container, AtenTensorHandle* inputs, size_t num_inputs,
                          AtenTensorHandle* outputs, size_t num_outputs, void* stream,
                          void* proxy_executor) noexcept nogil


#: a constant's view must start at a multiple of this many bytes of its buffer
VIEW_ALIGN = 16


cdef class BindPlan:
    """One method's constants as C arrays, bound in one Pairs call by :meth:`bind`.

    Built once per method from the manifest. :meth:`check` compares it with the container's
    own constant table (names, dtypes) and reads what the .so assumes of each constant's
    memory (``GetConstantDataSize``, ``GetConstantType``); :meth:`need` then says how many
    bytes a buffer bound as constant ``i`` must have so that no kernel can reach past it,
    whatever the manifest claims. ``bind`` refuses a buffer smaller than that, wraps each
    buffer in a non-owning tensor handle (``aoti_torch_create_tensor_from_blob_v2``), hands
    all of them to the container in a single ``UpdateUserManagedConstantBufferPairs`` call
    and deletes its own handles (the container keeps shallow copies that point at our memory).
    """

    cdef readonly Py_ssize_t n
    cdef readonly bint checked     # check() ran and the table matched: need() is known
    cdef int64_t* ndim
    cdef int64_t* dims_at
    cdef int64_t* sizes
    cdef int64_t* strides
    cdef int64_t* offsets
    cdef int64_t* itemsizes
    cdef int64_t* so_sizes         # GetConstantDataSize: the storage bytes the .so assumes
    cdef int32_t* so_kinds         # GetConstantType: 1 parameter, 2 buffer, 3 tensor constant
    cdef unsigned char* empty      # the manifest's view has no element
    cdef int32_t* dtypes
    cdef uintptr_t* data
    cdef ConstantMapEntry* entries
    cdef list _names
    cdef list _fqns
    cdef list _shapes
    cdef readonly str where     # "method 'decode'": how errors name the method

    def __cinit__(self):
        self.n = 0

    def __init__(self, list names, list dtypes, list itemsizes, list shapes, list strides,
                 list offsets, list fqns=None, str where="method"):
        cdef Py_ssize_t i, j, total = 0, n = len(names)
        for s in shapes:
            total += len(s)
        self.n = n
        self.ndim = <int64_t*>malloc(max(n, 1) * sizeof(int64_t))
        self.dims_at = <int64_t*>malloc(max(n, 1) * sizeof(int64_t))
        self.offsets = <int64_t*>malloc(max(n, 1) * sizeof(int64_t))
        self.itemsizes = <int64_t*>malloc(max(n, 1) * sizeof(int64_t))
        self.so_sizes = <int64_t*>malloc(max(n, 1) * sizeof(int64_t))
        self.so_kinds = <int32_t*>malloc(max(n, 1) * sizeof(int32_t))
        self.empty = <unsigned char*>malloc(max(n, 1))
        self.dtypes = <int32_t*>malloc(max(n, 1) * sizeof(int32_t))
        self.data = <uintptr_t*>malloc(max(n, 1) * sizeof(uintptr_t))
        self.entries = <ConstantMapEntry*>malloc(max(n, 1) * sizeof(ConstantMapEntry))
        self.sizes = <int64_t*>malloc(max(total, 1) * sizeof(int64_t))
        self.strides = <int64_t*>malloc(max(total, 1) * sizeof(int64_t))
        if not (self.ndim and self.dims_at and self.offsets and self.itemsizes and self.so_sizes
                and self.so_kinds and self.empty and self.dtypes and self.data
                and self.entries and self.sizes and self.strides):
            raise MemoryError("BindPlan")
        self._names = [nm if isinstance(nm, bytes) else nm.encode() for nm in names]
        self._fqns = list(fqns) if fqns is not None else [str(nm) for nm in names]
        self._shapes = shapes
        self.where = where
        cdef Py_ssize_t at = 0
        for i in range(n):
            shape = shapes[i]
            stride = strides[i]
            # read_bundle validated all of this; a BindPlan is the last line before C, so a
            # view that could make AOTI index outside its buffer is refused here too
            if len(stride) != len(shape):
                raise ValueError(f"constant {names[i]!r}: shape {shape} and stride {stride} differ in rank")
            if any(d < 0 for d in shape) or any(st < 0 for st in stride) or offsets[i] < 0 \
                    or itemsizes[i] <= 0:
                raise ValueError(f"constant {names[i]!r}: invalid view {shape}/{stride}/{offsets[i]}")
            # Generated kernels may assume a constant's data pointer is 16-byte aligned (Triton
            # specialises on it); a view starting off that boundary gets a misaligned access
            # that kills the CUDA context for the whole process.
            if (offsets[i] * itemsizes[i]) % VIEW_ALIGN:
                raise ValueError(f"constant {names[i]!r}: its view starts at byte "
                                 f"{offsets[i] * itemsizes[i]} of its storage, not a multiple of "
                                 f"{VIEW_ALIGN}; AOTI's kernels may assume aligned constants")
            self.ndim[i] = len(shape)
            self.dims_at[i] = at
            self.empty[i] = 0
            for j in range(len(shape)):
                self.sizes[at + j] = shape[j]
                self.strides[at + j] = stride[j]
                if shape[j] == 0:
                    self.empty[i] = 1
            at += len(shape)
            self.offsets[i] = offsets[i]
            self.itemsizes[i] = itemsizes[i]
            self.so_sizes[i] = -1
            self.so_kinds[i] = 0
            self.dtypes[i] = dtypes[i]
            self.entries[i].name = <const char*>(<bytes>self._names[i])
            self.entries[i].handle = NULL
            self.data[i] = 0

    def __dealloc__(self):
        free(self.ndim); free(self.dims_at); free(self.offsets); free(self.dtypes)
        free(self.itemsizes); free(self.so_sizes); free(self.so_kinds); free(self.empty)
        free(self.data); free(self.entries); free(self.sizes); free(self.strides)

    def check(self, uintptr_t get_num, uintptr_t get_name, uintptr_t get_dtype,
              uintptr_t get_size, uintptr_t get_type, uintptr_t container, str so_name="the .so",
              last_error=None):
        """Compare the container's constant table with this plan in one nogil loop.

        ``get_*`` are the addresses of ``GetNumConstants``, ``GetConstantName``,
        ``GetConstantDtype``, ``GetConstantDataSize`` and ``GetConstantType`` (the last
        two may be 0 where the .so lacks them: then :meth:`need` stays unknown and
        :meth:`bind` refuses). Raises :class:`BundleError` for the first difference in
        count, names (in index order), dtype codes, or a constant the .so gives storage that
        the manifest views as empty; :class:`AOTIError` if a table call fails
        (``last_error()`` gives AOTI's message).
        """
        cdef f_get_count num = <f_get_count>get_num
        cdef f_get_name name_of = <f_get_name>get_name
        cdef f_get_dtype dtype_of = <f_get_dtype>get_dtype
        cdef f_get_size size_of = <f_get_size>get_size
        cdef f_get_type type_of = <f_get_type>get_type
        cdef size_t count = 0, nbytes = 0
        cdef Py_ssize_t i, bad = -1
        cdef const char* nm = NULL
        cdef int32_t code = 0, rc = 0, kind = 0
        cdef int what = 0      # 1 name, 2 dtype, 3 a call failed, 4 empty view of real storage
        self.checked = False
        with nogil:
            rc = num(<void*>container, &count)
            if rc == 0 and <Py_ssize_t>count == self.n:
                for i in range(self.n):
                    rc = name_of(<void*>container, i, &nm)
                    if rc != 0 or nm == NULL:
                        what = 3
                        bad = i
                        break
                    if strcmp(nm, self.entries[i].name) != 0:
                        what = 1
                        bad = i
                        break
                    rc = dtype_of(<void*>container, i, &code)
                    if rc != 0:
                        what = 3
                        bad = i
                        break
                    if code != self.dtypes[i]:
                        what = 2
                        bad = i
                        break
                    if size_of != NULL:
                        rc = size_of(<void*>container, i, &nbytes)
                        if rc != 0 or nbytes > (<size_t>1 << 62):
                            what = 3
                            bad = i
                            break
                        self.so_sizes[i] = <int64_t>nbytes
                        # AOTI hands kernels data_ptr(), which an empty tensor reports as NULL
                        if nbytes > 0 and self.empty[i]:
                            what = 4
                            bad = i
                            break
                    if type_of != NULL:
                        rc = type_of(<void*>container, i, &kind)
                        if rc != 0:
                            what = 3
                            bad = i
                            break
                        self.so_kinds[i] = kind
        from aoti_rt.errors import AOTIError, BundleError
        if (rc != 0 and bad < 0) or what == 3:
            why = (last_error() if last_error is not None else "") or "see stderr"
            raise AOTIError(f"{self.where}: reading the constant table of {so_name} failed at index "
                            f"{bad} (code {rc}): {why}")
        if <Py_ssize_t>count != self.n:
            detail = f"has {count} constants but the manifest lists {self.n}"
        elif what == 1:
            detail = (f"names constant {bad} {(<bytes>nm).decode(errors='replace')!r} but the manifest "
                      f"says {self._names[bad].decode(errors='replace')!r}")
        elif what == 2:
            from aoti_rt.bundle import DTYPE_NAMES
            detail = (f"gives constant {self._fqns[bad]} dtype code {code} but the manifest says "
                      f"{DTYPE_NAMES.get(self.dtypes[bad], self.dtypes[bad])}")
        elif what == 4:
            detail = (f"keeps {nbytes} bytes for constant {self._fqns[bad]} but the manifest's view of it "
                      f"{self._shapes[bad]} is empty")
        else:
            self.checked = size_of != NULL
            return
        raise BundleError(f"{self.where}: {so_name} {detail}; the bundle is inconsistent, recompile it")

    def need(self, Py_ssize_t i) -> int:
        """Bytes a buffer bound as constant ``i`` must have: its view's start plus the
        storage bytes the .so assumes. AOTI's kernels index from the tensor's data pointer
        with the sizes and strides compiled into the .so (not the manifest's), over at most
        ``GetConstantDataSize`` bytes, so a buffer this large keeps every access inside it
        even when the manifest's view is smaller than the compiled one."""
        self._known(i)
        return self._need(i)

    def so_size(self, Py_ssize_t i) -> int:
        """``GetConstantDataSize`` of constant ``i``: the storage bytes the .so assumes (and
        reads from a ``binary_blob``)."""
        self._known(i)
        return self.so_sizes[i]

    cdef int _known(self, Py_ssize_t i) except -1:
        if not self.checked:
            raise ValueError("BindPlan sizes before a successful check")
        if i < 0 or i >= self.n:
            raise IndexError(i)
        return 0

    cdef inline int64_t _need(self, Py_ssize_t i) noexcept nogil:
        return self.offsets[i] * self.itemsizes[i] + self.so_sizes[i]

    def so_kind(self, Py_ssize_t i) -> int:
        """The .so's type code of constant ``i`` (1 parameter, 2 buffer, 3 tensor constant;
        0 unknown or not reported)."""
        if i < 0 or i >= self.n:
            raise IndexError(i)
        return self.so_kinds[i]

    def bind(self, list buffers, uintptr_t update_pairs, uintptr_t container,
             int device_type, int device_index, uintptr_t create_fn, uintptr_t delete_fn,
             last_error=None):
        """Bind ``buffers[i]`` as constant ``i`` in one Pairs call.

        Raises :class:`AOTIError` if a buffer is smaller than :meth:`need`, if wrapping a
        buffer as a tensor fails, or if the Pairs call fails (``last_error()`` gives AOTI's
        message); the container is then left as it was or fully updated, never half.
        """
        from aoti_rt.errors import AOTIError
        cdef Py_ssize_t i, n = self.n
        cdef f_create_from_blob_v2 create = <f_create_from_blob_v2>create_fn
        cdef f_delete_tensor delete = <f_delete_tensor>delete_fn
        cdef f_update_pairs pairs = <f_update_pairs>update_pairs
        cdef int32_t rc = 0
        cdef Py_ssize_t failed_at = -1
        cdef Buffer buf
        if len(buffers) != n:
            raise ValueError(f"{len(buffers)} buffers for {n} constants")
        if not self.checked:
            raise ValueError("BindPlan.bind before a successful check: the sizes the .so "
                             "assumes are unknown")
        for i in range(n):
            buf = <Buffer>buffers[i]
            if <int64_t>buf.nbytes < self._need(i):
                raise AOTIError(f"{self.where}: constant {self._fqns[i]}: a {buf.nbytes}-byte buffer "
                                f"is smaller than the {self._need(i)} bytes the .so may reach")
            self.data[i] = buf.ptr
        with nogil:
            for i in range(n):
                rc = create(<void*>self.data[i], self.ndim[i], self.sizes + self.dims_at[i],
                            self.strides + self.dims_at[i], self.offsets[i], self.dtypes[i],
                            device_type, device_index, &self.entries[i].handle, 0, NULL, 0)
                if rc != 0:
                    failed_at = i
                    break
            if failed_at < 0:
                rc = pairs(<void*>container, self.entries, n, 0, 1)
            for i in range(n):
                if self.entries[i].handle != NULL:
                    delete(self.entries[i].handle)
                    self.entries[i].handle = NULL
        if failed_at >= 0 or rc != 0:
            what = (f"wrapping constant {self._fqns[failed_at]} as a tensor" if failed_at >= 0
                    else f"UpdateUserManagedConstantBufferPairs (code {rc})")
            why = (last_error() if last_error is not None else "") or "see stderr"
            raise AOTIError(f"{self.where}: binding failed while {what}: {why}")


def run_container(uintptr_t run_fn, uintptr_t container, list input_handles,
                  Py_ssize_t num_outputs, uintptr_t stream):
    """Call ``AOTInductorModelContainerRun`` without the GIL.

    ``input_handles`` are PyCapsules from ``unsafe_alloc_void_ptrs_from_tensors``; AOTI
    steals them. Returns ``(rc, output_capsules)``; the capsules go to
    ``alloc_tensors_by_stealing_from_void_ptrs``.
    """
    cdef Py_ssize_t i, n_in = len(input_handles)
    cdef AtenTensorHandle* ins = <AtenTensorHandle*>malloc(max(n_in, 1) * sizeof(AtenTensorHandle))
    cdef AtenTensorHandle* outs = <AtenTensorHandle*>malloc(max(num_outputs, 1) * sizeof(AtenTensorHandle))
    cdef int32_t rc
    cdef f_run run = <f_run>run_fn
    if ins == NULL or outs == NULL:
        free(ins); free(outs)
        raise MemoryError("run_container")
    try:
        for i in range(n_in):
            ins[i] = PyCapsule_GetPointer(input_handles[i], NULL)
        memset(outs, 0, max(num_outputs, 1) * sizeof(AtenTensorHandle))
        with nogil:
            rc = run(<void*>container, ins, n_in, outs, num_outputs, <void*>stream, NULL)
        if rc != 0:
            return rc, []
        return 0, [PyCapsule_New(outs[i], NULL, NULL) for i in range(num_outputs)]
    finally:
        free(ins)
        free(outs)


# ----------------------------------------------------------------------------------------
# Loading: store file -> buffers
#
# A LoadPlan lists where each requested weight's bytes are in the store and which Buffer
# they go to. Worker threads run it without the GIL (run_host on the CPU, Stager.run on
# CUDA, copy_from_host from a pinned image), optionally hashing every piece right after its
# bytes land in host memory (aoti_rt.digest: one piece = one hash block). run_workers starts
# the workers and is the only place that waits for them: whatever exception reaches the
# waiting thread, it cancels the plan and waits until no worker is inside its loop before
# it re-raises, so the caller may then close the file and free the buffers and stagers.

from cpython.buffer cimport PyBUF_READ
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport uint64_t

import time
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromMemory

cdef extern from "unistd.h" nogil:
    int usleep(unsigned int usec)

cdef extern from *:
    """
    static inline long long aoti_rt_atomic_load_acq(long long* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline long long aoti_rt_atomic_add_acqrel(long long* p, long long v) { return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL); }
    static inline long long aoti_rt_atomic_or(long long* p, long long v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
    static inline int aoti_rt_atomic_cas(long long* p, long long expect, long long desired) {
        return __atomic_compare_exchange_n(p, &expect, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    """
    long long aoti_rt_atomic_load_acq(long long* p) nogil
    long long aoti_rt_atomic_add_acqrel(long long* p, long long v) nogil
    long long aoti_rt_atomic_or(long long* p, long long v) nogil
    int aoti_rt_atomic_cas(long long* p, long long expect, long long desired) nogil

cdef extern from *:
    """
    /* BLAKE3 (unkeyed hash, 32-byte output), written from the BLAKE3 specification for the
       loader's small pieces and digest roots, so that they are hashed without the GIL.
       Portable C; four chunks at a time with GCC/Clang vector extensions. Checked against the
       blake3 package at first use (aoti_rt._cache._b3_selftest) and in the tests. */
    #include <stdint.h>
    #include <string.h>
    #include <stdlib.h>

    enum { B3_START = 1, B3_END = 2, B3_PARENT = 4, B3_ROOT = 8 };
    static const uint32_t b3_iv[8] = {0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
                                      0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u};
    static const uint8_t b3_sched[7][16] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
        {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
        {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
        {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
        {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
        {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
    };

    static inline uint32_t b3_load32(const uint8_t* p) {
        return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
    }
    static inline void b3_store32(uint8_t* p, uint32_t w) {
        p[0] = (uint8_t)w; p[1] = (uint8_t)(w >> 8); p[2] = (uint8_t)(w >> 16); p[3] = (uint8_t)(w >> 24);
    }

    #define B3_ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
    #define B3_G(s, a, b, c, d, x, y) do { \
        s[a] = s[a] + s[b] + (x); s[d] = B3_ROTR(s[d] ^ s[a], 16); \
        s[c] = s[c] + s[d];       s[b] = B3_ROTR(s[b] ^ s[c], 12); \
        s[a] = s[a] + s[b] + (y); s[d] = B3_ROTR(s[d] ^ s[a], 8);  \
        s[c] = s[c] + s[d];       s[b] = B3_ROTR(s[b] ^ s[c], 7);  \
    } while (0)
    #define B3_ROUNDS(s, m) do { \
        for (int r_ = 0; r_ < 7; r_++) { \
            const uint8_t* k_ = b3_sched[r_]; \
            B3_G(s, 0, 4, 8, 12, m[k_[0]], m[k_[1]]);   B3_G(s, 1, 5, 9, 13, m[k_[2]], m[k_[3]]); \
            B3_G(s, 2, 6, 10, 14, m[k_[4]], m[k_[5]]);  B3_G(s, 3, 7, 11, 15, m[k_[6]], m[k_[7]]); \
            B3_G(s, 0, 5, 10, 15, m[k_[8]], m[k_[9]]);  B3_G(s, 1, 6, 11, 12, m[k_[10]], m[k_[11]]); \
            B3_G(s, 2, 7, 8, 13, m[k_[12]], m[k_[13]]); B3_G(s, 3, 4, 9, 14, m[k_[14]], m[k_[15]]); \
        } \
    } while (0)

    /* the first 8 words of the compression output: the next chaining value */
    static void b3_compress(const uint32_t cv[8], const uint8_t block[64], uint32_t block_len,
                            uint64_t counter, uint32_t flags, uint32_t out[8]) {
        uint32_t m[16], s[16];
        for (int i = 0; i < 16; i++) m[i] = b3_load32(block + 4 * i);
        for (int i = 0; i < 8; i++) s[i] = cv[i];
        s[8] = b3_iv[0]; s[9] = b3_iv[1]; s[10] = b3_iv[2]; s[11] = b3_iv[3];
        s[12] = (uint32_t)counter; s[13] = (uint32_t)(counter >> 32); s[14] = block_len; s[15] = flags;
        B3_ROUNDS(s, m);
        for (int i = 0; i < 8; i++) out[i] = s[i] ^ s[i + 8];
    }

    /* a node not yet compressed: the last block of a chunk, or a parent */
    typedef struct { uint32_t cv[8]; uint8_t block[64]; uint32_t block_len; uint64_t counter; uint32_t flags; } b3_node;

    static void b3_chunk_node(const uint8_t* in, size_t len, uint64_t counter, b3_node* o) {
        size_t nblocks = len == 0 ? 1 : (len + 63) / 64, last = 64 * (nblocks - 1);
        uint32_t cv[8];
        memcpy(cv, b3_iv, sizeof cv);
        for (size_t b = 0; b + 1 < nblocks; b++)
            b3_compress(cv, in + 64 * b, 64, counter, b == 0 ? B3_START : 0, cv);
        memcpy(o->cv, cv, sizeof cv);
        memset(o->block, 0, 64);
        memcpy(o->block, in + last, len - last);
        o->block_len = (uint32_t)(len - last);
        o->counter = counter;
        o->flags = (nblocks == 1 ? B3_START : 0) | B3_END;
    }

    static void b3_parent_node(const uint32_t left[8], const uint32_t right[8], b3_node* o) {
        memcpy(o->cv, b3_iv, sizeof o->cv);
        for (int i = 0; i < 8; i++) { b3_store32(o->block + 4 * i, left[i]); b3_store32(o->block + 32 + 4 * i, right[i]); }
        o->block_len = 64; o->counter = 0; o->flags = B3_PARENT;
    }

    static inline void b3_node_cv(const b3_node* o, uint32_t cv[8]) {
        b3_compress(o->cv, o->block, o->block_len, o->counter, o->flags, cv);
    }

    #if defined(__GNUC__) || defined(__clang__)
    #define B3_LANES 4
    typedef uint32_t b3v __attribute__((vector_size(16)));
    /* four whole consecutive chunks at once (one lane each): their chaining values */
    static void b3_chunks4(const uint8_t* in, uint64_t counter, uint32_t cvs[4][8]) {
        b3v h[8], s[16], m[16];
        for (int i = 0; i < 8; i++) h[i] = (b3v){b3_iv[i], b3_iv[i], b3_iv[i], b3_iv[i]};
        b3v lo = {(uint32_t)counter, (uint32_t)(counter + 1), (uint32_t)(counter + 2), (uint32_t)(counter + 3)};
        b3v hi = {(uint32_t)(counter >> 32), (uint32_t)((counter + 1) >> 32), (uint32_t)((counter + 2) >> 32),
                  (uint32_t)((counter + 3) >> 32)};
        for (int b = 0; b < 16; b++) {
            const uint8_t* p = in + 64 * b;
            for (int j = 0; j < 16; j++)
                m[j] = (b3v){b3_load32(p + 4 * j), b3_load32(p + 1024 + 4 * j), b3_load32(p + 2048 + 4 * j),
                             b3_load32(p + 3072 + 4 * j)};
            uint32_t f = (b == 0 ? B3_START : 0) | (b == 15 ? B3_END : 0);
            for (int i = 0; i < 8; i++) s[i] = h[i];
            for (int i = 0; i < 4; i++) s[8 + i] = (b3v){b3_iv[i], b3_iv[i], b3_iv[i], b3_iv[i]};
            s[12] = lo; s[13] = hi; s[14] = (b3v){64, 64, 64, 64}; s[15] = (b3v){f, f, f, f};
            B3_ROUNDS(s, m);
            for (int i = 0; i < 8; i++) h[i] = s[i] ^ s[i + 8];
        }
        for (int l = 0; l < 4; l++)
            for (int i = 0; i < 8; i++) cvs[l][i] = h[i][l];
    }
    #else
    #define B3_LANES 1
    #endif

    /* BLAKE3 of in[0:len] into out[32]. */
    static void aoti_rt_b3_hash(const uint8_t* in, size_t len, uint8_t out[32]) {
        uint32_t stack[64][8], cv[8], cvs[4][8];
        int sp = 0, last_done = 0;
        uint64_t nchunks = len == 0 ? 1 : (len + 1023) / 1024, c = 0;
        int whole_last = nchunks > 1 && len % 1024 == 0;   /* the last chunk is no root: lanes may take it */
        b3_node o;
        while (c + 1 < nchunks) {       /* every chunk but the last is whole */
            int n = 1;
    #if B3_LANES == 4
            if (c + 4 < nchunks || (whole_last && c + 4 == nchunks)) { b3_chunks4(in + 1024 * c, c, cvs); n = 4; }
            else
    #endif
            { b3_chunk_node(in + 1024 * c, 1024, c, &o); b3_node_cv(&o, cvs[0]); }
            for (int l = 0; l < n; l++) {
                uint64_t total = ++c;
                memcpy(cv, cvs[l], sizeof cv);
                if (c == nchunks) { last_done = 1; break; }    /* the last chunk's chaining value */
                while ((total & 1) == 0) {
                    b3_parent_node(stack[--sp], cv, &o);
                    b3_node_cv(&o, cv);
                    total >>= 1;
                }
                memcpy(stack[sp++], cv, sizeof cv);
            }
        }
        if (last_done)                  /* nchunks > 1, so the stack is not empty */
            b3_parent_node(stack[--sp], cv, &o);
        else
            b3_chunk_node(in + 1024 * c, len - 1024 * c, c, &o);
        while (sp > 0) {
            b3_node_cv(&o, cv);
            b3_parent_node(stack[--sp], cv, &o);
        }
        b3_compress(o.cv, o.block, o.block_len, 0, o.flags | B3_ROOT, cv);
        for (int i = 0; i < 8; i++) b3_store32(out + 4 * i, cv[i]);
    }

    /* aoti_rt.digest.combine's root: BLAKE3(domain + le64(nbytes) + hashes[0:32 * nhashes]).
       0, or -1 if out of memory. */
    static int aoti_rt_b3_combine(const uint8_t* domain, size_t dlen, uint64_t nbytes,
                                  const uint8_t* hashes, size_t nhashes, uint8_t out[32]) {
        uint8_t small[1024];
        size_t n = dlen + 8 + 32 * nhashes;
        uint8_t* buf = n <= sizeof small ? small : (uint8_t*)malloc(n);
        if (buf == NULL) return -1;
        memcpy(buf, domain, dlen);
        for (int i = 0; i < 8; i++) buf[dlen + i] = (uint8_t)(nbytes >> (8 * i));
        if (nhashes) memcpy(buf + dlen + 8, hashes, 32 * nhashes);
        aoti_rt_b3_hash(buf, n, out);
        if (buf != small) free(buf);
        return 0;
    }
    """
    void aoti_rt_b3_hash(const uint8_t* data, size_t nbytes, uint8_t* out) nogil
    int aoti_rt_b3_combine(const uint8_t* domain, size_t dlen, uint64_t nbytes,
                           const uint8_t* hashes, size_t nhashes, uint8_t* out) nogil

cdef enum:
    _HASH_BYTES = 32
    _READ_EOF = -1          # read_full: the file ended before the bytes it should hold

# LoadPlan.state: the cancel bit, and below it the number of workers inside their loop
cdef long long _CANCELLED = 1LL << 62
cdef long long _ACTIVE_MASK = (1LL << 62) - 1

# how a worker failed (it raises after leaving its nogil loop)
cdef enum:
    _E_NONE = 0
    _E_READ = 1             # code: errno
    _E_EOF = 2
    _E_HASH = 3             # LoadPlan._hash_error holds the exception
    _E_CUDA = 4             # code: CUresult; step: what was being done

_CUDA_STEPS = {1: "making the device context current (cuCtxPushCurrent)",
               2: "waiting for a staging buffer (cuEventSynchronize)",
               3: "copying to the device (cuMemcpyHtoDAsync)",
               4: "recording a copy event (cuEventRecord)",
               5: "synchronising the copy stream (cuStreamSynchronize)"}

cdef struct Piece:
    int64_t file_off
    int64_t nbytes
    uintptr_t dst
    int64_t weight     # index of the weight (destination Buffer) it belongs to

cdef struct Chunk:
    int64_t first
    int64_t count
    int64_t file_off
    int64_t nbytes


cdef int read_full(int fd, char* dst, int64_t nbytes, int64_t off) noexcept nogil:
    """pread until done: 0, an errno (> 0), or _READ_EOF if the file ends first."""
    cdef ssize_t got
    while nbytes > 0:
        got = pread(fd, dst, <size_t>nbytes, off)
        if got < 0:
            if errno == EINTR:
                continue
            return errno if errno > 0 else 5     # EIO
        if got == 0:
            return _READ_EOF
        dst += got
        nbytes -= got
        off += got
    return 0


#: pieces up to this many bytes are hashed by aoti_rt's own C BLAKE3 without the GIL; larger
#: ones by the blake3 package (faster per byte, but one GIL round trip per call)
C_HASH_MAX = 64 << 10
cdef int _b3_state = -1                 # -1: not checked yet, 0: disagrees with blake3, 1: ok


cdef inline int _hexval(char c) noexcept nogil:
    if c >= 48 and c <= 57:         # 0-9
        return c - 48
    if c >= 97 and c <= 102:        # a-f
        return c - 87
    if c >= 65 and c <= 70:         # A-F
        return c - 55
    return -1


def b3_hash(data) -> bytes:
    """BLAKE3 (32 bytes) of a contiguous bytes-like object, by aoti_rt's own C code."""
    cdef const uint8_t[::1] view = memoryview(data).cast("B")
    cdef uint8_t out[32]
    cdef const uint8_t* ptr = &view[0] if view.shape[0] else <const uint8_t*>b""
    with nogil:
        aoti_rt_b3_hash(ptr, view.shape[0], out)
    return PyBytes_FromStringAndSize(<char*>out, 32)


def b3_combine(long long nbytes, hashes) -> str:
    """:func:`aoti_rt.digest.combine` computed by aoti_rt's own C code (``hashes``
    concatenated)."""
    from aoti_rt import digest as _digest

    cdef bytes domain = _digest._DOMAIN
    cdef bytes joined = bytes(hashes)
    cdef uint8_t out[32]
    if len(joined) % _HASH_BYTES:
        raise ValueError("block hashes are 32 bytes each")
    if aoti_rt_b3_combine(<const uint8_t*>PyBytes_AS_STRING(domain), len(domain), <uint64_t>nbytes,
                          <const uint8_t*>PyBytes_AS_STRING(joined), len(joined) // _HASH_BYTES, out) != 0:
        raise MemoryError("b3_combine")
    return _digest.PREFIX + PyBytes_FromStringAndSize(<char*>out, 32).hex()


cdef bint _b3_ok():
    """Whether our C BLAKE3 agrees with the blake3 package and aoti_rt.digest.combine (checked
    once, ~0.1 ms); if not, the loader hashes everything through the blake3 package."""
    global _b3_state
    if _b3_state < 0:
        from blake3 import blake3
        from aoti_rt import digest as _digest

        data = bytes(range(256)) * 80 + b"aoti_rt"
        ok = True
        for n in (0, 1, 63, 64, 65, 1023, 1024, 1025, 2048, 3072, 4096, 4097, 5120, 9217, 16384, 20487):
            ok = ok and b3_hash(data[:n]) == blake3(data[:n]).digest()
        for n in (0, 5, 3 * _digest.BLOCK + 1):
            h = data[:32 * _digest.num_blocks(n)]
            ok = ok and b3_combine(n, h) == _digest.combine(n, h)
        _b3_state = 1 if ok else 0
    return _b3_state == 1


cdef class LoadPlan:
    """Where each requested weight's bytes are in the store and which Buffer they go to.

    Each weight is cut into pieces at :data:`aoti_rt.digest.BLOCK` boundaries counted from
    its first byte, so a piece is exactly one hash block. Pieces are sorted by file offset;
    runs of pieces contiguous in the file are grouped into chunks of at most
    ``chunk_bytes`` (one ``pread`` into a staging buffer on CUDA). Worker ``w`` of ``n``
    takes chunks ``w, w + n, ...``.

    The plan holds a reference to every destination Buffer for its lifetime, so the memory
    cannot go while a worker writes it. With ``verify=True`` the workers hash every piece
    (BLAKE3) right after its bytes reach host memory, and :meth:`digests` gives each
    weight's digest once they are done. :meth:`cancel` makes the workers stop at the next
    piece; a worker that starts after it does nothing.
    """

    cdef Piece* pieces
    cdef Chunk* chunks
    cdef int64_t* wfirst        # first piece of each requested weight (caller's order)
    cdef int64_t* wcount        # ... and how many it has
    cdef uint8_t* hashes        # 32 bytes per piece (verify only)
    cdef readonly Py_ssize_t num_pieces
    cdef readonly Py_ssize_t num_chunks
    cdef readonly Py_ssize_t num_weights
    cdef readonly long long total_bytes
    cdef readonly long long chunk_bytes
    cdef readonly long long block_bytes
    cdef readonly long long max_end     # the end of the furthest piece in the file
    cdef readonly bint verify
    cdef readonly bint on_cuda          # the destinations are CUDA buffers
    cdef readonly str source            # the store, for error messages
    cdef readonly tuple buffers
    cdef tuple _sizes
    cdef object _hasher
    cdef object _hash_error
    cdef public long long c_hash_max    # pieces up to this size are hashed by our C code, nogil
    cdef long long done                 # bytes moved so far (atomic)
    cdef long long hashed               # bytes hashed so far (atomic)
    cdef long long state                # _CANCELLED | workers inside their loop (atomic)
    cdef long long bodies_begun         # run_workers' thread bodies that began (atomic)
    cdef long long bodies_active        # ... and have not ended yet (atomic)

    def __cinit__(self):
        self.pieces = NULL
        self.chunks = NULL
        self.wfirst = NULL
        self.wcount = NULL
        self.hashes = NULL

    def __init__(self, list file_offsets, list sizes, list buffers, long long chunk_bytes, *,
                 bint verify=False, str source="the weight store"):
        cdef Py_ssize_t i, n = len(file_offsets), cap, np = 0, nc = 0
        cdef int64_t off, left, take, size
        cdef long long block
        cdef uintptr_t dst
        cdef Buffer buf
        cdef int kinds = 0
        from aoti_rt import digest as _digest
        block = _digest.BLOCK
        if len(sizes) != n or len(buffers) != n:
            raise ValueError("file_offsets, sizes and buffers must have the same length")
        if chunk_bytes < block:
            raise ValueError(f"chunk_bytes must be at least the hash block ({block} bytes)")
        self.chunk_bytes = chunk_bytes
        self.block_bytes = block
        self.verify = verify
        self.source = source
        self.num_weights = n
        self.buffers = tuple(buffers)
        self._sizes = tuple(int(s) for s in sizes)
        cap = 1
        for i in range(n):
            buf = <Buffer?>self.buffers[i]
            size = self._sizes[i]
            if size < 0 or file_offsets[i] < 0:
                raise ValueError(f"weight {i}: negative offset or size")
            if buf.ptr == 0 or <int64_t>buf.nbytes < size:
                raise ValueError(f"weight {i}: its buffer holds {buf.nbytes} bytes, {size} are to be read")
            kinds |= 2 if buf.allocator.is_cuda else 1
            cap += (size + block - 1) // block
        if kinds == 3:
            raise ValueError("a LoadPlan's buffers must all be on the host or all on CUDA devices")
        self.on_cuda = kinds == 2
        order = sorted(range(n), key=file_offsets.__getitem__)
        self.pieces = <Piece*>malloc(cap * sizeof(Piece))
        self.chunks = <Chunk*>malloc(cap * sizeof(Chunk))
        self.wfirst = <int64_t*>malloc((n + 1) * sizeof(int64_t))
        self.wcount = <int64_t*>malloc((n + 1) * sizeof(int64_t))
        if self.pieces == NULL or self.chunks == NULL or self.wfirst == NULL or self.wcount == NULL:
            raise MemoryError("LoadPlan")
        if verify:
            self.hashes = <uint8_t*>malloc(cap * _HASH_BYTES)
            if self.hashes == NULL:
                raise MemoryError("LoadPlan")
            from blake3 import blake3
            self._hasher = blake3
            self.c_hash_max = C_HASH_MAX if _b3_ok() else 0
        for i in order:
            off = file_offsets[i]
            left = self._sizes[i]
            dst = (<Buffer>self.buffers[i]).ptr
            self.total_bytes += left
            if left and off + left > self.max_end:
                self.max_end = off + left
            self.wfirst[i] = np
            self.wcount[i] = 0
            while left > 0:
                take = left if left < block else block
                self.pieces[np].file_off = off
                self.pieces[np].nbytes = take
                self.pieces[np].dst = dst
                self.pieces[np].weight = i
                np += 1
                self.wcount[i] += 1
                off += take
                dst += take
                left -= take
        self.num_pieces = np
        # group pieces into chunks
        for i in range(np):
            if (nc > 0 and self.chunks[nc - 1].file_off + self.chunks[nc - 1].nbytes == self.pieces[i].file_off
                    and self.chunks[nc - 1].nbytes + self.pieces[i].nbytes <= chunk_bytes):
                self.chunks[nc - 1].count += 1
                self.chunks[nc - 1].nbytes += self.pieces[i].nbytes
            else:
                self.chunks[nc].first = i
                self.chunks[nc].count = 1
                self.chunks[nc].file_off = self.pieces[i].file_off
                self.chunks[nc].nbytes = self.pieces[i].nbytes
                nc += 1
        self.num_chunks = nc

    def __dealloc__(self):
        free(self.pieces)
        free(self.chunks)
        free(self.wfirst)
        free(self.wcount)
        free(self.hashes)

    @property
    def bytes_done(self) -> int:
        """Bytes the workers have moved so far (for progress bars)."""
        return aoti_rt_atomic_load(&self.done)

    @property
    def cancelled(self) -> bool:
        return (aoti_rt_atomic_load_acq(&self.state) & _CANCELLED) != 0

    @property
    def active_workers(self) -> int:
        """Workers inside their copy loop now."""
        return aoti_rt_atomic_load_acq(&self.state) & _ACTIVE_MASK

    def cancel(self) -> None:
        """Make the workers stop at their next piece (and any worker not yet started do nothing)."""
        self._cancel()

    def wait_idle(self) -> None:
        """Wait, without the GIL and without being interrupted, until no worker is in its loop."""
        with nogil:
            self._wait_idle()

    def _body_begin(self) -> None:
        aoti_rt_atomic_add_acqrel(&self.bodies_begun, 1)
        aoti_rt_atomic_add_acqrel(&self.bodies_active, 1)

    def _body_end(self) -> None:
        aoti_rt_atomic_add_acqrel(&self.bodies_active, -1)

    cdef void _wait_bodies(self, long long started) noexcept nogil:
        """Until the bodies of the ``started`` threads have begun and every body has ended."""
        while (aoti_rt_atomic_load_acq(&self.bodies_begun) < started
               or aoti_rt_atomic_load_acq(&self.bodies_active) > 0):
            usleep(200)

    cdef void _cancel(self) noexcept nogil:
        aoti_rt_atomic_or(&self.state, _CANCELLED)

    cdef bint _cancelled(self) noexcept nogil:
        return (aoti_rt_atomic_load_acq(&self.state) & _CANCELLED) != 0

    cdef bint _enter(self) noexcept nogil:
        """Count a worker in, unless the plan is cancelled (then it must do nothing)."""
        cdef long long s
        while True:
            s = aoti_rt_atomic_load_acq(&self.state)
            if s & _CANCELLED:
                return False
            if aoti_rt_atomic_cas(&self.state, s, s + 1):
                return True

    cdef void _exit(self) noexcept nogil:
        aoti_rt_atomic_add_acqrel(&self.state, -1)

    cdef void _wait_idle(self) noexcept nogil:
        while aoti_rt_atomic_load_acq(&self.state) & _ACTIVE_MASK:
            usleep(200)

    cdef Py_ssize_t _subrange(self, Py_ssize_t p, Py_ssize_t end, int64_t limit, bint same_dst) noexcept nogil:
        """The end of the run of pieces from ``p`` (before ``end``) of at most ``limit`` bytes
        (at least one piece); with ``same_dst``, only pieces contiguous in their destination."""
        cdef Py_ssize_t q = p + 1
        cdef int64_t n = self.pieces[p].nbytes
        while q < end and n + self.pieces[q].nbytes <= limit and (
                not same_dst or self.pieces[q].dst == self.pieces[q - 1].dst + <uintptr_t>self.pieces[q - 1].nbytes):
            n += self.pieces[q].nbytes
            q += 1
        return q

    cdef int _hash(self, Py_ssize_t p0, Py_ssize_t p1, const char* src, int64_t src_off) noexcept nogil:
        """Hash pieces ``[p0, p1)`` into their slots: from ``src + (file_off - src_off)``, or
        from their destinations if ``src`` is NULL. Pieces up to ``c_hash_max`` bytes are
        hashed here without the GIL; larger ones by the blake3 package (SIMD, releasing the
        GIL while it hashes), taking the GIL once for all of them. 0, or -1 with the error
        kept (and the plan cancelled)."""
        cdef Py_ssize_t p
        cdef int64_t nbytes = 0
        cdef bint large = False
        for p in range(p0, p1):
            if self.pieces[p].nbytes <= self.c_hash_max:
                aoti_rt_b3_hash(<const uint8_t*>self._piece_data(p, src, src_off), <size_t>self.pieces[p].nbytes,
                                self.hashes + p * _HASH_BYTES)
                nbytes += self.pieces[p].nbytes
            else:
                large = True
        aoti_rt_atomic_add(&self.hashed, nbytes)
        if large:
            return self._hash_large(p0, p1, src, src_off)
        return 0

    cdef inline const char* _piece_data(self, Py_ssize_t p, const char* src, int64_t src_off) noexcept nogil:
        if src != NULL:
            return src + (self.pieces[p].file_off - src_off)
        return <const char*>self.pieces[p].dst

    cdef int _hash_large(self, Py_ssize_t p0, Py_ssize_t p1, const char* src, int64_t src_off) noexcept with gil:
        """The pieces of ``[p0, p1)`` above ``c_hash_max``, through the blake3 package."""
        cdef Py_ssize_t p
        cdef int64_t nbytes = 0
        cdef bytes d
        hasher = self._hasher
        try:
            for p in range(p0, p1):
                if self.pieces[p].nbytes <= self.c_hash_max:
                    continue
                d = hasher(PyMemoryView_FromMemory(<char*>self._piece_data(p, src, src_off),
                                                   self.pieces[p].nbytes, PyBUF_READ)).digest()
                if PyBytes_GET_SIZE(d) != _HASH_BYTES:
                    raise RuntimeError("blake3 returned a digest of the wrong size")
                memcpy(self.hashes + p * _HASH_BYTES, PyBytes_AS_STRING(d), _HASH_BYTES)
                nbytes += self.pieces[p].nbytes
        except BaseException as e:
            if self._hash_error is None:
                self._hash_error = e
            self._cancel()
            return -1
        aoti_rt_atomic_add(&self.hashed, nbytes)
        return 0

    cdef CUresult _copy_async(self, Py_ssize_t p0, Py_ssize_t p1, const char* src, int64_t src_off,
                              CUstream stream) noexcept nogil:
        """Enqueue host->device copies of pieces ``[p0, p1)`` from ``src + (file_off - src_off)``,
        one per run of pieces contiguous in the file and on the device."""
        cdef Py_ssize_t p = p0, q
        cdef int64_t n
        cdef CUresult rc
        while p < p1:
            q = p + 1
            n = self.pieces[p].nbytes
            # one copy may not span two allocations, even ones adjacent in the address space
            # (consecutive cuMemAlloc slabs often are: CUDA_ERROR_INVALID_VALUE), so only the
            # pieces of one weight are merged
            while q < p1 and self.pieces[q].weight == self.pieces[q - 1].weight \
                    and self.pieces[q].dst == self.pieces[q - 1].dst + <uintptr_t>self.pieces[q - 1].nbytes \
                    and self.pieces[q].file_off == self.pieces[q - 1].file_off + self.pieces[q - 1].nbytes:
                n += self.pieces[q].nbytes
                q += 1
            rc = drv.memcpy_htod_async(<CUdeviceptr>self.pieces[p].dst,
                                       src + (self.pieces[p].file_off - src_off), <size_t>n, stream)
            if rc != 0:
                return rc
            p = q
        return 0

    def digests(self) -> list:
        """One digest string per requested weight (caller's order), from the workers' hashes."""
        from aoti_rt.digest import combine

        cdef Py_ssize_t i
        if not self.verify:
            raise ValueError("this LoadPlan was made without verify=True")
        if aoti_rt_atomic_load_acq(&self.hashed) != self.total_bytes:
            raise RuntimeError("the plan's workers did not hash every piece (the load did not finish)")
        raw = PyBytes_FromStringAndSize(<char*>self.hashes, self.num_pieces * _HASH_BYTES)
        sizes = self._sizes
        out = []
        for i in range(self.num_weights):
            out.append(combine(sizes[i], raw[self.wfirst[i] * _HASH_BYTES:
                                             (self.wfirst[i] + self.wcount[i]) * _HASH_BYTES]))
        return out

    def first_mismatch(self, list digests) -> int:
        """The index of the first weight whose bytes do not have ``digests[i]`` (``None``: not
        checked), or -1. The same check as comparing with :meth:`digests`, with each root
        computed by our C code (checked against :func:`aoti_rt.digest.combine` at first use)
        instead of one Python call per weight."""
        from aoti_rt import digest as _digest

        cdef Py_ssize_t i, k, n
        cdef const char* text
        cdef uint8_t root[32]
        cdef bytes domain = _digest._DOMAIN
        cdef str prefix = _digest.PREFIX
        cdef Py_ssize_t plen = len(prefix)
        cdef int hi, lo
        if len(digests) != self.num_weights:
            raise ValueError("one digest per weight")
        if not self.verify:
            raise ValueError("this LoadPlan was made without verify=True")
        if aoti_rt_atomic_load_acq(&self.hashed) != self.total_bytes:
            raise RuntimeError("the plan's workers did not hash every piece (the load did not finish)")
        if not _b3_ok():
            got = self.digests()
            for i in range(self.num_weights):
                if digests[i] is not None and digests[i] != got[i]:
                    return i
            return -1
        sizes = self._sizes
        for i in range(self.num_weights):
            want = digests[i]
            if want is None:
                continue
            if not isinstance(want, str) or not (<str>want).startswith(prefix):
                return i
            text = PyUnicode_AsUTF8AndSize(want, &n)
            if n != plen + 2 * _HASH_BYTES:
                return i
            if aoti_rt_b3_combine(<const uint8_t*>PyBytes_AS_STRING(domain), len(domain), <uint64_t>sizes[i],
                                  self.hashes + self.wfirst[i] * _HASH_BYTES, <size_t>self.wcount[i], root) != 0:
                raise MemoryError("first_mismatch")
            for k in range(_HASH_BYTES):
                hi = _hexval(text[plen + 2 * k])
                lo = _hexval(text[plen + 2 * k + 1])
                if hi < 0 or lo < 0 or root[k] != ((hi << 4) | lo):
                    return i
        return -1

    def run_host(self, int fd, int worker=0, int nworkers=1) -> None:
        """Read worker ``worker``'s chunks straight into the (host) buffers.

        Runs of pieces contiguous in the file and in memory are read with one ``pread``
        (at most one block of them when verifying); with ``verify`` each run is hashed
        from its destination right after it is read. Raises :class:`BundleError` if the
        store cannot be read or ends early.
        """
        cdef Py_ssize_t c, p, q, end, hp
        cdef int rc = 0, kind = _E_NONE
        cdef int64_t n, pending, at = 0
        cdef int64_t limit = self.block_bytes if self.verify else self.chunk_bytes
        cdef Chunk* ch
        if self.on_cuda:
            raise ValueError("run_host needs host buffers; use a Stager for CUDA buffers")
        if nworkers < 1 or worker < 0:
            raise ValueError("bad worker index")
        if not self._enter():
            return
        with nogil:
            c = worker
            while c < self.num_chunks and kind == _E_NONE and not self._cancelled():
                ch = &self.chunks[c]
                p = ch.first
                end = ch.first + ch.count
                hp = p
                pending = 0
                while p < end:
                    q = self._subrange(p, end, limit, True)
                    n = self.pieces[q - 1].file_off + self.pieces[q - 1].nbytes - self.pieces[p].file_off
                    rc = read_full(fd, <char*>self.pieces[p].dst, n, self.pieces[p].file_off)
                    if rc != 0:
                        kind = _E_EOF if rc == _READ_EOF else _E_READ
                        at = self.pieces[p].file_off
                        break
                    aoti_rt_atomic_add(&self.done, n)
                    if self.verify:
                        pending += n
                        if pending >= self.block_bytes or q == end:
                            if self._hash(hp, q, NULL, 0) != 0:
                                kind = _E_HASH
                                break
                            hp = q
                            pending = 0
                    p = q
                    if self._cancelled():
                        break
                c += nworkers
            if kind != _E_NONE:
                self._cancel()
            self._exit()
        if kind != _E_NONE:
            raise _load_error(self, kind, rc, at, 0)


cdef object _load_error(LoadPlan plan, int kind, long long code, int64_t at, int step):
    """The exception for a worker's failure."""
    import os
    from aoti_rt.errors import BundleError

    if kind == _E_EOF:
        return BundleError(f"{plan.source} ended early (reading at byte {at}): it is truncated; "
                           f"re-copy or recompile the bundle")
    if kind == _E_READ:
        return BundleError(f"reading {plan.source} failed at byte {at}: {os.strerror(code)}")
    if kind == _E_HASH:
        return plan._hash_error
    return CudaError(_CUDA_STEPS.get(step, "loading"), code)


cdef object _join_deferring(list threads, object interrupted_start):
    """Join the threads; an exception raised meanwhile (a KeyboardInterrupt) is kept and
    returned, not raised. Called once every started thread's body has ended, so this waits
    for little but the threads' exit. CPython's Thread.join, interrupted, may mark a running
    thread stopped (it releases the thread's lock from the except clause of
    _wait_for_tstate_lock), so a thread counts as gone only once threading no longer lists
    it. ``interrupted_start`` is a thread whose start() was interrupted: it may or may not
    run; it is waited for (up to a second) to show up, then joined like the others.
    (Compiled: no signal handler runs between these statements, only inside the calls.)"""
    cdef object pending = None
    cdef double deadline = 0
    for t in threads:
        while True:
            try:
                if t.ident is None:
                    if t is not interrupted_start:
                        break           # never started
                    if deadline == 0:
                        deadline = time.monotonic() + 1.0
                    if time.monotonic() > deadline:
                        break           # interrupted before the thread was created
                    time.sleep(0.0002)
                    continue
                t.join()
                if not any(x is t for x in threading.enumerate()):
                    break
                time.sleep(0.0002)
            except BaseException as e:
                if pending is None:
                    pending = e
    return pending


def run_workers(LoadPlan plan, int nworkers, fn, progress=None, double interval=0.1) -> list:
    """Run ``fn(w)`` for each worker ``w`` in ``range(nworkers)`` and return the results.

    ``fn`` runs the worker's part of ``plan`` (``plan.run_host``, ``Stager.run``,
    ``copy_from_host``) on a thread named ``aoti_rt-load_<w>``; the calling thread waits,
    calling ``progress(plan.bytes_done)`` every ``interval`` seconds. A worker's exception
    cancels the others and is raised once all have stopped.

    Whatever exception reaches the waiting thread (a KeyboardInterrupt, a second one while
    it cleans up, an error from ``progress``), the plan is cancelled and the waiting thread
    blocks, uninterruptibly and without the GIL, until every worker's ``fn`` has returned
    (they stop at their next piece); the threads are then joined with further exceptions
    deferred, and the first is re-raised. So when this returns or raises, nothing touches
    the file, the buffers or the stagers. (A thread whose ``start()`` was itself
    interrupted may run later: its ``fn`` finds the plan cancelled and does nothing.)
    A plan of one chunk with one worker runs in the calling thread.
    """
    if nworkers <= 1 and plan.num_chunks <= 1 and progress is None:
        return [fn(0)]
    results = [None] * nworkers
    errors = []
    left = [nworkers]
    lock = threading.Lock()
    finished = threading.Event()

    def body(int w):
        plan._body_begin()
        try:
            results[w] = fn(w)
        except BaseException as e:
            plan.cancel()
            errors.append(e)
        finally:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                finished.set()
            plan._body_end()

    threads = [threading.Thread(target=body, args=(w,), name=f"aoti_rt-load_{w}", daemon=True)
               for w in range(nworkers)]
    cdef object first = None
    cdef object starting = None
    cdef long long started = 0
    try:
        for t in threads:
            starting = t
            t.start()
            starting = None
            started += 1
        while not finished.wait(interval):
            if progress is not None:
                progress(plan.bytes_done)
    except BaseException as e:
        first = e
    if first is not None:
        plan._cancel()
        with nogil:
            plan._wait_bodies(started)
    pending = _join_deferring(threads, starting)
    if first is not None:
        raise first
    if pending is not None:
        raise pending
    if errors:
        raise errors[0]
    return results


cdef class Stager:
    """A worker's CUDA copy engine: two pinned staging buffers, a stream, two events.

    :meth:`run` reads the worker's chunks into alternating staging buffers and enqueues
    ``cuMemcpyHtoDAsync`` for their pieces; a buffer is reused only after the event recorded
    behind its copies has fired, so a read overlaps the previous chunk's copy. No per-weight
    synchronisation; one stream synchronise at the end.
    """

    cdef readonly Buffer staging_a
    cdef readonly Buffer staging_b
    cdef CUstream stream
    cdef CUevent ev[2]
    cdef CUcontext ctx
    cdef readonly long long chunk_bytes

    def __cinit__(self):
        self.stream = NULL
        self.ev[0] = NULL
        self.ev[1] = NULL

    def __init__(self, PinnedAllocator pinned, uintptr_t context, long long chunk_bytes):
        cdef CUcontext prev
        self.ctx = <CUcontext>context
        self.chunk_bytes = chunk_bytes
        self.staging_a = pinned.allocate(chunk_bytes)
        self.staging_b = pinned.allocate(chunk_bytes)
        _check(drv.ctx_push(self.ctx), "cuCtxPushCurrent")
        try:
            _check(drv.stream_create(&self.stream, 1), "cuStreamCreate")   # non-blocking
            _check(drv.event_create(&self.ev[0], 2), "cuEventCreate")      # disable timing
            _check(drv.event_create(&self.ev[1], 2), "cuEventCreate")
        finally:
            drv.ctx_pop(&prev)

    def __dealloc__(self):
        cdef CUcontext prev
        if drv_ready and (self.stream != NULL or self.ev[0] != NULL):
            if drv.ctx_push(self.ctx) == 0:
                if self.stream != NULL:
                    drv.stream_sync(self.stream)
                    drv.stream_destroy(self.stream)
                if self.ev[0] != NULL:
                    drv.event_destroy(self.ev[0])
                if self.ev[1] != NULL:
                    drv.event_destroy(self.ev[1])
                drv.ctx_pop(&prev)

    def run(self, LoadPlan plan, int fd, int worker=0, int nworkers=1) -> None:
        """Move worker ``worker``'s chunks to the device.

        With ``plan.verify`` a chunk is read in runs of at most one block, and each run is
        hashed from the staging buffer right after its read, then its copies are enqueued.
        Raises :class:`BundleError` (the store) or :class:`CudaError` (a driver call).
        """
        cdef Py_ssize_t c, p, q, end, k = 0
        cdef int rc = 0, sync, kind = _E_NONE, step = 0
        cdef int64_t n, at = 0
        cdef int64_t limit = plan.block_bytes if plan.verify else plan.chunk_bytes
        cdef Chunk* ch
        cdef char* stage
        cdef char* bufs[2]
        cdef CUcontext prev
        if plan.chunk_bytes > self.chunk_bytes:
            raise ValueError("plan chunks exceed the staging buffers")
        if not plan.on_cuda and plan.num_pieces:
            raise ValueError("Stager.run needs CUDA buffers; use LoadPlan.run_host for host buffers")
        if nworkers < 1 or worker < 0:
            raise ValueError("bad worker index")
        if not plan._enter():
            return
        bufs[0] = <char*>self.staging_a.ptr
        bufs[1] = <char*>self.staging_b.ptr
        with nogil:
            rc = drv.ctx_push(self.ctx)
            if rc != 0:
                kind, step = _E_CUDA, 1
            else:
                c = worker
                while c < plan.num_chunks and not plan._cancelled():
                    ch = &plan.chunks[c]
                    stage = bufs[k & 1]
                    if k >= 2:
                        rc = drv.event_sync(self.ev[k & 1])
                        if rc != 0:
                            kind, step = _E_CUDA, 2
                            break
                    p = ch.first
                    end = ch.first + ch.count
                    while p < end:
                        q = plan._subrange(p, end, limit, False)
                        n = plan.pieces[q - 1].file_off + plan.pieces[q - 1].nbytes - plan.pieces[p].file_off
                        rc = read_full(fd, stage + (plan.pieces[p].file_off - ch.file_off), n,
                                       plan.pieces[p].file_off)
                        if rc != 0:
                            kind = _E_EOF if rc == _READ_EOF else _E_READ
                            at = plan.pieces[p].file_off
                            break
                        if plan.verify and plan._hash(p, q, stage, ch.file_off) != 0:
                            kind = _E_HASH
                            break
                        rc = plan._copy_async(p, q, stage, ch.file_off, self.stream)
                        if rc != 0:
                            kind, step = _E_CUDA, 3
                            break
                        aoti_rt_atomic_add(&plan.done, n)
                        p = q
                        if p < end and plan._cancelled():
                            break
                    if kind != _E_NONE:
                        break
                    rc = drv.event_record(self.ev[k & 1], self.stream)
                    if rc != 0:
                        kind, step = _E_CUDA, 4
                        break
                    k += 1
                    c += nworkers
                # copies already enqueued read the staging buffers: wait for them in any case
                sync = drv.stream_sync(self.stream)
                if sync != 0 and kind == _E_NONE:
                    kind, step, rc = _E_CUDA, 5, sync
                drv.ctx_pop(&prev)
            if kind != _E_NONE:
                plan._cancel()
            plan._exit()
        if kind != _E_NONE:
            raise _load_error(plan, kind, rc, at, step)


def copy_from_host(LoadPlan plan, Buffer image, Stager stager=None, int worker=0, int nworkers=1) -> None:
    """Copy worker ``worker``'s chunks of the plan from a store image in host memory.

    Piece bytes are at ``image`` + their file offset; every piece must lie inside the image
    (else :class:`BundleError`, before anything is copied). With a CUDA ``stager`` the image
    should be page-locked: copies are enqueued on the stager's stream (one per run of
    contiguous pieces), then, with ``plan.verify``, the pieces are hashed from the image
    while the copies run; one synchronise at the end. With ``stager=None`` the destinations
    are host buffers: each run of at most a block is ``memcpy``'d, then hashed from its
    destination. The caller's reference to ``image`` keeps it alive throughout.
    """
    cdef Py_ssize_t c, p, q, end, i
    cdef int kind = _E_NONE, step = 0
    cdef CUresult rc = 0, sync
    cdef int64_t n
    cdef int64_t limit = plan.block_bytes if plan.verify else plan.chunk_bytes
    cdef const char* base
    cdef Chunk* ch
    cdef CUcontext prev
    cdef CUstream stream = NULL
    if image.ptr == 0 or plan.max_end > <long long>image.nbytes:
        from aoti_rt.errors import BundleError
        raise BundleError(f"{plan.source}: a weight reaches byte {plan.max_end}, past the end of the "
                          f"{image.nbytes}-byte pinned image; the manifest contradicts the store")
    if stager is None and plan.on_cuda:
        raise ValueError("copying to CUDA buffers needs a Stager")
    if stager is not None and not plan.on_cuda and plan.num_pieces:
        raise ValueError("a Stager copies to CUDA buffers only")
    if nworkers < 1 or worker < 0:
        raise ValueError("bad worker index")
    if not plan._enter():
        return
    base = <const char*>image.ptr
    if stager is not None:
        stream = stager.stream
    with nogil:
        if stager is None:
            c = worker
            while c < plan.num_chunks and kind == _E_NONE and not plan._cancelled():
                ch = &plan.chunks[c]
                p = ch.first
                end = ch.first + ch.count
                while p < end:
                    q = plan._subrange(p, end, limit, False)
                    n = 0
                    for i in range(p, q):
                        memcpy(<void*>plan.pieces[i].dst, base + plan.pieces[i].file_off,
                               <size_t>plan.pieces[i].nbytes)
                        n += plan.pieces[i].nbytes
                    if plan.verify and plan._hash(p, q, NULL, 0) != 0:
                        kind = _E_HASH
                        break
                    aoti_rt_atomic_add(&plan.done, n)
                    p = q
                    if plan._cancelled():
                        break
                c += nworkers
        else:
            rc = drv.ctx_push(stager.ctx)
            if rc != 0:
                kind, step = _E_CUDA, 1
            else:
                c = worker
                while c < plan.num_chunks and not plan._cancelled():
                    ch = &plan.chunks[c]
                    end = ch.first + ch.count
                    rc = plan._copy_async(ch.first, end, base, 0, stream)
                    if rc != 0:
                        kind, step = _E_CUDA, 3
                        break
                    if plan.verify:     # hash from the image while the copies run
                        p = ch.first
                        while p < end:
                            q = plan._subrange(p, end, limit, False)
                            if plan._hash(p, q, base, 0) != 0:
                                kind = _E_HASH
                                break
                            p = q
                        if kind != _E_NONE:
                            break
                    aoti_rt_atomic_add(&plan.done, ch.nbytes)
                    c += nworkers
                sync = drv.stream_sync(stream)
                if sync != 0 and kind == _E_NONE:
                    kind, step, rc = _E_CUDA, 5, sync
                drv.ctx_pop(&prev)
        if kind != _E_NONE:
            plan._cancel()
        plan._exit()
    if kind != _E_NONE:
        raise _load_error(plan, kind, rc, 0, step)
