"""HTTPS through the builtin proxy-l7 and HAProxy, side by side: h2load over TLS, HTTP/2
and HTTP/1.1, keep-alive-heavy and new-connection-heavy, on [::1].

Method: nginx (Debian, 1 worker) answers ``200 ok`` on [::1]; one proxy-l7 VIP with
``tls:`` (an ECDSA P-256 certificate made by trustme, ALPN ``h2,http/1.1``, Maglev,
forwarding headers, TCP health checks) runs on the builtin engine and on HAProxy,
rendered from the same VIP. h2load (Debian ``nghttp2-client``) drives each case; the
cases run interleaved, ``--rounds`` times, and the median of each is printed with the
builtin/HAProxy ratio and the 1-minute load average at the time of each run:

- ``h2 keep-alive``: ``-c 20 -m 10`` (20 connections, 10 streams each), ``-D`` seconds.
- ``http/1.1 keep-alive``: ``--h1 -c 50``, ``-D`` seconds.
- ``h2 new connections`` and ``http/1.1 new connections``: ``-c 200 -n 200``: each
  connection a TLS handshake (TLS 1.3) and one request, repeated ``--batches`` times.

Printed per case: requests/s, handshakes/s (connections / time), and the proxy's CPU
time (user + system, from /proc) per request in µs. Then the floor the ``h2`` library
sets (:func:`library_floor`): its server side alone, in memory, per request. Pinning as bench_proxy's
``shared``: the proxy and nginx on CPU 0, h2load on CPU 1.

    .venv/bin/python benchmarks/bench_h2.py [--rounds 3] [--seconds 5] [--batches 5]
        [--cases "http/1.1 keep-alive,..."] [--baseline OTHER/src]

``--baseline`` runs a second builtin, the one of another checkout's ``src`` (before a
change, say), as engine ``baseline``, side by side with the two others.

Needs nginx, h2load and haproxy (``apt-get install -y nginx-light nghttp2-client haproxy``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_proxy import NGINX, cpu_seconds, free_port, stop_all, vips, wait_port
from v6lb.model.config import TlsCertificate, TlsOptions, Vip

PROXY_CPU, NGINX_CPU, CLIENT_CPU = "0", "0", "1"
# case: h2load arguments (before the URL), and whether it is timed (-D) or batched
CASES: dict[str, tuple[list[str], bool]] = {
    "h2 keep-alive": (["-c", "20", "-m", "10"], True),
    "http/1.1 keep-alive": (["--h1", "-c", "50"], True),
    "h2 new connections": (["-c", "200", "-n", "200"], False),
    "http/1.1 new connections": (["--h1", "-c", "200", "-n", "200"], False),
}


def tls_vip(d: Path, plain: int, port: int) -> Vip:
    """The benchmark's proxy-l7 VIP (bench_proxy's), with TLS."""
    vip = vips(plain, plain, free_port(), port)[1]
    tls = TlsOptions(
        certificates=(TlsCertificate(str(d / "www.crt"), str(d / "www.key")),),
        alpn=("h2", "http/1.1"),
    )
    return dataclasses.replace(vip, options=dataclasses.replace(vip.options, tls=tls))


def serve_builtin(d: Path, plain: int, port: int) -> None:
    """The child process: run the builtin proxy until SIGTERM."""
    import asyncio
    import threading

    from v6lb.engines.proxy import ProxyServer, install_uvloop

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    install_uvloop()

    async def main() -> None:
        async with ProxyServer([tls_vip(d, plain, port)]):
            while not stop.is_set():
                await asyncio.sleep(0.2)

    asyncio.run(main())


def h2load(port: int, args: list[str], seconds: float) -> tuple[int, int, float]:
    """(requests done, connections, seconds) of one h2load run."""
    # h2load 1.52 writes an IPv6 literal in Host without brackets (nginx answers 400)
    cmd = ["taskset", "-c", CLIENT_CPU, "h2load", "-H", ":authority: www.example.com", *args]
    if seconds:
        cmd += ["-D", str(max(1, round(seconds)))]
    out = subprocess.run(
        [*cmd, f"https://[::1]:{port}/"], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"finished in ([\d.]+)(ms|s),", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    clients = re.search(r"clients: (\d+) total", out) or re.search(r"-c(\d+)", " ".join(args))
    assert m is not None and done is not None, out
    if int(done.group(2)) != int(done.group(1)):
        codes = re.search(r"status codes: .*", out)
        print(
            f"  h2load on port {port}: {done.group(0)}; {codes and codes.group(0)}", file=sys.stderr
        )
    took = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    conns = int(args[args.index("-c") + 1]) if clients is None else int(clients.group(1))
    return int(done.group(2)), conns, took


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--cases", default=",".join(CASES), help="a comma-separated subset")
    ap.add_argument("--baseline", metavar="SRC", help="another builtin's src directory")
    ap.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.cases = [c.strip() for c in args.cases.split(",")]
    for case in args.cases:
        if case not in CASES:
            sys.exit(f"unknown case {case!r}: give some of {', '.join(CASES)}")
    if args.serve:
        serve_builtin(Path(args.serve[0]), int(args.serve[1]), int(args.serve[2]))
        return
    for tool in ("nginx", "h2load", "haproxy", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install -y nginx-light nghttp2-client haproxy")
    import trustme

    from v6lb.engines.proxy.haproxy_run import tls_texts
    from v6lb.model.config import Config
    from v6lb.render.haproxy import render_haproxy

    d = Path(tempfile.mkdtemp(prefix="v6lb-bench-h2-"))
    ca = trustme.CA()
    cert = ca.issue_cert("www.example.com")
    cert.cert_chain_pems[0].write_to_path(str(d / "www.crt"))
    cert.private_key_pem.write_to_path(str(d / "www.key"))
    plain, port_b, port_h = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    # (engine, case) -> runs of (requests/s, handshakes/s, CPU µs/request, load average)
    results: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    try:
        conf = d / "nginx.conf"
        conf.write_text(NGINX.format(d=d, plain=plain, pp=free_port()))
        procs.append(subprocess.Popen(["taskset", "-c", NGINX_CPU, "nginx", "-c", str(conf)]))
        serve = ["taskset", "-c", PROXY_CPU, sys.executable, __file__, "--serve", str(d)]
        builtin = subprocess.Popen([*serve, str(plain), str(port_b)])
        procs.append(builtin)
        if args.baseline:
            port_o = free_port()
            env = dict(os.environ, PYTHONPATH=os.path.abspath(args.baseline))
            base = subprocess.Popen([*serve, str(plain), str(port_o)], env=env)
            procs.append(base)
        hv = tls_vip(d, plain, port_h)
        (d / "tls").mkdir()
        config = Config(vips=(hv,), source="bench_h2")
        for path, data in tls_texts(config, str(d / "tls")).items():
            Path(path).write_bytes(data)
        cfg = d / "haproxy.cfg"
        cfg.write_text(render_haproxy([hv], maxconn=4096, nbthread=1, tls_dir=str(d / "tls")))
        hap = subprocess.Popen(
            ["taskset", "-c", PROXY_CPU, "haproxy", "-db", "-f", str(cfg)],
            stdout=subprocess.DEVNULL,
        )
        procs.append(hap)
        engines = {"builtin": (port_b, builtin.pid), "haproxy": (port_h, hap.pid)}
        if args.baseline:
            engines["baseline"] = (port_o, base.pid)
        for port, _ in engines.values():
            wait_port(port)
            h2load(port, ["-c", "10", "-n", "1000"], 0)  # warm up
        for r in range(args.rounds):
            for case in args.cases:
                h2args, timed = CASES[case]
                for engine, (port, pid) in engines.items():
                    load = os.getloadavg()[0]
                    before = cpu_seconds(pid)
                    done = conns = 0
                    took = 0.0
                    for _ in range(1 if timed else args.batches):
                        n, c, t = h2load(port, h2args, args.seconds if timed else 0)
                        done, conns, took = done + n, conns + c, took + t
                    used = cpu_seconds(pid) - before
                    results.setdefault((engine, case), []).append(
                        (done / took, conns / took, 1e6 * used / max(1, done), load)
                    )
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        stop_all(procs, d)
    report(results, args)


def library_floor(n: int = 5000) -> float:
    """µs per request that the ``h2`` library alone spends on the server side.

    In memory, no socket, no TLS, no backend: a client ``H2Connection`` makes a GET
    (HEADERS with END_STREAM, the 5 fields h2load sends) and the server connection,
    configured as the builtin's (inbound validation on, outbound off), receives it,
    sends a 200 with a 2-byte body and serializes its frames. Only the server's
    calls are timed: the least any proxy built on this library spends per HTTP/2
    request, before its own work (TLS, the backend, the rewriting).
    """
    import time

    import h2.config
    import h2.connection

    def conn(client: bool) -> h2.connection.H2Connection:
        return h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=client,
                header_encoding=None,
                validate_outbound_headers=client,
                normalize_outbound_headers=client,
            )
        )

    cc, sc = conn(True), conn(False)
    cc.initiate_connection()
    sc.initiate_connection()
    sc.receive_data(cc.data_to_send())
    cc.receive_data(sc.data_to_send())
    sc.receive_data(cc.data_to_send())
    req = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"),
           (b":authority", b"www.example.com"), (b"user-agent", b"h2load")]  # fmt: skip
    resp = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"2")]
    spent = 0.0
    for _ in range(n):
        sid = cc.get_next_available_stream_id()
        cc.send_headers(sid, req, end_stream=True)
        frames = cc.data_to_send()
        t0 = time.perf_counter()
        sc.receive_data(frames)
        sc.send_headers(sid, resp)
        sc.send_data(sid, b"ok", end_stream=True)
        out = sc.data_to_send()
        spent += time.perf_counter() - t0
        cc.receive_data(out)
    return 1e6 * spent / n


def report(
    results: dict[tuple[str, str], list[tuple[float, float, float, float]]],
    args: argparse.Namespace,
) -> None:
    print(
        f"h2load over TLS 1.3 on [::1], {args.rounds} interleaved rounds, keep-alive runs"
        f" {args.seconds:g} s, new-connection runs {args.batches} × 200 connections; proxy and"
        f" nginx on CPU {PROXY_CPU}, h2load on CPU {CLIENT_CPU}; cpus={os.cpu_count()}"
    )
    if args.baseline:
        print(f"baseline: the builtin of {args.baseline}")
    print(
        "| case | engine | req/s median | handshakes/s | proxy CPU µs/req"
        " | ÷ HAProxy req/s | load avg (1 min) |"
    )
    print("|---|---|---|---|---|---|---|")
    engines = ["builtin", "haproxy"] + (["baseline"] if args.baseline else [])
    for case in args.cases:
        med = {}
        for engine in engines:
            runs = results[(engine, case)]
            med[engine] = statistics.median(x[0] for x in runs)
        for engine in engines:
            runs = results[(engine, case)]
            hs = statistics.median(x[1] for x in runs)
            cpu = statistics.median(x[2] for x in runs)
            loads = "–".join(f"{x[3]:.1f}" for x in (min(runs, key=lambda x: x[3]),
                                                     max(runs, key=lambda x: x[3])))  # fmt: skip
            ratio = f"{med[engine] / med['haproxy']:.2f}×" if engine != "haproxy" else ""
            print(
                f"| {case} | {engine} | {med[engine]:,.0f} | {hs:,.0f} | {cpu:.1f} | {ratio}"
                f" | {loads} |"
            )
    goal = {c: 0.9 for c in ("h2 keep-alive", "http/1.1 keep-alive") if c in args.cases}
    for case, want in goal.items():
        b = statistics.median(x[0] for x in results[("builtin", case)])
        h = statistics.median(x[0] for x in results[("haproxy", case)])
        verdict = "met" if b / h >= want else "not met"
        print(f"{case}: builtin/HAProxy {b / h:.2f}× (goal ≥ {want}×: {verdict})")
    floors = sorted(library_floor() for _ in range(3))
    print(
        f"h2 library alone, server side, per request: {floors[1]:.1f} µs"
        f" (min {floors[0]:.1f}; load {os.getloadavg()[0]:.2f})"
    )


if __name__ == "__main__":
    main()
