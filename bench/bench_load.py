"""Load throughput of the same weights, side by side in one run.

Variants (GB/s = the bytes a variant moves / its seconds; 1 GB = 1e9 bytes):

  aoti_rt.load cold             a fresh ``aoti_rt.load`` whose weights are not cached yet
                                (the page cache is warm: every file is read once first);
                                bytes = the unique weight bytes of the loaded methods
  aoti_rt.load, pinned store    the same cold load with the store held in page-locked host
                                memory by ``aoti_rt.pin_store`` (bytes already in host memory)
  aoti_rt.loader.read_weights   the loader alone (no .so, no binding) into buffers from the
                                device allocator, from the bundle's store and from a copy in
                                /dev/shm when there is room, at several worker counts; and
                                10k x 4 KiB weights cut from the store (per-weight overhead)
  aoti_rt.load, verify=...      the same cold load in each verify mode: True (the default:
                                weights are hashed only when another bundle shares them),
                                False (never), 'load' (every weight hashed by the workers
                                while loading): the cost of each, side by side
  second bundle, same weights   a copy of the bundle (hard links) loaded while the first is
                                open: it verifies the first's copies on demand by hashing their
                                store, then shares them (reads and allocates nothing)
  loader rows, verified /       the loader alone with and without hashing every weight
  unverified                    (BLAKE3 tree, 4 MiB blocks)
  stock AOTI                    ``AOTIModelContainerRunnerCuda(so, 1, dev)`` +
                                ``update_constant_buffer_from_blob(blob)`` on an artifact from
                                ``torch._inductor.aot_compile`` (binary_blob); also the blob
                                call alone, and Python ``open().read()`` of the blob
  safetensors                   ``safetensors.torch.load_file(store, device=dev)``
  fastsafetensors               ``fastsafe_open(..., nogds=True)`` (only when importable)
  host->device copy             a pinned (and a pageable) uint8 tensor of the same size,
                                ``.to(dev, non_blocking=True)`` + synchronize: the ceiling

A second table times loading a fully cached second method: with ``prefill`` open,
``aoti_rt.load(bundle, methods=["decode"])`` must read and allocate nothing.

Full size: 16 x Linear(8192, 8192, bias=False) bf16 = 2 GiB; small: 4 x Linear(256, 256).
"""

from __future__ import annotations

import argparse
import ctypes
import filecmp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import aoti_rt
import aoti_rt.loader
from aoti_rt.bundle import human_bytes
from aoti_rt.digest import weight_digest
from aoti_rt.device import DeviceRuntime
from aoti_rt.device import get as device_runtime
from bench import common

COLUMNS = [
    ("variant", "variant", "{}"),
    ("mib", "MiB", "{:.1f}"),
    ("gbps_best", "GB/s best", "{:.2f}"),
    ("gbps_median", "GB/s median", "{:.2f}"),
    ("ms_best", "ms best", "{:.2f}"),
    ("ms_median", "ms median", "{:.2f}"),
]


def spec_for(size: str, layers: int | None = None) -> common.StackSpec:
    """The bench_load model: 16 x Linear(8192, 8192) bf16 on ``full``; ``layers`` overrides the depth."""
    depth, dim = (16, 8192) if size == "full" else (4, 256)
    layers = layers or depth
    return common.StackSpec(layers, dim, (("prefill", 0, layers, 4), ("decode", 0, layers, 1)))


@dataclass
class Case:
    """What every variant of one run shares."""

    dev: str
    reps: int
    bundle: aoti_rt.Bundle
    so: Path           # the stock artifact's .so
    blob: Path         # ... and its *_weights.blob
    rt: DeviceRuntime
    table: common.Table

    @property
    def unique(self) -> int:
        """Unique weight bytes of ``prefill``."""
        return self.bundle.manifest.unique_weight_bytes(["prefill"])

    def add(self, variant: str, nbytes: int, fn: Callable[[], float], **extra: object) -> list[float]:
        """Time ``fn`` (warm-up + ``reps``) and add its row; returns the samples (seconds)."""
        return self.add_samples(variant, nbytes, common.repeat(fn, self.reps), **extra)

    def add_samples(self, variant: str, nbytes: int, samples: list[float], **extra: object) -> list[float]:
        best, median = common.best_median(samples)
        self.table.add(variant=variant, mib=nbytes / common.MiB, bytes=nbytes,
                       gbps_best=nbytes / best / common.GB, gbps_median=nbytes / median / common.GB,
                       ms_best=best * 1e3, ms_median=median * 1e3, samples_s=samples, **extra)
        return samples

    def timed(self, body: Callable[[], object]) -> float:
        """Seconds of ``body()`` up to a device synchronize; its result is freed afterwards."""
        t0 = time.perf_counter()
        result = body()
        common.synchronize(self.dev)
        seconds = time.perf_counter() - t0
        del result
        common.free_memory(self.dev)
        return seconds


def run(args: argparse.Namespace, report: common.Report) -> None:
    dev = args.device
    spec = spec_for(args.size)
    report.params.update(spec.params())
    built = common.build_model(args.cache, "load", spec.params(), partial(spec.programs, dev), dev)
    stock, so, blob = common.build_stock(args.cache, "load_prefill", spec.params(),
                                         lambda: spec.programs(dev)["prefill"], dev)
    report.params.update(bundle=common.in_cache(built.path, args.cache), stock_so=common.in_cache(so, args.cache),
                         stock_blob=common.in_cache(blob, args.cache),
                         bundle_compile_s=built.compile_seconds, stock_compile_s=stock.compile_seconds)
    bundle = aoti_rt.read_bundle(built.path)
    for p in (bundle.store_path, blob):   # warm the page cache: every variant reads from memory
        common.read_file(p)
    unique = bundle.manifest.unique_weight_bytes(["prefill"])
    table = report.table(f"load throughput: {spec.layers} x Linear({spec.dim}, {spec.dim}) {spec.dtype}, "
                         f"{human_bytes(unique)} of unique weights, page cache warm", COLUMNS)
    case = Case(dev, args.repeats, bundle, so, blob, device_runtime(dev), table)
    aoti_rows(case)
    loader_rows(case)
    stock_rows(case)
    file_loader_rows(case)
    copy_rows(case)
    update_rows(case)
    cached_second_method(report, built.path, dev, args.repeats)


def update_rows(case: Case) -> None:
    """``Model.update_weights`` of every weight of prefill + decode: from a safetensors file
    (page cache warm) and from device tensors, in place, and copy on write."""
    from safetensors.torch import save_file

    with aoti_rt.load(case.bundle.root, device=case.dev) as model:
        fqns = sorted({f for m in model.methods for f in model[m].constants})
        new = {f: -model.weight(f) for f in fqns}                      # other values, on the device
        nbytes = sum(t.numel() * t.element_size() for t in new.values())
        with tempfile.TemporaryDirectory(dir=case.bundle.root.parent) as tmp:
            path = Path(tmp) / "new.safetensors"
            save_file({f: t.cpu() for f, t in new.items()}, str(path))
            common.read_file(path)
            case.add(f"Model.update_weights(safetensors file), in place ({len(fqns)} weights)", nbytes,
                     partial(case.timed, partial(model.update_weights, path)))
            ok = all(torch.equal(model.weight(f), new[f]) for f in fqns[:4])
        case.add("Model.update_weights({fqn: device tensor}), in place", nbytes,
                 partial(case.timed, partial(model.update_weights, new)))
        case.table.notes.append(f"update_weights: the bound weights equal the new values: {ok}")

    def cow() -> float:
        with aoti_rt.load(case.bundle.root, device=case.dev) as m:
            return case.timed(partial(m.update_weights, new, shared=False))

    case.add("Model.update_weights({fqn: device tensor}), copy on write", nbytes, cow)
    new.clear()
    common.free_memory(case.dev)


def aoti_rows(case: Case) -> None:
    """Cold ``aoti_rt.load`` of prefill, and of prefill + decode (same weights: read once);
    each ``verify`` mode; a second bundle sharing the first's verified weights; pin_store."""
    man = case.bundle.manifest

    def cold(methods: list[str], read: list[int], verify=True, root=None) -> float:
        before = aoti_rt.cache_stats(case.dev)["bytes_read"]
        t0 = time.perf_counter()
        model = aoti_rt.load(root or case.bundle.root, device=case.dev, methods=methods, verify=verify)
        common.synchronize(case.dev)
        seconds = time.perf_counter() - t0
        read.append(aoti_rt.cache_stats(case.dev)["bytes_read"] - before)
        model.close()   # frees the weights: the next load is cold again
        common.free_memory(case.dev)
        return seconds

    def row(label: str, methods: list[str], expect_read: int, **kw) -> None:
        read: list[int] = []
        samples = common.repeat(partial(cold, methods, read, **kw), case.reps)
        case.add_samples(label, man.unique_weight_bytes(methods), samples, bytes_read=read[-1],
                         verify=str(kw.get("verify", True)))
        if any(r != expect_read for r in read):
            case.table.notes.append(f"{label}: read {read} bytes, expected {expect_read}")

    for methods in (["prefill"], ["prefill", "decode"]):
        n = man.unique_weight_bytes(methods)
        row(f"aoti_rt.load cold ({'+'.join(methods)})", methods, n)
    n = man.unique_weight_bytes(["prefill"])
    row("aoti_rt.load cold (prefill), verify=False", ["prefill"], n, verify=False)
    row("aoti_rt.load cold (prefill), verify='load' (every weight hashed)", ["prefill"], n, verify="load")
    # a second bundle with the same weights (hard links: another bundle, the same bytes) loaded
    # while the first is open: it verifies the first's copies by hashing their store, then
    # shares them, reading and allocating nothing
    with tempfile.TemporaryDirectory(dir=case.bundle.root.parent) as tmp:
        twin = Path(tmp) / "twin"
        twin.mkdir()
        for f in case.bundle.root.iterdir():
            os.link(f, twin / f.name)
        with aoti_rt.load(case.bundle.root, device=case.dev, methods=["prefill"]):
            before = aoti_rt.cache_stats(case.dev)["bytes_allocated"]
            row("aoti_rt.load of a second bundle with the same weights (verified on demand, shared)",
                ["prefill"], 0, root=twin)
            if aoti_rt.cache_stats(case.dev)["peak_bytes_allocated"] > before:
                case.table.notes.append("the second bundle allocated weight memory: it did not share")
    # bytes already in host memory: the store pinned with aoti_rt.pin_store
    with aoti_rt.pin_store(case.bundle.root, device=case.dev) as pin:
        row("aoti_rt.load cold (prefill), store in pinned host memory (pin_store)", ["prefill"], 0)
        row("aoti_rt.load cold (prefill), pin_store, verify='load'", ["prefill"], 0, verify="load")
        case.table.notes.append(_same_outputs_pinned(case, pin))


def _verified(verify: bool) -> str:
    return "verified" if verify else "unverified"


def _same_outputs_pinned(case: Case, pin: aoti_rt.PinnedStore) -> str:
    """Run prefill loaded from the pinned image and from the file: the outputs must be equal.

    Closes ``pin`` in between."""
    torch.manual_seed(1)
    spec = next(i for i in case.bundle.manifest.methods["prefill"].inputs)
    x = torch.randn(spec.shape, device=case.dev, dtype=getattr(torch, spec.dtype))
    with aoti_rt.load(case.bundle.root, device=case.dev, methods=["prefill"]) as m:
        pinned_out = m.prefill(x)
    pin.close()
    with aoti_rt.load(case.bundle.root, device=case.dev, methods=["prefill"]) as m:
        file_out = m.prefill(x)
    same = torch.equal(pinned_out, file_out)
    if not same:
        raise RuntimeError("prefill loaded from the pinned store differs from prefill loaded from the file")
    return "prefill outputs from the pinned-store load and the file load are identical"


def loader_rows(case: Case) -> None:
    """``aoti_rt.loader.read_weights`` alone, from the store and from a copy in /dev/shm,
    unverified and verified; and many small weights (the per-weight cost of verifying)."""
    man = case.bundle.manifest
    weights = [man.weights[i] for i in sorted({c.weight for c in man.methods["prefill"].constants})]

    def read(store: Path, workers: int | None = None, verify: bool = False) -> float:
        bufs = [case.rt.allocator.allocate(w.nbytes) for w in weights]
        t0 = time.perf_counter()
        aoti_rt.loader.read_weights(case.rt, store, [w.offset for w in weights], [w.nbytes for w in weights],
                                    bufs, progress=False, workers=workers,
                                    digests=[w.digest for w in weights] if verify else None)
        seconds = time.perf_counter() - t0
        del bufs
        return seconds

    def both(variant: str, *args) -> None:
        for verify in (False, True):
            case.add(f"{variant}, {_verified(verify)}", case.unique, partial(read, *args, verify=verify),
                     verified=verify)

    store = case.bundle.store_path
    case.add("aoti_rt.loader.read_weights (page cache)", case.unique, partial(read, store))
    both("aoti_rt.loader.read_weights (page cache)", store)
    for n in sorted({4, 16} - {aoti_rt.loader.WORKERS}):
        case.add(f"aoti_rt.loader.read_weights (page cache, {n} workers)", case.unique,
                 partial(read, store, n))
    both("aoti_rt.loader.read_weights (page cache, 16 workers)", store, 16)
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > store.stat().st_size + (256 << 20):
        copy = shm / f"aoti_rt-bench-{os.getpid()}.safetensors"
        try:
            shutil.copyfile(store, copy)
            case.add("aoti_rt.loader.read_weights (/dev/shm)", case.unique, partial(read, copy))
            for n in sorted({2, 4, 16, os.cpu_count() or 1} - {aoti_rt.loader.WORKERS}):
                case.add(f"aoti_rt.loader.read_weights (/dev/shm, {n} workers)", case.unique,
                         partial(read, copy, n))
            both("aoti_rt.loader.read_weights (/dev/shm)", copy)
        finally:
            copy.unlink(missing_ok=True)
    else:
        case.table.notes.append("no /dev/shm with room for the store: the in-memory loader row is skipped")
    small_weights(case, store)
    case.table.notes.append("bytes already in host memory: the pin_store row (page-locked image, "
                            "DMA straight to the device); the /dev/shm rows still copy through staging")
    case.table.notes.append("verified: every weight's bytes hashed (BLAKE3, 4 MiB blocks) by the loader's "
                            "workers as they land in host memory and checked against the manifest digest")


def small_weights(case: Case, store: Path, count: int = 10_000, size: int = 4096) -> None:
    """``count`` x 4 KiB weights cut from the store: the per-weight cost of loading and verifying."""
    count = min(count, store.stat().st_size // size)     # the small model's store is ~1 MiB
    if count < 100:
        case.table.notes.append("the store is too small for the small-weights rows")
        return
    offsets = [i * size for i in range(count)]
    sizes = [size] * count
    with open(store, "rb") as f:
        data = f.read(count * size)
    digests = [weight_digest(data[o:o + size]) for o in offsets]
    bufs = [case.rt.allocator.allocate(size) for _ in range(count)]    # reused: allocation is not timed

    def read(verify: bool) -> float:
        t0 = time.perf_counter()
        aoti_rt.loader.read_weights(case.rt, store, offsets, sizes, bufs, progress=False,
                                    digests=digests if verify else None)
        common.synchronize(case.dev)
        return time.perf_counter() - t0

    for verify in (False, True):
        samples = common.repeat(partial(read, verify), case.reps)
        case.add_samples(f"aoti_rt.loader.read_weights {count} x {size // 1024} KiB, "
                         f"{_verified(verify)}", count * size, samples, verified=verify,
                         us_per_weight_median=common.best_median(samples)[1] * 1e6 / count)
    del bufs
    common.free_memory(case.dev)


def stock_rows(case: Case) -> None:
    """torch's AOTI runner + ``update_constant_buffer_from_blob``, the blob call alone, and a
    Python read of the blob."""
    nbytes = case.blob.stat().st_size
    blob_only: list[float] = []

    def runner_and_blob() -> object:
        runner = common.stock_runner(case.so, case.dev)
        t1 = time.perf_counter()
        runner.update_constant_buffer_from_blob(str(case.blob))
        common.synchronize(case.dev)
        blob_only.append(time.perf_counter() - t1)
        return runner

    def read_blob() -> bytes:
        with open(case.blob, "rb") as f:
            return f.read()

    case.add("stock AOTI: runner + update_constant_buffer_from_blob", nbytes, partial(case.timed, runner_and_blob))
    case.add_samples("stock AOTI: update_constant_buffer_from_blob alone", nbytes, blob_only[-case.reps:])
    case.add("python open().read() of the blob (host only)", nbytes, partial(case.timed, read_blob))
    same = filecmp.cmp(case.blob, common.stock_blob(case.bundle.root, "prefill"), shallow=False)
    case.table.notes.append(f"the aot_compile blob is {'byte-identical to' if same else 'DIFFERENT from'} the "
                            f"blob bench_memory/bench_call build from the bundle manifest")


def file_loader_rows(case: Case) -> None:
    """``safetensors.torch.load_file`` of the bundle's store; fastsafetensors if installed."""
    from safetensors.torch import load_file

    store = str(case.bundle.store_path)
    nbytes = sum(w.nbytes for w in case.bundle.manifest.weights.values())
    case.add("safetensors.torch.load_file", nbytes, partial(case.timed, lambda: load_file(store, device=case.dev)))
    try:
        from fastsafetensors import fastsafe_open
    except ImportError:
        case.table.notes.append("fastsafetensors is not installed: its row is skipped")
        return

    def fast() -> object:
        with fastsafe_open(filenames=[store], nogds=True, device=case.dev) as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    try:
        case.add("fastsafetensors (nogds)", nbytes, partial(case.timed, fast))
    except Exception as e:  # noqa: BLE001 - a third-party loader failing is a note, not a crash
        case.table.notes.append(f"fastsafetensors failed: {type(e).__name__}: {e}")


def copy_rows(case: Case) -> None:
    """The ceilings: host->device copies (pinned, pageable) on CUDA, a memcpy on the CPU."""
    n = case.unique
    if common.is_cuda(case.dev):
        for kind, pin in (("pinned (ceiling)", True), ("pageable", False)):
            src = torch.ones(n, dtype=torch.uint8, pin_memory=pin)
            case.add(f"host->device copy, {kind}", n, partial(_copy, src, case.dev))
            del src
    else:
        src = torch.ones(n, dtype=torch.uint8)
        dst = torch.zeros_like(src)
        case.add("host memcpy (CPU ceiling)", n, common.stopwatch(lambda: ctypes.memmove(dst.data_ptr(),
                                                                                       src.data_ptr(), n)))
        del src, dst
    common.free_memory(case.dev)


def _copy(src: torch.Tensor, dev: str) -> float:
    """One host->device copy, timed to the synchronize (the destination is freed after)."""
    t0 = time.perf_counter()
    dst = src.to(dev, non_blocking=True)
    torch.cuda.synchronize(torch.device(dev))
    seconds = time.perf_counter() - t0
    del dst
    return seconds


def cached_second_method(report: common.Report, path: Path, dev: str, reps: int) -> None:
    """Time ``aoti_rt.load(path, methods=["decode"])`` while ``prefill`` holds every weight."""
    table = report.table("second method, all weights cached: aoti_rt.load(bundle, methods=['decode']) "
                         "while prefill is open", [
                             ("case", "case", "{}"), ("ms_best", "ms best", "{:.3f}"),
                             ("ms_median", "ms median", "{:.3f}"), ("bytes_read", "bytes read", "{:d}"),
                             ("bytes_allocated", "bytes allocated", "{:d}"), ("hits", "cache hits", "{:d}")])
    deltas: list[tuple[int, int, int]] = []
    with aoti_rt.load(path, device=dev, methods=["prefill"]):
        def once() -> float:
            aoti_rt.reset_peak(dev)
            s0 = aoti_rt.cache_stats(dev)
            t0 = time.perf_counter()
            second = aoti_rt.load(path, device=dev, methods=["decode"])
            common.synchronize(dev)
            seconds = time.perf_counter() - t0
            s1 = aoti_rt.cache_stats(dev)
            second.close()
            deltas.append((s1["bytes_read"] - s0["bytes_read"],
                           s1["peak_bytes_allocated"] - s0["bytes_allocated"], s1["hits"] - s0["hits"]))
            return seconds
        samples = common.repeat(once, reps)
        where = _profile_load(path, dev)
    best, median = common.best_median(samples)
    read, allocated, hits = deltas[-1]
    table.add(case="aoti_rt.load(methods=['decode'])", ms_best=best * 1e3, ms_median=median * 1e3,
              bytes_read=read, bytes_allocated=allocated, hits=hits, samples_s=samples)
    if any(d[0] or d[1] for d in deltas):
        table.notes.append(f"FAILED: the cached second method read or allocated bytes: {deltas}")
    else:
        table.notes.append("bytes read and allocated are 0 in every repetition, as they must be")
    table.notes.append("loading the same method the stock way costs a whole blob load again "
                       "(the 'stock AOTI' rows above)")
    table.notes.append(f"where one such load spends its time (cProfile, own time, 20 loads): {where}")


def _profile_load(path: Path, dev: str, n: int = 20, top: int = 6) -> str:
    """The functions a cached second method's load spends most of its own time in, per load."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        aoti_rt.load(path, device=dev, methods=["decode"]).close()
    common.synchronize(dev)
    prof.disable()
    st = pstats.Stats(prof).stats                       # (file, line, name) -> (cc, nc, tt, ct, callers)
    rows = sorted(st.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return "; ".join(f"{Path(f).name}:{name} {tt / n * 1e3:.3f} ms" for (f, _, name), (_, _, tt, _, _) in rows)


main = common.main_of("bench_load", __doc__, run)

if __name__ == "__main__":
    sys.exit(main())
