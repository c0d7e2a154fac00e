"""Per-VIP runtime state shared by the listeners: pool, picker, counters, pooled connections."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from v6lb.core.backends import BackendPool
from v6lb.core.health import HealthSet
from v6lb.model.config import ProxyL4Options, ProxyL7Options, Vip, VipMode
from v6lb.model.pools import pool_for

from .policy import Picker

__all__ = ["Admission", "Stats", "VipRuntime"]


class Admission:
    """Process-wide: how many client connections the descriptor budget allows, and how many
    are open, over every proxy VIP (see :mod:`v6lb.engines.limits`)."""

    __slots__ = ("cap", "active")

    def __init__(self, cap: int = 1 << 62) -> None:
        self.cap = cap
        self.active = 0


class Stats:
    """Counters of a VIP or of one backend: plain attributes on the hot path."""

    __slots__ = ("connections", "active", "requests", "bytes_in", "bytes_out", "errors", "interim")

    def __init__(self) -> None:
        self.connections = 0
        self.active = 0
        self.requests = 0
        self.bytes_in = 0  # from clients (towards backends)
        self.bytes_out = 0  # towards clients
        self.errors: Counter[str] = Counter()
        # l7 1xx responses: relayed, consumed, dropped, continue_sent (the proxy's own 100)
        self.interim: Counter[str] = Counter()

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "active": self.active,
            "requests": self.requests,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "errors": dict(self.errors),
            "interim": dict(self.interim),
        }


@dataclass(eq=False)
class VipRuntime:
    """Everything the protocols of one VIP need, built once by :class:`ProxyServer`."""

    vip: Vip
    pool: BackendPool
    picker: Picker
    health: HealthSet[int]
    max_connections: int
    header_timeout: float
    write_high: int
    stats: Stats = field(default_factory=Stats)
    backend_stats: list[Stats] = field(default_factory=list)
    idle: list[list[Any]] = field(default_factory=list)  # pooled L7 upstreams per backend
    hosts: list[str] = field(default_factory=list)  # backend address text per index
    ports: list[int | None] = field(default_factory=list)  # None: the listener's port
    weights: list[int] = field(default_factory=list)  # as configured or set at run time
    live: set[Any] = field(default_factory=set)  # open client protocols
    admission: Admission = field(default_factory=Admission)  # shared by every VIP
    per_source: int = 0  # max_connections_per_source; 0: no limit
    sources: dict[str, int] = field(default_factory=dict)  # open connections per peer address
    source_of: dict[Any, str] = field(default_factory=dict)  # client protocol -> its key

    @classmethod
    def build(
        cls,
        vip: Vip,
        health: HealthSet[int],
        *,
        seed: int,
        max_connections: int,
        header_timeout: float,
        write_high: int,
        admission: Admission | None = None,
    ) -> VipRuntime:
        pool = pool_for(vip, seed)
        n = len(pool)
        return cls(
            vip=vip,
            pool=pool,
            picker=Picker(vip.scheduler, pool, vip.address),
            health=health,
            max_connections=max_connections,
            header_timeout=header_timeout,
            write_high=write_high,
            backend_stats=[Stats() for _ in range(n)],
            idle=[[] for _ in range(n)],
            hosts=[str(b.address) for b in vip.backends],
            ports=[b.port for b in vip.backends],
            weights=[b.weight for b in vip.backends],
            admission=admission or Admission(),
            per_source=getattr(vip.options, "max_connections_per_source", 0),
        )

    def admit(self, conn: Any, transport: Any) -> str | None:
        """Take a slot for a new client connection; None, or the reason it is refused.

        Checked in order: the VIP's ``max_connections``, the process's descriptor
        budget (``over_fd_limit``), and ``max_connections_per_source`` by the
        connection's peer address. An admitted connection calls :meth:`release`
        when it closes.
        """
        if self.stats.active >= self.max_connections:
            return "over_max_connections"
        adm = self.admission
        if adm.active >= adm.cap:
            return "over_fd_limit"
        if self.per_source:
            peer = transport.get_extra_info("peername")
            key = str(peer[0]) if peer else ""
            n = self.sources.get(key, 0)
            if n >= self.per_source:
                return "over_max_connections_per_source"
            self.sources[key] = n + 1
            self.source_of[conn] = key
        adm.active += 1
        return None

    def release(self, conn: Any) -> None:
        """Give back the slots :meth:`admit` took for ``conn``."""
        self.admission.active -= 1
        if self.per_source:
            key = self.source_of.pop(conn, None)
            if key is not None:
                n = self.sources[key] - 1
                if n:
                    self.sources[key] = n
                else:
                    del self.sources[key]

    @property
    def l4(self) -> ProxyL4Options:
        assert isinstance(self.vip.options, ProxyL4Options)
        return self.vip.options

    @property
    def l7(self) -> ProxyL7Options:
        assert isinstance(self.vip.options, ProxyL7Options)
        return self.vip.options

    @property
    def is_l7(self) -> bool:
        return self.vip.mode is VipMode.PROXY_L7

    def error(self, reason: str, backend: int = -1) -> None:
        self.stats.errors[reason] += 1
        if backend >= 0:
            self.backend_stats[backend].errors[reason] += 1

    def add_counts(self, backend: int, counts: tuple[int, int, int, int]) -> None:
        """Fold a closing connection's byte counters (see ``counts()``) into the totals."""
        st = self.stats
        st.bytes_in += counts[0]
        st.bytes_out += counts[1]
        if backend >= 0:
            bs = self.backend_stats[backend]
            bs.bytes_in += counts[2]
            bs.bytes_out += counts[3]

    def sweep_period(self) -> float:
        """How often :meth:`sweep` runs: an eighth of the shortest timeout, 10 ms to 1 s.

        Per-chunk and per-request paths only move counters or set a state; the sweep
        turns those into timeouts, which therefore fire up to two periods late (a
        quarter of the timeout), never early.
        """
        t = getattr(self.vip.options, "timeouts", None)
        limits = [self.header_timeout] if self.is_l7 else []
        if t is not None:
            limits += [t.connect, t.idle] + ([t.total] if t.total else [])
        return min(1.0, max(0.01, min(limits, default=8.0) / 8))

    def sweep(self, now: float) -> None:
        """Enforce every open connection's timeouts (called every :meth:`sweep_period`)."""
        for c in list(self.live):
            c.sweep(now)

    def backend_port(self, index: int, listen_port: int) -> int:
        return self.ports[index] or listen_port

    def buffered(self) -> int:
        """Bytes the proxy holds for this VIP's connections (write buffers and early data)."""
        total = 0
        for c in self.live:
            total += c.buffered()
        return total

    def snapshot(self) -> dict[str, Any]:
        out = self.stats.as_dict()
        live_be: list[list[int]] = [[0, 0] for _ in self.backend_stats]
        for c in self.live:  # open connections keep their byte counts until they close
            n = c.counts()
            out["bytes_in"] += n[0]
            out["bytes_out"] += n[1]
            if c.backend >= 0:
                live_be[c.backend][0] += n[2]
                live_be[c.backend][1] += n[3]
        out["mode"] = str(self.vip.mode)
        out["scheduler"] = str(self.vip.scheduler)
        backends = {}
        for i, st in enumerate(self.backend_stats):
            d = st.as_dict()
            d["bytes_in"] += live_be[i][0]
            d["bytes_out"] += live_be[i][1]
            d["active"] = self.picker.active[i]
            d["state"] = "up" if self.pool.is_up(i) else "down"
            d["drain"] = self.pool.is_draining(i)
            d["pooled"] = len(self.idle[i])
            backends[f"[{self.hosts[i]}]:{self.ports[i] or self.vip.ports[0]}"] = d
        out["backends"] = backends
        return out


def client_of(peer: tuple[Any, ...]) -> tuple[IPv4Address | IPv6Address, int]:
    """The client address (IPv4-mapped shown as IPv4) and port from a peername."""
    from .policy import unmap

    host = str(peer[0]).split("%", 1)[0]
    addr: IPv4Address | IPv6Address = IPv6Address(host) if ":" in host else IPv4Address(host)
    return unmap(addr), int(peer[1])
