"""HTTP/1.1 request smuggling through proxy-l7, on both engines: what reaches the backend.

Each case is one client connection carrying a request that could be framed two ways,
followed by a second request (``GET /smuggled``) that a backend would see as its own if the
proxy and the backend disagreed on where the first one ends. A raw backend on [::1]
records every byte it receives, case by case. The builtin proxy answers each case 400 and
forwards nothing; HAProxy 2.6 rejects three and normalises two, as RFC 9112 allows a proxy
to (the table in docs/proxy.md): with both Content-Length and Transfer-Encoding it drops
Content-Length and forwards the chunked body (§6.3), and it replaces an obs-fold with
spaces (§5.2). In no case does a backend read a request the proxy did not frame itself.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from test_proxy_fixtures import Backend_, haproxy_l7, l7_vip
from v6lb.engines.proxy import ProxyServer

pytestmark = pytest.mark.timeout(60)

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
CASES = {
    "content-length and transfer-encoding": b"POST / HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two different content-lengths": b"POST / HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
    "transfer-encoding chunked, identity": b"POST / HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "invalid chunk size": b"POST / HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
}


class Recorder:
    """What the backend received while each case ran (bytes, by case name)."""

    def __init__(self) -> None:
        self.case = ""
        self.got: dict[str, bytes] = {}
        self.backend = Backend_(self._serve)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while chunk := await r.read(65536):
            self.got[self.case] = self.got.get(self.case, b"") + chunk
            for _ in range(chunk.count(b" HTTP/1.1\r\n")):  # answer each request head
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


async def _each_case(rec: Recorder, host: str, port: int) -> dict[str, bytes]:
    """The first response line the client got, by case."""
    out: dict[str, bytes] = {}
    for name, request in CASES.items():
        rec.case = name
        r, w = await asyncio.open_connection(host, port)
        w.write(request + SMUGGLED)
        try:
            answer = await asyncio.wait_for(r.read(65536), 3)
        except (ConnectionError, TimeoutError):
            answer = b""
        out[name] = answer.split(b"\r\n", 1)[0]
        w.close()
        await asyncio.sleep(0.3)  # what the proxy forwards, it forwards by now
    return out


def _run(
    body: Callable[[Recorder], Awaitable[dict[str, bytes]]],
) -> tuple[dict[str, bytes], Recorder]:
    rec = Recorder()

    async def main() -> dict[str, bytes]:
        await rec.backend.start()
        try:
            return await body(rec)
        finally:
            await rec.backend.stop()

    return asyncio.run(main()), rec


def test_builtin_answers_400_and_forwards_nothing() -> None:
    async def body(rec: Recorder) -> dict[str, bytes]:
        async with ProxyServer([l7_vip([rec.backend.port])]) as server:
            host, port = server.addresses()[0]
            return await _each_case(rec, host, port)

    answers, rec = _run(body)
    assert answers == {name: b"HTTP/1.1 400 Bad Request" for name in CASES}, answers
    assert rec.got == {}, rec.got  # not one byte of any case reached the backend


@pytest.mark.tool
@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_rejects_or_normalises_and_smuggles_nothing(tmp_path: Path) -> None:
    async def body(rec: Recorder) -> dict[str, bytes]:
        async with haproxy_l7(tmp_path, rec.backend.port) as port:
            return await _each_case(rec, "::1", port)

    answers, rec = _run(body)
    rejected = ["two different content-lengths", "transfer-encoding chunked, identity",
                "invalid chunk size"]  # fmt: skip
    for name in rejected:
        assert answers[name] == b"HTTP/1.1 400 Bad request", (name, answers)
        assert name not in rec.got, (name, rec.got)
    # Content-Length and Transfer-Encoding: the chunked body goes on, without the length
    both = rec.got["content-length and transfer-encoding"].lower()
    assert answers["content-length and transfer-encoding"] == b"HTTP/1.1 200 OK"
    assert b"transfer-encoding: chunked" in both and b"content-length" not in both, both
    # obs-fold: unfolded into spaces
    fold = rec.got["obs-fold"].lower()
    assert answers["obs-fold"] == b"HTTP/1.1 200 OK" and b"x-a: a" in fold, fold
    assert b"\r\n b" not in fold
    # the request after each case reached the backend only as the client's own next
    # request, framed by HAProxy (never inside the first one's body)
    for data in rec.got.values():
        for head in data.split(b"\r\n\r\n"):
            if head.startswith(b"GET /smuggled"):
                assert b"forwarded:" in head.lower() or b"x-forwarded-for" in head.lower()
