"""Client traffic to a VIP under a failure: long-lived flows and new connections, timed.

``python -m v6lb.lab.agents.traffic VIP PORT N`` talks to a
:mod:`~v6lb.lab.agents.greet_server` behind the VIP:

* ``N == 0``: 60 connections one after the other; prints one JSON list of
  :class:`Attempt` objects (``t0``, ``t1``, ``sport``, ``backend``, ``err``) and exits.
* ``N > 0``: opens ``N`` long-lived connections and prints ``[[sport, backend], ...]``
  (each flow's backend is the one that greeted it). Then every flow sends a line every
  100 ms and checks that the same backend answers, and a new connection opens every
  100 ms, until a line arrives on stdin. Then it prints
  ``{"flows": [Flow...], "new": [Attempt...]}`` and exits.

A flow's ``err`` is the name of the exception that ended it (``ConnectionError`` when the
backend closed it, ``ConnectionResetError``, ``TimeoutError`` after 5 s without an
answer, ...); ``wrong`` counts answers from another backend, ``max_rtt`` is its worst
round trip (its longest stall). Times are :func:`time.monotonic`, the same clock in every
namespace, so the caller can compare them with the moment it caused a failure.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Final

__all__ = ["Attempt", "Flow", "Traffic", "attempt", "main", "read_line"]

INTERVAL: Final = 0.1  # seconds between a flow's questions, and between new connections
TIMEOUT: Final = 5.0  # a connect or an answer that takes longer fails with TimeoutError
SHORT_COUNT: Final = 60


def read_line(s: socket.socket) -> list[str]:
    """The words of the next line from ``s``; ConnectionError when the peer closes first."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data.decode().split()


@dataclass(slots=True)
class Attempt:
    """One new connection: when it started and ended, its source port, who greeted it."""

    t0: float
    t1: float
    sport: int | None
    backend: str | None
    err: str | None


def attempt(vip: str, port: int, *, timeout: float = TIMEOUT) -> Attempt:
    """Connect to ``[vip]:port`` from a fresh port and read the greeting."""
    t0 = time.monotonic()
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(timeout)
    sport = None
    try:
        s.bind(("::", 0))
        sport = s.getsockname()[1]
        s.connect((vip, port))
        words = read_line(s)
        return Attempt(t0, time.monotonic(), sport, words[0], None)
    except OSError as exc:
        return Attempt(t0, time.monotonic(), sport, None, type(exc).__name__)
    finally:
        s.close()


@dataclass(slots=True)
class Flow:
    """A long-lived connection and what happened to it."""

    sock: socket.socket = field(repr=False)
    sport: int
    backend: str
    asked: int = 0
    max_rtt: float = 0.0
    err: str | None = None
    err_t: float | None = None
    wrong: int = 0

    @classmethod
    def open(cls, vip: str, port: int, *, timeout: float = TIMEOUT) -> Flow:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect((vip, port))
        return cls(s, s.getsockname()[1], read_line(s)[0])

    def ask(self) -> None:
        """One question: the answer must come from this flow's backend."""
        t0 = time.monotonic()
        try:
            self.sock.sendall(b"ping\n")
            got = read_line(self.sock)[0]
            self.asked += 1
            self.max_rtt = max(self.max_rtt, time.monotonic() - t0)
            if got != self.backend:
                self.wrong += 1
        except OSError as exc:
            self.err, self.err_t = type(exc).__name__, time.monotonic()
            self.max_rtt = max(self.max_rtt, time.monotonic() - t0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sport": self.sport,
            "backend": self.backend,
            "asked": self.asked,
            "max_rtt": self.max_rtt,
            "err": self.err,
            "err_t": self.err_t,
            "wrong": self.wrong,
        }


class Traffic:
    """``n`` long-lived flows asking every ``interval``, plus a new connection every ``interval``."""

    def __init__(self, vip: str, port: int, n: int, *, interval: float = INTERVAL) -> None:
        self.vip, self.port, self.interval = vip, port, interval
        self.flows = [Flow.open(vip, port) for _ in range(n)]
        self.news: list[Attempt] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._ask, args=(f,), daemon=True) for f in self.flows
        ]
        self._threads.append(threading.Thread(target=self._new_connections, daemon=True))
        for t in self._threads:
            t.start()

    def _ask(self, f: Flow) -> None:
        while not self._stop.is_set() and f.err is None:
            t0 = time.monotonic()
            f.ask()
            time.sleep(max(0.0, self.interval - (time.monotonic() - t0)))

    def _new_connections(self) -> None:
        while not self._stop.is_set():
            threading.Thread(
                target=lambda: self.news.append(attempt(self.vip, self.port)), daemon=True
            ).start()
            time.sleep(self.interval)

    def stop(self, *, grace: float = 0.5) -> dict[str, Any]:
        """Stop asking and opening; after ``grace`` seconds for the last new connections, the results."""
        self._stop.set()
        for t in self._threads:
            t.join(TIMEOUT + 1)
        time.sleep(grace)
        return {
            "flows": [f.as_dict() for f in self.flows],
            "new": [asdict(a) for a in sorted(self.news, key=lambda a: a.t0)],
        }

    def close(self) -> None:
        for f in self.flows:
            f.sock.close()


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    inp, out = stdin or sys.stdin, stdout or sys.stdout
    if len(args) != 3 or not args[1].isdigit() or not args[2].isdigit():
        sys.stderr.write("usage: python -m v6lb.lab.agents.traffic VIP PORT N\n")
        return 2
    vip, port, n = args[0], int(args[1]), int(args[2])
    if n == 0:
        out.write(json.dumps([asdict(attempt(vip, port)) for _ in range(SHORT_COUNT)]) + "\n")
        out.flush()
        return 0
    traffic = Traffic(vip, port, n)
    traffic.start()
    out.write(json.dumps([[f.sport, f.backend] for f in traffic.flows]) + "\n")
    out.flush()
    inp.readline()
    result = traffic.stop()
    out.write(json.dumps(result) + "\n")
    out.flush()
    traffic.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
