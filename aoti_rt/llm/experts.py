"""transformers' fused MoE experts with weight-only int8 or int4 weights: :class:`QuantizedExperts`.

transformers 5 holds a MoE layer's experts as two 3-D parameters, ``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (Qwen3-MoE's ``Qwen3MoeExperts`` and its kin),
which torchao's ``quantize_`` on ``nn.Linear`` does not reach. :func:`quantize_experts` puts a
:class:`QuantizedExperts` in each such module's place. Its weights are quantized symmetrically
with torchao's quantization primitives (int8: one scale per row; int4: one scale per
``group_size`` inputs, two values a byte) and its forward compiles to plain AOTInductor kernels
on every device, so no C shim is needed:

- one token (decode): the ``k`` routed experts' quantized bytes are multiplied with the token
  in one fused reduction per projection (gather, nibble unpacking and group scales pointwise
  inside it): they are read once, unrouted experts not at all, and nothing full precision is
  written;
- several tokens (prefill): every expert is dequantized and applied to every token with one
  batched matmul per projection, weighted by the routing (0 where a token is not routed):
  tensor-core matmuls at ``E / k`` times the routed FLOPs, with a graph a few nodes a layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import OptionError
from ._deps import require

#: the fused experts' parameters, [E, out, in] each
PROJECTIONS = ("gate_up_proj", "down_proj")


@dataclass
class QuantizedWeight:
    """One 3-D experts weight, quantized: ``qdata`` (int8 ``[E, N, K]``, or for int4 uint8
    ``[E, N, K/2]``, the even input first in the low nibble, each value stored plus 8) and
    ``scale`` (``[E, N, K / group]``, the weight's dtype)."""

    qdata: torch.Tensor
    scale: torch.Tensor


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' fused experts (3-D ``gate_up_proj`` and ``down_proj``)."""
    return all(isinstance(getattr(module, p, None), torch.Tensor) and getattr(module, p).dim() == 3
               for p in PROJECTIONS) and hasattr(module, "act_fn")


def quantize_weight(w: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Quantize a 3-D ``[E, N, K]`` weight: symmetric, per row (``bits=8``) or per group of
    ``group_size`` inputs (``bits=4``), with torchao's ``choose_qparams_affine`` and
    ``quantize_affine``."""
    qp = require("torchao.quantization.quant_primitives")
    E, N, K = w.shape
    group = K if bits == 8 else group_size
    lo, hi = (-128, 127) if bits == 8 else (-8, 7)
    block = (1, 1, group)
    scale, zero = qp.choose_qparams_affine(w, qp.MappingType.SYMMETRIC, block, torch.int8, quant_min=lo,
                                        quant_max=hi, eps=torch.finfo(torch.float32).eps,
                                        scale_dtype=w.dtype, zero_point_dtype=torch.int8)
    q = qp.quantize_affine(w, block, scale, zero, torch.int8, quant_min=lo, quant_max=hi)
    scale = scale.reshape(E, N, K // group)
    if bits == 8:
        return QuantizedWeight(q.contiguous(), scale.contiguous())
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return QuantizedWeight((u[..., 0::2] | (u[..., 1::2] << 4)).contiguous(), scale.contiguous())


def nibbles(qdata: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 values of ``qdata`` (uint8, two a byte) as int8: the even inputs', the odd ones'."""
    return (qdata & 15).to(torch.int8) - 8, (qdata >> 4).to(torch.int8) - 8


def dequantize(qdata: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The full-precision weight of ``qdata`` and ``scale`` (any leading experts dims)."""
    if bits == 4:
        q = torch.stack(nibbles(qdata), dim=-1).reshape(*qdata.shape[:-1], qdata.shape[-1] * 2)
    else:
        q = qdata
    groups = scale.shape[-1]
    g = q.reshape(*q.shape[:-1], groups, q.shape[-1] // groups)
    return (g.to(dtype) * scale.to(dtype)[..., None]).reshape(q.shape)


class QuantizedExperts(nn.Module):
    """A drop-in for transformers' fused experts, ``forward(hidden_states[T, H],
    top_k_index[T, k], top_k_weights[T, k]) -> [T, H]``, with quantized weights held as
    ``gate_up_proj_qdata``, ``gate_up_proj_scale``, ``down_proj_qdata``, ``down_proj_scale``."""

    def __init__(self, experts: nn.Module, bits: int, group_size: int):
        super().__init__()
        if bits not in (4, 8):
            raise OptionError(f"bits must be 4 or 8, not {bits}")
        self.bits = bits
        self.act_fn = experts.act_fn
        self.num_experts = int(experts.gate_up_proj.shape[0])
        for name in PROJECTIONS:
            qw = quantize_weight(getattr(experts, name).detach(), bits, group_size)
            self.register_parameter(f"{name}_qdata", nn.Parameter(qw.qdata, requires_grad=False))
            self.register_parameter(f"{name}_scale", nn.Parameter(qw.scale, requires_grad=False))

    def _weight(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Every expert's ``name`` weight, dequantized to ``dtype``."""
        return dequantize(getattr(self, f"{name}_qdata"), getattr(self, f"{name}_scale"), self.bits, dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[0] == 1:
            return self._routed(hidden_states, top_k_index[0], top_k_weights[0])
        return self._dense(hidden_states, top_k_index, top_k_weights)

    def _routed(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        gate_up = self._dot("gate_up_proj", idx, x[0])                          # [k, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        h = self.act_fn(gate) * up                                             # [k, I]
        y = self._dot("down_proj", idx, h[:, None, :])                         # [k, H]
        return (y * w[:, None].to(y.dtype)).sum(0, keepdim=True).to(x.dtype)

    def _dot(self, name: str, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``W[idx] @ x`` for the routed experts ``idx`` without a dequantized copy: the nibbles
        (int4) are multiplied with the even and odd inputs and each group's sum scaled, all
        pointwise into one reduction, so the compiled kernel reads the quantized bytes once.
        ``x``: ``[K]``, or ``[k, 1, K]`` (one input per routed expert)."""
        q = getattr(self, f"{name}_qdata")[idx]                                # [k, N, K'] (K' = K/2 for int4)
        s = getattr(self, f"{name}_scale")[idx]                                # [k, N, groups]
        if self.bits == 4:
            pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
            even, odd = nibbles(q)
            v = even.to(x.dtype) * pairs[..., 0] + odd.to(x.dtype) * pairs[..., 1]
        else:
            v = q.to(x.dtype) * x
        groups = s.shape[-1]
        v = v.reshape(*v.shape[:-1], groups, v.shape[-1] // groups)
        return (v * s.to(x.dtype)[..., None]).sum((-2, -1))

    def _dense(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        route = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
        route = route.scatter_add(1, idx, w.to(x.dtype))                       # [T, E]
        gate_up = torch.matmul(x, self._weight("gate_up_proj", x.dtype).transpose(1, 2))  # [E, T, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        h = self.act_fn(gate) * up                                             # [E, T, I]
        y = torch.matmul(h, self._weight("down_proj", x.dtype).transpose(1, 2))  # [E, T, H]
        return (y * route.t()[:, :, None]).sum(0)

    def parts(self, prefix: str) -> Iterator[tuple[str, dict[str, str]]]:
        """For each projection, the user's model's name (``prefix.gate_up_proj``) and its parts
        (``qdata``, ``scale``) as this module's parameter names under ``prefix``."""
        for name in PROJECTIONS:
            yield f"{prefix}.{name}", {"qdata": f"{prefix}.{name}_qdata", "scale": f"{prefix}.{name}_scale"}


def quantize_experts(model: nn.Module, scheme: str, group_size: int) -> int:
    """Put a :class:`QuantizedExperts` in place of each fused experts module of ``model`` whose
    input sizes ``group_size`` divides (int4; any for int8); return how many were replaced."""
    if scheme not in ("int8", "int4"):
        return 0
    bits = 8 if scheme == "int8" else 4
    found = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    done = 0
    for name, m in found:
        if bits == 4 and any(getattr(m, p).shape[-1] % group_size or getattr(m, p).shape[-1] % 2
                             for p in PROJECTIONS):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, QuantizedExperts(m, bits, group_size))
        done += 1
    return done


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """``(name, module)`` for each :class:`QuantizedExperts` in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, QuantizedExperts):
            yield name, m
