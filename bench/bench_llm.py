"""The LLM headline: a Qwen3-MoE model with random int4 weights as a prefill/decode bundle, on one
card, against the same methods as stock AOTInductor packages.

Sizes (``--size``; ``--layers N`` overrides the depth): ``tiny`` (hidden 64, 2 layers, 4 experts:
minutes on a CPU, for checking the script), ``medium`` (Qwen3-30B-A3B's layer shapes, 4 layers),
``full`` (Qwen3-30B-A3B: hidden 2048, 48 layers, 128 experts top-8, moe_intermediate 768, 32
heads, 4 KV heads, head_dim 128, vocab 151936), ``35b`` (the default on CUDA: the motivating
Qwen3.5-35B-A3B's sizes, hidden 2048, 40 layers, 256 experts top-8, moe_intermediate 512, 16 heads,
2 KV heads, head_dim 256, vocab 248320, on Qwen3-MoE's decoder, which has full attention in every
layer where Qwen3.5 has Gated DeltaNet in three of four, and no shared expert: about 34B
parameters, about 18 GB in int4; fewer layers than ``full --layers 56`` for the same bytes, and
compile time grows with the layers). Weights: ``aoti_rt.llm.prepare_model(config, low_memory=True)`` (a layer at a
time on the device), linears int4 with torchao, MoE experts int4 with ``aoti_rt.llm.experts``.

Phase ``build`` (compiled once into ``--cache``; each step a child process, resumable): the
quantized eager model's greedy tokens and their logits; ``aoti_rt.compile`` of prefill+decode
(timed, plus ``llm.json``); ``torch._inductor.aoti_compile_and_package`` of each method on its own
(timed; skipped, saying why, when the disk cannot hold the two packages). Each compile starts
from empty inductor and triton caches.

Phase ``rows`` (each row a fresh process; the page cache warmed first): device-wide memory
sampled by this parent every ~1 ms while the child loads (NVML on CUDA, the child's RSS on the
CPU), minus the child's baseline after its CUDA context is up: the peak during the load and
what stays resident, over the weight bytes plus the KV cache bytes (1.00: one copy).

  aoti_rt bundle    ``load_llm``: load s and GB/s, memory, greedy tokens against eager (where they
                    differ: the step, eager's top-2 logit gap there, the largest logit difference
                    up to it), decode step called and replayed from a CUDA graph, prefill tok/s
  .pt2 pair         the two stock packages as one ``aoti_rt.load({"prefill": ..., "decode": ...})``:
                    first (extraction and probe) and again (cached probe)
  stock             ``torch._inductor.aoti_load_package`` of each package (each keeps its own KV
                    cache: decode never sees what prefill wrote, so its tokens differ)
  copy ceiling      a pinned 1 GiB host tensor ``.to(device)``, best of ``--repeats``

``--experts-compare`` (``only``: nothing else): decode step of int4 experts against experts in the
model dtype (transformers' ``batched_mm``; linears int4 in both), at ``--experts-size`` (default
``medium`` for ``--size full``, ``35b-medium``, 4 layers, for ``35b``), each built once and timed in a fresh process.

A build step logs aoti_rt's compile phases as they end and, in JSON, inductor's own phase times
(``inductor_s``: those of a compile in the step's process, ``--compile-jobs 1``); ``--stacks S``
prints its threads' Python stacks every S seconds, so a step a time limit stops still shows
where its time went.

Under a time limit per command: ``--phase build`` as often as needed (each finished step is
recorded in ``build.json``: eager, bundle, stock prefill, stock decode; the bundle's compile is
``resume=True``, so a step stopped mid-way keeps the methods it finished, and its compile time
is then the sum of its tries' ``compile_s``), then ``--phase rows
--rows ceiling,bundle``, ``--rows pair,pair-again``, ``--rows stock`` (or ``--rows missing``):
each row is kept in ``rows.json`` and every call prints the table of all rows measured so far.
Disk: the bundle and each stock package hold all weights (W); a stock compile needs about 2 W
free while it runs, and loading the pair of packages (weights in the .so) or the stock pair
extracts about 2 W more: at ~18 GB weights a 64 GB disk holds the bundle rows but not the stock
ones, which are then skipped with the reason; ``--layers`` gives a size where all fit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import child  # noqa: E402 (light: no torch)

MARK = "AOTI_RT_BENCH_MARK "
ROWS = ("ceiling", "bundle", "pair", "pair-again", "stock")
SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                 num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 num_hidden_layers=2),
    "full": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                 num_experts=128, num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4,
                 head_dim=128, num_hidden_layers=48),
}
SHAPES["medium"] = {**SHAPES["full"], "num_hidden_layers": 4}
#: Qwen3.5-35B-A3B's sizes (the motivating model) on Qwen3-MoE's decoder: full attention in every
#: layer instead of 3 Gated DeltaNet layers to 1, and no shared expert
SHAPES["35b"] = dict(vocab_size=248320, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=512,
                     num_experts=256, num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=2,
                     head_dim=256, num_hidden_layers=40)
SHAPES["35b-medium"] = {**SHAPES["35b"], "num_hidden_layers": 4}
#: experts kernel of full-precision experts (grouped_mm has no AOTI C shim before torch 2.12)
EXPERTS = "batched_mm"


# ---------------------------------------------------------------------------------------
# what is built, and where

def spec_of(args: argparse.Namespace, size: str, variant: str = "int4") -> dict[str, Any]:
    """Everything that shapes a build (it names the cache folder)."""
    cuda = args.device != "cpu"
    shapes = {**SHAPES[size], **({"num_hidden_layers": args.layers} if args.layers and size == args.size else {})}
    return {"size": size, "shapes": shapes, "variant": variant, "quantize": args.quantize,
            "group": args.group or (32 if size == "tiny" else 128), "dtype": "bfloat16" if cuda else "float32",
            "prompt_len": args.prompt_len, "max_seq_len": args.prompt_len + max(256, args.tokens),
            "tokens": args.tokens, "seed": 0, "stock_weights": args.stock_weights, "device": args.device}


def config_of(spec: dict[str, Any]) -> Any:
    import transformers

    return transformers.Qwen3MoeConfig(**spec["shapes"], norm_topk_prob=True, tie_word_embeddings=False,
                                       max_position_embeddings=max(4096, spec["max_seq_len"]))


def prompt_of(spec: dict[str, Any]) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(spec["seed"] + 1)
    return torch.randint(0, spec["shapes"]["vocab_size"], (spec["prompt_len"],), generator=g).tolist()


def folder_of(cache: Path, spec: dict[str, Any]) -> Path:
    from bench import common

    key = {k: v for k, v in spec.items() if k not in ("tokens", "stock_weights")}   # per step, see _build
    return common._cache_dir(cache, f"llm_{spec['size']}_{spec['variant']}", key, spec["device"], "llm")


def _read(d: Path, name: str) -> dict[str, Any]:
    p = d / name
    return json.loads(p.read_text()) if p.is_file() else {}


def _update(d: Path, name: str, **items: Any) -> dict[str, Any]:
    """Merge ``items`` into ``d/name`` (written atomically): what is done survives an interrupted run."""
    state = {**_read(d, name), **items}
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, d / name)
    return state


# ---------------------------------------------------------------------------------------
# children

def _mark(phase: str, **kw: Any) -> None:
    """Tell the parent where this child is and wait for its go (it samples memory meanwhile)."""
    print(MARK + json.dumps({"phase": phase, **kw}), flush=True)
    sys.stdin.readline()


def _recording(step: Any, logits: list[Any]) -> Any:
    """``step`` that keeps the last row of each call's logits (on the host, float32)."""
    def s(ids: Any, pos: Any) -> Any:
        out = step(ids, pos)
        logits.append((out[0] if isinstance(out, (list, tuple)) else out)[0, -1].float().cpu())
        return out
    return s


def _watch(every_s: float) -> None:
    """Make a build step say where its time goes: aoti_rt's compile phases (and why a compile
    stays in this process) as they end, and with ``every_s`` the Python stack of each thread every
    ``every_s`` seconds (a step stopped by a time limit still shows what it was doing)."""
    import logging
    import traceback

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(relativeCreated)9.0f ms] %(name)s: %(message)s"))
    logger = logging.getLogger("aoti_rt")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False                 # transformers may configure the root logger too
    if every_s <= 0:
        return
    t0 = time.perf_counter()

    def sample() -> None:                    # a thread holding the GIL (faulthandler's watchdog,
        me = threading.get_ident()           # which does not, crashed the process mid-dump)
        while True:
            time.sleep(every_s)
            lines = [f"-- Python stacks at +{time.perf_counter() - t0:.0f} s"]
            for tid, frame in sys._current_frames().items():
                if tid != me:
                    lines += [f"thread {tid}:"] + [x.rstrip("\n") for x in traceback.format_stack(frame, limit=14)]
            print("\n".join(lines), file=sys.stderr, flush=True)

    threading.Thread(target=sample, name="stacks", daemon=True).start()


def _inductor_times() -> dict[str, float]:
    """Seconds inductor spent in each of its timed phases in this process (those of a compile
    that ran here, ``jobs=1``; a worker's are its own), the longest first."""
    from torch._dynamo import utils

    names, values = utils.compile_times(repr="csv", aggregate=True)
    times = {n: float(v) for n, v in zip(names, values)}
    if times:
        common_log = "; ".join(f"{n} {v:.1f} s" for n, v in sorted(times.items(), key=lambda x: -x[1])[:12])
        print(f"inductor phases in this process: {common_log}", file=sys.stderr, flush=True)
    return {n: v for n, v in sorted(times.items(), key=lambda x: -x[1]) if v >= 0.1}


def _child(kind: str, a: dict[str, Any]) -> dict[str, Any]:
    if kind.startswith("build-"):
        return _build_child(kind.removeprefix("build-"), a)
    return _row_child(kind, a)


def _build_child(kind: str, a: dict[str, Any]) -> dict[str, Any]:
    import torch

    import aoti_rt
    from aoti_rt.llm.export import eager_step, export_programs, prepare_model, state_bytes, write_info
    from aoti_rt.llm.generate import generate_tokens
    from aoti_rt.llm.quant import config_for
    from bench import common

    spec, dev, d = a["spec"], a["spec"]["device"], Path(a["dir"])
    msl, plen = spec["max_seq_len"], spec["prompt_len"]
    _watch(a.get("stacks", 0))
    cfg = config_of(spec)
    with torch.device("meta"):
        import transformers
        params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(cfg).parameters())
    t0 = time.perf_counter()
    experts_q = spec["variant"] == "int4"
    model = prepare_model(cfg, quantize_weights=spec["quantize"] if experts_q else "none", group_size=spec["group"],
                          device=dev, dtype=getattr(torch, spec["dtype"]), seed=spec["seed"],
                          experts_implementation=EXPERTS, low_memory=True, progress=True)
    if not experts_q:                            # linears only: the experts stay in the model dtype
        tq = config_for(spec["quantize"], "cpu" if dev == "cpu" else "cuda", spec["group"])
        if tq is not None:
            import torchao.quantization

            torchao.quantization.quantize_(model, tq)
    out: dict[str, Any] = {"params": params, "state_bytes": state_bytes(model),
                           "prepare_s": time.perf_counter() - t0}
    if kind == "eager":
        logits: list[Any] = []
        prompt = prompt_of(spec)
        common.log(f"eager greedy tokens ({spec['tokens']} after {plen})")
        gen = generate_tokens(_recording(eager_step(model, msl), logits), prompt, max_seq_len=msl,
                              max_prefill=plen, max_new_tokens=spec["tokens"], device=dev)
        picked = torch.stack(logits[-len(gen.tokens):])
        torch.save(picked, d / "eager_logits.pt")
        top = picked.topk(2, dim=-1)
        out["asked"] = spec["tokens"]
        out["eager"] = {"tokens": gen.tokens, "gap": (top.values[:, 0] - top.values[:, 1]).tolist(),
                        "second": top.indices[:, 1].tolist()}
        return out
    t0 = time.perf_counter()
    programs = export_programs(model, max_seq_len=msl, max_prefill=plen, progress=True)
    out["export_s"] = time.perf_counter() - t0
    if kind == "bundle":
        path = d / "bundle"
        if (path / "manifest.json").exists():    # complete, but its step was not recorded
            shutil.rmtree(path)
        common.log("compiling prefill + decode with aoti_rt.compile (resumable)")
        t0 = time.perf_counter()
        # one method after another, in this process: on the CPU aoti_rt's default forks a worker per
        # method, and a fork of a process whose OpenMP pool ran (building a real-size model does)
        # hangs in its first parallel op; on CUDA the programs call torch.export's
        # access_subclass_inner_tensor on torchao's weights, which keeps any compile in this process
        # (aoti_rt.compile says so), and here inductor's phase times are this process's own
        jobs = a.get("jobs") or 1
        # resume: a step stopped by a time limit keeps the methods it finished for the next
        aoti_rt.compile(programs, path, device=dev, progress=sys.stderr.isatty(),   # a bar floods logs
                        jobs=jobs, resume=True)
        out["compile_s"], out["compile_jobs"] = time.perf_counter() - t0, jobs
        out["inductor_s"] = _inductor_times()
        write_info(path, model, max_seq_len=msl, max_prefill=plen, quantize_weights=spec["quantize"],
                   group_size=spec["group"])
        return out
    method = kind.removeprefix("stock-")
    path = d / f"{method}.pt2"
    tmp = d / f"{method}.tmp.pt2"
    opts = ({} if spec["stock_weights"] == "so" else
            {"aot_inductor.package_constants_in_so": False,
             "aot_inductor.package_constants_on_disk_format": "binary_blob"})
    common.log(f"compiling {method} with torch._inductor.aoti_compile_and_package ({spec['stock_weights']})")
    t0 = time.perf_counter()
    torch._inductor.aoti_compile_and_package(programs[method], package_path=str(tmp), inductor_configs=opts)
    out["compile_s"] = time.perf_counter() - t0
    os.replace(tmp, path)
    return out


def _row_child(kind: str, a: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch

    import aoti_rt
    from aoti_rt.llm import load_llm
    from aoti_rt.llm.generate import generate_tokens

    dev = a["device"]
    cuda = dev != "cpu"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    if cuda:
        torch.cuda.init()
        torch.empty(1, device=dev)
        sync()
    out: dict[str, Any] = {"start_s": time.perf_counter() - t0}
    if kind == "ceiling":
        times = child.pinned_copy_times(1 << 30, dev, a["repeats"], sync)
        return {**out, "gbps": (1 << 30) / min(times[1:]) / 1e9}
    import torch._inductor.package  # noqa: F401 - the stock loader's import is not its load

    uuid = getattr(torch.cuda.get_device_properties(dev), "uuid", None) if cuda else None
    _mark("ready", uuid=None if uuid is None else str(uuid))
    s = time.perf_counter()
    if kind in ("bundle", "decode"):
        lm = load_llm(a["bundle"], device=dev)
        model = lm.model
        step = lm.step
    elif kind == "pair":
        model = aoti_rt.load(a["packages"], device=dev, progress=False)

        def step(ids: Any, pos: Any) -> Any:
            return (model.decode if ids.shape[-1] == 1 else model.prefill)(input_ids=ids, cache_position=pos)
    else:
        index = torch.device(dev).index
        runners = {m: torch._inductor.aoti_load_package(p, device_index=-1 if index is None else index)
                   for m, p in a["packages"].items()}

        def step(ids: Any, pos: Any) -> Any:
            return runners["decode" if ids.shape[-1] == 1 else "prefill"](input_ids=ids, cache_position=pos)
    sync()
    out["load_s"] = time.perf_counter() - s
    if kind in ("bundle", "pair"):
        out["held"] = aoti_rt.cache_stats(dev)["bytes_allocated"]
    _mark("loaded", load_s=out["load_s"])
    msl, plen = a["max_seq_len"], a["prompt_len"]
    if kind != "decode":
        logits: list[Any] = []
        with torch.no_grad():
            gen = generate_tokens(_recording(step, logits), a["prompt"], max_seq_len=msl, max_prefill=plen,
                                  max_new_tokens=len(a["eager"]["tokens"]), device=dev)
        want = a["eager"]["tokens"]
        out["tokens"] = gen.tokens
        diff = next((i for i, (x, y) in enumerate(zip(gen.tokens, want)) if x != y), None)
        eager = torch.load(a["eager_logits"])
        upto = len(want) if diff is None else diff + 1
        got = torch.stack(logits[-len(gen.tokens):])
        out["first_diff"] = diff
        out["max_logit_diff"] = float((got[:upto] - eager[:upto]).abs().max())
        if diff is not None:
            out["diff_gap"] = a["eager"]["gap"][diff]
            out["diff_is_second"] = gen.tokens[diff] == a["eager"]["second"][diff]
    if kind in ("bundle", "decode"):
        out.update(_timings(torch, step, dev, a, sync))
    return out


def _timings(torch: Any, step: Any, dev: str, a: dict[str, Any], sync: Any) -> dict[str, Any]:
    """Decode step called (and replayed from a CUDA graph) and prefill of the prompt, medians."""
    plen = a["prompt_len"]
    tok = torch.tensor([[1]], dtype=torch.long, device=dev)
    pos = torch.tensor([plen], dtype=torch.long, device=dev)
    ids = torch.tensor([a["prompt"]], dtype=torch.long, device=dev)
    ar = torch.arange(plen, dtype=torch.long, device=dev)

    def timed(fn: Any, n: int) -> float:
        fn()
        sync()
        ts = []
        for _ in range(n):
            s = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - s)
        return statistics.median(ts)

    out: dict[str, Any] = {}
    with torch.no_grad():
        out["prefill_s"] = timed(lambda: step(ids, ar), a["repeats"])
        out["decode_s"] = timed(lambda: step(tok, pos), a["steps"])
        if dev != "cpu":
            first = (lambda o: o[0] if isinstance(o, (list, tuple)) else o)
            want = first(step(tok, pos)).clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step(tok, pos)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                got = step(tok, pos)
            out["graph_s"] = timed(graph.replay, a["steps"])
            out["graph_max_diff"] = float((first(got).float() - want.float()).abs().max())
    return out


# ---------------------------------------------------------------------------------------
# the parent: spawning children, sampling memory

def _env(d: Path | None = None, pt2_cache: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    if pt2_cache is not None:    # aoti_rt's package cache (extracted .so files, probe records)
        env["AOTI_RT_CACHE"] = str(pt2_cache)
    if d is not None:      # compiles start from empty caches, removed afterwards (disk)
        env.update(TORCHINDUCTOR_CACHE_DIR=str(d / "inductor"), TRITON_CACHE_DIR=str(d / "triton"))
    return env


def _spawn_build(kind: str, payload: dict[str, Any], d: Path) -> dict[str, Any]:
    """A build step in a child (progress on this stderr); its result, or RuntimeError."""
    d.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="compile-", dir=d))
    try:
        p = subprocess.Popen(child.command(__file__, kind, payload), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env(scratch))
        tail = _tee(p)
        try:
            text = p.stdout.read()
            p.wait()
        except KeyboardInterrupt:   # a time limit (its SIGINT reaches the child too): let the child
            try:                    # print where it was before this process ends
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
            tail.join(timeout=5)
            raise
        tail.join()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    r = child.result_of(text)
    if r is None:
        raise RuntimeError(f"build step {kind} failed (rc {p.returncode}): {''.join(tail.lines)[-1500:]}")
    return r


class _tee(threading.Thread):
    """Show a child's stderr as it comes; keep its last lines (``lines``) for the JSON."""

    def __init__(self, p: subprocess.Popen):
        super().__init__(daemon=True)
        self.p, self.lines = p, []
        self.start()

    def run(self) -> None:
        for line in self.p.stderr:
            sys.stderr.write(line)
            self.lines.append(line)
            del self.lines[:-20]


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class _Sampler:
    """Device-wide used memory (NVML by the card's UUID; else cuMemGetInfo) or a process's RSS,
    polled every ~1 ms in a thread of this parent (a child busy in C++ cannot delay it)."""

    def __init__(self, device: str, pid: int, uuid: str | None):
        self.read = self._reader(device, pid, uuid)
        self.peak = 0
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def _reader(self, device: str, pid: int, uuid: str | None) -> Any:
        if device == "cpu":
            page = os.sysconf("SC_PAGE_SIZE")

            def rss() -> int:
                with open(f"/proc/{pid}/statm") as f:
                    return int(f.read().split()[1]) * page
            self.how = "the child's RSS"
            return rss
        try:
            import pynvml

            pynvml.nvmlInit()
            if uuid is None:
                raise LookupError("no UUID")
            want = uuid.lower().removeprefix("gpu-")
            found = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            h = next(h for h in found if _text(pynvml.nvmlDeviceGetUUID(h)).lower().removeprefix("gpu-") == want)
            self.how = "NVML, device-wide"
            return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
        except Exception:   # noqa: BLE001 - no NVML, or no card of that UUID: cuMemGetInfo here
            from bench import common

            self.how = "cuMemGetInfo, device-wide"
            return lambda: common.used_memory(device)

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self.read())
                time.sleep(0.001)
        self.peak = self.read()
        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()

    def stop(self) -> int:
        self._stop.set()
        if self._t is not None:
            self._t.join()
        return max(self.peak, self.read())


def _spawn_row(kind: str, payload: dict[str, Any], pt2_cache: Path) -> dict[str, Any]:
    """A row in a fresh child; adds baseline/peak/resident memory for the rows that load."""
    p = subprocess.Popen(child.command(__file__, kind, payload), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env(pt2_cache=pt2_cache))
    tail = _tee(p)
    mem: dict[str, Any] = {}
    sampler = None
    text = []
    for line in p.stdout:
        if line.startswith(MARK):
            m = json.loads(line[len(MARK):])
            if m["phase"] == "ready":
                sampler = _Sampler(payload["device"], p.pid, m.get("uuid"))
                time.sleep(0.05)
                mem["baseline"] = min(sampler.read() for _ in range(5))
                sampler.start()
            else:
                mem["peak"] = sampler.stop()
                time.sleep(0.05)
                mem["resident"] = sampler.read()
                mem["how"] = sampler.how
            p.stdin.write("go\n")
            p.stdin.flush()
        else:
            text.append(line)
    p.wait()
    tail.join()
    if sampler is not None and "peak" not in mem:    # the child ended during its load
        sampler.stop()
    r = child.result_of("".join(text))
    if r is None:
        raise RuntimeError(f"row {kind} failed (rc {p.returncode}): {''.join(tail.lines)[-1500:]}")
    return {**r, **mem}


# ---------------------------------------------------------------------------------------
# phases

def _build(args: argparse.Namespace, spec: dict[str, Any], d: Path, stock: bool,
           eager: bool = True) -> dict[str, Any]:
    """Run the build steps not yet recorded in ``d/build.json``; its state."""
    from bench import common

    state = _read(d, "build.json")
    payload = {"spec": spec, "dir": str(d), "jobs": args.compile_jobs, "stacks": args.stacks}
    for stale in d.glob("compile-*"):        # a build step killed mid-way (a time limit)
        shutil.rmtree(stale, ignore_errors=True)
    # the compile first: under a time limit per command, the longest step starts with the most time left
    steps = ["bundle"] + (["eager"] if eager and spec["variant"] == "int4" else [])
    if state.get("eager", {}).get("asked") not in (None, spec["tokens"]):
        state.pop("eager")                   # another --tokens: the eager step again, not the compile
    for step in steps:
        if step not in state:
            common.log(f"build step {step}: {spec['size']} ({spec['variant']}) into {d}")
            t0 = time.perf_counter()
            try:
                done = _spawn_build(f"build-{step}", payload, d)
            except KeyboardInterrupt:        # a time limit: the next try resumes; its time counts
                _update(d, "build.json", **{f"{step}_stopped_s": state.get(f"{step}_stopped_s", []) +
                                            [time.perf_counter() - t0]})
                raise
            state = _update(d, "build.json", **{step: done})
        else:
            common.log(f"build step {step}: reused from {d}")
    if not stock:
        return state
    import aoti_rt

    need = 2.1 * aoti_rt.read_bundle(d / "bundle").manifest.unique_weight_bytes() + (1 << 30)
    for method in ("prefill", "decode"):
        key = f"stock_{method}"
        same = state.get(key, {}).get("weights") == spec["stock_weights"]
        if same and ("compile_s" in state[key] or ("failed" in state[key] and not args.retry_stock)):
            continue
        free = shutil.disk_usage(d).free
        if free < need:
            state = _update(d, "build.json", **{key: {"skipped": (
                f"{free / 1e9:.1f} GB free on the cache's disk; the package and its compile need "
                f"{need / 1e9:.1f} GB")}})
            continue
        try:
            done = _spawn_build(f"build-stock-{method}", payload, d)
        except RuntimeError as e:            # recorded, not retried unless --retry-stock
            done = {"failed": str(e)}
        done["weights"] = spec["stock_weights"]
        state = _update(d, "build.json", **{key: done})
    return state


def _row(spec: dict[str, Any], d: Path, kind: str, args: argparse.Namespace, state: dict[str, Any]) -> dict:
    from bench import common

    payload = {"device": spec["device"], "bundle": str(d / "bundle"), "prompt": prompt_of(spec),
               "prompt_len": spec["prompt_len"], "max_seq_len": spec["max_seq_len"],
               "eager": state.get("eager", {}).get("eager"), "eager_logits": str(d / "eager_logits.pt"),
               "repeats": args.repeats, "steps": args.steps,
               "packages": {m: str(d / f"{m}.pt2") for m in ("prefill", "decode")}}
    if kind in ("bundle", "decode"):
        common.read_file(d / "bundle" / aoti_store(d / "bundle"))
    elif kind in ("pair", "stock"):
        for p in payload["packages"].values():
            common.read_file(Path(p))
    common.log(f"row {kind} ({spec['size']}, {spec['variant']})")
    return _spawn_row(kind, payload, d / "aoti_rt_cache")


def aoti_store(bundle: Path) -> str:
    import aoti_rt

    return aoti_rt.read_bundle(bundle).store_path.name


def _rows(args: argparse.Namespace, spec: dict[str, Any], d: Path, state: dict[str, Any], which: list[str]) -> None:
    import aoti_rt
    from bench import common

    have_stock = all("compile_s" in state.get(f"stock_{m}", {}) for m in ("prefill", "decode"))
    man = aoti_rt.read_bundle(d / "bundle").manifest
    weights = sum(w.nbytes for w in man.weights.values() if not w.mutable)
    pkg = sum((d / f"{m}.pt2").stat().st_size for m in ("prefill", "decode")) if have_stock else 0
    if which == ["missing"]:
        which = [k for k in ROWS if k not in _read(d, "rows.json")]
    for kind in which:
        if kind in ("pair", "pair-again", "stock") and not have_stock:
            continue
        if kind == "ceiling" and spec["device"] == "cpu":
            continue
        if kind == "pair":                   # a first load: the package extracted and probed anew
            shutil.rmtree(d / "aoti_rt_cache", ignore_errors=True)
        free = shutil.disk_usage(tempfile.gettempdir() if kind == "stock" else d).free
        extract = pkg if kind == "stock" or (kind == "pair" and spec["stock_weights"] == "so") else 0
        if extract and free < 1.05 * extract:
            _update(d, "rows.json", **{kind: {"skipped": f"{free / 1e9:.1f} GB free where the packages are "
                                                         f"extracted; they need {extract / 1e9:.1f} GB"}})
            continue
        if kind == "pair-again" and not (d / "aoti_rt_cache").exists():
            common.log("row pair-again not measured: it runs right after the pair row, whose package cache it "
                       "loads from; ask for both")
            continue
        try:
            r = _row(spec, d, "pair" if kind == "pair-again" else kind, args, state)
        except RuntimeError as e:            # a row that fails (out of memory, say) is reported, not fatal
            _update(d, "rows.json", **{kind: {"failed": str(e)}})
            continue
        r.update(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), weights=weights,
                 kv=man.unique_weight_bytes() - weights)
        _update(d, "rows.json", **{kind: r})
        if kind == "pair-again":             # its extracted .so files (the weights, in "so" packages): disk
            shutil.rmtree(d / "aoti_rt_cache", ignore_errors=True)


def _tables(report: Any, spec: dict[str, Any], d: Path, state: dict[str, Any], started: str) -> None:
    """The table of every row in ``d/rows.json`` (those measured before ``started`` marked so)."""
    import aoti_rt
    from aoti_rt.bundle import human_bytes
    from bench import common

    man = aoti_rt.read_bundle(d / "bundle").manifest
    b = state["bundle"]
    weights = sum(w.nbytes for w in man.weights.values() if not w.mutable)
    kv = man.unique_weight_bytes() - weights
    sh = spec["shapes"]
    report.params.update({k: spec[k] for k in ("size", "quantize", "group", "dtype", "prompt_len", "max_seq_len",
                                               "tokens", "stock_weights")},
                         layers=sh["num_hidden_layers"], params=b["params"], weight_bytes=weights, kv_bytes=kv)
    count = f"{b['params'] / 1e9:.2f}B" if b["params"] >= 1e8 else f"{b['params']:,}"
    layers = sh["num_hidden_layers"]
    t = report.table(f"Qwen3-MoE, {count} parameters ({layers} layer{'s' if layers != 1 else ''}, "
                     f"{sh['num_experts']} experts top-{sh['num_experts_per_tok']}, hidden {sh['hidden_size']}), "
                     f"{spec['quantize']} weights {human_bytes(weights)} + KV cache {human_bytes(kv)} "
                     f"(from the bundle's manifest), each row a fresh process",
                     [("row", "row", "{}"), ("load_s", "load s", "{:.2f}"), ("gbps", "GB/s", "{:.2f}"),
                      ("of_ceiling", "of copy ceiling", "{:.2f}"), ("peak_ratio", "peak/(W+KV)", "{:.3f}"),
                      ("resident_ratio", "resident/(W+KV)", "{:.3f}"), ("tokens", "tokens = eager", "{}"),
                      ("compile_s", "compile s", "{:.1f}")])
    rows = _read(d, "rows.json")
    ceiling = rows.get("ceiling", {}).get("gbps")
    labels = {"bundle": "aoti_rt bundle (load_llm)", "pair": ".pt2 pair via aoti_rt.load, first",
              "pair-again": ".pt2 pair via aoti_rt.load, again (probe cached)",
              "stock": "stock aoti_load_package x 2", "ceiling": "pinned host->device copy (1 GiB)"}
    stock_s = [state.get(f"stock_{m}", {}).get("compile_s") for m in ("prefill", "decode")]
    for kind, label in labels.items():
        r = rows.get(kind)
        if r is None:
            continue
        if r.get("date", started) < started:
            label += f" [earlier run, {r['date']}]"
        if "skipped" in r or "failed" in r:
            t.notes.append(f"{label}: {'skipped: ' + r['skipped'] if 'skipped' in r else r['failed']}")
            continue
        if kind == "ceiling":
            t.add(row=label, gbps=r["gbps"], date=r["date"])
            continue
        row = {"row": label, "load_s": r["load_s"], "gbps": weights / r["load_s"] / common.GB, **r}
        row["of_ceiling"] = row["gbps"] / ceiling if ceiling else None
        if "peak" in r:
            row["peak_ratio"] = (r["peak"] - r["baseline"]) / (weights + kv)
            row["resident_ratio"] = (r["resident"] - r["baseline"]) / (weights + kv)
        if "tokens" in r:
            row["token_ids"] = r["tokens"]
            row["tokens"] = "yes" if r["first_diff"] is None else f"no (from step {r['first_diff']})"
        if kind == "bundle":
            row["compile_s"] = b["compile_s"] + sum(state.get("bundle_stopped_s", []))
            if state.get("bundle_stopped_s"):
                t.notes.append(f"bundle compile s: the last try's compile {b['compile_s']:.1f} s plus "
                               f"{len(state['bundle_stopped_s'])} tries a time limit stopped (each from the "
                               f"start of its build step), which the last resumed")
        elif kind == "stock" and None not in stock_s:
            row["compile_s"] = sum(stock_s)
        t.add(**row)
        t.notes.extend(_token_note(label, kind, r))
    for m in ("prefill", "decode"):
        st = state.get(f"stock_{m}", {})
        if "skipped" in st or "failed" in st:
            t.notes.append(f"stock {m} package not built: {st.get('skipped') or st.get('failed')}")
    t.notes.append("GB/s: the model's weight bytes over load s (the stock row moves them twice); goals: aoti_rt's "
                   "peak <= 1.02, stock's about 2; aoti_rt's first load >= 0.7 of the pinned copy")
    t.notes.append(f"compile s: aoti_rt.compile of both methods ({b.get('compile_jobs', 1)} at a time); stock: the two aoti_compile_and_package "
                   f"calls ({', '.join('-' if s is None else f'{s:.1f}' for s in stock_s)}); export "
                   f"{b['export_s']:.1f} s not included")
    if "bundle" in rows and "how" in rows["bundle"]:
        t.notes.append(f"memory: {rows['bundle']['how']} sampled every ~1 ms during the load, minus the child's "
                       f"baseline after its start-up (CUDA context up); W+KV = {human_bytes(weights + kv)}")
    r = rows.get("bundle")
    if r and "decode_s" in r:
        s = report.table("decode and prefill, aoti_rt bundle", [
            ("what", "what", "{}"), ("us", "us (median)", "{:.1f}"), ("tok_s", "tokens/s", "{:.1f}")])
        s.add(what="decode step, called", us=r["decode_s"] * 1e6, tok_s=1 / r["decode_s"])
        if "graph_s" in r:
            s.add(what=f"decode step, CUDA graph replay (max |logit diff| from called {r['graph_max_diff']:.2g})",
                  us=r["graph_s"] * 1e6, tok_s=1 / r["graph_s"])
        s.add(what=f"prefill of {spec['prompt_len']} tokens", us=r["prefill_s"] * 1e6,
              tok_s=spec["prompt_len"] / r["prefill_s"])


def _token_note(label: str, kind: str, r: dict[str, Any]) -> list[str]:
    """What a row's tokens against eager's say."""
    if "tokens" not in r:
        return []
    if r["first_diff"] is None:
        return [f"{label}: largest |logit diff| from eager over {len(r['tokens'])} steps {r['max_logit_diff']:.3g}"]
    if kind == "stock":
        return [f"{label}: each package keeps its own KV cache, so decode never sees what prefill wrote: "
                f"its tokens are not the model's (first differing at step {r['first_diff']})"]
    second = "eager's second choice" if r["diff_is_second"] else "not eager's second choice"
    return [f"{label}: first differing token at step {r['first_diff']} ({second}): eager's top-2 logit gap "
            f"there {r['diff_gap']:.3g}, largest |logit diff| up to it {r['max_logit_diff']:.3g}"]


def _experts(args: argparse.Namespace, report: Any, phases: set[str]) -> None:
    from bench import common

    size = args.experts_size or {"full": "medium", "35b": "35b-medium"}.get(args.size, args.size)
    t = report.table(f"decode step, int4 experts (aoti_rt.llm.experts) against experts in the model dtype "
                     f"({EXPERTS}); linears {args.quantize} in both; {size}",
                     [("variant", "experts", "{}"), ("decode_us", "decode us", "{:.1f}"),
                      ("graph_us", "CUDA graph us", "{:.1f}"), ("prefill_tok_s", "prefill tok/s", "{:.1f}"),
                      ("weights_gb", "bundle GB", "{:.3f}"), ("compile_s", "compile s", "{:.1f}")])
    for variant in ("int4", "float-experts"):
        spec = spec_of(args, size, variant)
        d = folder_of(args.cache, spec)
        if "build" in phases:
            _build(args, spec, d, stock=False, eager=False)
        if "rows" not in phases:
            continue
        state = _read(d, "build.json")
        r = _row(spec, d, "decode", args, state)
        import aoti_rt

        t.add(variant=args.quantize if variant == "int4" else spec["dtype"], decode_us=r["decode_s"] * 1e6,
              graph_us=r.get("graph_s", 0) * 1e6 or None, prefill_tok_s=spec["prompt_len"] / r["prefill_s"],
              weights_gb=aoti_rt.read_bundle(d / "bundle").manifest.unique_weight_bytes() / common.GB,
              compile_s=state["bundle"]["compile_s"], **r)


def run(args: argparse.Namespace, report: Any) -> None:
    from bench import common

    phases = {"build", "rows"} if args.phase == "all" else {args.phase}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    spec = spec_of(args, args.size)
    d = folder_of(args.cache, spec)
    report.params["cache_folder"] = common.in_cache(d, args.cache)
    if args.experts_compare != "only":
        if "build" in phases:
            _build(args, spec, d, stock=not args.no_stock)
        state = _read(d, "build.json")
        if "bundle" not in state:
            report.notes.append("nothing built yet: run --phase build first")
        else:
            if "rows" in phases:
                _rows(args, spec, d, state, args.rows.split(","))
            _tables(report, spec, d, state, started)
    if args.experts_compare != "no":
        _experts(args, report, phases)


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the size's)")
    p.add_argument("--quantize", choices=("int4", "int8"), default="int4")
    p.add_argument("--group", type=int, default=None, help="int4 group size (default 128; tiny: 32)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens compared with eager")
    p.add_argument("--steps", type=int, default=50, help="decode steps timed (median)")
    p.add_argument("--phase", choices=("build", "rows", "all"), default="all")
    p.add_argument("--rows", default=",".join(ROWS),
                   help="rows to measure now, comma-separated, or 'missing' (those not measured yet); the "
                        "table shows every row in the cache's rows.json, each with its date in the JSON")
    p.add_argument("--no-stock", action="store_true", help="build no stock packages")
    p.add_argument("--compile-jobs", type=int, default=None,
                   help="methods aoti_rt.compile builds at once (default 1; a program of torchao "
                        "weights compiles in this process whatever this says)")
    p.add_argument("--stacks", type=float, default=0, metavar="S",
                   help="every S seconds, a build step prints the Python stack of each of its threads "
                        "(where a long compile spends its time; 0: never)")
    p.add_argument("--retry-stock", action="store_true", help="compile again a stock package that failed")
    p.add_argument("--stock-weights", choices=("so", "blob"), default="so",
                   help="where the stock packages keep their weights: in the .so (torch's default) or a "
                        "binary_blob entry (package_constants_in_so=False)")
    p.add_argument("--experts-compare", nargs="?", const="yes", choices=("no", "yes", "only"), default="no",
                   help="also (yes) or only (only) time int4 experts against experts in the model dtype")
    p.add_argument("--experts-size", choices=tuple(SHAPES), default=None)
    child.add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """Build (once) and measure the LLM rows; see the module's doc. The common options of
    :mod:`bench.common`, with ``--size tiny|medium|full``."""
    from bench import common

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:0 if available, else cpu)")
    p.add_argument("--size", choices=tuple(SHAPES), default=None, help="default: 35b on CUDA, tiny on the CPU")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for the JSON results")
    p.add_argument("--cache", type=Path, default=common._default_cache(),
                   help="directory of the builds, reused across runs (default: $AOTI_RT_BENCH_CACHE or "
                        "~/.cache/aoti_rt/bench)")
    p.add_argument("--repeats", type=int, default=5, help="timed prefills and copies (median / best)")
    _extra(p)
    args = p.parse_args(argv)
    args.device = common._resolve_device(p, args.device)
    args.size = args.size or ("tiny" if args.device == "cpu" else "35b")
    args.cache = args.cache.resolve()
    report = common.Report("bench_llm", common.environment(args.device),
                           {"device": args.device, "size": args.size, "repeats": args.repeats})
    try:
        run(args, report)
    except BaseException as e:   # keep what was measured, then fail
        report.notes.append(f"INCOMPLETE: stopped by {type(e).__name__}: {e}")
        common.log(f"wrote the partial results to {report.emit(args.out)}")
        raise
    common.log(f"wrote {report.emit(args.out)}")
    return 0


if __name__ == "__main__":
    child.run_if_child(_child)
    sys.exit(main())
