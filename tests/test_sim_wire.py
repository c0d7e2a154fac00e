"""Every packet the simulator puts on a link is valid: scapy re-dissects it, checksums hold, tshark agrees."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet6 import IPv6
from scapy.packet import NoPayload, Packet, Raw

from v6lb.engines.sim import FAILURES, MODES, ScenarioResult, run_scenario
from v6lb.model.config import load_topology
from v6lb.wire import pcap

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "eks-ipv6.yaml"
RUNS = [(m, None) for m in MODES] + [
    ("nat", "backend-dies"),
    ("anycast", "lb-instance-dies"),
    ("dsr-ip6ip6", "packet-too-big"),
    ("dsr-srv6", "packet-too-big"),
]
assert {f for _, f in RUNS} == set(FAILURES)


@pytest.fixture(scope="module")
def runs() -> list[ScenarioResult]:
    config, topo = load_topology(EXAMPLE)
    return [run_scenario(config, topo, m, failure=f) for m, f in RUNS]


def _layers(pkt: Packet) -> list[Packet]:
    out = []
    layer: Packet = pkt
    while not isinstance(layer, NoPayload | Raw):
        out.append(layer)
        # The quote inside an ICMPv6 error is cut to 1280 bytes; its own checksums can't hold.
        if "error" in type(layer).__name__.lower():
            break
        layer = layer.payload
    return out


def check_packet(data: bytes) -> list[str]:
    """Problems scapy finds in ``data``: bytes not reproduced, or a checksum that is wrong."""
    pkt = IPv6(data)
    problems = []
    if bytes(pkt) != data:
        problems.append("scapy does not rebuild the same bytes")
    layers = _layers(pkt)
    for i, layer in enumerate(layers):
        if type(layer).__name__ == "IPv6" or "chksum" not in layer.fields:
            continue
        clone = IPv6(data)
        target = _layers(clone)[i]
        target.chksum = None
        again = _layers(IPv6(bytes(clone)))[i]
        if again.chksum != layer.chksum:
            problems.append(
                f"{type(layer).__name__} checksum 0x{layer.chksum:04x}, expected 0x{again.chksum:04x}"
            )
    return problems


def test_every_hop_is_valid_per_scapy(runs: list[ScenarioResult]) -> None:
    checked = 0
    for r in runs:
        for h in r.hops:
            assert check_packet(h.data) == [], (
                f"{r.mode} hop {h.seq} on {h.link}: {h.pkt.summary()}"
            )
            checked += 1
    assert checked > 500


def test_the_checker_catches_a_bad_checksum(runs: list[ScenarioResult]) -> None:
    data = bytearray(runs[0].hops[0].data)
    data[-1] ^= 0xFF  # TCP options/payload byte changed, checksum not
    data[57] ^= 0x01  # the TCP checksum's low byte
    assert any("checksum" in p for p in check_packet(bytes(data)))


def test_pcaps_hold_exactly_the_hops_of_each_link(runs: list[ScenarioResult]) -> None:
    for r in runs:
        for link, blob in r.pcaps.items():
            records = list(pcap.read(blob))
            sent = [h for h in r.hops if h.link == link and h.dropped is None]
            assert [rec.data for rec in records] == [h.data for h in sent]
            assert all(rec.linktype == pcap.LINKTYPE_RAW for rec in records)
            assert [rec.ts_ns for rec in records] == [round(h.time * 1e9) for h in sent]


@pytest.mark.tool
def test_tshark_reads_the_pcaps_without_complaint(
    runs: list[ScenarioResult], tmp_path: Path
) -> None:
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed (apt-get install tshark)")
    # One file with every link of every run keeps this to one tshark start.
    records = [rec for r in runs for blob in r.pcaps.values() for rec in pcap.read(blob)]
    path = tmp_path / "all.pcap"
    path.write_bytes(pcap.write(records, pcap.LINKTYPE_RAW))
    out = subprocess.run(
        [
            tshark,
            "-n",
            "-r",
            str(path),
            "-o",
            "tcp.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-T",
            "fields",
            "-e",
            "frame.number",
            "-e",
            "_ws.expert.severity",
            "-e",
            "_ws.malformed",
            # An ICMPv6 error quotes the invoking packet cut to 1280 bytes (RFC 4443
            # §2.4 c), so the quoted TCP checksum cannot hold: for those frames only
            # the ICMPv6 checksum and malformation count.
            "-Y",
            "_ws.malformed || icmpv6.checksum.status == 0 || (!icmpv6 && ("
            "_ws.expert.severity >= 8388608 || tcp.checksum.status == 0"
            " || udp.checksum.status == 0))",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", out.stdout[:2000]
    count = subprocess.run(
        [tshark, "-n", "-r", str(path), "-T", "fields", "-e", "frame.number"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert len(count.stdout.split()) == len(records)
