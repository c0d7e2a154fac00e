"""The builtin's TLS layer alone: a trivial HTTP/1.1 responder in clear text, behind
:class:`~v6lb.engines.proxy.tls.TlsLayer`, and behind uvloop's own TLS
(``loop.create_server(ssl=...)``), side by side.

Method: three server processes on CPU 0 (uvloop), each answering every request head
with a fixed 2-byte ``200`` at once (no backend, no HTTP parsing beyond counting
``\\r\\n\\r\\n``); h2load (Debian ``nghttp2-client``) on CPU 1 drives each with
``--h1 -c 50`` for ``--seconds`` over TLS 1.3 (ECDSA P-256, trustme) or clear text,
interleaved, ``--rounds`` times. Printed per server: the median requests/s and CPU
time (user + system, from /proc) per request, and the 1-minute load average. The
difference to clear text is what TLS costs per request on each path.

    .venv/bin/python benchmarks/bench_tls_layer.py [--rounds 3] [--seconds 4]

Needs h2load and taskset (``apt-get install -y nghttp2-client``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench_proxy import cpu_seconds, free_port, stop_all, wait_port

KINDS = ("clear", "TlsLayer", "uvloop ssl")
RESPONSE = b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\n\r\nok"


class Responder(asyncio.Protocol):
    """Answers each request head (h2load sends no bodies, one request at a time)."""

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        for _ in range(data.count(b"\r\n\r\n")):
            self.t.write(RESPONSE)

    def eof_received(self) -> None:
        return None


def serve(kind: str, port: int, d: str) -> None:
    """The child process: one server until SIGTERM."""
    from v6lb.engines.proxy import install_uvloop
    from v6lb.engines.proxy.tls import TlsLayer, load_tls
    from v6lb.model.config import TlsCertificate, TlsOptions
    from v6lb.model.schema import Where

    install_uvloop()
    cert = TlsCertificate(f"{d}/www.crt", f"{d}/www.key")
    setup = load_tls(TlsOptions(certificates=(cert,), alpn=("http/1.1",)), Where("bench", "tls"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if kind == "TlsLayer":
            srv = await loop.create_server(
                lambda: TlsLayer(setup, Responder(), 10.0, lambda _: None), "::1", port
            )
        elif kind == "uvloop ssl":
            srv = await loop.create_server(Responder, "::1", port, ssl=setup.default)
        else:
            srv = await loop.create_server(Responder, "::1", port)
        while not stop.is_set():
            await asyncio.sleep(0.2)
        srv.close()

    asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.serve[2])
        return
    for tool in ("h2load", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install -y nghttp2-client")
    import trustme

    d = Path(tempfile.mkdtemp(prefix="v6lb-bench-tls-"))
    cert = trustme.CA().issue_cert("www.example.com")
    cert.cert_chain_pems[0].write_to_path(str(d / "www.crt"))
    cert.private_key_pem.write_to_path(str(d / "www.key"))
    procs: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in KINDS}
    try:
        for kind in KINDS:
            port = free_port()
            cmd = ["taskset", "-c", "0", sys.executable, __file__, "--serve", kind, str(port)]
            procs[kind] = (port, subprocess.Popen([*cmd, str(d)]))
        for port, _ in procs.values():
            wait_port(port)
        for _ in range(args.rounds):
            for kind, (port, p) in procs.items():
                url = f"{'http' if kind == 'clear' else 'https'}://[::1]:{port}/"
                load = os.getloadavg()[0]
                before = cpu_seconds(p.pid)
                out = subprocess.run(
                    ["taskset", "-c", "1", "h2load", "--h1", "-c", "50"]
                    + ["-D", str(args.seconds), url],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                done = re.search(r"(\d+) succeeded", out)
                took = re.search(r"finished in ([\d.]+)s", out)
                assert done is not None and took is not None, out
                n = int(done.group(1))
                used = cpu_seconds(p.pid) - before
                runs[kind].append((n / float(took.group(1)), 1e6 * used / max(1, n), load))
    finally:
        stop_all((p for _, p in procs.values()), d)
    print(f"h2load --h1 -c 50, {args.seconds} s, {args.rounds} interleaved rounds, medians")
    print("| server | req/s | CPU µs/req | TLS's µs/req | load avg (1 min) |")
    print("|---|---|---|---|---|")
    clear = statistics.median(x[1] for x in runs["clear"])
    for kind in KINDS:
        cpu = statistics.median(x[1] for x in runs[kind])
        rps = statistics.median(x[0] for x in runs[kind])
        loads = f"{min(x[2] for x in runs[kind]):.1f}–{max(x[2] for x in runs[kind]):.1f}"
        extra = f"{cpu - clear:.1f}" if kind != "clear" else ""
        print(f"| {kind} | {rps:,.0f} | {cpu:.2f} | {extra} | {loads} |")


if __name__ == "__main__":
    main()
