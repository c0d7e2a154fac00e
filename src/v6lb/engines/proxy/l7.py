"""``proxy-l7``: HTTP/1.1 with httptools, keep-alive both ways and pooled backend connections.

A client connection (:class:`L7Client`) parses requests with
``httptools.HttpRequestParser``; each request is buffered whole (bounded by
``max_request_bytes``), its head rewritten by :func:`.policy.build_request_head`
(forwarding headers) and sent on a pooled keep-alive connection to the picked
backend (:class:`L7Upstream`). The response is relayed to the client byte for
byte as it arrives, parsed with ``HttpResponseParser`` only to find its end;
then the backend connection goes back to the pool if both sides keep it alive.
Requests pipelined by a client are answered in order, one at a time.

The proxy answers by itself: 400 (unparsable), 413 (body over
``max_request_bytes``), 431 (head over ``max_header_bytes``), 502 (backend
refused, reset or sent garbage before the response began), 503 (no healthy
backend) and 504 (connect timeout, or no response byte for ``timeouts.idle``).
A backend that fails *after* response bytes went out makes the client
connection close: the response is incomplete, and the client must see that.
"""

from __future__ import annotations

import asyncio
from collections import deque
from ipaddress import IPv4Address, IPv6Address
from typing import Any, cast

import httptools

from .policy import build_request_head, client_forwarding, error_response, is_trusted
from .runtime import VipRuntime, client_of

__all__ = ["L7Client", "L7Upstream"]


class _Request:
    __slots__ = ("head", "body", "method", "keep_alive")

    def __init__(self, head: bytes, body: bytes, method: bytes, keep_alive: bool) -> None:
        self.head = head
        self.body = body
        self.method = method
        self.keep_alive = keep_alive


class L7Upstream(asyncio.Protocol):
    """One keep-alive connection to a backend; pooled between requests."""

    __slots__ = (
        "rt",
        "index",
        "loop",
        "t",
        "parser",
        "client",
        "head_only",
        "sent",
        "done",
        "reused",
        "timer",
        "lost",
        "keep",
    )

    def __init__(self, rt: VipRuntime, index: int) -> None:
        self.rt = rt
        self.index = index
        self.loop = asyncio.get_running_loop()
        self.t: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: L7Client | None = None
        self.head_only = False
        self.sent = 0  # response bytes relayed for the current request
        self.done = False
        self.reused = False
        self.timer: asyncio.TimerHandle | None = None
        self.lost = False
        self.keep = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def start(self, client: L7Client, req: _Request) -> None:
        assert self.t is not None
        self.client = client
        self.head_only = req.method == b"HEAD"
        self.sent = 0
        self.done = False
        self.keep = True
        bs = self.rt.backend_stats[self.index]
        bs.requests += 1
        bs.bytes_in += len(req.head) + len(req.body)
        if req.body:
            self.t.write(req.head + req.body)
        else:
            self.t.write(req.head)
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(self.rt.l7.timeouts.idle, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        c = self.client
        if c is not None and not self.done:
            self.keep = False
            c.backend_failed(self, "response_timeout", 504)

    def data_received(self, data: bytes) -> None:
        c = self.client
        if c is None:  # unsolicited bytes on an idle pooled connection
            self.rt.error("backend_unsolicited", self.index)
            self.keep = False
            if self.t is not None:
                self.t.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.keep = False
            if not self.done:
                c.backend_failed(self, "backend_bad_response", 502)
            return
        n = len(data)
        self.sent += n
        self.rt.backend_stats[self.index].bytes_out += n
        c.relay(data)
        if self.done:
            c.response_done(self)
        elif self.timer is not None:
            self._arm()

    def on_headers_complete(self) -> None:
        if self.head_only:
            self.done = True
            self.keep = False  # the parser still expects a body: do not reuse

    def on_message_complete(self) -> None:
        self.done = True
        if not self.parser.should_keep_alive():
            self.keep = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        idle = self.rt.idle[self.index]
        if self in idle:
            idle.remove(self)
        c = self.client
        if c is not None and not self.done:
            c.backend_failed(self, "backend_reset", 502)

    def finish(self) -> None:
        """The response is complete: back to the pool, or closed."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.client = None
        if self.keep and not self.lost and self.t is not None and not self.t.is_closing():
            self.reused = True
            self.rt.idle[self.index].append(self)
        elif self.t is not None:
            self.t.close()

    def pause_writing(self) -> None:  # request bodies are bounded; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass


class L7Client(asyncio.Protocol):
    __slots__ = (
        "rt",
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
        "body",
        "blen",
        "err",
        "timer",
        "paused",
        "attempts",
        "current",
        "ours",
    )

    def __init__(self, rt: VipRuntime) -> None:
        self.rt = rt
        self.loop = asyncio.get_running_loop()
        self.t: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client: IPv4Address | IPv6Address = IPv6Address(0)
        self.client_port = 0
        self.listen_port = 0
        self.trusted = False
        self.queue: deque[_Request] = deque()
        self.busy = False
        self.up: L7Upstream | None = None
        self.backend = -1
        self.closed = False
        self.in_head = False
        self.head_raw = 0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.hsize = 0
        self.body: list[bytes] = []
        self.blen = 0
        self.err = 0
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.attempts = 0
        self.current: _Request | None = None
        self.ours: tuple[str, str] | None = None

    # --- timers ---------------------------------------------------------------------

    def _arm(self, delay: float, reason: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(delay, self._expire, reason)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self, reason: str) -> None:
        self.timer = None
        if reason == "client_idle":
            self.close()  # a quiet keep-alive connection: no error
        else:
            self.rt.error(reason)
            self.close(abort=True)

    # --- client side ----------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's transports are not subclasses
        self.t = transport
        rt = self.rt
        st = rt.stats
        st.connections += 1
        if st.active >= rt.max_connections:
            rt.error("over_max_connections")
            self.closed = True
            transport.abort()
            return
        st.active += 1
        rt.live.add(self)
        transport.set_write_buffer_limits(high=rt.write_high)
        self.client, self.client_port = client_of(transport.get_extra_info("peername"))
        self.listen_port = int(transport.get_extra_info("sockname")[1])
        self.ours = client_forwarding(self.client, self.client_port)
        self.trusted = bool(rt.l7.trusted_sources) and is_trusted(
            self.client, rt.l7.trusted_sources
        )
        self._arm(rt.header_timeout, "header_timeout")

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        n = len(data)
        self.rt.stats.bytes_in += n
        if not self.in_head and not self.busy and not self.queue:
            self._arm(self.rt.header_timeout, "header_timeout")
        self.head_raw += n
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.err = self.err or 400
        except httptools.HttpParserError:
            self.err = self.err or 400
        if not self.err and self.in_head and self.head_raw > self.rt.l7.max_header_bytes:
            self.err = 431
        if self.err:
            self._reject(self.err)
            return
        if len(self.queue) > 8 and not self.paused and self.t is not None:
            self.paused = True
            self.t.pause_reading()
        self._next()

    def on_message_begin(self) -> None:
        self.in_head = True
        self.url = b""
        self.headers = []
        self.hsize = 0
        self.body = []
        self.blen = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.hsize += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.hsize += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_raw = 0
        if self.hsize > self.rt.l7.max_header_bytes:
            self.err = 431
        if not self.busy and not self.queue:
            self._arm(self.rt.l7.timeouts.idle, "request_timeout")

    def on_body(self, body: bytes) -> None:
        self.blen += len(body)
        if self.blen > self.rt.l7.max_request_bytes:
            self.err = self.err or 413
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.err:
            return
        rt = self.rt
        opts = rt.l7
        body = b"".join(self.body)
        method = self.parser.get_method()
        head = build_request_head(
            method,
            self.url,
            self.headers,
            len(body),
            client=self.client,
            client_port=self.client_port,
            trusted=self.trusted,
            add_forwarding=opts.forwarded_headers,
            ours=self.ours,
        )
        self.queue.append(_Request(head, body, method, self.parser.should_keep_alive()))
        self.head_raw = 0
        self.body = []
        self.headers = []

    def _reject(self, status: int) -> None:
        reasons = {400: "bad_request", 413: "request_too_large", 431: "headers_too_large"}
        self.rt.error(reasons.get(status, f"http_{status}"))
        self.respond_error(status)

    def respond_error(self, status: int) -> None:
        """Answer ``status`` by ourselves and close (after any response in progress)."""
        t = self.t
        if t is not None and not t.is_closing():
            t.write(error_response(status))
        self.close()

    # --- dispatch -------------------------------------------------------------------

    def _next(self) -> None:
        if self.busy or self.closed or not self.queue:
            return
        req = self.queue[0]
        self.busy = True
        self.current = req
        self.attempts = 0
        self._disarm()
        self._dispatch(req)

    def _dispatch(self, req: _Request) -> None:
        rt = self.rt
        i = rt.picker.pick(self.client)
        if i < 0:
            rt.error("no_healthy_backend")
            self.queue.clear()
            self.respond_error(503)
            return
        self.backend = i
        rt.picker.acquire(i)
        rt.stats.requests += 1
        idle = rt.idle[i]
        while idle:
            up = idle.pop()
            if not up.lost and up.t is not None and not up.t.is_closing():
                self.up = up
                up.start(self, req)
                return
        bs = rt.backend_stats[i]
        bs.connections += 1
        coro = self.loop.create_connection(
            lambda: L7Upstream(rt, i), rt.hosts[i], rt.backend_port(i, self.listen_port)
        )
        task = self.loop.create_task(coro)
        timer = self.loop.call_later(rt.l7.timeouts.connect, task.cancel)

        def connected(task: asyncio.Task[Any]) -> None:
            timer.cancel()
            if self.closed:
                if not task.cancelled() and task.exception() is None:
                    task.result()[0].close()
                return
            if task.cancelled():
                self._give_up(i, "connect_timeout", 504)
                return
            exc = task.exception()
            if exc is not None:
                self._give_up(i, "connect_failed", 502)
                return
            _, up = task.result()
            if up.t is not None:
                up.t.set_write_buffer_limits(high=rt.write_high)
            self.up = up
            up.start(self, req)

        task.add_done_callback(connected)

    def _give_up(self, index: int, reason: str, status: int) -> None:
        self.rt.picker.release(index)
        self.rt.error(reason, index)
        self.backend = -1
        self.busy = False
        self.queue.clear()
        self.respond_error(status)

    # --- from the upstream ----------------------------------------------------------

    def relay(self, data: bytes) -> None:
        t = self.t
        if t is not None and not t.is_closing():
            self.rt.stats.bytes_out += len(data)
            t.write(data)

    def response_done(self, up: L7Upstream) -> None:
        req = self.queue.popleft() if self.queue else None
        self.rt.picker.release(self.backend)
        self.backend = -1
        self.up = None
        self.busy = False
        keep_client = up.keep and req is not None and req.keep_alive
        up.finish()
        if self.paused and self.t is not None and len(self.queue) <= 8:
            self.paused = False
            self.t.resume_reading()
        if not keep_client:
            self.close()
            return
        if self.queue:
            self._next()
        elif not self.in_head:
            self._arm(self.rt.l7.timeouts.idle, "client_idle")

    def backend_failed(self, up: L7Upstream, reason: str, status: int) -> None:
        if self.up is not up:
            return
        index = self.backend
        self.up = None
        up.client = None
        up.keep = False
        if up.t is not None:
            up.t.abort()
        if (
            reason == "backend_reset"
            and up.reused
            and up.sent == 0
            and self.attempts == 0
            and self.current is not None
        ):
            # A pooled connection the backend had closed: try once on a fresh one.
            self.attempts = 1
            self.rt.picker.release(index)
            self.rt.stats.requests -= 1
            self.rt.idle[index].clear()
            self._dispatch(self.current)
            return
        self.rt.picker.release(index)
        self.rt.error(reason, index)
        self.backend = -1
        self.busy = False
        self.queue.clear()
        if up.sent == 0:
            self.respond_error(status)
        else:
            self.close(abort=True)

    def pause_writing(self) -> None:
        up = self.up
        if up is not None and up.t is not None:
            up.t.pause_reading()

    def resume_writing(self) -> None:
        up = self.up
        if up is not None and up.t is not None:
            up.t.resume_reading()

    def eof_received(self) -> bool:
        # The client finished sending; answer what is queued, then close.
        if not self.busy and not self.queue:
            self.close()
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        up = self.up
        if up is not None:
            # Mid-response: that backend connection cannot be reused.
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

    def buffered(self) -> int:
        n = len(self.pending) if hasattr(self, "pending") else 0
        for t in (self.t, self.up.t if self.up is not None else None):
            if t is not None:
                n += t.get_write_buffer_size()
        return n

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.rt.live.discard(self)
        self.rt.stats.active -= 1
        self._disarm()
        if self.backend >= 0:  # a backend connection was still being opened
            self.rt.picker.release(self.backend)
            self.backend = -1
        t = self.t
        if t is not None and not t.is_closing():
            if abort:
                t.abort()
            else:
                t.close()
