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

import copy
import json
import math
import os
import re
import stat
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from .errors import BundleError

FORMAT = "aoti_rt-bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
STORE = "weights.safetensors"

#: a manifest file larger than this is refused before a byte of it is read
MANIFEST_MAX_BYTES = 64 << 20
#: a store header (the JSON after the 8-byte length) larger than this is refused
STORE_HEADER_MAX_BYTES = 64 << 20
#: every integer in a manifest or a store header is below this
MAX_INT = 1 << 62
#: names (methods, constants, FQNs, weight ids, store tensors, files) have at most this many characters
MAX_NAME = 4096
#: constants and inputs have at most this many dimensions
MAX_RANK = 64
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

_RECOMPILE = "the bundle is corrupt or was not written by aoti_rt.compile(): recompile it"


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


# -- strict JSON -----------------------------------------------------------------------------

class _JsonProblem(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _JsonProblem(f"key {_show(dup)} appears twice in one object")
    return out


def _no_constant(name: str):
    raise _JsonProblem(f"{name} is not a number JSON allows")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 24:
        raise _JsonProblem(f"the integer {text[:24]}... has {len(text)} digits")
    return int(text)


#: Python >= 3.11 (and 3.10.7+) refuses int literals over 4300 digits itself (a ValueError);
#: only where that limit is off do we pay for a hook on every integer
_PARSE_INT = None if getattr(sys, "get_int_max_str_digits", lambda: 0)() else _bounded_int


def strict_json(data: bytes | str, what: str, limit: int) -> Any:
    """Parse untrusted JSON: at most ``limit`` bytes of strict UTF-8, no duplicate keys, no
    NaN/Infinity, no absurdly long integers, bounded nesting. Raises :class:`BundleError`
    (``"<what>: <problem>; ..."``) on anything else."""
    if len(data) > limit:
        raise BundleError(f"{what}: {len(data)} bytes is more than the {limit}-byte limit; {_RECOMPILE}")
    if isinstance(data, str):
        text = data
    else:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BundleError(f"{what}: not UTF-8 text (byte {e.start}: {e.reason}); {_RECOMPILE}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant,
                          parse_int=_PARSE_INT)
    except _JsonProblem as e:
        raise BundleError(f"{what}: {e}; {_RECOMPILE}") from None
    except RecursionError:
        raise BundleError(f"{what}: JSON nested too deeply; {_RECOMPILE}") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{what}: not valid JSON ({e}); {_RECOMPILE}") from None
    except ValueError:           # int()'s digit limit
        raise BundleError(f"{what}: an integer literal has thousands of digits; {_RECOMPILE}") from None


# -- the schema: one field table per dataclass -----------------------------------------------

class _Invalid(Exception):
    """A field is wrong: ``problem`` says how; ``path`` (which field) is filled in on the way
    out by the containers it passes through, so a valid manifest builds no path strings."""

    def __init__(self, problem: str, path: str = ""):
        super().__init__(problem)
        self.problem = problem
        self.path = path


def _show(v: Any) -> str:
    r = repr(v)
    r = r if len(r) <= 60 else r[:57] + "..."
    return r if isinstance(v, str) else f"{type(v).__name__} {r}"


Check = Callable[[Any], Any]


def _at(path: str, check: Check, v: Any) -> Any:
    """``check(v)``, naming ``path`` in its error."""
    try:
        return check(v)
    except _Invalid as e:
        e.path = path + e.path
        raise


def _int(v: Any) -> int:
    if type(v) is not int or not 0 <= v < MAX_INT:      # type() is int: rejects bool (True == 1)
        raise _Invalid(f"must be an integer in [0, 2**62), not {_show(v)}")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _Invalid(f"must be true or false, not {_show(v)}")
    return v


def _text(v: Any, max_len: int = MANIFEST_MAX_BYTES) -> str:
    if type(v) is not str:
        raise _Invalid(f"must be a string, not {_show(v)}")
    if len(v) > max_len:
        raise _Invalid(f"is {len(v)} characters long (at most {max_len})")
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise _Invalid(f"contains a lone surrogate ({_show(v)})") from None
    return v


def _short_text(v: Any) -> str:
    return _text(v, MAX_NAME)


def _name(v: Any) -> str:
    _text(v, MAX_NAME)
    if not v or "\x00" in v:
        raise _Invalid(f"must be a non-empty name without NUL characters, not {_show(v)}")
    return v


def _opt_text(v: Any) -> str | None:
    return None if v is None else _text(v)


def _one_of(choices, what: str) -> Check:
    def check(v: Any) -> Any:
        if type(v) is not str or v not in choices:
            raise _Invalid(f"must be {what}, not {_show(v)}")
        return v
    return check


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


def _dim(v: Any) -> int | None:
    return None if v is None else _int(v)


def _positive(v: Any) -> int:
    if _int(v) == 0:
        raise _Invalid(f"must be an integer in [1, 2**62), not {_show(v)}")
    return v


def _optional(check: Check) -> Check:
    def opt(v: Any) -> Any:
        return None if v is None else check(v)
    return opt


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


def _list(item: Check, max_len: int | None = None) -> Check:
    def check(v: Any) -> list:
        if type(v) is not list:
            raise _Invalid(f"must be a list, not {_show(v)}")
        if max_len is not None and len(v) > max_len:
            raise _Invalid(f"has {len(v)} entries (at most {max_len})")
        out: list = []
        try:
            for x in v:
                out.append(item(x))
        except _Invalid as e:
            e.path = f"[{len(out)}]{e.path}"
            raise
        return out
    return check


def _dict(item: Check) -> Check:
    def check(v: Any) -> dict:
        if type(v) is not dict:
            raise _Invalid(f"must be an object, not {_show(v)}")
        out = {}
        for k, x in v.items():
            _at(f" key {k!r}", _name, k)
            out[k] = _at(f"[{k!r}]", item, x)
        return out
    return check


_REQUIRED = object()


class _Field(NamedTuple):
    check: Check
    default: Any = _REQUIRED      # copied when the key is absent; _REQUIRED: must be present


def _record(cls: type, table: dict[str, _Field]) -> Check:
    """A JSON object -> ``cls(**fields)``, each field checked by ``table``. Unknown keys are
    ignored (a later aoti_rt of the same format version may add informational fields)."""
    names = [f.name for f in fields(cls)]
    if sorted(names) != sorted(table):      # adding a dataclass field without its check is a bug
        raise TypeError(f"field table of {cls.__name__} is {sorted(table)}, the dataclass has {sorted(names)}")
    items = list(table.items())

    def check(v: Any):
        if type(v) is not dict:
            raise _Invalid(f"must be an object, not {_show(v)}")
        kwargs = {}
        name = ""
        try:
            for name, f in items:
                if name in v:
                    kwargs[name] = f.check(v[name])
                elif f.default is _REQUIRED:
                    raise _Invalid("is missing")
                else:
                    kwargs[name] = copy.copy(f.default)
        except _Invalid as e:
            e.path = f".{name}{e.path}"
            raise
        return cls(**kwargs)
    return check


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
        return json.dumps(asdict(self), indent=1, sort_keys=False)

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
            if c.extent > w.nbytes:
                raise _Invalid(f"{c.dtype}{c.shape} with stride {c.stride} at offset {c.storage_offset} reaches "
                               f"{c.extent} bytes, but its weight has {w.nbytes}: the manifest lies", at())
            if c.data_size > -(-max(w.nbytes, 1) // 64) * 64:
                raise _Invalid(f"{c.data_size} is more than its weight's {w.nbytes} bytes rounded up to 64",
                               at(".data_size"))


# -- files -------------------------------------------------------------------------------------

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


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """``(size, mtime_ns, inode)`` of a file, or None if it cannot be stat'ed: a cheap test
    that a file is still the one that was read."""
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


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
           "DTYPE_CODES", "human_bytes"]
