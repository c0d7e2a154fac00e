"""``proxy-l4``: a TCP relay with PROXY v2, backpressure, half-close and timeouts.

One :class:`L4Client` per accepted connection, one :class:`L4Upstream` per
backend connection. Data is relayed as it arrives; each side's write buffer
limit pauses the *other* side's reading (``pause_writing`` → ``pause_reading``),
so a slow reader never makes the proxy buffer more than about one high-water
mark plus one read per direction. Client bytes that arrive before the backend
connection is up are kept in a buffer (uvloop ignores ``pause_reading`` inside
``connection_made``), and reading pauses once that buffer passes the high-water
mark.

Half-close: EOF from one side becomes ``write_eof`` on the other; the
connection closes when both directions have ended or either side is lost.

PROXY v2 in: only a peer inside ``trusted_proxy_sources`` may (and then must)
start with a PROXY v2 header; the header's source becomes the client. A PROXY
v2 signature from any other peer is refused and counted (``proxy_v2_untrusted``).
"""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv6Address
from typing import Any, cast

from v6lb.core import proxyproto
from v6lb.model.config import ProxyProtocol

from .policy import is_trusted, unmap
from .runtime import VipRuntime, client_of

__all__ = ["L4Client", "L4Upstream"]

_WAIT_PP = 0  # a trusted peer: waiting for its PROXY v2 header
_CHECK = 1  # an untrusted peer: the first bytes must not be a PROXY v2 signature
_RELAY = 2


class L4Upstream(asyncio.Protocol):
    __slots__ = ("c", "t", "eof")

    def __init__(self, client: L4Client) -> None:
        self.c = client
        self.t: asyncio.Transport | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.c.upstream_made(self)

    def data_received(self, data: bytes) -> None:
        c = self.c
        c.last = c.loop.time()
        c.rt.stats.bytes_out += len(data)
        c.bstats_out(len(data))
        if c.t is not None and not c.t.is_closing():
            c.t.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        c = self.c
        if c.t is not None and not c.t.is_closing() and c.t.can_write_eof():
            c.t.write_eof()
        if c.eof:
            c.close()
            return False
        return True

    def pause_writing(self) -> None:
        if self.c.t is not None:
            self.c.t.pause_reading()

    def resume_writing(self) -> None:
        if self.c.t is not None:
            self.c.t.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.c.closed:
            self.c.rt.error("backend_reset", self.c.backend)
        self.c.close()


class L4Client(asyncio.Protocol):
    __slots__ = (
        "rt",
        "loop",
        "t",
        "up",
        "state",
        "pending",
        "eof",
        "closed",
        "backend",
        "client",
        "client_port",
        "local",
        "local_port",
        "last",
        "timers",
        "connect_task",
        "paused",
    )

    def __init__(self, rt: VipRuntime) -> None:
        self.rt = rt
        self.loop = asyncio.get_running_loop()
        self.t: asyncio.Transport | None = None
        self.up: L4Upstream | None = None
        self.state = _CHECK
        self.pending = bytearray()
        self.eof = False
        self.closed = False
        self.backend = -1
        self.client: IPv4Address | IPv6Address = IPv6Address(0)
        self.client_port = 0
        self.local: IPv4Address | IPv6Address = IPv6Address(0)
        self.local_port = 0
        self.last = 0.0
        self.timers: list[asyncio.TimerHandle] = []
        self.connect_task: asyncio.Task[Any] | None = None
        self.paused = False

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
        self.local, self.local_port = client_of(transport.get_extra_info("sockname"))
        self.last = self.loop.time()
        opts = rt.l4
        t = opts.timeouts
        self.timers.append(self.loop.call_later(t.idle, self._idle_check))
        if t.total:
            self.timers.append(self.loop.call_later(t.total, self._fail, "total_timeout"))
        if opts.trusted_proxy_sources and is_trusted(self.client, opts.trusted_proxy_sources):
            self.state = _WAIT_PP
            self.timers.append(self.loop.call_later(t.connect, self._fail, "proxy_v2_timeout"))
        else:
            self.state = _CHECK
            self._connect()

    def data_received(self, data: bytes) -> None:
        self.last = self.loop.time()
        self.rt.stats.bytes_in += len(data)
        up = self.up
        if self.state == _RELAY and up is not None and up.t is not None:
            self.bstats_in(len(data))
            up.t.write(data)
            return
        self.pending += data
        if self.state == _WAIT_PP:
            try:
                got = proxyproto.decode(self.pending)
            except proxyproto.ProxyProtocolError:
                self._fail("proxy_v2_malformed")
                return
            if got is None:
                if len(self.pending) > proxyproto.MAX_LEN:
                    self._fail("proxy_v2_malformed")
                return
            header, used = got
            del self.pending[:used]
            self.timers.pop().cancel()
            if not header.is_local and isinstance(header.src, IPv4Address | IPv6Address):
                self.client = unmap(header.src)
                self.client_port = header.src_port
                if isinstance(header.dst, IPv4Address | IPv6Address):
                    self.local = unmap(header.dst)
                    self.local_port = header.dst_port
            self.state = _RELAY
            self._connect()
        elif self.state == _CHECK:
            found = proxyproto.detect(self.pending)
            if found is None:
                return
            if found:
                self._fail("proxy_v2_untrusted")
                return
            self.state = _RELAY
            self._flush()
        if len(self.pending) > self.rt.write_high and not self.paused and self.t is not None:
            self.paused = True
            self.t.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.state == _CHECK:  # the stream ended before a signature could be told
            self.state = _RELAY
            self._flush()
            return True
        up = self.up
        if self.state == _RELAY and up is not None and up.t is not None and not self.pending:
            if up.t.can_write_eof():
                up.t.write_eof()
            if up.eof:
                self.close()
                return False
        return True

    def pause_writing(self) -> None:
        if self.up is not None and self.up.t is not None:
            self.up.t.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and self.up.t is not None:
            self.up.t.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.closed:
            self.rt.error("client_reset", self.backend)
        self.close()

    # --- upstream -------------------------------------------------------------------

    def _connect(self) -> None:
        rt = self.rt
        i = rt.picker.pick(self.client)
        if i < 0:
            self._fail("no_healthy_backend")
            return
        self.backend = i
        rt.picker.acquire(i)
        bs = rt.backend_stats[i]
        bs.connections += 1
        bs.active += 1
        port = rt.backend_port(i, self._listen_port())
        coro = self.loop.create_connection(lambda: L4Upstream(self), rt.hosts[i], port)
        self.connect_task = self.loop.create_task(coro)
        self.connect_task.add_done_callback(self._connected)
        self.timers.append(self.loop.call_later(rt.l4.timeouts.connect, self._connect_timeout))

    def _listen_port(self) -> int:
        if self.t is None:
            return 0
        return int(self.t.get_extra_info("sockname")[1])

    def _connect_timeout(self) -> None:
        task = self.connect_task
        if task is not None and not task.done():
            task.cancel()
            self._fail("connect_timeout")

    def _connected(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._fail("connect_failed")

    def upstream_made(self, up: L4Upstream) -> None:
        self.up = up
        if self.closed:
            if up.t is not None:
                up.t.close()
            return
        assert up.t is not None
        up.t.set_write_buffer_limits(high=self.rt.write_high)
        if self.rt.l4.proxy_protocol is ProxyProtocol.V2:
            up.t.write(
                proxyproto.encode_proxy(self.client, self.local, self.client_port, self.local_port)
            )
        self._flush()

    def _flush(self) -> None:
        up = self.up
        if self.state != _RELAY or up is None or up.t is None:
            return
        if self.pending:
            self.bstats_in(len(self.pending))
            up.t.write(bytes(self.pending))
            self.pending.clear()
        if self.paused and self.t is not None:
            self.paused = False
            self.t.resume_reading()
        if self.eof:
            if up.t.can_write_eof():
                up.t.write_eof()
            if up.eof:
                self.close()

    # --- counters, timers, closing ------------------------------------------------

    def bstats_in(self, n: int) -> None:
        if self.backend >= 0:
            self.rt.backend_stats[self.backend].bytes_in += n

    def bstats_out(self, n: int) -> None:
        if self.backend >= 0:
            self.rt.backend_stats[self.backend].bytes_out += n

    def _idle_check(self) -> None:
        if self.closed:
            return
        idle = self.rt.l4.timeouts.idle
        left = self.last + idle - self.loop.time()
        if left <= 0:
            self._fail("idle_timeout")
        else:
            self.timers.append(self.loop.call_later(left, self._idle_check))

    def _fail(self, reason: str) -> None:
        if self.closed:
            return
        self.rt.error(reason, self.backend)
        self.close(abort=True)

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
        rt = self.rt
        rt.live.discard(self)
        rt.stats.active -= 1
        if self.backend >= 0:
            rt.picker.release(self.backend)
            rt.backend_stats[self.backend].active -= 1
        for h in self.timers:
            h.cancel()
        self.timers.clear()
        task = self.connect_task
        if task is not None and not task.done():
            task.cancel()
        for t in (self.t, self.up.t if self.up is not None else None):
            if t is not None and not t.is_closing():
                if abort:
                    t.abort()
                else:
                    t.close()
