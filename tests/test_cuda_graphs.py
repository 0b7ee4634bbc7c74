"""CUDA graphs: a decode step through aoti_rt captured with ``torch.cuda.graph`` replays to the
eager result, and calls launch without waiting for the previous call's kernels.

A method runs its container through ``RunSingleThreaded`` (see ``aoti_rt._bind.ModelABI.run``):
``Run`` queries and synchronises an event per call, which a capturing stream forbids.
"""

from __future__ import annotations

import time

import pytest
import torch

import aoti_rt
from aoti_rt import demo

CUDA = aoti_rt.cuda_available() and torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU")]

PROMPT = list(range(1, 9))


@pytest.mark.parametrize("device", ["cuda:0"], indirect=True)
def test_decode_step_replays_from_a_cuda_graph_like_eager(lm_bundle, device):
    lm = demo.make_model(device)
    eager_prefill, eager_decode = demo.Prefill(lm), demo.Decode(lm)
    prompt = torch.tensor(PROMPT, device=device)
    with aoti_rt.load(lm_bundle, device=device) as model, torch.no_grad():
        logits = model.prefill(prompt)
        torch.testing.assert_close(logits, eager_prefill(prompt))
        # what stays fixed across replays: the input tensors (their memory), the KV cache
        # (bound once, written in place) and the output the capture allocated
        tok = logits[-1].argmax().view(1).clone()
        pos = torch.tensor([len(PROMPT)], device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):          # warm-up, as torch.cuda.graph asks: writes the
            for _ in range(2):                 # cache row at pos, which every replay rewrites
                model.decode(tok, pos)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model.decode(tok, pos)
        got, want = [], []
        for step in range(8):
            graph.replay()
            ref = eager_decode(tok, pos)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
            got.append(int(out[-1].argmax()))
            want.append(int(ref[-1].argmax()))
            tok.copy_(out[-1].argmax().view(1))
            pos += 1
        assert got == want
        # the graph and the uncaptured call agree on the next step too
        graph.replay()
        torch.testing.assert_close(out, model.decode(tok, pos))


@pytest.mark.parametrize("device", ["cuda:0"], indirect=True)
def test_calls_launch_without_waiting_for_the_previous_call(lm_bundle, device):
    """Two calls in a row: the second returns while the first one's kernels still run
    (``Run`` would wait for them: cudaEventSynchronize on its one model instance)."""
    with aoti_rt.load(lm_bundle, device=device) as model, torch.no_grad():
        tok = torch.tensor([3], device=device)
        pos = torch.tensor([0], device=device)
        model.decode(tok, pos)
        torch.cuda.synchronize()
        stream = torch.cuda.current_stream()
        torch.cuda._sleep(200_000_000)          # ~0.1 s or more of GPU time queued ahead
        t0 = time.perf_counter()
        for _ in range(3):
            model.decode(tok, pos)
        launched = time.perf_counter() - t0
        assert not stream.query(), "the sleep finished before the calls launched: host too slow to tell"
        torch.cuda.synchronize()
        waited = time.perf_counter() - t0
        assert launched < waited / 2, (launched, waited)
