"""`v6lb run --proxy haproxy` for real: seamless reload, `v6lb ctl`, graceful stop.

Root: one namespace with the VIPs and the backends (the lab's httpd, one per port)
on its ``lo``; the client's sockets are made by a thread that entered the namespace
(``setns`` is per thread), so the test holds connections open across a SIGHUP or a
``ctl`` and reads them afterwards. `v6lb ctl` and `v6lb status` run as the real CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from netns_helpers import namespaces, nsx, wait_for
from v6lb.engines.control import ControlError, query
from v6lb.engines.kernel.host import enter_netns

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed"),
]

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
WEB, TCP, NEW = "2001:db8:e7::80", "2001:db8:e7::81", "2001:db8:e7::82"
A, B, C = "2001:db8:e7::a", "2001:db8:e7::b", "2001:db8:e7::c"
PORTS = {A: 9001, B: 9002, C: 9003}
NODES = {A: "a", B: "b", C: "c"}


def _backend(address: str) -> dict[str, Any]:
    return {"address": address, "port": PORTS[address]}


def _vip(name: str, address: str, mode: str, backends: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "address": address,
        "ports": [80],
        "mode": mode,
        "scheduler": "round-robin",
        "health": {"type": "none"},
        "backends": [_backend(b) for b in backends],
    }


@contextlib.contextmanager
def _lab(tmp_path: Path, tag: str) -> Iterator[tuple[str, ThreadPoolExecutor, list[Any]]]:
    """The namespace (VIPs, backends on lo, one httpd per backend), a thread inside it."""
    procs: list[subprocess.Popen[bytes]] = []
    with namespaces("lb", tag=tag) as ns:
        lb = ns["lb"]
        for a in (WEB, TCP, NEW, A, B, C):
            nsx(lb, "ip", "-6", "address", "add", f"{a}/128", "dev", "lo", "nodad")
        inside = ThreadPoolExecutor(1, initializer=enter_netns, initargs=(lb,))
        try:
            for a, port in PORTS.items():
                ready = tmp_path / f"httpd-{port}"
                procs.append(
                    subprocess.Popen(
                        [
                            "ip",
                            "netns",
                            "exec",
                            lb,
                            sys.executable,
                            "-m",
                            "v6lb.lab.httpd",
                            "--node",
                            NODES[a],
                            "--address",
                            a,
                            "--port",
                            str(port),
                            "--ready",
                            str(ready),
                        ],
                        env=ENV,
                        stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                )
                wait_for("httpd", ready.exists, 10, ())
            yield lb, inside, procs
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(5)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
            inside.shutdown()


def _connect(inside: ThreadPoolExecutor, address: str) -> socket.socket:
    def make() -> socket.socket:
        s = socket.create_connection((address, 80), timeout=10)
        s.settimeout(10)
        return s

    return inside.submit(make).result()


def _request(s: socket.socket, path: str = "/") -> bytes:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: v6lb\r\n\r\n".encode())
    return path.encode()


def _response(s: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One HTTP/1.1 response with a Content-Length: (status, headers, JSON body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the body")
        body += chunk
    return int(lines[0].split()[1]), headers, json.loads(body)


def _get(inside: ThreadPoolExecutor, address: str, path: str = "/") -> str:
    """A request on a new connection; the node that answered."""
    with _connect(inside, address) as s:
        _request(s, path)
        status, _, answer = _response(s)
    assert status == 200
    return str(answer["node"])


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "v6lb.cli", *argv],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def _status(sock: str) -> dict[str, Any]:
    r = _cli("status", "--json", "--control-socket", sock)
    assert r.returncode == 0, r.stderr
    st: dict[str, Any] = json.loads(r.stdout)
    return st


def _proxy_vip(st: dict[str, Any], name: str) -> dict[str, Any]:
    (vip,) = [v for v in st["proxy"]["vips"] if v["name"] == name]
    return vip


def _busy_backend(sock: str) -> dict[str, Any]:
    """The backend of VIP tcp serving its one open connection (the others have ended)."""

    def one() -> dict[str, Any] | None:
        vip = _proxy_vip(_status(sock), "tcp")
        busy = [b for b in vip["backends"] if b["active"]]
        return busy[0] if vip["active"] == 1 and len(busy) == 1 else None

    found: dict[str, Any] = wait_for("one open connection at a backend", one, 5, ())
    return found


def _run(cfg: Path, lb: str, sock: str, *extra: str) -> subprocess.Popen[str]:
    run = subprocess.Popen(
        [sys.executable, "-m", "v6lb.cli", "run", str(cfg), "--netns", lb,
         "--proxy", "haproxy", *extra],
        env=ENV, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(
            "haproxy to serve",
            lambda: query(sock)["proxy"]["state"] == "running",
            15,
            (ControlError, OSError, KeyError),
        )
    except AssertionError:
        run.kill()
        raise AssertionError(run.communicate()[1]) from None
    return run


def _stop(run: subprocess.Popen[str]) -> str:
    if run.poll() is None:
        run.send_signal(signal.SIGTERM)
    try:
        return run.communicate(timeout=15)[1]
    except subprocess.TimeoutExpired:
        run.kill()
        return run.communicate()[1]


def test_reload_is_seamless_and_ctl_drives_haproxy(tmp_path: Path) -> None:
    sock = f"/tmp/v6lb-hr-{os.getpid()}.sock"
    cfg = tmp_path / "lb.yaml"
    data: dict[str, Any] = {
        "lb": {"instance": f"hr{os.getpid() % 1000}", "control_socket": sock},
        "vips": [_vip("web", WEB, "proxy-l7", [A, B]), _vip("tcp", TCP, "proxy-l4", [A, B])],
    }
    cfg.write_text(yaml.safe_dump(data))
    with _lab(tmp_path, "hr") as (lb, inside, _):
        run = _run(cfg, lb, sock)
        try:
            # --- SIGHUP: a backend and a VIP added; open connections go on -----------
            master = _status(sock)["proxy"]["haproxy_pid"]
            keep = _connect(inside, WEB)  # an HTTP keep-alive connection, idle at the reload
            _request(keep)
            assert _response(keep)[0] == 200
            l4 = _connect(inside, TCP)  # a proxy-l4 connection with a request in flight
            _request(l4, "/?delay=1.5")
            data["vips"][0]["backends"].append(_backend(C))
            data["vips"].append(_vip("new", NEW, "proxy-l7", [A]))
            cfg.write_text(yaml.safe_dump(data))
            t0 = time.monotonic()
            run.send_signal(signal.SIGHUP)
            wait_for("the reload", lambda: query(sock)["reloads"] == 1, 10, (ControlError,))
            assert time.monotonic() - t0 < 1.5  # the reload did not wait for the request
            _request(keep)
            status, headers, _ = _response(keep)  # served by the old worker, which then closes
            assert status == 200 and headers.get("connection") == "close"
            status, _, answer = _response(l4)
            assert status == 200 and answer["path"] == "/?delay=1.5"
            assert _get(inside, NEW) == "a"  # the new VIP
            assert {_get(inside, WEB) for _ in range(6)} == {"a", "b", "c"}  # the new backend
            st = _status(sock)
            assert st["proxy"]["haproxy_pid"] == master  # the master stays; a new worker
            assert [b["port"] for b in _proxy_vip(st, "web")["backends"]] == [9001, 9002, 9003]
            web = _proxy_vip(st, "web")
            # the new worker's counters (they start again at a reload)
            assert web["responses"] == {
                "1xx": 0,
                "2xx": 6,
                "3xx": 0,
                "4xx": 0,
                "5xx": 0,
                "other": 0,
            }

            # --- a config haproxy refuses (a port it cannot bind): the old one runs on --
            bad = json.loads(json.dumps(data))
            bad["vips"].append({**_vip("bad", NEW, "proxy-l7", [A]), "ports": [9001]})
            cfg.write_text(yaml.safe_dump(bad))
            run.send_signal(signal.SIGHUP)
            wait_for("the failed reload", lambda: query(sock)["last_error"], 15, (ControlError,))
            st = _status(sock)
            assert st["reloads"] == 1 and "reload failed" in st["last_error"]
            assert "cannot bind socket (Address already in use)" in st["last_error"]
            assert _get(inside, NEW) == "a"
            assert [v["name"] for v in st["proxy"]["vips"]] == ["web", "tcp", "new"]
            cfg.write_text(yaml.safe_dump(data))

            # --- v6lb ctl: drain keeps the open connection, takes no new ones ---------
            slow = _connect(inside, TCP)
            _request(slow, "/?delay=1.5")
            drained = _busy_backend(sock)
            target = f"[{drained['address']}]:{drained['port']}"
            r = _cli("ctl", "drain", "tcp", target, "--control-socket", sock)
            assert r.returncode == 0, r.stderr
            others = {_get(inside, TCP) for _ in range(6)}
            assert NODES[drained["address"]] not in others and others
            status, _, answer = _response(slow)  # the open one finished at the drained one
            assert status == 200 and answer["node"] == NODES[drained["address"]]
            keep = _connect(inside, WEB)  # proxy-l7: a keep-alive connection's new requests
            r = _cli("ctl", "drain", "web", f"[{A}]:9001", "--control-socket", sock)
            assert r.returncode == 0, r.stderr
            for _ in range(4):
                _request(keep)
                status, headers, answer = _response(keep)
                assert status == 200 and answer["node"] != "a"
            assert headers.get("connection") != "close"
            keep.close()
            st = _status(sock)
            (b,) = [
                b for b in _proxy_vip(st, "tcp")["backends"] if b["address"] == drained["address"]
            ]
            assert b["drain"] is True and b["enabled"] is True
            assert b["haproxy_status"].startswith("DRAIN")

            # --- weight: 3 to 1 ----------------------------------------------------------
            assert _cli("ctl", "undrain", "tcp", target, "--control-socket", sock).returncode == 0
            r = _cli("ctl", "weight", "tcp", f"[{A}]:9001", "3", "--control-socket", sock)
            assert r.returncode == 0, r.stderr
            counts = Counter(_get(inside, TCP) for _ in range(8))
            assert counts["a"] >= 5 and counts["b"] >= 1, counts
            st = _status(sock)
            assert [b["weight"] for b in _proxy_vip(st, "tcp")["backends"]] == [3, 1]
            assert [b["haproxy_weight"] for b in _proxy_vip(st, "tcp")["backends"]] == [3, 1]

            # --- disable: the open connection closes, no new ones -------------------
            slow = _connect(inside, TCP)
            _request(slow, "/?delay=3")
            busy_b = _busy_backend(sock)
            target = f"[{busy_b['address']}]:{busy_b['port']}"
            t0 = time.monotonic()
            r = _cli("ctl", "disable", "tcp", target, "--control-socket", sock)
            assert r.returncode == 0, r.stderr
            with pytest.raises((ConnectionError, OSError)):
                _response(slow)
            assert time.monotonic() - t0 < 2.5  # cut, not answered after the delay
            assert NODES[busy_b["address"]] not in {_get(inside, TCP) for _ in range(4)}
            (b,) = [
                b
                for b in _proxy_vip(_status(sock), "tcp")["backends"]
                if b["port"] == busy_b["port"]
            ]
            assert b["enabled"] is False and b["haproxy_status"].startswith("MAINT")
        finally:
            err = _stop(run)
        assert run.returncode == 0, err
        assert "haproxy reloaded: 3 proxy VIP(s)" in err
        assert "ctl drain tcp" in err and "haproxy: b" in err


def test_graceful_stop_lets_the_request_in_flight_finish(tmp_path: Path) -> None:
    sock = f"/tmp/v6lb-hg-{os.getpid()}.sock"
    cfg = tmp_path / "lb.yaml"
    data = {
        "lb": {"instance": f"hg{os.getpid() % 1000}", "control_socket": sock},
        "vips": [_vip("web", WEB, "proxy-l7", [A])],
    }
    cfg.write_text(yaml.safe_dump(data))
    with _lab(tmp_path, "hg") as (lb, inside, _):
        run = _run(cfg, lb, sock, "--drain-timeout", "5")
        try:
            s = _connect(inside, WEB)
            _request(s, "/?delay=1")
            wait_for(  # the request is at its backend
                "the request at its backend",
                lambda: any(b["active"] for b in _proxy_vip(_status(sock), "web")["backends"]),
                5,
                (),
            )
            t0 = time.monotonic()
            run.send_signal(signal.SIGTERM)

            def refused() -> bool:
                try:
                    _connect(inside, WEB).close()
                except ConnectionRefusedError:
                    return True
                return False

            wait_for("the soft stop to close the listener", refused, 5, (), 0.05)
            status, headers, answer = _response(s)
            assert status == 200 and answer["path"] == "/?delay=1"
            answered = time.monotonic() - t0
            assert run.wait(5) == 0
            assert time.monotonic() - t0 < answered + 1.5  # it did not wait for the timeout
        finally:
            err = _stop(run)
        assert "haproxy: soft stop" in err and "drained in" in err, err
