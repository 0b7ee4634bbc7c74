"""The shared weight cache, its typed keys and the public rebind API, on real AOTI models (CPU always; CUDA where present)."""

from __future__ import annotations

import gc
import re
import shutil
import threading
import time

import pytest
import torch

import aoti_rt
from aoti_rt import demo
from aoti_rt.bundle import read_bundle

from damage import edit_manifest
from models import METHOD_LAYERS, Subset, make_stack

PROMPT = list(range(1, 9))


def stats(device):
    return aoti_rt.cache_stats(device)


def eager_generate(device, n=12, seed=0):
    lm = demo.make_model(device, seed)
    with torch.no_grad():
        return demo.generate(demo.Prefill(lm), demo.Decode(lm), torch.tensor(PROMPT, device=device), n)


def assert_logits_close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# -- sharing --------------------------------------------------------------------------------

def test_two_methods_match_eager_and_share_weights(lm_bundle, device):
    man = read_bundle(lm_bundle).manifest
    before = stats(device)
    with aoti_rt.load(lm_bundle, device=device) as model:
        assert model.methods == ["prefill", "decode"]
        s = stats(device)
        # one buffer per distinct weight: exactly the unique bytes
        assert s["bytes_allocated"] - before["bytes_allocated"] == man.unique_weight_bytes()
        assert s["entries"] - before["entries"] == len(man.weights)
        # the second method found everything cached and read nothing
        assert model.prefill.bytes_read == man.unique_weight_bytes()
        assert model.decode.bytes_read == 0
        assert s["bytes_read"] - before["bytes_read"] == man.unique_weight_bytes()
        with torch.no_grad():
            got, got_logits = demo.generate(model.prefill, model["decode"],
                                            torch.tensor(PROMPT, device=device), 12)
        want, want_logits = eager_generate(device)
        assert got == want
        assert_logits_close(got_logits, want_logits)
    assert stats(device)["bytes_allocated"] == before["bytes_allocated"]


def test_three_methods_partial_overlap_allocate_the_union(three_bundle, device):
    man = read_bundle(three_bundle).manifest
    before = stats(device)["bytes_allocated"]
    s = make_stack(device)
    x = torch.randn(3, 64, device=device)
    with aoti_rt.load(three_bundle, device=device) as model:
        assert stats(device)["bytes_allocated"] - before == man.unique_weight_bytes()
        assert man.unique_weight_bytes() < sum(man.per_method_bytes(n) for n in man.methods)
        for name, layers in METHOD_LAYERS.items():
            torch.testing.assert_close(getattr(model, name)(x), Subset(s, layers)(x))
        # b and c only needed the layers a had not loaded
        assert model.b.bytes_read == man.weights[_weight_of(man, "b", "stack.layers.2.weight")].nbytes + \
            man.weights[_weight_of(man, "b", "stack.layers.2.bias")].nbytes


def _weight_of(man, method, fqn):
    return next(c.weight for c in man.methods[method].constants if c.fqn == fqn)


def test_methods_loaded_separately_share_and_free(three_bundle, device):
    man = read_bundle(three_bundle).manifest
    base = stats(device)["bytes_allocated"]
    a = aoti_rt.load(three_bundle, device=device, methods=["a"])
    after_a = stats(device)["bytes_allocated"]
    assert after_a - base == man.per_method_bytes("a")
    c = aoti_rt.load(three_bundle, device=device, methods=["c"])
    assert stats(device)["bytes_allocated"] - base == man.unique_weight_bytes(["a", "c"])
    a.close()      # a's private layers go, the shared ones stay for c
    assert stats(device)["bytes_allocated"] - base == man.per_method_bytes("c")
    c.close()
    assert stats(device)["bytes_allocated"] == base


def test_two_instances_share_weights_not_state(lm_bundle, device):
    man = read_bundle(lm_bundle).manifest
    state = sum(w.nbytes for w in man.weights.values() if w.mutable)
    assert state > 0
    base = stats(device)["bytes_allocated"]
    prompt = torch.tensor(PROMPT, device=device)
    with aoti_rt.load(lm_bundle, device=device) as m1, aoti_rt.load(lm_bundle, device=device) as m2:
        # the second instance adds only its own KV cache
        assert stats(device)["bytes_allocated"] - base == man.unique_weight_bytes() + state
        assert m2.prefill.bytes_read == state
        m1.prefill(prompt)
        assert m1.weight("lm.k_cache").abs().sum() > 0        # prefill wrote m1's cache ...
        assert m2.weight("lm.k_cache").abs().sum() == 0       # ... not m2's
        # and m1's decode sees what m1's prefill wrote
        lm = demo.make_model(device)
        with torch.no_grad():
            demo.Prefill(lm)(prompt)
            tok, pos = torch.tensor([3], device=device), torch.tensor([8], device=device)
            torch.testing.assert_close(m1.decode(tok, pos), demo.Decode(lm)(tok, pos), rtol=1e-4, atol=1e-4)
    assert stats(device)["bytes_allocated"] == base


def test_close_everything_frees_everything(lm_bundle, three_bundle, device):
    base = stats(device)
    models = [aoti_rt.load(lm_bundle, device=device), aoti_rt.load(three_bundle, device=device),
              aoti_rt.load(lm_bundle, device=device)]
    assert stats(device)["bytes_allocated"] > base["bytes_allocated"]
    for m in models:
        m.close()
    s = stats(device)
    assert s["bytes_allocated"] == base["bytes_allocated"] and s["entries"] == base["entries"]
    models[0].close()                                      # closing twice is harmless
    with pytest.raises(aoti_rt.ClosedError):
        models[0].prefill(torch.tensor(PROMPT, device=device))


def test_garbage_collection_frees(three_bundle, device):
    base = stats(device)["bytes_allocated"]
    m = aoti_rt.load(three_bundle, device=device)
    assert stats(device)["bytes_allocated"] > base
    del m
    gc.collect()
    assert stats(device)["bytes_allocated"] == base


def test_state_view_outlives_close(lm_bundle, device):
    """A view of an instance's own state (the KV cache) holds its buffer: no use-after-free
    once the model is closed; the memory goes with the view."""
    base = stats(device)["bytes_allocated"]
    base_entries = stats(device)["entries"]
    with aoti_rt.load(lm_bundle, device=device) as m:
        m.prefill(torch.tensor(PROMPT, device=device))
        view = m.weight("lm.k_cache")
        want = view.clone()
    # the cache let it go, but the view still owns its buffer
    assert stats(device)["entries"] == base_entries
    assert stats(device)["bytes_allocated"] - base == view.untyped_storage().nbytes()
    assert torch.equal(view, want) and want.abs().sum() > 0
    del view
    gc.collect()
    assert stats(device)["bytes_allocated"] == base


def test_colliding_fqns_in_two_bundles(lm_bundle, lm_other_bundle, device):
    prompt = torch.tensor(PROMPT, device=device)
    tok, pos = torch.tensor([5], device=device), torch.tensor([0], device=device)
    lm0, lm1 = demo.make_model(device, 0), demo.make_model(device, 1)
    with aoti_rt.load(lm_bundle, device=device) as m0, aoti_rt.load(lm_other_bundle, device=device) as m1, \
            torch.no_grad():
        assert m1.decode.bytes_read > 0          # same FQNs, other values: nothing shared
        torch.testing.assert_close(m0.decode(tok, pos), demo.Decode(lm0)(tok, pos), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m1.decode(tok, pos), demo.Decode(lm1)(tok, pos), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m0.prefill(prompt), demo.Prefill(lm0)(prompt), rtol=1e-4, atol=1e-4)


def test_same_fqn_different_weight_binds_private_copies(diverge_bundle, device):
    x = torch.randn(3, 64, device=device)
    with pytest.warns(UserWarning, match="private copy"):
        model = aoti_rt.load(diverge_bundle, device=device)
    with model:
        torch.testing.assert_close(model.a(x), Subset(make_stack(device, 0), [0])(x))
        torch.testing.assert_close(model.b(x), Subset(make_stack(device, 1), [0])(x))


def test_threaded_load_call_close(three_bundle, device):
    man = read_bundle(three_bundle).manifest
    base = stats(device)["bytes_allocated"]
    s = make_stack(device)
    x = torch.randn(3, 64, device=device)
    want = {n: Subset(s, layers)(x).detach() for n, layers in METHOD_LAYERS.items()}
    shared = aoti_rt.load(three_bundle, device=device, methods=["b"])
    errors: list[BaseException] = []
    peak = []

    def worker(k):
        try:
            for i in range(6):
                name = "abc"[(k + i) % 3]
                with aoti_rt.load(three_bundle, device=device, methods=[name]) as m:
                    torch.testing.assert_close(m[name](x), want[name])
                    peak.append(stats(device)["bytes_allocated"] - base)
                torch.testing.assert_close(shared.b(x), want["b"])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # never more than one buffer per distinct weight, however the threads interleaved
    assert max(peak) <= man.unique_weight_bytes()
    shared.close()
    assert stats(device)["bytes_allocated"] == base


def test_close_waits_for_running_calls(three_bundle, device):
    s = make_stack(device)
    x = torch.randn(3, 64, device=device)
    want = Subset(s, METHOD_LAYERS["a"])(x).detach()
    model = aoti_rt.load(three_bundle, device=device, methods=["a"])
    stop = threading.Event()
    results, errors = [], []

    def caller():
        while not stop.is_set():
            try:
                results.append(bool(torch.allclose(model.a(x), want, rtol=1e-4, atol=1e-4)))
            except aoti_rt.ClosedError:
                return
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(results) < 20 and not errors and time.monotonic() < deadline:
        time.sleep(0.001)
    model.close()        # must not free under a running call
    stop.set()
    for t in threads:
        t.join()
    assert not errors and all(results)
    assert len(results) >= 20, "the callers did not run 20 calls in 60 s"


# -- bad input ------------------------------------------------------------------------------

def test_wrong_inputs(three_bundle, device):
    with aoti_rt.load(three_bundle, device=device, methods=["a"]) as m:
        x = torch.randn(3, 64, device=device)
        with pytest.raises(aoti_rt.InputError, match="takes 1 tensor inputs, got 2"):
            m.a(x, x)
        with pytest.raises(aoti_rt.InputError, match="takes 1 tensor inputs, got 0"):
            m.a()
        with pytest.raises(aoti_rt.InputError, match="must be float32"):
            m.a(x.double())
        with pytest.raises(aoti_rt.InputError, match="shape"):
            m.a(torch.randn(3, 65, device=device))
        with pytest.raises(aoti_rt.InputError, match="torch.Tensor"):
            m.a(3.0)
        other = "cpu" if device != "cpu" else "meta"
        with pytest.raises(aoti_rt.InputError, match="is on"):
            m.a(torch.randn(3, 64, device=other))
        m.a(x)       # still usable after the rejections


def _assert_nothing_allocated(device, base):
    gc.collect()
    s = stats(device)
    assert s["bytes_allocated"] == base["bytes_allocated"]
    assert s["entries"] == base["entries"]


def test_missing_store(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    (b / "weights.safetensors").unlink()
    with pytest.raises(aoti_rt.BundleError, match="missing"):
        aoti_rt.load(b, device=device)


def test_truncated_store(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    store = b / "weights.safetensors"
    size = store.stat().st_size
    with open(store, "r+b") as f:
        f.truncate(size - 100)
    base = stats(device)
    with pytest.raises(aoti_rt.BundleError, match="truncated"):
        aoti_rt.load(b, device=device)
    _assert_nothing_allocated(device, base)


def test_corrupt_store_header(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    with open(b / "weights.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    with pytest.raises(aoti_rt.BundleError, match="corrupt header"):
        aoti_rt.load(b, device=device)


def test_manifest_pointing_outside(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    edit_manifest(b, lambda r: r["methods"]["a"].__setitem__("so", "../../etc/passwd"))
    with pytest.raises(aoti_rt.BundleError, match="outside the bundle"):
        aoti_rt.load(b, device=device)


def test_manifest_lying_about_offsets(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)

    def lie(raw):
        w = next(iter(raw["weights"].values()))
        w["offset"] += 4
    edit_manifest(b, lie)
    with pytest.raises(aoti_rt.BundleError, match="disagree"):
        aoti_rt.load(b, device=device)


def test_manifest_lying_about_shape(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)

    def lie(raw):
        c = raw["methods"]["b"]["constants"][0]
        c["shape"] = [s * 100 for s in c["shape"]]      # same rank, far more bytes than stored
    edit_manifest(b, lie)
    with pytest.raises(aoti_rt.BundleError, match="manifest lies"):
        aoti_rt.load(b, device=device)


def _drop_last_constant(raw):
    raw["methods"]["c"]["constants"].pop()


def _swap_constant_names(raw):
    cs = raw["methods"]["c"]["constants"]
    cs[0]["name"], cs[1]["name"] = cs[1]["name"], cs[0]["name"]


def _relabel_dtype(raw):
    raw["methods"]["c"]["constants"][0]["dtype"] = "int32"    # same itemsize as float32


@pytest.mark.parametrize("lie, says", [(_drop_last_constant, r"has (\d+) constants but the manifest lists (?!\1)\d+"),
                                       (_swap_constant_names, r"names constant 0 '\w+' but the manifest says"),
                                       (_relabel_dtype, r"dtype code 6 but the manifest says int32")],
                         ids=["count", "names", "dtype"])
def test_manifest_lying_about_constants(three_bundle, device, copy_bundle, lie, says):
    b = copy_bundle(three_bundle)
    edit_manifest(b, lie)
    base = stats(device)
    with pytest.raises(aoti_rt.BundleError, match="inconsistent") as err:
        aoti_rt.load(b, device=device)
    assert re.search(says, str(err.value)), str(err.value)
    _assert_nothing_allocated(device, base)


def test_so_without_entry_points(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    shutil.copyfile(aoti_rt._memory.__file__, b / "b.so")     # a real .so, but not an AOTI model
    base = stats(device)
    with pytest.raises(aoti_rt.AOTIError, match="lacks AOTInductorModelContainer"):
        aoti_rt.load(b, device=device)
    _assert_nothing_allocated(device, base)


def test_allocation_failure_leaves_nothing(three_bundle, device):
    man = read_bundle(three_bundle).manifest
    base = stats(device)
    aoti_rt.set_memory_limit(base["bytes_allocated"] + man.per_method_bytes("a") + 1, device)
    try:
        with pytest.raises(aoti_rt.AllocationError, match="memory limit"):
            aoti_rt.load(three_bundle, device=device)      # a fits, b's private layer does not
        _assert_nothing_allocated(device, base)
    finally:
        aoti_rt.set_memory_limit(0, device)
    with aoti_rt.load(three_bundle, device=device):
        pass


def test_legacy_so_without_pairs_loads_unshared(three_bundle, device, copy_bundle):
    """A .so whose Pairs entry point is gone (as in torch < 2.10) loads its own copy."""
    b = copy_bundle(three_bundle)
    so = b / "c.so"
    data = so.read_bytes()
    name = b"AOTInductorModelContainerUpdateUserManagedConstantBufferPairs"
    assert data.count(name) >= 1
    so.write_bytes(data.replace(name, name[:-1] + b"X"))    # the dynamic symbol no longer resolves
    s = make_stack(device)
    x = torch.randn(3, 64, device=device)
    base = stats(device)
    with aoti_rt.load(b, device=device) as m:
        assert m.a.shared and m.b.shared and not m.c.shared
        st = stats(device)
        assert st["legacy_methods"] - base["legacy_methods"] == 1
        assert st["legacy_bytes"] > 0
        torch.testing.assert_close(m.c(x), Subset(s, METHOD_LAYERS["c"])(x))
    gc.collect()
    assert stats(device)["legacy_methods"] == base["legacy_methods"]


# -- stock artifacts --------------------------------------------------------------------------

def test_load_method_on_stock_artifact(stock_artifact, device):
    so, blob, mod = stock_artifact
    x = torch.randn(3, 64, device=device)
    for probe in (so.with_name(so.name + ".aoti_rt.json"),):
        probe.unlink(missing_ok=True)
    with aoti_rt.load_method(so, weights=blob, device=device) as m:
        torch.testing.assert_close(m(x), mod(x))
    assert so.with_name(so.name + ".aoti_rt.json").is_file()     # the probe is cached ...
    with aoti_rt.load_method(so, weights=blob, device=device) as m2:   # ... and reused
        torch.testing.assert_close(m2(x), mod(x))


def test_probe_reads_constants_from_the_blob_and_checks_its_layout(stock_artifact, device, monkeypatch, tmp_path):
    """The probe takes each constant's bytes from the blob the runner loaded (no copy back from
    the device), equal to what the runner holds; a layout that misplaces them is refused."""
    from aoti_rt import probe
    from aoti_rt.device import device_guard

    so, blob, _ = stock_artifact
    consts = probe.probe_method(so, blob, device, set()).constants
    runner, tensors = probe._probe(so, blob, device)
    try:
        for c, data in consts:
            assert isinstance(data, probe.FileSpan) and data.file.path == blob
            held = tensors.get(c.fqn, tensors.get(c.name))
            assert data.read() == probe.storage_bytes(held), c.fqn
    finally:
        with device_guard(device):
            del runner, tensors
    # a file cut short after the runner loaded it is an error, never a crash (it is read, not mapped)
    cut = tmp_path / "cut.blob"
    cut.write_bytes(blob.read_bytes()[:blob.stat().st_size // 2])
    with pytest.raises(aoti_rt.CompileError, match="cannot read its weights"):
        probe.probe_method(so, blob, device, set(), weights=lambda need: (cut, 0, blob.stat().st_size))
    real = probe.blob_layout
    monkeypatch.setattr(probe, "blob_layout", lambda sizes: ([0] * len(sizes), real(sizes)[1]))
    with pytest.raises(aoti_rt.CompileError, match="blob layout"):
        probe.probe_method(so, blob, device, set())


def test_load_method_shares_with_bundle(stock_shared_artifact, three_bundle, device):
    """A stock artifact compiled from the same weights as the bundle's: once the bundle is
    loaded, load_method verifies the bundle's copies (hashing its store) and shares them,
    reading and allocating nothing; both stay correct."""
    so, blob, mod = stock_shared_artifact
    x = torch.randn(3, 64, device=device)
    with aoti_rt.load(three_bundle, device=device) as model:
        before = stats(device)["bytes_allocated"]
        with aoti_rt.load_method(so, weights=blob, device=device) as m:
            assert m.bytes_read == 0
            assert stats(device)["bytes_allocated"] == before
            torch.testing.assert_close(m(x), mod(x))
            torch.testing.assert_close(model.a(x), Subset(make_stack(device), METHOD_LAYERS["a"])(x))


def test_load_method_with_other_weights_shares_nothing(stock_artifact, three_bundle, device):
    """Seed 3 against the bundle's seed 0: no bytes in common, nothing shared, both correct."""
    so, blob, mod = stock_artifact
    x = torch.randn(3, 64, device=device)
    with aoti_rt.load(three_bundle, device=device) as model, \
            aoti_rt.load_method(so, weights=blob, device=device) as m:
        assert m.bytes_read > 0
        torch.testing.assert_close(m(x), mod(x))
        torch.testing.assert_close(model.a(x), Subset(make_stack(device), METHOD_LAYERS["a"])(x))


def test_cache_stats_keys(three_bundle, device):
    """Every documented key is there, and the counters move as a load says they must."""
    man = read_bundle(three_bundle).manifest
    keys = ("entries", "bytes_allocated", "peak_bytes_allocated", "bytes_reserved", "peak_bytes_reserved",
            "num_slabs", "hits", "misses", "bytes_read", "legacy_methods", "legacy_bytes",
            "pinned_store_bytes", "staging_bytes")
    s0 = aoti_rt.cache_stats(device)
    assert set(keys) <= set(s0) and all(isinstance(s0[k], int) for k in keys)
    with aoti_rt.load(three_bundle, device=device):
        s1 = aoti_rt.cache_stats(device)
    n = man.unique_weight_bytes()
    assert s1["entries"] - s0["entries"] == len(man.weights)
    assert s1["bytes_allocated"] - s0["bytes_allocated"] == n
    assert s1["peak_bytes_allocated"] >= s1["bytes_allocated"]
    assert s1["bytes_reserved"] >= s1["bytes_allocated"]
    assert s1["misses"] - s0["misses"] == len(man.weights)
    # each method acquires its distinct weights; those another method created first are hits
    acquired = sum(len({c.weight for c in m.constants}) for m in man.methods.values())
    assert s1["hits"] - s0["hits"] == acquired - len(man.weights)
    assert s1["bytes_read"] - s0["bytes_read"] == n


def test_pinned_store_loads_without_reading(three_bundle, device):
    man = read_bundle(three_bundle).manifest
    s = make_stack(device)
    x = torch.randn(3, 64, device=device)
    base = stats(device)
    with aoti_rt.pin_store(three_bundle, device=device) as pinned:
        assert stats(device)["pinned_store_bytes"] == pinned.nbytes == (three_bundle / "weights.safetensors").stat().st_size
        read0 = stats(device)["bytes_read"]
        with aoti_rt.load(three_bundle, device=device) as m:
            assert stats(device)["bytes_read"] == read0               # nothing read from disk
            assert stats(device)["bytes_allocated"] - base["bytes_allocated"] == man.unique_weight_bytes()
            for name, layers in METHOD_LAYERS.items():
                torch.testing.assert_close(m[name](x), Subset(s, layers)(x))
    assert stats(device)["pinned_store_bytes"] == 0
    with aoti_rt.load(three_bundle, device=device) as m:               # unpinned: reads again
        assert m.a.bytes_read > 0


# -- typed cache keys ----------------------------------------------------------------------------

def test_a_buffer_is_never_found_from_a_scope_it_was_not_put_in(device):
    """The same digest and sizes in STORE, CONTENT, INSTANCE, EXPORT and ATTACHED keys are
    distinct entries; only an explicit alias makes a STORE entry findable as CONTENT."""
    from aoti_rt._cache import Scope, WeightCache, WeightKey
    from aoti_rt.device import get

    rt = get(device)
    digest = "b3t:" + "ab" * 32
    keys = [WeightKey(Scope.STORE, ("/s", (1, 2, 3)), digest, 64, 64),
            WeightKey(Scope.CONTENT, None, digest, 64, 64),
            WeightKey(Scope.INSTANCE, "model1", digest, 64, 64),
            WeightKey(Scope.EXPORT, "share:x:1", digest, 64, 64),
            WeightKey(Scope.ATTACHED, "attach:1", digest, 64, 64)]
    assert len(set(keys)) == len(keys)
    # equal fields in the same scope: one key (hash computed once, equality by value)
    twin = WeightKey(Scope.STORE, ("/s", (1, 2, 3)), digest, 64, 64)
    assert twin == keys[0] and hash(twin) == hash(keys[0]) and twin is not keys[0]
    assert WeightKey(Scope.STORE, ("/s", (1, 2, 3)), digest, 64, 128) != keys[0]     # another buffer size
    assert keys[0] != (Scope.STORE, ("/s", (1, 2, 3)), digest, 64, 64)               # never a tuple or str
    cache = WeightCache()
    store = cache.acquire([keys[0]], [64], rt.allocator)
    cache.publish(store)
    for k in keys[1:]:
        assert k not in cache
    others = cache.acquire(keys[1:], [64] * 4, rt.allocator)
    assert others.to_fill == [0, 1, 2, 3]                  # each scope its own new entry
    assert len({id(b) for b in others.buffers} | {id(store.buffers[0])}) == 5
    cache.publish(others)
    cache.release(others)
    # CONTENT names the STORE entry only once aliased (after verification); no other scope
    # can be made to name another's entry
    for k, new in ((keys[2], keys[1]), (keys[0], keys[2]), (keys[4], keys[1]), (keys[1], keys[0]),
                   (keys[0], WeightKey(Scope.CONTENT, None, "b3t:" + "cd" * 32, 64, 64))):
        with pytest.raises(ValueError, match="only a STORE entry"):
            cache.alias(k, new)
    assert cache.alias(keys[0], keys[1])
    again = cache.acquire([keys[1], twin], [64, 64], rt.allocator)
    assert again.to_fill == [] and again.buffers[0] is again.buffers[1] is store.buffers[0]
    cache.release(again)
    cache.release(store)
    assert len(cache) == 0
    with pytest.raises(ValueError, match="owner"):
        WeightKey(Scope.CONTENT, "someone", digest, 64, 64)
    with pytest.raises(ValueError, match="owner"):
        WeightKey(Scope.STORE, None, digest, 64, 64)


def test_take_over_unlinks_only_an_entry_the_caller_holds_alone(device):
    from aoti_rt._cache import Scope, WeightCache, WeightKey
    from aoti_rt.device import get

    rt = get(device)
    key = WeightKey(Scope.STORE, ("/s", None), "b3t:00", 16, 16)
    cache = WeightCache()
    a = cache.acquire([key], [16], rt.allocator)
    assert not cache.take_over(key, 1)                   # still loading
    cache.publish(a)
    b = cache.acquire([key], [16], rt.allocator)
    assert not cache.take_over(key, 1) and key in cache  # someone else holds it too
    cache.release(b)
    assert cache.take_over(key, 1) and key not in cache  # the holder keeps the buffer
    assert a.buffers[0] is not None
    c = cache.acquire([key], [16], rt.allocator)
    assert c.to_fill == [0] and c.buffers[0] is not a.buffers[0]   # a later acquire makes its own
    cache.publish(c)
    cache.release(c)
    cache.release(a)
    assert len(cache) == 0 and not cache.take_over(key, 0)


def test_keys_name_the_store_and_the_instance(three_bundle, device, copy_bundle):
    """Two loads of one store share its STORE keys and never INSTANCE state; a copy of the
    store is another STORE owner; verify=False binds no CONTENT key."""
    from aoti_rt._cache import Scope

    with aoti_rt.load(three_bundle, device=device) as m1, aoti_rt.load(three_bundle, device=device) as m2:
        k1 = [b.key for b in m1.a.bindings()]
        k2 = [b.key for b in m2.a.bindings()]
        assert k1 == k2 and all(k.scope in (Scope.STORE, Scope.CONTENT) for k in k1)
        assert [b.buffer for b in m1.a.bindings()] == [b.buffer for b in m2.a.bindings()]
        other = copy_bundle(three_bundle)
        with aoti_rt.load(other, device=device, verify=False) as m3:
            k3 = [b.key for b in m3.a.bindings()]
            assert all(k.scope is Scope.STORE for k in k3)
            assert {k.owner for k in k3}.isdisjoint({k.owner for k in k1})
            assert [k.weight for k in k3] == [k.weight for k in k1]        # the same digests


def test_state_is_instance_scoped(lm_bundle, device):
    from aoti_rt._cache import Scope

    with aoti_rt.load(lm_bundle, device=device) as m1, aoti_rt.load(lm_bundle, device=device) as m2:
        s1 = {b.fqn: b for b in m1.prefill.bindings() if b.mutable}
        s2 = {b.fqn: b for b in m2.prefill.bindings() if b.mutable}
        assert s1 and s1.keys() == s2.keys()
        for fqn in s1:
            assert s1[fqn].key.scope is Scope.INSTANCE and s1[fqn].key != s2[fqn].key
            assert s1[fqn].buffer is not s2[fqn].buffer
            # the methods of one instance share it
            assert next(b for b in m1.decode.bindings() if b.fqn == fqn).buffer is s1[fqn].buffer


# -- the public rebind API --------------------------------------------------------------------

def test_rebind_binds_new_buffers_and_gives_back_what_it_no_longer_binds(three_bundle, device):
    from aoti_rt.views import buffer_view

    x = torch.randn(3, 64, device=device)
    with aoti_rt.load(three_bundle, device=device) as model:
        m, rt = model.a, model.a.runtime
        assert model.method_list() == [model.a, model.b, model.c]
        rows = m.bindings()
        assert [r.index for r in rows] == list(range(len(m.constants)))
        assert [r.fqn for r in rows] == m.constants
        row = next(r for r in rows if r.fqn.endswith("0.weight"))
        before = m(x)
        # "a" and "b" do not share layer 0: the entry is "a"'s alone
        assert rt.cache.refcount(row.key) == 1
        new = rt.allocator.allocate(row.buffer.nbytes)
        buffer_view(new, row.constant).copy_(buffer_view(row.buffer, row.constant) * 0)
        m.rebind({row.index: new})
        after = m.bindings()[row.index]
        assert after.buffer is new and after.key is None
        assert row.key not in rt.cache                       # released: its only holder let go
        assert not torch.allclose(m(x), before)
        # other constants and methods untouched
        assert [r.buffer for r in m.bindings() if r.index != row.index] == \
            [r.buffer for r in rows if r.index != row.index]
        shared = next(r for r in model.b.bindings() if r.fqn.endswith("1.weight"))
        refs = rt.cache.refcount(shared.key)
        assert refs == 2                                      # a and b bind layer 1
        copy = rt.allocator.allocate(shared.buffer.nbytes)
        raw = buffer_view(shared.buffer, shared.constant)
        buffer_view(copy, shared.constant).copy_(raw)
        model.b.rebind({shared.index: copy})
        assert rt.cache.refcount(shared.key) == 1             # exactly one reference given back
        torch.testing.assert_close(model.b(x), model.b(x))


def test_rebind_is_all_or_nothing_on_bad_input(three_bundle, device):
    x = torch.randn(3, 64, device=device)
    with aoti_rt.load(three_bundle, device=device) as model:
        m = model.a
        rows = m.bindings()
        want = m(x)
        small = m.runtime.allocator.allocate(4)
        good = m.runtime.allocator.allocate(rows[0].buffer.nbytes)
        for bad in ({0: good, len(rows): good}, {0: good, 1: small}, {0: good, 1: "buffer"}):
            with pytest.raises(aoti_rt.InputError):
                m.rebind(bad)
            assert [r.buffer for r in m.bindings()] == [r.buffer for r in rows]
            torch.testing.assert_close(m(x), want)
    with pytest.raises(aoti_rt.ClosedError):
        m.rebind({})
    with pytest.raises(aoti_rt.ClosedError):
        m.bindings()


def test_launch_lock_holds_calls_until_released(three_bundle, device):
    x = torch.randn(3, 64, device=device)
    with aoti_rt.load(three_bundle, device=device) as model:
        m = model.a
        m(x)
        done = threading.Event()
        with m.launch_lock():
            t = threading.Thread(target=lambda: (m(x), done.set()))
            t.start()
            assert not done.wait(0.5)                       # the call waits for the lock
            rows = m.bindings()
            m.rebind({rows[0].index: rows[0].buffer})       # rebind inside: no deadlock
        assert done.wait(30)
        t.join()


# -- options at the API's edge -------------------------------------------------------------------

def test_verify_is_converted_once_and_a_bad_value_is_refused(three_bundle, device):
    assert aoti_rt.Verify.of(True) is aoti_rt.Verify.ON_DEMAND
    assert aoti_rt.Verify.of("load") is aoti_rt.Verify.LOAD
    assert aoti_rt.Verify.of(False) is aoti_rt.Verify.NEVER
    assert aoti_rt.Verify.of(aoti_rt.Verify.LOAD) is aoti_rt.Verify.LOAD
    for bad in ("yes", 1, 0, None, "LOAD"):
        with pytest.raises(aoti_rt.OptionError, match="verify must be") as e:
            aoti_rt.load(three_bundle, device=device, verify=bad)
        assert isinstance(e.value, ValueError)
    with aoti_rt.load(three_bundle, device=device, verify=aoti_rt.Verify.LOAD) as model:
        assert model.a.bindings()
