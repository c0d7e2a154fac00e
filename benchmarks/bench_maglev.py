"""Benchmark the flow hash and Maglev: `.venv/bin/python benchmarks/bench_maglev.py [--runs N]`.

Per-call figures are timeit's best of 5 repeats (the least disturbed run, as
timeit recommends). Table builds are the median of ``--runs`` builds, after
one warm-up build.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import timeit
from collections.abc import Callable
from functools import partial

from v6lb.core.flowhash import flow_hash, flow_hash2, flow_hash3, flow_hash_packet, flow_key, jhash
from v6lb.core.maglev import Maglev, _build_table_reference, backend_id, build_table

SRC = bytes.fromhex("20010db8000000000000000000000001")
DST = bytes.fromhex("20010db8010000000000000000000080")
SEED = 0x5EED


def per_call(stmt: Callable[[], object], number: int) -> float:
    """Seconds per call: the best of 5 timeit repeats."""
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number


def median_ms(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def names(n: int) -> list[str]:
    return [backend_id(f"2001:db8::{i:x}", 80) for i in range(1, n + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=9, help="builds per table size (median)")
    parser.add_argument(
        "--reference", action="store_true", help="also time the plain Python reference build"
    )
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}")

    key = flow_key(SRC, DST, 40000, 80)
    packet = bytearray(14) + bytes(8) + SRC + DST + (40000).to_bytes(2, "big") + bytes(18)
    mg = Maglev(names(1000))
    ports = iter(range(1 << 62))

    def new_flow() -> int:
        return mg.lookup(flow_hash(SRC, DST, next(ports) & 0xFFFF, 80, SEED))

    rows = [
        ("flow_hash, 4-tuple (40-byte key)", lambda: flow_hash(SRC, DST, 40000, 80, SEED)),
        ("flow_hash_packet, 4-tuple from a frame", lambda: flow_hash_packet(packet, 14, 54, SEED)),
        ("flow_hash2, saddr . sport (20 bytes)", lambda: flow_hash2(SRC, 40000, SEED)),
        ("flow_hash3, saddr . daddr . l4proto (36 bytes)", lambda: flow_hash3(SRC, DST, 6, SEED)),
        ("jhash, general form, 40-byte key", lambda: jhash(key, SEED)),
        ("Maglev.lookup only", lambda: mg.lookup(0x9E3779B9)),
        ("new flow: flow_hash + Maglev.lookup", new_flow),
    ]
    per_call(rows[0][1], 200_000)  # warm-up: let the CPU settle before the first row
    print("\nper call (best of 5 timeit repeats)")
    for label, fn in rows:
        t = per_call(fn, 20_000)
        print(f"  {label:<48} {t * 1e6:7.2f} us  ({t * 1e9:,.0f} ns)")

    print(f"\nMaglev build, M=65537 (median of {args.runs} after a warm-up; min in brackets)")
    for n in (1000, 100, 10):
        backends = names(n)
        med, low = median_ms(partial(build_table, backends), args.runs)
        print(f"  build_table, {n:>4} backends {med:8.1f} ms  [{low:.1f}]")
        if args.reference:
            med, low = median_ms(partial(_build_table_reference, backends), 3)
            print(f"  reference,   {n:>4} backends {med:8.1f} ms  [{low:.1f}]")


if __name__ == "__main__":
    main()
