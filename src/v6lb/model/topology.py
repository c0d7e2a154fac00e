"""The ``topology:`` section: nodes, links, routes, and where the VIPs live.

Used by the simulator engine and by the lab, so it is plain data
plus the routing both need: :func:`compute_fib` turns static routes, connected
subnets and the ``bgp:`` anycast announcements into a forwarding table per
node, and recomputes it when nodes fail.

Schema (docs/config.md has the reference)::

    topology:
      nodes:
        client1: {type: host, role: client, routes: [{prefix: default, via: "2001:db8:ffff::1"}]}
        isp:     {type: router}
        lb-a1:   {type: lb, site: primary, inside: [private], serves: [web, npt]}
        node1:   {type: router, role: node, routes: [...]}
        pod1:    {type: backend, role: pod, on_node: node1}
      links:
        - name: internet
          subnet: "2001:db8:ffff::/64"
          mtu: 1500
          endpoints: {client1: "2001:db8:ffff::100", isp: "2001:db8:ffff::1"}
    bgp:
      announcements:
        - {prefix: "2001:db8:a:1a0::/64", site: primary, cost: 10}

Node types: ``host`` (ends traffic), ``router`` (forwards by longest prefix
match), ``lb`` (runs the v6lb forwarders for the VIPs it ``serves``; never a
transit router), ``backend`` (a host that runs the backend application).
A host or backend on exactly one link with exactly one router on it gets a
default route through that router when it lists none.

Routes: ``prefix`` (or ``default``), ``via`` a neighbour's address on a shared
link (or ``link`` for an on-link route), and optionally ``from``, a source
prefix (Linux source-specific routing: a DSR backend sends replies sourced from
the VIP to the internet gateway, not back to the LB).

Anycast (``bgp.announcements``, read by :mod:`v6lb.model.bgp`): every LB node
of the announcing ``site`` that serves a VIP inside ``prefix`` originates it
with ``cost``; every router picks the origins with the lowest path cost (hops +
cost) and spreads flows over all equal-cost next hops (ECMP). When nodes fail
the tables are recomputed from the announcements that remain; nothing is
scripted.

:func:`parse_topology` is called by :func:`v6lb.model.config.parse_config`,
once, with the VIPs, the ``npt:`` pairs and the announcements it parsed before;
the result is :attr:`v6lb.model.config.Config.topology`. This module imports
nothing from :mod:`v6lb.model.config` at run time (the config imports it).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from ipaddress import IPv6Address, IPv6Network
from typing import TYPE_CHECKING, Final

from v6lb.model.bgp import Announcement
from v6lb.model.schema import (
    Fields,
    Where,
    as_choice,
    as_ipv6_address,
    as_ipv6_prefix,
    as_list,
    as_str,
    did_you_mean,
    quote,
    require_unicast,
    ticked,
)

if TYPE_CHECKING:
    from v6lb.model.config import Config, Vip

__all__ = [
    "Announcement",
    "Attachment",
    "FibEntry",
    "Link",
    "NextHop",
    "Node",
    "NodeType",
    "Route",
    "Topology",
    "compute_fib",
    "default_route",
    "parse_topology",
    "require_topology",
]


class NodeType(StrEnum):
    HOST = "host"
    ROUTER = "router"
    LB = "lb"
    BACKEND = "backend"


ROLES: Final = ("client", "gateway", "router", "lb", "node", "pod", "backend", "server", "host")
_DEFAULT_ROLE: Final = {
    NodeType.HOST: "host",
    NodeType.ROUTER: "router",
    NodeType.LB: "lb",
    NodeType.BACKEND: "backend",
}
_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_DEFAULT: Final = IPv6Network("::/0")
MIN_MTU: Final = 1280
NPT: Final = "npt"  # the name an LB node uses in ``serves`` for the npt: pairs


@dataclass(frozen=True, slots=True)
class Route:
    """A static route: ``prefix`` via ``via`` (a neighbour) or on ``link``; ``source``: ``from``."""

    prefix: IPv6Network
    via: IPv6Address | None = None
    link: str | None = None
    source: IPv6Network | None = None


@dataclass(frozen=True, slots=True)
class Attachment:
    """One node's interface on one link."""

    node: str
    link: str
    addresses: tuple[IPv6Address, ...]


@dataclass(frozen=True, slots=True)
class Link:
    name: str
    subnet: IPv6Network
    mtu: int
    delay: float
    cost: int
    endpoints: tuple[Attachment, ...]

    def nodes(self) -> tuple[str, ...]:
        return tuple(a.node for a in self.endpoints)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    type: NodeType
    role: str
    site: str | None = None
    serves: tuple[str, ...] = ()  # VIP names (and "npt") this LB node runs
    inside: tuple[str, ...] = ()  # links an LB faces backends on
    on_node: str | None = None  # the node (role node) a pod runs on
    loopback: tuple[IPv6Address, ...] = ()
    routes: tuple[Route, ...] = ()
    labels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NextHop:
    link: str
    via: IPv6Address | None  # None: on-link, the destination itself is the neighbour


@dataclass(frozen=True, slots=True)
class FibEntry:
    prefix: IPv6Network
    nexthops: tuple[NextHop, ...]
    origin: str  # connected | static | bgp | default
    source: IPv6Network | None = None
    metric: int = 0


@dataclass(frozen=True)
class Topology:
    """A validated topology. Lookups by name are dicts built once."""

    source: str
    nodes: tuple[Node, ...]
    links: tuple[Link, ...]
    announcements: tuple[Announcement, ...] = ()
    _nodes: dict[str, Node] = field(default_factory=dict, repr=False, compare=False)
    _links: dict[str, Link] = field(default_factory=dict, repr=False, compare=False)
    _owner: dict[IPv6Address, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._nodes.update((n.name, n) for n in self.nodes)
        self._links.update((lk.name, lk) for lk in self.links)
        for lk in self.links:
            for a in lk.endpoints:
                for addr in a.addresses:
                    self._owner[addr] = a.node
        for n in self.nodes:
            for addr in n.loopback:
                self._owner.setdefault(addr, n.name)

    def node(self, name: str) -> Node:
        return self._nodes[name]

    def link(self, name: str) -> Link:
        return self._links[name]

    def owner(self, addr: IPv6Address | str) -> str | None:
        """The node holding ``addr`` on an interface or its loopback, or None."""
        return self._owner.get(IPv6Address(addr))

    def attachments(self, node: str) -> list[Attachment]:
        return [a for lk in self.links for a in lk.endpoints if a.node == node]

    def addresses(self, node: str) -> list[IPv6Address]:
        """Interface addresses of ``node``, link order, then its loopback."""
        out = [addr for a in self.attachments(node) for addr in a.addresses]
        return out + list(self._nodes[node].loopback)

    def lbs(self) -> list[Node]:
        return [n for n in self.nodes if n.type is NodeType.LB]

    def lbs_serving(self, name: str) -> list[Node]:
        return [n for n in self.lbs() if name in n.serves]

    def is_inside(self, node: str, link: str) -> bool:
        return link in self._nodes[node].inside


# --- parsing -------------------------------------------------------------------------

_NODE_KEYS: Final = (
    "type",
    "role",
    "site",
    "serves",
    "inside",
    "on_node",
    "loopback",
    "routes",
    "labels",
)
_LINK_KEYS: Final = ("name", "subnet", "mtu", "delay", "cost", "endpoints")
_ROUTE_KEYS: Final = ("prefix", "via", "link", "from")


def require_topology(config: Config) -> Topology:
    """``config.topology``; a :class:`ConfigError` naming the fix when the file has none."""
    if config.topology is None:
        raise (
            Where(config.source)
            .key("topology")
            .error(
                "the file has no `topology:` section",
                "add one (see examples/eks-ipv6.yaml): nodes, links and routes",
            )
        )
    return config.topology


def parse_topology(
    data: object,
    top: Where,
    *,
    vips: Sequence[Vip],
    npt: bool,
    announcements: Sequence[Announcement] = (),
) -> Topology:
    """Validate the ``topology:`` section of the file ``top`` against its VIPs.

    ``npt`` says whether the file has ``npt:`` pairs; ``announcements`` are the
    ``bgp:`` section's, whose sites must be sites of LB nodes.
    """
    t = Fields(data, top.key("topology"), "`topology:`")
    t.reject_unknown(("nodes", "links"))
    nodes_where = t.at("nodes")
    raw_nodes = Fields(t.required("nodes", "{client: {type: host}}"), nodes_where, "`nodes:`")
    known = [v.name for v in vips] + ([NPT] if npt else [])
    nodes: dict[str, Node] = {}
    for name in raw_nodes:
        w = nodes_where.key(name)
        if not _NAME_RE.fullmatch(name):
            raise w.error(
                f"{quote(name)} is not a valid node name",
                "use 1 to 32 characters of a-z, 0-9 and '-', starting with a letter or digit",
            )
        nodes[name] = _parse_node(name, raw_nodes.get(name), w, known)
    if not nodes:
        raise nodes_where.error("no nodes are listed", "add at least a client, an LB and a backend")
    links_where = t.at("links")
    items = as_list(t.required("links", "[{name: lan, ...}]"), links_where, example="`- name: lan`")
    links: list[Link] = []
    for i, item in enumerate(items):
        links.append(_parse_link(item, links_where.index(i), nodes))
    _check_links(links, links_where)
    _check_sites(announcements, top.key("bgp").key("announcements"), nodes)
    nodes = _default_routes(nodes, links)
    topo = Topology(top.file, tuple(nodes.values()), tuple(links), tuple(announcements))
    _check_nodes(topo, nodes_where, links_where)
    _check_routes(topo, nodes_where)
    _check_vips(topo, vips, npt, top)
    return topo


def _parse_node(name: str, value: object, w: Where, known: Sequence[str]) -> Node:
    f = Fields(value, w, f"node `{name}`")
    f.reject_unknown(_NODE_KEYS)
    kind = NodeType(
        as_choice(f.required("type", "host"), f.at("type"), [t.value for t in NodeType])
    )
    role = f.choice("role", ROLES, _DEFAULT_ROLE[kind])
    for key in ("site", "serves", "inside"):
        if f.has(key) and kind is not NodeType.LB:
            raise f.at(key).error(
                f"`{key}` applies to nodes of type lb, not {kind}",
                "remove it, or make this node `type: lb`",
            )
    site: str | None = None
    if f.has("site"):
        site = as_str(f.get("site"), f.at("site"), example="site: primary")
    serves: tuple[str, ...] = ()
    if kind is NodeType.LB:
        if f.has("serves"):
            sw = f.at("serves")
            got = []
            for i, item in enumerate(as_list(f.get("serves"), sw, example="[web, npt]")):
                v = as_str(item, sw.index(i), example="a VIP name from `vips:`, or npt")
                if v not in known:
                    raise sw.index(i).error(
                        f"{quote(v)} is not a VIP of this file"
                        + (" and there is no `npt:`" if v == NPT else ""),
                        f"use one of: {', '.join(known) or '(no VIPs defined)'}",
                    )
                got.append(v)
            serves = tuple(got)
        else:
            serves = tuple(known)  # an LB runs every VIP of the file unless told otherwise
    inside: tuple[str, ...] = ()
    if f.has("inside"):
        iw = f.at("inside")
        raw = f.get("inside")
        vals = [raw] if isinstance(raw, str) else as_list(raw, iw, example="[private]")
        inside = tuple(as_str(v, iw, example="a link name") for v in vals)
    on: str | None = None
    if f.has("on_node"):
        on = as_str(f.get("on_node"), f.at("on_node"), example="on_node: node1")
    loopback: list[IPv6Address] = []
    if f.has("loopback"):
        lw = f.at("loopback")
        for i, item in enumerate(as_list(f.get("loopback"), lw, example='["2001:db8::1"]')):
            loopback.append(
                require_unicast(
                    as_ipv6_address(item, lw.index(i)), lw.index(i), what="a loopback address"
                )
            )
    routes: list[Route] = []
    if f.has("routes"):
        rw = f.at("routes")
        for i, item in enumerate(
            as_list(f.get("routes"), rw, example="[{prefix: default, via: ...}]")
        ):
            routes.append(_parse_route(item, rw.index(i)))
    labels: tuple[str, ...] = ()
    if f.has("labels"):
        lw = f.at("labels")
        labels = tuple(
            as_str(v, lw.index(i), example="a label")
            for i, v in enumerate(as_list(f.get("labels"), lw, example="[zone-a]"))
        )
    return Node(name, kind, role, site, serves, inside, on, tuple(loopback), tuple(routes), labels)


def _parse_route(value: object, w: Where) -> Route:
    f = Fields(value, w, "a route")
    f.reject_unknown(_ROUTE_KEYS)
    raw = f.required("prefix", "default")
    prefix = _DEFAULT if raw == "default" else as_ipv6_prefix(raw, f.at("prefix"))
    via: IPv6Address | None = None
    if f.has("via"):
        via = require_unicast(
            as_ipv6_address(f.get("via"), f.at("via")), f.at("via"), what="a next hop"
        )
    link: str | None = None
    if f.has("link"):
        link = as_str(f.get("link"), f.at("link"), example="link: lan")
    if via is None and link is None:
        raise w.error(
            "the route has neither `via` nor `link`",
            "add `via: ADDRESS` (a neighbour's address) or `link: NAME` (on-link)",
        )
    source: IPv6Network | None = None
    if f.has("from"):
        source = as_ipv6_prefix(f.get("from"), f.at("from"))
    return Route(prefix, via, link, source)


def _parse_link(value: object, w: Where, nodes: Mapping[str, Node]) -> Link:
    f = Fields(value, w, "a link")
    f.reject_unknown(_LINK_KEYS)
    name = as_str(f.required("name", "lan"), f.at("name"), example="name: lan")
    if not _NAME_RE.fullmatch(name):
        raise f.at("name").error(
            f"{quote(name)} is not a valid link name",
            "use 1 to 32 characters of a-z, 0-9 and '-', starting with a letter or digit",
        )
    subnet = as_ipv6_prefix(f.required("subnet", "2001:db8:1::/64"), f.at("subnet"))
    if subnet.prefixlen > 127:
        raise f.at("subnet").error(f"{subnet} has room for no two nodes", "use a /127 or shorter")
    mtu = f.integer("mtu", 1500, lo=MIN_MTU, hi=65535, noun="MTU (RFC 8200 §5: at least 1280)")
    delay = f.seconds("delay", 0.001, hi=10.0) if f.has("delay") else 0.001
    cost = f.integer("cost", 1, lo=1, hi=65535, noun="link cost")
    ew = f.at("endpoints")
    ends = Fields(
        f.required("endpoints", '{a: "2001:db8:1::1", b: "2001:db8:1::2"}'), ew, "`endpoints:`"
    )
    attachments: list[Attachment] = []
    for node in ends:
        nw = ew.key(node)
        if node not in nodes:
            hint = _close(node, list(nodes))
            raise nw.error(
                f"link `{name}` names node {ticked(node)}, which is not in topology.nodes",
                f"add {ticked(node)} under topology.nodes{hint}, or remove this endpoint",
            )
        raw = ends.get(node)
        vals = raw if isinstance(raw, list) else [raw]
        addrs: list[IPv6Address] = []
        for i, v in enumerate(vals):
            aw = nw.index(i) if isinstance(raw, list) else nw
            addr = require_unicast(as_ipv6_address(v, aw), aw, what="an interface address")
            if addr not in subnet:
                raise aw.error(
                    f"{addr} is outside the subnet {subnet} of link `{name}`",
                    f"use an address inside {subnet}, or change the link's subnet",
                )
            if addr == subnet.network_address and subnet.prefixlen < 127:
                raise aw.error(
                    f"{addr} is the Subnet-Router anycast address of {subnet} (RFC 4291 §2.6.1)",
                    "use another address of the subnet, such as ::1",
                )
            addrs.append(addr)
        if not addrs:
            raise nw.error("no address given", f"give `{node}` an address inside {subnet}")
        attachments.append(Attachment(node, name, tuple(addrs)))
    if len(attachments) < 2:
        raise ew.error(
            f"link `{name}` has {len(attachments)} endpoint(s)", "a link joins at least two nodes"
        )
    return Link(name, subnet, mtu, delay, cost, tuple(attachments))


def _close(word: str, choices: list[str]) -> str:
    m = did_you_mean(word, choices)
    return f" (did you mean `{m}`?)" if m else ""


def _check_links(links: list[Link], w: Where) -> None:
    names: dict[str, int] = {}
    owners: dict[IPv6Address, str] = {}
    for i, lk in enumerate(links):
        if lk.name in names:
            raise (
                w.index(i)
                .key("name")
                .error(
                    f"link name `{lk.name}` is already used by links[{names[lk.name]}]",
                    "give each link its own name",
                )
            )
        names[lk.name] = i
        for j in range(i):
            if lk.subnet.overlaps(links[j].subnet):
                raise (
                    w.index(i)
                    .key("subnet")
                    .error(
                        f"{lk.subnet} overlaps links[{j}] (`{links[j].name}`) {links[j].subnet}",
                        "give each link its own, non-overlapping subnet",
                    )
                )
        for a in lk.endpoints:
            for addr in a.addresses:
                if addr in owners:
                    raise (
                        w.index(i)
                        .key("endpoints")
                        .key(a.node)
                        .error(
                            f"{addr} is already assigned ({owners[addr]})",
                            "give every interface its own address",
                        )
                    )
                owners[addr] = f"{a.node} on {lk.name}"


def _check_sites(
    announcements: Sequence[Announcement], w: Where, nodes: Mapping[str, Node]
) -> None:
    """Each announcement names the site of an LB node (the shape is model/bgp.py's)."""
    sites = sorted({n.site for n in nodes.values() if n.site})
    for i, a in enumerate(announcements):
        if a.site not in sites:
            raise (
                w.index(i)
                .key("site")
                .error(
                    f"no LB node has site {ticked(a.site)}",
                    f"use one of: {', '.join(sites)}" if sites else "give LB nodes `site:`",
                )
            )


def default_route(name: str, types: Mapping[str, NodeType], links: Iterable[Link]) -> Route | None:
    """The route a host or backend ``name`` that lists none gets, or None.

    With exactly one link, and exactly one router on it, it routes via that
    router. ``types`` maps every node name to its type.
    """
    if types[name] not in (NodeType.HOST, NodeType.BACKEND):
        return None
    mine = [lk for lk in links if name in lk.nodes()]
    if len(mine) != 1:
        return None
    routers = [a for a in mine[0].endpoints if a.node != name and types[a.node] is NodeType.ROUTER]
    if len(routers) != 1:
        return None
    return Route(_DEFAULT, routers[0].addresses[0])


def _default_routes(nodes: dict[str, Node], links: list[Link]) -> dict[str, Node]:
    """A host or backend with no route and one router on its only link routes via that router."""
    types = {name: node.type for name, node in nodes.items()}
    out = dict(nodes)
    for name, node in nodes.items():
        route = None if node.routes else default_route(name, types, links)
        if route is not None:
            out[name] = replace(node, routes=(route,))
    return out


def _check_nodes(topo: Topology, nw: Where, lw: Where) -> None:
    for n in topo.nodes:
        w = nw.key(n.name)
        links = [a.link for a in topo.attachments(n.name)]
        if not links:
            raise w.error(
                f"node `{n.name}` is on no link",
                "add it to the endpoints of a link in topology.links",
            )
        if n.type is NodeType.LB and len(links) > 1 and not n.inside:
            raise w.error(
                f"LB node `{n.name}` is on {len(links)} links and none is marked inside",
                f"add `inside: [LINK]`, the link(s) it reaches backends on (one of: {', '.join(links)})",
            )
        for link in n.inside:
            if link not in links:
                raise w.key("inside").error(
                    f"`{n.name}` is not on link `{link}`",
                    f"name one of its links: {', '.join(links)}",
                )
        if n.on_node is not None:
            other = topo._nodes.get(n.on_node)
            if other is None:
                raise w.key("on_node").error(
                    f"`on_node: {n.on_node}` names no node",
                    f"name a node of role node{_close(n.on_node, list(topo._nodes))}",
                )
            if n.on_node not in {x.node for lk in links for x in topo.link(lk).endpoints}:
                raise w.key("on_node").error(
                    f"`{n.name}` shares no link with `{n.on_node}`",
                    f"attach it to a link of `{n.on_node}`",
                )


def _check_routes(topo: Topology, nw: Where) -> None:
    for n in topo.nodes:
        mine = {a.link: topo.link(a.link) for a in topo.attachments(n.name)}
        for i, r in enumerate(n.routes):
            w = nw.key(n.name).key("routes").index(i)
            if r.link is not None and r.link not in mine:
                raise w.key("link").error(
                    f"`{n.name}` is not on link `{r.link}`", f"use one of: {', '.join(mine)}"
                )
            if r.via is not None:
                on = [lk for lk in mine.values() if r.via in lk.subnet]
                if r.link is not None:
                    on = [lk for lk in on if lk.name == r.link]
                if not on:
                    raise w.key("via").error(
                        f"{r.via} is not on any link of `{n.name}`",
                        "use the address of a neighbour on one of its links: "
                        + ", ".join(f"{lk.name} {lk.subnet}" for lk in mine.values()),
                    )
                owner = topo.owner(r.via)
                if owner is None or owner == n.name or owner not in on[0].nodes():
                    raise w.key("via").error(
                        f"no neighbour of `{n.name}` on link `{on[0].name}` has {r.via}",
                        "use an address listed in that link's endpoints",
                    )


def _check_vips(topo: Topology, vips: Sequence[Vip], npt: bool, top: Where) -> None:
    vw = top.key("vips")
    lb_names = [n.name for n in topo.lbs()]
    for i, vip in enumerate(vips):
        serving = topo.lbs_serving(vip.name)
        if not serving:
            raise vw.index(i).error(
                f"VIP {vip.name} ({vip.address}) is served by no LB node, so nothing routes it",
                "add it to `serves:` of an lb node in topology.nodes"
                + (
                    f" ({', '.join(lb_names)})"
                    if lb_names
                    else " (there is none: add a node of type lb)"
                ),
            )
        for k, b in enumerate(vip.backends):
            bw = vw.index(i).key("backends").index(k).key("address")
            owner = topo.owner(b.address)
            if owner is None:
                raise bw.error(
                    f"backend {b.address} is on no node of the topology",
                    "give a backend or pod node this address in topology.links, or fix the address",
                )
            if vip.mode.is_dsr and not vip.mode.tunnels:  # dsr-l2: frames on one link
                for lb in serving:
                    if not _share_link(topo, lb.name, owner):
                        raise bw.error(
                            f"dsr-l2 backend {b.address} ({owner}) shares no link with LB `{lb.name}`",
                            "dsr-l2 hands frames over on one link: put the backend on the LB's inside link",
                        )
            for lb in serving:
                if not _reaches(topo, lb.name, b.address, owner):
                    raise bw.error(
                        f"LB `{lb.name}` has no route to backend {b.address} ({owner})",
                        f"add a route for it under topology.nodes.{lb.name}.routes",
                    )
        clients = [n for n in topo.nodes if n.role == "client"]
        for c in clients:
            ends = _walk(topo, compute_fib(topo), c.name, vip.address)
            bad = [e for e in ends if e not in {s.name for s in serving}]
            if bad or not ends:
                where = bad[0] if bad else c.name
                raise (
                    vw.index(i)
                    .key("address")
                    .error(
                        f"VIP {vip.name} ({vip.address}) is not routed from `{c.name}` to an LB"
                        f" serving it: the path ends at `{where}`",
                        f"add a route for {vip.address} towards {', '.join(s.name for s in serving)}"
                        f" (at topology.nodes.{where}.routes), or a bgp announcement",
                    )
                )
    if npt and not topo.lbs_serving(NPT):
        raise top.key("npt").error(
            "no LB node runs the npt: pairs", "add `npt` to `serves:` of an lb node"
        )


def _share_link(topo: Topology, a: str, b: str) -> bool:
    return any(b in lk.nodes() for lk in topo.links if a in lk.nodes())


def _reaches(topo: Topology, start: str, addr: IPv6Address, owner: str) -> bool:
    ends = _walk(topo, compute_fib(topo), start, addr)
    return bool(ends) and all(e == owner for e in ends)


def _walk(
    topo: Topology, fibs: Mapping[str, list[FibEntry]], start: str, dst: IPv6Address
) -> set[str]:
    """Control-plane trace: the nodes where packets from ``start`` to ``dst`` stop (all ECMP paths)."""
    ends: set[str] = set()
    seen: set[str] = set()
    todo = [start]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        node = topo.node(n)
        if topo.owner(dst) == n or (n != start and node.type is not NodeType.ROUTER):
            ends.add(n)
            continue
        entry = lookup(fibs[n], dst, None)
        if entry is None:
            ends.add(n)
            continue
        for nh in entry.nexthops:
            nxt = neighbour(topo, nh, dst)
            if nxt is None:
                ends.add(n)
            else:
                todo.append(nxt)
    return ends


# --- routing -------------------------------------------------------------------------


def lookup(fib: list[FibEntry], dst: IPv6Address, src: IPv6Address | None) -> FibEntry | None:
    """Longest prefix match; among equal prefixes a matching ``from`` wins, then static over bgp."""
    best: FibEntry | None = None
    best_key = (-1, -1, -1)
    rank = {"connected": 3, "static": 2, "default": 1, "bgp": 0}
    for e in fib:
        if dst not in e.prefix:
            continue
        if e.source is not None and (src is None or src not in e.source):
            continue
        key = (
            e.prefix.prefixlen,
            e.source.prefixlen if e.source is not None else -1,
            rank[e.origin],
        )
        if key > best_key:
            best, best_key = e, key
    return best


def neighbour(topo: Topology, nh: NextHop, dst: IPv6Address) -> str | None:
    """The node a next hop hands the packet to on its link (None: nobody has the address)."""
    target = nh.via if nh.via is not None else dst
    owner = topo.owner(target)
    if owner is None or owner not in topo.link(nh.link).nodes():
        return None
    return owner


def compute_fib(topo: Topology, down: Iterable[str] = ()) -> dict[str, list[FibEntry]]:
    """Each node's forwarding table, given the nodes that are ``down``.

    Connected subnets, static routes (whose next hop must be up), and for
    routers the anycast announcements of the LB sites still up.
    """
    dead = set(down)
    fibs: dict[str, list[FibEntry]] = {}
    for n in topo.nodes:
        fib: list[FibEntry] = []
        for a in topo.attachments(n.name):
            fib.append(FibEntry(topo.link(a.link).subnet, (NextHop(a.link, None),), "connected"))
        for r in n.routes:
            link = r.link
            if link is None and r.via is not None:
                link = next(
                    a.link for a in topo.attachments(n.name) if r.via in topo.link(a.link).subnet
                )
            assert link is not None
            if r.via is not None and topo.owner(r.via) in dead:
                continue
            fib.append(FibEntry(r.prefix, (NextHop(link, r.via),), "static", r.source))
        fibs[n.name] = fib
    if topo.announcements:
        _anycast(topo, fibs, dead)
    return fibs


def _anycast(topo: Topology, fibs: dict[str, list[FibEntry]], dead: set[str]) -> None:
    """Shortest paths (hops weighted by link cost, through routers only) + announcement cost."""
    vips_of: dict[str, list[IPv6Network]] = {}
    for a in topo.announcements:
        vips_of.setdefault(a.site, []).append(a.prefix)
    prefixes = sorted({a.prefix for a in topo.announcements}, key=str)
    for prefix in prefixes:
        origins: dict[str, int] = {}
        for a in topo.announcements:
            if a.prefix != prefix:
                continue
            for lb in topo.lbs():
                if lb.site == a.site and lb.name not in dead and lb.serves:
                    origins[lb.name] = min(origins.get(lb.name, a.cost), a.cost)
        if not origins:
            continue
        dist = _distances(topo, origins, dead)
        for n in topo.nodes:
            if n.type is not NodeType.ROUTER or n.name in dead or n.name not in dist:
                continue
            best = dist[n.name]
            hops: list[NextHop] = []
            taken: set[str] = set()
            for att in topo.attachments(n.name):
                lk = topo.link(att.link)
                for other in lk.endpoints:
                    if other.node == n.name or other.node in dead or other.node in taken:
                        continue
                    if not _carries(topo, other.node, lk.name, origins):
                        continue
                    d = dist.get(other.node)
                    if d is None or d + lk.cost != best:
                        continue
                    taken.add(other.node)
                    hops.append(NextHop(lk.name, other.addresses[0]))
            if hops:
                hops.sort(key=lambda h: (h.link, int(h.via or 0)))
                fibs[n.name].append(FibEntry(prefix, tuple(hops), "bgp", None, best))


def _distances(topo: Topology, origins: Mapping[str, int], dead: set[str]) -> dict[str, int]:
    """Dijkstra from every origin at once; LBs end paths, only routers carry them on."""
    dist: dict[str, int] = dict(origins)
    heap = [(d, name) for name, d in sorted(origins.items())]
    heapq.heapify(heap)
    while heap:
        d, name = heapq.heappop(heap)
        if d > dist.get(name, 1 << 60):
            continue
        if name not in origins and topo.node(name).type is not NodeType.ROUTER:
            continue
        for a in topo.attachments(name):
            lk = topo.link(a.link)
            if not _carries(topo, name, lk.name, origins):
                continue
            for other in lk.endpoints:
                if other.node == name or other.node in dead:
                    continue
                if topo.node(other.node).type is not NodeType.ROUTER:
                    continue
                nd = d + lk.cost
                if nd < dist.get(other.node, 1 << 60):
                    dist[other.node] = nd
                    heapq.heappush(heap, (nd, other.node))
    return dist


def _carries(topo: Topology, node: str, link: str, origins: Mapping[str, int]) -> bool:
    """May ``node`` announce or carry anycast routes over ``link``?

    Routers: on every link. An LB origin: only on its outside links (it faces
    its backends on ``inside`` links and announces nothing there).
    """
    spec = topo.node(node)
    if spec.type is NodeType.ROUTER:
        return True
    return node in origins and link not in spec.inside
