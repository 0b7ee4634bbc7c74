"""Shared helpers of the benchmark scripts: arguments, environment, timing, tables, models.

Every script takes ``--device``, ``--size small|full``, ``--out DIR``, ``--cache DIR`` and
``--repeats N``, prints its tables under a header naming the card, torch version and date,
and writes the same figures to ``<out>/<bench>.json``. Test models are compiled once with
:func:`aoti_rt.compile` into bundles under ``--cache``, in a directory named by a digest of
everything that shapes them, so reruns reuse them.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

import aoti_rt
from aoti_rt.abi import blob_layout

#: decimal gigabyte: throughputs are GB/s = 1e9 bytes per second
GB = 1e9
#: binary unit for byte counts in tables
MiB = float(1 << 20)


# ---------------------------------------------------------------------------------------
# arguments and environment

def _default_cache() -> Path:
    env = os.environ.get("AOTI_RT_BENCH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "aoti_rt" / "bench"


def parse_args(doc: str | None, argv: Sequence[str] | None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The common options (plus those ``extra`` adds), with ``device`` and ``size`` resolved.

    ``--device`` defaults to ``cuda:0`` when CUDA is available, else ``cpu``; ``--size``
    defaults to ``full`` on CUDA and ``small`` on the CPU.
    """
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:0 if available, else cpu)")
    p.add_argument("--size", choices=("small", "full"), default=None,
                   help="full: the sizes of the reference figures; small: a quick run "
                        "(default: full on CUDA, small on the CPU)")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="directory for the JSON results (default: ./bench-results)")
    p.add_argument("--cache", type=Path, default=_default_cache(),
                   help="directory of compiled test models, reused across runs "
                        "(default: $AOTI_RT_BENCH_CACHE or ~/.cache/aoti_rt/bench)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each measurement (default: 3)")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    args.device = _resolve_device(p, args.device)
    if args.size is None:
        args.size = "small" if args.device == "cpu" else "full"
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def _resolve_device(p: argparse.ArgumentParser, device: str | None) -> str:
    if device is None:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        p.error(f"--device {device!r}: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        p.error(f"--device {device}: this machine has no usable CUDA device; use --device cpu")
    return f"cuda:{dev.index or 0}"


def is_cuda(device: str) -> bool:
    return device != "cpu"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or what platform knows elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def card_name(device: str) -> str:
    """The GPU's name for a CUDA device, the CPU model for ``cpu``."""
    if is_cuda(device):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs)"


def environment(device: str) -> dict[str, Any]:
    """Where and when the figures were taken: stored in every JSON and table header."""
    return {
        "card": card_name(device),
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "aoti_rt": aoti_rt.__version__,
        "aoti_rt_from": "installed" if "site-packages" in Path(aoti_rt.__file__).parts else "source checkout",
        "python": platform.python_version(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout carries only the tables."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# timing and memory

def repeat(fn: Callable[[], float], repeats: int, warmup: int = 1) -> list[float]:
    """Call ``fn`` ``warmup + repeats`` times; return the seconds it reported for the last
    ``repeats`` calls (``fn`` times its own critical section, so set-up stays outside)."""
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(repeats)]


def stopwatch(fn: Callable[[], object]) -> Callable[[], float]:
    """A function that calls ``fn`` and returns the seconds it took (for :func:`repeat`)."""
    def once() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return once


def best_median(samples: Sequence[float]) -> tuple[float, float]:
    return min(samples), statistics.median(samples)


def synchronize(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


def free_memory(device: str) -> None:
    """Collect garbage and hand freed memory back: the caching allocator's free blocks to
    the driver on CUDA, the C heap's free pages to the OS on the CPU (``malloc_trim``)."""
    gc.collect()
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))
        torch.cuda.empty_cache()
    else:
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):   # not glibc
            pass


def used_memory(device: str) -> int:
    """Device-wide used bytes (``total - free`` from cuMemGetInfo) on CUDA; this process's
    resident set size on the CPU."""
    if is_cuda(device):
        from aoti_rt.device import get as device_runtime

        free, total = device_runtime(device).memory_info()
        return total - free
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def read_file(path: Path, chunk: int = 64 << 20) -> int:
    """Read a file once and drop the bytes (warms the page cache); returns its size."""
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            got = f.read(chunk)
            if not got:
                return n
            n += len(got)


# ---------------------------------------------------------------------------------------
# tables and JSON

@dataclass
class Table:
    """Rows of figures under a title; ``columns`` are ``(key, header, format)``."""

    title: str
    columns: list[tuple[str, str, str]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> dict[str, Any]:
        """Append a row; keys not among the columns are kept in the JSON only."""
        self.rows.append(row)
        return row

    def render(self) -> str:
        head = [h for _, h, _ in self.columns]
        body = [[_fmt(r.get(k), f) for k, _, f in self.columns] for r in self.rows]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        numeric = [all(_is_number(r.get(k)) for r in self.rows) for k, _, _ in self.columns]

        def line(cells: list[str]) -> str:
            return "  ".join(c.rjust(w) if num else c.ljust(w)
                             for c, w, num in zip(cells, widths, numeric)).rstrip()

        out = [self.title, line(head), line(["-" * w for w in widths])]
        out += [line(r) for r in body]
        out += [f"  * {n}" for n in self.notes]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "columns": [{"key": k, "header": h} for k, h, _ in self.columns],
                "rows": self.rows, "notes": self.notes}


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _fmt(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return fmt.format(v)
    return str(v)


@dataclass
class Report:
    """One script's results: environment, parameters, tables; printed and written as JSON."""

    bench: str
    env: dict[str, Any]
    params: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self, title: str, columns: list[tuple[str, str, str]]) -> Table:
        t = Table(title, columns)
        self.tables.append(t)
        return t

    def header(self) -> str:
        e = self.env
        return (f"== {self.bench} == {e['card']} | {e['device']} | torch {e['torch']}"
                f"{' (CUDA ' + e['cuda'] + ')' if e.get('cuda') and is_cuda(e['device']) else ''}"
                f" | aoti_rt {e['aoti_rt']} | {e['date']}")

    def emit(self, out: Path) -> Path:
        """Print the tables to stdout and write ``<out>/<bench>.json``; returns its path."""
        print(self.header())
        print("params: " + ", ".join(f"{k}={v}" for k, v in self.params.items()))
        for t in self.tables:
            print()
            print(t.render())
        for n in self.notes:
            print(f"note: {n}")
        print(flush=True)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.bench}.json"
        payload = {"bench": self.bench, "env": self.env, "params": self.params,
                   "tables": [t.to_json() for t in self.tables], "notes": self.notes}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, path)
        return path


# ---------------------------------------------------------------------------------------
# test models

class LayerStack(torch.nn.Module):
    """``layers`` bias-free ``Linear(dim, dim)``: the weights every method draws from."""

    def __init__(self, layers: int, dim: int, dtype: torch.dtype, device: str):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(dim, dim, bias=False, dtype=dtype, device=device) for _ in range(layers))


class LayerRange(torch.nn.Module):
    """A method that runs layers ``[first, end)`` of a shared :class:`LayerStack`.

    The layers are the stack's own modules (same parameter tensors) kept under their
    stack index, so a weight has the same FQN (``layers.7.weight``) in every method.
    """

    def __init__(self, stack: LayerStack, first: int, end: int):
        super().__init__()
        self.layers = torch.nn.ModuleDict({str(i): stack.layers[i] for i in range(first, end)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = layer(x)
        return x


@dataclass(frozen=True)
class StackSpec:
    """A :class:`LayerStack` model and its methods ``(name, first layer, end layer, batch)``."""

    layers: int
    dim: int
    methods: tuple[tuple[str, int, int, int], ...]
    dtype: str = "bfloat16"
    seed: int = 0

    def params(self) -> dict[str, Any]:
        return {"kind": "layer_stack", "layers": self.layers, "dim": self.dim, "dtype": self.dtype,
                "seed": self.seed, "methods": [list(m) for m in self.methods]}

    def programs(self, device: str) -> dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]:
        """``{method: (module, example args)}``, all sharing one stack's parameters."""
        dtype = getattr(torch, self.dtype)
        torch.manual_seed(self.seed)
        stack = LayerStack(self.layers, self.dim, dtype, device)
        return {name: (LayerRange(stack, first, end).eval(),
                       (torch.randn(batch, self.dim, dtype=dtype, device=device),))
                for name, first, end, batch in self.methods}

    def example(self, method: str, device: str) -> torch.Tensor:
        """A fresh input for ``method``."""
        batch = next(b for n, _, _, b in self.methods if n == method)
        return torch.randn(batch, self.dim, dtype=getattr(torch, self.dtype), device=device)


@dataclass
class Built:
    """A compiled artifact in the cache and how long it took to build (now or before)."""

    path: Path
    compile_seconds: float
    reused: bool


def in_cache(path: Path, cache: Path) -> str:
    """``path`` as the JSON records it: relative to ``--cache`` (no machine's paths in results)."""
    try:
        return str(Path(path).relative_to(cache))
    except ValueError:
        return Path(path).name


def _cache_dir(cache: Path, name: str, params: Mapping[str, Any], device: str, kind: str) -> Path:
    key = json.dumps({"name": name, "params": params, "device": device, "kind": kind,
                      "torch": torch.__version__, "aoti_rt": aoti_rt.__version__}, sort_keys=True)
    return cache / f"{name}-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _record(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _reuse(path: Path, done: Path) -> Built | None:
    rec = _record(path)
    if done.exists() and rec.is_file():
        return Built(path, float(json.loads(rec.read_text())["compile_seconds"]), True)
    return None


def _fresh(path: Path) -> None:
    """Remove what an interrupted build left at ``path`` and its record."""
    _record(path).unlink(missing_ok=True)
    for p in (path, _stock_dir(path)):
        if p.exists():
            shutil.rmtree(p)


def _done(path: Path, seconds: float, params: Mapping[str, Any]) -> Built:
    """Write the record that marks ``path`` complete (written last)."""
    _record(path).write_text(json.dumps({"compile_seconds": seconds, "params": params,
                                         "torch": torch.__version__}))
    return Built(path, seconds, False)


def build_model(cache: Path, name: str, params: Mapping[str, Any],
                programs: Callable[[], Mapping[str, Any]], device: str) -> Built:
    """An aoti_rt bundle of ``programs()`` compiled for ``device``, cached by ``params``.

    ``params`` must describe everything that shapes the programs (it names the cache
    directory together with the device and the torch and aoti_rt versions); ``programs``
    is called only when the bundle must be compiled.
    """
    path = _cache_dir(cache, name, params, device, "bundle")
    hit = _reuse(path, path / "manifest.json")
    if hit is not None:
        return hit
    _fresh(path)
    progs = programs()
    log(f"compiling {name} ({', '.join(progs)}) for {device} into {path} ...")
    t0 = time.perf_counter()
    aoti_rt.compile(progs, path, device=device, progress=False)
    seconds = time.perf_counter() - t0
    del progs
    free_memory(device)
    log(f"  compiled in {seconds:.1f} s")
    return _done(path, seconds, params)


def build_stock(cache: Path, name: str, params: Mapping[str, Any],
                program: Callable[[], tuple[torch.nn.Module, tuple[torch.Tensor, ...]]],
                device: str) -> tuple[Built, Path, Path]:
    """A stock AOTI artifact of one program: ``(built, model .so, its *_weights.blob)``.

    Made the way torch users make it: ``torch._inductor.aot_compile`` with the weights kept
    out of the .so in the ``binary_blob`` format, which writes the blob next to the .so.
    Compiled in place (a CUDA .so may refer to kernel files beside it by absolute path).
    """
    path = _cache_dir(cache, name, params, device, "stock")
    so = path / f"{name}.so"
    built = _reuse(path, so)
    if built is None:
        _fresh(path)
        path.mkdir(parents=True)
        module, args = program()
        log(f"compiling stock AOTI artifact {name} for {device} into {path} ...")
        t0 = time.perf_counter()
        ep = torch.export.export(module, args)
        torch._inductor.aot_compile(ep.module(), args, options={
            "aot_inductor.package_constants_in_so": False,
            "aot_inductor.package_constants_on_disk_format": "binary_blob",
            "aot_inductor.output_path": str(so),
        })
        seconds = time.perf_counter() - t0
        del module, args, ep
        free_memory(device)
        log(f"  compiled in {seconds:.1f} s")
        built = _done(path, seconds, params)
    blobs = sorted(path.rglob("*_weights.blob"))
    if len(blobs) != 1:
        raise RuntimeError(f"expected one *_weights.blob under {path}, found {blobs}")
    return built, so, blobs[0]


def _blob_pieces(manifest: aoti_rt.Manifest, method: str) -> tuple[list[tuple[Any, int]], int]:
    """``[(weight, bytes its slot takes in the blob)]`` for each constant of ``method`` in
    order, and the blob's size (:func:`aoti_rt.abi.blob_layout`)."""
    pieces = []
    for c in manifest.methods[method].constants:
        w = manifest.weights[c.weight]
        pieces.append((w, max(c.data_size, w.nbytes)))
    return pieces, blob_layout([n for _, n in pieces])[1]


def blob_size(manifest: aoti_rt.Manifest, method: str) -> int:
    """Bytes of ``method``'s stock ``binary_blob``: what stock AOTI allocates to load it."""
    return _blob_pieces(manifest, method)[1]


def _stock_dir(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + ".stock")


def stock_blob(bundle: Path, method: str) -> Path:
    """The ``binary_blob`` of one bundle method, as the stock runner loads it.

    AOTI's format: each constant's storage bytes in index order, each padded to its
    ``GetConstantDataSize``. Built from the manifest and the store (so the stock runner
    runs the very .so aoti_rt runs); written once next to the bundle, named by its content,
    so methods with identical blobs share one file on disk.
    """
    b = aoti_rt.read_bundle(bundle)
    pieces, size = _blob_pieces(b.manifest, method)
    key = hashlib.sha256(json.dumps([(w.id, n) for w, n in pieces]).encode()).hexdigest()[:16]
    out = _stock_dir(bundle) / f"{key}_weights.blob"
    if out.is_file() and out.stat().st_size == size:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(b.store_path, "rb") as src, open(tmp, "wb") as dst:
        for w, padded in pieces:
            src.seek(w.offset)
            left = w.nbytes
            while left:
                got = src.read(min(left, 64 << 20))
                if not got:
                    raise RuntimeError(f"{b.store_path} ended early")
                dst.write(got)
                left -= len(got)
            dst.write(bytes(padded - w.nbytes))
    os.replace(tmp, out)
    return out


def stock_runner(so: Path, device: str) -> Any:
    """torch's own AOTI runner for a model .so (no weights loaded yet)."""
    if is_cuda(device):
        return torch._C._aoti.AOTIModelContainerRunnerCuda(str(so), 1, device)
    return torch._C._aoti.AOTIModelContainerRunnerCpu(str(so), 1)


# ---------------------------------------------------------------------------------------
# script entry

class Main(Protocol):
    """A script's entry point: ``main(argv=None) -> exit code``."""

    def __call__(self, argv: Sequence[str] | None = None) -> int: ...


def main_of(bench: str, doc: str | None, run: Callable[[argparse.Namespace, Report], None],
            extra: Callable[[argparse.ArgumentParser], None] | None = None) -> Main:
    """Build a script's ``main(argv)``: parse the options, run, print and write the report."""

    def main(argv: Sequence[str] | None = None) -> int:
        args = parse_args(doc, argv, extra)
        report = Report(bench, environment(args.device),
                        {"device": args.device, "size": args.size, "repeats": args.repeats})
        try:
            run(args, report)
        except BaseException as e:   # keep what was measured, then fail
            report.notes.append(f"INCOMPLETE: stopped by {type(e).__name__}: {e}")
            log(f"wrote the partial results to {report.emit(args.out)}")
            raise
        log(f"wrote {report.emit(args.out)}")
        return 0

    return main
