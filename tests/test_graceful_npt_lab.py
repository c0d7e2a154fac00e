"""npt behind anycast: reload and a graceful stop under load, lb2 taking over by BGP.

The lab is the anycast lab of tests/test_anycast_lab.py (client, router with bird, lb1
and lb2 on the site LAN, two hosts be1 and be2), with an ``npt:`` pair instead of VIPs:
inside fd00:70::/48 (be1 has fd00:70:0:1::10, be2 fd00:70:0:2::11, each on its LAN link,
routed to by the LBs), outside 2001:db8:70::/48. Each instance runs ``v6lb run
--drain-timeout 10``; its speaker announces the outside prefix while its own check
passes, and the router installs one ECMP route (L4 hash) via both.

The return path (docs/anycast.md, "npt behind anycast"): the hosts' default route is the
router. The router's bird resolves a static ``::/0 recursive`` route through an address
of the outside prefix, in a table of its own exported into kernel table RETURN_TABLE, and
``ip -6 rule add from INSIDE lookup RETURN_TABLE`` sends every packet from the inside
prefix to an instance that announces the outside prefix. BIRD 2.0.12 resolves a recursive
route through the best route only (one next hop, not the ECMP set): the instances' router
ids make lb1 the best, so the replies cross lb1 alone until it withdraws, and then lb2,
moved by the same BGP update as the client path. The router sends no ICMPv6 redirects (a
host told "go to lb1 directly" would keep doing so).

The load is real curl (the loop of tests/test_graceful_lab.py): one loop per host to its
outside address, a new connection per request. Under it:

1. SIGHUP on both after a second npt pair is added to the file: the nft tables are
   replaced (the inside set changed; docs/run.md, SIGHUP), the ip6tables rules too, and
   both announce the new outside prefix;
2. SIGTERM on lb1: it withdraws both outside prefixes, the router moves both directions
   to lb2 (NPTv6 is stateless: lb2 translates the same flow alike), lb1 removes its
   kernel state and exits 0 within the drain timeout.

Every request must get HTTP 200, and requests must go on after lb1 exited. The figures
(requests, takeover time, how long lb1 took to stop) are printed for docs/operations.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from ipaddress import IPv6Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from test_anycast_lab import BACKENDS, EXAMPLE, LBS, ROUTER, batch, lab, nsx, wait_for
from test_anycast_sync import NO_REDIRECTS
from test_graceful_lab import LOOP, results, router_conf, start_graceful, start_httpd, wait_reloaded
from v6lb.core.nptv6 import NptMapping
from v6lb.engines.bird import start_bird
from v6lb.engines.control import query

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="needs bird2 (apt-get install bird2)"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl"),
]

INSIDE, OUTSIDE = "fd00:70::/48", "2001:db8:70::/48"
EXTRA = {"inside": "fd00:71::/48", "outside": "2001:db8:71::/48"}  # added by the reload
HOSTS = {"be1": "fd00:70:0:1::10", "be2": "fd00:70:0:2::11"}  # each backend's inside address
RETURN_TABLE = 100
ROUTER_IDS = {"lb1": "192.0.2.11", "lb2": "192.0.2.12"}
# The router's return path, appended to its rendered bird.conf: a default route resolved
# through the outside prefix's BGP route, in a table of its own, exported to the kernel.
RETURN_PATH = f"""
ipv6 table npt_return;

protocol static npt_return_static {{
  ipv6 {{ table npt_return; }};
  igp table master6;
  route ::/0 recursive {IPv6Network(OUTSIDE)[1]};
}}

protocol kernel npt_return_kernel {{
  ipv6 {{ table npt_return; import none; export all; }};
  kernel table {RETURN_TABLE};
}}
"""


def npt_config(tmp: Path, role: str, *, extra: bool = False) -> tuple[Path, str]:
    """lbN's copy of the anycast example with the npt pair(s) and no VIP."""
    data = yaml.safe_load(EXAMPLE.read_text())
    sock = str(tmp / f"{role}.sock")
    data["lb"].update(instance=role, addresses=[LBS[role]], control_socket=sock)
    data["bgp"]["bfd"] = False  # as tests/test_graceful_lab.py: planned moves only
    # BIRD breaks the tie between two equal routes by the lower router id: the return
    # path (a recursive route, resolved through the best route only) goes by lb1
    data["bgp"]["router_id"] = ROUTER_IDS[role]
    del data["vips"]
    data["npt"] = [{"inside": INSIDE, "outside": OUTSIDE}, *([EXTRA] if extra else [])]
    path = tmp / f"{role}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, sock


def routed(rt: str, what: str, table: str = "main") -> set[str]:
    out = nsx(rt, "ip", "-6", "route", "show", what, "table", table)
    return set(re.findall(r"via (\S+)", out))


def table_handle(ns: str, role: str) -> int:
    for item in json.loads(nsx(ns, "nft", "-j", "list", "tables"))["nftables"]:
        t = item.get("table")
        if t and t["family"] == "ip6" and t["name"] == f"v6lb_{role}":
            return int(t["handle"])
    raise AssertionError(f"no nft table v6lb_{role}")


def translated(ns: str, chain: str, target: str) -> int:
    out = nsx(ns, "ip6tables", "-t", "mangle", "-L", chain, "-v", "-x", "-n")
    return sum(int(line.split()[0]) for line in out.splitlines() if target in line)


def snpt_packets(ns: str) -> int:
    """Packets the instance translated from the inside (its SNPT rules' counters)."""
    return translated(ns, "POSTROUTING", "SNPT")


def dnpt_packets(ns: str) -> int:
    """Packets the instance translated to the inside (its DNPT rules' counters)."""
    return translated(ns, "PREROUTING", "DNPT")


def test_npt_reload_and_graceful_stop_under_load() -> None:
    tmp = Path(f"/tmp/v6lb-gn-{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    figures: dict[str, Any] = {}
    mapping = NptMapping(INSIDE, OUTSIDE)
    outside = {role: str(mapping.translate(a)) for role, a in HOSTS.items()}
    try:
        with lab() as (ns, procs, birds):
            rt = ns["router"]
            nsx(rt, "nft", "-f", "-", stdin=NO_REDIRECTS)
            conf = router_conf() + RETURN_PATH
            birds.append(start_bird("router", conf, tmp, netns=rt))
            batch(rt, f"rule add from {INSIDE} lookup {RETURN_TABLE} pref 100")
            for role, addr in HOSTS.items():
                lan = BACKENDS[role][0]
                batch(ns[role], f"address add {addr}/64 dev e0 nodad")
                for lb in LBS:
                    batch(ns[lb], f"route add {IPv6Network(f'{addr}/64', strict=False)} via {lan}")
            for lb in LBS:  # the translated replies leave through the router
                batch(ns[lb], f"route add default via {ROUTER}")
            for role, addr in HOSTS.items():
                ready = start_httpd(ns[role], role, addr, tmp, procs)
                wait_for(f"{role}'s httpd", ready.exists, 10)
            files = {role: npt_config(tmp, role) for role in LBS}
            lbs = {role: start_graceful(role, files[role][0], ns[role], tmp, procs) for role in LBS}
            both = set(LBS.values())
            try:
                wait_for("ECMP to the outside prefix", lambda: routed(rt, OUTSIDE) == both, 20)
                # BIRD 2.0.12 resolves a recursive route through the best route only
                wait_for("the return path", lambda: routed(rt, "default", "100") == {LBS["lb1"]}, 5)
            except AssertionError:
                for role in LBS:
                    print(role, (tmp / f"{role}.log").read_text())
                print(birds[0].birdc("show", "route", "table", "all", "all"), birds[0].tail_log())
                print(nsx(rt, "ip", "-6", "route", "show", "table", "all"))
                raise
            for role in LBS:
                bgp = query(files[role][1])["bgp"]
                assert bgp["announced"] == [OUTSIDE] and bgp["self_check"]["ok"], bgp

            script = tmp / "loop.sh"
            script.write_text(LOOP)
            loops = []
            for role in HOSTS:
                loops.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", ns["client"], "bash", str(script)]
                        + [str(tmp / f"load-{role}"), f"http://[{outside[role]}]/"],
                        start_new_session=True,
                    )
                )
                procs.append(loops[-1])
            time.sleep(1.5)
            marks = {"start": time.time()}
            # the requests cross both instances (ECMP), the replies lb1 (the return path)
            assert all(dnpt_packets(ns[role]) > 0 for role in LBS)
            assert snpt_packets(ns["lb1"]) > 0 and snpt_packets(ns["lb2"]) == 0

            # 1. reload both from a file with a second npt pair: the tables are replaced
            handles = {role: table_handle(ns[role], role) for role in LBS}
            for role in LBS:
                npt_config(tmp, role, extra=True)
                lbs[role].send_signal(signal.SIGHUP)
            wait_reloaded(tmp, 20)
            marks["reload"] = time.time()
            for role in LBS:
                assert table_handle(ns[role], role) != handles[role]  # replaced, not kept
            wait_for(
                "the new outside prefix announced",
                lambda: routed(rt, EXTRA["outside"]) == both,
                10,
            )
            time.sleep(1.5)

            # 2. lb1 stops gracefully; lb2 takes both directions over by BGP
            t0 = time.monotonic()
            marks["sigterm"] = time.time()
            lbs["lb1"].send_signal(signal.SIGTERM)
            wait_for(
                "the router to drop lb1",
                lambda: (
                    routed(rt, OUTSIDE) == {LBS["lb2"]}
                    and routed(rt, EXTRA["outside"]) == {LBS["lb2"]}
                    and routed(rt, "default", "100") == {LBS["lb2"]}
                ),
                5,
                0.01,
            )
            figures["withdrawn_s"] = round(time.monotonic() - t0, 3)
            assert lbs["lb1"].wait(timeout=12) == 0
            figures["lb1_stopped_s"] = round(time.monotonic() - t0, 3)
            marks["stop"] = time.time()
            snpt_lb2 = snpt_packets(ns["lb2"])
            time.sleep(1.5)
            assert snpt_packets(ns["lb2"]) > snpt_lb2  # lb2 carries the replies alone
            for role in HOSTS:
                (tmp / f"load-{role}.stop").touch()
            for p in loops:
                p.wait(timeout=10)
            log = (tmp / "lb1.log").read_text()
            assert "stopping gracefully" in log and "drained in" in log, log
            assert f"bgp: withdrew {OUTSIDE}" in log, log
            assert nsx(ns["lb1"], "nft", "list", "tables").strip() == ""
            for role in HOSTS:
                got = results(tmp / f"load-{role}")
                errors = (tmp / f"load-{role}.err").read_text()
                failed = [r for r in got if r[1] != "200" or r[2] != 0]
                figures[role] = {
                    "requests": len(got),
                    "failed": len(failed),
                    "after_stop": sum(1 for r in got if r[0] >= marks["stop"]),
                }
                assert not failed, (role, marks, failed[:5], errors[-500:])
                assert {r[3] for r in got} == {role}, role  # each loop reached its own host
                assert figures[role]["after_stop"] > 0, figures
            print("\nnpt graceful figures: " + json.dumps(figures))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
