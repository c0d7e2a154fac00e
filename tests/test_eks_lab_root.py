"""The built-in scenario, ``examples/eks-ipv6.yaml``, as a lab: kernel plane + builtin proxy,
and python plane + HAProxy.

``v6lb lab up`` builds it (15 namespaces, three LB instances, the pods' nginx and HTTP
servers, ``v6lb backend`` on the DSR backends) under a name unique to this run; the
client then GETs every VIP with real curl through ``v6lb lab exec``, plus two pods at
their NPT-mapped addresses, and each answer must be HTTP 200 from the right kind of
backend, which saw the client's own address. Then ``v6lb lab trace`` runs for every mode
but anycast (tests/test_eks_anycast_lab_root.py traces that one): its answers must be the
simulator's (``v6lb explain``), and ``v6lb lab diff`` must find no difference for every
L3/L4 mode. The teardown always runs ``lab down`` and checks nothing is left.
Addresses: 2001:db8::/32 and fd00::/8 only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab_cli import get, lab_named, v6lb
from v6lb.core.nptv6 import NptMapping

pytestmark = [pytest.mark.root]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "eks-ipv6.yaml"
CLIENT = "2001:db8:ffff::100"
PODS_A = {f"pod-{n}a" for n in "123"}
PODS_B = {f"pod-{n}b" for n in "123"}
NODES = {f"node{n}" for n in "123"}
# VIP name -> (address, the nodes that may answer, whether the answer is from the VIP)
VIPS = {
    "web-l4": ("2001:db8:a:100::80", PODS_A, False),  # nginx, PROXY v2 on 8080
    "web-l7": ("2001:db8:a:100::81", PODS_B, False),  # nginx on 80, forwarded headers
    "web-nat": ("2001:db8:a:100::82", PODS_A, False),
    "web-l2": ("2001:db8:a:100::83", NODES, True),
    "web-ip6ip6": ("2001:db8:a:100::84", PODS_A, True),
    "web-srv6": ("2001:db8:a:100::85", PODS_A, True),
    "web-anycast": ("2001:db8:a:1a0::1", PODS_A, True),
}


@pytest.fixture
def lab() -> Iterator[str]:
    with lab_named("eks") as name:
        yield name


PLANES = [("kernel", "builtin"), ("python", "haproxy")]
TRACED = ["proxy-l4", "proxy-l7", "npt", "nat", "dsr-l2", "dsr-ip6ip6", "dsr-srv6"]
L3L4 = TRACED[2:]


@pytest.mark.parametrize(("dataplane", "proxy"), PLANES, ids=[p for p, _ in PLANES])
def test_eks_ipv6_lab_every_vip_trace_and_diff(lab: str, dataplane: str, proxy: str) -> None:
    name = lab
    v6lb("lab", "up", str(EXAMPLE), "--name", name, "--dataplane", dataplane, "--proxy", proxy)
    got: dict[str, tuple[str, dict[str, Any]]] = {}
    deadline = time.monotonic() + 15  # the LB instances load their rules just after `up`
    for vip, (addr, _, _) in VIPS.items():
        while True:
            got[vip] = get(name, f"http://[{addr}]/")
            if got[vip][0] == "200" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    for vip, (addr, nodes, dsr) in VIPS.items():
        code, seen = got[vip]
        assert code == "200", (vip, got[vip])
        assert seen["node"] in nodes, (vip, seen)
        if vip == "web-l4":  # nginx read the client from the PROXY v2 header
            assert seen["proxy_protocol_addr"] == CLIENT and seen["local"][1] == 8080, seen
        elif vip != "web-l7":  # the rest see the client itself
            assert seen["peer"][0] == CLIENT, (vip, seen)
        if vip == "web-nat":  # at the backend's own address and port
            assert seen["local"][0] == seen["server"] and seen["local"][1] == 8081, seen
        if dsr:  # the backend answered as the VIP, from its lo
            assert seen["local"][0] == addr, (vip, seen)
    # npt: pods at their mapped address, reached statelessly, see the client; pod-1a is a
    # nat backend too (on 8081, so its port 80 is npt's)
    mapping = NptMapping("fd00:10::/48", "2001:db8:10::/48")
    for pod, inside in (("pod-2b", "fd00:10:0:2::b"), ("pod-1a", "fd00:10:0:1::a")):
        code, seen = get(name, f"http://[{mapping.translate(inside)}]/")
        assert code == "200" and seen["node"] == pod and seen["peer"][0] == CLIENT, seen
    # every mode traced from real captures, with the simulator's answers
    for mode in TRACED:
        trace = json.loads(v6lb("lab", "trace", "--name", name, "--mode", mode, "--json").stdout)
        sim = json.loads(v6lb("explain", str(EXAMPLE), "--mode", mode, "--json").stdout)
        keys = ("nat66_at_lb", "backend_saw_source", "reply_via_lb")
        got = {k: trace["answers"][k] for k in keys}
        assert got == {k: sim["answers"][k] for k in keys}, (mode, got)
        assert trace["facts"]["source"] == "lab capture", mode
        if mode.startswith("proxy"):  # the proxy engine the lab runs, and the client's
            assert trace["facts"]["proxy_engine"] == proxy  # address travelled to the app
            assert trace["facts"]["app_saw_client"] == CLIENT, trace["facts"]
    # the L3/L4 modes: the simulator predicts every captured (source, destination, ports)
    for mode in L3L4:
        r = v6lb("lab", "diff", "--name", name, "--mode", mode, check=False)
        assert r.returncode == 0 and "no differences" in r.stdout, (mode, r.stdout, r.stderr)
