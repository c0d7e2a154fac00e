"""Connection tracking for ``nat``: flow states, timeouts and a bounded table.

Every transition and every timeout lives in one table, :data:`TABLE` (h11's
``_state.py`` habit): a row per :class:`State` gives the state's idle timeout,
its eviction :class:`Tier`, and the state that each (direction, event) leads
to. A pair missing from a row is :data:`INVALID` (the packet is dropped with
``invalid-state``). :data:`REOPEN` means "this packet opens a new connection on
the tuple of a finished one": the caller removes the entry and starts afresh.

The TCP rows are a deliberately small model of RFC 9293 §3.3.2 as seen from the
middle: they follow the handshake and the two FINs, not sequence numbers.
``FIN_WAIT`` means the originator (the client) sent the first FIN, ``CLOSE_WAIT``
that the reply side did; ``LAST_ACK`` that both FINs were seen. The timeouts
are Linux's ``nf_conntrack`` defaults, so the kernel data plane and this one
forget a flow after the same idle time.

The caller owns the clock (aioquic style): every method that needs the time
takes ``now``. An entry expires when ``now >= expires``; lookups check that
exactly (lazy expiry) and :meth:`Conntrack.expire` sweeps in order.

Table bound (``lb.conntrack_max``): to admit a new flow into a full table,
:meth:`Conntrack.admit` removes, in this order, an expired entry; else the
least recently seen entry of tier ``CLOSED`` (TIME_WAIT, CLOSE); else the least
recently seen entry of tier ``HALF_OPEN`` (SYN_SENT, SYN_RECV, unreplied UDP
and echo). ``PROTECTED`` entries (established and replied flows) are never
evicted: the new flow is refused instead (``conntrack-full``). Each state keeps
its own ``OrderedDict`` in last-seen order; since all entries of one state share
one timeout, that is also expiry order, so the sweep and every eviction look at
the fronts only: O(number of states).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from enum import IntEnum
from ipaddress import IPv6Address
from typing import Any, Final, NamedTuple

from v6lb.core.verdict import Counters
from v6lb.wire.constants import NH_ICMPV6, NH_TCP, NH_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

__all__ = [
    "INVALID",
    "ORIG",
    "REOPEN",
    "REPLY",
    "TABLE",
    "Conn",
    "Conntrack",
    "Event",
    "Row",
    "State",
    "Tier",
    "next_state",
    "tcp_event",
]


class State(IntEnum):
    """Where a tracked flow is. ``NONE`` is the row for packets that have no entry yet."""

    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    UDP_UNREPLIED = 9
    UDP_ASSURED = 10
    ECHO_UNREPLIED = 11
    ECHO_REPLIED = 12

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class Event(IntEnum):
    """What a packet means to the state machine (TCP: from its flags, see :func:`tcp_event`)."""

    SYN = 0
    SYNACK = 1
    FIN = 2  # FIN with ACK
    ACK = 3  # ACK without SYN, FIN or RST (data, or a bare ACK)
    RST = 4
    BAD = 5  # a flag combination no TCP sends (SYN+FIN, SYN+RST, no ACK at all, ...)
    DGRAM = 6  # any UDP datagram
    ECHO = 7  # an echo request (originator) or echo reply (reply side)


class Tier(IntEnum):
    """Eviction order under pressure: lower tiers go first; PROTECTED never does."""

    CLOSED = 0
    HALF_OPEN = 1
    PROTECTED = 2


ORIG: Final = 0  # the direction of the packet that created the entry (client -> VIP)
REPLY: Final = 1  # the other direction (backend -> client)
INVALID: Final = -1
REOPEN: Final = -2


class Row(NamedTuple):
    timeout: float  # seconds of idleness before the entry expires
    tier: Tier
    on: dict[tuple[int, Event], int]  # (direction, event) -> next State, or REOPEN


_S = State
_E = Event
_o, _r = ORIG, REPLY

# fmt: off
TABLE: Final[dict[State, Row]] = {
    # Only these packets create an entry; any other packet without one is invalid.
    _S.NONE: Row(0.0, Tier.PROTECTED, {
        (_o, _E.SYN): _S.SYN_SENT,
        (_o, _E.DGRAM): _S.UDP_UNREPLIED,
        (_o, _E.ECHO): _S.ECHO_UNREPLIED,
    }),
    _S.SYN_SENT: Row(120.0, Tier.HALF_OPEN, {
        (_o, _E.SYN): _S.SYN_SENT,  # retransmitted SYN
        (_o, _E.RST): _S.CLOSE,
        (_r, _E.SYNACK): _S.SYN_RECV,
        (_r, _E.RST): _S.CLOSE,  # the backend refused the connection
    }),
    _S.SYN_RECV: Row(60.0, Tier.HALF_OPEN, {
        (_o, _E.SYN): _S.SYN_RECV,  # the SYN-ACK was lost; the client retries
        (_o, _E.ACK): _S.ESTABLISHED,
        (_o, _E.FIN): _S.FIN_WAIT,
        (_o, _E.RST): _S.CLOSE,
        (_r, _E.SYNACK): _S.SYN_RECV,
        (_r, _E.ACK): _S.SYN_RECV,
        (_r, _E.RST): _S.CLOSE,
    }),
    _S.ESTABLISHED: Row(432_000.0, Tier.PROTECTED, {
        # A SYN on an established tuple (the client lost its state) is passed on:
        # the backend's challenge ACK (RFC 5961 §4) makes the client reset it.
        (_o, _E.SYN): _S.ESTABLISHED,
        (_o, _E.ACK): _S.ESTABLISHED,
        (_o, _E.FIN): _S.FIN_WAIT,
        (_o, _E.RST): _S.CLOSE,
        (_r, _E.SYNACK): _S.ESTABLISHED,  # a retransmitted SYN-ACK
        (_r, _E.ACK): _S.ESTABLISHED,
        (_r, _E.FIN): _S.CLOSE_WAIT,
        (_r, _E.RST): _S.CLOSE,
    }),
    _S.FIN_WAIT: Row(120.0, Tier.PROTECTED, {
        (_o, _E.ACK): _S.FIN_WAIT,
        (_o, _E.FIN): _S.FIN_WAIT,
        (_o, _E.RST): _S.CLOSE,
        (_r, _E.ACK): _S.FIN_WAIT,  # the backend may go on sending (half close)
        (_r, _E.FIN): _S.LAST_ACK,
        (_r, _E.RST): _S.CLOSE,
    }),
    _S.CLOSE_WAIT: Row(60.0, Tier.PROTECTED, {
        (_o, _E.ACK): _S.CLOSE_WAIT,
        (_o, _E.FIN): _S.LAST_ACK,
        (_o, _E.RST): _S.CLOSE,
        (_r, _E.ACK): _S.CLOSE_WAIT,
        (_r, _E.FIN): _S.CLOSE_WAIT,
        (_r, _E.RST): _S.CLOSE,
    }),
    _S.LAST_ACK: Row(30.0, Tier.PROTECTED, {
        # The ACK of the second FIN comes from whichever side sent the first.
        (_o, _E.ACK): _S.TIME_WAIT,
        (_o, _E.FIN): _S.LAST_ACK,
        (_o, _E.RST): _S.CLOSE,
        (_r, _E.ACK): _S.TIME_WAIT,
        (_r, _E.FIN): _S.LAST_ACK,
        (_r, _E.RST): _S.CLOSE,
    }),
    _S.TIME_WAIT: Row(120.0, Tier.CLOSED, {
        (_o, _E.SYN): REOPEN,  # the client reuses its port: a new connection
        (_o, _E.ACK): _S.TIME_WAIT,
        (_o, _E.FIN): _S.TIME_WAIT,
        (_o, _E.RST): _S.CLOSE,
        (_r, _E.ACK): _S.TIME_WAIT,
        (_r, _E.FIN): _S.TIME_WAIT,
        (_r, _E.RST): _S.CLOSE,
    }),
    _S.CLOSE: Row(10.0, Tier.CLOSED, {
        (_o, _E.SYN): REOPEN,
        (_o, _E.ACK): _S.CLOSE,
        (_o, _E.FIN): _S.CLOSE,
        (_o, _E.RST): _S.CLOSE,
        (_r, _E.ACK): _S.CLOSE,
        (_r, _E.FIN): _S.CLOSE,
        (_r, _E.RST): _S.CLOSE,
    }),
    _S.UDP_UNREPLIED: Row(30.0, Tier.HALF_OPEN, {
        (_o, _E.DGRAM): _S.UDP_UNREPLIED,
        (_r, _E.DGRAM): _S.UDP_ASSURED,
    }),
    _S.UDP_ASSURED: Row(120.0, Tier.PROTECTED, {
        (_o, _E.DGRAM): _S.UDP_ASSURED,
        (_r, _E.DGRAM): _S.UDP_ASSURED,
    }),
    _S.ECHO_UNREPLIED: Row(30.0, Tier.HALF_OPEN, {
        (_o, _E.ECHO): _S.ECHO_UNREPLIED,
        (_r, _E.ECHO): _S.ECHO_REPLIED,
    }),
    _S.ECHO_REPLIED: Row(30.0, Tier.PROTECTED, {
        (_o, _E.ECHO): _S.ECHO_REPLIED,
        (_r, _E.ECHO): _S.ECHO_REPLIED,
    }),
}
# fmt: on

N_STATES: Final = len(State)

# The table flattened for the hot path: index (state << 4) | (direction << 3) | event.
_NEXT: Final[list[int]] = [INVALID] * (N_STATES << 4)
for _st, _row in TABLE.items():
    for (_d, _ev), _nx in _row.on.items():
        _NEXT[(_st << 4) | (_d << 3) | _ev] = _nx
NEXT: Final = tuple(_NEXT)


def _tcp_event(flags: int) -> Event:
    syn, ack, fin, rst = flags & TCP_SYN, flags & TCP_ACK, flags & TCP_FIN, flags & TCP_RST
    if syn:
        if fin or rst:
            return Event.BAD
        return Event.SYNACK if ack else Event.SYN
    if rst:
        return Event.RST
    if not ack:
        return Event.BAD  # RFC 9293 §3.10.7.4: past the SYN, every segment carries ACK
    return Event.FIN if fin else Event.ACK


_FLAG_MASK: Final = TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK  # 0x17: PSH, URG, ECE, CWR don't matter
TCP_EVENTS: Final = bytes(_tcp_event(f) for f in range(_FLAG_MASK + 1))
"""``TCP_EVENTS[flags & 0x17]`` is the :class:`Event` of a TCP segment."""


def tcp_event(flags: int) -> Event:
    """The :class:`Event` of a TCP segment with these flags."""
    return Event(TCP_EVENTS[flags & _FLAG_MASK])


def next_state(state: int, direction: int, event: int) -> int:
    """The table's answer: the next :class:`State`, :data:`INVALID` or :data:`REOPEN`."""
    return NEXT[(state << 4) | (direction << 3) | event]


EVENT_OF_PROTO: Final = {NH_UDP: Event.DGRAM, NH_ICMPV6: Event.ECHO}


_NO_COUNT: list[int] = [0, 0]  # a Conn no service counts (conntrack tests)


class Conn:
    """One tracked flow, found under two keys: the original and the reply tuple.

    A key is 36 bytes: source and destination addresses, then two 16-bit
    "ports" (for ICMPv6 echo: the identifier, then zero). ``key_orig`` is the
    packet as the client sent it, ``key_reply`` the reply as the backend sends
    it. ``rw_orig``/``rw_reply`` are the 36 bytes each direction is rewritten
    to, and ``delta_*`` the matching RFC 1624 checksum adjustments, both fixed
    at creation so that a packet of a known flow costs one dict lookup and
    in-place writes. The NAT fills the fields after ``key_reply``.
    """

    __slots__ = (
        "proto",
        "state",
        "expires",
        "key_orig",
        "key_reply",
        "rw_orig",
        "rw_reply",
        "delta_orig",
        "delta_reply",
        "pdelta_orig",
        "pdelta_reply",
        "pool",
        "backend",
        "generation",
        "service",
        "ctr_orig",
        "ctr_reply",
        "snat",
        "snat_port",
        "alive",
    )

    def __init__(self, proto: int, key_orig: bytes, key_reply: bytes) -> None:
        self.proto = proto
        self.state: int = State.NONE
        self.expires = 0.0
        self.key_orig = key_orig
        self.key_reply = key_reply
        self.rw_orig = key_reply
        self.rw_reply = key_orig
        self.delta_orig = 0
        self.delta_reply = 0
        # For a checksum field that holds only the pseudo-header sum (a checksum
        # the NIC or the kernel completes later): the address change, added.
        self.pdelta_orig = 0
        self.pdelta_reply = 0
        # Filled by the NAT: the BackendPool, the backend's index, the pool
        # generation last checked, the NatService, the SNAT port space's key.
        self.pool: Any = None
        self.backend = -1
        self.generation = 0
        self.service: Any = None
        # the service's [packets, bytes] of each direction, counted per packet forwarded
        self.ctr_orig: list[int] = _NO_COUNT
        self.ctr_reply: list[int] = _NO_COUNT
        self.snat: Any = None
        self.snat_port = 0
        self.alive = False

    @staticmethod
    def _tuple(key: bytes) -> tuple[str, str, int, int]:
        return (
            str(IPv6Address(key[:16])),
            str(IPv6Address(key[16:32])),
            (key[32] << 8) | key[33],
            (key[34] << 8) | key[35],
        )

    @property
    def orig_tuple(self) -> tuple[str, str, int, int]:
        """(source, destination, source port, destination port) as the client sent it."""
        return self._tuple(self.key_orig)

    @property
    def reply_tuple(self) -> tuple[str, str, int, int]:
        """The same, for the reply as the backend sends it."""
        return self._tuple(self.key_reply)

    def __repr__(self) -> str:
        s, d, sp, dp = self.orig_tuple
        rs, rd, rsp, rdp = self.reply_tuple
        return (
            f"Conn(proto={self.proto}, {State(self.state).name}, [{s}]:{sp} -> [{d}]:{dp}, "
            f"reply [{rs}]:{rsp} -> [{rd}]:{rdp}, expires={self.expires})"
        )


def _default_timeouts() -> list[float]:
    return [TABLE[s].timeout for s in State]


class Conntrack:
    """A bounded table of :class:`Conn`, keyed per direction and protocol.

    ``tables[ORIG][proto]`` and ``tables[REPLY][proto]`` map a 36-byte key to
    its entry. Outcomes are counted in ``counters`` (``new``, ``expired``,
    ``evicted``, ``reopened``, ``backend-down``), and ``on_remove`` (if set) is
    called for every entry that leaves the table, e.g. to free its SNAT port.
    """

    def __init__(
        self,
        max_entries: int = 262_144,
        *,
        timeouts: Mapping[State | str, float] | None = None,
        counters: Counters | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("conntrack_max is at least 1")
        self.max_entries = max_entries
        self.timeouts = _default_timeouts()
        for name, seconds in (timeouts or {}).items():
            st = name if isinstance(name, State) else State[name.upper().replace("-", "_")]
            if st is State.NONE or not seconds > 0:
                raise ValueError(f"a timeout for {st.name} must be a positive number of seconds")
            self.timeouts[st] = float(seconds)
        self.counters = counters if counters is not None else Counters()
        self.tables: tuple[dict[int, dict[bytes, Conn]], dict[int, dict[bytes, Conn]]] = (
            {NH_TCP: {}, NH_UDP: {}, NH_ICMPV6: {}},
            {NH_TCP: {}, NH_UDP: {}, NH_ICMPV6: {}},
        )
        # One LRU per state (last seen at the end), hence in expiry order too.
        self.lru: list[OrderedDict[Conn, None]] = [OrderedDict() for _ in State]
        self._by_tier = [
            [s for s in State if s is not State.NONE and TABLE[s].tier == t]
            for t in (Tier.CLOSED, Tier.HALF_OPEN)
        ]
        self._count = 0
        self.on_remove: Callable[[Conn], None] | None = None

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Conn]:
        for od in self.lru:
            yield from list(od)

    def count_by_state(self) -> dict[str, int]:
        return {State(s).label: len(od) for s, od in enumerate(self.lru) if od}

    # --- lookups -------------------------------------------------------------

    def lookup(self, direction: int, proto: int, key: bytes, now: float) -> Conn | None:
        """The live entry under ``key``; an expired one is removed and not returned."""
        table = self.tables[direction].get(proto)
        if table is None:
            return None
        conn = table.get(key)
        if conn is None:
            return None
        if conn.expires <= now:
            self.remove(conn, "expired")
            return None
        return conn

    # --- changes ---------------------------------------------------------------

    def admit(self, now: float) -> bool:
        """Make room for one more entry; False if every entry is protected."""
        if self._count < self.max_entries:
            return True
        lru = self.lru
        for od in lru:
            if od:
                conn = next(iter(od))
                if conn.expires <= now:
                    self.remove(conn, "expired")
                    return True
        timeouts = self.timeouts
        for states in self._by_tier:
            victim: Conn | None = None
            oldest = 0.0
            for s in states:
                od = lru[s]
                if od:
                    conn = next(iter(od))
                    seen = conn.expires - timeouts[s]
                    if victim is None or seen < oldest:
                        victim, oldest = conn, seen
            if victim is not None:
                self.remove(victim, "evicted")
                return True
        return False

    def insert(self, conn: Conn, state: int, now: float) -> None:
        """Add ``conn`` in ``state``; call :meth:`admit` first (the bound is not checked here)."""
        orig = self.tables[ORIG][conn.proto]
        reply = self.tables[REPLY][conn.proto]
        if conn.key_orig in orig or conn.key_reply in reply:
            raise ValueError(f"{conn!r}: a key is already tracked")
        orig[conn.key_orig] = conn
        reply[conn.key_reply] = conn
        conn.state = state
        conn.expires = now + self.timeouts[state]
        conn.alive = True
        self.lru[state][conn] = None
        self._count += 1
        self.counters.bump("new")

    def touch(self, conn: Conn, state: int, now: float) -> None:
        """Record a packet of ``conn`` that leads to ``state``: refresh its timer."""
        old = conn.state
        if state != old:
            del self.lru[old][conn]
            self.lru[state][conn] = None
            conn.state = state
        else:
            self.lru[state].move_to_end(conn)
        conn.expires = now + self.timeouts[state]

    def remove(self, conn: Conn, why: str = "removed") -> None:
        """Forget ``conn``; ``why`` names the counter (``expired``, ``evicted``, ...)."""
        if not conn.alive:
            return
        conn.alive = False
        del self.tables[ORIG][conn.proto][conn.key_orig]
        del self.tables[REPLY][conn.proto][conn.key_reply]
        del self.lru[conn.state][conn]
        self._count -= 1
        self.counters.bump(why)
        if self.on_remove is not None:
            self.on_remove(conn)

    def expire(self, now: float, budget: int = 1 << 62) -> int:
        """Remove up to ``budget`` entries with ``expires <= now``; return how many went."""
        removed = 0
        for od in self.lru:
            while od and removed < budget:
                conn = next(iter(od))
                if conn.expires > now:
                    break
                self.remove(conn, "expired")
                removed += 1
        return removed

    def next_expiry(self) -> float | None:
        """The earliest ``expires`` of any entry (aioquic's ``get_timer``), or None."""
        fronts = [next(iter(od)).expires for od in self.lru if od]
        return min(fronts) if fronts else None
