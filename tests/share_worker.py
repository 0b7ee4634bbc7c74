"""A process of tests/test_share.py: loads a bundle with ``share=`` and runs what it is told.

One JSON command per line on stdin, one JSON answer per line on stdout (prefixed with
``ANSWER``, so nothing else printed is mistaken for one). Commands:

  {"op": "load", "bundle", "device", "share"}  -> model.share, bytes read, cache stats, whether
                                                   a weight is bound to a shared arena ("as": keep
                                                   it under that name, default "main"; "share"
                                                   may be null; "verify" as load's)
  {"op": "prefill", "tokens": [...]}            -> the logits (a list of rows); "model": which
  {"op": "tamper", "share"}                     -> what a hostile client gets trying to write the
                                                   exporter's memfd: through the descriptor the
                                                   exporter sends (reopened read-write through
                                                   /proc/self/fd/N) and through
                                                   /proc/self/map_files (errno of open, mmap,
                                                   write: 0 where one succeeded)
  {"op": "decode", "token": t, "pos": p}        -> the logits row
  {"op": "maps"}                                -> this process's /proc/self/maps lines of shared weights
  {"op": "write"}                               -> what writing a shared weight does (CPU: in a
                                                   forked child, its signal; CUDA: the error; the
                                                   process is not to be used after it on CUDA)
  {"op": "update", "shared": bool}              -> model.update_weights(the seed-1 demo LM's weights)
  {"op": "close"}                               -> arena totals after the model closed
  {"op": "digest", "tokens": [...]}             -> the SHA-256 of the prefill logits' bytes
  {"op": "loop", "tokens", "started", "stop"}   -> prefill in a loop (the file "started" made once
                                                   it runs) until the file "stop" exists: each
                                                   distinct output's SHA-256 and its count
  {"op": "info"}                                -> model.share, cache stats, arena totals, the
                                                   scopes of the keys of its arena weights
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import mmap
import os
import sys

import torch

import aoti_rt
from aoti_rt import _memory, demo, share

ANSWER = "ANSWER "


def new_lm_weights(device: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """The demo LM's weights for ``seed`` (not its KV cache), by the FQNs the methods bind."""
    lm = demo.make_model(device, seed=seed)
    return {f"lm.{k}": v for k, v in lm.state_dict().items() if not k.endswith("_cache")}


def digest(t: torch.Tensor) -> str:
    """The SHA-256 of a tensor's bytes: equal digests, bitwise equal values."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def try_write(path: str) -> dict[str, int]:
    """Open ``path`` read-write, map it writable and shared, write a byte with write(): the errno
    of each step (0: it worked; what is written is the byte that was there)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return {"open": e.errno}
    out = {"open": 0}
    try:
        try:
            m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            m[0] = m[0]
            m.close()
            out["mmap"] = 0
        except OSError as e:
            out["mmap"] = e.errno
        try:
            os.pwrite(fd, os.pread(fd, 1, 0), 0)
            out["write"] = 0
        except OSError as e:
            out["write"] = e.errno
    finally:
        os.close(fd)
    return out


def arena_bound(model) -> bool:
    """Whether any weight of ``model`` is bound to memory of a shared arena."""
    return any(b.buffer.arena is not None for m in model.method_list() for b in m.bindings())


def arena_keys(model) -> list:
    """The cache scopes of the keys of ``model``'s weights bound to a shared arena (None: a
    buffer no key names)."""
    return sorted({None if b.key is None else b.key.scope.name for m in model.method_list() for b in m.bindings()
                   if b.buffer.arena is not None}, key=str)


def main() -> int:
    models: dict = {}
    model = None
    dev = "cpu"
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        out: dict = {"op": op}
        try:
            if op == "load":
                dev = cmd["device"]
                m = aoti_rt.load(cmd["bundle"], device=dev, share=cmd["share"], progress=False,
                                 verify=cmd.get("verify", True))
                models[cmd.get("as", "main")] = m
                model = models.get("main")
                out.update(share=None if m.share is None else dataclasses.asdict(m.share),
                           bytes_read=sum(x.bytes_read for x in (m[n] for n in m.methods)),
                           stats=aoti_rt.cache_stats(dev), arena_bound=arena_bound(m))
            elif op == "prefill":
                with torch.no_grad():
                    logits = models[cmd.get("model", "main")].prefill(torch.tensor(cmd["tokens"], device=dev))
                out["logits"] = logits.cpu().tolist()
            elif op == "tamper":
                att = share.attach(cmd["share"], timeout=30)
                fds = att.take_fds()
                try:
                    out["reopen"] = [try_write(f"/proc/self/fd/{fd}") for fd in fds]
                finally:
                    for fd in fds:
                        os.close(fd)
                    att.close()
                with open("/proc/self/maps") as f:
                    ranges = [x.split()[0] for x in f if "aoti_rt-weights" in x]
                out["map_files"] = [try_write(f"/proc/self/map_files/{r}") for r in ranges]
            elif op == "decode":
                with torch.no_grad():
                    logits = model.decode(torch.tensor([cmd["token"]], device=dev),
                                          torch.tensor([cmd["pos"]], device=dev))
                out["logits"] = logits[-1].cpu().tolist()
            elif op == "maps":
                with open("/proc/self/maps") as f:
                    out["lines"] = [x.strip() for x in f if "aoti_rt-weights" in x]
            elif op == "write":
                ptr = next(b.buffer for b in model.prefill.bindings() if b.buffer.read_only).ptr
                if dev == "cpu":
                    pid = os.fork()
                    if pid == 0:                      # the child writes, and should die of it
                        ctypes.memset(ptr, 0, 16)
                        os._exit(0)
                    _, status = os.waitpid(pid, 0)
                    out["signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
                else:
                    buf = next(b.buffer for b in model.prefill.bindings() if b.buffer.read_only)
                    try:
                        torch.as_tensor(buf, device=dev).fill_(0)
                        torch.cuda.synchronize(dev)
                        out["error"] = None
                    except RuntimeError as e:
                        out["error"] = str(e)[:300]
            elif op == "update":
                report = model.update_weights(new_lm_weights(dev), shared=cmd["shared"], strict=False)
                out.update(fqns=len(report.fqns), copied_on_write=report.copied_on_write)
            elif op == "digest":
                with torch.no_grad():
                    out["digest"] = digest(model.prefill(torch.tensor(cmd["tokens"], device=dev)))
            elif op == "loop":
                seen: dict[str, int] = {}
                x = torch.tensor(cmd["tokens"], device=dev)
                open(cmd["started"], "w").close()
                with torch.no_grad():
                    while not os.path.exists(cmd["stop"]):
                        d = digest(model.prefill(x))
                        seen[d] = seen.get(d, 0) + 1
                out.update(outputs=seen, calls=sum(seen.values()))
            elif op == "info":
                out.update(share=dataclasses.asdict(model.share), stats=aoti_rt.cache_stats(dev),
                           arenas=list(_memory.arena_totals()), arena_keys=arena_keys(model))
            elif op == "close":
                for m in models.values():
                    m.close()
                models.clear()
                model = None
                import gc

                gc.collect()
                out["arenas"] = list(_memory.arena_totals())
            else:
                raise ValueError(op)
        except aoti_rt.AotiRtError as e:
            out["error_type"] = type(e).__name__
            out["error"] = str(e)
        print(ANSWER + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
