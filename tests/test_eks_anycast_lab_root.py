"""The built-in scenario, ``examples/eks-ipv6.yaml``, traced as anycast across both sites.

`v6lb lab trace --mode anycast` builds its two-site BGP lab (:mod:`v6lb.lab.failover`):
isp is the upstream, igw the primary's site router with ECMP over lb-a1 and lb-a2, and
lb-b1 (site backup) peers with isp directly. The backends are the pods' tunnel end points,
shared by both sites and reached by the topology's routes; each runs `v6lb backend` and a
greet server. Under traffic from the client, ``site-lbs-die`` SIGKILLs both primary
instances: before it, flows must have been carried by lb-a1 and lb-a2 and answered by the
pods; after it, new connections go by lb-b1 and are answered by the pods. The lab (under a
name unique to this run) must leave nothing behind. Addresses: 2001:db8::/32, fd00::/8.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from v6lb.lab.anycast_trace import format_anycast_trace, run_anycast_trace
from v6lb.lab.plan import LAB_ROOT

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("bird") is None, reason="needs bird2 (apt-get install bird2)"),
]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "eks-ipv6.yaml"
PODS = {"fd00:10:0:e1::a", "fd00:10:0:e2::a", "fd00:10:0:e3::a"}  # pod-Na's end points


def _leftovers(name: str) -> list[str]:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out = [line for line in ns.splitlines() if line.startswith(f"v6lb-{name}-")]
    return out + ([str(LAB_ROOT / name)] if (LAB_ROOT / name).exists() else [])


def test_site_lbs_die_moves_to_the_backup_site() -> None:
    name = f"eka{os.getpid() % 10**7}"
    try:
        t = run_anycast_trace(EXAMPLE, "site-lbs-die", flows=16, after_s=1.5, name=name)
    finally:
        left = _leftovers(name)
    print("\n" + format_anycast_trace(t))
    assert not left, left
    f = t.figures
    assert t.vip == "2001:db8:a:1a0::1"
    assert t.instance_site == {"lb-a1": "primary", "lb-a2": "primary", "lb-b1": "backup"}
    assert t.routes_before == {"isp": ["igw"], "igw": ["lb-a1", "lb-a2"]}
    assert t.routes_after == {"isp": ["lb-b1"], "igw": []}
    # before: both primary instances carried the long-lived flows, the pods answered them
    assert set(f.carriers_before) == {"lb-a1", "lb-a2"}, f.carriers_before
    assert sum(f.carriers_before.values()) == f.flows == 16, f
    # (the long-lived ones: a new connection opened in the move may fail, unanswered)
    assert {p["backend"] for p in f.per_flow if "t_s" not in p} <= PODS, f.per_flow
    # the failure: the upstream moved to the backup site
    assert f.route_s is not None and f.route_s < 1.0, f
    assert f.recovery_s is not None and f.recovery_s < 1.0, f
    # after: every new connection opened once isp had moved went by lb-b1, answered by a pod
    late = [p for p in f.per_flow if p.get("t_s", -1) > f.route_s + 0.2]
    assert len(late) >= 5, f.per_flow
    for p in late:
        assert p["after"] == ["lb-b1"] and p["outcome"] == "new ok", p
        assert p["backend"] in PODS, p
    assert f.carriers_after.get("lb-b1", 0) >= len(late), f.carriers_after
