"""Hop records: what was seen on each link, for the simulator and for lab captures alike.

A :class:`Hop` is one packet observed on one link (or dropped at one node),
with the raw bytes and a decoded :class:`PacketView`. :func:`diff` compares the
views of consecutive hops of the same packet and returns what changed as
:class:`Change` records: a :class:`ChangeKind` (what was rewritten), whether it
was seen on the packet inside a new encapsulation, and the human text. The
explain builder (:mod:`v6lb.model.explain`) prints the text and decides from
the kinds; nothing about a mode is hard-coded in the records themselves.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum

from v6lb.wire.constants import (
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    NH_ICMPV6,
    NH_IPV6,
    NH_ROUTING,
    NH_TCP,
    NH_UDP,
    PROTO_NAMES,
)
from v6lb.wire.encap import Encap
from v6lb.wire.ipv6 import PacketInfo, flow_label, parse

TCP_FLAG_NAMES = ((0x02, "S"), (0x10, "A"), (0x08, "P"), (0x01, "F"), (0x04, "R"))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An address and, for TCP/UDP, a port (ICMPv6 echo: the identifier in ``port``)."""

    addr: str
    port: int | None = None

    def __str__(self) -> str:
        return f"[{self.addr}]:{self.port}" if self.port is not None else self.addr


@dataclass(frozen=True, slots=True)
class PacketView:
    """A decoded packet: outer header, transport, and the inner packet if encapsulated."""

    src: Endpoint
    dst: Endpoint
    proto: str  # tcp, udp, icmpv6, ipv6 (IPv6-in-IPv6), srv6 (SRH + IPv6), or a number
    hop_limit: int
    flow_label: int
    length: int
    detail: str = ""  # TCP flags and payload size, ICMPv6 type, ...
    inner: PacketView | None = None
    segments: tuple[str, ...] = ()

    @property
    def innermost(self) -> PacketView:
        v = self
        while v.inner is not None:
            v = v.inner
        return v

    @property
    def encapsulated(self) -> bool:
        return self.inner is not None

    @property
    def error(self) -> PacketView | None:
        """The ICMPv6 error this packet is or carries in a tunnel (its ``inner`` is the quote)."""
        v: PacketView | None = self
        while v is not None:
            if v.proto == "icmpv6":
                return v if v.inner is not None else None
            v = v.inner
        return None

    @property
    def carried(self) -> PacketView:
        """The packet a tunnel carries (or this one): like :attr:`innermost`, but an ICMPv6
        error stays itself instead of giving way to the packet it quotes."""
        v = self
        while v.inner is not None and v.proto != "icmpv6":
            v = v.inner
        return v

    def summary(self) -> str:
        s = f"{self.src} -> {self.dst} {self.proto}"
        if self.detail:
            s += f" {self.detail}"
        if self.inner is not None:
            s += f" carrying [{self.inner.summary()}]"
        return s


def _tcp_flags(b: int) -> str:
    return "".join(n for bit, n in TCP_FLAG_NAMES if b & bit) or "."


def view(pkt: bytes | bytearray, depth: int = 0) -> PacketView:
    """Decode an IPv6 packet for display. Never raises: junk decodes as far as it goes."""
    data = bytes(pkt)
    info = PacketInfo()
    rc = parse(data, info, 0, strict_length=False)
    if len(data) < 40:
        return PacketView(Endpoint("?"), Endpoint("?"), "truncated", 0, 0, len(data))
    src = str(ipaddress.IPv6Address(data[8:24]))
    dst = str(ipaddress.IPv6Address(data[24:40]))
    hl = data[7]
    fl = flow_label(data)
    if rc:
        return PacketView(Endpoint(src), Endpoint(dst), "malformed", hl, fl, len(data))
    segments: tuple[str, ...] = ()
    # Look for an SRH in the chain (for display only).
    off = 40
    nh = data[6]
    while nh in (0, 43, 60) and off + 8 <= len(data):
        if nh == NH_ROUTING and data[off + 2] == 4:
            n = (data[off + 1] * 8) // 16
            segments = tuple(
                str(ipaddress.IPv6Address(data[off + 8 + 16 * i : off + 24 + 16 * i]))
                for i in range(n)
            )
        nh, off = data[off], off + (data[off + 1] + 1) * 8
    l4 = info.l4_off
    proto = info.proto
    if info.later_fragment:
        return PacketView(
            Endpoint(src),
            Endpoint(dst),
            PROTO_NAMES.get(proto, str(proto)),
            hl,
            fl,
            len(data),
            f"fragment offset {info.frag_offset}",
        )
    if proto == NH_IPV6 and depth < 3:
        inner = view(data[l4 : info.end], depth + 1)
        name = (Encap.SRV6 if segments else Encap.IP6IP6).views[0]
        return PacketView(
            Endpoint(src), Endpoint(dst), name, hl, fl, len(data), "", inner, segments
        )
    if proto in (NH_TCP, NH_UDP) and l4 + 4 <= len(data):
        sp = (data[l4] << 8) | data[l4 + 1]
        dp = (data[l4 + 2] << 8) | data[l4 + 3]
        if proto == NH_TCP and l4 + 14 <= len(data):
            doff = (data[l4 + 12] >> 4) * 4
            payload = max(0, info.end - l4 - doff)
            detail = f"[{_tcp_flags(data[l4 + 13])}]" + (f" {payload} bytes" if payload else "")
        else:
            detail = f"{max(0, info.end - l4 - 8)} bytes"
        return PacketView(
            Endpoint(src, sp), Endpoint(dst, dp), PROTO_NAMES[proto], hl, fl, len(data), detail
        )
    if proto == NH_ICMPV6 and l4 + 4 <= len(data):
        t, c = data[l4], data[l4 + 1]
        names = {
            1: "destination unreachable",
            2: "packet too big",
            3: "time exceeded",
            4: "parameter problem",
            128: "echo request",
            129: "echo reply",
        }
        detail = names.get(t, f"type {t}") + (f" code {c}" if c else "")
        ident: int | None = None
        quoted: PacketView | None = None
        if t in (ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY) and l4 + 6 <= len(data):
            ident = (data[l4 + 4] << 8) | data[l4 + 5]
        if t == 2 and l4 + 8 <= len(data):
            detail += f" mtu {int.from_bytes(data[l4 + 4 : l4 + 8], 'big')}"
        if t < 128 and len(data) >= l4 + 48 and depth < 3:
            quoted = view(data[l4 + 8 :], depth + 1)
        return PacketView(
            Endpoint(src, ident), Endpoint(dst, ident), "icmpv6", hl, fl, len(data), detail, quoted
        )
    return PacketView(
        Endpoint(src), Endpoint(dst), PROTO_NAMES.get(proto, str(proto)), hl, fl, len(data)
    )


class ChangeKind(Enum):
    """What a node changed in a packet, between two hops of it."""

    ENCAP = "encap"  # wrapped in an outer header (IPv6-in-IPv6 or SRv6)
    DECAP = "decap"  # the outer header removed
    SRC_ADDR = "src-addr"
    SRC_PORT = "src-port"
    DST_ADDR = "dst-addr"
    DST_PORT = "dst-port"
    HOP_LIMIT = "hop-limit"

    @property
    def rewrites_address(self) -> bool:
        """An address or a port was rewritten (NAT-like), not the framing or the hop limit."""
        return self in _ADDRESS_KINDS

    @property
    def rewrites_source(self) -> bool:
        return self in (ChangeKind.SRC_ADDR, ChangeKind.SRC_PORT)

    @property
    def rewrites_destination(self) -> bool:
        return self in (ChangeKind.DST_ADDR, ChangeKind.DST_PORT)


_ADDRESS_KINDS = frozenset(
    (ChangeKind.SRC_ADDR, ChangeKind.SRC_PORT, ChangeKind.DST_ADDR, ChangeKind.DST_PORT)
)


@dataclass(frozen=True, slots=True)
class Change:
    """One change a node made to a packet: its kind, and the text explain prints.

    ``inner``: seen on the packet inside an encapsulation the node added (the
    text then starts with "inner ").
    """

    kind: ChangeKind
    text: str
    inner: bool = False


def diff(prev: PacketView, cur: PacketView) -> list[Change]:
    """What differs between the same packet before and after a node."""
    out: list[Change] = []
    # An ICMPv6 error's quote is not a tunnel: only a packet carried in one counts.
    cur_tunnelled, prev_tunnelled = cur.carried is not cur, prev.carried is not prev
    if cur_tunnelled and not prev_tunnelled:
        kind = (Encap.viewed_as(cur.proto) or Encap.IP6IP6).title
        out.append(
            Change(
                ChangeKind.ENCAP, f"encapsulated in {kind}: outer {cur.src.addr} -> {cur.dst.addr}"
            )
        )
        inner = cur.inner
        if inner is not None:
            out.extend(Change(c.kind, f"inner {c.text}", True) for c in diff(prev, inner))
        return out
    if prev_tunnelled and not cur_tunnelled and prev.inner is not None:
        out.append(Change(ChangeKind.DECAP, "decapsulated"))
        out.extend(diff(prev.inner, cur))
        return out
    if prev.src.addr != cur.src.addr:
        out.append(Change(ChangeKind.SRC_ADDR, f"source {prev.src.addr} -> {cur.src.addr}"))
    if prev.src.port != cur.src.port and prev.proto in ("tcp", "udp"):
        out.append(Change(ChangeKind.SRC_PORT, f"source port {prev.src.port} -> {cur.src.port}"))
    if prev.dst.addr != cur.dst.addr:
        out.append(Change(ChangeKind.DST_ADDR, f"destination {prev.dst.addr} -> {cur.dst.addr}"))
    if prev.dst.port != cur.dst.port and prev.proto in ("tcp", "udp"):
        out.append(
            Change(ChangeKind.DST_PORT, f"destination port {prev.dst.port} -> {cur.dst.port}")
        )
    if prev.hop_limit != cur.hop_limit:
        out.append(Change(ChangeKind.HOP_LIMIT, f"hop limit {prev.hop_limit} -> {cur.hop_limit}"))
    return out


@dataclass(slots=True)
class Hop:
    """One packet on one link (``dropped`` set when a node dropped it instead).

    ``packet_id`` ties together the hops of one packet as it crosses nodes (a
    node that rewrites or encapsulates keeps the id); ``leg`` names the part of
    the exchange ("request", "reply", "handshake", ...).
    """

    seq: int
    time: float
    link: str
    sender: str
    receiver: str
    data: bytes
    packet_id: int = 0
    leg: str = ""
    dropped: str | None = None  # the drop reason label, at ``receiver``
    note: str = ""  # what the node that sent it did, in its own words (optional)
    pkt: PacketView = field(init=False)

    def __post_init__(self) -> None:
        self.pkt = view(self.data)
