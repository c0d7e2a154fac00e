"""`v6lb backend` refuses a dsr-ip6ip6 tunnel end point it could not decapsulate."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

V6LB = str(Path(sys.executable).parent / "v6lb")


class Host:
    """A namespace with a veth ``e0`` (up, ``address``/64): the backend host of a test."""

    def __init__(self, ns: str) -> None:
        self.ns = ns

    def __call__(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, *cmd], capture_output=True, text=True
        )


@contextmanager
def backend_host(tag: str, address: str) -> Iterator[Host]:
    ns = f"v6lb-{tag}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        host = Host(ns)
        host("ip", "link", "add", "e0", "type", "veth", "peer", "name", "e1")
        host("ip", "link", "set", "e0", "up")
        host("ip", "-6", "address", "add", f"{address}/64", "dev", "e0", "nodad")
        yield host
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_an_ip6ip6_end_point_on_an_interface_needs_ip6tnl0(tmp_path: Path) -> None:
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "lb": {"instance": "ba", "addresses": ["2001:db8:ba::1"]},
                "vips": [
                    {
                        "name": "tun",
                        "address": "2001:db8:ba:f::81",
                        "ports": [80],
                        "mode": "dsr-ip6ip6",
                        "health": {"type": "none"},
                        "backends": [{"address": "2001:db8:ba::10"}],
                    }
                ],
            }
        )
    )
    with backend_host("ba", "2001:db8:ba::10") as nsx:
        ns = nsx.ns
        has_ip6tnl0 = nsx("ip", "link", "show", "ip6tnl0").returncode == 0
        r = subprocess.run(
            [V6LB, "backend", str(cfg), "--address", "2001:db8:ba::10", "--dev", "e0"]
            + ["--netns", ns],
            capture_output=True,
            text=True,
        )
        if has_ip6tnl0:  # the kernel decapsulates packets to its own addresses itself
            assert r.returncode == 0, r.stderr
            return
        assert r.returncode == 2, r.stdout + r.stderr
        assert "tunnels to 2001:db8:ba::10, which is assigned to e0" in r.stderr, r.stderr
        assert "decapsulation address of its own" in r.stderr, r.stderr
        assert nsx("nft", "list", "ruleset").stdout.strip() == ""  # nothing was installed
        assert "2001:db8:ba:f::81" not in nsx("ip", "-6", "address", "show", "dev", "lo").stdout


def test_an_srv6_sid_on_an_interface_needs_seg6_enabled(tmp_path: Path) -> None:
    """A SID assigned on the backend is delivered locally: Linux 6.18 drops the SRv6 packet
    unless seg6_enabled is on for all and the interface (then it decapsulates it itself)."""
    cfg = tmp_path / "site.yaml"
    vip = {
        "name": "sr",
        "address": "2001:db8:bb:f::82",
        "ports": [80],
        "mode": "dsr-srv6",
        "health": {"type": "none"},
        "backends": [{"address": "2001:db8:bb::10"}],  # the SID is the address
    }
    lb = {"instance": "bs", "addresses": ["2001:db8:bb::1"]}
    cfg.write_text(yaml.safe_dump({"lb": lb, "vips": [vip]}))
    with backend_host("bs", "2001:db8:bb::10") as nsx:
        ns = nsx.ns
        argv = [V6LB, "backend", str(cfg), "--address", "2001:db8:bb::10", "--dev", "e0"]
        r = subprocess.run([*argv, "--netns", ns], capture_output=True, text=True)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "dsr-srv6 VIP sr tunnels to 2001:db8:bb::10, which is assigned to e0" in r.stderr
        assert "give this backend a `sid:` of its own" in r.stderr, r.stderr
        fix = f"ip netns exec {ns} sysctl -w net.ipv6.conf.all.seg6_enabled=1"
        assert f"{fix} net.ipv6.conf.e0.seg6_enabled=1" in r.stderr, r.stderr
        assert nsx("nft", "list", "ruleset").stdout.strip() == ""  # nothing was installed
        # only one of the two on: still dropped, still refused
        nsx("sysctl", "-qw", "net.ipv6.conf.all.seg6_enabled=1")
        r = subprocess.run([*argv, "--netns", ns], capture_output=True, text=True)
        assert r.returncode == 2, r.stdout + r.stderr
        nsx("sysctl", "-qw", "net.ipv6.conf.e0.seg6_enabled=1")  # the fix it printed
        r = subprocess.run([*argv, "--netns", ns], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "2001:db8:bb:f::82" in nsx("ip", "-6", "address", "show", "dev", "lo").stdout


def test_backend_checks_that_the_host_decapsulates(tmp_path: Path) -> None:
    """`v6lb backend` receives an ip6ip6 probe for its end point on a TUN and sees it
    delivered to the VIP; a firewall that drops tunnels makes it fail, saying how to look."""
    cfg = tmp_path / "site.yaml"
    vip = {
        "name": "tun",
        "address": "2001:db8:bd:f::81",
        "ports": [80],
        "mode": "dsr-ip6ip6",
        "backends": [{"address": "fd00:bd::10"}],  # on no interface: routed here by the LB
    }
    cfg.write_text(
        yaml.safe_dump({"lb": {"instance": "bd", "addresses": ["fd00:bd::1"]}, "vips": [vip]})
    )
    with backend_host("bd", "fd00:bd::20") as nsx:
        ns = nsx.ns
        argv = [V6LB, "backend", str(cfg), "--address", "fd00:bd::10", "--dev", "e0", "--netns", ns]
        r = subprocess.run(argv, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        want = "decapsulation checked: an ip6ip6 packet from fd00:bd::1 to fd00:bd::10 reached"
        assert want in r.stdout, r.stdout
        assert "v6lbdp" not in nsx("ip", "link", "show").stdout  # the probe's TUN is gone
        subprocess.run([*argv, "--remove"], check=True, capture_output=True)
        # a host firewall that drops every IPv6-in-IPv6 packet
        nsx("nft", "add", "table", "ip6", "fw")
        nsx(
            "nft", "add", "chain", "ip6", "fw", "pre", "{ type filter hook prerouting priority 0; }"
        )
        nsx("nft", "add", "rule", "ip6", "fw", "pre", "ip6", "nexthdr", "ipv6", "drop")
        r = subprocess.run(argv, capture_output=True, text=True)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "to fd00:bd::10 did NOT reach a socket on VIP 2001:db8:bd:f::81" in r.stderr
        assert f"ip netns exec {ns} nstat -az Ip6InUnknownProtos" in r.stderr, r.stderr
        assert f"--address fd00:bd::10 --remove --netns {ns}` takes it away" in r.stderr
