"""`v6lb backend`'s end-to-end check: the host decapsulates what the LB will send it.

For each tunnel end point the backend serves (dsr-ip6ip6 address, dsr-srv6 SID), one
probe is written into a TUN device made for the purpose, so the kernel RECEIVES it as a
packet from the network: the outer header is the one the LB builds (source: the VIP's
tunnel source, destination: the end point; for dsr-srv6 an SRH with Segments Left 0),
the inner packet is a UDP datagram to the VIP, at a port a socket of ours is bound to on
the VIP (on ``lo`` by then). The probe passes when that socket gets the datagram: the
backend's nft source filter let it in, the ``End.DT6`` route (or the kernel itself)
took it out of the tunnel, and the VIP delivered it. A UDP datagram, so nothing answers
and nothing leaves the host. The TUN device is gone when its descriptor closes.

Not covered: the way from the LB to the end point (its route to it, the links), and the
path of the backend's answers; ``v6lb status`` on the LB shows the health probes that
cross those.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
from dataclasses import dataclass
from ipaddress import IPv6Address

from v6lb.engines.python.tun import open_tun
from v6lb.model.config import TunnelOptions, Vip, VipMode
from v6lb.render.routes import decap_address
from v6lb.wire.build import ipv6, srh, udp
from v6lb.wire.constants import NH_IPV6

__all__ = ["DecapProbe", "how_to_check", "probe_decapsulation", "seg6_enabled"]

PAYLOAD = b"v6lb decapsulation probe"
WAIT_S = 2.0  # seconds in all for one end point's probe
ATTEMPTS = 4


@dataclass(frozen=True, slots=True)
class DecapProbe:
    vip: Vip
    end: IPv6Address
    source: IPv6Address
    delivered: bool

    def text(self) -> str:
        kind = "ip6ip6" if self.vip.mode is VipMode.DSR_IP6IP6 else "SRv6"
        verdict = "reached" if self.delivered else "did NOT reach"
        return (
            f"decapsulation checked: an {kind} packet from {self.source} to {self.end} {verdict}"
            f" a socket on VIP {self.vip.address} ({self.vip.name})"
        )


def _probe_packet(vip: Vip, end: IPv6Address, source: IPv6Address, port: int) -> bytes:
    inner = udp(source.packed, vip.address.packed, 9, port, PAYLOAD)
    ext = [srh([end.packed], segments_left=0)] if vip.mode is VipMode.DSR_SRV6 else []
    return bytes(ipv6(source.packed, end.packed, NH_IPV6, inner, ext=ext))


def seg6_enabled(dev: str) -> bool:
    """``net.ipv6.conf.DEV.seg6_enabled`` of the current namespace (False when unreadable)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{dev}/seg6_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def probe_decapsulation(served: list[tuple[Vip, int]], dev: str) -> list[DecapProbe]:
    """One probe per (tunnel VIP, end point) of ``served``, received as if on a link.

    ``dev``: the interface the tunnelled packets arrive on; its ``seg6_enabled`` is
    copied to the probe's device (the kernel decapsulates SRv6 to a local SID only where
    it is on).
    """
    todo = [
        (vip, decap_address(vip, j))
        for vip, j in served
        if vip.mode.tunnels and isinstance(vip.options, TunnelOptions)
    ]
    if not todo:
        return []
    name = f"v6lbdp{os.getpid() % 1000000}"
    fd = open_tun(name)
    socks: list[socket.socket] = []
    try:
        subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
        if seg6_enabled(dev):
            with open(f"/proc/sys/net/ipv6/conf/{name}/seg6_enabled", "w") as f:
                f.write("1")
        out: list[DecapProbe] = []
        for vip, end in todo:
            assert isinstance(vip.options, TunnelOptions)
            source = vip.options.tunnel_source
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            socks.append(s)
            s.bind((str(vip.address), 0))
            packet = _probe_packet(vip, end, source, s.getsockname()[1])
            got = False
            # sent again a few times: a device or route that has just been set up may drop
            # the first one (seen once in a CI lab on a loaded 2-core machine)
            for _ in range(ATTEMPTS):
                os.write(fd, packet)
                ready, _, _ = select.select([s], [], [], WAIT_S / ATTEMPTS)
                if ready:
                    data, _ = s.recvfrom(2048)
                    got = data == PAYLOAD
                    break
            out.append(DecapProbe(vip, end, source, got))
        return out
    finally:
        for s in socks:
            s.close()
        os.close(fd)


def how_to_check(vip: Vip, end: IPv6Address, instance: str, netns: str | None) -> str:
    """The commands that show, by hand, whether ``end``'s tunnelled packets get through."""
    nsx = f"ip netns exec {netns} " if netns else ""
    return (
        f"on the backend, `{nsx}nstat -az Ip6InUnknownProtos Ip6InDiscards` while a client"
        f" connects to [{vip.address}] (a growing Ip6InUnknownProtos: the kernel took"
        f" {end} for its own address and dropped the tunnel), `{nsx}nft list counter ip6"
        f" v6lb_{instance} decap_refused` (packets from a source that is not an LB address),"
        f" and `{nsx}tcpdump -ni any host {end}` (do the tunnelled packets arrive at all?)"
    )
