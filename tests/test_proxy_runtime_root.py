"""`v6lb run --proxy builtin` at run time, for real in a namespace: `v6lb ctl` on proxy VIPs,
a SIGHUP reload that keeps open connections and listening sockets, and a graceful stop.

The backends are in this process (threads whose sockets were made in the namespace): an
HTTP/1.1 keep-alive server that answers with the address it was reached on (``?delay=S``
answers late) and a TCP line echo that prefixes the same. Clients are sockets made in
the namespace the same way; `v6lb ctl` is the real command line on the control socket.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from netns_helpers import batch, namespaces, nsx, wait_for
from v6lb.cli import main
from v6lb.engines.control import ControlError, query
from v6lb.engines.kernel.host import enter_netns

pytestmark = [pytest.mark.root]

T = TypeVar("T")
V7 = "2001:db8:78::80"  # proxy-l7 "web"
V4 = "2001:db8:78::81"  # proxy-l4 "tcp"
VNEW = "2001:db8:78::82"  # a VIP a reload adds
VCLASH = "2001:db8:78::83"  # a VIP whose port another process holds
B1, B2, B3 = "2001:db8:78::1", "2001:db8:78::2", "2001:db8:78::3"
ADDRESSES = (V7, V4, VNEW, VCLASH, B1, B2, B3)


def in_ns(ns: str, fn: Callable[[], T]) -> T:
    """``fn()`` on a thread inside ``ns`` (setns is per thread): sockets it makes stay there."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            enter_netns(ns)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


DELAYED = threading.Event()  # a request with ?delay= has reached its backend


class _Http(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        delay = float(query.get("delay", ["0"])[0])
        if delay:
            DELAYED.set()
        time.sleep(delay)
        status = int(query.get("status", ["200"])[0])
        body = f"{self.connection.getsockname()[0]}\n".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _HttpServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:  # no getfqdn()
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "t", self.server_address[1]


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        local = self.connection.getsockname()[0]
        for line in self.rfile:
            self.wfile.write(f"{local} {line.decode().strip()}\n".encode())


class _EchoServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True


def get(sock: socket.socket, path: str = "/") -> tuple[int, str]:
    """One request on an open connection: (status, the backend address that answered)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    r = http.client.HTTPResponse(sock)
    r.begin()
    return r.status, r.read().decode().strip()


def echo(f: Any, sock: socket.socket, line: str) -> str:
    """A line through a proxy-l4 connection: the backend address that echoed it."""
    sock.sendall(f"{line}\n".encode())
    got: str = f.readline().decode()
    assert got.endswith(f" {line}\n"), got
    return got.split()[0]


def vip(name: str, address: str, port: int, mode: str, backends: str, sched: str = "") -> str:
    return (
        f'  - {{name: {name}, address: "{address}", ports: [{port}], mode: {mode},'
        f" scheduler: {sched or 'round-robin'}, health: {{type: none}}, backends: [{backends}]}}\n"
    )


def be(address: str, port: int, extra: str = "") -> str:
    return f'{{address: "{address}", port: {port}{extra}}}'


class Lab:
    def __init__(self, ns: str, tmp: Path) -> None:
        self.ns, self.tmp = ns, tmp
        self.sock = str(tmp / "ctl.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "run.log"

    def connect(self, address: str, port: int) -> socket.socket:
        return in_ns(self.ns, lambda: socket.create_connection((address, port), timeout=5))

    def new_get(self, address: str, port: int, path: str = "/") -> tuple[int, str]:
        with self.connect(address, port) as s:
            return get(s, path)

    def write(self, vips: str) -> Path:
        cfg = self.tmp / "lb.yaml"
        cfg.write_text(f"lb: {{instance: pxr, control_socket: {self.sock}}}\nvips:\n{vips}")
        return cfg

    def start(self, vips: str, drain_timeout: float = 5) -> None:
        cfg = self.write(vips)
        argv = [sys.executable, "-m", "v6lb.cli", "run", str(cfg), "--netns", self.ns]
        argv += ["--proxy", "builtin", "--drain-timeout", str(drain_timeout)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for("the proxy engine", self.running, 15, (ControlError, OSError, KeyError))

    def running(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
        return bool(query(self.sock, "status")["proxy"]["state"] == "running")

    def status(self) -> dict[str, Any]:
        return {v["name"]: v for v in query(self.sock, "status")["proxy"]["vips"]}

    def ctl(self, *args: str) -> int:
        return main(["ctl", *args, "--control-socket", self.sock])

    def listener_inode(self, port: int) -> str:
        out = nsx(self.ns, "ss", "-Hltne", f"sport = :{port}")
        found = re.search(r"ino:(\d+)", out)
        assert found, out
        return found.group(1)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    assert os.geteuid() == 0, "needs root (CI runs as root)"
    with namespaces("lb", tag="pxr") as names:
        ns = names["lb"]
        batch(ns, *(f"address add {a}/128 dev lo nodad" for a in ADDRESSES))
        servers: list[socketserver.BaseServer] = [
            in_ns(ns, lambda: _HttpServer(("::", 9000), _Http)),
            in_ns(ns, lambda: _EchoServer(("::", 7000), _Echo)),
        ]
        for s in servers:
            threading.Thread(target=s.serve_forever, daemon=True).start()
        lab = Lab(ns, tmp_path)
        try:
            yield lab
        finally:
            if lab.proc is not None and lab.proc.poll() is None:
                lab.proc.kill()
                lab.proc.wait(10)
            for s in servers:
                s.shutdown()
                s.server_close()


def test_ctl_and_reload_keep_open_connections(lab: Lab) -> None:
    lab.start(
        vip("web", V7, 8080, "proxy-l7", f"{be(B1, 9000)}, {be(B2, 9000)}")
        + vip("tcp", V4, 8081, "proxy-l4", f"{be(B1, 7000)}, {be(B2, 7000)}")
    )
    keep = lab.connect(V7, 8080)  # one keep-alive client connection through all of it
    assert {get(keep)[1] for _ in range(2)} == {B1, B2}  # round robin, one connection
    c4 = lab.connect(V4, 8081)
    f4 = c4.makefile("rb")
    pinned = echo(f4, c4, "a")
    other = B2 if pinned == B1 else B1

    # drain: no new connection reaches the backend; the open ones go on
    assert lab.ctl("drain", "web", f"[{B1}]:9000") == 0
    assert lab.ctl("drain", "tcp", f"[{pinned}]:7000") == 0
    assert {get(keep)[1] for _ in range(4)} == {B2}
    assert {lab.new_get(V7, 8080)[1] for _ in range(4)} == {B2}
    assert echo(f4, c4, "b") == pinned  # the open l4 connection keeps its drained backend
    for _ in range(4):
        with lab.connect(V4, 8081) as s:
            assert echo(s.makefile("rb"), s, "n") == other
    st = lab.status()
    web = {b["address"]: b for b in st["web"]["backends"]}
    assert web[B1]["drain"] is True and web[B1]["enabled"] is True
    assert st["web"]["responses"]["2xx"] == 10 and st["web"]["latency"]["count"] == 10
    assert st["web"]["latency"]["buckets"][-1] == ["+Inf", 10]
    assert web[B2]["responses"]["2xx"] == 9

    # weight: undrain B1, B2 weight 3: B2 answers 3 of every 4
    assert lab.ctl("undrain", "web", f"[{B1}]:9000") == 0
    assert lab.ctl("weight", "web", f"[{B2}]:9000", "3") == 0
    seen = [lab.new_get(V7, 8080)[1] for _ in range(8)]
    assert seen.count(B2) == 6 and seen.count(B1) == 2, seen
    assert lab.new_get(V7, 8080, "/?status=404")[0] == 404
    assert lab.status()["web"]["responses"]["4xx"] == 1

    # what is not there: exit 2
    assert lab.ctl("drain", "nosuch", B1) == 2
    assert lab.ctl("drain", "web", "2001:db8:78::9") == 2

    # disable: the backend's open connections end too
    assert lab.ctl("disable", "tcp", f"[{pinned}]:7000") == 0
    c4.settimeout(5)
    try:
        assert c4.recv(100) == b""
    except ConnectionResetError:
        pass
    f4.close()
    c4.close()
    assert lab.ctl("enable", "tcp", f"[{pinned}]:7000") == 0
    assert lab.ctl("undrain", "tcp", f"[{pinned}]:7000") == 0

    # reload: B3 added to both, B2's weight changed, a new VIP; the open ones survive
    c4 = lab.connect(V4, 8081)
    f4 = c4.makefile("rb")
    pinned = echo(f4, c4, "c")
    inode = lab.listener_inode(8080)
    lab.write(
        vip("web", V7, 8080, "proxy-l7", f"{be(B1, 9000)}, {be(B2, 9000)}, {be(B3, 9000)}")
        + vip("tcp", V4, 8081, "proxy-l4", f"{be(B1, 7000)}, {be(B2, 7000, ', weight: 2')},"
              f" {be(B3, 7000)}")
        + vip("new", VNEW, 8082, "proxy-l7", be(B3, 9000))
    )  # fmt: skip
    assert lab.proc is not None
    lab.proc.send_signal(signal.SIGHUP)
    wait_for("the reload", lambda: "new" in lab.status(), 10, (ControlError,))
    assert get(keep)[0] == 200  # the keep-alive connection goes on (on the new config)
    assert echo(f4, c4, "d") == pinned  # the l4 connection keeps its backend
    assert lab.new_get(VNEW, 8082) == (200, B3)
    assert B3 in {lab.new_get(V7, 8080)[1] for _ in range(8)}
    assert lab.listener_inode(8080) == inode  # the same listening socket
    # the ctl override (B2 weight 3 on web) survives the reload
    web = {b["address"]: b for b in lab.status()["web"]["backends"]}
    assert web[B2]["weight"] == 3

    # a reload whose new port another process holds fails; the old config serves on
    holder = in_ns(lab.ns, lambda: socket.create_server((VCLASH, 8083), family=socket.AF_INET6))
    try:
        lab.write(
            vip("web", V7, 8080, "proxy-l7", be(B1, 9000))
            + vip("clash", VCLASH, 8083, "proxy-l7", be(B1, 9000))
        )
        lab.proc.send_signal(signal.SIGHUP)
        wait_for("the failed reload", lambda: "reload failed" in lab.log.read_text(), 10, ())
        assert "clash" not in lab.status() and "new" in lab.status()
        assert lab.new_get(VNEW, 8082) == (200, B3)
        assert get(keep)[0] == 200
        assert B3 in {lab.new_get(V7, 8080)[1] for _ in range(4)}  # still the 3 backends
    finally:
        holder.close()
    keep.close()
    f4.close()
    c4.close()
    began = time.monotonic()
    assert lab.stop() == 0
    assert time.monotonic() - began < 2.5  # nothing left in flight: no wait for the timeout
    assert "cannot listen" in lab.log.read_text()


def test_graceful_stop_finishes_in_flight_then_cuts_at_the_timeout(lab: Lab) -> None:
    vips = vip("web", V7, 8080, "proxy-l7", be(B1, 9000)) + vip(
        "tcp", V4, 8081, "proxy-l4", be(B1, 7000)
    )
    lab.start(vips, drain_timeout=5)
    idle = lab.connect(V7, 8080)
    assert get(idle) == (200, B1)
    slow: dict[str, Any] = {}

    def slow_request() -> None:
        try:
            slow["answer"] = lab.new_get(V7, 8080, "/?delay=1.5")
        except Exception as exc:
            slow["answer"] = exc

    DELAYED.clear()
    t = threading.Thread(target=slow_request)
    t.start()
    assert DELAYED.wait(10), slow  # the request is at the backend
    assert lab.proc is not None
    lab.proc.send_signal(signal.SIGTERM)
    began = time.monotonic()
    idle.settimeout(5)
    assert idle.recv(100) == b""  # an idle keep-alive connection is closed at once
    assert time.monotonic() - began < 1.0
    with pytest.raises(ConnectionRefusedError):
        lab.connect(V7, 8080).close()  # the listener is closed
    t.join(10)
    assert slow["answer"] == (200, B1)
    assert lab.proc.wait(10) == 0
    took = time.monotonic() - began
    assert 1.0 < took < 3.5, took  # after the last response, well before --drain-timeout 5
    assert "drained in" in lab.log.read_text()

    # a connection that never ends is cut at the timeout
    lab.start(vips, drain_timeout=1.5)
    c4 = lab.connect(V4, 8081)
    f4 = c4.makefile("rb")
    assert echo(f4, c4, "x") == B1
    lab.proc.send_signal(signal.SIGTERM)
    began = time.monotonic()
    c4.settimeout(10)
    try:
        assert c4.recv(100) == b""
    except ConnectionResetError:
        pass
    assert lab.proc.wait(10) == 0
    assert 1.3 < time.monotonic() - began < 4.0
    assert "--drain-timeout 1.5s reached with builtin 1 still in flight" in lab.log.read_text()
