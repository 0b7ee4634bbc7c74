# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The AOTInductor C ABI: one .so's entry points, bound once, and the per-constant C loops.

Ownership, in one line each:

* a :class:`ModelABI` is one opened .so's entry points as a typed struct of C function
  pointers, resolved once (by :class:`aoti_rt.abi.SharedObject`, which owns the library and
  keeps it loaded while the ModelABI is used); every call into the .so goes through it and
  raises :class:`~aoti_rt.errors.AOTIError` with AOTI's own message where one fails;
* a :class:`BindPlan` holds one method's constants as C arrays (built once from the
  manifest), checks them against the container's constant table and binds buffers to them
  in one ``UpdateUserManagedConstantBufferPairs`` call from a ``nogil`` loop. It borrows the
  buffers for that call only: the container keeps pointing at them, so the caller (the
  method's cache acquisition) keeps them alive until the container is deleted.
"""

from cpython.pycapsule cimport PyCapsule_New, PyCapsule_GetPointer
from cpython.pythread cimport (PyThread_acquire_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_release_lock, WAIT_LOCK)
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset, strcmp

from aoti_rt._memory cimport (Buffer, CUcontext, CUresult, aoti_rt_atomic_add_acqrel,
                              aoti_rt_atomic_load_acq, aoti_rt_atomic_or, drv)
from aoti_rt.errors import AOTIError, BundleError, ClosedError, CudaError

cdef extern from "unistd.h" nogil:
    int usleep(unsigned int usec)

_P = "AOTInductorModelContainer"

#: entry point -> required. A .so without a required one is not an AOTI model aoti_rt runs;
#: the optional ones appeared in later torch releases (see the README's ABI table).
ENTRY_POINTS = {
    _P + "CreateWithDevice": True, _P + "Delete": True, _P + "Run": True,
    _P + "GetNumInputs": True, _P + "GetNumOutputs": True, _P + "GetNumConstants": True,
    _P + "GetConstantName": True, _P + "GetConstantOriginalFQN": True,
    _P + "GetConstantDtype": True, _P + "GetConstantType": False,
    _P + "GetConstantDataSize": False, _P + "GetConstantFromFolded": False,
    _P + "GetCallSpec": False, _P + "UpdateUserManagedConstantBufferPairs": False,
    _P + "SwapConstantBuffer": False, _P + "FreeInactiveConstantBuffer": False,
    "AOTInductorModelUpdateConstantsFromBlob": False, "AOTInductorGetLastError": False,
    _P + "RunSingleThreaded": False,
}

#: AOTI constant type codes (model_base.h ConstantType)
CONSTANT_KINDS = {0: "unknown", 1: "parameter", 2: "buffer", 3: "tensor_constant", 4: "folded"}

#: a constant's view must start at a multiple of this many bytes of its buffer
VIEW_ALIGN = 16


# ----------------------------------------------------------------------------------------
# libtorch's shim functions, resolved once per process (aoti_rt.abi.torch_shim)

cdef f_create_from_blob_v2 _create_tensor = NULL
cdef f_delete_tensor _delete_tensor = NULL


def install_torch_shim(uintptr_t create_tensor_from_blob_v2, uintptr_t delete_tensor_object):
    """Install the addresses of libtorch's ``aoti_torch_create_tensor_from_blob_v2`` and
    ``aoti_torch_delete_tensor_object``, which :meth:`BindPlan.bind` wraps buffers with."""
    global _create_tensor, _delete_tensor
    if not create_tensor_from_blob_v2 or not delete_tensor_object:
        raise AOTIError("libtorch's aoti_torch_* shim functions were not found; "
                        "reinstall torch (>= 2.10)")
    _create_tensor = <f_create_from_blob_v2>create_tensor_from_blob_v2
    _delete_tensor = <f_delete_tensor>delete_tensor_object


# ----------------------------------------------------------------------------------------
# One .so's entry points

cdef inline uintptr_t _address(dict addresses, str name) except? 0:
    return addresses.get(name) or 0


cdef class ModelABI:
    """The entry points of one AOTI model .so, bound once into a struct of C function pointers.

    Built from ``{symbol: address}`` for the symbols of :data:`ENTRY_POINTS` the library
    exports (a missing required one is an :class:`AOTIError` naming it). Every method calls
    the .so without Python in between and raises :class:`AOTIError` with AOTI's own message
    (``AOTInductorGetLastError``, torch >= 2.13) when the call fails. The library must stay
    loaded while this object is used: :class:`aoti_rt.abi.SharedObject` owns both.
    """

    def __init__(self, dict addresses, str so_name="the .so"):
        self.so_name = so_name
        missing = [n for n, required in ENTRY_POINTS.items() if required and not addresses.get(n)]
        if missing:
            raise AOTIError(f"{so_name} is not a usable AOTInductor model: it lacks {', '.join(missing)}. "
                            "Compile it with torch._inductor.aot_compile / aoti_rt.compile.")
        self.available = frozenset(n for n in ENTRY_POINTS if addresses.get(n))
        self.fns.create_with_device = <f_create_with_device><uintptr_t>_address(addresses, _P + "CreateWithDevice")
        self.fns.delete = <f_container_op><uintptr_t>_address(addresses, _P + "Delete")
        self.fns.run = <f_run><uintptr_t>_address(addresses, _P + "Run")
        self.fns.get_num_inputs = <f_get_count><uintptr_t>_address(addresses, _P + "GetNumInputs")
        self.fns.get_num_outputs = <f_get_count><uintptr_t>_address(addresses, _P + "GetNumOutputs")
        self.fns.get_num_constants = <f_get_count><uintptr_t>_address(addresses, _P + "GetNumConstants")
        self.fns.get_constant_name = <f_get_str_at><uintptr_t>_address(addresses, _P + "GetConstantName")
        self.fns.get_constant_fqn = <f_get_str_at><uintptr_t>_address(addresses, _P + "GetConstantOriginalFQN")
        self.fns.get_constant_dtype = <f_get_i32_at><uintptr_t>_address(addresses, _P + "GetConstantDtype")
        self.fns.get_constant_type = <f_get_i32_at><uintptr_t>_address(addresses, _P + "GetConstantType")
        self.fns.get_constant_data_size = <f_get_size_at><uintptr_t>_address(addresses, _P + "GetConstantDataSize")
        self.fns.get_constant_from_folded = <f_get_bool_at><uintptr_t>_address(addresses, _P + "GetConstantFromFolded")
        self.fns.get_call_spec = <f_get_call_spec><uintptr_t>_address(addresses, _P + "GetCallSpec")
        self.fns.update_pairs = <f_update_pairs><uintptr_t>_address(addresses, _P + "UpdateUserManagedConstantBufferPairs")
        self.fns.update_from_blob = <f_update_from_blob><uintptr_t>_address(addresses, "AOTInductorModelUpdateConstantsFromBlob")
        self.fns.swap_constant_buffer = <f_container_op><uintptr_t>_address(addresses, _P + "SwapConstantBuffer")
        self.fns.free_inactive_constant_buffer = <f_container_op><uintptr_t>_address(
            addresses, _P + "FreeInactiveConstantBuffer")
        self.fns.last_error = <f_last_error><uintptr_t>_address(addresses, "AOTInductorGetLastError")
        self.fns.run_single_threaded = <f_run><uintptr_t>_address(addresses, _P + "RunSingleThreaded")

    def has(self, str name) -> bool:
        """Whether the .so exports entry point ``name`` (with or without the container prefix)."""
        return name in self.available or (_P + name) in self.available

    def last_error(self) -> str:
        """AOTI's message for the last failed call on this thread ("" if none or unknown)."""
        cdef const char* msg = NULL
        if self.fns.last_error == NULL or self.fns.last_error(&msg) != 0 or msg == NULL:
            return ""
        return (<bytes>msg).decode(errors="replace")

    def invalidate(self) -> None:
        """Forget every entry point (the library is being unloaded): later calls raise."""
        memset(&self.fns, 0, sizeof(ModelFns))

    cdef int _has(self, const void* fn, str name) except -1:
        if fn == NULL:
            raise AOTIError(f"{self.so_name} has no entry point {name} (it was unloaded, or the torch "
                            f"that compiled it predates it)")
        return 0

    cdef str _why(self):
        return self.last_error() or "see stderr"

    cdef int _ok(self, int32_t rc, str what) except -1:
        if rc != 0:
            raise AOTIError(f"{what} failed in {self.so_name}: {self._why()}")
        return 0

    # -- container lifecycle --------------------------------------------------------------

    def create(self, str device, cubin_dir=None) -> int:
        """Create a container for ``device`` ("cpu", "cuda:N"); returns its handle.
        ``cubin_dir``: where a CUDA .so finds its kernel binaries (default: beside it)."""
        cdef ContainerHandle h = NULL
        cdef bytes dev = device.encode()
        cdef bytes kernels = None if cubin_dir is None else str(cubin_dir).encode()
        cdef const char* d = dev
        cdef const char* k = NULL if kernels is None else <const char*>kernels
        cdef int32_t rc
        self._has(<void*>self.fns.create_with_device, "CreateWithDevice")
        with nogil:
            rc = self.fns.create_with_device(&h, 1, d, k)
        self._ok(rc, "CreateWithDevice")
        if h == NULL:
            raise AOTIError(f"CreateWithDevice returned no container for {self.so_name}")
        return <uintptr_t>h

    def swap_constant_buffer(self, uintptr_t container) -> None:
        """Make the container's inactive constant buffer the active one (``SwapConstantBuffer``)."""
        self._container_op(self.fns.swap_constant_buffer, "SwapConstantBuffer", container)

    def free_inactive_constant_buffer(self, uintptr_t container) -> None:
        """Free the container's inactive constant buffer (``FreeInactiveConstantBuffer``)."""
        self._container_op(self.fns.free_inactive_constant_buffer, "FreeInactiveConstantBuffer", container)

    cdef int _container_op(self, f_container_op fn, str name, uintptr_t container) except -1:
        """Call an entry point that takes only the container, without the GIL."""
        cdef int32_t rc
        self._has(<void*>fn, name)
        with nogil:
            rc = fn(<ContainerHandle>container)
        return self._ok(rc, name)

    def delete(self, uintptr_t container) -> None:
        """Delete a container (it stops pointing at any bound memory)."""
        self._container_op(self.fns.delete, "Delete", container)

    # -- metadata -------------------------------------------------------------------------

    def num_inputs(self, uintptr_t container) -> int:
        cdef size_t n = 0
        self._has(<void*>self.fns.get_num_inputs, "GetNumInputs")
        self._ok(self.fns.get_num_inputs(<ContainerHandle>container, &n), "GetNumInputs")
        return n

    def num_outputs(self, uintptr_t container) -> int:
        cdef size_t n = 0
        self._has(<void*>self.fns.get_num_outputs, "GetNumOutputs")
        self._ok(self.fns.get_num_outputs(<ContainerHandle>container, &n), "GetNumOutputs")
        return n

    def num_constants(self, uintptr_t container) -> int:
        cdef size_t n = 0
        self._has(<void*>self.fns.get_num_constants, "GetNumConstants")
        self._ok(self.fns.get_num_constants(<ContainerHandle>container, &n), "GetNumConstants")
        return n

    def call_spec(self, uintptr_t container):
        """``(in_spec, out_spec)`` as serialised pytree specs, or None if the .so has none."""
        cdef const char* a = NULL
        cdef const char* b = NULL
        if self.fns.get_call_spec == NULL:
            return None
        self._ok(self.fns.get_call_spec(<ContainerHandle>container, &a, &b), "GetCallSpec")
        return ((<bytes>a).decode() if a != NULL else "", (<bytes>b).decode() if b != NULL else "")

    def constants(self, uintptr_t container) -> list:
        """The constant table in index order: ``(index, name, fqn, dtype code, kind, data
        size, from folded)`` per constant (0 / "unknown" / False where the .so cannot say)."""
        cdef ContainerHandle h = <ContainerHandle>container
        cdef size_t i, n = 0, size
        cdef const char* name = NULL
        cdef const char* fqn = NULL
        cdef int32_t dtype, kind
        cdef c_bool folded
        self._has(<void*>self.fns.get_num_constants, "GetNumConstants")
        self._ok(self.fns.get_num_constants(h, &n), "GetNumConstants")
        out = []
        for i in range(n):
            size, kind, folded = 0, 0, 0
            self._ok(self.fns.get_constant_name(h, i, &name), "GetConstantName")
            self._ok(self.fns.get_constant_fqn(h, i, &fqn), "GetConstantOriginalFQN")
            self._ok(self.fns.get_constant_dtype(h, i, &dtype), "GetConstantDtype")
            if self.fns.get_constant_type != NULL:
                self._ok(self.fns.get_constant_type(h, i, &kind), "GetConstantType")
            if self.fns.get_constant_data_size != NULL:
                self._ok(self.fns.get_constant_data_size(h, i, &size), "GetConstantDataSize")
            if self.fns.get_constant_from_folded != NULL:
                self._ok(self.fns.get_constant_from_folded(h, i, &folded), "GetConstantFromFolded")
            if name == NULL or fqn == NULL:
                raise AOTIError(f"{self.so_name} gives constant {i} no name")
            out.append((i, (<bytes>name).decode(errors="replace"), (<bytes>fqn).decode(errors="replace"),
                        dtype, CONSTANT_KINDS.get(kind, "unknown"), size, bool(folded)))
        return out

    # -- weights and calls ----------------------------------------------------------------

    def update_constants_from_blob(self, uintptr_t container, const uint8_t[::1] blob) -> None:
        """The stock (unshared) way: AOTI copies a whole ``binary_blob`` into its own memory."""
        cdef int32_t rc
        cdef const uint8_t* p = &blob[0] if blob.shape[0] else <const uint8_t*>b""
        self._has(<void*>self.fns.update_from_blob, "AOTInductorModelUpdateConstantsFromBlob")
        with nogil:
            rc = self.fns.update_from_blob(<ContainerHandle>container, p)
        self._ok(rc, "AOTInductorModelUpdateConstantsFromBlob")

    def run(self, uintptr_t container, list input_handles, Py_ssize_t num_outputs,
            uintptr_t stream, where="the method", CallGate gate=None, uintptr_t context=0):
        """Run the container on ``stream`` without the GIL; returns the output handles as
        PyCapsules.

        With a ``gate`` (the method's :class:`CallGate`) and a .so that has it, this calls
        ``RunSingleThreaded`` under the gate's launch lock: it only launches the kernels on
        ``stream``. ``Run`` instead hands out the container's one model instance through a
        queue that waits for the previous call's kernels to finish (``cudaEventSynchronize``:
        the CPU never runs ahead of the GPU by more than one call) and queries that event
        (``cudaEventQuery``), which a stream being captured into a CUDA graph forbids.
        Calls still launch one at a time, so the instance's state is never shared by two.

        ``input_handles`` are PyCapsules from ``unsafe_alloc_void_ptrs_from_tensors``, which
        AOTI steals; the outputs go to ``alloc_tensors_by_stealing_from_void_ptrs``. Raises
        :class:`AOTIError` naming ``where`` if AOTI reports a failure.

        ``context`` (a CUDA container): the primary context of the container's device, made
        current around the call (``cuCtxPushCurrent``/``cuCtxPopCurrent``, a few tens of ns):
        AOTI loads its kernels, and ``Run`` creates the event it records, on the *current*
        device at the first call, and a container of cuda:1 called while cuda:0 is current
        would launch or record on a stream of another device (an error). The caller's current
        device is the same afterwards.
        """
        cdef Py_ssize_t i, n_in = len(input_handles)
        cdef CUcontext ctx = <CUcontext>context
        cdef CUcontext prev
        cdef CUresult pushed = 1
        cdef AtenTensorHandle* ins = <AtenTensorHandle*>malloc(max(n_in, 1) * sizeof(AtenTensorHandle))
        cdef AtenTensorHandle* outs = <AtenTensorHandle*>malloc(max(num_outputs, 1) * sizeof(AtenTensorHandle))
        cdef int32_t rc = 0
        cdef f_run fn = self.fns.run
        cdef PyThread_type_lock lock = NULL
        if gate is not None and self.fns.run_single_threaded != NULL:
            fn = self.fns.run_single_threaded
            lock = gate.launch
        if fn == NULL:
            free(ins); free(outs)
            self._has(NULL, "Run")
        if ins == NULL or outs == NULL:
            free(ins); free(outs)
            raise MemoryError("ModelABI.run")
        try:
            for i in range(n_in):
                ins[i] = PyCapsule_GetPointer(input_handles[i], NULL)
            memset(outs, 0, max(num_outputs, 1) * sizeof(AtenTensorHandle))
            with nogil:
                if ctx != NULL:
                    pushed = drv.ctx_push(ctx)
                if ctx == NULL or pushed == 0:
                    if lock != NULL:
                        PyThread_acquire_lock(lock, WAIT_LOCK)
                    rc = fn(<ContainerHandle>container, ins, n_in, outs, num_outputs, <void*>stream, NULL)
                    if lock != NULL:
                        PyThread_release_lock(lock)
                if pushed == 0:
                    drv.ctx_pop(&prev)
            if ctx != NULL and pushed != 0:
                if _delete_tensor != NULL:      # Run did not take the inputs: free them here
                    for i in range(n_in):
                        _delete_tensor(ins[i])
                raise CudaError("making the model's device current for its call (cuCtxPushCurrent)", pushed)
            if rc != 0:
                raise AOTIError(f"{where} failed in AOTI Run: {self._why()}")
            return [PyCapsule_New(outs[i], NULL, NULL) for i in range(num_outputs)]
        finally:
            free(ins)
            free(outs)


# ----------------------------------------------------------------------------------------
# Calls in flight

cdef class CallGate:
    """Counts a method's calls in flight so that closing it waits for them, at two atomic
    operations a call (a Condition cost ~0.4 us a call). :meth:`enter` counts a call in, or
    raises :class:`ClosedError` once :meth:`close` began; :meth:`close` then waits, without the
    GIL, until every call that got in has left, so the container can be deleted. Its launch
    lock lets one call at a time launch on the container (:meth:`ModelABI.run`)."""

    def __cinit__(self):
        self.launch = PyThread_allocate_lock()
        if self.launch == NULL:
            raise MemoryError("CallGate")

    def __dealloc__(self):
        if self.launch != NULL:
            PyThread_free_lock(self.launch)

    def lock_launch(self) -> None:
        """Wait until no call is launching, and keep others from launching until
        :meth:`unlock_launch` (rebinding a container's constants needs that)."""
        with nogil:
            PyThread_acquire_lock(self.launch, WAIT_LOCK)

    def unlock_launch(self) -> None:
        PyThread_release_lock(self.launch)

    def enter(self, where="the method") -> None:
        aoti_rt_atomic_add_acqrel(&self.inflight, 1)
        if aoti_rt_atomic_load_acq(&self.closed):
            aoti_rt_atomic_add_acqrel(&self.inflight, -1)
            raise ClosedError(f"{where} is closed")

    def exit(self) -> None:
        aoti_rt_atomic_add_acqrel(&self.inflight, -1)

    def close(self) -> None:
        """Refuse new calls and wait until the running ones have left (idempotent)."""
        aoti_rt_atomic_or(&self.closed, 1)
        with nogil:
            while aoti_rt_atomic_load_acq(&self.inflight) > 0:
                usleep(200)

    @property
    def is_closed(self) -> bool:
        return aoti_rt_atomic_load_acq(&self.closed) != 0


# ----------------------------------------------------------------------------------------
# Binding a method's constants: one Pairs call, fed from a nogil loop over C arrays

cdef class BindPlan:
    """One method's constants as C arrays, bound in one Pairs call by :meth:`bind`.

    Built once per method from the manifest. :meth:`check` compares it with the container's
    own constant table (names, dtypes; constants the .so keeps as its own are skipped: those
    it folds at run time, and those named in ``keep``) and reads what the .so assumes of each constant's
    memory (``GetConstantDataSize``, ``GetConstantType``); :meth:`need` then says how many
    bytes a buffer bound as constant ``i`` must have so that no kernel can reach past it,
    whatever the manifest claims. ``bind`` refuses a buffer smaller than that, wraps each
    buffer in a non-owning tensor handle (``aoti_torch_create_tensor_from_blob_v2``), hands
    all of them to the container in a single ``UpdateUserManagedConstantBufferPairs`` call
    and deletes its own handles (the container keeps shallow copies that point at our memory).

    ``compiled_offsets``: the storage offsets are the ones the .so was compiled with (read
    from torch's own runner, as a ``.pt2`` package's are), not a manifest's claim; a view
    starting off the 16-byte boundary is then bound as AOTI itself binds it (``t[0][5:]`` of
    a float tensor), where a manifest's is refused.
    """

    def __cinit__(self):
        self.n = 0

    def __init__(self, list names, list dtypes, list itemsizes, list shapes, list strides,
                 list offsets, list fqns=None, str where="method", bint compiled_offsets=False, keep=()):
        cdef Py_ssize_t i, j, total = 0, n = len(names)
        self.keep = frozenset(k if isinstance(k, bytes) else k.encode() for k in keep)
        self.so_owned = self.so_owned_bytes = self.folded = self.folded_bytes = 0
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
            if (offsets[i] * itemsizes[i]) % VIEW_ALIGN and not compiled_offsets:
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

    def check(self, ModelABI abi, uintptr_t container):
        """Compare the container's constant table with this plan in one nogil loop.

        Reads ``GetNumConstants``, ``GetConstantName``, ``GetConstantDtype`` and, where the
        .so has them, ``GetConstantDataSize``, ``GetConstantType`` and ``GetConstantFromFolded``
        (without the data size, :meth:`need` stays unknown and :meth:`bind` refuses). The .so's
        constants it folds at run time, and those named in ``keep``, are its own: skipped, and
        counted in :attr:`so_owned` / :attr:`so_owned_bytes`. Raises :class:`BundleError` for
        the first difference in count, names (in index order), dtype codes, or a constant the
        .so gives storage that the manifest views as empty; :class:`AOTIError` (with AOTI's
        message) if a table call fails.
        """
        cdef f_get_count num = abi.fns.get_num_constants
        cdef f_get_str_at name_of = abi.fns.get_constant_name
        cdef f_get_i32_at dtype_of = abi.fns.get_constant_dtype
        cdef f_get_size_at size_of = abi.fns.get_constant_data_size
        cdef f_get_i32_at type_of = abi.fns.get_constant_type
        cdef f_get_bool_at folded_of = abi.fns.get_constant_from_folded
        cdef ContainerHandle container_h = <ContainerHandle>container
        cdef size_t count = 0, nbytes = 0, own_bytes = 0, fold_bytes = 0
        cdef Py_ssize_t i = 0, j, bad = -1, own = 0, n_folded = 0
        cdef const char* nm = NULL
        cdef int32_t code = 0, rc = 0, kind = 0
        cdef c_bool is_folded = 0
        cdef bint kept, any_keep = len(self.keep) > 0
        cdef int what = 0      # 1 name, 2 dtype, 3 a call failed, 4 empty view of real storage
        self.checked = False
        self.so_owned = self.so_owned_bytes = self.folded = self.folded_bytes = 0
        abi._has(<void*>num, "GetNumConstants")
        with nogil:
            rc = num(container_h, &count)
            if rc == 0:
                for j in range(<Py_ssize_t>count):
                    rc = name_of(container_h, j, &nm)
                    if rc != 0 or nm == NULL:
                        what = 3
                        bad = j
                        break
                    # the .so's own constants: folded at run time by it, or kept by name
                    is_folded = 0
                    if folded_of != NULL:
                        rc = folded_of(container_h, j, &is_folded)
                    elif type_of != NULL:
                        rc = type_of(container_h, j, &kind)
                        is_folded = kind == 4
                    if rc != 0:
                        what = 3
                        bad = j
                        break
                    kept = is_folded
                    if not kept and any_keep and (i >= self.n or strcmp(nm, self.entries[i].name) != 0):
                        with gil:
                            kept = (<bytes>nm) in self.keep
                    if kept:
                        if size_of != NULL:
                            rc = size_of(container_h, j, &nbytes)
                            if rc != 0:
                                what = 3
                                bad = j
                                break
                            own_bytes += nbytes
                            if is_folded:
                                fold_bytes += nbytes
                        own += 1
                        n_folded += is_folded
                        continue
                    if i >= self.n:
                        break          # more constants than the plan: the count differs
                    if strcmp(nm, self.entries[i].name) != 0:
                        what = 1
                        bad = i
                        break
                    rc = dtype_of(container_h, j, &code)
                    if rc != 0:
                        what = 3
                        bad = i
                        break
                    if code != self.dtypes[i]:
                        what = 2
                        bad = i
                        break
                    if size_of != NULL:
                        rc = size_of(container_h, j, &nbytes)
                        if rc != 0 or nbytes > (<size_t>1 << 62):
                            what = 3
                            bad = j
                            break
                        self.so_sizes[i] = <int64_t>nbytes
                        # AOTI hands kernels data_ptr(), which an empty tensor reports as NULL
                        if nbytes > 0 and self.empty[i]:
                            what = 4
                            bad = i
                            break
                    if type_of != NULL:
                        rc = type_of(container_h, j, &kind)
                        if rc != 0:
                            what = 3
                            bad = j
                            break
                        self.so_kinds[i] = kind
                    i += 1
        if (rc != 0 and bad < 0) or what == 3:
            raise AOTIError(f"{self.where}: reading the constant table of {abi.so_name} failed at index "
                            f"{bad} (code {rc}): {abi._why()}")
        if what == 0 and <Py_ssize_t>count - own != self.n:
            kept_note = f" ({own} of them its own: folded or kept)" if own else ""
            detail = f"has {count} constants{kept_note} but the manifest lists {self.n}"
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
            self.so_owned, self.so_owned_bytes, self.folded = own, <int64_t>own_bytes, n_folded
            self.folded_bytes = <int64_t>fold_bytes
            return
        raise BundleError(f"{self.where}: {abi.so_name} {detail}; the bundle is inconsistent, recompile it")

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

    cdef int64_t _need(self, Py_ssize_t i) noexcept nogil:
        return self.offsets[i] * self.itemsizes[i] + self.so_sizes[i]

    def so_kind(self, Py_ssize_t i) -> int:
        """The .so's type code of constant ``i`` (1 parameter, 2 buffer, 3 tensor constant;
        0 unknown or not reported)."""
        if i < 0 or i >= self.n:
            raise IndexError(i)
        return self.so_kinds[i]

    def bind(self, ModelABI abi, uintptr_t container, list buffers, int device_type, int device_index):
        """Bind ``buffers[i]`` as constant ``i`` of ``container`` in one Pairs call.

        ``device_type`` and ``device_index`` say where the buffers are (cpu 0, cuda 1).
        Raises :class:`AOTIError` if a buffer is smaller than :meth:`need`, if wrapping a
        buffer as a tensor fails, or if the Pairs call fails (with AOTI's message); the
        container is then left as it was or fully updated, never half.
        """
        cdef Py_ssize_t i, n = self.n
        cdef f_create_from_blob_v2 create = _create_tensor
        cdef f_delete_tensor delete = _delete_tensor
        cdef f_update_pairs pairs = abi.fns.update_pairs
        cdef int32_t rc = 0
        cdef Py_ssize_t failed_at = -1
        cdef bint any_keep = self.so_owned > self.folded
        cdef Buffer buf
        if len(buffers) != n:
            raise ValueError(f"{len(buffers)} buffers for {n} constants")
        if not self.checked:
            raise ValueError("BindPlan.bind before a successful check: the sizes the .so "
                             "assumes are unknown")
        abi._has(<void*>pairs, "UpdateUserManagedConstantBufferPairs")
        if create == NULL:
            raise AOTIError("libtorch's tensor shim is not installed (aoti_rt.abi.torch_shim)")
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
                # a full update is checked unless the .so keeps constants of its own by name
                # (AOTI's check would ask for them); the ones it folds it never asks for
                rc = pairs(<ContainerHandle>container, self.entries, n, 0, not any_keep)
            for i in range(n):
                if self.entries[i].handle != NULL:
                    delete(self.entries[i].handle)
                    self.entries[i].handle = NULL
        if failed_at >= 0 or rc != 0:
            what = (f"wrapping constant {self._fqns[failed_at]} as a tensor" if failed_at >= 0
                    else f"UpdateUserManagedConstantBufferPairs (code {rc})")
            raise AOTIError(f"{self.where}: binding failed while {what}: {abi._why()}")
