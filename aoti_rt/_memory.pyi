"""Type stubs of aoti_rt._memory: the CUDA driver table, allocators and Buffer."""

from typing import Any

DRIVER_SYMBOLS: tuple[str, ...]
SMALL_MAX: int
SLAB_BYTES: int
SLAB_ALIGN: int

def install_driver(pointers: dict[str, int]) -> None: ...

class Allocator:
    device: str
    bytes_allocated: int
    peak_bytes_allocated: int
    bytes_reserved: int
    peak_bytes_reserved: int
    num_allocations: int
    num_slabs: int
    limit: int
    small_max: int
    is_cuda: bool
    def __init__(self, device: str) -> None: ...
    def allocate(self, nbytes: int) -> Buffer: ...
    def reset_peak(self) -> None: ...

class HostAllocator(Allocator): ...

class CudaAllocator(Allocator):
    ordinal: int
    def __init__(self, device: str, ordinal: int, context: int) -> None: ...

class PinnedAllocator(Allocator):
    huge_pages: bool
    def __init__(self, device: str, context: int, huge_pages: bool = False) -> None: ...

class Buffer:
    ptr: int
    nbytes: int
    allocator: Allocator
    @property
    def device(self) -> str: ...
    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...
