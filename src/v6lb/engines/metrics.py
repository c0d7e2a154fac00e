"""``/metrics`` for one instance (``lb.metrics``), in the Prometheus text format.

The metric families come from one status snapshot (:class:`~v6lb.model.status.InstanceStatus`,
the answer of ``v6lb status``): :func:`metric_families` turns it into families with the
same names and labels whichever plane filled it, and exports only what that status
holds (docs/operations.md, "Metrics", has the table per engine).

:class:`MetricsServer` binds its socket when it is made (so a port already in use
refuses the start before anything is installed) and serves ``/metrics`` on threads
of its own with prometheus_client's WSGI app: a scrape never runs on the daemon's
loop. A snapshot is at most ``max_age`` seconds old and built by one scrape at a
time; scrapes arriving meanwhile wait for it and share it, so a kernel plane's
``nft -j list`` (about 0.4 s with a big map) runs at most once per ``max_age``.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from v6lb.model.config import MetricsListen
from v6lb.model.status import InstanceStatus, ProxyBackendStatus

__all__ = ["MetricsServer", "StatusCollector", "metric_families"]

MAX_AGE: Final = 1.0  # seconds a snapshot serves scrapes
_ICMP_ACTIONS: Final = ("forwarded", "translated", "unmatched")
# a backend's connect failures, by engine: the builtin proxy's reason, HAProxy's `econ`
_CONNECT_FAILED: Final = ("connect_failed", "econ")


def _backend(address: str, port: int | None) -> str:
    return f"[{address}]:{port}" if port is not None else address


_F = TypeVar("_F", CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)


class _Families:
    """The families of one snapshot, created on first use, in a stable order."""

    def __init__(self) -> None:
        self.by_name: dict[str, Metric] = {}

    def _family(self, kind: type[_F], name: str, doc: str, labels: list[str]) -> _F:
        fam = self.by_name.get(name)
        if fam is None:
            fam = self.by_name[name] = kind(name, doc, labels=labels)
        assert isinstance(fam, kind)
        return fam

    def counter(self, name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
        return self._family(CounterMetricFamily, name, doc, labels)

    def histogram(self, name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
        return self._family(HistogramMetricFamily, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        return self._family(GaugeMetricFamily, name, doc, labels)


def metric_families(status: InstanceStatus) -> list[Metric]:
    """Every family the snapshot ``status`` supports (names: docs/operations.md)."""
    f = _Families()
    info = InfoMetricFamily("v6lb_instance", "The instance and its engines.")
    info.add_metric(
        [],
        {
            "lb_instance": str(status.instance or ""),
            "dataplane": str(status.dataplane or ""),
            "proxy": str(
                status.proxy_engine or (status.proxy.engine if status.proxy else "") or ""
            ),
        },
    )
    f.by_name["v6lb_instance"] = info
    if status.reloads is not None:
        f.counter("v6lb_reloads", "Successful reloads (SIGHUP).", []).add_metric([], status.reloads)
    if status.map_updates is not None:
        f.counter(
            "v6lb_map_updates", "Pool changes applied to the data plane after health changes.", []
        ).add_metric([], status.map_updates)
    _l3(f, status)
    _proxy(f, status)
    _bgp(f, status)
    return list(f.by_name.values())


def _l3(f: _Families, status: InstanceStatus) -> None:
    # only the figures a plane filled per VIP (``traffic``, ``new_flows``, ...); a VIP's
    # ``counter`` (what `v6lb status` shows) is never exported as such
    engine = status.extra.get("engine")
    vl = ["vip", "mode"]
    bl = ["vip", "mode", "backend"]
    for v in status.vips:
        lv = [v.name, v.mode]
        for direction, c in (v.traffic or {}).items():
            f.counter(
                "v6lb_vip_packets",
                "Packets of the VIP: in (clients to the VIP), out (replies to the clients).",
                [*vl, "direction"],
            ).add_metric([*lv, direction], c.packets)
            f.counter(
                "v6lb_vip_bytes", "Bytes of the VIP, by direction.", [*vl, "direction"]
            ).add_metric([*lv, direction], c.bytes)
        if v.new_flows is not None:
            f.counter(
                "v6lb_vip_new_flows",
                "New flows to the VIP (nat: conntrack entries made for it).",
                vl,
            ).add_metric(lv, v.new_flows)
        if v.active_flows is not None:
            f.gauge(
                "v6lb_vip_active_flows", "Live flows of the VIP (nat: conntrack entries).", vl
            ).add_metric(lv, v.active_flows)
        if v.icmp_errors is not None:
            fam = f.counter(
                "v6lb_vip_icmp_errors",
                "ICMPv6 errors about the VIP's flows: forwarded (dsr), translated (nat),"
                " unmatched (dropped).",
                [*vl, "action"],
            )
            for action in _ICMP_ACTIONS:
                fam.add_metric([*lv, action], getattr(v.icmp_errors, action))
        for b in v.backends:
            lb = [*lv, _backend(b.address, b.port)]
            f.gauge("v6lb_backend_up", "1 if the backend is up (takes new flows).", bl).add_metric(
                lb, 1 if b.health == "up" else 0
            )
            f.gauge("v6lb_backend_weight", "The backend's configured weight.", bl).add_metric(
                lb, b.weight
            )
            if b.transitions is not None:
                f.counter(
                    "v6lb_backend_health_transitions",
                    "Health changes (up to down or down to up) since the instance started.",
                    bl,
                ).add_metric(lb, b.transitions)
            if b.slots is not None:
                f.gauge(
                    "v6lb_backend_maglev_slots", "The backend's slots in the Maglev table.", bl
                ).add_metric(lb, b.slots)
            if b.new_flows is not None:
                f.counter(
                    "v6lb_backend_new_flows", "New flows sent to the backend.", bl
                ).add_metric(lb, b.new_flows)
            if b.active_flows is not None:
                f.gauge(
                    "v6lb_backend_active_flows", "Live flows to the backend (nat: conntrack).", bl
                ).add_metric(lb, b.active_flows)
            if b.packets is not None and b.bytes is not None:
                f.counter(
                    "v6lb_backend_packets", "Packets the data plane sent to the backend.", bl
                ).add_metric(lb, b.packets)
                f.counter(
                    "v6lb_backend_bytes", "Bytes of the packets sent to the backend.", bl
                ).add_metric(lb, b.bytes)
    for p in status.npt:
        if p.icmp_errors is None:
            continue
        fam = f.counter(
            "v6lb_npt_icmp_errors",
            "ICMPv6 errors through an npt pair: translated inward, unmatched (dropped).",
            ["inside", "outside", "action"],
        )
        for action in ("translated", "unmatched"):
            fam.add_metric([p.inside, p.outside, action], getattr(p.icmp_errors, action))
    drops: dict[str, int] = {}
    if status.forward is not None:
        for reason in ("forward_denied", "forward_unreachable"):
            if reason in status.forward:
                drops[reason] = status.forward[reason]
        if "forward_allowed" in status.forward:
            f.counter(
                "v6lb_forward_allowed_packets",
                "Packets routed through the LB by lb.forward_allow.",
                [],
            ).add_metric([], status.forward["forward_allowed"])
    ct = status.conntrack
    if ct is not None:
        if ct.conntrack_full is not None:
            drops["conntrack_full"] = ct.conntrack_full
        if ct.nat_unsynced is not None:
            drops["nat_unsynced"] = ct.nat_unsynced
        if ct.conntrack is not None:
            f.gauge("v6lb_conntrack_entries", "Live nat flows.", []).add_metric([], ct.conntrack)
        if ct.conntrack_max is not None:
            f.gauge("v6lb_conntrack_max", "lb.conntrack_max.", []).add_metric([], ct.conntrack_max)
    if isinstance(engine, dict):
        _python_engine(f, engine, drops)
    if drops:
        fam = f.counter("v6lb_drops", "Packets dropped by the data plane, by reason.", ["reason"])
        for reason, n in drops.items():
            fam.add_metric([reason], n)


def _python_engine(f: _Families, engine: dict[str, Any], drops: dict[str, int]) -> None:
    """The python plane's forwarders (the xdp plane's program): their packets, drops by
    reason, the DSR flow cache; passes to the stack by reason (xdp)."""
    for kind, info in engine.items():
        if not isinstance(info, dict):
            continue
        counters = info.get("counters")
        if isinstance(counters, dict):
            fam = f.counter(
                "v6lb_forwarder_packets",
                "Packets of the python plane's forwarder (every VIP of its kind).",
                ["forwarder", "verdict"],
            )
            for verdict in ("forwarded", "replies"):
                if isinstance(counters.get(verdict), int):
                    fam.add_metric([kind, verdict], counters[verdict])
            for key, n in counters.items():
                if key.startswith("drop.") and isinstance(n, int):
                    drops[key[5:]] = drops.get(key[5:], 0) + n
                elif key.startswith("pass.") and isinstance(n, int):  # the xdp plane
                    f.counter(
                        "v6lb_passed_packets",
                        "Packets the data plane left to the kernel stack, by reason.",
                        ["forwarder", "reason"],
                    ).add_metric([kind, key[5:]], n)
        if isinstance(info.get("flow_cache"), int):
            f.gauge(
                "v6lb_flow_cache_entries", "Flows in the DSR flow cache.", ["forwarder"]
            ).add_metric([kind], info["flow_cache"])


def _proxy(f: _Families, status: InstanceStatus) -> None:
    if status.proxy is None:
        return
    vl = ["vip", "mode"]
    bl = ["vip", "mode", "backend"]
    for v in status.proxy.vips:
        if not v.counted:
            continue
        lv = [v.name, v.mode]
        f.counter(
            "v6lb_proxy_connections", "Client connections accepted by the proxy.", vl
        ).add_metric(lv, v.connections or 0)
        if v.active is not None:
            f.gauge("v6lb_proxy_active_connections", "Open client connections.", vl).add_metric(
                lv, v.active
            )
        if v.requests is not None:
            f.counter("v6lb_proxy_requests", "HTTP requests (proxy-l7).", vl).add_metric(
                lv, v.requests
            )
        fam = f.counter("v6lb_proxy_bytes", "Bytes through the proxy.", [*vl, "direction"])
        if v.bytes_in is not None:
            fam.add_metric([*lv, "in"], v.bytes_in)
        if v.bytes_out is not None:
            fam.add_metric([*lv, "out"], v.bytes_out)
        errs = f.counter(
            "v6lb_proxy_errors", "Refusals and errors by reason (engine's names).", [*vl, "reason"]
        )
        for reason, n in v.errors.items():
            errs.add_metric([*lv, reason], n)
        if v.responses:
            fam = f.counter(
                "v6lb_proxy_responses",
                "HTTP responses sent to clients by status class, the proxy's own (502...) too.",
                [*vl, "class"],
            )
            for cls, n in v.responses.items():
                fam.add_metric([*lv, cls], n)
        if v.interim:
            fam = f.counter(
                "v6lb_proxy_interim_responses",
                "proxy-l7 1xx responses by fate: relayed, consumed, dropped, continue_sent,"
                " upgraded (a 101 that made the connection a byte relay: WebSocket).",
                [*vl, "kind"],
            )
            for kind, n in v.interim.items():
                fam.add_metric([*lv, kind], n)
        if v.latency is not None and v.latency.buckets:
            hist = f.histogram(
                "v6lb_proxy_request_duration_seconds",
                "From a request's first byte received to its response's last byte sent.",
                vl,
            )
            hist.add_metric(
                lv,
                [(_le(le), n) for le, n in v.latency.buckets],
                sum_value=v.latency.sum,
            )
        for b in v.backends:
            _proxy_backend(f, lv, b, bl)


def _proxy_backend(f: _Families, lv: list[str], b: ProxyBackendStatus, bl: list[str]) -> None:
    lb = [*lv, _backend(b.address, b.port)]
    if b.health is not None:
        f.gauge("v6lb_backend_up", "1 if the backend is up (takes new flows).", bl).add_metric(
            lb, 1 if str(b.health).lower() == "up" else 0
        )
    f.gauge("v6lb_backend_weight", "The backend's configured weight.", bl).add_metric(lb, b.weight)
    if not b.counted:
        return
    f.counter(
        "v6lb_proxy_backend_connections", "Connections the proxy opened to the backend.", bl
    ).add_metric(lb, b.connections or 0)
    if b.active is not None:
        f.gauge(
            "v6lb_proxy_backend_active_connections", "Open connections to the backend.", bl
        ).add_metric(lb, b.active)
    if b.requests is not None:
        f.counter(
            "v6lb_proxy_backend_requests", "HTTP requests sent to the backend.", bl
        ).add_metric(lb, b.requests)
    f.counter("v6lb_backend_connect_failures", "Failed connects to the backend.", bl).add_metric(
        lb, sum(b.errors.get(k, 0) for k in _CONNECT_FAILED)
    )
    if b.responses:
        fam = f.counter(
            "v6lb_proxy_backend_responses",
            "HTTP responses from the backend relayed to clients, by status class.",
            [*bl, "class"],
        )
        for cls, n in b.responses.items():
            fam.add_metric([*lb, cls], n)


def _le(bound: Any) -> str:
    """A bucket bound as Prometheus writes it (``0.005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if bound == "+Inf" else repr(float(bound))


def _bgp(f: _Families, status: InstanceStatus) -> None:
    bgp = status.bgp
    if bgp is None:
        return
    f.gauge("v6lb_bgp_speaker_up", "1 if BIRD runs.", []).add_metric(
        [], 1 if bgp.bird_alive is True else 0
    )
    fam = f.gauge("v6lb_bgp_announced", "1 if the prefix is announced, 0 if withdrawn.", ["prefix"])
    for p in bgp.announced:
        fam.add_metric([p], 1)
    for p in bgp.withdrawn:
        fam.add_metric([p], 0)
    sessions = f.gauge(
        "v6lb_bgp_session_up", "1 if BIRD reports the BGP or BFD session up.", ["session", "proto"]
    )
    for name, s in bgp.sessions.items():
        if name != "error":
            sessions.add_metric([name, str(s.proto)], 1 if s.state == "up" else 0)


class StatusCollector(Collector):
    """A prometheus_client collector: one status snapshot per scrape, shared and cached."""

    def __init__(self, snapshot: Callable[[], InstanceStatus], *, max_age: float = MAX_AGE):
        self._snapshot = snapshot
        self.max_age = max_age
        self._lock = threading.Lock()
        self._at = -1e9
        self._families: list[Metric] = []
        self.last_seconds = 0.0  # the last snapshot's cost

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # one snapshot at a time; the others reuse it
            now = time.monotonic()
            if now - self._at >= self.max_age:
                families = metric_families(self._snapshot())
                done = time.monotonic()
                self.last_seconds = done - now
                cost = GaugeMetricFamily(
                    "v6lb_metrics_snapshot_seconds", "Time taken by the last status snapshot."
                )
                cost.add_metric([], self.last_seconds)
                self._families = [*families, cost]
                self._at = done
            families = self._families
        yield from families

    def describe(self) -> Iterable[Metric]:
        return []  # families vary with the config: not described ahead


class _Handler(WSGIRequestHandler):
    timeout = 10  # a silent client holds its thread at most this long

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # scrapes are not logged


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True  # SO_REUSEADDR: a TIME_WAIT left by the last run is no conflict

    def server_bind(self) -> None:
        # HTTPServer's own reverse-resolves the address (getfqdn), which can hang for
        # seconds in a namespace without DNS
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class MetricsServer:
    """``/metrics`` on ``listen``: bound when made (``OSError`` if it cannot be), served by :meth:`start`."""

    def __init__(
        self,
        listen: MetricsListen,
        snapshot: Callable[[], InstanceStatus],
        *,
        max_age: float = MAX_AGE,
    ) -> None:
        self.listen = listen
        self.collector = StatusCollector(snapshot, max_age=max_age)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, fds, memory
        self._server = _Server((str(listen.address), listen.port), _Handler)
        app = make_wsgi_app(self.registry)

        def guarded(environ: Any, start_response: Any) -> Iterable[bytes]:
            try:
                return app(environ, start_response)  # type: ignore[no-any-return]
            except Exception as exc:  # no snapshot (the loop did not answer): a 500, no traceback
                start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
                return [f"v6lb: no status snapshot: {type(exc).__name__}: {exc}\n".encode()]

        self._server.set_app(guarded)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="v6lb-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()
