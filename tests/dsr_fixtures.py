"""Golden DSR cases, Katran-style: input (a scapy expression), verdict, expected output.

Every expected output is written independently as a scapy expression: the
outer header(s) the RFCs and docs/dsr.md call for, around the client's packet
with its hop limit decremented (routed modes) and nothing else changed. The
test evaluates both sides, runs the input through a fresh ``DsrForwarder``
built from :data:`CONFIG`, compares bytes, and has scapy re-dissect and
re-check every checksum.

Names available in expressions: the addresses below, ``IN`` (the input's
first 1232 bytes, the quote of an ICMPv6 error v6lb sends), ``LABEL4(src,
dst, sport, dport)`` and ``LABEL3(src, dst, proto)`` (the outer flow label
derived for an unlabelled packet: the low 20 bits of the reference jhash of
the flow key, docs/dsr.md), ``FRAG_ID`` (the Fragment header identification
of the first packet a fresh forwarder fragments) and scapy's ``fragment6``.

Expected verdicts: ``forward`` (one expression), ``forward-many`` (an
expression for a list of packets), ``forward-l2`` (the MAC; the packet must be
untouched), ``reply`` (the ICMPv6 error), ``drop`` (the reason label).
"""

from __future__ import annotations

from typing import Any

SEED = 0x5EED

LB = "2001:db8:1b::1"  # lb.addresses[0]: default tunnel source and ICMPv6 error source
LB2 = "2001:db8:1b::2"  # the second LB address, tunnel source of VIP "sr-explicit"
STRANGER = "2001:db8:bad::1"  # not an LB
CLIENT = "2001:db8:c::10"
CLIENT2 = "2001:db8:c::20"
ROUTER = "2001:db8:ff::1"  # a router on the client's path

VIP6 = "2001:db8:100::80"  # dsr-ip6ip6, one backend
BE6 = "fd00:b6::1"
VIPSR = "2001:db8:100::81"  # dsr-srv6, one backend whose SID is not its address
BESR = "fd00:5::1"
SID = "fd00:5:0:e::d76"
VIPL2 = "2001:db8:100::82"  # dsr-l2
BEL2 = "fd00:12::1"
MAC = "02:00:00:00:00:01"
VIP1400 = "2001:db8:100::84"  # dsr-ip6ip6, mtu 1400: tunnel MTU 1360
BE1400 = "fd00:14::1"
VIPSMALL = "2001:db8:100::83"  # dsr-ip6ip6, mtu 1280: tunnel MTU 1240 < 1280
BESMALL = "fd00:13::1"
VIPSMALLSR = "2001:db8:100::85"  # dsr-srv6, mtu 1300: tunnel MTU 1236 < 1280
BESMALLSR = "fd00:15::1"
VIPM = "2001:db8:100::90"  # dsr-ip6ip6, four backends (fragments, PTB to the owner)
BEM = ["fd00:a::1", "fd00:a::2", "fd00:a::3", "fd00:a::4"]
VIPEXP = "2001:db8:100::86"  # dsr-srv6 with an explicit tunnel source
BEEXP = "fd00:16::1"

# The first Fragment header identification of a fresh forwarder (docs/dsr.md).
FRAG_ID = (0x9E3779B1 + SEED) & 0xFFFFFFFF


def _vip(
    name: str, address: str, mode: str, backends: list[dict[str, Any]], **kw: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "address": address,
        "ports": [443],
        "mode": mode,
        "backends": backends,
        **kw,
    }


CONFIG: dict[str, Any] = {
    "lb": {"addresses": [LB, LB2], "flow_hash_seed": SEED, "flow_cache_size": 4096},
    "vips": [
        _vip("ip6ip6", VIP6, "dsr-ip6ip6", [{"address": BE6}], ports=[80, 443]),
        _vip("srv6", VIPSR, "dsr-srv6", [{"address": BESR, "sid": SID}]),
        _vip("l2", VIPL2, "dsr-l2", [{"address": BEL2, "mac": MAC}]),
        _vip("mtu1400", VIP1400, "dsr-ip6ip6", [{"address": BE1400}], mtu=1400),
        _vip("small", VIPSMALL, "dsr-ip6ip6", [{"address": BESMALL}], mtu=1280),
        _vip("small-sr", VIPSMALLSR, "dsr-srv6", [{"address": BESMALLSR}], mtu=1300),
        _vip("multi", VIPM, "dsr-ip6ip6", [{"address": a} for a in BEM]),
        _vip(
            "multi-udp",
            VIPM,
            "dsr-ip6ip6",
            [{"address": a} for a in BEM],
            protocol="udp",
            ports=[53],
        ),
        _vip("sr-explicit", VIPEXP, "dsr-srv6", [{"address": BEEXP}], tunnel_source=LB2),
    ],
}

TCP_S = "TCP(sport=40000,dport=443,flags='S',seq=1000)"
TCP_A = "TCP(sport=40000,dport=443,flags='A',seq=1001,ack=5001)"

# (name, input expression, verdict, expected)
GOLDEN: list[tuple[str, str, str, str]] = [
    # --- the three modes ----------------------------------------------------------
    (
        "ip6ip6: tcp syn, flow label copied, inner hop limit decremented",
        f"IPv6(src=CLIENT,dst=VIP6,fl=0x12345,hlim=64)/{TCP_S}",
        "forward",
        f"IPv6(src=LB,dst=BE6,nh=41,fl=0x12345,hlim=64)/IPv6(src=CLIENT,dst=VIP6,fl=0x12345,hlim=63)/{TCP_S}",
    ),
    (
        "ip6ip6: second VIP port, traffic class copied",
        "IPv6(src=CLIENT,dst=VIP6,tc=0xb8,fl=0xabcde,hlim=30)/TCP(sport=41000,dport=80,flags='PA')/b'GET / HTTP/1.1'",
        "forward",
        "IPv6(src=LB,dst=BE6,tc=0xb8,fl=0xabcde,hlim=64)/"
        "IPv6(src=CLIENT,dst=VIP6,tc=0xb8,fl=0xabcde,hlim=29)/TCP(sport=41000,dport=80,flags='PA')/b'GET / HTTP/1.1'",
    ),
    (
        "ip6ip6: unlabelled packet gets a label from the flow hash",
        f"IPv6(src=CLIENT,dst=VIP6,hlim=64)/{TCP_S}",
        "forward",
        f"IPv6(src=LB,dst=BE6,fl=LABEL4(CLIENT,VIP6,40000,443),hlim=64)/IPv6(src=CLIENT,dst=VIP6,hlim=63)/{TCP_S}",
    ),
    (
        "srv6: outer dst is the SID, one-segment SRH with segments left 0",
        f"IPv6(src=CLIENT,dst=VIPSR,fl=0x54321,hlim=64)/{TCP_S}",
        "forward",
        "IPv6(src=LB,dst=SID,fl=0x54321,hlim=64)/IPv6ExtHdrSegmentRouting(addresses=[SID],segleft=0,nh=41)/"
        f"IPv6(src=CLIENT,dst=VIPSR,fl=0x54321,hlim=63)/{TCP_S}",
    ),
    (
        "srv6: explicit tunnel source",
        f"IPv6(src=CLIENT,dst=VIPEXP,fl=0x1,hlim=64)/{TCP_A}",
        "forward",
        "IPv6(src=LB2,dst=BEEXP,fl=0x1,hlim=64)/IPv6ExtHdrSegmentRouting(addresses=[BEEXP],segleft=0,nh=41)/"
        f"IPv6(src=CLIENT,dst=VIPEXP,fl=0x1,hlim=63)/{TCP_A}",
    ),
    (
        "l2: the backend's MAC, packet untouched",
        f"IPv6(src=CLIENT,dst=VIPL2,fl=0x777,hlim=64)/{TCP_S}",
        "forward-l2",
        MAC,
    ),
    (
        "l2: hop limit 1 is not our business (L2 DSR does not route)",
        f"IPv6(src=CLIENT,dst=VIPL2,hlim=1)/{TCP_A}",
        "forward-l2",
        MAC,
    ),
    # --- hop limit -------------------------------------------------------------------
    (
        "ip6ip6: hop limit 1 -> time exceeded",
        f"IPv6(src=CLIENT,dst=VIP6,hlim=1)/{TCP_S}",
        "reply",
        "IPv6(src=LB,dst=CLIENT,hlim=64)/ICMPv6TimeExceeded(code=0)/IN",
    ),
    (
        "srv6: hop limit 0 -> time exceeded",
        f"IPv6(src=CLIENT,dst=VIPSR,hlim=0)/{TCP_S}",
        "reply",
        "IPv6(src=LB,dst=CLIENT,hlim=64)/ICMPv6TimeExceeded(code=0)/IN",
    ),
    # --- packet too big, LB -> client --------------------------------------------------
    (
        "mtu 1400: a 1400-byte packet -> packet too big 1360 (mtu - 40)",
        f"IPv6(src=CLIENT,dst=VIP1400)/{TCP_A}/(b'p'*1340)",
        "reply",
        "IPv6(src=LB,dst=CLIENT,hlim=64)/ICMPv6PacketTooBig(mtu=1360)/IN",
    ),
    (
        "mtu 1400: a 1360-byte packet just fits",
        f"IPv6(src=CLIENT,dst=VIP1400,fl=0x9)/{TCP_A}/(b'p'*1300)",
        "forward",
        f"IPv6(src=LB,dst=BE1400,fl=0x9)/IPv6(src=CLIENT,dst=VIP1400,fl=0x9,hlim=63)/{TCP_A}/(b'p'*1300)",
    ),
    (
        "mtu 1280: a 1300-byte packet -> packet too big 1280, never less (RFC 2473 §7.1 b)",
        f"IPv6(src=CLIENT,dst=VIPSMALL)/{TCP_A}/(b'p'*1240)",
        "reply",
        "IPv6(src=LB,dst=CLIENT,hlim=64)/ICMPv6PacketTooBig(mtu=1280)/IN",
    ),
    (
        "mtu 1280: a 1280-byte packet -> the outer packet is fragmented (RFC 2473 §7.1 a)",
        f"IPv6(src=CLIENT,dst=VIPSMALL,fl=0x42)/{TCP_A}/(b'p'*1220)",
        "forward-many",
        "fragment6(IPv6(src=LB,dst=BESMALL,fl=0x42)/IPv6ExtHdrFragment(id=FRAG_ID,nh=41)/"
        f"IPv6(src=CLIENT,dst=VIPSMALL,fl=0x42,hlim=63)/{TCP_A}/(b'p'*1220), 1280)",
    ),
    (
        "srv6 mtu 1300: the SRH stays in every fragment, the Fragment header follows it",
        f"IPv6(src=CLIENT,dst=VIPSMALLSR,fl=0x43)/{TCP_A}/(b'q'*1200)",
        "forward-many",
        "fragment6(IPv6(src=LB,dst=BESMALLSR,fl=0x43)/"
        "IPv6ExtHdrSegmentRouting(addresses=[BESMALLSR],segleft=0)/IPv6ExtHdrFragment(id=FRAG_ID,nh=41)/"
        f"IPv6(src=CLIENT,dst=VIPSMALLSR,fl=0x43,hlim=63)/{TCP_A}/(b'q'*1200), 1300)",
    ),
    # --- packet too big, router -> VIP: to the backend that owns the flow -------------
    (
        "packet too big for the VIP quoting VIP->client goes to the flow's backend",
        "IPv6(src=ROUTER,dst=VIP6)/ICMPv6PacketTooBig(mtu=1400)/"
        "IPv6(src=VIP6,dst=CLIENT)/TCP(sport=443,dport=40000,flags='A')/(b'r'*1300)",
        "forward",
        "IPv6(src=LB,dst=BE6,fl=LABEL4(CLIENT,VIP6,40000,443))/"
        "IPv6(src=ROUTER,dst=VIP6,hlim=63)/ICMPv6PacketTooBig(mtu=1400)/"
        "IPv6(src=VIP6,dst=CLIENT)/TCP(sport=443,dport=40000,flags='A')/(b'r'*1300)",
    ),
    (
        "packet too big for a multi-backend VIP: hashed on the reversed quoted 4-tuple",
        "IPv6(src=ROUTER,dst=VIPM)/ICMPv6PacketTooBig(mtu=1300)/"
        "IPv6(src=VIPM,dst=CLIENT2)/TCP(sport=443,dport=50001,flags='A')/(b'r'*600)",
        "forward",
        "IPv6(src=LB,dst=BEM[PIN_PTB],fl=LABEL4(CLIENT2,VIPM,50001,443))/"
        "IPv6(src=ROUTER,dst=VIPM,hlim=63)/ICMPv6PacketTooBig(mtu=1300)/"
        "IPv6(src=VIPM,dst=CLIENT2)/TCP(sport=443,dport=50001,flags='A')/(b'r'*600)",
    ),
    (
        "a 1280-byte packet too big for a 1280-mtu VIP: encapsulated, then fragmented",
        "IPv6(src=ROUTER,dst=VIPSMALL)/ICMPv6PacketTooBig(mtu=1280)/"
        "IPv6(src=VIPSMALL,dst=CLIENT)/TCP(sport=443,dport=40000,flags='A')/(b'r'*1172)",
        "forward-many",
        "fragment6(IPv6(src=LB,dst=BESMALL,fl=LABEL4(CLIENT,VIPSMALL,40000,443))/"
        "IPv6ExtHdrFragment(id=FRAG_ID,nh=41)/IPv6(src=ROUTER,dst=VIPSMALL,hlim=63)/"
        "ICMPv6PacketTooBig(mtu=1280)/IPv6(src=VIPSMALL,dst=CLIENT)/"
        "TCP(sport=443,dport=40000,flags='A')/(b'r'*1172), 1280)",
    ),
    (
        "an error quoting a packet the VIP did not send is not forwarded",
        "IPv6(src=ROUTER,dst=VIP6)/ICMPv6PacketTooBig(mtu=1400)/"
        "IPv6(src=CLIENT2,dst=CLIENT)/TCP(sport=443,dport=40000)",
        "drop",
        "icmp-error-unmatched",
    ),
    (
        "an error quoting a port the VIP does not serve is not forwarded",
        "IPv6(src=ROUTER,dst=VIP6)/ICMPv6PacketTooBig(mtu=1400)/"
        "IPv6(src=VIP6,dst=CLIENT)/TCP(sport=8080,dport=40000)",
        "drop",
        "icmp-error-unmatched",
    ),
    # --- fragments: the 3-tuple, first and later alike -----------------------------------
    (
        "first fragment: hashed on (src, dst, next header)",
        "IPv6(src=CLIENT,dst=VIPM,fl=0x5)/IPv6ExtHdrFragment(id=77,m=1,offset=0,nh=6)/"
        "Raw(bytes(TCP(sport=40000,dport=443,flags='PA'))+b'f'*44)",
        "forward",
        "IPv6(src=LB,dst=BEM[PIN_FRAG],fl=0x5)/IPv6(src=CLIENT,dst=VIPM,fl=0x5,hlim=63)/"
        "IPv6ExtHdrFragment(id=77,m=1,offset=0,nh=6)/Raw(bytes(TCP(sport=40000,dport=443,flags='PA'))+b'f'*44)",
    ),
    (
        "later fragment of the same packet: the same backend",
        "IPv6(src=CLIENT,dst=VIPM,fl=0x5)/IPv6ExtHdrFragment(id=77,m=0,offset=8,nh=6)/Raw(b'g'*40)",
        "forward",
        "IPv6(src=LB,dst=BEM[PIN_FRAG],fl=0x5)/IPv6(src=CLIENT,dst=VIPM,fl=0x5,hlim=63)/"
        "IPv6ExtHdrFragment(id=77,m=0,offset=8,nh=6)/Raw(b'g'*40)",
    ),
    (
        "unlabelled later fragment: label from the 3-tuple hash",
        "IPv6(src=CLIENT,dst=VIPM)/IPv6ExtHdrFragment(id=78,m=0,offset=8,nh=6)/Raw(b'g'*40)",
        "forward",
        "IPv6(src=LB,dst=BEM[PIN_FRAG],fl=LABEL3(CLIENT,VIPM,6))/IPv6(src=CLIENT,dst=VIPM,hlim=63)/"
        "IPv6ExtHdrFragment(id=78,m=0,offset=8,nh=6)/Raw(b'g'*40)",
    ),
    (
        "first fragment to a port no VIP serves: not an open relay",
        "IPv6(src=CLIENT,dst=VIPM)/IPv6ExtHdrFragment(id=79,m=1,offset=0,nh=6)/"
        "Raw(bytes(TCP(sport=40000,dport=8443))+b'f'*44)",
        "drop",
        "no-match",
    ),
    # --- extension headers (RFC 7045) ---------------------------------------------------
    (
        "an experimental extension header (253) before TCP: walked, 4-tuple",
        f"IPv6(src=CLIENT,dst=VIP6,nh=253,fl=0x6)/IPv6ExtHdrDestOpt(nh=6)/{TCP_A}",
        "forward",
        f"IPv6(src=LB,dst=BE6,fl=0x6)/IPv6(src=CLIENT,dst=VIP6,nh=253,fl=0x6,hlim=63)/IPv6ExtHdrDestOpt(nh=6)/{TCP_A}",
    ),
    (
        "an unknown next header (150): forwarded on the 3-tuple",
        "IPv6(src=CLIENT,dst=VIPM,nh=150)/Raw(b'\\x11'*24)",
        "forward",
        "IPv6(src=LB,dst=BEM[PIN_UNKNOWN],fl=LABEL3(CLIENT,VIPM,150))/IPv6(src=CLIENT,dst=VIPM,nh=150,hlim=63)/Raw(b'\\x11'*24)",
    ),
    (
        "an echo request to the VIP: forwarded on the 3-tuple (the backend answers)",
        "IPv6(src=CLIENT,dst=VIP6)/ICMPv6EchoRequest(id=1,seq=2,data=b'ping')",
        "forward",
        "IPv6(src=LB,dst=BE6,fl=LABEL3(CLIENT,VIP6,58))/IPv6(src=CLIENT,dst=VIP6,hlim=63)/"
        "ICMPv6EchoRequest(id=1,seq=2,data=b'ping')",
    ),
    (
        "destination options before UDP: 4-tuple of the udp VIP",
        "IPv6(src=CLIENT,dst=VIPM,fl=0x8)/IPv6ExtHdrDestOpt()/UDP(sport=5353,dport=53)/b'query'",
        "forward",
        "IPv6(src=LB,dst=BEM[PIN_UDP],fl=0x8)/IPv6(src=CLIENT,dst=VIPM,fl=0x8,hlim=63)/"
        "IPv6ExtHdrDestOpt()/UDP(sport=5353,dport=53)/b'query'",
    ),
    # --- not ours --------------------------------------------------------------------
    (
        "a packet to no VIP: not an open relay",
        f"IPv6(src=CLIENT,dst='2001:db8:100::99')/{TCP_S}",
        "drop",
        "no-match",
    ),
    (
        "a VIP port not served",
        "IPv6(src=CLIENT,dst=VIP6)/TCP(sport=40000,dport=22)",
        "drop",
        "no-match",
    ),
    (
        "udp to a tcp-only VIP",
        "IPv6(src=CLIENT,dst=VIP6)/UDP(sport=40000,dport=443)",
        "drop",
        "no-match",
    ),
]

# Backends pinned by the jhash of the flow (seed SEED) and the Maglev table of VIP
# "multi": golden values, like Katran's fixtures; a change here means the kernel
# engine would disagree.
PINS = {"PIN_FRAG": 0, "PIN_UNKNOWN": 3, "PIN_UDP": 3, "PIN_PTB": 3}

# Decapsulation on a backend: (name, backend, input expression, verdict, expected).
DECAP: list[tuple[str, str, str, str, str]] = [
    (
        "ip6ip6 from the LB: inner packet delivered as is",
        BE6,
        f"IPv6(src=LB,dst=BE6,fl=0x12345)/IPv6(src=CLIENT,dst=VIP6,fl=0x12345,hlim=63)/{TCP_S}",
        "forward",
        f"IPv6(src=CLIENT,dst=VIP6,fl=0x12345,hlim=63)/{TCP_S}",
    ),
    (
        "srv6 to the SID from the LB: SRH done with, inner delivered",
        BESR,
        "IPv6(src=LB,dst=SID)/IPv6ExtHdrSegmentRouting(addresses=[SID],segleft=0)/"
        f"IPv6(src=CLIENT,dst=VIPSR,hlim=63)/{TCP_S}",
        "forward",
        f"IPv6(src=CLIENT,dst=VIPSR,hlim=63)/{TCP_S}",
    ),
    (
        "srv6 from the VIP's explicit tunnel source",
        BEEXP,
        "IPv6(src=LB2,dst=BEEXP)/IPv6ExtHdrSegmentRouting(addresses=[BEEXP],segleft=0)/"
        f"IPv6(src=CLIENT,dst=VIPEXP,hlim=63)/{TCP_A}",
        "forward",
        f"IPv6(src=CLIENT,dst=VIPEXP,hlim=63)/{TCP_A}",
    ),
    (
        "ip6ip6 from a stranger: refused",
        BE6,
        f"IPv6(src=STRANGER,dst=BE6)/IPv6(src=CLIENT,dst=VIP6,hlim=63)/{TCP_S}",
        "drop",
        "not-from-lb",
    ),
    (
        "srv6 from a stranger: refused",
        BESR,
        "IPv6(src=STRANGER,dst=SID)/IPv6ExtHdrSegmentRouting(addresses=[SID],segleft=0)/"
        f"IPv6(src=CLIENT,dst=VIPSR,hlim=63)/{TCP_S}",
        "drop",
        "not-from-lb",
    ),
    (
        "an SRH with segments left: this backend is not the last segment",
        BESR,
        "IPv6(src=LB,dst=SID)/IPv6ExtHdrSegmentRouting(addresses=['fd00:99::1',SID],segleft=1)/"
        f"IPv6(src=CLIENT,dst=VIPSR,hlim=63)/{TCP_S}",
        "drop",
        "unsupported",
    ),
    (
        "not for this backend",
        BE6,
        f"IPv6(src=LB,dst=BESR)/IPv6(src=CLIENT,dst=VIP6,hlim=63)/{TCP_S}",
        "drop",
        "no-match",
    ),
    (
        "inner destination is not a VIP this backend holds",
        BE6,
        f"IPv6(src=LB,dst=BE6)/IPv6(src=CLIENT,dst='2001:db8:100::99',hlim=63)/{TCP_S}",
        "drop",
        "no-match",
    ),
    (
        "not a tunnel packet",
        BE6,
        f"IPv6(src=LB,dst=BE6)/{TCP_S}",
        "drop",
        "unsupported",
    ),
]
