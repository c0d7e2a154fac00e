"""Backends: the application on every node that holds a backend address, and DSR's loopback VIP.

For ``dsr-*`` VIPs the backend holds the VIP on its loopback, so the client's
packet (delivered unchanged by dsr-l2, or decapsulated) is addressed to it,
and the reply leaves sourced from the VIP, straight to the client. Tunnelled
modes decapsulate with the real :class:`~v6lb.core.dsr_decap.DsrDecap`, which
accepts only outer packets from the LB instances.
"""

from __future__ import annotations

from ipaddress import IPv6Address

from v6lb.core.dsr_decap import DsrDecap
from v6lb.engines.sim.apps import HttpServer
from v6lb.engines.sim.node import SimNode
from v6lb.model.config import Config, TunnelOptions
from v6lb.model.topology import NodeType
from v6lb.render.routes import advmss

__all__ = ["NPT_PORT", "setup_backend"]

NPT_PORT = 80  # the port the npt walk-through connects to on a backend's mapped address


def setup_backend(node: SimNode, config: Config, lb_sources: list[bytes]) -> HttpServer | None:
    """Give ``node`` its backend role for every VIP that lists one of its addresses."""
    mine = node.local
    ports: set[int] = set()
    tunnel_vips: set[bytes] = set()
    tunnel_mss: list[int] = []
    sids: set[bytes] = set()
    for vip in config.vips:
        for b in vip.backends:
            if b.address.packed not in mine:
                continue
            if b.port is not None:
                ports.add(b.port)
            else:
                ports.update(vip.ports)
            if vip.mode.is_dsr:
                node.add_loopback(vip.address.packed)  # the VIP on lo (ip addr add VIP/128 dev lo)
            if isinstance(vip.options, TunnelOptions):
                tunnel_vips.add(vip.address.packed)
                tunnel_mss.append(advmss(vip))
                sids.add((b.sid or b.address).packed)
                lb_sources.append(vip.options.tunnel_source.packed)
    # A host inside an npt: inside prefix serves too: clients reach it at its mapped address.
    npt_host = node.spec.type in (NodeType.HOST, NodeType.BACKEND) and any(
        IPv6Address(a) in pair.inside for a in mine for pair in config.npt
    )
    if not ports and not npt_host:
        return None
    if tunnel_vips:
        for sid in sids:
            node.add_loopback(sid)
        node.decap = DsrDecap(lb_sources, sorted(sids), tunnel_vips)
        # `v6lb backend` routes replies from the tunnel VIPs with the smallest advmss of
        # them all (render/routes.py), so the client never sends what the tunnel can't hold
        for address in tunnel_vips:
            node.stack.advmss[address] = min(tunnel_mss)
    ports.add(NPT_PORT)
    return HttpServer(node, sorted(ports))
