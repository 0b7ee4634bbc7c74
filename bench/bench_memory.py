"""Peak device memory of 2- and 3-method models, full and partial weight overlap.

The model is a stack of 16 bias-free Linear(dim, dim) layers; each method runs a range of it
with the same parameter tensors (same FQNs):

  full overlap     a, b, c: layers 0-15
  partial overlap  a: layers 0-11, b: 4-15, c: 8-15

"2 methods" loads a and b, "3 methods" a, b and c. Variants, each as a ratio to the unique
weight bytes of the loaded methods:

  aoti_rt                    ``aoti_rt.load(bundle, methods=...)``: the exact high-water mark
                             of aoti_rt's allocations (``cache_stats()["peak_bytes_allocated"]``
                             after ``reset_peak()``), and the device-wide used delta
  stock per-method           one torch AOTI runner per method (the bundle's own .so), each
                             ``update_constant_buffer_from_blob`` of its own blob: the
                             device-wide used delta (and ``torch.cuda.memory_allocated``)
  whole-blob-on-miss         ExecuTorch PR #18901: a method whose constants are all cached
                             binds them; one with any missing constant loads its whole blob.
                             Computed (emulated) from the manifests, not measured.

"Device-wide used" is ``total - free`` from cuMemGetInfo on CUDA, the process's resident set
on the CPU (host memory, noisier). Full size: dim 8192 bf16 (2 GiB); small: dim 256.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import aoti_rt
from aoti_rt.bundle import human_bytes
from bench import common

LAYERS = 16
OVERLAPS: dict[str, tuple[tuple[str, int, int, int], ...]] = {
    "full": (("a", 0, 16, 4), ("b", 0, 16, 1), ("c", 0, 16, 2)),
    "partial": (("a", 0, 12, 4), ("b", 4, 16, 1), ("c", 8, 16, 2)),
}
COLUMNS = [
    ("scenario", "scenario", "{}"),
    ("variant", "variant", "{}"),
    ("mib", "MiB", "{:.1f}"),
    ("ratio", "x unique", "{:.2f}"),
    ("used_mib", "used delta MiB", "{:.1f}"),
    ("used_ratio", "used x unique", "{:.2f}"),
    ("how", "how", "{}"),
]


def whole_blob_on_miss(manifest: aoti_rt.Manifest, methods: list[str]) -> int:
    """Bytes ExecuTorch PR #18901 would hold after loading ``methods`` in order.

    The first method loads its blob and caches its constants; a later method whose
    constants are all cached binds them (no new memory); one with any constant missing
    loads its whole blob into a new allocation that is never freed.
    """
    cached: set[str] = set()
    total = 0
    for m in methods:
        ids = {c.weight for c in manifest.methods[m].constants}
        if not cached or not ids <= cached:
            total += common.blob_size(manifest, m)
        cached |= ids
    return total


def _outputs_match(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    diffs = [float((ref[m].float() - got[m].float()).abs().max()) for m in ref]
    return f"max |aoti_rt - stock| over the methods' outputs = {max(diffs):.3g}"


def measure_aoti(path: Path, methods: list[str], dev: str,
                 inputs: dict[str, torch.Tensor]) -> tuple[int, int, dict[str, torch.Tensor]]:
    """(peak bytes aoti_rt allocated, device-wide used delta, each method's output)."""
    common.free_memory(dev)
    aoti_rt.reset_peak(dev)
    base = aoti_rt.cache_stats(dev)["bytes_allocated"]
    used0 = common.used_memory(dev)
    model = aoti_rt.load(path, device=dev, methods=methods)
    common.synchronize(dev)
    used = common.used_memory(dev) - used0
    peak = aoti_rt.cache_stats(dev)["peak_bytes_allocated"] - base
    outs = {m: model[m](inputs[m]) for m in methods}   # after the measurement
    model.close()
    del model
    common.free_memory(dev)
    return peak, used, outs


def measure_stock(path: Path, methods: list[str], dev: str,
                  inputs: dict[str, torch.Tensor]) -> tuple[int, int, dict[str, torch.Tensor]]:
    """(device-wide used delta, torch.cuda.memory_allocated delta, each method's output)."""
    bundle = aoti_rt.read_bundle(path)
    blobs = {m: common.stock_blob(path, m) for m in methods}
    common.free_memory(dev)
    used0 = common.used_memory(dev)
    alloc0 = torch.cuda.memory_allocated(dev) if common.is_cuda(dev) else 0
    runners = {}
    for m in methods:
        runners[m] = common.stock_runner(bundle.so_path(m), dev)
        runners[m].update_constant_buffer_from_blob(str(blobs[m]))
    common.synchronize(dev)
    used = common.used_memory(dev) - used0
    alloc = (torch.cuda.memory_allocated(dev) - alloc0) if common.is_cuda(dev) else 0
    outs = {m: runners[m].run([inputs[m]])[0] for m in methods}
    del runners
    common.free_memory(dev)
    return used, alloc, outs


def run(args: argparse.Namespace, report: common.Report) -> None:
    dev = args.device
    dim = 8192 if args.size == "full" else 256
    report.params.update(layers=LAYERS, dim=dim, dtype="bfloat16",
                         overlaps={k: [list(m) for m in v] for k, v in OVERLAPS.items()})
    used_what = "cuMemGetInfo total - free" if common.is_cuda(dev) else "process RSS (host)"
    table = report.table(f"peak memory: {LAYERS} x Linear({dim}, {dim}) bfloat16 "
                         f"({human_bytes(LAYERS * dim * dim * 2)}); used delta = {used_what}", COLUMNS)
    for overlap, methods_spec in OVERLAPS.items():
        spec = common.StackSpec(LAYERS, dim, methods_spec)
        built = common.build_model(args.cache, f"memory_{overlap}", spec.params(),
                                   lambda spec=spec: spec.programs(dev), dev)
        report.params[f"bundle_{overlap}"] = str(built.path)
        for n in (2, 3):
            scenario(table, f"{overlap} overlap, {n} methods", built.path, spec, [m for m, *_ in methods_spec][:n], dev)
    if common.is_cuda(dev):
        table.notes.append("stock AOTI allocates its constant blob with cudaMalloc, outside torch's caching "
                           "allocator: torch.cuda.memory_allocated does not see it (JSON: torch_allocated_bytes)")
        table.notes.append("stock frees nothing while loading, so its used delta after the last method is its peak")
    else:
        table.notes.append("on the CPU 'used' is the process RSS delta: allocator caching makes it approximate")


def scenario(table: common.Table, name: str, path: Path, spec: common.StackSpec, methods: list[str],
             dev: str) -> None:
    """The rows of one scenario: ``methods`` of the bundle at ``path``, every variant."""
    man = aoti_rt.read_bundle(path).manifest
    unique = man.unique_weight_bytes(methods)
    torch.manual_seed(1)
    inputs = {m: spec.example(m, dev) for m in methods}

    def row(variant: str, nbytes: int, how: str, used: int | None = None, **extra: object) -> None:
        table.add(scenario=name, variant=variant, bytes=nbytes, mib=nbytes / common.MiB, ratio=nbytes / unique,
                  used_bytes=used, used_mib=None if used is None else used / common.MiB,
                  used_ratio=None if used is None else used / unique, how=how, unique_bytes=unique,
                  methods=methods, **extra)

    row("unique weights", unique, "manifest")
    peak, used, ref = measure_aoti(path, methods, dev, inputs)
    row("aoti_rt", peak, "measured: peak_bytes_allocated", used)
    stock_used, stock_alloc, got = measure_stock(path, methods, dev, inputs)
    row("stock per-method", stock_used, f"measured: {'device' if common.is_cuda(dev) else 'RSS'} delta",
        stock_used, torch_allocated_bytes=stock_alloc)
    row("stock per-method", sum(common.blob_size(man, m) for m in methods), "computed: sum of blobs")
    row("whole-blob-on-miss (#18901)", whole_blob_on_miss(man, methods), "computed (emulated)")
    table.notes.append(f"{name}: {_outputs_match(ref, got)}")


main = common.main_of("bench_memory", __doc__, run)

if __name__ == "__main__":
    sys.exit(main())
