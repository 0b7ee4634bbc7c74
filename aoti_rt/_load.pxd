# cython: language_level=3
"""The load pipeline's engines: a Stager (one worker's CUDA copy engine), the worker threads
and the replicated load (one read, a copy to each device). The plan and the copy loop are in
``_plan``; see ``_load.pyx``."""

from aoti_rt._memory cimport CUcontext, CUevent, CUstream
from aoti_rt._plan cimport Dest, LoadPlan


cdef enum:
    MAX_STAGING_DEPTH = 4
    MAX_REPLICAS = 16           # target devices of one replicated load


cdef class Stager:
    cdef readonly tuple staging         # its pinned staging Buffers (depth of them)
    cdef char* bufs[MAX_STAGING_DEPTH]
    cdef CUevent ev[MAX_STAGING_DEPTH]
    cdef readonly int depth
    cdef CUstream stream
    cdef CUcontext ctx
    cdef readonly long long chunk_bytes  # 0: a copy engine without staging (stream and events only)
    cdef readonly str device            # the device it copies to ("cuda:1"), for error messages

    cdef void _dest(self, Dest* d, LoadPlan plan) noexcept
