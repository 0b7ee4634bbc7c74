"""The wire protocol of weights shared across processes: who may connect, what is said, and how
file descriptors travel. Pure Python, and it knows nothing of models or memory:
:mod:`aoti_rt.serving` builds what an exporter says and maps what a client receives.

* A share name is an abstract Unix socket, ``\\0aoti_rt.<uid>.<name>``: no file to clean up
  after a crash (the kernel frees the name with its last descriptor), and one namespace per
  user. An abstract socket has no permissions, so each end checks the other's credentials
  (``SO_PEERCRED``, which the kernel fills in): the server refuses any peer whose uid is not
  the allowed one (its own): it says why, sends no descriptor and closes; the client refuses
  a server of another uid (a stranger that bound the name first must not feed it handles).
* A message is a 4-byte big-endian length and that many bytes of UTF-8 JSON. The server's
  answer carries the descriptors (``SCM_RIGHTS``) on its length prefix.
* Connecting is asking. The server answers at once with
  ``{"ok": true, "protocol": 2, ...}`` and one descriptor per arena, or with
  ``{"ok": false, "error": ...}`` and none.
* A client is attached while its connection is open: the server counts it until EOF, which
  the kernel delivers when the client closes the socket, exits or is killed (SIGKILL too).
* Later, on that connection, the server may push a new generation of what it serves
  (:meth:`ShareServer.push`): ``{"op": "generation", "generation": n, ...}`` with the fields
  and the descriptors of an answer; the client switches to it and says so with
  ``{"op": "ack", "generation": n, "ok": true}`` (or ``"ok": false`` and an ``"error"``: it
  keeps what it had). That is the only thing a client says.
* A server binds its name before it loads what it will serve, so that processes started at
  the same time load once: a client that connects early waits in the listen backlog for the
  answer; if the server gives up, the client sees the connection close and tries again.
* A client's ``timeout`` is one deadline for the whole exchange (connecting, a full backlog
  retried, every byte of the answer), not a limit per ``recv``: a server that answers a byte
  at a time cannot hold it longer.

What another user can do to a share name: the address is guessable and an abstract socket has
no permissions, so another uid can bind ``\\0aoti_rt.<your uid>.<name>`` first (squat it) or
fill the listen backlog of your exporter with connections. It cannot attach (the exporter
refuses its uid and sends it no descriptor), and it cannot feed you descriptors or a layout (a
client refuses a server of another uid before reading a byte). What it can do is keep you from
sharing: :class:`~aoti_rt.errors.ShareUnavailableError` once the deadline passes (at once for a
squatted name), on which ``aoti_rt.load`` loads privately with a warning unless told to insist
(``share_required=True``). It also learns the pid and uid of each process that connects.
"""

from __future__ import annotations

import errno
import json
import os
import re
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ShareError, ShareNameError, ShareUnavailableError

#: version of what the server says; a client refuses another (2: generations pushed, acknowledged)
PROTOCOL = 2
#: the largest message either side reads (a manifest of 100k weights is ~10 MB)
MAX_MESSAGE = 256 << 20
#: the most descriptors a client accepts in one answer (one per arena)
MAX_FDS = 64
#: seconds a server waits for a client to take its answer before dropping it
SEND_TIMEOUT = 30.0
#: the largest message a server reads from a client (an acknowledgement is ~60 bytes)
MAX_CLIENT_MESSAGE = 1 << 16

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_UCRED = struct.Struct("3i")      # struct ucred: pid, uid, gid


def check_name(name: str) -> str:
    """``name`` if it can name a share (1-64 of ASCII ``A-Z a-z 0-9 . _ -``, not starting with a
    punctuation mark), else :class:`~aoti_rt.errors.ShareNameError` (a ``ValueError`` too)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ShareNameError(f"share name {name!r:.80}: use 1-64 ASCII letters, digits, '.', '_' or '-', "
                             f"starting with a letter or digit")
    return name


def address(name: str, uid: int | None = None) -> bytes:
    """The abstract socket address of a share name for a user (default: this process's)."""
    uid = os.geteuid() if uid is None else uid
    return b"\0" + f"aoti_rt.{uid}.{check_name(name)}".encode()


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


# -- messages ----------------------------------------------------------------------------------

def send_message(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one message; ``fds`` travel with its length prefix (the caller still owns them)."""
    body = json.dumps(message, separators=(",", ":")).encode()
    head = len(body).to_bytes(4, "big")
    sent = socket.send_fds(sock, [head], list(fds)) if fds else sock.send(head)
    if sent < len(head):
        sock.sendall(head[sent:])
    sock.sendall(body)


def _until(sock: socket.socket, deadline: float | None) -> None:
    """Let the next call on ``sock`` wait only until ``deadline`` (monotonic; None: forever)."""
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed")
    sock.settimeout(left)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    parts = []
    while n:
        _until(sock, deadline)
        got = sock.recv(min(n, 1 << 20))
        if not got:
            raise EOFError("the connection closed in the middle of a message")
        parts.append(got)
        n -= len(got)
    return b"".join(parts)


def recv_message(sock: socket.socket, max_fds: int = 0, deadline: float | None = None
                 ) -> tuple[dict[str, Any], list[int]]:
    """Receive one message and the descriptors sent with it (the caller owns them: close them),
    all of it by ``deadline`` (``time.monotonic()``; None: the socket's own timeout).

    Raises EOFError if the peer closed before a whole message came, TimeoutError if the deadline
    passed first, :class:`ShareError` if what came is not a message of this protocol."""
    _until(sock, deadline)
    if max_fds:
        head, fds, flags, _ = socket.recv_fds(sock, 4, max_fds, socket.MSG_CMSG_CLOEXEC)
    else:
        head, fds, flags = sock.recv(4), [], 0
    try:
        if not head:
            raise EOFError("the peer closed the connection")
        if flags & socket.MSG_CTRUNC:
            raise ShareError(f"the peer sent more than {max_fds} descriptors")
        head += _recv_exact(sock, 4 - len(head), deadline)
        n = int.from_bytes(head, "big")
        if n > MAX_MESSAGE:
            raise ShareError(f"the peer announced a message of {n} bytes (at most {MAX_MESSAGE})")
        try:
            message = json.loads(_recv_exact(sock, n, deadline))
        except (ValueError, RecursionError) as e:
            raise ShareError(f"the peer sent a message that is not JSON ({type(e).__name__}: {e})"[:300]) from None
        if not isinstance(message, dict):
            raise ShareError("the peer sent a message that is not a JSON object")
        return message, fds
    except BaseException:
        _close_all(fds)
        raise


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- the server --------------------------------------------------------------------------------

@dataclass
class PushResult:
    """What the clients said to a generation :meth:`ShareServer.push` sent them, by pid."""

    #: the generation pushed
    generation: int
    #: clients that switched to it and said so
    acknowledged: list[int] = field(default_factory=list)
    #: clients that could not switch (they keep the previous generation): pid -> their reason
    failed: dict[int, str] = field(default_factory=dict)
    #: clients that closed their connection before answering (nothing to wait for)
    gone: list[int] = field(default_factory=list)
    #: clients that did not answer by the deadline (they keep the previous generation mapped
    #: until they switch; what they answer later is not waited for)
    late: list[int] = field(default_factory=list)


class _Peer:
    """A client connection's buffers in the server thread: bytes read and not yet a whole
    message, messages queued to send (each ``[bytes left, descriptors to send with them]``)."""

    __slots__ = ("pid", "inbuf", "out")

    def __init__(self, pid: int):
        self.pid = pid
        self.inbuf = bytearray()
        self.out: deque[list[Any]] = deque()


class _Push:
    """One generation sent to the clients attached when the server thread took it."""

    def __init__(self, generation: int, wire: bytes, descriptors: Callable[[], list[int]]):
        self.generation = generation
        self.wire = wire
        self.descriptors = descriptors
        self.targets: dict[socket.socket, int] | None = None     # set by the server thread
        self.answers: dict[socket.socket, dict[str, Any]] = {}
        self.gone: set[socket.socket] = set()
        self.aborted = False

    def done(self) -> bool:
        return self.aborted or (self.targets is not None and
                                all(c in self.answers or c in self.gone for c in self.targets))

    def result(self) -> PushResult:
        r = PushResult(self.generation)
        for conn, pid in (self.targets or {}).items():
            answer = self.answers.get(conn)
            if answer is not None and answer.get("ok") is True:
                r.acknowledged.append(pid)
            elif answer is not None:
                r.failed[pid] = str(answer.get("error", "no reason given"))[:500]
            elif conn in self.gone:
                r.gone.append(pid)
            else:
                r.late.append(pid)
        return r


class ShareServer:
    """Serves one share name: answers each client with a payload and fresh descriptors, counts
    the clients attached, refuses other users, and pushes new generations to its clients.

    :meth:`bind` claims the name (connections queue from then on); :meth:`serve` starts the
    daemon thread that answers them; :meth:`push` serves a new payload and sends it to the
    clients attached; :meth:`close` stops it, drops every client connection and frees the name.
    ``allowed_uid`` (default: this process's effective uid) is the only uid answered; a test
    sets another to prove that a stranger is refused.
    """

    def __init__(self, sock: socket.socket, name: str, *, allowed_uid: int | None = None):
        self.name = name
        self.allowed_uid = os.geteuid() if allowed_uid is None else allowed_uid
        self._sock = sock
        self._payload: dict[str, Any] | None = None
        self._descriptors: Callable[[], list[int]] | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._clients: dict[socket.socket, int] = {}     # connection -> client pid
        self._peers: dict[socket.socket, _Peer] = {}     # the server thread's own
        self._pushes: list[_Push] = []                   # taken by the thread, waited for by push()
        self._new: list[_Push] = []                      # not taken yet
        self._attached = 0
        self._refused = 0
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = False

    @classmethod
    def bind(cls, name: str, *, allowed_uid: int | None = None) -> "ShareServer | None":
        """Claim ``name`` for this user, or None if a process holds it already."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(address(name))
            sock.listen(128)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                return None
            raise ShareUnavailableError(f"could not claim share name {name!r}: {e}") from None
        return cls(sock, name, allowed_uid=allowed_uid)

    def serve(self, payload: dict[str, Any], descriptors: Callable[[], list[int]]) -> None:
        """Start answering: each allowed client gets ``{"ok": true, "protocol": PROTOCOL,
        **payload}`` and the descriptors ``descriptors()`` returns for it (new ones each time,
        which the server closes once sent)."""
        if self._closed:
            raise ShareError(f"the server of {self.name!r} is closed")
        self._payload = {"ok": True, "protocol": PROTOCOL, **payload}
        self._descriptors = descriptors
        self._sock.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"aoti_rt-share-{self.name}", daemon=True)
        self._thread.start()

    def push(self, payload: dict[str, Any], descriptors: Callable[[], list[int]], generation: int,
             timeout: float) -> PushResult:
        """Serve ``payload`` and ``descriptors`` (as :meth:`serve` does) to the clients that attach
        from now on, send them as generation ``generation`` (``{"op": "generation",
        "generation": ..., **payload}``, descriptors made for each client) to every client
        attached now, and wait until each has answered or closed, at most ``timeout`` seconds.

        A client that attaches while this runs gets the new payload, or the old one and then
        this message: none is left on the old generation unknowingly. Returns who answered
        what; never raises for a client (a server closed meanwhile: every client is gone)."""
        if self._thread is None:
            raise ShareError(f"the server of {self.name!r} is not serving")
        body = json.dumps({"ok": True, "protocol": PROTOCOL, **payload, "op": "generation",
                           "generation": generation}, separators=(",", ":")).encode()
        job = _Push(generation, len(body).to_bytes(4, "big") + body, descriptors)
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._closed:
                job.aborted = True
                return job.result()
            self._payload = {"ok": True, "protocol": PROTOCOL, **payload}
            self._descriptors = descriptors
            self._new.append(job)
        self._wake(b"p")
        with self._cond:
            try:
                while not job.done():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                return job.result()
            finally:
                if job in self._pushes:
                    self._pushes.remove(job)
                elif job in self._new:
                    self._new.remove(job)

    def stats(self) -> dict[str, Any]:
        """``clients`` attached now (and their ``pids``), ``attached`` in all, ``refused``."""
        with self._lock:
            return {"name": self.name, "clients": len(self._clients), "pids": sorted(self._clients.values()),
                    "attached": self._attached, "refused": self._refused, "serving": self.serving}

    @property
    def serving(self) -> bool:
        return self._thread is not None and not self._closed

    def close(self) -> None:
        """Stop answering, close every client connection and free the name (idempotent); a
        :meth:`push` waiting returns.

        What clients mapped stays theirs: closing a connection takes nothing back."""
        if self._closed:
            return
        with self._cond:
            self._closed = True
        if self._thread is not None:
            self._wake(b"x")
            self._thread.join()
        else:
            self._sock.close()        # queued connections see EOF: their clients try again
        self._wake_r.close()
        self._wake_w.close()
        self._payload = self._descriptors = None

    def _wake(self, why: bytes) -> None:
        try:
            self._wake_w.send(why)
        except OSError:
            pass

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while True:
                for key, events in sel.select():
                    if key.data == "wake":
                        self._wake_r.recv(4096)
                        if self._closed:
                            return
                        self._take_pushes(sel)
                    elif key.data == "listen":
                        self._accept(sel)
                    elif key.fileobj in self._peers:
                        if events & selectors.EVENT_WRITE:
                            self._flush(sel, key.fileobj)
                        if events & selectors.EVENT_READ and key.fileobj in self._peers:
                            self._readable(sel, key.fileobj)
        finally:
            for conn in list(self._peers):
                self._drop(sel, conn)
            with self._cond:
                for job in self._pushes + self._new:
                    job.aborted = True
                self._cond.notify_all()
            sel.close()
            self._sock.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:      # out of descriptors, say: this client sees its connection close
            return
        try:
            pid, uid, _ = peer_credentials(conn)
            conn.settimeout(SEND_TIMEOUT)
            if uid != self.allowed_uid:
                with self._lock:
                    self._refused += 1
                send_message(conn, {"ok": False, "protocol": PROTOCOL,
                                    "error": f"uid {uid} may not attach to share {self.name!r}: it serves "
                                             f"uid {self.allowed_uid} only"})
                conn.close()
                return
            self._answer(conn)
        except Exception:  # noqa: BLE001 - this client sees its connection close; the others are served
            conn.close()
            return
        conn.setblocking(False)
        self._peers[conn] = _Peer(pid)
        with self._lock:
            self._clients[conn] = pid
            self._attached += 1
        sel.register(conn, selectors.EVENT_READ, "client")

    def _answer(self, conn: socket.socket) -> None:
        with self._lock:
            payload, descriptors = self._payload, self._descriptors
        try:
            fds = descriptors() if descriptors is not None else []
        except Exception as e:  # noqa: BLE001 - a driver that cannot export: tell the client why
            send_message(conn, {"ok": False, "protocol": PROTOCOL,
                                "error": f"the exporter could not make handles: {type(e).__name__}: {e}"})
            raise OSError("refused") from None
        try:
            send_message(conn, payload or {}, fds)
        finally:
            _close_all(fds)

    def _take_pushes(self, sel: selectors.BaseSelector) -> None:
        """Queue each new push to every client attached now (descriptors made for each)."""
        with self._cond:
            jobs, self._new = self._new, []
            self._pushes.extend(jobs)
        for job in jobs:
            targets = dict(self._clients)
            failed: dict[socket.socket, dict[str, Any]] = {}
            for conn in targets:
                try:
                    fds = job.descriptors()
                except Exception as e:  # noqa: BLE001 - reported as this client's failure
                    failed[conn] = {"ok": False, "error": f"the exporter could not make handles: {e}"}
                    continue
                self._peers[conn].out.append([memoryview(job.wire), fds])
                sel.modify(conn, selectors.EVENT_READ | selectors.EVENT_WRITE, "client")
            with self._cond:
                job.targets = targets
                job.answers.update(failed)
                self._cond.notify_all()

    def _flush(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        """Send what is queued for ``conn`` until its socket is full (descriptors with the first
        bytes of their message)."""
        out = self._peers[conn].out
        while out:
            item = out[0]
            try:
                if item[1]:
                    n = socket.send_fds(conn, [item[0][:4]], item[1])
                    _close_all(item[1])
                    item[1] = []
                else:
                    n = conn.send(item[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(sel, conn)
                return
            item[0] = item[0][n:]
            if not item[0]:
                out.popleft()
        sel.modify(conn, selectors.EVENT_READ, "client")

    def _readable(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sel, conn)
            return
        buf = self._peers[conn].inbuf
        buf += data
        while len(buf) >= 4:
            n = int.from_bytes(buf[:4], "big")
            if n > MAX_CLIENT_MESSAGE:
                self._drop(sel, conn)        # not an aoti_rt client: it is detached
                return
            if len(buf) < 4 + n:
                return
            try:
                message = json.loads(bytes(buf[4:4 + n]))
            except (ValueError, RecursionError):
                message = None
            del buf[:4 + n]
            if isinstance(message, dict) and message.get("op") == "ack":
                with self._cond:
                    for job in self._pushes:
                        if job.generation == message.get("generation") and job.targets and conn in job.targets:
                            job.answers[conn] = message
                    self._cond.notify_all()

    def _drop(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        """The client is gone (closed, exited, killed) or misbehaved: forget and close it."""
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        peer = self._peers.pop(conn, None)
        for item in peer.out if peer is not None else ():
            _close_all(item[1])
        with self._cond:
            self._clients.pop(conn, None)
            for job in self._pushes:
                if job.targets and conn in job.targets:
                    job.gone.add(conn)
            self._cond.notify_all()
        conn.close()

    def __repr__(self) -> str:
        s = self.stats()
        return f"<aoti_rt ShareServer {self.name!r} clients={s['clients']} serving={s['serving']}>"


# -- the client --------------------------------------------------------------------------------

class Attachment:
    """A client's connection to the process that serves a share name, and what it answered.

    Keep it open while the weights are used: the server counts the client until it closes
    (:meth:`close`, exit or a kill). ``fds`` are the received descriptors, the caller's to
    close once mapped (:meth:`take_fds` hands them over).
    """

    def __init__(self, sock: socket.socket, payload: dict[str, Any], fds: list[int], server_pid: int):
        self.sock = sock
        self.payload = payload
        self.fds = fds
        self.server_pid = server_pid

    def take_fds(self) -> list[int]:
        """The received descriptors, now the caller's to close."""
        fds, self.fds = self.fds, []
        return fds

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0

    def acknowledge(self, generation: int, error: str | None = None) -> None:
        """Tell the server that this client switched to the generation it pushed (``error``:
        it could not, and why; it keeps the one it had)."""
        message: dict[str, Any] = {"op": "ack", "generation": generation, "ok": error is None}
        if error is not None:
            message["error"] = error[:500]
        send_message(self.sock, message)

    def close(self) -> None:
        """Detach: close the connection (and any descriptor not taken)."""
        _close_all(self.take_fds())
        self.sock.close()


def attach(name: str, *, timeout: float | None = None, expected_uid: int | None = None) -> Attachment | None:
    """Connect to the process that serves ``name`` for this user and take its answer.

    Returns None when nobody serves it (or the server closed before answering: a load that
    failed or a model closed), so the caller may serve it itself. ``expected_uid`` (default:
    this process's effective uid) is the only uid whose answer is taken. ``timeout`` (seconds;
    None: no limit) bounds the whole exchange: a full listen backlog is retried until then, and
    the answer must have come whole by then.

    Raises:
        ShareUnavailableError: the name is held by another user's process (or by something
            that is not a share server), the server refused this process or could not make
            handles, or the exchange did not end within ``timeout`` (the exporter may still be
            loading what it will serve, or a peer is stalling).
        ShareNameError: ``name`` cannot name a share.
        ShareError: the server's answer is not this protocol's.
    """
    addr = address(name)
    want = os.geteuid() if expected_uid is None else expected_uid
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            got = _exchange(sock, name, addr, want, deadline, timeout)
        except BaseException:
            sock.close()
            raise
        if got is not None:
            return None if got is _NOBODY else got
        sock.close()              # a full backlog: try again until the deadline
        left = None if deadline is None else deadline - time.monotonic()
        time.sleep(pause if left is None else max(0.0, min(pause, left)))
        pause = min(pause * 2, 0.1)
        if deadline is not None and time.monotonic() >= deadline:
            raise ShareUnavailableError(
                f"the listen queue of share {name!r} stayed full for {timeout} s (its exporter is still "
                f"loading with many processes waiting, or another process floods it); wait longer "
                f"($AOTI_RT_SHARE_TIMEOUT) or use another name")


_NOBODY: Any = object()


def _exchange(sock: socket.socket, name: str, addr: bytes, want: int, deadline: float | None,
              timeout: float | None) -> "Attachment | None | Any":
    """One try of :func:`attach` on a new socket: the Attachment, _NOBODY (nobody serves
    ``name``), or None (the listen backlog is full: try again). Closes ``sock`` unless it
    returns an Attachment."""
    try:
        _until(sock, deadline)
        sock.connect(addr)
    except BlockingIOError:
        return None
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return _NOBODY
    except TimeoutError:
        raise _late(name, None, timeout) from None
    except OSError as e:
        raise ShareUnavailableError(f"share name {name!r} is held by something that is not an aoti_rt "
                                    f"exporter ({e}); use another share name") from None
    try:
        pid, uid, _ = peer_credentials(sock)
    except OSError as e:
        raise ShareUnavailableError(f"the process serving {name!r} cannot be identified ({e}); use another "
                                    f"share name") from None
    if uid != want:
        raise ShareUnavailableError(
            f"share name {name!r} is held by a process of uid {uid} (pid {pid}), not by uid {want}; refusing "
            f"handles from another user. Use another share name")
    try:
        message, fds = recv_message(sock, MAX_FDS, deadline)
    except (EOFError, ConnectionResetError, BrokenPipeError):
        sock.close()
        return _NOBODY
    except TimeoutError:
        raise _late(name, pid, timeout) from None
    except OSError as e:
        raise ShareUnavailableError(f"the answer of the process serving {name!r} (pid {pid}) could not be "
                                    f"read: {e}") from None
    if message.get("ok") is not True:
        _close_all(fds)
        raise ShareUnavailableError(f"the process serving {name!r} (pid {pid}) refused this process: "
                                    f"{str(message.get('error', 'no reason given'))[:500]}")
    if message.get("protocol") != PROTOCOL:
        _close_all(fds)
        raise ShareError(f"the process serving {name!r} (pid {pid}) speaks protocol "
                         f"{str(message.get('protocol'))[:40]!r}, this aoti_rt {PROTOCOL}: run the same aoti_rt "
                         f"version in both, or use another name")
    sock.settimeout(None)
    return Attachment(sock, message, fds, pid)


def _late(name: str, pid: int | None, timeout: float | None) -> ShareUnavailableError:
    who = f"the process serving {name!r}" + (f" (pid {pid})" if pid is not None else "")
    return ShareUnavailableError(f"{who} did not answer in {timeout} s (it may still be loading); wait longer "
                                 f"($AOTI_RT_SHARE_TIMEOUT) or use another name")


__all__ = ["PROTOCOL", "PushResult", "ShareServer", "Attachment", "attach", "address", "check_name",
           "peer_credentials", "send_message", "recv_message"]
