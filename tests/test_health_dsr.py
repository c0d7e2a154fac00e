"""DSR health checks through the data path, on both data planes, in real namespaces.

Namespaces: client, LB, a switch (one bridge), two backends. The LB's ``l1`` and the
backends' ``e0`` hang off the bridge: one L2 segment, over which the LB sends both the
tunnelled packets (``dsr-ip6ip6``: the decapsulation addresses are routed via the
backends' link addresses) and the ``dsr-l2`` frames (the backends' MACs are in the
file). Each backend also has a link straight to the client, its default route: replies
bypass the LB. ``v6lb backend FILE --address DECAP --dev e0`` sets up the tunnel side
(the tunnel VIP on ``lo``, ``End.DT6``); the ``dsr-l2`` VIP is put on ``lo`` by hand.

For each plane (one lab each, two VIPs: ``tun`` dsr-ip6ip6 and ``l2`` dsr-l2):

* ``type: http`` probes go to the VIP through the data path: ``v6lb status`` names it
  (the kernel plane: the tunnel and the MAC route, by mark; the python plane: a flow
  pinned to the backend in its forwarder), and every backend is up; new flows reach
  both backends.
* Both VIPs are removed from backend 1's ``lo`` (its HTTP server still listens on
  ``::``, so a probe of its own address would still pass): the daemon logs backend 1
  of each VIP down within ``fall x interval + timeout`` (plus one poll), and every new
  flow from the client is answered by backend 2.
* The VIPs are put back: backend 1 is up again in each VIP.
* Kernel plane: the egress link goes down and up, which deletes the dsr-l2 probes'
  neighbour entries and routes; the plane loads them again (and logs it) and every
  backend is up again.
* SIGTERM: the kernel plane leaves no rule, route or neighbour entry of the instance.

Namespaces ``v6lb-h-<pid>-<n>``, deleted in ``finally``; 2001:db8::/32 and fd00::/8 only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import netns_helpers
from netns_helpers import batch, client_behind, link, nsx, sh
from v6lb.engines.control import ControlError, query

V6LB = str(Path(sys.executable).parent / "v6lb")
VIP_T = "2001:db8:f::81"  # dsr-ip6ip6
VIP_L = "2001:db8:f::82"  # dsr-l2
BACKENDS = ["2001:db8:b::10", "2001:db8:b::11"]  # their link addresses (on the bridge)
MACS = ["02:00:00:00:b1:01", "02:00:00:00:b1:02"]
DECAPS = ["fd00:60:1::10", "fd00:60:2::10"]  # dsr-ip6ip6: the decap address (not on the host)
CLIENTS = "2001:db8:c::/64"
INTERVAL, TIMEOUT, FALL = 0.3, 0.2, 2

# An HTTP server: answers every request 200 with its tag and the client's address.
SERVER = r"""
import socket, sys, threading
tag = sys.argv[1]
ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("::", 80))
ls.listen(1024)
print("ready", flush=True)
def serve(c, peer):
    try:
        c.settimeout(2)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = c.recv(4096)
            if not chunk:
                return
            data += chunk
        body = f"{tag} {peer[0]}\n".encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                  % len(body) + body)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, peer = ls.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""

# GET / from each source address; prints [src, tag or None] per flow.
CLIENT = r"""
import json, socket, sys
out = []
for src in json.loads(sys.stdin.readline()):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(2)
    s.bind((src, 0))
    try:
        s.connect((sys.argv[1], 80))
        s.sendall(b"GET / HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        out.append([src, data.split(b"\r\n\r\n", 1)[1].decode().split()[0]])
    except (OSError, IndexError):
        out.append([src, None])
    s.close()
print(json.dumps(out), flush=True)
"""


def lab_file(instance: str, sock: str) -> dict[str, Any]:
    health = {
        "type": "http",
        "path": "/healthz",
        "interval": INTERVAL,
        "timeout": TIMEOUT,
        "rise": 1,
        "fall": FALL,
    }
    return {
        "lb": {
            "instance": instance,
            "flow_hash_seed": 0xD5,
            "interfaces": ["l0", "l1"],
            "addresses": ["2001:db8:a::1", "2001:db8:b::1"],
            "control_socket": sock,
        },
        "vips": [
            {
                "name": "tun",
                "address": VIP_T,
                "ports": [80],
                "mode": "dsr-ip6ip6",
                "table_size": 251,
                "tunnel_source": "2001:db8:b::1",
                "health": health,
                "backends": [{"address": a} for a in DECAPS],
            },
            {
                "name": "l2",
                "address": VIP_L,
                "ports": [80],
                "mode": "dsr-l2",
                "table_size": 251,
                "health": health,
                "backends": [{"address": a, "mac": m} for a, m in zip(BACKENDS, MACS, strict=True)],
            },
        ],
    }


def wait_for(what: str, fn: Any, timeout: float = 15.0) -> Any:
    return netns_helpers.wait_for(what, fn, timeout, (ControlError, AssertionError, OSError))


def flows(client: str, vip: str, sources: list[str]) -> list[str | None]:
    """The backend tag that answered each new flow (None: no answer)."""
    out = nsx(client, sys.executable, "-c", CLIENT, vip, stdin=json.dumps(sources) + "\n")
    return [tag for _, tag in json.loads(out)]


def health(sock: str) -> dict[str, list[str]]:
    return {v["name"]: [b["health"] for b in v["backends"]] for v in query(sock)["vips"]}


@pytest.mark.root
@pytest.mark.parametrize("plane", ["kernel", "python"])
def test_dsr_probes_through_the_data_path_find_a_backend_without_the_vip(
    tmp_path: Path, plane: str
) -> None:
    sock = f"/tmp/v6lb-hd-{os.getpid()}-{plane}.sock"
    instance = f"h{plane[0]}{os.getpid() % 10000}"
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(lab_file(instance, sock)))
    procs: list[subprocess.Popen[str]] = []
    with netns_helpers.namespaces("client", "lb", "sw", "b1", "b2", tag="h") as ns:
        c, lb, sw, bns = ns["client"], ns["lb"], ns["sw"], [ns["b1"], ns["b2"]]
        client_behind(c, lb, CLIENTS)
        nsx(sw, "ip", "link", "add", "br0", "type", "bridge")
        nsx(sw, "ip", "link", "set", "br0", "up")
        link(lb, "l1", sw, "s0")
        nsx(sw, "ip", "link", "set", "s0", "master", "br0")
        batch(lb, "address add 2001:db8:b::1/64 dev l1 nodad")
        for k, (b, addr, mac, decap) in enumerate(zip(bns, BACKENDS, MACS, DECAPS, strict=True), 1):
            link(b, "e0", sw, f"s{k}")
            nsx(sw, "ip", "link", "set", f"s{k}", "master", "br0")
            nsx(b, "ip", "link", "set", "e0", "address", mac)
            link(c, f"cb{k}", b, "r0")  # the backend's way back to the client
            batch(lb, f"route add {decap}/64 via {addr}")
            batch(
                b,
                f"address add {addr}/64 dev e0 nodad",
                f"address add 2001:db8:d:{k}::2/64 dev r0 nodad",
                f"route add default via 2001:db8:d:{k}::1",
                # the probes come from the LB's address: answered straight to it
                "route add 2001:db8:a::/64 via 2001:db8:b::1",
                f"address add {VIP_L}/128 dev lo",  # dsr-l2: the VIP on lo, nothing else
            )
            batch(c, f"address add 2001:db8:d:{k}::1/64 dev cb{k} nodad")
            out = sh(V6LB, "backend", str(path), "--address", decap, "--dev", "e0", "--netns", b)
            assert "installed" in out, out
        lines: list[tuple[float, str]] = []

        def logged(what: str) -> float | None:
            return next((t for t, x in lines if what in x), None)

        try:
            for b, tag in zip(bns, ("b1", "b2"), strict=True):
                p = subprocess.Popen(
                    ["ip", "netns", "exec", b, sys.executable, "-c", SERVER, tag],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                procs.append(p)
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            run = subprocess.Popen(
                [V6LB, "run", str(path), "--dataplane", plane, "--netns", lb],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(run)

            def read_log() -> None:
                assert run.stderr is not None
                for line in run.stderr:
                    lines.append((time.monotonic(), line.rstrip()))

            threading.Thread(target=read_log, daemon=True).start()
            wait_for("the control socket", lambda: query(sock), timeout=20)
            probes = {v["name"]: [b["probe"] for b in v["backends"]] for v in query(sock)["vips"]}
            via = {
                "kernel": {"tun": "via dsr-ip6ip6 tunnel", "l2": "via dsr-l2 MAC"},
                "python": {"tun": "pinned flow", "l2": "pinned flow"},
            }[plane]
            for name, vip in (("tun", VIP_T), ("l2", VIP_L)):
                assert all(via[name] in x for x in probes[name]), probes
                assert probes[name][0].startswith(f"http GET /healthz [{vip}]:80"), probes
            assert f"via dsr-l2 MAC {MACS[1]}" in probes["l2"][1] or plane == "python", probes
            wait_for(
                "probes succeeding through the data path",
                lambda: all(
                    b["successes"] >= 1 for v in query(sock)["vips"] for b in v["backends"]
                ),
            )
            assert health(sock) == {"tun": ["up", "up"], "l2": ["up", "up"]}
            sources = [f"2001:db8:c::{i:x}" for i in range(1, 41)]
            for vip in (VIP_T, VIP_L):
                assert set(flows(c, vip, sources)) == {"b1", "b2"}, vip

            # both VIPs leave backend 1's lo: its server still listens on ::
            t0 = time.monotonic()
            batch(bns[0], f"address del {VIP_T}/128 dev lo", f"address del {VIP_L}/128 dev lo")
            bound = FALL * INTERVAL + TIMEOUT
            for what in (f"tun: {DECAPS[0]} down", f"l2: {BACKENDS[0]} down"):
                took = wait_for(what, lambda w=what: logged(w)) - t0
                print(f"dsr health ({plane}): {what} after {took:.2f} s (bound {bound:.2f} s)")
                # + 0.5 s: the `ip` process, the loop's turn and the log pipe, on a busy CI
                assert took <= bound + 0.5, [x for _, x in lines]
            assert health(sock) == {"tun": ["down", "up"], "l2": ["down", "up"]}
            for vip in (VIP_T, VIP_L):
                assert flows(c, vip, sources) == ["b2"] * len(sources), vip
            print(f"dsr health ({plane}): {len(sources)} of {len(sources)} new flows on b2")

            # back on lo: up again
            t0 = time.monotonic()
            batch(bns[0], f"address add {VIP_T}/128 dev lo", f"address add {VIP_L}/128 dev lo")
            for what in (f"tun: {DECAPS[0]} up", f"l2: {BACKENDS[0]} up"):
                took = wait_for(what, lambda w=what: logged(w)) - t0
                print(f"dsr health ({plane}): {what} after {took:.2f} s")
            assert health(sock) == {"tun": ["up", "up"], "l2": ["up", "up"]}

            if plane == "kernel":
                # the egress link down and up: its neighbour entries and routes are gone
                # (the netdev rule stays); the plane puts them back within a second
                t0 = time.monotonic()
                nsx(lb, "ip", "link", "set", "l1", "down")
                nsx(lb, "ip", "link", "set", "l1", "up")
                batch(
                    lb,
                    "address replace 2001:db8:b::1/64 dev l1 nodad",
                    *(
                        f"route replace {d}/64 via {a}"
                        for d, a in zip(DECAPS, BACKENDS, strict=True)
                    ),
                )
                took = wait_for("the routes restored", lambda: logged("neighbour entries were"))
                print(f"dsr health (kernel): routes restored {took - t0:.2f} s after the bounce")
                wait_for(
                    "every backend up after the bounce",
                    lambda: (
                        health(sock) == {"tun": ["up", "up"], "l2": ["up", "up"]}
                        and logged("neighbour entries were") is not None
                    ),
                )
                assert set(flows(c, VIP_L, sources[:8])) <= {"b1", "b2"}

            run.send_signal(signal.SIGTERM)
            assert run.wait(timeout=15) == 0, [x for _, x in lines]
            assert nsx(lb, "ip", "-6", "neigh", "show", "proto", "0x76") == ""
            assert "fwmark" not in nsx(lb, "ip", "-6", "rule", "show")
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            for b in bns:
                sh(
                    V6LB,
                    "backend",
                    str(path),
                    "--address",
                    DECAPS[0],
                    "--netns",
                    b,
                    "--remove",
                    check=False,
                )
            sh("rm", "-f", sock)
