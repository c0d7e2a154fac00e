"""`v6lb lab failover`: a two-site anycast lab with real BGP, BFD and ECMP, and failures under traffic.

:func:`build` reads a file like examples/anycast-sites.yaml (``vips``, ``lb``, ``bgp``
and a ``topology``) and builds it in network namespaces:

* every topology link is a Linux bridge in a switch namespace; every node gets one
  veth per link, named after the link, with the link's addresses and static routes;
* the router that shares a link with the client is the **upstream** (BIRD, AS 65000);
  each router that shares a link with LB nodes is that **site's router** (BIRD, the AS
  of the LBs' ``bgp.neighbours[0].asn``): it learns the VIP from its site's LBs, installs
  one ECMP route over them (``merge paths``, ``fib_multipath_hash_policy=1``) and passes
  it upstream with the site's ``bgp.announcements`` cost as MED;
* every LB node runs ``v6lb run`` with a derived copy of the file: its own address,
  interface and instance name, its site router as neighbour, the VIP backends on its
  own site LAN, and the site's cost as ``med``. bird is its child (``PR_SET_PDEATHSIG``);
* every backend node runs ``v6lb backend`` (SRv6/IPIP decapsulation) and a TCP server
  that greets each connection with its own address.

Each LB namespace also gets a small nft table (``v6lbfo``) that records the client
source ports of the VIP's packets it receives, so every flow can be attributed to
the instance that carried it (:meth:`Lab.carriers`).

:func:`measure` runs one failure under continuous traffic: ``flows`` long-lived TCP
connections each asking every 100 ms, plus a new connection every 100 ms, from the
client. It records the time until new connections succeed again, the share of
established connections that survive (of all, and of those whose backend is still
alive), what the clients saw (resets, timeouts, the worst stall), and which instance
carried each flow before and after. The failures (:data:`FAILURES`):

``kill-instance``  SIGKILL of one primary instance's process group (v6lb and its bird);
``site-backends``  every backend server of the primary site killed: the site withdraws;
``site-uplink``    the primary site router's uplink set down: only BFD notices upstream.

tests/test_anycast_failover.py and ``v6lb lab failover`` both use this module, so they
measure the same way (docs/anycast.md has the table).
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, Final

import yaml

from v6lb.engines.bird import Bird, BirdError, set_l4_ecmp_hash, start_bird
from v6lb.lab.plan import LabError
from v6lb.model.bgp import BgpSettings, Neighbour
from v6lb.model.config import Config, ConfigError, load_topology
from v6lb.model.config_read import read_yaml
from v6lb.model.topology import NodeType, Topology
from v6lb.render.bird import render_router

__all__ = [
    "FAILURES",
    "UPSTREAM_ASN",
    "Figures",
    "Lab",
    "build",
    "format_table",
    "lab_failover",
    "measure",
    "repair",
    "run_failovers",
]

FAILURES: Final = ("kill-instance", "site-backends", "site-uplink")
UPSTREAM_ASN: Final = 65000
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
    router: str
    lan: str  # the link the site router, its LBs and its backends share
    uplink: str  # the link between the site router and the upstream
    lbs: list[str]
    backends: list[str]


@dataclass
class Lab:
    """A built two-site lab; everything it started is stopped by :func:`build`'s exit."""

    config: Config
    topo: Topology
    work: Path
    ns: dict[str, str]  # node -> namespace
    client: str
    upstream: str
    sites: list[Site]  # primary (lowest cost) first
    vip: IPv6Address
    asn_site: int
    birds: dict[str, Bird] = field(default_factory=dict)
    lbs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    servers: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    log: Callable[[str], None] = lambda _m: None

    # --- addresses -------------------------------------------------------------------

    def addr(self, node: str, link: str) -> IPv6Address:
        for a in self.topo.link(link).endpoints:
            if a.node == node:
                return a.addresses[0]
        raise LabError(f"{node} is not on link {link}", "fix the topology")

    def site_of(self, node: str) -> Site:
        return next(
            s for s in self.sites if node in s.lbs or node in s.backends or node == s.router
        )

    def nsx(self, node: str, *argv: str, stdin: str | None = None) -> str:
        return _run(["ip", "netns", "exec", self.ns[node], *argv], stdin=stdin)

    # --- routes as the routers see them -----------------------------------------------

    def nexthops(self, node: str) -> set[str]:
        out = self.nsx(node, "ip", "-6", "route", "show", f"{self.vip}/128")
        return set(re.findall(r"via (\S+)", out))

    def via_site(self) -> str | None:
        """The site the upstream sends the VIP to now (None: no route)."""
        hops = self.nexthops(self.upstream)
        for s in self.sites:
            if str(self.addr(s.router, s.uplink)) in hops:
                return s.name
        return None

    def steady(self) -> bool:
        """Upstream via the primary site; every site router via all its instances."""
        if self.via_site() != self.sites[0].name:
            return False
        for s in self.sites:
            if self.nexthops(s.router) != {str(self.addr(lb, s.lan)) for lb in s.lbs}:
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
            [*argv, "--instance", node],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            text=True,
            start_new_session=True,  # its own process group: v6lb and its bird
        )
        log.close()

    def start_server(self, node: str) -> None:
        addr = str(self.addr(node, self.site_of(node).lan))
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


def _layout(config: Config, topo: Topology) -> tuple[str, str, list[Site], int]:
    clients = [n.name for n in topo.nodes if n.role == "client"]
    if not clients:
        raise LabError("the topology has no client", "give one node `role: client`")
    client = clients[0]
    routers = {n.name for n in topo.nodes if n.type is NodeType.ROUTER}

    def neighbours(node: str) -> dict[str, str]:  # node -> link
        out = {}
        for lk in topo.links:
            if node in lk.nodes():
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
        rts = {r: lk for r, lk in neighbours(lb.name).items() if r in routers and r != upstream}
        if len(rts) != 1:
            raise LabError(
                f"LB node {lb.name} must share a link with exactly one site router, not {sorted(rts)}",
                "put each site's LBs on one LAN with their site router",
            )
        router, lan = next(iter(rts.items()))
        up = neighbours(router).get(upstream)
        if up is None:
            raise LabError(f"site router {router} has no link to {upstream}", "add an uplink")
        s = sites.setdefault(
            lb.site, Site(lb.site, costs.get(lb.site, 100), router, lan, up, [], [])
        )
        if s.router != router:
            raise LabError(f"site {lb.site} has two routers", "one site router per site")
        s.lbs.append(lb.name)
    for s in sites.values():
        s.backends = [
            n
            for n in topo.link(s.lan).nodes()
            if topo.node(n).type is NodeType.BACKEND or topo.node(n).role in ("backend", "pod")
        ]
    ordered = sorted(sites.values(), key=lambda s: (s.cost, s.name))
    if len(ordered) < 2 or len(ordered[0].lbs) < 2:
        raise LabError(
            "the failover lab needs two sites and at least two LB instances at the primary",
            "see examples/anycast-sites.yaml",
        )
    bgp = config.bgp_speaker
    if bgp is None or not bgp.neighbours:
        raise LabError(
            "the file has no bgp: speaker with a neighbour", "add bgp.asn and neighbours"
        )
    return client, upstream, ordered, bgp.neighbours[0].asn


def _derive(lab: Lab, raw: dict[str, Any]) -> None:
    """Write each instance's and each site's backend file into the work directory."""
    bgp_raw = dict(raw["bgp"])
    bgp_raw.pop("announcements", None)
    for s in lab.sites:
        lan_net = lab.topo.link(s.lan).subnet
        vips = []
        for v in raw["vips"]:
            v = dict(v)
            v["backends"] = [
                b for b in v.get("backends", []) if IPv6Address(str(b["address"])) in lan_net
            ]
            vips.append(v)
        lb_addrs = [str(lab.addr(lb, s.lan)) for lb in s.lbs]
        for lb in s.lbs:
            data = {k: v for k, v in raw.items() if k not in ("topology", "npt")}
            data["vips"] = vips
            data["lb"] = dict(raw["lb"])
            data["lb"].update(
                instance=lb,
                addresses=[str(lab.addr(lb, s.lan))],
                interfaces=[s.lan],
                control_socket=str(lab.work / f"{lb}.sock"),
            )
            b = dict(bgp_raw)
            n0 = dict(raw["bgp"]["neighbours"][0])
            n0.update(address=str(lab.addr(s.router, s.lan)), interface=s.lan)
            b.update(med=s.cost, neighbours=[n0])
            data["bgp"] = b
            path = lab.work / f"{lb}.yaml"
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            lab.files[lb] = path
        be = {k: v for k, v in raw.items() if k not in ("topology", "npt", "bgp")}
        be["vips"] = vips
        be["lb"] = dict(raw["lb"], addresses=lb_addrs, instance=f"be{s.name[:8]}")
        path = lab.work / f"backends-{s.name}.yaml"
        path.write_text(yaml.safe_dump(be, sort_keys=False))
        lab.files[f"backends-{s.name}"] = path


@contextmanager
def build(path: str | Path, *, log: Callable[[str], None] = lambda _m: None) -> Iterator[Lab]:
    """Build the lab of ``path``; tear down everything (namespaces, processes) on exit."""
    for tool in ("bird", "birdc", "nft", "ip"):
        if shutil.which(tool) is None:
            raise LabError(f"`{tool}` is not installed", "apt-get install bird2 nftables iproute2")
    if os.geteuid() != 0:
        raise LabError("the failover lab needs root (network namespaces)", "run it as root")
    try:
        config, topo = load_topology(path)
        raw = read_yaml(path)  # the raw sections, read within the same limits
    except ConfigError as exc:
        raise LabError(str(exc), "fix the file (v6lb check FILE)") from None
    client, upstream, sites, asn_site = _layout(config, topo)
    vip = next((v.address for v in config.vips if v.mode.value.startswith(("dsr", "nat"))), None)
    if vip is None:
        raise LabError("the file has no dsr-* or nat VIP", "add one to vips:")
    tag = f"v6lb-fo-{os.getpid()}"
    work = Path(f"/tmp/{tag}")
    work.mkdir(exist_ok=True)
    ns = {n.name: f"{tag}-{i}" for i, n in enumerate(topo.nodes)}
    lab = Lab(config, topo, work, ns, client, upstream, sites, vip, asn_site, log=log)
    made: list[str] = []
    try:
        for name in [*ns.values(), f"{tag}-sw"]:
            _run(["ip", "netns", "add", name])
            made.append(name)
            _run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
            for scope in ("all", "default"):  # a cut link keeps its addresses when it comes back
                _run(
                    ["ip", "netns", "exec", name, "sysctl", "-qw"]
                    + [f"net.ipv6.conf.{scope}.keep_addr_on_down=1"]
                )
        _wire(lab, f"{tag}-sw")
        _derive(lab, raw)
        _start(lab)
        yield lab
    finally:
        for lb in list(lab.lbs):
            lab.stop_lb(lb, signal.SIGKILL)
        for node in list(lab.servers):
            lab.kill_server(node)
        for b in lab.birds.values():
            b.kill()
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def _wire(lab: Lab, sw: str) -> None:
    topo = lab.topo
    for i, lk in enumerate(topo.links):
        br = f"b{i}"
        _run(["ip", "netns", "exec", sw, "ip", "link", "add", br, "type", "bridge"])
        _run(
            ["ip", "netns", "exec", sw, "ip", "link", "set", br, "type", "bridge", "stp_state", "0"]
        )
        _run(["ip", "netns", "exec", sw, "ip", "link", "set", br, "up"])
        for k, a in enumerate(lk.endpoints):
            port = f"p{i}-{k}"
            _run(
                ["ip", "link", "add", lk.name[:15], "netns", lab.ns[a.node], "type", "veth"]
                + ["peer", "name", port, "netns", sw]
            )
            _run(["ip", "netns", "exec", sw, "ip", "link", "set", port, "master", br, "up"])
            lines = [f"link set {lk.name[:15]} up"]
            lines += [
                f"address add {x}/{lk.subnet.prefixlen} dev {lk.name[:15]} nodad"
                for x in a.addresses
            ]
            lab.nsx(a.node, "ip", "-6", "-batch", "-", stdin="\n".join(lines) + "\n")
    for n in topo.nodes:
        if n.type in (NodeType.ROUTER, NodeType.LB):
            lab.nsx(n.name, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        if n.type is NodeType.ROUTER:
            set_l4_ecmp_hash(lab.ns[n.name])
        _static_routes(lab, n.name)
    # each LB routes its site's segment ids (SRv6) to the backend that owns them
    for s in lab.sites:
        lan = topo.link(s.lan).subnet
        for v in lab.config.vips:
            for b in v.backends:
                sid = getattr(b, "sid", None)
                if sid is not None and b.address in lan:
                    for lb in s.lbs:
                        lab.nsx(
                            lb, "ip", "-6", "route", "replace", f"{sid}/128", "via", str(b.address)
                        )
        for lb in s.lbs:
            lab.nsx(lb, "nft", "-f", "-", stdin=_meter(lab.vip))


def _static_routes(lab: Lab, node: str) -> None:
    """The node's static routes (again: the kernel drops them with a link that goes down)."""
    lines = []
    for r in lab.topo.node(node).routes:
        if r.via is None:
            continue
        src = f" from {r.source}" if r.source is not None else ""
        lines.append(f"route replace {r.prefix}{src} via {r.via}")
    if lines:
        lab.nsx(node, "ip", "-6", "-batch", "-", stdin="\n".join(lines) + "\n")


def _meter(vip: IPv6Address) -> str:
    return (
        "table ip6 v6lbfo {\n"
        "  set ports { type inet_service; flags dynamic; }\n"
        "  chain pre { type filter hook prerouting priority -450;\n"
        f"    ip6 daddr {vip} tcp dport {PORT} add @ports {{ tcp sport }}\n"
        "  }\n}\n"
    )


def _start(lab: Lab) -> None:
    bgp = lab.config.bgp_speaker
    assert bgp is not None
    ups = []
    for s in lab.sites:
        ups.append(
            Neighbour(_proto(s.router), lab.addr(s.router, s.uplink), lab.asn_site, s.uplink[:15])
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
        peers = [Neighbour(_proto(lb), lab.addr(lb, s.lan), bgp.asn, s.lan[:15]) for lb in s.lbs]
        peers.append(
            Neighbour("upstream", lab.addr(lab.upstream, s.uplink), UPSTREAM_ASN, s.uplink[:15])
        )
        st = BgpSettings(lab.asn_site, None, bgp.hold, bgp.keepalive, bgp.bfd, None, tuple(peers))
        conf = render_router(s.router, st, uplinks=["upstream"], uplink_med=s.cost)
        lab.birds[s.router] = start_bird(_proto(s.router), conf, lab.work, netns=lab.ns[s.router])
        for be in s.backends:
            addr = str(lab.addr(be, s.lan))
            _run(
                [_v6lb(), "backend", str(lab.files[f"backends-{s.name}"]), "--address", addr]
                + ["--dev", s.lan[:15], "--netns", lab.ns[be]]
            )
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


def _failure_action(
    lab: Lab, failure: str
) -> tuple[str, Callable[[], None], Callable[[], bool], set[str]]:
    primary = lab.sites[0]
    if failure == "none":
        return "nothing", lambda: None, lambda: True, set()
    if failure == "kill-instance":
        lb = primary.lbs[0]
        rest = {str(lab.addr(x, primary.lan)) for x in primary.lbs[1:]}

        def kill() -> None:
            p = lab.lbs[lb]
            os.killpg(p.pid, signal.SIGKILL)

        return lb, kill, lambda: lab.nexthops(primary.router) == rest, set()
    if failure == "site-backends":

        def stop_backends() -> None:
            for be in primary.backends:
                p = lab.servers[be]
                os.killpg(p.pid, signal.SIGKILL)

        dead = {str(lab.addr(be, primary.lan)) for be in primary.backends}
        return (
            f"site {primary.name}",
            stop_backends,
            lambda: lab.via_site() == lab.sites[1].name,
            dead,
        )
    if failure == "site-uplink":

        def cut() -> None:
            lab.nsx(primary.router, "ip", "link", "set", primary.uplink[:15], "down")

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
        after_all = lab.carriers_all()
        traffic.stdin.write("stop\n")
        traffic.stdin.flush()
        out = json.loads(traffic.stdout.readline())
        traffic.wait(timeout=15)
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
    if failure == "kill-instance":
        lb = primary.lbs[0]
        p = lab.lbs.get(lb)
        if p is not None:
            p.wait(timeout=10)
        lab.start_lb(lb)
    elif failure == "site-backends":
        for be in primary.backends:
            lab.servers.pop(be, None)
            lab.start_server(be)
    elif failure == "site-uplink":
        lab.nsx(primary.router, "ip", "link", "set", primary.uplink[:15], "up")
        _static_routes(lab, primary.router)
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
) -> list[Figures]:
    """Build the lab once, run each failure ``rounds`` times (repairing in between)."""
    bad = [f for f in failures if f not in FAILURES]
    if bad:
        raise LabError(f"unknown failure {bad[0]!r}", f"use one of: {', '.join(FAILURES)}")
    rows = []
    with build(path, log=log) as lab:
        for _ in range(rounds):
            for failure in failures:
                fig = measure(lab, failure, flows=flows, after_s=after_s)
                log(json.dumps({k: v for k, v in fig.as_dict().items() if k != "per_flow"}))
                rows.append(fig)
                log(f"{failure}: repaired in {repair(lab, failure)} s")
    return rows


def site_network(lab: Lab) -> dict[str, IPv6Network]:
    return {s.name: lab.topo.link(s.lan).subnet for s in lab.sites}


def lab_failover(args: Any) -> int:
    """`v6lb lab failover FILE [--failure F]... [--rounds N]`: print the table (or JSON)."""
    wanted: list[str] = args.failure or ["all"]
    failures = list(FAILURES) if "all" in wanted else list(dict.fromkeys(wanted))
    if args.rounds < 1 or args.flows < 1 or args.after <= 0:
        raise LabError("--rounds, --flows and --after must be positive", "for example --rounds 3")

    def log(msg: str) -> None:
        sys.stderr.write(f"v6lb lab failover: {msg}\n")
        sys.stderr.flush()

    rows = run_failovers(
        args.file, failures, rounds=args.rounds, flows=args.flows, after_s=args.after, log=log
    )
    if args.json:
        sys.stdout.write(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
    else:
        sys.stdout.write(format_table(rows))
    return 0
