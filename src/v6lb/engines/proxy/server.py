"""The builtin proxy engine: listeners for every ``proxy-*`` VIP, health checks, counters.

Use from a running loop::

    server = ProxyServer(config)
    await server.start()          # binds every VIP:port (IPv6, IPV6_V6ONLY)
    server.counters()             # dict for `v6lb status`
    server.set_drain("web", 0, True)
    await server.stop()

or blocking, for ``v6lb run --proxy builtin``: ``serve(config, stop_event=ev)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from v6lb.engines.limits import FdBudget, connection_budget, nofile, open_fds
from v6lb.model.config import Config, Vip, VipMode

from .health import HealthChecker, health_set_for
from .l4 import L4Client
from .l7 import L7Client
from .runtime import Admission, VipRuntime
from .status import ProxyStatus

__all__ = ["ProxyServer", "install_uvloop", "serve"]


def install_uvloop() -> bool:
    """Use uvloop for new event loops when it is installed; True if it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def _listen_socket(host: str, port: int, family: int, backlog: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        with contextlib.suppress(OSError, AttributeError):
            # a VIP address may be added to the interface after we start
            sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ProxyServer:
    """The builtin ``proxy-l4``/``proxy-l7`` engine for the proxy VIPs of a config."""

    def __init__(
        self,
        config: Config | Iterable[Vip],
        *,
        seed: int | None = None,
        max_connections: int = 10_000,
        header_timeout: float = 10.0,
        write_high: int = 256 * 1024,
        backlog: int = 1024,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if isinstance(config, Config):
            vips = [v for v in config.vips if v.mode.is_proxy]
            seed = config.lb.flow_hash_seed if seed is None else seed
        else:
            vips = [v for v in config if v.mode.is_proxy]
        self.vips = vips
        self.seed = seed or 0
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.write_high = write_high
        self.backlog = backlog
        self.runtimes: dict[str, VipRuntime] = {}
        self.servers: list[asyncio.Server] = []
        self._server_vip: list[str] = []
        self._health_task: asyncio.Task[None] | None = None
        self._sweeps: dict[str, asyncio.TimerHandle] = {}
        self.health: HealthChecker | None = None
        self.log = log or (lambda line: sys.stderr.write(f"v6lb: proxy: {line}\n"))
        self.admission = Admission()
        self.budget: FdBudget | None = None
        self.accept_errors = 0  # accept() failures the event loop reported (asyncio only)
        self._accept_logged = -60.0

    def _plan_fds(self) -> int:
        """Size the admission from the descriptor limit; the listen backlog to use."""
        listeners = sum(
            len(v.ports) * (2 if getattr(v.options, "dual_stack", None) else 1) for v in self.vips
        )
        backends = sum(len(v.backends) for v in self.vips)
        soft, _ = nofile()
        wanted = self.max_connections * len(self.vips)
        in_use = max(0, open_fds())
        budget = connection_budget(soft, in_use, listeners, self.backlog, wanted, backends)
        self.budget = budget
        self.admission.cap = budget.connections
        if budget.short:
            self.log(budget.warning())
        return budget.backlog

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio reports an accept() that failed for lack of descriptors here (and stops
        accepting on that listener for 1 s): count it, log it at most once a minute."""
        exc = context.get("exception")
        if (
            str(context.get("message", "")).startswith("socket.accept()")
            and isinstance(exc, OSError)
            and exc.errno in (errno.EMFILE, errno.ENFILE)
        ):
            self.accept_errors += 1
            now = time.monotonic()
            if now - self._accept_logged >= 60.0:
                self._accept_logged = now
                self.log(
                    f"accept failed: {exc.strerror} ({self.accept_errors} so far); the listener"
                    " pauses 1 s. Fix: raise LimitNOFILE or lower max_connections"
                )
            return
        loop.default_exception_handler(context)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.get_exception_handler() is None:
            loop.set_exception_handler(self._loop_exception)
        backlog = self._plan_fds()
        try:
            for vip in self.vips:
                hs = health_set_for(vip.health, len(vip.backends), loop.time())
                rt = VipRuntime.build(
                    vip,
                    hs,
                    seed=self.seed,
                    max_connections=self.max_connections,
                    header_timeout=min(self.header_timeout, _idle(vip)),
                    write_high=self.write_high,
                    admission=self.admission,
                )
                self.runtimes[vip.name] = rt
                proto: Callable[[], asyncio.Protocol]
                if vip.mode is VipMode.PROXY_L7:
                    proto = _factory(L7Client, rt)
                else:
                    proto = _factory(L4Client, rt)
                dual = getattr(vip.options, "dual_stack", None)
                for port in vip.ports:
                    binds = [(str(vip.address), socket.AF_INET6)]
                    if dual is not None:
                        binds.append((str(dual), socket.AF_INET))
                    for host, fam in binds:
                        sock = _listen_socket(host, port, fam, backlog)
                        srv = await loop.create_server(proto, sock=sock, backlog=backlog)
                        self.servers.append(srv)
                        self._server_vip.append(vip.name)
            for rt in self.runtimes.values():
                self._sweep(rt)
            self.health = HealthChecker(list(self.runtimes.values()))
            self._health_task = loop.create_task(self.health.run())
        except BaseException:
            await self.stop()
            raise

    def _sweep(self, rt: VipRuntime) -> None:
        """Every VIP's timeouts are checked by one periodic sweep (not per-chunk timers)."""
        loop = asyncio.get_running_loop()
        try:
            rt.sweep(loop.time())
        finally:
            self._sweeps[rt.vip.name] = loop.call_later(rt.sweep_period(), self._sweep, rt)

    def addresses(self, vip: str | None = None) -> list[tuple[str, int]]:
        """The bound (host, port) of every listener (of one VIP); port 0 in a VIP binds any."""
        out = []
        for srv, name in zip(self.servers, self._server_vip, strict=True):
            if vip is not None and name != vip:
                continue
            for s in srv.sockets:
                addr = s.getsockname()
                out.append((str(addr[0]), int(addr[1])))
        return out

    def counters(self) -> dict[str, Any]:
        """Per VIP: connections, active, requests, bytes, errors by reason, and per backend."""
        return {name: rt.snapshot() for name, rt in self.runtimes.items()}

    def fd_status(self) -> dict[str, Any]:
        """The descriptor budget for `v6lb status`: limit, open, the connection cap."""
        soft, hard = nofile()
        b = self.budget
        return {
            "limit": soft,
            "hard_limit": hard,
            "open": open_fds(),
            "connection_cap": self.admission.cap if b is not None else None,
            "connections_open": self.admission.active,
            "wanted": b.wanted if b is not None else None,
            "listen_backlog": b.backlog if b is not None else self.backlog,
            "accept_errors": self.accept_errors,
        }

    def buffered(self) -> int:
        """Bytes held in user space by all open connections (for backpressure checks)."""
        return sum(rt.buffered() for rt in self.runtimes.values())

    def set_drain(self, vip: str, backend: int, drain: bool) -> None:
        """Drain a backend: no new connections; open ones run to their end."""
        rt = self.runtimes[vip]
        rt.health.set_drain(backend, drain)
        rt.pool.set_drain(backend, drain)

    def set_weight(self, vip: str, backend: int, weight: int) -> None:
        rt = self.runtimes[vip]
        rt.health.set_weight(backend, weight)
        rt.pool.set_weight(backend, weight)
        rt.weights[backend] = weight

    def status(self) -> list[dict[str, Any]]:
        """Per VIP, for `v6lb status`: listeners, counters, errors by reason, backends.

        Call it on the loop's thread (the counters are the loop's);
        :class:`~.status.ProxyStatus` does that for the control socket's thread.
        """
        out = []
        for name, rt in self.runtimes.items():
            snap = rt.snapshot()
            vip = rt.vip
            listeners = self.addresses(name)
            backends = []
            for i, d in enumerate(snap.pop("backends").values()):
                monitor = rt.health.monitor(i)
                backends.append(
                    {
                        "address": rt.hosts[i],
                        "port": rt.ports[i],
                        "weight": rt.weights[i],
                        "drain": d.pop("drain"),
                        "health": d.pop("state"),
                        "probe": str(vip.health.type),
                        "successes": monitor.successes if monitor else None,
                        "failures": monitor.failures if monitor else None,
                        **d,
                    }
                )
            out.append(
                {
                    "name": name,
                    "address": str(vip.address),
                    "ports": sorted({p for h, p in listeners if ":" in h}) or list(vip.ports),
                    "protocol": "tcp",
                    "listeners": [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in listeners],
                    **snap,
                    "backends": backends,
                }
            )
        return out

    async def stop(self) -> None:
        for srv in self.servers:
            srv.close()
        self.servers.clear()
        self._server_vip.clear()
        for h in self._sweeps.values():
            h.cancel()
        self._sweeps.clear()
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        for rt in self.runtimes.values():
            for pooled in rt.idle:
                for up in pooled:
                    if up.t is not None:
                        up.t.close()
                pooled.clear()

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _idle(vip: Vip) -> float:
    t = getattr(vip.options, "timeouts", None)
    return float(t.idle) if t is not None else 60.0


def _factory(cls: Any, rt: VipRuntime) -> Callable[[], asyncio.Protocol]:
    def make() -> asyncio.Protocol:
        p: asyncio.Protocol = cls(rt)
        return p

    return make


def serve(
    config: Config,
    *,
    stop_event: threading.Event | None = None,
    on_ready: Callable[[ProxyServer], None] | None = None,
    use_uvloop: bool = True,
    poll: float = 0.2,
    status: ProxyStatus | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run the proxy VIPs of ``config`` until ``stop_event`` is set; returns the final counters.

    Blocking: it runs its own event loop (uvloop when installed); ``--proxy
    haproxy`` is :mod:`.haproxy_run` instead. ``on_ready`` is called once every
    listener is bound. ``status``, when given, is pointed at the running engine
    (its counters answer `v6lb status`). ``options`` go to :class:`ProxyServer`.
    """
    if use_uvloop:
        install_uvloop()

    async def main() -> dict[str, Any]:
        server = ProxyServer(config, **options)
        await server.start()
        try:
            if status is not None:
                status.attach_builtin(server)
            if on_ready is not None:
                on_ready(server)
            while stop_event is None or not stop_event.is_set():
                await asyncio.sleep(poll)
        finally:
            if status is not None:
                status.detach()
            await server.stop()
        return server.counters()

    return asyncio.run(main())
