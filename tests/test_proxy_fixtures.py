"""Helpers (not tests) for the builtin proxy tests: VIPs on [::1], asyncio backends on [::1]."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, TypeVar

import pytest

from v6lb.model.config import (
    Backend,
    HealthCheck,
    HealthType,
    Protocol,
    ProxyL4Options,
    ProxyL7Options,
    ProxyProtocol,
    Relay,
    Scheduler,
    Timeouts,
    Vip,
    VipMode,
    parse_config,
)
from v6lb.render.haproxy import render_haproxy

LO = IPv6Address("::1")
T = TypeVar("T")
_LOOP = ["asyncio"]


@pytest.fixture(params=["asyncio", "uvloop"], autouse=True)
def loop_kind(request: pytest.FixtureRequest) -> str:
    """Every proxy test runs on asyncio's loop and on uvloop (when installed)."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    _LOOP[0] = request.param
    return str(request.param)


def run(coro: Awaitable[T]) -> T:
    if _LOOP[0] == "uvloop":
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type,no-any-return]
    return asyncio.run(coro)  # type: ignore[arg-type]


def l4_vip(
    ports: list[int],
    *,
    name: str = "tcp",
    pp: bool = True,
    trusted: tuple[str, ...] = (),
    scheduler: Scheduler = Scheduler.ROUND_ROBIN,
    timeouts: Timeouts | None = None,
    health: HealthCheck | None = None,
    weights: list[int] | None = None,
    backend_host: str = "::1",
    relay: Relay = Relay.USER,
) -> Vip:
    return Vip(
        name=name,
        address=LO,
        ports=(0,),
        protocol=Protocol.TCP,
        mode=VipMode.PROXY_L4,
        scheduler=scheduler,
        backends=tuple(
            Backend(IPv6Address(backend_host), p, (weights or [1] * len(ports))[i])
            for i, p in enumerate(ports)
        ),
        health=health or HealthCheck(type=HealthType.NONE),
        options=ProxyL4Options(
            proxy_protocol=ProxyProtocol.V2 if pp else ProxyProtocol.NONE,
            trusted_proxy_sources=tuple(IPv6Network(t) for t in trusted),
            timeouts=timeouts or Timeouts(connect=2.0, idle=30.0),
            relay=relay,
        ),
        table_size=251 if scheduler is Scheduler.MAGLEV else None,
    )


def l7_vip(
    ports: list[int],
    *,
    name: str = "web",
    trusted: tuple[str, ...] = (),
    scheduler: Scheduler = Scheduler.ROUND_ROBIN,
    timeouts: Timeouts | None = None,
    health: HealthCheck | None = None,
    max_header_bytes: int = 8192,
    max_request_bytes: int | None = 1 << 20,
) -> Vip:
    return Vip(
        name=name,
        address=LO,
        ports=(0,),
        protocol=Protocol.TCP,
        mode=VipMode.PROXY_L7,
        scheduler=scheduler,
        backends=tuple(Backend(LO, p) for p in ports),
        health=health or HealthCheck(type=HealthType.NONE),
        options=ProxyL7Options(
            trusted_sources=tuple(IPv6Network(t) for t in trusted),
            max_header_bytes=max_header_bytes,
            max_request_bytes=max_request_bytes,
            timeouts=timeouts or Timeouts(connect=2.0, idle=30.0),
        ),
        table_size=251 if scheduler is Scheduler.MAGLEV else None,
    )


class Backend_:
    """A raw TCP backend on [::1] that records what each connection received."""

    def __init__(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]):
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.conns = 0
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self, port: int = 0) -> Backend_:
        async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.conns += 1
            self.writers.add(w)
            try:
                await self.handler(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self.writers.discard(w)
                w.close()

        self.server = await asyncio.start_server(h, "::1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):  # Python 3.11 has no Server.close_clients()
            w.transport.abort()
        await self.server.wait_closed()


class HttpBackend(Backend_):
    """A keep-alive HTTP/1.1 backend answering with its name and the request head it saw."""

    def __init__(self, name: str, delay: float = 0.0, body_size: int = 0) -> None:
        self.name = name
        self.heads: list[bytes] = []
        self.delay = delay
        self.body_size = body_size
        super().__init__(self._serve)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":")[1])
            if n:
                await r.readexactly(n)
            if self.delay:
                await asyncio.sleep(self.delay)
            body = self.name.encode() + b"x" * self.body_size
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await w.drain()


def header(head: bytes, name: str) -> list[str]:
    out = []
    for line in head.decode().split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == name.lower():
            out.append(v.strip())
    return out


async def http_get(
    port: int, path: str = "/", extra: str = "", host: str = "::1", conn: Any = None
) -> tuple[int, bytes, bytes]:
    """One GET; returns (status, head, body). Opens a connection unless ``conn`` is given."""
    r, w = conn or await asyncio.open_connection(host, port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    return await read_response(r)


async def read_response(r: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split()[1])
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    body = await r.readexactly(n)
    return status, head, body


@asynccontextmanager
async def haproxy_l7(tmp_path: Path, backend_port: int, **options: Any) -> AsyncIterator[int]:
    """A real HAProxy (``haproxy -db``) serving one proxy-l7 VIP on [::1], as v6lb renders
    it (with ``options``, e.g. ``max_request_bytes=1000``), in front of the backend on
    [::1]:``backend_port``; yields the VIP's port."""
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = int(s.getsockname()[1])
    config = parse_config(
        {"vips": [{"name": "web", "address": "fd00:5::1", "ports": [port],
                   "mode": "proxy-l7", "scheduler": "round-robin",
                   "health": {"type": "none"},
                   "backends": [{"address": "::1", "port": backend_port}], **options}]},
        "haproxy-l7.yaml",
    )  # fmt: skip
    loopback = replace(config.vips[0], address=LO)  # a VIP file refuses ::1 itself
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render_haproxy(replace(config, vips=(loopback,))))
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stderr=subprocess.PIPE)
    try:
        for _ in range(50):  # until it listens
            try:
                socket.create_connection(("::1", port), timeout=0.1).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
