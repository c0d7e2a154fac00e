"""`v6lb run --dataplane kernel`: the kernel data plane, a plane of the daemon.

:class:`KernelPlane` checks the host and renders before anything is installed
(:meth:`KernelPlane.open`), then applies the instance atomically: nftables,
ip6tables and routes (:func:`~v6lb.engines.kernel.apply.apply`). The daemon
(:mod:`v6lb.engines.daemon`) probes the backends; when a backend changes state
its VIP's Maglev map(s) are refilled in one nft transaction
(:func:`~v6lb.render.nftables.render_map_update`); conntrack keeps existing
``nat`` flows on their backend. A reload renders the new file and applies it
with ``previous=`` the running state (apply rolls back on failure). With
``lb.conntrack_sync`` the plane runs conntrackd (:class:`~.conntrackd.ConntrackSyncer`);
the BIRD speaker of ``bgp:`` (:class:`~.announce.Announcer`) is the daemon's.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Mapping
from ipaddress import IPv6Address
from typing import Any, Final

from v6lb.core.backends import BackendPool
from v6lb.engines.kernel.apply import (
    CtFlows,
    KernelError,
    Rendered,
    apply,
    apply_nft,
    apply_routes,
    conntrack_flows,
    in_instance_block,
    leftovers,
    limits_status,
    nft_json,
    remove,
    render_lb,
    require_root,
    require_tools,
    run_tool,
)
from v6lb.engines.kernel.conntrackd import ConntrackSyncer
from v6lb.engines.kernel.host import (
    HostError,
    Links,
    check_lb_host,
    require_ipv6_forwarding,
)
from v6lb.engines.kernel.nfnl import read_counters
from v6lb.engines.peers import check_peers_host
from v6lb.engines.plane import (
    Plane,
    PlaneContext,
    PlaneStatus,
    Role,
    RunError,
    Staged,
    VipCounter,
)
from v6lb.engines.probe import ProbeRoute
from v6lb.model.config import Config, Vip, VipMode
from v6lb.model.modes import modes_where
from v6lb.model.pools import pools_for
from v6lb.render.ip6tables import tagged_rules
from v6lb.render.nftables import (
    DRAIN_FLOW_TIMEOUT,
    L2Ports,
    RenderError,
    backend_counter,
    drain_flow_sets,
    icmp_error_counts,
    map_names,
    nat_traffic_counters,
    render_drain_flows,
    render_map_update,
    table_name,
    vip_counter,
)
from v6lb.render.routes import ROUTE_PROTO, l2_probe_targets, tunnel_targets

PROBE_ROUTE_CHECK: Final = 1.0
"""Seconds between two looks at the dsr-l2 probes' neighbour entries (see :meth:`tick`)."""

_QUIET_WINDOW: Final = 0.5  # seconds: a graceful stop ends after one without packets to a VIP

__all__ = [
    "RUN_TOOLS",
    "HostError",
    "KernelPlane",
    "RunError",
    "dsr_l2_links",
    "fresh_pools",
    "kernel_objects",
    "render_for",
]

RUN_TOOLS: Final = ("nft", "ip", "ip6tables", "ip6tables-save", "ip6tables-restore")


def dsr_l2_links(config: Config) -> tuple[str, str] | None:
    """(ingress, egress) of the ``dsr-l2`` VIPs, for both data planes; None without one.

    The egress link is ``lb.interfaces[1]``, or the only one when the LB is one-armed.
    """
    if not any(v.mode is VipMode.DSR_L2 for v in config.vips):
        return None
    ifs = config.lb.interfaces
    if not ifs:
        raise RunError(
            f"{config.source}: dsr-l2 needs the LB's interfaces",
            "list them in lb.interfaces: [INGRESS, EGRESS] (one name if it is one-armed)",
        )
    return ifs[0], ifs[1] if len(ifs) > 1 else ifs[0]


def _l2_ports(config: Config, links: Links) -> L2Ports | None:
    l2 = dsr_l2_links(config)
    if l2 is None:
        return None
    ingress, egress = l2
    return L2Ports(ingress=ingress, egress=egress, egress_mac=links.macs[egress])


def render_for(config: Config, links: Links, pools: Mapping[str, BackendPool]) -> Rendered:
    try:
        return render_lb(config, pools=pools, l2=_l2_ports(config, links))
    except RenderError as exc:
        raise RunError(f"{config.source}: {exc}", "fix the file or the host, then retry") from None


def fresh_pools(config: Config) -> dict[str, BackendPool]:
    """A pool per VIP of the kernel data plane, every backend up."""
    return pools_for(config, modes_where(plane=KernelPlane.name, vip=True))


class KernelPlane(Plane):
    """The kernel data plane of one instance (nftables, ip6tables, routes)."""

    name = "kernel"
    role = Role.DATAPLANE
    # a status reads the kernel's objects back (``nft list``: 1-3 s with four 65537-entry
    # maps loaded); answered in the loop, it would hold the probes up.
    threaded_status = True

    def __init__(
        self,
        config: Config,
        ctx: PlaneContext,
        links: Links,
        pools: dict[str, BackendPool],
        rendered: Rendered,
    ) -> None:
        self.config = config
        self.ctx = ctx
        self.links = links
        self._pools = pools
        self.rendered = rendered
        self.instance = config.lb.instance
        self._flight: _FlightWatch | None = None  # a graceful stop's look at the VIP counters
        # lb.conntrack_sync: the conntrackd that replicates NAT flows (docs/anycast.md)
        self.syncer = ConntrackSyncer.create(config, self.instance, ctx.log)
        self._next_route_check = 0.0
        self._route_error = ""
        self._gateways = _probe_gateways(config)

    @classmethod
    def preflight(cls, config: Config) -> None:
        require_root()
        require_tools(*RUN_TOOLS)

    @classmethod
    def open(cls, config: Config, ctx: PlaneContext) -> KernelPlane:
        """Every check against the host, and the rendered instance; nothing installed yet."""
        links = check_lb_host(config)
        # dsr-l2 leaves by a netdev `fwd`, the proxies by their own sockets
        if config.npt or any(v.mode.facts.routed for v in config.vips):
            require_ipv6_forwarding(
                ctx.netns,
                "nat, npt and the tunnel DSR modes are routed, so every request would be lost",
            )
        if any(v.mode is VipMode.NAT for v in config.vips):
            check_peers_host(config)  # lb.peers: the nat VIPs' second chance (render/peers.py)
        pools = fresh_pools(config)
        return cls(config, ctx, links, pools, render_for(config, links, pools))

    def pools(self) -> Mapping[str, BackendPool]:
        return self._pools

    def probe_route(self, config: Config, vip: str, index: int) -> ProbeRoute | None:
        """Every DSR backend: to the VIP with the backend's mark, as its client traffic.

        dsr-ip6ip6/dsr-srv6: the mark's rule and seg6 route encapsulate the probe to
        the backend. dsr-l2: the mark's rule and route send it to the VIP via a next
        hop whose permanent neighbour entry is the backend's MAC (render/routes.py), so
        it leaves the egress link as a frame to that MAC, as the rewritten client frames.
        The probe leaves from ``lb.addresses[0]`` (else the kernel's choice); the backend
        answers from the VIP on its ``lo`` straight to that address, as it answers a
        client. A backend without the VIP (or without decapsulation) fails the probe.
        """
        source = config.lb.addresses[0] if config.lb.addresses else None
        for t in tunnel_targets(config):
            if t.vip.name == vip and t.backend_index == index:
                return ProbeRoute(t.vip.address, t.mark, source, f"{t.vip.mode} tunnel")
        for p in l2_probe_targets(config):
            if p.vip.name == vip and p.backend_index == index:
                return ProbeRoute(p.vip.address, p.mark, source, f"dsr-l2 MAC {p.mac}")
        return None

    # --- install / remove -------------------------------------------------------

    def install(self) -> str:
        """Apply (replacing what a crashed run left); on failure nothing stays behind."""
        found = leftovers(self.instance)
        if found:
            self.ctx.warn(
                f"found the state of an earlier run of instance {self.instance} (it was not"
                f" stopped cleanly): {', '.join(found)}; replacing it"
            )
        apply(self.rendered, self.instance)
        if self.syncer is not None:  # syncing before the VIPs are announced
            try:
                self.syncer.start()
            except BaseException:
                self.teardown()
                raise
        return (
            f"installed {len(self._pools)} VIP(s) and {len(self.config.npt)} npt pair(s)"
            f" from {self.ctx.path}"
        )

    def teardown(self) -> list[str]:
        if self._flight is not None:
            self._flight.stop()
        if self.syncer is not None:
            self.syncer.stop()
        return remove(self.instance)

    # --- the loop ----------------------------------------------------------------

    def tick(self, now: float) -> float | None:
        if self.syncer is not None:
            self.syncer.check(now)
        if not self._gateways:
            return None
        if now >= self._next_route_check:
            self._next_route_check = now + PROBE_ROUTE_CHECK
            self._check_probe_routes()
        return self._next_route_check

    def _check_probe_routes(self) -> None:
        """Put the routes back when a dsr-l2 probe's neighbour entry is gone.

        Taking the egress link down (``ip link set ... down``) deletes its neighbour
        entries, permanent ones too, and its routes; the netdev rule that rewrites the
        client frames stays. Without this the probes would fail once the link is up
        again and every dsr-l2 backend would be marked down while its clients are
        served. The whole routes batch is loaded again (tunnel routes included).
        """
        have = {
            str(e.get("dst"))
            for e in nft_json(run_tool(["ip", "-6", "-j", "neigh", "show"], netns=None))
            if str(e.get("protocol")) in ("118", hex(ROUTE_PROTO))
        }
        missing = len(self._gateways - have)
        if not missing:
            self._route_error = ""
            return
        try:
            apply_routes(self.rendered.routes, self.instance)
        except KernelError as exc:
            if exc.message != self._route_error:  # once per distinct failure, not per second
                self._route_error = exc.message
                self.ctx.warn(f"restoring the routes failed (retrying every second): {exc}")
            return
        self._route_error = ""
        self.ctx.warn(
            f"{missing} dsr-l2 probe neighbour entr{'y was' if missing == 1 else 'ies were'}"
            " gone (a link went down?): loaded the instance's routes, rules and neighbour"
            " entries again"
        )

    # --- graceful stop -------------------------------------------------------------

    def withdraw(self) -> str:
        """The first step of a graceful stop (the daemon has withdrawn the BGP routes).

        The counters that :meth:`in_flight` reads start being watched now, so the stop
        knows the traffic by the time it asks.
        """
        if self._flight is None:
            self._flight = _FlightWatch(self._vip_packets, self._nat_open)
        return ""

    def in_flight(self) -> int:
        """Packets that reached the VIPs in the last _QUIET_WINDOW s (1 until known).

        Flows have no end the kernel tables show (DSR keeps no state), so traffic
        still arriving is what is in flight: after a BGP withdraw it stops within the
        routers' convergence; without BGP it goes on until the drain timeout. The
        counters are read over netlink (:mod:`.nfnl`: ``nft list`` would cost 0.4 s or
        more with a 65537-slot map loaded), on a thread of their own.
        """
        if self._flight is None:
            self._flight = _FlightWatch(self._vip_packets, self._nat_open)
        return self._flight.busy

    def _nat_open(self) -> int:
        """With ``lb.peers``: the nat VIPs' open TCP flows (0 without it, or without nat).

        The other instances send these flows' packets back here after the withdraw
        (render/peers.py), and their replies come to this instance's SNAT address, so
        they go on while the instance drains: the stop waits for them as a proxy waits
        for its connections. Without ``lb.peers`` they cannot go on once the routers have
        moved, and packets alone are counted.
        """
        if self.config.lb.peers is None:
            return 0
        nat = list(dict.fromkeys(v.address for v in self.config.vips if v.mode is VipMode.NAT))
        # ESTABLISHED only: a closing entry ends by its own timeout
        flows = conntrack_flows(nat, tcp_state="ESTABLISHED")
        return flows.total if flows is not None else 0

    def _vip_packets(self) -> int:
        """The VIPs' packet counters, summed (over netlink: :mod:`.nfnl`, not ``nft``)."""
        names: dict[str, list[str]] = {"ip6": [], "netdev": []}
        for v in self.config.vips:
            if v.name in self._pools:
                family = "netdev" if v.mode is VipMode.DSR_L2 else "ip6"
                names[family].append(vip_counter(self.config, v))
        table = table_name(self.instance)
        return sum(
            packets
            for family, wanted in names.items()
            if wanted
            for packets, _ in read_counters(family, table, wanted).values()
        )

    def apply_pool_change(self, vip: str, pool: BackendPool) -> str:
        """Refill the VIP's map(s) in one transaction (the daemon's BGP speaker follows)."""
        try:
            apply_nft(render_map_update(self.config, vip, pool))
        except KernelError as exc:
            raise RunError(f"map update of {vip} failed: {exc.message}", exc.fix) from None
        return f"map refilled ({len(pool)} backends, one transaction)"

    # --- reload ------------------------------------------------------------------

    def stage(self, config: Config) -> Staged:
        links = check_lb_host(config)
        pools = fresh_pools(config)

        def commit() -> str:
            rendered = render_for(config, links, pools)  # after the daemon marked the dead
            # the tables as the kernel has them now (the running pools, map refills
            # included): when the reload changes nothing there, they stay, with their
            # counters and the flows a drain keeps
            same = rendered.nft == render_for(self.config, self.links, self._pools).nft
            if not same:
                kept = _drain_flows(config, pools)  # the flows a drain in effect must keep
                if kept:
                    rendered = dataclasses.replace(rendered, nft=rendered.nft + kept)
            apply(rendered, self.instance, previous=self.rendered, keep_nft=same)
            self.config, self.links, self._pools, self.rendered = config, links, pools, rendered
            self._gateways = _probe_gateways(config)
            return f": {len(pools)} VIP(s)"

        def then() -> None:
            if self.syncer is not None:
                self.syncer.reconfigure(config)

        return Staged(pools, commit, then)

    # --- status ------------------------------------------------------------------

    def status(self) -> PlaneStatus:
        config = self.config
        kernel = kernel_objects(self.instance)
        counters = {name: (c["packets"], c["bytes"]) for name, c in kernel["nft_counters"].items()}
        nat_addresses = list(dict.fromkeys(v.address for v in config.vips if v.mode is VipMode.NAT))
        flows = conntrack_flows(nat_addresses)
        limits = limits_status(config, counters, count=None if flows is None else flows.total)
        index = _flow_index(flows) if flows is not None else None
        out = PlaneStatus()
        for vip in config.vips:
            if vip.name not in self._pools:
                continue
            cname = vip_counter(config, vip)
            packets, nbytes = counters.get(cname, (0, 0))
            out.backend_packets[vip.name] = [
                counters.get(backend_counter(config, vip, j), (0, 0))
                for j in range(len(vip.backends))
            ]
            out.counters[vip.name] = VipCounter(cname, packets, nbytes)
            out.maps[vip.name] = map_names(config, vip)
            if vip.mode is VipMode.NAT:
                out.new_flows[vip.name] = packets
                names = nat_traffic_counters(config, vip)
                out.traffic[vip.name] = {
                    d: VipCounter(n, *counters.get(n, (0, 0)))
                    for d, n in zip(("in", "out"), names, strict=True)
                }
                if index is not None:
                    _flows_of(vip, index, out)
            else:  # dsr-*: the balancing rule counts every packet to the VIP
                out.traffic[vip.name] = {"in": VipCounter(cname, packets, nbytes)}
        icmp, npt_icmp = icmp_error_counts(config, {k: v[0] for k, v in counters.items()})
        out.icmp = {name: c for name, c in icmp.items() if name in self._pools}
        out.npt_icmp = npt_icmp
        out.details = {
            "kernel": kernel,
            **limits,
            "conntrack_sync": self.syncer.status() if self.syncer is not None else None,
        }
        return out


class _FlightWatch:
    """Reads a packet total every _QUIET_WINDOW s on its own thread.

    ``busy``: the packets since the last read, plus what ``open_now`` counts (flows
    still open that make no packets while idle).
    """

    def __init__(self, read: Callable[[], int], open_now: Callable[[], int] = lambda: 0) -> None:
        self.read = read
        self.open_now = open_now
        self.busy = 1  # not known yet: in flight
        self.error: str | None = None  # the last read's failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="v6lb-flight", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        last: int | None = None
        while not self._stop.is_set():
            try:
                total: int | None = self.read()
                still_open = self.open_now()
            except Exception as exc:  # nft failed: not evidence that nothing is in flight
                self.error = f"{type(exc).__name__}: {exc}"
                total = None
            if total is not None and last is not None:
                self.busy = total - last + still_open
            last = total if total is not None else last
            self._stop.wait(_QUIET_WINDOW)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _drain_flows(config: Config, pools: Mapping[str, BackendPool]) -> str:
    """``add element`` lines that carry each ``<map>_new`` set's flows over a reload.

    Only while a drain is in effect (a moved slot): those are the flows opened since the
    drain in a moved slot, which the new table sends elsewhere than the keep map; losing
    them would send their next packets to the drained backend. A set that cannot be read
    (it did not exist) carries nothing.
    """
    out = []
    for table, name in drain_flow_sets(config, pools):
        r = run_tool(["nft", "-j", "list", "set", *table.split(), name], netns=None)
        if r.returncode != 0:
            continue
        elements = []
        try:
            items = json.loads(r.stdout or "{}").get("nftables", [])
        except (ValueError, AttributeError):
            items = []
        for item in items:
            s = item.get("set") if isinstance(item, dict) else None
            if not isinstance(s, dict):
                continue
            default = int(s.get("timeout", DRAIN_FLOW_TIMEOUT))
            for e in s.get("elem", []):
                # {"elem": {"val": {"concat": [...]}, "expires": N}}, or the bare value
                elem: dict[str, Any] = e["elem"] if isinstance(e, dict) and "elem" in e else {}
                val = elem.get("val", e)
                parts = val.get("concat") if isinstance(val, dict) else None
                if not isinstance(parts, list) or len(parts) != 3:
                    continue
                timeout = int(elem.get("timeout", default))
                expires = max(1, int(elem.get("expires", timeout)))
                elements.append(
                    f"{parts[0]} . {parts[1]} . {parts[2]} timeout {timeout}s expires {expires}s"
                )
        out.append(render_drain_flows(table, name, elements))
    return "".join(out)


def _probe_gateways(config: Config) -> set[str]:
    """The made-up next hops of the dsr-l2 probes (render/routes.py), as ``ip`` shows them."""
    return {str(p.gateway) for p in l2_probe_targets(config)}


FlowIndex = dict[tuple[IPv6Address, str, int], dict[tuple[IPv6Address | None, int | None], int]]


def _flow_index(flows: CtFlows) -> FlowIndex:
    """The live flows counted by (VIP address, protocol, VIP port), then (backend, port)."""
    index: FlowIndex = {}
    for (proto, vip, vport, backend, bport), n in flows.by_key.items():
        per = index.setdefault((vip, proto, vport), {})
        per[backend, bport] = per.get((backend, bport), 0) + n
    return index


def _flows_of(vip: Vip, index: FlowIndex, out: PlaneStatus) -> None:
    """A nat VIP's live conntrack entries, and each backend's (by address and port)."""
    proto = str(vip.protocol)
    per: dict[tuple[IPv6Address | None, int | None], int] = {}
    for port in vip.ports:
        for key, n in index.get((vip.address, proto, port), {}).items():
            per[key] = per.get(key, 0) + n
    out.active_flows[vip.name] = sum(per.values())
    counts = []
    for b in vip.backends:
        if b.port is not None:
            counts.append(per.get((b.address, b.port), 0))
        else:  # the VIP's own port: every flow to the address
            counts.append(sum(n for (a, _), n in per.items() if a == b.address))
    out.backend_active_flows[vip.name] = counts


def kernel_objects(instance: str) -> dict[str, Any]:
    """What the instance has in the kernel now, read back from the kernel (not from memory).

    One terse ``nft -j -t list table`` per family gives tables, chains, maps and
    counters (each nft call costs about 0.4 s with a 65537-element map loaded).
    """
    name = table_name(instance)
    tables: list[str] = []
    chains: list[str] = []
    maps: list[str] = []
    counters: dict[str, tuple[int, int]] = {}
    for family in ("ip6", "netdev"):
        r = run_tool(["nft", "-j", "-t", "list", "table", family, name], netns=None)
        if r.returncode != 0:
            continue
        tables.append(f"{family} {name}")
        for item in json.loads(r.stdout or '{"nftables": []}')["nftables"]:
            if "chain" in item:
                c = item["chain"]
                hook = f" (hook {c['hook']}, priority {c['prio']})" if "hook" in c else ""
                chains.append(f"{family} {name} {c['name']}{hook}")
            elif "map" in item:
                maps.append(f"{family} {name} {item['map']['name']}")
            elif "counter" in item:
                c = item["counter"]
                counters[c["name"]] = (int(c["packets"]), int(c["bytes"]))
    ip6t = run_tool(["ip6tables-save", "-c"], netns=None)
    rules6 = tagged_rules(ip6t.stdout, instance) if ip6t.returncode == 0 else []
    routes = [
        _route_text(r)
        for r in nft_json(
            run_tool(
                ["ip", "-6", "-j", "route", "show", "table", "all", "proto", "0x76"], netns=None
            )
        )
        if in_instance_block(str(r.get("table")), instance)
    ]
    rules = [
        f"pref {r.get('priority')} {_rule_match(r)} lookup {r.get('table')}"
        for r in nft_json(run_tool(["ip", "-6", "-j", "rule", "show"], netns=None))
        if str(r.get("protocol")) in ("118", hex(ROUTE_PROTO))
        and in_instance_block(r.get("table"), instance)
    ]
    return {
        "nft_tables": tables,
        "nft_chains": chains,
        "nft_maps": maps,
        "nft_counters": {k: {"packets": p, "bytes": b} for k, (p, b) in sorted(counters.items())},
        "ip6tables_rules": rules6,
        "routes": routes,
        "rules": rules,
    }


def _route_text(r: Mapping[str, object]) -> str:
    parts = [str(r.get("dst"))]
    encap = r.get("encap")
    if encap:
        parts.append(f"encap {encap}")
    for key in ("gateway", "dev", "table"):
        if r.get(key):
            parts.append(f"{key if key != 'gateway' else 'via'} {r[key]}")
    return " ".join(parts)


def _rule_match(r: Mapping[str, object]) -> str:
    if "fwmark" in r:
        return f"fwmark {r['fwmark']}"
    if "dst" in r:
        return f"to {r['dst']}/{r.get('dstlen', 128)}"
    if "src" in r:
        return f"from {r['src']}/{r.get('srclen', 128)}"
    return "all"
