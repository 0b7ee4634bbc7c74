# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Memory shared across processes: a :class:`SharedArena` is one mapping of memory that other
processes can map too, and an :class:`ArenaAllocator` carves :class:`~aoti_rt._memory.Buffer`\ s
out of arenas (each Buffer keeps its arena alive, as slab Buffers keep their slab).

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
* a client maps it read-only. That is aoti_rt's choice, not a limit the handle enforces: the
  descriptor is the allocation's full handle, and a process that holds it may import it
  itself and map it read-write. Clients are processes of the exporter's own user (the socket
  checks), so this keeps aoti_rt's clients from writing by mistake; it does not defend the
  weights against hostile code running as that user.

The CPU twin, so that the whole mechanism runs in CI: ``memfd_create`` + ``ftruncate`` +
``mmap(MAP_SHARED)`` for the exporter, then sealed: against shrinking and growing (a client
cannot make the exporter fault) and with ``F_SEAL_FUTURE_WRITE`` (Linux >= 5.1): from then on
no ``write()`` and no new writable shared mapping of the memfd, through any descriptor (a
client's reopen of ``/proc/self/fd/N`` read-write, or ``/proc/<pid>/map_files``, included).
The exporter's own mapping, made before the seal, keeps its right to be writable: it can be
made writable again for an in-place weight update (:meth:`SharedArena.unprotect`). A kernel
without that seal cannot export a host arena (:class:`~aoti_rt.errors.ShareUnavailableError`), and a
client refuses a memfd without it. The kernel keeps the pages while any process maps them.
"""

cimport cython
from libc.stdint cimport uintptr_t
from libc.string cimport memset

import os

from aoti_rt._memory cimport (Allocator, Buffer, CUcontext, CUdeviceptr, CUmemAccessDesc, CUmemAllocationProp,
                              CUmemGenericAllocationHandle, CUresult, count_arena, drv, drv_ready, drv_vmm)

from aoti_rt._memory import SLAB_ALIGN, SLAB_BYTES, VMM_LAYOUT_OK
from aoti_rt.errors import AllocationError, CudaError, ShareError, ShareUnavailableError

cdef extern from "sys/mman.h" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    int mprotect(void* addr, size_t length, int prot)
    void* MAP_FAILED
    int PROT_READ, PROT_WRITE, MAP_SHARED

cdef extern from "errno.h":
    int errno

cdef extern from "unistd.h" nogil:
    int close(int fd)

cdef enum:
    _SLAB_ALIGN = 256

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
_F_SEAL_WRITE = 0x8
_F_SEAL_FUTURE_WRITE = 0x10


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
        raise ShareUnavailableError(f"{device} cannot share weights across processes: {why}; load without share=")


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
        self.is_arena = True

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
        self.mapped = True
        count_arena(1, <long long>self.size)

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
        try:
            # no write() and no new writable shared mapping from now on, through any descriptor of
            # it: this process's mapping, made before, alone keeps the right to be writable
            fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_FUTURE_WRITE)
        except OSError as e:
            munmap(p, size)
            os.close(fd)
            raise ShareUnavailableError(f"this kernel cannot seal shared weights against writes by the processes that "
                             f"map them (F_SEAL_FUTURE_WRITE, Linux >= 5.1: {e}); load without share=") from None
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
        try:
            seals = fcntl.fcntl(fd, _F_GET_SEALS)
        except OSError as e:
            raise ShareError(f"the exporter sent a descriptor that is not a memfd ({e}); refusing to map "
                             f"it") from None
        if not seals & _F_SEAL_SHRINK:
            raise ShareError("the exporter sent a descriptor that is not sealed against shrinking; refusing "
                             "to map memory that could vanish under this process")
        if not seals & (_F_SEAL_FUTURE_WRITE | _F_SEAL_WRITE):
            raise ShareError("the exporter sent a descriptor that is not sealed against writes; refusing "
                             "weights that any process holding it could change")
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
            # a read-only open of the memfd, not a dup of the exporter's read-write descriptor;
            # whatever a client reopens it as, the F_SEAL_FUTURE_WRITE seal refuses it writes
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
        writable). Clients cannot map the memfd writable whatever this process does: it is sealed
        against writes (``F_SEAL_FUTURE_WRITE``) and they get a read-only descriptor
        (:meth:`export`)."""
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
        count_arena(-1, -<long long>self.size)
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
