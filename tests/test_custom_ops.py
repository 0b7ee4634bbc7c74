"""Methods that call a custom op, on real AOTI models (CPU always; CUDA where present).

Generated AOTI code calls an operator it has no C shim for (a ``torch.library.custom_op``, a
fallback kernel) through a proxy executor that torch's runner builds from the extern-kernel
JSON AOTI writes beside the .so. The compiler keeps that JSON as ``<method>.json``; such a
method runs through torch's runner with the cache's buffers bound user-managed, so its
weights are still held once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import aoti_rt
from aoti_rt.abi import PROXY_EXECUTOR_CALL
from aoti_rt.elf import imports_symbol
from aoti_rt.bundle import read_bundle
from aoti_rt.method_compiler import _extern_kernels
from conftest import _compile

OP = "aoti_rt_test::scale_shift"


@torch.library.custom_op(OP, mutates_args=())
def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: float) -> torch.Tensor:
    return x * scale + shift


@scale_shift.register_fake
def _(x, scale, shift):
    return torch.empty_like(x)


MUT = "aoti_rt_test::add_one_"


@torch.library.custom_op(MUT, mutates_args=("x",))
def add_one_(x: torch.Tensor) -> None:
    x.add_(1)


class Mutating(nn.Module):
    def forward(self, x):
        y = x.clone()
        add_one_(y)
        return y


class Net(nn.Module):
    def __init__(self, device: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(64, 64)
        self.scale = nn.Parameter(torch.randn(64))
        self.head = nn.Linear(64, 32)
        self.to(device)


class Custom(nn.Module):
    """Calls the custom op on a weight it shares with Plain."""

    def __init__(self, net: Net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.head(torch.ops.aoti_rt_test.scale_shift(self.net.lin(x), self.net.scale, 0.5).relu())


class Plain(nn.Module):
    """The same computation without the custom op."""

    def __init__(self, net: Net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.head((self.net.lin(x) * self.net.scale + 0.5).relu())


@pytest.fixture(scope="session")
def custom_bundle(workdir, device) -> Path:
    def programs():
        net = Net(device)
        x = torch.randn(5, 64, device=device)
        return {"custom": (Custom(net), (x,)), "plain": (Plain(net), (x,))}
    return _compile(workdir, "custom-op", device, programs)


def eager(device):
    net = Net(device)
    return net, Custom(net).eval(), Plain(net).eval()


def stock(so: Path, module: nn.Module, device: str, x):
    """The same .so through torch's own runner (which finds <so stem>.json beside it), with
    torch's own copies of the weights."""
    spec = read_bundle(so.parent).manifest.methods[so.stem]
    if device == "cpu":
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(so), 1)
    else:
        runner = torch._C._aoti.AOTIModelContainerRunnerCuda(str(so), 1, device)
    state = module.state_dict()
    runner.update_constant_buffer({c.name: state[c.fqn].detach().clone() for c in spec.constants}, False, True)
    out = runner.run([x])[0]
    del runner
    return out


def assert_runner_binds_the_cache(method):
    """What torch's runner computes with is aoti_rt's buffers, not a copy."""
    held = method._runner.runner.extract_constants_map(False)
    bound = {b.fqn: b for b in method.bindings()}
    assert sorted(held) == sorted(bound)
    for fqn, t in held.items():
        buf, c = bound[fqn].buffer, bound[fqn].constant
        assert t.data_ptr() == buf.ptr + c.storage_offset * t.element_size(), fqn


def test_compile_keeps_the_extern_kernels(custom_bundle):
    assert imports_symbol(custom_bundle / "custom.so", PROXY_EXECUTOR_CALL) is True
    assert imports_symbol(custom_bundle / "plain.so", PROXY_EXECUTOR_CALL) is False
    nodes = json.loads((custom_bundle / "custom.json").read_text())["nodes"]
    assert [n["node"]["target"] for n in nodes] == [OP]
    assert not (custom_bundle / "plain.json").exists()


def test_the_import_check_is_remembered_per_file_not_per_path(custom_bundle, tmp_path):
    import shutil

    so = tmp_path / "m.so"
    shutil.copy(custom_bundle / "plain.so", so)
    assert imports_symbol(so, PROXY_EXECUTOR_CALL) is False
    assert imports_symbol(so, PROXY_EXECUTOR_CALL) is False       # remembered
    shutil.copy(custom_bundle / "custom.so", so)                   # another file at that path
    assert imports_symbol(so, PROXY_EXECUTOR_CALL) is True
    so.write_bytes(b"not an ELF file")
    assert imports_symbol(so, PROXY_EXECUTOR_CALL) is None


def test_custom_op_method_matches_eager_and_stock(custom_bundle, device):
    net, custom, plain = eager(device)
    x = torch.randn(5, 64, device=device)
    with aoti_rt.load(custom_bundle, device=device) as model, torch.no_grad():
        got = model.custom(x)
        torch.testing.assert_close(got, custom(x))
        torch.testing.assert_close(model.plain(x), plain(x))
        want = stock(custom_bundle / "custom.so", custom, device, x)
        if device == "cpu":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model.custom.weight("net.scale"), net.scale.detach())


def test_shared_weights_are_held_once(custom_bundle, device):
    man = read_bundle(custom_bundle).manifest
    base = aoti_rt.cache_stats(device)["bytes_allocated"]
    _, custom, plain = eager(device)
    x = torch.randn(5, 64, device=device)
    with aoti_rt.load(custom_bundle, device=device) as model:
        assert aoti_rt.cache_stats(device)["bytes_allocated"] - base == man.unique_weight_bytes()
        assert model.custom.bytes_read == man.unique_weight_bytes()
        assert model.plain.bytes_read == 0            # every weight of plain was cached by custom
        for fqn in ("net.lin.weight", "net.lin.bias", "net.scale", "net.head.weight", "net.head.bias"):
            assert model.custom.bindings()[model.custom.constants.index(fqn)].buffer is \
                model.plain.bindings()[model.plain.constants.index(fqn)].buffer
        assert_runner_binds_the_cache(model.custom)
        with torch.no_grad():
            torch.testing.assert_close(model.custom(x), custom(x))
            torch.testing.assert_close(model.plain(x), plain(x))
        # a second instance, custom-op method alone, shares the first's weights
        with aoti_rt.load(custom_bundle, device=device, methods=["custom"]) as again:
            assert again.custom.bytes_read == 0
            assert aoti_rt.cache_stats(device)["bytes_allocated"] - base == man.unique_weight_bytes()
            with torch.no_grad():
                torch.testing.assert_close(again.custom(x), custom(x))
    assert aoti_rt.cache_stats(device)["bytes_allocated"] == base


def test_concurrent_calls(custom_bundle, device):
    _, custom, _ = eager(device)
    xs = [torch.randn(5, 64, device=device) for _ in range(4)]
    with torch.no_grad():
        want = [custom(x) for x in xs]
    errors: list[BaseException] = []
    with aoti_rt.load(custom_bundle, device=device, methods=["custom"]) as model:
        def worker(k):
            try:
                with torch.no_grad():
                    for _ in range(10):
                        torch.testing.assert_close(model.custom(xs[k]), want[k])
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_wrong_input_is_an_input_error(custom_bundle, device):
    with aoti_rt.load(custom_bundle, device=device, methods=["custom"]) as model:
        with pytest.raises(aoti_rt.InputError):
            model.custom(torch.randn(5, 63, device=device))


def test_missing_extern_kernels_refused_at_load(custom_bundle, device, copy_bundle):
    """A bundle without the JSON (written before it was kept) fails at load, not first call."""
    b = copy_bundle(custom_bundle)
    (b / "custom.json").unlink()
    with pytest.raises(aoti_rt.BundleError, match=r"custom\.json is missing.*Recompile"):
        aoti_rt.load(b, device=device)
    with aoti_rt.load(b, device=device, methods=["plain"]) as model:   # the plain method still runs
        model.plain(torch.randn(5, 64, device=device))


def test_plain_method_runs_directly_even_with_a_json(custom_bundle, device, copy_bundle):
    """Only a .so that imports the proxy executor's entry point goes through torch's runner."""
    b = copy_bundle(custom_bundle)
    (b / "plain.json").write_bytes((b / "custom.json").read_bytes())
    _, _, plain = eager(device)
    x = torch.randn(5, 64, device=device)
    with aoti_rt.load(b, device=device) as model, torch.no_grad():
        assert not model.plain.through_runner and model.custom.through_runner
        torch.testing.assert_close(model.plain(x), plain(x))


def test_unregistered_op_refused_at_load(custom_bundle, device):
    """A process that never registered the op cannot build the proxy executor: an AOTIError
    naming the op at load."""
    code = ("import sys, aoti_rt\n"
            "try:\n"
            "    aoti_rt.load(sys.argv[1], device=sys.argv[2])\n"
            "except aoti_rt.AOTIError as e:\n"
            "    print('AOTIError:', e)\n"
            "else:\n"
            "    print('loaded')\n")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code, str(custom_bundle), device], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert "AOTIError:" in out.stdout, out.stdout + out.stderr
    assert OP in out.stdout and "Register those operators" in out.stdout


def test_compile_refuses_a_proxy_call_without_its_json(custom_bundle, tmp_path):
    """The compiler's check, on the real .so: one that calls the proxy executor with no
    extern-kernel JSON from its build is a CompileError, never a bundle that fails later."""
    with pytest.raises(aoti_rt.CompileError, match="'custom'.*proxy executor"):
        _extern_kernels("custom", custom_bundle / "custom.so", tmp_path)
    assert _extern_kernels("plain", custom_bundle / "plain.so", tmp_path) is None


def test_workers_of_a_fresh_interpreter_leave_a_custom_op_method_to_this_process(tmp_path, monkeypatch):
    """A zygote's workers (CUDA's, here on the CPU) are fresh interpreters without this
    process's custom ops: such a compile runs in this process and writes the same bundle."""
    from aoti_rt import compile_workers

    monkeypatch.setattr(compile_workers, "WORKER_START", "zygote")
    started = []
    monkeypatch.setattr(compile_workers._Zygote, "__init__", lambda self, job: started.append(job))
    net = Net("cpu")
    x = torch.randn(5, 64)
    assert compile_workers._op_of_this_process(torch.export.export(Custom(net), (x,))) == OP.replace("::", ".") + ".default"
    assert compile_workers._op_of_this_process(torch.export.export(Plain(net), (x,))) is None
    # a custom op that mutates its argument is exported wrapped in auto_functionalized
    assert compile_workers._op_of_this_process(torch.export.export(Mutating(), (x,))) == MUT.replace("::", ".") + ".default"
    path = aoti_rt.compile({"custom": (Custom(net), (x,)), "plain": (Plain(net), (x,))}, tmp_path / "b",
                           progress=False, jobs=2)
    assert started == []
    model = aoti_rt.load(path)
    torch.testing.assert_close(model.custom(x), Custom(net)(x))
    model.close()

