"""What the AWS load balancer does with a Service or an Ingress, from its annotations.

Input: one raw Kubernetes object as ``yaml.safe_load`` gives it (a mapping with
``apiVersion``, ``kind``, ``metadata`` and ``spec``). Output: an :class:`AwsLb`, or None
when no AWS load balancer serves the object (a ClusterIP or NodePort Service, another
``loadBalancerClass``, an Ingress of another class).

- :func:`aws_lb_for_service` reads a ``type: LoadBalancer`` Service: the AWS Load Balancer
  Controller's NLB (``loadBalancerClass: service.k8s.aws/nlb``, or the
  ``aws-load-balancer-type`` annotation ``external`` or ``nlb-ip``), or the in-tree cloud
  provider's NLB (``nlb``) or Classic Load Balancer (no annotation, no class).
- :func:`aws_lb_for_ingress` reads an Ingress of the ALB class; ``backend`` is the Service
  it sends to, whose ``alb.ingress.kubernetes.io/*`` annotations win over the Ingress's and
  whose ``ipFamilies`` decide the target group's family.

Each decided setting is a :class:`Rule` (its value, the annotation or field that decided
it, or ``default``) with the :class:`~v6lb.k8s.sources.Source` it rests on. The
:class:`Ipv6Path` says what the load balancer does to an IPv6 client's packet, with the
five answers of ``v6lb explain`` and the v6lb mode that keeps the same property. An
invalid annotation, or two that contradict each other so the controller or AWS refuses
them, raises :class:`AwsAnnotationError` naming ``Kind namespace/name``, the annotation and
the fix; a combination that works but surprises is a warning in :attr:`AwsLb.warnings`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from v6lb.errors import UsageError
from v6lb.k8s import sources as S
from v6lb.k8s.sources import Source

__all__ = [
    "ALB",
    "SVC",
    "AwsAnnotationError",
    "AwsLb",
    "Controller",
    "Finding",
    "HealthCheck",
    "Ipv6Path",
    "LbKind",
    "Rule",
    "annotations_of",
    "aws_lb_for_ingress",
    "aws_lb_for_service",
    "ip_families",
    "is_alb_ingress",
    "ref",
]

SVC: Final = "service.beta.kubernetes.io/"
ALB: Final = "alb.ingress.kubernetes.io/"
LB_CLASS_NLB: Final = "service.k8s.aws/nlb"
DEREGISTRATION_MAX: Final = 3600


class LbKind(StrEnum):
    NLB = "nlb"
    ALB = "alb"
    CLASSIC = "classic"


class Controller(StrEnum):
    LBC = "aws-load-balancer-controller"
    IN_TREE = "in-tree cloud provider"


@dataclass(frozen=True, slots=True)
class Finding:
    """A warning: the object, the annotation or field, what happens and the fix."""

    obj: str
    field: str
    message: str
    fix: str
    source: Source = S.NO_SOURCE

    def __str__(self) -> str:
        return f"{self.obj}: {self.field}: {self.message}; fix: {self.fix}"


class AwsAnnotationError(UsageError):
    """Annotations the controller or AWS would refuse (exit 2). ``findings``: each one."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        self.findings = tuple(findings)
        first = self.findings[0]
        text = "; ".join(f"{f.obj}: {f.field}: {f.message}" for f in self.findings)
        super().__init__(text, first.fix if len(self.findings) == 1 else "see each message")

    def __str__(self) -> str:
        return "; ".join(str(f) for f in self.findings)


@dataclass(frozen=True, slots=True)
class Rule:
    """One decided setting: its value, what decided it, and the source of the rule."""

    setting: str
    value: str
    origin: str  # the annotation or spec field that decided it, or "default"
    source: Source


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """The target group's health check. None: not documented for this load balancer."""

    protocol: str
    port: str  # "traffic-port" or a port number
    path: str | None
    interval_s: int | None
    timeout_s: int | None
    healthy_threshold: int | None
    unhealthy_threshold: int | None
    success_codes: str | None


@dataclass(frozen=True, slots=True)
class Ipv6Path:
    """What the AWS load balancer does with an IPv6 client's packet (``v6lb explain``'s answers).

    ``v6lb_mode`` is the v6lb mode that keeps the property the AWS load balancer gives
    the application (what source it sees, how the client address reaches it), with
    ``proxy_protocol`` (``none`` or ``v2``) and ``forwarded_headers`` for the proxy modes.
    It is set even when ``reachable`` is False (the mode for the clients AWS does serve).
    """

    reachable: bool
    nat66_at_lb: bool
    nat_kind: str
    pod_sees_source: str
    reply_via_lb: bool
    lb_state: str
    client_address_reaches_app: str
    v6lb_mode: str
    proxy_protocol: str
    forwarded_headers: bool
    notes: tuple[str, ...] = ()
    sources: tuple[Source, ...] = ()


@dataclass(frozen=True, slots=True)
class AwsLb:
    """The AWS load balancer in front of one Service or Ingress."""

    obj: str  # "Service namespace/name" or "Ingress namespace/name"
    kind: LbKind
    controller: Controller
    target_type: str  # ip | instance
    scheme: str  # internet-facing | internal
    ip_address_type: str  # ipv4 | dualstack | dualstack-without-public-ipv4 (ALB)
    target_family: str  # ipv4 | ipv6: the target group's IP address type
    protocols: tuple[str, ...]  # the listener protocols: TCP, UDP (NLB), HTTP (ALB)
    proxy_protocol_v2: bool
    preserve_client_ip: bool  # for the TCP target groups (always on for UDP ones)
    deregistration_delay_s: int
    health_check: HealthCheck
    external_traffic_policy: str | None  # the Service's (the backend's, for an Ingress)
    ipv6_client: Ipv6Path
    rules: tuple[Rule, ...]
    warnings: tuple[Finding, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)  # target group attributes

    def rule(self, setting: str) -> Rule:
        for r in self.rules:
            if r.setting == setting:
                return r
        raise KeyError(setting)


# --- reading raw objects -------------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    m = obj.get("metadata")
    return m if isinstance(m, Mapping) else {}


def _spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    s = obj.get("spec")
    return s if isinstance(s, Mapping) else {}


def ref(obj: Mapping[str, Any]) -> str:
    """``Kind namespace/name`` (namespace ``default`` when the manifest leaves it out)."""
    m = _meta(obj)
    return f"{obj.get('kind', '?')} {m.get('namespace') or 'default'}/{m.get('name', '?')}"


def annotations_of(obj: Mapping[str, Any]) -> dict[str, str]:
    a = _meta(obj).get("annotations")
    if not isinstance(a, Mapping):
        return {}
    return {str(k): "" if v is None else str(v).strip() for k, v in a.items()}


def ip_families(svc: Mapping[str, Any]) -> tuple[str, ...]:
    """``spec.ipFamilies``; without it, the families of ``clusterIPs``/``clusterIP``."""
    spec = _spec(svc)
    fams = spec.get("ipFamilies")
    if isinstance(fams, list) and fams:
        return tuple(str(f) for f in fams)
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    out = []
    for ip in ips if isinstance(ips, list) else []:
        if str(ip) in ("None", ""):
            continue
        out.append("IPv6" if ":" in str(ip) else "IPv4")
    return tuple(out)


def _protocols(svc: Mapping[str, Any]) -> tuple[str, ...]:
    ports = _spec(svc).get("ports")
    seen: list[str] = []
    for p in ports if isinstance(ports, list) else []:
        proto = str(p.get("protocol") or "TCP").upper() if isinstance(p, Mapping) else "TCP"
        if proto not in seen:
            seen.append(proto)
    return tuple(seen) or ("TCP",)


def is_alb_ingress(ing: Mapping[str, Any], alb_classes: Collection[str] = ("alb",)) -> bool:
    """An Ingress the controller reconciles: ``ingressClassName`` or the old annotation."""
    cls = _spec(ing).get("ingressClassName")
    if cls is None:
        cls = annotations_of(ing).get("kubernetes.io/ingress.class")
    return cls is not None and str(cls) in alb_classes


class _Reader:
    """Collects rules, warnings and errors for one object."""

    def __init__(self, obj: Mapping[str, Any]) -> None:
        self.name = ref(obj)
        self.rules: list[Rule] = []
        self.warnings: list[Finding] = []
        self.errors: list[Finding] = []

    def rule(self, setting: str, value: object, origin: str, source: Source) -> None:
        self.rules.append(Rule(setting, str(value), origin, source))

    def warn(self, fld: str, message: str, fix: str, source: Source = S.NO_SOURCE) -> None:
        self.warnings.append(Finding(self.name, fld, message, fix, source))

    def error(self, fld: str, message: str, fix: str, source: Source = S.NO_SOURCE) -> None:
        self.errors.append(Finding(self.name, fld, message, fix, source))

    def choice(
        self,
        ann: Mapping[str, str],
        key: str,
        allowed: Sequence[str],
        default: str,
        setting: str,
        source: Source,
        default_source: Source | None = None,
    ) -> str:
        if key in ann:
            v = ann[key]
            if v not in allowed:
                self.error(
                    key,
                    f"{v!r} is not a valid value",
                    f"use one of {', '.join(allowed)}",
                    source,
                )
                return default
            self.rule(setting, v, key, source)
            return v
        self.rule(setting, default, "default", default_source or source)
        return default

    def integer(
        self, ann: Mapping[str, str], key: str, lo: int, hi: int, setting: str, source: Source
    ) -> int | None:
        if key not in ann:
            return None
        try:
            v = int(ann[key])
        except ValueError:
            self.error(key, f"{ann[key]!r} is not an integer", f"give a number {lo}-{hi}", source)
            return None
        if not lo <= v <= hi:
            self.error(key, f"{v} is out of range", f"give a number {lo}-{hi}", source)
            return None
        self.rule(setting, v, key, source)
        return v

    def done(self) -> None:
        if self.errors:
            raise AwsAnnotationError(self.errors)


def _string_map(r: _Reader, ann: Mapping[str, str], key: str) -> dict[str, str]:
    """A stringMap annotation (``k1=v1,k2=v2``)."""
    raw = ann.get(key, "")
    out: dict[str, str] = {}
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        k, eq, v = part.partition("=")
        if not eq or not k.strip():
            r.error(
                key,
                f"{part!r} is not key=value",
                "write the attributes as key=value pairs separated by commas",
                S.TG_ATTRIBUTES,
            )
            continue
        out[k.strip()] = v.strip()
    return out


def _bool_attr(r: _Reader, key: str, attrs: Mapping[str, str], name: str) -> bool | None:
    if name not in attrs:
        return None
    v = attrs[name].lower()
    if v not in ("true", "false"):
        r.error(f"{key} {name}", f"{attrs[name]!r} is not true or false", "use true or false")
        return None
    return v == "true"


# --- behaviour for an IPv6 client ----------------------------------------------------------

_NLB_STATE: Final = (
    "a flow table entry per connection (5-tuple, its target), kept until the connection "
    "closes or is idle 350 s (TCP) / 120 s (UDP); how the table is shared between the NLB's "
    "nodes and what a flow becomes when a node fails is not documented by AWS"
)
_ALB_STATE: Final = (
    "two TCP connections per client connection (client side and target side) and the HTTP "
    "exchange in between; the ALB's internals are not documented by AWS"
)


def _kube_proxy_hop(etp: str, lb_addr: str) -> tuple[str, str]:
    """(what the pod sees, note) after the NodePort hop for an instance target."""
    if etp == "Local":
        return (
            f"{lb_addr} (kube-proxy keeps the source with externalTrafficPolicy Local)",
            "externalTrafficPolicy Local: the node delivers only to its own pods and keeps "
            "the source; nodes without a pod fail the health check and get no traffic",
        )
    return (
        "the node's own address: kube-proxy SNATs NodePort traffic with "
        "externalTrafficPolicy Cluster (and may send it on to a pod on another node)",
        "externalTrafficPolicy Cluster: kube-proxy masquerades the source to the node",
    )


def _nlb_path(
    reachable: bool,
    target_type: str,
    family: str,
    preserve: bool,
    pp: bool,
    etp: str,
    extra: Sequence[str] = (),
) -> Ipv6Path:
    notes = list(extra)
    srcs: list[Source] = [S.NLB_FLOW_TABLE, S.NLB_INTERNALS]
    pp_text = "the PROXY v2 header the NLB puts before the data"

    def path(nat66: bool, kind: str, seen: str, reaches: str, mode: str) -> Ipv6Path:
        """The NLB's answers: the reply always crosses it; PROXY v2 as configured."""
        return Ipv6Path(
            reachable=reachable,
            nat66_at_lb=nat66,
            nat_kind=kind,
            pod_sees_source=seen,
            reply_via_lb=True,
            lb_state=_NLB_STATE,
            client_address_reaches_app=reaches,
            v6lb_mode=mode,
            proxy_protocol="v2" if pp else "none",
            forwarded_headers=False,
            notes=tuple(notes),
            sources=tuple(srcs),
        )

    if not reachable and family == "ipv6" and target_type == "instance":
        notes.insert(0, "not served over IPv6: an IPv6 target group takes ip targets only")
    elif not reachable:
        notes.insert(0, "not reachable over IPv6: the load balancer has no IPv6 address")
    if target_type == "instance":
        # IPv6 target groups take IP targets only: the instance target group is IPv4 and
        # the NLB translates the IPv6 client's packet; the node's kube-proxy does the rest.
        seen, note = _kube_proxy_hop(etp, "a private IPv4 address of the NLB")
        notes.append(note)
        srcs += [S.PRESERVE_TABLE, S.NLB_INSTANCE_MODE, S.ETP_LOCAL, S.NLB_INSTANCE_CLUSTER]
        if pp:
            srcs.append(S.PROXY_V2_FAMILY)
        return path(
            False,
            "IPv6-to-IPv4 translation at the NLB, then NodePort DNAT on the node",
            seen,
            pp_text if pp else "it does not reach the application",
            "proxy-l4",
        )
    if family == "ipv4":
        srcs += [S.TRANSLATED]
        if pp:
            srcs.append(S.PROXY_V2_FAMILY)
        notes.append("the pods are IPv4: the NLB translates the IPv6 client's packet to IPv4")
        return path(
            False,
            "IPv6-to-IPv4 translation at the NLB (source and destination)",
            "a private IPv4 address of the NLB",
            pp_text if pp else "it does not reach the application",
            "proxy-l4",
        )
    if preserve:
        srcs += [S.PRESERVE_TABLE]
        how = "the TCP/UDP source address of every packet"
        if pp:
            how += ", and the PROXY v2 header"
            srcs.append(S.PROXY_AND_PRESERVE)
            notes.append(
                "PROXY v2 with client IP preservation: the pod sees the client both in the "
                "packets and in the header; v6lb models the header (proxy-l4 v2)"
            )
        return path(
            True,
            "stateful destination NAT (the NLB's address to the pod's)",
            "the client's IPv6 address (client IP preservation)",
            how,
            "proxy-l4" if pp else "nat",
        )
    srcs += [S.PRESERVE_OFF_TABLE, S.NLB_IP_NO_CLIENT]
    notes.append(
        "the NLB rewrites both addresses and does not end the TCP connection; v6lb's "
        "proxy-l4 keeps the same property (the pod sees the load balancer's address)"
    )
    return path(
        True,
        "stateful destination+source NAT (to the pod, from the NLB's private address)",
        "a private IPv6 address of the NLB",
        pp_text if pp else "it does not reach the application",
        "proxy-l4",
    )


def _alb_path(reachable: bool, target_type: str, family: str, etp: str) -> Ipv6Path:
    notes: list[str] = []
    srcs: list[Source] = [S.ALB_SOURCE, S.ALB_XFF, S.ALB_STATE]
    if not reachable and family == "ipv6" and target_type == "instance":
        notes.append("not served over IPv6: an IPv6 target group takes ip targets only")
    elif not reachable:
        notes.append("not reachable over IPv6: the ALB's ip-address-type is ipv4")
    if target_type == "instance":
        seen, note = _kube_proxy_hop(etp, "a private IPv4 address of the ALB")
        notes.append(note)
        srcs += [S.EKS_IPV6_IP_TARGETS, S.ETP_LOCAL]
    else:
        seen = f"a private {'IPv6' if family == 'ipv6' else 'IPv4'} address of the ALB"
    return Ipv6Path(
        reachable=reachable,
        nat66_at_lb=False,
        nat_kind="new connection (proxy)",
        pod_sees_source=seen,
        reply_via_lb=True,
        lb_state=_ALB_STATE,
        client_address_reaches_app="the X-Forwarded-For request header (the ALB appends it)",
        v6lb_mode="proxy-l7",
        proxy_protocol="none",
        forwarded_headers=True,
        notes=tuple(notes),
        sources=tuple(srcs),
    )


# --- Services ------------------------------------------------------------------------------


def aws_lb_for_service(svc: Mapping[str, Any]) -> AwsLb | None:
    """The AWS load balancer for a ``type: LoadBalancer`` Service, or None.

    Raises :class:`AwsAnnotationError` for annotations the controller or AWS refuses.
    """
    spec = _spec(svc)
    if spec.get("type") != "LoadBalancer":
        return None
    ann = annotations_of(svc)
    r = _Reader(svc)
    cls = spec.get("loadBalancerClass")
    lb_type_key = SVC + "aws-load-balancer-type"
    lb_type = ann.get(lb_type_key)
    if cls is not None:
        if cls != LB_CLASS_NLB:
            return None
        r.rule("controller", Controller.LBC, "spec.loadBalancerClass", S.LB_CLASS)
        return _lbc_nlb(svc, ann, r, default_target_source=S.TARGET_TYPE_CLASS)
    if lb_type in ("external", "nlb-ip"):
        r.rule("controller", Controller.LBC, lb_type_key, S.LB_TYPE)
        return _lbc_nlb(svc, ann, r, default_target_source=S.TARGET_TYPE_DEFAULT)
    if lb_type in (None, "", "nlb"):
        return _in_tree(svc, ann, r, LbKind.NLB if lb_type == "nlb" else LbKind.CLASSIC)
    r.error(
        lb_type_key,
        f"{lb_type!r} is not a load balancer type",
        "use external (the AWS Load Balancer Controller; nlb-ip is its old form), or nlb for "
        "the in-tree provider's NLB",
        S.LB_TYPE,
    )
    r.done()
    return None  # pragma: no cover - done() raised


def _target_groups(
    r: _Reader, ann: Mapping[str, str], key: str, protocols: Sequence[str], target_type: str
) -> tuple[dict[str, str], bool, bool, int]:
    """The NLB's target group attributes: (attributes, preserve, proxy v2, deregistration)."""
    attrs = _string_map(r, ann, key)
    udp = any(p in ("UDP", "TCP_UDP") for p in protocols)
    preserve = _bool_attr(r, key, attrs, "preserve_client_ip.enabled")
    if preserve is False and udp:
        r.error(
            f"{key} preserve_client_ip.enabled",
            "client IP preservation cannot be disabled for UDP target groups",
            "remove preserve_client_ip.enabled=false, or serve UDP from another Service",
            S.PRESERVE_UDP,
        )
    if preserve is None:
        preserve = target_type == "instance" or (udp and "TCP" not in protocols)
        r.rule("preserve client IP", preserve, "default", S.PRESERVE_DEFAULT)
    else:
        r.rule(
            "preserve client IP", preserve, f"{key} preserve_client_ip.enabled", S.PRESERVE_DEFAULT
        )
    pp_key = SVC + "aws-load-balancer-proxy-protocol"
    pp_attr = _bool_attr(r, key, attrs, "proxy_protocol_v2.enabled")
    if pp_key in ann:
        if ann[pp_key] != "*":
            r.error(
                pp_key,
                f"{ann[pp_key]!r} is not valid",
                'use "*" (PROXY v2 on every port)',
                S.PROXY_PROTOCOL,
            )
        pp = True
        r.rule("proxy protocol v2", True, pp_key, S.PROXY_PROTOCOL)
        if pp_attr is False:
            r.warn(
                f"{key} proxy_protocol_v2.enabled",
                "false is ignored: the aws-load-balancer-proxy-protocol annotation takes "
                "precedence and turns PROXY v2 on",
                "remove one of the two",
                S.PROXY_PROTOCOL,
            )
    elif pp_attr is not None:
        pp = pp_attr
        r.rule("proxy protocol v2", pp, f"{key} proxy_protocol_v2.enabled", S.TG_ATTRIBUTES)
    else:
        pp = False
        r.rule("proxy protocol v2", False, "default", S.PROXY_PROTOCOL)
    dereg = 300
    dkey = "deregistration_delay.timeout_seconds"
    if dkey in attrs:
        try:
            dereg = int(attrs[dkey])
        except ValueError:
            r.error(
                f"{key} {dkey}",
                f"{attrs[dkey]!r} is not an integer",
                "give 0-3600 seconds",
                S.TG_ATTRIBUTES,
            )
        else:
            if not 0 <= dereg <= DEREGISTRATION_MAX:
                r.error(
                    f"{key} {dkey}",
                    f"{dereg} is out of range",
                    "give 0-3600 seconds",
                    S.TG_ATTRIBUTES,
                )
        r.rule("deregistration delay", dereg, f"{key} {dkey}", S.TG_ATTRIBUTES)
    else:
        r.rule("deregistration delay", dereg, "default", S.DEREGISTRATION_DEFAULT)
    return attrs, preserve, pp, dereg


def _scheme(r: _Reader, ann: Mapping[str, str]) -> str:
    key = SVC + "aws-load-balancer-scheme"
    internal_key = SVC + "aws-load-balancer-internal"
    internal = ann.get(internal_key)
    if internal is not None and internal.lower() not in ("true", "false"):
        r.error(internal_key, f"{internal!r} is not true or false", "use true or false")
        internal = None
    if key in ann or internal is None:
        scheme = r.choice(
            ann, key, ("internal", "internet-facing"), "internal", "scheme", S.NLB_SCHEME
        )
        if internal is not None and (internal.lower() == "true") != (scheme == "internal"):
            r.warn(
                internal_key,
                f"{internal} is ignored: aws-load-balancer-scheme {scheme} takes precedence",
                "remove the deprecated aws-load-balancer-internal annotation",
                S.NLB_INTERNAL_DEPRECATED,
            )
        return scheme
    scheme = "internal" if internal.lower() == "true" else "internet-facing"
    r.rule("scheme", scheme, internal_key, S.NLB_INTERNAL_DEPRECATED)
    return scheme


def _family(r: _Reader, fams: Sequence[str], origin: str) -> str:
    if not fams:
        r.rule("target family", "ipv4", "default (no spec.ipFamilies)", S.TG_FAMILY)
        return "ipv4"
    family = "ipv6" if "IPv6" in fams else "ipv4"
    r.rule("target family", family, origin, S.TG_FAMILY)
    return family


def _reach_warnings(r: _Reader, scheme: str, ip_type: str, ip_key: str, scheme_key: str) -> None:
    if scheme == "internal":
        r.warn(
            scheme_key,
            "the load balancer is internal: a client on the internet cannot reach it",
            f"set {scheme_key}: internet-facing if internet clients should reach it",
            S.NLB_SCHEME if scheme_key.startswith(SVC) else S.ALB_SCHEME,
        )
    if ip_type == "ipv4":
        r.warn(
            ip_key,
            "ipv4: the load balancer has no IPv6 address, so an IPv6 client cannot connect",
            f"set {ip_key}: dualstack",
            S.NLB_IP_ADDRESS_TYPE if ip_key.startswith(SVC) else S.ALB_IP_ADDRESS_TYPE,
        )


def _lbc_nlb(
    svc: Mapping[str, Any], ann: Mapping[str, str], r: _Reader, default_target_source: Source
) -> AwsLb:
    spec = _spec(svc)
    protocols = _protocols(svc)
    etp = str(spec.get("externalTrafficPolicy") or "Cluster")
    type_key = SVC + "aws-load-balancer-type"
    tt_key = SVC + "aws-load-balancer-nlb-target-type"
    if ann.get(type_key) == "nlb-ip":
        target_type = "ip"
        r.rule("target type", "ip", type_key, S.NLB_IP_COMPAT)
        if tt_key in ann and ann[tt_key] != "ip":
            r.warn(
                tt_key,
                f"{ann[tt_key]!r} is ignored: aws-load-balancer-type nlb-ip means ip",
                f"use aws-load-balancer-type: external with {tt_key}",
                S.NLB_IP_COMPAT,
            )
    else:
        target_type = r.choice(
            ann,
            tt_key,
            ("ip", "instance"),
            "instance",
            "target type",
            S.TARGET_TYPE_VALUES,
            default_target_source,
        )
    if target_type == "instance" and spec.get("allocateLoadBalancerNodePorts") is False:
        for p in spec.get("ports") or []:
            if isinstance(p, Mapping) and not p.get("nodePort"):
                r.error(
                    "spec.allocateLoadBalancerNodePorts",
                    f"false leaves port {p.get('port')} without a NodePort, which instance "
                    "targets need",
                    f"set nodePort on every port, or use {tt_key}: ip",
                    S.INSTANCE_NODEPORT,
                )
                break
    scheme = _scheme(r, ann)
    ip_key = SVC + "aws-load-balancer-ip-address-type"
    if ann.get(ip_key) == "dualstack-without-public-ipv4":
        r.error(
            ip_key,
            "dualstack-without-public-ipv4 is for Application Load Balancers",
            "use dualstack",
            S.IP_ADDRESS_TYPE_API,
        )
        ip_type = "dualstack"
    else:
        ip_type = r.choice(
            ann, ip_key, ("ipv4", "dualstack"), "ipv4", "ip address type", S.NLB_IP_ADDRESS_TYPE
        )
    family = _family(r, ip_families(svc), "spec.ipFamilies")
    if family == "ipv6" and ip_type != "dualstack":
        r.error(
            ip_key,
            f"{ip_type}: the Service has IPv6 in spec.ipFamilies, so the controller builds an "
            "IPv6 target group, which needs a dualstack load balancer (the controller "
            "refuses: 'unsupported IPv6 configuration, lb not dual-stack')",
            f"set {ip_key}: dualstack",
            S.TG_FAMILY,
        )
    tga_key = SVC + "aws-load-balancer-target-group-attributes"
    attrs, preserve, pp, dereg = _target_groups(r, ann, tga_key, protocols, target_type)
    extra: list[str] = []
    if target_type == "instance" and family == "ipv6":
        r.warn(
            tt_key,
            "instance targets with an IPv6 Service: IPv6 target groups take IP targets only",
            f"set {tt_key}: ip",
            S.IPV6_TG_IP_ONLY,
        )
        extra.append("the IPv6 target group cannot hold instance targets: no path to the pods")
    if pp and target_type == "instance" and etp == "Local":
        r.warn(
            SVC + "aws-load-balancer-proxy-protocol",
            "PROXY v2 with instance targets and externalTrafficPolicy Local: the HTTP health "
            "check goes to kube-proxy's health check port, which does not speak PROXY v2",
            f"use {tt_key}: ip, or externalTrafficPolicy Cluster",
            S.PROXY_LOCAL_INSTANCE,
        )
    hc = _nlb_health(r, ann, etp)
    _reach_warnings(r, scheme, ip_type, ip_key, SVC + "aws-load-balancer-scheme")
    r.done()
    reachable = ip_type == "dualstack" and not (target_type == "instance" and family == "ipv6")
    path = _nlb_path(reachable, target_type, family, preserve, pp, etp, extra)
    return AwsLb(
        obj=r.name,
        kind=LbKind.NLB,
        controller=Controller.LBC,
        target_type=target_type,
        scheme=scheme,
        ip_address_type=ip_type,
        target_family=family,
        protocols=protocols,
        proxy_protocol_v2=pp,
        preserve_client_ip=preserve,
        deregistration_delay_s=dereg,
        health_check=hc,
        external_traffic_policy=etp,
        ipv6_client=path,
        rules=tuple(r.rules),
        warnings=tuple(r.warnings),
        attributes=attrs,
    )


def _nlb_health(r: _Reader, ann: Mapping[str, str], etp: str) -> HealthCheck:
    p = SVC + "aws-load-balancer-healthcheck-"
    proto_default = "HTTP" if etp == "Local" else "TCP"
    proto = r.choice(
        {k: v.upper() for k, v in ann.items() if k == p + "protocol"},
        p + "protocol",
        ("TCP", "HTTP", "HTTPS"),
        proto_default,
        "health check protocol",
        S.NLB_HEALTH,
    )
    if etp == "Local" and proto == "TCP":
        r.warn(
            p + "protocol",
            "tcp with externalTrafficPolicy Local: the health check must ask kube-proxy's "
            "health check port over HTTP which nodes have a ready pod",
            "use http (the default with Local)",
            S.NLB_HEALTH,
        )
    port = ann.get(p + "port") or ("healthCheckNodePort" if etp == "Local" else "traffic-port")
    if port not in ("traffic-port", "healthCheckNodePort") and not port.isdigit():
        r.error(
            p + "port",
            f"{port!r} is not a port",
            "give a port number or traffic-port",
            S.NLB_HEALTH_PORT,
        )
    r.rule(
        "health check port", port, p + "port" if p + "port" in ann else "default", S.NLB_HEALTH_PORT
    )
    path = ann.get(p + "path") or ("/" if proto != "TCP" else None)
    healthy = r.integer(ann, p + "healthy-threshold", 2, 10, "healthy threshold", S.NLB_HEALTH)
    unhealthy = r.integer(
        ann, p + "unhealthy-threshold", 2, 10, "unhealthy threshold", S.NLB_HEALTH
    )
    interval = r.integer(ann, p + "interval", 5, 300, "health check interval", S.NLB_HEALTH)
    timeout = r.integer(ann, p + "timeout", 2, 120, "health check timeout", S.NLB_HEALTH)
    return HealthCheck(
        protocol=proto,
        port=port,
        path=path,
        interval_s=10 if interval is None else interval,
        timeout_s=10 if timeout is None else timeout,
        healthy_threshold=3 if healthy is None else healthy,
        unhealthy_threshold=3 if unhealthy is None else unhealthy,
        success_codes=(ann.get(p + "success-codes") or "200-399") if proto != "TCP" else None,
    )


def _in_tree(svc: Mapping[str, Any], ann: Mapping[str, str], r: _Reader, kind: LbKind) -> AwsLb:
    """The in-tree cloud provider's CLB or NLB: instance targets, IPv4 only."""
    spec = _spec(svc)
    etp = str(spec.get("externalTrafficPolicy") or "Cluster")
    type_key = SVC + "aws-load-balancer-type"
    r.rule("controller", Controller.IN_TREE, type_key if type_key in ann else "default", S.LEGACY)
    r.rule("kind", kind, type_key if type_key in ann else "default", S.IN_TREE_TYPE)
    r.rule("target type", "instance", "in-tree provider", S.IN_TREE_TYPE)
    internal = ann.get(SVC + "aws-load-balancer-internal", "").lower() == "true"
    scheme = "internal" if internal else "internet-facing"
    r.rule(
        "scheme",
        scheme,
        "default" if not internal else SVC + "aws-load-balancer-internal",
        S.IN_TREE_INTERNAL,
    )
    no_v6 = S.CLB_IPV4_ONLY if kind is LbKind.CLASSIC else S.IN_TREE_NO_IPV6
    r.rule("ip address type", "ipv4", "in-tree provider", no_v6)
    pp_key = SVC + "aws-load-balancer-proxy-protocol"
    pp = ann.get(pp_key) == "*"
    if pp_key in ann and not pp:
        r.error(pp_key, f"{ann[pp_key]!r} is not valid", 'use "*"', S.IN_TREE_TYPE)
    r.warn(
        type_key,
        f"no annotation for the AWS Load Balancer Controller: the in-tree provider makes a "
        f"{'Classic Load Balancer' if kind is LbKind.CLASSIC else 'Network Load Balancer'} "
        "with IPv4 addresses only, so an IPv6 client cannot connect",
        "recreate the Service with spec.loadBalancerClass: service.k8s.aws/nlb (or the "
        "annotation aws-load-balancer-type: external) and aws-load-balancer-ip-address-type: "
        "dualstack",
        no_v6,
    )
    r.done()
    preserve = kind is LbKind.NLB
    if kind is LbKind.CLASSIC:
        seen, note = _kube_proxy_hop(etp, "a private IPv4 address of the CLB")
        path = Ipv6Path(
            reachable=False,
            nat66_at_lb=False,
            nat_kind="new connection (the CLB's TCP listener proxies)",
            pod_sees_source=seen,
            reply_via_lb=True,
            lb_state="two TCP connections per client connection; not documented further by AWS",
            client_address_reaches_app=(
                "the PROXY header the CLB sends" if pp else "it does not reach the application"
            ),
            v6lb_mode="proxy-l4",
            proxy_protocol="v2" if pp else "none",
            forwarded_headers=False,
            notes=(
                "not reachable over IPv6: a Classic Load Balancer in a VPC is IPv4-only",
                note,
                *(
                    ("the CLB's PROXY header version: no source found; v6lb sends v2",)
                    if pp
                    else ()
                ),
            ),
            sources=(S.CLB_IPV4_ONLY, S.ETP_LOCAL),
        )
    else:
        path = _nlb_path(False, "instance", "ipv4", True, pp, etp)
    return AwsLb(
        obj=r.name,
        kind=kind,
        controller=Controller.IN_TREE,
        target_type="instance",
        scheme=scheme,
        ip_address_type="ipv4",
        target_family="ipv4",
        protocols=_protocols(svc),
        proxy_protocol_v2=pp,
        preserve_client_ip=preserve,
        deregistration_delay_s=300,
        health_check=HealthCheck("TCP", "traffic-port", None, None, None, None, None, None),
        external_traffic_policy=etp,
        ipv6_client=path,
        rules=tuple(r.rules),
        warnings=tuple(r.warnings),
    )


# --- Ingresses -----------------------------------------------------------------------------

_NLB_ONLY_ATTRIBUTES: Final = ("proxy_protocol_v2.enabled", "preserve_client_ip.enabled")


def aws_lb_for_ingress(
    ing: Mapping[str, Any],
    backend: Mapping[str, Any] | None = None,
    alb_classes: Collection[str] = ("alb",),
) -> AwsLb | None:
    """The ALB for an Ingress of the ALB class (``alb_classes``), or None.

    ``backend``: the Service the Ingress sends to (one target group). Its
    ``alb.ingress.kubernetes.io/*`` annotations win over the Ingress's; its ``ipFamilies``
    decide the target group's family (IPv4 when no backend is given). Call once per
    backend Service when an Ingress has several. Raises :class:`AwsAnnotationError`.
    """
    if not is_alb_ingress(ing, alb_classes):
        return None
    r = _Reader(ing)
    r.rule("controller", Controller.LBC, "spec.ingressClassName", S.ALB_CLASS)
    ann = annotations_of(ing)
    svc_ann = annotations_of(backend) if backend is not None else {}
    merged = {**ann, **{k: v for k, v in svc_ann.items() if k.startswith(ALB)}}
    tt_key = ALB + "target-type"
    target_type = r.choice(
        merged,
        tt_key,
        ("ip", "instance"),
        "instance",
        "target type",
        S.ALB_TARGET_TYPE,
        S.TARGET_TYPE_DEFAULT,
    )
    if tt_key in svc_ann:
        r.rules[-1] = Rule(
            "target type",
            target_type,
            f"{tt_key} (on {ref(backend or {})})",
            S.ALB_SERVICE_PRIORITY,
        )
    scheme = r.choice(
        ann, ALB + "scheme", ("internal", "internet-facing"), "internal", "scheme", S.ALB_SCHEME
    )
    ip_key = ALB + "ip-address-type"
    ip_type = r.choice(
        ann,
        ip_key,
        ("ipv4", "dualstack", "dualstack-without-public-ipv4"),
        "ipv4",
        "ip address type",
        S.ALB_IP_ADDRESS_TYPE,
    )
    if ip_type == "dualstack-without-public-ipv4" and scheme == "internal":
        r.warn(
            ip_key,
            "dualstack-without-public-ipv4 is a setting for internet-facing ALBs",
            "use dualstack for an internal ALB",
            S.ALB_DUALSTACK_NO_PUBLIC,
        )
    etp = None
    if backend is not None:
        family = _family(r, ip_families(backend), f"spec.ipFamilies of {ref(backend)}")
        etp = str(_spec(backend).get("externalTrafficPolicy") or "Cluster")
        btype = _spec(backend).get("type") or "ClusterIP"
        if target_type == "instance" and btype not in ("NodePort", "LoadBalancer"):
            r.error(
                tt_key,
                f"instance targets need a NodePort or LoadBalancer Service, and {ref(backend)} "
                f"is {btype}",
                f"set {tt_key}: ip, or make the Service type NodePort",
                S.ALB_INSTANCE_SERVICE,
            )
    else:
        family = _family(r, (), "")
    if family == "ipv6" and ip_type == "ipv4":
        r.error(
            ip_key,
            "ipv4: the backend Service is IPv6, so the controller builds an IPv6 target group, "
            "which needs a dualstack ALB ('unsupported IPv6 configuration, lb not dual-stack')",
            f"set {ip_key}: dualstack",
            S.TG_FAMILY,
        )
    pp_key = SVC + "aws-load-balancer-proxy-protocol"
    if pp_key in ann:
        r.warn(
            pp_key,
            "ignored on an Ingress: an ALB sends no PROXY protocol header",
            "remove it; the ALB passes the client address in X-Forwarded-For",
            S.ALB_XFF,
        )
    tga_key = ALB + "target-group-attributes"
    attrs = _string_map(r, merged, tga_key)
    for bad in _NLB_ONLY_ATTRIBUTES:
        if bad in attrs:
            r.error(
                f"{tga_key} {bad}",
                "is a Network Load Balancer target group attribute; "
                "an ALB has no PROXY protocol and always ends the client's connection",
                f"remove {bad}; the client address reaches the pod in X-Forwarded-For",
                S.ALB_NO_PROXY_PROTOCOL,
            )
    dereg = 300
    dkey = "deregistration_delay.timeout_seconds"
    if dkey in attrs:
        try:
            dereg = int(attrs[dkey])
            if not 0 <= dereg <= DEREGISTRATION_MAX:
                raise ValueError
        except ValueError:
            r.error(
                f"{tga_key} {dkey}",
                f"{attrs[dkey]!r} is not 0-3600",
                "give 0-3600 seconds",
                S.TG_ATTRIBUTES,
            )
            dereg = 300
        r.rule("deregistration delay", dereg, f"{tga_key} {dkey}", S.TG_ATTRIBUTES)
    else:
        r.rule("deregistration delay", dereg, "default", S.DEREGISTRATION_DEFAULT)
    if target_type == "instance" and family == "ipv6":
        r.warn(
            tt_key,
            "instance targets with an IPv6 backend Service: over IPv6 an ALB "
            "reaches IP targets only",
            f"set {tt_key}: ip",
            S.EKS_IPV6_IP_TARGETS,
        )
    hc = _alb_health(r, merged)
    _reach_warnings(r, scheme, ip_type, ip_key, ALB + "scheme")
    r.done()
    reachable = ip_type != "ipv4" and not (target_type == "instance" and family == "ipv6")
    return AwsLb(
        obj=r.name,
        kind=LbKind.ALB,
        controller=Controller.LBC,
        target_type=target_type,
        scheme=scheme,
        ip_address_type=ip_type,
        target_family=family,
        protocols=("HTTP",),
        proxy_protocol_v2=False,
        preserve_client_ip=False,
        deregistration_delay_s=dereg,
        health_check=hc,
        external_traffic_policy=etp,
        ipv6_client=_alb_path(reachable, target_type, family, etp or "Cluster"),
        rules=tuple(r.rules),
        warnings=tuple(r.warnings),
        attributes=attrs,
    )


def _alb_health(r: _Reader, ann: Mapping[str, str]) -> HealthCheck:
    proto = r.choice(
        {k: v.upper() for k, v in ann.items() if k == ALB + "healthcheck-protocol"},
        ALB + "healthcheck-protocol",
        ("HTTP", "HTTPS"),
        "HTTP",
        "health check protocol",
        S.ALB_HEALTH,
    )
    port = ann.get(ALB + "healthcheck-port") or "traffic-port"
    if port != "traffic-port" and not port.isdigit():
        r.error(
            ALB + "healthcheck-port",
            f"{port!r} is not a port",
            "give a port number or traffic-port",
            S.ALB_HEALTH,
        )
    interval = r.integer(
        ann, ALB + "healthcheck-interval-seconds", 5, 300, "health check interval", S.ALB_HEALTH
    )
    timeout = r.integer(
        ann, ALB + "healthcheck-timeout-seconds", 2, 120, "health check timeout", S.ALB_HEALTH
    )
    healthy = r.integer(
        ann, ALB + "healthy-threshold-count", 2, 10, "healthy threshold", S.ALB_HEALTH
    )
    unhealthy = r.integer(
        ann, ALB + "unhealthy-threshold-count", 2, 10, "unhealthy threshold", S.ALB_HEALTH
    )
    return HealthCheck(
        protocol=proto,
        port=port,
        path=ann.get(ALB + "healthcheck-path") or "/",
        interval_s=15 if interval is None else interval,
        timeout_s=5 if timeout is None else timeout,
        healthy_threshold=2 if healthy is None else healthy,
        unhealthy_threshold=2 if unhealthy is None else unhealthy,
        success_codes=ann.get(ALB + "success-codes") or "200",
    )
