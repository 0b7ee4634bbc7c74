"""An exporter's weight update reaches its client processes as one step: generation swaps of the
shared arenas (``update_weights(..., atomic=True)``, the default; :mod:`aoti_rt.generations`).

Real AOTI models and real client processes (tests/share_worker.py); each process test runs on the
CPU (memfd arenas) and, marked ``cuda``, on a GPU (VMM arenas) through the ``device`` fixture.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
import warnings

import pytest
import torch

import aoti_rt
from aoti_rt import _memory, demo, share
from share_worker import arena_keys, new_lm_weights
from test_share import PROMPT, Worker, _name, _wait_for

#: how many times the exporter switches between the two weight sets while a client computes
SWITCHES = 20


def _logits(device: str, seed: int) -> torch.Tensor:
    lm = demo.make_model(device, seed=seed)
    with torch.no_grad():
        return demo.Prefill(lm)(torch.tensor(PROMPT, device=device)).cpu()


def _start_loop(w: Worker, tmp_path) -> tuple:
    """Start the worker's prefill loop; returns once it computes, with the file that stops it."""
    started, stop = tmp_path / "started", tmp_path / "stop"
    w.p.stdin.write(json.dumps({"op": "loop", "tokens": PROMPT, "started": str(started), "stop": str(stop)}) + "\n")
    w.p.stdin.flush()
    _wait_for(started.exists, "the client's loop to start", 60)
    return stop


def test_a_client_computing_during_updates_sees_one_weight_set_or_the_other(lm_bundle, device, tmp_path):
    """A client process calls prefill in a loop while the exporter updates back and forth between
    two weight sets: every output is bitwise the output of one set or of the other (the client's
    own outputs for each, which match eager's to rounding), never a mix, and both are seen."""
    name = _name("atomic", device)
    sets = [new_lm_weights(device, seed=0), new_lm_weights(device, seed=1)]
    w = Worker(tmp_path)
    try:
        with aoti_rt.load(lm_bundle, device=device, share=name) as exporter:
            assert "error" not in w.ask(op="load", bundle=str(lm_bundle), device=device, share=name)
            refs = [w.ask(op="digest", tokens=PROMPT)["digest"]]
            report = exporter.update_weights(sets[1], strict=False)
            assert report.generation == 2 and report.switched == [w.p.pid] and report.unswitched == []
            refs.append(w.ask(op="digest", tokens=PROMPT)["digest"])
            assert refs[0] != refs[1]
            rows = torch.tensor(w.ask(op="prefill", tokens=PROMPT)["logits"])
            torch.testing.assert_close(rows, _logits(device, 1), rtol=1e-4, atol=1e-4)
            stop = _start_loop(w, tmp_path)
            for i in range(SWITCHES):
                exporter.update_weights(sets[i % 2], strict=False)
                time.sleep(0.02)             # let the client compute with this set too
            stop.touch()
            ans = w.answers.get(timeout=120)
            assert ans is not None and "error" not in ans, ans
            outputs = ans["outputs"]
            mixed = {d: n for d, n in outputs.items() if d not in refs}
            assert not mixed, f"{sum(mixed.values())} of {ans['calls']} calls computed with a mix of weights"
            assert set(outputs) == set(refs), outputs         # both sets were seen
            assert exporter.share.generation == SWITCHES + 2
            assert w.ask(op="info")["share"]["generation"] == SWITCHES + 2
        assert w.stop() == 0
    finally:
        if w.p.poll() is None:
            w.p.kill()


def test_an_update_holds_the_arenas_twice_only_until_clients_switch(lm_bundle, device, tmp_path):
    """During an atomic update the exporter holds two generations; once it returns, every
    process maps one (the previous one is unmapped everywhere), and after everyone closes the
    arena counters are back where they were."""
    name = _name("memory", device)
    before = _memory.arena_totals()
    w = Worker(tmp_path)
    try:
        with aoti_rt.load(lm_bundle, device=device, share=name) as exporter:
            arena = exporter.share.arena_bytes
            assert aoti_rt.cache_stats(device)["shared_exported_bytes"] == arena
            assert w.ask(op="load", bundle=str(lm_bundle), device=device, share=name)["share"]["role"] == "client"
            peak = [0]
            sampling = threading.Event()

            def sample():
                while not sampling.is_set():
                    peak[0] = max(peak[0], aoti_rt.cache_stats(device)["shared_exported_bytes"])
                    time.sleep(0.0005)

            t = threading.Thread(target=sample)
            t.start()
            try:
                for seed in (1, 0, 1):
                    exporter.update_weights(new_lm_weights(device, seed), strict=False)
            finally:
                sampling.set()
                t.join()
            assert peak[0] <= 2 * arena
            assert aoti_rt.cache_stats(device)["shared_exported_bytes"] == arena
            assert _memory.arena_totals() == (before[0] + 1, before[1] + arena)
            info = w.ask(op="info")
            assert info["stats"]["shared_imported_bytes"] == arena and info["arenas"] == [1, arena]
            assert info["share"]["generation"] == 4
            # the caches name the new generation's buffers under the arena scopes, as after a load
            assert info["arena_keys"] == ["ATTACHED"]
            assert arena_keys(exporter) == ["EXPORT"]
            torch.testing.assert_close(torch.tensor(w.ask(op="prefill", tokens=PROMPT)["logits"]),
                                       _logits(device, 1), rtol=1e-4, atol=1e-4)
            assert w.ask(op="close")["arenas"] == [0, 0]
        assert w.stop() == 0
    finally:
        if w.p.poll() is None:
            w.p.kill()
    gc.collect()
    assert _memory.arena_totals() == before


def test_clients_that_close_or_stall_during_an_update_do_not_hang_it(lm_bundle, device, monkeypatch):
    """A client that closes its connection when the new generation comes is not waited for; one
    that never answers is waited for only until the deadline, and named in a warning."""
    name = _name("stall", device)
    monkeypatch.setenv("AOTI_RT_SWAP_TIMEOUT", "30")
    with aoti_rt.load(lm_bundle, device=device, share=name) as exporter:
        closing = share.attach(name, timeout=30)
        for fd in closing.take_fds():
            os.close(fd)

        def close_on_update():
            msg, fds = share.recv_message(closing.sock, share.MAX_FDS, time.monotonic() + 60)
            for fd in fds:
                os.close(fd)
            assert msg["op"] == "generation" and msg["generation"] == 2
            closing.close()

        t = threading.Thread(target=close_on_update)
        t.start()
        _wait_for(lambda: exporter.share.clients == 1, "the client to attach")
        t0 = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            report = exporter.update_weights(new_lm_weights(device), strict=False)
        assert time.monotonic() - t0 < 20.0          # not the deadline: the closed client is not waited for
        t.join(30)
        assert report.generation == 2 and report.switched == [] and report.unswitched == []
        _wait_for(lambda: exporter.share.clients == 0, "the closed client to detach")

        monkeypatch.setenv("AOTI_RT_SWAP_TIMEOUT", "2")
        stalled = share.attach(name, timeout=30)     # attached, and never reads what comes
        try:
            for fd in stalled.take_fds():
                os.close(fd)
            assert stalled.payload["generation"] == 2  # attached after the update: it was served the new one
            _wait_for(lambda: exporter.share.clients == 1, "the client to attach")
            t0 = time.monotonic()
            with pytest.warns(RuntimeWarning, match=rf"did not switch to weight generation 3 \(pid {os.getpid()}: "
                                                    r"no answer in 2 s"):
                report = exporter.update_weights(new_lm_weights(device, seed=0), strict=False)
            assert 2.0 <= time.monotonic() - t0 < 10.0
            assert report.generation == 3 and report.unswitched == [os.getpid()]
        finally:
            stalled.close()
        with torch.no_grad():                        # the exporter computes with the new weights
            torch.testing.assert_close(exporter.prefill(torch.tensor(PROMPT, device=device)).cpu(),
                                       _logits(device, 0), rtol=1e-4, atol=1e-4)


def test_a_generation_a_client_cannot_take_leaves_it_on_the_old_one(lm_bundle, device, tmp_path):
    """A new generation whose weight table lacks a weight the client maps: the client warns,
    answers why, and keeps computing with the generation it has."""
    name = _name("badgen", device)
    w = Worker(tmp_path)
    try:
        with aoti_rt.load(lm_bundle, device=device, share=name) as exporter:
            assert "error" not in w.ask(op="load", bundle=str(lm_bundle), device=device, share=name)
            ref = w.ask(op="digest", tokens=PROMPT)["digest"]
            server = exporter._share.server
            payload = dict(server._payload, weights=[])            # every weight missing
            arenas = list(exporter._share.allocator.arenas)
            result = server.push(payload, lambda: [a.export() for a in arenas], 2, 60)
            assert list(result.failed) == [w.p.pid] and "lacks a weight" in result.failed[w.p.pid]
            assert w.ask(op="digest", tokens=PROMPT)["digest"] == ref
            assert w.ask(op="info")["share"]["generation"] == 1
            # the next real update reaches it all the same
            report = exporter.update_weights(new_lm_weights(device), strict=False)
            assert report.switched == [w.p.pid]
            assert w.ask(op="digest", tokens=PROMPT)["digest"] != ref
        assert w.stop() == 0
        with open(w.err.name) as err:
            assert "could not switch to the exporter's weight generation 2" in err.read()
    finally:
        if w.p.poll() is None:
            w.p.kill()


def test_atomic_false_writes_the_arena_in_place(lm_bundle, device, tmp_path):
    """``atomic=False`` keeps one copy of the arenas: no new generation, the clients see the new
    values after the update (their calls meanwhile may read a mix)."""
    from aoti_rt.update import update_weights

    name = _name("inplace", device)
    w = Worker(tmp_path)
    try:
        with aoti_rt.load(lm_bundle, device=device, share=name) as exporter:
            assert "error" not in w.ask(op="load", bundle=str(lm_bundle), device=device, share=name)
            arena = exporter.share.arena_bytes
            report = update_weights(exporter, new_lm_weights(device), strict=False, atomic=False)
            assert report.generation is None and exporter.share.generation == 1
            assert aoti_rt.cache_stats(device)["shared_exported_bytes"] == arena
            torch.testing.assert_close(torch.tensor(w.ask(op="prefill", tokens=PROMPT)["logits"]),
                                       _logits(device, 1), rtol=1e-4, atol=1e-4)
        assert w.stop() == 0
    finally:
        if w.p.poll() is None:
            w.p.kill()
