"""TLS passthrough on ``proxy-l4``: routes chosen by the ClientHello's SNI.

A VIP's ``sni_routes:`` is a list of ``{names, backends}``: a client whose SNI is one
of ``names`` (exact, or ``*.example.com`` for one label) is balanced over those
backends, which are the VIP's own ``backends:`` named by address (``"2001:db8::a"``)
or, where two share an address, by ``"[address]:port"``. An exact name wins over a
wildcard. A client without SNI, or with a name no route lists, goes to the default
pool (the backends no route lists) with ``unknown_sni: default``, or is refused with
``unknown_sni: refuse``. The TLS session itself is never terminated: the backends
hold their own certificates.

Both engines read these rules from here: :func:`route_for` (the builtin's lookup)
and :func:`default_pool`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Final

from v6lb.model.schema import Fields, Where, as_list, as_str, quote

__all__ = [
    "SNI_UNKNOWN",
    "SniRoute",
    "backend_ref",
    "default_pool",
    "parse_sni_routes",
    "route_for",
]

SNI_UNKNOWN: Final = ("default", "refuse")
_LABEL: Final = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME_RE: Final = re.compile(rf"(\*\.)?({_LABEL}\.)*{_LABEL}")
_EXAMPLE: Final = '`- {names: [a.example.com], backends: ["2001:db8::a"]}`'


@dataclass(frozen=True, slots=True)
class SniRoute:
    """Clients whose SNI is one of ``names`` go to ``backends`` (indexes into the VIP's)."""

    names: tuple[str, ...]
    backends: tuple[int, ...]


def route_for(routes: Sequence[SniRoute], name: str | None) -> int:
    """The index of the route for an SNI (exact, then ``*.`` one label up); -1: none."""
    if name is None or not routes:
        return -1
    name = name.lower().rstrip(".")
    wild = "*." + name.split(".", 1)[1] if "." in name else None
    found = -1
    for i, r in enumerate(routes):
        if name in r.names:
            return i
        if found < 0 and wild is not None and wild in r.names:
            found = i
    return found


def default_pool(routes: Sequence[SniRoute], n_backends: int) -> tuple[int, ...]:
    """The backends no route lists (where ``unknown_sni: default`` sends a client)."""
    used = {i for r in routes for i in r.backends}
    return tuple(i for i in range(n_backends) if i not in used)


def backend_ref(backends: Sequence[tuple[IPv6Address, int | None]], index: int) -> str:
    """How a route names backend ``index``: its address, or ``[address]:port`` if shared."""
    address, port = backends[index]
    if sum(1 for a, _ in backends if a == address) == 1 or port is None:
        return str(address)
    return f"[{address}]:{port}"


def _resolve(raw: object, where: Where, backends: Sequence[tuple[IPv6Address, int | None]]) -> int:
    text = as_str(raw, where, example='"2001:db8::a" or "[2001:db8::a]:8443"').strip()
    port: int | None = None
    host = text
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})", text)
    if m:
        host, port = m.group(1), int(m.group(2))
    try:
        address = IPv6Address(host)
    except ValueError:
        raise where.error(
            f"{quote(text)} is not a backend address",
            'name one of the VIP\'s backends by address: "2001:db8::a" (or "[2001:db8::a]:8443")',
        ) from None
    hits = [i for i, (a, p) in enumerate(backends) if a == address and (port is None or p == port)]
    if not hits:
        raise where.error(
            f"{quote(text)} is none of this VIP's backends",
            "list the backend under the VIP's `backends:` too, or fix the address",
        )
    if len(hits) > 1:
        raise where.error(
            f"{quote(text)} names backends[{hits[0]}] and backends[{hits[1]}]",
            f'add the port: "[{address}]:PORT"',
        )
    return hits[0]


def parse_sni_routes(
    f: Fields, backends: Sequence[tuple[IPv6Address, int | None]]
) -> tuple[tuple[SniRoute, ...], str]:
    """``sni_routes:`` and ``unknown_sni:`` of a proxy-l4 VIP, checked against its backends.

    ``backends``: the VIP's (address, port) pairs in file order.
    """
    w = f.at("sni_routes")
    items = as_list(f.get("sni_routes"), w, example=_EXAMPLE)
    if not items:
        raise w.error("`sni_routes` is an empty list", f"list at least one route: {_EXAMPLE}")
    routes: list[SniRoute] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        r = Fields(item, w.index(i), "an SNI route")
        r.reject_unknown(("names", "backends"))
        wn = r.at("names")
        names: list[str] = []
        for j, raw in enumerate(as_list(r.required("names", "[a.example.com]"), wn, example="x")):
            name = as_str(raw, wn.index(j), example="a.example.com").lower().rstrip(".")
            if not _NAME_RE.fullmatch(name) or len(name) > 253:
                raise wn.index(j).error(
                    f"{quote(str(raw))} is not a DNS name",
                    "give a host name such as a.example.com, or *.example.com",
                )
            if name in seen:
                raise wn.index(j).error(
                    f"{name} is in sni_routes[{seen[name]}] already", "list each name in one route"
                )
            seen[name] = i
            names.append(name)
        if not names:
            raise wn.error("`names` is an empty list", "list the SNI names of this route")
        wb = r.at("backends")
        refs = as_list(r.required("backends", '["2001:db8::a"]'), wb, example='["2001:db8::a"]')
        if not refs:
            raise wb.error("`backends` is an empty list", "name at least one of the VIP's backends")
        picked: list[int] = []
        for j, raw in enumerate(refs):
            k = _resolve(raw, wb.index(j), backends)
            if k in picked:
                raise wb.index(j).error(f"backends[{k}] is listed twice", "list it once")
            picked.append(k)
        routes.append(SniRoute(tuple(names), tuple(picked)))
    unknown = f.choice("unknown_sni", SNI_UNKNOWN, "default")
    rest = default_pool(routes, len(backends))
    if unknown == "default" and not rest:
        raise f.at("sni_routes").error(
            "every backend is in a route, so a client with another SNI (or none) has no"
            " default pool",
            "add a backend that no route lists (the default pool), or set unknown_sni: refuse",
        )
    if unknown == "refuse" and rest:
        raise (
            f.at("backends")
            .index(rest[0])
            .error(
                "this backend is in no SNI route and unknown SNIs are refused: it takes no client",
                "add it to a route's backends, or remove it",
            )
        )
    return tuple(routes), unknown
