"""The lab's HTTP backend: answers every request with JSON about what it saw.

``python -m v6lb.lab.httpd --node NAME --address ADDR --port 80 [--port ...] [--ready FILE]``

Each answer is ``{"node", "server", "local", "peer", "method", "path", "headers",
"body_len"}``, plus ``"pad"`` when the query asks for ``bytes=N``: then the answer
is padded to at least N bytes (up to 16 MB), a large response for PMTU tests; with
``delay=S`` it answers after S seconds (up to 60; a slow backend); ``keepalive=1`` keeps
the connection open for the next request (else it is closed). ``server`` is the backend
address the lab gave it, ``local`` the address and port the connection reached (the VIP
for DSR, the backend address after NAT), ``peer`` the TCP peer it saw (the client, or
its mapped address). It listens on ``[::]`` for every ``--port``, so VIPs on ``lo`` are
served too.
"""

from __future__ import annotations

import argparse
import json
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

__all__ = ["main"]


class _Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:  # no getfqdn(): there is no DNS in a lab namespace
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        socketserver.TCPServer.server_bind(self)
        self.server_name = "lab"
        self.server_port = self.server_address[1]


_MAX_BYTES = 16 << 20


def _delay(path: str) -> float:
    """``delay=S`` from the query: seconds to wait before answering (0 if absent or bad)."""
    for value in urllib.parse.parse_qs(urllib.parse.urlsplit(path).query).get("delay", []):
        try:
            seconds = float(value)
        except ValueError:
            continue
        if 0 < seconds <= 60:  # also false for nan
            return seconds
    return 0.0


def _wanted_bytes(path: str) -> int:
    """``bytes=N`` from the query (0 if absent or not a number), at most 16 MB."""
    for value in urllib.parse.parse_qs(urllib.parse.urlsplit(path).query).get("bytes", []):
        if value.isdigit():
            return min(int(value), _MAX_BYTES)
    return 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    node: ClassVar[str] = ""
    address: ClassVar[str] = ""

    def _body_len(self) -> int:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return total
                total += len(self.rfile.read(size))
                self.rfile.readline()
        left = int(self.headers.get("Content-Length") or 0)
        total = 0
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            total += len(chunk)
            left -= len(chunk)
        return total

    def _answer(self) -> None:
        body_len = self._body_len()
        if delay := _delay(self.path):
            time.sleep(delay)
        local = self.connection.getsockname()
        answer = {
            "node": self.node,
            "server": self.address,
            "local": [local[0], local[1]],
            "peer": [self.client_address[0], self.client_address[1]],
            "method": self.command,
            "path": self.path,
            "headers": dict(self.headers.items()),
            "body_len": body_len,
        }
        data = (json.dumps(answer) + "\n").encode()
        want = _wanted_bytes(self.path)
        if want > len(data):
            answer["pad"] = "x" * (want - len(data) - len(', "pad": ""'))
            data = (json.dumps(answer) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        keep = "keepalive=1" in urllib.parse.urlsplit(self.path).query.split("&")
        if not keep:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.close_connection = not keep

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        sys.stderr.write(f"httpd [{self.node}] {self.client_address[0]} {format % args}\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v6lb.lab.httpd")
    p.add_argument("--node", required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--port", type=int, action="append", required=True)
    p.add_argument("--ready", help="file to create once every port listens")
    args = p.parse_args(argv)
    _Handler.node = args.node
    _Handler.address = args.address
    servers = [_Server(("::", port), _Handler) for port in sorted(set(args.port))]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    if args.ready:
        Path(args.ready).write_text("ready\n")
    sys.stderr.write(f"httpd [{args.node}] listening on ports {sorted(set(args.port))}\n")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
