"""Content digests of weights: BLAKE3 over fixed-size blocks, combined into one digest.

A weight's digest is a two-level tree, so one weight can be hashed in blocks by several
loader workers in parallel, each block right after its bytes were read::

    block_i = blake3(data[i * BLOCK : (i + 1) * BLOCK])            (32 bytes each)
    digest  = "b3t:" + hex(blake3(b"aoti_rt weight v1\\0" + le64(len(data))
                                  + block_0 + block_1 + ...))

A weight smaller than BLOCK has one block; a zero-byte weight has none. The compiler
(:func:`weight_digest`, over the bytes it writes) and the loader (:func:`combine`, over the
block hashes its workers computed) share :func:`combine`, so the two cannot drift.

BLOCK is 4 MiB: large enough that the per-block cost of handing a block to the hasher
(a few microseconds) is under 1 % of hashing it (~0.5 ms at ~8 GB/s), and that the tree
adds only 8 KiB of block hashes per GiB; small enough that a block just read into memory
is still in the CPU's caches when it is hashed (16 workers x 4 MiB fits a server L3), and
that a large weight splits into many blocks for the workers to share. It divides the
loader's 32 MiB chunks, so a chunk of one large weight is exactly eight blocks.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

from blake3 import blake3

#: digest prefix naming the scheme: BLAKE3 tree, version 1 (the domain string below)
PREFIX = "b3t:"
#: bytes per hash block (a power of two; changing it changes every digest)
BLOCK = 4 << 20
#: bytes of one block hash
HASH_BYTES = 32
_DOMAIN = b"aoti_rt weight v1\0"


def num_blocks(nbytes: int) -> int:
    """Hash blocks of a weight of ``nbytes`` bytes (0 for an empty weight)."""
    return -(-nbytes // BLOCK)


def block_hash(data) -> bytes:
    """The 32-byte BLAKE3 hash of one block (at most BLOCK bytes)."""
    return blake3(data).digest()


def combine(nbytes: int, block_hashes: bytes | bytearray | memoryview | Iterable[bytes]) -> str:
    """The digest of a weight of ``nbytes`` bytes from its blocks' hashes, in order.

    ``block_hashes`` is either the hashes concatenated (``32 * num_blocks(nbytes)`` bytes)
    or an iterable of 32-byte hashes.
    """
    if isinstance(block_hashes, (bytes, bytearray, memoryview)):
        joined = bytes(block_hashes)
    else:
        parts = list(block_hashes)
        if any(len(h) != HASH_BYTES for h in parts):
            raise ValueError(f"block hashes must be {HASH_BYTES} bytes each")
        joined = b"".join(parts)
    if nbytes < 0 or len(joined) != HASH_BYTES * num_blocks(nbytes):
        raise ValueError(f"a weight of {nbytes} bytes has {num_blocks(nbytes)} block hashes, "
                         f"got {len(joined) / HASH_BYTES:g}")
    return PREFIX + blake3(_DOMAIN + nbytes.to_bytes(8, "little") + joined).hexdigest()


#: a weight of at least this many blocks is hashed by several threads (the hasher releases
#: the GIL); below it, handing blocks to threads costs more than it saves
_PARALLEL_BLOCKS = 8


@functools.cache
def _hash_pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 16)), thread_name_prefix="aoti_rt-digest")


# a forked child (the compiler's CPU workers) inherits the pool without its threads: work
# handed to it would wait forever, so the child starts a pool of its own
os.register_at_fork(after_in_child=_hash_pool.cache_clear)


def weight_digest(data) -> str:
    """The digest of a weight's bytes (any contiguous bytes-like object); a large weight's
    blocks are hashed in parallel threads."""
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise ValueError("weight_digest needs contiguous bytes")
    mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
    n = mv.nbytes
    blocks = (mv[i:i + BLOCK] for i in range(0, n, BLOCK))
    if num_blocks(n) >= _PARALLEL_BLOCKS and (os.cpu_count() or 1) > 1:
        return combine(n, b"".join(_hash_pool().map(block_hash, blocks)))
    return combine(n, b"".join(block_hash(b) for b in blocks))


def is_verifiable(digest: str) -> bool:
    """True for a digest this module defines (the loader can verify it while loading)."""
    return isinstance(digest, str) and digest.startswith(PREFIX) and len(digest) == len(PREFIX) + 64


def _open_file(path) -> int:
    """``path`` opened for reading without ever blocking (a FIFO would block a plain open);
    anything but a regular file is an OSError."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def file_digests(path, ranges: list[tuple[int, int]], *, workers: int | None = None) -> list[str]:
    """The digests of byte ranges ``(offset, nbytes)`` of a file, read and hashed block by
    block in parallel threads (``os.pread`` and the hasher both release the GIL).

    ``path`` may also be a file descriptor open for reading (left open).

    Used to verify, on demand, that a weight already in device memory holds the bytes its
    digest claims, by hashing the store it was loaded from: no device memory, no copy; and
    by the probe, to hash constants where they lie in a blob, a .so or a package.
    Raises OSError if the file cannot be read or is shorter than a range.
    """
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(i, b, off + b * BLOCK, min(BLOCK, n - b * BLOCK))
            for i, (off, n) in enumerate(ranges) for b in range(num_blocks(n))]
    hashes: list[list[bytes]] = [[b""] * num_blocks(n) for _, n in ranges]
    owned = not isinstance(path, int)
    fd = _open_file(path) if owned else path
    try:
        def one(job) -> None:
            i, b, at, n = job
            data = os.pread(fd, n, at)
            if len(data) != n:
                raise OSError(f"{path if owned else 'the file'} ends before byte {at + n}")
            hashes[i][b] = block_hash(data)

        n_workers = max(1, min(workers or os.cpu_count() or 1, 16, len(jobs)))
        if n_workers == 1:
            for job in jobs:
                one(job)
        else:
            pool = ThreadPoolExecutor(n_workers, thread_name_prefix="aoti_rt-verify")
            try:
                for _ in pool.map(one, jobs):
                    pass
            finally:
                # every thread is joined before the fd is closed, whatever arrives meanwhile
                pool.shutdown(wait=False, cancel_futures=True)
                while True:
                    try:
                        pool.shutdown(wait=True)
                        break
                    except KeyboardInterrupt:
                        continue
    finally:
        if owned:
            os.close(fd)
    return [combine(n, hashes[i]) for i, (_, n) in enumerate(ranges)]


__all__ = ["PREFIX", "BLOCK", "HASH_BYTES", "num_blocks", "block_hash", "combine", "weight_digest",
           "is_verifiable", "file_digests"]
