"""The graceful-stop lab for the proxy VIPs, on both engines (``--proxy builtin|haproxy``).

The anycast lab of tests/test_anycast_lab.py (client, router running bird with an L4-hash
ECMP route to each VIP via lb1 and lb2, two backends on the site LAN), with a proxy-l7
VIP and a proxy-l4 VIP on each LB's ``lo``, announced by the daemon's BGP speaker while
the proxy's own health view has a backend. Each backend runs the lab's HTTP server. Each
LB runs ``v6lb run --proxy ENGINE --drain-timeout 10`` with ``lb.peers`` naming the other
(the second chance, docs/anycast.md). Under curl loops (a new connection per request; one
loop per VIP of quick requests, one of 0.4 s requests, which are in flight when lb1 goes):

1. ``v6lb ctl drain`` of be1 on both instances: no request started after reaches be1;
2. SIGHUP on both after a change to the file (the health interval): the listeners stay;
3. SIGTERM on lb1: its BGP withdraw moves every packet to lb2, including those of lb1's
   open connections, which lb2's second chance sends on to lb1; lb1 finishes them,
   exits 0 within the timeout, and lb2 serves on.

Every request must get HTTP 200, counted by curl. The figures are printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from test_anycast_lab import BACKENDS, EXAMPLE, LBS, ROUTER, V6LB, batch, lab, nsx, wait_for
from test_graceful_lab import LOOP, results, router_conf, start_graceful, start_httpd, wait_reloaded
from v6lb.engines.bird import start_bird
from v6lb.engines.control import query

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="needs bird2 (apt-get install bird2)"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl"),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy"),
]

VIPS = {"l7": ("2001:db8:f::90", "proxy-l7"), "l4": ("2001:db8:f::91", "proxy-l4")}
HEALTH = {"type": "tcp", "interval": 0.5, "timeout": 0.4, "rise": 1, "fall": 3}
SLOW = 0.4  # seconds each request of the slow loops takes at the backend


def site_file(tmp: Path, role: str, interval: float = 0.5) -> tuple[Path, str]:
    """lbN's file: the example's lb: and bgp:, the two proxy VIPs, the other LB as peer."""
    data = yaml.safe_load(EXAMPLE.read_text())
    sock = str(tmp / f"{role}.sock")
    others = [a for r, a in LBS.items() if r != role]
    data["lb"].update(
        instance=role,
        addresses=[LBS[role]],
        control_socket=sock,
        peers={"interface": "up0", "addresses": others},
    )
    data["bgp"]["bfd"] = False  # the withdraw is a BGP UPDATE; BFD can flap on a busy box
    data["vips"] = [
        {
            "name": name,
            "address": address,
            "ports": [80],
            "mode": mode,
            "health": {**HEALTH, "interval": interval},
            "backends": [{"address": a} for a, _ in BACKENDS.values()],
        }
        for name, (address, mode) in VIPS.items()
    ]
    path = tmp / f"{role}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, sock


def routed(rt: str, vip: str) -> set[str]:
    return set(re.findall(r"via (\S+)", nsx(rt, "ip", "-6", "route", "show", f"{vip}/128")))


def listeners(ns: str) -> set[str]:
    return set(re.findall(r"\[(2001:db8:f::9\d)\]:80", nsx(ns, "ss", "-Hltn")))


@pytest.mark.parametrize("engine", ["builtin", "haproxy"])
def test_proxy_drain_reload_and_graceful_stop_under_load(engine: str) -> None:
    tmp = Path(f"/tmp/v6lb-gp-{os.getpid()}-{engine}")
    tmp.mkdir(exist_ok=True)
    figures: dict[str, Any] = {"engine": engine}
    try:
        with lab() as (ns, procs, birds):
            rt = ns["router"]
            birds.append(start_bird("router", router_conf(), tmp, netns=rt))
            for role, (addr, _) in BACKENDS.items():
                start_httpd(ns[role], role, addr, tmp, procs)
            files = {role: site_file(tmp, role) for role in LBS}
            lbs = {}
            for role in LBS:
                # the proxy answers the client itself: a route back, the VIPs on lo
                batch(
                    ns[role],
                    f"route add default via {ROUTER}",
                    *(f"address add {a}/128 dev lo" for a, _ in VIPS.values()),
                )
                lbs[role] = start_graceful(
                    role, files[role][0], ns[role], tmp, procs, "--proxy", engine
                )
            for role in BACKENDS:
                wait_for(f"{role}'s httpd", (tmp / f"{role}.ready").exists, 10)
            try:
                for address, _ in VIPS.values():
                    wait_for(
                        f"ECMP to {address}", lambda a=address: routed(rt, a) == {*LBS.values()}, 20
                    )
            except AssertionError:
                for role in LBS:
                    print(role, (tmp / f"{role}.log").read_text())
                raise
            before = {role: listeners(ns[role]) for role in LBS}
            assert all(len(v) == 2 for v in before.values()), before

            script = tmp / "loop.sh"
            script.write_text(LOOP)
            loops = []
            for name, (address, _) in VIPS.items():
                for kind, query_ in (("quick", ""), ("slow", f"?delay={SLOW}")):
                    out = tmp / f"load-{name}-{kind}"
                    loops.append(
                        subprocess.Popen(
                            ["ip", "netns", "exec", ns["client"], "bash", str(script), str(out)]
                            + [f"http://[{address}]/{query_}"],
                            start_new_session=True,
                        )
                    )
                    procs.append(loops[-1])
            # every loop has reached be1 before the drain, so the drain has something to move
            # (three slow requests can all hash to be2, one time in eight)
            for name in VIPS:
                for kind in ("quick", "slow"):
                    out = tmp / f"load-{name}-{kind}"
                    wait_for(
                        f"a {name} {kind} request served by be1",
                        lambda o=out: o.exists() and "be1" in o.read_text(),
                        20,
                    )
            marks = {"start": time.time()}

            # 1. be1 drained on both instances
            for role in LBS:
                for name in VIPS:
                    subprocess.run(
                        [V6LB, "ctl", "drain", name, BACKENDS["be1"][0]]
                        + ["--control-socket", files[role][1]],
                        check=True,
                        capture_output=True,
                        timeout=30,
                    )
            marks["drained"] = time.time()
            time.sleep(1.0)

            # 2. a reload from a changed file on both: the listeners stay
            for role in LBS:
                site_file(tmp, role, interval=0.6)
                lbs[role].send_signal(signal.SIGHUP)
            wait_reloaded(tmp, 20)
            for role in LBS:
                assert listeners(ns[role]) == before[role]
            time.sleep(1.0)

            # 3. lb1 stops gracefully; lb2 takes over by BGP, its second chance helping
            t0 = time.monotonic()
            marks["sigterm"] = time.time()
            lbs["lb1"].send_signal(signal.SIGTERM)
            wait_for(
                "the router to drop lb1",
                lambda: all(routed(rt, a) == {LBS["lb2"]} for a, _ in VIPS.values()),
                5,
                0.01,
            )
            figures["withdrawn_s"] = round(time.monotonic() - t0, 3)
            assert lbs["lb1"].wait(timeout=12) == 0
            figures["lb1_stopped_s"] = round(time.monotonic() - t0, 3)
            figures["drained"] = "drained in" in (tmp / "lb1.log").read_text()
            marks["stop"] = time.time()
            time.sleep(1.5)
            peers = query(files["lb2"][1]).get("peers") or {}
            figures["second_chance_packets_lb2"] = peers.get("second_chance", {}).get("packets")
            for name in VIPS:
                for kind in ("quick", "slow"):
                    (tmp / f"load-{name}-{kind}.stop").touch()
            for p in loops:
                p.wait(timeout=10)
            for name in VIPS:
                for kind in ("quick", "slow"):
                    out = tmp / f"load-{name}-{kind}"
                    got = results(out)
                    failed = [r for r in got if r[1] != "200" or r[2] != 0]
                    after_drain = [r for r in got if r[0] > marks["drained"] + 0.2]
                    figures[f"{name}-{kind}"] = {
                        "requests": len(got),
                        "failed": len(failed),
                        "after_drain_to_be1": sum(r[3] == "be1" for r in after_drain),
                        "after_stop": sum(r[0] >= marks["stop"] for r in got),
                    }
                    errors = (tmp / f"load-{name}-{kind}.err").read_text()
                    assert not failed, (name, kind, marks, failed[:5], errors[-500:])
                    assert figures[f"{name}-{kind}"]["after_drain_to_be1"] == 0, figures
                    assert any(r[3] == "be1" for r in got if r[0] < marks["drained"]), figures
                    assert figures[f"{name}-{kind}"]["after_stop"] > 0, figures
            print(json.dumps(figures))
            log = (tmp / "lb1.log").read_text()
            assert "stopping gracefully" in log and "v6lb_lb1_peers" in log, log
            # every connection lb1 held ended before the timeout: the second chance sent
            # their packets on, FIN and RST included
            assert figures["drained"], log
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
