"""Links, captures and hop records: everything that crosses a link is written down.

:class:`Network` owns the clock, the nodes and the links. A node hands a packet
to :meth:`Network.send`; the network records a :class:`~v6lb.model.hops.Hop`,
appends the packet to that link's capture and delivers it to the receiving
node after the link's delay. A node that refuses a packet calls
:meth:`Network.drop`, which records a Hop with the reason: nothing vanishes
silently.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from v6lb.engines.sim.clock import Clock
from v6lb.model.hops import Hop
from v6lb.model.topology import Topology
from v6lb.wire.pcap import LINKTYPE_RAW, PcapWriter

if TYPE_CHECKING:
    from v6lb.engines.sim.node import SimNode

__all__ = ["Network"]


class Network:
    """The simulated network: nodes, links with MTU and delay, the hop log and captures."""

    def __init__(self, topology: Topology, clock: Clock | None = None) -> None:
        self.topology = topology
        self.clock = clock if clock is not None else Clock()
        self.nodes: dict[str, SimNode] = {}
        self.hops: list[Hop] = []
        self.captures: dict[str, PcapWriter] = {
            lk.name: PcapWriter(LINKTYPE_RAW) for lk in topology.links
        }
        self.down: set[str] = set()
        self.mtu_override: dict[str, int] = {}  # link -> MTU, lowered for a walk-through
        self.labels: dict[bytes, str] = {}  # address -> what notes call it ("pod-1a", "the VIP")
        self._seq = 0
        self._pid = 0

    def add(self, node: SimNode) -> None:
        self.nodes[node.name] = node

    def mtu(self, link: str) -> int:
        """The link's MTU: the topology's, unless a walk-through lowered it."""
        return self.mtu_override.get(link) or self.topology.link(link).mtu

    def label(self, addr: bytes | bytearray) -> str:
        """A name for an address in notes: its node or role if known, else the address."""
        return self.labels.get(bytes(addr)) or str(ipaddress.IPv6Address(bytes(addr)))

    def new_packet_id(self) -> int:
        self._pid += 1
        return self._pid

    def _record(
        self,
        link: str,
        sender: str,
        receiver: str,
        data: bytes,
        pid: int,
        leg: str,
        dropped: str | None,
        note: str,
    ) -> Hop:
        self._seq += 1
        hop = Hop(self._seq, self.clock.now, link, sender, receiver, data, pid, leg, dropped, note)
        self.hops.append(hop)
        return hop

    def send(
        self,
        link: str,
        sender: str,
        receiver: str,
        data: bytes | bytearray,
        pid: int,
        leg: str,
        note: str = "",
    ) -> None:
        """Put ``data`` on ``link`` from ``sender`` to ``receiver`` (who gets it after the delay)."""
        if sender in self.down:
            return  # a dead node sends nothing (its timers may still fire)
        pkt = bytes(data)
        lk = self.topology.link(link)
        if len(pkt) > self.mtu(link):  # a sender must never do this; show it, not hide it
            self._record(link, sender, receiver, pkt, pid, leg, "exceeds-link-mtu", note)
            return
        self._record(link, sender, receiver, pkt, pid, leg, None, note)
        self.captures[link].add(pkt, round(self.clock.now * 1e9))

        def deliver() -> None:
            if receiver in self.down:
                self.drop(receiver, link, sender, pkt, pid, leg, "node-down")
                return
            self.nodes[receiver].receive(bytearray(pkt), link, sender, pid, leg)

        self.clock.after(lk.delay, deliver)

    def drop(
        self,
        node: str,
        link: str,
        sender: str,
        data: bytes | bytearray,
        pid: int,
        leg: str,
        reason: str,
        note: str = "",
    ) -> None:
        """Record that ``node`` dropped ``data`` (which came over ``link`` from ``sender``)."""
        self._record(link, sender, node, bytes(data), pid, leg, reason, note)

    def pcaps(self) -> dict[str, bytes]:
        return {name: w.getvalue() for name, w in self.captures.items()}
