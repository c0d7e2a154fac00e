"""Write a :class:`~v6lb.model.config.Config` back out as YAML: ``dump(config) -> str``.

The contract is a round trip: ``parse_config(yaml.safe_load(dump(c)), c.source) == c``
for every valid ``c``, every section included (``vips:`` with all their options,
``npt:``, ``lb:``, ``topology:``, ``bgp:``). A value equal to the default the
parser would pick is left out, so a derived file stays short and reads like a
hand-written one; where the default depends on another value (a health
timeout on the interval, a tunnel source on ``lb.addresses``, a control socket
on the instance name, an LB node's ``serves`` on the VIPs) the comparison uses
the config being written, so the file still reads back into the same values.

The labs derive their per-node files this way: ``dataclasses.replace`` on the
typed config, then :func:`dump` (see ``derive_node_config`` in the lab plan).
"""

from __future__ import annotations

from typing import Any, Final

import yaml

from v6lb.model.bgp import BfdSettings, BgpSection, BgpSettings, Neighbour
from v6lb.model.config import (
    MAGLEV_TABLE_SIZE,
    TLS_ALPN,
    TLS_ALPN_L4,
    Backend,
    Config,
    DsrL2Options,
    HealthCheck,
    HealthType,
    LbSettings,
    NatOptions,
    Protocol,
    ProxyL4Options,
    ProxyL7Options,
    Scheduler,
    Timeouts,
    TlsOptions,
    TunnelOptions,
    Vip,
    default_control_socket,
)
from v6lb.model.conntrack_sync import DEFAULT_SYNC_PORT, ConntrackSync
from v6lb.model.sni import backend_ref
from v6lb.model.topology import NPT, Link, Node, NodeType, Route, Topology, default_route

__all__ = ["dump", "to_data"]

_LB: Final = LbSettings()
_HEALTH: Final = HealthCheck()
_BFD: Final = BfdSettings()
_ANY_PREFIX: Final = "::/0"

Data = dict[str, Any]


def dump(config: Config) -> str:
    """``config`` as the text of a config file (sections in the order of docs/config.md)."""
    return yaml.safe_dump(to_data(config), sort_keys=False, default_flow_style=False)


def to_data(config: Config) -> Data:
    """``config`` as YAML-ready data: dicts, lists, str, int, float and bool."""
    out: Data = {}
    if config.vips:
        out["vips"] = [_vip(v, config.lb) for v in config.vips]
    if config.npt:
        out["npt"] = [{"inside": str(p.inside), "outside": str(p.outside)} for p in config.npt]
    lb = _lb(config.lb)
    if lb:
        out["lb"] = lb
    if config.topology is not None:
        out["topology"] = _topology(config.topology, config)
    if config.bgp is not None:
        out["bgp"] = _bgp(config.bgp)
    return out


# --- lb: -------------------------------------------------------------------------


def _lb(lb: LbSettings) -> Data:
    out: Data = {}
    if lb.instance != _LB.instance:
        out["instance"] = lb.instance
    if lb.addresses:
        out["addresses"] = [str(a) for a in lb.addresses]
    if lb.interfaces:
        out["interfaces"] = list(lb.interfaces)
    if lb.control_socket != default_control_socket(lb.instance):
        out["control_socket"] = lb.control_socket
    if lb.control_group is not None:
        out["control_group"] = lb.control_group
    for key in (
        "flow_hash_seed",
        "conntrack_max",
        "flow_cache_size",
        "icmp_error_rate",
        "icmp_error_burst",
    ):
        if getattr(lb, key) != getattr(_LB, key):
            out[key] = getattr(lb, key)
    if lb.forward_allow:
        out["forward_allow"] = [
            {
                k: str(net)
                for k, net in (("from", a.source), ("to", a.destination))
                if str(net) != _ANY_PREFIX or a.source == a.destination
            }
            for a in lb.forward_allow
        ]
    if lb.conntrack_sync is not None:
        out["conntrack_sync"] = _sync(lb.conntrack_sync)
    if lb.peers is not None:
        out["peers"] = {
            "interface": lb.peers.interface,
            "addresses": [str(a) for a in lb.peers.addresses],
        }
    if lb.metrics is not None:
        out["metrics"] = str(lb.metrics)
    return out


def _sync(s: ConntrackSync) -> Data:
    out: Data = {"interface": s.interface, "address": str(s.address), "peer": str(s.peer)}
    if s.port != DEFAULT_SYNC_PORT:
        out["port"] = s.port
    if s.peer_snat:
        out["peer_snat"] = [str(a) for a in s.peer_snat]
    return out


# --- vips: -----------------------------------------------------------------------


def _vip(v: Vip, lb: LbSettings) -> Data:
    out: Data = {
        "name": v.name,
        "address": str(v.address),
        "ports": list(v.ports),
        "protocol": str(v.protocol),
        "mode": str(v.mode),
    }
    if v.scheduler is not (Scheduler.ROUND_ROBIN if v.mode.is_proxy else Scheduler.MAGLEV):
        out["scheduler"] = str(v.scheduler)
    if v.table_size is not None and v.table_size != MAGLEV_TABLE_SIZE:
        out["table_size"] = v.table_size
    out.update(_options(v, lb))
    health = _health(v)
    if health is not None:
        out["health"] = health
    out["backends"] = [_backend(b) for b in v.backends]
    return out


def _backend(b: Backend) -> Data:
    out: Data = {"address": str(b.address)}
    if b.port is not None:
        out["port"] = b.port
    if b.weight != 1:
        out["weight"] = b.weight
    if b.drain:
        out["drain"] = True
    if b.mac is not None:
        out["mac"] = b.mac
    if b.sid is not None and b.sid != b.address:
        out["sid"] = str(b.sid)
    return out


def _health(v: Vip) -> Data | None:
    h = v.health
    default = HealthCheck(type=HealthType.TCP if v.protocol is Protocol.TCP else HealthType.NONE)
    if h == default:
        return None
    if h.type is HealthType.NONE:
        return {"type": "none"}
    out: Data = {"type": str(h.type)}
    if h.interval != _HEALTH.interval:
        out["interval"] = h.interval
    if h.timeout != min(_HEALTH.timeout, h.interval / 2):
        out["timeout"] = h.timeout
    if h.rise != _HEALTH.rise:
        out["rise"] = h.rise
    if h.fall != _HEALTH.fall:
        out["fall"] = h.fall
    if h.path is not None and h.path != "/":
        out["path"] = h.path
    if h.port is not None:
        out["port"] = h.port
    if h.method != _HEALTH.method:
        out["method"] = h.method
    if h.host is not None:
        out["host"] = h.host
    if h.expect != _HEALTH.expect:
        out["expect"] = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in h.expect]
    return out


def _options(v: Vip, lb: LbSettings) -> Data:
    o = v.options
    out: Data = {}
    if isinstance(o, NatOptions):
        if o.snat is not None:
            out["snat"] = str(o.snat.network_address if o.snat.prefixlen == 128 else o.snat)
        if o.snat_ports != NatOptions().snat_ports:
            out["snat_ports"] = f"{o.snat_ports[0]}-{o.snat_ports[1]}"
    elif isinstance(o, DsrL2Options):
        pass
    elif isinstance(o, TunnelOptions):
        if not lb.addresses or o.tunnel_source != lb.addresses[0]:
            out["tunnel_source"] = str(o.tunnel_source)
        if o.mtu != TunnelOptions(o.tunnel_source).mtu:
            out["mtu"] = o.mtu
    elif isinstance(o, ProxyL4Options):
        d4 = ProxyL4Options()
        if o.tls is not None:
            out["tls"] = _tls(o.tls, TLS_ALPN_L4)
        if o.proxy_protocol is not d4.proxy_protocol:
            out["proxy_protocol"] = str(o.proxy_protocol)
        if o.sni_routes:
            pairs = [(b.address, b.port) for b in v.backends]
            out["sni_routes"] = [
                {"names": list(r.names), "backends": [backend_ref(pairs, i) for i in r.backends]}
                for r in o.sni_routes
            ]
            if o.unknown_sni != d4.unknown_sni:
                out["unknown_sni"] = o.unknown_sni
        if o.trusted_proxy_sources:
            out["trusted_proxy_sources"] = [str(n) for n in o.trusted_proxy_sources]
        out.update(_proxy_common(o.timeouts, d4.timeouts, o))
        if o.relay is not d4.relay:
            out["relay"] = str(o.relay)
    else:
        d7 = ProxyL7Options()
        if o.tls is not None:
            out["tls"] = _tls(o.tls, TLS_ALPN)
        if o.forwarded_headers is not d7.forwarded_headers:
            out["forwarded_headers"] = o.forwarded_headers
        if o.trusted_sources:
            out["trusted_sources"] = [str(n) for n in o.trusted_sources]
        if o.max_request_bytes is not None:
            out["max_request_bytes"] = o.max_request_bytes
        if o.max_header_bytes != d7.max_header_bytes:
            out["max_header_bytes"] = o.max_header_bytes
        if o.max_concurrent_streams != d7.max_concurrent_streams:
            out["max_concurrent_streams"] = o.max_concurrent_streams
        out.update(_proxy_common(o.timeouts, d7.timeouts, o))
    return out


def _tls(t: TlsOptions, alpn: tuple[str, ...]) -> Data:
    out: Data = {
        "certificates": [
            {"cert": c.cert, "key": c.key, **({"names": list(c.names)} if c.names else {})}
            for c in t.certificates
        ]
    }
    if t.min_version != "1.2":
        out["min_version"] = t.min_version
    if t.alpn != alpn:
        out["alpn"] = list(t.alpn)
    if t.client_ca is not None:
        out["client_ca"] = t.client_ca
    if t.unknown_sni != "default":
        out["unknown_sni"] = t.unknown_sni
    return out


def _proxy_common(t: Timeouts, default: Timeouts, o: ProxyL4Options | ProxyL7Options) -> Data:
    out: Data = {}
    if t != default:
        timeouts: Data = {}
        if t.connect != default.connect:
            timeouts["connect"] = t.connect
        if t.idle != default.idle:
            timeouts["idle"] = t.idle
        if t.total is not None:
            timeouts["total"] = t.total
        out["timeouts"] = timeouts
    if o.dual_stack is not None:
        out["dual_stack"] = str(o.dual_stack)
    if o.max_connections_per_source:
        out["max_connections_per_source"] = o.max_connections_per_source
    return out


# --- topology: ---------------------------------------------------------------------


def _topology(topo: Topology, config: Config) -> Data:
    known = tuple(v.name for v in config.vips) + ((NPT,) if config.npt else ())
    types = {n.name: n.type for n in topo.nodes}
    return {
        "nodes": {n.name: _node(n, known, types, topo.links) for n in topo.nodes},
        "links": [_link(lk) for lk in topo.links],
    }


def _node(
    n: Node, known: tuple[str, ...], types: dict[str, NodeType], links: tuple[Link, ...]
) -> Data:
    out: Data = {"type": str(n.type)}
    if n.role != str(n.type):  # every type's default role is its own name
        out["role"] = n.role
    if n.site is not None:
        out["site"] = n.site
    if n.type is NodeType.LB and n.serves != known:
        out["serves"] = list(n.serves)
    if n.inside:
        out["inside"] = list(n.inside)
    if n.on_node is not None:
        out["on_node"] = n.on_node
    if n.loopback:
        out["loopback"] = [str(a) for a in n.loopback]
    implied = default_route(n.name, types, links)
    if n.routes and not (implied is not None and n.routes == (implied,)):
        out["routes"] = [_route(r) for r in n.routes]
    if n.labels:
        out["labels"] = list(n.labels)
    return out


def _route(r: Route) -> Data:
    out: Data = {"prefix": "default" if str(r.prefix) == _ANY_PREFIX else str(r.prefix)}
    if r.via is not None:
        out["via"] = str(r.via)
    if r.link is not None:
        out["link"] = r.link
    if r.source is not None:
        out["from"] = str(r.source)
    return out


def _link(lk: Link) -> Data:
    out: Data = {"name": lk.name, "subnet": str(lk.subnet)}
    if lk.mtu != 1500:
        out["mtu"] = lk.mtu
    if lk.delay != 0.001:
        out["delay"] = lk.delay
    if lk.cost != 1:
        out["cost"] = lk.cost
    out["endpoints"] = {
        a.node: str(a.addresses[0]) if len(a.addresses) == 1 else [str(x) for x in a.addresses]
        for a in lk.endpoints
    }
    return out


# --- bgp: --------------------------------------------------------------------------


def _bgp(bgp: BgpSection) -> Data:
    out: Data = _speaker(bgp.speaker) if bgp.speaker is not None else {}
    if bgp.announcements or not out:
        out["announcements"] = [
            {"prefix": str(a.prefix), "site": a.site, "cost": a.cost} for a in bgp.announcements
        ]
    return out


def _speaker(s: BgpSettings) -> Data:
    out: Data = {"asn": s.asn}
    if s.router_id is not None:
        out["router_id"] = s.router_id
    if s.hold != 3:
        out["hold"] = s.hold
    if s.keepalive != max(1, s.hold // 3):
        out["keepalive"] = s.keepalive
    if s.bfd == BfdSettings(enabled=False):
        out["bfd"] = False
    elif s.bfd != _BFD:
        bfd: Data = {}
        if not s.bfd.enabled:
            bfd["enabled"] = False
        if s.bfd.interval != _BFD.interval:
            bfd["interval"] = s.bfd.interval
        if s.bfd.multiplier != _BFD.multiplier:
            bfd["multiplier"] = s.bfd.multiplier
        out["bfd"] = bfd
    if s.med is not None:
        out["med"] = s.med
    if s.neighbours:
        out["neighbours"] = [_neighbour(n, i) for i, n in enumerate(s.neighbours)]
    return out


def _neighbour(n: Neighbour, i: int) -> Data:
    out: Data = {}
    if n.name != f"peer{i}":
        out["name"] = n.name
    out["address"] = str(n.address)
    out["asn"] = n.asn
    if n.interface is not None:
        out["interface"] = n.interface
    if n.local_pref is not None:
        out["local_pref"] = n.local_pref
    return out
