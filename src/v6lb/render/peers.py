"""The proxies' second chance as an nftables table (``lb.peers``; docs/anycast.md).

When an instance stops announcing a VIP (a graceful stop, or a withdraw), the routers'
ECMP sends every packet of its open connections to another instance, which has no
socket for them and would reset them. With ``lb.peers`` every instance installs this
table: a TCP packet to a proxy VIP and port that conntrack picked up mid-stream (``ct
state new`` without SYN: no connection here opened it or answered it; this needs
``nf_conntrack_tcp_loose=1``, the default; or a FIN or RST that conntrack calls
``invalid``, which is what a FIN or RST of a flow it does not know is) is duplicated to
each peer (``dup to PEER device IF``) and dropped here. A peer that holds the socket (still draining) takes it
as its own; the others drop it.

The guard against forwarding a packet twice (no ping-pong between two instances when
neither has the socket) is the hop limit: the copy is sent with hop limit 0 (``set 1``,
and ``dup`` decrements it). No router forwards a packet with hop limit 0 and no host
sends one, so a packet that arrives with hop limit 0 comes from a peer on the link: it
is never sent on again, and is dropped if no connection here owns it. The packet's
other bytes (the TCP segment, its checksum) are unchanged.

The table is ``ip6 v6lb_<instance>_peers`` (``dup`` has no ``inet`` form, and the
kernel plane owns ``ip6 v6lb_<instance>``); each transaction replaces it whole.
"""

from __future__ import annotations

from typing import Final

from v6lb.model.config import Config, Protocol, VipMode

__all__ = [
    "FORWARDED",
    "FROM_PEER",
    "PRIORITY",
    "peers_table",
    "remove_peers",
    "render_peers",
    "second_chance_objects",
]

FORWARDED: Final = "second_chance"  # counter: packets sent on to the peers
FROM_PEER: Final = "from_peer_dropped"  # counter: a peer's packets that no connection here owns
PRIORITY: Final = -150  # after conntrack (-200), before the routing decision


def peers_table(instance: str) -> str:
    """The table's ``family name``."""
    return f"ip6 v6lb_{instance}_peers"


def _reset(instance: str) -> list[str]:
    table = peers_table(instance)
    return [f"table {table}", f"delete table {table}"]  # "table" first: delete cannot fail


def remove_peers(instance: str) -> str:
    """A transaction that deletes the table, whether present or not."""
    return "\n".join([f"# v6lb:{instance}: remove the proxies' second chance", *_reset(instance)])


def _keys(config: Config, *, nat: bool) -> list[tuple[object, int]]:
    """(address, port) of each TCP VIP the second chance covers: proxy VIPs, or nat VIPs."""
    return sorted(
        {
            (v.address, port)
            for v in config.vips
            if (v.mode is VipMode.NAT if nat else v.mode.is_proxy) and v.protocol is Protocol.TCP
            for port in v.ports
        },
        key=lambda k: (str(k[0]), k[1]),
    )


def second_chance_objects(config: Config, *, nat: bool) -> list[str]:
    """The counters and chains of the second chance, for a table of family ip6.

    ``nat=False``: the proxy VIPs (the proxy planes' own table, :func:`render_peers`);
    ``nat=True``: the ``nat`` VIPs, in the kernel plane's table
    (:func:`v6lb.render.nftables.render_nft`). A nat flow is forwarded by its owner, so a
    packet that came from a peer (hop limit 0) and belongs to a flow here gets a hop limit
    of 64 before the routing decision, which would drop it otherwise. [] without
    ``lb.peers`` or without such VIPs.
    """
    peers = config.lb.peers
    keys = _keys(config, nat=nat)
    if peers is None or not keys:
        return []
    elements = "{ " + ", ".join(f"{address} . {port}" for address, port in keys) + " }"
    tag = f"v6lb:{config.lb.instance}"
    what = "nat" if nat else "proxy"
    restore = (
        [
            f"\t\tip6 hoplimit 0 ip6 daddr . tcp dport {elements} ip6 hoplimit set 64"
            f' comment "{tag}: a peer\'s copy of a flow of ours: forwarded on"'
        ]
        if nat
        else []
    )
    return [
        f'\tcounter {FORWARDED} {{ comment "{tag}: {what} VIPs\' packets sent on to the peers" }}',
        f'\tcounter {FROM_PEER} {{ comment "{tag}: from a peer, owned by no connection here" }}',
        "\tchain peers_pre {",
        f"\t\ttype filter hook prerouting priority {PRIORITY}; policy accept;",
        f"\t\tip6 daddr . tcp dport {elements} ct state new tcp flags & syn == 0"
        " jump second_chance",
        # a FIN or RST picked up mid-stream makes no conntrack entry (it is invalid, not
        # new): without this the peer's socket never saw the client's FIN and stayed open
        f"\t\tip6 daddr . tcp dport {elements} ct state invalid tcp flags & (fin | rst) != 0"
        " jump second_chance",
        *restore,
        "\t}",
        "\tchain second_chance {",
        f'\t\tip6 hoplimit 0 counter name {FROM_PEER} drop comment "{tag}: never sent on twice"',
        "\t\tip6 hoplimit set 1",
        *(f"\t\tdup to {a} device {peers.interface}" for a in peers.addresses),
        f"\t\tcounter name {FORWARDED} drop",
        "\t}",
    ]


def render_peers(config: Config) -> str:
    """The proxy VIPs' table as one transaction (replacing any earlier one); "" without it."""
    objects = second_chance_objects(config, nat=False)
    if not objects:
        return ""
    instance = config.lb.instance
    tag = f"v6lb:{instance}"
    lines = [
        f"# {tag}: the proxies' second chance (lb.peers, docs/anycast.md)",
        *_reset(instance),
        f"table {peers_table(instance)} {{",
        f'\tcomment "{tag}"',
        *objects,
        "}",
    ]
    return "\n".join(lines) + "\n"
