"""The ``.pt2`` extraction cache: the files aoti_rt extracts from packages (a model's .so,
kernel binaries, metadata) and the probe record of each package, under :func:`cache_root`::

    <root>/<sha256>/          one extraction: the files of one AOTI model, content-addressed
    <root>/records/<key>.json one package file's probe result (see :class:`ModelRecord`)

Whatever is found there is run (a .so is ``dlopen``-ed, its constructors with it) or bound,
so the cache is input as untrusted as the package, and used under these rules:

* **Only a cache no other user can write is used.** The root, its ``records`` folder and
  every extraction folder must be owned by the current (effective) user and not writable
  by group or others, and each folder above the root owned by that user or root and not
  writable by others unless it is sticky (``/tmp``): the rule ssh applies to ``~/.ssh``.
  aoti_rt creates its folders 0700 and its files 0600. Anything else is **refused** with a
  :class:`~aoti_rt.errors.BundleError` naming the path and the fix (``chmod 700`` it, or set
  ``AOTI_RT_CACHE`` to a directory only you can write). Refused rather than replaced by a
  private temporary extraction: a fallback would extract and probe the package again on
  every load (seconds, and disk space each time) and leave in place a misconfiguration that
  may already have let another user's files in; an error is fixed once. A record file that
  is not the user's own is ignored and rewritten (it is only a cache).
* **Ownership is not integrity.** Each extracted file is checked, in the process that uses
  it and right before, against the CRC-32 the package's central directory declares for it
  (recorded with the probe): opened without following links, its type, owner and size taken
  from that descriptor, its bytes hashed through it, in a folder only its owner can write,
  so the file checked is the file ``dlopen`` then maps. A folder whose files do not match
  (edited, replaced, damaged) is extracted again; one whose check fails under a load is a
  ``BundleError`` that says to load again.
* **Nothing is left behind.** An extraction is written to a temporary folder and renamed
  into place; a temporary folder, and an extraction this load created for a package that
  is then refused, are removed on every failure path (exceptions and ``KeyboardInterrupt``).
  How much an archive may extract is capped by :meth:`aoti_rt.archive.Archive.check_inflation`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .archive import CHUNK, SAFE_NAME, Archive, Entry
from .bundle import MANIFEST_MAX_BYTES, MethodSpec, WeightSpec, parse_method_and_weights, pread_all, strict_json
from .errors import AotiRtError, BundleError

#: the version of the probe records written under ``<cache>/pt2/records/``
RECORD_VERSION = 3
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def cache_root() -> Path:
    """Where extracted package files and probe records live: ``$AOTI_RT_CACHE/pt2``, else
    ``$XDG_CACHE_HOME/aoti_rt/pt2``, else ``~/.cache/aoti_rt/pt2``."""
    base = os.environ.get("AOTI_RT_CACHE")
    if base:
        return Path(base) / "pt2"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aoti_rt" / "pt2"


# -- who may write the cache -----------------------------------------------------------------

def _not_private(st: os.stat_result) -> str | None:
    """Why a file or folder with this stat is not the user's own (None if it is)."""
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit)
        return f"writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _refused(path: Path | str, why: str, kind: str = "folder") -> BundleError:
    return BundleError(f"aoti_rt's package cache {kind} {path} is {why}: another user could put code there that "
                       f"your loads would run, so aoti_rt does not use it. Make it yours and private (chown it "
                       f"to yourself, chmod 700 {path}), or set AOTI_RT_CACHE to a directory only you can write")


def _check_ancestors(root: Path) -> None:
    """Each folder above ``root`` (as written and as resolved) must be owned by the user or
    root and not writable by others unless sticky: otherwise its owner could swap the root."""
    seen: set[str] = set()
    for p in (root.absolute(), Path(os.path.realpath(root))):
        for a in p.parents:
            if str(a) in seen:
                continue
            seen.add(str(a))
            st = os.stat(a)
            if st.st_uid not in (0, os.geteuid()):
                raise _refused(root, f"inside {a}, which is owned by uid {st.st_uid}")
            if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                raise _refused(root, f"inside {a}, which others can write (mode {stat.S_IMODE(st.st_mode):o}) "
                                     f"and is not sticky")


def _private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) 0700 if missing; check it is a folder that is
    the user's own and private. A folder aoti_rt cannot create is an AotiRtError."""
    missing = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        for p in reversed(missing):
            try:
                os.mkdir(p, 0o700)
            except FileExistsError:
                pass
        st = os.stat(path)
    except OSError as e:
        raise AotiRtError(f"cannot create aoti_rt's package cache under {path} ({e}); set AOTI_RT_CACHE "
                          f"or XDG_CACHE_HOME to a writable directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _refused(path, "not a folder")
    why = _not_private(st)
    if why:
        raise _refused(path, why)
    return path


def private_root() -> Path:
    """The cache root, created 0700 if missing, refused unless no other user can write it."""
    root = _private_dir(cache_root())
    _check_ancestors(root)
    return root


# -- probe records ---------------------------------------------------------------------------

@dataclass
class ModelRecord:
    """What aoti_rt knows about one model of a package after probing it (cached per package)."""

    name: str
    device: str                  # AOTI_DEVICE_KEY from its metadata ("cpu", "cuda"; "" unknown)
    dir: str                     # its extraction folder under cache_root(): a SHA-256 of the files
    files: dict[str, tuple[int, int]]   # extracted file -> (size, CRC-32 the package declares)
    so: str                      # the model .so among files
    store: str | None            # weights read from the package itself (None) or from this file in dir
    embedded: bool               # weights embedded in the .so (AOTI loads a private copy on create)
    method: MethodSpec
    weights: dict[str, WeightSpec]

    def folder(self) -> Path:
        return cache_root() / self.dir


def fingerprint(path: Path) -> dict:
    """The identity a probe record is keyed to: the package file's device, inode, size and
    mtime, and the torch that probed it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise BundleError(f"cannot read package {path} ({e})") from None
    import torch

    return {"pt2": identity(st), "torch": torch.__version__, "version": RECORD_VERSION}


def identity(st: os.stat_result) -> list[int]:
    """What a probe record knows its package file by: device, inode, size, mtime."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def record_path(path: Path) -> Path:
    return cache_root() / "records" / f"{hashlib.sha256(os.fsencode(os.path.abspath(path))).hexdigest()[:32]}.json"


def _read_private(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file the user owns and only the user can write (None otherwise:
    missing, a link, another user's, larger than ``limit``)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or _not_private(st) or st.st_size > limit:
            return None
        return pread_all(fd, st.st_size, 0, path)
    except (OSError, BundleError):
        return None
    finally:
        os.close(fd)


def parse_record(m: Any, where: str) -> ModelRecord:
    spec, table = parse_method_and_weights(m["method"], m["weights"], where)
    files = m["files"]
    ok = (type(m["name"]) is str and SAFE_NAME.fullmatch(m["name"]) and type(m["dir"]) is str
          and re.fullmatch(r"[0-9a-f]{64}", m["dir"]) and type(files) is dict
          and all(type(f) is str and SAFE_NAME.fullmatch(f) and type(v) in (list, tuple) and len(v) == 2
                  and all(type(n) is int for n in v) and v[0] >= 0 and 0 <= v[1] < 1 << 32
                  for f, v in files.items())
          and spec.so in files and m["so"] == spec.so and m["device"] in ("", "cpu", "cuda")
          and (m["store"] is None or m["store"] in files) and type(m["embedded"]) is bool)
    if not ok:
        raise BundleError(f"{where}: malformed record")
    files = {f: (v[0], v[1]) for f, v in files.items()}
    return ModelRecord(m["name"], m["device"], m["dir"], files, spec.so, m["store"], m["embedded"], spec, table)


def cached_record(path: Path, fp: dict) -> list[ModelRecord] | None:
    """The probe record of this package file if it is the user's own, current, passes the
    manifest's checks and its extraction folders hold the package's bytes; None otherwise
    (the package is then probed again)."""
    root = private_root()
    _private_dir(root / "records")
    rp = record_path(path)
    data = _read_private(rp, MANIFEST_MAX_BYTES)
    if data is None:
        return None
    try:
        raw = strict_json(data, str(rp), MANIFEST_MAX_BYTES)
    except BundleError:
        return None
    if not isinstance(raw, dict) or raw.get("fingerprint") != fp or type(raw.get("models")) is not list:
        return None
    out = []
    size = fp["pt2"][2]
    for m in raw["models"]:
        try:
            rec = parse_record(m, str(rp))
        except (BundleError, TypeError, ValueError, KeyError, AttributeError):
            return None
        limit = size if rec.store is None else rec.files[rec.store][0]
        if any(w.offset + w.nbytes > limit for w in rec.weights.values()) or check_folder(rec.folder(), rec.files):
            return None
        out.append(rec)
    return out or None


def write_record(p: Path, fp: dict, records: list[ModelRecord]) -> None:
    rp = record_path(p)
    body = {"fingerprint": fp, "package": str(p.resolve()),
            "models": [{**asdict(r), "method": asdict(r.method),
                        "weights": {k: asdict(w) for k, w in r.weights.items()}} for r in records]}
    try:
        _private_dir(rp.parent)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=rp.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(body))
            os.replace(tmp, rp)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except (OSError, AotiRtError):
        pass                               # not cached: the next load probes again


# -- extraction folders ----------------------------------------------------------------------

def _open_folder(folder: Path) -> int:
    """A descriptor of an extraction folder (not followed if a link), refused unless private.
    Raises OSError if it is missing."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        why = _not_private(os.fstat(fd))
        if why:
            raise _refused(folder, f"{why}; delete it and load again")
    except BaseException:
        os.close(fd)
        raise
    return fd


def crc32_fd(fd: int, size: int) -> int:
    """The CRC-32 of the first ``size`` bytes of an open file (read through that descriptor)."""
    buf = bytearray(min(size, CHUNK))
    view = memoryview(buf)
    value, at = 0, 0
    while at < size:
        got = os.preadv(fd, [view[:min(size - at, CHUNK)]], at)
        if not got:
            break
        value = zlib.crc32(view[:got], value)
        at += got
    return value


#: files this process checked: (device, inode) -> (size, mtime, ctime, CRC-32). A file whose
#: inode is unchanged since (any write or rename sets its ctime, which only the clock sets)
#: is not hashed again: a second load in a process costs a few fstat calls.
_CHECKED: dict[tuple[int, int], tuple[int, int, int, int]] = {}


def _check_files(dfd: int, files: dict[str, tuple[int, int]]) -> str | None:
    """What is wrong with the files of the folder open as ``dfd`` (None: each is a regular
    file of the user's own, of its recorded size and CRC-32)."""
    for f, (size, crc) in files.items():
        try:
            fd = os.open(f, _OPEN_FLAGS, dir_fd=dfd)
        except OSError as e:
            return f"{f}: {e.strerror}"
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return f"{f} is not a regular file"
            why = _not_private(st)
            if why:
                return f"{f} is {why}"
            if st.st_size != size:
                return f"{f} has {st.st_size} bytes, the package's has {size}"
            key, seen = (st.st_dev, st.st_ino), (size, st.st_mtime_ns, st.st_ctime_ns, crc)
            if _CHECKED.get(key) != seen:
                if crc32_fd(fd, size) != crc:
                    return f"{f} does not match the package's CRC-32"
                _CHECKED[key] = seen
        except OSError as e:
            return f"{f}: {e.strerror}"
        finally:
            os.close(fd)
    return None


def check_folder(folder: Path, files: dict[str, tuple[int, int]]) -> str | None:
    """None if ``folder`` holds exactly the package's bytes of each file; what is wrong
    otherwise ("missing" if there is no folder). A folder that is not the user's own and
    private is refused (BundleError)."""
    try:
        dfd = _open_folder(folder)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"cannot open it ({e.strerror})"
    try:
        return _check_files(dfd, files)
    finally:
        os.close(dfd)


def _remove(folder: Path) -> None:
    """Move a folder aside (under a temporary name, atomically) and delete it."""
    aside = Path(tempfile.mkdtemp(prefix=".tmp-old-", dir=folder.parent))
    try:
        os.rename(folder, aside / "x")
    except OSError:
        pass
    shutil.rmtree(aside, ignore_errors=True)


def extract(arc: Archive, entries: dict[str, Entry]) -> tuple[str, dict[str, tuple[int, int]], bool]:
    """Extract ``entries`` into a content-addressed folder under cache_root(); returns the
    folder's name, the files' sizes and CRC-32s, and whether this call created the folder.
    Written under a temporary name and renamed into place; a folder that exists with exactly
    those bytes is reused, one that does not is replaced."""
    arc.check_inflation(entries.values())
    base = private_root()
    try:
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
    except OSError as e:
        raise AotiRtError(f"cannot create aoti_rt's package cache under {base} ({e}); set AOTI_RT_CACHE "
                          f"or XDG_CACHE_HOME to a writable directory") from None
    try:
        files, digests = {}, {}
        for f, e in sorted(entries.items()):
            fd = os.open(staging / f, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                digests[f] = arc.copy(e, fd)    # size and CRC-32 checked while copying
                os.fsync(fd)
            finally:
                os.close(fd)
            files[f] = (e.file_size, e.crc)
        h = hashlib.sha256()
        for f in sorted(digests):
            h.update(f"{f}\0{files[f][0]}\0{digests[f]}\n".encode())
        name = h.hexdigest()
        final = base / name
        wrong = check_folder(final, files)
        if wrong is None:
            return name, files, False
        if wrong != "missing":
            _remove(final)                      # edited, replaced or damaged: extracted anew
        try:
            os.rename(staging, final)
            return name, files, True
        except OSError:
            if check_folder(final, files) is None:   # another process's finished copy
                return name, files, False
            raise AotiRtError(f"aoti_rt's package cache folder {final} is damaged; delete it and "
                              f"load again") from None
    except OSError as e:
        raise AotiRtError(f"cannot write aoti_rt's package cache under {base} ({e}); free disk space or "
                          f"set AOTI_RT_CACHE to a writable directory") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def discard(folder: Path) -> None:
    """Remove an extraction folder this load created for a package it then refused, unless
    a loaded model holds it (another process reusing the same files)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return
    else:
        _remove(folder)
    finally:
        os.close(fd)


def hold(folder: Path, files: dict[str, tuple[int, int]]) -> int:
    """A shared lock on an extraction folder for as long as a model from it is loaded (AOTI
    loads CUDA kernels from it lazily, at their first launch): :func:`prune_cache` never
    removes a folder someone holds. Each file is checked against the package's CRC-32 under
    the lock, right before the .so is opened. Returns the descriptor that holds it."""
    try:
        fd = _open_folder(folder)
    except OSError as e:
        raise BundleError(f"aoti_rt's package cache folder {folder} is gone ({e}); load again (it is "
                          f"extracted anew)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        wrong = _check_files(fd, files)
    except BaseException:
        os.close(fd)
        raise
    if wrong:
        os.close(fd)
        raise BundleError(f"aoti_rt's package cache folder {folder} changed while loading ({wrong}: removed by "
                          f"a prune_cache, or edited); load again (it is extracted anew)")
    return fd


def copy_range(fd: int, offset: int, n: int) -> Path:
    """A temporary file in the cache holding bytes ``[offset, offset + n)`` of ``fd`` (a blob
    for the probe)."""
    out, path = tempfile.mkstemp(prefix=".probe-", dir=private_root())
    try:
        done = 0
        while done < n:
            if hasattr(os, "copy_file_range"):
                got = os.copy_file_range(fd, out, min(n - done, 1 << 30), offset + done)
            else:
                got = os.write(out, pread_all(fd, min(n - done, CHUNK), offset + done, "package"))
            if got <= 0:
                raise BundleError(f"the package is truncated: its weights blob ends at byte {offset + done}")
            done += got
    except BaseException:
        os.close(out)
        Path(path).unlink(missing_ok=True)
        raise
    os.close(out)
    return Path(path)


# -- pruning ---------------------------------------------------------------------------------

@dataclass
class CacheReport:
    """What :func:`prune_cache` found under :func:`cache_root` and removed (or would remove)."""

    root: Path
    #: extraction folders and their bytes, before pruning
    folders: int = 0
    folder_bytes: int = 0
    #: probe records, before pruning
    records: int = 0
    #: records of packages that are gone or changed since they were probed
    stale_records: list[Path] = field(default_factory=list)
    #: folders no current record names (and left-over temporary folders), old enough to go
    unused_folders: list[Path] = field(default_factory=list)
    #: unused folders a loaded model still holds, or younger than ``min_age_s``: kept
    kept: list[Path] = field(default_factory=list)
    #: bytes of the removed folders
    freed_bytes: int = 0
    dry_run: bool = False


def _tree_bytes(folder: Path) -> int:
    n = 0
    for dirpath, _, names in os.walk(folder):
        for f in names:
            try:
                n += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return n


def _record_is_current(raw: Any) -> bool:
    """Whether a probe record's package still is the file it was probed from."""
    try:
        package = raw["package"]
        return type(package) is str and raw["fingerprint"]["pt2"] == identity(os.stat(package))
    except (OSError, KeyError, TypeError, ValueError):
        return False


def prune_cache(*, min_age_s: float = 3600.0, dry_run: bool = False) -> CacheReport:
    """Remove what the ``.pt2`` cache holds for packages that are gone or changed.

    A probe record whose package no longer is the file it was probed from (deleted,
    rewritten, moved) is removed; so is an extraction folder that no current record names,
    unless a loaded model holds it (a shared lock, taken for the life of each package
    method) or it is younger than ``min_age_s`` (a load may be extracting it right now).
    The cache of a package still in place is kept: the next load needs it. Any process may
    run this at any time (``python -m aoti_rt cache --prune``).

    Args:
        min_age_s: keep unused folders modified less than this many seconds ago.
        dry_run: only report what would be removed.

    Raises:
        BundleError: the cache root is not the user's own and private (see the module).
    """
    root = cache_root()
    report = CacheReport(root=root, dry_run=dry_run)
    if not root.is_dir():
        return report
    private_root()
    named: set[str] = set()
    records = root / "records"
    for rp in sorted(records.glob("*.json")) if records.is_dir() else []:
        report.records += 1
        data = _read_private(rp, MANIFEST_MAX_BYTES)
        try:
            raw = json.loads(data) if data is not None else None
        except ValueError:
            raw = None
        if isinstance(raw, dict) and _record_is_current(raw):
            for m in raw.get("models") or []:
                if isinstance(m, dict) and isinstance(m.get("dir"), str):
                    named.add(m["dir"])
            continue
        report.stale_records.append(rp)
        if not dry_run:
            rp.unlink(missing_ok=True)
    now = time.time()
    for folder in sorted(root.iterdir()):
        if folder.name == "records" or folder.is_symlink() or not folder.is_dir():
            continue
        report.folders += 1
        size = _tree_bytes(folder)
        report.folder_bytes += size
        if folder.name in named:
            continue
        try:
            if now - folder.stat().st_mtime < min_age_s:
                report.kept.append(folder)
                continue
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:                     # a loaded model holds it
                report.kept.append(folder)
                continue
            report.unused_folders.append(folder)
            report.freed_bytes += size
            if not dry_run:
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
    return report


__all__ = ["cache_root", "prune_cache", "CacheReport", "ModelRecord", "RECORD_VERSION"]
