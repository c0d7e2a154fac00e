"""Facts about the host (or a named network namespace) that `run` and `backend` check first.

* :func:`enter_netns` moves the whole process into a named namespace
  (``setns(2)``), so the control socket stays in the file system while the
  probes, the tools and the kernel state are the namespace's.
* :func:`check_lb_host` fails, before anything is installed, when an interface
  or an address named in ``lb:`` is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network

from v6lb.engines.kernel.apply import KernelError, require_tools
from v6lb.model.config import Config
from v6lb.render.routes import ReturnRoute

__all__ = [
    "HostError",
    "Links",
    "check_lb_host",
    "enter_netns",
    "host_links",
    "main_routes",
    "require_ipv6_forwarding",
]

_CLONE_NEWNET = 0x40000000


class HostError(KernelError):
    """The host lacks something the file names (an interface, an address, a namespace)."""


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into the named network namespace."""
    path = f"/run/netns/{name}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise HostError(
            f"there is no network namespace named {name!r} ({path} is missing)",
            "create it with `ip netns add NAME`, or check the name with `ip netns list`",
        ) from None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise HostError(
                f"cannot enter network namespace {name!r}: {os.strerror(err)}",
                "run it as root",
            )
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Links:
    """Interfaces (name -> MAC, '' when none) and the IPv6 addresses assigned on the host."""

    macs: dict[str, str]
    addresses: dict[IPv6Address, str]


def _ip_json(*argv: str) -> list[dict[str, object]]:
    require_tools("ip")
    r = subprocess.run(["ip", "-j", *argv], capture_output=True, text=True, timeout=30, check=False)
    if r.returncode != 0:
        raise HostError(f"`ip {' '.join(argv)}` failed: {r.stderr.strip()}", "check iproute2")
    data = json.loads(r.stdout or "[]")
    return data if isinstance(data, list) else []


def host_links() -> Links:
    macs: dict[str, str] = {}
    addresses: dict[IPv6Address, str] = {}
    # `ip -j address show` carries no link-layer address: MACs come from `ip -j link show`.
    for link in _ip_json("link", "show"):
        macs[str(link.get("ifname"))] = str(link.get("address") or "")
    for link in _ip_json("-6", "address", "show"):
        name = str(link.get("ifname"))
        macs.setdefault(name, "")
        infos = link.get("addr_info")
        for info in infos if isinstance(infos, list) else []:
            if info.get("family") == "inet6":
                addresses[IPv6Address(str(info["local"]))] = name
    return Links(macs, addresses)


def check_lb_host(config: Config, links: Links | None = None) -> Links:
    """Fail when ``lb.interfaces`` or ``lb.addresses`` name something this host lacks."""
    links = links or host_links()
    where = f"{config.source}: lb"
    for name in config.lb.interfaces:
        if name not in links.macs:
            have = ", ".join(sorted(links.macs)) or "none"
            raise HostError(
                f"{where}.interfaces: this host has no interface {name!r} (it has: {have})",
                f"fix lb.interfaces in {config.source}, or create the interface first",
            )
    for address in config.lb.addresses:
        if address not in links.addresses:
            raise HostError(
                f"{where}.addresses: {address} is not assigned to any interface of this host",
                f"add it (ip -6 address add {address}/64 dev IF) or fix lb.addresses"
                f" in {config.source}",
            )
    return links


def require_ipv6_forwarding(netns: str | None, why: str) -> None:
    """Fail unless this network namespace routes IPv6 (``why``: what needs it).

    Read after ``enter_netns``: /proc/sys/net is the reading process's namespace.
    """
    try:
        with open("/proc/sys/net/ipv6/conf/all/forwarding") as f:
            on = f.read().strip() == "1"
    except OSError:
        on = False
    if not on:
        sysctl = "sysctl -w net.ipv6.conf.all.forwarding=1"
        raise HostError(
            f"IPv6 forwarding is off{f' in network namespace {netns}' if netns else ''}: {why}",
            f"ip netns exec {netns} {sysctl}" if netns else sysctl,
        )


def _net(text: object) -> IPv6Network | None:
    """``default`` -> None; ``a::1`` (iproute2 leaves /128 out) -> a /128 network."""
    t = str(text)
    return None if t == "default" else IPv6Network(t if "/" in t else f"{t}/128")


def main_routes() -> list[ReturnRoute]:
    """The main table's unicast routes toward other hosts, as advmss return routes.

    Kept with their ``from`` selector, metric and nexthops (multipath). Left out:
    routes on ``lo`` (the VIPs' own), link-local and multicast destinations,
    non-unicast types (unreachable, blackhole, ...) and routes with an ``encap``.
    """
    out: list[ReturnRoute] = []
    for route in _ip_json("-6", "route", "show", "table", "main"):
        if route.get("type", "unicast") != "unicast" or route.get("encap"):
            continue
        prefix = _net(route.get("dst", "default"))
        if prefix is not None and (prefix.is_link_local or prefix.is_multicast):
            continue
        source = _net(route["from"]) if route.get("from") else None
        metric = route.get("metric")
        hops: list[tuple[IPv6Address | None, str, int]] = []
        nexthops = route.get("nexthops")
        for nh in nexthops if isinstance(nexthops, list) else []:
            gw = nh.get("gateway")
            hops.append(
                (IPv6Address(str(gw)) if gw else None, str(nh.get("dev")), int(nh.get("weight", 1)))
            )
        dev = str(route.get("dev", ""))
        if not hops and dev in ("", "lo"):
            continue
        gateway = route.get("gateway")
        out.append(
            ReturnRoute(
                prefix,
                IPv6Address(str(gateway)) if gateway else None,
                dev,
                source=source,
                metric=int(str(metric)) if metric is not None else None,
                nexthops=tuple(hops),
            )
        )
    return out


def connected_prefixes(dev: str) -> Sequence[IPv6Network]:
    """The global prefixes on ``dev`` (for a backend with no default route)."""
    out: list[IPv6Network] = []
    for route in _ip_json("-6", "route", "show", "dev", dev, "scope", "link"):
        dst = str(route.get("dst", ""))
        if "/" in dst and not dst.startswith("fe80"):
            out.append(IPv6Network(dst))
    return out
