"""Manifests to a v6lb config: VIPs, backends, modes, health checks and a topology.

:func:`derive_config` turns :class:`~v6lb.k8s.manifests.Manifests` into the plain data
of a v6lb file (``lb:``, ``vips:``, ``topology:``), in the shape of
``examples/eks-ipv6.yaml``, that :func:`v6lb.model.config.parse_config` accepts:

- **VIPs.** One per port of each ``type: LoadBalancer`` Service that takes IPv6, and one
  per backend Service port of each ALB Ingress. The address is the Service's
  ``status.loadBalancer.ingress[].ip`` (IPv6) if any, else a ``--vip NS/NAME=ADDR``
  override, else one allocated from ``2001:db8:a:100::/64`` (``::1``, ``::2``...) in
  the order of (namespace, name). The ports of one Service share its address.
- **Backends.** The IPv6 EndpointSlice endpoints of the Service (``addresses[0]``, as
  the API says consumers use): ``ready`` ones serve, ``serving`` and ``terminating``
  ones are ``drain: true``, the rest are left out. The port is the EndpointSlice's port
  of the same name as the Service port, else the numeric targetPort, else a named
  targetPort found in the Pods' or Deployments' container ports.
- **Modes** (:func:`choose_mode`): the property the AWS load balancer gave, kept. ALB
  (Ingress): ``proxy-l7`` with Forwarded headers. NLB with PROXY v2: ``proxy-l4`` with
  v2. NLB where the pod sees the client's address: ``nat`` (or ``dsr-ip6ip6`` with
  ``prefer="dsr"`` when no port is rewritten). NLB where it sees the LB's: ``proxy-l4``.
  What the LB does is an :class:`LbBehaviour`, which :func:`aws_behaviour` takes from
  :mod:`v6lb.k8s.aws` (the annotations' sourced rules); a caller may pass its own.
- **Topology**: client on ``internet``, the ``igw`` router, the LB on ``public``
  (``2001:db8:a::/64``) and on ``private`` with the nodes (the endpoints' ``nodeName``;
  ``node-0`` when absent), each node's pods on their own link whose subnet holds their
  real addresses (in EKS, a node's pods share a /80). nat replies go back via the LB;
  replies from a VIP (DSR) go straight to ``igw``.

Everything that is skipped or changed gets a :class:`~v6lb.k8s.manifests.Note`; what
makes a config impossible is a :class:`~v6lb.k8s.manifests.ManifestError` (exit 2).
Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv6Address, IPv6Network, ip_address
from typing import Final

from v6lb.k8s.aws import AwsLb, LbKind, aws_lb_for_ingress, aws_lb_for_service
from v6lb.k8s.manifests import (
    EndpointSlice,
    Ingress,
    IngressBackend,
    ManifestError,
    Manifests,
    Note,
    ObjectRef,
    Service,
    ServicePort,
    selector_matches,
)
from v6lb.k8s.pitfalls import pitfalls
from v6lb.model.config import VipMode

__all__ = [
    "ALB_CLASSES",
    "VIP_POOL",
    "Derived",
    "Exposed",
    "HealthHint",
    "LbBehaviour",
    "ResolvedBackend",
    "aws_behaviour",
    "alb_http_ports",
    "choose_mode",
    "derive_config",
    "exposed",
    "health_from_annotations",
    "ingress_behaviour_from",
    "service_behaviour_from",
    "resolve_backends",
]

VIP_POOL: Final = IPv6Network("2001:db8:a:100::/64")
INTERNET: Final = IPv6Network("2001:db8:ffff::/64")
PUBLIC: Final = IPv6Network("2001:db8:a::/64")
CLIENT_ADDR: Final = IPv6Address("2001:db8:ffff::100")
IGW_INTERNET: Final = IPv6Address("2001:db8:ffff::1")
IGW_PUBLIC: Final = IPv6Address("2001:db8:a::1")
LB_PUBLIC: Final = IPv6Address("2001:db8:a::10")
# the private (node) subnet: the first of these that no pod, VIP or other link is in
_PRIVATE_CANDIDATES: Final = tuple(IPv6Network(f"fd00:{n:x}::/64") for n in range(0x10, 0x30))
ALB_CLASSES: Final = ("alb",)
SVC: Final = "service.beta.kubernetes.io/aws-load-balancer-"
ALB: Final = "alb.ingress.kubernetes.io/"
_NAME_OK: Final = re.compile(r"[^A-Za-z0-9._-]")
_NODE_OK: Final = re.compile(r"[^a-z0-9-]")


@dataclass(frozen=True, slots=True)
class HealthHint:
    """Health-check settings the annotations give; None: v6lb's default for that field."""

    type: str = "tcp"  # tcp or http (https is checked as tcp, with a note)
    path: str | None = None
    port: int | None = None  # None: the traffic port (the backend's)
    interval: float | None = None
    timeout: float | None = None
    rise: int | None = None
    fall: int | None = None
    expect: str | None = None  # success codes: "200", "200-399", "200,204"
    source: str = ""  # the annotations it came from, for the comment


@dataclass(frozen=True, slots=True)
class LbBehaviour:
    """What the AWS load balancer does for one exposed port, as far as the config cares.

    ``pod_sees_client``: the pod's peer address is the client's (NLB with client IP
    preservation, ip targets or ``externalTrafficPolicy: Local``); else it is the LB's
    (or a node's). ``why`` says so in words, with the annotations it rests on.
    """

    kind: str  # nlb, alb, clb
    target_type: str  # ip or instance
    proxy_protocol_v2: bool
    pod_sees_client: bool
    health: HealthHint | None = None
    why: str = ""


@dataclass(frozen=True, slots=True)
class ResolvedBackend:
    address: IPv6Address
    port: int
    drain: bool
    node: str | None
    pod: str | None
    zone: str | None = None


@dataclass(frozen=True, slots=True)
class Exposed:
    """One thing the AWS LB exposes: a LoadBalancer Service's port, or an Ingress backend."""

    source: ObjectRef  # the Service, or the Ingress
    service: Service
    port: ServicePort
    where: str  # the field that exposes it: spec.ports[0], spec.rules[0].http.paths[0]...
    ingress: Ingress | None = None


@dataclass(frozen=True, slots=True)
class Derived:
    """The config as plain data, a comment per VIP (its origin), and the notes."""

    data: dict[str, object]
    comments: Mapping[str, str]  # VIP name -> where it came from and why this mode
    notes: tuple[Note, ...] = ()
    warnings: tuple[Note, ...] = ()
    topology_nodes: int = 0
    origins: Mapping[str, Exposed] = field(default_factory=dict)  # VIP name -> what it serves


ServiceBehaviour = Callable[[Service, ServicePort], LbBehaviour]
IngressBehaviour = Callable[[Ingress, Service, ServicePort], LbBehaviour]


# --- what the AWS LB does: read from the annotations --------------------------------


def aws_behaviour(lb: AwsLb | None, port: ServicePort, health: HealthHint | None) -> LbBehaviour:
    """What the AWS load balancer ``lb`` (:mod:`v6lb.k8s.aws`) does for ``port``.

    ``lb.ipv6_client`` decides what the pod sees, from the sourced rules of
    :mod:`v6lb.k8s.aws`; a UDP port of an NLB with IPv6 ip targets keeps the client's
    address whatever the TCP setting (AWS: client IP preservation cannot be turned off
    for UDP). None (another controller's load balancer class): the pod is assumed to see
    the client, and the comment says so.
    """
    if lb is None:
        return LbBehaviour(
            kind="other",
            target_type="ip",
            proxy_protocol_v2=False,
            pod_sees_client=True,
            health=health,
            why="not an AWS load balancer (another class or controller): the pod is taken"
            " to see the client",
        )
    p = lb.ipv6_client
    sees = p.v6lb_mode == VipMode.NAT.value
    if (
        port.protocol == "UDP"
        and lb.kind is LbKind.NLB
        and lb.target_type == "ip"
        and lb.target_family == "ipv6"
    ):
        sees = True
    pp = p.proxy_protocol == "v2"
    kind = {LbKind.NLB: "nlb", LbKind.ALB: "alb", LbKind.CLASSIC: "clb"}[lb.kind]
    why = f"{lb.kind.value.upper()}, {lb.target_type} targets: the pod sees {p.pod_sees_source}"
    if pp:
        why += "; PROXY v2"
    return LbBehaviour(kind, lb.target_type, pp, sees, health, why)


def service_behaviour_from(m: Manifests) -> ServiceBehaviour:
    """The :data:`ServiceBehaviour` of ``m``'s Services, read by :mod:`v6lb.k8s.aws`."""

    def behaviour(service: Service, port: ServicePort) -> LbBehaviour:
        health = health_from_annotations(service.annotations, alb=False)
        return aws_behaviour(aws_lb_for_service(m.raw(service.ref)), port, health)

    return behaviour


def ingress_behaviour_from(m: Manifests) -> IngressBehaviour:
    """The :data:`IngressBehaviour` of ``m``'s ALB Ingresses, read by :mod:`v6lb.k8s.aws`
    (health check HTTP ``/`` unless the annotations say otherwise, as the ALB's)."""

    def behaviour(ingress: Ingress, service: Service, port: ServicePort) -> LbBehaviour:
        merged = {**ingress.annotations, **service.annotations}  # the Service's win
        health = health_from_annotations(merged, alb=True) or HealthHint(type="http", path="/")
        lb = aws_lb_for_ingress(m.raw(ingress.ref), backend=m.raw(service.ref))
        return aws_behaviour(lb, port, health)

    return behaviour


def health_from_annotations(a: Mapping[str, str], *, alb: bool) -> HealthHint | None:
    """The health-check annotations (NLB's ``aws-load-balancer-healthcheck-*`` or ALB's
    ``healthcheck-*``) as a hint; None when none is given."""
    if alb:
        keys = {
            "protocol": ALB + "healthcheck-protocol",
            "path": ALB + "healthcheck-path",
            "port": ALB + "healthcheck-port",
            "interval": ALB + "healthcheck-interval-seconds",
            "timeout": ALB + "healthcheck-timeout-seconds",
            "rise": ALB + "healthy-threshold-count",
            "fall": ALB + "unhealthy-threshold-count",
            "expect": ALB + "success-codes",
        }
    else:
        keys = {
            "protocol": SVC + "healthcheck-protocol",
            "path": SVC + "healthcheck-path",
            "port": SVC + "healthcheck-port",
            "interval": SVC + "healthcheck-interval",
            "timeout": SVC + "healthcheck-timeout",
            "rise": SVC + "healthcheck-healthy-threshold",
            "fall": SVC + "healthcheck-unhealthy-threshold",
            "expect": SVC + "healthcheck-success-codes",
        }
    given = {k: a[v].strip() for k, v in keys.items() if v in a}
    if not given:
        return None
    proto = given.get("protocol", "http" if alb or "path" in given else "tcp").lower()
    kind = "http" if proto == "http" else "tcp"
    port = given.get("port")
    return HealthHint(
        type=kind,
        path=(given.get("path") or "/") if kind == "http" else None,
        port=int(port) if port and port.isdigit() else None,
        interval=_number(given.get("interval")),
        timeout=_number(given.get("timeout")),
        rise=_int(given.get("rise")),
        fall=_int(given.get("fall")),
        expect=given.get("expect") if kind == "http" else None,
        source=", ".join(sorted(keys[k].rpartition("/")[2] for k in given)),
    )


def _number(text: str | None) -> float | None:
    """Seconds from an annotation; None (v6lb's default) unless a finite positive number."""
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value is not None and 0 < value < 1e6 else None


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def choose_mode(
    b: LbBehaviour, *, protocol: str = "TCP", prefer: str | None = None, rewrites_port: bool
) -> tuple[str, dict[str, object], str]:
    """The v6lb mode that keeps what the AWS LB gave: (mode, its options, why).

    ALB: proxy-l7, Forwarded headers (the app reads the client from a header). PROXY v2:
    proxy-l4 with v2 (from the PROXY header). The pod sees the client: nat, or dsr-ip6ip6
    with ``prefer="dsr"`` (DSR rewrites no port, so only when the port is kept). The pod
    sees the LB: proxy-l4 without PROXY.
    """
    if b.kind == "alb":
        return VipMode.PROXY_L7.value, {"forwarded_headers": True}, "the app reads Forwarded"
    if b.proxy_protocol_v2:
        return (
            VipMode.PROXY_L4.value,
            {"proxy_protocol": "v2"},
            "the app reads the client from PROXY v2",
        )
    if b.pod_sees_client:
        if prefer == "dsr" and not rewrites_port:
            return VipMode.DSR_IP6IP6.value, {}, "the pod sees the client; replies skip the LB"
        why = "the pod sees the client"
        if prefer == "dsr":
            why += " (not DSR: the port is rewritten, which DSR cannot do)"
        return VipMode.NAT.value, {}, why
    return VipMode.PROXY_L4.value, {}, "the pod sees the LB's address, not the client's"


# --- what is exposed, and its backends ----------------------------------------------


def exposed(m: Manifests, notes: list[Note]) -> list[Exposed]:
    """Every LoadBalancer Service port and ALB Ingress backend, in (namespace, name) order."""
    out: list[Exposed] = []
    for svc in sorted(m.services, key=lambda s: (s.ref.namespace, s.ref.name)):
        if svc.type != "LoadBalancer":
            continue
        if not svc.serves_ipv6:
            notes.append(
                Note(svc.ref, "spec.ipFamilies", "an IPv4-only Service: skipped, v6lb serves"
                     " IPv6", "add IPv6 to spec.ipFamilies (ipFamilyPolicy: PreferDualStack)")
            )  # fmt: skip
            continue
        for i, port in enumerate(svc.ports):
            if port.protocol == "SCTP":
                notes.append(Note(svc.ref, f"spec.ports[{i}]", "SCTP: skipped (TCP, UDP only)"))
                continue
            out.append(Exposed(svc.ref, svc, port, f"spec.ports[{i}]"))
    for ing in sorted(m.ingresses, key=lambda s: (s.ref.namespace, s.ref.name)):
        cls = ing.ingress_class
        if cls is not None and cls not in ALB_CLASSES:
            notes.append(
                Note(ing.ref, "spec.ingressClassName", f"class {cls!r} is not the ALB's: skipped")
            )
            continue
        for where, backend in ing.backends():
            target = m.service(ing.ref.namespace, backend.service)
            if target is None:
                notes.append(
                    Note(ing.ref, f"{where}.service.name", f"Service {backend.service!r} is not"
                         " in the input: skipped", "give the Service's manifest too")
                )  # fmt: skip
                continue
            port = _ingress_port(ing, where, backend, target)
            out.append(Exposed(ing.ref, target, port, where, ing))
    return out


def _ingress_port(ing: Ingress, where: str, b: IngressBackend, svc: Service) -> ServicePort:
    for p in svc.ports:
        if (isinstance(b.port, int) and p.port == b.port) or p.name == b.port:
            return p
    field_ = f"{where}.service.port.{'number' if isinstance(b.port, int) else 'name'}"
    have = ", ".join(f"{p.name or '(unnamed)'} {p.port}" for p in svc.ports) or "none"
    raise ing.ref.error(
        field_,
        f"Service {svc.ref.key} has no port {b.port!r} (its ports: {have})",
        "name one of the Service's ports, by number or name",
    )


def resolve_backends(
    m: Manifests, svc: Service, port: ServicePort, notes: list[Note]
) -> list[ResolvedBackend]:
    """The IPv6 endpoints of ``svc`` for ``port``: ready ones, then serving-but-terminating
    ones as drain; the port resolved. Raise ManifestError for IPv4-only endpoints of an
    IPv6 Service and for a named targetPort that resolves nowhere."""
    slices = m.slices_of(svc)
    v6 = [s for s in slices if s.address_type == "IPv6"]
    if slices and not v6:
        s = slices[0]
        raise s.ref.error(
            "addressType",
            f"{s.address_type}: Service {svc.ref.key} has only {s.address_type} endpoints,"
            " so its IPv6 VIP has no backend",
            "run the pods with IPv6 (an IPv6 or dual-stack cluster), or leave the Service out",
        )
    for s in slices:
        if s.address_type != "IPv6":
            notes.append(Note(s.ref, "addressType", f"{s.address_type} endpoints ignored:"
                              " v6lb balances IPv6"))  # fmt: skip
    out: dict[tuple[IPv6Address, int], ResolvedBackend] = {}
    for s in v6:
        number = _slice_port(m, svc, port, s)
        for ep in s.endpoints:
            if not ep.ready and not (ep.serving and ep.terminating):
                continue
            addr = IPv6Address(ep.addresses[0])
            key = (addr, number)
            if key in out and not out[key].drain:
                continue
            out[key] = ResolvedBackend(
                addr, number, not ep.ready, ep.node_name, ep.pod_name, ep.zone
            )
    return sorted(out.values(), key=lambda b: (b.drain, b.address, b.port))


def _slice_port(m: Manifests, svc: Service, port: ServicePort, s: EndpointSlice) -> int:
    for p in s.ports:
        if p.name == port.name and p.protocol == port.protocol and p.port is not None:
            return p.port
    if isinstance(port.target_port, int):
        return port.target_port
    name = port.target_port
    pods = {p.ref.name: p for p in m.pods if p.ref.namespace == svc.ref.namespace}
    for ep in s.endpoints:
        pod = pods.get(ep.pod_name or "")
        if pod is not None:
            for cp in pod.ports:
                if cp.name == name and cp.protocol == port.protocol:
                    return cp.port
    for d in m.deployments:
        if d.ref.namespace == svc.ref.namespace and selector_matches(
            svc.selector, d.template_labels
        ):
            for cp in d.ports:
                if cp.name == name and cp.protocol == port.protocol:
                    return cp.port
    i = svc.ports.index(port)
    raise svc.ref.error(
        f"spec.ports[{i}].targetPort",
        f"the named port {name!r} resolves nowhere: EndpointSlice {s.ref.key} has no port"
        f" named {port.name!r}, and no Pod or Deployment given has a container port {name!r}",
        "give the Pods or the Deployment too, or write the targetPort as a number",
    )


def _selector_warnings(m: Manifests, svc: Service, notes: list[Note]) -> None:
    if not svc.selector:
        return
    ns = svc.ref.namespace
    pods = [p for p in m.pods if p.ref.namespace == ns]
    deps = [d for d in m.deployments if d.ref.namespace == ns]
    if not pods and not deps:
        return
    if any(selector_matches(svc.selector, p.labels) for p in pods) or any(
        selector_matches(svc.selector, d.template_labels) for d in deps
    ):
        return
    sel = ", ".join(f"{k}={v}" for k, v in svc.selector.items())
    notes.append(
        Note(svc.ref, "spec.selector", f"{sel} matches none of the {len(pods)} Pod(s) and"
             f" {len(deps)} Deployment(s) given in namespace {ns}",
             "fix the selector or the pod template's labels")
    )  # fmt: skip


# --- the config ---------------------------------------------------------------------


@dataclass(slots=True)
class _Vip:
    name: str
    exposed: Exposed
    address: IPv6Address
    protocol: str
    mode: str
    options: dict[str, object]
    backends: list[ResolvedBackend]
    health: HealthHint | None
    comment: str


def _vip_name(parts: Sequence[str], used: set[str]) -> str:
    name = _NAME_OK.sub("-", "-".join(p for p in parts if p))
    if len(name) > 63:
        digest = hashlib.sha256(name.encode()).hexdigest()[:6]
        name = f"{name[:56]}-{digest}"
    base, n = name, 2
    while name in used:
        name = f"{base[:58]}-{n}"
        n += 1
    used.add(name)
    return name


def derive_config(
    m: Manifests,
    *,
    vips: Mapping[str, IPv6Address] | None = None,
    prefer: str | None = None,
    service_behaviour: ServiceBehaviour | None = None,
    ingress_behaviour: IngressBehaviour | None = None,
    allow_empty: bool = False,
    with_pitfalls: bool = True,
) -> Derived:
    """The v6lb config for ``m`` (see the module doc). ``vips`` maps ``namespace/name``
    (a Service or an Ingress) or ``namespace/ingress/service`` to a VIP address.

    Nothing to serve (no exposed port with a ready IPv6 endpoint) is a
    :class:`ManifestError`, or with ``allow_empty`` a :class:`Derived` with no data (its
    warnings say why). ``with_pitfalls``: the pitfalls of the objects
    (:func:`v6lb.k8s.pitfalls.pitfalls`) are among the warnings."""
    overrides = dict(vips or {})
    service_behaviour = service_behaviour or service_behaviour_from(m)
    ingress_behaviour = ingress_behaviour or ingress_behaviour_from(m)
    notes: list[Note] = list(m.notes)
    warnings: list[Note] = []
    known = {(s.ref.namespace, s.ref.name) for s in m.services}
    for s in m.slices:
        if s.service_name is None:
            warnings.append(Note(s.ref, "metadata.labels", "has no kubernetes.io/service-name"
                                 " label: skipped"))  # fmt: skip
        elif (s.ref.namespace, s.service_name) not in known:
            warnings.append(
                Note(s.ref, 'metadata.labels["kubernetes.io/service-name"]',
                     f"Service {s.ref.namespace}/{s.service_name} is not in the input: skipped",
                     "give the Service's manifest too, or leave this EndpointSlice out")
            )  # fmt: skip
    if with_pitfalls:
        warnings += [Note(p.obj, p.field, p.reason, p.fix) for p in pitfalls(m.objects)]
    items = exposed(m, warnings)
    for svc in {e.service.ref: e.service for e in items}.values():
        _selector_warnings(m, svc, warnings)
    used_names: set[str] = set()
    out: list[_Vip] = []
    backends_cache: dict[tuple[ObjectRef, str], list[ResolvedBackend]] = {}
    for e in items:
        svc, port = e.service, e.port
        key = (svc.ref, port.name or str(port.port))
        if key not in backends_cache:
            backends_cache[key] = resolve_backends(m, svc, port, warnings)
        backends = backends_cache[key]
        label = f"{e.source.kind} {e.source.key}"
        if not backends:
            n = sum(len(s.endpoints) for s in m.slices_of(svc))
            warnings.append(
                Note(svc.ref, "endpoints", f"no ready IPv6 endpoint ({n} endpoint(s) in"
                     f" {len(m.slices_of(svc))} EndpointSlice(s)): {label} {e.where} skipped",
                     "give the Service's EndpointSlices (kubectl get endpointslices -o yaml),"
                     " or wait for its pods to be ready")
            )  # fmt: skip
            continue
        if e.ingress is not None:
            b = ingress_behaviour(e.ingress, svc, port)
            name = _vip_name([svc.ref.namespace, e.ingress.ref.name, svc.ref.name,
                              port.name or str(port.port)], used_names)  # fmt: skip
        else:
            b = service_behaviour(svc, port)
            name = _vip_name(
                [svc.ref.namespace, svc.ref.name, port.name or str(port.port)], used_names
            )
        vip_ports = _vip_ports(e)
        rewrites = len(vip_ports) > 1 or any(x.port != vip_ports[0] for x in backends)
        if e.ingress is not None and alb_http_ports(e.ingress)[1]:
            notes.append(
                Note(e.ingress.ref, f'metadata.annotations["{ALB}listen-ports"]',
                     f"HTTPS listener(s) {alb_http_ports(e.ingress)[1]} not served: v6lb's"
                     f" proxy-l7 ends no TLS; HTTP on {vip_ports}")
            )  # fmt: skip
        mode, options, why = choose_mode(
            b, protocol=port.protocol, prefer=prefer, rewrites_port=rewrites
        )
        if mode == VipMode.PROXY_L7.value and port.protocol != "TCP":
            raise e.source.error(e.where, "an ALB backend port is not TCP", "use a TCP port")
        target = f"{port.port}/{port.protocol}"
        via = f"Service {svc.ref.name} " if e.ingress is not None else ""
        comment = (
            f"{label} {e.where}: {via}port {port.name + ' ' if port.name else ''}{target} ->"
            f" {', '.join(sorted({str(x.port) for x in backends}))}; {b.why}; {mode}: {why}"
        )
        out.append(
            _Vip(
                name,
                e,
                IPv6Address(0),
                port.protocol.lower(),
                mode,
                options,
                backends,
                b.health,
                comment,
            )  # fmt: skip
        )
    if not out and allow_empty:
        return Derived({}, {}, tuple(dict.fromkeys(notes)), tuple(dict.fromkeys(warnings)))
    if not out:
        why = "; ".join(str(w) for w in warnings[:3]) or "the input has no LoadBalancer"
        raise ManifestError(
            f"nothing to serve: no LoadBalancer Service or ALB Ingress with ready IPv6"
            f" endpoints ({why})",
            "give the Services, Ingresses and EndpointSlices together: kubectl get"
            " svc,ingress,endpointslices -A -o yaml",
        )
    _assign_addresses(out, overrides)
    data = _config(out, notes)
    comments = {v.name: v.comment for v in out}
    nodes_ = len(data["topology"]["nodes"])  # type: ignore[index]
    return Derived(
        data,
        comments,
        tuple(dict.fromkeys(notes)),
        tuple(dict.fromkeys(warnings)),
        nodes_,
        {v.name: v.exposed for v in out},
    )


def _vip_ports(e: Exposed) -> list[int]:
    """The Service's port, or the ALB's HTTP listeners (``listen-ports``, default HTTP 80)."""
    if e.ingress is None:
        return [e.port.port]
    return alb_http_ports(e.ingress)[0]


def alb_http_ports(ingress: Ingress) -> tuple[list[int], list[int]]:
    """The ALB's listeners from ``alb.ingress.kubernetes.io/listen-ports`` (a JSON list such
    as ``[{"HTTP": 80}, {"HTTPS": 443}]``; default HTTP 80): (HTTP ports, HTTPS ports).
    With HTTPS only, HTTP 80 is served (v6lb's proxy-l7 ends no TLS)."""
    raw = ingress.annotations.get(ALB + "listen-ports")
    if raw is None:
        return [80], []
    try:
        items = json.loads(raw)
        pairs = [(k.upper(), int(v)) for item in items for k, v in item.items()]
    except (ValueError, TypeError, AttributeError):
        raise ingress.ref.error(
            f'metadata.annotations["{ALB}listen-ports"]',
            f"{raw[:60]!r} is not a JSON list of listeners",
            'write it as \'[{"HTTP": 80}, {"HTTPS": 443}]\'',
        ) from None
    http = sorted({p for k, p in pairs if k == "HTTP" and 1 <= p <= 65535})
    https = sorted({p for k, p in pairs if k == "HTTPS"})
    return (http or [80]), https


def _assign_addresses(out: list[_Vip], overrides: dict[str, IPv6Address]) -> None:
    """Status ip, then --vip, then the pool: one address per Service or Ingress backend."""
    groups: dict[str, list[_Vip]] = {}
    for v in out:
        e = v.exposed
        if e.ingress is None:
            key = e.service.ref.key
        else:
            key = f"{e.ingress.ref.key}/{e.service.ref.name}:{e.port.port}"
        groups.setdefault(key, []).append(v)
    chosen: dict[str, IPv6Address] = {}
    used: set[str] = set()
    for key, vs in groups.items():
        e = vs[0].exposed
        if e.ingress is None:
            for ip in e.service.ingress_ips:
                if ip_address(ip).version == 6:
                    chosen[key] = IPv6Address(ip)
                    break
            if e.service.ref.key in overrides:
                chosen[key] = overrides[e.service.ref.key]
                used.add(e.service.ref.key)
        else:
            ing = e.ingress.ref.key
            long = f"{ing}/{e.service.ref.name}"
            if long in overrides:
                chosen[key] = overrides[long]
                used.add(long)
            elif ing in overrides:
                if len([k for k in groups if k.startswith(ing + "/")]) > 1:
                    raise ManifestError(
                        f"--vip {ing}: Ingress {ing} has several backend Services, each with"
                        " its own VIP",
                        f"give each its address: --vip {ing}/SERVICE=ADDRESS",
                    )
                chosen[key] = overrides[ing]
                used.add(ing)
    unknown = sorted(set(overrides) - used)
    if unknown:
        raise ManifestError(
            f"--vip {unknown[0]}: no LoadBalancer Service or ALB Ingress (with ready endpoints)"
            " of that namespace/name",
            "name one of: " + ", ".join(sorted({v.exposed.source.key for v in out}))[:300],
        )
    taken = {a: k for k, a in chosen.items()}
    if len(taken) != len(chosen):
        raise ManifestError(
            "two Services or Ingresses are given the same VIP address",
            "give each its own address with --vip NAMESPACE/NAME=ADDRESS",
        )
    nxt = 1
    for key in groups:  # already in (namespace, name) order
        if key not in chosen:
            while (addr := VIP_POOL[nxt]) in taken:
                nxt += 1
            chosen[key] = addr
            taken[addr] = key
            nxt += 1
    for key, vs in groups.items():
        for v in vs:
            v.address = chosen[key]


def _common_len(addrs: Sequence[IPv6Address]) -> int:
    lo, hi = int(min(addrs)), int(max(addrs))
    return 128 - (lo ^ hi).bit_length()


def _pod_subnets(by_node: dict[str, list[IPv6Address]]) -> dict[str, IPv6Network]:
    """A subnet per node holding its pods: the /80 EKS delegates, or the pods' common
    prefix when /80s would overlap; an error when even those do."""

    def subnet(addrs: list[IPv6Address], most: int) -> IPv6Network:
        length = min(_common_len(addrs), most, 120)  # at least 256 addresses: room for the node
        return IPv6Network((addrs[0], length), strict=False)

    nets = {k: subnet(a, 80) for k, a in by_node.items()}
    if _overlap(nets):
        nets = {k: subnet(a, 128) for k, a in by_node.items()}
        bad = _overlap(nets)
        if bad:
            a, b = bad
            raise ManifestError(
                f"the pods of node {a or '(none given)'} and of node {b or '(none given)'}"
                f" interleave ({nets[a]} and {nets[b]}): the lab cannot put each node's pods"
                " on a link of their own",
                "give the endpoints their nodeName, as kubectl prints them",
            )
    return nets


def _overlap(nets: Mapping[str, IPv6Network]) -> tuple[str, str] | None:
    order = sorted(nets.items(), key=lambda kv: (kv[1].network_address, kv[1].prefixlen))
    for (ka, a), (kb, b) in zip(order, order[1:], strict=False):
        if a.overlaps(b):
            return ka, kb
    return None


def _node_name(text: str, used: set[str], prefix: str = "") -> str:
    """A topology node name ([a-z0-9-], at most 32) for a Kubernetes node or pod name."""
    first = text.split(".")[0].lower()
    name = _NODE_OK.sub("-", prefix + first).strip("-") or "x"
    if len(name) > 32:
        name = f"{name[:25].rstrip('-')}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"
    base, n = name, 2
    while name in used:
        name = f"{base[:28]}-{n}"
        n += 1
    used.add(name)
    return name


def _health(h: HealthHint, vip: _Vip, notes: list[Note]) -> dict[str, object]:
    out: dict[str, object] = {"type": h.type}
    ref = vip.exposed.source
    if h.path is not None:
        out["path"] = h.path
    if h.port is not None and 1 <= h.port <= 65535:
        out["port"] = h.port
    elif h.port is not None:
        notes.append(Note(ref, "metadata.annotations", f"health-check port {h.port} is not a"
                          " port: the traffic port is checked"))  # fmt: skip
    interval = h.interval
    if interval is not None:
        interval = min(max(interval, 0.1), 3600.0)
        out["interval"] = interval
    if h.timeout is not None:
        timeout = min(max(h.timeout, 0.05), 3600.0)
        if interval is not None and timeout >= interval:
            notes.append(Note(ref, "metadata.annotations", f"health-check timeout {timeout:g} s"
                              f" is not below the interval {interval:g} s: v6lb uses"
                              f" {interval / 2:g} s"))  # fmt: skip
            timeout = interval / 2
        elif interval is None and timeout >= 2.0:
            out["interval"] = min(timeout * 2, 3600.0)
            timeout = min(timeout, 1800.0)
        out["timeout"] = timeout
    if h.rise is not None:
        out["rise"] = min(max(h.rise, 1), 100)
    if h.fall is not None:
        out["fall"] = min(max(h.fall, 1), 100)
    if h.expect:
        codes: list[object] = []
        for part in h.expect.replace(" ", "").split(","):
            if re.fullmatch(r"[1-5][0-9][0-9]", part):
                codes.append(int(part))
            elif re.fullmatch(r"[1-5][0-9][0-9]-[1-5][0-9][0-9]", part):
                codes.append(part)
        if codes:
            out["expect"] = codes
    if h.type == "http" and h.path is not None and not _PATH_OK.fullmatch(h.path):
        notes.append(Note(ref, "metadata.annotations", f"health-check path {h.path!r} is not"
                          " one v6lb can send: checked as /"))  # fmt: skip
        out["path"] = "/"
    return out


_PATH_OK: Final = re.compile(r"/(?:[A-Za-z0-9\-._~!&()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")


def _tunnel_end_points(
    out: list[_Vip],
    by_node: dict[str, list[IPv6Address]],
    subnets: Mapping[str, IPv6Network],
    private: IPv6Network,
) -> dict[IPv6Address, IPv6Address]:
    """A tunnel end point per pod of a dsr-ip6ip6 VIP: ``fd00:ee:N::J`` (node N), on the
    pod's lo, routed to it: the kernel decapsulates nothing sent to an interface address."""
    dsr = {b.address for v in out if v.mode == VipMode.DSR_IP6IP6.value for b in v.backends}
    teps: dict[IPv6Address, IPv6Address] = {}
    for n, k in enumerate(sorted(by_node)):
        net = IPv6Network(f"fd00:ee:{n + 1:x}::/64")
        if any(net.overlaps(x) for x in [*subnets.values(), private]):
            raise ManifestError(
                f"the pods use {net}, which the derived topology keeps for DSR tunnel end points",
                "use nat (leave out --prefer dsr)",
            )
        for j, a in enumerate(sorted(x for x in by_node[k] if x in dsr)):
            teps[a] = net[j + 1]
    return teps


def _tep_nodes(
    teps: Mapping[IPv6Address, IPv6Address], by_node: Mapping[str, list[IPv6Address]]
) -> list[tuple[IPv6Address, str]]:
    return [(teps[a], k) for k, addrs in by_node.items() for a in addrs if a in teps]


def _config(out: list[_Vip], notes: list[Note]) -> dict[str, object]:
    by_node: dict[str, list[IPv6Address]] = {}
    pod_names: dict[IPv6Address, str | None] = {}
    for v in out:
        for b in v.backends:
            if b.address not in pod_names:
                pod_names[b.address] = b.pod
                by_node.setdefault(b.node or "", []).append(b.address)
    subnets = _pod_subnets(by_node)
    vip_addrs = {v.address for v in out}
    fixed = [INTERNET, PUBLIC, VIP_POOL]
    for k, net in subnets.items():
        for f in fixed:
            if net.overlaps(f):
                raise ManifestError(
                    f"the pods of node {k or '(none given)'} are in {net}, which the derived"
                    f" topology uses for {f}",
                    "v6lb's lab uses 2001:db8:ffff::/64, 2001:db8:a::/64 and"
                    " 2001:db8:a:100::/64: pods there cannot be modelled",
                )
    private = next(
        (
            c
            for c in _PRIVATE_CANDIDATES
            if not any(c.overlaps(n) for n in subnets.values())
            and not any(a in c for a in vip_addrs)
        ),
        None,
    )
    if private is None:
        raise ManifestError(
            "no free subnet for the nodes' link in fd00:10::/64 to fd00:2f::/64",
            "the pods use all of them: give the pods other addresses",
        )
    igw_private, lb_private = private[1], private[0xA]
    used = {"client", "igw", "lb"}
    node_name = {k: _node_name(k or "node-0", used) for k in sorted(by_node)}
    node_addr = {k: private[0x100 + i] for i, k in enumerate(sorted(by_node))}
    extra = sorted(a for a in vip_addrs if a not in VIP_POOL)
    teps = _tunnel_end_points(out, by_node, subnets, private)
    tep_nets = {k: IPv6Network((a, 64), strict=False) for a, k in _tep_nodes(teps, by_node)}
    tep_routes = [
        {"prefix": str(net), "via": str(node_addr[k])} for k, net in sorted(tep_nets.items())
    ]
    nodes: dict[str, object] = {
        "client": {"type": "host", "role": "client"},
        "igw": {
            "type": "router",
            "role": "gateway",
            "routes": [{"prefix": str(VIP_POOL), "via": str(LB_PUBLIC)}]
            + [{"prefix": f"{a}/128", "via": str(LB_PUBLIC)} for a in extra]
            + [{"prefix": str(subnets[k]), "via": str(node_addr[k])} for k in sorted(by_node)],
        },
        "lb": {
            "type": "lb",
            "role": "lb",
            "inside": ["private"],
            "routes": [{"prefix": "default", "via": str(IGW_PUBLIC)}]
            + [{"prefix": str(subnets[k]), "via": str(node_addr[k])} for k in sorted(by_node)]
            + tep_routes,
        },
    }
    node_routes = [
        {"prefix": "default", "via": str(lb_private)},
        {"prefix": "default", "from": str(VIP_POOL), "via": str(igw_private)},
    ] + [{"prefix": "default", "from": f"{a}/128", "via": str(igw_private)} for a in extra]
    links: list[dict[str, object]] = [
        {"name": "internet", "subnet": str(INTERNET), "mtu": 1500,
         "endpoints": {"client": str(CLIENT_ADDR), "igw": str(IGW_INTERNET)}},
        {"name": "public", "subnet": str(PUBLIC), "mtu": 1500,
         "endpoints": {"igw": str(IGW_PUBLIC), "lb": str(LB_PUBLIC)}},
    ]  # fmt: skip
    private_ends: dict[str, str] = {"igw": str(igw_private), "lb": str(lb_private)}
    pod_nodes: dict[str, object] = {}
    for i, k in enumerate(sorted(by_node)):
        nn = node_name[k]
        own = [{"prefix": f"{teps[a]}/128", "via": str(a)} for a in by_node[k] if a in teps]
        nodes[nn] = {"type": "router", "role": "node", "routes": node_routes + own}
        private_ends[nn] = str(node_addr[k])
        net = subnets[k]
        addrs = sorted(by_node[k])
        taken = set(addrs)
        j = 1
        while net[j] in taken:
            j += 1
        ends: dict[str, str] = {nn: str(net[j])}
        for a in addrs:
            pn = _node_name(pod_names[a] or f"pod-{a}", used)
            pod_nodes[pn] = {"type": "backend", "role": "pod", "on_node": nn}
            if a in teps:  # its tunnel end point, on its lo: `v6lb backend` decapsulates
                pod_nodes[pn]["loopback"] = [str(teps[a])]  # type: ignore[index]
            ends[pn] = str(a)
        links.append({"name": f"pods-{i + 1}", "subnet": str(net), "endpoints": ends})
    links.insert(2, {"name": "private", "subnet": str(private), "mtu": 1500,
                     "endpoints": private_ends})  # fmt: skip
    nodes.update(pod_nodes)
    vips: list[dict[str, object]] = []
    for v in out:
        d: dict[str, object] = {
            "name": v.name,
            "address": str(v.address),
            "ports": _vip_ports(v.exposed),
        }
        if v.protocol != "tcp":
            d["protocol"] = v.protocol
        d["mode"] = v.mode
        d.update(v.options)
        dsr = v.mode == VipMode.DSR_IP6IP6.value
        if dsr:
            d["tunnel_source"] = str(lb_private)
            d["mtu"] = 1500
        if v.health is not None:
            d["health"] = _health(v.health, v, notes)
        bs: list[dict[str, object]] = []
        for b in v.backends:
            e: dict[str, object] = {"address": str(teps[b.address] if dsr else b.address)}
            if not dsr:
                e["port"] = b.port
            if b.drain:
                e["drain"] = True
            bs.append(e)
        d["backends"] = bs
        vips.append(d)
    return {
        "lb": {"instance": "lb", "addresses": [str(LB_PUBLIC), str(lb_private)]},
        "vips": vips,
        "topology": {"nodes": nodes, "links": links},
    }
