"""The builtin ``proxy-l7`` on loopback: forwarding headers, keep-alive, errors, health."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from test_proxy_fixtures import (
    Backend_,
    HttpBackend,
    header,
    http_get,
    l7_vip,
    loop_kind,  # noqa: F401 (autouse: every test on asyncio and on uvloop)
    read_response,
    run,
)
from v6lb.core import forwarded
from v6lb.engines.proxy import ProxyServer
from v6lb.engines.proxy.policy import error_response
from v6lb.model.config import HealthCheck, HealthType, Scheduler, Timeouts

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")


async def _with(vips: list[Any], body: Callable[[ProxyServer], Awaitable[T]], **kw: Any) -> T:
    async with ProxyServer(vips, **kw) as server:
        return await body(server)


def test_forwarding_headers_appended_and_untrusted_ones_stripped() -> None:
    async def main() -> None:
        be = await HttpBackend("b0").start()
        vips = [
            l7_vip([be.port], name="strict"),
            l7_vip([be.port], name="trusting", trusted=("::1/128",)),
        ]

        async def body(s: ProxyServer) -> None:
            spoof = (
                "X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n"
                "X-Forwarded-Proto: https\r\nX-Real-IP: 6.6.6.6\r\n"
            )
            conn = await asyncio.open_connection("::1", s.addresses("strict")[0][1])
            cport = conn[1].get_extra_info("sockname")[1]
            status, _, body_ = await http_get(0, extra=spoof, conn=conn)
            assert (status, body_) == (200, b"b0")
            head = be.heads[-1]
            assert header(head, "X-Forwarded-For") == ["::1"]
            assert header(head, "Forwarded") == [f'for="[::1]:{cport}";proto=http']
            assert header(head, "X-Forwarded-Proto") == ["http"]
            assert header(head, "X-Real-IP") == []
            el = forwarded.parse_forwarded(header(head, "Forwarded")[0])
            assert forwarded.parse_node(el[0]["for"]).port == cport
            # keep-alive: a second request on the same client connection
            status, _, _ = await http_get(0, conn=conn)
            assert status == 200 and len(be.heads) == 2
            conn[1].close()
            # a trusted client's chain is kept and extended
            status, _, _ = await http_get(
                s.addresses("trusting")[0][1],
                extra='X-Forwarded-For: 2001:db8::7\r\nForwarded: for="[2001:db8::7]:1"\r\n',
            )
            head = be.heads[-1]
            assert header(head, "X-Forwarded-For") == ["2001:db8::7, ::1"]
            assert header(head, "Forwarded")[0].startswith('for="[2001:db8::7]:1", for="[::1]:')
            # one pooled backend connection per VIP, reused across requests and clients
            assert be.conns == 2
            c = s.counters()
            assert c["strict"]["requests"] == 2 and c["strict"]["errors"] == {}

        await _with(vips, body)
        await be.stop()

    run(main())


def test_400_431_413() -> None:
    async def main() -> None:
        be = await HttpBackend("b0").start()
        vip = l7_vip([be.port], max_header_bytes=2048, max_request_bytes=1000)

        async def raw(port: int, data: bytes) -> int:
            r, w = await asyncio.open_connection("::1", port)
            w.write(data)
            status, head, _ = await read_response(r)
            assert b"Connection: close" in head
            assert await asyncio.wait_for(r.read(), 3) == b""  # and it closes
            return status

        async def body(s: ProxyServer) -> None:
            port = s.addresses("web")[0][1]
            assert await raw(port, b"GARBAGE\r\n\r\n") == 400
            assert await raw(port, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n") == 431
            # a head growing without end, before it completes
            assert await raw(port, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 4000) == 431
            assert (
                await raw(port, b"POST / HTTP/1.1\r\nContent-Length: 2000\r\n\r\n" + b"b" * 2000)
                == 413
            )
            assert be.heads == []
            errs = s.counters()["web"]["errors"]
            assert errs == {"bad_request": 1, "headers_too_large": 2, "request_too_large": 1}

        await _with([vip], body)
        await be.stop()

    run(main())


def test_502_503_504() -> None:
    async def reset_mid(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await w.drain()
        w.transport.abort()

    async def reset_early(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.transport.abort()

    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"NOT HTTP AT ALL\r\n\r\n")
        await w.drain()
        await asyncio.sleep(1)

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()

    async def main() -> None:
        bes = {
            n: await Backend_(h).start()
            for n, h in [
                ("early", reset_early),
                ("garbage", garbage),
                ("mid", reset_mid),
                ("silent", silent),
            ]
        }
        vips = [
            l7_vip([b.port], name=n, timeouts=Timeouts(connect=1, idle=0.3)) for n, b in bes.items()
        ]
        vips.append(l7_vip([bes["early"].port], name="none"))

        async def body(s: ProxyServer) -> None:
            for name, want in [("early", 502), ("garbage", 502), ("silent", 504)]:
                status, _, _ = await http_get(s.addresses(name)[0][1])
                assert status == want, name
            # reset after the response began: the client sees a clean close, not a hang
            r, w = await asyncio.open_connection("::1", s.addresses("mid")[0][1])
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await asyncio.wait_for(r.read(), 3)
            assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"partial")
            s.set_drain("none", 0, True)
            status, _, _ = await http_get(s.addresses("none")[0][1])
            assert status == 503
            c = s.counters()
            assert c["early"]["errors"] == {"backend_reset": 1}
            assert c["garbage"]["errors"] == {"backend_bad_response": 1}
            assert c["silent"]["errors"] == {"response_timeout": 1}
            assert c["mid"]["errors"] == {"backend_reset": 1}
            assert c["none"]["errors"] == {"no_healthy_backend": 1}

        await _with(vips, body)
        for b in bes.values():
            await b.stop()

    run(main())


def test_connect_failure_is_502() -> None:
    import socket

    async def main() -> None:
        s0 = socket.socket(socket.AF_INET6)
        s0.bind(("::1", 0))
        dead = s0.getsockname()[1]
        s0.close()

        async def body(s: ProxyServer) -> None:
            status, _, _ = await http_get(s.addresses("web")[0][1])
            assert status == 502
            assert s.counters()["web"]["errors"] == {"connect_failed": 1}

        await _with([l7_vip([dead])], body)

    run(main())


def test_slowloris_is_cut_off_without_slowing_others() -> None:
    async def main() -> None:
        be = await HttpBackend("b0").start()

        async def body(s: ProxyServer) -> None:
            port = s.addresses("web")[0][1]
            loop = asyncio.get_running_loop()
            r, w = await asyncio.open_connection("::1", port)
            w.write(b"GET / HTTP/1.1\r\n")
            t0 = loop.time()
            for _ in range(5):  # others are served meanwhile
                status, _, _ = await http_get(port)
                assert status == 200
            assert loop.time() - t0 < 0.3
            # chunks, not read() to EOF: a read() cancelled by the timeout after the answer
            # came but before the FIN would lose the answer on a loaded machine
            data, answered = b"", None
            for i in range(30):
                try:
                    w.write(b"X-Slow-%d: y\r\n" % i)
                except ConnectionError:
                    pass
                try:
                    chunk = await asyncio.wait_for(r.read(65536), 0.1)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                answered = answered or loop.time()
                data += chunk
            assert data == error_response(408)  # as HAProxy answers its http-request timeout
            assert answered is not None and 0.4 <= answered - t0 < 1.5
            assert s.counters()["web"]["errors"] == {"header_timeout": 1}

        await _with([l7_vip([be.port])], body, header_timeout=0.5)
        await be.stop()

    run(main())


def test_schedulers_and_drain() -> None:
    async def main() -> None:
        bes = [await HttpBackend(f"b{i}", delay=0.2 if i == 0 else 0).start() for i in range(3)]
        ports = [b.port for b in bes]
        vips = [
            l7_vip(ports, name="rr"),
            l7_vip(ports, name="lc", scheduler=Scheduler.LEAST_CONNECTIONS),
            l7_vip(ports, name="mg", scheduler=Scheduler.MAGLEV),
        ]

        async def names(port: int, n: int, parallel: bool = False) -> list[bytes]:
            if parallel:
                got = await asyncio.gather(*(http_get(port) for _ in range(n)))
            else:
                got = [await http_get(port) for _ in range(n)]
            return [b for _, _, b in got]

        async def body(s: ProxyServer) -> None:
            assert await names(s.addresses("rr")[0][1], 6) == [b"b0", b"b1", b"b2"] * 2
            # least-connections: b0 is slow, so it holds one request while the others get the rest
            lc = s.addresses("lc")[0][1]
            slow = asyncio.ensure_future(http_get(lc))  # b0, held 0.2 s
            await asyncio.sleep(0.05)
            got = await names(lc, 8)
            assert got == [b"b1"] * 8  # b0 is busy; ties go to the lowest index
            assert (await slow)[2] == b"b0"
            mg = await names(s.addresses("mg")[0][1], 5)
            assert len(set(mg)) == 1  # one client address: one backend
            s.set_drain("rr", 1, True)
            assert await names(s.addresses("rr")[0][1], 4) == [b"b0", b"b2"] * 2

        await _with(vips, body)
        for b in bes:
            await b.stop()

    run(main())


def test_health_failover_then_503_when_all_down() -> None:
    async def main() -> None:
        b0, b1 = await HttpBackend("b0").start(), await HttpBackend("b1").start()
        hc = HealthCheck(
            type=HealthType.HTTP, interval=0.1, timeout=0.05, rise=1, fall=1, path="/health"
        )
        vip = l7_vip([b0.port, b1.port], health=hc)

        async def body(s: ProxyServer) -> None:
            port = s.addresses("web")[0][1]
            await asyncio.sleep(0.15)
            assert any(h.startswith(b"GET /health HTTP/1.1") for h in b0.heads)
            await b0.stop()
            await asyncio.sleep(0.3)
            got = [(await http_get(port))[2] for _ in range(4)]
            assert got == [b"b1"] * 4
            await b1.stop()
            await asyncio.sleep(0.3)
            status, _, _ = await http_get(port)
            assert status == 503
            c = s.counters()["web"]
            assert [b["state"] for b in c["backends"].values()] == ["down", "down"]
            assert c["errors"] == {"no_healthy_backend": 1}

        await _with([vip], body)

    run(main())


def test_dual_stack_ipv4_client_is_plain_ipv4_in_headers() -> None:
    from dataclasses import replace
    from ipaddress import IPv4Address

    async def main() -> None:
        be = await HttpBackend("b0").start()
        vip = l7_vip([be.port])
        vip = replace(vip, options=replace(vip.options, dual_stack=IPv4Address("127.0.0.1")))

        async def body(s: ProxyServer) -> None:
            port = [p for h, p in s.addresses("web") if h == "127.0.0.1"][0]
            conn = await asyncio.open_connection("127.0.0.1", port)
            cport = conn[1].get_extra_info("sockname")[1]
            status, _, _ = await http_get(0, conn=conn)
            assert status == 200
            head = be.heads[-1]
            assert header(head, "X-Forwarded-For") == ["127.0.0.1"]
            assert header(head, "Forwarded") == [f'for="127.0.0.1:{cport}";proto=http']
            conn[1].close()

        await _with([vip], body)
        await be.stop()

    run(main())


def test_over_max_connections_is_refused_and_counted() -> None:
    async def main() -> None:
        be = await HttpBackend("b0").start()

        async def body(s: ProxyServer) -> None:
            port = s.addresses("web")[0][1]
            opened = [await asyncio.open_connection("::1", port) for _ in range(2)]
            for conn in opened:  # both are served, on keep-alive connections
                assert (await http_get(0, conn=conn))[0] == 200
            r, w = await asyncio.open_connection("::1", port)  # the third: over the max
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                assert await asyncio.wait_for(r.read(), 3) == b""
            except ConnectionError:
                pass
            assert s.counters()["web"]["errors"] == {"over_max_connections": 1}
            assert s.counters()["web"]["requests"] == 2
            for _, ow in opened:
                ow.close()

        await _with([l7_vip([be.port])], body, max_connections=2)
        await be.stop()

    run(main())


def test_keep_alive_idle_close_and_response_timeout_on_a_pooled_connection() -> None:
    stall = asyncio.Event()

    async def second_stalls(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await r.readuntil(b"\r\n\r\n")  # the second request, on the pooled connection
        stall.set()
        await r.read()

    async def main() -> None:
        be = await Backend_(second_stalls).start()
        vip = l7_vip([be.port], timeouts=Timeouts(connect=1, idle=0.4))

        async def body(s: ProxyServer) -> None:
            loop = asyncio.get_running_loop()
            port = s.addresses("web")[0][1]
            conn = await asyncio.open_connection("::1", port)
            assert (await http_get(0, conn=conn))[0] == 200
            t0 = loop.time()  # a quiet keep-alive client is closed after idle, no error
            assert await asyncio.wait_for(conn[0].read(), 3) == b""
            assert 0.35 <= loop.time() - t0 < 1.5
            assert s.counters()["web"]["errors"] == {}
            # the pooled backend connection stalls on the next request: 504 after idle
            t0 = loop.time()
            status, _, _ = await http_get(port)
            assert stall.is_set() and status == 504
            assert 0.35 <= loop.time() - t0 < 1.5
            c = s.counters()["web"]
            assert c["errors"] == {"response_timeout": 1} and be.conns == 1

        await _with([vip], body)
        await be.stop()

    run(main())
