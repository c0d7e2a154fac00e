"""`v6lb run --dataplane python` for ``dsr-ip6ip6`` and ``dsr-srv6``, probes and SIGHUP.

Namespaces: client, LB, and two backends. Each backend hangs off the LB on its
own link (the tunnel arrives there) and has a second link straight to the
client, which is its default route: the replies go back without the LB. The
backends are set up with ``v6lb backend FILE --address ... --dev ... --netns``.

* TCP connections to the ip6ip6 VIP and to the SRv6 VIP reach the backend that
  :meth:`BackendPool.pick_flow` predicts; the backend sees the client.
* The replies bypass the LB: the engine's ``forwarded`` count grows by exactly
  the client-to-VIP packets (3 for a SYN, ACK, FIN; the closing ACK of each
  connection is counted too), and its devices saw nothing else.
* UDP to the VIP arrives with the inner hop limit 63 for 64 sent: exactly 1 lost.
* Health: kill backend 2's server; the probes see it DOWN, it leaves the
  forwarder's pool and new connections follow the table without it.
* SIGHUP with a broken file keeps the running config (``last_error`` set);
  SIGHUP with a good file reloads and keeps the dead backend down.
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

from netns_helpers import client_behind
from test_dataplane_python import (
    V6LB,
    batch,
    connect,
    link,
    namespaces,
    nsx,
    sh,
    status,
    wait_for,
)
from v6lb.engines.control import query
from v6lb.model.config import load_config
from v6lb.model.pools import pool_for

VIP6, VIPSR = "2001:db8:f::81", "2001:db8:f::82"
BACKENDS = [
    "2001:db8:b::10",
    "2001:db8:b:2::10",
]  # their link addresses (dsr-srv6: the SIDs' hosts)
SIDS = ["fd00:50:1::100", "fd00:50:2::100"]
DECAPS = ["fd00:60:1::10", "fd00:60:2::10"]  # dsr-ip6ip6: the decap address (not on the host)
CLIENTS = IPv6Network("2001:db8:c::/64")
HEALTH = {"interval": 0.3, "timeout": 0.2, "rise": 1, "fall": 2}

# Greets with "BACKEND LOCAL-ADDR PEER PEERPORT" and closes; one process per backend.
SERVER = r"""
import socket, sys
tag = sys.argv[1]
ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("::", 80))
ls.listen(1024)
print("ready", flush=True)
while True:
    c, peer = ls.accept()
    try:
        c.sendall(f"{tag} {c.getsockname()[0]} {peer[0]} {peer[1]}\n".encode())
    except OSError:
        pass
    c.close()
"""

# Receives one UDP datagram on port 53 and prints its source and inner hop limit.
HOPS = r"""
import socket, struct
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
s.bind(("::", 53))
s.settimeout(10)
print("ready", flush=True)
data, anc, _, peer = s.recvmsg(2048, 64)
hl = [struct.unpack("i", d)[0] for lvl, t, d in anc if t == socket.IPV6_HOPLIMIT]
print(peer[0], data.decode(), hl[0], flush=True)
"""


def lab_file(instance: str, sock: str, health: dict[str, Any]) -> dict[str, Any]:
    def backends(sid: bool) -> list[dict[str, Any]]:
        if not sid:
            return [{"address": a} for a in DECAPS]
        return [{"address": a, "sid": s} for a, s in zip(BACKENDS, SIDS, strict=True)]

    # Only the dsr-srv6 VIP is probed here (through the tunnel, as every DSR VIP);
    # tests/test_health_dsr.py probes dsr-ip6ip6 and dsr-l2 VIPs.
    common = {"tunnel_source": "2001:db8:b::1", "health": {"type": "none"}}
    return {
        "lb": {
            "instance": instance,
            "flow_hash_seed": 0xD5,
            "interfaces": ["l0", "l1", "l2"],
            "addresses": ["2001:db8:a::1", "2001:db8:b::1"],
            "control_socket": sock,
        },
        "vips": [
            {"name": "tun", "address": VIP6, "ports": [80], "mode": "dsr-ip6ip6"}
            | common
            | {"backends": backends(False)},
            {
                "name": "tunu",
                "address": VIP6,
                "ports": [53],
                "protocol": "udp",
                "mode": "dsr-ip6ip6",
                "tunnel_source": "2001:db8:b::1",
                "health": {"type": "none"},
                "backends": backends(False),
            },
            {"name": "sr", "address": VIPSR, "ports": [80], "mode": "dsr-srv6"}
            | common
            | {"health": health}
            | {"backends": backends(True)},
        ],
    }


def backend_file(path: Path, data: dict[str, Any], mode: str, suffix: str) -> Path:
    """The LB's file cut to one tunnel mode, as its own instance (one nft table each)."""
    out = path.with_name(f"be-{suffix}.yaml")
    lb = data["lb"] | {"instance": data["lb"]["instance"] + suffix}
    vips = [v for v in data["vips"] if v["mode"] == mode]
    out.write_text(yaml.safe_dump({"lb": lb, "vips": vips}))
    return out


def dsr_counters(sock: str) -> dict[str, Any]:
    """The dsr forwarder's counters, its flow cache and the TUN devices' rx, in one status."""
    st = query(sock)
    engine = st["engine"]["dsr"]
    rx = sum(d["rx"] for d in st["devices"])
    return dict(engine["counters"]) | {"flow_cache": engine["flow_cache"], "rx": rx}


@pytest.mark.root
def vip_packets(sock: str) -> dict[str, int]:
    """Each VIP's own packet counter, as `v6lb status` shows it."""
    return {v["name"]: int(v["counter"]["packets"]) for v in query(sock)["vips"]}


def test_python_dataplane_dsr_tunnels_probes_and_reload(tmp_path: Path) -> None:
    sock = f"/tmp/v6lb-pd-{os.getpid()}.sock"
    instance = f"d{os.getpid() % 100000}"
    path = tmp_path / "lb.yaml"
    data = lab_file(instance, sock, HEALTH)
    path.write_text(yaml.safe_dump(data))
    be_files = {
        "a": backend_file(path, data, "dsr-ip6ip6", "a"),
        "s": backend_file(path, data, "dsr-srv6", "s"),
    }
    config = load_config(path)
    pools = {v.name: pool_for(v, config.lb.flow_hash_seed) for v in config.vips}
    procs: list[subprocess.Popen[str]] = []
    servers: list[subprocess.Popen[str]] = []
    with namespaces("client", "lb", "b1", "b2") as ns:
        c, lb = ns["client"], ns["lb"]
        bns = [ns["b1"], ns["b2"]]
        client_behind(c, lb, CLIENTS)
        for k, (b, addr, sid, decap) in enumerate(zip(bns, BACKENDS, SIDS, DECAPS, strict=True), 1):
            net = "2001:db8:b::" if k == 1 else f"2001:db8:b:{k}::"
            link(lb, f"l{k}", b, "e0")
            link(c, f"cb{k}", b, "r0")  # the backend's way back to the client
            batch(
                lb,
                f"address add {net}1/64 dev l{k} nodad",
                f"route add {sid}/64 via {addr}",
                f"route add {decap}/64 via {addr}",
            )
            batch(
                b,
                f"address add {addr}/64 dev e0 nodad",
                f"address add 2001:db8:d:{k}::2/64 dev r0 nodad",
                f"route add default via 2001:db8:d:{k}::1",
                # the probes (through the tunnel) come from the LB's address: answered there
                f"route add 2001:db8:a::/64 via {net}1",
            )
            batch(c, f"address add 2001:db8:d:{k}::1/64 dev cb{k} nodad")
            for f, a in ((be_files["a"], decap), (be_files["s"], addr)):
                out = sh(V6LB, "backend", str(f), "--address", a, "--dev", "e0", "--netns", b)
                assert "installed" in out, out
        run: subprocess.Popen[str] | None = None
        try:
            for b, addr in zip(bns, BACKENDS, strict=True):
                p = subprocess.Popen(
                    ["ip", "netns", "exec", b, sys.executable, "-c", SERVER, addr],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                procs.append(p)
                servers.append(p)
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            run = subprocess.Popen(
                [V6LB, "run", str(path), "--dataplane", "python", "--netns", lb],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(run)
            wait_for("the control socket", lambda: query(sock))
            wait_for(
                "every probed backend up",
                lambda: all(
                    b["health"] == "up" for v in query(sock)["vips"] for b in v["backends"]
                ),
            )

            # 1. ip6ip6 and srv6: predicted backend, client seen, replies bypass the LB
            rng = random.Random(11)
            for name, vip in (("tun", VIP6), ("sr", VIPSR)):
                pool = pools[name]
                before = dsr_counters(sock)
                vips_before = vip_packets(sock)
                flows = [(str(CLIENTS[rng.getrandbits(64)]), vip, 80) for _ in range(20)]
                seen: dict[str, int] = {}
                for src, sport, reply, error in connect(c, flows):
                    assert reply is not None, (name, error)
                    i = pool.pick_flow(IPv6Address(src).packed, IPv6Address(vip).packed, sport, 80)
                    assert reply[0] == BACKENDS[i], (name, src, sport, reply)  # server's tag
                    assert reply[1] == vip  # the backend answers as the VIP
                    assert (reply[2], int(reply[3])) == (src, sport)  # and sees the client
                    seen[reply[0]] = seen.get(reply[0], 0) + 1
                assert sorted(seen) == sorted(BACKENDS), seen
                time.sleep(0.3)
                after = dsr_counters(sock)
                fwd = after["forwarded"] - before["forwarded"]
                # the health probes of "sr" go through the TUN too (pinned, counted apart)
                probes = after.get("dsr.probe_packets", 0) - before.get("dsr.probe_packets", 0)
                rx = after["rx"] - before["rx"] - probes
                # client -> VIP only: SYN, ACK(+data ack), FIN, final ACK; never the replies
                # replies through the LB would add at least 3 packets a connection (SYN-ACK,
                # greeting, FIN); rx may include a stray packet of the TUN's own (dropped)
                # (client retransmissions under load can add a few, never 60).
                assert 3 * 20 <= fwd < 6 * 20 and fwd <= rx <= fwd + 3, (name, fwd, rx)
                assert after["flow_cache"] - before["flow_cache"] == 20
                # each VIP its own counter: this one grew by every packet, the others not
                grew = {k: v - vips_before[k] for k, v in vip_packets(sock).items()}
                assert grew == {k: fwd if k == name else 0 for k in grew}, (name, grew)
                print(f"python {name}: 20 of 20 on the predicted backend {seen}; LB saw {fwd}")

            # 2. the inner hop limit loses exactly 1 across the LB
            i = pools["tunu"].pick_flow(
                IPv6Address(str(CLIENTS[5])).packed, IPv6Address(VIP6).packed, 5353, 53
            )
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
                f"s.bind(('{CLIENTS[5]}', 5353)); s.sendto(b'hop', ('{VIP6}', 53))",
            )
            line = hops.stdout.readline().split()
            assert line == [str(CLIENTS[5]), "hop", "63"], line
            print("python dsr-ip6ip6: sent with hop limit 64, the backend got 63")

            # 3. a dead backend leaves the pool; new flows follow the table without it
            servers[1].kill()
            servers[1].wait(timeout=10)
            t0 = time.monotonic()
            wait_for(
                "backend 2 down",
                lambda: query(sock)["vips"][2]["backends"][1]["health"] == "down",
            )
            print(f"python: backend 2 down after {time.monotonic() - t0:.2f} s")
            for name, vip in (("sr", VIPSR),):
                pool = pools[name]
                pool.set_up(1, False)
                flows = [(str(CLIENTS[rng.getrandbits(64)]), vip, 80) for _ in range(10)]
                for src, sport, reply, error in connect(c, flows):
                    assert reply is not None, (name, error)
                    assert reply[0] == BACKENDS[0], (name, reply)
                    i = pool.pick_flow(IPv6Address(src).packed, IPv6Address(vip).packed, sport, 80)
                    assert i == 0
            st = status(sock)
            sr = next(v for v in st["vips"] if v["name"] == "sr")
            assert (
                sr["backends"][1]["slots"] == 0 and sr["backends"][0]["slots"] == sr["table_size"]
            )
            assert st["map_updates"] >= 1

            # 4. SIGHUP: a broken file keeps the running config
            path.write_text("lb: [this is not a config\n")
            run.send_signal(signal.SIGHUP)
            wait_for("the failed reload", lambda: query(sock)["last_error"])
            st = status(sock)
            assert st["reloads"] == 0 and "still running the previous config" in st["last_error"]
            ((_, _, reply, error),) = connect(c, [(str(CLIENTS[77]), VIPSR, 80)])
            assert reply is not None and reply[0] == BACKENDS[0], error
            # ...and a good file (new health settings) reloads; the dead backend stays down
            slower = HEALTH | {"interval": 0.5}
            path.write_text(yaml.safe_dump(lab_file(instance, sock, slower)))
            run.send_signal(signal.SIGHUP)
            wait_for("the reload", lambda: query(sock)["reloads"] == 1)
            st = status(sock)
            assert st["last_error"] is None
            sr = st["vips"][2]
            assert [b["health"] for b in sr["backends"]] == ["up", "down"], sr
            ((_, _, reply, error),) = connect(c, [(str(CLIENTS[78]), VIPSR, 80)])
            assert reply is not None and reply[0] == BACKENDS[0], error
            print("python: a broken file on SIGHUP keeps the config; a good one reloads")

            run.send_signal(signal.SIGTERM)
            assert run.wait(timeout=30) == 0
            assert not os.path.exists(sock)
            left = json.loads(nsx(lb, "ip", "-6", "-j", "rule", "show") or "[]")
            assert not [r for r in left if str(r.get("protocol")) == "118"]
        finally:
            for p in procs:
                if p.poll() is None:
                    if p is run:
                        p.send_signal(signal.SIGTERM)
                        try:
                            p.wait(timeout=20)
                        except subprocess.TimeoutExpired:
                            p.kill()
                    else:
                        p.kill()
                p.wait(timeout=10)
            if run is not None and run.stderr is not None:
                print(run.stderr.read())
