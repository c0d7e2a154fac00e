"""The control socket of a running instance: AF_UNIX, one JSON request and one JSON answer.

Protocol: the client connects, sends one line ``{"cmd": "status"}``, and reads
one JSON document (terminated by a newline) before the server closes. An
unknown command answers ``{"error": "..."}``. The socket file is created with
mode 0600 (the instance runs as root, and its answer lists kernel state).

The server side is sans-loop: :class:`ControlServer` registers its listening
socket in the caller's selector (``data`` is the server itself) and answers a
request when the caller passes it the ready key; or it answers on a thread of
its own (:meth:`ControlServer.serve_thread`), for an instance whose main loop
is asyncio (the proxy engine), so a slow client never blocks that loop.

Status sections: a part of the process that is not the owner of the socket
(the proxy engine next to the kernel data plane) adds a section to every
``status`` answer with :func:`add_status_section`, so ONE socket answers for
the whole instance. A section function is called on the answering thread; it
must be thread-safe (the proxy engine hands the work to its event loop).
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ControlError",
    "ControlServer",
    "add_status_section",
    "query",
    "remove_status_section",
]

_MAX_REQUEST = 4096
_CLIENT_TIMEOUT = 2.0

Handler = Callable[[Mapping[str, Any]], Mapping[str, Any]]

_sections: dict[str, Callable[[], Any]] = {}
_sections_lock = threading.Lock()


def add_status_section(name: str, section: Callable[[], Any]) -> None:
    """Add ``name: section()`` to every ``status`` answer of this process's control sockets."""
    with _sections_lock:
        _sections[name] = section


def remove_status_section(name: str) -> None:
    with _sections_lock:
        _sections.pop(name, None)


def _with_sections(answer: Mapping[str, Any]) -> Mapping[str, Any]:
    with _sections_lock:
        sections = list(_sections.items())
    if not sections or "error" in answer:
        return answer
    out = dict(answer)
    for name, section in sections:
        try:
            out[name] = section()
        except Exception as exc:  # one broken section must not hide the rest
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


class ControlError(RuntimeError):
    """No instance answers on the socket, or its answer is not JSON."""


def recv_all(s: socket.socket) -> bytes:
    """Everything the peer sends on ``s`` until it closes (the socket's timeout applies)."""
    chunks: list[bytes] = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def query(path: str, cmd: str = "status", *, timeout: float = 10.0) -> dict[str, Any]:
    """Ask the instance at ``path``; its JSON answer as a dict."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
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
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        data = recv_all(s)
    except TimeoutError:
        raise ControlError(f"the instance at {path} did not answer within {timeout:g} s") from None
    finally:
        s.close()
    try:
        answer = json.loads(data or b"null")
    except ValueError as exc:
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


class ControlServer:
    """The listening side; ``handlers`` maps a command name to a function of the request."""

    def __init__(self, path: str, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = dict(handlers)
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
        finally:
            os.umask(old)
        self.sock.listen(16)
        self.sock.setblocking(False)

    def register(self, selector: selectors.BaseSelector) -> None:
        selector.register(self.sock, selectors.EVENT_READ, self)

    def handle(self) -> None:
        """Accept one client and answer it (a slow or silent client is cut off after 2 s)."""
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        conn.settimeout(_CLIENT_TIMEOUT)
        try:
            data = b""
            while b"\n" not in data and len(data) < _MAX_REQUEST:
                chunk = conn.recv(_MAX_REQUEST)
                if not chunk:
                    break
                data += chunk
            answer: Mapping[str, Any]
            try:
                request = json.loads(data.split(b"\n", 1)[0] or b"{}")
                cmd = request.get("cmd", "status") if isinstance(request, dict) else None
                handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
                if handler is None:
                    answer = {"error": f"unknown command {cmd!r}; known: {sorted(self.handlers)}"}
                else:
                    answer = handler(request)
                    if cmd == "status":
                        answer = _with_sections(answer)
            except ValueError as exc:
                answer = {"error": f"the request is not JSON: {exc}"}
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            pass
        finally:
            conn.close()

    def serve_thread(self, stop: threading.Event, *, poll: float = 0.2) -> threading.Thread:
        """Answer clients on a daemon thread of its own until ``stop`` is set."""

        def loop() -> None:
            with selectors.DefaultSelector() as sel:
                self.register(sel)
                while not stop.is_set():
                    for _key, _ in sel.select(poll):
                        self.handle()

        t = threading.Thread(target=loop, name="v6lb-control", daemon=True)
        t.start()
        return t

    def close(self, selector: selectors.BaseSelector | None = None) -> None:
        if selector is not None:
            try:
                selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
