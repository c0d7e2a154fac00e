"""Not an open relay, no routing loop, and ``lb.conntrack_max``: both data planes, real packets.

Issue 21 (points 2 and 6). The namespaces are::

    client/router --c0/l0-- LB --l1/b0-- backends (2001:db8:b::10-12, default via the LB)

The client namespace is also the router: it forwards, sends the VIP prefix
2001:db8:f::/64 to the LB, and the LB's default route points back at it, as
in the lab (examples/lab-modes.yaml). ``v6lb run FILE --netns LB`` runs as a
subprocess, once per data plane, and each test checks with real packets:

* **relay:** N UDP datagrams from the client to a backend's own address
  (routed via the LB) reach the backend 0 times (an nft counter in the
  backend), and the LB's ``forward_denied`` (``v6lb status``) grows by exactly
  N. Before the forward filter: N of N arrived.
* **loop:** one datagram to 2001:db8:f::99 (in the VIP prefix, no VIP): no copy
  comes back from the LB (counted in the router), and the router gets exactly
  one Destination Unreachable (address unreachable); ``forward_unreachable``
  is 1. Before: the packet bounced until its hop limit ran out (32 copies back
  from the LB for a hop limit of 64).
* the VIP still works (real TCP connections), and its replies pass.
* ``lb.forward_allow`` (SIGHUP with the backend's /128 allowed): 100 of 100
  datagrams arrive, counted in ``forward_allowed``.
* **conntrack_max** (kernel plane; the Python core has its own bound, tested in
  tests/test_nat66.py): with ``conntrack_max: 20``, 20 held connections open,
  then 10 more new ones fail; ``conntrack_full`` counts at least every SYN sent
  for them, status reports the bound and 20 live flows, and the 20 held
  connections keep exchanging data. Before: all 30 were admitted.

Namespaces are named ``v6lb-f-<pid>-<n>`` and deleted in ``finally``.
Addresses: 2001:db8::/32 only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv6Network
from pathlib import Path
from typing import Any

import pytest
import yaml

import netns_helpers
from netns_helpers import NAT_LAB_BACKENDS, NAT_LAB_VIP, batch, link, nat_lab_file, nsx, sh
from v6lb.engines.control import ControlError, query

V6LB = str(Path(sys.executable).parent / "v6lb")

VIP = NAT_LAB_VIP
NOT_A_VIP = "2001:db8:f::99"
BACKENDS = NAT_LAB_BACKENDS
CLIENTS = IPv6Network("2001:db8:c::/64")
ROUTER = "2001:db8:a::2"
RELAYED = 1000

SERVER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for addr in sys.argv[1].split(","):
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, 80))
    ls.listen(1024)
    sel.register(ls, selectors.EVENT_READ, "listen")
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        try:
            if key.data == "listen":
                c, peer = s.accept()
                c.sendall(f"{c.getsockname()[0]}\n".encode())
                sel.register(c, selectors.EVENT_READ)
            elif s.recv(256):
                s.sendall(f"{s.getsockname()[0]}\n".encode())
            else:
                sel.unregister(s)
                s.close()
        except OSError:
            if key.data != "listen":
                sel.unregister(s)
                s.close()
"""

# argv: VIP, held, extra, timeout. Opens `held` connections and keeps them, then tries
# `extra` more (each with `timeout`), prints both results, waits for a line, then asks
# every held connection again and prints the answers.
CLIENT = r"""
import json, socket, sys
vip, held, extra, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def line(s):
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()
def attempt(i, t):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(t)
    s.bind((f"2001:db8:c::{i + 1:x}", 0))
    try:
        s.connect((vip, 80))
        return s, line(s)
    except OSError as exc:
        s.close()
        return None, type(exc).__name__
socks, first = [], []
for i in range(held):
    s, answer = attempt(i, 3.0)
    first.append(answer)
    if s is not None:
        socks.append(s)
import select, time
late = []
for i in range(extra):  # all at once: each SYN retried after 1 s
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setblocking(False)
    s.bind((f"2001:db8:c::{held + i + 1:x}", 0))
    s.connect_ex((vip, 80))
    late.append(s)
time.sleep(timeout)
_, done, _ = select.select([], late, [], 0)
extra_result = ["connected" if s in done and not s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                else "TimeoutError" for s in late]
for s in late:
    s.close()
print(json.dumps({"held": first, "extra": extra_result}), flush=True)
sys.stdin.readline()
again = []
for s in socks:
    try:
        s.sendall(b"again\n")
        again.append(line(s))
    except OSError as exc:
        again.append(type(exc).__name__)
    s.close()
print(json.dumps(again), flush=True)
"""

# argv: SRC, DST, PORT, N, HLIM: N datagrams.
SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, int(sys.argv[5]))
s.bind((sys.argv[1], 0))
for i in range(int(sys.argv[4])):
    s.sendto(b"relay me %d" % i, (sys.argv[2], int(sys.argv[3])))
"""

COUNT_TABLE = "ip6 v6lb_test_count"


def status(sock: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(sh(V6LB, "status", "--control-socket", sock, "--json"))
    return result


def counters(ns: str) -> dict[str, int]:
    data = json.loads(nsx(ns, "nft", "-j", "list", "counters", "table", *COUNT_TABLE.split()))
    return {
        c["counter"]["name"]: c["counter"]["packets"] for c in data["nftables"] if "counter" in c
    }


@contextmanager
def lab(tmp_path: Path, dataplane: str, **lb: Any) -> Iterator[tuple[dict[str, str], str]]:
    """The three namespaces, the backends, counters, and `v6lb run`; everything gone after."""
    tag = f"{os.getpid() % 100000}{dataplane[0]}"
    sock = f"/tmp/v6lb-f-{tag}.sock"
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(nat_lab_file(f"f{tag}", sock, **lb)))
    procs: list[subprocess.Popen[str]] = []
    with netns_helpers.namespaces("client", "lb", "backend", tag="f") as ns:
        c, lbns, b = ns["client"], ns["lb"], ns["backend"]
        link(c, "c0", lbns, "l0")
        link(lbns, "l1", b, "b0")
        nsx(lbns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        nsx(c, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")  # the client is the router
        nsx(c, "sysctl", "-qw", "net.ipv6.ip_nonlocal_bind=1")
        batch(
            c,
            f"address add {ROUTER}/64 dev c0 nodad",
            "route add 2001:db8:f::/64 via 2001:db8:a::1",  # the VIP prefix: to the LB
            "route add default via 2001:db8:a::1",
            f"route add local {CLIENTS} dev lo",
        )
        batch(
            lbns,
            "address add 2001:db8:a::1/64 dev l0 nodad",
            "address add 2001:db8:b::1/64 dev l1 nodad",
            f"route add default via {ROUTER}",  # back to the router: the loop's other half
        )
        batch(
            b,
            *(f"address add {a}/64 dev b0 nodad" for a in BACKENDS),
            "route add default via 2001:db8:b::1",
        )
        # What the backend receives (the relay) and what comes back to the router
        nsx(
            b,
            "nft",
            "-f",
            "-",
            stdin=f"table {COUNT_TABLE} {{\n counter relayed {{ }}\n"
            " chain input { type filter hook input priority 0;\n"
            '  udp dport 9999 counter name "relayed"\n }\n}\n',
        )
        nsx(
            c,
            "nft",
            "-f",
            "-",
            stdin=f"table {COUNT_TABLE} {{\n counter looped {{ }}\n counter unreachable {{ }}\n"
            " chain pre { type filter hook prerouting priority 0;\n"
            f'  iifname "c0" ip6 daddr {NOT_A_VIP} counter name "looped"\n'
            '  iifname "c0" icmpv6 type destination-unreachable icmpv6 code addr-unreachable'
            ' counter name "unreachable"\n }\n}\n',
        )
        try:
            server = subprocess.Popen(
                ["ip", "netns", "exec", b, sys.executable, "-c", SERVER, ",".join(BACKENDS)],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(server)
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            run = subprocess.Popen(
                [V6LB, "run", str(path), "--dataplane", dataplane, "--netns", lbns],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(run)
            netns_helpers.wait_for("the control socket", lambda: query(sock), 15.0, (ControlError,))
            yield ns, sock
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        p.kill()
            if os.path.exists(sock):
                os.unlink(sock)


def hold_and_try(client: str, held: int, extra: int, timeout: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", client, sys.executable, "-c", CLIENT]
        + [VIP, str(held), str(extra), str(timeout)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def allow_and_reload(path: Path, sock: str, allow: list[str]) -> None:
    """SIGHUP `v6lb run` with ``lb.forward_allow: allow`` in its file; wait for the reload."""
    data = yaml.safe_load(path.read_text())
    data["lb"]["forward_allow"] = allow
    path.write_text(yaml.safe_dump(data))
    st = status(sock)
    os.kill(st["pid"], signal.SIGHUP)
    netns_helpers.wait_for(
        "the reload", lambda: query(sock)["reloads"] == st["reloads"] + 1, 10.0, (ControlError,)
    )


def relay_and_loop(ns: dict[str, str], sock: str, dataplane: str) -> None:
    c, b = ns["client"], ns["backend"]
    before = status(sock)["forward"]
    assert set(before) == {"forward_denied", "forward_unreachable", "forward_allowed"}

    # (a) to a backend's own address, through the LB: nothing arrives, every one counted
    nsx(c, sys.executable, "-c", SEND, ROUTER, BACKENDS[0], "9999", str(RELAYED), "64")
    arrived = counters(b)["relayed"]
    after = status(sock)["forward"]
    denied = after["forward_denied"] - before["forward_denied"]
    print(f"{dataplane}: relayed {arrived}/{RELAYED} to {BACKENDS[0]}; forward_denied +{denied}")
    assert arrived == 0
    assert denied == RELAYED

    # (b) to an address of the VIP prefix that is no VIP: no copy back, one DU, counted
    nsx(c, sys.executable, "-c", SEND, ROUTER, NOT_A_VIP, "9", "1", "64")
    netns_helpers.wait_for(
        "the Destination Unreachable", lambda: counters(c)["unreachable"], 3.0, ()
    )
    seen = counters(c)
    final = status(sock)["forward"]
    print(
        f"{dataplane}: to {NOT_A_VIP}: {seen['looped']} copies back from the LB,"
        f" {seen['unreachable']} Destination Unreachable;"
        f" forward_unreachable {final['forward_unreachable']}"
    )
    assert seen["looped"] == 0 and seen["unreachable"] == 1
    assert final["forward_unreachable"] - before["forward_unreachable"] == 1
    assert final["forward_denied"] == after["forward_denied"]

    # the VIP still works, replies included
    proc = hold_and_try(c, 10, 0, 3.0)
    assert proc.stdout is not None and proc.stdin is not None
    result = json.loads(proc.stdout.readline())
    assert all(a in BACKENDS for a in result["held"]), result
    proc.stdin.write("go\n")
    proc.stdin.flush()
    again = json.loads(proc.stdout.readline())
    proc.wait(timeout=10)
    assert again == result["held"], again

    # lb.forward_allow lets the operator's traffic through, counted
    allow_and_reload(Path(status(sock)["file"]), sock, [f"{BACKENDS[0]}/128"])
    nsx(c, sys.executable, "-c", SEND, ROUTER, BACKENDS[0], "9999", "100", "64")
    allowed = status(sock)["forward"]
    print(f"{dataplane}: forward_allow {BACKENDS[0]}/128: {counters(b)['relayed']} of 100 arrive")
    assert counters(b)["relayed"] == 100
    assert allowed["forward_allowed"] == 100  # UDP without a reply: each is a first packet
    assert allowed["forward_denied"] == 0  # the reload loaded a new table: counters from 0


@pytest.mark.root
def test_kernel_plane_is_no_open_relay_and_no_loop(tmp_path: Path) -> None:
    with lab(tmp_path, "kernel") as (ns, sock):
        relay_and_loop(ns, sock, "kernel")


@pytest.mark.root
def test_python_plane_is_no_open_relay_and_no_loop(tmp_path: Path) -> None:
    with lab(tmp_path, "python") as (ns, sock):
        relay_and_loop(ns, sock, "python")
        st = status(sock)
        assert st["conntrack"]["conntrack_max"] == 262144
        assert st["conntrack"]["conntrack"] == st["engine"]["nat"]["conntrack"]


@pytest.mark.root
def test_kernel_conntrack_max_drops_new_flows_and_keeps_established(tmp_path: Path) -> None:
    with lab(tmp_path, "kernel", conntrack_max=20) as (ns, sock):
        c = ns["client"]
        proc = hold_and_try(c, 20, 10, 1.5)  # SYN at 0 s and 1 s: 2 per refused flow
        assert proc.stdout is not None and proc.stdin is not None
        result = json.loads(proc.stdout.readline())
        admitted = sum(a in BACKENDS for a in result["held"]) + result["extra"].count("connected")
        st = status(sock)
        ct = st["conntrack"]
        print(
            f"kernel conntrack_max 20: {admitted} of 30 flows admitted;"
            f" conntrack_full {ct['conntrack_full']}; live {ct['conntrack']}"
        )
        assert all(a in BACKENDS for a in result["held"]), result
        assert result["extra"] == ["TimeoutError"] * 10, result
        assert ct["conntrack_max"] == 20 and ct["conntrack"] == 20
        assert ct["conntrack_full"] >= 10 * 2
        assert st["kernel"]["nft_counters"]["conntrack_full"]["packets"] == ct["conntrack_full"]
        text = sh(V6LB, "status", "--control-socket", sock)
        assert "conntrack: 20 of 20 nat flows, " in text, text
        assert "forward filter: denied 0, unreachable 0, allowed 0" in text, text
        proc.stdin.write("go\n")
        proc.stdin.flush()
        again = json.loads(proc.stdout.readline())
        proc.wait(timeout=10)
        assert again == result["held"], again  # the 20 established flows still talk
        # closed (TIME_WAIT) flows are not counted: new ones are admitted again
        proc = hold_and_try(c, 5, 0, 3.0)
        assert proc.stdout is not None and proc.stdin is not None
        result = json.loads(proc.stdout.readline())
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.wait(timeout=10)
        assert all(a in BACKENDS for a in result["held"]), result
