"""Golden NPTv6 cases, Katran-style: input (a scapy expression), port, verdict, output.

Prefixes are the RFC 6296 §3.6 example: inside fd01:203:405::/48, outside
2001:db8:1::/48, adjustment 0xd54f. fd01:203:405:1::1234 <-> 2001:db8:1:d550::1234.
Expected outputs are written independently as scapy expressions with the
translated addresses and the *unchanged* transport checksum of the input
(``CK``): NPTv6 is checksum-neutral, and the tests check scapy agrees.
"""

from __future__ import annotations

INSIDE = "fd01:203:405::/48"
OUTSIDE = "2001:db8:1::/48"
LB = "2001:db8:1::1"  # source of the ICMPv6 errors v6lb sends

IN_HOST = "fd01:203:405:1::1234"
OUT_HOST = "2001:db8:1:d550::1234"
REMOTE = "2001:db8:ffff::80"

# (name, input expression, ingress port ("in"/"out"), verdict, expected output expression or reason)
# In expected expressions, CK is the input's transport checksum and IN is the input's bytes.
GOLDEN = [
    (
        "tcp syn outbound",
        "IPv6(src=IN_HOST,dst=REMOTE,hlim=64)/TCP(sport=40000,dport=443,flags='S')",
        "in",
        "forward",
        "IPv6(src=OUT_HOST,dst=REMOTE,hlim=63)/TCP(sport=40000,dport=443,flags='S',chksum=CK)",
    ),
    (
        "tcp syn-ack inbound",
        "IPv6(src=REMOTE,dst=OUT_HOST,hlim=60)/TCP(sport=443,dport=40000,flags='SA')",
        "out",
        "forward",
        "IPv6(src=REMOTE,dst=IN_HOST,hlim=59)/TCP(sport=443,dport=40000,flags='SA',chksum=CK)",
    ),
    (
        "udp outbound with flow label",
        "IPv6(src=IN_HOST,dst=REMOTE,fl=0xbeef)/UDP(sport=5353,dport=53)/b'query'",
        "in",
        "forward",
        "IPv6(src=OUT_HOST,dst=REMOTE,fl=0xbeef,hlim=63)/UDP(sport=5353,dport=53,chksum=CK)/b'query'",
    ),
    (
        "icmpv6 echo request outbound",
        "IPv6(src=IN_HOST,dst=REMOTE)/ICMPv6EchoRequest(id=7,seq=1,data=b'ping')",
        "in",
        "forward",
        "IPv6(src=OUT_HOST,dst=REMOTE,hlim=63)/ICMPv6EchoRequest(id=7,seq=1,data=b'ping',cksum=CK)",
    ),
    (
        "icmpv6 echo reply inbound",
        "IPv6(src=REMOTE,dst=OUT_HOST)/ICMPv6EchoReply(id=7,seq=1,data=b'ping')",
        "out",
        "forward",
        "IPv6(src=REMOTE,dst=IN_HOST,hlim=63)/ICMPv6EchoReply(id=7,seq=1,data=b'ping',cksum=CK)",
    ),
    (
        "time exceeded inbound quoting our outbound probe (traceroute)",
        "IPv6(src='2001:db8:ff::1',dst=OUT_HOST)/ICMPv6TimeExceeded()/"
        "IPv6(src=OUT_HOST,dst=REMOTE,hlim=1)/UDP(sport=33434,dport=33435)",
        "out",
        "forward",
        "IPv6(src='2001:db8:ff::1',dst=IN_HOST,hlim=63)/ICMPv6TimeExceeded(cksum=CK)/"
        "IPv6(src=IN_HOST,dst=REMOTE,hlim=1)/UDP(sport=33434,dport=33435,chksum=QCK)",
    ),
    (
        "packet too big inbound quoting our outbound tcp",
        "IPv6(src='2001:db8:ff::1',dst=OUT_HOST)/ICMPv6PacketTooBig(mtu=1400)/"
        "IPv6(src=OUT_HOST,dst=REMOTE)/TCP(sport=40000,dport=443,flags='A')/(b'x'*1300)",
        "out",
        "forward",
        "(IPv6(src='2001:db8:ff::1',dst=IN_HOST,hlim=63)/ICMPv6PacketTooBig(mtu=1400,cksum=CK)/"
        "IPv6(src=IN_HOST,dst=REMOTE)/TCP(sport=40000,dport=443,flags='A',chksum=QCK)/(b'x'*1300))",
    ),
    (
        "destination unreachable outbound quoting an inbound packet",
        "IPv6(src=IN_HOST,dst=REMOTE)/ICMPv6DestUnreach(code=4)/"
        "IPv6(src=REMOTE,dst=IN_HOST)/UDP(sport=53,dport=5353)",
        "in",
        "forward",
        "IPv6(src=OUT_HOST,dst=REMOTE,hlim=63)/ICMPv6DestUnreach(code=4,cksum=CK)/"
        "IPv6(src=REMOTE,dst=OUT_HOST)/UDP(sport=53,dport=5353,chksum=QCK)",
    ),
    (
        "extension headers: hop-by-hop, destination options, tcp",
        "IPv6(src=IN_HOST,dst=REMOTE)/IPv6ExtHdrHopByHop()/IPv6ExtHdrDestOpt()/TCP(sport=1,dport=2)",
        "in",
        "forward",
        "IPv6(src=OUT_HOST,dst=REMOTE,hlim=63)/IPv6ExtHdrHopByHop()/IPv6ExtHdrDestOpt()/TCP(sport=1,dport=2,chksum=CK)",
    ),
    (
        "non-first fragment is translated too",
        "IPv6(src=IN_HOST,dst=REMOTE)/IPv6ExtHdrFragment(offset=185,m=0,nh=17,id=9)/(b'y'*64)",
        "in",
        "forward",
        "IPv6(src=OUT_HOST,dst=REMOTE,hlim=63)/IPv6ExtHdrFragment(offset=185,m=0,nh=17,id=9)/(b'y'*64)",
    ),
    (
        "drop: subnet 0xffff outbound -> destination unreachable code 5",
        "IPv6(src='fd01:203:405:ffff::1',dst=REMOTE)/TCP(sport=1,dport=2)",
        "in",
        "reply",
        "IPv6(src=LB,dst='fd01:203:405:ffff::1',hlim=64)/ICMPv6DestUnreach(code=5)/IN",
    ),
    (
        "drop: subnet 0xffff inbound -> destination unreachable code 3",
        "IPv6(src=REMOTE,dst='2001:db8:1:ffff::1')/UDP(sport=1,dport=2)",
        "out",
        "reply",
        "IPv6(src=LB,dst=REMOTE,hlim=64)/ICMPv6DestUnreach(code=3)/IN",
    ),
    (
        "drop: hop limit 1 -> time exceeded",
        "IPv6(src=IN_HOST,dst=REMOTE,hlim=1)/UDP(sport=1,dport=2)",
        "in",
        "reply",
        "IPv6(src=LB,dst=IN_HOST,hlim=64)/ICMPv6TimeExceeded(code=0)/IN",
    ),
    (
        "drop: no prefix matches (not an open relay)",
        "IPv6(src='2001:db8:77::1',dst=REMOTE)/UDP(sport=1,dport=2)",
        "in",
        "drop",
        "no-match",
    ),
    (
        "drop: an ICMPv6 error about a packet with subnet 0xffff is not answered",
        "IPv6(src='2001:db8:ff::1',dst='2001:db8:1:ffff::1')/ICMPv6DestUnreach()/"
        "IPv6(src='2001:db8:1:ffff::1',dst=REMOTE)/UDP()",
        "out",
        "drop",
        "icmp-error-quote-bad",
    ),
]

# Prefixes longer than /48: /64 pairs, the adjusted word is in the interface ID (§3.5).
INSIDE64 = "fd00:1:2:3::/64"
OUTSIDE64 = "2001:db8:5:6::/64"
GOLDEN64 = [
    (
        "/64 tcp outbound",
        "IPv6(src='fd00:1:2:3::2',dst=REMOTE)/TCP(sport=1,dport=2)",
        "in",
        "forward",
        "IPv6(src=MAP64,dst=REMOTE,hlim=63)/TCP(sport=1,dport=2,chksum=CK)",
    ),
    (
        "/64 iid all ones -> parameter problem pointing at the source",
        "IPv6(src='fd00:1:2:3:ffff:ffff:ffff:ffff',dst=REMOTE)/TCP(sport=1,dport=2)",
        "in",
        "reply",
        "IPv6(src=LB,dst='fd00:1:2:3:ffff:ffff:ffff:ffff',hlim=64)/ICMPv6ParamProblem(code=0,ptr=8)/IN",
    ),
]
