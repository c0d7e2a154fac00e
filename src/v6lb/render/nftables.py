"""nftables rulesets for the kernel data plane: ``nat``, ``dsr-l2`` and the tunnel-DSR marks.

Pure: a config (plus, for ``dsr-l2``, the host facts it needs) in, ``nft -f`` text out.

One file is one transaction. It starts with, for each family::

    table ip6 v6lb_lb1
    delete table ip6 v6lb_lb1

(create-if-missing, then delete), then defines the tables again, so loading it
replaces whatever the instance had before, or changes nothing if any line fails.
Everything v6lb owns carries its tag: the table name ``v6lb_<instance>``, the
table comment and every rule's comment ``v6lb:<instance> ...``.

``table ip6 v6lb_<instance>``
  * ``mangle_pre`` (filter, prerouting, priority mangle): first the tunnel-DSR
    marks (below), each rule ending in ``accept``; then, for every address
    served by a ``dsr-*`` VIP, TCP/UDP to a (protocol, port) that no VIP
    at that address serves is counted (named counter ``<vip>_unserved``) and
    dropped; ICMPv6 passes. A packet a mark rule took is served, so the guard
    would not drop it: the ``accept`` only spares it the guard's set lookup
    (``accept`` ends this base chain, not the packet's later hooks). Only DSR
    addresses are guarded here: this chain sees every packet.
  * ``nat_pre`` (nat, prerouting, dstnat): first the same guard for the
    addresses served by ``nat`` VIPs only. A nat chain sees the first packet of
    each conntrack entry only, and a dropped packet never confirms its entry,
    so every packet to an unserved port is still counted and dropped, without
    a per-packet rule for the established flows (measured: docs/benchmarks.md).
    Packets conntrack finds ``invalid`` skip nat chains, for served and
    unserved ports alike. Then, per ``nat`` VIP::

        ip6 daddr VIP tcp dport { 80, 443 } counter name "v0_web"
            meta mark set jhash ip6 saddr . ip6 daddr . tcp sport . tcp dport mod 65537 seed 0x5eed
            dnat ip6 to meta mark map @v0_web

    ``v0_web`` is a ``type mark : ipv6_addr`` map with one element per Maglev
    slot, filled from :attr:`BackendPool.table`. nft's ``jhash ... mod N`` is
    ``reciprocal_scale(jhash, N)``, the index :meth:`BackendPool.pick_flow`
    uses, so the kernel and the Python core pick the same backend for every flow.
    When a backend's port differs from the VIP port the map is
    ``type mark : ipv6_addr . inet_service`` and the statement
    ``dnat ip6 addr . port to meta mark map @...``; if some backends give a port
    and others do not, each VIP port gets its own map.
  * ``nat_post`` (nat, postrouting, srcnat): optional SNAT of the VIP's flows,
    ``snat ip6 to [ADDR]:LOW-HIGH`` (a pool: ``[FIRST]-[LAST]:LOW-HIGH persistent``).
  * Every packet of a ``nat`` VIP is counted, one map lookup each way:
    ``counter name ip6 daddr . meta l4proto . th dport map @nat_in`` in ``mangle_pre``
    (after the DSR balancing rules, before DNAT) and ``... ip6 saddr ... th sport map
    @nat_out`` in ``count_post`` (filter, postrouting, srcnat + 10: a reply has the VIP
    as its source again); the maps name the VIP's counters ``<vip>_in``/``<vip>_out``.

``dsr-ip6ip6``/``dsr-srv6`` (same table, ``mangle_pre``)::

    ... meta mark set jhash ... mod 65537 seed S meta mark set meta mark map @v5_x accept

  with a ``type mark : mark`` map from slot to the backend's mark, which is
  also its routing table (:mod:`v6lb.render.routes`).

``table netdev v6lb_<instance>`` (``dsr-l2``): one ingress chain on the device
where clients' packets arrive::

    ... meta mark set jhash ... ether saddr set LB_MAC ether daddr set meta mark map @v3_x fwd to "eth1"

Limits, measured on Linux 6.18 / nft 1.0.6 and kept here:
  * ``dnat ip6 to jhash ... map @m`` is refused (datatype mismatch), hence the mark.
  * A chain may not be named after a keyword (``mark``, ``snat``...).
  * A statement that ends in an IPv6 address directly followed by ``}`` is a syntax
    error; this renderer puts every closing brace on its own line.
  * The first packet of a ``nat`` flow leaves with its slot as ``meta mark``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from typing import Final

from v6lb.core.backends import BackendPool
from v6lb.model.config import Config, NatOptions, Vip, VipMode
from v6lb.model.modes import Kind, Plane, modes_where
from v6lb.model.pools import pool_for
from v6lb.model.status import IcmpErrors
from v6lb.render.peers import second_chance_objects
from v6lb.render.routes import (
    TAG_SPAN,
    BackendHost,
    RenderError,
    backend_vips,
    decap_address,
    host_addresses,
    instance_tag,
    lb_sources,
    tunnel_targets,
)

__all__ = [
    "CONNTRACK_FULL",
    "backend_counter",
    "render_ring_steer",
    "NAT_UNSYNCED",
    "FORWARD_COUNTERS",
    "KERNEL_MODES",
    "L2Ports",
    "NatMap",
    "RenderError",
    "map_names",
    "nat_maps",
    "drain_flow_sets",
    "nat_traffic_counters",
    "render_backend_nft",
    "render_drain_flows",
    "render_map_update",
    "render_forward_nft",
    "render_nft",
    "render_remove",
    "table_name",
    "unserved_counters",
    "vip_counter",
    "vip_prefixes",
    "vip_object_name",
]

KERNEL_MODES: Final = modes_where(plane=Plane.KERNEL, vip=True)
"""The VIP modes of the kernel data plane (nat and dsr-*), from the mode table."""
_FAMILIES: Final = ("ip6", "netdev")
_NAME_SAFE: Final = re.compile(r"[^A-Za-z0-9_]")
_ANY: Final = IPv6Network("::/0")
VIP_PREFIX_LEN: Final = 64
"""The VIP prefix: the /64 around each VIP (the subnet a router sends to the LB)."""
CONNTRACK_FULL: Final = "conntrack_full"
NAT_UNSYNCED: Final = "nat_unsynced"
UNSYNCED_HOLD: Final = 2  # seconds a flow's first mid-stream packet keeps the next ones passing
FORWARD_COUNTERS: Final = ("forward_denied", "forward_unreachable", "forward_allowed")
"""The forward filter's named counters: dropped, answered with a Destination Unreachable, let through by ``lb.forward_allow``."""


def table_name(instance: str) -> str:
    """The tagged table name of an instance (the same in the ``ip6`` and ``netdev`` families)."""
    return f"v6lb_{instance}"


def _tag(config: Config) -> str:
    return f"v6lb:{config.lb.instance}"


def vip_object_name(config: Config, vip: Vip) -> str:
    """``v<index>_<name>``: unique per VIP, never an nft keyword."""
    i = config.vips.index(vip)
    return f"v{i}_{_NAME_SAFE.sub('_', vip.name)}"


def vip_counter(config: Config, vip: Vip) -> str:
    """The named counter of a VIP's balancing rule (nat: new flows; dsr-*: packets)."""
    return vip_object_name(config, vip)


def backend_counter(config: Config, vip: Vip, index: int) -> str:
    """The named counter of the packets the kernel plane sends to backend ``index`` of ``vip``.

    Counted where the backend is chosen, one lookup in a ``... : counter`` map per packet:
    tunnel DSR VIPs by the backend's mark (``backend_in``), dsr-l2 VIPs by the rewritten
    MAC (``<map>_bin``), nat VIPs after DNAT by (VIP, protocol, backend, port)
    (``nat_backend_in``, in ``count_post``).
    """
    return f"{vip_object_name(config, vip)}_b{index}"


def _backend_counter_blocks(config: Config, vip: Vip) -> list[str]:
    tag = _tag(config)
    out: list[str] = []
    for j, b in enumerate(vip.backends):
        out += _counter_block(
            backend_counter(config, vip, j), f"{tag} {vip.name}: packets to backend {b.address}"
        )
    return out


def _counter_map(name: str, kind: str, comment: str, elements: Mapping[str, str]) -> list[str]:
    """A ``kind : counter`` map (``counter name KEY map @name``), one element per key."""
    return [
        f"\tmap {name} {{",
        f"\t\ttype {kind} : counter",
        f'\t\tcomment "{comment}"',
        "\t\telements = {",
        *(f'\t\t\t{key} : "{counter}",' for key, counter in elements.items()),
        "\t\t}",
        "\t}",
    ]


def nat_traffic_counters(config: Config, vip: Vip) -> tuple[str, str]:
    """A ``nat`` VIP's named counters of every packet: (client to VIP, replies to clients).

    ``mangle_pre`` counts the packets to the VIP's (protocol, port)s before DNAT, a
    ``count_post`` chain after srcnat the packets leaving as the VIP (the replies, once
    nf_nat restored their source); one lookup in an ``ipv6_addr . inet_proto .
    inet_service : counter`` map each (``nat_in``, ``nat_out``), whatever the VIP count.
    """
    name = vip_object_name(config, vip)
    return f"{name}_in", f"{name}_out"


def _nat_traffic_maps(config: Config) -> list[str]:
    """The ``nat_in``/``nat_out`` maps: (address, protocol, port) -> the VIP's counter."""
    tag = _tag(config)
    lines: list[str] = []
    for i, (name, what) in enumerate((("nat_in", "to"), ("nat_out", "from"))):
        lines += [
            f"\tmap {name} {{",
            "\t\ttype ipv6_addr . inet_proto . inet_service : counter",
            f'\t\tcomment "{tag}: nat VIP (address, protocol, port) -> its counter of packets'
            f' {what} it"',
            "\t\telements = {",
        ]
        for vip in _nat_vips(config):
            counter = nat_traffic_counters(config, vip)[i]
            lines += [
                f'\t\t\t{vip.address} . {vip.protocol} . {p} : "{counter}",' for p in vip.ports
            ]
        lines += ["\t\t}", "\t}"]
    return lines


# --- the Maglev tables -----------------------------------------------------------


def _pools(config: Config, pools: Mapping[str, BackendPool] | None) -> dict[str, BackendPool]:
    out: dict[str, BackendPool] = {}
    for vip in config.vips:
        if vip.mode not in KERNEL_MODES:
            continue
        given = pools.get(vip.name) if pools is not None else None
        pool = given if given is not None else pool_for(vip, config.lb.flow_hash_seed)
        if len(pool) != len(vip.backends) or pool.seed != config.lb.flow_hash_seed:
            raise RenderError(
                f"the pool given for VIP {vip.name} does not match the config"
                " (backend count or flow_hash_seed)"
            )
        out[vip.name] = pool
    return out


@dataclass(frozen=True, slots=True)
class NatMap:
    """One DNAT map of a ``nat`` VIP: its name, the VIP ports it serves, its value per backend."""

    name: str
    ports: tuple[int, ...]
    values: tuple[str, ...]  # per backend: "ADDR" or "ADDR . PORT"
    with_port: bool


def nat_maps(config: Config, vip: Vip) -> list[NatMap]:
    """The DNAT maps of a ``nat`` VIP (one, or one per VIP port when ports are mixed)."""
    base = vip_object_name(config, vip)
    explicit = [b.port is not None for b in vip.backends]
    if not any(explicit):
        return [NatMap(base, vip.ports, tuple(str(b.address) for b in vip.backends), False)]
    if all(explicit) or len(vip.ports) == 1:
        port0 = vip.ports[0]
        values = tuple(f"{b.address} . {b.port or port0}" for b in vip.backends)
        return [NatMap(base, vip.ports, values, True)]
    return [
        NatMap(
            f"{base}_p{port}",
            (port,),
            tuple(f"{b.address} . {b.port or port}" for b in vip.backends),
            True,
        )
        for port in vip.ports
    ]


def map_names(config: Config, vip: Vip) -> list[str]:
    """The names of the maps that carry a VIP's Maglev table."""
    if vip.mode is VipMode.NAT:
        return [m.name for m in nat_maps(config, vip)]
    return [vip_object_name(config, vip)]


def _elements(table: Sequence[int], values: Sequence[str], indent: str) -> list[str]:
    # One element per line, each ending with a comma: no address is ever followed
    # by "}" on its line (the nft 1.0.6 quirk).
    return [f"{indent}{slot} : {values[b]}," for slot, b in enumerate(table)]


def _map_block(
    name: str, value_type: str, comment: str, table: Sequence[int], values: Sequence[str]
) -> list[str]:
    lines = [
        f"\tmap {name} {{",
        f"\t\ttype mark : {value_type}",
        f'\t\tcomment "{comment}"',
    ]
    if table and table[0] >= 0:
        lines.append("\t\telements = {")
        lines.extend(_elements(table, values, "\t\t\t"))
        lines.append("\t\t}")
    lines.append("\t}")
    return lines


def _counter_block(name: str, comment: str) -> list[str]:
    return [f"\tcounter {name} {{", f'\t\tcomment "{comment}"', "\t}"]


# --- rule pieces -------------------------------------------------------------------


def _ports(ports: Sequence[int]) -> str:
    return str(ports[0]) if len(ports) == 1 else "{ " + ", ".join(map(str, ports)) + " }"


def _match(vip: Vip, ports: Sequence[int]) -> str:
    proto = str(vip.protocol)
    return f"ip6 daddr {vip.address} {proto} dport {_ports(ports)}"


def _jhash(vip: Vip, pool: BackendPool) -> str:
    p = str(vip.protocol)
    return (
        f"meta mark set jhash ip6 saddr . ip6 daddr . {p} sport . {p} dport"
        f" mod {pool.size} seed {pool.seed:#x}"
    )


DRAIN_FLOW_TIMEOUT: Final = 600
"""Seconds a flow that a drain sent to another backend is remembered after its last packet."""
_FLOW_KEY: Final = "ip6 saddr . tcp sport . tcp dport"


def _keeps_flows(vip: Vip) -> bool:
    """A TCP DSR VIP: a drain keeps its open flows (the SYN tells a new flow from an old one)."""
    return vip.mode.is_dsr and str(vip.protocol) == "tcp"


def drain_flow_sets(config: Config, pools: Mapping[str, BackendPool]) -> list[tuple[str, str]]:
    """(family table, set) of every ``<map>_new`` set whose flows matter now: a drain in effect.

    A reload replaces the instance's tables, and these sets with them; the kernel plane
    copies their elements into the new ones in the same transaction
    (:func:`render_drain_flows`).
    """
    out = []
    for vip in config.vips:
        pool = pools.get(vip.name)
        if vip.mode not in KERNEL_MODES or not _keeps_flows(vip) or pool is None or not pool.moved:
            continue
        family = "netdev" if vip.mode is VipMode.DSR_L2 else "ip6"
        out.append(
            (f"{family} {table_name(config.lb.instance)}", f"{vip_object_name(config, vip)}_new")
        )
    return out


def render_drain_flows(table: str, name: str, elements: Sequence[str]) -> str:
    """``add element`` of flows (``ADDR . SPORT . DPORT timeout Ts expires Es``) to a set."""
    lines = _add_elements(table, name, [f"\t{e}," for e in elements])
    return "\n".join(lines) + "\n" if lines else ""


def _slot_set_block(name: str, comment: str, slots: Sequence[int]) -> list[str]:
    lines = [f"	set {name} {{", "		type mark", f'		comment "{comment}"']
    if slots:
        lines.append("		elements = {")
        lines += [f"			{slot}," for slot in slots]
        lines.append("		}")
    lines.append("	}")
    return lines


def _drain_objects(
    tag: str, vip: Vip, name: str, value_type: str, pool: BackendPool, values: Sequence[str]
) -> list[str]:
    """The maps and sets that keep a drained backend's open flows (docs/operations.md)."""
    lines = _map_block(
        f"{name}_keep",
        value_type,
        f"{tag} {vip.name}: Maglev slot -> backend, draining backends kept (open flows)",
        pool.keep_table if pool.moved else [],  # looked up in moved slots only
        values,
    )
    lines += _slot_set_block(
        f"{name}_moved", f"{tag} {vip.name}: slots a drain gave another backend", pool.moved
    )
    lines += [
        f"	set {name}_new {{",
        f"		typeof {_FLOW_KEY}",
        "		size 65536",
        "		flags dynamic,timeout",
        f"		timeout {DRAIN_FLOW_TIMEOUT}s",
        f'		comment "{tag} {vip.name}: flows opened in a moved slot since the drain"',
        "	}",
    ]
    return lines


def _balance_rule(tag: str, vip: Vip, pool: BackendPool, counter: str, name: str, send: str) -> str:
    """A DSR VIP's rule: count, hash to the slot, then ``send`` (TCP: by ``{name}_pick``)."""
    then = f"goto {name}_pick" if _keeps_flows(vip) else send
    return (
        f'{_match(vip, vip.ports)} counter name "{counter}" {_jhash(vip, pool)}'
        f' {then} comment "{tag} {vip.name}"'
    )


def _drain_chains(tag: str, vip: Vip, name: str, send: str, keep: str) -> list[str]:
    """``{name}_pick`` (the balancing rule goes there with the slot in meta mark) and ``_drain``.

    A slot that a drain gave another backend: a SYN opens a new flow (remembered in
    ``@{name}_new``, then sent by the table); a remembered flow goes by the table too;
    any other packet belongs to a flow opened before the drain and keeps its backend
    (``@{name}_keep``). Every other slot: the table. ``send``/``keep``: the statements
    that send by the table / by the keep map.
    """
    update = f"update @{name}_new {{ {_FLOW_KEY} }}"
    return [
        f"	chain {name}_pick {{",
        f'		meta mark @{name}_moved jump {name}_drain comment "{tag} {vip.name}: drained"',
        f'		{send} comment "{tag} {vip.name}"',
        f'		drop comment "{tag} {vip.name}: no backend takes new flows"',
        "	}",
        f"	chain {name}_drain {{",
        f'		tcp flags & (syn | ack) == syn {update} return comment "{tag} {vip.name}: new"',
        f'		{_FLOW_KEY} @{name}_new {update} return comment "{tag} {vip.name}: new since"',
        f'		{keep} comment "{tag} {vip.name}: opened before the drain"',
        "	}",
    ]


# The ICMPv6 errors a router sends about a packet a backend sent as the VIP: the quote
# starts 8 bytes into the ICMPv6 header (@th,64); RFC 4443 puts the invoking packet there.
# In the quote: next header @th,112,8, source @th,128,128 (the VIP), destination
# @th,256,128 (the client); the first 8 bytes after the 40-byte header start at @th,384.
ICMP_ERRORS: Final = "{ destination-unreachable, packet-too-big, time-exceeded, parameter-problem }"
_QUOTED_EIGHT_BYTE_OPTIONS: Final = "{ 0, 60 }"  # Hop-by-Hop, Destination Options


def icmp_error_counter(config: Config, vip: Vip) -> str:
    """The named counter of a DSR VIP's rules for ICMPv6 errors about its flows."""
    return f"{vip_object_name(config, vip)}_icmp"


def icmp_unmatched_counter(config: Config, vip: Vip) -> str:
    """The named counter of ICMPv6 errors to a VIP address that match none of its flows.

    One per address: the first VIP of the address carries it.
    """
    return f"{vip_object_name(config, vip)}_icmp_unmatched"


def _icmp_error_matches(vip: Vip, default_for_proto: bool) -> list[tuple[str, str]]:
    """(match, hash key) of each quote shape nft reads at fixed offsets, for one VIP.

    The rules live in the chain only ICMPv6 errors jump to, so they test no type again.

    The quote is the backend's packet, VIP -> client; the key reverses it into the
    client's flow in the order ``_jhash`` hashes it (nft pads each field alike, so the
    marks are equal: tests/test_kernel_icmp.py checks it in the kernel). Shapes:

    1. TCP/UDP right after the header: the 4-tuple at @th,384 (source port: a VIP port).
    2. A first fragment (Fragment header, offset 0) of TCP/UDP: the 4-tuple 8 bytes on.
    3. Hop-by-Hop or Destination Options of 8 bytes, then TCP/UDP: the same.
    4. A later fragment (no ports): the 3-tuple client . VIP . upper layer, like
       ``flow_hash3``; only for the address's first VIP of this protocol, as the core.

    Anything else (a longer extension header chain, a truncated quote) matches none:
    the address's catch-all rule drops and counts it (``icmp_unmatched_counter``).
    """
    proto = vip.protocol.next_header
    ports = _ports(vip.ports)
    head = f"ip6 daddr {vip.address} @th,128,128 {int(vip.address):#x}"
    four = "@th,256,128 . @th,128,128 . @th,{d},16 . @th,{s},16"
    out = [
        (f"{head} @th,112,8 {proto} @th,384,16 {ports}", four.format(d=400, s=384)),
        (
            f"{head} @th,112,8 44 @th,384,8 {proto} @th,400,13 0 @th,448,16 {ports}",
            four.format(d=464, s=448),
        ),
        (
            f"{head} @th,112,8 {_QUOTED_EIGHT_BYTE_OPTIONS} @th,384,8 {proto} @th,392,8 0"
            f" @th,448,16 {ports}",
            four.format(d=464, s=448),
        ),
    ]
    if default_for_proto:
        out.append(
            (
                f"{head} @th,112,8 44 @th,384,8 {proto} @th,400,13 != 0",
                "@th,256,128 . @th,128,128 . @th,384,8",
            )
        )
    return out


def _icmp_error_rules(
    config: Config, vip: Vip, pool: BackendPool, action: str, default_for_proto: bool
) -> list[str]:
    """The rules that send ICMPv6 errors about a DSR VIP's flows to the flows' backends.

    The counter comes after the hash: the key reads the client port, which a quote cut
    short of it lacks, and nft ends the rule at that load; counted before it, such an
    error would count here and again in the catch-all that drops it.
    """
    counter = icmp_error_counter(config, vip)
    tag = _tag(config)
    return [
        f"{match} meta mark set jhash {key} mod {pool.size} seed {pool.seed:#x}"
        f' counter name "{counter}" {action}'
        f' comment "{tag} {vip.name}: ICMPv6 errors to the backend of the quoted flow"'
        for match, key in _icmp_error_matches(vip, default_for_proto)
    ]


def _icmp_counter_blocks(config: Config, vip: Vip, firsts: set[str], what: str) -> list[str]:
    tag = _tag(config)
    out = _counter_block(icmp_error_counter(config, vip), f"{tag} {vip.name}: ICMPv6 errors {what}")
    if vip.name in firsts:
        out += _counter_block(
            icmp_unmatched_counter(config, vip),
            f"{tag} {vip.address}: ICMPv6 errors dropped, quoting no flow of its VIPs",
        )
    return out


def _icmp_catch_all(config: Config, vips: Sequence[Vip]) -> list[str]:
    """Drop and count the ICMPv6 errors to each DSR address that no rule above took."""
    return [
        f'ip6 daddr {address} counter name "{icmp_unmatched_counter(config, group[0])}" drop'
        f' comment "{_tag(config)} {address}: ICMPv6 errors that quote no flow of its VIPs"'
        for address, group in _by_address(vips).items()
    ]


def npt_icmp_counter(index: int) -> str:
    """The named counter of ICMPv6 errors to the outside prefix of ``config.npt[index]``."""
    return f"npt{index}_icmp"


def npt_icmp_unmatched_counter(index: int) -> str:
    """The named counter of those errors dropped: truncated, or quoting no mapped address."""
    return f"npt{index}_icmp_unmatched"


def _npt_icmp_rules(config: Config, index: int) -> list[str]:
    """Count the ICMPv6 errors to an npt outside prefix; drop those DNPT cannot map back.

    ip6tables' DNPT maps the destination and the quoted source (the packet the inside
    host sent, as the outside saw it) back inside. An error whose quote is shorter than
    an IPv6 header (``ip6 length`` below 8 + 40), or whose quoted source is not in the
    outside prefix, names no packet of the inside host: dropped and counted, as the core.
    """
    pair = config.npt[index]
    outside = pair.outside
    bits = outside.prefixlen
    value = int(outside.network_address) >> (128 - bits)
    head = f"ip6 daddr {outside} icmpv6 type {ICMP_ERRORS}"
    tag = _tag(config)
    unmatched = npt_icmp_unmatched_counter(index)
    return [
        f'{head} ip6 length < 48 counter name "{unmatched}" drop'
        f' comment "{tag} npt {outside}: ICMPv6 errors with a truncated quote"',
        f'{head} @th,128,{bits} != {value:#x} counter name "{unmatched}" drop'
        f' comment "{tag} npt {outside}: ICMPv6 errors quoting a source outside {outside}"',
        f'{head} counter name "{npt_icmp_counter(index)}"'
        f' comment "{tag} npt {outside}: ICMPv6 errors DNPT translates"',
    ]


def icmp_error_counts(
    config: Config, packets: Mapping[str, int]
) -> tuple[dict[str, IcmpErrors], list[IcmpErrors]]:
    """Per VIP name and per npt pair, the ICMPv6 error counts read from nft ``packets``.

    ``packets``: counter name -> packets, as the kernel reports them.
    """
    vips: dict[str, IcmpErrors] = {}
    for vip in config.vips:
        if vip.mode not in KERNEL_MODES:
            continue
        done = packets.get(icmp_error_counter(config, vip), 0)
        unmatched = packets.get(icmp_unmatched_counter(config, vip), 0)
        if vip.mode is VipMode.NAT:
            vips[vip.name] = IcmpErrors(translated=done, unmatched=unmatched)
        else:
            vips[vip.name] = IcmpErrors(forwarded=done, unmatched=unmatched)
    npt = [
        IcmpErrors(
            translated=packets.get(npt_icmp_counter(i), 0),
            unmatched=packets.get(npt_icmp_unmatched_counter(i), 0),
        )
        for i in range(len(config.npt))
    ]
    return vips, npt


def _dsr_notrack(config: Config, dsr: Sequence[Vip]) -> list[str]:
    """Keep conntrack away from the tunnel DSR VIPs' packets (the set ``dsr_tunnel_vips``).

    The forward chain's ``ct state`` rule turns conntrack on in the LB's netns, and each
    packet to a tunnel VIP would get a conntrack entry that is thrown away unconfirmed
    once the packet is encapsulated: a lookup and an allocation per packet for nothing
    (the LB sees one direction, and the forward chain accepts these by their mark).
    """
    if not _tunnel_addresses(dsr):
        return []
    return [
        "ip6 daddr @dsr_tunnel_vips notrack"
        f' comment "{_tag(config)}: tunnel DSR: one direction, no conntrack entry"'
    ]


def _tunnel_addresses(dsr: Sequence[Vip]) -> list[IPv6Address]:
    return list(dict.fromkeys(v.address for v in dsr if v.mode is not VipMode.DSR_L2))


def _nat_vips(config: Config) -> list[Vip]:
    return [v for v in config.vips if v.mode is VipMode.NAT]


def _nat_icmp_rules(config: Config) -> list[str]:
    """Count the ICMPv6 errors to nat VIPs: conntrack relates them to a flow, or drop them.

    nf_conntrack finds the flow an error quotes (``ct state related``) and nf_nat then
    translates the error and its quote back to the backend. An error that quotes no
    tracked flow has no conntrack entry (``ct state invalid``): dropped and counted. The
    quoted source port names the VIP; any other related error counts for the address's
    first VIP.
    """
    tag = _tag(config)
    rules: list[str] = []
    for address, group in _by_address(_nat_vips(config)).items():
        head = f"ip6 daddr {address}"
        for vip in group:
            proto = vip.protocol.next_header
            rules.append(
                f"{head} ct state related @th,112,8 {proto} @th,384,16 {_ports(vip.ports)}"
                f' counter name "{icmp_error_counter(config, vip)}" accept'
                f' comment "{tag} {vip.name}: ICMPv6 errors nf_nat translates"'
            )
        first = group[0]
        rules.append(
            f'{head} ct state related counter name "{icmp_error_counter(config, first)}" accept'
            f' comment "{tag} {address}: other ICMPv6 errors nf_nat translates"'
        )
        rules.append(
            f'{head} ct state invalid counter name "{icmp_unmatched_counter(config, first)}" drop'
            f' comment "{tag} {address}: ICMPv6 errors that quote no tracked flow"'
        )
    return rules


def _by_address(vips: Sequence[Vip]) -> dict[str, list[Vip]]:
    out: dict[str, list[Vip]] = {}
    for vip in vips:
        out.setdefault(str(vip.address), []).append(vip)
    return out


def _first_of_proto(vips: Sequence[Vip]) -> set[str]:
    """The names of the VIPs that take an address's port-less packets (the core's ``_default``)."""
    seen: dict[tuple[str, str], str] = {}
    for vip in vips:
        seen.setdefault((str(vip.address), str(vip.protocol)), vip.name)
    return set(seen.values())


def _no_backend(config: Config, vip: Vip, ports: Sequence[int]) -> str:
    return (
        f'{_match(vip, ports)} counter name "{vip_counter(config, vip)}" drop'
        f' comment "{_tag(config)} {vip.name}: no eligible backend"'
    )


def unserved_counters(config: Config) -> dict[IPv6Address, str]:
    """Per address served by a kernel-mode VIP: the counter of its dropped unserved traffic."""
    out: dict[IPv6Address, str] = {}
    for vip in config.vips:
        if vip.mode in KERNEL_MODES and vip.address not in out:
            out[vip.address] = f"{vip_object_name(config, vip)}_unserved"
    return out


def _nat_only(config: Config, address: IPv6Address) -> bool:
    """Whether every kernel-mode VIP at ``address`` is a ``nat`` VIP."""
    return all(
        v.mode is VipMode.NAT
        for v in config.vips
        if v.address == address and v.mode in KERNEL_MODES
    )


def _guard_rules(config: Config, *, nat: bool) -> list[str]:
    """The unserved-port guards of the addresses served by ``nat`` VIPs only (``nat``), or the rest."""
    rules = []
    for address, counter in unserved_counters(config).items():
        if _nat_only(config, address) is not nat:
            continue
        served = sorted(
            {(str(v.protocol), p) for v in config.vips if v.address == address for p in v.ports}
        )
        allowed = ", ".join(f"{proto} . {port}" for proto, port in served)
        rules.append(
            f"ip6 daddr {address} meta l4proto . th dport != {{ {allowed} }}"
            f' meta l4proto != ipv6-icmp counter name "{counter}" drop'
            f' comment "{_tag(config)}: {address} serves {allowed} only"'
        )
    return rules


# --- the forward filter and the flow bound -----------------------------------------


def _l3_vips(config: Config) -> list[Vip]:
    return [v for v in config.vips if v.mode in KERNEL_MODES]


def vip_prefixes(config: Config) -> list[IPv6Network]:
    """The VIP prefixes: the /64 around each ``nat``/``dsr-*`` VIP, once each.

    A router sends the VIP subnet to the LB; an address in it that is no VIP
    would go back to the router by the LB's default route, and loop.
    """
    return list(
        dict.fromkeys(
            IPv6Network((v.address, VIP_PREFIX_LEN), strict=False) for v in _l3_vips(config)
        )
    )


def _set_block(name: str, kind: str, comment: str, elements: Sequence[object]) -> list[str]:
    # One element per line, ending with a comma (the nft 1.0.6 quirk, as in _elements).
    lines = [f"\tset {name} {{", f"\t\ttype {kind}"]
    if any(isinstance(e, IPv6Network) for e in elements):
        lines.append("\t\tflags interval")
    lines.append(f'\t\tcomment "{comment}"')
    if elements:
        lines += ["\t\telements = {", *(f"\t\t\t{e}," for e in elements), "\t\t}"]
    lines.append("\t}")
    return lines


def _nat_addresses(config: Config) -> list[IPv6Address]:
    return list(dict.fromkeys(v.address for v in config.vips if v.mode is VipMode.NAT))


def _forward_objects(config: Config, *, kernel: bool) -> list[str]:
    tag = _tag(config)
    meaning = {
        "forward_denied": "dropped: routed through the LB but not v6lb's traffic",
        "forward_unreachable": "answered with Destination Unreachable: no VIP at that address",
        "forward_allowed": "new flows let through by lb.forward_allow",
    }
    objects: list[str] = []
    for name in FORWARD_COUNTERS:
        if name != "forward_allowed" or config.lb.forward_allow:
            objects += _counter_block(name, f"{tag}: {meaning[name]}")
    vips = list(dict.fromkeys(v.address for v in _l3_vips(config)))
    if vips:
        objects += _set_block("vips", "ipv6_addr", f"{tag}: the VIP addresses", vips)
        objects += _set_block(
            "vip_prefixes", "ipv6_addr", f"{tag}: the /64 of each VIP", vip_prefixes(config)
        )
    if kernel and _nat_addresses(config):
        objects += _set_block(
            "nat_vips", "ipv6_addr", f"{tag}: addresses of nat VIPs", _nat_addresses(config)
        )
    if config.npt:
        inside = list(dict.fromkeys(p.inside for p in config.npt))
        objects += _set_block("npt_inside", "ipv6_addr", f"{tag}: npt inside prefixes", inside)
    return objects


def _forward_rules(config: Config, tuns: Sequence[str] | None) -> list[str]:
    """The ``forward`` chain: v6lb's traffic passes, the rest is counted and dropped.

    ``tuns``: the Python data plane's TUN devices (None: the kernel data plane).
    """
    tag = _tag(config)
    rules = [
        f'ct state established,related accept comment "{tag}: later packets and replies'
        ' of flows this chain let through"'
    ]
    if config.npt and tuns is None:
        # NPT's untracked packets never match the first rule, so they come next: inside to
        # outside is accepted by one rule that also does the reverse-path check. With a
        # separate spoof rule first and the accepts after the nat and DSR rules, npt small
        # UDP fell to 0.73x of hand-written rules (docs/benchmarks.md).
        rules.append(
            "ct state untracked ip6 saddr @npt_inside fib saddr . iif oif exists accept"
            f' comment "{tag}: npt, inside to outside (SNPT, NOTRACK), from the inside"'
        )
    tag_mark = instance_tag(config.lb.instance)
    dsr_mark = (
        f"meta mark & {-TAG_SPAN & 0xFFFFFFFF:#010x} == {tag_mark:#010x} accept"
        f' comment "{tag}: tunnel DSR, encapsulated (the backend\'s mark)"'
    )
    # Before the spoof rule: the LB's own packets, encapsulated (source: the tunnel source,
    # often an npt inside address) or written by the Python data plane, keep the input
    # interface of the packet they carry.
    if tuns is None and tunnel_targets(config):
        rules.append(dsr_mark)
    if tuns:
        rules.append(
            f'iifname {_name_set(tuns)} accept comment "{tag}: out of the python data plane"'
        )
    if config.npt:
        # NPT translates statelessly: a source inside must come from the inside.
        rules.append(
            'ip6 saddr @npt_inside fib saddr . iif oif missing counter name "forward_denied"'
            f' drop comment "{tag}: an npt inside source that did not come from the inside"'
        )
    if config.npt and tuns is None:
        rules.append(
            "ct state untracked ip6 daddr @npt_inside accept"
            f' comment "{tag}: npt, outside to inside (DNPT, NOTRACK)"'
        )
    if tuns is None:
        if _nat_addresses(config):
            rules.append(
                "ct status dnat ct original ip6 daddr @nat_vips accept"
                f' comment "{tag}: new flows of the nat VIPs"'
            )
    elif tuns:
        rules.append(
            f'oifname {_name_set(tuns)} accept comment "{tag}: into the python data plane"'
        )
        if config.npt:  # the npt inside table's throw route: the kernel routes these
            rules.append(
                "ip6 saddr @npt_inside ip6 daddr @npt_inside accept"
                f' comment "{tag}: npt, inside to inside"'
            )
    for a in config.lb.forward_allow:
        match = " ".join(
            f"ip6 {field} {net}"
            for field, net in (("saddr", a.source), ("daddr", a.destination))
            if net != _ANY
        )
        rules.append(
            f'{match or "meta nfproto ipv6"} counter name "forward_allowed" accept'
            f' comment "{tag}: lb.forward_allow"'
        )
    if _l3_vips(config):
        rules.append(
            "ip6 daddr @vip_prefixes ip6 daddr != @vips"
            ' counter name "forward_unreachable" reject with icmpv6 addr-unreachable'
            f' comment "{tag}: no VIP at this address of a VIP prefix (never back to the router)"'
        )
    rules.append(f'counter name "forward_denied" drop comment "{tag}: not v6lb\'s traffic"')
    return rules


def _conntrack_limit(config: Config) -> list[str]:
    """``lb.conntrack_max`` for the ``nat`` VIPs: new flows over the bound are dropped."""
    if not _nat_addresses(config):
        return []
    n = config.lb.conntrack_max
    return [
        f"ip6 daddr @nat_vips ct state new ct count over {n}"
        f' counter name "{CONNTRACK_FULL}" drop'
        f' comment "{_tag(config)}: lb.conntrack_max {n} live nat flows"'
    ]


def _unsynced_objects(config: Config) -> list[str]:
    """With ``lb.conntrack_sync``: the counter and the set of :func:`_unsynced_guard`."""
    if config.lb.conntrack_sync is None or not _nat_addresses(config):
        return []
    tag = _tag(config)
    return _counter_block(
        NAT_UNSYNCED, f"{tag}: first mid-stream packets of nat flows not in conntrack, dropped"
    ) + [
        f"\tset {NAT_UNSYNCED} {{",
        "\t\ttype ipv6_addr . inet_service . ipv6_addr . inet_service",
        "\t\tsize 65536",
        "\t\tflags dynamic,timeout",
        f"\t\ttimeout {UNSYNCED_HOLD}s",
        f'\t\tcomment "{tag}: nat flows whose first mid-stream packet was dropped"',
        "\t}",
    ]


def _unsynced_guard(config: Config) -> list[str]:
    """With ``lb.conntrack_sync``: hold a nat flow met mid-stream until the peer's entry comes.

    A TCP packet without SYN that reaches the nat hook belongs to a flow this kernel does
    not track: another instance opened it, and ECMP moved it here before conntrackd
    brought its entry (docs/anycast.md). Picked up now it would be SNATed to this
    instance's address and reset by the backend. The flow's first such packet is dropped
    and remembered for UNSYNCED_HOLD seconds; its retransmission finds the entry in
    conntrack and never reaches this hook, or, if the entry never comes, is picked up as
    before, so a flow whose state is lost is still reset, one retransmission later.
    """
    if config.lb.conntrack_sync is None or not _nat_addresses(config):
        return []
    key = "ip6 saddr . tcp sport . ip6 daddr . tcp dport"
    return [
        f"ip6 daddr @nat_vips tcp flags & syn == 0 {key} != @{NAT_UNSYNCED}"
        f' add @{NAT_UNSYNCED} {{ {key} }} counter name "{NAT_UNSYNCED}" drop'
        f' comment "{_tag(config)}: a nat flow met mid-stream, its entry not synced yet"'
    ]


# --- the ruleset -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class L2Ports:
    """Host facts for ``dsr-l2``: where clients' frames arrive, where they leave, and its MAC."""

    ingress: str
    egress: str
    egress_mac: str


def _reset(instance: str) -> list[str]:
    # "table" creates the table if it is missing, so "delete table" cannot fail.
    name = table_name(instance)
    lines: list[str] = []
    for family in _FAMILIES:
        lines += [f"table {family} {name}", f"delete table {family} {name}"]
    return lines


def render_remove(instance: str) -> str:
    """A transaction that deletes the instance's tables (and only them), whether present or not."""
    return "\n".join([f"# v6lb:{instance}: remove", *_reset(instance)]) + "\n"


def _ip6_table(config: Config, pools: Mapping[str, BackendPool]) -> list[str]:
    tag = _tag(config)
    objects: list[str] = []
    for address, counter in unserved_counters(config).items():
        objects += _counter_block(
            counter, f"{tag}: dropped, to {address} on a port it does not serve"
        )
    # The DSR guards go after the balancing rules, which end in "accept": a packet that
    # a balancing rule takes is served, so the guard could not drop it; this way it
    # skips the guard's set lookup (measured: docs/benchmarks.md).
    objects += _forward_objects(config, kernel=True)
    if _nat_addresses(config):
        objects += _counter_block(
            CONNTRACK_FULL, f"{tag}: new nat flows dropped at lb.conntrack_max"
        )
    objects += _unsynced_objects(config)
    # lb.peers: a nat flow of another instance, met mid-stream, goes back to it
    # (the graceful stop's withdraw; docs/anycast.md)
    objects += second_chance_objects(config, nat=True)
    mangle: list[str] = []
    nat_pre = _guard_rules(config, nat=True) + _unsynced_guard(config) + _conntrack_limit(config)
    nat_post: list[str] = []
    marks: dict[str, dict[int, int]] = {}
    for t in tunnel_targets(config):
        marks.setdefault(t.vip.name, {})[t.backend_index] = t.mark
    dsr = [v for v in config.vips if v.mode.facts.kind is Kind.DSR and v.mode in KERNEL_MODES]
    firsts = {vips[0].name for vips in _by_address(dsr + _nat_vips(config)).values()}
    ports = _first_of_proto(dsr)
    icmp: list[str] = []
    chains: list[str] = []  # the drain chains of the DSR VIPs
    backend_in: dict[str, str] = {}  # a tunnel DSR backend's mark -> its packet counter
    nat_backend_in: dict[str, str] = {}  # (VIP, protocol, backend, port) -> its counter
    for vip in config.vips:
        if vip.mode is VipMode.DSR_L2 or vip.mode not in KERNEL_MODES:
            continue
        pool = pools[vip.name]
        name = vip_object_name(config, vip)
        counter = vip_counter(config, vip)
        objects += _counter_block(counter, f"{tag} {vip.name}: {_counter_meaning(vip)}")
        if vip.mode is VipMode.NAT:
            c_in, c_out = nat_traffic_counters(config, vip)
            objects += _counter_block(c_in, f"{tag} {vip.name}: packets from clients")
            objects += _counter_block(c_out, f"{tag} {vip.name}: packets to clients (replies)")
            objects += _backend_counter_blocks(config, vip)
            for j, b in enumerate(vip.backends):
                for port in vip.ports:
                    key = f"{vip.address} . {vip.protocol} . {b.address} . {b.port or port}"
                    nat_backend_in.setdefault(key, backend_counter(config, vip, j))
            objects += _icmp_counter_blocks(config, vip, firsts, "translated (conntrack related)")
            for m in nat_maps(config, vip):
                kind = "ipv6_addr . inet_service" if m.with_port else "ipv6_addr"
                objects += _map_block(
                    m.name, kind, f"{tag} {vip.name}: Maglev slot -> backend", pool.table, m.values
                )
                if not pool.any_eligible:
                    nat_pre.append(_no_backend(config, vip, m.ports))
                    continue
                target = "ip6 addr . port to" if m.with_port else "ip6 to"
                nat_pre.append(
                    f'{_match(vip, m.ports)} counter name "{counter}" {_jhash(vip, pool)}'
                    f' dnat {target} meta mark map @{m.name} comment "{tag} {vip.name}"'
                )
            nat_post += _snat_rules(config, vip)
        else:
            by_backend = marks[vip.name]
            values = [f"{by_backend[j]:#010x}" for j in range(len(vip.backends))]
            objects += _map_block(
                name, "mark", f"{tag} {vip.name}: Maglev slot -> backend's mark", pool.table, values
            )
            objects += _icmp_counter_blocks(
                config, vip, firsts, "sent to the quoted flow's backend"
            )
            objects += _backend_counter_blocks(config, vip)
            for j in range(len(vip.backends)):
                backend_in[values[j]] = backend_counter(config, vip, j)
            count = "counter name meta mark map @backend_in"
            send = f"meta mark set meta mark map @{name} {count} accept"
            if _keeps_flows(vip):
                objects += _drain_objects(tag, vip, name, "mark", pool, values)
                chains += _drain_chains(
                    tag, vip, name, send, f"meta mark set meta mark map @{name}_keep {count} accept"
                )
            if not pool.any_eligible and not pool.moved:
                mangle.append(_no_backend(config, vip, vip.ports))
                continue
            mangle.append(_balance_rule(tag, vip, pool, counter, name, send))
            icmp += _icmp_error_rules(
                config, vip, pool, f"meta mark set meta mark map @{name} accept", vip.name in ports
            )
    count_post: list[str] = []
    if _nat_vips(config):
        # after the DSR balancing rules (they accept): only the rest pays for the lookup
        objects += _nat_traffic_maps(config)
        mangle.append(
            "counter name ip6 daddr . meta l4proto . th dport map @nat_in"
            f' comment "{tag}: packets to the nat VIPs"'
        )
        count_post.append(
            "counter name ip6 saddr . meta l4proto . th sport map @nat_out"
            f' comment "{tag}: packets from the nat VIPs (replies)"'
        )
        objects += _counter_map(
            "nat_backend_in",
            "ipv6_addr . inet_proto . ipv6_addr . inet_service",
            f"{tag}: nat (VIP, protocol, backend, port) -> the backend's packet counter",
            nat_backend_in,
        )
        count_post.append(
            "ct direction original ct status dnat counter name ct original ip6 daddr"
            " . meta l4proto . ip6 daddr . th dport map @nat_backend_in"
            f' comment "{tag}: packets to the nat VIPs\' backends"'
        )
    if backend_in:
        objects += _counter_map(
            "backend_in", "mark", f"{tag}: a backend's mark -> its packet counter", backend_in
        )
    # One jump, after the balancing rules: a flow's packets never look at the ICMP rules.
    icmp += _icmp_catch_all(config, [v for v in dsr if v.mode is not VipMode.DSR_L2])
    icmp += _nat_icmp_rules(config)
    if icmp:
        mangle.append(
            f"icmpv6 type {ICMP_ERRORS} jump icmp_errors"
            f' comment "{tag}: ICMPv6 errors for the VIPs (docs/pmtu.md)"'
        )
    mangle += _guard_rules(config, nat=False)
    if _tunnel_addresses(dsr):
        objects += _set_block(
            "dsr_tunnel_vips",
            "ipv6_addr",
            f"{tag}: tunnel DSR VIP addresses (untracked)",
            _tunnel_addresses(dsr),
        )
    npt_icmp: list[str] = []
    for i, pair in enumerate(config.npt):
        objects += _counter_block(
            npt_icmp_counter(i), f"{tag} npt {pair.outside}: ICMPv6 errors translated inward"
        )
        objects += _counter_block(
            npt_icmp_unmatched_counter(i),
            f"{tag} npt {pair.outside}: ICMPv6 errors dropped, quoting no mapped address",
        )
        npt_icmp += _npt_icmp_rules(config, i)
    if npt_icmp:  # a base chain: every packet passes it, so the others leave at once
        npt_icmp.insert(0, f'meta l4proto != ipv6-icmp accept comment "{tag}: not ICMPv6"')
    lines = [f"table ip6 {table_name(config.lb.instance)} {{", f'\tcomment "{tag}"']
    lines += objects
    if icmp:
        lines += ["\tchain icmp_errors {", *(f"\t\t{rule}" for rule in icmp), "\t}"]
    lines += chains
    for chain, hook, rules in (
        # before ip6tables' DNPT (priority mangle) rewrites the destination
        ("raw_pre", "filter hook prerouting priority raw", _dsr_notrack(config, dsr)),
        ("npt_icmp", "filter hook prerouting priority mangle - 10", npt_icmp),
        ("mangle_pre", "filter hook prerouting priority mangle", mangle),
        ("nat_pre", "nat hook prerouting priority dstnat", nat_pre),
        ("nat_post", "nat hook postrouting priority srcnat", nat_post),
        # after srcnat: a reply leaves with the VIP as its source again
        ("count_post", "filter hook postrouting priority srcnat + 10", count_post),
        ("forward", "filter hook forward priority filter", _forward_rules(config, None)),
    ):
        if rules:
            lines += _chain(chain, hook, rules)
    lines.append("}")
    return lines


def _counter_meaning(vip: Vip) -> str:
    return "new flows" if vip.mode is VipMode.NAT else "packets sent to a backend"


def _name_set(names: Iterable[str]) -> str:
    """Device names as an anonymous nft set: ``{ "a", "b" }``."""
    return "{ " + ", ".join(f'"{n}"' for n in names) + " }"


def _chain(name: str, hook: str, rules: Sequence[str]) -> list[str]:
    return [
        f"\tchain {name} {{",
        f"\t\ttype {hook}; policy accept;",
        *(f"\t\t{rule}" for rule in rules),
        "\t}",
    ]


def _snat_rules(config: Config, vip: Vip) -> list[str]:
    opts = vip.options
    if not isinstance(opts, NatOptions) or opts.snat is None:
        return []
    net = opts.snat
    lo, hi = opts.snat_ports
    if net.num_addresses == 1:
        to = f"[{net.network_address}]:{lo}-{hi}"
    else:
        # The pool's all-zero interface ID (Subnet-Router anycast) is skipped, as in the core.
        skip = 1 if net.prefixlen < 127 else 0
        first = net.network_address + skip
        to = f"[{first}]-[{net.broadcast_address}]:{lo}-{hi} persistent"
    return [
        f"ct status dnat meta l4proto {vip.protocol} ct original ip6 daddr {vip.address}"
        f" ct original proto-dst {_ports(vip.ports)} snat ip6 to {to}"
        f' comment "{_tag(config)} {vip.name}"'
    ]


def _netdev_table(
    config: Config,
    pools: Mapping[str, BackendPool],
    l2: L2Ports | None,
    backend_macs: Mapping[IPv6Address, str],
) -> list[str]:
    vips = [v for v in config.vips if v.mode is VipMode.DSR_L2]
    if not vips:
        return []
    if l2 is None:
        raise RenderError(
            "dsr-l2 needs the LB's ingress and egress devices and the egress MAC"
            " (give L2Ports(ingress, egress, egress_mac))"
        )
    tag = _tag(config)
    objects: list[str] = []
    rules: list[str] = []
    icmp: list[str] = []
    chains: list[str] = []  # the drain chains of the TCP VIPs
    firsts = {group[0].name for group in _by_address(vips).values()}
    ports = _first_of_proto(vips)
    for vip in vips:
        pool = pools[vip.name]
        name = vip_object_name(config, vip)
        macs = []
        for b in vip.backends:
            mac = b.mac or backend_macs.get(b.address)
            if mac is None:
                raise RenderError(
                    f"dsr-l2 VIP {vip.name}: no MAC for backend {b.address}; give `mac:` in the"
                    " file or resolve it by neighbour discovery first"
                )
            macs.append(mac.lower())
        objects += _counter_block(name, f"{tag} {vip.name}: {_counter_meaning(vip)}")
        objects += _map_block(
            name, "ether_addr", f"{tag} {vip.name}: Maglev slot -> backend MAC", pool.table, macs
        )
        objects += _icmp_counter_blocks(config, vip, firsts, "sent to the quoted flow's backend")
        objects += _backend_counter_blocks(config, vip)
        by_mac: dict[str, str] = {}
        for j, mac in enumerate(macs):
            by_mac.setdefault(mac, backend_counter(config, vip, j))
        objects += _counter_map(
            f"{name}_bin",
            "ether_addr",
            f"{tag} {vip.name}: backend MAC -> its packet counter",
            by_mac,
        )
        count = f"counter name ether daddr map @{name}_bin"
        rewrite = (
            f"ether saddr set {l2.egress_mac.lower()} ether daddr set meta mark map @{name}"
            f' {count} fwd to "{l2.egress}"'
        )
        if _keeps_flows(vip):
            objects += _drain_objects(tag, vip, name, "ether_addr", pool, macs)
            keep = (
                f"ether saddr set {l2.egress_mac.lower()} ether daddr set meta mark map"
                f' @{name}_keep {count} fwd to "{l2.egress}"'
            )
            chains += _drain_chains(tag, vip, name, rewrite, keep)
        if not pool.any_eligible and not pool.moved:
            rules.append(_no_backend(config, vip, vip.ports))
            continue
        rules.append(_balance_rule(tag, vip, pool, name, name, rewrite))
        icmp += _icmp_error_rules(config, vip, pool, rewrite, vip.name in ports)
    icmp += _icmp_catch_all(config, vips)
    rules.append(
        f"icmpv6 type {ICMP_ERRORS} jump icmp_errors_l2"
        f' comment "{tag}: ICMPv6 errors for the dsr-l2 VIPs (docs/pmtu.md)"'
    )
    lines = [f"table netdev {table_name(config.lb.instance)} {{", f'\tcomment "{tag}"']
    lines += objects
    lines += ["\tchain icmp_errors_l2 {", *(f"\t\t{rule}" for rule in icmp), "\t}"]
    lines += chains
    if rules:
        lines += [
            "\tchain ingress_l2 {",
            f'\t\ttype filter hook ingress device "{l2.ingress}" priority filter; policy accept;',
            *(f"\t\t{rule}" for rule in rules),
            "\t}",
        ]
    lines.append("}")
    return lines


def render_nft(
    config: Config,
    *,
    pools: Mapping[str, BackendPool] | None = None,
    l2: L2Ports | None = None,
    backend_macs: Mapping[IPv6Address, str] | None = None,
) -> str:
    """The instance's whole nftables state as one ``nft -f`` transaction.

    ``pools`` (by VIP name) carry the current health; a VIP without one gets a
    fresh pool (:func:`~v6lb.model.pools.pool_for`, everything up). Without any ``nat``/``dsr-*``
    VIP the text only removes the instance's tables.
    """
    p = _pools(config, pools)
    lines = [f"# {_tag(config)}: nftables ruleset from {config.source}; load with: nft -f FILE"]
    lines += _reset(config.lb.instance)
    lines += _ip6_table(config, p)
    lines += _netdev_table(config, p, l2, backend_macs or {})
    return "\n".join(lines) + "\n"


def render_forward_nft(config: Config, tuns: Sequence[str], plane: str = "python") -> str:
    """The Python (or xdp) data plane's nftables state: the forward filter only, one
    transaction.

    What the kernel steers into the ``tuns`` (and what they emit) is the core's
    to judge; everything else routed through the host is v6lb's forward policy. The xdp
    plane has no TUN: what its program passes to the stack and the stack would route on
    is judged here (docs/dataplane-xdp.md), without the TUN queues' ICMPv6 error guard.
    """
    tag = _tag(config)
    lines = [
        f"# {tag}: {plane} data plane forward filter from {config.source}; load with: nft -f FILE"
    ]
    lines += _reset(config.lb.instance)
    lines += [f"table ip6 {table_name(config.lb.instance)} {{", f'\tcomment "{tag}"']
    lines += _forward_objects(config, kernel=False)
    limit = _icmp_error_limit(config) if plane == "python" else []
    if limit:
        lines += _set_block(
            "icmp_limited",
            "ipv6_addr",
            f"{tag}: VIP addresses and npt outside prefixes",
            _icmp_limit_targets(config),
        )
        lines += _counter_block(
            ICMP_LIMITED,
            f"{tag}: ICMPv6 errors for the VIPs and npt prefixes dropped over"
            f" {PYTHON_ICMP_ERROR_RATE}/s before the TUN devices",
        )
        lines += _chain("icmp_limit", "filter hook prerouting priority mangle", limit)
    if tuns:
        # What the engine writes out was judged and tracked by the core; the kernel's
        # conntrack would track it a second time (docs/dataplane-python.md).
        lines += _chain(
            "engine_out",  # ("notrack" is a keyword: not a chain name)
            "filter hook prerouting priority raw",
            [
                f'iifname {_name_set(tuns)} notrack comment "{tag}: tracked by the python data plane"'
            ],
        )
    lines += _chain("forward", "filter hook forward priority filter", _forward_rules(config, tuns))
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_ring_steer(
    config: Config,
    interfaces: Sequence[str],
    sides: Sequence[tuple[str, Sequence[str]]],
    mac: str,
) -> str:
    """The Python data plane's steering with AF_PACKET rings: ``table netdev``, one chain.

    On ingress of each of ``interfaces`` (before the kernel's IPv6 stack sees the
    packet), the packets each side takes (``(device, [nft match, ...])``, the same
    matches as the ``ip -6 rule`` lines of the TUN steering) are ``fwd``-ed to that side's
    TAP device, whose receive ring the engine reads; the kernel never routes
    them. ICMPv6 errors to the VIPs and npt outside prefixes over
    :data:`PYTHON_ICMP_ERROR_RATE` per second are dropped first, as the ``ip6``
    table's ``icmp_limit`` chain does for the TUNs. Each frame's destination becomes
    ``mac`` (the engine's inject link) on the way, so the engine copies it on as
    it is. Appended to
    :func:`render_forward_nft`'s text, whose reset deletes this table too.
    """
    tag = _tag(config)
    lines = [f"table netdev {table_name(config.lb.instance)} {{", f'\tcomment "{tag}"']
    rules = [
        "meta protocol != ip6 accept",
        f'ip6 daddr {{ ff00::/8, fe80::/10 }} accept comment "{tag}: multicast and link-local'
        " (neighbour discovery) stay the kernel's\"",
        f'ip6 hoplimit < 2 accept comment "{tag}: the kernel answers Time Exceeded (as for a TUN)"',
    ]
    targets = _icmp_limit_targets(config)
    if targets:
        lines += _set_block("icmp_limited", "ipv6_addr", f"{tag}: VIP addresses and npt outside"
                            " prefixes", targets)  # fmt: skip
        lines += _counter_block(ICMP_LIMITED, f"{tag}: ICMPv6 errors over the rate, dropped")
        rules.append(
            f"ip6 daddr @icmp_limited icmpv6 type {ICMP_ERRORS}"
            f" limit rate over {PYTHON_ICMP_ERROR_RATE}/second burst {PYTHON_ICMP_ERROR_BURST}"
            f' packets counter name "{ICMP_LIMITED}" drop'
        )
    for device, matches in sides:
        rules += [f'{m} ether daddr set {mac} fwd to "{device}"' for m in matches]
    devs = _name_set(interfaces)
    lines += _chain("steer", f"filter hook ingress devices = {devs} priority -500", rules)
    lines.append("}")
    return "\n".join(lines) + "\n"


ICMP_LIMITED: Final = "icmp_errors_limited"
PYTHON_ICMP_ERROR_RATE: Final = 1000
"""ICMPv6 errors per second the kernel lets through to the Python data plane."""
PYTHON_ICMP_ERROR_BURST: Final = 200
"""Their burst: well under a TUN device's queue (500 packets), which the flows share."""


def _icmp_limit_targets(config: Config) -> list[IPv6Address | IPv6Network]:
    out: list[IPv6Address | IPv6Network] = [v.address for v in _l3_vips(config)]
    out += [p.outside for p in config.npt]
    return list(dict.fromkeys(out))


def _icmp_error_limit(config: Config) -> list[str]:
    """The Python plane's guard: a flood of ICMPv6 errors must not fill the TUN queues.

    Every packet for a VIP shares the TUN device's queue with the flows' own packets, so
    errors beyond :data:`PYTHON_ICMP_ERROR_RATE` per second are dropped in the kernel
    before they are steered there (legitimate errors are few: routers rate-limit them).
    """
    if not _icmp_limit_targets(config):
        return []
    rate = PYTHON_ICMP_ERROR_RATE
    return [
        f'meta l4proto != ipv6-icmp accept comment "{_tag(config)}: not ICMPv6"',
        f"ip6 daddr @icmp_limited icmpv6 type {ICMP_ERRORS}"
        f" limit rate over {rate}/second burst {PYTHON_ICMP_ERROR_BURST} packets"
        f' counter name "{ICMP_LIMITED}" drop'
        f' comment "{_tag(config)}: ICMPv6 errors over {rate}/s (docs/pmtu.md)"',
    ]


def render_map_update(
    config: Config,
    vip_name: str,
    pool: BackendPool,
    *,
    backend_macs: Mapping[IPv6Address, str] | None = None,
) -> str:
    """One transaction that refills a VIP's map(s) from ``pool`` (after a health change).

    Conntrack keeps ``nat`` flows on their backend; DSR flows follow the new
    table, which Maglev keeps the same for every slot whose backend stayed.
    """
    vip = config.vip(vip_name)
    if vip.mode not in KERNEL_MODES:
        raise RenderError(f"VIP {vip_name} is mode {vip.mode}, which has no nftables map")
    family = "netdev" if vip.mode is VipMode.DSR_L2 else "ip6"
    table = f"{family} {table_name(config.lb.instance)}"
    if vip.mode is VipMode.NAT:
        maps = [(m.name, m.values) for m in nat_maps(config, vip)]
    elif vip.mode is VipMode.DSR_L2:
        macs = backend_macs or {}
        values = tuple((b.mac or macs[b.address]).lower() for b in vip.backends)
        maps = [(vip_object_name(config, vip), values)]
    else:
        by_backend = {t.backend_index: t.mark for t in tunnel_targets(config) if t.vip == vip}
        values = tuple(f"{by_backend[j]:#010x}" for j in range(len(vip.backends)))
        maps = [(vip_object_name(config, vip), values)]
    lines = [f"# {_tag(config)}: refill the Maglev map(s) of {vip.name}"]
    for name, vals in maps:
        lines.append(f"flush map {table} {name}")
        if pool.any_eligible:
            lines += _add_elements(table, name, _elements(pool.table, vals, "\t"))
        if _keeps_flows(vip):  # the open flows of a draining backend (docs/operations.md)
            lines.append(f"flush map {table} {name}_keep")
            if pool.moved and pool.keep_table[0] >= 0:  # empty while nothing is draining
                lines += _add_elements(
                    table, f"{name}_keep", _elements(pool.keep_table, vals, "\t")
                )
            lines.append(f"flush set {table} {name}_moved")
            lines += _add_elements(table, f"{name}_moved", [f"\t{slot}," for slot in pool.moved])
    return "\n".join(lines) + "\n"


def _add_elements(table: str, name: str, elements: list[str]) -> list[str]:
    """``add element`` of ``elements`` (lines, each ending in a comma) to a set or map."""
    return [f"add element {table} {name} {{", *elements, "}"] if elements else []


# --- a DSR backend -----------------------------------------------------------------


def render_backend_nft(config: Config, backend: BackendHost) -> str:
    """The backend's source filter: its decapsulation addresses accept the LB's packets only.

    Anything else sent to an ``End.DT6`` address is counted (``decap_refused``)
    and dropped before the kernel decapsulates it. Empty tables for a
    ``dsr-l2``-only backend (nothing is tunnelled to it).
    """
    tag = _tag(config)
    name = table_name(config.lb.instance)
    decaps = list(
        dict.fromkeys(
            decap_address(vip, j) for vip, j in backend_vips(config, backend) if vip.mode.tunnels
        )
    )
    names = ", ".join(map(str, host_addresses(backend)))
    lines = [f"# {tag}: DSR backend {names} from {config.source}; load with: nft -f FILE"]
    lines += _reset(config.lb.instance)
    if not decaps:
        return "\n".join(lines) + "\n"
    sources = lb_sources(config)
    if not sources:
        raise RenderError("no LB address to accept tunnelled packets from: set lb.addresses")
    lines += [
        f"table ip6 {name} {{",
        f'\tcomment "{tag}"',
        *_counter_block("decap_refused", f"{tag}: tunnelled packets not from the LB"),
        "\tset lb_sources {",
        "\t\ttype ipv6_addr",
        "\t\telements = {",
        *(f"\t\t\t{a}," for a in sources),
        "\t\t}",
        "\t}",
        "\tset decap {",
        "\t\ttype ipv6_addr",
        "\t\telements = {",
        *(f"\t\t\t{a}," for a in decaps),
        "\t\t}",
        "\t}",
        *_chain(
            "raw_pre",
            "filter hook prerouting priority raw",
            [
                'ip6 daddr @decap ip6 saddr != @lb_sources counter name "decap_refused" drop'
                f' comment "{tag}: End.DT6 accepts the LB only"'
            ],
        ),
        "}",
    ]
    return "\n".join(lines) + "\n"
