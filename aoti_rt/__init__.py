"""aoti_rt: run multi-method AOTInductor models with one copy of each weight.

>>> import aoti_rt
>>> aoti_rt.compile({"prefill": ep_prefill, "decode": ep_decode}, "model.aoti")
>>> with aoti_rt.load("model.aoti", device="cuda") as model:
...     logits = model.prefill(tokens)
...     nxt = model.decode(token, pos)
"""

__version__ = "0.1.0"

from .bundle import Bundle, Manifest, read_bundle
from .compiler import compile
from .device import cuda_available
from .errors import (AllocationError, AOTIError, AotiRtError, BundleError, ClosedError,
                     CompileError, CudaError, DeviceError, InputError, NoShimError, OptionError,
                     ShareError)
from .loader import PinnedStore, pin_store
from .memory import (MemoryReport, Sampler, cache_stats, free_staging, memory_report, reset_peak,
                     set_memory_limit)
from .acquire import Verify
from .api import load
from .runtime import BoundConstant, Method, Model
from .serving import ShareInfo
from .stock import load_method

__all__ = [
    "compile", "load", "load_method", "cache_stats", "free_staging", "memory_report", "MemoryReport", "Sampler", "reset_peak", "set_memory_limit",
    "cuda_available", "pin_store", "PinnedStore", "Model", "Method", "BoundConstant", "Verify", "ShareInfo", "Bundle", "Manifest",
    "read_bundle", "AotiRtError", "BundleError", "CompileError", "AOTIError", "InputError", "ClosedError",
    "AllocationError", "CudaError", "DeviceError", "ShareError", "OptionError", "NoShimError",
]
