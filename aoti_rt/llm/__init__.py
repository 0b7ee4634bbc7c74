"""Transformers causal LMs as aoti_rt prefill/decode bundles (the ``aoti_rt[llm]`` extra).

>>> from aoti_rt.llm import export_llm, load_llm
>>> export_llm("Qwen/Qwen3-0.6B-checkpoint-dir", "qwen3.aoti", max_seq_len=512, quantize_weights="int4")
>>> with load_llm("qwen3.aoti") as lm:
...     print(lm.generate([151644, 872], max_new_tokens=16).tokens)

Modules: :mod:`~aoti_rt.llm.source` (where the model comes from, which families),
:mod:`~aoti_rt.llm.quant` (torchao configs per device), :mod:`~aoti_rt.llm.experts`
(quantized MoE experts), :mod:`~aoti_rt.llm.export` (the
bundle), :mod:`~aoti_rt.llm.info` (``llm.json``: sizes, stop tokens, weight names),
:mod:`~aoti_rt.llm.generate` (the loaded model and its generation loop),
:mod:`~aoti_rt.llm.cli` (``python -m aoti_rt llm``). transformers and torchao are imported on
first use: without them this package imports, and using it is a :class:`MissingExtraError`.
"""

from __future__ import annotations

from .errors import FAMILIES, CheckpointError, MissingExtraError, NoShimError, UnsupportedModelError
from .export import eager_step, export_llm, export_programs, prepare_model
from .generate import LLM, Generation, generate_tokens, load_llm
from .info import LlmInfo

__all__ = ["export_llm", "prepare_model", "export_programs", "eager_step", "load_llm", "LLM", "Generation", "generate_tokens", "LlmInfo", "FAMILIES",
           "MissingExtraError", "NoShimError", "UnsupportedModelError", "CheckpointError"]
