"""ICMPv6 errors that v6lb generates, under RFC 4443 §2.4 for every mode.

- (e) never in reply to an ICMPv6 error, to a packet sent to a multicast
  address (Packet Too Big and Parameter Problem code 2 excepted), or to a
  packet whose source does not identify one node (unspecified or multicast);
- (f) rate-limited by a token bucket driven by the caller's ``now``;
- (c) at most 1280 bytes, quoting as much of the invoking packet as fits.
"""

from __future__ import annotations

from v6lb.core.verdict import DROP, REPLY, Counters, Verdict
from v6lb.wire.build import icmpv6_error
from v6lb.wire.constants import (
    ICMP6_PACKET_TOO_BIG,
    ICMP6_PARAM_PROB,
    NH_ICMPV6,
    OFF_DST,
    OFF_SRC,
    PP_OPTION,
)
from v6lb.wire.ipv6 import PacketInfo, parse

_ZERO16 = bytes(16)


class IcmpErrorSource:
    """Builds the ICMPv6 errors of one forwarder, with its own rate limit."""

    __slots__ = ("source", "rate", "burst", "_tokens", "_last", "_info", "suppressed", "sent")

    def __init__(self, source: bytes, rate: float = 100.0, burst: float = 20.0) -> None:
        if len(source) != 16:
            raise ValueError("the ICMPv6 error source is a 16-byte IPv6 address")
        self.source = source
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last: float | None = None
        self._info = PacketInfo()
        self.suppressed = 0
        self.sent = 0

    def allowed(self, invoking: bytes | bytearray | memoryview, type_: int, code: int) -> bool:
        """RFC 4443 §2.4 (e): may an error be sent about ``invoking`` at all?"""
        if len(invoking) < 40:
            return False
        src = invoking[OFF_SRC : OFF_SRC + 16]
        if src[0] == 0xFF or bytes(src) == _ZERO16:
            return False
        if invoking[OFF_DST] == 0xFF and not (
            type_ == ICMP6_PACKET_TOO_BIG or (type_ == ICMP6_PARAM_PROB and code == PP_OPTION)
        ):
            return False
        info = self._info
        return not (
            parse(invoking, info, 0, strict_length=False) == 0
            and info.proto == NH_ICMPV6
            and not info.later_fragment
            and info.l4_off < len(invoking)
            and invoking[info.l4_off] < 128
        )

    def _take(self, now: float) -> bool:
        last = self._last
        if last is not None and now > last:
            self._tokens = min(self.burst, self._tokens + (now - last) * self.rate)
        self._last = now if last is None or now > last else last
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def make(
        self,
        invoking: bytes | bytearray | memoryview,
        type_: int,
        code: int,
        param: int,
        now: float,
    ) -> bytearray | None:
        """The error to send about ``invoking``, or None if the RFC or the rate limit forbids it."""
        if not self.allowed(invoking, type_, code):
            return None
        if not self._take(now):
            self.suppressed += 1
            return None
        self.sent += 1
        dst = bytes(invoking[OFF_SRC : OFF_SRC + 16])
        return icmpv6_error(self.source, dst, type_, code, invoking, param, hop_limit=64)

    def answer(
        self,
        counters: Counters,
        buf: bytes | bytearray,
        reason: int,
        type_: int,
        code: int,
        param: int,
        port: int,
        now: float,
    ) -> Verdict:
        """Count ``buf`` as dropped for ``reason`` and answer it with an error if allowed.

        Returns ``(REPLY, port, error)`` or, when RFC 4443 §2.4 or the rate limit
        forbids an error, ``(DROP, reason, None)``.
        """
        counters.drops[reason] += 1
        reply = self.make(buf, type_, code, param, now)
        if reply is None:
            return (DROP, reason, None)
        counters.replies += 1
        return (REPLY, port, reply)
