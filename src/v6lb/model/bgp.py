"""The ``bgp:`` section: the speaker (ASN, router id, neighbours, timers, BFD, policy)
and the anycast announcements.

:func:`parse_bgp` reads the whole section, once, into a frozen
:class:`BgpSection` (:attr:`v6lb.model.config.Config.bgp`): its ``speaker``, a
:class:`BgpSettings` that :mod:`v6lb.render.bird` turns into a bird.conf (None
when the section has no ``asn``: the simulator's anycast scenario has only
announcements), and its ``announcements`` (which prefix each site originates, at
which cost), which :mod:`v6lb.model.topology` checks against the LB sites and
routes::

    bgp:
      asn: 65001                 # this speaker's AS (an LB, or a lab router)
      router_id: "192.0.2.11"    # optional: a 32-bit id written as a dotted quad
      hold: 3                    # seconds, 3..65535 (RFC 4271: 0 or at least 3)
      keepalive: 1               # seconds, at least 1 and at most hold / 3
      bfd: {interval: 0.1, multiplier: 3}   # or `bfd: false`; on by default
      med: 10                    # MED on this LB's announcements (lower wins)
      neighbours:
        - {address: "2001:db8:fffe:a::1", asn: 65000, interface: up0, local_pref: 100}
      announcements:             # see docs/topology.md
        - {prefix: "2001:db8:a:1a0::/64", site: primary, cost: 10}

The inter-site policy (docs/anycast.md): every LB site announces the same
prefix from the same AS; the primary site sends a lower MED than the backup
site, and a router that peers with both may also raise ``local_pref`` on its
neighbours at the primary site. ``local_pref`` is a router-side knob: it is
never sent over eBGP, so an LB speaker ignores it.

Errors are :class:`~v6lb.model.schema.ConfigError` with the file, the field
path (``bgp.neighbours[1].asn``) and a fix. This module imports nothing from
:mod:`v6lb.model.config` (which imports it).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address, IPv6Address, IPv6Network
from typing import Final

from v6lb.model.schema import (
    ConfigError,
    Fields,
    Where,
    as_int,
    as_ipv6_address,
    as_ipv6_prefix,
    as_list,
    as_number,
    as_str,
    describe,
    quote,
    require_unicast,
)

__all__ = [
    "Announcement",
    "BfdSettings",
    "BgpSection",
    "BgpSettings",
    "ConfigError",
    "Neighbour",
    "parse_bgp",
    "router_id_for",
]

_KEYS: Final = (
    "asn",
    "router_id",
    "hold",
    "keepalive",
    "bfd",
    "med",
    "neighbours",
    "announcements",
)
_NEIGHBOUR_KEYS: Final = ("name", "address", "asn", "interface", "local_pref")
_BFD_KEYS: Final = ("enabled", "interval", "multiplier")
_ANNOUNCEMENT_KEYS: Final = ("prefix", "site", "cost")
MAX_ASN: Final = 4_294_967_295  # 4-octet AS numbers (RFC 6793)
MAX_U32: Final = 4_294_967_295


@dataclass(frozen=True, slots=True)
class BfdSettings:
    """BFD (RFC 5880) on every session: ``interval`` seconds between packets, down after ``multiplier`` lost."""

    enabled: bool = True
    interval: float = 0.1
    multiplier: int = 3

    @property
    def detection_time(self) -> float:
        return self.interval * self.multiplier if self.enabled else 0.0


@dataclass(frozen=True, slots=True)
class Neighbour:
    name: str
    address: IPv6Address
    asn: int
    interface: str | None = None
    local_pref: int | None = None  # set on routes imported from this neighbour (router side)


@dataclass(frozen=True, slots=True)
class BgpSettings:
    asn: int
    router_id: str | None = None
    hold: int = 3
    keepalive: int = 1
    bfd: BfdSettings = BfdSettings()
    med: int | None = None
    neighbours: tuple[Neighbour, ...] = ()


@dataclass(frozen=True, slots=True)
class Announcement:
    """``prefix`` is originated by every LB node of ``site`` that serves a VIP in it, at ``cost``."""

    prefix: IPv6Network
    site: str
    cost: int


@dataclass(frozen=True, slots=True)
class BgpSection:
    """The ``bgp:`` section: ``speaker`` None when it has no ``asn`` (announcements only)."""

    speaker: BgpSettings | None = None
    announcements: tuple[Announcement, ...] = ()


def router_id_for(name: str) -> str:
    """A stable dotted-quad router id for a speaker that has none configured (never 0.0.0.0)."""
    n = zlib.crc32(name.encode()) or 1
    return str(IPv4Address(n))


def parse_bgp(data: object, where: Where, vips: Sequence[tuple[str, IPv6Address]]) -> BgpSection:
    """Read the ``bgp:`` section at ``where``; ``vips`` are the file's (name, address) pairs.

    Which site an announcement names is checked against the topology's LB nodes
    by :mod:`v6lb.model.topology`; the rest of the section is checked here.
    """
    f = Fields(data, where, "the bgp section")
    f.reject_unknown(_KEYS)
    announcements: tuple[Announcement, ...] = ()
    if f.has("announcements"):
        announcements = _announcements(f.get("announcements"), f.at("announcements"), vips)
    if not f.has("asn"):
        others = [k for k in f if k != "announcements"]
        if others:
            raise f.at("asn").error(
                f"`{others[0]}` is set but the speaker has no AS number",
                "add `asn: 65001` (a private AS from 64512-65534 or 4200000000-4294967294)",
            )
        return BgpSection(None, announcements)
    return BgpSection(_speaker(f), announcements)


def _announcements(
    value: object, where: Where, vips: Sequence[tuple[str, IPv6Address]]
) -> tuple[Announcement, ...]:
    """Each announcement's shape, and that its prefix holds a VIP address of the file.

    Routers would send a prefix that holds no VIP to the LB sites, which serve
    nothing in it (the LB drops it, or routes it back: a loop). The LB speaker
    itself announces only its VIP addresses as /128s (engines/announce.py).
    """
    out: list[Announcement] = []
    items = as_list(value, where, example="[{prefix: ..., site: a, cost: 10}]")
    for i, item in enumerate(items):
        f = Fields(item, where.index(i), "an announcement")
        f.reject_unknown(_ANNOUNCEMENT_KEYS)
        pw = f.at("prefix")
        prefix = as_ipv6_prefix(f.required("prefix", "2001:db8:a:1a0::/64"), pw)
        if not any(addr in prefix for _, addr in vips):
            listed = ", ".join(f"{n} {a}" for n, a in vips) or "none: the file has no vips"
            raise pw.error(
                f"{prefix} holds no VIP address, so the LB sites would attract traffic they "
                "do not serve",
                f"announce a prefix that holds a VIP address (VIPs: {listed})",
            )
        site = as_str(f.required("site", "primary"), f.at("site"), example="site: primary")
        cost = as_int(f.required("cost", "10"), f.at("cost"), lo=0, hi=1_000_000, noun="cost")
        out.append(Announcement(prefix, site, cost))
    return tuple(out)


def _speaker(f: Fields) -> BgpSettings:
    asn = _asn(f.get("asn"), f.at("asn"))
    router_id = None
    if f.has("router_id"):
        router_id = _router_id(f.get("router_id"), f.at("router_id"))
    hold = f.integer("hold", 3, lo=0, hi=65535, noun="hold time in seconds")
    if 0 < hold < 3:
        raise f.at("hold").error(
            f"a hold time of {hold} s is not allowed (RFC 4271 §4.2: 0 or at least 3)",
            "use `hold: 3` or more; BFD detects failures faster than any hold time",
        )
    keepalive = f.integer("keepalive", max(1, hold // 3), lo=1, hi=21845, noun="keepalive")
    if hold and keepalive * 3 > hold:
        raise f.at("keepalive").error(
            f"keepalive {keepalive} s is more than a third of the hold time {hold} s",
            f"use `keepalive: {max(1, hold // 3)}` or raise `hold`",
        )
    bfd = _bfd(f.get("bfd"), f.at("bfd")) if f.has("bfd") else BfdSettings()
    med = None
    if f.has("med"):
        med = as_int(f.get("med"), f.at("med"), lo=0, hi=MAX_U32, noun="MED (lower wins)")
    neighbours: list[Neighbour] = []
    if f.has("neighbours"):
        nw = f.at("neighbours")
        items = as_list(
            f.get("neighbours"), nw, example='[{address: "2001:db8:fffe::1", asn: 65000}]'
        )
        for i, item in enumerate(items):
            neighbours.append(_neighbour(item, nw.index(i), i))
        seen: dict[object, int] = {}
        for i, n in enumerate(neighbours):
            for key in (("address", n.address), ("name", n.name)):
                if key in seen:
                    raise (
                        nw.index(i)
                        .key(key[0])
                        .error(
                            f"neighbour {key[0]} {key[1]} is also neighbours[{seen[key]}]",
                            "list each neighbour once, with a unique name",
                        )
                    )
                seen[key] = i
    return BgpSettings(asn, router_id, hold, keepalive, bfd, med, tuple(neighbours))


def _asn(value: object, w: Where) -> int:
    asn = as_int(value, w, lo=1, hi=MAX_ASN, noun="AS number")
    if asn in (23456, 65535, MAX_ASN):
        raise w.error(
            f"AS {asn} is reserved (RFC 6793, RFC 7300)",
            "use a private AS from 64512-65534 or 4200000000-4294967294",
        )
    return asn


def _router_id(value: object, w: Where) -> str:
    fix = 'write it as a dotted quad, for example router_id: "192.0.2.11" (it is an id, not an address)'
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 < value <= MAX_U32:
            return str(IPv4Address(value))
        raise w.error(f"{value} is out of range", fix)
    if not isinstance(value, str):
        raise w.error(f"{describe(value)} is not a router id", fix)
    try:
        rid = IPv4Address(value.strip())
    except AddressValueError:
        raise w.error(f"{quote(value)} is not a router id", fix) from None
    if int(rid) == 0:
        raise w.error("router id 0.0.0.0 is not allowed (RFC 6286)", fix)
    return str(rid)


def _bfd(value: object, w: Where) -> BfdSettings:
    if isinstance(value, bool):
        return BfdSettings(enabled=value)
    f = Fields(value, w, "`bfd:`")
    f.reject_unknown(_BFD_KEYS)
    enabled = f.boolean("enabled", True)
    interval = 0.1
    if f.has("interval"):
        interval = as_number(f.get("interval"), f.at("interval"), lo=0.0, hi=60.0, noun="seconds")
        if interval < 0.01:
            raise f.at("interval").error(
                f"a BFD interval of {interval} s is below what BIRD schedules reliably",
                "use `interval: 0.01` or more (0.1 gives 0.3 s detection with multiplier 3)",
            )
    multiplier = f.integer("multiplier", 3, lo=1, hi=255, noun="BFD multiplier")
    return BfdSettings(enabled, interval, multiplier)


def _neighbour(value: object, w: Where, i: int) -> Neighbour:
    f = Fields(value, w, "a neighbour")
    f.reject_unknown(_NEIGHBOUR_KEYS)
    address = require_unicast(
        as_ipv6_address(f.required("address", '"2001:db8:fffe::1"'), f.at("address")),
        f.at("address"),
        what="a BGP neighbour",
    )
    asn = _asn(f.required("asn", "65000"), f.at("asn"))
    name = f.string("name", f"peer{i}", example="name: upstream")
    if not name.replace("_", "a").isalnum() or not name[0].isalpha() or len(name) > 32:
        raise f.at("name").error(
            f"{quote(name)} is not a usable protocol name",
            "use 1 to 32 letters, digits and '_', starting with a letter",
        )
    interface = None
    if f.has("interface"):
        interface = as_str(f.get("interface"), f.at("interface"), example="interface: up0")
        if len(interface) > 15 or '"' in interface or "/" in interface or " " in interface:
            raise f.at("interface").error(
                f"{quote(interface)} is not a Linux interface name",
                "use at most 15 characters without spaces, quotes or '/'",
            )
    local_pref = None
    if f.has("local_pref"):
        local_pref = as_int(
            f.get("local_pref"), f.at("local_pref"), lo=0, hi=MAX_U32, noun="local-pref"
        )
    return Neighbour(name, address, asn, interface, local_pref)
