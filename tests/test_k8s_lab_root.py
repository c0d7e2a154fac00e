"""`v6lb k8s config` output runs in the lab, and real curl reaches the pods.

tests/data/k8s/echo-cluster.yaml (a `kubectl get -o yaml` List: three NLB Services and an
ALB Ingress with their EndpointSlices) goes through ``v6lb k8s config --prefer dsr``, then
``v6lb lab up`` builds it (client, igw, the LB, two nodes, a namespace per pod at its real
EKS-style address). The client GETs every VIP with curl through ``v6lb lab exec``; each
answer must be HTTP 200 from a ready pod of the right Service, which saw the client as
the AWS LB would have let it: the client itself (nat, dsr-ip6ip6, answered from the VIP),
the client in the PROXY v2 header (proxy-l4), or the LB (proxy-l7). The terminating
endpoint (drain) gets no new request. The teardown always runs ``lab down`` and checks
nothing is left. Addresses: 2001:db8::/32 and fd00::/8 only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab_cli import get, lab_named, v6lb

pytestmark = [pytest.mark.root]

DATA = Path(__file__).resolve().parent / "data" / "k8s" / "echo-cluster.yaml"
CLIENT = "2001:db8:ffff::100"
LB_PRIVATE = "fd00:10::a"
# VIP name -> (URL, the pods that may answer, mode, how the pod sees the client)
VIPS = {
    "web-echo-direct-http": (
        "http://[2001:db8:a:100::1]:8090/",
        {"echo-direct-84c6f5d7b-r4t5y", "echo-direct-84c6f5d7b-u7i8o"},
        "dsr-ip6ip6",
        "peer",
    ),
    "web-echo-nlb-http": (
        "http://[2001:db8:a:100::2]/",
        {"echo-nlb-6d5f7b9c4-x7k2p", "echo-nlb-6d5f7b9c4-q9w8e"},
        "nat",
        "peer",
    ),
    "web-echo-pp-http": (
        "http://[2001:db8:a:100::3]/",
        {"echo-pp-58c7d9f6b-m3n4b", "echo-pp-58c7d9f6b-z5x6c"},
        "proxy-l4",
        "proxy_protocol_addr",
    ),
    "web-echoserver-echoserver-http": (
        "http://[2001:db8:a:100::4]/",
        {"echoserver-7f9c6b8d5-h2j3k", "echoserver-7f9c6b8d5-a1s2d"},  # not old01: draining
        "proxy-l7",
        "lb",
    ),
}


@pytest.fixture
def lab() -> Iterator[str]:
    with lab_named("k8s") as name:
        yield name


def test_k8s_config_runs_in_the_lab_and_curl_reaches_the_pods(lab: str, tmp_path: Path) -> None:
    out = tmp_path / "v6lb.yaml"
    r = v6lb("k8s", "config", str(DATA), "--prefer", "dsr", "-o", str(out))
    assert "4 VIPs" in r.stderr
    check = v6lb("check", str(out))
    for vip, (_, _, mode, _) in VIPS.items():
        assert f"vip {vip}: " in check.stdout and f"mode {mode}," in check.stdout, check.stdout
    v6lb("lab", "up", str(out), "--name", lab)
    got: dict[str, tuple[str, dict[str, Any]]] = {}
    deadline = time.monotonic() + 15  # the LB loads its rules just after `up`
    for vip, (url, _, _, _) in VIPS.items():
        while True:
            got[vip] = get(lab, url)
            if got[vip][0] == "200" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    for vip, (_, pods, mode, sees) in VIPS.items():
        code, seen = got[vip]
        assert code == "200" and seen.get("node") in pods, (vip, got[vip])
        if sees == "peer":  # nat and DSR: the pod's peer is the client itself
            assert seen["peer"][0] == CLIENT, (vip, seen)
        elif sees == "proxy_protocol_addr":  # nginx read the client from PROXY v2
            assert seen["proxy_protocol_addr"] == CLIENT and seen["peer"][0] == LB_PRIVATE, seen
        else:  # the proxy's own connection, as from the ALB
            assert seen["peer"][0] == LB_PRIVATE, (vip, seen)
        if mode == "dsr-ip6ip6":  # the pod answered as the VIP, from its lo
            assert seen["local"][0] == "2001:db8:a:100::1", seen
    # more requests to the Ingress's VIP reach both ready pods, never the draining one
    answered = {
        get(lab, VIPS["web-echoserver-echoserver-http"][0])[1].get("node") for _ in range(6)
    }
    assert answered == VIPS["web-echoserver-echoserver-http"][1], answered
