# cython: language_level=3
"""The AOTInductor C ABI, declared once: one .so's entry points as a typed struct of function
pointers (:class:`ModelABI`), and one method's constants as C arrays (:class:`BindPlan`).
See ``_bind.pyx``."""

from cpython.pythread cimport PyThread_type_lock
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t, uintptr_t

# ---- torch/csrc/inductor/aoti_runtime/interface.h (every call returns 0 on success) -----

ctypedef void* AtenTensorHandle
ctypedef unsigned char c_bool           # C's bool: one byte
ctypedef void* ContainerHandle          # AOTInductorModelContainerHandle

cdef struct ConstantMapEntry:           # AOTInductorConstantMapEntry (torch >= 2.10)
    const char* name
    AtenTensorHandle handle

ctypedef int32_t (*f_create_with_device)(ContainerHandle* out, size_t num_models,
                                         const char* device, const char* cubin_dir) noexcept nogil
ctypedef int32_t (*f_container_op)(ContainerHandle) noexcept nogil      # Delete, Swap..., Free...
ctypedef int32_t (*f_run)(ContainerHandle, AtenTensorHandle* inputs, size_t num_inputs,
                          AtenTensorHandle* outputs, size_t num_outputs, void* stream,
                          void* proxy_executor) noexcept nogil
ctypedef int32_t (*f_get_count)(ContainerHandle, size_t* out) noexcept nogil
ctypedef int32_t (*f_get_str_at)(ContainerHandle, size_t idx, const char** out) noexcept nogil
ctypedef int32_t (*f_get_i32_at)(ContainerHandle, size_t idx, int32_t* out) noexcept nogil
ctypedef int32_t (*f_get_size_at)(ContainerHandle, size_t idx, size_t* out) noexcept nogil
ctypedef int32_t (*f_get_bool_at)(ContainerHandle, size_t idx, c_bool* out) noexcept nogil
ctypedef int32_t (*f_get_call_spec)(ContainerHandle, const char** ins, const char** outs) noexcept nogil
ctypedef int32_t (*f_update_pairs)(ContainerHandle, const ConstantMapEntry* pairs, size_t num_pairs,
                                   c_bool use_inactive, c_bool validate_full_update) noexcept nogil
ctypedef int32_t (*f_update_from_blob)(ContainerHandle, const uint8_t* blob) noexcept nogil
ctypedef int32_t (*f_last_error)(const char** message) noexcept nogil

cdef struct ModelFns:
    # required by every AOTI .so aoti_rt runs
    f_create_with_device create_with_device
    f_container_op delete
    f_run run
    f_get_count get_num_inputs
    f_get_count get_num_outputs
    f_get_count get_num_constants
    f_get_str_at get_constant_name
    f_get_str_at get_constant_fqn
    f_get_i32_at get_constant_dtype
    # optional (NULL where the torch that compiled the .so predates them)
    f_get_i32_at get_constant_type
    f_get_size_at get_constant_data_size
    f_get_bool_at get_constant_from_folded
    f_get_call_spec get_call_spec
    f_update_pairs update_pairs
    f_update_from_blob update_from_blob
    f_container_op swap_constant_buffer
    f_container_op free_inactive_constant_buffer
    f_last_error last_error
    f_run run_single_threaded

# ---- the libtorch shim functions that wrap memory as tensor handles ---------------------

ctypedef int32_t (*f_create_from_blob_v2)(
    void* data, int64_t ndim, const int64_t* sizes, const int64_t* strides,
    int64_t storage_offset, int32_t dtype, int32_t device_type, int32_t device_index,
    AtenTensorHandle* ret, int32_t layout, const uint8_t* opaque_metadata,
    int64_t opaque_metadata_size) noexcept nogil
ctypedef int32_t (*f_delete_tensor)(AtenTensorHandle) noexcept nogil


cdef class ModelABI:
    cdef ModelFns fns
    cdef readonly str so_name
    cdef readonly frozenset available      # the entry points this .so has

    cdef int _has(self, const void* fn, str name) except -1
    cdef int _container_op(self, f_container_op fn, str name, uintptr_t container) except -1
    cdef str _why(self)
    cdef int _ok(self, int32_t rc, str what) except -1


cdef class CallGate:
    cdef long long inflight        # calls between enter() and exit() (atomic)
    cdef long long closed          # close() began (atomic)
    cdef PyThread_type_lock launch # held while a call launches on the container (RunSingleThreaded)


cdef class BindPlan:
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
    cdef readonly str where        # "method 'decode'": how errors name the method
    cdef readonly frozenset keep   # names of constants the .so keeps as its own (not in the plan)
    cdef readonly Py_ssize_t so_owned      # constants of the .so the plan skips: folded or kept
    cdef readonly int64_t so_owned_bytes   # their GetConstantDataSize, summed
    cdef readonly Py_ssize_t folded        # of those, computed by the .so (run-time constant folding)
    cdef readonly int64_t folded_bytes     # their GetConstantDataSize, summed

    cdef int _known(self, Py_ssize_t i) except -1
    cdef int64_t _need(self, Py_ssize_t i) noexcept nogil
