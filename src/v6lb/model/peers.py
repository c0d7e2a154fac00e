"""``lb.peers``: the other instances of an anycast site, for the proxies' second chance.

Parsed here, rendered by render/peers.py, installed by the proxy planes
(engines/proxy/run.py; docs/anycast.md, "Proxy connections across instances")::

    lb:
      peers:
        interface: up0                 # the link this instance shares with the others
        addresses: [2001:db8:1::3]     # the other instances' addresses on it

A TCP packet to a proxy or nat VIP that opens no connection and belongs to none of this
instance's (picked up mid-stream by conntrack) is sent on to every peer, which may
still hold its socket or its nat flow (a stopping instance, after BGP moved its flows
here). The kernel plane installs it for the nat VIPs, in its own table.
Pure: YAML-decoded data in, :class:`Peers` or :class:`ConfigError` out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Final

from v6lb.model.schema import ConfigError, Fields, Where, unicast_list

__all__ = ["Peers", "check_peers", "parse_peers"]

_KEYS: Final = ("interface", "addresses")
_IFNAME_RE: Final = re.compile(r"[^\s/:%]{1,15}")


@dataclass(frozen=True, slots=True)
class Peers:
    """The other instances (``addresses``), reached on ``interface``."""

    interface: str
    addresses: tuple[IPv6Address, ...]


def parse_peers(value: object, where: Where, *, lb_addresses: Sequence[IPv6Address]) -> Peers:
    f = Fields(value, where, "`lb.peers:`")
    f.reject_unknown(_KEYS)
    ifname = f.required("interface", "up0")
    if not isinstance(ifname, str) or not _IFNAME_RE.fullmatch(ifname) or ifname in (".", ".."):
        raise f.at("interface").error(
            f"{ifname!r} is not a valid Linux interface name",
            "give the link this instance shares with its peers, such as eth0 (1 to 15"
            " characters without spaces, '/', ':' or '%')",
        )
    if not f.has("addresses"):
        raise f.at("addresses").error(
            "lb.peers needs the other instances' addresses",
            "add addresses: [PEER, ...] (their addresses on the shared interface)",
        )
    addresses = unicast_list(f, "addresses", example="[2001:db8:1::3]", what="a peer's address")
    if not addresses:
        raise f.at("addresses").error(
            "the list of peers is empty",
            "list the other instances' addresses on the shared link, or remove lb.peers",
        )
    for i, addr in enumerate(addresses):
        if addr in lb_addresses:
            raise (
                f.at("addresses")
                .index(i)
                .error(
                    f"{addr} is one of lb.addresses (this instance's own)",
                    "list the other instances' addresses only (each instance's file lists the"
                    " others)",
                )
            )
    return Peers(ifname, addresses)


def check_peers(peers: Peers | None, tcp_vips: int, where: Where) -> None:
    """The check that needs the VIPs: the second chance is for proxy and nat VIPs over TCP."""
    if peers is not None and tcp_vips == 0:
        raise ConfigError(
            where.file,
            where.path,
            "the file has no proxy-l4, proxy-l7 or nat VIP over TCP, and lb.peers only hands"
            " such connections to the other instances",
            "remove lb.peers, or add a VIP with mode: proxy-l4, proxy-l7 or nat",
        )
