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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from v6lb.core.backends import BackendPool
from v6lb.core.health import HealthSet
from v6lb.engines.limits import FdBudget, connection_budget, nofile, open_fds
from v6lb.model.config import Config, ProxyL4Options, ProxyL7Options, Relay, Vip
from v6lb.model.pools import health_monitor
from v6lb.model.schema import Where

from .h2 import H2Client
from .health import HealthChecker
from .kernel_relay import KernelRelay
from .l4 import L4Client
from .l7 import L7Client
from .runtime import Admission, VipRuntime, WriteBatch
from .status import ProxyStatus
from .tls import TlsLayer, TlsSetup, load_tls

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
        relay: Relay | None = None,
    ) -> None:
        if isinstance(config, Config):
            vips = [v for v in config.vips if v.mode.is_proxy]
            seed = config.lb.flow_hash_seed if seed is None else seed
            self.source = config.source
        else:
            vips = [v for v in config if v.mode.is_proxy]
            self.source = "<vips>"
        self.vips = vips
        self.seed = seed or 0
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.write_high = write_high
        self.backlog = backlog
        self.runtimes: dict[str, VipRuntime] = {}
        self.listeners: dict[tuple[str, int], _Listener] = {}  # by (host, port)
        self._backlog = backlog
        self._health_task: asyncio.Task[None] | None = None
        self._sweeps: dict[VipRuntime, asyncio.TimerHandle] = {}
        self.health: HealthChecker | None = None
        self.log = log or (lambda line: sys.stderr.write(f"v6lb: proxy: {line}\n"))
        self.admission = Admission()
        self.batch = WriteBatch()  # relay writes, after each loop iteration's reads
        self.budget: FdBudget | None = None
        self.accept_errors = 0  # accept() failures the event loop reported (asyncio only)
        self.relay = relay  # overrides every proxy-l4 VIP's `relay` (tests, benchmarks)
        self.kernel_relay: KernelRelay | None = None  # loaded by the first VIP that wants it
        self._relay_tried = False
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

    def _runtime(self, vip: Vip, now: float, prev: VipRuntime | None = None) -> VipRuntime:
        """A VIP's runtime; after a reload (``prev``: the VIP's running one) its counters,
        open connections and the health of the backends it keeps carry over."""
        before: dict[tuple[str, int | None], int] = {}
        if prev is not None:
            before = {
                (h, p): i for i, (h, p) in enumerate(zip(prev.hosts, prev.ports, strict=True))
            }
        hs: HealthSet[int] = HealthSet()
        for i, b in enumerate(vip.backends):
            j = before.get((str(b.address), b.port))
            mon = prev.health.monitor(j) if prev is not None and j is not None else None
            hs.add(i, health_monitor(vip.health, now, up=mon.is_up if mon else True))
        rt = VipRuntime.build(
            vip,
            hs,
            seed=self.seed,
            max_connections=self.max_connections,
            header_timeout=min(self.header_timeout, _idle(vip)),
            write_high=self.write_high,
            admission=self.admission,
        )
        self._attach_tls(rt, self.load_tls(vip))
        rt.relay = self._kernel_relay(vip)
        rt.batch = self.batch
        for i in range(len(rt.pool)):
            rt.pool.set_up(i, hs.keeps_existing_flows(i))
        if prev is not None:
            rt.stats, rt.latency, rt.live = prev.stats, prev.latency, prev.live
            rt.sources, rt.source_of = prev.sources, prev.source_of
            for i, b in enumerate(vip.backends):
                j = before.get((str(b.address), b.port))
                if j is not None:
                    rt.backend_stats[i] = prev.backend_stats[j]
        return rt

    def _kernel_relay(self, vip: Vip) -> KernelRelay | None:
        """The kernel relay for a proxy-l4 VIP that may use it (loaded once; None: user
        space, logged once when the kernel cannot)."""
        opts = vip.options
        if not isinstance(opts, ProxyL4Options) or opts.tls is not None:
            return None
        mode = self.relay or opts.relay
        if mode is Relay.USER:
            return None
        if not self._relay_tried:
            self._relay_tried = True
            self.kernel_relay = KernelRelay.open(self.log)
            if self.kernel_relay is not None:
                self.kernel_relay.start(asyncio.get_running_loop())
        return self.kernel_relay

    def load_tls(self, vip: Vip) -> TlsSetup | None:
        """The VIP's certificates read from their files now (ConfigError if one is bad)."""
        opts = vip.options
        if not isinstance(opts, ProxyL4Options | ProxyL7Options) or opts.tls is None:
            return None
        return load_tls(opts.tls, Where(self.source, f"vips.{vip.name}.tls"))

    @staticmethod
    def _attach_tls(rt: VipRuntime, setup: TlsSetup | None) -> None:
        if setup is not None:
            setup.on_unknown = lambda: rt.error("tls_unknown_sni")
        rt.tls = setup

    def reload_tls(self, setups: Mapping[str, TlsSetup | None]) -> list[str]:
        """SIGHUP: the certificates read again, for new connections; open ones keep theirs."""
        done = []
        for name, setup in setups.items():
            rt = self.runtimes.get(name)
            if rt is not None and setup is not None:
                self._attach_tls(rt, setup)
                done.append(name)
        return done

    @staticmethod
    def binds(vip: Vip) -> list[tuple[str, int, int]]:
        """Every (host, port, family) a VIP listens on."""
        dual = getattr(vip.options, "dual_stack", None)
        out: list[tuple[str, int, int]] = []
        for port in vip.ports:
            out.append((str(vip.address), port, socket.AF_INET6))
            if dual is not None:
                out.append((str(dual), port, socket.AF_INET))
        return out

    def missing_binds(self, vips: Iterable[Vip]) -> list[tuple[str, int, int]]:
        """The binds of ``vips`` no listener has now (port 0 always binds anew)."""
        return [
            b
            for v in vips
            if v.mode.is_proxy
            for b in self.binds(v)
            if b[1] == 0 or (b[0], b[1]) not in self.listeners
        ]

    async def _listen(
        self, key: tuple[str, int], sock: socket.socket, rt: VipRuntime, backlog: int
    ) -> _Listener:
        lst = _Listener(rt)
        loop = asyncio.get_running_loop()
        lst.server = await loop.create_server(lst.make, sock=sock, backlog=backlog)
        if key[1] == 0:  # bound to any port: a key of its own
            key = (key[0], -len(self.listeners) - 1)
        self.listeners[key] = lst
        return lst

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.batch.bind(loop.call_soon)
        if loop.get_exception_handler() is None:
            loop.set_exception_handler(self._loop_exception)
        backlog = self._plan_fds()
        self._backlog = backlog
        try:
            for vip in self.vips:
                rt = self._runtime(vip, loop.time())
                self.runtimes[vip.name] = rt
                for host, port, fam in self.binds(vip):
                    sock = _listen_socket(host, port, fam, backlog)
                    try:
                        await self._listen((host, port), sock, rt, backlog)
                    except BaseException:
                        sock.close()
                        raise
            for rt in self.runtimes.values():
                self._sweep(rt)
            self.health = HealthChecker(list(self.runtimes.values()))
            self._health_task = loop.create_task(self.health.run())
        except BaseException:
            await self.stop()
            raise

    def bind(self, binds: list[tuple[str, int, int]]) -> dict[tuple[str, int], socket.socket]:
        """Listening sockets for a reload's new binds (any thread); all or none (OSError)."""
        out: dict[tuple[str, int], socket.socket] = {}
        try:
            for host, port, fam in binds:
                out[(host, port)] = _listen_socket(host, port, fam, self._backlog)
        except BaseException:
            for sock in out.values():
                sock.close()
            raise
        return out

    async def reconfigure(
        self,
        vips: Iterable[Vip],
        socks: dict[tuple[str, int], socket.socket],
        pools: Mapping[str, BackendPool],
    ) -> str:
        """A reload, on the loop: ``socks`` from :meth:`bind` for the new binds.

        Unchanged VIPs keep everything; a changed VIP gets a new runtime for its new
        connections (and the next request of an open proxy-l7 connection) while the
        open connections keep theirs, and so their backend; a removed VIP's listeners
        close and its open connections run to their end. Listeners whose address and
        port stay are kept (their socket is never closed). ``pools``: drain, enabled
        and weight of every backend (`v6lb ctl` overrides included). What changed.
        """
        loop = asyncio.get_running_loop()
        new = [v for v in vips if v.mode.is_proxy]
        runtimes: dict[str, VipRuntime] = {}
        changed: list[str] = []
        added: list[str] = []
        for vip in new:
            prev = self.runtimes.get(vip.name)
            if prev is not None and prev.vip == vip:
                runtimes[vip.name] = prev
                continue
            runtimes[vip.name] = self._runtime(vip, loop.time(), prev)
            (changed if prev is not None else added).append(vip.name)
        # every fallible step first: the new listeners
        made: list[asyncio.Server] = []
        fresh: dict[tuple[str, int], _Listener] = {}
        try:
            for vip in new:
                for host, port, _ in self.binds(vip):
                    sock = socks.pop((host, port), None)
                    if sock is None:
                        continue
                    lst = _Listener(runtimes[vip.name])
                    lst.server = await loop.create_server(
                        lst.make, sock=sock, backlog=self._backlog
                    )
                    made.append(lst.server)
                    fresh[(host, port)] = lst
        except BaseException:
            for srv in made:
                srv.close()
            for sock in socks.values():
                sock.close()
            raise
        # then the swap, which cannot fail
        wanted = {(h, p): runtimes[v.name] for v in new for h, p, _ in self.binds(v)}
        closed = 0
        for key in list(self.listeners):
            lst = self.listeners[key]
            rt = wanted.get(key)
            if rt is None:
                del self.listeners[key]
                if lst.server is not None:
                    lst.server.close()  # no new connections; the open ones go on
                closed += 1
            else:
                lst.rt = rt
        self.listeners.update(fresh)
        removed = [name for name in self.runtimes if name not in runtimes]
        for name, old in self.runtimes.items():
            rt_new = runtimes.get(name)
            if rt_new is old:
                continue
            old.retired = True
            old.successor = rt_new
            for pooled in old.idle:  # idle pooled upstreams: their indices are the old ones
                for up in pooled:
                    if up.t is not None:
                        up.t.close()
                pooled.clear()
            if rt_new is not None:  # the open connections are in rt_new.live: swept there
                handle = self._sweeps.pop(old, None)
                if handle is not None:
                    handle.cancel()
        self.vips = new
        self.runtimes = runtimes
        for name, rt in runtimes.items():
            if rt not in self._sweeps:
                self._sweep(rt)
            pool = pools.get(name)
            if pool is not None:
                self.apply_pool(name, pool)
        if self.health is not None:
            self.health.retarget(list(runtimes.values()))
        parts = []
        if added:
            parts.append(f"added {', '.join(added)}")
        if changed:
            parts.append(f"changed {', '.join(changed)}")
        if removed:
            parts.append(f"removed {', '.join(removed)}")
        if fresh or closed:
            parts.append(f"{len(fresh)} listener(s) opened, {closed} closed")
        return "; ".join(parts) or "no change"

    def _sweep(self, rt: VipRuntime) -> None:
        """Every VIP's timeouts are checked by one periodic sweep (not per-chunk timers).

        A removed VIP's runtime is swept until its last connection closed.
        """
        loop = asyncio.get_running_loop()
        try:
            rt.sweep(loop.time())
        finally:
            if not rt.retired or (rt.successor is None and rt.live):
                self._sweeps[rt] = loop.call_later(rt.sweep_period(), self._sweep, rt)
            else:
                self._sweeps.pop(rt, None)

    def addresses(self, vip: str | None = None) -> list[tuple[str, int]]:
        """The bound (host, port) of every listener (of one VIP); port 0 in a VIP binds any."""
        out = []
        for lst in self.listeners.values():
            if lst.server is None or (vip is not None and lst.rt.vip.name != vip):
                continue
            for s in lst.server.sockets:
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

    def relay_status(self) -> dict[str, int] | None:
        """The kernel relay's counters (spliced, refused, fallbacks, open), if it is loaded."""
        relay = self.kernel_relay
        return relay.status() if relay is not None else None

    def buffered(self) -> int:
        """Bytes held by all open connections (for backpressure checks): in user space,
        and in the kernel in front of a peer (kernel relay)."""
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

    def set_enabled(self, vip: str, backend: int, enabled: bool) -> None:
        """Disable a backend: no new connections, and its open ones end at once
        (proxy-l4: closed; proxy-l7: the request it serves gets a 502, or is cut)."""
        rt = self.runtimes[vip]
        if not rt.pool.set_enabled(backend, enabled) or enabled:
            return
        for pooled in rt.idle[backend]:
            if pooled.t is not None:
                pooled.t.close()
        rt.idle[backend].clear()
        key = (rt.hosts[backend], rt.ports[backend])
        for c in list(rt.live):  # connections from before a reload too: by address
            i = c.backend
            if i >= 0 and (c.rt.hosts[i], c.rt.ports[i]) == key:
                c.cut(i)
            elif isinstance(c, H2Client):  # HTTP/2: a backend per stream
                c.cut_address(key)

    def apply_pool(self, vip: str, pool: BackendPool) -> list[str]:
        """Drain, enabled and weight of every backend as ``pool`` has them; what changed."""
        rt = self.runtimes[vip]
        done = []
        for i in range(len(rt.pool)):
            at = f"[{rt.hosts[i]}]" + (f":{rt.ports[i]}" if rt.ports[i] is not None else "")
            if pool.is_draining(i) != rt.pool.is_draining(i):
                self.set_drain(vip, i, pool.is_draining(i))
                done.append(f"{at} {'drained' if pool.is_draining(i) else 'undrained'}")
            if pool.weight(i) != rt.weights[i]:
                self.set_weight(vip, i, pool.weight(i))
                done.append(f"{at} weight {pool.weight(i)}")
            if pool.is_enabled(i) != rt.pool.is_enabled(i):
                self.set_enabled(vip, i, pool.is_enabled(i))
                done.append(f"{at} {'enabled' if pool.is_enabled(i) else 'disabled'}")
        return done

    def quiesce(self) -> int:
        """A graceful stop: close every listener (the kernel refuses new connections),
        close idle proxy-l7 connections, and the others after their current response.
        The client connections still open."""
        self.admission.closing = True
        for lst in self.listeners.values():
            if lst.server is not None:
                lst.server.close()
        for rt in self.runtimes.values():
            for c in list(rt.live):
                c.quiesce()
        return self.admission.active

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
                        "enabled": d.pop("enabled"),
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
        for lst in self.listeners.values():
            if lst.server is not None:
                lst.server.close()
        self.listeners.clear()
        for rt in {*self._sweeps, *self.runtimes.values()}:
            for c in list(rt.live):  # what a graceful stop's timeout leaves: cut
                c.close(abort=True)
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
        if self.kernel_relay is not None:
            self.kernel_relay.close()
            self.kernel_relay = None
        self._relay_tried = False

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _idle(vip: Vip) -> float:
    t = getattr(vip.options, "timeouts", None)
    return float(t.idle) if t is not None else 60.0


def _handshake_timeout(rt: VipRuntime) -> float:
    """proxy-l7: the header timeout; proxy-l4: the connect timeout (the client's first
    bytes are awaited as long)."""
    if rt.is_l7:
        return rt.header_timeout
    return float(rt.l4.timeouts.connect)


class _Listener:
    """One listening socket; ``rt`` (the VIP's runtime now) makes its new connections,
    so a reload that keeps the address and port keeps the socket and swaps ``rt``."""

    __slots__ = ("rt", "server")

    def __init__(self, rt: VipRuntime) -> None:
        self.rt = rt
        self.server: asyncio.Server | None = None

    def make(self) -> asyncio.Protocol:
        rt = self.rt
        p: asyncio.Protocol = L7Client(rt) if rt.is_l7 else L4Client(rt)
        if rt.tls is not None:
            layer = TlsLayer(rt.tls, p, _handshake_timeout(rt), rt.error)
            if rt.is_l7:
                layer.h2 = H2Client.take_over
            return layer
        return p


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
