"""Tunnel end points the backend would drop: warnings for `v6lb check`.

A dsr-ip6ip6 VIP tunnels to its backend's address, a dsr-srv6 VIP to the backend's SID
(``sid:``, default its address). ``v6lb backend`` decapsulates with an ``End.DT6`` route,
which a packet for an address ASSIGNED on the backend never reaches: the kernel delivers
it to itself first (rule 0, table ``local``) and, measured on Linux 6.18, drops it
(``Ip6InUnknownProtos`` for ip6ip6 without an ``ip6tnl0`` device; dsr-srv6 unless
``seg6_enabled`` is on for ``all`` and the interface). The health probe goes through the
same tunnel, so such a backend shows DOWN, or black-holes its clients if probed otherwise.

From the file alone, an end point is known to be assigned on its backend when:

- ``topology:`` puts it on an interface of a node (a ``loopback:`` entry is fine: the lab
  does not assign loopback addresses that are tunnel end points), or
- it is also the address of a backend of a ``nat``, ``proxy-*`` or ``dsr-l2`` VIP: those
  reach the backend at that very address, so the backend holds it.

The host may still decapsulate (ip6tnl0, seg6_enabled): a warning, not a refusal;
``v6lb backend`` refuses on the host, where it can tell.
"""

from __future__ import annotations

from ipaddress import IPv6Address

from v6lb.model.config import Config, VipMode

__all__ = ["end_point_warnings"]


def end_point_warnings(config: Config) -> list[str]:
    """One ``WHERE: PROBLEM; fix: FIX`` line per tunnel VIP with end points on its backends."""
    on_interface: dict[IPv6Address, str] = {}
    if config.topology is not None:
        for link in config.topology.links:
            for a in link.endpoints:
                for addr in a.addresses:
                    on_interface.setdefault(addr, f"on {a.node}'s interface on {link.name}")
    reached: dict[IPv6Address, str] = {}
    for vip in config.vips:
        if not vip.mode.tunnels:
            for b in vip.backends:
                reached.setdefault(b.address, f"{vip.mode} VIP {vip.name} connects to it")
    out: list[str] = []
    for i, vip in enumerate(config.vips):
        if not vip.mode.tunnels:
            continue
        srv6 = vip.mode is VipMode.DSR_SRV6
        found: list[str] = []
        for b in vip.backends:
            end = b.sid if srv6 and b.sid is not None else b.address
            why = on_interface.get(end) or reached.get(end)
            if why is not None:
                found.append(f"{end} ({why})")
        if not found:
            continue
        what = "SIDs" if srv6 else "end points (backend addresses)"
        fix = "a `sid:` of its own" if srv6 else "another address of its own as its address here"
        out.append(
            f"{config.source}: vips[{i}] ({vip.name}, {vip.mode}): the tunnel {what} "
            + ", ".join(found)
            + " are assigned on the backends: a backend's kernel delivers a packet for its own"
            " address to itself before the End.DT6 route of `v6lb backend` sees it, and drops"
            f" the tunnelled ones; fix: give each backend {fix}, on no interface, that the"
            " LBs route to it (docs/run.md, `v6lb backend`)"
        )
    return out
