"""Runtime control (`v6lb ctl`): the operator's overrides of a running instance's backends.

``v6lb ctl drain|undrain|enable|disable|weight VIP BACKEND [N]`` sends one ``ctl``
request on the control socket; the daemon (:mod:`v6lb.engines.daemon`) checks it
here, records the override and applies it to the VIP's pool at once. An override
lives in the daemon only (a restart forgets it); every reload (SIGHUP) applies it
again on top of the file, and drops it when the file now says the same.

* ``drain`` / ``undrain``: no new flows / new flows again (the file's ``drain:``);
* ``disable`` / ``enable``: the backend takes no flows at all, new or existing, as a
  backend that is down (``enable`` gives it back to health checking);
* ``weight N``: N from 1 to 255 (0 is refused: ``drain`` is the switch for "no new
  flows").

Pure: no I/O. Every refusal is a :class:`CtlRefused` whose message names the
field and the fix; it is answered with ``{"error": ..., "exit": 2}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv6Address
from typing import Any, Final

from v6lb.core.backends import BackendPool
from v6lb.model.config import Backend, Config, Vip

__all__ = [
    "ACTIONS",
    "WEIGHT_MAX",
    "CtlRefused",
    "Override",
    "OverrideKey",
    "apply_override",
    "check_request",
    "find_backend",
    "weight_problem",
]

ACTIONS: Final = ("drain", "undrain", "enable", "disable", "weight")
WEIGHT_MAX: Final = 255

OverrideKey = tuple[str, str, int | None]  # VIP name, backend address, the file's port


class CtlRefused(ValueError):
    """A ``ctl`` request that names nothing that exists, or a wrong value (exit 2)."""


@dataclass(slots=True)
class Override:
    """What the operator set on one backend; None: the file's value stands."""

    drain: bool | None = None
    enabled: bool | None = None
    weight: int | None = None

    def empty(self) -> bool:
        return self.drain is None and self.enabled is None and self.weight is None

    def text(self, backend: Backend) -> str:
        """``drain (file: no drain), weight 7 (file: 1)``."""
        parts = []
        if self.drain is not None:
            file = "drain" if backend.drain else "no drain"
            parts.append(f"{'drain' if self.drain else 'undrain'} (file: {file})")
        if self.enabled is not None:
            parts.append(f"{'enabled' if self.enabled else 'disabled'} (file: enabled)")
        if self.weight is not None:
            parts.append(f"weight {self.weight} (file: {backend.weight})")
        return ", ".join(parts)

    def drop_file_values(self, backend: Backend) -> None:
        """Forget what the file itself says now (the override no longer overrides it)."""
        if self.drain is not None and self.drain == backend.drain:
            self.drain = None
        if self.enabled is True:
            self.enabled = None
        if self.weight is not None and self.weight == backend.weight:
            self.weight = None


def weight_problem(value: Any) -> str | None:
    """Why ``value`` is not a weight `v6lb ctl weight` accepts, or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"weight {value!r} is not an integer: give a weight from 1 to {WEIGHT_MAX}"
    if value == 0:
        return (
            "weight 0 is refused: to stop new flows to a backend use `v6lb ctl drain`,"
            " to take it out entirely `v6lb ctl disable`"
        )
    if value < 0:
        return f"weight {value} is negative: give a weight from 1 to {WEIGHT_MAX}"
    if value > WEIGHT_MAX:
        return f"weight {value} is above {WEIGHT_MAX}: give a weight from 1 to {WEIGHT_MAX}"
    return None


def _parse_backend(text: str) -> tuple[IPv6Address, int | None]:
    port: int | None = None
    addr = text
    if text.startswith("["):
        addr, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise CtlRefused(f"backend {text!r} is not ADDRESS or [ADDRESS]:PORT")
        if rest:
            if not rest[1:].isdigit() or not 1 <= int(rest[1:]) <= 65535:
                raise CtlRefused(f"backend {text!r}: the port is not 1-65535")
            port = int(rest[1:])
    try:
        return IPv6Address(addr), port
    except AddressValueError:
        raise CtlRefused(
            f"backend {text!r} is not an IPv6 address: give ADDRESS or [ADDRESS]:PORT"
        ) from None


def find_backend(vip: Vip, pool: BackendPool, text: str) -> int:
    """The index in ``vip.backends`` of backend ``text`` (``ADDRESS`` or ``[ADDRESS]:PORT``)."""
    address, port = _parse_backend(text)
    hits = [
        i
        for i, b in enumerate(vip.backends)
        if b.address == address and (port is None or port in (b.port, pool.ports[i]))
    ]
    if not hits:
        known = ", ".join(_name(b) for b in vip.backends)
        raise CtlRefused(f"VIP {vip.name} has no backend {text}; its backends: {known}")
    if len(hits) > 1:
        which = ", ".join(_name(vip.backends[i]) for i in hits)
        raise CtlRefused(f"backend {text} of VIP {vip.name} is ambiguous ({which}): add the port")
    return hits[0]


def _name(b: Backend) -> str:
    return f"[{b.address}]:{b.port}" if b.port is not None else str(b.address)


def check_request(
    request: Mapping[str, Any], config: Config, pools: Mapping[str, BackendPool]
) -> tuple[Vip, int, str, int | None]:
    """The VIP, the backend's index, the action and the weight of a ``ctl`` request."""
    action = request.get("action")
    if action not in ACTIONS:
        raise CtlRefused(f"action {action!r} is not one of {', '.join(ACTIONS)}")
    name = request.get("vip")
    vip = next((v for v in config.vips if v.name == name), None)
    if vip is None:
        known = ", ".join(v.name for v in config.vips)
        raise CtlRefused(f"no VIP named {name!r} in {config.source}; its VIPs: {known}")
    pool = pools.get(vip.name)
    if pool is None:
        raise CtlRefused(
            f"VIP {vip.name} ({vip.mode}) has no backends this instance changes at run time:"
            " set drain/weight in the file and reload (SIGHUP)"
        )
    backend = request.get("backend")
    if not isinstance(backend, str):
        raise CtlRefused("backend is missing: give ADDRESS or [ADDRESS]:PORT")
    index = find_backend(vip, pool, backend)
    weight = request.get("weight")
    if action == "weight":
        problem = weight_problem(weight)
        if problem is not None:
            raise CtlRefused(problem)
    elif weight is not None:
        raise CtlRefused(f"{action} takes no weight (only `v6lb ctl weight` does)")
    return vip, index, str(action), weight


def apply_override(pool: BackendPool, index: int, backend: Backend, o: Override) -> bool:
    """Put ``o`` (or the file's values where it has none) on the pool; True if it changed."""
    drain = backend.drain if o.drain is None else o.drain
    enabled = True if o.enabled is None else o.enabled
    weight = backend.weight if o.weight is None else o.weight
    changed = pool.set_drain(index, drain)
    changed = pool.set_enabled(index, enabled) or changed
    return pool.set_weight(index, weight) or changed
