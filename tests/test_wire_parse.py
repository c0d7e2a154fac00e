"""Golden cases for the IPv6 codec: bytes in -> Reason and offsets, never an exception."""

from __future__ import annotations

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    IPv6ExtHdrSegmentRouting,
)
from scapy.layers.ipsec import AH
from scapy.packet import Raw

from v6lb.wire import build
from v6lb.wire.constants import NH_ESP, NH_ICMPV6, NH_NONE, NH_TCP, NH_UDP
from v6lb.wire.ipv6 import (
    MAX_EXT_HEADERS,
    PacketInfo,
    parse,
    set_dport,
    set_dst,
    set_sport,
    set_src,
    validate_l4,
)
from v6lb.wire.reasons import Reason

S, D = "2001:db8::1", "2001:db8::2"

# (description, scapy expression, expected reason, expected proto, expected l4 offset)
OK_CASES = [
    ("plain tcp", "IPv6(src=S,dst=D)/TCP(sport=1,dport=80)", Reason.OK, NH_TCP, 40),
    ("plain udp", "IPv6(src=S,dst=D)/UDP(sport=1,dport=53)/b'x'", Reason.OK, NH_UDP, 40),
    ("echo", "IPv6(src=S,dst=D)/ICMPv6EchoRequest()", Reason.OK, NH_ICMPV6, 40),
    ("hbh then tcp", "IPv6(src=S,dst=D)/IPv6ExtHdrHopByHop()/TCP()", Reason.OK, NH_TCP, 48),
    (
        "hbh, dstopts, routing type 0, tcp",
        "IPv6(src=S,dst=D)/IPv6ExtHdrHopByHop()/IPv6ExtHdrDestOpt()/IPv6ExtHdrRouting(addresses=[S])/TCP()",
        Reason.OK,
        NH_TCP,
        40 + 8 + 8 + 24,
    ),
    (
        "srh type 4 with two segments",
        "IPv6(src=S,dst=D)/IPv6ExtHdrSegmentRouting(addresses=[S,D])/UDP()",
        Reason.OK,
        NH_UDP,
        40 + 8 + 32,
    ),
    (
        "ah then tcp",
        "IPv6(src=S,dst=D)/AH(nh=6,payloadlen=4,spi=1,icv=b'\\0'*12)/TCP()",
        Reason.OK,
        NH_TCP,
        40 + 24,
    ),
    ("esp stops the walk", "IPv6(src=S,dst=D,nh=50)/Raw(b'\\0'*16)", Reason.OK, NH_ESP, 40),
    ("no next header", "IPv6(src=S,dst=D,nh=59)", Reason.OK, NH_NONE, 40),
    ("unknown next header 253 is walked (RFC 7045)", None, Reason.OK, NH_TCP, 48),
    (
        "first fragment with whole chain",
        "IPv6(src=S,dst=D)/IPv6ExtHdrFragment(m=1,id=7)/TCP()",
        Reason.OK,
        NH_TCP,
        48,
    ),
    (
        "atomic fragment",
        "IPv6(src=S,dst=D)/IPv6ExtHdrFragment(m=0,id=7)/UDP()",
        Reason.OK,
        NH_UDP,
        48,
    ),
]


def _build(expr: str | None) -> bytes:
    if expr is None:
        return bytes(build.tcp(S, D, 1, 80, ext=[build.generic_ext(253)]))
    env = {
        "IPv6": IPv6,
        "TCP": TCP,
        "UDP": UDP,
        "ICMPv6EchoRequest": ICMPv6EchoRequest,
        "IPv6ExtHdrHopByHop": IPv6ExtHdrHopByHop,
        "IPv6ExtHdrDestOpt": IPv6ExtHdrDestOpt,
        "IPv6ExtHdrRouting": IPv6ExtHdrRouting,
        "IPv6ExtHdrSegmentRouting": IPv6ExtHdrSegmentRouting,
        "IPv6ExtHdrFragment": IPv6ExtHdrFragment,
        "AH": AH,
        "Raw": Raw,
        "S": S,
        "D": D,
    }
    return bytes(eval(expr, env))  # noqa: S307 - fixture expressions, written above


@pytest.mark.parametrize(
    ("desc", "expr", "reason", "proto", "l4"), OK_CASES, ids=[c[0] for c in OK_CASES]
)
def test_parse_ok(desc: str, expr: str | None, reason: Reason, proto: int, l4: int) -> None:
    data = _build(expr)
    info = PacketInfo()
    assert parse(data, info) == reason
    assert (info.proto, info.l4_off, info.end) == (proto, l4, len(data))


def test_later_fragment_has_no_l4_header() -> None:
    data = _build("IPv6(src=S,dst=D)/IPv6ExtHdrFragment(offset=100,m=0,nh=6,id=7)/Raw(b'a'*16)")
    info = PacketInfo()
    assert parse(data, info) == Reason.OK
    assert (
        info.later_fragment
        and info.frag_offset == 800
        and info.proto == NH_TCP
        and info.l4_off == 48
    )


def _chain(n: int) -> bytes:
    return bytes(build.tcp(S, D, 1, 2, ext=[build.dstopts()] * n))


DROP_CASES = [
    ("empty", b"", Reason.TRUNCATED),
    ("39 bytes", bytes(build.tcp(S, D, 1, 2))[:39], Reason.TRUNCATED),
    ("version 4", b"\x45" + bytes(build.tcp(S, D, 1, 2))[1:], Reason.BAD_VERSION),
    ("payload length too long", bytes(build.tcp(S, D, 1, 2))[:-1], Reason.LENGTH_MISMATCH),
    ("payload length too short", bytes(build.tcp(S, D, 1, 2)) + b"\x00", Reason.LENGTH_MISMATCH),
    ("tcp header cut", _build("IPv6(src=S,dst=D,nh=6,plen=8)/Raw(b'\\0'*8)"), Reason.L4_TRUNCATED),
    (
        "extension chain past the end",
        _build("IPv6(src=S,dst=D,nh=60,plen=8)/Raw(b'\\x06\\x05'+b'\\0'*6)"),
        Reason.EXT_TRUNCATED,
    ),
    ("chain over the limit", _chain(MAX_EXT_HEADERS + 1), Reason.EXT_CHAIN_TOO_LONG),
    (
        "hbh not first",
        _build("IPv6(src=S,dst=D)/IPv6ExtHdrDestOpt()/IPv6ExtHdrHopByHop()/TCP()"),
        Reason.HBH_NOT_FIRST,
    ),
    (
        "first fragment without the tcp header (RFC 7112)",
        _build("IPv6(src=S,dst=D,plen=12)/IPv6ExtHdrFragment(m=1,nh=6,id=1)/Raw(b'\\0'*4)"),
        Reason.INCOMPLETE_CHAIN,
    ),
    (
        "first fragment with the chain cut after the fragment header (RFC 7112)",
        _build(
            "IPv6(src=S,dst=D,plen=12)/IPv6ExtHdrFragment(m=1,nh=60,id=1)/Raw(b'\\x06\\x01\\0\\0')"
        ),
        Reason.INCOMPLETE_CHAIN,
    ),
]


@pytest.mark.parametrize(("desc", "data", "reason"), DROP_CASES, ids=[c[0] for c in DROP_CASES])
def test_parse_drops(desc: str, data: bytes, reason: Reason) -> None:
    info = PacketInfo()
    assert parse(data, info) == reason


def test_chain_at_the_limit_is_accepted() -> None:
    info = PacketInfo()
    assert parse(_chain(MAX_EXT_HEADERS), info) == Reason.OK
    assert info.n_ext == MAX_EXT_HEADERS


def test_validate_l4_checks_tcp_offset_and_udp_length() -> None:
    info = PacketInfo()
    pkt = build.udp(S, D, 1, 2, b"abcd")
    assert parse(pkt, info) == 0 and validate_l4(pkt, info) == 0
    pkt[44:46] = (99).to_bytes(2, "big")
    assert validate_l4(pkt, info) == Reason.BAD_L4_LENGTH
    t = build.tcp(S, D, 1, 2)
    t[52] = 0xF0  # data offset 60 bytes > segment
    assert parse(t, info) == 0 and validate_l4(t, info) == Reason.BAD_L4_LENGTH


def test_setters_rewrite_in_place() -> None:
    pkt = build.tcp(S, D, 1000, 80)
    info = PacketInfo()
    parse(pkt, info)
    set_src(pkt, build.a16("2001:db8::a"))
    set_dst(pkt, build.a16("fd00::b"))
    set_sport(pkt, info.l4_off, 4242)
    set_dport(pkt, info.l4_off, 8080)
    p = IPv6(bytes(pkt))
    assert (p.src, p.dst, p[TCP].sport, p[TCP].dport) == ("2001:db8::a", "fd00::b", 4242, 8080)


def test_builders_match_scapy_byte_for_byte() -> None:
    ours = build.tcp(
        S, D, 1234, 80, seq=7, ack=9, flags=0x18, window=1000, payload=b"GET /", flow_label=0x12345
    )
    theirs = (
        IPv6(src=S, dst=D, fl=0x12345, hlim=64)
        / TCP(sport=1234, dport=80, seq=7, ack=9, flags="PA", window=1000)
        / Raw(b"GET /")
    )
    assert bytes(ours) == bytes(theirs)
    assert bytes(build.udp(S, D, 5, 53, b"q")) == bytes(
        IPv6(src=S, dst=D) / UDP(sport=5, dport=53) / Raw(b"q")
    )
    assert bytes(build.echo_request(S, D, ident=3, seq=4, data=b"ping")) == bytes(
        IPv6(src=S, dst=D) / ICMPv6EchoRequest(id=3, seq=4, data=b"ping")
    )
    assert bytes(build.tcp(S, D, 1, 2, ext=[build.srh([S, D])])) == bytes(
        IPv6(src=S, dst=D)
        / IPv6ExtHdrSegmentRouting(addresses=[S, D], segleft=1, lastentry=1)
        / TCP(sport=1, dport=2, flags="A", window=65535)
    )
