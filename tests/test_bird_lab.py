"""BIRD 2 in namespaces: an upstream router and two LB speakers announcing one VIP, with BFD.

Topology (one veth link per speaker)::

    lb1 (AS 65001) 2001:db8:1::2 --- 2001:db8:1::1 router (AS 65000) 2001:db8:2::1 --- 2001:db8:2::2 lb2

Both speakers announce 2001:db8:a::1/128 (hold 3, keepalive 1, BFD 100 ms x 3).
The router must install one ECMP route with both speakers as next hops, then
converge to lb2 alone within 1 s after: a withdraw on lb1 (birdc), a SIGKILL
of lb1's bird, and a silent failure of lb1 (nftables drops everything in its
namespace: no FIN, no RST, only BFD notices). Each time lb1 comes back and
the route has two next hops again. The measured times are printed (run with
``-s``) and recorded in docs/anycast.md.

Namespaces are ``v6lb-b-<pid>-<n>``, removed in ``finally`` with every bird
started here. Addresses: 2001:db8::/32 only.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv6Address, IPv6Network

import pytest

from v6lb.engines.bird import Bird, set_l4_ecmp_hash, start_bird
from v6lb.model.bgp import BfdSettings, BgpSettings, Neighbour
from v6lb.render.bird import SpeakerRoute, render_router, render_speaker

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="needs bird2 (apt-get install bird2)"),
]

_counter = itertools.count()
VIP = IPv6Network("2001:db8:a::1/128")
R1, LB1 = "2001:db8:1::1", "2001:db8:1::2"
R2, LB2 = "2001:db8:2::1", "2001:db8:2::2"
BFD = BfdSettings(True, 0.1, 3)  # hold 3 / keepalive 1 are the BgpSettings defaults
LIMIT = 1.0  # seconds: the convergence target of issue 8


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{' '.join(argv)}: {r.stderr}"
    return r.stdout


def nsx(ns: str, *argv: str) -> str:
    return sh("ip", "netns", "exec", ns, *argv)


@contextmanager
def lab() -> Iterator[tuple[dict[str, str], str, list[Bird]]]:
    names = {r: f"v6lb-b-{os.getpid()}-{next(_counter)}" for r in ("router", "lb1", "lb2")}
    made: list[str] = []
    birds: list[Bird] = []
    work = tempfile.mkdtemp(prefix="v6lb-bird-")
    try:
        for ns in names.values():
            sh("ip", "netns", "add", ns)
            made.append(ns)
            nsx(ns, "ip", "link", "set", "lo", "up")
        rt = names["router"]
        nsx(rt, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        set_l4_ecmp_hash(rt)
        for i, (lb, r_addr, lb_addr) in enumerate(
            ((names["lb1"], R1, LB1), (names["lb2"], R2, LB2)), 1
        ):
            sh(
                "ip",
                "link",
                "add",
                f"r{i}",
                "netns",
                rt,
                "type",
                "veth",
                "peer",
                "name",
                "up0",
                "netns",
                lb,
            )
            nsx(rt, "ip", "-6", "addr", "add", f"{r_addr}/64", "dev", f"r{i}", "nodad")
            nsx(lb, "ip", "-6", "addr", "add", f"{lb_addr}/64", "dev", "up0", "nodad")
            nsx(rt, "ip", "link", "set", f"r{i}", "up")
            nsx(lb, "ip", "link", "set", "up0", "up")
        yield names, work, birds
    finally:
        for b in birds:
            b.kill()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def nexthops(router_ns: str) -> set[str]:
    out = nsx(router_ns, "ip", "-6", "route", "show", str(VIP))
    return set(re.findall(r"via (\S+)", out))


def wait_for(router_ns: str, want: set[str], timeout: float) -> float:
    """Seconds until the router's VIP route has exactly ``want`` as next hops."""
    t0 = time.monotonic()
    while True:
        got = nexthops(router_ns)
        elapsed = time.monotonic() - t0
        if got == want:
            return elapsed
        if elapsed > timeout:
            raise AssertionError(
                f"next hops {sorted(got)} after {elapsed:.2f} s, want {sorted(want)}"
            )
        time.sleep(0.005)


def speaker_conf(name: str, rid: str, r_addr: str) -> str:
    settings = BgpSettings(
        65001,
        rid,
        med=10,
        neighbours=(Neighbour("upstream", IPv6Address(r_addr), 65000, "up0"),),
        hold=3,
        keepalive=1,
        bfd=BFD,
    )
    return render_speaker(name, settings, [SpeakerRoute(VIP)])


def test_ecmp_withdraw_kill_silent_failure() -> None:
    router = BgpSettings(
        65000,
        "192.0.2.1",
        neighbours=(
            Neighbour("lb1", IPv6Address(LB1), 65001, "r1"),
            Neighbour("lb2", IPv6Address(LB2), 65001, "r2"),
        ),
        hold=3,
        keepalive=1,
        bfd=BFD,
    )
    figures: dict[str, float] = {}
    with lab() as (ns, work, birds):
        rt = ns["router"]
        both = {LB1, LB2}
        conf1 = speaker_conf("lb1", "192.0.2.11", R1)
        birds.append(start_bird("router", render_router("router", router), work, netns=rt))
        lb1 = start_bird("lb1", conf1, work, netns=ns["lb1"])
        birds.append(lb1)
        birds.append(
            start_bird("lb2", speaker_conf("lb2", "192.0.2.12", R2), work, netns=ns["lb2"])
        )
        birds[0].wait_established(timeout=20)
        figures["initial"] = wait_for(rt, both, 10)
        assert nsx(rt, "sysctl", "-n", "net.ipv6.fib_multipath_hash_policy").strip() == "1"
        bfd = birds[0].birdc("show", "bfd", "sessions")
        assert bfd.count(" Up ") == 2, bfd

        # 1. withdraw on lb1 (birdc disable of its static protocol)
        lb1.withdraw(VIP)
        figures["withdraw"] = wait_for(rt, {LB2}, LIMIT)
        lb1.announce(VIP)
        figures["announce"] = wait_for(rt, both, 5)

        # 2. SIGKILL of lb1's bird: the kernel closes its TCP session
        lb1.kill(signal.SIGKILL)
        figures["sigkill"] = wait_for(rt, {LB2}, LIMIT)
        lb1 = start_bird("lb1", conf1, work, netns=ns["lb1"])
        birds.append(lb1)
        figures["restart"] = wait_for(rt, both, 15)

        # 3. silent failure: lb1's namespace drops every packet; only BFD can tell
        drop = (
            "table inet v6lb_silent {\n"
            "  chain in { type filter hook input priority -300; policy drop; }\n"
            "  chain out { type filter hook output priority -300; policy drop; }\n"
            "}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", ns["lb1"], "nft", "-f", "-"], input=drop, text=True, check=True
        )
        figures["silent"] = wait_for(rt, {LB2}, LIMIT)
        nsx(ns["lb1"], "nft", "delete", "table", "inet", "v6lb_silent")
        figures["recover"] = wait_for(rt, both, 15)
        assert lb1.protocols()["upstream"].established

    print("\nbird convergence (s): " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    assert figures["withdraw"] < LIMIT and figures["sigkill"] < LIMIT and figures["silent"] < LIMIT
