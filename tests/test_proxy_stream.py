"""The builtin ``proxy-l7`` streams request bodies: backpressure, re-chunking, limits mid-body.

In process, on [::1], on asyncio's loop and on uvloop. The 1 GB transfers with curl and
nginx through both engines are in tests/test_proxy_stream_lab.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from test_proxy_fixtures import (
    Backend_,
    haproxy_l7,
    header,
    l7_vip,
    loop_kind,  # noqa: F401 (autouse: every test on asyncio and on uvloop)
    read_response,
    run,
)
from v6lb.engines.proxy import ProxyServer
from v6lb.engines.proxy.l7 import REPLAY_BYTES

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")
MIB = 1 << 20


async def _with(vips: list[Any], body: Callable[[ProxyServer], Awaitable[T]], **kw: Any) -> T:
    async with ProxyServer(vips, **kw) as server:
        return await body(server)


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.005)


def test_upload_to_a_backend_that_waits_holds_the_client_and_little_memory() -> None:
    """48 MB to a backend that reads only the head, then waits: the head is there at once
    (the body streams), the client's sending stalls, and the proxy holds no more than a
    few write-buffer marks; then the backend reads all of it, hash equal."""
    total = 48 * MIB
    high = 64 * 1024
    block = os.urandom(MIB)
    gate = asyncio.Event()
    seen: dict[str, Any] = {}

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        seen["head"] = head
        await gate.wait()
        n, h = 0, hashlib.sha256()
        length = int(header(head, "Content-Length")[0])
        while n < length:
            data = await r.read(MIB)
            assert data
            n += len(data)
            h.update(data)
        digest = h.hexdigest().encode()
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(digest), digest))
        await w.drain()
        await r.read()

    async def main() -> None:
        be = await Backend_(backend).start()

        async def body(s: ProxyServer) -> None:
            r, w = await asyncio.open_connection("::1", s.addresses("web")[0][1])
            w.write(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total)

            async def send() -> None:
                for _ in range(total // MIB):
                    w.write(block)
                    await w.drain()

            peak = 0

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, s.buffered())
                    await asyncio.sleep(0.001)

            sender = asyncio.create_task(send())
            sampler = asyncio.create_task(sample())
            await _until(lambda: "head" in seen)
            await asyncio.sleep(0.5)
            assert not sender.done()  # the proxy stopped reading: the client waits
            stalled = s.counters()["web"]["bytes_in"]
            await asyncio.sleep(0.2)
            assert s.counters()["web"]["bytes_in"] == stalled  # ... and stays stopped
            gate.set()
            await asyncio.wait_for(sender, 30)
            status, _, answer = await read_response(r)
            sampler.cancel()
            assert status == 200
            assert answer == hashlib.sha256(block * (total // MIB)).hexdigest().encode()
            assert b"Content-Length: %d\r\n" % total in seen["head"]
            # a high-water mark per side plus a read or two, never the body
            assert peak <= 4 * high + 512 * 1024, peak
            w.close()

        await _with([l7_vip([be.port], max_request_bytes=None)], body, write_high=high)
        await be.stop()

    run(main())


async def _chunked_body(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """A chunked body as the backend reads it: (decoded, raw), up to the last chunk."""
    raw = bytearray()
    out = bytearray()
    while True:
        line = await r.readuntil(b"\r\n")
        raw += line
        size = int(line[:-2], 16)  # the proxy writes no extensions
        data = await r.readexactly(size + 2)
        raw += data
        if size == 0:
            return bytes(out), bytes(raw)
        out += data[:-2]


def test_chunked_body_is_rechunked_and_streams() -> None:
    """A chunked upload reaches the backend chunk by chunk, before the client finished,
    re-chunked by the proxy (extension and trailer dropped); the connection is reused."""
    heads: list[bytes] = []
    first: list[bytes] = []
    bodies: list[bytes] = []

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            heads.append(head)
            line = await r.readuntil(b"\r\n")
            first.append(line + await r.readexactly(int(line[:-2], 16) + 2))
            rest, _ = await _chunked_body(r)
            bodies.append(first[-1].split(b"\r\n")[1] + rest)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()

    async def main() -> None:
        be = await Backend_(backend).start()

        async def body(s: ProxyServer) -> None:
            r, w = await asyncio.open_connection("::1", s.addresses("web")[0][1])
            for i in range(2):
                w.write(
                    b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5;ext=1\r\nhello\r\n"
                )
                await _until(lambda i=i: len(first) > i)  # there before the rest is sent
                w.write(b"6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
                status, _, answer = await read_response(r)
                assert (status, answer) == (200, b"ok")
            assert bodies == [b"hello world"] * 2 and first == [b"5\r\nhello\r\n"] * 2
            for head in heads:
                assert header(head, "Transfer-Encoding") == ["chunked"]
                assert header(head, "Content-Length") == [] and b"X-Trailer" not in head
            assert be.conns == 1  # the backend connection went back to the pool
            w.close()

        await _with([l7_vip([be.port])], body)
        await be.stop()

    run(main())


def test_bad_chunk_or_limit_mid_body_aborts_the_backend_and_answers() -> None:
    """After a head went to a backend, a chunked body passing ``max_request_bytes`` gets
    413 and a malformed chunk 400; the backend's connection is aborted before any last
    chunk, so it never holds a complete request. A backend answering before the whole
    body came: its answer is relayed, then the client connection closes."""
    got: list[bytes] = []

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        if head.startswith(b"PUT /early"):
            w.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
            await w.drain()
        data = bytearray(head)
        while chunk := await r.read(65536):
            data += chunk
        got.append(bytes(data))

    async def main() -> None:
        be = await Backend_(backend).start()

        async def case(port: int, second: bytes) -> bytes:
            r, w = await asyncio.open_connection("::1", port)
            w.write(
                b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"258\r\n" + b"a" * 600 + b"\r\n"
            )
            await _until(lambda: be.conns > len(got))  # the head went out
            await asyncio.sleep(0.05)
            w.write(second)
            answer = await asyncio.wait_for(r.read(), 5)
            w.close()
            return answer.split(b"\r\n", 1)[0]

        async def body(s: ProxyServer) -> None:
            port = s.addresses("web")[0][1]
            over = b"258\r\n" + b"b" * 600 + b"\r\n"
            assert await case(port, over) == b"HTTP/1.1 413 Content Too Large"
            assert await case(port, b"zz\r\nabc\r\n") == b"HTTP/1.1 400 Bad Request"
            await _until(lambda: len(got) == 2)
            for data in got:
                assert data.endswith(b"a" * 600 + b"\r\n"), data[-20:]  # no last chunk
                assert b"b" * 600 not in data
            r, w = await asyncio.open_connection("::1", s.addresses("open")[0][1])
            w.write(b"PUT /early HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
            w.write(b"c" * 100_000)
            status, _, _ = await read_response(r)
            assert status == 401
            assert await asyncio.wait_for(r.read(), 5) == b""  # then it closes
            w.close()
            await _until(lambda: len(got) == 3)
            errors = s.counters()["web"]["errors"]
            assert errors == {"request_too_large": 1, "bad_request": 1}, errors

        vips = [
            l7_vip([be.port], max_request_bytes=1000),
            l7_vip([be.port], name="open", max_request_bytes=None),
        ]
        await _with(vips, body)
        await be.stop()

    run(main())


@pytest.mark.tool
@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_max_request_bytes_on_both_engines(tmp_path: Path) -> None:
    """The same ``max_request_bytes: 1000`` on both engines: a ``Content-Length`` over it
    is 413 at once (no ``100 Continue``, nothing at the backend), one under it passes. A
    chunked body over it: the builtin answers 413 mid-body; HAProxy 2.6 forwards it (it
    cannot count a streamed chunked body, docs/proxy.md)."""
    bodies: list[bytes] = []

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            if header(head, "Transfer-Encoding") == ["chunked"]:
                data, _ = await _chunked_body(r)
            else:
                data = await r.readexactly(int(header(head, "Content-Length")[0]))
            bodies.append(data)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()

    async def cases(port: int) -> list[bytes]:
        out = []
        for request in (
            b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\nExpect: 100-continue\r\n\r\n",
            b"PUT /b HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n" + b"b" * 500,
            b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"258\r\n" + b"c" * 600 + b"\r\n") * 2
            + b"0\r\n\r\n",
        ):
            r, w = await asyncio.open_connection("::1", port)
            w.write(request)
            answer = await asyncio.wait_for(r.readuntil(b"\r\n"), 5)
            out.append(answer.strip())
            w.close()
        return out

    async def main() -> dict[str, list[bytes]]:
        be = await Backend_(backend).start()
        got = {}
        try:
            async with ProxyServer([l7_vip([be.port], max_request_bytes=1000)]) as s:
                got["builtin"] = await cases(s.addresses("web")[0][1])
            got["builtin bodies"] = list(bodies)
            bodies.clear()
            async with haproxy_l7(tmp_path, be.port, max_request_bytes=1000) as port:
                got["haproxy"] = await cases(port)
        finally:
            await be.stop()
        return got

    got = run(main())
    assert got["builtin"] == [
        b"HTTP/1.1 413 Content Too Large",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 413 Content Too Large",
    ]
    assert got["builtin bodies"] == [b"b" * 500]
    assert got["haproxy"] == [
        b"HTTP/1.1 413 Payload Too Large",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
    ]
    assert bodies == [b"b" * 500, b"c" * 1200]


def test_a_stale_pooled_connection_is_retried_only_with_a_small_body() -> None:
    """The backend closes a pooled connection when the next request arrives, without an
    answer: a request with a small body is sent again on a fresh connection, body and all;
    one whose body streamed past REPLAY_BYTES cannot be, and gets 502."""
    bodies: list[bytes] = []

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        served = 0
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            data = await r.readexactly(int((header(head, "Content-Length") or ["0"])[0]))
            if served:  # a reused connection: gone without a word
                w.transport.abort()
                return
            served += 1
            bodies.append(data)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()

    async def main() -> None:
        be = await Backend_(backend).start()

        async def body(s: ProxyServer) -> None:
            r, w = await asyncio.open_connection("::1", s.addresses("web")[0][1])
            small, big = b"s" * 1000, b"b" * (REPLAY_BYTES + 1)
            for data in (b"", small, b"", big):
                w.write(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(data))
                w.write(data)
                status, _, _ = await read_response(r)
                assert status == (502 if data is big else 200), (len(data), status)
            assert bodies == [b"", small, b""]  # the small body came whole on a fresh one
            assert s.counters()["web"]["errors"] == {"backend_reset": 1}
            w.close()

        await _with([l7_vip([be.port])], body)
        await be.stop()

    run(main())
