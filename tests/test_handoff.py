"""How a compile worker gets its program (aoti_rt.handoff): a CUDA program's tensors travel as
legacy CUDA IPC handles of the exporting process's memory, read in another process (a
process cannot map its own handles); a CPU program is saved whole."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from aoti_rt import handoff

from conftest import CUDA
from damage import garble_ipc_handles


class Tied(nn.Module):
    """A tied weight (two FQNs, one storage), a view into a larger storage, a buffer the
    program mutates and a lifted constant."""

    def __init__(self, device: str):
        super().__init__()
        self.a = nn.Linear(512, 512, device=device)
        self.b = nn.Linear(512, 512, device=device)
        self.b.weight = self.a.weight
        self.register_buffer("steps", torch.zeros(4, device=device))
        self.register_buffer("window", torch.randn(8, 512, device=device)[2:6])
        self.scale = torch.full((512,), 0.5, device=device)

    def forward(self, x):
        self.steps.add_(1)
        return self.b(self.a(x)) * self.scale + self.window.sum(0) + self.steps.sum()


def _program(device: str):
    torch.manual_seed(0)
    m = Tied(device)
    return torch.export.export(m, (torch.randn(2, 512, device=device),))


def _state(ep) -> dict[str, torch.Tensor]:
    return {**ep.state_dict, **{k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}}


def test_a_cpu_program_is_saved_whole(tmp_path):
    ep = _program("cpu")
    path = tmp_path / "program.pt2"
    assert handoff.write_program(ep, path, {"steps"}) is False
    assert not (tmp_path / "program.pt2.ipc").exists()
    back = handoff.read_program(path)
    for name, v in _state(ep).items():
        assert torch.equal(_state(back)[name], v), name


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_a_cuda_program_travels_as_handles_of_this_process_memory(tmp_path):
    ep = _program("cuda:0")
    path = tmp_path / "program.pt2"
    assert handoff.write_program(ep, path, {"steps"}) is True
    assert path.stat().st_size < 512 * 1024            # the graph, not the weights' 1 MiB
    state = _state(ep)
    code = textwrap.dedent("""
        import json, sys, torch
        from aoti_rt import handoff
        ep = handoff.read_program(sys.argv[1])
        state = {**ep.state_dict, **{k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}}
        out = {name: [v.double().sum().item(), list(v.shape), list(v.stride()), v.storage_offset(),
                      v.untyped_storage().nbytes(), v.untyped_storage().data_ptr(), type(v).__name__]
               for name, v in state.items()}
        state["steps"].add_(7)                  # copied in this process: the exporter's stays 0
        torch.cuda.synchronize()
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = __import__("json").loads(r.stdout.strip().splitlines()[-1])
    assert set(got) == set(state)
    for name, v in state.items():
        total, shape, stride, offset, nbytes, _, kind = got[name]
        assert total == pytest.approx(v.double().sum().item(), rel=1e-12), name
        assert (shape, stride, offset) == (list(v.shape), list(v.stride()), v.storage_offset()), name
        assert nbytes == v.untyped_storage().nbytes(), name   # AOTI serialises whole storages
        assert kind == type(v).__name__, name
    assert got["a.weight"][5] == got["b.weight"][5]            # still tied
    assert state["steps"].sum().item() == 0
    # asked for whole (a worker that could not map the handles): the bytes, no handles
    assert handoff.write_program(ep, path, {"steps"}, whole=True) is False
    assert not (tmp_path / "program.pt2.ipc").exists() and path.stat().st_size > 1 << 20   # the 1 MiB weight


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_a_handle_that_cannot_be_mapped_is_a_handoff_error(tmp_path, monkeypatch):
    ep = _program("cuda:0")
    garble_ipc_handles(monkeypatch)
    path = tmp_path / "program.pt2"
    assert handoff.write_program(ep, path, set())
    code = ("import sys\nfrom aoti_rt import handoff\ntry:\n    handoff.read_program(sys.argv[1])\n"
            "except handoff.HandoffError as e:\n    print('HandoffError', e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert "HandoffError" in r.stdout and "cuIpcOpenMemHandle" in r.stdout, (r.stdout, r.stderr[-2000:])
