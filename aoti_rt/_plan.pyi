"""Type stubs of aoti_rt._plan: the load plan (what goes where) and its copy loop."""

from ._memory import Buffer
from ._pieces import DIRECT_ALIGN as DIRECT_ALIGN
from ._pieces import b3_combine as b3_combine
from ._pieces import b3_hash as b3_hash

C_HASH_MAX: int

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
