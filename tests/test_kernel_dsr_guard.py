"""The tunnel-DSR rules of ``mangle_pre`` in a real kernel: marks, counters and the guard.

The mark rules come before the unserved-port guard and end in ``accept`` (cheaper
per packet, docs/benchmarks.md). This checks, with real packets in a private LB
namespace, that the order changes nothing: served traffic is counted by its
VIP's counter and carries its backend's mark into later prerouting chains (the
``accept`` ends v6lb's chain only), unserved ports of the address are dropped
and counted, ICMPv6 passes, and other addresses are left alone.

Namespaces ``v6lb-g-<pid>-<n>``, deleted in ``finally``; 2001:db8::/32 and fd00::/8 only.
"""

from __future__ import annotations

import sys
from ipaddress import IPv6Address
from typing import Any

import pytest

from netns_helpers import link, namespaces, nsx
from v6lb.engines.kernel import apply_nft, nft_counters
from v6lb.model.config import parse_config
from v6lb.render.nftables import render_nft, unserved_counters, vip_counter
from v6lb.render.routes import tunnel_targets

VIP = "2001:db8:d::90"
OTHER = "2001:db8:d::99"  # not a VIP
FILE: dict[str, Any] = {
    "lb": {
        "instance": "t-guard",
        "flow_hash_seed": 0x5EED,
        "interfaces": ["l0"],
        "addresses": ["2001:db8:c::1"],
    },
    "vips": [
        {
            "name": "tun-udp",
            "address": VIP,
            "ports": [5201],
            "protocol": "udp",
            "mode": "dsr-ip6ip6",
            "health": {"type": "none"},
            "backends": [{"address": "fd00:e::1"}],
            "tunnel_source": "2001:db8:c::1",
        },
        {
            "name": "srv6-tcp",
            "address": VIP,
            "ports": [80],
            "protocol": "tcp",
            "mode": "dsr-srv6",
            "health": {"type": "none"},
            "backends": [{"address": "2001:db8:b::10", "sid": "fd00:e::100"}],
            "tunnel_source": "2001:db8:c::1",
        },
    ],
}
SEND = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
    "for i in range(int(sys.argv[3])):\n"
    "    s.sendto(b'x' * 32, (sys.argv[1], int(sys.argv[2])))\n"
)

# The kernel fills in an ICMPv6 raw socket's checksum; the type is 128, echo request.
ECHO = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)\n"
    "for seq in (1, 2):\n"
    "    s.sendto(bytes([128, 0, 0, 0, 0x12, 0x34, 0, seq]) + b'ping', (sys.argv[1], 0))\n"
)


@pytest.mark.root
def test_marks_then_guard_count_and_drop_as_before() -> None:
    config = parse_config(FILE)
    mark = next(t.mark for t in tunnel_targets(config) if t.vip.name == "tun-udp")
    with namespaces("client", "lb", tag="g") as ns:
        c, lb = ns["client"], ns["lb"]
        link(c, "c0", lb, "l0")
        nsx(c, "ip", "-6", "address", "add", "2001:db8:c::2/64", "dev", "c0", "nodad")
        nsx(lb, "ip", "-6", "address", "add", "2001:db8:c::1/64", "dev", "l0", "nodad")
        nsx(c, "ip", "-6", "route", "add", "2001:db8:d::/64", "via", "2001:db8:c::1")
        apply_nft(render_nft(config), netns=lb)
        # A later prerouting chain of our own sees what v6lb's chain let through.
        nsx(lb, "nft", "-f", "-", stdin=(
            "table ip6 probe {\n"
            "  counter marked {\n  }\n"
            "  counter vip {\n  }\n"
            "  chain after {\n"
            "    type filter hook prerouting priority mangle + 10; policy accept;\n"
            f'    ip6 daddr {VIP} meta mark {mark:#x} counter name "marked"\n'
            f'    ip6 daddr {VIP} counter name "vip"\n'
            "  }\n"
            "}\n"
        ))  # fmt: skip
        nsx(c, sys.executable, "-c", SEND, VIP, "5201", "20")  # served (udp . 5201)
        nsx(c, sys.executable, "-c", SEND, VIP, "80", "7")  # unserved: 80 is tcp only
        nsx(c, sys.executable, "-c", SEND, VIP, "5300", "3")  # unserved
        nsx(c, sys.executable, "-c", SEND, OTHER, "5300", "4")  # another address
        nsx(c, sys.executable, "-c", ECHO, VIP)  # two echo requests: ICMPv6 passes
        counters = nft_counters("t-guard", netns=lb)
        probe = nsx(lb, "nft", "list", "counters", "table", "ip6", "probe")

    served = vip_counter(config, config.vip("tun-udp"))
    unserved = unserved_counters(config)[IPv6Address(VIP)]
    assert counters[served][0] == 20, counters
    assert counters[unserved][0] == 10, counters  # 7 + 3; the echo requests pass
    assert counters[vip_counter(config, config.vip("srv6-tcp"))][0] == 0, counters
    blocks = {b.split("{")[0].split()[-1]: b for b in probe.split("counter ")[1:]}
    # 20 marked datagrams and 2 echo requests reached the later chain; nothing unserved.
    assert "packets 20 " in blocks["marked"], probe
    assert "packets 22 " in blocks["vip"], probe
