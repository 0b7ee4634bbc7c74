"""Fuzz aoti_rt.load with mutations of a real compiled bundle.

    python tests/fuzz_bundle.py --bundle DIR --scratch DIR --seed S --cases N

Hypothesis draws each case: a mutation of the manifest (a JSON path replaced by a nasty value
of any JSON type or by raw JSON text, a key deleted or added, values swapped between
constants or weights, a plausible small lie about a shape, stride, offset, size, digest,
weight reference or mutable flag, a coherent multi-field lie that keeps the manifest
self-consistent), of the store (truncated, bytes flipped in the header or the data, the
header rewritten with lying offsets, dtypes or shapes, duplicate keys, a wrong length field,
a weight shrunk with the manifest made to agree), or several at once. The case is written into
one scratch bundle (the .so files are copied once), then ``aoti_rt.load(scratch, device="cpu")``;
if it loads, every method runs on fixed inputs and the model is closed.

Oracles:

* any exception that is not an :class:`aoti_rt.AotiRtError` is a failure (``non_aoti_errors``);
* the intact bundle, loaded once at the start and kept open, must give bitwise the same
  outputs after every case (a lying bundle must never change what another bundle computes):
  else a ``wrong_result``;
* after a case, aoti_rt's CPU allocations must be back to what the intact model holds
  (``leaks``);
* a crash (the process dies: a negative exit status) or a hang is found by the caller
  (tests/test_fuzz.py); ``SCRATCH/last_case.json`` then names the case, and the scratch
  bundle is left as it was, a reproducer.

Prints one JSON line at the end: ``{"cases", "loaded", "rejected": {error class: count},
"call_rejected": {...}, "non_aoti_errors": [first 20], "wrong_results": n,
"wrong_result_cases": [first 5], "leaks": n, "seconds"}``.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import gc
import json
import os
import shutil
import struct
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
faulthandler.enable()
warnings.simplefilter("ignore")     # "binds a private copy" and friends: expected from lying bundles
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "aoti_rt" / "__init__.py").is_file():     # a source checkout: fuzz its aoti_rt
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings, strategies as st  # noqa: E402

import aoti_rt  # noqa: E402
from aoti_rt.bundle import ITEMSIZE  # noqa: E402

MANIFEST, STORE = "manifest.json", "weights.safetensors"
_RAW = "\u0001raw-json\u0001"      # placeholder replaced by raw JSON text after dumping


# -- fixed inputs and the intact model's reference --------------------------------------------

def example_inputs(manifest: dict, method: str) -> list:
    out = []
    for k, spec in enumerate(manifest["methods"][method]["inputs"]):
        shape = [2 if d is None else d for d in spec["shape"]]
        dtype = getattr(torch, spec["dtype"])
        n = 1
        for d in shape:
            n *= d
        if dtype.is_floating_point:
            t = torch.linspace(-1.0, 1.0, n, dtype=torch.float32).to(dtype)
        else:
            t = (torch.arange(n, dtype=torch.int64) * (k + 3) % 5).to(dtype)
        out.append(t.reshape(shape))
    return out


def run_all(model, inputs: dict) -> dict[str, list[bytes]]:
    """Every method, in manifest order (prefill before decode), on the fixed inputs."""
    results = {}
    with torch.no_grad():
        for name in model.methods:
            outs = model[name](*inputs[name])
            outs = outs if isinstance(outs, (tuple, list)) else [outs]
            results[name] = [o.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                             if isinstance(o, torch.Tensor) else repr(o).encode() for o in outs]
    return results


# -- JSON paths ----------------------------------------------------------------------------------

def all_paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += all_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += all_paths(v, prefix + (i,))
    return out


def get_at(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def set_at(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    get_at(obj, path[:-1])[path[-1]] = value
    return obj


def dumps(man: Any, raw: str | None = None, dup: tuple | None = None) -> bytes:
    text = json.dumps(man, indent=1)
    if raw is not None:
        text = text.replace(json.dumps(_RAW), raw)
    if dup is not None:       # (key, value text): a duplicate key in the object holding key
        key, value = dup
        needle = json.dumps(key) + ":"
        at = text.find(needle)
        if at >= 0:
            text = text[:at] + needle + " " + value + ", " + text[at:]
    return text.encode("utf-8", "surrogatepass")


# -- value strategies ----------------------------------------------------------------------------

EDGE_INTS = [-2**63, -2**31, -65, -64, -8, -1, 0, 1, 2, 3, 7, 8, 63, 64, 65, 255, 256, 4096, 2**31 - 1,
             2**31, 2**32, 2**53, 2**61, 2**62 - 1, 2**62, 2**63 - 1, 2**63, 2**64, 10**30]
EDGE_FLOATS = [-0.0, 0.0, 0.5, 1.0, -1.0, 64.0, 1e308, -1e308, 5e-324]
EDGE_STRINGS = ["", "\x00", "a\x00b", "\ud800", "\udfff\ud800", "cpu", "cuda", "cuda:0", "cuda:99", "meta",
                "float32", "int64", "bool", "complex32", "float8_e4m3fn", "parameter", "buffer", "folded",
                "..", ".", "../x", "/etc/passwd", "a.so", "b.so", "prefill.so", "manifest.json",
                "weights.safetensors", "x" * 5000, "b3t:" + "0" * 64, "sha256:" + "0" * 64, "null", "[]",
                "aoti_rt-bundle", "\u00e9\u4e2d\U0001f600", " cpu", "CPU"]
PLAUSIBLE_STRINGS = ["cpu", "cuda", "cuda:0", "float16", "bfloat16", "int32", "uint8", "buffer", "folded",
                     "tensor_constant", "a.so", "b.so", "prefill.so", "decode.so", "weights.safetensors"]
RAW_TEXT = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-0", "1" * 5000, "-" + "9" * 400,
            "[" * 3000 + "]" * 3000, '{"a":' * 3000 + "1" + "}" * 3000, '"\\ud800"', '"\\u0000"',
            "1.0e400", "0.0000000000000000000001", "[1, 2.5, true, null]", "{}", "[]", '""']

leaf = st.one_of(
    st.sampled_from(EDGE_INTS), st.integers(-2**70, 2**70), st.integers(-3, 300),
    st.sampled_from(EDGE_FLOATS), st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(), st.none(), st.sampled_from(EDGE_STRINGS), st.text(max_size=12))
nasty = st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=5),
                                               st.dictionaries(st.text(max_size=6), c, max_size=3)),
                     max_leaves=8)


# -- manifest mutations -----------------------------------------------------------------------

def strings_of(man: dict) -> list[str]:
    return sorted({v for p in all_paths(man) for v in [get_at(man, p)] if isinstance(v, str)})


def perturb(data, man: dict, path: tuple) -> tuple[Any, str]:
    """A plausible lie about the value at ``path``: close to the truth, or another real value."""
    v = get_at(man, path)
    if isinstance(v, bool):
        return not v, "flip"
    if isinstance(v, int):
        how = data.draw(st.sampled_from(["delta", "double", "half", "zero", "negate", "plus-itemsize"]))
        if how == "delta":
            d = data.draw(st.integers(-65, 65).filter(lambda x: x != 0))
            return v + d, f"{v}{d:+d}"
        return {"double": v * 2, "half": v // 2, "zero": 0, "negate": -v, "plus-itemsize": v + 4}[how], how
    if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        v = list(v)
        how = data.draw(st.sampled_from(["element", "append", "pop", "reverse", "prepend-1", "zero"]))
        if how == "element" and v:
            i = data.draw(st.integers(0, len(v) - 1))
            v[i] = data.draw(st.sampled_from([v[i] + 1, v[i] - 1, v[i] * 2, 0, 1, -1, v[i] // 2]))
        elif how == "append":
            v.append(data.draw(st.sampled_from([0, 1, 2, 64])))
        elif how == "pop" and v:
            v.pop(data.draw(st.integers(0, len(v) - 1)))
        elif how == "reverse":
            v.reverse()
        elif how == "prepend-1":
            v.insert(0, 1)
        elif v:
            v[data.draw(st.integers(0, len(v) - 1))] = 0
        return v, how
    if isinstance(v, str):
        how = data.draw(st.sampled_from(["other-real", "char", "drop-last", "append"]))
        if how == "other-real":
            return data.draw(st.sampled_from(strings_of(man) + PLAUSIBLE_STRINGS)), how
        if how == "char" and v:
            i = data.draw(st.integers(0, len(v) - 1))
            c = data.draw(st.sampled_from("0f9aA_.:"))
            return v[:i] + c + v[i + 1:], how
        if how == "drop-last":
            return v[:-1], how
        return v + data.draw(st.sampled_from(["0", "x", ".so", "/", "\x00"])), how
    if isinstance(v, list) and v:
        how = data.draw(st.sampled_from(["duplicate", "drop", "swap", "reverse"]))
        v = list(v)
        i = data.draw(st.integers(0, len(v) - 1))
        if how == "duplicate":
            v.insert(i, copy.deepcopy(v[i]))
        elif how == "drop":
            v.pop(i)
        elif how == "swap":
            j = data.draw(st.integers(0, len(v) - 1))
            v[i], v[j] = v[j], v[i]
        else:
            v.reverse()
        return v, how
    return data.draw(nasty), "nasty"


def constants(man: dict) -> list[tuple]:
    return [("methods", m, "constants", i) for m in man["methods"] for i in range(len(man["methods"][m]["constants"]))]


def weights(man: dict) -> list[tuple]:
    return [("weights", k) for k in man["weights"]]


def retarget(man: dict, old: str, new: str) -> None:
    for m in man["methods"].values():
        for c in m["constants"]:
            if c["weight"] == old:
                c["weight"] = new


def set_weight_identity(man: dict, wid: str, digest: str, mutable: bool) -> str:
    """Give weight ``wid`` a digest and mutability, and keep the manifest self-consistent
    (its id, its key, its constants' references, digests and flags)."""
    w = man["weights"].pop(wid)
    fqn = (w.get("fqns") or [w["tensor"]])[0]
    new_id = f"{fqn}@{digest.partition(':')[2][:16]}" if mutable else digest
    w.update(id=new_id, digest=digest, mutable=mutable)
    man["weights"][new_id] = w
    retarget(man, wid, new_id)
    for m in man["methods"].values():
        for c in m["constants"]:
            if c["weight"] == new_id:
                c["digest"], c["mutable"] = digest, mutable
    return new_id


def mutate_manifest(data, man: dict) -> tuple[dict, dict]:
    """Returns (write options, description); mutates ``man`` in place."""
    op = data.draw(st.sampled_from([
        "replace-nasty", "replace-nasty", "replace-raw", "delete", "add-key", "perturb", "perturb", "perturb",
        "swap-constant-field", "swap-weight-field", "swap-paths", "duplicate-key",
        "coherent-flip-mutable", "coherent-adopt-digest", "coherent-swap-digests", "call-spec"]))
    desc: dict = {"op": op}
    opts: dict = {}
    paths = all_paths(man)
    if op in ("replace-nasty", "replace-raw", "delete", "add-key", "perturb"):
        path = paths[data.draw(st.integers(0, len(paths) - 1))]
        desc["path"] = list(path)
        if op == "replace-nasty":
            value = data.draw(nasty)
            desc["value"] = repr(value)[:200]
            man = set_at(man, path, value)
        elif op == "replace-raw":
            raw = data.draw(st.sampled_from(RAW_TEXT))
            desc["raw"] = raw[:80]
            man = set_at(man, path, _RAW)
            opts["raw"] = raw
        elif op == "delete" and path:
            parent = get_at(man, path[:-1])
            del parent[path[-1]]
        elif op == "add-key":
            target = get_at(man, path)
            value = data.draw(nasty)
            if isinstance(target, dict):
                key = data.draw(st.one_of(st.sampled_from(["id", "name", "shape", "stride", "mutable",
                                                           "version", "x", ""]), st.text(max_size=6)))
                target[key] = value
                desc["key"] = key
            elif isinstance(target, list):
                target.append(value)
            desc["value"] = repr(value)[:200]
        elif op == "perturb":
            value, how = perturb(data, man, path)
            desc.update(how=how, value=repr(value)[:200])
            man = set_at(man, path, value)
    elif op == "swap-constant-field":
        cs = constants(man)
        a, b = data.draw(st.sampled_from(cs)), data.draw(st.sampled_from(cs))
        f = data.draw(st.sampled_from(["name", "fqn", "dtype", "shape", "stride", "storage_offset", "data_size",
                                       "kind", "mutable", "digest", "weight"]))
        ca, cb = get_at(man, a), get_at(man, b)
        ca[f], cb[f] = cb[f], ca[f]
        desc.update(a=list(a), b=list(b), field=f)
    elif op == "swap-weight-field":
        ws = weights(man)
        a, b = data.draw(st.sampled_from(ws)), data.draw(st.sampled_from(ws))
        f = data.draw(st.sampled_from(["id", "tensor", "offset", "nbytes", "digest", "mutable", "fqns"]))
        wa, wb = get_at(man, a), get_at(man, b)
        wa[f], wb[f] = wb[f], wa[f]
        desc.update(a=list(a), b=list(b), field=f)
    elif op == "swap-paths":
        p, q = data.draw(st.sampled_from(paths[1:])), data.draw(st.sampled_from(paths[1:]))
        if p[:len(q)] != q and q[:len(p)] != p:       # neither contains the other
            vp, vq = copy.deepcopy(get_at(man, p)), copy.deepcopy(get_at(man, q))
            set_at(man, p, vq)
            set_at(man, q, vp)
        desc.update(a=list(p), b=list(q))
    elif op == "duplicate-key":
        key = data.draw(st.sampled_from(["format", "version", "device", "methods", "weights", "store", "so",
                                         "shape", "stride", "storage_offset", "weight", "offset", "nbytes",
                                         "mutable", "digest", "id", "name", "inputs"]))
        value = data.draw(st.one_of(st.sampled_from(['0', '1', 'true', 'null', '"cpu"', '[]', '{}', '[1]', '2']),
                                    nasty.map(json.dumps)))
        opts["dup"] = (key, value)
        desc.update(key=key, value=value[:80])
    elif op == "call-spec":
        # a well-formed pytree spec that is not the method's (other structure, other leaf count)
        from torch.utils import _pytree as pytree

        name = data.draw(st.sampled_from(sorted(man["methods"])))
        field = data.draw(st.sampled_from(["in_spec", "out_spec"]))
        tree = data.draw(st.sampled_from([0, (0,), (0, 1), [0, 1, 2], {"a": 0}, ((0,), {}), ((0, 1), {}),
                                          ((), {"x": 0}), (0, (1, 2)), None]))
        man["methods"][name][field] = pytree.treespec_dumps(pytree.tree_flatten(tree)[1])
        desc.update(method=name, field=field, tree=repr(tree))
    elif op == "coherent-flip-mutable":
        wid = data.draw(st.sampled_from(list(man["weights"])))
        w = man["weights"][wid]
        mutable = not w["mutable"]
        if not mutable and w["digest"] in man["weights"]:
            desc["skipped"] = "digest taken"
        else:
            set_weight_identity(man, wid, w["digest"], mutable)
        desc.update(weight=wid, mutable=mutable)
    elif op == "coherent-adopt-digest":
        # weight A claims weight B's digest; B is dropped and its constants use A's bytes. With the
        # intact bundle loaded, A's key hits the intact model's buffer for B.
        ids = list(man["weights"])
        a, b = data.draw(st.sampled_from(ids)), data.draw(st.sampled_from(ids))
        if a != b:
            digest = man["weights"][b]["digest"]
            mutable = data.draw(st.booleans())
            man["weights"].pop(b)
            retarget(man, b, a)
            set_weight_identity(man, a, digest, mutable)
            desc["mutable"] = mutable
        desc.update(a=a, b=b)
    elif op == "coherent-swap-digests":
        ids = [k for k, w in man["weights"].items() if not w["mutable"]]
        a, b = data.draw(st.sampled_from(ids)), data.draw(st.sampled_from(ids))
        if a != b:
            da, db = man["weights"][a]["digest"], man["weights"][b]["digest"]
            tmp = next(d for d in ("b3t:" + "f" * 64, "b3t:" + "e" * 64) if d not in man["weights"])
            set_weight_identity(man, a, tmp, False)     # a -> a free key, b -> a's, then a -> b's
            set_weight_identity(man, b, da, False)
            set_weight_identity(man, tmp, db, False)
        desc.update(a=a, b=b)
    return man, opts, desc


# -- store mutations ---------------------------------------------------------------------------

def split_store(store: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", store[:8])
    return json.loads(store[8:8 + n]), store[8 + n:]


def join_store(header_text: bytes, body: bytes) -> bytes:
    header_text += b" " * (-len(header_text) % 8)
    return struct.pack("<Q", len(header_text)) + header_text + body


def agree(man: dict, header_text: bytes) -> None:
    """Make the manifest's weight offsets/sizes agree with a (possibly lying) header."""
    start = 8 + len(header_text) + (-len(header_text) % 8)
    try:
        seen = json.loads(header_text)
    except ValueError:
        return
    for w in man.get("weights", {}).values():
        e = seen.get(w.get("tensor")) if isinstance(seen, dict) else None
        offs = e.get("data_offsets") if isinstance(e, dict) else None
        if isinstance(offs, list) and len(offs) == 2 and all(isinstance(x, int) for x in offs):
            w["offset"], w["nbytes"] = start + offs[0], offs[1] - offs[0]


def mutate_store(data, man: dict, store: bytes) -> tuple[bytes, dict]:
    op = data.draw(st.sampled_from(["truncate", "flip-header", "flip-data", "lying-offsets", "lying-offsets",
                                    "duplicate-key", "length-field", "header-field", "append", "shrink-weight"]))
    desc: dict = {"store_op": op}
    header, body = split_store(store)
    names = [k for k in header if k != "__metadata__"]
    (hlen,) = struct.unpack("<Q", store[:8])
    if op == "truncate":
        cut = data.draw(st.one_of(st.integers(0, len(store)), st.integers(len(store) - 300, len(store) - 1)))
        desc["to"] = cut
        return store[:max(cut, 0)], desc
    if op in ("flip-header", "flip-data"):
        lo, hi = (0, 8 + hlen) if op == "flip-header" else (8 + hlen, len(store))
        b = bytearray(store)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(lo, hi - 1))
            b[i] ^= data.draw(st.sampled_from([1, 0x20, 0x80, 0xFF]))
        desc["range"] = [lo, hi]
        return bytes(b), desc
    if op == "length-field":
        new = data.draw(st.sampled_from([0, 1, hlen - 8, hlen - 1, hlen + 1, hlen + 8, 2**63, 2**64 - 1,
                                         len(store), 100_000_001]))
        desc["hlen"] = new
        return struct.pack("<Q", new) + store[8:], desc
    if op == "append":
        return store + data.draw(st.sampled_from([b"\0", b"\0" * 8, b" " * 64, b"x" * 1000])), desc
    name = data.draw(st.sampled_from(names))
    desc["tensor"] = name
    coherent = data.draw(st.booleans())
    desc["coherent"] = coherent
    if op == "shrink-weight":
        # drop the tail of one tensor, rebuild a valid store, make the manifest agree and shrink the
        # views so they fit: only the .so knows the constant is bigger than that
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
        cut = data.draw(st.sampled_from([4, 64, 256, 1024]))
        new_body, new_header = b"", {"__metadata__": header.get("__metadata__", {})}
        for k, v in entries:
            lo, hi = v["data_offsets"]
            chunk = body[lo:hi]
            if k == name and len(chunk) > cut:
                chunk = chunk[:len(chunk) - cut]
                new_header[k] = {"dtype": "U8", "shape": [len(chunk)], "data_offsets": [len(new_body), len(new_body) + len(chunk)]}
            else:
                new_header[k] = dict(v, data_offsets=[len(new_body), len(new_body) + len(chunk)])
            new_body += chunk
        text = json.dumps(new_header).encode()
        agree(man, text)
        for w in man["weights"].values():
            if w["tensor"] == name:
                for m in man["methods"].values():
                    for c in m["constants"]:
                        if c["weight"] == w["id"] and c["shape"]:
                            c["data_size"] = w["nbytes"]
                            size = ITEMSIZE.get(c["dtype"], 1)
                            while c["shape"][0] > 0 and _extent(c, size) > w["nbytes"]:
                                c["shape"][0] -= 1
        return join_store(text, new_body), desc
    entry = header[name]
    if op == "lying-offsets":
        lo, hi = entry["data_offsets"]
        other = header[data.draw(st.sampled_from(names))]["data_offsets"]
        new = data.draw(st.sampled_from([
            [lo - 8, hi], [lo - 64, hi - 64], [lo + 4, hi + 4], [lo, hi + 4], [hi, lo], list(other),
            [other[0], other[0] + (hi - lo)], [-lo - 1, hi], [lo, len(body) + 8], [lo + 0.0, hi], [lo], [lo, hi, hi]]))
        entry["data_offsets"] = new
        desc["data_offsets"] = repr(new)
        text = json.dumps(header).encode()
    elif op == "duplicate-key":
        other = header[data.draw(st.sampled_from(names))]
        text = json.dumps(header)[:-1].encode() + b", " + json.dumps(name).encode() + b": " + json.dumps(other).encode() + b"}"
    else:   # header-field
        f = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        entry[f] = data.draw(st.one_of(nasty, st.sampled_from(["F64", "F16", "U8", "BOOL", "I64", [1], [0], [2**62]])))
        desc["field"], desc["value"] = f, repr(entry[f])[:100]
        text = json.dumps(header).encode()
    if coherent:
        agree(man, text)
    return join_store(text, body), desc


def _extent(c: dict, size: int) -> int:
    if any(s == 0 for s in c["shape"]):
        return c["storage_offset"] * size
    return (c["storage_offset"] + sum((s - 1) * t for s, t in zip(c["shape"], c["stride"])) + 1) * size


# -- the driver ----------------------------------------------------------------------------------

def in_child(fn, timeout: float, quiet: bool = False) -> tuple[Any, str | None]:
    """``fn()`` in a forked child: (its JSON result, None), or (None, "hang: ..." or "crash: ...")
    where it hung past ``timeout`` seconds, died, or returned nothing. ``quiet``: the child's
    stderr goes to /dev/null."""
    import select

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:       # the child: never returns
        try:
            os.close(r)
            if quiet:
                with open(os.devnull, "w") as null:
                    os.dup2(null.fileno(), 2)
            os.write(w, json.dumps(fn(), default=repr).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(r)
            return None, f"hang: no result after {timeout} s"
        b = os.read(r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return None, f"crash: signal {os.WTERMSIG(status)}"
    try:
        return json.loads(b"".join(chunks)), None
    except ValueError:
        return None, f"crash: child exit status {status}, no result"


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of a fuzzing run, the same for every driver."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--fork", action="store_true",
                    help="run each case in a forked child: a crash or hang is recorded and fuzzing goes on")
    ap.add_argument("--timeout", type=float, default=60, help="--fork: seconds before a case is a hang")
    ap.add_argument("--keep", type=Path, help="copy the files of each failing case into this directory")


def drive(fz: "Fuzzer", args: argparse.Namespace) -> int:
    """Run ``args.cases`` cases drawn from ``args.seed``, then print the report's JSON line."""
    fz.fork, fz.timeout, fz.keep = args.fork, args.timeout, args.keep
    t0 = time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(st.data())
    def fuzz(data):
        fz.case(data)

    fuzz()
    fz.intact.close()
    print(json.dumps(fz.report(time.perf_counter() - t0), default=repr), flush=True)
    return 0


class Fuzzer:
    """Loads a mutated copy of an intact artifact (:attr:`target`) per case, with the oracles of
    the module's docstring. This class mutates bundles; tests/fuzz_package.py's subclass,
    ``.pt2`` packages (it overrides what names the artifact: ``__init__``, :meth:`case`,
    :attr:`files`)."""

    #: the files of the scratch artifact a failing case's reproducer keeps
    files = (MANIFEST, STORE, "last_case.json")

    def __init__(self, bundle: Path, scratch: Path):
        self.bundle, self.scratch = bundle, scratch
        self.manifest = json.loads((bundle / MANIFEST).read_text())
        self.store = (bundle / STORE).read_bytes()
        scratch.mkdir(parents=True, exist_ok=True)
        for f in bundle.iterdir():
            if f.suffix == ".so":
                shutil.copyfile(f, scratch / f.name)
        self.target = scratch
        self.inputs = {m: example_inputs(self.manifest, m) for m in self.manifest["methods"]}
        self.start()

    def start(self) -> None:
        """Load the intact artifact, take its reference outputs and the allocation baseline;
        no case has run yet."""
        self.load_intact()
        self.baseline = aoti_rt.cache_stats("cpu")["bytes_allocated"]
        self.written_store: bytes | None = None
        self.cases = self.loaded = self.wrong = self.leaks = 0
        self.rejected: Counter = Counter()
        self.call_rejected: Counter = Counter()
        self.failures: list[dict] = []
        self.wrong_cases: list[dict] = []
        self.clock = time.time_ns()
        self.fork, self.timeout, self.keep = False, 60.0, None

    def load_intact(self) -> None:
        """(Re)load the intact artifact and take its reference outputs."""
        self.intact = aoti_rt.load(self.bundle, device="cpu")
        self.reference = self.run(self.intact)
        if self.run(self.intact) != self.reference:
            raise SystemExit("the intact model is not deterministic: no oracle")

    def run(self, model) -> dict[str, list[bytes]]:
        """Every method of ``model`` on the fixed inputs."""
        return run_all(model, self.inputs)

    def write(self, manifest_bytes: bytes, store: bytes, desc: dict) -> None:
        (self.scratch / "last_case.json").write_text(json.dumps(desc, default=repr))
        self.clock += 1_000_000      # a distinct mtime per case, so no stale check is reused
        if store is not self.written_store:
            (self.scratch / STORE).write_bytes(store)
            self.written_store = store
        os.utime(self.scratch / STORE, ns=(self.clock, self.clock))
        (self.scratch / MANIFEST).write_bytes(manifest_bytes)
        os.utime(self.scratch / MANIFEST, ns=(self.clock, self.clock))

    def case(self, data) -> None:
        man = copy.deepcopy(self.manifest)
        store = self.store
        where = data.draw(st.sampled_from(["manifest", "manifest", "manifest", "store", "both", "two-manifest"]))
        desc: dict = {"where": where}
        opts: dict = {}
        if where in ("store", "both"):
            store, d = mutate_store(data, man, store)
            desc.update(d)
        if where in ("manifest", "both", "two-manifest"):
            man, opts, d = mutate_manifest(data, man)
            desc["manifest"] = d
        if where == "two-manifest":
            try:      # the first lie may have broken what the second one looks for
                second = copy.deepcopy(man)
                second, opts2, d = mutate_manifest(data, second)
            except (KeyError, TypeError, IndexError, AttributeError, ValueError):
                pass
            else:
                man, desc["manifest2"] = second, d
                opts = opts or opts2
        self.write(dumps(man, opts.get("raw"), opts.get("dup")), store, desc)
        self.cases += 1
        self.run_case(desc)

    def run_case(self, desc: dict) -> dict:
        """Attempt the written case (in a child with :attr:`fork`) and count what came of it."""
        if self.fork:
            out = self._attempt_in_child(desc)
        else:
            out = self._attempt()
        if "rejected" in out:
            self.rejected[out["rejected"]] += 1
        if out.get("loaded"):
            self.loaded += 1
        if "call_rejected" in out:
            self.call_rejected[out["call_rejected"]] += 1
        failure = out.get("failure")
        if failure:
            failure["case"] = desc
            self.failures.append(failure)
        if out.get("wrong"):
            self.wrong += 1
            self.wrong_cases.append(desc)
        if out.get("leak"):
            self.leaks += 1
            self.failures.append({"error": "leak", "message": out["leak"], "case": desc})
        if (failure or out.get("wrong") or out.get("leak")) and self.keep is not None:
            d = self.keep / f"case-{self.cases:06d}"
            d.mkdir(parents=True, exist_ok=True)
            for f in self.files:
                shutil.copyfile(self.scratch / f, d / f)
        return out

    def _attempt(self) -> dict:
        """Load the scratch bundle, run it (its outputs: :attr:`last_outputs`), check the
        intact model. Never raises."""
        out: dict = {}
        model = None
        self.last_outputs = None
        try:
            try:
                model = aoti_rt.load(self.target, device="cpu")
            except aoti_rt.AotiRtError as e:
                out["rejected"] = type(e).__name__
            else:
                out["loaded"] = True
                try:
                    self.last_outputs = self.run(model)
                except aoti_rt.AotiRtError as e:
                    out["call_rejected"] = type(e).__name__
                finally:
                    model.close()
                    model = None
        except Exception as e:  # noqa: BLE001 - the oracle: nothing but AotiRtError may escape
            out["failure"] = {"error": type(e).__name__, "message": str(e)[:300]}
            if model is not None:
                try:
                    model.close()
                except Exception:  # noqa: BLE001
                    pass
        if self.run(self.intact) != self.reference:
            out["wrong"] = True
            if not self.fork:        # start over from a fresh intact model
                self.intact.close()
                self.load_intact()
        if aoti_rt.cache_stats("cpu")["bytes_allocated"] != self.baseline:
            gc.collect()
            now = aoti_rt.cache_stats("cpu")["bytes_allocated"]
            if now != self.baseline:
                out["leak"] = f"{now - self.baseline} bytes left allocated"
                self.baseline = now
        return out

    def _attempt_in_child(self, desc: dict) -> dict:
        """--fork: the attempt in a forked child, so a crash or a hang costs one case, not the run."""
        result, problem = in_child(self._attempt, self.timeout)
        if problem is not None:
            return {"failure": {"error": problem.partition(":")[0], "message": problem}}
        return result

    def report(self, seconds: float) -> dict:
        failures = [f for f in self.failures if f["error"] != "leak"]
        return {"cases": self.cases, "loaded": self.loaded, "rejected": dict(self.rejected),
                "call_rejected": dict(self.call_rejected),
                "non_aoti_errors": [f for f in failures if f["error"] not in ("crash", "hang")][:20],
                "crashes": [f for f in failures if f["error"] in ("crash", "hang")][:20],
                "failure_counts": dict(Counter(f["error"] for f in self.failures)),
                "wrong_results": self.wrong, "wrong_result_cases": self.wrong_cases[:5],
                "leaks": self.leaks, "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="an intact compiled bundle (CPU)")
    ap.add_argument("--scratch", type=Path, required=True, help="a directory for the mutated bundle")
    add_run_arguments(ap)
    args = ap.parse_args(argv)
    return drive(Fuzzer(args.bundle.resolve(), args.scratch.resolve()), args)


if __name__ == "__main__":
    sys.exit(main())
