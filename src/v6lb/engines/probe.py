"""Health probes on non-blocking sockets, for :class:`v6lb.core.health.HealthSet`.

Two kinds, chosen per target by its :class:`~v6lb.model.config.HealthCheck`:

- ``tcp``: the probe succeeds when the TCP handshake completes (``SO_ERROR`` is 0
  once the socket is writable); the connection is then closed at once;
- ``http``: after the handshake the request (``method``, ``path``, ``Host``) is
  sent, and the answer is parsed with h11 (:class:`HttpAnswer`): the probe passes
  when the final status is one of ``expect``. Garbage, a closed connection or a
  status outside ``expect`` fails. Memory is bounded: the status line and headers
  may take at most :data:`HTTP_HEAD_MAX` bytes, and the body is never read.

A refused or unreachable connect fails at once; a silent one (or a slow answer)
fails at the monitor's timeout, which covers the whole exchange.

A target may name a data path (:class:`ProbeRoute`): the probe is sent to the VIP
with the socket mark of one backend, so the kernel plane's ``fwmark`` rule and
seg6 route (dsr-l2: a route via the backend's MAC) carry it to that backend
exactly as client traffic; or, on the python plane, with its flow pinned to the
backend in the plane's forwarder (``pin``), which its steering rule hands the
probe to (docs/dsr.md, "Health checks through the data path").

The prober owns no clock and no loop: the caller registers probes into a
:class:`selectors.BaseSelector` it already waits on (with ``data`` a
:class:`ProbeTag`), hands the ready keys back with :meth:`Prober.handle`,
and cancels probes whose deadline the health state machine has passed::

    tag = prober.start(key, probe_id, target)   # a result may come back at once
    ...
    for sk, _ in selector.select(timeout):
        if isinstance(sk.data, ProbeTag):
            done = prober.handle(sk)             # None while an HTTP probe goes on
            if done is not None:
                key, probe_id, ok = done
                health.probe_result(key, ok, time.monotonic(), probe_id)
"""

from __future__ import annotations

import errno
import selectors
import socket
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv6Address

import h11

from v6lb.core.health import HealthSet
from v6lb.model.config import HealthCheck, HealthType

__all__ = [
    "HTTP_HEAD_MAX",
    "HttpAnswer",
    "ProbeRoute",
    "ProbeTag",
    "ProbeTarget",
    "Prober",
    "TcpProber",
    "drive_health",
    "health_deadline",
    "http_request",
]

HTTP_HEAD_MAX = 16 * 1024
"""The most bytes of an HTTP answer a probe reads: the status line and headers (and 1xx)."""
_RECV = 4096


@dataclass(frozen=True, slots=True)
class ProbeTag:
    """The selector ``data`` of a probe socket: which backend and which probe."""

    key: Hashable
    probe_id: int


@dataclass(frozen=True, slots=True)
class ProbeRoute:
    """Probe through the data path: to ``address`` (the VIP) with socket mark ``mark``.

    ``mark`` 0: no mark. ``source``: the address the probe is sent from (the
    backend answers it directly, as it answers a client); None lets the kernel
    choose. ``pin(source, port)``: called with the probe's own address and port
    before its first packet reaches the data plane (before ``connect`` when
    ``source`` is given; else right after it, which is still before the plane
    reads the packet: the plane and the probes share the daemon's one thread).
    """

    address: IPv6Address
    mark: int
    source: IPv6Address | None = None
    what: str = "data path"
    pin: Callable[[IPv6Address, int], None] | None = field(default=None, compare=False)


@dataclass(slots=True)
class ProbeTarget:
    """Where and how to probe one backend."""

    address: IPv6Address
    port: int
    check: HealthCheck = field(default_factory=HealthCheck)
    route: ProbeRoute | None = None

    @property
    def dest(self) -> IPv6Address:
        return self.route.address if self.route is not None else self.address

    def describe(self) -> str:
        """The ``probe`` text of ``v6lb status``: ``http GET /healthz [addr]:port``."""
        kind = str(self.check.type)
        if self.check.type is HealthType.HTTP:
            kind += f" {self.check.method} {self.check.path or '/'}"
        text = f"{kind} [{self.dest}]:{self.port}"
        if self.route is not None:
            text += f" via {self.route.what} of {self.address}"
            if self.route.mark:
                text += f" (mark {self.route.mark:#x})"
        return text


def http_request(check: HealthCheck, address: IPv6Address, port: int) -> bytes:
    """The bytes of the probe's request (h11 writes them)."""
    host = check.host if check.host is not None else f"[{address}]:{port}"
    conn = h11.Connection(our_role=h11.CLIENT)
    headers = [("Host", host), ("User-Agent", "v6lb-health"), ("Connection", "close")]
    data = conn.send(h11.Request(method=check.method, target=check.path or "/", headers=headers))
    return (data or b"") + (conn.send(h11.EndOfMessage()) or b"")


class HttpAnswer:
    """The answer of one HTTP probe, parsed with h11 as it arrives, within a byte bound.

    :meth:`feed` returns None while more is needed, else the verdict: True when the
    final status is expected, False for another status, garbage, an early close,
    or more than ``limit`` bytes before the status line and headers ended.
    """

    __slots__ = ("_check", "_conn", "_read", "_limit", "status")

    def __init__(self, check: HealthCheck, method: str, limit: int = HTTP_HEAD_MAX) -> None:
        self._check = check
        self._conn = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=limit)
        # h11 must know what was asked (a HEAD answer has no body, for one)
        self._conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        self._conn.send(h11.EndOfMessage())
        self._read = 0
        self._limit = limit
        self.status: int | None = None

    def feed(self, data: bytes) -> bool | None:
        """More of the answer (b"" at the end of the stream): the verdict, or None."""
        self._read += len(data)
        try:
            self._conn.receive_data(data)
            while True:
                event = self._conn.next_event()
                if isinstance(event, h11.Response):
                    self.status = event.status_code
                    return self._check.passes(event.status_code)
                if event is h11.NEED_DATA:
                    if not data or self._read > self._limit:
                        return False
                    return None
                if not isinstance(event, h11.InformationalResponse):
                    return False  # ConnectionClosed, PAUSED: no final status
        except h11.RemoteProtocolError:
            return False


@dataclass(slots=True)
class _Running:
    sock: socket.socket
    tag: ProbeTag
    target: ProbeTarget
    out: bytes = b""
    answer: HttpAnswer | None = None


class Prober:
    """Non-blocking TCP and HTTP probes, one socket per running probe."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._sel = selector
        self._probes: dict[Hashable, _Running] = {}

    def __len__(self) -> int:
        return len(self._probes)

    def start(
        self,
        key: Hashable,
        probe_id: int,
        target: ProbeTarget | IPv6Address,
        port: int | None = None,
    ) -> bool | None:
        """Start a probe; True/False if it finished at once, None while it runs.

        ``target`` may also be a bare address with ``port``: a TCP connect.
        """
        if isinstance(target, IPv6Address):
            assert port is not None
            target = ProbeTarget(target, port)
        self.cancel(key)
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setblocking(False)
        route = target.route
        try:
            if route is not None:
                if route.mark:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, route.mark)
                if route.source is not None:
                    s.bind((str(route.source), 0))
                    if route.pin is not None:
                        route.pin(route.source, s.getsockname()[1])
            rc = s.connect_ex((str(target.dest), target.port))
            if route is not None and route.pin is not None and route.source is None:
                name = s.getsockname()
                route.pin(IPv6Address(name[0].split("%")[0]), name[1])
        except OSError:
            s.close()
            return False
        http = target.check.type is HealthType.HTTP
        if rc == 0 and not http:
            s.close()
            return True
        if rc not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
            s.close()
            return False
        tag = ProbeTag(key, probe_id)
        self._sel.register(s, selectors.EVENT_WRITE, tag)
        self._probes[key] = _Running(s, tag, target)
        return None

    def handle(self, ready: selectors.SelectorKey) -> tuple[Hashable, int, bool] | None:
        """A probe socket is ready: (key, probe id, ok) when the probe ended, else None."""
        tag = ready.data
        assert isinstance(tag, ProbeTag)
        run = self._probes.get(tag.key)
        if run is None or run.tag != tag:
            return None
        ok = self._step(run)
        if ok is None:
            return None
        self.cancel(tag.key)
        return tag.key, tag.probe_id, ok

    def _step(self, run: _Running) -> bool | None:
        s, check = run.sock, run.target.check
        try:
            if run.answer is None:  # connecting, then writing the request
                if not run.out:
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                        return False
                    if check.type is not HealthType.HTTP:
                        return True
                    run.out = http_request(check, run.target.dest, run.target.port)
                run.out = run.out[s.send(run.out) :]
                if run.out:
                    return None
                run.answer = HttpAnswer(check, check.method)
                self._sel.modify(s, selectors.EVENT_READ, run.tag)
                return None
            return run.answer.feed(s.recv(_RECV))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return False

    def cancel(self, key: Hashable) -> None:
        """Drop a running probe (its deadline passed, or it ended); no result will come."""
        run = self._probes.pop(key, None)
        if run is not None:
            self._sel.unregister(run.sock)
            run.sock.close()

    def running(self) -> list[Hashable]:
        return list(self._probes)

    def close(self) -> None:
        for key in list(self._probes):
            self.cancel(key)


TcpProber = Prober
"""The name this class had when it only connected."""


def drive_health(
    health: Mapping[str, HealthSet[int]],
    targets: Mapping[tuple[str, int], ProbeTarget],
    prober: Prober,
    now: float,
) -> set[str]:
    """One round of active health checking for every VIP; the VIPs whose health changed.

    Starts the probes that are due, feeds results that finished at once, runs
    the monitors' timers (a probe without a result by its timeout is a
    failure), and cancels sockets whose probe the monitor already gave up on.
    The daemon's loop calls this, then has the planes refill their tables for
    the VIPs returned.
    """
    changed: set[str] = set()
    for name, hs in health.items():
        if hs.handle_timer(now):
            changed.add(name)
        for i in hs.due(now):
            target = targets[(name, i)]
            pid = hs.start_probe(i, now)
            result = prober.start((name, i), pid, target)
            if result is not None and hs.probe_result(i, result, now, pid):
                changed.add(name)
    for key in prober.running():  # probes the monitors already timed out
        assert isinstance(key, tuple)
        owner = health.get(key[0])
        monitor = owner.monitor(key[1]) if owner is not None and key[1] in owner else None
        if monitor is None or not monitor.probe_in_flight:
            prober.cancel(key)
    return changed


def health_deadline(health: Mapping[str, HealthSet[int]], now: float) -> float:
    """When the next health timer fires (at the latest one second from ``now``)."""
    timers = [t for hs in health.values() if (t := hs.next_timer()) is not None]
    return min([now + 1.0, *timers])
