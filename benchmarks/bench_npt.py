"""NPTv6 per-packet cost: parse + translate a TCP packet through NptForwarder.process.

Method: a TCP packet with 60 payload bytes is translated in place, outbound
(source rewritten) and, as a second packet, inbound (destination rewritten),
so every call does a full parse, prefix match, prefix rewrite, word
adjustment and hop-limit decrement. Before each call the rewritten address
and the hop limit are restored (one slice assignment and one byte); that
restore and the loop itself are timed in an identical loop without the
calls and subtracted. We report the median and the minimum of 7 repeats of 200,000 calls (the
minimum is the run least disturbed by other load, as timeit advises). Also: the codec's parse alone, and the
`v6lb npt map` address path.

Run: ``.venv/bin/python benchmarks/bench_npt.py``.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

from v6lb.core.nptv6 import NptForwarder, NptMapping
from v6lb.core.verdict import PORT_INSIDE, PORT_OUTSIDE
from v6lb.wire import build
from v6lb.wire.ipv6 import PacketInfo, parse

N = 100_000
REPEATS = 7


def _runs_ns(fn: Callable[[], None], calls_per_run: int) -> list[float]:
    runs = []
    for _ in range(REPEATS):
        t0 = time.perf_counter_ns()
        fn()
        runs.append((time.perf_counter_ns() - t0) / calls_per_run)
    return runs


def _median_ns(fn: Callable[[], None], calls_per_run: int) -> float:
    return statistics.median(_runs_ns(fn, calls_per_run))


def _min_ns(fn: Callable[[], None], calls_per_run: int) -> float:
    return min(_runs_ns(fn, calls_per_run))


def main() -> dict[str, float]:
    m = NptMapping("fd01:203:405::/48", "2001:db8:1::/48")
    fwd = NptForwarder([m], build.a16("2001:db8:1::1"))
    pkt = build.tcp(
        "fd01:203:405:1::1234", "2001:db8:ffff::80", 40000, 443, flags=0x18, payload=b"x" * 60
    )
    rpl = build.tcp(
        "2001:db8:ffff::80", "2001:db8:1:d550::1234", 443, 40000, flags=0x18, payload=b"x" * 60
    )
    src0 = bytes(pkt[8:24])
    dst0 = bytes(rpl[24:40])
    process = fwd.process

    def translate() -> None:
        for _ in range(N):
            pkt[8:24] = src0
            pkt[7] = 64
            process(pkt, PORT_INSIDE, 0.0)
            rpl[24:40] = dst0
            rpl[7] = 64
            process(rpl, PORT_OUTSIDE, 0.0)

    def baseline() -> None:
        for _ in range(N):
            pkt[8:24] = src0
            pkt[7] = 64
            rpl[24:40] = dst0
            rpl[7] = 64

    info = PacketInfo()

    def parse_only() -> None:
        for _ in range(N):
            parse(pkt, info)
            parse(pkt, info)

    # Prefix longer than /48: the IID-word path (§3.5).
    m64 = NptMapping("fd00:1:2:3::/64", "2001:db8:5:6::/64")
    fwd64 = NptForwarder([m64], build.a16("2001:db8:5:6::1"))
    pkt64 = build.tcp(
        "fd00:1:2:3::2", "2001:db8:ffff::80", 40000, 443, flags=0x18, payload=b"x" * 60
    )
    src64 = bytes(pkt64[8:24])
    process64 = fwd64.process
    rpl64 = build.tcp(
        "2001:db8:ffff::80", "2001:db8:5:6:cf42::2", 443, 40000, flags=0x18, payload=b"x" * 60
    )
    dst64 = bytes(rpl64[24:40])

    def translate64() -> None:
        for _ in range(N):
            pkt64[8:24] = src64
            pkt64[7] = 64
            process64(pkt64, PORT_INSIDE, 0.0)
            rpl64[24:40] = dst64
            rpl64[7] = 64
            process64(rpl64, PORT_OUTSIDE, 0.0)

    base_med = _median_ns(baseline, 2 * N)
    base_min = _min_ns(baseline, 2 * N)
    res = {
        "npt /48 parse+translate ns/pkt (median)": _median_ns(translate, 2 * N) - base_med,
        "npt /48 parse+translate ns/pkt (min)": _min_ns(translate, 2 * N) - base_min,
        "npt /64 parse+translate ns/pkt (median)": _median_ns(translate64, 2 * N) - base_med,
        "npt /64 parse+translate ns/pkt (min)": _min_ns(translate64, 2 * N) - base_min,
        "parse only ns/pkt (median)": _median_ns(parse_only, 2 * N),
    }
    # Every call above was a full translation, not a cheap drop.
    assert fwd.counters.dropped == 0 and fwd64.counters.dropped == 0
    assert fwd.counters.forwarded == fwd64.counters.forwarded == 2 * REPEATS * 2 * N
    addrs = [f"fd01:203:405:{i % 0xFFFF:x}::{i & 0xFFFF:x}" for i in range(N)]

    def map_addresses() -> None:
        for a in addrs:
            str(m.translate(a))

    res["npt map address->text ns/addr"] = _median_ns(map_addresses, N)
    return res


if __name__ == "__main__":
    print(f"python {platform.python_version()} on {platform.machine()}")
    for k, v in main().items():
        print(f"{k:48s} {v:8.0f}")
