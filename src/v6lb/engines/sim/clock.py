"""A virtual clock and event queue: the only time the simulator knows.

Events run in time order; events at the same time run in the order they were
scheduled, so a run is a pure function of its inputs (no wall clock, no
threads).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

__all__ = ["Clock"]


class Clock:
    """``now`` in seconds, and callbacks scheduled at virtual times."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(when, self.now), self._seq, fn))

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.at(self.now + delay, fn)

    @property
    def pending(self) -> int:
        return len(self._heap)

    def run(self, until: float | None = None, max_events: int = 200_000) -> int:
        """Run events up to ``until`` (all if None); return how many ran."""
        n = 0
        heap = self._heap
        while heap and n < max_events:
            when = heap[0][0]
            if until is not None and when > until:
                break
            _, _, fn = heapq.heappop(heap)
            self.now = when
            fn()
            n += 1
        if until is not None and self.now < until:
            self.now = until
        return n
