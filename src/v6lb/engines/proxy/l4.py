"""``proxy-l4``: a TCP relay with PROXY v2, backpressure, half-close and timeouts.

One :class:`L4Client` per accepted connection, one :class:`L4Upstream` per
backend connection. Data is relayed as it arrives; each side's write buffer
limit pauses the *other* side's reading (``pause_writing`` → ``pause_reading``),
so a slow reader never makes the proxy buffer more than about one high-water
mark plus one read per direction. Client bytes that arrive before the backend
connection is up are kept in a buffer (uvloop ignores ``pause_reading`` inside
``connection_made``), and reading pauses once that buffer passes the high-water
mark.

The relay path is one attribute test, one counter and one ``transport.write``
per chunk: no timer is touched per chunk. Timeouts (connect, idle, total, the
wait for an inbound PROXY v2 header) are checked by the VIP's periodic sweep
(:meth:`L4Client.sweep`, see :class:`.runtime.VipRuntime`): idleness is seen as
"the byte counters did not move", so a timeout fires at most two sweep periods
(a quarter of the shortest timeout) late, and never early.

Half-close: EOF from one side becomes ``write_eof`` on the other; the
connection closes when both directions have ended or either side is lost.

``relay: kernel``: once relaying with both write buffers empty, the connection is
handed to :mod:`.kernel_relay` (``link``): a BPF sockmap moves the bytes, the
sweep reads its counters, and :meth:`L4Client.kernel_eof` passes on an EOF the
kernel relay saw once its bytes were delivered.

PROXY v2 in: only a peer inside ``trusted_proxy_sources`` may (and then must)
start with a PROXY v2 header; the header's source becomes the client. Any other
peer's first bytes (and a trusted peer's first bytes after its header) are
looked at before a backend connection is opened
(:func:`.policy.client_proxy_header`): a PROXY v2 signature or a PROXY v1 text
header is refused and counted (``proxy_v2_untrusted``, ``proxy_v1_untrusted``);
bytes that may still become one (``\r\n\r``, ``PROX``) wait for more, up to
``timeouts.connect`` (then ``proxy_prefix_timeout``); anything else, including
data that merely starts with ``P``, is relayed. A peer that sends nothing for
:data:`FIRST_BYTES_WAIT` seconds (a protocol where the server speaks first) gets
its backend connection then, and its first bytes are checked when they come.

TLS passthrough (``sni_routes``, model/sni.py): after that check, the first bytes
must be a TLS ClientHello (:func:`v6lb.wire.tlshello.parse_client_hello`, read from
``pending``, never terminated); its SNI chooses the route, whose picker chooses the
backend, and the buffered bytes are then relayed as they came. No backend connection
is opened before that (no :data:`FIRST_BYTES_WAIT`). Refused and counted:
``tls_hello_not_tls`` / ``_malformed`` / ``_too_big`` / ``_bad_sni`` (the parser's
reasons), ``tls_hello_truncated`` (EOF first), ``tls_hello_timeout`` (no whole
ClientHello within ``timeouts.connect`` of the accept), ``tls_unknown_sni`` (an SNI
no route lists, with ``unknown_sni: refuse``). With ``proxy_protocol: v2`` the SNI
goes to the backend as a ``PP2_TYPE_AUTHORITY`` TLV.
"""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv6Address
from typing import Any, cast

from v6lb.core import proxyproto
from v6lb.model.config import ProxyProtocol
from v6lb.model.sni import route_for
from v6lb.wire.tlshello import HelloError, parse_client_hello

from .kernel_relay import KernelLink
from .policy import Picker, client_proxy_header, is_trusted, unmap
from .runtime import BATCH_BELOW, VipRuntime, client_of

__all__ = ["FIRST_BYTES_WAIT", "L4Client", "L4Upstream"]

# How long an untrusted peer's first bytes are awaited before connecting anyway.
FIRST_BYTES_WAIT = 0.05

_WAIT_PP = 0  # a trusted peer: waiting for its PROXY v2 header
_CHECK = 1  # an untrusted peer: the first bytes must not be a PROXY header (v1 or v2)
_RELAY = 2  # relaying (client bytes go to ``pending`` until the backend is connected)
_HELLO = 3  # TLS passthrough (sni_routes): reading the ClientHello to choose the route


class L4Upstream(asyncio.Protocol):
    __slots__ = ("c", "t", "ct", "eof", "n", "b")

    def __init__(self, client: L4Client) -> None:
        self.c = client
        self.b = client.batch  # relay writes go out after this loop iteration's reads
        self.t: asyncio.Transport | None = None
        self.ct: Any = client.t  # the client's transport: the hot path writes to it
        self.eof = False
        self.n = 0  # bytes from the backend (relayed to the client)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.c.upstream_made(self)

    def data_received(self, data: bytes) -> None:
        # Both transports are closed together, so a closed client never gets here.
        self.n += len(data)
        items = self.b.items
        if items and len(data) < BATCH_BELOW:  # WriteBatch.write inline: a flush is due
            items.append((self.ct, data))
        else:
            self.b.write(self.ct, data)

    def eof_received(self) -> bool:
        self.eof = True
        c = self.c
        self.b.flush()  # what came before the EOF goes first
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
        "upt",
        "state",
        "pending",
        "eof",
        "closed",
        "backend",
        "client",
        "client_port",
        "local",
        "local_port",
        "born",
        "last",
        "seen",
        "connect_at",
        "connect_task",
        "paused",
        "nin",
        "nslow",
        "flushed",
        "wait",
        "check_at",
        "route",
        "sni",
        "link",
        "splice",
        "batch",
    )

    def __init__(self, rt: VipRuntime) -> None:
        self.rt = rt
        self.loop = asyncio.get_running_loop()
        self.t: asyncio.Transport | None = None
        self.up: L4Upstream | None = None
        self.upt: Any = None  # the backend transport once bytes may flow straight to it
        self.state = _CHECK
        self.pending = bytearray()
        self.eof = False
        self.closed = False
        self.backend = -1
        self.client: IPv4Address | IPv6Address = IPv6Address(0)
        self.client_port = 0
        self.local: IPv4Address | IPv6Address = IPv6Address(0)
        self.local_port = 0
        self.born = 0.0
        self.last = 0.0  # when the sweep last saw the byte counters move
        self.seen = -1  # the byte counters' sum at that sweep
        self.connect_at = 0.0  # when the backend connect began (0: not connecting)
        self.connect_task: asyncio.Task[Any] | None = None
        self.paused = False
        self.nin = 0  # client bytes relayed on the fast path
        self.nslow = 0  # client bytes that went through ``pending``
        self.flushed = 0  # of those, written to the backend
        self.wait: asyncio.TimerHandle | None = None  # FIRST_BYTES_WAIT, then connect anyway
        self.check_at = 0.0  # when bytes that may be a PROXY header began to wait for more
        self.route: Picker | None = None  # TLS passthrough: the picker of the SNI's route
        self.sni: str | None = None
        self.link: KernelLink | None = None  # the kernel relays this connection (kernel_relay)
        self.splice = rt.relay is not None  # may still be handed to the kernel relay
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
        self.local, self.local_port = client_of(transport.get_extra_info("sockname"))
        self.born = self.last = self.loop.time()
        opts = rt.l4
        if opts.trusted_proxy_sources and is_trusted(self.client, opts.trusted_proxy_sources):
            self.state = _WAIT_PP
        else:  # connect once the first bytes are known not to be a PROXY header
            self.state = _CHECK
            if not rt.routes:  # TLS passthrough waits for the ClientHello (the sweep's timeout)
                self.wait = self.loop.call_later(FIRST_BYTES_WAIT, self._no_first_bytes)

    def _no_first_bytes(self) -> None:
        """Nothing came from the peer (the server may speak first): connect now."""
        self.wait = None
        if not self.closed and self.state == _CHECK and not self.pending and self.backend < 0:
            self._connect()

    def data_received(self, data: bytes) -> None:
        upt = self.upt
        if upt is not None:
            self.nin += len(data)
            items = self.batch.items
            if items and len(data) < BATCH_BELOW:  # WriteBatch.write inline: a flush is due
                items.append((upt, data))
            else:
                self.batch.write(upt, data)
            return
        if self.closed:
            return
        self.nslow += len(data)
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
            self.nslow -= used
            if not header.is_local and isinstance(header.src, IPv4Address | IPv6Address):
                self.client = unmap(header.src)
                self.client_port = header.src_port
                if isinstance(header.dst, IPv4Address | IPv6Address):
                    self.local = unmap(header.dst)
                    self.local_port = header.dst_port
            self.state = _CHECK  # what follows must not be a PROXY header either
            self._check()
        elif self.state == _CHECK:
            self._check()
        elif self.state == _HELLO:
            self._hello()
        if self.closed:
            return
        if len(self.pending) > self.rt.write_high and not self.paused and self.t is not None:
            self.paused = True
            self.t.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.state == _WAIT_PP:  # the stream ended inside (or before) the PROXY header
            self._fail("proxy_v2_malformed")
            return False
        if self.state == _HELLO or (self.state == _CHECK and self.rt.routes):
            self._fail("tls_hello_truncated")  # TLS passthrough: no whole ClientHello
            return False
        if self.state == _CHECK:  # the stream ended before a signature could be told
            self._relay()
            return True
        up = self.up
        if self.state == _RELAY and up is not None and up.t is not None and not self.pending:
            self.batch.flush()  # what came before the EOF goes first
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

    def _check(self) -> None:
        """State _CHECK: refuse a PROXY header, wait for bytes that may become one, or relay."""
        if not self.pending:  # right after a trusted peer's header: await the next bytes
            if self.wait is None and self.backend < 0 and not self.rt.routes:
                self.wait = self.loop.call_later(FIRST_BYTES_WAIT, self._no_first_bytes)
            return
        found = client_proxy_header(self.pending)
        if found is None:  # "\r\n\r" or "PROX": more bytes decide
            if not self.check_at:
                self.check_at = self.loop.time()
            return
        if found:  # refused before any backend connection (unless the peer was late)
            self._fail("proxy_v2_untrusted" if found == 2 else "proxy_v1_untrusted")
            return
        if self.rt.routes:
            self.state = _HELLO
            self._hello()
            return
        self._relay()

    def _hello(self) -> None:
        """State _HELLO: choose the route by the ClientHello's SNI, then relay it all."""
        try:
            hello = parse_client_hello(self.pending)
        except HelloError as exc:  # not_tls, malformed, too_big, bad_sni
            self._fail(f"tls_hello_{exc.reason}")
            return
        if hello is None:  # more records are due (the sweep enforces timeouts.connect)
            return
        rt = self.rt
        i = route_for(rt.l4.sni_routes, hello.sni)
        route = rt.routes[i] if i >= 0 else rt.sni_default
        if route is None:  # unknown_sni: refuse
            self._fail("tls_unknown_sni")
            return
        self.route = route
        self.sni = hello.sni
        self._relay()

    # --- upstream -------------------------------------------------------------------

    def _relay(self) -> None:
        """The first bytes are not a PROXY header: connect (if not yet) and relay."""
        self.state = _RELAY
        if self.wait is not None:
            self.wait.cancel()
            self.wait = None
        if self.backend < 0:
            self._connect()  # upstream_made() flushes ``pending``
        else:
            self._flush()

    def _connect(self) -> None:
        rt = self.rt
        i = (self.route if self.route is not None else rt.picker).pick(self.client)
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
        self.connect_at = self.loop.time()
        self.connect_task = self.loop.create_task(coro)
        self.connect_task.add_done_callback(self._connected)

    def _listen_port(self) -> int:
        if self.t is None:
            return 0
        return int(self.t.get_extra_info("sockname")[1])

    def _connected(self, task: asyncio.Task[Any]) -> None:
        self.connect_at = 0.0
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._fail("connect_failed")

    def upstream_made(self, up: L4Upstream) -> None:
        self.up = up
        self.connect_at = 0.0
        if self.closed:
            if up.t is not None:
                up.t.close()
            return
        assert up.t is not None
        up.t.set_write_buffer_limits(high=self.rt.write_high)
        if self.rt.l4.proxy_protocol is ProxyProtocol.V2:
            # TLS passthrough: the SNI as PP2_TYPE_AUTHORITY (PROXY protocol §2.2.2)
            tlvs = () if self.sni is None else ((proxyproto.Tlv.AUTHORITY, self.sni.encode()),)
            up.t.write(
                proxyproto.encode_proxy(
                    self.client, self.local, self.client_port, self.local_port, tlvs=tlvs
                )
            )
        self._flush()

    def _flush(self) -> None:
        up = self.up
        if self.state != _RELAY or up is None or up.t is None:
            return
        if self.pending:
            self.flushed += len(self.pending)
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
        elif not self.closed:
            self.upt = up.t  # from now on client bytes go straight through
            if self.splice:  # not inside connection_made, where uvloop ignores pause_reading
                self.loop.call_soon(self._splice)

    def _splice(self) -> None:
        """Hand the connection to the kernel relay once nothing waits in Python's buffers
        (else the sweep tries again)."""
        up = self.up
        t = self.t
        if self.closed or self.eof or up is None or up.t is None or up.eof or t is None:
            self.splice = False
            return
        self.batch.flush()  # into the transports' buffers, which must be empty
        if self.paused or t.get_write_buffer_size() or up.t.get_write_buffer_size():
            return
        self.splice = False
        self.link = self.rt.relay.splice(self)

    def kernel_eof(self, d: int, tail: bytes) -> None:
        """The kernel relay delivered direction ``d`` (0: from the client) up to its EOF;
        ``tail``: bytes the kernel left in the source socket, relayed here."""
        up = self.up
        if up is None:
            return
        self.batch.flush()
        if d == 0:
            self.eof = True
            if up.t is not None and not up.t.is_closing():
                if tail:
                    self.nin += len(tail)
                    up.t.write(tail)
                if up.t.can_write_eof():
                    up.t.write_eof()
            if up.eof:
                self.close()
        else:
            up.eof = True
            t = self.t
            if t is not None and not t.is_closing():
                if tail:
                    up.n += len(tail)
                    t.write(tail)
                if t.can_write_eof():
                    t.write_eof()
            if self.eof:
                self.close()

    # --- counters, timeouts, closing ----------------------------------------------

    def counts(self) -> tuple[int, int, int, int]:
        """Bytes (from the client, to the client, to the backend, from the backend) so far."""
        out = self.up.n if self.up is not None else 0
        if self.link is None:
            return self.nin + self.nslow, out, self.nin + self.flushed, out
        k_in, k_out = self.link.counts()
        out += k_out
        return self.nin + self.nslow + k_in, out, self.nin + self.flushed + k_in, out

    def sweep(self, now: float) -> None:
        """Called by the VIP's periodic sweep: enforce the timeouts."""
        if self.closed:
            return
        if self.link is not None:
            self.link.sweep()
            if self.closed:
                return
        elif self.splice and self.upt is not None:
            self._splice()
        t = self.rt.l4.timeouts
        if self.state == _WAIT_PP and now - self.born >= t.connect:
            self._fail("proxy_v2_timeout")
            return
        if self.state in (_CHECK, _HELLO) and self.rt.routes and now - self.born >= t.connect:
            self._fail("tls_hello_timeout")  # TLS passthrough: no whole ClientHello in time
            return
        if self.state == _CHECK and self.check_at and now - self.check_at >= t.connect:
            self._fail("proxy_prefix_timeout")  # bytes that could still be a PROXY header
            return
        if self.connect_at and now - self.connect_at >= t.connect:
            task = self.connect_task
            if task is not None and not task.done():
                task.cancel()
            self._fail("connect_timeout")
            return
        if t.total and now - self.born >= t.total:
            self._fail("total_timeout")
            return
        if self.link is None:
            moved = self.nin + self.nslow + (self.up.n if self.up is not None else 0)
        else:
            n = self.counts()
            moved = n[0] + n[1]
        if moved != self.seen:
            self.seen = moved
            self.last = now
        elif now - self.last >= t.idle:
            self._fail("idle_timeout")

    def quiesce(self) -> None:
        """A graceful stop: a TCP relay runs to its end (or the drain timeout)."""

    def cut(self, index: int) -> None:
        """Backend ``index`` was disabled: its connections end at once."""
        if self.backend == index:
            self._fail("backend_disabled")

    def _fail(self, reason: str) -> None:
        if self.closed:
            return
        self.rt.error(reason, self.backend)
        self.close(abort=True)

    def buffered(self) -> int:
        n = len(self.pending)
        if self.link is not None:
            n += self.link.queued()  # held by the kernel in front of a peer
        for t in (self.t, self.up.t if self.up is not None else None):
            if t is not None:
                n += t.get_write_buffer_size()
        return n

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.batch.flush()  # relay writes queued for these transports go first
        self.closed = True
        self.upt = None
        rt = self.rt
        rt.live.discard(self)
        rt.release(self)
        rt.stats.active -= 1
        rt.add_counts(self.backend, self.counts())
        if self.link is not None:
            self.link.forget()  # before the descriptors close
        if self.backend >= 0:
            rt.picker.release(self.backend)
            rt.backend_stats[self.backend].active -= 1
        task = self.connect_task
        if task is not None and not task.done():
            task.cancel()
        if self.wait is not None:
            self.wait.cancel()
            self.wait = None
        for t in (self.t, self.up.t if self.up is not None else None):
            if t is not None and not t.is_closing():
                if abort:
                    t.abort()
                else:
                    t.close()
