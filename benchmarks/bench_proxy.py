"""Requests/s through the builtin proxy (L4 and L7) and HAProxy, against nginx direct, on [::1].

proxy-l4 runs twice, side by side: with the user-space relay (``relay: user``) and the
kernel relay (``relay: kernel``, the BPF sockmap of docs/proxy.md; root and ``make xdp``;
a "(fell back to user)" label says when it could not load).

Method: nginx (Debian, 1 worker) answers ``200 ok`` on [::1]; wrk (Debian) drives
each case with 1 thread and 50 connections for ``--seconds``; the cases run
interleaved, ``--rounds`` times, and the median and spread of each are printed with
the ratio to direct, and the builtin/HAProxy ratio of each round (the two runs of a
round are seconds apart, so they share the machine's load). All features are on:
PROXY v2 to the backend for L4 (nginx ``listen ... proxy_protocol``), forwarding
headers for L7, Maglev scheduling, TCP health checks and timeouts for both.

The proxy's own CPU time (user + system, from /proc) per request is printed too:
it does not depend on what else runs on the machine as much as req/s does. It misses
what the kernel relay moves out of the process (softirq and the kworkers that send
redirected data), so every case also prints the whole machine's busy CPU time per
request (/proc/stat, every CPU: nginx and wrk included, and whatever else runs), and
the 1-minute load average when the case ran. Compare those between cases of one run
on a quiet machine.

Pinning, the same for every case (``--pinning``):

- ``shared`` (default): nginx and the proxy under test on CPU 0, wrk on CPU 1. CPU 0
  is the bottleneck in every case and wrk never is. The req/s ratio between two
  proxies is diluted by nginx's share of CPU 0 (about 9 µs per request); the proxy
  CPU µs/request column is not.
- ``split``: the proxy alone on CPU 0; nginx and wrk on CPU 1. The proxy has a CPU of
  its own, as in a deployment, but CPU 1 caps every case near the direct rate, so a
  proxy that is fast enough (both L4 proxies here) measures the cap, not itself.

    .venv/bin/python benchmarks/bench_proxy.py [--rounds 5] [--seconds 5] [--pinning split|shared]
        [--no-haproxy] [--baseline OTHER/src] [--bare]

``--bare`` adds two floors under the builtin proxy-l4 in Python, each the least a relay
of its kind can do per request (a PROXY v2 header, then each chunk queued and written
after the loop's reads, as the builtin's ``WriteBatch`` does; no counters, timeouts,
health, scheduling or checks): ``bare uvloop relay`` (:func:`serve_bare`, asyncio
protocols on uvloop, as the builtin) and ``bare epoll relay`` (:func:`serve_bare_epoll`,
no asyncio: ``select.epoll`` and ``recv_into`` one buffer).
``--baseline`` runs a second builtin, the one of another checkout's ``src`` (before a
change, say), as two more cases (``baseline proxy-l4 user relay``, ``baseline
proxy-l7``) in the same rounds, on the proxy's CPU too (it is idle while the others
run). The involuntary context switches of the proxy per request are printed as well
(``/proc/PID/status``): on the shared CPU, how often nginx preempted the proxy.

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
from collections.abc import Iterable
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

from v6lb.model.config import (
    Backend,
    HealthCheck,
    HealthType,
    Protocol,
    ProxyL4Options,
    ProxyL7Options,
    ProxyProtocol,
    Relay,
    Scheduler,
    Timeouts,
    Vip,
    VipMode,
)

# (proxy CPU, nginx CPU, wrk CPU)
PINNINGS = {"split": ("0", "1", "1"), "shared": ("0", "0", "1")}
LO = IPv6Address("::1")
_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TCK


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


def machine_busy() -> float:
    """Seconds every CPU of the machine spent busy so far (/proc/stat: all but idle, iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TCK


def stop_all(procs: Iterable[subprocess.Popen[Any]], tmpdir: str) -> None:
    """SIGTERM every process, wait up to 5 s each (then SIGKILL), remove ``tmpdir``."""
    procs = list(procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(tmpdir, ignore_errors=True)


def preempted(pid: int) -> int:
    """The process's involuntary context switches so far (its threads: one here)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("nonvoluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def load1() -> float:
    return os.getloadavg()[0]


def vips(plain: int, pp: int, l4_port: int, l7_port: int, l4k_port: int = 0) -> list[Vip]:
    """The benchmark's VIPs; ``l4k_port``: a second proxy-l4 VIP with the kernel relay."""
    hc = HealthCheck(type=HealthType.TCP, interval=2.0, timeout=1.0)
    t = Timeouts(connect=2.0, idle=60.0)
    l4 = [("l4", l4_port, Relay.USER)] + ([("l4k", l4k_port, Relay.KERNEL)] if l4k_port else [])
    return [
        *(
            Vip(
                name=name,
                address=LO,
                ports=(port,),
                protocol=Protocol.TCP,
                mode=VipMode.PROXY_L4,
                scheduler=Scheduler.MAGLEV,
                backends=(Backend(LO, pp),),
                health=hc,
                options=ProxyL4Options(proxy_protocol=ProxyProtocol.V2, timeouts=t, relay=relay),
            )
            for name, port, relay in l4
        ),
        Vip(
            name="l7",
            address=LO,
            ports=(l7_port,),
            protocol=Protocol.TCP,
            mode=VipMode.PROXY_L7,
            scheduler=Scheduler.MAGLEV,
            backends=(Backend(LO, plain),),
            health=hc,
            options=ProxyL7Options(timeouts=t),
        ),
    ]


def serve_builtin(plain: int, pp: int, l4_port: int, l7_port: int, l4k_port: int) -> None:
    """The child process: run the builtin proxy until SIGTERM."""
    import threading

    from v6lb.engines.proxy import ProxyServer, install_uvloop

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    install_uvloop()
    import asyncio

    async def main() -> None:
        async with ProxyServer(vips(plain, pp, l4_port, l7_port, l4k_port)) as server:
            if l4k_port and server.kernel_relay is None:  # the reason was logged
                Path(os.environ["V6LB_BENCH_DIR"], "no-kernel-relay").touch()
            while not stop.is_set():
                await asyncio.sleep(0.2)
            if server.kernel_relay is not None:
                print(f"kernel relay: {server.kernel_relay.status()}", file=sys.stderr)

    asyncio.run(main())


def serve_bare(pp: int, port: int) -> None:
    """The child process of ``--bare``: a bare relay on uvloop until SIGTERM."""
    import asyncio

    import uvloop

    from v6lb.core.proxyproto import encode_proxy

    out: list[tuple[asyncio.Transport, bytes]] = []

    def flush() -> None:
        items = out[:]
        out.clear()
        for t, data in items:
            if not t.is_closing():
                t.write(data)

    class Side(asyncio.Protocol):
        def __init__(self, peer: Side | None = None) -> None:
            self.peer, self.t, self.early = peer, None, b""

        def connection_made(self, t: asyncio.BaseTransport) -> None:
            self.t = t  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            peer = self.peer
            if peer is not None and peer.t is not None:
                if not out:
                    loop.call_soon(flush)
                out.append((peer.t, data))
            else:  # before the backend connection is up
                self.early += data

        def connection_lost(self, exc: Exception | None) -> None:
            flush()
            if self.peer is not None and self.peer.t is not None:
                self.peer.t.close()

    class Client(Side):
        def connection_made(self, t: asyncio.BaseTransport) -> None:
            super().connection_made(t)
            loop.create_task(self.connect())

        async def connect(self) -> None:
            up = Side(self)
            await loop.create_connection(lambda: up, "::1", pp)
            self.peer = up
            assert up.t is not None and self.t is not None
            a, b = self.t.get_extra_info("peername"), self.t.get_extra_info("sockname")
            up.t.write(encode_proxy(a[0], b[0], a[1], b[1]) + self.early)

    async def main() -> None:
        await loop.create_server(Client, "::1", port)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    loop = uvloop.new_event_loop()
    loop.run_until_complete(main())


def serve_bare_epoll(pp: int, port: int) -> None:
    """The second child of ``--bare``: a bare relay on ``select.epoll``, no asyncio.

    Each loop: every ready socket read into one buffer (``recv_into``), the chunks
    copied out and sent after the reads. A send the kernel takes only in part is
    finished blocking (with 50 connections of small answers, it never is).
    """
    import select

    from v6lb.core.proxyproto import encode_proxy

    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("::1", port))
    ls.listen(4096)
    ls.setblocking(False)
    ep = select.epoll()
    ep.register(ls.fileno(), select.EPOLLIN)
    peer: dict[int, tuple[socket.socket, socket.socket]] = {}  # fd -> (its socket, peer)
    connecting: dict[int, tuple[socket.socket, socket.socket, bytes]] = {}
    buf = bytearray(65536)
    mv = memoryview(buf)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def drop(*socks: socket.socket) -> None:
        for x in socks:
            if peer.pop(x.fileno(), None) is not None:
                ep.unregister(x.fileno())
            x.close()

    def accept() -> None:
        while True:
            try:
                c, a = ls.accept()
            except BlockingIOError:
                return
            up = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            for x in (c, up):  # as uvloop does for its TCP transports
                x.setblocking(False)
                x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up.connect_ex(("::1", pp))
            b = c.getsockname()
            connecting[up.fileno()] = (c, up, encode_proxy(a[0], b[0], a[1], b[1]))
            ep.register(up.fileno(), select.EPOLLOUT)

    while True:
        out: list[tuple[socket.socket, bytes]] = []
        for fd, _ in ep.poll():
            pair = peer.get(fd)
            if pair is not None:
                s, p = pair
                try:
                    n = s.recv_into(buf)
                except OSError:
                    n = 0
                if n:
                    out.append((p, mv[:n].tobytes()))
                else:
                    drop(s, p)
            elif fd in connecting:  # the backend connection is up: the header, then relay
                c, up, hdr = connecting.pop(fd)
                up.sendall(hdr)
                ep.modify(fd, select.EPOLLIN)
                peer[fd], peer[c.fileno()] = (up, c), (c, up)
                ep.register(c.fileno(), select.EPOLLIN)
            else:
                accept()
        for p, data in out:
            try:
                sent = p.send(data)
                if sent < len(data):
                    p.setblocking(True)
                    p.sendall(data[sent:])
                    p.setblocking(False)
            except OSError:
                pass  # closed: its own read says so


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


def wrk(port: int, seconds: float, connections: int, cpu: str) -> tuple[float, float]:
    """(requests/s, p99 latency in ms) from one wrk run."""
    out = subprocess.run(
        [
            "taskset",
            "-c",
            cpu,
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
    ap.add_argument("--pinning", choices=sorted(PINNINGS), default="shared")
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("--baseline", metavar="SRC", help="another builtin's src directory")
    ap.add_argument("--bare", action="store_true", help="add the bare uvloop and epoll relays")
    ap.add_argument("--serve", nargs=5, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-bare", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-bare-epoll", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_builtin(*args.serve)
        return
    if args.serve_bare:
        serve_bare(*args.serve_bare)
        return
    if args.serve_bare_epoll:
        serve_bare_epoll(*args.serve_bare_epoll)
        return
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install -y nginx-light wrk")
    use_haproxy = not args.no_haproxy and shutil.which("haproxy") is not None
    proxy_cpu, nginx_cpu, wrk_cpu = PINNINGS[args.pinning]
    procs: list[subprocess.Popen[bytes]] = []
    d = tempfile.mkdtemp(prefix="v6lb-bench-")
    plain, pp, l4, l7, h4, h7, l4k = (free_port() for _ in range(7))
    # per case, per round: (req/s, p99 ms, proxy CPU µs/req, machine CPU µs/req, load1,
    # involuntary context switches of the proxy per request)
    results: dict[str, list[tuple[float, ...]]] = {}
    try:
        conf = Path(d) / "nginx.conf"
        conf.write_text(NGINX.format(d=d, plain=plain, pp=pp))
        procs.append(subprocess.Popen(["taskset", "-c", nginx_cpu, "nginx", "-c", str(conf)]))
        builtin = subprocess.Popen(
            ["taskset", "-c", proxy_cpu, sys.executable, __file__, "--serve"]
            + [str(p) for p in (plain, pp, l4, l7, l4k)],
            env={**os.environ, "V6LB_BENCH_DIR": d},
        )
        procs.append(builtin)
        # case: (port, pid of the proxy or None)
        cases: dict[str, tuple[int, int | None]] = {
            "nginx direct": (plain, None),
            "builtin proxy-l4 user relay": (l4, builtin.pid),
            "builtin proxy-l4 kernel relay": (l4k, builtin.pid),
            "builtin proxy-l7": (l7, builtin.pid),
        }
        if args.baseline:
            b4, b7 = free_port(), free_port()
            base = subprocess.Popen(
                ["taskset", "-c", proxy_cpu, sys.executable, __file__, "--serve"]
                + [str(p) for p in (plain, pp, b4, b7, 0)],
                env={
                    **os.environ,
                    "V6LB_BENCH_DIR": d,
                    "PYTHONPATH": os.path.abspath(args.baseline),
                },
            )
            procs.append(base)
            cases["baseline proxy-l4 user relay"] = (b4, base.pid)
            cases["baseline proxy-l7"] = (b7, base.pid)
        if args.bare:
            for label, flag in (("uvloop", "--serve-bare"), ("epoll", "--serve-bare-epoll")):
                bp = free_port()
                bare = subprocess.Popen(
                    ["taskset", "-c", proxy_cpu, sys.executable, __file__, flag]
                    + [str(pp), str(bp)]
                )
                procs.append(bare)
                cases[f"bare {label} relay"] = (bp, bare.pid)
        if use_haproxy:
            from v6lb.render.haproxy import render_haproxy

            hv = vips(plain, pp, h4, h7)
            cfg = Path(d) / "haproxy.cfg"
            cfg.write_text(render_haproxy(hv, maxconn=4096, nbthread=1))
            hap = subprocess.Popen(
                ["taskset", "-c", proxy_cpu, "haproxy", "-db", "-f", str(cfg)],
                stdout=subprocess.DEVNULL,
            )
            procs.append(hap)
            cases["haproxy mode tcp"] = (h4, hap.pid)
            cases["haproxy mode http"] = (h7, hap.pid)
        for port, _ in cases.values():
            wait_port(port)
        if (Path(d) / "no-kernel-relay").exists():
            k = cases.pop("builtin proxy-l4 kernel relay")
            cases["builtin proxy-l4 kernel relay (fell back to user)"] = k
        for port, _ in cases.values():  # warm up
            wrk(port, 1, args.connections, wrk_cpu)
        results = {k: [] for k in cases}
        for r in range(args.rounds):
            for name, (port, pid) in cases.items():
                before = cpu_seconds(pid) if pid else 0.0
                switched = preempted(pid) if pid else 0
                busy = machine_busy()
                rps, p99 = wrk(port, args.seconds, args.connections, wrk_cpu)
                n = rps * max(1, round(args.seconds))
                used = cpu_seconds(pid) - before if pid else 0.0
                switched = preempted(pid) - switched if pid else 0
                busy = machine_busy() - busy
                results[name].append(
                    (rps, p99, 1e6 * used / n, 1e6 * busy / n, load1(), switched / n)
                )
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        stop_all(procs, d)
    report(results, args)


def report(results: dict[str, list[tuple[float, ...]]], args: argparse.Namespace) -> None:
    proxy_cpu, nginx_cpu, wrk_cpu = PINNINGS[args.pinning]
    direct = statistics.median(r[0] for r in results["nginx direct"])
    print(
        f"wrk -t1 -c{args.connections} -d{args.seconds:g}s on [::1], {args.rounds} interleaved"
        f" rounds; pinning {args.pinning}: proxy on CPU {proxy_cpu}, nginx on CPU {nginx_cpu},"
        f" wrk on CPU {wrk_cpu}; cpus={os.cpu_count()}"
    )
    print(
        "| case | req/s median | min–max | ratio to direct | p99 ms median"
        " | proxy CPU µs/req median | machine CPU µs/req median | preempted/req"
        " | load1 min–max |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        rps = [r[0] for r in runs]
        p99 = statistics.median(r[1] for r in runs)
        med = statistics.median(rps)
        cpu = statistics.median(r[2] for r in runs)
        busy = statistics.median(r[3] for r in runs)
        loads = [r[4] for r in runs]
        pre = statistics.median(r[5] for r in runs)
        cpu_text = "—" if name == "nginx direct" else f"{cpu:.1f}"
        pre_text = "—" if name == "nginx direct" else f"{pre:.2f}"
        print(
            f"| {name} | {med:,.0f} | {min(rps):,.0f}–{max(rps):,.0f} | {med / direct:.2f}×"
            f" | {p99:.2f} | {cpu_text} | {busy:.1f} | {pre_text}"
            f" | {min(loads):.2f}–{max(loads):.2f} |"
        )
    kernel = next((k for k in results if k.startswith("builtin proxy-l4 kernel")), None)
    pairs = {
        "builtin proxy-l4 user relay / haproxy mode tcp": (
            "builtin proxy-l4 user relay",
            "haproxy mode tcp",
            1.0,
        ),
        "builtin proxy-l7 / haproxy mode http": ("builtin proxy-l7", "haproxy mode http", 0.9),
    }
    if kernel is not None:
        pairs[f"{kernel} / haproxy mode tcp"] = (kernel, "haproxy mode tcp", 1.0)
    for bare in ("bare uvloop relay", "bare epoll relay"):
        if bare in results:
            pairs[f"{bare} / haproxy mode tcp"] = (bare, "haproxy mode tcp", 1.0)
    if "baseline proxy-l7" in results:
        for mode, hap, goal in (("l4 user relay", "tcp", 1.0), ("l7", "http", 0.9)):
            pairs[f"baseline proxy-{mode} / haproxy mode {hap}"] = (
                f"baseline proxy-{mode}",
                f"haproxy mode {hap}",
                goal,
            )
    for label, (a, b, goal) in pairs.items():
        if b not in results:
            continue
        ra = statistics.median(r[0] for r in results[a])
        rb = statistics.median(r[0] for r in results[b])
        per = sorted(x[0] / y[0] for x, y in zip(results[a], results[b], strict=True))
        ca = statistics.median(r[2] for r in results[a])
        cb = statistics.median(r[2] for r in results[b])
        ma = statistics.median(r[3] for r in results[a])
        mb = statistics.median(r[3] for r in results[b])
        print(
            f"{label}: {ra / rb:.2f}× (of medians); per round {statistics.median(per):.2f}×"
            f" ({per[0]:.2f}–{per[-1]:.2f}); proxy CPU per request {ca:.1f} vs {cb:.1f} µs;"
            f" machine CPU per request {ma:.1f} vs {mb:.1f} µs; goal ≥ {goal:.1f}×"
        )


if __name__ == "__main__":
    main()
