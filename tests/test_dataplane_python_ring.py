"""The ring loops (``V6LB_PYTHON_IO=ring``) give what the core's ``process`` gives (root).

Real AF_PACKET rings on veth pairs in two fresh namespaces: for each side of a
forwarder, a receive ring on ``fb<port>`` gets the frames a plain packet socket
sends into ``fa<port>``; the transmit ring on ``oa`` sends to ``ob``, where a
plain packet socket reads them. For random packets, translatable and not, a few
larger than a transmit slot (the ``sendmsg`` path), half with ``NEEDS_CSUM``,
the packets that leave must equal what a second, untouched forwarder's
``process`` gives for the same packets (no hop is given back on rings), and
the counters must match.
"""

from __future__ import annotations

import random
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netns_helpers import in_netns, link, namespaces, nsx
from test_dataplane_python_loop import BACKENDS, VIP, _config, _partial, _udp
from v6lb.core.verdict import FORWARD, PORT_INSIDE, PORT_OUTSIDE, REPLY
from v6lb.engines.plane import PlaneContext
from v6lb.engines.python.ring import PACKET_VNET_HDR, SOL_PACKET, RxRing, TxRing
from v6lb.engines.python.run import PythonPlane, _Port, build_forwarders
from v6lb.engines.python.steer import plan
from v6lb.wire.checksum import ones_sum

pytestmark = [pytest.mark.root]

ETH = bytes.fromhex("02000000000102000000000286dd")
MCAST = bytes.fromhex("333300000016")  # an MLD report's destination
NEEDS = bytes([1, 0]) + struct.pack("=HHHH", 0, 0, 54, 6)  # UDP checksum, Ethernet first


def _packet_socket(dev: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.bind((dev, 0x0003))
    s.setblocking(False)
    return s


class _RingRig:
    def __init__(self, tmp_path: Path, kind: str, feed: str, eng: str) -> None:
        config, path = _config(tmp_path)
        self.runner = PythonPlane(config, PlaneContext(path=path, log=lambda _: None), io="ring")
        self.fwd = self.runner.forwarders[kind]
        self.send: dict[int, socket.socket] = {}
        self.closing: list[Any] = []
        with in_netns(feed):
            for side in plan(config).sides:
                if side.kind == kind:
                    self.send[side.port] = _packet_socket(f"fa{side.port}")
            self.out = _packet_socket("ob")
        with in_netns(eng):
            self.runner.tx = TxRing("oa", ETH[:6], ETH[6:12], vnet=True)
            for side in plan(config).sides:
                if side.kind == kind:
                    ring = RxRing(f"fb{side.port}", vnet=True)
                    self.runner.ports.append(
                        _Port(side, ring.fileno(), self.fwd, self.runner._buf, True, ring)
                    )
        self.closing = [*self.send.values(), self.out]

    def port(self, p: int) -> _Port:
        return next(x for x in self.runner.ports if x.side.port == p)

    def run(self, frames: list[tuple[int, bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Each (port, virtio-net header, packet) through the ring loop: what left, in order.

        A packet that is not IPv6 UDP (an MLD report, say) comes as the kernel's own
        frame would, to a multicast MAC; every frame that leaves must carry the
        transmit ring's Ethernet header all the same.
        """
        out: list[tuple[bytes, bytes]] = []
        for in_port, hdr, pkt in frames:
            eth = ETH if pkt[6] == 17 else MCAST + ETH[6:]
            self.send[in_port].send(hdr + eth + pkt)
            port = self.port(in_port)
            assert port.ring is not None
            select.select([port.ring], [], [], 2.0)  # the block is handed over within 1 ms
            self.runner._ring_ready(port, 1000.0)
            select.select([self.out], [], [], 0.01)
            try:
                while True:
                    frame = self.out.recv(70000)
                    assert frame[10:24] == ETH, frame[10:24].hex()
                    out.append((frame[:10], frame[24:]))
            except BlockingIOError:
                pass
        return out

    def close(self) -> None:
        for s in self.closing:
            s.close()
        for p in self.runner.ports:
            assert p.ring is not None
            p.ring.close()
        assert self.runner.tx is not None
        self.runner.tx.close()


@pytest.fixture
def rig_ns() -> Iterator[tuple[str, str]]:
    with namespaces("feed", "eng", tag="r") as ns:
        feed, eng = ns["feed"], ns["eng"]
        for n in (feed, eng):  # no neighbour discovery or MLD frames of the kernel's
            nsx(n, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            nsx(n, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        for a, b in (("fa0", "fb0"), ("fa1", "fb1"), ("ob", "oa")):
            link(feed, a, eng, b)
            nsx(feed, "ip", "link", "set", a, "mtu", "9000")
            nsx(eng, "ip", "link", "set", b, "mtu", "9000")
        yield feed, eng


def _complete(hdr: bytes, pkt: bytes) -> bytes:
    """A packet that left with NEEDS_CSUM, its UDP checksum completed as the kernel would."""
    out = bytearray(pkt)
    if hdr[0] & 1:
        ck = (-ones_sum(out[40:])) % 0xFFFF or 0xFFFF
        out[46:48] = ck.to_bytes(2, "big")
    return bytes(out)


def _want(fwd: Any, pkts: list[tuple[int, bytearray]]) -> list[bytes]:
    out = []
    for in_port, pkt in pkts:
        action, _, data = fwd.process(bytearray(pkt), in_port, 1000.0)
        if action in (FORWARD, REPLY):
            out.append(bytes(data))
    return out


def _equal_the_core(
    rig: _RingRig, mode: str, pkts: list[tuple[int, bytearray]], rng: random.Random
) -> None:
    """The packets through the ring loops (half of them with NEEDS_CSUM) leave as the
    core's ``process`` makes them, with the same counters; some took the sendmsg path."""
    reference = build_forwarders(rig.runner.config)[mode]
    want = _want(reference, pkts)
    frames = []
    for p, pkt in pkts:
        partial = rng.random() < 0.5
        frame = bytes(_partial(pkt) if partial else pkt)
        frames.append((p, NEEDS if partial else bytes(10), frame))
    got = rig.run(frames)
    assert [_complete(h, d) for h, d in got] == want
    assert any(len(d) > 2000 for _, d in got)  # the sendmsg path was taken
    assert rig.fwd.counters.snapshot() == reference.counters.snapshot()


def test_ring_loops_equal_the_core(tmp_path: Path, rig_ns: tuple[str, str]) -> None:
    """npt (the first-8-byte cache) and nat (the core's fast path), slot to slot."""
    feed, eng = rig_ns
    rng = random.Random(11)
    # npt: inside and outside, translatable or not, some too big for a slot
    (tmp_path / "npt").mkdir()
    rig = _RingRig(tmp_path / "npt", "npt", feed, eng)
    try:
        pkts: list[tuple[int, bytearray]] = []
        for _ in range(160):
            subnet, host = rng.choice([0, 1, 0x1234]), rng.getrandbits(16)
            inside = f"fd00:b:0:{subnet:x}::{host:x}"
            outside = f"2001:db8:e:{subnet:x}::{host:x}"
            other = f"2001:db8:a::{rng.getrandbits(16):x}"
            data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 12, 40, 3000])))
            hl = rng.choice([1, 2, 64])
            if rng.random() < 0.5:
                src = inside if rng.random() < 0.9 else other
                pkts.append((PORT_INSIDE, _udp(src, other, 4000, 53, hl, data)))
            else:
                dst = outside if rng.random() < 0.9 else other
                pkts.append((PORT_OUTSIDE, _udp(other, dst, 53, 4000, hl, data)))
        _equal_the_core(rig, "npt", pkts, rng)
        assert sum(len(p.cache) for p in rig.runner.ports) > 0  # the cache was used
    finally:
        rig.close()
    # nat: new flows, their packets again (fast path) and replies from either backend
    (tmp_path / "nat").mkdir()
    rig = _RingRig(tmp_path / "nat", "nat", feed, eng)
    try:
        clients = [f"2001:db8:c::{i}" for i in range(1, 9)]
        pkts = []
        for _ in range(160):
            c = rng.choice(clients)
            sport = 5000 + clients.index(c)
            if rng.random() < 0.6:
                size = rng.choice([0, 20, 3000])
                pkts.append((PORT_OUTSIDE, _udp(c, VIP, sport, 53, 64, b"q" * size)))
            else:
                pkts.append((PORT_INSIDE, _udp(rng.choice(BACKENDS), c, 53, sport, 64, b"a")))
            if rng.random() < 0.1:  # not UDP: the fast path copies it into a slot, then declines
                mld = _udp("::", "ff02::16", 0, 0, 1, b"m" * 20)
                mld[6] = 58
                pkts.append((rng.choice([PORT_OUTSIDE, PORT_INSIDE]), mld))
        _equal_the_core(rig, "nat", pkts, rng)
        assert rig.fwd.counters.snapshot()["hit"] > 20  # the fast path was taken
    finally:
        rig.close()
