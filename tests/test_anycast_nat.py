"""`nat` behind ECMP: what happens to a flow when the router moves it to the other instance.

The lab is the anycast lab of tests/test_anycast_lab.py (client, router with bird and an
L4-hash ECMP route to the VIP via lb1 and lb2, two backends on the site LAN), with the
VIP in ``nat`` mode: each instance runs ``v6lb run`` and keeps its flows in its own
kernel conntrack table. Nothing is shared between the instances but the Maglev table.

* ``test_nat_without_snat_behind_ecmp``: no ``snat:``. The backends must route their
  replies through an LB, and the only route they can have is through one instance
  (here lb1). Flows that ECMP gives to lb2 never open. The flows on lb1 are then moved
  to lb2 (``birdc disable`` in lb1's bird; lb1 keeps running): they break (their reads
  time out: lb1's forward filter drops the backend's INVALID answers). Again with
  ``net.netfilter.nf_conntrack_tcp_be_liberal=1`` on both LBs: they survive.
* ``test_nat_per_instance_snat_behind_ecmp``: each instance SNATs to its own address,
  so every reply returns to the instance that made the flow. Then lb1's announcement is
  withdrawn while lb1 keeps running (lb1's flows are reset), and announced again later
  (the flows opened through lb2 meanwhile that now hash to lb1 are reset).

The client's namespace runs with ``net.core.txrehash=0`` (see ``nat_lab``).

Each test counts the connections that open, the connections that break (and how: the
client's error, and the RSTs counted by nft in the client's namespace), per instance,
and prints the figures recorded in docs/anycast.md ("NAT behind ECMP").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from test_anycast_lab import (
    BACKENDS,
    CLIENT,
    EXAMPLE,
    LBS,
    ROUTER,
    VIP,
    batch,
    lab,
    nexthops,
    nsx,
    start_lb,
    wait_for,
)
from v6lb.engines.bird import birdc_run, start_bird
from v6lb.lab.failover import GREET_SERVER
from v6lb.model.bgp import BfdSettings, BgpSettings, Neighbour
from v6lb.render.bird import render_router, static_name

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="needs bird2 (apt-get install bird2)"),
]

N = 20  # long-lived connections per batch

# argv: VIP. Commands on stdin, one per line; one JSON line answers each.
#   open N   open N connections at once (3 s to connect and read the greeting)
#   stop     stop the pings, report every flow, exit
# Every open flow sends "ping" every 100 ms and waits (3 s) for the answer.
CLIENT_SCRIPT = r"""
import json, socket, sys, threading, time
vip = sys.argv[1]
stop = threading.Event()
flows, threads = [], []
def line(s):
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data.decode().split()
def ping(f, s):
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            s.sendall(b"ping\n")
            got = line(s)[0]
            f["asked"] += 1
            f["max_rtt"] = max(f["max_rtt"], time.monotonic() - t0)
            if got != f["backend"]:
                f["wrong"] += 1
        except OSError as exc:
            f["err"], f["err_t"] = type(exc).__name__, time.monotonic()
            return
        time.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))
def open_one(batch, out):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.bind(("::", 0))
    s.settimeout(3.0)
    f = {"sport": s.getsockname()[1], "batch": batch, "backend": None, "open_err": None,
         "err": None, "err_t": None, "asked": 0, "max_rtt": 0.0, "wrong": 0}
    out.append(f)
    try:
        s.connect((vip, 80))
        f["backend"] = line(s)[0]
    except OSError as exc:
        f["open_err"] = type(exc).__name__
        s.close()
        return
    t = threading.Thread(target=ping, args=(f, s), daemon=True)
    threads.append(t)
    t.start()
for cmd in sys.stdin:
    word = cmd.split()
    if word[0] == "open":
        new = []
        opener = [threading.Thread(target=open_one, args=(len(flows), new))
                  for _ in range(int(word[1]))]
        for t in opener:
            t.start()
            time.sleep(0.01)
        for t in opener:
            t.join()
        flows.extend(new)
        print(json.dumps(new), flush=True)
    else:
        stop.set()
        for t in threads:
            t.join(4)
        print(json.dumps({"flows": flows, "t": time.monotonic()}), flush=True)
        break
"""

# Counts the TCP resets the client receives and sends.
RST_COUNTERS = """table ip6 rstcount {
    counter rst_in {}
    counter rst_out {}
    chain in { type filter hook input priority 0; tcp flags & rst == rst counter name rst_in; }
    chain out { type filter hook output priority 0; tcp flags & rst == rst counter name rst_out; }
}
"""


# BFD with a 1 s detection time: what this lab measures moves routes by BGP (a killed
# instance's session closes, or a route is withdrawn), not by BFD; 100 ms x 3 flapped
# a session on a loaded CI machine (docs/anycast.md), and a flap moves flows
SLOW_BFD = BfdSettings(True, 0.1, 10)
SLOW_BFD_FILE = {"interval": 0.1, "multiplier": 10}


def nat_config(tmp: Path, role: str, snat: bool) -> tuple[Path, str]:
    """The anycast example with its VIP in ``nat`` mode, for instance ``role``."""
    data = yaml.safe_load(EXAMPLE.read_text())
    sock = str(tmp / f"{role}.sock")
    data["lb"].update(instance=role, addresses=[LBS[role]], control_socket=sock)
    data["bgp"]["bfd"] = SLOW_BFD_FILE  # this lab does not measure BFD: no flaps under load
    vip = data["vips"][0]
    vip["mode"] = "nat"
    vip["backends"] = [{"address": b["address"]} for b in vip["backends"]]
    if snat:
        vip["snat"] = LBS[role]  # this instance's own address: replies come back to it
    path = tmp / f"{role}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, sock


def tracked(ns: str) -> set[int]:
    """Client source ports of the VIP flows in this namespace's conntrack table."""
    ports = set()
    text = nsx(ns, "cat", "/proc/net/nf_conntrack")
    for line in text.splitlines():
        m = re.search(r"src=(\S+) dst=(\S+) sport=(\d+) dport=80 ", line)
        if m and IPv6Address(m[1]) == IPv6Address(CLIENT) and IPv6Address(m[2]) == IPv6Address(VIP):
            ports.add(int(m[3]))
    return ports


def rst_counts(ns: str) -> dict[str, int]:
    out = json.loads(nsx(ns, "nft", "-j", "list", "counters", "table", "ip6", "rstcount"))
    return {
        o["counter"]["name"]: int(o["counter"]["packets"])
        for o in out["nftables"]
        if "counter" in o
    }


class Client:
    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT_SCRIPT, VIP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, cmd: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@contextmanager
def nat_lab(tmp: Path, snat: bool) -> Iterator[tuple[dict[str, str], dict[str, str], Client]]:
    """The anycast lab with a nat VIP; yields namespaces, the LBs' bird sockets, a client."""
    with lab() as (ns, procs, birds):
        rt = ns["router"]
        for role in LBS:  # a nat LB sends the replies back to the client itself
            batch(ns[role], f"route add default via {ROUTER}")
        if not snat:  # the backends' replies must pass an LB: one route, through lb1
            for role in BACKENDS:
                batch(ns[role], f"route replace default via {LBS['lb1']}")
        nsx(ns["client"], "nft", "-f", "-", stdin=RST_COUNTERS)
        # The client's skb hash (its socket's txhash) crosses the veth into the router, and
        # the router's L4 multipath hash uses it. With txrehash on, a retransmitted SYN gets
        # a new hash and may go to the other instance; off, each connection keeps one path,
        # as with a router that hashes the 5-tuple itself.
        nsx(ns["client"], "sysctl", "-qw", "net.core.txrehash=0")
        router = BgpSettings(
            65000,
            "192.0.2.1",
            neighbours=tuple(
                Neighbour(role, IPv6Address(a), 65001, "br0") for role, a in LBS.items()
            ),
            bfd=SLOW_BFD,
        )
        birds.append(start_bird("router", render_router("router", router), tmp, netns=rt))
        for role, (addr, _) in BACKENDS.items():
            s = subprocess.Popen(
                ["ip", "netns", "exec", ns[role], sys.executable, "-m", GREET_SERVER, addr, "80"],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            procs.append(s)
            assert s.stdout is not None and s.stdout.readline().strip() == "ready"
        socks = {}
        for role in LBS:
            path, sock = nat_config(tmp, role, snat)
            start_lb(role, path, ns[role], procs)
            socks[role] = f"{sock}.bird/{role}.ctl"
        wait_for("ECMP via both LBs", lambda: nexthops(rt) == set(LBS.values()), 20, 0.02)
        client = Client(ns["client"])
        try:
            yield ns, socks, client
        finally:
            client.close()


def owners(ns: dict[str, str], flows: list[dict[str, Any]]) -> dict[int, str]:
    held = {role: tracked(ns[role]) for role in LBS}
    out = {}
    for f in flows:
        where = [role for role in LBS if f["sport"] in held[role]]
        assert len(where) == 1, (f, held)  # each flow is in exactly one instance's conntrack
        out[f["sport"]] = where[0]
    return out


def tally(
    flows: list[dict[str, Any]], owner: dict[int, str], batch_no: int, moves: list[float]
) -> dict[str, Any]:
    """Per instance that held the flow first: opened, survived, what broke it, and when.

    ``reset_s`` is the range of times from the last route change to the error.
    """
    out: dict[str, Any] = {}
    for role in LBS:
        mine = [f for f in flows if f["batch"] == batch_no and owner[f["sport"]] == role]
        opened = [f for f in mine if f["open_err"] is None]
        broke = [f for f in opened if f["err"] or f["wrong"]]
        errs: dict[str, int] = {}
        for f in broke:
            errs[f["err"] or "wrong backend"] = errs.get(f["err"] or "wrong backend", 0) + 1
        for f in mine:
            if f["open_err"]:
                errs["open: " + f["open_err"]] = errs.get("open: " + f["open_err"], 0) + 1
        after = []
        for f in broke:
            if f["err_t"] is not None:
                assert f["err_t"] > moves[0], f  # nothing broke before the first route change
                after.append(f["err_t"] - max(m for m in moves if m <= f["err_t"]))
        out[role] = {
            "flows": len(mine),
            "opened": len(opened),
            "survived": len(opened) - len(broke),
            "errors": errs,
            "reset_s": [round(min(after), 3), round(max(after), 3)] if after else None,
        }
    return out


def move(rt: str, socks: dict[str, str], verb: str = "disable") -> tuple[float, float]:
    """``birdc disable|enable`` lb1's VIP (lb1 keeps running); (when, router convergence)."""
    t0 = time.monotonic()
    birdc_run(socks["lb1"], verb, static_name(IPv6Network(f"{VIP}/128")))
    want = {LBS["lb2"]} if verb == "disable" else set(LBS.values())
    wait_for(f"the router after {verb}", lambda: nexthops(rt) == want, 5, 0.005)
    return t0, round(time.monotonic() - t0, 3)


def liberal(ns: dict[str, str], on: bool) -> None:
    for role in LBS:
        nsx(ns[role], "sysctl", "-qw", f"net.netfilter.nf_conntrack_tcp_be_liberal={int(on)}")


def test_nat_without_snat_behind_ecmp() -> None:
    tmp = Path(f"/tmp/v6lb-an-{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    figures: dict[str, Any] = {}
    moves: list[float] = []
    try:
        with nat_lab(tmp, snat=False) as (ns, socks, client):
            rt = ns["router"]
            # 1. N connections; then lb1's flows move to lb2 (lb1 stays up, replies via it)
            owner = owners(ns, client.ask(f"open {N}"))
            figures["rst_after_open"] = rst_counts(ns["client"])
            time.sleep(1.0)
            t, figures["withdraw_route_s"] = move(rt, socks)
            moves.append(t)
            time.sleep(2.0)
            figures["rst_after_withdraw"] = rst_counts(ns["client"])
            # 2. the same with conntrack's TCP window check off on both LBs
            liberal(ns, True)
            moves.append(move(rt, socks, "enable")[0])
            owner.update(owners(ns, client.ask(f"open {N}")))
            time.sleep(1.0)
            moves.append(move(rt, socks)[0])
            time.sleep(2.0)
            flows = client.ask("stop")["flows"]
            figures["strict"] = strict = tally(flows, owner, 0, moves)
            figures["liberal"] = lib = tally(flows, owner, N, moves)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nnat without snat: " + json.dumps(figures))
    for fig in (strict, lib):
        # Steady state: lb2's flows never open. The backend's SYN-ACK goes out through lb1,
        # which has no conntrack entry for it (INVALID): lb1's forward filter drops it
        # (docs/nat.md "Not an open relay"), and the client's connect() to the VIP times out.
        assert fig["lb2"]["flows"] > 0 and fig["lb2"]["opened"] == 0, fig
        assert set(fig["lb2"]["errors"]) == {"open: TimeoutError"}, fig
        assert fig["lb1"]["flows"] > 0 and fig["lb1"]["opened"] == fig["lb1"]["flows"], fig
    # Nothing from the backend's own address reaches the client, so it sends no RST
    # (before the forward filter: one or more per attempt, the SYN-ACK forwarded untranslated).
    assert figures["rst_after_open"]["rst_out"] == 0, figures
    # Moved to lb2, every flow of lb1 breaks: lb2 picks the flow up mid-stream (loose
    # tracking) and DNATs it to the same backend, which answers through lb1; that answer
    # acknowledges data lb1 never saw, so lb1's conntrack calls it INVALID, and lb1's
    # forward filter drops it. The client's read times out (before the filter lb1
    # forwarded it untranslated, and the client saw a reset).
    assert strict["lb1"]["survived"] == 0, strict
    assert strict["lb1"]["errors"] == {"TimeoutError": strict["lb1"]["flows"]}, strict
    # With the window check off, lb1 translates those answers and the moved flows survive.
    assert lib["lb1"]["survived"] == lib["lb1"]["flows"], lib


def test_nat_per_instance_snat_behind_ecmp() -> None:
    tmp = Path(f"/tmp/v6lb-an-{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    figures: dict[str, Any] = {}
    moves: list[float] = []
    try:
        with nat_lab(tmp, snat=True) as (ns, socks, client):
            rt = ns["router"]
            owner = owners(ns, client.ask(f"open {N}"))
            time.sleep(1.0)
            t, figures["withdraw_route_s"] = move(rt, socks)
            moves.append(t)
            time.sleep(2.0)
            figures["rst_after_withdraw"] = rst_counts(ns["client"])
            second = client.ask(f"open {N}")  # all through lb2 now
            owner.update(owners(ns, second))
            time.sleep(1.0)
            t, figures["announce_route_s"] = move(rt, socks, "enable")
            moves.append(t)
            time.sleep(2.0)
            figures["rst_after_announce"] = rst_counts(ns["client"])
            flows = client.ask("stop")["flows"]
            figures["before"] = first = tally(flows, owner, 0, moves)
            figures["during"] = during = tally(flows, owner, N, moves)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nnat with per-instance snat: " + json.dumps(figures))
    # SNAT fixes the reply path: every connection opens, through either instance.
    assert all(first[r]["flows"] > 0 and first[r]["opened"] == first[r]["flows"] for r in LBS)
    assert during["lb2"]["opened"] == during["lb2"]["flows"] == N, during
    # It does not fix the client->VIP path. lb1 stays up and its replies would still come
    # back to it, but the client's packets now reach lb2, which picks the flow up, DNATs
    # it to the same backend and SNATs it to lb2's own address: the backend has no such
    # connection and resets it, and lb2 passes the RST on to the client.
    assert first["lb1"]["errors"] == {"ConnectionResetError": first["lb1"]["flows"]}, first
    assert first["lb2"]["survived"] == first["lb2"]["flows"], first
    # Announcing lb1 again moves back the flows that hash to it: those opened through lb2
    # meanwhile are reset the same way, the others survive.
    broke = during["lb2"]["flows"] - during["lb2"]["survived"]
    assert 0 < broke < N and during["lb2"]["errors"] == {"ConnectionResetError": broke}, during
