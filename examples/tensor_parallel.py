"""Tensor-parallel serving with aoti_rt: ``torchrun``, one process per GPU, each loading its rank's bundle.

Run it (2 GPUs, NCCL; or on the CPU with the gloo backend)::

    torchrun --nproc-per-node 2 examples/tensor_parallel.py
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --device cpu

The model is a 2-layer MLP, ``y = W2 relu(W1 x + b1) + b2``, split Megatron-style across the
``R`` ranks: the first Linear by columns (rank ``r`` holds hidden units ``[r H/R, (r+1) H/R)``:
those rows of ``W1`` and of ``b1``), the second by rows (the same columns of ``W2``), so rank
``r`` computes a partial ``y_r = W2[:, shard] relu(W1[shard] x + b1[shard])`` without talking
to the others, and one ``all_reduce`` (a sum) of the partials gives ``y``; ``b2`` is added by
rank 0 only.

Each rank compiles its own shard with :func:`aoti_rt.compile` into ``<workdir>/rank<r>.aoti``
(the user compiles per rank: rank ``r``'s bundle holds only its shards), loads it on
``cuda:<local rank>`` (the current device after ``torch.cuda.set_device``), runs it and
all-reduces the partial output. Rank 0 compares the sum with the whole model run eagerly on
one device, prints the largest difference and exits non-zero if it is wrong; every rank exits
with that status.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import aoti_rt

DIM_IN, HIDDEN, DIM_OUT, BATCH = 64, 256, 48, 4


class MLP(nn.Module):
    """The whole model, as one device would run it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(DIM_IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class MLPShard(nn.Module):
    """Rank ``rank`` of ``world``'s part of :class:`MLP`: a column-split ``fc1`` and a row-split
    ``fc2``; its output is a partial sum of the whole model's output."""

    def __init__(self, full: MLP, rank: int, world: int) -> None:
        super().__init__()
        if HIDDEN % world:
            raise SystemExit(f"the hidden size {HIDDEN} does not split into {world} ranks")
        part = HIDDEN // world
        rows = slice(rank * part, (rank + 1) * part)
        self.fc1 = nn.Linear(DIM_IN, part)
        self.fc2 = nn.Linear(part, DIM_OUT, bias=rank == 0)       # b2 once, on rank 0
        with torch.no_grad():
            self.fc1.weight.copy_(full.fc1.weight[rows])
            self.fc1.bias.copy_(full.fc1.bias[rows])
            self.fc2.weight.copy_(full.fc2.weight[:, rows])
            if self.fc2.bias is not None:
                self.fc2.bias.copy_(full.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: one GPU per rank, NCCL (default); cpu: the gloo backend")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where each rank writes its bundle (default: a temporary directory)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest |difference| accepted")
    args = p.parse_args(argv)

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("tensor_parallel: no CUDA GPU here; run with --device cpu", file=sys.stderr)
        return 2
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)              # "cuda" below is this rank's GPU
    device = f"cuda:{local_rank}" if cuda else "cpu"
    # NCCL bound to this rank's GPU at once; a rank that waits for a peer that never comes gives up
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=5),
                            **({"device_id": torch.device(device)} if cuda else {}))
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = None
    finished = False
    try:
        if args.workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="aoti_rt-tp-")
            workdir = Path(tmp.name)
        else:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)

        # every rank builds the same whole model (same seed) and keeps its shards
        torch.manual_seed(0)
        full = MLP().eval()
        x = torch.randn(BATCH, DIM_IN)
        shard = MLPShard(full, rank, world).eval().to(device)

        # compile this rank's bundle (its shards only), then load it on this rank's GPU
        bundle = workdir / f"rank{rank}.aoti"
        aoti_rt.compile({"forward": (shard, (x.to(device),))}, bundle, overwrite=True, progress=False)
        with aoti_rt.load(bundle, device=device) as model:
            with torch.no_grad():
                y = model.forward(x.to(device))        # this rank's partial output
            dist.all_reduce(y)                         # the sum over ranks: the whole output
            stats = aoti_rt.cache_stats(device)

        ok = torch.ones(1, device=device)
        if rank == 0:
            with torch.no_grad():
                want = full.to(device)(x.to(device))
            diff = (y - want).abs().max().item()
            good = diff <= args.tolerance
            print(f"tensor_parallel: {world} ranks on {args.device}, rank 0 holds "
                  f"{stats['bytes_allocated']} weight bytes of {sum(t.numel() * t.element_size() for t in full.state_dict().values())}; "
                  f"max |tensor-parallel - single-device eager| = {diff:.3e}", flush=True)
            print("tensor_parallel: OK" if good else f"tensor_parallel: WRONG (tolerance {args.tolerance})",
                  flush=True)
            ok.fill_(1.0 if good else 0.0)
        dist.broadcast(ok, src=0)                      # every rank exits with rank 0's verdict
        finished = True
        return 0 if ok.item() == 1.0 else 1
    except Exception:
        # said now: the other ranks may be blocked in a collective this one never joins, and
        # torchrun stops them once this one exits
        print(f"tensor_parallel: rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
        return 1
    finally:
        # every rank done with the group before any tears it down (a rank that leaves while
        # another still talks to it can make gloo's shutdown abort the process); a rank that
        # failed does not wait for the others, which would wait for it
        if finished:
            dist.barrier()
        dist.destroy_process_group()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
