"""The boundary between processes that share weights (``load(..., share=name)``): what a client
process, another user, or a hostile or broken exporter can and cannot do.

Real processes (tests/share_worker.py) and real sockets; each process test runs on the CPU and,
marked ``cuda``, on a GPU through the ``device`` fixture.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import socket
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

import aoti_rt
from aoti_rt import _arena, _memory, demo, serving, share
from aoti_rt.bundle import read_bundle
from aoti_rt.device import get as runtime
from aoti_rt.errors import ShareNameError, ShareUnavailableError
from test_share import PROMPT, ROOT, Worker, _mutable_bytes, _name, _wait_for

F_GET_SEALS = 1034
F_SEAL_FUTURE_WRITE = 0x10


@pytest.fixture
def cpu_lm(device, request):
    """The demo LM bundle, for the tests of the host (memfd) mechanism and the protocol."""
    if device != "cpu":
        pytest.skip("a test of the host arenas and the wire protocol: the CPU run covers it")
    return request.getfixturevalue("lm_bundle")


def _prefill(device: str, seed: int) -> torch.Tensor:
    lm = demo.make_model(device, seed=seed)
    with torch.no_grad():
        return demo.Prefill(lm)(torch.tensor(PROMPT, device=device)).cpu()


# -- 1. a client cannot write the shared weights ------------------------------------------------

def test_the_memfd_is_sealed_against_writes_and_the_exporter_can_still_update():
    """Once mapped, the exporter's memfd refuses write() and writable shared mappings through any
    descriptor of it; the exporter's own mapping can still be made writable (an in-place update)
    and read-only again."""
    a = _arena.ArenaAllocator("cpu")
    arena = a.reserve(8192)
    buf = a.allocate(4096)
    memoryview(buf)[:4] = b"abcd"
    assert a.freeze() and buf.read_only
    fd = arena.export()
    try:
        assert fcntl.fcntl(fd, F_GET_SEALS) & F_SEAL_FUTURE_WRITE
        rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)       # a client's reopen, read-write
        try:
            with pytest.raises(PermissionError):
                os.pwrite(rw, b"x", 0)
            import mmap

            with pytest.raises(PermissionError):
                mmap.mmap(rw, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(rw)
    finally:
        os.close(fd)
    arena.unprotect()                       # the exporter's update path
    memoryview(buf)[:4] = b"wxyz"
    assert arena.protect() and bytes(memoryview(buf)[:4]) == b"wxyz"
    del buf, arena
    a.close()
    gc.collect()


def test_a_client_process_cannot_write_the_exporters_memfd(cpu_lm, tmp_path):
    """A hostile client process reopens the descriptor it was sent read-write through
    /proc/self/fd/N, and the mapping of its model through /proc/self/map_files: no route maps
    it writable or writes a byte, and the exporter computes what it did."""
    name = _name("tamper", "cpu")
    want = _prefill("cpu", 0)
    w = Worker(tmp_path)
    try:
        with aoti_rt.load(cpu_lm, device="cpu", share=name) as exporter:
            assert w.ask(op="load", bundle=str(cpu_lm), device="cpu", share=name)["share"]["role"] == "client"
            ans = w.ask(op="tamper", share=name)
            assert "error" not in ans, ans
            assert ans["reopen"] and ans["map_files"], ans
            for route in ans["reopen"] + ans["map_files"]:
                # the open may work (as root, map_files opens); mapping writable and write() may not
                assert route["open"] != 0 or (route["mmap"] == errno.EPERM and route["write"] == errno.EPERM), ans
            with torch.no_grad():
                torch.testing.assert_close(exporter.prefill(torch.tensor(PROMPT))[-1], want[-1])
        assert w.stop() == 0
    finally:
        if w.p.poll() is None:
            w.p.kill()


def test_a_client_refuses_a_memfd_not_sealed_against_writes(cpu_lm):
    """An exporter whose memfd any process could write is refused, however well-formed the rest."""
    rt = runtime("cpu")
    name = _name("unsealedw", "cpu")
    fd = os.memfd_create("w", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 16)
    fcntl.fcntl(fd, 1033, 0x2 | 0x4)                         # shrink and grow sealed, writes not
    payload = {**_base(cpu_lm, rt, name), "arenas": [{"size": 1 << 16, "kind": "memfd"}]}
    server = share.ShareServer.bind(name)
    server.serve(payload, lambda: [os.dup(fd)])
    try:
        with pytest.raises(aoti_rt.ShareError, match="not sealed against writes"):
            _attach_client(name, read_bundle(cpu_lm), rt, 10)
    finally:
        server.close()
        os.close(fd)


# -- 2. a client's arena is its own model's ------------------------------------------------------

def test_a_plain_load_in_a_client_process_keeps_its_own_weights(lm_bundle, device, tmp_path, copy_bundle):
    """After attaching, a plain load of the same bundle in the client process binds no arena
    weight and reads its own store; when the exporter updates in place, the client model sees
    the new weights and the plain load the old. A verify="load" load of a copy binds no arena
    weight either."""
    from share_worker import new_lm_weights

    name = _name("scope", device)
    old, new = _prefill(device, 0), _prefill(device, 1)
    copy = copy_bundle(lm_bundle)
    w = Worker(tmp_path)
    try:
        with aoti_rt.load(lm_bundle, device=device, share=name) as exporter:
            ans = w.ask(op="load", bundle=str(lm_bundle), device=device, share=name)
            assert ans["share"]["role"] == "client" and ans["arena_bound"], ans
            plain = w.ask(op="load", bundle=str(lm_bundle), device=device, share=None, **{"as": "plain"})
            assert "error" not in plain, plain
            assert not plain["arena_bound"] and plain["bytes_read"] > _mutable_bytes(lm_bundle)
            copied = w.ask(op="load", bundle=str(copy), device=device, share=None, verify="load",
                           **{"as": "copy"})
            assert "error" not in copied and not copied["arena_bound"], copied
            exporter.update_weights(new_lm_weights(device), strict=False)
            got = {k: torch.tensor(w.ask(op="prefill", tokens=PROMPT, model=k)["logits"])
                   for k in ("main", "plain", "copy")}
            torch.testing.assert_close(got["main"], new, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got["plain"], old, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got["copy"], old, rtol=1e-4, atol=1e-4)
            w.ask(op="close")
        assert w.stop() == 0
    finally:
        if w.p.poll() is None:
            w.p.kill()


# -- 3. denial of service and hangs --------------------------------------------------------------

def _stranger(name: str, listen: bool = True) -> subprocess.Popen:
    """A process of another uid (nobody) that binds this user's address of ``name`` and holds it."""
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        f"s.bind({share.address(name)!r})\n"
        + ("s.listen(8)\n" if listen else "") +
        "print('bound', flush=True)\n"
        "sys.stdin.read()\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "bound"
    return p


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user takes root")
@pytest.mark.parametrize("listen", [True, False], ids=["listening", "silent"])
def test_a_squatted_name_loads_privately_with_a_warning(cpu_lm, listen):
    """Another user binds this user's address of the name first (listening, or only bound): a
    load warns and loads privately, or raises ShareUnavailableError with share_required."""
    name = _name(f"squat{int(listen)}", "cpu")
    squatter = _stranger(name, listen)
    try:
        t0 = time.monotonic()
        with pytest.raises(ShareUnavailableError, match="uid 65534" if listen else "accepts no connection"):
            aoti_rt.load(cpu_lm, device="cpu", share=name, share_required=True)
        assert time.monotonic() - t0 < serving.SILENT_HOLDER + 5          # not the whole deadline
        with pytest.warns(RuntimeWarning, match="privately"):
            model = aoti_rt.load(cpu_lm, device="cpu", share=name)
        with model:
            assert model.share is None
            with torch.no_grad():
                torch.testing.assert_close(model.prefill(torch.tensor(PROMPT)), _prefill("cpu", 0))
    finally:
        squatter.stdin.close()
        squatter.wait(10)


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user takes root")
def test_a_stranger_flooding_the_exporter_does_not_keep_clients_out(cpu_lm):
    """Another user holding 200 connections to a serving exporter: each is refused, and a load
    of this user still attaches."""
    name = _name("flood", "cpu")
    with aoti_rt.load(cpu_lm, device="cpu", share=name) as exporter:
        code = (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "socks = []\n"
            "for _ in range(200):\n"
            "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.setblocking(False)\n"
            f"    try: s.connect({share.address(name)!r})\n"
            "    except BlockingIOError: pass\n"
            "    socks.append(s)\n"
            "print('flooding', flush=True)\n"
            "sys.stdin.read()\n"
        )
        flood = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            line = flood.stdout.readline().strip()
            assert line == "flooding", flood.stderr.read() if flood.poll() is not None else line
            with aoti_rt.load(cpu_lm, device="cpu", share=name, share_required=True) as client:
                assert client.share.role == "client", client.share
            stats = exporter._share.server.stats()
            assert stats["attached"] == 1 and stats["refused"] > 0, stats
        finally:
            flood.stdin.close()
            flood.wait(10)


def test_a_full_listen_queue_is_retried_until_the_deadline():
    """The exporter still loading, its listen queue full: a client retries, never raising
    BlockingIOError; it attaches once the exporter serves, or gives up at the deadline with
    ShareUnavailableError."""
    name = _name("backlog", "cpu")
    server = share.ShareServer.bind(name)
    flood: list[socket.socket] = []
    try:
        while True:                         # fill the queue as waiting processes would
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            flood.append(s)
            try:
                s.connect(share.address(name))
            except BlockingIOError:
                break
        t0 = time.monotonic()
        with pytest.raises(ShareUnavailableError, match="listen queue"):
            share.attach(name, timeout=0.5)
        assert 0.5 <= time.monotonic() - t0 < 3
        got: list = []
        t = threading.Thread(target=lambda: got.append(share.attach(name, timeout=20)))
        t.start()
        time.sleep(0.3)
        server.serve({"hello": 1}, lambda: [])       # it accepts the queue: the client gets in
        t.join(25)
        assert got and got[0].payload["hello"] == 1
        got[0].close()
    finally:
        for s in flood:
            s.close()
        server.close()


def test_a_dripping_exporter_cannot_hold_a_client_past_the_deadline():
    """An exporter that answers a byte every 0.1 s: the timeout is the whole exchange's."""
    name = _name("drip", "cpu")
    body = b'{"ok": true, "protocol": 1, "pad": "' + b"x" * 200 + b'"}'
    stop = threading.Event()
    t = _raw_exporter(name, len(body).to_bytes(4, "big") + body, [], 0.1, stop)
    try:
        t0 = time.monotonic()
        with pytest.raises(ShareUnavailableError, match="did not answer in 1.0 s"):
            share.attach(name, timeout=1.0)
        assert time.monotonic() - t0 < 2.0
    finally:
        stop.set()
        t.join(10)


# -- 4. every failure is an AotiRtError ------------------------------------------------------------

@pytest.mark.parametrize("bad", ["a/b", "a\0b", "x" * 65, "é", "lm\n", 7, None, "", "-x"])
def test_bad_share_names_are_share_name_errors(bad, cpu_lm):
    with pytest.raises(ShareNameError, match="share name") as e:
        share.check_name(bad)
    assert isinstance(e.value, ValueError) and isinstance(e.value, aoti_rt.AotiRtError)
    if bad is not None:
        with pytest.raises(ShareNameError):
            aoti_rt.load(cpu_lm, device="cpu", share=bad)


def test_the_cli_prints_one_line_for_an_aoti_rt_error(cpu_lm):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for argv, error in ((["serve-weights", str(cpu_lm), "--name", "../etc"], "ShareNameError"),
                        (["serve-weights", "/no/such/bundle"], "BundleError"),
                        (["load", "/no/such/bundle"], "BundleError"),
                        (["inspect", "/no/such/bundle"], "BundleError")):
        r = subprocess.run([sys.executable, "-m", "aoti_rt", *argv], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=120)
        assert r.returncode == 2, (argv, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, (argv, r.stderr)
        assert lines[0].startswith(f"aoti_rt {argv[0]}: {error}: "), (argv, r.stderr)


def test_a_bad_share_timeout_is_a_share_error(monkeypatch):
    for raw in ("soon", "-1", "0", "nan", "inf"):
        monkeypatch.setenv("AOTI_RT_SHARE_TIMEOUT", raw)
        with pytest.raises(aoti_rt.ShareError, match="AOTI_RT_SHARE_TIMEOUT"):
            serving.attach_timeout()
    monkeypatch.setenv("AOTI_RT_SHARE_TIMEOUT", "2.5")
    assert serving.attach_timeout() == 2.5


# -- helpers of the exporter answers below -------------------------------------------------------

def _base(bundle, rt, name: str) -> dict:
    """A well-formed answer's fields but the arenas and weights: this bundle, this device."""
    return {"name": name, "pid": os.getpid(),
            "identity": {**serving.bundle_identity(read_bundle(bundle)), "verified": False},
            "device": rt.identity(), "weights": []}


def _attach_client(name: str, bundle, rt, timeout: float) -> None:
    """What ``begin`` does with an exporter's answer: attach, build the Client, close it."""
    att = share.attach(name, timeout=timeout)
    if att is None:
        return
    try:
        client = serving.Client(att, bundle, rt)
    except BaseException:
        att.close()
        raise
    client.close()


def _sealed_memfd(size: int) -> int:
    fd = os.memfd_create("fake", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, 1033, 0x2 | 0x4 | F_SEAL_FUTURE_WRITE)
    return fd


def _descriptors(kind: str, size: int, tmp) -> list[int]:
    """Descriptors of a kind an exporter might send (this process's to close)."""
    if kind == "none":
        return []
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return [r]
    if kind == "file":
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, max(size, 1))
        return [fd]
    if kind == "small":
        return [_sealed_memfd(4096)]
    if kind == "good":
        return [_sealed_memfd(max(size, 4096))]
    if kind == "two":
        return [_sealed_memfd(max(size, 4096)), _sealed_memfd(4096)]
    if kind == "many":
        return [_sealed_memfd(4096) for _ in range(share.MAX_FDS + 2)]
    raise AssertionError(kind)


def _raw_exporter(name: str, wire: bytes, fds: list[int], drip: float, stop: threading.Event) -> threading.Thread:
    """A server of this user that answers one connection with ``wire`` (the descriptors on its
    first byte), a byte every ``drip`` seconds if set, then waits for the client to close."""
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    ls.bind(share.address(name))
    ls.listen(4)

    def run():
        try:
            ls.settimeout(5)
            conn, _ = ls.accept()
            with conn:
                conn.settimeout(5)
                if not wire:
                    return
                first, rest = wire[:1], wire[1:]
                if fds:
                    socket.send_fds(conn, [first], fds)
                else:
                    conn.sendall(first)
                if drip:
                    for b in rest:
                        if stop.wait(drip):
                            return
                        conn.send(bytes([b]))
                else:
                    conn.sendall(rest)
                while not stop.is_set() and conn.recv(1):
                    pass
        except OSError:
            pass
        finally:
            ls.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _open_fds() -> int:
    """Descriptors open in this process (the one that lists them counted each time)."""
    return len(os.listdir("/proc/self/fd"))


def _held(rt) -> tuple:
    return (_memory.arena_totals(), len(rt.cache), rt.allocator.bytes_allocated)


@pytest.mark.parametrize("case", [
    ("arenas", [{"size": -4096, "kind": "memfd"}]),
    ("arenas", [{"size": 1 << 70, "kind": "memfd"}]),
    ("arenas", [{"size": 4096, "kind": "cuda-vmm"}]),
    ("arenas", "one"),
    ("weights", {"w": [0, 0, 0]}),
    ("weights", 5),
    ("weights", [["d", 256, 0, -256]]),
    ("weights", [["d", 256, 0, 1 << 80]]),
    ("weights", [["d", -1, 0, 0]]),
    ("weights", [["d", 256, 1, 0]]),
], ids=lambda c: f"{c[0]}={str(c[1])[:20]}")
def test_malformed_answers_are_share_errors(case, cpu_lm, tmp_path):
    """Each malformed field of an exporter's answer is a ShareError, and nothing is left."""
    rt = runtime("cpu")
    name = _name("malformed", "cpu")
    field, value = case
    payload = {**_base(cpu_lm, rt, name), "arenas": [{"size": 8192, "kind": "memfd"}], field: value}
    fd = _sealed_memfd(8192)
    fds0, held0 = _open_fds(), _held(rt)
    server = share.ShareServer.bind(name)
    server.serve(payload, lambda: [os.dup(fd)])
    try:
        with pytest.raises(aoti_rt.ShareError):
            _attach_client(name, read_bundle(cpu_lm), rt, 10)
    finally:
        server.close()
    gc.collect()
    assert _open_fds() == fds0 and _held(rt) == held0
    os.close(fd)


@pytest.mark.parametrize("kind, why", [("pipe", "descriptor of 0 bytes"), ("file", "not a memfd"),
                                       ("small", "descriptor of 4096 bytes"), ("none", "0 descriptors"),
                                       ("two", "2 descriptors"), ("many", "more than 64 descriptors")])
def test_descriptors_of_the_wrong_kind_are_share_errors(kind, why, cpu_lm, tmp_path):
    rt = runtime("cpu")
    name = _name(f"fd{kind}", "cpu")
    payload = {**_base(cpu_lm, rt, name), "arenas": [{"size": 1 << 16, "kind": "memfd"}]}
    fds = _descriptors(kind, 1 << 16, tmp_path / "f")
    fds0, held0 = _open_fds(), _held(rt)
    server = share.ShareServer.bind(name)
    server.serve(payload, lambda: [os.dup(fd) for fd in fds])
    try:
        with pytest.raises(aoti_rt.ShareError, match=why):
            _attach_client(name, read_bundle(cpu_lm), rt, 10)
    finally:
        server.close()
        for fd in fds:
            os.close(fd)
    gc.collect()
    assert _open_fds() == fds0 - len(fds) and _held(rt) == held0
