"""Per-call overhead of a tiny decode step: aoti_rt ``Method(*x)`` vs torch's own AOTI runner.

The model is one bias-free Linear(64, 64), float32, input [1, 64]. Both variants run the very
same .so (the bundle's ``decode.so``): aoti_rt through ``aoti_rt.load``, torch through
``AOTIModelContainerRunnerCuda(so, 1, dev)`` (``...Cpu`` on the CPU) after
``update_constant_buffer_from_blob`` of the method's blob, then ``runner.run([x])``. Eager
``module(x)`` under ``torch.no_grad`` is shown for reference. Each sample is a loop of many
calls with a synchronize only before and after it; the variants' loops are interleaved, in
rotating order, so host drift between them does not favour one; the table gives
microseconds per call (median and best over the samples).

On CUDA two more rows: the same call captured once into a CUDA graph (``torch.cuda.graph``)
and replayed, and a second table with the demo LM's decode step (embedding, attention over
the KV cache, MLP, head: tens of kernels), called vs replayed from a captured graph.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import aoti_rt
from bench import common

STOCK = "stock AOTI runner.run([x])"
SPEC = common.StackSpec(layers=1, dim=64, methods=(("decode", 0, 1, 1),), dtype="float32")


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calls", type=int, default=None,
                   help="calls per timed loop (default: 10000 full, 2000 small)")
    p.add_argument("--graph-only", action="store_true",
                   help="only the demo LM's decode step, called vs replayed from a CUDA graph")


def per_call(fns: dict[str, Callable[[], object]], dev: str, calls: int,
             samples: int) -> dict[str, list[float]]:
    """Microseconds per call of each of ``fns``: ``samples`` rounds, each timing one loop of
    ``calls`` calls of every variant (synchronized only around each loop), the variants'
    order rotating from round to round so that drift of the host (clocks, neighbours) hits
    all of them alike. One untimed loop of each first, as warm-up."""
    def loop(fn: Callable[[], object]) -> float:
        common.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        common.synchronize(dev)
        return (time.perf_counter() - t0) / calls * 1e6

    names = list(fns)
    for name in names:
        loop(fns[name])
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(samples):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name].append(loop(fns[name]))
    return out


def run(args: argparse.Namespace, report: common.Report) -> None:
    dev = args.device
    calls = args.calls or (10_000 if args.size == "full" else 2_000)
    samples = max(args.repeats, 9)
    report.params.update(SPEC.params(), calls=calls, samples=samples)
    if args.graph_only:
        if common.is_cuda(dev):
            _decode_graph(args, report, calls, samples)
        else:
            report.notes.append("--graph-only needs a CUDA device: nothing measured")
        return
    built = common.build_model(args.cache, "call", SPEC.params(), lambda: SPEC.programs(dev), dev)
    table = report.table(f"per-call overhead, Linear({SPEC.dim}, {SPEC.dim}) {SPEC.dtype}, input [1, {SPEC.dim}], "
                         f"{calls} calls per loop, {samples} loops", [
                             ("variant", "variant", "{}"), ("us_median", "us/call median", "{:.2f}"),
                             ("us_best", "us/call best", "{:.2f}"), ("vs_stock", "x stock (median)", "{:.2f}")])
    results, diff = measure(built.path, dev, calls, samples)
    common.free_memory(dev)
    stock = common.best_median(results[STOCK])[1]
    for variant, us in results.items():
        best, median = common.best_median(us)
        table.add(variant=variant, us_median=median, us_best=best, vs_stock=median / stock, samples_us=us)
    table.notes.append(f"outputs agree: max |difference| to the stock runner = {diff:.3g}")
    table.notes.append("aoti_rt and stock run the same .so; the difference is the calling path "
                       "(input checks, pytree, handle conversion, Run)")
    if common.is_cuda(dev):
        _decode_graph(args, report, calls, samples)


def _captured(fn: Callable[[], object]) -> tuple[Callable[[], object], object]:
    """``fn`` captured into a CUDA graph (after a warm-up on a side stream): (replay, output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def _decode_graph(args: argparse.Namespace, report: common.Report, calls: int, samples: int) -> None:
    """The demo LM's decode step through aoti_rt, called and replayed from a CUDA graph."""
    from aoti_rt import demo

    dev = args.device
    built = common.build_model(args.cache, "call_lm", {"demo": demo.DEMO_VERSION},
                               lambda: demo.export_methods(demo.make_model(dev)), dev)
    table = report.table("decode step of the demo LM (4 layers, KV cache) through aoti_rt, called vs "
                         "replayed from a CUDA graph", [
                             ("variant", "variant", "{}"), ("us_median", "us/step median", "{:.2f}"),
                             ("us_best", "us/step best", "{:.2f}")])
    with aoti_rt.load(built.path, device=dev) as model, torch.no_grad():
        tok = torch.tensor([3], device=dev)
        pos = torch.tensor([8], device=dev)
        replay, out = _captured(lambda: model.decode(tok, pos))
        replay()
        diff = float((out - model.decode(tok, pos)).abs().max())
        results = per_call({"aoti_rt model.decode(tok, pos)": lambda: model.decode(tok, pos),
                            "the same, captured: CUDAGraph.replay()": replay}, dev, calls // 4, samples)
    for variant, us in results.items():
        best, median = common.best_median(us)
        table.add(variant=variant, us_median=median, us_best=best, samples_us=us)
    table.notes.append(f"replayed output vs a call: max |difference| = {diff:.3g}")


def measure(path: Path, dev: str, calls: int, samples: int) -> tuple[dict[str, list[float]], float]:
    """us/call samples of each variant, and the largest output difference to the stock runner."""
    torch.manual_seed(1)
    x = SPEC.example("decode", dev)
    runner = common.stock_runner(aoti_rt.read_bundle(path).so_path("decode"), dev)
    runner.update_constant_buffer_from_blob(str(common.stock_blob(path, "decode")))
    eager = SPEC.programs(dev)["decode"][0]
    with aoti_rt.load(path, device=dev) as model, torch.no_grad():
        method = model.decode
        ref = runner.run([x])[0]
        diff = max(float((method(x) - ref).abs().max()), float((eager(x) - ref).abs().max()))
        fns = {STOCK: lambda: runner.run([x]),
               "aoti_rt Method(x)": lambda: method(x),
               "eager nn.Module(x) (reference)": lambda: eager(x)}
        if common.is_cuda(dev):
            fns["aoti_rt Method(x) captured in a CUDA graph, replay()"] = _captured(lambda: method(x))[0]
        results = per_call(fns, dev, calls, samples)
    return results, diff


main = common.main_of("bench_call", __doc__, run, _extra)

if __name__ == "__main__":
    sys.exit(main())
