"""Packet builders: IPv6 with extension headers, TCP, UDP, ICMPv6 and ICMPv6 errors.

Off the hot path: tests, the simulator, benchmarks and the ICMPv6 errors the
forwarders send use these. Addresses may be given as text, ``IPv6Address`` or
16 bytes. Every builder returns a ``bytearray`` with valid checksums.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence

from v6lb.wire.checksum import checksum, udp_wire
from v6lb.wire.constants import (
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    IPV6_HDR_LEN,
    MIN_MTU,
    NH_DSTOPTS,
    NH_FRAGMENT,
    NH_HOPOPTS,
    NH_ICMPV6,
    NH_ROUTING,
    NH_TCP,
    NH_UDP,
    RT_SRH,
    TCP_ACK,
)

Addr = str | bytes | bytearray | ipaddress.IPv6Address
ExtHeader = tuple[int, bytes]  # (header type, header bytes; byte 0 is filled in)


def a16(addr: Addr) -> bytes:
    """An address as 16 bytes."""
    if isinstance(addr, bytes | bytearray):
        if len(addr) != 16:
            raise ValueError(f"an IPv6 address is 16 bytes, not {len(addr)}")
        return bytes(addr)
    if isinstance(addr, ipaddress.IPv6Address):
        return addr.packed
    return ipaddress.IPv6Address(addr).packed


def ntop(addr: bytes | bytearray | memoryview) -> str:
    """16 bytes as compressed lower-case text."""
    return str(ipaddress.IPv6Address(bytes(addr)))


def _pad8(body: bytes) -> bytes:
    """Pad an options area with PadN/Pad1 so the header is a multiple of 8 bytes."""
    total = 2 + len(body)
    pad = (-total) % 8
    if pad == 1:
        body += b"\x00"
    elif pad:
        body += bytes([1, pad - 2]) + bytes(pad - 2)
    return body


def options_header(kind: int, options: bytes = b"") -> ExtHeader:
    """A Hop-by-Hop (0) or Destination Options (60) header holding ``options`` TLVs."""
    body = _pad8(options)
    hdr = bytes([0, (2 + len(body)) // 8 - 1]) + body
    return (kind, hdr)


def hbh(options: bytes = b"") -> ExtHeader:
    return options_header(NH_HOPOPTS, options)


def dstopts(options: bytes = b"") -> ExtHeader:
    return options_header(NH_DSTOPTS, options)


def generic_ext(kind: int, body: bytes = b"\x00" * 6) -> ExtHeader:
    """Any header in the RFC 6564 generic format (e.g. an unknown type 253)."""
    if (2 + len(body)) % 8:
        raise ValueError("a generic extension header is a multiple of 8 bytes")
    return (kind, bytes([0, (2 + len(body)) // 8 - 1]) + body)


def fragment(offset: int = 0, more: bool = False, ident: int = 0) -> ExtHeader:
    """RFC 8200 §4.5 Fragment header; ``offset`` in bytes (a multiple of 8)."""
    if offset % 8:
        raise ValueError("a fragment offset is a multiple of 8 bytes")
    return (NH_FRAGMENT, struct.pack("!BBHI", 0, 0, offset | int(more), ident))


def srh(segments: Sequence[Addr], segments_left: int | None = None, tag: int = 0) -> ExtHeader:
    """RFC 8754 Segment Routing Header. ``segments[0]`` is the final segment (list order)."""
    segs = [a16(s) for s in segments]
    left = len(segs) - 1 if segments_left is None else segments_left
    hdr = struct.pack("!BBBBBBH", 0, 2 * len(segs), RT_SRH, left, len(segs) - 1, 0, tag)
    return (NH_ROUTING, hdr + b"".join(segs))


def routing(rtype: int, segments_left: int, data: bytes = b"\x00" * 4) -> ExtHeader:
    """A Routing header of any type (e.g. deprecated type 0, for RFC 5095 tests)."""
    body = bytes([rtype, segments_left]) + data
    if (2 + len(body)) % 8:
        raise ValueError("a routing header is a multiple of 8 bytes")
    return (NH_ROUTING, bytes([0, (2 + len(body)) // 8 - 1]) + body)


def final_destination(dst: bytes, ext: Sequence[ExtHeader]) -> bytes:
    """RFC 8200 §8.1: with a Routing header, the pseudo-header uses the final destination."""
    for kind, body in ext:
        if kind != NH_ROUTING or len(body) < 8 or body[3] == 0:
            continue
        if body[2] == RT_SRH and len(body) >= 24:
            return bytes(body[8:24])  # Segment List[0] is the last segment
        if body[2] == 0 and len(body) >= 24:
            return bytes(body[-16:])
    return dst


def ipv6(
    src: Addr,
    dst: Addr,
    nh: int,
    payload: bytes | bytearray = b"",
    *,
    hop_limit: int = 64,
    flow_label: int = 0,
    traffic_class: int = 0,
    ext: Sequence[ExtHeader] = (),
) -> bytearray:
    """An IPv6 packet: fixed header, the extension headers in order, then ``payload``."""
    chain = bytearray()
    types = [t for t, _ in ext] + [nh]
    for i, (_, body) in enumerate(ext):
        b = bytearray(body)
        b[0] = types[i + 1]
        chain += b
    first = types[0]
    plen = len(chain) + len(payload)
    word0 = (6 << 28) | ((traffic_class & 0xFF) << 20) | (flow_label & 0xFFFFF)
    hdr = struct.pack("!IHBB", word0, plen, first, hop_limit) + a16(src) + a16(dst)
    return bytearray(hdr) + chain + payload


def tcp_segment(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    *,
    seq: int = 0,
    ack: int = 0,
    flags: int = TCP_ACK,
    window: int = 65535,
    options: bytes = b"",
    payload: bytes = b"",
) -> bytes:
    """A TCP header and data with a valid checksum for ``src``/``dst``."""
    if len(options) % 4:
        options += b"\x00" * (4 - len(options) % 4)
    doff = (20 + len(options)) // 4
    hdr = bytearray(
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0, 0)
    )
    seg = hdr + options + payload
    c = checksum(src, dst, NH_TCP, seg)
    seg[16:18] = c.to_bytes(2, "big")
    return bytes(seg)


def udp_datagram(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"") -> bytes:
    seg = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)) + payload
    c = udp_wire(checksum(src, dst, NH_UDP, seg))
    seg[6:8] = c.to_bytes(2, "big")
    return bytes(seg)


def icmpv6_message(src: bytes, dst: bytes, type_: int, code: int, body: bytes) -> bytes:
    msg = bytearray(bytes([type_, code, 0, 0])) + body
    c = checksum(src, dst, NH_ICMPV6, msg)
    msg[2:4] = c.to_bytes(2, "big")
    return bytes(msg)


def tcp(
    src: Addr,
    dst: Addr,
    sport: int,
    dport: int,
    *,
    seq: int = 0,
    ack: int = 0,
    flags: int = TCP_ACK,
    window: int = 65535,
    options: bytes = b"",
    payload: bytes = b"",
    hop_limit: int = 64,
    flow_label: int = 0,
    ext: Sequence[ExtHeader] = (),
) -> bytearray:
    """An IPv6 TCP packet. The checksum uses the fixed header's addresses."""
    s, d = a16(src), a16(dst)
    seg = tcp_segment(
        s,
        final_destination(d, ext),
        sport,
        dport,
        seq=seq,
        ack=ack,
        flags=flags,
        window=window,
        options=options,
        payload=payload,
    )
    return ipv6(s, d, NH_TCP, seg, hop_limit=hop_limit, flow_label=flow_label, ext=ext)


def udp(
    src: Addr,
    dst: Addr,
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    hop_limit: int = 64,
    flow_label: int = 0,
    ext: Sequence[ExtHeader] = (),
) -> bytearray:
    s, d = a16(src), a16(dst)
    seg = udp_datagram(s, final_destination(d, ext), sport, dport, payload)
    return ipv6(s, d, NH_UDP, seg, hop_limit=hop_limit, flow_label=flow_label, ext=ext)


def icmpv6(
    src: Addr,
    dst: Addr,
    type_: int,
    code: int,
    body: bytes = b"",
    *,
    hop_limit: int = 64,
    flow_label: int = 0,
    ext: Sequence[ExtHeader] = (),
) -> bytearray:
    s, d = a16(src), a16(dst)
    msg = icmpv6_message(s, final_destination(d, ext), type_, code, body)
    return ipv6(s, d, NH_ICMPV6, msg, hop_limit=hop_limit, flow_label=flow_label, ext=ext)


def echo_request(
    src: Addr, dst: Addr, ident: int = 1, seq: int = 1, data: bytes = b"", **kw: int
) -> bytearray:
    return icmpv6(src, dst, ICMP6_ECHO_REQUEST, 0, struct.pack("!HH", ident, seq) + data, **kw)  # type: ignore[arg-type]


def echo_reply(
    src: Addr, dst: Addr, ident: int = 1, seq: int = 1, data: bytes = b"", **kw: int
) -> bytearray:
    return icmpv6(src, dst, ICMP6_ECHO_REPLY, 0, struct.pack("!HH", ident, seq) + data, **kw)  # type: ignore[arg-type]


def icmpv6_error(
    src: Addr,
    dst: Addr,
    type_: int,
    code: int,
    invoking: bytes | bytearray | memoryview,
    param: int = 0,
    *,
    hop_limit: int = 64,
) -> bytearray:
    """An ICMPv6 error quoting as much of ``invoking`` as fits in 1280 bytes (RFC 4443 §2.4 c).

    ``param`` is the 32-bit field after the checksum: the MTU for Packet Too Big,
    the pointer for Parameter Problem, zero otherwise.
    """
    room = MIN_MTU - IPV6_HDR_LEN - 8
    body = struct.pack("!I", param & 0xFFFFFFFF) + bytes(invoking[:room])
    return icmpv6(src, dst, type_, code, body, hop_limit=hop_limit)
