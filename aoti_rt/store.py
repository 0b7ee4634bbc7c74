"""A bundle's files: opening them safely, and the safetensors weight store's header.

Every file a bundle names is opened by :func:`open_regular` (never blocking: a FIFO would hang
a plain open) and must be a regular file; :func:`read_store_header` parses and checks the
store's header with its own checks and the safetensors library's.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ._schema import MANIFEST_MAX_BYTES, MAX_RANK, _at, _int, _Invalid, _list, _name, _RECOMPILE, _show, strict_json
from .errors import BundleError

#: a store header (the JSON after the 8-byte length) larger than this is refused
STORE_HEADER_MAX_BYTES = 64 << 20


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: Path, what: str) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading without ever blocking (a FIFO would block a plain open and
    every read) and check it is a regular file. Returns ``(fd, stat)``; the caller closes."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise BundleError(f"{what} {path} is missing: the bundle is incomplete, recompile it") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot open {what} {path} ({e}); check the bundle's files and permissions") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{what} {path} is {_file_kind(st.st_mode)}, not a regular file; a bundle's "
                              f"files must be regular files: re-copy the bundle")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def pread_all(fd: int, n: int, offset: int, what: "str | Path") -> bytes:
    """Up to ``n`` bytes at ``offset`` (fewer only at the end of the file); a read error is a
    :class:`BundleError` naming ``what``."""
    parts, got = [], 0
    try:
        while got < n:
            b = os.pread(fd, min(n - got, 16 << 20), offset + got)
            if not b:
                break
            parts.append(b)
            got += len(b)
    except OSError as e:
        raise BundleError(f"cannot read {what} ({e}); check the file and its permissions") from None
    return b"".join(parts)


def read_manifest_bytes(path: Path) -> bytes:
    """The bytes of a manifest file, refused above MANIFEST_MAX_BYTES before any is read."""
    fd, st = open_regular(path, "manifest")
    try:
        if st.st_size > MANIFEST_MAX_BYTES:
            raise BundleError(f"manifest {path} is {st.st_size} bytes, more than the {MANIFEST_MAX_BYTES >> 20} MiB "
                              f"a manifest may have; {_RECOMPILE}")
        data = pread_all(fd, MANIFEST_MAX_BYTES + 1, 0, path)
        if len(data) > MANIFEST_MAX_BYTES:
            raise BundleError(f"manifest {path} grew past {MANIFEST_MAX_BYTES >> 20} MiB while being read")
        return data
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StoreHeader:
    """The parsed header of a safetensors file: name -> (dtype, shape, absolute offsets)."""

    path: Path
    data_start: int
    file_size: int
    tensors: dict[str, tuple[str, list[int], int, int]]


def read_store_header(path: Path) -> StoreHeader:
    """Parse and check a safetensors header (8-byte LE length + JSON + the tensors' bytes).

    Raises BundleError if the file is missing or not a regular file, the header is corrupt
    (bad JSON or UTF-8, a duplicate key, a mistyped entry, offsets that are negative,
    reversed, overlapping or past the end of the file: truncated), or the safetensors library
    itself rejects the file (a dtype/shape that disagrees with an entry's byte length, bytes
    not covered by any tensor).
    """
    path = Path(path)
    fd, st = open_regular(path, "weight store")
    try:
        size = st.st_size
        head = pread_all(fd, 8, 0, path)
        if len(head) < 8:
            raise BundleError(f"weight store {path} is truncated ({size} bytes): recompile or re-copy the bundle")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > STORE_HEADER_MAX_BYTES:
            raise BundleError(f"weight store {path} has a corrupt header (its length field says {hlen} bytes, "
                              f"more than the {STORE_HEADER_MAX_BYTES >> 20} MiB allowed); recompile or re-copy the bundle")
        if hlen > size - 8:
            raise BundleError(f"weight store {path} is truncated or has a corrupt header (header length {hlen} "
                              f"in a {size}-byte file); recompile or re-copy the bundle")
        raw = pread_all(fd, hlen, 8, path)
        if len(raw) < hlen:
            raise BundleError(f"weight store {path} is truncated (shrank while being read)")
        tensors = _store_tensors(raw, path, 8 + hlen, size)
        _safetensors_check(fd, path)
    finally:
        os.close(fd)
    return StoreHeader(path, 8 + hlen, size, tensors)


def _store_tensors(raw: bytes, path: Path, data_start: int, size: int) -> dict[str, tuple[str, list[int], int, int]]:
    header = strict_json(raw, f"weight store {path} has a corrupt header", STORE_HEADER_MAX_BYTES)

    def bad(problem: str) -> BundleError:
        return BundleError(f"weight store {path} has a corrupt header: {problem}; recompile or re-copy the bundle")

    if type(header) is not dict:
        raise bad(f"it is {_show(header)}, not an object")
    meta = header.get("__metadata__")
    if meta is not None and (type(meta) is not dict or any(type(v) is not str for v in meta.values())):
        raise bad("__metadata__ is not an object of strings")
    data_size = size - data_start
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            _at("a tensor name", _name, name)
            if type(info) is not dict:
                raise _Invalid(f"must be an object, not {_show(info)}", f"entry {name!r}")
            dtype = _at(f"entry {name!r}: dtype", _name, info.get("dtype"))
            shape = _at(f"entry {name!r}: shape", _list(_int, MAX_RANK), info.get("shape"))
            offs = info.get("data_offsets")
            if type(offs) is not list or len(offs) != 2:
                raise _Invalid(f"must be a list [begin, end], not {_show(offs)}", f"entry {name!r}: data_offsets")
            b = _at(f"entry {name!r}: data_offsets[0]", _int, offs[0])
            e = _at(f"entry {name!r}: data_offsets[1]", _int, offs[1])
        except _Invalid as err:
            raise bad(f"{err.path} {err.problem}") from None
        if b > e:
            raise bad(f"entry {name!r} ends before it begins (data_offsets [{b}, {e}])")
        if e > data_size:
            raise BundleError(f"weight store {path} is truncated: its header needs {data_start + e} bytes, "
                              f"the file has {size}; recompile or re-copy the bundle")
        tensors[name] = (dtype, shape, data_start + b, data_start + e)
    prev_name, prev_end = None, data_start
    for name, (_, _, b, e) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if b < prev_end:
            raise bad(f"entries {prev_name!r} and {name!r} overlap (bytes {b - data_start} < {prev_end - data_start})")
        prev_name, prev_end = name, e
    return tensors


def _safetensors_check(fd: int, path: Path) -> None:
    """Let the safetensors library validate the file as well (each entry's byte length against
    its dtype and shape, the entries contiguous and covering the data exactly). It reads the
    already-open descriptor through /proc where it can, so what it checks is what we opened."""
    try:
        from safetensors import safe_open
    except ImportError:       # a dependency, but the checks above stand on their own
        return
    proc = f"/proc/self/fd/{fd}"
    target = proc if os.path.exists(proc) else str(path)
    try:
        try:
            handle = safe_open(target, framework="numpy", backend="pread")
        except TypeError:     # safetensors < 0.8 has no backend= (it maps the file: a regular one)
            handle = safe_open(target, framework="numpy")
        with handle:
            pass
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - SafetensorError, or a Rust panic (a BaseException)
        raise BundleError(f"weight store {path} is not a valid safetensors file ({e}); "
                          f"recompile or re-copy the bundle") from None


def is_regular_file(path: Path) -> bool:
    """True for an existing regular file; False for anything else, including a path the OS
    refuses to look up (too long, a loop, no permission), where ``Path.is_file`` raises."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False

def file_identity(path: Path) -> tuple[int, int, int] | None:
    """``(size, mtime_ns, inode)`` of a file, or None if it cannot be stat'ed: a cheap test
    that a file is still the one that was read."""
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


__all__ = ["STORE_HEADER_MAX_BYTES", "StoreHeader", "open_regular", "pread_all", "read_manifest_bytes",
           "read_store_header", "is_regular_file", "file_identity"]
