"""Live weight updates (Model.update_weights): in place, visible to every model bound to the
same memory; copy on write, visible to one model only; from tensors or a safetensors file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import aoti_rt
from aoti_rt.errors import BundleError, InputError

from models import METHOD_LAYERS, Subset, make_stack


def new_values(device: str, model) -> dict[str, torch.Tensor]:
    """The other stack's (seed 1) value of every FQN the model binds."""
    other = make_stack(device, seed=1)
    state = {f"stack.{k}": v for k, v in other.state_dict(keep_vars=False).items()}
    bound = {fqn for m in model.methods for fqn in model[m].constants}
    return {k: v.detach().clone() for k, v in state.items() if k in bound}


def outputs_of(stack, x) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {n: Subset(stack, layers)(x) for n, layers in METHOD_LAYERS.items()}


def check(model, want, x) -> None:
    with torch.no_grad():
        for n in METHOD_LAYERS:
            torch.testing.assert_close(model[n](x), want[n])


def allocated(device) -> int:
    return aoti_rt.cache_stats(device)["bytes_allocated"]


def test_in_place_update_equals_a_fresh_load_and_reaches_every_model_bound_to_it(three_bundle, device):
    x = torch.randn(3, 64, device=device)
    old, new = outputs_of(make_stack(device), x), outputs_of(make_stack(device, seed=1), x)
    with aoti_rt.load(three_bundle, device=device) as model, \
            aoti_rt.load(three_bundle, device=device) as twin:
        before = allocated(device)
        report = model.update_weights(new_values(device, model))
        assert report.copied_on_write == 0 and report.nbytes > 0 and report.fqns
        assert allocated(device) == before              # nothing allocated, nothing rebound
        check(model, new, x)
        check(twin, new, x)                             # bound to the same memory
        # a model loaded now reads its own store: the old values, in memory of its own
        with aoti_rt.load(three_bundle, device=device) as later:
            check(later, old, x)
            assert allocated(device) > before
        fqn = report.fqns[0]
        torch.testing.assert_close(model.weight(fqn), new_values(device, model)[fqn])


def test_copy_on_write_changes_only_this_model(three_bundle, device):
    x = torch.randn(3, 64, device=device)
    old, new = outputs_of(make_stack(device), x), outputs_of(make_stack(device, seed=1), x)
    base = allocated(device)
    with aoti_rt.load(three_bundle, device=device) as model:
        one = allocated(device) - base
        with aoti_rt.load(three_bundle, device=device) as twin:
            report = model.update_weights(new_values(device, model), shared=False)
            assert report.copied_on_write > 0
            check(model, new, x)
            check(twin, old, x)
            assert allocated(device) - base == one + report.nbytes    # the private copies only
        # the twin was the old buffers' last user: they went with it
        assert allocated(device) - base == one
        check(model, new, x)
    assert allocated(device) == base


def test_update_from_a_safetensors_file_uses_the_load_pipeline(three_bundle, device, tmp_path):
    x = torch.randn(3, 64, device=device)
    new = outputs_of(make_stack(device, seed=1), x)
    with aoti_rt.load(three_bundle, device=device) as model:
        values = new_values(device, model)
        path = tmp_path / "new.safetensors"
        save_file({k: v.cpu().contiguous() for k, v in values.items()}, str(path))
        report = model.update_weights(path)
        assert report.bytes_read > 0
        check(model, new, x)
        # the file may hold more than this model binds
        save_file({**{k: v.cpu() for k, v in values.items()}, "extra.weight": torch.zeros(2)}, str(path))
        with pytest.raises(InputError, match="extra.weight"):
            model.update_weights(path)
        model.update_weights(path, strict=False, shared=False)
        check(model, new, x)


def test_an_update_interrupted_halfway_leaves_no_later_load_binding_its_memory(three_bundle, device,
                                                                              monkeypatch):
    """Ctrl-C after some weights were written: a model loaded afterwards must not bind that
    half-new memory under the old content's name; it reads its own store (old outputs)."""
    from aoti_rt import update

    x = torch.randn(3, 64, device=device)
    old = outputs_of(make_stack(device), x)
    real, calls = update.buffer_view, []

    def interrupted(buf, c):
        calls.append(c.fqn)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(buf, c)

    with aoti_rt.load(three_bundle, device=device) as model:
        monkeypatch.setattr(update, "buffer_view", interrupted)
        with pytest.raises(KeyboardInterrupt):
            model.update_weights(new_values(device, model))
        monkeypatch.undo()
        with aoti_rt.load(three_bundle, device=device) as later:
            check(later, old, x)


def test_bad_updates_are_refused_before_anything_is_written(three_bundle, device, tmp_path):
    x = torch.randn(3, 64, device=device)
    old = outputs_of(make_stack(device), x)
    with aoti_rt.load(three_bundle, device=device) as model:
        values = new_values(device, model)
        fqn = sorted(values)[0]
        for bad, what in ((values[fqn].double(), "float64"), (values[fqn][:1], "shape"),
                          ({"no.such.weight": values[fqn]}, "no.such.weight")):
            update = bad if isinstance(bad, dict) else {**values, fqn: bad}
            with pytest.raises(InputError):
                model.update_weights(update)
            check(model, old, x)
        path = tmp_path / "cut.safetensors"
        save_file({k: v.cpu() for k, v in values.items()}, str(path))
        path.write_bytes(path.read_bytes()[:-100])       # truncated
        with pytest.raises(BundleError):
            model.update_weights(path)
        check(model, old, x)
    with pytest.raises(aoti_rt.errors.ClosedError):
        model.update_weights(values)


def test_a_copy_on_write_that_fails_on_one_method_changes_no_method(three_bundle, device, monkeypatch):
    """Rebinding is all or nothing: the method rebound before the one that fails points at the
    shared weights again, the private copies are freed, every method computes the old values."""
    from aoti_rt.runtime import Method

    x = torch.randn(3, 64, device=device)
    old = outputs_of(make_stack(device), x)
    real, calls = Method.rebind, []

    def fails_second(self, replaced):
        calls.append((self.name, {i: b.allocator is self.runtime.allocator for i, b in replaced.items()}))
        if len(calls) == 2:
            raise aoti_rt.AOTIError("injected: Pairs failed")
        return real(self, replaced)

    with aoti_rt.load(three_bundle, device=device) as model:
        before = allocated(device)
        monkeypatch.setattr(Method, "rebind", fails_second)
        with pytest.raises(aoti_rt.AOTIError, match="injected"):
            model.update_weights(new_values(device, model), shared=False)
        monkeypatch.undo()
        assert calls[0][1] and calls[1][1] and calls[2][0] == calls[0][0]   # undone
        assert calls[2][1].keys() == calls[0][1].keys()
        assert allocated(device) == before              # the private copies went
        check(model, old, x)
        # a later copy on write works, and still changes only this model
        report = model.update_weights(new_values(device, model), shared=False)
        assert report.copied_on_write > 0
        check(model, outputs_of(make_stack(device, seed=1), x), x)


def test_every_weight_is_a_parameter_constant_that_updates(device, tmp_path):
    """Inductor compiles a tensor of up to 8 values into the code as literals unless told to
    keep it, and reports no kind for FQNs that start with a digit; aoti_rt.compile keeps every
    weight a parameter constant, so an update reaches it like any weight."""
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(device).eval()
    x = torch.randn(2, 16, device=device)
    bundle = aoti_rt.compile({"f": (m, (x,))}, tmp_path / "b", progress=False)
    # FQNs as the module names them, and parameters to the .so even though they start with a
    # digit (a top-level Sequential), so they may be shared beyond the bundle
    consts = aoti_rt.read_bundle(bundle).manifest.methods["f"].constants
    assert {(c.fqn, c.kind) for c in consts} == {(k, "parameter") for k in m.state_dict()}
    import shutil

    copy = shutil.copytree(bundle, tmp_path / "copy")
    with aoti_rt.load(bundle, device=device) as model, torch.no_grad():
        one = allocated(device)
        with aoti_rt.load(copy, device=device) as other:   # another bundle: shared once verified
            assert allocated(device) == one
            torch.testing.assert_close(other.f(x), m(x))
        torch.testing.assert_close(model.f(x), m(x))
        new = torch.randn(4, device=device)
        model.update_weights({"2.bias": new})
        m[2].bias.copy_(new)
        torch.testing.assert_close(model.f(x), m(x))
