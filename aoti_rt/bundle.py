"""The bundle on disk: its manifest, its weight store, and their validation.

A bundle is a directory::

    manifest.json          format version, methods, constants, weights (docs/bundle-format.md)
    weights.safetensors    each distinct weight storage once (safetensors: mmap-able, offsets
                           in its header)
    <method>.so            one AOTInductor shared object per method, built without weights

The manifest says everything the runtime needs to bind a constant without opening anything
else (the AOTI C ABI exposes neither shapes nor strides). :func:`read_bundle` checks it
against the store's header and the files present, so a manifest that lies, a truncated or
corrupt store, or a path outside the bundle is a :class:`BundleError` before any memory is
allocated.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

FORMAT = "aoti_rt-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORE = "weights.safetensors"

#: c10::ScalarType codes, the dtype encoding of the AOTI C ABI.
DTYPE_CODES: dict[str, int] = {
    "uint8": 0, "int8": 1, "int16": 2, "int32": 3, "int64": 4, "float16": 5, "float32": 6,
    "float64": 7, "complex32": 8, "complex64": 9, "complex128": 10, "bool": 11,
    "bfloat16": 15, "float8_e5m2": 23, "float8_e4m3fn": 24, "float8_e5m2fnuz": 25,
    "float8_e4m3fnuz": 26, "uint16": 27, "uint32": 28, "uint64": 29,
}
DTYPE_NAMES = {v: k for k, v in DTYPE_CODES.items()}
ITEMSIZE = {
    "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2, "float32": 4,
    "float64": 8, "complex32": 4, "complex64": 8, "complex128": 16, "bool": 1, "bfloat16": 2,
    "float8_e5m2": 1, "float8_e4m3fn": 1, "float8_e5m2fnuz": 1, "float8_e4m3fnuz": 1,
    "uint16": 2, "uint32": 4, "uint64": 8,
}
CONSTANT_KINDS = ("parameter", "buffer", "tensor_constant", "folded", "unknown")


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` -> ``"float32"`` (checked against the ABI table)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_CODES:
        raise BundleError(f"dtype {dtype} is not supported by aoti_rt")
    return name


@dataclass
class WeightSpec:
    """One weight storage: bytes in a store file, cached as one buffer.

    ``mutable`` storages (a KV cache written in place) are shared by the methods of one
    model instance, never across instances; immutable ones are shared by content
    (``digest``) across everything in the process.
    """

    id: str
    tensor: str          # its name in the store (safetensors key)
    offset: int          # absolute byte offset in the store file
    nbytes: int
    digest: str          # "sha256:<hex>" of the bytes
    mutable: bool = False
    fqns: list[str] = field(default_factory=list)


@dataclass
class ConstantSpec:
    """One AOTI constant of one method, and the view it is bound as."""

    name: str            # AOTI internal name: the Pairs key
    fqn: str
    dtype: str
    shape: list[int]
    stride: list[int]
    storage_offset: int
    data_size: int       # GetConstantDataSize (storage bytes rounded to 64)
    kind: str
    mutable: bool
    digest: str
    weight: str          # WeightSpec.id

    @property
    def extent(self) -> int:
        """Bytes of its storage the view reaches (0 for an empty tensor)."""
        if any(s == 0 for s in self.shape):
            return 0
        last = self.storage_offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride))
        return (last + 1) * ITEMSIZE[self.dtype]


@dataclass
class InputSpec:
    name: str
    dtype: str
    shape: list[int | None]   # None: a dynamic dimension
    device: str


@dataclass
class MethodSpec:
    so: str                  # file name inside the bundle
    inputs: list[InputSpec]
    outputs: list[str]
    in_spec: str | None
    out_spec: str | None
    constants: list[ConstantSpec]


@dataclass
class Manifest:
    device: str
    methods: dict[str, MethodSpec]
    weights: dict[str, WeightSpec]
    store: str = STORE
    torch_version: str = ""
    aoti_rt_version: str = ""
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise BundleError(f"{where} is not valid JSON ({e}); the bundle is corrupt, recompile it") from e
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise BundleError(f"{where} is not an aoti_rt bundle manifest")
        if raw.get("version") != FORMAT_VERSION:
            raise BundleError(f"{where} has format version {raw.get('version')}; this aoti_rt "
                              f"reads version {FORMAT_VERSION}: recompile the bundle")
        try:
            methods = {
                name: MethodSpec(
                    so=m["so"], inputs=[InputSpec(**i) for i in m["inputs"]], outputs=list(m["outputs"]),
                    in_spec=m.get("in_spec"), out_spec=m.get("out_spec"),
                    constants=[ConstantSpec(**c) for c in m["constants"]])
                for name, m in raw["methods"].items()}
            weights = {k: WeightSpec(**w) for k, w in raw["weights"].items()}
            return cls(device=raw["device"], methods=methods, weights=weights,
                       store=raw.get("store", STORE), torch_version=raw.get("torch_version", ""),
                       aoti_rt_version=raw.get("aoti_rt_version", ""))
        except (KeyError, TypeError) as e:
            raise BundleError(f"{where} is missing or mistypes a field ({e!r}); recompile the bundle") from e

    # -- derived figures -------------------------------------------------------------------

    def unique_weight_bytes(self, methods: list[str] | None = None) -> int:
        """Bytes of the distinct weights the given methods (default: all) bind."""
        names = self.methods if methods is None else methods
        ids = {c.weight for n in names for c in self.methods[n].constants}
        return sum(self.weights[i].nbytes for i in ids)

    def per_method_bytes(self, method: str) -> int:
        """What loading ``method`` on its own costs: its distinct weights."""
        return self.unique_weight_bytes([method])


@dataclass(frozen=True)
class StoreHeader:
    """The parsed header of a safetensors file: name -> (dtype, shape, absolute offsets)."""

    path: Path
    data_start: int
    file_size: int
    tensors: dict[str, tuple[str, list[int], int, int]]


def read_store_header(path: Path) -> StoreHeader:
    """Parse and check a safetensors header (the format is 8-byte LE length + JSON).

    Raises BundleError if the file is missing, the header is corrupt, or the file is shorter
    than the header says (truncated).
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise BundleError(f"weight store {path} is truncated ({size} bytes): recompile or re-copy the bundle")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > min(size - 8, 100 << 20):
                raise BundleError(f"weight store {path} has a corrupt header (length {hlen} in a {size}-byte file)")
            raw = f.read(hlen)
    except FileNotFoundError:
        raise BundleError(f"weight store {path} is missing: the bundle is incomplete, recompile it") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"weight store {path} has a corrupt header ({e})") from e
    data_start = 8 + hlen
    tensors = {}
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            b, e = info["data_offsets"]
            tensors[name] = (info["dtype"], list(info["shape"]), data_start + b, data_start + e)
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"weight store {path}: bad header entry {name!r} ({err!r})") from err
        end_max = max(end_max, data_start + e)
    if end_max > size:
        raise BundleError(f"weight store {path} is truncated: its header needs {end_max} bytes, "
                          f"the file has {size}; recompile or re-copy the bundle")
    return StoreHeader(path, data_start, size, tensors)


def _inside(root: Path, name: str, what: str) -> Path:
    p = (root / name).resolve()
    if p.parent != root.resolve() or not name or "/" in name or name.startswith("."):
        raise BundleError(f"{what} {name!r} points outside the bundle {root}")
    return p


@dataclass
class Bundle:
    """A bundle read from disk and checked: manifest + resolved file paths."""

    root: Path
    manifest: Manifest
    store_path: Path

    def so_path(self, method: str) -> Path:
        return _inside(self.root, self.manifest.methods[method].so, f"method {method!r}: shared object")


_checked: dict[Path, tuple[tuple, Bundle]] = {}


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """``(size, mtime_ns, inode)`` of a file, or None if it cannot be stat'ed: a cheap test
    that a file is still the one that was read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _bundle_identity(bundle: Bundle) -> tuple:
    files = [bundle.root / MANIFEST, bundle.store_path,
             *(bundle.root / m.so for m in bundle.manifest.methods.values())]
    return tuple(file_identity(p) for p in files)


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open a bundle directory and validate its manifest against its files.

    Checks: the manifest parses and has the right format version; each shared object and the
    store are inside the bundle and exist; every weight is in the store header at the offsets
    the manifest claims; every constant's view fits in its weight's bytes. The result is
    remembered until the manifest, the store or a shared object changes on disk.
    """
    root = Path(path).resolve()
    if not (root / MANIFEST).is_file():
        raise BundleError(f"{path} is not an aoti_rt bundle (no {MANIFEST}); create one with aoti_rt.compile()")
    hit = _checked.get(root)
    if hit is not None and hit[0] == _bundle_identity(hit[1]):
        return hit[1]
    bundle = _read_bundle(root)
    _checked[root] = (_bundle_identity(bundle), bundle)
    return bundle


def _read_bundle(root: Path) -> Bundle:
    man = Manifest.from_json((root / MANIFEST).read_text(), str(root / MANIFEST))
    store_path = _inside(root, man.store, "weight store")
    header = read_store_header(store_path)
    for wid, w in man.weights.items():
        entry = header.tensors.get(w.tensor)
        if entry is None:
            raise BundleError(f"manifest weight {wid} names store tensor {w.tensor!r}, which {store_path.name} lacks")
        _, _, b, e = entry
        if b != w.offset or e - b != w.nbytes:
            raise BundleError(f"manifest weight {wid} says bytes [{w.offset}, {w.offset + w.nbytes}) but the "
                              f"store has {w.tensor!r} at [{b}, {e}): the manifest and store disagree")
    for mname, m in man.methods.items():
        so = _inside(root, m.so, f"method {mname!r}: shared object")
        if not so.is_file():
            raise BundleError(f"method {mname!r}: shared object {so} is missing")
        for c in m.constants:
            w = man.weights.get(c.weight)
            if w is None:
                raise BundleError(f"method {mname!r}: constant {c.fqn} names unknown weight {c.weight}")
            if c.dtype not in DTYPE_CODES:
                raise BundleError(f"method {mname!r}: constant {c.fqn} has unknown dtype {c.dtype!r}")
            if len(c.shape) != len(c.stride) or c.storage_offset < 0 or any(s < 0 for s in c.shape):
                raise BundleError(f"method {mname!r}: constant {c.fqn} has an invalid view {c.shape}/{c.stride}")
            if c.extent > w.nbytes:
                raise BundleError(f"method {mname!r}: constant {c.fqn} ({c.dtype}{c.shape}, stride {c.stride}, "
                                  f"offset {c.storage_offset}) reaches {c.extent} bytes, but its weight has "
                                  f"{w.nbytes}: the manifest lies")
    return Bundle(root, man, store_path)


def weight_id(fqn: str, digest: str, mutable: bool) -> str:
    """A weight's id in the manifest: its digest, or for mutable state ``fqn@<16 hex>`` (two
    buffers with equal initial bytes, a K and a V cache, stay two buffers)."""
    return f"{fqn}@{digest.removeprefix('sha256:')[:16]}" if mutable else digest


def divergent_fqns(methods: dict[str, MethodSpec]) -> list[tuple[str, str, str]]:
    """``(fqn, method, other method)`` for each FQN bound to different weights by two methods."""
    seen: dict[str, tuple[str, str]] = {}
    out = []
    for name, m in methods.items():
        for c in m.constants:
            first, weight = seen.setdefault(c.fqn, (name, c.weight))
            if weight != c.weight:
                out.append((c.fqn, first, name))
    return out


def safe_tensor_name(fqn: str, taken: set[str]) -> str:
    name, k = fqn, 1
    while name in taken:
        k += 1
        name = f"{fqn}#{k}"
    taken.add(name)
    return name


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


__all__ = ["Bundle", "Manifest", "MethodSpec", "ConstantSpec", "WeightSpec", "InputSpec",
           "read_bundle", "read_store_header", "DTYPE_CODES", "human_bytes"]
