"""The mode table: every mode's facts, declared once.

v6lb has eight mode names, the same on every command line and in every file:
``proxy-l4``, ``proxy-l7``, ``npt``, ``nat``, ``dsr-l2``, ``dsr-ip6ip6``,
``dsr-srv6`` and ``anycast`` (:data:`NAMES`, in that order). :data:`MODES`
maps each to a frozen :class:`ModeFacts`: its :class:`Kind`, whether it is a
VIP mode (``npt`` and ``anycast`` are not: NPT has no ports or backends, and
anycast is how VIPs are announced), its encapsulation and the bytes that adds,
whether it is routed (needs IPv6 forwarding on the LB), which engines serve it,
the name of its options class in :mod:`v6lb.model.config` and the core
forwarder that runs it.

Every layer reads these facts from here. A subset of modes is asked for, never
written out: ``modes_where(plane="kernel", vip=True)`` is the VIP modes of the
kernel data plane, ``modes_where(tunnels=True)`` the tunnel modes, and so on.
:func:`facts` takes a name or a :class:`~v6lb.model.config.VipMode` (a
``StrEnum`` of the VIP mode names, which reads its properties from this table).

``planes`` lists the data planes that serve a mode: ``kernel`` and ``python``
serve ``npt``, ``nat`` and ``dsr-*``; ``xdp`` serves ``npt`` and ``dsr-*``, never
``nat``, which needs connection state. The column may name a plane that is not registered
(engines/planes.py). Everything user-facing offers only the REGISTERED planes: the
``--dataplane`` choices of ``v6lb run`` and ``v6lb lab up``, their help texts, and the refusals
that name planes (``mode nat is not served by --dataplane P``: "use a data plane
that serves it: kernel, python") read the registry, filtered by this column
(``planes.serving(mode)``). So a plane this column already names is added with
its package and one ``register(...)`` line; a plane it does not name also adds
its :class:`Plane` member and lists itself in the rows it serves
(docs/extending.md). ``proxies`` lists the proxy engines (``builtin``,
``haproxy``) of the ``proxy-*`` modes.

A tunnel mode's ``encap`` is a member of :class:`~v6lb.wire.encap.Encap`
(re-exported here), which declares each encapsulation once: its overhead, its
outer next header and its names; the core's DSR forwarder reads the same
members. This module imports nothing from the rest of v6lb but that, so
:mod:`v6lb.model.config` (and anything else) may import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Final

from v6lb.wire.encap import Encap

__all__ = [
    "MODES",
    "NAMES",
    "Encap",
    "Forwarder",
    "Kind",
    "ModeFacts",
    "Plane",
    "ProxyEngine",
    "facts",
    "modes_where",
]


class Kind(Enum):
    """What a mode does to the client's packet."""

    PROXY = "proxy"  # terminates the connection and opens a new one
    TRANSLATE = "translate"  # stateless prefix translation (npt)
    NAT = "nat"  # stateful address translation
    DSR = "dsr"  # forwards the packet unchanged; the backend answers directly
    ANNOUNCE = "announce"  # how VIPs are announced (anycast), not a forwarding mode


class Plane(StrEnum):
    """The L3/L4 data planes the table names; ``--dataplane`` offers the registered ones."""

    KERNEL = "kernel"
    PYTHON = "python"
    XDP = "xdp"  # the BPF program (engines/xdp)


class ProxyEngine(StrEnum):
    """The proxy engines (``--proxy``)."""

    BUILTIN = "builtin"
    HAPROXY = "haproxy"


class Forwarder(StrEnum):
    """The core forwarder that runs a mode (the python plane and the simulator key them so)."""

    NAT = "nat"  # v6lb.core.nat66.NatForwarder
    NPT = "npt"  # v6lb.core.nptv6.NptForwarder
    DSR = "dsr"  # v6lb.core.dsr.DsrForwarder, every dsr-* mode
    PROXY = "proxy"  # the proxy engines (builtin, haproxy)


@dataclass(frozen=True, slots=True)
class ModeFacts:
    """One mode's facts. ``options`` names the options class in :mod:`v6lb.model.config`."""

    name: str
    kind: Kind
    title: str  # one line, for explain and the reports
    vip: bool = True
    encap: Encap = Encap.NONE
    routed: bool = False
    planes: tuple[Plane, ...] = ()
    proxies: tuple[ProxyEngine, ...] = ()
    options: str | None = None
    forwarder: Forwarder | None = None

    @property
    def tunnels(self) -> bool:
        return self.encap is not Encap.NONE

    @property
    def overhead(self) -> int:
        """Bytes the mode adds in front of the client's packet."""
        return self.encap.overhead

    @property
    def engines(self) -> tuple[str, ...]:
        """Every engine the table names for the mode: its data planes, then its proxy engines."""
        return (*self.planes, *self.proxies)

    @property
    def is_proxy(self) -> bool:
        return self.kind is Kind.PROXY

    @property
    def is_dsr(self) -> bool:
        return self.kind is Kind.DSR


_L3: Final = (Plane.KERNEL, Plane.PYTHON, Plane.XDP)  # the modes every L3 plane serves
_STATEFUL: Final = (Plane.KERNEL, Plane.PYTHON)  # nat: the planes that keep connection state
_PROXIES: Final = (ProxyEngine.BUILTIN, ProxyEngine.HAPROXY)

_TABLE: Final = (
    ModeFacts(
        "proxy-l4",
        Kind.PROXY,
        "L4 proxy (TCP, PROXY protocol v2)",
        proxies=_PROXIES,
        options="ProxyL4Options",
        forwarder=Forwarder.PROXY,
    ),
    ModeFacts(
        "proxy-l7",
        Kind.PROXY,
        "L7 proxy (HTTP, X-Forwarded-For / Forwarded)",
        proxies=_PROXIES,
        options="ProxyL7Options",
        forwarder=Forwarder.PROXY,
    ),
    ModeFacts(
        "npt",
        Kind.TRANSLATE,
        "NPTv6 prefix translation (RFC 6296)",
        vip=False,
        routed=True,
        planes=_L3,
        forwarder=Forwarder.NPT,
    ),
    ModeFacts(
        "nat",
        Kind.NAT,
        "Stateful NAT66 (DNAT with conntrack)",
        routed=True,
        planes=_STATEFUL,
        options="NatOptions",
        forwarder=Forwarder.NAT,
    ),
    ModeFacts(
        "dsr-l2",
        Kind.DSR,
        "Direct server return, L2 (MAC rewrite)",
        planes=_L3,
        options="DsrL2Options",
        forwarder=Forwarder.DSR,
    ),
    ModeFacts(
        "dsr-ip6ip6",
        Kind.DSR,
        "Direct server return, IPv6-in-IPv6 (RFC 2473)",
        encap=Encap.IP6IP6,
        routed=True,
        planes=_L3,
        options="TunnelOptions",
        forwarder=Forwarder.DSR,
    ),
    ModeFacts(
        "dsr-srv6",
        Kind.DSR,
        "Direct server return, SRv6 (RFC 8754 SRH)",
        encap=Encap.SRV6,
        routed=True,
        planes=_L3,
        options="TunnelOptions",
        forwarder=Forwarder.DSR,
    ),
    ModeFacts(
        "anycast",
        Kind.ANNOUNCE,
        "Anycast: two sites announce the VIP, ECMP inside a site",
        vip=False,
    ),
)

MODES: Final[Mapping[str, ModeFacts]] = MappingProxyType({m.name: m for m in _TABLE})
"""Every mode name -> its facts, in the order of docs/architecture.md."""

NAMES: Final = tuple(MODES)
"""The eight mode names, in the order of docs/architecture.md."""


def facts(mode: str) -> ModeFacts:
    """The facts of ``mode`` (a name or a ``VipMode``); KeyError for an unknown name."""
    return MODES[str(mode)]


def modes_where(
    *,
    kind: Kind | None = None,
    vip: bool | None = None,
    tunnels: bool | None = None,
    routed: bool | None = None,
    plane: Plane | str | None = None,
    proxy: ProxyEngine | str | None = None,
    forwarder: Forwarder | str | None = None,
    test: Callable[[ModeFacts], bool] | None = None,
) -> tuple[str, ...]:
    """The names of the modes with every given fact, in table order."""
    return tuple(
        m.name
        for m in _TABLE
        if (kind is None or m.kind is kind)
        and (vip is None or m.vip == vip)
        and (tunnels is None or m.tunnels == tunnels)
        and (routed is None or m.routed == routed)
        and (plane is None or plane in m.planes)
        and (proxy is None or proxy in m.proxies)
        and (forwarder is None or m.forwarder == forwarder)
        and (test is None or test(m))
    )
