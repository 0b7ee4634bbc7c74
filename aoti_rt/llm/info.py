"""``llm.json``: what a bundle written by :func:`aoti_rt.llm.export_llm` needs besides the
bundle itself: the cache and prefill sizes, the quantization, the stop tokens, and the map from
the user's model's weight names to the bundle's constant FQNs.

The map exists because export names a quantized weight by its parts:
``layers.0.q_proj.weight`` (a torchao tensor) becomes
``...q_proj.parametrizations.weight.original0`` (its ``qdata``), ``...original1`` (its scale),
and so on, in the order the tensor's ``__tensor_flatten__`` gives; and because the export
wrapper puts the model under ``model.``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BundleError
from .experts import quantized_modules

INFO = "llm.json"
FORMAT = "aoti_rt.llm"
VERSION = 1
#: where transformers' export wrapper puts the model (``TorchExportableModuleWithStaticCache.model``)
PREFIX = "model."


@dataclass
class WeightName:
    """One weight of the user's model in the bundle: ``fqn`` for a plain one; ``parts`` (tensor
    attribute, e.g. ``qdata``, -> bundle FQN) for a quantized one."""

    fqn: str = ""
    parts: dict[str, str] = field(default_factory=dict)


@dataclass
class LlmInfo:
    model_type: str
    max_seq_len: int
    max_prefill: int
    min_prefill: int
    vocab_size: int
    dtype: str
    quantize: str = "none"
    group_size: int = 128
    packing: str | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    weights: dict[str, WeightName] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    def write(self, bundle: str | os.PathLike[str]) -> None:
        path = Path(bundle) / INFO
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def read(cls, bundle: str | os.PathLike[str]) -> "LlmInfo":
        """Raises :class:`BundleError` if ``bundle`` has no sound ``llm.json``."""
        path = Path(bundle) / INFO
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT or raw.get("version") != VERSION:
                raise ValueError(f"format {raw.get('format')!r} v{raw.get('version')!r}")
            raw["weights"] = {k: WeightName(**v) for k, v in raw["weights"].items()}
            return cls(**raw)
        except FileNotFoundError:
            raise BundleError(f"{bundle} has no {INFO}: it was not written by aoti_rt.llm.export_llm "
                              f"(python -m aoti_rt llm export); load it with aoti_rt.load instead") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise BundleError(f"{path} is not a sound {FORMAT} v{VERSION} file ({e}); re-export the model "
                              f"with this aoti_rt") from None


def weight_names(model: Any, bound: set[str]) -> dict[str, WeightName]:
    """The map from ``model``'s parameter and buffer names to the bundle FQNs in ``bound`` (the
    constants the compiled methods bind); fused MoE experts quantized by
    :mod:`aoti_rt.llm.experts` by the names the model had before (``...experts.gate_up_proj``);
    each name of a tied weight (``lm_head.weight`` and ``model.embed_tokens.weight``) to the one
    constant the export kept."""
    out: dict[str, WeightName] = {}
    own: set[str] = set()
    for prefix, module in quantized_modules(model):
        for name, parts in module.parts(prefix):
            held = {a: PREFIX + f for a, f in parts.items() if PREFIX + f in bound}
            if held:
                out[name] = WeightName(parts=held)
            own.update(parts.values())
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    # a tied weight (lm_head.weight and the embedding) is one constant, under one of its names
    held_as = {id(value): PREFIX + name for name, value in named if PREFIX + name in bound}
    for name, value in named:
        if name in own:
            continue
        flatten = getattr(type(value), "__tensor_flatten__", None)
        if flatten is not None:
            attrs = flatten(value)[0]
            module, _, leaf = name.rpartition(".")
            base = f"{PREFIX}{module}.parametrizations.{leaf}.original" if module else \
                f"{PREFIX}parametrizations.{leaf}.original"
            parts = {a: f"{base}{i}" for i, a in enumerate(attrs) if f"{base}{i}" in bound}
            if parts:
                out[name] = WeightName(parts=parts)
        elif PREFIX + name in bound:
            out[name] = WeightName(fqn=PREFIX + name)
        elif id(value) in held_as:
            out[name] = WeightName(fqn=held_as[id(value)])
    return out
