"""WriteBatch: relay writes queued until the loop has handled every ready read.

Unit tests with recording transports (order, flush, bulk chunks, closing transports),
and one end-to-end check on real sockets: many connections, each sending a request and
reading its echo in one loop iteration, all answered in order through the builtin
proxy-l4 (with the batch between every read and its write).
"""

from __future__ import annotations

import asyncio
from typing import Any

from test_proxy_fixtures import Backend_, l4_vip, loop_kind, run  # noqa: F401 (autouse fixture)
from v6lb.engines.proxy import ProxyServer
from v6lb.engines.proxy.runtime import BATCH_BELOW, WriteBatch


class Recorder:
    def __init__(self, log: list[tuple[str, bytes]], name: str) -> None:
        self.log, self.name, self.closing = log, name, False

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.log.append((self.name, data))

    def is_closing(self) -> bool:
        return self.closing


def rig() -> tuple[list[tuple[str, bytes]], Recorder, Recorder, WriteBatch, list[Any]]:
    """A write log, two recording transports writing to it, a batch, its scheduled calls."""
    log: list[tuple[str, bytes]] = []
    scheduled: list[Any] = []
    b = WriteBatch()
    b.bind(scheduled.append)
    return log, Recorder(log, "a"), Recorder(log, "c"), b, scheduled


def test_writes_wait_for_the_flush_and_keep_their_order() -> None:
    log, a, c, b, scheduled = rig()
    b.write(a, b"1")
    b.write(c, b"x")
    b.write(a, b"2")
    assert log == []  # nothing written before the loop comes back
    assert scheduled == [b.flush]  # one callback per batch, not per write
    scheduled[0]()
    assert log == [("a", b"1"), ("c", b"x"), ("a", b"2")]
    assert b.items == []
    b.write(a, b"3")  # a new batch schedules a new flush
    assert len(scheduled) == 2
    b.flush()
    b.flush()  # the scheduled one finds nothing: harmless
    scheduled[1]()
    assert log[-1] == ("a", b"3") and len(log) == 4


def test_a_bulk_chunk_goes_at_once_after_the_queue() -> None:
    log, a, _, b, _ = rig()
    b.write(a, b"small")
    big = b"b" * BATCH_BELOW
    b.write(a, big)
    assert log == [("a", b"small"), ("a", big)]  # the queue first, then the bulk chunk
    assert b.items == []


def test_a_closing_transport_drops_its_queued_chunks_only() -> None:
    log, a, c, b, _ = rig()
    b.write(a, b"lost")
    b.write(c, b"kept")
    a.closing = True  # aborted meanwhile: abort drops its buffer too
    b.flush()
    assert log == [("c", b"kept")]


def test_many_connections_echo_in_order_through_the_batched_relay() -> None:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()

    async def main() -> None:
        be = await Backend_(echo).start()
        async with ProxyServer([l4_vip([be.port], pp=False)]) as server:
            port = server.addresses("tcp")[0][1]

            async def one(k: int) -> bytes:
                r, w = await asyncio.open_connection("::1", port)
                got = b""
                for i in range(20):
                    msg = f"{k}:{i};".encode()
                    w.write(msg)
                    got += await r.readexactly(len(msg))
                w.write_eof()  # the echo's EOF follows the last bytes, never overtakes them
                got += await asyncio.wait_for(r.read(), 5)
                w.close()
                return got

            outs = await asyncio.gather(*(one(k) for k in range(40)))
            for k, got in enumerate(outs):
                assert got == b"".join(f"{k}:{i};".encode() for i in range(20))
            assert server.batch.items == []
        await be.stop()

    run(main())
