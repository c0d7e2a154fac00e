"""``proxy-l7``: HTTP/1.1 with httptools, keep-alive both ways and pooled backend connections.

A client connection (:class:`L7Client`) parses requests with
``httptools.HttpRequestParser``. At the end of each request head it builds an
:class:`L7Request`: the head rewritten by :func:`.policy.build_request_head`
(forwarding headers; the three forwarding lines are built once per connection)
and the body's framing. The request goes to a pooled keep-alive connection to
the picked backend (:class:`L7Upstream`) once the bytes that completed its head
parsed without error, and its body follows as it arrives (streamed, never
buffered whole). The response is relayed to the client byte for byte as it
arrives, parsed with ``HttpResponseParser`` only to find its end; then the
backend connection goes back to the pool if both sides keep it alive. Requests
pipelined by a client are answered in order, one at a time.

Streaming and backpressure. A ``Content-Length`` body is forwarded with the
same length; a chunked one is re-chunked by the proxy (one chunk per read,
extensions and trailers dropped), so the backend only sees framing the proxy
wrote. Each direction is bounded by the write buffer high-water mark
(``write_high``): the backend's buffer full pauses reading from the client,
the client's full pauses reading from the backend, and the body of a request
that is not at a backend yet (connecting, or pipelined behind another) waits
in memory up to that mark, then reading pauses too. ``max_request_bytes`` is
an optional limit (None: no limit), not a buffer size. A request whose body
bytes went to a backend is retried on a fresh connection only while those
bytes are few (:data:`REPLAY_BYTES`, kept for that purpose).

Interim responses (RFC 9110 §15.2). httptools ends a message at any 1xx, so
the parser never sees one: while a response has not begun, the upstream looks
at the status line itself (one byte test per response in the usual case) and
takes each ``1xx`` head off the stream (:meth:`L7Upstream._interim`). A ``100
Continue`` is consumed (the proxy answers ``Expect`` itself, below); other 1xx
(102, 103...) are relayed to an HTTP/1.1 client and dropped for an HTTP/1.0 one
(§15.2: never a 1xx to HTTP/1.0). A connection goes back to the pool only
after the final response is complete. Counted per VIP under ``interim``.

WebSocket (RFC 6455 over HTTP/1.1 ``Upgrade``, RFC 9110 §7.8). A ``GET`` with
``Connection: upgrade`` and ``Upgrade: websocket`` and no body goes to the
backend with those two headers, on a fresh backend connection that is never
pooled. The bytes the client sends after it belong to the new protocol: they
wait (reading paused beyond the write buffer limit) until the backend answers.
A ``101`` makes the connection a byte relay both ways (:meth:`L7Client.tunnel`):
backpressure, half-close, the VIP's ``timeouts.idle`` without a byte either
way; counted under ``interim["upgraded"]``. Any other answer is relayed as a
normal response and the waiting bytes are parsed as the next request. A ``101``
to a request that did not ask for websocket is a 502
(``backend_switching_protocols``); other upgrade requests (``h2c``...) are
served as plain ones without ``Upgrade`` (:meth:`L7Client._no_upgrade`).

``Expect: 100-continue`` (RFC 9110 §10.1.1): the proxy answers ``HTTP/1.1 100
Continue`` itself once the request is next in line and a body is announced;
413 at once when the ``Content-Length`` is over ``max_request_bytes``; 417 for
any other expectation; ignored for HTTP/1.0. ``Expect`` is never forwarded.

The per-request path is plain callbacks: no future, no coroutine and no timer.
A client connection is in one phase (reading a head, reading a body, waiting
for the backend, idle between requests); a phase change only sets ``phase`` and
clears ``stamp``. The VIP's periodic sweep (:meth:`L7Client.sweep`) stamps new
phases and enforces their timeouts, so these fire at most two sweep periods (a
quarter of the shortest timeout) late, and never early. Only the connect of a
new backend connection has its own timer.

The proxy answers by itself: 400 (unparsable, or HTTP/0.9), 408 (no complete
head within ``header_timeout``), 413 (body over ``max_request_bytes``), 417
(unknown expectation), 431 (head over ``max_header_bytes``), 502 (backend
refused, reset, sent garbage or a 101 before the final response began), 503
(no healthy backend) and 504 (connect timeout, or no response byte for
``timeouts.idle``). An error found in a pipelined request is answered after
the responses to the requests before it. An error found in a body that is
already streaming (a bad chunk, a chunked body passing ``max_request_bytes``)
aborts that backend connection and is answered if no response byte went out
yet, else the client connection closes.
A backend that fails *after* response bytes went out makes the client
connection close: the response is incomplete, and the client must see that.

What an upstream calls on its client is :class:`UpstreamClient` (an
:class:`L7Client` is one): ``closed``, ``relay`` (response bytes: 1xx heads, the
final response, tunnel bytes), ``response_done``, ``backend_failed``,
``backend_full`` (the backend's write buffer crossed its high or low mark: stop or
resume feeding it request body bytes), ``tunnel``, ``backend_eof`` and ``close``
(tunnels). The client drives the upstream with
:meth:`L7Upstream.start` (head and buffered body of an :class:`L7Request`) and
:meth:`L7Upstream.send` (more body bytes, already framed).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final, Protocol, cast

import httptools

from v6lb.model.config import Scheduler

from .policy import (
    build_request_head,
    client_forwarding,
    error_response,
    forwarding_block,
    hash_key,
    is_trusted,
    untrusted_head,
)
from .runtime import VipRuntime, client_of, response_class

__all__ = [
    "REPLAY_BYTES",
    "L7Client",
    "L7Request",
    "L7Upstream",
    "UpstreamClient",
    "choose_backend",
    "open_backend",
    "pooled",
]

# Body bytes of a request kept after they went to a backend, so that a pooled connection
# the backend had closed can be retried on a fresh one; past this, no retry.
REPLAY_BYTES: Final = 64 * 1024
_NO_LIMIT: Final = 1 << 62  # max_request_bytes None

# Phases of a client connection, each with its timeout (see L7Client.sweep).
_LINGER = 1.0  # seconds an answered error waits for the client's leftovers before closing
_HEAD = 0  # waiting for or reading a request head: header_timeout
_BODY = 1  # reading a request body not at a backend yet: timeouts.idle ("request_timeout")
_BUSY = 2  # a request at the backend: timeouts.idle without a byte (504, or request_timeout)
_IDLE = 3  # keep-alive between requests: timeouts.idle, then a quiet close
_TUNNEL = 4  # a byte relay after a 101: timeouts.idle without a byte either way

# Why reading from a client is paused (L7Client.hold, a bit each).
_H_PIPE = 1  # pipelined requests wait, or an error waits for the responses before it
_H_UP = 2  # the backend's write buffer is over its high-water mark
_H_BUF = 4  # the body of a request not at a backend yet is over the high-water mark
_H_EARLY = 8  # bytes after a websocket request, waiting for its answer

_REASONS = {
    400: "bad_request",
    408: "header_timeout",
    413: "request_too_large",
    417: "expectation_failed",
    431: "headers_too_large",
}

# A whole 1xx head: status line and header fields (token ":" value), CRLF line ends.
_INTERIM = re.compile(
    rb"HTTP/1\.[01] 1[0-9][0-9](?: [^\r\n]*)?\r\n"
    rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*\r\n)*\r\n"
)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class L7Request:
    """One request on its way to a backend, from the end of its head on.

    ``head`` is what the backend gets first (the proxy's framing in it:
    ``Content-Length``, or chunked when ``chunked``); ``buf`` holds body bytes,
    already framed, that no backend has taken yet (``buffered`` of them);
    ``complete`` once the whole body was read. ``replay`` holds the body bytes
    already sent (``replayed`` of them), for a retry, while they are at most
    :data:`REPLAY_BYTES` (then None, and no retry).
    """

    __slots__ = (
        "head",
        "head_only",
        "keep",
        "v11",
        "t0",
        "ws",
        "chunked",
        "complete",
        "buf",
        "buffered",
        "replay",
        "replayed",
    )

    def __init__(
        self,
        head: bytes,
        head_only: bool = False,
        keep: bool = True,
        v11: bool = True,
        t0: float = 0.0,
        ws: bool = False,
        chunked: bool = False,
        complete: bool = False,
    ) -> None:
        self.head = head
        self.head_only = head_only  # a HEAD request: the response ends with its head
        self.keep = keep  # the client keeps the connection alive after it
        self.v11 = v11  # the client speaks HTTP/1.1: it may get 1xx responses
        self.t0 = t0  # when its first byte came (loop time)
        self.ws = ws  # a websocket upgrade request
        self.chunked = chunked
        self.complete = complete
        self.buf: list[bytes] | None = None
        self.buffered = 0
        self.replay: list[bytes] | None = None
        self.replayed = 0


class UpstreamClient(Protocol):
    """What an :class:`L7Upstream` calls on the client its response goes to
    (:class:`L7Client`, or another frontend's stream)."""

    closed: bool

    def relay(self, data: bytes) -> None:
        """Response bytes: 1xx heads, the final response, tunnel bytes."""

    def response_done(self, up: L7Upstream) -> None:
        """The final response is complete (``up.status``, ``up.keep``)."""

    def backend_failed(self, up: L7Upstream, reason: str, status: int) -> None:
        """``up`` failed (reset, bad response...); ``up.at_start``: no response byte went out."""

    def backend_full(self, full: bool) -> None:
        """The backend's write buffer crossed its high (``full``) or low mark."""

    def tunnel(self, up: L7Upstream, head: bytes) -> None:
        """A 101 to a websocket request: relay ``head``, then bytes both ways."""

    def backend_eof(self) -> bool | None:
        """A tunnel's backend half-closed; None closes the backend connection."""

    def close(self, abort: bool = False, linger: float = 0.0) -> None:
        """End the client side (a tunnel whose backend is gone)."""


class _HeadResponse:
    """Parser callbacks for the response to a HEAD request: it ends with its head."""

    __slots__ = ("up",)

    def __init__(self, up: L7Upstream) -> None:
        self.up = up

    def on_headers_complete(self) -> None:
        self.up.status = self.up.parser.get_status_code()
        self.up.done = True
        self.up.keep = False  # the parser still expects a body: do not reuse

    def on_message_complete(self) -> None:
        self.up.done = True


def choose_backend(c: Any, rt: VipRuntime) -> int:
    """The backend for the next request of client connection ``c`` (-1: none healthy).

    ``c`` (an :class:`L7Client` or an HTTP/2 connection) has ``client``, ``pick`` and
    ``pick_gen``: with Maglev one client gets one backend, looked up once per table
    generation; other schedulers pick per request.
    """
    picker = rt.picker
    if picker.kind is Scheduler.MAGLEV:
        gen = rt.pool.generation
        if c.pick_gen != gen:
            c.pick = rt.pool.pick_flow(hash_key(c.client), picker.vip_key, 0, 0)
            c.pick_gen = gen
        return int(c.pick)
    return picker.pick(c.client)


def pooled(rt: VipRuntime, i: int) -> L7Upstream | None:
    """An idle keep-alive connection to backend ``i`` still open, taken from its pool."""
    idle = rt.idle[i]
    while idle:
        up: L7Upstream = idle.pop()
        if not up.lost and not up.t.is_closing():
            return up
    return None


def open_backend(
    rt: VipRuntime,
    i: int,
    loop: asyncio.AbstractEventLoop,
    listen_port: int,
    timeout: float,
    done: Callable[[L7Upstream | None, str, int], None],
) -> None:
    """A new connection to backend ``i``, given up after ``timeout`` s.

    ``done(up, "", 0)`` once connected, or ``done(None, reason, status)``: reason
    ``connect_timeout`` (504) or ``connect_failed`` (502). Counted in the backend's
    ``connections``.
    """
    rt.backend_stats[i].connections += 1
    coro = loop.create_connection(
        lambda: L7Upstream(rt, i), rt.hosts[i], rt.backend_port(i, listen_port)
    )
    task = loop.create_task(coro)
    timer = loop.call_later(timeout, task.cancel)

    def connected(task: asyncio.Task[Any]) -> None:
        timer.cancel()
        if task.cancelled():
            done(None, "connect_timeout", 504)
        elif task.exception() is not None:
            done(None, "connect_failed", 502)
        else:
            done(task.result()[1], "", 0)

    task.add_done_callback(connected)


class L7Upstream(asyncio.Protocol):
    """One keep-alive connection to a backend; pooled between requests.

    Its ``client`` (an :class:`L7Client`, or an HTTP/2 stream: :class:`.h2.H2Stream`)
    is an :class:`UpstreamClient`. A request whose ``v11`` is false gets no 1xx and
    never a tunnel.
    """

    __slots__ = (
        "rt",
        "index",
        "t",
        "parser",
        "client",
        "head_only",
        "sent",
        "done",
        "reused",
        "lost",
        "keep",
        "at_start",
        "hbuf",
        "v11",
        "status",
        "ws",
        "tunnel",
        "eof",
        "b",
    )

    def __init__(self, rt: VipRuntime, index: int) -> None:
        self.rt = rt
        self.b = rt.batch  # writes go out after this loop iteration's reads (WriteBatch)
        self.index = index
        self.t: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: UpstreamClient | None = None
        self.head_only = False
        self.sent = 0  # bytes from the backend for the current request (1xx included)
        self.done = False
        self.reused = False
        self.lost = False
        self.keep = True
        self.at_start = True  # no byte of the final response parsed (or relayed) yet
        self.hbuf = b""  # the start of a response head too short to tell 1xx from final
        self.v11 = True  # the client speaks HTTP/1.1: it may get 1xx responses
        self.status = 0  # the final response's status, once complete
        self.ws = False  # sent a websocket upgrade request: never pooled, a 101 may come
        self.tunnel = False  # after a 101: a byte relay
        self.eof = False  # the backend half-closed (tunnel)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def start(self, client: UpstreamClient, req: L7Request) -> None:
        """Send ``req``'s head and the body bytes it holds; the response goes to ``client``."""
        self.client = client
        self.sent = 0
        self.done = False
        self.keep = True
        self.at_start = True
        self.v11 = req.v11
        self.ws = req.ws
        if req.head_only:
            self.head_only = True
            self.parser = httptools.HttpResponseParser(_HeadResponse(self))
        bs = self.rt.backend_stats[self.index]
        bs.requests += 1
        data = req.head
        if req.buf:
            body = b"".join(req.buf)
            req.buf = None
            req.buffered = 0
            self._replay(req, body)
            data += body
        bs.bytes_in += len(data)
        self.b.write(self.t, data)

    def send(self, req: L7Request, data: bytes) -> None:
        """More of ``req``'s body (framed by the proxy) for the backend."""
        self.rt.backend_stats[self.index].bytes_in += len(data)
        if req.replayed <= REPLAY_BYTES:
            self._replay(req, data)
        self.b.write(self.t, data)

    @staticmethod
    def _replay(req: L7Request, data: bytes) -> None:
        n = req.replayed = req.replayed + len(data)
        if n > REPLAY_BYTES:
            req.replay = None  # too much to keep: this request is not retried
        elif req.replay is None:
            req.replay = [data]
        else:
            req.replay.append(data)

    def data_received(self, data: bytes) -> None:
        c = self.client
        if self.tunnel:
            self.sent += len(data)
            if c is not None:
                c.relay(data)
            return
        if c is None:  # unsolicited bytes on an idle pooled connection
            self.rt.error("backend_unsolicited", self.index)
            self.keep = False
            if self.t is not None:
                self.t.close()
            return
        self.sent += len(data)
        if self.at_start:
            if len(data) < 12 or data[9] == 0x31 or self.hbuf:  # maybe "HTTP/1.1 1xx"
                data = self._interim(c, data)
                if not data:
                    return
            self.at_start = False  # set back if the parser refuses this first chunk
            first = True
        else:
            first = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.keep = False
            self.at_start = first  # nothing of a refused first chunk went out
            if not self.done:
                c.backend_failed(self, "backend_bad_response", 502)
            return
        c.relay(data)
        if self.done:
            c.response_done(self)

    def _interim(self, c: UpstreamClient, data: bytes) -> bytes:
        """Take the 1xx heads off the start of a response; return what follows them.

        Returns b"" while the bytes so far cannot tell (kept in ``hbuf``), after an
        error (handled here), or when only 1xx heads came.
        """
        buf = self.hbuf + data if self.hbuf else data
        self.hbuf = b""
        st = self.rt.stats
        while True:
            if len(buf) < 12:  # "HTTP/1.1 1xx": too short to tell
                if buf[:7] != b"HTTP/1."[: len(buf)]:
                    return buf  # not HTTP: the parser says so
                self.hbuf = buf
                return b""
            if buf[9] != 0x31 or not buf.startswith(b"HTTP/1."):
                return buf  # the final response (or garbage, for the parser)
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.rt.l7.max_header_bytes:
                    c.backend_failed(self, "backend_bad_response", 502)
                    return b""
                self.hbuf = buf
                return b""
            end += 4
            if _INTERIM.fullmatch(buf, 0, end) is None:
                c.backend_failed(self, "backend_bad_response", 502)
                return b""
            code = buf[9:12]
            if code == b"101":
                if not self.ws:  # we removed Upgrade: nothing can switch protocols here
                    c.backend_failed(self, "backend_switching_protocols", 502)
                    return b""
                self.tunnel = True  # what follows the 101 is the new protocol's
                self.at_start = False
                self.keep = False
                c.tunnel(self, buf[:end])
                if buf[end:]:
                    self.data_received(buf[end:])
                return b""
            if code == b"100":
                st.interim["consumed"] += 1  # the proxy answered Expect itself
            elif self.v11 and not c.closed:
                st.interim["relayed"] += 1
                st.responses[0] += 1
                self.rt.backend_stats[self.index].responses[0] += 1
                c.relay(buf[:end])
            else:
                st.interim["dropped"] += 1  # never a 1xx to an HTTP/1.0 client
            buf = buf[end:]
            if not buf:
                return b""

    def on_message_complete(self) -> None:
        if self.done:  # a second response for one request: never reuse this connection
            self.keep = False
        self.done = True
        self.status = self.parser.get_status_code()
        if not self.parser.should_keep_alive():
            self.keep = False

    def eof_received(self) -> bool | None:
        c = self.client
        if not self.tunnel or c is None:
            return None  # closes: connection_lost tells the client
        self.eof = True
        return c.backend_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        idle = self.rt.idle[self.index]
        if self in idle:
            idle.remove(self)
        c = self.client
        if self.tunnel:
            if c is not None and not c.closed:
                if exc is not None:
                    self.rt.error("backend_reset", self.index)
                c.close(abort=exc is not None)
            return
        if c is not None and not self.done:
            c.backend_failed(self, "backend_reset", 502)

    def finish(self) -> None:
        """The response is complete: back to the pool, or closed."""
        self.client = None
        self.rt.backend_stats[self.index].bytes_out += self.sent
        if (
            self.keep
            and not self.ws
            and not self.lost
            and not self.rt.retired
            and not self.t.is_closing()
        ):
            self.reused = True
            self.rt.idle[self.index].append(self)
        else:
            self.b.flush()  # a body's last bytes may be queued
            self.t.close()

    def pause_writing(self) -> None:  # a request body or a tunnel: stop reading the client
        c = self.client
        if c is not None:
            c.backend_full(True)

    def resume_writing(self) -> None:
        c = self.client
        if c is not None:
            c.backend_full(False)


class L7Client(asyncio.Protocol):
    __slots__ = (
        "rt",
        "opts",
        "limit",
        "loop",
        "t",
        "parser",
        "client",
        "client_port",
        "listen_port",
        "trusted",
        "queue",
        "busy",
        "up",
        "backend",
        "closed",
        "in_head",
        "head_raw",
        "url",
        "headers",
        "hsize",
        "clen",
        "te",
        "req",
        "pieces",
        "blen",
        "err",
        "hold",
        "wfull",
        "attempts",
        "current",
        "ours",
        "block",
        "phase",
        "stamp",
        "seen",
        "nin",
        "nout",
        "pick_gen",
        "pick",
        "expect",
        "cont",
        "why",
        "ver",
        "last",
        "eof",
        "t0",
        "proto",
        "early",
        "piped",
        "batch",
    )

    def __init__(self, rt: VipRuntime) -> None:
        self.rt = rt
        self.opts = rt.l7
        limit = rt.l7.max_request_bytes
        self.limit = _NO_LIMIT if limit is None else limit
        self.loop = asyncio.get_running_loop()
        self.t: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.client: IPv4Address | IPv6Address = IPv6Address(0)
        self.client_port = 0
        self.listen_port = 0
        self.trusted = False
        # Requests from the end of their head on, in order; the first is at a backend
        # when ``busy`` (``current``).
        self.queue: deque[L7Request] = deque()
        self.busy = False
        self.up: L7Upstream | None = None
        self.backend = -1
        self.closed = False
        self.in_head = False
        self.head_raw = 0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.hsize = 0
        self.clen = 0  # the Content-Length of the head being read
        self.te = False  # the head being read has Transfer-Encoding (chunked: llhttp checks)
        self.req: L7Request | None = None  # the request whose body is being read
        self.pieces: list[bytes] = []  # body bytes of ``req`` parsed from the current read
        self.blen = 0  # body bytes of ``req`` so far
        self.err = 0
        self.hold = 0  # why reading is paused (_H_* bits); 0: reading
        self.wfull = False  # our write buffer is over its high-water mark
        self.attempts = 0
        self.current: L7Request | None = None
        self.ours: tuple[str, str] | None = None
        self.block: bytes | None = None
        self.phase = _HEAD
        self.stamp = 0.0  # when the sweep first saw this phase (0: not yet)
        self.seen = -1  # bytes moved at that moment (phases _BODY, _BUSY, _TUNNEL)
        self.nin = 0  # bytes from the client
        self.nout = 0  # bytes to the client
        self.pick_gen = -1  # Maglev: the pool generation ``pick`` was computed for
        self.pick = -1
        self.expect: bytes | None = None  # the Expect header of the head being read
        self.cont = False  # a "100 Continue" is due once ``req`` is next in line
        self.why = ""  # the counted reason of ``err`` when not the status's usual one
        self.ver = ""  # the HTTP version of the connection's first request
        self.last: list[tuple[bytes, bytes]] = []  # the headers of the last request parsed
        self.eof = False  # the client half-closed: close once the queue is answered
        self.t0 = 0.0  # when the first byte of the request being read came (loop time)
        self.proto = "http"  # "https" behind a TlsLayer (TLS terminated here)
        # After a websocket upgrade request: the bytes that follow it, until the answer.
        self.early: bytearray | None = None
        self.piped = False  # a 101 came: a byte relay to ``up`` (phase _TUNNEL)
        self.batch = rt.batch  # relay writes go out after this loop iteration's reads

    # --- client side ----------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's transports are not subclasses
        self.t = transport
        rt = self.rt
        st = rt.stats
        st.connections += 1
        refused = rt.admit(self, transport)  # max_connections, fds, per source
        if refused is not None:
            rt.error(refused)
            self.closed = True
            transport.abort()
            return
        st.active += 1
        rt.live.add(self)
        transport.set_write_buffer_limits(high=rt.write_high)
        self.client, self.client_port = client_of(transport.get_extra_info("peername"))
        self.listen_port = int(transport.get_extra_info("sockname")[1])
        if transport.get_extra_info("ssl_object") is not None:
            self.proto = "https"
        self.ours = client_forwarding(self.client, self.client_port, self.proto)
        self.trusted = bool(self.opts.trusted_sources) and is_trusted(
            self.client, self.opts.trusted_sources
        )
        if self.opts.forwarded_headers and not self.trusted:
            self.block = forwarding_block(self.ours, self.proto)
        self.phase = _HEAD
        self.stamp = self.loop.time()

    def _pause(self, bit: int) -> None:
        if not self.hold and not self.closed:
            self.t.pause_reading()
        self.hold |= bit

    def _resume(self, bit: int) -> None:
        if self.hold & bit:
            self.hold &= ~bit
            if not self.hold and not self.closed:
                self.t.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.err:  # err: the answer waits for the responses before it
            return
        n = len(data)
        self.nin += n
        if self.piped:
            up = self.up
            if up is not None and up.t is not None:
                self.batch.write(up.t, data)
            return
        early = self.early
        if early is not None:  # the new protocol's, if the backend switches (else HTTP)
            early += data
            if len(early) > self.rt.write_high:
                self._pause(_H_EARLY)
            return
        if self.phase == _IDLE:
            self.phase = _HEAD
            self.stamp = 0.0
        self.head_raw += n
        # Nothing parsed from ``data`` reaches a backend before the whole of it parsed
        # without error: a request is dispatched, and body bytes sent, only below.
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:  # Connection: upgrade, or CONNECT
            self._upgrade_refused_or_ignored(data, e)
        except httptools.HttpParserError:
            self.err = self.err or 400
        if not self.err and self.in_head:  # a head split across reads: the rare case
            if self.head_raw > self.opts.max_header_bytes:
                self.err = 431
            elif (
                not self.headers
                and data.endswith(b"\n")
                and self.parser.get_http_version() == "0.0"
            ):  # "GET /\r\n": an HTTP/0.9 request line, no version to come
                self.err = 400
                self.why = "http_0_9"
        if self.err:
            self.pieces.clear()
            self._reject(self.err)
            return
        if self.pieces:
            req = self.req
            if req is not None:
                self._body(req, self._framed(req))
        queue = self.queue
        if queue:
            if not self.busy:
                self._next()
            if len(queue) > 8:  # a pipelining client waits
                self._pause(_H_PIPE)

    def _upgrade_refused_or_ignored(self, data: bytes, e: httptools.HttpParserUpgrade) -> None:
        """Parse on after each upgrade request served as a plain one (see _no_upgrade)."""
        rest = self._no_upgrade(data, e)
        while rest:
            try:
                self.parser.feed_data(rest)
                return
            except httptools.HttpParserUpgrade as again:
                rest = self._no_upgrade(rest, again)
            except httptools.HttpParserError:
                self.err = self.err or 400
                return

    def _no_upgrade(self, data: bytes, e: httptools.HttpParserUpgrade) -> bytes:
        """An upgrade request is served as a plain one (``Upgrade`` is hop-by-hop and
        dropped), as a server may ignore ``Upgrade`` (RFC 9110 §7.8). httptools stops
        at its head: a fresh parser takes the bytes after it. CONNECT, or an upgrade
        request with a body (httptools stops before the body), is refused with 400
        (``upgrade_unsupported``). Returns the bytes still to parse."""
        queue = self.queue
        if self.early is not None and queue and queue[-1].ws and not self.err:
            offset = e.args[0] if e.args and isinstance(e.args[0], int) else len(data)
            self.early += data[offset:]  # a websocket request: see data_received
            return b""
        body = any(
            n.lower() in (b"content-length", b"transfer-encoding") and v.strip() != b"0"
            for n, v in self.last
        )
        if self.err or not queue or body or queue[-1].head.startswith(b"CONNECT "):
            if not self.err and queue and queue[-1] is not self.current:
                queue.pop()  # parsed from this read: never dispatched
            self.req = None
            self.err = self.err or 400
            self.why = self.why or "upgrade_unsupported"
            return b""
        self.parser = httptools.HttpRequestParser(self)
        offset = e.args[0] if e.args and isinstance(e.args[0], int) else len(data)
        return data[offset:]

    def on_url(self, url: bytes) -> None:  # the first callback of a request
        if not self.in_head:
            self.t0 = self.loop.time()
        self.in_head = True
        self.url += url
        self.hsize += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:  # a chunked body's trailer field: dropped
            return
        self.headers.append((name, value))
        self.hsize += len(name) + len(value) + 4
        n = len(name)
        if n == 6:
            if name.lower() == b"expect":
                self.expect = value if self.expect is None else self.expect + b"," + value
        elif n == 14:
            if name.lower() == b"content-length" and value.strip().isdigit():
                self.clen = int(value)  # llhttp refuses a second, different one
        elif n == 17 and name.lower() == b"transfer-encoding":
            self.te = True

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_raw = 0
        if self.hsize > self.opts.max_header_bytes:
            self.err = 431
        if self.phase == _HEAD:
            self.phase = _BODY
            self.stamp = 0.0
        if self.expect is not None:
            self._expectation()
        if not self.err:
            self._request()
        self.url = b""
        self.last = self.headers
        self.headers = []
        self.hsize = 0
        self.clen = 0
        self.te = False

    def _request(self) -> None:
        """The head is complete: make its :class:`L7Request` (dispatched once this read
        parsed without error, by data_received)."""
        parser = self.parser
        method = parser.get_method()
        keep = parser.should_keep_alive()
        # get_http_version() formats a string (0.4 us): asked on a connection's first
        # request and on every request that does not keep the connection alive (HTTP/0.9
        # and 1.0 without keep-alive are among those); else the first answer stands.
        ver = self.ver
        if not keep or not ver:
            ver = parser.get_http_version()
            if not self.ver:
                self.ver = ver
        if ver != "1.1":
            if ver != "1.0":  # "GET /\r\n\r\n" parses as 0.9
                self.err = 400
                self.why = "http_0_9" if ver == "0.9" else ""
                return
            self._add_host()
        chunked = self.te
        length = -1 if chunked else self.clen
        if length > self.limit:
            self.err = 413
            return
        upgrade = self._websocket(method, ver, length) if parser.should_upgrade() else None
        if self.block is not None:  # untrusted client, forwarding on: the usual case
            head = untrusted_head(method, self.url, self.headers, length, self.block)
        else:
            head = build_request_head(
                method,
                self.url,
                self.headers,
                length,
                client=self.client,
                client_port=self.client_port,
                trusted=self.trusted,
                add_forwarding=self.opts.forwarded_headers,
                ours=self.ours,
                proto=self.proto,
            )
        if upgrade is not None:  # hop-by-hop, yet the backend must see them to switch
            head = head[:-2] + b"Connection: upgrade\r\nUpgrade: " + upgrade + b"\r\n\r\n"
            self.early = bytearray()
        # head, head_only, keep, v11, t0, ws, chunked
        req = L7Request(
            head, method == b"HEAD", keep, ver == "1.1", self.t0, upgrade is not None, chunked
        )
        self.req = req
        self.blen = 0
        self.queue.append(req)

    def _expectation(self) -> None:
        """RFC 9110 §10.1.1, answered by the proxy: 417, or a 100 due (413: _request)."""
        value = self.expect or b""
        self.expect = None
        if self.err or self.parser.get_http_version() != "1.1":
            return  # an HTTP/1.0 request's expectation is ignored
        for member in value.split(b","):
            m = member.strip().lower()
            if m and m != b"100-continue":
                self.err = 417
                return
        if (self.clen or self.te) and self.clen <= self.limit:
            self.cont = True  # sent by _next once this request is next in line

    def _continue(self) -> None:
        self.cont = False
        if not self.closed:
            self.nout += len(_CONTINUE)
            self.batch.write(self.t, _CONTINUE)
            self.rt.stats.interim["continue_sent"] += 1

    def on_body(self, body: bytes) -> None:
        if self.err:
            return
        self.blen += len(body)
        if self.blen > self.limit:  # a chunked body (a Content-Length is checked at once)
            self.err = 413
            return
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        req = self.req
        if self.err or req is None:
            return
        self.req = None
        self.cont = False  # the body is here: a 100 is no longer needed
        if self.pieces:
            self._body(req, self._framed(req))
        if req.chunked:
            self._body(req, _LAST_CHUNK)  # trailers are dropped
        req.complete = True
        self.head_raw = 0

    def _framed(self, req: L7Request) -> bytes:
        """The body bytes parsed from this read, as the backend gets them."""
        pieces = self.pieces
        if req.chunked:  # one chunk per read: a single copy of the bytes
            n = sum(map(len, pieces))
            data = b"".join((b"%x\r\n" % n, *pieces, b"\r\n"))
        else:
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        return data

    def _body(self, req: L7Request, data: bytes) -> None:
        """Body bytes of ``req``: to its backend, or held until it has one."""
        up = self.up
        if up is not None and req is self.current:
            up.send(req, data)
            return
        if req.buf is None:
            req.buf = [data]
        else:
            req.buf.append(data)
        req.buffered += len(data)
        if req.buffered > self.rt.write_high:
            self._pause(_H_BUF)

    def _websocket(self, method: bytes, ver: str, length: int) -> bytes | None:
        """The ``Upgrade`` value of a websocket upgrade request (an HTTP/1.1 GET without a
        body, ``Connection: upgrade``, ``Upgrade: websocket``); None for any other request."""
        if method != b"GET" or ver != "1.1" or length:
            return None
        conn = False
        value: bytes | None = None
        for name, v in self.headers:
            low = name.lower()
            if low == b"connection":
                conn = conn or any(t.strip().lower() == b"upgrade" for t in v.split(b","))
            elif low == b"upgrade":
                value = v if value is None else value + b", " + v
            elif low in (b"content-length", b"transfer-encoding"):
                return None
        if not conn or value is None:
            return None
        if not any(t.strip().lower() == b"websocket" for t in value.split(b",")):
            return None
        return value

    def _add_host(self) -> None:
        """An HTTP/1.0 request without Host goes out as HTTP/1.1: name the VIP as Host."""
        for name, _ in self.headers:
            if name.lower() == b"host":
                return
        addr, port = client_of(self.t.get_extra_info("sockname"))
        host = f"[{addr}]" if addr.version == 6 else str(addr)
        if port != 80:
            host += f":{port}"
        self.headers.append((b"Host", host.encode()))

    def _reject(self, status: int) -> None:
        self.rt.error(self.why or _REASONS.get(status, f"http_{status}"))
        self.cont = False
        req = self.req
        self.req = None
        if req is not None:
            if req is self.current:  # its head and some body are at a backend already
                self._abandon(status)
                return
            if self.queue and self.queue[-1] is req:
                self.queue.pop()  # never dispatched: nothing of it left the proxy
        if self.busy or self.queue:  # pipelined: answer the requests before it first
            self._pause(_H_PIPE)
            self._next()
            return
        self.respond_error(status)

    def _abandon(self, status: int) -> None:
        """The request at the backend turned out bad mid-body (a malformed chunk, over
        ``max_request_bytes``): abort that backend connection (the backend never gets a
        complete request), answer ``status`` if no response byte went out, else close."""
        up = self.up
        self.busy = False
        self.current = None
        self.queue.clear()
        at_start = True
        if up is not None:
            self.up = None
            up.client = None
            up.keep = False
            self.rt.backend_stats[self.backend].bytes_out += up.sent
            at_start = up.at_start
            if up.t is not None:
                up.t.abort()
            self.rt.picker.release(self.backend)
            self.backend = -1
        if at_start:  # (still connecting: close() releases the backend)
            self.respond_error(status)
        else:
            self.close(abort=True)

    def respond_error(self, status: int) -> None:
        """Answer ``status`` by ourselves and close (after any response in progress)."""
        t = self.t
        if t is not None and not t.is_closing():
            self.batch.write(t, error_response(status))
            rt = self.rt
            rt.stats.responses[response_class(status)] += 1
            req = self.current
            t0 = req.t0 if req is not None else self.t0
            if t0:
                rt.latency.observe(self.loop.time() - t0)
        self.close(linger=_LINGER)

    # --- dispatch -------------------------------------------------------------------

    def _next(self) -> None:
        if self.busy or self.closed or not self.queue:
            return
        if self.rt.retired:  # a reload changed the VIP: its next request follows the new one
            self._migrate()
        req = self.queue[0]
        self.busy = True
        self.current = req
        self.attempts = 0
        self.phase = _BUSY
        self.stamp = 0.0
        self._dispatch(req)
        if self.cont and req is self.req and not self.closed:
            self._continue()  # its body may come now (held until a backend takes it)

    def _dispatch(self, req: L7Request) -> None:
        rt = self.rt
        picker = rt.picker
        # the usual case inline: Maglev's pick for this client still current
        if picker.kind is Scheduler.MAGLEV and self.pick_gen == rt.pool.generation:
            i = self.pick
        else:
            i = choose_backend(self, rt)
        if i < 0:
            rt.error("no_healthy_backend")
            self.queue.clear()
            self.req = None
            self.respond_error(503)
            return
        self.backend = i
        picker.active[i] += 1
        rt.stats.requests += 1
        if req.ws:  # a websocket request takes a fresh connection
            self._open(i, req)
            return
        idle = rt.idle[i]
        up = idle.pop() if idle else None
        if up is not None and (up.lost or up.t.is_closing()):
            up = pooled(rt, i)
        if up is None:
            self._open(i, req)
            return
        self.up = up
        up.start(self, req)
        if self.wfull or self.hold & _H_BUF:
            self._attached(up)

    def _attach(self, up: L7Upstream, req: L7Request) -> None:
        """``up`` takes ``req``: its head and what came of its body go out now."""
        self.up = up
        up.start(self, req)
        self._attached(up)

    def _attached(self, up: L7Upstream) -> None:
        if self.wfull:  # our write buffer is full: it reads once the client catches up
            up.t.pause_reading()
        if self.hold & _H_BUF:
            self._resume(_H_BUF)

    def _open(self, i: int, req: L7Request) -> None:
        """A new backend connection (none pooled): the only per-request future."""
        rt = self.rt

        def connected(up: L7Upstream | None, reason: str, status: int) -> None:
            if self.closed or self.current is not req:
                if up is not None:
                    up.t.close()
                return
            if up is None:
                self._give_up(i, reason, status)
                return
            if up.t is not None:
                up.t.set_write_buffer_limits(high=rt.write_high)
            self.stamp = 0.0  # the response timeout starts now
            self._attach(up, req)

        open_backend(rt, i, self.loop, self.listen_port, self.opts.timeouts.connect, connected)

    def _give_up(self, index: int, reason: str, status: int) -> None:
        self.rt.picker.release(index)
        self.rt.error(reason, index)
        self.backend = -1
        self.busy = False
        self.queue.clear()
        self.req = None
        self.respond_error(status)

    # --- from the upstream (see the module's docstring) -----------------------------

    def relay(self, data: bytes) -> None:
        """Response bytes for the client (1xx heads, the final response, tunnel bytes)."""
        if not self.closed:
            self.nout += len(data)
            self.batch.write(self.t, data)

    def backend_full(self, full: bool) -> None:
        """The backend's write buffer crossed its high (``full``) or low mark."""
        if full:
            self._pause(_H_UP)
        else:
            self._resume(_H_UP)

    def backend_eof(self) -> bool | None:
        """A tunnel's backend half-closed: half-close the client; None closes the backend."""
        self.batch.flush()  # what came before the EOF goes first
        if not self.closed and self.t.can_write_eof():
            self.t.write_eof()
        if self.eof:
            self.close()
            return None
        return True

    def tunnel(self, up: L7Upstream, head: bytes) -> None:
        """The backend switched protocols: relay its 101, then bytes both ways."""
        rt = self.rt
        st = rt.stats
        st.interim["upgraded"] += 1
        st.responses[0] += 1
        rt.backend_stats[self.backend].responses[0] += 1
        req = self.queue.popleft() if self.queue else None
        if req is not None:
            rt.latency.observe(self.loop.time() - req.t0)
        self.current = None
        self.piped = True
        self.phase = _TUNNEL
        self.stamp = 0.0
        if self.closed:
            return
        self.batch.flush()  # the response bytes before it (a tunnel writes directly)
        self.nout += len(head)
        self.t.write(head)
        early = self.early
        self.early = None
        if early:  # sent by the client before the 101: the new protocol's first bytes
            up.t.write(bytes(early))
        self._resume(_H_EARLY | _H_PIPE)
        if self.eof and up.t.can_write_eof():
            up.t.write_eof()

    def response_done(self, up: L7Upstream) -> None:
        queue = self.queue
        req = queue.popleft() if queue else None
        rt = self.rt
        i = self.backend
        rt.picker.active[i] -= 1
        k = response_class(up.status)
        rt.stats.responses[k] += 1
        rt.backend_stats[i].responses[k] += 1
        if req is not None:
            rt.latency.observe(self.loop.time() - req.t0)
        self.backend = -1
        self.up = None
        self.busy = False
        self.current = None
        if self.hold:
            self._resume(_H_UP)
        if self.wfull:  # we had paused its reading (pause_writing): a pooled one reads
            up.t.resume_reading()
        keep_client = up.keep and req is not None and req.keep
        if req is not None and not req.complete:
            # Answered before its whole body came (a backend's early 413 or 401): that
            # backend connection may still expect body bytes, and the client sends them.
            up.keep = False
            self.req = None
            up.finish()
            self.close(linger=_LINGER)
            return
        if rt.admission.closing and not queue and not self.in_head:
            keep_client = False  # a graceful stop: no next request on this connection
        up.finish()
        if not keep_client:
            self.close()
            return
        early = self.early
        if early is not None:  # a websocket request not switched: what followed is HTTP
            self.early = None
            self.parser = httptools.HttpRequestParser(self)
        if queue:
            if self.hold and len(queue) <= 8 and not self.err:
                self._resume(_H_PIPE)
            self._next()
            return
        if self.err:  # a rejected request waited for the responses before it
            self.respond_error(self.err)
            return
        if self.eof and not early:  # the client half-closed after its last request
            self.close()
            return
        if self.hold:
            self._resume(_H_PIPE | _H_EARLY)
        self.phase = _HEAD if self.in_head else _IDLE
        self.stamp = 0.0
        if early:
            self.nin -= len(early)
            self.data_received(bytes(early))

    def backend_failed(self, up: L7Upstream, reason: str, status: int) -> None:
        if self.up is not up:
            return
        index = self.backend
        self.up = None
        up.client = None
        up.keep = False
        self.rt.backend_stats[index].bytes_out += up.sent
        if up.t is not None:
            up.t.abort()
        self._resume(_H_UP)
        req = self.current
        if (
            reason == "backend_reset"
            and up.reused
            and up.sent == 0
            and self.attempts == 0
            and req is not None
            and req.replayed <= REPLAY_BYTES
        ):
            # A pooled connection the backend had closed: try once on a fresh one, with
            # the body bytes it took (at most REPLAY_BYTES of them) sent again.
            self.attempts = 1
            self.rt.picker.release(index)
            self.rt.stats.requests -= 1
            self.rt.idle[index].clear()
            self.stamp = 0.0
            if req.replay:
                req.buf = req.replay + (req.buf or [])
                req.buffered += req.replayed
                req.replay = None
                req.replayed = 0
            self._dispatch(req)
            return
        self.rt.picker.release(index)
        self.rt.error(reason, index)
        self.backend = -1
        self.busy = False
        self.queue.clear()
        self.req = None
        if up.at_start:  # no byte of the final response went out: answer it ourselves
            self.respond_error(status)
        else:
            self.close(abort=True)

    def pause_writing(self) -> None:
        self.wfull = True
        up = self.up
        if up is not None and up.t is not None:
            up.t.pause_reading()

    def resume_writing(self) -> None:
        self.wfull = False
        up = self.up
        if up is not None and up.t is not None:
            up.t.resume_reading()

    def eof_received(self) -> bool:
        # The client finished sending; answer what is queued, then close.
        self.eof = True
        up = self.up
        if self.piped and up is not None and up.t is not None:  # half-close the tunnel
            self.batch.flush()  # what came before the EOF goes first
            if up.t.can_write_eof():
                up.t.write_eof()
            if up.eof:
                self.close()
                return False
            return True
        if self.req is not None and not self.err:  # in the middle of a body: never whole
            self.rt.error("client_gone")
            self.close(abort=True)
            return False
        if not self.busy and not self.queue:
            self.close()
            return False
        return True

    def _migrate(self) -> None:
        """Between two requests, move to the VIP's runtime after a reload (if still l7)."""
        new = self.rt.successor
        while new is not None and new.retired:
            new = new.successor
        if new is None or not new.is_l7:
            return  # the VIP was removed, or is proxy-l4 now: the old one serves it to its end
        self.rt = new
        self.opts = opts = new.l7
        self.limit = _NO_LIMIT if opts.max_request_bytes is None else opts.max_request_bytes
        self.trusted = bool(opts.trusted_sources) and is_trusted(self.client, opts.trusted_sources)
        ours = self.ours or client_forwarding(self.client, self.client_port, self.proto)
        fwd = opts.forwarded_headers and not self.trusted
        self.block = forwarding_block(ours, self.proto) if fwd else None
        self.pick_gen = -1

    def quiesce(self) -> None:
        """A graceful stop: close now if between requests; else after the response."""
        if (
            not self.closed
            and not self.busy
            and not self.queue
            and not self.in_head
            and not self.err
            and self.phase != _BODY
        ):
            self.close()

    def cut(self, index: int) -> None:
        """Backend ``index`` was disabled: end the request it is serving (502, or abort)."""
        if self.closed or self.backend != index:
            return
        up = self.up
        if up is not None:
            self.backend_failed(up, "backend_disabled", 502)
        else:  # still connecting
            self._give_up(index, "backend_disabled", 502)

    def connection_lost(self, exc: Exception | None) -> None:
        up = self.up
        if up is not None and not self.piped:
            # Mid-response (or mid-body): that backend connection cannot be reused.
            self.up = None
            up.client = None
            up.keep = False
            if up.t is not None:
                up.t.abort()
            if self.backend >= 0:
                self.rt.picker.release(self.backend)
                self.backend = -1
            if not self.closed:
                self.rt.error("client_gone")
        self.close()

    # --- counters, timeouts, closing ----------------------------------------------

    def counts(self) -> tuple[int, int, int, int]:
        """Bytes (from the client, to the client) so far; backends count per request."""
        return self.nin, self.nout, 0, 0

    def sweep(self, now: float) -> None:
        """Called by the VIP's periodic sweep: stamp a new phase, or enforce its timeout."""
        if self.closed:
            return
        phase = self.phase
        token = -1
        up = self.up
        if phase == _BUSY:
            if up is None:  # connecting: the connect timer covers it
                self.stamp = 0.0
                return
            token = up.sent + self.nin  # a response byte, or a body byte still coming
        elif phase == _TUNNEL:
            token = self.nin + self.nout
        elif phase == _BODY:
            token = self.nin
        if self.stamp == 0.0 or token != self.seen:
            self.stamp = now
            self.seen = token
            return
        limit = self.rt.header_timeout if phase == _HEAD else self.opts.timeouts.idle
        if now - self.stamp < limit:
            return
        if phase == _TUNNEL:
            self.rt.error("idle_timeout")
            self.close()  # a silent tunnel: both ends closed gracefully
        elif phase == _BUSY and up is not None:
            up.keep = False
            req = self.current
            if req is not None and not req.complete:  # the client stopped mid-body
                self.rt.error("request_timeout")
                self.close(abort=True)  # connection_lost aborts the backend's
            else:
                self.backend_failed(up, "response_timeout", 504)
        elif phase == _IDLE:
            self.close()  # a quiet keep-alive connection: no error
        elif phase == _HEAD:
            self.rt.error("header_timeout")
            self.respond_error(408)  # as HAProxy does for "timeout http-request"
        else:
            self.rt.error("request_timeout")
            self.close(abort=True)

    def buffered(self) -> int:
        """Bytes this connection holds in user space: request bodies waiting for a
        backend, bytes after a websocket request, and both transports' write buffers."""
        n = len(self.early) if self.early else 0
        for req in self.queue:
            n += req.buffered
        for t in (self.t, self.up.t if self.up is not None else None):
            if t is not None:
                n += t.get_write_buffer_size()
        return n

    def close(self, abort: bool = False, linger: float = 0.0) -> None:
        """Close; with ``linger``, half-close after what is written and drop what the
        client still sends for that long (a lingering close, RFC 9112 section 9.6): closing
        with unread data would send a RST, which can destroy the answer before the client
        reads it (a 408 to a client still sending its head)."""
        if self.closed:
            return
        self.batch.flush()  # queued writes (a response, an error answer) go first
        self.closed = True
        rt = self.rt
        rt.live.discard(self)
        rt.release(self)
        rt.stats.active -= 1
        rt.add_counts(-1, self.counts())
        up = self.up
        if self.piped and up is not None:  # a tunnel: its backend connection ends too
            self.up = None
            up.client = None
            if self.backend >= 0:
                rt.backend_stats[self.backend].bytes_out += up.sent
            if up.t is not None and not up.t.is_closing():
                if abort:
                    up.t.abort()
                else:
                    up.t.close()
        if self.backend >= 0:  # a backend connection still being opened, or a tunnel's
            rt.picker.release(self.backend)
            self.backend = -1
        t = self.t
        if t is not None and not t.is_closing():
            if abort:
                t.abort()
            elif linger and t.can_write_eof():
                t.write_eof()  # data_received drops what comes now (closed)
                with contextlib.suppress(RuntimeError, AttributeError):
                    t.resume_reading()  # if backpressure had paused it: read and drop
                self.loop.call_later(linger, t.close)
            else:
                t.close()
