"""Fuzz aoti_rt.load with mutations of a real ``.pt2`` package (torch's aoti_compile_and_package).

    python tests/fuzz_package.py --package FILE.pt2 --scratch DIR --seed S --cases N

Hypothesis draws each case: bytes flipped in one part of the archive (the end record, the
central directory, a local header, a JSON entry, a weight entry, anywhere), the archive cut
short, a field of the end record, of a central directory record or of a local header set to an
edge value or near its own, or the archive rewritten by :mod:`zipfile` with an entry dropped,
repeated, added under an odd name, deflated, or a JSON entry (``weights_config.json``, a
model's ``*_metadata.json``) changed at one of its paths (as tests/fuzz_bundle.py changes a
manifest). For a package of ``pickle_weights``, the ``torch.save`` zip inside a weight entry is
mutated the same ways. The case is written to ``SCRATCH/case.pt2`` (a new mtime each time, so
no probe record of an earlier case is reused), then ``aoti_rt.load(case, device="cpu")``; if
it loads, every method runs on a fixed input and the model is closed.

The oracles are tests/fuzz_bundle.py's: nothing but an :class:`aoti_rt.AotiRtError` escapes;
the intact package, loaded once and kept open, computes bitwise the same after every case;
aoti_rt's allocations are back to the intact model's after each; a crash or hang is found by
the caller (tests/test_fuzz.py), ``SCRATCH/last_case.json`` naming the case. With
``--differential``, a package that loads must also compute bitwise what torch's own loader
computes from the same file, where torch loads it (in a forked child: torch's loader is not
the one under test, and its crashes are not counted). The ``.so`` is
the package's code, which loading runs (the README's line of trust); bytes flipped in it are
refused by the CRC-32 the archive records for it, as any change of an extracted entry is.

Prints fuzz_bundle's JSON line at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import sys
import warnings
import zipfile
from pathlib import Path

from fuzz_bundle import (EDGE_INTS, EDGE_STRINGS, Fuzzer, add_run_arguments, all_paths,  # sets up aoti_rt
                         drive, in_child, nasty, perturb, run_all, set_at)

import torch  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EOCD, CENTRAL, LOCAL = b"PK\x05\x06", b"PK\x01\x02", b"PK\x03\x04"
#: (offset, struct format) of the fields a mutation may rewrite
EOCD_FIELDS = [(8, "<H"), (10, "<H"), (12, "<I"), (16, "<I"), (20, "<H")]
CENTRAL_FIELDS = [(8, "<H"), (10, "<H"), (16, "<I"), (20, "<I"), (24, "<I"), (28, "<H"), (30, "<H"),
                  (32, "<H"), (42, "<I")]
LOCAL_FIELDS = [(6, "<H"), (8, "<H"), (14, "<I"), (18, "<I"), (22, "<I"), (26, "<H"), (28, "<H")]
ODD_NAMES = ["data/aotinductor/model/../../evil.so", "data/aotinductor/.x/a.so", "data/aotinductor/model/",
             "data/aotinductor/model/sub/x.so", "data/weights/weight_9", "data/weights/../weight_0",
             "archive_format", "data/aotinductor/model/model_metadata.json", "/abs.so", "a\\b.so"]


class Layout:
    """Where the parts of a zip archive lie: (start, end) byte ranges."""

    def __init__(self, data: bytes):
        self.data = data
        e = data.rfind(EOCD)
        self.eocd = (e, e + 22) if e >= 0 else (max(0, len(data) - 22), len(data))
        self.central: list[tuple[int, int]] = []      # each central directory record
        self.local: list[tuple[int, int]] = []        # each local header (with its name)
        self.body: dict[str, tuple[int, int]] = {}    # each entry's data, by name
        i = data.find(CENTRAL)
        while 0 <= i <= len(data) - 46:
            nlen, xlen, clen = struct.unpack_from("<HHH", data, i + 28)
            csize, at = struct.unpack_from("<I", data, i + 20)[0], struct.unpack_from("<I", data, i + 42)[0]
            name = data[i + 46:i + 46 + nlen].decode("utf-8", "replace")
            self.central.append((i, i + 46 + nlen + xlen + clen))
            if data[at:at + 4] == LOCAL:
                ln, lx = struct.unpack_from("<HH", data, at + 26)
                self.local.append((at, at + 30 + ln))
                self.body[name] = (at + 30 + ln + lx, at + 30 + ln + lx + csize)
            i = data.find(CENTRAL, i + 46 + nlen + xlen + clen)

    def region(self, data, kind: str) -> tuple[int, int]:
        n = len(self.data)
        if kind == "eocd":
            return self.eocd
        if kind == "central" and self.central:
            return data.draw(st.sampled_from(self.central))
        if kind == "local" and self.local:
            return data.draw(st.sampled_from(self.local))
        if kind in ("json", "weights"):
            names = [k for k in self.body if (k.endswith(".json") if kind == "json"
                                              else "/data/weights/" in k or k.endswith("_weights.blob"))]
            if names:      # else (weights inside the .so) anywhere
                return self.body[data.draw(st.sampled_from(sorted(names)))]
        return 0, n


def _field_value(data, old: int, fmt: str) -> int:
    top = (1 << (8 * struct.calcsize(fmt))) - 1
    v = data.draw(st.one_of(st.sampled_from(EDGE_INTS), st.integers(-70, 70).map(lambda d: old + d),
                            st.sampled_from([old * 2, old // 2, 0, top])))
    return v & top


def mutate_bytes(data, raw: bytes, desc: dict) -> bytes:
    """A byte-level lie about an archive: flips, a cut, or a header field rewritten."""
    lay = Layout(raw)
    out = bytearray(raw)
    op = data.draw(st.sampled_from(["flip", "flip", "truncate", "eocd-field", "central-field", "central-field",
                                    "local-field"]))
    desc["op"] = op
    if op in ("flip", "truncate"):
        kind = data.draw(st.sampled_from(["eocd", "central", "local", "json", "weights", "anywhere"]))
        a, b = lay.region(data, kind)
        if b <= a:
            a, b = 0, len(raw)
        desc["region"] = kind
        if op == "truncate":
            cut = data.draw(st.integers(a, b))
            desc["at"] = cut
            return bytes(out[:cut])
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(a, max(a, b - 1)))
            out[at] ^= data.draw(st.integers(1, 255))
            desc.setdefault("at", []).append(at)
        return bytes(out)
    if op == "eocd-field":
        start, fields = lay.eocd[0], EOCD_FIELDS
    elif op == "central-field" and lay.central:
        start, fields = data.draw(st.sampled_from(lay.central))[0], CENTRAL_FIELDS
    elif lay.local:
        start, fields = data.draw(st.sampled_from(lay.local))[0], LOCAL_FIELDS
    else:
        return raw
    off, fmt = data.draw(st.sampled_from(fields))
    if start + off + struct.calcsize(fmt) > len(out):
        return raw
    old = struct.unpack_from(fmt, out, start + off)[0]
    new = _field_value(data, old, fmt)
    struct.pack_into(fmt, out, start + off, new)
    desc.update(record=start, field=off, old=old, new=new)
    return bytes(out)


def _json_lie(data, text: bytes, desc: dict) -> bytes:
    try:
        obj = json.loads(text)
    except ValueError:
        return text
    path = data.draw(st.sampled_from(all_paths(obj)))
    how = data.draw(st.sampled_from(["perturb", "perturb", "nasty"]))
    value = perturb(data, obj, path)[0] if how == "perturb" and path else data.draw(nasty)
    desc.update(json_path=list(path), how=how)
    return json.dumps(set_at(obj, path, value)).encode("utf-8", "surrogatepass")


def rewrite(data, raw: bytes, desc: dict, inner: bool = False) -> bytes:
    """The archive rewritten by zipfile: one entry dropped, repeated, added, deflated or (a
    JSON entry) changed; for a pickled weight entry, its own zip mutated (``inner``)."""
    try:
        zin = zipfile.ZipFile(io.BytesIO(raw))
        infos = zin.infolist()
    except (zipfile.BadZipFile, ValueError, OSError):
        return raw
    names = [i.filename for i in infos]
    ops = ["drop", "repeat", "add", "deflate", "json", "json"]
    weights = [n for n in names if "/data/weights/" in n]
    if weights and not inner:
        ops += ["inner", "inner"]
    op = data.draw(st.sampled_from(ops))
    target = data.draw(st.sampled_from(names)) if names else ""
    if op == "json":
        js = [n for n in names if n.endswith(".json")]
        if not js:
            return raw
        target = data.draw(st.sampled_from(js))
    elif op == "inner":
        target = data.draw(st.sampled_from(weights))
    desc.update(rewrite=op, entry=target)
    buf = io.BytesIO()
    root = names[0].split("/")[0] if names else "x"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # "Duplicate name"
        with zipfile.ZipFile(buf, "w") as zout:
            for name in names:
                body = zin.read(name)
                if name == target:
                    if op == "drop":
                        continue
                    if op == "json":
                        body = _json_lie(data, body, desc)
                    elif op == "inner":
                        sub: dict = {}
                        body = mutate_bytes(data, body, sub) if data.draw(st.booleans()) else \
                            rewrite(data, body, sub, inner=True)
                        desc["inner"] = sub
                method = zipfile.ZIP_DEFLATED if op == "deflate" and name == target else zipfile.ZIP_STORED
                zout.writestr(zipfile.ZipInfo(name), body, compress_type=method)
                if op == "repeat" and name == target:
                    zout.writestr(zipfile.ZipInfo(name), body)
            if op == "add":
                name = data.draw(st.sampled_from(ODD_NAMES + [f"odd{s}" for s in EDGE_STRINGS if _encodable(s)]))
                desc["added"] = name
                zout.writestr(zipfile.ZipInfo(f"{root}/{name}"), data.draw(st.sampled_from([b"", b"x" * 64, raw[:4096]])))
    return buf.getvalue()


def _encodable(s: str) -> bool:
    """Whether zipfile can write ``s`` as a name (a lone surrogate it cannot)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class PackageFuzzer(Fuzzer):
    files = ("case.pt2", "last_case.json")
    #: also compare with torch's own loader (a forked child per case that loads)
    differential = False

    def __init__(self, package: Path, scratch: Path, shape: list[int]):
        self.bundle, self.scratch = package, scratch
        self.raw = package.read_bytes()
        scratch.mkdir(parents=True, exist_ok=True)
        self.target = scratch / "case.pt2"
        n = 1
        for d in shape:
            n *= d
        self.x = torch.linspace(-1.0, 1.0, n, dtype=torch.float32).reshape(shape)
        self.compared = 0
        self.start()

    def run(self, model) -> dict[str, list[bytes]]:
        return run_all(model, {m: [self.x] for m in model.methods})

    def _attempt(self) -> dict:
        """The base oracles, then with :attr:`differential`: a package aoti_rt loaded and ran
        must compute what torch's own loader computes from the same file, where torch loads it."""
        out = super()._attempt()
        if self.differential and self.last_outputs is not None and not out.get("failure"):
            theirs, _ = in_child(self._torch_outputs, self.timeout, quiet=True)
            if isinstance(theirs, dict):
                out["torch_loaded"] = True
                if theirs != {m: [o.hex() for o in outs] for m, outs in self.last_outputs.items()}:
                    out["failure"] = {"error": "differs-from-torch",
                                      "message": "aoti_rt's outputs differ from torch's own loader's"}
        return out

    def _torch_outputs(self) -> dict:
        """Every model of the case's package run by torch's own loader. Not
        ``aoti_load_package``: for ``pickle_weights`` packages it binds no weights, and the
        first call crashes (torch 2.11 - 2.13); ``load_pt2(load_weights_from_disk=True)`` binds
        them from ``weights_config.json``."""
        from torch.export.pt2_archive._package import load_pt2

        contents = load_pt2(str(self.target), load_weights_from_disk=True)
        outs = {}
        for name in self.intact.methods:
            fn = contents.aoti_runners[name]
            with torch.no_grad():
                y = fn(self.x)
            ys = y if isinstance(y, (tuple, list)) else [y]
            outs[name] = [t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes().hex() for t in ys]
        return outs

    def case(self, data) -> None:
        desc: dict = {}
        how = data.draw(st.sampled_from(["bytes", "bytes", "rewrite", "both"]))
        raw = self.raw
        if how in ("rewrite", "both"):
            raw = rewrite(data, raw, desc.setdefault("rewrite", {}))
        if how in ("bytes", "both"):
            raw = mutate_bytes(data, raw, desc.setdefault("bytes", {}))
        (self.scratch / "last_case.json").write_text(json.dumps(desc, default=repr))
        self.target.write_bytes(raw)
        self.clock += 1_000_000
        os.utime(self.target, ns=(self.clock, self.clock))
        self.cases += 1
        self.compared += bool(self.run_case(desc).get("torch_loaded"))

    def report(self, seconds: float) -> dict:
        return {**super().report(seconds), "compared_with_torch": self.compared}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", type=Path, required=True, help="an intact .pt2 package compiled for the CPU")
    ap.add_argument("--scratch", type=Path, required=True, help="a directory for the mutated package and the cache")
    ap.add_argument("--input-shape", default="3,64", help="the float32 input every method takes (default 3,64)")
    ap.add_argument("--differential", action="store_true",
                    help="a package that loads must compute what torch's own loader computes from it, "
                         "where torch loads it (a forked child per case)")
    add_run_arguments(ap)
    args = ap.parse_args(argv)
    os.environ["AOTI_RT_CACHE"] = str(args.scratch.resolve() / "cache")     # extracted files and records
    fz = PackageFuzzer(args.package.resolve(), args.scratch.resolve(), [int(d) for d in args.input_shape.split(",")])
    fz.differential = args.differential
    return drive(fz, args)


if __name__ == "__main__":
    sys.exit(main())
