"""Pure policy of the builtin proxy: backend scheduling and HTTP header rewriting.

Nothing here does I/O; the asyncio protocols in this package call these functions.

Scheduling (:class:`Picker`), one per VIP, over a :class:`~v6lb.core.backends.BackendPool`
whose eligibility (up, not draining, weight > 0) is kept by the health loop:

- ``maglev``: the core's table and jhash, keyed on the *client address only*
  (``pick_flow(client, vip, 0, 0)``), so one client sticks to one backend across
  its connections and every LB instance with the same backends agrees.
- ``round-robin``: smooth weighted round robin (nginx's): with weights 5,1,1 the
  order is a a b a c a a, never five a in a row.
- ``least-connections``: the eligible backend with the fewest active
  connections per unit of weight; ties go to the lowest index.

IPv4 clients (dual-stack listener) hash as their IPv4-mapped form, for the hash
only: they are never *shown* as mapped addresses.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Final

from v6lb.core import forwarded
from v6lb.core.backends import BackendPool
from v6lb.core.flowhash import flow_hash
from v6lb.core.maglev import build_table
from v6lb.core.proxyproto import SIGNATURE
from v6lb.model.config import Scheduler

__all__ = [
    "FORWARDING_HEADERS",
    "HOP_BY_HOP",
    "Picker",
    "ANSWERED",
    "build_request_head",
    "client_forwarding",
    "client_proxy_header",
    "error_response",
    "forwarding_block",
    "hash_key",
    "is_trusted",
    "unmap",
    "untrusted_head",
]

Addr = IPv4Address | IPv6Address


def unmap(addr: Addr) -> Addr:
    """An IPv4-mapped IPv6 address as the IPv4 address it is; others unchanged."""
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def hash_key(addr: Addr) -> bytes:
    """The 16 bytes the Maglev hash takes for a client (IPv4 as ::ffff:a.b.c.d)."""
    if isinstance(addr, IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def is_trusted(addr: Addr, prefixes: Sequence[IPv4Network | IPv6Network]) -> bool:
    """Is ``addr`` inside one of ``prefixes``?"""
    return any(net.version == addr.version and addr in net for net in prefixes)


class Picker:
    """Chooses a backend index for a new connection; -1 when none is eligible.

    ``members``: a subset of the pool's backends to choose from (a TLS passthrough
    route, model/sni.py), with its own Maglev table over them (the pool's table is
    the whole VIP's); ``active``: the VIP picker's counts, shared so that
    least-connections sees every connection of a backend whatever route took it.
    """

    __slots__ = (
        "kind", "pool", "active", "_current", "vip_key", "_gen", "_weights", "members", "_table",
    )  # fmt: skip

    def __init__(
        self,
        kind: Scheduler,
        pool: BackendPool,
        vip: IPv6Address,
        members: Sequence[int] | None = None,
        active: list[int] | None = None,
    ) -> None:
        self.kind = kind
        self.pool = pool
        self.active = [0] * len(pool) if active is None else active
        self._current = [0] * len(pool)  # smooth weighted round robin state
        self.vip_key = vip.packed
        self._gen = -1
        self._weights: list[int] = []
        self.members = None if members is None else frozenset(members)
        self._table: list[int] = []

    def pick(self, client: Addr) -> int:
        members = self.members
        if self.kind is Scheduler.MAGLEV and members is None:
            return self.pool.pick_flow(hash_key(client), self.vip_key, 0, 0)
        if self._gen != self.pool.generation:  # health, drain or weight changed
            weights = self.pool.eligible_weights()
            if members is not None:
                weights = [w if i in members else 0 for i, w in enumerate(weights)]
                if self.kind is Scheduler.MAGLEV:
                    pool = self.pool
                    self._table = (
                        build_table(pool.ids, weights, pool.size).tolist() if any(weights) else []
                    )
            self._weights = weights
            self._gen = self.pool.generation
        if self.kind is Scheduler.MAGLEV:
            table = self._table
            if not table:
                return -1
            h = flow_hash(hash_key(client), self.vip_key, 0, 0, self.pool.seed)
            return table[(h * len(table)) >> 32]
        weights = self._weights
        if self.kind is Scheduler.ROUND_ROBIN:
            return self._round_robin(weights)
        return self._least_connections(weights)

    def _round_robin(self, weights: list[int]) -> int:
        total = 0
        best = -1
        cur = self._current
        for i, w in enumerate(weights):
            if w <= 0:
                cur[i] = 0
                continue
            cur[i] += w
            total += w
            if best < 0 or cur[i] > cur[best]:
                best = i
        if best >= 0:
            cur[best] -= total
        return best

    def _least_connections(self, weights: list[int]) -> int:
        best = -1
        active = self.active
        for i, w in enumerate(weights):
            if w <= 0:
                continue
            # compare active[i]/w < active[best]/w_best without division
            if best < 0 or active[i] * weights[best] < active[best] * w:
                best = i
        return best

    def acquire(self, index: int) -> None:
        self.active[index] += 1

    def release(self, index: int) -> None:
        self.active[index] -= 1


# --- HTTP -------------------------------------------------------------------------------

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",  # re-sent by the proxy: the length, or chunked (body_len < 0)
    }
)
# Headers the proxy acts on itself and never forwards: it answers ``Expect`` (a
# ``100 Continue`` or 417) and sends the backend the whole request at once.
ANSWERED: Final = frozenset({b"expect"})
FORWARDING_HEADERS: Final = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-real-ip",
    }
)

_REASONS: Final = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def error_response(status: int, detail: str = "") -> bytes:
    """A complete HTTP/1.1 response the proxy answers by itself; it always closes."""
    reason = _REASONS.get(status, "Error")
    body = f"{status} {reason}{': ' + detail if detail else ''}\n".encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


def client_forwarding(client: Addr, client_port: int, proto: str = "http") -> tuple[str, str]:
    """Our ``X-Forwarded-For`` entry and ``Forwarded`` element for a client (once per connection)."""
    client = unmap(client)
    return str(client), forwarded.forwarded_element(client, for_port=client_port, proto=proto)


def forwarding_block(ours: tuple[str, str], proto: str = "http") -> bytes:
    """The three forwarding header lines for a client that sent none (once per connection)."""
    xff, element = ours
    return (
        f"X-Forwarded-For: {xff}\r\nX-Forwarded-Proto: {proto}\r\nForwarded: {element}\r\n"
    ).encode()


_DROP_ALWAYS: Final = HOP_BY_HOP | ANSWERED
_DROP_FWD: Final = _DROP_ALWAYS | FORWARDING_HEADERS
_NO_BODY_METHODS: Final = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})


def untrusted_head(
    method: bytes,
    url: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body_len: int,
    block: bytes,
) -> bytes:
    """:func:`build_request_head` for an untrusted client with forwarding on (the usual case).

    Positional and branch-free per header: every hop-by-hop, forwarding and
    ``Expect`` header is dropped and the connection's :func:`forwarding_block` appended.
    """
    out = [method, b" ", url, b" HTTP/1.1\r\n"]
    for name, value in headers:
        if name.lower() not in _DROP_FWD:
            out += (name, b": ", value, b"\r\n")
    out.append(block)
    if body_len < 0:
        out.append(b"Transfer-Encoding: chunked\r\n")
    elif body_len or method not in _NO_BODY_METHODS:
        out.append(b"Content-Length: %d\r\n" % body_len)
    out.append(b"\r\n")
    return b"".join(out)


def build_request_head(
    method: bytes,
    url: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body_len: int,
    *,
    client: Addr,
    client_port: int,
    proto: str = "http",
    trusted: bool = False,
    add_forwarding: bool = True,
    ours: tuple[str, str] | None = None,
    block: bytes | None = None,
) -> bytes:
    """The request head sent to a backend over a pooled HTTP/1.1 keep-alive connection.

    Hop-by-hop headers and ``Expect`` (the proxy answers it) are dropped; the body
    is framed by the proxy: ``Content-Length: body_len``, or for ``body_len < 0``
    ``Transfer-Encoding: chunked`` (the proxy re-chunks it). With ``add_forwarding``, the forwarding
    headers of an untrusted client are dropped and ours appended:
    ``X-Forwarded-For: 2001:db8::1``, ``X-Forwarded-Proto: http`` and
    ``Forwarded: for="[2001:db8::1]:4711";proto=http``. A trusted client's
    ``X-Forwarded-For`` and ``Forwarded`` are kept and extended. ``block`` is
    :func:`forwarding_block` of ``ours``, precomputed per connection; it is used
    as is when the request carries no forwarding header to extend.
    """
    if add_forwarding and not trusted and block is not None:
        return untrusted_head(method, url, headers, body_len, block)
    out = [method, b" ", url, b" HTTP/1.1\r\n"]
    drop = _DROP_FWD if add_forwarding else _DROP_ALWAYS
    xff: str | None = None
    fwd: str | None = None
    xfp: str | None = None
    for name, value in headers:
        low = name.lower()
        if low in drop:
            if low in _DROP_ALWAYS or not trusted:
                continue
            if low == b"x-forwarded-for":
                v = value.decode("latin-1")
                xff = v if xff is None else f"{xff}, {v}"
                continue
            if low == b"forwarded":
                v = value.decode("latin-1")
                fwd = v if fwd is None else f"{fwd}, {v}"
                continue
            if low == b"x-forwarded-proto":
                xfp = value.decode("latin-1")
                continue
        out += (name, b": ", value, b"\r\n")
    if add_forwarding:
        if block is not None and xff is None and fwd is None and xfp is None:
            out.append(block)
        else:
            xff_ours, element = ours or client_forwarding(client, client_port, proto)
            out.append(b"X-Forwarded-For: ")
            out.append((xff_ours if xff is None else forwarded.append(xff, xff_ours)).encode())
            out.append(b"\r\nX-Forwarded-Proto: ")
            out.append((xfp or proto).encode())
            out.append(b"\r\nForwarded: ")
            out.append(forwarded.append(fwd, element).encode())
            out.append(b"\r\n")
    if body_len < 0:
        out.append(b"Transfer-Encoding: chunked\r\n")
    elif body_len or method not in _NO_BODY_METHODS:
        out.append(b"Content-Length: %d\r\n" % body_len)
    out.append(b"\r\n")
    return b"".join(out)


# --- PROXY headers sent by a client -------------------------------------------------------

_V1_STARTS: Final = (b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN")


def client_proxy_header(data: bytes | bytearray) -> int | None:
    """Does a client's stream start with a PROXY header? 2 (v2 signature), 1 (v1 text), 0 (no).

    None: the bytes so far are a proper prefix of one (``\r\n\r``, ``PROX``,
    ``PROXY TC``...), so more are needed to tell. Anything else, including data
    that merely starts with ``P`` or ``\r\n`` and then differs, is 0.
    """
    if not data or data[0] not in (0x0D, 0x50):  # neither "\r" nor "P": the usual case
        return 0
    head = bytes(data[:16])
    if head[0] == 0x0D:
        if head.startswith(SIGNATURE):
            return 2
        return None if SIGNATURE.startswith(head) else 0
    undecided = False
    for start in _V1_STARTS:
        if head.startswith(start):
            return 1
        if start.startswith(head):
            undecided = True
    return None if undecided else 0
