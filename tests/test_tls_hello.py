"""The sans-IO ClientHello parser (wire/tlshello.py): real hellos from the ssl module,
hand-built ones (ECH, GREASE, no SNI, broken fields), any record split, and fuzzing."""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from v6lb.wire.tlshello import (
    EXT_ALPN,
    EXT_ECH,
    EXT_SERVER_NAME,
    MAX_HELLO,
    ClientHello,
    HelloError,
    parse_client_hello,
)


def real_hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of Python's own TLS client (OpenSSL): one record, one ClientHello."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def ext(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def sni_ext(*names: bytes, kind: int = 0) -> bytes:
    entries = b"".join(struct.pack("!BH", kind, len(n)) + n for n in names)
    return ext(EXT_SERVER_NAME, struct.pack("!H", len(entries)) + entries)


def alpn_ext(*names: bytes) -> bytes:
    items = b"".join(bytes([len(n)]) + n for n in names)
    return ext(EXT_ALPN, struct.pack("!H", len(items)) + items)


def hello_msg(exts: bytes | None, suites: bytes = b"\x13\x01\x0a\x0a", sid: bytes = b"") -> bytes:
    """A ClientHello handshake message (RFC 8446 §4.1.2); ``exts`` None: no extensions."""
    body = b"\x03\x03" + bytes(32) + bytes([len(sid)]) + sid
    body += struct.pack("!H", len(suites)) + suites + b"\x01\x00"
    if exts is not None:
        body += struct.pack("!H", len(exts)) + exts
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(msg: bytes, sizes: list[int] | None = None, kind: int = 22) -> bytes:
    """``msg`` in handshake records of the given sizes (the last takes the rest)."""
    out = b""
    at = 0
    for size in sizes or []:
        part = msg[at : at + size]
        if not part:
            break
        out += struct.pack("!BHH", kind, 0x0301, len(part)) + part
        at += size
    if at < len(msg):
        out += struct.pack("!BHH", kind, 0x0301, len(msg) - at) + msg[at:]
    return out


def test_real_hellos_sni_alpn_and_every_prefix_waits() -> None:
    data = real_hello("Api.Example.com.", ["h2", "http/1.1"])
    got = parse_client_hello(data)
    assert got == ClientHello("api.example.com", ("h2", "http/1.1"), False, len(data))
    for n in range(len(data)):
        assert parse_client_hello(data[:n]) is None
    # what follows the hello (early data, the next flight) is not the parser's
    assert parse_client_hello(data + b"\x17\x03\x03\x00\x05hello") == got
    no_sni = real_hello(None)
    assert parse_client_hello(no_sni) == ClientHello(None, (), False, len(no_sni))


def test_a_hello_spanning_records_cut_anywhere() -> None:
    msg = real_hello("a.example.com")[5:]  # the handshake message without its record
    data = records(msg, [1, 3, 7, 40, 100])
    got = parse_client_hello(data)
    assert got is not None and got.sni == "a.example.com" and got.size == len(data)
    for n in range(len(data)):
        assert parse_client_hello(data[:n]) is None


def test_ech_grease_and_hand_built_fields() -> None:
    grease = ext(0x1A1A, b"") + ext(0x4A4A, b"\x00")
    exts = grease + sni_ext(b"public.example.net") + ext(EXT_ECH, b"\x00" * 40) + alpn_ext(b"h2")
    got = parse_client_hello(records(hello_msg(exts)))
    assert got is not None and (got.sni, got.alpn, got.ech) == ("public.example.net", ("h2",), True)
    # TLS 1.2 without extensions; an SNI list whose first entry is not a host name
    old = records(hello_msg(None))
    assert parse_client_hello(old) == ClientHello(None, (), False, len(old))
    got = parse_client_hello(records(hello_msg(sni_ext(b"x", b"b.example", kind=7))))
    assert got is not None and got.sni is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "not_tls"),
        (b"\x16\x02", "not_tls"),  # record version major 2
        (b"\x80\x2e\x01\x03\x01", "not_tls"),  # an SSLv2-style hello
        (records(b"\x02\x00\x00\x00"), "not_tls"),  # a ServerHello
        (b"\x16\x03\x01\x00\x00", "malformed"),  # an empty handshake record
        (b"\x16\x03\x01\x50\x00", "malformed"),  # a record over 2^14 bytes
        (records(hello_msg(b""), [20])[:25] + b"\x15\x03\x03\x00\x02\x02\x28", "malformed"),
        (records(hello_msg(b"", sid=bytes(33))), "malformed"),
        (records(hello_msg(b"", suites=b"\x13")), "malformed"),
        (records(hello_msg(sni_ext(b"a.b") * 2)), "malformed"),  # an extension twice
        (records(hello_msg(struct.pack("!HH", 9, 4) + b"abc")), "malformed"),  # past the end
        (records(hello_msg(alpn_ext(b""))), "malformed"),
        (records(hello_msg(sni_ext(b"a b.example"))), "bad_sni"),
        (records(hello_msg(sni_ext(b"\xc3\xa9.example"))), "bad_sni"),
        (records(hello_msg(sni_ext(b"."))), "bad_sni"),
        (records(hello_msg(b"") + b"\x00\x00\x00\x00"), "malformed"),  # more in the record
        (records(b"\x01\x01\x00\x00"), "too_big"),  # a 64 KiB ClientHello
        (records(hello_msg(ext(21, bytes(MAX_HELLO))), [9000]), "too_big"),
    ],
)
def test_refused(data: bytes, reason: str) -> None:
    with pytest.raises(HelloError) as err:
        parse_client_hello(data)
    assert err.value.reason == reason


def test_many_tiny_records_are_bounded() -> None:
    """1-byte records: the handshake bytes (not the stream) are what the limit counts."""
    msg = hello_msg(ext(21, bytes(3000)))
    data = records(msg, [1] * len(msg))
    got = parse_client_hello(data, limit=4000)
    assert got is not None and got.size == len(data) == 6 * len(msg)
    with pytest.raises(HelloError) as err:
        parse_client_hello(data, limit=2000)
    assert err.value.reason == "too_big"


SEEDS = [
    real_hello("a.example.com", ["http/1.1"]),
    records(hello_msg(sni_ext(b"b.example.org") + ext(EXT_ECH, b"\x01\x02")), [9, 30]),
]


def _check(data: bytes) -> None:
    try:
        got = parse_client_hello(data)
    except HelloError as exc:
        assert exc.reason in {"not_tls", "malformed", "too_big", "bad_sni"}
        return
    if got is not None:
        assert 0 < got.size <= len(data)
        assert got.sni is None or got.sni == got.sni.lower()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check(data)
    _check(b"\x16\x03\x01" + data)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=6),
    st.integers(0, 700),
)
def test_fuzz_mutated_hellos(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for at, value in flips:
        data[at % len(data)] = value
    _check(bytes(data))
    _check(bytes(data[:cut]))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=8))
def test_any_record_split_gives_the_same_hello(sizes: list[int]) -> None:
    msg = SEEDS[0][5:]
    data = records(msg, sizes)
    got = parse_client_hello(data)
    assert got is not None and (got.sni, got.alpn, got.size) == (
        "a.example.com",
        ("http/1.1",),
        len(data),
    )
