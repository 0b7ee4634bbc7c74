"""Weight-only quantization with torchao's own configs, chosen per device.

``int8``: ``Int8WeightOnlyConfig`` on every device. ``int4``: on the CPU torchao's opaque CPU
packing (``PrototypeInt4WeightOnlyConfig``, ``aten._weight_int4pack_mm_for_cpu``); on CUDA
the tinygemm tile packing (``Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")``,
``aten._weight_int4pack_mm``). Another CUDA packing is one more entry in :data:`CUDA_INT4`.

torchao quantizes ``nn.Linear`` modules; transformers' fused MoE experts (3-D parameters) are
not ``nn.Linear``: :mod:`aoti_rt.llm.experts` quantizes them (same scheme and group size, its
own layout, plain kernels on every device).
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import OptionError
from ._deps import require
from .experts import quantize_experts

SCHEMES = ("none", "int8", "int4")


def _int8(group_size: int) -> Any:
    return require("torchao.quantization").Int8WeightOnlyConfig()


def _int4_cpu(group_size: int) -> Any:
    cfg = require("torchao.prototype.quantization.int4").PrototypeInt4WeightOnlyConfig
    return cfg(group_size=group_size, set_inductor_config=False)


#: weight dtypes a packing's kernels take (absent: any)
NEEDS_DTYPE = {"tile_packed_to_4d": "bfloat16"}


def _int4_cuda_tile(group_size: int) -> Any:
    q = require("torchao.quantization")
    return q.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")


#: int4 packings for CUDA kernels, by name; the first is the default
CUDA_INT4: dict[str, Callable[[int], Any]] = {"tile_packed_to_4d": _int4_cuda_tile}
#: int4 packings for CPU kernels, by name
CPU_INT4: dict[str, Callable[[int], Any]] = {"opaque": _int4_cpu}


def config_for(scheme: str, device: str, group_size: int = 128, packing: str | None = None) -> Any:
    """The torchao config for ``scheme`` ("int8", "int4"; "none" gives None) on ``device``.

    Raises:
        OptionError: an unknown scheme or packing, or a group size that is not a power of two
            from 32 to 256.
    """
    if scheme not in SCHEMES:
        raise OptionError(f"quantize must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    if scheme == "none":
        return None
    if scheme == "int8":
        return _int8(group_size)
    if group_size not in (32, 64, 128, 256):
        raise OptionError(f"int4 group_size must be 32, 64, 128 or 256, not {group_size!r}")
    table = CPU_INT4 if device == "cpu" else CUDA_INT4
    name = packing or next(iter(table))
    if name not in table:
        raise OptionError(f"int4 packing {name!r} is not one for {device}; choose {', '.join(table)}")
    return table[name](group_size)


def _plain_linear(module: Any, fqn: str = "") -> bool:
    """torchao's filter: an ``nn.Linear`` whose weight is not quantized yet (a model built a
    layer at a time is quantized layer by layer, then once whole for the rest)."""
    import torch

    weight = getattr(module, "weight", None)
    return isinstance(module, torch.nn.Linear) and type(weight) in (torch.Tensor, torch.nn.Parameter)


def quantized_weight(model: Any) -> str | None:
    """The name of a weight of ``model`` quantized already (a torchao tensor, or experts of
    :mod:`aoti_rt.llm.experts`), or None."""
    from .experts import quantized_modules

    for name, value in model.named_parameters():
        if getattr(type(value), "__tensor_flatten__", None) is not None:
            return f"{name} ({type(value).__name__})"
    for name, _ in quantized_modules(model):
        return f"{name} (QuantizedExperts)"
    return None


def quantize(model: Any, scheme: str, device: str, group_size: int = 128, packing: str | None = None,
             dtype: Any = None) -> Any:
    """Quantize ``model``'s ``nn.Linear`` weights in place with torchao, and its fused MoE
    experts with :func:`aoti_rt.llm.experts.quantize_experts`; return the torchao config used
    (None for "none"). ``dtype``: the weights' dtype (default ``model.dtype``)."""
    config = config_for(scheme, device, group_size, packing)
    if scheme == "int4" and device != "cpu":
        name = packing or next(iter(CUDA_INT4))
        need = NEEDS_DTYPE.get(name)
        dtype = str(dtype if dtype is not None else getattr(model, "dtype", "")).removeprefix("torch.")
        if need is not None and dtype != need:
            raise OptionError(f"int4 packing {name!r} takes {need} weights, not {dtype}; export with "
                              f"dtype=torch.{need} (--dtype {need})")
    if config is not None:
        require("torchao.quantization").quantize_(model, config, filter_fn=_plain_linear)
        quantize_experts(model, scheme, group_size)
        if quantized_weight(model) is None:   # else llm.json would say int4 of a full-precision model
            import torch

            sizes = sorted({m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)})
            raise OptionError(f"{scheme} with group_size {group_size} quantizes none of the model's weights: "
                              f"it divides none of their input sizes ({', '.join(map(str, sizes[:6]))}); "
                              f"pass a group_size that divides them (--group-size)")
    return config
