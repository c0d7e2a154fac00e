"""`v6lb npt map` and `v6lb npt packet` from the command line."""

from __future__ import annotations

import io
import ipaddress
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap, wrpcap

from v6lb.cli import main
from v6lb.wire import build, pcap

IN, OUT = "fd01:203:405::/48", "2001:db8:1::/48"


def test_map_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "npt",
            "map",
            "--inside",
            IN,
            "--outside",
            OUT,
            "FD01:0203:0405:0001::1234",
            "fd01:203:405:ffff::1",
            "fd99::1",
            "bogus",
        ]
    )
    assert rc == 0
    assert capsys.readouterr().out.splitlines() == [
        "2001:db8:1:d550::1234",
        "drop: npt-no-mapping",
        "drop: no-match",
        "drop: not-an-ipv6-address (bogus)",
    ]


def test_map_reverse(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["npt", "map", "--inside", IN, "--outside", OUT, "--reverse", "2001:DB8:1:D550::1234"])
        == 0
    )
    assert capsys.readouterr().out == "fd01:203:405:1::1234\n"


def test_map_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("fd01:203:405:1::1234\n\nfd01:203:405:2::1\n"))
    assert main(["npt", "map", "--inside", IN, "--outside", OUT]) == 0
    assert capsys.readouterr().out == "2001:db8:1:d550::1234\n2001:db8:1:d551::1\n"


def test_map_100k_addresses_from_stdin() -> None:
    """The real console script on 100,000 lines; every line comes back, round trip exact."""
    lines = "".join(
        f"fd01:203:405:{i % 0xFFFF:x}::{i >> 16:x}:{i & 0xFFFF:x}\n" for i in range(100_000)
    )
    exe = Path(sys.executable).parent / "v6lb"
    out = subprocess.run(
        [str(exe), "npt", "map", "--inside", IN, "--outside", OUT],
        input=lines,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    mapped = out.stdout.splitlines()
    assert len(mapped) == 100_000
    back = subprocess.run(
        [str(exe), "npt", "map", "--inside", IN, "--outside", OUT, "--reverse"],
        input=out.stdout,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert back.stdout.splitlines() == [
        str(ipaddress.IPv6Address(line)) for line in lines.splitlines()
    ]


@pytest.mark.parametrize(
    ("inside", "message"),
    [
        ("fd01:203:405::1/48", "host bits set"),
        ("fd00::/80", "longer than /64"),
        ("192.0.2.0/24", "not an IPv6 prefix"),
        ("fd00::/129", "not an IPv6 prefix"),
    ],
)
def test_map_bad_prefix_exits_2(
    inside: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["npt", "map", "--inside", inside, "--outside", OUT, "fd00::1"]) == 2
    err = capsys.readouterr().err
    assert message in err and inside in err


def _capture(tmp_path: Path) -> Path:
    pkts = [
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IPv6(src="fd01:203:405:1::1234", dst="2001:db8:ffff::80")
        / TCP(sport=40000, dport=443, flags="S"),
        Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01")
        / IPv6(src="2001:db8:ffff::80", dst="2001:db8:1:d550::1234")
        / TCP(sport=443, dport=40000, flags="SA"),
        Ether()
        / IPv6(src="fd01:203:405:7::9", dst="2001:db8:ffff::53")
        / UDP(sport=5353, dport=53)
        / b"q",
        Ether()
        / IPv6(src="fd01:203:405:ffff::1", dst="2001:db8:ffff::53")
        / UDP(sport=1, dport=53),
        Ether(type=0x0800) / (b"\x45" + b"\x00" * 30),
    ]
    path = tmp_path / "in.pcap"
    wrpcap(str(path), pkts)
    return path


def test_packet_translates_a_capture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _capture(tmp_path)
    dst = tmp_path / "out.pcap"
    assert main(["npt", "packet", "--inside", IN, "--outside", OUT, str(src), str(dst)]) == 0
    err = capsys.readouterr().err
    assert "5 packets: 3 translated, 1 passed unchanged, dropped: npt-no-mapping 1" in err
    got = rdpcap(str(dst))
    assert len(got) == 4
    assert (got[0][IPv6].src, got[1][IPv6].dst, got[2][IPv6].src) == (
        "2001:db8:1:d550::1234",
        "fd01:203:405:1::1234",
        "2001:db8:1:d556::9",
    )
    for p in got[:3]:
        ck = p[IPv6].payload.chksum
        q = p.copy()
        q[IPv6].payload.chksum = None
        assert Ether(bytes(q))[IPv6].payload.chksum == ck


def test_packet_reads_pcapng_and_raw(tmp_path: Path) -> None:
    raw = [build.udp("fd01:203:405:1::1", "2001:db8::9", 1, 2, b"x")]
    path = tmp_path / "raw.pcap"
    path.write_bytes(
        pcap.write([pcap.Record(5_000_000_123, pcap.LINKTYPE_RAW, bytes(p), len(p)) for p in raw])
    )
    out = tmp_path / "o.pcap"
    assert main(["npt", "packet", "--inside", IN, "--outside", OUT, str(path), str(out)]) == 0
    recs = list(pcap.read(out.read_bytes()))
    assert (
        len(recs) == 1 and recs[0].ts_ns == 5_000_000_123 and recs[0].linktype == pcap.LINKTYPE_RAW
    )
    assert build.ntop(recs[0].data[8:24]) == "2001:db8:1:d550::1"


def test_packet_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "npt",
                "packet",
                "--inside",
                IN,
                "--outside",
                OUT,
                str(tmp_path / "nope.pcap"),
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "no such capture file" in capsys.readouterr().err
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"hello world, not a pcap")
    assert (
        main(["npt", "packet", "--inside", IN, "--outside", OUT, str(junk), str(tmp_path / "o")])
        == 2
    )
    assert "not a pcap or pcapng file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.tool
def test_tshark_reads_our_pcap_with_valid_checksums(tmp_path: Path) -> None:
    tshark = shutil.which("tshark")
    assert tshark, "tshark is required (make test installs it as root: apt-get install tshark)"
    src = _capture(tmp_path)
    dst = tmp_path / "out.pcap"
    assert main(["npt", "packet", "--inside", IN, "--outside", OUT, str(src), str(dst)]) == 0
    res = subprocess.run(
        [
            tshark,
            "-r",
            str(dst),
            "-o",
            "tcp.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-T",
            "fields",
            "-e",
            "ipv6.src",
            "-e",
            "ipv6.dst",
            "-e",
            "tcp.checksum.status",
            "-e",
            "udp.checksum.status",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = [line.split("\t") for line in res.stdout.splitlines()]
    assert rows[0][:2] == ["2001:db8:1:d550::1234", "2001:db8:ffff::80"]
    assert rows[1][:2] == ["2001:db8:ffff::80", "fd01:203:405:1::1234"]
    statuses = [r[2] or r[3] for r in rows[:3]]
    assert statuses == ["1", "1", "1"]  # 1 = Good (0 Bad, 2 Unverified)
