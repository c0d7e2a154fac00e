"""The builtin proxy's pure policy: schedulers and the HTTP head rewrite."""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address, IPv6Address

from v6lb.core import forwarded
from v6lb.core.backends import BackendPool, BackendSpec
from v6lb.engines.proxy.policy import Picker, build_request_head, error_response, hash_key
from v6lb.model.config import Scheduler

VIP = IPv6Address("2001:db8::80")


def pool(weights: list[int], drain: list[bool] | None = None) -> BackendPool:
    specs = [
        BackendSpec.of(f"2001:db8::{i + 1}", 80, w, (drain or [False] * len(weights))[i])
        for i, w in enumerate(weights)
    ]
    return BackendPool(specs, table_size=251, seed=0x5EED)


def test_round_robin_is_smooth_and_weighted() -> None:
    p = Picker(Scheduler.ROUND_ROBIN, pool([5, 1, 1]), VIP)
    seq = [p.pick(IPv6Address("2001:db8::9")) for _ in range(7)]
    assert seq == [0, 0, 1, 0, 2, 0, 0]
    many = Counter(p.pick(IPv6Address("2001:db8::9")) for _ in range(700))
    assert many == {0: 500, 1: 100, 2: 100}


def test_round_robin_skips_drained_and_down() -> None:
    bp = pool([1, 1, 1])
    p = Picker(Scheduler.ROUND_ROBIN, bp, VIP)
    bp.set_drain(1, True)
    bp.set_up(2, False)
    assert {p.pick(IPv6Address("::1")) for _ in range(10)} == {0}
    bp.set_up(0, False)
    assert p.pick(IPv6Address("::1")) == -1


def test_least_connections_weighted() -> None:
    p = Picker(Scheduler.LEAST_CONNECTIONS, pool([1, 2]), VIP)
    c = IPv6Address("::1")
    got = []
    for _ in range(6):
        i = p.pick(c)
        p.acquire(i)
        got.append(i)
    assert Counter(got) == {0: 2, 1: 4}  # 2/1 == 4/2
    p.release(1)
    p.release(1)
    assert p.pick(c) == 1


def test_maglev_uses_the_core_table_on_the_client_address() -> None:
    bp = pool([1, 1, 1])
    p = Picker(Scheduler.MAGLEV, bp, VIP)
    for n in range(50):
        client = IPv6Address(f"2001:db8:1::{n:x}")
        assert p.pick(client) == bp.pick_flow(client.packed, VIP.packed, 0, 0)
        assert p.pick(client) == p.pick(client)
    v4 = IPv4Address("192.0.2.7")
    assert hash_key(v4) == IPv6Address("::ffff:192.0.2.7").packed
    assert p.pick(v4) == bp.pick_flow(hash_key(v4), VIP.packed, 0, 0)


def test_maglev_drain_moves_only_that_backends_clients() -> None:
    bp = pool([1, 1, 1])
    p = Picker(Scheduler.MAGLEV, bp, VIP)
    clients = [IPv6Address(f"2001:db8:2::{n:x}") for n in range(200)]
    before = [p.pick(c) for c in clients]
    bp.set_drain(0, True)
    after = [p.pick(c) for c in clients]
    assert 0 not in after
    moved = [b for b, a in zip(before, after, strict=True) if a != b]
    # Maglev moves the drained backend's clients and (almost) no others.
    assert moved.count(0) == before.count(0)
    assert len(moved) - moved.count(0) <= len(clients) // 10


def test_head_appends_forwarding_headers_for_ipv6() -> None:
    head = build_request_head(
        b"GET",
        b"/x",
        [(b"Host", b"h"), (b"Connection", b"keep-alive"), (b"X-Forwarded-For", b"6.6.6.6")],
        0,
        client=IPv6Address("2001:db8::1"),
        client_port=4711,
    )
    assert head == (
        b"GET /x HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 2001:db8::1\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b'Forwarded: for="[2001:db8::1]:4711";proto=http\r\n\r\n'
    )
    el = forwarded.parse_forwarded('for="[2001:db8::1]:4711";proto=http')
    assert forwarded.parse_node(el[0]["for"]).address == IPv6Address("2001:db8::1")


def test_per_connection_block_gives_the_same_head_as_the_general_path() -> None:
    from v6lb.engines.proxy.policy import client_forwarding, forwarding_block, untrusted_head

    client = IPv6Address("2001:db8::1")
    ours = client_forwarding(client, 4711)
    block = forwarding_block(ours)
    cases: list[tuple[bytes, list[tuple[bytes, bytes]], int]] = [
        (b"GET", [(b"Host", b"h")], 0),
        (b"GET", [(b"Host", b"h"), (b"connection", b"close"), (b"X-Real-IP", b"6.6.6.6")], 0),
        (b"POST", [(b"Host", b"h"), (b"Forwarded", b"for=6.6.6.6")], 5),
        (b"PUT", [(b"X-Forwarded-For", b"1.2.3.4"), (b"X-Forwarded-Proto", b"https")], 0),
    ]
    for method, headers, n in cases:
        general = build_request_head(method, b"/p", headers, n, client=client, client_port=4711)
        fast = build_request_head(
            method, b"/p", headers, n, client=client, client_port=4711, ours=ours, block=block
        )
        assert fast == general == untrusted_head(method, b"/p", headers, n, block)
        assert b"6.6.6.6" not in fast and b"1.2.3.4" not in fast and b"https" not in fast
    # a trusted client's chain is extended, never replaced by the block
    trusted = build_request_head(
        b"GET",
        b"/",
        [(b"X-Forwarded-For", b"2001:db8::7")],
        0,
        client=client,
        client_port=4711,
        trusted=True,
        ours=ours,
        block=block,
    )
    assert b"X-Forwarded-For: 2001:db8::7, 2001:db8::1\r\n" in trusted


def test_head_keeps_and_extends_a_trusted_chain() -> None:
    head = build_request_head(
        b"POST",
        b"/",
        [
            (b"X-Forwarded-For", b"2001:db8::7"),
            (b"Forwarded", b'for="[2001:db8::7]:1"'),
            (b"X-Forwarded-Proto", b"https"),
            (b"Transfer-Encoding", b"chunked"),
        ],
        3,
        client=IPv6Address("2001:db8::2"),
        client_port=5,
        trusted=True,
    )
    text = head.decode()
    assert "X-Forwarded-For: 2001:db8::7, 2001:db8::2\r\n" in text
    assert 'Forwarded: for="[2001:db8::7]:1", for="[2001:db8::2]:5";proto=http\r\n' in text
    assert "X-Forwarded-Proto: https\r\n" in text
    assert "Content-Length: 3\r\n" in text and "chunked" not in text


def test_head_ipv4_client_is_plain_ipv4() -> None:
    head = build_request_head(
        b"GET", b"/", [], 0, client=IPv6Address("::ffff:192.0.2.1"), client_port=80
    ).decode()
    assert "X-Forwarded-For: 192.0.2.1\r\n" in head
    assert 'Forwarded: for="192.0.2.1:80";proto=http\r\n' in head


def test_error_response_is_complete_and_closes() -> None:
    r = error_response(503)
    head, _, body = r.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
