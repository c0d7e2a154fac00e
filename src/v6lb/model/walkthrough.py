"""Plain-text walk-throughs that explain a translation step by step.

The NPTv6 walk-through runs the real core on a real packet built by the wire
builders, and reports what changed: nothing here is canned text about numbers.
"""

from __future__ import annotations

import ipaddress

from v6lb.core.nptv6 import NptForwarder, NptMapping
from v6lb.core.verdict import ACTION_NAMES, DROP, FORWARD, PORT_INSIDE, PORT_OUTSIDE, REPLY
from v6lb.wire import build
from v6lb.wire.checksum import verify
from v6lb.wire.constants import NH_TCP, OFF_DST, OFF_SRC
from v6lb.wire.ipv6 import PacketInfo, get_dport, get_sport, parse
from v6lb.wire.reasons import Reason

RFC_INSIDE = "fd01:203:405::/48"
RFC_OUTSIDE = "2001:db8:1::/48"


def _words(net: ipaddress.IPv6Network) -> str:
    p = net.network_address.packed
    return ":".join(f"{int.from_bytes(p[i : i + 2], 'big'):04x}" for i in range(0, 8, 2))


def _sum64(net: ipaddress.IPv6Network) -> int:
    s = 0
    p = net.network_address.packed
    for i in range(0, 8, 2):
        s += int.from_bytes(p[i : i + 2], "big")
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _tcp_line(pkt: bytes | bytearray) -> str:
    info = PacketInfo()
    parse(pkt, info)
    src = build.ntop(pkt[OFF_SRC : OFF_SRC + 16])
    dst = build.ntop(pkt[OFF_DST : OFF_DST + 16])
    sp = get_sport(pkt, info.l4_off)
    dp = get_dport(pkt, info.l4_off)
    csum = int.from_bytes(pkt[info.l4_off + 16 : info.l4_off + 18], "big")
    ok = verify(bytes(pkt[8:24]), bytes(pkt[24:40]), NH_TCP, pkt[info.l4_off : info.end])
    return (
        f"[{src}]:{sp} -> [{dst}]:{dp}  tcp checksum 0x{csum:04x} ({'valid' if ok else 'INVALID'})"
    )


def npt_walkthrough(inside: str = RFC_INSIDE, outside: str = RFC_OUTSIDE) -> str:
    """Translate a TCP exchange through NPTv6 and explain every step."""
    m = NptMapping(inside, outside)
    lines: list[str] = []
    out = lines.append
    out("v6lb demo: NPTv6 (RFC 6296), the stateless answer to 'does NAT66 happen?'")
    out("")
    out(f"inside prefix   {m.inside}   (private, e.g. the pod/node subnet)")
    out(f"outside prefix  {m.outside}   (public)")
    out("")
    out("1. The adjustment (RFC 6296 §3.1): both prefixes zero-extended to /64,")
    si, so = _sum64(m.inside), _sum64(m.outside)
    out(
        f"   one's-complement sum of {_words(m.inside)} = 0x{si:04x}  (complement 0x{si ^ 0xFFFF:04x})"
    )
    out(
        f"   one's-complement sum of {_words(m.outside)} = 0x{so:04x}  (complement 0x{so ^ 0xFFFF:04x})"
    )
    out(f"   adjustment = sum(inside) - sum(outside) = 0x{m.adjustment:04x}")
    word = (
        "the subnet word (bits 48-63, §3.4)"
        if m.length <= 48
        else "the first IID word that is not 0xffff (§3.5)"
    )
    out(f"   it is added to {word} outbound and subtracted inbound.")
    out("")
    host = next(iter(m.inside.subnets(new_prefix=64))).network_address + 0x1234
    if m.length <= 48:
        host = ipaddress.IPv6Address(int(m.inside.network_address) | (1 << 64) | 0x1234)
    server = ipaddress.IPv6Address("2001:db8:ffff::80")
    pkt = build.tcp(host, server, 40000, 443, seq=1, flags=0x02)
    fwd = NptForwarder([m], ipaddress.IPv6Address(int(m.outside.network_address) | 1).packed)
    out("2. Outbound: an inside host opens a TCP connection to a server on the internet.")
    out(f"   before  {_tcp_line(pkt)}")
    action, port, data = fwd.process(pkt, PORT_INSIDE, 0.0)
    assert action == FORWARD and isinstance(data, bytearray)
    out(f"   after   {_tcp_line(data)}   verdict: {ACTION_NAMES[action]} out of port {port}")
    mapped = build.ntop(data[OFF_SRC : OFF_SRC + 16])
    out(f"   source {host} became {mapped}: prefix replaced, subnet word adjusted;")
    out("   ports and the TCP checksum are unchanged, and the checksum is still valid,")
    out("   because the mapping keeps the one's-complement sum of the address the same.")
    out("")
    reply = build.tcp(server, mapped, 443, 40000, seq=100, ack=2, flags=0x12)
    out("3. Inbound: the server's SYN-ACK comes back to the mapped address.")
    out(f"   before  {_tcp_line(reply)}")
    action, port, data = fwd.process(reply, PORT_OUTSIDE, 0.0)
    assert action == FORWARD and isinstance(data, bytearray)
    out(f"   after   {_tcp_line(data)}   verdict: {ACTION_NAMES[action]} out of port {port}")
    out("   The inverse mapping restores the inside address exactly. No state was kept:")
    out(
        "   NPTv6 is 1:1 and stateless, so it is NOT NAT66 in the stateful sense; ports never change."
    )
    out("")
    bad = ipaddress.IPv6Address(int(m.inside.network_address) | (0xFFFF << 64) | 1)
    out(f"4. A drop rule: {bad} uses subnet 0xffff, which has no mapping (§3.2, §4.2).")
    if m.length <= 48:
        probe = build.tcp(bad, server, 40001, 443, flags=0x02)
        action, arg, data = fwd.process(probe, PORT_INSIDE, 1.0)
        if action == REPLY and isinstance(data, bytearray):
            out(
                f"   verdict: dropped ({Reason.NPT_NO_MAPPING.label}); v6lb answers with ICMPv6 type {data[40]} "
                f"code {data[41]} (Destination Unreachable) to {build.ntop(data[24:40])}, {len(data)} bytes."
            )
        elif action == DROP:
            out(f"   verdict: dropped ({Reason(arg).label}).")
        out("   (Linux's ip6t_NPT translates it anyway; v6lb follows the RFC.)")
    out("")
    out("5. What NPTv6 does not do: balance load. It maps the whole inside prefix 1:1,")
    out("   so each backend is reachable at its own mapped address. To spread clients")
    out("   over backends, publish one AAAA record per backend's mapped address and let")
    out("   clients choose. The cost: no health-driven failover within a flow, and a")
    out("   failed backend stays in DNS answers until the record's TTL expires.")
    return "\n".join(lines) + "\n"
