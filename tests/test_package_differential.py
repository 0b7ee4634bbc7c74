"""Differential test: stock packages loaded by torch's own loader and by ``aoti_rt.load``.

A spread of small models of the kinds PyTorch's own AOTI tests use (tied and shared weights,
many small constants, a KV cache written in place, pytree and keyword inputs, 0-d inputs,
outputs aliasing inputs and constants, several dtypes, zero-size tensors, views of one
storage), each packaged by ``torch._inductor.aoti_compile_and_package`` in every weight format
torch writes (in the .so, a binary blob, pickled, appended to the .so for mmap), is run by
``torch._inductor.aoti_load_package`` and by ``aoti_rt.load``: every output must be bitwise
equal, with the same dtype and shape, on each of two calls (the second sees the state the
first wrote).

A run compiles only a few (model, format) pairs, drawn with a seed
(``AOTI_RT_DIFF_SEED``, default: the day, so runs cover the matrix over time; the pairs are
the test ids); ``AOTI_RT_DIFF_ALL=1`` runs the whole matrix, where the kinds of package
aoti_rt is known not to run yet are expected failures named by kind.
"""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.utils import _pytree as pytree

import aoti_rt

from conftest import FORMATS, _package

from test_package_views import stock_run, views_example, views_package

pytestmark = pytest.mark.usefixtures("pt2_cache_here")

#: (model, format) pairs a CI run compiles
CI_PAIRS = 1
ALL = os.environ.get("AOTI_RT_DIFF_ALL", "") not in ("", "0")
SEED = int(os.environ.get("AOTI_RT_DIFF_SEED", datetime.date.today().toordinal()))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


# -- the models ------------------------------------------------------------------------------

class Tied(nn.Module):
    """An embedding tied to the output head, and one layer applied twice."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = self.emb(tokens)
        return self.head(torch.tanh(self.mid(torch.tanh(self.mid(h)))))


class ManySmall(nn.Module):
    """Twenty small weights (2-D, so AOTI keeps each a constant rather than inlining it)."""

    def __init__(self):
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(_randn(4, 4, seed=i) * 0.5) for i in range(20)])
        self.register_buffer("bias", _randn(16, seed=99))

    def forward(self, x):
        for w in self.ws:
            x = torch.tanh(x @ w)
        return x + self.bias[:4]


class KVCache(nn.Module):
    """A cache written in place at a 0-d position, and a step counter: returns what it read
    and the state it left (so two calls compare the state after each)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("k", torch.zeros(6, 8))
        self.register_buffer("steps", torch.zeros(16, dtype=torch.int64))

    def forward(self, x, pos):
        self.k.index_copy_(0, pos.reshape(1), self.proj(x).reshape(1, 8))
        self.steps.add_(1)
        return (self.k @ x.reshape(8, 1)).sum(), self.k.clone(), self.steps.clone()


class Pytree(nn.Module):
    """Nested inputs (a dict holding a list), a keyword input, and a dict of outputs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, inputs, *, scale):
        a, (b, c) = inputs["a"], inputs["bc"]
        return {"sum": self.lin(a + b) * scale, "pair": (c - a, self.lin(c))}


class ZeroD(nn.Module):
    """0-d inputs and a 0-d output."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(_randn(5, 5, seed=3))

    def forward(self, x, s, t):
        y = x @ self.w * s + t
        return y, y.sum()


class Aliasing(nn.Module):
    """Outputs that are an input, a view of an input, a constant, and a view of a constant."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(_randn(4, 4, seed=4))
        self.register_buffer("table", _randn(4, 4, seed=5))

    def forward(self, x):
        return x, x[1:], self.w, self.table.t(), x @ self.w


class Dtypes(nn.Module):
    """Half, bfloat16, float64, int64, int32 and bool, as weights and inputs."""

    def __init__(self):
        super().__init__()
        self.w16 = nn.Parameter(_randn(8, 8, seed=6, dtype=torch.float16))
        self.wbf = nn.Parameter(_randn(8, 8, seed=7, dtype=torch.bfloat16))
        self.w64 = nn.Parameter(_randn(8, 8, seed=8, dtype=torch.float64))
        self.register_buffer("index", torch.tensor([3, 1, 4, 1, 5, 2, 6, 0, 7, 2, 1, 3], dtype=torch.int64))
        self.register_buffer("mask", torch.arange(16).reshape(2, 8) % 3 == 0)

    def forward(self, x, ids):
        h = (x.half() @ self.w16).float() + (x.bfloat16() @ self.wbf).float()
        d = x.double() @ self.w64
        picked = h[:, self.index] * ids[:12].float()
        return h.masked_fill(self.mask, 0.0), d, picked, ids * 3


class ZeroSize(nn.Module):
    """A zero-size input, output and weight next to ordinary ones."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(_randn(4, 8, seed=9))
        self.empty = nn.Parameter(torch.zeros(0, 8))

    def forward(self, x, none):
        return x @ self.w, none @ self.w, torch.cat([x @ self.w, self.empty]), none.sum()


# the kinds of package other work is making aoti_rt run: expected failures in the full matrix

class Fold(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(_randn(16, 8, seed=10))
        self.b = nn.Parameter(_randn(16, seed=11))

    def forward(self, x):
        return x @ (self.w.t() * 2 + 1) + self.b.sum()


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(64, 32)
        self.m = nn.Linear(32, 8)

    def forward(self, x):
        return self.m(torch.relu(self.l(x)))


class Flag(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(_randn(10, 10, seed=12))

    def forward(self, x, flag: bool):
        return x @ self.w if flag else x - 1


@dataclass
class Case:
    """One kind of package: how to build the model, its example call (what export sees) and
    the calls compared (each ``(args, kwargs)``, on the device), export's dynamic shapes,
    extra inductor options, formats torch cannot package or run it in, and an expected
    failure (the kind, for the full matrix)."""

    make: Callable[[], nn.Module]
    example: Callable[[], tuple[tuple, dict]]
    calls: Callable[[], list[tuple[tuple, dict]]] | None = None
    dynamic: Any = None
    options: dict = field(default_factory=dict)
    not_in: dict[str, str] = field(default_factory=dict)
    cpu_only: bool = False
    xfail: str = ""

    def call_list(self) -> list[tuple[tuple, dict]]:
        return self.calls() if self.calls is not None else [self.example()] * 2


def _pos(i: int) -> torch.Tensor:
    return torch.tensor(i, dtype=torch.int64)


CASES: dict[str, Case] = {
    "tied": Case(Tied, lambda: ((torch.tensor([1, 5, 9, 31]),), {})),
    "many_small": Case(ManySmall, lambda: ((_randn(3, 4, seed=20),), {})),
    "kv_cache": Case(KVCache, lambda: ((_randn(8, seed=21), _pos(2)), {}),
                     calls=lambda: [((_randn(8, seed=22), _pos(4)), {}), ((_randn(8, seed=23), _pos(1)), {})]),
    "pytree": Case(Pytree, lambda: (({"a": _randn(2, 6, seed=24), "bc": [_randn(2, 6, seed=25),
                                                                           _randn(2, 6, seed=26)]},),
                                    {"scale": _randn(6, seed=27)})),
    "zero_d": Case(ZeroD, lambda: ((_randn(3, 5, seed=28), torch.tensor(1.5), torch.tensor(-0.25)), {})),
    "aliasing": Case(Aliasing, lambda: ((_randn(3, 4, seed=29),), {})),
    "dtypes": Case(Dtypes, lambda: ((_randn(2, 8, seed=30), torch.arange(16, dtype=torch.int32)), {})),
    "zero_size": Case(ZeroSize, lambda: ((_randn(3, 4, seed=31), torch.zeros(0, 4)), {})),
    "views": Case(lambda: views_example("cpu")[0], lambda: (views_example("cpu")[1], {})),
    # kinds torch's loader runs that need more of aoti_rt than binding weights
    "runtime_constant_folding": Case(Fold, lambda: ((_randn(4, 8, seed=32),), {}),
                                     options={"aot_inductor.use_runtime_constant_folding": True},
                                     not_in={"pickle": "torch 2.13's loader crashes calling such a package"}),
    "frozen_prepacked": Case(Lin, lambda: ((_randn(4, 64, seed=33),), {}), options={"freezing": True},
                             cpu_only=True,
                             not_in={"pickle": "torch 2.13 cannot pickle prepacked (opaque) weights"}),
    "dim_min_1": Case(Lin, lambda: ((_randn(4, 64, seed=34),), {}),
                      calls=lambda: [((_randn(1, 64, seed=35),), {}), ((_randn(7, 64, seed=36),), {})],
                      dynamic={"x": {0: Dim("batch", min=1, max=64)}}),
    "fixed_bool": Case(Flag, lambda: ((_randn(3, 10, seed=37), True), {})),
}


def _pairs() -> list:
    """The (model, format) pairs this run compiles: all of them with ``AOTI_RT_DIFF_ALL``, else
    ``CI_PAIRS`` drawn with the seed among the kinds aoti_rt runs."""
    every = [(m, f) for m in CASES for f in FORMATS if f not in CASES[m].not_in]
    if not ALL:
        runs = [p for p in every if not CASES[p[0]].xfail]
        every = sorted(random.Random(SEED).sample(runs, CI_PAIRS), key=every.index)
    out = []
    for m, f in every:
        marks = [pytest.mark.xfail(reason=CASES[m].xfail, strict=False, raises=aoti_rt.AotiRtError)
                 ] if CASES[m].xfail else []
        out.append(pytest.param(m, f, id=f"{m}-{f}", marks=marks))
    return out


def _to(tree, device: str):
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


def _package_of(workdir: Path, device: str, name: str, fmt: str) -> Path:
    case = CASES[name]
    if name == "views":                      # the views test's package, compiled once for both
        return views_package(workdir, device, fmt)
    path = workdir / f"diff-{name}-{fmt}-{device.replace(':', '')}.pt2"
    if not path.is_file():
        torch.manual_seed(0)
        module = case.make().to(device).eval()
        args, kwargs = _to(case.example(), device)
        with torch.no_grad():               # as the stock recipe (freezing prepacks only so)
            program = torch.export.export(module, args, kwargs, dynamic_shapes=case.dynamic)
            _package(path, program, {**FORMATS[fmt], **case.options})
    return path


def _same(got, want, where: str) -> None:
    """Bitwise equal, leaf by leaf, in the same structure (pytree), dtype and shape."""
    g_leaves, g_spec = pytree.tree_flatten(got)
    w_leaves, w_spec = pytree.tree_flatten(want)
    assert g_spec == w_spec, f"{where}: output structure {g_spec} != {w_spec}"
    for i, (g, w) in enumerate(zip(g_leaves, w_leaves)):
        assert type(g) is type(w), f"{where}: output {i} is a {type(g).__name__}, not a {type(w).__name__}"
        if isinstance(w, torch.Tensor):
            assert (g.dtype, g.shape, g.device) == (w.dtype, w.shape, w.device), f"{where}: output {i}"
            assert torch.equal(g, w), f"{where}: output {i} differs"
        else:
            assert g == w, f"{where}: output {i}"


@pytest.mark.parametrize("name, fmt", _pairs())
def test_aoti_rt_computes_what_torchs_loader_computes(name, fmt, workdir, device):
    case = CASES[name]
    if case.cpu_only and device != "cpu":
        pytest.skip(f"{name}: a CPU-only kind of package")
    path = _package_of(workdir, device, name, fmt)
    calls = [_to(c, device) for c in case.call_list()]
    (args, kwargs), rest = calls[0], calls[1:]
    runner, first = stock_run(path, device, *args, **kwargs)
    want = [first] + [runner(*a, **k) for a, k in rest]
    del runner
    with aoti_rt.load(path, device=device) as m:
        for i, (a, k) in enumerate(calls):
            _same(m.model(*a, **k), want[i], f"{name}-{fmt}, call {i}")
