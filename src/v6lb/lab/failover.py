"""`v6lb lab failover`: a two-site anycast lab with real BGP, BFD and ECMP, and failures under traffic.

:func:`build` reads a file like examples/anycast-sites.yaml or examples/eks-ipv6.yaml
(``vips``, ``lb``, ``bgp`` and a ``topology``). Its network is the lab builder's
(:func:`v6lb.lab.plan.plan_lab`, created by :func:`v6lb.lab.netns.build_network`): a
namespace per node, every link a
bridge, the topology's addresses and static routes, and no static anycast route (BGP
carries the VIP). Added to that plan: ``keep_addr_on_down`` everywhere (a cut link comes
back whole) and, on each site's LBs, a route to each SRv6 segment id of the site's own
backends. What this module starts in it is the scenario:

* the router that shares a link with the client is the **upstream** (BIRD, AS 65000);
  each site's router is the one router on its LBs' outside links (links in an LB node's
  ``inside:`` lead to its backends and do not count). A site router other than the
  upstream runs BIRD in the AS of the LBs' ``bgp.neighbours[0].asn``: it learns the VIP
  from its site's LBs, installs one ECMP route over them (``merge paths``,
  ``fib_multipath_hash_policy=1``) and passes it upstream with the site's
  ``bgp.announcements`` cost as MED. A site whose router is the upstream itself
  (eks-ipv6.yaml's backup: lb-b1 on a transit link with isp) has its LBs peer with the
  upstream directly, the site's cost as their MED; where both kinds meet, the upstream
  ranks the sites by cost with ``local_pref`` (a direct LB's AS path is one AS shorter);
* every LB node runs ``v6lb run`` with a derived copy of the file: its own address,
  interface and instance name, its site router as neighbour, the announced VIPs with
  the backends on its own site LAN and those on no site LAN (shared by the sites, reached
  by the topology's static routes: eks-ipv6.yaml's pods), and the site's cost as
  ``med``. bird is its child (``PR_SET_PDEATHSIG``). A file whose ``bgp:`` has
  announcements only gets the lab's speaker: AS :data:`LB_ASN`, site routers in
  :data:`SITE_ASN`, hold 3 s, keepalive 1 s, BFD 100 ms x 3;
* every backend node runs ``v6lb backend`` (SRv6/IPIP decapsulation) and
  :mod:`v6lb.lab.agents.greet_server`, which greets each connection with its address.

Each LB namespace also gets a small nft table (``v6lbfo``) that records the client
source ports of the VIP's packets it receives, so every flow can be attributed to
the instance that carried it (:meth:`Lab.carriers`).

:func:`measure` runs one failure under continuous traffic from the client
(:mod:`v6lb.lab.agents.traffic`): ``flows`` long-lived TCP connections each asking
every 100 ms, plus a new connection every 100 ms. It records the time until new
connections succeed again, the share of established connections that survive (of all,
and of those whose backend is still alive), what the clients saw (resets, timeouts,
the worst stall), and which instance carried each flow before and after. The failures
(:data:`FAILURES`):

``lb-instance-dies``   SIGKILL of one primary instance's process group (v6lb and its bird);
``site-lbs-die``       SIGKILL of every primary instance's: the upstream moves to the backup;
``site-backends-die``  every backend server of the primary site killed: the site withdraws;
``site-uplink-down``   the primary site router's uplink set down: only BFD notices upstream.

A failure that cannot move traffic to a working backup on the file's layout is refused
before anything is built (:func:`refusal`): ``site-backends-die`` where the sites share
their backends, ``site-uplink-down`` where the primary has no site uplink or the backup's
backends answer clients through it.

These are the names of :mod:`v6lb.model.failures`, shared with `v6lb explain`; the
CLI maps the older ``kill-instance``, ``site-backends`` and ``site-uplink`` to them.

tests/test_anycast_failover.py and ``v6lb lab failover`` both use this module, so they
measure the same way (docs/anycast.md has the table). The lab is named ``fo<pid>``
unless ``--name`` names it (namespaces ``v6lb-NAME-<node>``, files in
``/run/v6lb/lab/NAME``); it is removed when :func:`build`'s context exits, or by
``v6lb lab down --name NAME`` after a crash.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, Final

from v6lb.engines.bird import Bird, BirdError, set_l4_ecmp_hash, start_bird
from v6lb.engines.control import ControlError, query
from v6lb.lab.netns import build_network, lab_down, restore_routes
from v6lb.lab.plan import (
    LAB_ROOT,
    ROUTE_PROTO,
    LabError,
    LabPlan,
    check_name,
    derive_node_config,
    plan_lab,
)
from v6lb.model.bgp import BfdSettings, BgpSection, BgpSettings, Neighbour
from v6lb.model.config import (
    Config,
    ConfigError,
    TunnelOptions,
    Vip,
    VipMode,
    load_config,
    load_topology,
)
from v6lb.model.config_dump import dump
from v6lb.model.topology import NodeType, Topology, compute_fib, lookup, neighbour
from v6lb.render.bird import SpeakerRoute, render_router, render_speaker

__all__ = [
    "FAILURES",
    "UPSTREAM_ASN",
    "Figures",
    "Lab",
    "Site",
    "build",
    "format_table",
    "lab_failover",
    "measure",
    "repair",
    "run_failovers",
]

FAILURES: Final = ("lb-instance-dies", "site-lbs-die", "site-backends-die", "site-uplink-down")
UPSTREAM_ASN: Final = 65000
LB_ASN: Final = 65001  # the LBs' AS when the file's bgp: has no speaker (asn)
SITE_ASN: Final = 65010  # the site routers' AS when the file's speaker names no neighbour
PORT: Final = 80
GOOD_S: Final = 0.5  # a new connection that takes longer than this counts as slow
GREET_SERVER: Final = "v6lb.lab.agents.greet_server"  # on every backend
TRAFFIC: Final = "v6lb.lab.agents.traffic"  # on the client


def _run(argv: Sequence[str], stdin: str | None = None, timeout: float = 60) -> str:
    r = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {r.stderr.strip()}", "see the message")
    return r.stdout


def _proto(name: str) -> str:
    return name.replace("-", "_")


@dataclass
class Site:
    name: str
    cost: int
    router: str  # the upstream itself when the site's LBs peer with it directly
    lan: str  # the link the site router and its LBs share (its backends too, if local)
    uplink: str | None  # the link between the site router and the upstream (None: direct)
    lbs: list[str]
    backends: list[str]  # on the site LAN, then those the sites share (routed to)

    @property
    def direct(self) -> bool:
        """The site's LBs peer with the upstream itself (it is the site router)."""
        return self.uplink is None


@dataclass
class Lab:
    """A built two-site lab; everything it started is stopped by :func:`build`'s exit."""

    plan: LabPlan  # the network: namespaces, interfaces, addresses, routes
    client: str
    upstream: str
    sites: list[Site]  # primary (lowest cost) first
    vip: IPv6Address
    asn_site: int
    speaker: BgpSettings  # the LBs' (the file's bgp: speaker, or the lab's default one)
    backend_addr: dict[str, IPv6Address]  # backend node -> the address its VIP backend has
    backend_link: dict[str, str | None]  # backend node -> its site LAN (None: routed to)
    birds: dict[str, Bird] = field(default_factory=dict)
    lbs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    servers: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    log: Callable[[str], None] = lambda _m: None
    dataplane: str = "kernel"  # every LB's `v6lb run --dataplane`

    @property
    def config(self) -> Config:
        return self.plan.config

    @property
    def topo(self) -> Topology:
        return self.plan.topo

    @property
    def work(self) -> Path:
        """The lab's directory: derived files, logs, control sockets, bird's files."""
        return self.plan.labdir

    @property
    def ns(self) -> dict[str, str]:
        """Node -> its namespace."""
        return self.plan.namespaces

    # --- addresses -------------------------------------------------------------------

    def ifname(self, node: str, link: str) -> str:
        """The name of ``node``'s interface on ``link``."""
        return self.plan.iface(node, link).name

    def addr(self, node: str, link: str) -> IPv6Address:
        for a in self.topo.link(link).endpoints:
            if a.node == node:
                return a.addresses[0]
        raise LabError(f"{node} is not on link {link}", "fix the topology")

    def nsx(self, node: str, *argv: str, stdin: str | None = None) -> str:
        return _run(["ip", "netns", "exec", self.ns[node], *argv], stdin=stdin)

    # --- routes as the routers see them -----------------------------------------------

    def nexthops(self, node: str) -> set[str]:
        out = self.nsx(node, "ip", "-6", "route", "show", f"{self.vip}/128")
        return set(re.findall(r"via (\S+)", out))

    def site_of_lan(self, link: str) -> Site:
        return next(s for s in self.sites if s.lan == link)

    def lb_hops(self, site: Site) -> set[str]:
        """The addresses the site router routes the VIP to: each instance's on the LAN."""
        return {str(self.addr(lb, site.lan)) for lb in site.lbs}

    def via_site(self) -> str | None:
        """The site the upstream sends the VIP to now (None: no route)."""
        hops = self.nexthops(self.upstream)
        for s in self.sites:
            if s.direct and hops & self.lb_hops(s):
                return s.name
            if s.uplink is not None and str(self.addr(s.router, s.uplink)) in hops:
                return s.name
        return None

    def learnt(self, router: str, lb: str) -> bool:
        """``router``'s bird has the VIP from ``lb`` (best route or not)."""
        try:
            out = self.birds[router].birdc(
                "show", "route", f"{self.vip}/128", "protocol", _proto(lb)
            )
        except BirdError:
            return False
        return f"{self.vip}/128" in out

    def steady(self) -> bool:
        """Upstream via the primary site; every site router via all its instances.

        A site whose LBs peer with the upstream directly (not the primary) is steady
        when the upstream has learnt the VIP from each of them.
        """
        if self.via_site() != self.sites[0].name:
            return False
        for s in self.sites:
            if s.direct and s is not self.sites[0]:
                if not all(self.learnt(s.router, lb) for lb in s.lbs):
                    return False
            elif self.nexthops(s.router) != self.lb_hops(s):
                return False
        return True

    def wait(self, what: str, fn: Callable[[], bool], timeout: float, step: float = 0.01) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if fn():
                return time.monotonic() - t0
            time.sleep(step)
        raise LabError(f"timed out after {timeout} s waiting for {what}", self.diagnose())

    def diagnose(self) -> str:
        out = []
        for name, b in self.birds.items():
            try:
                protos = b.protocols()
                out.append(f"{name}: " + ", ".join(f"{p.name} {p.info}" for p in protos.values()))
            except BirdError as exc:
                out.append(f"{name}: {exc}")
        for name, p in self.lbs.items():
            if p.poll() is not None:
                out.append(f"{name}: v6lb run exited {p.returncode}: {self.lb_log(name)}")
        return "; ".join(out)

    def lb_log(self, node: str, n: int = 5) -> str:
        try:
            lines = (self.work / f"{node}.log").read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-n:])

    # --- processes -------------------------------------------------------------------

    def start_lb(self, node: str) -> None:
        log = (self.work / f"{node}.log").open("a")
        argv = [_v6lb(), "run", str(self.files[node]), "--netns", self.ns[node]]
        self.lbs[node] = subprocess.Popen(
            [*argv, "--instance", node, "--dataplane", self.dataplane],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            text=True,
            start_new_session=True,  # its own process group: v6lb and its bird
        )
        log.close()
        if self.dataplane != "kernel":
            self._start_speaker(node)

    def _start_speaker(self, node: str) -> None:
        """Only the kernel plane runs a BGP speaker (docs/anycast.md): for another plane the
        lab runs one in the instance's namespace. It announces the VIP once the instance
        answers on its control socket (installed) with a backend up, until :meth:`stop_lb`."""

        def serving() -> bool:
            if self.lbs[node].poll() is not None:
                raise LabError(f"{node}: v6lb run exited: {self.lb_log(node)}", "see its log")
            try:
                st = query(str(self.plan.socket(node)), timeout=2)
            except ControlError:
                return False
            return any(b.get("health") == "up" for v in st["vips"] for b in v["backends"])

        self.wait(f"{node} to serve with a backend up", serving, 30, 0.05)
        speaker = load_config(self.files[node]).bgp_speaker
        assert speaker is not None  # _write_instance_files gave it one
        conf = render_speaker(node, speaker, [SpeakerRoute(IPv6Network(f"{self.vip}/128"))])
        self.birds[node] = start_bird(_proto(node), conf, self.work, netns=self.ns[node])

    def start_server(self, node: str) -> None:
        addr = str(self.backend_addr[node])
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[node], sys.executable, "-m", GREET_SERVER]
            + [addr, str(PORT)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.servers[node] = p
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise LabError(f"the test server on {node} did not start", "see its output")

    def kill_server(self, node: str) -> None:
        p = self.servers.pop(node)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)

    def stop_lb(self, node: str, sig: int = signal.SIGTERM) -> None:
        if self.dataplane != "kernel" and node in self.birds:
            self.birds.pop(node).kill(sig)
        p = self.lbs.pop(node, None)
        if p is None or p.poll() is not None:
            return
        if sig == signal.SIGKILL:
            os.killpg(p.pid, signal.SIGKILL)
        else:
            p.send_signal(sig)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    # --- which instance carried which flow ----------------------------------------------

    def reset_carriers(self) -> None:
        for s in self.sites:
            for lb in s.lbs:
                self.nsx(lb, "nft", "flush", "set", "ip6", "v6lbfo", "ports")

    def carriers(self) -> dict[int, str]:
        """Client source port -> the LB instance that received its packets since the reset.

        A port seen by two instances (the flow moved) maps to the last one listed, in
        site order; :meth:`carriers_all` gives every instance.
        """
        return {p: lbs[-1] for p, lbs in self.carriers_all().items()}

    def carriers_all(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for s in self.sites:
            for lb in s.lbs:
                try:
                    text = self.nsx(lb, "nft", "-j", "list", "set", "ip6", "v6lbfo", "ports")
                except LabError:
                    continue  # the namespace's table is gone with a dead instance? keep going
                for item in json.loads(text)["nftables"]:
                    if "set" in item:
                        for e in item["set"].get("elem", []):
                            port = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
                            out.setdefault(int(port), []).append(lb)
        return out


def _v6lb() -> str:
    here = Path(sys.executable).parent / "v6lb"
    return str(here) if here.exists() else (shutil.which("v6lb") or "v6lb")


@dataclass
class _Layout:
    client: str
    upstream: str
    sites: list[Site]  # primary (lowest cost) first
    vip: Vip
    speaker: BgpSettings
    asn_site: int
    backend_addr: dict[str, IPv6Address]
    backend_link: dict[str, str | None]


def _lab_vip(config: Config, topo: Topology) -> Vip:
    """The VIP the lab measures: the first dsr-* or nat one, an announced (anycast) one first."""
    vips = [v for v in config.vips if v.mode.is_dsr or v.mode is VipMode.NAT]
    announced = [v for v in vips if any(v.address in a.prefix for a in topo.announcements)]
    if not vips:
        raise LabError("the file has no dsr-* or nat VIP", "add one to vips:")
    return (announced or vips)[0]


def _layout(config: Config, topo: Topology) -> _Layout:
    clients = [n.name for n in topo.nodes if n.role == "client"]
    if not clients:
        raise LabError("the topology has no client", "give one node `role: client`")
    client = clients[0]
    routers = {n.name for n in topo.nodes if n.type is NodeType.ROUTER}

    def neighbours(node: str, *, outside: bool = False) -> dict[str, str]:  # node -> link
        """The nodes sharing a link with ``node`` (``outside``: not over its inside links)."""
        out = {}
        for lk in topo.links:
            if node in lk.nodes() and not (outside and topo.is_inside(node, lk.name)):
                for other in lk.nodes():
                    if other != node:
                        out[other] = lk.name
        return out

    ups = [r for r in neighbours(client) if r in routers]
    if not ups:
        raise LabError(f"{client} shares no link with a router", "link it to the upstream router")
    upstream = ups[0]
    costs: dict[str, int] = {}
    for a in topo.announcements:
        costs[a.site] = min(costs.get(a.site, a.cost), a.cost)
    sites: dict[str, Site] = {}
    for lb in topo.lbs():
        if lb.site is None:
            raise LabError(f"LB node {lb.name} has no site", f"add `site:` to {lb.name}")
        # the site router: the one router on the LB's outside links (inside ones lead to
        # its backends); it may be the upstream itself, the LB then peers with it directly
        rts = {r: lk for r, lk in neighbours(lb.name, outside=True).items() if r in routers}
        if len(rts) != 1:
            raise LabError(
                f"LB node {lb.name} must share a link with exactly one site router, not"
                f" {sorted(rts)} (links in its `inside:` do not count)",
                "put each site's LBs on one LAN with their site router (or the upstream), and"
                " list the links towards the backends in the LB node's `inside:`",
            )
        router, lan = next(iter(rts.items()))
        up = None if router == upstream else neighbours(router).get(upstream)
        if router != upstream and up is None:
            raise LabError(f"site router {router} has no link to {upstream}", "add an uplink")
        s = sites.setdefault(
            lb.site, Site(lb.site, costs.get(lb.site, 100), router, lan, up, [], [])
        )
        if s.router != router:
            raise LabError(f"site {lb.site} has two routers", "one site router per site")
        s.lbs.append(lb.name)
    vip = _lab_vip(config, topo)
    backend_addr: dict[str, IPv6Address] = {}
    backend_link: dict[str, str | None] = {}
    for s in sites.values():
        s.backends = [
            n
            for n in topo.link(s.lan).nodes()
            if topo.node(n).type is NodeType.BACKEND or topo.node(n).role in ("backend", "pod")
        ]
        for n in s.backends:
            backend_addr[n], backend_link[n] = _addr_on(topo, n, s.lan), s.lan
    # the VIP's backends on no site LAN: every site's LBs reach them by the topology's routes
    lans = [topo.link(s.lan).subnet for s in sites.values()]
    shared = []
    for b in vip.backends:
        if any(b.address in lan for lan in lans):
            continue
        owner = topo.owner(b.address)
        if owner is None:
            raise LabError(
                f"backend {b.address} of VIP {vip.name} is on no node of the topology",
                "give a node that address (a link endpoint or its `loopback:`)",
            )
        shared.append(owner)
        backend_addr[owner], backend_link[owner] = b.address, None
    for s in sites.values():
        s.backends += shared
    ordered = sorted(sites.values(), key=lambda s: (s.cost, s.name))
    if len(ordered) < 2 or len(ordered[0].lbs) < 2:
        raise LabError(
            "the failover lab needs two sites and at least two LB instances at the primary",
            "see examples/anycast-sites.yaml",
        )
    speaker = config.bgp_speaker
    if speaker is None:  # announcements only: the lab's own speaker settings
        speaker = BgpSettings(LB_ASN, None, 3, 1, BfdSettings(True, 0.1, 3))
    asn_site = speaker.neighbours[0].asn if speaker.neighbours else SITE_ASN
    return _Layout(client, upstream, ordered, vip, speaker, asn_site, backend_addr, backend_link)


def _addr_on(topo: Topology, node: str, link: str) -> IPv6Address:
    return next(a.addresses[0] for a in topo.link(link).endpoints if a.node == node)


def _write_instance_files(lab: Lab) -> None:
    """Each instance's and each backend's file (``dataclasses.replace``, then ``dump``).

    An instance's copy: ``lb`` with its own address, interface, instance name and
    control socket; ``bgp`` with its site router as the only neighbour and the site's
    cost as ``med`` (no announcements: the routers' policy is this module's); ``vips``:
    the announced ones (all when none is), with the backends on its own site LAN and
    those on no site LAN (shared by the sites, reached by the topology's routes). A
    tunnel source that is not the instance's own becomes its own address on the same
    link (lb-a2's for lb-a1's), else on its first inside link, else on its site LAN.
    A site's backend file has those VIPs and its instances' addresses (the
    decapsulation filter accepts them); the shared backends' file has every instance's.
    """
    config, topo = lab.config, lab.topo
    announced = [v for v in config.vips if any(v.address in a.prefix for a in topo.announcements)]
    lans = [topo.link(s.lan).subnet for s in lab.sites]

    def shared(address: IPv6Address) -> bool:
        return not any(address in lan for lan in lans)

    firsts: list[list[Vip]] = []  # each site's VIPs, as its first instance has them
    all_addrs: list[IPv6Address] = []
    for s in lab.sites:
        lan = topo.link(s.lan).subnet
        vips = [
            replace(
                v, backends=tuple(b for b in v.backends if b.address in lan or shared(b.address))
            )
            for v in (announced or config.vips)
        ]
        addrs: list[IPv6Address] = []
        for lb in s.lbs:
            ifname = lab.ifname(lb, s.lan)
            own = lab.addr(lb, s.lan)
            router_asn = UPSTREAM_ASN if s.direct else lab.asn_site
            base = (
                lab.speaker.neighbours[0] if lab.speaker.neighbours else Neighbour("site", own, 0)
            )
            n0 = replace(base, address=lab.addr(s.router, s.lan), asn=router_asn, interface=ifname)
            mine = [_tunnel_source(v, lab, lb, s.lan) for v in vips]
            sources = [
                v.options.tunnel_source for v in mine if isinstance(v.options, TunnelOptions)
            ]
            addresses = list(dict.fromkeys([own, *sources]))
            addrs += addresses
            derived = derive_node_config(
                config,
                instance=lb,
                addresses=addresses,
                interfaces=[ifname],
                control_socket=str(lab.plan.socket(lb)),
                vips=mine,
                bgp=BgpSection(replace(lab.speaker, med=s.cost, neighbours=(n0,))),
            )
            lab.files[lb] = lab.work / f"{lb}.yaml"
            lab.files[lb].write_text(dump(derived))
        first = [_tunnel_source(v, lab, s.lbs[0], s.lan) for v in vips]
        firsts.append(first)
        all_addrs += addrs
        local = [
            replace(v, backends=tuple(b for b in v.backends if b.address in lan)) for v in first
        ]
        _backend_file(lab, f"backends-{s.name}", f"be{s.name[:8]}", addrs, local)
    together = [
        replace(v, backends=tuple(b for b in v.backends if shared(b.address))) for v in firsts[0]
    ]
    _backend_file(lab, "backends-shared", "beshared", all_addrs, together)


def _backend_file(
    lab: Lab, key: str, instance: str, addrs: Sequence[IPv6Address], vips: Sequence[Vip]
) -> None:
    vips = [v for v in vips if v.backends]
    if not vips:
        return  # no backend of this kind
    backends = derive_node_config(
        lab.config,
        instance=instance,
        addresses=list(dict.fromkeys(addrs)),
        interfaces=lab.config.lb.interfaces,
        control_socket=lab.config.lb.control_socket,
        vips=vips,
    )
    path = lab.work / f"{key}.yaml"
    path.write_text(dump(backends))
    lab.files[key] = path


def _tunnel_source(vip: Vip, lab: Lab, lb: str, lan: str) -> Vip:
    """``vip`` with a tunnel source ``lb`` owns (see :func:`_write_instance_files`)."""
    o = vip.options
    if not isinstance(o, TunnelOptions):
        return vip
    topo = lab.topo
    mine = topo.attachments(lb)
    if any(o.tunnel_source in a.addresses for a in mine):
        return vip
    same = [a for a in mine if o.tunnel_source in topo.link(a.link).subnet]
    inside = [a for a in mine if topo.is_inside(lb, a.link)]
    at = (same or inside or [a for a in mine if a.link == lan])[0]
    return replace(vip, options=replace(o, tunnel_source=at.addresses[0]))


def _plan(config: Config, topo: Topology, sites: list[Site], name: str | None) -> LabPlan:
    """The lab builder's plan of the network, with what this lab adds to it."""
    name = check_name(name) if name is not None else f"fo{os.getpid()}"
    plan = plan_lab(config, topo, name, root=LAB_ROOT, static_anycast=False)
    for node in plan.namespaces:  # a cut link keeps its addresses when it comes back
        plan.sysctls[node] = [f"net.ipv6.conf.{x}.keep_addr_on_down=1" for x in ("all", "default")]
    # each LB routes its site's segment ids (SRv6) to the backend that owns them
    for s in sites:
        lan = topo.link(s.lan).subnet
        for v in config.vips:
            for b in v.backends:
                if b.sid is not None and b.address in lan:
                    for lb in s.lbs:
                        dev = plan.iface(lb, s.lan).name
                        plan.routes[lb].append(
                            f"{b.sid}/128 via {b.address} dev {dev} proto {ROUTE_PROTO:#x}"
                        )
    return plan


def _load(path: str | Path) -> tuple[Config, Topology, _Layout]:
    try:
        config, topo = load_topology(path)
    except ConfigError as exc:
        raise LabError(str(exc), "fix the file (v6lb check FILE)") from None
    return config, topo, _layout(config, topo)


def runnable(path: str | Path) -> list[str]:
    """The failures of :data:`FAILURES` the lab of ``path`` can run (see :func:`refusal`)."""
    _config, topo, lay = _load(path)
    return [f for f in FAILURES if refusal(topo, lay.sites, lay.client, lay.vip.address, f) is None]


@contextmanager
def build(
    path: str | Path,
    *,
    log: Callable[[str], None] = lambda _m: None,
    dataplane: str = "kernel",
    name: str | None = None,
    failures: Sequence[str] = (),
) -> Iterator[Lab]:
    """Build the lab of ``path``; tear down everything (namespaces, processes) on exit.

    ``name``: the lab's name (``v6lb-NAME-NODE`` namespaces), default ``fo<pid>``.
    ``failures``: those to be run; one the layout cannot run (:func:`refusal`) is
    refused before anything is built.

    ``dataplane``: every LB's ``v6lb run --dataplane`` (``kernel`` or ``python``). The
    python plane runs no BGP speaker, so the lab runs one in each of its LB namespaces
    (:meth:`Lab.start_lb`).
    """
    if dataplane not in ("kernel", "python"):
        raise LabError(f"unknown data plane {dataplane!r}", "use kernel or python")
    for tool in ("bird", "birdc", "nft", "ip"):
        if shutil.which(tool) is None:
            raise LabError(f"`{tool}` is not installed", "apt-get install bird2 nftables iproute2")
    if os.geteuid() != 0:
        raise LabError("the failover lab needs root (network namespaces)", "run it as root")
    config, topo, lay = _load(path)
    for f in failures:
        refused = refusal(topo, lay.sites, lay.client, lay.vip.address, f)
        if refused is not None:
            raise refused
    plan = _plan(config, topo, lay.sites, name)
    lab = Lab(
        plan,
        lay.client,
        lay.upstream,
        lay.sites,
        lay.vip.address,
        lay.asn_site,
        lay.speaker,
        lay.backend_addr,
        lay.backend_link,
        log=log,
        dataplane=dataplane,
    )
    build_network(plan)
    try:
        for n in topo.nodes:
            if n.type is NodeType.ROUTER:
                set_l4_ecmp_hash(lab.ns[n.name])
        for s in lab.sites:
            for lb in s.lbs:
                lab.nsx(lb, "nft", "-f", "-", stdin=_meter(lab.vip))
        _write_instance_files(lab)
        _start(lab)
        yield lab
    finally:
        for lb in list(lab.lbs):
            lab.stop_lb(lb, signal.SIGKILL)
        for node in list(lab.servers):
            lab.kill_server(node)
        for b in lab.birds.values():
            b.kill()
        lab_down(plan.name, root=LAB_ROOT, log=io.StringIO())


def _meter(vip: IPv6Address) -> str:
    return (
        "table ip6 v6lbfo {\n"
        "  set ports { type inet_service; flags dynamic; }\n"
        "  chain pre { type filter hook prerouting priority -450;\n"
        f"    ip6 daddr {vip} tcp dport {PORT} add @ports {{ tcp sport }}\n"
        "  }\n}\n"
    )


def _start(lab: Lab) -> None:
    bgp = lab.speaker
    # the upstream peers with each site router, and with the LBs of a site it routes itself.
    # A direct LB's AS path is one AS shorter than a site router's, so where the two kinds
    # meet, the upstream ranks the sites by cost with local_pref (MED comes after AS path)
    mixed = any(s.direct for s in lab.sites) and not all(s.direct for s in lab.sites)
    costs = sorted({s.cost for s in lab.sites})
    ups = []
    for s in lab.sites:
        pref = 100 + len(costs) - costs.index(s.cost) if mixed else None
        if s.direct:
            for lb in s.lbs:
                ifname = lab.ifname(lab.upstream, s.lan)
                ups.append(Neighbour(_proto(lb), lab.addr(lb, s.lan), bgp.asn, ifname, pref))
            continue
        assert s.uplink is not None
        ifname = lab.ifname(lab.upstream, s.uplink)
        ups.append(
            Neighbour(_proto(s.router), lab.addr(s.router, s.uplink), lab.asn_site, ifname, pref)
        )
    up_settings = BgpSettings(
        UPSTREAM_ASN, None, bgp.hold, bgp.keepalive, bgp.bfd, None, tuple(ups)
    )
    lab.birds[lab.upstream] = start_bird(
        _proto(lab.upstream),
        render_router(lab.upstream, up_settings),
        lab.work,
        netns=lab.ns[lab.upstream],
    )
    for s in lab.sites:
        if s.uplink is None:
            continue
        lan, uplink = lab.ifname(s.router, s.lan), lab.ifname(s.router, s.uplink)
        peers = [Neighbour(_proto(lb), lab.addr(lb, s.lan), bgp.asn, lan) for lb in s.lbs]
        peers.append(Neighbour("upstream", lab.addr(lab.upstream, s.uplink), UPSTREAM_ASN, uplink))
        st = BgpSettings(lab.asn_site, None, bgp.hold, bgp.keepalive, bgp.bfd, None, tuple(peers))
        conf = render_router(s.router, st, uplinks=["upstream"], uplink_med=s.cost)
        lab.birds[s.router] = start_bird(_proto(s.router), conf, lab.work, netns=lab.ns[s.router])
    for be in dict.fromkeys(b for s in lab.sites for b in s.backends):
        link = lab.backend_link[be]
        key = "backends-shared" if link is None else f"backends-{lab.site_of_lan(link).name}"
        argv = [_v6lb(), "backend", str(lab.files[key]), "--address", str(lab.backend_addr[be])]
        if link is not None:  # else `v6lb backend` finds it (the default route's)
            argv += ["--dev", lab.ifname(be, link)]
        _run([*argv, "--netns", lab.ns[be]])
        lab.start_server(be)
    for s in lab.sites:
        for lb in s.lbs:
            lab.start_lb(lb)
    lab.wait("every site announced and the upstream via the primary", lab.steady, 30, 0.05)


# --- measuring one failure -----------------------------------------------------------


@dataclass
class Figures:
    failure: str
    target: str  # what failed (an instance, a site)
    route_s: float | None  # until the router that had to change did
    recovery_s: float | None  # until new connections succeed again (and keep succeeding)
    new_during: int
    new_failed_or_slow: int
    slowest_new_s: float
    flows: int
    flows_survived: int
    flows_backend_alive: int  # flows whose backend was still alive
    flows_backend_alive_survived: int
    flows_reset: int
    flows_closed: int  # closed by the backend (its server died: FIN)
    flows_timed_out: int
    flow_max_stall_s: float
    flows_moved: int  # surviving flows carried by another instance after the failure
    errors: list[str]
    carriers_before: dict[str, int]  # instance -> flows it carried before
    carriers_after: dict[str, int]  # instance -> flows (long-lived and new) after
    per_flow: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def refusal(
    topo: Topology, sites: Sequence[Site], client: str, vip: IPv6Address, failure: str
) -> LabError | None:
    """Why ``failure`` cannot move traffic to a working backup site on this layout (None: it can).

    ``site-backends-die`` needs backends of the primary's own: where the sites share
    them, killing them leaves the backup nothing to send to. ``site-uplink-down`` needs a
    site uplink, and a backup whose backends do not answer clients through it (their
    replies, from the VIP, routed by the topology's static routes).
    """
    primary, backup = sites[0], sites[1]
    instead = "use site-lbs-die (every primary instance dies) or lb-instance-dies"
    if failure == "site-backends-die":
        both = [b for b in primary.backends if b in backup.backends]
        if both:
            return LabError(
                f"site-backends-die cannot run here: the sites share their backends"
                f" ({', '.join(both)}), so with them dead the backup site has none either",
                instead,
            )
    if failure == "site-uplink-down":
        if primary.uplink is None:
            return LabError(
                f"site-uplink-down cannot run here: the primary site's LBs peer with"
                f" {primary.router} directly, there is no site uplink to cut",
                instead,
            )
        dst = topo.addresses(client)[0]
        for be in backup.backends:
            if primary.uplink in _reply_links(topo, be, dst, vip):
                return LabError(
                    f"site-uplink-down cannot run here: the backup site's backend {be} answers"
                    f" clients (from the VIP) through {primary.router}'s uplink"
                    f" {primary.uplink}, so cutting it cuts the backup's replies too",
                    instead,
                )
    return None


def _reply_links(topo: Topology, start: str, dst: IPv6Address, src: IPv6Address) -> set[str]:
    """The links packets from ``src`` at ``start`` to ``dst`` cross (static routes, all ECMP paths)."""
    fibs = compute_fib(topo)
    links: set[str] = set()
    seen: set[str] = set()
    todo = [start]
    while todo:
        n = todo.pop()
        if n in seen or topo.owner(dst) == n:
            continue
        seen.add(n)
        entry = lookup(fibs[n], dst, src)
        for nh in entry.nexthops if entry is not None else ():
            links.add(nh.link)
            nxt = neighbour(topo, nh, dst)
            if nxt is not None:
                todo.append(nxt)
    return links


def _failure_action(
    lab: Lab, failure: str
) -> tuple[str, Callable[[], None], Callable[[], bool], set[str]]:
    primary = lab.sites[0]
    if failure == "none":
        return "nothing", lambda: None, lambda: True, set()
    if failure == "lb-instance-dies":
        lb = primary.lbs[0]
        rest = {str(lab.addr(x, primary.lan)) for x in primary.lbs[1:]}

        def kill() -> None:
            p = lab.lbs[lb]
            os.killpg(p.pid, signal.SIGKILL)

        return lb, kill, lambda: lab.nexthops(primary.router) == rest, set()
    refused = refusal(lab.topo, lab.sites, lab.client, lab.vip, failure)
    if refused is not None:
        raise refused
    if failure == "site-lbs-die":

        def kill_all() -> None:
            for lb in primary.lbs:
                os.killpg(lab.lbs[lb].pid, signal.SIGKILL)
                if lab.dataplane != "kernel" and lb in lab.birds:  # the lab's speaker for it
                    lab.birds.pop(lb).kill()

        target = f"site {primary.name} ({', '.join(primary.lbs)})"
        return target, kill_all, lambda: lab.via_site() == lab.sites[1].name, set()
    if failure == "site-backends-die":

        def stop_backends() -> None:
            for be in primary.backends:
                p = lab.servers[be]
                os.killpg(p.pid, signal.SIGKILL)

        dead = {str(lab.backend_addr[be]) for be in primary.backends}
        return (
            f"site {primary.name}",
            stop_backends,
            lambda: lab.via_site() == lab.sites[1].name,
            dead,
        )
    if failure == "site-uplink-down":
        assert primary.uplink is not None  # refusal() refused a direct primary
        uplink = lab.ifname(primary.router, primary.uplink)

        def cut() -> None:
            lab.nsx(primary.router, "ip", "link", "set", uplink, "down")

        return f"site {primary.name}", cut, lambda: lab.via_site() == lab.sites[1].name, set()
    raise LabError(f"unknown failure {failure!r}", f"use one of: {', '.join(FAILURES)}")


def measure(
    lab: Lab, failure: str, *, flows: int = 30, before_s: float = 1.5, after_s: float = 3.0
) -> Figures:
    """Run ``failure`` under continuous traffic; the lab is repaired again afterwards."""
    target, act, converged, dead = _failure_action(lab, failure)
    lab.reset_carriers()
    traffic = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns[lab.client], sys.executable, "-m", TRAFFIC]
        + [str(lab.vip), str(PORT), str(flows)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    route_s: float | None = None
    try:
        assert traffic.stdin is not None and traffic.stdout is not None
        opened = json.loads(traffic.stdout.readline())
        time.sleep(before_s)
        before = lab.carriers()
        lab.reset_carriers()
        t_fail = time.monotonic()
        act()
        try:
            route_s = lab.wait(f"the routers to converge after {failure}", converged, 10, 0.005)
        except LabError as exc:
            lab.log(f"{failure}: {exc}")
        time.sleep(after_s)
        traffic.stdin.write("stop\n")
        traffic.stdin.flush()
        out = json.loads(traffic.stdout.readline())
        traffic.wait(timeout=15)
        # read once the traffic has stopped: a connection opened while the instances' sets
        # were being read would be missing from them, or found in some only
        after_all = lab.carriers_all()
    finally:
        if traffic.poll() is None:
            traffic.kill()
            traffic.wait(timeout=10)
    del opened
    fl, news = out["flows"], out["new"]

    def good(n: dict[str, Any]) -> bool:
        return n["err"] is None and n["t1"] - n["t0"] < GOOD_S

    later = [n for n in news if n["t0"] >= t_fail]
    first = next((i for i in range(len(later)) if all(good(n) for n in later[i:])), None)
    recovery = None if first is None else round(later[first]["t1"] - t_fail, 3)
    hit = [n for n in news if n["t1"] >= t_fail]
    survived = [f for f in fl if f["err"] is None and f["wrong"] == 0]
    alive = [f for f in fl if f["backend"] not in dead]
    per_flow = []
    moved = 0
    for f in fl:
        b = before.get(f["sport"])
        a = after_all.get(f["sport"], [])
        ok = f["err"] is None and f["wrong"] == 0
        if ok and b is not None and a and a[-1] != b:
            moved += 1
        per_flow.append(
            {
                "sport": f["sport"],
                "backend": f["backend"],
                "before": b,
                "after": a,
                "outcome": "survived" if ok else (f["err"] or "wrong backend"),
                "max_stall_s": round(f["max_rtt"], 3),
            }
        )
    for n in hit:
        per_flow.append(
            {
                "sport": n["sport"],
                "backend": n["backend"],
                "before": None,
                "after": after_all.get(n["sport"], []) if n["sport"] else [],
                "outcome": "new ok" if good(n) else f"new {n['err'] or 'slow'}",
                "t_s": round(n["t0"] - t_fail, 3),
                "took_s": round(n["t1"] - n["t0"], 3),
            }
        )
    count_before: dict[str, int] = {}
    for f in fl:
        if f["sport"] in before:
            count_before[before[f["sport"]]] = count_before.get(before[f["sport"]], 0) + 1
    count_after: dict[str, int] = {}
    for lbs in after_all.values():
        count_after[lbs[-1]] = count_after.get(lbs[-1], 0) + 1
    return Figures(
        failure=failure,
        target=target,
        route_s=None if route_s is None else round(route_s, 3),
        recovery_s=recovery,
        new_during=len(hit),
        new_failed_or_slow=sum(not good(n) for n in hit),
        slowest_new_s=round(max((n["t1"] - n["t0"] for n in hit), default=0.0), 3),
        flows=len(fl),
        flows_survived=len(survived),
        flows_backend_alive=len(alive),
        flows_backend_alive_survived=sum(1 for f in alive if f in survived),
        flows_reset=sum(1 for f in fl if f["err"] in ("ConnectionResetError", "BrokenPipeError")),
        flows_closed=sum(1 for f in fl if f["err"] == "ConnectionError"),
        flows_timed_out=sum(1 for f in fl if f["err"] in ("TimeoutError", "timeout")),
        flow_max_stall_s=round(max((f["max_rtt"] for f in fl), default=0.0), 3),
        flows_moved=moved,
        errors=sorted({f["err"] for f in fl if f["err"]} | {n["err"] for n in hit if n["err"]}),
        carriers_before=dict(sorted(count_before.items())),
        carriers_after=dict(sorted(count_after.items())),
        per_flow=per_flow,
    )


def repair(lab: Lab, failure: str, timeout: float = 30) -> float:
    """Undo ``failure`` and wait for the steady state; the seconds that took."""
    primary = lab.sites[0]
    t0 = time.monotonic()
    if failure in ("lb-instance-dies", "site-lbs-die"):
        for lb in primary.lbs[:1] if failure == "lb-instance-dies" else primary.lbs:
            p = lab.lbs.get(lb)
            if p is not None:
                p.wait(timeout=10)
            lab.start_lb(lb)
    elif failure == "site-backends-die":
        for be in primary.backends:
            lab.servers.pop(be, None)
            lab.start_server(be)
    elif failure == "site-uplink-down" and primary.uplink is not None:
        uplink = lab.ifname(primary.router, primary.uplink)
        lab.nsx(primary.router, "ip", "link", "set", uplink, "up")
        restore_routes(lab.plan, primary.router)
    lab.wait(f"the lab to recover from {failure}", lab.steady, timeout, 0.05)
    return round(time.monotonic() - t0, 3)


def format_table(rows: Sequence[Figures]) -> str:
    head = (
        "| failure | what failed | router converged | new conns OK again | new conns failed or slow"
        " | flows surviving (backend alive) | flows reset / closed / timed out | worst stall"
        " | flows moved |"
    )
    out = [head, "|" + "---|" * 9]
    for f in rows:

        def s(x: float | None) -> str:
            return "–" if x is None else f"{x:.3f} s"

        out.append(
            f"| {f.failure} | {f.target} | {s(f.route_s)} | {s(f.recovery_s)} |"
            f" {f.new_failed_or_slow} of {f.new_during} |"
            f" {f.flows_survived}/{f.flows} ({f.flows_backend_alive_survived}/{f.flows_backend_alive}) |"
            f" {f.flows_reset} / {f.flows_closed} / {f.flows_timed_out} | {f.flow_max_stall_s:.3f} s | {f.flows_moved} |"
        )
    return "\n".join(out) + "\n"


def run_failovers(
    path: str | Path,
    failures: Sequence[str],
    *,
    rounds: int = 1,
    flows: int = 30,
    after_s: float = 3.0,
    log: Callable[[str], None] = lambda _m: None,
    name: str | None = None,
) -> list[Figures]:
    """Build the lab once, run each failure ``rounds`` times (repairing in between)."""
    bad = [f for f in failures if f not in FAILURES]
    if bad:
        raise LabError(f"unknown failure {bad[0]!r}", f"use one of: {', '.join(FAILURES)}")
    rows = []
    with build(path, log=log, name=name, failures=failures) as lab:
        for _ in range(rounds):
            for failure in failures:
                fig = measure(lab, failure, flows=flows, after_s=after_s)
                log(json.dumps({k: v for k, v in fig.as_dict().items() if k != "per_flow"}))
                rows.append(fig)
                log(f"{failure}: repaired in {repair(lab, failure)} s")
    return rows


def site_network(lab: Lab) -> dict[str, IPv6Network]:
    return {s.name: lab.topo.link(s.lan).subnet for s in lab.sites}


def lab_failover(
    file: str | Path,
    *,
    failures: Sequence[str] = (),
    rounds: int = 1,
    flows: int = 30,
    after_s: float = 3.0,
    as_json: bool = False,
    name: str | None = None,
) -> int:
    """`v6lb lab failover FILE [--failure F]... [--rounds N]`: print the table (or JSON).

    ``failures`` empty or holding ``all``: every failure of :data:`FAILURES`.
    """
    if rounds < 1 or flows < 1 or after_s <= 0:
        raise LabError("--rounds, --flows and --after must be positive", "for example --rounds 3")
    if name is not None:
        check_name(name)
    wanted = list(failures) or ["all"]
    chosen = list(dict.fromkeys(wanted))
    if "all" in wanted:  # every failure this layout can run (refusal() says why not)
        chosen = runnable(file)
        skipped = [f for f in FAILURES if f not in chosen]
        if skipped:
            sys.stderr.write(
                f"v6lb lab failover: {file} cannot run {', '.join(skipped)} (name one with"
                " --failure to see why); running the others\n"
            )

    def log(msg: str) -> None:
        sys.stderr.write(f"v6lb lab failover: {msg}\n")
        sys.stderr.flush()

    rows = run_failovers(
        file, chosen, rounds=rounds, flows=flows, after_s=after_s, log=log, name=name
    )
    if as_json:
        sys.stdout.write(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
    else:
        sys.stdout.write(format_table(rows))
    return 0
