"""DSR: golden packets for the three modes, decapsulation, MTU, fragments, flow stickiness."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrSegmentRouting,
    fragment6,
)
from scapy.packet import Raw

import dsr_fixtures as fx
from v6lb.core.dsr import PIN_GRACE, PIN_RETIRED, DsrForwarder, DsrService, outer_header
from v6lb.core.dsr_decap import PORT_LOCAL, DsrDecap
from v6lb.core.flowhash import flow_key, flow_key3, jhash
from v6lb.core.verdict import (
    ACTION_NAMES,
    DROP,
    FORWARD,
    FORWARD_L2,
    FORWARD_MANY,
    PORT_INSIDE,
    PORT_OUTSIDE,
    REPLY,
)
from v6lb.model.config import Config, parse_config
from v6lb.model.pools import dsr_decap, dsr_forwarder
from v6lb.wire import build
from v6lb.wire.checksum import verify
from v6lb.wire.constants import TCP_RST
from v6lb.wire.ipv6 import PacketInfo, parse
from v6lb.wire.reasons import Reason

A = build.a16


def _label(key: bytes) -> int:
    # docs/dsr.md: the low 20 bits of the flow's jhash, 0 replaced by 1.
    return (jhash(key, fx.SEED) & 0xFFFFF) or 1


def label4(src: str, dst: str, sport: int, dport: int) -> int:
    return _label(flow_key(A(src), A(dst), sport, dport))


def label3(src: str, dst: str, proto: int) -> int:
    return _label(flow_key3(A(src), A(dst), proto))


ENV: dict[str, Any] = {
    "IPv6": IPv6,
    "TCP": TCP,
    "UDP": UDP,
    "Raw": Raw,
    "ICMPv6EchoRequest": ICMPv6EchoRequest,
    "ICMPv6PacketTooBig": ICMPv6PacketTooBig,
    "ICMPv6TimeExceeded": ICMPv6TimeExceeded,
    "IPv6ExtHdrDestOpt": IPv6ExtHdrDestOpt,
    "IPv6ExtHdrFragment": IPv6ExtHdrFragment,
    "IPv6ExtHdrSegmentRouting": IPv6ExtHdrSegmentRouting,
    "fragment6": fragment6,
    "LABEL4": label4,
    "LABEL3": label3,
    "FRAG_ID": fx.FRAG_ID,
    **{k: v for k, v in vars(fx).items() if k.isupper() and isinstance(v, str | list)},
    **fx.PINS,
}


def config(data: dict[str, Any] | None = None) -> Config:
    return parse_config(copy.deepcopy(data or fx.CONFIG), "dsr.yaml")


CONFIG = config()


def fresh() -> DsrForwarder:
    return dsr_forwarder(CONFIG)


def scapy(expr: str, **extra: Any) -> Any:
    return eval(expr, {**ENV, **extra})  # noqa: S307 - fixture expressions


# --- checks every output goes through ---------------------------------------------


def assert_transport_checksum(data: bytes) -> None:
    """Our codec and scapy both accept the transport checksum of an unfragmented packet."""
    info = PacketInfo()
    assert parse(data, info) == 0
    if info.frag_off >= 0 or info.proto not in (6, 17, 58):
        return
    assert verify(data[8:24], data[24:40], info.proto, data[info.l4_off :])
    p = IPv6(data)
    layer = p.getlayer({6: TCP, 17: UDP}.get(info.proto, Raw))
    if isinstance(layer, TCP | UDP):
        got = layer.chksum
        layer.chksum = None
        assert IPv6(bytes(p)).getlayer(type(layer)).chksum == got


def inner_of(out: bytes) -> bytes:
    """The packet inside an outer header (and SRH), as scapy dissects it."""
    p = IPv6(out)
    layer = p.payload
    if isinstance(layer, IPv6ExtHdrSegmentRouting):
        assert layer.segleft == 0 and len(layer.addresses) == 1
        layer = layer.payload
    assert isinstance(layer, IPv6)
    assert p.nh in (41, 43)
    return bytes(layer)


def decremented(pkt: bytes) -> bytes:
    b = bytearray(pkt)
    b[7] -= 1
    return bytes(b)


def reassemble(frags: list[bytes]) -> bytes:
    """Outer fragments put back together by a backend's decapsulation."""
    dec = DsrDecap([fx.LB, fx.LB2], [IPv6(frags[0]).dst], [IPv6(frags[0]).dst, *_vip_addrs()])
    got: list[object] = []
    for f in reversed(frags):  # out of order on purpose
        action, _, data = dec.process(bytearray(f), PORT_INSIDE, 0.0)
        assert action in (FORWARD, FORWARD_MANY), ACTION_NAMES[action]
        if action == FORWARD:
            got.append(data)
    assert len(got) == 1 and dec.pending == 0
    return bytes(got[0])  # type: ignore[arg-type]


def _vip_addrs() -> list[str]:
    return [str(v.address) for v in CONFIG.vips]


# --- golden packets -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "inp", "verdict", "expected"), fx.GOLDEN, ids=[g[0] for g in fx.GOLDEN]
)
def test_golden(name: str, inp: str, verdict: str, expected: str) -> None:
    raw_in = bytes(scapy(inp))
    fwd = fresh()
    buf = bytearray(raw_in)
    action, arg, data = fwd.process(buf, PORT_OUTSIDE, 0.0)
    assert ACTION_NAMES[action] == verdict, (name, Reason(arg).label if action == DROP else arg)
    assert bytes(buf) == raw_in, "the input buffer is never modified"
    if verdict == "drop":
        assert Reason(arg).label == expected
        assert fwd.counters.drops[arg] == 1
        return
    if verdict == "forward-l2":
        assert arg == PORT_INSIDE
        assert data == bytes.fromhex(expected.replace(":", ""))
        return
    if verdict == "reply":
        assert arg == PORT_OUTSIDE
        assert isinstance(data, bytearray) and len(data) <= 1280
        want = bytes(scapy(expected, IN=Raw(raw_in[: 1280 - 48])))
        assert bytes(data) == want
        assert_transport_checksum(bytes(data))
        return
    assert arg == PORT_INSIDE
    if verdict == "forward":
        assert isinstance(data, bytearray)
        assert bytes(data) == bytes(scapy(expected))
        inner = inner_of(bytes(data))
        assert inner == decremented(raw_in), "DSR changes nothing inside but the hop limit"
        assert_transport_checksum(inner)
        assert fwd.counters.forwarded == 1
        return
    assert verdict == "forward-many"
    assert isinstance(data, list) and len(data) >= 2
    want = [bytes(p) for p in scapy(expected)]
    assert [bytes(f) for f in data] == want
    mtu = fwd.service(_vip_name(raw_in)).mtu
    for f in data:
        assert len(f) <= mtu
        info = PacketInfo()
        assert parse(bytes(f), info) == 0 and info.frag_off >= 0
        assert f[1:4] == data[0][1:4], "one flow label for all fragments"
    assert len(raw_in) <= 1280
    assert reassemble([bytes(f) for f in data]) == decremented(raw_in)


def _vip_name(pkt: bytes) -> str:
    dst = IPv6(pkt).dst
    return next(v.name for v in CONFIG.vips if str(v.address) == dst)


@pytest.mark.parametrize(
    ("name", "backend", "inp", "verdict", "expected"), fx.DECAP, ids=[d[0] for d in fx.DECAP]
)
def test_decap_golden(name: str, backend: str, inp: str, verdict: str, expected: str) -> None:
    dec = dsr_decap(CONFIG, backend)
    raw_in = bytes(scapy(inp))
    action, arg, data = dec.process(bytearray(raw_in), PORT_INSIDE, 0.0)
    assert ACTION_NAMES[action] == verdict, (name, Reason(arg).label if action == DROP else arg)
    if verdict == "drop":
        assert Reason(arg).label == expected
        assert dec.counters.drops[arg] == 1
        return
    assert arg == PORT_LOCAL
    assert bytes(data) == bytes(scapy(expected))  # type: ignore[arg-type]
    assert_transport_checksum(bytes(data))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pin", "src", "dst", "key"),
    [
        ("PIN_FRAG", fx.CLIENT, fx.VIPM, flow_key3(A(fx.CLIENT), A(fx.VIPM), 6)),
        ("PIN_UNKNOWN", fx.CLIENT, fx.VIPM, flow_key3(A(fx.CLIENT), A(fx.VIPM), 150)),
        ("PIN_UDP", fx.CLIENT, fx.VIPM, flow_key(A(fx.CLIENT), A(fx.VIPM), 5353, 53)),
        ("PIN_PTB", fx.CLIENT2, fx.VIPM, flow_key(A(fx.CLIENT2), A(fx.VIPM), 50001, 443)),
    ],
)
def test_pins_follow_the_kernel_formula(pin: str, src: str, dst: str, key: bytes) -> None:
    """The pinned backends are what nftables' jhash + reciprocal_scale would index."""
    fwd = fresh()
    name = "multi-udp" if pin == "PIN_UDP" else "multi"
    table = fwd.pool(name).table
    assert table[(jhash(key, fx.SEED) * len(table)) >> 32] == fx.PINS[pin]


# --- encapsulation details ------------------------------------------------------------


def test_outer_header_overheads_match_linux_seg6() -> None:
    # encap.red with one SID = plain IPv6-in-IPv6 (40 bytes); encap = 64 bytes.
    src, dst = A(fx.LB), A(fx.SID)
    ip6ip6 = outer_header("dsr-ip6ip6", src, dst)
    srv6 = outer_header("dsr-srv6", src, dst)
    assert len(ip6ip6) == 40 and ip6ip6[6] == 41 and ip6ip6[7] == 64
    assert len(srv6) == 64 and srv6[6] == 43
    srv6[5] = 24 + 40  # payload length: the SRH and an empty inner header
    srh = IPv6(bytes(srv6) + bytes(IPv6()))[IPv6ExtHdrSegmentRouting]
    assert (srh.type, srh.segleft, srh.lastentry, srh.nh) == (4, 0, 0, 41)
    assert srh.addresses == [fx.SID]


def test_fast_and_general_paths_agree() -> None:
    """A cached flow (fast path) and the same flow with a header (general path) match."""
    fwd = fresh()
    for i in range(50):
        src = f"2001:db8:c::{i + 1:x}"
        plain = build.tcp(src, fx.VIPM, 30000 + i, 443, flow_label=i)
        opts = build.tcp(src, fx.VIPM, 30000 + i, 443, flow_label=i, ext=[build.dstopts()])
        first = fwd.process(bytearray(plain), PORT_OUTSIDE, 0.0)
        cached = fwd.process(bytearray(plain), PORT_OUTSIDE, 0.0)
        general = fwd.process(bytearray(opts), PORT_OUTSIDE, 0.0)
        assert first == cached
        assert first[0] == FORWARD and general[0] == FORWARD
        assert bytes(first[2][:40])[8:] == bytes(general[2][:40])[8:]  # type: ignore[index]
    assert fwd.flows == 50


def test_cached_flow_still_gets_time_exceeded_and_packet_too_big() -> None:
    fwd = fresh()
    ok = build.tcp(fx.CLIENT, fx.VIP1400, 40000, 443)
    assert fwd.process(bytearray(ok), PORT_OUTSIDE, 0.0)[0] == FORWARD
    assert fwd.flows == 1
    low = build.tcp(fx.CLIENT, fx.VIP1400, 40000, 443, hop_limit=1)
    assert fwd.process(low, PORT_OUTSIDE, 0.0)[0] == REPLY
    big = build.tcp(fx.CLIENT, fx.VIP1400, 40000, 443, payload=b"b" * 1400)
    action, _, reply = fwd.process(big, PORT_OUTSIDE, 0.0)
    assert action == REPLY
    assert IPv6(bytes(reply))[ICMPv6PacketTooBig].mtu == 1360  # type: ignore[arg-type]
    assert fwd.counters.drops[Reason.TOO_BIG] == fwd.counters.drops[Reason.HOP_LIMIT_EXCEEDED] == 1


def test_outer_label_of_unlabelled_packets_is_per_flow() -> None:
    fwd = fresh()
    labels = set()
    for i in range(200):
        pkt = build.tcp(fx.CLIENT, fx.VIP6, 20000 + i, 443)
        action, _, out = fwd.process(bytearray(pkt), PORT_OUTSIDE, 0.0)
        assert action == FORWARD
        label = int.from_bytes(out[1:4], "big") & 0xFFFFF  # type: ignore[index]
        assert label == label4(fx.CLIENT, fx.VIP6, 20000 + i, 443) != 0
        assert out[40 + 1 : 40 + 4] == b"\x00\x00\x00"  # type: ignore[index]
        labels.add(label)
    assert len(labels) > 190  # spread, so ECMP can spread


def test_time_exceeded_and_packet_too_big_are_rate_limited() -> None:
    fwd = fresh()
    pkt = build.tcp(fx.CLIENT, fx.VIP6, 1, 443, hop_limit=1)
    verdicts = [fwd.process(bytearray(pkt), PORT_OUTSIDE, 0.0)[0] for _ in range(50)]
    assert verdicts.count(REPLY) == 20 and verdicts.count(DROP) == 30  # burst 20
    assert fwd.counters.drops[Reason.HOP_LIMIT_EXCEEDED] == 50
    assert fwd.process(bytearray(pkt), PORT_OUTSIDE, 1.0)[0] == REPLY  # refilled at 100/s


def test_no_error_about_an_error() -> None:
    """An oversized ICMPv6 error is dropped without a Packet Too Big (RFC 4443 §2.4 e)."""
    fwd = fresh()
    quote = build.tcp(fx.VIP1400, fx.CLIENT, 443, 40000, payload=b"z" * 1400)
    err = build.icmpv6(fx.ROUTER, fx.VIP1400, 1, 0, bytes(4) + bytes(quote[:1352]))
    assert len(err) > 1360
    assert fwd.process(err, PORT_OUTSIDE, 0.0) == (DROP, Reason.TOO_BIG, None)


def test_ptb_floor_then_fragments_round_trip() -> None:
    """Client at 1300 bytes -> PTB 1280 -> client at 1280 -> fragments -> backend reassembles."""
    fwd = fresh()
    big = build.tcp(fx.CLIENT, fx.VIPSMALL, 40000, 443, payload=b"x" * 1240)
    action, _, reply = fwd.process(bytearray(big), PORT_OUTSIDE, 0.0)
    assert action == REPLY
    assert IPv6(bytes(reply))[ICMPv6PacketTooBig].mtu == 1280  # type: ignore[arg-type]
    ok = build.tcp(fx.CLIENT, fx.VIPSMALL, 40000, 443, payload=b"x" * 1220)
    action, _, frags = fwd.process(bytearray(ok), PORT_OUTSIDE, 0.0)
    assert action == FORWARD_MANY
    dec = dsr_decap(CONFIG, fx.BESMALL)
    results = [dec.process(f, PORT_INSIDE, 5.0) for f in frags]  # type: ignore[attr-defined]
    assert results[0] == (FORWARD_MANY, PORT_LOCAL, [])
    assert results[-1][0] == FORWARD and bytes(results[-1][2]) == decremented(bytes(ok))  # type: ignore[arg-type]


# --- decapsulation: fragments ------------------------------------------------------------


def _outer_frags(fwd: DsrForwarder, payload: int = 1220) -> list[bytearray]:
    pkt = build.tcp(fx.CLIENT, fx.VIPSMALL, 40000, 443, payload=b"y" * payload)
    action, _, frags = fwd.process(bytearray(pkt), PORT_OUTSIDE, 0.0)
    assert action == FORWARD_MANY
    return frags  # type: ignore[return-value]


def test_decap_reassembly_times_out() -> None:
    dec = dsr_decap(CONFIG, fx.BESMALL)
    frags = _outer_frags(fresh())
    assert dec.process(frags[0], PORT_INSIDE, 0.0)[0] == FORWARD_MANY
    assert dec.pending == 1
    # 60 s later the first fragment is gone: the second alone completes nothing.
    assert dec.process(frags[1], PORT_INSIDE, 60.0) == (FORWARD_MANY, PORT_LOCAL, [])
    assert dec.pending == 1
    assert dec.counters.extra["decap.reassembly_timeout"] == 1


def test_decap_overlapping_fragments_discard_the_datagram() -> None:
    dec = dsr_decap(CONFIG, fx.BESMALL)
    frags = _outer_frags(fresh())
    assert dec.process(frags[0], PORT_INSIDE, 0.0)[0] == FORWARD_MANY
    # A forged fragment overlapping the first one (RFC 5722).
    evil = bytearray(frags[1])
    fh = 40
    evil[fh + 2 : fh + 4] = (8).to_bytes(2, "big")  # offset 8 bytes, M=0
    assert dec.process(evil, PORT_INSIDE, 0.0) == (DROP, Reason.BAD_FRAGMENT, None)
    assert dec.pending == 0
    # A duplicate is ignored.
    dec.process(frags[0], PORT_INSIDE, 0.0)
    assert dec.process(frags[0], PORT_INSIDE, 0.0) == (FORWARD_MANY, PORT_LOCAL, [])
    assert dec.process(frags[1], PORT_INSIDE, 0.0)[0] == FORWARD


def test_decap_refuses_fragments_from_strangers() -> None:
    dec = dsr_decap(CONFIG, fx.BESMALL)
    frag = _outer_frags(fresh())[0]
    frag[8:24] = A(fx.STRANGER)
    assert dec.process(frag, PORT_INSIDE, 0.0) == (DROP, Reason.NOT_FROM_LB, None)
    assert dec.pending == 0


def test_round_trip_through_decap_every_mode() -> None:
    fwd = fresh()
    for vip, backend in ((fx.VIP6, fx.BE6), (fx.VIPSR, fx.BESR), (fx.VIPEXP, fx.BEEXP)):
        dec = dsr_decap(CONFIG, backend)
        for i in range(20):
            pkt = build.tcp(fx.CLIENT2, vip, 10000 + i, 443, payload=bytes(i), flow_label=i * 7)
            action, _, out = fwd.process(bytearray(pkt), PORT_OUTSIDE, 0.0)
            assert action == FORWARD
            back = dec.process(out, PORT_INSIDE, 0.0)  # type: ignore[arg-type]
            assert back[0] == FORWARD and bytes(back[2]) == decremented(bytes(pkt))  # type: ignore[arg-type]


def test_decap_from_config_needs_a_tunnel_backend() -> None:
    with pytest.raises(ValueError, match="backend of no"):
        dsr_decap(CONFIG, fx.BEL2)


# --- flows: agreement, drain, down, removal, LRU bound ---------------------------------


def random_flows(n: int, seed: int = 1) -> list[tuple[str, int]]:
    rnd = random.Random(seed)
    return [
        (
            f"2001:db8:{rnd.randrange(1 << 16):x}::{rnd.randrange(1, 1 << 16):x}",
            rnd.randrange(1024, 65536),
        )
        for _ in range(n)
    ]


def backend_of(fwd: DsrForwarder, src: str, sport: int) -> str:
    pkt = build.tcp(src, fx.VIPM, sport, 443)
    action, _, out = fwd.process(pkt, PORT_OUTSIDE, 0.0)
    assert action == FORWARD
    return build.ntop(out[24:40])  # type: ignore[index]


def test_two_instances_agree_and_match_the_kernel_formula() -> None:
    a, b = fresh(), fresh()
    flows = random_flows(1000)
    table = a.pool("multi").table
    for src, sport in flows:
        be = backend_of(a, src, sport)
        assert backend_of(b, src, sport) == be
        # nftables: jhash(saddr . daddr . sport . dport, seed) -> reciprocal_scale(M).
        h = jhash(flow_key(A(src), A(fx.VIPM), sport, 443), fx.SEED)
        assert be == fx.BEM[table[(h * len(table)) >> 32]]
        assert a.backend_for(A(src), A(fx.VIPM), sport, 443) == ("multi", fx.BEM.index(be))
    assert len({backend_of(a, s, p) for s, p in flows}) == 4


def test_draining_keeps_cached_flows() -> None:
    fwd = fresh()
    flows = random_flows(400, seed=2)
    before = {f: backend_of(fwd, *f) for f in flows}
    pool = fwd.pool("multi")
    assert pool.set_drain(1, True)
    assert {f: backend_of(fwd, *f) for f in flows} == before
    assert any(be == fx.BEM[1] for be in before.values())
    # New flows avoid the draining backend.
    for f in random_flows(300, seed=3):
        assert backend_of(fwd, *f) != fx.BEM[1]


def test_a_down_backend_loses_only_its_flows() -> None:
    fwd = fresh()
    flows = random_flows(400, seed=4)
    before = {f: backend_of(fwd, *f) for f in flows}
    fwd.pool("multi").set_up(2, False)
    after = {f: backend_of(fwd, *f) for f in flows}
    for f in flows:
        if before[f] == fx.BEM[2]:
            assert after[f] != fx.BEM[2]
        else:
            assert after[f] == before[f]
    assert sum(be == fx.BEM[2] for be in before.values()) > 50


def test_removing_a_backend_from_the_config_moves_few_other_flows() -> None:
    """Without any cache (another LB instance), Maglev moves few flows of the others."""
    data = copy.deepcopy(fx.CONFIG)
    data["vips"][6]["backends"] = [{"address": a} for a in fx.BEM if a != fx.BEM[3]]
    a, b = fresh(), dsr_forwarder(config(data))
    flows = random_flows(1000, seed=5)
    moved = kept_total = 0
    for f in flows:
        old, new = backend_of(a, *f), backend_of(b, *f)
        assert new != fx.BEM[3]
        if old != fx.BEM[3]:
            kept_total += 1
            moved += old != new
    assert moved <= 0.05 * kept_total


def test_lru_is_bounded_and_least_recent_goes_first() -> None:
    data = copy.deepcopy(fx.CONFIG)
    data["lb"]["flow_cache_size"] = 10
    fwd = dsr_forwarder(config(data))
    flows = random_flows(15, seed=6)
    for f in flows[:10]:
        backend_of(fwd, *f)
    backend_of(fwd, *flows[0])  # flows[0] becomes the most recent
    for f in flows[10:]:
        backend_of(fwd, *f)
    assert fwd.flows == 10
    assert fwd.counters.extra["dsr.flows_evicted"] == 5
    # flows[0] survived: marking its backend as draining keeps it there.
    be = fx.BEM.index(backend_of(fwd, *flows[0]))
    fwd.pool("multi").set_drain(be, True)
    assert backend_of(fwd, *flows[0]) == fx.BEM[be]


def test_packet_too_big_follows_a_cached_flow_after_a_table_change() -> None:
    fwd = fresh()
    flows = random_flows(100, seed=7)
    owners = {f: backend_of(fwd, *f) for f in flows}
    fwd.pool("multi").set_drain(0, True)  # the table changes; cached flows stay
    for (src, sport), be in owners.items():
        quote = build.tcp(fx.VIPM, src, 443, sport, payload=b"r" * 100)
        ptb = build.icmpv6_error(fx.ROUTER, fx.VIPM, 2, 0, quote, 1300)
        action, _, out = fwd.process(ptb, PORT_OUTSIDE, 0.0)
        assert action == FORWARD and build.ntop(out[24:40]) == be  # type: ignore[index]


def test_fragments_of_random_flows_stay_together() -> None:
    fwd = fresh()
    for src, ident in random_flows(200, seed=8):
        first = build.ipv6(
            src, fx.VIPM, 6, bytes(build.tcp_segment(A(src), A(fx.VIPM), 1, 443)) + bytes(40),
            ext=[build.fragment(0, True, ident)],
        )  # fmt: skip
        later = build.ipv6(src, fx.VIPM, 6, bytes(16), ext=[build.fragment(64, False, ident)])
        a = fwd.process(first, PORT_OUTSIDE, 0.0)
        b = fwd.process(later, PORT_OUTSIDE, 0.0)
        assert a[0] == b[0] == FORWARD
        assert a[2][24:40] == b[2][24:40]  # type: ignore[index]


def test_no_backend_left() -> None:
    fwd = fresh()
    pool = fwd.pool("ip6ip6")
    pool.set_up(0, False)
    pkt = build.tcp(fx.CLIENT, fx.VIP6, 1, 443)
    assert fwd.process(pkt, PORT_OUTSIDE, 0.0) == (DROP, Reason.NO_BACKEND, None)


def test_l2_without_a_mac_names_the_backend_address() -> None:
    data = copy.deepcopy(fx.CONFIG)
    del data["vips"][2]["backends"][0]["mac"]
    fwd = dsr_forwarder(config(data))
    pkt = build.tcp(fx.CLIENT, fx.VIPL2, 1, 443)
    assert fwd.process(pkt, PORT_OUTSIDE, 0.0) == (FORWARD_L2, PORT_INSIDE, A(fx.BEL2))
    fwd = dsr_forwarder(config(data), macs={fx.BEL2: b"\x02" * 6})
    assert fwd.process(pkt, PORT_OUTSIDE, 0.0) == (FORWARD_L2, PORT_INSIDE, b"\x02" * 6)


def test_service_validation() -> None:
    pool = fresh().pool("ip6ip6")
    with pytest.raises(ValueError, match="tunnel source"):
        DsrService("x", A(fx.VIP6), [443], 6, "dsr-srv6", pool)
    with pytest.raises(ValueError, match="not a DSR mode"):
        DsrService("x", A(fx.VIP6), [443], 6, "nat", pool)
    with pytest.raises(ValueError, match="at least 1280"):
        DsrService("x", A(fx.VIP6), [443], 6, "dsr-ip6ip6", pool, tunnel_source=A(fx.LB), mtu=1000)
    with pytest.raises(ValueError, match="no VIP uses"):
        dsr_forwarder(parse_config({"lb": {"addresses": [fx.LB]}}))


# --- robustness -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 199), st.integers(0, 255))
def test_mutated_packets_never_raise(junk: bytes, pos: int, value: int) -> None:
    fwd = fresh_cached()
    base = bytearray(build.tcp(fx.CLIENT, fx.VIPM, 1, 443, payload=junk[:64]))
    if pos < len(base):
        base[pos] = value
    for pkt in (bytearray(junk), base):
        action, _, _ = fwd.process(pkt, PORT_OUTSIDE, 0.0)
        assert action in ACTION_NAMES
        DECAP_CACHE.process(pkt, PORT_INSIDE, 0.0)


_FWD: list[DsrForwarder] = []
DECAP_CACHE = dsr_decap(CONFIG, fx.BEM[0])


def fresh_cached() -> DsrForwarder:
    if not _FWD:
        _FWD.append(fresh())
    return _FWD[0]


def _svc(fwd: DsrForwarder, name: str) -> DsrService:
    return next(s for s in fwd.services if s.name == name)


def test_icmp_errors_are_counted_per_vip_and_forged_ones_leave_no_trace() -> None:
    fwd = fresh()
    flows = random_flows(20, seed=11)
    owners = {f: backend_of(fwd, *f) for f in flows}
    cached = fwd.flows
    multi = _svc(fwd, "multi")
    # a forged PTB per never-seen client: forwarded where its hash points, never cached,
    # never answered, and the real flows keep their backends
    for i, (src, sport) in enumerate(random_flows(200, seed=12)):
        quote = build.tcp(fx.VIPM, src, 443, sport, payload=b"r" * 100)
        ptb = build.icmpv6_error(fx.ROUTER, fx.VIPM, 2, 0, quote, 500 if i % 2 else 1280)
        action, _, out = fwd.process(ptb, PORT_OUTSIDE, 0.0)
        assert action == FORWARD
        inner = bytes(out[40:])  # type: ignore[index]
        assert inner == bytes(ptb[:7]) + bytes([ptb[7] - 1]) + bytes(ptb[8:])  # MTU unchanged
    assert fwd.flows == cached and fwd.counters.replies == 0
    assert {f: backend_of(fwd, *f) for f in flows} == owners
    assert multi.icmp_forwarded == 200 and multi.icmp_unmatched == 0
    # unmatched, on the address's first VIP: a cut quote, another source, a port not served
    src, sport = flows[0]
    good = bytes(build.tcp(fx.VIPM, src, 443, sport))
    bad = [
        good[:30],
        bytes(build.tcp(fx.CLIENT, src, 443, sport)),
        bytes(build.tcp(fx.VIPM, src, 444, sport)),
    ]
    for quote in bad:
        ptb = build.icmpv6_error(fx.ROUTER, fx.VIPM, 2, 0, quote, 1280)
        assert fwd.process(ptb, PORT_OUTSIDE, 0.0)[0] == DROP
    assert multi.icmp_unmatched == 3 and fwd.counters.replies == 0


def test_a_pinned_probe_flow_reaches_its_backend_up_or_down() -> None:
    """The LB's health probe of backend i (docs/dsr.md): pinned, whatever the table says."""
    fwd = fresh()
    pool = fwd.pool("multi")
    for i in range(4):  # a probe from the LB's address, to a port the VIP does not serve
        fwd.pin(("multi", i), "multi", i, A(fx.LB), 41000 + i, 8080)
    assert fwd.pins == 4
    pool.set_up(2, False)  # down: a client flow can no longer get it, its probe still does
    for i in range(4):
        for _ in range(2):  # the first packet and a later one (never in the LRU)
            syn = build.tcp(fx.LB, fx.VIPM, 41000 + i, 8080)
            action, _, out = fwd.process(bytearray(syn), PORT_OUTSIDE, 0.0)
            assert action == FORWARD
            assert IPv6(bytes(out)).dst == fx.BEM[i]  # type: ignore[arg-type]
            assert inner_of(out) == decremented(syn)  # type: ignore[arg-type]
    assert fwd.flows == 0
    # counted apart: `forwarded` is the clients' traffic
    assert (fwd.counters.forwarded, fwd.counters.extra["dsr.probe_packets"]) == (0, 8)
    other = build.tcp(fx.LB, fx.VIPM, 41000, 8081)  # not pinned, not a VIP port
    assert fwd.process(bytearray(other), PORT_OUTSIDE, 0.0)[0] == DROP
    fwd.pin(("multi", 0), "multi", 0, A(fx.LB), 42000, 8080, now=10.0)  # the next probe
    assert fwd.pins == 4
    # the replaced flow's late packets (a RST for an answer after the close) still go
    # to its backend, never into the flow cache, for PIN_GRACE seconds...
    old = build.tcp(fx.LB, fx.VIPM, 41000, 8080, flags=TCP_RST)
    action, _, out = fwd.process(bytearray(old), PORT_OUTSIDE, 0.0)
    assert action == FORWARD and IPv6(bytes(out)).dst == fx.BEM[0]  # type: ignore[arg-type]
    assert fwd.flows == 0 and fwd.counters.extra["dsr.probe_packets"] == 9
    fwd.pin(("multi", 0), "multi", 0, A(fx.LB), 42001, 8080, now=10.0 + PIN_GRACE + 1)
    assert fwd.process(bytearray(old), PORT_OUTSIDE, 0.0)[0] == DROP  # ...then gone
    # ...and at most PIN_RETIRED of them per backend, the oldest going first
    for k in range(PIN_RETIRED + 2):  # 41001 and 44000 replaced too often ago
        fwd.pin(("multi", 1), "multi", 1, A(fx.LB), 44000 + k, 8080, now=20.0)
    for k, alive in ((-2999, False), (0, False), (1, True), (PIN_RETIRED + 1, True)):
        late = build.tcp(fx.LB, fx.VIPM, 44000 + k, 8080, flags=TCP_RST)
        verdict = fwd.process(bytearray(late), PORT_OUTSIDE, 0.0)[0]
        assert verdict == (FORWARD if alive else DROP), k
    fwd.unpin(("multi", 1))  # the backend is gone: its replaced pins too
    assert fwd.process(bytearray(late), PORT_OUTSIDE, 0.0)[0] == DROP
    assert fwd.pins == 3 and fwd.flows == 0
    fwd.pin(("l2", 0), "l2", 0, A(fx.LB), 43000, 443)  # dsr-l2: the backend's MAC
    syn = build.tcp(fx.LB, fx.VIPL2, 43000, 443)
    assert fwd.process(bytearray(syn), PORT_OUTSIDE, 0.0) == (
        FORWARD_L2,
        PORT_INSIDE,
        bytes.fromhex(fx.MAC.replace(":", "")),
    )
    with pytest.raises(ValueError):
        fwd.pin(("l2", 1), "l2", 1, A(fx.LB), 43001, 443)


def test_each_vip_counts_its_own_packets() -> None:
    """Every DSR VIP has its own counter (packets and bytes forwarded), on the fast and the
    general path alike: the python plane's status shows them per VIP."""
    fwd = fresh()
    svc = {s.name: s for s in fwd.services}
    sent = {fx.VIP6: 3, fx.VIPL2: 5, fx.VIPM: 2}
    size = {}
    for vip, n in sent.items():
        for _ in range(n):  # one flow: the first packet takes the general path, then fast
            pkt = build.tcp(fx.CLIENT, vip, 41000, 443, flow_label=7)
            size[vip] = len(pkt)
            assert fwd.process(bytearray(pkt), PORT_OUTSIDE, 0.0)[0] in (FORWARD, FORWARD_L2)
    counted = {s.address: (s.packets, s.bytes) for s in svc.values() if s.packets}
    assert counted == {A(v): (n, n * size[v]) for v, n in sent.items()}
    assert fwd.counters.forwarded == sum(sent.values())
