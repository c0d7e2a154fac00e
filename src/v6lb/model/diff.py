"""Compare what the simulator predicts with what a lab captured, link by link (pure).

Both sides are :class:`~v6lb.model.hops.Hop` lists. For each link the TCP packets
reduce to a set of :class:`Tuple4` (innermost source, destination, source port,
destination port, plus the outer addresses when the packet is encapsulated). An
ICMPv6 error about one of those packets (a Packet Too Big, also one an LB passes
on in a tunnel) reduces to its own addresses, its type and parameter, and the
quoted packet's tuple: who told whom about which flow, on which link (an error an
LB node sent itself is named by that node, not by the source address its engine
picked). The data of a flow's direction seen after such an error about it reached
the end of its way (after a Packet Too Big: the smaller segments) also counts once
more, marked ``after``, on every link it crosses.
Client ports are replaced by labels (``client_ports`` maps a port to, e.g.,
``"C1"``) so a simulated flow and a captured one compare even when their ephemeral
ports differ; a port inside a SNAT range becomes ``"snat"`` (membership of the
configured range is what can be predicted, not the port the kernel picked).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from v6lb.model.hops import Hop, PacketView

__all__ = ["Difference", "Snat", "Tuple4", "compare", "link_tuples"]


@dataclass(frozen=True, slots=True, order=True)
class Tuple4:
    src: str
    dst: str
    sport: str
    dport: str
    outer: str = ""  # "srv6 A -> B" / "ipv6-in-ipv6 A -> B" when encapsulated
    error: str = ""  # an ICMPv6 error: "packet too big mtu 1280 quoting [A]:P -> [B]:Q"
    after: str = (
        ""  # data its sender sent after this error about the flow: "packet too big mtu 1280"
    )

    def __str__(self) -> str:
        if self.error:
            s = f"{self.src} -> {self.dst} icmpv6 {self.error}"
        else:
            s = f"[{self.src}]:{self.sport} -> [{self.dst}]:{self.dport}"
        s = f"{s} in {self.outer}" if self.outer else s
        return f"{s} (data sent after the {self.after})" if self.after else s


@dataclass(frozen=True, slots=True)
class Snat:
    """A NAT VIP's SNAT pool: its prefix and port range."""

    prefix: str
    low: int
    high: int

    def holds(self, addr: str) -> bool:
        try:
            return ipaddress.IPv6Address(addr) in ipaddress.IPv6Network(self.prefix)
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class Difference:
    link: str
    kind: str  # "missing" (predicted, not captured), "unexpected" (captured, not predicted), "no capture"
    what: str

    def __str__(self) -> str:
        return f"{self.link}: {self.kind}: {self.what}"


def _port(
    port: int | None,
    addr: str,
    client: str,
    client_ports: Mapping[int, str],
    snat: Snat | None,
) -> str:
    if port is None:
        return "-"
    if addr == client and port in client_ports:
        return client_ports[port]
    if snat is not None and snat.holds(addr) and snat.low <= port <= snat.high:
        return "snat"
    return str(port)


def _tuple(
    p: PacketView,
    client: str,
    client_ports: Mapping[int, str],
    snat: Snat | None,
    origin: str | None = None,
) -> Tuple4:
    i = p.innermost
    err = p.error
    outer = f"{p.proto} {p.src.addr} -> {p.dst.addr}" if p.carried is not p else ""
    sport = _port(i.src.port, i.src.addr, client, client_ports, snat)
    dport = _port(i.dst.port, i.dst.addr, client, client_ports, snat)
    if err is not None:
        quote = f"[{i.src.addr}]:{sport} -> [{i.dst.addr}]:{dport}"
        src = f"<{origin}>" if origin else err.src.addr
        return Tuple4(src, err.dst.addr, "-", "-", outer, f"{err.detail} quoting {quote}")
    return Tuple4(i.src.addr, i.dst.addr, sport, dport, outer)


def _flow(p: PacketView, client: str, client_ports: Mapping[int, str]) -> tuple[int, bool] | None:
    """(client port, towards the client) of a packet of the client's flows (of the quote, for
    an error), else None."""
    i = p.innermost
    if i.dst.addr == client and i.dst.port is not None and i.dst.port in client_ports:
        return i.dst.port, True
    if i.src.addr == client and i.src.port is not None and i.src.port in client_ports:
        return i.src.port, False
    return None


def link_tuples(
    hops: Iterable[Hop],
    *,
    client: str,
    client_ports: Mapping[int, str],
    snat: Snat | None = None,
    lbs: Collection[str] = (),
) -> dict[str, set[Tuple4]]:
    """{link: tuples} of the TCP packets of the client's flows and of the ICMPv6 errors
    quoting them (drops left out); ``hops`` in time order.

    ``lbs``: the LB nodes. An error one of them sent itself (the first hop of its packet
    is theirs) has the source ``<node>`` instead of an address: each engine picks its
    own source address for its own errors (docs/lab.md), and the node that sent it is
    what can be predicted.
    """
    hops = list(hops)
    origin: dict[int, str] = {}
    for h in hops:
        origin.setdefault(h.packet_id, h.sender)
    told = _told(hops, client, client_ports)
    out: dict[str, set[Tuple4]] = {}
    for h in hops:
        if h.dropped is not None or h.pkt.innermost.proto != "tcp":
            continue
        if h.pkt.carried.proto == "icmpv6" and h.pkt.error is None:
            continue  # an ICMPv6 message too short to quote a header
        i = h.pkt.innermost
        ours = (i.src.addr == client and i.src.port in client_ports) or (
            i.dst.addr == client and i.dst.port in client_ports
        )
        if not ours and not (
            snat is not None and (snat.holds(i.src.addr) or snat.holds(i.dst.addr))
        ):
            continue
        by = origin.get(h.packet_id)
        t = _tuple(h.pkt, client, client_ports, snat, by if by in lbs else None)
        out.setdefault(h.link, set()).add(t)
        c = h.pkt.carried
        if c.proto == "tcp" and "bytes" in c.detail:  # data: after an error about its flow?
            flow = _flow(h.pkt, client, client_ports)
            when = told.get(flow) if flow is not None else None
            if when is not None and h.time >= when[0]:
                out[h.link].add(replace(t, after=when[1]))
    return out


def _told(
    hops: Sequence[Hop], client: str, client_ports: Mapping[int, str]
) -> dict[tuple[int, bool], tuple[float, str]]:
    """{(client port, towards the client): (time, the error)}: when an ICMPv6 error about
    that direction of the flow first reached the end of its way (its packet's last hop).

    Per flow and by time, not by packet: a data plane may cut the data that follows into
    other packets (segmentation offload) than the ones that crossed the next links.
    """
    last: dict[int, Hop] = {}
    for h in hops:
        if h.dropped is None and h.pkt.error is not None:
            last[h.packet_id] = h
    out: dict[tuple[int, bool], tuple[float, str]] = {}
    for h in last.values():
        err = h.pkt.error
        flow = _flow(h.pkt, client, client_ports)
        if err is None or flow is None:
            continue
        if flow not in out or h.time < out[flow][0]:
            out[flow] = (h.time, err.detail)
    return out


def compare(
    predicted: Mapping[str, set[Tuple4]],
    captured: Mapping[str, set[Tuple4]],
    *,
    pcap_sizes: Mapping[str, int] | None = None,
) -> list[Difference]:
    """Every difference, link by link; empty when the capture matches the prediction.

    ``pcap_sizes`` (link -> packets in its capture, -1 when the file is missing):
    each link the prediction uses must have a capture with packets in it.
    """
    diffs: list[Difference] = []
    sizes = pcap_sizes or {}
    for link in sorted(set(predicted) | set(captured)):
        n = sizes.get(link)
        if pcap_sizes is not None and link in predicted and (n is None or n < 0):
            diffs.append(Difference(link, "no capture", "the pcap of this link is missing"))
            continue
        if pcap_sizes is not None and link in predicted and n == 0:
            diffs.append(Difference(link, "no capture", "the pcap of this link is empty"))
            continue
        want, got = predicted.get(link, set()), captured.get(link, set())
        diffs += [Difference(link, "missing", str(t)) for t in sorted(want - got)]
        diffs += [Difference(link, "unexpected", str(t)) for t in sorted(got - want)]
    return diffs


def summary(diffs: Sequence[Difference]) -> list[str]:
    return [str(d) for d in diffs]
