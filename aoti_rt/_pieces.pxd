# cython: language_level=3
"""The byte-level steps of a load: pread, BLAKE3, copies of runs of pieces. See ``_pieces.pyx``."""

from libc.stdint cimport int64_t, uint8_t, uintptr_t

from aoti_rt._memory cimport CUcontext, CUresult, CUstream


cdef struct Piece:
    int64_t file_off
    int64_t nbytes
    uintptr_t dst
    int64_t weight     # index of the weight (destination Buffer) it belongs to

cdef struct Chunk:     # a run of pieces contiguous in the file: one pread
    int64_t first
    int64_t count
    int64_t file_off
    int64_t nbytes

cdef enum:
    HASH_BYTES = 32
    READ_EOF = -1              # read_full: the file ended before the bytes it should hold
    DIRECT_ALIGN_BYTES = 4096  # O_DIRECT reads start, end and land on multiples of this

cdef double monotonic() noexcept nogil
cdef int read_at(int fd, char* dst, int64_t nbytes, int64_t need, int64_t off, bint direct) noexcept nogil
cdef int read_full(int fd, char* dst, int64_t nbytes, int64_t off) noexcept nogil
cdef int hexval(char c) noexcept nogil
#: whether our C BLAKE3 agrees with the blake3 package (checked once)
cdef bint b3_ok() except -1
cdef CUresult copy_pieces(Piece* pieces, Py_ssize_t p0, Py_ssize_t p1, const char* src, int64_t src_off,
                          CUstream stream) noexcept nogil
cdef void memcpy_pieces(Piece* pieces, Py_ssize_t p0, Py_ssize_t p1, const char* src,
                        int64_t src_off) noexcept nogil
cdef CUresult relay_pieces(Piece* dst, Piece* src, Py_ssize_t p0, Py_ssize_t p1, CUcontext dctx,
                           CUcontext sctx, CUstream stream) noexcept nogil
cdef void memcpy_relay(Piece* dst, Piece* src, Py_ssize_t p0, Py_ssize_t p1) noexcept nogil
