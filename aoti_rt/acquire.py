"""Acquire a method's weights: the key policy, the cache, sharing verified content, the fill.

One step between a method's constant table and its binder: :func:`acquire` names each weight
the method binds with a typed :class:`~aoti_rt._cache.WeightKey` (the key policy below, one
function per scope: keys are made nowhere else), takes one reference to each from the
device's :class:`~aoti_rt._cache.WeightCache`, shares content verified against its digest,
and hands back a :class:`Pending` acquisition: the entries this method created are then
filled from the store (:func:`read`, or a replicated load's :class:`Replicas`) and published
(:func:`publish`), and its buffers are what the method binds.

The key policy (``docs/contract.md``; a bundle is untrusted input: nothing it claims may
change what another bundle computes):

* an immutable weight is ``STORE``-scoped: owned by its store file's identity, named by its
  digest and sizes; shared by the methods and instances loaded from that store;
* it is also ``CONTENT``-scoped (digest and sizes alone), shared by every model on the
  device, once its bytes were verified against the digest (hashed while loading with
  ``Verify.LOAD``, or on demand when a second store wants it: the store the cached copy was
  read from is hashed and the entry aliased) and only if the .so reports it as a parameter or
  tensor constant (a buffer the .so might write is never shared across stores);
* a mutable buffer (written in place by some method, e.g. a KV cache) is ``INSTANCE``-scoped:
  owned by the model instance, so the methods of one model share it and a second load gets
  fresh state initialised from the store; so is every constant the .so reports as a buffer,
  whatever the manifest says (its kernels may write it);
* an exporter's arena weights are ``EXPORT``-scoped and a client's mapped ones ``ATTACHED``
  (:mod:`aoti_rt.serving`), an update's private copies ``PRIVATE``.

Every buffer is at least as large as what the .so may reach through the constant bound to it
(:meth:`aoti_rt._bind.BindPlan.need`), so a manifest whose views are smaller than the
compiled ones cannot make a kernel read or write outside its buffer.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _bind, _cache, device as _device, loader
from ._cache import Scope, WeightKey
from .bundle import ConstantSpec, WeightSpec, file_identity
from .digest import file_digests
from .errors import OptionError

_instance_ids = itertools.count(1)
#: .so constant type codes whose memory generated code never writes (model_base.h)
READ_ONLY_KINDS = (1, 3)    # parameter, tensor constant
#: the .so constant type of a buffer: generated code may write it in place
BUFFER_KIND = 2


class Verify(enum.Enum):
    """How far a load trusts its store's digests (``load(..., verify=)``).

    ``ON_DEMAND`` (``True``): weights are shared with other stores once verified, on demand;
    ``LOAD`` (``"load"``): every weight read is hashed while loading too; ``NEVER``
    (``False``): never hash, share within the store only."""

    ON_DEMAND = True
    LOAD = "load"
    NEVER = False

    @classmethod
    def of(cls, value: "Verify | bool | str") -> "Verify":
        """``value`` as a Verify (the API's True, False, "load" or a Verify)."""
        if isinstance(value, Verify):
            return value
        for v in cls:
            if type(value) is type(v.value) and value == v.value:
                return v
        raise OptionError(f"verify must be True, False, 'load' or an aoti_rt.Verify, not {value!r}")


# -- the key policy: one function per scope ------------------------------------------------

def store_key(identity: Any, w: WeightSpec, need: int) -> WeightKey:
    """An immutable weight of one store (``identity``: :attr:`WeightSource.identity`)."""
    return WeightKey(Scope.STORE, identity, w.digest, w.nbytes, need)


def content_key(w: WeightSpec, need: int) -> WeightKey:
    """An immutable weight whose bytes were verified against its digest, for every store."""
    return WeightKey(Scope.CONTENT, None, w.digest, w.nbytes, need)


def instance_key(instance: str, w: WeightSpec, need: int) -> WeightKey:
    """A model instance's own state (a buffer some method writes in place)."""
    return WeightKey(Scope.INSTANCE, instance, w.id, w.nbytes, need)


def export_key(exporter: str, w: WeightSpec, need: int) -> WeightKey:
    """An exporting model's weight placed in its shared arena."""
    return WeightKey(Scope.EXPORT, exporter, w.digest, w.nbytes, need)


def attached_key(attachment: str, w: WeightSpec, need: int) -> WeightKey:
    """A client's mapping of an exporter's weight (its own attachment's scope)."""
    return WeightKey(Scope.ATTACHED, attachment, w.digest, w.nbytes, need)


# -- where weights come from ---------------------------------------------------------------

@dataclass
class WeightSource:
    """Where a model instance's weights come from: a store file and its weight table."""

    store: Path
    weights: dict[str, WeightSpec]
    #: the model instance's token: owner of its INSTANCE state
    instance: str
    #: the store's identity, taken once per load: owner of its STORE weights, and what its
    #: copies are offered for sharing under (the store unchanged while read)
    identity: Any = None
    verify: Verify = Verify.ON_DEMAND
    #: the model's part in sharing weights across processes (aoti_rt.serving), or None
    share: Any = None


def weight_source(store: Path, weights: dict[str, WeightSpec], *, verify: "Verify | bool | str" = Verify.ON_DEMAND,
                  instance: str | None = None) -> WeightSource:
    """The weights of one new model instance read from ``store`` (a bundle's store, a stock
    artifact's blob, a package): its own mutable state (or ``instance``'s, to share it with
    the sources of the same instance); the store is stat'ed here, once."""
    store = Path(store)
    ident = file_identity(store)
    return WeightSource(store, weights, instance or f"model{next(_instance_ids)}",
                        identity=(str(store.resolve()), ident), verify=Verify.of(verify))


@dataclass
class Pending:
    """A method's weights between acquiring them and binding them: which entries it created
    (``acq.to_fill``) and what filling and binding them needs."""

    source: WeightSource
    plan: _bind.BindPlan
    keys: list[WeightKey]
    content: list[WeightKey | None]
    weights: list[WeightSpec]
    of_constant: list[int]
    acq: _cache.Acquisition
    read_from: Any
    need: list[int]          # the bytes each weight's buffer holds
    fixed: list[bool]        # never written: what an exporter shares read-only (load(share=))
    published: bool = False
    bytes_read: int = 0

    def digests(self) -> list[str | None] | None:
        """The digests the loader checks while reading (``Verify.LOAD``), else None."""
        if self.source.verify is not Verify.LOAD:
            return None
        return [self.weights[i].digest for i in self.acq.to_fill]

    def names(self) -> list[str]:
        """A name per weight to fill, for error messages (its first FQN)."""
        return [(self.weights[i].fqns or [self.weights[i].id])[0] for i in self.acq.to_fill]

    def bound(self) -> list:
        """The Buffer bound to each constant, in manifest order."""
        return [self.acq.buffers[i] for i in self.of_constant]


def plan_keys(source: WeightSource, constants: Sequence[ConstantSpec], plan: _bind.BindPlan
              ) -> tuple[list[WeightKey], list[WeightKey | None], list[WeightSpec], list[int], list[int], list[bool]]:
    """A method's weights: each one's own key, its content key where it may be shared with
    other stores (else None), the weights, the bytes each buffer needs, each constant's index
    among them, and whether each is fixed: never written (immutable, and a read-only kind to
    the .so), what may be shared read-only across processes."""
    weights: list[WeightSpec] = []
    need: list[int] = []
    fixed: list[bool] = []
    index: dict[str, int] = {}
    of_constant = []
    state: list[bool] = []      # the instance's own: the manifest or the .so says kernels may write it
    for i, c in enumerate(constants):
        w = source.weights[c.weight]
        at = index.get(w.id)
        if at is None:
            at = index[w.id] = len(weights)
            weights.append(w)
            need.append(w.nbytes)
            fixed.append(not w.mutable)
            state.append(w.mutable)
        of_constant.append(at)
        need[at] = max(need[at], plan.need(i))
        if plan.so_kind(i) not in READ_ONLY_KINDS:
            fixed[at] = False
        if plan.so_kind(i) == BUFFER_KIND:
            state[at] = True
    shares = source.verify is not Verify.NEVER
    keys = [instance_key(source.instance, w, n) if s else store_key(source.identity, w, n)
            for w, n, s in zip(weights, need, state)]
    content = [content_key(w, n) if shares and f else None for w, n, f in zip(weights, need, fixed)]
    return keys, content, weights, need, of_constant, fixed


def share_verified(rt: _device.DeviceRuntime, source: WeightSource, keys: list[WeightKey],
                   content: list[WeightKey | None], weights: list[WeightSpec]) -> list[WeightKey]:
    """Use a content key wherever the weight is verified already, or can be now.

    A content key names bytes that were checked against the digest: by a ``Verify.LOAD``
    load, or here, by hashing the store another store's copy was read from (no device memory,
    no copy; the cost is paid only when two stores share). Weights not verified stay under
    their store's keys."""
    out = list(keys)
    todo: dict[str, list[tuple[int, Any]]] = {}
    for j, ck in enumerate(content):
        if ck is None:
            continue
        if ck in rt.cache or source.verify is Verify.LOAD:
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


def acquire(rt: _device.DeviceRuntime, source: WeightSource, constants: Sequence[ConstantSpec],
            plan: _bind.BindPlan) -> Pending:
    """One reference to each of a method's weights in the device's cache; the entries it
    created must be filled (``pending.acq.to_fill``, :func:`read`) and :func:`publish`\\ ed."""
    keys, content, weights, need, of_constant, fixed = plan_keys(source, constants, plan)
    share = source.share
    allocators = None
    if share is not None:      # an exporter places fixed weights in its arena
        keys, content, allocators = share.route(keys, content, weights, need, fixed)
    if source.verify is not Verify.NEVER:
        keys = share_verified(rt, source, keys, content, weights)
    # a client caches the weights it maps from the exporter, held until acquired here
    hold = None if share is None else share.adopt(rt.cache, keys, weights, need, fixed)
    try:
        acq = rt.cache.acquire(keys, need, rt.allocator, allocators)
    finally:
        if hold is not None:
            rt.cache.release(hold)
    # a copy is offered for sharing only if the store did not change while it was read
    read_from = source.identity[1] if source.verify is Verify.ON_DEMAND else None
    return Pending(source, plan, keys, content, weights, of_constant, acq, read_from, need, fixed)


def read(rt: _device.DeviceRuntime, pending: Pending, progress: bool | None, max_load_gbps: float | None) -> int:
    """Fill the entries this method created from the store; the bytes read."""
    fill, weights, acq, source = pending.acq.to_fill, pending.weights, pending.acq, pending.source
    if not fill:
        return 0
    return loader.read_weights(rt, source.store, [weights[i].offset for i in fill],
                               [weights[i].nbytes for i in fill], [acq.buffers[i] for i in fill],
                               digests=pending.digests(), names=pending.names(),
                               progress=progress, max_bytes_per_s=(max_load_gbps or 0) * 1e9)


def publish(rt: _device.DeviceRuntime, pending: Pending, nbytes: int = 0, error: BaseException | None = None) -> None:
    """Mark the entries this method filled as ready (``nbytes`` read for them), or as failed
    with ``error`` (waiters in other threads raise it). Once per pending acquisition."""
    if pending.published:
        return
    pending.published = True
    if error is not None:
        rt.cache.publish(pending.acq, error)
        return
    rt.cache.add_bytes_read(nbytes)
    pending.bytes_read = nbytes
    rt.cache.publish(pending.acq)
    source, keys, content = pending.source, pending.keys, pending.content
    if pending.read_from is None:
        return
    # this store's own copies: other stores may share them once its bytes hash to their
    # digests, if the store is still the one read (stat'ed again only when there are some)
    offers = [i for i in pending.acq.to_fill if content[i] is not None and keys[i] != content[i]]
    if offers and pending.read_from == file_identity(source.store):
        for i in offers:
            w = pending.weights[i]
            rt.offer_shared(content[i], _device.ShareCandidate(
                keys[i], str(source.store), pending.read_from, w.offset, w.nbytes))


@dataclass
class Replicas:
    """The methods of one replicated load (one per device) waiting for their weights.

    Each method of the load acquires its weights on its own device and hands the acquisition
    here (:meth:`defer`) instead of reading; :meth:`fill` then reads every weight that some
    device lacks once and copies it to each device that lacks it
    (:func:`aoti_rt.loader.read_replicated`), publishes the entries and binds every method.
    A weight that only one device lacks (the others hold it cached) is read for it alone.
    """

    progress: bool | None
    max_load_gbps: float | None
    #: (device runtime, acquisition, bind it) per waiting method
    waiting: list[tuple[_device.DeviceRuntime, Pending, Callable[[Pending], None]]] = field(default_factory=list)

    def defer(self, rt: _device.DeviceRuntime, pending: Pending, bind: Callable[[Pending], None]) -> None:
        self.waiting.append((rt, pending, bind))

    def fill(self) -> None:
        """Read and bind the waiting methods' weights. On failure every waiting entry is
        published as failed and the error raised: the caller closes the methods."""
        waiting, self.waiting = self.waiting, []
        try:
            counts = self._read(waiting)
        except BaseException as e:
            for rt, p, _ in waiting:
                publish(rt, p, error=e)
            raise
        for (rt, p, _), n in zip(waiting, counts):
            publish(rt, p, n)
        for rt, p, bind in waiting:
            with _device.device_guard(rt.device):
                bind(p)
            rt.sample()

    def abandon(self, error: BaseException) -> None:
        """Publish the entries of methods still waiting as failed (a construction failed)."""
        waiting, self.waiting = self.waiting, []
        for rt, p, _ in waiting:
            publish(rt, p, error=error)

    def _read(self, waiting: list) -> list[int]:
        """Fill every waiting method's new entries; the bytes read for each, as the loader
        counts them (the store is read once per weight, for the first device of the read)."""
        counts = [0] * len(waiting)
        # weight -> the waiting methods lacking it (by store: a bundle has one)
        lacking: dict[tuple[Path, str], list[tuple[int, int]]] = {}
        for k, (_, p, _) in enumerate(waiting):
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
            digests = [w.digest for w in ws] if first.source.verify is Verify.LOAD else None
            names = [(w.fqns or [w.id])[0] for w in ws]
            rts = [waiting[k][0] for k in ks]
            rate = (self.max_load_gbps or 0) * 1e9
            got = loader.read_replicated(rts, store, [w.offset for w in ws], [w.nbytes for w in ws], per_device,
                                         digests=digests, names=names, progress=self.progress,
                                         max_bytes_per_s=rate)
            for k, n in zip(ks, got):
                counts[k] += n
        return counts
