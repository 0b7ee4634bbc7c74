"""The exceptions aoti_rt raises. Each message says what to do next."""

from ._cache import AllocationError, CudaError


class AotiRtError(Exception):
    """Base class of aoti_rt's own errors."""


class BundleError(AotiRtError):
    """A bundle or weight store is missing, truncated, corrupt, or contradicts its manifest."""


class CompileError(AotiRtError, ValueError):
    """``aoti_rt.compile`` was given arguments it cannot compile."""


class AOTIError(AotiRtError, RuntimeError):
    """A call into an AOTInductor shared object failed (or the .so lacks an entry point)."""


class InputError(AotiRtError, TypeError):
    """A method was called with inputs that do not match its exported signature."""


class ClosedError(AotiRtError, RuntimeError):
    """The Method or Model was closed."""


__all__ = ["AotiRtError", "BundleError", "CompileError", "AOTIError", "InputError",
           "ClosedError", "AllocationError", "CudaError"]
