"""iproute2 batch text (``ip -6 -batch FILE``) for the tunnel DSR modes, on the LB and on a backend.

Pure: a config (and, for a backend, a few host facts) in, text out.

Ownership tag: every route and rule carries ``proto 0x76`` (:data:`ROUTE_PROTO`),
and lives in, or points at, a routing table of the instance's own block of
table numbers (:func:`instance_tag`). Marks use the same numbers, so a packet's
mark names the table that carries it. Routing tables and marks are 32-bit::

    0x76 (8 bits) | instance hash (10 bits) | index (14 bits)

Index 0 is the backend-side table; index 1 + n is the n-th (VIP, backend) pair
of the ``dsr-ip6ip6``/``dsr-srv6`` VIPs, in file order; after them, one index per
(VIP, backend) pair of the ``dsr-l2`` VIPs (their health probes, below). ``remove``
deletes the rules with proto 0x76 whose table lies in the block, flushes those
tables, deletes the ``lo`` addresses whose metric is the instance tag (an address
cannot carry a ``proto`` with iproute2 6.1) and the neighbour entries with proto
0x76 whose address ends in a table number of the block (:func:`probe_gateway`).

``dsr-l2`` health probes (docs/dsr.md, "Health checks through the data path"): the
MAC rewrite of client frames is a netdev ingress rule, which a packet the LB sends
itself never crosses. So each (dsr-l2 VIP, backend) pair gets a table holding
``VIP/128 via GW dev EGRESS``, where GW (:func:`probe_gateway`) is a made-up
link-local next hop with a permanent neighbour entry ``GW lladdr BACKEND-MAC``: a
probe sent to the VIP with the pair's mark leaves the egress link as a frame to the
backend's MAC, addressed to the VIP, as the rewritten client frames do.

On the LB (``dsr-ip6ip6``/``dsr-srv6``): nftables marks each flow with the
table of its backend (see :mod:`v6lb.render.nftables`: ``jhash`` slot, then the
Maglev map ``slot -> mark``), one ``fwmark`` rule per backend selects the table,
and the table holds one seg6 route for the VIP: ``mode encap`` (outer IPv6 +
one-segment SRH) for ``dsr-srv6``, ``mode encap.red`` (plain IPv6-in-IPv6, next
header 41) for ``dsr-ip6ip6``. The outer source is ``ip sr tunsrc``, one per
network namespace.

On a backend: each VIP it serves on ``lo`` as a /128; for a tunnel VIP, an
``End.DT6`` route for its decapsulation address (the backend's ``sid`` for
``dsr-srv6``, its ``address`` for ``dsr-ip6ip6``, which therefore must not be
an address of the backend itself) and, for the replies that bypass the LB,
routes with ``advmss`` (path MTU - 40 - 20 - tunnel overhead) used for
packets from the VIP. The source filter that admits only the LB's
addresses to the decapsulation address is nftables
(:func:`v6lb.render.nftables.render_backend_nft`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from typing import Final

from v6lb.core.flowhash import jhash
from v6lb.model.config import Config, TunnelOptions, Vip, VipMode
from v6lb.model.modes import Encap, modes_where

__all__ = [
    "BACKEND_RULE_PREF",
    "BackendHost",
    "LB_RULE_PREF",
    "ROUTE_PROTO",
    "TAG_SPAN",
    "RenderError",
    "ReturnRoute",
    "TunnelTarget",
    "advmss",
    "backend_table",
    "backend_vips",
    "decap_address",
    "host_addresses",
    "L2ProbeTarget",
    "dsr_l2_egress",
    "gateway_table",
    "instance_tag",
    "l2_probe_targets",
    "lb_sources",
    "probe_gateway",
    "render_backend_routes",
    "render_lb_routes",
    "tunnel_targets",
]

ROUTE_PROTO: Final = 0x76
"""The route/rule protocol number that marks v6lb's routes ("v"); iproute2 shows it as 118."""
TAG_SPAN: Final = 1 << 14
"""Routing tables (and marks) per instance."""
LB_RULE_PREF: Final = 7600
BACKEND_RULE_PREF: Final = 7601
_TUNNELS: Final = "/".join(modes_where(tunnels=True))  # "dsr-ip6ip6/dsr-srv6", for the texts
_TAG_TOP: Final = ROUTE_PROTO << 24
_IPV6_TCP_HEADERS: Final = 40 + 20


class RenderError(ValueError):
    """The config cannot be rendered for this host: the message names what is missing."""


def instance_tag(instance: str) -> int:
    """First table number (and mark) of the instance's block: ``0x76 | hash(10 bits) | 0``."""
    return _TAG_TOP | (jhash(instance.encode(), ROUTE_PROTO) % 1024) << 14


def backend_table(instance: str) -> int:
    """The backend-side table: decapsulation routes and advmss return routes."""
    return instance_tag(instance)


@dataclass(frozen=True, slots=True)
class TunnelTarget:
    """One (tunnel VIP, backend) pair on the LB: its table, which is also its mark."""

    vip: Vip
    vip_index: int
    backend_index: int
    target: IPv6Address
    table: int

    @property
    def mark(self) -> int:
        return self.table


def decap_address(vip: Vip, backend_index: int) -> IPv6Address:
    """Where the LB sends the tunnelled packet: the SID (dsr-srv6) or the address (dsr-ip6ip6)."""
    b = vip.backends[backend_index]
    return b.sid if vip.mode.facts.encap is Encap.SRV6 and b.sid is not None else b.address


def tunnel_targets(config: Config) -> list[TunnelTarget]:
    """Every (VIP, backend) pair of the tunnel DSR VIPs, numbered in file order."""
    base = instance_tag(config.lb.instance)
    out: list[TunnelTarget] = []
    for i, vip in enumerate(config.vips):
        if not vip.mode.tunnels:
            continue
        for j in range(len(vip.backends)):
            n = len(out) + 1
            if n >= TAG_SPAN:
                raise RenderError(f"more than {TAG_SPAN - 1} tunnel backends in one instance")
            out.append(TunnelTarget(vip, i, j, decap_address(vip, j), base + n))
    return out


@dataclass(frozen=True, slots=True)
class L2ProbeTarget:
    """One (``dsr-l2`` VIP, backend) pair on the LB: the table (and mark) of its probes."""

    vip: Vip
    backend_index: int
    mac: str
    table: int

    @property
    def mark(self) -> int:
        return self.table

    @property
    def gateway(self) -> IPv6Address:
        return probe_gateway(self.table)


_GW_TOP: Final = 0xFE80 << 112 | ROUTE_PROTO << 48
_GW_MASK: Final = ~0xFFFFFFFF & ((1 << 128) - 1)


def probe_gateway(table: int) -> IPv6Address:
    """The made-up link-local next hop of a dsr-l2 probe table: ``fe80::76:0:TTTT:TTTT``."""
    return IPv6Address(_GW_TOP | table)


def gateway_table(address: IPv6Address) -> int | None:
    """The table number a :func:`probe_gateway` address ends in; None for any other address."""
    n = int(address)
    return n & 0xFFFFFFFF if n & _GW_MASK == _GW_TOP else None


def dsr_l2_egress(config: Config) -> str | None:
    """The link dsr-l2 frames leave by: ``lb.interfaces[1]``, or the only one (one-armed)."""
    ifs = config.lb.interfaces
    return (ifs[1] if len(ifs) > 1 else ifs[0]) if ifs else None


def l2_probe_targets(config: Config) -> list[L2ProbeTarget]:
    """Every (dsr-l2 VIP, backend with ``mac:``) pair, numbered after the tunnel pairs."""
    base = instance_tag(config.lb.instance)
    n = len(tunnel_targets(config))
    out: list[L2ProbeTarget] = []
    for vip in config.vips:
        if vip.mode is not VipMode.DSR_L2:
            continue
        for j, b in enumerate(vip.backends):
            n += 1
            if n >= TAG_SPAN:
                raise RenderError(f"more than {TAG_SPAN - 1} DSR backends in one instance")
            if b.mac is not None:
                out.append(L2ProbeTarget(vip, j, b.mac.lower(), base + n))
    return out


def _tunnel_source(config: Config) -> IPv6Address | None:
    sources = {
        vip.options.tunnel_source
        for vip in config.vips
        if vip.mode.tunnels and isinstance(vip.options, TunnelOptions)
    }
    if len(sources) > 1:
        listed = ", ".join(sorted(str(s) for s in sources))
        raise RenderError(
            f"the tunnel VIPs use different tunnel_source addresses ({listed}), but Linux has"
            " one seg6 tunnel source per network namespace (ip sr tunsrc); give them one"
        )
    return next(iter(sources), None)


def render_lb_routes(config: Config, *, dev: str | None = None, l2_dev: str | None = None) -> str:
    """The LB's batch: tunnel source, one encap route per (VIP, backend) table, fwmark rules.

    ``dev`` is the device the encap routes name (the outer packet is routed again
    by its new destination); it defaults to the first ``lb.interfaces``.
    The ``dsr-l2`` probe tables (module docstring) name the dsr-l2 egress link,
    ``l2_dev`` (default: :func:`dsr_l2_egress`); with neither there are none.
    Empty text when the config has no tunnel VIP or dsr-l2 probe.
    """
    targets = tunnel_targets(config)
    egress = l2_dev or dsr_l2_egress(config)
    probes = l2_probe_targets(config) if egress is not None else []
    if not targets and not probes:
        return ""
    tag = f"v6lb:{config.lb.instance}"
    what = ", ".join([_TUNNELS] * bool(targets) + ["the dsr-l2 health probes"] * bool(probes))
    lines = [f"# {tag} LB routes for {what}; load with: ip -6 -batch FILE"]
    if targets:
        if dev is None:
            if not config.lb.interfaces:
                raise RenderError(
                    f"the {_TUNNELS} routes need a device: list the LB's interfaces in"
                    " lb.interfaces"
                )
            dev = config.lb.interfaces[0]
        source = _tunnel_source(config)
        if source is not None:
            lines.append(f"sr tunsrc set {source}")
    for t in targets:
        mode = "encap" if t.vip.mode.facts.encap is Encap.SRV6 else "encap.red"  # SRH or none
        lines.append(
            f"# {tag} {t.vip.name} backend {t.backend_index} {t.vip.backends[t.backend_index].address}"
        )
        lines.append(
            f"route replace {t.vip.address}/128 encap seg6 mode {mode} segs {t.target}"
            f" dev {dev} table {t.table} proto {ROUTE_PROTO:#x}"
        )
        lines.append(_mark_rule(t.mark, t.table))
    for p in probes:
        b = p.vip.backends[p.backend_index]
        lines.append(f"# {tag} {p.vip.name} backend {p.backend_index} {b.address}: health probes")
        lines.append(
            f"neigh replace {p.gateway} lladdr {p.mac} dev {egress} nud permanent"
            f" proto {ROUTE_PROTO:#x}"
        )
        lines.append(
            f"route replace {p.vip.address}/128 via {p.gateway} dev {egress}"
            f" table {p.table} proto {ROUTE_PROTO:#x}"
        )
        lines.append(_mark_rule(p.mark, p.table))
    return "\n".join(lines) + "\n"


def _mark_rule(mark: int, table: int) -> str:
    return f"rule add fwmark {mark:#x} lookup {table} pref {LB_RULE_PREF} proto {ROUTE_PROTO:#x}"


# --- the backend side ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReturnRoute:
    """A route of the backend's main table that replies may take, copied with an advmss.

    ``source`` is the route's ``from`` selector (a source-specific route), and
    ``nexthops`` (``(via, dev, weight)``) replace ``via``/``dev`` for a multipath
    route. Kept as they are, so the copy picks, for packets from a VIP, the same
    next hop the main table picks.
    """

    prefix: IPv6Network | None  # None: default
    via: IPv6Address | None
    dev: str
    source: IPv6Network | None = None
    metric: int | None = None
    nexthops: tuple[tuple[IPv6Address | None, str, int], ...] = ()

    def applies_to(self, address: IPv6Address) -> bool:
        """Whether packets from ``address`` may use this route (its ``from`` holds it)."""
        return self.source is None or address in self.source

    def selector(self) -> str:
        dst = "default" if self.prefix is None else str(self.prefix)
        src = f" from {self.source}" if self.source is not None else ""
        metric = f" metric {self.metric}" if self.metric is not None else ""
        return f"{dst}{src}{metric}"

    def text(self, options: str = "") -> str:
        """``ip -6 route`` arguments; ``options`` go before any ``nexthop`` (ip(8) wants that)."""
        opts = f" {options}" if options else ""
        if self.nexthops:
            hops = " ".join(
                "nexthop"
                + (f" via {via}" if via is not None else "")
                + f" dev {dev}"
                + (f" weight {weight}" if weight != 1 else "")
                for via, dev, weight in self.nexthops
            )
            return f"{self.selector()}{opts} {hops}"
        via = f" via {self.via}" if self.via is not None else ""
        return f"{self.selector()}{via} dev {self.dev}{opts}"


def advmss(vip: Vip) -> int:
    """The MSS a backend may advertise for a tunnel VIP: MTU - IPv6 - TCP - tunnel overhead."""
    assert isinstance(vip.options, TunnelOptions)
    return vip.options.mtu - _IPV6_TCP_HEADERS - vip.mode.facts.overhead


BackendHost = IPv6Address | Sequence[IPv6Address]
"""A backend host: the address (or addresses) the file knows it by."""


def host_addresses(backend: BackendHost) -> tuple[IPv6Address, ...]:
    return (backend,) if isinstance(backend, IPv6Address) else tuple(backend)


def backend_vips(config: Config, backend: BackendHost) -> list[tuple[Vip, int]]:
    """The DSR VIPs that list the host (by any of its addresses), with its index in each."""
    mine = set(host_addresses(backend))
    out: list[tuple[Vip, int]] = []
    for vip in config.vips:
        if not vip.mode.is_dsr:
            continue
        for j, b in enumerate(vip.backends):
            if b.address in mine:
                out.append((vip, j))
    return out


def lb_sources(config: Config) -> list[IPv6Address]:
    """Addresses a tunnelled packet may come from: the tunnel sources and ``lb.addresses``."""
    found: list[IPv6Address] = []
    for vip in config.vips:
        if vip.mode.tunnels and isinstance(vip.options, TunnelOptions):
            found.append(vip.options.tunnel_source)
    found.extend(config.lb.addresses)
    return list(dict.fromkeys(found))


def render_backend_routes(
    config: Config,
    backend: BackendHost,
    *,
    decap_dev: str,
    return_routes: Sequence[ReturnRoute] = (),
) -> str:
    """The batch for one DSR backend (``v6lb backend``): VIPs on lo, End.DT6, advmss.

    ``decap_dev`` is the interface the tunnelled packets arrive on. Measured on
    Linux 6.18: an ``End.DT6`` route on ``dev lo`` drops every packet silently.

    ``return_routes`` are the backend's routes toward clients (its main table, as the
    kernel engine reads it). Those that packets from a
    tunnel VIP may use (no ``from``, or a ``from`` that holds the VIP) are
    installed again in the instance's table, with their ``from`` selectors, and
    the smallest advmss of the tunnel VIPs; a rule sends packets from those VIPs
    through that table. So the replies take the next hop the main table gives
    packets from the VIP (a source-specific route that sends DSR replies around
    the LB is kept), only with the advmss the tunnel needs.
    """
    served = backend_vips(config, backend)
    names = ", ".join(map(str, host_addresses(backend)))
    if not served:
        raise RenderError(f"{names} is not a backend of any dsr-* VIP in {config.source}")
    tag = f"v6lb:{config.lb.instance}"
    table = backend_table(config.lb.instance)
    proto = f"proto {ROUTE_PROTO:#x}"
    lines = [f"# {tag} DSR backend {names}; load with: ip -6 -batch FILE"]
    tunnel: list[tuple[Vip, int]] = []
    for vip, j in served:
        lines.append(f"# {tag} {vip.name} ({vip.mode})")
        lines.append(f"address replace {vip.address}/128 dev lo nodad metric {table}")
        if vip.mode.tunnels:
            tunnel.append((vip, j))
    decaps = list(dict.fromkeys(decap_address(vip, j) for vip, j in tunnel))
    for sid in decaps:
        lines.append(
            f"route replace {sid}/128 encap seg6local action End.DT6 table local"
            f" dev {decap_dev} table {table} {proto}"
        )
        lines.append(f"rule add to {sid}/128 lookup {table} pref {BACKEND_RULE_PREF} {proto}")
    vips = list(dict.fromkeys(vip.address for vip, _ in tunnel))
    returns = [r for r in return_routes if any(r.applies_to(a) for a in vips)]
    if tunnel and returns:
        mss = min(advmss(vip) for vip, _ in tunnel)
        for route in returns:
            lines.append(f"route replace {route.text(f'advmss {mss} table {table} {proto}')}")
        for address in vips:
            lines.append(
                f"rule add from {address}/128 lookup {table} pref {BACKEND_RULE_PREF} {proto}"
            )
    return "\n".join(lines) + "\n"
