"""Type stubs of aoti_rt._load: the load pipeline (store file -> weight buffers)."""

from collections.abc import Callable
from typing import Any

from ._memory import Buffer, PinnedAllocator

C_HASH_MAX: int
DIRECT_ALIGN: int

def b3_hash(data: bytes | bytearray | memoryview) -> bytes: ...
def b3_combine(nbytes: int, hashes: bytes) -> str: ...

class LoadPlan:
    num_pieces: int
    num_chunks: int
    num_weights: int
    total_bytes: int
    chunk_bytes: int
    block_bytes: int
    max_end: int
    verify: bool
    on_cuda: bool
    source: str
    buffers: tuple[Buffer, ...]
    c_hash_max: int
    def __init__(self, file_offsets: list[int], sizes: list[int], buffers: list[Buffer],
                 chunk_bytes: int, *, verify: bool = False, source: str = ...,
                 max_bytes_per_s: float = 0) -> None: ...
    @property
    def bytes_done(self) -> int: ...
    @property
    def cancelled(self) -> bool: ...
    @property
    def active_workers(self) -> int: ...
    def cancel(self) -> None: ...
    def wait_idle(self) -> None: ...
    def digests(self) -> list[str]: ...
    def first_mismatch(self, digests: list[str | None]) -> int: ...
    def same_layout(self, other: LoadPlan) -> bool: ...
    def run_host(self, fd: int, worker: int = 0, nworkers: int = 1) -> None: ...

class Stager:
    staging: tuple[Buffer, ...]
    depth: int
    chunk_bytes: int
    device: str
    def __init__(self, pinned: PinnedAllocator | None, context: int, chunk_bytes: int, depth: int = 2,
                 device: str = "") -> None: ...
    def run(self, plan: LoadPlan, fd: int, worker: int = 0, nworkers: int = 1, direct: bool = False) -> None: ...

def run_workers(plan: LoadPlan, nworkers: int, fn: Callable[[int], Any],
                progress: Callable[[int], Any] | None = None, interval: float = 0.1) -> list[Any]: ...
def run_replicated(plans: tuple[LoadPlan, ...], stagers: tuple[Stager, ...], fd: int, worker: int = 0,
                   nworkers: int = 1, direct: bool = False,
                   staging: tuple[Buffer, ...] | None = None, relay: bool = False) -> None: ...
def copy_from_host(plan: LoadPlan, image: Buffer, stager: Stager | None = None, worker: int = 0,
                   nworkers: int = 1) -> None: ...
