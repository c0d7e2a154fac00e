"""Kubernetes manifests as typed objects: Services, EndpointSlices, Ingresses, Pods, Deployments.

:func:`load_manifests` reads what ``kubectl get ... -o yaml`` prints (one object, a
multi-document stream, or a ``kind: List`` of ``items``), from one or more texts, and
returns :class:`Manifests`. Only the fields v6lb uses are read; the rest (managedFields,
resourceVersion, uid...) is ignored. Kubernetes' own defaults apply where a field is
absent (the namespace ``default``, protocol TCP, a targetPort equal to the port, an
EndpointSlice endpoint's ``ready`` true, ``serving`` as ``ready``, ``terminating``
false: the discovery/v1 API reference).

Every error is a :class:`ManifestError` (exit 2) naming the object (``Service
default/web``), where it came from (file and line), the field path and the fix. An
unknown kind is skipped with a note; a document that is not a Kubernetes object (no
``apiVersion``/``kind``) is an error.
Pure: text in, objects out; the CLI reads the files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Final

from v6lb.errors import UsageError
from v6lb.k8s.yamldocs import load_documents

__all__ = [
    "ContainerPort",
    "Deployment",
    "Endpoint",
    "EndpointPort",
    "EndpointSlice",
    "Ingress",
    "IngressBackend",
    "IngressPath",
    "ManifestError",
    "Manifests",
    "Note",
    "ObjectRef",
    "Pod",
    "Service",
    "ServicePort",
    "load_manifests",
    "selector_matches",
]

SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
INGRESS_CLASS_ANNOTATION: Final = "kubernetes.io/ingress.class"
KINDS: Final = ("Service", "EndpointSlice", "Ingress", "Pod", "Deployment")
# Kinds kubectl prints next to these that say nothing v6lb needs: skipped silently.
_QUIET: Final = frozenset({"Endpoints", "ReplicaSet", "Namespace", "IngressClass", "Event"})
# A value takes at least 2 bytes (`a: b`); aliases share values, never copy them: a bound on
# memory that no real manifest reaches.
BYTES_PER_VALUE: Final = 2


class ManifestError(UsageError):
    """A manifest is wrong or unusable (exit 2): the object, the field, the problem, the fix."""


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """Which object: kind, namespace and name, and where it was read (file, line)."""

    kind: str
    namespace: str
    name: str
    source: str = ""
    line: int = 0

    @property
    def key(self) -> str:
        """``namespace/name``."""
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        where = f" ({self.source}, line {self.line})" if self.source else ""
        return f"{self.kind} {self.namespace}/{self.name}{where}"

    def error(self, path: str, problem: str, fix: str) -> ManifestError:
        return ManifestError(f"{self}: {path}: {problem}", fix)


@dataclass(frozen=True, slots=True)
class Note:
    """A warning or a note about one object and field: nothing stops, the fix is advice."""

    ref: ObjectRef | str  # the object, or a source name for what is not an object
    path: str
    text: str
    fix: str = ""

    def __str__(self) -> str:
        where = f"{self.ref}: {self.path}: " if self.path else f"{self.ref}: "
        return where + self.text + (f"; fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    protocol: str  # TCP, UDP or SCTP
    port: int
    target_port: int | str  # a number, or a container port's name
    node_port: int | None = None


@dataclass(frozen=True, slots=True)
class Service:
    ref: ObjectRef
    type: str  # LoadBalancer, NodePort, ClusterIP, ExternalName
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str]
    annotations: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)
    ip_families: tuple[str, ...] = ()  # IPv6, IPv4; empty: not given
    ip_family_policy: str | None = None
    external_traffic_policy: str | None = None
    load_balancer_class: str | None = None
    ingress_ips: tuple[str, ...] = ()  # status.loadBalancer.ingress[].ip
    ingress_hostnames: tuple[str, ...] = ()

    @property
    def serves_ipv6(self) -> bool:
        """Does the Service take IPv6 (ipFamilies has IPv6, or is not given)?"""
        return not self.ip_families or "IPv6" in self.ip_families


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    port: int | None
    protocol: str


@dataclass(frozen=True, slots=True)
class Endpoint:
    addresses: tuple[str, ...]
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None = None
    zone: str | None = None
    pod_name: str | None = None  # targetRef.name when targetRef.kind is Pod


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    ref: ObjectRef
    address_type: str  # IPv6, IPv4, FQDN
    service_name: str | None
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class IngressBackend:
    service: str
    port: int | str  # spec...backend.service.port.number, or .name

    def __str__(self) -> str:
        return f"{self.service}:{self.port}"


@dataclass(frozen=True, slots=True)
class IngressPath:
    host: str | None
    path: str
    path_type: str
    backend: IngressBackend
    where: str  # the field path, spec.rules[0].http.paths[1]


@dataclass(frozen=True, slots=True)
class Ingress:
    ref: ObjectRef
    ingress_class: str | None
    paths: tuple[IngressPath, ...]
    default_backend: IngressBackend | None
    annotations: Mapping[str, str]

    def backends(self) -> list[tuple[str, IngressBackend]]:
        """Every backend with the field path that names it, default backend first; unique."""
        out: list[tuple[str, IngressBackend]] = []
        seen: set[IngressBackend] = set()
        pairs = [("spec.defaultBackend", self.default_backend)] if self.default_backend else []
        pairs += [(p.where + ".backend", p.backend) for p in self.paths]
        for where, b in pairs:
            if b is not None and b not in seen:
                seen.add(b)
                out.append((where, b))
        return out


@dataclass(frozen=True, slots=True)
class ContainerPort:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class Pod:
    ref: ObjectRef
    labels: Mapping[str, str]
    node_name: str | None
    pod_ips: tuple[str, ...]
    ports: tuple[ContainerPort, ...]


@dataclass(frozen=True, slots=True)
class Deployment:
    ref: ObjectRef
    labels: Mapping[str, str]
    selector: Mapping[str, str]
    template_labels: Mapping[str, str]
    ports: tuple[ContainerPort, ...]


@dataclass(frozen=True, slots=True)
class Manifests:
    services: tuple[Service, ...] = ()
    slices: tuple[EndpointSlice, ...] = ()
    ingresses: tuple[Ingress, ...] = ()
    pods: tuple[Pod, ...] = ()
    deployments: tuple[Deployment, ...] = ()
    notes: tuple[Note, ...] = ()
    # every object as read, of every kind (ConfigMaps too): for the AWS annotations and the
    # pitfalls (v6lb.k8s.aws, v6lb.k8s.pitfalls), which read the objects themselves
    objects: tuple[Mapping[str, Any], ...] = ()
    _services: dict[tuple[str, str], Service] = field(init=False, repr=False, compare=False)
    _slices: dict[tuple[str, str], list[EndpointSlice]] = field(
        init=False, repr=False, compare=False
    )
    _raw: dict[tuple[str, str, str], Mapping[str, Any]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        by_service: dict[tuple[str, str], list[EndpointSlice]] = {}
        for s in self.slices:
            if s.service_name is not None:
                by_service.setdefault((s.ref.namespace, s.service_name), []).append(s)
        object.__setattr__(self, "_slices", by_service)
        object.__setattr__(
            self, "_services", {(s.ref.namespace, s.ref.name): s for s in self.services}
        )
        raw: dict[tuple[str, str, str], Mapping[str, Any]] = {}
        for obj in self.objects:
            meta = obj.get("metadata")
            if isinstance(meta, Mapping):
                key = (
                    str(obj.get("kind")),
                    str(meta.get("namespace", "default")),
                    str(meta.get("name")),
                )
                raw[key] = obj
        object.__setattr__(self, "_raw", raw)

    def raw(self, ref: ObjectRef) -> Mapping[str, Any]:
        """The object ``ref`` names, as read (an empty mapping if it was not read)."""
        return self._raw.get((ref.kind, ref.namespace, ref.name), {})

    def service(self, namespace: str, name: str) -> Service | None:
        """The Service ``namespace/name``, if given."""
        return self._services.get((namespace, name))

    def slices_of(self, service: Service) -> list[EndpointSlice]:
        """The EndpointSlices labelled with ``service``'s name, in its namespace."""
        return list(self._slices.get((service.ref.namespace, service.ref.name), ()))


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A Service's equality selector matches ``labels`` (an empty selector matches none)."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- reading -----------------------------------------------------------------------


class _Reader:
    """One object's fields, read with their path; every problem names the object."""

    __slots__ = ("data", "ref")

    def __init__(self, ref: ObjectRef, data: Mapping[str, object]) -> None:
        self.ref = ref
        self.data = data

    def _walk(self, path: str) -> object:
        cur: object = self.data
        for part in path.split("."):
            if not isinstance(cur, dict):
                return None
            cur = cur.get(part)
        return cur

    def mapping(self, path: str, value: object = ...) -> dict[str, object]:
        v = self._walk(path) if value is ... else value
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self.ref.error(path, f"is {_kind(v)}, not a mapping", "write `key: value` pairs")
        return v

    def strings(self, path: str) -> dict[str, str]:
        """Labels, annotations, a selector: string keys to strings (a number or a boolean
        is taken as its text)."""
        out: dict[str, str] = {}
        for k, x in self.mapping(path).items():
            if not isinstance(k, str) or not isinstance(x, str | int | float | bool):
                raise self.ref.error(
                    f"{path}.{k}", f"is {_kind(x)}, not a string", f'quote it: "{k}": "..."'
                )
            out[k] = x if isinstance(x, str) else _text(x)
        return out

    def seq(self, path: str, value: object = ...) -> list[object]:
        v = self._walk(path) if value is ... else value
        if v is None:
            return []
        if not isinstance(v, list):
            raise self.ref.error(path, f"is {_kind(v)}, not a list", "write it as a YAML list")
        return v

    def text(self, path: str, value: object = ..., *, default: str | None = None) -> str | None:
        v = self._walk(path) if value is ... else value
        if v is None:
            return default
        if not isinstance(v, str):
            raise self.ref.error(path, f"is {_kind(v)}, not a string", "write it as a string")
        return v

    def port(self, path: str, value: object, *, named: bool = False) -> int | str:
        if isinstance(value, str) and named:
            if value.isdigit():  # "8080": the API server takes it as a number
                value = int(value)
            else:
                return value
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            what = "a port number from 1 to 65535" + (" or a port name" if named else "")
            raise self.ref.error(path, f"{value!r} is not {what}", f"give {what}")
        return value

    def flag(self, path: str, value: object, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.ref.error(path, f"{value!r} is not true or false", "write true or false")
        return value


def _kind(value: object) -> str:
    if value is None:
        return "empty"
    return {
        dict: "a mapping",
        list: "a list",
        str: f"the string {value!r}"[:60],
        bool: f"{value}",
    }.get(type(value), f"the number {value!r}")


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_manifests(texts: Sequence[tuple[str, str]]) -> Manifests:
    """Read every object of ``texts`` (source name, YAML text); raise :class:`ManifestError`.

    A text may hold several documents (``---``), each one object or a ``List`` (its
    ``items``). Objects of other kinds are skipped with a note.
    """
    services: list[Service] = []
    slices: list[EndpointSlice] = []
    ingresses: list[Ingress] = []
    pods: list[Pod] = []
    deployments: list[Deployment] = []
    seen: dict[tuple[str, str, str], ObjectRef] = {}
    raws: list[Mapping[str, Any]] = []
    notes: list[Note] = []
    skipped: dict[str, int] = {}
    for source, text in texts:
        objects = 0
        max_values = 1024 + len(text) // BYTES_PER_VALUE
        for line, doc in load_documents(text, source, max_values=max_values):
            for where, obj in _objects(doc, source, line):
                objects += 1
                raws.append(obj)
                kind = obj.get("kind")
                if not isinstance(kind, str):
                    raise ManifestError(
                        f"{source}, line {line}: {where or 'the document'}: kind: {_kind(kind)}"
                        " is not a kind",
                        "write the object's kind, such as Service",
                    )
                if kind not in KINDS:
                    if kind not in _QUIET:
                        skipped[_text(kind)] = skipped.get(_text(kind), 0) + 1
                    continue
                ref = _ref(obj, str(kind), source, line, where)
                key = (ref.kind, ref.namespace, ref.name)
                if key in seen:
                    first = seen[key]
                    raise ref.error(
                        "metadata.name",
                        f"the same {kind} is given twice (first at {first.source},"
                        f" line {first.line})",
                        "give each object once: drop one of the files or documents",
                    )
                seen[key] = ref
                r = _Reader(ref, obj)
                if kind == "Service":
                    services.append(_service(r))
                elif kind == "EndpointSlice":
                    slices.append(_slice(r))
                elif kind == "Ingress":
                    ingresses.append(_ingress(r))
                elif kind == "Pod":
                    pods.append(_pod(r))
                else:
                    deployments.append(_deployment(r))
        if objects == 0:
            raise ManifestError(
                f"{source}: holds no Kubernetes object",
                "give manifests or the output of `kubectl get svc,ingress,endpointslices"
                " -A -o yaml`",
            )
    for kind, n in sorted(skipped.items()):
        notes.append(
            Note(
                "input", "", f"{n} object(s) of kind {kind} skipped: v6lb reads " + ", ".join(KINDS)
            )  # fmt: skip
        )
    return Manifests(
        services=tuple(services),
        slices=tuple(slices),
        ingresses=tuple(ingresses),
        pods=tuple(pods),
        deployments=tuple(deployments),
        notes=tuple(notes),
        objects=tuple(raws),
    )


def _objects(doc: object, source: str, line: int) -> Iterable[tuple[str, dict[str, object]]]:
    """The objects of one document: itself, or a List's items (with their paths)."""
    if doc is None:
        return []
    where = f"{source}, line {line}"
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        raise ManifestError(
            f"{where}: not a Kubernetes object: it has no `apiVersion` and `kind`",
            "give Kubernetes manifests (apiVersion, kind, metadata, spec), as"
            " `kubectl get ... -o yaml` prints them",
        )
    kind = doc["kind"]
    if isinstance(kind, str) and kind.endswith("List") and "items" in doc:
        items = doc["items"]
        if items is None:
            return []
        if not isinstance(items, list):
            raise ManifestError(f"{where}: items: is not a list", "write the items as a list")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "kind" not in item:
                raise ManifestError(
                    f"{where}: items[{i}]: not a Kubernetes object: it has no `kind`",
                    "give each item apiVersion, kind and metadata",
                )
            out.append((f"items[{i}]", item))
        return out
    return [("", doc)]


def _ref(obj: dict[str, object], kind: str, source: str, line: int, where: str) -> ObjectRef:
    meta = obj.get("metadata")
    anon = ObjectRef(kind, "?", "?", source + (f" {where}" if where else ""), line)
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise anon.error("metadata.name", "is missing", "give the object a name")
    ns = meta.get("namespace", "default")
    if not isinstance(ns, str) or not ns:
        raise anon.error("metadata.namespace", f"{ns!r} is not a namespace", "give a name")
    return ObjectRef(kind, ns, meta["name"], anon.source, line)


_SERVICE_TYPES: Final = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
_PROTOCOLS: Final = ("TCP", "UDP", "SCTP")


def _choice(r: _Reader, path: str, value: str | None, choices: Sequence[str], dflt: str) -> str:
    if value is None:
        return dflt
    if value not in choices:
        raise r.ref.error(path, f"{value!r} is not one of {', '.join(choices)}", "use one of them")
    return value


def _service(r: _Reader) -> Service:
    kind = _choice(r, "spec.type", r.text("spec.type"), _SERVICE_TYPES, "ClusterIP")
    ports: list[ServicePort] = []
    names: dict[str, int] = {}
    raw_ports = r.seq("spec.ports")
    for i, item in enumerate(raw_ports):
        p = f"spec.ports[{i}]"
        f = r.mapping(p, item)
        name = r.text(f"{p}.name", f.get("name"), default="") or ""
        if len(raw_ports) > 1 and not name:
            raise r.ref.error(
                f"{p}.name", "is missing: a Service with several ports names each",
                "give every port a name, such as http",
            )  # fmt: skip
        if name in names:
            raise r.ref.error(
                f"{p}.name", f"{name!r} is also spec.ports[{names[name]}]'s name",
                "give each port its own name",
            )  # fmt: skip
        names[name] = i
        port = r.port(f"{p}.port", f.get("port"))
        assert isinstance(port, int)
        target = f.get("targetPort")
        node_port = f.get("nodePort")
        ports.append(
            ServicePort(
                name=name,
                protocol=_choice(
                    r,
                    f"{p}.protocol",
                    r.text(f"{p}.protocol", f.get("protocol")),
                    _PROTOCOLS,
                    "TCP",
                ),  # fmt: skip
                port=port,
                target_port=port
                if target is None
                else r.port(f"{p}.targetPort", target, named=True),  # fmt: skip
                node_port=None if node_port is None else int(r.port(f"{p}.nodePort", node_port)),
            )
        )
    families = tuple(
        _choice(
            r, f"spec.ipFamilies[{i}]", r.text(f"spec.ipFamilies[{i}]", v), ("IPv6", "IPv4"), "IPv6"
        )  # fmt: skip
        for i, v in enumerate(r.seq("spec.ipFamilies"))
    )
    policy = r.text("spec.ipFamilyPolicy")
    if policy is not None:
        _choice(r, "spec.ipFamilyPolicy", policy,
                ("SingleStack", "PreferDualStack", "RequireDualStack"), "")  # fmt: skip
        if policy == "SingleStack" and len(families) > 1:
            raise r.ref.error(
                "spec.ipFamilies", f"lists {len(families)} families with ipFamilyPolicy"
                " SingleStack", "list one family, or set ipFamilyPolicy: RequireDualStack",
            )  # fmt: skip
    etp = r.text("spec.externalTrafficPolicy")
    if etp is not None:
        _choice(r, "spec.externalTrafficPolicy", etp, ("Cluster", "Local"), "")
    ips: list[str] = []
    hosts: list[str] = []
    for i, item in enumerate(r.seq("status.loadBalancer.ingress")):
        p = f"status.loadBalancer.ingress[{i}]"
        f = r.mapping(p, item)
        if (ip := r.text(f"{p}.ip", f.get("ip"))) is not None:
            _address(r, f"{p}.ip", ip)
            ips.append(ip)
        if (host := r.text(f"{p}.hostname", f.get("hostname"))) is not None:
            hosts.append(host)
    return Service(
        ref=r.ref,
        type=kind,
        ports=tuple(ports),
        selector=r.strings("spec.selector"),
        annotations=r.strings("metadata.annotations"),
        labels=r.strings("metadata.labels"),
        ip_families=families,
        ip_family_policy=policy,
        external_traffic_policy=etp,
        load_balancer_class=r.text("spec.loadBalancerClass"),
        ingress_ips=tuple(ips),
        ingress_hostnames=tuple(hosts),
    )


def _address(r: _Reader, path: str, text: str) -> IPv6Address | IPv4Address:
    try:
        return ip_address(text)
    except ValueError:
        raise r.ref.error(path, f"{text!r} is not an IP address", "give an IPv6 address") from None


def _slice(r: _Reader) -> EndpointSlice:
    atype = _choice(r, "addressType", r.text("addressType"), ("IPv6", "IPv4", "FQDN"), "")
    if not atype:
        raise r.ref.error("addressType", "is missing", "give addressType: IPv6")
    ports: list[EndpointPort] = []
    for i, item in enumerate(r.seq("ports")):
        p = f"ports[{i}]"
        f = r.mapping(p, item)
        port = f.get("port")
        ports.append(
            EndpointPort(
                name=r.text(f"{p}.name", f.get("name"), default="") or "",
                port=None if port is None else int(r.port(f"{p}.port", port)),
                protocol=_choice(
                    r,
                    f"{p}.protocol",
                    r.text(f"{p}.protocol", f.get("protocol")),
                    _PROTOCOLS,
                    "TCP",
                ),  # fmt: skip
            )
        )
    endpoints: list[Endpoint] = []
    want = {"IPv6": 6, "IPv4": 4}.get(atype)
    for i, item in enumerate(r.seq("endpoints")):
        p = f"endpoints[{i}]"
        f = r.mapping(p, item)
        addrs = r.seq(f"{p}.addresses", f.get("addresses"))
        if not addrs:
            raise r.ref.error(f"{p}.addresses", "is empty", "give the endpoint's address")
        texts: list[str] = []
        for j, a in enumerate(addrs):
            text = r.text(f"{p}.addresses[{j}]", a) or ""
            if want is not None and _address(r, f"{p}.addresses[{j}]", text).version != want:
                raise r.ref.error(
                    f"{p}.addresses[{j}]", f"{text} is not an {atype} address (addressType"
                    f" {atype})", f"give {atype} addresses only, or fix addressType",
                )  # fmt: skip
            texts.append(text)
        c = r.mapping(f"{p}.conditions", f.get("conditions"))
        ready = r.flag(f"{p}.conditions.ready", c.get("ready"), True)
        ref = r.mapping(f"{p}.targetRef", f.get("targetRef"))
        endpoints.append(
            Endpoint(
                addresses=tuple(texts),
                ready=ready,
                serving=r.flag(f"{p}.conditions.serving", c.get("serving"), ready),
                terminating=r.flag(f"{p}.conditions.terminating", c.get("terminating"), False),
                node_name=r.text(f"{p}.nodeName", f.get("nodeName")),
                zone=r.text(f"{p}.zone", f.get("zone")),
                pod_name=r.text(f"{p}.targetRef.name", ref.get("name"))
                if ref.get("kind") == "Pod"
                else None,
            )
        )
    labels = r.strings("metadata.labels")
    return EndpointSlice(
        ref=r.ref,
        address_type=atype,
        service_name=labels.get(SERVICE_NAME_LABEL),
        ports=tuple(ports),
        endpoints=tuple(endpoints),
    )


def _ingress(r: _Reader) -> Ingress:
    annotations = r.strings("metadata.annotations")
    cls = r.text("spec.ingressClassName")
    legacy = annotations.get(INGRESS_CLASS_ANNOTATION)
    if cls is not None and legacy is not None and cls != legacy:
        raise r.ref.error(
            "spec.ingressClassName",
            f"{cls!r} conflicts with the annotation {INGRESS_CLASS_ANNOTATION}: {legacy!r}",
            "keep spec.ingressClassName and remove the deprecated annotation",
        )
    default = None
    if r._walk("spec.defaultBackend") is not None:
        default = _ingress_backend(r, "spec.defaultBackend", r._walk("spec.defaultBackend"))
    paths: list[IngressPath] = []
    for i, rule in enumerate(r.seq("spec.rules")):
        p = f"spec.rules[{i}]"
        f = r.mapping(p, rule)
        host = r.text(f"{p}.host", f.get("host"))
        http = r.mapping(f"{p}.http", f.get("http"))
        for j, item in enumerate(r.seq(f"{p}.http.paths", http.get("paths"))):
            q = f"{p}.http.paths[{j}]"
            g = r.mapping(q, item)
            paths.append(
                IngressPath(
                    host=host,
                    path=r.text(f"{q}.path", g.get("path"), default="/") or "/",
                    path_type=r.text(f"{q}.pathType", g.get("pathType"), default="Prefix")
                    or "Prefix",
                    backend=_ingress_backend(r, f"{q}.backend", g.get("backend")),
                    where=q,
                )
            )
    if default is None and not paths:
        raise r.ref.error(
            "spec.rules", "names no backend (no rules with paths, no defaultBackend)",
            "add spec.rules[].http.paths[].backend or spec.defaultBackend",
        )  # fmt: skip
    return Ingress(
        ref=r.ref,
        ingress_class=cls if cls is not None else legacy,
        paths=tuple(paths),
        default_backend=default,
        annotations=annotations,
    )


def _ingress_backend(r: _Reader, path: str, value: object) -> IngressBackend:
    f = r.mapping(path, value)
    svc = r.mapping(f"{path}.service", f.get("service"))
    if not svc:
        if "resource" in f:
            raise r.ref.error(
                f"{path}.resource", "a resource backend is not a Service",
                "v6lb balances to Services: use backend.service",
            )  # fmt: skip
        raise r.ref.error(f"{path}.service", "is missing", "give service.name and port.number")
    name = r.text(f"{path}.service.name", svc.get("name"))
    if not name:
        raise r.ref.error(f"{path}.service.name", "is missing", "name the Service")
    port = r.mapping(f"{path}.service.port", svc.get("port"))
    if "number" in port:
        number = r.port(f"{path}.service.port.number", port["number"])
        return IngressBackend(name, number)
    pname = r.text(f"{path}.service.port.name", port.get("name"))
    if not pname:
        raise r.ref.error(
            f"{path}.service.port", "gives neither number nor name", "give port.number: 80"
        )
    return IngressBackend(name, pname)


def _container_ports(r: _Reader, spec: str) -> tuple[ContainerPort, ...]:
    out: list[ContainerPort] = []
    for i, c in enumerate(r.seq(f"{spec}.containers")):
        p = f"{spec}.containers[{i}]"
        f = r.mapping(p, c)
        for j, item in enumerate(r.seq(f"{p}.ports", f.get("ports"))):
            q = f"{p}.ports[{j}]"
            g = r.mapping(q, item)
            out.append(
                ContainerPort(
                    name=r.text(f"{q}.name", g.get("name"), default="") or "",
                    port=int(r.port(f"{q}.containerPort", g.get("containerPort"))),
                    protocol=_choice(
                        r,
                        f"{q}.protocol",
                        r.text(f"{q}.protocol", g.get("protocol")),
                        _PROTOCOLS,
                        "TCP",
                    ),  # fmt: skip
                )
            )
    return tuple(out)


def _pod(r: _Reader) -> Pod:
    ips: list[str] = []
    for i, item in enumerate(r.seq("status.podIPs")):
        f = r.mapping(f"status.podIPs[{i}]", item)
        ip = r.text(f"status.podIPs[{i}].ip", f.get("ip"))
        if ip:
            _address(r, f"status.podIPs[{i}].ip", ip)
            ips.append(ip)
    if not ips and (ip := r.text("status.podIP")):
        _address(r, "status.podIP", ip)
        ips.append(ip)
    return Pod(
        ref=r.ref,
        labels=r.strings("metadata.labels"),
        node_name=r.text("spec.nodeName"),
        pod_ips=tuple(ips),
        ports=_container_ports(r, "spec"),
    )


def _deployment(r: _Reader) -> Deployment:
    return Deployment(
        ref=r.ref,
        labels=r.strings("metadata.labels"),
        selector=r.strings("spec.selector.matchLabels"),
        template_labels=r.strings("spec.template.metadata.labels"),
        ports=_container_ports(r, "spec.template.spec"),
    )
