"""Method and Model: run a bundle's methods with one copy of each weight.

Data flows one way: :func:`load` reads and checks a bundle, each :class:`Method` acquires its
weights from the device's :class:`~aoti_rt._cache.WeightCache` (reading from the store only
the weights nobody holds yet), and binds them to its AOTI container in one
``UpdateUserManagedConstantBufferPairs`` call. Closing (or dropping) a method releases its
references; a weight's memory goes with its last user. A method whose .so calls operators
through AOTI's proxy executor (custom ops: ``<method>.json`` beside it) runs through torch's
own runner instead, with the same buffers bound to the runner's container.

Cache keys (a bundle is untrusted input: nothing it claims may change what another bundle
computes):

* an immutable weight is keyed by content *within its bundle* (the bundle's identity, its
  digest and byte size): shared by the bundle's methods and instances;
* it is also named by its content key alone (digest and byte size), shared by every bundle
  on the device, once its bytes were verified against the digest (hashed while loading with
  ``verify="load"``, or on demand when a second bundle wants it: the store the cached copy
  was read from is hashed, and the entry aliased) and only if the .so itself reports it as a
  parameter or tensor constant (a buffer the .so might write whatever the manifest says is
  never shared across bundles); two bundles whose FQNs collide but whose values differ
  never share;
* a mutable buffer (written in place by some method, e.g. a KV cache) is keyed by the model
  instance and the weight, so the methods of one Model share it and a second ``load`` of the
  same bundle gets fresh state initialised from the store.

Across processes (``load(..., share=name)``, :mod:`aoti_rt.serving`): an exporting model
places its immutable weights (read-only kinds that are never written) in a shared arena under
keys of its own (``share:<name>:...|`` + the bundle key), so that they are the arena's even if
this process caches the bundle privately too; a client caches the Buffers it maps under the
keys above, which its methods then find.

Every buffer is at least as large as what the .so may reach through the constant bound to it
(:meth:`aoti_rt._bind.BindPlan.need`: the view's start plus ``GetConstantDataSize``), so a
manifest whose views are smaller than the compiled ones cannot make a kernel read or write
outside its buffer.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from . import _bind, _cache, _memory, device as _device, loader, serving
from .abi import SharedObject, blob_layout, torch_shim
from .bundle import (DTYPE_CODES, ITEMSIZE, Bundle, ConstantSpec, MethodSpec,
                     WeightSpec, divergent_fqns, file_identity, is_regular_file, read_bundle)
from .calls import CallSignature
from .digest import file_digests
from .device import Device
from .errors import AOTIError, BundleError, ClosedError, DeviceError, ShareError
from .share import check_name

if TYPE_CHECKING:
    from .update import UpdateReport

_instance_ids = itertools.count(1)
#: .so constant type codes whose memory generated code never writes (model_base.h)
_READ_ONLY_KINDS = (1, 3)    # parameter, tensor constant


@dataclass
class _Source:
    """Where a method's weights come from: a store file and its weight table."""

    store: Path
    weights: dict[str, WeightSpec]
    scope: str          # instance token for mutable state
    bundle: str = ""    # identity of the bundle (or artifact) for content it alone vouches for
    #: True: share with other bundles only verified content (checked on demand); "load":
    #: check every weight while loading too; False: share within the bundle only
    verify: bool | str = False
    #: the model's part in sharing weights across processes (aoti_rt.serving), or None
    share: Any = None


def source_scope(path: Path) -> str:
    """A token naming one bundle (or stock artifact) on disk: its path and the store's identity."""
    return f"{Path(path).resolve()}@{file_identity(Path(path))}"


def weight_source(store: Path, weights: dict[str, WeightSpec], *, verify: bool | str = True,
                  scope: str | None = None) -> _Source:
    """The weights of one new model instance read from ``store`` (a bundle's store or a stock
    artifact's blob): its own mutable state (or ``scope``'s, to share it with the sources of
    the same instance), its store's scope for unverified content."""
    return _Source(Path(store), weights, scope or f"model{next(_instance_ids)}",
                   bundle=source_scope(Path(store)), verify=verify)


class _Binding:
    """What a live method holds: its container, its weight references. Freed exactly once."""

    def __init__(self, so: SharedObject, handle: int, rt: _device.DeviceRuntime):
        self.so = so
        self.handle = handle
        self.rt = rt
        self.acq: _cache.Acquisition | None = None
        self.legacy_bytes = 0
        #: torch's AOTI runner, for a .so that calls operators through a proxy executor
        #: (it owns the container then; ``handle`` is 0)
        self.runner = None
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


@dataclass
class _Pending:
    """A method's weights between acquiring them and binding them: which entries it created
    (``acq.to_fill``) and what filling and binding them needs."""

    source: _Source
    plan: _bind.BindPlan
    extern: Path | None
    keys: list[str]
    content: list[str | None]
    weights: list[WeightSpec]
    of_constant: list[int]
    acq: _cache.Acquisition
    read_from: tuple | None
    need: list[int]          # the bytes each weight's buffer holds
    fixed: list[bool]        # never written: what an exporter shares read-only (load(share=))
    published: bool = False

    def digests(self) -> list[str | None] | None:
        """The digests the loader checks while reading (``verify="load"``), else None."""
        if self.source.verify != "load":
            return None
        return [self.weights[i].digest for i in self.acq.to_fill]

    def names(self) -> list[str]:
        """A name per weight to fill, for error messages (its first FQN)."""
        return [(self.weights[i].fqns or [self.weights[i].id])[0] for i in self.acq.to_fill]


class _Replicas:
    """The methods of one replicated load (one per device) waiting for their weights.

    Each :class:`Method` of the load acquires its weights on its own device and hands the
    acquisition here (:meth:`defer`) instead of reading; :meth:`fill` then reads every weight
    that some device lacks once and copies it to each device that lacks it
    (:func:`aoti_rt.loader.read_replicated`), publishes the entries and binds every method.
    A weight that only one device lacks (the others hold it cached) is read for it alone.
    """

    def __init__(self, progress: bool | None, max_load_gbps: float | None):
        self.progress = progress
        self.max_load_gbps = max_load_gbps
        self.waiting: list[tuple[Method, _Pending]] = []

    def defer(self, method: "Method", pending: _Pending) -> None:
        self.waiting.append((method, pending))

    def fill(self) -> None:
        """Read and bind the waiting methods' weights. On failure every waiting entry is
        published as failed and the error raised: the caller closes the methods."""
        waiting, self.waiting = self.waiting, []
        try:
            read = self._read(waiting)
        except BaseException as e:
            for m, p in waiting:
                m._publish(p, error=e)
            raise
        for (m, p), n in zip(waiting, read):
            m._publish(p, n)
        for m, p in waiting:
            with _device.device_guard(m._rt.device):
                m._bind_acquired(p)
            m._rt.sample()

    def abandon(self, error: BaseException) -> None:
        """Publish the entries of methods still waiting as failed (a construction failed)."""
        waiting, self.waiting = self.waiting, []
        for m, p in waiting:
            m._publish(p, error=error)

    def _read(self, waiting: list[tuple["Method", _Pending]]) -> list[int]:
        """Fill every waiting method's new entries; the bytes read for each, as the loader
        counts them (the store is read once per weight, for the first device of the read)."""
        read = [0] * len(waiting)
        # weight -> the waiting methods lacking it (by store: a bundle has one)
        lacking: dict[tuple[Path, str], list[tuple[int, int]]] = {}
        for k, (m, p) in enumerate(waiting):
            for i in p.acq.to_fill:
                lacking.setdefault((Path(p.source.store), p.weights[i].id), []).append((k, i))
        groups: dict[tuple[Path, tuple[int, ...]], list[list[tuple[int, int]]]] = {}
        for (store, _), who in lacking.items():
            groups.setdefault((store, tuple(k for k, _ in who)), []).append(who)
        for (store, ks), items in groups.items():
            first = waiting[ks[0]][1]
            ws = [waiting[k][1].weights[i] for k, i in (who[0] for who in items)]
            buffers = [[waiting[k][1].acq.buffers[i] for k, i in who] for who in items]
            per_device = [list(col) for col in zip(*buffers)]       # [device][weight]
            digests = [w.digest for w in ws] if first.source.verify == "load" else None
            names = [(w.fqns or [w.id])[0] for w in ws]
            rts = [waiting[k][0]._rt for k in ks]
            rate = (self.max_load_gbps or 0) * 1e9
            counts = loader.read_replicated(rts, store, [w.offset for w in ws], [w.nbytes for w in ws], per_device,
                                            digests=digests, names=names, progress=self.progress,
                                            max_bytes_per_s=rate)
            for k, n in zip(ks, counts):
                read[k] += n
        return read


class Method:
    """One callable method of a model: ``method(*args, **kwargs)`` runs it (:meth:`__call__`).

    Returns what the exported program returns (a tensor, or the tuple/pytree of its call
    spec). Inputs are checked (structure, names, fixed values, dtype, device, rank, static
    sizes, dynamic ranges) before AOTI runs.
    Thread-safe: calls may run concurrently; :meth:`close` waits for running calls.
    """

    def __init__(self, name: str, spec: MethodSpec, so_path: Path, source: _Source,
                 rt: _device.DeviceRuntime, *, progress: bool | None = None,
                 typed_inputs: bool = True, max_load_gbps: float | None = None,
                 replicas: "_Replicas | None" = None):
        self.name = name
        self.spec = spec
        #: the device it runs on, as torch spells it ("cpu", "cuda:0")
        self.device = str(rt.device)
        self._rt = rt
        self._gate = _bind.CallGate()     # calls in flight; close() waits for them
        self.bytes_read = 0      # weight bytes this method's load read from disk
        # fqn -> (buffer, constant, mutable): what weight() hands out
        self._buffers: dict[str, tuple[_memory.Buffer, ConstantSpec, bool]] = {}
        self._runner_lock = threading.Lock()
        #: a replicated load this method is part of: its weights are read by the group, for
        #: every device at once (:class:`_Replicas`); None: it reads its own
        self._replicas = replicas
        self._pending: _Pending | None = None
        if replicas is None and (source.share is None or source.share.reads_store):
            loader.prepare(rt)     # pin the staging pool (once per device) while the .so opens
        # AOTI's CreateWithDevice makes its device current on this thread, and its calls below
        # run on the current device: the caller's current device is restored afterwards
        with _device.device_guard(rt.device):
            self._construct(source, so_path, progress, typed_inputs, max_load_gbps)

    def _construct(self, source: _Source, so_path: Path, progress: bool | None, typed_inputs: bool,
                   max_load_gbps: float | None) -> None:
        name, spec, rt = self.name, self.spec, self._rt
        so = SharedObject.open(so_path)
        try:
            # False: a legacy .so, weights private to AOTI
            self.shared = so.has("UpdateUserManagedConstantBufferPairs")
            handle = self._create(so)
        except BaseException:
            so.release()
            raise
        self._binding = _Binding(so, handle, rt)
        self._finalizer = weakref.finalize(self, self._binding.free)
        try:
            n_out = so.abi.num_outputs(handle)
            n_in = so.abi.num_inputs(handle)
            # a bundle describes every input; a stock artifact none (the .so's own input
            # checks, which aoti_rt turns on, are what guards its kernels then)
            if typed_inputs and len(spec.inputs) != n_in:
                raise BundleError(f"method {name!r}: the manifest describes {len(spec.inputs)} inputs but "
                                  f"{so.path.name} takes {n_in}; the bundle is inconsistent, recompile it")
            self._signature = CallSignature(name, spec, n_in, n_out, self.device)
            try:
                plan = bind_plan(spec.constants, f"method {name!r}")
            except ValueError as e:
                raise BundleError(f"method {name!r}: {e}; the bundle is inconsistent, recompile it") from None
            self._check_constants(so, handle, plan)
            extern = self._extern_kernels(so)
            if self.shared:
                self._bind_shared(source, plan, progress, max_load_gbps, extern)
            else:
                self._bind_legacy(source, plan)
        except BaseException as e:
            self._abandon(e)
            self._finalizer()
            raise
        rt.sample()
        self._n_out = n_out
        self._abi = so.abi
        self._where = f"method {name!r}"
        self._prepare_calls()

    # -- binding --------------------------------------------------------------------------

    def _create(self, so: SharedObject) -> int:
        """A new AOTI container of ``so`` on this method's device (its handle)."""
        return so.abi.create(self.device)

    def _check_constants(self, so: SharedObject, handle: int, plan: _bind.BindPlan) -> None:
        """The .so's constant table must be the manifest's: count, names, dtypes (one C loop,
        :meth:`aoti_rt._bind.BindPlan.check`, which raises what it finds)."""
        plan.check(so.abi, handle)
        if self.shared and not plan.checked:
            raise AOTIError(f"method {self.name!r}: {so.path.name} has the Pairs entry point but not "
                            f"GetConstantDataSize, so the memory its kernels assume cannot be checked; "
                            f"recompile it with a newer torch")

    def _keys(self, source: _Source, plan: _bind.BindPlan
              ) -> tuple[list[str], list[str | None], list[WeightSpec], list[int], list[int], list[bool]]:
        """This method's weights: each one's own cache key, its content key where it may be
        shared with other bundles (else None), the bytes its buffer needs, each constant's
        index among them, and whether each is fixed: never written (immutable, and a read-only
        kind to the .so), what may be shared read-only across processes (see the module
        docstring for the key rules)."""
        weights: list[WeightSpec] = []
        need: list[int] = []
        fixed: list[bool] = []
        index: dict[str, int] = {}
        of_constant = []
        for i, c in enumerate(self.spec.constants):
            w = source.weights[c.weight]
            at = index.get(w.id)
            if at is None:
                at = index[w.id] = len(weights)
                weights.append(w)
                need.append(w.nbytes)
                fixed.append(not w.mutable)
            of_constant.append(at)
            need[at] = max(need[at], plan.need(i))
            if plan.so_kind(i) not in _READ_ONLY_KINDS:
                fixed[at] = False
        keys: list[str] = []
        content: list[str | None] = []
        for w, n, share in zip(weights, need, (bool(source.verify) and f for f in fixed)):
            size = f"{w.nbytes}" if n == w.nbytes else f"{w.nbytes}+{n - w.nbytes}"
            if w.mutable:
                keys.append(f"{source.scope}|{w.id}|{size}")
            else:
                keys.append(f"{source.bundle}|{w.digest}|{size}")
            content.append(f"{w.digest}|{size}" if share else None)
        return keys, content, weights, need, of_constant, fixed

    def _share_verified(self, source: _Source, keys: list[str], content: list[str | None],
                        weights: list[WeightSpec]) -> list[str]:
        """Use a content key wherever the weight is verified already, or can be now.

        A content key names bytes that were checked against the digest: by a ``verify="load"``
        load, or here, by hashing the store another bundle's copy was read from (no device
        memory, no copy; the cost is paid only when two bundles share). Weights not verified
        stay under this bundle's own keys."""
        rt = self._rt
        out = list(keys)
        todo: dict[str, list[tuple[int, Any]]] = {}
        for j, ck in enumerate(content):
            if ck is None:
                continue
            if ck in rt.cache or source.verify == "load":
                out[j] = ck
            elif keys[j] not in rt.cache:
                cand = rt.shared_candidate(ck)
                if cand is not None:
                    todo.setdefault(cand.store, []).append((j, cand))
        for store, items in todo.items():
            before = file_identity(Path(store))
            try:
                got = file_digests(store, [(c.offset, c.nbytes) for _, c in items])
            except OSError:
                got = [None] * len(items)
            # the file hashed must be the one the copy was read from, unchanged throughout
            same_file = before == file_identity(Path(store))
            for (j, cand), d in zip(items, got):
                ok = d == weights[j].digest and same_file and before == cand.identity
                if ok and rt.cache.alias(cand.key, content[j]):
                    out[j] = content[j]
                elif not ok:
                    rt.forget_shared(content[j], cand)
        return out

    def _bind_shared(self, source: _Source, plan: _bind.BindPlan, progress: bool | None,
                     max_load_gbps: float | None = None, extern: Path | None = None) -> None:
        """Acquire the method's weights from the cache, fill those nobody holds from the store,
        and bind them: in one go, or, in a replicated load, the fill and the bind later, when
        the group has read the weights for every device (:class:`_Replicas`)."""
        pending = self._acquire_shared(source, plan, extern)
        if self._replicas is not None:
            self._replicas.defer(self, pending)
            return
        try:
            n = self._read(pending, progress, max_load_gbps)
        except BaseException as e:
            self._publish(pending, error=e)
            raise
        self._publish(pending, n)
        self._bind_acquired(pending)

    def _acquire_shared(self, source: _Source, plan: _bind.BindPlan, extern: Path | None) -> "_Pending":
        """One reference to each of the method's weights in the device's cache; the entries
        this method created must be filled (``pending.acq.to_fill``) and published."""
        rt = self._rt
        keys, content, weights, need, of_constant, fixed = self._keys(source, plan)
        share = source.share
        allocators = None
        if share is not None:      # an exporter places fixed weights in its arena
            keys, content, allocators = share.route(keys, content, weights, need, fixed)
        if source.verify:
            keys = self._share_verified(source, keys, content, weights)
        # a client caches the weights it maps from the exporter, held until acquired here
        hold = None if share is None else share.adopt(rt.cache, keys, weights, need, fixed)
        try:
            acq = rt.cache.acquire(keys, need, rt.allocator, allocators)
        finally:
            if hold is not None:
                rt.cache.release(hold)
        self._binding.acq = acq
        # the store's identity before reading: a copy is offered for sharing only if the
        # store did not change while it was read
        read_from = file_identity(Path(source.store)) if source.verify is True else None
        self._pending = _Pending(source, plan, extern, keys, content, weights, of_constant, acq, read_from,
                                 need, fixed)
        return self._pending

    def _read(self, pending: "_Pending", progress: bool | None, max_load_gbps: float | None) -> int:
        """Fill the entries this method created from the store; the bytes read."""
        fill, weights, acq, source = pending.acq.to_fill, pending.weights, pending.acq, pending.source
        if not fill:
            return 0
        return loader.read_weights(self._rt, source.store, [weights[i].offset for i in fill],
                                   [weights[i].nbytes for i in fill], [acq.buffers[i] for i in fill],
                                   digests=pending.digests(), names=pending.names(),
                                   progress=progress, max_bytes_per_s=(max_load_gbps or 0) * 1e9)

    def _publish(self, pending: "_Pending", nbytes: int = 0, error: BaseException | None = None) -> None:
        """Mark the entries this method filled as ready (``nbytes`` read for them), or as failed
        with ``error`` (waiters in other threads raise it). Once per pending acquisition."""
        if pending.published:
            return
        pending.published = True
        rt = self._rt
        if error is not None:
            rt.cache.publish(pending.acq, error)
            return
        rt.cache.add_bytes_read(nbytes)
        self.bytes_read = nbytes
        rt.cache.publish(pending.acq)
        source, keys, content = pending.source, pending.keys, pending.content
        if pending.read_from is not None and pending.read_from == file_identity(Path(source.store)):
            # this bundle's own copies: other bundles may share them once that store's bytes
            # hash to their digests
            for i in pending.acq.to_fill:
                if content[i] is not None and keys[i] != content[i]:
                    w = pending.weights[i]
                    rt.offer_shared(content[i], _device.ShareCandidate(
                        keys[i], str(source.store), pending.read_from, w.offset, w.nbytes))

    def _abandon(self, error: BaseException) -> None:
        """A construction that fails: entries this method created and did not publish are
        published as failed, so no thread waits on them."""
        if self._pending is not None:
            self._publish(self._pending, error=error)

    def _bind_acquired(self, pending: "_Pending") -> None:
        """Wait for the weights other threads fill, then bind every buffer to the container."""
        rt = self._rt
        b = self._binding
        acq, of_constant = pending.acq, pending.of_constant
        rt.cache.wait(acq)
        share = pending.source.share
        if share is not None:      # an exporter's arena is complete: make it read-only, serve it
            share.filled(pending.keys, acq, pending.weights, pending.need, pending.fixed)
        cs = self.spec.constants
        # what a copy-on-write weight update rebinds: the plan and each constant's weight
        self._plan, self._of_constant, self._extern = pending.plan, of_constant, pending.extern
        if pending.extern is None:
            torch_shim()
            pending.plan.bind(b.so.abi, b.handle, [acq.buffers[i] for i in of_constant],
                              1 if rt.is_cuda else 0, rt.index)
        else:
            self._bind_runner(pending.extern, [acq.buffers[i] for i in of_constant])
        self._buffers = {c.fqn: (acq.buffers[i], c, pending.weights[i].mutable)
                         for c, i in zip(cs, of_constant)}
        self._pending = None

    def _point_at(self, replaced: dict[int, _memory.Buffer]) -> None:
        """Copy-on-write, step one: point the container at ``replaced`` (acquisition index ->
        Buffer) and at the acquisition's own buffers elsewhere (``{}``: at those only, which
        undoes an earlier call); the acquisition and the cache are unchanged, so this can be
        undone until :meth:`_adopt`. No call launches while the container is rebound."""
        b, rt = self._binding, self._rt
        buffers = list(b.acq.buffers)
        for i, buf in replaced.items():
            buffers[i] = buf
        bound = [buffers[i] for i in self._of_constant]
        with _device.device_guard(rt.device):
            if self._extern is None:
                self._gate.lock_launch()
                try:
                    self._plan.bind(b.so.abi, b.handle, bound, 1 if rt.is_cuda else 0, rt.index)
                finally:
                    self._gate.unlock_launch()
            else:
                views = {c.name: _unowned_view(buf, c) for c, buf in zip(self.spec.constants, bound)}
                with self._runner_lock:
                    b.runner.update_constant_buffer(views, False, True, True)

    def _adopt(self, replaced: dict[int, _memory.Buffer]) -> None:
        """Copy-on-write, step two, after :meth:`_point_at`: the acquisition holds ``replaced``
        in place of the buffers the container no longer points at, which go back to the cache."""
        b, rt = self._binding, self._rt
        for i, buf in replaced.items():
            rt.cache.replace(b.acq, i, buf)
        bound = [b.acq.buffers[i] for i in self._of_constant]
        self._buffers = {c.fqn: (buf, c, self._buffers[c.fqn][2]) for c, buf in zip(self.spec.constants, bound)}

    # -- methods that call operators through AOTI's proxy executor -----------------------

    def _extern_kernels(self, so: SharedObject) -> Path | None:
        """The extern-kernel JSON beside a .so that calls operators through a proxy executor
        (``torch.library`` custom ops, fallback kernels), else None; a .so that needs one
        without it is refused here rather than at its first call.

        torch's runner looks for exactly ``<so stem>.json``, so that is where it must be. A .so
        that does not import the proxy executor's entry point runs directly, JSON or not."""
        path = so.path.with_suffix(".json")
        needs = so.calls_proxy_executor
        if needs is False:
            return None
        if not is_regular_file(path):
            if needs:
                raise BundleError(f"method {self.name!r}: {so.path.name} calls operators (custom ops or "
                                  f"fallback kernels) through AOTI's proxy executor, which is built from "
                                  f"the extern-kernel JSON AOTI wrote with it; {path.name} is missing beside "
                                  f"it. Recompile the bundle with this aoti_rt (it keeps that file), or put "
                                  f"the <key>.wrapper.json from the AOTI build there as {path.name}")
            return None
        if not self.shared:
            raise AOTIError(f"method {self.name!r}: {so.path.name} calls operators through a proxy "
                            f"executor but lacks UpdateUserManagedConstantBufferPairs, so its weights "
                            f"cannot be shared; recompile it with torch >= 2.10")
        return path

    def _bind_runner(self, extern: Path, buffers: list[_memory.Buffer]) -> None:
        """Bind through torch's own AOTI runner, which builds the proxy executor from
        ``extern`` and passes it to every Run (aoti_rt's direct Run has none to pass).

        Its container binds the cache's buffers user-managed (a shallow tensor per constant,
        no copy: one copy of each weight, as on the direct path); the tensors own no memory,
        so the shallow copies AOTI never frees keep no weight alive. The container made for
        the checks is deleted: the runner's is the one that runs."""
        import torch

        b = self._binding
        b.so.abi.delete(b.handle)
        b.handle = 0
        try:
            if self._rt.is_cuda:
                b.runner = torch._C._aoti.AOTIModelContainerRunnerCuda(str(b.so.path), 1, self.device)
            else:
                b.runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(b.so.path), 1)
            views = {c.name: _unowned_view(buf, c) for c, buf in zip(self.spec.constants, buffers)}
            b.runner.update_constant_buffer(views, False, True, True)
        except RuntimeError as e:
            raise AOTIError(f"method {self.name!r}: torch's AOTI runner could not load {b.so.path.name} "
                            f"with the operators it calls ({extern.name}): {e}. Register those operators "
                            f"in this process (import the module or load the library that defines "
                            f"them) before loading") from e

    def _run_runner(self, leaves) -> list:
        """One call through torch's runner, one at a time per method.

        The runner's ``run`` holds the GIL, and a container of one model makes a second call
        wait for the first inside it; the first needs the GIL back whenever its custom op runs
        Python: the two would wait for each other for ever. Waiting on this lock instead
        releases the GIL."""
        stream = self._stream()
        try:
            with self._runner_lock, _device.device_guard(self._rt.device):
                return self._binding.runner.run(list(leaves), _capsule(stream) if stream else None)
        except RuntimeError as e:
            raise AOTIError(f"{self._where} failed in AOTI Run: {e}") from e

    def _bind_legacy(self, source: _Source, plan: _bind.BindPlan) -> None:
        """No Pairs entry point: AOTI loads its own private copy from a blob (unshared).

        AOTI reads ``GetConstantDataSize`` bytes per constant from the blob, so the blob is
        laid out with the .so's sizes, never the manifest's."""
        so, b = self._binding.so, self._binding
        self._buffers = {}
        if not self.spec.constants:
            return
        if not so.has("AOTInductorModelUpdateConstantsFromBlob"):
            return   # the .so embeds its weights: CreateWithDevice loaded them
        if not plan.checked:
            raise AOTIError(f"method {self.name!r}: {so.path.name} lacks GetConstantDataSize, so its "
                            f"blob layout is unknown; recompile it with a newer torch")
        slots = [plan.so_size(i) for i in range(len(self.spec.constants))]
        offsets, total = blob_layout(slots)
        blob = bytearray(total)
        with open(source.store, "rb") as f:
            for c, at, size in zip(self.spec.constants, offsets, slots):
                w = source.weights[c.weight]
                f.seek(w.offset)
                data = f.read(min(w.nbytes, size))
                if len(data) != min(w.nbytes, size):
                    raise BundleError(f"weight store {source.store} is truncated")
                blob[at:at + len(data)] = data
        so.abi.update_constants_from_blob(b.handle, blob)
        b.legacy_bytes = total
        self._rt.count_legacy(1, total)

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
        #: the device's primary context, made current around each Run (ModelABI.run)
        self._context = self._rt.context if self._rt.is_cuda else 0
        if self._rt.is_cuda:
            raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
            index = self._rt.index
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
            if self._binding.runner is None:
                outs = self._abi.run(self._binding.handle, self._to_handles(list(leaves)), self._n_out,
                                     self._stream(), self._where, self._gate, self._context)
                tensors = self._from_handles(outs)
            else:
                tensors = self._run_runner(leaves)
        finally:
            self._gate.exit()
        return self._outputs(tensors)

    # -- weights --------------------------------------------------------------------------

    @property
    def constants(self) -> list[str]:
        """The FQNs of the constants this method binds."""
        return [c.fqn for c in self.spec.constants]

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
        try:
            buf, c, mutable = self._buffers[fqn]
        except KeyError:
            raise KeyError(f"method {self.name!r} binds no shared constant {fqn!r}") from None
        view = buffer_view(buf, c)
        return view if mutable else view.clone()

    @property
    def closed(self) -> bool:
        return self._gate.is_closed

    def close(self) -> None:
        """Wait for running calls, delete the container and release this method's weights."""
        self._gate.close()
        self._buffers = {}
        self._finalizer()

    def __enter__(self) -> "Method":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.device
        return f"<aoti_rt.Method {self.name} ({len(self.spec.constants)} constants, {state})>"


def _is_package(path: "str | os.PathLike[str]") -> bool:
    """A ``.pt2`` name, or a file that starts like a zip archive (a bundle is a directory)."""
    if os.fspath(path).endswith(".pt2"):
        return True
    try:     # never blocks: a FIFO would hang a plain open, and its read
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, 4, 0) == b"PK\x03\x04"
    except OSError:
        return False
    finally:
        os.close(fd)


def bind_plan(constants: Sequence[ConstantSpec], where: str = "method") -> _bind.BindPlan:
    """A method's constants (manifest order) as the C arrays of one Pairs call; ``where``
    names the method in the plan's errors."""
    return _bind.BindPlan([c.name for c in constants], [DTYPE_CODES[c.dtype] for c in constants],
                           [ITEMSIZE[c.dtype] for c in constants],
                           [c.shape for c in constants], [c.stride for c in constants],
                           [c.storage_offset for c in constants], [c.fqn for c in constants], where)


def raw_view(buf: _memory.Buffer):
    """A whole cache Buffer as a uint8 torch tensor on its device (holds the Buffer)."""
    import torch

    if buf.allocator.is_cuda:
        return torch.as_tensor(buf, device=buf.device)
    if buf.read_only:
        with warnings.catch_warnings():       # weights shared read-only: weight() copies them
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(buf, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8)


def buffer_view(buf: _memory.Buffer, c: ConstantSpec):
    """Wrap a cache Buffer as a torch tensor with a constant's view (holds the Buffer)."""
    import torch

    typed = raw_view(buf).view(getattr(torch, c.dtype))
    return typed.as_strided(c.shape, c.stride, c.storage_offset)


def _unowned_view(buf: _memory.Buffer, c: ConstantSpec):
    """A tensor with a constant's view of a cache Buffer that owns nothing (no reference to the
    Buffer: whoever binds it keeps the Buffer alive while it is bound)."""
    import torch

    device = torch.device(buf.device)
    storage = torch._C._construct_storage_from_data_pointer(buf.ptr, device, buf.nbytes)
    return torch.empty(0, dtype=getattr(torch, c.dtype), device=device).set_(
        storage, c.storage_offset, c.shape, c.stride)


_new_capsule = None


def _capsule(pointer: int):
    """A PyCapsule holding ``pointer`` (how torch's runner takes a stream handle)."""
    global _new_capsule
    if _new_capsule is None:
        import ctypes

        proto = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
        _new_capsule = proto(("PyCapsule_New", ctypes.pythonapi))
    return _new_capsule(pointer, None, None)


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

    def __init__(self, bundle: Bundle, device: "str | Device", *, methods: Sequence[str] | None = None,
                 progress: bool | None = None, verify: bool | str = True,
                 max_load_gbps: float | None = None, share: str | None = None):
        rt = _device.get(device)
        self._start(bundle, rt)
        source = weight_source(bundle.store_path, bundle.manifest.weights, verify=verify)
        names = _method_names(bundle, methods)
        if share is not None:
            self._share = source.share = serving.begin(bundle, rt, share, names, verify=verify)
            # a model dropped without close() stops serving and detaches all the same
            weakref.finalize(self, self._share.close)
        try:
            for name in names:
                self._methods[name] = Method(name, bundle.manifest.methods[name], bundle.so_path(name),
                                             source, rt, progress=progress, max_load_gbps=max_load_gbps)
            if self._share is not None:
                self._share.ready()       # an exporter starts serving now
        except BaseException:
            self.close()
            raise
        self._warn_divergent()

    def _start(self, bundle: Bundle, rt: _device.DeviceRuntime) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
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
                   verify: bool | str = True, max_load_gbps: float | None = None) -> list["Model"]:
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
        group = _Replicas(progress, max_load_gbps)
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
        return list(self._methods)

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
            if fqn in m._buffers:
                return m.weight(fqn)
        raise KeyError(f"no method of this model binds {fqn!r}")

    def update_weights(self, weights: "Mapping[str, Any] | str | os.PathLike[str]", *, shared: bool = True,
                       strict: bool = True, progress: bool | None = None) -> "UpdateReport":
        """Write new values into this model's weights, without reloading or rebinding.

        Args:
            weights: ``{fqn: tensor}`` (any device; dtype and shape must be the constant's), or
                the path of a safetensors file whose tensor names are FQNs (read by the load
                pipeline straight into device memory where a tensor covers its buffer).
            shared: True (default): write in place. Every model in this process bound to the
                same weights, and every process attached to them (``share=``), sees the new
                values; models loaded later read their own stores. False: copy on write, only
                this model changes (its methods are rebound to private copies).
            strict: refuse FQNs this model does not bind (False: ignore them).

        This model's own state (a KV cache) is always written in place. Calls already queued
        on the device's current stream finish with the old values first.

        Returns:
            An :class:`aoti_rt.update.UpdateReport` (FQNs written, bytes, seconds).

        Raises:
            InputError: an unknown FQN (with ``strict``), a dtype or shape that differs, or an
                in-place update of weights mapped read-only from another process.
            BundleError: a safetensors file that is truncated or corrupt.
        """
        from .update import update_weights

        if self.closed:
            raise ClosedError("the model is closed")
        return update_weights(self, weights, shared=shared, strict=strict, progress=progress)

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


@overload
def load(path: "str | Path | Mapping[str, Any]", *, device: "str | Device | None" = None,
         methods: Sequence[str] | None = None, progress: bool | None = None, verify: bool | str = True,
         max_load_gbps: float | None = None, share: str | None = None) -> Model: ...


@overload
def load(path: "str | Path | Mapping[str, Any]", *, device: "list[str | Device] | tuple[str | Device, ...]",
         methods: Sequence[str] | None = None, progress: bool | None = None, verify: bool | str = True,
         max_load_gbps: float | None = None, share: None = None) -> list[Model]: ...


def load(path: "str | Path | Mapping[str, Any]", *,
         device: "str | Device | list[str | Device] | tuple[str | Device, ...] | None" = None,
         methods: Sequence[str] | None = None, progress: bool | None = None, verify: bool | str = True,
         max_load_gbps: float | None = None, share: str | None = None) -> "Model | list[Model]":
    """Load a bundle written by :func:`aoti_rt.compile`, or ``.pt2`` packages.

    Args:
        path: the bundle directory; or a ``.pt2`` file (``aoti_compile_and_package``,
            ``package_aoti``: one method per AOTI model in it), or a mapping of method name to
            ``.pt2`` file (or ``(file, model name)``), loaded as one model
            (:func:`aoti_rt.package.load_package`).
        device: "cpu", "cuda" (torch's current CUDA device, as for torch) or "cuda:N";
            default: "cpu" for a CPU bundle, the current CUDA device for a CUDA one. A list
            (or tuple) of devices loads one model per device and returns them in that order:
            each device's cache holds its own copy, each model its own state, and a bundle's
            store is read once for all of them (the weights a device lacks are copied to it
            from the same staging buffer as the others'; ``.pt2`` packages are loaded once per
            device). List each device once, all CUDA (or just ``["cpu"]``).
        methods: load only these methods (default: all).
        progress: show a progress bar while loading (default: for loads of 2 GiB or more,
            when stderr is a terminal).
        verify: how far to trust the store's digests. ``True`` (default): weights are
            shared with other loaded bundles only once verified, on demand, by hashing the
            store a cached copy was read from (BLAKE3), so a lying or corrupt bundle can never
            change what another computes, and a load that shares nothing hashes nothing.
            ``"load"``: also check every weight read while loading (a corrupt store is a
            :class:`BundleError` at once; the loader's threads hash as they read, slower).
            ``False``: never hash; this bundle's weights are shared among its own methods
            and instances only.
        max_load_gbps: cap the loader's host->device rate (GB/s, 1e9 bytes/s), so a model
            loading next to one that is serving leaves it copy bandwidth (default: no cap;
            with a list of devices, each device's rate).
        share: a name (1-64 of ``A-Z a-z 0-9 . _ -``) under which processes of this user on
            this device hold one copy of the bundle's weights. If a process serves ``name``,
            this one maps its weights read-only and reads none of them (only its own mutable
            state, a KV cache, is allocated and read); otherwise it loads them into memory it
            can share and serves ``name`` until the model is closed. A bundle directory on one
            device only (not ``.pt2`` packages, not a list of devices). See
            :mod:`aoti_rt.serving` and ``model.share``.

    Returns:
        The :class:`Model` (a list of them, one per device, for a list of devices); close
        it (or use ``with``) to release its memory.

    Raises:
        BundleError: the bundle (or package) is missing, corrupt or inconsistent, or was
            compiled for another device type. DeviceError: a device is unknown or absent, or a
            list names one twice or mixes the CPU with GPUs. ShareError: ``share=`` is served
            for another bundle or device or by another user, or the device cannot share memory.
            AOTIError, AllocationError, CudaError: see their docs. A failed load leaves nothing
            allocated on any device.

    Example:
        >>> with aoti_rt.load("lm.aoti", device="cuda") as model:
        ...     logits = model.prefill(tokens)
        >>> lm = aoti_rt.load({"prefill": "prefill.pt2", "decode": "decode.pt2"}, device="cuda")
        >>> m0, m1 = aoti_rt.load("lm.aoti", device=["cuda:0", "cuda:1"])   # the store read once
    """
    if max_load_gbps is not None and not max_load_gbps > 0:
        raise ValueError(f"max_load_gbps must be a positive number of GB/s, not {max_load_gbps!r}")
    if verify not in (True, False, "load"):
        raise ValueError(f"verify must be True, False or 'load', not {verify!r}")
    many = isinstance(device, (list, tuple))
    if isinstance(path, Mapping) or (isinstance(path, (str, os.PathLike)) and _is_package(path)):
        if share is not None:
            raise ShareError("share= takes a bundle directory (what aoti_rt.compile writes); .pt2 packages "
                             "are not shared across processes: compile the model with aoti_rt.compile, or "
                             "load the package without share=")
        from .package import load_package

        if not many:
            return load_package(path, device=device, methods=methods, progress=progress, verify=verify,
                                max_load_gbps=max_load_gbps)
        out: list[Model] = []
        try:
            for d in _device.parse_devices(device):
                out.append(load_package(path, device=d, methods=methods, progress=progress, verify=verify,
                                        max_load_gbps=max_load_gbps))
        except BaseException:
            for m in out:
                m.close()
            raise
        return out
    bundle = read_bundle(path)
    compiled = "cpu" if bundle.manifest.device == "cpu" else "cuda"
    devs = _device.parse_devices(device, default=compiled) if many else [Device.parse(device, default=compiled)]
    if devs[0].kind != compiled:
        raise BundleError(f"{path} was compiled for {bundle.manifest.device}; an AOTI .so runs only "
                          f"on the device type it was compiled for, so load it on {compiled}")
    if share is not None:
        check_name(share)
    if many:
        if share is not None:
            raise ShareError("share= takes one device: load once per device, each with its own name")
        return Model.replicated(bundle, devs, methods=methods, progress=progress, verify=verify,
                                max_load_gbps=max_load_gbps)
    return Model(bundle, devs[0], methods=methods, progress=progress, verify=verify, max_load_gbps=max_load_gbps,
                 share=share)
