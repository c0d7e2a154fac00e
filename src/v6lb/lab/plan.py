"""What a lab is made of, computed from the file alone (pure: nothing is touched here).

:func:`plan_lab` turns a config and its ``topology:`` into the namespaces,
interfaces, addresses, routes and processes :mod:`v6lb.lab.netns` creates:

* one namespace per node, ``v6lb-<name>-<node>``, and one switch namespace
  ``v6lb-<name>--sw`` holding one bridge per link (``v6lb-b<i>``); every node
  interface is a veth whose peer is a port of its link's bridge. So every link,
  whatever its number of endpoints, looks the same, and can be captured on its
  bridge. Lab names are ``[a-z0-9]{1,12}`` (no ``-``), so two labs never share
  a namespace name.
* interfaces in a node are ``v6lb-<link>`` (``v6lb-l<i>`` when the link name is
  longer than 10 characters), with a MAC derived from the link and node indexes;
* routes: each node's :func:`~v6lb.model.topology.compute_fib` (static, default
  and anycast entries; connected ones come with the addresses), tagged
  ``proto 0x77``; with ``static_anycast=False`` the anycast entries are left to a
  routing daemon the lab runs (BGP), so the plan has none;
* extra sysctls per node (:attr:`LabPlan.sysctls`), set before its links exist;
* per LB node, a derived config for ``v6lb run`` (:func:`derive_node_config`:
  ``dataclasses.replace`` on the typed config; :func:`v6lb.model.config_dump.dump`
  writes it): ``lb:`` rewritten for the node (its addresses and interfaces, an
  instance name, the lab's control socket), only the VIPs it ``serves`` that the
  kernel data plane or the proxy engine runs (proxy VIP addresses go on the LB's
  ``lo``), the ``npt:`` pairs if it serves ``npt``, the lab MACs for ``dsr-l2``
  backends, and no ``topology:`` or ``bgp:``;
* one derived config for ``v6lb backend`` whose ``lb.addresses`` are every LB
  node's addresses (the decapsulation filter accepts them);
* an HTTP server on every node that holds a backend address, on the ports its
  VIPs send to.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv6Address
from pathlib import Path
from typing import Final

from v6lb.errors import UsageError
from v6lb.model.bgp import BgpSection
from v6lb.model.config import (
    Config,
    LbSettings,
    NptPair,
    TunnelOptions,
    Vip,
    VipMode,
    default_control_socket,
)
from v6lb.model.modes import Plane
from v6lb.model.topology import NPT, NodeType, Topology, compute_fib
from v6lb.render.routes import decap_address

__all__ = [
    "LAB_ROOT",
    "ROUTE_PROTO",
    "Iface",
    "LabError",
    "LabPlan",
    "default_name",
    "check_name",
    "derive_node_config",
    "lab_namespace",
    "plan_lab",
    "switch_namespace",
]

LAB_ROOT: Final = Path("/run/v6lb/lab")
ROUTE_PROTO: Final = 0x77  # routes the lab adds (v6lb run uses 0x76)
_NAME_RE: Final = re.compile(r"[a-z0-9]{1,12}")
_INSTANCE_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,9}")


class LabError(UsageError):
    """The lab cannot be built or found; ``fix`` says what to do (exit 2)."""

    def __str__(self) -> str:
        if not self.fix or "fix: " in self.message:  # one fix: a wrapped error keeps its own
            return self.message
        return f"{self.message}\n  fix: {self.fix}"


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise LabError(
            f"lab name {name!r} is not valid",
            "use 1 to 12 characters of a-z and 0-9 (no '-': it separates the node name)",
        )
    return name


def default_name(path: str | Path) -> str:
    """The lab name for a file when ``--name`` is not given: its stem, alphanumerics only."""
    stem = re.sub(r"[^a-z0-9]", "", Path(path).stem.lower())[:12]
    return stem or "lab"


def lab_namespace(name: str, node: str) -> str:
    return f"v6lb-{name}-{node}"


def switch_namespace(name: str) -> str:
    return f"v6lb-{name}--sw"


@dataclass(frozen=True, slots=True)
class Iface:
    node: str
    link: str
    name: str  # in the node's namespace
    port: str  # the veth peer, a port of the link's bridge in the switch namespace
    mac: str
    addresses: tuple[IPv6Address, ...]
    prefixlen: int
    mtu: int


@dataclass(frozen=True, slots=True)
class Server:
    node: str
    address: IPv6Address
    ports: tuple[int, ...]


@dataclass(slots=True)
class LabPlan:
    name: str
    file: Path
    labdir: Path
    config: Config
    topo: Topology
    namespaces: dict[str, str]  # node -> namespace
    switch_ns: str
    bridges: dict[str, tuple[str, int]]  # link -> (bridge name, mtu)
    ifaces: list[Iface]
    loopbacks: dict[str, tuple[IPv6Address, ...]]
    forwarding: set[str]
    routes: dict[str, list[str]]  # node -> `ip -6 route` arguments
    lb_configs: dict[str, Config] = field(default_factory=dict)  # node -> derived file
    lb_instances: dict[str, str] = field(default_factory=dict)
    backend_config: Config | None = None  # lb.instance is set per DSR backend
    dsr_backends: list[tuple[str, IPv6Address, str]] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)
    proxy_engine: str = "builtin"  # `v6lb run --proxy` for LB nodes with proxy-* VIPs
    dataplane: str = "kernel"  # `v6lb run --dataplane` for the LB nodes' L3/L4 VIPs and npt
    sysctls: dict[str, list[str]] = field(default_factory=dict)  # node -> extra "key=value"

    def iface(self, node: str, link: str) -> Iface:
        return next(i for i in self.ifaces if i.node == node and i.link == link)

    def socket(self, node: str) -> Path:
        return self.labdir / f"{node}.sock"


def _ifname(link: str, index: int) -> str:
    return f"v6lb-{link}" if len(link) <= 10 else f"v6lb-l{index}"


def plan_lab(
    config: Config,
    topo: Topology,
    name: str,
    *,
    root: Path = LAB_ROOT,
    static_anycast: bool = True,
) -> LabPlan:
    """The whole lab for ``config`` (``topo`` is its topology).

    ``static_anycast=False``: no routes for the anycast announcements (the lab's
    routers learn them by BGP).
    """
    check_name(name)
    nodes = [n.name for n in topo.nodes]
    if len(nodes) > 250 or len(topo.links) > 250:
        raise LabError("the lab supports at most 250 nodes and 250 links", "split the topology")
    labdir = root / name
    namespaces = {n: lab_namespace(name, n) for n in nodes}
    decap = {
        decap_address(vip, i)
        for vip in config.vips
        if vip.mode.tunnels
        for i in range(len(vip.backends))
    }
    names = [_ifname(lk.name, i) for i, lk in enumerate(topo.links)]
    if len(set(names)) != len(names):
        names = [f"v6lb-l{i}" for i in range(len(topo.links))]
    bridges: dict[str, tuple[str, int]] = {}
    ifaces: list[Iface] = []
    for li, lk in enumerate(topo.links):
        bridges[lk.name] = (f"v6lb-b{li}", lk.mtu)
        for att in lk.endpoints:
            ni = nodes.index(att.node)
            ifaces.append(
                Iface(
                    node=att.node,
                    link=lk.name,
                    name=names[li],
                    port=f"v6lb-{li}-{ni}",
                    mac=f"02:76:6c:{li:02x}:{ni:02x}:01",
                    addresses=att.addresses,
                    prefixlen=lk.subnet.prefixlen,
                    mtu=lk.mtu,
                )
            )
    plan = LabPlan(
        name=name,
        file=Path(config.source).resolve(),
        labdir=labdir,
        config=config,
        topo=topo,
        namespaces=namespaces,
        switch_ns=switch_namespace(name),
        bridges=bridges,
        ifaces=ifaces,
        loopbacks={
            n.name: tuple(a for a in n.loopback if a not in decap) for n in topo.nodes if n.loopback
        },
        forwarding={n.name for n in topo.nodes if n.type in (NodeType.ROUTER, NodeType.LB)},
        routes=_routes(
            topo, {lk.name: names[i] for i, lk in enumerate(topo.links)}, static_anycast
        ),
    )
    _plan_lbs(plan)
    _plan_backends(plan)
    return plan


def _routes(topo: Topology, ifname: dict[str, str], static_anycast: bool) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for node, fib in compute_fib(topo).items():
        lines: list[str] = []
        for e in fib:
            if e.origin == "connected" or (e.origin == "bgp" and not static_anycast):
                continue
            dst = "default" if e.prefix.prefixlen == 0 else str(e.prefix)
            words = [dst]
            if e.source is not None:
                words += ["from", str(e.source)]
            if len(e.nexthops) == 1:
                nh = e.nexthops[0]
                words += (["via", str(nh.via)] if nh.via is not None else []) + [
                    "dev",
                    ifname[nh.link],
                ]
                words += ["proto", f"{ROUTE_PROTO:#x}"]
            else:  # ip(8): route options go before the first `nexthop`
                words += ["proto", f"{ROUTE_PROTO:#x}"]
                for nh in e.nexthops:
                    words += ["nexthop"] + (["via", str(nh.via)] if nh.via is not None else [])
                    words += ["dev", ifname[nh.link]]
            lines.append(" ".join(words))
        out[node] = lines
    return out


def _lb_instance(node: str, index: int) -> str:
    return node if _INSTANCE_RE.fullmatch(node) else f"lb{index}"


def derive_node_config(
    config: Config,
    *,
    instance: str,
    addresses: Sequence[IPv6Address],
    interfaces: Sequence[str] = (),
    control_socket: str | None = None,
    vips: Iterable[Vip] = (),
    npt: Iterable[NptPair] = (),
    bgp: BgpSection | None = None,
) -> Config:
    """The config one LB instance (or one backend) of a lab runs, derived from the file's.

    ``lb:`` gets the node's identity (``control_socket`` None: the instance's
    default), the rest of ``lb:`` (flow hash seed, limits, forward_allow,
    conntrack_sync) stays; ``vips`` and ``npt`` replace the file's, ``bgp`` (a
    speaker for this node, or None) replaces its ``bgp:``, and ``topology:`` is
    dropped. Write it with :func:`v6lb.model.config_dump.dump`.
    """
    lb = replace(
        config.lb,
        instance=instance,
        addresses=tuple(addresses),
        interfaces=tuple(interfaces),
        control_socket=control_socket or default_control_socket(instance),
    )
    return replace(config, vips=tuple(vips), npt=tuple(npt), lb=lb, topology=None, bgp=bgp)


def _plan_lbs(plan: LabPlan) -> None:
    topo, config = plan.topo, plan.config
    macs = {a: i.mac for i in plan.ifaces for a in i.addresses}
    for index, lb in enumerate(topo.lbs()):
        addrs = topo.addresses(lb.name)
        links = [a.link for a in topo.attachments(lb.name)]
        inside = [lk for lk in links if lk in lb.inside] or links[-1:]
        outside = [lk for lk in links if lk not in inside] or links[:1]
        vips = [
            v
            for v in config.vips
            if v.name in lb.serves and (Plane.KERNEL in v.mode.facts.planes or v.mode.is_proxy)
        ]
        proxy_vips = tuple(dict.fromkeys(v.address for v in vips if v.mode.is_proxy))
        if proxy_vips:  # the proxy listens on the VIP: it goes on the LB's lo
            have = plan.loopbacks.get(lb.name, ())
            plan.loopbacks[lb.name] = have + tuple(a for a in proxy_vips if a not in have)
        egress = inside[0]
        l2 = [v for v in vips if v.mode is VipMode.DSR_L2]
        if l2:
            be = l2[0].backends[0].address
            egress = next(
                (lk for lk in inside if be in topo.link(lk).subnet),
                egress,
            )
        order = [outside[0], egress] if outside[0] != egress else [egress]
        order += [lk for lk in links if lk not in order]
        interfaces = [plan.iface(lb.name, lk).name for lk in order]
        inside_addr = next(
            (a for a in topo.attachments(lb.name) if a.link == egress), topo.attachments(lb.name)[0]
        ).addresses[0]
        instance = _lb_instance(lb.name, index)
        derived = derive_node_config(
            config,
            instance=instance,
            addresses=addrs,
            interfaces=interfaces,
            control_socket=str(plan.socket(lb.name)),
            vips=[_node_vip(v, macs, set(addrs), inside_addr) for v in vips],
            npt=config.npt if NPT in lb.serves else (),
        )
        if not derived.vips and not derived.npt:
            continue  # nothing for the kernel data plane on this LB (proxy VIPs only)
        plan.lb_configs[lb.name] = derived
        plan.lb_instances[lb.name] = instance


def _node_vip(
    vip: Vip, macs: dict[IPv6Address, str], own: set[IPv6Address], inside_addr: IPv6Address
) -> Vip:
    """``vip`` on one LB node: the lab's MACs for dsr-l2 backends, a tunnel source it owns."""
    if vip.mode is VipMode.DSR_L2:
        backends = tuple(
            replace(b, mac=macs[b.address]) if b.mac is None and b.address in macs else b
            for b in vip.backends
        )
        vip = replace(vip, backends=backends)
    o = vip.options
    if isinstance(o, TunnelOptions) and o.tunnel_source not in own:
        vip = replace(vip, options=replace(o, tunnel_source=inside_addr))
    return vip


def _proxy_port80_nodes(plan: LabPlan, served: set[str]) -> set[str]:
    """The nodes where nginx listens on port 80 for a served proxy VIP's backend."""
    return {
        owner
        for vip in plan.config.vips
        if vip.name in served and vip.mode.is_proxy
        for b in vip.backends
        if 80 in ([b.port] if b.port else vip.ports)
        if (owner := plan.topo.owner(b.address)) is not None
    }


def _plan_backends(plan: LabPlan) -> None:
    topo, config = plan.topo, plan.config
    served = {v.name for c in plan.lb_configs.values() for v in c.vips}
    ports: dict[tuple[str, IPv6Address], set[int]] = {}
    dsr: dict[tuple[str, IPv6Address], None] = {}
    for vip in config.vips:
        if vip.name not in served or vip.mode.is_proxy:  # proxy backends: lab/nginx.py
            continue
        for b in vip.backends:
            owner = topo.owner(b.address)
            if owner is None:
                continue
            key = (owner, b.address)
            ports.setdefault(key, set()).update([b.port] if b.port else vip.ports)
            if vip.mode.is_dsr:
                dsr[key] = None
    if any(c.npt for c in plan.lb_configs.values()):
        # nginx, on a proxy VIP's backend, listens on its own port 80 there: it answers the
        # npt traffic too (lab/nginx.py), so no HTTP server of ours clashes with it.
        proxied = _proxy_port80_nodes(plan, served)
        for pair in config.npt:  # an HTTP server on port 80 of every host inside an npt pair
            for n in topo.nodes:
                if n.type not in (NodeType.HOST, NodeType.BACKEND) or n.name in proxied:
                    continue
                for addr in topo.addresses(n.name):
                    if addr in pair.inside:
                        ports.setdefault((n.name, addr), set()).add(80)
    seen: set[str] = set()
    for (node, address), p in ports.items():
        if node in seen:  # one server per node answers on [::] for all its ports
            srv = next(s for s in plan.servers if s.node == node)
            plan.servers[plan.servers.index(srv)] = Server(
                node, srv.address, tuple(sorted(set(srv.ports) | p))
            )
            continue
        seen.add(node)
        plan.servers.append(Server(node, address, tuple(sorted(p))))
    plan.dsr_backends = [(node, addr, f"labbe{k}") for k, (node, addr) in enumerate(dsr)]
    if plan.dsr_backends:
        lb_addrs = tuple(a for lb in plan.lb_configs for a in plan.topo.addresses(lb))
        vips = [v for c in plan.lb_configs.values() for v in c.vips if v.mode.is_dsr]
        unique = tuple({v.name: v for v in vips}.values())
        plan.backend_config = Config(
            source=config.source,
            vips=unique,
            lb=LbSettings(
                instance="labbe",  # replaced per backend: one instance each
                addresses=lb_addrs,
                control_socket=str(plan.labdir / "backend.sock"),
                flow_hash_seed=config.lb.flow_hash_seed,
            ),
        )
