"""Random and mutated bytes through the codec and the translator never raise."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from v6lb.core.nptv6 import NptForwarder, NptMapping
from v6lb.core.verdict import DROP, FORWARD, PORT_INSIDE, PORT_OUTSIDE, REPLY
from v6lb.wire import build
from v6lb.wire.ipv6 import PacketInfo, parse, validate_l4
from v6lb.wire.reasons import Reason

M = NptMapping("fd01:203:405::/48", "2001:db8:1::/48")
SEEDS = [
    build.tcp("fd01:203:405:1::1", "2001:db8:ffff::1", 1, 2, payload=b"abc"),
    build.udp(
        "fd01:203:405:2::1", "2001:db8:ffff::1", 1, 2, b"x" * 30, ext=[build.hbh(), build.dstopts()]
    ),
    build.icmpv6_error(
        "2001:db8:ff::1",
        "2001:db8:1:d551::1",
        3,
        0,
        build.udp("2001:db8:1:d551::1", "2001:db8::9", 1, 2),
    ),
    build.tcp("fd01:203:405:1::1", "2001:db8:ffff::1", 1, 2, ext=[build.fragment(0, True, 5)]),
    build.tcp(
        "fd01:203:405:1::1",
        "2001:db8:ffff::1",
        1,
        2,
        ext=[build.srh(["2001:db8::5", "2001:db8::6"])],
    ),
    build.echo_request("fd01:203:405:1::1", "2001:db8:ffff::1", data=b"p" * 8),
]


def _check(data: bytes) -> None:
    info = PacketInfo()
    rc = parse(data, info)
    assert rc in set(Reason)
    if rc == 0:
        assert 40 <= info.l4_off <= info.end == len(data)
        validate_l4(data, info)
    parse(data, info, 0, strict_length=False)
    fwd = NptForwarder([M], build.a16("2001:db8:1::1"))
    for port in (PORT_INSIDE, PORT_OUTSIDE):
        buf = bytearray(data)
        action, arg, out = fwd.process(buf, port, 0.0)
        assert action in (FORWARD, REPLY, DROP)
        if action == DROP:
            assert arg in set(Reason)
        else:
            assert isinstance(out, bytearray)
            if action == REPLY:
                assert len(out) <= 1280


@settings(max_examples=1500)
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    _check(data)


@settings(max_examples=1500)
@given(st.binary(max_size=160).map(lambda b: b"\x60" + b))
def test_random_bytes_with_version_6(data: bytes) -> None:
    _check(data)


def test_mutated_packets() -> None:
    rng = random.Random(6296)
    for _ in range(20000):
        buf = bytearray(rng.choice(SEEDS))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.6 and buf:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            elif op < 0.8 and buf:
                del buf[rng.randrange(len(buf)) :]
            else:
                buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        if rng.random() < 0.5 and len(buf) >= 6:
            plen = max(0, len(buf) - 40)
            buf[4:6] = plen.to_bytes(2, "big")
        _check(bytes(buf))
