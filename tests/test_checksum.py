"""The Internet checksum: full computation, RFC 1624 updates, and scapy as the oracle."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import IPv6

from v6lb.wire import build
from v6lb.wire.checksum import (
    checksum,
    fill_l4_checksum,
    ones_sum,
    udp_wire,
    update,
    update16,
    verify,
)
from v6lb.wire.constants import NH_TCP, NH_UDP

addr = st.binary(min_size=16, max_size=16)


def _ref_sum(data: bytes) -> int:
    """RFC 1071 the slow way: add 16-bit words with end-around carry."""
    if len(data) % 2:
        data += b"\x00"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _equiv(a: int, b: int) -> bool:
    return a == b or {a, b} == {0, 0xFFFF}


@given(st.binary(max_size=300))
def test_ones_sum_matches_rfc1071(data: bytes) -> None:
    assert _equiv(ones_sum(data), _ref_sum(data) % 0xFFFF if _ref_sum(data) != 0xFFFF else 0)


@given(addr, addr, st.binary(min_size=20, max_size=200))
def test_full_checksum_matches_rfc1071(src: bytes, dst: bytes, seg: bytes) -> None:
    seg = seg[:16] + b"\x00\x00" + seg[18:]
    pseudo = src + dst + len(seg).to_bytes(4, "big") + bytes([0, 0, 0, NH_TCP])
    ref = (~_ref_sum(pseudo + seg)) & 0xFFFF
    assert _equiv(checksum(src, dst, NH_TCP, seg), ref)


@given(
    addr,
    addr,
    st.binary(min_size=20, max_size=120),
    st.integers(0, 7),
    st.binary(min_size=16, max_size=16),
)
def test_incremental_update_equals_full_recompute(
    src: bytes, dst: bytes, seg: bytes, word: int, new: bytes
) -> None:
    """RFC 1624: update the checksum for a rewritten address and compare with a full recompute."""
    seg = bytearray(seg)
    seg[16:18] = b"\x00\x00"
    c = checksum(src, dst, NH_TCP, seg)
    # Rewrite the destination address (pseudo-header) and one 16-bit word of the segment.
    c1 = update(c, dst, new)
    off = (word * 2) % (len(seg) - 1) & ~1
    if off in (16,):
        off = 0
    old_w = int.from_bytes(seg[off : off + 2], "big")
    new_w = (old_w * 7 + 1) & 0xFFFF
    seg[off : off + 2] = new_w.to_bytes(2, "big")
    c2 = update16(c1, old_w, new_w)
    assert _equiv(c2, checksum(src, new, NH_TCP, seg))


@given(addr, addr, st.integers(0, 65535), st.integers(0, 65535), st.binary(max_size=64))
def test_udp_zero_is_sent_as_ffff(src: bytes, dst: bytes, sp: int, dp: int, payload: bytes) -> None:
    pkt = build.udp(src, dst, sp, dp, payload)
    c = int.from_bytes(pkt[46:48], "big")
    assert c != 0
    assert verify(src, dst, NH_UDP, pkt[40:])
    assert udp_wire(0) == 0xFFFF and udp_wire(5) == 5


def test_computed_udp_zero_becomes_ffff() -> None:
    """Find a datagram whose checksum computes to 0 and check it goes out as 0xFFFF (RFC 8200 §8.1)."""
    src = build.a16("2001:db8::1")
    dst = build.a16("2001:db8::2")
    base = bytearray(build.udp(src, dst, 1000, 2000, b"\x00\x00"))
    # Choose the payload word that makes the sum all-ones.
    base[46:48] = b"\x00\x00"
    need = checksum(src, dst, NH_UDP, base[40:])
    base[48:50] = need.to_bytes(2, "big")
    assert checksum(src, dst, NH_UDP, base[40:]) == 0
    fill_l4_checksum(base, 40, NH_UDP)
    assert base[46:48] == b"\xff\xff"
    assert IPv6(bytes(base))[UDP].chksum == 0xFFFF
    p = IPv6(bytes(base))
    del p[UDP].chksum
    assert IPv6(bytes(p))[UDP].chksum == 0xFFFF  # scapy agrees


@given(addr, addr, st.integers(0, 65535), st.integers(0, 65535), st.binary(max_size=100))
def test_scapy_agrees_with_our_tcp_checksum(
    src: bytes, dst: bytes, sp: int, dp: int, payload: bytes
) -> None:
    pkt = build.tcp(src, dst, sp, dp, payload=payload)
    p = IPv6(bytes(pkt))
    got = p[TCP].chksum
    del p[TCP].chksum
    assert _equiv(IPv6(bytes(p))[TCP].chksum, got)
