"""The loader: verified content (BLAKE3 tree digests), interrupts, memory safety of the copies.

Synthetic stores are plain files of known bytes; the compiled bundles come from conftest.
Every test runs on the CPU; those taking the ``device`` fixture also on CUDA where present.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from blake3 import blake3
from hypothesis import given, settings, strategies as st

import aoti_rt
from aoti_rt import _load, digest, loader
from aoti_rt.bundle import read_bundle
from aoti_rt.device import get as runtime

BLOCK = digest.BLOCK


def _pattern(n: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()


def _store(tmp_path: Path, data: bytes, name: str = "store.bin") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _contents(buf, n: int) -> bytes:
    if buf.allocator.is_cuda:
        return torch.as_tensor(buf, device=buf.device)[:n].cpu().numpy().tobytes()
    return bytes(memoryview(buf)[:n])


def _open_fds_on(path: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                out.append(fd)
        except OSError:
            pass
    return out


def _ctrl_c() -> None:
    """SIGINT to the main thread, as Ctrl-C delivers it (it also interrupts a blocking wait
    there, which _thread.interrupt_main does not)."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def _load_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("aoti_rt-load")]


# -- the digest format ----------------------------------------------------------------------

def test_digest_of_known_bytes_is_stable():
    # fixed values: a change here changes every bundle's digests (bump the domain string)
    assert digest.BLOCK == 4 << 20
    assert digest.weight_digest(b"") == \
        "b3t:206860c7cd06f386dac83932e82ff48979e3f4fe801b59c61cce60e337e3066c"
    assert digest.weight_digest(b"abc") == \
        "b3t:dc3c0d7bd91b9df441da6c9fe52cd54f05ea245920fda3ab51863e2df7febd4c"
    n = 2 * BLOCK + 12345
    data = (bytes(range(251)) * (n // 251 + 1))[:n]
    assert digest.weight_digest(data) == \
        "b3t:0dc876a64778f4863412f99cea5e0d5d9db85626969becb26f30a00c1109faf4"


def test_digest_definition():
    """The documented construction, spelled out with blake3 alone."""
    n = BLOCK + 7
    data = _pattern(n)
    blocks = [blake3(data[:BLOCK]).digest(), blake3(data[BLOCK:]).digest()]
    want = blake3(b"aoti_rt weight v1\0" + n.to_bytes(8, "little") + b"".join(blocks)).hexdigest()
    assert digest.weight_digest(data) == "b3t:" + want
    assert digest.combine(n, blocks) == digest.combine(n, b"".join(blocks)) == "b3t:" + want
    assert digest.weight_digest(b"") == "b3t:" + blake3(b"aoti_rt weight v1\0" + bytes(8)).hexdigest()
    assert digest.num_blocks(0) == 0 and digest.num_blocks(1) == 1 and digest.num_blocks(BLOCK) == 1
    with pytest.raises(ValueError):
        digest.combine(n, blocks[:1])
    with pytest.raises(ValueError):
        digest.combine(0, blocks[:1])
    # the same bytes viewed as another dtype have the same digest
    t = torch.frombuffer(bytearray(data[:4096]), dtype=torch.uint8).view(torch.float32)
    assert digest.weight_digest(t.numpy()) == digest.weight_digest(data[:4096])


def test_large_weight_digest_is_threaded_and_fork_safe():
    """A weight of many blocks is hashed by a thread pool to the same digest as block by block,
    and a forked child (the compiler's CPU workers) hashes one too, not waiting forever on the
    parent's pool, whose threads it does not have."""
    n = digest._PARALLEL_BLOCKS * BLOCK + 99
    data = _pattern(n)
    serial = digest.combine(n, [blake3(data[i:i + BLOCK]).digest() for i in range(0, n, BLOCK)])
    assert digest.weight_digest(data) == serial            # the parent's pool now exists
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                           # the child: answer, or be killed
        try:
            os.write(w, digest.weight_digest(data).encode())
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    if done == (0, 0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's digest hung on the parent's thread pool")
    with os.fdopen(r, "rb") as f:
        assert f.read().decode() == serial


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 70_000), st.integers(0, 2**32 - 1))
def test_own_blake3_equals_the_blake3_package(n, seed):
    """The C BLAKE3 that hashes small pieces and digest roots without the GIL."""
    data = seed.to_bytes(4, "little") * (n // 4 + 1)
    data = data[:n]
    assert _load.b3_hash(data) == blake3(data).digest()


def test_own_blake3_at_chunk_boundaries():
    data = _pattern(300 * 1024 + 5, seed=9)
    for k in list(range(0, 40)) + [64, 65, 127, 128, 129, 255, 256, 257, 299, 300]:
        for d in (-1, 0, 1):
            n = max(0, 1024 * k + d)
            assert _load.b3_hash(data[:n]) == blake3(data[:n]).digest(), n
    for n in (0, 1, BLOCK, BLOCK + 1, 5 * BLOCK):
        h = _pattern(32 * digest.num_blocks(n), seed=n % 7)
        assert _load.b3_combine(n, h) == digest.combine(n, h)


# -- plans ----------------------------------------------------------------------------------

def test_plan_splits_weights_at_block_boundaries():
    rt = runtime("cpu")
    sizes = [2 * BLOCK + 1, 5, 0, BLOCK]
    offsets = [100, 100 + sizes[0], 0, 100 + sizes[0] + 5]
    bufs = [rt.allocator.allocate(s) for s in sizes]
    plan = _load.LoadPlan(offsets, sizes, bufs, 2 * BLOCK, verify=True)
    assert plan.num_pieces == 3 + 1 + 0 + 1
    assert plan.total_bytes == sum(sizes)
    assert plan.max_end == offsets[3] + BLOCK
    # contiguous pieces, grouped into chunks of at most 2 blocks
    assert plan.num_chunks == 2      # [B, B] and [1, 5, B]
    assert plan.buffers == tuple(bufs)     # the plan holds its destinations
    with pytest.raises(ValueError, match="at least the hash block"):
        _load.LoadPlan(offsets, sizes, bufs, BLOCK - 1)
    with pytest.raises(ValueError, match="holds"):
        _load.LoadPlan([0], [BLOCK], [rt.allocator.allocate(16)], BLOCK)
    with pytest.raises(TypeError):
        _load.LoadPlan([0], [16], [12345], BLOCK)


def test_plan_keeps_its_buffers_alive():
    rt = runtime("cpu")
    before = rt.allocator.bytes_allocated
    plan = _load.LoadPlan([0], [1 << 20], [rt.allocator.allocate(1 << 20)], BLOCK)
    gc.collect()
    assert rt.allocator.bytes_allocated - before == 1 << 20
    del plan
    gc.collect()
    assert rt.allocator.bytes_allocated == before


# -- verified loads -------------------------------------------------------------------------

def test_compiler_digest_equals_loader_digest(three_bundle, device):
    b = read_bundle(three_bundle)
    rt = runtime(device)
    weights = list(b.manifest.weights.values())
    data = b.store_path.read_bytes()
    for w in weights:
        assert w.digest.startswith("b3t:")
        assert w.digest == digest.weight_digest(data[w.offset:w.offset + w.nbytes])
    bufs = [rt.allocator.allocate(w.nbytes) for w in weights]
    n = loader.read_weights(rt, b.store_path, [w.offset for w in weights], [w.nbytes for w in weights],
                            bufs, digests=[w.digest for w in weights], names=[w.id for w in weights],
                            progress=False)
    assert n == sum(w.nbytes for w in weights)
    for w, buf in zip(weights, bufs):
        assert _contents(buf, w.nbytes) == data[w.offset:w.offset + w.nbytes]
    # the plan's own digests are the compiler's
    plan = _load.LoadPlan([w.offset for w in weights], [w.nbytes for w in weights], bufs,
                           loader.CHUNK_BYTES, verify=True)
    stagers = rt.take_stagers(1, loader.CHUNK_BYTES) if rt.is_cuda else None
    fd = os.open(b.store_path, os.O_RDONLY)
    try:
        _load.run_workers(plan, 1, (lambda w: stagers[0].run(plan, fd)) if rt.is_cuda else
                           (lambda w: plan.run_host(fd)))
    finally:
        os.close(fd)
        if stagers:
            rt.give_stagers(stagers)
    assert plan.digests() == [w.digest for w in weights]


def test_flipped_byte_is_refused(three_bundle, device, copy_bundle):
    b = copy_bundle(three_bundle)
    man = read_bundle(b).manifest
    store = b / "weights.safetensors"
    victim = max(man.weights.values(), key=lambda w: w.nbytes)
    with open(store, "r+b") as f:
        f.seek(victim.offset + victim.nbytes // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    rt = runtime(device)
    weights = list(man.weights.values())
    args = (rt, store, [w.offset for w in weights], [w.nbytes for w in weights])

    def load(**kw):
        bufs = [rt.allocator.allocate(w.nbytes) for w in weights]
        return loader.read_weights(*args, bufs, progress=False, **kw)

    load()                                  # unverified: loads the tampered bytes
    with pytest.raises(aoti_rt.BundleError, match="do not match its digest") as e:
        load(digests=[w.digest for w in weights], names=[w.id for w in weights])
    assert repr(victim.id) in str(e.value)
    # a weight without a digest is not checked
    load(digests=[None if w is victim else w.digest for w in weights])
    # the pinned-store path verifies the same way, from the pinned image
    with aoti_rt.pin_store(b, device=device):
        with pytest.raises(aoti_rt.BundleError, match="do not match its digest"):
            load(digests=[w.digest for w in weights], workers=2)


@pytest.mark.parametrize("chunk_blocks", [1, 8])
def test_large_weight_split_across_workers_verifies(tmp_path, device, chunk_blocks):
    big = 3 * BLOCK + 4097
    sizes = [big, 4096, 1, 0, BLOCK]
    data = _pattern(sum(sizes) + 333, seed=1)
    offsets, at = [], 333                 # odd offsets: blocks do not align with the file
    for s in sizes:
        offsets.append(at)
        at += s
    store = _store(tmp_path, data)
    digests = [digest.weight_digest(data[o:o + s]) for o, s in zip(offsets, sizes)]
    rt = runtime(device)
    for workers in (1, 3):
        bufs = [rt.allocator.allocate(s) for s in sizes]
        loader.read_weights(rt, store, offsets, sizes, bufs, digests=digests, workers=workers,
                            chunk_bytes=chunk_blocks * BLOCK, progress=False)
        for o, s, buf in zip(offsets, sizes, bufs):
            assert _contents(buf, s) == data[o:o + s]
    # one flipped byte in the big weight's last block
    bad = bytearray(data)
    bad[offsets[0] + big - 3] ^= 0x80
    store.write_bytes(bad)
    bufs = [rt.allocator.allocate(s) for s in sizes]
    with pytest.raises(aoti_rt.BundleError, match="weight 0 .*do not match"):
        loader.read_weights(rt, store, offsets, sizes, bufs, digests=digests, workers=3,
                            chunk_bytes=chunk_blocks * BLOCK, progress=False)


def test_many_small_weights_verify(tmp_path):
    n, size = 3000, 4096
    data = _pattern(n * size, seed=2)
    store = _store(tmp_path, data)
    rt = runtime("cpu")
    offsets = [i * size for i in range(n)]
    sizes = [size - (i % 3) for i in range(n)]          # not all contiguous in memory
    digests = [digest.weight_digest(data[o:o + s]) for o, s in zip(offsets, sizes)]
    bufs = [rt.allocator.allocate(s) for s in sizes]
    loader.read_weights(rt, store, offsets, sizes, bufs, digests=digests, workers=2, progress=False)
    assert all(_contents(b, s) == data[o:o + s] for o, s, b in zip(offsets, sizes, bufs))
    digests[1234] = digest.weight_digest(b"something else")
    with pytest.raises(aoti_rt.BundleError, match="weight 1234 "):
        loader.read_weights(rt, store, offsets, sizes, bufs, digests=digests, workers=2, progress=False)


@pytest.mark.parametrize("c_hash_max", [0, 4096, 1 << 20], ids=["blake3", "mixed", "own-c"])
def test_both_hashing_paths_agree(tmp_path, c_hash_max):
    """Pieces hashed by the blake3 package and by our C code give the compiler's digests, and
    first_mismatch (C roots) agrees with digests() (aoti_rt.digest.combine)."""
    sizes = [1, 1000, 1024, 4096, 4097, 70_000, BLOCK + 3, 0, 12_345]
    data = _pattern(sum(sizes), seed=6)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    want = [digest.weight_digest(data[o:o + s]) for o, s in zip(offsets, sizes)]
    store = _store(tmp_path, data)
    rt = runtime("cpu")
    bufs = [rt.allocator.allocate(s) for s in sizes]
    plan = _load.LoadPlan(offsets, sizes, bufs, 2 * BLOCK, verify=True)
    assert plan.c_hash_max > 0          # our C BLAKE3 passed its self-check against blake3
    plan.c_hash_max = c_hash_max
    fd = os.open(store, os.O_RDONLY)
    try:
        _load.run_workers(plan, 2, lambda w: plan.run_host(fd, w, 2))
    finally:
        os.close(fd)
    assert plan.digests() == want
    assert plan.first_mismatch(want) == -1
    assert plan.first_mismatch([None] * len(sizes)) == -1
    for i in range(len(sizes)):
        bad = list(want)
        bad[i] = digest.weight_digest(b"other")
        assert plan.first_mismatch(bad) == i
    bad = list(want)
    bad[2] = want[2].upper().replace("B3T:", "b3t:")      # hex case does not matter
    assert plan.first_mismatch(bad) == -1
    bad[3] = want[3][:-1]
    assert plan.first_mismatch(bad) == 3


def test_unverifiable_digest_is_refused(tmp_path):
    store = _store(tmp_path, b"x" * 64)
    rt = runtime("cpu")
    buf = rt.allocator.allocate(64)
    with pytest.raises(aoti_rt.BundleError, match="cannot verify"):
        loader.read_weights(rt, store, [0], [64], [buf], digests=["sha256:" + "0" * 64], progress=False)
    with pytest.raises(ValueError, match="same length"):
        loader.read_weights(rt, store, [0], [64], [buf], digests=[], progress=False)


def test_zero_byte_weights_verify(tmp_path):
    store = _store(tmp_path, b"abc")
    rt = runtime("cpu")
    bufs = [rt.allocator.allocate(0), rt.allocator.allocate(0)]
    assert loader.read_weights(rt, store, [0, 3], [0, 0], bufs, digests=[digest.weight_digest(b"")] * 2) == 0
    with pytest.raises(aoti_rt.BundleError, match="do not match"):
        loader.read_weights(rt, store, [0, 3], [0, 0], bufs, digests=[digest.weight_digest(b"a")] * 2)


# -- what the store may be ------------------------------------------------------------------

def test_store_shorter_than_the_weights_is_refused_before_reading(tmp_path):
    store = _store(tmp_path, b"y" * 100)
    rt = runtime("cpu")
    buf = rt.allocator.allocate(64)
    with pytest.raises(aoti_rt.BundleError, match="truncated.*needs bytes up to 114"):
        loader.read_weights(rt, store, [50], [64], [buf], progress=False)
    with pytest.raises(aoti_rt.BundleError, match="corrupt"):
        loader.read_weights(rt, store, [-1], [10], [buf], progress=False)
    # the low-level read reports a short file itself
    plan = _load.LoadPlan([50], [64], [buf], BLOCK, source="test store")
    fd = os.open(store, os.O_RDONLY)
    try:
        with pytest.raises(aoti_rt.BundleError, match="test store ended early.*truncated"):
            plan.run_host(fd)
    finally:
        os.close(fd)


def test_fifo_store_is_refused_quickly(tmp_path):
    fifo = tmp_path / "weights.fifo"
    os.mkfifo(fifo)
    rt = runtime("cpu")
    buf = rt.allocator.allocate(16)
    t0 = time.monotonic()
    with pytest.raises(aoti_rt.BundleError, match="not a regular file"):
        loader.read_weights(rt, fifo, [0], [16], [buf], progress=False)
    with pytest.raises(aoti_rt.BundleError, match="not a regular file"):
        aoti_rt.pin_store(fifo, device="cpu")
    with pytest.raises(aoti_rt.BundleError, match="not a regular file"):
        loader.read_weights(rt, tmp_path, [0], [16], [buf], progress=False)
    assert time.monotonic() - t0 < 2.0
    assert not _open_fds_on(fifo)


def test_pinned_store_bad_offset_is_refused(tmp_path, device):
    data = _pattern(1 << 20, seed=3)
    store = _store(tmp_path, data)
    rt = runtime(device)
    buf = rt.allocator.allocate(4096)
    with aoti_rt.pin_store(store, device=device) as pinned:
        # the loader checks the extents against the pinned image first
        with pytest.raises(aoti_rt.BundleError, match="truncated"):
            loader.read_weights(rt, store, [len(data) - 100], [4096], [buf], progress=False)
        # and copy_from_host itself refuses a piece past the image, before copying anything
        plan = _load.LoadPlan([len(data) - 100], [4096], [buf], BLOCK, verify=True, source="pinned")
        stager = rt.take_stagers(1, BLOCK)[0] if rt.is_cuda else None
        with pytest.raises(aoti_rt.BundleError, match="past the end"):
            _load.copy_from_host(plan, pinned.image, stager)
        if stager is not None:
            rt.give_stagers([stager])
        assert plan.bytes_done == 0
        # a good load from the pinned image reads nothing from disk and verifies
        assert loader.read_weights(rt, store, [100], [4096], [buf], progress=False,
                                   digests=[digest.weight_digest(data[100:4196])]) == 0
        assert _contents(buf, 4096) == data[100:4196]
        # closing the pinned store while a plan copies from it cannot free the image under it:
        # the copy holds its own reference (here: the image outlives close() while referenced)
        image = pinned.image
    assert pinned.image is None and image.ptr != 0
    del image


# -- interrupts -----------------------------------------------------------------------------

def _interrupt_twice(monkeypatch, second_when_cancelled: bool):
    """Patch run_workers so that a helper thread interrupts the main thread (SIGINT, as Ctrl-C)
    once the load has started, and again a moment later (or once the load is being
    cancelled). Both count only while run_workers is running: an interrupt that comes after
    it returned is counted as late and ignored, so it cannot land in the test's own checks."""
    real = _load.run_workers
    seen: dict = {"raised": 0, "late": 0, "in_load": False}

    def on_sigint(signum, frame):
        if seen["in_load"]:
            seen["raised"] += 1
            raise KeyboardInterrupt
        seen["late"] += 1

    def spy(plan, n, fn, progress=None, *rest):
        seen["plan"] = plan

        def interrupter():
            deadline = time.monotonic() + 10
            while plan.bytes_done == 0 and time.monotonic() < deadline:
                time.sleep(0.0001)
            _ctrl_c()
            # (a signal not yet handled is not queued twice: wait for the first to be handled)
            while not seen["raised"] and time.monotonic() < deadline:
                time.sleep(0.00005)
            if second_when_cancelled:
                while not plan.cancelled and time.monotonic() < deadline:
                    time.sleep(0.00005)
            else:
                time.sleep(0.002)
            _ctrl_c()
            seen["sent"] = 2

        helper = threading.Thread(target=interrupter, name="test-interrupter", daemon=True)
        seen["helper"] = helper
        seen["in_load"] = True
        try:
            helper.start()
            return real(plan, n, fn, progress, *rest)
        finally:
            seen["in_load"] = False

    monkeypatch.setattr(_load, "run_workers", spy)
    old = signal.signal(signal.SIGINT, on_sigint)
    return seen, lambda: signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("second_when_cancelled", [True, False], ids=["during-cleanup", "2ms-later"])
def test_two_interrupts_leave_no_worker_running(tmp_path, device, monkeypatch, second_when_cancelled):
    nblocks = 48                        # 192 MiB: long enough to be interrupted on any machine
    data = _pattern(BLOCK, seed=4) * nblocks
    store = _store(tmp_path, data)
    sizes = [8 * BLOCK] * (nblocks // 8)
    offsets = [i * 8 * BLOCK for i in range(nblocks // 8)]
    digests = [digest.weight_digest(data[o:o + s]) for o, s in zip(offsets, sizes)]
    rt = runtime(device)
    for attempt in range(3):
        bufs = [rt.allocator.allocate(s) for s in sizes]
        seen, restore = _interrupt_twice(monkeypatch, second_when_cancelled)
        state = {}
        try:
            try:
                loader.read_weights(rt, store, offsets, sizes, bufs, digests=digests, workers=2,
                                    progress=False)
            except KeyboardInterrupt:
                # what holds when the exception surfaces from read_weights
                state["threads"] = _load_threads()
                state["fds"] = _open_fds_on(store)
            seen["helper"].join()
            time.sleep(0.01)            # let a late interrupt reach the handler (it is ignored)
        finally:
            restore()
            monkeypatch.undo()
        assert state, "the load finished before it was interrupted"
        assert seen["raised"] + seen["late"] == 2 and seen["raised"] >= 1
        assert state["threads"] == [], f"loader threads still alive: {state['threads']}"
        assert state["fds"] == [], "the store's file descriptor was left open"
        plan = seen["plan"]
        assert plan.cancelled and plan.active_workers == 0
        del bufs
        gc.collect()
    # and an uninterrupted load afterwards is fine
    bufs = [rt.allocator.allocate(s) for s in sizes]
    loader.read_weights(rt, store, offsets, sizes, bufs, digests=digests, workers=2, progress=False)
    assert not _load_threads()


def test_second_interrupt_while_joining_is_deferred(tmp_path):
    """Workers that take a while to finish after the cancel (here: 50 ms of Python after their
    loop) keep run_workers joining them; a second interrupt then must not escape the join."""
    data = _pattern(BLOCK, seed=7) * 16
    store = _store(tmp_path, data)
    rt = runtime("cpu")
    bufs = [rt.allocator.allocate(len(data))]
    # paced at 128 MB/s (0.5 s for 64 MiB): both workers are inside their loops together however
    # busy the machine is (unpaced, one could finish before the other started)
    plan = _load.LoadPlan([0], [len(data)], bufs, BLOCK, verify=True, max_bytes_per_s=128e6)
    seen = {"raised": 0, "in": True}
    finished = []

    def on_sigint(signum, frame):
        if seen["in"]:
            seen["raised"] += 1
            raise KeyboardInterrupt(seen["raised"])

    def fn(w):
        plan.run_host(fd, w, 2)
        time.sleep(0.05)
        finished.append(w)

    def interrupter():
        deadline = time.monotonic() + 30
        # both threads started (their start() is not interrupted)
        while plan.active_workers < 2 and time.monotonic() < deadline:
            time.sleep(0.0001)
        _ctrl_c()
        while not plan.cancelled and time.monotonic() < deadline:
            time.sleep(0.0001)
        time.sleep(0.005)               # the workers are in their 50 ms: main is joining them
        _ctrl_c()

    fd = os.open(store, os.O_RDONLY)
    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        helper = threading.Thread(target=interrupter, daemon=True)
        helper.start()
        with pytest.raises(KeyboardInterrupt) as e:
            _load.run_workers(plan, 2, fn)
        seen["in"] = False
        helper.join()
    finally:
        seen["in"] = False
        signal.signal(signal.SIGINT, old)
        os.close(fd)
    assert e.value.args == (1,)           # the first is re-raised, the second was deferred
    assert seen["raised"] == 2
    assert sorted(finished) == [0, 1]     # both workers ran to their end before it surfaced
    assert not _load_threads()


def test_worker_error_cancels_the_others(tmp_path):
    """A worker that fails stops the rest; run_workers raises its error once all have stopped."""
    data = _pattern(16 * BLOCK, seed=5)
    store = _store(tmp_path, data)
    rt = runtime("cpu")
    bufs = [rt.allocator.allocate(16 * BLOCK)]
    plan = _load.LoadPlan([0], [16 * BLOCK], bufs, BLOCK, verify=True)
    fd = os.open(store, os.O_RDONLY)

    def fn(w):
        if w == 1:
            raise RuntimeError("worker 1 failed")
        time.sleep(0.05)
        return plan.run_host(fd, w, 2)

    try:
        with pytest.raises(RuntimeError, match="worker 1 failed"):
            _load.run_workers(plan, 2, fn)
    finally:
        os.close(fd)
    assert plan.cancelled and plan.active_workers == 0
    assert plan.bytes_done == 0           # worker 0 started after the cancel: it did nothing
    assert not _load_threads()
    with pytest.raises(RuntimeError, match="did not finish"):
        plan.digests()


# -- start-up and serving: O_DIRECT on a cold page cache, the rate cap ---------------------------

def _weights_at(data: bytes, k: int = 37) -> tuple[list[int], list[int]]:
    """k weights of uneven sizes at unaligned offsets covering ``data`` (a store's layout)."""
    cuts = sorted({0, len(data)} | {(i * 7919 * 4099) % len(data) for i in range(1, k)})
    return cuts[:-1], [b - a for a, b in zip(cuts[:-1], cuts[1:])]


@pytest.mark.parametrize("verify", [False, True])
def test_direct_reads_match_buffered_reads(tmp_path, device, verify):
    """O_DIRECT reads (aligned extents into the staging slack) give the very bytes buffered
    reads give, for weights at unaligned offsets, with and without hashing; on the CPU, and
    where the file system has no O_DIRECT, ``direct=True`` falls back to buffered reads."""
    data = _pattern(3 * BLOCK + 12345, seed=3)
    store = _store(tmp_path, data)
    offsets, sizes = _weights_at(data)
    rt = runtime(device)
    digests = [digest.weight_digest(data[o:o + n]) for o, n in zip(offsets, sizes)] if verify else None
    for direct in (True, False):
        bufs = [rt.allocator.allocate(n) for n in sizes]
        loader.read_weights(rt, store, offsets, sizes, bufs, digests=digests, progress=False,
                            direct=direct, chunk_bytes=BLOCK)
        for o, n, b in zip(offsets, sizes, bufs):
            assert _contents(b, n) == data[o:o + n], (direct, o, n)
        del bufs
    gc.collect()


def test_direct_read_of_a_truncated_store_is_refused(tmp_path, device):
    data = _pattern(BLOCK + 5000, seed=4)
    store = _store(tmp_path, data)
    rt = runtime(device)
    buf = rt.allocator.allocate(BLOCK)
    # the manifest claims more than the file holds: refused before reading
    with pytest.raises(aoti_rt.BundleError, match="truncated"):
        loader.read_weights(rt, store, [5000], [BLOCK + 1], [rt.allocator.allocate(BLOCK + 1)],
                            progress=False, direct=True)
    loader.read_weights(rt, store, [5000], [BLOCK], [buf], progress=False, direct=True)
    assert _contents(buf, BLOCK) == data[5000:5000 + BLOCK]



def _fronts(rt, fd: int, image) -> dict:
    """Every way a worker enters the one copy loop on ``rt``'s device, as ``name -> run(plans, w,
    nworkers)`` (``plans``: the driving plan first, then other plans of its layout where the
    front copies to several destinations). Each worker has its own copy engine or staging."""
    if rt.is_cuda:
        stagers = rt.take_stagers(3, BLOCK)
        return {
            "staged": lambda plans, w, n: stagers[w].run(plans[0], fd, w, n),
            "image": lambda plans, w, n: _load.copy_from_host(plans[0], image, stagers[w], w, n),
            "replicated": lambda plans, w, n: _load.run_replicated(plans[:1], (stagers[w],), fd, w, n),
        }
    staging = [(rt.allocator.allocate(BLOCK + 2 * _load.DIRECT_ALIGN),
                rt.allocator.allocate(BLOCK + 2 * _load.DIRECT_ALIGN)) for _ in range(3)]
    return {
        "in_place": lambda plans, w, n: plans[0].run_host(fd, w, n),
        "image": lambda plans, w, n: _load.copy_from_host(plans[0], image, None, w, n),
        "replicated": lambda plans, w, n: _load.run_replicated(plans, (), fd, w, n, False, staging[w], False),
        "relayed": lambda plans, w, n: _load.run_replicated(plans, (), fd, w, n, False, staging[w], True),
    }


@pytest.mark.parametrize("verify", [False, True])
def test_every_front_of_the_copy_loop_moves_and_hashes_the_same(tmp_path, device, verify):
    """Reading in place, through staging buffers, from a pinned image and to several
    destinations is one loop: each front, with one worker and with three, puts every weight's
    bytes where its plan says, counts them once, hashes them to the weight's digest, and
    stops at a store that ends early with the same error."""
    data = _pattern(3 * BLOCK + 12345, seed=5)
    store = _store(tmp_path, data)
    offsets, sizes = _weights_at(data)
    want = [digest.weight_digest(data[o:o + n]) for o, n in zip(offsets, sizes)]
    rt = runtime(device)
    fd = os.open(store, os.O_RDONLY)
    try:
        with aoti_rt.pin_store(store, device=device) as pinned:
            fronts = _fronts(rt, fd, pinned.image)
            for name, run in fronts.items():
                for nworkers in (1, 3):
                    dests = [[rt.allocator.allocate(n) for n in sizes] for _ in range(2)]
                    plans = tuple(_load.LoadPlan(offsets, sizes, bufs, BLOCK, verify=verify and d == 0)
                                  for d, bufs in enumerate(dests))
                    _load.run_workers(plans[0], nworkers, lambda w: run(plans, w, nworkers))
                    copied = dests if name in ("replicated", "relayed") and not rt.is_cuda else dests[:1]
                    for bufs in copied:
                        for o, n, b in zip(offsets, sizes, bufs):
                            assert _contents(b, n) == data[o:o + n], (name, nworkers, o, n)
                    assert plans[0].bytes_done == sum(sizes), (name, nworkers)
                    if verify:
                        assert plans[0].digests() == want, (name, nworkers)
                        assert plans[0].first_mismatch(want) == -1
            # the store ends inside the last weight: every front reading the file says so
            os.truncate(store, len(data) - 1000)
            for name, run in fronts.items():
                if name == "image":
                    continue
                plan = _load.LoadPlan(offsets, sizes, [rt.allocator.allocate(n) for n in sizes], BLOCK,
                                      verify=verify, source="the test store")
                with pytest.raises(aoti_rt.BundleError, match=r"the test store ended early \(reading at byte"):
                    _load.run_workers(plan, 2, lambda w: run((plan,), w, 2))
                assert plan.cancelled and plan.active_workers == 0, name
    finally:
        os.close(fd)


def _fs_type(path: Path) -> str:
    """The type of the file system ``path`` is on (the longest mount point above it)."""
    best, kind = "", "unknown"
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mnt.rstrip("/") + "/") and len(mnt) > len(best):
                best, kind = mnt, fstype
    return kind


def test_page_cache_cold_sees_dropped_pages(tmp_path):
    """A file just written is in the page cache; after POSIX_FADV_DONTNEED (clean pages) it
    is not, and the sample says so without reading the disk."""
    data = _pattern(8 << 20, seed=5)
    store = _store(tmp_path, data)
    offsets, sizes = _weights_at(data, 16)
    fd = os.open(store, os.O_RDONLY)
    try:
        assert not loader.page_cache_cold(fd, offsets, sizes)
        fs = _fs_type(tmp_path)
        if fs not in ("ext4", "xfs", "btrfs") or not hasattr(os, "RWF_NOWAIT"):
            pytest.skip(f"{fs}: a file system that may keep its pages (tmpfs, overlay), or no RWF_NOWAIT")
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert loader.page_cache_cold(fd, offsets, sizes)
        os.pread(fd, len(data), 0)                      # read once: warm again
        assert not loader.page_cache_cold(fd, offsets, sizes)
    finally:
        os.close(fd)


def test_rate_cap_holds_the_loader_to_it(tmp_path, device):
    """With max_bytes_per_s, the workers together move no faster than the cap (and the
    bytes are right); without, the same load is much faster."""
    data = _pattern(16 * BLOCK, seed=6)          # 64 MiB
    store = _store(tmp_path, data)
    rt = runtime(device)
    bufs = [rt.allocator.allocate(4 * BLOCK) for _ in range(4)]
    offsets, sizes = [i * 4 * BLOCK for i in range(4)], [4 * BLOCK] * 4
    cap = 200e6                                  # 200 MB/s: ~0.34 s for 64 MiB
    t0 = time.perf_counter()
    loader.read_weights(rt, store, offsets, sizes, bufs, progress=False, max_bytes_per_s=cap,
                        chunk_bytes=BLOCK, workers=4)
    capped = time.perf_counter() - t0
    # the last chunk may start at the cap's deadline for the bytes before it
    assert capped >= (len(data) - BLOCK) / cap * 0.95, capped
    for o, b in zip(offsets, bufs):
        assert _contents(b, 4 * BLOCK) == data[o:o + 4 * BLOCK]
    with pytest.raises(ValueError, match="max_load_gbps"):
        aoti_rt.load(tmp_path, max_load_gbps=-1)   # checked before anything else is done


def test_hashing_a_fifo_is_refused_at_once(tmp_path):
    """The digest of a path that is a FIFO is an OSError at once: a plain open would block until a
    writer came (the thread is released by opening the FIFO for writing if it blocks)."""
    import threading

    from aoti_rt.digest import file_digests

    fifo = tmp_path / "store"
    os.mkfifo(fifo)
    got: list[BaseException] = []

    def digest() -> None:
        try:
            file_digests(str(fifo), [(0, 1)])
        except BaseException as e:  # noqa: BLE001 - handed to the test
            got.append(e)

    t = threading.Thread(target=digest, daemon=True)
    t.start()
    t.join(10)
    blocked = t.is_alive()
    if blocked:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
    assert not blocked, "file_digests blocked on a FIFO"
    assert len(got) == 1 and isinstance(got[0], OSError) and "not a regular file" in str(got[0])
