"""The bundle on disk: its manifest, its weight store, and their validation.

A bundle is a directory::

    manifest.json          format version, methods, constants, weights (docs/bundle-format.md)
    weights.safetensors    each distinct weight storage once (safetensors: mmap-able, offsets
                           in its header)
    <method>.so            one AOTInductor shared object per method, built without weights

The manifest says everything the runtime needs to bind a constant without opening anything
else (the AOTI C ABI exposes neither shapes nor strides). A bundle is untrusted input:
:func:`read_bundle` parses the manifest as strict JSON, checks every field against one
field table per dataclass (``*_FIELDS``), checks the manifest's cross-field rules, parses
the store header (its own checks plus the safetensors library's) and checks the manifest
against it and the files present. A manifest that lies, a truncated or corrupt store, a
non-regular file or a path outside the bundle is a :class:`BundleError` before any memory is
allocated; nothing else escapes.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._schema import (MANIFEST_MAX_BYTES, MAX_INT, MAX_NAME, MAX_RANK, _at, _bool, _dict, _dim, _Field, _int,
                      _Invalid, _list, _name, _one_of, _opt_text, _optional, _positive, _RECOMPILE, _record,
                      _short_text, _show, _text, strict_json)
from .errors import BundleError
# the store's names, re-exported: callers import them from here
from .store import (STORE_HEADER_MAX_BYTES, StoreHeader, file_identity, is_regular_file, open_regular, pread_all,
                    read_manifest_bytes, read_store_header)

FORMAT = "aoti_rt-bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
STORE = "weights.safetensors"

#: read_bundle remembers this many checked bundles (the least recently used is forgotten)
CHECKED_BUNDLES = 64

#: a weight digest: ``"b3t:"`` + 64 lowercase hex digits, the BLAKE3 tree digest of its bytes
#: (aoti_rt/digest.py)
DIGEST_PATTERN = r"b3t:[0-9a-f]{64}"

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
#: dtype -> its safetensors name, for the dtypes every safetensors reader knows
ST_DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
             "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
             "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3"}
CONSTANT_KINDS = ("parameter", "buffer", "tensor_constant", "folded", "unknown")


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` -> ``"float32"`` (checked against the ABI table)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_CODES:
        raise BundleError(f"dtype {dtype} is not supported by aoti_rt")
    return name


def contiguous_strides(shape: list[int]) -> list[int]:
    """The strides of a contiguous tensor of ``shape`` (in elements)."""
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(s, 1)
    return out[::-1]


def view_bytes(shape: list[int], stride: list[int], storage_offset: int, itemsize: int) -> int:
    """Bytes of its storage a strided view needs (all entries >= 0): up to and including its
    last element, or up to its storage offset for an empty view."""
    if any(s == 0 for s in shape):
        return storage_offset * itemsize
    last = storage_offset + sum((s - 1) * st for s, st in zip(shape, stride))
    return (last + 1) * itemsize


def overlapping_dim(shape: list[int], stride: list[int]) -> int | None:
    """None when a strided view's elements are certainly distinct (strides >= 0), else the first
    dimension, in order of stride, whose steps may land on elements already reached.

    Dimensions of size 1 may carry any stride and an empty view has no elements. Otherwise,
    with the dimensions of size > 1 taken by increasing stride, each stride must pass the span
    of the ones before it: a stride of 0 (a broadcast) or two equal strides fail. Every layout
    torch makes without ``as_strided`` passes when its elements are distinct: dense ones
    (contiguous, transposed, channels-last) and slices of a larger storage (``w[:, 3:7]``:
    shape (8, 4), stride (16, 1)).
    """
    if any(s == 0 for s in shape):
        return None
    span = 1         # elements covered by the dimensions of smaller stride
    for st, s, d in sorted((st, s, d) for d, (s, st) in enumerate(zip(shape, stride)) if s > 1):
        if st < span:
            return d
        span += st * (s - 1)
    return None


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
    digest: str          # "b3t:<64 hex>" of the bytes (DIGEST_PATTERN)
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
        """Bytes of its storage the view needs (for an empty view: up to its storage offset)."""
        return view_bytes(self.shape, self.stride, self.storage_offset, ITEMSIZE[self.dtype])


@dataclass
class DimRange:
    """The sizes one dynamic dimension of an input may take, as ``torch.export`` proved them.

    A size is valid when ``min <= size <= max`` (``max`` None: no upper bound) and
    ``(size - min) % step == 0`` (a derived dimension such as ``2 * T`` has step 2). The
    dimensions of one method that share a ``symbol`` (one ``torch.export.Dim``) move together:
    ``(size - min) // step`` is the same for all of them.
    """

    min: int
    max: int | None
    step: int = 1
    symbol: str = ""


@dataclass
class InputSpec:
    """One tensor input of a method (an input of its .so), in call order."""

    name: str
    dtype: str
    shape: list[int | None]   # None: a dynamic dimension
    device: str
    #: per dimension (parallel to ``shape``): the range of a dynamic one; None for a static one
    #: or one whose range export does not state as ``step * symbol + offset``. Absent (None)
    #: in bundles written before ranges were recorded.
    dims: list[DimRange | None] | None = None
    #: per dimension: the stride the .so was compiled for (None: a symbolic one); None where
    #: not recorded (bundles: their inputs are compiled contiguous)
    stride: list[int | None] | None = None


#: Python types a non-tensor input may be fixed to (what JSON can carry exactly)
FIXED_INPUT_TYPES = (type(None), bool, int, float, str)


@dataclass
class FixedInput:
    """A non-tensor input (``None``, a bool, an int, a float or a str) that ``torch.export``
    specialised to its example value. The .so does not take it; a call must pass this value.
    """

    index: int               # its position among the call's flattened inputs (in_spec leaves)
    name: str
    value: None | bool | int | float | str


@dataclass
class MethodSpec:
    so: str                  # file name inside the bundle
    inputs: list[InputSpec]
    outputs: list[str]
    in_spec: str | None
    out_spec: str | None
    constants: list[ConstantSpec]
    #: non-tensor inputs fixed at export, in call order (absent in older bundles: none)
    fixed_inputs: list[FixedInput] = field(default_factory=list)
    #: internal names of constants the .so keeps as its own, not bound by aoti_rt (opaque
    #: prepacked weights; absent in older records: none). Constants it folds at run time are
    #: its own too, known from the .so itself.
    so_owned: list[str] = field(default_factory=list)
    #: ``[offset, nbytes]`` of AOTI's ``binary_blob`` of the .so in the method's store, from
    #: which the .so loads the constants it keeps (empty: they are inside the .so, or none)
    so_blob: list[int] = field(default_factory=list)


_dtype = _one_of(DTYPE_CODES, "a dtype aoti_rt knows (" + ", ".join(DTYPE_CODES) + ")")
_kind = _one_of(CONSTANT_KINDS, "one of " + ", ".join(CONSTANT_KINDS))
_DIGEST = re.compile(DIGEST_PATTERN)


def digest_ok(v: Any) -> bool:
    """Whether ``v`` is a weight digest this aoti_rt accepts (DIGEST_PATTERN)."""
    if type(v) is not str:
        return False
    return bool(_DIGEST.fullmatch(v))


def _digest(v: Any) -> str:
    if not digest_ok(v):
        raise _Invalid(f'must be a digest "b3t:" + 64 lowercase hex digits, not {_show(v)}')
    return v


def _device(v: Any) -> str:
    if type(v) is not str or not re.fullmatch(r"cpu|cuda(:[0-9]{1,4})?", v):
        raise _Invalid(f"must be 'cpu', 'cuda' or 'cuda:N', not {_show(v)}")
    return v


def _fixed_value(v: Any) -> None | bool | int | float | str:
    if v is None or type(v) is bool:
        return v
    if type(v) is int:
        if not -MAX_INT < v < MAX_INT:
            raise _Invalid(f"must be an integer in (-2**62, 2**62), not {_show(v)}")
        return v
    if type(v) is float:
        if not math.isfinite(v):      # 1e999 parses to inf
            raise _Invalid(f"must be a finite number, not {_show(v)}")
        return v
    if type(v) is str:
        return _text(v, MAX_NAME)
    raise _Invalid(f"must be null, a boolean, a number or a string, not {_show(v)}")



DIM_FIELDS = {
    "min": _Field(_int),
    "max": _Field(_optional(_int)),
    "step": _Field(_positive, 1),
    "symbol": _Field(_short_text, ""),
}
INPUT_FIELDS = {
    "name": _Field(_name),
    "dtype": _Field(_dtype),
    "shape": _Field(_list(_dim, MAX_RANK)),
    "device": _Field(_name),
    "dims": _Field(_optional(_list(_optional(_record(DimRange, DIM_FIELDS)), MAX_RANK)), None),
    "stride": _Field(_optional(_list(_dim, MAX_RANK)), None),
}
FIXED_INPUT_FIELDS = {
    "index": _Field(_int),
    "name": _Field(_name),
    "value": _Field(_fixed_value),
}
CONSTANT_FIELDS = {
    "name": _Field(_name),
    "fqn": _Field(_name),
    "dtype": _Field(_dtype),
    "shape": _Field(_list(_int, MAX_RANK)),
    "stride": _Field(_list(_int, MAX_RANK)),      # >= 0: a negative stride aborts inside AOTI
    "storage_offset": _Field(_int),
    "data_size": _Field(_int),
    "kind": _Field(_kind),
    "mutable": _Field(_bool),
    "digest": _Field(_digest),
    "weight": _Field(_name),
}
METHOD_FIELDS = {
    "so": _Field(_name),
    "inputs": _Field(_list(_record(InputSpec, INPUT_FIELDS))),
    "outputs": _Field(_list(_short_text)),
    "in_spec": _Field(_opt_text, None),
    "out_spec": _Field(_opt_text, None),
    "constants": _Field(_list(_record(ConstantSpec, CONSTANT_FIELDS))),
    "fixed_inputs": _Field(_list(_record(FixedInput, FIXED_INPUT_FIELDS)), []),
    "so_owned": _Field(_list(_name), []),
    "so_blob": _Field(_list(_int, 2), []),
}
WEIGHT_FIELDS = {
    "id": _Field(_name),
    "tensor": _Field(_name),
    "offset": _Field(_int),
    "nbytes": _Field(_int),
    "digest": _Field(_digest),
    "mutable": _Field(_bool),
    "fqns": _Field(_list(_name), []),
}


def _format(v: Any) -> str:
    if v != FORMAT or type(v) is not str:
        raise _Invalid(f"must be {FORMAT!r}, not {_show(v)}: this is not an aoti_rt bundle manifest")
    return v


def _version(v: Any) -> int:
    if type(v) is not int or v != FORMAT_VERSION:
        raise _Invalid(f"is {_show(v)}; this aoti_rt reads format version {FORMAT_VERSION}")
    return v


MANIFEST_FIELDS = {
    "device": _Field(_device),
    "methods": _Field(_dict(_record(MethodSpec, METHOD_FIELDS))),
    "weights": _Field(_dict(_record(WeightSpec, WEIGHT_FIELDS))),
    "store": _Field(_name, STORE),
    "torch_version": _Field(_short_text, ""),
    "aoti_rt_version": _Field(_short_text, ""),
    "format": _Field(_format),
    "version": _Field(_version),
}


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
        raw = asdict(self)
        for m in raw["methods"].values():       # strides are recorded for stock packages only
            for i in m["inputs"]:
                if i.get("stride") is None:
                    i.pop("stride", None)
        return json.dumps(raw, indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> "Manifest":
        """Parse and check a manifest (see docs/bundle-format.md, "Validation").

        Raises :class:`BundleError` naming the first field that is missing, mistyped, out of
        range or inconsistent with the rest of the manifest; never anything else.
        """
        raw = strict_json(text, where, MANIFEST_MAX_BYTES)
        try:
            if type(raw) is not dict:
                raise _Invalid(f"must be an object, not {_show(raw)}", "the top level")
            _at("format", _format, raw.get("format"))     # first, so an old or foreign file says so
            _at("version", _version, raw.get("version"))
            man = _parse_manifest(raw)
            _check_manifest(man)
        except _Invalid as e:
            path = e.path.removeprefix(".")
            advice = ("recompile the bundle with this aoti_rt" if path == "version" else _RECOMPILE)
            raise BundleError(f"{where}: {path} {e.problem}; {advice}") from None
        return man

    # -- derived figures -------------------------------------------------------------------

    def unique_weight_bytes(self, methods: list[str] | None = None) -> int:
        """Bytes of the distinct weights the given methods (default: all) bind."""
        names = self.methods if methods is None else methods
        ids = {c.weight for n in names for c in self.methods[n].constants}
        return sum(self.weights[i].nbytes for i in ids)

    def per_method_bytes(self, method: str) -> int:
        """What loading ``method`` on its own costs: its distinct weights."""
        return self.unique_weight_bytes([method])


_parse_manifest = _record(Manifest, MANIFEST_FIELDS)
_parse_method = _record(MethodSpec, METHOD_FIELDS)
_parse_weights = _dict(_record(WeightSpec, WEIGHT_FIELDS))


def parse_method_and_weights(method: Any, weights: Any, where: str) -> tuple[MethodSpec, dict[str, WeightSpec]]:
    """One method and its weight table from decoded JSON, checked by the manifest's rules (the
    field tables and the cross-field checks). For records kept outside a bundle, such as the
    stock-artifact probe cache. Raises :class:`BundleError`, never anything else."""
    try:
        spec = _at("method", _parse_method, method)
        table = _at("weights", _parse_weights, weights)
        _check_manifest(Manifest(device="cpu", methods={"method": spec}, weights=table))
    except _Invalid as e:
        path = "method" + e.path.removeprefix("methods['method']") if e.path.startswith("methods[") else e.path
        raise BundleError(f"{where}: {path} {e.problem}") from None
    return spec, table


def _check_inputs(mname: str, m: MethodSpec) -> None:
    """A method's inputs: each dimension range fits its shape; fixed inputs have distinct
    positions among the call's ``len(inputs) + len(fixed_inputs)`` flattened inputs."""
    for i, inp in enumerate(m.inputs):
        if inp.stride is not None and len(inp.stride) != len(inp.shape):
            raise _Invalid(f"has {len(inp.stride)} entries for a shape of rank {len(inp.shape)}",
                           f"methods[{mname!r}].inputs[{i}] ({inp.name}).stride")
        if inp.dims is None:
            continue
        at = f"methods[{mname!r}].inputs[{i}] ({inp.name}).dims"
        if len(inp.dims) != len(inp.shape):
            raise _Invalid(f"has {len(inp.dims)} entries for a shape of rank {len(inp.shape)}", at)
        for d, (size, r) in enumerate(zip(inp.shape, inp.dims)):
            if r is None:
                continue
            if size is not None:
                raise _Invalid(f"gives a range for static dimension {d} (size {size})", f"{at}[{d}]")
            if r.max is not None and r.max < r.min:
                raise _Invalid(f"has max {r.max} below min {r.min}", f"{at}[{d}]")
    leaves = len(m.inputs) + len(m.fixed_inputs)
    seen: set[int] = set()
    for k, f in enumerate(m.fixed_inputs):
        if f.index >= leaves or f.index in seen:
            raise _Invalid(f"is {f.index}: positions of fixed inputs are distinct and below {leaves} "
                           f"(inputs + fixed inputs)", f"methods[{mname!r}].fixed_inputs[{k}].index")
        seen.add(f.index)


def _check_manifest(man: Manifest) -> None:
    """The cross-field rules of a manifest (types are already checked)."""
    if not man.methods:
        raise _Invalid("is empty: a bundle has at least one method", "methods")
    for wid, w in man.weights.items():
        if w.id != wid:
            raise _Invalid(f"is {_show(w.id)}, not its key {_show(wid)}", f"weights[{wid!r}].id")
        if not w.mutable and w.id != w.digest:
            # the runtime shares immutable weights by digest: an id that is not the digest lies
            raise _Invalid(f"is {_show(w.digest)}, but an immutable weight's id is its digest",
                           f"weights[{wid!r}].digest")
    for mname, m in man.methods.items():
        _check_inputs(mname, m)
        names: set[str] = set()
        for i, c in enumerate(m.constants):
            def at(field: str = "") -> str:
                return f"methods[{mname!r}].constants[{i}] ({c.fqn}){field}"
            if c.name in names:
                raise _Invalid(f"{_show(c.name)} is used by another constant of the method", at(".name"))
            names.add(c.name)
            w = man.weights.get(c.weight)
            if w is None:
                raise _Invalid(f"names {_show(c.weight)}, which is not in weights", at(".weight"))
            if c.digest != w.digest:
                raise _Invalid(f"is {_show(c.digest)} but its weight's is {_show(w.digest)}", at(".digest"))
            if c.mutable != w.mutable:
                raise _Invalid(f"is {c.mutable} but its weight's is {w.mutable}", at(".mutable"))
            if len(c.shape) != len(c.stride):
                raise _Invalid(f"has shape {c.shape} and stride {c.stride} of different ranks", at())
            size = ITEMSIZE[c.dtype]
            if c.storage_offset * size > w.nbytes:
                raise _Invalid(f"{c.storage_offset} ({c.storage_offset * size} bytes) is past the end of its "
                               f"weight ({w.nbytes} bytes)", at(".storage_offset"))
            d = overlapping_dim(c.shape, c.stride)
            if d is not None and c.extent != w.nbytes:
                # AOTI keeps an expanded constant (``b.expand(16, 16)``, a stride of 0) as the storage
                # it expands, which the view spans to its end; a view that repeats elements of a
                # storage it does not span is a lie (a bias read as one broadcast value)
                raise _Invalid(f"shape {c.shape} with stride {c.stride} repeats elements (dimension {d}) of a "
                               f"{w.nbytes}-byte weight it reaches only {c.extent} bytes of: AOTI compiles no "
                               f"such constant, the manifest lies", at(".stride"))
            if c.extent > w.nbytes:
                raise _Invalid(f"{c.dtype}{c.shape} with stride {c.stride} at offset {c.storage_offset} reaches "
                               f"{c.extent} bytes, but its weight has {w.nbytes}: the manifest lies", at())
            if c.extent > c.data_size and 0 not in c.shape:
                raise _Invalid(f"{c.dtype}{c.shape} with stride {c.stride} at offset {c.storage_offset} reaches "
                               f"{c.extent} bytes, but the .so keeps {c.data_size} for it: the manifest lies", at())
            if c.data_size > -(-max(w.nbytes, 1) // 64) * 64:
                raise _Invalid(f"{c.data_size} is more than its weight's {w.nbytes} bytes rounded up to 64",
                               at(".data_size"))



def _inside(root: Path, name: str, what: str) -> Path:
    if not isinstance(name, str) or not name or "/" in name or "\x00" in name or name.startswith("."):
        raise BundleError(f"{what} {name!r} points outside the bundle {root}")
    try:
        p = (root / name).resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise BundleError(f"{what} {name!r} cannot be resolved inside the bundle {root} ({e})") from None
    if p.parent != root.resolve():
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


#: root -> (file identities when checked, Bundle); least recently used first, CHECKED_BUNDLES at most
_checked: OrderedDict[Path, tuple[tuple, Bundle]] = OrderedDict()
_checked_lock = threading.Lock()



def _bundle_identity(bundle: Bundle) -> tuple:
    files = [bundle.root / MANIFEST, bundle.store_path,
             *(bundle.root / m.so for m in bundle.manifest.methods.values())]
    return tuple(file_identity(p) for p in files)


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open a bundle directory and validate its manifest against its files.

    Checks (docs/bundle-format.md, "Validation"): the manifest is at most 64 MiB of strict
    JSON that passes the schema of this format version; each shared object and the store
    are regular files inside the bundle; the store's header is sound; every weight is in the
    store at the offsets the manifest claims; every constant's view fits in its weight's
    bytes. Raises :class:`BundleError` otherwise, before any memory is allocated. The result
    is remembered (for the CHECKED_BUNDLES most recent bundles) until the manifest, the
    store or a shared object changes on disk.
    """
    try:
        root = Path(path).resolve()
    except (OSError, RuntimeError, TypeError, ValueError) as e:
        raise BundleError(f"{path!r} is not a usable bundle path ({e})") from None
    if not os.path.lexists(root / MANIFEST):
        raise BundleError(f"{path} is not an aoti_rt bundle (no {MANIFEST}); create one with aoti_rt.compile()")
    with _checked_lock:
        hit = _checked.get(root)
    if hit is not None and hit[0] == _bundle_identity(hit[1]):
        with _checked_lock:
            if root in _checked:
                _checked.move_to_end(root)
        return hit[1]
    bundle = _read_bundle(root)
    identity = _bundle_identity(bundle)
    with _checked_lock:
        _checked[root] = (identity, bundle)
        _checked.move_to_end(root)
        while len(_checked) > CHECKED_BUNDLES:
            _checked.popitem(last=False)
    return bundle


def _read_bundle(root: Path) -> Bundle:
    where = str(root / MANIFEST)
    man = Manifest.from_json(read_manifest_bytes(root / MANIFEST), where)
    store_path = _inside(root, man.store, "weight store")
    header = read_store_header(store_path)
    for wid, w in man.weights.items():
        entry = header.tensors.get(w.tensor)
        if entry is None:
            raise BundleError(f"manifest weight {wid} names store tensor {w.tensor!r}, which {store_path.name} lacks; "
                              f"{_RECOMPILE}")
        _, _, b, e = entry
        if b != w.offset or e - b != w.nbytes:
            raise BundleError(f"manifest weight {wid} says bytes [{w.offset}, {w.offset + w.nbytes}) but the "
                              f"store has {w.tensor!r} at [{b}, {e}): the manifest and store disagree; {_RECOMPILE}")
    for mname, m in man.methods.items():
        so = _inside(root, m.so, f"method {mname!r}: shared object")
        if not is_regular_file(so):
            raise BundleError(f"method {mname!r}: shared object {so} is missing or not a regular file; {_RECOMPILE}")
    return Bundle(root, man, store_path)


def weight_id(fqn: str, digest: str, mutable: bool) -> str:
    """A weight's id in the manifest: its digest, or for mutable state ``fqn@<16 hex>`` (two
    buffers with equal initial bytes, a K and a V cache, stay two buffers)."""
    return f"{fqn}@{digest.partition(':')[2][:16]}" if mutable else digest


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


__all__ = ["Bundle", "Manifest", "MethodSpec", "ConstantSpec", "WeightSpec", "InputSpec", "DimRange",
           "FixedInput", "StoreHeader",
           "read_bundle", "read_store_header", "strict_json", "digest_ok", "parse_method_and_weights",
           "DTYPE_CODES", "human_bytes",
           # re-exported from aoti_rt.store and aoti_rt._schema
           "open_regular", "pread_all", "is_regular_file", "file_identity", "read_manifest_bytes",
           "STORE_HEADER_MAX_BYTES", "MANIFEST_MAX_BYTES", "MAX_INT", "MAX_NAME", "MAX_RANK"]