"""The XDP program's cost per packet, by BPF_PROG_TEST_RUN, beside the Python core's.

Method (docs/benchmarks.md, "XDP program"): the benchmark build of the program
(``build/xdp/v6lb_xdp_bench.o``, from ``src/v6lb/engines/xdp/bench.c``: the same code,
then an undo of what it did to the frame, so each run sees the original frame) is
loaded and pinned under ``/sys/fs/bpf/v6lb-bench-<pid>/``, its maps filled from a
config like bench_dsr's (four backends per VIP, seed 0x5eed) with a dsr-l2 VIP and the
RFC 6296 §3.6 npt pair. Each figure is the kernel's mean ns per run of ``repeat`` =
1,000,000 runs, the median (and minimum) of 5 such calls, printed with the 1-minute
load average taken right after it:

- dsr-ip6ip6, a VIP packet: the packet of bench_dsr (TCP, 60 payload bytes, flow label
  set, 134 bytes with Ethernet): parse, one VIP lookup, jhash of the 4-tuple, Maglev,
  encapsulation, XDP_TX; the same unlabelled (the outer label derived from the hash);
- dsr-srv6, the same packet to a dsr-srv6 VIP: outer header and one-segment SRH;
- dsr-l2, the same packet to a dsr-l2 VIP: the MACs rewritten, XDP_TX;
- npt, the same packet outbound (source translated) and inbound (destination);
- an ICMPv6 Packet Too Big for a dsr-ip6ip6 VIP quoting a flow (1,300 bytes quoted):
  the quote read, the reversed flow hashed, encapsulated to its owner;
- a non-VIP packet (to an address no VIP or npt pair has): XDP_PASS.

The program has no flow cache: every packet is hashed, so each figure is both the
"cached" and the "new" flow. Beside them, the Python core for the same packets by
bench_dsr's and bench_npt's method (N = 100,000 calls, the loop's own cost subtracted):
``DsrForwarder.process`` for the cached flow (LRU hit) and new flows (jhash + Maglev +
LRU insert) in dsr-ip6ip6 and dsr-l2, and ``NptForwarder.process`` (stateless) both
ways. Needs root and ``make xdp``.

Run: ``.venv/bin/python benchmarks/bench_xdp.py`` (as root).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

from v6lb.core.verdict import FORWARD, FORWARD_L2, PORT_INSIDE, PORT_OUTSIDE
from v6lb.engines.xdp.program import XdpProgram
from v6lb.model.config import parse_config
from v6lb.model.pools import dsr_forwarder, npt_forwarder
from v6lb.wire import build

REPEAT = 1_000_000
CALLS = 5
N = 100_000
LB = "2001:db8:1b::1"
CLIENT = "2001:db8:c::10"
VIP = "2001:db8:100::80"
VIP_SR = "2001:db8:100::81"
VIP_L2 = "2001:db8:100::82"
IN_HOST = "fd01:203:405:1::1234"  # RFC 6296 §3.6: fd01:203:405::/48 <-> 2001:db8:1::/48
OUT_HOST = "2001:db8:1:d550::1234"
REMOTE = "2001:db8:ffff::80"
ROOT = Path(__file__).resolve().parents[1]
BENCH_OBJECT = ROOT / "build" / "xdp" / "v6lb_xdp_bench.o"
ETH = bytes.fromhex("02000000aa0102000000bb0286dd")
XDP_PASS, XDP_TX = 2, 3
Figure = tuple[float, float, str]  # median, minimum, load average after


def _vip(name: str, address: str, mode: str, net: str) -> dict[str, object]:
    backends: list[dict[str, str]] = [{"address": f"fd00:{net}::{i}"} for i in range(1, 5)]
    if mode == "dsr-l2":
        for i, b in enumerate(backends):
            b["mac"] = f"02:00:00:00:0{net}:0{i + 1}"
    return {"name": name, "address": address, "ports": [443], "mode": mode, "backends": backends}


CONFIG = {
    "lb": {"addresses": [LB], "flow_hash_seed": 0x5EED, "flow_cache_size": N + 1},
    "vips": [
        _vip("ip6ip6", VIP, "dsr-ip6ip6", "a"),
        _vip("srv6", VIP_SR, "dsr-srv6", "b"),
        _vip("l2", VIP_L2, "dsr-l2", "c"),
    ],
    "npt": [{"inside": "fd01:203:405::/48", "outside": "2001:db8:1::/48"}],
}


def _load() -> str:
    with open("/proc/loadavg", encoding="ascii") as f:
        return f.read().split()[0]


def _xdp(prog: XdpProgram, frame: bytes, verdict: int) -> Figure:
    runs = []
    for _ in range(CALLS):
        r = prog.run(frame, REPEAT)
        assert r.retval == verdict and r.data == frame, (r.retval, verdict)
        runs.append(float(r.duration_ns))
    return statistics.median(runs), min(runs), _load()


def _timed(fn_loop: object, base: tuple[float, float]) -> Figure:
    runs = []
    for _ in range(7):
        t0 = time.perf_counter_ns()
        fn_loop()  # type: ignore[operator]
        runs.append((time.perf_counter_ns() - t0) / N)
    return statistics.median(runs) - base[0], min(runs) - base[1], _load()


def _bare(fn_loop: object) -> tuple[float, float]:
    med, low, _ = _timed(fn_loop, (0.0, 0.0))
    return med, low


def _core_dsr(vip: str, action: int) -> dict[str, Figure]:
    fwd = dsr_forwarder(parse_config(CONFIG))
    process = fwd.process
    pkt = build.tcp(CLIENT, vip, 40000, 443, flags=0x18, payload=b"x" * 60, flow_label=0x12345)
    assert process(pkt, PORT_OUTSIDE, 0.0)[0] == action
    pkts = [build.tcp(CLIENT, vip, 1024 + i % 64000, 443, payload=b"x" * 60) for i in range(N)]
    for i, p in enumerate(pkts):
        p[22], p[23] = (i >> 8) & 0xFF, i & 0xFF

    def cached() -> None:
        fwd.clear_flows()
        process(pkt, PORT_OUTSIDE, 0.0)
        for _ in range(N):
            process(pkt, PORT_OUTSIDE, 0.0)

    def new() -> None:
        fwd.clear_flows()
        for p in pkts:
            process(p, PORT_OUTSIDE, 0.0)

    def loop() -> None:
        fwd.clear_flows()
        for _ in pkts:
            pass

    base = _bare(loop)
    mode = "dsr-l2" if action == FORWARD_L2 else "dsr-ip6ip6"
    return {
        f"core {mode}, cached flow": _timed(cached, base),
        f"core {mode}, new flow": _timed(new, base),
    }


def _core_npt() -> dict[str, Figure]:
    """bench_npt's method: the packet translated in place, its address restored each time."""
    fwd = npt_forwarder(parse_config(CONFIG))
    process = fwd.process
    out: dict[str, Figure] = {}
    for name, src, dst, port, off in (
        ("outbound", IN_HOST, REMOTE, PORT_INSIDE, 8),
        ("inbound", REMOTE, OUT_HOST, PORT_OUTSIDE, 24),
    ):
        pkt = build.tcp(src, dst, 40000, 443, flags=0x18, payload=b"x" * 60, flow_label=0x12345)
        addr = bytes(pkt[off : off + 16])
        assert process(bytearray(pkt), port, 0.0)[0] == FORWARD

        def run(p: bytearray = pkt, a: bytes = addr, o: int = off, pt: int = port) -> None:
            for _ in range(N):
                p[o : o + 16] = a
                p[7] = 64
                process(p, pt, 0.0)

        def bare(p: bytearray = pkt, a: bytes = addr, o: int = off) -> None:
            for _ in range(N):
                p[o : o + 16] = a
                p[7] = 64

        out[f"core npt, {name}"] = _timed(run, _bare(bare))
    return out


def main() -> dict[str, Figure]:
    if os.geteuid() != 0:
        print("bench_xdp: needs root (bpf(2), bpffs): skipped")
        return {}
    if not BENCH_OBJECT.is_file():
        print(f"bench_xdp: {BENCH_OBJECT} is missing: run `make xdp`: skipped")
        return {}

    def tcp(src: str, dst: str, label: int = 0x12345) -> bytes:
        return ETH + bytes(
            build.tcp(src, dst, 40000, 443, flags=0x18, payload=b"x" * 60, flow_label=label)
        )

    quote = build.tcp(VIP, CLIENT, 443, 40000, flags=0x10, payload=b"r" * 1240)
    ptb = ETH + bytes(build.icmpv6_error("2001:db8:ff::1", VIP, 2, 0, quote, 1400))
    print(f"load average before: {_load()}")
    res: dict[str, Figure] = {}
    with XdpProgram(f"bench-{os.getpid()}", BENCH_OBJECT) as prog:
        prog.fill(parse_config(CONFIG))
        res["xdp dsr-ip6ip6, VIP packet (XDP_TX)"] = _xdp(prog, tcp(CLIENT, VIP), XDP_TX)
        res["xdp dsr-ip6ip6, unlabelled VIP packet"] = _xdp(prog, tcp(CLIENT, VIP, 0), XDP_TX)
        res["xdp dsr-srv6, VIP packet (XDP_TX)"] = _xdp(prog, tcp(CLIENT, VIP_SR), XDP_TX)
        res["xdp dsr-l2, VIP packet (XDP_TX)"] = _xdp(prog, tcp(CLIENT, VIP_L2), XDP_TX)
        res["xdp npt, outbound (XDP_TX)"] = _xdp(prog, tcp(IN_HOST, REMOTE), XDP_TX)
        res["xdp npt, inbound (XDP_TX)"] = _xdp(prog, tcp(REMOTE, OUT_HOST), XDP_TX)
        res["xdp PTB for a VIP, to the flow's owner"] = _xdp(prog, ptb, XDP_TX)
        res["xdp non-VIP packet (XDP_PASS)"] = _xdp(prog, tcp(CLIENT, "2001:db8:200::1"), XDP_PASS)
        counters = prog.counters()
    n = CALLS * REPEAT
    want = {"tx": 4 * n, "tx-l2": n, "tx-npt": 2 * n, "icmp-forwarded": n, "pass-not-vip": n}
    assert counters == want, counters
    res.update(_core_dsr(VIP, FORWARD))
    res.update(_core_dsr(VIP_L2, FORWARD_L2))
    res.update(_core_npt())
    print(f"load average after: {_load()}")
    return res


if __name__ == "__main__":
    print(f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"python {sys.version.split()[0]}, kernel {platform.release()}")
    print(f"(repeat {REPEAT:,} per call, median and min of {CALLS} calls; core: N = {N:,})")
    print("(the program has no flow cache: each xdp figure is the cached and the new flow)")
    for name, (med, low, load) in main().items():
        print(f"{name:<44} {med:9.1f} ns/pkt  (min {low:.1f})  load {load}")
