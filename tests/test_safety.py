"""Bundles are untrusted input; tensors come in any layout. Each test is one way to go wrong: an
out-of-bounds kernel access, a poisoned cache, a writable shared weight, a silently wrong
result, a leak per bundle, or a real layout refused."""

from __future__ import annotations

import gc
import json
import shutil

import pytest
import torch

import aoti_rt
from aoti_rt.bundle import read_bundle

from damage import edit_manifest
from models import METHOD_LAYERS, Subset, make_stack

PROMPT = list(range(1, 9))


def _constants(raw, fqn):
    return [c for m in raw["methods"].values() for c in m["constants"] if c["fqn"] == fqn]


def _intact_outputs(model, x):
    return {name: getattr(model, name)(x) for name in METHOD_LAYERS}


# -- constants in every layout AOTI compiles ------------------------------------------------

class Layouts(torch.nn.Module):
    """Constants that are not contiguous: a slice of a larger storage, a row of one (a view
    with an offset), a transposed matrix, a channels-last tensor, an expanded (stride 0) one.
    Made on their device (``.to`` would make the slice and the expansion contiguous)."""

    def __init__(self, device: str):
        super().__init__()
        base = torch.randn(8, 16, device=device)
        self.register_buffer("sliced", base[:, 3:7])
        self.register_buffer("row", base[2])
        self.register_buffer("transposed", torch.randn(16, 32, device=device).t())
        self.register_buffer("channels_last", torch.randn(2, 3, 4, 5, device=device)
                             .to(memory_format=torch.channels_last))
        self.register_buffer("expanded", torch.randn(16, 1, device=device).expand(16, 16))
        self.lin = torch.nn.Linear(16, 16, device=device)

    def forward(self, x):
        y = self.lin(x) @ self.expanded + self.row
        return (y[:, :4] @ self.sliced.t()[:4] + self.transposed[:8].sum(0)[:8].sum()
                + self.channels_last.sum())


@pytest.fixture(scope="module")
def layouts(workdir, device):
    from conftest import _compile

    torch.manual_seed(0)
    model = Layouts(device)
    x = torch.randn(3, 16, device=device)
    return _compile(workdir, "layouts", device, lambda: {"f": torch.export.export(model, (x,))}), model, x


def test_constants_of_every_layout_load_and_compute(layouts, device):
    """The manifest's view check refuses views that repeat elements of a weight they do not
    span, and views past what the .so keeps, but none of these: AOTI compiles each as it is."""
    path, model, x = layouts
    views = {c.fqn: (c.shape, c.stride) for c in read_bundle(path).manifest.methods["f"].constants}
    assert views["sliced"] == ([8, 4], [16, 1])                     # not dense: a slice of rows of 16
    assert views["transposed"] == ([32, 16], [1, 32])
    assert views["channels_last"] == ([2, 3, 4, 5], [60, 1, 15, 3])
    assert views["expanded"] == ([16, 16], [1, 0])                  # repeats elements, spans its storage
    with aoti_rt.load(path, device=device) as m:
        torch.testing.assert_close(m.f(x), model(x))


# -- views smaller than what the .so uses ----------------------------------------------------

def test_misaligned_view_is_refused(lm_bundle, device, copy_bundle):
    """A view starting off a 16-byte boundary: Triton kernels specialised on aligned pointers
    fault ("misaligned address"), which on CUDA kills the context for the whole process."""
    b = copy_bundle(lm_bundle)

    def lie(raw):
        for c in _constants(raw, "lm.k_cache"):
            c["shape"], c["stride"], c["storage_offset"] = [1], [1], 3
    edit_manifest(b, lie)
    with pytest.raises(aoti_rt.BundleError, match="not a multiple of 16"):
        aoti_rt.load(b, device=device)


def test_lying_view_of_written_state_stays_inside_its_buffer(lm_bundle, three_bundle, device, copy_bundle):
    """The KV cache declared as one element near its end: the kernel writes the whole cache
    from there. The buffer is sized by what the .so may reach, so the write lands in the
    lying model's own memory and another model is untouched."""
    b = copy_bundle(lm_bundle)

    def lie(raw):
        for c in _constants(raw, "lm.k_cache"):
            numel = 1
            for s in c["shape"]:
                numel *= s
            c["shape"], c["stride"], c["storage_offset"] = [1], [1], numel - 4   # 16-byte aligned
    edit_manifest(b, lie)
    x = torch.randn(3, 64, device=device)
    man = read_bundle(b).manifest
    k = next(w for w in man.weights.values() if "lm.k_cache" in w.fqns)
    padding = (k.nbytes // 4 - 4) * 4                  # the declared start, in bytes
    with aoti_rt.load(three_bundle, device=device) as intact:
        want = _intact_outputs(intact, x)
        base = aoti_rt.cache_stats(device)["bytes_allocated"]
        with aoti_rt.load(b, device=device) as liar:
            # the K buffer was padded by the declared start in front of what the .so keeps
            assert aoti_rt.cache_stats(device)["bytes_allocated"] - base == man.unique_weight_bytes() + padding
            before = aoti_rt.cache_stats(device)["bytes_allocated"]
            liar.prefill(torch.tensor(PROMPT, device=device))     # writes K past its declared view
            liar.decode(torch.tensor([3], device=device), torch.tensor([8], device=device))
            if device != "cpu":
                torch.cuda.synchronize()
            assert aoti_rt.cache_stats(device)["bytes_allocated"] == before
        for name, out in _intact_outputs(intact, x).items():
            assert torch.equal(out, want[name]), name


def test_lying_view_of_a_weight_reads_inside_its_buffer(three_bundle, device, copy_bundle):
    """A 64-float bias declared as one element at offset 60: the kernel reads 64 floats from
    there; the buffer is padded so that every read is inside it (the result is the liar's
    problem, the memory is not anyone else's)."""
    b = copy_bundle(three_bundle)
    honest = read_bundle(three_bundle).manifest.unique_weight_bytes()

    def lie(raw):
        for c in _constants(raw, "stack.layers.0.bias"):
            c["shape"], c["stride"], c["storage_offset"] = [1], [1], 60
    edit_manifest(b, lie)
    base = aoti_rt.cache_stats(device)["bytes_allocated"]
    with aoti_rt.load(b, device=device) as m:
        m.a(torch.randn(3, 64, device=device))
        # 60 floats of padding in front of the 256 bytes the .so reads: 240 bytes more
        assert aoti_rt.cache_stats(device)["bytes_allocated"] - base == honest + 60 * 4
    assert aoti_rt.cache_stats(device)["bytes_allocated"] == base


def test_empty_view_of_real_storage_is_refused(lm_bundle, device, copy_bundle):
    """An empty tensor's data pointer is NULL to AOTI: a kernel writing the cache would write
    through it. A view with no element where the .so keeps bytes is refused at load."""
    b = copy_bundle(lm_bundle)

    def lie(raw):
        for c in _constants(raw, "lm.v_cache"):
            c["shape"] = [0] + c["shape"][1:]
    edit_manifest(b, lie)
    base = aoti_rt.cache_stats(device)["bytes_allocated"]
    with pytest.raises(aoti_rt.BundleError, match="is empty"):
        aoti_rt.load(b, device=device)
    assert aoti_rt.cache_stats(device)["bytes_allocated"] == base


def test_manifest_inputs_must_match_the_so(three_bundle, device, copy_bundle):
    """An input spec of [] must not skip the input checks (a (1, 64) input would be read as (3, 64))."""
    b = copy_bundle(three_bundle)
    edit_manifest(b, lambda raw: raw["methods"]["a"].__setitem__("inputs", []))
    with pytest.raises(aoti_rt.BundleError, match="describes 0 inputs"):
        aoti_rt.load(b, device=device)


def test_lying_input_shape_is_caught_by_aoti(three_bundle, device, copy_bundle):
    """The manifest says (1, 64) where the .so was compiled for (3, 64): AOTI's own input check
    (AOTI_RUNTIME_CHECK_INPUTS, which aoti_rt sets for a bundle's .so at its first Run)
    refuses before any kernel reads."""
    b = copy_bundle(three_bundle)
    edit_manifest(b, lambda raw: raw["methods"]["a"]["inputs"][0].__setitem__("shape", [1, 64]))
    with aoti_rt.load(b, device=device) as m:
        with pytest.raises(aoti_rt.AOTIError):
            m.a(torch.randn(1, 64, device=device))


# -- the content cache cannot be poisoned ----------------------------------------------------

def _flip_weight_byte(bundle, fqn):
    man = read_bundle(bundle).manifest
    w = next(w for w in man.weights.values() if fqn in w.fqns)
    with open(bundle / "weights.safetensors", "r+b") as f:
        f.seek(w.offset + 5)
        byte = f.read(1)
        f.seek(w.offset + 5)
        f.write(bytes([byte[0] ^ 0x40]))


def test_identical_bundles_share_verified_weights(three_bundle, device, copy_bundle):
    """Two copies of a bundle: the second shares every weight of the first once the first's
    store bytes hash to their digests (verified on demand), reading and allocating nothing."""
    other = copy_bundle(three_bundle)
    x = torch.randn(3, 64, device=device)
    base = aoti_rt.cache_stats(device)["bytes_allocated"]
    with aoti_rt.load(three_bundle, device=device) as m1:
        one = aoti_rt.cache_stats(device)["bytes_allocated"]
        with aoti_rt.load(other, device=device) as m2:
            assert aoti_rt.cache_stats(device)["bytes_allocated"] == one
            assert all(m.bytes_read == 0 for m in (m2.a, m2.b, m2.c))
            for name in METHOD_LAYERS:
                assert torch.equal(getattr(m1, name)(x), getattr(m2, name)(x))
        with aoti_rt.load(other, device=device, verify=False):      # unverified: its own copy
            assert aoti_rt.cache_stats(device)["bytes_allocated"] == 2 * one - base
    assert aoti_rt.cache_stats(device)["bytes_allocated"] == base


def test_flipped_byte_with_the_original_digest_cannot_poison(three_bundle, device, copy_bundle):
    bad = copy_bundle(three_bundle)
    _flip_weight_byte(bad, "stack.layers.1.weight")
    x = torch.randn(3, 64, device=device)
    want = {n: Subset(make_stack(device), layers)(x) for n, layers in METHOD_LAYERS.items()}
    with pytest.raises(aoti_rt.BundleError, match="digest"):
        aoti_rt.load(bad, device=device, verify="load")        # checked while loading: refused
    with aoti_rt.load(bad, device=device) as liar:              # loads, computes with its bytes ...
        flipped = next(w for w in read_bundle(bad).manifest.weights.values()
                       if "stack.layers.1.weight" in w.fqns)
        with aoti_rt.load(three_bundle, device=device) as intact:   # ... never shared with others
            assert intact.a.bytes_read + intact.b.bytes_read == flipped.nbytes
            for name in METHOD_LAYERS:
                torch.testing.assert_close(getattr(intact, name)(x), want[name])
        assert not torch.equal(liar.a(x), want["a"])


def test_small_weight_claiming_a_big_weights_digest_cannot_poison(three_bundle, device, copy_bundle):
    """A 256-byte bias that declares the digest of a 16 KiB weight: an intact bundle loaded
    later must never bind the 256-byte buffer as its 16 KiB weight."""
    bad = copy_bundle(three_bundle)

    def lie(raw):
        big = next(w for w in raw["weights"].values() if "stack.layers.0.weight" in w["fqns"])
        small = next(w for w in raw["weights"].values() if "stack.layers.0.bias" in w["fqns"])
        small["digest"] = big["digest"]
        for c in _constants(raw, "stack.layers.0.bias"):
            c["digest"] = big["digest"]
    edit_manifest(bad, lie)
    x = torch.randn(3, 64, device=device)
    want = Subset(make_stack(device), METHOD_LAYERS["a"])(x)
    try:
        liar = aoti_rt.load(bad, device=device, methods=["a"])
    except aoti_rt.BundleError:
        liar = None
    with aoti_rt.load(three_bundle, device=device, methods=["a"]) as intact:
        torch.testing.assert_close(intact.a(x), want)
    if liar is not None:
        liar.close()


# -- weights handed to users cannot change other models --------------------------------------

def test_weight_is_a_copy_state_is_a_view(three_bundle, lm_bundle, device):
    x = torch.randn(3, 64, device=device)
    with aoti_rt.load(three_bundle, device=device) as m1, aoti_rt.load(three_bundle, device=device) as m2:
        want = m2.a(x)
        w = m1.weight("stack.layers.0.weight")
        w.zero_()                                   # a copy: nothing else sees it
        assert torch.equal(m2.a(x), want)
        assert torch.equal(m1.a(x), want)
    with aoti_rt.load(lm_bundle, device=device) as lm:
        k = lm.weight("lm.k_cache")                 # this instance's state: a live view
        lm.prefill(torch.tensor(PROMPT, device=device))
        assert k.abs().sum() > 0
    assert k.abs().sum() > 0                        # and it keeps its memory after close
    del k
    gc.collect()


def test_weight_after_close_raises_closed(three_bundle, device):
    m = aoti_rt.load(three_bundle, device=device)
    m.close()
    with pytest.raises(aoti_rt.ClosedError):
        m.weight("stack.layers.0.weight")
    with pytest.raises(aoti_rt.ClosedError):
        m.a.weight("stack.layers.0.weight")


# -- inputs in any layout ---------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "offset"])
def test_noncontiguous_inputs_give_the_eager_result(three_bundle, device, layout):
    s = make_stack(device)
    base = torch.randn(64, 3, device=device)
    x = {"transposed": base.t(),
         "sliced": torch.randn(3, 128, device=device)[:, ::2],
         "expanded": torch.randn(1, 64, device=device).expand(3, 64),
         "offset": torch.randn(4, 64, device=device)[1:]}[layout]
    with aoti_rt.load(three_bundle, device=device, methods=["a"]) as m:
        torch.testing.assert_close(m.a(x), Subset(s, METHOD_LAYERS["a"])(x))


# -- no leak per bundle ------------------------------------------------------------------------

def _rss_outside(prefix: str) -> int:
    """Resident bytes of this process, less those of mappings of files under ``prefix``."""
    total = mine = 0
    path = ""
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:          # a mapping's header line
                path = head[5] if len(head) > 5 else ""
            elif head[0] == "Rss:":
                kb = int(head[1]) << 10
                total += kb
                if path.startswith(prefix):
                    mine += kb
    return total - mine


def test_distinct_bundles_do_not_leak(three_bundle, tmp_path):
    """300 distinct bundle copies loaded and closed: every .so is released (dlclose) when its
    last method closes, and the checked-bundle cache is bounded, so memory stays flat (it grew
    ~300 KB a bundle before).

    glibc keeps an AOTI .so mapped after dlclose all the same: g++ gives its inline statics
    STB_GNU_UNIQUE binding, which marks the object NODELETE. Those file-backed pages are the
    one thing allowed to grow here (measured apart, from /proc/self/smaps)."""
    if "cpu" not in three_bundle.name:
        pytest.skip("the CPU variant covers it")
    src = three_bundle
    x = torch.randn(3, 64)

    def cycle(i):
        d = tmp_path / f"b{i}"
        d.mkdir()
        for f in ("manifest.json", "weights.safetensors", "a.so"):
            shutil.copyfile(src / f, d / f)
        edit_manifest(d, lambda raw: [raw["methods"].pop(k) for k in ("b", "c")])
        with aoti_rt.load(d, device="cpu") as m:
            m.a(x)
        assert not any(str(d) in key[0] for key in aoti_rt.abi._open), "the .so is still held"

    for i in range(30):                 # warm up allocators and torch's caches
        cycle(i)
    gc.collect()
    before = _rss_outside(str(tmp_path))
    for i in range(30, 330):
        cycle(i)
    gc.collect()
    grown = _rss_outside(str(tmp_path)) - before
    assert grown < 8 << 20, f"memory outside the .so mappings grew {grown / 2**20:.1f} MiB over 300 bundles"


# -- other untrusted records --------------------------------------------------------------------

def test_out_spec_with_another_leaf_count_is_refused(three_bundle, device, copy_bundle):
    from torch.utils import _pytree as pytree

    b = copy_bundle(three_bundle)
    spec = pytree.treespec_dumps(pytree.tree_flatten((0, 1))[1])
    edit_manifest(b, lambda raw: raw["methods"]["a"].__setitem__("out_spec", spec))
    base = aoti_rt.cache_stats(device)["bytes_allocated"]
    with pytest.raises(aoti_rt.BundleError, match="out_spec has 2 leaves"):
        aoti_rt.load(b, device=device)
    assert aoti_rt.cache_stats(device)["bytes_allocated"] == base


def test_device_errors_are_aoti_rt_errors(three_bundle):
    with pytest.raises(aoti_rt.AotiRtError):
        aoti_rt.load(three_bundle, device="tpu:3")
    if aoti_rt.cuda_available():      # else asking for CUDA fails earlier, as an AotiRtError too
        other = "cuda" if "cpu" in three_bundle.name else "cpu"
        with pytest.raises(aoti_rt.BundleError, match="compiled for"):
            aoti_rt.load(three_bundle, device=other)


def _probe_record(so):
    return so.with_name(so.name + ".aoti_rt.json")


@pytest.mark.parametrize("edit", ["negative_stride", "offset_past_blob", "garbage", "not_json_object",
                                  "other_fingerprint"])
def test_edited_probe_cache_is_never_trusted(stock_artifact, device, edit):
    """The probe record cached beside a stock .so is checked like a manifest: an edited one
    is ignored and the artifact probed again (trusted, it would segfault, abort or compute garbage)."""
    so, blob, mod = stock_artifact
    x = torch.randn(3, 64, device=device)
    with aoti_rt.load_method(so, weights=blob, device=device) as m:       # writes the record
        torch.testing.assert_close(m(x), mod(x))
    rec = _probe_record(so)
    raw = json.loads(rec.read_text())
    if edit == "negative_stride":
        raw["method"]["constants"][0]["stride"] = [-1] * len(raw["method"]["constants"][0]["stride"])
    elif edit == "offset_past_blob":
        next(iter(raw["weights"].values()))["offset"] = blob.stat().st_size
    elif edit == "other_fingerprint":
        raw["fingerprint"]["so"][2] += 1
    text = {"garbage": "\xff{not json", "not_json_object": "[1, 2]"}.get(edit, json.dumps(raw))
    rec.write_text(text)
    with aoti_rt.load_method(so, weights=blob, device=device) as m:
        torch.testing.assert_close(m(x), mod(x))


def test_unlookable_so_name_is_a_bundle_error(three_bundle, device, copy_bundle):
    """A file name the OS refuses to look up (over NAME_MAX), where Path.is_file raises OSError."""
    b = copy_bundle(three_bundle)
    edit_manifest(b, lambda raw: raw["methods"]["a"].__setitem__("so", "x" * 300))
    with pytest.raises(aoti_rt.BundleError, match="shared object"):
        aoti_rt.load(b, device=device)


def test_stock_blob_shorter_than_the_so_reads_is_refused(stock_artifact, device, tmp_path):
    """torch's runner maps as many blob bytes as the .so states without checking the file: a
    truncated blob is a SIGBUS that kills the process. It is refused before the probe (run in
    a child process, so a regression fails this test instead of killing the suite)."""
    import shutil
    import subprocess
    import sys

    so, blob, _ = stock_artifact
    d = tmp_path / "art"
    shutil.copytree(so.parent, d)
    short = d / blob.relative_to(so.parent)
    with open(short, "r+b") as f:
        f.truncate(short.stat().st_size // 2)
    code = (f"import aoti_rt\ntry:\n    aoti_rt.load_method({str(d / so.name)!r}, {str(short)!r}, device={device!r})\n"
            f"except aoti_rt.BundleError as e:\n    print('REFUSED', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "REFUSED" in r.stdout and "truncated" in r.stdout, r.stdout
