"""A bundle is untrusted input: every way a manifest or store can lie is a BundleError.

Each test damages a copy of a real compiled bundle (tests/conftest.py) the way a corrupt,
truncated or malicious bundle would, and checks that ``aoti_rt.load`` raises BundleError
before anything is allocated. Unchecked, each of these would crash the process, hang, raise
a non-aoti_rt error, or load and compute garbage.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import re
import struct
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

import aoti_rt
from aoti_rt import bundle as bundle_mod
from aoti_rt.bundle import MANIFEST_MAX_BYTES, overlapping_dim, read_bundle

from damage import edit_manifest


def stats(device):
    return aoti_rt.cache_stats(device)


def _assert_rejected(b, device, match):
    """load(b) raises BundleError matching ``match`` and leaves no allocation behind."""
    base = stats(device)
    with pytest.raises(aoti_rt.BundleError, match=match) as err:
        aoti_rt.load(b, device=device)
    gc.collect()
    s = stats(device)
    assert s["bytes_allocated"] == base["bytes_allocated"] and s["entries"] == base["entries"]
    return err.value


def _edit_manifest_text(b, fn):
    p = b / "manifest.json"
    p.write_bytes(fn(p.read_bytes()))


def _constant(raw, method, fqn_part):
    return next(c for c in raw["methods"][method]["constants"] if fqn_part in c["fqn"])


# -- the manifest as JSON ----------------------------------------------------------------------

def test_version_true_is_not_version_1_or_2(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    edit_manifest(b, lambda r: r.__setitem__("version", True))    # True == 1 in Python
    _assert_rejected(b, device, r"version is bool True; this aoti_rt reads format version 2")


def test_old_format_version_says_recompile(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    edit_manifest(b, lambda r: r.__setitem__("version", 1))
    _assert_rejected(b, device, r"version is int 1.*recompile the bundle")


def test_oversized_manifest_is_refused_before_reading(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    p = b / "manifest.json"
    text = p.read_bytes()
    with open(p, "ab") as f:          # still valid JSON: whitespace after the object
        f.write(b" " * (MANIFEST_MAX_BYTES + 1 - len(text)))
    t0 = time.perf_counter()
    _assert_rejected(b, device, r"more than the 64 MiB a manifest may have")
    assert time.perf_counter() - t0 < 2


def test_manifest_not_utf8(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    _edit_manifest_text(b, lambda t: t.replace(b'"torch_version": "', b'"torch_version": "\xff\xfe', 1))
    _assert_rejected(b, device, r"not UTF-8 text")


def test_manifest_nested_too_deeply(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    deep = b"[" * 100_000 + b"]" * 100_000
    _edit_manifest_text(b, lambda t: re.sub(rb'"torch_version": "[^"]*"', b'"torch_version": ' + deep, t))
    _assert_rejected(b, device, r"nested too deeply")


def test_manifest_duplicate_keys(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    _edit_manifest_text(b, lambda t: t.replace(b'"device": "cpu"', b'"device": "cpu", "device": "cpu"', 1)
                        if b'"device": "cpu"' in t else t.replace(b'"device": ', b'"device": "cuda:0", "device": ', 1))
    _assert_rejected(b, device, r"key 'device' appears twice")


def test_manifest_nan(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    _edit_manifest_text(b, lambda t: re.sub(rb'"storage_offset": 0', b'"storage_offset": NaN', t, count=1))
    _assert_rejected(b, device, r"NaN is not a number JSON allows")


# -- the manifest's fields: types, ranges, views -----------------------------------------------

def _set_const(method, fqn_part, **fields):
    def edit(raw):
        _constant(raw, method, fqn_part).update(fields)
    return edit


def _set_input(**fields):
    def edit(raw):
        raw["methods"]["a"]["inputs"][0].update(fields)
    return edit


def _set_method(**fields):
    def edit(raw):
        raw["methods"]["a"].update(fields)
    return edit


def _set_weight(fqn_part, **fields):
    def edit(raw):
        w = next(w for w in raw["weights"].values() if fqn_part in w["tensor"])
        w.update(fields)
    return edit


def _transpose_stride(raw):      # a 64x64 weight read through a negative stride: inside the bytes
    c = _constant(raw, "a", "layers.0.weight")
    assert c["shape"] == [64, 64]
    c["stride"] = [64, -1]
    c["storage_offset"] = 63


def _rename_weight_key(raw):
    k = next(iter(raw["weights"]))
    raw["weights"]["other-" + k] = raw["weights"].pop(k)
    for m in raw["methods"].values():
        for c in m["constants"]:
            if c["weight"] == k:
                c["weight"] = "other-" + k


def _duplicate_constant_name(raw):
    cs = raw["methods"]["c"]["constants"]
    cs[1]["name"] = cs[0]["name"]


def _upper_digest(raw):
    for w in raw["weights"].values():
        w["digest"] = w["digest"].upper()


def _mutable_constant_of_immutable_weight(raw):
    raw["methods"]["a"]["constants"][0]["mutable"] = True


BAD_FIELDS = [
    # views: unchecked, each of these loads and then aborts, segfaults or reads past a buffer
    ("negative-stride", _transpose_stride, r"stride\[1\] must be an integer in \[0, 2\*\*62\), not int -1"),
    # views that load and compute garbage: a bias read as one broadcast value, a weight whose
    # rows overlap, a view reaching past the bytes the .so keeps for the constant
    ("broadcast-bias", _set_const("a", "inp.bias", stride=[0]),
     r"inp\.bias\)\.stride shape \[64\] with stride \[0\] repeats elements \(dimension 0\) of a 256-byte "
     r"weight it reaches only 4 bytes of: AOTI compiles no such constant, the manifest lies"),
    ("overlapping-rows", _set_const("a", "layers.0.weight", stride=[1, 1]), r"with stride \[1, 1\] repeats elements"),
    ("view-past-data-size", _set_const("a", "inp.bias", data_size=128),
     r"float32\[64\] with stride \[1\] at offset 0 reaches 256 bytes, but the \.so keeps 128 for it"),
    ("minus-zero-shape", _set_const("a", "inp.bias", shape=[-0.0]), r"shape\[0\] must be an integer.*float -0.0"),
    ("empty-view-huge-offset", _set_const("a", "inp.bias", shape=[0], storage_offset=10**9),
     r"storage_offset 1000000000 \(4000000000 bytes\) is past the end of its weight \(256 bytes\)"),
    ("empty-view-offset-2**64", _set_const("a", "inp.bias", shape=[0], storage_offset=2**64),
     r"storage_offset must be an integer in \[0, 2\*\*62\)"),
    ("empty-view-offset-just-past", _set_const("a", "inp.bias", shape=[0], storage_offset=65),
     r"storage_offset 65 \(260 bytes\) is past the end of its weight \(256 bytes\)"),
    ("bool-shape", _set_const("a", "inp.bias", shape=[True]), r"shape\[0\] must be an integer.*bool True"),
    ("float-offset", _set_const("a", "inp.bias", storage_offset=0.0), r"storage_offset must be an integer.*float 0.0"),
    ("string-shape", _set_const("a", "inp.bias", shape="64"), r"shape must be a list, not '64'"),
    ("null-stride", _set_const("a", "inp.bias", stride=None), r"stride must be a list, not NoneType None"),
    ("unknown-kind", _set_const("a", "inp.bias", kind="weird"), r"kind must be one of parameter"),
    ("nul-in-name", _set_const("a", "inp.bias", name="stack_inp\x00bias"), r"name must be a non-empty name without NUL"),
    ("lone-surrogate-name", _set_const("a", "inp.bias", name="\ud800"), r"name contains a lone surrogate"),
    ("missing-field", lambda r: r["methods"]["a"]["constants"][0].pop("dtype"), r"constants\[0\]\.dtype is missing"),
    ("huge-data-size", _set_const("a", "inp.bias", data_size=2**61), r"data_size 2305843009213693952 is more than"),
    ("duplicate-constant-name", _duplicate_constant_name, r"is used by another constant of the method"),
    ("constant-mutable-weight-not", _mutable_constant_of_immutable_weight, r"mutable is True but its weight's is False"),
    ("constant-digest-not-weight's", _set_const("a", "inp.bias", digest="b3t:" + "0" * 64), r"but its weight's is"),
    # weights
    ("weight-key-is-not-id", _rename_weight_key, r"weights\['other-.*'\]\.id is"),
    ("weight-digest-uppercase", _upper_digest, r'digest must be a digest "b3t:" \+ 64 lowercase hex digits'),
    ("weight-nbytes-bool", _set_weight("inp.bias", nbytes=True), r"nbytes must be an integer.*bool True"),
    ("weight-offset-negative", _set_weight("inp.bias", offset=-8), r"offset must be an integer.*int -8"),
    # methods and their inputs
    ("input-unknown-dtype", _set_input(dtype="float33"), r"inputs\[0\]\.dtype must be a dtype aoti_rt knows"),
    ("input-negative-dim", _set_input(shape=[3, -64]), r"inputs\[0\]\.shape\[1\] must be an integer"),
    ("input-shape-null", _set_input(shape=None), r"inputs\[0\]\.shape must be a list"),
    ("in-spec-int", _set_method(in_spec=5), r"in_spec must be a string, not int 5"),
    ("outputs-string", _set_method(outputs="x"), r"outputs must be a list, not 'x'"),
    ("methods-list", lambda r: r.__setitem__("methods", []), r"methods must be an object, not list \[\]"),
    ("no-methods", lambda r: r.__setitem__("methods", {}), r"methods is empty"),
    ("device-junk", lambda r: r.__setitem__("device", "cpu "), r"device must be 'cpu', 'cuda' or 'cuda:N'"),
]


@pytest.mark.parametrize("edit, says", [pytest.param(e, s, id=i) for i, e, s in BAD_FIELDS])
def test_bad_manifest_field(three_bundle, device, copy_bundle, edit, says):
    b = copy_bundle(three_bundle)
    edit_manifest(b, edit)
    err = _assert_rejected(b, device, says)
    assert "recompile" in str(err)


def test_unknown_keys_are_ignored(three_bundle, device, copy_bundle):
    import torch

    b = copy_bundle(three_bundle)

    def extra(raw):
        raw["future"] = {"x": [1, 2.5, None]}
        raw["methods"]["a"]["hint"] = "y"
        raw["methods"]["a"]["constants"][0]["note"] = -1
        next(iter(raw["weights"].values()))["extra"] = True
    edit_manifest(b, extra)
    x = torch.randn(3, 64, device=device)
    with aoti_rt.load(three_bundle, device=device, methods=["a"]) as intact:
        want = intact.a(x)
    with aoti_rt.load(b, device=device, methods=["a"]) as m:
        got = m.a(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))     # bitwise


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 13)), max_size=4))
def test_overlapping_dim_passes_no_view_that_repeats_an_element(dims):
    """Against brute force: a view that reaches one element twice is always flagged, at a
    dimension of size > 1 (an interleaved as_strided view with distinct elements, such as
    shape (3, 2) stride (2, 3), may be flagged too: no torch layout AOTI keeps is one)."""
    import itertools

    shape, stride = [s for s, _ in dims], [t for _, t in dims]
    offsets = [sum(i * t for i, t in zip(idx, stride)) for idx in itertools.product(*map(range, shape))]
    d = overlapping_dim(shape, stride)
    if len(set(offsets)) != len(offsets):
        assert d is not None, (shape, stride)
    if d is not None:
        assert shape[d] > 1
    nested = sorted((t, s) for s, t in dims if s > 1)
    if all(t >= 1 + sum(u * (n - 1) for u, n in nested[:k]) for k, (t, _) in enumerate(nested)):
        assert d is None, (shape, stride)      # dimensions that nest never repeat an element


def test_layouts_aoti_compiles_are_not_overlapping():
    """Contiguous, transposed, channels-last, a slice of a larger storage, size-1 dimensions
    with any stride, empty and 0-d views: all distinct elements."""
    import torch

    views = [torch.empty(8, 16), torch.empty(16, 32).t(), torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last),
             torch.empty(8, 16)[:, 3:7], torch.empty(8, 16)[2], torch.empty(4, 1, 6)[:, :, ::2],
             torch.empty(0, 5), torch.empty(()), torch.empty(3, 1).expand(3, 1)]
    for t in views:
        assert overlapping_dim(list(t.shape), list(t.stride())) is None, (t.shape, t.stride())
    assert overlapping_dim([1, 64], [0, 1]) is None and overlapping_dim([64, 1], [1, 999]) is None
    assert overlapping_dim([64], [0]) == 0 and overlapping_dim([3, 4], [1, 2]) == 1


# -- the store ---------------------------------------------------------------------------------

def _rewrite_store(b, edit):
    """Rewrite the store's header with ``edit(header) -> header bytes`` and make the manifest
    agree with the result as a last-key-wins parser reads it: the lie is consistent, only
    the strict header checks can catch it."""
    p = b / "weights.safetensors"
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    hb = edit(header)
    hb += b" " * (-len(hb) % 8)
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + body)
    start, seen = 8 + len(hb), json.loads(hb)

    def agree(raw):
        for w in raw["weights"].values():
            lo, hi = seen[w["tensor"]]["data_offsets"]
            if hi >= lo:
                w["offset"], w["nbytes"] = int(start + lo), int(hi - lo)
    edit_manifest(b, agree)


def _store_negative_offset(header):
    header["stack.inp.bias"]["data_offsets"][0] = -64       # the bias reads 64 header bytes
    return json.dumps(header).encode()


def _store_overlap(header):
    header["stack.layers.0.bias"]["data_offsets"] = list(header["stack.inp.bias"]["data_offsets"])
    return json.dumps(header).encode()


def _store_duplicate_key(header):
    text = json.dumps(header)
    return (text[:-1] + ', "stack.inp.bias": ' + json.dumps(header["stack.inp.bias"]) + "}").encode()


def _store_reversed(header):
    lo, hi = header["stack.inp.bias"]["data_offsets"]
    header["stack.inp.bias"]["data_offsets"] = [hi, lo]
    return json.dumps(header).encode()


def _store_float_offset(header):
    lo, hi = header["stack.inp.bias"]["data_offsets"]
    header["stack.inp.bias"]["data_offsets"] = [float(lo), hi]
    return json.dumps(header).encode()


def _store_wrong_shape(header):     # 256 bytes claimed as 65 float32: the library's own check
    header["stack.inp.bias"]["shape"] = [65]
    return json.dumps(header).encode()


@pytest.mark.parametrize("edit, says", [
    pytest.param(_store_negative_offset, r"data_offsets\[0\] must be an integer in \[0, 2\*\*62\), not int -64", id="negative"),
    pytest.param(_store_overlap, r"entries 'stack\.(inp|layers\.0)\.bias' and 'stack\.(inp|layers\.0)\.bias' overlap", id="overlap"),
    pytest.param(_store_duplicate_key, r"key 'stack\.inp\.bias' appears twice", id="duplicate-key"),
    pytest.param(_store_reversed, r"ends before it begins", id="reversed"),
    pytest.param(_store_float_offset, r"data_offsets\[0\] must be an integer", id="float-offset"),
    pytest.param(_store_wrong_shape, r"not a valid safetensors file", id="shape-vs-bytes"),
])
def test_store_header_lies(three_bundle, device, copy_bundle, edit, says):
    b = copy_bundle(three_bundle)
    _rewrite_store(b, edit)
    err = _assert_rejected(b, device, says)
    assert "weight store" in str(err)


def test_store_trailing_bytes(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    with open(b / "weights.safetensors", "ab") as f:
        f.write(b"\0" * 64)
    _assert_rejected(b, device, r"not a valid safetensors file")


def test_store_header_length_huge(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    with open(b / "weights.safetensors", "r+b") as f:
        f.write(struct.pack("<Q", 1 << 40))
    _assert_rejected(b, device, r"corrupt header")


def _load_guarded(target, fifo, device, seconds=10):
    """``aoti_rt.load(target)`` in a thread: its result (None or the exception), or a test
    failure if it is still running after ``seconds`` (then a writer that closes at once
    unblocks a reader stuck on ``fifo``, so the thread ends instead of hanging the run)."""
    result: list = []

    def load():
        try:
            aoti_rt.load(target, device=device).close()
            result.append(None)
        except BaseException as e:  # noqa: BLE001
            result.append(e)

    t = threading.Thread(target=load, daemon=True)
    t0 = time.perf_counter()
    t.start()
    t.join(seconds)
    hung = t.is_alive()
    if hung:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(seconds)
    assert not hung, f"load() blocked on the FIFO {fifo.name} for {seconds} s"
    return result[0], time.perf_counter() - t0


@pytest.mark.parametrize("name, says", [
    ("weights.safetensors", r"weight store .* is a FIFO, not a regular file"),
    ("manifest.json", r"manifest .* is a FIFO, not a regular file"),
    ("a.so", r"method 'a': shared object .* is missing or not a regular file"),
])
def test_a_fifo_in_a_bundle_is_refused_at_once(three_bundle, device, copy_bundle, name, says):
    """A bundle's file replaced by a FIFO (a plain open of one blocks until a writer comes) is a
    BundleError within seconds, with nothing left allocated."""
    b = copy_bundle(three_bundle)
    (b / name).unlink()
    os.mkfifo(b / name)
    base = stats(device)
    err, seconds = _load_guarded(b, b / name, device)
    assert isinstance(err, aoti_rt.BundleError), err
    assert re.search(says, str(err)), err
    assert seconds < 5
    gc.collect()
    assert stats(device)["bytes_allocated"] == base["bytes_allocated"]


def test_a_fifo_given_as_the_bundle_is_refused_at_once(tmp_path, device):
    """``load`` looks at a file's first bytes to tell a package from a bundle: on a FIFO that
    look must not block."""
    fifo = tmp_path / "model"
    os.mkfifo(fifo)
    err, seconds = _load_guarded(fifo, fifo, device)
    assert isinstance(err, aoti_rt.BundleError) and "not an aoti_rt bundle" in str(err), err
    assert seconds < 5


def test_store_is_a_directory(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    (b / "weights.safetensors").unlink()
    (b / "weights.safetensors").mkdir()
    _assert_rejected(b, device, r"is a directory, not a regular file")


# -- the checked-bundle memo is bounded ------------------------------------------------------

def test_checked_bundles_are_bounded(three_bundle, tmp_path):
    for k in range(bundle_mod.CHECKED_BUNDLES + 6):
        d = tmp_path / f"b{k}"
        d.mkdir()
        for f in three_bundle.iterdir():
            os.link(f, d / f.name)          # distinct bundles at no disk cost
        read_bundle(d)
        assert len(bundle_mod._checked) <= bundle_mod.CHECKED_BUNDLES
    # the most recent ones are still remembered
    assert (tmp_path / f"b{bundle_mod.CHECKED_BUNDLES + 5}").resolve() in bundle_mod._checked


# -- errors ------------------------------------------------------------------------------------

def test_cuda_and_allocation_errors_pickle():
    e = aoti_rt.CudaError("cuMemAlloc", 2)
    assert isinstance(e, aoti_rt.AotiRtError) and isinstance(e, RuntimeError)
    f = pickle.loads(pickle.dumps(e))
    assert type(f) is aoti_rt.CudaError and (f.what, f.code) == ("cuMemAlloc", 2) and str(f) == str(e)
    assert "out of memory" in str(e).lower() or "OUT_OF_MEMORY" in str(e)
    a = aoti_rt.AllocationError("could not allocate 5 bytes on cpu")
    assert isinstance(a, aoti_rt.AotiRtError) and isinstance(a, MemoryError)
    g = pickle.loads(pickle.dumps(a))
    assert type(g) is aoti_rt.AllocationError and str(g) == str(a)
    # the Cython modules raise these very classes
    from aoti_rt import _bind, _cache, _load, _memory

    assert _memory.CudaError is _load.CudaError is aoti_rt.CudaError
    assert _memory.AllocationError is aoti_rt.AllocationError
    assert _bind.AOTIError is aoti_rt.AOTIError and _bind.BundleError is _load.BundleError is aoti_rt.BundleError
    assert _cache.AotiRtError is aoti_rt.AotiRtError


def test_errors_module_imports_nothing_of_the_package():
    import subprocess
    import sys

    code = ("import sys, importlib.util as u; spec = u.spec_from_file_location('e', %r); "
            "m = u.module_from_spec(spec); spec.loader.exec_module(m); "
            "assert not [n for n in sys.modules if n.startswith('aoti_rt')], 'errors imported aoti_rt'"
            % bundle_mod.__file__.replace(
                "bundle.py", "errors.py"))
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parse_method_and_weights_applies_the_manifest_rules(three_bundle):
    from aoti_rt.bundle import parse_method_and_weights

    raw = json.loads((three_bundle / "manifest.json").read_text())
    spec, weights = parse_method_and_weights(raw["methods"]["a"], raw["weights"], "probe.json")
    assert len(spec.constants) == len(raw["methods"]["a"]["constants"]) and len(weights) == len(raw["weights"])
    raw["methods"]["a"]["constants"][0].update(shape=[0], storage_offset=10**6)
    with pytest.raises(aoti_rt.BundleError, match=r"probe.json: method.constants\[0\] .*storage_offset 1000000"):
        parse_method_and_weights(raw["methods"]["a"], raw["weights"], "probe.json")
    with pytest.raises(aoti_rt.BundleError, match=r"probe.json: weights must be an object"):
        parse_method_and_weights(raw["methods"]["a"], [], "probe.json")


def _kv_cache_claimed_immutable(raw):
    """The k cache (a buffer the .so writes in place) claimed never written: its weight keyed by
    its digest, as an immutable weight's is."""
    const = [c for m in raw["methods"].values() for c in m["constants"] if c["fqn"] == "lm.k_cache"]
    w = raw["weights"].pop(const[0]["weight"])
    w["mutable"], w["id"] = False, w["digest"]
    raw["weights"][w["digest"]] = w
    for c in const:
        c["mutable"], c["weight"] = False, w["digest"]


def test_a_buffer_the_so_writes_is_instance_state_whatever_the_manifest_says(lm_bundle, device, copy_bundle):
    """A manifest calling the KV cache immutable does not make two loads of the bundle share it:
    the .so reports it as a buffer its kernels may write, so each instance holds its own, and
    one instance's prefill leaves the other's cache as loaded."""
    import torch

    b = copy_bundle(lm_bundle)
    edit_manifest(b, _kv_cache_claimed_immutable)
    with aoti_rt.load(b, device=device) as one, aoti_rt.load(b, device=device) as two:
        before = two.weight("lm.k_cache")
        one.prefill(torch.arange(1, 9, device=device))
        assert not torch.equal(one.weight("lm.k_cache"), before)
        assert torch.equal(two.weight("lm.k_cache"), before)
