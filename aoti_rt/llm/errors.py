"""The errors of the LLM path, each an :class:`aoti_rt.AotiRtError` with a one-line message."""

from __future__ import annotations

from ..errors import AotiRtError, NoShimError

#: the transformers ``model_type`` values this path exports, by family
FAMILIES = {"llama": "Llama", "qwen3": "Qwen3", "qwen3_moe": "Qwen3-MoE"}


class MissingExtraError(AotiRtError, ImportError):
    """transformers or torchao (the ``aoti_rt[llm]`` extra) is not installed."""


class UnsupportedModelError(AotiRtError, ValueError):
    """The model is not of a family the LLM path covers (:data:`FAMILIES`)."""


class CheckpointError(AotiRtError, OSError):
    """A checkpoint directory or config that does not exist or that transformers cannot load."""


__all__ = ["FAMILIES", "MissingExtraError", "UnsupportedModelError", "CheckpointError", "NoShimError", "covered"]


def covered() -> str:
    """The covered families, for messages: ``Llama (llama), Qwen3 (qwen3), ...``."""
    return ", ".join(f"{v} ({k})" for k, v in FAMILIES.items())
