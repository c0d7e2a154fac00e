"""conntrackd.conf text for ``lb.conntrack_sync`` (docs/anycast.md). Pure: config in, text out.

One conntrackd per `v6lb run` instance replicates the kernel's conntrack entries to
the other instance of the site:

* **FTFW** over **unicast UDP** on the dedicated link (``IPv6_address`` ->
  ``IPv6_Destination_Address``, bound to ``Interface``): the reliable protocol
  (sequence numbers, acknowledgements, resends).
* **DisableExternalCache yes**: every entry the peer sends is injected into this
  namespace's kernel table at once, with its NAT (the reply tuple carries the
  backend and the SNAT address and port). A flow that ECMP moves here mid-stream
  finds its entry already in the kernel, so nothing has to notice that the peer
  died and commit a cache (``conntrackd -c``).
* **StartupResync yes**: a restarted instance asks its peer for every entry.
* **TCPWindowTracking off**: injected TCP entries do not check sequence windows
  (this instance never saw the segments before the move).
* **Filter** (in conntrackd, ``From Userspace``): TCP, UDP and ICMPv6 entries with a
  nat backend as a source address in either direction (the reply's source, for a VIP
  flow). conntrackd's address filter compares the source of each direction only, so
  listing the VIP would match nothing; and its kernel-space IPv6 address filter let
  no entry through at all with conntrackd 1.4.7 on Linux 6.18 (tried). The sync link's
  own traffic, BGP and everything else in the namespace are left out.
* Its files (the UNIX control socket, the lock file and the log) are in
  ``workdir``, one directory per instance, so two instances never share a lock.
"""

from __future__ import annotations

from ipaddress import IPv6Address
from typing import Final

from v6lb.model.config import Config, VipMode

__all__ = ["CTL_NAME", "render_conntrackd", "sync_addresses"]

CTL_NAME: Final = "conntrackd.ctl"
_HASH_SIZE: Final = 32768


def sync_addresses(config: Config) -> list[IPv6Address]:
    """The addresses whose flows are synced: the backends of the nat VIPs."""
    out: list[IPv6Address] = []
    for vip in config.vips:
        if vip.mode is not VipMode.NAT:
            continue
        for addr in (b.address for b in vip.backends):
            if addr not in out:
                out.append(addr)
    return out


def render_conntrackd(config: Config, workdir: str) -> str:
    """conntrackd.conf for ``config``'s instance; ``workdir`` holds its socket, lock and log."""
    sync = config.lb.conntrack_sync
    if sync is None:
        raise ValueError(f"{config.source}: lb.conntrack_sync is not set")
    wd = workdir.rstrip("/")
    accept = [f"\t\t\tIPv6_address {a}" for a in sync_addresses(config)]
    lines = [
        f"# v6lb: conntrackd.conf for instance {config.lb.instance}"
        " (rendered by v6lb.render.conntrackd; do not edit)",
        "Sync {",
        "\tMode FTFW {",
        "\t\tDisableExternalCache yes",
        "\t\tStartupResync yes",
        "\t\tResendQueueSize 131072",
        "\t\tACKWindowSize 300",
        "\t}",
        "\tUDP Default {",
        f"\t\tIPv6_address {sync.address}",
        f"\t\tIPv6_Destination_Address {sync.peer}",
        f"\t\tPort {sync.port}",
        f"\t\tInterface {sync.interface}",
        "\t\tChecksum on",
        "\t}",
        "\tOptions {",
        "\t\tTCPWindowTracking off",
        "\t}",
        "}",
        "General {",
        "\tSystemd off",
        f"\tHashSize {_HASH_SIZE}",
        f"\tHashLimit {2 * config.lb.conntrack_max}",
        f"\tLogFile {wd}/conntrackd.log",
        "\tSyslog off",
        f"\tLockFile {wd}/conntrackd.lock",
        "\tUNIX {",
        f"\t\tPath {wd}/{CTL_NAME}",
        "\t}",
        "\tNetlinkBufferSize 2097152",
        "\tNetlinkBufferSizeMaxGrowth 8388608",
        "\tNetlinkOverrunResync on",
        "\tFilter From Userspace {",
        "\t\tProtocol Accept {",
        "\t\t\tTCP",
        "\t\t\tUDP",
        "\t\t\tIPv6-ICMP",
        "\t\t}",
        "\t\tAddress Accept {",
        *accept,
        "\t\t}",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"
