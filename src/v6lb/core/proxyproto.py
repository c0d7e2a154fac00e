"""The PROXY protocol, version 2: how a TCP proxy tells the backend who the client is.

The header is binary and precedes the proxied stream (haproxy's
``doc/proxy-protocol.txt``, section 2.2):

- 12 bytes of signature ``\\r\\n\\r\\n\\0\\r\\nQUIT\\n``;
- one byte: version 2 in the high nibble, the command in the low one
  (0 ``LOCAL``: a connection of the proxy itself, e.g. a health check;
  1 ``PROXY``: a relayed connection);
- one byte: address family (high nibble: 0 unspecified, 1 IPv4, 2 IPv6,
  3 Unix) and transport (low nibble: 0 unspecified, 1 stream, 2 datagram),
  so TCP over IPv6 is 0x21 and TCP over IPv4 0x11;
- two bytes, big endian: the length of everything that follows;
- the addresses: IPv4 12 bytes (src, dst, sport, dport), IPv6 36 bytes,
  Unix 216 bytes (two 108-byte paths);
- TLVs (type, 16-bit length, value) to the end.

Pure and sans-IO: :func:`encode` returns bytes and :func:`decode` takes what has
arrived so far, returning ``None`` until the whole header is there (h11's
NEED_DATA). A malformed header raises :class:`ProxyProtocolError`: it is the
peer's fault, and a receiver must close the connection (section 2.2: "the
receiver MUST ... not try to guess").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Final

__all__ = [
    "SIGNATURE",
    "Command",
    "Family",
    "ProxyHeader",
    "ProxyProtocolError",
    "Transport",
    "Tlv",
    "crc32c",
    "decode",
    "detect",
    "encode",
    "encode_local",
    "encode_proxy",
]

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_LEN: Final = 16  # signature, version/command, family/transport, length
MAX_LEN: Final = HEADER_LEN + 0xFFFF
_FIXED: Final = struct.Struct("!12sBBH")
_UNIX_PATH: Final = 108


class Command(IntEnum):
    LOCAL = 0x0
    PROXY = 0x1


class Family(IntEnum):
    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(IntEnum):
    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


class Tlv(IntEnum):
    """Registered TLV types (section 2.2.7)."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    NETNS = 0x30


_ADDR_LEN: Final = {Family.UNSPEC: 0, Family.INET: 12, Family.INET6: 36, Family.UNIX: 216}


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY v2 header (the sender's fault)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A decoded header. Addresses are None for LOCAL, UNSPEC, or when not given.

    For ``Family.UNIX`` the addresses are the socket paths (``str``) and the
    ports are 0.
    """

    command: Command
    family: Family = Family.UNSPEC
    transport: Transport = Transport.UNSPEC
    src: IPv4Address | IPv6Address | str | None = None
    dst: IPv4Address | IPv6Address | str | None = None
    src_port: int = 0
    dst_port: int = 0
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def is_local(self) -> bool:
        return self.command is Command.LOCAL

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of type ``kind``, or None."""
        for t, v in self.tlvs:
            if t == kind:
                return v
        return None


# --- CRC32C (Castagnoli), for the optional checksum TLV -----------------------


def _crc_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # reversed 0x1EDC6F41
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE: Final = _crc_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (RFC 3720 §B.4) of ``data``; ``crc32c(b"123456789") == 0xE3069283``."""
    c = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


# --- encoding ----------------------------------------------------------------------


def _tlv_bytes(tlvs: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF:
            raise ValueError(f"a TLV type is one byte, not {kind}")
        if len(value) > 0xFFFF:
            raise ValueError("a TLV value is at most 65535 bytes")
        out += struct.pack("!BH", kind, len(value)) + value
    return bytes(out)


def _unix_path(path: str) -> bytes:
    raw = path.encode()
    if len(raw) > _UNIX_PATH:
        raise ValueError(f"a Unix socket path is at most {_UNIX_PATH} bytes")
    return raw.ljust(_UNIX_PATH, b"\x00")


def encode(header: ProxyHeader, *, checksum: bool = False) -> bytes:
    """The wire form of ``header``; with ``checksum`` a CRC32C TLV is appended (section 2.2.5)."""
    fam = header.family
    if header.command is Command.LOCAL and fam is Family.UNSPEC:
        addr = b""
    elif fam is Family.INET6:
        if not isinstance(header.src, IPv6Address) or not isinstance(header.dst, IPv6Address):
            raise ValueError("family INET6 needs two IPv6 addresses")
        addr = header.src.packed + header.dst.packed
        addr += struct.pack("!HH", header.src_port, header.dst_port)
    elif fam is Family.INET:
        if not isinstance(header.src, IPv4Address) or not isinstance(header.dst, IPv4Address):
            raise ValueError("family INET needs two IPv4 addresses")
        addr = header.src.packed + header.dst.packed
        addr += struct.pack("!HH", header.src_port, header.dst_port)
    elif fam is Family.UNIX:
        if not isinstance(header.src, str) or not isinstance(header.dst, str):
            raise ValueError("family UNIX needs two socket paths")
        addr = _unix_path(header.src) + _unix_path(header.dst)
    else:
        addr = b""
    for port in (header.src_port, header.dst_port):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is out of range")
    tlvs = _tlv_bytes(header.tlvs)
    crc_at = -1
    if checksum:
        crc_at = HEADER_LEN + len(addr) + len(tlvs) + 3
        tlvs += struct.pack("!BH", Tlv.CRC32C, 4) + bytes(4)
    body = addr + tlvs
    if len(body) > 0xFFFF:
        raise ValueError("a PROXY v2 header carries at most 65535 bytes after its first 16")
    out = bytearray(
        _FIXED.pack(
            SIGNATURE,
            0x20 | int(header.command),
            (int(fam) << 4) | int(header.transport),
            len(body),
        )
    )
    out += body
    if crc_at >= 0:
        out[crc_at : crc_at + 4] = crc32c(out).to_bytes(4, "big")
    return bytes(out)


def encode_proxy(
    src: str | IPv4Address | IPv6Address,
    dst: str | IPv4Address | IPv6Address,
    src_port: int,
    dst_port: int,
    *,
    transport: str = "tcp",
    tlvs: tuple[tuple[int, bytes], ...] = (),
    checksum: bool = False,
) -> bytes:
    """A PROXY command for a relayed connection; the family follows the addresses."""
    s = ip_address(src) if isinstance(src, str) else src
    d = ip_address(dst) if isinstance(dst, str) else dst
    if s.version != d.version:
        raise ValueError("source and destination must both be IPv6 or both IPv4")
    kinds = {"tcp": Transport.STREAM, "udp": Transport.DGRAM}
    if transport not in kinds:
        raise ValueError(f"transport is tcp or udp, not {transport!r}")
    fam = Family.INET6 if s.version == 6 else Family.INET
    return encode(
        ProxyHeader(Command.PROXY, fam, kinds[transport], s, d, src_port, dst_port, tlvs),
        checksum=checksum,
    )


def encode_local(tlvs: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """A LOCAL command: the connection is the proxy's own (a health check); no addresses."""
    return encode(ProxyHeader(Command.LOCAL, tlvs=tlvs))


# --- decoding ----------------------------------------------------------------------


def detect(data: bytes | bytearray | memoryview) -> bool | None:
    """Does the stream start with a PROXY v2 signature? None: too few bytes to tell."""
    head = bytes(data[: len(SIGNATURE)])
    if not SIGNATURE.startswith(head):
        return False
    return True if len(head) == len(SIGNATURE) else None


def decode(data: bytes | bytearray | memoryview) -> tuple[ProxyHeader, int] | None:
    """Decode the header at the start of ``data``: (header, bytes consumed), or None for more data.

    Raises :class:`ProxyProtocolError` on anything malformed: a wrong
    signature or version, an unknown command, family or transport, addresses
    shorter than the family needs, a TLV running past the end, or a CRC32C
    TLV that does not match.
    """
    buf = bytes(data[:MAX_LEN])
    found = detect(buf)
    if found is None:
        return None
    if not found:
        raise ProxyProtocolError("the stream does not start with the PROXY v2 signature")
    if len(buf) < HEADER_LEN:
        return None
    _, ver_cmd, fam_tr, length = _FIXED.unpack_from(buf)
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"version {ver_cmd >> 4} is not 2")
    total = HEADER_LEN + length
    if len(buf) < total:
        return None
    try:
        cmd = Command(ver_cmd & 0x0F)
        fam = Family(fam_tr >> 4)
        tr = Transport(fam_tr & 0x0F)
    except ValueError as exc:
        raise ProxyProtocolError(f"unknown command, family or transport: {exc}") from None
    body = buf[HEADER_LEN:total]
    need = _ADDR_LEN[fam]
    if len(body) < need:
        raise ProxyProtocolError(
            f"family {fam.name} needs {need} address bytes, the header has {len(body)}"
        )
    src: IPv4Address | IPv6Address | str | None = None
    dst: IPv4Address | IPv6Address | str | None = None
    sport = dport = 0
    if fam is Family.INET6:
        src, dst = IPv6Address(body[:16]), IPv6Address(body[16:32])
        sport, dport = struct.unpack_from("!HH", body, 32)
    elif fam is Family.INET:
        src, dst = IPv4Address(body[:4]), IPv4Address(body[4:8])
        sport, dport = struct.unpack_from("!HH", body, 8)
    elif fam is Family.UNIX:
        src = body[:_UNIX_PATH].split(b"\x00", 1)[0].decode(errors="replace")
        dst = body[_UNIX_PATH:216].split(b"\x00", 1)[0].decode(errors="replace")
    tlvs: list[tuple[int, bytes]] = []
    off = need
    while off < len(body):
        if off + 3 > len(body):
            raise ProxyProtocolError(f"a TLV header at byte {HEADER_LEN + off} is cut short")
        kind, tlen = struct.unpack_from("!BH", body, off)
        if off + 3 + tlen > len(body):
            raise ProxyProtocolError(f"TLV type 0x{kind:02x} runs past the end of the header")
        value = body[off + 3 : off + 3 + tlen]
        if kind == Tlv.CRC32C:
            if tlen != 4:
                raise ProxyProtocolError("the CRC32C TLV is not 4 bytes")
            at = HEADER_LEN + off + 3
            zeroed = buf[:at] + bytes(4) + buf[at + 4 : total]
            if crc32c(zeroed) != int.from_bytes(value, "big"):
                raise ProxyProtocolError("the CRC32C TLV does not match the header")
        tlvs.append((kind, value))
        off += 3 + tlen
    if cmd is Command.LOCAL:
        # Section 2.2: the receiver must ignore the address information of LOCAL.
        src = dst = None
        sport = dport = 0
    return ProxyHeader(cmd, fam, tr, src, dst, sport, dport, tuple(tlvs)), total
