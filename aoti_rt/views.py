"""Cache Buffers as torch tensors: the whole buffer, or one constant's view of it."""

from __future__ import annotations

import warnings

from . import _memory
from .bundle import ConstantSpec


def raw_view(buf: _memory.Buffer):
    """A whole cache Buffer as a uint8 torch tensor on its device (holds the Buffer)."""
    import torch

    if buf.allocator.is_cuda:
        return torch.as_tensor(buf, device=buf.device)
    if buf.read_only:
        with warnings.catch_warnings():       # weights shared read-only: weight() copies them
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(buf, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8)


def buffer_view(buf: _memory.Buffer, c: ConstantSpec):
    """Wrap a cache Buffer as a torch tensor with a constant's view (holds the Buffer)."""
    import torch

    typed = raw_view(buf).view(getattr(torch, c.dtype))
    return typed.as_strided(c.shape, c.stride, c.storage_offset)
