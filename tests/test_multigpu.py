"""Several devices in one process: each device its own cache, the replicated
load (``load(path, device=[...])``: the store read once, copied to every device) and the
tensor-parallel example.

What runs on the CPU (CI): the device-list checks, the replicated load to ``["cpu"]`` (the same
Python and Cython path as to GPUs, one destination), the Cython fan-out loop to several host
destinations, and the example under torchrun with the gloo backend. The tests marked ``cuda``
need two GPUs and are skipped, saying so, with fewer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

import aoti_rt
from aoti_rt import _load, _memory, demo, digest, loader
from aoti_rt.bundle import read_bundle
from aoti_rt.device import Device, get as runtime, parse_devices

from conftest import CUDA, _compile
from models import METHOD_LAYERS, Subset, make_stack

ROOT = Path(__file__).resolve().parents[1]
GPUS = torch.cuda.device_count() if CUDA else 0
needs_2_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 GPUs (torch.cuda.device_count() is {GPUS})")
PAIR = ["cuda:0", "cuda:1"]
PROMPT = list(range(1, 9))


def _held(device) -> tuple[int, int]:
    s = aoti_rt.cache_stats(device)
    return s["bytes_allocated"], s["entries"]


def _read(device) -> int:
    return aoti_rt.cache_stats(device)["bytes_read"]


def _corrupt(bundle: Path) -> None:
    """Flip one byte in the middle of the bundle's largest weight."""
    b = read_bundle(bundle)
    w = max(b.manifest.weights.values(), key=lambda w: w.nbytes)
    with open(b.store_path, "r+b") as f:
        f.seek(w.offset + w.nbytes // 2)
        byte = f.read(1)
        f.seek(w.offset + w.nbytes // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def _three_reference(device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An input and each three_bundle method's eager output for it, on ``device``."""
    s = make_stack(device)
    x = torch.randn(3, 64, device=device)
    with torch.no_grad():
        return x, {name: Subset(s, layers)(x) for name, layers in METHOD_LAYERS.items()}


def _check_three(model, device: str, reference=None) -> None:
    """Every method of a three_bundle model equals eager on ``device``."""
    x, want = reference or _three_reference(device)
    for name in METHOD_LAYERS:
        got = getattr(model, name)(x)
        assert got.device == torch.device(device)
        torch.testing.assert_close(got, want[name])


# -- the device list: checked before anything is allocated (CPU) ----------------------------

def test_device_list_refuses_duplicates_mixes_and_absent_devices():
    for bad, match in ((["cpu", "cpu"], "appears twice"), ([], "empty list"), (["cpu", "cuda:0"], "mixes"),
                       (["cuda:0", "cpu"], "mixes"), (["cuda:99"], "not available"), (["tpu"], "unknown device")):
        with pytest.raises(aoti_rt.DeviceError, match=match):
            parse_devices(bad)
    if GPUS >= 1:
        with pytest.raises(aoti_rt.DeviceError, match="appears twice"):
            parse_devices(["cuda:0", "cuda:0"])
    assert parse_devices(("CPU",)) == [Device("cpu")]
    assert issubclass(aoti_rt.DeviceError, aoti_rt.AotiRtError) and issubclass(aoti_rt.DeviceError, ValueError)


def test_load_with_a_bad_device_list_allocates_nothing(three_bundle, device):
    other = "cpu" if device != "cpu" else "cuda:0"
    before = {d: _held(d) for d in ("cpu", device)}
    absent = [device, "cuda:99"] if device != "cpu" else ["cuda:98", "cuda:99"]
    for bad, match in (([device, device], "appears twice"), ([device, other], "mixes"),
                       (absent, "not available")):
        with pytest.raises(aoti_rt.DeviceError, match=match):
            aoti_rt.load(three_bundle, device=bad)
    with pytest.raises(aoti_rt.AotiRtError, match="not available"):      # a single absent GPU too
        aoti_rt.load(three_bundle, device="cuda:99")
    assert {d: _held(d) for d in ("cpu", device)} == before


# -- the replicated load on the CPU: the same path as to GPUs, one destination ----------------

def test_replicated_load_to_one_device_equals_a_plain_load(three_bundle, device):
    man = read_bundle(three_bundle).manifest
    base, read0 = _held(device), _read(device)
    models = aoti_rt.load(three_bundle, device=[device])
    try:
        assert isinstance(models, list) and len(models) == 1
        (m,) = models
        assert m.device == str(Device.parse(device)) and m.methods == list(man.methods)
        # one copy of each weight, read once
        assert _held(device)[0] - base[0] == man.unique_weight_bytes()
        assert _read(device) - read0 == man.unique_weight_bytes()
        assert sum(m[n].bytes_read for n in m.methods) == man.unique_weight_bytes()
        _check_three(m, device)
        # a plain load of the same bundle now shares every weight and reads nothing
        with aoti_rt.load(three_bundle, device=device) as plain:
            assert _held(device)[0] - base[0] == man.unique_weight_bytes()
            x = torch.randn(3, 64, device=device)
            for name in man.methods:
                torch.testing.assert_close(plain[name](x), m[name](x))
    finally:
        for mm in models:
            mm.close()
    assert _held(device) == base


def test_replicated_load_verifies_and_refuses_a_corrupt_store(three_bundle, device, copy_bundle):
    base = _held(device)
    (m,) = aoti_rt.load(three_bundle, device=[device], verify="load")
    _check_three(m, device)
    m.close()
    bad = copy_bundle(three_bundle)
    _corrupt(bad)
    with pytest.raises(aoti_rt.BundleError, match="do not match its digest"):
        aoti_rt.load(bad, device=[device], verify="load")
    assert _held(device) == base


def test_replicated_load_keeps_each_instance_its_own_state(lm_bundle, device):
    """The KV cache is instance state: a replicated model generates as eager does."""
    with torch.no_grad():
        want, _ = demo.generate(*_eager_lm(device), torch.tensor(PROMPT, device=device), 8)
    (m,) = aoti_rt.load(lm_bundle, device=[device])
    with m:
        with torch.no_grad():
            got, _ = demo.generate(m.prefill, m.decode, torch.tensor(PROMPT, device=device), 8)
    assert got == want


def _eager_lm(device):
    lm = demo.make_model(device)
    return demo.Prefill(lm), demo.Decode(lm)


# -- the Cython fan-out loop, to several host destinations (CPU) ----------------------------

def _pattern(n: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()


def _weights(total: int):
    B = digest.BLOCK
    offs = [0, 100, B + 5, 2 * B, 2 * B + 7 * 4096, total - 3]
    sizes = [100, B - 95, 4000, 7 * 4096, total - (2 * B + 7 * 4096) - 3, 3]
    return offs, sizes


@pytest.mark.parametrize("relay", [False, True])
@pytest.mark.parametrize("nworkers", [1, 3])
@pytest.mark.parametrize("verify", [False, True])
def test_run_replicated_fans_each_chunk_out_to_every_destination(tmp_path, nworkers, verify, relay):
    data = _pattern(3 * digest.BLOCK + 12345)
    store = tmp_path / "store.bin"
    store.write_bytes(data)
    offs, sizes = _weights(len(data))
    host = _memory.HostAllocator("cpu")
    dests = [[host.allocate(n) for n in sizes] for _ in range(3)]
    plans = tuple(_load.LoadPlan(offs, sizes, bufs, digest.BLOCK, verify=verify and d == 0)
                  for d, bufs in enumerate(dests))
    assert all(plans[0].same_layout(p) for p in plans)
    fd = os.open(store, os.O_RDONLY)
    try:
        _load.run_workers(plans[0], nworkers, lambda w: _load.run_replicated(
            plans, (), fd, w, nworkers, False, (host.allocate(digest.BLOCK + 2 * _load.DIRECT_ALIGN),), relay))
    finally:
        os.close(fd)
    for bufs in dests:
        for off, n, b in zip(offs, sizes, bufs):
            assert bytes(memoryview(b)[:n]) == data[off:off + n]
    assert plans[0].bytes_done == sum(sizes)        # the store's bytes, counted once
    if verify:
        assert plans[0].first_mismatch([digest.weight_digest(data[o:o + n]) for o, n in zip(offs, sizes)]) == -1


def test_run_replicated_refuses_plans_that_do_not_fit(tmp_path):
    data = _pattern(2 * digest.BLOCK)
    store = tmp_path / "store.bin"
    store.write_bytes(data)
    host = _memory.HostAllocator("cpu")
    a = _load.LoadPlan([0, 10], [10, 100], [host.allocate(10), host.allocate(100)], digest.BLOCK)
    b = _load.LoadPlan([0, 10], [10, 99], [host.allocate(10), host.allocate(100)], digest.BLOCK)
    v = _load.LoadPlan([0, 10], [10, 100], [host.allocate(10), host.allocate(100)], digest.BLOCK, verify=True)
    staging = (host.allocate(digest.BLOCK + 2 * _load.DIRECT_ALIGN),)
    assert not a.same_layout(b)
    fd = os.open(store, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="does not cut the weights"):
            _load.run_replicated((a, b), (), fd, 0, 1, False, staging)
        with pytest.raises(ValueError, match="only the first plan"):
            _load.run_replicated((a, v), (), fd, 0, 1, False, staging)
        with pytest.raises(ValueError, match="one plan twice"):
            _load.run_replicated((a, a), (), fd, 0, 1, False, staging)
        with pytest.raises(ValueError, match="host staging"):
            _load.run_replicated((a,), (), fd, 0, 1, False, None)
        with pytest.raises(ValueError, match="must hold"):
            _load.run_replicated((a,), (), fd, 0, 1, False, (host.allocate(16),))
        with pytest.raises(ValueError, match="direct"):
            _load.run_replicated((a,), (), fd, 0, 1, True, staging)
    finally:
        os.close(fd)


def test_read_replicated_of_a_truncated_store_is_refused(tmp_path):
    store = tmp_path / "store.bin"
    store.write_bytes(_pattern(1000))
    rt = runtime("cpu")
    bufs = [rt.allocator.allocate(600), rt.allocator.allocate(600)]
    with pytest.raises(aoti_rt.BundleError, match="truncated"):
        loader.read_replicated([rt], store, [0, 500], [600, 600], [bufs])
    with pytest.raises(ValueError, match="distinct devices"):
        loader.read_replicated([rt, rt], store, [0], [600], [[bufs[0]], [bufs[1]]])
    n = loader.read_replicated([rt], store, [0, 400], [600, 600], [bufs], progress=False)
    assert n == [1200] and bytes(memoryview(bufs[1])[:600]) == _pattern(1000)[400:]


# -- the tensor-parallel example under torchrun ----------------------------------------------

def _torchrun(tmp_path: Path, device: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}     # a crash shows every thread's stack
    tmp_path.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "tensor_parallel.py"), "--device", device, "--workdir", str(tmp_path)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


#: what gloo's teardown prints when a rank aborts at exit (pytorch/pytorch#190489, #179291): a
#: race in torch's shutdown, after the example's result is in
GLOO_EXIT_ABORT = "terminate called without an active exception"


def test_tensor_parallel_example_on_cpu(tmp_path):
    """torchrun, 2 ranks, gloo: each rank compiles and loads its shards; rank 0 checks the sum.

    Seen once in CI (not reproduced in 30 runs here): rank 0 printed OK, then aborted at exit
    in gloo's teardown. That case, and only that one, is run a second time; a wrong result, any
    other failure, or the abort twice fails the test."""
    r = _torchrun(tmp_path / "1", "cpu", 300)
    if r.returncode != 0 and "tensor_parallel: OK" in r.stdout and GLOO_EXIT_ABORT in r.stderr:
        warnings.warn(f"tensor_parallel: a rank aborted in gloo's teardown after its result: ran again\n"
                      f"{r.stderr[-2000:]}")
        r = _torchrun(tmp_path / "2", "cpu", 300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tensor_parallel: OK" in r.stdout


# -- two GPUs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_three(workdir) -> Path:
    """three_bundle compiled for cuda:0 (the one conftest compiles when CUDA is present)."""
    def programs():
        s = make_stack("cuda:0")
        x = torch.randn(3, 64, device="cuda:0")
        return {name: torch.export.export(Subset(s, layers), (x,)) for name, layers in METHOD_LAYERS.items()}
    return _compile(workdir, "three", "cuda:0", programs)


@pytest.fixture(scope="module")
def cuda_lm(workdir) -> Path:
    return _compile(workdir, "lm", "cuda:0", lambda: demo.export_methods(demo.make_model("cuda:0")))


@pytest.mark.cuda
@needs_2_gpus
def test_same_bundle_on_two_gpus_has_a_cache_each(cuda_three):
    man = read_bundle(cuda_three).manifest
    base = {d: _held(d) for d in PAIR}
    torch.cuda.set_device(0)
    m0 = aoti_rt.load(cuda_three, device="cuda:0")
    m1 = aoti_rt.load(cuda_three, device="cuda:1")
    try:
        # loading on cuda:1 left the caller's current device alone
        assert torch.cuda.current_device() == 0
        for d in PAIR:          # each device: one copy of each weight
            held, entries = _held(d)
            assert held - base[d][0] == man.unique_weight_bytes()
            assert entries - base[d][1] == len(man.weights)
        # each runs on its own device with the other device current (the first call of the
        # cuda:1 model creates AOTI's event while cuda:0 is current)
        _check_three(m1, "cuda:1")
        torch.cuda.set_device(1)
        _check_three(m0, "cuda:0")
        assert torch.cuda.current_device() == 1
        torch.cuda.set_device(0)
        w = m1.weight("stack.layers.0.weight")
        assert w.device == torch.device("cuda:1")
        torch.testing.assert_close(w, make_stack("cuda:1").layers[0].weight)
        # on the current stream of the model's device: work queued there before the call is seen
        x = torch.randn(3, 64, device="cuda:1")
        with torch.cuda.stream(torch.cuda.Stream("cuda:1")):
            torch.cuda._sleep(100_000_000)       # ~0.1 s queued first: a call on another stream reads y unwritten
            y = x * 2
            got = m1.a(y)
        torch.cuda.synchronize("cuda:1")
        torch.testing.assert_close(got, Subset(make_stack("cuda:1"), METHOD_LAYERS["a"])(x * 2))
        m0.close()
        assert _held("cuda:0") == base["cuda:0"]               # closing one frees only its own
        assert _held("cuda:1")[0] - base["cuda:1"][0] == man.unique_weight_bytes()
        _check_three(m1, "cuda:1")
    finally:
        m0.close()
        m1.close()
        torch.cuda.set_device(0)
    assert {d: _held(d) for d in PAIR} == base


@pytest.mark.cuda
@needs_2_gpus
@pytest.mark.parametrize("mode", ["host", "peer"])
@pytest.mark.parametrize("verify", [True, "load"])
def test_replicated_load_equals_two_loads_and_reads_once(cuda_three, verify, mode, monkeypatch):
    """Both ways of reaching cuda:1: from the staging buffer ("host") and from cuda:0's copy
    over the GPUs' link ("peer", where the GPUs have peer access; else the same as "host")."""
    monkeypatch.setattr(loader, "REPLICATE", mode)
    man = read_bundle(cuda_three).manifest
    base = {d: _held(d) for d in PAIR}
    read = {d: _read(d) for d in PAIR}
    models = aoti_rt.load(cuda_three, device=PAIR, verify=verify)
    try:
        assert [m.device for m in models] == PAIR
        assert torch.cuda.current_device() == 0
        # the store read once for both devices (counted on the first)
        assert sum(_read(d) - read[d] for d in PAIR) == man.unique_weight_bytes()
        for d, m in zip(PAIR, models):
            assert _held(d)[0] - base[d][0] == man.unique_weight_bytes()
            _check_three(m, d)
        # separate loads now share what the replicated one holds: same buffers, same outputs
        x = {d: torch.randn(3, 64, device=d) for d in PAIR}
        for d, m in zip(PAIR, models):
            with aoti_rt.load(cuda_three, device=d) as single:
                assert _held(d)[0] - base[d][0] == man.unique_weight_bytes()
                for name in man.methods:
                    torch.testing.assert_close(single[name](x[d]), m[name](x[d]))
    finally:
        for m in models:
            m.close()
    assert {d: _held(d) for d in PAIR} == base


@pytest.mark.cuda
@needs_2_gpus
def test_replicated_load_of_a_model_with_state(cuda_lm):
    with torch.no_grad():
        want = {d: demo.generate(*_eager_lm(d), torch.tensor(PROMPT, device=d), 8)[0] for d in PAIR}
    models = aoti_rt.load(cuda_lm, device=PAIR)
    try:
        with torch.no_grad():
            for d, m in zip(PAIR, models):
                got, _ = demo.generate(m.prefill, m.decode, torch.tensor(PROMPT, device=d), 8)
                assert got == want[d]
        # each device's model its own KV cache: a live view on its device
        k0 = models[0].weight(next(f for f in models[0].prefill.constants if "cache" in f))
        k1 = models[1].weight(next(f for f in models[1].prefill.constants if "cache" in f))
        assert k0.device == torch.device("cuda:0") and k1.device == torch.device("cuda:1")
        before = k1.clone()
        k0.fill_(7)                             # a live view: this instance's state, not the other's
        torch.cuda.synchronize("cuda:0")
        assert torch.equal(k1, before) and not torch.equal(before, torch.full_like(before, 7))
    finally:
        for m in models:
            m.close()


@pytest.mark.cuda
@needs_2_gpus
def test_replicated_load_where_one_device_holds_the_weights(cuda_three):
    """cuda:0 holds every weight already: only cuda:1 is filled (read for it alone)."""
    man = read_bundle(cuda_three).manifest
    base = {d: _held(d) for d in PAIR}
    with aoti_rt.load(cuda_three, device="cuda:0"):
        read = {d: _read(d) for d in PAIR}
        models = aoti_rt.load(cuda_three, device=PAIR)
        try:
            assert _read("cuda:0") == read["cuda:0"]
            assert _read("cuda:1") - read["cuda:1"] == man.unique_weight_bytes()
            for d, m in zip(PAIR, models):
                _check_three(m, d)
        finally:
            for m in models:
                m.close()
    assert {d: _held(d) for d in PAIR} == base


@pytest.mark.cuda
@needs_2_gpus
def test_replicated_load_failing_on_one_device_frees_both(cuda_three, copy_bundle):
    base = {d: _held(d) for d in PAIR}
    aoti_rt.set_memory_limit(1024, "cuda:1")
    try:
        with pytest.raises(aoti_rt.AllocationError):
            aoti_rt.load(cuda_three, device=PAIR)
    finally:
        aoti_rt.set_memory_limit(0, "cuda:1")
    assert {d: _held(d) for d in PAIR} == base
    bad = copy_bundle(cuda_three)
    _corrupt(bad)
    with pytest.raises(aoti_rt.BundleError, match="do not match its digest"):
        aoti_rt.load(bad, device=PAIR, verify="load")
    assert {d: _held(d) for d in PAIR} == base


@pytest.mark.cuda
@needs_2_gpus
@pytest.mark.parametrize("relay", [False, True])
def test_replicated_read_fills_both_gpus(tmp_path, relay):
    """The Cython fan-out on two GPUs, straight: every byte lands on both, the store read once.
    One-block chunks, 2 workers: each worker goes round its staging buffers several times, so
    a buffer is refilled only after every device's copy from it (or, relayed, device 0's) is done.
    relay: cuda:1 copies each chunk from cuda:0's memory (where it has peer access)."""
    rts = [runtime(d) for d in PAIR]
    if relay and not rts[1].peer_access(rts[0]):
        pytest.skip("cuda:1 has no peer access to cuda:0 here: replicated loads copy from the host")
    data = _pattern(9 * digest.BLOCK + 12345)
    store = tmp_path / "store.bin"
    store.write_bytes(data)
    offs, sizes = _weights(len(data))
    assert (len(data) // digest.BLOCK) // 2 > loader.STAGING_DEPTH        # chunks per worker
    bufs = [[rt.allocator.allocate(n) for n in sizes] for rt in rts]
    n = loader.read_replicated(rts, store, offs, sizes, bufs, relay=relay, workers=2, progress=False,
                               chunk_bytes=digest.BLOCK,
                               digests=[digest.weight_digest(data[o:o + k]) for o, k in zip(offs, sizes)])
    assert n == [sum(sizes), 0]
    for rt, bb in zip(rts, bufs):
        for off, k, b in zip(offs, sizes, bb):
            got = torch.as_tensor(b, device=str(rt.device))[:k].cpu().numpy().tobytes()
            assert got == data[off:off + k]
    del bufs


@pytest.mark.cuda
@needs_2_gpus
def test_cuda_means_the_current_device():
    try:
        torch.cuda.set_device(1)
        assert Device.parse("cuda") == Device("cuda", 1)
    finally:
        torch.cuda.set_device(0)
    assert Device.parse("cuda") == Device("cuda", 0)


@pytest.mark.cuda
@needs_2_gpus
def test_concurrent_loads_on_two_gpus(cuda_three):
    """Two threads each load on their own GPU at once: independent caches, right outputs."""
    base = {d: _held(d) for d in PAIR}
    out: dict[str, object] = {}
    # the eager references first: make_stack seeds torch's one global generator, which two
    # threads would interleave
    refs = {d: _three_reference(d) for d in PAIR}

    def run(d: str) -> None:
        try:
            with aoti_rt.load(cuda_three, device=d) as m:
                _check_three(m, d, refs[d])
            out[d] = True
        except BaseException as e:  # noqa: BLE001 - reported below
            out[d] = e

    threads = [threading.Thread(target=run, args=(d,)) for d in PAIR]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {d: True for d in PAIR}, out
    assert {d: _held(d) for d in PAIR} == base


@pytest.mark.cuda
@needs_2_gpus
def test_tensor_parallel_example_on_two_gpus(tmp_path):
    r = _torchrun(tmp_path, "cuda", 900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tensor_parallel: OK" in r.stdout
