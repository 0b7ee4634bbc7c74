"""Load PyTorch ``.pt2`` packages as a :class:`~aoti_rt.runtime.Model` that shares the weight cache.

A ``.pt2`` (``torch._inductor.aoti_compile_and_package``, ``torch._inductor.package.package_aoti``)
is a zip archive written by PyTorch's ``PyTorchFileWriter``: every entry stored uncompressed
(64-byte aligned) under one root folder, with each AOTI model ``<name>`` under
``<root>/data/aotinductor/<name>/``: its ``.so`` and, depending on how it was compiled, its
weights

* inside the .so (``aot_inductor.package_constants_in_so=True``, the default): the
  ``binary_blob`` layout between the symbols ``_binary_constants_bin_start`` and
  ``_binary_constants_bin_end`` (or appended to the file, for ``force_mmap_weights``);
* in a ``*_weights.blob`` entry beside it (``package_constants_on_disk_format="binary_blob"``);
* as ``<root>/data/weights/weight_N`` entries (``"pickle_weights"``): each a ``torch.save``
  zip whose one storage record is stored, named per FQN by the model's ``weights_config.json``.

What aoti_rt does with a package, once per package file (the result is cached):

1. parse the zip's central directory and check every entry (names that would escape a folder,
   entries past the end of the file, encryption, duplicates: :class:`BundleError`), with
   :class:`aoti_rt.archive.Archive`;
2. extract only what the .so needs on disk (the .so, kernel binaries, metadata: never the
   weights or the C++ sources) into a content-addressed directory,
   ``$XDG_CACHE_HOME/aoti_rt/pt2/<sha256>/`` (or ``$AOTI_RT_CACHE/pt2/``), written under a
   temporary name and renamed into place, and reused by every later load. The cache is
   untrusted too (:mod:`aoti_rt.pt2cache`): used only if no other user can write it, each
   extracted file checked against the package's CRC-32 right before it is used, an archive's
   extraction capped against zip bombs, nothing left behind by a refused package;
3. probe the .so once with torch's own AOTI runner (:func:`aoti_rt.probe.probe_method`, as
   :func:`aoti_rt.load_method` does) for each constant's view and bytes, find where those
   bytes lie in the archive (the blob's or the .so's ``binary_blob`` layout), and check that
   they hash to what AOTI itself loaded: a layout aoti_rt misunderstands is refused, never
   bound. A ``pickle_weights`` .so cannot load its weights itself (torch's loader binds them
   from Python): its constants' names, dtypes, kinds and sizes come from the .so's C ABI and
   their views from ``weights_config.json``, exactly what torch's own loader binds, checked to
   fit in the stored bytes;
4. record the result (keyed to the archive's device, inode, size and mtime and the torch
   version, checked like a manifest when read back: a stale or edited record is probed
   again, never bound) under ``<cache>/pt2/records/``.

Each load then reads only the record and the weights its methods need, with the same loader
and checks as bundles (:func:`aoti_rt.loader.read_weights`), straight from the ``.pt2`` file
at each stored entry's offset (``pread``, no extraction); a weight blob or .so that was
re-zipped with compression is read from its decompressed copy in the cache directory, and
compressed pickled weights are refused.

Weights embedded in the .so: AOTI's ``CreateWithDevice`` copies them into a private buffer
before anything else can run (torch 2.13 has no entry point that skips it). aoti_rt makes
that copy the inactive constant buffer (``SwapConstantBuffer``), frees it
(``FreeInactiveConstantBuffer``) and swaps back before it loads anything, then binds the shared
cache's buffers: the copy costs a transient peak of one method's weights while its container
is created, and nothing after.

Without the exported program there is no record of which buffers a method writes in place,
so every buffer is treated as mutable state (as :mod:`aoti_rt.stock` does): shared by FQN
(and initial contents) among the methods of one loaded :class:`PackageModel`, whether they
come from one package or several, and never across two loads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple, Union

from . import device as _device, elf
from .archive import JSON_MAX, SAFE_NAME, STORED, Archive, Entry, check_stored
from .abi import blob_bytes_needed, describe
from .bundle import (DTYPE_NAMES, MAX_INT, MAX_RANK, ConstantSpec, FixedInput, InputSpec, Manifest, MethodSpec,
                     WeightSpec, is_regular_file, strict_json, weight_id)
from .input_checks import record_inputs
from .device import Device
from .digest import file_digests
from .errors import AOTIError, AotiRtError, BundleError, CompileError
from .acquire import Verify, weight_source
from .binders import MethodFiles
from .probe import FileSpan, Probed, Where, blob_offsets, probe_method
from .runtime import Method, Model, device_for
from .views import whole_storages
# the extraction cache; names kept here for the modules and tests that import them from package
from .pt2cache import (RECORD_VERSION, CacheReport, ModelRecord, cache_root, cached_record as _cached_record,
                       copy_range as _copy_range, discard as _discard, extract as _extract,
                       fingerprint as _fingerprint, hold as _hold, parse_record as _parse_record, prune_cache,
                       record_path as _record_path, write_record as _write_record)

#: what ``load`` accepts for packages: a path, or method name -> path or (path, model name)
PackageSpec = Union[str, "os.PathLike[str]",
                    Mapping[str, Union[str, "os.PathLike[str]", "tuple[str | os.PathLike[str], str]"]]]

_AOTI_DIR = "data/aotinductor/"
_WEIGHTS_DIR = "data/weights/"
_WEIGHTS_CONFIG = "weights_config.json"
#: files of a model folder that the .so never reads (weights are read in place)
_NOT_EXTRACTED = (".cpp", ".h", ".hpp", ".S")
#: the storage record of a torch.save zip
_STORAGE = re.compile(r"[^/]+/data/[0-9]+")


# -- probing a package -----------------------------------------------------------------------

def _models(arc: Archive) -> dict[str, dict[str, Entry]]:
    """model name -> {file name: entry} of each folder under ``data/aotinductor/``, in archive
    order. Names must be plain file names (they become paths in the cache)."""
    prefix = f"{arc.root()}/{_AOTI_DIR}"
    out: dict[str, dict[str, Entry]] = {}
    for name, e in arc.entries.items():
        if not name.startswith(prefix):
            continue
        model, _, rest = name[len(prefix):].partition("/")
        if not rest or "/" in rest:
            continue            # a folder entry, or a nested file no .so looks for
        for part, kind in ((model, "model name"), (rest, "file name")):
            if not SAFE_NAME.fullmatch(part):
                raise BundleError(f"{arc.what}: {kind} {part!r} (entry {name!r}) is not a plain file "
                                  f"name aoti_rt can use; the archive is crafted or corrupt")
        out.setdefault(model, {})[rest] = e
    return out


def _device_key(arc: Archive, files: dict[str, Entry]) -> str:
    """AOTI_DEVICE_KEY of a model from its ``*_metadata.json`` files ("" if none says)."""
    keys = set()
    for f, e in files.items():
        if f.endswith("_metadata.json"):
            meta = strict_json(arc.read_small(e), f"{arc.what}: {e.name}", JSON_MAX)
            key = meta.get("AOTI_DEVICE_KEY") if isinstance(meta, dict) else None
            if isinstance(key, str) and key:
                keys.add(key)
    if len(keys) > 1:
        raise BundleError(f"{arc.what}: the metadata of one model names devices {sorted(keys)}; re-create it")
    key = keys.pop() if keys else ""
    if key not in ("", "cpu", "cuda"):
        raise BundleError(f"{arc.what}: a model was compiled for {key!r}; aoti_rt runs cpu and cuda models")
    return key


class _Pickled(NamedTuple):
    offset: int                  # absolute, in the package
    nbytes: int
    shape: list[int]
    stride: list[int]
    storage_offset: int


def _ints(v: Any, rank: bool) -> bool:
    return type(v) is list and len(v) <= MAX_RANK and all(type(x) is int and 0 <= x < MAX_INT for x in v) \
        if rank else type(v) is int and 0 <= v < MAX_INT


def _pickled_storages(arc: Archive, root: str, config: Entry, what: str) -> dict[str, _Pickled]:
    """FQN -> its storage in the archive and its view, for ``pickle_weights``: the model's
    ``weights_config.json`` maps each FQN to ``[file, shape, stride, storage offset]``, the file
    a ``torch.save`` zip stored under ``data/weights/`` whose one storage record is stored too.
    These views are what torch's own loader binds (the .so cannot load such weights itself)."""
    cfg = strict_json(arc.read_small(config), f"{what}: {_WEIGHTS_CONFIG}", JSON_MAX)
    if type(cfg) is not dict:
        raise BundleError(f"{what}: {_WEIGHTS_CONFIG} is not an object; the package is corrupt")
    storages: dict[str, tuple[int, int]] = {}
    records: list[tuple[Archive, Entry, str]] = []      # each storage record, CRCs checked at the end
    out = {}
    for fqn, row in cfg.items():
        if not (type(row) is list and len(row) == 4 and type(row[0]) is str and SAFE_NAME.fullmatch(row[0])
                and _ints(row[1], True) and _ints(row[2], True) and len(row[1]) == len(row[2])
                and _ints(row[3], False)):
            raise BundleError(f"{what}: {_WEIGHTS_CONFIG} entry {fqn!r} is not [file, shape, stride, offset]; "
                              f"the package is corrupt")
        file = row[0]
        if file not in storages:
            e = arc.entries.get(f"{root}/{_WEIGHTS_DIR}{file}")
            if e is None:
                raise BundleError(f"{what}: {_WEIGHTS_CONFIG} names {_WEIGHTS_DIR}{file} for {fqn!r}, which the "
                                  f"archive lacks; the package is incomplete: re-create it")
            start, n = arc.stored(e, f"weights file {file}")
            inner = Archive(arc.path, arc.fd, start, n, f"{arc.what}: {e.name}")
            recs = [r for name, r in inner.entries.items() if _STORAGE.fullmatch(name)]
            if len(recs) != 1:
                raise BundleError(f"{inner.what} holds {len(recs)} tensor storages; aoti_rt reads weights "
                                  f"saved one storage per file, as torch packages them")
            storages[file] = inner.stored(recs[0], f"the storage of weights file {file}")
            records.append((inner, recs[0], f"the storage of weights file {file}"))
        out[fqn] = _Pickled(*storages[file], row[1], row[2], row[3])
    check_stored(records)
    return out


def _pickled_constants(arc: Archive, so: Path, device: Device, storages: dict[str, _Pickled],
                       what: str) -> tuple[list[tuple[ConstantSpec, int]], Any, list[int]]:
    """The constants of a ``pickle_weights`` .so: names, dtypes, kinds and sizes from its C ABI,
    views from ``weights_config.json``, digests of the stored bytes."""
    d = describe(so, device)                     # no weights in the .so: allocates none
    infos, call_spec = d.constants, d.call_spec
    ranges = sorted({(p.offset, p.nbytes) for p in storages.values()})
    digests = dict(zip(ranges, file_digests(arc.fd, ranges)))
    out, at = [], []
    for info in infos:
        if info.folded:
            continue                 # computed by the .so from the others at its first run
        p = storages.get(info.fqn)
        if p is None:
            raise BundleError(f"{what}: {_WEIGHTS_CONFIG} has no entry for constant {info.fqn}; the package is "
                              f"incomplete: re-create it")
        if info.dtype_code not in DTYPE_NAMES:
            raise BundleError(f"{what}: constant {info.fqn} has dtype code {info.dtype_code}, which aoti_rt "
                              f"does not know")
        c = ConstantSpec(name=info.name, fqn=info.fqn, dtype=DTYPE_NAMES[info.dtype_code], shape=list(p.shape),
                         stride=list(p.stride), storage_offset=p.storage_offset, data_size=info.data_size or p.nbytes,
                         kind=info.kind, mutable=False, digest=digests[(p.offset, p.nbytes)], weight="")
        if c.extent > p.nbytes or c.data_size > -(-max(p.nbytes, 1) // 64) * 64:
            raise BundleError(f"{what}: constant {info.fqn} ({c.dtype}{c.shape}, {c.data_size} bytes in the .so) "
                              f"does not fit its pickled storage of {p.nbytes} bytes; the package's weights and "
                              f".so disagree")
        out.append((c, p.nbytes))
        at.append(p.offset)
    return out, call_spec, at


def _probe(so: Path, blob: Path | None, device: Device, what: str, weights: Where
           ) -> tuple[list[tuple[ConstantSpec, int]], Any, list[tuple[Path, int] | None], Probed]:
    """Each constant's view and byte count as torch's own AOTI runner holds it, the call spec,
    where each constant's digest was hashed from ((file, offset), None: from the device), and
    the whole probe (what the .so keeps, its blob layout); ``weights``: where the weights lie
    (see :func:`aoti_rt.probe.probe_method`)."""
    try:
        probed = probe_method(so, blob, str(device), mutated=set(), weights=weights)
        consts = probed.constants
        hashed = [(d.file.path, d.offset) if isinstance(d, FileSpan) else None for _, d in consts]
        return (whole_storages([(c, len(data)) for c, data in consts], hashed, what), probed.call_spec, hashed,
                probed)
    except CompileError as e:
        raise BundleError(f"{what}: {e}") from None
    except AotiRtError:
        raise
    except RuntimeError as e:                 # torch's AOTI runner
        raise AOTIError(f"{what}: torch's AOTI runner could not load {so.name} ({e})") from None


def _probe_model(arc: Archive, root: str, name: str, files: dict[str, Entry], key: str,
                 device: Device, created: list[Path]) -> ModelRecord:
    """Extract and probe one model of a package; an extraction folder this call creates is
    appended to ``created`` (the caller removes those if the package is refused)."""
    what = f"{arc.what}: model {name!r}"
    sos = sorted(f for f in files if f.endswith(".so"))
    if len(sos) > 1:
        sos = [f for f in sos if f.endswith(".wrapper.so")] or sos
    if not sos:
        how = (" (it holds C++ sources only: aot_inductor.package_cpp_only); build it, or package it with "
               "torch._inductor.aoti_compile_and_package" if any(f.endswith(".cpp") for f in files) else "")
        raise BundleError(f"{what} has no compiled .so{how}; the package is incomplete")
    if len(sos) > 1:
        raise BundleError(f"{what} has {len(sos)} shared objects ({sos}) and aoti_rt cannot tell which is the "
                          f"model; re-create the package with aoti_compile_and_package")
    so_name = sos[0]
    blobs = [f for f in files if f.endswith("_weights.blob")]
    if len(blobs) > 1:
        raise BundleError(f"{what} has {len(blobs)} weight blobs; the package is corrupt")
    blob = files[blobs[0]] if blobs else None
    config = files.get(_WEIGHTS_CONFIG)
    pickled = blob is None and config is not None
    extract = {f: e for f, e in files.items()
               if not f.endswith(_NOT_EXTRACTED) and f != _WEIGHTS_CONFIG
               and not (e is blob and e.method == STORED)}
    folder_name, sizes, new = _extract(arc, extract)
    if new:
        created.append(cache_root() / folder_name)
    folder = cache_root() / folder_name
    so = folder / so_name
    so_entry = files[so_name]
    tmp: Path | None = None
    kept: list[str] = []                       # constants the .so keeps as its own (opaque)
    so_blob: list[int] = []                    # where it loads them from, outside the .so
    try:
        if blob is not None:                   # binary_blob: read in place, or from its inflated copy
            embedded = False
            if blob.method == STORED:
                store, (base, length) = None, arc.stored(blob, "weights blob")
                check_stored([(arc, blob, "weights blob")])   # a deflated one was checked inflating it
            else:
                store, base, length = blobs[0], 0, blob.file_size
            # torch's runner maps as many bytes as the .so says, whatever the file has
            need = blob_bytes_needed(so, device)
            if length < need:
                raise BundleError(f"{what}: its weights blob has {length} bytes but the .so reads {need}; the "
                                  f"package is truncated or corrupt: re-create or re-copy it")
            if store is None:                  # torch's runner loads a file: a copy; hashed in place
                tmp = probe_blob = _copy_range(arc.fd, base, need)
                consts, call_spec, hashed, probed = _probe(so, probe_blob, device, what,
                                                           lambda _: (arc.path, base, length))
            else:
                probe_blob = folder / blobs[0]
                consts, call_spec, hashed, probed = _probe(so, probe_blob, device, what,
                                                           lambda _: (probe_blob, 0, length))
            if probed.kept:                    # opaque: the .so loads them from its blob, whole
                kept, so_blob = [k.name for k in probed.kept], [base, need]
            at = _in_blob(consts, base, length, what, probed)
        elif pickled:                          # pickle_weights: each storage in place
            embedded, store = False, None
            storages = _pickled_storages(arc, root, config, what)
            consts, call_spec, at = _pickled_constants(arc, so, device, storages, what)
            hashed = [(arc.path, off) for off in at]     # digests of the stored bytes themselves
        else:                                  # embedded in the .so
            embedded = True
            in_so: dict[str, Any] = {}

            def where(need: int) -> tuple[Path, int, int]:   # hashed where the loader reads them
                in_so["need"], (start, length) = need, elf.embedded_constants(so, need)
                in_so["span"] = start, length
                if so_entry.method == STORED:
                    return arc.path, arc.data_offset(so_entry) + start, length
                return so, start, length

            consts, call_spec, hashed, probed = _probe(so, None, device, what, where)
            kept = [k.name for k in probed.kept]    # opaque: AOTI's embedded copy stays for them
            need = sum(probed.slots)
            if not consts:
                start, length = 0, 0
            elif in_so.get("need") == need:    # the probe's scan of the .so's symbols holds
                start, length = in_so["span"]
            else:                              # a .so that gives no data sizes: byte counts
                start, length = elf.embedded_constants(so, need)
            if so_entry.method == STORED:
                store, base = None, arc.data_offset(so_entry) + start
            else:
                store, base = so_name, start
            at = _in_blob(consts, base, length, what, probed)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    store_path = arc.path if store is None else folder / store
    # a digest the probe hashed from the very bytes the loader will read needs no second look
    again = [i for i, h in enumerate(hashed) if h != (store_path, at[i])]
    if again:
        _check_bytes(store_path, [consts[i] for i in again], [at[i] for i in again], what,
                     arc.fd if store is None else None)
    weights: dict[str, WeightSpec] = {}
    specs = []
    for (c, nbytes), offset in zip(consts, at):
        c.mutable = c.kind == "buffer"
        wid = weight_id(c.fqn, c.digest, c.mutable)
        w = weights.setdefault(wid, WeightSpec(id=wid, tensor=c.name, offset=offset, nbytes=nbytes,
                                               digest=c.digest, mutable=c.mutable, fqns=[]))
        if c.fqn not in w.fqns:
            w.fqns.append(c.fqn)
        c.weight = wid
        specs.append(c)
    ispec, ospec = call_spec if call_spec else (None, None)
    inputs, fixed = _input_checks(arc, root, name, files, so_name, ispec)
    spec = MethodSpec(so=so_name, inputs=inputs, outputs=[], in_spec=ispec, out_spec=ospec, constants=specs,
                      fixed_inputs=fixed, so_owned=kept, so_blob=so_blob)
    rec = {"name": name, "device": key, "dir": folder_name, "files": sizes, "so": so_name, "store": store,
           "embedded": embedded, "method": asdict(spec), "weights": {k: asdict(w) for k, w in weights.items()}}
    return _parse_record(rec, what)          # what a later load reads back passes the same checks


def _input_checks(arc: Archive, root: str, name: str, files: dict[str, Entry], so_name: str,
                  in_spec: str | None) -> tuple[list[InputSpec], list[FixedInput]]:
    """The inputs the .so's wrapper source (beside it) checks, and the exported program's
    fixed inputs and ranges where the package has it (:mod:`aoti_rt.input_checks`)."""
    def read(e: Entry | None) -> bytes | None:     # neither is needed to run: unreadable is absent
        try:
            return arc.read_small(e) if e is not None and e.file_size <= JSON_MAX else None
        except BundleError:
            return None

    source = read(files.get(so_name.removesuffix(".so") + ".cpp"))
    return record_inputs(source.decode("utf-8", "replace") if source is not None else None,
                         read(arc.entries.get(f"{root}/models/{name}.json")), in_spec)


def _in_blob(consts: list[tuple[ConstantSpec, int]], base: int, length: int, what: str,
             probed: Probed) -> list[int]:
    """Absolute offsets of the probed constants in a ``binary_blob`` of ``length`` bytes at
    ``base`` (the slots of constants the .so keeps lie between them)."""
    offsets = blob_offsets(probed, [n for _, n in consts])
    for (c, n), off in zip(consts, offsets):
        if off + n > length:
            raise BundleError(f"{what}: constant {c.fqn} needs bytes up to {off + n} of its weights, which "
                              f"have {length}; the package is truncated or corrupt")
    return [base + off for off in offsets]


def _check_bytes(store: Path, consts: list[tuple[ConstantSpec, int]], at: list[int], what: str,
                 fd: int | None = None) -> None:
    """The bytes at each recorded place must be what AOTI itself loaded (hashed once, at probe);
    read through ``fd`` where given (the package already open), else from ``store``."""
    try:
        got = file_digests(store if fd is None else fd, [(off, n) for (_, n), off in zip(consts, at)])
    except OSError as e:
        raise BundleError(f"{what}: cannot read its weights from {store} ({e})") from None
    for (c, _), d in zip(consts, got):
        if d != c.digest:
            raise BundleError(f"{what}: the bytes aoti_rt found for constant {c.fqn} in {store.name} are not the "
                              f"ones AOTI loaded; this package's weight layout is not one aoti_rt understands")


def inspect_package(path: str | os.PathLike[str], device: "str | Device | None" = None
                    ) -> tuple[list[ModelRecord], Device]:
    """Describe a ``.pt2`` package: one :class:`ModelRecord` per AOTI model, in archive order,
    and the device it loads on. Probes the package (once; later calls read the cached record).

    Args:
        path: the ``.pt2`` file.
        device: "cpu", "cuda" or "cuda:N"; default: the device its metadata names.

    Returns:
        ``(records, device)``.

    Raises:
        BundleError: the file is not a readable ``.pt2`` package, is crafted or corrupt (a zip
            bomb included), holds no AOTI model, or was compiled for another device type; or
            the cache directory is one another user can write. AOTIError: its .so cannot be
            loaded. AotiRtError: the cache directory is not writable.

    Example:
        >>> records, dev = aoti_rt.package.inspect_package("model.pt2")
        >>> [r.name for r in records]
        ['model']
    """
    p = Path(path)
    if not is_regular_file(p):
        raise BundleError(f"package {p} does not exist or is not a regular file")
    fp = _fingerprint(p)
    hit = _cached_record(p, fp)
    if hit is not None:
        return hit, _device_for(device, {r.name: r.device for r in hit}, p)
    with Archive.open(p) as arc:
        root = arc.root()
        fmt = arc.entries.get(f"{root}/archive_format")
        if fmt is None or arc.read_small(fmt, 64) != b"pt2":
            raise BundleError(f"{p} is a zip archive but not a .pt2 package (no archive_format 'pt2'); create "
                              f"one with torch._inductor.aoti_compile_and_package")
        models = _models(arc)
        if not models:
            raise BundleError(f"{p} holds no AOTInductor model (nothing under data/aotinductor/); compile it with "
                              f"torch._inductor.aoti_compile_and_package")
        keys = {name: _device_key(arc, files) for name, files in models.items()}
        dev = _device_for(device, keys, p)
        created: list[Path] = []
        try:
            records = [_probe_model(arc, root, name, files, keys[name], dev, created)
                       for name, files in models.items()]
        except BaseException:              # a refused package leaves no extraction behind
            for folder in created:
                _discard(folder)
            raise
    if _fingerprint(p) == fp:             # unchanged while probed: the record may be reused
        _write_record(p, fp, records)
    return records, dev


def _device_for(device: "str | Device | None", keys: dict[str, str], path: Path) -> Device:
    known = {k for k in keys.values() if k}
    dev = device_for(device, ("cuda" if "cuda" in known else "cpu") if known else None)
    for name, key in keys.items():
        if key and key != dev.kind:
            raise BundleError(f"{path}: model {name!r} was compiled for {key}; an AOTI .so runs only on the "
                              f"device type it was compiled for, so load it on {key}")
    return dev


# -- loading ---------------------------------------------------------------------------------

def parse_spec(packages: PackageSpec) -> dict[Path, list[tuple[str, str | None]]]:
    """Check a :data:`PackageSpec` and group it by package file: path -> [(method name, model
    name or None)], empty for a single path (every model of it is a method).

    Raises:
        BundleError: the spec is not a path or a non-empty mapping of method names (non-empty
            strings) to a path or ``(path, model name)``; the message names the bad entry.
    """
    def path_of(v: Any, where: str) -> Path:
        if isinstance(v, (str, os.PathLike)) and not isinstance(v, bytes):
            p = os.fspath(v)
            if isinstance(p, str) and p and "\x00" not in p:
                return Path(p)
        raise BundleError(f"{where}: {v!r} is not a .pt2 path; pass a path (str or os.PathLike) or "
                          f"(path, model name)")

    if not isinstance(packages, Mapping):
        return {path_of(packages, "packages"): []}
    if not packages:
        raise BundleError("no packages given: pass {'method': 'file.pt2', ...}")
    wanted: dict[Path, list[tuple[str, str | None]]] = {}
    for method_name, value in packages.items():
        if type(method_name) is not str or not method_name:
            raise BundleError(f"packages: method names must be non-empty strings, not {method_name!r}; "
                              f"pass {{'method': 'file.pt2', ...}}")
        where = f"packages[{method_name!r}]"
        if isinstance(value, tuple):
            if len(value) != 2 or type(value[1]) is not str or not value[1]:
                raise BundleError(f"{where}: {value!r} is not (path, model name): a pair of a .pt2 path and "
                                  f"the name of one model in it")
            path, model = path_of(value[0], where), value[1]
        else:
            path, model = path_of(value, where), None
        wanted.setdefault(path, []).append((method_name, model))
    return wanted


class PackageModel(Model):
    """A :class:`~aoti_rt.runtime.Model` made of the AOTI models of one or more ``.pt2`` packages.

    Its methods share one copy of each weight (by content, as bundles do) and one scope of
    mutable state: a buffer one method writes in place (a KV cache) is what the others read,
    whichever package each method came from; a second load gets its own.

    Attributes:
        packages: the package files, in the order their methods were loaded.
        manifest: a manifest-equivalent description (methods and weights, by content); each
            weight's offset refers to the store of the package its method came from.
    """

    def __init__(self, groups: Sequence[tuple[Path, list[tuple[str, ModelRecord]]]], device: Device, *,
                 progress: bool | None = None, verify: "Verify | bool | str" = Verify.ON_DEMAND,
                 max_load_gbps: float | None = None):
        self.packages = [p for p, _ in groups]
        rt = _device.get(device)
        self._start(None, rt)
        instance = None
        table: dict[str, WeightSpec] = {}
        try:
            for path, members in groups:
                per_store: dict[Path, dict[str, WeightSpec]] = {}
                for _, rec in members:
                    store = path if rec.store is None else rec.folder() / rec.store
                    per_store.setdefault(store, {}).update(rec.weights)
                sources = {}
                for store, weights in per_store.items():
                    sources[store] = weight_source(store, weights, verify=verify, instance=instance)
                    instance = sources[store].instance       # one instance for the whole model
                for method_name, rec in members:
                    store = path if rec.store is None else rec.folder() / rec.store
                    # the folder is held until the method closes: AOTI reads kernels from it lazily
                    files = MethodFiles(rec.folder() / rec.so, kernel_dir=rec.folder(), embedded=rec.embedded,
                                        hold=_hold(rec.folder(), rec.files), private_blob=False,
                                        compiled_views=True)
                    self._methods[method_name] = Method(
                        method_name, rec.method, files, sources[store], rt, progress=progress,
                        typed_inputs=False, max_load_gbps=max_load_gbps)
                    for wid, w in rec.weights.items():
                        table.setdefault(wid, w)
        except BaseException:
            self.close()
            raise
        self.manifest = Manifest(device=self.device, methods={n: m.spec for n, m in self._methods.items()},
                                 weights=table)
        self._warn_divergent()

    def __repr__(self) -> str:
        names = ", ".join(p.name for p in dict.fromkeys(self.packages))
        return f"<aoti_rt.Model {names} methods={self.methods} on {self.device}>"


def load_package(packages: PackageSpec, *, device: "str | Device | None" = None,
                 methods: Sequence[str] | None = None, progress: bool | None = None,
                 verify: "Verify | bool | str" = True, max_load_gbps: float | None = None) -> PackageModel:
    """Load ``.pt2`` packages as one model (what :func:`aoti_rt.load` does for a ``.pt2``).

    Args:
        packages: a ``.pt2`` path (one method per AOTI model in it, named after the model:
            ``"model"`` for ``aoti_compile_and_package``), or a mapping of method name to a
            ``.pt2`` path holding one model, or to ``(path, model name)``.
        device: "cpu", "cuda" or "cuda:N"; default: the device the packages were compiled for.
        methods: load only these methods (default: all).
        progress: show a progress bar while loading (as :func:`aoti_rt.load`).
        verify: as :func:`aoti_rt.load`: weights are shared with other packages and bundles
            (and between the packages of this model) once verified (``True``, default),
            verified while loading too (``"load"``), or never shared across packages (``False``).

    Returns:
        The :class:`PackageModel`; close it (or use ``with``) to release its memory.

    Raises:
        BundleError: a package is missing, not a ``.pt2``, crafted, truncated or corrupt,
            lacks a named model, or was compiled for another device type. AOTIError: a .so
            cannot be loaded or bound. AotiRtError: the cache directory is not writable.
            AllocationError, CudaError: see their docs.

    Example:
        >>> with aoti_rt.load({"prefill": "prefill.pt2", "decode": "decode.pt2"}) as lm:
        ...     logits = lm.prefill(tokens)         # fills the KV cache decode reads
        ...     step = lm.decode(token, pos)
    """
    verify = Verify.of(verify)
    wanted = parse_spec(packages)
    dev: "str | Device | None" = device
    groups = []
    for path, asked in wanted.items():
        records, dev = inspect_package(path, dev)
        by_name = {r.name: r for r in records}
        if not asked:                          # a single package: every model is a method
            asked = [(r.name, r.name) for r in records]
        members = []
        for method_name, model in asked:
            if model is None:
                if len(records) != 1:
                    raise BundleError(f"{path} holds models {list(by_name)}; name one: "
                                      f"{{{method_name!r}: ({str(path)!r}, {records[0].name!r})}}")
                model = records[0].name
            if model not in by_name:
                raise BundleError(f"{path} has no model {model!r}; it has {list(by_name)}")
            members.append((method_name, by_name[model]))
        groups.append((path, members))
    if methods is not None:
        every = [m for _, members in groups for m, _ in members]
        for m in methods:
            if m not in every:
                raise BundleError(f"the packages have no method {m!r}; they have {every}")
        groups = [(p, [(m, r) for m, r in members if m in methods]) for p, members in groups]
        groups = [(p, members) for p, members in groups if members]
    return PackageModel(groups, dev, progress=progress, verify=verify, max_load_gbps=max_load_gbps)


__all__ = ["load_package", "inspect_package", "parse_spec", "PackageModel", "ModelRecord",
           "cache_root", "prune_cache", "CacheReport", "PackageSpec"]
