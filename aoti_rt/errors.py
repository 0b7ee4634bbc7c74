"""The exceptions aoti_rt raises. Each message says what is wrong and what to do next.

Every error aoti_rt raises on purpose is an :class:`AotiRtError`; the subclasses also derive
from the builtin a caller would expect (``MemoryError`` for an allocation, ``RuntimeError``
for a CUDA failure), so ``except MemoryError`` keeps working. This module imports nothing
from the rest of the package (the Cython ``_cache`` imports its errors from here).
"""

from __future__ import annotations


class AotiRtError(Exception):
    """Base class of aoti_rt's own errors."""


class BundleError(AotiRtError):
    """A bundle or weight store is missing, truncated, corrupt, or contradicts its manifest."""


class CompileError(AotiRtError, ValueError):
    """``aoti_rt.compile`` was given arguments it cannot compile."""


class NoShimError(CompileError):
    """AOTInductor has no C shim for an op the program calls, on this device and torch: the
    message names the op, the torch release that has it where known, and what to do instead."""


class AOTIError(AotiRtError, RuntimeError):
    """A call into an AOTInductor shared object failed (or the .so lacks an entry point)."""


class InputError(AotiRtError, TypeError):
    """A method was called with inputs that do not match its exported signature."""


class OptionError(AotiRtError, ValueError):
    """An option of the API was given a value it does not take (``verify=``, ``max_load_gbps=``)."""


class ClosedError(AotiRtError, RuntimeError):
    """The Method or Model was closed."""


class DeviceError(AotiRtError, ValueError):
    """A device asked for cannot be used: it does not exist on this machine, or a list of
    devices names one twice or mixes the CPU with GPUs."""


#: CUresult codes worth naming in a message (cuda.h); the rest are shown by number.
_CU_RESULTS = {
    1: "CUDA_ERROR_INVALID_VALUE", 2: "CUDA_ERROR_OUT_OF_MEMORY", 3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED", 100: "CUDA_ERROR_NO_DEVICE", 101: "CUDA_ERROR_INVALID_DEVICE",
    201: "CUDA_ERROR_INVALID_CONTEXT", 400: "CUDA_ERROR_INVALID_HANDLE",
    700: "CUDA_ERROR_ILLEGAL_ADDRESS", 719: "CUDA_ERROR_LAUNCH_FAILED", 999: "CUDA_ERROR_UNKNOWN",
}


class CudaError(AotiRtError, RuntimeError):
    """A CUDA driver call failed: ``what`` is the call, ``code`` the CUresult."""

    def __init__(self, what: str, code: int):
        self.what = str(what)
        self.code = int(code)
        name = _CU_RESULTS.get(self.code, "")
        if self.code == 2:
            todo = "free device memory or close unused models"
        elif self.code in (700, 719, 999):
            todo = "the CUDA context is likely unusable now; restart the process"
        else:
            todo = "check the device (nvidia-smi) and the driver installation"
        super().__init__(f"{self.what} failed with CUresult {self.code}"
                         f"{f' ({name})' if name else ''}; {todo}")

    def __reduce__(self):
        return (type(self), (self.what, self.code))


class AllocationError(AotiRtError, MemoryError):
    """Memory for a weight could not be allocated (device full, or over the set limit)."""

    def __reduce__(self):
        return (type(self), self.args)


class ShareError(AotiRtError, RuntimeError):
    """Weights could not be shared with, or taken from, another process (``load(..., share=)``):
    a connection refused, a share name held by another user or serving another bundle or
    device, a driver without the sharing entry points. The message says which and what to do."""


class ShareNameError(ShareError, ValueError):
    """A share name that cannot name a share: 1-64 of ``A-Z a-z 0-9 . _ -``, starting with a
    letter or a digit."""


class ShareUnavailableError(ShareError):
    """Weights cannot be shared now, through no fault of the bundle or the arguments: the name is
    held by another user's process, the process serving it did not answer before the deadline
    (``AOTI_RT_SHARE_TIMEOUT``) or refused this process, or this device or kernel cannot share
    memory. ``aoti_rt.load(..., share=name)`` then loads privately with a warning, unless
    ``share_required=True``, which raises this."""


__all__ = ["AotiRtError", "BundleError", "CompileError", "AOTIError", "InputError",
           "ClosedError", "DeviceError", "AllocationError", "CudaError", "ShareError", "ShareNameError",
           "ShareUnavailableError"]
