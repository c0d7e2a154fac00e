"""IPv6 header and extension-header chain parsing, in place, without raising.

:func:`parse` fills a reusable :class:`PacketInfo` and returns a :class:`Reason`
code (``Reason.OK`` is 0). Nothing is copied and no object is allocated per
packet beyond Python ints; malformed input never raises out of this module.

Rules applied:
- Hop-by-Hop is valid only directly after the IPv6 header (RFC 8200 §4.1).
- The walk stops at ESP and at No Next Header; an unknown next-header value is
  treated as the upper layer and forwarded (RFC 7045 §2.1).
- A first fragment must carry the whole header chain, upper-layer header
  included (RFC 7112 §5); a later fragment carries none of it.
- The chain is limited to :data:`MAX_EXT_HEADERS` headers and
  :data:`MAX_EXT_BYTES` bytes.
"""

from __future__ import annotations

from typing import Final

from v6lb.wire.constants import (
    IPV6_HDR_LEN,
    NH_AH,
    NH_FRAGMENT,
    NH_HOPOPTS,
    NH_ICMPV6,
    NH_TCP,
    NH_UDP,
    OFF_DST,
    OFF_HLIM,
    OFF_SRC,
)
from v6lb.wire.reasons import Reason

MAX_EXT_HEADERS: Final = 8
MAX_EXT_BYTES: Final = 1024

_GENERIC = (0, 43, 60, 135, 139, 140, 253, 254)
_IS_GENERIC = bytes(1 if i in _GENERIC else 0 for i in range(256))
# Minimum upper-layer header sizes the parser guarantees are present.
_L4_MIN = {NH_TCP: 20, NH_UDP: 8, NH_ICMPV6: 4}

_OK = Reason.OK
_TRUNCATED = Reason.TRUNCATED
_BAD_VERSION = Reason.BAD_VERSION
_LENGTH_MISMATCH = Reason.LENGTH_MISMATCH
_EXT_TRUNCATED = Reason.EXT_TRUNCATED
_EXT_TOO_LONG = Reason.EXT_CHAIN_TOO_LONG
_HBH_NOT_FIRST = Reason.HBH_NOT_FIRST
_INCOMPLETE = Reason.INCOMPLETE_CHAIN
_L4_TRUNCATED = Reason.L4_TRUNCATED
_BAD_L4_LEN = Reason.BAD_L4_LENGTH


class PacketInfo:
    """Offsets found by :func:`parse`. One instance is reused for every packet.

    Attributes:
        proto: the upper-layer protocol (the last next-header value of the chain).
        l4_off: offset of the upper-layer header; for a later fragment, of its data.
        end: offset one past the packet's last byte (40 + payload length).
        frag_off: offset of the Fragment header, or -1.
        frag_offset: the fragment offset in bytes (0 for a first fragment or none).
        more_frags: the M flag of the Fragment header.
        later_fragment: True when the upper-layer header is not in this packet.
        n_ext: number of extension headers walked.
        err_ptr: for a drop, the offset of the offending field (for Parameter Problem).
    """

    __slots__ = (
        "proto",
        "l4_off",
        "end",
        "frag_off",
        "frag_offset",
        "more_frags",
        "later_fragment",
        "n_ext",
        "err_ptr",
    )

    def __init__(self) -> None:
        self.proto = 0
        self.l4_off = 0
        self.end = 0
        self.frag_off = -1
        self.frag_offset = 0
        self.more_frags = False
        self.later_fragment = False
        self.n_ext = 0
        self.err_ptr = 0

    @property
    def is_fragment(self) -> bool:
        return self.frag_off >= 0

    def __repr__(self) -> str:
        return (
            f"PacketInfo(proto={self.proto}, l4_off={self.l4_off}, end={self.end}, "
            f"frag_off={self.frag_off}, frag_offset={self.frag_offset}, "
            f"more_frags={self.more_frags}, later_fragment={self.later_fragment}, "
            f"n_ext={self.n_ext})"
        )


def parse(
    buf: bytes | bytearray | memoryview, info: PacketInfo, base: int = 0, strict_length: bool = True
) -> int:
    """Parse the IPv6 packet at ``buf[base:]`` into ``info``; return a :class:`Reason` code.

    With ``strict_length`` the buffer must end exactly where the payload length
    says (a TUN read). Without it, trailing bytes are allowed (link padding, or a
    packet quoted inside an ICMPv6 error, which may also be cut short: then the
    chain is walked as far as the bytes go and ``end`` is the buffer's end).
    """
    n = len(buf)
    if n - base < IPV6_HDR_LEN:
        return _TRUNCATED
    if buf[base] >> 4 != 6:
        return _BAD_VERSION
    end = base + IPV6_HDR_LEN + ((buf[base + 4] << 8) | buf[base + 5])
    if strict_length:
        if end != n:
            return _LENGTH_MISMATCH
    elif end > n:
        end = n
    nh = buf[base + 6]
    off = base + IPV6_HDR_LEN
    info.frag_off = -1
    info.frag_offset = 0
    info.more_frags = False
    info.later_fragment = False
    info.err_ptr = 0
    # Fast path: no extension headers at all.
    if not _IS_GENERIC[nh] and nh != NH_FRAGMENT and nh != NH_AH:
        info.proto = nh
        info.l4_off = off
        info.end = end
        info.n_ext = 0
        need = _L4_MIN.get(nh)
        if need is not None and off + need > end:
            info.err_ptr = off
            return _L4_TRUNCATED if strict_length else _OK
        return _OK
    count = 0
    while True:
        if _IS_GENERIC[nh]:
            if nh == NH_HOPOPTS and count:
                info.err_ptr = off
                return _HBH_NOT_FIRST
            if off + 8 > end:
                info.err_ptr = off
                return _INCOMPLETE if info.frag_off >= 0 else _EXT_TRUNCATED
            hlen = (buf[off + 1] + 1) << 3
        elif nh == NH_FRAGMENT:
            if off + 8 > end:
                info.err_ptr = off
                return _EXT_TRUNCATED
            fo = ((buf[off + 2] << 8) | buf[off + 3]) & 0xFFF8
            info.frag_off = off
            info.frag_offset = fo
            info.more_frags = bool(buf[off + 3] & 1)
            hlen = 8
            if fo:
                info.later_fragment = True
                info.proto = buf[off]
                info.l4_off = off + 8
                info.end = end
                info.n_ext = count + 1
                return _OK
        elif nh == NH_AH:
            if off + 8 > end:
                info.err_ptr = off
                return _INCOMPLETE if info.frag_off >= 0 else _EXT_TRUNCATED
            hlen = (buf[off + 1] + 2) << 2
        else:
            break
        count += 1
        if count > MAX_EXT_HEADERS or off + hlen - base - IPV6_HDR_LEN > MAX_EXT_BYTES:
            info.err_ptr = off
            return _EXT_TOO_LONG
        if off + hlen > end:
            info.err_ptr = off
            return _INCOMPLETE if info.frag_off >= 0 else _EXT_TRUNCATED
        nh = buf[off]
        off += hlen
    info.proto = nh
    info.l4_off = off
    info.end = end
    info.n_ext = count
    need = _L4_MIN.get(nh)
    if need is not None and off + need > end and strict_length:
        info.err_ptr = off
        # RFC 7112 §5: an unfragmented upper-layer header cut short, or a first
        # fragment without the whole chain.
        return _INCOMPLETE if info.frag_off >= 0 and info.more_frags else _L4_TRUNCATED
    # ESP (50) and No Next Header (59) end the walk like any upper layer.
    return _OK


def validate_l4(buf: bytes | bytearray | memoryview, info: PacketInfo) -> int:
    """Check the transport header's own length fields (TCP data offset, UDP length)."""
    if info.later_fragment:
        return _OK
    off = info.l4_off
    proto = info.proto
    if proto == NH_TCP:
        doff = (buf[off + 12] >> 4) << 2
        if doff < 20 or off + doff > info.end:
            return _BAD_L4_LEN
    elif proto == NH_UDP and info.frag_off < 0:
        ulen = (buf[off + 4] << 8) | buf[off + 5]
        if ulen != info.end - off:
            return _BAD_L4_LEN
    return _OK


# --- in-place accessors and setters -------------------------------------------


def get_src(buf: bytes | bytearray | memoryview, base: int = 0) -> bytes:
    return bytes(buf[base + OFF_SRC : base + OFF_SRC + 16])


def get_dst(buf: bytes | bytearray | memoryview, base: int = 0) -> bytes:
    return bytes(buf[base + OFF_DST : base + OFF_DST + 16])


def set_src(buf: bytearray, addr: bytes, base: int = 0) -> None:
    buf[base + OFF_SRC : base + OFF_SRC + 16] = addr


def set_dst(buf: bytearray, addr: bytes, base: int = 0) -> None:
    buf[base + OFF_DST : base + OFF_DST + 16] = addr


def get_port(buf: bytes | bytearray | memoryview, off: int) -> int:
    return (buf[off] << 8) | buf[off + 1]


def set_port(buf: bytearray, off: int, port: int) -> None:
    buf[off] = port >> 8
    buf[off + 1] = port & 0xFF


def get_sport(buf: bytes | bytearray | memoryview, l4_off: int) -> int:
    return (buf[l4_off] << 8) | buf[l4_off + 1]


def get_dport(buf: bytes | bytearray | memoryview, l4_off: int) -> int:
    return (buf[l4_off + 2] << 8) | buf[l4_off + 3]


def set_sport(buf: bytearray, l4_off: int, port: int) -> None:
    buf[l4_off] = port >> 8
    buf[l4_off + 1] = port & 0xFF


def set_dport(buf: bytearray, l4_off: int, port: int) -> None:
    buf[l4_off + 2] = port >> 8
    buf[l4_off + 3] = port & 0xFF


def hop_limit(buf: bytes | bytearray | memoryview, base: int = 0) -> int:
    return buf[base + OFF_HLIM]


def flow_label(buf: bytes | bytearray | memoryview, base: int = 0) -> int:
    return ((buf[base + 1] & 0x0F) << 16) | (buf[base + 2] << 8) | buf[base + 3]


def traffic_class(buf: bytes | bytearray | memoryview, base: int = 0) -> int:
    return ((buf[base] & 0x0F) << 4) | (buf[base + 1] >> 4)


def payload_length(buf: bytes | bytearray | memoryview, base: int = 0) -> int:
    return (buf[base + 4] << 8) | buf[base + 5]


def set_payload_length(buf: bytearray, length: int, base: int = 0) -> None:
    buf[base + 4] = length >> 8
    buf[base + 5] = length & 0xFF


def is_multicast(addr: bytes | bytearray | memoryview) -> bool:
    return addr[0] == 0xFF


def l4_checksum_offset(proto: int) -> int:
    """Offset of the checksum inside the transport header, or -1."""
    if proto == NH_TCP:
        return 16
    if proto == NH_UDP:
        return 6
    if proto == NH_ICMPV6:
        return 2
    return -1
