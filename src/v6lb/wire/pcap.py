"""Reading and writing captures: classic libpcap files, and pcapng for reading.

Why our own code and not a library: the classic format is a 24-byte file header
plus a 16-byte header per record, and pcapng's enhanced/simple packet blocks
are as small. Owning them keeps ``wire/`` free of I/O and of dependencies (the
functions take and return bytes; the engines open the files), and lets us write
nanosecond timestamps and raw-IPv6 link types exactly. scapy and tshark check
our output in the tests.

Link types handled: Ethernet (1), raw IP (101), IPv6 (229), Linux cooked
v1 (113) and v2 (276). :func:`ip_offset` tells where the IPv6 packet starts in
a frame, or -1 when the frame does not carry IPv6.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

LINKTYPE_ETHERNET: Final = 1
LINKTYPE_RAW: Final = 101
LINKTYPE_LINUX_SLL: Final = 113
LINKTYPE_IPV6: Final = 229
LINKTYPE_LINUX_SLL2: Final = 276

_MAGIC_US: Final = 0xA1B2C3D4
_MAGIC_NS: Final = 0xA1B23C4D
_PCAPNG_SHB: Final = 0x0A0D0D0A
_BYTE_ORDER_MAGIC: Final = 0x1A2B3C4D
_ETH_IPV6: Final = 0x86DD
_ETH_VLAN: Final = (0x8100, 0x88A8)


class PcapError(ValueError):
    """The file is not a capture we can read (the caller's input, named in the message)."""


@dataclass(slots=True)
class Record:
    """One captured frame: timestamp in nanoseconds, link type, frame bytes, original length."""

    ts_ns: int
    linktype: int
    data: bytes
    orig_len: int


def ip_offset(linktype: int, frame: bytes | bytearray | memoryview) -> int:
    """Offset of the IPv6 header inside ``frame``, or -1 if the frame is not IPv6."""
    n = len(frame)
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV6):
        return 0 if n >= 1 and frame[0] >> 4 == 6 else -1
    if linktype == LINKTYPE_ETHERNET:
        off = 12
        while off + 2 <= n:
            et = (frame[off] << 8) | frame[off + 1]
            if et in _ETH_VLAN:
                off += 4
                continue
            return off + 2 if et == _ETH_IPV6 and off + 2 < n else -1
        return -1
    if linktype == LINKTYPE_LINUX_SLL:
        return 16 if n > 16 and ((frame[14] << 8) | frame[15]) == _ETH_IPV6 else -1
    if linktype == LINKTYPE_LINUX_SLL2:
        return 20 if n > 20 and ((frame[0] << 8) | frame[1]) == _ETH_IPV6 else -1
    return -1


def _read_classic(data: bytes) -> Iterator[Record]:
    magic_le = struct.unpack_from("<I", data)[0]
    for endian in ("<", ">"):
        magic = struct.unpack_from(endian + "I", data)[0]
        if magic in (_MAGIC_US, _MAGIC_NS):
            break
    else:  # pragma: no cover - checked by the caller
        raise PcapError(f"not a pcap file (magic 0x{magic_le:08x})")
    nano = magic == _MAGIC_NS
    if len(data) < 24:
        raise PcapError("truncated pcap file header")
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0x0FFFFFFF
    off = 24
    rec = struct.Struct(endian + "IIII")
    while off + 16 <= len(data):
        sec, frac, incl, orig = rec.unpack_from(data, off)
        off += 16
        if off + incl > len(data):
            raise PcapError(f"truncated record at byte {off - 16}")
        ts = sec * 1_000_000_000 + (frac if nano else frac * 1000)
        yield Record(ts, linktype, data[off : off + incl], orig)
        off += incl


def _read_pcapng(data: bytes) -> Iterator[Record]:
    off = 0
    endian = "<"
    interfaces: list[tuple[int, int]] = []  # (linktype, ticks per second)
    n = len(data)
    while off + 12 <= n:
        btype = struct.unpack_from(endian + "I", data, off)[0]
        if btype == _PCAPNG_SHB:
            bom = data[off + 8 : off + 12]
            endian = "<" if struct.unpack_from("<I", bom)[0] == _BYTE_ORDER_MAGIC else ">"
            interfaces = []
        blen = struct.unpack_from(endian + "I", data, off + 4)[0]
        if blen < 12 or off + blen > n:
            raise PcapError(f"truncated pcapng block at byte {off}")
        body = data[off + 8 : off + blen - 4]
        if btype == 1:  # Interface Description Block
            linktype = struct.unpack_from(endian + "H", body)[0]
            tsres = 1_000_000
            opt = 8
            while opt + 4 <= len(body):
                code, olen = struct.unpack_from(endian + "HH", body, opt)
                if code == 0:
                    break
                if code == 9 and olen >= 1:  # if_tsresol
                    v = body[opt + 4]
                    tsres = 2 ** (v & 0x7F) if v & 0x80 else 10 ** (v & 0x7F)
                opt += 4 + ((olen + 3) & ~3)
            interfaces.append((linktype, tsres))
        elif btype == 6:  # Enhanced Packet Block
            ifid, hi, lo, cap, orig = struct.unpack_from(endian + "IIIII", body)
            if ifid >= len(interfaces):
                raise PcapError(f"packet block at byte {off} names unknown interface {ifid}")
            linktype, tsres = interfaces[ifid]
            ticks = (hi << 32) | lo
            yield Record(ticks * 1_000_000_000 // tsres, linktype, body[20 : 20 + cap], orig)
        elif btype == 3:  # Simple Packet Block
            if not interfaces:
                raise PcapError(f"simple packet block at byte {off} before any interface")
            orig = struct.unpack_from(endian + "I", body)[0]
            yield Record(0, interfaces[0][0], body[4 : 4 + min(orig, len(body) - 4)], orig)
        off += blen


def read(data: bytes) -> Iterator[Record]:
    """Iterate the records of a classic pcap or a pcapng capture held in ``data``."""
    if len(data) < 4:
        raise PcapError("not a capture file: too short")
    first = struct.unpack_from("<I", data)[0]
    if first == _PCAPNG_SHB:
        return _read_pcapng(data)
    for endian in ("<", ">"):
        if struct.unpack_from(endian + "I", data)[0] in (_MAGIC_US, _MAGIC_NS):
            return _read_classic(data)
    raise PcapError(f"not a pcap or pcapng file (first bytes {data[:4].hex()})")


def write(records: Iterable[Record], linktype: int | None = None, snaplen: int = 262144) -> bytes:
    """A classic pcap file, nanosecond resolution, of ``records`` (one link type per file)."""
    recs = list(records)
    lt = linktype if linktype is not None else (recs[0].linktype if recs else LINKTYPE_RAW)
    out = [struct.pack("<IHHiIII", _MAGIC_NS, 2, 4, 0, 0, snaplen, lt)]
    for r in recs:
        if r.linktype != lt:
            raise PcapError(f"record with link type {r.linktype} in a file of link type {lt}")
        sec, ns = divmod(r.ts_ns, 1_000_000_000)
        out.append(struct.pack("<IIII", sec, ns, len(r.data), max(r.orig_len, len(r.data))))
        out.append(bytes(r.data))
    return b"".join(out)


class PcapWriter:
    """Incremental writer: collect frames, then :meth:`getvalue` for the file bytes."""

    def __init__(self, linktype: int = LINKTYPE_RAW, snaplen: int = 262144) -> None:
        self.linktype = linktype
        self._parts = [struct.pack("<IHHiIII", _MAGIC_NS, 2, 4, 0, 0, snaplen, linktype)]
        self.count = 0

    def add(self, data: bytes | bytearray, ts_ns: int) -> None:
        sec, ns = divmod(ts_ns, 1_000_000_000)
        self._parts.append(struct.pack("<IIII", sec, ns, len(data), len(data)))
        self._parts.append(bytes(data))
        self.count += 1

    def getvalue(self) -> bytes:
        return b"".join(self._parts)
