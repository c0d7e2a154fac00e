"""Drop reasons: one project-wide registry of small integer codes.

A malformed or refused packet is the peer's fault: it is counted and dropped
(or answered as the RFC says), never raised. Every layer reports drops with
these codes so counters can be a flat list indexed by the code, and so the
simulator, the Python data plane and the explain output name them alike.
"""

from __future__ import annotations

from enum import IntEnum


class Reason(IntEnum):
    OK = 0
    # --- codec (the wire package) ---
    TRUNCATED = 1  # shorter than the 40-byte IPv6 header
    BAD_VERSION = 2  # version field is not 6
    LENGTH_MISMATCH = 3  # payload length disagrees with the buffer
    EXT_TRUNCATED = 4  # an extension header runs past the end
    EXT_CHAIN_TOO_LONG = 5  # more headers or bytes than the sane limit
    HBH_NOT_FIRST = 6  # Hop-by-Hop anywhere but right after the IPv6 header (RFC 8200 §4.1)
    INCOMPLETE_CHAIN = 7  # first fragment lacks the whole header chain (RFC 7112 §5)
    L4_TRUNCATED = 8  # TCP/UDP/ICMPv6 header cut short
    BAD_L4_LENGTH = 9  # TCP data offset or UDP length inconsistent
    # --- shared forwarding policy (the core package) ---
    NO_MATCH = 20  # matches no VIP and no NPT prefix: v6lb is not an open relay
    HOP_LIMIT_EXCEEDED = 21
    NPT_NO_MAPPING = 22  # RFC 6296 §3.2/§4.2: subnet 0xFFFF under a /48 or shorter
    NPT_NO_ADJUSTABLE_WORD = 23  # RFC 6296 §3.7: every IID word is 0xFFFF
    ICMP_ERROR_UNMATCHED = 24  # an ICMPv6 error quotes no tracked flow
    ICMP_ERROR_QUOTE_BAD = 25  # the quoted packet in an ICMPv6 error cannot be parsed
    CONNTRACK_FULL = 26
    SNAT_PORTS_EXHAUSTED = 27
    NO_BACKEND = 28
    INVALID_STATE = 29  # e.g. a TCP segment that opens nothing and matches no flow
    NOT_FROM_LB = 30  # decapsulation refused: outer source is not a configured LB
    TOO_BIG = 31  # would exceed the path MTU; a Packet Too Big was sent
    UNSUPPORTED = 32
    RATE_LIMITED = 33  # an ICMPv6 error we would send was suppressed (RFC 4443 §2.4 f)
    BAD_FRAGMENT = 60  # reassembly refused: overlap (RFC 5722), misaligned or past 65535 bytes
    FRAGMENT_UNMATCHED = 50  # nat: a later fragment whose first fragment was not seen
    NAT_TUPLE_CLASH = 51  # nat: the translated tuple is already another flow's

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


N_REASONS = max(int(r) for r in Reason) + 1
