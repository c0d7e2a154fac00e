"""`v6lb run` for the proxy VIPs: the proxy engines as planes of the daemon.

:class:`BuiltinProxyPlane` (``--proxy builtin``, the asyncio server of
:mod:`.server`) and :class:`HaproxyPlane` (``--proxy haproxy``, :mod:`.haproxy_run`)
run the engine on a thread of their own; the daemon's loop (control socket,
signals) never waits on it. They check their backends themselves, so they hand
the daemon no pools. Their status is the ``proxy`` section of the instance's
answer (:class:`~.status.ProxyStatus`): the builtin engine's counters are
snapshotted on its event loop, HAProxy's read from its stats socket.

The builtin engine applies a reload in place (:meth:`BuiltinProxyPlane.stage`): the
listeners whose address and port stay keep their sockets, the open connections keep
their backend. With HAProxy, a change to the proxy VIPs takes effect at the next
start (logged). `v6lb ctl` changes reach the builtin engine at once
(:meth:`BuiltinProxyPlane.apply_pool_change`).

With ``lb.peers`` every proxy plane installs the second chance
(:mod:`v6lb.render.peers`, docs/anycast.md): one nft table, applied before the engine
serves, replaced in one transaction by a reload that changes it, removed at teardown
(and replaced at the start after a crash); its counters are the status' ``peers``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import json
import shutil
import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from v6lb.core.backends import BackendPool
from v6lb.engines.kernel.apply import KernelError, apply_nft, require_root, require_tools, run_tool
from v6lb.engines.kernel.host import host_links
from v6lb.engines.peers import check_peers_host
from v6lb.engines.plane import Plane, PlaneContext, PlaneStatus, Role, RunError, Staged
from v6lb.errors import UsageError
from v6lb.model.config import Config, Vip
from v6lb.model.modes import Kind, modes_where
from v6lb.model.pools import pools_for
from v6lb.render.haproxy import (
    backend_name,
    frontend_name,
    render_haproxy,
    scaled_weights,
    server_backends,
    server_name,
)
from v6lb.render.peers import peers_table, remove_peers, render_peers

from .haproxy_run import Haproxy, HaproxyError, check_config, run_haproxy, tls_texts
from .server import ProxyServer, serve
from .status import ProxyStatus
from .tls import TlsSetup, check_tls

__all__ = ["BuiltinProxyPlane", "HaproxyPlane", "ProxyPlane"]

_JOIN: float = 10.0  # seconds teardown waits for the engine's thread
_ON_LOOP: float = 5.0  # seconds the daemon waits for the builtin engine's loop to answer


def _address_problem(vips: list[Vip]) -> tuple[str, str] | None:
    """(problem, fix) for the first proxy VIP whose address is not on this host, or None."""
    here = host_links().addresses
    for vip in vips:
        if vip.address not in here:
            return (
                f"vips.{vip.name}.address: {vip.address} is not assigned to any interface"
                " of this host, so the proxy cannot receive its traffic",
                f"add it (ip -6 address add {vip.address}/128 dev lo) or fix the address",
            )
    return None


def _load_tls(config: Config) -> dict[str, TlsSetup]:
    """A reload's certificates, read now (RunError naming the file if one is bad)."""
    try:
        return check_tls(config)
    except UsageError as exc:
        raise RunError(str(exc), "fix the file and reload again") from None


def _check_addresses(vips: list[Vip]) -> None:
    """A reload's proxy VIPs must have their address on this host (RunError if not)."""
    problem = _address_problem(vips)
    if problem is not None:
        raise RunError(*problem)


class ProxyPlane(Plane):
    """A proxy engine on its own thread; :meth:`engine` runs it until the stop event."""

    role: ClassVar[Role] = Role.PROXY

    def __init__(self, config: Config, ctx: PlaneContext) -> None:
        self.config = config
        self.ctx = ctx
        self.proxy_status = ProxyStatus(config, self.name)
        self.final: Mapping[str, Any] | None = None  # the engine's last counters
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        # `v6lb ctl`'s view of the proxy VIPs: drain/enable/weight, applied by the engine
        self._ctl_pools = pools_for(config, modes_where(kind=Kind.PROXY))
        self._peers = ""  # the second chance's table as installed (lb.peers), or ""

    @classmethod
    def preflight(cls, config: Config) -> None:
        if config.lb.peers is not None:  # the second chance is an nft table
            require_root()
            require_tools("nft")

    @classmethod
    def open(cls, config: Config, ctx: PlaneContext) -> ProxyPlane:
        """Every proxy VIP's address must be on this host (in the namespace, if any)."""
        problem = _address_problem([v for v in config.vips if v.mode.is_proxy])
        if problem is not None:  # at the start: a wrong file or host, exit 2
            raise UsageError(f"{ctx.path}: {problem[0]}; fix: {problem[1]}")
        try:
            check_peers_host(config)
        except RunError as exc:
            raise UsageError(f"{exc.message}; fix: {exc.fix}") from None
        check_tls(config)  # a bad certificate or key file: exit 2, naming it
        return cls(config, ctx)

    # --- the second chance (lb.peers) ----------------------------------------------

    def _install_peers(self) -> None:
        """Apply the table (replacing a crashed run's); without lb.peers remove a leftover."""
        instance = self.config.lb.instance
        text = render_peers(self.config)
        if not text:
            if shutil.which("nft") is None:
                return
            r = run_tool(["nft", "-t", "list", "table", *peers_table(instance).split()], netns=None)
            if r.returncode == 0:
                apply_nft(remove_peers(instance))
                self.ctx.warn(f"removed nft table {peers_table(instance)} of an earlier run")
            return
        apply_nft(text)
        self._peers = text

    def _remove_peers(self) -> list[str]:
        if not self._peers:
            return []
        self._peers = ""
        try:
            apply_nft(remove_peers(self.config.lb.instance))
        except KernelError as exc:
            self.ctx.warn(f"removing the second chance failed: {exc.message}")
            return []
        return [f"nft table {peers_table(self.config.lb.instance)} (lb.peers)"]

    def _with_peers(self, config: Config, staged: Staged) -> Staged:
        """A reload that changes the second chance: its table first, then the engine's commit."""
        new = render_peers(config)
        if new == self._peers:
            return staged
        check_peers_host(config)
        engine_commit = staged.commit
        instance = config.lb.instance

        def commit() -> str:
            old = self._peers
            apply_nft(new or remove_peers(instance))
            try:
                text = engine_commit()
            except BaseException:
                apply_nft(old or remove_peers(instance))
                raise
            self._peers = new
            return f"{text}; lb.peers: {'second chance ' + ('on' if new else 'off')}"

        return dataclasses.replace(staged, commit=commit)

    def _peers_status(self) -> dict[str, Any] | None:
        peers = self.config.lb.peers
        if peers is None or not self._peers:
            return None
        out: dict[str, Any] = {
            "table": peers_table(self.config.lb.instance),
            "interface": peers.interface,
            "addresses": [str(a) for a in peers.addresses],
        }
        table = peers_table(self.config.lb.instance).split()
        r = run_tool(["nft", "-j", "list", "counters", "table", *table], netns=None)
        try:
            items = json.loads(r.stdout or "{}").get("nftables", []) if r.returncode == 0 else []
        except ValueError:
            items = []
        for item in items:
            c = item.get("counter") if isinstance(item, dict) else None
            if isinstance(c, dict):
                out[str(c.get("name"))] = {"packets": c.get("packets"), "bytes": c.get("bytes")}
        return out

    def engine(self) -> Mapping[str, Any]:
        """Run the engine until ``self._stop`` is set; call ``self._ready.set()`` once it serves."""
        raise NotImplementedError

    def install(self) -> str:
        """The second chance, then the engine's thread; return once it serves (raise if it
        failed to start, with nothing left behind)."""
        self._install_peers()
        try:
            return self._start_engine()
        except BaseException:
            self._remove_peers()
            raise

    def _start_engine(self) -> str:
        self._thread = threading.Thread(target=self._main, name="v6lb-proxy", daemon=True)
        self._thread.start()
        while not self._ready.wait(0.05):
            if not self._thread.is_alive():
                break
        if self._error is not None:
            self._thread.join(_JOIN)
            raise UsageError(f"proxy engine {self.name}: {self._error}") from None
        n = sum(1 for v in self.config.vips if v.mode.is_proxy)
        peers = self.config.lb.peers
        if peers is not None:
            return (
                f"proxy engine {self.name}: {n} VIP(s); second chance to"
                f" {', '.join(map(str, peers.addresses))} on {peers.interface}"
            )
        return f"proxy engine {self.name}: {n} VIP(s)"

    def _main(self) -> None:
        try:
            self.final = self.engine()
        except BaseException as exc:
            self._error = exc
            if self._ready.is_set() and not self._stop.is_set():
                self.ctx.stop(UsageError(f"proxy engine {self.name}: {exc}"))
            return
        if self._ready.is_set() and not self._stop.is_set():  # e.g. haproxy exited
            self.ctx.log(f"proxy engine {self.name} stopped")
            self.ctx.stop(None)

    def control_pools(self) -> Mapping[str, BackendPool]:
        return self._ctl_pools

    def teardown(self) -> list[str]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_JOIN)
            self._thread = None
        return self._remove_peers()

    def stage(self, config: Config) -> Staged:
        """SIGHUP: the engine's staging, and the second chance's table if it changes."""
        return self._with_peers(config, self._stage_engine(config))

    def _stage_engine(self, config: Config) -> Staged:
        running = [v for v in self.config.vips if v.mode.is_proxy]
        if [v for v in config.vips if v.mode.is_proxy] == running:
            return Staged()

        def note() -> None:
            self.ctx.log("the proxy VIPs changed: that takes effect at the next start")

        return Staged(then=note)

    def status(self) -> PlaneStatus:
        try:
            section: Any = self.proxy_status.section()
        except Exception as exc:  # one broken section must not hide the rest
            section = {"error": f"{type(exc).__name__}: {exc}"}
        sections: dict[str, Any] = {"proxy": section}
        peers = self._peers_status()
        if peers is not None:
            sections["peers"] = peers
        return PlaneStatus(sections=sections)


class BuiltinProxyPlane(ProxyPlane):
    """``--proxy builtin``: the asyncio engine (uvloop when installed).

    Everything the daemon asks of the running engine (a ``ctl`` change, a reload, a
    graceful stop) runs ON the engine's loop (``call_soon_threadsafe``); the daemon's
    thread waits for the answer at most :data:`_ON_LOOP` seconds.
    """

    name = "builtin"

    def __init__(self, config: Config, ctx: PlaneContext) -> None:
        super().__init__(config, ctx)
        self._server: ProxyServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def engine(self) -> Mapping[str, Any]:
        return serve(
            self.config,
            stop_event=self._stop,
            status=self.proxy_status,
            on_ready=self._attach,
        )

    def _attach(self, server: ProxyServer) -> None:
        """On the engine's loop, once it listens."""
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._ready.set()

    def _on_loop(self, fn: Callable[[ProxyServer], Any]) -> Any:
        """``fn(server)`` on the engine's loop (awaited if a coroutine); its result."""
        server, loop = self._server, self._loop
        if server is None or loop is None or loop.is_closed() or self._stop.is_set():
            raise RunError("the builtin proxy engine is not running", "see its log")
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        async def call() -> None:
            try:
                got = fn(server)
                if inspect.isawaitable(got):
                    got = await got
                fut.set_result(got)
            except BaseException as exc:
                fut.set_exception(exc)

        def start() -> None:
            if fut.set_running_or_notify_cancel():
                loop.create_task(call())

        loop.call_soon_threadsafe(start)
        try:
            return fut.result(_ON_LOOP)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise RunError(
                f"the builtin proxy engine did not answer within {_ON_LOOP:g} s", "see its log"
            ) from None

    def _apply(self, vip: str, pool: BackendPool) -> list[str]:
        done: list[str] = self._on_loop(lambda server: server.apply_pool(vip, pool))
        return done

    def apply_pool_change(self, vip: str, pool: BackendPool) -> str:
        done = self._apply(vip, pool)
        return f"proxy engine: {', '.join(done) if done else 'no change'}"

    def _stage_engine(self, config: Config) -> Staged:
        """Check the new proxy VIPs; ``commit`` binds the new listeners (a failure leaves
        the running config as it was), then swaps the config in the running engine."""
        vips = [v for v in config.vips if v.mode.is_proxy]
        _check_addresses(vips)
        setups = _load_tls(config)  # every TLS VIP's certificates, read again
        pools = pools_for(config, modes_where(kind=Kind.PROXY))

        def reload_tls() -> str:
            if not setups:
                return ""
            done: list[str] = self._on_loop(lambda s: s.reload_tls(setups))
            return f"; certificates reloaded: {', '.join(done)}" if done else ""

        if vips == [v for v in self.config.vips if v.mode.is_proxy]:
            # the same VIPs: only the ctl overrides (on the new pools) may differ
            def same() -> str:
                self._ctl_pools = pools
                for name, pool in pools.items():
                    self._apply(name, pool)
                return reload_tls()

            return Staged(commit=same, control_pools=pools)

        def commit() -> str:
            server = self._server
            if server is None:
                raise RunError("the builtin proxy engine is not running", "see its log")
            wanted: list[tuple[str, int, int]] = self._on_loop(lambda s: s.missing_binds(vips))
            try:
                socks = server.bind(wanted)
            except OSError as exc:
                raise RunError(
                    f"the proxy cannot listen on a new address: {exc.strerror or exc}",
                    "free the port (or fix the VIP's address or ports) and reload again",
                ) from None
            text: str = self._on_loop(lambda s: s.reconfigure(vips, socks, pools))
            self.config = config
            self._ctl_pools = pools
            self.proxy_status.reconfigure(config)
            return f"; proxy engine: {text}{reload_tls()}"

        return Staged(commit=commit, control_pools=pools)

    def quiesce(self) -> str:
        n = self._on_loop(lambda server: server.quiesce())
        return f"proxy engine: listeners closed, {n} connection(s) open"

    def in_flight(self) -> int:
        server = self._server
        if server is None or self._stop.is_set():
            return 0
        return server.admission.active  # a plain int: safe to read from this thread

    def serving(self) -> Mapping[str, bool]:
        """The engine's own view: a backend up (its health checks), not drained or disabled."""
        try:
            got: dict[str, bool] = self._on_loop(
                lambda server: {n: rt.pool.any_eligible for n, rt in server.runtimes.items()}
            )
        except RunError:
            return {}  # not running (any more): nothing to announce
        return got


class HaproxyPlane(ProxyPlane):
    """``--proxy haproxy``: Debian's haproxy (master-worker) on the rendered haproxy.cfg.

    A reload renders the new proxy VIPs from the new pools (`v6lb ctl`'s overrides
    applied), checks them with ``haproxy -c`` in :meth:`stage` and reloads haproxy
    seamlessly in ``commit`` (:meth:`.haproxy_run.Haproxy.reload`). A ``ctl`` change
    goes to HAProxy's runtime API (``set server``). The graceful stop is HAProxy's
    soft stop; the sessions in flight are the frontends' ``scur`` of every worker.
    """

    name = "haproxy"

    def __init__(self, config: Config, ctx: PlaneContext) -> None:
        super().__init__(config, ctx)
        self._haproxy: Haproxy | None = None
        self._quiesced = False
        self._serving: dict[str, bool] = {}  # the last serving() answer
        self._tls_files: dict[str, bytes] = {}  # the certificate lists haproxy loaded
        self.proxy_status.set_haproxy_config(config, self._ctl_pools)

    def engine(self) -> Mapping[str, Any]:
        def started(hp: Haproxy) -> None:
            self._haproxy = hp
            self._tls_files = tls_texts(self.config, hp.tls_dir)
            self._ready.set()

        final = run_haproxy(
            self.config,
            stop_event=self._stop,
            status=self.proxy_status,
            on_start=started,
            pools=self._ctl_pools,
        )
        if self._quiesced:  # the soft stop ended haproxy: the daemon's stop goes on
            self._stop.wait()
        return final

    def _running(self) -> Haproxy:
        hp = self._haproxy
        if hp is None or not hp.alive():
            raise RunError("haproxy is not running", "restart `v6lb run --proxy haproxy`")
        return hp

    def _stage_engine(self, config: Config) -> Staged:
        running = [v for v in self.config.vips if v.mode.is_proxy]
        vips = [v for v in config.vips if v.mode.is_proxy]
        hp = self._haproxy
        files: dict[str, bytes] = {}
        if hp is not None and any(getattr(v.options, "tls", None) for v in vips):
            _load_tls(config)
            try:
                files = tls_texts(config, hp.tls_dir)
            except HaproxyError as exc:
                raise RunError(str(exc), "fix the file and reload again") from None
        if vips == running and files == self._tls_files:
            return Staged()
        _check_addresses(vips)
        hp = self._running()
        pools = pools_for(config, modes_where(kind=Kind.PROXY))
        hp.write_tls(files)  # haproxy -c loads them; the running worker has its own copy
        ok, out = check_config(
            render_haproxy(config, stats_socket=hp.stats_socket, tls_dir=hp.tls_dir)
        )
        if not ok:
            raise RunError(f"haproxy rejects the new config:\n{out.strip()}", "fix the file")

        def commit() -> str:
            # after the daemon applied `v6lb ctl`'s overrides onto the new pools
            text = render_haproxy(
                config, stats_socket=hp.stats_socket, pools=pools, tls_dir=hp.tls_dir
            )
            try:
                worker = hp.reload(text)
            except (HaproxyError, OSError) as exc:
                raise RunError(str(exc), "fix the file, or what haproxy names") from None
            self.config = config
            self._ctl_pools = pools
            self._tls_files = files
            self.proxy_status.set_haproxy_config(config, pools)
            return f"; haproxy reloaded: {len(vips)} proxy VIP(s), worker pid {worker}"

        return Staged(commit=commit, control_pools=pools)

    def apply_pool_change(self, vip: str, pool: BackendPool) -> str:
        """Each backend's state and weight through HAProxy's runtime API (every worker).

        drain: ``state drain`` (no new connections, the open ones go on); disabled:
        ``state maint`` and ``shutdown sessions`` (its open connections close too);
        else ``state ready``. Weights as rendered: 1..256 as they are, above scaled.
        """
        hp = self._running()
        weights = scaled_weights([pool.weight(i) for i in range(len(pool))])
        done = []
        found = [v for v in self.config.vips if v.name == vip]
        try:
            for i, weight in enumerate(weights):
                if not pool.is_enabled(i):
                    state = "maint"
                elif pool.is_draining(i):
                    state = "drain"
                else:
                    state = "ready"
                # TLS passthrough: the server is in its SNI routes' backends too
                names = server_backends(found[0], i) if found else [backend_name(vip)]
                for back in names:
                    server = f"{back}/{server_name(i)}"
                    hp.command(f"set server {server} weight {weight}")
                    hp.command(f"set server {server} state {state}")
                    if state == "maint":
                        hp.command(f"shutdown sessions server {server}")
                done.append(f"{server_name(i)} {state} weight {weight}")
        except (HaproxyError, OSError) as exc:
            raise RunError(f"haproxy runtime API: {exc}", "see haproxy's log") from None
        return f"haproxy: {', '.join(done)}"

    def quiesce(self) -> str:
        hp = self._haproxy
        if hp is None or not hp.alive():
            return ""
        self._quiesced = True
        hp.soft_stop()
        return "haproxy: soft stop (listeners closed, open connections finish)"

    def serving(self) -> Mapping[str, bool]:
        """HAProxy's own view (``show stat``): a server ``UP`` (or unchecked) with a weight.

        A drained server is ``DRAIN`` (weight 0), a disabled one ``MAINT``. When the
        stats cannot be read the last answer stands (a slow socket withdraws nothing).
        """
        hp = self._haproxy
        if hp is None or not hp.alive():
            return {}
        try:
            rows = hp.stat_rows()
        except (HaproxyError, OSError):
            return self._serving
        up: set[str] = set()
        for r in rows:
            word = (r.get("status") or "").split(" ", 1)[0].upper()
            if r.get("svname") in ("FRONTEND", "BACKEND") or word not in ("UP", "NO"):
                continue
            if int(r.get("weight") or 0) > 0:
                up.add(r.get("pxname", ""))
        self._serving = {
            v.name: backend_name(v.name) in up for v in self.config.vips if v.mode.is_proxy
        }
        return self._serving

    def in_flight(self) -> int:
        hp = self._haproxy
        if hp is None or not hp.alive():
            return 0
        fronts = {
            frontend_name(v.name, port) for v in self.config.vips if v.mode.is_proxy
            for port in v.ports
        }  # fmt: skip
        try:
            return hp.sessions(fronts)
        except OSError:
            return 1 if hp.alive() else 0  # a worker exiting: the master follows
