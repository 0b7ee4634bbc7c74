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
from ..method_compiler import first_line
from ._deps import require
from .errors import UnsupportedModelError
from .info import LlmInfo, weight_names
from .quant import quantize, quantized_weight
from .source import check_experts_implementation, check_family, check_shims, experts_kernel, resolve_model

#: the shortest prefill: export specialises a dimension of size 0 or 1, so 1 token goes to decode
MIN_PREFILL = 2


class _Say:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {text}", file=sys.stderr, flush=True)


def prepare_model(source: Any, *, quantize_weights: str = "none", group_size: int = 128,
                  packing: str | None = None, device: str = "cpu", dtype: Any = None, seed: int = 0,
                  experts_implementation: str | None = None, low_memory: bool = False,
                  progress: bool = False) -> Any:
    """The model :func:`export_llm` exports: resolved from ``source`` (see
    :func:`~aoti_rt.llm.source.resolve_model`), on ``device``, quantized as asked. Run it
    eagerly with :func:`eager_step` to check a bundle against it.

    ``low_memory`` (a config only): build the random weights on ``device`` one decoder layer at
    a time, quantizing each before the next, so the peak is the quantized model plus one layer
    in full precision (a 35B-parameter MoE fits one 80 GB card); the weights differ from
    ``from_config``'s for the same seed.
    """
    import torch

    from ..device import Device

    device = str(Device.parse(device))       # an unknown or absent device before the model is built
    check_experts_implementation(experts_implementation)
    say = _Say(progress)
    say(f"loading the model ({type(source).__name__})")
    kind = "cpu" if device == "cpu" else "cuda"
    if low_memory:
        model = build_low_memory(source, device=device, dtype=dtype, seed=seed,
                                 experts_implementation=experts_implementation,
                                 quantize_layer=lambda m, dt: quantize(m, quantize_weights, kind, group_size,
                                                                       packing, dtype=dt), say=say)
    else:
        model = resolve_model(source, dtype=dtype, seed=seed, experts_implementation=experts_implementation)
        done = quantized_weight(model) if quantize_weights != "none" else None
        if done is not None:         # quantize skips quantized weights: the bundle would not be what it says
            raise OptionError(f"the model is quantized already ({done}); quantize_weights={quantize_weights!r} "
                              f"quantizes a model in place, once: pass a freshly loaded model, or "
                              f"quantize_weights='none' to export it as it is")
        model.to(device)
        if quantize_weights != "none":
            say(f"quantizing weights to {quantize_weights} (torchao; MoE experts: aoti_rt.llm.experts)")
        quantize(model, quantize_weights, kind, group_size, packing)
    # only experts left in full precision call transformers' experts kernel (quantized ones are ours)
    check_shims(experts_kernel(model), device, torch.__version__)
    return model


def build_low_memory(config: Any, *, device: str, dtype: Any, seed: int, experts_implementation: str | None,
                     quantize_layer: Any, say: Any = None) -> Any:
    """A model of ``config`` with random weights built on ``device`` a module at a time (each
    decoder layer quantized by ``quantize_layer(module, dtype)`` before the next is made)."""
    import torch

    transformers = require("transformers")
    if not isinstance(config, transformers.PretrainedConfig):
        raise OptionError(f"low_memory builds random weights from a PretrainedConfig, not {type(config).__name__}")
    check_family(config)
    dtype = dtype or torch.float32
    kwargs = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    model.eval().requires_grad_(False)
    torch.manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    blocks = list(layers[0]) if layers else []
    for i, block in enumerate(blocks):
        _materialize(model, block, device)
        quantize_layer(block, dtype)
        if say is not None and (i % 8 == 0 or i == len(blocks) - 1):
            say(f"built layer {i + 1}/{len(blocks)}")
    for name, m in model.named_modules():         # the rest: embeddings, final norm, lm_head, rotary
        if any(p.is_meta for p in m.parameters(recurse=False)) or any(b.is_meta for b in m.buffers(recurse=False)):
            if name.endswith("rotary_emb"):
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, type(m)(m.config).to(device))
            else:
                _materialize(model, m, device, recurse=False)
    if model.config.get_text_config().tie_word_embeddings:
        model.tie_weights()
    quantize_layer(model, dtype)                 # the rest: quantize skips what is already quantized
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise UnsupportedModelError(f"low_memory could not build {', '.join(left[:3])} of this {check_family(config)} "
                                    f"model; export it without low_memory")
    return model


def _materialize(model: Any, module: Any, device: str, recurse: bool = True) -> None:
    """Give ``module``'s meta tensors memory on ``device`` and transformers' own random init."""
    module.to_empty(device=device, recurse=recurse)
    for m in (module.modules() if recurse else [module]):
        model._init_weights(m)


def export_programs(model: Any, *, max_seq_len: int, max_prefill: int | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """``{"prefill": ..., "decode": ...}``: the ``torch.export`` programs of ``model`` (from
    :func:`prepare_model`) in transformers' export wrapper with a static KV cache of
    ``max_seq_len``, ``prefill`` taking ``T`` from :data:`MIN_PREFILL` to ``max_prefill``.
    :func:`aoti_rt.compile` takes them; so does ``torch._inductor.aoti_compile_and_package``,
    one at a time.

    Raises:
        OptionError: a size it does not take. CompileError: ``torch.export`` failed.
    """
    return _export(model, max_seq_len, max_prefill, progress)[0]


def _export(model: Any, max_seq_len: int, max_prefill: int | None, progress: bool) -> tuple[dict[str, Any], Any]:
    """The programs, and the export wrapper (the model and its KV cache)."""
    import torch

    max_prefill = _check_sizes(max_seq_len, max_prefill)
    say = _Say(progress)
    model_type = check_family(model.config)
    device = model.device
    wrapper = _static_cache_wrapper(model, max_seq_len)
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
        kernel = experts_kernel(model)
        hint = f"try another experts_implementation than {kernel!r}, or " if kernel else ""
        raise CompileError(f"torch.export of the {model_type} model failed ({type(e).__name__}: "
                           f"{first_line(e)[:300]}); {hint}report the model") from e
    return programs, wrapper


def _static_cache_wrapper(model: Any, max_seq_len: int) -> Any:
    """transformers' export wrapper of ``model`` with a static KV cache of ``max_seq_len``. The
    cache is turned on in the config too: checkpoints saved after training often have
    ``use_cache: false``, which the wrapper refuses."""
    executorch = require("transformers.integrations.executorch")
    model.config.get_text_config().use_cache = True
    gen = model.generation_config
    gen.use_cache = True
    gen.cache_implementation = "static"
    return executorch.TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_seq_len,
                                                            device=model.device)


def _check_sizes(max_seq_len: Any, max_prefill: Any) -> int:
    if not isinstance(max_seq_len, int) or max_seq_len < MIN_PREFILL + 1:
        raise OptionError(f"max_seq_len must be an int of at least {MIN_PREFILL + 1}, not {max_seq_len!r}")
    max_prefill = max_seq_len if max_prefill is None else max_prefill
    # prefill's length is a dynamic dimension from MIN_PREFILL, which needs a larger maximum
    if not isinstance(max_prefill, int) or not MIN_PREFILL < max_prefill <= max_seq_len:
        raise OptionError(f"max_prefill must be an int from {MIN_PREFILL + 1} to max_seq_len ({max_seq_len}), "
                          f"not {max_prefill!r}")
    return max_prefill


def export_llm(source: Any, path: str | os.PathLike[str], *, max_seq_len: int = 256,
               max_prefill: int | None = None, quantize_weights: str = "none", group_size: int = 128,
               packing: str | None = None, device: str = "cpu", dtype: Any = None, seed: int = 0,
               experts_implementation: str | None = None, low_memory: bool = False, overwrite: bool = False,
               progress: bool = True, inductor_configs: Mapping[str, Any] | None = None) -> Path:
    """Export a transformers causal LM into a prefill/decode bundle at ``path``.

    Args:
        source: a loaded ``PreTrainedModel`` (quantized in place if ``quantize_weights`` asks),
            a checkpoint directory, or a ``PretrainedConfig`` (random weights from ``seed``).
            Llama, Qwen3 and Qwen3-MoE families.
        path: the bundle directory (as :func:`aoti_rt.compile` takes it).
        max_seq_len: the KV cache's length: prompt plus generated tokens.
        max_prefill: the longest prefill call (default ``max_seq_len``); longer prompts are
            prefilled in chunks by :meth:`LLM.generate`.
        quantize_weights: "none", "int8" or "int4" weight-only: linear layers with torchao, in
            the packing the device's kernels need (:mod:`aoti_rt.llm.quant`); fused MoE experts
            with :mod:`aoti_rt.llm.experts`.
        group_size: int4 group size (32, 64, 128, 256); a layer whose input size it does not
            divide stays unquantized.
        packing: the int4 packing of linear layers (default: the device's first in
            :mod:`aoti_rt.llm.quant`).
        device: "cpu" or "cuda[:N]": where the model is exported and the bundle runs.
        dtype: weights dtype for a directory or config (default: checkpoint's, or float32).
        seed: random weights' seed (a config only).
        experts_implementation: transformers' MoE experts implementation (``"batched_mm"``,
            ``"grouped_mm"``, ``"eager"``; default transformers' choice) for experts that stay
            in full precision.
        low_memory: a config's random weights built a layer at a time (see :func:`prepare_model`).
        overwrite: replace an existing bundle.
        progress: print each phase with its time on stderr, and aoti_rt.compile's progress bar.
        inductor_configs: passed to :func:`aoti_rt.compile`.

    Returns:
        The bundle directory; its ``llm.json`` is read by :func:`aoti_rt.llm.load_llm`.

    Raises:
        UnsupportedModelError: not a covered family. MissingExtraError: transformers or
        torchao missing. OptionError: a size or quantization option it does not take.
        NoShimError: an op AOTInductor cannot compile for the device on this torch.
        DeviceError: ``device`` is not a device name, or not on this machine.
        CompileError: export or compile failed (see :func:`aoti_rt.compile`).
    """
    import aoti_rt
    from aoti_rt.compiler import check_target

    max_prefill = _check_sizes(max_seq_len, max_prefill)
    check_target(path, overwrite)                 # before minutes of loading and exporting
    say = _Say(progress)
    model = prepare_model(source, quantize_weights=quantize_weights, group_size=group_size, packing=packing,
                          device=device, dtype=dtype, seed=seed, experts_implementation=experts_implementation,
                          low_memory=low_memory, progress=progress)
    programs, wrapper = _export(model, max_seq_len, max_prefill, progress)
    say("compiling prefill and decode with AOTInductor (aoti_rt.compile)")
    existed = Path(path).exists()
    out = aoti_rt.compile(programs, path, device=device, overwrite=overwrite, progress=progress,
                          inductor_configs=inductor_configs)
    try:
        _describe(out, model, max_seq_len, max_prefill, quantize_weights, group_size, packing)
    except BaseException:
        if not existed:                  # a bundle without its llm.json is not one load_llm takes
            shutil.rmtree(out, ignore_errors=True)
        raise
    warn_if_inflated(out, state_bytes(wrapper), inductor_configs)
    say(f"wrote {out}")
    return out


def write_info(bundle: str | os.PathLike[str], model: Any, *, max_seq_len: int, max_prefill: int | None = None,
               quantize_weights: str = "none", group_size: int = 128, packing: str | None = None) -> None:
    """Write ``llm.json`` into ``bundle``, compiled by :func:`aoti_rt.compile` from
    :func:`export_programs` of ``model`` (from :func:`prepare_model` with the same options),
    as :func:`export_llm` does, so :func:`aoti_rt.llm.load_llm` takes it.

    Raises:
        OptionError: a size it does not take. BundleError: ``bundle`` is not a bundle.
    """
    _describe(Path(bundle), model, max_seq_len, _check_sizes(max_seq_len, max_prefill), quantize_weights,
              group_size, packing)


def _describe(out: Path, model: Any, max_seq_len: int, max_prefill: int, quantize_weights: str, group_size: int,
              packing: str | None) -> None:
    """Write the bundle's ``llm.json``."""
    import aoti_rt

    model_type = check_family(model.config)
    gen = model.generation_config
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

    wrapper = _static_cache_wrapper(model, max_seq_len).model

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
