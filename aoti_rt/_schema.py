"""Strict JSON and the field checks of untrusted records (a bundle's manifest, a store header).

:func:`strict_json` parses at most a given number of bytes of strict UTF-8 JSON (no duplicate
keys, no NaN, no huge integers, bounded nesting). The checkers below turn one decoded JSON value
into a typed one or raise :class:`_Invalid` naming what is wrong; :func:`_record` builds a
dataclass from a field table of them. The manifest's tables are in :mod:`aoti_rt.bundle`.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any, NamedTuple

from .errors import BundleError

#: a manifest file larger than this is refused before a byte of it is read
MANIFEST_MAX_BYTES = 64 << 20
#: every integer in a manifest or a store header is below this
MAX_INT = 1 << 62
#: names (methods, constants, FQNs, weight ids, store tensors, files) have at most this many characters
MAX_NAME = 4096
#: constants and inputs have at most this many dimensions
MAX_RANK = 64

_RECOMPILE = "the bundle is corrupt or was not written by aoti_rt.compile(): recompile it"

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
