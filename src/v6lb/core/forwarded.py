"""``X-Forwarded-For`` and ``Forwarded`` (RFC 7239): how an HTTP proxy passes the client on.

Building: :func:`forwarded_element` makes one element such as
``for="[2001:db8::1]:4711";proto=http``. RFC 7239 §6 writes an IPv6 node in
brackets, and since neither ``:`` nor ``[`` may appear in a token (§4), the
value must be a quoted-string; an IPv4 node without a port stays a bare
token. :func:`append` adds an element to a header value a previous proxy
sent, as §5.2 asks (one element per proxy, in order).

``X-Forwarded-For`` has no specification; the common form is a comma list of
bare addresses, IPv6 without brackets: ``2001:db8::1, 2001:db8::2``.
:func:`parse_x_forwarded_for` also accepts the bracketed and ``[addr]:port``
forms some proxies emit.

Parsing never trusts blindly: :func:`client_address` walks the hops from the
right and returns the first one that is not a trusted proxy (the rightmost
hops are the ones our own proxies added).

Pure: strings in, strings and values out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Final

__all__ = [
    "ForwardedError",
    "Node",
    "append",
    "client_address",
    "format_node",
    "forwarded_element",
    "parse_forwarded",
    "parse_node",
    "parse_x_forwarded_for",
    "quote",
    "x_forwarded_for",
]

# RFC 7230 §3.2.6 tchar
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_OBF: Final = re.compile(r"_[A-Za-z0-9._-]+")
_PARAMS: Final = ("for", "by", "host", "proto")


class ForwardedError(ValueError):
    """A header value that does not follow the grammar (the sender's fault)."""


@dataclass(frozen=True, slots=True)
class Node:
    """A ``for``/``by`` node (RFC 7239 §6): an address, ``unknown`` or an obfuscated name.

    ``address`` is set for IP nodes; ``name`` is ``"unknown"`` or the
    ``_obfuscated`` identifier otherwise. ``port`` is an int, or a string for
    an obfuscated port (``_abc``), or None.
    """

    address: IPv4Address | IPv6Address | None = None
    name: str | None = None
    port: int | str | None = None


# --- building ------------------------------------------------------------------------


def quote(value: str) -> str:
    """``value`` as a token when it is one, else as a quoted-string (RFC 7230 §3.2.6)."""
    if _TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_node(node: str | IPv4Address | IPv6Address | None, port: int | str | None = None) -> str:
    """The node text, unquoted: ``[2001:db8::1]:4711``, ``192.0.2.1``, ``unknown``, ``_hidden``."""
    if node is None:
        text = "unknown"
    elif isinstance(node, IPv6Address | IPv4Address):
        text = f"[{node}]" if node.version == 6 else str(node)
    elif node == "unknown" or _OBF.fullmatch(node):
        text = node
    else:
        try:
            addr = ip_address(node.strip("[]"))
        except ValueError:
            raise ForwardedError(
                f"{node!r} is not an address, 'unknown' or an _obfuscated name"
            ) from None
        text = f"[{addr}]" if addr.version == 6 else str(addr)
    if port is not None:
        if isinstance(port, int):
            if not 0 <= port <= 65535:
                raise ForwardedError(f"port {port} is out of range")
        elif not _OBF.fullmatch(port):
            raise ForwardedError(f"port {port!r} is neither a number nor an _obfuscated name")
        text += f":{port}"
    return text


def forwarded_element(
    for_: str | IPv4Address | IPv6Address | None = None,
    *,
    for_port: int | str | None = None,
    by: str | IPv4Address | IPv6Address | None = None,
    by_port: int | str | None = None,
    host: str | None = None,
    proto: str | None = None,
) -> str:
    """One ``Forwarded`` element, parameters in the order for, by, host, proto.

    >>> forwarded_element("2001:db8::1", for_port=4711)
    'for="[2001:db8::1]:4711"'
    """
    pairs = []
    if for_ is not None or for_port is not None:
        pairs.append("for=" + quote(format_node(for_, for_port)))
    if by is not None or by_port is not None:
        pairs.append("by=" + quote(format_node(by, by_port)))
    if host is not None:
        pairs.append("host=" + quote(host))
    if proto is not None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", proto):
            raise ForwardedError(f"{proto!r} is not a URI scheme (RFC 3986 §3.1)")
        pairs.append("proto=" + proto.lower())
    if not pairs:
        raise ForwardedError("an element needs at least one parameter")
    return ";".join(pairs)


def append(existing: str | None, element: str) -> str:
    """Add ``element`` after the elements of an existing header value (RFC 7239 §5.2)."""
    if existing is None or not existing.strip():
        return element
    return f"{existing.strip()}, {element}"


def x_forwarded_for(existing: str | None, client: str | IPv4Address | IPv6Address) -> str:
    """The ``X-Forwarded-For`` value with ``client`` appended (bare address, no brackets)."""
    addr = (
        ip_address(str(client).strip("[]"))
        if not isinstance(client, IPv4Address | IPv6Address)
        else client
    )
    return append(existing, str(addr))


# --- parsing -------------------------------------------------------------------------


def _split(value: str, seps: str) -> Iterable[tuple[str, str]]:
    """Yield (text, separator that ended it), honouring quoted-strings and escapes."""
    buf: list[str] = []
    i = 0
    n = len(value)
    in_quote = False
    while i < n:
        ch = value[i]
        if in_quote:
            buf.append(ch)
            if ch == "\\" and i + 1 < n:
                buf.append(value[i + 1])
                i += 1
            elif ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
            buf.append(ch)
        elif ch in seps:
            yield "".join(buf), ch
            buf = []
        else:
            buf.append(ch)
        i += 1
    if in_quote:
        raise ForwardedError(f"an unterminated quoted-string in {value!r}")
    yield "".join(buf), ""


def _unquote(raw: str) -> str:
    raw = raw.strip()
    if raw.startswith('"'):
        if len(raw) < 2 or not raw.endswith('"'):
            raise ForwardedError(f"bad quoted-string {raw!r}")
        return re.sub(r"\\(.)", r"\1", raw[1:-1])
    if not _TOKEN.fullmatch(raw):
        raise ForwardedError(f"{raw!r} is neither a token nor a quoted-string")
    return raw


def parse_forwarded(value: str) -> list[dict[str, str]]:
    """The elements of a ``Forwarded`` value, each a dict of lower-cased parameter names.

    A parameter given twice in one element is an error (RFC 7239 §4).
    """
    elements: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for text, sep in _split(value, ",;"):
        text = text.strip()
        if text:
            name, eq, raw = text.partition("=")
            name = name.strip().lower()
            if not eq or not _TOKEN.fullmatch(name):
                raise ForwardedError(f"{text!r} is not a name=value pair")
            if name in current:
                raise ForwardedError(f"parameter {name!r} appears twice in one element")
            current[name] = _unquote(raw)
        if sep != ";":
            if current:
                elements.append(current)
            current = {}
    return elements


def parse_node(text: str) -> Node:
    """Parse a node value (already unquoted): ``[2001:db8::1]:4711``, ``192.0.2.1:80``, ``_x``."""
    text = text.strip()
    port: int | str | None = None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ForwardedError(f"{text!r}: '[' without ']'")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ForwardedError(f"{text!r}: junk after ']'")
            port = _port(rest[1:], text)
        try:
            addr = IPv6Address(host)
        except ValueError:
            raise ForwardedError(f"{host!r} in brackets is not an IPv6 address") from None
        return Node(address=addr, port=port)
    if text.count(":") > 1:
        # RFC 7239 §6 requires brackets, but bare IPv6 is common in the wild.
        try:
            return Node(address=IPv6Address(text))
        except ValueError:
            raise ForwardedError(f"{text!r} is not a node") from None
    host, colon, p = text.partition(":")
    if colon:
        port = _port(p, text)
    if host.lower() == "unknown":
        return Node(name="unknown", port=port)
    if _OBF.fullmatch(host):
        return Node(name=host, port=port)
    try:
        return Node(address=IPv4Address(host), port=port)
    except ValueError:
        raise ForwardedError(f"{text!r} is not a node") from None


def _port(text: str, whole: str) -> int | str:
    if _OBF.fullmatch(text):
        return text
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise ForwardedError(f"{whole!r}: {text!r} is not a port")
    return int(text)


def parse_x_forwarded_for(value: str) -> list[IPv4Address | IPv6Address]:
    """The addresses of an ``X-Forwarded-For`` value, left (client) to right (last proxy)."""
    out: list[IPv4Address | IPv6Address] = []
    for item in value.split(","):
        item = item.strip().strip('"')
        if not item:
            continue
        node = parse_node(item)
        if node.address is None:
            raise ForwardedError(f"{item!r} is not an address")
        out.append(node.address)
    return out


Prefix = IPv6Network | IPv4Network


def client_address(
    hops: Sequence[IPv4Address | IPv6Address | None],
    peer: IPv4Address | IPv6Address,
    trusted: Sequence[Prefix] = (),
) -> IPv4Address | IPv6Address | None:
    """The client's address from the forwarding chain, trusting only ``trusted`` proxies.

    ``hops`` are the addresses from the headers, left to right (None for an
    ``unknown`` or obfuscated node); ``peer`` is the socket's peer. If the
    peer is not trusted, it is the client. Otherwise walk right to left and
    return the first hop not in ``trusted``.
    """

    def is_trusted(a: IPv4Address | IPv6Address) -> bool:
        return any(a.version == n.version and a in n for n in trusted)

    if not is_trusted(peer):
        return peer
    for hop in reversed(hops):
        if hop is None:
            return None
        if not is_trusted(hop):
            return hop
    return hops[0] if hops else peer
