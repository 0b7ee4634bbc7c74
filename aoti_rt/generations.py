"""Generations of an exporter's shared arenas: how an exporter's weight update reaches the
processes that map its weights as one step (:mod:`aoti_rt.serving` drives it).

An exporter never writes the arenas it serves. An update (``update_weights``, ``atomic=True``,
the default) copies them into new arenas of the same layout (:meth:`Generation.copy_of`), writes
the new values there, freezes them, rebinds the exporter's methods (:func:`rebind_methods`) and
pushes the new generation to every client over its connection
(:meth:`aoti_rt.share.ShareServer.push`). Each client's :class:`Listener` maps it read-only,
rebinds every method of its model at once under their launch locks (:func:`switch_methods`), lets
go of the previous generation once the calls launched on it are done, and acknowledges. A call
in any process therefore reads all old or all new weights. The cost: the arenas' bytes twice
until every client has switched or the deadline passed (a client that does not answer keeps the
previous generation mapped, and computes with it, never a mix).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import _arena, _cache, _memory, share as _share
from .errors import AllocationError
from .views import raw_view

#: (method, new buffers by constant index, the buffers bound there now)
Change = tuple[Any, Mapping[int, _memory.Buffer], Mapping[int, _memory.Buffer]]


class Generation:
    """The next generation of an exporter's arenas: made by :meth:`copy_of`, written and bound
    by the update, installed and published by the exporter; :meth:`discard`\\ ed instead if the
    update fails before it is installed."""

    def __init__(self, number: int, allocator: _arena.ArenaAllocator, moved: dict[int, _memory.Buffer]):
        self.number = number
        self.allocator = allocator
        #: id of a Buffer of the generation served now -> the same weight's Buffer in this one
        self.moved = moved
        #: what the exporter held of the previous generation, until it is published
        self.retired: list[Any] = []

    @classmethod
    def copy_of(cls, number: int, old: _arena.ArenaAllocator, buffers: Sequence[_memory.Buffer],
                parent: _memory.Allocator, context: int, what: str) -> "Generation":
        """New arenas of the sizes of ``old``'s, holding a copy of their bytes (one copy: a
        device-to-device copy on CUDA, memcpy on the host; the caller synchronises the device
        before reading them), and each of ``buffers`` (carved from ``old``) at its offset there,
        writable until :meth:`freeze`. ``old`` is only read. ``what`` names the arenas in errors.

        Raises:
            AllocationError: a second copy of the arenas does not fit in memory or in the
                memory limit of ``parent`` (the device's allocator)."""
        arenas = list(old.arenas)
        total = sum(a.nbytes for a in arenas)
        if parent.limit and parent.bytes_allocated + old.bytes_reserved + total > parent.limit:
            raise AllocationError(
                f"update_weights: a new generation of {what} needs {total} more bytes while clients switch, past "
                f"the aoti_rt memory limit ({parent.limit} bytes); raise the limit, or pass atomic=False to write "
                f"the arenas in place (clients may then read a mix of old and new weights)")
        alloc = _arena.ArenaAllocator(old.device, old.ordinal, context, parent=parent)
        moved: dict[int, _memory.Buffer] = {}
        try:
            for a in arenas:
                fresh = alloc.reserve(a.nbytes)
                whole = alloc.carve(fresh, 0, fresh.nbytes)        # holds it while it has no weight
                raw_view(whole).copy_(raw_view(old.carve(a, 0, a.nbytes)))
                for buf in buffers:
                    if buf.arena is a:
                        moved[id(buf)] = alloc.carve(fresh, buf.ptr - a.address, buf.nbytes)
                del whole
        except BaseException as e:
            moved.clear()
            alloc.close()
            if isinstance(e, AllocationError):
                raise AllocationError(f"{e} (update_weights copies {what}: atomic=False writes them in place "
                                      f"instead)") from None
            raise
        return cls(number, alloc, moved)

    def buffer(self, old: _memory.Buffer) -> _memory.Buffer | None:
        """This generation's Buffer of the weight ``old`` holds now (None: not an arena weight)."""
        return self.moved.get(id(old))

    def freeze(self) -> bool:
        """No more writes: its arenas read-only in this process (clients never map them writable)."""
        return self.allocator.freeze()

    def discard(self) -> None:
        """Let go of it (never installed): its memory goes with its last Buffer."""
        self.moved = {}
        self.allocator.close()


def rebind_methods(changes: Sequence[Change]) -> None:
    """Rebind several methods as one step, all or none: ``(method, new, old)`` each, ``old``
    what those constants are bound to now. The caller holds every method's launch lock. A
    method that refuses undoes the ones rebound before it; then each gives back the cache
    entries it no longer binds."""
    done: list[tuple[Any, Mapping[int, _memory.Buffer]]] = []
    try:
        for m, new, old in changes:
            m.rebind(new, release=False)
            done.append((m, old))
    except BaseException:
        for m, old in done:
            m.rebind(old, release=False)        # the old buffers, still held by its acquisition
        raise
    for m, _ in done:
        m.release_unbound()


def switch_methods(methods: Sequence[Any], mapped: Mapping[_cache.WeightKey, _memory.Buffer],
                   carve: Callable[[_cache.WeightKey], _memory.Buffer]
                   ) -> tuple[dict[_cache.WeightKey, _memory.Buffer], list[Change]]:
    """Bind every constant of ``methods`` that binds one of the ``mapped`` Buffers to the new
    generation's Buffer of its key (``carve(key)``, once per key), all methods at once: every
    launch lock is taken first. Returns the new Buffers by key and the changes made (their
    ``old`` Buffers: keep them until the calls launched on them are done)."""
    key_of = {id(b): k for k, b in mapped.items()}
    moved: dict[_cache.WeightKey, _memory.Buffer] = {}
    changes: list[Change] = []
    for m in methods:
        new: dict[int, _memory.Buffer] = {}
        old: dict[int, _memory.Buffer] = {}
        for b in m.bindings():
            key = key_of.get(id(b.buffer))
            if key is None:
                continue                  # not the exporter's (state, a private copy)
            if key not in moved:
                moved[key] = carve(key)
            new[b.index], old[b.index] = moved[key], b.buffer
        if new:
            changes.append((m, new, old))
    with contextlib.ExitStack() as locks:
        for m in methods:
            locks.enter_context(m.launch_lock())
        rebind_methods(changes)
    return moved, changes


def warn_unswitched(name: str, result: _share.PushResult, timeout: float) -> None:
    """Warn about the clients that did not switch to a pushed generation (if any)."""
    if not (result.late or result.failed):
        return
    why = [f"pid {pid}: {err}" for pid, err in result.failed.items()]
    if result.late:
        why.append(f"pid{'s' if len(result.late) > 1 else ''} {', '.join(map(str, result.late))}: no answer in "
                   f"{timeout:g} s ($AOTI_RT_SWAP_TIMEOUT)")
    warnings.warn(f"share {name!r}: {len(result.late) + len(result.failed)} client process(es) did not switch to "
                  f"weight generation {result.generation} ({'; '.join(why)[:800]}); each computes with the previous "
                  f"weights, all of them, until it switches, and keeps their memory mapped", RuntimeWarning,
                  stacklevel=4)


class Listener:
    """A client's thread that waits on its connection for the exporter's new generations and
    hands each to ``switch(generation, message, descriptors)`` (which closes the descriptors),
    then acknowledges: ok, or the error ``switch`` raised (warned about here; the client keeps
    what it has). It never raises into another thread, and stops on :meth:`stop` or when the
    exporter closes the connection."""

    def __init__(self, attachment: _share.Attachment, name: str,
                 switch: Callable[[int, dict[str, Any], list[int]], None], current: Callable[[], int],
                 timeout: Callable[[], float]):
        self.attachment = attachment
        self.name = name
        self.switch = switch
        self.current = current
        self.timeout = timeout
        self._wake, self._waker = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name=f"aoti_rt-share-client-{name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening (a switch under way finishes first)."""
        try:
            self._waker.send(b"x")
        except OSError:
            pass                 # it stopped already
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        sock = self.attachment.sock
        sel = selectors.DefaultSelector()
        try:
            sel.register(sock, selectors.EVENT_READ, "exporter")
            sel.register(self._wake, selectors.EVENT_READ, "stop")
            while True:
                if any(key.data == "stop" for key, _ in sel.select()):
                    return
                try:
                    msg, fds = _share.recv_message(sock, _share.MAX_FDS, time.monotonic() + self.timeout())
                except (EOFError, OSError):
                    return              # the exporter is gone: what is mapped stays mapped
                self._on_message(msg, fds)
        except Exception as e:  # noqa: BLE001 - a thread of its own: report, never raise
            warnings.warn(f"share {self.name!r}: this process stopped following the exporter's weight updates "
                          f"({type(e).__name__}: {e}); it computes with generation {self.current()} from now on",
                          RuntimeWarning, stacklevel=1)
        finally:
            sel.close()
            self._wake.close()
            self._waker.close()

    def _on_message(self, msg: dict[str, Any], fds: list[int]) -> None:
        gen = msg.get("generation")
        if msg.get("op") != "generation" or type(gen) is not int:
            for fd in fds:
                os.close(fd)
            return
        error = None
        try:
            self.switch(gen, msg, fds)
        except Exception as e:  # noqa: BLE001 - reported to the exporter and here; the model keeps its weights
            error = f"{type(e).__name__}: {e}"
            warnings.warn(f"share {self.name!r}: could not switch to the exporter's weight generation {gen} "
                          f"({error}); this process computes with generation {self.current()}",
                          RuntimeWarning, stacklevel=1)
        try:
            self.attachment.acknowledge(gen, error)
        except OSError:
            pass                         # the exporter is gone


__all__ = ["Generation", "Listener", "Change", "rebind_methods", "switch_methods", "warn_unswitched"]
