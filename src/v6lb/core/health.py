"""Backend health, sans-IO: a state machine per backend and a set per VIP.

The caller owns the clock and the probes (the aioquic habit): every method that
depends on time takes ``now`` in seconds, and nothing here reads a clock, sleeps
or opens a socket. Tests start at ``now = 0.0`` and advance it, so every timing
is exact. An engine drives a :class:`HealthSet` like this::

    sleep until hs.next_timer()
    changed = hs.handle_timer(now)           # probes past their timeout fail
    for key in hs.due(now):
        probe = hs.start_probe(key, now)     # then launch the TCP/HTTP probe
    ...                                      # when a probe finishes:
    changed |= hs.probe_result(key, ok, now, probe)
    if changed: rebuild the Maglev table from hs.eligible()

Rules of one :class:`HealthMonitor`:

- A probe is due ``interval`` seconds after the previous one started, so probes
  keep a fixed cadence however long each takes. One probe at a time.
- A probe with no result by ``start + timeout`` is a failure, at exactly that
  ``now``: a result reported at or after the deadline counts as a failure too,
  and a result for a probe that already timed out is ignored.
- DOWN becomes UP after exactly ``rise`` consecutive successes; UP becomes DOWN
  after exactly ``fall`` consecutive failures. A success resets the failure
  streak and a failure resets the success streak; a transition resets both.
- **A backend starts UP** (pass ``up=False`` to start DOWN). A fresh or
  restarted LB must not black-hole a VIP for ``rise x interval`` while it
  proves backends it was just using are alive; a dead backend is found within
  ``fall`` probes, just as one that dies later. Start a backend DOWN when adding
  it to a pool that is already serving, so it earns traffic first.

Draining, the policy every engine follows (``HealthSet.draining``): a draining
backend is given no new flows but keeps the flows it has, while it is up.

- ``nat``: its conntrack entries live on until the connections end or time out.
- ``dsr-*``: the per-flow LRU (``lb.flow_cache_size``) keeps its flows on it. A
  flow evicted from the LRU, or moved to another LB instance by a routing change,
  is hashed again and lands elsewhere: DSR drain is best effort.
- ``proxy-*``: its open connections run to the end; new connections go elsewhere.

A backend that goes DOWN keeps nothing: engines stop steering existing flows to
it (``keeps_existing_flows`` is false), so they fail fast rather than hang.
Weight 0 also means "no new flows" (a standby); drain is the operational switch.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

__all__ = ["HealthMonitor", "HealthSet", "HealthState"]


class HealthState(StrEnum):
    UP = "up"
    DOWN = "down"


class HealthMonitor:
    """The health of one backend, driven by probe results and the caller's ``now``."""

    __slots__ = (
        "interval",
        "timeout",
        "rise",
        "fall",
        "_up",
        "_successes",
        "_failures",
        "_next_probe",
        "_probe_started",
        "_probe_id",
    )

    def __init__(
        self,
        *,
        interval: float,
        timeout: float,
        rise: int,
        fall: int,
        now: float,
        up: bool = True,
        first_probe_at: float | None = None,
    ) -> None:
        """``first_probe_at`` defaults to ``now``; pass a later time to spread probes out."""
        if not 0 < timeout < interval:
            raise ValueError("health checks need 0 < timeout < interval")
        if rise < 1 or fall < 1:
            raise ValueError("health checks need rise >= 1 and fall >= 1")
        self.interval = interval
        self.timeout = timeout
        self.rise = rise
        self.fall = fall
        self._up = up
        self._successes = 0
        self._failures = 0
        self._next_probe = now if first_probe_at is None else first_probe_at
        self._probe_started: float | None = None
        self._probe_id = 0

    @property
    def state(self) -> HealthState:
        return HealthState.UP if self._up else HealthState.DOWN

    @property
    def is_up(self) -> bool:
        return self._up

    @property
    def successes(self) -> int:
        """Consecutive successes since the last failure or transition."""
        return self._successes

    @property
    def failures(self) -> int:
        """Consecutive failures since the last success or transition."""
        return self._failures

    @property
    def probe_in_flight(self) -> bool:
        return self._probe_started is not None

    def next_timer(self) -> float:
        """When to call back: the running probe's deadline, else the next probe's start."""
        if self._probe_started is not None:
            return self._probe_started + self.timeout
        return self._next_probe

    def probe_due(self, now: float) -> bool:
        """Should a probe start now? Call :meth:`handle_timer` first so timeouts fire."""
        return self._probe_started is None and now >= self._next_probe

    def start_probe(self, now: float) -> int:
        """Record that a probe starts at ``now``; returns its id for :meth:`probe_result`."""
        if self._probe_started is not None:
            raise RuntimeError("a health probe is already in flight for this backend")
        self._probe_started = now
        self._next_probe = now + self.interval
        self._probe_id += 1
        return self._probe_id

    def probe_result(self, ok: bool, now: float, probe: int | None = None) -> bool:
        """Record the running probe's result; returns True if the state changed.

        A result at or after the deadline is a failure; a result for a probe that
        is no longer running (timed out, or ``probe`` is an older id) is ignored.
        """
        started = self._probe_started
        if started is None or (probe is not None and probe != self._probe_id):
            return False
        self._probe_started = None
        return self._record(ok and now < started + self.timeout)

    def handle_timer(self, now: float) -> bool:
        """Fail the running probe if its deadline has come; returns True if the state changed."""
        started = self._probe_started
        if started is None or now < started + self.timeout:
            return False
        self._probe_started = None
        return self._record(False)

    def _record(self, ok: bool) -> bool:
        if ok:
            self._successes += 1
            self._failures = 0
        else:
            self._failures += 1
            self._successes = 0
        if self._up and self._failures >= self.fall:
            self._up = False
        elif not self._up and self._successes >= self.rise:
            self._up = True
        else:
            return False
        self._successes = self._failures = 0
        return True


K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Member:
    monitor: HealthMonitor | None  # None: not probed (health type none), always up
    weight: int
    drain: bool

    @property
    def up(self) -> bool:
        return self.monitor is None or self.monitor.is_up


class HealthSet(Generic[K]):
    """The backends of one VIP, keyed by whatever the caller uses (an index, an address).

    ``generation`` goes up whenever membership, a state, a weight or a drain flag
    changes, so a caller can rebuild its Maglev table when the generation differs
    from the one it built with; the mutating methods also return whether it did.
    """

    __slots__ = ("_members", "generation")

    def __init__(self) -> None:
        self._members: dict[K, _Member] = {}
        self.generation = 0

    def add(
        self, key: K, monitor: HealthMonitor | None, *, weight: int = 1, drain: bool = False
    ) -> None:
        """Add a backend; ``monitor`` None means it is never probed and counts as up."""
        if key in self._members:
            raise ValueError(f"backend {key!r} is already in this set")
        if weight < 0:
            raise ValueError("a backend weight cannot be negative")
        self._members[key] = _Member(monitor, weight, drain)
        self.generation += 1

    def remove(self, key: K) -> None:
        del self._members[key]
        self.generation += 1

    def __contains__(self, key: object) -> bool:
        return key in self._members

    def __len__(self) -> int:
        return len(self._members)

    def monitor(self, key: K) -> HealthMonitor | None:
        return self._members[key].monitor

    def state(self, key: K) -> HealthState:
        return HealthState.UP if self._members[key].up else HealthState.DOWN

    def set_drain(self, key: K, drain: bool) -> bool:
        member = self._members[key]
        if member.drain == drain:
            return False
        member.drain = drain
        self.generation += 1
        return True

    def set_weight(self, key: K, weight: int) -> bool:
        if weight < 0:
            raise ValueError("a backend weight cannot be negative")
        member = self._members[key]
        if member.weight == weight:
            return False
        member.weight = weight
        self.generation += 1
        return True

    def eligible(self) -> dict[K, int]:
        """Backends that may take new flows (up, not draining, weight > 0) and their weights."""
        return {
            k: m.weight for k, m in self._members.items() if m.up and not m.drain and m.weight > 0
        }

    def draining(self) -> list[K]:
        """Backends that keep their existing flows but take no new ones."""
        return [k for k, m in self._members.items() if m.up and m.drain]

    def keeps_existing_flows(self, key: K) -> bool:
        """May flows already pinned to this backend stay there? Only while it is up."""
        return self._members[key].up

    def next_timer(self) -> float | None:
        """The earliest timer of any probed backend; None if none is probed."""
        times = [m.monitor.next_timer() for m in self._members.values() if m.monitor is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> bool:
        """Fire due probe timeouts; returns True if any backend changed state."""
        changed = False
        for member in self._members.values():
            if member.monitor is not None and member.monitor.handle_timer(now):
                changed = True
        if changed:
            self.generation += 1
        return changed

    def due(self, now: float) -> list[K]:
        """Backends whose probe should start now (after :meth:`handle_timer`)."""
        return [
            k
            for k, m in self._members.items()
            if m.monitor is not None and m.monitor.probe_due(now)
        ]

    def start_probe(self, key: K, now: float) -> int:
        return self._probed(key).start_probe(now)

    def probe_result(self, key: K, ok: bool, now: float, probe: int | None = None) -> bool:
        """Record a probe result; returns True if the backend changed state."""
        changed = self._probed(key).probe_result(ok, now, probe)
        if changed:
            self.generation += 1
        return changed

    def _probed(self, key: K) -> HealthMonitor:
        monitor = self._members[key].monitor
        if monitor is None:
            raise ValueError(f"backend {key!r} is not probed (health type none)")
        return monitor
