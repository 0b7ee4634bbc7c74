"""Read what aoti_rt needs from a shared object's ELF tables: sections and symbols.

A 64-bit little-endian ELF file is untrusted input like the rest of a bundle or package:
every offset and size is checked against the file before it is read, and anything that does
not fit is a :class:`~aoti_rt.errors.BundleError`. Used to find the weights AOTI embeds in a
.so (:func:`embedded_constants`, for :mod:`aoti_rt.package`) and whether a .so calls operators
through a proxy executor (:func:`imports_symbol`).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from .bundle import open_regular, pread_all
from .errors import BundleError

#: symbol and string tables larger than this are refused (a real AOTI .so has a few MiB)
TABLE_MAX = 256 << 20
SHT_SYMTAB, SHT_STRTAB, SHT_DYNSYM = 2, 3, 11


def _bad(what: str, why: str) -> BundleError:
    return BundleError(f"{what}: {why}; the .so is corrupt or not an AOTInductor model for this machine")


def sections(fd: int, size: int, what: str) -> list[tuple]:
    """The section headers ``(name, type, flags, addr, offset, size, link, info, addralign,
    entsize)`` of the ELF file open as ``fd`` (``size`` bytes)."""
    hdr = pread_all(fd, 64, 0, what)
    if len(hdr) < 64 or hdr[:4] != b"\x7fELF" or hdr[4] != 2 or hdr[5] != 1:
        raise _bad(what, "not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", hdr, 0x28)
    shentsize, shnum, _ = struct.unpack_from("<HHH", hdr, 0x3A)
    if shentsize != 64 or shnum == 0 or shoff + 64 * shnum > size:
        raise _bad(what, "its section header table is missing or outside the file")
    table = pread_all(fd, 64 * shnum, shoff, what)
    return [struct.unpack_from("<IIQQQQIIQQ", table, 64 * i) for i in range(shnum)]


def _raw_table(fd: int, size: int, what: str, secs: list[tuple], kind: int) -> tuple[bytes, bytes] | None:
    """The entries and the string table of the first symbol table of ``kind`` (SHT_DYNSYM or
    SHT_SYMTAB), checked to lie in the file; None if the file has none."""
    for s in secs:
        if s[1] != kind:
            continue
        if s[9] != 24 or s[5] % 24 or s[5] > TABLE_MAX or s[4] + s[5] > size or s[6] >= len(secs):
            raise _bad(what, "its symbol table is malformed")
        strtab = secs[s[6]]
        if strtab[1] != SHT_STRTAB or strtab[5] > TABLE_MAX or strtab[4] + strtab[5] > size:
            raise _bad(what, "its symbol string table is malformed")
        return pread_all(fd, s[5], s[4], what), pread_all(fd, strtab[5], strtab[4], what)
    return None


def symbol_table(fd: int, size: int, what: str, secs: list[tuple], kind: int) -> list[tuple[bytes, int, int]] | None:
    """``(name, section index, value)`` of every symbol in the first table of ``kind``
    (SHT_DYNSYM or SHT_SYMTAB), or None if the file has none."""
    raw = _raw_table(fd, size, what, secs, kind)
    if raw is None:
        return None
    syms, strs = raw
    out = []
    for name, _, _, shndx, value, _ in struct.iter_unpack("<IBBHQQ", syms):
        end = strs.find(b"\0", name)
        if name < len(strs) and end > 0:
            out.append((strs[name:end], shndx, value))
    return out


def symbols(fd: int, size: int, what: str, names: set[bytes]) -> tuple[list[tuple], dict[bytes, tuple[int, int]]]:
    """The section headers and ``name -> (value, section index)`` of the wanted symbols
    (from ``.dynsym``, else ``.symtab``); a BundleError if any is missing."""
    secs = sections(fd, size, what)
    for kind in (SHT_DYNSYM, SHT_SYMTAB):
        table = symbol_table(fd, size, what, secs, kind)
        if table is None:
            continue
        found = {name: (value, shndx) for name, shndx, value in table if name in names}
        if len(found) == len(names):
            return secs, found
    raise _bad(what, f"it lacks the symbols {b', '.join(sorted(names)).decode()}")


#: (device, inode, size, mtime, symbol) -> imports_symbol's answer: a .so is read once per process
_imports: dict[tuple, bool | None] = {}


def imports_symbol(path: str | os.PathLike[str], name: str) -> bool | None:
    """Whether the .so at ``path`` imports ``name`` (an undefined symbol of its ``.dynsym``);
    None where it is not an ELF file this can read. Remembered per file (its identity and
    mtime), so loading a method again does not read its tables again."""
    try:
        fd, st = open_regular(Path(path), "shared object")
    except BundleError:
        return None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, name)
    try:
        if key in _imports:
            return _imports[key]
        what = f"shared object {path}"
        raw = _raw_table(fd, st.st_size, what, sections(fd, st.st_size, what), SHT_DYNSYM)
    except BundleError:
        return None
    finally:
        os.close(fd)
    found: bool | None = None
    if raw is not None:
        syms, strs = raw
        # every offset where the name ends a string (the table shares suffixes), then one pass
        # over the entries for an undefined symbol named at one of them
        want, at, found = name.encode() + b"\0", set(), False
        i = strs.find(want)
        while i >= 0:
            at.add(i)
            i = strs.find(want, i + 1)
        if at:
            found = any(shndx == 0 and off in at for off, _, _, shndx, _, _ in struct.iter_unpack("<IBBHQQ", syms))
    _imports[key] = found
    return found


def embedded_constants(so: Path, need: int) -> tuple[int, int]:
    """Where an AOTI .so built with ``package_constants_in_so=True`` keeps its weights.

    They are a ``binary_blob`` (each constant's storage in index order, at prefix sums of
    ``GetConstantDataSize``) between its symbols ``_binary_constants_bin_start`` and ``_end``,
    or, for a .so built with ``force_mmap_weights``, appended to the file (those 16 bytes then
    hold its size and a magic number, which must match the file's last 8 bytes).

    Args:
        so: the .so file.
        need: the sum of its constants' ``GetConstantDataSize``.

    Returns:
        ``(file offset, size)`` of the blob in the .so.

    Raises:
        BundleError: the .so is not a sound 64-bit little-endian ELF file, or holds fewer bytes
            than ``need``.

    Example:
        >>> at, n = embedded_constants(Path("model.so"), need=25088)
    """
    what = f"shared object {so}"
    fd, st = open_regular(so, "shared object")
    try:
        size = st.st_size
        sections, syms = symbols(fd, size, what, {b"_binary_constants_bin_start", b"_binary_constants_bin_end"})
        (start, sec), (end, sec_end) = syms[b"_binary_constants_bin_start"], syms[b"_binary_constants_bin_end"]
        if sec != sec_end or not 0 < sec < len(sections):
            raise BundleError(f"{what}: its constants symbols are not in one section; the .so is corrupt")
        _, kind, _, addr, offset, length, *_ = sections[sec]
        if kind != 1 or not addr <= start <= end <= addr + length or offset + length > size:
            raise BundleError(f"{what}: its constants symbols lie outside their section's bytes; the .so is corrupt")
        at, n = offset + (start - addr), end - start
        if need <= n:
            return at, n
        if n == 16:                            # force_mmap_weights: [size + 8, magic], weights at the end
            total, magic = struct.unpack("<QQ", pread_all(fd, 16, at, what))
            tail = pread_all(fd, 8, size - 8, what) if size >= 8 else b""
            if 8 + need <= total <= size and (size - total) % 16384 == 0 and tail == struct.pack("<Q", magic):
                return size - total, total - 8
        raise BundleError(f"{what} embeds {n} bytes of constants but its constants need {need}; the .so is "
                          f"corrupt or was built in a way aoti_rt does not know")
    finally:
        os.close(fd)
