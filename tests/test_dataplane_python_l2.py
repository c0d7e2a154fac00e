"""`v6lb run --dataplane python` for ``dsr-l2``: a TUN in, AF_PACKET out.

Namespaces: client, LB, a switch (one bridge) and two backends. The LB's
``l1`` and both backends' ``e0`` hang off the bridge: one L2 segment. Each
backend also has a link straight to the client, its default route, so the
replies go back without the LB. The backends get the VIP on ``lo`` from
``v6lb backend FILE --address ... --netns``. Backend 2's MAC is given in the
file (``mac:``); backend 1's is learned from the LB's neighbour table.

* 24 TCP connections to the VIP reach the backend that
  :meth:`BackendPool.pick_flow` predicts (the jhash the kernel data plane
  uses too); the backend answers as the VIP and sees the client.
* The replies bypass the engine: its ``forwarded`` count grows by the
  client-to-VIP packets only (at least 3 per connection, fewer than the 6 that
  replies through it would add), and its TUN saw nothing else.
* L2 DSR does not route: a UDP datagram sent with hop limit 64 arrives with 64.
* Both backends get flows: the MAC from the file and the learned one work.
* SIGTERM exits 0 and leaves no rule behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from test_dataplane_python import V6LB, batch, connect, link, namespaces, nsx, sh, wait_for
from test_dataplane_python_dsr import HOPS, SERVER
from v6lb.engines.control import query
from v6lb.model.config import load_config
from v6lb.model.pools import pool_for

VIP = "2001:db8:f::90"
BACKENDS = ["2001:db8:b::10", "2001:db8:b::11"]
B2_MAC = "02:00:00:00:b2:02"
CLIENTS = IPv6Network("2001:db8:c::/64")


def lab_file(instance: str, sock: str) -> dict[str, Any]:
    common = {"address": VIP, "mode": "dsr-l2", "health": {"type": "none"}}
    backends = [{"address": BACKENDS[0]}, {"address": BACKENDS[1], "mac": B2_MAC}]
    return {
        "lb": {
            "instance": instance,
            "flow_hash_seed": 0x12,
            "interfaces": ["l0", "l1"],
            "addresses": ["2001:db8:a::1", "2001:db8:b::1"],
            "control_socket": sock,
        },
        "vips": [
            {"name": "web", "ports": [80], "backends": backends} | common,
            {"name": "dns", "ports": [53], "protocol": "udp", "backends": backends} | common,
        ],
    }


def dsr(sock: str) -> tuple[int, int]:
    """(forwarded, TUN rx) of the engine."""
    st = query(sock)
    return int(st["engine"]["dsr"]["counters"]["forwarded"]), sum(d["rx"] for d in st["devices"])


@pytest.mark.root
def test_python_dataplane_dsr_l2(tmp_path: Path) -> None:
    sock = f"/tmp/v6lb-pl-{os.getpid()}.sock"
    instance = f"l{os.getpid() % 100000}"
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(lab_file(instance, sock)))
    config = load_config(path)
    pools = {v.name: pool_for(v, config.lb.flow_hash_seed) for v in config.vips}
    procs: list[subprocess.Popen[str]] = []
    run: subprocess.Popen[str] | None = None
    with namespaces("client", "lb", "sw", "b1", "b2") as ns:
        c, lb, sw = ns["client"], ns["lb"], ns["sw"]
        bns = [ns["b1"], ns["b2"]]
        link(c, "c0", lb, "l0")
        nsx(sw, "ip", "link", "add", "br0", "type", "bridge")
        nsx(sw, "ip", "link", "set", "br0", "up")
        link(lb, "l1", sw, "s0")
        nsx(sw, "ip", "link", "set", "s0", "master", "br0")
        nsx(lb, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        nsx(c, "sysctl", "-qw", "net.ipv6.ip_nonlocal_bind=1")
        batch(
            c,
            "address add 2001:db8:a::2/64 dev c0 nodad",
            "route add default via 2001:db8:a::1",
            f"route add local {CLIENTS} dev lo",
        )
        batch(
            lb,
            "address add 2001:db8:a::1/64 dev l0 nodad",
            "address add 2001:db8:b::1/64 dev l1 nodad",
            f"route add {CLIENTS} via 2001:db8:a::2",
        )
        for k, (b, addr) in enumerate(zip(bns, BACKENDS, strict=True), 1):
            link(b, "e0", sw, f"s{k}")
            nsx(sw, "ip", "link", "set", f"s{k}", "master", "br0")
            if k == 2:
                nsx(b, "ip", "link", "set", "e0", "address", B2_MAC)
            link(c, f"cb{k}", b, "r0")  # the backend's way back to the client
            batch(
                b,
                f"address add {addr}/64 dev e0 nodad",
                f"address add 2001:db8:d:{k}::2/64 dev r0 nodad",
                f"route add default via 2001:db8:d:{k}::1",
            )
            batch(c, f"address add 2001:db8:d:{k}::1/64 dev cb{k} nodad")
            out = sh(V6LB, "backend", str(path), "--address", addr, "--netns", b)
            assert "installed" in out, out
        try:
            for b, addr in zip(bns, BACKENDS, strict=True):
                p = subprocess.Popen(
                    ["ip", "netns", "exec", b, sys.executable, "-c", SERVER, addr],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                procs.append(p)
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            run = subprocess.Popen(
                [V6LB, "run", str(path), "--dataplane", "python", "--netns", lb],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            wait_for("the control socket", lambda: query(sock), timeout=20)

            # 1. predicted backend, the backend answers as the VIP and sees the client
            pool = pools["web"]
            rng = random.Random(7)
            before = dsr(sock)
            flows = [(str(CLIENTS[rng.getrandbits(64)]), VIP, 80) for _ in range(24)]
            seen: dict[str, int] = {}
            for src, sport, reply, error in connect(c, flows):
                assert reply is not None, (src, sport, error)
                i = pool.pick_flow(IPv6Address(src).packed, IPv6Address(VIP).packed, sport, 80)
                assert reply[0] == BACKENDS[i], (src, sport, reply)
                assert reply[1] == VIP and (reply[2], int(reply[3])) == (src, sport), reply
                seen[reply[0]] = seen.get(reply[0], 0) + 1
            assert sorted(seen) == sorted(BACKENDS), seen
            print(f"python dsr-l2: 24 of 24 on the predicted backend {seen}")

            # 2. the replies bypass the engine
            time.sleep(0.3)
            after = dsr(sock)
            fwd, rx = after[0] - before[0], after[1] - before[1]
            assert 3 * 24 <= fwd < 6 * 24 and fwd <= rx <= fwd + 3, (fwd, rx)
            st = query(sock)
            web = next(v for v in st["vips"] if v["name"] == "web")
            assert web["mode"] == "dsr-l2" and st["engine"]["dsr"]["flow_cache"] >= 24
            assert not any(d["write_errors"] for d in st["devices"]), st["devices"]

            # 3. L2 DSR keeps the hop limit
            src = str(CLIENTS[9])
            i = pools["dns"].pick_flow(IPv6Address(src).packed, IPv6Address(VIP).packed, 5353, 53)
            hops = subprocess.Popen(
                ["ip", "netns", "exec", bns[i], sys.executable, "-c", HOPS],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(hops)
            assert hops.stdout is not None and hops.stdout.readline().strip() == "ready"
            nsx(
                c,
                sys.executable,
                "-c",
                "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM);"
                "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 64);"
                f"s.bind(('{src}', 5353)); s.sendto(b'hop', ('{VIP}', 53))",
            )
            assert hops.stdout.readline().split() == [src, "hop", "64"]
            print("python dsr-l2: sent with hop limit 64, the backend got 64")

            run.send_signal(signal.SIGTERM)
            assert run.wait(timeout=30) == 0
            left = json.loads(nsx(lb, "ip", "-6", "-j", "rule", "show") or "[]")
            assert not [r for r in left if str(r.get("protocol")) == "118"]
        finally:
            if run is not None:
                if run.poll() is None:
                    run.send_signal(signal.SIGTERM)
                    try:
                        run.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        run.kill()
                        run.wait(timeout=10)
                if run.stderr is not None:
                    print(run.stderr.read())
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=10)
