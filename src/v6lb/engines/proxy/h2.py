"""``proxy-l7`` over HTTP/2: clients that chose ``h2`` in ALPN, backends on HTTP/1.1 pools.

:class:`H2Client` takes over a TLS connection from :class:`~.l7.L7Client` once the
handshake picked ``h2`` (:attr:`.tls.TlsLayer.h2`), and speaks HTTP/2 with the
sans-IO ``h2`` library. Each stream is one request (:class:`H2Stream`): its head is
rewritten by the same :mod:`.policy` functions as HTTP/1.1 (forwarding headers,
``proto=https``) and sent on a pooled keep-alive backend connection
(:class:`~.l7.L7Upstream`), to which the stream is the client: it implements the
upstream's client interface (:class:`~.l7.UpstreamClient`: ``relay``,
``response_done``, ``backend_failed``, ``backend_full``, ``tunnel``, ``backend_eof``). The response is parsed with httptools, its
connection-specific headers dropped, and sent as HEADERS and DATA frames.

Request bodies stream: the head goes out at once (with the client's
``content-length``, else ``Transfer-Encoding: chunked``), DATA follows as it
comes, and the data is acknowledged (WINDOW_UPDATE) once written to a backend
connection whose write buffer is below the high mark, so what a client may send
ahead is its window: 64 KiB per stream and :data:`CONN_WINDOW` per connection.
Responses are sent within the client's windows; beyond :data:`HOLD` bytes held
for a stream, reading from its backend pauses. 1xx responses are not relayed.

WebSocket over HTTP/2 (RFC 8441): SETTINGS_ENABLE_CONNECT_PROTOCOL is announced; an
extended CONNECT with ``:protocol websocket`` goes to the backend as the HTTP/1.1
upgrade request it stands for (a fresh backend connection, a fresh
``Sec-WebSocket-Key``); the backend's 101 becomes a 200 and the stream's DATA the
websocket bytes both ways (:meth:`H2Stream.tunnel`; the upstream's tunnel path writes
to the stream as to a transport). DATA before the 200 wait, unacknowledged.

Limits and bad input (each counted under the VIP's errors, the connection then
closed with a GOAWAY carrying the code shown):

- ``max_concurrent_streams`` (SETTINGS); a stream beyond it is refused alone with
  RST_STREAM REFUSED_STREAM, never forwarded: ``h2_refused_stream``.
- Rapid reset (CVE-2023-44487): more than :func:`reset_limit` RST_STREAM frames from
  the client in one second: ``h2_rapid_reset`` (ENHANCE_YOUR_CALM).
- CONTINUATION flood: a header block over ``max_header_bytes`` + 16 KiB, or over
  :data:`MAX_CONTINUATIONS` CONTINUATION frames: ``h2_continuation_flood``
  (ENHANCE_YOUR_CALM), found by a scan of the frame headers before any is parsed.
- SETTINGS or PING flood: more than :data:`CONTROL_PER_SECOND` in one second:
  ``h2_settings_flood`` / ``h2_ping_flood`` (ENHANCE_YOUR_CALM).
- A header list that decodes to more than ``max_header_bytes``
  (SETTINGS_MAX_HEADER_LIST_SIZE; HPACK bomb): ``h2_header_list_too_large``
  (ENHANCE_YOUR_CALM, from h2's DenialOfServiceError).
- A WINDOW_UPDATE taking a window over 2^31-1: ``h2_flow_control_error``
  (FLOW_CONTROL_ERROR); on one stream h2 resets that stream only.
- Any other protocol error (a stream id going down, a frame on an idle stream...):
  ``h2_protocol_error`` and its code.
- A new stream after our GOAWAY (a graceful stop): refused with RST_STREAM
  REFUSED_STREAM, never forwarded: ``h2_stream_after_goaway``.

A graceful stop (:meth:`H2Client.quiesce`) sends GOAWAY (NO_ERROR, the last stream
id seen); the streams up to it are served, then the connection closes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import httptools
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from .l7 import L7Client, L7Request, L7Upstream, choose_backend, open_backend, pooled
from .policy import (
    build_request_head,
    client_forwarding,
    error_response,
    forwarding_block,
    is_trusted,
    untrusted_head,
)
from .runtime import VipRuntime, response_class

__all__ = [
    "CONN_WINDOW",
    "CONTROL_PER_SECOND",
    "H2Client",
    "H2Stream",
    "MAX_CONTINUATIONS",
    "reset_limit",
]

CONN_WINDOW: Final = 1 << 20  # the connection's receive window: request data held at most
STREAM_WINDOW: Final = 65535  # each stream's receive window (the protocol's default)
HOLD: Final = 65536  # response bytes held for a stream before its backend's reading pauses
MAX_CONTINUATIONS: Final = 32  # CONTINUATION frames in one header block
CONTROL_PER_SECOND: Final = 100  # SETTINGS, or PING, frames a client may send per second
_PREFACE: Final = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Response headers that are HTTP/1.1's connection management (RFC 9113 §8.2.2).
_CONNECTION_HEADERS: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
    }
)
_CODES: Final = {
    ErrorCodes.FLOW_CONTROL_ERROR: "h2_flow_control_error",
    ErrorCodes.FRAME_SIZE_ERROR: "h2_frame_size_error",
    ErrorCodes.COMPRESSION_ERROR: "h2_compression_error",
    ErrorCodes.ENHANCE_YOUR_CALM: "h2_header_list_too_large",
}


def reset_limit(max_streams: int) -> int:
    """RST_STREAM frames a client may send in one second before ENHANCE_YOUR_CALM."""
    return max(100, 2 * max_streams)


class _Settings(h2.settings.Settings):
    """Our SETTINGS as sent, but h2 never refuses a stream for the concurrent-stream
    limit itself (it would end the connection before decoding the HEADERS):
    :meth:`H2Client._request` refuses the extra stream alone, REFUSED_STREAM."""

    @property  # type: ignore[misc]
    def max_concurrent_streams(self) -> int:
        return 2**32 + 1


class _Rate:
    """Events in the current one-second window."""

    __slots__ = ("start", "n")

    def __init__(self) -> None:
        self.start = 0.0
        self.n = 0

    def hit(self, now: float) -> int:
        if now - self.start >= 1.0:
            self.start = now
            self.n = 0
        self.n += 1
        return self.n


class H2Stream:
    """One HTTP/2 request: the client of the :class:`~.l7.L7Upstream` serving it."""

    __slots__ = (
        "conn",
        "rt",
        "sid",
        "closed",
        "up",
        "backend",
        "attempts",
        "req",
        "t0",
        "parser",
        "head_only",
        "resp",
        "status",
        "sent_head",
        "out",
        "ended",
        "done",
        "pending",
        "req_end",
        "chunked",
        "unacked",
        "blen",
        "body_seen",
        "paused",
        "stamp",
        "seen",
        "nout",
        "ws",
        "tunneling",
        "t",
    )

    def __init__(self, conn: H2Client, sid: int, t0: float) -> None:
        self.conn = conn
        self.rt = conn.rt
        self.sid = sid
        self.closed = False  # reset or finished: nothing more to the client
        self.up: L7Upstream | None = None
        self.backend = -1
        self.attempts = 0
        self.req: L7Request | None = None
        self.t0 = t0
        self.parser: Any = None
        self.head_only = False
        self.resp: list[tuple[bytes, bytes]] | None = None  # response headers not yet sent
        self.status = 0
        self.sent_head = False
        self.out = bytearray()  # response body waiting for the client's window
        self.ended = False  # the response is complete (end_stream once ``out`` is sent)
        self.done = False  # the backend's part is over (response_done or failed)
        self.pending: list[bytes] = []  # request body come before the backend connection
        self.req_end = False  # the client's END_STREAM came
        self.chunked = False  # the body goes to the backend chunked (no content-length)
        self.unacked = 0  # request bytes forwarded but not yet acknowledged
        self.blen = 0  # request body bytes so far
        self.body_seen = False  # some request body bytes went to the backend
        self.paused = False  # reading from the backend paused (``out`` over write_high)
        self.stamp = 0.0
        self.seen = -1
        self.nout = 0
        self.ws = False  # an extended CONNECT for websocket (RFC 8441)
        self.tunneling = False  # its backend switched: DATA both ways is the new protocol

    # --- the upstream's client interface (see l7.L7Upstream) -------------------------

    def relay(self, data: bytes) -> None:
        """Response bytes from the backend (HTTP/1.1 framing): parsed into frames.

        In a tunnel (after a 101), the new protocol's bytes: DATA as they are.
        """
        if self.closed:
            return
        if self.tunneling:
            self.write(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            up = self.up
            if up is not None:
                up.keep = False
            self.backend_failed(up, "backend_bad_response", 502)
            return
        if self.resp is not None and not self.ended:
            self._send_head(False)
        self.conn.pump(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.resp is not None:
            self.resp.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.ended or self.sent_head:  # a second response: the upstream drops it
            return
        self.status = self.parser.get_status_code()
        resp = self.resp or []
        drop = set(_CONNECTION_HEADERS)
        for name, value in resp:
            if name == b"connection":
                drop.update(t.strip().lower() for t in value.split(b","))
        self.resp = [(b":status", b"%d" % self.status)] + [(n, v) for n, v in resp if n not in drop]
        if self.head_only:
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self.ended:
            return
        if self.resp is not None:
            self._send_head(False)
        self.out += body

    def on_message_complete(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.resp is not None:
            self._send_head(not self.out)

    def _send_head(self, end: bool) -> None:
        resp = self.resp
        self.resp = None
        if resp is None or self.closed:
            return
        self.sent_head = True
        self.conn.send_headers(self, resp, end)

    def tunnel(self, up: L7Upstream, head: bytes) -> None:
        """The backend switched to websocket (a 101): our 200, then DATA both ways."""
        if not self.ws:  # never asked for: the upstream refuses a 101 first
            self.backend_failed(up, "backend_switching_protocols", 502)
            return
        rt = self.rt
        rt.stats.interim["upgraded"] += 1
        rt.stats.responses[1] += 1
        rt.backend_stats[self.backend].responses[1] += 1
        rt.latency.observe(self.conn.loop.time() - self.t0)
        self.tunneling = True
        self.resp = None
        fields = [(b":status", b"200")]
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            low = name.strip().lower()
            if low in (b"sec-websocket-protocol", b"sec-websocket-extensions"):
                fields.append((low, value.strip()))
        self.sent_head = True
        self.conn.send_headers(self, fields, False)
        data = self.pending
        self.pending = []
        for chunk in data:  # what the client sent before the 200
            self.forward(chunk)
        if self.unacked:
            self.conn.ack(self)
        if self.req_end and up.t is not None and up.t.can_write_eof():
            up.t.write_eof()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.out += data
            self.conn.pump(self)

    def backend_eof(self) -> bool | None:
        """The backend half-closed the tunnel: END_STREAM once ``out`` is sent.

        None (the backend connection closes) when the client's side had ended too.
        """
        if not self.closed and not self.ended:
            self.ended = True
            self.conn.pump(self)
        return None if self.req_end else True

    def close(self, abort: bool = False, linger: float = 0.0) -> None:
        """The tunnel ends (its backend closed, or idle): the stream ends, or is reset."""
        if self.closed:
            return
        if abort:
            self.conn.reset(self, ErrorCodes.INTERNAL_ERROR)
            return
        self.ended = True
        up = self.up
        if up is not None and up.t is not None and not up.t.is_closing():
            up.t.close()
        self.conn.pump(self)

    def backend_full(self, full: bool) -> None:
        """The backend's write buffer crossed a mark: acknowledge held data once below."""
        if not full and self.unacked:
            self.conn.ack(self)

    def response_done(self, up: L7Upstream) -> None:
        rt = self.rt
        rt.picker.active[self.backend] -= 1
        k = response_class(up.status or self.status)
        rt.stats.responses[k] += 1
        rt.backend_stats[self.backend].responses[k] += 1
        rt.latency.observe(self.conn.loop.time() - self.t0)
        self.backend = -1
        self.up = None
        self.done = True
        if not self.req_end:  # the response came before the request's end: stop it
            up.keep = False
        if not self.ended:
            self.on_message_complete()
        if (self.paused or self.conn.paused) and up.t is not None:
            self.paused = False
            up.t.resume_reading()  # back to the pool reading (its next user may not pause)
        up.finish()
        if self.unacked:  # what a websocket request held for a tunnel that did not come
            self.conn.ack(self)
        self.conn.pump(self)

    def backend_failed(self, up: L7Upstream | None, reason: str, status: int) -> None:
        if up is not None and self.up is not up:
            return
        rt = self.rt
        index = self.backend
        self.up = None
        if up is not None:
            up.client = None
            up.keep = False
            rt.backend_stats[index].bytes_out += up.sent
            if up.t is not None:
                up.t.abort()
        if (
            reason == "backend_reset"
            and up is not None
            and up.reused
            and up.sent == 0
            and self.attempts == 0
            and not self.body_seen
            and self.req is not None
        ):  # a pooled connection the backend had closed: once more on a fresh one
            self.attempts = 1
            rt.picker.release(index)
            rt.stats.requests -= 1
            rt.idle[index].clear()
            self.conn.dispatch(self)
            return
        if index >= 0:
            rt.picker.release(index)
        self.backend = -1
        rt.error(reason, index)
        self.done = True
        if not self.sent_head and not self.closed:
            self.conn.answer(self, status)
        else:
            self.conn.reset(self, ErrorCodes.INTERNAL_ERROR)

    # --- to the backend -------------------------------------------------------------

    def start(self, up: L7Upstream) -> None:
        """A backend connection is ours: the head, then the body come so far."""
        assert self.req is not None
        self.up = up
        self.stamp = 0.0
        up.start(self, self.req)
        up.b.flush()  # the head goes now: this stream writes its body to up.t directly
        if self.pending and not self.ws:
            data = self.pending
            self.pending = []
            for chunk in data:
                self.forward(chunk)
        if self.unacked:
            self.conn.ack(self)

    def forward(self, chunk: bytes) -> None:
        """Request body bytes (b"": the end of a chunked body) to the backend."""
        up = self.up
        if up is None or up.t is None:
            self.pending.append(chunk)
            return
        if chunk:
            self.body_seen = True
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunk else b"0\r\n\r\n"
        else:
            data = chunk
        if data:
            self.rt.backend_stats[self.backend].bytes_in += len(data)
            up.t.write(data)

    def abandon(self) -> None:
        """The client reset the stream: its backend connection ends (not reusable)."""
        self.closed = True
        up = self.up
        self.up = None
        rt = self.rt
        if up is not None:
            up.client = None
            up.keep = False
            rt.backend_stats[self.backend].bytes_out += up.sent
            if up.t is not None:
                up.t.abort()
        if self.backend >= 0:
            rt.picker.release(self.backend)
            self.backend = -1
            rt.error("client_reset")
        self.done = True


class H2Client(asyncio.Protocol):
    """An HTTP/2 client connection (TLS with ALPN h2) of a proxy-l7 VIP."""

    def __init__(self, old: L7Client) -> None:
        rt = old.rt
        self.rt: VipRuntime = rt
        self.opts = rt.l7
        self.loop = old.loop
        self.t: Any = old.t
        self.client: IPv4Address | IPv6Address = old.client
        self.client_port = old.client_port
        self.listen_port = old.listen_port
        self.trusted = old.trusted
        self.ours = old.ours
        self.block = old.block
        self.proto = "https"
        self.backend = -1  # per stream here; the VIP's snapshot reads it
        self.closed = False
        self.goaway = False  # our graceful GOAWAY is out
        self.streams: dict[int, H2Stream] = {}
        self.nin = 0
        self.nout = 0
        self.stamp = 0.0
        self.idle_since = self.loop.time()
        self.paused = False  # the client's writes are paused (our write buffer is full)
        self.flush_due = False  # a flush is scheduled (_later)
        self.pick_gen = -1
        self.pick = -1
        # the frame-header scan (continuation, settings and ping floods)
        self.skip = _PREFACE  # bytes to pass over: the preface, then each frame's payload
        self.hpart = b""
        self.block_len = -1  # bytes of the header block being received (-1: none)
        self.conts = 0
        self.resets = _Rate()
        self.settings = _Rate()
        self.pings = _Rate()
        self.max_streams = rt.l7.max_concurrent_streams
        self.max_block = rt.l7.max_header_bytes + 16384
        # Inbound headers are validated (no CR, LF or NUL reaches an HTTP/1.1 head);
        # outbound ones come from httptools' parse of the backend's head, names lowercased.
        cfg = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=True,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.h2.local_settings = _Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: rt.l7.max_header_bytes,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,  # RFC 8441
            },
        )
        # the L7Client's place: its admission slot, its live entry
        old.closed = True
        rt.live.discard(old)
        rt.live.add(self)
        key = rt.source_of.pop(old, None)
        if key is not None:
            rt.source_of[self] = key
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONN_WINDOW - 65535)
        self._flush()

    @classmethod
    def take_over(cls, old: asyncio.Protocol) -> asyncio.Protocol:
        """For :class:`.tls.TlsLayer`: the HTTP/2 protocol in place of an L7Client."""
        assert isinstance(old, L7Client)
        if old.closed:  # refused at admission
            return old
        return cls(old)

    # --- from the client ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        self.t = transport  # the TlsLayer was the L7Client's already

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.nin += len(data)
        abuse = self._scan(data)
        if abuse is not None:
            self._fail(abuse, ErrorCodes.ENHANCE_YOUR_CALM)
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            code = ErrorCodes(getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR))
            self._fail(_CODES.get(code, "h2_protocol_error"), code)
            return
        for ev in events:
            if self.closed:
                return
            kind = type(ev)
            if kind is h2.events.DataReceived:
                self._data(ev)  # type: ignore[arg-type]
            elif kind is h2.events.RequestReceived:
                self._request(ev)  # type: ignore[arg-type]
            elif kind is h2.events.StreamEnded:
                self._ended(ev.stream_id)  # type: ignore[attr-defined]
            elif kind is h2.events.WindowUpdated:
                sid = ev.stream_id  # type: ignore[attr-defined]
                if sid:
                    s = self.streams.get(sid)
                    if s is not None:
                        self.pump(s)
                else:
                    for s in list(self.streams.values()):
                        self.pump(s)
            elif kind is h2.events.StreamReset:
                s = self.streams.pop(ev.stream_id, None)  # type: ignore[attr-defined]
                if s is not None:
                    s.abandon()
            elif kind is h2.events.ConnectionTerminated:
                self.close()
                return
        self._later()

    def _scan(self, data: bytes) -> str | None:
        """Walk the frame headers: the floods h2 would buffer or answer before we see them."""
        i = 0
        n = len(data)
        now = -1.0
        while i < n:
            if self.skip:
                k = min(self.skip, n - i)
                self.skip -= k
                i += k
                continue
            if self.hpart or n - i < 9:
                need = 9 - len(self.hpart)
                self.hpart += data[i : i + need]
                i += need
                if len(self.hpart) < 9:
                    break
                h, off = self.hpart, 0
                self.hpart = b""
            else:
                h, off = data, i
                i += 9
            length = int.from_bytes(h[off : off + 3], "big")
            ftype = h[off + 3]
            flags = h[off + 4]
            self.skip = length
            if ftype == 1:  # HEADERS
                if not flags & 4:
                    self.block_len = length
                    self.conts = 0
            elif ftype == 9:  # CONTINUATION
                self.block_len += length
                self.conts += 1
                if self.block_len > self.max_block or self.conts > MAX_CONTINUATIONS:
                    return "h2_continuation_flood"
                if flags & 4:
                    self.block_len = -1
            elif ftype in (3, 4, 6):  # RST_STREAM, SETTINGS, PING
                if ftype != 3 and flags & 1:  # an ACK
                    continue
                if now < 0:
                    now = self.loop.time()
                if ftype == 3:
                    if self.resets.hit(now) > reset_limit(self.max_streams):
                        return "h2_rapid_reset"
                elif ftype == 4:
                    if self.settings.hit(now) > CONTROL_PER_SECOND:
                        return "h2_settings_flood"
                elif self.pings.hit(now) > CONTROL_PER_SECOND:
                    return "h2_ping_flood"
        return None

    def _request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        s = H2Stream(self, sid, self.loop.time())
        if self.goaway:  # sent after our GOAWAY: refused, never forwarded
            self.rt.error("h2_stream_after_goaway")
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        if len(self.streams) >= self.max_streams:  # RFC 9113 §5.1.2: a stream error
            self.rt.error("h2_refused_stream")
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        self.streams[sid] = s
        method = path = authority = protocol = b""
        headers: list[tuple[bytes, bytes]] = []
        cookies: list[bytes] = []
        length = -1
        for name, value in ev.headers or ():
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                elif name == b":protocol":
                    protocol = value
            elif name == b"cookie":
                cookies.append(value)
            else:
                if name == b"content-length":
                    length = int(value) if value.isdigit() else -1
                headers.append((name, value))
        if cookies:  # RFC 9113 §8.2.3: one header for HTTP/1.1
            headers.append((b"cookie", b"; ".join(cookies)))
        if authority and not any(n == b"host" for n, _ in headers):
            headers.insert(0, (b"host", authority))
        end = ev.stream_ended is not None
        s.req_end = end
        if method == b"CONNECT" and end:  # a tunnel without a client side
            self.rt.error("h2_connect_unsupported")
            self.answer(s, 400)
            return
        if method == b"CONNECT":
            if protocol.lower() != b"websocket":  # only RFC 8441's websocket
                self.rt.error("h2_connect_unsupported")
                self.answer(s, 400)
                return
            s.ws = True
            method = b"GET"  # RFC 8441 §5: the HTTP/1.1 upgrade request it stands for
            end = True  # no body: what the client sends is the tunnel's
            length = -1
            headers = [(n, v) for n, v in headers if n != b"content-length"]
        limit = self.opts.max_request_bytes
        if limit is not None and length > limit:
            self.rt.error("request_too_large")
            self.answer(s, 413)
            return
        s.head_only = method == b"HEAD"
        s.resp = []
        s.parser = httptools.HttpResponseParser(s)
        if end:
            body_len = 0
        elif length >= 0:
            body_len = length
        else:
            body_len = -1  # Transfer-Encoding: chunked
            s.chunked = True
        if self.rt.retired:
            self._migrate()
        if self.block is not None:
            head = untrusted_head(method, path, headers, body_len, self.block)
        else:
            head = build_request_head(
                method,
                path,
                headers,
                body_len,
                client=self.client,
                client_port=self.client_port,
                trusted=self.trusted,
                add_forwarding=self.opts.forwarded_headers,
                ours=self.ours,
                proto=self.proto,
            )
        if s.ws:  # hop-by-hop, yet the backend must see them to switch
            key = base64.b64encode(os.urandom(16))
            head = (
                head[:-2]
                + b"Connection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: "
                + key
                + b"\r\n\r\n"
            )
        s.req = L7Request(head, s.head_only, True, False, s.t0, s.ws, s.chunked, end)
        s.rt = self.rt
        self.dispatch(s)

    def _data(self, ev: h2.events.DataReceived) -> None:
        s = self.streams.get(ev.stream_id)
        n = ev.flow_controlled_length or 0
        if s is None or s.closed or s.done:
            if n:
                self.h2.acknowledge_received_data(n, ev.stream_id)
            return
        data = ev.data or b""
        s.blen += len(data)
        if s.ws and not s.tunneling:  # before the backend's 101: held, not acknowledged
            s.pending.append(data)
            s.unacked += n
            return
        limit = self.opts.max_request_bytes
        if limit is not None and s.blen > limit and not s.tunneling:
            self.h2.acknowledge_received_data(n, ev.stream_id)
            self.rt.error("request_too_large")
            if s.sent_head:
                self.reset(s, ErrorCodes.CANCEL)
            else:
                s.backend_failed(s.up, "request_too_large_body", 413)
            return
        s.unacked += n
        if data:
            s.forward(data)
        if s.up is not None:
            self.ack(s)

    def ack(self, s: H2Stream) -> None:
        """Acknowledge what a stream's backend connection took (its buffer below the mark)."""
        up = s.up
        if s.unacked and (
            up is None or up.t is None or up.t.get_write_buffer_size() < self.rt.write_high
        ):
            n = s.unacked
            s.unacked = 0
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.h2.acknowledge_received_data(n, s.sid)
            if not s.closed:
                self._later()

    def _ended(self, sid: int) -> None:
        s = self.streams.get(sid)
        if s is None or s.req_end:
            return
        s.req_end = True
        if s.chunked and not s.done:
            s.forward(b"")
        elif s.tunneling and s.up is not None and s.up.t is not None:
            if s.up.eof:  # both sides done
                s.close()
            elif s.up.t.can_write_eof():
                s.up.t.write_eof()

    # --- to the backend -------------------------------------------------------------

    def dispatch(self, s: H2Stream) -> None:
        rt = s.rt
        picker = rt.picker
        i = choose_backend(self, rt)
        if i < 0:
            rt.error("no_healthy_backend")
            s.done = True
            self.answer(s, 503)
            return
        s.backend = i
        picker.active[i] += 1
        rt.stats.requests += 1
        up = None if s.ws else pooled(rt, i)  # a websocket request takes a fresh connection
        if up is not None:
            s.start(up)
            return

        def connected(up: L7Upstream | None, reason: str, status: int) -> None:
            if s.closed or s.done or self.closed:
                if up is not None:
                    up.t.close()
                if s.backend >= 0 and not s.done:
                    rt.picker.release(s.backend)
                    s.backend = -1
                return
            if up is None:
                s.backend_failed(None, reason, status)
                return
            if up.lost or up.t is None or up.t.is_closing():  # reset as soon as opened
                s.backend_failed(None, "connect_failed", 502)
                return
            up.t.set_write_buffer_limits(high=rt.write_high)
            s.start(up)

        open_backend(rt, i, self.loop, self.listen_port, self.opts.timeouts.connect, connected)

    def _migrate(self) -> None:
        """A reload changed the VIP: new streams follow its new runtime (if still l7)."""
        new = self.rt.successor
        while new is not None and new.retired:
            new = new.successor
        if new is None or not new.is_l7:
            return
        self.rt = new
        self.opts = opts = new.l7
        self.trusted = bool(opts.trusted_sources) and is_trusted(self.client, opts.trusted_sources)
        ours = self.ours or client_forwarding(self.client, self.client_port, self.proto)
        fwd = opts.forwarded_headers and not self.trusted
        self.block = forwarding_block(ours, self.proto) if fwd else None
        self.pick_gen = -1

    # --- to the client --------------------------------------------------------------

    def send_headers(self, s: H2Stream, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.closed or s.closed:
            return
        try:
            self.h2.send_headers(s.sid, headers, end_stream=end)
        except h2.exceptions.ProtocolError:  # e.g. a header name HTTP/2 refuses
            self.rt.error("backend_bad_response")
            self.reset(s, ErrorCodes.INTERNAL_ERROR)
            return
        if end:
            self._finished(s)
        self._later()

    def pump(self, s: H2Stream) -> None:
        """Send what the client's windows allow of a stream's response body."""
        if self.closed or s.closed:
            return
        out = s.out
        h = self.h2
        if s.resp is not None and s.ended:  # a complete response not begun yet
            s._send_head(not out)
            if s.closed:
                return
        if out and s.sent_head:
            size = h.max_outbound_frame_size
            while out:
                try:
                    win = h.local_flow_control_window(s.sid)
                except h2.exceptions.ProtocolError:
                    self.reset(s, ErrorCodes.STREAM_CLOSED)
                    return
                n = min(win, size, len(out))
                if n <= 0:
                    break
                h.send_data(s.sid, bytes(out[:n]))
                del out[:n]
        if not out and s.ended and s.sent_head:
            h.end_stream(s.sid)
            self._finished(s)
        hold = len(out) > HOLD
        up = s.up
        if hold != s.paused and up is not None and up.t is not None:
            s.paused = hold
            if hold:
                up.t.pause_reading()
            elif not self.paused:
                up.t.resume_reading()
        self._later()

    def _finished(self, s: H2Stream) -> None:
        if s.tunneling and s.backend >= 0:  # a tunnel's end: its backend connection too
            up = s.up
            s.up = None
            s.rt.picker.release(s.backend)
            if up is not None:
                up.client = None
                s.rt.backend_stats[s.backend].bytes_out += up.sent
                if up.t is not None and not up.t.is_closing():
                    up.t.close()
            s.backend = -1
            s.done = True
        s.closed = True
        self.streams.pop(s.sid, None)
        if not self.streams:
            self.idle_since = self.loop.time()
            if self.goaway:
                self.close()

    def answer(self, s: H2Stream, status: int) -> None:
        """A response of our own (4xx/5xx) on a stream."""
        rt = self.rt
        rt.stats.responses[response_class(status)] += 1
        rt.latency.observe(self.loop.time() - s.t0)
        body = error_response(status).split(b"\r\n\r\n", 1)[1]
        s.done = True
        s.resp = None  # the backend's response, if any began, is not sent
        self.send_headers(
            s,
            [
                (b":status", b"%d" % status),
                (b"content-type", b"text/plain"),
                (b"content-length", b"%d" % len(body)),
            ],
            False,
        )
        if not s.closed:
            s.out += body
            s.ended = True
            s.sent_head = True
            self.pump(s)

    def reset(self, s: H2Stream, code: ErrorCodes) -> None:
        if not s.closed and not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(s.sid, code)
        s.abandon()
        self._finished(s)
        self._later()

    def _later(self) -> None:
        """Flush once this loop iteration is over: the frames of every stream that
        moved in it go out in one TLS write."""
        if not self.flush_due:
            self.flush_due = True
            self.loop.call_soon(self._due)

    def _due(self) -> None:
        self.flush_due = False
        if not self.closed:
            self._flush()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.nout += len(data)
            self.t.write(data)

    def _fail(self, reason: str, code: ErrorCodes) -> None:
        """A connection error: counted, GOAWAY with its code, closed."""
        self.rt.error(reason)
        if not self.closed:
            self._flush()
            frame = GoAwayFrame(
                0, last_stream_id=self.h2.highest_inbound_stream_id, error_code=int(code)
            )
            data = frame.serialize()
            self.nout += len(data)
            self.t.write(data)
        self.close()

    # --- flow of the TLS connection -------------------------------------------------

    def pause_writing(self) -> None:
        """The client does not read: stop reading it and every stream's backend."""
        self.paused = True
        self.t.pause_reading()
        for s in self.streams.values():
            up = s.up
            if up is not None and up.t is not None:
                up.t.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if not self.closed:
            self.t.resume_reading()
        for s in self.streams.values():
            up = s.up
            if up is not None and up.t is not None and not s.paused:
                up.t.resume_reading()

    def eof_received(self) -> bool:
        return False  # the client is done: close (its streams with it)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed and self.streams:
            self.rt.error("client_gone")
        self.close()

    # --- what the VIP and the server call ---------------------------------------------

    def counts(self) -> tuple[int, int, int, int]:
        return self.nin, self.nout, 0, 0

    def buffered(self) -> int:
        n = self.t.get_write_buffer_size() if self.t is not None else 0
        for s in self.streams.values():
            n += len(s.out)
            if s.up is not None and s.up.t is not None:
                n += s.up.t.get_write_buffer_size()
        return int(n)

    def quiesce(self) -> None:
        """A graceful stop: GOAWAY (NO_ERROR); the streams it covers end, then we close."""
        if self.closed or self.goaway:
            return
        self.goaway = True
        self._flush()
        frame = GoAwayFrame(0, last_stream_id=self.h2.highest_inbound_stream_id, error_code=0)
        data = frame.serialize()
        self.nout += len(data)
        self.t.write(data)
        if not self.streams:
            self.close()

    def cut(self, index: int) -> None:
        """Backend ``index`` (of this connection's runtime) was disabled."""
        self.cut_address((self.rt.hosts[index], self.rt.ports[index]))

    def cut_address(self, key: tuple[str, int | None]) -> None:
        """The backend at ``key`` (host, port) was disabled: the streams it serves end
        (502, or reset if their response began)."""
        for s in list(self.streams.values()):
            b = s.backend
            if b >= 0 and not s.done and (s.rt.hosts[b], s.rt.ports[b]) == key:
                s.backend_failed(s.up, "backend_disabled", 502)
        self._later()

    def sweep(self, now: float) -> None:
        """Timeouts: a stream with neither a response byte nor a request byte for
        ``timeouts.idle`` (504); a connection without a stream for ``timeouts.idle``, or
        for the header timeout before its first request (GOAWAY, then closed)."""
        if self.closed:
            return
        idle = self.opts.timeouts.idle
        if not self.streams:
            limit = idle if self.h2.highest_inbound_stream_id else self.rt.header_timeout
            if now - self.idle_since >= limit:
                if not self.h2.highest_inbound_stream_id:
                    self.rt.error("header_timeout")
                self.quiesce()
            return
        for s in list(self.streams.values()):
            up = s.up
            if up is None or s.done:
                continue
            token = up.sent + s.blen  # progress either way (a long upload is not idle)
            if s.stamp == 0.0 or token != s.seen:
                s.stamp = now
                s.seen = token
            elif now - s.stamp >= idle:
                if s.tunneling:  # a silent tunnel: both ends closed
                    self.rt.error("idle_timeout")
                    s.close()
                    continue
                up.keep = False
                s.backend_failed(up, "response_timeout", 504)
        self._later()

    def close(self, abort: bool = False, linger: float = 0.0) -> None:
        if self.closed:
            return
        if not abort:
            self._flush()  # what h2 has for the client still goes out (a stream's end)
        self.closed = True
        rt = self.rt
        rt.live.discard(self)
        rt.release(self)
        rt.stats.active -= 1
        rt.add_counts(-1, self.counts())
        for s in list(self.streams.values()):
            if not s.done:
                s.abandon()
        self.streams.clear()
        t = self.t
        if t is not None and not t.is_closing():
            if abort:
                t.abort()
            else:
                t.close()
