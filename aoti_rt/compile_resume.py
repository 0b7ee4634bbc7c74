"""Resuming a compile: the methods an interrupted ``aoti_rt.compile(..., resume=True)`` finished.

A large model's compile takes minutes a method; a crash, a time limit or Ctrl-C in the last
method loses all of them. With ``resume=True`` the bundle is staged in a fixed directory inside
its path (:data:`STAGE`), and each method compiled there is kept: its ``.so`` in the stage, its
MethodSpec and constants' bytes under ``work/<method>/``, and beside them a *fingerprint* of
everything its result depends on (:class:`Fingerprints`). When the compile fails or is stopped,
the stage stays; the next ``compile(..., resume=True)`` into the same path takes every method
whose fingerprint is unchanged as it is and compiles the rest. A method whose program, weights,
options or torch changed is compiled again: a resumed bundle is the bundle a fresh compile
writes.

The fingerprint hashes (BLAKE3) the program's graph, signature and dynamic ranges, the bytes of
every weight and constant (each storage once per compile, on any device), the method's inputs,
the inductor options given to ``compile``, the device and the torch and aoti_rt versions.
Inductor settings changed globally, outside ``inductor_configs``, are not in it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blake3 import blake3

from . import __version__
from .compile_workers import load_result
from .errors import CompileError
from .method_compiler import Job, log, timed

if TYPE_CHECKING:
    from collections.abc import Mapping

    from torch.export import ExportedProgram

#: the staging directory of a resumable compile, inside the bundle's path (a dot: no bundle
#: file name can start with one)
STAGE = ".aoti_rt-partial-resume"
#: device bytes hashed per copy to the host
_CHUNK = 256 << 20


class Fingerprints:
    """The fingerprints of one compile's methods; a storage shared by several methods (their
    weights) or several views is hashed once."""

    def __init__(self) -> None:
        self._digests: dict[tuple[int, str, int], str] = {}
        self._held: list[Any] = []           # the hashed storages

    def of(self, ep: "ExportedProgram", job: Job) -> str | None:
        """``ep``'s fingerprint as ``job`` compiles it; None where some part cannot be hashed
        (the method is then always compiled)."""
        import torch

        try:
            h = blake3()
            for part in (__version__, torch.__version__, job.name, job.device,
                         json.dumps(job.options, sort_keys=True, default=repr), repr(job.inputs),
                         repr(job.fixed), repr(sorted(job.mutated)),
                         ep.graph_module.print_readable(print_output=False, include_stride=True,
                                                        include_device=True),
                         str(ep.graph_signature), str(ep.range_constraints),
                         str(ep.call_spec.in_spec), str(ep.call_spec.out_spec)):
                h.update(part.encode() + b"\0")
            for table in (ep.state_dict, ep.constants):
                for name in sorted(table):
                    h.update(name.encode() + b"\0" + self._digest(table[name]).encode() + b"\0")
            return h.hexdigest()
        except Exception as e:  # noqa: BLE001 - an unhashable part: no reuse, never a wrong one
            log.warning("method %s: no fingerprint (%s: %s); a resumed compile compiles it again",
                        job.name, type(e).__name__, e)
            return None

    def _digest(self, value: Any) -> str:
        """A value of a program's state: a tensor by its layout and the digest of its whole
        storage (what AOTI serialises for it, bytes outside its view too), a tensor subclass by
        its type, its flattening context and its inner tensors; else a TypeError."""
        import torch

        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cannot fingerprint a {type(value).__name__}")
        if hasattr(type(value), "__tensor_flatten__"):
            attrs, ctx = value.__tensor_flatten__()
            inner = [f"{a}={self._digest(getattr(value, a))}" for a in attrs]
            return f"{type(value).__module__}.{type(value).__qualname__}({ctx!r}; {', '.join(inner)})"
        layout = f"{value.dtype}|{tuple(value.shape)}|{value.stride()}|{value.storage_offset()}|{value.device}"
        if value.device.type == "meta":
            return layout
        return f"{layout}|{self._storage_digest(value.untyped_storage(), value.device)}"

    def _storage_digest(self, storage: Any, device: Any) -> str:
        """The BLAKE3 of a storage's bytes, copied to the host a chunk at a time; each storage
        once (keyed as :func:`aoti_rt.compiler._weight_bytes` counts them)."""
        import torch

        key = (storage.data_ptr(), str(device), storage.nbytes())
        if key not in self._digests:
            u8 = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
            h = blake3(max_threads=blake3.AUTO)
            for i in range(0, u8.numel(), _CHUNK):
                h.update(u8[i:i + _CHUNK].cpu().numpy())
            self._digests[key] = h.hexdigest()
            self._held.append(storage)       # its address stays its own while the key is used
        return self._digests[key]


def open_stage(out: Path) -> Path:
    """The resumable stage inside ``out``, created (mode 0700) or found as an earlier compile of
    this user left it; a stage another user could have written is refused: its results are
    pickles, and a pickle runs code as it loads."""
    stage = out / STAGE
    try:
        stage.mkdir(mode=0o700)
    except FileExistsError:
        st = os.lstat(stage)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise CompileError(f"{stage} is not a directory this user alone created and may write (owner uid "
                               f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); remove it to compile from "
                               f"the start") from None
    return stage


def _fingerprint_file(job: Job) -> Path:
    return job.workdir.parent / f"{job.name}.fingerprint"


def _workdirs(job: Job) -> tuple[Path, Path]:
    """Where a method's result may lie: its work directory, or the one a worker that was handed
    its program saved whole used (:func:`aoti_rt.compile_workers.build_methods`)."""
    return job.workdir, job.workdir.with_name(job.name + ".whole")


def finished(job: Job, fingerprint: str | None) -> tuple[Any, list[Any]] | None:
    """The method's MethodSpec and constants' bytes from an earlier compile into this stage, if
    it finished there with this ``fingerprint``; else None."""
    fp = _fingerprint_file(job)
    if fingerprint is None or not fp.is_file() or fp.read_text() != fingerprint:
        return None
    for wd in _workdirs(job):
        if (wd / "result.pkl").is_file():
            method, spans, _ = load_result(wd, keep=True)
            if (job.out / method.so).is_file():
                return method, spans
    return None


def begin(job: Job, fingerprint: str | None) -> None:
    """Clear what an earlier compile left of this method and record the fingerprint it is
    compiled with now."""
    for wd in _workdirs(job):
        shutil.rmtree(wd, ignore_errors=True)
    for suffix in (".so", ".json"):
        (job.out / job.name).with_suffix(suffix).unlink(missing_ok=True)
    fp = _fingerprint_file(job)
    fp.parent.mkdir(parents=True, exist_ok=True)
    fp.unlink(missing_ok=True)
    if fingerprint is not None:
        fp.write_text(fingerprint)


def resumed(eps: "Mapping[str, ExportedProgram]", todo: list[Job], bar: Any) -> dict[str, tuple[Any, list[Any]]]:
    """The methods of ``todo`` an earlier resumable compile into this stage finished with the
    same fingerprint; every other one is cleared and its fingerprint recorded for this one."""
    bar.phase("fingerprinting the programs")
    prints = Fingerprints()
    done: dict[str, tuple[Any, list[Any]]] = {}
    for job in todo:
        t0 = time.perf_counter()
        fp = prints.of(eps[job.name], job)
        timed("fingerprint", job.name, t0)
        kept = finished(job, fp)
        if kept is not None:
            done[job.name] = kept
            bar.step()
        else:
            begin(job, fp)
    return done
