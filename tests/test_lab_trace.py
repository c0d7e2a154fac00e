"""`v6lb lab trace` and `v6lb lab diff`: real captures on every link, compared with the simulator.

The pure tests build frames by hand: the same packet on two links, before and
after a NAT66 rewrite, is one ``packet_id``; :func:`v6lb.model.diff.compare`
reports missing, unexpected and uncaptured links.

The root test brings ``examples/lab-modes.yaml`` up under a name unique to this
run (the fixture's teardown always runs ``lab down``), then:

* ``lab trace --mode nat``: one non-empty pcap per link on the path, which tshark
  reads without a malformed packet; on the LB -> pod link the client's packets go
  to a pod's address from the client's own address;
* ``lab diff --mode nat`` exits 0; with the pods link's pcap removed it exits 1;
* ``lab trace --mode dsr-srv6`` shows the SRv6-encapsulated hop from the LB.

Addresses: 2001:db8::/32 and fd00::/8 only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from v6lb.lab.plan import LAB_ROOT
from v6lb.model.capture import Frame, hops_from_frames
from v6lb.model.diff import Tuple4, compare, link_tuples
from v6lb.wire import build
from v6lb.wire.constants import TCP_ACK, TCP_SYN

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lab-modes.yaml"
V6LB = [sys.executable, "-m", "v6lb.cli"]
CLIENT = "2001:db8:1::100"
VIP = "2001:db8:100::80"
PODS = {"fd00:20::a", "fd00:20::b", "fd00:20::c"}


def v6lb(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*V6LB, *args], capture_output=True, text=True, timeout=timeout)


# --- pure: matching and comparing ----------------------------------------------------

MACS = {"02:00:00:00:00:01": "client", "02:00:00:00:00:02": "lb", "02:00:00:00:00:03": "be1"}


def _frame(ts: int, link: str, src: str, dst: str, pkt: bytes) -> Frame:
    return Frame(ts, link, src, dst, bytes(pkt))


def _syn(dst: str, hop_limit: int = 64) -> bytes:
    return bytes(build.tcp(CLIENT, dst, 45000, 80, seq=7, flags=TCP_SYN, hop_limit=hop_limit))


def test_same_packet_across_a_rewrite_is_one_packet() -> None:
    c, lb, be = MACS
    frames = [
        _frame(1_000, "net", c, lb, _syn(VIP)),
        _frame(2_000, "pods", lb, be, _syn("fd00:20::a", 63)),
        # a health check with another key: its own packet, and not the client's
        _frame(3_000, "pods", lb, be, bytes(build.tcp("fd00:20::1", "fd00:20::a", 9, 80))),
    ]
    hops = hops_from_frames(frames, macs=MACS, endpoints={})
    assert [h.packet_id for h in hops] == [1, 1, 2]
    assert (hops[1].sender, hops[1].receiver) == ("lb", "be1")
    ours = hops_from_frames(frames, macs=MACS, endpoints={}, client=CLIENT, client_ports=[45000])
    assert len(ours) == 2 and ours[0].leg == "handshake"
    # unknown MACs: the link's endpoints say who holds the addresses
    ends = {"net": {CLIENT: "client"}}
    h = hops_from_frames([_frame(1, "net", "x", "y", _syn(VIP))], macs={}, endpoints=ends)[0]
    assert h.sender == "client"


def test_compare_reports_differences_and_missing_pcaps() -> None:
    c, lb, be = MACS
    frames = [_frame(1, "net", c, lb, _syn(VIP)), _frame(2, "pods", lb, be, _syn("fd00:20::a"))]
    hops = hops_from_frames(frames, macs=MACS, endpoints={})
    got = link_tuples(hops, client=CLIENT, client_ports={45000: "C1"})
    assert got["pods"] == {Tuple4(CLIENT, "fd00:20::a", "C1", "80")}
    assert compare(got, got, pcap_sizes={"net": 1, "pods": 1}) == []
    other = {**got, "pods": {Tuple4(CLIENT, "fd00:20::b", "C1", "80")}}
    kinds = sorted(d.kind for d in compare(other, got))
    assert kinds == ["missing", "unexpected"]
    assert [d.kind for d in compare(got, got, pcap_sizes={"net": 1, "pods": -1})] == ["no capture"]
    assert [d.kind for d in compare(got, got, pcap_sizes={"net": 0, "pods": 1})] == ["no capture"]
    ack = bytes(build.tcp(CLIENT, VIP, 45000, 80, seq=8, ack=1, flags=TCP_ACK))
    assert hops_from_frames([_frame(1, "net", c, lb, ack)], macs=MACS, endpoints={})[0].leg == "ack"


# --- root: a real lab ----------------------------------------------------------------


@pytest.fixture
def lab() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if shutil.which("tcpdump") is None or shutil.which("curl") is None:
        pytest.skip("needs tcpdump and curl")
    name = f"tr{os.getpid() % 100000}"
    try:
        r = v6lb("lab", "up", str(EXAMPLE), "--name", name)
        assert r.returncode == 0, r.stderr
        yield name
    finally:
        down = v6lb("lab", "down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert not [ns for ns in _netns() if ns.startswith(f"v6lb-{name}-")]
    assert not (LAB_ROOT / name).exists()


def _netns() -> list[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
    return [x["name"] for x in json.loads(out or "[]")]


def _addr(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[0].strip("[]") if endpoint.startswith("[") else endpoint


def _trace(name: str, mode: str, out: Path) -> dict[str, Any]:
    r = v6lb("lab", "trace", "--name", name, "--mode", mode, "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    exp: dict[str, Any] = json.loads(r.stdout)
    return exp


@pytest.mark.root
def test_trace_and_diff(lab: str, tmp_path: Path) -> None:
    name = lab
    out = tmp_path / "nat"
    exp = _trace(name, "nat", out)
    for link in ("net", "edge", "pods"):
        pcap = out / f"{link}.pcap"
        assert pcap.stat().st_size > 24, link
        if shutil.which("tshark"):
            r = subprocess.run(
                ["tshark", "-r", str(pcap), "-Y", "_ws.malformed"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0 and r.stdout.strip() == "", (link, r.stdout, r.stderr)
            n = subprocess.run(["tshark", "-r", str(pcap)], capture_output=True, text=True)
            assert n.stdout.count("\n") > 10
    to_pods = [
        h
        for h in exp["hops"]
        if h["link"] == "pods" and h["sender"] == "lb" and h["proto"] == "tcp"
    ]
    assert to_pods
    assert all(_addr(h["dst"]) in PODS and _addr(h["src"]) == CLIENT for h in to_pods)
    assert exp["answers"]["nat66_at_lb"] is True
    assert exp["answers"]["backend_saw_source"] == CLIENT
    assert {h["leg"] for h in exp["hops"]} >= {"handshake", "request", "response"}

    r = v6lb("lab", "diff", "--name", name, "--mode", "nat", "--from", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no differences" in r.stdout

    # without --from: traces now, into the lab dir (which `lab down` removes)
    r = v6lb("lab", "diff", "--name", name, "--mode", "nat")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (LAB_ROOT / name / "trace-nat.pods.pcap").stat().st_size > 24

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "pods.pcap").unlink()
    r = v6lb("lab", "diff", "--name", name, "--mode", "nat", "--from", str(broken))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "pods: no capture: the pcap of this link is missing" in r.stdout

    srv6 = _trace(name, "dsr-srv6", tmp_path / "srv6")
    enc = [h for h in srv6["hops"] if h["link"] == "pods" and h["proto"] == "srv6"]
    assert enc and all(h["sender"] == "lb" for h in enc)
    assert any("encapsulated in SRv6" in h["change"] for h in enc)
    assert all(CLIENT in h["detail"] for h in enc)
