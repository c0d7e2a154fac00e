"""``lb.conntrack_sync``: replicate the kernel's NAT flows to the other instance of a site.

Parsed here, rendered by render/conntrackd.py, run by engines/kernel/conntrackd.py
(docs/anycast.md, "NAT flows across instances")::

    lb:
      conntrack_sync:
        interface: v6lb-sync0      # the dedicated link between the two instances
        address: fd00:99::1        # this instance's address on it
        peer: fd00:99::2           # the other instance's address on it
        port: 3780                 # UDP port of conntrackd's FTFW protocol (default)
        peer_snat: [2001:db8:5::2] # the peer's SNAT addresses, announced here as standby

conntrackd's unicast UDP transport has one destination, so a site that syncs has two
instances. Pure: YAML-decoded data in, :class:`ConntrackSync` or :class:`ConfigError` out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from typing import Final

from v6lb.model.schema import (
    ConfigError,
    Fields,
    Where,
    as_ipv6_address,
    require_unicast,
    unicast_list,
)

__all__ = ["DEFAULT_SYNC_PORT", "ConntrackSync", "check_sync", "parse_conntrack_sync"]

DEFAULT_SYNC_PORT: Final = 3780
_KEYS: Final = ("interface", "address", "peer", "port", "peer_snat")
_IFNAME_RE: Final = re.compile(r"[^\s/:%]{1,15}")


@dataclass(frozen=True, slots=True)
class ConntrackSync:
    """conntrackd in FTFW mode over UDP between ``address`` and ``peer`` on ``interface``."""

    interface: str
    address: IPv6Address
    peer: IPv6Address
    port: int = DEFAULT_SYNC_PORT
    peer_snat: tuple[IPv6Address, ...] = ()


def parse_conntrack_sync(
    value: object,
    where: Where,
    *,
    lb_addresses: Sequence[IPv6Address],
    lb_interfaces: Sequence[str],
) -> ConntrackSync:
    f = Fields(value, where, "`lb.conntrack_sync:`")
    f.reject_unknown(_KEYS)
    ifname = f.required("interface", "v6lb-sync0")
    w = f.at("interface")
    if not isinstance(ifname, str) or not _IFNAME_RE.fullmatch(ifname) or ifname in (".", ".."):
        raise w.error(
            f"{ifname!r} is not a valid Linux interface name",
            "use 1 to 15 characters without spaces, '/', ':' or '%', such as v6lb-sync0",
        )
    if ifname in lb_interfaces:
        raise w.error(
            f"{ifname} is one of lb.interfaces, which carry client and backend traffic",
            "give the sync its own link between the two instances (a dedicated interface)",
        )
    address = _unicast(f, "address", "fd00:99::1")
    if address in lb_addresses:
        raise f.at("address").error(
            f"{address} is one of lb.addresses",
            "use this instance's address on the dedicated sync link, such as fd00:99::1",
        )
    peer = _unicast(f, "peer", "fd00:99::2")
    if peer == address:
        raise f.at("peer").error(
            f"{peer} is this instance's own sync address",
            "give the other instance's address on the sync link",
        )
    port = f.integer("port", DEFAULT_SYNC_PORT, lo=1, hi=65535, noun="UDP port")
    snat = unicast_list(f, "peer_snat", example="[2001:db8:5::2]", what="a SNAT address")
    return ConntrackSync(ifname, address, peer, port, snat)


def _unicast(f: Fields, name: str, example: str) -> IPv6Address:
    w = f.at(name)
    addr = as_ipv6_address(f.required(name, example), w)
    return require_unicast(addr, w, what="a conntrackd sync address")


def check_sync(
    sync: ConntrackSync | None,
    own_snat: Sequence[IPv6Network],
    has_nat: bool,
    bgp: Mapping[str, object] | None,
    where: Where,
) -> None:
    """The checks that need the rest of the file: nat VIPs, their SNAT, ``bgp:``."""
    if sync is None:
        return
    if not has_nat:
        raise ConfigError(
            where.file,
            where.path,
            "the file has no nat VIP, so there is no NAT state to sync",
            "remove lb.conntrack_sync, or add a VIP with mode: nat",
        )
    for i, addr in enumerate(sync.peer_snat):
        w = where.key("peer_snat").index(i)
        mine = next((n for n in own_snat if addr in n), None)
        if mine is not None:
            raise w.error(
                f"{addr} is in this instance's own snat {mine}",
                "list the other instance's SNAT addresses here, not this one's",
            )
        if bgp is None or "asn" not in bgp:
            raise w.error(
                "peer_snat is announced over BGP, and the file has no bgp: speaker (asn)",
                "add a bgp: section with asn and neighbours, or remove peer_snat",
            )
