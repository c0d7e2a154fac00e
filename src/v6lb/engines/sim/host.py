"""A minimal host stack: UDP, and a TCP that is just enough to show what load balancers do.

TCP here: three-way handshake with the MSS option, in-order data, cumulative
ACKs, FIN in both directions, RST, retransmission on a timer (doubling, a few
tries), and Path MTU discovery (RFC 8201): a Packet Too Big lowers the path MTU
cached for the destination (never below 1280) and the unacknowledged data is
sent again in smaller segments. No windows, no congestion control, no
reordering buffer: the simulator's links do not reorder.

Every segment and datagram is verified (checksum) on arrival; a bad one is
dropped with the reason ``bad-checksum``, so a translator that breaks a
checksum shows up in the hop list.

Each segment is sent on a *leg* that says what it is for (``handshake``,
``request`` for data from the side that connected, ``response`` for data from
the side that accepted, ``ack`` for pure acknowledgements, ``close`` for FINs,
``reset``), with a note in the sender's words (:func:`describe_segment`, or
the connection's own ``describe`` hook, which a proxy uses to say what it
relays).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from v6lb.wire import build
from v6lb.wire.checksum import verify
from v6lb.wire.constants import (
    DU_PORT_UNREACH,
    ICMP6_DST_UNREACH,
    ICMP6_ECHO_REQUEST,
    ICMP6_PACKET_TOO_BIG,
    ICMP6_TIME_EXCEEDED,
    MIN_MTU,
    NH_ICMPV6,
    NH_TCP,
    NH_UDP,
    TCP_ACK,
)
from v6lb.wire.ipv6 import PacketInfo, parse

if TYPE_CHECKING:
    from v6lb.engines.sim.node import SimNode

__all__ = ["HostStack", "TcpConn", "TcpState"]

FIN, SYN, RST, PSH = 0x01, 0x02, 0x04, 0x08
RTO_INITIAL = 0.2
MAX_RETRIES = 3
_M32 = 0xFFFFFFFF
DEFAULT_PEER_MSS = 1220  # RFC 8200 §5 minimum MTU - 60: assumed until the peer says


def _after(a: int, b: int) -> bool:
    """a > b in sequence space (RFC 793 §3.3)."""
    return a != b and ((a - b) & _M32) < 0x80000000


class TcpState(StrEnum):
    SYN_SENT = "syn-sent"
    SYN_RCVD = "syn-received"
    ESTABLISHED = "established"
    FIN_WAIT_1 = "fin-wait-1"
    FIN_WAIT_2 = "fin-wait-2"
    CLOSE_WAIT = "close-wait"
    CLOSING = "closing"
    LAST_ACK = "last-ack"
    TIME_WAIT = "time-wait"
    CLOSED = "closed"


@dataclass
class _Seg:
    seq: int
    flags: int
    data: bytes

    @property
    def end(self) -> int:
        return (self.seq + len(self.data) + (1 if self.flags & (SYN | FIN) else 0)) & _M32


def _noop(*_: object) -> None:
    return None


Describe = Callable[["TcpConn", int, bytes], str]  # (conn, flags, payload) -> note, "" for default

_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ")
_CLOSED_BY_PEER = ("close-wait", "last-ack", "closing", "time-wait")


def first_line(data: bytes) -> str:
    """The first line of an HTTP message in ``data`` (request or status line), or ""."""
    if not (data.startswith(_METHODS) or data.startswith(b"HTTP/")):
        return ""
    return data.split(b"\r\n", 1)[0].decode("latin-1")


def describe_segment(conn: TcpConn, flags: int, data: bytes) -> str:
    """What a host says about a segment it sends: why it sends it, not what is in the header."""
    node = conn.stack.node
    who = node.name
    peer = node.net.label(conn.remote)
    # DSR: the address we answer from is on our loopback, not on a link.
    on_lo = conn.local in node.local and all(conn.local not in a for a in node.ifaces.values())
    lo = node.net.label(conn.local).removeprefix("the ")
    direct = f" straight to {peer} ({lo} on lo)" if on_lo else ""
    if flags & RST:
        return f"{who} resets the connection"
    if flags & SYN:
        if not flags & TCP_ACK:
            return f"{who} opens TCP to {peer}"
        if direct:
            return f"{who} accepts, replying{direct}"
        return f"{who} accepts the connection from {peer}"
    if data:
        line = first_line(data)
        if conn.active:
            what = f"the HTTP request: {line.rsplit(' ', 1)[0]}" if line else "more request data"
            return f"{who} sends {what}"
        what = f"answers: {line.split(' ', 1)[-1]}" if line else "sends more response data"
        return f"{who} {what}" + (f",{direct}" if direct else "")
    if flags & FIN:
        if conn.state == TcpState.LAST_ACK:
            return f"{who} closes its side too (FIN)"
        return f"{who} is done and closes its side (FIN)"
    if conn.state in _CLOSED_BY_PEER:
        return f"{who} acknowledges the FIN"
    if conn.active and conn.snd_una == conn.snd_nxt == (conn.iss + 1) & _M32:
        return f"{who} completes the handshake"
    return f"{who} acknowledges the " + ("response" if conn.active else "request")


@dataclass(eq=False)
class TcpConn:
    """One TCP connection. Apps set the ``on_*`` callbacks and call :meth:`send`/:meth:`close`."""

    stack: HostStack
    local: bytes
    lport: int
    remote: bytes
    rport: int
    active: bool
    state: TcpState = TcpState.CLOSED
    iss: int = 0
    snd_una: int = 0
    snd_nxt: int = 0
    rcv_nxt: int = 0
    peer_mss: int = DEFAULT_PEER_MSS
    inflight: list[_Seg] = field(default_factory=list)
    retries: int = 0
    rto: float = RTO_INITIAL
    close_reason: str | None = None
    errors: list[str] = field(default_factory=list)
    retransmits: int = 0
    on_established: Callable[[TcpConn], None] = _noop
    on_data: Callable[[TcpConn, bytes], None] = _noop
    on_peer_close: Callable[[TcpConn], None] = _noop
    on_closed: Callable[[TcpConn, str], None] = _noop
    describe: Describe | None = None  # the note for a segment we send ("" or None: the default)
    _timer: int = 0
    _last_ack_sent: int = -1
    _fin_queued: bool = False
    _why_resent: str = ""

    @property
    def remote_text(self) -> str:
        return f"[{ipaddress.IPv6Address(self.remote)}]:{self.rport}"

    @property
    def leg(self) -> str:
        """The leg of the data we send: a client's requests, or a server's responses."""
        return "request" if self.active else "response"

    def mss(self) -> int:
        return min(self.peer_mss, self.stack.path_mtu(self.remote, self.local) - 60)

    # --- app interface ---------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.state not in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            raise RuntimeError(f"send in state {self.state}")
        mss = self.mss()
        for i in range(0, len(data), mss):
            chunk = data[i : i + mss]
            seg = _Seg(self.snd_nxt, TCP_ACK | PSH, chunk)
            self.snd_nxt = seg.end
            self.inflight.append(seg)
            self._emit(seg)
        self._arm()

    def close(self) -> None:
        """Send our FIN (after any queued data, which is always already sent here)."""
        if self.state == TcpState.ESTABLISHED:
            self.state = TcpState.FIN_WAIT_1
        elif self.state == TcpState.CLOSE_WAIT:
            self.state = TcpState.LAST_ACK
        elif self.state in (TcpState.SYN_SENT, TcpState.SYN_RCVD):
            self.abort("closed")
            return
        else:
            return
        seg = _Seg(self.snd_nxt, FIN | TCP_ACK, b"")
        self.snd_nxt = seg.end
        self.inflight.append(seg)
        self._emit(seg)
        self._arm()

    def abort(self, reason: str, send_rst: bool = False) -> None:
        if send_rst and self.state != TcpState.CLOSED:
            self._raw(self.snd_nxt, RST | TCP_ACK, b"", "reset")
        self._finish(reason)

    # --- sending -----------------------------------------------------------------

    def _leg_for(self, flags: int, data: bytes = b"") -> str:
        if flags & SYN or self.state in (TcpState.SYN_SENT, TcpState.SYN_RCVD):
            return "handshake"
        if flags & RST:
            return "reset"
        if flags & FIN:
            return "close"
        if data:
            return self.leg
        return "ack"

    def _note(self, flags: int, data: bytes) -> str:
        note = (self.describe(self, flags, data) if self.describe is not None else "") or (
            describe_segment(self, flags, data)
        )
        if self._why_resent:
            note += f"; {self._why_resent}"
        return note

    def _raw(self, seq: int, flags: int, data: bytes, leg: str, options: bytes = b"") -> None:
        note = self._note(flags, data)
        ack = self.rcv_nxt if flags & TCP_ACK else 0
        pkt = build.tcp(
            self.local,
            self.remote,
            self.lport,
            self.rport,
            seq=seq,
            ack=ack,
            flags=flags,
            options=options,
            payload=data,
        )
        if flags & TCP_ACK:
            self._last_ack_sent = self.rcv_nxt
        self.stack.node.originate(pkt, leg, note=note)

    def _emit(self, seg: _Seg) -> None:
        opts = b""
        if seg.flags & SYN:
            # RFC 9293 §3.7.1: the MSS option, from our side's link MTU, or the route's
            # advmss for replies from a tunnel VIP (`v6lb backend`'s return routes).
            mss = self.stack.link_mtu(self.remote) - 60
            mss = min(mss, self.stack.advmss.get(self.local, mss))
            opts = struct.pack("!BBH", 2, 4, mss)
        self._raw(seg.seq, seg.flags, seg.data, self._leg_for(seg.flags, seg.data), opts)

    def _arm(self) -> None:
        if not self.inflight:
            return
        self._timer += 1
        token = self._timer
        self.stack.node.net.clock.after(self.rto, lambda: self._timeout(token))

    def _timeout(self, token: int) -> None:
        if token != self._timer or not self.inflight or self.state == TcpState.CLOSED:
            return
        self.retries += 1
        if self.retries > MAX_RETRIES:
            self._finish("timeout")
            return
        self.rto *= 2
        self._resend(f"retransmitted: no ACK within {self.rto / 2:g} s")

    def _resend(self, why: str) -> None:
        """Send every unacknowledged segment again, re-cut to the current MSS."""
        segs = self.inflight
        if segs and not segs[0].flags & SYN:
            fin = bool(segs[-1].flags & FIN)
            data = b"".join(s.data for s in segs)
            seq = segs[0].seq
            mss = self.mss()
            new: list[_Seg] = []
            for i in range(0, len(data), mss):
                new.append(_Seg((seq + i) & _M32, TCP_ACK | PSH, data[i : i + mss]))
            if fin:
                new.append(_Seg((seq + len(data)) & _M32, FIN | TCP_ACK, b""))
            self.inflight = segs = new
        self._why_resent = why
        for seg in segs:
            self.retransmits += 1
            self._emit(seg)
        self._why_resent = ""
        self._arm()

    def packet_too_big(self, mtu: int) -> None:
        """RFC 8201 §4: lower the path MTU and send the unacknowledged data again, smaller."""
        old = self.mss()
        self.stack.set_path_mtu(self.remote, mtu)
        if self.mss() < old and self.inflight:
            self.errors.append(f"packet too big: mtu {mtu}")
            self._resend(f"resent in {self.mss()}-byte segments after Packet Too Big (MTU {mtu})")

    # --- receiving -----------------------------------------------------------------

    def segment(self, seq: int, ack: int, flags: int, data: bytes, options: bytes) -> None:
        if flags & RST:
            self._finish("reset")
            return
        if self.state == TcpState.SYN_SENT:
            if flags & SYN and flags & TCP_ACK and ack == self.snd_nxt:
                self.rcv_nxt = (seq + 1) & _M32
                self.peer_mss = _mss_option(options, self.peer_mss)
                self._acked(ack)
                self.state = TcpState.ESTABLISHED
                self._raw(self.snd_nxt, TCP_ACK, b"", "handshake")
                self.on_established(self)
            return
        if flags & SYN:
            if self.state == TcpState.SYN_RCVD and self.inflight:
                self._emit(self.inflight[0])  # the client's SYN again: our SYN-ACK was lost
            else:
                # A retransmitted SYN-ACK: our ACK was lost; say it again.
                self._raw(self.snd_nxt, TCP_ACK, b"", "handshake")
            return
        if flags & TCP_ACK:
            self._acked(ack)
        if self.state == TcpState.SYN_RCVD:
            if not self.inflight:
                self.state = TcpState.ESTABLISHED
                self.stack.accepted(self)
            else:
                return
        if seq != self.rcv_nxt:
            if data or flags & FIN:
                self._raw(self.snd_nxt, TCP_ACK, b"", "ack")  # duplicate ACK
            return
        if data:
            self.rcv_nxt = (self.rcv_nxt + len(data)) & _M32
            if self.state in (TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2):
                self.on_data(self, data)
        if flags & FIN:
            self.rcv_nxt = (self.rcv_nxt + 1) & _M32
            if self.state == TcpState.ESTABLISHED:
                self.state = TcpState.CLOSE_WAIT
                self._raw(self.snd_nxt, TCP_ACK, b"", "ack")
                self.on_peer_close(self)
            elif self.state == TcpState.FIN_WAIT_1:
                self.state = TcpState.CLOSING
                self._raw(self.snd_nxt, TCP_ACK, b"", "ack")
            elif self.state == TcpState.FIN_WAIT_2:
                self.state = TcpState.TIME_WAIT
                self._raw(self.snd_nxt, TCP_ACK, b"", "ack")
                self._finish("closed")
            return
        if data and self._last_ack_sent != self.rcv_nxt:
            self._raw(self.snd_nxt, TCP_ACK, b"", "ack")

    def _acked(self, ack: int) -> None:
        if not _after(ack, self.snd_una):
            return
        self.snd_una = ack
        self.inflight = [s for s in self.inflight if _after(s.end, ack)]
        self.retries = 0
        self.rto = RTO_INITIAL
        self._timer += 1  # cancel the running timer
        if self.inflight:
            self._arm()
        elif ack == self.snd_nxt:
            if self.state == TcpState.FIN_WAIT_1:
                self.state = TcpState.FIN_WAIT_2
            elif self.state == TcpState.CLOSING:
                self.state = TcpState.TIME_WAIT
                self._finish("closed")
            elif self.state == TcpState.LAST_ACK:
                self._finish("closed")

    def _finish(self, reason: str) -> None:
        if self.close_reason is not None:
            return
        self.close_reason = reason
        if self.state != TcpState.TIME_WAIT:
            self.state = TcpState.CLOSED
        self._timer += 1
        self.inflight = []
        self.stack.forget(self)
        self.on_closed(self, reason)


def _mss_option(options: bytes, default: int) -> int:
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(options):
            break
        ln = options[i + 1]
        if kind == 2 and ln == 4 and i + 4 <= len(options):
            return int.from_bytes(options[i + 2 : i + 4], "big")
        i += max(ln, 2)
    return default


ConnKey = tuple[bytes, int, bytes, int]
UdpHandler = Callable[[bytes, int, bytes, int, bytes], None]  # src, sport, dst, dport, payload


class HostStack:
    """TCP and UDP of one node: listeners, connections, UDP ports and the path MTU cache."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.listeners: dict[tuple[bytes | None, int], Callable[[TcpConn], None]] = {}
        self.describers: dict[tuple[bytes | None, int], Describe] = {}
        self.conns: dict[ConnKey, TcpConn] = {}
        self.closed: list[TcpConn] = []
        self.udp: dict[int, UdpHandler] = {}
        self.pmtu: dict[bytes, int] = {}
        self.advmss: dict[bytes, int] = {}  # local address -> the MSS its routes advertise
        self._next_port = 49152 + (node.index * 101) % 4096
        self._isn = (node.index * 0x9E3779B1) & _M32
        self._info = PacketInfo()

    # --- path MTU ----------------------------------------------------------------

    def link_mtu(self, dst: bytes) -> int:
        from v6lb.model.topology import lookup

        entry = lookup(self.node.fib, ipaddress.IPv6Address(dst), None)
        if entry is None:
            return MIN_MTU
        return self.node.net.mtu(entry.nexthops[0].link)

    def path_mtu(self, dst: bytes, src: bytes | None = None) -> int:
        return min(self.pmtu.get(dst, 1 << 16), self.link_mtu(dst))

    def set_path_mtu(self, dst: bytes, mtu: int) -> None:
        # RFC 8201 §4: never below the IPv6 minimum; only ever lowered by a PTB.
        self.pmtu[dst] = max(MIN_MTU, min(mtu, self.path_mtu(dst)))

    # --- TCP -----------------------------------------------------------------------

    def ephemeral_port(self) -> int:
        port = self._next_port
        self._next_port = 49152 + (self._next_port - 49152 + 1) % 16384
        return port

    def _new_isn(self) -> int:
        self._isn = (self._isn + 0x01000193 * 64000) & _M32
        return self._isn

    def listen(
        self,
        port: int,
        on_accept: Callable[[TcpConn], None],
        addr: bytes | None = None,
        describe: Describe | None = None,
    ) -> None:
        """Accept connections to ``port``; ``describe`` notes their segments from the SYN-ACK on."""
        self.listeners[(addr, port)] = on_accept
        if describe is not None:
            self.describers[(addr, port)] = describe

    def connect(
        self,
        dst: bytes,
        dport: int,
        *,
        src: bytes | None = None,
        sport: int | None = None,
        describe: Describe | None = None,
    ) -> TcpConn:
        local = src if src is not None else self.node.source_for(dst)
        lport = sport if sport is not None else self.ephemeral_port()
        conn = TcpConn(self, local, lport, dst, dport, True, describe=describe)
        conn.iss = conn.snd_una = self._new_isn()
        conn.state = TcpState.SYN_SENT
        self.conns[(local, lport, dst, dport)] = conn
        seg = _Seg(conn.iss, SYN, b"")
        conn.snd_nxt = seg.end
        conn.inflight.append(seg)
        conn._emit(seg)
        conn._arm()
        return conn

    def accepted(self, conn: TcpConn) -> None:
        cb = self.listeners.get((conn.local, conn.lport)) or self.listeners.get((None, conn.lport))
        if cb is not None:
            cb(conn)
        conn.on_established(conn)

    def forget(self, conn: TcpConn) -> None:
        self.conns.pop((conn.local, conn.lport, conn.remote, conn.rport), None)
        self.closed.append(conn)

    # --- UDP -----------------------------------------------------------------------

    def udp_bind(self, port: int, handler: UdpHandler) -> None:
        self.udp[port] = handler

    def udp_send(
        self, dst: bytes, dport: int, payload: bytes, *, src: bytes | None = None, sport: int = 0
    ) -> int:
        local = src if src is not None else self.node.source_for(dst)
        pkt = build.udp(local, dst, sport or self.ephemeral_port(), dport, payload)
        note = f"{self.node.name} sends a UDP datagram to {self.node.net.label(dst)}"
        return self.node.originate(pkt, "request", note=note)

    # --- receiving -------------------------------------------------------------------

    def receive(
        self,
        data: bytearray,
        link: str,
        sender: str,
        pid: int,
        leg: str,
        decapsulated: bool = False,
    ) -> None:
        info = self._info
        net = self.node.net
        name = self.node.name
        if parse(data, info) or info.later_fragment:
            net.drop(name, link, sender, data, pid, leg, "malformed")
            return
        l4 = info.l4_off
        seg = memoryview(data)[l4 : info.end]
        src, dst = bytes(data[8:24]), bytes(data[24:40])
        if info.proto in (NH_TCP, NH_UDP, NH_ICMPV6) and not verify(src, dst, info.proto, seg):
            net.drop(name, link, sender, data, pid, leg, "bad-checksum")
            return
        if info.proto == NH_TCP:
            self._tcp(data, l4, info.end, src, dst, link, sender, pid, leg)
        elif info.proto == NH_UDP:
            sport, dport = struct.unpack_from("!HH", data, l4)
            handler = self.udp.get(dport)
            if handler is None:
                net.drop(name, link, sender, data, pid, leg, "no-listener")
                self.node.icmp_error(data, ICMP6_DST_UNREACH, DU_PORT_UNREACH, 0, link)
                return
            handler(src, sport, dst, dport, bytes(data[l4 + 8 : info.end]))
        elif info.proto == NH_ICMPV6:
            self._icmp(data, l4, info.end, src, dst, link, sender, pid, leg)
        else:
            net.drop(name, link, sender, data, pid, leg, "unsupported")

    def _tcp(
        self,
        data: bytearray,
        l4: int,
        end: int,
        src: bytes,
        dst: bytes,
        link: str,
        sender: str,
        pid: int,
        leg: str,
    ) -> None:
        sport, dport, seq, ack, doff, flags = struct.unpack_from("!HHIIBB", data, l4)
        hlen = (doff >> 4) * 4
        options = bytes(data[l4 + 20 : l4 + hlen])
        payload = bytes(data[l4 + hlen : end])
        conn = self.conns.get((dst, dport, src, sport))
        if conn is not None:
            conn.segment(seq, ack, flags, payload, options)
            return
        listening = (dst, dport) in self.listeners or (None, dport) in self.listeners
        if flags & SYN and not flags & TCP_ACK and listening:
            conn = TcpConn(self, dst, dport, src, sport, False)
            conn.describe = self.describers.get((dst, dport)) or self.describers.get((None, dport))
            conn.iss = conn.snd_una = self._new_isn()
            conn.rcv_nxt = (seq + 1) & _M32
            conn.peer_mss = _mss_option(options, DEFAULT_PEER_MSS)
            conn.state = TcpState.SYN_RCVD
            self.conns[(dst, dport, src, sport)] = conn
            s = _Seg(conn.iss, SYN | TCP_ACK, b"")
            conn.snd_nxt = s.end
            conn.inflight.append(s)
            conn._emit(s)
            conn._arm()
            return
        net = self.node.net
        net.drop(self.node.name, link, sender, data, pid, leg, "no-socket")
        if not flags & RST:
            # RFC 9293 §3.10.7.1: answer a segment for no connection with a reset.
            rst_seq = ack if flags & TCP_ACK else 0
            rst_ack = (seq + len(payload) + (1 if flags & (SYN | FIN) else 0)) & _M32
            pkt = build.tcp(dst, src, dport, sport, seq=rst_seq, ack=rst_ack, flags=RST | TCP_ACK)
            self.node.originate(pkt, "reset", note=f"{self.node.name}: no socket for it, reset")

    def _icmp(
        self,
        data: bytearray,
        l4: int,
        end: int,
        src: bytes,
        dst: bytes,
        link: str,
        sender: str,
        pid: int,
        leg: str,
    ) -> None:
        t, code = data[l4], data[l4 + 1]
        if t == ICMP6_ECHO_REQUEST:
            reply = build.icmpv6(dst, src, 129, 0, bytes(data[l4 + 4 : end]))
            self.node.originate(reply, "reply", note=f"{self.node.name} answers the echo request")
            return
        if t not in (ICMP6_PACKET_TOO_BIG, ICMP6_DST_UNREACH, ICMP6_TIME_EXCEEDED):
            return
        q = l4 + 8
        if end - q < 48 or data[q + 6] != NH_TCP:
            return
        qsrc, qdst = bytes(data[q + 8 : q + 24]), bytes(data[q + 24 : q + 40])
        sport, dport = struct.unpack_from("!HH", data, q + 40)
        conn = self.conns.get((qsrc, sport, qdst, dport))
        if t == ICMP6_PACKET_TOO_BIG:
            mtu = int.from_bytes(data[l4 + 4 : l4 + 8], "big")
            if conn is not None:
                conn.packet_too_big(mtu)
            else:
                self.set_path_mtu(qdst, mtu)
        elif conn is not None:
            # RFC 1122 §4.2.3.9: soft errors, except while connecting.
            conn.errors.append(f"icmpv6 type {t} code {code}")
            if conn.state == TcpState.SYN_SENT and t == ICMP6_DST_UNREACH:
                conn.abort("unreachable")
