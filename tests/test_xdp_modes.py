"""The XDP program's dsr-l2, npt and ICMPv6 steering, and bad input, against the core.

By BPF_PROG_TEST_RUN on the compiled, verifier-accepted program; each frame also goes
through the core (tests/xdp_harness.py: ``DsrForwarder`` or ``NptForwarder``, as the
python plane steers it), and the program must do what ``expected`` derives from the
core's verdict: the same output bytes after the Ethernet header, the verdict, and
exactly the counters named (docs/dataplane-xdp.md, "Differences from the core").

* npt golden: every NPT golden case of the core (tests/npt_fixtures.py, /48 and /64);
* dsr-l2 to an egress link: redirected, the link's MAC as the source;
* property: hypothesis flows for every mode (dsr-ip6ip6, dsr-srv6, dsr-l2, npt both
  ways, ICMPv6 errors quoting a flow): the core's bytes, so the core's backend;
* bad input: a corpus of truncated headers, extension-header loops, fragments, bad
  ICMPv6 quotes, jumbo lengths and random mutations: every frame passed, dropped or
  sent as the core decides, never aborted, one outcome counter per frame, and the
  counters add up to the frames.

The program is pinned under /sys/fs/bpf/v6lb-test-modes-<pid>/, removed whatever happens.
"""

from __future__ import annotations

import ipaddress
import os
import random
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dsr_fixtures as fx
import npt_fixtures as nfx
from test_dsr import scapy
from test_nptv6 import SCAPY
from v6lb.engines.xdp.program import OBJECT, XdpProgram
from v6lb.model.config import parse_config
from v6lb.wire import build
from xdp_harness import (
    BEL2M,
    ETH,
    INSIDE44,
    MAC_IN_DST,
    MACL2M,
    OUTSIDE40,
    VIPL2M,
    XCONFIG,
    XCONFIG_DATA,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    XDP_TX,
    A,
    Core,
    check,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bpf(2), bpffs)"),
]

OUTCOMES = (
    "tx",
    "tx-l2",
    "tx-npt",
    "tx-too-big",
    "pass-not-ipv6",
    "pass-not-vip",
    "pass-hop-limit",
    "pass-too-big",
    "pass-mode",
    "pass-adjust",
    "pass-no-mac",
)
"""The program's outcome counters; every drop is counted under its Reason label."""


@pytest.fixture(scope="module")
def prog() -> Iterator[XdpProgram]:
    assert OBJECT.is_file(), f"{OBJECT} is missing: `make xdp` builds it"
    with XdpProgram(f"test-modes-{os.getpid()}") as p:
        p.fill(XCONFIG)
        yield p
    assert not p.dir.exists()


@pytest.fixture(scope="module")
def core() -> Core:
    return Core()


NPT_GOLDEN = [(g[0], g[1], g[3]) for g in nfx.GOLDEN + nfx.GOLDEN64]
# the core's verdict -> the program's: hop limit 1 is the stack's, no mapping dropped
_NPT_VERDICT = {"forward": XDP_TX, "reply": (XDP_PASS, XDP_DROP), "drop": (XDP_PASS, XDP_DROP)}


@pytest.mark.parametrize(
    ("name", "inp", "core_verdict"), NPT_GOLDEN, ids=[g[0] for g in NPT_GOLDEN]
)
def test_npt_golden(prog: XdpProgram, core: Core, name: str, inp: str, core_verdict: str) -> None:
    raw = bytes(eval(inp, SCAPY))  # noqa: S307 - fixture expressions
    verdict = check(prog, core, raw)
    assert verdict in (_NPT_VERDICT[core_verdict] if core_verdict != "forward" else (XDP_TX,))


def test_l2_to_an_egress_link_is_redirected(prog: XdpProgram) -> None:
    egress = bytes.fromhex("02000000ee07")
    raw = bytes(scapy(f"IPv6(src=CLIENT,dst=VIPL2,fl=0x777,hlim=64)/{fx.TCP_S}"))
    prog.set_l2_egress(7, egress)
    try:
        r = prog.run(ETH + raw)
    finally:
        prog.set_l2_egress(0, bytes(6))
    assert r.retval == XDP_REDIRECT
    assert r.data == bytes.fromhex(fx.MAC.replace(":", "")) + egress + b"\x86\xdd" + raw
    r = prog.run(ETH + raw)  # back to one-armed
    assert r.retval == XDP_TX and r.data[6:12] == MAC_IN_DST


# --- property: the core's backend, for every mode ---------------------------------------

PAIRS = [(nfx.INSIDE, nfx.OUTSIDE), (nfx.INSIDE64, nfx.OUTSIDE64), (INSIDE44, OUTSIDE40)]
_CLIENTS = st.binary(min_size=8, max_size=8).map(lambda b: A("2001:db8:c::")[:8] + b)
_LABELS = st.one_of(st.just(0), st.integers(1, (1 << 20) - 1))


@st.composite
def flows(draw: st.DrawFn) -> bytes:
    """One packet of a random flow to one of the program's modes."""
    kind = draw(st.sampled_from(["ip6ip6", "srv6", "l2", "frag", "icmp", "npt-out", "npt-in"]))
    src = draw(_CLIENTS)
    label = draw(_LABELS)
    sport = draw(st.integers(1, 65535))
    hlim = draw(st.sampled_from([64, 64, 64, 2, 1, 255]))
    if kind in ("ip6ip6", "srv6", "l2"):
        vip, port = {
            "ip6ip6": (fx.VIPM, 443),
            "srv6": (draw(st.sampled_from([fx.VIPSR, fx.VIPEXP])), 443),
            "l2": (VIPL2M, draw(st.sampled_from([443, 8443]))),
        }[kind]
        payload = draw(st.binary(max_size=64))
        if kind == "ip6ip6" and draw(st.booleans()):  # the udp VIP of the same address
            return bytes(build.ipv6(src, A(vip), 17, struct.pack("!HHHH", sport, 53, 8, 0)))
        return bytes(
            build.tcp(src, A(vip), sport, port, payload=payload, flow_label=label, hop_limit=hlim)
        )
    if kind == "frag":
        vip = draw(st.sampled_from([fx.VIPM, VIPL2M]))
        offset = draw(st.sampled_from([0, 8, 1024]))
        proto = draw(st.sampled_from([6, 17]))
        body = struct.pack("!HH", sport, 443 if proto == 6 else 53) + bytes(28)
        frag = build.fragment(offset=offset, more=True, ident=sport)
        return bytes(build.ipv6(src, A(vip), proto, body, ext=[frag], hop_limit=hlim))
    if kind == "icmp":
        vip = draw(st.sampled_from([fx.VIPM, VIPL2M, fx.VIPSR]))
        quote = build.tcp(A(vip), src, 443, sport, payload=b"r" * draw(st.integers(0, 200)))
        mtu = draw(st.integers(1280, 1500))
        return bytes(build.icmpv6_error(A(fx.ROUTER), A(vip), 2, 0, quote, mtu, hop_limit=hlim))
    # npt: a random host of either pair (subnet or IID words of 0xFFFF included)
    pair = draw(st.sampled_from(PAIRS))
    net = ipaddress.IPv6Network(pair[0] if kind == "npt-out" else pair[1])
    plen = max(ipaddress.IPv6Network(p).prefixlen for p in pair)  # zero-extended (§3.1)
    bits = draw(st.integers(0, (1 << (128 - plen)) - 1))
    if draw(st.integers(0, 9)) == 0:
        bits = (1 << (128 - plen)) - 1  # subnet or IID words of 0xFFFF
    host = bytearray((int(net.network_address) | bits).to_bytes(16, "big"))
    remote = A(nfx.REMOTE)
    s, d = (bytes(host), remote) if kind == "npt-out" else (remote, bytes(host))
    if draw(st.booleans()):
        return bytes(build.tcp(s, d, sport, 443, flow_label=label, hop_limit=hlim))
    return bytes(build.echo_request(s, d, sport, 1, b"ping", hop_limit=hlim))


@settings(max_examples=2000, derandomize=True, database=None)
@given(raw=flows())
def test_random_flows_pick_the_cores_backend(prog: XdpProgram, core: Core, raw: bytes) -> None:
    check(prog, core, raw)


def test_every_l2_backend_is_used(prog: XdpProgram, core: Core) -> None:
    rng = random.Random(0x12)
    macs = set()
    for _ in range(200):
        src = A("2001:db8:c::")[:8] + rng.randbytes(8)
        raw = bytes(build.tcp(src, A(VIPL2M), rng.randrange(1, 65536), 443))
        assert check(prog, core, raw) == XDP_TX
        macs.add(prog.run(ETH + raw).data[:6])
    assert macs == {bytes.fromhex(m.replace(":", "")) for m in MACL2M}
    assert len(BEL2M) == len(macs)


# --- bad input ----------------------------------------------------------------------------


def _icmp_quotes() -> list[bytes]:
    """ICMPv6 errors to a VIP whose quotes the core refuses, or reads in its four shapes."""
    c, v = A(fx.CLIENT), A(fx.VIPM)
    tcp = bytes(build.tcp(v, c, 443, 40000))
    l4 = tcp[40:]
    quotes = (
        [
            tcp[:n]
            for n in (0, 8, 39, 40, 41, 43, 44)  # cut short: quote-bad
        ]
        + [
            bytes(build.tcp(A(fx.CLIENT2), c, 443, 40000)),  # not from the VIP: unmatched
            bytes(build.tcp(v, c, 8443, 40000)),  # a port no VIP serves
            bytes(build.ipv6(v, c, 6, l4, ext=[build.fragment(more=True)])),  # first fragment
            bytes(build.ipv6(v, c, 6, l4, ext=[build.fragment(offset=64)])),  # later: 3-tuple
            bytes(build.ipv6(v, c, 50, l4, ext=[build.fragment(offset=64)])),  # later, ESP
            bytes(build.ipv6(v, c, 6, l4, ext=[build.dstopts()])),  # 8-byte options
            bytes(build.ipv6(v, c, 6, l4, ext=[build.hbh(b"\x01\x0c" + bytes(12))])),  # 16 bytes
            bytes(build.ipv6(v, c, 6, l4, ext=[build.dstopts(), build.dstopts()])),  # two
            bytes(build.ipv6(v, c, 6, l4[:2], ext=[build.dstopts()])),  # ports cut
            bytes(build.ipv6(v, c, 17, b"\x00\x35\x9c\x40")),  # udp/53 quoted
            bytes(build.ipv6(v, c, 58, bytes(8))),  # an ICMPv6 quote
        ]
    )
    out = []
    for q in quotes:
        for typ in (1, 2, 3, 4):
            out.append(bytes(build.icmpv6_error(A(fx.ROUTER), v, typ, 0, q, 1400)))
    # the 4-byte ICMPv6 header and nothing else; a quote over a longer chain
    out.append(bytes(build.ipv6(A(fx.ROUTER), v, 58, b"\x01\x00\x00\x00")))
    return out


def _corpus() -> list[bytes]:
    c, v = A(fx.CLIENT), A(fx.VIP6)
    tcp = bytes(build.tcp(c, v, 40000, 443, payload=b"d" * 40))
    seeds = [bytes(scapy(g[1])) for g in fx.GOLDEN]
    seeds += [bytes(eval(g[1], SCAPY)) for g in NPT_GOLDEN]  # noqa: S307 - fixture expressions
    quotes = _icmp_quotes()
    corpus = list(quotes)
    # truncated headers: every length of a few seeds, payload length kept and fixed
    for seed in (tcp, quotes[-8], seeds[-1], bytes(eval(NPT_GOLDEN[5][1], SCAPY))):  # noqa: S307
        for n in range(1, len(seed)):
            cut = bytearray(seed[:n])
            corpus.append(bytes(cut))
            if n >= 40:
                cut[4:6] = (n - 40).to_bytes(2, "big")
                corpus.append(bytes(cut))
    # extension-header loops and chains
    for k in range(1, 12):
        corpus.append(bytes(build.ipv6(c, v, 6, tcp[40:], ext=[build.dstopts()] * k)))
        corpus.append(bytes(build.ipv6(c, v, 6, tcp[40:], ext=[build.hbh()] * k)))
        frags = [build.fragment(more=True, ident=k)] * k
        corpus.append(bytes(build.ipv6(c, v, 6, tcp[40:], ext=frags)))
    big = build.dstopts(b"\x01" + bytes([254]) + bytes(254))  # 264 bytes: 5 are too many
    corpus.append(bytes(build.ipv6(c, v, 6, tcp[40:], ext=[big] * 5)))
    # fragments: tiny, later, first without the upper layer, for each mode and npt
    for dst in (fx.VIP6, fx.VIPSR, fx.VIPL2, VIPL2M, fx.VIPM, nfx.OUT_HOST):
        for off, more, body in ((0, True, b"\x9c"), (8, False, b"x"), (0, False, bytes(8))):
            corpus.append(bytes(build.ipv6(c, A(dst), 6, body, ext=[build.fragment(off, more, 5)])))
    # port 0 (the maps' default keys), and npt's neighbours: inside to inside, outside
    # to outside, a stranger (all passed)
    corpus.append(bytes(build.tcp(c, v, 40000, 0)))
    corpus.append(bytes(build.ipv6(c, v, 6, b"\x9c\x40\x00\x00", ext=[build.fragment(0, True)])))
    corpus.append(bytes(build.icmpv6_error(A(fx.ROUTER), v, 1, 0, build.tcp(v, c, 0, 1), 0)))
    ih, oh, rm = A(nfx.IN_HOST), A(nfx.OUT_HOST), A(nfx.REMOTE)
    for s_, d_ in ((ih, A("fd01:203:405:2::1")), (oh, rm), (rm, A("fd01:203:405:1::1"))):
        corpus.append(bytes(build.tcp(s_, d_, 1, 2)))
    # too big, and no Packet Too Big allowed (RFC 4443 sec. 2.4 e): an ICMPv6 error, a
    # multicast source
    small = A(fx.VIPSMALL)
    q = build.tcp(small, c, 443, 40000, payload=b"q" * 1300)
    corpus.append(bytes(build.icmpv6_error(A(fx.ROUTER), small, 2, 0, q, 1400)))
    corpus.append(bytes(build.tcp(A("ff02::1"), small, 1, 443, payload=b"m" * 1300)))
    corpus.append(bytes(build.tcp(bytes(16), small, 1, 443, payload=b"m" * 1300)))
    # jumbo lengths: payload length 0 with a Jumbo Payload option (RFC 2675), 0xFFFF
    # with a shorter body, and frames far longer than every tunnel MTU
    jumbo = build.hbh(b"\xc2\x04" + (2000).to_bytes(4, "big"))
    body = tcp[40:] + b"j" * 1900
    for dst in (fx.VIP6, nfx.OUT_HOST):
        j = bytearray(build.ipv6(c, A(dst), 6, body, ext=[jumbo]))
        j[4:6] = b"\x00\x00"
        corpus.append(bytes(j))
        j[4:6] = b"\xff\xff"
        corpus.append(bytes(j))
    for dst in (fx.VIP6, fx.VIPSR, fx.VIPL2, nfx.OUT_HOST):
        corpus.append(bytes(build.tcp(c, A(dst), 40000, 443, payload=b"J" * 3300)))
    # random mutations of every seed: bytes changed, cut, payload length off
    rng = random.Random(0x16B)
    pool = seeds + quotes
    for _ in range(2500):
        raw = bytearray(rng.choice(pool))
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(4)
            if op == 0 and len(raw) > 1:
                raw = raw[: rng.randrange(1, len(raw))]
            elif op == 1:
                raw[rng.randrange(min(len(raw), 120))] = rng.randrange(256)
            elif op == 2:
                raw[4:6] = (len(raw) - 40 + rng.choice([-8, 0, 0, 8])).to_bytes(
                    2, "big", signed=True
                )[-2:]
            else:
                at = rng.randrange(40, max(41, len(raw)))
                raw[at:at] = rng.randbytes(rng.choice([1, 8]))
        corpus.append(bytes(raw))
    return corpus


def test_bad_input_is_passed_dropped_or_sent_and_the_counters_add_up(
    prog: XdpProgram, core: Core
) -> None:
    corpus = _corpus()
    assert len(corpus) > 3000
    before = prog.counters()
    seen: dict[int, int] = {}
    for raw in corpus:
        verdict = check(prog, core, raw)
        seen[verdict] = seen.get(verdict, 0) + 1
    after = prog.counters()
    counted = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    outcomes = sum(n for k, n in counted.items() if k in OUTCOMES)
    drops = {k: n for k, n in counted.items() if k not in OUTCOMES and k != "icmp-forwarded"}
    # one outcome or one drop reason per frame: the counters add up to the frames
    assert outcomes + sum(drops.values()) == len(corpus)
    assert sum(drops.values()) == seen.get(XDP_DROP, 0)
    assert counted.get("icmp-forwarded", 0) <= counted.get("tx", 0) + counted.get("tx-l2", 0)
    assert set(seen) == {XDP_DROP, XDP_PASS, XDP_TX}  # never aborted
    for reason in ("icmp-error-quote-bad", "icmp-error-unmatched", "ext-chain-too-long"):
        assert drops.get(reason, 0) > 0, reason
    assert counted.get("icmp-forwarded", 0) > 0 and counted.get("tx-npt", 0) > 0


def test_packet_too_big_is_rate_limited_per_cpu(prog: XdpProgram) -> None:
    """lb.icmp_error_burst errors at once, then none until the bucket refills (per CPU).

    Last in the module: it leaves this CPU's bucket nearly empty."""
    big = ETH + bytes(build.tcp(A(fx.CLIENT), A(fx.VIP1400), 1, 443, payload=b"b" * 1400))
    lb = {**XCONFIG_DATA["lb"], "icmp_error_burst": 3, "icmp_error_rate": 1}
    limited = parse_config({**XCONFIG_DATA, "lb": lb})
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # one CPU: one bucket
    try:
        prog.fill(limited)
        verdicts = [prog.run(big).retval for _ in range(5)]
    finally:
        prog.fill(XCONFIG)
        os.sched_setaffinity(0, cpus)
    # rate 1/s: no more token in the few microseconds of the five runs
    assert verdicts == [XDP_TX] * 3 + [XDP_DROP] * 2, verdicts
