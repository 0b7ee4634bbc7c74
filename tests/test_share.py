"""One copy of the weights across processes (``aoti_rt.load(..., share=name)``): real AOTI
models, client processes (tests/share_worker.py) and the memfd twin of CUDA VMM on the CPU.

Each test runs on the CPU and, marked ``cuda``, on a GPU (VMM arenas mapped read-only by the
GPU). The exporter is this process unless a test needs it to exit first.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import aoti_rt
from aoti_rt import _arena, _memory, demo, serving, share
from aoti_rt.bundle import read_bundle
from aoti_rt.device import get as runtime

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("share_worker.py")
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def _name(tag: str, device: str) -> str:
    """A share name no other test run on this machine uses."""
    return f"t{os.getpid()}-{tag}-{device.replace(':', '')}"


class Worker:
    """A client process (tests/share_worker.py) driven one command at a time."""

    def __init__(self, tmp: Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1")
        self.err = open(tmp / f"worker-{id(self)}.err", "w+")
        self.p = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.err, text=True, env=env, cwd=ROOT)
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            if line.startswith("ANSWER "):
                self.answers.put(json.loads(line[7:]))
        self.answers.put(None)

    def ask(self, timeout: float = 120, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        try:
            out = self.answers.get(timeout=timeout)
        except queue.Empty:
            out = None
        if out is None:
            self.err.seek(0)
            raise AssertionError(f"worker gave no answer to {cmd['op']}: {self.err.read()[-3000:]}")
        return out

    def stop(self, sig: int | None = None) -> int:
        if sig is not None:
            self.p.send_signal(sig)
        else:
            self.p.stdin.close()
        rc = self.p.wait(timeout=60)
        self.err.close()
        return rc


def _eager(device: str, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    lm = demo.make_model(device)
    with torch.no_grad():
        return demo.generate(demo.Prefill(lm), demo.Decode(lm), torch.tensor(prompt, device=device), n)


class Remote:
    """Greedy generation in a worker, one step per call, so that tests can interleave them."""

    def __init__(self, worker: Worker, prompt: list[int]):
        self.w = worker
        rows = worker.ask(op="prefill", tokens=prompt)["logits"]
        self.logits = [torch.tensor(rows[-1])]
        self.tokens = [int(self.logits[-1].argmax())]
        self.pos = len(prompt)

    def step(self) -> None:
        row = torch.tensor(self.w.ask(op="decode", token=self.tokens[-1], pos=self.pos)["logits"])
        self.logits.append(row)
        self.tokens.append(int(row.argmax()))
        self.pos += 1


def _same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) <= len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.cpu(), rtol=1e-4, atol=1e-4)


def _wait_for(cond, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _mutable_bytes(bundle: Path) -> int:
    return sum(w.nbytes for w in read_bundle(bundle).manifest.weights.values() if w.mutable)


# -- the arena and its allocator -------------------------------------------------------------

def _arena_allocator(device: str, parent=None) -> _arena.ArenaAllocator:
    rt = runtime(device)
    if rt.is_cuda:
        rt.check_shareable()
        return _arena.ArenaAllocator(device, rt.index, rt.context, parent)
    return _arena.ArenaAllocator("cpu", parent=parent)


def _view(buf, device):
    if device != "cpu":
        return torch.as_tensor(buf, device=device)
    with warnings.catch_warnings():          # a read-only arena's Buffer: only read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=torch.uint8)


def test_arena_allocator_carves_exports_and_frees(device):
    """One arena, 256-byte aligned Buffers with exact accounting; exported and mapped again
    read-only with the same bytes; gone with its last Buffer once frozen."""
    before = _memory.arena_totals()
    a = _arena_allocator(device)
    arena = a.reserve(100_000)
    bufs = [a.allocate(n) for n in (1, 255, 256, 40_000)]
    assert a.num_slabs == 1 and a.bytes_reserved == arena.nbytes >= 100_000
    assert a.bytes_allocated == 1 + 255 + 256 + 40_000 and a.num_allocations == 4
    assert all(b.ptr % 256 == 0 and b.arena is arena for b in bufs)
    assert [b.ptr - arena.address for b in bufs] == [0, 256, 512, 768]
    views = [_view(b, device) for b in bufs]
    for i, v in enumerate(views):
        v.fill_(i + 1)
    big = a.allocate(arena.nbytes)              # does not fit: a second arena
    assert a.num_slabs == 2 and big.arena is not arena
    del big
    gc.collect()
    assert a.num_slabs == 2                     # still the one being carved
    assert a.freeze() and arena.read_only       # read-only now, nothing more carved
    assert a.num_slabs == 1
    with pytest.raises(aoti_rt.AllocationError, match="frozen"):
        a.allocate(1)
    # another allocator maps it read-only from a descriptor, and sees the same bytes
    client = _arena_allocator(device)
    fd = arena.export()
    try:
        imported = client.attach(fd, arena.nbytes)
    finally:
        os.close(fd)
    assert imported.imported and imported.read_only and imported.address != arena.address
    got = client.carve(imported, 768, 40_000)
    assert bool((_view(got, device) == 4).all())
    with pytest.raises(aoti_rt.ShareError, match="outside the arena"):
        client.carve(imported, 768, arena.nbytes)
    with pytest.raises(aoti_rt.ShareError, match="alignment"):
        client.carve(imported, 10, 16)
    del views, bufs, v
    gc.collect()
    assert a.num_slabs == 0 and a.bytes_reserved == 0 and a.bytes_allocated == 0
    assert bool((_view(got, device) == 4).all())      # the client's mapping outlives the exporter's
    client.close()
    assert client.num_slabs == 1                      # held by its Buffer
    del got, imported
    gc.collect()
    assert client.num_slabs == 0 and client.bytes_reserved == 0
    assert _memory.arena_totals()[0] == before[0] + 1      # the arena object held here
    del arena
    assert _memory.arena_totals() == before


def test_arena_respects_the_memory_limit(device):
    rt = runtime(device)
    parent = _memory.HostAllocator("cpu") if not rt.is_cuda else rt.allocator
    old = parent.limit
    parent.limit = parent.bytes_allocated + 4096
    try:
        with pytest.raises(aoti_rt.AllocationError, match="memory limit"):
            _arena_allocator(device, parent).reserve(1 << 20)
    finally:
        parent.limit = old


def test_share_names_are_checked():
    assert share.check_name("llama-3.1_8b") == "llama-3.1_8b"
    for bad in ("", "-x", "a/b", "a b", "x" * 65, "é"):
        with pytest.raises(ValueError, match="share name"):
            share.check_name(bad)
    assert share.address("m", 1000) == b"\0aoti_rt.1000.m"


def test_a_client_waits_for_the_exporter_and_retries_if_it_gives_up():
    """A name is claimed before the exporter loads: a client that connects meanwhile waits for
    the answer, and sees None (nobody serves: it may export itself) if the exporter gives up."""
    name = _name("wait", "cpu")
    for serves in (True, False):
        server = share.ShareServer.bind(name)
        assert server is not None and share.ShareServer.bind(name) is None      # claimed once
        got: list = []
        t = threading.Thread(target=lambda: got.append(share.attach(name, timeout=30)))
        t.start()
        time.sleep(0.2)
        assert t.is_alive() and not got                   # waiting in the listen backlog
        if serves:
            server.serve({"hello": 1}, lambda: [])
        else:
            server.close()
        t.join(30)
        if serves:
            assert got[0].payload["hello"] == 1 and got[0].server_pid == os.getpid()
            _wait_for(lambda: server.stats()["clients"] == 1, "the client to count")
            got[0].close()
            _wait_for(lambda: server.stats()["clients"] == 0, "the client to detach")
            server.close()
        else:
            assert got == [None]
    assert share.attach(name, timeout=5) is None


# -- processes --------------------------------------------------------------------------------

def test_client_computes_like_eager_and_reads_no_weight(lm_bundle, device, tmp_path):
    """A second process maps the exporter's arena read-only, reads only its own KV cache and
    generates what eager PyTorch does; a write to a shared weight faults."""
    name = _name("eager", device)
    want_tokens, want_logits = _eager(device, PROMPT, 4)
    w = Worker(tmp_path)
    with aoti_rt.load(lm_bundle, device=device, share=name) as exporter:
        info = exporter.share
        assert info.role == "exporter" and info.clients == 0 and info.read_only and info.weights > 0
        assert info.exporter_pid == os.getpid() and info.arenas == 1 and info.arena_bytes >= info.weight_bytes
        ans = w.ask(op="load", bundle=str(lm_bundle), device=device, share=name)
        assert "error" not in ans, ans
        s = ans["share"]
        assert s["role"] == "client" and s["exporter_pid"] == os.getpid() and s["read_only"]
        assert (s["weights"], s["weight_bytes"], s["private_weights"]) == (info.weights, info.weight_bytes, 0)
        mutable = _mutable_bytes(lm_bundle)
        assert ans["bytes_read"] == mutable and ans["stats"]["bytes_read"] == mutable    # no weight byte
        assert ans["stats"]["bytes_allocated"] == mutable                           # only its KV cache
        assert ans["stats"]["shared_imported_bytes"] == info.arena_bytes
        assert exporter.share.clients == 1
        remote = Remote(w, PROMPT)
        for _ in range(3):
            remote.step()
        assert remote.tokens == want_tokens
        _same(remote.logits, want_logits)
        with torch.no_grad():                       # the exporter computes the same
            got, _ = demo.generate(exporter.prefill, exporter.decode, torch.tensor(PROMPT, device=device), 4)
        assert got == want_tokens
        if device == "cpu":
            lines = w.ask(op="maps")["lines"]
            assert lines and all(x.split()[1] == "r--s" for x in lines), lines
            with open("/proc/self/maps") as f:       # the exporter's own mapping is read-only too
                mine = [x for x in f if "aoti_rt-weights" in x]
            assert mine and all(x.split()[1] == "r--s" for x in mine), mine
            assert w.ask(op="write")["signal"] == signal.SIGSEGV
            assert w.ask(op="close")["arenas"] == [0, 0]
            assert w.stop() == 0
        else:
            assert w.ask(op="write")["error"]        # the GPU refused the write
            w.stop(signal.SIGKILL)                   # its context is gone: not used again
        _wait_for(lambda: exporter.share.clients == 0, "the client to detach")
        with torch.no_grad():                       # nobody wrote the weights
            got, _ = demo.generate(exporter.prefill, exporter.decode, torch.tensor(PROMPT, device=device), 4)
        assert got == want_tokens
    assert share.attach(name, timeout=10) is None   # closed: nobody serves the name


def test_the_exporter_updates_in_place_and_its_clients_compute_with_the_new_weights(lm_bundle, device, tmp_path):
    """update_weights(shared=True) in the exporter writes the one copy every process maps (its
    own mapping made writable for the update, read-only again after); a client may not write
    it, but may take a private copy."""
    from share_worker import new_lm_weights

    name = _name("update", device)
    lm1 = demo.make_model(device, seed=1)
    with torch.no_grad():
        want, want_logits = demo.generate(demo.Prefill(lm1), demo.Decode(lm1), torch.tensor(PROMPT, device=device), 3)
    w = Worker(tmp_path)
    with aoti_rt.load(lm_bundle, device=device, share=name) as exporter:
        assert "error" not in w.ask(op="load", bundle=str(lm_bundle), device=device, share=name)
        ans = w.ask(op="update", shared=True)
        assert ans["error_type"] == "InputError" and "exports" in ans["error"]
        report = exporter.update_weights(new_lm_weights(device), strict=False)
        assert report.fqns and report.copied_on_write == 0
        assert exporter.share.read_only
        remote = Remote(w, PROMPT)
        for _ in range(2):
            remote.step()
        assert remote.tokens == want
        _same(remote.logits, want_logits)
        ans = w.ask(op="update", shared=False)            # a private copy: allowed
        assert "error" not in ans and ans["copied_on_write"] > 0
        if device == "cpu":
            with open("/proc/self/maps") as f:
                mine = [x for x in f if "aoti_rt-weights" in x]
            assert mine and all(x.split()[1] == "r--s" for x in mine), mine
        w.stop()


def test_kv_cache_is_private_and_a_killed_client_detaches(lm_bundle, device, tmp_path):
    """Three processes generate from different prompts, interleaved step by step: each is
    eager's (mutable state is never shared). SIGKILL of one: the exporter's count drops and
    the others go on."""
    name = _name("kv", device)
    prompts = {"a": PROMPT, "b": [7, 7, 2, 9, 4, 4, 1, 0], "x": [11, 12, 13, 14, 15, 16, 17, 18]}
    want = {k: _eager(device, p, 7) for k, p in prompts.items()}
    workers = {"a": Worker(tmp_path), "b": Worker(tmp_path)}
    with aoti_rt.load(lm_bundle, device=device, share=name) as exporter:
        for k, w in workers.items():
            assert w.ask(op="load", bundle=str(lm_bundle), device=device, share=name)["share"]["role"] == "client"
        assert exporter.share.clients == 2 and exporter.share.attached == 2
        gens = {k: Remote(w, prompts[k]) for k, w in workers.items()}
        x = torch.tensor(prompts["x"], device=device)
        with torch.no_grad():
            mine = [exporter.prefill(x)[-1]]
            for _ in range(3):
                for g in gens.values():
                    g.step()
                tok = mine[-1].argmax().view(1)
                mine.append(exporter.decode(tok, torch.tensor([len(prompts["x"]) + len(mine) - 1],
                                                                device=device))[-1])
        for k, g in gens.items():
            assert g.tokens == want[k][0][:4], k
            _same(g.logits, want[k][1])
        assert [int(t.argmax()) for t in mine] == want["x"][0][:4]
        assert workers["b"].stop(signal.SIGKILL) == -signal.SIGKILL
        _wait_for(lambda: exporter.share.clients == 1, "the killed client to detach")
        for _ in range(3):
            gens["a"].step()
        assert gens["a"].tokens == want["a"][0]
        _same(gens["a"].logits, want["a"][1])
        assert workers["a"].stop() == 0
        _wait_for(lambda: exporter.share.clients == 0, "the last client to detach")


def test_processes_started_together_load_once(lm_bundle, device, tmp_path):
    """Two processes load the same name at the same moment: one exports, the other waits for
    it and attaches (reads no weight)."""
    name = _name("together", device)
    a, b = Worker(tmp_path), Worker(tmp_path)
    try:
        for w in (a, b):
            w.p.stdin.write(json.dumps({"op": "load", "bundle": str(lm_bundle), "device": device,
                                        "share": name}) + "\n")
            w.p.stdin.flush()
        answers = {w.p.pid: w.answers.get(timeout=120) for w in (a, b)}
        roles = sorted(x["share"]["role"] for x in answers.values())
        assert roles == ["client", "exporter"], answers
        exporter_pid = next(pid for pid, x in answers.items() if x["share"]["role"] == "exporter")
        client = next(x for x in answers.values() if x["share"]["role"] == "client")
        assert client["share"]["exporter_pid"] == exporter_pid
        assert client["bytes_read"] == _mutable_bytes(lm_bundle)
        assert a.stop() == 0 and b.stop() == 0
    finally:
        for w in (a, b):
            if w.p.poll() is None:
                w.p.kill()


def test_clients_outlive_the_exporter(lm_bundle, device, tmp_path):
    """``serve-weights`` exports; it stops (SIGTERM) while a client is mid-generation: the
    client finishes correctly and starts again on the memory it mapped; a new load of the
    name exports anew."""
    name = _name("outlive", device)
    want_tokens, want_logits = _eager(device, PROMPT, 6)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    srv = subprocess.Popen([sys.executable, "-m", "aoti_rt", "serve-weights", str(lm_bundle), "--name", name,
                            "--device", device], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env, cwd=ROOT)
    w = Worker(tmp_path)
    try:
        ready = srv.stdout.readline()
        assert ready.startswith(f"aoti_rt serve-weights: serving {name!r}"), ready + srv.stderr.read()
        ans = w.ask(op="load", bundle=str(lm_bundle), device=device, share=name)
        assert ans["share"]["role"] == "client" and ans["share"]["exporter_pid"] == srv.pid, ans
        remote = Remote(w, PROMPT)
        remote.step()
        srv.send_signal(signal.SIGTERM)
        assert srv.wait(timeout=60) == 0, srv.stderr.read()
        for _ in range(4):
            remote.step()
        assert remote.tokens == want_tokens
        _same(remote.logits, want_logits)
        again = Remote(w, PROMPT)                    # a new prefill on the same weights
        assert again.tokens == want_tokens[:1]
        with aoti_rt.load(lm_bundle, device=device, share=name) as fresh:
            assert fresh.share.role == "exporter" and fresh.share.clients == 0
        if device == "cpu":
            assert w.ask(op="close")["arenas"] == [0, 0]   # the last mapping went with it
        assert w.stop() == 0
    finally:
        if srv.poll() is None:
            srv.kill()
        if w.p.poll() is None:
            w.p.kill()


# -- refusals ---------------------------------------------------------------------------------

def test_a_stranger_is_refused(lm_bundle, device):
    """A peer of another uid gets a refusal and no descriptor; a client takes no handle from a
    server of another uid."""
    name = _name("uid", device)
    with aoti_rt.load(lm_bundle, device=device, share=name) as exporter:
        server = exporter._share.server
        server.allowed_uid = os.geteuid() + 1           # as if this process were a stranger
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(share.address(name))
            msg, fds = share.recv_message(s, share.MAX_FDS)
        assert msg["ok"] is False and "may not attach" in msg["error"] and fds == []
        with pytest.raises(aoti_rt.ShareError, match="refused this process.*may not attach"):
            share.attach(name, timeout=10)
        with pytest.raises(aoti_rt.ShareError, match="refused"):
            aoti_rt.load(lm_bundle, device=device, share=name, share_required=True)
        stats = server.stats()
        assert stats["refused"] == 3 and stats["attached"] == 0 and stats["clients"] == 0
        server.allowed_uid = os.geteuid()
        with pytest.raises(aoti_rt.ShareError, match="refusing handles from another user"):
            share.attach(name, timeout=10, expected_uid=os.geteuid() + 1)


def test_another_bundle_or_an_unverified_copy_is_refused(lm_bundle, lm_other_bundle, device, copy_bundle):
    name = _name("other", device)
    copy = copy_bundle(lm_bundle)
    with aoti_rt.load(lm_bundle, device=device, share=name) as exporter:
        with pytest.raises(aoti_rt.ShareError, match="for another bundle"):
            aoti_rt.load(lm_other_bundle, device=device, share=name)
        with pytest.raises(aoti_rt.ShareError, match="did not verify"):
            aoti_rt.load(copy, device=device, share=name)
        _wait_for(lambda: exporter.share.clients == 0, "refused clients to detach")
        assert exporter.share.attached == 2
    # an exporter that hashed every weight while loading serves copies of its bundle too
    with aoti_rt.load(lm_bundle, device=device, share=name, verify="load") as exporter, \
            aoti_rt.load(copy, device=device, share=name) as client:
        assert client.share.role == "client" and client.share.private_weights == 0
        x = torch.tensor(PROMPT, device=device)
        with torch.no_grad():
            torch.testing.assert_close(client.prefill(x), exporter.prefill(x))
    with pytest.raises(aoti_rt.ShareError, match=r"\.pt2 packages"):
        aoti_rt.load("model.pt2", device=device, share=name)
    with pytest.raises(ValueError, match="share name"):
        aoti_rt.load(lm_bundle, device=device, share="no/slashes")


# -- failures leave nothing ------------------------------------------------------------------

def test_a_failed_export_leaves_nothing_and_frees_the_name(lm_bundle, device):
    name = _name("fail", device)
    before = _memory.arena_totals()
    aoti_rt.set_memory_limit(4096, device)
    try:
        with pytest.raises(aoti_rt.AllocationError, match="memory limit"):
            aoti_rt.load(lm_bundle, device=device, share=name)
    finally:
        aoti_rt.set_memory_limit(0, device)
    assert _memory.arena_totals() == before
    assert share.attach(name, timeout=10) is None         # nobody holds the name
    with aoti_rt.load(lm_bundle, device=device, share=name) as m:
        assert m.share.role == "exporter"


def _fake_exporter(name: str, payload: dict, fds) -> share.ShareServer:
    server = share.ShareServer.bind(name)
    assert server is not None
    server.serve(payload, lambda: [os.dup(fd) for fd in fds])
    return server


def test_a_failed_attach_leaves_nothing(lm_bundle, device):
    """What an exporter sends is checked before it is used: a descriptor shorter than its arena,
    one that may shrink, a weight placed outside its arena. Each refusal maps, caches and
    allocates nothing, even one that comes in the middle of loading a method."""
    rt = runtime(device)
    name = _name("badattach", device)
    before = _memory.arena_totals()
    entries = len(rt.cache)
    base = {"name": name, "pid": os.getpid(), "identity": {**serving.bundle_identity(read_bundle(lm_bundle)),
                                                          "verified": False},
            "device": rt.identity(), "weights": []}
    if device == "cpu":
        import fcntl

        short = os.memfd_create("short", os.MFD_ALLOW_SEALING)
        os.ftruncate(short, 4096)
        fcntl.fcntl(short, 1033, 0x2 | 0x4)                  # F_ADD_SEALS: no shrinking, no growing
        unsealed = os.memfd_create("unsealed")
        os.ftruncate(unsealed, 1 << 20)
        try:
            for fd, why in ((short, "descriptor of 4096 bytes"), (unsealed, "not sealed against shrinking")):
                server = _fake_exporter(name, {**base, "arenas": [{"size": 1 << 20, "kind": "memfd"}]}, [fd])
                with pytest.raises(aoti_rt.ShareError, match=why):
                    aoti_rt.load(lm_bundle, device=device, share=name)
                server.close()
        finally:
            os.close(short)
            os.close(unsealed)
    # the real arena of a real exporter, with a weight table that places a weight past its end
    with aoti_rt.load(lm_bundle, device=device, share=_name("real", device)) as exporter:
        real = exporter._share.server._payload
        table = [list(r) for r in real["weights"]]
        table[len(table) // 2][3] = real["arenas"][0]["size"]
        arenas = exporter._share.allocator.arenas
        fds = [a.export() for a in arenas]
        try:
            server = _fake_exporter(name, {**base, "arenas": real["arenas"], "weights": table}, fds)
            totals = _memory.arena_totals()
            held = (rt.allocator.bytes_allocated, len(rt.cache))
            with pytest.raises(aoti_rt.ShareError, match="outside the arena"):
                aoti_rt.load(lm_bundle, device=device, share=name)
            gc.collect()
            assert _memory.arena_totals() == totals and (rt.allocator.bytes_allocated, len(rt.cache)) == held
            _wait_for(lambda: server.stats()["clients"] == 0, "the failed client to detach")
            server.close()
        finally:
            for fd in fds:
                os.close(fd)
    gc.collect()
    assert _memory.arena_totals() == before and len(rt.cache) == entries


def test_cli_explains_serve_weights():
    top = subprocess.run([sys.executable, "-m", "aoti_rt", "--help"], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert "serve-weights" in top and "share=NAME" in top
    out = subprocess.run([sys.executable, "-m", "aoti_rt", "serve-weights", "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    for words in ("share=NAME", "SIGINT or SIGTERM", "read-only", "--name", "--device", "--no-verify"):
        assert words in out, words
