"""The backend side of ``dsr-ip6ip6`` and ``dsr-srv6``: decapsulate, deliver locally.

It does what Linux ``seg6local action End.DT6 table local`` does on a backend
that holds the VIP on ``lo``, and accepts both forms the LB sends (plain
IPv6-in-IPv6, and an outer header with a one-segment SRH). Checks, in order:

1. the outer packet parses (else the codec's reason);
2. the outer destination is one of this backend's addresses or SIDs (else ``no-match``);
3. the outer source is a configured LB address (else ``not-from-lb``): a
   decapsulator that takes any source lets anyone inject packets "from" any
   client past the backend's filters (RFC 2473 §9);
4. a Routing header with Segments Left 0 is done with (an SRH ends here,
   RFC 8754 §4.3.1; other types are ignored, RFC 8200 §4.4); one with
   Segments Left > 0 means this is not the last segment: ``unsupported``;
5. outer fragments (the LB fragments the outer packet for small path MTUs,
   RFC 2473 §7.1) are reassembled (RFC 8200 §4.5): 60 s timeout, overlaps
   discard the whole datagram (RFC 5722) with ``bad-fragment``;
6. the next header is 41 (else ``unsupported``);
7. the inner packet parses strictly and its destination is a VIP this
   backend holds (else ``no-match``).

Verdicts: ``(FORWARD, PORT_LOCAL, inner)`` delivers the inner packet,
unchanged, to the backend's own stack; ``(FORWARD_MANY, PORT_LOCAL, [])``
means a fragment was kept for reassembly and nothing is to be sent yet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

from v6lb.core.verdict import DROP, FORWARD, FORWARD_MANY, PORT_LOCAL, Counters, Verdict
from v6lb.wire.constants import (
    IPV6_HDR_LEN,
    NH_AH,
    NH_IPV6,
    NH_ROUTING,
    OFF_DST,
    OFF_SRC,
)
from v6lb.wire.ipv6 import PacketInfo, parse
from v6lb.wire.reasons import Reason

__all__ = ["PORT_LOCAL", "REASSEMBLY_TIMEOUT", "DsrDecap"]


REASSEMBLY_TIMEOUT: Final = 60.0  # RFC 8200 §4.5
_MAX_DATAGRAM: Final = 65535

_GENERIC: Final = frozenset((0, 43, 60, 135, 139, 140, 253, 254))
_NO_MATCH: Final = int(Reason.NO_MATCH)
_NOT_FROM_LB: Final = int(Reason.NOT_FROM_LB)
_UNSUPPORTED: Final = int(Reason.UNSUPPORTED)
_BAD_FRAGMENT: Final = int(Reason.BAD_FRAGMENT)


def _a16(addr: bytes | str | ipaddress.IPv6Address) -> bytes:
    if isinstance(addr, bytes):
        if len(addr) != 16:
            raise ValueError("an IPv6 address is 16 bytes")
        return addr
    return ipaddress.IPv6Address(addr).packed


class _Pending:
    """One datagram being reassembled."""

    __slots__ = ("start", "head", "nh_field", "nh", "pieces", "total", "have")

    def __init__(self, start: float) -> None:
        self.start = start
        self.head: bytes | None = None  # the unfragmentable part, from the first fragment
        self.nh_field = 0  # offset in ``head`` of the field that named the Fragment header
        self.nh = 0  # the Fragment header's Next Header
        self.pieces: list[tuple[int, bytes]] = []
        self.total = -1
        self.have = 0


class DsrDecap:
    """Decapsulation for one backend: (packet, ingress port, now) -> verdict."""

    def __init__(
        self,
        lb_sources: Iterable[bytes | str | ipaddress.IPv6Address],
        local: Iterable[bytes | str | ipaddress.IPv6Address],
        vips: Iterable[bytes | str | ipaddress.IPv6Address],
        *,
        max_reassemblies: int = 256,
        reassembly_timeout: float = REASSEMBLY_TIMEOUT,
    ) -> None:
        self.lb_sources = frozenset(_a16(a) for a in lb_sources)
        self.local = frozenset(_a16(a) for a in local)
        self.vips = frozenset(_a16(a) for a in vips)
        if not self.lb_sources or not self.local or not self.vips:
            raise ValueError("decapsulation needs LB sources, local addresses/SIDs and VIPs")
        self.max_reassemblies = max_reassemblies
        self.reassembly_timeout = reassembly_timeout
        self.counters = Counters()
        self._info = PacketInfo()
        self._pending: dict[tuple[bytes, bytes, int], _Pending] = {}

    @property
    def pending(self) -> int:
        """Datagrams waiting for more fragments."""
        return len(self._pending)

    def _drop(self, reason: int) -> Verdict:
        self.counters.drops[reason] += 1
        return (DROP, reason, None)

    def process(self, buf: bytearray, port: int, now: float) -> Verdict:
        if self._pending:
            self._expire(now)
        info = self._info
        rc = parse(buf, info)
        if rc:
            return self._drop(rc)
        if bytes(buf[OFF_DST : OFF_DST + 16]) not in self.local:
            return self._drop(_NO_MATCH)
        if bytes(buf[OFF_SRC : OFF_SRC + 16]) not in self.lb_sources:
            return self._drop(_NOT_FROM_LB)
        rc, nh_field = _walk_routing(buf)
        if rc:
            return self._drop(rc)
        if info.frag_off >= 0:
            return self._fragment(buf, info, nh_field, now)
        return self._deliver(buf, info)

    def _deliver(self, buf: bytearray, info: PacketInfo) -> Verdict:
        if info.proto != NH_IPV6:
            return self._drop(_UNSUPPORTED)
        inner = buf[info.l4_off : info.end]
        rc = parse(inner, self._info)
        if rc:
            return self._drop(rc)
        if bytes(inner[OFF_DST : OFF_DST + 16]) not in self.vips:
            return self._drop(_NO_MATCH)
        self.counters.forwarded += 1
        return (FORWARD, PORT_LOCAL, inner)

    # --- reassembly (RFC 8200 §4.5) ----------------------------------------------

    def _expire(self, now: float) -> None:
        pending = self._pending
        limit = now - self.reassembly_timeout
        while pending:
            key = next(iter(pending))
            if pending[key].start > limit:
                break
            del pending[key]
            self.counters.bump("decap.reassembly_timeout")

    def _fragment(self, buf: bytearray, info: PacketInfo, nh_field: int, now: float) -> Verdict:
        fo = info.frag_off
        more = info.more_frags
        offset = info.frag_offset
        data = bytes(buf[fo + 8 : info.end])
        ident = int.from_bytes(buf[fo + 4 : fo + 8], "big")
        if offset == 0 and not more:
            # RFC 6946: an atomic fragment is a whole datagram.
            return self._assemble(bytes(buf[:fo]), nh_field, buf[fo], data)
        if (more and len(data) % 8) or offset + len(data) > _MAX_DATAGRAM or not data:
            return self._drop(_BAD_FRAGMENT)
        key = (bytes(buf[OFF_SRC : OFF_SRC + 16]), bytes(buf[OFF_DST : OFF_DST + 16]), ident)
        pending = self._pending
        p = pending.get(key)
        if p is None:
            if len(pending) >= self.max_reassemblies:
                del pending[next(iter(pending))]
                self.counters.bump("decap.reassembly_evicted")
            p = pending[key] = _Pending(now)
        end = offset + len(data)
        for o, d in p.pieces:
            if o == offset and len(d) == len(data):
                return (FORWARD_MANY, PORT_LOCAL, [])  # an exact duplicate: ignored
            if offset < o + len(d) and o < end:
                del pending[key]  # RFC 5722: discard the whole datagram
                return self._drop(_BAD_FRAGMENT)
        if not more:
            if p.total >= 0 and p.total != end:
                del pending[key]
                return self._drop(_BAD_FRAGMENT)
            p.total = end
        if p.total >= 0 and end > p.total:
            del pending[key]
            return self._drop(_BAD_FRAGMENT)
        if offset == 0:
            p.head = bytes(buf[:fo])
            p.nh_field = nh_field
            p.nh = buf[fo]
        p.pieces.append((offset, data))
        p.have += len(data)
        if p.head is None or p.total < 0 or p.have != p.total:
            return (FORWARD_MANY, PORT_LOCAL, [])
        del pending[key]
        p.pieces.sort()
        return self._assemble(p.head, p.nh_field, p.nh, b"".join(d for _, d in p.pieces))

    def _assemble(self, head: bytes, nh_field: int, nh: int, payload: bytes) -> Verdict:
        pkt = bytearray(head)
        pkt[nh_field] = nh
        plen = len(head) - IPV6_HDR_LEN + len(payload)
        if plen > _MAX_DATAGRAM:
            return self._drop(_BAD_FRAGMENT)
        pkt[4] = plen >> 8
        pkt[5] = plen & 0xFF
        pkt += payload
        info = self._info
        rc = parse(pkt, info)
        if rc:
            return self._drop(rc)
        self.counters.bump("decap.reassembled")
        return self._deliver(pkt, info)


def _walk_routing(buf: bytearray) -> tuple[int, int]:
    """Check the Routing headers before any Fragment header; return (reason, nh field).

    The second value is the offset of the Next Header field that names the
    Fragment header (or the upper layer), which reassembly rewrites. The
    chain has already been validated by :func:`parse`.
    """
    nh = buf[6]
    field = 6
    off = IPV6_HDR_LEN
    end = len(buf)
    while off + 8 <= end:
        if nh in _GENERIC:
            if nh == NH_ROUTING and buf[off + 3]:
                # Segments Left > 0: we are not the last segment (RFC 8754
                # §4.3.1.1 for an SRH, RFC 8200 §4.4 for the other types).
                return _UNSUPPORTED, field
            hlen = (buf[off + 1] + 1) << 3
        elif nh == NH_AH:
            hlen = (buf[off + 1] + 2) << 2
        else:
            break  # the Fragment header, or the upper layer
        field = off
        nh = buf[off]
        off += hlen
    return 0, field
