"""From a transformers causal LM to an aoti_rt bundle with ``prefill`` and ``decode`` methods.

Both methods are exports of one transformers export wrapper
(``TorchExportableModuleForDecoderOnlyLM``: the model and a static KV cache registered as its
buffers), so the bundle holds the weights once and the KV cache once, as instance state that
``prefill`` writes and ``decode`` reads. ``prefill(input_ids[1, T], cache_position[T])`` takes
a dynamic ``T`` in ``[min_prefill, max_prefill]``; ``decode`` the same with ``T = 1``. Both
return logits ``[1, T, vocab]``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

from ..errors import CompileError, OptionError
from ._deps import require
from .info import LlmInfo, weight_names
from .quant import quantize
from .source import check_family, check_shims, resolve_model

#: the shortest prefill: export specialises a dimension of size 0 or 1, so 1 token goes to decode
MIN_PREFILL = 2


class _Say:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {text}", file=sys.stderr, flush=True)


def export_llm(source: Any, path: str | os.PathLike[str], *, max_seq_len: int = 256,
               max_prefill: int | None = None, quantize_weights: str = "none", group_size: int = 128,
               packing: str | None = None, device: str = "cpu", dtype: Any = None, seed: int = 0,
               experts_implementation: str | None = None, overwrite: bool = False, progress: bool = True,
               inductor_configs: Mapping[str, Any] | None = None) -> Path:
    """Export a transformers causal LM into a prefill/decode bundle at ``path``.

    Args:
        source: a loaded ``PreTrainedModel`` (quantized in place if ``quantize_weights`` asks),
            a checkpoint directory, or a ``PretrainedConfig`` (random weights from ``seed``).
            Llama, Qwen3 and Qwen3-MoE families.
        path: the bundle directory (as :func:`aoti_rt.compile` takes it).
        max_seq_len: the KV cache's length: prompt plus generated tokens.
        max_prefill: the longest prefill call (default ``max_seq_len``); longer prompts are
            prefilled in chunks by :meth:`LLM.generate`.
        quantize_weights: "none", "int8" or "int4" weight-only (torchao, the packing the
            device's kernels need: :mod:`aoti_rt.llm.quant`).
        group_size: int4 group size (32, 64, 128, 256); a linear layer whose input size it does
            not divide stays unquantized.
        packing: the int4 packing (default: the device's first in :mod:`aoti_rt.llm.quant`).
        device: "cpu" or "cuda[:N]": where the model is exported and the bundle runs.
        dtype: weights dtype for a directory or config (default: checkpoint's, or float32).
        seed: random weights' seed (a config only).
        experts_implementation: transformers' MoE experts implementation (``"batched_mm"``,
            ``"grouped_mm"``, ``"eager"``; default transformers' choice).
        overwrite: replace an existing bundle.
        progress: print each phase with its time on stderr, and aoti_rt.compile's progress bar.
        inductor_configs: passed to :func:`aoti_rt.compile`.

    Returns:
        The bundle directory; its ``llm.json`` is read by :func:`aoti_rt.llm.load_llm`.

    Raises:
        UnsupportedModelError: not a covered family. MissingExtraError: transformers or
        torchao missing. OptionError: a size or quantization option it does not take.
        CompileError: export or compile failed (see :func:`aoti_rt.compile`).
    """
    import torch

    import aoti_rt

    if not isinstance(max_seq_len, int) or max_seq_len < MIN_PREFILL + 1:
        raise OptionError(f"max_seq_len must be an int of at least {MIN_PREFILL + 1}, not {max_seq_len!r}")
    max_prefill = max_seq_len if max_prefill is None else max_prefill
    if not isinstance(max_prefill, int) or not MIN_PREFILL <= max_prefill <= max_seq_len:
        raise OptionError(f"max_prefill must be an int from {MIN_PREFILL} to max_seq_len ({max_seq_len}), "
                          f"not {max_prefill!r}")
    say = _Say(progress)
    executorch = require("transformers.integrations.executorch")
    say(f"loading the model ({type(source).__name__})")
    model = resolve_model(source, dtype=dtype, seed=seed, experts_implementation=experts_implementation)
    model_type = check_family(model.config)
    check_shims(getattr(model.config.get_text_config(), "_experts_implementation", None), device,
                torch.__version__)
    model.to(device)
    if quantize_weights != "none":
        say(f"quantizing linear weights to {quantize_weights} (torchao)")
    quantize(model, quantize_weights, "cpu" if device == "cpu" else "cuda", group_size, packing)
    gen = model.generation_config
    gen.use_cache = True
    gen.cache_implementation = "static"
    wrapper = executorch.TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_seq_len,
                                                               device=torch.device(device))
    n = min(max(MIN_PREFILL, 4), max_prefill)
    ids = torch.zeros(1, n, dtype=torch.long, device=device)
    length = torch.export.Dim("prefill_len", min=MIN_PREFILL, max=max_prefill)
    programs = {}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # dynamo names transformers' global output collectors as side effects of forward: noise
            warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
            say(f"exporting prefill (input_ids [1, T], T from {MIN_PREFILL} to {max_prefill})")
            programs["prefill"] = wrapper.export(input_ids=ids, cache_position=torch.arange(n, device=device),
                                                 dynamic_shapes={"input_ids": {1: length},
                                                                 "cache_position": {0: length}}, strict=True)
            say("exporting decode ([1, 1])")
            programs["decode"] = wrapper.export(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
                                                cache_position=torch.zeros(1, dtype=torch.long, device=device),
                                                strict=True)
    except Exception as e:  # noqa: BLE001 - torch.export raises many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CompileError(f"torch.export of the {model_type} model failed ({type(e).__name__}: {first[:300]}); "
                           f"try another experts_implementation for a MoE model, or report the model") from e
    say("compiling prefill and decode with AOTInductor (aoti_rt.compile)")
    existed = Path(path).exists()
    out = aoti_rt.compile(programs, path, device=device, overwrite=overwrite, progress=progress,
                          inductor_configs=inductor_configs)
    try:
        _describe(out, model, model_type, gen, max_seq_len, max_prefill, quantize_weights, group_size, packing)
    except BaseException:
        if not existed:                  # a bundle without its llm.json is not one load_llm takes
            shutil.rmtree(out, ignore_errors=True)
        raise
    warn_if_inflated(out, state_bytes(wrapper), inductor_configs)
    say(f"wrote {out}")
    return out


def _describe(out: Path, model: Any, model_type: str, gen: Any, max_seq_len: int, max_prefill: int,
              quantize_weights: str, group_size: int, packing: str | None) -> None:
    """Write the bundle's ``llm.json``."""
    import aoti_rt

    bound = {c.fqn for m in aoti_rt.read_bundle(out).manifest.methods.values() for c in m.constants}
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
    eos_ids = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(t) for t in eos]
    info = LlmInfo(model_type=model_type, max_seq_len=max_seq_len, max_prefill=max_prefill,
                   min_prefill=MIN_PREFILL, vocab_size=int(model.config.get_text_config().vocab_size),
                   dtype=str(model.dtype).removeprefix("torch."), quantize=quantize_weights,
                   group_size=group_size, packing=packing, eos_token_ids=eos_ids,
                   weights=weight_names(model, bound))
    info.write(out)


def eager_step(model: Any, max_seq_len: int) -> Any:
    """The eager counterpart of a bundle's methods: ``step(input_ids, cache_position) -> logits``
    over ``model`` (already quantized as the bundle's) with its own static cache, for checking a
    bundle against eager PyTorch with :func:`aoti_rt.llm.generate.generate_tokens`."""
    import torch

    executorch = require("transformers.integrations.executorch")
    gen = model.generation_config
    gen.use_cache = True
    gen.cache_implementation = "static"
    wrapper = executorch.TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_seq_len,
                                                               device=model.device).model

    def step(input_ids, cache_position):
        with torch.no_grad():
            return wrapper(input_ids=input_ids, cache_position=cache_position)
    return step


def state_bytes(module: Any) -> int:
    """Bytes of one copy of ``module``'s parameters and buffers, a quantized tensor counted by its
    parts (``__tensor_flatten__``), each storage once."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        flatten = getattr(type(t), "__tensor_flatten__", None)
        if flatten is not None:
            for attr in flatten(t)[0]:
                add(getattr(t, attr))
            return
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for _, t in list(module.named_parameters()) + list(module.named_buffers()):
        add(t)
    return sum(seen.values())


#: how far a bundle's weights may outgrow the exported state before :func:`export_llm` warns
INFLATION_WARN = 1.05


def warn_if_inflated(bundle: str | os.PathLike[str], state: int,
                     inductor_configs: Mapping[str, Any] | None = None) -> bool:
    """Warn (RuntimeWarning) when ``bundle``'s weights outgrow ``state``, the bytes of the state
    it was exported from (:func:`state_bytes`), by more than :data:`INFLATION_WARN`: inductor
    folded quantized weights into full-precision constants (``freezing``), one copy still, but of
    larger ones. Returns whether it warned."""
    import warnings

    import aoti_rt
    from aoti_rt.bundle import human_bytes

    held = aoti_rt.read_bundle(bundle).manifest.unique_weight_bytes()
    if held <= INFLATION_WARN * state:
        return False
    frozen = bool((inductor_configs or {}).get("freezing"))
    why = ("inductor_configs sets freezing=True, which folds the dequantization into full-precision "
           "constants; compile without it" if frozen else
           "inductor folded constants into larger ones; check inductor_configs (freezing, constant folding)")
    warnings.warn(f"the bundle's weights are {human_bytes(held)}, {held / state:.2f}x the exported model's "
                  f"{human_bytes(state)}: {why}", RuntimeWarning, stacklevel=3)
    return True
