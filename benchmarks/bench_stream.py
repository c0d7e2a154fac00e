"""1 GiB bodies through a proxy-l7 VIP: builtin vs HAProxy vs nginx direct, on [::1].

Method: nginx (Debian, one worker, ``sendfile on``) serves a 1 GiB file from tmpfs and
stores uploads there (``dav_methods PUT``). curl moves the file through each case:
a download (``-o /dev/null``), an upload with ``Content-Length`` (``-T``; curl sends
``Expect: 100-continue``) and a chunked upload (``-H 'Transfer-Encoding: chunked'``).
The builtin proxy runs on uvloop in a process of its own with its default
``write_high`` (256 KiB), HAProxy 2.6 with the config v6lb renders (``nbthread 1``).
Cases run interleaved, ``--rounds`` times; the report gives the median MiB/s (with
min–max), the proxy's CPU seconds (user + system, from /proc) per GiB, its peak RSS
growth, and the 1-minute load average next to each figure. No pinning: curl, nginx
and the proxy share the machine's CPUs.

Needs nginx and curl (``apt-get install -y nginx-light curl``); haproxy is optional.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from ipaddress import IPv6Address
from pathlib import Path

from bench_proxy import cpu_seconds, free_port, stop_all, wait_port
from v6lb.model.config import Config, parse_config

MIB = 1 << 20
NGINX = """
{user}worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d};
    fastcgi_temp_path {d};
    uwsgi_temp_path {d};
    scgi_temp_path {d};
    client_max_body_size 0;
    sendfile on;
    server {{
        listen [::1]:{port};
        root {d}/www;
        location /files/ {{ dav_methods PUT; }}
    }}
}}
"""


def status_bytes(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def config(port: int, backend_port: int) -> Config:
    raw = {"vips": [{"name": "web", "address": "fd00:5::1", "ports": [port],
                     "mode": "proxy-l7", "scheduler": "round-robin",
                     "health": {"type": "none"},
                     "backends": [{"address": "::1", "port": backend_port}]}]}  # fmt: skip
    c = parse_config(raw, "bench-stream.yaml")
    return replace(c, vips=(replace(c.vips[0], address=IPv6Address("::1")),))


def serve_builtin(port: int, backend_port: int) -> None:
    """The child process: the builtin engine on uvloop until SIGTERM."""
    import asyncio

    from v6lb.engines.proxy import ProxyServer, install_uvloop

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with ProxyServer(config(port, backend_port)):
            await stop.wait()

    install_uvloop()
    asyncio.run(main())


def curl(url: str, big: Path, kind: str) -> None:
    argv = ["curl", "-sS", "--fail", "--http1.1", "-o", "/dev/null"]
    if kind == "download":
        argv.append(f"{url}/big.bin")
    else:
        argv += ["-T", str(big), f"{url}/up.bin"]
        if kind == "chunked upload":
            argv += ["-H", "Transfer-Encoding: chunked"]
    subprocess.run(argv, check=True)


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("--serve", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_builtin(*args.serve)
        return
    if args.size_mib < 64 or args.size_mib % 64:  # the file is written in 64 MiB blocks
        ap.error(f"--size-mib {args.size_mib}: give a multiple of 64 (64, 128, ... 1024)")
    for tool in ("nginx", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install -y nginx-light curl")
    use_haproxy = not args.no_haproxy and shutil.which("haproxy") is not None
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and shutil.disk_usage(shm).free > 3 * args.size_mib * MIB else None
    d = Path(tempfile.mkdtemp(prefix="v6lb-bench-stream-", dir=where))
    procs: list[subprocess.Popen[bytes]] = []
    kinds = ("download", "upload", "chunked upload")
    # (case, kind) -> [(MiB/s, proxy CPU s per GiB, load)]
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    growth: dict[str, int] = {}
    try:
        (d / "www" / "files").mkdir(parents=True)
        (d / "body").mkdir()
        big = d / "www" / "files" / "big.bin"
        block = os.urandom(64 * MIB)
        with open(big, "wb") as f:
            for _ in range(args.size_mib // 64):
                f.write(block)
        nport = free_port()
        user = "user root;\n" if os.geteuid() == 0 else ""
        (d / "nginx.conf").write_text(NGINX.format(d=d, port=nport, user=user))
        procs.append(subprocess.Popen(["nginx", "-c", str(d / "nginx.conf")]))
        bport = free_port()
        builtin = subprocess.Popen([sys.executable, __file__, "--serve", str(bport), str(nport)])
        procs.append(builtin)
        cases: dict[str, tuple[int, int | None]] = {
            "nginx direct": (nport, None),
            "builtin proxy-l7": (bport, builtin.pid),
        }
        if use_haproxy:
            from v6lb.render.haproxy import render_haproxy

            hport = free_port()
            (d / "haproxy.cfg").write_text(render_haproxy(config(hport, nport)))
            hap = subprocess.Popen(["haproxy", "-db", "-f", str(d / "haproxy.cfg")])
            procs.append(hap)
            cases["haproxy mode http"] = (hport, hap.pid)
        for port, _ in cases.values():
            wait_port(port)
        rss0 = {name: status_bytes(pid, "VmRSS") for name, (_, pid) in cases.items() if pid}
        gib = args.size_mib / 1024
        for r in range(args.rounds):
            for kind in kinds:
                for name, (port, pid) in cases.items():
                    before = cpu_seconds(pid) if pid else 0.0
                    t = time.perf_counter()
                    curl(f"http://[::1]:{port}/files", big, kind)
                    took = time.perf_counter() - t
                    cpu = (cpu_seconds(pid) - before) / gib if pid else 0.0
                    results.setdefault((name, kind), []).append(
                        (args.size_mib / took, cpu, load1())
                    )
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        growth = {
            name: status_bytes(pid, "VmHWM") - rss0[name] for name, (_, pid) in cases.items() if pid
        }
    finally:
        stop_all(procs, d)
    print(f"\n{args.size_mib} MiB per transfer, {args.rounds} rounds, medians (min–max)\n")
    print("| case | transfer | MiB/s | proxy CPU s per GiB | load (1 min) |")
    print("|---|---|---|---|---|")
    for (name, kind), runs in results.items():
        rates = [x for x, _, _ in runs]
        cpu = statistics.median(c for _, c, _ in runs)
        loads = [lo for _, _, lo in runs]
        print(
            f"| {name} | {kind} | {statistics.median(rates):,.0f} ({min(rates):,.0f}–"
            f"{max(rates):,.0f}) | {'—' if name == 'nginx direct' else f'{cpu:.2f}'} |"
            f" {min(loads):.2f}–{max(loads):.2f} |"
        )
    for name, g in growth.items():
        print(f"{name}: peak RSS {g / MIB:+.1f} MiB over its RSS when it started listening")


if __name__ == "__main__":
    main()
