"""A memory check that can fail: device-wide peak while loading and running."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import aoti_rt
from aoti_rt.bundle import read_bundle

from conftest import CUDA, _compile

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU")]


class Big(nn.Module):
    def __init__(self, width: int = 4096, depth: int = 16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))


class Run(nn.Module):
    def __init__(self, big: Big):
        super().__init__()
        self.big = big

    def forward(self, x):
        for layer in self.big.layers:
            x = layer(x)
        return x


@pytest.fixture(scope="module")
def big_bundle(workdir):
    torch.manual_seed(0)
    big = Big().to("cuda", torch.float16)

    def programs():
        return {name: torch.export.export(Run(big), (torch.randn(n, 4096, device="cuda", dtype=torch.float16),))
                for name, n in (("prefill", 16), ("decode", 1))}
    return _compile(workdir, "big", "cuda", programs), big


def test_peak_device_memory_is_one_copy(big_bundle):
    path, big = big_bundle
    unique = read_bundle(path).manifest.unique_weight_bytes()
    assert unique == 16 * 4096 * 4096 * 2           # 512 MiB, fp16
    x = torch.randn(16, 4096, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref_prefill, ref_decode = Run(big)(x), Run(big)(x[:1])    # also warms cuBLAS up
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    context = aoti_rt.memory.sample("cuda:0")          # CUDA context, torch, the test's tensors
    aoti_rt.reset_peak("cuda:0")
    with aoti_rt.memory.Sampler("cuda:0"):
        with aoti_rt.load(path, device="cuda") as model:
            y = model.prefill(x)
            z = model.decode(x[:1])
            torch.cuda.synchronize()
            report = aoti_rt.memory_report("cuda:0")
    line = aoti_rt.MemoryReport.parse(report.line())
    peak = line["device_peak_used"] - context
    print(report.line(), f"context={context} unique={unique} peak_over_context={peak}")
    assert line["peak_allocated"] == unique                       # aoti_rt's own: exact
    # device-wide, sampled: one copy of the weights (+5 %) over what was in use before
    assert peak <= 1.05 * unique, f"peak {peak} > 1.05 x {unique}"
    torch.testing.assert_close(y, ref_prefill, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(z, ref_decode, rtol=2e-2, atol=2e-2)
