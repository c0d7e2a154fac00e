"""Hop records from real captures: one pcap per link in, :class:`~v6lb.model.hops.Hop` out.

Pure: the caller reads the files and passes their bytes. Each frame becomes one
hop on its link. The sender is the node whose MAC sent the frame (``macs``),
else the link endpoint that holds the source address; the receiver is the node
whose MAC it was sent to, else the endpoint that holds the destination address.

The same packet is followed across links (one ``packet_id``): a NAT66 rewrite or
a tunnel encapsulation keeps the innermost TCP header's sequence number,
acknowledgement, flags and payload length, so a frame continues the latest group
with that key whose last receiver is this frame's sender and which was seen no
longer than :data:`MATCH_WINDOW` before. Neighbour discovery and MLD are left out;
``keep`` (the client's address and ports) keeps only the traced connections.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from v6lb.model.hops import Hop, PacketView
from v6lb.wire.pcap import LINKTYPE_ETHERNET, PcapError, ip_offset, read

__all__ = ["MATCH_WINDOW", "Frame", "frames_from_pcap", "hops_from_frames", "flow_key"]

MATCH_WINDOW: Final = 1.0  # seconds between two hops of one packet, at most
_NOISE: Final = frozenset({130, 131, 132, 133, 134, 135, 136, 137, 143})  # MLD, NDP, redirect


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured IPv6 packet on one link."""

    ts_ns: int
    link: str
    src_mac: str
    dst_mac: str
    data: bytes  # from the IPv6 header on


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def frames_from_pcap(link: str, pcap: bytes) -> list[Frame]:
    """The IPv6 frames of one link's capture (non-IPv6 frames are skipped)."""
    out: list[Frame] = []
    for rec in read(pcap):
        off = ip_offset(rec.linktype, rec.data)
        if off < 0:
            continue
        src = dst = ""
        if rec.linktype == LINKTYPE_ETHERNET and len(rec.data) >= 12:
            dst, src = _mac(rec.data[0:6]), _mac(rec.data[6:12])
        out.append(Frame(rec.ts_ns, link, src, dst, bytes(rec.data[off:])))
    return out


def _noise(p: PacketView) -> bool:
    if p.proto != "icmpv6":
        return False
    t = p.detail.split(" code ")[0]
    names = {"neighbor", "router"}
    if any(t.startswith(n) for n in names):
        return True
    if t.startswith("type "):
        try:
            return int(t.split()[1]) in _NOISE
        except ValueError:
            return False
    return False


def _tcp_key(data: bytes, *, quotes: bool = True) -> tuple[int, ...] | None:
    """(seq, ack, flags, payload length) of the innermost TCP header, or None.

    An ICMPv6 error (also inside a tunnel) about a TCP packet has the key
    (-1 - type, its parameter, then the quoted packet's four): a tunnel or a
    translator that passes the error on keeps all of them (``quotes``: look into
    the quote; False inside one).
    """
    off, nh = 40, data[6] if len(data) >= 40 else -1
    end = 40 + int.from_bytes(data[4:6], "big") if len(data) >= 40 else 0
    for _ in range(8):
        if nh == 6 and off + 20 <= len(data):
            doff = (data[off + 12] >> 4) * 4
            seq = int.from_bytes(data[off + 4 : off + 8], "big")
            ack = int.from_bytes(data[off + 8 : off + 12], "big")
            return seq, ack, data[off + 13], max(0, min(end, len(data)) - off - doff)
        if nh == 58 and quotes and off + 48 <= len(data) and data[off] < 128:
            quoted = _tcp_key(data[off + 8 :], quotes=False)
            if quoted is None:
                return None
            return (-1 - data[off], int.from_bytes(data[off + 4 : off + 8], "big"), *quoted)
        if nh == 41 and off + 40 <= len(data):  # IPv6 in IPv6: start over inside
            data = data[off:]
            end = 40 + int.from_bytes(data[4:6], "big")
            off, nh = 40, data[6]
            continue
        if nh in (0, 43, 60) and off + 8 <= len(data):
            nh, off = data[off], off + (data[off + 1] + 1) * 8
            continue
        return None
    return None


def flow_key(p: PacketView) -> tuple[str, str, int | None, int | None]:
    """The innermost (source, destination, source port, destination port) of a packet."""
    i = p.innermost if p.proto != "icmpv6" else p
    return i.src.addr, i.dst.addr, i.src.port, i.dst.port


def _leg(p: PacketView, data: bytes, client_ports: set[int]) -> str:
    i = p.innermost
    c = p.carried
    if c.proto == "icmpv6" or i.proto == "icmpv6":  # an error, also one passed on in a tunnel
        return "error" if not c.detail.startswith("echo") else "ping"
    if i.proto != "tcp":
        return i.proto
    key = _tcp_key(data)
    flags = key[2] if key else 0
    if flags & 0x02:
        return "handshake"
    if flags & 0x04:
        return "reset"
    if flags & 0x01:
        return "close"
    if key and key[3]:
        return "request" if i.src.port in client_ports else "response"
    return "ack"


def _owner(
    addr: str, link: str, endpoints: Mapping[str, Mapping[str, str]]
) -> str | None:  # address -> node, on this link only
    return endpoints.get(link, {}).get(addr)


def _involves(p: PacketView, client: str, ports: set[int]) -> bool:
    views = [p, p.innermost]
    if p.inner is not None:
        views.append(p.inner)
    for v in views:
        if (v.src.addr == client and v.src.port in ports) or (
            v.dst.addr == client and v.dst.port in ports
        ):
            return True
    return False


def hops_from_frames(
    frames: Iterable[Frame],
    *,
    macs: Mapping[str, str],
    endpoints: Mapping[str, Mapping[str, str]],
    client: str | None = None,
    client_ports: Iterable[int] = (),
    initiators: Iterable[tuple[str, int]] = (),
) -> list[Hop]:
    """Hops, in time order, with matched ``packet_id``\\ s.

    ``macs`` maps a MAC to its node; ``endpoints`` maps a link to {address: node}
    (the fallback when a MAC is unknown). With ``client``, only packet groups in
    which some hop carries the client's address with one of ``client_ports`` are
    kept (health checks and other traffic are left out). ``initiators`` are more
    (address, port) ends of traced connections, such as a proxy's own connection to
    the backend: their packets are kept too, and their data is a ``request``.
    """
    extra = {(str(a), int(p)) for a, p in initiators}
    cports = set(client_ports)
    ports = cports | {p for _, p in extra}
    ordered = sorted(frames, key=lambda f: f.ts_ns)
    t0 = ordered[0].ts_ns if ordered else 0
    hops: list[Hop] = []
    open_groups: dict[tuple[int, ...], list[Hop]] = {}
    next_id = 1
    for f in ordered:
        h = Hop(0, (f.ts_ns - t0) / 1e9, f.link, "?", "?", f.data)
        if h.pkt.proto in ("truncated", "malformed") or _noise(h.pkt):
            continue
        h.sender = (
            macs.get(f.src_mac) or _owner(h.pkt.src.addr, f.link, endpoints) or f.src_mac or "?"
        )
        h.receiver = (
            macs.get(f.dst_mac) or _owner(h.pkt.dst.addr, f.link, endpoints) or f.dst_mac or "?"
        )
        h.leg = _leg(h.pkt, f.data, ports)
        key = _tcp_key(f.data)
        group: Hop | None = None
        if key is not None:
            for cand in reversed(open_groups.get(key, [])):
                if (
                    cand.receiver == h.sender
                    and h.time - cand.time <= MATCH_WINDOW
                    and (cand.link != h.link or cand.sender != h.receiver)
                ):
                    group = cand
                    break
        if group is not None:
            h.packet_id = group.packet_id
            lst = open_groups[key]  # type: ignore[index]
            lst.remove(group)
            lst.append(h)
        else:
            h.packet_id = next_id
            next_id += 1
            if key is not None:
                open_groups.setdefault(key, []).append(h)
        hops.append(h)
    if client is not None:
        keep = {
            h.packet_id
            for h in hops
            if _involves(h.pkt, client, cports) or any(_involves(h.pkt, a, {p}) for a, p in extra)
        }
        hops = [h for h in hops if h.packet_id in keep]
    renum: dict[int, int] = {}
    for n, h in enumerate(hops, 1):
        h.seq = n
        h.packet_id = renum.setdefault(h.packet_id, len(renum) + 1)
    return hops


def hops_from_pcaps(
    pcaps: Mapping[str, bytes],
    *,
    macs: Mapping[str, str],
    endpoints: Mapping[str, Mapping[str, str]],
    client: str | None = None,
    client_ports: Iterable[int] = (),
    initiators: Iterable[tuple[str, int]] = (),
) -> list[Hop]:
    """:func:`hops_from_frames` over one capture per link (``{link: pcap bytes}``)."""
    frames: list[Frame] = []
    for link, data in pcaps.items():
        try:
            frames += frames_from_pcap(link, data)
        except PcapError as exc:
            raise PcapError(f"link {link}: {exc}") from None
    return hops_from_frames(
        frames,
        macs=macs,
        endpoints=endpoints,
        client=client,
        client_ports=client_ports,
        initiators=initiators,
    )


def address_endpoints(links: Iterable[tuple[str, str, Iterable[str]]]) -> dict[str, dict[str, str]]:
    """{link: {address: node}} from (link, node, addresses) triples."""
    out: dict[str, dict[str, str]] = {}
    for link, node, addrs in links:
        for a in addrs:
            out.setdefault(link, {})[str(ipaddress.IPv6Address(a))] = node
    return out
