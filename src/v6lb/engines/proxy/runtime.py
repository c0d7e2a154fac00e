"""Per-VIP runtime state shared by the listeners: pool, picker, counters, pooled connections."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from v6lb.core.backends import BackendPool
from v6lb.core.health import HealthSet
from v6lb.model.config import ProxyL4Options, ProxyL7Options, Vip, VipMode
from v6lb.model.pools import pool_for
from v6lb.model.sni import default_pool

from .policy import Picker

__all__ = [
    "Admission",
    "LATENCY_BOUNDS",
    "Latency",
    "Stats",
    "VipRuntime",
    "WriteBatch",
    "response_class",
]

# The request-duration histogram's bucket bounds, in seconds (Prometheus' "le").
LATENCY_BOUNDS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
RESPONSE_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")


def response_class(status: int) -> int:
    """The index in :data:`RESPONSE_CLASSES` of an HTTP status."""
    return status // 100 - 1 if 100 <= status < 600 else 5


class Latency:
    """A VIP's request durations: counts per bucket (not cumulative), their sum, their number."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS) + 1)  # the last one: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def as_dict(self) -> dict[str, Any]:
        """Cumulative buckets, as Prometheus has them: ``[[le, count], ..., ["+Inf", count]]``."""
        out: list[list[Any]] = []
        total = 0
        for bound, n in zip((*LATENCY_BOUNDS, "+Inf"), self.counts, strict=True):
            total += n
            out.append([bound, total])
        return {"buckets": out, "sum": round(self.sum, 6), "count": self.count}


# Chunks at least this long are written at once (bulk transfers gain nothing from waiting).
BATCH_BELOW: Final = 64 * 1024


class WriteBatch:
    """Relay writes held until every read of this event-loop iteration was handled.

    A relayed chunk is not written when it is read: ``write(t, data)`` queues it and the
    queue is written, in order, by one callback after the loop has dispatched every
    ready socket (HAProxy also receives first and sends after). Each write wakes the
    peer that reads it; writing as soon as a chunk came woke the peer in the middle of a
    batch of reads, and on a CPU it shares the peer preempted the proxy: about one
    involuntary context switch per request against HAProxy's half of one
    (docs/benchmarks.md, "proxy write batching").

    Order on a transport is kept by one rule: before any other operation on a transport
    that may have queued writes (a write not through the batch, ``write_eof``,
    ``close``), its owner calls :meth:`flush`, which writes the whole queue now. A
    transport closing by then (aborted) drops its queued chunks, as ``abort`` drops
    its buffer.
    """

    __slots__ = ("items", "soon")

    def __init__(self) -> None:
        self.items: list[tuple[Any, bytes]] = []
        self.soon: Any = None  # the running loop's call_soon (bind)

    def bind(self, call_soon: Any) -> None:
        """Use this event loop's ``call_soon`` (the proxy server's, at start)."""
        self.soon = call_soon

    def write(self, t: Any, data: bytes) -> None:
        items = self.items
        if len(data) >= BATCH_BELOW:  # bulk: written now (the queue first), as backpressure
            if items:  # must pause the reader before it reads on (uvloop reads on while a
                self.flush()  # read fills its 256 KiB buffer)
            t.write(data)
            return
        if not items:
            self.soon(self.flush)
        items.append((t, data))

    def flush(self) -> None:
        items = self.items
        if items:
            self.items = []
            for t, data in items:
                if not t.is_closing():
                    t.write(data)


class Admission:
    """Process-wide: how many client connections the descriptor budget allows, and how many
    are open, over every proxy VIP (see :mod:`v6lb.engines.limits`)."""

    __slots__ = ("cap", "active", "closing")

    def __init__(self, cap: int = 1 << 62) -> None:
        self.cap = cap
        self.active = 0
        self.closing = False  # a graceful stop: proxy-l7 connections close after a response


class Stats:
    """Counters of a VIP or of one backend: plain attributes on the hot path."""

    __slots__ = (
        "connections",
        "active",
        "requests",
        "bytes_in",
        "bytes_out",
        "errors",
        "interim",
        "responses",
    )

    def __init__(self) -> None:
        self.connections = 0
        self.active = 0
        self.requests = 0
        self.bytes_in = 0  # from clients (towards backends)
        self.bytes_out = 0  # towards clients
        self.errors: Counter[str] = Counter()
        # l7 1xx responses: relayed, consumed, dropped, continue_sent (the proxy's own 100)
        self.interim: Counter[str] = Counter()
        # l7 responses to clients by class (RESPONSE_CLASSES), the proxy's own included
        self.responses = [0, 0, 0, 0, 0, 0]

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "active": self.active,
            "requests": self.requests,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "errors": dict(self.errors),
            "interim": dict(self.interim),
            "responses": dict(zip(RESPONSE_CLASSES, self.responses, strict=True)),
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
    latency: Latency = field(default_factory=Latency)  # l7: request durations
    tls: Any = None  # proxy-l7 with tls: its TlsSetup (certificates reloaded on SIGHUP)
    # proxy-l4 TLS passthrough (sni_routes): a picker per route, and the default pool's
    # (None: an unknown SNI is refused); pickers share ``picker.active``
    routes: list[Picker] = field(default_factory=list)
    sni_default: Picker | None = None
    relay: Any = None  # proxy-l4: the server's KernelRelay when this VIP uses it
    batch: WriteBatch = field(default_factory=WriteBatch)  # the server's, shared by every VIP
    # A reload replaced (or removed) this VIP: its open connections still use it;
    # ``successor`` is the VIP's runtime now (None: the VIP was removed).
    retired: bool = False
    successor: VipRuntime | None = None

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
        picker = Picker(vip.scheduler, pool, vip.address)
        routes: list[Picker] = []
        sni_default: Picker | None = None
        opts = vip.options
        if isinstance(opts, ProxyL4Options) and opts.sni_routes:
            for r in opts.sni_routes:
                routes.append(Picker(vip.scheduler, pool, vip.address, r.backends, picker.active))
            if opts.unknown_sni == "default":
                rest = default_pool(opts.sni_routes, n)
                sni_default = Picker(vip.scheduler, pool, vip.address, rest, picker.active)
        return cls(
            vip=vip,
            pool=pool,
            picker=picker,
            routes=routes,
            sni_default=sni_default,
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
        if self.source_of:  # per_source may have changed at a reload: look whenever it is set
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
        # by backend Stats: an open connection from before a reload counts in its own
        # runtime's backend, which is this one's when the reload kept the backend
        live_be: dict[int, list[int]] = {}
        for c in self.live:  # open connections keep their byte counts until they close
            n = c.counts()
            out["bytes_in"] += n[0]
            out["bytes_out"] += n[1]
            if c.backend >= 0 and (n[2] or n[3]):
                key = id(c.rt.backend_stats[c.backend])
                got = live_be.setdefault(key, [0, 0])
                got[0] += n[2]
                got[1] += n[3]
        if self.is_l7:
            out["latency"] = self.latency.as_dict()
        else:  # responses are HTTP's
            del out["responses"]
        out["mode"] = str(self.vip.mode)
        out["scheduler"] = str(self.vip.scheduler)
        backends = {}
        for i, st in enumerate(self.backend_stats):
            d = st.as_dict()
            if not self.is_l7:
                del d["responses"]
            more = live_be.get(id(st))
            if more is not None:
                d["bytes_in"] += more[0]
                d["bytes_out"] += more[1]
            d["active"] = self.picker.active[i]
            d["state"] = "up" if self.pool.is_up(i) else "down"
            d["drain"] = self.pool.is_draining(i)
            d["enabled"] = self.pool.is_enabled(i)
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
