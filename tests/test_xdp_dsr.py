"""The XDP program (src/v6lb/engines/xdp/) against the Python core, by BPF_PROG_TEST_RUN.

Every frame goes through the compiled, verifier-accepted program in the kernel and
through ``DsrForwarder.process`` built from the same config (tests/dsr_fixtures.py);
:func:`expected` says what the program must do given the core's verdict, with the
deliberate differences of docs/dataplane-xdp.md ("Differences from the core") spelled
out one by one. A forwarded dsr-ip6ip6 packet must equal the core's output byte for
byte from the IPv6 header on, and the Ethernet addresses must be swapped; every other
outcome must be the verdict and exactly one counter named.

* golden: every DSR golden case of the core (all modes; what is not dsr-ip6ip6 must
  be passed to the stack and counted);
* flows: 3,000 seeded random flows (TCP, UDP, fragments, unknown protocols,
  labelled or not) to the multi-backend VIPs: same bytes, so the same backend and
  the same derived flow label, and every backend used;
* bad input: non-IPv6 frames, ND, truncated headers, an extension-header loop, a
  chain too long, Hop-by-Hop not first, and 2,000 random mutations of the golden
  inputs: each is passed or dropped and counted, as the core decides;
* the benchmark build (bench.c) undoes its encapsulation, so repeated runs all transmit.

The program is pinned under /sys/fs/bpf/v6lb-test-<pid>/, removed whatever happens.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6

import dsr_fixtures as fx
from test_dsr import CONFIG, scapy
from v6lb.core.dsr import MODE_IP6IP6, MODE_SRV6, DsrForwarder
from v6lb.core.verdict import DROP, FORWARD, FORWARD_MANY, PORT_OUTSIDE, REPLY, Verdict
from v6lb.engines.xdp.program import OBJECT, XdpProgram
from v6lb.model.pools import dsr_forwarder
from v6lb.wire import build
from v6lb.wire.ipv6 import PacketInfo, parse
from v6lb.wire.reasons import Reason

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bpf(2), bpffs)"),
]

XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
SERVED = (MODE_IP6IP6, MODE_SRV6)
MAC_IN_DST = bytes.fromhex("02000000aa01")
MAC_IN_SRC = bytes.fromhex("02000000bb02")
ETH = MAC_IN_DST + MAC_IN_SRC + b"\x86\xdd"
A = build.a16
VIP_MODES = {A(str(v.address)): str(v.mode) for v in CONFIG.vips}
assert len(VIP_MODES) == len({(str(v.address), str(v.mode)) for v in CONFIG.vips})


@pytest.fixture(scope="module")
def prog() -> Iterator[XdpProgram]:
    assert OBJECT.is_file(), f"{OBJECT} is missing: `make xdp` builds it"
    with XdpProgram(f"test-{os.getpid()}") as p:
        assert p.fill(CONFIG) == sum(1 for v in CONFIG.vips if str(v.mode) in SERVED)
        yield p
    assert not p.dir.exists()


@pytest.fixture(scope="module")
def core() -> Core:
    return Core()


class Core:  # the fixture below builds one per module
    """The core's forwarder; ``now`` advances a second per packet (no rate limiting)."""

    def __init__(self) -> None:
        self.fwd: DsrForwarder = dsr_forwarder(CONFIG)
        self.now = 0.0

    def process(self, raw: bytes) -> tuple[Verdict, int]:
        """The verdict and, for a reply, the reason counted with it."""
        self.fwd.clear_flows()
        before = list(self.fwd.counters.drops)
        self.now += 1.0
        v = self.fwd.process(bytearray(raw), PORT_OUTSIDE, self.now)
        after = self.fwd.counters.drops
        reason = next((r for r, n in enumerate(before) if n != after[r]), -1)
        return v, reason


def _icmp_error(raw: bytes) -> bool:
    info = PacketInfo()
    return (
        parse(raw, info) == 0 and info.frag_off < 0 and info.proto == 58 and raw[info.l4_off] < 128
    )


def expected(raw: bytes, verdict: Verdict, reason: int) -> tuple[int, str | None]:
    """(XDP verdict, the one counter it bumps; None: XDP_TX with the core's bytes).

    The deliberate differences (docs/dataplane-xdp.md), in the program's order:
    not an IPv6 header of 40 bytes and version 6, or not to a VIP address: the host's
    own traffic, passed (the core, on its TUN, drops it); an ICMPv6 error for a VIP:
    passed (the core sends it to the quoted flow's owner); a VIP of another mode:
    passed (dsr-l2); Time Exceeded, Packet Too Big and outer fragmentation: passed for the
    stack (the core builds them). Every drop of the core is the program's drop, with
    the same reason.
    """
    action, arg, _ = verdict
    if len(raw) < 40 or raw[0] >> 4 != 6:
        return XDP_PASS, "pass-not-ipv6"
    if raw[24:40] not in VIP_MODES:
        return XDP_PASS, "pass-not-vip"
    if action == DROP and arg in (Reason.ICMP_ERROR_UNMATCHED, Reason.ICMP_ERROR_QUOTE_BAD):
        return XDP_PASS, "pass-icmp-error"
    if action == DROP:
        return XDP_DROP, Reason(arg).label
    if _icmp_error(raw):
        return XDP_PASS, "pass-icmp-error"
    if VIP_MODES[raw[24:40]] not in SERVED:
        return XDP_PASS, "pass-mode"
    if action == FORWARD:
        return XDP_TX, None
    if action == FORWARD_MANY:
        return XDP_PASS, "pass-too-big"
    assert action == REPLY
    if reason == Reason.HOP_LIMIT_EXCEEDED:
        return XDP_PASS, "pass-hop-limit"
    assert reason == Reason.TOO_BIG, Reason(reason)
    return XDP_PASS, "pass-too-big"


def check(prog: XdpProgram, core: Core, raw: bytes) -> int:
    """Run ``raw`` through both; assert the program did what :func:`expected` says."""
    verdict, reason = core.process(raw)
    want, counter = expected(raw, verdict, reason)
    before = prog.counters()
    r = prog.run(ETH + raw)
    after = prog.counters()
    delta = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    assert (r.retval, delta) == (want, {counter or "tx": 1}), raw.hex()
    if want == XDP_TX:
        assert r.data[:12] == MAC_IN_SRC + MAC_IN_DST and r.data[12:14] == b"\x86\xdd"
        assert r.data[14:] == bytes(verdict[2]), raw.hex()  # type: ignore[arg-type]
    elif want in (XDP_PASS, XDP_DROP):
        assert r.data == ETH + raw, "passed or dropped frames are untouched"
    return want


@pytest.mark.parametrize(
    ("name", "inp"), [(g[0], g[1]) for g in fx.GOLDEN], ids=[g[0] for g in fx.GOLDEN]
)
def test_golden(prog: XdpProgram, core: Core, name: str, inp: str) -> None:
    check(prog, core, bytes(scapy(inp)))


def test_random_flows_pick_the_cores_backend(prog: XdpProgram, core: Core) -> None:
    rng = random.Random(0x5EED)
    vipm, vip6 = A(fx.VIPM), A(fx.VIP6)
    outer: dict[bytes, int] = {}
    for i in range(3000):
        src = A("2001:db8:c::")[:10] + rng.randbytes(6)
        label = rng.choice([0, rng.randrange(1, 1 << 20)])
        kind = i % 5
        if kind == 0:
            raw = build.tcp(src, vipm, rng.randrange(1024, 65536), 443, flow_label=label)
        elif kind == 1:
            raw = build.udp(src, vipm, rng.randrange(1, 65536), 53, b"q" * rng.randrange(64))
        elif kind == 2:
            frag = build.fragment(offset=8 * rng.randrange(1, 100), ident=i)
            raw = build.ipv6(src, vipm, rng.choice([6, 17]), b"f" * 48, ext=[frag])
        elif kind == 3:
            raw = build.ipv6(src, vipm, rng.choice([50, 150, 253 - 1]), b"x" * 24)
        elif i % 2:
            port = rng.choice([80, 443])
            raw = build.tcp(src, vip6, rng.randrange(1024, 65536), port, flow_label=label)
        else:  # dsr-srv6
            vip = rng.choice([A(fx.VIPSR), A(fx.VIPEXP)])
            payload = b"x" * rng.randrange(100)
            raw = build.tcp(
                src, vip, rng.randrange(1, 65536), 443, payload=payload, flow_label=label
            )
        assert check(prog, core, bytes(raw)) == XDP_TX
        out = prog.run(ETH + bytes(raw)).data
        outer[out[14 + 24 : 14 + 40]] = outer.get(out[14 + 24 : 14 + 40], 0) + 1
    assert set(outer) == {A(b) for b in fx.BEM} | {A(fx.BE6), A(fx.SID), A(fx.BEEXP)}


def _bad_inputs() -> list[tuple[str, bytes]]:
    c, v = A(fx.CLIENT), A(fx.VIP6)
    tcp = bytes(build.tcp(c, v, 40000, 443))
    dst_loop = [build.dstopts()] * 9
    return [
        ("not to a VIP", bytes(build.tcp(c, A("2001:db8:100::99"), 1, 443))),
        (
            "neighbour solicitation",
            bytes(IPv6(src=fx.CLIENT, dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt=fx.LB)),
        ),
        ("IPv6 header cut short", tcp[:30]),
        ("version 4 in an IPv6 frame", bytes([0x40]) + tcp[1:]),
        ("payload length too long", tcp[:4] + b"\x00\x40" + tcp[6:]),
        ("payload length too short", tcp[:4] + b"\x00\x08" + tcp[6:]),
        ("TCP header cut short", bytes(build.ipv6(c, v, 6, tcp[40:50]))),
        ("UDP header cut short", bytes(build.ipv6(c, v, 17, b"\x01\x02"))),
        ("9 destination options headers", bytes(build.ipv6(c, v, 6, tcp[40:], ext=dst_loop))),
        ("8 destination options headers", bytes(build.ipv6(c, v, 6, tcp[40:], ext=dst_loop[:8]))),
        (
            "hop-by-hop not first",
            bytes(build.ipv6(c, v, 6, tcp[40:], ext=[build.dstopts(), build.hbh()])),
        ),
        ("extension header past the end", bytes(build.ipv6(c, v, 60, b"\x06\x05" + b"\0" * 6))),
        (
            "a header longer than 1024 bytes",
            bytes(build.ipv6(c, v, 60, b"\x06\x80" + b"\0" * 1030)),
        ),
        (
            "first fragment without its TCP header",
            bytes(build.ipv6(c, v, 6, b"\x01" * 8, ext=[build.fragment(more=True)])),
        ),
        ("echo request", bytes(build.echo_request(c, v, 1, 2, b"ping"))),
    ]


@pytest.mark.parametrize(("name", "raw"), _bad_inputs(), ids=[n for n, _ in _bad_inputs()])
def test_bad_input_is_passed_or_dropped_and_counted(
    prog: XdpProgram, core: Core, name: str, raw: bytes
) -> None:
    check(prog, core, raw)


def test_frames_that_are_not_ipv6_are_passed(prog: XdpProgram) -> None:
    before = prog.counters().get("pass-not-ipv6", 0)
    arp = MAC_IN_DST + MAC_IN_SRC + b"\x08\x06" + b"\0" * 28
    vlan = (
        MAC_IN_DST
        + MAC_IN_SRC
        + b"\x81\x00\x00\x05\x86\xdd"
        + bytes(build.tcp(A(fx.CLIENT), A(fx.VIP6), 1, 443))
    )
    # (BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header)
    for frame in (arp, vlan, ETH):
        r = prog.run(frame)
        assert r.retval == XDP_PASS and r.data == frame
    assert prog.counters()["pass-not-ipv6"] == before + 3


def test_mutations_agree_with_the_core(prog: XdpProgram, core: Core) -> None:
    rng = random.Random(16)
    seeds = [bytes(scapy(g[1])) for g in fx.GOLDEN]
    seen: set[int] = set()
    for _ in range(2000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(3)
            if op == 0 and len(raw) > 1:
                raw = raw[: rng.randrange(1, len(raw))]
            elif op == 1:
                raw[rng.randrange(min(len(raw), 80))] = rng.randrange(256)
            else:
                raw[4:6] = (len(raw) - 40 + rng.choice([-8, 0, 0, 8])).to_bytes(
                    2, "big", signed=True
                )[-2:]
        seen.add(check(prog, core, bytes(raw)))
    assert seen == {XDP_DROP, XDP_PASS, XDP_TX}


def test_the_benchmark_build_restores_the_frame_between_runs() -> None:
    """bench.c (benchmarks/bench_xdp.py): every run of a repeat takes the XDP_TX path."""
    bench = OBJECT.with_name("v6lb_xdp_bench.o")
    assert bench.is_file(), f"{bench} is missing: `make xdp` builds it"
    with XdpProgram(f"test-bench-{os.getpid()}", bench) as p:
        p.fill(CONFIG)
        for vip in (fx.VIP6, fx.VIPSR):
            frame = ETH + bytes(build.tcp(A(fx.CLIENT), A(vip), 40000, 443, payload=b"x" * 60))
            r = p.run(frame, repeat=1000)
            assert (r.retval, r.data) == (XDP_TX, frame)
        assert p.counters() == {"tx": 2000}
    assert not p.dir.exists()
