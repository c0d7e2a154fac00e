"""TCP-connect health probes on non-blocking sockets, for :class:`v6lb.core.health.HealthSet`.

The prober owns no clock and no loop: the caller registers probes into a
:class:`selectors.BaseSelector` it already waits on (with ``data`` a
:class:`ProbeTag`), hands the ready keys back with :meth:`TcpProber.handle`,
and cancels probes whose deadline the health state machine has passed::

    tag = prober.start(key, probe_id, address, port)   # a result may come back at once
    ...
    for sk, _ in selector.select(timeout):
        if isinstance(sk.data, ProbeTag):
            key, probe_id, ok = prober.handle(sk)
            health.probe_result(key, ok, time.monotonic(), probe_id)

A probe succeeds when the TCP handshake completes (``SO_ERROR`` is 0 once the
socket is writable); the connection is then closed at once. A refused or
unreachable connect fails at once; a silent one fails at the monitor's timeout.
"""

from __future__ import annotations

import errno
import selectors
import socket
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Protocol

from v6lb.core.health import HealthSet

__all__ = ["ProbeTag", "TcpProber"]


@dataclass(frozen=True, slots=True)
class ProbeTag:
    """The selector ``data`` of a probe socket: which backend and which probe."""

    key: Hashable
    probe_id: int


class TcpProber:
    """Non-blocking TCP connects, one socket per running probe."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._sel = selector
        self._socks: dict[Hashable, socket.socket] = {}

    def __len__(self) -> int:
        return len(self._socks)

    def start(self, key: Hashable, probe_id: int, address: IPv6Address, port: int) -> bool | None:
        """Start a connect; True/False if it finished at once, None while it runs."""
        self.cancel(key)
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            rc = s.connect_ex((str(address), port))
        except OSError:
            s.close()
            return False
        if rc == 0:
            s.close()
            return True
        if rc not in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
            s.close()
            return False
        self._sel.register(s, selectors.EVENT_WRITE, ProbeTag(key, probe_id))
        self._socks[key] = s
        return None

    def handle(self, ready: selectors.SelectorKey) -> tuple[Hashable, int, bool]:
        """The result of a probe whose socket became writable: (key, probe id, ok)."""
        tag = ready.data
        assert isinstance(tag, ProbeTag)
        s = self._socks.pop(tag.key)
        try:
            ok = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        finally:
            self._sel.unregister(s)
            s.close()
        return tag.key, tag.probe_id, ok

    def cancel(self, key: Hashable) -> None:
        """Drop a running probe (its deadline passed); no result will come."""
        s = self._socks.pop(key, None)
        if s is not None:
            self._sel.unregister(s)
            s.close()

    def running(self) -> list[Hashable]:
        return list(self._socks)

    def close(self) -> None:
        for key in list(self._socks):
            self.cancel(key)


class _ProbeTarget(Protocol):
    address: IPv6Address
    port: int


def drive_health(
    health: Mapping[str, HealthSet[int]],
    targets: Mapping[tuple[str, int], _ProbeTarget],
    prober: TcpProber,
    now: float,
) -> set[str]:
    """One round of active health checking for every VIP; the VIPs whose health changed.

    Starts the probes that are due, feeds results that finished at once, runs
    the monitors' timers (a probe without a result by its timeout is a
    failure), and cancels sockets whose probe the monitor already gave up on.
    Both data planes' `run` loops call this, then refill their tables for the
    VIPs returned.
    """
    changed: set[str] = set()
    for name, hs in health.items():
        if hs.handle_timer(now):
            changed.add(name)
        for i in hs.due(now):
            target = targets[(name, i)]
            pid = hs.start_probe(i, now)
            result = prober.start((name, i), pid, target.address, target.port)
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
