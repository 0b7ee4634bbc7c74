"""What an exporter's atomic weight update costs (``update_weights`` on a model loaded with
``share=name``, first process): time and peak arena bytes with 0, 1 and 3 client processes, for
the generation swap (``atomic=True``, the default) and the in-place write (``atomic=False``).

The exporter is this process; each client is a fresh process that loads the bundle with the
same ``share=`` name and waits (its listener thread switches generations). Each update
alternates between two weight sets (seed 0 and seed 1); the figure is the median of
``--repeats`` updates. Peak bytes: ``cache_stats()["shared_exported_bytes"]`` sampled every
0.5 ms by a thread during the updates, and the arena bytes mapped in this process
(``aoti_rt._memory.arena_totals()``) likewise.

Models: the demo LM (prefill + decode) and a stack of ``--layers`` x Linear(``--width``) fp32
(one method), compiled once into ``--cache``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

import aoti_rt
from aoti_rt import _memory, demo
from aoti_rt.update import update_weights

CLIENT = """
import sys, aoti_rt
m = aoti_rt.load(sys.argv[1], device=sys.argv[2], share=sys.argv[3], share_required=True, progress=False)
assert m.share.role == "client"
print("ready", flush=True)
sys.stdin.read()
m.close()
"""


class StackModel(nn.Module):
    def __init__(self, width: int, layers: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def _bundle(cache: Path, kind: str, device: str, width: int, layers: int) -> tuple[Path, list[dict]]:
    if kind == "demo-lm":
        path = cache / f"share-update-lm-{device}"
        if not (path / "manifest.json").is_file():
            aoti_rt.compile(demo.export_methods(demo.make_model(device)), path, progress=False)
        sets = []
        for seed in (0, 1):
            sd = demo.make_model(device, seed=seed).state_dict()
            sets.append({f"lm.{k}": v for k, v in sd.items() if not k.endswith("_cache")})
        return path, sets
    path = cache / f"share-update-stack{layers}x{width}-{device}"
    if not (path / "manifest.json").is_file():
        m = StackModel(width, layers, 0).to(device).eval()
        aoti_rt.compile({"forward": torch.export.export(m, (torch.randn(4, width, device=device),))}, path,
                        progress=False)
    return path, [StackModel(width, layers, s).to(device).state_dict() for s in (0, 1)]


def _measure(bundle: Path, sets: list[dict], device: str, clients: int, atomic: bool, repeats: int) -> dict:
    name = f"bench-update-{os.getpid()}-{clients}-{int(atomic)}"
    with aoti_rt.load(bundle, device=device, share=name, progress=False) as exporter:
        procs = [subprocess.Popen([sys.executable, "-c", CLIENT, str(bundle), device, name], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for _ in range(clients)]
        try:
            for p in procs:
                assert p.stdout.readline().strip() == "ready"
            assert exporter.share.clients == clients
            arena = exporter.share.arena_bytes
            peak = {"exported": 0, "mapped": 0}
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    peak["exported"] = max(peak["exported"], aoti_rt.cache_stats(device)["shared_exported_bytes"])
                    peak["mapped"] = max(peak["mapped"], _memory.arena_totals()[1])
                    time.sleep(0.0005)

            t = threading.Thread(target=sample)
            t.start()
            times = []
            try:
                for i in range(repeats + 1):
                    t0 = time.perf_counter()
                    r = update_weights(exporter, sets[(i + 1) % 2], strict=False, atomic=atomic)
                    if i:
                        times.append(time.perf_counter() - t0)
                    assert len(r.switched) == (clients if atomic else 0), r
            finally:
                stop.set()
                t.join()
            return {"clients": clients, "atomic": atomic, "arena_bytes": arena, "median_ms": 1e3 * statistics.median(times),
                    "min_ms": 1e3 * min(times), "peak_exported_bytes": peak["exported"],
                    "peak_mapped_bytes": peak["mapped"],
                    "after_exported_bytes": aoti_rt.cache_stats(device)["shared_exported_bytes"]}
        finally:
            for p in procs:
                p.stdin.close()
                p.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=["demo-lm", "stack"], default="demo-lm")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "aoti_rt-bench")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    bundle, sets = _bundle(args.cache, args.model, args.device, args.width, args.layers)
    print(f"{args.model} on {args.device}, torch {torch.__version__}")
    print(f"{'clients':>7} {'atomic':>6} {'arena MiB':>9} {'median ms':>9} {'min ms':>7} {'peak exported MiB':>17} "
          f"{'peak mapped MiB':>15} {'after MiB':>9}")
    for atomic in (True, False):
        for clients in (0, 1, 3):
            r = _measure(bundle, sets, args.device, clients, atomic, args.repeats)
            mib = 1 << 20
            print(f"{r['clients']:>7} {str(r['atomic']):>6} {r['arena_bytes'] / mib:>9.2f} {r['median_ms']:>9.1f} "
                  f"{r['min_ms']:>7.1f} {r['peak_exported_bytes'] / mib:>17.2f} {r['peak_mapped_bytes'] / mib:>15.2f} "
                  f"{r['after_exported_bytes'] / mib:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
