"""PROXY protocol v2 (v6lb.core.proxyproto): golden bytes, round trips, and refusals."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from v6lb.core.proxyproto import (
    SIGNATURE,
    Command,
    Family,
    ProxyHeader,
    ProxyProtocolError,
    Tlv,
    Transport,
    crc32c,
    decode,
    detect,
    encode,
    encode_local,
    encode_proxy,
)

GOLDEN_V6 = (
    b"\r\n\r\n\x00\r\nQUIT\n"  # signature
    b"\x21"  # version 2, command PROXY
    b"\x21"  # AF_INET6, STREAM
    b"\x00\x24"  # 36 address bytes follow
    + IPv6Address("2001:db8::1").packed
    + IPv6Address("2001:db8:a::80").packed
    + b"\x12\x67"  # 4711
    + b"\x00\x50"  # 80
)


def test_signature() -> None:
    assert SIGNATURE == b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"


def test_golden_tcp6() -> None:
    assert encode_proxy("2001:db8::1", "2001:db8:a::80", 4711, 80) == GOLDEN_V6
    hdr, used = decode(GOLDEN_V6 + b"GET / HTTP/1.1\r\n") or (None, 0)
    assert used == 52 and hdr is not None
    assert hdr.command is Command.PROXY and hdr.family is Family.INET6
    assert hdr.transport is Transport.STREAM
    assert (hdr.src, hdr.dst, hdr.src_port, hdr.dst_port) == (
        IPv6Address("2001:db8::1"),
        IPv6Address("2001:db8:a::80"),
        4711,
        80,
    )


def test_golden_tcp4_udp6_and_local() -> None:
    v4 = encode_proxy("192.0.2.1", "198.51.100.2", 1000, 443)
    assert v4[12:16] == b"\x21\x11\x00\x0c" and len(v4) == 28
    assert v4[16:] == bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 1000, 443)
    udp6 = encode_proxy("2001:db8::1", "2001:db8::2", 53, 53, transport="udp")
    assert udp6[13] == 0x22
    assert encode_local() == SIGNATURE + b"\x20\x00\x00\x00"
    local = decode(encode_local())
    assert local is not None and local[0].is_local and local[0].src is None


def test_local_ignores_addresses() -> None:
    # Section 2.2: a receiver must ignore the address block of a LOCAL header.
    data = bytearray(GOLDEN_V6)
    data[12] = 0x20
    got = decode(bytes(data))
    assert got is not None
    assert got[0].command is Command.LOCAL and got[0].src is None and got[1] == 52


def test_tlvs_and_crc32c() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 check value
    wire = encode_proxy(
        "2001:db8::1", "2001:db8::2", 1, 2, tlvs=((Tlv.AUTHORITY, b"example.com"),), checksum=True
    )
    got = decode(wire)
    assert got is not None
    hdr, used = got
    assert used == len(wire)
    assert hdr.tlv(Tlv.AUTHORITY) == b"example.com"
    assert hdr.tlv(Tlv.CRC32C) is not None and hdr.tlv(Tlv.ALPN) is None
    broken = bytearray(wire)
    broken[20] ^= 1  # an address byte: the CRC no longer matches
    with pytest.raises(ProxyProtocolError, match="CRC32C"):
        decode(bytes(broken))


def test_unix_family_round_trip() -> None:
    hdr = ProxyHeader(Command.PROXY, Family.UNIX, Transport.STREAM, "/run/a.sock", "/run/b.sock")
    wire = encode(hdr)
    assert wire[13] == 0x31 and len(wire) == 16 + 216
    got = decode(wire)
    assert got is not None and got[0] == hdr


def test_incremental_and_detection() -> None:
    assert detect(b"") is None and detect(SIGNATURE[:5]) is None
    assert detect(b"GET / HTTP/1.1") is False and detect(SIGNATURE) is True
    for cut in range(len(GOLDEN_V6)):
        assert decode(GOLDEN_V6[:cut]) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "signature"),
        (SIGNATURE + b"\x11\x21\x00\x00", "version 1"),
        (SIGNATURE + b"\x22\x21\x00\x00", "unknown command"),
        (SIGNATURE + b"\x21\x41\x00\x00", "unknown command, family"),
        (SIGNATURE + b"\x21\x21\x00\x04" + b"\x00" * 4, "needs 36 address bytes"),
        (GOLDEN_V6[:14] + b"\x00\x26" + GOLDEN_V6[16:] + b"\x01\x00", "cut short"),
        (GOLDEN_V6[:14] + b"\x00\x28" + GOLDEN_V6[16:] + b"\x01\x00\x09\x00", "runs past"),
    ],
)
def test_malformed(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        decode(data)


def test_encode_refuses_mixed_families() -> None:
    with pytest.raises(ValueError):
        encode_proxy("2001:db8::1", "192.0.2.1", 1, 2)
    with pytest.raises(ValueError):
        encode_proxy("2001:db8::1", "2001:db8::2", 1, 2, transport="sctp")


addr6 = st.integers(0, 2**128 - 1).map(IPv6Address)
addr4 = st.integers(0, 2**32 - 1).map(IPv4Address)
port = st.integers(0, 65535)
tlv = st.tuples(st.sampled_from([0x01, 0x02, 0x04, 0x05, 0x20, 0xE0]), st.binary(max_size=40))


@given(
    st.one_of(st.tuples(addr6, addr6), st.tuples(addr4, addr4)),
    port,
    port,
    st.lists(tlv, max_size=3),
    st.booleans(),
)
def test_round_trip(
    addrs: tuple[IPv6Address, IPv6Address] | tuple[IPv4Address, IPv4Address],
    sport: int,
    dport: int,
    tlvs: list[tuple[int, bytes]],
    crc: bool,
) -> None:
    wire = encode_proxy(addrs[0], addrs[1], sport, dport, tlvs=tuple(tlvs), checksum=crc)
    got = decode(wire + b"payload")
    assert got is not None
    hdr, used = got
    assert used == len(wire)
    assert (hdr.src, hdr.dst, hdr.src_port, hdr.dst_port) == (addrs[0], addrs[1], sport, dport)
    assert list(hdr.tlvs[: len(tlvs)]) == tlvs
