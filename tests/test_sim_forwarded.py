"""X-Forwarded-For and Forwarded (RFC 7239) in v6lb.core.forwarded: building, parsing, trust."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from v6lb.core.forwarded import (
    ForwardedError,
    Node,
    append,
    client_address,
    format_node,
    forwarded_element,
    parse_forwarded,
    parse_node,
    parse_x_forwarded_for,
    quote,
    x_forwarded_for,
)


def test_ipv6_is_bracketed_and_quoted() -> None:
    # RFC 7239 §6: "[" and ":" are not token characters, so IPv6 needs a quoted-string.
    assert forwarded_element("2001:db8::1", for_port=4711) == 'for="[2001:db8::1]:4711"'
    assert forwarded_element(IPv6Address("2001:db8::1")) == 'for="[2001:db8::1]"'
    assert forwarded_element("192.0.2.60", proto="HTTP", by="203.0.113.43") == (
        "for=192.0.2.60;by=203.0.113.43;proto=http"
    )
    assert forwarded_element("192.0.2.60", for_port=8080) == 'for="192.0.2.60:8080"'
    assert forwarded_element("unknown", host="example.com") == "for=unknown;host=example.com"
    assert forwarded_element("_hidden", for_port="_port") == 'for="_hidden:_port"'
    assert quote('a"b') == '"a\\"b"'


def test_rfc7239_examples_parse() -> None:
    # RFC 7239 §4 and §7.1 examples.
    assert parse_forwarded('for="_gazonk"') == [{"for": "_gazonk"}]
    assert parse_forwarded('For="[2001:db8:cafe::17]:4711"') == [
        {"for": "[2001:db8:cafe::17]:4711"}
    ]
    assert parse_forwarded("for=192.0.2.60;proto=http;by=203.0.113.43") == [
        {"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"}
    ]
    assert parse_forwarded("for=192.0.2.43, for=198.51.100.17") == [
        {"for": "192.0.2.43"},
        {"for": "198.51.100.17"},
    ]
    assert parse_node("[2001:db8:cafe::17]:4711") == Node(
        IPv6Address("2001:db8:cafe::17"), port=4711
    )
    assert parse_node("192.0.2.43") == Node(IPv4Address("192.0.2.43"))
    assert parse_node("unknown") == Node(name="unknown")
    assert parse_node("_gazonk:_p") == Node(name="_gazonk", port="_p")


@pytest.mark.parametrize(
    "bad",
    ['for="[2001:db8::1', "for", "for=a b", "for=1;for=2", 'for="x\\"'],
)
def test_bad_forwarded(bad: str) -> None:
    with pytest.raises(ForwardedError):
        parse_forwarded(bad)


@pytest.mark.parametrize(
    "bad", ["[2001:db8::1", "[nope]:1", "[::1]x", "1.2.3.4:99999", "host.example"]
)
def test_bad_nodes(bad: str) -> None:
    with pytest.raises(ForwardedError):
        parse_node(bad)


def test_append_and_x_forwarded_for() -> None:
    first = forwarded_element("2001:db8::1", for_port=1)
    assert append(None, first) == first
    assert append(first, "for=192.0.2.1") == f"{first}, for=192.0.2.1"
    assert x_forwarded_for(None, "2001:db8::1") == "2001:db8::1"
    assert x_forwarded_for("192.0.2.1", IPv6Address("2001:db8::2")) == "192.0.2.1, 2001:db8::2"
    assert parse_x_forwarded_for("2001:db8::1, [2001:db8::2]:80, 192.0.2.1") == [
        IPv6Address("2001:db8::1"),
        IPv6Address("2001:db8::2"),
        IPv4Address("192.0.2.1"),
    ]
    with pytest.raises(ForwardedError):
        format_node("not an address")


def test_client_address_trusts_only_listed_proxies() -> None:
    lbs = [IPv6Network("fd00:10::/64")]
    hops = [IPv6Address("2001:db8::bad"), IPv6Address("2001:db8::1"), IPv6Address("fd00:10::a2")]
    peer = IPv6Address("fd00:10::a1")
    assert client_address(hops, peer, lbs) == IPv6Address("2001:db8::1")
    assert client_address(hops, IPv6Address("2001:db8::9"), lbs) == IPv6Address("2001:db8::9")
    assert client_address([None], peer, lbs) is None


@given(
    st.integers(0, 2**128 - 1).map(IPv6Address),
    st.integers(0, 65535),
    st.sampled_from(["http", "https"]),
)
def test_round_trip(addr: IPv6Address, port: int, proto: str) -> None:
    value = append(
        forwarded_element("192.0.2.1"), forwarded_element(addr, for_port=port, proto=proto)
    )
    parsed = parse_forwarded(value)
    assert parse_node(parsed[1]["for"]) == Node(addr, port=port)
    assert parsed[1]["proto"] == proto
