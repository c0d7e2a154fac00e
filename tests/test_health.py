"""The sans-IO health state machine (v6lb.core.health): exact counts, exact times."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from v6lb.core.health import HealthMonitor, HealthSet, HealthState

counts = st.integers(min_value=1, max_value=10)
starts = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
intervals = st.floats(min_value=0.01, max_value=3600.0, allow_nan=False, allow_infinity=False)
fractions = st.floats(min_value=0.01, max_value=0.99)


def monitor(
    rise: int = 2, fall: int = 3, *, up: bool = True, interval: float = 2.0, timeout: float = 1.0
) -> HealthMonitor:
    return HealthMonitor(interval=interval, timeout=timeout, rise=rise, fall=fall, now=0.0, up=up)


def probe(m: HealthMonitor, ok: bool) -> bool:
    """Run one probe at its scheduled time, answered halfway to the deadline."""
    start = m.next_timer()
    assert m.probe_due(start)
    m.start_probe(start)
    return m.probe_result(ok, start + m.timeout / 2)


@given(rise=counts, fall=counts)
def test_down_needs_exactly_rise_successes(rise: int, fall: int) -> None:
    m = monitor(rise, fall, up=False)
    for i in range(1, rise):
        assert probe(m, True) is False
        assert (m.state, m.successes) == (HealthState.DOWN, i)
    assert probe(m, True) is True
    assert m.state is HealthState.UP
    assert (m.successes, m.failures) == (0, 0)


@given(rise=counts, fall=counts)
def test_up_needs_exactly_fall_failures(rise: int, fall: int) -> None:
    m = monitor(rise, fall, up=True)
    for i in range(1, fall):
        assert probe(m, False) is False
        assert (m.state, m.failures) == (HealthState.UP, i)
    assert probe(m, False) is True
    assert m.state is HealthState.DOWN


@given(rise=counts, fall=counts, up=st.booleans(), results=st.lists(st.booleans(), max_size=60))
def test_any_sequence_follows_the_streak_rule(
    rise: int, fall: int, up: bool, results: list[bool]
) -> None:
    m = monitor(rise, fall, up=up)
    streak_ok = streak_fail = 0
    for ok in results:
        if ok:
            streak_ok, streak_fail = streak_ok + 1, 0
        else:
            streak_ok, streak_fail = 0, streak_fail + 1
        flips = (streak_ok == rise) if not up else (streak_fail == fall)
        assert probe(m, ok) is flips
        if flips:
            up = not up
            streak_ok = streak_fail = 0
        assert m.is_up is up
        assert (m.successes, m.failures) == (streak_ok, streak_fail)


@given(rise=counts, fall=counts)
def test_a_success_resets_the_failure_streak(rise: int, fall: int) -> None:
    m = monitor(rise, fall, up=True)
    for _ in range(5):
        for _ in range(fall - 1):
            probe(m, False)
        probe(m, True)
    assert m.state is HealthState.UP


@given(rise=counts, fall=counts)
def test_a_failure_resets_the_success_streak(rise: int, fall: int) -> None:
    m = monitor(rise, fall, up=False)
    for _ in range(5):
        for _ in range(rise - 1):
            probe(m, True)
        probe(m, False)
    assert m.state is HealthState.DOWN


@given(start=starts, interval=intervals, fraction=fractions)
def test_a_missing_result_fails_exactly_at_the_deadline(
    start: float, interval: float, fraction: float
) -> None:
    timeout = interval * fraction
    m = HealthMonitor(interval=interval, timeout=timeout, rise=1, fall=1, now=start)
    assert m.probe_due(start)
    m.start_probe(start)
    deadline = start + timeout
    assert m.next_timer() == deadline
    just_before = math.nextafter(deadline, -math.inf)
    assert m.handle_timer(just_before) is False
    assert m.probe_in_flight and m.is_up
    assert m.handle_timer(deadline) is True
    assert not m.probe_in_flight
    assert m.state is HealthState.DOWN
    assert m.probe_result(True, deadline) is False  # the late answer is ignored
    assert m.state is HealthState.DOWN


@given(start=starts, interval=intervals, fraction=fractions)
def test_a_result_at_the_deadline_is_a_failure(
    start: float, interval: float, fraction: float
) -> None:
    timeout = interval * fraction
    m = HealthMonitor(interval=interval, timeout=timeout, rise=1, fall=2, now=start)
    m.start_probe(start)
    assert m.probe_result(True, math.nextafter(start + timeout, -math.inf)) is False
    assert m.failures == 0
    m.start_probe(start + interval)
    assert m.probe_result(True, start + interval + timeout) is False
    assert m.failures == 1


@given(start=starts, interval=intervals, fraction=fractions, n=st.integers(1, 30))
def test_probes_keep_an_exact_cadence(
    start: float, interval: float, fraction: float, n: int
) -> None:
    timeout = interval * fraction
    m = HealthMonitor(interval=interval, timeout=timeout, rise=2, fall=3, now=start)
    assert m.next_timer() == start
    expected = start
    for i in range(n):
        t = m.next_timer()
        assert t == expected
        assert not m.probe_due(math.nextafter(t, -math.inf))
        assert m.probe_due(t)
        m.start_probe(t)
        assert not m.probe_due(t)
        assert m.next_timer() == t + timeout
        if i % 2:
            m.probe_result(True, t + timeout * 0.5)
        else:
            m.handle_timer(t + timeout)  # no answer: the timer fails it
        expected = t + interval
        assert m.next_timer() == expected


def test_first_probe_can_be_spread_out() -> None:
    m = HealthMonitor(interval=2.0, timeout=1.0, rise=2, fall=3, now=10.0, first_probe_at=10.7)
    assert m.next_timer() == 10.7
    assert not m.probe_due(10.69)
    assert m.probe_due(10.7)


def test_stale_probe_ids_are_ignored() -> None:
    m = monitor(rise=1, fall=1, up=True)
    first = m.start_probe(0.0)
    m.handle_timer(1.0)  # first times out: DOWN
    second = m.start_probe(2.0)
    assert second != first
    assert m.probe_result(True, 2.1, probe=first) is False
    assert m.probe_in_flight
    assert m.probe_result(True, 2.2, probe=second) is True
    assert m.state is HealthState.UP


def test_one_probe_at_a_time() -> None:
    m = monitor()
    m.start_probe(0.0)
    with pytest.raises(RuntimeError):
        m.start_probe(0.5)


@pytest.mark.parametrize(
    ("interval", "timeout", "rise", "fall"),
    [(1.0, 1.0, 1, 1), (1.0, 0.0, 1, 1), (1.0, 0.5, 0, 1), (1.0, 0.5, 1, 0)],
)
def test_bad_parameters(interval: float, timeout: float, rise: int, fall: int) -> None:
    with pytest.raises(ValueError):
        HealthMonitor(interval=interval, timeout=timeout, rise=rise, fall=fall, now=0.0)


# --- HealthSet ----------------------------------------------------------------------


def test_set_eligible_draining_and_generation() -> None:
    hs: HealthSet[str] = HealthSet()
    hs.add("a", monitor(rise=1, fall=1))
    hs.add("b", monitor(rise=1, fall=1), weight=3)
    hs.add("c", None, drain=True)  # health type none: always up
    hs.add("d", monitor(rise=1, fall=1), weight=0)
    assert hs.eligible() == {"a": 1, "b": 3}
    assert hs.draining() == ["c"]
    generation = hs.generation

    assert hs.next_timer() == 0.0
    assert hs.due(0.0) == ["a", "b", "d"]
    probes = {key: hs.start_probe(key, 0.0) for key in hs.due(0.0)}
    assert hs.due(0.0) == []
    assert hs.next_timer() == 1.0
    assert hs.probe_result("a", True, 0.2, probes["a"]) is False
    assert hs.generation == generation
    assert hs.handle_timer(0.999) is False
    assert hs.handle_timer(1.0) is True  # b and d time out
    assert hs.generation == generation + 1
    assert hs.state("b") is HealthState.DOWN
    assert hs.eligible() == {"a": 1}
    assert not hs.keeps_existing_flows("b")
    assert hs.keeps_existing_flows("c")

    assert hs.set_drain("a", True) is True
    assert hs.set_drain("a", True) is False
    assert hs.eligible() == {}
    assert hs.draining() == ["a", "c"]
    assert hs.set_weight("c", 5) is True
    assert hs.set_drain("c", False) is True
    assert hs.eligible() == {"c": 5}
    assert hs.generation == generation + 4
    assert hs.next_timer() == 2.0


def test_set_rejects_probing_an_unprobed_backend() -> None:
    hs: HealthSet[int] = HealthSet()
    hs.add(0, None)
    assert hs.next_timer() is None
    assert hs.due(0.0) == []
    with pytest.raises(ValueError):
        hs.start_probe(0, 0.0)
    with pytest.raises(ValueError):
        hs.add(0, None)
