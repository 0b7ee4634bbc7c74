"""Type stubs of aoti_rt._load: the load pipeline's engines and threads (store file -> weight
buffers); the plan and its copy loop are in aoti_rt._plan, the byte-level steps in
aoti_rt._pieces, re-exported here."""

from collections.abc import Callable
from typing import Any

from ._memory import Buffer, PinnedAllocator
from ._pieces import DIRECT_ALIGN as DIRECT_ALIGN
from ._pieces import b3_combine as b3_combine
from ._pieces import b3_hash as b3_hash
from ._plan import C_HASH_MAX as C_HASH_MAX
from ._plan import LoadPlan as LoadPlan

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
