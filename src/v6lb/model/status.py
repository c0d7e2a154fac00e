"""The status of a running instance, typed: what the control socket answers to `status`.

:meth:`InstanceStatus.from_dict` reads the JSON answer of any plane (kernel, python,
a proxy engine alone, or an L3 plane with a ``proxy`` section); every section but
the first few keys is optional. :meth:`InstanceStatus.to_dict` writes the same JSON
back: each object remembers which keys it was read with, in which order, and keeps
the keys it does not model in ``extra``, so ``from_dict(d).to_dict() == d``, key
order included. Built in code (no ``keys``), an object writes its modelled fields in
declaration order, then ``extra``.

:mod:`v6lb.render.status` turns these into the text of `v6lb status`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

__all__ = [
    "BackendStatus",
    "BgpSession",
    "BgpStatus",
    "ConntrackLimits",
    "ConntrackSyncStatus",
    "Counter",
    "InstanceStatus",
    "KernelObjects",
    "NptStatus",
    "ProxyBackendStatus",
    "ProxySection",
    "ProxyVipStatus",
    "VipStatus",
]

T = TypeVar("T")
JsonDict = dict[str, Any]


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("not an integer")
    return v


def _opt_int(v: Any) -> int | None:
    return None if v is None else _int(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("not a string")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("not a boolean")
    return v


def _emit(fields: Mapping[str, Any], keys: tuple[str, ...], extra: Mapping[str, Any]) -> JsonDict:
    """The JSON object: ``keys`` in order (all ``fields`` then ``extra`` when empty)."""
    order = keys or (*fields, *(k for k in extra if k not in fields))
    return {k: extra[k] if k in extra else fields[k] for k in order if k in extra or k in fields}


def _split(
    d: Mapping[str, Any], parsers: Mapping[str, Callable[[Any], Any]]
) -> tuple[JsonDict, JsonDict]:
    """(typed values by key, the keys kept as they are): a value its parser refuses
    (a ``ValueError``/``TypeError``/``KeyError``/``AttributeError``) stays raw in ``extra``."""
    typed: JsonDict = {}
    extra: JsonDict = {}
    for k, v in d.items():
        parse = parsers.get(k)
        if parse is None:
            extra[k] = v
            continue
        try:
            typed[k] = parse(v)
        except (ValueError, TypeError, KeyError, AttributeError):
            extra[k] = v
    return typed, extra


def _list(parse: Callable[[Any], T]) -> Callable[[Any], list[T]]:
    def parse_list(v: Any) -> list[T]:
        if not isinstance(v, list):
            raise TypeError("not a list")
        return [parse(x) for x in v]

    return parse_list


def _obj(v: Any) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise TypeError("not an object")
    return v


def _same(v: Any) -> Any:
    return v


@dataclass(slots=True)
class Counter:
    """A packet counter: ``{"name", "packets", "bytes"}`` (an nft counter has no name)."""

    name: str | None = None
    packets: int = 0
    bytes: int = 0
    keys: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Any) -> Counter:
        d = _obj(d)
        name = d.get("name")
        name = None if name is None else _str(name)
        return cls(name, _int(d.get("packets", 0)), _int(d.get("bytes", 0)), tuple(d))

    def to_dict(self) -> JsonDict:
        fields = {"name": self.name, "packets": self.packets, "bytes": self.bytes}
        if not self.keys and self.name is None:
            del fields["name"]
        return _emit(fields, self.keys, {})


@dataclass(slots=True)
class BackendStatus:
    """A backend of an L3 VIP: its health as the daemon sees it and its Maglev slots."""

    address: str
    port: int | None = None
    weight: int = 1
    drain: bool = False
    health: str = "unknown"
    probe: str = "none"
    successes: int | None = None
    failures: int | None = None
    slots: int | None = None
    extra: JsonDict = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    _PARSE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "address": _str,
        "port": _opt_int,
        "weight": _int,
        "drain": _bool,
        "health": _str,
        "probe": _str,
        "successes": _opt_int,
        "failures": _opt_int,
        "slots": _opt_int,
    }

    @classmethod
    def from_dict(cls, d: Any) -> BackendStatus:
        typed, extra = _split(_obj(d), cls._PARSE)
        return cls(**{"address": "", **typed}, extra=extra, keys=tuple(d))

    def to_dict(self) -> JsonDict:
        return _emit({k: getattr(self, k) for k in self._PARSE}, self.keys, self.extra)


@dataclass(slots=True)
class VipStatus:
    """An L3 VIP (nat, npt, dsr-*): its packet counter and its backends."""

    name: str
    address: str
    ports: list[int] = field(default_factory=list)
    protocol: str = "tcp"
    mode: str = ""
    table_size: int | None = None
    seed: int | None = None
    maps: list[str] = field(default_factory=list)
    counter: Counter = field(default_factory=Counter)
    backends: list[BackendStatus] = field(default_factory=list)
    extra: JsonDict = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    _PARSE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "name": _str,
        "address": _str,
        "ports": _list(_int),
        "protocol": _str,
        "mode": _str,
        "table_size": _opt_int,
        "seed": _opt_int,
        "maps": _list(_str),
        "counter": Counter.from_dict,
        "backends": _list(BackendStatus.from_dict),
    }

    @classmethod
    def from_dict(cls, d: Any) -> VipStatus:
        typed, extra = _split(_obj(d), cls._PARSE)
        return cls(**{"name": "", "address": "", **typed}, extra=extra, keys=tuple(d))

    def to_dict(self) -> JsonDict:
        fields = {k: getattr(self, k) for k in self._PARSE}
        fields["counter"] = self.counter.to_dict()
        fields["backends"] = [b.to_dict() for b in self.backends]
        return _emit(fields, self.keys, self.extra)


@dataclass(frozen=True, slots=True)
class NptStatus:
    inside: str
    outside: str

    @classmethod
    def from_dict(cls, d: Any) -> NptStatus:
        return cls(_str(d["inside"]), _str(d["outside"]))

    def to_dict(self) -> JsonDict:
        return {"inside": self.inside, "outside": self.outside}


@dataclass(slots=True)
class ConntrackLimits:
    """The ``conntrack`` block: live nat flows (None: unknown), the bound, drops at it."""

    conntrack_max: int | None = None
    conntrack: int | None = None
    conntrack_full: int | None = None
    extra: JsonDict = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    _PARSE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "conntrack_max": _opt_int,
        "conntrack": _opt_int,
        "conntrack_full": _opt_int,
    }

    @classmethod
    def from_dict(cls, d: Any) -> ConntrackLimits:
        typed, extra = _split(_obj(d), cls._PARSE)
        return cls(**typed, extra=extra, keys=tuple(d))

    def to_dict(self) -> JsonDict:
        return _emit({k: getattr(self, k) for k in self._PARSE}, self.keys, self.extra)


def _str_list(v: Any) -> list[str]:
    return _list(_str)(v)


@dataclass(slots=True)
class KernelObjects:
    """What the instance has in the kernel, read back from it (``kernel``)."""

    nft_tables: list[str] = field(default_factory=list)
    nft_chains: list[str] = field(default_factory=list)
    nft_maps: list[str] = field(default_factory=list)
    ip6tables_rules: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    nft_counters: dict[str, Counter] = field(default_factory=dict)
    error: str | None = None  # reading the kernel failed (the python plane)
    extra: JsonDict = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    LISTS: ClassVar[tuple[str, ...]] = (
        "nft_tables",
        "nft_chains",
        "nft_maps",
        "ip6tables_rules",
        "routes",
        "rules",
    )

    @classmethod
    def from_dict(cls, d: Any) -> KernelObjects:
        parsers: dict[str, Callable[[Any], Any]] = dict.fromkeys(cls.LISTS, _str_list)
        parsers["nft_counters"] = lambda v: {
            str(k): Counter.from_dict(c) for k, c in _obj(v).items()
        }
        parsers["error"] = str
        typed, extra = _split(_obj(d), parsers)
        return cls(**typed, extra=extra, keys=tuple(d))

    def to_dict(self) -> JsonDict:
        fields: JsonDict = {k: getattr(self, k) for k in self.LISTS}
        fields["nft_counters"] = {k: c.to_dict() for k, c in self.nft_counters.items()}
        if self.keys or self.error is not None:
            fields["error"] = self.error
        return _emit(fields, self.keys, self.extra)


@dataclass(slots=True)
class BgpSession:
    """A BGP or BFD session as BIRD reports it."""

    proto: Any = None
    state: Any = None
    info: Any = None
    extra: JsonDict = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    _PARSE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "proto": _same,
        "state": _same,
        "info": _same,
    }

    @classmethod
    def from_dict(cls, d: Any) -> BgpSession:
        typed, extra = _split(_obj(d), cls._PARSE)
        return cls(**typed, extra=extra, keys=tuple(d))

    def to_dict(self) -> JsonDict:
        return _emit({k: getattr(self, k) for k in self._PARSE}, self.keys, self.extra)


@dataclass(slots=True)
class BgpStatus:
    """The ``bgp`` section: BIRD's process and what is announced and withdrawn."""

    asn: int | None = None
    bird_pid: int | None = None
    bird_alive: bool = False
    sessions: dict[str, BgpSession] = field(default_factory=dict)
    announced: list[str] = field(default_factory=list)
    withdrawn: list[str] = field(default_factory=list)
    extra: JsonDict = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    _PARSE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "asn": _opt_int,
        "bird_pid": _opt_int,
        "bird_alive": _same,
        "sessions": lambda v: {str(k): BgpSession.from_dict(s) for k, s in _obj(v).items()},
        "announced": _str_list,
        "withdrawn": _str_list,
    }

    @classmethod
    def from_dict(cls, d: Any) -> BgpStatus:
        typed, extra = _split(_obj(d), cls._PARSE)
        return cls(**typed, extra=extra, keys=tuple(d))

    def to_dict(self) -> JsonDict:
        fields = {k: getattr(self, k) for k in self._PARSE}
        fields["sessions"] = {k: s.to_dict() for k, s in self.sessions.items()}
        return _emit(fields, self.keys, self.extra)


@dataclass(slots=True)
class ConntrackSyncStatus:
    """The ``conntrack_sync`` section: conntrackd and its statistics (``stats``, as parsed)."""

    running: bool = False
    pid: int | None = None
    interface: str | None = None
    address: str | None = None
    peer: str | None = None
    port: int | None = None
    last_error: str | None = None
    stats: JsonDict = field(default_factory=dict)
    extra: JsonDict = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    _PARSE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "running": _same,
        "pid": _opt_int,
        "interface": _same,
        "address": _same,
        "peer": _same,
        "port": _opt_int,
        "last_error": _same,
        "stats": lambda v: dict(_obj(v)),
    }

    @classmethod
    def from_dict(cls, d: Any) -> ConntrackSyncStatus:
        typed, extra = _split(_obj(d), cls._PARSE)
        return cls(**typed, extra=extra, keys=tuple(d))

    def to_dict(self) -> JsonDict:
        return _emit({k: getattr(self, k) for k in self._PARSE}, self.keys, self.extra)


def _errors(v: Any) -> dict[str, int]:
    return {str(k): _int(n) for k, n in _obj(v).items()}


@dataclass(slots=True)
class ProxyBackendStatus:
    """A proxy VIP's backend; the counters are absent before the engine runs."""

    address: str
    port: int | None = None
    weight: int = 1
    drain: bool = False
    health: str | None = None
    probe: str | None = None
    active: int | None = None
    connections: int | None = None
    requests: int | None = None
    errors: dict[str, int] = field(default_factory=dict)
    extra: JsonDict = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    _PARSE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "address": _str,
        "port": _opt_int,
        "weight": _int,
        "drain": _bool,
        "health": _same,
        "probe": _same,
        "active": _opt_int,
        "connections": _opt_int,
        "requests": _opt_int,
        "errors": _errors,
    }

    @classmethod
    def from_dict(cls, d: Any) -> ProxyBackendStatus:
        typed, extra = _split(_obj(d), cls._PARSE)
        return cls(**{"address": "", **typed}, extra=extra, keys=tuple(d))

    @property
    def counted(self) -> bool:
        """The engine reported counters for it (``connections`` is there)."""
        return self.connections is not None

    def to_dict(self) -> JsonDict:
        return _emit({k: getattr(self, k) for k in self._PARSE}, self.keys, self.extra)


@dataclass(slots=True)
class ProxyVipStatus:
    """A proxy-l4/proxy-l7 VIP and its counters (absent before the engine runs)."""

    name: str
    address: str
    ports: list[int] = field(default_factory=list)
    protocol: str | None = None
    mode: str = ""
    scheduler: str | None = None
    connections: int | None = None
    active: int | None = None
    requests: int | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    errors: dict[str, int] = field(default_factory=dict)
    interim: dict[str, int] = field(default_factory=dict)  # proxy-l7 1xx responses by status
    backends: list[ProxyBackendStatus] = field(default_factory=list)
    extra: JsonDict = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    _PARSE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "name": _str,
        "address": _str,
        "ports": _list(_int),
        "protocol": _same,
        "mode": _str,
        "scheduler": _same,
        "connections": _opt_int,
        "active": _opt_int,
        "requests": _opt_int,
        "bytes_in": _opt_int,
        "bytes_out": _opt_int,
        "errors": _errors,
        "interim": _errors,
        "backends": _list(ProxyBackendStatus.from_dict),
    }

    @classmethod
    def from_dict(cls, d: Any) -> ProxyVipStatus:
        typed, extra = _split(_obj(d), cls._PARSE)
        return cls(**{"name": "", "address": "", **typed}, extra=extra, keys=tuple(d))

    @property
    def counted(self) -> bool:
        return self.connections is not None

    def to_dict(self) -> JsonDict:
        fields = {k: getattr(self, k) for k in self._PARSE}
        fields["backends"] = [b.to_dict() for b in self.backends]
        return _emit(fields, self.keys, self.extra)


@dataclass(slots=True)
class ProxySection:
    """The ``proxy`` section: the proxy engine, its state, its VIPs."""

    engine: str | None = None
    state: str | None = None
    error: str | None = None
    vips: list[ProxyVipStatus] = field(default_factory=list)
    extra: JsonDict = field(default_factory=dict)  # fds, haproxy_pid, stats_socket
    keys: tuple[str, ...] = ()

    _PARSE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "engine": _same,
        "state": _same,
        "error": _same,
        "vips": _list(ProxyVipStatus.from_dict),
    }

    @classmethod
    def from_dict(cls, d: Any) -> ProxySection:
        typed, extra = _split(_obj(d), cls._PARSE)
        return cls(**typed, extra=extra, keys=tuple(d))

    def to_dict(self) -> JsonDict:
        fields = {k: getattr(self, k) for k in self._PARSE}
        fields["vips"] = [v.to_dict() for v in self.vips]
        if not self.keys and self.error is None:
            del fields["error"]
        return _emit(fields, self.keys, self.extra)


def _section(parse: Callable[[Any], T]) -> Callable[[Any], T]:
    """An optional section: an empty or null value stays raw (and reads as absent)."""

    def parse_section(v: Any) -> T:
        if not v:
            raise ValueError("empty section")
        return parse(v)

    return parse_section


@dataclass(slots=True)
class InstanceStatus:
    """One instance's answer to `status`: the instance, then its optional sections.

    ``dataplane`` is None when only proxy VIPs run (the proxy engine answers alone).
    """

    instance: str | None = None
    pid: int | None = None
    file: str | None = None
    netns: str | None = None
    dataplane: str | None = None
    proxy_engine: str | None = None
    control_socket: str | None = None
    uptime_s: float | None = None
    reloads: int | None = None
    map_updates: int | None = None
    last_error: str | None = None
    skipped: list[str] = field(default_factory=list)
    vips: list[VipStatus] = field(default_factory=list)
    npt: list[NptStatus] = field(default_factory=list)
    kernel: KernelObjects | None = None
    forward: dict[str, int] | None = None  # the forward filter's counters (docs/nat.md)
    conntrack: ConntrackLimits | None = None
    bgp: BgpStatus | None = None
    conntrack_sync: ConntrackSyncStatus | None = None
    events: list[Any] = field(default_factory=list)
    proxy: ProxySection | None = None
    extra: JsonDict = field(default_factory=dict)  # a plane's own keys: engine, devices, ...
    keys: tuple[str, ...] = ()

    _PARSE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "instance": _same,
        "pid": _opt_int,
        "file": _same,
        "netns": _same,
        "dataplane": _same,
        "proxy_engine": _same,
        "control_socket": _same,
        "uptime_s": _same,
        "reloads": _opt_int,
        "map_updates": _opt_int,
        "last_error": _same,
        "skipped": _str_list,
        "vips": _list(VipStatus.from_dict),
        "npt": _list(NptStatus.from_dict),
        "kernel": _section(KernelObjects.from_dict),
        "forward": _section(_errors),
        "conntrack": _section(ConntrackLimits.from_dict),
        "bgp": _section(BgpStatus.from_dict),
        "conntrack_sync": _section(ConntrackSyncStatus.from_dict),
        "events": _list(_same),
        "proxy": _section(ProxySection.from_dict),
    }
    _SECTIONS: ClassVar[tuple[str, ...]] = ("kernel", "conntrack", "bgp", "conntrack_sync", "proxy")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InstanceStatus:
        typed, extra = _split(d, cls._PARSE)
        return cls(**typed, extra=extra, keys=tuple(d))

    def to_dict(self) -> JsonDict:
        fields = {k: getattr(self, k) for k in self._PARSE}
        for k in self._SECTIONS:
            section = fields[k]
            fields[k] = section.to_dict() if section is not None else None
        fields["vips"] = [v.to_dict() for v in self.vips]
        fields["npt"] = [p.to_dict() for p in self.npt]
        return _emit(fields, self.keys, self.extra)
