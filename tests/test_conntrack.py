"""Conntrack: the one state table, exact timeouts, the bound and the eviction order."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from v6lb.core.conntrack import (
    INVALID,
    ORIG,
    REOPEN,
    REPLY,
    TABLE,
    Conn,
    Conntrack,
    Event,
    State,
    Tier,
    next_state,
    tcp_event,
)
from v6lb.wire.constants import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN

E = Event
S = State


# --- the table --------------------------------------------------------------------------


def test_every_state_has_one_row_with_a_timeout_and_a_tier() -> None:
    assert set(TABLE) == set(State)
    for state, row in TABLE.items():
        assert isinstance(row.tier, Tier)
        if state is not State.NONE:
            assert row.timeout > 0
        for (direction, event), nxt in row.on.items():
            assert direction in (ORIG, REPLY) and isinstance(event, Event)
            assert nxt == REOPEN or nxt in set(State) - {State.NONE}


def test_linux_default_timeouts() -> None:
    # nf_conntrack's defaults, so the kernel data plane forgets flows at the same time.
    want = {
        S.SYN_SENT: 120,
        S.SYN_RECV: 60,
        S.ESTABLISHED: 432000,
        S.FIN_WAIT: 120,
        S.CLOSE_WAIT: 60,
        S.LAST_ACK: 30,
        S.TIME_WAIT: 120,
        S.CLOSE: 10,
        S.UDP_UNREPLIED: 30,
        S.UDP_ASSURED: 120,
        S.ECHO_UNREPLIED: 30,
        S.ECHO_REPLIED: 30,
    }
    assert {s: TABLE[s].timeout for s in want} == want


def test_the_written_policy_shows_the_table() -> None:
    """docs/nat.md's timeouts table is the code's table."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "nat.md").read_text()
    section = doc.split("## States and timeouts")[1].split("##")[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = (float(cells[1]), cells[2].replace("-", "_").upper())
    want = {s.label: (TABLE[s].timeout, TABLE[s].tier.name) for s in State if s is not S.NONE}
    assert rows == want


def test_only_an_originator_syn_datagram_or_echo_creates_an_entry() -> None:
    creators = {(d, e) for (d, e), nxt in TABLE[S.NONE].on.items() if nxt != INVALID}
    assert creators == {(ORIG, E.SYN), (ORIG, E.DGRAM), (ORIG, E.ECHO)}
    for event in Event:
        assert next_state(S.NONE, REPLY, event) == INVALID


def test_every_state_is_reachable_from_none() -> None:
    seen = {S.NONE}
    todo = [S.NONE]
    while todo:
        for nxt in TABLE[todo.pop()].on.values():
            if nxt >= 0 and State(nxt) not in seen:
                seen.add(State(nxt))
                todo.append(State(nxt))
    assert seen == set(State)


def test_tiers_protect_established_flows() -> None:
    tier = {s: TABLE[s].tier for s in State if s is not S.NONE}
    assert {s for s, t in tier.items() if t is Tier.HALF_OPEN} == {
        S.SYN_SENT,
        S.SYN_RECV,
        S.UDP_UNREPLIED,
        S.ECHO_UNREPLIED,
    }
    assert {s for s, t in tier.items() if t is Tier.CLOSED} == {S.TIME_WAIT, S.CLOSE}


@pytest.mark.parametrize(
    ("flags", "event"),
    [
        (TCP_SYN, E.SYN),
        (TCP_SYN | TCP_ACK, E.SYNACK),
        (TCP_ACK, E.ACK),
        (TCP_ACK | TCP_PSH, E.ACK),
        (TCP_FIN | TCP_ACK, E.FIN),
        (TCP_RST, E.RST),
        (TCP_RST | TCP_ACK, E.RST),
        (TCP_SYN | TCP_FIN, E.BAD),
        (TCP_SYN | TCP_RST, E.BAD),
        (TCP_FIN, E.BAD),
        (0, E.BAD),
        (TCP_PSH, E.BAD),
    ],
)
def test_tcp_events(flags: int, event: Event) -> None:
    assert tcp_event(flags) is event


def _walk(*steps: tuple[int, Event]) -> list[int]:
    state: int = S.NONE
    out = []
    for direction, event in steps:
        state = next_state(state, direction, event)
        out.append(state)
    return out


def test_tcp_handshake_and_client_close() -> None:
    assert _walk(
        (ORIG, E.SYN),
        (REPLY, E.SYNACK),
        (ORIG, E.ACK),
        (ORIG, E.FIN),
        (REPLY, E.ACK),
        (REPLY, E.FIN),
        (ORIG, E.ACK),
        (ORIG, E.SYN),
    ) == [
        S.SYN_SENT,
        S.SYN_RECV,
        S.ESTABLISHED,
        S.FIN_WAIT,
        S.FIN_WAIT,
        S.LAST_ACK,
        S.TIME_WAIT,
        REOPEN,
    ]


def test_tcp_server_close_and_resets() -> None:
    assert _walk(
        (ORIG, E.SYN),
        (REPLY, E.SYNACK),
        (ORIG, E.ACK),
        (REPLY, E.FIN),
        (ORIG, E.FIN),
        (REPLY, E.ACK),
    )[-3:] == [S.CLOSE_WAIT, S.LAST_ACK, S.TIME_WAIT]
    assert _walk((ORIG, E.SYN), (REPLY, E.RST)) == [S.SYN_SENT, S.CLOSE]
    assert next_state(S.CLOSE, ORIG, E.SYN) == REOPEN
    # Out of order or impossible: invalid, and the entry is left alone.
    assert next_state(S.SYN_SENT, ORIG, E.ACK) == INVALID
    assert next_state(S.SYN_SENT, REPLY, E.ACK) == INVALID
    assert next_state(S.ESTABLISHED, ORIG, E.BAD) == INVALID
    assert next_state(S.ESTABLISHED, ORIG, E.SYN) == S.ESTABLISHED


def test_udp_and_echo() -> None:
    assert _walk((ORIG, E.DGRAM), (ORIG, E.DGRAM), (REPLY, E.DGRAM), (ORIG, E.DGRAM)) == [
        S.UDP_UNREPLIED,
        S.UDP_UNREPLIED,
        S.UDP_ASSURED,
        S.UDP_ASSURED,
    ]
    assert _walk((ORIG, E.ECHO), (REPLY, E.ECHO)) == [S.ECHO_UNREPLIED, S.ECHO_REPLIED]
    assert next_state(S.UDP_ASSURED, ORIG, E.SYN) == INVALID


# --- the table of entries ----------------------------------------------------------------


def conn(i: int, proto: int = 6) -> Conn:
    key = bytes(32) + i.to_bytes(4, "big")
    return Conn(proto, key, b"\xff" * 32 + i.to_bytes(4, "big"))


def test_insert_lookup_touch_remove() -> None:
    ct = Conntrack(10)
    c = conn(1)
    assert ct.admit(0.0)
    ct.insert(c, S.SYN_SENT, 0.0)
    assert len(ct) == 1 and c.expires == 120.0
    assert ct.lookup(ORIG, 6, c.key_orig, 1.0) is c
    assert ct.lookup(REPLY, 6, c.key_reply, 1.0) is c
    assert ct.lookup(ORIG, 17, c.key_orig, 1.0) is None
    assert ct.lookup(ORIG, 99, c.key_orig, 1.0) is None
    ct.touch(c, S.SYN_RECV, 5.0)
    assert c.state == S.SYN_RECV and c.expires == 65.0
    assert ct.count_by_state() == {"syn-recv": 1}
    with pytest.raises(ValueError, match="already tracked"):
        ct.insert(conn(1), S.SYN_SENT, 0.0)
    ct.remove(c, "closed")
    ct.remove(c, "closed")  # idempotent
    assert len(ct) == 0 and ct.counters.extra == {"new": 1, "closed": 1}
    assert c.orig_tuple == ("::", "::", 0, 1) and "SYN_RECV" in repr(c)


@settings(max_examples=50, deadline=None)
@given(
    t0=st.floats(0, 1e7, allow_nan=False),
    state=st.sampled_from([s for s in State if s is not S.NONE]),
)
def test_timeouts_fire_exactly(t0: float, state: State) -> None:
    """At t+timeout-ε the entry is there; at t+timeout it is gone, by lookup and by sweep."""
    timeout = TABLE[state].timeout
    for lazy in (True, False):
        ct = Conntrack(4)
        c = conn(1)
        ct.insert(c, state, t0)
        just_before = math.nextafter(t0 + timeout, -math.inf)
        assert ct.lookup(ORIG, 6, c.key_orig, just_before) is c
        assert ct.expire(just_before) == 0 and ct.next_expiry() == t0 + timeout
        if lazy:
            assert ct.lookup(ORIG, 6, c.key_orig, t0 + timeout) is None
        else:
            assert ct.expire(t0 + timeout) == 1
        assert len(ct) == 0 and ct.counters.extra["expired"] == 1
        assert ct.next_expiry() is None


def test_timeouts_can_be_configured() -> None:
    ct = Conntrack(4, timeouts={S.ESTABLISHED: 3600.0, "udp-unreplied": 5})
    assert ct.timeouts[S.ESTABLISHED] == 3600.0 and ct.timeouts[S.UDP_UNREPLIED] == 5.0
    with pytest.raises(ValueError, match="positive"):
        Conntrack(4, timeouts={"close": 0})
    with pytest.raises(ValueError, match="at least 1"):
        Conntrack(0)


def test_sweep_respects_its_budget_and_order() -> None:
    ct = Conntrack(100)
    conns = [conn(i, 17) for i in range(10)]
    for i, c in enumerate(conns):
        ct.insert(c, S.UDP_UNREPLIED, float(i))
    ct.touch(conns[0], S.UDP_UNREPLIED, 9.0)  # seen again: now the youngest
    assert ct.expire(35.0, budget=2) == 2
    assert {c.key_orig for c in ct} == {c.key_orig for c in [conns[0]] + conns[3:]}
    assert ct.expire(35.0) == 3  # 3, 4, 5 (expiring at 33..35)
    assert ct.expire(1e9) == 5


def test_admit_evicts_expired_then_closed_then_oldest_half_open() -> None:
    ct = Conntrack(4, timeouts={"established": 20.0})
    ct.insert(est := conn(1), S.ESTABLISHED, 0.0)
    ct.insert(conn(2), S.SYN_SENT, 1.0)
    ct.insert(conn(3), S.SYN_RECV, 2.0)
    ct.insert(tw := conn(4), S.TIME_WAIT, 3.0)
    # Full: a TIME_WAIT entry goes before any half-open one.
    assert ct.admit(4.0) and not tw.alive and est.alive
    ct.insert(conn(5, 17), S.UDP_UNREPLIED, 5.0)
    # Then the half-open entry seen longest ago: the SYN_SENT of 1.0.
    assert ct.admit(6.0)
    assert sorted(c.key_orig[-1] for c in ct) == [1, 3, 5]
    ct.insert(conn(6), S.SYN_SENT, 6.0)
    # An expired entry goes before all of them, protected or not.
    assert ct.admit(21.0) and not est.alive
    assert sorted(c.key_orig[-1] for c in ct) == [3, 5, 6]
    assert ct.counters.extra == {"new": 6, "evicted": 2, "expired": 1}


def test_a_table_of_established_flows_admits_nothing() -> None:
    ct = Conntrack(2)
    ct.insert(conn(1), S.ESTABLISHED, 0.0)
    ct.insert(conn(2, 17), S.UDP_ASSURED, 0.0)
    assert not ct.admit(100.0)
    assert len(ct) == 2
    assert ct.admit(120.0)  # the UDP flow has expired


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["new", "touch", "advance", "sweep"]),
            st.integers(0, 40),
            st.sampled_from([s for s in State if s is not S.NONE]),
        ),
        max_size=120,
    ),
    limit=st.integers(1, 8),
)
def test_bound_and_expiry_invariants(ops: list[tuple[str, int, State]], limit: int) -> None:
    """Never more than the bound; a refused admit means all live and protected; sweeps are exact."""
    ct = Conntrack(limit)
    now = 0.0
    for op, i, state in ops:
        if op == "advance":
            now += i * 3.0
        elif op == "sweep":
            ct.expire(now)
            assert all(c.expires > now for c in ct)
        elif op == "touch":
            live = [c for c in ct if c.expires > now]
            if live:
                ct.touch(live[i % len(live)], state, now)
        elif ct.lookup(ORIG, 6, conn(i).key_orig, now) is None:
            if ct.admit(now):
                ct.insert(conn(i), state, now)
            else:
                assert all(TABLE[State(c.state)].tier is Tier.PROTECTED for c in ct)
                assert all(c.expires > now for c in ct)
        assert len(ct) <= limit
        assert len(ct) == len(list(ct))
