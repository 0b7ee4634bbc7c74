"""Cache Buffers as torch tensors (the whole buffer, or one constant's view of it), and the
weights of constants that are views into a larger tensor."""

from __future__ import annotations

import warnings
from pathlib import Path

from . import _memory
from .bundle import ConstantSpec, overlapping_dim
from .digest import file_digests
from .errors import BundleError


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


def padded(n: int) -> int:
    """``n`` bytes as AOTI's ``GetConstantDataSize`` may round them (up to 64)."""
    return -(-max(n, 1) // 64) * 64


def whole_storages(consts: list[tuple[ConstantSpec, int]], hashed: list[tuple[Path, int] | None],
                   what: str) -> list[tuple[ConstantSpec, int]]:
    """Probed constants ``(spec, bytes)`` with each view into a larger tensor made a weight of
    the whole storage; ``hashed``: where each one's bytes lie ((file, offset), None: not in a
    file).

    AOTI stores a constant that is a view (``t[0]``, ``t[0][5:]`` of one tensor) as the whole
    storage, in a slot of ``GetConstantDataSize`` bytes, and binds the view at its offset into
    it; torch's runner reports a storage only as long as the view. Such a constant's weight is
    then the whole slot, hashed where it lies, bound at the view's own offset as AOTI binds it,
    so the views of one storage are one weight: one copy. A view counts as such where it starts
    inside its storage or ends before the .so's padding of it; a constant whose whole slot holds
    the same bytes as such a view's (the tensor itself, next to views of it) joins it. Other
    constants are left as probed.

    Raises:
        BundleError: a slot cannot be read (the package is truncated).
    """
    def slot_digest(i: int) -> str:
        c, (path, offset) = consts[i][0], hashed[i]  # type: ignore[misc]
        try:
            return file_digests(path, [(offset, c.data_size)])[0]
        except OSError as e:
            raise BundleError(f"{what}: cannot read the {c.data_size} bytes of constant {c.fqn} from "
                              f"{path.name} ({e}); the package is truncated or corrupt") from None

    def widen(i: int, digest: str) -> None:
        c = consts[i][0]
        c.digest = digest
        consts[i] = (c, c.data_size)

    narrower = [i for i, (c, n) in enumerate(consts) if hashed[i] is not None and c.data_size > n]
    wide = {i for i in narrower if consts[i][0].storage_offset > 0 or consts[i][0].data_size > padded(consts[i][1])}
    whole: set[tuple[str, int]] = set()
    for i in sorted(wide):
        widen(i, slot_digest(i))
        whole.add((consts[i][0].digest, consts[i][0].data_size))
    sizes = {size for _, size in whole}
    for i in narrower:
        c = consts[i][0]
        if i not in wide and c.data_size in sizes and overlapping_dim(c.shape, c.stride) is None:
            d = slot_digest(i)
            if (d, c.data_size) in whole:
                widen(i, d)
    return consts
