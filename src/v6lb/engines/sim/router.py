"""A router: longest-prefix-match forwarding, hop limit, ICMPv6 errors, ECMP.

RFC 8200 §3: the hop limit is decremented by each node that forwards; a
packet that arrives with 1 or 0 is discarded and the source gets Time
Exceeded code 0 (RFC 4443 §3.3). No route: Destination Unreachable code 0;
nobody on the link holds the address: code 3 (§3.1). A packet larger than
the next link's MTU: Packet Too Big with that MTU (§3.2), never fragmented.
Equal-cost routes are chosen per flow with the pinned jhash
(:func:`~v6lb.engines.sim.node.ecmp_index`).
"""

from __future__ import annotations

from v6lb.engines.sim.node import SimNode
from v6lb.wire.constants import ICMP6_TIME_EXCEEDED, TE_HOP_LIMIT
from v6lb.wire.reasons import Reason

__all__ = ["RouterNode"]


class RouterNode(SimNode):
    forwarding = True

    def forward(self, data: bytearray, link: str, sender: str, pid: int, leg: str) -> None:
        if data[7] <= 1:
            self.net.drop(self.name, link, sender, data, pid, leg, Reason.HOP_LIMIT_EXCEEDED.label)
            self.icmp_error(data, ICMP6_TIME_EXCEEDED, TE_HOP_LIMIT, 0, link)
            return
        data[7] -= 1
        self.route_out(data, pid, leg, ingress=link, sender=sender)
