"""ICMPv6 errors in the kernel data plane, against the Python core, with real packets.

A router on the path from a DSR backend to a client sends its ICMPv6 errors to the
VIP (the backend sent as the VIP), so they reach the LB. The rendered ruleset must
send each one to the backend of the flow it quotes, picked exactly as the core
(``DsrForwarder._icmp_error``) picks it. Checked here in a real kernel:

* **the flow's backend** (dsr-ip6ip6, dsr-srv6, dsr-l2): for 200 random client flows
  per VIP, an error quoting VIP:port -> client:cport (Packet Too Big, and four each of
  Destination Unreachable, Time Exceeded, Parameter Problem) goes to the backend of
  the client's SYN client:cport -> VIP:port with the same mark (read by a later
  prerouting chain of our own), and that is the core's backend and
  ``pool.table[reciprocal_scale(flow_hash(...), size)]``. What leaves toward the
  backends is captured: the outer destination (tunnel) or the destination MAC
  (dsr-l2) names the backend, and the error inside is the one sent, byte for byte.
* **quote shapes**: a quoted first fragment, an 8-byte Hop-by-Hop or Destination
  Options header (TCP and UDP), a quoted later fragment (3-tuple, the address's first
  VIP of the protocol, not its second tcp VIP): each goes to the core's backend.
* **unmatched**: a truncated quote, a quote cut between the ports, a quoted source
  that is not the VIP, a quoted port or protocol the address does not serve, a longer
  extension-header chain: dropped, counted in ``<vip>_icmp_unmatched`` (and in no
  ``_icmp`` counter), never forwarded; the core drops each of them too
  (``CORE_FORWARDS`` is empty: a difference would fail the test).
* **forged**: a Packet Too Big quoting a flow that never existed goes to the backend
  its hash names, creates no conntrack entry and gets no answer; one with MTU 500
  arrives with MTU 500 (RFC 8201 §4 leaves the floor to the host).
* **nat**: an error quoting a tracked flow (a real TCP connection through the VIP)
  reaches the backend translated (destination and quoted source = the backend), byte
  for byte as the core translates it, and counts in ``_icmp``; one quoting no tracked
  flow is dropped and counted in ``_icmp_unmatched``.
* **npt**: an error to a mapped outside address reaches the inside host with the
  quote translated back, byte for byte as the core translates it (``npt0_icmp``); a
  truncated quote or a quoted source outside the prefix is dropped
  (``npt0_icmp_unmatched``).

scapy crafts and reads the packets (the oracle, never the data path); AF_PACKET in
a peer namespace sends them; tcpdump captures. Namespaces ``v6lb-i-<pid>-<n>``,
deleted whatever happens; 2001:db8::/32 and fd00::/8 only.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from scapy.error import Scapy_Exception
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    PadN,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw
from scapy.utils import rdpcap

from netns_helpers import batch, link, namespaces, nsx, wait_for
from v6lb.core.backends import BackendPool
from v6lb.core.dsr import DsrForwarder
from v6lb.core.flowhash import flow_hash, flow_hash3, reciprocal_scale
from v6lb.core.verdict import DROP, FORWARD, FORWARD_L2, PORT_INSIDE, PORT_OUTSIDE
from v6lb.engines.kernel import apply, nft_counters, render_lb
from v6lb.model.config import Config, parse_config
from v6lb.model.pools import dsr_forwarder, nat_forwarder, npt_forwarder, pool_for, pools_for
from v6lb.render.nftables import (
    L2Ports,
    icmp_error_counter,
    icmp_unmatched_counter,
    npt_icmp_counter,
    npt_icmp_unmatched_counter,
)
from v6lb.render.routes import decap_address, tunnel_targets

SEED = 0x1C3E5EED
TABLE = 4093  # a prime Maglev table (65537 makes every nft listing take a second)
PEER = "2001:db8:a::2"  # the peer namespace: clients and routers
LB_OUT = "2001:db8:a::1"
LB_IN = "fd00:b::1"  # lb.addresses[0]: the tunnel source
CLIENTS = IPv6Network("2001:db8:c::/64")
ROUTERS = IPv6Network("2001:db8:e::/64")
MARKER = "2001:db8:d::1"  # the source of the last packet of each capture
VIP_T = "2001:db8:f::91"  # dsr-ip6ip6: tcp 80, 443; udp 53 and tcp 8443 (other VIPs)
VIP_S = "2001:db8:f::92"  # dsr-srv6: tcp 443
VIP_L = "2001:db8:f::90"  # dsr-l2: tcp 443
T_BACKENDS = [f"fd00:b::1{i}" for i in range(4)]
U_BACKENDS = [f"fd00:b::2{i}" for i in range(2)]
A_BACKENDS = [f"fd00:b::6{i}" for i in range(2)]
S_BACKENDS = [f"fd00:b::3{i}" for i in range(3)]
S_SIDS = [f"fd00:b::5:{i}" for i in range(3)]
L_BACKENDS = [f"fd00:b::4{i}" for i in range(3)]
L_MACS = [f"02:00:00:00:04:0{i}" for i in range(3)]


def _vip(
    name: str, address: str, mode: str, ports: list[int], backends: list[Any], **kw: Any
) -> Any:
    return {
        "name": name,
        "address": address,
        "ports": ports,
        "mode": mode,
        "table_size": TABLE,
        "health": {"type": "none"},
        "backends": backends,
        **kw,
    }


DSR_FILE: dict[str, Any] = {
    "lb": {"instance": "t-icmp", "flow_hash_seed": SEED, "addresses": [LB_IN, LB_OUT]},
    "vips": [
        _vip("tun", VIP_T, "dsr-ip6ip6", [80, 443], [{"address": a} for a in T_BACKENDS]),
        _vip(
            "tun-udp",
            VIP_T,
            "dsr-ip6ip6",
            [53],
            [{"address": a} for a in U_BACKENDS],
            protocol="udp",
        ),
        # the address's second tcp VIP: a quoted later fragment is not for it (no ports)
        _vip("tun-alt", VIP_T, "dsr-ip6ip6", [8443], [{"address": a} for a in A_BACKENDS]),
        _vip(
            "srv6",
            VIP_S,
            "dsr-srv6",
            [443],
            [{"address": a, "sid": s} for a, s in zip(S_BACKENDS, S_SIDS, strict=True)],
        ),
        _vip(
            "l2",
            VIP_L,
            "dsr-l2",
            [443],
            [{"address": a, "mac": m} for a, m in zip(L_BACKENDS, L_MACS, strict=True)],
        ),
    ],
}

# Send raw frames (hex, JSON on stdin) out of one device of the namespace it runs in.
SEND = (
    "import json, socket, sys\n"
    "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
    "s.bind((sys.argv[1], 0))\n"
    "for h in json.load(sys.stdin):\n"
    "    s.send(bytes.fromhex(h))\n"
)

_routers = itertools.count(1)
_pcaps = itertools.count()


def router() -> str:
    """A fresh router address: the outer source of one error, unique in the module."""
    return str(ROUTERS[next(_routers)])


def mac_of(ns: str, dev: str) -> str:
    return str(json.loads(nsx(ns, "ip", "-j", "link", "show", dev))[0]["address"])


def send(ns: str, dev: str, frames: list[bytes]) -> None:
    nsx(ns, sys.executable, "-c", SEND, dev, stdin=json.dumps([f.hex() for f in frames]))


def captured(
    taps: list[tuple[str, str]],
    tmp: Path,
    sender: tuple[str, str],
    frames: list[bytes],
    until: list[bytes] | None = None,
    expect: Callable[[list[list[Packet]]], bool] | None = None,
) -> list[list[Packet]]:
    """What arrives on each (namespace, device) of ``taps`` while ``frames`` are sent.

    ``until``: per tap, bytes of a last packet sent to reach it; the capture stops
    once they are in its file. Else ``expect``, given what each tap has caught so far,
    says when what must arrive has; the capture stops 0.3 s later (for what must not).
    Else it stops 0.3 s after the last frame left.
    """
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    try:
        for ns, dev in taps:
            pcap = tmp / f"{dev}-{next(_pcaps)}.pcap"
            err = pcap.with_suffix(".err")
            argv = ["ip", "netns", "exec", ns, "tcpdump", "-i", dev, "-Q", "in", "-n", "-U"]
            argv += ["--immediate-mode", "-Z", "root", "-s", "2048", "-B", "32768"]
            with err.open("wb") as fh:
                procs.append(
                    (
                        subprocess.Popen([*argv, "-w", str(pcap), "ip6"], stderr=fh),
                        pcap,
                        err,
                    )
                )
        for proc, _, err in procs:
            wait_for(
                "tcpdump", lambda e=err: b"listening on" in e.read_bytes(), 10, (OSError,), 0.02
            )
            assert proc.poll() is None, err.read_text()
        send(*sender, frames)
        if expect is not None:  # tcpdump may not have run yet on a busy machine
            wait_for(
                "the packets expected",
                lambda: expect([list(rdpcap(str(pcap))) for _, pcap, _ in procs]),
                10,
                (OSError, EOFError, Scapy_Exception),
            )
        if until is None:
            time.sleep(0.3)  # the last packets leave the socket buffers
        else:
            for (_, pcap, _), marker in zip(procs, until, strict=True):
                wait_for("the last packet", lambda f=pcap, m=marker: m in f.read_bytes(), 10, ())
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, _, _ in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    out = []
    for _, pcap, err in procs:
        assert "\n0 packets dropped by kernel" in err.read_text(), err.read_text()
        out.append(list(rdpcap(str(pcap))))
    return out


def checksum_ok(ipv6: bytes) -> bool:
    """Whether the ICMPv6 checksum of the packet is right (scapy recomputes it)."""
    p = IPv6(ipv6)
    layer = p[IPv6].payload
    given = layer.cksum
    del layer.cksum
    return bool(IPv6(bytes(p))[IPv6].payload.cksum == given)


def icmp_errors_in(packets: list[Packet]) -> list[Packet]:
    """The ICMPv6 error messages (types 1-127) among ``packets``."""
    return [
        p for p in packets if IPv6 in p and p[IPv6].nh == 58 and bytes(p[IPv6].payload)[0] < 128
    ]


# --- the DSR lab --------------------------------------------------------------------


@dataclass
class DsrLab:
    ns: dict[str, str]
    config: Config
    tmp: Path
    lb_mac: str  # l0, where the peer's frames arrive
    egress_mac: str  # l1, the source MAC of dsr-l2 frames
    peer_mac: str
    marks: dict[tuple[str, int], int]  # tunnel (VIP, backend index) -> mark
    core: DsrForwarder  # the reference
    pools: dict[str, BackendPool]  # by VIP name, as render_nft got them

    def frame(self, pkt: Packet) -> bytes:
        return bytes(Ether(src=self.peer_mac, dst=self.lb_mac) / pkt)

    def run(self, pkts: list[Packet]) -> tuple[dict[str, tuple[str, bytes]], list[Packet]]:
        """Send ``pkts`` from the peer; return what reached the backends' link, by inner
        source (backend label, the inner packet's bytes), and what came back to the peer."""
        # Two last packets, one for each tap: a dsr-l2 SYN (to the backends' link) and
        # an echo request to the LB (its reply comes back to the peer).
        marker = f"v6lb-last-{next(_pcaps)}".encode()
        last = [
            IPv6(src=MARKER, dst=VIP_L) / TCP(sport=1, dport=443, flags="S") / Raw(marker),
            IPv6(src=MARKER, dst=LB_OUT) / ICMPv6EchoRequest(data=marker),
        ]
        frames = [self.frame(p) for p in [*pkts, *last]]
        to_backends, answers = captured(
            [(self.ns["be"], "b0"), (self.ns["peer"], "p0")],
            self.tmp,
            (self.ns["peer"], "p0"),
            frames,
            [marker, marker],
        )
        back = [p for p in answers if IPv6 not in p or p[IPv6].dst != MARKER]
        seen: dict[str, tuple[str, bytes]] = {}
        for p in to_backends:
            if IPv6 not in p:
                continue
            outer = p[IPv6]
            if outer.nh in (41, 43):  # a tunnel: the outer destination names the backend
                label, inner = outer.dst, p.getlayer(IPv6, 2)
            elif outer.dst in (VIP_L, VIP_T, VIP_S):  # dsr-l2: the destination MAC
                assert p[Ether].src == self.egress_mac, p.summary()
                label, inner = p[Ether].dst, outer
            else:
                continue  # neighbour discovery
            if inner.src == MARKER:
                continue
            assert inner.src not in seen, f"{inner.src} arrived twice"
            seen[inner.src] = (label, bytes(inner))
        return seen, back

    def counters(self) -> dict[str, int]:
        return {k: v[0] for k, v in nft_counters("t-icmp", netns=self.ns["lb"]).items()}

    def marks_seen(self) -> dict[str, int]:
        """Source address -> mark, of every marked packet our later prerouting chain saw."""
        out = nsx(self.ns["lb"], "nft", "-j", "list", "set", "ip6", "probe", "seen")
        marks: dict[str, int] = {}
        for item in json.loads(out)["nftables"]:
            for e in item.get("set", {}).get("elem", []):
                val = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
                src, mark = val["concat"]
                marks[src] = int(mark)
        return marks


@pytest.fixture(scope="module")
def dsr_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DsrLab]:
    config = parse_config(DSR_FILE, "test_kernel_icmp.yaml")
    with namespaces("peer", "lb", "be", tag="i") as ns:
        peer, lb, be = ns["peer"], ns["lb"], ns["be"]
        link(peer, "p0", lb, "l0")
        link(lb, "l1", be, "b0")
        nsx(lb, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        be_mac, peer_mac = mac_of(be, "b0"), mac_of(peer, "p0")
        batch(peer, f"address add {PEER}/64 dev p0 nodad")
        on_b0 = [*T_BACKENDS, *U_BACKENDS, *A_BACKENDS, *S_BACKENDS, *S_SIDS, *L_BACKENDS]
        batch(be, *(f"address add {a}/64 dev b0 nodad" for a in on_b0))
        # The backends' link only watches: tunnelled packets die there quietly.
        nsx(be, "nft", "-f", "-", stdin=(
            "table ip6 sink {\n"
            "  chain pre {\n"
            "    type filter hook prerouting priority raw; policy accept;\n"
            "    ip6 nexthdr { 41, 43 } drop\n"
            "  }\n"
            "}\n"
        ))  # fmt: skip
        batch(
            lb,
            f"address add {LB_OUT}/64 dev l0 nodad",
            f"address add {LB_IN}/64 dev l1 nodad",
            f"route add {CLIENTS} via {PEER}",  # any answer of the LB would reach the peer
            f"route add {ROUTERS} via {PEER}",
            f"route add {MARKER} via {PEER}",
            f"neigh replace {PEER} lladdr {peer_mac} dev l0",
            *(f"neigh replace {a} lladdr {be_mac} dev l1" for a in on_b0),
        )
        egress_mac = mac_of(lb, "l1")
        pools = pools_for(config)
        l2 = L2Ports("l0", "l1", egress_mac)
        apply(render_lb(config, pools=pools, l2=l2, dev="l1"), "t-icmp", netns=lb)
        # A later prerouting chain of our own records each source's mark.
        nsx(lb, "nft", "-f", "-", stdin=(
            "table ip6 probe {\n"
            "  set seen {\n"
            "    typeof ip6 saddr . meta mark\n"
            "    size 65535\n"
            "    flags dynamic\n"
            "  }\n"
            "  chain after {\n"
            "    type filter hook prerouting priority mangle + 10; policy accept;\n"
            "    meta mark != 0 update @seen { ip6 saddr . meta mark }\n"
            "  }\n"
            "}\n"
        ))  # fmt: skip
        marks = {(t.vip.name, t.backend_index): t.mark for t in tunnel_targets(config)}
        yield DsrLab(
            ns,
            config,
            tmp_path_factory.mktemp("icmp"),
            mac_of(lb, "l0"),
            egress_mac,
            peer_mac,
            marks,
            dsr_forwarder(config),
            pools,
        )


# --- what the core says -----------------------------------------------------------------


def core_label(fwd: DsrForwarder, pkt: Packet) -> str:
    """The core's verdict on ``pkt`` as the wire shows it: the outer destination (tunnel),
    the backend's MAC (dsr-l2), or ``drop:<reason>``. Its flow cache is emptied first:
    every verdict is the table's, as the kernel's (which has no cache)."""
    fwd.clear_flows()
    action, arg, data = fwd.process(bytearray(bytes(pkt)), PORT_OUTSIDE, 0.0)
    if action == FORWARD:
        assert arg == PORT_INSIDE
        return str(IPv6Address(bytes(data[24:40])))
    if action == FORWARD_L2:
        return ":".join(f"{b:02x}" for b in bytes(data))
    assert action == DROP, (action, arg)
    return f"drop:{arg}"


def wire_label(lab: DsrLab, vip: str, index: int) -> str:
    """What names backend ``index`` of VIP ``vip`` on the backends' link."""
    v = lab.config.vip(vip)
    if v.mode.tunnels:
        return str(decap_address(v, index))
    return L_MACS[index]


def hashed(lab: DsrLab, vip: str, key: int) -> int:
    """pool.table[reciprocal_scale(hash, size)]: the backend a hash names, as nft's map."""
    pool = lab.pools[vip]
    return pool.table[reciprocal_scale(key, pool.size)]


def forwarded_as_sent(sent: Packet, got: bytes) -> None:
    """The packet behind the tunnel (or the MAC rewrite) is the one sent, byte for byte.

    Linux encapsulates at the route's input (lwtunnel), before ip6_forward: the
    inner hop limit is not decremented (the outer one is, in ip6_forward).
    """
    assert got == bytes(sent), f"{sent.summary()}: changed on the way"


@dataclass
class Flow:
    vip_name: str
    vip: str
    client: str
    cport: int
    vport: int
    proto: str = "tcp"


def random_flows(
    rng: random.Random, vip_name: str, vip: str, ports: list[int], n: int
) -> list[Flow]:
    used: set[str] = set()
    flows = []
    while len(flows) < n:
        client = str(CLIENTS[rng.getrandbits(64)])
        if client in used:
            continue
        used.add(client)
        flows.append(Flow(vip_name, vip, client, rng.randrange(1024, 65536), rng.choice(ports)))
    return flows


def syn(f: Flow) -> Packet:
    return IPv6(src=f.client, dst=f.vip, hlim=64) / TCP(sport=f.cport, dport=f.vport, flags="S")


def quote(f: Flow, size: int = 120) -> Packet:
    """What the backend sent as the VIP to the client, as a router quotes it."""
    l4 = (
        TCP(sport=f.vport, dport=f.cport, flags="A", seq=7)
        if f.proto == "tcp"
        else UDP(sport=f.vport, dport=f.cport)
    )
    return IPv6(src=f.vip, dst=f.client, hlim=60) / l4 / Raw(b"q" * size)


ERRORS = {
    "packet-too-big": lambda: ICMPv6PacketTooBig(mtu=1400),
    "destination-unreachable": lambda: ICMPv6DestUnreach(code=4),
    "time-exceeded": lambda: ICMPv6TimeExceeded(code=0),
    "parameter-problem": lambda: ICMPv6ParamProblem(code=0, ptr=6),
}


def error(f: Flow, kind: str = "packet-too-big", body: Packet | bytes | None = None) -> Packet:
    q = quote(f) if body is None else body
    return IPv6(src=router(), dst=f.vip, hlim=64) / ERRORS[kind]() / q


# --- 1. the flow's backend ---------------------------------------------------------------


@pytest.mark.root
def test_errors_go_with_the_flow_to_the_core_backend(dsr_lab: DsrLab) -> None:
    rng = random.Random(4443)
    lab = dsr_lab
    flows = [
        *random_flows(rng, "tun", VIP_T, [80, 443], 200),
        *random_flows(rng, "srv6", VIP_S, [443], 200),
        *random_flows(rng, "l2", VIP_L, [443], 200),
    ]
    pkts: list[Packet] = []
    checks: list[tuple[Flow, Packet, Packet]] = []
    for k, f in enumerate(flows):
        e = error(f, list(ERRORS)[k % 50] if k % 50 < 4 else "packet-too-big")
        if e.haslayer(ICMPv6PacketTooBig):
            e[ICMPv6PacketTooBig].mtu = rng.randrange(1280, 1500)
        pkts += [syn(f), e]
        checks.append((f, syn(f), e))
    before = lab.counters()
    seen, back = lab.run(pkts)
    marks = lab.marks_seen()
    after = lab.counters()

    tally: dict[str, int] = {}
    kinds: set[str] = set()
    for f, s, e in checks:
        i = hashed(lab, f.vip_name, flow_hash(
            IPv6Address(f.client).packed, IPv6Address(f.vip).packed, f.cport, f.vport, SEED
        ))  # fmt: skip
        want = wire_label(lab, f.vip_name, i)
        assert core_label(lab.core, s) == want
        assert core_label(lab.core, e) == want, f"core: {e.summary()}"
        assert f.client in seen, f"the SYN {s.summary()} did not reach a backend"
        assert e.src in seen, f"the error {e.summary()} did not reach a backend"
        assert seen[f.client][0] == want, f"{s.summary()}: kernel {seen[f.client][0]}, core {want}"
        assert seen[e.src][0] == want, f"{e.summary()}: kernel {seen[e.src][0]}, core {want}"
        forwarded_as_sent(e, seen[e.src][1])
        if f.vip_name != "l2":  # the ip6 table's marks (dsr-l2 never reaches it)
            mark = lab.marks[(f.vip_name, i)]
            assert marks.get(f.client) == mark, f"{s.summary()}: mark {marks.get(f.client)}"
            assert marks.get(e.src) == mark, f"{e.summary()}: mark {marks.get(e.src)}, SYN {mark}"
        tally[f.vip_name] = tally.get(f.vip_name, 0) + 1
        kinds.add(type(e.payload).__name__)
    assert len(kinds) == 4, kinds
    assert len(seen) == len(pkts)
    assert icmp_errors_in(back) == [], [p.summary() for p in icmp_errors_in(back)]
    for name in ("tun", "srv6", "l2"):
        c = icmp_error_counter(lab.config, lab.config.vip(name))
        assert after[c] - before.get(c, 0) == 200, (c, after[c])
    print(f"icmp errors with their flow (kernel = core = hash): {tally}, {len(pkts)} packets")


# --- 2. the quote shapes -------------------------------------------------------------------


def shapes(f: Flow) -> dict[str, Packet]:
    """The quote shapes nft reads at fixed offsets, beyond the plain one."""
    ph = 6 if f.proto == "tcp" else 17
    l4 = bytes(quote(f, 16).payload)
    head = IPv6(src=f.vip, dst=f.client, hlim=60)
    return {
        "first fragment": head / IPv6ExtHdrFragment(nh=ph, offset=0, m=1, id=9) / Raw(l4),
        "hop-by-hop (8 bytes)": head / IPv6ExtHdrHopByHop(nh=ph) / Raw(l4),
        "destination options (8 bytes)": head / IPv6ExtHdrDestOpt(nh=ph) / Raw(l4),
        "later fragment": head / IPv6ExtHdrFragment(nh=ph, offset=8, m=0, id=9) / Raw(b"z" * 64),
    }


@pytest.mark.root
def test_quote_shapes_pick_the_core_backend(dsr_lab: DsrLab) -> None:
    rng = random.Random(8200)
    lab = dsr_lab
    core = lab.core
    flows = [
        *random_flows(rng, "tun", VIP_T, [80, 443], 12),
        *random_flows(rng, "tun-alt", VIP_T, [8443], 12),
        *random_flows(rng, "srv6", VIP_S, [443], 12),
        *random_flows(rng, "l2", VIP_L, [443], 12),
    ]
    udp = random_flows(rng, "tun-udp", VIP_T, [53], 12)
    for f in udp:
        f.proto = "udp"
    cases: list[tuple[Flow, str, Packet]] = []
    for f in flows + udp:
        for shape, body in shapes(f).items():
            cases.append((f, shape, error(f, rng.choice(list(ERRORS)), body)))
    seen, back = lab.run([e for _, _, e in cases])
    per_shape: dict[str, int] = {}
    wrong: list[str] = []
    for f, shape, e in cases:
        client, vip = IPv6Address(f.client).packed, IPv6Address(f.vip).packed
        owner = f.vip_name
        if shape == "later fragment":  # no ports: the 3-tuple, the address's first VIP
            ph = 6 if f.proto == "tcp" else 17
            owner = next(
                v.name
                for v in lab.config.vips
                if str(v.address) == f.vip and str(v.protocol) == f.proto
            )
            i = hashed(lab, owner, flow_hash3(client, vip, ph, SEED))
        else:
            i = hashed(lab, owner, flow_hash(client, vip, f.cport, f.vport, SEED))
        want = wire_label(lab, owner, i)
        assert core_label(core, e) == want, f"core, {shape}: {e.summary()}"
        got = seen.get(e.src, ("nothing",))[0]
        if got != want:
            wrong.append(f"{f.vip_name} {shape}: kernel {got}, core {want}")
            continue
        forwarded_as_sent(e, seen[e.src][1])
        per_shape[f"{f.vip_name} {shape}"] = per_shape.get(f"{f.vip_name} {shape}", 0) + 1
    print(f"quote shapes (kernel = core): {per_shape}")
    assert not wrong, f"{len(wrong)} of {len(cases)} differ: {sorted(set(wrong))}"
    assert icmp_errors_in(back) == []


# --- 3. unmatched: dropped and counted -------------------------------------------------------


def unmatched(f: Flow) -> dict[str, Packet | bytes]:
    """Errors to a DSR address that quote none of its flows, as nft reads them."""
    whole = bytes(quote(f, 16))
    head = IPv6(src=f.vip, dst=f.client, hlim=60)
    tcp = TCP(sport=f.vport, dport=f.cport)
    return {
        "quote of 20 bytes": whole[:20],
        "quote of 39 bytes": whole[:39],
        "quote of 42 bytes (VIP port only)": whole[:42],
        "first fragment cut after the VIP port": bytes(
            head / IPv6ExtHdrFragment(nh=6, offset=0, m=1) / Raw(bytes(tcp)[:2])
        ),
        "8-byte options cut after the VIP port": bytes(
            head / IPv6ExtHdrDestOpt(nh=6) / Raw(bytes(tcp)[:2])
        ),
        "quoted source not the VIP": IPv6(src="2001:db8:f::99", dst=f.client) / tcp,
        "quoted port not served": head / TCP(sport=8080, dport=f.cport),
        "udp quote from a tcp port": head / UDP(sport=f.vport, dport=f.cport),
        "16-byte destination options": head
        / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * 10)])
        / tcp,
        "hop-by-hop then destination options": head
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / tcp,
    }


# The core forwards these, the kernel drops them: nft reads the quote at fixed offsets
# only (render/nftables.py, _icmp_error_matches), so a chain of more than one 8-byte
# header, or a quote cut between the VIP port and the client port (which the core then
# hashes on the 3-tuple), matches no rule. Pinned so that a change on either side shows.
# The core reads quotes in the kernel's shapes (DsrForwarder._icmp_error): none differ.
CORE_FORWARDS: set[str] = set()


@pytest.mark.root
def test_unmatched_errors_are_dropped_and_counted(dsr_lab: DsrLab) -> None:
    rng = random.Random(4884)
    lab = dsr_lab
    core = lab.core
    flows = [
        random_flows(rng, "tun", VIP_T, [443], 1)[0],
        random_flows(rng, "srv6", VIP_S, [443], 1)[0],
        random_flows(rng, "l2", VIP_L, [443], 1)[0],
    ]
    cases = [
        (f, what, error(f, rng.choice(list(ERRORS)), body))
        for f in flows
        for what, body in unmatched(f).items()
    ]
    before = lab.counters()
    seen, back = lab.run([e for _, _, e in cases])
    after = lab.counters()
    leaked = [f"{f.vip_name}: {what}" for f, what, e in cases if e.src in seen]
    assert not leaked, f"forwarded: {leaked}"
    assert icmp_errors_in(back) == []
    for f in flows:
        vip = lab.config.vip(f.vip_name)
        name = icmp_unmatched_counter(lab.config, vip)
        assert name in after, f"no counter {name} in the ruleset: {sorted(after)}"
        assert after[name] - before.get(name, 0) == len(unmatched(f)), (name, after[name])
        for v in lab.config.vips:  # nothing counted as sent to a backend
            ok = icmp_error_counter(lab.config, v)
            assert after[ok] == before[ok], (ok, before[ok], after[ok])
    core_forwards = {what for _, what, e in cases if not core_label(core, e).startswith("drop:")}
    assert core_forwards == CORE_FORWARDS, core_forwards ^ CORE_FORWARDS


# --- 4. forged errors: no state, no answer, the MTU untouched ----------------------------------


@pytest.mark.root
def test_forged_packet_too_big_is_forwarded_statelessly(dsr_lab: DsrLab) -> None:
    rng = random.Random(8201)
    lab = dsr_lab
    core = lab.core
    forged = [
        *random_flows(rng, "tun", VIP_T, [443], 8),
        *random_flows(rng, "srv6", VIP_S, [443], 8),
        *random_flows(rng, "l2", VIP_L, [443], 8),
    ]
    # An echo request to the LB itself: conntrack keeps an entry for it (so conntrack
    # is on in the LB namespace), and its reply shows that the peer hears the LB.
    control = IPv6(src=router(), dst=LB_OUT, hlim=64) / ICMPv6EchoRequest(id=0x1CE, data=b"ct")
    errs = []
    for k, f in enumerate(forged):
        e = error(f)
        e[ICMPv6PacketTooBig].mtu = 500 if k % 2 else 1280
        errs.append(e)
    seen, back = lab.run([control, *errs])
    for e in errs:
        want = core_label(core, e)
        assert seen.get(e.src, ("nothing",))[0] == want, f"{e.summary()}: core {want}"
        forwarded_as_sent(e, seen[e.src][1])
        assert IPv6(seen[e.src][1])[ICMPv6PacketTooBig].mtu == e[ICMPv6PacketTooBig].mtu
    answers = [
        p
        for p in back
        if IPv6 in p
        and not IPv6Address(p[IPv6].dst).is_multicast
        and not (p[IPv6].nh == 58 and 133 <= bytes(p[IPv6].payload)[0] <= 137)  # ND
    ]
    assert [(p[IPv6].dst, type(p[IPv6].payload).__name__) for p in answers] == [
        (control.src, "ICMPv6EchoReply")
    ], [p.summary() for p in answers]
    table = nsx(lab.ns["lb"], "conntrack", "-L", "-f", "ipv6")
    assert control.src in table, f"conntrack is not tracking here: {table!r}"
    for e in errs:
        client = e[ICMPv6PacketTooBig].payload.dst
        assert client not in table and e.src not in table, f"state for {e.summary()}: {table}"
    print(f"forged: {len(errs)} errors forwarded, MTU 500 and 1280 unchanged, no state")


# --- 5. nat --------------------------------------------------------------------------------------

NAT_VIP = "2001:db8:f::80"
NAT_BACKENDS = ["2001:db8:b::10", "2001:db8:b::11"]
NAT_CLIENT = "2001:db8:a::2"
NAT_FILE: dict[str, Any] = {
    "lb": {"instance": "t-icmpn", "flow_hash_seed": SEED, "addresses": [LB_OUT]},
    "vips": [
        _vip("web", NAT_VIP, "nat", [80], [{"address": a} for a in NAT_BACKENDS]),
    ],
}
HOLD_SERVER = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('::', 80))\n"
    "s.listen(8)\n"
    "print('ready', flush=True)\n"
    "held = []\n"
    "while True:\n"
    "    held.append(s.accept()[0])\n"
)
HOLD_CLIENT = (
    "import socket, sys\n"
    "s = socket.create_connection((sys.argv[1], 80), timeout=5)\n"
    "print(s.getsockname()[1], flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.mark.root
def test_nat_errors_are_translated_or_dropped(tmp_path: Path) -> None:
    config = parse_config(NAT_FILE, "test_kernel_icmp_nat.yaml")
    vip = config.vip("web")
    with namespaces("client", "lb", "backend", tag="i") as ns:
        c, lb, b = ns["client"], ns["lb"], ns["backend"]
        link(c, "c0", lb, "l0")
        link(lb, "l1", b, "b0")
        nsx(lb, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        batch(c, f"address add {NAT_CLIENT}/64 dev c0 nodad", f"route add default via {LB_OUT}")
        batch(
            lb,
            f"address add {LB_OUT}/64 dev l0 nodad",
            "address add 2001:db8:b::1/64 dev l1 nodad",
            # no neighbour discovery while the link-local addresses are tentative
            f"neigh replace {NAT_CLIENT} lladdr {mac_of(c, 'c0')} dev l0",
            *(f"neigh replace {a} lladdr {mac_of(b, 'b0')} dev l1" for a in NAT_BACKENDS),
        )
        batch(
            b,
            *(f"address add {a}/64 dev b0 nodad" for a in NAT_BACKENDS),
            "route add default via 2001:db8:b::1",
        )
        apply(render_lb(config), "t-icmpn", netns=lb)
        procs: list[subprocess.Popen[str]] = []
        try:
            server = subprocess.Popen(
                ["ip", "netns", "exec", b, sys.executable, "-c", HOLD_SERVER],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(server)
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            client = subprocess.Popen(
                ["ip", "netns", "exec", c, sys.executable, "-c", HOLD_CLIENT, NAT_VIP],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(client)
            assert client.stdout is not None
            cport = int(client.stdout.readline())
            pool = pool_for(vip, SEED)
            backend = NAT_BACKENDS[
                pool.pick_flow(
                    IPv6Address(NAT_CLIENT).packed, IPv6Address(NAT_VIP).packed, cport, 80
                )
            ]
            tracked = Flow("web", NAT_VIP, NAT_CLIENT, cport, 80)
            untracked = Flow("web", NAT_VIP, NAT_CLIENT, cport ^ 0x5A5A or 1, 80)
            ok, bad = error(tracked), error(untracked)
            lb_mac, c_mac = mac_of(lb, "l0"), mac_of(c, "c0")
            before = {k: v[0] for k, v in nft_counters("t-icmpn", netns=lb).items()}
            (got,) = captured(
                [(b, "b0")],
                tmp_path,
                (c, "c0"),
                [bytes(Ether(src=c_mac, dst=lb_mac) / p) for p in (ok, bad)],
                expect=lambda got: bool(icmp_errors_in(got[0])),
            )
            after = {k: v[0] for k, v in nft_counters("t-icmpn", netns=lb).items()}
        finally:
            for p in procs:
                p.kill()
                p.wait()
    errs = [p for p in icmp_errors_in(got) if p[IPv6].src in (ok.src, bad.src)]
    assert [p[IPv6].src for p in errs] == [ok.src], [p.summary() for p in errs]
    arrived = errs[0][IPv6]
    q = arrived[ICMPv6PacketTooBig].payload
    assert arrived.dst == backend, f"to {arrived.dst}, the flow's backend is {backend}"
    assert (q.src, q.dst) == (backend, NAT_CLIENT), f"quote {q.src} -> {q.dst}"
    assert (q.payload.sport, q.payload.dport) == (80, cport)
    assert arrived[ICMPv6PacketTooBig].mtu == 1400
    assert checksum_ok(bytes(arrived)), "nf_nat left a wrong ICMPv6 checksum"
    # The core, given the same flow's SYN, translates the error to the same bytes.
    core = nat_forwarder(config)
    first = IPv6(src=NAT_CLIENT, dst=NAT_VIP, hlim=64) / TCP(sport=cport, dport=80, flags="S")
    action, _, out = core.process(bytearray(bytes(first)), PORT_OUTSIDE, 0.0)
    assert action == FORWARD and IPv6(bytes(out)).dst == backend
    action, _, want = core.process(bytearray(bytes(ok)), PORT_OUTSIDE, 0.0)
    assert action == FORWARD and bytes(arrived) == bytes(want), "kernel and core translate apart"
    action, reason, _ = core.process(bytearray(bytes(bad)), PORT_OUTSIDE, 0.0)
    assert action == DROP, (action, reason)
    for name, grew in (
        (icmp_error_counter(config, vip), 1),
        (icmp_unmatched_counter(config, vip), 1),
    ):
        assert after[name] - before[name] == grew, (name, before[name], after[name])


# --- npt -----------------------------------------------------------------------------------

NPT_INSIDE = "fd00:1:2::/48"
NPT_OUTSIDE = "2001:db8:1::/48"
INSIDE_HOST = "fd00:1:2:3::5"
OUTSIDE_HOST = "2001:db8:ee::2"
NPT_FILE: dict[str, Any] = {
    "lb": {"instance": "t-icmpp"},
    "npt": [{"inside": NPT_INSIDE, "outside": NPT_OUTSIDE}],
}


@pytest.mark.root
def test_npt_errors_are_translated_back_or_dropped(tmp_path: Path) -> None:
    config = parse_config(NPT_FILE, "test_kernel_icmp_npt.yaml")
    core = npt_forwarder(config)
    mapped = str(core.mappings[0].translate(INSIDE_HOST))
    with namespaces("inside", "npt", "outside", tag="i") as ns:
        ins, t, out = ns["inside"], ns["npt"], ns["outside"]
        link(ins, "i0", t, "t0")
        link(t, "t1", out, "o0")
        nsx(t, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        batch(
            ins,
            "address add fd00:aa::2/64 dev i0 nodad",
            f"address add {INSIDE_HOST}/64 dev i0 nodad",
        )
        batch(
            t,
            "address add fd00:aa::1/64 dev t0 nodad",
            "address add 2001:db8:ee::1/64 dev t1 nodad",
            f"route add {NPT_INSIDE} via fd00:aa::2",
            # A forwarded packet's neighbour solicitation needs a link-local source,
            # tentative for a second after the link comes up: no waiting for it.
            f"neigh replace fd00:aa::2 lladdr {mac_of(ins, 'i0')} dev t0",
        )
        batch(out, f"address add {OUTSIDE_HOST}/64 dev o0 nodad")
        apply(render_lb(config), "t-icmpp", netns=t)
        payload = (
            IPv6(src=mapped, dst=OUTSIDE_HOST, hlim=60) / UDP(sport=5353, dport=53) / Raw(b"n" * 64)
        )
        ok = IPv6(src=router(), dst=mapped, hlim=64) / ICMPv6PacketTooBig(mtu=1280) / payload
        truncated = (
            IPv6(src=router(), dst=mapped, hlim=64)
            / ICMPv6PacketTooBig(mtu=1280)
            / bytes(payload)[:20]
        )
        foreign = (
            IPv6(src=router(), dst=mapped, hlim=64)
            / ICMPv6TimeExceeded()
            / (IPv6(src="2001:db8:99::7", dst=OUTSIDE_HOST) / UDP(sport=5353, dport=53))
        )
        frames = [
            bytes(Ether(src=mac_of(out, "o0"), dst=mac_of(t, "t1")) / p)
            for p in (ok, truncated, foreign)
        ]
        (got,) = captured(
            [(ins, "i0")],
            tmp_path,
            (out, "o0"),
            frames,
            expect=lambda g: bool(icmp_errors_in(g[0])),
        )
        counters = {k: v[0] for k, v in nft_counters("t-icmpp", netns=t).items()}
    errs = icmp_errors_in(got)
    assert len(errs) == 1, [p.summary() for p in errs]
    arrived = bytes(errs[0][IPv6])
    action, port, want = core.process(bytearray(bytes(ok)), PORT_OUTSIDE, 0.0)
    assert (action, port) == (FORWARD, PORT_INSIDE)
    q = IPv6(arrived)[ICMPv6PacketTooBig].payload
    assert (IPv6(arrived).dst, q.src, q.dst) == (INSIDE_HOST, INSIDE_HOST, OUTSIDE_HOST)
    assert arrived == bytes(want), "the kernel's translation differs from the core's"
    assert counters[npt_icmp_counter(0)] == 1, counters
    assert counters[npt_icmp_unmatched_counter(0)] == 2, counters
    for dropped in (truncated, foreign):  # the core drops them too
        assert core.process(bytearray(bytes(dropped)), PORT_OUTSIDE, 0.0)[0] == DROP
    assert (core.icmp_translated, core.icmp_unmatched) == ([1], [2])
