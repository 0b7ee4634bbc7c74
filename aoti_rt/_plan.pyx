# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The load plan, and the one loop that carries it out: store bytes -> weight buffers.

* a :class:`LoadPlan` lists where each requested weight's bytes are in the store and which
  :class:`~aoti_rt._memory.Buffer` they go to, and holds those Buffers while it lives, so no
  destination can be freed while a worker writes it; it hashes what its workers move, counts
  them in and out and carries the cancel bit;
* :func:`move_chunks` is the only copy loop: one worker's chunks from the store file (read in
  place, or into staging buffers, ``O_DIRECT`` or not) or from an image in host memory, to one
  or several destinations (:c:type:`Dest`: host memory, or a device with its context, stream
  and events), without the GIL and without Python per chunk.

The byte-level steps (pread, BLAKE3, copies of runs of pieces) are in :mod:`aoti_rt._pieces`;
the engines and threads around the loop (:class:`~aoti_rt._load.Stager`,
:func:`~aoti_rt._load.run_workers`, the replicated load) are in :mod:`aoti_rt._load`, which
re-exports the public names of both.
"""

from cpython.buffer cimport PyBUF_READ
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int64_t, uint8_t, uint64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

from aoti_rt._memory cimport (Buffer, CUcontext, CUdeviceptr, CUresult, CUstream,
                              aoti_rt_atomic_add, aoti_rt_atomic_add_acqrel, aoti_rt_atomic_cas,
                              aoti_rt_atomic_load, aoti_rt_atomic_load_acq, aoti_rt_atomic_or,
                              ctx_enter, ctx_leave, drv)
from aoti_rt._pieces cimport (DIRECT_ALIGN_BYTES, HASH_BYTES, READ_EOF, b3_ok, copy_pieces, hexval,
                              memcpy_pieces, memcpy_relay, monotonic, read_at, read_full, relay_pieces)
from aoti_rt._pieces import DIRECT_ALIGN, b3_combine, b3_hash
from aoti_rt.errors import BundleError, CudaError

cdef extern from "unistd.h" nogil:
    int usleep(unsigned int usec)


cdef extern from "_blake3.h" nogil:
    void aoti_rt_b3_hash(const uint8_t* data, size_t nbytes, uint8_t* out)
    int aoti_rt_b3_combine(const uint8_t* domain, size_t dlen, uint64_t nbytes,
                           const uint8_t* hashes, size_t nhashes, uint8_t* out)

# LoadPlan.state: the cancel bit, and below it the number of workers inside their loop
cdef long long _CANCELLED = 1LL << 62
cdef long long _ACTIVE_MASK = (1LL << 62) - 1

_CUDA_STEPS = {1: "making the device context current (cuCtxPushCurrent)",
               2: "waiting for a staging buffer (cuEventSynchronize)",
               3: "copying to the device (cuMemcpyHtoDAsync)",
               4: "recording a copy event (cuEventRecord)",
               5: "synchronising the copy stream (cuStreamSynchronize)",
               6: "relaying from the first device (cuStreamWaitEvent, cuMemcpyPeerAsync)"}


#: pieces up to this many bytes are hashed by aoti_rt's own C BLAKE3 without the GIL; larger
#: ones by the blake3 package (faster per byte, but one GIL round trip per call)
C_HASH_MAX = 64 << 10


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
        self.t0 = monotonic()
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
            self.hashes = <uint8_t*>malloc(cap * HASH_BYTES)
            if self.hashes == NULL:
                raise MemoryError("LoadPlan")
            from blake3 import blake3
            self._hasher = blake3
            self.c_hash_max = C_HASH_MAX if b3_ok() else 0
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
            ahead = start_at - monotonic()
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
        bytes of slack on each side). Returns an ``E_`` kind (``rc``, ``at``: what failed)."""
        cdef int64_t a1
        src_off[0] = ch.file_off
        if not direct:
            return E_NONE
        src_off[0] = ch.file_off & ~(<int64_t>DIRECT_ALIGN_BYTES - 1)
        a1 = (ch.file_off + ch.nbytes + DIRECT_ALIGN_BYTES - 1) & ~(<int64_t>DIRECT_ALIGN_BYTES - 1)
        rc[0] = read_at(fd, stage, a1 - src_off[0], ch.file_off + ch.nbytes - src_off[0], src_off[0], True)
        if rc[0] != 0:
            at[0] = ch.file_off
            return E_EOF if rc[0] == READ_EOF else E_READ
        return E_NONE

    cdef int _stage_pieces(self, int fd, Py_ssize_t p, Py_ssize_t q, char* stage, int64_t src_off,
                           bint direct, int* rc, int64_t* at) noexcept nogil:
        """Pieces ``p..q-1`` of a chunk in ``stage``: read now (unless the chunk was read whole,
        ``direct``) and hashed where the plan verifies. Returns an ``E_`` kind."""
        cdef int64_t first = self.pieces[p].file_off
        cdef int64_t n = self.pieces[q - 1].file_off + self.pieces[q - 1].nbytes - first
        if not direct:
            rc[0] = read_full(fd, stage + (first - src_off), n, first)
            if rc[0] != 0:
                at[0] = first
                return E_EOF if rc[0] == READ_EOF else E_READ
        if self.verify and self._hash(p, q, stage, src_off) != 0:
            return E_HASH
        return E_NONE

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
                                self.hashes + p * HASH_BYTES)
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
                if PyBytes_GET_SIZE(d) != HASH_BYTES:
                    raise RuntimeError("blake3 returned a digest of the wrong size")
                memcpy(self.hashes + p * HASH_BYTES, PyBytes_AS_STRING(d), HASH_BYTES)
                nbytes += self.pieces[p].nbytes
        except BaseException as e:
            if self._hash_error is None:
                self._hash_error = e
            self._cancel()
            return -1
        aoti_rt_atomic_add(&self.hashed, nbytes)
        return 0

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
        raw = PyBytes_FromStringAndSize(<char*>self.hashes, self.num_pieces * HASH_BYTES)
        sizes = self._sizes
        out = []
        for i in range(self.num_weights):
            out.append(combine(sizes[i], raw[self.wfirst[i] * HASH_BYTES:
                                             (self.wfirst[i] + self.wcount[i]) * HASH_BYTES]))
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
        if not b3_ok():
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
            if n != plen + 2 * HASH_BYTES:
                return i
            if aoti_rt_b3_combine(<const uint8_t*>PyBytes_AS_STRING(domain), len(domain), <uint64_t>sizes[i],
                                  self.hashes + self.wfirst[i] * HASH_BYTES, <size_t>self.wcount[i], root) != 0:
                raise MemoryError("first_mismatch")
            for k in range(HASH_BYTES):
                hi = hexval(text[plen + 2 * k])
                lo = hexval(text[plen + 2 * k + 1])
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
        cdef Dest d
        cdef Failure err
        if self.on_cuda:
            raise ValueError("run_host needs host buffers; use a Stager for CUDA buffers")
        if nworkers < 1 or worker < 0:
            raise ValueError("bad worker index")
        d.pieces = self.pieces
        d.ctx = NULL
        d.stream = NULL
        d.ev = NULL
        with nogil:
            move_chunks(self, &d, 1, False, fd, NULL, NULL, 0, False, worker, nworkers, &err)
        if err.kind != E_NONE:
            raise load_error(self, &err, None)


cdef object load_error(LoadPlan plan, Failure* err, object device):
    """The exception for a worker's failure; ``device`` (not None): name the device of a
    failed driver call in the message."""
    import os

    if err.kind == E_EOF:
        return BundleError(f"{plan.source} ended early (reading at byte {err.at}): it is truncated; "
                           f"re-copy or recompile the bundle")
    if err.kind == E_READ:
        return BundleError(f"reading {plan.source} failed at byte {err.at}: {os.strerror(err.code)}")
    if err.kind == E_HASH:
        return plan._hash_error
    what = _CUDA_STEPS.get(err.step, "loading")
    return CudaError(what if device is None else f"{what} on {device}", err.code)


# ---- the copy loop ---------------------------------------------------------------------

cdef inline int _fail(Failure* err, int kind, int step, Py_ssize_t bad, long long code) noexcept nogil:
    err.kind = kind
    err.step = step
    err.bad = bad
    err.code = code
    return kind


cdef inline CUresult _dev_enter(Dest* d, bint each) noexcept nogil:
    """Make ``d``'s context current where each call pushes its own (several devices); with one
    device the loop pushed it once for the whole load."""
    return ctx_enter(d.ctx) if each else 0


cdef inline void _dev_leave(bint each) noexcept nogil:
    if each:
        ctx_leave()


cdef int _copy_out(Dest* dests, Py_ssize_t ncopy, bint each, Py_ssize_t p, Py_ssize_t q, const char* src,
                   int64_t src_off, Failure* err) noexcept nogil:
    """Pieces ``[p, q)`` from ``src + (file_off - src_off)`` to each of the first ``ncopy``
    destinations: ``memcpy`` to host memory, ``cuMemcpyHtoDAsync`` on a device's stream."""
    cdef Py_ssize_t j
    cdef CUresult rc
    for j in range(ncopy):
        if dests[j].ctx == NULL:
            memcpy_pieces(dests[j].pieces, p, q, src, src_off)
            continue
        rc = _dev_enter(&dests[j], each)
        if rc != 0:
            return _fail(err, E_CUDA, 1, j, rc)
        rc = copy_pieces(dests[j].pieces, p, q, src, src_off, dests[j].stream)
        _dev_leave(each)
        if rc != 0:
            return _fail(err, E_CUDA, 3, j, rc)
    return E_NONE


cdef int _wait_slot(Dest* dests, Py_ssize_t ncopy, bint each, int slot, Failure* err) noexcept nogil:
    """Wait until every device's copies out of staging buffer ``slot`` are done."""
    cdef Py_ssize_t j
    cdef CUresult rc
    for j in range(ncopy):
        rc = _dev_enter(&dests[j], each)
        if rc != 0:
            return _fail(err, E_CUDA, 1, j, rc)
        rc = drv.event_sync(dests[j].ev[slot])
        _dev_leave(each)
        if rc != 0:
            return _fail(err, E_CUDA, 2, j, rc)
    return E_NONE


cdef int _chunk_done(Dest* dests, Py_ssize_t ndest, bint each, bint relay, int slot, Py_ssize_t p0,
                     Py_ssize_t p1, Failure* err) noexcept nogil:
    """After a staged chunk's copies: with ``relay``, copy its pieces ``[p0, p1)`` from the first
    destination to the others (on a device: once the first device's event of the chunk has
    fired, ``cuMemcpyPeerAsync`` on each other device's stream); on devices, record each one's
    event of ``slot`` behind its copies."""
    cdef Py_ssize_t j
    cdef CUresult rc
    if dests[0].ctx == NULL:
        if relay:
            for j in range(1, ndest):
                memcpy_relay(dests[j].pieces, dests[0].pieces, p0, p1)
        return E_NONE
    for j in range(ndest):
        rc = _dev_enter(&dests[j], each)
        if rc != 0:
            return _fail(err, E_CUDA, 1, j, rc)
        if j and relay:
            rc = drv.stream_wait_event(dests[j].stream, dests[0].ev[slot], 0)
            if rc == 0:
                rc = relay_pieces(dests[j].pieces, dests[0].pieces, p0, p1, dests[j].ctx, dests[0].ctx,
                                   dests[j].stream)
            if rc != 0:
                _dev_leave(each)
                return _fail(err, E_CUDA, 6, j, rc)
        rc = drv.event_record(dests[j].ev[slot], dests[j].stream)
        _dev_leave(each)
        if rc != 0:
            return _fail(err, E_CUDA, 4, j, rc)
    return E_NONE


cdef void _sync_all(Dest* dests, Py_ssize_t ndest, bint each, Failure* err) noexcept nogil:
    """Synchronise every device's stream (whatever failed: enqueued copies read the staging
    buffers and write the destinations); the first failure is kept unless one was already."""
    cdef Py_ssize_t j
    cdef CUresult rc
    for j in range(ndest):
        rc = _dev_enter(&dests[j], each)
        if rc == 0:
            rc = drv.stream_sync(dests[j].stream)
            _dev_leave(each)
        if rc != 0 and err.kind == E_NONE:
            _fail(err, E_CUDA, 5, j, rc)


cdef int move_chunks(LoadPlan plan, Dest* dests, Py_ssize_t ndest, bint relay, int fd, const char* image,
                     char** bufs, int depth, bint direct, int worker, int nworkers,
                     Failure* err) noexcept nogil:
    """Move worker ``worker``'s chunks (``worker, worker + nworkers, ...``) of ``plan`` to
    ``dests`` (``dests[j].pieces``: plan ``j``'s pieces, the same layout as ``plan``'s, whose
    ``dst`` says where each goes). Returns the failure kind (``err`` says what failed).

    The bytes come from, in this order of choice:

    * ``image`` (not NULL): a store image in host memory, piece bytes at ``image + file_off``;
      to a device, each chunk's copies are enqueued at once and its pieces hashed from the
      image while they run (no events: one stream synchronise at the end);
    * ``depth`` staging buffers ``bufs``: each chunk is read into the next one (whole over its
      aligned extent with ``direct``, else in runs of at most a block when verifying, each
      hashed right after its read), then copied to every destination; on devices a buffer is
      reused once the event recorded behind its copies has fired (reads run ahead of the
      copies by up to ``depth - 1`` chunks);
    * else the file is read in place into the (one, host) destination, in runs contiguous in
      the file and in memory, each hashed from the destination.

    With ``relay``, only the first destination is copied to from the staging buffer; the others
    copy each chunk from the first's memory (see :func:`_chunk_done`). With one device its
    context is pushed once for the whole loop; with several, each driver call is made inside
    its device's own push/pop. The plan's rate cap paces the chunks, its cancel bit stops the
    loop at the next piece, and a failure cancels it; every device's stream is synchronised
    before this returns, whatever happened.
    """
    cdef Py_ssize_t c, p, q, end, hp, k = 0
    cdef Py_ssize_t ncopy = 1 if relay else ndest      # destinations copied to from the source
    cdef bint on_cuda = dests[0].ctx != NULL
    cdef bint each = ndest > 1
    cdef bint in_place = image == NULL and depth == 0
    cdef int64_t limit = plan.block_bytes if plan.verify else plan.chunk_bytes
    cdef int64_t n, pending, src_off = 0
    cdef int slot = 0, rc = 0
    cdef Chunk* ch
    cdef char* stage = NULL
    cdef const char* hash_src = image if on_cuda else NULL     # unstaged: hash from here
    err.kind = E_NONE
    err.step = 0
    err.bad = -1
    err.code = 0
    err.at = 0
    if not plan._enter():
        return E_NONE
    if on_cuda and not each:
        rc = ctx_enter(dests[0].ctx)
        if rc != 0:
            _fail(err, E_CUDA, 1, 0, rc)
            plan._cancel()
            plan._exit()
            return err.kind
    c = worker
    while c < plan.num_chunks and not plan._cancelled():
        ch = &plan.chunks[c]
        if depth:
            slot = k % depth
            stage = bufs[slot]
            if on_cuda and k >= depth and _wait_slot(dests, ncopy, each, slot, err) != E_NONE:
                break
        plan._throttle(ch.nbytes)
        p = ch.first
        end = ch.first + ch.count
        if depth:
            err.kind = plan._stage_chunk(fd, ch, stage, direct, &src_off, &rc, &err.at)
            if err.kind != E_NONE:
                err.code = rc
                break
        elif image != NULL and on_cuda and _copy_out(dests, ncopy, each, p, end, image, 0, err) != E_NONE:
            break
        hp = p
        pending = 0
        while p < end:
            q = plan._subrange(p, end, limit, in_place)
            n = plan.pieces[q - 1].file_off + plan.pieces[q - 1].nbytes - plan.pieces[p].file_off
            if depth:
                err.kind = plan._stage_pieces(fd, p, q, stage, src_off, direct, &rc, &err.at)
                if err.kind != E_NONE:
                    err.code = rc
                    break
                if _copy_out(dests, ncopy, each, p, q, stage, src_off, err) != E_NONE:
                    break
            else:
                if in_place:
                    rc = read_full(fd, <char*>plan.pieces[p].dst, n, plan.pieces[p].file_off)
                    if rc != 0:
                        err.kind = E_EOF if rc == READ_EOF else E_READ
                        err.code = rc
                        err.at = plan.pieces[p].file_off
                        break
                elif not on_cuda:
                    _copy_out(dests, ncopy, each, p, q, image, 0, err)
                if plan.verify:
                    pending += n
                    if pending >= plan.block_bytes or q == end:
                        if plan._hash(hp, q, hash_src, 0) != 0:
                            err.kind = E_HASH
                            break
                        hp = q
                        pending = 0
            aoti_rt_atomic_add(&plan.done, n)
            p = q
            if p < end and plan._cancelled():
                break
        if err.kind != E_NONE:
            break
        if depth and _chunk_done(dests, ndest, each, relay, slot, ch.first, end, err) != E_NONE:
            break
        k += 1
        c += nworkers
    if on_cuda:
        _sync_all(dests, ndest, each, err)
        if not each:
            ctx_leave()
    if err.kind != E_NONE:
        plan._cancel()
    plan._exit()
    return err.kind
