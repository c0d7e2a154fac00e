"""The control socket of a running instance: AF_UNIX, one JSON request and one JSON answer.

Protocol: the client connects, sends one line ``{"cmd": "status"}``, and reads
one JSON document (terminated by a newline) before the server closes. An
unknown command answers ``{"error": "..."}``. The socket file is created with
mode 0600 (the instance runs as root, and its answer lists kernel state).

The server side is sans-loop: :class:`ControlServer` registers its listening
socket, and every client it accepts, in the caller's selector (``data`` is the
server itself); the caller passes each ready key to :meth:`ControlServer.handle`.
No call blocks: clients are read and written without blocking, many at a time,
so a slow or silent client never holds up another client or the caller's loop.
Or it answers on a thread of its own (:meth:`ControlServer.serve_thread`), for
an instance whose main loop is asyncio (the proxy engine).

Limits (each refusal is answered with ``{"error": ...}`` when the client still
listens, and counted in the ``control`` section of ``status``):

* a request is one line of at most 4096 bytes (``request_too_large``), nested at
  most 8 deep (``request_too_deep``: checked by a scan before ``json.loads``,
  whose recursion could otherwise raise RecursionError);
* a client has 1 s from its accept to send its request, and 1 s after its answer
  is ready to read it (``client_timeout``; the time the handler takes is not
  counted);
* at most 32 clients are open at once; one more closes the oldest (``evicted``);
* when ``accept`` fails with EMFILE/ENFILE, a spare descriptor held for that
  purpose is closed, the client is accepted, told so and closed, and the spare is
  reopened (``fd_exhausted``), so the listener is never left readable forever;
* an exception from a handler becomes an error answer (``handler_error``) and a
  log line; it never reaches the caller's loop.

Peers (``SO_PEERCRED``): the server reads the uid of every client it accepts. A
command named in ``mutating`` (one that changes state: ``ctl``) is refused with
``{"error": ..., "exit": 1}`` and counted (``peer_refused``) unless the peer's uid
is the server's own effective uid or 0; ``status`` answers any peer that can open
the socket (mode 0600, or 0660 with ``group``: the group can read the status, not
change anything).

``threaded=True`` runs each handler on a short-lived thread (at most 4 at once,
one handler at a time; more are answered ``busy``), for a handler that takes
seconds (the kernel plane's status reads the kernel's objects back).

The daemon (:mod:`v6lb.engines.daemon`) is the one owner of an instance's
socket: its ``status`` handler composes the answer from every plane of the
instance (the proxy engine's section included), so ONE socket answers for the
whole instance. :meth:`ControlServer._call` adds the ``control`` counters.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from v6lb.errors import RuntimeFailure

__all__ = [
    "ControlError",
    "ControlServer",
    "json_depth",
    "query",
]

MAX_REQUEST = 4096
MAX_DEPTH = 8
CLIENT_DEADLINE = 1.0
MAX_CLIENTS = 32
MAX_WORKERS = 4
_BACKLOG = 64
_LOG_EVERY = 10.0  # seconds between two log lines of the same kind

Handler = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class ControlError(RuntimeFailure, RuntimeError):
    """No instance answers on the socket, or its answer is not JSON."""


def json_depth(data: bytes) -> int:
    """How deep the arrays and objects of JSON text ``data`` nest (brackets in strings skipped)."""
    if data.count(b"[") + data.count(b"{") <= 1:
        return data.count(b"[") + data.count(b"{")
    depth = peak = 0
    in_string = escaped = False
    for b in data:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b == 0x5B or b == 0x7B:
            depth += 1
            if depth > peak:
                peak = depth
        elif b == 0x5D or b == 0x7D:
            depth -= 1
    return peak


def recv_all(s: socket.socket) -> bytes:
    """Everything the peer sends on ``s`` until it closes (the socket's timeout applies)."""
    chunks: list[bytes] = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def query(
    path: str,
    cmd: str = "status",
    *,
    timeout: float = 10.0,
    args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Ask the instance at ``path`` (``args``: the request's other keys); its JSON answer.

    Every failure is a :class:`ControlError` with a message, never an OSError: a
    full listen queue (EAGAIN on an AF_UNIX connect) is retried until ``timeout``.
    """
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                s.connect(path)
                break
            except FileNotFoundError:
                raise ControlError(
                    f"no control socket at {path}: is `v6lb run` running with this file?"
                ) from None
            except ConnectionRefusedError:
                raise ControlError(
                    f"nothing answers on {path} (a stale socket: the instance has stopped)"
                ) from None
            except PermissionError:
                raise ControlError(f"no permission to open {path}: run it as root") from None
            except BlockingIOError:  # the listen queue is full: the instance is busy
                if time.monotonic() >= deadline:
                    raise TimeoutError from None
                time.sleep(0.02)
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            s.sendall(json.dumps({**(args or {}), "cmd": cmd}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before reading the request: its answer says why
        data = recv_all(s)
    except TimeoutError:
        raise ControlError(f"the instance at {path} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(
            f"the control socket {path} failed: {exc.strerror or exc} (is the instance overloaded"
            " or stopping? try again)"
        ) from None
    finally:
        s.close()
    try:
        answer = json.loads(data or b"null")
    except (ValueError, RecursionError) as exc:
        raise ControlError(f"the answer on {path} is not JSON: {exc}") from None
    if not isinstance(answer, dict):
        raise ControlError(f"the answer on {path} is not a JSON object")
    return answer


def _alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of an AF_UNIX socket (SO_PEERCRED), or None."""
    try:
        _, uid, _ = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except (OSError, struct.error):
        return None
    return int(uid)


class _Client:
    __slots__ = ("sock", "data", "out", "deadline", "born", "uid")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.uid = peer_uid(sock)
        self.data = b""
        self.out = b""  # the answer, once there is one
        self.born = now
        self.deadline = now + CLIENT_DEADLINE


def _encode(answer: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(answer).encode() + b"\n"
    except (TypeError, ValueError) as exc:  # a handler returned something not JSON
        return json.dumps({"error": f"the answer could not be encoded: {exc}"}).encode() + b"\n"


class ControlServer:
    """The listening side; ``handlers`` maps a command name to a function of the request.

    ``log`` receives one line per problem (rate-limited); the default writes to stderr.
    """

    def __init__(
        self,
        path: str,
        handlers: Mapping[str, Handler],
        *,
        log: Callable[[str], None] | None = None,
        threaded: bool = False,
        mutating: Collection[str] = (),
        group: int | None = None,
    ) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self.threaded = threaded
        self.mutating = frozenset(mutating)
        self.owners = frozenset({os.geteuid(), 0})
        self.counters: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self._log = log or (lambda line: sys.stderr.write(f"v6lb: control socket: {line}\n"))
        self._logged: dict[str, float] = {}
        self._clients: dict[int, _Client] = {}  # by descriptor
        self._sel: selectors.BaseSelector | None = None
        self._workers = 0
        self._workers_lock = threading.Lock()
        self._handler_lock = threading.Lock()
        if os.path.exists(path):
            if _alive(path):
                raise ControlError(
                    f"another instance already answers on {path}: stop it first, or give this"
                    " one its own lb.control_socket (or --control-socket)"
                )
            os.unlink(path)  # stale, left by a crash
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
            if group is not None:  # the group may ask for the status (0660)
                os.chown(path, -1, group)
                os.chmod(path, 0o660)
        except BaseException:
            self.sock.close()
            raise
        finally:
            os.umask(old)
        self.sock.listen(_BACKLOG)
        self.sock.setblocking(False)
        self._spare = _open_spare()

    def register(self, selector: selectors.BaseSelector) -> None:
        self._sel = selector
        selector.register(self.sock, selectors.EVENT_READ, self)

    def count(self, kind: str) -> None:
        with self._count_lock:
            self.counters[kind] += 1

    def note(self, kind: str, message: str) -> None:
        """Count ``kind`` and log ``message`` (at most once per 10 s per kind)."""
        self.count(kind)
        now = time.monotonic()
        if now - self._logged.get(kind, -_LOG_EVERY) >= _LOG_EVERY:
            self._logged[kind] = now
            try:
                self._log(f"{message} ({kind}: {self.counters[kind]} so far)")
            except Exception:  # a broken log sink must not break the control socket
                pass

    def stats(self) -> dict[str, int]:
        """Counters by outcome (``answered`` and each refusal reason) and open clients."""
        with self._count_lock:
            return {**self.counters, "open_clients": len(self._clients)}

    # --- the loop's side ----------------------------------------------------------

    def handle(self, key: selectors.SelectorKey | None = None) -> None:
        """Serve whatever is ready: new clients on the listener, or the client of ``key``.

        Without ``key`` every open client is tried. Never blocks, never raises.
        """
        try:
            now = time.monotonic()
            if key is None or key.fileobj is self.sock:
                self._accept(now)
            if key is not None and key.fileobj is not self.sock:
                c = self._clients.get(key.fd)
                if c is not None:
                    self._serve(c, now)
            elif key is None:
                for c in list(self._clients.values()):
                    self._serve(c, now)
            self.expire(now)
        except Exception as exc:  # the control socket never takes the data plane down
            self.note("internal_error", f"internal error: {type(exc).__name__}: {exc}")

    def expire(self, now: float | None = None) -> None:
        """Close the clients past their deadline."""
        now = time.monotonic() if now is None else now
        for c in [c for c in self._clients.values() if now >= c.deadline]:
            self.note("client_timeout", "a client did not finish within 1 s: closed")
            self._drop(c)

    def _accept(self, now: float) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._shed(exc)
                else:
                    self.note("accept_error", f"accept failed: {exc.strerror or exc}")
                return
            conn.setblocking(False)
            if len(self._clients) >= MAX_CLIENTS:
                oldest = min(self._clients.values(), key=lambda c: c.born)
                self.note("evicted", f"{MAX_CLIENTS} clients open: closed the oldest")
                self._drop(oldest)
            c = _Client(conn, now)
            self._clients[conn.fileno()] = c
            if self._sel is not None:
                try:
                    self._sel.register(conn, selectors.EVENT_READ, self)
                except (ValueError, KeyError, OSError):
                    pass
            self._serve(c, now)  # the request is often there already

    def _shed(self, exc: OSError) -> None:
        """Out of descriptors: use the spare one to accept a client and tell it so."""
        if self._spare is None:
            self._spare = _open_spare()
            self.note("fd_exhausted", f"accept failed: {exc.strerror}; no spare descriptor")
            return
        os.close(self._spare)
        self._spare = None
        try:
            conn, _ = self.sock.accept()
        except OSError:
            pass
        else:
            try:
                conn.setblocking(False)
                with contextlib.suppress(OSError):
                    conn.recv(MAX_REQUEST)  # read what came, so the close is not a reset
                conn.send(
                    _encode({"error": f"the instance is out of file descriptors ({exc.strerror})"})
                )
            except OSError:
                pass
            conn.close()
        self._spare = _open_spare()
        self.note(
            "fd_exhausted",
            f"accept failed: {exc.strerror}; a client was told so and closed (raise LimitNOFILE)",
        )

    def _serve(self, c: _Client, now: float) -> None:
        if c.out:
            self._send(c)
            return
        eof = False
        try:
            while b"\n" not in c.data and len(c.data) <= MAX_REQUEST:
                chunk = c.sock.recv(MAX_REQUEST + 1 - len(c.data))
                if not chunk:
                    eof = True
                    break
                c.data += chunk
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(c)
            return
        line, newline, _ = c.data.partition(b"\n")
        if len(line) > MAX_REQUEST:
            self.note("request_too_large", f"a request over {MAX_REQUEST} bytes: refused")
            self._answer(c, {"error": f"the request is over {MAX_REQUEST} bytes"})
        elif newline or eof:
            self._dispatch(c, line)

    def _dispatch(self, c: _Client, line: bytes) -> None:
        if line.count(b"[") + line.count(b"{") > MAX_DEPTH and json_depth(line) > MAX_DEPTH:
            self.note("request_too_deep", f"a request nested over {MAX_DEPTH} deep: refused")
            self._answer(c, {"error": f"the request nests deeper than {MAX_DEPTH}"})
            return
        try:
            request = json.loads(line or b"{}")
        except ValueError as exc:
            self.note("bad_request", "a request that is not JSON: refused")
            self._answer(c, {"error": f"the request is not JSON: {exc}"})
            return
        cmd = request.get("cmd", "status") if isinstance(request, dict) else None
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None or not isinstance(cmd, str):
            self.note("unknown_command", f"unknown command {cmd!r}: refused")
            self._answer(c, {"error": f"unknown command {cmd!r}; known: {sorted(self.handlers)}"})
            return
        if cmd in self.mutating and c.uid not in self.owners:
            self.note("peer_refused", f"{cmd} from uid {c.uid}: refused")
            self._answer(
                c,
                {
                    "error": f"{cmd} changes the instance and is refused for uid {c.uid}: only"
                    f" uid {min(self.owners - {0}, default=0)} (the instance's) or root may;"
                    " run it as that user (sudo)",
                    "exit": 1,
                },
            )
            return
        if not self.threaded:
            self._answer(c, self._call(handler, cmd, request))
            return
        with self._workers_lock:
            busy = self._workers >= MAX_WORKERS
            if not busy:
                self._workers += 1
        if busy:
            self.note("busy", f"{MAX_WORKERS} answers in progress: refused")
            self._answer(c, {"error": "the instance is busy answering others; try again"})
            return
        self._forget(c)  # the worker owns the socket from here

        def work() -> None:
            try:
                with self._handler_lock:
                    out = _encode(self._call(handler, cmd, request))
                c.sock.settimeout(CLIENT_DEADLINE)
                c.sock.sendall(out)
                self.count("answered")
            except OSError:
                self.count("client_timeout")
            finally:
                c.sock.close()
                with self._workers_lock:
                    self._workers -= 1

        threading.Thread(target=work, name="v6lb-control-answer", daemon=True).start()

    def _call(self, handler: Handler, cmd: str, request: Any) -> Mapping[str, Any]:
        try:
            answer = handler(request)
            if cmd != "status" or "error" in answer:
                return answer
            return {**answer, "control": self.stats()}
        except Exception as exc:
            self.note("handler_error", f"{cmd}: {type(exc).__name__}: {exc}")
            return {"error": f"{cmd} failed: {type(exc).__name__}: {exc}"}

    def _answer(self, c: _Client, answer: Mapping[str, Any]) -> None:
        c.out = _encode(answer)
        c.deadline = time.monotonic() + CLIENT_DEADLINE
        self._send(c)

    def _send(self, c: _Client) -> None:
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._drop(c)
            return
        c.out = c.out[n:]
        if not c.out:
            self.count("answered")
            self._drop(c)
        elif self._sel is not None:
            try:
                self._sel.modify(c.sock, selectors.EVENT_WRITE, self)
            except (KeyError, ValueError, OSError):
                pass

    def _forget(self, c: _Client) -> None:
        self._clients.pop(c.sock.fileno(), None)
        if self._sel is not None:
            try:
                self._sel.unregister(c.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _drop(self, c: _Client) -> None:
        self._forget(c)
        c.sock.close()

    def serve_thread(self, stop: threading.Event, *, poll: float = 0.2) -> threading.Thread:
        """Answer clients on a daemon thread of its own until ``stop`` is set."""

        sel = selectors.DefaultSelector()  # made here: a failure is the caller's, not the thread's
        self.register(sel)

        def loop() -> None:
            with sel:
                while not stop.is_set():
                    try:
                        ready = sel.select(poll)
                    except OSError:  # pragma: no cover - EINTR is retried by Python
                        ready = []
                    for key, _ in ready:
                        self.handle(key)
                    self.expire()
                for c in list(self._clients.values()):
                    self._drop(c)
                self._sel = None

        t = threading.Thread(target=loop, name="v6lb-control", daemon=True)
        t.start()
        return t

    def close(self, selector: selectors.BaseSelector | None = None) -> None:
        for c in list(self._clients.values()):
            self._drop(c)
        if selector is not None:
            try:
                selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
        self.sock.close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
