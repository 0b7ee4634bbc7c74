# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The load pipeline: store file -> weight buffers, without the GIL.

Ownership, in one line each:

* a :class:`~aoti_rt._plan.LoadPlan` lists where each requested weight's bytes are in the
  store and which :class:`~aoti_rt._memory.Buffer` they go to, and holds those Buffers while
  it lives, so no destination can be freed while a worker writes it;
* a :class:`Stager` is one worker's CUDA copy engine (pinned staging Buffers it owns, a
  stream, an event per buffer), reused across loads by the device runtime;
* :func:`run_workers` starts the worker threads and is the only place that waits for them.

Worker threads run a plan without the GIL (:meth:`LoadPlan.run_host` on the CPU,
:meth:`Stager.run` on CUDA, :func:`copy_from_host` from a pinned image, :func:`run_replicated`
to several devices), each a thin front of the one copy loop,
:func:`aoti_rt._plan.move_chunks`, optionally hashing every piece right after its bytes land
in host memory (:mod:`aoti_rt.digest`: one piece = one hash block). Whatever exception
reaches the waiting thread, it cancels the plan and waits until no worker is inside its loop
before it re-raises, so the caller may then close the file and free the buffers and stagers.
Failures are raised where they are found: :class:`~aoti_rt.errors.BundleError` for the
store, :class:`~aoti_rt.errors.CudaError` for a driver call.
"""

import threading
import time

from libc.stdint cimport uintptr_t

from aoti_rt._memory cimport Buffer, CUcontext, CUresult, PinnedAllocator, check, ctx_enter, ctx_leave, drv, drv_ready
from aoti_rt._plan cimport E_CUDA, E_NONE, Dest, Failure, LoadPlan, load_error, move_chunks

from aoti_rt import _plan
from aoti_rt._pieces import DIRECT_ALIGN, b3_combine, b3_hash
from aoti_rt._plan import C_HASH_MAX
from aoti_rt.errors import BundleError, CudaError

# the plan is made through this module (_load.LoadPlan); a cimported type is not a module
# attribute by itself
globals()["LoadPlan"] = _plan.LoadPlan

cdef enum:
    _DIRECT_ALIGN = 4096    # aoti_rt._plan.DIRECT_ALIGN


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
            rc = ctx_enter(self.ctx)
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
                ctx_leave()
        if rc != 0:
            check(rc, ("cuCtxPushCurrent", "cuStreamCreate", "cuEventCreate")[step - 1])

    def __dealloc__(self):
        cdef int i
        if drv_ready and (self.stream != NULL or self.depth):
            with nogil:
                if ctx_enter(self.ctx) == 0:
                    if self.stream != NULL:
                        drv.stream_sync(self.stream)
                        drv.stream_destroy(self.stream)
                    for i in range(self.depth):
                        drv.event_destroy(self.ev[i])
                    ctx_leave()

    def run(self, LoadPlan plan, int fd, int worker=0, int nworkers=1, bint direct=False) -> None:
        """Move worker ``worker``'s chunks to the device.

        With ``plan.verify`` a chunk is read in runs of at most one block, and each run is
        hashed from the staging buffer right after its read, then its copies are enqueued.
        With ``direct``, ``fd`` was opened with ``O_DIRECT`` (a cold page cache): each chunk
        is read whole over its :data:`DIRECT_ALIGN`-aligned extent, then hashed and copied.
        Raises :class:`BundleError` (the store) or :class:`CudaError` (a driver call).
        """
        cdef Dest d
        cdef Failure err
        if plan.chunk_bytes > self.chunk_bytes:
            raise ValueError("plan chunks exceed the staging buffers")
        if not plan.on_cuda and plan.num_pieces:
            raise ValueError("Stager.run needs CUDA buffers; use LoadPlan.run_host for host buffers")
        if nworkers < 1 or worker < 0:
            raise ValueError("bad worker index")
        self._dest(&d, plan)
        with nogil:
            move_chunks(plan, &d, 1, False, fd, NULL, self.bufs, self.depth, direct, worker, nworkers, &err)
        if err.kind != E_NONE:
            raise load_error(plan, &err, None)

    cdef void _dest(self, Dest* d, LoadPlan plan) noexcept:
        """``d``: ``plan``'s destinations on this engine's device, stream and events."""
        d.pieces = plan.pieces
        d.ctx = self.ctx
        d.stream = self.stream
        d.ev = self.ev


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
    cdef Dest d
    cdef Failure err
    cdef const char* base
    if image.ptr == 0 or plan.max_end > <long long>image.nbytes:
        raise BundleError(f"{plan.source}: a weight reaches byte {plan.max_end}, past the end of the "
                          f"{image.nbytes}-byte pinned image; the manifest contradicts the store")
    if stager is None and plan.on_cuda:
        raise ValueError("copying to CUDA buffers needs a Stager")
    if stager is not None and not plan.on_cuda and plan.num_pieces:
        raise ValueError("a Stager copies to CUDA buffers only")
    if nworkers < 1 or worker < 0:
        raise ValueError("bad worker index")
    if stager is not None:
        stager._dest(&d, plan)
    else:
        d.pieces = plan.pieces
        d.ctx = NULL
        d.stream = NULL
        d.ev = NULL
    base = <const char*>image.ptr
    with nogil:
        move_chunks(plan, &d, 1, False, -1, base, NULL, 0, False, worker, nworkers, &err)
    if err.kind != E_NONE:
        raise load_error(plan, &err, None)


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
    cdef Py_ssize_t nrep = len(plans), j, q
    cdef LoadPlan primary, rp
    cdef Stager st
    cdef Buffer b
    cdef Dest dests[MAX_REPLICAS]
    cdef char* bufs[MAX_STAGING_DEPTH]
    cdef int depth = MAX_STAGING_DEPTH
    cdef Failure err
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
        dests[j].pieces = rp.pieces
        dests[j].ctx = NULL
        dests[j].stream = NULL
        dests[j].ev = NULL
    if primary.num_chunks == 0:
        return
    if on_cuda:
        if stagers is None or len(stagers) != nrep:
            raise ValueError("a replicated load to CUDA devices needs one Stager per plan")
        for j in range(nrep):
            st = <Stager?>stagers[j]
            if st.depth < depth:
                depth = st.depth
            st._dest(&dests[j], <LoadPlan>plans[j])
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
            if b.allocator.is_cuda or <long long>b.nbytes < primary.chunk_bytes + 2 * _DIRECT_ALIGN:
                raise ValueError(f"host staging buffers must hold chunk_bytes + {2 * _DIRECT_ALIGN} bytes")
            bufs[q] = <char*>b.ptr
    with nogil:
        move_chunks(primary, dests, nrep, relay, fd, NULL, bufs, depth, direct, worker, nworkers, &err)
    if err.kind == E_NONE:
        return
    if err.kind == E_CUDA and err.bad >= 0:
        st = <Stager>stagers[err.bad]
        raise load_error(primary, &err, st.device or f"replica {err.bad}")
    raise load_error(primary, &err, None)
