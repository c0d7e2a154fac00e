"""HTTP/2 from clients (TLS, ALPN h2) on proxy-l7: the builtin engine on loopback driven by
the ``h2`` library as a client (streams, forwarding headers, flow control, the stream
limit, GOAWAY on a graceful stop), and the bad-input list (rapid reset, CONTINUATION
flood, SETTINGS flood, HPACK bomb, WINDOW_UPDATE overflow, a stream after GOAWAY) sent
as raw frames to the builtin engine and to HAProxy 2.6 rendered from the same VIP;
WebSocket over HTTP/2 (RFC 8441) through both."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import trustme
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from test_proxy_fixtures import (
    LO,
    HttpBackend,
    header,
    l7_vip,
    loop_kind,  # noqa: F401 (autouse: every test on asyncio and on uvloop)
    run,
)
from v6lb.engines.proxy import ProxyServer
from v6lb.engines.proxy.h2 import reset_limit
from v6lb.engines.proxy.haproxy_run import tls_texts
from v6lb.model.config import Timeouts, TlsCertificate, TlsOptions, parse_config
from v6lb.render.haproxy import render_haproxy

pytestmark = [pytest.mark.timeout(90), pytest.mark.tool]

STREAMS = 8  # max_concurrent_streams of the VIPs under test


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("www.example.com")
    cert.cert_chain_pems[0].write_to_path(str(d / "www.crt"))
    cert.private_key_pem.write_to_path(str(d / "www.key"))
    return {"ca": ca, "dir": d}


class Backend(HttpBackend):
    """HttpBackend that also reads a chunked request body (HTTP/2 bodies without a length)."""

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            n = int((header(head, "content-length") or ["0"])[0])
            if n:
                self.bodies.append(await r.readexactly(n))
            elif header(head, "transfer-encoding") == ["chunked"]:
                body = b""
                while size := int(await r.readuntil(b"\r\n"), 16):
                    body += (await r.readexactly(size + 2))[:-2]
                await r.readuntil(b"\r\n")
                self.bodies.append(body)
            if self.delay:
                await asyncio.sleep(self.delay)
            body = self.name.encode() + b"x" * self.body_size
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await w.drain()

    def __init__(self, name: str, delay: float = 0.0, body_size: int = 0) -> None:
        super().__init__(name, delay, body_size)
        self.bodies: list[bytes] = []


def _vip(pki: dict[str, Any], port: int, **kw: Any) -> Any:
    base = l7_vip([port], **kw)
    tls = TlsOptions(
        certificates=(TlsCertificate(str(pki["dir"] / "www.crt"), str(pki["dir"] / "www.key")),),
        alpn=("h2", "http/1.1"),
    )
    opts = dataclasses.replace(base.options, tls=tls, max_concurrent_streams=STREAMS)
    return dataclasses.replace(base, options=opts)


class Client:
    """An HTTP/2 client connection over TLS: the h2 library, or raw frames."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, window: int) -> None:
        self.r, self.w = r, w
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(cfg)
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self.h2.initiate_connection()
        self.flush()
        self.remote: dict[int, int] = {}
        self.bodies: dict[int, bytearray] = {}
        self.tunnels: set[int] = set()  # streams whose body does not end the stream
        self.terminated: tuple[int | None, int | None] | None = None
        self.frames: list[Frame] = []  # what goaway() read so far

    @classmethod
    async def open(cls, port: int, pki: dict[str, Any], window: int = 65535) -> Client:
        ctx = ssl.create_default_context()
        pki["ca"].configure_trust(ctx)
        ctx.set_alpn_protocols(["h2"])
        r, w = await asyncio.open_connection(
            "::1", port, ssl=ctx, server_hostname="www.example.com"
        )
        assert w.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        return cls(r, w, window)

    def flush(self) -> None:
        self.w.write(self.h2.data_to_send())

    async def events(self, timeout: float = 5.0) -> list[Any]:
        data = await asyncio.wait_for(self.r.read(65536), timeout)
        if not data:
            return [None]
        out = self.h2.receive_data(data)
        for ev in out:
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                self.remote.update({k: v.new_value for k, v in ev.changed_settings.items()})
        self.flush()
        return out

    async def request(self, method: str, path: str, body: bytes = b"", length: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        hdrs = [(":method", method), (":scheme", "https"), (":authority", "www.example.com")]
        hdrs += [(":path", path), ("x-forwarded-for", "192.0.2.66"), ("cookie", "a=1")]
        hdrs += [("cookie", "b=2")]
        if body and length:
            hdrs.append(("content-length", str(len(body))))
        self.h2.send_headers(sid, hdrs, end_stream=not body)
        if body:
            self.bodies[sid] = bytearray(body)
        self.pump()
        return sid

    def pump(self) -> None:
        """Send what the server's windows allow of the request bodies."""
        for sid, rest in list(self.bodies.items()):
            n = min(len(rest), self.h2.local_flow_control_window(sid), 16384)
            while n > 0:
                end = n == len(rest) and sid not in self.tunnels
                self.h2.send_data(sid, bytes(rest[:n]), end_stream=end)
                del rest[:n]
                n = min(len(rest), self.h2.local_flow_control_window(sid), 16384)
            if not rest:
                del self.bodies[sid]
        self.flush()

    async def responses(self, sids: set[int]) -> dict[int, tuple[dict[bytes, bytes], bytes]]:
        got: dict[int, tuple[dict[bytes, bytes], bytearray]] = {}
        done: set[int] = set()
        while not sids <= done:
            for ev in await self.events():
                assert ev is not None, "closed"
                if isinstance(ev, h2.events.ResponseReceived):
                    got[ev.stream_id] = (dict(ev.headers), bytearray())
                elif isinstance(ev, h2.events.DataReceived):
                    got[ev.stream_id][1].extend(ev.data)
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    done.add(ev.stream_id)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.terminated = (ev.error_code, ev.last_stream_id)
                elif isinstance(ev, h2.events.StreamReset):
                    raise AssertionError(f"stream {ev.stream_id} reset: {ev.error_code}")
            self.pump()
        return {k: (h, bytes(b)) for k, (h, b) in got.items()}

    def raw(self, *frames: Frame | bytes) -> None:
        self.w.write(b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames))

    async def goaway(self, timeout: float = 5.0, to_eof: bool = False) -> tuple[int, list[Frame]]:
        """Raw frames until the server's GOAWAY (``to_eof``: until the connection closes);
        the GOAWAY's error code (-1: none) and the other frames."""
        buf = bytearray()
        seen = self.frames = []
        code = -1
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = await self.r.read(65536)
                except (ConnectionResetError, ssl.SSLError):
                    data = b""
                buf += data
                while len(buf) >= 9:
                    f, length = Frame.parse_frame_header(memoryview(buf[:9]))
                    if len(buf) < 9 + length:
                        break
                    f.parse_body(memoryview(buf[9 : 9 + length]))
                    del buf[: 9 + length]
                    if isinstance(f, GoAwayFrame):
                        code = f.error_code
                        if not to_eof:
                            return code, seen
                        continue
                    seen.append(f)
                if not data:
                    return code, seen

    async def closed(self) -> bool:
        try:
            async with asyncio.timeout(5):
                while await self.r.read(65536):
                    pass
        except (ConnectionResetError, ssl.SSLError):
            pass
        return True


def _headers(sid: int, enc: Encoder, end: bool = True, **extra: str) -> HeadersFrame:
    block = enc.encode(
        [(":method", "GET"), (":scheme", "https"), (":authority", "x"), (":path", "/"),
         *extra.items()]
    )  # fmt: skip
    flags = ["END_HEADERS"] + (["END_STREAM"] if end else [])
    return HeadersFrame(sid, block, flags=flags)


def test_builtin_h2_streams_forwarding_flow_control_goaway(pki: dict[str, Any]) -> None:
    """Concurrent streams on pooled HTTP/1.1 connections, forwarding headers, a chunked
    upload, the client's small window respected, SETTINGS, GOAWAY on a graceful stop."""

    async def main() -> None:
        be = await Backend("b0", body_size=200_000).start()
        with socket.socket(socket.AF_INET6) as sk:  # a port nothing listens on
            sk.bind(("::1", 0))
            dead = int(sk.getsockname()[1])
        big = await Backend("big", body_size=20_000_000).start()
        vips = [_vip(pki, be.port), _vip(pki, dead, name="dead"), _vip(pki, big.port, name="big")]
        async with ProxyServer(vips) as s:
            # a client that asks for 20 MB and reads nothing: the proxy holds its window's
            # worth, not the response (its backend's reading pauses)
            c = await Client.open(s.addresses("big")[0][1], pki)
            await c.request("GET", "/big")
            for _ in range(50):  # until the response flows
                if s.buffered():
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # then the backend has long filled what it may
            held = s.buffered()
            assert 0 < held < 1 << 20, held
            c.w.close()
            # a backend that refuses: 502 on the stream, the connection goes on
            c = await Client.open(s.addresses("dead")[0][1], pki)
            sids = [await c.request("GET", "/a"), await c.request("POST", "/b", b"x" * 10)]
            got = await c.responses(set(sids))
            assert [got[i][0][b":status"] for i in sids] == [b"502", b"502"]
            assert got[sids[0]][1] == b"502 Bad Gateway\n"
            assert s.counters()["dead"]["errors"] == {"connect_failed": 2}
            c.w.close()
            port = s.addresses("web")[0][1]
            c = await Client.open(port, pki, window=16384)
            head = await c.request("HEAD", "/head")  # (the backend sends a body anyway)
            hgot = await c.responses({head})
            assert hgot[head][0][b"content-length"] == b"200002" and hgot[head][1] == b""
            sids = {await c.request("GET", f"/g{i}") for i in range(4)}
            post = await c.request("POST", "/up", b"u" * 70_000)  # over one stream window
            chunked = await c.request("PUT", "/chunked", b"c" * 1000, length=False)
            got = await c.responses(sids | {post, chunked})
            assert c.remote[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == STREAMS
            assert c.remote[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] == 1
            for _sid, (hdrs, body) in got.items():
                assert hdrs[b":status"] == b"200" and body == b"b0" + b"x" * 200_000
                assert int(hdrs[b"content-length"]) == len(body)
                assert not {b"connection", b"keep-alive", b"transfer-encoding"} & set(hdrs)
            heads = {h.split(b" ")[1]: h for h in be.heads}
            assert len(heads) == 7
            g0 = heads[b"/g0"]
            assert g0.startswith(b"GET /g0 HTTP/1.1\r\n")
            assert header(g0, "host") == ["www.example.com"]
            assert header(g0, "cookie") == ["a=1; b=2"]
            assert header(g0, "x-forwarded-for") == ["::1"]  # the client's own is dropped
            assert header(g0, "x-forwarded-proto") == ["https"]
            assert header(g0, "forwarded")[0].endswith(";proto=https")
            assert header(heads[b"/up"], "content-length") == ["70000"]
            assert header(heads[b"/chunked"], "transfer-encoding") == ["chunked"]
            assert sorted(be.bodies) == [b"c" * 1000, b"u" * 70_000]
            # a graceful stop: GOAWAY (NO_ERROR) naming the last stream, then closed
            c.w.close()
            # a graceful stop: GOAWAY (NO_ERROR) naming the last stream, which is served
            c = await Client.open(port, pki, window=1 << 20)
            c.h2.increment_flow_control_window(1 << 20)
            late = await c.request("GET", "/late")
            await asyncio.sleep(0.05)
            s.quiesce()
            code, frames = await c.goaway(to_eof=True)
            assert code == ErrorCodes.NO_ERROR
            data = b"".join(f.data for f in frames if isinstance(f, DataFrame))
            assert data == b"b0" + b"x" * 200_000
            assert "END_STREAM" in frames[-1].flags and frames[-1].stream_id == late
            c.w.close()
            st = s.counters()["web"]
            assert st["requests"] >= 7 and st["errors"] == {}, st
            pooled = st["backends"][next(iter(st["backends"]))]
            assert pooled["connections"] <= 7
        await be.stop()
        await big.stop()

    run(main())


async def _code(c: Client) -> int | str:
    """The GOAWAY's code, or the server going on without one (within a second): "none",
    and the codes of the RST_STREAM frames it sent if any."""
    c.frames = []
    try:
        return (await c.goaway(1.0))[0]
    except TimeoutError:
        codes = sorted({f.error_code for f in c.frames if isinstance(f, RstStreamFrame)})
        return f"none, RST_STREAM {codes}" if codes else "none"


async def _attacks(port: int, pki: dict[str, Any], be: Backend) -> dict[str, Any]:
    """Each bad input on a fresh connection; what the server answered (GOAWAY codes)."""
    out: dict[str, Any] = {}
    # rapid reset (CVE-2023-44487): open and reset streams in a loop
    c = await Client.open(port, pki)
    enc = Encoder()
    frames: list[Frame] = []
    for i in range(reset_limit(STREAMS) + 50):
        sid = 2 * i + 1
        frames += [_headers(sid, enc), RstStreamFrame(sid, error_code=ErrorCodes.CANCEL)]
    n = len(be.heads)
    c.raw(*frames)
    out["rapid_reset"] = await _code(c)
    out["rapid_reset_forwarded"] = len(be.heads) - n
    # more streams at once than max_concurrent_streams (once our SETTINGS are acknowledged)
    c = await Client.open(port, pki)
    await c.events()
    enc = c.h2.encoder
    c.raw(*(_headers(2 * i + 1, enc, end=False) for i in range(STREAMS + 1)))
    out["streams"] = await _code(c)
    # CONTINUATION flood: a header block that never ends
    c = await Client.open(port, pki)
    block = Encoder().encode([(":method", "GET"), (":scheme", "https"), (":path", "/")])
    c.raw(HeadersFrame(1, block))
    c.raw(*(ContinuationFrame(1, b"\x40\x01a\x01b" * 20) for _ in range(2000)))  # 200 KB
    out["continuation"] = await _code(c)
    # SETTINGS flood: each one asks for an ACK
    c = await Client.open(port, pki)
    c.raw(*(SettingsFrame(0, settings={4: 65535}) for _ in range(5000)))
    out["settings"] = await _code(c)
    # a huge header list: 4 KiB once in the HPACK table, then referenced 400 times
    c = await Client.open(port, pki)
    enc = Encoder()
    big = [("x-big", "v" * 4000)] * 400  # 1.6 MB decoded from a block of about 4.4 KB
    block = enc.encode([(":method", "GET"), (":scheme", "https"), (":path", "/"), *big])
    assert len(block) < 16384
    c.raw(HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"]))
    out["header_list"] = await _code(c)
    # WINDOW_UPDATE overflow of the connection window
    c = await Client.open(port, pki)
    c.raw(WindowUpdateFrame(0, window_increment=(1 << 31) - 1))
    c.raw(WindowUpdateFrame(0, window_increment=(1 << 31) - 1))
    out["window"] = await _code(c)
    # a CR LF in a field value (header injection into the HTTP/1.1 head): refused
    c = await Client.open(port, pki)
    n = len(be.heads)
    c.raw(_headers(1, Encoder(), **{"x-a": "1\r\nx-injected: 1"}))
    out["crlf"] = await _code(c)
    out["crlf_forwarded"] = len(be.heads) - n
    # WINDOW_UPDATE overflow of one stream's window
    c = await Client.open(port, pki)
    c.raw(_headers(1, Encoder(), end=False))
    c.raw(WindowUpdateFrame(1, window_increment=(1 << 31) - 1))
    out["stream_window"] = await _code(c)
    # DATA on a stream both sides closed: ignored (its bytes still count against the
    # connection window, then are acknowledged), the connection goes on
    c = await Client.open(port, pki)
    await c.responses({await c.request("GET", "/")})
    c.raw(DataFrame(1, b"late" * 1000, flags=["END_STREAM"]))
    got = await c.responses({await c.request("GET", "/next")})
    out["closed_stream"] = [h[b":status"] for h, _ in got.values()]
    return out


def test_builtin_h2_bad_input(pki: dict[str, Any]) -> None:
    async def main() -> None:
        be = await Backend("b0").start()
        slow = await Backend("slow", delay=1.0).start()
        idle = Timeouts(connect=2.0, idle=0.5)  # the slow backend answers after 1 s
        vips = [_vip(pki, be.port), _vip(pki, slow.port, name="slow")]
        vips.append(_vip(pki, slow.port, name="late", timeouts=idle))
        async with ProxyServer(vips, header_timeout=1.0) as s:
            port = s.addresses("web")[0][1]
            silent = await Client.open(port, pki)  # a preface, SETTINGS, then nothing
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            waiting = asyncio.ensure_future(silent.goaway(5.0, to_eof=True))
            ended: list[float] = []
            waiting.add_done_callback(lambda _: ended.append(loop.time() - t0))
            got = await _attacks(port, pki, be)
            code, _ = await waiting  # the header timeout (1 s): GOAWAY, then closed
            assert code == ErrorCodes.NO_ERROR
            assert 1.0 <= ended[0] < 4.0, ended
            assert got["rapid_reset"] == ErrorCodes.ENHANCE_YOUR_CALM
            assert got["rapid_reset_forwarded"] <= reset_limit(STREAMS)
            assert got["continuation"] == ErrorCodes.ENHANCE_YOUR_CALM
            assert got["streams"] == f"none, RST_STREAM [{int(ErrorCodes.REFUSED_STREAM)}]"
            assert got["settings"] == ErrorCodes.ENHANCE_YOUR_CALM
            assert got["header_list"] == ErrorCodes.ENHANCE_YOUR_CALM
            assert got["window"] == ErrorCodes.FLOW_CONTROL_ERROR
            assert got["crlf"] == ErrorCodes.PROTOCOL_ERROR and got["crlf_forwarded"] == 0
            flow = int(ErrorCodes.FLOW_CONTROL_ERROR)
            assert got["stream_window"] == f"none, RST_STREAM [{flow}]", got
            assert got["closed_stream"] == [b"200"], got
            # the client resets a stream at the backend: that backend connection ends, the
            # next stream is served; a backend silent for timeouts.idle: 504
            c = await Client.open(s.addresses("slow")[0][1], pki)
            gone = await c.request("GET", "/reset")
            await asyncio.sleep(0.1)
            c.h2.reset_stream(gone, ErrorCodes.CANCEL)
            c.flush()
            again = await c.request("GET", "/again")
            assert (await c.responses({again}))[again][1] == b"slow"
            c.w.close()
            c = await Client.open(s.addresses("late")[0][1], pki)
            late = await c.request("GET", "/late")
            assert (await c.responses({late}))[late][0][b":status"] == b"504"
            c.w.close()
            # a disabled backend (v6lb ctl): the stream it serves is answered 502
            c = await Client.open(s.addresses("slow")[0][1], pki)
            cut = await c.request("GET", "/cut")
            await asyncio.sleep(0.1)
            s.set_enabled("slow", 0, False)
            assert (await c.responses({cut}))[cut][0][b":status"] == b"502"
            s.set_enabled("slow", 0, True)
            c.w.close()
            # a new stream after a graceful GOAWAY: refused, never forwarded; the one
            # before it is served
            c = await Client.open(s.addresses("slow")[0][1], pki)
            first = await c.request("GET", "/first")
            await asyncio.sleep(0.1)
            s.quiesce()
            code, _ = await c.goaway()
            assert code == ErrorCodes.NO_ERROR
            c.raw(_headers(3, c.h2.encoder))
            _, frames = await c.goaway(to_eof=True)
            rst = [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)]
            assert rst == [(3, ErrorCodes.REFUSED_STREAM)]
            ends = [f.stream_id for f in frames if "END_STREAM" in f.flags]
            assert ends == [first]
            errors = s.counters()["web"]["errors"]
            slow_errors = s.counters()["slow"]["errors"]
            late_errors = s.counters()["late"]["errors"]
        assert [h.split(b" ")[1] for h in slow.heads] == [
            b"/reset", b"/again", b"/late", b"/cut", b"/first"
        ]  # fmt: skip
        assert slow_errors == {
            "client_reset": 1, "h2_stream_after_goaway": 1, "backend_disabled": 1
        }, slow_errors  # fmt: skip
        assert late_errors == {"response_timeout": 1}, late_errors
        for reason in (
            "h2_rapid_reset",
            "h2_continuation_flood",
            "h2_settings_flood",
            "h2_header_list_too_large",
            "h2_flow_control_error",
            "h2_refused_stream",
            "h2_protocol_error",
            "header_timeout",
        ):
            assert errors.get(reason) == 1, errors
        await be.stop()
        await slow.stop()

    run(main())


@asynccontextmanager
async def _haproxy(tmp_path: Path, pki: dict[str, Any], backend_port: int) -> AsyncIterator[int]:
    """HAProxy 2.6 serving the same proxy-l7 TLS VIP (h2, max_concurrent_streams) on [::1]."""
    with socket.socket(socket.AF_INET6) as sk:
        sk.bind(("::1", 0))
        port = int(sk.getsockname()[1])
    d = pki["dir"]
    config = parse_config(
        {"vips": [{"name": "web", "address": "fd00:5::1", "ports": [port],
                   "mode": "proxy-l7", "scheduler": "round-robin",
                   "health": {"type": "none"}, "max_concurrent_streams": STREAMS,
                   "tls": {"certificates": [{"cert": str(d / "www.crt"),
                                             "key": str(d / "www.key")}]},
                   "backends": [{"address": "::1", "port": backend_port}]}]},
        str(tmp_path / "lb.yaml"),
    )  # fmt: skip
    config = dataclasses.replace(config, vips=(dataclasses.replace(config.vips[0], address=LO),))
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for path, data in tls_texts(config, str(tls_dir)).items():
        Path(path).write_bytes(data)
    cfg = tmp_path / "haproxy.cfg"
    text = render_haproxy(config, tls_dir=str(tls_dir))
    assert f"tune.h2.max-concurrent-streams {STREAMS}" in text and "alpn h2,http/1.1" in text
    cfg.write_text(text)
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stderr=subprocess.PIPE)
    try:
        for _ in range(50):
            try:
                socket.create_connection(("::1", port), timeout=0.1).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_haproxy_h2_same_limits_and_bad_input(pki: dict[str, Any], tmp_path: Path) -> None:

    async def main() -> None:
        be = await Backend("b0", body_size=200_000).start()
        async with _haproxy(tmp_path, pki, be.port) as port:
            c = await Client.open(port, pki, window=16384)
            sids = {await c.request("GET", f"/g{i}") for i in range(4)}
            got = await c.responses(sids)
            assert c.remote[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == STREAMS
            assert all(b == b"b0" + b"x" * 200_000 for _, b in got.values())
            # both engines offer WebSocket over HTTP/2 (RFC 8441)
            assert c.remote[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] == 1
            g0 = next(h for h in be.heads if h.startswith(b"GET /g0 "))
            assert header(g0, "x-forwarded-for") == ["::1"]
            assert header(g0, "forwarded")[0].endswith(";proto=https")
            got = await _attacks(port, pki, be)
        # HAProxy 2.6: no GOAWAY for rapid reset or a SETTINGS flood (it goes on, each
        # bounded by its buffers), REFUSED_STREAM beyond the stream limit, INTERNAL_ERROR
        # for a header block over its buffer, COMPRESSION_ERROR for the HPACK bomb
        assert got["rapid_reset"] == "none" and got["settings"] == "none", got
        assert got["rapid_reset_forwarded"] <= reset_limit(STREAMS) + 50
        assert got["streams"] == f"none, RST_STREAM [{int(ErrorCodes.REFUSED_STREAM)}]", got
        assert got["continuation"] == ErrorCodes.INTERNAL_ERROR
        assert got["header_list"] == ErrorCodes.COMPRESSION_ERROR
        assert got["window"] == ErrorCodes.FLOW_CONTROL_ERROR
        assert got["crlf"] == ErrorCodes.COMPRESSION_ERROR and got["crlf_forwarded"] == 0
        assert got["stream_window"] == f"none, RST_STREAM [{int(ErrorCodes.FLOW_CONTROL_ERROR)}]"
        assert got["closed_stream"] == [b"200"]
        await be.stop()

    run(main())


def test_max_concurrent_streams_config(tmp_path: Path) -> None:
    """The knob: parsed, dumped back, rendered for HAProxy; a bad value names the field."""
    from v6lb.model.config import ConfigError
    from v6lb.model.config_dump import dump

    raw = {"name": "web", "address": "2001:db8::10", "ports": [443], "mode": "proxy-l7",
           "backends": [{"address": "2001:db8::20", "port": 80}],
           "tls": {"certificates": [{"cert": "a.crt", "key": "a.key"}]}}  # fmt: skip
    c = parse_config({"vips": [{**raw, "max_concurrent_streams": 32}]}, "/etc/v6lb/lb.yaml")
    assert c.vips[0].options.max_concurrent_streams == 32
    assert "max_concurrent_streams: 32" in dump(c)
    assert "tune.h2.max-concurrent-streams 32" in render_haproxy(c, tls_dir="/run/x")
    off = {**raw, "tls": {**raw["tls"], "alpn": ["http/1.1"]}}  # no h2: nothing rendered
    text = render_haproxy(parse_config({"vips": [off]}, "/etc/v6lb/lb.yaml"), tls_dir="/x")
    assert "tune.h2" not in text and "alpn http/1.1 " in text
    for bad in (0, 10_001, "many"):
        with pytest.raises(ConfigError) as err:
            parse_config({"vips": [{**raw, "max_concurrent_streams": bad}]}, "/etc/lb.yaml")
        assert err.value.path.endswith("vips[0].max_concurrent_streams"), err.value


async def _ws_over_h2(port: int, pki: dict[str, Any], be: Any, early_data: bool = True) -> None:
    """RFC 8441: an extended CONNECT for websocket (with ``early_data``, a frame sent before
    the 200), an echo of a text frame and of 256 KiB of binary frames (flow control both
    ways), then a close that ends the stream."""
    from test_proxy_websocket import frame

    c = await Client.open(port, pki)
    while h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL not in c.remote:
        await c.events()
    assert c.remote[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] == 1
    sid = c.h2.get_next_available_stream_id()
    c.h2.send_headers(
        sid,
        [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
         (":path", "/chat"), (":authority", "www.example.com"),
         ("sec-websocket-version", "13")],
    )  # fmt: skip
    if early_data:
        c.h2.send_data(sid, frame(1, b"early"))  # before the 200: held, then relayed
    else:
        c.flush()
        await asyncio.sleep(0.2)
        c.h2.send_data(sid, frame(1, b"early"))
    c.flush()
    status = b""
    got = bytearray()
    ended = False

    async def until(n: int) -> None:
        nonlocal status, ended
        while len(got) < n and not ended:
            for ev in await c.events():
                assert ev is not None, "closed"
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers)[b":status"]
                elif isinstance(ev, h2.events.DataReceived):
                    got.extend(ev.data)
                    c.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded):
                    ended = True
                elif isinstance(ev, h2.events.StreamReset):
                    raise AssertionError(f"reset {ev.error_code}")
            c.pump()

    early = frame(1, b"early", mask=False)
    await until(len(early))
    assert status == b"200" and bytes(got) == early
    seen = be.heads[-1]
    assert seen.startswith(b"GET /chat HTTP/1.1\r\n"), seen
    assert header(seen, "upgrade") == ["websocket"] and header(seen, "sec-websocket-key")
    assert header(seen, "x-forwarded-for") == ["::1"]
    blob = os.urandom(1 << 18)
    chunks = [blob[i : i + 16384] for i in range(0, len(blob), 16384)]
    c.tunnels.add(sid)
    c.bodies[sid] = bytearray(b"".join(frame(2, x) for x in chunks))
    c.pump()
    want = len(early) + sum(len(frame(2, x, mask=False)) for x in chunks)
    await until(want)
    assert bytes(got[len(early) :]) == b"".join(frame(2, x, mask=False) for x in chunks)
    c.h2.send_data(sid, frame(8, b"\x03\xe8"), end_stream=True)
    c.flush()
    await until(want + 4)
    await until(want + 5)  # to the end of the stream
    assert ended and bytes(got[want:]) == frame(8, b"\x03\xe8", mask=False)
    c.w.close()


def test_websocket_over_h2_both_engines(pki: dict[str, Any], tmp_path: Path) -> None:
    from test_proxy_websocket import WsEcho

    async def main() -> None:
        be = await WsEcho().start()
        async with ProxyServer([_vip(pki, be.port)]) as s:
            await _ws_over_h2(s.addresses()[0][1], pki, be)
            await asyncio.sleep(0.1)
            st = s.counters()["web"]
            assert st["interim"] == {"upgraded": 1} and st["errors"] == {}, st
            assert list(st["backends"].values())[0]["active"] == 0
        async with _haproxy(tmp_path, pki, be.port) as port:
            # HAProxy 2.6 answers 500 to DATA sent before its 200: the frame waits here
            await _ws_over_h2(port, pki, be, early_data=False)
        assert be.ended == ["close", "close"]
        await be.stop()

    run(main())
