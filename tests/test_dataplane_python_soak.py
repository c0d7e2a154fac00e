"""A robustness soak of `v6lb run --dataplane python`: mixed traffic plus malformed packets.

Namespaces client, LB and backend (the fixtures of ``test_dataplane_python``).
The LB runs ``v6lb run FILE --dataplane python --netns LB`` for two ``nat``
VIPs on one address (tcp 80, udp 7000; two backends) with a small
``conntrack_max`` so that its bound is exercised. For ``V6LB_SOAK_SECONDS``
(default 60) the client namespace drives:

* many short TCP connections (connect, request, response, close) from random
  sources, in a few threads;
* UDP datagrams to the udp VIP, each echoed (a fresh socket every 50);
* ``LONG`` long-lived TCP connections exchanging a message every 100 ms;
* from a second process, malformed packets written as raw Ethernet frames on
  the client's veth (AF_PACKET) to the LB's MAC: truncated TCP headers, UDP
  with a bad length, extension chains past the end, HBH not first, too long
  chains, unknown next headers, ICMPv6 errors quoting unknown flows or a bad
  quote, random garbage after a valid IPv6 header, and a few the kernel drops
  itself (version 4, payload length past the frame, a cut IPv6 header).

It asserts: the engine stays alive (polled); the drops are counted by reason
in ``v6lb status --json``, non-zero for each injected kind that reaches the
engine, and the kernel's own drops show up in the LB's ``/proc/net/snmp6``;
the conntrack size (sampled) never exceeds ``conntrack_max``; the engine's RSS
grows by at most ``RSS_BOUND`` after the warm-up; every long-lived connection
completes all its exchanges without a reset; short connections fail at most
1%. Then SIGTERM exits 0 and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from netns_helpers import client_behind
from test_dataplane_python import (
    _FILES,
    V6LB,
    batch,
    leftovers,
    link,
    namespaces,
    nsx,
    status,
    wait_for,
)
from v6lb.engines.control import ControlError, query

VIP = "2001:db8:f::80"
BACKENDS = ["2001:db8:b::10", "2001:db8:b::11"]
CLIENTS = "2001:db8:c::/64"
CONNTRACK_MAX = 2000
LONG = 8
RSS_BOUND_KB = 30 * 1024
DURATION = float(os.environ.get("V6LB_SOAK_SECONDS", "60"))

# Backend: a line-echo TCP server (thread per connection) on ADDR:80 and a UDP echo on ADDR:7000.
SERVER = r"""
import socket, sys, threading
addr = sys.argv[1]
def serve(c):
    try:
        f = c.makefile("rb")
        for line in f:
            c.sendall(b"re:" + line)
    except OSError:
        pass
    finally:
        c.close()
def udp():
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.bind((addr, 7000))
    while True:
        data, peer = u.recvfrom(2048)
        u.sendto(b"re:" + data, peer)
ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((addr, 80))
ls.listen(1024)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Client: short TCP connections, UDP echoes and long-lived TCP connections, for DURATION s.
LOAD = r"""
import ipaddress, json, random, socket, sys, threading, time
vip, duration, n_long, n_short = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
net = ipaddress.IPv6Network(sys.argv[5])
rng = random.Random(11)
lock = threading.Lock()
def src():
    with lock:
        return str(net[rng.getrandbits(64) | 1])
start = time.monotonic()
deadline = start + duration
out = {"short": 0, "short_fail": {}, "udp_sent": 0, "udp_recv": 0, "udp_flows": 0, "long": []}

def short():
    n, fails = 0, {}
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.settimeout(3.0)
        try:
            s.bind((src(), 0))
            s.connect((vip, 80))
            s.sendall(b"req %d\n" % n)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            if data != b"re:req %d\n" % n:
                raise ValueError(repr(data))
        except (OSError, ValueError) as exc:
            fails[type(exc).__name__] = fails.get(type(exc).__name__, 0) + 1
        finally:
            s.close()
        n += 1
    with lock:
        out["short"] += n
        for k, v in fails.items():
            out["short_fail"][k] = out["short_fail"].get(k, 0) + v

def udp():
    sent = recv = flows = 0
    s = None
    while time.monotonic() < deadline:
        if sent % 50 == 0:
            if s is not None:
                s.close()
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.settimeout(1.0)
            s.bind((src(), 0))
            flows += 1
        msg = b"dgram %d" % sent
        s.sendto(msg, (vip, 7000))
        sent += 1
        try:
            while True:
                data, _ = s.recvfrom(2048)
                if data == b"re:" + msg:
                    recv += 1
                    break
        except OSError:
            pass
        time.sleep(0.004)
    with lock:
        out["udp_sent"] += sent
        out["udp_recv"] += recv
        out["udp_flows"] += flows

def long(i):
    planned = int(duration * 10) - 10  # one exchange every 100 ms, within the duration
    done, error = 0, None
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(5.0)
    try:
        s.bind((src(), 0))
        s.connect((vip, 80))
        f = s.makefile("rb")
        t0 = time.monotonic()
        for k in range(planned):
            time.sleep(max(0.0, t0 + k * 0.1 - time.monotonic()))
            s.sendall(b"long %d %d\n" % (i, k))
            if f.readline() != b"re:long %d %d\n" % (i, k):
                raise ValueError("bad answer")
            done += 1
        s.shutdown(socket.SHUT_WR)
        if f.readline() != b"":
            raise ValueError("no EOF")
    except (OSError, ValueError) as exc:
        error = type(exc).__name__ + ": " + str(exc)
    finally:
        s.close()
    with lock:
        out["long"].append({"planned": planned, "done": done, "error": error})

threads = [threading.Thread(target=long, args=(i,)) for i in range(n_long)]
threads += [threading.Thread(target=short) for _ in range(n_short)]
threads += [threading.Thread(target=udp) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
out["seconds"] = round(time.monotonic() - start, 1)
print(json.dumps(out), flush=True)
"""

# Malformed packets as raw Ethernet frames on DEV to the LB's MAC, for DURATION s.
INJECT = r"""
import ipaddress, json, os, random, socket, struct, sys, time
dev, lb_mac, vip, duration, rate = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
net = ipaddress.IPv6Network(sys.argv[6])
rng = random.Random(5)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
my_mac = s.getsockname()[4]
eth = bytes.fromhex(lb_mac.replace(":", "")) + my_mac + b"\x86\xdd"
VIP = ipaddress.IPv6Address(vip).packed

def client():
    return net[rng.getrandbits(64) | 1].packed

def ip6(nh, payload, src=None, dst=VIP, plen=None, ver=6):
    plen = len(payload) if plen is None else plen
    return struct.pack("!IHBB", ver << 28, plen, nh, 64) + (src or client()) + dst + payload

def csum(data):
    if len(data) % 2:
        data += b"\0"
    t = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF

def icmp6(src, dst, body):
    pseudo = src + dst + struct.pack("!IxxxB", len(body), 58)
    c = csum(pseudo + body)
    return body[:2] + struct.pack("!H", c) + body[4:]

def ext(nh, n8=0):  # a Destination Options header of 8*(n8+1) bytes, PadN-filled
    size = 8 * (n8 + 1)
    return bytes([nh, n8, 1, size - 4]) + bytes(size - 4)

def tcp_hdr(dport):
    return struct.pack("!HHIIBBHHH", rng.randrange(1024, 65536), dport, 1, 0, 0x50, 0x10, 1000, 0, 0)

def tcp_truncated():
    return ip6(6, tcp_hdr(80)[: rng.randrange(1, 20)])

def udp_bad_length():
    data = os.urandom(rng.randrange(0, 40))
    ulen = 8 + len(data) + rng.choice([-7, -1, 1, 50, 1000])
    return ip6(17, struct.pack("!HHHH", rng.randrange(1024, 65536), 7000, ulen & 0xFFFF, 0) + data)

def ext_past_end():
    return ip6(60, ext(6, 10)[:24])  # says 88 bytes, 24 follow

def hbh_not_first():
    return ip6(60, ext(0) + ext(6) + tcp_hdr(80))

def chain_too_long():
    return ip6(60, ext(60) * 9 + ext(6) + tcp_hdr(80))

def unknown_next_header():
    return ip6(rng.choice([143, 200, 253, 254]), os.urandom(rng.randrange(8, 64)))

def icmp_unknown_flow():
    c = client()
    quote = ip6(6, tcp_hdr(rng.randrange(1024, 65536)), src=VIP, dst=c)
    quote = quote[:40] + struct.pack("!H", 80) + quote[42:]  # from the VIP's port 80
    body = struct.pack("!BBHI", rng.choice([1, 2, 3, 4]), 0, 0, 0) + quote
    return ip6(58, icmp6(c, VIP, body), src=c)

def icmp_bad_quote():
    c = client()
    quote = ip6(6, tcp_hdr(1234), src=VIP, dst=c, ver=4)
    body = struct.pack("!BBHI", 1, 4, 0, 0) + quote
    return ip6(58, icmp6(c, VIP, body), src=c)

def garbage():
    return ip6(rng.choice([6, 17, 58, rng.randrange(256)]), os.urandom(rng.randrange(0, 200)))

# The kernel drops these itself (Ip6InHdrErrors, Ip6InTruncatedPkts).
def kernel_bad_version():
    return ip6(6, tcp_hdr(80), ver=4)

def kernel_plen_past_end():
    return ip6(6, tcp_hdr(80), plen=200)

def kernel_cut_header():
    return ip6(6, b"")[: rng.randrange(8, 40)]

kinds = [tcp_truncated, udp_bad_length, ext_past_end, hbh_not_first, chain_too_long,
         unknown_next_header, icmp_unknown_flow, icmp_bad_quote, garbage]
rare = [kernel_bad_version, kernel_plen_past_end, kernel_cut_header]
sent = {k.__name__: 0 for k in kinds + rare}
start = time.monotonic()
deadline = start + duration
i = 0
while True:
    now = time.monotonic()
    if now >= deadline:
        break
    kind = rare[i // 10 % 3] if i % 10 == 9 else kinds[i % len(kinds)]
    s.send(eth + kind())
    sent[kind.__name__] += 1
    i += 1
    time.sleep(max(0.0, start + i / rate - time.monotonic()))
print(json.dumps(sent), flush=True)
"""


def lab_file(instance: str, sock: str) -> dict[str, Any]:
    backends = [{"address": a} for a in BACKENDS]
    return {
        "lb": {
            "instance": instance,
            "flow_hash_seed": 0x50AC,
            "interfaces": ["l0", "l1"],
            "addresses": ["2001:db8:a::1"],
            "control_socket": sock,
            "conntrack_max": CONNTRACK_MAX,
        },
        "vips": [
            {
                "name": "web",
                "address": VIP,
                "ports": [80],
                "mode": "nat",
                "health": {"type": "none"},
                "backends": backends,
            },
            {
                "name": "dns",
                "address": VIP,
                "ports": [7000],
                "protocol": "udp",
                "mode": "nat",
                "health": {"type": "none"},
                "backends": backends,
            },
        ],
    }


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def snmp6(ns: str) -> dict[str, int]:
    out = nsx(ns, "cat", "/proc/net/snmp6")
    return {k: int(v) for k, v in (line.split() for line in out.splitlines() if line.strip())}


# Each injected kind that reaches the engine, and the drop reasons it may be counted under.
EXPECTED = {
    "tcp_truncated": ["l4-truncated"],
    "udp_bad_length": ["bad-l4-length"],
    "ext_past_end": ["ext-truncated"],
    "hbh_not_first": ["hbh-not-first"],
    "chain_too_long": ["ext-chain-too-long"],
    "unknown_next_header": ["unsupported"],
    "icmp_unknown_flow": ["icmp-error-unmatched"],
    "icmp_bad_quote": ["icmp-error-quote-bad"],
}


@pytest.mark.root
def test_python_dataplane_soak(tmp_path: Path) -> None:
    sock = f"/tmp/v6lb-s-{os.getpid()}.sock"
    instance = f"s{os.getpid() % 100000}"
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(lab_file(instance, sock)))
    _FILES[instance] = path
    procs: list[subprocess.Popen[str]] = []
    with namespaces("client", "lb", "backend") as ns:
        c, lb, b = ns["client"], ns["lb"], ns["backend"]
        link(lb, "l1", b, "b0")
        client_behind(c, lb, CLIENTS)
        batch(lb, "address add 2001:db8:b::1/64 dev l1 nodad")
        batch(
            b,
            *(f"address add {a}/64 dev b0 nodad" for a in BACKENDS),
            "route add default via 2001:db8:b::1",
        )
        lb_mac = json.loads(nsx(lb, "ip", "-j", "link", "show", "l0"))[0]["address"]
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
            run = subprocess.Popen(
                [V6LB, "run", str(path), "--dataplane", "python", "--netns", lb],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(run)
            wait_for("the control socket", lambda: query(sock))
            snmp_before = snmp6(lb)

            secs = str(DURATION)
            load = subprocess.Popen(
                ["ip", "netns", "exec", c, sys.executable, "-c", LOAD]
                + [VIP, secs, str(LONG), "4", CLIENTS],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(load)
            inject = subprocess.Popen(
                ["ip", "netns", "exec", c, sys.executable, "-c", INJECT]
                + ["c0", lb_mac, VIP, secs, "300", CLIENTS],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(inject)

            # Poll: the engine is alive, conntrack within its bound, RSS after warm-up.
            t0 = time.monotonic()
            warm = min(10.0, DURATION / 4)
            rss_start = rss_end = 0
            ct_max = samples = 0
            while load.poll() is None or inject.poll() is None:
                assert run.poll() is None, f"the engine died: {run.returncode}"
                try:
                    nat = query(sock)["engine"]["nat"]
                except (ControlError, OSError) as exc:
                    raise AssertionError(f"status failed during the soak: {exc!r}") from exc
                ct_max = max(ct_max, int(nat["conntrack"]))
                samples += 1
                assert nat["conntrack"] <= CONNTRACK_MAX, nat["conntrack"]
                if not rss_start and time.monotonic() - t0 >= warm:
                    rss_start = rss_kb(run.pid)
                rss_end = rss_kb(run.pid)
                time.sleep(0.25)
                assert time.monotonic() - t0 < DURATION + 20, "the load did not finish"
            assert run.poll() is None, f"the engine died: {run.returncode}"
            assert load.returncode == 0 and inject.returncode == 0
            assert load.stdout is not None and inject.stdout is not None
            traffic = json.loads(load.stdout.read())
            injected: dict[str, int] = json.loads(inject.stdout.read())
            snmp_after = snmp6(lb)

            st = status(sock)
            nat = st["engine"]["nat"]
            counters: dict[str, int] = nat["counters"]
            drops = {k[5:]: v for k, v in counters.items() if k.startswith("drop.")}
            kernel = {
                k: snmp_after[k] - snmp_before[k] for k in ("Ip6InHdrErrors", "Ip6InTruncatedPkts")
            }
            short_fail = sum(traffic["short_fail"].values())
            fail_rate = short_fail / max(1, traffic["short"])
            print(
                "soak figures:",
                json.dumps(
                    {
                        "seconds": traffic["seconds"],
                        "short_connections": traffic["short"],
                        "short_failures": traffic["short_fail"],
                        "short_fail_rate": round(fail_rate, 5),
                        "udp_sent": traffic["udp_sent"],
                        "udp_recv": traffic["udp_recv"],
                        "udp_flows": traffic["udp_flows"],
                        "long": traffic["long"],
                        "injected": injected,
                        "injected_total": sum(injected.values()),
                        "drops": drops,
                        "kernel_drops": kernel,
                        "counters": {k: v for k, v in counters.items() if "." not in k},
                        "conntrack_max_seen": ct_max,
                        "conntrack_samples": samples,
                        "conntrack_end": nat["conntrack"],
                        "conntrack_by_state": nat["conntrack_by_state"],
                        "rss_kb_start": rss_start,
                        "rss_kb_end": rss_end,
                    },
                    indent=1,
                ),
            )

            # Drops by reason: every kind that reaches the engine is counted.
            for kind, reasons in EXPECTED.items():
                assert injected[kind] > 0, kind
                assert any(drops.get(r, 0) > 0 for r in reasons), (kind, reasons, drops)
            assert kernel["Ip6InHdrErrors"] > 0, kernel
            # A payload length past the end: the kernel's with TUN; with rings (this file
            # names lb.interfaces) the netdev chain takes the packet before the kernel's
            # checks, and the engine counts it.
            assert st["io"]["mode"] == "ring" and kernel["Ip6InTruncatedPkts"] == 0, kernel
            assert drops.get("length-mismatch", 0) >= injected["kernel_plen_past_end"], drops
            # Memory: the conntrack bound held, and RSS stayed flat after the warm-up.
            assert 0 < ct_max <= CONNTRACK_MAX and nat["conntrack_max"] == CONNTRACK_MAX
            assert rss_start and rss_end - rss_start <= RSS_BOUND_KB, (rss_start, rss_end)
            # No established connection broke; short connections nearly all worked.
            assert len(traffic["long"]) == LONG
            for conn in traffic["long"]:
                assert conn["error"] is None and conn["done"] == conn["planned"], conn
            assert traffic["short"] > 0 and fail_rate <= 0.01, traffic["short_fail"]
            assert traffic["udp_recv"] >= 0.99 * traffic["udp_sent"], traffic

            # SIGTERM: exit 0, nothing left behind.
            run.send_signal(signal.SIGTERM)
            assert run.wait(timeout=30) == 0
            assert not os.path.exists(sock)
            assert leftovers(lb, instance) == []
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
                print(run.stderr.read()[-4000:])
