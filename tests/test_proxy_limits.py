"""Admission limits of the builtin proxy: per source, the descriptor budget, and their sums.

``max_connections_per_source`` is checked on a proxy-l4 and a proxy-l7 VIP on
[::1] with a second listener on 127.0.0.1 (``dual_stack``), so two client
addresses exist without root. The descriptor arithmetic of
:func:`~v6lb.engines.limits.connection_budget` is checked with numbers; the
real process at its limit is in tests/test_proxy_fds.py (root).
"""

from __future__ import annotations

import asyncio
import dataclasses
from ipaddress import IPv4Address

import pytest

from test_proxy_fixtures import Backend_, l4_vip, l7_vip, loop_kind, run  # noqa: F401
from v6lb.engines.limits import SPARE, connection_budget
from v6lb.engines.proxy import ProxyServer
from v6lb.model.config import ConfigError, parse_config

pytestmark = pytest.mark.timeout(60)


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(4096):
        w.write(data)
        await w.drain()


async def _http(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while await r.readuntil(b"\r\n\r\n"):
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()


async def _refused(r: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(r.read(), 3) == b""
    except ConnectionError:
        return True


@pytest.mark.parametrize("mode", ["l4", "l7"])
def test_per_source_limit_refuses_counts_and_releases(mode: str) -> None:
    async def main() -> None:
        be = await Backend_(_echo if mode == "l4" else _http).start()
        base = l4_vip([be.port], pp=False) if mode == "l4" else l7_vip([be.port])
        opts = dataclasses.replace(
            base.options,  # type: ignore[arg-type]
            max_connections_per_source=2,
            dual_stack=IPv4Address("127.0.0.1"),
        )
        vip = dataclasses.replace(base, options=opts)
        probe = b"hi" if mode == "l4" else b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        answer = b"hi" if mode == "l4" else b"HTTP/1.1 200 OK"

        async def ok(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            r, w = await asyncio.open_connection(host, port)
            w.write(probe)
            assert (await asyncio.wait_for(r.read(len(answer)), 3)) == answer
            return r, w

        async with ProxyServer([vip]) as s:
            v6 = next(p for h, p in s.addresses() if ":" in h)
            v4 = next(p for h, p in s.addresses() if ":" not in h)
            held = [await ok("::1", v6), await ok("::1", v6)]
            r, w = await asyncio.open_connection("::1", v6)  # the third from ::1
            assert await _refused(r)
            w.close()
            other = await ok("127.0.0.1", v4)  # another address is not limited by ::1
            name = vip.name
            assert s.counters()[name]["errors"] == {"over_max_connections_per_source": 1}
            assert s.runtimes[name].sources == {"::1": 2, "127.0.0.1": 1}
            held[0][1].close()
            await held[0][1].wait_closed()
            for _ in range(100):  # the proxy sees the close within a loop turn or two
                if s.runtimes[name].sources.get("::1") == 1:
                    break
                await asyncio.sleep(0.01)
            held[0] = await ok("::1", v6)  # a slot came back
            for _, w in [*held, other]:
                w.close()
            for _ in range(100):
                if not s.runtimes[name].sources:
                    break
                await asyncio.sleep(0.01)
            assert s.runtimes[name].sources == {}
            assert s.admission.active == 0
            assert s.counters()[name]["errors"] == {"over_max_connections_per_source": 1}
        await be.stop()

    run(main())


def test_admission_cap_is_process_wide_and_counted() -> None:
    """Two VIPs share one descriptor budget: the cap counts both."""

    async def main() -> None:
        be = await Backend_(_echo).start()
        a, b = l4_vip([be.port], name="a", pp=False), l4_vip([be.port], name="b", pp=False)
        async with ProxyServer([a, b]) as s:
            s.admission.cap = 3  # as if the descriptor limit allowed three
            pa, pb = s.addresses("a")[0][1], s.addresses("b")[0][1]
            held = []
            for port in (pa, pb, pa):
                r, w = await asyncio.open_connection("::1", port)
                w.write(b"x")
                assert await asyncio.wait_for(r.read(1), 3) == b"x"
                held.append(w)
            r, w = await asyncio.open_connection("::1", pb)
            assert await _refused(r)
            assert s.counters()["b"]["errors"] == {"over_fd_limit": 1}
            assert s.counters()["a"]["errors"] == {}
            assert s.fd_status()["connections_open"] == 3
            for w in held:
                w.close()
        await be.stop()

    run(main())


def test_connection_budget_arithmetic() -> None:
    roomy = connection_budget(1 << 20, 20, 2, 1024, 20_000, backends=4)
    assert roomy.connections == 20_000 and not roomy.short and roomy.backlog == 1024
    # soft = hard = 256: the backlog shrinks to a quarter of what is free per listener
    b = connection_budget(256, 16, 1, 1024, 10_000, backends=1)
    free = 256 - 16 - 1 - SPARE - 1
    assert b.backlog == free // 4
    assert b.reserve == 16 + 1 + b.backlog + SPARE + 1
    assert b.connections == (256 - b.reserve) // 2 and b.short
    assert 2 * b.connections + b.reserve <= 256
    text = b.warning()
    assert "soft limit is 256" in text and "not the 10000 that max_connections allows" in text
    assert f"room for {b.connections} proxied connections" in text
    assert "LimitNOFILE" in text and "lower max_connections" in text
    # a limit below the reserve holds no connection, and says so
    assert connection_budget(64, 30, 1, 1024, 100).connections == 0


def test_per_source_option_is_validated() -> None:
    vip = {
        "name": "t",
        "address": "2001:db8::80",
        "ports": [80],
        "mode": "proxy-l4",
        "health": {"type": "none"},
        "backends": [{"address": "2001:db8::1"}],
    }
    cfg = parse_config({"vips": [{**vip, "max_connections_per_source": 50}]}, file="x.yaml")
    assert cfg.vips[0].options.max_connections_per_source == 50  # type: ignore[union-attr]
    default = parse_config({"vips": [vip]}, file="x.yaml")
    assert default.vips[0].options.max_connections_per_source == 0  # type: ignore[union-attr]
    with pytest.raises(ConfigError) as err:
        parse_config({"vips": [{**vip, "max_connections_per_source": -1}]}, file="x.yaml")
    assert "max_connections_per_source" in str(err.value)
    assert "use an integer connection count from 0 to 1000000" in str(err.value)
