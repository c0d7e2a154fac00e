"""The TLS ClientHello, read without terminating TLS (SNI routing, passthrough).

Sans-IO: :func:`parse_client_hello` takes the bytes a client sent so far and
returns ``None`` (more bytes are needed), a :class:`ClientHello` (its SNI and ALPN),
or raises :class:`HelloError` (not a ClientHello, or a malformed one), whose
``reason`` is a short word a proxy counts. Nothing else is ever raised: every
length is checked against what is there before it is used.

Rules applied:
- The stream starts with handshake records (content type 22, RFC 8446 §5.1) whose
  legacy version is 3.x; each holds 1 to 2^14 bytes (an empty handshake fragment
  is forbidden, §5.1). Their payloads are joined (a ClientHello may span several
  records, and a record may be cut across reads); any other record type before the
  ClientHello is whole is refused.
- The first handshake message must be a ClientHello (type 1, §4). Its size is
  bounded by ``limit`` (:data:`MAX_HELLO`, 16 KiB by default): a larger one is
  refused rather than buffered.
- Fields (§4.1.2): legacy version, random, session id (at most 32 bytes), cipher
  suites (an even, non-zero length), compression methods (at least one), then
  extensions (optional before TLS 1.3, RFC 5246 §7.4.1.2), which must fill the
  message exactly; an extension type may not repeat (RFC 8446 §4.2).
- ``server_name`` (RFC 6066 §3): the first ``host_name`` entry; a name that is not
  a DNS host name (letters, digits, ``-``, ``_``, ``.``; 1 to 255 bytes) is refused.
  The name is lowercased and loses a trailing dot. ``application_layer_protocol_
  negotiation`` (RFC 7301 §3.1): a list of non-empty names.
- ECH (``encrypted_client_hello``, draft-ietf-tls-esni): the outer ClientHello's
  SNI (the public name) is what a passthrough proxy sees and routes on;
  ``ech`` says the extension was there. GREASE values (RFC 8701) are unknown
  extensions and cipher suites, and are skipped like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "EXT_ALPN",
    "EXT_ECH",
    "EXT_SERVER_NAME",
    "MAX_HELLO",
    "ClientHello",
    "HelloError",
    "parse_client_hello",
]

MAX_HELLO: Final = 16384  # the largest ClientHello accepted (handshake message bytes)

_HANDSHAKE: Final = 22  # content type of handshake records
_CLIENT_HELLO: Final = 1
_MAX_RECORD: Final = 1 << 14  # TLSPlaintext.length (RFC 8446 §5.1)
EXT_SERVER_NAME: Final = 0
EXT_ALPN: Final = 16
EXT_ECH: Final = 0xFE0D
_HOST_CHARS: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class HelloError(ValueError):
    """The bytes are not a (valid) TLS ClientHello: the client's fault, to count.

    ``reason``: ``not_tls`` (the first bytes are no TLS handshake record),
    ``malformed`` (a record or field is inconsistent), ``too_big`` (over the limit),
    ``bad_sni`` (a server name that is not a host name).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a router needs from a ClientHello. ``size``: the stream bytes it took
    (its records, headers included), which the proxy replays to the backend with the
    rest."""

    sni: str | None
    alpn: tuple[str, ...]
    ech: bool
    size: int


def _records(data: bytes | bytearray | memoryview, limit: int) -> tuple[bytes, int]:
    """The handshake bytes of the leading records, and the stream bytes they took.

    The handshake bytes may stop short of the message (more records are due).
    """
    view = memoryview(data)
    n = len(view)
    if n and view[0] != _HANDSHAKE:
        raise HelloError("not_tls", f"first byte {view[0]:#04x} is no handshake record")
    if n >= 2 and view[1] != 3:
        raise HelloError("not_tls", f"record version major {view[1]} is not 3")
    out = bytearray()
    at = 0
    want = -1  # the ClientHello's whole size (header included), once known
    while at + 5 <= n:
        if view[at] != _HANDSHAKE:
            raise HelloError("malformed", f"record type {view[at]} inside the ClientHello")
        if view[at + 1] != 3:
            raise HelloError("malformed", "a record's version major is not 3")
        length = (view[at + 3] << 8) | view[at + 4]
        if length == 0 or length > _MAX_RECORD:
            raise HelloError("malformed", f"a handshake record of {length} bytes")
        body = view[at + 5 : at + 5 + length]
        out += body
        if len(body) < length:  # the record is cut: what came so far
            return bytes(out), n
        at += 5 + length
        if want < 0 and len(out) >= 4:
            if out[0] != _CLIENT_HELLO:
                raise HelloError("not_tls", f"handshake type {out[0]} is not a ClientHello")
            want = 4 + ((out[1] << 16) | (out[2] << 8) | out[3])
            if want - 4 > limit:
                raise HelloError("too_big", f"a ClientHello of {want - 4} bytes")
        if want >= 0 and len(out) >= want:
            return bytes(out), at
        if len(out) > limit + 4:
            raise HelloError("too_big", "the ClientHello's records pass the limit")
    if at < n and n - at < 5 and view[at] != _HANDSHAKE:
        raise HelloError("malformed", f"record type {view[at]} inside the ClientHello")
    return bytes(out), at


def parse_client_hello(
    data: bytes | bytearray | memoryview, limit: int = MAX_HELLO
) -> ClientHello | None:
    """The ClientHello at the start of ``data``; None while it is incomplete.

    Raises :class:`HelloError` (only) for bytes that are not a valid ClientHello.
    """
    hs, used = _records(data, limit)
    if len(hs) < 4:
        return None
    if hs[0] != _CLIENT_HELLO:
        raise HelloError("not_tls", f"handshake type {hs[0]} is not a ClientHello")
    size = (hs[1] << 16) | (hs[2] << 8) | hs[3]
    if size > limit:
        raise HelloError("too_big", f"a ClientHello of {size} bytes")
    if len(hs) < 4 + size:
        return None
    if len(hs) > 4 + size:
        # a record holding more than the ClientHello: the rest is another message,
        # which a client may not send before the server's answer
        raise HelloError("malformed", "bytes after the ClientHello in its record")
    sni, alpn, ech = _fields(memoryview(hs)[4:])
    return ClientHello(sni, alpn, ech, used)


class _Cursor:
    """Reads over a memoryview; reading past the end raises ``HelloError("malformed")``."""

    __slots__ = ("v", "at", "end")

    def __init__(self, v: memoryview) -> None:
        self.v = v
        self.at = 0
        self.end = len(v)

    def take(self, n: int, what: str) -> memoryview:
        if self.at + n > self.end:
            raise HelloError("malformed", f"{what} runs past the end")
        out = self.v[self.at : self.at + n]
        self.at += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        b = self.take(2, what)
        return (b[0] << 8) | b[1]

    def left(self) -> int:
        return self.end - self.at


def _fields(body: memoryview) -> tuple[str | None, tuple[str, ...], bool]:
    c = _Cursor(body)
    if c.u8("legacy_version") != 3:
        raise HelloError("malformed", "the ClientHello's version major is not 3")
    c.take(1 + 32, "random")
    sid = c.u8("session id length")
    if sid > 32:
        raise HelloError("malformed", f"a session id of {sid} bytes")
    c.take(sid, "session id")
    suites = c.u16("cipher suites length")
    if suites == 0 or suites % 2:
        raise HelloError("malformed", f"cipher suites of {suites} bytes")
    c.take(suites, "cipher suites")
    comp = c.u8("compression methods length")
    if comp == 0:
        raise HelloError("malformed", "no compression method")
    c.take(comp, "compression methods")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    ech = False
    if not c.left():  # no extensions (TLS 1.2 and older)
        return sni, alpn, ech
    total = c.u16("extensions length")
    if total != c.left():
        raise HelloError("malformed", "the extensions do not fill the ClientHello")
    seen: set[int] = set()
    while c.left():
        kind = c.u16("extension type")
        data = _Cursor(c.take(c.u16("extension length"), "an extension"))
        if kind in seen:
            raise HelloError("malformed", f"extension {kind} twice")
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            sni = _server_name(data)
        elif kind == EXT_ALPN:
            alpn = _alpn(data)
        elif kind == EXT_ECH:
            ech = True
    return sni, alpn, ech


def _server_name(c: _Cursor) -> str | None:
    """RFC 6066 §3: ServerNameList; the first host_name (type 0) entry."""
    if not c.left():  # a server's empty extension; a client's is malformed but harmless
        return None
    n = c.u16("server name list length")
    if n != c.left() or n == 0:
        raise HelloError("malformed", "the server name list does not fill its extension")
    found: str | None = None
    while c.left():
        kind = c.u8("server name type")
        name = c.take(c.u16("server name length"), "a server name")
        if kind != 0 or found is not None:
            continue
        raw = bytes(name)
        if not raw or len(raw) > 255 or not _HOST_CHARS.issuperset(raw):
            raise HelloError("bad_sni", f"server name {raw[:64]!r} is not a host name")
        found = raw.decode("ascii").lower().rstrip(".")
        if not found:
            raise HelloError("bad_sni", "an empty server name")
    return found


def _alpn(c: _Cursor) -> tuple[str, ...]:
    """RFC 7301 §3.1: ProtocolNameList, each name 1 to 255 bytes."""
    n = c.u16("ALPN list length")
    if n != c.left() or n < 2:
        raise HelloError("malformed", "the ALPN list does not fill its extension")
    out: list[str] = []
    while c.left():
        size = c.u8("ALPN name length")
        if not size:
            raise HelloError("malformed", "an empty ALPN name")
        out.append(bytes(c.take(size, "an ALPN name")).decode("latin-1"))
    return tuple(out)
