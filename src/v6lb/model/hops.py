"""Hop records: what was seen on each link, for the simulator and for lab captures alike.

A :class:`Hop` is one packet observed on one link (or dropped at one node),
with the raw bytes and a decoded :class:`PacketView`. The explain builder
(:mod:`v6lb.model.explain`) compares the views of consecutive hops of the same
packet to say what changed and where; nothing about a mode is hard-coded in
the records themselves.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

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
        name = "srv6" if segments else "ipv6-in-ipv6"
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
