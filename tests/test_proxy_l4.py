"""The builtin ``proxy-l4`` on loopback: PROXY v2, half-close, backpressure, timeouts, drain.

Every test runs with both relays (``relay: user`` and ``relay: kernel``, the BPF sockmap
of docs/proxy.md, which needs root and ``make xdp``): the behaviour must be the same.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from ipaddress import IPv6Address
from typing import Any, TypeVar

import pytest

from test_proxy_fixtures import Backend_, l4_vip, loop_kind, run  # noqa: F401 (autouse fixture)
from v6lb.core import proxyproto
from v6lb.engines.proxy import ProxyServer
from v6lb.engines.proxy.kernel_relay import OBJECT
from v6lb.model.config import HealthCheck, HealthType, Relay, Timeouts

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")
_RELAY = [Relay.USER]


@pytest.fixture(
    params=[
        Relay.USER,
        pytest.param(
            Relay.KERNEL,
            marks=[
                pytest.mark.root,
                pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bpf(2), sockmap)"),
            ],
        ),
    ],
    ids=["user", "kernel"],
    autouse=True,
)
def relay(request: pytest.FixtureRequest) -> Relay:
    """The relay every ProxyServer of the test uses; the kernel one must really load."""
    if request.param is Relay.KERNEL:
        assert OBJECT.is_file(), f"{OBJECT} is missing: `make xdp` builds it"
    _RELAY[0] = request.param
    return Relay(request.param)


class Recorder(Backend_):
    """Keeps everything each connection sent, answers 'pong:<length>' after the client's EOF."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        super().__init__(self._serve)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()  # until the proxy relays the client's EOF
        self.received.append(data)
        w.write(b"pong:" + str(len(data)).encode())
        await w.drain()


async def _with(
    vips: list[Any], body: Callable[[ProxyServer], Awaitable[T]], spliced: bool = True, **kw: Any
) -> T:
    """Run ``body`` against a server; with the kernel relay, ``spliced``: it must have
    spliced a connection (tests whose every connection ends before it relays say False)."""
    async with ProxyServer(vips, relay=_RELAY[0], **kw) as server:
        kernel = server.kernel_relay
        assert (kernel is not None) == (_RELAY[0] is Relay.KERNEL)
        got = await body(server)
        if kernel is not None and spliced:
            st = server.relay_status()
            assert st is not None and st["spliced"] > 0, st
    assert kernel is None or not kernel.links  # every spliced connection was let go
    return got


async def _spliced(s: ProxyServer, n: int = 1) -> None:
    """With the kernel relay: wait until ``n`` connections were spliced (user: at once),
    so that what the test sends next goes through the kernel."""
    k = s.kernel_relay
    for _ in range(300):
        if k is None or k.handoffs >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not spliced: {k.status()}")


def test_proxy_v2_bytes_are_exact_and_half_close_works() -> None:
    async def main() -> None:
        be = await Recorder().start()

        async def body(s: ProxyServer) -> None:
            port = s.addresses("tcp")[0][1]
            r, w = await asyncio.open_connection("::1", port)
            cport = w.get_extra_info("sockname")[1]
            w.write(b"hello")
            await _spliced(s)
            w.write_eof()  # half-close: the answer must still come back
            answer = await asyncio.wait_for(r.read(), 5)
            assert answer == b"pong:57"  # 52 header bytes + 5
            got = be.received[0]
            want = (
                proxyproto.SIGNATURE
                + bytes([0x21, 0x21])
                + struct.pack("!H", 36)
                + IPv6Address("::1").packed * 2
                + struct.pack("!HH", cport, port)
            )
            assert got[:52] == want
            assert got[52:] == b"hello"
            hdr, n = proxyproto.decode(got) or (None, 0)
            assert n == 52 and hdr is not None and hdr.src_port == cport
            w.close()
            await asyncio.sleep(0.05)
            c = s.counters()["tcp"]
            assert c["connections"] == 1 and c["active"] == 0 and c["bytes_in"] == 5
            assert c["bytes_out"] == len(answer) and c["errors"] == {}

        await _with([l4_vip([be.port])], body)
        await be.stop()

    run(main())


def test_backpressure_bounds_proxy_memory_with_a_slow_reader() -> None:
    total = 50 * 1024 * 1024
    chunk = b"z" * (1 << 20)

    async def blast(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(52)
        for _ in range(total // len(chunk)):
            w.write(chunk)
            await w.drain()

    async def main() -> None:
        be = await Backend_(blast).start()
        high = 64 * 1024

        async def body(s: ProxyServer) -> None:
            port = s.addresses("tcp")[0][1]
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, ("::1", port))
            await loop.sock_sendall(sock, b"go")  # the client speaks first: the relay starts
            peak = 0
            got = 0
            while got < total:
                data = await loop.sock_recv(sock, 256 * 1024)
                if not data:
                    break
                got += len(data)
                peak = max(peak, s.buffered())
                if got % (4 << 20) < len(data):
                    await asyncio.sleep(0.01)  # a slow reader
            sock.close()
            assert got == total
            # one high-water mark per direction plus a read or two, never megabytes
            assert peak <= 4 * high + 512 * 1024, peak

        await _with([l4_vip([be.port])], body, write_high=high)
        await be.stop()

    run(main())


def test_idle_and_total_timeouts_close_and_count() -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()

    async def main() -> None:
        be = await Backend_(silent).start()
        vips = [
            l4_vip([be.port], name="idle", timeouts=Timeouts(connect=1, idle=0.3)),
            l4_vip([be.port], name="total", timeouts=Timeouts(connect=1, idle=5, total=0.5)),
        ]

        async def body(s: ProxyServer) -> None:
            loop = asyncio.get_running_loop()
            r, w = await asyncio.open_connection("::1", s.addresses("idle")[0][1])
            w.write(b"x")  # relaying (spliced by the kernel relay), then silence
            t0 = loop.time()
            assert await asyncio.wait_for(r.read(), 3) == b""
            assert 0.25 <= loop.time() - t0 < 1.5
            r, w = await asyncio.open_connection("::1", s.addresses("total")[0][1])
            t0 = loop.time()
            for _ in range(60):  # keep talking: idle never fires, total does
                w.write(b"x")
                try:
                    if await asyncio.wait_for(r.read(1), 0.05) == b"":
                        break
                except TimeoutError:
                    continue
                except ConnectionError:
                    break
            assert loop.time() - t0 < 1.5
            await asyncio.sleep(0.05)
            c = s.counters()
            assert c["idle"]["errors"] == {"idle_timeout": 1}
            assert c["total"]["errors"] == {"total_timeout": 1}

        await _with(vips, body)
        await be.stop()

    run(main())


def test_connect_timeout_and_connect_failure() -> None:
    async def main() -> None:
        # A listener whose accept queue is full drops further SYNs: connect hangs.
        full = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        full.bind(("::1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        for _ in range(3):
            f = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            f.setblocking(False)
            try:
                f.connect(("::1", port))
            except BlockingIOError:
                pass
            fillers.append(f)
        await asyncio.sleep(0.1)
        closed = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        closed.bind(("::1", 0))
        dead_port = closed.getsockname()[1]
        closed.close()  # nothing listens there: refused
        vips = [
            l4_vip([port], name="hang", timeouts=Timeouts(connect=0.3, idle=5)),
            l4_vip([dead_port], name="refused"),
        ]

        async def body(s: ProxyServer) -> None:
            for name in ("hang", "refused"):
                r, w = await asyncio.open_connection("::1", s.addresses(name)[0][1])
                w.write(b"x")
                with pytest.raises(ConnectionError):
                    data = await asyncio.wait_for(r.read(), 3)
                    if data == b"":
                        raise ConnectionResetError
            await asyncio.sleep(0.05)
            c = s.counters()
            assert c["hang"]["errors"] == {"connect_timeout": 1}
            assert c["refused"]["errors"] == {"connect_failed": 1}

        await _with(vips, body, spliced=False)
        for f in fillers:
            f.close()
        full.close()

    run(main())


def test_inbound_proxy_v2_trusted_untrusted_and_malformed() -> None:
    async def main() -> None:
        be = await Recorder().start()
        header = proxyproto.encode_proxy("2001:db8::1", "2001:db8::80", 4711, 443)
        vips = [
            l4_vip([be.port], name="trusting", trusted=("::1/128",)),
            l4_vip([be.port], name="strict", trusted=("2001:db8:ffff::/48",)),
            l4_vip(
                [be.port],
                name="slow",
                trusted=("::1/128",),
                timeouts=Timeouts(connect=0.3, idle=5),
            ),
        ]

        async def send(port: int, data: bytes, s: ProxyServer | None = None) -> bytes:
            r, w = await asyncio.open_connection("::1", port)
            try:
                w.write(data)
                if s is not None:
                    await _spliced(s)
                w.write_eof()
                return await asyncio.wait_for(r.read(), 3)
            except OSError:
                return b""

        async def body(s: ProxyServer) -> None:
            trusting = s.addresses("trusting")[0][1]
            strict = s.addresses("strict")[0][1]
            assert await send(trusting, header + b"data", s) == b"pong:56"
            got = be.received[-1]
            hdr, n = proxyproto.decode(got) or (None, 0)
            assert hdr is not None and hdr.src == IPv6Address("2001:db8::1")
            assert hdr.src_port == 4711 and got[n:] == b"data"
            # untrusted peer sending PROXY v2: refused, never reaches a backend
            assert await send(strict, header + b"data") == b""
            bad = [
                # a length past the buffer: 36 address bytes announced, 8 sent, then EOF
                b"\r\n\r\n\x00\r\nQUIT\x0a" + b"\x21\x21\x00\x24" + b"\x00" * 8,
                b"\r\n\r\n\x00\r\nQUIT\x0b" + b"\x21\x21\x00\x00",  # bad signature
                header[:12] + b"\x21\x51\x00\x24" + bytes(36),  # unknown family
                header[:12] + b"\x21\x21\x00\x04" + bytes(4),  # address block too short
            ]
            for b in bad:
                assert await send(trusting, b) == b""
            # a trusted peer that sends half a header and stalls: cut after `connect`
            r, w = await asyncio.open_connection("::1", s.addresses("slow")[0][1])
            w.write(header[:20])
            assert await asyncio.wait_for(r.read(), 3) == b""
            w.close()
            await asyncio.sleep(0.05)
            assert s.counters()["strict"]["errors"] == {"proxy_v2_untrusted": 1}
            errs = s.counters()["trusting"]["errors"]
            assert errs == {"proxy_v2_malformed": 4}, errs
            assert s.counters()["slow"]["errors"] == {"proxy_v2_timeout": 1}
            # only the good header's data reached a backend
            assert [x for x in be.received if b"data" in x or b"QUIT" in x] == [got]

        await _with(vips, body)
        await be.stop()

    run(main())


def test_round_robin_least_connections_and_drain() -> None:
    async def main() -> None:
        b0, b1 = await Recorder().start(), await Recorder().start()
        vip = l4_vip([b0.port, b1.port], pp=False)

        async def body(s: ProxyServer) -> None:
            port = s.addresses("tcp")[0][1]
            r0, w0 = await asyncio.open_connection("::1", port)  # round robin: b0
            w0.write(b"a")
            await asyncio.sleep(0.05)
            s.set_drain("tcp", 0, True)
            for _ in range(3):
                r, w = await asyncio.open_connection("::1", port)
                w.write(b"bb")
                w.write_eof()
                assert await asyncio.wait_for(r.read(), 3) == b"pong:2"
            assert b1.received == [b"bb"] * 3 and b0.received == []
            w0.write_eof()  # the drained backend's connection still finishes
            assert await asyncio.wait_for(r0.read(), 3) == b"pong:1"
            assert b0.received == [b"a"]
            c = s.counters()["tcp"]["backends"]
            assert [v["connections"] for v in c.values()] == [1, 3]
            assert [v["drain"] for v in c.values()] == [True, False]

        await _with([vip], body)
        for b in (b0, b1):
            await b.stop()

    run(main())


def test_health_failover_and_all_down_closes_with_a_reason() -> None:
    async def main() -> None:
        b0, b1 = await Recorder().start(), await Recorder().start()
        hc = HealthCheck(type=HealthType.TCP, interval=0.1, timeout=0.05, rise=1, fall=1)
        vip = l4_vip([b0.port, b1.port], pp=False, health=hc)

        async def send(port: int) -> bytes:
            r, w = await asyncio.open_connection("::1", port)
            try:
                w.write(b"q")
                w.write_eof()
                return await asyncio.wait_for(r.read(), 3)
            except OSError:  # reset by the proxy, possibly before our EOF
                return b""

        async def body(s: ProxyServer) -> None:
            port = s.addresses("tcp")[0][1]
            await b0.stop()
            await asyncio.sleep(0.4)
            assert s.counters()["tcp"]["backends"][f"[::1]:{b0.port}"]["state"] == "down"
            for _ in range(4):
                assert await send(port) == b"pong:1"
            assert [x for x in b1.received if x] == [b"q"] * 4  # b"": health probes
            await b1.stop()
            await asyncio.sleep(0.4)
            assert await send(port) == b""
            assert s.counters()["tcp"]["errors"].get("no_healthy_backend") == 1

        await _with([vip], body, spliced=False)

    run(main())


def test_maglev_sticks_a_client_to_one_backend_and_over_max_is_refused() -> None:
    from v6lb.model.config import Scheduler

    async def main() -> None:
        bs = [await Recorder().start() for _ in range(3)]
        vip = l4_vip([b.port for b in bs], pp=False, scheduler=Scheduler.MAGLEV)

        async def body(s: ProxyServer) -> None:
            port = s.addresses("tcp")[0][1]
            for _ in range(5):
                r, w = await asyncio.open_connection("::1", port)
                w.write_eof()
                await asyncio.wait_for(r.read(), 3)
            rt = s.runtimes["tcp"]
            want = rt.pool.pick_flow(IPv6Address("::1").packed, IPv6Address("::1").packed, 0, 0)
            assert [b.conns for b in bs] == [5 if i == want else 0 for i in range(3)]
            opened = [await asyncio.open_connection("::1", port) for _ in range(2)]
            r, w = await asyncio.open_connection("::1", port)  # the third: over the max
            with pytest.raises(ConnectionError):
                if await asyncio.wait_for(r.read(), 3) == b"":
                    raise ConnectionResetError
            assert s.counters()["tcp"]["errors"] == {"over_max_connections": 1}
            for _, ow in opened:
                ow.close()

        await _with([vip], body, spliced=False, max_connections=2)
        for b in bs:
            await b.stop()

    run(main())


def test_dual_stack_ipv4_client_is_family_0x11() -> None:
    from dataclasses import replace
    from ipaddress import IPv4Address

    async def main() -> None:
        be = await Recorder().start()
        vip = l4_vip([be.port])
        vip = replace(vip, options=replace(vip.options, dual_stack=IPv4Address("127.0.0.1")))

        async def body(s: ProxyServer) -> None:
            v4 = [a for a in s.addresses("tcp") if a[0] == "127.0.0.1"]
            assert len(s.addresses("tcp")) == 2 and len(v4) == 1
            r, w = await asyncio.open_connection("127.0.0.1", v4[0][1])
            cport = w.get_extra_info("sockname")[1]
            w.write(b"v4")
            await _spliced(s)
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 3) == b"pong:30"  # 16 + 12 + 2
            got = be.received[0]
            assert got[12:16] == b"\x21\x11\x00\x0c"
            hdr, n = proxyproto.decode(got) or (None, 0)
            assert hdr is not None and hdr.src == IPv4Address("127.0.0.1")
            assert hdr.src_port == cport and hdr.dst_port == v4[0][1] and got[n:] == b"v4"

        await _with([vip], body)
        await be.stop()

    run(main())


def test_backend_reset_mid_stream_closes_the_client_and_counts() -> None:
    async def half_then_reset(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(52 + 4)  # our PROXY v2 header and the client's "ping"
        w.write(b"partial")
        await w.drain()
        await asyncio.sleep(0.05)
        sock = w.get_extra_info("socket")  # SO_LINGER 0: close sends a RST, not a FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    async def main() -> None:
        be = await Backend_(half_then_reset).start()

        async def body(s: ProxyServer) -> None:
            r, w = await asyncio.open_connection("::1", s.addresses("tcp")[0][1])
            w.write(b"ping")
            got = b""
            try:  # the client sees what was relayed, then the end: never a hang
                while chunk := await asyncio.wait_for(r.read(100), 3):
                    got += chunk
            except ConnectionError:
                pass
            assert got == b"partial"
            await asyncio.sleep(0.05)
            c = s.counters()["tcp"]
            assert c["errors"] == {"backend_reset": 1} and c["active"] == 0
            assert c["bytes_in"] == 4 and c["bytes_out"] == 7

        await _with([l4_vip([be.port])], body)
        await be.stop()

    run(main())


def test_client_reset_mid_stream_closes_the_backend_and_counts() -> None:
    ended: list[bytes] = []

    async def wait_end(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got = await r.readexactly(52 + 4)  # our PROXY v2 header and the client's "ping"
        w.write(b"pong")
        try:
            got += await asyncio.wait_for(r.read(), 3)  # the proxy ends it: never a hang
        except ConnectionError:
            pass
        ended.append(got[52:])

    async def main() -> None:
        be = await Backend_(wait_end).start()

        async def body(s: ProxyServer) -> None:
            r, w = await asyncio.open_connection("::1", s.addresses("tcp")[0][1])
            w.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(4), 3) == b"pong"
            await _spliced(s)
            sock = w.get_extra_info("socket")  # SO_LINGER 0: close sends a RST
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
            for _ in range(100):
                if ended:
                    break
                await asyncio.sleep(0.02)
            assert ended == [b"ping"]
            c = s.counters()["tcp"]
            assert c["errors"] == {"client_reset": 1} and c["active"] == 0
            assert c["bytes_in"] == 4 and c["bytes_out"] == 4

        await _with([l4_vip([be.port])], body)
        await be.stop()

    run(main())
