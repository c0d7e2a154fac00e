"""The XDP program (src/v6lb/engines/xdp/) against the Python core, by BPF_PROG_TEST_RUN.

Every frame goes through the compiled, verifier-accepted program in the kernel and
through the core built from the same config (tests/xdp_harness.py: ``XCONFIG``, the
DSR golden config with npt pairs and a dsr-l2 VIP added); ``expected`` says what the
program must do given the core's verdict, with the deliberate differences of
docs/dataplane-xdp.md ("Differences from the core") spelled out one by one. A sent
frame must equal the core's output byte for byte from the IPv6 header on, with the
Ethernet addresses of its mode; every other outcome must be the verdict and exactly
the counters named.

* golden: every DSR golden case of the core (all three modes, ICMPv6 errors steered to
  the quoted flow's owner);
* flows: 3,000 seeded random flows (TCP, UDP, fragments, unknown protocols,
  labelled or not) to the multi-backend VIPs: same bytes, so the same backend and
  the same derived flow label, and every backend used;
* bad input: non-IPv6 frames, ND, truncated headers, an extension-header loop, a
  chain too long, Hop-by-Hop not first, and 2,000 random mutations of the golden
  inputs: each is passed or dropped and counted, as the core decides;
* the benchmark build (bench.c) restores the frame, so repeated runs all transmit.

tests/test_xdp_modes.py has npt, dsr-l2 redirection, the property test and the
bad-input corpus. The program is pinned under /sys/fs/bpf/v6lb-test-<pid>/, removed
whatever happens.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6

import dsr_fixtures as fx
from test_dsr import scapy
from v6lb.engines.xdp.program import OBJECT, XdpProgram
from v6lb.wire import build
from xdp_harness import (
    ETH,
    MAC_IN_DST,
    MAC_IN_SRC,
    XCONFIG,
    XDP_DROP,
    XDP_PASS,
    XDP_TX,
    A,
    Core,
    check,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bpf(2), bpffs)"),
]


@pytest.fixture(scope="module")
def prog() -> Iterator[XdpProgram]:
    assert OBJECT.is_file(), f"{OBJECT} is missing: `make xdp` builds it"
    with XdpProgram(f"test-{os.getpid()}") as p:
        assert p.fill(XCONFIG) == sum(1 for v in XCONFIG.vips if v.mode.is_dsr)
        yield p
    assert not p.dir.exists()


@pytest.fixture(scope="module")
def core() -> Core:
    return Core()


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
        p.fill(XCONFIG)
        for vip in (fx.VIP6, fx.VIPSR):
            frame = ETH + bytes(build.tcp(A(fx.CLIENT), A(vip), 40000, 443, payload=b"x" * 60))
            r = p.run(frame, repeat=1000)
            assert (r.retval, r.data) == (XDP_TX, frame)
        assert p.counters() == {"tx": 2000}
    assert not p.dir.exists()
