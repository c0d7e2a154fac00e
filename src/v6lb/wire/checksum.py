"""The Internet checksum (RFC 1071) with the IPv6 pseudo-header, and RFC 1624 updates.

The one's-complement sum of 16-bit words is congruent to the big-endian integer
value of the data modulo 0xFFFF, because 2**16 ≡ 1 (mod 0xFFFF). So a whole sum is
one ``int.from_bytes`` and one ``%``, both in C, and an incremental update of
any even-aligned field is ``(csum + old - new) % 0xFFFF``.

Normal form: every checksum this module returns lies in 0x0000..0xFFFE, the form
a full computation over non-zero data gives (RFC 1624 §3: -0 is never produced).
A received 0xFFFF is equivalent to 0x0000 and is normalised by an update.
UDP is the exception the caller handles: a computed 0 is sent as 0xFFFF
(RFC 8200 §8.1), see :func:`udp_wire`.
"""

from __future__ import annotations

from typing import Final

from v6lb.wire.constants import (
    CSUM_OFF_ICMPV6,
    CSUM_OFF_TCP,
    CSUM_OFF_UDP,
    NH_ICMPV6,
    NH_TCP,
    NH_UDP,
    OFF_SRC,
)

_M: Final = 0xFFFF

CSUM_OFFSETS: Final = {NH_TCP: CSUM_OFF_TCP, NH_UDP: CSUM_OFF_UDP, NH_ICMPV6: CSUM_OFF_ICMPV6}

_from_bytes = int.from_bytes


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The one's-complement sum of ``data`` (odd length padded with a zero byte), mod 0xFFFF."""
    n = _from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    return n % _M


def pseudo_header_sum(
    src: bytes | memoryview, dst: bytes | memoryview, length: int, nh: int
) -> int:
    """RFC 8200 §8.1 pseudo-header: source, destination, upper-layer length, next header."""
    return (_from_bytes(src, "big") + _from_bytes(dst, "big") + length + nh) % _M


def checksum(
    src: bytes | memoryview, dst: bytes | memoryview, nh: int, l4: bytes | bytearray | memoryview
) -> int:
    """Full checksum of an upper-layer segment whose checksum field holds zero."""
    n = _from_bytes(l4, "big")
    if len(l4) & 1:
        n <<= 8
    total = _from_bytes(src, "big") + _from_bytes(dst, "big") + len(l4) + nh + n
    return (-total) % _M


def verify(
    src: bytes | memoryview, dst: bytes | memoryview, nh: int, l4: bytes | bytearray | memoryview
) -> bool:
    """True if the segment's checksum (in place) is valid. UDP's 0 ("none") is invalid in IPv6."""
    if nh == NH_UDP and len(l4) >= 8 and l4[6] == 0 and l4[7] == 0:
        return False
    n = _from_bytes(l4, "big")
    if len(l4) & 1:
        n <<= 8
    total = _from_bytes(src, "big") + _from_bytes(dst, "big") + len(l4) + nh + n
    return total % _M == 0


def update(
    csum: int, old: bytes | bytearray | memoryview, new: bytes | bytearray | memoryview
) -> int:
    """RFC 1624 eqn. 3 for a field of even length at an even offset: HC' = ~(~HC + ~m + m')."""
    return (csum + _from_bytes(old, "big") - _from_bytes(new, "big")) % _M


def update16(csum: int, old: int, new: int) -> int:
    """:func:`update` for one 16-bit word given as integers (ports, identifiers)."""
    return (csum + old - new) % _M


def udp_wire(csum: int) -> int:
    """RFC 8200 §8.1: a computed UDP checksum of zero is transmitted as 0xFFFF."""
    return csum or 0xFFFF


def fill_l4_checksum(buf: bytearray, l4_off: int, nh: int, end: int | None = None) -> None:
    """Compute and write the transport checksum of the packet in ``buf`` (full recompute).

    ``buf`` holds an IPv6 packet; ``l4_off`` is the upper-layer header's offset;
    the pseudo-header uses the addresses in the fixed header (no Routing header
    final-destination substitution: callers with an SRH pass the right packet).
    """
    off = CSUM_OFFSETS.get(nh)
    if off is None:
        return
    stop = len(buf) if end is None else end
    c = l4_off + off
    buf[c] = 0
    buf[c + 1] = 0
    mv = memoryview(buf)
    value = checksum(
        mv[OFF_SRC : OFF_SRC + 16], mv[OFF_SRC + 16 : OFF_SRC + 32], nh, mv[l4_off:stop]
    )
    if nh == NH_UDP:
        value = udp_wire(value)
    buf[c] = value >> 8
    buf[c + 1] = value & 0xFF
