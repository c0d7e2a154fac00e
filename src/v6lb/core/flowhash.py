"""Linux's ``jhash`` and the flow keys that nftables hashes, bit for bit.

The kernel engine picks a backend with an nftables statement such as::

    meta mark set jhash ip6 saddr . ip6 daddr . tcp sport . tcp dport mod 65537 seed 0x5eed

and this module predicts its result exactly, so the Python data plane, the
simulator and the kernel choose the same backend for the same flow.

Kernel facts this module encodes (``include/linux/jhash.h``, ``net/netfilter/nft_hash.c``):

* ``jhash`` is Bob Jenkins' lookup3: ``a = b = c = 0xdeadbeef + length + initval``;
  the key is read as little-endian 32-bit words, 12 bytes per ``__jhash_mix``
  while more than 12 bytes remain; the last 1..12 bytes are added into
  ``a``, ``b``, ``c`` (as if zero-padded) and ``__jhash_final`` runs; an empty key
  returns ``c`` unmixed.
* nftables hashes the concatenation register as laid out in memory: every field
  is padded with zero bytes up to a multiple of 4. A port is 2 bytes in network
  order followed by 2 zero bytes; a protocol number is 1 byte and 3 zero bytes.
* The result is scaled with ``reciprocal_scale``: ``(hash * n) >> 32``, not
  ``hash % n``; ``offset`` is then added.

``tests/test_flowhash.py`` checks all three key forms against nft's own marks
(Linux 6.18, nft 1.0.6: every flow agreed).

The fast paths (`flow_hash`, `flow_hash2`, `flow_hash3`, `flow_hash_packet`) are
unrolled for their fixed key lengths. They mask to 32 bits only where the next
rotation needs an exact 32-bit value: the low 32 bits of ``+``, ``-`` and ``^``
depend only on the low 32 bits of their operands, so the other masks are
redundant.
"""

from __future__ import annotations

import struct
from typing import TypeAlias

__all__ = [
    "BytesLike",
    "JHASH_INITVAL",
    "flow_hash",
    "flow_hash2",
    "flow_hash3",
    "flow_hash_packet",
    "flow_index",
    "flow_key",
    "flow_key2",
    "flow_key3",
    "jhash",
    "reciprocal_scale",
]

JHASH_INITVAL = 0xDEADBEEF
"""The lookup3 "golden" start value, as in ``include/linux/jhash.h``."""

BytesLike: TypeAlias = bytes | bytearray | memoryview
"""What the hash functions accept for keys, addresses and packets."""

_M32 = 0xFFFFFFFF
_U4 = struct.Struct("<4I")
_U8 = struct.Struct("<8I")
_U2H = struct.Struct("<2H")


def _rol32(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def jhash(data: BytesLike, initval: int = 0) -> int:
    """Return Linux ``jhash(data, len(data), initval)``: a 32-bit unsigned int.

    This is the general form, for any length. The flow helpers below are
    specialised for the keys nftables builds and are several times faster.
    """
    key = bytes(data)
    length = len(key)
    a = b = c = (JHASH_INITVAL + length + initval) & _M32
    if length == 0:
        return c
    # The tail (1..12 bytes) is added byte by byte in the kernel; reading it
    # zero-padded as little-endian words adds exactly the same values.
    tail = length - 1 - (length - 1) % 12
    padded = key + b"\0" * (tail + 12 - length)
    words = struct.unpack(f"<{len(padded) // 4}I", padded)
    for i in range(0, len(words), 3):
        a = (a + words[i]) & _M32
        b = (b + words[i + 1]) & _M32
        c = (c + words[i + 2]) & _M32
        if i * 4 == tail:
            break
        # __jhash_mix
        a = (a - c) & _M32
        a ^= _rol32(c, 4)
        c = (c + b) & _M32
        b = (b - a) & _M32
        b ^= _rol32(a, 6)
        a = (a + c) & _M32
        c = (c - b) & _M32
        c ^= _rol32(b, 8)
        b = (b + a) & _M32
        a = (a - c) & _M32
        a ^= _rol32(c, 16)
        c = (c + b) & _M32
        b = (b - a) & _M32
        b ^= _rol32(a, 19)
        a = (a + c) & _M32
        c = (c - b) & _M32
        c ^= _rol32(b, 4)
        b = (b + a) & _M32
    # __jhash_final
    c ^= b
    c = (c - _rol32(b, 14)) & _M32
    a ^= c
    a = (a - _rol32(c, 11)) & _M32
    b ^= a
    b = (b - _rol32(a, 25)) & _M32
    c ^= b
    c = (c - _rol32(b, 16)) & _M32
    a ^= c
    a = (a - _rol32(c, 4)) & _M32
    b ^= a
    b = (b - _rol32(a, 14)) & _M32
    c ^= b
    c = (c - _rol32(b, 24)) & _M32
    return c


def reciprocal_scale(h: int, n: int) -> int:
    """The kernel's ``reciprocal_scale``: map a 32-bit hash onto ``range(n)``.

    ``nft ... jhash ... mod n`` uses this, not ``h % n``.
    """
    return (h * n) >> 32


def flow_index(h: int, n: int, offset: int = 0) -> int:
    """What ``jhash ... mod n offset OFFSET`` yields for the hash ``h``."""
    return ((h * n) >> 32) + offset


# --- keys ------------------------------------------------------------------


def _port_bytes(port: int) -> bytes:
    return port.to_bytes(2, "big") + b"\0\0"


def flow_key(src: BytesLike, dst: BytesLike, sport: int, dport: int) -> bytes:
    """The 40-byte key of ``ip6 saddr . ip6 daddr . tcp sport . tcp dport``."""
    return bytes(src) + bytes(dst) + _port_bytes(sport) + _port_bytes(dport)


def flow_key2(src: BytesLike, sport: int) -> bytes:
    """The 20-byte key of ``ip6 saddr . tcp sport``."""
    return bytes(src) + _port_bytes(sport)


def flow_key3(src: BytesLike, dst: BytesLike, proto: int) -> bytes:
    """The 36-byte key of ``ip6 saddr . ip6 daddr . meta l4proto`` (or ``ip6 nexthdr``)."""
    return bytes(src) + bytes(dst) + bytes((proto, 0, 0, 0))


# --- unrolled fast paths ---------------------------------------------------
#
# Each block below is __jhash_mix or __jhash_final with the masking reduced:
# a variable is masked when it is about to be rotated (rotation needs the exact
# 32-bit value); everything else may carry a few high bits, which never reach
# the low 32 bits of the result.


def _hash_40(
    w0: int,
    w1: int,
    w2: int,
    w3: int,
    w4: int,
    w5: int,
    w6: int,
    w7: int,
    w8: int,
    w9: int,
    seed: int,
) -> int:
    init = 0xDEADBEEF + 40 + seed
    a = init + w0
    b = init + w1
    c = (init + w2) & 0xFFFFFFFF
    # mix 1
    a = ((a - c) ^ ((c << 4) | (c >> 28))) & 0xFFFFFFFF
    c += b
    b = ((b - a) ^ ((a << 6) | (a >> 26))) & 0xFFFFFFFF
    a += c
    c = ((c - b) ^ ((b << 8) | (b >> 24))) & 0xFFFFFFFF
    b += a
    a = ((a - c) ^ ((c << 16) | (c >> 16))) & 0xFFFFFFFF
    c += b
    b = ((b - a) ^ ((a << 19) | (a >> 13))) & 0xFFFFFFFF
    a += c
    c = ((c - b) ^ ((b << 4) | (b >> 28))) & 0xFFFFFFFF
    b += a
    a += w3
    b += w4
    c = (c + w5) & 0xFFFFFFFF
    # mix 2
    a = ((a - c) ^ ((c << 4) | (c >> 28))) & 0xFFFFFFFF
    c += b
    b = ((b - a) ^ ((a << 6) | (a >> 26))) & 0xFFFFFFFF
    a += c
    c = ((c - b) ^ ((b << 8) | (b >> 24))) & 0xFFFFFFFF
    b += a
    a = ((a - c) ^ ((c << 16) | (c >> 16))) & 0xFFFFFFFF
    c += b
    b = ((b - a) ^ ((a << 19) | (a >> 13))) & 0xFFFFFFFF
    a += c
    c = ((c - b) ^ ((b << 4) | (b >> 28))) & 0xFFFFFFFF
    b += a
    a += w6
    b += w7
    c = (c + w8) & 0xFFFFFFFF
    # mix 3
    a = ((a - c) ^ ((c << 4) | (c >> 28))) & 0xFFFFFFFF
    c += b
    b = ((b - a) ^ ((a << 6) | (a >> 26))) & 0xFFFFFFFF
    a += c
    c = ((c - b) ^ ((b << 8) | (b >> 24))) & 0xFFFFFFFF
    b += a
    a = ((a - c) ^ ((c << 16) | (c >> 16))) & 0xFFFFFFFF
    c += b
    b = ((b - a) ^ ((a << 19) | (a >> 13))) & 0xFFFFFFFF
    a += c
    c = ((c - b) ^ ((b << 4) | (b >> 28))) & 0xFFFFFFFF
    b = (b + a) & 0xFFFFFFFF
    # tail: 4 bytes
    a += w9
    # final
    c = ((c ^ b) - ((b << 14) | (b >> 18))) & 0xFFFFFFFF
    a = ((a ^ c) - ((c << 11) | (c >> 21))) & 0xFFFFFFFF
    b = ((b ^ a) - ((a << 25) | (a >> 7))) & 0xFFFFFFFF
    c = ((c ^ b) - ((b << 16) | (b >> 16))) & 0xFFFFFFFF
    a = ((a ^ c) - ((c << 4) | (c >> 28))) & 0xFFFFFFFF
    b = ((b ^ a) - ((a << 14) | (a >> 18))) & 0xFFFFFFFF
    return ((c ^ b) - ((b << 24) | (b >> 8))) & 0xFFFFFFFF


def flow_hash(src: BytesLike, dst: BytesLike, sport: int, dport: int, seed: int = 0) -> int:
    """jhash of ``ip6 saddr . ip6 daddr . tcp sport . tcp dport`` (40 bytes) with ``seed``.

    ``src`` and ``dst`` are the 16 address bytes; ports are host integers. The
    same key serves ``udp sport``/``udp dport`` (``th sport``/``th dport``).
    """
    w0, w1, w2, w3 = _U4.unpack(src)
    w4, w5, w6, w7 = _U4.unpack(dst)
    # A port is stored as [hi, lo, 0, 0]; read little-endian that is lo<<8 | hi.
    return _hash_40(
        w0,
        w1,
        w2,
        w3,
        w4,
        w5,
        w6,
        w7,
        ((sport & 0xFF) << 8) | (sport >> 8),
        ((dport & 0xFF) << 8) | (dport >> 8),
        seed,
    )


def flow_hash_packet(packet: BytesLike, l3_offset: int, l4_offset: int, seed: int = 0) -> int:
    """`flow_hash` read straight from a packet buffer, without copying.

    ``l3_offset`` is where the IPv6 header starts and ``l4_offset`` where the
    TCP/UDP header starts (after any extension headers). Equal to
    ``flow_hash(src, dst, sport, dport, seed)`` for that packet.
    """
    w0, w1, w2, w3, w4, w5, w6, w7 = _U8.unpack_from(packet, l3_offset + 8)
    # The port bytes read little-endian are exactly the padded key words.
    w8, w9 = _U2H.unpack_from(packet, l4_offset)
    return _hash_40(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, seed)


def flow_hash2(src: BytesLike, sport: int, seed: int = 0) -> int:
    """jhash of ``ip6 saddr . tcp sport`` (20 bytes) with ``seed``."""
    w0: int
    w1: int
    w2: int
    w3: int
    w0, w1, w2, w3 = _U4.unpack(src)
    init = 0xDEADBEEF + 20 + seed
    a = init + w0
    b = init + w1
    c = (init + w2) & 0xFFFFFFFF
    a = ((a - c) ^ ((c << 4) | (c >> 28))) & 0xFFFFFFFF
    c += b
    b = ((b - a) ^ ((a << 6) | (a >> 26))) & 0xFFFFFFFF
    a += c
    c = ((c - b) ^ ((b << 8) | (b >> 24))) & 0xFFFFFFFF
    b += a
    a = ((a - c) ^ ((c << 16) | (c >> 16))) & 0xFFFFFFFF
    c += b
    b = ((b - a) ^ ((a << 19) | (a >> 13))) & 0xFFFFFFFF
    a += c
    c = ((c - b) ^ ((b << 4) | (b >> 28))) & 0xFFFFFFFF
    b += a
    # tail: 8 bytes
    a += w3
    b = (b + (((sport & 0xFF) << 8) | (sport >> 8))) & 0xFFFFFFFF
    c = ((c ^ b) - ((b << 14) | (b >> 18))) & 0xFFFFFFFF
    a = ((a ^ c) - ((c << 11) | (c >> 21))) & 0xFFFFFFFF
    b = ((b ^ a) - ((a << 25) | (a >> 7))) & 0xFFFFFFFF
    c = ((c ^ b) - ((b << 16) | (b >> 16))) & 0xFFFFFFFF
    a = ((a ^ c) - ((c << 4) | (c >> 28))) & 0xFFFFFFFF
    b = ((b ^ a) - ((a << 14) | (a >> 18))) & 0xFFFFFFFF
    return ((c ^ b) - ((b << 24) | (b >> 8))) & 0xFFFFFFFF


def flow_hash3(src: BytesLike, dst: BytesLike, proto: int, seed: int = 0) -> int:
    """jhash of ``ip6 saddr . ip6 daddr . meta l4proto`` (36 bytes) with ``seed``.

    DSR hashes fragmented packets on this 3-tuple, because only the first
    fragment carries ports. Pass the upper-layer protocol (``meta l4proto``:
    6 for TCP in every fragment of a TCP datagram) so all fragments agree.
    """
    w0: int
    w1: int
    w2: int
    w3: int
    w4: int
    w5: int
    w6: int
    w7: int
    w0, w1, w2, w3 = _U4.unpack(src)
    w4, w5, w6, w7 = _U4.unpack(dst)
    init = 0xDEADBEEF + 36 + seed
    a = init + w0
    b = init + w1
    c = (init + w2) & 0xFFFFFFFF
    a = ((a - c) ^ ((c << 4) | (c >> 28))) & 0xFFFFFFFF
    c += b
    b = ((b - a) ^ ((a << 6) | (a >> 26))) & 0xFFFFFFFF
    a += c
    c = ((c - b) ^ ((b << 8) | (b >> 24))) & 0xFFFFFFFF
    b += a
    a = ((a - c) ^ ((c << 16) | (c >> 16))) & 0xFFFFFFFF
    c += b
    b = ((b - a) ^ ((a << 19) | (a >> 13))) & 0xFFFFFFFF
    a += c
    c = ((c - b) ^ ((b << 4) | (b >> 28))) & 0xFFFFFFFF
    b += a
    a += w3
    b += w4
    c = (c + w5) & 0xFFFFFFFF
    a = ((a - c) ^ ((c << 4) | (c >> 28))) & 0xFFFFFFFF
    c += b
    b = ((b - a) ^ ((a << 6) | (a >> 26))) & 0xFFFFFFFF
    a += c
    c = ((c - b) ^ ((b << 8) | (b >> 24))) & 0xFFFFFFFF
    b += a
    a = ((a - c) ^ ((c << 16) | (c >> 16))) & 0xFFFFFFFF
    c += b
    b = ((b - a) ^ ((a << 19) | (a >> 13))) & 0xFFFFFFFF
    a += c
    c = ((c - b) ^ ((b << 4) | (b >> 28))) & 0xFFFFFFFF
    b += a
    # tail: 12 bytes (the loop runs only while more than 12 remain)
    a += w6
    b = (b + w7) & 0xFFFFFFFF
    c += proto & 0xFF
    c = ((c ^ b) - ((b << 14) | (b >> 18))) & 0xFFFFFFFF
    a = ((a ^ c) - ((c << 11) | (c >> 21))) & 0xFFFFFFFF
    b = ((b ^ a) - ((a << 25) | (a >> 7))) & 0xFFFFFFFF
    c = ((c ^ b) - ((b << 16) | (b >> 16))) & 0xFFFFFFFF
    a = ((a ^ c) - ((c << 4) | (c >> 28))) & 0xFFFFFFFF
    b = ((b ^ a) - ((a << 14) | (a >> 18))) & 0xFFFFFFFF
    return ((c ^ b) - ((b << 24) | (b >> 8))) & 0xFFFFFFFF
