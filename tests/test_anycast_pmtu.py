"""PMTU discovery through anycast DSR: a Packet Too Big that reaches the *other* LB instance.

A DSR backend answers the client with the VIP as source, so a router whose next link is
too small sends its ICMPv6 Packet Too Big (PTB) to the VIP, that is to whichever LB
instance the router's ECMP picks for the ICMP packet, which need not be the one that
carries the flow. Both instances of a site share the file and the seed, so the other
instance's Maglev choice over the quoted flow names the same backend. This test forces
the split and checks that the PTB still reaches the backend that sent the segment.

The lab is examples/anycast-sites.yaml built by :func:`v6lb.lab.failover.build` (real
BIRD/BGP+BFD, `v6lb run` on every LB, `v6lb backend` dsr-srv6 backends), from a copy in
which

* the link between r-a and the upstream (tr-a) has MTU 1280, every other link 1500: the
  client advertises MSS 1440, so every full-size reply segment (1500 bytes) is too big
  for tr-a and r-a answers it with a PTB to the VIP;
* the VIP also serves port 8080, where the lab httpd (`python -m v6lb.lab.httpd`) runs on
  the primary backends next to the lab's greet servers on port 80 (the health checks').

On r-a, policy routing (`ip -6 rule ... ipproto tcp|ipv6-icmp to VIP/128`, before the
main table's ECMP route) sends the client's TCP to lb-a1 only and every ICMPv6 to the
VIP, r-a's own PTBs included, to lb-a2 only. The client downloads 150 KB from the VIP.
Asserted, once with both instances on the kernel data plane and once on the python data
plane (dsr-srv6 both times, one lab each):

* the download completes (it cannot without PMTU discovery: nothing else shrinks the
  backend's 1500-byte segments);
* r-a sent N >= 1 PTBs (its Icmp6OutPktTooBigs); lb-a2 received all N and no TCP, lb-a1
  received the TCP and no PTB (an nft counter on ingress of each LB's LAN link);
* lb-a2's data plane forwarded the N PTBs (kernel: its nft counter ``v0_web_icmp``;
  python: its DSR forwarder's ``forwarded``, all of which are ICMP since lb-a2 got no
  TCP), lb-a1's forwarded none (kernel: ``v0_web_icmp`` 0); both instances' ``v6lb
  status`` agree (``icmp_errors``: lb-a2 forwarded N, lb-a1 0, none unmatched);
* the backend that served the download (the httpd's JSON says which) has a PMTU of 1280
  towards the client (`ip -6 route get CLIENT from VIP` in its namespace, after a flush
  before the download), the other primary backend has none.

Namespaces ``v6lb-fo<pid>-<node>``; the lab and every process are removed on exit,
checked at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from v6lb.engines.control import query
from v6lb.lab.failover import Lab, build
from v6lb.render.nftables import icmp_error_counter, table_name

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="needs bird2 (apt-get install bird2)"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl"),
]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "anycast-sites.yaml"
HTTP_PORT = 8080  # the lab httpd; port 80 keeps the lab's greet servers (health checks)
WAN = "tr-a"  # r-a's uplink: the 1280-byte link
MTU = 1280
BYTES = 150_000
TCP_TABLE, ICMP_TABLE = 100, 101  # r-a's policy routing tables


def _sites_file(tmp_path: Path) -> Path:
    data = yaml.safe_load(EXAMPLE.read_text())
    for link in data["topology"]["links"]:
        link["mtu"] = MTU if link["name"] == WAN else 1500
    (vip,) = data["vips"]
    vip["ports"] = [80, HTTP_PORT]
    path = tmp_path / "anycast-sites-pmtu.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _meter(lab: Lab, lb: str) -> str:
    """An nft table counting what reaches ``lb`` for the VIP from the site LAN: on ingress
    of that link, before the python data plane's rings steer it (netdev, priority -500)."""
    head = f"ip6 daddr {lab.vip}"
    dev = lab.ifname(lb, lab.sites[0].lan)
    return (
        "table netdev pmtutest {\n"
        "  counter to_tcp {}\n  counter to_ptb {}\n"
        f'  chain pre {{ type filter hook ingress device "{dev}" priority -600;\n'
        f'    {head} meta l4proto tcp counter name "to_tcp"\n'
        f'    {head} icmpv6 type packet-too-big counter name "to_ptb"\n'
        "  }\n}\n"
    )


def _counter(lab: Lab, node: str, table: str, name: str, family: str = "ip6") -> int:
    out = lab.nsx(node, "nft", "-j", "list", "counter", family, table, name)
    (c,) = [x["counter"] for x in json.loads(out)["nftables"] if "counter" in x]
    return int(c["packets"])


def _ptbs_sent(lab: Lab, router: str) -> int:
    """How many Packet Too Big ``router`` has sent (its namespace's /proc/net/snmp6)."""
    text = lab.nsx(router, "cat", "/proc/net/snmp6")
    m = re.search(r"^Icmp6OutPktTooBigs\s+(\d+)$", text, re.M)
    assert m is not None, text
    return int(m.group(1))


def _pmtu(lab: Lab, backend: str, client: str) -> int | None:
    """The backend's path MTU towards the client for replies from the VIP (None: the link's)."""
    out = lab.nsx(backend, "ip", "-6", "route", "get", client, "from", str(lab.vip))
    m = re.search(r"\bmtu (\d+)", out)
    return int(m.group(1)) if m else None


def _start_httpd(lab: Lab, node: str, ready: Path) -> subprocess.Popen[bytes]:
    addr = str(lab.addr(node, lab.sites[0].lan))
    p = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns[node], sys.executable, "-m", "v6lb.lab.httpd"]
        + ["--node", node, "--address", addr, "--port", str(HTTP_PORT), "--ready", str(ready)],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert p.poll() is None and time.monotonic() < deadline, (
            f"the httpd on {node} did not start"
        )
        time.sleep(0.02)
    return p


def _icmp_errors(status: dict[str, Any]) -> dict[str, int]:
    """The VIP's ``icmp_errors`` in an instance's status: forwarded and unmatched (dropped)."""
    (vip,) = status["vips"]
    return {k: int(vip["icmp_errors"][k]) for k in ("forwarded", "unmatched")}


@pytest.mark.parametrize("dataplane", ["kernel", "python"])
def test_ptb_to_the_other_instance_reaches_the_flows_backend(
    dataplane: str, tmp_path: Path
) -> None:
    t_start = time.monotonic()
    path = _sites_file(tmp_path)
    with build(path, dataplane=dataplane) as lab:
        name = lab.plan.name
        t_built = time.monotonic() - t_start
        primary = lab.sites[0]
        ra, (a1, a2) = primary.router, primary.lbs
        vip, client = str(lab.vip), str(lab.addr(lab.client, "edge"))
        assert lab.nsx(ra, "ip", "link", "show", lab.ifname(ra, WAN)).count(f"mtu {MTU} ") == 1
        # both instances run the plane asked for, and r-a spreads the VIP over both
        for lb in (a1, a2):
            assert query(str(lab.plan.socket(lb)))["dataplane"] == dataplane
        assert lab.nexthops(ra) == {str(lab.addr(x, primary.lan)) for x in (a1, a2)}

        # r-a: the client's TCP to lb-a1 only, every ICMPv6 to the VIP (its PTBs) to lb-a2
        lab.nsx(
            ra,
            "ip",
            "-6",
            "-batch",
            "-",
            stdin=f"route add {vip}/128 via {lab.addr(a1, primary.lan)} table {TCP_TABLE}\n"
            f"route add {vip}/128 via {lab.addr(a2, primary.lan)} table {ICMP_TABLE}\n"
            f"rule add pref 100 ipproto tcp to {vip}/128 lookup {TCP_TABLE}\n"
            f"rule add pref 101 ipproto ipv6-icmp to {vip}/128 lookup {ICMP_TABLE}\n",
        )
        rules = lab.nsx(ra, "ip", "-6", "rule", "show")
        assert f"ipproto tcp lookup {TCP_TABLE}" in rules, rules
        assert f"ipproto ipv6-icmp lookup {ICMP_TABLE}" in rules, rules
        for lb in (a1, a2):
            lab.nsx(lb, "nft", "-f", "-", stdin=_meter(lab, lb))

        servers: list[subprocess.Popen[bytes]] = []
        try:
            for be in primary.backends:
                servers.append(_start_httpd(lab, be, tmp_path / f"{be}.ready"))
                lab.nsx(be, "ip", "-6", "route", "flush", "cache", "table", "all")
                assert _pmtu(lab, be, client) is None, f"{be} already has a PMTU for the client"
            sent_before = _ptbs_sent(lab, ra)

            body = tmp_path / f"body-{dataplane}"
            t0 = time.monotonic()
            r = subprocess.run(
                ["ip", "netns", "exec", lab.ns[lab.client], "curl", "-6", "-sS", "-m", "15"]
                + ["-o", str(body), "-w", "%{size_download}"]
                + [f"http://[{vip}]:{HTTP_PORT}/?bytes={BYTES}"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            took = time.monotonic() - t0
            meters = {
                lb: {c: _counter(lab, lb, "pmtutest", f"to_{c}", "netdev") for c in ("tcp", "ptb")}
                for lb in (a1, a2)
            }
            ptbs = _ptbs_sent(lab, ra) - sent_before
            assert r.returncode == 0 and int(r.stdout) >= BYTES, (
                f"download failed ({r.returncode}, {r.stdout!r} bytes, {r.stderr.strip()}):"
                f" r-a sent {ptbs} PTBs; received at the LBs: {meters}"
            )
            answer = json.loads(body.read_text())
            served = answer["node"]
            assert served in primary.backends and answer["server"] == str(
                lab.addr(served, primary.lan)
            )
            assert answer["peer"][0] == client and answer["local"] == [vip, HTTP_PORT]

            # r-a sent PTBs; all of them went to lb-a2, the TCP to lb-a1 only
            assert ptbs >= 1, f"r-a sent no Packet Too Big (meters {meters})"
            assert meters[a1]["tcp"] > 0 and meters[a1]["ptb"] == 0, meters
            assert meters[a2]["tcp"] == 0 and meters[a2]["ptb"] == ptbs, (ptbs, meters)

            # lb-a2's data plane forwarded every PTB, lb-a1's none
            st = {lb: query(str(lab.plan.socket(lb))) for lb in (a1, a2)}
            if dataplane == "kernel":
                counter = icmp_error_counter(lab.config, lab.config.vips[0])
                fwd = {lb: _counter(lab, lb, table_name(lb), counter) for lb in (a1, a2)}
                assert fwd == {a1: 0, a2: ptbs}, fwd
            else:  # lb-a2 received no TCP: every packet its DSR forwarder passed on was a PTB
                fwd = {lb: int(st[lb]["engine"]["dsr"]["counters"]["forwarded"]) for lb in (a1, a2)}
                assert fwd[a2] == ptbs, fwd
            # and both instances' status says so: none unmatched (dropped) either
            reported = {lb: _icmp_errors(st[lb]) for lb in (a1, a2)}
            assert reported[a1] == {"forwarded": 0, "unmatched": 0}, reported
            assert reported[a2] == {"forwarded": ptbs, "unmatched": 0}, reported

            # the backend that sent the segments learned the PMTU; the other one did not
            pmtu = {be: _pmtu(lab, be, client) for be in primary.backends}
            assert pmtu[served] == MTU, pmtu
            assert all(v is None for be, v in pmtu.items() if be != served), pmtu
        finally:
            for p in servers:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
    left = [
        ns
        for ns in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout.split()
        if ns.startswith(f"v6lb-{name}-")
    ]
    assert not left, left
    print(
        f"\n{dataplane}: lab built in {t_built:.2f} s; {BYTES} bytes from {served} in {took:.3f} s;"
        f" r-a sent {ptbs} PTBs; received lb-a1 {meters[a1]}, lb-a2 {meters[a2]};"
        f" forwarded by the plane {fwd}; status icmp_errors {reported};"
        f" backend PMTU {pmtu}; total {time.monotonic() - t_start:.2f} s"
    )
