"""Run a plain AOTI artifact (a ``.so`` plus its ``*_weights.blob``) without a bundle.

Stock ``torch._inductor.aot_compile`` with ``package_constants_on_disk_format="binary_blob"``
writes a .so and a header-less blob: each non-folded constant's storage bytes, in index order,
at offsets that are prefix sums of ``GetConstantDataSize``. The C ABI does not expose shapes or
strides, so the first load probes the artifact once with torch's own AOTI runner and caches
the result beside it (``<so>.aoti_rt.json``, or in the user cache directory if that is not
writable). Later loads read only that file and the weights they need.

Without the exported program there is no record of which buffers a method writes in place,
so every buffer is treated as mutable state, private to the loaded method.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from . import device as _device
from .abi import blob_bytes_needed
from .bundle import (MANIFEST_MAX_BYTES, MethodSpec, WeightSpec, is_regular_file,
                     parse_method_and_weights, read_manifest_bytes, strict_json, weight_id)
from .probe import blob_offsets, probe_method
from .device import Device
from .errors import BundleError
from .acquire import weight_source
from .runtime import Method, device_for

PROBE_VERSION = 2     # 2: b3t digests, records checked like manifests


def _cache_path(so: Path) -> list[Path]:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aoti_rt" / "probes"
    key = hashlib.sha256(str(so.resolve()).encode()).hexdigest()[:24]
    return [so.with_name(so.name + ".aoti_rt.json"), base / f"{key}.json"]


def _fingerprint(so: Path, blob: Path) -> dict:
    """The identity the cached probe is keyed to: both files' device, inode, size and mtime."""
    a, b = so.stat(), blob.stat()
    return {"so": [a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns],
            "blob": [b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns],
            "torch": torch.__version__, "probe_version": PROBE_VERSION}


def _cached_probe(path: Path, fp: dict, so: Path, blob: Path) -> tuple[MethodSpec, dict[str, WeightSpec]] | None:
    """A cached probe record if it is this artifact's and passes the manifest's checks.

    The record is untrusted like a manifest: a stale, foreign or edited one is ignored (the
    artifact is probed again), never bound."""
    try:
        raw = strict_json(read_manifest_bytes(path), str(path), MANIFEST_MAX_BYTES)
    except (OSError, BundleError):
        return None
    if not isinstance(raw, dict) or raw.get("fingerprint") != fp:
        return None
    try:
        spec, table = parse_method_and_weights(raw.get("method"), raw.get("weights"), str(path))
    except BundleError:
        return None
    size = fp["blob"][2]             # the blob's size, part of the identity just matched
    if spec.so != so.name or any(w.offset + w.nbytes > size for w in table.values()):
        return None
    return spec, table


def _check_blob_covers(so: Path, blob: Path, device: Device) -> None:
    """A blob shorter than what the .so reads is refused before torch's runner maps it (the
    runner maps the size the .so states without checking the file: a SIGBUS on the first
    access past its end)."""
    need = blob_bytes_needed(so, device)
    size = blob.stat().st_size
    if size < need:
        raise BundleError(f"weights blob {blob} has {size} bytes but {so.name} reads {need}; it is truncated "
                          f"or belongs to another .so: re-copy it or recompile")


def probe_artifact(so: Path, blob: Path, device: Device) -> tuple[MethodSpec, dict[str, WeightSpec]]:
    """The manifest-equivalent of a stock artifact, from the cached probe or a new one."""
    fp = _fingerprint(so, blob)
    for p in _cache_path(so):
        hit = _cached_probe(p, fp, so, blob)
        if hit is not None:
            return hit
    _check_blob_covers(so, blob, device)
    probed = probe_method(so, blob, str(device), mutated=set())
    consts, call_spec = probed.constants, probed.call_spec
    weights: dict[str, WeightSpec] = {}
    specs = []
    offsets = blob_offsets(probed)
    size = blob.stat().st_size
    for (c, data), offset in zip(consts, offsets):
        c.mutable = c.kind == "buffer"
        wid = weight_id(c.fqn, c.digest, c.mutable)
        if offset + len(data) > size:
            raise BundleError(f"{blob} is truncated: constant {c.fqn} needs bytes up to "
                              f"{offset + len(data)}, the file has {size}")
        weights.setdefault(wid, WeightSpec(id=wid, tensor=c.name, offset=offset, nbytes=len(data),
                                           digest=c.digest, mutable=c.mutable, fqns=[c.fqn]))
        c.weight = wid
        specs.append(c)
    ispec, ospec = call_spec if call_spec else (None, None)
    # opaque constants the .so keeps: it loads them from the blob, whole
    kept = [k.name for k in probed.kept]
    spec = MethodSpec(so=so.name, inputs=[], outputs=[], in_spec=ispec, out_spec=ospec, constants=specs,
                      so_owned=kept, so_blob=[0, blob_bytes_needed(so, device)] if kept else [])
    record = {"fingerprint": fp, "method": asdict(spec),
              "weights": {k: asdict(w) for k, w in weights.items()}}
    for p in _cache_path(so):
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, p)
            break
        except OSError:
            continue
    return spec, weights


def load_method(so_path: str | os.PathLike[str], weights: str | os.PathLike[str], *,
                device: "str | Device | None" = None, name: str | None = None) -> Method:
    """Load one stock AOTI artifact as a :class:`Method` that shares the weight cache.

    Args:
        so_path: the model .so from ``torch._inductor.aot_compile`` (built with
            ``aot_inductor.package_constants_in_so=False`` and the ``binary_blob`` format).
        weights: its ``*_weights.blob``.
        device: "cpu", "cuda" or "cuda:N"; default "cpu" unless CUDA is available.
        name: the method's name (default: the .so's stem).
    """
    so, blob = Path(so_path), Path(weights)
    for p, what in ((so, "shared object"), (blob, "weights blob")):
        if not is_regular_file(p):
            raise BundleError(f"{what} {p} does not exist")
    dev = device_for(device)
    spec, table = probe_artifact(so, blob, dev)
    rt = _device.get(dev)
    source = weight_source(blob, table)
    return Method(name or so.stem, spec, so, source, rt, typed_inputs=False)
