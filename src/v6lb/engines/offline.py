"""Offline translation of captures: read a pcap/pcapng, run a forwarder, write a pcap.

This is how a user checks their own captures against v6lb's core. File I/O
lives here (an engine); the core and the wire codec only see bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from v6lb.core.nptv6 import NptForwarder, NptMapping
from v6lb.core.verdict import FORWARD, PORT_INSIDE, PORT_OUTSIDE
from v6lb.wire import pcap
from v6lb.wire.constants import OFF_DST, OFF_SRC
from v6lb.wire.reasons import Reason


@dataclass
class CaptureStats:
    packets: int = 0
    translated: int = 0
    passed: int = 0  # not IPv6, or matching neither prefix: written unchanged
    dropped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (
            f"{self.packets} packets: {self.translated} translated, {self.passed} passed unchanged, "
            f"dropped: {drops}"
        )


def translate_capture(
    data: bytes, mapping: NptMapping, direction: str = "auto"
) -> tuple[bytes, CaptureStats]:
    """Translate every IPv6 packet of a capture through NPTv6; return the new pcap and stats.

    ``direction``: ``out`` translates sources in the inside prefix, ``in``
    translates destinations in the outside prefix, ``auto`` picks per packet.
    The hop limit is left alone: this checks translations, it routes nothing.
    Packets the RFC drops are left out of the output and counted.
    """
    fwd = NptForwarder(
        [mapping], bytes(16), decrement_hop_limit=False, icmp_rate=0.0, icmp_burst=0.0
    )
    stats = CaptureStats()
    out: list[pcap.Record] = []
    linktype: int | None = None
    for rec in pcap.read(data):
        stats.packets += 1
        if linktype is None:
            linktype = rec.linktype
        off = pcap.ip_offset(rec.linktype, rec.data)
        if off < 0 or len(rec.data) < off + 40:
            stats.passed += 1
            out.append(rec)
            continue
        frame = rec.data
        plen = (frame[off + 4] << 8) | frame[off + 5]
        end = min(len(frame), off + 40 + plen)
        pkt = bytearray(frame[off:end])
        port = -1
        if direction in ("out", "auto") and mapping.matches_inside(pkt, OFF_SRC):
            port = PORT_INSIDE
        elif direction in ("in", "auto") and mapping.matches_outside(pkt, OFF_DST):
            port = PORT_OUTSIDE
        if port < 0:
            stats.passed += 1
            out.append(rec)
            continue
        action, arg, _ = fwd.process(pkt, port, rec.ts_ns / 1e9)
        if action != FORWARD:
            # The ICMPv6 rate limit is zero here, so a drop is always (DROP, reason).
            label = Reason(arg).label
            stats.dropped[label] = stats.dropped.get(label, 0) + 1
            continue
        stats.translated += 1
        out.append(
            pcap.Record(
                rec.ts_ns,
                rec.linktype,
                bytes(frame[:off]) + bytes(pkt) + bytes(frame[end:]),
                rec.orig_len,
            )
        )
    return pcap.write(out, linktype if linktype is not None else pcap.LINKTYPE_RAW), stats


def translate_file(
    src: Path, dst: Path, mapping: NptMapping, direction: str = "auto"
) -> CaptureStats:
    data, stats = translate_capture(src.read_bytes(), mapping, direction)
    dst.write_bytes(data)
    return stats
