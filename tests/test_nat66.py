"""Stateful NAT66: golden packets, round trips, SNAT, drain and health, bounds, ICMPv6, fragments."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    defragment6,
)
from scapy.packet import Raw

import nat_fixtures as fx
from v6lb.core.backends import BackendPool, BackendSpec
from v6lb.core.conntrack import State
from v6lb.core.nat66 import NatForwarder, NatService
from v6lb.core.verdict import ACTION_NAMES, DROP, FORWARD, PORT_INSIDE, PORT_OUTSIDE, REPLY
from v6lb.model.config import parse_config
from v6lb.model.pools import nat_forwarder
from v6lb.wire import build
from v6lb.wire.checksum import checksum, verify
from v6lb.wire.constants import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from v6lb.wire.ipv6 import PacketInfo, flow_label, parse
from v6lb.wire.reasons import Reason

OUT, IN = PORT_OUTSIDE, PORT_INSIDE
SYN, SYNACK, ACK = TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK


def _l4(src: str, dst: str, segment: object) -> bytes:
    """The segment's bytes with the checksum scapy computes for (src, dst)."""
    return bytes(IPv6(src=src, dst=dst) / segment)[40:]  # type: ignore[operator]


SCAPY: dict[str, object] = {
    "IPv6": IPv6,
    "TCP": TCP,
    "UDP": UDP,
    "Raw": Raw,
    "ICMPv6EchoRequest": ICMPv6EchoRequest,
    "ICMPv6EchoReply": ICMPv6EchoReply,
    "ICMPv6PacketTooBig": ICMPv6PacketTooBig,
    "ICMPv6DestUnreach": ICMPv6DestUnreach,
    "ICMPv6TimeExceeded": ICMPv6TimeExceeded,
    "IPv6ExtHdrDestOpt": IPv6ExtHdrDestOpt,
    "IPv6ExtHdrFragment": IPv6ExtHdrFragment,
    "L4": _l4,
    **{k: getattr(fx, k) for k in dir(fx) if k.isupper() and isinstance(getattr(fx, k), str)},
}

# Pools are stateless apart from health, which the tests that change it build afresh.
TABLE = 251


def golden_forwarder(**kw: object) -> NatForwarder:
    services = [
        NatService(
            fx.VIP, BackendPool([BackendSpec.of(fx.B1, 8080)], table_size=TABLE), ports=[443]
        ),
        NatService(
            fx.VIP,
            BackendPool([BackendSpec.of(fx.B1, 0)], table_size=TABLE),
            protocol="udp",
            ports=[53],
        ),
        NatService(
            fx.SNAT_VIP,
            BackendPool([BackendSpec.of(fx.B2, 8443)], table_size=TABLE),
            ports=[443],
            snat=fx.SNAT,
            snat_ports=fx.SNAT_PORTS,
        ),
    ]
    return NatForwarder(services, fx.LB, **kw)  # type: ignore[arg-type]


# --- checksum checks, by scapy --------------------------------------------------------


def _scapy_agrees(pkt: IPv6) -> None:
    """scapy recomputes the transport checksum of ``pkt``; it must equal the one we wrote."""
    layer = pkt.payload
    while layer.__class__.__name__.startswith("IPv6ExtHdr"):
        layer = layer.payload
    field = "chksum" if isinstance(layer, TCP | UDP) else "cksum"
    got = getattr(layer, field)
    layer.setfieldval(field, None)
    want = getattr(IPv6(bytes(pkt)).getlayer(layer.__class__), field)
    assert got == want or {got, want} == {0, 0xFFFF}, (
        f"{layer.__class__.__name__} {got:#x} != {want:#x}"
    )


def assert_checksums_valid(data: bytes) -> None:
    """Every checksum of an output verifies: outer, and a quoted packet's in an ICMPv6 error."""
    info = PacketInfo()
    assert parse(data, info) == 0
    if info.later_fragment or info.more_frags:
        return  # checked after reassembly
    _scapy_agrees(IPv6(data))
    assert verify(data[8:24], data[24:40], info.proto, data[info.l4_off :])
    if info.proto == 58 and data[info.l4_off] < 128:
        _scapy_agrees(IPv6(data[info.l4_off + 8 :]))


def run_golden(fwd: NatForwarder) -> dict[str, bytes]:
    outputs: dict[str, bytes] = {}
    for i, (name, in_expr, port, verdict, expected) in enumerate(fx.GOLDEN):
        inp = bytes(eval(in_expr, dict(SCAPY)))  # noqa: S307 - fixture expressions
        buf = bytearray(inp)
        before = fwd.counters.drops[:]
        action, arg, data = fwd.process(buf, IN if port == "in" else OUT, float(i))
        assert ACTION_NAMES[action] == verdict, (name, action, arg)
        if verdict == "drop":
            assert Reason(arg).label == expected, name
            assert fwd.counters.drops[arg] == before[arg] + 1, name
            continue
        assert isinstance(data, bytearray)
        want = bytes(eval(expected, dict(SCAPY, IN=Raw(inp[: 1280 - 48]))))  # noqa: S307
        assert bytes(data) == want, f"{name}\n got {bytes(data).hex()}\nwant {want.hex()}"
        assert_checksums_valid(bytes(data))
        if verdict == "forward":
            assert arg == (OUT if port == "in" else IN), name
        outputs[name] = bytes(data)
    return outputs


def test_golden() -> None:
    fwd = golden_forwarder()
    outputs = run_golden(fwd)
    snap = fwd.counters.snapshot()
    assert snap["ptb-below-1280"] == 1
    assert snap["fragment"] == 1
    assert snap["icmp-error"] == 7
    # The translated fragments reassemble into a datagram whose checksum verifies.
    frags = [v for k, v in outputs.items() if "fragment" in k]
    whole = defragment6([IPv6(f) for f in frags])
    assert bytes(whole[UDP].payload) == b"z" * 96
    data = bytes(whole)
    assert verify(data[8:24], data[24:40], 17, data[40:])
    _scapy_agrees(IPv6(data))


def test_golden_with_a_small_table() -> None:
    """The same cases with room for six flows: the oldest unreplied one makes way."""
    fwd = golden_forwarder(conntrack_max=6)
    run_golden(fwd)
    assert len(fwd.conntrack) <= 6


# --- round trips -------------------------------------------------------------------------

VIP, SNAT_VIP, SNAT = fx.VIP, fx.SNAT_VIP, fx.SNAT
BACKENDS = [("fd00:b::1", 8080), ("fd00:b::2", 8080), ("fd00:b::3", 8080)]


def pools() -> tuple[BackendPool, BackendPool, BackendPool]:
    specs = [BackendSpec.of(a, p) for a, p in BACKENDS]
    return (
        BackendPool(specs, table_size=TABLE),
        BackendPool([BackendSpec.of(a, 0) for a, _ in BACKENDS], table_size=TABLE),
        BackendPool(specs, table_size=TABLE),
    )


def forwarder(snat_ports: tuple[int, int] = (1024, 65535), **kw: object) -> NatForwarder:
    tcp, udp, snat = pools()
    services = [
        NatService(VIP, tcp, ports=[443, 80]),
        NatService(VIP, udp, protocol="udp", ports=[53]),
        NatService(SNAT_VIP, snat, ports=[443], snat=SNAT, snat_ports=snat_ports),
        NatService(SNAT_VIP, snat, protocol="udp", ports=[443], snat=SNAT, snat_ports=snat_ports),
    ]
    return NatForwarder(services, fx.LB, **kw)  # type: ignore[arg-type]


def fields(pkt: bytes) -> tuple[str, str, int, int, int]:
    """(source, destination, source port or echo id, destination port, hop limit)."""
    info = PacketInfo()
    assert parse(pkt, info) == 0
    l4 = info.l4_off
    if info.proto == 58:
        sp, dp = (pkt[l4 + 4] << 8) | pkt[l4 + 5], 0
    else:
        sp, dp = (pkt[l4] << 8) | pkt[l4 + 1], (pkt[l4 + 2] << 8) | pkt[l4 + 3]
    assert verify(pkt[8:24], pkt[24:40], info.proto, pkt[info.l4_off :])
    return build.ntop(pkt[8:24]), build.ntop(pkt[24:40]), sp, dp, pkt[7]


def make(
    kind: str,
    src: str,
    dst: str,
    sp: int,
    dp: int,
    *,
    flags: int = SYN,
    ext: bool = False,
    **kw: int,
) -> bytearray:
    hdrs = [build.dstopts()] if ext else []
    if kind == "tcp":
        return build.tcp(src, dst, sp, dp, flags=flags, ext=hdrs, **kw)  # type: ignore[arg-type]
    if kind == "udp":
        return build.udp(src, dst, sp, dp, b"data", ext=hdrs, **kw)  # type: ignore[arg-type]
    if kind == "echo":
        return build.echo_request(src, dst, ident=sp, ext=hdrs, **kw)  # type: ignore[arg-type]
    return build.echo_reply(src, dst, ident=sp, ext=hdrs, **kw)  # type: ignore[arg-type]


addresses = st.integers(1, 2**64 - 1).map(
    lambda i: build.ntop(((0x20010DB8000C << 80) | i).to_bytes(16, "big"))
)


@settings(max_examples=150, deadline=None)
@given(
    client=addresses,
    sport=st.integers(1, 65535),
    kind=st.sampled_from(["tcp", "udp", "echo"]),
    snat=st.booleans(),
    ext=st.booleans(),
    hlim=st.integers(2, 255),
    fl=st.integers(0, 0xFFFFF),
)
def test_round_trip_restores_addresses_and_ports(
    client: str, sport: int, kind: str, snat: bool, ext: bool, hlim: int, fl: int
) -> None:
    fwd = forwarder()
    vip = SNAT_VIP if snat else VIP
    vport = 0 if kind == "echo" else (443 if kind == "tcp" or snat else 53)
    pkt = make(kind, client, vip, sport, vport, ext=ext, hop_limit=hlim, flow_label=fl)
    action, port, out = fwd.process(pkt, OUT, 1.0)
    assert (action, port) == (FORWARD, IN)
    assert isinstance(out, bytearray)
    src, dst, xsp, bport, hl = fields(out)
    assert hl == hlim - 1 and flow_label(out) == fl
    if kind == "echo":
        assert dst in {a for a, _ in BACKENDS}
    else:
        assert (dst, bport) in {(a, 8080 if kind == "tcp" or snat else vport) for a, _ in BACKENDS}
    assert src == (SNAT if snat else client)
    if not snat:
        assert xsp == sport
    # The backend answers the translated packet; the reply comes back as VIP -> client.
    rkind = {"tcp": "tcp", "udp": "udp", "echo": "echo-reply"}[kind]
    reply = make(rkind, dst, src, bport if kind != "echo" else xsp, xsp, flags=SYNACK, ext=ext)
    action, port, back = fwd.process(reply, IN, 2.0)
    assert (action, port) == (FORWARD, OUT)
    assert isinstance(back, bytearray)
    rs, rd, rsp, rdp, _ = fields(back)
    if kind == "echo":
        assert (rs, rd, rsp) == (vip, client, sport)
    else:
        assert (rs, rd, rsp, rdp) == (vip, client, vport, sport)
    # The next client packet (no extension headers: the fast path) translates alike.
    again = make(kind, client, vip, sport, vport, flags=ACK)
    action, port, out2 = fwd.process(again, OUT, 3.0)
    assert (action, port) == (FORWARD, IN)
    assert isinstance(out2, bytearray)
    assert fields(out2)[:4] == (src, dst, xsp, bport)
    snap = fwd.counters.snapshot()
    assert snap["new"] == 1 and snap["hit"] == 2 and fwd.counters.dropped == 0


def test_fast_path_and_general_path_agree() -> None:
    """An established TCP packet and a hop-limit 2 packet, with and without a header to walk."""
    fwd = forwarder()
    _establish(fwd, "2001:db8:c::1", 1000, 0.0)
    outs = []
    for ext in (False, True):
        pkt = make("tcp", "2001:db8:c::1", VIP, 1000, 443, flags=ACK, ext=ext, hop_limit=2)
        action, _, out = fwd.process(pkt, OUT, 1.0)
        assert action == FORWARD and isinstance(out, bytearray)
        outs.append(fields(out))
    assert outs[0] == outs[1] and outs[0][4] == 1


def test_udp_zero_checksum_stays_zero() -> None:
    """A UDP checksum of 0 means none (RFC 8200 §8.1 makes receivers drop it); we don't invent one."""
    fwd = forwarder()
    pkt = build.udp("2001:db8:c::1", VIP, 5000, 53, b"q")
    pkt[46:48] = b"\0\0"
    action, _, out = fwd.process(pkt, OUT, 0.0)
    assert action == FORWARD and isinstance(out, bytearray)
    assert out[46:48] == b"\0\0" and build.ntop(out[24:40]).startswith("fd00:b::")


def test_udp_computed_zero_is_sent_as_ffff() -> None:
    """A datagram whose translated checksum computes to 0 leaves with 0xFFFF (RFC 8200 §8.1)."""
    client, backend = build.a16("2001:db8:c::1"), build.a16("fd00:b::1")
    pool = BackendPool([BackendSpec(backend, 53)], table_size=TABLE)
    fwd = NatForwarder([NatService(VIP, pool, protocol="udp", ports=[53])], fx.LB)
    # Pick the 2-byte payload that makes the translated datagram's sum zero.
    seg = bytearray(build.udp_datagram(client, backend, 5000, 53, b"\0\0"))
    seg[6:8] = b"\0\0"
    word = checksum(client, backend, 17, seg)
    action, _, out = fwd.process(build.udp(client, VIP, 5000, 53, word.to_bytes(2, "big")), OUT, 0)
    assert action == FORWARD and isinstance(out, bytearray)
    assert out[46:48] == b"\xff\xff" and verify(out[8:24], out[24:40], 17, out[40:])


# --- TCP states through the NAT ----------------------------------------------------------


def test_tcp_lifecycle_and_reopen() -> None:
    fwd = forwarder()
    c = "2001:db8:c::7"

    def send(flags: int, inside: bool, now: float) -> int:
        if inside:
            conn = next(fwd.flows())
            b, x, bp, xp = conn.reply_tuple
            pkt = make("tcp", b, x, bp, xp, flags=flags)
        else:
            pkt = make("tcp", c, VIP, 5555, 443, flags=flags)
        return fwd.process(pkt, IN if inside else OUT, now)[0]

    def state() -> State:
        return State(next(fwd.flows()).state)

    assert send(SYN, False, 0) == FORWARD and state() is State.SYN_SENT
    assert send(SYNACK, True, 1) == FORWARD and state() is State.SYN_RECV
    assert send(ACK, False, 2) == FORWARD and state() is State.ESTABLISHED
    assert send(ACK | TCP_FIN, True, 3) == FORWARD and state() is State.CLOSE_WAIT
    assert send(ACK | TCP_FIN, False, 4) == FORWARD and state() is State.LAST_ACK
    assert send(ACK, True, 5) == FORWARD and state() is State.TIME_WAIT
    assert send(SYN | TCP_FIN, False, 6) == DROP  # no TCP sends that
    assert send(SYN, False, 7) == FORWARD and state() is State.SYN_SENT
    snap = fwd.counters.snapshot()
    assert snap["reopened"] == 1 and snap["new"] == 2 and len(fwd.conntrack) == 1
    assert send(TCP_RST, False, 8) == FORWARD and state() is State.CLOSE
    # CLOSE lasts 10 s (Linux's default): then the tuple is free and a reply finds nothing.
    fwd.expire(18.0)
    assert len(fwd.conntrack) == 0
    assert fwd.counters.snapshot()["expired"] == 1


@pytest.mark.parametrize(
    ("kind", "timeout"),
    [("tcp", 120.0), ("udp", 30.0), ("echo", 30.0)],
)
@settings(max_examples=25, deadline=None)
@given(t0=st.floats(0, 1e6, allow_nan=False))
def test_timeouts_fire_exactly(kind: str, timeout: float, t0: float) -> None:
    """A flow answered at t0+timeout-ε is still there; one answered at t0+timeout is gone."""
    vport = {"tcp": 443, "udp": 53, "echo": 0}[kind]
    rkind = "echo-reply" if kind == "echo" else kind
    for at, alive in ((math.nextafter(t0 + timeout, -math.inf), True), (t0 + timeout, False)):
        fwd = forwarder()
        action, _, out = fwd.process(make(kind, "2001:db8:c::2", VIP, 4242, vport), OUT, t0)
        assert action == FORWARD and isinstance(out, bytearray)
        src, dst, sp, dp, _ = fields(out)
        reply = make(rkind, dst, src, sp if kind == "echo" else dp, sp, flags=SYNACK)
        action, arg, _ = fwd.process(reply, IN, at)
        assert (action == FORWARD) is alive, (at, action, arg)
        if not alive:
            assert arg == Reason.NO_MATCH and fwd.counters.snapshot()["expired"] == 1


def test_custom_timeouts() -> None:
    fwd = forwarder(timeouts={"udp-unreplied": 5.0})
    fwd.process(make("udp", "2001:db8:c::2", VIP, 4242, 53), OUT, 0.0)
    assert fwd.expire(4.99) == 0 and fwd.expire(5.0) == 1


# --- SNAT ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["syn", "udp", "rst", "wait"]),
            st.integers(0, 5),  # client
            st.integers(1, 4),  # client port
        ),
        max_size=60,
    )
)
def test_snat_ports_never_collide(ops: list[tuple[str, int, int]]) -> None:
    low, high = 30000, 30005
    fwd = forwarder(snat_ports=(low, high))
    now = 0.0
    for op, ci, cp in ops:
        client = f"2001:db8:c::{ci + 1:x}"
        if op == "wait":
            now += 11.0  # long enough for CLOSE (10 s), not for the rest
            fwd.expire(now)
            continue
        kind = "udp" if op == "udp" else "tcp"
        flags = TCP_RST | ACK if op == "rst" else SYN
        pkt = make(kind, client, SNAT_VIP, 1000 + cp, 443, flags=flags)
        before = fwd.counters.drops[Reason.SNAT_PORTS_EXHAUSTED]
        action, arg, out = fwd.process(pkt, OUT, now)
        live = list(fwd.flows())
        translated = [(c.proto, c.reply_tuple) for c in live]
        assert len(set(translated)) == len(translated)
        for c in live:
            b, x, bp, xp = c.reply_tuple
            assert x == SNAT and low <= xp <= high
        per_space = Counter((c.proto, c.reply_tuple[0], c.reply_tuple[2]) for c in live)
        assert max(per_space.values(), default=0) <= high - low + 1
        if action == DROP and arg == Reason.SNAT_PORTS_EXHAUSTED:
            assert fwd.counters.drops[arg] == before + 1
            assert high - low + 1 in per_space.values()
        assert len(fwd.conntrack) == len(live)


def test_snat_exhaustion_is_counted_and_recovers() -> None:
    one_backend = [
        NatService(
            SNAT_VIP,
            BackendPool([BackendSpec.of("fd00:b::1", 8080)], table_size=TABLE),
            ports=[443],
            snat=SNAT,
            snat_ports=(40000, 40001),
        )
    ]
    fwd = NatForwarder(one_backend, fx.LB)
    verdicts = [
        fwd.process(make("tcp", "2001:db8:c::1", SNAT_VIP, 1000 + i, 443), OUT, 0.0)[:2]
        for i in range(3)
    ]
    assert verdicts == [(FORWARD, IN), (FORWARD, IN), (DROP, Reason.SNAT_PORTS_EXHAUSTED)]
    assert fwd.counters.drops[Reason.SNAT_PORTS_EXHAUSTED] == 1
    # SYN_SENT lasts 120 s; then both ports are free again, the oldest freed first.
    pkt = make("tcp", "2001:db8:c::1", SNAT_VIP, 2000, 443)
    action, _, out = fwd.process(pkt, OUT, 120.0)
    assert action == FORWARD and isinstance(out, bytearray)
    assert fields(out)[2] == 40000


def test_snat_pool_pairs_each_client_with_one_address() -> None:
    pool = BackendPool([BackendSpec.of("fd00:b::1", 8080)], table_size=TABLE)
    svc = NatService(SNAT_VIP, pool, ports=[443], snat="2001:db8:5::/120")
    fwd = NatForwarder([svc], fx.LB)
    seen: dict[str, set[str]] = {}
    for c in range(20):
        for p in range(3):
            client = f"2001:db8:c::{c + 1:x}"
            _, _, out = fwd.process(make("tcp", client, SNAT_VIP, 1000 + p, 443), OUT, 0.0)
            assert isinstance(out, bytearray)
            seen.setdefault(client, set()).add(fields(out)[0])
    assert all(len(s) == 1 for s in seen.values())
    used = set().union(*seen.values())
    assert len(used) > 1 and "2001:db8:5::" not in used  # the subnet-router anycast is skipped


def test_echo_with_snat_translates_the_identifier() -> None:
    fwd = forwarder(snat_ports=(50000, 50009))
    _, _, out = fwd.process(make("echo", "2001:db8:c::1", SNAT_VIP, 7, 0), OUT, 0.0)
    assert isinstance(out, bytearray)
    src, dst, ident, _, _ = fields(out)
    assert (src, ident) == (SNAT, 50000)
    action, _, back = fwd.process(make("echo-reply", dst, src, ident, 0), IN, 1.0)
    assert action == FORWARD and isinstance(back, bytearray)
    assert fields(back)[:3] == (SNAT_VIP, "2001:db8:c::1", 7)


# --- drain and health ----------------------------------------------------------------------


def test_drain_keeps_existing_flows_and_takes_no_new_ones() -> None:
    fwd = forwarder()
    pool = fwd.services[0].pool
    flows = {}
    for i in range(30):
        _, _, out = fwd.process(make("tcp", "2001:db8:c::1", VIP, 2000 + i, 443), OUT, 0.0)
        assert isinstance(out, bytearray)
        flows[2000 + i] = fields(out)[1]
    drained = flows[2000]
    pool.set_drain(pool.addresses.index(build.a16(drained)), True)
    for sp, backend in flows.items():
        _, _, out = fwd.process(make("tcp", "2001:db8:c::1", VIP, sp, 443), OUT, 1.0)
        assert isinstance(out, bytearray) and fields(out)[1] == backend
    for i in range(30):
        _, _, out = fwd.process(make("tcp", "2001:db8:c::9", VIP, 3000 + i, 443), OUT, 1.0)
        assert isinstance(out, bytearray) and fields(out)[1] != drained


def test_backend_down_drops_its_flows_and_retries_go_elsewhere() -> None:
    fwd = forwarder()
    tcp_pool, udp_pool = fwd.services[0].pool, fwd.services[1].pool
    _, _, out = fwd.process(make("tcp", "2001:db8:c::1", VIP, 2000, 443), OUT, 0.0)
    assert isinstance(out, bytearray)
    dead = fields(out)[1]
    _, _, uout = fwd.process(make("udp", "2001:db8:c::1", VIP, 2000, 53), OUT, 0.0)
    assert isinstance(uout, bytearray)
    udead = fields(uout)[1]
    tcp_pool.set_up(tcp_pool.addresses.index(build.a16(dead)), False)
    udp_pool.set_up(udp_pool.addresses.index(build.a16(udead)), False)
    # The backend's reply, and a mid-flow client segment, find no flow any more.
    conn_reply = make("tcp", dead, "2001:db8:c::1", 8080, 2000, flags=SYNACK)
    assert fwd.process(conn_reply, IN, 1.0)[:2] == (DROP, Reason.NO_BACKEND)
    assert fwd.process(make("tcp", "2001:db8:c::1", VIP, 2000, 443, flags=ACK), OUT, 1.0)[:2] == (
        DROP,
        Reason.INVALID_STATE,
    )
    # The client's retried SYN goes to a live backend; a UDP datagram moves at once.
    _, _, out = fwd.process(make("tcp", "2001:db8:c::1", VIP, 2000, 443), OUT, 2.0)
    assert isinstance(out, bytearray) and fields(out)[1] != dead
    _, _, uout = fwd.process(make("udp", "2001:db8:c::1", VIP, 2000, 53), OUT, 2.0)
    assert isinstance(uout, bytearray) and fields(uout)[1] != udead
    assert fwd.counters.snapshot()["backend-down"] == 2


def test_new_and_live_flows_are_counted_per_vip_and_backend() -> None:
    fwd = forwarder()
    web, dns = fwd.services[0], fwd.services[1]
    chosen: Counter[bytes] = Counter()
    for sport in range(2000, 2030):
        _, _, out = fwd.process(make("tcp", "2001:db8:c::1", VIP, sport, 443), OUT, 0.0)
        assert isinstance(out, bytearray)
        chosen[build.a16(fields(out)[1])] += 1
    assert fwd.process(make("tcp", "2001:db8:c::1", VIP, 1, 8443), OUT, 0.0)[0] == DROP
    want = [chosen[a] for a in web.pool.addresses]
    assert (web.new_flows, web.active_flows) == (30, 30)
    assert web.backend_new_flows == web.backend_active_flows == want
    assert len([n for n in want if n]) > 1  # the flows were spread
    assert (dns.new_flows, dns.active_flows) == (0, 0)
    fwd.expire(1e6)  # every entry times out: the live counts fall, the new ones stay
    assert (web.new_flows, web.active_flows) == (30, 0)
    assert web.backend_new_flows == want and web.backend_active_flows == [0, 0, 0]


def test_no_eligible_backend() -> None:
    pool = BackendPool([BackendSpec.of("fd00:b::1", 80, drain=True)], table_size=TABLE)
    fwd = NatForwarder([NatService(VIP, pool, ports=[80])], fx.LB)
    assert fwd.process(make("tcp", "2001:db8:c::1", VIP, 1, 80), OUT, 0.0)[:2] == (
        DROP,
        Reason.NO_BACKEND,
    )


# --- the table bound -----------------------------------------------------------------------


def _establish(fwd: NatForwarder, client: str, sport: int, now: float) -> None:
    _, _, out = fwd.process(make("tcp", client, VIP, sport, 443), OUT, now)
    assert isinstance(out, bytearray)
    s, d, sp, dp, _ = fields(out)
    assert fwd.process(make("tcp", d, s, dp, sp, flags=SYNACK), IN, now)[0] == FORWARD
    assert fwd.process(make("tcp", client, VIP, sport, 443, flags=ACK), OUT, now)[0] == FORWARD


def test_full_table_evicts_half_open_oldest_first_and_protects_established() -> None:
    fwd = forwarder(conntrack_max=4)
    _establish(fwd, "2001:db8:c::1", 1, 0.0)
    _establish(fwd, "2001:db8:c::1", 2, 0.0)
    fwd.process(make("tcp", "2001:db8:c::1", VIP, 3, 443), OUT, 1.0)  # half-open, older
    fwd.process(make("udp", "2001:db8:c::1", VIP, 4, 53), OUT, 2.0)  # unreplied, newer
    assert fwd.process(make("tcp", "2001:db8:c::1", VIP, 5, 443), OUT, 3.0)[0] == FORWARD
    ports = sorted(c.orig_tuple[2] for c in fwd.flows())
    assert ports == [1, 2, 4, 5]
    assert fwd.process(make("tcp", "2001:db8:c::1", VIP, 6, 443), OUT, 4.0)[0] == FORWARD
    assert fwd.process(make("tcp", "2001:db8:c::1", VIP, 7, 443), OUT, 5.0)[0] == FORWARD
    assert sorted(c.orig_tuple[2] for c in fwd.flows()) == [1, 2, 6, 7]
    _establish(fwd, "2001:db8:c::1", 6, 6.0)
    _establish(fwd, "2001:db8:c::1", 7, 6.0)
    # Only established flows left: a new flow is refused, nothing is evicted.
    assert fwd.process(make("tcp", "2001:db8:c::1", VIP, 8, 443), OUT, 7.0)[:2] == (
        DROP,
        Reason.CONNTRACK_FULL,
    )
    assert sorted(c.orig_tuple[2] for c in fwd.flows()) == [1, 2, 6, 7]
    assert fwd.counters.snapshot()["evicted"] == 3


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["syn", "synack", "ack", "udp", "reply", "wait"]), st.integers(0, 15)
        ),
        max_size=80,
    ),
    limit=st.integers(1, 6),
)
def test_conntrack_never_grows_past_its_bound(ops: list[tuple[str, int]], limit: int) -> None:
    fwd = forwarder(conntrack_max=limit)
    now = 0.0
    for op, i in ops:
        if op == "wait":
            now += 7.0 * (i + 1)
            if i % 2:
                fwd.expire(now)
            continue
        flows = list(fwd.flows())
        if op in ("synack", "reply"):
            if not flows:
                continue
            b, x, bp, xp = flows[i % len(flows)].reply_tuple
            kind = "udp" if flows[i % len(flows)].proto == 17 else "tcp"
            fwd.process(make(kind, b, x, bp, xp, flags=SYNACK), IN, now)
        else:
            kind = "udp" if op == "udp" else "tcp"
            port = 53 if op == "udp" else 443
            action, arg, _ = fwd.process(
                make(kind, "2001:db8:c::1", VIP, 1000 + i, port, flags=ACK if op == "ack" else SYN),
                OUT,
                now,
            )
            if arg == Reason.CONNTRACK_FULL:
                # Refused only when every entry is live and protected.
                assert all(
                    c.state in (State.ESTABLISHED, State.UDP_ASSURED, State.FIN_WAIT)
                    and c.expires > now
                    for c in fwd.flows()
                )
        assert len(fwd.conntrack) <= limit


# --- drops, errors, fragments ---------------------------------------------------------------


def test_routing_header_with_segments_left_is_unsupported() -> None:
    fwd = forwarder()
    pkt = build.tcp("2001:db8:c::1", VIP, 1, 443, flags=SYN, ext=[build.srh(["2001:db8::9", VIP])])
    assert fwd.process(pkt, OUT, 0.0)[:2] == (DROP, Reason.UNSUPPORTED)
    done = build.tcp(
        "2001:db8:c::1", VIP, 1, 443, flags=SYN, ext=[build.srh([VIP, "2001:db8::9"], 0)]
    )
    assert fwd.process(done, OUT, 0.0)[0] == FORWARD


def test_malformed_and_other_traffic() -> None:
    fwd = forwarder()
    assert fwd.process(bytearray(b"\x60" + bytes(20)), OUT, 0.0)[:2] == (DROP, Reason.TRUNCATED)
    mld = build.icmpv6("2001:db8:c::1", VIP, 130, 0, bytes(20))
    assert fwd.process(mld, OUT, 0.0)[:2] == (DROP, Reason.NO_MATCH)
    stray_reply = build.echo_reply("2001:db8:c::1", VIP)
    assert fwd.process(stray_reply, OUT, 0.0)[:2] == (DROP, Reason.NO_MATCH)
    for bad_source in ("::", "ff02::1"):
        syn = make("tcp", bad_source, VIP, 1, 443)
        assert fwd.process(syn, OUT, 0.0)[:2] == (DROP, Reason.NO_MATCH)
    esp_from_backend = build.ipv6("fd00:b::1", "2001:db8:c::1", 50, bytes(16))
    assert fwd.process(esp_from_backend, IN, 0.0)[:2] == (DROP, Reason.UNSUPPORTED)


def test_icmp_error_with_a_cut_quote_and_errors_are_never_answered() -> None:
    fwd = forwarder()
    _, _, out = fwd.process(make("tcp", "2001:db8:c::1", VIP, 7000, 443), OUT, 0.0)
    assert isinstance(out, bytearray)
    # A quote cut after the ports: translated, the (absent) TCP checksum left alone.
    quote = bytes(out[:44])
    err = build.icmpv6("fd00:ff::1", "2001:db8:c::1", 1, 0, bytes(4) + quote)
    action, port, fwd_err = fwd.process(err, IN, 1.0)
    assert (action, port) == (FORWARD, OUT) and isinstance(fwd_err, bytearray)
    assert verify(fwd_err[8:24], fwd_err[24:40], 58, fwd_err[40:])
    assert build.ntop(fwd_err[48 + 24 : 48 + 40]) == VIP
    # A quote too short to hold the ports.
    short = build.icmpv6("fd00:ff::1", "2001:db8:c::1", 1, 0, bytes(4) + quote[:42])
    assert fwd.process(short, IN, 1.0)[:2] == (DROP, Reason.ICMP_ERROR_QUOTE_BAD)
    # Hop limit 1 on an error: dropped, never answered with another error.
    err = build.icmpv6("fd00:ff::1", "2001:db8:c::1", 1, 0, bytes(4) + bytes(out), hop_limit=1)
    assert fwd.process(err, IN, 1.0)[:2] == (DROP, Reason.HOP_LIMIT_EXCEEDED)
    assert fwd.counters.replies == 0


def test_fragment_records_expire() -> None:
    fwd = forwarder()
    first = build.udp("2001:db8:c::1", VIP, 6000, 53, b"z" * 100, ext=[build.fragment(0, True, 5)])
    first = first[: 48 + 8 + 48]
    first[4:6] = (len(first) - 40).to_bytes(2, "big")
    assert fwd.process(first, OUT, 0.0)[0] == FORWARD
    later = build.ipv6("2001:db8:c::1", VIP, 17, b"z" * 52, ext=[build.fragment(56, False, 5)])
    assert fwd.process(bytearray(later), OUT, 59.9)[0] == FORWARD
    assert fwd.process(bytearray(later), OUT, 60.0)[:2] == (DROP, Reason.FRAGMENT_UNMATCHED)
    other = build.ipv6(
        "2001:db8:c::1", "2001:db8::1", 17, b"z" * 8, ext=[build.fragment(8, False, 5)]
    )
    assert fwd.process(other, OUT, 0.0)[:2] == (DROP, Reason.NO_MATCH)


def test_time_exceeded_for_an_established_flow_keeps_its_state() -> None:
    fwd = forwarder()
    fwd.process(make("tcp", "2001:db8:c::1", VIP, 9, 443), OUT, 0.0)
    action, port, reply = fwd.process(
        make("tcp", "2001:db8:c::1", VIP, 9, 443, hop_limit=1), OUT, 1.0
    )
    assert (action, port) == (REPLY, OUT) and isinstance(reply, bytearray)
    assert build.ntop(reply[8:24]) == fx.LB and reply[40] == 3
    assert State(next(fwd.flows()).state) is State.SYN_SENT


# --- configuration --------------------------------------------------------------------------


def test_from_config() -> None:
    cfg = parse_config(
        {
            "lb": {"addresses": ["2001:db8:0:1::2"], "conntrack_max": 1000, "flow_hash_seed": 7},
            "vips": [
                {
                    "name": "web",
                    "address": "2001:db8:0:10::80",
                    "ports": [443],
                    "mode": "nat",
                    "table_size": 251,
                    "snat": "2001:db8:0:1::2",
                    "snat_ports": "20000-20999",
                    "backends": [{"address": "2001:db8:0:20::1", "port": 8443}],
                },
                {
                    "name": "dns",
                    "address": "2001:db8:0:10::53",
                    "ports": [53],
                    "protocol": "udp",
                    "mode": "nat",
                    "table_size": 251,
                    "backends": [{"address": "2001:db8:0:20::2"}],
                },
            ],
        }
    )
    fwd = nat_forwarder(cfg)
    assert fwd.conntrack.max_entries == 1000 and fwd.seed == 7
    _, _, out = fwd.process(make("tcp", "2001:db8:c::1", "2001:db8:0:10::80", 5, 443), OUT, 0.0)
    assert isinstance(out, bytearray)
    assert fields(out)[:4] == ("2001:db8:0:1::2", "2001:db8:0:20::1", 20000, 8443)
    _, _, out = fwd.process(make("udp", "2001:db8:c::1", "2001:db8:0:10::53", 5, 53), OUT, 0.0)
    assert isinstance(out, bytearray)
    assert fields(out)[:4] == ("2001:db8:c::1", "2001:db8:0:20::2", 5, 53)
    hl1 = make("tcp", "2001:db8:c::1", "2001:db8:0:10::80", 6, 443, hop_limit=1)
    _, _, reply = fwd.process(hl1, OUT, 0.0)
    assert isinstance(reply, bytearray) and build.ntop(reply[8:24]) == "2001:db8:0:1::2"
    one = nat_forwarder(dataclasses.replace(cfg, vips=(cfg.vip("dns"),)), conntrack_max=10)
    assert one.conntrack.max_entries == 10 and len(one.services) == 1


def test_bad_services() -> None:
    pool = BackendPool([BackendSpec.of("fd00:b::1", 80)], table_size=TABLE)
    with pytest.raises(ValueError, match="tcp or udp"):
        NatService(VIP, pool, protocol="sctp", ports=[80])
    with pytest.raises(ValueError, match="port"):
        NatService(VIP, pool, ports=[])
    with pytest.raises(ValueError, match="both claim"):
        NatForwarder([NatService(VIP, pool, ports=[80]), NatService(VIP, pool, ports=[80])], fx.LB)
    with pytest.raises(ValueError, match="snat_ports"):
        NatService(VIP, pool, ports=[80], snat=SNAT, snat_ports=(2000, 1000))


def test_icmp_errors_are_counted_per_vip() -> None:
    fwd = forwarder()
    svc = next(s for s in fwd.services if s.address == build.a16(VIP))
    _, _, out = fwd.process(make("tcp", "2001:db8:c::1", VIP, 7100, 443), OUT, 0.0)
    assert isinstance(out, bytearray)
    backend, bport = build.ntop(out[24:40]), int.from_bytes(out[42:44], "big")
    # the backend's reply, as the client's side saw it (VIP -> client): a PTB about it
    synack = make("tcp", backend, "2001:db8:c::1", bport, 7100, flags=TCP_SYN | TCP_ACK)
    _, _, reply = fwd.process(synack, IN, 0.1)
    assert isinstance(reply, bytearray)
    ptb = build.icmpv6_error(fx.ROUTER, VIP, 2, 0, bytes(reply), 1280)
    action, port, got = fwd.process(ptb, OUT, 0.2)
    assert (action, port) == (FORWARD, IN) and isinstance(got, bytearray)
    assert build.ntop(got[24:40]) == backend and build.ntop(got[48 + 8 : 48 + 24]) == backend
    assert (svc.icmp_translated, svc.icmp_unmatched) == (1, 0)
    # an error quoting no tracked flow, and one with a cut quote: dropped, counted
    forged = make("tcp", VIP, "2001:db8:c::99", 443, 7200)
    for quote in (bytes(forged), bytes(reply[:30])):
        err = build.icmpv6_error(fx.ROUTER, VIP, 2, 0, quote, 1280)
        assert fwd.process(err, OUT, 0.3)[0] == DROP
    assert (svc.icmp_translated, svc.icmp_unmatched) == (1, 2)
    assert fwd.counters.replies == 0
