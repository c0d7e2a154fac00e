"""DSR health checks through the data path, on the kernel plane, in real namespaces.

Namespaces: client, LB, two backends. Each backend hangs off the LB on its own
link (the tunnel arrives there) and has a second link straight to the client,
its default route: replies bypass the LB. The backends are set up with
``v6lb backend FILE --address ... --dev ... --netns``; the VIP is ``dsr-ip6ip6``,
whose decapsulation address is not an address of the backend, so before data-path
probes it could not be probed at all.

* ``type: http`` probes go to the VIP with each backend's fwmark: ``v6lb status``
  names the tunnel, and both backends are up.
* The VIP is removed from backend 1's ``lo`` (its HTTP server still listens on
  ``::``, so a probe of its own address would still pass): the daemon logs it down
  within ``fall x interval + timeout`` (plus one poll), and every new flow from
  the client is answered by backend 2.

Namespaces ``v6lb-h-<pid>-<n>``, deleted in ``finally``; 2001:db8::/32 and fd00::/8 only.
"""

from __future__ import annotations

import json
import os
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
VIP = "2001:db8:f::81"
BACKENDS = ["2001:db8:b::10", "2001:db8:b:2::10"]  # their link addresses
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
    return {
        "lb": {
            "instance": instance,
            "flow_hash_seed": 0xD5,
            "interfaces": ["l0", "l1", "l2"],
            "addresses": ["2001:db8:a::1", "2001:db8:b::1"],
            "control_socket": sock,
        },
        "vips": [
            {
                "name": "tun",
                "address": VIP,
                "ports": [80],
                "mode": "dsr-ip6ip6",
                "table_size": 251,
                "tunnel_source": "2001:db8:b::1",
                "health": {
                    "type": "http",
                    "path": "/healthz",
                    "interval": INTERVAL,
                    "timeout": TIMEOUT,
                    "rise": 1,
                    "fall": FALL,
                },
                "backends": [{"address": a} for a in DECAPS],
            }
        ],
    }


def wait_for(what: str, fn: Any, timeout: float = 15.0) -> Any:
    return netns_helpers.wait_for(what, fn, timeout, (ControlError, AssertionError, OSError))


@pytest.mark.root
def test_dsr_probe_through_the_tunnel_finds_a_backend_without_the_vip(tmp_path: Path) -> None:
    sock = f"/tmp/v6lb-hd-{os.getpid()}.sock"
    instance = f"h{os.getpid() % 100000}"
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(lab_file(instance, sock)))
    procs: list[subprocess.Popen[str]] = []
    with netns_helpers.namespaces("client", "lb", "b1", "b2", tag="h") as ns:
        c, lb, bns = ns["client"], ns["lb"], [ns["b1"], ns["b2"]]
        client_behind(c, lb, CLIENTS)
        for k, (b, addr, decap) in enumerate(zip(bns, BACKENDS, DECAPS, strict=True), 1):
            net = "2001:db8:b::" if k == 1 else f"2001:db8:b:{k}::"
            link(lb, f"l{k}", b, "e0")
            link(c, f"cb{k}", b, "r0")  # the backend's way back to the client
            batch(lb, f"address add {net}1/64 dev l{k} nodad", f"route add {decap}/64 via {addr}")
            batch(
                b,
                f"address add {addr}/64 dev e0 nodad",
                f"address add 2001:db8:d:{k}::2/64 dev r0 nodad",
                f"route add default via 2001:db8:d:{k}::1",
                # the probes come from the LB's address: answered straight to it
                f"route add 2001:db8:a::/64 via {net}1",
            )
            batch(c, f"address add 2001:db8:d:{k}::1/64 dev cb{k} nodad")
            out = sh(V6LB, "backend", str(path), "--address", decap, "--dev", "e0", "--netns", b)
            assert "installed" in out, out
        lines: list[tuple[float, str]] = []
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
                [V6LB, "run", str(path), "--netns", lb],
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
            wait_for("the control socket", lambda: query(sock))
            st = query(sock)
            backends = st["vips"][0]["backends"]
            assert all("via dsr-ip6ip6 tunnel" in x["probe"] for x in backends), backends
            assert backends[0]["probe"].startswith(f"http GET /healthz [{VIP}]:80"), backends
            wait_for(
                "probes succeeding through the tunnel",
                lambda: all(x["successes"] >= 1 for x in query(sock)["vips"][0]["backends"]),
            )
            assert [x["health"] for x in query(sock)["vips"][0]["backends"]] == ["up", "up"]
            sources = [f"2001:db8:c::{i:x}" for i in range(1, 41)]
            before = json.loads(
                nsx(c, sys.executable, "-c", CLIENT, VIP, stdin=json.dumps(sources) + "\n")
            )
            seen = {tag for _, tag in before}
            assert seen == {"b1", "b2"}, before

            # the VIP leaves backend 1's lo: its server still listens on ::, the data path is gone
            t0 = time.monotonic()
            nsx(bns[0], "ip", "-6", "address", "del", f"{VIP}/128", "dev", "lo")
            down = wait_for(
                "backend 1 logged down",
                lambda: next((t for t, x in lines if f"{DECAPS[0]} down" in x), None),
            )
            took = down - t0
            bound = FALL * INTERVAL + TIMEOUT
            print(
                f"dsr health: backend without the VIP down after {took:.2f} s (bound {bound:.2f} s)"
            )
            assert took <= bound + 0.2, [x for _, x in lines]
            after = json.loads(
                nsx(c, sys.executable, "-c", CLIENT, VIP, stdin=json.dumps(sources) + "\n")
            )
            assert [tag for _, tag in after] == ["b2"] * len(sources), after
            print(f"dsr health: {len(sources)} of {len(sources)} new flows on backend 2")
            st = query(sock)
            assert [x["health"] for x in st["vips"][0]["backends"]] == ["down", "up"]
        finally:
            for p in reversed(procs):
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            for b, decap in zip(bns, DECAPS, strict=True):
                sh(
                    V6LB,
                    "backend",
                    str(path),
                    "--address",
                    decap,
                    "--netns",
                    b,
                    "--remove",
                    check=False,
                )
            sh("rm", "-f", sock)
