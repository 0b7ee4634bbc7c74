"""What an AOTI ``.so`` assumes of its inputs, read from what is shipped beside it.

A ``.pt2`` package made by ``torch._inductor.aoti_compile_and_package`` holds no exported
program: the only record of the inputs its ``.so`` was compiled for is the generated wrapper
source packaged beside it. For every tensor input that source has a ``check_input_N``
function (torch's ``generate_input_output_runtime_checks``), regular generated text stating
the expected dtype, each static size (``64 != x_size[1]``), each dynamic size's bounds
(``x_size[0] < 2``, ``x_size[0] > 64``), each static stride and the device type; the ``Run``
body's ``assert_size_stride(x, {s77, 64L}, {64L, 1L})`` gives each input's rank and the
symbol of each dynamic size. :func:`wrapper_inputs` turns that into
:class:`~aoti_rt.bundle.InputSpec` rows, which :class:`aoti_rt.calls.CallSignature` checks
before AOTI runs. A ``.pt2`` written with ``exported_programs=``
(``torch.export.pt2_archive._package.package_pt2``) also carries the serialized program:
:func:`exported_inputs` reads its inputs' names, the non-tensor inputs export fixed (with
their values) and each dynamic size's exported range.

Inductor bounds every dynamic size below by 2 (its 0/1 specialisation), whatever the
export's ``Dim(min=1)`` said. Where the source's lower bound of a plain dynamic size is 2 and
no exported range says otherwise, the spec accepts 1: the program export proved for size 1
is what the kernels run, and torch's own loader (which leaves the ``.so``'s checks off) runs
it. :func:`so_lower_bounds` finds such checks in a ``.so`` without its source (a bundle
compiled before aoti_rt compiled without them).
"""

from __future__ import annotations

import json
import mmap
import os
import re
from pathlib import Path
from typing import Any

from .bundle import DTYPE_CODES, MAX_INT, MAX_RANK, DimRange, FixedInput, InputSpec

#: the device type codes generated checks compare with (c10::DeviceType)
_DEVICE_TYPES = {0: "cpu", 1: "cuda"}

_CHECK_FN = re.compile(r"static void check_input_(\d+)\(\s*AtenTensorHandle\* input_handles\s*\)\s*\{")
_HANDLE = re.compile(r"ConstantHandle (\w+) = ConstantHandle\(input_handles\[(\d+)\]\);")
_DTYPE = re.compile(r"int32_t (\w+)_expected_dtype = aoti_torch_dtype_(\w+)\(\);")
_STATIC_SIZE = re.compile(r"if \((\d+) != (\w+)_size\[(\d+)\]\)")
_LOWER = re.compile(r"if \((\w+)_size\[(\d+)\] < (-?\d+)\)")
_UPPER = re.compile(r"if \((\w+)_size\[(\d+)\] > (\d+)\)")
_STRIDE = re.compile(r"if \((\d+) != (\w+)_stride\[(\d+)\]\)")
_DEVICE = re.compile(r"int32_t (\w+)_expected_device_type = (\d+);")
_ASSERT = re.compile(r"assert_size_stride\((\w+), \{([^{}]*)\}, \{([^{}]*)\}")
_INT = re.compile(r"(\d+)L?")
#: where Run takes a plain symbol from an input's size (every torch release writes it)
_ASSIGN = re.compile(r"int64_t ([su]\d+) = (\w+)_size\[(\d+)\];")
_SYMBOL = re.compile(r"([su]\d+)")
_SCALED = re.compile(r"(\d+)L?\*([su]\d+)")


def _bounded(n: int) -> int:
    if not 0 <= n < MAX_INT:
        raise ValueError(n)
    return n


def record_inputs(source: str | None, model_json: bytes | None, in_spec: str | None
                  ) -> tuple[list[InputSpec], list[FixedInput]]:
    """What a stock model's record states about its inputs: the tensor inputs its wrapper
    ``source`` checks (none if there is no source or it is not of the form known), named and
    ranged as the exported program ``model_json`` says where it is there and agrees, and the
    non-tensor inputs that program fixed where they and the tensors make up the ``.so``'s
    ``in_spec``."""
    inputs = wrapper_inputs(source) if source is not None else None
    if not inputs:
        return [], []
    exported = exported_inputs(model_json) if model_json is not None else None
    if exported is None or not merge_exported(inputs, exported[0]):
        return inputs, []
    fixed = exported[1]
    if fixed and in_spec:
        from torch.utils import _pytree as pytree

        try:
            leaves = pytree.treespec_loads(in_spec).num_leaves
        except Exception:  # noqa: BLE001 - a spec this torch cannot read: the fixed inputs go unused
            leaves = -1
        if leaves != len(inputs) + len(fixed):
            fixed = []
    return inputs, fixed


def wrapper_inputs(source: str, n_inputs: int | None = None) -> list[InputSpec] | None:
    """The tensor inputs a generated AOTI wrapper source checks, in call order, or None where
    the source has no complete checks for ``n_inputs`` inputs (then nothing is claimed).

    Each :class:`~aoti_rt.bundle.InputSpec` has the expected dtype, the static sizes (None for
    a dynamic one, with its :class:`~aoti_rt.bundle.DimRange`: the source's bounds, a lower
    bound of 2 on a plain symbol read as 1, see the module's docstring), the static strides
    (``stride``; None for a symbolic one) and the device type.
    """
    starts = list(_CHECK_FN.finditer(source))
    if n_inputs is None:
        n_inputs = len(starts)
    if not starts or len(starts) != n_inputs or [int(m.group(1)) for m in starts] != list(range(n_inputs)):
        return None
    ends = [m.start() for m in starts[1:]]
    tail = source.find("_check_aoti_runtime_check_inputs_env", starts[-1].end()) if starts else -1
    ends.append(tail if tail > 0 else len(source))
    asserts = {m.group(1): m for m in _ASSERT.finditer(source)}
    assigned: dict[str, dict[int, str]] = {}
    for m in _ASSIGN.finditer(source):
        assigned.setdefault(m.group(2), {})[int(m.group(3))] = m.group(1)
    out = []
    try:
        for k, (m, end) in enumerate(zip(starts, ends)):
            spec = _one_input(k, source[m.end():end], asserts, assigned)
            if spec is None:
                return None
            out.append(spec)
    except ValueError:
        return None
    return out


def _one_input(k: int, body: str, asserts: dict[str, Any], assigned: dict[str, dict[int, str]]) -> InputSpec | None:
    h = _HANDLE.search(body)
    dt = _DTYPE.search(body)
    if h is None or int(h.group(2)) != k or dt is None or dt.group(2) not in DTYPE_CODES:
        return None
    name = h.group(1)
    sizes: dict[int, int] = {}
    lower: dict[int, int] = {}
    upper: dict[int, int] = {}
    strides: dict[int, int] = {}
    for m in _STATIC_SIZE.finditer(body):
        sizes[int(m.group(3))] = _bounded(int(m.group(1)))
    for m in _LOWER.finditer(body):
        lower[int(m.group(2))] = max(0, int(m.group(3)))
    for m in _UPPER.finditer(body):
        upper[int(m.group(2))] = min(int(m.group(3)), MAX_INT - 1)
    for m in _STRIDE.finditer(body):
        strides[int(m.group(3))] = _bounded(int(m.group(1)))
    dev = _DEVICE.search(body)
    device = _DEVICE_TYPES.get(int(dev.group(2))) if dev is not None else None
    if dev is not None and device is None:
        return None
    # rank and symbols: the Run body's size assert; else the highest dimension any check names
    symbols: dict[int, tuple[str, int]] = {}
    a = asserts.get(name)
    if a is not None:
        entries = [e.strip() for e in a.group(2).split(",") if e.strip()]
        rank = len(entries)
        for d, e in enumerate(entries):
            if (s := _SYMBOL.fullmatch(e)) is not None:
                symbols[d] = (s.group(1), 1)
            elif (s := _SCALED.fullmatch(e)) is not None and int(s.group(1)) > 0:
                symbols[d] = (s.group(2), int(s.group(1)))
            elif (s := _INT.fullmatch(e)) is not None and d not in sizes:
                return None          # a static size the checks do not state: not the text we know
    else:
        # no assert (torch 2.11 writes none on CUDA): a lower bound of 2 on a dynamic size is
        # inductor's 2; the symbols Run reads from this input's sizes name them where it does
        named = [*sizes, *lower, *upper, *strides]
        rank = max(named) + 1 if named else 0
        symbols = {d: ("", 1) for d, lo in lower.items() if lo == 2 and d not in sizes}
    for d, sym in assigned.get(name, {}).items():
        if d not in symbols or not symbols[d][0]:
            symbols[d] = (sym, 1)
    if rank > MAX_RANK or any(d >= rank for d in [*sizes, *lower, *upper, *strides]):
        return None
    shape: list[int | None] = [sizes.get(d) for d in range(rank)]
    dims: list[DimRange | None] = []
    for d in range(rank):
        if shape[d] is not None:
            dims.append(None)
            continue
        lo, hi = lower.get(d, 0), upper.get(d)
        sym, step = symbols.get(d, ("", 1))
        if (sym or d in symbols) and lo == 2 * step:
            lo = step            # inductor's 0/1 specialisation, not the export's range
        if sym and step > 1 and lo % step:
            step = 1             # a derived size whose bounds are not multiples: bounds only
        if hi is not None and hi < lo:
            return None
        dims.append(DimRange(min=lo, max=hi, step=step, symbol=sym))
    stride = [strides.get(d) for d in range(rank)]
    return InputSpec(name=name, dtype=dt.group(2), shape=shape, device=device or "unknown", dims=dims, stride=stride)


def exported_inputs(model_json: bytes) -> tuple[list[tuple[str, list[DimRange | None]]], list[FixedInput]] | None:
    """From a serialized ExportedProgram (``models/<name>.json`` of a ``.pt2``): each tensor
    user input's name and the exported range of each plain-symbol dynamic size (None where a
    size is static or not a plain symbol), and the non-tensor inputs export fixed, with their
    positions among the call's flattened inputs and their values. None where the program has
    an input of another kind (a symbolic int, a custom object) or is not of the form known."""
    try:
        prog = json.loads(model_json)
        gm = prog["graph_module"]
        specs = gm["signature"]["input_specs"]
        values = gm["graph"]["tensor_values"]
        ranges = prog.get("range_constraints") or {}
        tensors: list[tuple[str, list[DimRange | None]]] = []
        fixed: list[FixedInput] = []
        at = 0
        for s in specs:
            if "user_input" in s:
                arg = s["user_input"]["arg"]
                if "as_tensor" not in arg:
                    return None
                name = arg["as_tensor"]["name"]
                tensors.append((name, _exported_dims(values[name]["sizes"], ranges)))
            elif "constant_input" in s:
                c = s["constant_input"]
                fixed.append(FixedInput(index=at, name=str(c["name"]), value=_constant(c["value"])))
            else:
                continue          # parameters, buffers, tensor constants, tokens: not call inputs
            at += 1
        return tensors, fixed
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


_EXPORTED_SYMBOL = re.compile(r"Symbol\('(\w+)'(?:, [a-z_]+=True)*\)")


def _exported_dims(sizes: list, ranges: dict) -> list[DimRange | None]:
    out: list[DimRange | None] = []
    for s in sizes:
        expr = s.get("as_expr") if isinstance(s, dict) else None
        m = _EXPORTED_SYMBOL.fullmatch(expr.get("expr_str", "")) if isinstance(expr, dict) else None
        r = ranges.get(m.group(1)) if m is not None else None
        if r is None:
            out.append(None)
            continue
        lo, hi = r["min_val"], r.get("max_val")
        if type(lo) is not int or not (hi is None or type(hi) is int):
            raise ValueError("range")
        hi = None if hi is None or hi >= MAX_INT else hi
        out.append(DimRange(min=max(0, lo), max=hi, step=1, symbol=m.group(1)))
    return out


def _constant(v: dict) -> Any:
    """A serialized constant input's value: None, bool, int, float or str (else ValueError)."""
    if not isinstance(v, dict) or len(v) != 1:
        raise ValueError(v)
    (kind, x), = v.items()
    if kind == "as_none":
        return None
    if kind == "as_bool" and type(x) is bool:
        return x
    if kind == "as_int" and type(x) is int and -MAX_INT < x < MAX_INT:
        return x
    if kind == "as_float" and type(x) in (int, float):
        return float(x)
    if kind == "as_string" and type(x) is str:
        return x
    raise ValueError(v)


def merge_exported(inputs: list[InputSpec], exported: list[tuple[str, list[DimRange | None]]]) -> bool:
    """Give ``inputs`` (read from the wrapper source) the exported names and ranges: a
    dynamic size's exported range replaces the source's bounds (within them above). False
    (nothing changed) where the two do not describe the same inputs."""
    if len(inputs) != len(exported) or any(len(d) != len(i.shape) for i, (_, d) in zip(inputs, exported)):
        return False
    for inp, (name, ranges) in zip(inputs, exported):
        dims = list(inp.dims or [None] * len(inp.shape))
        for d, r in enumerate(ranges):
            if r is None or inp.shape[d] is not None or dims[d] is None or dims[d].step != 1:
                continue
            hi = dims[d].max
            top = r.max if hi is None else (hi if r.max is None else min(hi, r.max))
            dims[d] = DimRange(min=r.min, max=top, step=1, symbol=dims[d].symbol or r.symbol)
        inp.name, inp.dims = name, dims
    return True


_TOO_SMALL = re.compile(rb"input_handles\[(\d+)\]: dim value is too small at (\d+), ")


def so_lower_bounds(path: str | os.PathLike[str]) -> set[tuple[int, int]]:
    """``(input, dimension)`` pairs whose dynamic size a ``.so`` checks from below (the
    messages of its generated checks, in its read-only data); empty if it has none or the
    file cannot be read. Its source is not needed: a bundle holds only the ``.so``."""
    found: set[tuple[int, int]] = set()
    try:
        fd = os.open(Path(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return found
    try:
        if os.fstat(fd).st_size == 0:
            return found
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mm:
            at = mm.find(b": dim value is too small at ")
            while at >= 0:
                start = max(0, at - 40)
                m = _TOO_SMALL.search(mm[start:at + 60])
                if m is not None:
                    found.add((int(m.group(1)), int(m.group(2))))
                at = mm.find(b": dim value is too small at ", at + 1)
    except (OSError, ValueError):
        return set()
    finally:
        os.close(fd)
    return found


__all__ = ["record_inputs", "wrapper_inputs", "exported_inputs", "merge_exported", "so_lower_bounds"]
