"""The plane registry: a plane's name -> where its :class:`~v6lb.engines.plane.Plane` lives.

One line per plane; the module is imported only when the plane is used, so a
plane's imports (pyroute2, a BPF loader, asyncio, ...) cost nothing to the
others. ``--dataplane`` takes the names of role ``dataplane``, ``--proxy`` those
of role ``proxy``. The modes a plane serves are the mode table's
(:func:`served_modes`), never declared here.

The mode table may name a plane that is not registered: only this registry
decides what a user is offered.
Every user-facing choice, help text and refusal that names planes reads
:func:`names` or :func:`serving`, so a plane the table names becomes usable with
its package and its one :func:`register` line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, cast

from v6lb.model.modes import modes_where

if TYPE_CHECKING:  # the registry stays light: the CLI reads it to build its choices
    from v6lb.engines.plane import Plane

__all__ = [
    "PlaneEntry",
    "Role",
    "names",
    "plane_class",
    "register",
    "served_modes",
    "serving",
    "summary",
]


class Role(StrEnum):
    """What a plane is chosen by."""

    DATAPLANE = "dataplane"  # --dataplane: npt, nat, dsr-*
    PROXY = "proxy"  # --proxy: proxy-l4, proxy-l7


@dataclass(frozen=True, slots=True)
class PlaneEntry:
    role: Role
    module: str
    cls: str
    summary: str = ""  # a few words for help texts: what the plane is made of


_PLANES: dict[str, PlaneEntry] = {}


def register(name: str, role: Role, module: str, cls: str, summary: str = "") -> None:
    """Register (or replace) the plane ``name``: class ``cls`` of ``module``."""
    _PLANES[name] = PlaneEntry(role, module, cls, summary)


register(
    "kernel", Role.DATAPLANE, "v6lb.engines.kernel.run", "KernelPlane", "nftables/ip6tables/seg6"
)
register("python", Role.DATAPLANE, "v6lb.engines.python.run", "PythonPlane", "the v6lb core on TUN")
register("xdp", Role.DATAPLANE, "v6lb.engines.xdp.run", "XdpPlane", "a BPF program in XDP")
register("builtin", Role.PROXY, "v6lb.engines.proxy.run", "BuiltinProxyPlane", "asyncio")
register("haproxy", Role.PROXY, "v6lb.engines.proxy.run", "HaproxyPlane", "an haproxy process")


def names(role: Role) -> tuple[str, ...]:
    """The registered planes of ``role``, in registration order."""
    return tuple(n for n, e in _PLANES.items() if e.role is role)


def plane_class(name: str) -> type[Plane]:
    """The class of plane ``name`` (its module imported now); KeyError when unknown."""
    entry = _PLANES[name]
    cls = getattr(importlib.import_module(entry.module), entry.cls)
    if not (isinstance(cls, type) and getattr(cls, "name", None) == name):
        raise TypeError(f"{entry.module}.{entry.cls} is not the plane {name!r}")
    return cast("type[Plane]", cls)


def served_modes(name: str) -> tuple[str, ...]:
    """The mode names plane ``name`` serves, from the mode table."""
    if _PLANES[name].role is Role.PROXY:
        return modes_where(proxy=name)
    return modes_where(plane=name)


def serving(mode: str, role: Role = Role.DATAPLANE) -> tuple[str, ...]:
    """The registered planes of ``role`` that serve ``mode``, in registration order."""
    return tuple(n for n in names(role) if mode in served_modes(n))


def summary(name: str) -> str:
    """A few words on what plane ``name`` is made of (for help texts); KeyError when unknown."""
    return _PLANES[name].summary
