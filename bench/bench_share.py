"""One copy of the weights across processes: an exporter and three clients of one model on one
device (``aoti_rt.load(bundle, share=name)``), against four separate loads. Every process is a
fresh Python process.

Each process imports torch and aoti_rt, brings the CUDA context up (``torch.cuda.init`` and one
tiny tensor) and sets up aoti_rt's device runtime (reported apart), then times its load, up to
a device synchronise:

  exporter          the first ``load(share=name)``: reads the weights into one shared arena
                    (a VMM allocation on CUDA, a memfd on the CPU) and serves them
  client 1..3       ``load(share=name)`` in a new process while the others run: maps the
                    exporter's arena read-only; bytes read must be 0 (the model has no mutable
                    state); its output must equal the exporter's
  separate 1..4     ``load(bundle)`` without ``share=``, four processes alive together

Memory (device-wide ``total - free`` from cuMemGetInfo on CUDA, sampled by this parent after each
scenario's processes are all up; on the CPU the processes' summed proportional set size, PSS,
which counts a page shared by four processes a quarter in each):

  empty             four processes that loaded the model, ran it once and closed it (its weights
                    freed): the private cost of a serving process (the CUDA context, cuBLAS's
                    modules and workspace, the activations torch's allocator keeps), subtracted
                    from the rows below
  shared            the exporter and three clients
  separate          four separate loads
  ratio             (scenario - empty) / unique weight bytes: 1.00 is one copy in all

SIGKILL: with the exporter and three clients up, client 2 is killed; the exporter's count of
attached clients must drop by one and clients 1 and 3 must still compute the exporter's output.
Then every process exits and device memory (CPU: the host's ``Shmem``, where memfd pages are
counted) must return to the baseline taken before any of them started.

Full size: 16 x Linear(8192, 8192, bias=False) bf16 = 2 GiB (the bench_load model); small:
4 x Linear(256, 256).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the children import torch and aoti_rt themselves, timed: nothing heavy is imported up here

ANSWER = "AOTI_RT_BENCH_ANSWER "
MiB = float(1 << 20)


# ---------------------------------------------------------------------------------------
# a child: one process, told what to do one JSON line at a time

def _child() -> int:
    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    import aoti_rt

    t2 = time.perf_counter()
    model = None
    dev = "cpu"
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        out: dict[str, Any] = {"op": op, "pid": os.getpid()}
        if op == "start":            # the CUDA context and aoti_rt's runtime, as a serving process has
            dev = cmd["device"]
            s = time.perf_counter()
            if dev != "cpu":
                torch.cuda.init()
                torch.empty(1, device=dev)
                torch.cuda.synchronize(dev)
            s2 = time.perf_counter()
            aoti_rt.device.get(dev)
            out.update(import_torch_s=t1 - t0, import_aoti_rt_s=t2 - t1, cuda_init_s=s2 - s,
                       aoti_rt_device_s=time.perf_counter() - s2)
        elif op == "load":
            s = time.perf_counter()
            model = aoti_rt.load(cmd["bundle"], device=dev, share=cmd.get("share"), progress=False)
            if dev != "cpu":
                torch.cuda.synchronize(dev)
            out["load_s"] = time.perf_counter() - s
            out["bytes_read"] = sum(model[m].bytes_read for m in model.methods)
            info = model.share
            out["share"] = None if info is None else {k: getattr(info, k) for k in (
                "role", "clients", "weights", "weight_bytes", "private_weights", "arena_bytes", "read_only",
                "exporter_pid")}
        elif op == "run":            # a fixed input through prefill: a digest of the output
            torch.manual_seed(1234)
            x = torch.randn(cmd["batch"], cmd["dim"], dtype=getattr(torch, cmd["dtype"])).to(dev)
            with torch.no_grad():
                y = model.prefill(x)
            out["digest"] = hashlib.sha256(y.float().cpu().numpy().tobytes()).hexdigest()[:16]
        elif op == "clients":
            out["clients"] = model.share.clients if model is not None and model.share else None
        elif op == "close":
            if model is not None:
                model.close()
                model = None
        else:
            out["error"] = f"unknown op {op!r}"
        print(ANSWER + json.dumps(out), flush=True)
    return 0


class Proc:
    """A child process and its answers."""

    def __init__(self, script: Path):
        self.p = subprocess.Popen([sys.executable, str(script), "--child"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.q: queue.Queue = queue.Queue()
        self.err: list[str] = []
        self.setup: dict[str, Any] = {}          # what its "start" answered
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(self.p.stderr), daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            if line.startswith(ANSWER):
                self.q.put(json.loads(line[len(ANSWER):]))
        self.q.put(None)

    def ask(self, timeout: float = 600, **cmd: Any) -> dict[str, Any]:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        try:
            out = self.q.get(timeout=timeout)
        except queue.Empty:
            out = None
        if out is None:
            raise RuntimeError(f"child {self.p.pid} gave no answer to {cmd['op']}: {''.join(self.err)[-2000:]}")
        return out

    def exit(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(timeout=120)

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(timeout=60)


# ---------------------------------------------------------------------------------------
# memory

def _pss(pid: int) -> int:
    """Proportional set size of a process (bytes)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def _shmem() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


def _used(dev: str, procs: list[Proc]) -> int:
    """Device-wide used bytes (CUDA), or the processes' summed PSS (CPU)."""
    if dev == "cpu":
        return sum(_pss(p.p.pid) for p in procs)
    from aoti_rt.device import get as device_runtime

    free, total = device_runtime(dev).memory_info()
    return total - free


def _settled(dev: str, procs: list[Proc]) -> int:
    """Used memory once it stops moving (processes finishing their start-up)."""
    last = _used(dev, procs)
    for _ in range(20):
        time.sleep(0.1)
        now = _used(dev, procs)
        if abs(now - last) < (1 << 20):
            return now
        last = now
    return last


# ---------------------------------------------------------------------------------------
# the parent

def run(args: argparse.Namespace, report: Any) -> None:
    import aoti_rt

    from bench import common
    from bench.bench_load import spec_for

    dev = args.device
    spec = spec_for(args.size)
    report.params.update(spec.params())
    built = common.build_model(args.cache, "load", spec.params(), partial(spec.programs, dev), dev)
    report.params.update(bundle=common.in_cache(built.path, args.cache), bundle_compile_s=built.compile_seconds)
    bundle = aoti_rt.read_bundle(built.path)
    unique = bundle.manifest.unique_weight_bytes()
    common.read_file(bundle.store_path)           # the page cache warm: every process reads from memory
    script = Path(__file__).resolve()
    name = f"bench-share-{os.getpid()}"
    batch = next(b for n, _, _, b in spec.methods if n == "prefill")
    run_args = {"batch": batch, "dim": spec.dim, "dtype": spec.dtype}
    if common.is_cuda(dev):
        aoti_rt.device.get(dev)                   # this process's own context: in every sample alike
    base_dev = _used(dev, [])
    base_shm = _shmem()

    loads = report.table(f"loads, each a fresh process: {spec.layers} x Linear({spec.dim}, {spec.dim}) {spec.dtype}, "
                         f"{unique / common.GB:.3f} GB of unique weights", [
                             ("row", "process", "{}"), ("ms", "load ms (median)", "{:.1f}"),
                             ("ms_all", "load ms (each repeat)", "{}"), ("bytes_read", "bytes read", "{}"),
                             ("weights", "weights mapped", "{}"), ("read_only", "read-only", "{}"),
                             ("same_output", "output = exporter's", "{}"), ("setup_ms", "CUDA + aoti_rt setup ms", "{:.1f}")])
    mem = report.table("device memory with four processes up (device-wide used on CUDA; summed PSS on the CPU)", [
        ("scenario", "scenario", "{}"), ("mib", "used - baseline MiB", "{:.1f}"),
        ("model_mib", "minus empty processes MiB", "{:.1f}"), ("ratio", "per unique weight bytes", "{:.3f}")])

    def start(n: int) -> list[Proc]:
        procs = [Proc(script) for _ in range(n)]
        for p in procs:
            p.setup = p.ask(op="start", device=dev)
        return procs

    def setup_ms(r: dict[str, Any]) -> float:
        return (r["cuda_init_s"] + r["aoti_rt_device_s"]) * 1e3

    # four processes that served the model once and closed it: the private cost of a serving
    # process (context, cuBLAS's modules and workspace, the activations torch's allocator keeps)
    empty = start(4)
    for p in empty:
        p.ask(op="load", bundle=str(built.path))
        p.ask(op="run", **run_args)
        p.ask(op="close")
    empty_used = _settled(dev, empty) - base_dev
    for p in empty:
        p.exit()
    mem.add(scenario="four processes, model run once then closed", mib=empty_used / MiB, model_mib=0.0, ratio=0.0,
            bytes=empty_used)

    # exporter + three clients, each client's attach repeated in fresh processes
    attach: dict[int, list[float]] = {1: [], 2: [], 3: []}
    procs: list[Proc] = []
    try:
        procs = start(1)
        exp = procs[0].ask(op="load", bundle=str(built.path), share=name)
        want = procs[0].ask(op="run", **run_args)["digest"]
        loads.add(row="exporter (load + serve)", ms=exp["load_s"] * 1e3, ms_all=[round(exp["load_s"] * 1e3, 1)],
                  bytes_read=exp["bytes_read"], weights=exp["share"]["weights"], read_only=exp["share"]["read_only"],
                  same_output=True, setup_ms=setup_ms(procs[0].setup), role=exp["share"]["role"])
        for rep in range(args.repeats):
            clients = start(3)
            got = []
            for k, c in enumerate(clients, 1):
                r = c.ask(op="load", bundle=str(built.path), share=name)
                attach[k].append(r["load_s"])
                got.append((r, c.ask(op="run", **run_args)["digest"] == want, setup_ms(c.setup)))
            if rep == args.repeats - 1:
                for k, (r, same, setup) in enumerate(got, 1):
                    loads.add(row=f"client {k} (attach)", ms=statistics.median(attach[k]) * 1e3,
                              ms_all=[round(s * 1e3, 1) for s in attach[k]], bytes_read=r["bytes_read"],
                              weights=r["share"]["weights"], read_only=r["share"]["read_only"], same_output=same,
                              setup_ms=setup, role=r["share"]["role"], private_weights=r["share"]["private_weights"])
                procs += clients
                shared_used = _settled(dev, procs) - base_dev
            else:
                for c in clients:
                    c.exit()
        mem.add(scenario="exporter + 3 clients (share=)", mib=shared_used / MiB,
                model_mib=(shared_used - empty_used) / MiB, ratio=(shared_used - empty_used) / unique,
                bytes=shared_used)

        # SIGKILL of client 2
        sig = report.table("SIGKILL of client 2 (exporter + 3 clients up)", [
            ("check", "check", "{}"), ("value", "value", "{}"), ("ok", "ok", "{}")])
        before = procs[0].ask(op="clients")["clients"]
        procs[2].kill()
        deadline = time.monotonic() + 10
        after = before
        while time.monotonic() < deadline and after != before - 1:
            time.sleep(0.02)
            after = procs[0].ask(op="clients")["clients"]
        sig.add(check="exporter's attached clients, before -> after", value=f"{before} -> {after}",
                ok=after == before - 1)
        same = [procs[i].ask(op="run", **run_args)["digest"] == want for i in (1, 3)]
        sig.add(check="clients 1 and 3 still compute the exporter's output", value=same, ok=all(same))
        for i in (1, 3, 0):
            procs[i].exit()
        procs = []
        time.sleep(0.5)
        left = _used(dev, []) - base_dev if common.is_cuda(dev) else _shmem() - base_shm
        what = "device-wide used" if common.is_cuda(dev) else "host Shmem (memfd pages)"
        sig.add(check=f"after all exit: {what} - baseline (bytes)", value=left,
                ok=abs(left) < max(unique // 100, 8 << 20))
    finally:
        for p in procs:
            if p.p.poll() is None:
                p.kill()

    # four separate loads
    procs = start(4)
    try:
        for k, p in enumerate(procs, 1):
            r = p.ask(op="load", bundle=str(built.path))
            loads.add(row=f"separate {k} (no share=)", ms=r["load_s"] * 1e3, ms_all=[round(r["load_s"] * 1e3, 1)],
                      bytes_read=r["bytes_read"], weights=0, read_only=False,
                      same_output=p.ask(op="run", **run_args)["digest"] == want, setup_ms=setup_ms(p.setup))
        separate_used = _settled(dev, procs) - base_dev
    finally:
        for p in procs:
            p.exit()
    mem.add(scenario="4 separate loads", mib=separate_used / MiB, model_mib=(separate_used - empty_used) / MiB,
            ratio=(separate_used - empty_used) / unique, bytes=separate_used)
    if common.is_cuda(dev):
        report.notes.append(f"unique weight bytes {unique}; baseline device-wide used {base_dev} (this parent's "
                            f"context included)")
    else:
        report.notes.append(f"unique weight bytes {unique}; CPU memory is the children's summed PSS, in which a "
                            f"model this small is noise (its .so and torch's pages move it more than its weights): "
                            f"the CPU rows check the mechanism, the memory ratio is measured on a GPU")


def main(argv: list[str] | None = None) -> int:
    """Run the rows (the parent: it spawns the processes)."""
    from bench import common

    return common.main_of("bench_share", __doc__, run)(argv)


if __name__ == "__main__":
    if "--child" in sys.argv:
        sys.exit(_child())
    sys.exit(main())
