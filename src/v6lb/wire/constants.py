"""Protocol numbers, header sizes and ICMPv6 types used across v6lb."""

from __future__ import annotations

from typing import Final

IPV6_HDR_LEN: Final = 40
MIN_MTU: Final = 1280  # RFC 8200 §5

# Next-header values (IANA "Assigned Internet Protocol Numbers").
NH_HOPOPTS: Final = 0
NH_TCP: Final = 6
NH_UDP: Final = 17
NH_IPV6: Final = 41
NH_ROUTING: Final = 43
NH_FRAGMENT: Final = 44
NH_ESP: Final = 50
NH_AH: Final = 51
NH_ICMPV6: Final = 58
NH_NONE: Final = 59
NH_DSTOPTS: Final = 60
NH_MOBILITY: Final = 135
NH_HIP: Final = 139
NH_SHIM6: Final = 140
NH_EXP1: Final = 253
NH_EXP2: Final = 254

# Extension headers in the generic (next header, length in 8-octet units - 1) format
# that a transit node can skip (RFC 7045 §2, RFC 6564). AH has its own length unit;
# Fragment is fixed; ESP ends what can be parsed.
GENERIC_EXT: Final = frozenset(
    {NH_HOPOPTS, NH_ROUTING, NH_DSTOPTS, NH_MOBILITY, NH_HIP, NH_SHIM6, NH_EXP1, NH_EXP2}
)
EXTENSION_HEADERS: Final = GENERIC_EXT | {NH_FRAGMENT, NH_AH, NH_ESP}

PROTO_NAMES: Final = {
    NH_HOPOPTS: "hop-by-hop",
    NH_TCP: "tcp",
    NH_UDP: "udp",
    NH_IPV6: "ipv6",
    NH_ROUTING: "routing",
    NH_FRAGMENT: "fragment",
    NH_ESP: "esp",
    NH_AH: "ah",
    NH_ICMPV6: "icmpv6",
    NH_NONE: "no-next-header",
    NH_DSTOPTS: "destination-options",
}

# Routing types.
RT_SRH: Final = 4  # RFC 8754

# ICMPv6 types (RFC 4443).
ICMP6_DST_UNREACH: Final = 1
ICMP6_PACKET_TOO_BIG: Final = 2
ICMP6_TIME_EXCEEDED: Final = 3
ICMP6_PARAM_PROB: Final = 4
ICMP6_ECHO_REQUEST: Final = 128
ICMP6_ECHO_REPLY: Final = 129

# Destination Unreachable codes.
DU_NO_ROUTE: Final = 0
DU_ADMIN_PROHIBITED: Final = 1
DU_ADDR_UNREACH: Final = 3
DU_PORT_UNREACH: Final = 4
DU_SRC_POLICY: Final = 5
# Time Exceeded codes.
TE_HOP_LIMIT: Final = 0
TE_REASSEMBLY: Final = 1
# Parameter Problem codes.
PP_HEADER_FIELD: Final = 0
PP_NEXT_HEADER: Final = 1
PP_OPTION: Final = 2
PP_INCOMPLETE_CHAIN: Final = 3  # RFC 7112 §5

# TCP flags.
TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10

# Offsets inside the fixed IPv6 header.
OFF_PLEN: Final = 4
OFF_NH: Final = 6
OFF_HLIM: Final = 7
OFF_SRC: Final = 8
OFF_DST: Final = 24

# Checksum offsets inside each transport header.
CSUM_OFF_TCP: Final = 16
CSUM_OFF_UDP: Final = 6
CSUM_OFF_ICMPV6: Final = 2
