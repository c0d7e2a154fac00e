"""``proxy-l7`` and 1xx responses: interim responses never end a response, Expect is answered.

Issue 21 point 1: httptools ends a message at any 1xx, so a backend's ``100
Continue`` used to send the connection back to the pool with the final answer
still to come, and the next client on that connection received it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_proxy_fixtures import (
    Backend_,
    HttpBackend,
    l7_vip,
    loop_kind,  # noqa: F401 (autouse: every test on asyncio and on uvloop)
    read_response,
    run,
)
from v6lb.engines.proxy import ProxyServer
from v6lb.engines.proxy.policy import error_response
from v6lb.model.config import Timeouts

pytestmark = pytest.mark.timeout(120)
T = TypeVar("T")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def _with(vips: list[Any], body: Callable[[ProxyServer], Awaitable[T]], **kw: Any) -> T:
    async with ProxyServer(vips, **kw) as server:
        return await body(server)


async def _read_head_and_body(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    return head, await r.readexactly(n) if n else b""


async def _drain(r: asyncio.StreamReader, quiet: float = 0.4) -> bytes:
    """Everything that arrives until ``quiet`` seconds pass without a byte (or EOF)."""
    out = b""
    while True:
        try:
            chunk = await asyncio.wait_for(r.read(65536), quiet)
        except (TimeoutError, ConnectionError):
            return out
        if not chunk:
            return out
        out += chunk


async def _expect_post(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, path: str, body: bytes, wait: float = 1.0
) -> bytes:
    """A curl-like Expect request: the head, up to ``wait`` s for a 100, then the body."""
    w.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    got = b""
    try:
        got = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), wait)
    except TimeoutError:
        pass
    w.write(body)
    return got


def _final(tag: bytes, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return b"HTTP/1.1 200 OK\r\nX-Id: %s\r\n%sContent-Length: %d\r\n\r\n%s" % (
        tag,
        extra,
        len(tag),
        tag,
    )


def test_interim_100_stays_with_its_client_and_the_pooled_connection_waits() -> None:
    """A's 100 and A's 200 (0.3 s later) go to A; B, meanwhile, gets only its own response."""
    got_a = asyncio.Event()

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:  # keep-alive
            head, _ = await _read_head_and_body(r)
            path = head.split()[1]
            if path == b"/a":
                w.write(CONTINUE)
                await w.drain()
                got_a.set()
                await asyncio.sleep(0.3)
                w.write(_final(b"A"))
            else:
                w.write(_final(b"B"))
            await w.drain()

    async def main() -> None:
        be = await Backend_(backend).start()

        async def body(s: ProxyServer) -> None:
            port = s.addresses("web")[0][1]
            # warm the pool: one idle keep-alive connection to the backend
            ra, wa = await asyncio.open_connection("::1", port)
            wa.write(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(ra))[2] == b"B"
            interim = await _expect_post(ra, wa, "/a", b"hello")
            await asyncio.wait_for(got_a.wait(), 3)
            rb, wb = await asyncio.open_connection("::1", port)  # B, while A's 200 is due
            wb.write(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            b_bytes, a_bytes = await asyncio.gather(_drain(rb), _drain(ra, 1.0))
            assert b_bytes == _final(b"B")  # only B's own response
            assert interim == CONTINUE  # the proxy's own, at once
            assert a_bytes == _final(b"A")  # the backend's 100 was consumed, the 200 is A's
            wa.close()
            wb.close()
            c = s.counters()["web"]
            assert c["errors"] == {}
            assert c["interim"] == {"continue_sent": 1, "consumed": 1}
            assert c["requests"] == 3 and be.conns == 2  # B could not take A's connection

        await _with([l7_vip([be.port])], body)
        await be.stop()

    run(main())


def test_expect_100_continue_is_answered_by_the_proxy_at_once() -> None:
    heads: list[bytes] = []

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head, data = await _read_head_and_body(r)
            heads.append(head)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            await w.drain()

    async def main() -> None:
        be = await Backend_(backend).start()

        async def body(s: ProxyServer) -> None:
            loop = asyncio.get_running_loop()
            port = s.addresses("web")[0][1]
            r, w = await asyncio.open_connection("::1", port)
            for i in range(3):
                t0 = loop.time()
                interim = await _expect_post(r, w, "/up", b"x" * (10 + i))
                status, _, data = await read_response(r)
                took = loop.time() - t0
                assert interim == CONTINUE and status == 200 and data == b"x" * (10 + i)
                assert took < 0.5, took  # curl's timer is 1 s
            # Expect never reaches the backend; the body does, with its length
            assert all(b"expect" not in h.lower() for h in heads) and len(heads) == 3
            assert b"Content-Length: 12\r\n" in heads[-1]
            w.close()
            c = s.counters()["web"]
            assert c["interim"] == {"continue_sent": 3} and c["errors"] == {}

        await _with([l7_vip([be.port])], body)
        await be.stop()

    run(main())


def test_expect_417_413_and_http10_and_bodyless() -> None:
    heads: list[bytes] = []

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head, data = await _read_head_and_body(r)
            heads.append(head)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            await w.drain()

    async def main() -> None:
        be = await Backend_(backend).start()

        async def body(s: ProxyServer) -> None:
            port = s.addresses("web")[0][1]

            async def one(data: bytes, then: bytes = b"") -> bytes:
                r, w = await asyncio.open_connection("::1", port)
                w.write(data)
                first = await _drain(r, 0.3)
                if then:
                    w.write(then)
                    first += await _drain(r, 0.5)
                w.close()
                return first

            # an unknown expectation: 417, closed, nothing forwarded
            got = await one(
                b"POST / HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\nContent-Length: 2\r\n\r\n"
            )
            assert got == error_response(417)
            # too large: 413 before the body, without a 100
            got = await one(
                b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
            )
            assert got == error_response(413)
            # no body announced: no 100, the request goes through as is
            got = await one(b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n")
            assert got == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
            # HTTP/1.0: the expectation is ignored (no 1xx to a 1.0 client); the body follows
            got = await one(
                b"POST / HTTP/1.0\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
                then=b"hi",
            )
            assert got == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
            assert len(heads) == 2 and all(b"expect" not in h.lower() for h in heads)
            c = s.counters()["web"]
            assert c["errors"] == {"expectation_failed": 1, "request_too_large": 1}
            assert c["interim"] == {}

        await _with([l7_vip([be.port], max_request_bytes=1000)], body)
        await be.stop()

    run(main())


def test_backend_101_is_a_502_and_103_is_relayed_to_http11_only() -> None:
    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await _read_head_and_body(r)
            path = head.split()[1]
            if path == b"/switch":
                w.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
                )
                w.write(b"\x00\x01binary")
                await w.drain()
                await asyncio.sleep(1)
                return
            w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
            w.write(b"HTTP/1.1 102 Processing\r\n\r\n")
            await w.drain()
            await asyncio.sleep(0.02)
            w.write(_final(b"ok"))
            await w.drain()

    async def main() -> None:
        be = await Backend_(backend).start()

        async def body(s: ProxyServer) -> None:
            port = s.addresses("web")[0][1]
            # a backend's 101 is a 502 (the proxy removed Upgrade); closed, never pooled
            r, w = await asyncio.open_connection("::1", port)
            w.write(b"GET /switch HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await _drain(r) == error_response(502)
            w.close()
            r, w = await asyncio.open_connection("::1", port)
            w.write(b"GET /hints HTTP/1.1\r\nHost: x\r\n\r\n")
            got = await _drain(r)
            assert got == (
                b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                b"HTTP/1.1 102 Processing\r\n\r\n" + _final(b"ok")
            )
            w.close()
            r, w = await asyncio.open_connection("::1", port)
            w.write(b"GET /hints HTTP/1.0\r\nHost: x\r\n\r\n")  # 1xx never go to HTTP/1.0
            assert await _drain(r) == _final(b"ok")
            w.close()
            c = s.counters()["web"]
            assert c["errors"] == {"backend_switching_protocols": 1}
            assert c["interim"] == {"relayed": 2, "dropped": 2}
            assert s.status()[0]["interim"] == {"relayed": 2, "dropped": 2}  # v6lb status
            assert be.conns == 2  # the 101 connection was closed; the other was reused

        await _with([l7_vip([be.port])], body)
        await be.stop()

    run(main())


def test_client_upgrade_is_served_as_a_plain_request_connect_and_bodies_refused() -> None:
    async def main() -> None:
        be = await HttpBackend("b0").start()

        async def body(s: ProxyServer) -> None:
            port = s.addresses("web")[0][1]
            r, w = await asyncio.open_connection("::1", port)
            h2c = (
                b"GET /1 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
            )
            w.write(h2c + b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")  # curl --http2 on http://
            ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nb0"
            assert await _drain(r) == ok + ok  # as HTTP/1.1, and the next request too
            w.close()
            assert [h.split(b" ")[1] for h in be.heads] == [b"/1", b"/2"]
            assert b"upgrade" not in be.heads[0].lower()
            for req in (
                b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: x\r\nUpgrade: x\r\nConnection: upgrade\r\n"
                b"Content-Length: 3\r\n\r\nabc",
            ):
                r, w = await asyncio.open_connection("::1", port)
                w.write(req)
                assert await _drain(r) == error_response(400)
                w.close()
            assert len(be.heads) == 2
            assert s.counters()["web"]["errors"] == {"upgrade_unsupported": 2}

        await _with([l7_vip([be.port])], body)
        await be.stop()

    run(main())


# --- property: interleavings of 1xx, pipelining, closes and resets --------------------

_ENDS = ["ok", "ok", "ok", "close_after", "reset_before", "close_before", "reset_mid"]
_request = st.tuples(
    st.lists(st.sampled_from([100, 102, 103]), max_size=3),  # interim codes
    st.sampled_from(_ENDS),
    st.integers(1, 3),  # chunks the backend writes the bytes in
)
_client = st.tuples(st.booleans(), st.lists(_request, min_size=1, max_size=3))  # pipelined?
_TAG = re.compile(rb"c(\d+)r(\d+)")


def _interim(code: int, tag: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\nX-Id: %s\r\n\r\n" % (code, tag)


def _expected(reqs: list[Any], i: int) -> tuple[bytes, bytes]:
    """What client ``i`` must receive: (exact bytes, or the bytes it may be cut within)."""
    out = b""
    for j, (codes, end, _) in enumerate(reqs):
        tag = b"c%dr%d" % (i, j)
        relayed = b"".join(_interim(c, tag) for c in codes if c != 100)
        if end == "ok":
            out += relayed + _final(tag)
            continue
        if end == "close_after":
            return out + relayed + _final(tag, close=True), b""
        if end == "reset_mid":
            return out + relayed, out + relayed + _final(tag)
        return out + relayed + error_response(502), b""  # reset or closed before the final
    return out, b""


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(clients=st.lists(_client, min_size=2, max_size=4), starts=st.lists(st.integers(0, 3)))
def test_property_each_client_gets_only_its_own_bytes(
    clients: list[tuple[bool, list[Any]]], starts: list[int]
) -> None:
    scripts = {
        b"c%dr%d" % (i, j): r for i, (_, reqs) in enumerate(clients) for j, r in enumerate(reqs)
    }

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await _read_head_and_body(r)
            tag = head.split()[1][1:]
            codes, end, chunks = scripts[tag]
            out = b"".join(_interim(c, tag) for c in codes)
            final = _final(tag, close=end == "close_after")
            if end in ("ok", "close_after"):
                out += final
            elif end == "reset_mid":
                out += final[: len(final) // 2]
            step = max(1, -(-len(out) // chunks))
            for k in range(0, len(out), step):
                w.write(out[k : k + step])
                await w.drain()
                await asyncio.sleep(0.003)
            if end in ("ok",):
                continue
            await asyncio.sleep(0.02)
            if end.startswith("reset"):
                w.transport.abort()
            return  # close_after and close_before: a clean close

    async def client(port: int, i: int, pipelined: bool, n: int, delay: float) -> bytes:
        await asyncio.sleep(delay)
        r, w = await asyncio.open_connection("::1", port)
        reqs = [b"GET /c%dr%d HTTP/1.1\r\nHost: x\r\n\r\n" % (i, j) for j in range(n)]
        got = b""
        if pipelined:
            w.write(b"".join(reqs))
        else:
            for req in reqs[:-1]:  # one at a time: wait for each final response
                w.write(req)
                got += await _until_final(r)
            w.write(reqs[-1])
        # until EOF, or the bytes this client must get and 0.2 s more (for any extra)
        want = len(_expected(clients[i][1], i)[0])
        while len(got) < want:
            try:
                chunk = await asyncio.wait_for(r.read(65536), 5)
            except ConnectionError:
                chunk = b""
            if not chunk:
                break
            got += chunk
        got += await _drain(r, 0.2)
        w.close()
        return got

    async def main() -> None:
        be = await Backend_(backend).start()
        vip = l7_vip([be.port], timeouts=Timeouts(connect=1, idle=3))

        async def body(s: ProxyServer) -> None:
            port = s.addresses("web")[0][1]
            got = await asyncio.gather(
                *(
                    client(port, i, p, len(reqs), (starts[i] if i < len(starts) else 0) * 0.005)
                    for i, (p, reqs) in enumerate(clients)
                )
            )
            for i, data in enumerate(got):
                owners = {int(m.group(1)) for m in _TAG.finditer(data)}
                assert owners <= {i}, (i, data)  # never another client's bytes
                exact, within = _expected(clients[i][1], i)
                if within:
                    assert data.startswith(exact) and within.startswith(data), (i, data)
                else:
                    assert data == exact, (i, data, exact)

        await _with([vip], body)
        await be.stop()

    run(main())


async def _until_final(r: asyncio.StreamReader) -> bytes:
    """The bytes of 1xx heads and one final response (or what came before EOF)."""
    out = b""
    try:
        while True:
            head, data = await asyncio.wait_for(_read_head_and_body(r), 3)
            out += head + data
            if head[9:10] != b"1":
                return out
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        if isinstance(e, asyncio.IncompleteReadError):
            out += e.partial
        return out


@pytest.mark.tool
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_expect_upload_takes_milliseconds_not_curls_one_second() -> None:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            _, data = await _read_head_and_body(r)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            await w.drain()

    async def main() -> None:
        be = await Backend_(echo).start()

        async def body(s: ProxyServer) -> None:
            url = f"http://[::1]:{s.addresses('web')[0][1]}/up"
            proc = await asyncio.create_subprocess_exec(
                *("curl", "-sS", "-H", "Expect: 100-continue", "--data-binary", "payload"),
                *("-w", "\n%{time_total}", url),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
            data, took = out.rsplit(b"\n", 1)
            assert data == b"payload"
            assert float(took) < 0.5, took  # curl waits 1 s for a 100 that never comes
            assert s.counters()["web"]["interim"] == {"continue_sent": 1}

        await _with([l7_vip([be.port])], body)
        await be.stop()

    run(main())
