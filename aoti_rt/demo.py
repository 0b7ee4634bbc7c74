"""The demo: a tiny decoder-only LM with ``prefill`` and ``decode`` methods.

It has what makes multi-method serving interesting: an embedding, attention + MLP blocks, a
KV cache written in place by both methods, and an LM head tied to the embedding. The demo
compiles it once (cached per torch version and device), loads both methods with one copy of
each weight, generates tokens greedily, checks them against eager PyTorch and prints the
memory report.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

DEMO_VERSION = 3


class Block(nn.Module):
    """Pre-norm attention + MLP; writes its keys and values into the shared KV cache."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x, positions, k_cache, v_cache):
        t, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(self.norm1(x)).view(t, 3, self.heads, hd).unbind(1)
        k_cache.index_copy_(0, positions, k)
        v_cache.index_copy_(0, positions, v)
        keys = torch.arange(k_cache.shape[0], device=x.device)
        mask = keys[None, :] <= positions[:, None]                      # [t, max_seq]
        scores = torch.einsum("thd,shd->hts", q, k_cache) / hd ** 0.5
        scores = scores.masked_fill(~mask[None], float("-inf"))
        att = torch.einsum("hts,shd->thd", scores.softmax(-1), v_cache).reshape(t, d)
        x = x + self.proj(att)
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 512, dim: int = 128, layers: int = 4, heads: int = 4,
                 max_seq: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight                         # tied
        hd = dim // heads
        self.register_buffer("k_cache", torch.zeros(layers, max_seq, heads, hd))
        self.register_buffer("v_cache", torch.zeros(layers, max_seq, heads, hd))

    def step(self, tokens, positions):
        x = self.embed(tokens)
        for i, blk in enumerate(self.blocks):
            x = blk(x, positions, self.k_cache[i], self.v_cache[i])
        return self.lm_head(self.norm(x))


class Prefill(nn.Module):
    """``prefill(tokens[T]) -> logits[T, vocab]``: fills cache positions 0..T-1."""

    def __init__(self, lm: TinyLM):
        super().__init__()
        self.lm = lm

    def forward(self, tokens):
        return self.lm.step(tokens, torch.arange(tokens.shape[0], device=tokens.device))


class Decode(nn.Module):
    """``decode(token[1], pos[1]) -> logits[1, vocab]``: attends to the cache up to ``pos``."""

    def __init__(self, lm: TinyLM):
        super().__init__()
        self.lm = lm

    def forward(self, token, pos):
        return self.lm.step(token, pos)


def make_model(device: str, seed: int = 0) -> TinyLM:
    """The demo model, with weights that depend only on the seed."""
    torch.manual_seed(seed)
    lm = TinyLM()
    nn.init.normal_(lm.embed.weight, std=0.02)   # GPT-2's init: the blocks, not the tie, decide
    return lm.to(device).eval()


def export_methods(lm: TinyLM, prompt_len: int = 8) -> dict:
    from aoti_rt.method_compiler import quiet_torch_deprecations

    dev = lm.embed.weight.device
    tokens = torch.zeros(prompt_len, dtype=torch.long, device=dev)
    one = torch.zeros(1, dtype=torch.long, device=dev)
    with torch.no_grad(), quiet_torch_deprecations():
        return {"prefill": torch.export.export(Prefill(lm), (tokens,)),
                "decode": torch.export.export(Decode(lm), (one, one.clone()))}


def cache_dir() -> Path:
    base = Path(os.environ.get("AOTI_RT_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aoti_rt"))
    return base / "demo"


def demo_bundle(device: str, *, progress: bool = True, rebuild: bool = False) -> Path:
    """Compile the demo once per torch version and device type; return the bundle path."""
    import aoti_rt

    kind = "cpu" if device == "cpu" else "cuda"
    path = cache_dir() / f"tinylm-v{DEMO_VERSION}-torch{torch.__version__}-{kind}"
    if (path / "manifest.json").is_file() and not rebuild:
        try:
            aoti_rt.read_bundle(path)
            return path
        except aoti_rt.BundleError as e:     # an older bundle format, or a damaged cache
            print(f"recompiling the cached demo bundle: {e}")
    print(f"compiling the demo model for {kind} into {path} (once; ~20-60 s a method)")
    lm = make_model(device)
    return aoti_rt.compile(export_methods(lm), path, overwrite=True, progress=progress)


def generate(prefill, decode, prompt: torch.Tensor, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation: one prefill, then ``n - 1`` decode steps."""
    logits = prefill(prompt)
    tok = logits[-1].argmax()
    out, all_logits = [int(tok)], [logits[-1]]
    pos = prompt.shape[0]
    for _ in range(n - 1):
        step = decode(tok.view(1), torch.tensor([pos], device=prompt.device))
        tok = step[-1].argmax()
        out.append(int(tok))
        all_logits.append(step[-1])
        pos += 1
    return out, all_logits


def run(device: str | None = None, tokens: int = 16, rebuild: bool = False) -> int:
    """The demo job; returns a process exit code (0: outputs match eager)."""
    import aoti_rt
    from aoti_rt.bundle import human_bytes
    from aoti_rt.memory import memory_report

    dev = device or ("cuda" if aoti_rt.cuda_available() else "cpu")
    dev = "cuda:0" if dev == "cuda" else dev
    path = demo_bundle(dev, rebuild=rebuild)
    prompt = torch.arange(1, 9, device=dev)
    tokens = max(1, min(tokens, 64 - prompt.shape[0]))
    t0 = time.perf_counter()
    with aoti_rt.load(path, device=dev) as model:
        load_s = time.perf_counter() - t0
        with torch.no_grad():
            got, got_logits = generate(model.prefill, model.decode, prompt, tokens)
            lm = make_model(dev)
            want, want_logits = generate(Prefill(lm), Decode(lm), prompt, tokens)
        err = max(float((a - b).abs().max()) for a, b in zip(got_logits, want_logits))
        man = model.manifest
        report = memory_report(dev)
        per_method = sum(man.per_method_bytes(m) for m in model.methods)
        print(f"model    {path.name}: methods {model.methods}, loaded in {load_s * 1e3:.1f} ms on {dev}")
        print(f"aoti_rt  {got}")
        print(f"eager    {want}")
        print(f"match    {'yes' if got == want else 'NO'} (max |logit diff| {err:.2e})")
        print(f"weights  unique {human_bytes(man.unique_weight_bytes())}, allocated "
              f"{human_bytes(report.bytes_allocated)}, per-method loading would hold "
              f"{human_bytes(per_method)} ({per_method / max(1, man.unique_weight_bytes()):.2f}x)")
        print(report.line())
    return 0 if got == want and err < 1e-3 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aoti_rt demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument("--rebuild", action="store_true", help="recompile the cached demo bundle")
    a = p.parse_args(argv)
    return run(a.device, a.tokens, a.rebuild)
