"""Golden NAT66 cases, Katran-style: input (a scapy expression), port, verdict, output.

The cases run in order against ONE forwarder (later cases depend on the flows
that earlier ones opened), with ``now`` = the case's index in seconds:

- VIP tcp/443 -> B1:8080 and VIP udp/53 -> B1 (same port), no SNAT;
  an echo request to VIP goes to B1 too (the first service at the address);
- SNAT_VIP tcp/443 -> B2:8443 with SNAT to SNAT, ports 20000-20009.

Expected outputs are written independently as scapy expressions with the
translated fields and no checksum, so scapy computes every checksum itself.
``L4(src, dst, segment)`` is the segment's bytes with the checksum scapy
computes for that address pair (for fragments: over the whole datagram).
``IN`` is the input's bytes (the quote of an error v6lb generates).
"""

from __future__ import annotations

CLIENT = "2001:db8:c::1"
VIP = "2001:db8:f::80"
SNAT_VIP = "2001:db8:f::81"
LB = "2001:db8:f::1"  # source of the ICMPv6 errors v6lb sends
B1 = "fd00:b::1"
B2 = "fd00:b::2"
SNAT = "2001:db8:5::1"
ROUTER = "2001:db8:ff::1"  # a router on the client side
IN_ROUTER = "fd00:ff::1"  # a router between the LB and the backends
SNAT_PORTS = (20000, 20009)

# (name, input expression, ingress port ("out": from a client, "in": from a backend),
#  verdict, expected output expression or drop reason)
GOLDEN = [
    (
        "tcp syn client -> vip: destination becomes the backend, flow label kept",
        "IPv6(src=CLIENT,dst=VIP,fl=0x12345)/TCP(sport=40000,dport=443,flags='S',seq=1000)",
        "out",
        "forward",
        "IPv6(src=CLIENT,dst=B1,fl=0x12345,hlim=63)/TCP(sport=40000,dport=8080,flags='S',seq=1000)",
    ),
    (
        "tcp syn-ack backend -> client: source becomes the vip",
        "IPv6(src=B1,dst=CLIENT)/TCP(sport=8080,dport=40000,flags='SA',seq=5000,ack=1001)",
        "in",
        "forward",
        "IPv6(src=VIP,dst=CLIENT,hlim=63)/TCP(sport=443,dport=40000,flags='SA',seq=5000,ack=1001)",
    ),
    (
        "tcp ack with data client -> vip (established: the fast path)",
        "IPv6(src=CLIENT,dst=VIP)/TCP(sport=40000,dport=443,flags='PA',seq=1001,ack=5001)/b'GET / HTTP/1.1'",
        "out",
        "forward",
        "IPv6(src=CLIENT,dst=B1,hlim=63)/TCP(sport=40000,dport=8080,flags='PA',seq=1001,ack=5001)/b'GET / HTTP/1.1'",
    ),
    (
        "tcp data backend -> client (the fast path)",
        "IPv6(src=B1,dst=CLIENT,hlim=64)/TCP(sport=8080,dport=40000,flags='PA',seq=5001,ack=1015)/b'HTTP/1.1 200 OK'",
        "in",
        "forward",
        "IPv6(src=VIP,dst=CLIENT,hlim=63)/TCP(sport=443,dport=40000,flags='PA',seq=5001,ack=1015)/b'HTTP/1.1 200 OK'",
    ),
    (
        "udp client -> vip: backend port unset, the client's port is kept",
        "IPv6(src=CLIENT,dst=VIP)/UDP(sport=5353,dport=53)/b'query'",
        "out",
        "forward",
        "IPv6(src=CLIENT,dst=B1,hlim=63)/UDP(sport=5353,dport=53)/b'query'",
    ),
    (
        "udp reply backend -> client",
        "IPv6(src=B1,dst=CLIENT)/UDP(sport=53,dport=5353)/b'answer'",
        "in",
        "forward",
        "IPv6(src=VIP,dst=CLIENT,hlim=63)/UDP(sport=53,dport=5353)/b'answer'",
    ),
    (
        "icmpv6 echo request client -> vip",
        "IPv6(src=CLIENT,dst=VIP)/ICMPv6EchoRequest(id=7,seq=1,data=b'ping')",
        "out",
        "forward",
        "IPv6(src=CLIENT,dst=B1,hlim=63)/ICMPv6EchoRequest(id=7,seq=1,data=b'ping')",
    ),
    (
        "icmpv6 echo reply backend -> client",
        "IPv6(src=B1,dst=CLIENT)/ICMPv6EchoReply(id=7,seq=1,data=b'ping')",
        "in",
        "forward",
        "IPv6(src=VIP,dst=CLIENT,hlim=63)/ICMPv6EchoReply(id=7,seq=1,data=b'ping')",
    ),
    (
        "destination unreachable from the client about an echo reply: to the backend",
        "IPv6(src=CLIENT,dst=VIP)/ICMPv6DestUnreach(code=1)/"
        "IPv6(src=VIP,dst=CLIENT,hlim=63)/ICMPv6EchoReply(id=7,seq=1,data=b'ping')",
        "out",
        "forward",
        "IPv6(src=CLIENT,dst=B1,hlim=63)/ICMPv6DestUnreach(code=1)/"
        "IPv6(src=B1,dst=CLIENT,hlim=63)/ICMPv6EchoReply(id=7,seq=1,data=b'ping')",
    ),
    (
        "packet too big from a client-side router about a reply: to the backend, quote translated",
        "IPv6(src=ROUTER,dst=VIP)/ICMPv6PacketTooBig(mtu=1400)/"
        "IPv6(src=VIP,dst=CLIENT,hlim=62)/TCP(sport=443,dport=40000,flags='PA',seq=5016,ack=1015)/(b'x'*100)",
        "out",
        "forward",
        "IPv6(src=ROUTER,dst=B1,hlim=63)/ICMPv6PacketTooBig(mtu=1400)/"
        "IPv6(src=B1,dst=CLIENT,hlim=62)/TCP(sport=8080,dport=40000,flags='PA',seq=5016,ack=1015)/(b'x'*100)",
    ),
    (
        "packet too big from an inside router about a client packet: to the client, from the vip",
        "IPv6(src=IN_ROUTER,dst=CLIENT)/ICMPv6PacketTooBig(mtu=1280)/"
        "IPv6(src=CLIENT,dst=B1,hlim=60)/TCP(sport=40000,dport=8080,flags='A',seq=1015,ack=5016)/(b'y'*100)",
        "in",
        "forward",
        "IPv6(src=VIP,dst=CLIENT,hlim=63)/ICMPv6PacketTooBig(mtu=1280)/"
        "IPv6(src=CLIENT,dst=VIP,hlim=60)/TCP(sport=40000,dport=443,flags='A',seq=1015,ack=5016)/(b'y'*100)",
    ),
    (
        "packet too big with an mtu below 1280: relayed unchanged and counted (RFC 8201 §4)",
        "IPv6(src=ROUTER,dst=VIP)/ICMPv6PacketTooBig(mtu=1000)/"
        "IPv6(src=VIP,dst=CLIENT,hlim=62)/TCP(sport=443,dport=40000,flags='A')",
        "out",
        "forward",
        "IPv6(src=ROUTER,dst=B1,hlim=63)/ICMPv6PacketTooBig(mtu=1000)/"
        "IPv6(src=B1,dst=CLIENT,hlim=62)/TCP(sport=8080,dport=40000,flags='A')",
    ),
    (
        "port unreachable from the backend about a udp query: to the client, from the vip",
        "IPv6(src=B1,dst=CLIENT)/ICMPv6DestUnreach(code=4)/"
        "IPv6(src=CLIENT,dst=B1,hlim=63)/UDP(sport=5353,dport=53)/b'query'",
        "in",
        "forward",
        "IPv6(src=VIP,dst=CLIENT,hlim=63)/ICMPv6DestUnreach(code=4)/"
        "IPv6(src=CLIENT,dst=VIP,hlim=63)/UDP(sport=5353,dport=53)/b'query'",
    ),
    (
        "time exceeded quoting a flow nobody tracks: dropped",
        "IPv6(src=ROUTER,dst=VIP)/ICMPv6TimeExceeded()/"
        "IPv6(src=VIP,dst=CLIENT)/TCP(sport=443,dport=41111,flags='A')",
        "out",
        "drop",
        "icmp-error-unmatched",
    ),
    (
        "first fragment of a udp datagram: creates the flow, checksum updated for the whole datagram",
        "IPv6(src=CLIENT,dst=VIP)/IPv6ExtHdrFragment(nh=17,m=1,id=0xabc)/"
        "Raw(L4(CLIENT,VIP,UDP(sport=6000,dport=53)/(b'z'*96))[:56])",
        "out",
        "forward",
        "IPv6(src=CLIENT,dst=B1,hlim=63)/IPv6ExtHdrFragment(nh=17,m=1,id=0xabc)/"
        "Raw(L4(CLIENT,B1,UDP(sport=6000,dport=53)/(b'z'*96))[:56])",
    ),
    (
        "later fragment of the same datagram: addresses rewritten",
        "IPv6(src=CLIENT,dst=VIP)/IPv6ExtHdrFragment(nh=17,m=0,offset=7,id=0xabc)/"
        "Raw(L4(CLIENT,VIP,UDP(sport=6000,dport=53)/(b'z'*96))[56:])",
        "out",
        "forward",
        "IPv6(src=CLIENT,dst=B1,hlim=63)/IPv6ExtHdrFragment(nh=17,m=0,offset=7,id=0xabc)/"
        "Raw(L4(CLIENT,B1,UDP(sport=6000,dport=53)/(b'z'*96))[56:])",
    ),
    (
        "later fragment whose first fragment was not seen: dropped",
        "IPv6(src=CLIENT,dst=VIP)/IPv6ExtHdrFragment(nh=17,m=0,offset=7,id=0xdead)/(b'z'*48)",
        "out",
        "drop",
        "fragment-unmatched",
    ),
    (
        "destination options before tcp: walked and translated (the general path)",
        "IPv6(src=CLIENT,dst=VIP)/IPv6ExtHdrDestOpt()/TCP(sport=40001,dport=443,flags='S')",
        "out",
        "forward",
        "IPv6(src=CLIENT,dst=B1,hlim=63)/IPv6ExtHdrDestOpt()/TCP(sport=40001,dport=8080,flags='S')",
    ),
    (
        "unknown next header 150 to the vip: no transport header to translate",
        "IPv6(src=CLIENT,dst=VIP,nh=150)/Raw(bytes([6,0])+bytes(6))",
        "out",
        "drop",
        "unsupported",
    ),
    (
        "hop limit 1: time exceeded from the lb, no flow created",
        "IPv6(src=CLIENT,dst=VIP,hlim=1)/TCP(sport=40002,dport=443,flags='S')",
        "out",
        "reply",
        "IPv6(src=LB,dst=CLIENT,hlim=64)/ICMPv6TimeExceeded(code=0)/IN",
    ),
    (
        "a non-syn tcp segment without a flow: dropped",
        "IPv6(src=CLIENT,dst=VIP)/TCP(sport=40003,dport=443,flags='A')",
        "out",
        "drop",
        "invalid-state",
    ),
    (
        "to no vip: not an open relay",
        "IPv6(src=CLIENT,dst='2001:db8:f::99')/TCP(sport=40004,dport=443,flags='S')",
        "out",
        "drop",
        "no-match",
    ),
    (
        "a vip port that is not configured",
        "IPv6(src=CLIENT,dst=VIP)/TCP(sport=40004,dport=8443,flags='S')",
        "out",
        "drop",
        "no-match",
    ),
    (
        "from a backend, not a reply of any flow: the inside opens nothing",
        "IPv6(src=B1,dst=CLIENT)/TCP(sport=8080,dport=40999,flags='S')",
        "in",
        "drop",
        "no-match",
    ),
    (
        "snat: syn client -> snat vip: source becomes the snat address and first port",
        "IPv6(src=CLIENT,dst=SNAT_VIP)/TCP(sport=40000,dport=443,flags='S')",
        "out",
        "forward",
        "IPv6(src=SNAT,dst=B2,hlim=63)/TCP(sport=20000,dport=8443,flags='S')",
    ),
    (
        "snat: syn-ack backend -> snat address becomes vip -> client",
        "IPv6(src=B2,dst=SNAT)/TCP(sport=8443,dport=20000,flags='SA')",
        "in",
        "forward",
        "IPv6(src=SNAT_VIP,dst=CLIENT,hlim=63)/TCP(sport=443,dport=40000,flags='SA')",
    ),
    (
        "snat: a second flow of the client gets the next port",
        "IPv6(src=CLIENT,dst=SNAT_VIP)/TCP(sport=40001,dport=443,flags='S')",
        "out",
        "forward",
        "IPv6(src=SNAT,dst=B2,hlim=63)/TCP(sport=20001,dport=8443,flags='S')",
    ),
    (
        "snat: packet too big from a client-side router: to the backend, from the snat address",
        "IPv6(src=ROUTER,dst=SNAT_VIP)/ICMPv6PacketTooBig(mtu=1400)/"
        "IPv6(src=SNAT_VIP,dst=CLIENT,hlim=61)/TCP(sport=443,dport=40000,flags='A')/(b'x'*64)",
        "out",
        "forward",
        "IPv6(src=SNAT,dst=B2,hlim=63)/ICMPv6PacketTooBig(mtu=1400)/"
        "IPv6(src=B2,dst=SNAT,hlim=61)/TCP(sport=8443,dport=20000,flags='A')/(b'x'*64)",
    ),
    (
        "snat: packet too big from an inside router: to the client, from the vip",
        "IPv6(src=IN_ROUTER,dst=SNAT)/ICMPv6PacketTooBig(mtu=1300)/"
        "IPv6(src=SNAT,dst=B2,hlim=62)/TCP(sport=20000,dport=8443,flags='A')/(b'y'*64)",
        "in",
        "forward",
        "IPv6(src=SNAT_VIP,dst=CLIENT,hlim=63)/ICMPv6PacketTooBig(mtu=1300)/"
        "IPv6(src=CLIENT,dst=SNAT_VIP,hlim=62)/TCP(sport=40000,dport=443,flags='A')/(b'y'*64)",
    ),
    (
        "snat: an error to the vip quoting a packet from another source: dropped",
        "IPv6(src=ROUTER,dst=SNAT_VIP)/ICMPv6PacketTooBig(mtu=1400)/"
        "IPv6(src=VIP,dst=CLIENT)/TCP(sport=443,dport=40000,flags='A')",
        "out",
        "drop",
        "icmp-error-unmatched",
    ),
]
