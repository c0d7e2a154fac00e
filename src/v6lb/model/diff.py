"""Compare what the simulator predicts with what a lab captured, link by link (pure).

Both sides are :class:`~v6lb.model.hops.Hop` lists. For each link the TCP packets
reduce to a set of :class:`Tuple4` (innermost source, destination, source port,
destination port, plus the outer addresses when the packet is encapsulated).
Client ports are replaced by labels (``client_ports`` maps a port to, e.g.,
``"C1"``) so a simulated flow and a captured one compare even when their ephemeral
ports differ; a port inside a SNAT range becomes ``"snat"`` (membership of the
configured range is what can be predicted, not the port the kernel picked).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from v6lb.model.hops import Hop, PacketView

__all__ = ["Difference", "Snat", "Tuple4", "compare", "link_tuples"]


@dataclass(frozen=True, slots=True, order=True)
class Tuple4:
    src: str
    dst: str
    sport: str
    dport: str
    outer: str = ""  # "srv6 A -> B" / "ipv6-in-ipv6 A -> B" when encapsulated

    def __str__(self) -> str:
        s = f"[{self.src}]:{self.sport} -> [{self.dst}]:{self.dport}"
        return f"{s} in {self.outer}" if self.outer else s


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
) -> Tuple4:
    i = p.innermost
    outer = f"{p.proto} {p.src.addr} -> {p.dst.addr}" if p.encapsulated else ""
    return Tuple4(
        i.src.addr,
        i.dst.addr,
        _port(i.src.port, i.src.addr, client, client_ports, snat),
        _port(i.dst.port, i.dst.addr, client, client_ports, snat),
        outer,
    )


def link_tuples(
    hops: Iterable[Hop],
    *,
    client: str,
    client_ports: Mapping[int, str],
    snat: Snat | None = None,
) -> dict[str, set[Tuple4]]:
    """{link: tuples} of the TCP packets of the client's flows (drops left out)."""
    out: dict[str, set[Tuple4]] = {}
    for h in hops:
        if h.dropped is not None or h.pkt.innermost.proto != "tcp" or h.pkt.proto == "icmpv6":
            continue
        i = h.pkt.innermost
        ours = (i.src.addr == client and i.src.port in client_ports) or (
            i.dst.addr == client and i.dst.port in client_ports
        )
        if not ours and not (
            snat is not None and (snat.holds(i.src.addr) or snat.holds(i.dst.addr))
        ):
            continue
        out.setdefault(h.link, set()).add(_tuple(h.pkt, client, client_ports, snat))
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
