"""Benchmark a ``/metrics`` scrape of 100 VIPs x 10 backends.

Run: ``.venv/bin/python benchmarks/bench_metrics.py``.

No root: a real :class:`~v6lb.engines.daemon.Daemon` with a stand-in data plane whose
``status()`` returns at once what the kernel plane would (a counter, packets and ICMPv6
errors per VIP; a nat VIP's replies, new and active flows, and active flows per
backend), so the figures are v6lb's own cost: the daemon composing the status
(health, Maglev slots per backend), turning it into metric families, and the HTTP
scrape through prometheus_client on [::1]. The kernel plane adds its ``nft -j list``
read-back (about 0.4 s with a 65537-element map, docs/run.md) on the scraping thread,
not on the loop. Figures: the median and minimum of ``--runs`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar

import yaml

from v6lb.core.backends import BackendPool
from v6lb.engines.daemon import Daemon
from v6lb.engines.metrics import metric_families
from v6lb.engines.plane import Plane, PlaneStatus, Role, VipCounter
from v6lb.model.config import Config, load_config
from v6lb.model.pools import pools_for
from v6lb.model.status import IcmpErrors


class StandInPlane(Plane):
    """A data plane with the kernel plane's status shape and no kernel."""

    name = "kernel"
    role: ClassVar[Role] = Role.DATAPLANE

    def __init__(self, config: Config) -> None:
        self.config = config
        self._pools = pools_for(config)

    def pools(self) -> Mapping[str, BackendPool]:
        return self._pools

    def install(self) -> str:
        return ""

    def status(self) -> PlaneStatus:
        out = PlaneStatus()
        for i, v in enumerate(self.config.vips):
            out.counters[v.name] = VipCounter(f"v{i}_{v.name}", 1000 + i, 80_000 + i)
            out.icmp[v.name] = IcmpErrors(forwarded=i, translated=0, unmatched=1)
            out.traffic[v.name] = {"in": VipCounter(f"v{i}_{v.name}_in", 9000 + i, 720_000)}
            if v.mode == "nat":  # the kernel plane's nat figures: replies, flows per backend
                out.traffic[v.name]["out"] = VipCounter(f"v{i}_{v.name}_out", 8000, 9_000_000)
                out.new_flows[v.name] = 1000 + i
                out.active_flows[v.name] = 10 * len(v.backends)
                out.backend_active_flows[v.name] = [10] * len(v.backends)
        out.details = {
            "forward": {"forward_denied": 1, "forward_unreachable": 2, "forward_allowed": 3},
            "conntrack": {"conntrack_max": 262144, "conntrack": 5, "conntrack_full": 0},
        }
        return out


def config_file(path: Path, vips: int, backends: int, table_size: int) -> Path:
    data = {
        "lb": {"instance": "bench", "control_socket": str(path.parent / "c.sock")},
        "vips": [
            {
                "name": f"v{i}",
                "address": f"2001:db8:{i:x}::80",
                "ports": [80],
                "mode": "nat" if i % 2 else "dsr-l2",
                "table_size": table_size,
                "health": {"type": "none"},
                "backends": [
                    {"address": f"2001:db8:{i:x}:1::{j + 1:x}", "port": 80} for j in range(backends)
                ],
            }
            for i in range(vips)
        ],
    }
    path.write_text(yaml.safe_dump(data))
    return path


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--vips", type=int, default=100)
    parser.add_argument("--backends", type=int, default=10)
    parser.add_argument("--table-size", type=int, default=65537)
    args = parser.parse_args()
    print(f"python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        path = config_file(Path(tmp) / "lb.yaml", args.vips, args.backends, args.table_size)
        text = path.read_text()
        data = yaml.safe_load(text)
        data["lb"]["metrics"] = f"[::1]:{free_port()}"
        path.write_text(yaml.safe_dump(data))
        config = load_config(path)
        daemon = Daemon(config, [], path=str(path), log=lambda line: None)
        daemon.attach([StandInPlane(config)])
        daemon.open_metrics()
        daemon.install()
        assert daemon.metrics is not None
        daemon.metrics.collector.max_age = 0  # every scrape builds its snapshot
        loop = threading.Thread(target=daemon.serve, kwargs={"signals": False}, daemon=True)
        loop.start()
        url = f"http://{config.lb.metrics}/metrics"
        try:
            status = daemon.status()
            body = urllib.request.urlopen(url, timeout=30).read()
            series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
            print(
                f"{args.vips} VIPs x {args.backends} backends (table {args.table_size}):"
                f" {series} series, {len(body)} bytes"
            )
            for what, fn in (
                ("Daemon.status() (what the loop pays for a loop-bound plane)", daemon.status),
                ("metric_families(status)", lambda: metric_families(status)),
                ("HTTP GET /metrics on [::1], whole scrape", lambda: urllib.request.urlopen(url, timeout=30).read()),
            ):  # fmt: skip
                med, best = timed(fn, args.runs)
                print(f"  {what}: median {med:.1f} ms, min {best:.1f} ms")
        finally:
            daemon.request_stop()
            loop.join(10)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
