"""`v6lb lab trace` and `v6lb lab diff`: real captures on every link, compared with the simulator.

The pure tests build frames by hand: the same packet on two links, before and
after a NAT66 rewrite, is one ``packet_id``; :func:`v6lb.model.diff.compare`
reports missing, unexpected and uncaptured links.

The root tests share one lab of ``examples/lab-pmtu.yaml`` (lab-modes.yaml's VIPs and
npt pair behind a WAN link of MTU 1280) under a name unique to this run (the module
fixture's teardown always runs ``lab down``):

* ``lab trace --mode nat``: one non-empty pcap per link on the path, which tshark
  reads without a malformed packet; on the LB -> pod link the client's packets go
  to a pod's address from the client's own address;
* ``lab diff --mode nat`` exits 0; with the pods link's pcap removed it exits 1;
* ``lab trace --mode dsr-srv6`` shows the SRv6-encapsulated hop from the LB, and the
  replies go from the pods to the router, never through the LB;
* ``lab trace --mode npt``: the client reaches the server's mapped address, and the
  server's own connection out leaves from it; ``lab diff`` finds no difference for
  npt, dsr-l2, dsr-srv6 and dsr-ip6ip6 either;
* in every mode the trace's third request (``GET /?bytes=20000``) makes rtr send Packet
  Too Big (MTU 1280) for a full-size reply segment: the trace shows it go rtr -> lb ->
  the backend that served the request (tunnelled, MAC-rewritten or translated as the
  mode does), that backend's next data, and the data crossing the WAN after it; the
  diff compares the errors (and the data after them) with the simulator's too;
* last, a health failure: one pod's HTTP server is killed under the nat VIP's TCP
  health checks; ``v6lb status`` shows it down, new curl connections go to the
  backends the core predicts (none to the dead one), held flows of the live
  backends keep their backend.

Addresses: 2001:db8::/32 and fd00::/8 only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest

from netns_helpers import wait_for
from v6lb.core.nptv6 import NptMapping
from v6lb.lab.plan import LAB_ROOT
from v6lb.model.capture import Frame, hops_from_frames
from v6lb.model.config import load_config
from v6lb.model.diff import Tuple4, compare, link_tuples
from v6lb.model.explain import explain, key_rows
from v6lb.model.pools import pool_for
from v6lb.wire import build
from v6lb.wire.constants import TCP_ACK, TCP_SYN

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lab-pmtu.yaml"
V6LB = [sys.executable, "-m", "v6lb.cli"]
CLIENT = "2001:db8:1::100"
VIP = "2001:db8:100::80"
PODS = {"fd00:20::a", "fd00:20::b", "fd00:20::c"}


def v6lb(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*V6LB, *args], capture_output=True, text=True, timeout=timeout)


# --- settle: when a capture may be stopped -----------------------------------------------


def test_settle_waits_for_each_capture_process_to_sleep(tmp_path: Path) -> None:
    """A capture whose file stopped growing is done only once its process sleeps: one
    kept from the CPU (runnable, as a tcpdump woken by a packet is) is waited for."""
    from v6lb.lab.trace import _waiting, settle

    pcap = tmp_path / "l.pcap"
    pcap.write_bytes(b"\xd4\xc3\xb2\xa1")
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        wait_for("the idle process asleep", lambda: _waiting(idle.pid), 10, (), 0.02)
        t0 = time.monotonic()
        settle([pcap], quiet=0.05, limit=5.0, pids=[idle.pid])
        assert time.monotonic() - t0 < 2.5  # done: the file is still and the process asleep
        t0 = time.monotonic()
        settle([pcap], quiet=0.05, limit=0.6, pids=[idle.pid, busy.pid])
        assert time.monotonic() - t0 >= 0.6  # waited the whole limit for the busy one
        assert not _waiting(busy.pid) and _waiting(idle.pid)
    finally:
        for p in (idle, busy):
            p.kill()
            p.wait()
    assert _waiting(busy.pid)  # gone (reaped): nothing to wait for


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


ROUTER, LB_IN, SID = "fd00:20::fe", "fd00:20::1", "fd00:61::100"
TMACS = {
    "02:00:00:00:00:01": "client",
    "02:00:00:00:00:02": "lb",
    "02:00:00:00:00:03": "be1",
    "02:00:00:00:00:04": "rtr",
    "02:00:00:00:00:05": "isp",
}


def _tmac(node: str) -> str:
    return next(m for m, n in TMACS.items() if n == node)


def _tf(ts: int, link: str, src: str, dst: str, pkt: bytes) -> Frame:
    return Frame(ts, link, _tmac(src), _tmac(dst), bytes(pkt))


def test_packet_too_big_passed_on_in_a_tunnel_is_one_error_and_compared() -> None:
    """rtr's PTB to the VIP, and the LB's IPv6-in-IPv6 copy of it to the backend, are
    one packet (leg "error"); the diff compares it (quote included) and the data after it."""
    full = bytes(build.tcp(VIP, CLIENT, 80, 45000, seq=100, ack=8, flags=0x18, payload=b"x" * 1440))
    ptb = bytes(build.icmpv6_error(ROUTER, VIP, 2, 0, full, 1280))
    tunnelled = bytes(build.ipv6(LB_IN, SID, 41, ptb))
    small = bytes(
        build.tcp(VIP, CLIENT, 80, 45000, seq=100, ack=8, flags=0x18, payload=b"x" * 1220)
    )
    frames = [
        _tf(1_000, "pods", "be1", "rtr", full),
        _tf(2_000, "edge", "rtr", "lb", ptb),
        _tf(3_000, "pods", "lb", "be1", tunnelled),
        _tf(4_000, "pods", "be1", "rtr", small),
        _tf(5_000, "wan", "rtr", "isp", small),
        # the LB's own error (an LB that is the router before the small link)
        _tf(6_000, "pods", "lb", "be1", bytes(build.icmpv6_error(LB_IN, VIP, 2, 0, full, 1400))),
    ]
    hops = hops_from_frames(frames, macs=TMACS, endpoints={}, client=CLIENT, client_ports=[45000])
    assert [h.leg for h in hops] == ["response", "error", "error", "response", "response", "error"]
    assert hops[1].packet_id == hops[2].packet_id != hops[5].packet_id
    assert hops[3].packet_id == hops[4].packet_id
    got = link_tuples(hops, client=CLIENT, client_ports={45000: "C1"}, lbs={"lb"})
    quote = f"quoting [{VIP}]:80 -> [{CLIENT}]:C1"
    reply = Tuple4(VIP, CLIENT, "80", "C1")
    assert got["edge"] == {Tuple4(ROUTER, VIP, "-", "-", "", f"packet too big mtu 1280 {quote}")}
    assert got["pods"] == {
        reply,
        replace(reply, after="packet too big mtu 1280"),
        Tuple4(
            ROUTER,
            VIP,
            "-",
            "-",
            f"ipv6-in-ipv6 {LB_IN} -> {SID}",
            f"packet too big mtu 1280 {quote}",
        ),
        Tuple4("<lb>", VIP, "-", "-", "", f"packet too big mtu 1400 {quote}"),
    }
    assert got["wan"] == {reply, replace(reply, after="packet too big mtu 1280")}
    assert "(data sent after the packet too big mtu 1280)" in str(
        replace(reply, after="packet too big mtu 1280")
    )
    # explain: the tunnelled error reads as one, and the data after it is a key row
    rows = explain("dsr-ip6ip6", hops, {"client": CLIENT}, {"lb": "lb"}).rows
    assert rows[2].detail.startswith("inner icmpv6 packet too big mtu 1280, quoting [")
    assert rows[2].change.startswith("encapsulated in IPv6-in-IPv6") and not rows[2].client_bound
    assert rows[3].follows_error and "after the packet too big mtu 1280 from rtr" in rows[3].change
    assert rows[3].seq in {r.seq for r in key_rows(rows)}


# --- root: a real lab ----------------------------------------------------------------


@pytest.fixture(scope="module")
def lab() -> Iterator[str]:
    """One lab for the module's root tests; the health test, which kills a pod's server, is last."""
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


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def _trace(name: str, mode: str, out: Path) -> dict[str, Any]:
    r = v6lb("lab", "trace", "--name", name, "--mode", mode, "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    exp: dict[str, Any] = json.loads(r.stdout)
    _check_packet_too_big(exp, json.loads((out / "trace.json").read_text()), mode)
    return exp


_DELIVERED = {"nat": "pods", "npt": "npt-lan"}  # else pods, in the mode's encapsulation


def _check_packet_too_big(exp: dict[str, Any], meta: dict[str, Any], mode: str) -> None:
    """The large GET's Packet Too Big: rtr -> lb -> the serving backend, then smaller data."""
    big = meta["requests"][2]
    assert big["path"] == "/?bytes=20000" and big["response_bytes"] >= 20000, big
    port, node = big["client_port"], big["answer"]["node"]
    quoting = f"[{CLIENT}]:{port} tcp"
    errors = [
        h
        for h in exp["hops"]
        if h["leg"] == "error"
        and "packet too big mtu 1280" in h["detail"]
        and quoting in h["detail"]
    ]
    paths: dict[int, list[dict[str, Any]]] = {}
    for h in errors:
        paths.setdefault(h["packet_id"], []).append(h)
    way = [[(h["link"], h["sender"], h["receiver"]) for h in hs] for hs in paths.values()]
    want = [("edge", "rtr", "lb"), (_DELIVERED.get(mode, "pods"), "lb", node)]
    assert want in way, way
    first = min(h["seq"] for hs in paths.values() for h in hs if hs[-1]["receiver"] == node)
    after = [h for h in exp["hops"] if h["seq"] > first and h["dst"] == f"[{CLIENT}]:{port}"]
    assert any(h["follows_error"] and h["sender"] == node for h in after), mode
    assert any(h["link"] == "wan" and h["leg"] == "response" for h in after), mode
    if mode.startswith("dsr-") and mode != "dsr-l2":
        (hop,) = [h for h in paths[errors[0]["packet_id"]] if h["sender"] == "lb"]
        assert hop["proto"] == ("srv6" if mode == "dsr-srv6" else "ipv6-in-ipv6")
        assert hop["detail"].startswith("inner icmpv6 packet too big mtu 1280")


@pytest.mark.root
def test_trace_and_diff(lab: str, tmp_path: Path) -> None:
    name = lab
    out = tmp_path / "nat"
    exp = _trace(name, "nat", out)
    for link in ("net", "wan", "edge", "pods"):
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
    # the Packet Too Big rtr sent to the VIP, and the one nf_nat passed on to the pod
    ptb = [line for line in r.stdout.splitlines() if "icmpv6 packet too big mtu 1280" in line]
    assert any(line.startswith("  same  edge: 2001:db8:2::1 -> 2001:db8:100::80") for line in ptb)
    assert any(line.startswith("  same  pods: 2001:db8:2::1 -> fd00:20::") for line in ptb)
    assert "(data sent after the packet too big mtu 1280)" in r.stdout

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
    # DSR replies leave the pod for the router, never through the LB (`v6lb backend`
    # keeps the pods' source-specific route for packets from the VIPs)
    back = [h for h in srv6["hops"] if h["proto"] == "tcp" and _addr(h["dst"]) == CLIENT]
    assert back and all(h["link"] in ("pods", "wan", "net") and h["sender"] != "lb" for h in back)
    assert {h["receiver"] for h in back if h["link"] == "pods"} == {"rtr"}
    assert srv6["answers"]["reply_via_lb"] is False


@pytest.mark.root
def test_npt_trace_and_every_mode_matches_the_simulator(lab: str, tmp_path: Path) -> None:
    name = lab
    inside, outside = (
        "fd00:21::5",
        str(NptMapping("fd00:21::/64", "2001:db8:21::/64").translate("fd00:21::5")),
    )
    exp = _trace(name, "npt", tmp_path / "npt")
    tcp = [h for h in exp["hops"] if h["proto"] == "tcp"]
    # the client reaches the server at its mapped address; the LB rewrites the destination only
    to_srv = [h for h in tcp if h["link"] == "npt-lan" and h["receiver"] == "srv"]
    assert to_srv and all(_addr(h["dst"]) == inside for h in to_srv)
    assert {_addr(h["src"]) for h in to_srv} == {CLIENT}
    out_edge = [h for h in tcp if h["link"] == "edge" and h["sender"] == "lb"]
    assert out_edge and {_addr(h["src"]) for h in out_edge} == {outside}
    facts = exp["facts"]
    assert exp["answers"]["nat66_at_lb"] is True
    assert exp["answers"]["backend_saw_source"] == CLIENT
    assert facts["backend_saw_destination"] == inside and facts["chosen_record"] == outside
    # the server's own connection out: from its mapped address on every outside link
    ob = facts["outbound"]
    assert ob["client_saw_source"] == outside and ob["translated"] is True
    sport = int(ob["from"].rsplit(":", 1)[1])
    mine = [h for h in tcp if _addr(h["src"]) in (inside, outside) and _port(h["src"]) == sport]
    assert {h["link"] for h in mine} == {"npt-lan", "edge", "wan", "net"}
    assert all(_addr(h["src"]) == (inside if h["link"] == "npt-lan" else outside) for h in mine)

    for mode in ("npt", "dsr-l2", "dsr-srv6", "dsr-ip6ip6"):
        where = tmp_path / mode
        if mode != "npt":
            _trace(name, mode, where)
        r = v6lb("lab", "diff", "--name", name, "--mode", mode, "--from", str(where))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "DIFF" not in r.stdout and r.stdout.rstrip().endswith("no differences"), r.stdout
        assert " same " in r.stdout and "icmpv6 packet too big mtu 1280" in r.stdout, r.stdout


# The held flows: open, send a request with its last line missing, print the local ports;
# on a line on stdin, finish each request and print the server that answers (or the error).
HELD = r"""
import json, socket, sys
vip, n = sys.argv[1], int(sys.argv[2])
socks, ports = [], []
for i in range(n):
    s = socket.create_connection((vip, 80), timeout=10)
    s.sendall(f"GET /held/{i} HTTP/1.1\r\nHost: lab\r\n".encode())
    socks.append(s)
    ports.append(s.getsockname()[1])
print(json.dumps(ports), flush=True)
sys.stdin.readline()
out = []
for s in socks:
    try:
        s.sendall(b"\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        out.append(json.loads(data.split(b"\r\n\r\n", 1)[1])["server"])
    except (OSError, ValueError, IndexError) as exc:
        out.append(type(exc).__name__)
print(json.dumps(out), flush=True)
"""


def _established(name: str, node: str) -> dict[int, str]:
    """The client's ports with an established connection to the node's port 80."""
    r = subprocess.run(
        ["ip", "netns", "exec", f"v6lb-{name}-{node}", "ss", "-Htn", "state", "established",
         "( sport = :80 )"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    out = {}
    for line in r.stdout.splitlines():
        peer = line.split()[-1]
        if _addr(peer) == CLIENT:
            out[_port(peer)] = node
    return out


def _new_flows(name: str, n: int) -> list[tuple[int, str]]:
    """``n`` new connections by one real curl (Connection: close): (client port, server)."""
    url = f"http://[{VIP}]/new?n=[1-{n}]"
    r = v6lb("lab", "exec", "--name", name, "client", "--", "curl", "-6", "-s", "-S", "-m", "10",
             "-H", "Connection: close", "-w", "port=%{local_port}\\n", url, timeout=180)  # fmt: skip
    assert r.returncode == 0, r.stderr
    flows, server = [], None
    for line in r.stdout.splitlines():
        if line.startswith("port="):  # -w "@..." would name a file
            assert server is not None, r.stdout
            flows.append((int(line[5:]), server))
            server = None
        elif line.strip():
            server = json.loads(line)["server"]
    assert len(flows) == n, r.stdout
    return flows


@pytest.mark.root
def test_health_failure_moves_only_the_dead_backends_flows(lab: str) -> None:
    """Kill one pod's HTTP server while the nat VIP has TCP health checks (run this last)."""
    name = lab
    config = load_config(EXAMPLE)
    vip = next(v for v in config.vips if v.name == "web-nat")
    pool = pool_for(vip, config.lb.flow_hash_seed)
    nodes = {"fd00:20::a": "be1", "fd00:20::b": "be2", "fd00:20::c": "be3"}
    backends = [str(b.address) for b in vip.backends]
    sock = str(LAB_ROOT / name / "lb.sock")

    def predicted(sport: int) -> str:
        i = pool.pick_flow(IPv6Address(CLIENT).packed, vip.address.packed, sport, 80)
        return backends[i]

    def status() -> dict[str, Any]:
        r = v6lb("status", "--control-socket", sock, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def health(st: dict[str, Any] | None = None) -> dict[str, str]:
        (web,) = [v for v in (st or status())["vips"] if v["name"] == "web-nat"]
        return {b["address"]: b["health"] for b in web["backends"]}

    assert set(health().values()) == {"up"}
    for sport, server in _new_flows(name, 30):  # all up: the core's choice
        assert server == predicted(sport), (sport, server)

    held = subprocess.Popen(
        ["ip", "netns", "exec", f"v6lb-{name}-client", sys.executable, "-c", HELD, VIP, "15"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert held.stdin is not None and held.stdout is not None
        ports = json.loads(held.stdout.readline())
        seen: dict[int, str] = {}
        deadline = time.monotonic() + 10
        while len(seen) < len(ports) and time.monotonic() < deadline:
            seen = {k: v for node in nodes.values() for k, v in _established(name, node).items()}
            time.sleep(0.1)
        assert set(seen) == set(ports), (ports, seen)
        at = {p: next(a for a, n in nodes.items() if n == seen[p]) for p in ports}
        assert all(at[p] == predicted(p) for p in ports), at
        counts = {a: sum(1 for p in ports if at[p] == a) for a in backends}
        dead = max(backends, key=lambda a: counts[a])  # has held flows; others have some too
        assert 0 < counts[dead] < len(ports), counts

        state = json.loads((LAB_ROOT / name / "state.json").read_text())
        (pid,) = [
            p["pid"]
            for p in state["processes"]
            if p["node"] == nodes[dead] and p["kind"] == "httpd"
        ]
        updates = status()["map_updates"]
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        # down, and the map refilled without it: the probe's verdict comes first, the
        # refill (map_updates) after it, and a new flow before that may still go there
        while (st := status())["map_updates"] == updates or health(st)[dead] != "down":
            assert time.monotonic() - t0 < 30, st
            time.sleep(0.2)
        took = time.monotonic() - t0
        assert {a: h for a, h in health().items() if a != dead} == {
            a: "up" for a in backends if a != dead
        }

        pool.set_up(backends.index(dead), False)
        after = _new_flows(name, 40)
        assert all(server != dead for _, server in after), after
        assert all(server == predicted(sport) for sport, server in after), after
        assert len({s for _, s in after}) == 2

        held.stdin.write("go\n")
        held.stdin.flush()
        again = json.loads(held.stdout.readline())
        kept = [(p, a) for p, a in zip(ports, again, strict=True) if at[p] != dead]
        assert kept and all(a == at[p] for p, a in kept), (ports, again)
        print(
            f"lab health: {dead} down {took:.2f} s after its server was killed; 40/40 new"
            f" connections on the predicted live backends; {len(kept)}/{len(kept)} held flows"
            f" of live backends kept theirs ({counts[dead]} held flows were the dead one's)"
        )
    finally:
        if held.poll() is None:
            held.kill()
        held.wait(10)
