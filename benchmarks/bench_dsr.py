"""DSR per-packet cost through DsrForwarder.process.

Method: a TCP packet with 60 payload bytes (120 bytes on the wire), flow
label set, hop limit 64, is sent through ``process`` in a tight loop.

- cached flow (``dsr-ip6ip6``, ``dsr-srv6``, ``dsr-l2``): the same packet
  every call, so after the first call every call is the fast path: one
  ``struct`` read of the flow key, one LRU lookup and move-to-end, one
  concatenation of the backend's outer-header template with the packet and
  six byte patches (word 0, payload length, inner hop limit). The input is
  never modified, so nothing needs restoring between calls.
- new flow: N packets with N distinct source ports, built beforehand; the LRU
  is emptied before each run, so every call is a first packet: full parse,
  VIP lookup, jhash of the 4-tuple, Maglev pick, LRU insert, encapsulation.
- new flow, full LRU: the same, with an LRU of 1024 entries already full, so
  every insert also evicts the least recent flow.

- ICMPv6 errors for the VIP (PMTU discovery, docs/pmtu.md): a Packet Too Big (mtu 1280)
  from a router, quoting 1232 bytes of the backend's reply VIP -> client (1280
  bytes on the wire, as routers send them), through ``dsr-ip6ip6``: for a flow in
  the LRU (parse, quote parse, reversed key, LRU hit, encapsulation), for N
  distinct clients not in the LRU (the hash and Maglev pick each time; the LRU is
  not filled), and unmatched (the quoted source is not the VIP: dropped, counted).

For context, ``flow_hash`` alone (the pure-Python jhash of the 40-byte key)
is timed too: it is most of a new flow's cost.

The loop itself (iterating and fetching the packet) is timed without the
call and subtracted. Each figure is the median (and the minimum, as the
VM is noisy) of 7 runs of N = 100,000 calls.

Run: ``.venv/bin/python benchmarks/bench_dsr.py`` (the venv of ``make test``, which has
v6lb installed; the system python has not).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

from v6lb.core.dsr import DsrForwarder
from v6lb.core.flowhash import flow_hash
from v6lb.core.verdict import FORWARD, FORWARD_L2, PORT_OUTSIDE
from v6lb.model.config import parse_config
from v6lb.model.pools import dsr_forwarder
from v6lb.wire import build

N = 100_000
REPEATS = 7

LB = "2001:db8:1b::1"
CLIENT = "2001:db8:c::10"
VIPS = {
    "dsr-ip6ip6": "2001:db8:100::80",
    "dsr-srv6": "2001:db8:100::81",
    "dsr-l2": "2001:db8:100::82",
}


def _measure(
    fn: Callable[[], None], calls: int, setup: Callable[[], None] | None = None
) -> tuple[float, float]:
    """(median, minimum) ns per call over REPEATS runs."""
    runs = []
    for _ in range(REPEATS):
        if setup is not None:
            setup()
        t0 = time.perf_counter_ns()
        fn()
        runs.append((time.perf_counter_ns() - t0) / calls)
    return statistics.median(runs), min(runs)


def _net(fig: tuple[float, float], base: tuple[float, float]) -> tuple[float, float]:
    return fig[0] - base[0], fig[1] - base[1]


def _forwarder(cache: int = N + 1) -> DsrForwarder:
    backends = [{"address": f"fd00:a::{i}"} for i in range(1, 5)]
    vips = []
    for mode, address in VIPS.items():
        bes = [dict(b) for b in backends]
        if mode == "dsr-l2":
            for i, b in enumerate(bes):
                b["mac"] = f"02:00:00:00:00:0{i + 1}"
        vips.append(
            {"name": mode, "address": address, "ports": [443], "mode": mode, "backends": bes}
        )
    config = parse_config(
        {
            "lb": {"addresses": [LB], "flow_hash_seed": 0x5EED, "flow_cache_size": cache},
            "vips": vips,
        }
    )
    return dsr_forwarder(config)


def main() -> dict[str, tuple[float, float]]:
    fwd = _forwarder()
    process = fwd.process

    def cached(pkt: bytearray) -> Callable[[], None]:
        def run() -> None:
            for _ in range(N):
                process(pkt, PORT_OUTSIDE, 0.0)

        return run

    def baseline() -> None:
        for _ in range(N):
            pass

    res: dict[str, tuple[float, float]] = {}
    base = _measure(baseline, N)
    for mode, vip in VIPS.items():
        pkt = build.tcp(CLIENT, vip, 40000, 443, flags=0x18, payload=b"x" * 60, flow_label=0x12345)
        first = process(pkt, PORT_OUTSIDE, 0.0)
        assert first[0] in (FORWARD, FORWARD_L2)
        res[f"{mode} cached flow ns/pkt"] = _net(_measure(cached(pkt), N), base)

    # First packets of new flows.
    vip = VIPS["dsr-ip6ip6"]
    pkts = [
        build.tcp(CLIENT, vip, 1024 + i % 64000, 443, flags=0x02, payload=b"x" * 60)
        for i in range(N)
    ]
    for i, p in enumerate(pkts):  # distinct 4-tuples: vary the source address too
        p[22] = (i >> 8) & 0xFF
        p[23] = i & 0xFF

    def new_flows() -> None:
        for p in pkts:
            process(p, PORT_OUTSIDE, 0.0)

    def loop_only() -> None:
        for _ in pkts:
            pass

    base_list = _measure(loop_only, N)
    res["new flow (jhash + Maglev + LRU insert) ns/pkt"] = _net(
        _measure(new_flows, N, setup=fwd.clear_flows), base_list
    )
    assert fwd.flows == N
    small = _forwarder(cache=1024)
    sprocess = small.process
    warm = [build.tcp("2001:db8:d::1", vip, 1024 + i, 443) for i in range(1024)]

    def fill() -> None:
        small.clear_flows()
        for p in warm:
            sprocess(p, PORT_OUTSIDE, 0.0)

    def new_flows_evicting() -> None:
        for p in pkts:
            sprocess(p, PORT_OUTSIDE, 0.0)

    res["new flow, full LRU (insert + evict) ns/pkt"] = _net(
        _measure(new_flows_evicting, N, setup=fill), base_list
    )
    assert small.flows == 1024
    src, dst = bytes(pkts[0][8:24]), bytes(pkts[0][24:40])

    def hash_only() -> None:
        for _ in range(N):
            flow_hash(src, dst, 40000, 443, 0x5EED)

    res["of which flow_hash (jhash, 40-byte key) ns"] = _net(_measure(hash_only, N), base)
    assert fwd.counters.dropped == 0 and small.counters.dropped == 0
    res.update(_icmp_errors(base, base_list))
    return res


def _ptb(vip: str, client: str, cport: int) -> bytearray:
    quote = build.tcp(vip, client, 443, cport, flags=0x10, payload=b"r" * 1440)
    return build.icmpv6_error("2001:db8:ff::1", vip, 2, 0, bytes(quote[:1232]), 1280)


def _icmp_errors(
    base: tuple[float, float], base_list: tuple[float, float]
) -> dict[str, tuple[float, float]]:
    fwd = _forwarder()
    process = fwd.process
    vip = VIPS["dsr-ip6ip6"]
    res: dict[str, tuple[float, float]] = {}
    assert process(build.tcp(CLIENT, vip, 40000, 443), PORT_OUTSIDE, 0.0)[0] == FORWARD
    cached = _ptb(vip, CLIENT, 40000)

    def run_cached() -> None:
        for _ in range(N):
            process(cached, PORT_OUTSIDE, 0.0)

    res["ICMPv6 PTB, flow in the LRU ns/pkt"] = _net(_measure(run_cached, N), base)
    forged = [
        _ptb(vip, f"2001:db8:e:{i >> 16:x}::{i & 0xFFFF:x}", 1024 + i % 60000) for i in range(N)
    ]

    def run_forged() -> None:
        for p in forged:
            process(p, PORT_OUTSIDE, 0.0)

    res["ICMPv6 PTB, flow not in the LRU (hash + pick) ns/pkt"] = _net(
        _measure(run_forged, N), base_list
    )
    assert fwd.flows == 1  # errors never fill the LRU
    stray = _ptb(vip, CLIENT, 40000)
    stray[48 + 8 : 48 + 24] = build.a16(CLIENT)  # quoted source: not the VIP

    def run_unmatched() -> None:
        for _ in range(N):
            process(stray, PORT_OUTSIDE, 0.0)

    res["ICMPv6 PTB, unmatched (dropped, counted) ns/pkt"] = _net(_measure(run_unmatched, N), base)
    svc = next(s for s in fwd.services if s.name == "dsr-ip6ip6")
    assert svc.icmp_forwarded == 2 * N * REPEATS and svc.icmp_unmatched == N * REPEATS
    return res


if __name__ == "__main__":
    print(f"python {platform.python_version()} on {platform.machine()} ({platform.processor()})")
    print(f"{'':48s} {'median':>8s} {'min':>8s}")
    for k, (med, low) in main().items():
        print(f"{k:48s} {med:8.0f} {low:8.0f}")
