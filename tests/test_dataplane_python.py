"""`v6lb run FILE --dataplane python` on real packets, in private namespaces.

One LB namespace runs ``v6lb run FILE --dataplane python --netns LB`` as a
subprocess, for a file with a ``nat`` VIP (three TCP backends) and an
``npt:`` pair. From a client namespace and a backend namespace it checks:

* 30 real TCP connections to the VIP reach :meth:`BackendPool.pick_flow`'s
  backend and get its answer (no SNAT: the backend sees the client);
* UDP from the inside reaches the outside with the source that
  :meth:`NptMapping.translate` predicts, and the replies come back;
* the packets pass through Python: SIGSTOP the engine and a new connection to
  the VIP times out; SIGCONT and it works again; then N UDP datagrams are sent
  and the engine's ``forwarded`` counters grow by exactly N;
* ``v6lb status --json`` shows the engine's counters, conntrack size and devices;
* SIGTERM exits 0 and leaves no TUN device, rule or route behind.

Namespaces are named ``v6lb-p-<pid>-<n>`` and deleted in ``finally``.
Addresses: 2001:db8::/32 and fd00::/8 only.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
import yaml

import netns_helpers
from netns_helpers import NAT_LAB_BACKENDS, NAT_LAB_VIP, batch, link, nat_lab_file, nsx, sh
from v6lb.core.nptv6 import NptMapping
from v6lb.engines.control import ControlError, query
from v6lb.engines.python.steer import plan
from v6lb.model.config import load_config
from v6lb.model.pools import pool_for

V6LB = str(Path(sys.executable).parent / "v6lb")

VIP = NAT_LAB_VIP
BACKENDS = NAT_LAB_BACKENDS
CLIENTS = IPv6Network("2001:db8:c::/64")
INSIDE, OUTSIDE = "fd00:b::/48", "2001:db8:e::/48"
INSIDE_HOST = "fd00:b::10"
OUTSIDE_HOST = "2001:db8:a::2"


def namespaces(*roles: str) -> AbstractContextManager[dict[str, str]]:
    return netns_helpers.namespaces(*roles, tag="p")


# A TCP backend: greets with "ADDR PORT PEER PEERPORT" and closes.
SERVER = r"""
import socket, sys
addr = sys.argv[1]
ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((addr, 80))
ls.listen(1024)
print("ready", flush=True)
while True:
    c, peer = ls.accept()
    try:
        c.sendall(f"{addr} 80 {peer[0]} {peer[1]}\n".encode())
    except OSError:
        pass
    c.close()
"""

# Connect to each (src, dst, port), read the greeting; a failure is its exception name.
CLIENT = r"""
import json, socket, sys
flows, timeout = json.loads(sys.stdin.readline()), float(sys.argv[1])
out = []
for src, dst, dport in flows:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((src, 0))
    sport = s.getsockname()[1]
    try:
        s.connect((dst, dport))
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
        out.append([src, sport, data.decode().split(), None])
    except OSError as exc:
        out.append([src, sport, None, type(exc).__name__])
    s.close()
print(json.dumps(out), flush=True)
"""

# UDP sink on the outside: prints each datagram's source, answers "echo" datagrams.
SINK = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 7000))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    print(peer[0], data.decode(), flush=True)
    if data.startswith(b"echo"):
        s.sendto(b"re:" + data, peer)
"""

# UDP from the inside: n datagrams "tag i" (with "echo", wait for each answer).
SENDER = r"""
import json, socket, sys, time
src, dst, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((src, 0))
s.settimeout(3.0)
answers = []
for i in range(n):
    s.sendto(f"{tag} {i}".encode(), (dst, 7000))
    if tag == "echo":
        data, peer = s.recvfrom(2048)
        answers.append([peer[0], data.decode()])
    else:
        time.sleep(0.001)
print(json.dumps(answers), flush=True)
"""


API = "2001:db8:f::81"  # a second nat VIP, same backends: each VIP counts its own packets


def lab_file(instance: str, sock: str) -> dict[str, Any]:
    data = nat_lab_file(instance, sock, npt=[{"inside": INSIDE, "outside": OUTSIDE}])
    data["vips"].append({**data["vips"][0], "name": "api", "address": API})
    return data


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    return netns_helpers.wait_for(what, fn, timeout, (ControlError, AssertionError, OSError))


def status(sock: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(sh(V6LB, "status", "--control-socket", sock, "--json"))
    return result


def connect(ns: str, flows: list[tuple[str, str, int]], timeout: float = 3.0) -> list[Any]:
    out = nsx(ns, sys.executable, "-c", CLIENT, str(timeout), stdin=json.dumps(flows) + "\n")
    result: list[Any] = json.loads(out)
    return result


def forwarded(sock: str) -> dict[str, int]:
    engine = query(sock)["engine"]
    return {kind: int(e["counters"]["forwarded"]) for kind, e in engine.items()}


def leftovers(ns: str, instance: str) -> list[str]:
    names = set(plan(load_config_for(instance)).names())
    links = json.loads(nsx(ns, "ip", "-j", "link", "show") or "[]")
    left = [f"link {x['ifname']}" for x in links if x["ifname"].startswith("v6lb-")]
    left += [
        f"rule {r}"
        for r in json.loads(nsx(ns, "ip", "-6", "-j", "rule", "show") or "[]")
        if str(r.get("protocol")) == "118"
    ]
    left += [
        f"route {r}"
        for r in json.loads(
            nsx(ns, "ip", "-6", "-j", "route", "show", "table", "all", "proto", "0x76") or "[]"
        )
    ]
    assert names  # the plan named devices, and none of them is left
    return left


_FILES: dict[str, Path] = {}


def load_config_for(instance: str) -> Any:
    return load_config(_FILES[instance])


@pytest.mark.root
def test_python_dataplane_nat_npt_sigstop_counters_and_cleanup(tmp_path: Path) -> None:
    sock = f"/tmp/v6lb-p-{os.getpid()}.sock"
    instance = f"p{os.getpid() % 100000}"
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(lab_file(instance, sock)))
    _FILES[instance] = path
    config = load_config(path)
    pool = pool_for(config.vips[0], config.lb.flow_hash_seed)
    mapped = NptMapping(INSIDE, OUTSIDE).translate(INSIDE_HOST)
    assert isinstance(mapped, IPv6Address)
    procs: list[subprocess.Popen[str]] = []
    with namespaces("client", "lb", "backend") as ns:
        c, lb, b = ns["client"], ns["lb"], ns["backend"]
        link(c, "c0", lb, "l0")
        link(lb, "l1", b, "b0")
        nsx(lb, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        nsx(c, "sysctl", "-qw", "net.ipv6.ip_nonlocal_bind=1")
        batch(
            c,
            f"address add {OUTSIDE_HOST}/64 dev c0 nodad",
            "route add default via 2001:db8:a::1",
            f"route add local {CLIENTS} dev lo",
        )
        batch(
            lb,
            "address add 2001:db8:a::1/64 dev l0 nodad",
            "address add 2001:db8:b::1/64 dev l1 nodad",
            "address add fd00:b::1/64 dev l1 nodad",
            f"route add {CLIENTS} via {OUTSIDE_HOST}",
        )
        batch(
            b,
            *(f"address add {a}/64 dev b0 nodad" for a in [*BACKENDS, f"{INSIDE_HOST}"]),
            "route add default via 2001:db8:b::1",
        )
        run: subprocess.Popen[str] | None = None
        try:
            for addr in BACKENDS:
                p = subprocess.Popen(
                    ["ip", "netns", "exec", b, sys.executable, "-c", SERVER, addr],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                procs.append(p)
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            sink = subprocess.Popen(
                ["ip", "netns", "exec", c, sys.executable, "-c", SINK, OUTSIDE_HOST],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(sink)
            assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
            run = subprocess.Popen(
                [V6LB, "run", str(path), "--dataplane", "python", "--netns", lb],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(run)
            wait_for("the control socket", lambda: query(sock))
            st = status(sock)
            assert st["dataplane"] == "python" and st["netns"] == lb
            assert sorted(d["name"] for d in st["devices"]) == sorted(plan(config).names())

            # 1. nat: 30 real connections, each on the predicted backend
            rng = random.Random(7)
            flows = [(str(CLIENTS[rng.getrandbits(64)]), VIP, 80) for _ in range(30)]
            seen: dict[str, int] = {}
            for src, sport, reply, error in connect(c, flows):
                assert reply is not None, error
                i = pool.pick_flow(IPv6Address(src).packed, IPv6Address(VIP).packed, sport, 80)
                assert reply[0] == str(IPv6Address(pool.addresses[i])), (src, sport, reply)
                assert (reply[2], int(reply[3])) == (src, sport)  # the backend sees the client
                seen[reply[0]] = seen.get(reply[0], 0) + 1
            assert sorted(seen) == sorted(BACKENDS), seen
            print(f"python nat: 30 of 30 flows on the predicted backend, spread {seen}")

            # 2. npt: from the inside with the mapped source, and the replies come back
            out = nsx(b, sys.executable, "-c", SENDER, INSIDE_HOST, OUTSIDE_HOST, "echo", "5")
            answers = json.loads(out)
            assert answers == [[OUTSIDE_HOST, f"re:echo {i}"] for i in range(5)], answers
            for i in range(5):
                line = sink.stdout.readline().split()
                assert line == [str(mapped), "echo", str(i)], line
            print(f"python npt: {INSIDE_HOST} leaves as {mapped}; 5 of 5 replies back")

            # 3. status: counters, conntrack, flows
            st = status(sock)
            nat = st["engine"]["nat"]
            assert nat["counters"]["forwarded"] >= 30 * 4 and nat["conntrack"] >= 1
            assert st["engine"]["npt"]["counters"]["forwarded"] == 10
            web = st["vips"][0]  # the flows per VIP and backend (docs/operations.md "Metrics")
            api = st["vips"][1]
            assert api["counter"]["packets"] == 0 and api["new_flows"] == 0
            assert web["counter"]["packets"] == nat["counters"]["forwarded"]
            t_in, t_out = web["traffic"]["in"], web["traffic"]["out"]
            assert t_in["packets"] + t_out["packets"] == web["counter"]["packets"]
            assert t_in["packets"] >= 30 * 3 and t_out["packets"] >= 30 * 2, web["traffic"]
            assert t_in["bytes"] >= 30 * 3 * 60 and t_out["bytes"] > 30 * 60, web["traffic"]
            assert web["new_flows"] == 30 and web["active_flows"] == nat["conntrack"]
            assert {b["address"]: b["new_flows"] for b in web["backends"]} == seen
            assert sum(b["active_flows"] for b in web["backends"]) == nat["conntrack"]
            assert any("lookup" in r for r in st["kernel"]["rules"])
            text = sh(V6LB, "status", "--control-socket", sock)
            assert "python data plane" in text and "VIP web nat" in text
            for _, _, reply, error in connect(
                c, [(str(CLIENTS[9 + k]), API, 80) for k in range(5)]
            ):
                assert reply is not None, error
            st2 = status(sock)
            web2, api2 = st2["vips"][0], st2["vips"][1]
            assert web2["counter"] == web["counter"], (web2, web)  # api's flows are api's
            assert api2["new_flows"] == 5 and api2["counter"]["packets"] >= 5 * 5, api2
            forwarded_now = st2["engine"]["nat"]["counters"]["forwarded"]
            assert web2["counter"]["packets"] + api2["counter"]["packets"] == forwarded_now

            # 4. SIGSTOP: VIP traffic stops; SIGCONT: it flows again
            run.send_signal(signal.SIGSTOP)
            try:
                ((_, _, reply, error),) = connect(c, [(str(CLIENTS[1]), VIP, 80)], timeout=1.0)
                assert reply is None and error in ("TimeoutError", "timeout"), (reply, error)
            finally:
                run.send_signal(signal.SIGCONT)
            ((_, _, reply, error),) = connect(c, [(str(CLIENTS[2]), VIP, 80)])
            assert reply is not None and reply[0] in BACKENDS, error
            print("python: SIGSTOP stops VIP traffic, SIGCONT resumes it")

            # 5. the counters equal the packets sent through the engine
            time.sleep(1.0)  # the queued SYN of step 4 and its RST are through
            before = forwarded(sock)
            n = 200
            nsx(b, sys.executable, "-c", SENDER, INSIDE_HOST, OUTSIDE_HOST, "count", str(n))
            got = 0
            for _ in range(n):
                line = sink.stdout.readline().split()
                assert line[:2] == [str(mapped), "count"], line
                got += 1
            after = forwarded(sock)
            assert got == n
            assert after["npt"] - before["npt"] == n, (before, after)
            assert after["nat"] == before["nat"], (before, after)
            print(f"python: {n} datagrams sent, npt forwarded +{after['npt'] - before['npt']}")

            # 6. SIGTERM: exit 0, nothing left behind
            run.send_signal(signal.SIGTERM)
            assert run.wait(timeout=30) == 0
            assert not os.path.exists(sock)
            assert leftovers(lb, instance) == []
        finally:
            for p in procs:
                if p.poll() is None:
                    if p is run:
                        p.send_signal(signal.SIGCONT)
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
