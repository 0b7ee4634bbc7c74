"""Type stubs of aoti_rt._memory: the CUDA driver table, allocators and Buffer (shared arenas:
aoti_rt._arena)."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._arena import SharedArena

DRIVER_SYMBOLS: tuple[str, ...]
VMM_SYMBOLS: tuple[str, ...]
VMM_LAYOUT_OK: bool
SMALL_MAX: int
SLAB_BYTES: int
SLAB_ALIGN: int

def install_driver(pointers: dict[str, int]) -> None: ...
def vmm_available() -> bool: ...
def arena_totals() -> tuple[int, int]: ...

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
    def arena(self) -> SharedArena | None: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...
