"""The ``dsr-l2`` egress facts both user-space planes need: the link, its MAC, backend MACs.

The python plane (:mod:`v6lb.engines.python.run`) frames ``dsr-l2`` packets out
of the egress link by AF_PACKET; the xdp plane (:mod:`v6lb.engines.xdp.run`)
writes the same MACs into its program's maps. Both learn them here, the same way.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from v6lb.engines.kernel.apply import neighbour_macs, nft_json, run_tool
from v6lb.engines.kernel.run import dsr_l2_links
from v6lb.engines.plane import RunError
from v6lb.model.config import Config, VipMode

__all__ = ["L2Facts", "l2_facts"]


@dataclass(frozen=True, slots=True)
class L2Facts:
    """What ``dsr-l2`` needs from the host: the egress link, its MAC, backend MACs learned."""

    egress: str
    mac: bytes
    macs: dict[str, bytes]


def l2_facts(config: Config, wait: float = 2.0) -> L2Facts | None:
    """The ``dsr-l2`` egress facts (None without a dsr-l2 VIP); a RunError names what is missing.

    The egress link is the kernel data plane's (:func:`dsr_l2_links`). A
    backend without ``mac:`` is looked up in the neighbour table; if it is not
    there, one datagram to its discard port makes the kernel resolve it, and
    the table is read again for up to ``wait`` s.
    """
    l2 = dsr_l2_links(config)
    if l2 is None:
        return None
    egress = l2[1]
    vips = [v for v in config.vips if v.mode is VipMode.DSR_L2]
    links = nft_json(run_tool(["ip", "-j", "link", "show", "dev", egress], netns=None))
    if not links or not links[0].get("address"):
        raise RunError(
            f"{config.source}: lb.interfaces: {egress} has no link-layer address here",
            "name the dsr-l2 egress link (an Ethernet device) in lb.interfaces",
        )
    mac = bytes.fromhex(str(links[0]["address"]).replace(":", ""))
    wanted = {str(b.address) for v in vips for b in v.backends if b.mac is None}
    macs: dict[str, bytes] = {}
    deadline = time.monotonic() + wait
    poked = False
    while True:
        macs.update(neighbour_macs(wanted))
        missing = sorted(wanted - set(macs))
        if not missing:
            return L2Facts(egress, mac, macs)
        if time.monotonic() >= deadline:
            raise RunError(
                f"{config.source}: dsr-l2: no MAC for backend {', '.join(missing)}"
                f" (not in the neighbour table of {egress})",
                "give `mac:` for the backend in the file, or make it reachable from the LB",
            )
        if not poked:
            poked = True
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                for addr in missing:
                    try:
                        s.sendto(b"", (addr, 9))
                    except OSError:
                        pass
        time.sleep(0.1)
