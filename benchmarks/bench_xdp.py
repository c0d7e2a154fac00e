"""The XDP program's cost per packet, by BPF_PROG_TEST_RUN, beside the Python core's.

Method (docs/benchmarks.md, "XDP program"): the benchmark build of the program
(``build/xdp/v6lb_xdp_bench.o``, from ``src/v6lb/engines/xdp/bench.c``: the same code,
then an undo of the encapsulation so each run sees the original frame) is loaded and
pinned under ``/sys/fs/bpf/v6lb-bench-<pid>/``, its maps filled from a config like
bench_dsr's (four backends per VIP, seed 0x5eed). Each figure is the kernel's mean ns
per run of ``repeat`` = 1,000,000 runs, the median (and minimum) of 5 such calls:

- dsr-ip6ip6, a VIP packet: the packet of bench_dsr (TCP, 60 payload bytes, flow label
  set, 134 bytes with Ethernet): parse, one VIP lookup, jhash of the 4-tuple, Maglev,
  encapsulation, XDP_TX. The program has no flow cache: every packet is hashed, so
  the figure is both the "cached" and the "new" flow;
- the same, unlabelled (the outer label derived from the hash);
- dsr-srv6, the same packet to a dsr-srv6 VIP: outer header and one-segment SRH;
- a non-VIP packet (to an address no VIP has): one lookup, XDP_PASS.

Beside them, the Python core's ``DsrForwarder.process`` for the same packet, by
bench_dsr's method (N = 100,000 calls, the loop's own cost subtracted): the cached
flow (LRU hit) and new flows (jhash + Maglev + LRU insert). Needs root and
``make xdp``. Load average printed before and after.

Run: ``.venv/bin/python benchmarks/bench_xdp.py`` (as root).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

from v6lb.core.verdict import FORWARD, PORT_OUTSIDE
from v6lb.engines.xdp.program import XdpProgram
from v6lb.model.config import parse_config
from v6lb.model.pools import dsr_forwarder
from v6lb.wire import build

REPEAT = 1_000_000
CALLS = 5
N = 100_000
LB = "2001:db8:1b::1"
CLIENT = "2001:db8:c::10"
VIP = "2001:db8:100::80"
VIP_SR = "2001:db8:100::81"
ROOT = Path(__file__).resolve().parents[1]
BENCH_OBJECT = ROOT / "build" / "xdp" / "v6lb_xdp_bench.o"
ETH = bytes.fromhex("02000000aa0102000000bb0286dd")
XDP_PASS, XDP_TX = 2, 3

CONFIG = {
    "lb": {"addresses": [LB], "flow_hash_seed": 0x5EED, "flow_cache_size": N + 1},
    "vips": [
        {
            "name": "ip6ip6",
            "address": VIP,
            "ports": [443],
            "mode": "dsr-ip6ip6",
            "backends": [{"address": f"fd00:a::{i}"} for i in range(1, 5)],
        },
        {
            "name": "srv6",
            "address": VIP_SR,
            "ports": [443],
            "mode": "dsr-srv6",
            "backends": [{"address": f"fd00:b::{i}"} for i in range(1, 5)],
        },
    ],
}


def _load() -> str:
    with open("/proc/loadavg", encoding="ascii") as f:
        return " ".join(f.read().split()[:3])


def _xdp(prog: XdpProgram, frame: bytes, verdict: int) -> tuple[float, float]:
    runs = []
    for _ in range(CALLS):
        r = prog.run(frame, REPEAT)
        assert r.retval == verdict and r.data == frame, (r.retval, verdict)
        runs.append(float(r.duration_ns))
    return statistics.median(runs), min(runs)


def _core(pkt: bytearray) -> dict[str, tuple[float, float]]:
    config = parse_config(CONFIG)
    fwd = dsr_forwarder(config)
    process = fwd.process
    assert process(pkt, PORT_OUTSIDE, 0.0)[0] == FORWARD
    pkts = [build.tcp(CLIENT, VIP, 1024 + i % 64000, 443, payload=b"x" * 60) for i in range(N)]
    for i, p in enumerate(pkts):
        p[22], p[23] = (i >> 8) & 0xFF, i & 0xFF

    def timed(loop: str) -> tuple[float, float]:
        runs = []
        for _ in range(7):
            fwd.clear_flows()
            process(pkt, PORT_OUTSIDE, 0.0)
            t0 = time.perf_counter_ns()
            if loop == "cached":
                for _ in range(N):
                    process(pkt, PORT_OUTSIDE, 0.0)
            elif loop == "new":
                for p in pkts:
                    process(p, PORT_OUTSIDE, 0.0)
            else:
                for _ in pkts:
                    pass
            runs.append((time.perf_counter_ns() - t0) / N)
        return statistics.median(runs), min(runs)

    base = timed("loop")
    cached, new = timed("cached"), timed("new")
    return {
        "core dsr-ip6ip6, cached flow": (cached[0] - base[0], cached[1] - base[1]),
        "core dsr-ip6ip6, new flow": (new[0] - base[0], new[1] - base[1]),
    }


def main() -> dict[str, tuple[float, float]]:
    if os.geteuid() != 0:
        print("bench_xdp: needs root (bpf(2), bpffs): skipped")
        return {}
    if not BENCH_OBJECT.is_file():
        print(f"bench_xdp: {BENCH_OBJECT} is missing: run `make xdp`: skipped")
        return {}
    pkt = build.tcp(CLIENT, VIP, 40000, 443, flags=0x18, payload=b"x" * 60, flow_label=0x12345)
    unlabelled = build.tcp(CLIENT, VIP, 40000, 443, flags=0x18, payload=b"x" * 60)
    srv6 = build.tcp(CLIENT, VIP_SR, 40000, 443, flags=0x18, payload=b"x" * 60, flow_label=0x12345)
    other = build.tcp(CLIENT, "2001:db8:200::1", 40000, 443, flags=0x18, payload=b"x" * 60)
    print(f"load average before: {_load()}")
    res: dict[str, tuple[float, float]] = {}
    with XdpProgram(f"bench-{os.getpid()}", BENCH_OBJECT) as prog:
        prog.fill(parse_config(CONFIG))
        res["xdp dsr-ip6ip6, VIP packet (XDP_TX)"] = _xdp(prog, ETH + bytes(pkt), XDP_TX)
        res["xdp dsr-ip6ip6, unlabelled VIP packet"] = _xdp(prog, ETH + bytes(unlabelled), XDP_TX)
        res["xdp dsr-srv6, VIP packet (XDP_TX)"] = _xdp(prog, ETH + bytes(srv6), XDP_TX)
        res["xdp non-VIP packet (XDP_PASS)"] = _xdp(prog, ETH + bytes(other), XDP_PASS)
        counters = prog.counters()
    assert counters == {"tx": 3 * CALLS * REPEAT, "pass-not-vip": CALLS * REPEAT}, counters
    res.update(_core(pkt))
    print(f"load average after: {_load()}")
    return res


if __name__ == "__main__":
    print(f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"python {sys.version.split()[0]}, kernel {platform.release()}")
    print(f"(repeat {REPEAT:,} per call, median and min of {CALLS} calls; core: N = {N:,})")
    for name, (med, low) in main().items():
        print(f"{name:<44} {med:9.1f} ns/pkt  (min {low:.1f})")
