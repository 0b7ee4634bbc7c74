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

"Used delta" is device-wide ``total - free`` (cuMemGetInfo) after loading minus before, on the
CPU the process's resident set (host memory, noisier); "sampled peak" is the device-wide peak
over the load from ``aoti_rt.memory.Sampler`` (every 1 ms, CUDA only). Full size: dim 8192 bf16 (2 GiB); small: dim 256.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import aoti_rt
from aoti_rt.bundle import human_bytes
from aoti_rt.memory import Sampler, memory_report
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
    ("peak_mib", "sampled peak MiB", "{:.1f}"),
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


@dataclass
class Measured:
    """What a block of loading added, in bytes."""

    used: int = 0                       # device-wide used, after - before (RSS on the CPU)
    sampled_peak: int | None = None     # device-wide peak - before, sampled every ms (CUDA)
    exact_peak: int = 0                 # aoti_rt's peak_bytes_allocated over the block
    torch_allocated: int | None = None  # torch.cuda.memory_allocated, after - before
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@contextmanager
def watch(dev: str) -> Iterator[Measured]:
    """Measure the memory the block adds (filled in when the block ends)."""
    cuda = common.is_cuda(dev)
    common.free_memory(dev)
    aoti_rt.reset_peak(dev)
    base = aoti_rt.cache_stats(dev)["bytes_allocated"]
    torch0 = torch.cuda.memory_allocated(dev) if cuda else 0
    used0 = common.used_memory(dev)
    m = Measured()
    with Sampler(dev):
        yield m
        common.synchronize(dev)
    m.used = common.used_memory(dev) - used0
    peak = memory_report(dev).device_peak_used_bytes
    m.sampled_peak = None if peak is None else peak - used0
    m.exact_peak = aoti_rt.cache_stats(dev)["peak_bytes_allocated"] - base
    m.torch_allocated = torch.cuda.memory_allocated(dev) - torch0 if cuda else None


def measure_aoti(path: Path, methods: list[str], dev: str, inputs: dict[str, torch.Tensor]) -> Measured:
    """Load ``methods`` with aoti_rt; then run each once (after the measurement) for a check."""
    with watch(dev) as m:
        model = aoti_rt.load(path, device=dev, methods=methods)
    m.outputs = {k: model[k](inputs[k]) for k in methods}
    model.close()
    del model
    common.free_memory(dev)
    return m


def measure_stock(path: Path, methods: list[str], dev: str, inputs: dict[str, torch.Tensor]) -> Measured:
    """One torch AOTI runner per method, each loading its own blob; then run each once."""
    bundle = aoti_rt.read_bundle(path)
    blobs = {k: common.stock_blob(path, k) for k in methods}
    runners = {}
    with watch(dev) as m:
        for k in methods:
            runners[k] = common.stock_runner(bundle.so_path(k), dev)
            runners[k].update_constant_buffer_from_blob(str(blobs[k]))
    m.outputs = {k: runners[k].run([inputs[k]])[0] for k in methods}
    del runners
    common.free_memory(dev)
    return m


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
                                   partial(spec.programs, dev), dev)
        report.params[f"bundle_{overlap}"] = common.in_cache(built.path, args.cache)
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

    def row(variant: str, nbytes: int, how: str, m: Measured | None = None) -> None:
        def mib(b: int | None) -> float | None:
            return None if b is None else b / common.MiB
        used = None if m is None else m.used
        peak = None if m is None else m.sampled_peak
        table.add(scenario=name, variant=variant, bytes=nbytes, mib=nbytes / common.MiB, ratio=nbytes / unique,
                  used_bytes=used, used_mib=mib(used), used_ratio=None if used is None else used / unique,
                  sampled_peak_bytes=peak, peak_mib=mib(peak), how=how, unique_bytes=unique, methods=methods,
                  torch_allocated_bytes=None if m is None else m.torch_allocated)

    row("unique weights", unique, "manifest")
    ours = measure_aoti(path, methods, dev, inputs)
    row("aoti_rt", ours.exact_peak, "measured: peak_bytes_allocated", ours)
    stock = measure_stock(path, methods, dev, inputs)
    row("stock per-method", stock.used, f"measured: {'device' if common.is_cuda(dev) else 'RSS'} delta", stock)
    row("stock per-method", sum(common.blob_size(man, m) for m in methods), "computed: sum of blobs")
    row("whole-blob-on-miss (#18901)", whole_blob_on_miss(man, methods), "computed (emulated)")
    table.notes.append(f"{name}: {_outputs_match(ours.outputs, stock.outputs)}")


main = common.main_of("bench_memory", __doc__, run)

if __name__ == "__main__":
    sys.exit(main())
