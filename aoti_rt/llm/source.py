"""Where the model comes from: a loaded transformers ``PreTrainedModel``, a checkpoint directory,
or a config (random weights); and whether its family is one this path covers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import OptionError
from ..method_compiler import SHIM_SINCE, first_line
from ._deps import require
from .errors import FAMILIES, CheckpointError, NoShimError, UnsupportedModelError, covered
from .experts import is_fused_experts


#: transformers rope types that recompute the rotary table from the sequence length in forward
#: (a data-dependent branch torch.export cannot capture)
RUNTIME_ROPE = {"dynamic": "dynamic NTK scaling"}


def check_family(config: Any) -> str:
    """The config's ``model_type`` if this path covers it and its rope can be exported; else
    :class:`UnsupportedModelError`."""
    text = config.get_text_config()
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"aoti_rt.llm exports {covered()} causal LMs, not model_type "
                                    f"{model_type!r}; export other models with torch.export and aoti_rt.compile")
    rope = getattr(text, "rope_parameters", None) or {}
    kinds = [rope] if "rope_type" in rope else [r for r in rope.values() if isinstance(r, dict)]
    for kind in {r.get("rope_type") for r in kinds} & set(RUNTIME_ROPE):
        raise UnsupportedModelError(f"rope_type {kind!r} ({RUNTIME_ROPE[kind]}) recomputes the rotary table from "
                                    f"the sequence length at run time, which torch.export cannot capture; up to "
                                    f"max_position_embeddings ({getattr(text, 'max_position_embeddings', '?')}) it "
                                    f"equals the default rope: set the config's rope_parameters rope_type to "
                                    f"'default' and export with max_seq_len at most that")
    return model_type


def load_config(path: str | os.PathLike[str]) -> Any:
    """The transformers config of a checkpoint directory (or of a ``config.json``).

    Raises:
        CheckpointError: ``path`` does not exist or holds no config transformers can read.
    """
    transformers = require("transformers")
    if not Path(path).exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint directory or its config.json (a hub "
                              f"model: download it first, e.g. hf download NAME --local-dir DIR)")
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} holds no config transformers can read ({type(e).__name__}: "
                              f"{first_line(e)[:200]}); pass a checkpoint directory with its config.json") from None


def load_tokenizer(name: str | os.PathLike[str]) -> Any:
    """transformers' tokenizer of a checkpoint directory (or hub name).

    Raises:
        CheckpointError: transformers cannot load one from ``name``.
    """
    transformers = require("transformers")
    try:
        return transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"transformers cannot load a tokenizer from {name} ({type(e).__name__}: "
                              f"{first_line(e)[:200]}); pass the checkpoint directory holding its tokenizer "
                              f"files, or --prompt-ids") from None


def resolve_model(source: Any, *, dtype: Any = None, seed: int = 0,
                  experts_implementation: str | None = None) -> Any:
    """A transformers causal LM in eval mode, without gradients, from ``source``.

    Args:
        source: a ``PreTrainedModel`` (used as it is: quantizing it changes it in place), a
            checkpoint directory (``from_pretrained``), or a ``PretrainedConfig`` (random weights
            drawn with ``seed``).
        dtype: the weights' dtype for a directory or config (default: the checkpoint's, or float32).
        seed: the seed of random weights (a config only).
        experts_implementation: transformers' MoE experts implementation (``"batched_mm"``,
            ``"grouped_mm"``, ``"eager"``); default transformers' choice.

    Raises:
        UnsupportedModelError: not a covered family, or not a model, path or config.
        CheckpointError: a path that does not exist, or whose config or weights transformers
            cannot load (a directory with only a config.json: pass its config, ``--config``).
        MissingExtraError: transformers is not installed.
    """
    import torch

    transformers = require("transformers")
    kwargs: dict[str, Any] = {}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    if isinstance(source, transformers.PreTrainedModel):
        check_family(source.config)
        model = source
        if experts_implementation is not None:
            model.set_experts_implementation(experts_implementation)
    elif isinstance(source, transformers.PretrainedConfig):
        check_family(source)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(source, dtype=dtype or torch.float32, **kwargs)
    elif isinstance(source, (str, os.PathLike)):
        check_family(load_config(source))
        if not Path(source).is_dir():
            raise CheckpointError(f"{source} is not a directory; pass the checkpoint directory (config.json and "
                                  f"weights), or its config for random weights (--config)")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto", **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"transformers cannot load the weights of {source} ({type(e).__name__}: "
                                  f"{first_line(e)[:200]}); for random weights from its config.json pass the "
                                  f"config (--config)") from None
    else:
        raise UnsupportedModelError(f"expected a transformers PreTrainedModel, a checkpoint directory or a "
                                    f"PretrainedConfig, not {type(source).__name__} {str(source)[:80]!r}")
    return model.eval().requires_grad_(False)


def check_experts_implementation(name: str | None) -> None:
    """Refuse (:class:`OptionError`) an experts implementation transformers does not register
    (``ALL_EXPERTS_FUNCTIONS``, and ``eager``), before the model is built."""
    if name is None:
        return
    known = ["eager", *require("transformers.integrations.moe").ALL_EXPERTS_FUNCTIONS.valid_keys()]
    if name not in known:
        raise OptionError(f"experts_implementation (--experts) must be one of {', '.join(known)} "
                          f"(transformers' experts kernels), not {name!r}")


#: transformers experts implementations that call an op AOTInductor compiles for CUDA only from
#: a torch release (:data:`aoti_rt.method_compiler.SHIM_SINCE`): implementation -> op
CUDA_SHIMS = {"grouped_mm": "_grouped_mm"}


def _version(text: str) -> tuple[int, int]:
    parts = text.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def experts_kernel(model: Any) -> str | None:
    """The transformers experts implementation ``model`` still calls: its config's, where fused
    MoE experts are left in full precision; None where there are none (a dense model, or experts
    quantized by :mod:`aoti_rt.llm.experts`, whose own forward calls no such kernel)."""
    if not any(is_fused_experts(m) for m in model.modules()):
        return None
    return getattr(model.config.get_text_config(), "_experts_implementation", None)


def check_shims(experts_implementation: str | None, device: str, torch_version: str) -> None:
    """Refuse (:class:`NoShimError`) a model whose experts implementation calls an op without an
    AOTI C shim for ``device`` on ``torch_version``, before a compile that would fail in g++."""
    op = CUDA_SHIMS.get(experts_implementation or "")
    if op is None or not device.startswith("cuda"):
        return
    since, _ = SHIM_SINCE[op]
    if _version(torch_version) < _version(since):
        raise NoShimError(f"experts_implementation={experts_implementation!r} calls aten.{op}, which AOTInductor "
                          f"compiles for CUDA only from torch {since} (this is torch {torch_version}); upgrade "
                          f"torch, export with experts_implementation='batched_mm' (--experts batched_mm), or "
                          f"quantize the experts (int8/int4: aoti_rt.llm.experts)")
