"""``python -m aoti_rt llm``: export a transformers causal LM to a bundle, generate from one."""

from __future__ import annotations

import argparse
import sys

from ..errors import AotiRtError, OptionError
from .errors import CheckpointError

DESCRIPTION = """\
Turn a transformers causal LM (Llama, Qwen3, Qwen3-MoE) into an aoti_rt bundle with a prefill
and a decode method that share one copy of the weights and one static KV cache, and generate
tokens from it. Needs the extra: pip install 'aoti_rt[llm]'.

commands:
  export    load a checkpoint directory (or a config, for random weights), quantize its linear
            weights (optional: int8, int4 with the packing the device's kernels need), export
            prefill (dynamic length) and decode with transformers' export wrapper and compile
            both into one bundle; prints each phase with its time
  generate  load a bundle written by export and generate tokens after a prompt (token ids, or
            text with --tokenizer); greedy unless --temperature > 0

examples:
  python -m aoti_rt llm export ./Qwen3-0.6B qwen3.aoti --max-seq-len 512 --quantize int4
  python -m aoti_rt llm export --config ./tiny-config.json tiny.aoti --quantize int8
  python -m aoti_rt llm generate qwen3.aoti --prompt "Hello" --tokenizer ./Qwen3-0.6B -n 32
  python -m aoti_rt llm generate tiny.aoti --prompt-ids 1,2,3 --temperature 0.8 --seed 1
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aoti_rt llm", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    e = sub.add_parser("export", help="export a transformers causal LM into a prefill/decode bundle",
                       description="Export a transformers causal LM into a prefill/decode bundle "
                                   "(aoti_rt.llm.export_llm).")
    e.add_argument("model", nargs="?", help="checkpoint directory (config.json and weights)")
    e.add_argument("bundle", help="bundle directory to write")
    e.add_argument("--config", help="a config.json (or directory holding one): random weights instead of a checkpoint")
    e.add_argument("--seed", type=int, default=0, help="seed of random weights (--config; default 0)")
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the bundle runs (default cpu)")
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: the checkpoint's; float32 for --config)")
    e.add_argument("--max-seq-len", type=int, default=256, help="KV cache length: prompt + new tokens (default 256)")
    e.add_argument("--max-prefill", type=int, default=None,
                   help="longest prefill call (default: --max-seq-len); longer prompts go in chunks")
    e.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                   help="weight-only quantization of the linear layers with torchao (default none)")
    e.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128, 256 (default 128)")
    e.add_argument("--packing", default=None, help="int4 packing (default: the device's; see aoti_rt.llm.quant)")
    e.add_argument("--experts", default=None, help="MoE experts implementation: batched_mm, grouped_mm, eager "
                                                  "(default: transformers' choice)")
    e.add_argument("--low-memory", action="store_true",
                   help="--config: build the random weights on the device a layer at a time, quantizing each "
                        "(peak: the quantized model plus one layer)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    g = sub.add_parser("generate", help="generate tokens from a bundle written by export",
                       description="Generate tokens from a bundle written by 'llm export' (aoti_rt.llm.load_llm).")
    g.add_argument("bundle", help="bundle directory")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    src.add_argument("--prompt", help="prompt text (needs --tokenizer)")
    g.add_argument("--tokenizer", help="tokenizer directory or name for --prompt and for printing text")
    g.add_argument("-n", "--max-new-tokens", type=int, default=32, help="tokens to generate at most (default 32)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    g.add_argument("--seed", type=int, default=None,
                   help="sampling seed: the same seed, the same tokens (default: a fresh one each run)")
    g.add_argument("--stop", default=None, help="comma-separated stop token ids (default: the model's EOS)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the bundle's)")
    return p


def _ids(text: str, option: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise OptionError(f"{option} takes comma-separated token ids, not {text!r}") from None


def _export(a: argparse.Namespace) -> int:
    import torch

    from .export import export_llm
    from .source import load_config

    if (a.model is None) == (a.config is None):
        raise OptionError("give a checkpoint directory or --config (random weights), not both or neither")
    if a.config is not None:
        source = load_config(a.config)
    else:
        source = a.model
    dtype = getattr(torch, a.dtype) if a.dtype else None
    export_llm(source, a.bundle, max_seq_len=a.max_seq_len, max_prefill=a.max_prefill, quantize_weights=a.quantize,
               group_size=a.group_size, packing=a.packing, device=a.device, dtype=dtype, seed=a.seed,
               experts_implementation=a.experts, low_memory=a.low_memory, overwrite=a.overwrite,
               progress=not a.quiet)
    return 0


def _generate(a: argparse.Namespace) -> int:
    from .generate import load_llm
    from .source import load_tokenizer

    tok = None
    if a.tokenizer:
        tok = load_tokenizer(a.tokenizer)
    if a.prompt is not None:
        if tok is None:
            raise OptionError("--prompt needs --tokenizer (or pass --prompt-ids)")
        prompt = tok(a.prompt)["input_ids"]
        if a.prompt and not prompt:
            raise CheckpointError(f"the tokenizer from {a.tokenizer} gives no tokens for the prompt (it knows "
                                  f"{len(tok)}): pass the checkpoint directory holding its tokenizer files")
    else:
        prompt = _ids(a.prompt_ids, "--prompt-ids")
    stop = None if a.stop is None else _ids(a.stop, "--stop")
    with load_llm(a.bundle, device=a.device) as lm:
        out = lm.generate(prompt, max_new_tokens=a.max_new_tokens, stop=stop, temperature=a.temperature,
                          top_k=a.top_k, seed=a.seed)
    print(",".join(map(str, out.tokens)))
    if tok is not None:
        print(tok.decode(out.tokens))
    rate = (len(out.tokens) - 1) / out.decode_s if out.decode_s > 0 and len(out.tokens) > 1 else 0.0
    print(f"{len(out.tokens)} tokens ({out.finish_reason}); prefill {out.prompt_tokens} tokens in "
          f"{out.prefill_s * 1e3:.1f} ms, decode {rate:.1f} tokens/s", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    """Run ``llm export`` or ``llm generate``; an aoti_rt error (a wrong combination of options
    included) is one line on stderr, exit 2, as argparse's usage errors are."""
    p = _parser()
    a = p.parse_args(argv)
    try:
        if a.cmd == "export":
            return _export(a)
        if a.cmd == "generate":
            return _generate(a)
    except AotiRtError as e:
        print(f"aoti_rt llm {a.cmd}: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    p.print_help()
    return 0
