"""NAT66 per-packet cost through NatForwarder.process (ns per packet).

Method:
- Established flow (conntrack hit): a TCP flow is opened (SYN, SYN-ACK, ACK)
  through the forwarder, then a 60-byte-payload ACK segment of it is
  translated, client -> backend and, separately, backend -> client. Before
  each call the packet's original bytes are restored (one slice assignment);
  an identical loop with the restore and without the call is timed and
  subtracted. Every call does the whole work: parse, conntrack lookup, TCP
  state check, address/port rewrite, incremental checksum, hop limit, timer
  refresh and LRU move. Also: the same with a Destination Options header
  (the general path), and a UDP datagram.
- New flow (first packet): N SYNs, each from a different client port, are
  prepared beforehand; each call does the Maglev pick (jhash of the 4-tuple
  and a table lookup), builds the entry and inserts it into conntrack, and
  rewrites the packet. DNAT only, and with SNAT (port allocation too). A new
  forwarder is built for every run, outside the timing.
We report the median of REPEATS runs (after one warm-up run), and the
fastest run beside it: the machine is shared, so the minimum is the better
estimate of the cost itself. Run: ``.venv/bin/python benchmarks/bench_nat.py``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

from v6lb.core.backends import BackendPool, BackendSpec
from v6lb.core.nat66 import NatForwarder, NatService
from v6lb.core.verdict import FORWARD, PORT_INSIDE, PORT_OUTSIDE
from v6lb.wire import build

N = 100_000
N_NEW = 50_000
REPEATS = 7
CLIENT = "2001:db8:c::1"
VIP = "2001:db8:f::80"
SNAT_VIP = "2001:db8:f::81"
BACKENDS = [BackendSpec.of(f"fd00:b::{i + 1:x}", 8080) for i in range(10)]


def _measure(
    fn: Callable[[], None], calls: int, setup: Callable[[], None] | None = None
) -> tuple[float, float]:
    """(median, minimum) ns per call over REPEATS timed runs, after one untimed warm-up run."""
    runs = []
    for i in range(REPEATS + 1):
        if setup is not None:
            setup()
        t0 = time.perf_counter_ns()
        fn()
        if i:
            runs.append((time.perf_counter_ns() - t0) / calls)
    return statistics.median(runs), min(runs)


def _minus(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] - b[0], a[1] - b[1]


def _forwarder() -> NatForwarder:
    pool = BackendPool(BACKENDS, seed=0x5EED)
    services = [
        NatService(VIP, pool, ports=[443]),
        NatService(VIP, pool, protocol="udp", ports=[443]),
        NatService(SNAT_VIP, pool, ports=[443], snat="2001:db8:5::/120"),
    ]
    return NatForwarder(services, "2001:db8:f::1", seed=0x5EED, conntrack_max=1 << 20)


def _established(fwd: NatForwarder, ext: bool = False) -> tuple[bytearray, bytearray]:
    """Open a TCP flow; return a client segment and a backend segment of it."""
    hdrs = [build.dstopts()] if ext else []
    syn = build.tcp(CLIENT, VIP, 40000, 443, flags=0x02, ext=hdrs)
    verdict = fwd.process(syn, PORT_OUTSIDE, 0.0)
    assert verdict[0] == FORWARD
    out = verdict[2]
    assert isinstance(out, bytearray)
    b, c = bytes(out[24:40]), bytes(out[8:24])
    assert fwd.process(build.tcp(b, c, 8080, 40000, flags=0x12), PORT_INSIDE, 0.0)[0] == FORWARD
    pkt = build.tcp(CLIENT, VIP, 40000, 443, flags=0x18, payload=b"x" * 60, ext=hdrs)
    rpl = build.tcp(b, c, 8080, 40000, flags=0x18, payload=b"y" * 60, ext=hdrs)
    assert fwd.process(bytearray(pkt), PORT_OUTSIDE, 0.0)[0] == FORWARD
    return pkt, rpl


def _loop(process: Callable[..., object], pkt: bytearray, port: int) -> Callable[[], None]:
    orig = bytes(pkt)

    def run() -> None:
        for _ in range(N):
            pkt[:] = orig
            process(pkt, port, 1.0)

    return run


def _baseline(pkt: bytearray) -> Callable[[], None]:
    orig = bytes(pkt)

    def run() -> None:
        for _ in range(N):
            pkt[:] = orig

    return run


def main() -> dict[str, tuple[float, float]]:
    res: dict[str, tuple[float, float]] = {}
    fwd = _forwarder()
    pkt, rpl = _established(fwd)
    base = _measure(_baseline(pkt), N)
    hits = fwd.counters.snapshot()["hit"]
    res["established tcp, client -> backend"] = _minus(
        _measure(_loop(fwd.process, pkt, PORT_OUTSIDE), N), base
    )
    res["established tcp, backend -> client"] = _minus(
        _measure(_loop(fwd.process, rpl, PORT_INSIDE), N), base
    )
    # Every call above was a conntrack hit, forwarded.
    assert fwd.counters.snapshot()["hit"] == hits + 2 * (REPEATS + 1) * N
    assert fwd.counters.dropped == 0

    udp_fwd = _forwarder()
    upkt = build.udp(CLIENT, VIP, 40000, 443, b"x" * 60)
    assert udp_fwd.process(bytearray(upkt), PORT_OUTSIDE, 0.0)[0] == FORWARD
    res["established udp, client -> backend"] = _minus(
        _measure(_loop(udp_fwd.process, upkt, PORT_OUTSIDE), N), base
    )

    ext_fwd = _forwarder()
    epkt, erpl = _established(ext_fwd, ext=True)
    res["established tcp + dest options (general path)"] = _minus(
        _measure(_loop(ext_fwd.process, epkt, PORT_OUTSIDE), N), base
    )

    for label, vip in (("new tcp flow, dnat", VIP), ("new tcp flow, dnat + snat", SNAT_VIP)):
        state: dict[str, object] = {}
        syns = [
            build.tcp(f"2001:db8:c::{i >> 14:x}", vip, 1024 + (i & 0x3FFF), 443, flags=0x02)
            for i in range(N_NEW)
        ]

        def setup(syns: list[bytearray] = syns, state: dict[str, object] = state) -> None:
            state["fwd"] = _forwarder()
            state["pkts"] = [bytearray(p) for p in syns]

        def first_packets(state: dict[str, object] = state) -> None:
            f = state["fwd"]
            assert isinstance(f, NatForwarder)
            process = f.process
            for p in state["pkts"]:  # type: ignore[attr-defined]
                process(p, PORT_OUTSIDE, 1.0)

        res[label] = _measure(first_packets, N_NEW, setup)
        f = state["fwd"]
        assert isinstance(f, NatForwarder)
        assert f.counters.snapshot()["new"] == N_NEW and f.counters.dropped == 0
    return res


if __name__ == "__main__":
    print(f"python {platform.python_version()} on {platform.machine()}, nproc {os.cpu_count()}")
    print(f"{'':48s} {'median':>8s} {'min':>8s}  ns/pkt")
    for k, (med, low) in main().items():
        print(f"{k:48s} {med:8.0f} {low:8.0f}")
