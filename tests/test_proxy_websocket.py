"""WebSocket (RFC 6455 over HTTP/1.1 ``Upgrade``) through proxy-l7: builtin and HAProxy.

The backend is a tiny echo written here: the RFC 6455 handshake, then each frame the
client sends (masked) comes back unmasked. The proxy relays bytes after the 101.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from test_proxy_fixtures import (
    Backend_,
    haproxy_l7,
    header,
    l7_vip,
    loop_kind,  # noqa: F401 (autouse: every test on asyncio and on uvloop)
    read_response,
    run,
)
from v6lb.engines.metrics import metric_families
from v6lb.engines.proxy import ProxyServer
from v6lb.model.config import Timeouts, TlsCertificate, TlsOptions
from v6lb.model.status import InstanceStatus, ProxySection, ProxyVipStatus

pytestmark = pytest.mark.timeout(60)
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def frame(op: int, payload: bytes, mask: bool = True) -> bytes:
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes([0x80 | op, bit | n])
    elif n < 65536:
        head = bytes([0x80 | op, bit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | op, bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _xor(payload, key)


def _xor(data: bytes, key: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


async def read_frame(r: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await r.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await r.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await r.readexactly(8), "big")
    key = await r.readexactly(4) if b1 & 0x80 else b""
    payload = await r.readexactly(n)
    return b0 & 0x0F, _xor(payload, key) if key else payload


class WsEcho(Backend_):
    """HTTP/1.1 backend: a websocket upgrade is switched (echo), ``/refuse`` gets a 400,
    a plain request a 200 ``plain``. Records each head and how each tunnel ended."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.ended: list[str] = []
        super().__init__(self._serve)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            key = header(head, "Sec-WebSocket-Key")
            if key and head.startswith(b"GET /refuse "):
                w.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nno")
            elif key and "websocket" in header(head, "Upgrade")[0].lower():
                w.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                    + accept(key[0].encode())
                    + b"\r\n\r\n"
                )
                await self._echo(r, w)
                return
            else:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
            await w.drain()

    async def _echo(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                op, payload = await read_frame(r)
                w.write(frame(op, payload, mask=False))
                await w.drain()
                if op == 8:  # close: echoed, then our side ends
                    self.ended.append("close")
                    return
        except asyncio.IncompleteReadError:
            self.ended.append("eof")


def upgrade_request(path: str = "/chat", key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==") -> bytes:
    return (
        (
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
        ).encode()
        + key
        + b"\r\n\r\n"
    )


async def session(r: asyncio.StreamReader, w: asyncio.StreamWriter, be: WsEcho) -> None:
    """Handshake (a frame sent with the request, before the 101), a text frame, 1 MB in
    64 KiB binary frames written all at once (backpressure), then a close that ends both."""
    key = base64.b64encode(os.urandom(16))
    w.write(upgrade_request(key=key) + frame(1, b"early"))  # the new protocol's first bytes
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert header(head, "Sec-WebSocket-Accept") == [accept(key).decode()]
    seen = be.heads[-1]
    assert header(seen, "Upgrade") == ["websocket"]
    assert "upgrade" in header(seen, "Connection")[0].lower()
    assert header(seen, "Sec-WebSocket-Key") == [key.decode()]
    assert header(seen, "X-Forwarded-For") == ["::1"]
    assert await asyncio.wait_for(read_frame(r), 5) == (1, b"early")
    w.write(frame(1, b"hello"))
    assert await asyncio.wait_for(read_frame(r), 5) == (1, b"hello")
    blob = os.urandom(1 << 20)
    chunks = [blob[i : i + 65536] for i in range(0, len(blob), 65536)]
    w.write(b"".join(frame(2, c) for c in chunks))
    got = [await asyncio.wait_for(read_frame(r), 10) for _ in chunks]
    assert got == [(2, c) for c in chunks]
    w.write(frame(8, b"\x03\xe8"))
    if w.can_write_eof():  # a half-close goes through too (not over asyncio's TLS)
        w.write_eof()
    assert await asyncio.wait_for(read_frame(r), 5) == (8, b"\x03\xe8")
    assert await asyncio.wait_for(r.read(), 5) == b""  # the backend's end reached the client
    w.close()


async def _until(cond: Any, limit: float = 5.0) -> None:
    for _ in range(int(limit / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    assert cond()


def test_builtin_websocket_echo_refusal_and_idle_timeout() -> None:
    async def main() -> None:
        be = await WsEcho().start()
        quiet = l7_vip([be.port], name="quiet", timeouts=Timeouts(connect=2.0, idle=0.5))
        async with ProxyServer([l7_vip([be.port]), quiet]) as s:
            port = s.addresses("web")[0][1]
            await session(*await asyncio.open_connection("::1", port), be)
            assert be.ended == ["close"]
            c = s.counters()["web"]
            await _until(lambda: s.counters()["web"]["active"] == 0)
            assert c["interim"] == {"upgraded": 1} and c["errors"] == {}
            assert s.status()[0]["interim"] == {"upgraded": 1}  # v6lb status
            model = InstanceStatus(proxy=ProxySection(vips=[ProxyVipStatus.from_dict(v)
                                                            for v in s.status()]))  # fmt: skip
            samples = {
                (x.name, tuple(sorted(x.labels.items()))): x.value
                for fam in metric_families(model)
                for x in fam.samples
            }
            key = (("kind", "upgraded"), ("mode", "proxy-l7"), ("vip", "web"))
            assert samples[("v6lb_proxy_interim_responses_total", key)] == 1
            # backpressure: 8 MB sent to a client that does not read; the proxy holds little
            r, w = await asyncio.open_connection("::1", port)
            w.write(upgrade_request())
            await r.readuntil(b"\r\n\r\n")
            blob = os.urandom(65536)
            w.write(frame(2, blob) * 128)
            await asyncio.sleep(0.5)
            (c,) = s.runtimes["web"].live
            assert 0 < c.buffered() <= 4 * s.write_high  # both sides paused
            for _ in range(128):
                assert await asyncio.wait_for(read_frame(r), 10) == (2, blob)
            w.close()
            await _until(lambda: s.counters()["web"]["active"] == 0)
            r, w = await asyncio.open_connection("::1", port)
            w.write(upgrade_request("/refuse") + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(r))[::2] == (400, b"no")
            assert (await read_response(r))[::2] == (200, b"plain")
            assert be.heads[-1].startswith(b"GET /next ")
            assert b"upgrade" not in be.heads[-1].lower()
            w.close()
            # an h2c upgrade stays a plain request, Upgrade removed
            r, w = await asyncio.open_connection("::1", port)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
            assert (await read_response(r))[::2] == (200, b"plain")
            assert b"upgrade" not in be.heads[-1].lower()
            w.close()
            assert s.counters()["web"]["interim"] == {"upgraded": 2}
            # a silent tunnel closes after the VIP's idle timeout (0.5 s), both sides
            r, w = await asyncio.open_connection("::1", s.addresses("quiet")[0][1])
            w.write(upgrade_request())
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101 ")
            assert await asyncio.wait_for(r.read(), 3) == b""
            w.close()
            await _until(lambda: be.ended[-1:] == ["eof"])
            q = s.counters()["quiet"]
            assert q["errors"] == {"idle_timeout": 1} and q["interim"] == {"upgraded": 1}
        await be.stop()

    run(main())


def test_builtin_wss_through_a_tls_vip(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("www.example.com")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "www.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "www.key"))
    tls = TlsOptions(
        certificates=(TlsCertificate(str(tmp_path / "www.crt"), str(tmp_path / "www.key")),)
    )

    async def main() -> None:
        be = await WsEcho().start()
        base = l7_vip([be.port])
        vip = dataclasses.replace(base, options=dataclasses.replace(base.options, tls=tls))
        async with ProxyServer([vip]) as s:
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            r, w = await asyncio.open_connection(
                "::1", s.addresses("web")[0][1], ssl=ctx, server_hostname="www.example.com"
            )
            await session(r, w, be)
            assert header(be.heads[-1], "X-Forwarded-Proto") == ["https"]
            assert s.counters()["web"]["interim"] == {"upgraded": 1}
        await be.stop()

    run(main())


@pytest.mark.tool
@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_websocket_echo_agrees(tmp_path: Path) -> None:
    """The same session through HAProxy 2.6 (the test's client runs on either loop)."""

    async def main() -> None:
        be = await WsEcho().start()
        try:
            async with haproxy_l7(tmp_path, be.port) as port:
                await session(*await asyncio.open_connection("::1", port), be)
                assert be.ended[-1] == "close"
        finally:
            await be.stop()

    run(main())
