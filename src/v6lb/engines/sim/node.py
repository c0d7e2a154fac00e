"""The parts every simulated node shares: interfaces, a FIB, routing out, ICMPv6 errors.

A node owns addresses on its links (and on its loopback), a forwarding table
computed from the topology (:func:`v6lb.model.topology.compute_fib`) and a host
stack (:class:`~v6lb.engines.sim.host.HostStack`) for traffic addressed to it.
Routers forward (see :mod:`.router`); hosts and backends only end traffic;
LB nodes run the core forwarders (see :mod:`.lb`).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from v6lb.core.flowhash import flow_hash, flow_hash3, reciprocal_scale
from v6lb.core.icmperr import IcmpErrorSource
from v6lb.core.verdict import DROP, FORWARD, FORWARD_MANY
from v6lb.model.topology import FibEntry, Node, lookup, neighbour
from v6lb.wire.constants import (
    DU_ADDR_UNREACH,
    DU_NO_ROUTE,
    DU_PORT_UNREACH,
    ICMP6_DST_UNREACH,
    ICMP6_PACKET_TOO_BIG,
    ICMP6_TIME_EXCEEDED,
    NH_TCP,
    NH_UDP,
    TE_HOP_LIMIT,
)
from v6lb.wire.encap import OUTER_NEXT_HEADERS
from v6lb.wire.ipv6 import PacketInfo, parse
from v6lb.wire.reasons import Reason

if TYPE_CHECKING:
    from v6lb.core.dsr_decap import DsrDecap
    from v6lb.engines.sim.host import HostStack
    from v6lb.engines.sim.network import Network

__all__ = ["SimNode", "ecmp_index", "mac_of"]

ECMP_SEED = 0  # routers hash flows with the pinned jhash and this seed


def mac_of(node_index: int, iface_index: int) -> bytes:
    """A locally administered MAC for a node's interface (02:76:6c:NN:NN:II)."""
    return bytes((0x02, 0x76, 0x6C, (node_index >> 8) & 0xFF, node_index & 0xFF, iface_index))


def ecmp_index(data: bytes | bytearray, n: int) -> int:
    """Which of ``n`` equal-cost next hops a packet takes: the pinned jhash of its flow."""
    if n <= 1:
        return 0
    info = PacketInfo()
    src, dst = bytes(data[8:24]), bytes(data[24:40])
    if (
        parse(data, info, 0, strict_length=False) == 0
        and info.proto in (NH_TCP, NH_UDP)
        and not info.later_fragment
        and info.l4_off + 4 <= len(data)
    ):
        l4 = info.l4_off
        sport = (data[l4] << 8) | data[l4 + 1]
        dport = (data[l4 + 2] << 8) | data[l4 + 3]
        h = flow_hash(src, dst, sport, dport, ECMP_SEED)
    else:
        h = flow_hash3(src, dst, info.proto, ECMP_SEED)
    return reciprocal_scale(h, n)


def _route_note(entry: FibEntry, target: str | None, i: int, n: int) -> str:
    """The route a router used, in a few words (the hop's receiver is the next hop)."""
    route = f"{entry.origin} route {entry.prefix}"
    if entry.origin == "connected":
        route = f"on-link, connected {entry.prefix}"
    if entry.source is not None:
        route += f" from {entry.source} (source-specific)"
    if n > 1:
        return f"{route}: ECMP picked {target} by flow hash ({i + 1} of {n})"
    return route if entry.origin == "connected" else f"{route} via {target}"


_ERRORS = {
    (ICMP6_DST_UNREACH, DU_NO_ROUTE): "no route: Destination Unreachable to the source",
    (ICMP6_DST_UNREACH, DU_ADDR_UNREACH): "nobody holds the address: Destination Unreachable",
    (ICMP6_DST_UNREACH, DU_PORT_UNREACH): "no listener on the port: Port Unreachable to the source",
    (ICMP6_TIME_EXCEEDED, TE_HOP_LIMIT): "hop limit ran out: Time Exceeded to the source",
}


def icmp_error_note(type_: int, code: int, param: int) -> str:
    """Why an ICMPv6 error is sent, in words."""
    if type_ == ICMP6_PACKET_TOO_BIG:
        return f"packet larger than the next link's MTU: Packet Too Big (MTU {param}) to the source"
    return _ERRORS.get((type_, code), f"ICMPv6 error type {type_} code {code} to the source")


class SimNode:
    """A node on the simulated network. Subclasses decide what ``forwarding`` means."""

    forwarding = False

    def __init__(self, net: Network, spec: Node, index: int) -> None:
        from v6lb.engines.sim.host import HostStack

        self.net = net
        self.spec = spec
        self.name = spec.name
        self.index = index
        topo = net.topology
        self.ifaces: dict[str, list[bytes]] = {}
        self.macs: dict[str, bytes] = {}
        for i, a in enumerate(topo.attachments(self.name)):
            self.ifaces[a.link] = [x.packed for x in a.addresses]
            self.macs[a.link] = mac_of(index, i + 1)
        self.local: set[bytes] = {x for addrs in self.ifaces.values() for x in addrs}
        self.local.update(x.packed for x in spec.loopback)
        self.fib: list[FibEntry] = []
        self.stack: HostStack = HostStack(self)
        self.decap: DsrDecap | None = None
        self._icmp: dict[bytes, IcmpErrorSource] = {}

    # --- addresses -------------------------------------------------------------

    def add_loopback(self, addr: bytes) -> None:
        self.local.add(addr)

    def address_on(self, link: str) -> bytes:
        return self.ifaces[link][0]

    def source_for(self, dst: bytes) -> bytes:
        """Source address selection, simplified: the address of the egress interface."""
        entry = lookup(self.fib, ipaddress.IPv6Address(dst), None)
        if entry is not None:
            return self.address_on(entry.nexthops[0].link)
        return next(iter(self.ifaces.values()))[0]

    @property
    def now(self) -> float:
        return self.net.clock.now

    # --- receiving ---------------------------------------------------------------

    def receive(self, data: bytearray, link: str, sender: str, pid: int, leg: str) -> None:
        dst = bytes(data[24:40])
        if dst in self.local:
            self.deliver(data, link, sender, pid, leg)
        elif self.forwarding:
            self.forward(data, link, sender, pid, leg)
        else:
            self.net.drop(self.name, link, sender, data, pid, leg, "not-for-this-host")

    def deliver(self, data: bytearray, link: str, sender: str, pid: int, leg: str) -> None:
        """Traffic for one of our addresses: decapsulate if it is a DSR tunnel, else the stack."""
        if self.decap is not None and data[6] in OUTER_NEXT_HEADERS:
            action, arg, out = self.decap.process(data, 0, self.now)
            if action == FORWARD:
                assert isinstance(out, bytearray | bytes)
                self.stack.receive(bytearray(out), link, sender, pid, leg, decapsulated=True)
            elif action == FORWARD_MANY:
                return  # an outer fragment held for reassembly
            elif action == DROP:
                self.net.drop(self.name, link, sender, data, pid, leg, Reason(arg).label)
            return
        self.stack.receive(data, link, sender, pid, leg)

    def forward(self, data: bytearray, link: str, sender: str, pid: int, leg: str) -> None:
        self.net.drop(self.name, link, sender, data, pid, leg, "not-a-router")

    # --- sending -----------------------------------------------------------------

    def originate(self, data: bytes | bytearray, leg: str, note: str = "") -> int:
        """Send a packet this node made; return its packet id."""
        pid = self.net.new_packet_id()
        self.route_out(bytearray(data), pid, leg, note=note)
        return pid

    def route_out(
        self,
        data: bytearray,
        pid: int,
        leg: str,
        *,
        ingress: str | None = None,
        sender: str | None = None,
        note: str = "",
        invoking: bytes | None = None,
    ) -> None:
        """Look up the FIB (longest match, source-specific, ECMP) and put the packet on a link.

        ``ingress``/``sender`` are set for forwarded packets: errors then go
        back to the packet's source and the drop is recorded on the link it
        came from. ``invoking``: the packet an error quotes and goes back to the
        source of, when not ``data`` (a translator's: the packet as it arrived).
        """
        dst = ipaddress.IPv6Address(bytes(data[24:40]))
        src = ipaddress.IPv6Address(bytes(data[8:24]))
        at_link = ingress or ""
        prev = sender or self.name
        entry = lookup(self.fib, dst, src)
        about = data if invoking is None else invoking
        if entry is None:
            self.net.drop(self.name, at_link, prev, data, pid, leg, "no-route", note)
            if ingress is not None:
                self.icmp_error(about, ICMP6_DST_UNREACH, DU_NO_ROUTE, 0, ingress)
            return
        n = len(entry.nexthops)
        i = ecmp_index(data, n)
        nh = entry.nexthops[i]
        target = neighbour(self.net.topology, nh, dst)
        if not note and ingress is not None:
            note = _route_note(entry, target, i, n)
        mtu = self.net.mtu(nh.link)
        if len(data) > mtu:
            # RFC 8200 §5 / RFC 4443 §3.2: routers do not fragment; tell the source.
            self.net.drop(self.name, at_link, prev, data, pid, leg, Reason.TOO_BIG.label, note)
            self.icmp_error(about, ICMP6_PACKET_TOO_BIG, 0, mtu, ingress or nh.link)
            return
        if target is None:
            # Neighbour discovery finds nobody with the address (RFC 4443 §3.1 code 3).
            self.net.drop(self.name, at_link, prev, data, pid, leg, "address-unreachable", note)
            if ingress is not None:
                self.icmp_error(about, ICMP6_DST_UNREACH, DU_ADDR_UNREACH, 0, ingress)
            return
        self.net.send(nh.link, self.name, target, data, pid, leg, note)

    def send_on_link(
        self, link: str, target: str, data: bytes | bytearray, pid: int, leg: str, note: str = ""
    ) -> None:
        """Hand a packet to a neighbour directly (layer 2), without a route lookup."""
        self.net.send(link, self.name, target, data, pid, leg, note)

    def icmp_error(
        self, invoking: bytes | bytearray, type_: int, code: int, param: int, link: str
    ) -> None:
        """Send an ICMPv6 error from our address on ``link`` (RFC 4443 §2.4 rules apply)."""
        source = self.ifaces[link][0] if link in self.ifaces else next(iter(self.local))
        gen = self._icmp.get(source)
        if gen is None:
            gen = self._icmp[source] = IcmpErrorSource(source, rate=1000.0, burst=100.0)
        err = gen.make(invoking, type_, code, param, self.now)
        if err is not None:
            self.originate(err, "error", note=icmp_error_note(type_, code, param))
