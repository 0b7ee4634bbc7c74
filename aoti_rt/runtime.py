"""Method and Model: run a bundle's methods with one copy of each weight.

Data flows one way: :func:`aoti_rt.load` reads and checks a bundle; each :class:`Method`
acquires its weights from the device's :class:`~aoti_rt._cache.WeightCache` under typed keys
(:mod:`aoti_rt.acquire`: the key policy, reading only the weights nobody holds yet) and binds
them to its AOTI container through the binder chosen for its .so (:mod:`aoti_rt.binders`: one
``UpdateUserManagedConstantBufferPairs`` call, or torch's runner for a .so that calls operators
through AOTI's proxy executor). Closing (or dropping) a method releases its references; a
weight's memory goes with its last user.

Bundles, ``.pt2`` packages and stock artifacts build the same :class:`Method`: what differs is
described by a :class:`~aoti_rt.binders.MethodFiles` (the .so, its kernel folder, whether it
embeds its weights) and a :class:`~aoti_rt.acquire.WeightSource` (the store and its table).

Updates rebind through a public API: :meth:`Method.bindings` (what each constant is bound to
now, and under which key), :meth:`Method.rebind` (bind some constants to other buffers, all or
nothing, under the launch lock) and :meth:`Method.launch_lock`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _bind, _cache, _memory, acquire as _acquire, device as _device, loader, serving
from .abi import SharedObject
from .acquire import Replicas, Verify, WeightSource, weight_source
from .binders import MethodFiles, PairsBinder, RunnerBinder, bind_private, extern_kernels, so_owned
from .bundle import DTYPE_CODES, ITEMSIZE, Bundle, ConstantSpec, MethodSpec, divergent_fqns
from .calls import CallSignature, FirstRun
from .device import Device
from .errors import AOTIError, AotiRtError, BundleError, ClosedError, DeviceError, InputError
from .update import update_weights as _update_weights
from .views import buffer_view, raw_view

if TYPE_CHECKING:
    from .update import UpdateReport

__all__ = ["Method", "Model", "BoundConstant", "MethodFiles", "WeightSource", "weight_source", "bind_plan",
           "buffer_view", "raw_view", "Verify", "device_for"]


@dataclass(frozen=True)
class BoundConstant:
    """What one constant of a method is bound to now (:meth:`Method.bindings`).

    Attributes:
        index: the constant's index (manifest order: what :meth:`Method.rebind` takes).
        fqn: its FQN.
        constant: its :class:`~aoti_rt.bundle.ConstantSpec` (dtype, shape, view).
        buffer: the Buffer bound now.
        key: the cache key it was acquired under (its ``scope`` says whose it is), or None
            for a buffer the method holds privately (bound by :meth:`Method.rebind`).
        mutable: the weight is the instance's state, written in place by some method.
    """

    index: int
    fqn: str
    constant: ConstantSpec
    buffer: _memory.Buffer
    key: _cache.WeightKey | None
    mutable: bool


class _Binding:
    """What a live method holds: its container, its weight references. Freed exactly once."""

    def __init__(self, so: SharedObject, handle: int, rt: _device.DeviceRuntime, hold: int | None):
        self.so = so
        self.handle = handle
        self.rt = rt
        self.acq: _cache.Acquisition | None = None
        self.legacy_bytes = 0
        #: torch's AOTI runner, for a .so that calls operators through a proxy executor
        #: (it owns the container then; ``handle`` is 0)
        self.runner: RunnerBinder | None = None
        self.hold = hold
        self._done = False
        self._lock = threading.Lock()

    def free(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        try:
            with contextlib.ExitStack() as guard:
                try:
                    guard.enter_context(_device.device_guard(self.rt.device))  # AOTI frees its objects there
                except Exception:  # noqa: BLE001 - at interpreter exit torch may be gone: delete anyway
                    pass
                self.runner = None                    # its destructor deletes its container
                if self.handle:
                    self.so.abi.delete(self.handle)   # the container stops pointing at our memory first
        finally:
            self.handle = 0
            if self.legacy_bytes:
                self.rt.count_legacy(-1, -self.legacy_bytes)
            if self.acq is not None:
                self.rt.cache.release(self.acq)
                self.acq = None
            self.so.release()                 # the last method of a .so unloads it
            if self.hold is not None:
                os.close(self.hold)           # the kernel folder may go now
                self.hold = None


class Method:
    """One callable method of a model: ``method(*args, **kwargs)`` runs it (:meth:`__call__`).

    Returns what the exported program returns (a tensor, or the tuple/pytree of its call
    spec). Inputs are checked (structure, names, fixed values, dtype, device, rank, static
    sizes, dynamic ranges) before AOTI runs.
    Thread-safe: calls may run concurrently; :meth:`close` waits for running calls.

    Built from a :class:`~aoti_rt.binders.MethodFiles` (or a .so path) and a
    :class:`~aoti_rt.acquire.WeightSource`, on a device's
    :class:`~aoti_rt.device.DeviceRuntime` (:attr:`runtime`).
    """

    def __init__(self, name: str, spec: MethodSpec, so: "Path | MethodFiles", source: WeightSource,
                 rt: _device.DeviceRuntime, *, progress: bool | None = None,
                 typed_inputs: bool = True, max_load_gbps: float | None = None,
                 replicas: Replicas | None = None):
        files = so if isinstance(so, MethodFiles) else MethodFiles(Path(so))
        self.name = name
        self.spec = spec
        #: the device it runs on, as torch spells it ("cpu", "cuda:0")
        self.device = str(rt.device)
        #: the device's runtime (allocator, weight cache, loader) this method's weights live in
        self.runtime = rt
        self._gate = _bind.CallGate()     # calls in flight; close() waits for them
        self._launch_owner: int | None = None
        self.bytes_read = 0      # weight bytes this method's load read from disk
        # per constant (manifest order): the buffer bound, its key (None: held privately),
        # whether it is the instance's state, and its weight's slot in the acquisition
        self._bound: list[_memory.Buffer] = []
        self._keys: list[_cache.WeightKey | None] = []
        self._mutable: list[bool] = []
        self._slot: list[int] = []
        self._fqn_index: dict[str, int] = {}
        self._runner: RunnerBinder | None = None
        self._binder: PairsBinder | RunnerBinder | None = None
        #: a replicated load this method is part of: its weights are read by the group, for
        #: every device at once (:class:`~aoti_rt.acquire.Replicas`); None: it reads its own
        self._replicas = replicas
        self._pending: _acquire.Pending | None = None
        try:
            if replicas is None and (source.share is None or source.share.reads_store):
                loader.prepare(rt)     # pin the staging pool (once per device) while the .so opens
            # AOTI's CreateWithDevice makes its device current on this thread, and its calls below
            # run on the current device: the caller's current device is restored afterwards
            with _device.device_guard(rt.device):
                self._construct(files, source, progress, typed_inputs, max_load_gbps)
        except BaseException:
            if files.hold is not None and getattr(self, "_binding", None) is None:
                os.close(files.hold)
            raise

    def _construct(self, files: MethodFiles, source: WeightSource, progress: bool | None, typed_inputs: bool,
                   max_load_gbps: float | None) -> None:
        name, spec, rt = self.name, self.spec, self.runtime
        so = SharedObject.open(files.so)
        try:
            # False: a legacy .so, weights private to AOTI
            self.shared = so.has("UpdateUserManagedConstantBufferPairs")
            handle = so.abi.create(self.device, files.kernel_dir)
        except BaseException:
            so.release()
            raise
        self._binding = _Binding(so, handle, rt, files.hold)
        self._finalizer = weakref.finalize(self, self._binding.free)
        try:
            n_out = so.abi.num_outputs(handle)
            n_in = so.abi.num_inputs(handle)
            # a bundle describes every input; a stock artifact what its record read (who
            # checks what, aoti_rt or the .so's own checks: CallSignature's docstring)
            if typed_inputs and len(spec.inputs) != n_in:
                raise BundleError(f"method {name!r}: the manifest describes {len(spec.inputs)} inputs but "
                                  f"{so.path.name} takes {n_in}; the bundle is inconsistent, recompile it")
            self._signature = CallSignature(name, spec, n_in, n_out, self.device, so, stock=not typed_inputs)
            try:
                plan = bind_plan(spec.constants, f"method {name!r}", files.compiled_views, spec.so_owned)
            except ValueError as e:
                raise BundleError(f"method {name!r}: {e}; the bundle is inconsistent, recompile it") from None
            # the .so's constant table must be the manifest's: count, names, dtypes (one C loop)
            plan.check(so.abi, handle)
            if self.shared and not plan.checked:
                raise AOTIError(f"method {name!r}: {so.path.name} has the Pairs entry point but not "
                                f"GetConstantDataSize, so the memory its kernels assume cannot be checked; "
                                f"recompile it with a newer torch")
            self._plan, self.folds = plan, plan.folded > 0    # public: its .so folds constants at run time
            extern = extern_kernels(so, name, self.shared)
            if self.shared:
                # AOTI's own copy of embedded weights (made by CreateWithDevice) goes before
                # anything is loaded, where the .so can swap constant buffers
                self._binding.legacy_bytes = so_owned(so, handle, name, spec, plan, rt, files.embedded, source)
                self._bind_shared(source, progress, max_load_gbps, extern)
            else:
                self._binding.legacy_bytes = bind_private(so, handle, name, spec.constants, plan, source, rt,
                                                          files.embedded, files.private_blob)
        except BaseException as e:
            if self._pending is not None:     # entries created and not published: failed
                _acquire.publish(rt, self._pending, error=e)
            self._finalizer()
            raise
        rt.sample()
        self._n_out = n_out
        self._abi = FirstRun(so)      # its first Run sets the .so's own input checks
        self._where = f"method {name!r}"
        self._prepare_calls()

    # -- binding --------------------------------------------------------------------------

    def _bind_shared(self, source: WeightSource, progress: bool | None, max_load_gbps: float | None,
                     extern: Path | None) -> None:
        """Acquire the method's weights, fill those nobody holds from the store, and bind them:
        in one go, or, in a replicated load, the fill and the bind later, when the group has
        read the weights for every device."""
        rt = self.runtime
        pending = self._pending = _acquire.acquire(rt, source, self.spec.constants, self._plan)
        self._binding.acq = pending.acq
        self._extern = extern
        if self._replicas is not None:
            self._replicas.defer(rt, pending, self._bind_acquired)
            return
        try:
            n = _acquire.read(rt, pending, progress, max_load_gbps)
        except BaseException as e:
            _acquire.publish(rt, pending, error=e)
            raise
        _acquire.publish(rt, pending, n)
        self._bind_acquired(pending)

    def _bind_acquired(self, pending: _acquire.Pending) -> None:
        """Wait for the weights other threads fill, then bind every buffer to the container."""
        rt, b = self.runtime, self._binding
        acq = pending.acq
        rt.cache.wait(acq)
        self.bytes_read = pending.bytes_read
        share = pending.source.share
        if share is not None:      # an exporter's arena is complete: make it read-only, serve it
            share.filled(pending.keys, acq, pending.weights, pending.need, pending.fixed)
        if self._extern is None:
            binder: PairsBinder | RunnerBinder = PairsBinder(b.so, b.handle, self._plan, rt)
        else:
            # the container made for the checks goes: the runner's is the one that runs
            b.so.abi.delete(b.handle)
            b.handle = 0
            binder = b.runner = self._runner = RunnerBinder(b.so, self._extern, self.spec.constants, rt, self.name)
        bound = pending.bound()
        binder.bind(bound)
        self._binder = binder
        self._slot = list(pending.of_constant)
        self._bound = bound
        self._keys = [pending.keys[i] for i in self._slot]
        self._mutable = [pending.weights[i].mutable for i in self._slot]
        self._fqn_index = {c.fqn: i for i, c in enumerate(self.spec.constants)}
        self._pending = None

    @property
    def through_runner(self) -> bool:
        """Whether calls go through torch's own AOTI runner (a .so that calls custom ops)."""
        return self._runner is not None

    # -- rebinding (weight updates) ----------------------------------------------------------

    def bindings(self) -> list[BoundConstant]:
        """What each constant is bound to now, in manifest order (empty for a .so whose
        weights AOTI holds privately: :attr:`shared` is False).

        Raises:
            ClosedError: the method is closed."""
        if self._gate.is_closed:
            raise ClosedError(f"method {self.name!r} is closed")
        cache = self.runtime.cache
        return [BoundConstant(i, c.fqn, c, self._bound[i], self._named(i, cache), self._mutable[i])
                for i, c in enumerate(self.spec.constants[:len(self._bound)])]

    def _named(self, i: int, cache: _cache.WeightCache) -> _cache.WeightKey | None:
        """The key constant ``i``'s buffer is cached under now, or None: the buffer is this
        method's own (a rebound copy, or an entry taken over: no key names it any more)."""
        key = self._keys[i]
        return key if key is not None and cache.buffer(key) is self._bound[i] else None

    @contextlib.contextmanager
    def launch_lock(self) -> Iterator[None]:
        """Hold this method's launch lock: no call launches (calls wait) until the block
        ends, so an update can write several buffers and :meth:`rebind` as one step. Calls
        already launched on a CUDA stream are not waited for: synchronize the stream.
        Not reentrant across threads; :meth:`rebind` inside the block does not take it again."""
        self._gate.lock_launch()
        runner = self._runner
        try:
            if runner is not None:
                runner.lock.acquire()
            self._launch_owner = threading.get_ident()
            try:
                yield
            finally:
                self._launch_owner = None
                if runner is not None:
                    runner.lock.release()
        finally:
            self._gate.unlock_launch()

    def rebind(self, buffers: Mapping[int, _memory.Buffer], *, release: bool = True) -> None:
        """Bind constant ``index`` to ``buffer`` for each item; the others keep theirs.

        Done under the launch lock (no call launches half-rebound) and all or nothing: if the
        container refuses, it is bound as before and the error raised. Afterwards this method
        holds a reference to each new buffer (the Buffer keeps its memory alive), and gives
        back the cache entries it no longer binds (their keys are no longer reported by
        :meth:`bindings`). With ``release=False`` it keeps them until :meth:`release_unbound`,
        so that rebinding the old buffers undoes the rebind exactly (an update that rebinds
        several methods all or none). Memory still read by calls already launched on a CUDA
        stream must be kept alive by the caller until the stream passes them.

        Raises:
            InputError: an index out of range, a value that is not a Buffer, a buffer on
                another device or smaller than the constant's view needs.
            AotiRtError: the method's weights are private to AOTI (:attr:`shared` False).
            ClosedError: the method is closed.
        """
        if self._gate.is_closed:
            raise ClosedError(f"method {self.name!r} is closed")
        if self._binder is None:
            raise AotiRtError(f"method {self.name!r} runs a .so without UpdateUserManagedConstantBufferPairs: "
                              f"AOTI holds its weights privately and they cannot be rebound; recompile it "
                              f"with torch >= 2.10")
        new = list(self._bound)
        for i, buf in buffers.items():
            if type(i) is not int or not 0 <= i < len(new):
                raise InputError(f"rebind: method {self.name!r} has constants 0..{len(new) - 1}, not {i!r}")
            if not isinstance(buf, _memory.Buffer):
                raise InputError(f"rebind: constant {i} needs an aoti_rt Buffer, not {type(buf).__name__}")
            if str(buf.device) != self.device or buf.nbytes < self._plan.need(i):
                raise InputError(f"rebind: constant {i} ({self.spec.constants[i].fqn}) needs {self._plan.need(i)} "
                                 f"bytes on {self.device}; the buffer has {buf.nbytes} on {buf.device}")
            new[i] = buf
        held = self._launch_owner == threading.get_ident()
        with contextlib.nullcontext() if held else self.launch_lock(), _device.device_guard(self.runtime.device):
            try:
                self._binder.bind(new)
            except BaseException:
                self._binder.bind(self._bound)      # as it was
                raise
        self._bound = new
        if release:
            self.release_unbound()

    def release_unbound(self) -> None:
        """Give the cache back the entries no constant of this method binds any more (after a
        :meth:`rebind` with ``release=False``); the acquisition holds the first new buffer of
        that weight in their place, privately."""
        acq, new = self._binding.acq, self._bound
        if acq is None:
            return
        for j in sorted(set(self._slot)):
            users = [k for k, s in enumerate(self._slot) if s == j]
            if users and all(new[k] is not acq.buffers[j] for k in users):
                self.runtime.cache.replace(acq, j, new[users[0]])

    # -- calling --------------------------------------------------------------------------

    def _prepare_calls(self) -> None:
        """What each call needs beyond its inputs' checks (the signature's): Run's handle
        conversions, the device's context and the current stream's getter."""
        import torch

        # tensors as the handles Run steals, and its output handles as tensors
        self._to_handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors
        self._from_handles = torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs
        self._flatten = self._signature.flatten
        self._outputs = self._signature.outputs
        rt = self.runtime
        #: the device's primary context, made current around each Run (ModelABI.run)
        self._context = rt.context if rt.is_cuda else 0
        if rt.is_cuda:
            raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
            index = rt.index
            self._stream = (lambda: raw(index)) if raw is not None else \
                (lambda: torch.cuda.current_stream(index).cuda_stream)
        else:
            self._stream = lambda: 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the method on its inputs, as the exported forward was called.

        Args:
            *args, **kwargs: the exported program's inputs. Keywords are matched to the
                exported argument names; inputs exported as keywords must be passed so.
                Non-tensor inputs must equal the value export fixed them to; tensors must have
                the exported dtype, device, static sizes and dynamic ranges. Non-contiguous
                tensors are copied to the layout the kernels were compiled for.

        Returns:
            What the exported program returns (a tensor, a tuple, or its output pytree).
            Outputs never require grad: AOTI has no autograd (an input that requires grad
            warns once per method while grad mode is on).

        Raises:
            InputError: an input is missing, unknown, repeated, of the wrong structure, type,
                dtype, device or size, or a fixed input has another value.
            ClosedError: the method was closed. AOTIError: the .so's own run failed.
        """
        self._gate.enter(self._where)
        try:
            leaves = self._flatten(args, kwargs)
            if self._runner is None:
                outs = self._abi.run(self._binding.handle, self._to_handles(list(leaves)), self._n_out,
                                     self._stream(), self._where, self._gate, self._context)
                tensors = self._from_handles(outs)
            else:
                tensors = self._runner.run(leaves, self._stream(), self._where)
        finally:
            self._gate.exit()
        return self._outputs(tensors)

    # -- weights --------------------------------------------------------------------------

    @property
    def constants(self) -> list[str]:
        """The FQNs of the constants this method binds."""
        return [c.fqn for c in self.spec.constants]

    def binds(self, fqn: str) -> bool:
        """Whether this method binds a constant ``fqn`` that :meth:`weight` can return."""
        return fqn in self._fqn_index

    def weight(self, fqn: str):
        """The value of a bound constant as a tensor.

        For this instance's own state (a buffer some method writes in place, e.g. a KV cache)
        it is a view of the live memory: writes through it change what this instance computes,
        and it keeps the memory alive after close. A weight is shared by content with every
        other model on the device, so it comes back as a copy: no caller can change what
        another model computes through it.
        """
        if self._gate.is_closed:
            raise ClosedError(f"method {self.name!r} is closed")
        i = self._fqn_index.get(fqn)
        if i is None:
            raise KeyError(f"method {self.name!r} binds no shared constant {fqn!r}")
        view = buffer_view(self._bound[i], self.spec.constants[i])
        return view if self._mutable[i] else view.clone()

    @property
    def closed(self) -> bool:
        return self._gate.is_closed

    def close(self) -> None:
        """Wait for running calls and for an update rebinding it (its launch lock), then delete
        the container and release this method's weights."""
        self._gate.close()
        with self.launch_lock():
            self._bound, self._fqn_index = [], {}
            self._finalizer()

    def __enter__(self) -> "Method":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.device
        return f"<aoti_rt.Method {self.name} ({len(self.spec.constants)} constants, {state})>"


def device_for(device: "str | Device | None", compiled: str | None = None) -> Device:
    """The device a load runs on, decided once at the API's edge (every loader asks here).

    ``device`` as given ("cpu", "cuda", "cuda:N", a Device or a torch.device), parsed and
    checked to exist; None: the device type the artifact was compiled for (``compiled``,
    "cpu" or "cuda": torch's current CUDA device), or where that is unknown (a stock
    artifact), the current CUDA device if there is one, else the CPU.

    Raises:
        DeviceError: an unknown device name, or a CUDA device this machine lacks."""
    if device is None and compiled is None:
        compiled = "cuda" if _device.cuda_available() else "cpu"
    return Device.parse(device, default=compiled or "cpu")


def bind_plan(constants: Sequence[ConstantSpec], where: str = "method", compiled: bool = False,
              keep: Sequence[str] = ()) -> _bind.BindPlan:
    """A method's constants (manifest order) as the C arrays of one Pairs call; ``where``
    names the method in the plan's errors; ``compiled``: the views are the .so's own (a
    package's); ``keep``: constants the .so keeps as its own."""
    return _bind.BindPlan([c.name for c in constants], [DTYPE_CODES[c.dtype] for c in constants],
                           [ITEMSIZE[c.dtype] for c in constants],
                           [c.shape for c in constants], [c.stride for c in constants],
                           [c.storage_offset for c in constants], [c.fqn for c in constants], where, compiled,
                           keep)


def _method_names(bundle: Bundle, methods: Sequence[str] | None) -> list[str]:
    """The methods to load (default: all), each checked to be in the bundle."""
    names = list(bundle.manifest.methods) if methods is None else list(methods)
    for name in names:
        if name not in bundle.manifest.methods:
            raise BundleError(f"bundle has no method {name!r}; it has {list(bundle.manifest.methods)}")
    return names


class Model:
    """A loaded bundle: its methods, sharing one copy of each weight.

    ``model["decode"]`` or ``model.decode`` gives a :class:`Method`; ``model.methods`` lists
    the names. Use ``with aoti_rt.load(path) as model:`` or call :meth:`close`. Loaded with
    ``share=name``, :attr:`share` says whether it exports its weights or maps another
    process's.
    """

    _share: Any = None

    def __init__(self, bundle: Bundle, device: "str | Device | None" = None, *, methods: Sequence[str] | None = None,
                 progress: bool | None = None, verify: "Verify | bool | str" = Verify.ON_DEMAND,
                 max_load_gbps: float | None = None, share: str | None = None):
        rt = _device.get(device_for(device, "cpu" if bundle.manifest.device == "cpu" else "cuda"))
        self._start(bundle, rt)
        source = weight_source(bundle.store_path, bundle.manifest.weights, verify=verify)
        names = _method_names(bundle, methods)
        if share is not None:
            self._share = source.share = serving.begin(bundle, rt, share, names, verify=source.verify.value)
            # a model dropped without close() stops serving and detaches all the same
            weakref.finalize(self, self._share.close)
        try:
            for name in names:
                self._methods[name] = Method(name, bundle.manifest.methods[name], bundle.so_path(name),
                                             source, rt, progress=progress, max_load_gbps=max_load_gbps)
            if self._share is not None:
                self._share.ready(self)   # an exporter starts serving, a client follows its updates
        except BaseException:
            self.close()
            raise
        self._warn_divergent()

    def _start(self, bundle: Bundle | None, rt: _device.DeviceRuntime) -> None:
        """What every model starts with (a bundle's, a package's): no method yet."""
        self.bundle = bundle
        self.manifest = None if bundle is None else bundle.manifest
        #: the device it runs on, as torch spells it ("cpu", "cuda:0")
        self.device = str(rt.device)
        self._methods: dict[str, Method] = {}

    def _warn_divergent(self) -> None:
        for fqn, first, other in divergent_fqns({n: m.spec for n, m in self._methods.items()}):
            warnings.warn(f"{fqn} has a different dtype/shape/stride or value in methods {first!r} "
                          f"and {other!r}: each binds a private copy", stacklevel=4)

    @classmethod
    def replicated(cls, bundle: Bundle, devices: Sequence["str | Device"], *,
                   methods: Sequence[str] | None = None, progress: bool | None = None,
                   verify: "Verify | bool | str" = Verify.ON_DEMAND,
                   max_load_gbps: float | None = None) -> list["Model"]:
        """One Model of ``bundle`` per device, each weight read from the store once.

        What ``aoti_rt.load(path, device=[...])`` does for a bundle: the same as one
        :class:`Model` per device (each device's cache holds its own copy, each model its own
        state), but the weights the devices lack are read once and copied to every device
        from the same staging buffer (:func:`aoti_rt.loader.read_replicated`). A failure on
        any device frees what was allocated on all of them.
        """
        rts = [_device.get(d) for d in devices]
        if len({rt.device for rt in rts}) != len(rts):
            raise DeviceError(f"each device may appear once in {[str(rt.device) for rt in rts]}")
        names = _method_names(bundle, methods)
        models = []
        for rt in rts:
            m = cls.__new__(cls)
            m._start(bundle, rt)
            models.append(m)
        # each device its own model instance (its own mutable state); one store for all
        sources = [weight_source(bundle.store_path, bundle.manifest.weights, verify=verify) for _ in rts]
        loader.prepare(rts[0])     # the first device's pool stages for all (the others lend streams)
        group = Replicas(progress, max_load_gbps)
        try:
            for name in names:
                spec = bundle.manifest.methods[name]
                for model, rt, source in zip(models, rts, sources):
                    model._methods[name] = Method(name, spec, bundle.so_path(name), source, rt, progress=progress,
                                                  max_load_gbps=max_load_gbps, replicas=group)
                group.fill()
        except BaseException as e:
            group.abandon(e)
            for model in models:
                model.close()
            raise
        models[0]._warn_divergent()
        return models

    @property
    def methods(self) -> list[str]:
        """The names of the loaded methods."""
        return list(self._methods)

    def method_list(self) -> list[Method]:
        """The loaded :class:`Method` objects, in :attr:`methods` order."""
        return list(self._methods.values())

    def __getitem__(self, name: str) -> Method:
        try:
            return self._methods[name]
        except KeyError:
            raise KeyError(f"no method {name!r}; this model has {self.methods}") from None

    def __getattr__(self, name: str) -> Method:
        methods = self.__dict__.get("_methods")
        if methods is not None and name in methods:
            return methods[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or method {name!r}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._methods))

    def weight(self, fqn: str):
        """A weight (a copy) or this instance's state (a live view); see :meth:`Method.weight`."""
        if self.closed:
            raise ClosedError("the model is closed")
        for m in self._methods.values():
            if m.binds(fqn):
                return m.weight(fqn)
        raise KeyError(f"no method of this model binds {fqn!r}")

    def update_weights(self, weights: "Mapping[str, Any] | str | os.PathLike[str]", *, shared: bool = True,
                       strict: bool = True, progress: bool | None = None, atomic: bool = True) -> "UpdateReport":
        """Write new values into the named weights of this model, and only those: see
        :func:`aoti_rt.update.update_weights` and ``docs/contract.md``.

        Args:
            weights: ``{fqn: tensor}`` (a plain dense tensor on any device, of the constant's
                dtype and shape), or the path of a safetensors file whose tensor names are FQNs.
            shared: True (default): memory this model owns alone is written in place (its state,
                its copies, an exporter's arena: its clients see it); a weight the cache holds
                for other models too is copied, one it holds for this model alone taken over.
                False: every updated weight a copy of this model's own.
            strict: refuse FQNs this model does not bind (False: ignore them).
            atomic: an exporter's arena gets a new generation its clients switch to at once (False: in place).

        Calls from other threads see all old or all new weights; every value is checked before
        anything is written.

        Returns:
            An :class:`aoti_rt.update.UpdateReport`.

        Raises:
            InputError: an unknown FQN (with ``strict``), a value of the wrong kind, dtype or
                shape, an in-place update of weights mapped from another process.
            BundleError: a safetensors file that is truncated or corrupt.
        """
        if self.closed:
            raise ClosedError("the model is closed")
        return _update_weights(self, weights, shared=shared, strict=strict, progress=progress, atomic=atomic)

    def close(self) -> None:
        """Close every method; memory no other model uses is freed.

        A model that exports its weights (``share=``) stops serving first; what attached
        processes mapped stays theirs until they let go. A client detaches."""
        share = self._share
        if share is not None:
            share.stop()
        for m in self._methods.values():
            m.close()
        if share is not None:
            share.close()

    @property
    def closed(self) -> bool:
        return all(m.closed for m in self._methods.values())

    @property
    def share(self) -> "serving.ShareInfo | None":
        """How this model shares its weights across processes (loaded with ``share=name``):
        a :class:`aoti_rt.serving.ShareInfo` (role ``"exporter"`` or ``"client"``, clients
        attached now, arena bytes, ...), or None for a model loaded without ``share=``."""
        return None if self._share is None else self._share.info()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<aoti_rt.Model {self.bundle.root.name} methods={self.methods} on {self.device}>"


