"""Describe a compiled AOTI ``.so``'s constants: the one place aoti_rt runs torch's own AOTI
runner.

The C ABI gives each constant's internal name, FQN, dtype, kind and data size, but not its
shape, stride or storage offset (they are compiled into the .so). :func:`probe_method` loads
the method once the stock way (``AOTIModelContainerRunner*`` + ``binary_blob``) and reads the
exact views AOTI holds. A constant's bytes are a :class:`FileSpan` of the ``binary_blob`` the
runner loaded them from (AOTI's slot for it, :func:`aoti_rt.abi.blob_layout`), or of the same
layout inside the .so for weights packaged in it, or inside a package's archive; they are
hashed from that file and the start, middle and end of each are checked against what the
runner loaded. They are not copied back from the device: for a 2 GiB CUDA method that copy and
its host first-touch cost seconds. Only a method whose weights are in none of these has its
bytes copied from the runner's tensors. The compiler probes each method it builds;
``load_method`` probes a stock artifact once and caches the result beside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .abi import blob_layout
from .bundle import ConstantSpec, dtype_name
from .digest import file_digests, weight_digest
from .errors import CompileError


def _probe(so_path: Path, blob: Path, device: str):
    """Load the method the stock way in torch's runner; return fqn -> tensor as AOTI holds it."""
    import torch

    from .device import device_guard

    if device == "cpu":
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(so_path), 1)
    else:
        with device_guard(device):      # the runner's container makes its device current
            runner = torch._C._aoti.AOTIModelContainerRunnerCuda(str(so_path), 1, device)
    with device_guard(device):
        if blob is not None and blob.stat().st_size > 0:    # a method without weights has an empty blob
            runner.update_constant_buffer_from_blob(str(blob))
        tensors = dict(runner.extract_constants_map(False))
    return runner, tensors


def _storage_u8(t):
    """A tensor's whole storage as a flat uint8 tensor on its device (no copy)."""
    import torch

    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def storage_bytes(t) -> bytes:
    """The bytes of a tensor's whole storage, on the host."""
    import ctypes

    u8 = _storage_u8(t).cpu()
    return ctypes.string_at(u8.data_ptr(), u8.numel()) if u8.numel() else b""


#: bytes compared at each end and in the middle of a constant taken from a file
_SPOT = 64


class OpenFile:
    """A regular file opened read-only (anything else is a BundleError, and a FIFO never blocks
    the open), closed when the last :class:`FileSpan` of it goes. Bytes are read with
    ``pread``: a file unlinked once open stays readable, and one truncated meanwhile gives an
    ``OSError``, where a memory map of it would kill the process (SIGBUS)."""

    def __init__(self, path: str | os.PathLike[str]):
        from .store import open_regular

        self.path = Path(path)
        # reopened by path: never blocks (a FIFO put in the file's place) and only a regular file
        self.fd, _ = open_regular(self.path, "weights file")

    def pread(self, n: int, at: int) -> bytes:
        """Exactly ``n`` bytes at ``at`` (OSError if the file ends before)."""
        data = os.pread(self.fd, n, at)
        if len(data) != n:
            raise OSError(f"{self.path} ends before byte {at + n}")
        return data

    def __del__(self) -> None:
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            os.close(fd)


@dataclass(frozen=True)
class FileSpan:
    """A constant's storage bytes where they lie: ``nbytes`` bytes at ``offset`` of ``file``
    (not read into memory; ``len()`` is ``nbytes``)."""

    file: OpenFile
    offset: int
    nbytes: int

    def __len__(self) -> int:
        return self.nbytes

    def read(self) -> bytes:
        return self.file.pread(self.nbytes, self.offset)


def _same_as_loaded(t, span: FileSpan) -> bool:
    """Whether the runner's tensor ``t`` holds ``span``'s bytes at their start, middle and end:
    a layout that put another constant's bytes in this slot differs there (three small reads,
    not the whole storage back from the device)."""
    import torch

    n = span.nbytes
    if n == 0:
        return True
    u8 = _storage_u8(t)
    spans = sorted({(a, min(n, a + _SPOT)) for a in (0, max(0, n // 2 - _SPOT // 2), max(0, n - _SPOT))})
    got = torch.cat([u8[a:b] for a, b in spans]).cpu().numpy().tobytes()
    return got == b"".join(span.file.pread(b - a, span.offset + a) for a, b in spans)


#: where a method's weights lie: given the sum of its constants' data sizes, (file, offset of
#: AOTI's blob layout in it, bytes there)
Where = Callable[[int], "tuple[Path, int, int]"]


class Kept(NamedTuple):
    """A constant the .so keeps as its own: an opaque tensor (a oneDNN weight prepacked by
    ``freezing``: its bytes have no strided view aoti_rt could bind). It still has its slot
    in AOTI's blob layout (``position``: its index among the non-folded constants)."""

    position: int
    name: str
    fqn: str
    data_size: int


class Probed(NamedTuple):
    """What :func:`probe_method` found."""

    #: (ConstantSpec, storage bytes) of each constant aoti_rt binds, in index order
    constants: list
    call_spec: tuple[str, str] | None
    num_inputs: int
    #: the constants the .so keeps (opaque); constants it folds at run time are in neither list
    kept: list[Kept]
    #: GetConstantDataSize of each non-folded constant, in index order (AOTI's blob layout)
    slots: list[int]


def probe_method(so_path: Path, blob: Path | None, device: str, mutated: set[str],
                 weights: Where | None = None) -> Probed:
    """Describe a compiled method's constants (:class:`Probed`).

    Each constant's storage bytes are a :class:`FileSpan` of the file AOTI's blob layout puts
    them in (see the module's docstring): ``weights(need)`` says which file and where in it
    (``need``: the sum of the non-folded constants' data sizes); default: ``blob``, whole. Their
    digests are hashed from that file, and their start, middle and end checked against what the
    runner loaded. A method with neither has its bytes copied from the runner's tensors (``bytes``).

    Constants the .so computes itself (``aot_inductor.use_runtime_constant_folding``: made from
    the others at its first run, and again after every re-binding) are not in the blob layout
    and not described; opaque ones (oneDNN weights prepacked by ``freezing``) are listed in
    ``kept``: the .so keeps both as its own.

    Raises:
        CompileError: a constant the runner does not hold, bytes in the file that are not what
            the runner loaded, or a file that cannot be read.
    """
    from .abi import describe

    d = describe(so_path, device)
    spec, n_in = d.call_spec, d.num_inputs
    infos = [i for i in d.constants if not i.folded]    # the folded ones the .so computes itself
    where = None
    if weights is not None and infos:
        where = weights(sum(i.data_size for i in infos))
    elif weights is None and blob is not None:
        where = (blob, 0, blob.stat().st_size)
    try:
        src = OpenFile(where[0]) if where is not None and where[2] > 0 else None
    except OSError as e:
        raise CompileError(f"{so_path.name}: cannot read its weights ({e})") from None
    base, length = (where[1], where[2]) if src is not None else (0, 0)
    source = f"{src.path.name} (from byte {base})" if src is not None else ""
    runner, tensors = _probe(so_path, blob, device)
    slots, _ = blob_layout([info.data_size for info in infos])
    found = []
    kept: list[Kept] = []
    try:
        for position, (info, slot) in enumerate(zip(infos, slots)):
            t = tensors.get(info.fqn)
            if t is None:
                t = tensors.get(info.name)
            if t is None:
                raise CompileError(f"{so_path.name}: AOTI reports constant {info.fqn} but holds no tensor for it")
            if _opaque(t):                  # no storage to read or bind: the .so's own
                kept.append(Kept(position, info.name, info.fqn, info.data_size))
                continue
            nbytes = t.untyped_storage().nbytes()
            if src is not None and nbytes <= info.data_size and slot + nbytes <= length:
                data = FileSpan(src, base + slot, nbytes)    # the bytes the runner loaded it from
                try:
                    same = _same_as_loaded(t, data)
                except OSError as e:
                    raise CompileError(f"{so_path.name}: cannot read its weights ({e})") from None
                if not same:
                    raise CompileError(f"{so_path.name}: constant {info.fqn} is not at byte {slot} of "
                                       f"{source}, where aoti_rt's reading of AOTI's blob layout puts it; "
                                       f"this torch's layout differs: please report it with the torch version")
            else:
                data = storage_bytes(t)
            # the view only: the runner's tensors must not outlive it (they hold its weights)
            found.append((info, (dtype_name(t.dtype), list(t.shape), list(t.stride()), t.storage_offset()), data))
    finally:
        from .device import device_guard

        with device_guard(device):      # the container frees its weights on their device
            t = None
            del runner, tensors
    spans = [(d.offset, d.nbytes) for _, _, d in found if isinstance(d, FileSpan)]
    try:                                # all of the file's at once: pread and hash in threads
        hashed = iter(file_digests(src.fd, spans) if spans else ())
    except OSError as e:
        raise CompileError(f"{so_path.name}: cannot read its weights ({e})") from None
    out = []
    for info, (dtype, shape, stride, offset), data in found:
        digest = next(hashed) if isinstance(data, FileSpan) else weight_digest(data)
        out.append((ConstantSpec(
            name=info.name, fqn=info.fqn, dtype=dtype, shape=shape, stride=stride, storage_offset=offset,
            data_size=info.data_size or len(data), kind=info.kind,
            mutable=info.fqn in mutated, digest=digest, weight=""), data))
    return Probed(out, spec, n_in, kept, [i.data_size for i in infos])


def _opaque(t) -> bool:
    """Whether a tensor AOTI holds has no strided storage (a oneDNN prepacked weight: reading
    its storage raises "Cannot access storage of OpaqueTensorImpl")."""
    import torch

    return t.layout != torch.strided


def blob_offsets(probed: Probed, nbytes: "list[int] | None" = None) -> list[int]:
    """The offset of each of ``probed.constants`` in AOTI's blob layout, whose slots the kept
    (opaque) constants hold too. ``nbytes``: each constant's storage bytes (default: the
    length of its probed bytes); a slot is the larger of those and its data size (a .so that
    gives no data sizes is laid out by byte counts)."""
    if nbytes is None:
        nbytes = [len(data) for _, data in probed.constants]
    kept = {k.position: k.data_size for k in probed.kept}
    sizes, at = [], iter(zip(probed.constants, nbytes))
    for position in range(len(probed.constants) + len(kept)):
        if position in kept:
            sizes.append(kept[position])
        else:
            (c, _), n = next(at)
            sizes.append(max(c.data_size, n))
    offsets, _ = blob_layout(sizes)
    return [off for position, off in enumerate(offsets) if position not in kept]


def opaque_note(kept: "list[Kept]") -> str:
    """How errors name the opaque constants a .so keeps."""
    names = ", ".join(k.fqn for k in kept[:4]) + (" ..." if len(kept) > 4 else "")
    return (f"opaque tensors {names}: weights prepacked for oneDNN by inductor's freezing=True, which "
            f"have no strided storage")
