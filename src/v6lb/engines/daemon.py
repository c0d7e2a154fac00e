"""One `v6lb run` process: the instance, and the planes plugged into it.

:class:`Daemon` owns what every engine needs once per instance:

* the control socket (:class:`~v6lb.engines.control.ControlServer`) answering
  ``status`` with one typed :class:`~v6lb.model.status.InstanceStatus`
  composed from its planes;
* the signals (SIGTERM/SIGINT stop, SIGHUP reloads) and the one selector loop,
  woken by the signals through a wake descriptor; planes add their descriptors
  (:meth:`~v6lb.engines.plane.Plane.watch`) and periodic work
  (:meth:`~v6lb.engines.plane.Plane.tick`);
* the reload policy: the file is loaded and checked again, every plane stages it,
  then every plane applies it; any failure keeps what runs and is logged (and
  shown as ``last_error``). Backends known down stay down until they rise;
* health driving: TCP and HTTP probes (:class:`~v6lb.engines.probe.Prober`) and one
  :class:`~v6lb.core.health.HealthSet` per VIP of the data plane's
  :meth:`~v6lb.engines.plane.Plane.pools`; a backend that changes state changes its
  pool and the plane applies it (:meth:`~v6lb.engines.plane.Plane.apply_pool_change`);
* the log: ``v6lb run [<instance>]: ...`` on stderr, the last 50 lines in the status;
* the per-instance overrides (``--instance``, ``--control-socket``) and ``--netns``
  (entered before any plane starts a thread: ``setns(2)`` is per thread).

:func:`prepare` makes every check before anything is installed and picks the
planes from :mod:`v6lb.engines.planes`; :func:`run_instance` is `v6lb run`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import selectors
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Final

from v6lb.core.backends import BackendPool
from v6lb.core.health import HealthSet, HealthState
from v6lb.engines.control import ControlError, ControlServer
from v6lb.engines.kernel.apply import KernelError
from v6lb.engines.kernel.host import enter_netns
from v6lb.engines.plane import Plane, PlaneContext, PlaneStatus, Ready, Role, RunError, Staged
from v6lb.engines.planes import names, plane_class, served_modes, serving
from v6lb.engines.probe import (
    Prober,
    ProbeRoute,
    ProbeTag,
    ProbeTarget,
    drive_health,
    health_deadline,
)
from v6lb.errors import UsageError, V6lbError
from v6lb.model.config import Config, ConfigError, load_config
from v6lb.model.modes import Kind, facts, modes_where
from v6lb.model.pools import health_monitor
from v6lb.model.status import (
    BackendStatus,
    Counter,
    IcmpErrors,
    InstanceStatus,
    NptStatus,
    VipStatus,
)

__all__ = [
    "Daemon",
    "RunOptions",
    "load_for_run",
    "prepare",
    "run_instance",
]

_INSTANCE_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,9}")
_EVENTS: Final = 50
_EXPIRE_EVERY: Final = 1.0  # seconds between two sweeps of silent control clients
# the answer's keys before the data plane's own (docs/run.md); the proxies' sections come last
_ANSWER_KEYS: Final = (
    "instance",
    "pid",
    "file",
    "netns",
    "dataplane",
    "control_socket",
    "uptime_s",
    "reloads",
    "map_updates",
    "last_error",
    "skipped",
    "vips",
    "npt",
)
_PROXY_ONLY_KEYS: Final = (  # no data plane: the proxy engine answers alone
    "instance",
    "pid",
    "file",
    "netns",
    "dataplane",
    "proxy_engine",
    "control_socket",
    "uptime_s",
    "vips",
    "npt",
    "skipped",
)


@dataclass(frozen=True, slots=True)
class RunOptions:
    """`v6lb run`'s command line."""

    path: str
    dataplane: str = "kernel"
    proxy: str | None = None
    instance: str | None = None
    netns: str | None = None
    control_socket: str | None = None
    trace: bool = False


def load_for_run(
    path: str, *, instance: str | None = None, control_socket: str | None = None
) -> Config:
    """Load the file for `run` and apply the command-line overrides; RunError on a problem."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise RunError(str(exc), f"fix the file; `v6lb check {path}` shows every problem") from None
    return with_overrides(config, instance=instance, control_socket=control_socket)


def with_overrides(
    config: Config, *, instance: str | None = None, control_socket: str | None = None
) -> Config:
    """``--instance`` (the default socket path follows the name) and ``--control-socket``."""
    lb = config.lb
    if instance is not None:
        if not _INSTANCE_RE.fullmatch(instance):
            raise RunError(
                f"--instance {instance!r} is not a valid instance name",
                "use 1 to 10 characters of a-z, 0-9 and '-', starting with a letter or digit",
            )
        if lb.control_socket == f"/run/v6lb/{lb.instance}.sock":
            lb = dataclasses.replace(lb, control_socket=f"/run/v6lb/{instance}.sock")
        lb = dataclasses.replace(lb, instance=instance)
    if control_socket is not None:
        lb = dataclasses.replace(lb, control_socket=control_socket)
    return dataclasses.replace(config, lb=lb)


def _has_l3(config: Config) -> bool:
    return bool(config.npt) or any(not v.mode.is_proxy for v in config.vips)


def _nothing_for(path: str, dataplane: str) -> RunError:
    served = served_modes(dataplane)
    vips = [m for m in served if facts(m).vip]
    npt = "npt" in served
    none = "/".join(vips) + " VIP" + (", no npt: pair" if npt else "")
    add = ", ".join(vips[:-1]) + f" or {vips[-1]}" if len(vips) > 1 else "".join(vips)
    return RunError(
        f"{path} has nothing for the {dataplane} data plane (no {none})",
        f"add a {add} VIP{' or an npt: pair' if npt else ''}; "
        f"{'/'.join(modes_where(kind=Kind.PROXY))} VIPs are run by the proxy engine"
        f" (--proxy {'|'.join(names(Role.PROXY))})",
    )


def _check_served(config: Config, dataplane: str) -> tuple[str, ...]:
    """Refuse a VIP the data plane does not serve; the proxy VIPs it skips, with the reason."""
    served = served_modes(dataplane)
    if config.npt and "npt" not in served:
        raise RunError(
            f"{config.source}: npt: is not served by --dataplane {dataplane}",
            f"use a data plane that serves it: {', '.join(_planes_serving('npt'))}",
        )
    for v in config.vips:
        if not v.mode.is_proxy and str(v.mode) not in served:
            raise RunError(
                f"{config.source}: vips.{v.name}: mode {v.mode} is not served by"
                f" --dataplane {dataplane}",
                f"use a data plane that serves it: {', '.join(_planes_serving(str(v.mode)))}",
            )
    return tuple(
        f"{v.name} ({v.mode}): proxy VIPs are served by the proxy engine"
        f" (--proxy {'|'.join(names(Role.PROXY))}), not by `v6lb run --dataplane {dataplane}`"
        for v in config.vips
        if v.mode.is_proxy
    )


def _planes_serving(mode: str) -> list[str]:
    return list(serving(mode))  # registered planes only, never a plane the table merely names


# --- health -----------------------------------------------------------------------


@dataclass(slots=True)
class Health:
    """The probed VIPs: their pools (the planes'), monitors and probe targets."""

    pools: dict[str, BackendPool] = field(default_factory=dict)
    sets: dict[str, HealthSet[int]] = field(default_factory=dict)
    targets: dict[tuple[str, int], ProbeTarget] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        config: Config,
        pools: Mapping[str, BackendPool],
        now: float,
        was_down: set[tuple[str, str, int | None]],
        routes: Callable[[str, int], ProbeRoute | None] = lambda vip, i: None,
    ) -> Health:
        """Monitors for every probed backend; a backend known down stays down until it rises.

        ``routes(vip, index)`` is the owning plane's data path to that backend
        (:meth:`Plane.probe_route`): when it gives one, the probe goes through it.
        """
        out = cls(pools=dict(pools))
        for vip in config.vips:
            if vip.name not in pools:
                continue
            hs: HealthSet[int] = HealthSet()
            h = vip.health
            n = len(vip.backends)
            for i, b in enumerate(vip.backends):
                down = (vip.name, str(b.address), b.port) in was_down
                # the first probes spread out over half an interval
                first = now + h.interval * i / n / 2
                monitor = health_monitor(h, now, up=not down, first_probe_at=first)
                if monitor is not None:
                    port = h.port or b.port or vip.ports[0]
                    route = routes(vip.name, i)
                    out.targets[(vip.name, i)] = ProbeTarget(b.address, port, h, route)
                hs.add(i, monitor, weight=b.weight, drain=b.drain)
                if down:
                    pools[vip.name].set_up(i, False)
            out.sets[vip.name] = hs
        return out

    def down(self, config: Config) -> set[tuple[str, str, int | None]]:
        """(VIP, address, port) of every backend that is down now."""
        return {
            (name, str(vip.backends[i].address), vip.backends[i].port)
            for name, hs in self.sets.items()
            for vip in [config.vip(name)]
            for i in range(len(vip.backends))
            if hs.state(i) is HealthState.DOWN
        }


# --- the instance -----------------------------------------------------------------


class Daemon:
    """One instance: call :meth:`install`, then :meth:`serve` (or :meth:`run` for both)."""

    def __init__(
        self,
        config: Config,
        planes: Sequence[Plane],
        *,
        path: str,
        netns: str | None = None,
        overrides: Mapping[str, str | None] | None = None,
        skipped: tuple[str, ...] = (),
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.planes = list(planes)
        self.path = path
        self.netns = netns
        self.overrides = dict(overrides or {})
        self.skipped = skipped
        self.instance = config.lb.instance
        self._log_out = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.events: deque[str] = deque(maxlen=_EVENTS)
        self.started = time.time()
        self.reloads = 0
        self.map_updates = 0
        self.last_error: str | None = None
        self.sel = selectors.DefaultSelector()
        self.prober = Prober(self.sel)
        self.control: ControlServer | None = None
        self.health = Health()
        self._owner: dict[str, Plane] = {}
        self.attach(self.planes)
        self._signals: list[int] = []
        self._lock = threading.Lock()  # _stops: appended by planes' threads
        self._stops: list[BaseException | None] = []
        self._stop = False
        self.failure: BaseException | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._next_expire = 0.0

    def attach(self, planes: Sequence[Plane]) -> None:
        """Plug ``planes`` in (before :meth:`install`): the daemon probes their pools."""
        self.planes = list(planes)
        self.health, self._owner = self._health(
            self.config, {p: p.pools() for p in self.planes}, set()
        )

    @property
    def dataplane(self) -> Plane | None:
        return next((p for p in self.planes if p.role is Role.DATAPLANE), None)

    def _health(
        self,
        config: Config,
        pools: Mapping[Plane, Mapping[str, BackendPool]],
        down: set[tuple[str, str, int | None]],
    ) -> tuple[Health, dict[str, Plane]]:
        owner = {name: plane for plane, own in pools.items() for name in own}
        merged = {name: pool for own in pools.values() for name, pool in own.items()}

        def routes(vip: str, index: int) -> ProbeRoute | None:
            return owner[vip].probe_route(config, vip, index)

        return Health.build(config, merged, time.monotonic(), down, routes), owner

    def context(self, *, trace: bool = False) -> PlaneContext:
        """What a plane of this instance is given: its log, the stop request, the file."""
        return PlaneContext(
            path=self.path,
            netns=self.netns,
            trace=trace,
            log=self.log,
            emit=self._log_out,
            stop=self.request_stop,
        )

    def log(self, message: str) -> None:
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now))
        self.events.append(f"{stamp}.{int(now % 1 * 1000):03d} {message}")
        self._log_out(f"v6lb run [{self.instance}]: {message}")

    def request_stop(self, error: BaseException | None = None) -> None:
        """End the instance (any thread); with ``error``, :meth:`serve` raises it at the end."""
        with self._lock:
            self._stops.append(error)
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # the loop is gone already, or its wake buffer is full (it wakes anyway)

    # --- install / remove -------------------------------------------------------

    def install(self) -> None:
        """Open the control socket, then install every plane; on failure nothing stays behind."""
        path = self.config.lb.control_socket
        try:
            self.control = ControlServer(
                path,
                {"status": self.answer},
                log=self.log,
                threaded=any(p.threaded_status for p in self.planes),
            )
        except OSError as exc:
            raise ControlError(
                f"cannot open the control socket {path}: {exc.strerror or exc}; fix: run as"
                " root, or give a writable path with lb.control_socket (or --control-socket)"
            ) from None
        summaries: list[str] = []
        done: list[Plane] = []
        try:
            for plane in self.planes:
                summaries.append(plane.install())
                done.append(plane)
        except BaseException:
            for plane in reversed(done):
                self._teardown_plane(plane)
            self.prober.close()
            self.control.close()
            self.control = None
            raise
        self.control.register(self.sel)
        for plane in self.planes:
            plane.watch(self.sel)
        for line in self.skipped:
            self.log(f"skipped VIP {line}")
        text = "; ".join(s for s in summaries if s)
        if text:
            self.log(f"{text}; control socket {path}")

    def teardown(self) -> list[str]:
        """Remove every plane (the last installed first), close the control socket."""
        self.prober.close()
        removed: list[str] = []
        try:
            for plane in reversed(self.planes):
                removed += self._teardown_plane(plane)
        finally:
            if self.control is not None:
                self.control.close(self.sel)
                self.control = None
        return removed

    def _teardown_plane(self, plane: Plane) -> list[str]:
        try:
            removed = plane.teardown()
        except KernelError as exc:
            self.log(f"removing the {plane.name} plane failed: {exc.message}")
            return []
        for item in removed:
            self.log(f"removed {item}")
        return removed

    # --- the loop ----------------------------------------------------------------

    def run(self, *, signals: bool = True) -> int:
        self.install()
        return self.serve(signals=signals)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def serve(self, *, signals: bool = True) -> int:
        """Run until SIGTERM/SIGINT (SIGHUP reloads) or a stop request; remove what was installed.

        The exit code (0); a plane's failure is raised after the teardown.
        ``signals=False`` (an instance embedded in a thread, as in tests) leaves the
        process's signal handlers alone: :meth:`request_stop` ends it.
        """
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        old_fd: int | None = None
        old: dict[int, Any] = {}
        if signals:
            old_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
            old = {
                s: signal.signal(s, self._on_signal)
                for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
            }
        try:
            while not self._stop:
                self._turn()
        finally:
            if old_fd is not None:
                signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
            try:
                self.teardown()
            finally:
                self.sel.close()
                self._wake_r.close()
                self._wake_w.close()
            self.log("stopped")
        if self.failure is not None:
            raise self.failure
        return 0

    def _turn(self) -> None:
        """One loop turn: probes due, the planes' ticks, what is ready, signals."""
        h = self.health
        now = time.monotonic()
        changed = drive_health(h.sets, h.targets, self.prober, now)
        if changed:
            self._sync(changed)
        deadline = health_deadline(h.sets, now)
        for plane in self.planes:
            at = plane.tick(now)
            if at is not None and at < deadline:
                deadline = at
        changed = set()
        for sk, _ in self.sel.select(max(0.0, deadline - time.monotonic())):
            data = sk.data
            if type(data) is Ready:
                data.fn()
            elif isinstance(data, ProbeTag):
                done = self.prober.handle(sk)
                if done is None:
                    continue  # an HTTP probe goes on
                key, pid, ok = done
                assert isinstance(key, tuple)
                owner = self.health.sets.get(key[0])
                if (
                    owner is not None
                    and key[1] in owner
                    and owner.probe_result(key[1], ok, time.monotonic(), pid)
                ):
                    changed.add(key[0])
            elif isinstance(data, ControlServer):
                data.handle(sk)  # never blocks or raises (engines/control.py)
            elif data == "wake":
                try:
                    while self._wake_r.recv(512):
                        pass
                except BlockingIOError:
                    pass
        if changed:
            self._sync(changed)
        now = time.monotonic()
        if now >= self._next_expire and self.control is not None:
            self._next_expire = now + _EXPIRE_EVERY
            self.control.expire(now)  # silent control clients
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self.reload()
            else:
                self.log(f"{signal.Signals(signum).name}: removing what this instance installed")
                self._stop = True
        with self._lock:
            stops, self._stops = self._stops, []
        for error in stops:
            self._stop = True
            if error is not None and self.failure is None:
                self.failure = error

    def _sync(self, vips: set[str]) -> None:
        """Bring the pools in line with health; each plane applies its changed pools."""
        h = self.health
        for name in sorted(vips):
            hs, pool = h.sets[name], h.pools[name]
            moved = [i for i in range(len(pool)) if pool.set_up(i, hs.state(i) is HealthState.UP)]
            if not moved:
                continue
            vip = self.config.vip(name)
            states = ", ".join(f"{vip.backends[i].address} {hs.state(i)}" for i in moved)
            try:
                what = self._owner[name].apply_pool_change(name, pool)
            except KernelError as exc:
                self.last_error = exc.message
                self.log(self.last_error)
                continue
            self.map_updates += 1
            self.log(f"{name}: {states}; {what}")

    # --- reload ------------------------------------------------------------------

    def reload(self) -> bool:
        """SIGHUP: load and check the file, stage it on every plane, then apply it.

        On any failure the running configuration stays and the error is logged.
        """
        old = self.config
        try:
            config = load_for_run(
                self.path,
                instance=self.overrides.get("instance"),
                control_socket=self.overrides.get("control_socket"),
            )
            if config.lb.instance != self.instance:
                raise RunError(
                    f"the instance name changed ({self.instance} -> {config.lb.instance})",
                    "stop this instance and start the new one",
                )
            dataplane = self.dataplane
            skipped = self.skipped
            if dataplane is not None:
                if not _has_l3(config):
                    raise _nothing_for(self.path, dataplane.name)
                skipped = _check_served(config, dataplane.name)
            elif _has_l3(config):
                raise RunError(
                    "the new file adds npt or nat/dsr-* VIPs to an instance without a data plane",
                    "restart `v6lb run` for that change",
                )
            staged: list[tuple[Plane, Staged]] = [(p, p.stage(config)) for p in self.planes]
            health, owner = self._health(
                config, {p: s.pools for p, s in staged}, self.health.down(old)
            )
            texts = [s.commit() for _, s in staged]
        except (KernelError, OSError, ValueError) as exc:
            text = exc.message if isinstance(exc, KernelError) else str(exc)
            self.last_error = f"reload failed, still running the previous config: {text}"
            self.log(self.last_error)
            return False
        self.prober.close()
        self.config, self.skipped = config, skipped
        self.health, self._owner = health, owner
        self.reloads += 1
        self.last_error = None
        if config.lb.control_socket != old.lb.control_socket:
            self.log("lb.control_socket changed: it takes effect at the next start")
        self.log(f"reloaded {self.path}{''.join(texts)}")
        for _, s in staged:
            s.then()
        return True

    # --- status ------------------------------------------------------------------

    def answer(self, request: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The control socket's ``status`` command (docs/run.md, `v6lb status`)."""
        return self.status().to_dict()

    def status(self) -> InstanceStatus:
        """The instance, then the data plane's keys, ``events``, the proxies' sections.

        The planes' parts are read as :meth:`InstanceStatus.from_dict` reads them: a
        key the model knows becomes its typed section, any other stays in ``extra``.
        """
        config, h = self.config, self.health
        dataplane = self.dataplane
        vips: list[VipStatus] = []
        details: Mapping[str, Any] = {}
        npt_icmp: list[IcmpErrors] = []
        if dataplane is not None:
            ps = dataplane.status()
            details = ps.details
            npt_icmp = ps.npt_icmp
            vips = [self._vip_status(v.name, ps) for v in config.vips if v.name in h.pools]
        sections: dict[str, Any] = {}
        proxy: str | None = None
        for plane in self.planes:
            if plane.role is Role.PROXY:
                proxy = proxy or plane.name
                sections.update(plane.status().sections)
        typed, extra = InstanceStatus.parse_fields({**details, **sections})
        uptime = round(time.time() - self.started, 3)
        if dataplane is None:  # proxy VIPs only
            return InstanceStatus(
                instance=self.instance,
                pid=os.getpid(),
                file=self.path,
                netns=self.netns,
                proxy_engine=proxy,
                control_socket=config.lb.control_socket,
                uptime_s=uptime,
                **typed,
                extra=extra,
                keys=(*_PROXY_ONLY_KEYS, *sections),
            )
        return InstanceStatus(
            instance=self.instance,
            pid=os.getpid(),
            file=self.path,
            netns=self.netns,
            dataplane=dataplane.name,
            control_socket=config.lb.control_socket,
            uptime_s=uptime,
            reloads=self.reloads,
            map_updates=self.map_updates,
            last_error=self.last_error,
            skipped=list(self.skipped),
            vips=vips,
            npt=[
                NptStatus(
                    str(p.inside),
                    str(p.outside),
                    npt_icmp[i] if i < len(npt_icmp) else IcmpErrors(),
                )
                for i, p in enumerate(config.npt)
            ],
            events=list(self.events),
            **typed,
            extra=extra,
            keys=(*_ANSWER_KEYS, *details, "events", *sections),
        )

    def _vip_status(self, name: str, ps: PlaneStatus) -> VipStatus:
        vip = self.config.vip(name)
        hs, pool = self.health.sets[name], self.health.pools[name]
        backends = []
        for i, b in enumerate(vip.backends):
            monitor = hs.monitor(i)
            target = self.health.targets.get((name, i))
            backends.append(
                BackendStatus(
                    address=str(b.address),
                    port=b.port,
                    weight=b.weight,
                    drain=b.drain,
                    health=str(hs.state(i)),
                    probe=target.describe() if target else "none",
                    successes=monitor.successes if monitor else None,
                    failures=monitor.failures if monitor else None,
                    slots=pool.table.count(i),
                )
            )
        counter = ps.counters.get(name)
        return VipStatus(
            name=vip.name,
            address=str(vip.address),
            ports=list(vip.ports),
            protocol=str(vip.protocol),
            mode=str(vip.mode),
            table_size=pool.size,
            seed=pool.seed,
            maps=list(ps.maps.get(name, ())),
            counter=Counter(counter.name, counter.packets, counter.bytes)
            if counter
            else Counter(""),
            icmp_errors=ps.icmp.get(name, IcmpErrors()),
            backends=backends,
        )


# --- starting one -------------------------------------------------------------------


def prepare(options: RunOptions, *, log: Callable[[str], None] | None = None) -> Daemon:
    """Every check `run` makes before it installs anything, and the instance ready to run.

    Raises :class:`~v6lb.errors.UsageError` for a wrong file or command line,
    :class:`~v6lb.engines.plane.RunError` (a ``KernelError``) when a check of
    the host fails; nothing is installed either way.
    """
    path = options.path
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise UsageError(f"{exc}; `v6lb check {path}` shows every problem") from None
    has_proxy = any(v.mode.is_proxy for v in config.vips)
    if options.proxy is not None and not has_proxy:
        raise UsageError(
            f"--proxy {options.proxy} needs a proxy-l4 or proxy-l7 VIP, and {path} has none; "
            "--proxy chooses the proxy engine, --dataplane the L3/L4 data plane"
        )
    config = with_overrides(
        config, instance=options.instance, control_socket=options.control_socket
    )
    chosen: list[str] = []
    skipped: tuple[str, ...] = ()
    if _has_l3(config) or not has_proxy:
        if options.dataplane not in names(Role.DATAPLANE):
            known = names(Role.DATAPLANE)
            raise RunError(
                f"--dataplane {options.dataplane} is not known",
                f"use --dataplane {' or '.join(known)} ({known[0]} is the default)",
            )
        if not _has_l3(config):
            raise _nothing_for(path, options.dataplane)
        skipped = _check_served(config, options.dataplane)
        chosen.append(options.dataplane)
    if has_proxy:
        chosen.append(options.proxy or names(Role.PROXY)[0])
    classes = [plane_class(n) for n in chosen]
    for cls in classes:
        cls.preflight(config)
    if options.netns is not None:
        enter_netns(options.netns)  # before any plane starts a thread: setns(2) is per thread
    daemon = Daemon(
        config,
        [],
        path=path,
        netns=options.netns,
        overrides={"instance": options.instance, "control_socket": options.control_socket},
        skipped=skipped,
        log=log,
    )
    ctx = daemon.context(trace=options.trace)
    daemon.attach([cls.open(config, ctx) for cls in classes])
    return daemon


def run_instance(options: RunOptions, *, log: Callable[[str], None] | None = None) -> int:
    """`v6lb run`: check, install, serve until SIGTERM/SIGINT, remove; the exit code.

    Every refusal is a :class:`~v6lb.errors.V6lbError`: a wrong file, command line
    or host is a ``UsageError`` (exit 2, nothing installed); a kernel that refuses
    what was rendered, or a missing kernel feature, a ``RuntimeFailure`` (exit 1).
    """
    try:
        daemon = prepare(options, log=log)
        daemon.install()
    except ControlError as exc:  # the socket is taken or cannot be made: fix the path
        raise UsageError(str(exc)) from None
    # every other refusal (ConfigError, KernelError, ApplyError, ...) is a V6lbError
    # that carries its own exit code: it goes up unchanged
    try:
        return daemon.serve()
    except V6lbError:
        raise
    except Exception as exc:  # a plane's failure on its own thread (the proxy engine)
        raise UsageError(str(exc)) from None
