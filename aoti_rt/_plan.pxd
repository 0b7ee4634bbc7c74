# cython: language_level=3
"""The load plan (what goes where) and the one copy loop that carries it out. See ``_plan.pyx``."""

from libc.stdint cimport int64_t, uint8_t, uintptr_t

from aoti_rt._memory cimport CUcontext, CUevent, CUresult, CUstream
from aoti_rt._pieces cimport Chunk, Piece


cdef struct Dest:      # one destination of move_chunks
    Piece* pieces      # its plan's pieces (the driving plan's layout): where each piece goes
    CUcontext ctx      # the device's context; NULL: host memory
    CUstream stream    # the device's copy stream
    CUevent* ev        # the device's events, one per staging buffer

# how a worker failed (it raises after leaving its nogil loop)
cdef enum:
    E_NONE = 0
    E_READ = 1         # code: errno
    E_EOF = 2
    E_HASH = 3         # LoadPlan._hash_error holds the exception
    E_CUDA = 4         # code: CUresult; step: what was being done; bad: which destination

cdef struct Failure:
    int kind
    int step
    Py_ssize_t bad
    long long code
    int64_t at         # the file offset of a failed read


cdef class LoadPlan:
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
    cdef readonly tuple buffers         # the destinations, held while the plan lives
    cdef tuple _sizes
    cdef object _hasher
    cdef object _hash_error
    cdef public long long c_hash_max    # pieces up to this size are hashed by our C code, nogil
    cdef readonly double max_bytes_per_s  # the rate cap of the workers together (0: none)
    cdef double t0                      # when the plan was made (CLOCK_MONOTONIC, seconds)
    cdef long long reserved             # bytes of the chunks that took their turn (atomic)
    cdef long long done                 # bytes moved so far (atomic)
    cdef long long hashed               # bytes hashed so far (atomic)
    cdef long long state                # _CANCELLED | workers inside their loop (atomic)
    cdef long long bodies_begun         # run_workers' thread bodies that began (atomic)
    cdef long long bodies_active        # ... and have not ended yet (atomic)

    cdef void _wait_bodies(self, long long started) noexcept nogil
    cdef void _throttle(self, int64_t nbytes) noexcept nogil
    cdef void _cancel(self) noexcept nogil
    cdef bint _cancelled(self) noexcept nogil
    cdef bint _enter(self) noexcept nogil
    cdef void _exit(self) noexcept nogil
    cdef void _wait_idle(self) noexcept nogil
    cdef int _stage_chunk(self, int fd, Chunk* ch, char* stage, bint direct, int64_t* src_off,
                          int* rc, int64_t* at) noexcept nogil
    cdef int _stage_pieces(self, int fd, Py_ssize_t p, Py_ssize_t q, char* stage, int64_t src_off,
                           bint direct, int* rc, int64_t* at) noexcept nogil
    cdef Py_ssize_t _subrange(self, Py_ssize_t p, Py_ssize_t end, int64_t limit, bint same_dst) noexcept nogil
    cdef int _hash(self, Py_ssize_t p0, Py_ssize_t p1, const char* src, int64_t src_off) noexcept nogil
    cdef const char* _piece_data(self, Py_ssize_t p, const char* src, int64_t src_off) noexcept nogil
    cdef int _hash_large(self, Py_ssize_t p0, Py_ssize_t p1, const char* src, int64_t src_off) noexcept with gil
    cdef bint _same_layout(self, LoadPlan other) noexcept nogil


#: move one worker's chunks of ``plan`` to ``dests`` (see _plan.pyx); returns ``err.kind``
cdef int move_chunks(LoadPlan plan, Dest* dests, Py_ssize_t ndest, bint relay, int fd, const char* image,
                     char** bufs, int depth, bint direct, int worker, int nworkers,
                     Failure* err) noexcept nogil

#: the exception for a worker's failure (``device``: name it for a failed driver call, or None)
cdef object load_error(LoadPlan plan, Failure* err, object device)
