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
* runtime control (``ctl`` on the control socket, `v6lb ctl`, :mod:`v6lb.engines.ctl`):
  the operator's drain/enable/weight overrides, applied to a pool at once by its
  plane's :meth:`~v6lb.engines.plane.Plane.apply_pool_change` and again on top of the
  file at every reload (the "reloaded" line names them); refused for any peer uid
  but the instance's own and root;
* the BGP speaker of ``bgp:`` (:class:`~v6lb.engines.announce.Announcer`, one
  BIRD): every VIP of every plane is announced while :meth:`Plane.serving
  <v6lb.engines.plane.Plane.serving>` says it has a backend for new flows; it is
  started once every plane is installed, synced after each pool change and at its
  self-check (once a second), reconfigured after a reload, withdrawn first at a
  graceful stop and stopped before any plane is removed;
* the log: ``v6lb run [<instance>]: ...`` on stderr (``--log-format json``: one JSON
  object per line, :func:`log_record`), the last 50 lines in the status;
* ``/metrics`` (``lb.metrics``, :mod:`v6lb.engines.metrics`): served on threads of its
  own from a status snapshot (:meth:`Daemon.snapshot`) computed where the control
  socket computes it: on the scraping thread when the planes answer on any thread,
  else by the loop between two turns;
* the per-instance overrides (``--instance``, ``--control-socket``) and ``--netns``
  (entered before any plane starts a thread: ``setns(2)`` is per thread).

:func:`prepare` makes every check before anything is installed and picks the
planes from :mod:`v6lb.engines.planes`; :func:`run_instance` is `v6lb run`.
"""

from __future__ import annotations

import dataclasses
import grp
import json
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
from v6lb.engines.announce import Announcer
from v6lb.engines.control import ControlError, ControlServer
from v6lb.engines.ctl import CtlRefused, Override, OverrideKey, apply_override, check_request
from v6lb.engines.kernel.apply import KernelError
from v6lb.engines.kernel.host import enter_netns
from v6lb.engines.metrics import MetricsServer
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
    "LOG_FORMATS",
    "Daemon",
    "RunOptions",
    "log_record",
    "load_for_run",
    "prepare",
    "run_instance",
]

_INSTANCE_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,9}")
_EVENTS: Final = 50
LOG_FORMATS: Final = ("text", "json")
_EXPIRE_EVERY: Final = 1.0  # seconds between two sweeps of silent control clients
_SNAPSHOT_WAIT: Final = 5.0  # seconds a scrape waits for the loop's snapshot
_SETTLE: Final = 1.0  # seconds between a graceful stop's BGP withdraw and the proxies' quiesce
_STOP_POLL: Final = 0.1  # seconds between two looks at what is in flight during a graceful stop
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
    "reloads",
    "map_updates",
    "last_error",
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
    log_format: str = "text"
    drain_timeout: float = 0.0  # SIGTERM/SIGINT: seconds the graceful stop may take (0: none)


def log_record(
    instance: str | None,
    message: str,
    /,
    *,
    level: str = "info",
    now: float | None = None,
    **fields: object,
) -> str:
    """One ``--log-format json`` line: time (UTC, ISO 8601), instance, level, message, fields.

    ``fields`` are the structured facts the daemon has about the event (the VIP,
    the backends and their health, the signal, the removed object ...); a field
    never replaces one of the four fixed keys, and a field whose value is None is
    left out.
    """
    t = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
    record: dict[str, object] = {
        "time": stamp,
        "instance": instance,
        "level": level,
        "message": message,
    }
    for key, value in fields.items():
        if value is not None:
            record.setdefault(key, value)
    return json.dumps(record, default=str)


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


def control_gid(group: str | None) -> int | None:
    """``lb.control_group`` as a gid (a name is looked up on this host); ControlError if unknown."""
    if group is None or group.isdigit():
        return None if group is None else int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlError(
            f"lb.control_group: no group {group!r} on this host; fix: create it"
            f" (groupadd {group}), give an existing group or a gid, or remove the key"
        ) from None


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
    # health changes by (VIP, address, port) since the start, kept across reloads
    transitions: dict[tuple[str, str, int | None], int] = field(default_factory=dict)

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


@dataclass(slots=True)
class _Stopping:
    """A graceful stop under way (monotonic times)."""

    started: float
    deadline: float
    quiesce_at: float
    quiesced: bool = False


@dataclass(slots=True)
class _Snapshot:
    """A scrape waiting for the loop's status."""

    done: threading.Event = field(default_factory=threading.Event)
    status: InstanceStatus | None = None
    error: Exception | None = None


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
        log_format: str = "text",
        drain_timeout: float = 0.0,
    ) -> None:
        self.config = config
        self.planes = list(planes)
        self.path = path
        self.netns = netns
        self.overrides = dict(overrides or {})
        self.skipped = skipped
        self.instance = config.lb.instance
        self._log_out = log or (lambda line: print(line, file=sys.stderr, flush=True))
        if log_format not in LOG_FORMATS:
            raise UsageError(f"--log-format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
        self.log_format = log_format
        if not drain_timeout >= 0:
            raise UsageError(f"--drain-timeout {drain_timeout}: give a number of seconds >= 0")
        self.drain_timeout = drain_timeout
        self.stopping: _Stopping | None = None  # a graceful stop under way
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
        self.ctl_pools: dict[str, BackendPool] = {}  # the planes' control_pools(), by VIP
        self.overrides_ctl: dict[OverrideKey, Override] = {}  # `v6lb ctl`, by backend
        self._pools_lock = threading.RLock()  # ctl answers on worker threads (kernel plane)
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
        self.metrics: MetricsServer | None = None
        self.announcer: Announcer | None = None  # bgp: (open_announcer)
        self._status_lock = threading.Lock()  # one status at a time off the loop
        self._snapshots: list[_Snapshot] = []  # scrapes waiting for the loop (under _lock)

    def attach(self, planes: Sequence[Plane]) -> None:
        """Plug ``planes`` in (before :meth:`install`): the daemon probes their pools."""
        self.planes = list(planes)
        self.health, self._owner = self._health(
            self.config, {p: p.pools() for p in self.planes}, set()
        )
        self.ctl_pools = {}
        for plane in self.planes:
            for name, pool in plane.control_pools().items():
                self.ctl_pools[name] = pool
                self._owner[name] = plane

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
            warn=self.warn,
            emit=self._emit,
            stop=self.request_stop,
        )

    def log(self, message: str, *, level: str = "info", **fields: object) -> None:
        """One event: on stderr (text or JSON), and among the last 50 in the status.

        ``level``: info, warning or error; ``fields``: structured facts for the
        JSON line (the text line is ``message`` alone).
        """
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now))
        self.events.append(f"{stamp}.{int(now % 1 * 1000):03d} {message}")
        if self.log_format == "json":
            self._log_out(log_record(self.instance, message, level=level, now=now, **fields))
        else:
            self._log_out(f"v6lb run [{self.instance}]: {message}")

    def warn(self, message: str) -> None:
        """A plane's warning (``PlaneContext.warn``)."""
        self.log(message, level="warning")

    def _emit(self, line: str) -> None:
        """A plane's raw line (``--trace``); with JSON logs, a ``debug`` record."""
        if self.log_format == "json":
            self._log_out(log_record(self.instance, line, level="debug"))
        else:
            self._log_out(line)

    def request_stop(self, error: BaseException | None = None) -> None:
        """End the instance (any thread); with ``error``, :meth:`serve` raises it at the end."""
        with self._lock:
            self._stops.append(error)
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # the loop is gone already, or its wake buffer is full (it wakes anyway)

    # --- install / remove -------------------------------------------------------

    def open_metrics(self) -> None:
        """Bind ``lb.metrics`` (before :meth:`install`); a RunError naming it if it cannot be."""
        listen = self.config.lb.metrics
        if listen is None or self.metrics is not None:
            return
        try:
            self.metrics = MetricsServer(listen, self.snapshot)
        except OSError as exc:
            raise RunError(
                f"lb.metrics: cannot listen on {listen}: {exc.strerror or exc}",
                "give lb.metrics a free port (another process listens there) and an address"
                " of this host or its --netns",
            ) from None

    def open_announcer(self) -> None:
        """The ``bgp:`` speaker (before :meth:`install`), if the file has one; bird not started."""
        if self.announcer is None:
            self.announcer = Announcer.create(self.config, self.instance, self.log)

    def serving(self) -> dict[str, bool]:
        """Every plane's :meth:`~v6lb.engines.plane.Plane.serving`, merged (BGP follows it)."""
        out: dict[str, bool] = {}
        for plane in self.planes:
            try:
                out.update(plane.serving())
            except (KernelError, OSError, RuntimeError) as exc:
                self.log(f"{plane.name}: serving failed: {exc}", level="error", plane=plane.name)
        return out

    def _announce(self, *, withdraw_only: bool = False) -> None:
        if self.announcer is not None:
            self.announcer.sync(self.serving(), withdraw_only=withdraw_only)

    def install(self) -> None:
        """Open the control socket, then install every plane; on failure nothing stays behind."""
        path = self.config.lb.control_socket
        group = control_gid(self.config.lb.control_group)
        try:
            self.control = ControlServer(
                path,
                {"status": self.answer, "ctl": self.ctl},
                log=self.log,
                threaded=any(p.threaded_status for p in self.planes),
                mutating=("ctl",),
                group=group,
            )
        except OSError as exc:
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
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
            if self.announcer is not None:  # the VIPs are announced once every plane serves
                self.announcer.start(self.serving())
        except BaseException:
            for plane in reversed(done):
                self._teardown_plane(plane)
            self.prober.close()
            self.control.close()
            self.control = None
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            raise
        self.control.register(self.sel)
        if self.metrics is not None:
            self.metrics.start()
            self.log(f"metrics on http://{self.metrics.listen}/metrics")
        for plane in self.planes:
            plane.watch(self.sel)
        for line in self.skipped:
            self.log(f"skipped VIP {line}")
        text = "; ".join(s for s in summaries if s)
        if text:
            self.log(f"{text}; control socket {path}", control_socket=path, pid=os.getpid())

    def teardown(self) -> list[str]:
        """Remove every plane (the last installed first), close the control socket."""
        self.prober.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        removed: list[str] = []
        try:
            if self.announcer is not None:
                self.announcer.stop()  # withdraw first: routers stop sending before state goes
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
            self.log(
                f"removing the {plane.name} plane failed: {exc.message}",
                level="error",
                plane=plane.name,
            )
            return []
        for item in removed:
            self.log(f"removed {item}", plane=plane.name, removed=item)
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
        if self.stopping is not None:
            deadline = min(deadline, now + _STOP_POLL)
        for plane in self.planes:
            at = plane.tick(now)
            if at is not None and at < deadline:
                deadline = at
        if self.announcer is not None:  # the LB's own check (docs/anycast.md)
            at = self.announcer.check(now, self.serving)
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
        with self._lock:
            snapshots, self._snapshots = self._snapshots, []
        if snapshots:
            self._answer_snapshots(snapshots)
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self.reload()
            else:
                self.begin_stop(signal.Signals(signum).name)
        if self.stopping is not None:
            self._stopping_turn(time.monotonic())
        with self._lock:
            stops, self._stops = self._stops, []
        for error in stops:
            self._stop = True
            if error is not None and self.failure is None:
                self.failure = error

    # --- graceful stop --------------------------------------------------------------

    def begin_stop(self, why: str) -> None:
        """SIGTERM/SIGINT (``why``): with ``--drain-timeout``, a graceful stop; else at once.

        Graceful: every plane withdraws its announcements (BGP) first; once the routers
        have had :data:`_SETTLE` seconds to move new flows to another instance, the
        proxies stop accepting; then the loop goes on (probes, control socket, the open
        connections) until no plane has anything in flight or the timeout ends it, and
        the planes are removed. A second signal during it stops at once.
        """
        if self.stopping is not None or self.drain_timeout <= 0:
            self.log(f"{why}: removing what this instance installed", signal=why)
            self._stop = True
            return
        now = time.monotonic()
        done = []
        if self.announcer is not None:
            gone = self.announcer.withdraw_all()
            done.append(f"bgp: withdrew {', '.join(map(str, gone)) or 'nothing was announced'}")
        done += [text for plane in self.planes if (text := self._step(plane, "withdraw"))]
        settle = min(_SETTLE, self.drain_timeout / 2) if done else 0.0
        self.stopping = _Stopping(now, now + self.drain_timeout, now + settle)
        self.log(
            f"{why}: stopping gracefully (--drain-timeout {self.drain_timeout:g}s)"
            + (f"; {'; '.join(done)}" if done else ""),
            signal=why,
            drain_timeout=self.drain_timeout,
        )

    def _step(self, plane: Plane, step: str) -> str:
        try:
            text: str = getattr(plane, step)()
        except (KernelError, OSError, RuntimeError) as exc:
            text = f"{plane.name}: {step} failed: {getattr(exc, 'message', None) or exc}"
            self.log(text, level="error", plane=plane.name)
        return text

    def _stopping_turn(self, now: float) -> None:
        st = self.stopping
        assert st is not None
        if not st.quiesced:
            if now < st.quiesce_at:
                return
            st.quiesced = True
            done = [text for plane in self.planes if (text := self._step(plane, "quiesce"))]
            if done:
                self.log("; ".join(done))
        busy = {p.name: n for p in self.planes if (n := self._in_flight(p))}
        if not busy:
            took = time.monotonic() - st.started
            self.log(
                f"drained in {took:.3f} s: removing what this instance installed",
                drained_s=round(took, 3),
            )
            self._stop = True
        elif now >= st.deadline:
            left = ", ".join(f"{name} {n}" for name, n in busy.items())
            self.log(
                f"--drain-timeout {self.drain_timeout:g}s reached with {left} still in flight:"
                " removing what this instance installed",
                level="warning",
            )
            self._stop = True

    def _in_flight(self, plane: Plane) -> int:
        try:
            return plane.in_flight()
        except (KernelError, OSError, RuntimeError) as exc:
            self.log(f"{plane.name}: in_flight failed: {exc}", level="error", plane=plane.name)
            return 0

    def _sync(self, vips: set[str]) -> None:
        """Bring the pools in line with health; each plane applies its changed pools."""
        with self._pools_lock:
            self._sync_locked(vips)

    def _sync_locked(self, vips: set[str]) -> None:
        h = self.health
        for name in sorted(vips):
            hs, pool = h.sets[name], h.pools[name]
            moved = [i for i in range(len(pool)) if pool.set_up(i, hs.state(i) is HealthState.UP)]
            if not moved:
                continue
            vip = self.config.vip(name)
            for i in moved:
                key = (name, str(vip.backends[i].address), vip.backends[i].port)
                h.transitions[key] = h.transitions.get(key, 0) + 1
            states = ", ".join(f"{vip.backends[i].address} {hs.state(i)}" for i in moved)
            if not pool.any_eligible:  # before a refill that may be slow: routers stop at once
                self._announce(withdraw_only=True)
            try:
                what = self._owner[name].apply_pool_change(name, pool)
            except KernelError as exc:
                self.last_error = exc.message
                self.log(self.last_error, level="error", vip=name)
                self._announce()
                continue
            self._announce()
            self.map_updates += 1
            self.log(
                f"{name}: {states}; {what}",
                vip=name,
                backends=[
                    {"address": str(vip.backends[i].address), "health": str(hs.state(i))}
                    for i in moved
                ],
            )

    # --- reload ------------------------------------------------------------------

    def reload(self) -> bool:
        """SIGHUP: load and check the file, stage it on every plane, then apply it.

        On any failure the running configuration stays and the error is logged.
        The ``ctl`` overrides are applied to the new pools before they are committed.
        """
        with self._pools_lock:
            return self._reload_locked()

    def _reload_locked(self) -> bool:
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
            ctl_pools = {
                name: pool
                for p, s in staged
                for name, pool in (
                    s.control_pools if s.control_pools is not None else p.control_pools()
                ).items()
            }
            overrides, notes = self._reapply(config, health, ctl_pools)
            texts = [s.commit() for _, s in staged]
        except (KernelError, OSError, ValueError) as exc:
            text = exc.message if isinstance(exc, KernelError) else str(exc)
            self.last_error = f"reload failed, still running the previous config: {text}"
            self.log(self.last_error, level="error", file=self.path)
            return False
        self.prober.close()
        health.transitions = self.health.transitions
        self.config, self.skipped = config, skipped
        self.health, self._owner = health, owner
        for p, s in staged:
            for name in s.control_pools if s.control_pools is not None else p.control_pools():
                self._owner[name] = p
        self.ctl_pools = ctl_pools
        self.overrides_ctl = overrides
        self.reloads += 1
        self.last_error = None
        if config.lb.control_socket != old.lb.control_socket:
            self.log("lb.control_socket changed: it takes effect at the next start")
        if config.lb.metrics != old.lb.metrics:
            self.log("lb.metrics changed: it takes effect at the next start")
        self.log(
            f"reloaded {self.path}{''.join(texts)}{notes}", file=self.path, reloads=self.reloads
        )
        for _, s in staged:
            s.then()
        if self.announcer is not None:
            self.announcer.reconfigure(config, self.serving())
        return True

    def _reapply(
        self, config: Config, health: Health, ctl_pools: Mapping[str, BackendPool]
    ) -> tuple[dict[OverrideKey, Override], str]:
        """The ``ctl`` overrides on ``config``'s pools; the ones kept, and the log's text."""
        pools = {**health.pools, **ctl_pools}
        kept: dict[OverrideKey, Override] = {}
        over: list[str] = []
        gone: list[str] = []
        for key, o in self.overrides_ctl.items():
            name, address, port = key
            at = f"{name} [{address}]" + (f":{port}" if port is not None else "")
            vip = next((v for v in config.vips if v.name == name), None)
            index = next(
                (
                    i
                    for i, b in enumerate(vip.backends if vip else ())
                    if str(b.address) == address and b.port == port
                ),
                None,
            )
            if vip is None or index is None or name not in pools:
                gone.append(at)
                continue
            b = vip.backends[index]
            o = dataclasses.replace(o)
            o.drop_file_values(b)
            if o.empty():
                gone.append(f"{at} (the file now says the same)")
                continue
            apply_override(pools[name], index, b, o)
            self._sync_health(name, index, health)
            kept[key] = o
            over.append(f"{at} {o.text(b)}")
        text = f"; ctl overrides the file: {'; '.join(over)}" if over else ""
        if gone:
            text += f"; ctl overrides dropped: {', '.join(gone)}"
        return kept, text

    @staticmethod
    def _sync_health(name: str, index: int, health: Health) -> None:
        if name not in health.sets:
            return  # a VIP its plane checks itself (a proxy VIP)
        pool, hs = health.pools[name], health.sets[name]
        hs.set_drain(index, pool.is_draining(index))
        hs.set_weight(index, pool.weight(index))

    # --- runtime control ---------------------------------------------------------

    def ctl(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The control socket's ``ctl`` command (`v6lb ctl`): an override, applied at once."""
        with self._pools_lock:
            try:
                pools = {**self.health.pools, **self.ctl_pools}
                vip, index, action, weight = check_request(request, self.config, pools)
            except CtlRefused as exc:
                return {"error": str(exc), "exit": 2}
            b = vip.backends[index]
            key: OverrideKey = (vip.name, str(b.address), b.port)
            old = self.overrides_ctl.get(key, Override())
            new = dataclasses.replace(old)
            if action in ("drain", "undrain"):
                new.drain = action == "drain"
            elif action in ("enable", "disable"):
                new.enabled = action == "enable"
            else:
                new.weight = weight
            new.drop_file_values(b)
            pool = pools[vip.name]
            what = "no change"
            if apply_override(pool, index, b, new):
                if not pool.any_eligible:
                    self._announce(withdraw_only=True)
                try:
                    what = self._owner[vip.name].apply_pool_change(vip.name, pool)
                except KernelError as exc:
                    apply_override(pool, index, b, old)  # the pool as the plane still has it
                    self.last_error = f"ctl {action} {vip.name} {b.address}: {exc.message}"
                    self.log(self.last_error)
                    self._announce()
                    return {"error": f"{self.last_error}; nothing changed", "exit": 1}
                self.map_updates += 1
                self._announce()
            self._sync_health(vip.name, index, self.health)
            if new.empty():
                self.overrides_ctl.pop(key, None)
            else:
                self.overrides_ctl[key] = new
            at = f"[{b.address}]:{b.port}" if b.port is not None else str(b.address)
            answer: dict[str, Any] = {
                "vip": vip.name,
                "backend": at,
                "action": action,
                "applied": what,
                "drain": pool.is_draining(index),
                "enabled": pool.is_enabled(index),
                "weight": pool.weight(index),
                "override": new.text(b) or None,
            }
            line = f"ctl {action}{f' {weight}' if weight else ''} {vip.name} {at}: {what}"
            if not pool.any_eligible:
                answer["warning"] = (
                    f"no backend of VIP {vip.name} takes new flows now: new flows to it are"
                    " dropped until one is undrained, enabled or up"
                )
                line += f"; warning: {answer['warning']}"
            self.log(line)
            return answer

    # --- status ------------------------------------------------------------------

    def answer(self, request: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The control socket's ``status`` command (docs/run.md, `v6lb status`)."""
        with self._status_lock:
            return self.status().to_dict()

    @property
    def status_off_loop(self) -> bool:
        """The planes answer ``status`` on any thread (the control socket's workers do)."""
        return any(p.threaded_status for p in self.planes)

    def snapshot(self, timeout: float = _SNAPSHOT_WAIT) -> InstanceStatus:
        """The status for a scrape, from any thread; never blocks the loop.

        Computed on the calling thread when the planes allow it (the kernel plane: its
        nft read-back takes 0.4 s and more), else by the loop at the end of its turn
        (the python plane's counters belong to it); TimeoutError after ``timeout``.
        """
        if self.status_off_loop:
            with self._status_lock:
                return self.status()
        if self.control is None:
            return self.status()  # no loop runs (before install, after teardown)
        wait = _Snapshot()
        with self._lock:
            self._snapshots.append(wait)
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        if not wait.done.wait(timeout):
            raise TimeoutError(f"the instance's loop gave no status in {timeout} s")
        if wait.error is not None:
            raise wait.error
        assert wait.status is not None
        return wait.status

    def _answer_snapshots(self, waiting: list[_Snapshot]) -> None:
        try:
            status: InstanceStatus | None = self.status()
            error: Exception | None = None
        except Exception as exc:  # a scrape must never stop the loop
            status, error = None, exc
        for w in waiting:
            w.status, w.error = status, error
            w.done.set()

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
        bgp = self.announcer.status() if self.announcer is not None else None
        if dataplane is not None:
            ps = dataplane.status()
            details = ps.details if bgp is None else _with_bgp(ps.details, bgp)
            npt_icmp = ps.npt_icmp
            vips = [self._vip_status(v.name, ps) for v in config.vips if v.name in h.pools]
        elif bgp is not None:
            details = {"bgp": bgp}
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
                reloads=self.reloads,
                map_updates=self.map_updates,
                last_error=self.last_error,
                **typed,
                extra=extra,
                keys=(*_PROXY_ONLY_KEYS, *details, *sections),
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
        b_new = ps.backend_new_flows.get(name)
        b_active = ps.backend_active_flows.get(name)
        b_packets = ps.backend_packets.get(name) or []
        for i, b in enumerate(vip.backends):
            monitor = hs.monitor(i)
            target = self.health.targets.get((name, i))
            override = self.overrides_ctl.get((name, str(b.address), b.port))
            backends.append(
                BackendStatus(
                    address=str(b.address),
                    port=b.port,
                    weight=pool.weight(i),
                    drain=pool.is_draining(i),
                    enabled=pool.is_enabled(i),
                    override=override.text(b) if override else None,
                    health=str(hs.state(i)),
                    probe=target.describe() if target else "none",
                    successes=monitor.successes if monitor else None,
                    failures=monitor.failures if monitor else None,
                    slots=pool.slots[i],
                    transitions=self.health.transitions.get((name, str(b.address), b.port), 0),
                    new_flows=b_new[i] if b_new is not None and i < len(b_new) else None,
                    active_flows=b_active[i]
                    if b_active is not None and i < len(b_active)
                    else None,
                    packets=b_packets[i][0] if i < len(b_packets) else None,
                    bytes=b_packets[i][1] if i < len(b_packets) else None,
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
            traffic={d: Counter(c.name, c.packets, c.bytes) for d, c in traffic.items()}
            if (traffic := ps.traffic.get(name))
            else None,
            new_flows=ps.new_flows.get(name),
            active_flows=ps.active_flows.get(name),
        )


def _with_bgp(details: Mapping[str, Any], bgp: Mapping[str, Any]) -> dict[str, Any]:
    """The data plane's keys with the speaker's ``bgp`` before ``conntrack_sync`` (or last)."""
    out: dict[str, Any] = {}
    for key, value in details.items():
        if key == "conntrack_sync":
            out["bgp"] = bgp
        out[key] = value
    out.setdefault("bgp", bgp)
    return out


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
        log_format=options.log_format,
        drain_timeout=options.drain_timeout,
    )
    ctx = daemon.context(trace=options.trace)
    daemon.attach([cls.open(config, ctx) for cls in classes])
    daemon.open_metrics()  # in the namespace, after every check, before anything is installed
    daemon.open_announcer()
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
