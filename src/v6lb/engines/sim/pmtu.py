"""Path MTU discovery on the reply path: the facts ``v6lb explain --failure packet-too-big`` adds.

:func:`reply_route` walks the FIBs from a backend to the client (the hops its reply
takes, ECMP included), :func:`narrow_link` finds the link on it that makes a router
send Packet Too Big (or the one a walk-through lowers when the file has none), and
:func:`engine_notes` says how each engine passes a Packet Too Big for a VIP on to the
backend that owns the quoted flow: the kernel data plane (nft, with the counter names
it uses for this VIP), the Python data plane and the simulator (the core), the proxy
engines (the LB's own socket). :data:`CANNOT_WORK` names the setups where no LB can
make it work. The text is what the code does today (docs/pmtu.md says the same).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from v6lb.engines.sim.node import ecmp_index
from v6lb.model.config import Config, Vip
from v6lb.model.modes import Kind, facts
from v6lb.model.topology import lookup, neighbour
from v6lb.render.nftables import (
    ICMP_LIMITED,
    PYTHON_ICMP_ERROR_BURST,
    PYTHON_ICMP_ERROR_RATE,
    icmp_error_counter,
    icmp_unmatched_counter,
    npt_icmp_counter,
    npt_icmp_unmatched_counter,
)
from v6lb.wire import build
from v6lb.wire.constants import MIN_MTU, TCP_ACK

if TYPE_CHECKING:
    from v6lb.engines.sim.scenario import Sim

__all__ = ["CANNOT_WORK", "Narrow", "engine_notes", "narrow_link", "reply_route"]


def reply_route(
    sim: Sim, node: str, src: bytes, dst: bytes, sport: int, dport: int
) -> list[tuple[str, str, str]]:
    """(link, from, to) of each hop a TCP segment ``src`` -> ``dst`` takes from ``node``."""
    pkt = build.tcp(src, dst, sport, dport, flags=TCP_ACK)
    target = ipaddress.IPv6Address(dst)
    here = node
    out: list[tuple[str, str, str]] = []
    for _ in range(32):
        n = sim.net.nodes[here]
        if dst in n.local:
            return out
        entry = lookup(n.fib, target, ipaddress.IPv6Address(src))
        if entry is None:
            return out
        nh = entry.nexthops[ecmp_index(pkt, len(entry.nexthops))]
        nxt = neighbour(sim.topology, nh, target)
        if nxt is None:
            return out
        out.append((nh.link, here, nxt))
        here = nxt
    return out


@dataclass(frozen=True, slots=True)
class Narrow:
    """The link on a reply's way whose MTU is smaller than the backend's segments."""

    link: str
    router: str  # the node that forwards onto it: it sends the Packet Too Big
    mtu: int
    lowered_from: int | None  # set when the walk-through lowered it (the file has none)


def narrow_link(sim: Sim, route: list[tuple[str, str, str]], mtu: int = MIN_MTU) -> Narrow | None:
    """The smallest link after the backend's own and before the client's that is smaller
    than both, else the one nearest the client to lower to ``mtu`` (``lowered_from``
    set); None when the reply crosses no such link (the backend is on the client's link).

    The ends are left out: a smaller link at the backend makes its segments small from
    the start, one at the client makes the client advertise a small MSS. Neither needs
    a Packet Too Big.
    """
    if len(route) < 3:
        return None
    first = sim.net.mtu(route[0][0])
    last = sim.net.mtu(route[-1][0])
    middle = route[1:-1]
    smallest = min(middle, key=lambda r: sim.net.mtu(r[0]))
    if sim.net.mtu(smallest[0]) < min(first, last):
        return Narrow(smallest[0], smallest[1], sim.net.mtu(smallest[0]), None)
    link, router, _ = middle[-1]
    return Narrow(link, router, mtu, sim.net.mtu(link))


CANNOT_WORK: Final = (
    {
        "where": "a stateful firewall or middlebox in front of the LB",
        "why": "it drops ICMPv6 errors, or lets them through only when they relate to a"
        " connection it saw both ways. With DSR it sees the client's packets only (the"
        " replies take another path), so it never relates the router's Packet Too Big to"
        " a flow. The error never reaches the LB, the backend keeps sending full-size"
        " segments, and the connection stalls (a PMTU black hole). Let ICMPv6 type 2"
        " (Packet Too Big) to the VIPs through (RFC 4890).",
    },
    {
        "where": "a firewall or middlebox on the client's side that drops ICMPv6",
        "why": "a Packet Too Big from a router between it and the client never leaves for"
        " the VIP (reply path), and one about the client's own large packets never reaches"
        " the client (inbound): the sender keeps sending packets that are too big, and v6lb"
        " never sees the error.",
    },
    {
        "where": "ICMPv6 filtered on the backend",
        "why": "the LB passes the error on, but a host firewall on the backend (or in front"
        " of it) drops it, so its TCP never lowers the path MTU.",
    },
    {
        "where": "an ECMP router in front of several LB instances with different backend tables",
        "why": "the error is hashed on its own header, not the flow's, so it can reach"
        " another instance than the flow's packets. Instances with the same file and"
        " flow_hash_seed build the same Maglev table and pick the same backend; with"
        " another configuration (other backends, weights, seed or table size) the error"
        " goes to a backend that has no such connection and is ignored there.",
    },
    {
        "where": "tunnelled ICMPv6 errors dropped between the LB and the backends",
        "why": "dsr-ip6ip6 and dsr-srv6 send the error inside the flow's tunnel; a filter"
        " between the LB and the backend that drops IPv6-in-IPv6 or SRv6 (or the backend's"
        " decapsulation refusing the LB's address) drops it with the flow's packets.",
    },
)
"""Setups where a Packet Too Big for the VIP cannot reach the backend, whatever the LB does."""


_SHAPES: Final = (
    "TCP/UDP right after the quoted IPv6 header: the reversed 4-tuple",
    "a quoted first fragment (Fragment header, offset 0) of TCP/UDP: the 4-tuple 8 bytes on",
    "one 8-byte Hop-by-Hop or Destination Options header, then TCP/UDP: the 4-tuple",
    "a quoted later fragment of TCP/UDP (no ports): the 3-tuple client, VIP, upper layer,"
    " for the address's first VIP of that protocol",
)
"""The quote shapes both data planes read (the kernel at fixed offsets, the core alike)."""
_UNMATCHED: Final = (
    "every other ICMPv6 error to the VIP's address is dropped and counted as unmatched,"
    " never answered: a quote cut before the client's port, a quoted source that is not"
    " the VIP, a port the address does not serve, a longer extension-header chain, a quote"
    " of neither TCP nor UDP"
)


def engine_notes(config: Config, vip: Vip) -> list[dict[str, object]]:
    """Per engine: how a Packet Too Big for ``vip``'s address reaches the flow's backend."""
    mode = facts(vip.mode)
    first = next(v for v in config.vips if v.address == vip.address)
    done, unmatched = icmp_error_counter(config, vip), icmp_unmatched_counter(config, first)
    limit = (
        f"the python plane's own nft table (chain icmp_limit) lets at most"
        f" {PYTHON_ICMP_ERROR_RATE} ICMPv6 errors per second (burst {PYTHON_ICMP_ERROR_BURST})"
        f" to the VIPs and npt prefixes reach its TUN devices, which the flows share; more"
        f" are dropped and counted ({ICMP_LIMITED})"
    )
    if mode.kind is Kind.DSR:
        if mode.tunnels:
            chain, follows = "icmp_errors", "takes the flow's fwmark rule and seg6 route"
        else:
            chain = "icmp_errors_l2 (netdev table)"
            follows = "gets the flow's MAC rewrite and fwd to the backend"
        kernel: dict[str, object] = {
            "how": f"nft, no socket: after the balancing rules one jump sends ICMPv6 errors to"
            f" the {chain} chain, whose rules read the quote at fixed offsets, reverse it into"
            " the client's flow and hash it (jhash, the VIP's seed) into the VIP's Maglev map."
            f" The error gets the flow's backend and {follows}, like the flow's packets",
            "quote_shapes": list(_SHAPES),
            "dropped": _UNMATCHED,
            "counters": {
                done: "errors passed on to the flow's backend",
                unmatched: f"errors to {vip.address} that quote no flow of its VIPs, dropped",
            },
        }
        sent = mode.encap.sent if mode.tunnels else "by MAC rewrite"
        core = (
            "DsrForwarder._icmp_error reads the quote in the same shapes as the kernel, so"
            " both planes send every error to the same backend; it looks the reversed flow"
            " up in its flow cache (never adding it, so forged errors evict nothing) or"
            f" hashes it on the same Maglev table, and sends the error to that backend {sent}."
            " Errors in no shape, from another source or for a port not served are dropped"
            " and counted as unmatched"
        )
    elif mode.kind is Kind.NAT:
        kernel = {
            "how": "conntrack relates the error to the flow it quotes (ct state related) and"
            " nf_nat translates the error and its quote back to the backend",
            "dropped": "an error that quotes no tracked flow (ct state invalid) is dropped"
            " and counted",
            "counters": {
                done: "errors nf_nat translated",
                unmatched: f"errors to {vip.address} that quote no tracked flow, dropped",
            },
        }
        core = (
            "NatForwarder looks the quote up in its conntrack and translates the outer"
            " header, the quote and the checksums back to the backend; an error that quotes"
            " no tracked flow is dropped and counted as unmatched"
        )
    else:
        raise ValueError(f"no Packet Too Big walk-through for {vip.mode}")
    notes: list[dict[str, object]] = [
        {"engine": "kernel", "run": "v6lb run --dataplane kernel", **kernel},
        {
            "engine": "python",
            "run": "v6lb run --dataplane python",
            "how": f"the core: {core}",
            "limit": limit,
            "counters": {"icmp_errors": "v6lb status: forwarded, translated, unmatched"},
        },
        {
            "engine": "simulator",
            "run": "v6lb explain, v6lb demo, v6lb lab diff",
            "how": f"the core, as the python data plane: {core}",
        },
        {
            "engine": "proxy",
            "run": "v6lb run --proxy builtin|haproxy (proxy-l4, proxy-l7)",
            "how": "nothing to pass on: the LB terminates the client's TCP, so the segment"
            " came from its own socket and the Packet Too Big for the VIP is for that socket;"
            " the LB's kernel lowers its path MTU to the client and resends smaller segments."
            " Its connection to the backend has a path MTU of its own",
        },
    ]
    for i, pair in enumerate(config.npt):
        notes.append(
            {
                "engine": "npt (both planes)",
                "run": f"npt: {pair.inside} <-> {pair.outside}",
                "how": "the Packet Too Big goes to the mapped address. kernel: ip6tables DNPT"
                " maps the destination and the quoted source back inside, after the npt_icmp"
                " chain dropped and counted errors with a truncated quote (ip6 length < 48) or"
                " a quoted source outside the outside prefix. python and the simulator:"
                " NptForwarder maps both, checksum-neutral, and drops the same ones",
                "counters": {
                    npt_icmp_counter(i): "errors DNPT translates",
                    npt_icmp_unmatched_counter(i): "errors dropped: truncated, or not ours",
                },
            }
        )
    return notes
