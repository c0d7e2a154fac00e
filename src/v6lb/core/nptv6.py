"""RFC 6296 NPTv6: stateless, checksum-neutral IPv6-to-IPv6 prefix translation.

Outbound (inside -> outside) rewrites the source address; inbound rewrites the
destination. Only addresses change: ports and transport checksums stay as they
are and stay valid, because the adjusted 16-bit word cancels the prefix change
in the one's-complement sum (§3.1).

Where the adjusted word sits:
- prefixes of /48 or shorter: the subnet word, bits 48..63 (§3.4, MUST);
- longer than /48, up to /64: the first of the interface-identifier words
  (bits 64..79, 80..95, 96..111, 112..127) that is not 0xFFFF (§3.5, SHOULD).

Drop rules, each answered with the ICMPv6 error the RFC names:
- subnet 0xFFFF under a /48 or shorter has no mapping (§3.2, §4.2):
  Destination Unreachable. v6lb sends code 5 (source failed egress policy)
  outbound and code 3 (address unreachable) inbound. Linux's ip6t_NPT
  translates subnet 0xFFFF anyway, so 0x0000 and 0xFFFF collide there.
- every IID word is 0xFFFF, so no word can be adjusted (§3.7, with reported
  erratum 8757 "all-ones"): Parameter Problem code 0 pointing at the address.

An ICMPv6 error's quoted packet is translated too (the destination of the
quote outbound, its source inbound), so traceroute and Packet Too Big work
through the translator. The quote's addresses sit at even offsets inside the
ICMPv6 body, so this is checksum-neutral as well. An error whose quote is
truncated (shorter than an IPv6 header) or does not name the mapped host
(inbound: the quoted source is not in the outside prefix; outbound: the quoted
destination is not in the inside prefix) is dropped and counted per mapping.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Final

from v6lb.core.icmperr import IcmpErrorSource
from v6lb.core.verdict import DROP, FORWARD, PORT_INSIDE, PORT_OUTSIDE, Counters, Verdict
from v6lb.wire.constants import (
    DU_ADDR_UNREACH,
    DU_SRC_POLICY,
    ICMP6_DST_UNREACH,
    ICMP6_PARAM_PROB,
    ICMP6_TIME_EXCEEDED,
    IPV6_HDR_LEN,
    NH_ICMPV6,
    OFF_DST,
    OFF_HLIM,
    OFF_SRC,
    PP_HEADER_FIELD,
    TE_HOP_LIMIT,
)
from v6lb.wire.ipv6 import PacketInfo, parse
from v6lb.wire.reasons import Reason

_M: Final = 0xFFFF
OK: Final = int(Reason.OK)
NO_MAPPING: Final = int(Reason.NPT_NO_MAPPING)
NO_WORD: Final = int(Reason.NPT_NO_ADJUSTABLE_WORD)


class NptPrefixError(ValueError):
    """An NPT prefix pair that RFC 6296 cannot translate (the caller's fault)."""


def parse_prefix(text: str | ipaddress.IPv6Network) -> ipaddress.IPv6Network:
    """Parse an NPT prefix; reject non-IPv6, host bits set and lengths over /64."""
    if isinstance(text, ipaddress.IPv6Network):
        net = text
    else:
        try:
            net = ipaddress.ip_network(text, strict=True)  # type: ignore[assignment]
        except ValueError as exc:
            msg = str(exc)
            if "host bits set" in msg:
                raise NptPrefixError(
                    f"{text}: host bits set; use {ipaddress.ip_network(text, strict=False)}"
                ) from None
            raise NptPrefixError(f"{text}: not an IPv6 prefix ({msg})") from None
        if not isinstance(net, ipaddress.IPv6Network):
            raise NptPrefixError(f"{text}: not an IPv6 prefix (NPTv6 translates IPv6 only)")
    if net.prefixlen > 64:
        raise NptPrefixError(
            f"{net}: /{net.prefixlen} is longer than /64; NPTv6 (RFC 6296) supports up to /64"
        )
    return net


class NptMapping:
    """One inside/outside prefix pair and its precomputed adjustment (RFC 6296 §3.1)."""

    __slots__ = (
        "inside",
        "outside",
        "length",
        "adjustment",
        "_fb",
        "_mask",
        "_in_bytes",
        "_out_bytes",
        "_in_part",
        "_out_part",
        "_subnet_word",
    )

    def __init__(
        self, inside: str | ipaddress.IPv6Network, outside: str | ipaddress.IPv6Network
    ) -> None:
        self.inside = parse_prefix(inside)
        self.outside = parse_prefix(outside)
        # §3.1: the shorter prefix is zero-extended to the longer length.
        self.length = max(self.inside.prefixlen, self.outside.prefixlen)
        ip = self.inside.network_address.packed
        op = self.outside.network_address.packed
        # §3.1: zero-extended to /64, the adjustment is sum(internal) - sum(external).
        sum_in = int.from_bytes(ip[:8], "big") % _M
        sum_out = int.from_bytes(op[:8], "big") % _M
        self.adjustment = (sum_in - sum_out) % _M
        fb, rem = divmod(self.length, 8)
        self._fb = fb
        self._mask = (0xFF00 >> rem) & 0xFF if rem else 0
        self._in_bytes = ip[:fb]
        self._out_bytes = op[:fb]
        self._in_part = ip[fb] & self._mask if rem else 0
        self._out_part = op[fb] & self._mask if rem else 0
        self._subnet_word = self.length <= 48

    def __repr__(self) -> str:
        return f"NptMapping(inside={self.inside}, outside={self.outside}, adjustment=0x{self.adjustment:04x})"

    # --- address-level operations (in place on a buffer) --------------------

    @property
    def in_bytes(self) -> bytes:
        """The whole bytes of the (zero-extended) inside prefix."""
        return self._in_bytes

    @property
    def out_bytes(self) -> bytes:
        return self._out_bytes

    def matches_inside(self, buf: bytes | bytearray, off: int) -> bool:
        if len(buf) < off + 16 or not buf.startswith(self._in_bytes, off):
            return False
        return not self._mask or (buf[off + self._fb] & self._mask) == self._in_part

    def matches_outside(self, buf: bytes | bytearray, off: int) -> bool:
        if len(buf) < off + 16 or not buf.startswith(self._out_bytes, off):
            return False
        return not self._mask or (buf[off + self._fb] & self._mask) == self._out_part

    def _rewrite(self, buf: bytearray, off: int, prefix: bytes, part: int, adj: int) -> int:
        """Overwrite the prefix and add ``adj`` to the chosen word; return a Reason code."""
        if self._subnet_word:
            w = (buf[off + 6] << 8) | buf[off + 7]
            if w == _M:
                return NO_MAPPING
            word = off + 6
        else:
            word = off + 8
            last = off + 16
            while word < last and buf[word] == 0xFF and buf[word + 1] == 0xFF:
                word += 2
            if word == last:
                return NO_WORD
            w = (buf[word] << 8) | buf[word + 1]
        fb = self._fb
        buf[off : off + fb] = prefix
        if self._mask:
            buf[off + fb] = (buf[off + fb] & ~self._mask & 0xFF) | part
        # One's-complement add; a result of 0xFFFF is written as 0x0000 (§3.2, §3.3).
        w = (w + adj) % _M
        buf[word] = w >> 8
        buf[word + 1] = w & 0xFF
        return OK

    def map_out(self, buf: bytearray, off: int) -> int:
        """Translate the inside address at ``buf[off:off+16]`` to the outside prefix."""
        return self._rewrite(buf, off, self._out_bytes, self._out_part, self.adjustment)

    def map_in(self, buf: bytearray, off: int) -> int:
        """Translate the outside address at ``buf[off:off+16]`` back to the inside prefix."""
        return self._rewrite(buf, off, self._in_bytes, self._in_part, _M - self.adjustment)

    # --- convenience for addresses as values ---------------------------------

    def translate(
        self, addr: str | ipaddress.IPv6Address, reverse: bool = False
    ) -> ipaddress.IPv6Address | Reason:
        """Map one address (outbound, or inbound with ``reverse``); a Reason if it must be dropped."""
        a = bytearray(ipaddress.IPv6Address(addr).packed)
        if reverse:
            if not self.matches_outside(a, 0):
                return Reason.NO_MATCH
            rc = self.map_in(a, 0)
        else:
            if not self.matches_inside(a, 0):
                return Reason.NO_MATCH
            rc = self.map_out(a, 0)
        if rc:
            return Reason(rc)
        return ipaddress.IPv6Address(bytes(a))


def _error_for(reason: int, outbound: bool, addr_off: int) -> tuple[int, int, int]:
    """(type, code, param) of the ICMPv6 error that answers an NPT drop."""
    if reason == NO_MAPPING:
        return ICMP6_DST_UNREACH, DU_SRC_POLICY if outbound else DU_ADDR_UNREACH, 0
    return ICMP6_PARAM_PROB, PP_HEADER_FIELD, addr_off


class NptForwarder:
    """The ``npt`` mode as a forwarder: (packet, ingress port, now) -> verdict.

    Packets from :data:`PORT_INSIDE` whose source is in an inside prefix leave
    by :data:`PORT_OUTSIDE` with the source translated; packets from outside
    whose destination is in an outside prefix come in with the destination
    translated. Anything else is dropped as ``no-match``: not an open relay.
    The hop limit is decremented (a routed mode); at 1 or 0 the packet is
    answered with Time Exceeded. Every fragment is translated alike.
    """

    def __init__(
        self,
        mappings: Sequence[NptMapping],
        icmp_source: bytes,
        *,
        icmp_rate: float = 100.0,
        icmp_burst: float = 20.0,
        decrement_hop_limit: bool = True,
    ) -> None:
        if not mappings:
            raise ValueError("an NPT forwarder needs at least one prefix pair")
        self.mappings = list(mappings)
        self.icmp = IcmpErrorSource(icmp_source, icmp_rate, icmp_burst)
        self.counters = Counters()
        # ICMPv6 errors per mapping: translated (quote and outer header), and dropped
        # because the quote was truncated or names no address of the mapping.
        self.icmp_translated = [0] * len(self.mappings)
        self.icmp_unmatched = [0] * len(self.mappings)
        self.decrement_hop_limit = decrement_hop_limit
        self._info = PacketInfo()
        self._qinfo = PacketInfo()
        self._single = self.mappings[0] if len(self.mappings) == 1 else None
        m = self._single
        self._fast: tuple[bytes, bytes, int, int, int, bool] | None = None
        if m is not None and m.length % 8 == 0:
            self._fast = (
                m.in_bytes,
                m.out_bytes,
                m.length // 8,
                m.adjustment,
                _M - m.adjustment,
                m.length <= 48,
            )

    @property
    def first8_determines(self) -> bool:
        """True when the fast path applies and rewrites only an address's first 8 bytes.

        That is one byte-aligned mapping of /48 or shorter (the subnet word is
        adjusted, §3.4): for a TCP or UDP packet without extension headers the
        translated first 8 bytes of the address depend on nothing but its first
        8 bytes. A data plane may then remember what :meth:`process` made of
        them (and must count the packets it translates that way itself).
        """
        return self._fast is not None and self._fast[5] and not self.decrement_hop_limit

    def _find(self, buf: bytes | bytearray, off: int, inside: bool) -> NptMapping | None:
        for m in self.mappings:
            if m.matches_inside(buf, off) if inside else m.matches_outside(buf, off):
                return m
        return None

    def process(self, buf: bytearray, port: int, now: float) -> Verdict:
        # Fast path: one mapping of a byte-aligned prefix, and a
        # TCP or UDP packet with no extension headers. It checks inline what the
        # slow path checks, without allocating; anything else takes the slow path.
        fast = self._fast
        n = len(buf)
        if (
            fast is not None
            and n >= 60
            and buf[0] >> 4 == 6
            and ((buf[4] << 8) | buf[5]) + 40 == n
            and (buf[6] == 6 or buf[6] == 17)
        ):
            hl = buf[7]
            dec = self.decrement_hop_limit
            if hl > 1 or not dec:
                in_bytes, out_bytes, fb, adj, radj, subnet = fast
                if port == PORT_INSIDE:
                    if buf.startswith(in_bytes, 8):
                        # §3.4: the subnet word; §3.5: the first IID word not 0xFFFF.
                        i = 14
                        if not subnet:
                            i = 16
                            while i < 24 and buf[i] == 0xFF and buf[i + 1] == 0xFF:
                                i += 2
                        w = (buf[i] << 8) | buf[i + 1] if i < 24 else 0xFFFF
                        if w != 0xFFFF:
                            buf[8 : 8 + fb] = out_bytes
                            w = (w + adj) % 0xFFFF
                            buf[i] = w >> 8
                            buf[i + 1] = w & 0xFF
                            if dec:
                                buf[7] = hl - 1
                            self.counters.forwarded += 1
                            return (FORWARD, PORT_OUTSIDE, buf)
                elif buf.startswith(out_bytes, 24):
                    i = 30
                    if not subnet:
                        i = 32
                        while i < 40 and buf[i] == 0xFF and buf[i + 1] == 0xFF:
                            i += 2
                    w = (buf[i] << 8) | buf[i + 1] if i < 40 else 0xFFFF
                    if w != 0xFFFF:
                        buf[24 : 24 + fb] = in_bytes
                        w = (w + radj) % 0xFFFF
                        buf[i] = w >> 8
                        buf[i + 1] = w & 0xFF
                        if dec:
                            buf[7] = hl - 1
                        self.counters.forwarded += 1
                        return (FORWARD, PORT_INSIDE, buf)
        return self._process(buf, port, now)

    def _process(self, buf: bytearray, port: int, now: float) -> Verdict:
        counters = self.counters
        info = self._info
        rc = parse(buf, info)
        if rc:
            counters.drops[rc] += 1
            return (DROP, rc, None)
        outbound = port == PORT_INSIDE
        addr_off = OFF_SRC if outbound else OFF_DST
        m = self._single
        if m is None or not (
            m.matches_inside(buf, addr_off) if outbound else m.matches_outside(buf, addr_off)
        ):
            m = self._find(buf, addr_off, outbound)
            if m is None:
                counters.drops[Reason.NO_MATCH] += 1
                return (DROP, Reason.NO_MATCH, None)
        hl = buf[OFF_HLIM]
        if self.decrement_hop_limit and hl <= 1:
            return self._error(
                buf, Reason.HOP_LIMIT_EXCEEDED, ICMP6_TIME_EXCEEDED, TE_HOP_LIMIT, 0, port, now
            )
        is_error = info.proto == NH_ICMPV6 and not info.later_fragment and buf[info.l4_off] < 128
        if is_error:
            # Translate the quoted packet first; if it can't be, drop the error
            # silently (never answer an error with an error). The quote must be the
            # packet the error is about: from outside, one the inside host sent (its
            # source in the outside prefix); from inside, one it received (its
            # destination in the inside prefix). Anything else names no packet of
            # ours: dropped and counted, as the kernel data plane does.
            q = info.l4_off + 8
            index = self.mappings.index(m)
            if len(buf) - q < IPV6_HDR_LEN:
                self.icmp_unmatched[index] += 1
                counters.drops[Reason.ICMP_ERROR_QUOTE_BAD] += 1
                return (DROP, Reason.ICMP_ERROR_QUOTE_BAD, None)
            qoff = q + (OFF_DST if outbound else OFF_SRC)
            if not (m.matches_inside(buf, qoff) if outbound else m.matches_outside(buf, qoff)):
                self.icmp_unmatched[index] += 1
                counters.drops[Reason.ICMP_ERROR_UNMATCHED] += 1
                return (DROP, Reason.ICMP_ERROR_UNMATCHED, None)
            qrc = m.map_out(buf, qoff) if outbound else m.map_in(buf, qoff)
            if qrc:
                self.icmp_unmatched[index] += 1
                counters.drops[Reason.ICMP_ERROR_QUOTE_BAD] += 1
                return (DROP, Reason.ICMP_ERROR_QUOTE_BAD, None)
            self.icmp_translated[index] += 1
        rc = m.map_out(buf, addr_off) if outbound else m.map_in(buf, addr_off)
        if rc:
            if is_error:
                counters.drops[rc] += 1
                return (DROP, rc, None)
            # The buffer is untouched when a mapping fails, so the quote is the original.
            t, c, p = _error_for(rc, outbound, addr_off)
            return self._error(buf, Reason(rc), t, c, p, port, now)
        if self.decrement_hop_limit:
            buf[OFF_HLIM] = hl - 1
        counters.forwarded += 1
        return (FORWARD, PORT_OUTSIDE if outbound else PORT_INSIDE, buf)

    def _error(
        self, buf: bytearray, reason: int, t: int, c: int, p: int, port: int, now: float
    ) -> Verdict:
        return self.icmp.answer(self.counters, buf, reason, t, c, p, port, now)
