# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The byte-level steps of a load, without the GIL: ``pread`` of the store (``O_DIRECT``
aware), BLAKE3 of a piece and of a digest's root (aoti_rt's own C code, checked against the
blake3 package at first use), and copying runs of pieces to host memory, to a device
(``cuMemcpyHtoDAsync``) or from one device to another (``cuMemcpyPeerAsync``).
:mod:`aoti_rt._plan` builds the load on them.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport errno, EINTR
from libc.stdint cimport int64_t, uint8_t, uint64_t, uintptr_t
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from aoti_rt._memory cimport CUcontext, CUdeviceptr, CUresult, CUstream, drv

cdef extern from "unistd.h" nogil:
    ssize_t pread(int fd, void* buf, size_t count, long offset)


cdef extern from "_blake3.h" nogil:
    void aoti_rt_b3_hash(const uint8_t* data, size_t nbytes, uint8_t* out)
    int aoti_rt_b3_combine(const uint8_t* domain, size_t dlen, uint64_t nbytes,
                           const uint8_t* hashes, size_t nhashes, uint8_t* out)


cdef double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef int read_at(int fd, char* dst, int64_t nbytes, int64_t need, int64_t off, bint direct) noexcept nogil:
    """pread ``nbytes`` at ``off`` into ``dst`` until at least ``need`` of them are in: 0, an
    errno (> 0), or READ_EOF if the file ends first. ``direct``: ``fd`` is O_DIRECT, and
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
            return READ_EOF
        have += got
        if direct and have < need and (have & (DIRECT_ALIGN_BYTES - 1)):
            return READ_EOF
    return 0


cdef int read_full(int fd, char* dst, int64_t nbytes, int64_t off) noexcept nogil:
    return read_at(fd, dst, nbytes, nbytes, off, False)


#: O_DIRECT reads start, end and land on multiples of this (the page and the common block size)
DIRECT_ALIGN = DIRECT_ALIGN_BYTES


cdef int _b3_state = -1                 # -1: not checked yet, 0: disagrees with blake3, 1: ok


cdef int hexval(char c) noexcept nogil:
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
    if len(joined) % HASH_BYTES:
        raise ValueError("block hashes are 32 bytes each")
    if aoti_rt_b3_combine(<const uint8_t*>PyBytes_AS_STRING(domain), len(domain), <uint64_t>nbytes,
                          <const uint8_t*>PyBytes_AS_STRING(joined), len(joined) // HASH_BYTES, out) != 0:
        raise MemoryError("b3_combine")
    return _digest.PREFIX + PyBytes_FromStringAndSize(<char*>out, 32).hex()


cdef bint b3_ok() except -1:
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


cdef CUresult copy_pieces(Piece* pieces, Py_ssize_t p0, Py_ssize_t p1, const char* src, int64_t src_off,
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


cdef void memcpy_pieces(Piece* pieces, Py_ssize_t p0, Py_ssize_t p1, const char* src,
                         int64_t src_off) noexcept nogil:
    """Copy ``pieces[p0:p1]`` from ``src + (file_off - src_off)`` to their host destinations."""
    cdef Py_ssize_t p
    for p in range(p0, p1):
        memcpy(<void*>pieces[p].dst, src + (pieces[p].file_off - src_off), <size_t>pieces[p].nbytes)


cdef CUresult relay_pieces(Piece* dst, Piece* src, Py_ssize_t p0, Py_ssize_t p1, CUcontext dctx,
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


cdef void memcpy_relay(Piece* dst, Piece* src, Py_ssize_t p0, Py_ssize_t p1) noexcept nogil:
    """The host twin of :func:`relay_pieces`: copy each piece from ``src``'s destination."""
    cdef Py_ssize_t p
    for p in range(p0, p1):
        memcpy(<void*>dst[p].dst, <const void*>src[p].dst, <size_t>dst[p].nbytes)
