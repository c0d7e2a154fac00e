"""HTTP health probes (`engines/probe.py`, `engines/proxy/health.py`) against real sockets.

A listener on ``::1`` answers each probe as the case says: the expected status,
500, nothing (hangs), garbage, a 10 MB body, endless headers, a 1xx then 200.
The daemon's :class:`Prober` and the builtin proxy's ``http_probe`` must agree,
read at most :data:`HTTP_HEAD_MAX` bytes, and finish within the timeout.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv6Address
from pathlib import Path

import pytest
import yaml

from v6lb.cli import main
from v6lb.engines.probe import HTTP_HEAD_MAX, HttpAnswer, Prober, ProbeTarget, http_request
from v6lb.engines.proxy.health import http_probe
from v6lb.model.config import HealthCheck, HealthType, parse_config
from v6lb.render.haproxy import render_haproxy

BIG = 10 * 1024 * 1024
ANSWERS: dict[str, bytes | None] = {
    "ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "500": b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
    "garbage": b"\x00\x01garbage that is not HTTP\r\n\r\n",
    "closed": b"",
    "hang": None,
    "big-body": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * BIG,
    "endless-headers": b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"y" * BIG + b"\r\n\r\n",
    "interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
}


@contextmanager
def server(answer: bytes | None) -> Iterator[tuple[int, list[bytes], list[int]]]:
    """A listener on [::1]; yields (port, requests seen, bytes it managed to send)."""
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.bind(("::1", 0))
    ls.listen(8)
    requests: list[bytes] = []
    sent: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        ls.settimeout(0.1)
        while not stop.is_set():
            try:
                c, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            c.settimeout(2)
            try:
                requests.append(c.recv(4096))
                if answer is None:
                    stop.wait(3)
                elif answer:
                    n = 0
                    view = memoryview(answer)
                    while n < len(view):
                        n += c.send(view[n : n + 65536])
                    sent.append(n)
            except OSError:
                sent.append(-1)  # the probe closed: it stopped reading
            finally:
                c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield ls.getsockname()[1], requests, sent
    finally:
        stop.set()
        ls.close()
        t.join(5)


def probe(check: HealthCheck, port: int) -> tuple[bool, float]:
    """One daemon probe, run to its end or to the check's timeout (as the monitor does)."""
    sel = selectors.DefaultSelector()
    prober = Prober(sel)
    t0 = time.monotonic()
    result = prober.start("k", 1, ProbeTarget(IPv6Address("::1"), port, check))
    deadline = t0 + check.timeout
    while result is None and time.monotonic() < deadline:
        for key, _ in sel.select(deadline - time.monotonic()):
            done = prober.handle(key)
            if done is not None:
                result = done[2]
    prober.close()
    sel.close()
    return bool(result), time.monotonic() - t0


HTTP = HealthCheck(type=HealthType.HTTP, path="/healthz", timeout=0.5, interval=1.0)


@pytest.mark.parametrize(
    ("case", "ok"),
    [
        ("ok", True),
        ("204", True),
        ("500", False),
        ("garbage", False),
        ("closed", False),
        ("hang", False),
        ("big-body", True),
        ("endless-headers", False),
        ("interim", True),
    ],
)
def test_daemon_and_proxy_probes_agree_within_bounds(case: str, ok: bool) -> None:
    with server(ANSWERS[case]) as (port, requests, sent):
        got, took = probe(HTTP, port)
        assert got is ok, case
        assert took < HTTP.timeout + 0.2
        proxy = asyncio.run(http_probe("::1", port, HTTP))
        assert proxy is ok, case
    assert requests and requests[0].startswith(b"GET /healthz HTTP/1.1\r\n")
    if case in ("big-body", "endless-headers"):
        # the probes stopped reading: the server could not push 10 MB through
        assert all(n < len(ANSWERS[case] or b"") for n in sent), sent


def test_the_answer_reader_never_holds_more_than_its_limit() -> None:
    answer = HttpAnswer(HTTP, "GET")
    chunk = b"HTTP/1.1 200 OK\r\n" + b"X: " + b"z" * 4000
    verdict = answer.feed(chunk)
    while verdict is None:
        verdict = answer.feed(b"z" * 4096)
    assert verdict is False and answer._read <= HTTP_HEAD_MAX + 8192


def test_expected_statuses_method_and_host_are_sent_and_obeyed() -> None:
    check = HealthCheck(
        type=HealthType.HTTP,
        method="HEAD",
        path="/ready",
        host="api.example.com",
        expect=((500, 500),),
        timeout=0.5,
        interval=1.0,
    )
    with server(ANSWERS["500"]) as (port, requests, _):
        assert probe(check, port)[0] is True
    assert requests[0].startswith(b"HEAD /ready HTTP/1.1\r\n")
    assert b"host: api.example.com\r\n" in requests[0].lower()
    with server(ANSWERS["ok"]) as (port, _, _):
        assert probe(check, port)[0] is False
    req = http_request(HTTP, IPv6Address("2001:db8::1"), 8080)
    assert b"host: [2001:db8::1]:8080\r\n" in req.lower()


def _health(health: object) -> HealthCheck:
    vip = {"name": "w", "address": "2001:db8::80", "ports": [80], "mode": "nat"}
    data = {"vips": [vip | {"backends": [{"address": "2001:db8::1"}], "health": health}]}
    return parse_config(data, "t.yaml").vips[0].health


def test_config_http_settings_and_their_errors() -> None:
    h = _health({"type": "http", "path": "/h", "method": "HEAD", "host": "x.example"})
    assert (h.method, h.host, h.expect) == ("HEAD", "x.example", ((200, 399),))
    h = _health({"type": "http", "expect": [200, "300-302"]})
    assert h.expect == ((200, 200), (300, 302)) and h.passes(301) and not h.passes(303)
    assert _health({"type": "http", "expect": "200-299"}).expect == ((200, 299),)
    assert _health({"type": "http"}) == HealthCheck(type=HealthType.HTTP, path="/")
    for bad, words in [
        ({"type": "tcp", "expect": 200}, "applies to health type http only"),
        ({"type": "http", "expect": "299-200"}, "is empty"),
        ({"type": "http", "expect": "ok"}, "not an HTTP status"),
        ({"type": "http", "expect": []}, "empty list"),
        ({"type": "http", "method": "POST"}, "method"),
        ({"type": "http", "host": "a b"}, "not a Host header"),
    ]:
        with pytest.raises(Exception, match=words):
            _health(bad)


def test_haproxy_renders_the_http_settings() -> None:
    vip = {"name": "w", "address": "2001:db8::80", "ports": [80], "mode": "proxy-l7"}
    health = {"type": "http", "method": "HEAD", "path": "/r", "host": "h.example"}
    data = {"vips": [vip | {"backends": [{"address": "2001:db8::1", "port": 81}]}]}
    data["vips"][0]["health"] = health | {"expect": [200, "300-302"]}
    text = render_haproxy(parse_config(data, "t.yaml"))
    assert "    http-check send meth HEAD uri /r ver HTTP/1.1 hdr Host h.example\n" in text
    assert "    http-check expect status 200,300-302\n" in text


def test_check_has_no_health_warning_for_the_dsr_modes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # every DSR mode is probed through its data path on both planes (docs/dsr.md)
    vips = [
        {"name": n, "address": f"2001:db8::8{i}", "ports": [80], "mode": m, "backends": [b]}
        for i, (n, m, b) in enumerate(
            [
                ("l2", "dsr-l2", {"address": "2001:db8:1::1", "mac": "02:00:00:00:00:01"}),
                ("tun", "dsr-ip6ip6", {"address": "fd00:1::1"}),
                ("srv6", "dsr-srv6", {"address": "2001:db8:1::2"}),
            ]
        )
    ]
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump({"lb": {"addresses": ["2001:db8:a::1"]}, "vips": vips}))
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "vip l2: [2001:db8::80]:80/tcp mode dsr-l2" in out
    assert err == "", err
