"""The proxy modes in the lab, with both engines: real curl, nginx backends, real captures.

The root test builds ``examples/lab-proxy.yaml`` (client, router, LB, three pods)
under a lab name unique to this run, once with ``--proxy builtin`` and once with
``--proxy haproxy``. Each pod runs Debian's nginx (``v6lb.lab.nginx``), which logs
``$remote_addr``, ``$proxy_protocol_addr``, ``$http_x_forwarded_for`` and
``$http_forwarded`` as JSON. From the client namespace, ``curl -6``:

* ``proxy-l4`` (PROXY v2 to the pods): nginx saw the LB's address as
  ``$remote_addr``, and the client's address and port as ``$proxy_protocol_addr``
  and ``$proxy_protocol_port``;
* ``proxy-l7``: nginx saw the LB's address, and ``X-Forwarded-For``,
  ``Forwarded: for="[client]:port"`` and ``X-Forwarded-Proto: http``, even when the
  client sent forged forwarding headers (they are stripped);
* health checks reach the pods from the LB;
* ``lab trace --mode proxy-l4|proxy-l7 --json``: two TCP connections with
  different 4-tuples (client -> VIP, LB -> pod), the client's address never in an
  IP header on the pods' link (no NAT66), and the answers built from the captures.

The haproxy run then SIGKILLs every lab process (a crash) and checks that ``lab
down`` still removes everything. The plan tests need no root. Addresses:
2001:db8::/32 and fd00::/8 only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from v6lb.core import forwarded
from v6lb.lab import nginx
from v6lb.lab.plan import LAB_ROOT, LabError, plan_lab
from v6lb.model.config import parse_config
from v6lb.model.topology import require_topology
from v6lb.wire.pcap import ip_offset, read

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lab-proxy.yaml"
V6LB = [sys.executable, "-m", "v6lb.cli"]
CLIENT = "2001:db8:1::100"
LB_INSIDE = "fd00:20::1"  # the LB's address on the pods' link: the backends' TCP peer
L4_VIP, L7_VIP = "2001:db8:100::90", "2001:db8:100::91"
PODS = {"fd00:20::a": "be1", "fd00:20::b": "be2", "fd00:20::c": "be3"}


def _plan(raw: dict[str, Any], tmp_path: Path) -> Any:
    config = parse_config(raw, str(EXAMPLE))
    return plan_lab(config, require_topology(config), "abc", root=tmp_path)


# --- the plan (no root) ---------------------------------------------------------


def test_plan_puts_proxy_vips_on_the_lb_and_nginx_on_the_pods(tmp_path: Path) -> None:
    plan = _plan(yaml.safe_load(EXAMPLE.read_text()), tmp_path)
    assert {str(a) for a in plan.loopbacks["lb"]} == {L4_VIP, L7_VIP}
    assert [v.mode for v in plan.lb_configs["lb"].vips] == ["proxy-l4", "proxy-l7"]
    assert plan.servers == []  # no Python httpd: nginx serves the proxy VIPs' backends
    sites = nginx.plan_nginx(plan)
    assert {(s.node, str(s.address)) for s in sites} == {(n, a) for a, n in PODS.items()}
    assert all(s.proxy_protocol_ports == (8081,) and s.http_ports == (8080,) for s in sites)
    f = nginx.files(plan.labdir, "be1")
    conf = nginx.render_conf(sites[0], f)
    assert f"listen [{sites[0].address}]:8081 proxy_protocol;" in conf
    assert f"listen [{sites[0].address}]:8080;" in conf
    for var in ("$remote_addr", "$proxy_protocol_addr", "$http_x_forwarded_for", "$http_forwarded"):
        assert var in conf
    assert str(f.access_log) in conf and str(f.pid) in conf
    assert all(str(tmp_path) in line for line in conf.splitlines() if "_path " in line)


def test_plan_refuses_one_port_for_proxy_v2_and_plain_http(tmp_path: Path) -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    for b in raw["vips"][1]["backends"]:
        b["port"] = 8081  # the proxy-l4 VIP sends PROXY v2 to 8081
    with pytest.raises(LabError, match=r"different ports"):
        nginx.plan_nginx(_plan(raw, tmp_path))


# --- the real lab (root) ----------------------------------------------------------


def v6lb(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*V6LB, *args], capture_output=True, text=True, timeout=timeout)
    assert not check or r.returncode == 0, f"v6lb {' '.join(args)}: {r.stderr}"
    return r


def _ns_left(name: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.startswith(f"v6lb-{name}-")]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"px{os.getpid() % 100000}"
    path = tmp_path / "lab-proxy.yaml"
    path.write_text(EXAMPLE.read_text())
    try:
        yield name, path
    finally:
        v6lb("lab", "down", "--name", name, check=False)
    assert _ns_left(name) == []
    assert not (LAB_ROOT / name).exists()


def curl(name: str, url: str, *extra: str) -> tuple[dict[str, Any], int]:
    """nginx's JSON answer and curl's local port."""
    r = v6lb(
        "lab", "exec", "--name", name, "client", "--",
        "curl", "-6", "-s", "-S", "--fail", "-m", "10", "-w", "\n%{local_port}", *extra, url,
    )  # fmt: skip
    body, port = r.stdout.rsplit("\n", 1)
    return json.loads(body), int(port)


def log_line(name: str, node: str, request_id: str) -> dict[str, Any]:
    """The nginx access log line of one request (nginx logs it just after answering)."""
    path = LAB_ROOT / name / f"{node}.nginx.access.log"
    deadline = time.monotonic() + 5
    while True:
        lines = [x for x in nginx.read_access_log(path) if x.get("request_id") == request_id]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == 1, f"{path}: no line for request {request_id}"
    return lines[0]


def _pods_ip_addresses(pcap: Path) -> set[str]:
    out = set()
    for rec in read(pcap.read_bytes()):
        off = ip_offset(rec.linktype, rec.data)
        if off >= 0:
            pkt = bytes(rec.data[off:])
            out |= {str(ipaddress.IPv6Address(pkt[8:24])), str(ipaddress.IPv6Address(pkt[24:40]))}
    return out


def _check_trace(name: str, mode: str, tmp_path: Path) -> None:
    out = tmp_path / mode
    exp = json.loads(
        v6lb("lab", "trace", "--name", name, "--mode", mode, "--out", str(out), "--json").stdout
    )
    meta = json.loads((out / "trace.json").read_text())
    ans, facts = exp["answers"], exp["facts"]
    assert ans["nat66_at_lb"] is False and ans["nat_kind"] == "new connection (proxy)"
    assert ans["backend_saw_source"] == LB_INSIDE
    assert facts["app_saw_client"] == CLIENT
    assert ans["reply_via_lb"] is True
    how = ans["client_address_reaches_app"]
    assert ("PROXY v2" if mode == "proxy-l4" else f'for="[{CLIENT}]:') in how

    # two TCP connections per request with different 4-tuples: client -> VIP, LB -> pod
    # (proxy-l4 opens a backend connection per client connection; proxy-l7 may reuse a
    # pooled one, so its SYN may predate the capture)
    def conns(link: str, leg: str) -> set[tuple[str, str]]:
        return {
            (r["src"], r["dst"])
            for r in exp["hops"]
            if r["proto"] == "tcp" and r["link"] == link and r["leg"] == leg
        }

    ports = meta["client_ports"]
    vip = L4_VIP if mode == "proxy-l4" else L7_VIP
    front, back = conns("net", "request"), conns("pods", "request")
    assert front == {(f"[{CLIENT}]:{p}", f"[{vip}]:80") for p in ports}
    assert {s for s, _ in back} == {f"[{a}]:{p}" for a, p in meta["initiators"]}
    assert all(s.startswith(f"[{LB_INSIDE}]:") and d[1:].split("]")[0] in PODS for s, d in back)
    if mode == "proxy-l4":
        assert back == conns("pods", "handshake") - {(d, s) for s, d in back}
    assert not front & back
    assert len(facts["connections"]) >= 2
    # no NAT66: on the pods' link no IP header carries the client's address or the VIP
    seen = _pods_ip_addresses(out / "pods.pcap")
    assert CLIENT not in seen and vip not in seen and LB_INSIDE in seen
    # every captured request reached nginx with the client's address in the header
    for req in meta["requests"]:
        line = req["backend_log"]
        assert line["remote_addr"] == LB_INSIDE
        if mode == "proxy-l4":
            assert (line["proxy_protocol_addr"], line["proxy_protocol_port"]) == (
                CLIENT,
                str(req["client_port"]),
            )
        else:
            assert line["x_forwarded_for"] == CLIENT
            assert f'for="[{CLIENT}]:{req["client_port"]}"' in line["forwarded"]


def _haproxy_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("v6lb-haproxy-*")}


@pytest.mark.root
@pytest.mark.parametrize("engine", ["builtin", "haproxy"])
def test_proxy_lab(lab: tuple[str, Path], tmp_path: Path, engine: str) -> None:
    name, path = lab
    t0 = time.monotonic()
    up = v6lb("lab", "up", str(path), "--name", name, "--proxy", engine)
    assert f"proxy {engine} on 2 VIP port(s)" in up.stderr
    st = json.loads(v6lb("lab", "status", "--name", name, "--json").stdout)
    # a proxy-only LB answers on its control socket too: lab status finds it
    lb = st["lbs"]["lb"]
    assert st["proxy"] == engine and lb["socket"] and "error" not in lb["status"], lb
    assert lb["status"]["proxy_engine"] == engine
    assert sorted(v["mode"] for v in lb["status"]["proxy_vips"]) == ["proxy-l4", "proxy-l7"]
    text = v6lb("lab", "status", "--name", name).stdout
    assert f"proxy-l4 [{L4_VIP}]" in text and "status unavailable" not in text, text
    procs = st["processes"]
    assert sorted(p["node"] for p in procs if p["kind"] == "nginx") == ["be1", "be2", "be3"]
    assert all(p["alive"] for p in procs), procs

    # proxy-l4, PROXY v2: the pod's TCP peer is the LB; the header carries the client
    nodes = set()
    for i in range(3):
        ans, port = curl(name, f"http://[{L4_VIP}]/l4?n={i}")
        line = log_line(name, ans["node"], ans["request_id"])
        assert line["remote_addr"] == LB_INSIDE and ans["peer"][0] == LB_INSIDE
        assert line["proxy_protocol_addr"] == CLIENT
        assert line["proxy_protocol_port"] == str(port)
        assert line["server_port"] == "8081" and line["x_forwarded_for"] == ""
        nodes.add(ans["node"])
    assert len(nodes) >= 2, nodes  # round-robin over the pods

    # proxy-l7: the LB's address on the socket; XFF, Forwarded and X-Forwarded-Proto
    nodes = set()
    forged = (
        "-H",
        "X-Forwarded-For: 2001:db8:dead::1",
        "-H",
        'Forwarded: for="[2001:db8:dead::1]"',
    )
    for i in range(3):
        ans, port = curl(name, f"http://[{L7_VIP}]/l7?n={i}", *(forged if i == 2 else ()))
        line = log_line(name, ans["node"], ans["request_id"])
        assert line["remote_addr"] == LB_INSIDE and line["proxy_protocol_addr"] == ""
        assert line["x_forwarded_for"] == CLIENT, line  # a forged header is not passed on
        assert line["x_forwarded_proto"] == "http"
        fors = [e["for"] for e in forwarded.parse_forwarded(line["forwarded"]) if "for" in e]
        assert len(fors) == 1, line  # the forged element is dropped, not appended to
        node = forwarded.parse_node(fors[0])
        assert (node.address, node.port) == (ipaddress.IPv6Address(CLIENT), port)
        assert f'for="[{CLIENT}]:{port}"' in line["forwarded"]  # RFC 7239 quoting of [v6]:port
        assert line["server_port"] == "8080"
        nodes.add(ans["node"])
    assert len(nodes) >= 2, nodes

    # active health checks reach every pod from the LB (TCP connect on 8081, GET on 8080)
    deadline = time.monotonic() + 10
    while True:
        probed = {
            node
            for node in PODS.values()
            for x in nginx.read_access_log(LAB_ROOT / name / f"{node}.nginx.access.log")
            if x["uri"] == "/healthz" and x["remote_addr"] == LB_INSIDE
        }
        if probed == set(PODS.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert probed == set(PODS.values())

    _check_trace(name, "proxy-l4", tmp_path)
    _check_trace(name, "proxy-l7", tmp_path)
    took = time.monotonic() - t0

    if engine == "builtin":
        r = v6lb("lab", "diff", "--name", name, "--mode", "proxy-l4", check=False)
        assert r.returncode == 2 and "does not compare proxy-l4" in r.stderr
        sys.stderr.write(f"{engine} lab proof: {took:.1f} s\n")
        return
    # a crash: every lab process SIGKILLed (haproxy keeps running, orphaned); down still
    # removes the namespaces, the processes in them, haproxy's temp dir and the lab dir
    before = _haproxy_dirs()
    lb_pids = subprocess.run(
        ["ip", "netns", "pids", f"v6lb-{name}-lb"], capture_output=True, text=True
    ).stdout.split()
    mine = set()
    for pid in lb_pids:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        if Path(argv[0]).name == "haproxy":
            mine.add(Path(argv[argv.index("-f") + 1]).parent.name)
    assert mine and mine <= before
    for p in procs:
        os.kill(p["pid"], signal.SIGKILL)
    v6lb("lab", "down", "--name", name)
    assert _ns_left(name) == [] and not (LAB_ROOT / name).exists()
    assert not mine & _haproxy_dirs()
    for pid in [p["pid"] for p in procs] + [int(x) for x in lb_pids]:
        cmd = Path(f"/proc/{pid}/cmdline")
        assert not cmd.exists() or not cmd.read_bytes(), f"pid {pid} is still running"
    sys.stderr.write(f"{engine} lab proof: {took:.1f} s before the crash test\n")
