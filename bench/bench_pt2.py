"""PyTorch's own packages: a prefill/decode pair made with stock ``aoti_compile_and_package``,
loaded by aoti_rt (one Model) and the stock way (``aoti_load_package`` per package), side by side.

Table 1 (the bench_load model, 16 x Linear(8192, 8192) bf16 = 2 GiB on ``--size full``, prefill
and decode as two packages with the weights in the .so, torch's default): load seconds, weight
bytes held by the loader (aoti_rt: its exact bytes_allocated; stock: the device-wide used
delta on CUDA, the process's RSS delta on the CPU) as a multiple of the unique weight bytes.
Each loader runs in a fresh process (page cache warm).

Table 2 (the demo LM, whose methods share a KV cache written in place): the tokens of greedy
generation, prefill then decode, against eager PyTorch: aoti_rt's one Model shares one KV
cache across the two packages; stock loading gives each package its own, so decode never sees
what prefill wrote.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import child  # noqa: E402 (light: no torch)

#: the greedy-generation prompt (the tests' too)
PROMPT = list(range(1, 9))


def _package(cache: Path, name: str, params: dict[str, Any], program, device: str) -> Path:
    """A stock ``aoti_compile_and_package`` package of one program, built once into the cache."""
    import torch

    from bench import common

    path = common._cache_dir(cache, name, params, device, "pt2") / f"{name}.pt2"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    module, args = program()
    common.log(f"packaging {name} for {device} with torch._inductor.aoti_compile_and_package ...")
    t0 = time.perf_counter()
    ep = torch.export.export(module, args)
    tmp = path.with_suffix(".tmp.pt2")
    torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
    os.replace(tmp, path)
    common.log(f"  packaged in {time.perf_counter() - t0:.1f} s")
    return path


def _used(device: str) -> int:
    from bench import common

    return common.used_memory(device)


def _child(kind: str, a: dict[str, Any]) -> dict[str, Any]:
    import torch

    import aoti_rt

    dev = a["device"]
    if dev != "cpu":
        torch.cuda.init()
        torch.empty(1, device=dev)
        torch.cuda.synchronize(dev)

    def sync() -> None:
        if dev != "cpu":
            torch.cuda.synchronize(dev)

    before = _used(dev)
    s = time.perf_counter()
    if kind == "aoti_rt":
        model = aoti_rt.load(a["packages"], device=dev, progress=False)
        sync()
        seconds = time.perf_counter() - s
        held = aoti_rt.cache_stats(dev)["bytes_allocated"]
        out = {"seconds": seconds, "held": held, "device_delta": _used(dev) - before,
               "unique": model.manifest.unique_weight_bytes()}
        model.close()
    else:
        index = torch.device(dev).index
        runners = [torch._inductor.aoti_load_package(p, device_index=-1 if index is None else index)
                   for p in a["packages"].values()]
        sync()
        seconds = time.perf_counter() - s
        out = {"seconds": seconds, "held": _used(dev) - before, "device_delta": _used(dev) - before,
               "runners": len(runners)}
    return out


def _generate(prefill, decode, prompt, n: int) -> tuple[list[int], list[Any]]:
    from aoti_rt import demo

    return demo.generate(prefill, decode, prompt, n)


def run(args: argparse.Namespace, report: Any) -> None:
    if args.tables != "generation":
        _load_table(args, report)
    _generation_table(args, report)


def _load_table(args: argparse.Namespace, report: Any) -> None:
    """Table 1: load seconds and bytes held, aoti_rt vs stock, each in a fresh process."""
    from bench import common
    from bench.bench_load import spec_for

    dev = args.device
    spec = spec_for(args.size)
    report.params.update(spec.params())
    programs = spec.programs(dev)
    pk = {m: _package(args.cache, f"pt2_{m}", spec.params(), partial(lambda m: programs[m], m), dev)
          for m in ("prefill", "decode")}
    common.free_memory(dev)
    for p in pk.values():
        common.read_file(p)
    table = report.table("prefill + decode as two stock .pt2 packages (weights in the .so), each loader in a "
                         "fresh process", [("loader", "loader", "{}"), ("seconds", "load s", "{:.3f}"),
                                           ("ratio", "held / unique weight bytes", "{:.2f}"),
                                           ("held_mib", "held MiB", "{:.1f}")])
    base = {"device": dev, "packages": {m: str(p) for m, p in pk.items()}}
    unique = None
    for kind, label in (("aoti_rt", "aoti_rt.load({prefill, decode})"),
                        ("stock", "stock aoti_load_package x 2")):
        for attempt in ("first", "again (extraction and probe cached)") if kind == "aoti_rt" else ("first",):
            try:
                r = child.spawn(__file__, kind, base, timeout=900)
            except RuntimeError as e:
                table.notes.append(f"{label}: {str(e)[-800:]}")
                continue
            unique = r.get("unique", unique)
            table.add(loader=f"{label}, {attempt}", seconds=r["seconds"], held=r["held"],
                      held_mib=r["held"] / common.MiB, ratio=(r["held"] / unique) if unique else None,
                      device_delta=r["device_delta"])
    table.notes.append("held: aoti_rt's exact bytes_allocated; stock: the device-wide used delta (CUDA) or "
                       "the RSS delta (CPU), so it includes each container's own scratch")


def _generation_table(args: argparse.Namespace, report: Any) -> None:
    """Table 2: greedy generation through the demo LM's two stock packages vs eager."""
    import torch

    import aoti_rt
    from aoti_rt import demo
    from bench import common

    dev = args.device
    # correctness: a model whose decode reads the KV cache prefill wrote. The packages are
    # exported from a fresh model (empty KV cache): exported after the eager run, they would
    # carry its filled cache as the buffers' initial values and hide what stock loading loses.
    eps = demo.export_methods(demo.make_model(dev))
    lm_pk = {}
    for m, ep in eps.items():
        path = common._cache_dir(args.cache, f"lm_{m}", {"demo": demo.DEMO_VERSION, "cache": "empty"},
                                 dev, "pt2") / f"lm_{m}.pt2"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
        lm_pk[m] = str(path)
    lm = demo.make_model(dev)
    prompt = torch.tensor(PROMPT, device=dev)
    with torch.no_grad():
        want, want_logits = _generate(demo.Prefill(lm), demo.Decode(lm), prompt, 16)
    gen = report.table("greedy generation through two stock .pt2 packages (demo LM, KV cache written by "
                       "prefill, read by decode)", [("loader", "loader", "{}"), ("match", "matches eager", "{}"),
                                                    ("diff", "max |logit diff|", "{:.2e}"),
                                                    ("tokens", "first tokens", "{}")])

    def row(label: str, prefill, decode) -> None:
        with torch.no_grad():
            got, logits = _generate(prefill, decode, prompt, 16)
        diff = max(float((a - b).abs().max()) for a, b in zip(logits, want_logits))
        gen.add(loader=label, match=got == want and diff < 1e-3, diff=diff, tokens=got[:8])

    with aoti_rt.load(lm_pk, device=dev, progress=False) as model:
        row("aoti_rt.load({prefill, decode})", model.prefill, model.decode)
    index = torch.device(dev).index
    pf, dc = (torch._inductor.aoti_load_package(lm_pk[m], device_index=-1 if index is None else index)
              for m in ("prefill", "decode"))
    row("stock aoti_load_package x 2", pf, dc)


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tables", choices=("all", "generation"), default="all",
                   help="generation: only the generation table (no 2 GiB packages to build)")
    child.add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """Run the .pt2 rows."""
    from bench import common

    return common.main_of("bench_pt2", __doc__, run, _extra)(argv)


if __name__ == "__main__":
    child.run_if_child(_child)
    sys.exit(main())
