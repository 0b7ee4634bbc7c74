"""Checked reads of a zip archive in place: a ``.pt2`` package, or a ``torch.save`` zip stored
inside one.

A package is untrusted input. :class:`Archive` reads the end record and the central directory
with :mod:`zipfile` and checks every entry before anything uses it: names that would escape a
folder (``..``, absolute, backslashes, NUL), duplicates, encryption, offsets past the end of the
file, sizes too large to read. An entry's bytes are then reached by offset
(:meth:`Archive.stored`: where an uncompressed entry lies, for ``pread`` with no copy) or
streamed (:meth:`Archive.copy`, :meth:`Archive.read_small`: stored or deflated, size and
CRC-32 checked, never more than the declared size). Everything wrong is a
:class:`~aoti_rt.errors.BundleError` that says so.

Archive bombs: no two entries' bytes may overlap (eight central-directory entries naming one
compressed stream would extract it eight times), and what is extracted is capped
(:meth:`Archive.check_inflation`): torch stores every entry of a package uncompressed, so a
deflated entry may inflate at most MAX_RATIO times its compressed size, and all extracted
entries together at most MAX_RATIO times the archive's size.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

from .bundle import open_regular, pread_all
from .errors import BundleError

#: an archive with more entries than this is refused before its names are read
MAX_ENTRIES = 1 << 20
#: a central directory larger than this is refused before it is read
CENTRAL_DIR_MAX = 256 << 20
#: a JSON entry (metadata, weights_config.json) larger than this is refused
JSON_MAX = 16 << 20
#: bytes copied (or inflated) per step
CHUNK = 8 << 20
#: how many times its compressed size a deflated entry may inflate to (torch stores entries
#: uncompressed; a .so or kernel re-zipped with deflate shrinks 2-5x), and how many times the
#: archive's size everything extracted from it may be
MAX_RATIO = 16
#: a deflated entry may always inflate to this many bytes (small JSON files compress well)
RATIO_FLOOR = 1 << 20
#: one path component aoti_rt will write or look up: no separators, no leading dot
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,254}")
STORED, DEFLATED = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED


class Entry(NamedTuple):
    name: str
    header_offset: int     # of its local header, relative to the archive's start
    compress_size: int
    file_size: int
    method: int
    crc: int
    flags: int


class _Range:
    """A read-only file object over bytes ``[base, base + size)`` of an open file (what zipfile
    reads: the package, or a zip stored inside it)."""

    def __init__(self, fd: int, base: int, size: int, what: str):
        self.fd, self.base, self.size, self.what, self.pos = fd, base, size, what, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = (offset, self.pos + offset, self.size + offset)[whence]
        if pos < 0:
            raise OSError(22, "seek before the start of the archive")
        self.pos = pos
        return pos

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self.size - self.pos)
        n = left if n is None or n < 0 else min(n, left)
        data = pread_all(self.fd, n, self.base + self.pos, self.what)
        self.pos += len(data)
        return data


class Archive:
    """A zip archive (a ``.pt2``, or a ``torch.save`` zip stored inside one) with every entry
    checked: names, bounds, compression. Offsets it returns are absolute in the file."""

    def __init__(self, path: Path, fd: int, base: int, size: int, what: str, *, owns_fd: bool = False):
        self.path, self.fd, self.base, self.size, self.what = path, fd, base, size, what
        self.owns_fd = owns_fd
        self.entries: dict[str, Entry] = {}
        f = _Range(fd, base, size, what)
        try:
            end = zipfile._EndRecData(f)      # the end record only: sizes to check before reading on
            if end is None:
                raise BundleError(f"{what} is not a zip archive (no end record): it is truncated, or not "
                                  f"a .pt2 package; re-create or re-copy it")
            if end[zipfile._ECD_SIZE] > CENTRAL_DIR_MAX or end[zipfile._ECD_ENTRIES_TOTAL] > MAX_ENTRIES:
                raise BundleError(f"{what} declares a {end[zipfile._ECD_SIZE]}-byte central directory of "
                                  f"{end[zipfile._ECD_ENTRIES_TOTAL]} entries, more than aoti_rt reads "
                                  f"({CENTRAL_DIR_MAX >> 20} MiB, {MAX_ENTRIES}); the archive is corrupt")
            zf = zipfile.ZipFile(f)
            infos, start_dir = zf.infolist(), zf.start_dir
        except BundleError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - zipfile raises many types on crafted input
            raise BundleError(f"{what} is not a readable zip archive ({type(e).__name__}: {e}); it is "
                              f"truncated or corrupt: re-create or re-copy it") from None
        if len(infos) > MAX_ENTRIES:
            raise BundleError(f"{what} has {len(infos)} entries, more than the {MAX_ENTRIES} aoti_rt reads")
        for i in infos:
            name = i.orig_filename
            if "\x00" in name or "\\" in name or name.startswith("/") or ".." in name.split("/"):
                raise BundleError(f"{what}: entry {name!r} points outside the archive's folder; the "
                                  f"archive is crafted or corrupt, do not use it")
            if name in self.entries:
                raise BundleError(f"{what}: entry {name!r} appears twice; the archive is corrupt")
            if i.flag_bits & 1:
                raise BundleError(f"{what}: entry {name!r} is encrypted; aoti_rt reads unencrypted packages")
            if not 0 <= i.header_offset <= size - 30 or i.compress_size < 0 or i.file_size < 0:
                raise BundleError(f"{what}: entry {name!r} points past the end of the archive "
                                  f"({size} bytes); it is truncated or corrupt: re-create or re-copy it")
            self.entries[name] = Entry(name, i.header_offset, i.compress_size, i.file_size,
                                        i.compress_type, i.CRC, i.flag_bits)
        self._ends = self._check_overlaps(start_dir)

    def _check_overlaps(self, start_dir: int) -> dict[str, int]:
        """Where each entry's bytes must end: the next local header (or the central directory).
        Two entries whose headers and bytes overlap are refused; each entry's exact end (past
        its local header's variable fields) is checked when its bytes are first reached."""
        order = sorted(self.entries.values(), key=lambda e: e.header_offset)
        ends = {}
        for e, nxt in zip(order, order[1:] + [None]):
            end = nxt.header_offset if nxt is not None else start_dir
            if e.header_offset + 30 + e.compress_size > self.size:
                raise BundleError(f"{self.what}: entry {e.name!r} points past the end of the archive "
                                  f"({self.size} bytes); it is truncated or corrupt: re-create or re-copy it")
            if e.header_offset + 30 + e.compress_size > end:
                raise BundleError(self._overlap(e, nxt))
            ends[e.name] = end
        return ends

    def _overlap(self, e: Entry, other: "Entry | None") -> str:
        them = f"entry {other.name!r}" if other is not None else "the central directory"
        return (f"{self.what}: the bytes of entry {e.name!r} overlap {them}; entries that share bytes are "
                f"how zip bombs multiply what they extract, and no zip writer makes them: the archive is "
                f"crafted or corrupt, do not use it")

    def check_inflation(self, entries) -> int:
        """Refuse extracting ``entries`` if a deflated one inflates more than MAX_RATIO times its
        compressed size (beyond RATIO_FLOOR bytes), or all of them more than MAX_RATIO times the
        archive's size; returns the bytes they extract to."""
        total = 0
        for e in entries:
            if e.method != STORED and e.file_size > max(MAX_RATIO * e.compress_size, RATIO_FLOOR):
                raise BundleError(f"{self.what}: entry {e.name!r} inflates from {e.compress_size} to "
                                  f"{e.file_size} bytes, more than {MAX_RATIO} times; torch stores package "
                                  f"entries uncompressed, so this is a zip bomb or a package re-zipped with "
                                  f"compression: re-create it with torch, or re-zip it without compression (zip -0)")
            total += e.file_size
        if total > MAX_RATIO * self.size:
            raise BundleError(f"{self.what} would extract {total} bytes, more than {MAX_RATIO} times its "
                              f"{self.size}; the archive is a zip bomb or corrupt: re-create it with torch")
        return total

    @classmethod
    def open(cls, path: Path) -> "Archive":
        fd, st = open_regular(path, "package")
        try:
            os.set_blocking(fd, True)
            return cls(path, fd, 0, st.st_size, f"package {path}", owns_fd=True)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def root(self) -> str:
        """The one folder every entry of a PyTorch archive is under."""
        roots = {n.partition("/")[0] for n in self.entries}
        if len(roots) != 1 or any("/" not in n for n in self.entries):
            raise BundleError(f"{self.what} is not a PyTorch archive (its entries are not under one folder)")
        return roots.pop()

    def data_offset(self, e: Entry) -> int:
        """The absolute file offset of an entry's bytes (from its local header, checked)."""
        h = pread_all(self.fd, 30, self.base + e.header_offset, self.what)
        if len(h) < 30 or h[:4] != b"PK\x03\x04":
            raise BundleError(f"{self.what}: entry {e.name!r} has no local header where the central "
                              f"directory says; the archive is corrupt: re-create or re-copy it")
        _, _, _, method, _, _, _, _, _, nlen, xlen = struct.unpack("<4sHHHHHIIIHH", h)
        if method != e.method:
            raise BundleError(f"{self.what}: entry {e.name!r} has two compression methods; the archive is corrupt")
        start = e.header_offset + 30 + nlen + xlen
        if start + e.compress_size > self._ends[e.name] and start + e.compress_size <= self.size:
            raise BundleError(self._overlap(e, next((o for o in self.entries.values()
                                                     if o.header_offset == self._ends[e.name]), None)))
        if start + e.compress_size > self.size:
            raise BundleError(f"{self.what} is truncated: entry {e.name!r} needs bytes up to "
                              f"{start + e.compress_size}, it has {self.size}; re-create or re-copy it")
        if e.method == STORED and e.compress_size != e.file_size:
            raise BundleError(f"{self.what}: stored entry {e.name!r} has two sizes; the archive is corrupt")
        return self.base + start

    def stored(self, e: Entry, what: str) -> tuple[int, int]:
        """``(absolute offset, size)`` of an uncompressed entry's bytes; a compressed one is refused."""
        if e.method != STORED:
            raise BundleError(f"{what} ({e.name!r}) is compressed; aoti_rt reads weights in place from the "
                              f"archive, so they must be stored uncompressed, as torch writes them: re-create "
                              f"the package with torch, or re-zip it without compression (zip -0)")
        return self.data_offset(e), e.file_size

    def copy(self, e: Entry, out: int) -> str:
        """Write an entry's (inflated) bytes to file descriptor ``out``; returns their SHA-256.
        Its size and CRC-32 are checked; at most the declared size is ever written."""
        def write(piece: bytes) -> None:
            view = memoryview(piece)
            while view:
                view = view[os.write(out, view):]
        return self._stream(e, write)

    def read_small(self, e: Entry, limit: int = JSON_MAX) -> bytes:
        """A small entry's bytes (metadata, JSON); one larger than ``limit`` is refused."""
        if e.file_size > limit:
            raise BundleError(f"{self.what}: entry {e.name!r} is {e.file_size} bytes, more than the {limit} "
                              f"aoti_rt reads for it; the archive is corrupt")
        parts: list[bytes] = []
        self._stream(e, parts.append)
        return b"".join(parts)

    def _stream(self, e: Entry, sink) -> str:
        """Pass an entry's bytes, inflated, to ``sink`` in pieces; check its size and CRC-32."""
        at = self.data_offset(e)
        left = e.compress_size
        sha, crc, done = hashlib.sha256(), 0, 0

        def emit(piece: bytes) -> None:
            nonlocal crc, done
            done += len(piece)
            if done > e.file_size:
                raise BundleError(f"{self.what}: entry {e.name!r} inflates to more than its declared "
                                  f"{e.file_size} bytes; the archive is corrupt or crafted")
            sha.update(piece)
            crc = zlib.crc32(piece, crc)
            sink(piece)

        def chunk() -> bytes:
            nonlocal at, left
            n = min(left, CHUNK)
            data = pread_all(self.fd, n, at, self.what)
            if len(data) < n:
                raise BundleError(f"{self.what} is truncated (entry {e.name!r}); re-create or re-copy it")
            at += n
            left -= n
            return data

        if e.method == STORED:
            while left:
                emit(chunk())
        elif e.method == DEFLATED:
            d = zlib.decompressobj(-15)
            pending = b""
            try:
                while not d.eof:
                    if not pending and left:
                        pending = chunk()
                    piece = d.decompress(pending, CHUNK)
                    pending = d.unconsumed_tail
                    emit(piece)
                    if not piece and not pending and not left and not d.eof:
                        raise BundleError(f"{self.what}: entry {e.name!r} ends inside its compressed data; "
                                          f"the archive is truncated or corrupt")
            except zlib.error as err:
                raise BundleError(f"{self.what}: entry {e.name!r} is not valid deflate data ({err}); "
                                  f"the archive is corrupt") from None
        else:
            raise BundleError(f"{self.what}: entry {e.name!r} uses zip compression method {e.method}; "
                              f"aoti_rt reads stored and deflated entries: re-create the package with torch")
        if done != e.file_size or crc != e.crc:
            raise BundleError(f"{self.what}: entry {e.name!r} does not match its declared size and CRC-32; "
                              f"the archive is corrupt: re-create or re-copy it")
        return sha.hexdigest()




def check_stored(items: "list[tuple[Archive, Entry, str]]") -> None:
    """Check the CRC-32 of stored entries whose bytes are read in place (weights), each item
    ``(archive, entry, what it is)``, in parallel: the one check a zip carries of bytes nothing
    else hashes before they are used. A package's probe runs it once per package file
    (zlib's CRC-32 ran at 6.9 GB/s on one core of this project's CPU machine: a fraction of a
    second per GB, page cache warm)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    stop = threading.Event()          # a mismatch found, or Ctrl-C: the other entries stop reading

    def crc(item: "tuple[Archive, Entry, str]") -> int:
        arc, e, what = item
        at, left = arc.stored(e, what)
        value = 0
        while left and not stop.is_set():
            n = min(left, CHUNK)
            data = pread_all(arc.fd, n, at, arc.what)
            if len(data) < n:
                raise BundleError(f"{arc.what} is truncated (entry {e.name!r}); re-create or re-copy it")
            value = zlib.crc32(data, value)     # releases the GIL: entries in parallel
            at += n
            left -= n
        return value

    todo = [item for item in items if item[1].file_size]
    if not todo:
        return
    with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1, 8)) as pool:
        try:
            for (arc, e, what), value in zip(todo, pool.map(crc, todo)):
                if value != e.crc:
                    raise BundleError(f"{arc.what}: {what} ({e.name!r}) does not match its CRC-32; the archive "
                                      f"is corrupt: re-create or re-copy it")
        except BaseException:
            stop.set()
            raise


__all__ = ["Archive", "Entry", "check_stored", "STORED", "DEFLATED", "JSON_MAX", "SAFE_NAME", "CHUNK",
           "MAX_RATIO"]
