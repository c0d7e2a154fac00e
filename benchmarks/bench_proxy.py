"""Requests/s through the builtin proxy (L4 and L7) and HAProxy, against nginx direct, on [::1].

Method: nginx (Debian, 1 worker) answers ``200 ok`` on [::1]; wrk (Debian) drives
each case with 1 thread and 50 connections for ``--seconds``; the cases run
interleaved, ``--rounds`` times, and the median and spread of each are printed with
the ratio to direct. The servers (nginx and the proxy under test) are pinned to
CPU 0 and wrk to CPU 1 in every case. All features are on: PROXY v2 to the
backend for L4 (nginx ``listen ... proxy_protocol``), forwarding headers for L7,
TCP health checks for both.

    python benchmarks/bench_proxy.py [--rounds 5] [--seconds 5] [--no-haproxy]

Needs nginx and wrk (``apt-get install -y nginx-light wrk``); haproxy is optional.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv6Address
from pathlib import Path

from v6lb.model.config import (
    Backend,
    HealthCheck,
    HealthType,
    Protocol,
    ProxyL4Options,
    ProxyL7Options,
    ProxyProtocol,
    Scheduler,
    Timeouts,
    Vip,
    VipMode,
)

SERVER_CPU = "0"
CLIENT_CPU = "1"
LO = IPv6Address("::1")


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("::1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on [::1]:{port}")


def vips(plain: int, pp: int, l4_port: int, l7_port: int) -> list[Vip]:
    hc = HealthCheck(type=HealthType.TCP, interval=2.0, timeout=1.0)
    t = Timeouts(connect=2.0, idle=60.0)
    return [
        Vip(
            name="l4",
            address=LO,
            ports=(l4_port,),
            protocol=Protocol.TCP,
            mode=VipMode.PROXY_L4,
            scheduler=Scheduler.ROUND_ROBIN,
            backends=(Backend(LO, pp),),
            health=hc,
            options=ProxyL4Options(proxy_protocol=ProxyProtocol.V2, timeouts=t),
        ),
        Vip(
            name="l7",
            address=LO,
            ports=(l7_port,),
            protocol=Protocol.TCP,
            mode=VipMode.PROXY_L7,
            scheduler=Scheduler.ROUND_ROBIN,
            backends=(Backend(LO, plain),),
            health=hc,
            options=ProxyL7Options(timeouts=t),
        ),
    ]


def serve_builtin(plain: int, pp: int, l4_port: int, l7_port: int) -> None:
    """The child process: run the builtin proxy until SIGTERM."""
    import threading

    from v6lb.engines.proxy import ProxyServer, install_uvloop

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    install_uvloop()
    import asyncio

    async def main() -> None:
        async with ProxyServer(vips(plain, pp, l4_port, l7_port)):
            while not stop.is_set():
                await asyncio.sleep(0.2)

    asyncio.run(main())


NGINX = """
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d};
    proxy_temp_path {d};
    fastcgi_temp_path {d};
    uwsgi_temp_path {d};
    scgi_temp_path {d};
    keepalive_requests 1000000;
    server {{
        listen [::1]:{plain};
        listen [::1]:{pp} proxy_protocol;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def wrk(port: int, seconds: float, connections: int) -> tuple[float, float]:
    """(requests/s, p99 latency in ms) from one wrk run."""
    out = subprocess.run(
        [
            "taskset",
            "-c",
            CLIENT_CPU,
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            f"http://[::1]:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert m is not None, out
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        print(f"  wrk reports errors on port {port}: {errors.group(0)}", file=sys.stderr)
    return rps, p99


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("--serve", nargs=4, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_builtin(*args.serve)
        return
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install -y nginx-light wrk")
    use_haproxy = not args.no_haproxy and shutil.which("haproxy") is not None
    procs: list[subprocess.Popen[bytes]] = []
    d = tempfile.mkdtemp(prefix="v6lb-bench-")
    plain, pp, l4, l7, h4, h7 = (free_port() for _ in range(6))
    try:
        conf = Path(d) / "nginx.conf"
        conf.write_text(NGINX.format(d=d, plain=plain, pp=pp))
        procs.append(subprocess.Popen(["taskset", "-c", SERVER_CPU, "nginx", "-c", str(conf)]))
        procs.append(
            subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    SERVER_CPU,
                    sys.executable,
                    __file__,
                    "--serve",
                    str(plain),
                    str(pp),
                    str(l4),
                    str(l7),
                ]
            )
        )
        cases = {"nginx direct": plain, "builtin proxy-l4": l4, "builtin proxy-l7": l7}
        if use_haproxy:
            from v6lb.render.haproxy import render_haproxy

            hv = vips(plain, pp, h4, h7)
            cfg = Path(d) / "haproxy.cfg"
            cfg.write_text(render_haproxy(hv, maxconn=4096, nbthread=1))
            procs.append(
                subprocess.Popen(
                    ["taskset", "-c", SERVER_CPU, "haproxy", "-db", "-f", str(cfg)],
                    stdout=subprocess.DEVNULL,
                )
            )
            cases["haproxy mode tcp"] = h4
            cases["haproxy mode http"] = h7
        for port in cases.values():
            wait_port(port)
        for port in cases.values():  # warm up
            wrk(port, 1, args.connections)
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
        for r in range(args.rounds):
            for name, port in cases.items():
                results[name].append(wrk(port, args.seconds, args.connections))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(d, ignore_errors=True)
    direct = statistics.median(x for x, _ in results["nginx direct"])
    print(
        f"wrk -t1 -c{args.connections} -d{args.seconds:g}s on [::1], {args.rounds} interleaved rounds,"
        f" servers on CPU {SERVER_CPU}, wrk on CPU {CLIENT_CPU}; cpus={os.cpu_count()}"
    )
    print("| case | req/s median | min–max | ratio to direct | p99 ms median |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        rps = [x for x, _ in runs]
        p99 = statistics.median(y for _, y in runs)
        med = statistics.median(rps)
        print(
            f"| {name} | {med:,.0f} | {min(rps):,.0f}–{max(rps):,.0f} | {med / direct:.2f}× | {p99:.2f} |"
        )
    if use_haproxy:
        ratios = {
            "builtin proxy-l4 / haproxy mode tcp": ("builtin proxy-l4", "haproxy mode tcp"),
            "builtin proxy-l7 / haproxy mode http": ("builtin proxy-l7", "haproxy mode http"),
        }
        for label, (a, b) in ratios.items():
            ra = statistics.median(x for x, _ in results[a])
            rb = statistics.median(x for x, _ in results[b])
            print(f"{label}: {ra / rb:.2f}×")


if __name__ == "__main__":
    main()
