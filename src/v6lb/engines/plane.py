"""The data plane interface: what a plane gives the daemon (:mod:`v6lb.engines.daemon`).

A `v6lb run` process is one :class:`~v6lb.engines.daemon.Daemon`. It owns the
control socket, the signals, the reload policy, health driving, the log and the
status; everything that moves packets is a :class:`Plane`:

- an L3/L4 data plane (``--dataplane kernel|python|xdp``): :attr:`Plane.role` is
  :attr:`Role.DATAPLANE`. Its :meth:`~Plane.pools` are the VIPs whose backends the
  daemon probes; a health change reaches the plane as :meth:`~Plane.apply_pool_change`;
- a proxy engine (``--proxy builtin|haproxy``): :attr:`Role.PROXY`. It checks its
  backends itself (asyncio, or HAProxy's checks), runs on a thread of its own, and
  adds the ``proxy`` section to the status.

The life of a plane, as the daemon drives it::

    cls.preflight(config)         # before the netns is entered: root, tools, options
    plane = cls.open(config, ctx) # after: every check against the host; installs nothing
    plane.install()               # atomically; on failure nothing stays behind
    plane.watch(selector)         # its descriptors, with Ready(callback) as data
    plane.tick(now)               # every loop turn; the next time it wants one
    plane.apply_pool_change(vip, pool)
    staged = plane.stage(config)  # SIGHUP: check and build, change nothing
    staged.commit()               # then apply (the daemon marks known-down backends first)
    plane.status()                # a PlaneStatus
    plane.serving()               # VIP name -> has a backend for new flows (BGP follows it)
    # a graceful stop (SIGTERM with --drain-timeout S), every plane at each step:
    plane.withdraw()              # after the daemon withdrew the BGP announcements
    plane.quiesce()               # stop taking new connections; the open ones go on
    plane.in_flight()             # polled until every plane says 0, or S seconds passed
    plane.teardown()              # what it removed

Runtime control (`v6lb ctl`) changes a pool the daemon holds: a probed one of
:meth:`~Plane.pools`, or one of :meth:`~Plane.control_pools` (the VIPs a plane
checks itself, the proxy engines'); either way the owning plane applies it in
:meth:`~Plane.apply_pool_change`.

With a ``bgp:`` speaker the daemon announces the address of every VIP of every plane
(:class:`~v6lb.engines.announce.Announcer`) while :meth:`~Plane.serving` says
it has a backend for new flows, and withdraws it when not (or when the graceful stop
begins); a plane has no BGP code of its own.

A new plane is a subclass in its own package and one line in
:mod:`v6lb.engines.planes`; the modes it serves are the mode table's
(:func:`v6lb.model.modes.modes_where`).
"""

from __future__ import annotations

import selectors
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from v6lb.core.backends import BackendPool
from v6lb.engines.kernel.apply import KernelError
from v6lb.engines.planes import Role
from v6lb.engines.probe import ProbeRoute
from v6lb.model.config import Config
from v6lb.model.status import IcmpErrors

__all__ = [
    "Plane",
    "PlaneContext",
    "PlaneStatus",
    "Ready",
    "Role",
    "RunError",
    "Staged",
    "VipCounter",
]


class RunError(KernelError):
    """`run` refuses to start (or a reload is refused): the message says why, ``fix`` what to do."""


@dataclass(frozen=True, slots=True)
class PlaneContext:
    """What the daemon hands every plane."""

    path: str  # the file, as given
    netns: str | None = None  # the namespace the process entered (already entered)
    trace: bool = False  # log one line per packet decision (the python plane)
    log: Callable[[str], None] = print  # the instance's log: `v6lb run [<instance>]: ...`
    warn: Callable[[str], None] = print  # the same log, at level warning (--log-format json)
    emit: Callable[[str], None] = print  # a raw stderr line (trace lines)
    stop: Callable[[BaseException | None], None] = lambda error: None
    """A plane on a thread of its own ends the instance (thread-safe); with an error, it fails."""


class Ready:
    """The ``data`` of a plane's descriptor in the daemon's selector: ``fn()`` when readable."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn


@dataclass(frozen=True, slots=True)
class VipCounter:
    """A VIP's packet counter as a data plane counts it (``counter`` in the status)."""

    name: str
    packets: int
    bytes: int


@dataclass(slots=True)
class PlaneStatus:
    """A plane's part of the status answer.

    ``counters``/``icmp``/``maps`` by VIP name (an L3 plane; the daemon composes the VIP entries
    with its health state), ``details``: the plane's own keys in answer order,
    ``sections``: top-level keys added after ``events`` (the proxy's ``proxy``).
    The flow figures, by VIP name, where the plane has them (docs/operations.md, "Metrics"):
    ``traffic`` (direction ``in``/``out`` -> packets and bytes), ``new_flows``,
    ``active_flows``, and per backend (by its index in the VIP) ``backend_new_flows``,
    ``backend_active_flows``.
    """

    counters: dict[str, VipCounter] = field(default_factory=dict)
    traffic: dict[str, dict[str, VipCounter]] = field(default_factory=dict)
    new_flows: dict[str, int] = field(default_factory=dict)
    active_flows: dict[str, int] = field(default_factory=dict)
    backend_new_flows: dict[str, list[int]] = field(default_factory=dict)
    backend_active_flows: dict[str, list[int]] = field(default_factory=dict)
    backend_packets: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """Per backend (by index): (packets, bytes) the plane sent to it, where it counts them."""
    icmp: dict[str, IcmpErrors] = field(default_factory=dict)  # by VIP name
    npt_icmp: list[IcmpErrors] = field(default_factory=list)  # by index in config.npt
    maps: dict[str, list[str]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Staged:
    """A reload a plane has checked and built but not applied.

    ``pools``: its new pools (the daemon marks the backends it knows are down in them
    before ``commit``). ``commit()`` applies and returns the text for the "reloaded"
    log line, or raises (the running state stays). ``then()`` runs after that line.
    """

    pools: dict[str, BackendPool] = field(default_factory=dict)
    commit: Callable[[], str] = lambda: ""
    then: Callable[[], None] = lambda: None
    control_pools: dict[str, BackendPool] | None = None  # new control_pools(); None: the same


class Plane:
    """Base of every plane; the defaults suit a plane with nothing to say for that step."""

    name: ClassVar[str]
    role: ClassVar[Role]
    threaded_status: ClassVar[bool] = False
    """Its status is slow (it reads the kernel back): the daemon answers on worker threads."""

    @classmethod
    def preflight(cls, config: Config) -> None:
        """Checks before the namespace is entered (root, tools, options); raise RunError."""

    @classmethod
    def open(cls, config: Config, ctx: PlaneContext) -> Plane:
        """Every check against the host, and the plane ready to install (nothing installed)."""
        raise NotImplementedError

    def pools(self) -> Mapping[str, BackendPool]:
        """The VIPs whose backends the daemon probes, by name (the plane's own pools)."""
        return {}

    def control_pools(self) -> Mapping[str, BackendPool]:
        """The VIPs `v6lb ctl` may change that the daemon does not probe, by name.

        A plane that checks its backends itself (a proxy engine) lists its VIPs here;
        a ``ctl`` change to one of these pools reaches it as :meth:`apply_pool_change`.
        """
        return {}

    def probe_route(self, config: Config, vip: str, index: int) -> ProbeRoute | None:
        """The data path a health probe of backend ``index`` of ``vip`` takes, if any.

        None: the probe goes to the backend's own address (the default). A plane that
        can steer a probe to the VIP exactly as a client's packets to that backend
        (DSR) returns the route (docs/dsr.md, "Health checks through the data path").
        """
        return None

    def install(self) -> str:
        """Install atomically (on failure nothing stays behind); a summary for the log, or ""."""
        raise NotImplementedError

    def watch(self, selector: selectors.BaseSelector) -> None:
        """Register the plane's descriptors (``data``: a :class:`Ready`)."""

    def tick(self, now: float) -> float | None:
        """Periodic work on the loop's thread; when it wants the next call (monotonic) or None."""
        return None

    def apply_pool_change(self, vip: str, pool: BackendPool) -> str:
        """``pool`` (one of :meth:`pools`) changed: apply it; what was done, for the log.

        Raises :class:`RunError` when it could not be applied (the daemon logs it).
        """
        return ""

    def stage(self, config: Config) -> Staged:
        """SIGHUP: check and build ``config``; change nothing yet."""
        return Staged()

    def status(self) -> PlaneStatus:
        return PlaneStatus()

    def serving(self) -> Mapping[str, bool]:
        """Each VIP the plane forwards, by name: True while a backend takes new flows.

        The daemon's BGP speaker announces a VIP's address while one of its VIPs is
        serving (docs/anycast.md). The default reads :meth:`pools` and
        :meth:`control_pools`; a plane that checks its backends itself (a proxy engine)
        answers from its own health view. Called on the daemon's loop about once a
        second and after every pool change: it must be cheap.
        """
        pools = {**self.control_pools(), **self.pools()}
        return {name: pool.any_eligible for name, pool in pools.items()}

    def withdraw(self) -> str:
        """Graceful stop, first step (after the daemon's BGP withdraw): what was done, or ""."""
        return ""

    def quiesce(self) -> str:
        """Graceful stop: take no new connections or flows, serve the open ones; or ""."""
        return ""

    def in_flight(self) -> int:
        """Graceful stop: connections (or flows) still being served; the stop waits for 0."""
        return 0

    def teardown(self) -> list[str]:
        """Remove what the plane installed; the items removed."""
        return []
