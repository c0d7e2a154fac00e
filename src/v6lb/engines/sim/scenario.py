"""The public entry: run one mode's scenario on a topology and report every hop and the facts.

:func:`run_scenario` builds the simulated network from the config and topology,
lets a client talk HTTP to the mode's VIP (or, for ``npt``, to one of the
backends' mapped addresses, as DNS would hand out), and returns every packet
on every link (:class:`~v6lb.model.hops.Hop`), one pcap per link, and the
facts the explanation answers from. Failures (``failure=``) are played out by
the same machinery: nodes go down, routing is recomputed from what is left,
TCP retransmits, the client retries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from v6lb.core.backends import BackendPool
from v6lb.engines.sim.apps import HttpClient, HttpServer, RequestSeen
from v6lb.engines.sim.backend import NPT_PORT, setup_backend
from v6lb.engines.sim.clock import Clock
from v6lb.engines.sim.lb import LbNode
from v6lb.engines.sim.network import Network
from v6lb.engines.sim.node import SimNode, ecmp_index, mac_of
from v6lb.engines.sim.pmtu import CANNOT_WORK, engine_notes, narrow_link, reply_route
from v6lb.engines.sim.router import RouterNode
from v6lb.model.config import Config, TunnelOptions, Vip, VipMode
from v6lb.model.hops import Hop
from v6lb.model.modes import NAMES, Kind, modes_where
from v6lb.model.modes import facts as mode_facts
from v6lb.model.topology import NodeType, Topology, compute_fib, lookup, neighbour
from v6lb.wire import build
from v6lb.wire.constants import TCP_SYN

__all__ = [
    "FAILURES",
    "MODES",
    "ScenarioResult",
    "Sim",
    "modes_available",
    "run_scenario",
    "seed_for_client_port",
]

MODES: Final = NAMES  # every mode name, from the mode table
FAILURES: Final = (None, "backend-dies", "lb-instance-dies", "packet-too-big")
CONVERGENCE: Final = 0.05  # seconds from a node failing to routes recomputed (BFD + SPF)
_TIME_LIMIT: Final = 30.0
_LANES: Final = {
    "client": "client",
    "host": "client",
    "gateway": "router",
    "router": "router",
    "lb": "lb",
    "node": "node",
    "pod": "pod",
    "backend": "pod",
    "server": "pod",
}


@dataclass
class ScenarioResult:
    mode: str
    hops: list[Hop]
    pcaps: dict[str, bytes]
    facts: dict[str, object]
    nodes: dict[str, str] = field(default_factory=dict)


def _a(b: bytes) -> str:
    return str(ipaddress.IPv6Address(b))


def _anycast_prefixes(config: Config) -> list[ipaddress.IPv6Network]:
    return [a.prefix for a in config.bgp.announcements] if config.bgp is not None else []


def _anycast_vip(config: Config) -> Vip | None:
    nets = _anycast_prefixes(config)
    return next((v for v in config.vips if any(v.address in n for n in nets)), None)


def modes_available(config: Config) -> list[str]:
    """The modes this config can show: a VIP of the mode, ``npt:`` pairs, a VIP under bgp."""
    have = {str(v.mode) for v in config.vips}
    if config.npt:
        have.add("npt")
    if _anycast_vip(config) is not None:
        have.add("anycast")
    return [m for m in MODES if m in have]


# --- the simulated network -----------------------------------------------------------


class Sim:
    """Nodes built from the topology, backends from the config, routes from both."""

    def __init__(self, config: Config, topology: Topology, seed: int = 1) -> None:
        self.config = config
        self.topology = topology
        self.seed = seed
        self.clock = Clock()
        self.net = Network(topology, self.clock)
        configured = {str(b.address): b.mac for v in config.vips for b in v.backends if b.mac}
        macs: dict[str, bytes] = {}
        for i, spec in enumerate(topology.nodes):
            for j, att in enumerate(topology.attachments(spec.name)):
                for addr in att.addresses:
                    mac = configured.get(str(addr))
                    macs[str(addr)] = (
                        bytes.fromhex(mac.replace(":", "")) if mac else mac_of(i + 1, j + 1)
                    )
        lb_sources = [a.packed for n in topology.lbs() for a in topology.addresses(n.name)]
        self.servers: dict[str, HttpServer] = {}
        for i, spec in enumerate(topology.nodes):
            node: SimNode
            if spec.type is NodeType.LB:
                node = LbNode(self.net, spec, i + 1, config, macs, lb_sources)
            elif spec.type is NodeType.ROUTER:
                node = RouterNode(self.net, spec, i + 1)
            else:
                node = SimNode(self.net, spec, i + 1)
            for link, addrs in node.ifaces.items():
                node.macs[link] = macs[_a(addrs[0])]
            self.net.add(node)
        for node in self.net.nodes.values():
            server = setup_backend(node, config, list(lb_sources))
            if server is not None:
                self.servers[node.name] = server
        self._label_addresses()
        self.recompute()

    def _label_addresses(self) -> None:
        """Names for addresses in the hop notes: the node that holds one, "the VIP"."""
        labels = self.net.labels
        nodes = self.net.nodes.values()
        for node in nodes:
            name = "the client" if node.spec.role == "client" else node.name
            for addrs in node.ifaces.values():
                for a in addrs:
                    labels.setdefault(a, name)
        for vip in self.config.vips:
            labels[vip.address.packed] = "the VIP"
        for node in nodes:  # loopbacks (SIDs) held by one node only
            for a in sorted(node.local):
                if a not in labels and sum(a in n.local for n in nodes) == 1:
                    labels[a] = node.name

    def recompute(self) -> None:
        fibs = compute_fib(self.topology, self.net.down)
        for name, node in self.net.nodes.items():
            node.fib = fibs[name]

    def fail(self, name: str, convergence: float = CONVERGENCE) -> None:
        """``name`` dies now; routing converges ``convergence`` seconds later."""
        self.net.down.add(name)
        self.clock.after(convergence, self.recompute)

    def lbs(self) -> list[LbNode]:
        return [n for n in self.net.nodes.values() if isinstance(n, LbNode)]

    def node(self, name: str) -> SimNode:
        return self.net.nodes[name]

    def run_until(self, done: Callable[[], bool], limit: float = _TIME_LIMIT) -> None:
        while not done() and self.clock.pending and self.clock.now < limit:
            self.clock.run(until=self.clock.now + 0.01)

    def predict_lb(self, client: SimNode, dst: bytes, dport: int, sport: int) -> str | None:
        """Which LB instance a new TCP flow would reach: the FIB walk with the real ECMP hash."""
        pkt = build.tcp(client.source_for(dst), dst, sport, dport, flags=TCP_SYN)
        here = client
        target = ipaddress.IPv6Address(dst)
        for _ in range(32):
            if isinstance(here, LbNode):
                return here.name
            entry = lookup(here.fib, target, ipaddress.IPv6Address(bytes(pkt[8:24])))
            if entry is None:
                return None
            nh = entry.nexthops[ecmp_index(pkt, len(entry.nexthops))]
            nxt = neighbour(self.topology, nh, target)
            if nxt is None:
                return None
            here = self.net.nodes[nxt]
        return None

    def requests_from(self, client: bytes, after: float = -1.0) -> list[RequestSeen]:
        """Requests the backends saw from ``client`` (directly or via a proxy's headers)."""
        who = _a(client)
        seen = [r for s in self.servers.values() for r in s.requests if r.time >= after]
        return sorted((r for r in seen if r.app_client == who), key=lambda r: r.time)


# --- facts -----------------------------------------------------------------------------


def _backend_address(sim: Sim, vip: Vip | None, seen: RequestSeen) -> str:
    if vip is not None:
        for b in vip.backends:
            if sim.topology.owner(b.address) == seen.node:
                return str(b.address)
    return seen.local


def _first_lb(sim: Sim, hops: list[Hop], client: str) -> str | None:
    lbs = {n.name for n in sim.lbs()}
    for h in hops:
        if h.receiver in lbs and h.dropped is None and h.pkt.innermost.src.addr == client:
            return h.receiver
    return None


def _reply_via_lb(sim: Sim, hops: list[Hop], client: str) -> bool:
    lbs = {n.name for n in sim.lbs()}
    return any(
        (h.sender in lbs or h.receiver in lbs)
        and h.dropped is None
        and h.leg != "error"
        and h.pkt.dst.addr == client
        and h.pkt.proto == "tcp"
        for h in hops
    )


_TRANSLATION: Final = {
    Kind.NAT: "stateful destination NAT66 at the LB: VIP -> backend on the way in, backend -> VIP"
    " on the way back (conntrack); the client's address is kept",
    Kind.TRANSLATE: "stateless NPTv6 prefix translation (RFC 6296) of the backend's address, checksum-neutral;"
    " nothing per flow",
    Kind.DSR: "no NAT: the client's packet reaches the backend unchanged (the VIP is on the backend's"
    " loopback) and the reply bypasses the LB",
    Kind.PROXY: "no NAT: a new TCP connection from the LB to the backend; the client's address"
    " travels in a header",
}


def _translation(mode: str) -> str:
    kind = mode_facts(mode).kind
    return _TRANSLATION[Kind.DSR if kind is Kind.ANNOUNCE else kind]  # anycast VIPs use DSR


def _base_facts(
    sim: Sim, mode: str, vip: Vip | None, dst: bytes, client: SimNode, http: HttpClient
) -> dict[str, object]:
    hops = sim.net.hops
    caddr = _a(client.source_for(dst))
    seen = sim.requests_from(client.source_for(dst))
    if not seen:  # the app never learnt the client (a proxy without PROXY or headers): the
        # requests the one client of the scenario made, as the backends saw them
        seen = sorted((r for s in sim.servers.values() for r in s.requests), key=lambda r: r.time)
    lb_name = _first_lb(sim, hops, caddr)
    lb = sim.net.nodes.get(lb_name) if lb_name else None
    state_mode = mode if mode != "anycast" or vip is None else str(vip.mode)
    first = seen[0] if seen else None
    facts: dict[str, object] = {
        "vip": str(vip.address) if vip is not None else _a(dst),
        "vip_name": vip.name if vip is not None else None,
        "vip_mode": str(vip.mode) if vip is not None else mode,
        "client": caddr,
        "backend": _backend_address(sim, vip, first) if first else None,
        "backend_node": first.node if first else None,
        "backend_saw_source": first.peer if first else None,
        "backend_saw_destination": first.local if first else None,
        "app_saw_client": first.app_client if first else None,
        "client_address_via": (
            None
            if first is None
            else first.learnt_via
            if first.app_client == caddr
            else f"it does not reach the application: it sees {first.app_client} (the LB), with"
            " no PROXY header and no forwarding headers"
        ),
        "proxy_v2": first.proxy_v2 if first else None,
        "x_forwarded_for": first.x_forwarded_for if first else None,
        "forwarded": first.forwarded if first else None,
        "reply_via_lb": _reply_via_lb(sim, hops, caddr),
        "lb_state": lb.state_summary(state_mode) if isinstance(lb, LbNode) else "none",
        "response": http.responses[0] if http.responses else None,
        "responses": list(http.responses),
        "lb_node": lb_name,
        "translation": _translation(mode),
        "drops": [f"{h.receiver}: {h.dropped}" for h in hops if h.dropped],
        "client_events": [f"{e.time:.3f} {e.what}" for e in http.events],
    }
    return facts


# --- the scenarios -------------------------------------------------------------------


def _client(sim: Sim) -> SimNode:
    for n in sim.topology.nodes:
        if n.role == "client":
            return sim.node(n.name)
    raise ValueError("the topology has no node with role client")


def _vip_for(config: Config, mode: str) -> Vip:
    if mode == "anycast":
        vip = _anycast_vip(config)
        if vip is None:
            raise ValueError("anycast needs a VIP inside a bgp.announcements prefix")
        return vip
    any_vip = _anycast_vip(config)
    for v in config.vips:
        if str(v.mode) == mode and v is not any_vip:
            return v
    for v in config.vips:
        if str(v.mode) == mode:
            return v
    raise ValueError(f"the config has no VIP in mode {mode}")


def _http(
    sim: Sim,
    client: SimNode,
    dst: bytes,
    port: int,
    bodies: list[bytes],
    *,
    sport: int | None = None,
    gap: float = 0.0,
    path: str = "",
) -> HttpClient:
    http = HttpClient(client, dst, port, bodies, sport=sport, gap=gap, path=path)
    http.start()
    return http


def run_scenario(
    config: Config,
    topology: Topology,
    mode: str,
    *,
    failure: str | None = None,
    seed: int = 1,
    body: bytes = b"hello",
    path: str = "",
    npt_target: str | None = None,
) -> ScenarioResult:
    """Run ``mode`` (one of :data:`MODES`) with an optional ``failure`` (:data:`FAILURES`).

    Without a failure, the client sends one request with ``body`` (a GET when it is
    empty) to ``path`` (default ``/req1``; ``/?bytes=N`` asks for an N-byte answer):
    ``v6lb lab diff`` replays each request a lab trace made this way. ``npt_target``
    (npt only) is the mapped address the client connects to, instead of the AAAA record
    the seed picks: the one a lab trace used.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of: {', '.join(MODES)}")
    if failure not in FAILURES:
        raise ValueError(
            f"unknown failure {failure!r}; use one of: {', '.join(str(f) for f in FAILURES[1:])}"
        )
    sim = Sim(config, topology, seed)
    client = _client(sim)
    if failure == "backend-dies":
        facts = _backend_dies(sim, client, mode)
    elif failure == "lb-instance-dies":
        facts = _lb_instance_dies(sim, client, mode)
    elif failure == "packet-too-big":
        facts = _packet_too_big(sim, client, mode)
    elif mode == "npt":
        facts = _npt(sim, client, body, path, npt_target)
    elif mode == "anycast":
        facts = _anycast(sim, client)
    else:
        vip = _vip_for(config, mode)
        dst = vip.address.packed
        http = _http(sim, client, dst, vip.ports[0], [body], sport=_port(seed), path=path)
        sim.run_until(lambda: http.done)
        facts = _base_facts(sim, mode, vip, dst, client, http)
    facts["failure"] = failure
    nodes = {n.name: _LANES.get(n.role, "router") for n in topology.nodes}
    return ScenarioResult(mode, list(sim.net.hops), sim.net.pcaps(), facts, nodes)


def _port(seed: int, k: int = 0) -> int:
    return 40000 + (seed * 7919 + k * 104729) % 20000


def seed_for_client_port(port: int) -> int:
    """The ``seed`` of :func:`run_scenario` whose client connects from ``port`` (40000-59999).

    The inverse of the client port rule (7919 is prime to 20000), so a lab trace's
    captured ports replay in the simulator with the same ports (``v6lb lab diff``).
    """
    return ((port - 40000) * pow(7919, -1, 20000)) % 20000 or 20000


def _npt(
    sim: Sim, client: SimNode, body: bytes = b"hello", path: str = "", target: str | None = None
) -> dict[str, object]:
    lbs = [n for n in sim.lbs() if n.npt is not None]
    if not lbs:
        raise ValueError("no LB node runs the npt: pairs")
    mapping = lbs[0].npt.mappings if lbs[0].npt is not None else []
    records: list[tuple[str, str]] = []
    # A tunnel end point (a DSR backend's address or SID on its lo) is no host's address
    # to publish: `v6lb backend` decapsulates what is sent to it (the lab does not assign it).
    ends = {
        b.sid if vip.mode is VipMode.DSR_SRV6 and b.sid is not None else b.address
        for vip in sim.config.vips
        if vip.mode.tunnels
        for b in vip.backends
    }
    for name in sim.servers:
        spec = sim.topology.node(name)
        if spec.role not in ("pod", "backend", "server"):
            continue
        for addr in sim.topology.addresses(name):
            if addr in ends:
                continue
            for m in mapping:
                if addr in m.inside:
                    out = m.translate(addr)
                    if isinstance(out, ipaddress.IPv6Address):
                        records.append((str(out), str(addr)))
    if not records:
        raise ValueError("no backend address lies inside an npt inside prefix")
    for public, private in records:
        owner = sim.topology.owner(private)
        sim.net.labels[ipaddress.IPv6Address(public).packed] = f"{owner}'s NPT-mapped address"
    # Balancing is DNS's: the name has one AAAA per backend and the client picks one.
    chosen, inside = records[sim.seed % len(records)]
    if target is not None:
        found = [r for r in records if ipaddress.IPv6Address(r[0]) == ipaddress.IPv6Address(target)]
        if not found:
            mapped = ", ".join(r for r, _ in records)
            raise ValueError(f"{target} is no backend's NPT-mapped address; those are: {mapped}")
        chosen, inside = found[0]
    dst = ipaddress.IPv6Address(chosen).packed
    http = _http(sim, client, dst, NPT_PORT, [body], sport=_port(sim.seed), path=path)
    sim.run_until(lambda: http.done)
    facts = _base_facts(sim, "npt", None, dst, client, http)
    facts.update(
        vip=chosen,
        backend=inside,
        aaaa_records=[r for r, _ in records],
        mapped_to=dict(records),
        chosen_record=chosen,
        balancing=(
            "NPTv6 maps the whole inside prefix 1:1 onto the outside prefix and balances"
            " nothing; balancing comes from DNS: one AAAA record per backend (its mapped"
            " address), and each client picks one. Costs: no health-driven failover within a"
            " flow (a dead backend's address stays in caches until the DNS TTL expires), and"
            " changes wait for TTLs."
        ),
    )
    return facts


def _anycast(sim: Sim, client: SimNode) -> dict[str, object]:
    vip = _vip_for(sim.config, "anycast")
    dst = vip.address.packed
    port = vip.ports[0]
    primary = _primary_site(sim, vip)
    serving = [n for n in sim.lbs() if vip.name in n.spec.serves]
    in_primary = [n.name for n in serving if n.spec.site == primary]
    # Two flows that ECMP spreads over two instances of the primary site (predicted
    # with the routers' own hash), to show they agree on the backend.
    flows: list[tuple[int, str]] = []
    seen_lbs: set[str] = set()
    for k in range(256):
        sport = _port(sim.seed, k)
        lb = sim.predict_lb(client, dst, port, sport)
        if lb is not None and lb not in seen_lbs:
            flows.append((sport, lb))
            seen_lbs.add(lb)
        if len(seen_lbs) >= min(2, len(in_primary)):
            break
    clients = []
    for sport, _ in flows:
        http = _http(sim, client, dst, port, [b"hello"], sport=sport)
        sim.run_until(http.finished)
        clients.append(http)
    facts = _base_facts(sim, "anycast", vip, dst, client, clients[0])
    per_flow: list[dict[str, object]] = []
    src = client.source_for(dst)
    for (sport, lb), http in zip(flows, clients, strict=True):
        picks: dict[str, str | None] = {}
        for n in serving:
            if n.dsr is not None:
                got = n.dsr.backend_for(src, dst, sport, port)
                picks[n.name] = str(vip.backends[got[1]].address) if got else None
        served = [r for r in sim.requests_from(src) if r.peer_port == sport]
        per_flow.append(
            {
                "client_port": sport,
                "lb_node": lb,
                "backend": _backend_address(sim, vip, served[0]) if served else None,
                "picks_by_instance": picks,
                "response": bool(http.responses),
            }
        )
    facts["flows"] = per_flow
    facts["maglev_agree"] = all(
        len({*picks.values()}) == 1 for picks in (_picks(f) for f in per_flow)
    )
    facts["site"] = primary
    facts["primary_instances"] = in_primary
    facts["routes_before"] = _route_summary(sim, vip)
    sim.run_until(lambda: False, limit=sim.clock.now + 0.2)  # let the last ACKs land
    # The primary site fails; routes are recomputed from the announcements left.
    for name in in_primary:
        sim.fail(name)
    sim.run_until(lambda: False, limit=sim.clock.now + 2 * CONVERGENCE)
    after_port = _port(sim.seed, 999)
    http = _http(sim, client, dst, port, [b"hello again"], sport=after_port)
    sim.run_until(lambda: http.done)
    lb_after = next(
        (h.receiver for h in sim.net.hops if h.receiver in {n.name for n in serving}
         and h.receiver not in in_primary and h.dropped is None),
        None,
    )  # fmt: skip
    facts["site_failed"] = primary
    facts["lb_after_site_failure"] = lb_after
    facts["site_after_failure"] = sim.topology.node(lb_after).site if lb_after else None
    facts["response_after_site_failure"] = http.responses[0] if http.responses else None
    facts["routes_after"] = _route_summary(sim, vip)
    return facts


def _picks(flow: dict[str, object]) -> dict[str, str | None]:
    picks = flow["picks_by_instance"]
    assert isinstance(picks, dict)
    return picks


def _primary_site(sim: Sim, vip: Vip) -> str | None:
    best: tuple[int, str] | None = None
    for a in sim.topology.announcements:
        if vip.address in a.prefix and (best is None or a.cost < best[0]):
            best = (a.cost, a.site)
    return best[1] if best else None


def _route_summary(sim: Sim, vip: Vip) -> list[str]:
    out = []
    for name, node in sim.net.nodes.items():
        if name in sim.net.down or not isinstance(node, RouterNode):
            continue
        e = lookup(node.fib, vip.address, None)
        if e is not None and e.origin == "bgp":
            vias = ", ".join(
                f"{neighbour(sim.topology, h, vip.address)} ({h.via})" for h in e.nexthops
            )
            out.append(f"{name}: {e.prefix} via {vias} metric {e.metric}")
    return out


# --- failures --------------------------------------------------------------------------


def _pool_of(lb: LbNode, vip: Vip) -> BackendPool:
    if vip.mode is VipMode.NAT and lb.nat is not None:
        for svc in lb.nat.services:
            if svc.name == vip.name:
                return svc.pool
    if vip.mode.is_dsr and lb.dsr is not None:
        return lb.dsr.pool(vip.name)
    raise ValueError(f"backend-dies needs a nat or dsr-* VIP, not {vip.mode}")


def _backend_dies(sim: Sim, client: SimNode, mode: str) -> dict[str, object]:
    if mode_facts(mode).kind not in (Kind.NAT, Kind.DSR, Kind.ANNOUNCE):
        raise ValueError(
            f"backend-dies shows Maglev and conntrack: use mode nat or a dsr-* mode, not {mode}"
        )
    vip = _vip_for(sim.config, mode)
    serving = [n for n in sim.lbs() if vip.name in n.spec.serves]
    pools = [_pool_of(n, vip) for n in serving]
    pool = pools[0]
    dst = vip.address.packed
    port = vip.ports[0]
    src = client.source_for(dst)
    # One flow to every backend at least (picked with the LB's own Maglev table).
    chosen: list[tuple[int, int]] = []
    covered: set[int] = set()
    for k in range(2000):
        sport = _port(sim.seed, k)
        i = pool.pick_flow(src, dst, sport, port)
        if i >= 0 and i not in covered:
            chosen.append((sport, i))
            covered.add(i)
            if len(covered) == len(pool):
                break
    clients = [
        _http(sim, client, dst, port, [b"first", b"second"], sport=sport, gap=1.0)
        for sport, _ in chosen
    ]
    sim.run_until(lambda: all(len(c.responses) >= 1 for c in clients))
    victim_index = chosen[0][1]
    victim = str(vip.backends[victim_index].address)
    owner = sim.topology.owner(victim)
    # Sample many flows to show what Maglev moves when the table is rebuilt.
    sample = [(sport, pool.pick_flow(src, dst, sport, port)) for sport in range(1024, 5024)]
    if owner is not None:
        sim.fail(owner)
    for p in pools:
        p.set_up(victim_index, False)  # what the health checker concludes after `fall` probes
    died_at = sim.clock.now
    sample_after = [pool.pick_flow(src, dst, sport, port) for sport, _ in sample]
    moved = [(b, a) for (_, b), a in zip(sample, sample_after, strict=True) if a != b]
    sim.run_until(lambda: all(c.done for c in clients))
    flows = []
    for (sport, i), c in zip(chosen, clients, strict=True):
        served = [r for r in sim.requests_from(src) if r.time > died_at]
        mine = [r for r in served if any(r.peer_port == cc.lport for cc in c.conns)]
        after = _backend_address(sim, vip, mine[0]) if mine else None
        flows.append(
            {
                "client_port": sport,
                "backend_before": str(vip.backends[i].address),
                "backend_after": after,
                "same_connection": len(c.conns) == 1 and len(c.responses) == 2,
                "completed": len(c.responses) == 2,
                "on_dead_backend": i == victim_index,
            }
        )
    facts = _base_facts(sim, mode, vip, dst, client, clients[0])
    facts.update(
        dead_backend=victim,
        dead_node=owner,
        flows=flows,
        established_flows_survived=all(
            f["same_connection"] and f["backend_after"] == f["backend_before"]
            for f in flows
            if not f["on_dead_backend"]
        ),
        dead_backend_flows_moved=all(
            f["completed"] and f["backend_after"] not in (None, victim)
            for f in flows
            if f["on_dead_backend"]
        ),
        maglev_sample_flows=len(sample),
        maglev_moved=len(moved),
        maglev_moved_only_dead_backend_flows=all(b == victim_index for b, _ in moved),
        maglev_dead_backend_flows=sum(1 for _, b in sample if b == victim_index),
        # Maglev's disruption is minimal, not zero: a rebuilt table may move a few others.
        maglev_moved_other_flows=sum(1 for b, _ in moved if b != victim_index),
    )
    dead_flow = flows[0]
    others = [fl for fl in flows if not fl["on_dead_backend"]]
    facts["summary"] = (
        f"backend {victim} ({owner}) died after {len(flows)} connections were set up."
        f" The client on port {dead_flow['client_port']} lost its connection"
        f" ({_last_close(clients[0])}), reconnected and was served by"
        f" {dead_flow['backend_after']}. The {len(others)} connections on other backends"
        f" {'all carried on, same backend, same connection' if facts['established_flows_survived'] else 'did NOT all survive'}."
        f" Maglev moved {len(moved)} of {len(sample)} sample flows:"
        f" {facts['maglev_dead_backend_flows']} of the dead backend's and"
        f" {facts['maglev_moved_other_flows']} others."
    )
    return facts


def _last_close(http: HttpClient) -> str:
    closes = [e.what for e in http.events if e.what.startswith("connection closed")]
    return closes[0] if closes else "no close"


def _lb_instance_dies(sim: Sim, client: SimNode, mode: str) -> dict[str, object]:
    vip = _vip_for(sim.config, mode) if mode != "anycast" else _vip_for(sim.config, "anycast")
    serving = [n for n in sim.lbs() if vip.name in n.spec.serves]
    site = _primary_site(sim, vip) if mode == "anycast" else None
    peers = [n for n in serving if site is None or n.spec.site == site]
    if len(peers) < 2:
        raise ValueError(
            f"lb-instance-dies needs a VIP served by 2 LB instances at one site; {vip.name} has"
            f" {len(peers)} (use --mode anycast, or list more lb nodes under serves)"
        )
    dst = vip.address.packed
    port = vip.ports[0]
    sport = _port(sim.seed)
    http = _http(sim, client, dst, port, [b"first", b"second"], sport=sport, gap=0.5)
    sim.run_until(lambda: len(http.responses) >= 1)
    src = client.source_for(dst)
    lb_before = _first_lb(sim, sim.net.hops, _a(src))
    before = sim.requests_from(src)
    # Die while the second request is on its way (it is sent `gap` after the response).
    kill_at = sim.clock.now
    while not any(e.what.startswith("request 2") for e in http.events):
        sim.clock.run(until=sim.clock.now + 0.001)
        kill_at = sim.clock.now
    assert lb_before is not None
    sim.fail(lb_before)
    sim.run_until(lambda: http.done)
    after = [r for r in sim.requests_from(src) if r.time >= kill_at]
    lbs = {n.name for n in serving}
    lb_after = next(
        (h.receiver for h in sim.net.hops
         if h.time >= kill_at and h.receiver in lbs and h.receiver != lb_before and h.dropped is None),
        None,
    )  # fmt: skip
    facts = _base_facts(sim, mode, vip, dst, client, http)
    b_before = _backend_address(sim, vip, before[0]) if before else None
    b_after = _backend_address(sim, vip, after[0]) if after else None
    facts.update(
        lb_before=lb_before,
        lb_after=lb_after,
        backend_before=b_before,
        backend_after=b_after,
        same_backend=b_before is not None and b_before == b_after,
        same_connection=len(http.conns) == 1,
        completed=len(http.responses) == 2,
        retransmits=sum(c.retransmits for c in http.conns),
        dropped_at_dead_instance=sum(
            1 for h in sim.net.hops if h.dropped == "node-down" and h.receiver == lb_before
        ),
    )
    facts["summary"] = (
        f"{lb_before} died while request 2 was on its way; that packet was lost at {lb_before},"
        f" routing converged in {CONVERGENCE * 1000:.0f} ms, and the client's TCP retransmitted"
        f" it {facts['retransmits']} time(s) through {lb_after}, which picked the same backend"
        f" ({b_after}) with no shared state (Maglev, same seed). Same connection:"
        f" {facts['same_connection']}; both requests answered: {facts['completed']}."
    )
    return facts


REPLY_BYTES: Final = 6000
"""The answer the reply-path part of packet-too-big asks for: several full-size segments."""


def _packet_too_big(sim: Sim, client: SimNode, mode: str) -> dict[str, object]:
    """Both ways a Packet Too Big arises around a DSR VIP, one after the other.

    Inbound: the client's large request; the LB's encapsulation (or a smaller link
    before the LB) makes it too big, and the client gets the error. Reply path: a
    backend's full-size answer meets a smaller link on the way to the client; the
    router's error goes to the VIP, and the LB passes it on to the backend.
    """
    if mode == "anycast":
        vip = _vip_for(sim.config, "anycast")
    elif mode_facts(mode).tunnels:
        vip = _vip_for(sim.config, mode)
    else:
        tunnels = ", ".join(modes_where(tunnels=True))
        raise ValueError(f"packet-too-big needs a tunnel mode: {tunnels} or anycast")
    dst = vip.address.packed
    # `v6lb backend` gives replies from a tunnel VIP a route advmss that keeps the client's
    # TCP segments inside the tunnel, so TCP to such a backend never meets the error. The
    # walk-through shows a backend without it (a UDP client, or a host set up by hand).
    advmss = sorted({m for n in sim.net.nodes.values() if (m := n.stack.advmss.get(dst))})
    for n in sim.net.nodes.values():
        n.stack.advmss.clear()
    body = bytes(range(256)) * 12  # 3072 bytes: several full-size segments
    http = _http(sim, client, dst, vip.ports[0], [body], sport=_port(sim.seed))
    sim.run_until(lambda: http.done)
    facts = _base_facts(sim, mode, vip, dst, client, http)
    facts.update(_inbound_ptb(sim, client, vip, http, body))
    if advmss:
        facts["backend_advmss"] = advmss[0]
        facts["inbound_summary"] = (
            f"{facts['inbound_summary']} (This backend ignores the advmss {advmss[0]} that"
            " `v6lb backend` routes replies from the VIP with; with it, the client's TCP"
            " segments fit the tunnel and no Packet Too Big arises.)"
        )
    sim.run_until(lambda: False, limit=sim.clock.now + 0.2)  # the last ACKs land
    reply = _reply_path_ptb(sim, client, vip)
    facts["reply_path"] = reply
    facts["engines"] = engine_notes(sim.config, vip)
    facts["cannot_work"] = [dict(c) for c in CANNOT_WORK]
    facts["summary"] = f"Inbound: {facts['inbound_summary']} Reply path: {reply['summary']}"
    return facts


def _ptb_hops(hops: list[Hop]) -> list[Hop]:
    return [
        h
        for h in hops
        if h.pkt.error is not None and h.pkt.error.detail.startswith("packet too big")
    ]


def _inbound_ptb(
    sim: Sim, client: SimNode, vip: Vip, http: HttpClient, body: bytes
) -> dict[str, object]:
    """The client's large request: who answered Packet Too Big, and what the client did."""
    hops = list(sim.net.hops)
    dst = vip.address.packed
    caddr = _a(client.source_for(dst))
    origin: dict[int, Hop] = {}
    for h in hops:
        origin.setdefault(h.packet_id, h)
    to_client = [h for h in _ptb_hops(hops) if h.receiver == client.name and h.dropped is None]
    first = to_client[0] if to_client else None
    by = origin[first.packet_id].sender if first is not None else None
    mtu = int(first.pkt.detail.split("mtu ")[1]) if first is not None else None
    data_sent = [
        h
        for h in hops
        if h.sender == client.name
        and h.dropped is None
        and h.pkt.proto == "tcp"
        and "bytes" in h.pkt.detail
    ]
    after = [h.pkt.length for h in data_sent if first is not None and h.seq > first.seq]
    conn = http.conns[0]
    pmtu = conn.stack.pmtu.get(dst)
    lbs = {n.name for n in sim.lbs()}
    size = data_sent[0].pkt.length if data_sent else None
    if first is None:
        why = "nobody answered Packet Too Big: the client's packets fit the whole way"
    elif by in lbs:
        enc = mode_facts(vip.mode).encap
        opts = vip.options
        path = opts.mtu if isinstance(opts, TunnelOptions) else None
        why = (
            f"the LB ({by}) answered Packet Too Big (MTU {mtu}) from {first.pkt.src.addr}:"
            f" with its {enc.overhead}-byte {enc.title} header the packet no longer fits"
            f" the VIP's {path}-byte path to the backends (RFC 2473 §7.1)"
        )
    else:
        why = (
            f"router {by} answered Packet Too Big (MTU {mtu}) from {first.pkt.src.addr}:"
            f" its next link is smaller, so the packet never reached the LB"
        )
    completed = bool(http.responses)
    summary = (
        f"the client sent {size}-byte packets; {why}. The client lowered its path MTU to"
        f" {pmtu}, resent the data in {max(after, default=None)}-byte packets, and the"
        f" {len(body)}-byte request completed: {completed}."
    )
    return {
        "ptb_from": first.pkt.src.addr if first is not None else None,
        "ptb_by": by,
        "ptb_mtu": mtu,
        "ptb_to": first.pkt.dst.addr if first is not None else None,
        "too_big_drops": [
            f"{h.receiver}: {len(h.data)} bytes" for h in hops if h.dropped == "too-big"
        ],
        "client_path_mtu": pmtu,
        "first_packet_size": size,
        "retry_packet_size": max(after, default=None),
        "client": caddr,
        "completed": completed,
        "request_bytes": len(body),
        "inbound_summary": summary,
    }


def _reply_path_ptb(sim: Sim, client: SimNode, vip: Vip) -> dict[str, object]:
    """A large answer meets a smaller link on its way back: the router's Packet Too Big
    goes to the VIP, and the LB must pass it on to the backend that sent the segment."""
    dst = vip.address.packed
    port = vip.ports[0]
    sport = _port(sim.seed, 1)
    src = client.source_for(dst)
    caddr = _a(src)
    flow_lb = sim.predict_lb(client, dst, port, sport)
    lb = sim.net.nodes.get(flow_lb) if flow_lb else None
    if not isinstance(lb, LbNode):
        return {"possible": False, "summary": "no LB is on the client's way to the VIP."}
    i = _pool_of(lb, vip).pick_flow(src, dst, sport, port)
    backend = sim.topology.owner(vip.backends[i].address) if i >= 0 else None
    if backend is None:
        return {"possible": False, "summary": "the VIP has no backend up for the flow."}
    route = reply_route(sim, backend, dst, src, port, sport)
    narrow = narrow_link(sim, route)
    way_back = [f"{a} -> {b} on {link}" for link, a, b in route]
    out: dict[str, object] = {
        "possible": narrow is not None,
        "client_port": sport,
        "backend_node": backend,
        "route": way_back,
        "response_bytes": REPLY_BYTES,
        "started_at": round(sim.clock.now, 6),
    }
    if narrow is None:
        out["summary"] = (
            f"{backend}'s replies cross no link but its own and the client's"
            f" ({', '.join(way_back)}): a smaller client link makes the client advertise"
            " a smaller MSS, so no router on this way sends Packet Too Big to the VIP. A file"
            " with a router between them shows it (examples/lab-pmtu.yaml)."
        )
        return out
    out.update(
        link=narrow.link,
        link_mtu=narrow.mtu,
        router=narrow.router,
        lowered_from=narrow.lowered_from,
    )
    if narrow.lowered_from is not None:
        sim.net.mtu_override[narrow.link] = narrow.mtu
    n0 = len(sim.net.hops)
    http = _http(sim, client, dst, port, [b""], sport=sport, path=f"/?bytes={REPLY_BYTES}")
    sim.run_until(lambda: http.done)
    hops = sim.net.hops[n0:]
    ours = [
        h
        for h in _ptb_hops(hops)
        if h.pkt.innermost.dst.addr == caddr and h.pkt.innermost.dst.port == sport
    ]
    first_id = ours[0].packet_id if ours else None
    way = [h for h in ours if h.packet_id == first_id]
    delivered = way[-1] if way and way[-1].dropped is None else None
    lbs = {n.name for n in sim.lbs()}
    ptb_lb = next((h.receiver for h in way if h.receiver in lbs), None)
    passed = next((h for h in way if h.sender in lbs), None)
    sent = [
        h
        for h in hops
        if h.sender == backend
        and h.dropped is None
        and h.pkt.proto == "tcp"
        and "bytes" in h.pkt.detail
    ]
    before = [h.pkt.length for h in sent if delivered is None or h.seq < delivered.seq]
    after = [h.pkt.length for h in sent if delivered is not None and h.seq > delivered.seq]
    pmtu = sim.net.nodes[backend].stack.pmtu.get(src)
    completed = bool(http.responses) and f"Content-Length: {REPLY_BYTES}" in http.responses[0]
    if passed is None:
        how = "nothing: the error did not leave the LB"
    elif passed.pkt.carried is not passed.pkt:
        how = f"in the flow's {passed.pkt.proto} tunnel to {passed.pkt.dst.addr}"
    elif passed.pkt.dst.addr == vip.address.compressed:
        how = "unchanged, by MAC rewrite, like the flow's packets"
    else:
        how = f"translated to {passed.pkt.dst.addr}"
    out.update(
        ptb_from=way[0].pkt.src.addr if way else None,
        ptb_to=way[0].pkt.dst.addr if way else None,
        ptb_mtu=narrow.mtu if way else None,
        ptb_way=[
            f"{h.sender} -> {h.receiver} on {h.link}" + (f" ({h.dropped})" if h.dropped else "")
            for h in way
        ],
        ptb_lb=ptb_lb,
        flow_lb=flow_lb,
        passed_on=how if passed is not None else None,
        delivered_to=delivered.receiver if delivered is not None else None,
        reached_the_flows_backend=delivered is not None and delivered.receiver == backend,
        first_segment_size=max(before, default=None),
        resent_segment_size=max(after, default=None),
        backend_path_mtu=pmtu,
        completed=completed,
    )
    lowered = (
        f" (lowered from {narrow.lowered_from} for this walk-through: the file has no smaller"
        " link on the reply path)"
        if narrow.lowered_from is not None
        else ""
    )
    text = (
        f"{backend} answers from the VIP in {out['first_segment_size']}-byte packets; link"
        f" {narrow.link} has MTU {narrow.mtu}{lowered}, so {narrow.router} drops them and sends"
        f" Packet Too Big (MTU {narrow.mtu}) to {out['ptb_to']}, the segments' source."
    )
    if ptb_lb is None:
        text += " It never reaches an LB."
    else:
        text += f" It reaches {ptb_lb}"
        if flow_lb and ptb_lb != flow_lb:
            text += (
                f" (ECMP hashed it apart from the flow, which {flow_lb} carries: same file and"
                " seed, same Maglev table, same backend)"
            )
        text += f", which passes it on {how}"
        if delivered is not None and delivered.receiver == backend:
            text += (
                f": {backend}, the backend that owns the quoted flow, lowers its path MTU to"
                f" the client to {pmtu} and resends in {out['resent_segment_size']}-byte"
                " packets."
            )
        else:
            who = delivered.receiver if delivered is not None else "nobody"
            text += f", but it reaches {who}, not {backend}, which owns the flow."
    text += f" The {REPLY_BYTES}-byte answer arrived whole: {completed}."
    out["summary"] = text
    return out
