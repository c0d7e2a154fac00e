"""The one config file: ``vips:``, ``npt:``, ``lb:``, ``topology:`` and ``bgp:``.

``parse_config(data)`` turns YAML-decoded data into a frozen :class:`Config`, or
raises the first :class:`ConfigError` it finds; ``load_config(path)`` reads the
file first. Parsing is a pure function of its input: it changes nothing, so a
file that fails validation changes nothing anywhere. docs/config.md is the
reference of every key, its default and its range.

Every section is parsed here, once: ``topology:`` by
:func:`v6lb.model.topology.parse_topology` into :attr:`Config.topology`, ``bgp:``
by :func:`v6lb.model.bgp.parse_bgp` into :attr:`Config.bgp`.
:func:`v6lb.model.config_dump.dump` writes a :class:`Config` back out as YAML
that this module reads back into an equal one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path
from typing import Final

from v6lb.core.maglev import DEFAULT_TABLE_SIZE
from v6lb.model.bgp import BgpSection, BgpSettings, parse_bgp
from v6lb.model.config_read import read_yaml
from v6lb.model.conntrack_sync import ConntrackSync, check_sync, parse_conntrack_sync
from v6lb.model.modes import ModeFacts, facts
from v6lb.model.peers import Peers, check_peers, parse_peers
from v6lb.model.schema import (
    MISSING,
    ConfigError,
    Fields,
    Where,
    as_choice,
    as_int,
    as_ipv4_address,
    as_ipv6_address,
    as_ipv6_prefix,
    as_list,
    as_str,
    quote,
    require_unicast,
    unicast_list,
)
from v6lb.model.sni import SniRoute, parse_sni_routes
from v6lb.model.topology import Topology, parse_topology, require_topology
from v6lb.wire.constants import NH_TCP, NH_UDP

__all__ = [
    "Backend",
    "Config",
    "ConfigError",
    "DsrL2Options",
    "ForwardAllow",
    "DEFAULT_EXPECT",
    "HTTP_CHECK_METHODS",
    "HealthCheck",
    "HealthType",
    "LbSettings",
    "MetricsListen",
    "ModeOptions",
    "NatOptions",
    "NptPair",
    "Protocol",
    "ProxyL4Options",
    "Relay",
    "ProxyL7Options",
    "TLS_ALPN",
    "TLS_ALPN_L4",
    "TlsCertificate",
    "TlsOptions",
    "ProxyProtocol",
    "Scheduler",
    "Timeouts",
    "TunnelOptions",
    "Vip",
    "VipMode",
    "default_control_socket",
    "load_config",
    "load_topology",
    "parse_config",
]


class VipMode(StrEnum):
    """How a VIP forwards: the VIP modes of the mode table (:mod:`v6lb.model.modes`).

    ``npt`` and ``anycast`` are not VIP modes (see the module doc). Every fact
    about a mode is read from the table: ``vip.mode.facts.tunnels`` and so on.
    """

    PROXY_L4 = "proxy-l4"
    PROXY_L7 = "proxy-l7"
    NAT = "nat"
    DSR_L2 = "dsr-l2"
    DSR_IP6IP6 = "dsr-ip6ip6"
    DSR_SRV6 = "dsr-srv6"

    @property
    def facts(self) -> ModeFacts:
        return facts(self)

    @property
    def is_proxy(self) -> bool:
        return facts(self).is_proxy

    @property
    def is_dsr(self) -> bool:
        return facts(self).is_dsr

    @property
    def tunnels(self) -> bool:
        return facts(self).tunnels

    @property
    def routed(self) -> bool:
        """Routed through the LB: needs IPv6 forwarding there."""
        return facts(self).routed


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"

    @property
    def next_header(self) -> int:
        """The IPv6 next-header number (6 or 17)."""
        return NH_TCP if self is Protocol.TCP else NH_UDP


class Scheduler(StrEnum):
    MAGLEV = "maglev"
    ROUND_ROBIN = "round-robin"
    LEAST_CONNECTIONS = "least-connections"


class HealthType(StrEnum):
    TCP = "tcp"
    HTTP = "http"
    NONE = "none"


class ProxyProtocol(StrEnum):
    NONE = "none"
    V2 = "v2"


class Relay(StrEnum):
    """proxy-l4 with the builtin engine: who moves the bytes once a connection relays."""

    USER = "user"  # the asyncio relay (the default: faster here, docs/proxy.md says why)
    KERNEL = "kernel"  # a BPF sockmap splices the two sockets; user space where it cannot


# --- the model -----------------------------------------------------------------

WEIGHT_MAX: Final = 1000
MAGLEV_TABLE_SIZE: Final = DEFAULT_TABLE_SIZE  # core/maglev.py declares it, once
MAGLEV_TABLE_MAX: Final = 16_777_213  # the largest prime below 2**24
MIN_IPV6_MTU: Final = 1280  # RFC 8200 §5
DEFAULT_INSTANCE: Final = "lb0"
_DEFAULT_MTU: Final = 1500


def default_control_socket(instance: str) -> str:
    """``lb.control_socket`` when the file sets none: ``/run/v6lb/INSTANCE.sock``."""
    return f"/run/v6lb/{instance}.sock"


@dataclass(frozen=True, slots=True)
class Backend:
    """A real server behind a VIP.

    ``port`` None means "the port the client connected to" (always so for dsr-*,
    which rewrites nothing). ``sid`` is set for dsr-srv6 only (default: the
    address); ``mac`` only for dsr-l2 (None: resolved by neighbour discovery).
    """

    address: IPv6Address
    port: int | None = None
    weight: int = 1
    drain: bool = False
    mac: str | None = None
    sid: IPv6Address | None = None


HTTP_CHECK_METHODS: Final = ("GET", "HEAD")
DEFAULT_EXPECT: Final[tuple[tuple[int, int], ...]] = ((200, 399),)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Probe settings; ``port`` None means the backend's port, else the VIP's first port.

    ``type: http`` only: ``method``, ``path``, ``host`` (the Host header; None: the
    probed address and port) and ``expect``, the statuses that pass, as inclusive
    ranges (``200-399`` by default).
    """

    type: HealthType = HealthType.TCP
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    path: str | None = None
    port: int | None = None
    method: str = "GET"
    host: str | None = None
    expect: tuple[tuple[int, int], ...] = DEFAULT_EXPECT

    def passes(self, status: int) -> bool:
        """Is ``status`` one of the expected HTTP statuses?"""
        return any(lo <= status <= hi for lo, hi in self.expect)

    def expect_text(self) -> str:
        """``expect`` as the file writes it: ``200-399``, ``200, 204``."""
        return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.expect)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Proxy timeouts in seconds; ``total`` None means no limit on a connection's life."""

    connect: float
    idle: float
    total: float | None = None


@dataclass(frozen=True, slots=True)
class NatOptions:
    """``snat`` None: only the destination is rewritten, so backends must route back via the LB."""

    snat: IPv6Network | None = None
    snat_ports: tuple[int, int] = (1024, 65535)


@dataclass(frozen=True, slots=True)
class DsrL2Options:
    """dsr-l2 has no options: the backends' MACs are per backend."""


@dataclass(frozen=True, slots=True)
class TunnelOptions:
    """dsr-ip6ip6 and dsr-srv6: the outer source address and the path MTU to the backends."""

    tunnel_source: IPv6Address
    mtu: int = _DEFAULT_MTU


TLS_VERSIONS: Final = ("1.2", "1.3")
TLS_ALPN: Final = ("h2", "http/1.1")  # proxy-l7's default ALPN: HTTP/2 first
TLS_ALPN_L4: Final = ("http/1.1",)  # proxy-l4's (the plain stream goes to HTTP/1.1 backends)
TLS_UNKNOWN_SNI: Final = ("default", "refuse")


@dataclass(frozen=True, slots=True)
class TlsCertificate:
    """One certificate chain and its key (paths resolved against the config file's
    directory), served to clients whose SNI is one of ``names``."""

    cert: str
    key: str
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """``tls:`` of a proxy VIP: TLS terminated by the proxy. The first certificate is
    the default one (no SNI, or an SNI no certificate names, with ``unknown_sni: default``)."""

    certificates: tuple[TlsCertificate, ...]
    min_version: str = "1.2"
    alpn: tuple[str, ...] = TLS_ALPN_L4  # a proxy-l7 VIP's config has TLS_ALPN by default
    client_ca: str | None = None
    unknown_sni: str = "default"


@dataclass(frozen=True, slots=True)
class ProxyL4Options:
    proxy_protocol: ProxyProtocol = ProxyProtocol.NONE
    tls: TlsOptions | None = None  # TLS terminated, the plain stream relayed
    # TLS passthrough: the backends by the ClientHello's SNI (model/sni.py)
    sni_routes: tuple[SniRoute, ...] = ()
    unknown_sni: str = "default"  # with sni_routes: "default" (the pool) or "refuse"
    trusted_proxy_sources: tuple[IPv6Network, ...] = ()
    timeouts: Timeouts = field(default_factory=lambda: Timeouts(connect=5.0, idle=300.0))
    dual_stack: IPv4Address | None = None
    max_connections_per_source: int = 0  # open connections per client address; 0: no limit
    relay: Relay = Relay.USER  # the builtin engine's byte relay (docs/proxy.md)


@dataclass(frozen=True, slots=True)
class ProxyL7Options:
    tls: TlsOptions | None = None
    forwarded_headers: bool = True
    trusted_sources: tuple[IPv6Network, ...] = ()
    max_request_bytes: int | None = None  # request body limit (413); None: no limit
    max_header_bytes: int = 64 * 1024
    max_concurrent_streams: int = 100  # HTTP/2: streams open at once on one connection
    timeouts: Timeouts = field(default_factory=lambda: Timeouts(connect=5.0, idle=60.0))
    dual_stack: IPv4Address | None = None
    max_connections_per_source: int = 0  # open connections per client address; 0: no limit


ModeOptions = NatOptions | DsrL2Options | TunnelOptions | ProxyL4Options | ProxyL7Options


@dataclass(frozen=True, slots=True)
class Vip:
    """A load-balanced service. ``table_size`` is set when the scheduler is maglev."""

    name: str
    address: IPv6Address
    ports: tuple[int, ...]
    protocol: Protocol
    mode: VipMode
    scheduler: Scheduler
    backends: tuple[Backend, ...]
    health: HealthCheck
    options: ModeOptions
    table_size: int | None = None


@dataclass(frozen=True, slots=True)
class NptPair:
    """An NPTv6 mapping (RFC 6296): ``inside`` is translated to ``outside`` and back."""

    inside: IPv6Network
    outside: IPv6Network


@dataclass(frozen=True, slots=True)
class ForwardAllow:
    """``lb.forward_allow``: traffic the LB may route besides its own (``::/0`` = any)."""

    source: IPv6Network
    destination: IPv6Network


CONNTRACK_MIN: Final = 16
"""Smallest ``lb.conntrack_max``: fewer flows than one browser opens is a typo, not a policy."""


@dataclass(frozen=True, slots=True)
class MetricsListen:
    """``lb.metrics``: where the instance serves ``/metrics`` (docs/operations.md)."""

    address: IPv6Address
    port: int

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}"


@dataclass(frozen=True, slots=True)
class LbSettings:
    """The LB's own identity; the defaults apply when ``lb:`` is absent."""

    instance: str = DEFAULT_INSTANCE
    addresses: tuple[IPv6Address, ...] = ()
    interfaces: tuple[str, ...] = ()
    control_socket: str = default_control_socket(DEFAULT_INSTANCE)
    control_group: str | None = None  # the socket is 0660 for this group (status only)
    flow_hash_seed: int = 0
    conntrack_max: int = 262_144
    flow_cache_size: int = 65_536
    icmp_error_rate: int = 100
    icmp_error_burst: int = 20
    forward_allow: tuple[ForwardAllow, ...] = ()
    conntrack_sync: ConntrackSync | None = None  # docs/anycast.md
    peers: Peers | None = None  # the other instances, for the proxies' second chance
    metrics: MetricsListen | None = None  # None: no /metrics


@dataclass(frozen=True, slots=True)
class Config:
    """A validated config file; ``topology`` and ``bgp`` are None when the file has no such section.

    ``source`` is the file's name (errors and :attr:`Topology.source` carry it).
    """

    source: str
    vips: tuple[Vip, ...] = ()
    npt: tuple[NptPair, ...] = ()
    lb: LbSettings = field(default_factory=LbSettings)
    topology: Topology | None = None
    bgp: BgpSection | None = None

    def vip(self, name: str) -> Vip:
        for vip in self.vips:
            if vip.name == name:
                return vip
        raise KeyError(name)

    @property
    def bgp_speaker(self) -> BgpSettings | None:
        """The ``bgp:`` speaker (asn, neighbours, ...); None without ``bgp:`` or its ``asn``."""
        return self.bgp.speaker if self.bgp is not None else None


# --- reading the file ------------------------------------------------------------


def load_config(path: str | Path, *, max_bytes: int | None = None) -> Config:
    """Read and validate a config file; raise :class:`ConfigError` on any problem.

    The file is read within the limits of :mod:`v6lb.model.config_read`: at most
    ``max_bytes`` bytes (default: ``V6LB_MAX_CONFIG_BYTES``, else 16 MiB), nesting
    at most 32 deep, bounded numbers and alias expansion.
    """
    return parse_config(read_yaml(path, max_bytes=max_bytes), str(path))


def load_topology(path: str | Path) -> tuple[Config, Topology]:
    """Read a config file that must have a ``topology:`` (the simulator's, the lab's)."""
    config = load_config(path)
    return config, require_topology(config)


# --- the top level ---------------------------------------------------------------

_SECTIONS: Final = ("vips", "npt", "lb", "topology", "bgp")


def parse_config(data: object, file: str = "<config>") -> Config:
    """Validate YAML-decoded ``data``; raise the first :class:`ConfigError` found."""
    top = Where(file)
    if data is None:
        raise top.error("the file is empty", f"add at least one section: {', '.join(_SECTIONS)}")
    fields = Fields(data, top, "the file")
    fields.reject_unknown(_SECTIONS, kind="section")
    for name in fields:
        fields.get(name)  # an empty section is an error, whichever it is

    lb = _parse_lb(fields.get("lb"), fields.at("lb")) if fields.has("lb") else LbSettings()
    vips: tuple[Vip, ...] = ()
    if fields.has("vips"):
        where = fields.at("vips")
        items = as_list(fields.get("vips"), where, example="`- name: web`")
        vips = tuple(_parse_vip(item, where.index(i), lb) for i, item in enumerate(items))
        _check_vips_together(vips, where)
    npt: tuple[NptPair, ...] = ()
    if fields.has("npt"):
        where = fields.at("npt")
        items = as_list(fields.get("npt"), where, example="`- {inside: fd00:1::/48, outside: ...}`")
        npt = tuple(_parse_npt_pair(item, where.index(i)) for i, item in enumerate(items))
        _check_npt_together(npt, where)
    _check_vips_outside_npt(vips, npt, top)
    raw_bgp = _section(fields, "bgp")
    check_sync(
        lb.conntrack_sync,
        [o.snat for v in vips if isinstance(o := v.options, NatOptions) and o.snat is not None],
        any(v.mode is VipMode.NAT for v in vips),
        raw_bgp,
        top.key("lb").key("conntrack_sync"),
    )
    check_peers(
        lb.peers,
        sum(
            (v.mode.is_proxy or v.mode is VipMode.NAT) and v.protocol is Protocol.TCP for v in vips
        ),
        top.key("lb").key("peers"),
    )
    raw_topology = _section(fields, "topology")
    bgp: BgpSection | None = None
    if raw_bgp is not None:
        bgp = parse_bgp(raw_bgp, fields.at("bgp"), [(v.name, v.address) for v in vips])
    topology: Topology | None = None
    if raw_topology is not None:
        topology = parse_topology(
            raw_topology,
            top,
            vips=vips,
            npt=bool(npt),
            announcements=bgp.announcements if bgp is not None else (),
        )
    return Config(source=file, vips=vips, npt=npt, lb=lb, topology=topology, bgp=bgp)


def _section(fields: Fields, name: str) -> dict[str, object] | None:
    """Section ``name`` as a mapping (an error if it is something else); None if absent."""
    if not fields.has(name):
        return None
    return Fields(fields.get(name), fields.at(name), f"`{name}:`").as_dict()


# --- lb: -------------------------------------------------------------------------

_LB_KEYS: Final = (
    "instance",
    "addresses",
    "interfaces",
    "control_socket",
    "control_group",
    "flow_hash_seed",
    "conntrack_max",
    "flow_cache_size",
    "icmp_error_rate",
    "icmp_error_burst",
    "forward_allow",
    "conntrack_sync",
    "peers",
    "metrics",
)
# The instance name goes into tags such as the interface prefix `v6lb-NAME`, which
# must fit in 15 bytes (IFNAMSIZ - 1).
_INSTANCE_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,9}")
_IFNAME_RE: Final = re.compile(r"[^\s/:%]{1,15}")
_GROUP_RE: Final = re.compile(r"[a-z_][a-z0-9_-]{0,31}\$?|[0-9]{1,10}")
_SUN_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 for the NUL


_LB_DEFAULTS: Final = LbSettings()
_METRICS_RE: Final = re.compile(r"\[([^\[\]]*)\]:([0-9]{1,5})")
_METRICS_EXAMPLE: Final = 'metrics: "[2001:db8::2]:9105"'


def _parse_metrics(value: object, where: Where) -> MetricsListen:
    """``"[ADDRESS]:PORT"``: an IPv6 literal in brackets (``[::]`` for every address)."""
    text = as_str(value, where, example=_METRICS_EXAMPLE)
    m = _METRICS_RE.fullmatch(text.strip())
    if m is None:
        raise where.error(
            f"{quote(text)} is not an address and port such as [2001:db8::2]:9105",
            "write an IPv6 address in brackets, a colon and a port from 1 to 65535, in quotes: "
            f"{_METRICS_EXAMPLE} ([::] listens on every address)",
        )
    address = as_ipv6_address(m.group(1), where)
    if address.is_multicast or address.is_link_local:
        raise where.error(
            f"{address} is a {'multicast' if address.is_multicast else 'link-local'} address,"
            " which cannot be listened on",
            "use one of the host's global or unique-local addresses, ::1, or :: for all of them",
        )
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        raise where.error(f"port {port} is out of range", "use a port from 1 to 65535")
    return MetricsListen(address, port)


def control_socket_problem(path: str, instance: str) -> tuple[str, str] | None:
    """Why ``path`` cannot be an instance's control socket, as (message, fix); None if it can.

    Used for ``lb.control_socket`` and for ``v6lb run --control-socket``: the instance
    creates, chmods and unlinks this path as root.
    """
    if not path.startswith("/") or len(path.encode()) > _SUN_PATH_MAX:
        return (
            f"{quote(path)} is not usable as a Unix socket path",
            f"use an absolute path of at most {_SUN_PATH_MAX} bytes, such as /run/v6lb/{instance}.sock",
        )
    if ".." in path.split("/"):
        return (
            f"{quote(path)} has a '..' component, so it names a place outside the"
            " directory it seems to be in",
            f"write the path without '..', such as /run/v6lb/{instance}.sock",
        )
    if not path.isprintable():
        return (
            f"{quote(path)} holds a control character (a NUL or a newline, say)",
            f"use plain characters, such as /run/v6lb/{instance}.sock",
        )
    return None


def _parse_lb(value: object, where: Where) -> LbSettings:
    d = _LB_DEFAULTS
    f = Fields(value, where, "`lb:`")
    f.reject_unknown(_LB_KEYS)
    instance = f.string("instance", d.instance, example="instance: lb1")
    if not _INSTANCE_RE.fullmatch(instance):
        raise f.at("instance").error(
            f"{quote(instance)} is not a valid instance name",
            "use 1 to 10 characters of a-z, 0-9 and '-', starting with a letter or digit"
            " (it becomes part of interface and nft table names)",
        )
    addresses = unicast_list(f, "addresses", example="[2001:db8::2]", what="an LB address")
    interfaces: list[str] = []
    if f.has("interfaces"):
        w = f.at("interfaces")
        for i, item in enumerate(as_list(f.get("interfaces"), w, example="[eth0]")):
            name = as_str(item, w.index(i), example="an interface name such as eth0")
            if not _IFNAME_RE.fullmatch(name) or name in (".", ".."):
                raise w.index(i).error(
                    f"{quote(name)} is not a valid Linux interface name",
                    "use 1 to 15 characters without spaces, '/', ':' or '%'",
                )
            if name in interfaces:
                raise w.index(i).error(f"{name} is listed twice", "list each interface once")
            interfaces.append(name)
    socket_path = f.string(
        "control_socket",
        default_control_socket(instance),
        example="control_socket: /run/v6lb/lb0.sock",
    )
    problem = control_socket_problem(socket_path, instance)
    if problem is not None:
        raise f.at("control_socket").error(*problem)
    group: str | None = None
    if f.has("control_group"):
        group = f.string("control_group", "", example="control_group: v6lb")
        if not _GROUP_RE.fullmatch(group):
            raise f.at("control_group").error(
                f"{quote(group)} is not a group name or number",
                "give a group name such as v6lb (letters, digits, '_', '-') or a gid",
            )
    return LbSettings(
        instance=instance,
        addresses=tuple(addresses),
        interfaces=tuple(interfaces),
        control_socket=socket_path,
        control_group=group,
        flow_hash_seed=f.integer(
            "flow_hash_seed", d.flow_hash_seed, lo=0, hi=0xFFFF_FFFF, noun="jhash seed (32 bits)"
        ),
        conntrack_max=f.integer(
            "conntrack_max",
            d.conntrack_max,
            lo=CONNTRACK_MIN,
            hi=1 << 26,
            noun="number of tracked flows",
        ),
        flow_cache_size=f.integer(
            "flow_cache_size",
            d.flow_cache_size,
            lo=1,
            hi=1 << 26,
            noun="number of cached DSR flows",
        ),
        icmp_error_rate=f.integer(
            "icmp_error_rate",
            d.icmp_error_rate,
            lo=0,
            hi=1_000_000,
            noun="number of ICMPv6 errors per second",
        ),
        icmp_error_burst=f.integer(
            "icmp_error_burst",
            d.icmp_error_burst,
            lo=1,
            hi=1_000_000,
            noun="burst of ICMPv6 errors",
        ),
        forward_allow=_parse_forward_allow(f),
        conntrack_sync=parse_conntrack_sync(
            f.get("conntrack_sync"),
            f.at("conntrack_sync"),
            lb_addresses=addresses,
            lb_interfaces=interfaces,
        )
        if f.has("conntrack_sync")
        else None,
        peers=parse_peers(f.get("peers"), f.at("peers"), lb_addresses=addresses)
        if f.has("peers")
        else None,
        metrics=_parse_metrics(f.get("metrics"), f.at("metrics")) if f.has("metrics") else None,
    )


_ANY: Final = IPv6Network("::/0")
_ALLOW_EXAMPLE: Final = '["fd00:20::/64", {from: "fd00:20::/64", to: "::/0"}]'


def _parse_forward_allow(f: Fields) -> tuple[ForwardAllow, ...]:
    """``forward_allow``: a prefix (to or from it) or ``{from: PREFIX, to: PREFIX}``."""
    if not f.has("forward_allow"):
        return ()
    w = f.at("forward_allow")
    out: list[ForwardAllow] = []
    for i, item in enumerate(as_list(f.get("forward_allow"), w, example=_ALLOW_EXAMPLE)):
        wi = w.index(i)
        if isinstance(item, str):
            net = as_ipv6_prefix(item, wi)
            entries = [ForwardAllow(_ANY, net), ForwardAllow(net, _ANY)]
        else:
            e = Fields(item, wi, "a `forward_allow` entry")
            e.reject_unknown(("from", "to"))
            if not (e.has("from") or e.has("to")):
                raise wi.error(
                    "a forward_allow entry needs `from:`, `to:` or both",
                    'write {from: PREFIX, to: PREFIX}, or just the prefix: "fd00:20::/64"',
                )
            src = as_ipv6_prefix(e.get("from"), e.at("from")) if e.has("from") else _ANY
            dst = as_ipv6_prefix(e.get("to"), e.at("to")) if e.has("to") else _ANY
            entries = [ForwardAllow(src, dst)]
        for entry in entries:
            if entry not in out:
                out.append(entry)
    return tuple(out)


# --- vips: -----------------------------------------------------------------------

_VIP_KEYS: Final = (
    "name",
    "address",
    "ports",
    "protocol",
    "mode",
    "scheduler",
    "table_size",
    "backends",
    "health",
)
_OPTION_KEYS: Final[dict[str, tuple[str, ...]]] = {  # per options class (the mode table's)
    "ProxyL4Options": (
        "tls",
        "sni_routes",
        "unknown_sni",
        "proxy_protocol",
        "trusted_proxy_sources",
        "timeouts",
        "dual_stack",
        "max_connections_per_source",
        "relay",
    ),
    "ProxyL7Options": (
        "tls",
        "forwarded_headers",
        "trusted_sources",
        "max_request_bytes",
        "max_header_bytes",
        "max_concurrent_streams",
        "timeouts",
        "dual_stack",
        "max_connections_per_source",
    ),
    "NatOptions": ("snat", "snat_ports"),
    "DsrL2Options": (),
    "TunnelOptions": ("tunnel_source", "mtu"),
}
_MODE_KEYS: Final = {m: _OPTION_KEYS[str(m.facts.options)] for m in VipMode}
_NOT_VIP_MODES: Final = {
    "npt": (
        "npt is not a VIP mode: NPTv6 translates whole prefixes and has no ports or backends",
        "remove this VIP and put the prefix pair in the `npt:` section (inside:, outside:)",
    ),
    "anycast": (
        "anycast is not a VIP mode: it is how VIPs are announced (in `bgp:`)",
        "pick a forwarding mode such as dsr-srv6 or dsr-ip6ip6 and announce the VIP in `bgp:`",
    ),
}
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _modes_taking(key: str) -> list[str]:
    return [mode.value for mode, keys in _MODE_KEYS.items() if key in keys]


def _parse_vip(value: object, where: Where, lb: LbSettings) -> Vip:
    f = Fields(value, where, "a VIP")
    mode = _parse_mode(f)
    allowed = _VIP_KEYS + _MODE_KEYS[mode]
    for key in f:
        modes = _modes_taking(key)
        if key not in allowed and modes:
            raise f.at(key).error(
                f"option `{key}` does not fit mode {mode}",
                f"remove it: it applies to mode{'s' if len(modes) > 1 else ''}"
                f" {' and '.join(modes)} only",
            )
    f.reject_unknown(allowed)

    name = as_str(f.required("name", "web"), f.at("name"), example="name: web")
    if not _NAME_RE.fullmatch(name):
        raise f.at("name").error(
            f"{quote(name)} is not a valid VIP name",
            "use 1 to 63 characters of letters, digits, '.', '_' and '-'",
        )
    address = require_unicast(
        as_ipv6_address(f.required("address", "2001:db8::80"), f.at("address")),
        f.at("address"),
        what="a VIP address",
    )
    ports = _parse_ports(f)
    protocol = Protocol(f.choice("protocol", [p.value for p in Protocol], Protocol.TCP.value))
    if mode is VipMode.PROXY_L7 and protocol is not Protocol.TCP:
        raise f.at("protocol").error(
            "proxy-l7 speaks HTTP over TCP only",
            "use protocol: tcp, or mode proxy-l4 to proxy UDP",
        )
    scheduler, table_size = _parse_scheduler(f, mode)
    backends = _parse_backends(f, mode, ports)
    _check_backends_not_lb(backends, f.at("backends"), mode, lb)
    if table_size is not None and table_size < len(backends):
        raise f.at("table_size").error(
            f"a Maglev table of {table_size} entries cannot hold {len(backends)} backends",
            "use a prime table_size at least 100 times the number of backends",
        )
    return Vip(
        name=name,
        address=address,
        ports=ports,
        protocol=protocol,
        mode=mode,
        scheduler=scheduler,
        backends=backends,
        health=_parse_health(f, protocol),
        options=_parse_passthrough(f, _parse_options(f, mode, lb), protocol, backends),
        table_size=table_size,
    )


def _parse_passthrough(
    f: Fields, options: ModeOptions, protocol: Protocol, backends: tuple[Backend, ...]
) -> ModeOptions:
    """proxy-l4's ``sni_routes:``/``unknown_sni:`` (TLS passthrough, model/sni.py)."""
    if not isinstance(options, ProxyL4Options):
        return options
    if not f.has("sni_routes"):
        if f.has("unknown_sni"):
            raise f.at("unknown_sni").error(
                "`unknown_sni` applies to a VIP with `sni_routes` (TLS passthrough)",
                "remove it, or add sni_routes (for TLS terminated here: tls.unknown_sni)",
            )
        return options
    if options.tls is not None:
        raise f.at("sni_routes").error(
            "a VIP either terminates TLS (`tls:`) or passes it through by SNI (`sni_routes:`)",
            "remove one of them",
        )
    if protocol is not Protocol.TCP:
        raise f.at("sni_routes").error(
            "TLS passthrough reads a TLS ClientHello, which comes over TCP only",
            "use protocol: tcp, or remove sni_routes",
        )
    routes, unknown = parse_sni_routes(f, [(b.address, b.port) for b in backends])
    return replace(options, sni_routes=routes, unknown_sni=unknown)


def _check_backends_not_lb(
    backends: tuple[Backend, ...], where: Where, mode: VipMode, lb: LbSettings
) -> None:
    # Forwarding to the LB's own address sends every packet back to the LB: a loop.
    for k, backend in enumerate(backends):
        if backend.address in lb.addresses:
            i = lb.addresses.index(backend.address)
            fix = "a backend must be a real server's own address, not the LB's"
            if mode.is_proxy:
                fix += " (for a service on the LB host itself, use ::1)"
            raise (
                where.index(k)
                .key("address")
                .error(f"{backend.address} is the LB's own address (lb.addresses[{i}])", fix)
            )


def _parse_mode(f: Fields) -> VipMode:
    value = f.required("mode", "nat")
    if isinstance(value, str) and value in _NOT_VIP_MODES:
        message, fix = _NOT_VIP_MODES[value]
        raise f.at("mode").error(message, fix)
    return VipMode(as_choice(value, f.at("mode"), [m.value for m in VipMode]))


def _parse_ports(f: Fields) -> tuple[int, ...]:
    where = f.at("ports")
    items = as_list(f.required("ports", "[443]"), where, example="[80, 443]")
    if not items:
        raise where.error("the port list is empty", "list at least one port, for example [443]")
    ports: list[int] = []
    for i, item in enumerate(items):
        port = as_int(item, where.index(i), lo=1, hi=65535, noun="port")
        if port in ports:
            raise where.index(i).error(f"port {port} is listed twice", "list each port once")
        ports.append(port)
    return tuple(ports)


def _parse_scheduler(f: Fields, mode: VipMode) -> tuple[Scheduler, int | None]:
    default = Scheduler.ROUND_ROBIN if mode.is_proxy else Scheduler.MAGLEV
    scheduler = Scheduler(f.choice("scheduler", [s.value for s in Scheduler], default.value))
    if not mode.is_proxy and scheduler is not Scheduler.MAGLEV:
        raise f.at("scheduler").error(
            f"mode {mode} cannot honour scheduler {scheduler}",
            "use scheduler: maglev (or leave it out): LB instances that share a VIP must"
            " pick the same backend for a flow without sharing state, and only the"
            " Maglev hash of the flow does that",
        )
    if scheduler is not Scheduler.MAGLEV:
        if f.has("table_size"):
            raise f.at("table_size").error(
                f"table_size applies to scheduler maglev only, not {scheduler}",
                "remove table_size or use scheduler: maglev",
            )
        return scheduler, None
    size = f.integer(
        "table_size", MAGLEV_TABLE_SIZE, lo=3, hi=MAGLEV_TABLE_MAX, noun="prime table size"
    )
    if not _is_prime(size):
        raise f.at("table_size").error(
            f"{size} is not prime (Maglev needs a prime table size)",
            f"use a prime such as {_next_prime(size)} (or the default {MAGLEV_TABLE_SIZE})",
        )
    return scheduler, size


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def _next_prime(n: int) -> int:
    while not _is_prime(n):
        n += 1
    return n


# --- backends ----------------------------------------------------------------------

_BACKEND_KEYS: Final = ("address", "port", "weight", "drain", "mac", "sid")
_MAC_RE: Final = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def _parse_backends(f: Fields, mode: VipMode, ports: tuple[int, ...]) -> tuple[Backend, ...]:
    where = f.at("backends")
    items = as_list(
        f.required("backends", "[{address: 2001:db8::1}]"), where, example="`- address: ...`"
    )
    if not items:
        raise where.error(
            "the backend list is empty", "list at least one backend: `- address: 2001:db8::1`"
        )
    backends: list[Backend] = []
    seen: dict[tuple[IPv6Address, int | None], int] = {}
    for i, item in enumerate(items):
        backend = _parse_backend(item, where.index(i), mode, ports)
        j = seen.setdefault((backend.address, backend.port), i)
        if j != i:
            raise where.index(i).error(
                f"the same backend as backends[{j}]", "list each backend once"
            )
        backends.append(backend)
    if all(b.weight == 0 for b in backends):
        raise where.error(
            "every backend has weight 0, so no backend can take a flow",
            "give at least one backend a weight from 1 to 1000"
            " (to stop new flows to a backend, use drain: true)",
        )
    return tuple(backends)


def _parse_backend(value: object, where: Where, mode: VipMode, ports: tuple[int, ...]) -> Backend:
    f = Fields(value, where, "a backend")
    for key, fits in (("mac", VipMode.DSR_L2), ("sid", VipMode.DSR_SRV6)):
        if f.has(key) and mode is not fits:
            raise f.at(key).error(
                f"option `{key}` does not fit mode {mode}",
                f"remove it: only {fits} backends take it",
            )
    f.reject_unknown(_BACKEND_KEYS)
    address = require_unicast(
        as_ipv6_address(f.required("address", "2001:db8::1"), f.at("address")),
        f.at("address"),
        what="a backend address" + ("" if mode.is_proxy else f" in mode {mode}"),
        allow_loopback=mode.is_proxy,  # a local proxy may hand over to [::1]
    )
    port: int | None = None
    if f.has("port"):
        port = as_int(f.get("port"), f.at("port"), lo=1, hi=65535, noun="port")
        if mode.is_dsr and (len(ports) != 1 or port != ports[0]):
            raise f.at("port").error(
                f"a {mode} backend port must equal the VIP port: DSR rewrites nothing",
                "remove `port` (the backend receives the port the client used)",
            )
    mac: str | None = None
    if f.has("mac"):
        mac = as_str(f.get("mac"), f.at("mac"), example="mac: '02:00:00:00:00:01'").lower()
        if not _MAC_RE.fullmatch(mac) or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
            raise f.at("mac").error(
                f"{quote(mac)} is not a unicast MAC address",
                "write six hex bytes in quotes, for example '02:00:00:00:00:01'",
            )
    sid: IPv6Address | None = None
    if mode is VipMode.DSR_SRV6:
        sid = address
        if f.has("sid"):
            sid = require_unicast(
                as_ipv6_address(f.get("sid"), f.at("sid")), f.at("sid"), what="an SRv6 SID"
            )
    return Backend(
        address=address,
        port=port,
        weight=f.integer("weight", 1, lo=0, hi=WEIGHT_MAX, noun="weight"),
        drain=f.boolean("drain", False),
        mac=mac,
        sid=sid,
    )


# --- health ------------------------------------------------------------------------

_HEALTH_KEYS: Final = (
    "type",
    "interval",
    "timeout",
    "rise",
    "fall",
    "path",
    "port",
    "method",
    "host",
    "expect",
)
_HTTP_ONLY: Final = ("path", "method", "host", "expect")
_HOST_RE: Final = re.compile(r"[A-Za-z0-9._~:\[\]-]+")
_STATUS_RE: Final = re.compile(r"\s*([1-5][0-9][0-9])\s*(?:-\s*([1-5][0-9][0-9])\s*)?")
# RFC 3986 path and query characters, less ' and $ (which HAProxy's config parser would
# take as a quote or a variable): the rest is percent-encoded
_PATH_RE: Final = re.compile(r"/(?:[A-Za-z0-9\-._~!&()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
_HEALTH_DEFAULTS: Final = HealthCheck()


def _parse_health(vip: Fields, protocol: Protocol) -> HealthCheck:
    # No generic UDP probe exists, so UDP VIPs are not probed unless asked to.
    default_type = HealthType.TCP if protocol is Protocol.TCP else HealthType.NONE
    if not vip.has("health"):
        return HealthCheck(type=default_type)
    f = Fields(vip.get("health"), vip.at("health"), "`health:`")
    f.reject_unknown(_HEALTH_KEYS)
    kind = HealthType(f.choice("type", [t.value for t in HealthType], default_type.value))
    if kind is HealthType.NONE:
        extra = [k for k in f if k != "type"]
        if extra:
            raise f.at(extra[0]).error(
                f"`{extra[0]}` does nothing with health type none",
                "remove it, or choose type: tcp or type: http",
            )
        return HealthCheck(type=kind)
    if kind is not HealthType.HTTP:
        for key in _HTTP_ONLY:
            if f.has(key):
                raise f.at(key).error(
                    f"`{key}` applies to health type http only, not {kind}",
                    f"remove {key}, or use type: http",
                )
    d = _HEALTH_DEFAULTS
    interval = f.seconds("interval", d.interval, hi=3600.0)
    timeout = f.seconds("timeout", min(d.timeout, interval / 2), hi=3600.0)
    if timeout >= interval:
        raise f.at("timeout").error(
            f"a timeout of {timeout:g} s is not shorter than the interval of {interval:g} s",
            f"use a timeout below the interval, for example {interval / 2:g}",
        )
    path: str | None = None
    if kind is HealthType.HTTP:
        path = f.string("path", "/", example="path: /healthz")
        if not _PATH_RE.fullmatch(path):
            raise f.at("path").error(
                f"{quote(path)} is not an HTTP request path",
                "start it with '/' and use only letters, digits, -._~!&()*+,;=:@/? and"
                " percent-encoded bytes (a space is %20, a quote %22 or %27), for example"
                " /healthz",
            )
    method, host = "GET", None
    expect: tuple[tuple[int, int], ...] = DEFAULT_EXPECT
    if kind is HealthType.HTTP:
        method = f.choice("method", HTTP_CHECK_METHODS, "GET")
        if f.has("host"):
            host = f.string("host", "", example="host: www.example.com")
            if not _HOST_RE.fullmatch(host):
                raise f.at("host").error(
                    f"{quote(host)} is not a Host header value",
                    "give a host name, optionally with :port, for example www.example.com",
                )
        if f.has("expect"):
            expect = _parse_expect(f.get("expect"), f.at("expect"))
    port: int | None = None
    if f.has("port"):
        port = as_int(f.get("port"), f.at("port"), lo=1, hi=65535, noun="port")
    return HealthCheck(
        type=kind,
        interval=interval,
        timeout=timeout,
        rise=f.integer("rise", d.rise, lo=1, hi=100, noun="count of successes"),
        fall=f.integer("fall", d.fall, lo=1, hi=100, noun="count of failures"),
        path=path,
        port=port,
        method=method,
        host=host,
        expect=expect,
    )


def _parse_expect(value: object, where: Where) -> tuple[tuple[int, int], ...]:
    """``expect: 200``, ``expect: 200-399`` or a list of those: inclusive status ranges."""
    fix = "give statuses 100-599 as a number, a range or a list, for example [200, 300-399]"
    items = value if isinstance(value, list) else [value]
    if not items:
        raise where.error("`expect` is an empty list", fix)
    out: list[tuple[int, int]] = []
    for i, item in enumerate(items):
        at = where.index(i) if isinstance(value, list) else where
        m = _STATUS_RE.fullmatch(str(item)) if isinstance(item, int | str) else None
        if isinstance(item, bool) or m is None:
            raise at.error(f"{quote(str(item))} is not an HTTP status or status range", fix)
        lo = int(m.group(1))
        hi = int(m.group(2) or lo)
        if hi < lo:
            raise at.error(f"the range {lo}-{hi} is empty", f"write it low to high: {hi}-{lo}")
        out.append((lo, hi))
    return tuple(out)


# --- mode options ------------------------------------------------------------------


def _parse_options(f: Fields, mode: VipMode, lb: LbSettings) -> ModeOptions:
    options = mode.facts.options  # the options class's name, from the mode table
    if options == NatOptions.__name__:
        return _parse_nat(f)
    if options == DsrL2Options.__name__:
        return DsrL2Options()
    if options == TunnelOptions.__name__:
        return _parse_tunnel(f, mode, lb)
    if options == ProxyL4Options.__name__:
        relay = Relay(f.choice("relay", [r.value for r in Relay], "user"))
        if relay is Relay.KERNEL and f.has("tls"):
            raise f.at("relay").error(
                "relay: kernel cannot splice a TLS-terminated connection (the proxy decrypts"
                " every byte)",
                "remove relay (user space relays it) or remove tls",
            )
        return ProxyL4Options(
            relay=relay,
            tls=_parse_tls(f, l7=False) if f.has("tls") else None,
            proxy_protocol=ProxyProtocol(
                f.choice("proxy_protocol", [p.value for p in ProxyProtocol], "none")
            ),
            trusted_proxy_sources=_parse_prefixes(f, "trusted_proxy_sources"),
            timeouts=_parse_timeouts(f, ProxyL4Options().timeouts),
            dual_stack=_parse_dual_stack(f),
            max_connections_per_source=_parse_per_source(f),
        )
    defaults = ProxyL7Options()
    return ProxyL7Options(
        tls=_parse_tls(f, l7=True) if f.has("tls") else None,
        forwarded_headers=f.boolean("forwarded_headers", True),
        trusted_sources=_parse_prefixes(f, "trusted_sources"),
        max_request_bytes=(
            f.integer("max_request_bytes", 0, lo=0, hi=1 << 40, noun="byte count")
            if f.has("max_request_bytes")
            else None
        ),
        max_header_bytes=f.integer(
            "max_header_bytes", defaults.max_header_bytes, lo=1024, hi=1 << 20, noun="byte count"
        ),
        max_concurrent_streams=f.integer(
            "max_concurrent_streams",
            defaults.max_concurrent_streams,
            lo=1,
            hi=10_000,
            noun="stream count",
        ),
        timeouts=_parse_timeouts(f, defaults.timeouts),
        dual_stack=_parse_dual_stack(f),
        max_connections_per_source=_parse_per_source(f),
    )


_TLS_KEYS: Final = ("certificates", "min_version", "alpn", "client_ca", "unknown_sni")
_LABEL: Final = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_SNI_RE: Final = re.compile(rf"(\*\.)?({_LABEL}\.)*{_LABEL}")


def _file(value: object, where: Where) -> str:
    """A file name; a relative one is resolved against the config file's directory."""
    text = as_str(value, where, example="/etc/v6lb/web.pem")
    if not text.strip() or "\0" in text:
        raise where.error("is not a file name", "give the path of the file")
    path = Path(text)
    if not path.is_absolute():
        path = Path(where.file).parent / path
    return str(path)


def _tls_version(t: Fields) -> str:
    """``min_version``: "1.2" or "1.3" (YAML reads an unquoted 1.2 as a number)."""
    raw = t.get("min_version")
    if isinstance(raw, float) and not isinstance(raw, bool):
        raw = f"{raw:g}"
    if raw is MISSING:
        return "1.2"
    return as_choice(raw, t.at("min_version"), TLS_VERSIONS)


def _parse_tls(f: Fields, *, l7: bool) -> TlsOptions:
    """``tls:``: the certificates (the first is the default), versions, ALPN, client CA.

    ALPN: ``h2`` and ``http/1.1`` on proxy-l7 (both by default), ``http/1.1`` on proxy-l4."""
    t = Fields(f.get("tls"), f.at("tls"), "`tls:`")
    t.reject_unknown(_TLS_KEYS)
    w = t.at("certificates")
    example = "`- {cert: web.crt, key: web.key, names: [www.example.com]}`"
    items = as_list(t.required("certificates", example), w, example=example)
    if not items:
        raise w.error("`certificates` is an empty list", f"list at least one: {example}")
    certs: list[TlsCertificate] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        c = Fields(item, w.index(i), "a certificate")
        c.reject_unknown(("cert", "key", "names"))
        cert = _file(c.required("cert", "web.crt"), c.at("cert"))
        key = _file(c.required("key", "web.key"), c.at("key"))
        names: list[str] = []
        if c.has("names"):
            wn = c.at("names")
            for j, raw in enumerate(as_list(c.get("names"), wn, example="[www.example.com]")):
                name = as_str(raw, wn.index(j), example="www.example.com").lower().rstrip(".")
                if not _SNI_RE.fullmatch(name) or len(name) > 253:
                    raise wn.index(j).error(
                        f"{quote(str(raw))} is not a DNS name",
                        "give a host name such as www.example.com, or *.example.com",
                    )
                if name in seen:
                    raise wn.index(j).error(
                        f"{name} is named by certificate {seen[name]} already",
                        "name each SNI in one certificate",
                    )
                seen[name] = i
                names.append(name)
        certs.append(TlsCertificate(cert=cert, key=key, names=tuple(names)))
    alpn: tuple[str, ...] = TLS_ALPN if l7 else TLS_ALPN_L4
    if t.has("alpn"):
        wa = t.at("alpn")
        got: list[str] = []
        for j, raw in enumerate(as_list(t.get("alpn"), wa, example="[http/1.1]")):
            if raw == "h2" and not l7:
                raise wa.index(j).error(
                    "proxy-l4 relays the plain stream to HTTP/1.1 backends: h2 is not served",
                    "remove h2 (alpn: [http/1.1]), or use mode proxy-l7 for HTTP/2 clients",
                )
            got.append(as_choice(raw, wa.index(j), TLS_ALPN))
        if not got:
            raise wa.error("`alpn` is an empty list", "write alpn: [http/1.1] or remove it")
        alpn = tuple(dict.fromkeys(got))
    return TlsOptions(
        certificates=tuple(certs),
        min_version=_tls_version(t),
        alpn=alpn,
        client_ca=_file(t.get("client_ca"), t.at("client_ca")) if t.has("client_ca") else None,
        unknown_sni=t.choice("unknown_sni", TLS_UNKNOWN_SNI, "default"),
    )


def _parse_per_source(f: Fields) -> int:
    """Open connections one client address may hold (HAProxy's ``sc_conn_cur``); 0: no limit."""
    return f.integer("max_connections_per_source", 0, lo=0, hi=1_000_000, noun="connection count")


def _parse_nat(f: Fields) -> NatOptions:
    snat: IPv6Network | None = None
    if f.has("snat"):
        where = f.at("snat")
        value = f.get("snat")
        if isinstance(value, str) and "/" in value:
            snat = as_ipv6_prefix(value, where)
            if snat.prefixlen < 64:
                raise where.error(
                    f"a SNAT pool of /{snat.prefixlen} is larger than needed",
                    "use a pool of /64 or longer, or one LB address",
                )
            require_unicast(snat.network_address, where, what="a SNAT pool")
        else:
            addr = require_unicast(as_ipv6_address(value, where), where, what="a SNAT address")
            snat = IPv6Network(addr)
    ports = NatOptions().snat_ports
    if f.has("snat_ports"):
        where = f.at("snat_ports")
        if snat is None:
            raise where.error("snat_ports without snat does nothing", "add `snat:` or remove it")
        value = f.get("snat_ports")
        match = (
            re.fullmatch(r"(\d{1,5})-(\d{1,5})", value.strip()) if isinstance(value, str) else None
        )
        fix = "write a range such as 1024-65535"
        if match is None:
            raise where.error("is not a port range LOW-HIGH", fix)
        low, high = int(match[1]), int(match[2])
        if not 1 <= low <= high <= 65535:
            raise where.error(f"{low}-{high} is not a range within 1-65535", fix)
        ports = (low, high)
    return NatOptions(snat=snat, snat_ports=ports)


def _parse_tunnel(f: Fields, mode: VipMode, lb: LbSettings) -> TunnelOptions:
    if f.has("tunnel_source"):
        where = f.at("tunnel_source")
        source = require_unicast(
            as_ipv6_address(f.get("tunnel_source"), where), where, what="a tunnel source"
        )
    elif lb.addresses:
        source = lb.addresses[0]
    else:
        raise f.at("tunnel_source").error(
            f"mode {mode} needs an outer source address and lb.addresses is empty",
            "set tunnel_source: on this VIP, or list the LB's addresses in lb.addresses",
        )
    mtu = f.integer("mtu", _DEFAULT_MTU, lo=MIN_IPV6_MTU, hi=65535, noun="MTU")
    return TunnelOptions(tunnel_source=source, mtu=mtu)


def _parse_prefixes(f: Fields, name: str) -> tuple[IPv6Network, ...]:
    if not f.has(name):
        return ()
    where = f.at(name)
    items = as_list(f.get(name), where, example="[2001:db8:100::/56]")
    return tuple(as_ipv6_prefix(item, where.index(i)) for i, item in enumerate(items))


def _parse_timeouts(f: Fields, defaults: Timeouts) -> Timeouts:
    if not f.has("timeouts"):
        return defaults
    t = Fields(f.get("timeouts"), f.at("timeouts"), "`timeouts:`")
    t.reject_unknown(("connect", "idle", "total"))
    week = 7 * 86400.0
    total: float | None = None
    if t.has("total"):
        total = t.seconds("total", 0.0, hi=week)
    return Timeouts(
        connect=t.seconds("connect", defaults.connect, hi=3600.0),
        idle=t.seconds("idle", defaults.idle, hi=week),
        total=total,
    )


def _parse_dual_stack(f: Fields) -> IPv4Address | None:
    if not f.has("dual_stack"):
        return None
    return as_ipv4_address(f.get("dual_stack"), f.at("dual_stack"))


# --- npt: --------------------------------------------------------------------------


def _parse_npt_pair(value: object, where: Where) -> NptPair:
    f = Fields(value, where, "an NPT pair")
    f.reject_unknown(("inside", "outside"))
    prefixes: list[IPv6Network] = []
    for key, example in (("inside", "fd00:1:2::/48"), ("outside", "2001:db8:1::/48")):
        # RFC 6296 §3.4/§3.5: the adjustment lands in bits 48..127, so /64 is the longest
        # prefix that leaves an interface identifier to adjust (ip6t_NPT agrees).
        net = as_ipv6_prefix(f.required(key, example), f.at(key), max_len=64)
        if net.network_address.is_multicast or net.overlaps(IPv6Network("ff00::/8")):
            raise f.at(key).error(f"{net} covers multicast addresses", "use a unicast prefix")
        prefixes.append(net)
    return NptPair(inside=prefixes[0], outside=prefixes[1])


def _check_npt_together(pairs: tuple[NptPair, ...], where: Where) -> None:
    seen: list[tuple[str, str, IPv6Network]] = []
    for j, pair in enumerate(pairs):
        for side, net in (("inside", pair.inside), ("outside", pair.outside)):
            for other_path, other_side, other in seen:
                if not net.overlaps(other):
                    continue
                if side == other_side:
                    fix = f"use {side} prefixes that do not overlap, so each address maps one way"
                else:
                    fix = "keep inside and outside prefixes apart, or packets get translated twice"
                raise where.index(j).key(side).error(f"{net} overlaps {other_path} {other}", fix)
            seen.append((f"npt[{j}].{side}", side, net))


# --- checks across VIPs and sections ----------------------------------------------


def _check_vips_together(vips: tuple[Vip, ...], where: Where) -> None:
    names: dict[str, int] = {}
    addresses: dict[IPv6Address, int] = {}
    listeners: dict[tuple[IPv6Address, int, Protocol], int] = {}
    for i, vip in enumerate(vips):
        if vip.name in names:
            raise (
                where.index(i)
                .key("name")
                .error(
                    f"VIP name {vip.name!r} is already used by vips[{names[vip.name]}]",
                    "give each VIP its own name",
                )
            )
        names[vip.name] = i
        addresses.setdefault(vip.address, i)
        for p, port in enumerate(vip.ports):
            key = (vip.address, port, vip.protocol)
            if key in listeners:
                raise (
                    where.index(i)
                    .key("ports")
                    .index(p)
                    .error(
                        f"[{vip.address}]:{port}/{vip.protocol} is already served by"
                        f" vips[{listeners[key]}] ({vips[listeners[key]].name})",
                        "use another port or address, or merge the backends into one VIP",
                    )
                )
            listeners[key] = i
    for j, vip in enumerate(vips):
        for k, backend in enumerate(vip.backends):
            if backend.address in addresses:
                i = addresses[backend.address]
                raise (
                    where.index(j)
                    .key("backends")
                    .index(k)
                    .key("address")
                    .error(
                        f"{backend.address} is the address of VIP vips[{i}] ({vips[i].name})",
                        "a backend must be a real server's own address, not a VIP",
                    )
                )


def _check_vips_outside_npt(vips: tuple[Vip, ...], pairs: tuple[NptPair, ...], top: Where) -> None:
    for i, vip in enumerate(vips):
        for j, pair in enumerate(pairs):
            for side, net in (("inside", pair.inside), ("outside", pair.outside)):
                if vip.address in net:
                    raise (
                        top.key("vips")
                        .index(i)
                        .key("address")
                        .error(
                            f"{vip.address} lies inside npt[{j}].{side} {net}, so NPT would"
                            " rewrite it before the VIP sees the packet",
                            "move the VIP out of the NPT prefixes, or the NPT prefix off the VIP",
                        )
                    )
