"""Stateful NAT66 (the ``nat`` mode): DNAT a VIP to a backend, optional SNAT, conntrack.

A client's first packet to ``VIP:port`` (a TCP SYN, any UDP datagram, an
ICMPv6 echo request to the VIP address) picks a backend with the VIP's Maglev
table (:meth:`BackendPool.pick_flow` on the client's 4-tuple) and creates a
:class:`~v6lb.core.conntrack.Conn`; every later packet of the flow, in either
direction, is one dict lookup and an in-place rewrite of addresses, ports and
the transport checksum (RFC 1624, an adjustment fixed when the flow is made).

With ``snat`` the client's source becomes an LB address (for a pool: one per
client, "paired" as in RFC 4787 REQ-2) and a source port from ``snat_ports``
unique for (SNAT address, backend address, backend port, protocol); without it
only the destination changes and backends must route replies via the LB.

Everything that is not a VIP's traffic or the reply of a tracked flow is
dropped as ``no-match``: v6lb is not an open relay, and the inside never opens
flows. docs/nat.md is the written policy: fragments, timeouts, the table bound,
SNAT exhaustion, ICMPv6 errors, drain and health.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final

from v6lb.core.backends import BackendPool
from v6lb.core.conntrack import (
    INVALID,
    NEXT,
    ORIG,
    REOPEN,
    REPLY,
    TCP_EVENTS,
    Conn,
    Conntrack,
    Event,
    State,
)
from v6lb.core.flowhash import flow_hash2
from v6lb.core.icmperr import IcmpErrorSource
from v6lb.core.verdict import DROP, FORWARD, PORT_INSIDE, PORT_OUTSIDE, Counters, Verdict
from v6lb.wire.build import a16
from v6lb.wire.checksum import update, update16
from v6lb.wire.constants import (
    ICMP6_DST_UNREACH,
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    ICMP6_PACKET_TOO_BIG,
    ICMP6_PARAM_PROB,
    ICMP6_TIME_EXCEEDED,
    MIN_MTU,
    NH_AH,
    NH_FRAGMENT,
    NH_ICMPV6,
    NH_ROUTING,
    NH_TCP,
    NH_UDP,
    TE_HOP_LIMIT,
)
from v6lb.wire.ipv6 import PacketInfo, parse, validate_l4
from v6lb.wire.reasons import Reason

__all__ = ["FRAG_TIMEOUT", "NatForwarder", "NatService"]

_M: Final = 0xFFFF
FRAG_TIMEOUT: Final = 60.0  # RFC 8200 §4.5: a reassembly gives up 60 s after the first fragment

# Fast-path views of a packet without extension headers (one unpack each):
# version byte, payload length, next header, hop limit, the 36-byte flow key,
# then TCP data offset, flags, checksum / UDP length, checksum.
_TCP_HDR: Final = struct.Struct("!B3xHBB36s8xBB2xH")
_UDP_HDR: Final = struct.Struct("!B3xHBB36sHH")
_PUT_HDR: Final = struct.Struct("!B36s")  # hop limit, then addresses and ports, at offset 7
_U16: Final = struct.Struct("!H")
_PORTS: Final = struct.Struct("!HH")

_UNSPECIFIED: Final = bytes(16)
_CSUM_OFF: Final = {NH_TCP: 16, NH_UDP: 6, NH_ICMPV6: 2}
_ERRORS: Final = (ICMP6_DST_UNREACH, ICMP6_PACKET_TOO_BIG, ICMP6_TIME_EXCEEDED, ICMP6_PARAM_PROB)

_R_NO_MATCH: Final = int(Reason.NO_MATCH)
_R_UNSUPPORTED: Final = int(Reason.UNSUPPORTED)
_R_INVALID: Final = int(Reason.INVALID_STATE)
_R_NO_BACKEND: Final = int(Reason.NO_BACKEND)
_R_FULL: Final = int(Reason.CONNTRACK_FULL)
_R_PORTS: Final = int(Reason.SNAT_PORTS_EXHAUSTED)
_R_CLASH: Final = int(Reason.NAT_TUPLE_CLASH)
_R_UNMATCHED: Final = int(Reason.ICMP_ERROR_UNMATCHED)
_R_QUOTE_BAD: Final = int(Reason.ICMP_ERROR_QUOTE_BAD)
_R_FRAG: Final = int(Reason.FRAGMENT_UNMATCHED)
_R_HOP: Final = int(Reason.HOP_LIMIT_EXCEEDED)

_PROTOS: Final = {"tcp": NH_TCP, "udp": NH_UDP, NH_TCP: NH_TCP, NH_UDP: NH_UDP}


class NatService:
    """One ``nat`` VIP: address, protocol, ports, backends and the optional SNAT.

    A backend port of 0 means "the port the client connected to". ``snat`` is an
    address or a pool prefix (/64 to /128); the pool's all-zero interface ID
    (the Subnet-Router anycast address, RFC 4291 §2.6.1) is skipped below /127.
    """

    __slots__ = (
        "name",
        "address",
        "proto",
        "ports",
        "pool",
        "snat",
        "snat_ports",
        "icmp_translated",
        "icmp_unmatched",
        "new_flows",
        "active_flows",
        "backend_new_flows",
        "backend_active_flows",
        "traffic_in",
        "traffic_out",
        "_snat_first",
        "_snat_count",
    )

    def __init__(
        self,
        address: str | bytes | ipaddress.IPv6Address,
        pool: BackendPool,
        *,
        protocol: str | int = "tcp",
        ports: Iterable[int] = (),
        snat: str | bytes | ipaddress.IPv6Address | ipaddress.IPv6Network | None = None,
        snat_ports: tuple[int, int] = (1024, 65535),
        name: str = "",
    ) -> None:
        self.address = a16(address)
        proto = _PROTOS.get(protocol)
        if proto is None:
            raise ValueError(f"a nat VIP is tcp or udp, not {protocol!r}")
        self.proto = proto
        self.ports = tuple(ports)
        if not self.ports or not all(1 <= p <= 65535 for p in self.ports):
            raise ValueError("a nat VIP needs at least one port in 1-65535")
        self.pool = pool
        self.name = name or f"[{ipaddress.IPv6Address(self.address)}]"
        self.snat: ipaddress.IPv6Network | None = None
        self._snat_first = 0
        self._snat_count = 0
        if snat is not None:
            if isinstance(snat, ipaddress.IPv6Network):
                net = snat
            elif isinstance(snat, str) and "/" in snat:
                net = ipaddress.IPv6Network(snat)
            else:
                net = ipaddress.IPv6Network(ipaddress.IPv6Address(a16(snat)))
            skip = 1 if net.prefixlen < 127 else 0
            self.snat = net
            self._snat_first = int(net.network_address) + skip
            self._snat_count = net.num_addresses - skip
        lo, hi = snat_ports
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"snat_ports {lo}-{hi} is not a range within 1-65535")
        self.snat_ports = (lo, hi)
        # ICMPv6 errors about the VIP's flows translated (both ways), and errors sent to
        # the VIP's address that quote no tracked flow (counted on its first VIP).
        self.icmp_translated = 0
        self.icmp_unmatched = 0
        # flows opened (conntrack entries made) and live entries, in all and per backend
        self.new_flows = 0
        self.active_flows = 0
        self.backend_new_flows = [0] * len(pool)
        self.backend_active_flows = [0] * len(pool)
        # the VIP's flows' packets forwarded, [packets, bytes]: clients to backends ("in")
        # and the replies ("out"); each flow's Conn holds these two lists
        self.traffic_in = [0, 0]
        self.traffic_out = [0, 0]

    def snat_address(self, client: bytes, seed: int = 0) -> bytes:
        """The SNAT address of ``client``: always the same one for a client (paired pooling)."""
        if self._snat_count == 1:
            return self._snat_first.to_bytes(16, "big")
        i = flow_hash2(client, 0, seed) % self._snat_count
        return (self._snat_first + i).to_bytes(16, "big")

    def __repr__(self) -> str:
        return f"NatService({self.name}, proto={self.proto}, ports={self.ports}, snat={self.snat})"


class _PortSpace:
    """Source ports of one (SNAT address, backend, backend port, protocol).

    O(1) both ways: ports never handed out come from a counter, freed ones are
    reused oldest first, so a port rests as long as possible before reuse.
    """

    __slots__ = ("next", "high", "free", "used")

    def __init__(self, low: int, high: int) -> None:
        self.next = low
        self.high = high
        self.free: deque[int] = deque()
        self.used = 0

    def take(self) -> int:
        if self.free:
            port = self.free.popleft()
        elif self.next <= self.high:
            port = self.next
            self.next += 1
        else:
            return -1
        self.used += 1
        return port

    def give(self, port: int) -> None:
        self.free.append(port)
        self.used -= 1


def _routing_pending(buf: bytearray, info: PacketInfo) -> bool:
    """True if a Routing header has segments left: the address we see is not the final one."""
    nh = buf[6]
    off = 40
    stop = info.l4_off
    while off < stop:
        if nh == NH_ROUTING and buf[off + 3]:
            return True
        if nh == NH_FRAGMENT:
            size = 8
        elif nh == NH_AH:
            size = (buf[off + 1] + 2) << 2
        else:
            size = (buf[off + 1] + 1) << 3
        nh = buf[off]
        off += size
    return False


class NatForwarder:
    """The ``nat`` mode as a forwarder: (packet, ingress port, now) -> verdict.

    :data:`PORT_OUTSIDE` faces clients, :data:`PORT_INSIDE` backends. The hop
    limit is decremented (a routed mode) and a packet arriving with 1 or 0 is
    answered with Time Exceeded; the flow label is kept. ``counters`` counts
    drops by reason and the outcomes ``new``, ``hit``, ``expired``, ``evicted``,
    ``reopened``, ``backend-down``, ``icmp-error``, ``ptb-below-1280`` and
    ``fragment``. Call :meth:`expire` now and then (entries also expire lazily
    when looked up).
    """

    def __init__(
        self,
        services: Sequence[NatService],
        icmp_source: str | bytes | ipaddress.IPv6Address,
        *,
        conntrack_max: int = 262_144,
        timeouts: Mapping[State | str, float] | None = None,
        seed: int = 0,
        icmp_rate: float = 100.0,
        icmp_burst: float = 20.0,
        decrement_hop_limit: bool = True,
        frag_timeout: float = FRAG_TIMEOUT,
        frag_max: int = 4096,
    ) -> None:
        if not services:
            raise ValueError("a nat forwarder needs at least one VIP")
        self.services = list(services)
        self.seed = seed
        self.icmp = IcmpErrorSource(a16(icmp_source), icmp_rate, icmp_burst)
        self._counters = Counters()
        self.conntrack = Conntrack(conntrack_max, timeouts=timeouts, counters=self._counters)
        self.conntrack.on_remove = self._released
        self.decrement_hop_limit = decrement_hop_limit
        self._dec = 1 if decrement_hop_limit else 0
        self._hl_min = 2 if decrement_hop_limit else 0
        self.frag_timeout = frag_timeout
        self.frag_max = frag_max
        self._vips: dict[tuple[bytes, int, int], NatService] = {}
        self._echo: dict[bytes, NatService] = {}
        self._backend_addrs: set[bytes] = set()
        for svc in self.services:
            for port in svc.ports:
                k = (svc.address, svc.proto, port)
                if k in self._vips:
                    raise ValueError(f"{svc.name} and {self._vips[k].name} both claim port {port}")
                self._vips[k] = svc
            self._echo.setdefault(svc.address, svc)
            self._backend_addrs.update(svc.pool.addresses)
        self._spaces: dict[tuple[bytes, bytes, int, int], _PortSpace] = {}
        self._frags: tuple[OrderedDict[bytes, tuple[Conn, float]], ...] = (
            OrderedDict(),
            OrderedDict(),
        )
        self._info = PacketInfo()
        self._qinfo = PacketInfo()
        self._error_conn: Conn | None = None  # the flow the last ICMPv6 error quoted
        tables = self.conntrack.tables
        self._orig_tcp = tables[ORIG][NH_TCP]
        self._orig_udp = tables[ORIG][NH_UDP]
        self._reply_tcp = tables[REPLY][NH_TCP]
        self._reply_udp = tables[REPLY][NH_UDP]
        self._timeouts = self.conntrack.timeouts
        self._lru = self.conntrack.lru

    # --- observation ---------------------------------------------------------------

    @property
    def counters(self) -> Counters:
        c = self._counters
        # conntrack hits: every packet of a flow forwarded, but its first and its later
        # fragments (each VIP counts its flows' packets; the hot path counts nothing else)
        hits = sum(s.traffic_in[0] + s.traffic_out[0] - s.new_flows for s in self.services)
        hits -= c.extra.get("fragment", 0)
        if hits > 0:
            c.extra["hit"] = hits
        return c

    def flows(self) -> Iterator[Conn]:
        return iter(self.conntrack)

    def expire(self, now: float, budget: int = 1 << 62) -> int:
        """Sweep expired flows and fragment records, at most ``budget`` of each."""
        n = self.conntrack.expire(now, budget)
        for frags in self._frags:
            while frags and budget > 0:
                key, (_, expires) = next(iter(frags.items()))
                if expires > now:
                    break
                del frags[key]
                budget -= 1
        return n

    # --- the forwarder ---------------------------------------------------------------

    def process(self, buf: bytearray, port: int, now: float) -> Verdict:
        out = self.fast(buf, len(buf), port, now)
        if out >= 0:
            return (FORWARD, out, buf)
        return self._process(buf, port, now)

    def fast(
        self, buf: bytearray | memoryview, n: int, port: int, now: float, partial: int = 0
    ) -> int:
        """The fast path of :meth:`process` for the packet ``buf[:n]``: the out port, or -1.

        TCP or UDP without extension headers, of a tracked flow, that changes
        no state: rewritten in place and counted, and the out port returned.
        Everything it checks, the general path checks too; on -1 nothing was
        changed and the packet must go to :meth:`process`. ``buf`` may be longer
        than the packet (a data plane's preallocated read buffer).

        ``partial``: the transport checksum field holds only the pseudo-header
        sum, to be completed later (Linux's CHECKSUM_PARTIAL, a virtio-net
        header's NEEDS_CSUM). Then only the address change goes into it: the
        new ports are summed when the checksum is completed.
        """
        nh = buf[6] if n >= 48 else 0
        ev: int
        if nh == NH_TCP and n >= 60:
            v, plen, _, hl, key, doff, flags, ck = _TCP_HDR.unpack_from(buf)
            ok = doff >= 0x50 and 40 + ((doff >> 4) << 2) <= n
            ev = TCP_EVENTS[flags & 0x17]
            coff = 56
        elif nh == NH_UDP:
            v, plen, _, hl, key, ulen, ck = _UDP_HDR.unpack_from(buf)
            ok = ulen == plen
            ev = Event.DGRAM
            coff = 46
        else:
            return -1
        if ok and v >> 4 == 6 and plen + 40 == n and hl >= self._hl_min:
            if port == PORT_INSIDE:
                conn = (self._reply_tcp if nh == NH_TCP else self._reply_udp).get(key)
                if conn is None:
                    return -1
                rw = conn.rw_reply
                delta = conn.pdelta_reply if partial else conn.delta_reply
                ev |= 8  # REPLY << 3
                out = PORT_OUTSIDE
                ctr = conn.ctr_reply
            else:
                conn = (self._orig_tcp if nh == NH_TCP else self._orig_udp).get(key)
                if conn is None:
                    return -1
                rw = conn.rw_orig
                delta = conn.pdelta_orig if partial else conn.delta_orig
                out = PORT_INSIDE
                ctr = conn.ctr_orig
            st = conn.state
            if (
                conn.expires > now
                and NEXT[(st << 4) | ev] == st
                and conn.generation == conn.pool.generation
            ):
                _PUT_HDR.pack_into(buf, 7, hl - self._dec, rw)
                if partial:
                    _U16.pack_into(buf, coff, (ck + delta) % _M)
                elif ck or nh == NH_TCP:  # a UDP checksum of 0 ("none") stays 0
                    ck = (ck + delta) % _M
                    _U16.pack_into(buf, coff, ck or (0xFFFF if nh == NH_UDP else 0))
                conn.expires = now + self._timeouts[st]
                self._lru[st].move_to_end(conn)
                self._counters.forwarded += 1
                ctr[0] += 1  # the VIP's packets and bytes, this direction
                ctr[1] += n
                return out
        return -1

    # --- the general path --------------------------------------------------------------

    def _drop(self, reason: int) -> Verdict:
        self._counters.drops[reason] += 1
        return (DROP, reason, None)

    def _time_exceeded(self, buf: bytearray, port: int, now: float) -> Verdict:
        return self.icmp.answer(
            self._counters, buf, _R_HOP, ICMP6_TIME_EXCEEDED, TE_HOP_LIMIT, 0, port, now
        )

    def _forward(self, buf: bytearray, out: int) -> Verdict:
        buf[7] -= self._dec
        self._counters.forwarded += 1
        return (FORWARD, out, buf)

    def _unsupported_or_no_match(self, buf: bytearray, inside: bool) -> Verdict:
        # Unparseable traffic of ours is "unsupported"; anyone else's is "no-match".
        if inside:
            ours = bytes(buf[8:24]) in self._backend_addrs
        else:
            ours = bytes(buf[24:40]) in self._echo
        return self._drop(_R_UNSUPPORTED if ours else _R_NO_MATCH)

    def _process(self, buf: bytearray, port: int, now: float) -> Verdict:
        info = self._info
        rc = parse(buf, info) or validate_l4(buf, info)
        if rc:
            return self._drop(rc)
        inside = port == PORT_INSIDE
        if info.later_fragment:
            return self._later_fragment(buf, info, inside, port, now)
        proto = info.proto
        l4 = info.l4_off
        if proto in (NH_TCP, NH_UDP):
            key = bytes(buf[8:40]) + bytes(buf[l4 : l4 + 4])
            ev = TCP_EVENTS[buf[l4 + 13] & 0x17] if proto == NH_TCP else Event.DGRAM
        elif proto == NH_ICMPV6:
            t = buf[l4]
            if t < 128:
                return self._icmp_error(buf, info, inside, port, now)
            if t != (ICMP6_ECHO_REPLY if inside else ICMP6_ECHO_REQUEST) or l4 + 8 > info.end:
                return self._drop(_R_NO_MATCH)
            key = bytes(buf[8:40]) + bytes(buf[l4 + 4 : l4 + 6]) + b"\0\0"
            ev = Event.ECHO
        else:
            return self._unsupported_or_no_match(buf, inside)
        if info.n_ext and _routing_pending(buf, info):
            return self._unsupported_or_no_match(buf, inside)
        ct = self.conntrack
        conn = ct.lookup(REPLY if inside else ORIG, proto, key, now)
        if conn is None:
            if inside:
                return self._drop(_R_NO_MATCH)
            return self._new_flow(buf, info, key, proto, ev, port, now)
        pool: BackendPool = conn.pool
        if conn.generation != pool.generation:
            if not pool.keeps_existing(conn.backend):
                # The backend is down: forget the flow. A packet that can open a
                # flow is the client's retry and goes to a healthy backend now.
                ct.remove(conn, "backend-down")
                if inside or NEXT[ev] == INVALID:
                    return self._drop(_R_NO_BACKEND)
                return self._new_flow(buf, info, key, proto, ev, port, now)
            conn.generation = pool.generation
        direction = REPLY if inside else ORIG
        nxt = NEXT[(conn.state << 4) | (direction << 3) | ev]
        if nxt == INVALID:
            return self._drop(_R_INVALID)
        if nxt == REOPEN:
            ct.remove(conn, "reopened")
            return self._new_flow(buf, info, key, proto, ev, port, now)
        if buf[7] < self._hl_min:
            return self._time_exceeded(buf, port, now)
        ct.touch(conn, nxt, now)
        self._rewrite(buf, info, proto, conn, inside, now)
        ctr = conn.ctr_reply if inside else conn.ctr_orig
        ctr[0] += 1
        ctr[1] += len(buf)
        return self._forward(buf, PORT_OUTSIDE if inside else PORT_INSIDE)

    def _rewrite(
        self, buf: bytearray, info: PacketInfo, proto: int, conn: Conn, inside: bool, now: float
    ) -> None:
        """Rewrite addresses, ports (or the echo identifier) and the checksum, in place."""
        rw = conn.rw_reply if inside else conn.rw_orig
        delta = conn.delta_reply if inside else conn.delta_orig
        l4 = info.l4_off
        buf[8:40] = rw[:32]
        if proto == NH_ICMPV6:
            buf[l4 + 4 : l4 + 6] = rw[32:34]
        else:
            buf[l4 : l4 + 4] = rw[32:36]
        c = l4 + _CSUM_OFF[proto]
        ck = (buf[c] << 8) | buf[c + 1]
        if ck or proto != NH_UDP:
            ck = (ck + delta) % _M
            if proto == NH_UDP and not ck:
                ck = 0xFFFF  # RFC 8200 §8.1
            buf[c] = ck >> 8
            buf[c + 1] = ck & 0xFF
        if info.frag_off >= 0 and info.more_frags:
            self._remember_fragment(buf, info, conn, inside, now)

    # --- new flows ---------------------------------------------------------------------

    def _new_flow(
        self,
        buf: bytearray,
        info: PacketInfo,
        key: bytes,
        proto: int,
        ev: int,
        port: int,
        now: float,
    ) -> Verdict:
        dst = key[16:32]
        echo = proto == NH_ICMPV6
        if echo:
            svc = self._echo.get(dst)
            dport = 0
        else:
            dport = (key[34] << 8) | key[35]
            svc = self._vips.get((dst, proto, dport))
        if svc is None:
            return self._drop(_R_NO_MATCH)
        src = key[:16]
        if src[0] == 0xFF or src == _UNSPECIFIED:
            return self._drop(_R_NO_MATCH)  # RFC 4291 §2.5.2, §2.7: never a source
        state = NEXT[ev]  # the NONE row, originator direction
        if state == INVALID:
            return self._drop(_R_INVALID)
        if buf[7] < self._hl_min:
            return self._time_exceeded(buf, port, now)
        sport = (key[32] << 8) | key[33]
        pool = svc.pool
        i = pool.pick_flow(src, dst, sport, dport)
        if i < 0:
            return self._drop(_R_NO_BACKEND)
        baddr = pool.addresses[i]
        bport = 0 if echo else (pool.ports[i] or dport)
        space_key: tuple[bytes, bytes, int, int] | None = None
        if svc.snat is not None:
            xaddr = svc.snat_address(src, self.seed)
            space_key = (xaddr, baddr, bport, proto)
            xport = self._take_port(space_key, svc.snat_ports)
            if xport < 0:
                # Expired flows may still hold ports: sweep them (the cost is
                # the number removed), then try once more.
                self.conntrack.expire(now)
                xport = self._take_port(space_key, svc.snat_ports)
            if xport < 0:
                return self._drop(_R_PORTS)
        else:
            xaddr, xport = src, sport
        if echo:
            rw_orig = xaddr + baddr + _PORTS.pack(xport, 0)
            key_reply = baddr + xaddr + _PORTS.pack(xport, 0)
            rw_reply = dst + src + _PORTS.pack(sport, 0)
        else:
            rw_orig = xaddr + baddr + _PORTS.pack(xport, bport)
            key_reply = baddr + xaddr + _PORTS.pack(bport, xport)
            rw_reply = dst + src + _PORTS.pack(dport, sport)
        ct = self.conntrack
        reason = 0
        if ct.lookup(REPLY, proto, key_reply, now) is not None:
            reason = _R_CLASH
        elif not ct.admit(now):
            reason = _R_FULL
        if reason:
            if space_key is not None:
                self._give_port(space_key, xport)
            return self._drop(reason)
        conn = Conn(proto, key, key_reply)
        conn.rw_orig = rw_orig
        conn.rw_reply = rw_reply
        conn.delta_orig = update(0, key, rw_orig)
        conn.delta_reply = update(0, key_reply, rw_reply)
        conn.pdelta_orig = (_M - update(0, key[:32], rw_orig[:32])) % _M
        conn.pdelta_reply = (_M - update(0, key_reply[:32], rw_reply[:32])) % _M
        conn.pool = pool
        conn.backend = i
        conn.generation = pool.generation
        conn.service = svc
        conn.ctr_orig = svc.traffic_in
        conn.ctr_reply = svc.traffic_out
        conn.snat = space_key
        conn.snat_port = xport
        ct.insert(conn, state, now)
        svc.new_flows += 1
        svc.active_flows += 1
        svc.backend_new_flows[i] += 1
        svc.backend_active_flows[i] += 1
        self._rewrite(buf, info, proto, conn, False, now)
        svc.traffic_in[0] += 1
        svc.traffic_in[1] += len(buf)
        return self._forward(buf, PORT_INSIDE)

    def _take_port(self, space_key: tuple[bytes, bytes, int, int], ports: tuple[int, int]) -> int:
        space = self._spaces.get(space_key)
        if space is None:
            space = self._spaces[space_key] = _PortSpace(*ports)
        return space.take()

    def _give_port(self, space_key: tuple[bytes, bytes, int, int], port: int) -> None:
        space = self._spaces[space_key]
        space.give(port)
        if not space.used:
            del self._spaces[space_key]  # idle spaces cost nothing

    def _released(self, conn: Conn) -> None:
        svc: NatService | None = conn.service
        if svc is not None:
            svc.active_flows -= 1
            svc.backend_active_flows[conn.backend] -= 1
        if conn.snat is not None:
            self._give_port(conn.snat, conn.snat_port)

    # --- fragments ---------------------------------------------------------------------

    def _remember_fragment(
        self, buf: bytearray, info: PacketInfo, conn: Conn, inside: bool, now: float
    ) -> None:
        # Keyed by the untranslated (source, destination, identification): the
        # rewrite already happened, so rebuild the original addresses.
        fo = info.frag_off
        orig = conn.key_reply if inside else conn.key_orig
        fkey = orig[:32] + bytes(buf[fo + 4 : fo + 8])
        frags = self._frags[inside]
        if fkey in frags:
            del frags[fkey]
        elif len(frags) >= self.frag_max:
            frags.popitem(last=False)
        frags[fkey] = (conn, now + self.frag_timeout)

    def _later_fragment(
        self, buf: bytearray, info: PacketInfo, inside: bool, port: int, now: float
    ) -> Verdict:
        """A non-first fragment: the first fragment of its datagram made the decision."""
        fo = info.frag_off
        fkey = bytes(buf[8:40]) + bytes(buf[fo + 4 : fo + 8])
        frags = self._frags[inside]
        entry = frags.get(fkey)
        if entry is not None and (entry[1] <= now or not entry[0].alive):
            del frags[fkey]
            entry = None
        if entry is None:
            if inside:
                ours = bytes(buf[8:24]) in self._backend_addrs
            else:
                ours = bytes(buf[24:40]) in self._echo
            return self._drop(_R_FRAG if ours else _R_NO_MATCH)
        if buf[7] < self._hl_min:
            return self._time_exceeded(buf, port, now)
        conn = entry[0]
        # Addresses only: the ports and the checksum are in the first fragment.
        buf[8:40] = (conn.rw_reply if inside else conn.rw_orig)[:32]
        self._counters.bump("fragment")
        ctr = conn.ctr_reply if inside else conn.ctr_orig
        ctr[0] += 1
        ctr[1] += len(buf)
        return self._forward(buf, PORT_OUTSIDE if inside else PORT_INSIDE)

    # --- ICMPv6 errors -----------------------------------------------------------------

    def _icmp_error(
        self, buf: bytearray, info: PacketInfo, inside: bool, port: int, now: float
    ) -> Verdict:
        """:meth:`_translate_error`, counted per VIP: translated, or (from outside) unmatched."""
        verdict = self._translate_error(buf, info, inside, port, now)
        if verdict[0] == FORWARD:
            conn = self._error_conn
            if conn is not None and conn.service is not None:
                conn.service.icmp_translated += 1
        elif not inside and verdict[1] in (_R_UNMATCHED, _R_QUOTE_BAD):
            svc = self._echo.get(bytes(buf[24:40]))
            if svc is not None:
                svc.icmp_unmatched += 1
        return verdict

    def _translate_error(
        self, buf: bytearray, info: PacketInfo, inside: bool, port: int, now: float
    ) -> Verdict:
        """Translate an error about a tracked flow: outer header, quoted packet, checksums.

        From outside, the quote is a reply as we translated it (VIP -> client);
        it becomes the reply as the backend sent it, and the error goes to the
        backend. From inside, the quote is a client packet as we translated it
        (client or SNAT address -> backend); it becomes the client's packet, and
        the error goes to the client from the VIP, as Linux's NAT does, so no
        inside address leaks out.
        """
        self._error_conn = None
        l4 = info.l4_off
        t = buf[l4]
        if t not in _ERRORS:
            return self._unsupported_or_no_match(buf, inside)
        q = l4 + 8
        qi = self._qinfo
        n = len(buf)
        if parse(buf, qi, q, strict_length=False):
            return self._drop(_R_QUOTE_BAD)
        if qi.later_fragment:
            return self._drop(_R_UNMATCHED)
        qp = qi.proto
        ql4 = qi.l4_off
        if qp in (NH_TCP, NH_UDP):
            if ql4 + 4 > n:
                return self._drop(_R_QUOTE_BAD)
            old_ports = bytes(buf[ql4 : ql4 + 4])
            key = bytes(buf[q + 24 : q + 40]) + bytes(buf[q + 8 : q + 24])
            key += old_ports[2:] + old_ports[:2]
        elif qp == NH_ICMPV6:
            if ql4 + 6 > n:
                return self._drop(_R_QUOTE_BAD)
            if buf[ql4] != (ICMP6_ECHO_REQUEST if inside else ICMP6_ECHO_REPLY):
                return self._drop(_R_UNMATCHED)
            old_ports = bytes(buf[ql4 + 4 : ql4 + 6])
            key = bytes(buf[q + 24 : q + 40]) + bytes(buf[q + 8 : q + 24]) + old_ports + b"\0\0"
        else:
            return self._drop(_R_UNMATCHED)
        # The error must be addressed to the quoted packet's source.
        if buf[24:40] != buf[q + 8 : q + 24]:
            return self._drop(_R_UNMATCHED)
        conn = self.conntrack.lookup(REPLY if inside else ORIG, qp, key, now)
        self._error_conn = conn
        if conn is None:
            return self._drop(_R_UNMATCHED)
        if buf[7] < self._hl_min:
            return self._drop(_R_HOP)  # never an error about an error (RFC 4443 §2.4 e)
        # What the quote was before we translated it: the other direction's key.
        nq = conn.key_orig if inside else conn.key_reply
        if inside:
            outer = conn.rw_reply[:32]  # from the VIP to the client
        elif conn.snat is not None:
            outer = conn.rw_orig[:32]  # from the SNAT address to the backend
        else:
            outer = bytes(buf[8:24]) + conn.rw_orig[16:32]  # to the backend
        c = l4 + 2
        ck = (buf[c] << 8) | buf[c + 1]
        ck = update(ck, buf[8:40], outer)
        buf[8:40] = outer
        old_inner = bytes(buf[q + 8 : q + 40]) + old_ports
        if qp == NH_ICMPV6:
            new_ports = nq[32:34]
            buf[ql4 + 4 : ql4 + 6] = new_ports
        else:
            new_ports = nq[32:36]
            buf[ql4 : ql4 + 4] = new_ports
        buf[q + 8 : q + 40] = nq[:32]
        ck = update(ck, old_inner, nq[:32] + new_ports)
        qc = ql4 + _CSUM_OFF[qp]
        if qc + 2 <= n:  # the quoted transport checksum, if it was quoted
            qck = (buf[qc] << 8) | buf[qc + 1]
            if qck or qp != NH_UDP:
                new_qck = update(qck, old_inner, nq[:32] + new_ports)
                if qp == NH_UDP and not new_qck:
                    new_qck = 0xFFFF
                buf[qc] = new_qck >> 8
                buf[qc + 1] = new_qck & 0xFF
                ck = update16(ck, qck, new_qck)
        buf[c] = ck >> 8
        buf[c + 1] = ck & 0xFF
        if t == ICMP6_PACKET_TOO_BIG and int.from_bytes(buf[l4 + 4 : l4 + 8], "big") < MIN_MTU:
            # RFC 8201 §4: the receiving node discards it; we relay it unchanged.
            self._counters.bump("ptb-below-1280")
        self._counters.bump("icmp-error")
        return self._forward(buf, PORT_OUTSIDE if inside else PORT_INSIDE)
