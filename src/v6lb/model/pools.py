"""The adapter from the config model to the core's plain specs: pools, services, forwarders.

The core never reads the config (docs/architecture.md): it takes plain values, its
own specs (:class:`~v6lb.core.backends.BackendSpec`,
:class:`~v6lb.core.nat66.NatService`, :class:`~v6lb.core.dsr.DsrService`, the
forwarders' constructors). This module is the one place that builds them from
a :class:`~v6lb.model.config.Config`, and every engine and renderer goes
through it: the kernel's nftables maps, the python data plane, the simulator
and the builtin proxy. That is what makes them pick the same backend for the
same flow.

The pool rule (:func:`pool_for`): a VIP's backends in file order, each keyed
by (address, port) with its weight and drain flag; a Maglev table of the VIP's
``table_size`` (default :data:`MAGLEV_TABLE_SIZE`) seeded with
``lb.flow_hash_seed``. A backend without a port is keyed as port 0 in ``nat``
("the port the client connected to": one map serves every VIP port) and as the
VIP's first port in every other mode. The port is part of a backend's Maglev
identity, so this decides the table.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from ipaddress import IPv6Address

from v6lb.core.backends import BackendPool, BackendSpec
from v6lb.core.dsr import DsrForwarder, DsrService
from v6lb.core.dsr_decap import DsrDecap
from v6lb.core.health import HealthMonitor
from v6lb.core.nat66 import NatForwarder, NatService
from v6lb.core.nptv6 import NptForwarder, NptMapping
from v6lb.model.config import (
    MAGLEV_TABLE_SIZE,
    Config,
    DsrL2Options,
    HealthCheck,
    HealthType,
    NatOptions,
    TunnelOptions,
    Vip,
    VipMode,
)
from v6lb.model.modes import Forwarder, modes_where

__all__ = [
    "MAGLEV_TABLE_SIZE",
    "backend_specs",
    "dsr_decap",
    "dsr_forwarder",
    "dsr_services",
    "health_monitor",
    "nat_forwarder",
    "nat_services",
    "npt_forwarder",
    "pool_for",
    "pools_for",
    "table_size",
]


def table_size(vip: Vip) -> int:
    """The size of the VIP's Maglev table: its ``table_size``, else :data:`MAGLEV_TABLE_SIZE`.

    A VIP whose scheduler is not ``maglev`` has no ``table_size``; its pool still
    has a table (the proxies keep one per VIP), of the default size.
    """
    return vip.table_size or MAGLEV_TABLE_SIZE


def backend_specs(vip: Vip) -> list[BackendSpec]:
    """The VIP's backends as the pool keys them (see the module doc for the port)."""
    default = 0 if vip.mode is VipMode.NAT else vip.ports[0]
    return [
        BackendSpec(b.address.packed, b.port if b.port is not None else default, b.weight, b.drain)
        for b in vip.backends
    ]


def pool_for(vip: Vip, seed: int) -> BackendPool:
    """The VIP's Maglev pool, every backend up; ``seed`` is ``lb.flow_hash_seed``."""
    return BackendPool(backend_specs(vip), table_size=table_size(vip), seed=seed)


def pools_for(config: Config, modes: Collection[str] | None = None) -> dict[str, BackendPool]:
    """A fresh pool per VIP name, for the VIPs whose mode is in ``modes`` (default: all).

    ``modes`` is a set of names from the mode table, for example
    ``modes_where(plane="kernel", vip=True)`` for the kernel data plane.
    """
    seed = config.lb.flow_hash_seed
    return {v.name: pool_for(v, seed) for v in config.vips if modes is None or str(v.mode) in modes}


# --- nat --------------------------------------------------------------------------


def _runs_on(vip: Vip, forwarder: Forwarder) -> bool:
    return vip.mode.facts.forwarder is forwarder


def nat_services(config: Config) -> list[NatService]:
    """One :class:`NatService` per ``nat`` VIP of ``config``, each with a fresh pool."""
    seed = config.lb.flow_hash_seed
    services = []
    for vip in config.vips:
        if not _runs_on(vip, Forwarder.NAT):
            continue
        opts = vip.options
        assert isinstance(opts, NatOptions)
        services.append(
            NatService(
                vip.address,
                pool_for(vip, seed),
                protocol=str(vip.protocol),
                ports=vip.ports,
                snat=opts.snat,
                snat_ports=opts.snat_ports,
                name=vip.name,
            )
        )
    return services


def nat_forwarder(
    config: Config, *, decrement_hop_limit: bool = True, conntrack_max: int | None = None
) -> NatForwarder:
    """A :class:`NatForwarder` for every ``nat`` VIP of ``config``.

    From ``lb:``: the flow hash seed, ``conntrack_max`` (unless given here) and
    the ICMPv6 error rate. The ICMPv6 error source is the first ``lb.addresses``,
    else the first ``nat`` VIP's address. ``decrement_hop_limit=False`` is for a
    plane whose kernel already decremented it.
    """
    services = nat_services(config)
    if not services:
        raise ValueError("the config has no VIP in mode nat")
    lb = config.lb
    icmp_source = lb.addresses[0].packed if lb.addresses else services[0].address
    return NatForwarder(
        services,
        icmp_source,
        conntrack_max=lb.conntrack_max if conntrack_max is None else conntrack_max,
        seed=lb.flow_hash_seed,
        icmp_rate=float(lb.icmp_error_rate),
        icmp_burst=float(lb.icmp_error_burst),
        decrement_hop_limit=decrement_hop_limit,
    )


# --- npt --------------------------------------------------------------------------


def npt_forwarder(
    config: Config, icmp_source: bytes | None = None, *, decrement_hop_limit: bool = True
) -> NptForwarder:
    """An :class:`NptForwarder` for the ``npt:`` pairs of ``config``.

    The ICMPv6 error source defaults to the first ``lb.addresses``, else the
    first pair's outside prefix; the error rate is ``lb:``'s.
    """
    if not config.npt:
        raise ValueError(f"{config.source}: no npt: pairs")
    lb = config.lb
    if icmp_source is None:
        src = lb.addresses[0] if lb.addresses else config.npt[0].outside.network_address
        icmp_source = src.packed
    return NptForwarder(
        [NptMapping(p.inside, p.outside) for p in config.npt],
        icmp_source,
        icmp_rate=float(lb.icmp_error_rate),
        icmp_burst=float(lb.icmp_error_burst),
        decrement_hop_limit=decrement_hop_limit,
    )


# --- dsr-* ------------------------------------------------------------------------


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def dsr_services(config: Config, macs: Mapping[str, bytes] | None = None) -> list[DsrService]:
    """One :class:`DsrService` per ``dsr-*`` VIP of ``config``, each with a fresh pool.

    ``dsr-l2``: a backend's MAC is its ``mac:``, else ``macs[str(address)]`` (learned
    by the engine), else None (the verdict then names the backend's address).
    Tunnel modes: the outer destination is the backend's ``sid``, else its
    address; the outer source and path MTU are the VIP's.
    """
    seed = config.lb.flow_hash_seed
    learned = macs or {}
    services = []
    for vip in config.vips:
        if not _runs_on(vip, Forwarder.DSR):
            continue
        pool = pool_for(vip, seed)
        proto = vip.protocol.next_header
        opts = vip.options
        if isinstance(opts, DsrL2Options):
            mac_list = [
                _mac(b.mac) if b.mac is not None else learned.get(str(b.address))
                for b in vip.backends
            ]
            svc = DsrService(
                vip.name, vip.address.packed, vip.ports, proto, str(vip.mode), pool, macs=mac_list
            )
        else:
            assert isinstance(opts, TunnelOptions)
            svc = DsrService(
                vip.name,
                vip.address.packed,
                vip.ports,
                proto,
                str(vip.mode),
                pool,
                tunnel_source=opts.tunnel_source.packed,
                mtu=opts.mtu,
                targets=[(b.sid or b.address).packed for b in vip.backends],
            )
        services.append(svc)
    return services


def dsr_forwarder(config: Config, macs: Mapping[str, bytes] | None = None) -> DsrForwarder:
    """A :class:`DsrForwarder` for every ``dsr-*`` VIP of ``config`` (``macs``: see :func:`dsr_services`).

    The ICMPv6 error source is the first ``lb.addresses``, else the first
    tunnel source, else the first VIP's address.
    """
    services = dsr_services(config, macs)
    if not services:
        raise ValueError(f"{config.source}: no VIP uses a dsr-* mode")
    lb = config.lb
    if lb.addresses:
        icmp_source = lb.addresses[0].packed
    else:
        src = next((s.tunnel_source for s in services if s.tunnel_source), None)
        icmp_source = src if src is not None else services[0].address
    return DsrForwarder(
        services,
        icmp_source,
        flow_cache_size=lb.flow_cache_size,
        icmp_rate=float(lb.icmp_error_rate),
        icmp_burst=float(lb.icmp_error_burst),
        frag_id_salt=lb.flow_hash_seed,
    )


def dsr_decap(config: Config, backend: str | IPv6Address) -> DsrDecap:
    """The decapsulation of ``backend`` for every tunnelled DSR VIP that lists it.

    LB sources: ``lb.addresses`` and every such VIP's ``tunnel_source``.
    Local: the backend address and its SIDs. VIPs: those VIPs' addresses.
    """
    me = IPv6Address(backend)
    sources = {a.packed for a in config.lb.addresses}
    local = {me.packed}
    vips: set[bytes] = set()
    for vip in config.vips:
        opts = vip.options
        if not isinstance(opts, TunnelOptions):
            continue
        for b in vip.backends:
            if b.address == me:
                vips.add(vip.address.packed)
                sources.add(opts.tunnel_source.packed)
                if b.sid is not None:
                    local.add(b.sid.packed)
    if not vips:
        raise ValueError(f"{me} is a backend of no {' or '.join(modes_where(tunnels=True))} VIP")
    return DsrDecap(sources, local, vips)


def health_monitor(
    check: HealthCheck, now: float, *, up: bool = True, first_probe_at: float | None = None
) -> HealthMonitor | None:
    """The monitor of one backend under ``check``; None for ``type: none`` (never probed)."""
    if check.type is HealthType.NONE:
        return None
    return HealthMonitor(
        interval=check.interval,
        timeout=check.timeout,
        rise=check.rise,
        fall=check.fall,
        now=now,
        up=up,
        first_probe_at=first_probe_at,
    )
