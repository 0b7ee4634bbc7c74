"""Compile several methods at once, each in a worker process (:func:`build_methods`).

What overlaps: inductor's lowering is Python (it holds the GIL and patches global state, e.g.
torch.fx.traceback's node meta, so two lowerings in threads of one process break each other),
and on the CPU most of a method's time is g++ on its generated C++ (one process, one core). So
each method compiles in a worker process, all of it (lowering, C++ build, probe:
:func:`aoti_rt.method_compiler.compile_method`).

How a worker starts: a fork, which inherits a warm inductor instead of paying a process's
start-up again. A first AOTI compile in a process pays inductor's imports and the C++
compiler's vector-ISA checks (a g++ build per ISA and a process that loads it; four ISAs took
44 s in turn on the H200 host, about 20 s at once, :func:`warm_up_inductor`). For CPU programs
the worker is a fork of this process, warmed once here (nothing to serialise). CUDA cannot be
forked once initialised, and this process exported CUDA programs; so CUDA workers are forks of
a *zygote* (:class:`_Zygote`): a fresh interpreter started at once, which warms up without
touching CUDA while this process builds the ISA checks into the inductor cache they share,
then forks a worker per method. Each worker initialises CUDA itself and gets its program
through :mod:`aoti_rt.handoff` (its tensors mapped from this process, no copy). A method that
calls an op a fresh interpreter may not have (a custom op) keeps the compile in this process.

A worker hands back its MethodSpec (pickle), its timing records and its constants' bytes: the
AOTI blob they lie in, kept under its work directory, which the parent opens (no copy). The
parent binds the methods in their order, so a bundle is the same whatever finished first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bundle import MethodSpec
from .errors import CompileError, NoShimError
from .handoff import HandoffError, read_program, write_program
from .method_compiler import Job, compile_method, log, quiet_torch_deprecations, record, timed
from .probe import FileSpan, OpenFile

if TYPE_CHECKING:
    from torch.export import ExportedProgram

#: "fork" or "zygote" to force how workers start (tests); None: fork for CPU programs
WORKER_START: str | None = None


def build_methods(eps: Mapping[str, ExportedProgram], todo: list[Job], jobs: int,
                  bar: Any, keep: bool = False) -> dict[str, tuple[MethodSpec, list[Any]]]:
    """Each method's MethodSpec and constant bytes: in this process one after another
    (``jobs == 1`` or one method), else in up to ``jobs`` worker processes at once. ``bar``:
    the compile's progress bar (``phase(text)``, ``step()``). ``keep``: leave each method's
    result in its work directory as soon as it is built (:func:`save_result`), for a later
    compile to resume from (:mod:`aoti_rt.compile_resume`)."""
    serial = jobs == 1 or len(todo) == 1
    fork = _use_fork(todo[0].device)
    if not serial and not fork:               # a zygote's workers: fresh interpreters
        local = {job.name: op for job in todo if (op := _op_of_this_process(eps[job.name]))}
        if local:
            serial = True
            log.info("compiling in this process, one method after another: %s", "; ".join(
                f"method {m} calls {op}, {_why_local(op)}" for m, op in local.items()))
    zygote = prebuild = None
    if serial or fork:                        # this process compiles, or its forks do
        t0 = time.perf_counter()
        isa = warm_up_inductor(todo[0].options)    # the first compile's start-up, its ISA checks at once
        timed("warm-up", None, t0)
        record("isa", None, isa)
    else:
        zygote = _Zygote(todo[0])             # warms up while the programs are handed over
        prebuild = _prebuild_isa_checks(todo[0].options)
    if serial:
        built = {}
        for job in todo:
            bar.phase(f"compiling {job.name}")
            built[job.name] = method, data = compile_method(job, eps[job.name], keep_files=keep)
            if keep:
                save_result(job.workdir, method, data, [])
            bar.step()
        return built
    pending = list(todo)
    whole: set[str] = set()                   # methods whose tensors a worker could not map
    running: dict[str, _Worker] = {}
    built = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                job = pending.pop(0)
                running[job.name] = _start_fork(job, eps[job.name]) if zygote is None else zygote.start(
                    job, eps[job.name], whole=job.name in whole)
                bar.phase(f"compiling {', '.join(running)}")
            time.sleep(0.05)
            for name, w in list(running.items()):
                if w.poll() is None:
                    continue
                del running[name]
                try:
                    built[name] = w.result(keep)
                except HandoffError as e:
                    if name in whole:
                        raise CompileError(f"method {name!r}: {e}") from e
                    log.info("method %s: a worker could not map this process's tensors (%s); handing "
                             "its program over saved whole", name, e)
                    whole.add(name)
                    pending.insert(0, dataclasses.replace(w.job, workdir=w.job.workdir.with_name(name + ".whole")))
                    continue
                bar.step()
                if running:
                    bar.phase(f"compiling {', '.join(running)}")
    finally:
        for w in running.values():
            w.kill()
        if zygote is not None:
            zygote.close()
    if prebuild is not None:      # done long before; a failure or Ctrl-C does not wait for its g++
        prebuild.join()
    return built


def warm_up_inductor(options: Mapping[str, Any] | None = None) -> float:
    """What every first AOTI compile in a process does (import inductor's modules, check the
    CPU's vector ISAs with the C++ compiler), done once here so forked workers inherit it
    instead of each repeating it. ``options``: the caller's inductor options, in force as they
    will be for the compiles (the checks use the C++ compiler they name; a process keeps its
    first results). It does not initialise CUDA. Best effort: a torch without these modules
    skips it. Returns the seconds the ISA checks took (a timing record)."""
    t0 = t1 = time.perf_counter()
    with contextlib.suppress(Exception):
        import importlib

        import torch._inductor.config as cfg
        from torch._inductor import cpu_vec_isa

        importlib.import_module("torch._inductor.compile_fx")
        t1 = time.perf_counter()
        _check_vec_isas(cpu_vec_isa, options)
        with cfg.patch(dict(options or {})):
            cpu_vec_isa.pick_vec_isa()
    return time.perf_counter() - t1 if t1 > t0 else 0.0


def _why_local(op: str) -> str:
    """Why a program calling ``op`` (from :func:`_op_of_this_process`) stays in this process."""
    if op.startswith("export.access_subclass_inner_tensor"):
        # torch's own op: it unwraps tensor-subclass weights (torchao's quantized tensors), which
        # the handoff cannot map (it would save them whole, a second device copy in the worker)
        return "which reads tensor-subclass weights (e.g. torchao's) that a worker cannot map"
    return "which a worker (a fresh interpreter) may not have"


def _op_of_this_process(ep: ExportedProgram) -> str | None:
    """The first op ``ep`` calls that a fresh interpreter may not have, or None: an operator
    outside torch's own ``aten`` and ``prims`` (a ``torch.library.custom_op``, an extension's
    op: registered by code this process ran) or a user Triton kernel (kept in this process's
    kernel table). A zygote's worker could not load such a program."""
    import torch

    for gm in ep.graph_module.modules():                  # higher-order ops' bodies too
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if isinstance(node.target, torch._ops.HigherOrderOperator) and "triton" in node.target.name():
                return node.target.name()
            # the op itself, or one a higher-order op wraps (auto_functionalized, with_effects)
            for op in (node.target, *node.args):
                if isinstance(op, torch._ops.OpOverload) and op.namespace not in ("aten", "prims"):
                    return str(op)
    return None


def _prebuild_isa_checks(options: Mapping[str, Any] | None) -> threading.Thread:
    """Start the ISA checks' builds in this process, beside the zygote's start-up (its imports
    take ~11 s on the H200 host): they land in the inductor cache the zygote shares, so its own
    checks wait for them (inductor's file lock per check) and then only load the results."""
    def run() -> None:
        with contextlib.suppress(Exception):
            from torch._inductor import cpu_vec_isa

            _check_vec_isas(cpu_vec_isa, options)

    t = threading.Thread(target=run, name="aoti_rt-isa-prebuild", daemon=True)
    t.start()
    return t


def _check_vec_isas(cpu_vec_isa: Any, options: Mapping[str, Any] | None = None) -> None:
    """Run inductor's check of each vector ISA this CPU has at once, in threads. Each check is
    a g++ build and a process that loads the result (both wait outside the GIL), and torch
    runs them one after another in a process's first compile; their results are cached per
    ISA, so pick_vec_isa then only reads them. On this repository's 2-core machine the three
    ISAs of its CPU took 2.8 s at once against 5.8 s in turn (an empty inductor cache).
    ``options`` are in force in each thread (inductor's config patches are per thread)."""
    import platform
    from concurrent.futures import ThreadPoolExecutor

    import torch._inductor.config as cfg

    if platform.machine() not in ("x86_64", "AMD64") or not hasattr(cpu_vec_isa, "x86_isa_checker"):
        return

    def check(isa: Any) -> bool:
        with cfg.patch(dict(options or {})):
            return bool(isa)

    flags = cpu_vec_isa.x86_isa_checker()
    isas = [isa for isa in getattr(cpu_vec_isa, "supported_vec_isa_list", ())
            if all(flag in flags for flag in str(isa).split())]
    if len(isas) > 1:
        with ThreadPoolExecutor(len(isas), thread_name_prefix="aoti_rt-isa") as pool:
            list(pool.map(check, isas))


def _use_fork(device: str) -> bool:
    if WORKER_START is not None:
        return WORKER_START == "fork"
    import torch

    return (device == "cpu" and sys.platform == "linux" and hasattr(os, "fork")
            and not torch.cuda.is_initialized())


class _Worker:
    """One method compiling in a worker process; :meth:`result` reads what it handed back.
    A fork of this process is waited for here; a zygote's worker through its zygote."""

    def __init__(self, job: Job, pid: int | None = None, zygote: _Zygote | None = None):
        self.job = job
        self.pid = pid
        self.zygote = zygote
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            if self.zygote is not None:
                self.returncode = self.zygote.exit_status(self.job)
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        """Stop it (a failure elsewhere, or an interrupt) and reap it."""
        if self.poll() is not None:
            return
        if self.zygote is not None:
            self.zygote.kill(self.job)           # the zygote reaps it
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)

    def result(self, keep: bool = False) -> tuple[MethodSpec, list[Any]]:
        """The worker's MethodSpec and constant bytes (spans of the files it kept, left in
        place with ``keep``), or its error."""
        wd, name = self.job.workdir, self.job.name
        if self.returncode == 0 and (wd / "result.pkl").is_file():
            method, spans, records = load_result(wd, keep)
            for phase, m, seconds in records:
                record(phase, m, seconds)
            return method, spans
        if (wd / "error.pkl").is_file():
            with open(wd / "error.pkl", "rb") as f:
                kind, message, tb = pickle.load(f)
            for error in (CompileError, NoShimError, HandoffError):      # raised again as they were
                if kind == error.__name__:
                    raise error(message)
            raise CompileError(f"method {name!r}: compiling it in a worker process failed with {kind}: "
                               f"{message}; compile(..., jobs=1) raises it in this process. The worker's "
                               f"traceback:\n{tb}")
        raise CompileError(f"method {name!r}: the worker process compiling it died (exit status "
                           f"{self.returncode}) without a result; compile(..., jobs=1) compiles in this process")


class _Records(logging.Handler):
    """A worker's timing records, handed back to the parent with its result."""

    def __init__(self, records: list[tuple[str, str | None, float]]):
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, r: logging.LogRecord) -> None:
        if hasattr(r, "phase"):
            self.records.append((r.phase, r.method, r.seconds))


def save_result(workdir: Path, method: MethodSpec, data: list[Any],
                records: list[tuple[str, str | None, float]]) -> None:
    """Write a built method into ``workdir`` (its spans' files there already, ``keep_files``):
    bytes copied from the device into ``data.bin``, then ``result.pkl``, renamed into place last."""
    _write_result(workdir, method, _write_data(workdir, data), records)


def _write_data(workdir: Path, data: list[Any]) -> list[tuple[str, int, int]]:
    spans, offset = [], 0
    with open(workdir / "data.bin", "wb") as f:
        for d in data:
            if isinstance(d, FileSpan):
                spans.append((d.file.path.name, d.offset, d.nbytes))
            else:
                f.write(d)
                spans.append(("data.bin", offset, len(d)))
                offset += len(d)
    return spans


def _write_result(workdir: Path, method: MethodSpec, spans: list[tuple[str, int, int]],
                  records: list[tuple[str, str | None, float]]) -> None:
    with open(workdir / "result.tmp", "wb") as f:
        pickle.dump((method, spans, records), f)
    os.replace(workdir / "result.tmp", workdir / "result.pkl")


def load_result(workdir: Path, keep: bool = False) -> tuple[MethodSpec, list[FileSpan], list[Any]]:
    """What :func:`save_result` wrote: the MethodSpec, its constants' bytes as open spans of the
    files in ``workdir`` (unlinked unless ``keep``: they then live while their spans do), and
    the timing records."""
    with open(workdir / "result.pkl", "rb") as f:
        method, spans, records = pickle.load(f)
    files: dict[str, OpenFile] = {}
    for name, _, _ in spans:
        if name not in files:
            files[name] = OpenFile(workdir / name)
    if not keep:
        for f in files.values():
            f.path.unlink()                  # no writeback behind the store's write
    return method, [FileSpan(files[name], offset, n) for name, offset, n in spans], records


def _run_job(job: Job, ep: ExportedProgram | Path) -> None:
    """In a worker: compile the method (``ep``, or the program saved there) and write its
    result files (renamed into place last). Constants read from AOTI's blob are handed back
    as spans of that file, kept in the work directory; bytes copied from the device are
    written to ``data.bin``."""
    records: list[tuple[str, str | None, float]] = []
    handler = _Records(records)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        if isinstance(ep, Path):
            t0 = time.perf_counter()
            ep = read_program(ep)
            timed("load", job.name, t0)
        method, data = compile_method(job, ep, keep_files=True)
        t0 = time.perf_counter()
        spans = _write_data(job.workdir, data)
        timed("handback", job.name, t0)
    finally:
        log.removeHandler(handler)
    _write_result(job.workdir, method, spans, records)


def _write_error(job: Job, e: BaseException) -> None:
    with contextlib.suppress(Exception):
        with open(job.workdir / "error.pkl", "wb") as f:
            pickle.dump((type(e).__name__, str(e), traceback.format_exc()), f)


def _start_fork(job: Job, ep: ExportedProgram) -> _Worker:
    job.workdir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Python 3.12+ warns on fork() with threads (the progress bar's); the worker only
        # compiles, and touches no lock those threads hold
        warnings.filterwarnings("ignore", message=r".*multi-threaded.*fork", category=DeprecationWarning)
        pid = os.fork()
    if pid == 0:                                 # the worker: never returns
        code = 1
        try:
            # GNU OpenMP is not fork-safe: a parent that ran parallel ATen ops (building a large
            # model does) leaves a thread team the child cannot join, and the child's first
            # parallel region (a large tensor's clone) waits forever; one thread runs none
            import torch

            torch.set_num_threads(1)
            _run_job(job, ep)
            code = 0
        except BaseException as e:  # noqa: BLE001 - handed to the parent
            _write_error(job, e)
        finally:
            os._exit(code)
    return _Worker(job, pid=pid)


class _Zygote:
    """A fresh interpreter that warms inductor up once, without initialising CUDA, and then
    forks a worker per method (:func:`_zygote_main`). The parent writes a job's work directory
    as a line to its stdin; it answers with JSON lines on its stdout: ``{"pid": ..., "dir": ...}``
    when it forked a job's worker, ``{"exit": code, "dir": ...}`` when the worker ended. Closing
    its stdin ends it once its workers have; it kills them if this process goes first."""

    def __init__(self, first: Job) -> None:
        warm = first.workdir.parent / "warm-up.pkl"    # the caller's inductor options, for its warm-up
        try:
            with open(warm, "wb") as f:
                pickle.dump(first.options, f)
        except (pickle.PicklingError, TypeError, AttributeError):
            warm.unlink(missing_ok=True)          # the job's own pickling says what is wrong
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])       # the aoti_rt this process runs
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        if "PYTORCH_NVML_BASED_CUDA_CHECK" not in env:        # torch.cuda.is_available() without cuInit;
            env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"        # its workers drop it (_zygote_main)
            env[_NVML_SET] = "1"
        code = "import sys; from aoti_rt.compile_workers import _zygote_main; sys.exit(_zygote_main(sys.argv[1]))"
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code, str(warm)], env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE)
        except OSError as e:
            raise CompileError(f"cannot start a worker process ({e}); compile with jobs=1") from e
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._buf = b""
        self._pids: dict[str, int] = {}
        self._exits: dict[str, int] = {}

    def start(self, job: Job, ep: ExportedProgram, whole: bool = False) -> _Worker:
        """Write ``ep`` (its CUDA tensors as IPC handles, or ``whole``) and ``job`` in the job's
        work directory and have a worker compile it."""
        job.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_program(ep, job.workdir / "program.pt2", job.mutated, whole=whole)
        timed("save", job.name, t0)
        try:
            with open(job.workdir / "job.pkl", "wb") as f:
                pickle.dump(job, f)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise CompileError(f"method {job.name!r}: an inductor option cannot be handed to a worker "
                               f"process ({e}); compile with jobs=1") from e
        try:
            self.proc.stdin.write(os.fsencode(job.workdir) + b"\n")
            self.proc.stdin.flush()
        except OSError:
            pass                                  # it died: exit_status says so
        return _Worker(job, zygote=self)

    def _read(self) -> None:
        while True:
            try:
                chunk = self.proc.stdout.read()
            except OSError:
                chunk = None
            if not chunk:
                break
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            msg = json.loads(line)
            if "warm" in msg:
                record("warm-up", None, msg["warm"])
                record("isa", None, msg.get("isa", 0.0))
            elif "pid" in msg:
                self._pids[msg["dir"]] = msg["pid"]
            else:
                self._exits[msg["dir"]] = msg["exit"]

    def exit_status(self, job: Job) -> int | None:
        """The exit status of ``job``'s worker, None while it runs (-1: the zygote died)."""
        self._read()
        key = os.fsdecode(job.workdir)
        if key in self._exits:
            return self._exits[key]
        if self.proc.poll() is not None:
            self._read()
            return self._exits.get(key, -1)
        return None

    def kill(self, job: Job) -> None:
        self._read()
        pid = self._pids.get(os.fsdecode(job.workdir))
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def close(self) -> None:
        """End it: once its workers have ended, or at once (with them) within 10 s."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


#: set in the zygote's environment when aoti_rt (not the caller) set PYTORCH_NVML_BASED_CUDA_CHECK
_NVML_SET = "AOTI_RT_ZYGOTE_SET_NVML_CHECK"


def _zygote_main(warm: str) -> int:
    """The zygote's loop (see :class:`_Zygote`): warm up (with the inductor options pickled in
    ``warm``, if it exists), then fork a worker per line read."""
    import select

    import torch

    proto = os.dup(1)                      # the answers; anything else printed goes to stderr
    os.dup2(2, 1)
    t0 = time.perf_counter()
    options = None
    with contextlib.suppress(OSError, pickle.UnpicklingError, EOFError):
        with open(warm, "rb") as f:
            options = pickle.load(f)
    isa = warm_up_inductor(options)
    # a fork of a process that initialised CUDA cannot use it; were the warm-up ever to, the
    # workers are fresh interpreters instead (they pay the start-up, but work)
    fork = not torch.cuda.is_initialized()
    workers: dict[int, str] = {}           # pid -> work directory
    procs: dict[str, subprocess.Popen] = {}
    buf, stdin_open = b"", True

    def send(msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the parent gone: its stdin's end kills the workers
            os.write(proto, json.dumps(msg).encode() + b"\n")

    send({"warm": time.perf_counter() - t0, "isa": isa})

    while stdin_open or workers or procs:
        ready = select.select([0], [], [], 0.05)[0] if stdin_open else []
        if ready:
            chunk = os.read(0, 65536)
            if not chunk:                  # the parent closed it, or died: workers still
                stdin_open = False         # running are not wanted (a failure elsewhere)
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                for p in procs.values():
                    p.kill()
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                workdir = os.fsdecode(line)
                if fork:
                    pid = os.fork()
                    if pid == 0:
                        code = 1
                        try:
                            os.close(proto)
                            os.close(0)
                            if os.environ.pop(_NVML_SET, None):   # the worker as the caller's env has it
                                os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
                            code = _worker_main(workdir)
                        finally:
                            sys.stderr.flush()
                            os._exit(code)
                    workers[pid] = workdir
                else:
                    code = "import sys; from aoti_rt.compile_workers import _worker_main; sys.exit(_worker_main(sys.argv[1]))"
                    p = subprocess.Popen([sys.executable, "-c", code, workdir], stdin=subprocess.DEVNULL)
                    procs[workdir], pid = p, p.pid
                send({"pid": pid, "dir": workdir})
        for pid in list(workers):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                send({"exit": os.waitstatus_to_exitcode(status), "dir": workers.pop(pid)})
        for workdir, p in list(procs.items()):
            if p.poll() is not None:
                send({"exit": p.returncode, "dir": workdir})
                del procs[workdir]
    return 0


def _worker_main(workdir: str) -> int:
    """A worker's entry point (forked by the zygote): load the job and the saved program, run it."""
    with open(Path(workdir) / "job.pkl", "rb") as f:
        job = pickle.load(f)
    try:
        with quiet_torch_deprecations():
            _run_job(job, Path(workdir) / "program.pt2")
        return 0
    except BaseException as e:  # noqa: BLE001 - handed to the parent
        _write_error(job, e)
        return 1
