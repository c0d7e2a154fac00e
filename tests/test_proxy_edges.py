"""Issue 21 point 7: the builtin proxy's edge cases (PROXY headers from clients, HTTP/1.0, 0.9).

The 408 on the header timeout is in test_proxy_l7.py (the slowloris test).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from test_proxy_fixtures import (
    Backend_,
    HttpBackend,
    header,
    l4_vip,
    l7_vip,
    loop_kind,  # noqa: F401 (autouse: every test on asyncio and on uvloop)
    run,
)
from v6lb.core import proxyproto
from v6lb.engines.proxy import ProxyServer
from v6lb.engines.proxy.l4 import FIRST_BYTES_WAIT
from v6lb.engines.proxy.policy import client_proxy_header, error_response
from v6lb.model.config import Timeouts
from v6lb.render.haproxy import render_haproxy

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")


async def _with(vips: list[Any], body: Callable[[ProxyServer], Awaitable[T]], **kw: Any) -> T:
    async with ProxyServer(vips, **kw) as server:
        return await body(server)


class Recorder(Backend_):
    """Keeps what each connection sent (after the LB's PROXY v2 header); answers after EOF."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        super().__init__(self._serve)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()
        got = proxyproto.decode(data)
        self.received.append(data[got[1] :] if got else data)
        w.write(b"pong:" + str(len(data)).encode())
        await w.drain()


async def _send(port: int, *parts: bytes, gap: float = 0.0) -> bytes:
    r, w = await asyncio.open_connection("::1", port)
    try:
        for p in parts:
            w.write(p)
            if gap:
                await asyncio.sleep(gap)
        w.write_eof()
        return await asyncio.wait_for(r.read(), 3)
    except OSError:  # reset by the proxy
        return b""


def test_client_proxy_header_detection_is_exact() -> None:
    sig = proxyproto.SIGNATURE
    assert client_proxy_header(sig + b"\x21\x21") == 2
    assert client_proxy_header(b"PROXY TCP6 ::1 ::1 1 2\r\n") == 1
    assert client_proxy_header(b"PROXY UNKNOWN\r\n") == 1
    for prefix in (b"\r", b"\r\n\r\n", sig[:11], b"P", b"PROX", b"PROXY ", b"PROXY TCP"):
        assert client_proxy_header(prefix) is None, prefix
    for data in (b"", b"GET / HTTP/1.1\r\n", b"PING\r\n", b"PROXYX", b"PROXY TCP5 ", b"\r\n\r\nx"):
        assert client_proxy_header(data) == 0, data
    assert client_proxy_header(bytearray(b"PUT /")) == 0


def test_untrusted_proxy_v1_and_split_v2_are_refused_before_any_backend_connection() -> None:
    async def main() -> None:
        be = await Recorder().start()
        v2 = proxyproto.encode_proxy("2001:db8::1", "2001:db8::80", 4711, 443)

        async def body(s: ProxyServer) -> None:
            port = s.addresses("tcp")[0][1]
            assert await _send(port, b"PROXY TCP6 2001:db8::1 ::1 4711 80\r\nGET /\r\n") == b""
            # the v1 word and the v2 signature split over writes longer than FIRST_BYTES_WAIT
            gap = FIRST_BYTES_WAIT * 3
            assert await _send(port, b"PRO", b"XY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", gap=gap) == b""
            assert await _send(port, v2[:5], v2[5:] + b"data", gap=gap) == b""
            await asyncio.sleep(0.05)
            assert be.conns == 0  # the backend never saw those connections
            errs = s.counters()["tcp"]["errors"]
            assert errs == {"proxy_v1_untrusted": 2, "proxy_v2_untrusted": 1}
            # data that only starts like a PROXY header is relayed exactly
            assert await _send(port, b"PING\r\n") == b"pong:58"  # 52 header bytes + 6
            assert await _send(port, b"P", b"UT x", gap=gap) == b"pong:57"
            assert await _send(port, b"\r\n", b"hello", gap=gap) == b"pong:59"
            assert await _send(port, b"PROX") == b"pong:56"  # EOF decides: not a header
            assert be.received == [b"PING\r\n", b"PUT x", b"\r\nhello", b"PROX"]
            assert s.counters()["tcp"]["errors"] == errs

        await _with([l4_vip([be.port])], body)
        await be.stop()

    run(main())


def test_a_stalled_proxy_prefix_times_out_and_a_server_first_backend_still_talks() -> None:
    async def banner(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 hello\r\n")  # the server speaks first
        await w.drain()
        w.write(b"echo:" + await r.readline())
        await w.drain()

    async def main() -> None:
        be = await Backend_(banner).start()
        vip = l4_vip([be.port], pp=False, timeouts=Timeouts(connect=0.3, idle=5))

        async def body(s: ProxyServer) -> None:
            loop = asyncio.get_running_loop()
            port = s.addresses("tcp")[0][1]
            r, w = await asyncio.open_connection("::1", port)
            t0 = loop.time()
            assert await asyncio.wait_for(r.readline(), 3) == b"220 hello\r\n"
            assert loop.time() - t0 < 0.5  # connected after FIRST_BYTES_WAIT, not never
            w.write(b"PROXYISH\r\n")  # checked when it comes: not a header, relayed
            assert await asyncio.wait_for(r.readline(), 3) == b"echo:PROXYISH\r\n"
            w.close()
            # a peer that sends "PROX" and stalls: closed after timeouts.connect, no backend
            conns = be.conns
            r, w = await asyncio.open_connection("::1", port)
            w.write(b"PROX")
            t0 = loop.time()
            try:
                assert await asyncio.wait_for(r.read(), 3) == b""
            except ConnectionError:
                pass
            assert 0.25 <= loop.time() - t0 < 1.5
            assert be.conns == conns
            assert s.counters()["tcp"]["errors"] == {"proxy_prefix_timeout": 1}

        await _with([vip], body)
        await be.stop()

    run(main())


def test_http10_without_host_gets_the_vip_as_host_and_http09_is_refused_at_once() -> None:
    async def main() -> None:
        be = await HttpBackend("b0").start()

        async def body(s: ProxyServer) -> None:
            loop = asyncio.get_running_loop()
            port = s.addresses("web")[0][1]

            async def raw(data: bytes) -> bytes:
                r, w = await asyncio.open_connection("::1", port)
                w.write(data)
                got = await asyncio.wait_for(r.read(), 3)  # HTTP/1.0: closed after it
                w.close()
                return got

            got = await raw(b"GET /x HTTP/1.0\r\nAccept: */*\r\n\r\n")
            assert got == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nb0"
            head = be.heads[-1]
            assert head.startswith(b"GET /x HTTP/1.1\r\n")
            assert header(head, "Host") == [f"[::1]:{port}"]
            await raw(b"GET /y HTTP/1.0\r\nHost: example.org\r\n\r\n")
            assert header(be.heads[-1], "Host") == ["example.org"]  # a Host is kept as is
            # HTTP/0.9: no version, no headers; answered 400 at once, not after a timeout
            for req in (b"GET /\r\n", b"GET /\r\n\r\n"):
                t0 = loop.time()
                assert await raw(req) == error_response(400)
                assert loop.time() - t0 < 0.5
            assert len(be.heads) == 2
            assert s.counters()["web"]["errors"] == {"http_0_9": 2}

        await _with([l7_vip([be.port])], body)
        await be.stop()

    run(main())


@pytest.mark.tool
@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_refuses_a_client_proxy_header_too(tmp_path: Path) -> None:
    # Runs under both loops like the rest of this module (the autouse fixture); CI must
    # not see a tool test skipped, and the recorder backend runs on our loop anyway.
    async def main() -> None:
        be = await Recorder().start()
        s0 = socket.socket(socket.AF_INET6)
        s0.bind(("::1", 0))
        port = s0.getsockname()[1]
        s0.close()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(render_haproxy([replace(l4_vip([be.port]), ports=(port,))]))
        proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):  # until it listens
                try:
                    socket.create_connection(("::1", port), timeout=1).close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            assert await _send(port, b"PROXY TCP6 2001:db8::1 ::1 4711 80\r\nhi") == b""
            assert await _send(port, proxyproto.encode_proxy("::2", "::1", 1, 2) + b"hi") == b""
            assert await _send(port, b"PING\r\n") == b"pong:58"  # relayed after HAProxy's header
            assert [x for x in be.received if x] == [b"PING\r\n"]
        finally:
            proc.terminate()
            proc.wait(5)
            await be.stop()

    run(main())


def test_l7_client_half_close_after_pipelined_requests_gets_answers_then_eof() -> None:
    async def main() -> None:
        be = await HttpBackend("b0").start()
        vip = l7_vip([be.port], timeouts=Timeouts(connect=1, idle=3))

        async def body(s: ProxyServer) -> None:
            loop = asyncio.get_running_loop()
            r, w = await asyncio.open_connection("::1", s.addresses("web")[0][1])
            w.write(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
            w.write_eof()
            t0 = loop.time()
            got = await asyncio.wait_for(r.read(), 5)  # until the proxy closes
            assert got == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nb0" * 2
            assert loop.time() - t0 < 1.0  # not after timeouts.idle (3 s)
            assert s.counters()["web"]["errors"] == {}

        await _with([vip], body)
        await be.stop()

    run(main())


def test_a_trusted_peers_stream_after_its_header_is_checked_too() -> None:
    async def main() -> None:
        be = await Recorder().start()
        ours = proxyproto.encode_proxy("2001:db8::1", "2001:db8::80", 4711, 443)

        async def body(s: ProxyServer) -> None:
            port = s.addresses("tcp")[0][1]
            assert await _send(port, ours + b"PROXY TCP6 ::2 ::3 1 2\r\nx") == b""
            assert await _send(port, ours, proxyproto.encode_proxy("::2", "::3", 1, 2)) == b""
            await asyncio.sleep(0.05)
            assert be.conns == 0
            assert await _send(port, ours + b"data") == b"pong:56"  # 52 + 4
            assert be.received == [b"data"]
            errs = s.counters()["tcp"]["errors"]
            assert errs == {"proxy_v1_untrusted": 1, "proxy_v2_untrusted": 1}

        await _with([l4_vip([be.port], trusted=("::1/128",))], body)
        await be.stop()

    run(main())
