# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The load pipeline: store file -> weight buffers, without the GIL.

Ownership, in one line each:

* a :class:`LoadPlan` lists where each requested weight's bytes are in the store and which
  :class:`~aoti_rt._memory.Buffer` they go to, and holds those Buffers while it lives, so
  no destination can be freed while a worker writes it;
* a :class:`Stager` is one worker's CUDA copy engine (two pinned staging Buffers it owns, a
  stream, two events), reused across loads by the device runtime;
* :func:`run_workers` starts the worker threads and is the only place that waits for them.

Worker threads run a plan without the GIL (:meth:`LoadPlan.run_host` on the CPU,
:meth:`Stager.run` on CUDA, :func:`copy_from_host` from a pinned image), optionally hashing
every piece right after its bytes land in host memory (:mod:`aoti_rt.digest`: one piece =
one hash block). Whatever exception reaches the waiting thread, it cancels the plan and waits
until no worker is inside its loop before it re-raises, so the caller may then close the
file and free the buffers and stagers. Failures are raised where they are found:
:class:`~aoti_rt.errors.BundleError` for the store, :class:`~aoti_rt.errors.CudaError` for a
driver call.
"""

import threading
import time

from cpython.buffer cimport PyBUF_READ
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.errno cimport errno, EINTR
from libc.stdint cimport int64_t, uint8_t, uint64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from aoti_rt._memory cimport (Buffer, CUcontext, CUdeviceptr, CUresult, CUstream, PinnedAllocator,
                              aoti_rt_atomic_add, aoti_rt_atomic_add_acqrel, aoti_rt_atomic_cas,
                              aoti_rt_atomic_load, aoti_rt_atomic_load_acq, aoti_rt_atomic_or,
                              check, drv, drv_ready)
from aoti_rt.errors import BundleError, CudaError

cdef extern from "unistd.h" nogil:
    ssize_t pread(int fd, void* buf, size_t count, long offset)
    int usleep(unsigned int usec)


cdef extern from "_blake3.h" nogil:
    void aoti_rt_b3_hash(const uint8_t* data, size_t nbytes, uint8_t* out)
    int aoti_rt_b3_combine(const uint8_t* domain, size_t dlen, uint64_t nbytes,
                           const uint8_t* hashes, size_t nhashes, uint8_t* out)

cdef enum:
    _HASH_BYTES = 32
    _READ_EOF = -1          # read_full: the file ended before the bytes it should hold
    _DIRECT_ALIGN = 4096

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
               5: "synchronising the copy stream (cuStreamSynchronize)",
               6: "relaying from the first device (cuStreamWaitEvent, cuMemcpyPeerAsync)"}


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef int read_at(int fd, char* dst, int64_t nbytes, int64_t need, int64_t off, bint direct) noexcept nogil:
    """pread ``nbytes`` at ``off`` into ``dst`` until at least ``need`` of them are in: 0, an
    errno (> 0), or _READ_EOF if the file ends first. ``direct``: ``fd`` is O_DIRECT, and
    ``dst``, ``off`` and ``nbytes`` are DIRECT_ALIGN-aligned (``need`` may end inside the last
    aligned block, where the file ends); a short read before ``need`` means the file ended."""
    cdef ssize_t got
    cdef int64_t have = 0
    while have < need:
        got = pread(fd, dst + have, <size_t>(nbytes - have), off + have)
        if got < 0:
            if errno == EINTR:
                continue
            return errno if errno > 0 else 5     # EIO
        if got == 0:
            return _READ_EOF
        have += got
        if direct and have < need and (have & (_DIRECT_ALIGN - 1)):
            return _READ_EOF
    return 0


cdef inline int read_full(int fd, char* dst, int64_t nbytes, int64_t off) noexcept nogil:
    return read_at(fd, dst, nbytes, nbytes, off, False)


#: O_DIRECT reads start, end and land on multiples of this (the page and the common block size)
DIRECT_ALIGN = _DIRECT_ALIGN


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


cdef CUresult _copy_pieces(Piece* pieces, Py_ssize_t p0, Py_ssize_t p1, const char* src, int64_t src_off,
                           CUstream stream) noexcept nogil:
    """Enqueue host->device copies of ``pieces[p0:p1]`` from ``src + (file_off - src_off)``,
    one per run of pieces contiguous in the file and on the device, on ``stream`` (whose
    context must be current)."""
    cdef Py_ssize_t p = p0, q
    cdef int64_t n
    cdef CUresult rc
    while p < p1:
        q = p + 1
        n = pieces[p].nbytes
        # one copy may not span two allocations, even ones adjacent in the address space
        # (consecutive cuMemAlloc slabs often are: CUDA_ERROR_INVALID_VALUE), so only the
        # pieces of one weight are merged
        while q < p1 and pieces[q].weight == pieces[q - 1].weight \
                and pieces[q].dst == pieces[q - 1].dst + <uintptr_t>pieces[q - 1].nbytes \
                and pieces[q].file_off == pieces[q - 1].file_off + pieces[q - 1].nbytes:
            n += pieces[q].nbytes
            q += 1
        rc = drv.memcpy_htod_async(<CUdeviceptr>pieces[p].dst, src + (pieces[p].file_off - src_off),
                                   <size_t>n, stream)
        if rc != 0:
            return rc
        p = q
    return 0


cdef void _memcpy_pieces(Piece* pieces, Py_ssize_t p0, Py_ssize_t p1, const char* src,
                         int64_t src_off) noexcept nogil:
    """Copy ``pieces[p0:p1]`` from ``src + (file_off - src_off)`` to their host destinations."""
    cdef Py_ssize_t p
    for p in range(p0, p1):
        memcpy(<void*>pieces[p].dst, src + (pieces[p].file_off - src_off), <size_t>pieces[p].nbytes)


cdef CUresult _relay_pieces(Piece* dst, Piece* src, Py_ssize_t p0, Py_ssize_t p1, CUcontext dctx,
                           CUcontext sctx, CUstream stream) noexcept nogil:
    """Enqueue device->device copies of pieces ``[p0, p1)`` from ``src``'s destinations (on the
    device of ``sctx``) to ``dst``'s (``dctx``'s device, whose ``stream`` carries them), one
    per run of pieces of one weight contiguous on both devices (``cuMemcpyPeerAsync``: over
    NVLink where peer access is enabled)."""
    cdef Py_ssize_t p = p0, q
    cdef int64_t n
    cdef CUresult rc
    while p < p1:
        q = p + 1
        n = dst[p].nbytes
        while q < p1 and dst[q].weight == dst[q - 1].weight \
                and dst[q].dst == dst[q - 1].dst + <uintptr_t>dst[q - 1].nbytes \
                and src[q].dst == src[q - 1].dst + <uintptr_t>src[q - 1].nbytes:
            n += dst[q].nbytes
            q += 1
        rc = drv.memcpy_peer_async(<CUdeviceptr>dst[p].dst, dctx, <CUdeviceptr>src[p].dst, sctx, <size_t>n, stream)
        if rc != 0:
            return rc
        p = q
    return 0


cdef void _memcpy_relay(Piece* dst, Piece* src, Py_ssize_t p0, Py_ssize_t p1) noexcept nogil:
    """The host twin of :func:`_relay_pieces`: copy each piece from ``src``'s destination."""
    cdef Py_ssize_t p
    for p in range(p0, p1):
        memcpy(<void*>dst[p].dst, <const void*>src[p].dst, <size_t>dst[p].nbytes)


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

    def __cinit__(self):
        self.pieces = NULL
        self.chunks = NULL
        self.wfirst = NULL
        self.wcount = NULL
        self.hashes = NULL

    def __init__(self, list file_offsets, list sizes, list buffers, long long chunk_bytes, *,
                 bint verify=False, str source="the weight store", double max_bytes_per_s=0):
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
        if max_bytes_per_s < 0:
            raise ValueError("max_bytes_per_s must be positive (0: no cap)")
        self.max_bytes_per_s = max_bytes_per_s
        self.t0 = _monotonic()
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

    cdef void _throttle(self, int64_t nbytes) noexcept nogil:
        """With a rate cap, wait for this chunk's turn: each chunk reserves its bytes and may
        start once the bytes reserved before it fit the cap (workers together, checking for
        a cancel every 50 ms), so a load next to a running model leaves it copy bandwidth."""
        cdef double start_at, ahead
        if self.max_bytes_per_s <= 0:
            return
        start_at = self.t0 + aoti_rt_atomic_add_acqrel(&self.reserved, nbytes) / self.max_bytes_per_s
        while not self._cancelled():
            ahead = start_at - _monotonic()
            if ahead <= 0:
                return
            usleep(<unsigned int>(min(ahead, 0.05) * 1e6))

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

    cdef int _stage_chunk(self, int fd, Chunk* ch, char* stage, bint direct, int64_t* src_off,
                          int* rc, int64_t* at) noexcept nogil:
        """Set ``src_off``, the file offset of ``stage[0]`` for chunk ``ch``; with ``direct``, read
        the whole chunk now, over its aligned extent (the staging buffers have DIRECT_ALIGN
        bytes of slack on each side). Returns an ``_E_`` kind (``rc``, ``at``: what failed)."""
        cdef int64_t a1
        src_off[0] = ch.file_off
        if not direct:
            return _E_NONE
        src_off[0] = ch.file_off & ~(<int64_t>_DIRECT_ALIGN - 1)
        a1 = (ch.file_off + ch.nbytes + _DIRECT_ALIGN - 1) & ~(<int64_t>_DIRECT_ALIGN - 1)
        rc[0] = read_at(fd, stage, a1 - src_off[0], ch.file_off + ch.nbytes - src_off[0], src_off[0], True)
        if rc[0] != 0:
            at[0] = ch.file_off
            return _E_EOF if rc[0] == _READ_EOF else _E_READ
        return _E_NONE

    cdef int _stage_pieces(self, int fd, Py_ssize_t p, Py_ssize_t q, char* stage, int64_t src_off,
                           bint direct, int* rc, int64_t* at) noexcept nogil:
        """Pieces ``p..q-1`` of a chunk in ``stage``: read now (unless the chunk was read whole,
        ``direct``) and hashed where the plan verifies. Returns an ``_E_`` kind."""
        cdef int64_t first = self.pieces[p].file_off
        cdef int64_t n = self.pieces[q - 1].file_off + self.pieces[q - 1].nbytes - first
        if not direct:
            rc[0] = read_full(fd, stage + (first - src_off), n, first)
            if rc[0] != 0:
                at[0] = first
                return _E_EOF if rc[0] == _READ_EOF else _E_READ
        if self.verify and self._hash(p, q, stage, src_off) != 0:
            return _E_HASH
        return _E_NONE

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

    cdef const char* _piece_data(self, Py_ssize_t p, const char* src, int64_t src_off) noexcept nogil:
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
        """Enqueue host->device copies of pieces ``[p0, p1)`` from ``src + (file_off - src_off)``
        (:func:`_copy_pieces`)."""
        return _copy_pieces(self.pieces, p0, p1, src, src_off, stream)

    cdef bint _same_layout(self, LoadPlan other) noexcept nogil:
        """Whether ``other`` cuts the same weights of the same store into the same pieces and
        chunks (its destinations may differ): a replicated load reads ``self``'s chunks once
        and copies each piece to ``other``'s destination of the same index."""
        cdef Py_ssize_t i
        if (other.num_pieces != self.num_pieces or other.num_chunks != self.num_chunks
                or other.chunk_bytes != self.chunk_bytes or other.total_bytes != self.total_bytes):
            return False
        for i in range(self.num_pieces):
            if (other.pieces[i].file_off != self.pieces[i].file_off
                    or other.pieces[i].nbytes != self.pieces[i].nbytes
                    or other.pieces[i].weight != self.pieces[i].weight):
                return False
        for i in range(self.num_chunks):
            if (other.chunks[i].first != self.chunks[i].first or other.chunks[i].count != self.chunks[i].count
                    or other.chunks[i].file_off != self.chunks[i].file_off
                    or other.chunks[i].nbytes != self.chunks[i].nbytes):
                return False
        return True

    def same_layout(self, LoadPlan other not None) -> bool:
        """Whether ``other`` has this plan's pieces and chunks (see :func:`run_replicated`)."""
        return self._same_layout(other)

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
                self._throttle(ch.nbytes)
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
    """A worker's CUDA copy engine: ``depth`` pinned staging buffers, a stream, an event each.

    With ``chunk_bytes=0`` it has no staging buffers: a replicated load's worker copies from
    the first device's staging buffers on each other device's stream (:func:`run_replicated`).
    Staging memory is portable pinned memory (:class:`~aoti_rt._memory.PinnedAllocator`), so
    any device's copies may read it.

    :meth:`run` reads the worker's chunks into the staging buffers in turn and enqueues
    ``cuMemcpyHtoDAsync`` for their pieces; a buffer is reused only after the event recorded
    behind its copies has fired, so reads run ahead of the copies by up to ``depth - 1``
    chunks. No per-weight synchronisation; one stream synchronise at the end.
    """

    def __cinit__(self):
        self.stream = NULL
        self.depth = 0
        for i in range(MAX_STAGING_DEPTH):
            self.ev[i] = NULL
            self.bufs[i] = NULL

    def __init__(self, PinnedAllocator pinned, uintptr_t context, long long chunk_bytes, int depth=2,
                 str device=""):
        cdef CUcontext prev
        cdef int i
        if depth < 2 or depth > MAX_STAGING_DEPTH:
            raise ValueError(f"staging depth must be 2 to {MAX_STAGING_DEPTH}")
        if chunk_bytes < 0 or (chunk_bytes and pinned is None):
            raise ValueError("staging buffers of chunk_bytes > 0 need a PinnedAllocator (0: none)")
        self.ctx = <CUcontext>context
        self.chunk_bytes = chunk_bytes
        self.device = device
        # slack for O_DIRECT reads, which start and end on DIRECT_ALIGN boundaries; a copy
        # engine of a replicated load's other devices has none (it copies from the first's)
        self.staging = tuple(pinned.allocate(chunk_bytes + 2 * _DIRECT_ALIGN) for i in range(depth)) \
            if chunk_bytes else ()
        for i in range(len(self.staging)):
            self.bufs[i] = <char*>(<Buffer>self.staging[i]).ptr
        # without the GIL: a driver call may wait for the driver's lock while another thread
        # pins memory, and holding the GIL then would stall every Python thread (a model
        # serving in this process) for that long
        cdef CUresult rc = 0
        cdef int step = 0                   # 1 push, 2 stream, 3 an event
        with nogil:
            rc = drv.ctx_push(self.ctx)
            if rc != 0:
                step = 1
            else:
                rc = drv.stream_create(&self.stream, 1)            # non-blocking
                if rc != 0:
                    step = 2
                else:
                    for i in range(depth):
                        rc = drv.event_create(&self.ev[i], 2)      # disable timing
                        if rc != 0:
                            step = 3
                            break
                        self.depth = i + 1
                drv.ctx_pop(&prev)
        if rc != 0:
            check(rc, ("cuCtxPushCurrent", "cuStreamCreate", "cuEventCreate")[step - 1])

    def __dealloc__(self):
        cdef CUcontext prev
        cdef int i
        if drv_ready and (self.stream != NULL or self.depth):
            with nogil:
                if drv.ctx_push(self.ctx) == 0:
                    if self.stream != NULL:
                        drv.stream_sync(self.stream)
                        drv.stream_destroy(self.stream)
                    for i in range(self.depth):
                        drv.event_destroy(self.ev[i])
                    drv.ctx_pop(&prev)

    def run(self, LoadPlan plan, int fd, int worker=0, int nworkers=1, bint direct=False) -> None:
        """Move worker ``worker``'s chunks to the device.

        With ``plan.verify`` a chunk is read in runs of at most one block, and each run is
        hashed from the staging buffer right after its read, then its copies are enqueued.
        With ``direct``, ``fd`` was opened with ``O_DIRECT`` (a cold page cache): each chunk
        is read whole over its :data:`DIRECT_ALIGN`-aligned extent, then hashed and copied.
        Raises :class:`BundleError` (the store) or :class:`CudaError` (a driver call).
        """
        cdef Py_ssize_t c, p, q, end, k = 0
        cdef int rc = 0, sync, kind = _E_NONE, step = 0
        cdef int64_t n, at = 0, src_off
        cdef int64_t limit = plan.block_bytes if plan.verify else plan.chunk_bytes
        cdef Chunk* ch
        cdef char* stage
        cdef int slot, depth = self.depth
        cdef CUcontext prev
        if plan.chunk_bytes > self.chunk_bytes:
            raise ValueError("plan chunks exceed the staging buffers")
        if not plan.on_cuda and plan.num_pieces:
            raise ValueError("Stager.run needs CUDA buffers; use LoadPlan.run_host for host buffers")
        if nworkers < 1 or worker < 0:
            raise ValueError("bad worker index")
        if not plan._enter():
            return
        with nogil:
            rc = drv.ctx_push(self.ctx)
            if rc != 0:
                kind, step = _E_CUDA, 1
            else:
                c = worker
                while c < plan.num_chunks and not plan._cancelled():
                    ch = &plan.chunks[c]
                    slot = k % depth
                    stage = self.bufs[slot]
                    if k >= depth:
                        rc = drv.event_sync(self.ev[slot])
                        if rc != 0:
                            kind, step = _E_CUDA, 2
                            break
                    plan._throttle(ch.nbytes)
                    p = ch.first
                    end = ch.first + ch.count
                    kind = plan._stage_chunk(fd, ch, stage, direct, &src_off, &rc, &at)
                    if kind != _E_NONE:
                        break
                    while p < end:
                        q = plan._subrange(p, end, limit, False)
                        n = plan.pieces[q - 1].file_off + plan.pieces[q - 1].nbytes - plan.pieces[p].file_off
                        kind = plan._stage_pieces(fd, p, q, stage, src_off, direct, &rc, &at)
                        if kind != _E_NONE:
                            break
                        rc = plan._copy_async(p, q, stage, src_off, self.stream)
                        if rc != 0:
                            kind, step = _E_CUDA, 3
                            break
                        aoti_rt_atomic_add(&plan.done, n)
                        p = q
                        if p < end and plan._cancelled():
                            break
                    if kind != _E_NONE:
                        break
                    rc = drv.event_record(self.ev[slot], self.stream)
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
                plan._throttle(ch.nbytes)
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
                    plan._throttle(ch.nbytes)
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


cdef inline void _pop_context() noexcept nogil:
    cdef CUcontext prev
    drv.ctx_pop(&prev)


def run_replicated(tuple plans, tuple stagers, int fd, int worker=0, int nworkers=1, bint direct=False,
                   tuple staging=None, bint relay=False) -> None:
    """Move worker ``worker``'s chunks to the buffers of every plan, reading each chunk once.

    ``plans[0]`` (the primary) drives the load: its chunks are read, its rate cap paces them,
    with ``verify`` it hashes them, and its cancel, progress and workers' count are the
    load's; every other plan must cut the same weights into the same pieces
    (:meth:`LoadPlan.same_layout`, made from the same offsets and sizes) and only names their
    destinations on another device. A worker reads a chunk into one staging buffer, hashes
    it, and copies each piece to each plan's destination of the same index.

    CUDA (every plan's buffers on a device): ``stagers[j]`` is a copy engine of plan ``j``'s
    device, whose stream and events carry that device's copies; the staging buffers are
    ``stagers[0]``'s (portable pinned memory, so every device's copies may read them; the
    others may have none). Each chunk's copies are enqueued on every device's stream, an
    event recorded on each, and the staging buffer is reused only once every device's event
    has fired. With ``direct``, ``fd`` was opened with ``O_DIRECT`` (as :meth:`Stager.run`).

    With ``relay``, only the first device is copied to from the staging buffer; each other
    device then copies the chunk's pieces from the first device's memory
    (``cuMemcpyPeerAsync`` on its own stream, after waiting for the first device's event of the
    chunk): the host link carries each byte once, the GPUs' link (NVLink) the rest, and a
    staging buffer is reused once the first device's copies are done.

    Host destinations (``stagers`` empty): ``staging`` gives the host buffer(s) a chunk is
    read into (each at least ``chunk_bytes`` + 2 x :data:`DIRECT_ALIGN`), from which each
    piece is ``memcpy``'d to every plan's destination (with ``relay``: to the first plan's,
    then from there to the others'); no ``direct``.

    Raises :class:`BundleError` (the store), :class:`CudaError` naming the device whose
    driver call failed, or ``ValueError`` for plans or engines that do not fit together.
    Whatever fails, every copy enqueued has finished (each device's stream synchronised)
    before this returns, so the caller may free the buffers and stagers.
    """
    cdef Py_ssize_t nrep = len(plans), j, c, p, q, end, k = 0
    cdef LoadPlan primary, rp
    cdef Stager st
    cdef Buffer b
    cdef Piece* pieces[MAX_REPLICAS]
    cdef CUcontext ctxs[MAX_REPLICAS]
    cdef CUstream streams[MAX_REPLICAS]
    cdef CUevent evs[MAX_REPLICAS][MAX_STAGING_DEPTH]
    cdef char* bufs[MAX_STAGING_DEPTH]
    cdef int depth = MAX_STAGING_DEPTH, slot, kind = _E_NONE, step = 0, bad = -1, rc = 0
    cdef Py_ssize_t ncopy = 1 if relay else nrep       # devices copied to from the staging buffer
    cdef CUresult sync
    cdef int64_t n, at = 0, src_off
    cdef int64_t limit
    cdef Chunk* ch
    cdef char* stage
    cdef bint on_cuda
    if nrep < 1 or nrep > MAX_REPLICAS:
        raise ValueError(f"a replicated load copies to 1 to {MAX_REPLICAS} destinations, not {nrep}")
    if nworkers < 1 or worker < 0:
        raise ValueError("bad worker index")
    primary = <LoadPlan?>plans[0]
    on_cuda = primary.on_cuda
    for j in range(nrep):
        rp = <LoadPlan?>plans[j]
        if j and rp.verify:
            raise ValueError("only the first plan of a replicated load may verify (the bytes are hashed once)")
        if j and not primary._same_layout(rp):
            raise ValueError(f"replicated plan {j} does not cut the weights as the first does; make every "
                             f"plan from the same offsets, sizes and chunk_bytes")
        if rp.num_pieces and rp.on_cuda != on_cuda:
            raise ValueError("a replicated load's destinations must all be on the host or all on CUDA devices")
        for q in range(j):
            if plans[q] is rp:
                raise ValueError("a replicated load names one plan twice")
        pieces[j] = rp.pieces
    if primary.num_chunks == 0:
        return
    limit = primary.block_bytes if primary.verify else primary.chunk_bytes
    if on_cuda:
        if stagers is None or len(stagers) != nrep:
            raise ValueError("a replicated load to CUDA devices needs one Stager per plan")
        for j in range(nrep):
            st = <Stager?>stagers[j]
            if st.depth < depth:
                depth = st.depth
            ctxs[j] = st.ctx
            streams[j] = st.stream
            for q in range(st.depth):
                evs[j][q] = st.ev[q]
        st = <Stager>stagers[0]
        if primary.chunk_bytes > st.chunk_bytes or len(st.staging) < depth:
            raise ValueError("plan chunks exceed the first Stager's staging buffers")
        for q in range(depth):
            bufs[q] = st.bufs[q]
    else:
        if direct:
            raise ValueError("direct reads need CUDA destinations (host staging is not O_DIRECT-aligned)")
        if not staging:
            raise ValueError("a replicated load to host buffers needs a host staging buffer")
        depth = min(len(staging), MAX_STAGING_DEPTH)
        for q in range(depth):
            b = <Buffer?>staging[q]
            if b.allocator.is_cuda or <int64_t>b.nbytes < primary.chunk_bytes + 2 * _DIRECT_ALIGN:
                raise ValueError(f"host staging buffers must hold chunk_bytes + {2 * _DIRECT_ALIGN} bytes")
            bufs[q] = <char*>b.ptr
    if not primary._enter():
        return
    with nogil:
        c = worker
        while c < primary.num_chunks and not primary._cancelled():
            ch = &primary.chunks[c]
            slot = k % depth
            stage = bufs[slot]
            if on_cuda and k >= depth:
                # every device's copies out of this staging buffer must be done
                for j in range(ncopy):
                    rc = drv.ctx_push(ctxs[j])
                    if rc != 0:
                        kind, step, bad = _E_CUDA, 1, j
                        break
                    rc = drv.event_sync(evs[j][slot])
                    _pop_context()
                    if rc != 0:
                        kind, step, bad = _E_CUDA, 2, j
                        break
                if kind != _E_NONE:
                    break
            primary._throttle(ch.nbytes)
            p = ch.first
            end = ch.first + ch.count
            kind = primary._stage_chunk(fd, ch, stage, direct, &src_off, &rc, &at)
            if kind != _E_NONE:
                break
            while p < end:
                q = primary._subrange(p, end, limit, False)
                n = primary.pieces[q - 1].file_off + primary.pieces[q - 1].nbytes - primary.pieces[p].file_off
                kind = primary._stage_pieces(fd, p, q, stage, src_off, direct, &rc, &at)
                if kind != _E_NONE:
                    break
                for j in range(ncopy):
                    if not on_cuda:
                        _memcpy_pieces(pieces[j], p, q, stage, src_off)
                        continue
                    rc = drv.ctx_push(ctxs[j])
                    if rc != 0:
                        kind, step, bad = _E_CUDA, 1, j
                        break
                    rc = _copy_pieces(pieces[j], p, q, stage, src_off, streams[j])
                    _pop_context()
                    if rc != 0:
                        kind, step, bad = _E_CUDA, 3, j
                        break
                if kind != _E_NONE:
                    break
                aoti_rt_atomic_add(&primary.done, n)
                p = q
                if p < end and primary._cancelled():
                    break
            if kind != _E_NONE:
                break
            if on_cuda:
                for j in range(nrep):
                    rc = drv.ctx_push(ctxs[j])
                    if rc != 0:
                        kind, step, bad = _E_CUDA, 1, j
                        break
                    if j and relay:
                        # the chunk is on the first device once its event fires: copy it from there
                        rc = drv.stream_wait_event(streams[j], evs[0][slot], 0)
                        if rc == 0:
                            rc = _relay_pieces(pieces[j], pieces[0], ch.first, ch.first + ch.count,
                                               ctxs[j], ctxs[0], streams[j])
                        if rc != 0:
                            _pop_context()
                            kind, step, bad = _E_CUDA, 6, j
                            break
                    rc = drv.event_record(evs[j][slot], streams[j])
                    _pop_context()
                    if rc != 0:
                        kind, step, bad = _E_CUDA, 4, j
                        break
                if kind != _E_NONE:
                    break
            elif relay:
                for j in range(1, nrep):
                    _memcpy_relay(pieces[j], pieces[0], ch.first, ch.first + ch.count)
            k += 1
            c += nworkers
        if on_cuda:
            # copies already enqueued read the staging buffers: wait for them in any case
            for j in range(nrep):
                sync = drv.ctx_push(ctxs[j])
                if sync == 0:
                    sync = drv.stream_sync(streams[j])
                    _pop_context()
                if sync != 0 and kind == _E_NONE:
                    kind, step, rc, bad = _E_CUDA, 5, sync, j
        if kind != _E_NONE:
            primary._cancel()
        primary._exit()
    if kind == _E_NONE:
        return
    if kind == _E_CUDA and bad >= 0:
        st = <Stager>stagers[bad]
        raise CudaError(f"{_CUDA_STEPS.get(step, 'loading')} on {st.device or f'replica {bad}'}", rc)
    raise _load_error(primary, kind, rc, at, step)
