"""The Python data plane's per-mode loops give what the core's ``process`` gives (no root).

The loops read from and write to file descriptors; datagram socket pairs stand
in for the TUN devices (one ``readv`` is one packet, one ``write`` one packet).
For random packets, some translatable and some not, the bytes the loop writes
and the counters it leaves must equal what a second, untouched forwarder's
``process`` does with the same packets (after the loop's hop-limit give-back):

* npt: the cache of first-8-byte translations repeats the core's answers only;
* nat: the core's ``fast`` on the shared buffer, its ``process`` on a copy.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml

from v6lb.core.verdict import FORWARD, PORT_INSIDE, PORT_OUTSIDE, REPLY
from v6lb.engines.plane import PlaneContext
from v6lb.engines.python.run import PythonPlane, _Port, build_forwarders, rps_mask
from v6lb.engines.python.steer import plan
from v6lb.model.config import load_config
from v6lb.wire.checksum import fill_l4_checksum, ones_sum, pseudo_header_sum

VIP = "2001:db8:f::80"
BACKENDS = ["2001:db8:b::10", "2001:db8:b::11"]


def _config(tmp_path: Path) -> Any:
    data = {
        "lb": {
            "instance": "loop",
            "flow_hash_seed": 7,
            "addresses": ["2001:db8:a::1"],
            "control_socket": str(tmp_path / "c.sock"),
        },
        "vips": [
            {
                "name": "u",
                "address": VIP,
                "ports": [53],
                "protocol": "udp",
                "mode": "nat",
                "health": {"type": "none"},
                "backends": [{"address": a} for a in BACKENDS],
            }
        ],
        "npt": [{"inside": "fd00:b::/48", "outside": "2001:db8:e::/48"}],
    }
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path), str(path)


def _udp(src: str, dst: str, sport: int, dport: int, hl: int, payload: bytes) -> bytearray:
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    pkt = bytearray(struct.pack("!IHBB", 0x60000000, len(udp), 17, hl) + s + d + udp)
    fill_l4_checksum(pkt, 40, 17)
    return pkt


class _Rig:
    """A runner whose ports are socket pairs: ``feed`` packets in, ``drain`` out."""

    def __init__(self, tmp_path: Path, kind: str, vnet: bool = False) -> None:
        config, path = _config(tmp_path)
        self.runner = PythonPlane(config, PlaneContext(path=path, log=lambda line: None))
        self.fwd = self.runner.forwarders[kind]
        self.ours: dict[int, socket.socket] = {}  # port -> the "kernel" end
        self.theirs: list[socket.socket] = []  # the loop's ends, kept open
        fds = {}
        for side in plan(config).sides:
            if side.kind != kind:
                continue
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            a.setblocking(False)
            b.setblocking(False)
            self.ours[side.port] = b
            fds[side.port] = a
            self.runner.ports.append(_Port(side, a.fileno(), self.fwd, self.runner._buf, vnet))
            self.theirs.append(a)
        for port in self.runner.ports:
            port.outs = (fds[PORT_OUTSIDE].fileno(), fds[PORT_INSIDE].fileno())

    def port(self, p: int) -> _Port:
        return next(x for x in self.runner.ports if x.side.port == p)

    def run(
        self, pkts: list[tuple[int, bytearray]], drain: Any, hdr: bytes = b""
    ) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        for in_port, pkt in pkts:
            self.ours[in_port].send(hdr + pkt)
            drain(self.port(in_port), 1000.0)
            for p in (PORT_OUTSIDE, PORT_INSIDE):
                try:
                    while True:
                        out.append((p, self.ours[p].recv(65536)))
                except BlockingIOError:
                    pass
        return out


def _verdicts(fwd: Any, pkts: list[tuple[int, bytearray]]) -> list[tuple[int, int, Any]]:
    out = []
    for in_port, pkt in pkts:
        buf = bytearray(pkt)
        if len(buf) >= 40 and buf[7] < 255:
            buf[7] += 1
        out.append(fwd.process(buf, in_port, 1000.0))
    return out


def _expected(fwd: Any, pkts: list[tuple[int, bytearray]]) -> list[tuple[int, bytes]]:
    return [(arg, bytes(d)) for a, arg, d in _verdicts(fwd, pkts) if a in (FORWARD, REPLY)]


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "offload"])
def test_npt_loop_equals_the_core(tmp_path: Path, vnet: bool) -> None:
    rng = random.Random(5)
    rig = _Rig(tmp_path, "npt", vnet)
    assert rig.fwd.first8_determines
    pkts: list[tuple[int, bytearray]] = []
    for _ in range(400):
        subnet = rng.choice([0, 1, 0xFFFF, 0x1234])
        host = rng.getrandbits(16)
        inside = f"fd00:b:0:{subnet:x}::{host:x}"
        outside = f"2001:db8:e:{subnet:x}::{host:x}"
        other = f"2001:db8:a::{rng.getrandbits(16):x}"
        hl = rng.choice([1, 2, 63, 254])
        data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 12, 40])))
        if rng.random() < 0.5:
            p = _udp(inside if rng.random() < 0.9 else other, other, 4000, 53, hl, data)
            pkts.append((PORT_INSIDE, p))
        else:
            p = _udp(other, outside if rng.random() < 0.9 else other, 53, 4000, hl, data)
            pkts.append((PORT_OUTSIDE, p))
        if rng.random() < 0.05:
            p[4:6] = (len(p) - 39).to_bytes(2, "big")  # a payload length that does not match
    reference = build_forwarders(rig.runner.config)["npt"]
    verdicts = _verdicts(reference, pkts)
    want = [(arg, bytes(d)) for a, arg, d in verdicts if a in (FORWARD, REPLY)]
    # With offloads a virtio-net header (here NEEDS_CSUM at the UDP checksum) comes
    # first; a forwarded packet leaves with the header it came with, an ICMPv6
    # error v6lb made with an all-zero one.
    hdr = bytes([1, 0]) + struct.pack("=HHHH", 0, 0, 40, 6) if vnet else b""
    got = rig.run(pkts, rig.runner._drain_npt, hdr)
    if vnet:
        replies = {bytes(d) for a, _, d in verdicts if a == REPLY}
        for _, frame in got:
            assert frame[:10] == (bytes(10) if frame[10:] in replies else hdr), frame[:10]
        got = [(p, frame[10:]) for p, frame in got]
    assert got == want
    assert sum(len(p.cache) for p in rig.runner.ports) > 0  # the cache was used
    assert rig.fwd.counters.snapshot() == reference.counters.snapshot()


def _partial(pkt: bytearray) -> bytearray:
    """The packet as the kernel hands it over with NEEDS_CSUM: the pseudo-header sum only."""
    out = bytearray(pkt)
    length = len(out) - 40
    out[46:48] = pseudo_header_sum(bytes(out[8:24]), bytes(out[24:40]), length, 17).to_bytes(
        2, "big"
    )
    return out


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "offload"])
def test_nat_loop_equals_the_core(tmp_path: Path, vnet: bool) -> None:
    """With offloads, half the packets come with NEEDS_CSUM; completed, all must match."""
    rng = random.Random(9)
    rig = _Rig(tmp_path, "nat", vnet)
    reference = build_forwarders(rig.runner.config)["nat"]
    clients = [f"2001:db8:c::{i}" for i in range(1, 9)]
    pkts: list[tuple[int, bytearray]] = []
    for _ in range(300):
        c = rng.choice(clients)
        sport = 5000 + clients.index(c)
        if rng.random() < 0.6:
            pkts.append((PORT_OUTSIDE, _udp(c, VIP, sport, 53, 64, b"q" * rng.choice([0, 20]))))
        else:
            # a reply from whichever backend: only the tracked one is translated
            b = rng.choice(BACKENDS)
            pkts.append((PORT_INSIDE, _udp(b, c, 53, sport, 64, b"a")))
    want = _expected(reference, pkts)
    if not vnet:
        got = rig.run(pkts, rig.runner._drain_nat)
    else:
        needs = bytes([1, 0]) + struct.pack("=HHHH", 0, 0, 40, 6)
        got = []
        for in_port, pkt in pkts:
            partial = rng.random() < 0.5
            frame = _partial(pkt) if partial else pkt
            for out, data in rig.run(
                [(in_port, frame)], rig.runner._drain_nat, needs if partial else bytes(10)
            ):
                out_pkt = bytearray(data[10:])
                if data[0] & 1:  # still partial: complete it as the kernel would
                    assert data[:10] == needs
                    # the sum over the UDP header and data, the field (pseudo-header
                    # sum) included, complemented; 0 goes out as 0xFFFF
                    ck = (-ones_sum(out_pkt[40:])) % 0xFFFF or 0xFFFF
                    out_pkt[46:48] = ck.to_bytes(2, "big")
                got.append((out, bytes(out_pkt)))
    assert got == want
    assert any(p == PORT_OUTSIDE for p, _ in got) and any(p == PORT_INSIDE for p, _ in got)
    assert rig.fwd.counters.snapshot() == reference.counters.snapshot()


def test_rps_mask() -> None:
    assert rps_mask({0, 1}) == "00000003"
    assert rps_mask({0, 33}) == "00000002,00000001"
