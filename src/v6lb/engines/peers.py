"""What ``lb.peers`` (the second chance, :mod:`v6lb.render.peers`) needs from the host.

Both planes that install it check it before they install anything: the proxy planes
for the proxy VIPs, the kernel plane for the nat VIPs (docs/anycast.md, "Connections
across instances").
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from v6lb.engines.kernel.host import host_links
from v6lb.engines.plane import RunError
from v6lb.model.config import Config

__all__ = ["TCP_LOOSE", "check_peers_host"]

TCP_LOOSE: Final = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_loose")


def check_peers_host(config: Config) -> None:
    """``lb.peers.interface`` is an interface here and conntrack picks flows up mid-stream.

    Raises :class:`RunError` naming the problem and the fix; nothing without ``lb.peers``.
    """
    peers = config.lb.peers
    if peers is None:
        return
    if peers.interface not in host_links().macs:
        raise RunError(
            f"{config.source}: lb.peers.interface: this host has no interface {peers.interface!r}",
            "give the link this instance shares with its peers (ip link shows them)",
        )
    try:
        loose = TCP_LOOSE.read_text().strip()
    except OSError:
        loose = "1"  # no conntrack yet: loading it gives the default, 1
    if loose != "1":
        raise RunError(
            "lb.peers: net.netfilter.nf_conntrack_tcp_loose is 0, so conntrack marks a"
            " connection picked up mid-stream invalid and the second chance never sees it",
            "sysctl -w net.netfilter.nf_conntrack_tcp_loose=1 (the default), or remove lb.peers",
        )
