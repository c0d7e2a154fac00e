"""The status of a running instance, typed: what the control socket answers to `status`.

The daemon (:mod:`v6lb.engines.daemon`) builds an :class:`InstanceStatus` and sends
its :meth:`~InstanceStatus.to_dict`; the CLI reads the answer back with
:meth:`InstanceStatus.from_dict` (the answer of any plane: kernel, python, a proxy
engine alone, or an L3 plane with a ``proxy`` section; every section but the first
few keys is optional) and :mod:`v6lb.render.status` turns it into text.

Every object is a :class:`_Record`: it declares its fields and one parser per JSON
key. It remembers which keys it was read with, in which order, and keeps the keys it
does not model (or whose value its parser refuses) in ``extra``, so
``from_dict(d).to_dict() == d``, key order included. Given ``keys``, an object
writes exactly those keys in that order; built in code without them (``keys`` is
None), it writes its modelled fields in declaration order, then ``extra``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypeVar

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
    "ProxyLatency",
    "ProxySection",
    "ProxyVipStatus",
    "VipStatus",
]

T = TypeVar("T")
JsonDict = dict[str, Any]
Parse = Callable[[Any], Any]


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


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _obj(v: Any) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise TypeError("not an object")
    return v


def _same(v: Any) -> Any:
    return v


def _list(parse: Callable[[Any], T]) -> Callable[[Any], list[T]]:
    def parse_list(v: Any) -> list[T]:
        if not isinstance(v, list):
            raise TypeError("not a list")
        return [parse(x) for x in v]

    return parse_list


def _by_name(parse: Callable[[Any], T]) -> Callable[[Any], dict[str, T]]:
    """An object whose values ``parse`` reads (keys kept, as strings)."""

    def parse_object(v: Any) -> dict[str, T]:
        return {str(k): parse(x) for k, x in _obj(v).items()}

    return parse_object


def _section(parse: Callable[[Any], T]) -> Callable[[Any], T]:
    """An optional section: an empty or null value stays raw (and reads as absent)."""

    def parse_section(v: Any) -> T:
        if not v:
            raise ValueError("empty section")
        return parse(v)

    return parse_section


_str_list = _list(_str)
_counts = _by_name(_int)  # name -> a count: errors by reason, forward filter counters


def _split(d: Mapping[str, Any], parsers: Mapping[str, Parse]) -> tuple[JsonDict, JsonDict]:
    """(typed values by key, the keys kept as they are): a value its parser refuses
    (a ``ValueError``/``TypeError``/``KeyError``/``AttributeError``) stays raw."""
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


def _emit(
    fields: Mapping[str, Any], keys: tuple[str, ...] | None, extra: Mapping[str, Any]
) -> JsonDict:
    """The JSON object: ``keys`` in order (all ``fields`` then ``extra`` when None)."""
    order = (*fields, *(k for k in extra if k not in fields)) if keys is None else keys
    return {k: extra[k] if k in extra else fields[k] for k in order if k in extra or k in fields}


def _dump(v: Any) -> Any:
    if isinstance(v, _Record):
        return v.to_dict()
    if isinstance(v, list):
        return [_dump(x) for x in v]
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    return v


@dataclass(slots=True)
class _Record:
    """One JSON object of the answer. A subclass declares its fields and ``_PARSE``.

    ``_PARSE``: the parser of each modelled key (the key is the field's name), in
    declaration order; a parser raises ``ValueError``/``TypeError``/``KeyError``/
    ``AttributeError`` for a value it refuses. ``_OMIT_NONE``: fields an object built
    in code leaves out of its JSON while they are None. A field with no default is
    required: an object without it does not parse (its parent keeps it raw).
    """

    extra: JsonDict = field(default_factory=dict, kw_only=True)
    keys: tuple[str, ...] | None = field(default=None, kw_only=True)

    _PARSE: ClassVar[Mapping[str, Parse]] = {}
    _OMIT_NONE: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def parse_fields(cls, d: Any) -> tuple[JsonDict, JsonDict]:
        """The JSON object ``d`` as :meth:`from_dict` reads it: (typed fields, ``extra``)."""
        return _split(_obj(d), cls._PARSE)

    @classmethod
    def from_dict(cls, d: Any) -> Self:
        typed, extra = cls.parse_fields(d)
        return cls(**typed, extra=extra, keys=tuple(d))

    def to_dict(self) -> JsonDict:
        fields = {k: _dump(getattr(self, k)) for k in self._PARSE}
        if self.keys is None:
            for k in self._OMIT_NONE:
                if fields[k] is None:
                    del fields[k]
        return _emit(fields, self.keys, self.extra)


@dataclass(slots=True)
class Counter(_Record):
    """A packet counter: ``{"name", "packets", "bytes"}`` (an nft counter has no name)."""

    name: str | None = None
    packets: int = 0
    bytes: int = 0

    _PARSE: ClassVar[Mapping[str, Parse]] = {"name": _opt_str, "packets": _int, "bytes": _int}
    _OMIT_NONE: ClassVar[tuple[str, ...]] = ("name",)


@dataclass(slots=True)
class BackendStatus(_Record):
    """A backend of an L3 VIP: its health as the daemon sees it and its Maglev slots."""

    address: str = ""
    port: int | None = None
    weight: int = 1
    drain: bool = False
    health: str = "unknown"
    probe: str = "none"
    successes: int | None = None
    failures: int | None = None
    slots: int | None = None
    enabled: bool = True
    override: str | None = None
    """`v6lb ctl`'s override and what the file says (``weight``/``drain``/``enabled`` are
    the values in force); absent when the file's values stand."""
    transitions: int | None = None  # health changes since start; None: an older answer
    new_flows: int | None = None  # flows the plane sent to it (None: not counted)
    active_flows: int | None = None  # its live flows (nat: conntrack entries; None: unknown)
    packets: int | None = None  # packets the plane sent to it (None: not counted)
    bytes: int | None = None  # and their bytes

    _PARSE: ClassVar[Mapping[str, Parse]] = {
        "address": _str,
        "port": _opt_int,
        "weight": _int,
        "drain": _bool,
        "health": _str,
        "probe": _str,
        "successes": _opt_int,
        "failures": _opt_int,
        "slots": _opt_int,
        "enabled": _bool,
        "override": _opt_str,
        "transitions": _opt_int,
        "new_flows": _opt_int,
        "active_flows": _opt_int,
        "packets": _opt_int,
        "bytes": _opt_int,
    }
    _OMIT_NONE: ClassVar[tuple[str, ...]] = (
        "override",
        "transitions",
        "new_flows",
        "active_flows",
        "packets",
        "bytes",
    )


@dataclass(slots=True)
class IcmpErrors(_Record):
    """ICMPv6 errors for a VIP or an npt pair (RFC 4443 errors: PTB, unreachable, ...).

    ``forwarded``: passed on to the backend of the quoted flow (DSR); ``translated``:
    translated with the quote (nat: a tracked flow, both ways; npt: inbound to a mapped
    address); ``unmatched``: sent to the address but quoting no flow of it (truncated,
    another source, a port not served, no tracked flow): dropped. An address's
    unmatched errors count on its first VIP.
    """

    forwarded: int = 0
    translated: int = 0
    unmatched: int = 0

    _PARSE: ClassVar[Mapping[str, Parse]] = {
        "forwarded": _int,
        "translated": _int,
        "unmatched": _int,
    }


@dataclass(slots=True)
class VipStatus(_Record):
    """An L3 VIP (nat, npt, dsr-*): its packet counter and its backends."""

    name: str = ""
    address: str = ""
    ports: list[int] = field(default_factory=list)
    protocol: str = "tcp"
    mode: str = ""
    table_size: int | None = None
    seed: int | None = None
    maps: list[str] = field(default_factory=list)
    counter: Counter = field(default_factory=Counter)
    icmp_errors: IcmpErrors | None = None  # None: an answer from before they were counted
    backends: list[BackendStatus] = field(default_factory=list)
    traffic: dict[str, Counter] | None = None
    """Packets and bytes by direction: ``in`` (clients to the VIP), ``out`` (replies to the
    clients); only the directions the plane sees (None: none counted)."""
    new_flows: int | None = None  # None: not counted
    active_flows: int | None = None  # live flows (nat: conntrack entries); None: unknown

    _PARSE: ClassVar[Mapping[str, Parse]] = {
        "name": _str,
        "address": _str,
        "ports": _list(_int),
        "protocol": _str,
        "mode": _str,
        "table_size": _opt_int,
        "seed": _opt_int,
        "maps": _str_list,
        "counter": Counter.from_dict,
        "icmp_errors": IcmpErrors.from_dict,
        "backends": _list(BackendStatus.from_dict),
        "traffic": _by_name(Counter.from_dict),
        "new_flows": _opt_int,
        "active_flows": _opt_int,
    }
    _OMIT_NONE: ClassVar[tuple[str, ...]] = (
        "icmp_errors",
        "traffic",
        "new_flows",
        "active_flows",
    )


@dataclass(slots=True)
class NptStatus(_Record):
    """An NPTv6 pair (both prefixes are required) and its ICMPv6 errors."""

    inside: str
    outside: str
    icmp_errors: IcmpErrors | None = None  # None: an answer from before they were counted

    _PARSE: ClassVar[Mapping[str, Parse]] = {
        "inside": _str,
        "outside": _str,
        "icmp_errors": IcmpErrors.from_dict,
    }
    _OMIT_NONE: ClassVar[tuple[str, ...]] = ("icmp_errors",)


@dataclass(slots=True)
class ConntrackLimits(_Record):
    """The ``conntrack`` block: live nat flows (None: unknown), the bound, drops at it.

    ``nat_unsynced`` (``lb.conntrack_sync`` only): first mid-stream packets of nat flows
    not in conntrack yet, dropped to wait for the peer's entry.
    """

    conntrack_max: int | None = None
    conntrack: int | None = None
    conntrack_full: int | None = None
    nat_unsynced: int | None = None

    _PARSE: ClassVar[Mapping[str, Parse]] = {
        "conntrack_max": _opt_int,
        "conntrack": _opt_int,
        "conntrack_full": _opt_int,
        "nat_unsynced": _opt_int,
    }


@dataclass(slots=True)
class KernelObjects(_Record):
    """What the instance has in the kernel, read back from it (``kernel``)."""

    nft_tables: list[str] = field(default_factory=list)
    nft_chains: list[str] = field(default_factory=list)
    nft_maps: list[str] = field(default_factory=list)
    ip6tables_rules: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    nft_counters: dict[str, Counter] = field(default_factory=dict)
    error: str | None = None  # reading the kernel failed (the python plane)

    LISTS: ClassVar[tuple[str, ...]] = (
        "nft_tables",
        "nft_chains",
        "nft_maps",
        "ip6tables_rules",
        "routes",
        "rules",
    )
    _PARSE: ClassVar[Mapping[str, Parse]] = {
        **dict.fromkeys(LISTS, _str_list),
        "nft_counters": _by_name(Counter.from_dict),
        "error": _str,
    }
    _OMIT_NONE: ClassVar[tuple[str, ...]] = ("error",)


@dataclass(slots=True)
class BgpSession(_Record):
    """A BGP or BFD session as BIRD reports it."""

    proto: Any = None
    state: Any = None
    info: Any = None

    _PARSE: ClassVar[Mapping[str, Parse]] = {"proto": _same, "state": _same, "info": _same}


@dataclass(slots=True)
class BgpStatus(_Record):
    """The ``bgp`` section: BIRD's process and what is announced and withdrawn."""

    asn: int | None = None
    bird_pid: int | None = None
    bird_alive: bool = False
    sessions: dict[str, BgpSession] = field(default_factory=dict)
    announced: list[str] = field(default_factory=list)
    withdrawn: list[str] = field(default_factory=list)

    _PARSE: ClassVar[Mapping[str, Parse]] = {
        "asn": _opt_int,
        "bird_pid": _opt_int,
        "bird_alive": _same,
        "sessions": _by_name(BgpSession.from_dict),
        "announced": _str_list,
        "withdrawn": _str_list,
    }


@dataclass(slots=True)
class ConntrackSyncStatus(_Record):
    """The ``conntrack_sync`` section: conntrackd and its statistics (``stats``, as parsed)."""

    running: bool = False
    pid: int | None = None
    interface: str | None = None
    address: str | None = None
    peer: str | None = None
    port: int | None = None
    last_error: str | None = None
    stats: JsonDict = field(default_factory=dict)

    _PARSE: ClassVar[Mapping[str, Parse]] = {
        "running": _same,
        "pid": _opt_int,
        "interface": _same,
        "address": _same,
        "peer": _same,
        "port": _opt_int,
        "last_error": _same,
        "stats": lambda v: dict(_obj(v)),
    }


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError("not a number")
    return float(v)


def _buckets(v: Any) -> list[list[Any]]:
    """A histogram's cumulative buckets, ``[[le, count], ..., ["+Inf", count]]``."""
    out: list[list[Any]] = []
    for item in _list(_same)(v):
        le, n = item
        if le != "+Inf" and (isinstance(le, bool) or not isinstance(le, int | float)):
            raise TypeError("a bucket bound is a number or '+Inf'")
        out.append([le, _int(n)])
    if not out or out[-1][0] != "+Inf":
        raise ValueError("the last bucket is '+Inf'")
    return out


@dataclass(slots=True)
class ProxyLatency(_Record):
    """A proxy-l7 VIP's request durations (seconds), as a Prometheus histogram."""

    buckets: list[list[Any]]  # cumulative: [[le, count], ..., ["+Inf", count]]; required
    sum: float = 0.0
    count: int = 0

    _PARSE: ClassVar[Mapping[str, Parse]] = {
        "buckets": _buckets,
        "sum": _num,
        "count": _int,
    }


@dataclass(slots=True)
class ProxyBackendStatus(_Record):
    """A proxy VIP's backend; the counters are absent before the engine runs."""

    address: str = ""
    port: int | None = None
    weight: int = 1
    drain: bool = False
    enabled: bool = True
    health: str | None = None
    probe: str | None = None
    active: int | None = None
    connections: int | None = None
    requests: int | None = None
    errors: dict[str, int] = field(default_factory=dict)
    responses: dict[str, int] = field(default_factory=dict)  # proxy-l7: by status class

    _PARSE: ClassVar[Mapping[str, Parse]] = {
        "address": _str,
        "port": _opt_int,
        "weight": _int,
        "drain": _bool,
        "enabled": _bool,
        "health": _same,
        "probe": _same,
        "active": _opt_int,
        "connections": _opt_int,
        "requests": _opt_int,
        "errors": _counts,
        "responses": _counts,
    }

    @property
    def counted(self) -> bool:
        """The engine reported counters for it (``connections`` is there)."""
        return self.connections is not None


@dataclass(slots=True)
class ProxyVipStatus(_Record):
    """A proxy-l4/proxy-l7 VIP and its counters (absent before the engine runs)."""

    name: str = ""
    address: str = ""
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
    # proxy-l7: responses sent to clients by status class ("2xx"...), the proxy's own too
    responses: dict[str, int] = field(default_factory=dict)
    latency: ProxyLatency | None = None  # proxy-l7, the builtin engine: request durations
    backends: list[ProxyBackendStatus] = field(default_factory=list)

    _PARSE: ClassVar[Mapping[str, Parse]] = {
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
        "errors": _counts,
        "interim": _counts,
        "responses": _counts,
        "latency": lambda v: None if v is None else ProxyLatency.from_dict(v),
        "backends": _list(ProxyBackendStatus.from_dict),
    }
    _OMIT_NONE: ClassVar[tuple[str, ...]] = ("latency",)

    @property
    def counted(self) -> bool:
        return self.connections is not None


@dataclass(slots=True)
class ProxySection(_Record):
    """The ``proxy`` section: the proxy engine, its state, its VIPs."""

    engine: str | None = None
    state: str | None = None
    error: str | None = None
    vips: list[ProxyVipStatus] = field(default_factory=list)
    # extra: fds, kernel_relay (proxy-l4 relay: kernel), haproxy_pid, stats_socket

    _PARSE: ClassVar[Mapping[str, Parse]] = {
        "engine": _same,
        "state": _same,
        "error": _same,
        "vips": _list(ProxyVipStatus.from_dict),
    }
    _OMIT_NONE: ClassVar[tuple[str, ...]] = ("error",)


@dataclass(slots=True)
class InstanceStatus(_Record):
    """One instance's answer to `status`: the instance, then its optional sections.

    ``dataplane`` is None when only proxy VIPs run (the proxy engine answers alone).
    ``extra`` holds a plane's own keys (the python plane's ``engine``, ``devices``).
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

    _PARSE: ClassVar[Mapping[str, Parse]] = {
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
        "forward": _section(_counts),
        "conntrack": _section(ConntrackLimits.from_dict),
        "bgp": _section(BgpStatus.from_dict),
        "conntrack_sync": _section(ConntrackSyncStatus.from_dict),
        "events": _list(_same),
        "proxy": _section(ProxySection.from_dict),
    }
