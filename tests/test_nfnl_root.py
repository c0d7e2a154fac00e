"""The netlink counter reader (engines/kernel/nfnl.py) against nft itself, in a namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

RULES = """table ip6 v6lb_nfnl {
    counter a {
        packets 7 bytes 700
    }
    counter b {
    }
    map m {
        type mark : mark
        elements = { 1 : 2, 3 : 4 }
    }
}
table netdev v6lb_nfnl {
    counter l2 {
        packets 12345678901 bytes 98765432109876
    }
}
"""


def test_read_counters_agrees_with_nft() -> None:
    ns = f"v6lb-nfnl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=RULES, text=True, check=True
        )
        # a child process: setns(2) here would move this test's own thread
        code = (
            "import json, sys\n"
            "from v6lb.engines.kernel.host import enter_netns\n"
            "from v6lb.engines.kernel.nfnl import read_counters\n"
            f"enter_netns({ns!r})\n"
            "print(json.dumps([read_counters('ip6', 'v6lb_nfnl', ['a', 'b', 'missing']),\n"
            "                  read_counters('netdev', 'v6lb_nfnl', ['l2']),\n"
            "                  read_counters('ip6', 'no_such_table', ['a'])]))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        ip6, netdev, none = json.loads(out)
        assert ip6 == {"a": [7, 700], "b": [0, 0]}  # a missing counter is left out
        assert netdev == {"l2": [12345678901, 98765432109876]}  # 64-bit values
        assert none == {}
        listed = json.loads(
            subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "-j", "list", "counters"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )["nftables"]
        by_nft = {
            (c["counter"]["family"], c["counter"]["name"]): [
                c["counter"]["packets"],
                c["counter"]["bytes"],
            ]
            for c in listed
            if "counter" in c
        }
        assert by_nft[("ip6", "a")] == ip6["a"] and by_nft[("netdev", "l2")] == netdev["l2"]
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
