"""RFC 6296 NPTv6: vectors, golden packets, drop rules, ICMPv6 errors, properties."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.packet import Raw

import npt_fixtures as fx
from v6lb.core.nptv6 import NptForwarder, NptMapping, NptPrefixError, parse_prefix
from v6lb.core.verdict import ACTION_NAMES, PORT_INSIDE, PORT_OUTSIDE
from v6lb.wire import build
from v6lb.wire.checksum import verify
from v6lb.wire.ipv6 import PacketInfo, parse
from v6lb.wire.reasons import Reason

SCAPY = {
    "IPv6": IPv6,
    "TCP": TCP,
    "UDP": UDP,
    "Raw": Raw,
    "ICMPv6EchoRequest": ICMPv6EchoRequest,
    "ICMPv6EchoReply": ICMPv6EchoReply,
    "ICMPv6TimeExceeded": ICMPv6TimeExceeded,
    "ICMPv6PacketTooBig": ICMPv6PacketTooBig,
    "ICMPv6DestUnreach": ICMPv6DestUnreach,
    "ICMPv6ParamProblem": ICMPv6ParamProblem,
    "IPv6ExtHdrHopByHop": IPv6ExtHdrHopByHop,
    "IPv6ExtHdrDestOpt": IPv6ExtHdrDestOpt,
    "IPv6ExtHdrFragment": IPv6ExtHdrFragment,
    "IN_HOST": fx.IN_HOST,
    "OUT_HOST": fx.OUT_HOST,
    "REMOTE": fx.REMOTE,
    "LB": fx.LB,
}


def _l4_checksum(data: bytes) -> tuple[int, int]:
    """(outer transport checksum, checksum of the quoted packet's transport or 0)."""
    info = PacketInfo()
    parse(data, info, 0, strict_length=False)
    off = {6: 16, 17: 6, 58: 2}.get(info.proto)
    ck = (
        int.from_bytes(data[info.l4_off + off : info.l4_off + off + 2], "big")
        if off and not info.later_fragment
        else 0
    )
    qck = 0
    if info.proto == 58 and data[info.l4_off] < 128:
        q = data[info.l4_off + 8 :]
        qi = PacketInfo()
        if parse(q, qi, 0, strict_length=False) == 0:
            qoff = {6: 16, 17: 6, 58: 2}.get(qi.proto)
            if qoff and qi.l4_off + qoff + 2 <= len(q):
                qck = int.from_bytes(q[qi.l4_off + qoff : qi.l4_off + qoff + 2], "big")
    return ck, qck


def _assert_checksums_valid(data: bytes) -> None:
    """scapy re-dissects our output and recomputes the transport checksum; they must agree."""
    p = IPv6(data)
    layer = p.payload
    while layer.__class__.__name__.startswith("IPv6ExtHdr"):
        if layer.__class__.__name__ == "IPv6ExtHdrFragment" and layer.offset:
            layer = None
            break
        layer = layer.payload
    if layer is not None:
        field = "chksum" if isinstance(layer, TCP | UDP) else "cksum"
        got = getattr(layer, field)
        layer.setfieldval(field, None)
        want = getattr(IPv6(bytes(p)).getlayer(layer.__class__), field)
        assert got == want or {got, want} == {0, 0xFFFF}, (
            f"{layer.__class__.__name__} {got:#x} != {want:#x}"
        )
    info = PacketInfo()
    assert parse(data, info) == 0
    if not info.later_fragment and info.proto in (6, 17, 58):
        assert verify(data[8:24], data[24:40], info.proto, data[info.l4_off :])


def _run(
    cases: list[tuple[str, str, str, str, str]], mapping: NptMapping, extra: dict[str, object]
) -> None:
    for name, in_expr, port, verdict, expected in cases:
        env = dict(SCAPY, **extra)
        inp = bytes(eval(in_expr, env))  # noqa: S307 - fixture expressions
        fwd = NptForwarder([mapping], build.a16(fx.LB))
        buf = bytearray(inp)
        action, arg, data = fwd.process(buf, PORT_INSIDE if port == "in" else PORT_OUTSIDE, 0.0)
        assert ACTION_NAMES[action] == verdict, name
        if verdict == "drop":
            assert Reason(arg).label == expected, name
            assert fwd.counters.drops[arg] == 1
            continue
        assert isinstance(data, bytearray)
        ck, qck = _l4_checksum(inp)
        env.update(CK=ck, QCK=qck, IN=Raw(inp[: 1280 - 48]))
        want = bytes(eval(expected, env))  # noqa: S307
        assert bytes(data) == want, name
        _assert_checksums_valid(bytes(data))
        if verdict == "forward":
            assert arg == (PORT_OUTSIDE if port == "in" else PORT_INSIDE)


def test_golden_48() -> None:
    _run(fx.GOLDEN, NptMapping(fx.INSIDE, fx.OUTSIDE), {})


def test_golden_64() -> None:
    m = NptMapping(fx.INSIDE64, fx.OUTSIDE64)
    mapped = m.translate("fd00:1:2:3::2")
    assert isinstance(mapped, ipaddress.IPv6Address)
    _run(fx.GOLDEN64, m, {"MAP64": str(mapped)})


def test_rfc_6296_example_both_ways() -> None:
    m = NptMapping("FD01:0203:0405::/48", "2001:0DB8:0001::/48")
    assert m.adjustment == 0xD54F
    assert str(m.translate("FD01:0203:0405:0001::1234")) == "2001:db8:1:d550::1234"
    assert str(m.translate("2001:0DB8:0001:D550::1234", reverse=True)) == "fd01:203:405:1::1234"


def test_netfilter_vector_64() -> None:
    assert (
        str(NptMapping("1:2:3:4::/64", "5:6:7:8::/64").translate("1:2:3:4::1")) == "5:6:7:8:ffef::1"
    )


def test_ffff_result_is_written_as_zero() -> None:
    m = NptMapping(fx.INSIDE, fx.OUTSIDE)
    # subnet s with s + 0xd54f == 0xffff -> written 0x0000 (RFC 6296 §3.2)
    s = 0xFFFF - 0xD54F
    out = m.translate(f"fd01:203:405:{s:x}::1")
    assert str(out) == "2001:db8:1::1"
    assert str(m.translate("2001:db8:1::1", reverse=True)) == f"fd01:203:405:{s:x}::1"


def test_drop_rules() -> None:
    m = NptMapping(fx.INSIDE, fx.OUTSIDE)
    assert m.translate("fd01:203:405:ffff::1") is Reason.NPT_NO_MAPPING
    assert m.translate("2001:db8:1:ffff::1", reverse=True) is Reason.NPT_NO_MAPPING
    m64 = NptMapping(fx.INSIDE64, fx.OUTSIDE64)
    assert m64.translate("fd00:1:2:3:ffff:ffff:ffff:ffff") is Reason.NPT_NO_ADJUSTABLE_WORD
    # §3.5: the first IID word that is not 0xffff is the one adjusted.
    out = m64.translate("fd00:1:2:3:ffff:ffff:0:1")
    assert isinstance(out, ipaddress.IPv6Address)
    assert out.packed[8:12] == b"\xff\xff\xff\xff" and out.packed[14:] == b"\x00\x01"
    assert m.translate("fd02::1") is Reason.NO_MATCH


@pytest.mark.parametrize(
    ("inside", "outside"),
    [
        ("fd00::/32", "2001:db8::/32"),
        ("fd00:ab00::/40", "2001:db8:100::/40"),
        ("fd00:1::/56", "2001:db8:2:300::/56"),
        ("fd00:1:2::/48", "2001:db8:9::/48"),
        ("fd00:1:2:3::/64", "2001:db8:5:6::/64"),
        ("fd00::/44", "2001:db8::/48"),
        ("fd00:1:2:10::/60", "2001:db8:5:60::/60"),
        ("fd12:3456:789a::/52", "2001:db8:abc0::/52"),
    ],
)
def test_mapped_addresses_keep_the_checksum_sum(inside: str, outside: str) -> None:
    m = NptMapping(inside, outside)
    net = m.inside
    for i in range(200):
        a = ipaddress.IPv6Address(
            int(net.network_address) | ((i * 0x9E3779B97F4A7C15) & ((1 << (128 - m.length)) - 1))
        )
        out = m.translate(a)
        if isinstance(out, Reason):
            continue
        assert out in m.outside
        assert int(a) % 0xFFFF == int(out) % 0xFFFF  # one's-complement sum unchanged
        assert m.translate(out, reverse=True) == a


prefix_lengths = st.sampled_from([16, 24, 32, 40, 44, 47, 48, 49, 52, 56, 60, 63, 64])


@st.composite
def prefix_pair_and_address(draw: st.DrawFn) -> tuple[NptMapping, ipaddress.IPv6Address]:
    li = draw(prefix_lengths)
    lo = draw(prefix_lengths)
    pi = ipaddress.IPv6Network((draw(st.integers(0, 2**128 - 1)) >> (128 - li) << (128 - li), li))
    po = ipaddress.IPv6Network((draw(st.integers(0, 2**128 - 1)) >> (128 - lo) << (128 - lo), lo))
    m = NptMapping(pi, po)
    host_bits = 128 - m.length
    prefix = int(pi.network_address) >> (128 - m.length) << (128 - m.length)
    a = ipaddress.IPv6Address(prefix | draw(st.integers(0, 2**host_bits - 1)))
    return m, a


@settings(max_examples=400)
@given(prefix_pair_and_address())
def test_reverse_of_map_is_identity(pa: tuple[NptMapping, ipaddress.IPv6Address]) -> None:
    m, a = pa
    out = m.translate(a)
    assume(not isinstance(out, Reason))
    assert isinstance(out, ipaddress.IPv6Address)
    assert m.translate(out, reverse=True) == a
    assert int(a) % 0xFFFF == int(out) % 0xFFFF


@settings(max_examples=200)
@given(
    prefix_pair_and_address(),
    st.sampled_from(["tcp", "udp"]),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.binary(max_size=200),
)
def test_l4_checksum_still_valid_after_translation(
    pa: tuple[NptMapping, ipaddress.IPv6Address], proto: str, sp: int, dp: int, payload: bytes
) -> None:
    m, a = pa
    remote = "2001:db8:ffff::1"
    pkt = (
        build.tcp(a, remote, sp, dp, payload=payload)
        if proto == "tcp"
        else build.udp(a, remote, sp, dp, payload)
    )
    before = bytes(pkt)
    fwd = NptForwarder([m], build.a16("2001:db8::1"), decrement_hop_limit=False)
    action, _, data = fwd.process(pkt, PORT_INSIDE, 0.0)
    if action != 1:
        return
    assert isinstance(data, bytearray)
    assert data[40:] == before[40:]  # ports and checksum untouched
    assert verify(data[8:24], data[24:40], data[6], data[40:])
    # and back
    action, _, back = fwd.process(
        build.tcp(remote, bytes(data[8:24]), dp, sp, payload=payload)
        if proto == "tcp"
        else build.udp(remote, bytes(data[8:24]), dp, sp, payload),
        PORT_OUTSIDE,
        0.0,
    )
    assert action == 1 and isinstance(back, bytearray)
    assert bytes(back[24:40]) == a.packed
    assert verify(back[8:24], back[24:40], back[6], back[40:])


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("fd01:203:405::1/48", "host bits set"),
        ("fd00::/72", "longer than /64"),
        ("10.0.0.0/8", "not an IPv6 prefix"),
        ("nonsense", "not an IPv6 prefix"),
    ],
)
def test_invalid_prefixes_are_named(text: str, problem: str) -> None:
    with pytest.raises(NptPrefixError, match=problem):
        parse_prefix(text)


def test_icmp_errors_are_rate_limited_and_capped() -> None:
    m = NptMapping(fx.INSIDE, fx.OUTSIDE)
    fwd = NptForwarder([m], build.a16(fx.LB), icmp_rate=1.0, icmp_burst=2.0)
    big = build.udp("fd01:203:405:ffff::1", fx.REMOTE, 1, 2, b"z" * 1400)
    verdicts = [fwd.process(bytearray(big), PORT_INSIDE, 0.0)[0] for _ in range(4)]
    assert [ACTION_NAMES[v] for v in verdicts] == ["reply", "reply", "drop", "drop"]
    assert fwd.counters.drops[Reason.NPT_NO_MAPPING] == 4
    assert fwd.icmp.suppressed == 2
    # One token comes back after 1 s of virtual time, exactly.
    assert ACTION_NAMES[fwd.process(bytearray(big), PORT_INSIDE, 0.999)[0]] == "drop"
    action, _, reply = fwd.process(bytearray(big), PORT_INSIDE, 2.0)
    assert ACTION_NAMES[action] == "reply" and isinstance(reply, bytearray)
    assert len(reply) == 1280


def test_never_answers_multicast_or_errors() -> None:
    m = NptMapping(fx.INSIDE, fx.OUTSIDE)
    fwd = NptForwarder([m], build.a16(fx.LB))
    to_mcast = build.udp(fx.REMOTE, "ff02::1", 1, 2)
    # inbound to multicast matches no prefix: no-match, silently
    assert fwd.process(to_mcast, PORT_OUTSIDE, 0.0)[:2] == (5, Reason.NO_MATCH)
    mcast_hl1 = build.udp(fx.IN_HOST, "ff0e::1", 1, 2, hop_limit=1)
    assert fwd.process(mcast_hl1, PORT_INSIDE, 0.0)[:2] == (5, Reason.HOP_LIMIT_EXCEEDED)
    err_hl1 = build.icmpv6_error(
        fx.IN_HOST, fx.REMOTE, 1, 4, build.udp(fx.REMOTE, fx.IN_HOST, 1, 2), hop_limit=1
    )
    assert fwd.process(err_hl1, PORT_INSIDE, 0.0)[:2] == (5, Reason.HOP_LIMIT_EXCEEDED)


@settings(max_examples=300)
@given(
    prefix_pair_and_address(),
    st.sampled_from(["tcp", "udp"]),
    st.booleans(),
    st.integers(0, 3),
    st.integers(0, 65535),
)
def test_fast_path_equals_slow_path(
    pa: tuple[NptMapping, ipaddress.IPv6Address], proto: str, inbound: bool, hl: int, sp: int
) -> None:
    """The inline fast path and the general path give identical verdicts, bytes and counters."""
    m, a = pa
    remote = "2001:db8:ffff::1"
    if inbound:
        out = m.translate(a)
        if isinstance(out, Reason):
            out = ipaddress.IPv6Address(
                int(m.outside.network_address) | (int(a) & ((1 << (128 - m.length)) - 1))
            )
        pkt = (
            build.tcp(remote, out, 80, sp, hop_limit=hl)
            if proto == "tcp"
            else build.udp(remote, out, 80, sp, hop_limit=hl)
        )
    else:
        pkt = (
            build.tcp(a, remote, sp, 80, hop_limit=hl)
            if proto == "tcp"
            else build.udp(a, remote, sp, 80, hop_limit=hl)
        )
    port = PORT_OUTSIDE if inbound else PORT_INSIDE
    f1 = NptForwarder([m], build.a16("2001:db8::1"))
    f2 = NptForwarder([m], build.a16("2001:db8::1"))
    b1, b2 = bytearray(pkt), bytearray(pkt)
    v1 = f1.process(b1, port, 0.0)
    v2 = f2._process(b2, port, 0.0)
    assert v1[:2] == v2[:2]
    assert b1 == b2
    assert f1.counters.snapshot() == f2.counters.snapshot()


def test_icmp_errors_translated_or_dropped_and_counted() -> None:
    m = NptMapping(fx.INSIDE, fx.OUTSIDE)
    fwd = NptForwarder([m], build.a16(fx.LB))
    # a PTB about the inside host's packet as the outside saw it: both translated back
    sent = build.tcp(fx.OUT_HOST, fx.REMOTE, 80, 40000, payload=b"r" * 1400)
    ptb = build.icmpv6_error("2001:db8:ff::1", fx.OUT_HOST, 2, 0, bytes(sent), 1280)
    action, port, out = fwd.process(ptb, PORT_OUTSIDE, 0.0)
    assert (ACTION_NAMES[action], port) == ("forward", PORT_INSIDE)
    assert isinstance(out, bytearray)
    assert build.ntop(out[24:40]) == fx.IN_HOST and build.ntop(out[48 + 8 : 48 + 24]) == fx.IN_HOST
    _assert_checksums_valid(bytes(out))
    assert (fwd.icmp_translated, fwd.icmp_unmatched) == ([1], [0])
    # a quote from another source, and a cut quote: dropped and counted, never answered
    other = build.tcp(fx.REMOTE, "2001:db8:ffff::2", 80, 40000)
    for quote in (bytes(other), bytes(sent[:30])):
        err = build.icmpv6_error("2001:db8:ff::1", fx.OUT_HOST, 2, 0, quote, 1280)
        assert ACTION_NAMES[fwd.process(err, PORT_OUTSIDE, 0.0)[0]] == "drop"
    assert (fwd.icmp_translated, fwd.icmp_unmatched) == ([1], [2])
    assert fwd.counters.drops[Reason.ICMP_ERROR_UNMATCHED] == 1
    assert fwd.counters.drops[Reason.ICMP_ERROR_QUOTE_BAD] == 1
    assert fwd.counters.replies == 0
