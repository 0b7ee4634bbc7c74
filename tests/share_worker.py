"""A process of tests/test_share.py: loads a bundle with ``share=`` and runs what it is told.

One JSON command per line on stdin, one JSON answer per line on stdout (prefixed with
``ANSWER``, so nothing else printed is mistaken for one). Commands:

  {"op": "load", "bundle", "device", "share"}  -> model.share, bytes read, cache stats
  {"op": "prefill", "tokens": [...]}            -> the logits (a list of rows)
  {"op": "decode", "token": t, "pos": p}        -> the logits row
  {"op": "maps"}                                -> this process's /proc/self/maps lines of shared weights
  {"op": "write"}                               -> what writing a shared weight does (CPU: in a
                                                   forked child, its signal; CUDA: the error; the
                                                   process is not to be used after it on CUDA)
  {"op": "update", "shared": bool}              -> model.update_weights(the seed-1 demo LM's weights)
  {"op": "close"}                               -> arena totals after the model closed
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import sys

import torch

import aoti_rt
from aoti_rt import _memory, demo

ANSWER = "ANSWER "


def new_lm_weights(device: str) -> dict[str, torch.Tensor]:
    """The demo LM's weights for seed 1 (not its KV cache), by the FQNs the methods bind."""
    lm = demo.make_model(device, seed=1)
    return {f"lm.{k}": v for k, v in lm.state_dict().items() if not k.endswith("_cache")}


def main() -> int:
    model = None
    dev = "cpu"
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        out: dict = {"op": op}
        try:
            if op == "load":
                dev = cmd["device"]
                model = aoti_rt.load(cmd["bundle"], device=dev, share=cmd["share"], progress=False)
                out.update(share=dataclasses.asdict(model.share),
                           bytes_read=sum(m.bytes_read for m in (model[n] for n in model.methods)),
                           stats=aoti_rt.cache_stats(dev))
            elif op == "prefill":
                with torch.no_grad():
                    logits = model.prefill(torch.tensor(cmd["tokens"], device=dev))
                out["logits"] = logits.cpu().tolist()
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
            elif op == "close":
                model.close()
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
