"""`v6lb backend`: set up (or remove) a DSR backend host from the same file the LB runs.

Installs, tagged with the LB's instance:

* nft ``table ip6 v6lb_<instance>``: the decapsulation addresses accept the
  LB's addresses only (:func:`v6lb.render.nftables.render_backend_nft`);
* routes/rules (``proto 0x76``) and ``lo`` addresses (metric = instance tag):
  each VIP the host serves on ``lo`` as a /128, an ``End.DT6`` route per
  decapsulation address on ``--dev``, and the main table's routes that packets
  from the VIPs may take (``from`` selectors kept, so a source-specific route
  that sends DSR replies around the LB still wins) copied with the ``advmss``
  the MTU trap needs, used for packets from the VIPs
  (:func:`v6lb.render.routes.render_backend_routes`).

The nft table goes first, then the routes; if the routes fail the table is
removed again, so a failed setup leaves nothing.
"""

from __future__ import annotations

from ipaddress import IPv6Address
from typing import ClassVar

from v6lb.engines.kernel.apply import (
    KernelError,
    apply_nft,
    apply_routes,
    remove,
    require_root,
    require_tools,
)
from v6lb.engines.kernel.decap_probe import how_to_check, probe_decapsulation, seg6_enabled
from v6lb.engines.kernel.host import HostError, Links, host_links, main_routes
from v6lb.errors import EXIT_RUNTIME
from v6lb.model.config import Config, Vip, VipMode
from v6lb.render.nftables import RenderError, render_backend_nft, render_remove
from v6lb.render.routes import backend_vips, decap_address, render_backend_routes

__all__ = ["DecapProbeError", "remove_backend", "setup_backend"]


class DecapProbeError(KernelError):
    """Installed, but the host does not decapsulate what the LB will send it (exit 1)."""

    exit_code: ClassVar[int] = EXIT_RUNTIME


def _check_end_points(
    served: list[tuple[Vip, int]], links: Links, dev: str | None, netns: str | None
) -> None:
    """Refuse a tunnel end point (dsr-ip6ip6 address, dsr-srv6 SID) assigned on this host
    that the kernel would drop: it delivers a packet to its own address (rule 0, table
    ``local``) before v6lb's End.DT6 route sees it. Measured on Linux 6.18: an ip6ip6
    packet is then dropped (``Ip6InUnknownProtos``) unless an ``ip6tnl0`` device takes it;
    an SRv6 one is dropped unless ``seg6_enabled`` is on for ``all`` AND the interface it
    arrives on (then the kernel decapsulates it itself, and the VIP answers)."""
    for vip, j in served:
        if not vip.mode.tunnels:
            continue
        end = decap_address(vip, j)
        local = links.addresses.get(end)
        if local is None:
            continue
        rule = (
            f"{vip.mode} VIP {vip.name} tunnels to {end}, which is assigned to {local} on this"
            " host: the kernel delivers a packet to its own address before v6lb's End.DT6"
            " route sees it, and "
        )
        if vip.mode is VipMode.DSR_IP6IP6 and "ip6tnl0" not in links.macs:
            raise HostError(
                rule + "without an ip6tnl0 device it drops the tunnelled ones",
                "give this backend a decapsulation address of its own in the file (one on no"
                " interface, routed to this host by the LBs), or load the ip6_tunnel module"
                " (modprobe ip6_tunnel)",
            )
        if vip.mode is VipMode.DSR_SRV6:
            at = dev or local
            if not (seg6_enabled("all") and seg6_enabled(at)):
                sysctl = (
                    f"sysctl -w net.ipv6.conf.all.seg6_enabled=1 net.ipv6.conf.{at}.seg6_enabled=1"
                )
                raise HostError(
                    rule + f"with seg6_enabled off (all and {at} must both be 1) it drops the"
                    " SRv6 ones",
                    "give this backend a `sid:` of its own in the file (one on no interface,"
                    " routed to this host by the LBs), or let the kernel decapsulate SRv6 itself: "
                    + (f"ip netns exec {netns} {sysctl}" if netns else sysctl),
                )


def setup_backend(
    config: Config, address: IPv6Address, *, dev: str | None = None, netns: str | None = None
) -> list[str]:
    """Install the backend side for ``address`` in the current namespace; what was done.

    ``netns``: the namespace entered (for the fixes an error prints).
    """
    require_root()
    require_tools("nft", "ip")
    served = backend_vips(config, address)
    if not served:
        raise HostError(
            f"{address} is not a backend of any dsr-* VIP in {config.source}",
            "give the address a backend has in the file (--address), or add it to a dsr-* VIP",
        )
    links = host_links()
    tunnel = any(vip.mode.tunnels for vip, _ in served)
    vips = [vip.address for vip, _ in served if vip.mode.tunnels]
    returns = main_routes() if tunnel else []
    if dev is None and tunnel:
        # the interface of the default route packets from the VIPs take (a `from` one first)
        defaults = sorted(
            (r for r in returns if r.prefix is None and any(r.applies_to(a) for a in vips)),
            key=lambda r: -(r.source.prefixlen if r.source is not None else -1),
        )
        devs = [r.nexthops[0][1] if r.nexthops else r.dev for r in defaults]
        dev = devs[0] if devs else links.addresses.get(address)
        if dev is None:
            raise HostError(
                "cannot tell which interface the tunnelled packets arrive on",
                "give it with --dev IF",
            )
    if dev is not None and dev not in links.macs:
        raise HostError(
            f"this host has no interface {dev!r}", "give an existing interface with --dev"
        )
    _check_end_points(served, links, dev, netns)
    try:
        nft = render_backend_nft(config, address)
        batch = render_backend_routes(config, address, decap_dev=dev or "lo", return_routes=returns)
    except RenderError as exc:
        raise HostError(f"{config.source}: {exc}", "fix the file") from None
    instance = config.lb.instance
    apply_nft(nft)
    try:
        apply_routes(batch, instance)
    except KernelError:
        apply_nft(render_remove(instance))
        raise
    done = [f"VIP {vip.address}/128 on lo ({vip.name}, {vip.mode})" for vip, _ in served]
    if tunnel:
        done.append(f"End.DT6 decapsulation on {dev}, accepting the LB's addresses only")
        used = [r for r in returns if any(r.applies_to(a) for a in vips)]
        if used:
            shown = ", ".join(r.text() for r in used if r.prefix is None) or "none"
            done.append(
                f"advmss on the main table's {len(used)} route(s) that packets from the VIPs"
                f" may take (default: {shown})"
            )
        else:
            done.append("no route found: no advmss return route (large POSTs may hang)")
    probes = probe_decapsulation(served, dev or "lo")
    failed = [p for p in probes if not p.delivered]
    if failed:
        raise DecapProbeError(
            "; ".join(p.text() for p in failed)
            + ": this host would drop those clients' packets. What is installed stays, so you"
            f" can look (`v6lb backend {config.source} --address {address} --remove"
            + (f" --netns {netns}" if netns else "")
            + "` takes it away)",
            how_to_check(failed[0].vip, failed[0].end, instance, netns),
        )
    done += [p.text() for p in probes]
    return done


def remove_backend(config: Config) -> list[str]:
    """Remove everything tagged with the file's instance in the current namespace."""
    require_root()
    return remove(config.lb.instance)
