"""The bundle format and the multi-method compiler, on real AOTI models."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors import safe_open

import aoti_rt
from aoti_rt import demo
from aoti_rt.bundle import read_bundle, read_store_header

from aoti_rt.digest import weight_digest
from models import Subset, make_stack


def _sha(path, offset, n):
    """The digest of ``n`` bytes at ``offset`` as the bundle format defines it."""
    with open(path, "rb") as f:
        f.seek(offset)
        return weight_digest(f.read(n))


def test_bundle_layout(lm_bundle):
    files = sorted(p.name for p in lm_bundle.iterdir())
    assert files == ["decode.so", "manifest.json", "prefill.so", "weights.safetensors"]
    raw = json.loads((lm_bundle / "manifest.json").read_text())
    assert raw["format"] == "aoti_rt-bundle" and raw["version"] == 2
    assert raw["torch_version"] == torch.__version__


def test_manifest_matches_exported_programs(lm_bundle, device):
    lm = demo.make_model(device)
    eps = demo.export_methods(lm)
    b = read_bundle(lm_bundle)
    man = b.manifest
    assert list(man.methods) == ["prefill", "decode"]
    for name, ep in eps.items():
        m = man.methods[name]
        sd = {**ep.state_dict, **ep.constants}
        fqns = {c.fqn for c in m.constants}
        # every parameter and buffer the program uses is a constant (tied ones collapse to one FQN)
        assert fqns <= set(sd)
        assert "lm.embed.weight" in fqns or "lm.lm_head.weight" in fqns
        for c in m.constants:
            t = sd[c.fqn]
            assert c.dtype == str(t.dtype).removeprefix("torch.")
            assert c.shape == list(t.shape) and c.stride == list(t.stride())
            assert c.storage_offset == t.storage_offset()
            assert c.kind == ("buffer" if c.fqn.endswith("_cache") else "parameter")
            assert c.mutable == c.fqn.endswith("_cache")     # the KV cache is written in place
            w = man.weights[c.weight]
            assert w.digest == c.digest == _sha(b.store_path, w.offset, w.nbytes)
            assert w.nbytes == t.untyped_storage().nbytes()
            assert c.data_size >= w.nbytes
        assert [i.name for i in m.inputs] == list(ep.graph_signature.user_inputs)
        assert [i.dtype for i in m.inputs] == ["int64"] * len(m.inputs)
        assert m.in_spec and m.out_spec
    assert man.methods["prefill"].inputs[0].shape == [8]


def test_store_offsets_match_safetensors_header(lm_bundle):
    b = read_bundle(lm_bundle)
    header = read_store_header(b.store_path)
    with safe_open(str(b.store_path), framework="pt") as f:
        keys = set(f.keys())
    for w in b.manifest.weights.values():
        assert w.tensor in keys
        assert header.tensors[w.tensor][2:] == (w.offset, w.offset + w.nbytes)


def test_weights_stored_once_with_tied(three_bundle, device):
    b = read_bundle(three_bundle)
    man = b.manifest
    # tied inp.weight / out.weight: one weight, whatever FQN AOTI kept for it
    s = make_stack(device)
    tied = [w for w in man.weights.values() if w.digest == weight_digest(
        s.inp.weight.detach().cpu().numpy().tobytes())]
    assert len(tied) == 1
    # each distinct storage once in the store: on-disk bytes ~= unique bytes (< 25 % over)
    unique = man.unique_weight_bytes()
    expect = sum(p.numel() * p.element_size() for p in s.parameters())   # tied counted once
    assert unique == expect
    data_bytes = b.store_path.stat().st_size
    assert unique <= data_bytes <= 1.25 * unique
    assert len({w.tensor for w in man.weights.values()}) == len(man.weights)
    # partial overlap: per-method loading would hold more than the union
    per_method = sum(man.per_method_bytes(n) for n in man.methods)
    assert per_method > unique


def test_same_fqn_different_values_stays_two_weights(diverge_bundle):
    man = read_bundle(diverge_bundle).manifest
    a = {c.fqn: c.weight for c in man.methods["a"].constants}
    b = {c.fqn: c.weight for c in man.methods["b"].constants}
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)     # never silently merged
    assert len(man.weights) == 2 * len(a)


def test_kv_caches_with_equal_content_stay_distinct(lm_bundle):
    man = read_bundle(lm_bundle).manifest
    k = next(c for c in man.methods["decode"].constants if c.fqn == "lm.k_cache")
    v = next(c for c in man.methods["decode"].constants if c.fqn == "lm.v_cache")
    assert k.digest == v.digest              # both zeros: one copy on disk ...
    assert k.weight != v.weight              # ... but two runtime buffers
    assert man.weights[k.weight].tensor == man.weights[v.weight].tensor


@pytest.mark.parametrize("bad, match", [
    ({}, "non-empty mapping"),
    ({"1st": None}, "bad method name"),
    ({"close": None}, "bad method name"),
    ({"with space": None}, "bad method name"),
    ({"class": None}, "bad method name"),
])
def test_bad_programs(tmp_path, bad, match):
    with pytest.raises(aoti_rt.CompileError, match=match):
        aoti_rt.compile(bad, tmp_path / "b")


def test_non_exported_input(tmp_path):
    with pytest.raises(aoti_rt.CompileError, match="ExportedProgram"):
        aoti_rt.compile({"fwd": torch.nn.Linear(2, 2)}, tmp_path / "b")


def test_unwritable_path(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(aoti_rt.CompileError, match="cannot write|not an empty directory"):
        aoti_rt.compile({"fwd": (torch.nn.Linear(2, 2), (torch.randn(1, 2),))}, f / "sub")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(aoti_rt.CompileError, match="not an empty directory"):
        aoti_rt.compile({"fwd": (torch.nn.Linear(2, 2), (torch.randn(1, 2),))}, tmp_path / "full")


def test_inspect_cli(three_bundle):
    out = subprocess.run([sys.executable, "-m", "aoti_rt", "inspect", str(three_bundle)],
                         capture_output=True, text=True, check=True).stdout
    for name in ("a", "b", "c"):
        assert f"\n{name} " in out
    assert "dedup ratio" in out and "unique weight bytes" in out
    man = read_bundle(three_bundle).manifest
    ratio = sum(man.per_method_bytes(n) for n in man.methods) / man.unique_weight_bytes()
    assert f"{ratio:.2f}x" in out


def test_verify_cli_detects_corruption(three_bundle, copy_bundle):
    ok = subprocess.run([sys.executable, "-m", "aoti_rt", "verify", str(three_bundle)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout
    bad = copy_bundle(three_bundle)
    w = next(iter(read_bundle(bad).manifest.weights.values()))
    with open(bad / "weights.safetensors", "r+b") as f:
        f.seek(w.offset)
        f.write(b"\xff" * 8)
    res = subprocess.run([sys.executable, "-m", "aoti_rt", "verify", str(bad)], capture_output=True, text=True)
    assert res.returncode == 1 and "CORRUPT" in res.stdout


def test_help_explains_itself():
    out = subprocess.run([sys.executable, "-m", "aoti_rt", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for word in ("demo", "inspect", "verify", "bench", "one copy of each weight"):
        assert word in out


def test_load_cli_prints_the_memory_report(three_bundle, device):
    out = subprocess.run([sys.executable, "-m", "aoti_rt", "load", str(three_bundle), "--device", device],
                         capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("aoti_rt.memory "))
    report = aoti_rt.MemoryReport.parse(line)
    assert report["allocated"] == read_bundle(three_bundle).manifest.unique_weight_bytes()
    assert report["device"] == device


def test_aliased_example_inputs_warn(tmp_path):
    """Exporting with one tensor for two inputs silently specialises on aliasing."""
    class Add(torch.nn.Module):
        def forward(self, a, b):
            return a + b

    x = torch.randn(4)
    ep = torch.export.export(Add(), (x, x))
    with pytest.warns(UserWarning, match="share memory"):
        aoti_rt.compile({"fwd": ep}, tmp_path / "b", progress=False)


def test_compile_warnings_point_at_the_caller(tmp_path):
    """Both compile-time warnings name the line that called aoti_rt.compile, not aoti_rt's own."""
    class Scale(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            # 64 elements, each method's own values: the two methods' "w" differ
            self.w = torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(seed)))

        def forward(self, a, b):
            return a * self.w + b

    x = torch.randn(64)
    progs = {"a": torch.export.export(Scale(0), (x, x)), "b": (Scale(1), (x, x.clone()))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aoti_rt.compile(progs, tmp_path / "b", progress=False)
    ours = [w for w in caught if "share memory" in str(w.message) or "differs between methods" in str(w.message)]
    assert len(ours) == 2, [str(w.message) for w in caught]
    assert all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in ours]


def test_method_without_weights(tmp_path):
    class Scale(torch.nn.Module):
        def forward(self, a, b):
            return a * 2 + b

    a, b = torch.randn(4), torch.randn(4)
    path = aoti_rt.compile({"fwd": (Scale(), (a, b))}, tmp_path / "b", progress=False)
    assert read_bundle(path).manifest.weights == {}
    with aoti_rt.load(path) as m:
        torch.testing.assert_close(m.fwd(a, b), a * 2 + b)


def test_a_compile_the_disk_cannot_hold_is_refused_before_aoti_runs(tmp_path, monkeypatch):
    """AOTI writes each method's constants to the temp folder, all held until the store is
    written: with less free space than that (here: none), compile says how much it needs and
    where, before any AOTI work, and leaves no bundle."""
    import collections

    from aoti_rt import compiler

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(compiler.shutil, "disk_usage", lambda p: usage(1 << 40, 1 << 40, 0))
    monkeypatch.setattr(compiler, "build_methods", lambda *a: pytest.fail("AOTI ran"))
    s = Subset(make_stack("cpu"), [0, 1])
    x = torch.randn(3, 64)
    with pytest.raises(aoti_rt.CompileError, match=r"needs about 0\.\d+ GB free .* has 0\.0 GB.*TMPDIR") as e:
        aoti_rt.compile({"a": (s, (x,)), "b": (s, (x,))}, tmp_path / "b", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_store_holds_each_weight_typed(three_bundle, device):
    """The store is written by aoti_rt itself: any safetensors reader gets the weights back
    with their dtype and shape."""
    params = {f"stack.{k}": v.detach().cpu() for k, v in make_stack(device).state_dict().items()}
    b = read_bundle(three_bundle)
    with safe_open(str(b.store_path), framework="pt") as f:
        for w in b.manifest.weights.values():
            t = f.get_tensor(w.tensor)
            p = next(params[q] for q in w.fqns if q in params)
            assert t.dtype == p.dtype and torch.equal(t, p), w.fqns


# -- an op without an AOTI C shim on this torch ---------------------------------------------------

_GXX_NO_SHIM = """C++ compile error

Command:
g++ /tmp/torchinductor_u/cw/cwabc.cpp -D TORCH_INDUCTOR_CPP_WRAPPER -shared -fPIC -O3 -o /tmp/cwabc.so

Output:
/tmp/torchinductor_u/cw/cwabc.cpp: In member function 'void AOTInductorModel::run_impl(...)':
/tmp/torchinductor_u/cw/cwabc.cpp:312:5: error: 'aoti_torch_cuda__grouped_mm' was not declared in this scope; \
did you mean 'aoti_torch_cuda__grouped_mm_out'?
  312 |     aoti_torch_cuda__grouped_mm(buf3, arg1_1, &offs, nullptr, &out_dtype, &buf4);
"""


@pytest.mark.parametrize("quotes", ["''", "\u2018\u2019"], ids=["C-locale", "UTF-8-locale"])
def test_missing_c_shim_is_named_in_the_users_terms(quotes):
    from aoti_rt.method_compiler import missing_shim

    output = re.sub(r"'([^']*)'", lambda m: quotes[0] + m.group(1) + quotes[1], _GXX_NO_SHIM)
    why = missing_shim(output, "2.11.0+cu130")
    assert why is not None and "\n" not in why
    assert "aten._grouped_mm" in why and "cuda" in why and "2.11.0+cu130" in why
    assert "torch 2.12" in why and "batched_mm" in why             # the release that has it, the alternative
    other = missing_shim(output.replace("_grouped_mm", "_my_new_op"), "2.11.0")
    assert "aten._my_new_op" in other and "later torch" in other   # an op of no known release
    assert missing_shim("C++ compile error\nOutput:\nerror: expected ';' before '}' token", "2.11.0") is None


@pytest.mark.cuda
@pytest.mark.skipif(not (aoti_rt.cuda_available() and torch.cuda.is_available()), reason="no CUDA GPU")
def test_grouped_mm_compiles_or_is_a_no_shim_error(tmp_path):
    """``torch._grouped_mm`` through aoti_rt.compile on CUDA: runs where this torch has its C
    shim, else a NoShimError naming the op and the release (never g++'s output alone)."""
    class Grouped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 32, 64, dtype=torch.bfloat16, device="cuda"))

        def forward(self, x, offs):
            return torch._grouped_mm(x, self.w.transpose(-2, -1), offs=offs)

    m = Grouped()
    x = torch.randn(64, 64, dtype=torch.bfloat16, device="cuda")
    offs = torch.tensor([16, 32, 48, 64], dtype=torch.int32, device="cuda")
    try:
        want = m(x, offs)
    except RuntimeError as e:                      # grouped_mm needs sm90+ and its layouts
        pytest.skip(f"torch._grouped_mm does not run eagerly here: {e}")
    ep = torch.export.export(m, (x, offs))
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if (major, minor) < (2, 12):
        with pytest.raises(aoti_rt.NoShimError, match=r"aten\._grouped_mm.*torch 2\.12"):
            aoti_rt.compile({"forward": ep}, tmp_path / "g", device="cuda:0", progress=False)
        assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())
        return
    path = aoti_rt.compile({"forward": ep}, tmp_path / "g", device="cuda:0", progress=False)
    with aoti_rt.load(path, device="cuda:0") as model:
        assert torch.equal(model.forward(x, offs), want)
