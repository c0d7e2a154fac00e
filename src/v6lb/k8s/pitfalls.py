"""The known traps of a Kubernetes service behind an AWS load balancer, found in manifests.

:func:`pitfalls` reads every raw object at once (Services, EndpointSlices, Ingresses,
Pods, Deployments, ConfigMaps; ``kind: List`` wrappers are opened) and returns one
:class:`Pitfall` per trap: the object (``Kind namespace/name``), the field, the reason and
the fix, with the public source of the rule. Each kind of trap has a ``code``:

- ``etp-local``: ``externalTrafficPolicy: Local``, and where the client address is still
  lost (ip targets: the NLB, not kube-proxy, decides; instance targets: the IPv6 client
  arrives as the NLB's IPv4 address; any: nodes without a pod take no traffic).
- ``etp-cluster-snat``: instance targets with ``Cluster``: kube-proxy SNATs to the node.
- ``instance-ipv6``: NLB instance targets for an IPv6 Service or IPv6 endpoints.
- ``dualstack-udp``: a dualstack NLB with UDP ports.
- ``proxy-protocol-expected`` / ``proxy-protocol-unexpected``: the application expects a
  PROXY header the load balancer does not send, or the reverse. What the application
  expects is not in any Kubernetes field, so this is a heuristic over what the manifests
  say, in this order: the annotation ``v6lb.io/expects-proxy-protocol: "true"|"false"`` on
  the Service, a Pod or a Deployment (or its pod template); an ingress-nginx ConfigMap's
  ``use-proxy-protocol`` when a selected container's args name it (``--configmap=NS/NAME``);
  a container arg that turns PROXY on (``accept-proxy``, ``proxy_protocol``,
  ``--proxy-protocol``). Without any of these nothing is reported.
- ``no-ready-endpoints``: a Service whose EndpointSlices hold no ready endpoint.
- ``terminating-serving``: endpoints that are terminating and still serving.
- ``deregistration-vs-grace``: the target group's deregistration delay outlives the pods'
  ``terminationGracePeriodSeconds``.
- ``alb-instance-ipv6``: an ALB Ingress with ``target-type: instance`` in front of an
  IPv6-only Service.
- ``aws``: the warnings of :func:`~v6lb.k8s.aws.aws_lb_for_service` and
  :func:`~v6lb.k8s.aws.aws_lb_for_ingress` not already reported under a code above.

Never raises on bad input: an object whose annotations :mod:`v6lb.k8s.aws` refuses is
skipped here (the caller reports that error from ``aws_lb_for_*``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from v6lb.k8s import sources as S
from v6lb.k8s.aws import (
    ALB,
    SVC,
    AwsAnnotationError,
    AwsLb,
    LbKind,
    annotations_of,
    aws_lb_for_ingress,
    aws_lb_for_service,
    ip_families,
    is_alb_ingress,
    ref,
)
from v6lb.k8s.sources import Source

__all__ = ["EXPECTS_PROXY", "Pitfall", "pitfalls"]

EXPECTS_PROXY: Final = "v6lb.io/expects-proxy-protocol"
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
GRACE_DEFAULT_S: Final = 30
_PROXY_ARGS: Final = ("accept-proxy", "proxy_protocol", "--proxy-protocol")


@dataclass(frozen=True, slots=True)
class Pitfall:
    code: str
    obj: str  # "Kind namespace/name"
    field: str
    reason: str
    fix: str
    source: Source = S.NO_SOURCE

    def __str__(self) -> str:
        return f"{self.obj}: {self.field}: {self.reason}; fix: {self.fix}"


def _m(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = obj.get(key)
    return v if isinstance(v, Mapping) else {}


def _ns(obj: Mapping[str, Any]) -> str:
    return str(_m(obj, "metadata").get("namespace") or "default")


def _name(obj: Mapping[str, Any]) -> str:
    return str(_m(obj, "metadata").get("name") or "?")


def _flatten(objects: Sequence[Any]) -> Iterator[Mapping[str, Any]]:
    for o in objects:
        if not isinstance(o, Mapping):
            continue
        if o.get("kind") == "List" or (isinstance(o.get("items"), list) and "kind" not in o):
            yield from _flatten(o.get("items") or [])
        elif o.get("kind"):
            yield o


@dataclass(frozen=True, slots=True)
class _Workload:
    """A Pod, or a Deployment's pod template: what selects it and what it says."""

    obj: str
    namespace: str
    labels: Mapping[str, Any]
    annotations: Mapping[str, str]
    spec: Mapping[str, Any]


class _Index:
    def __init__(self, objects: Sequence[Any]) -> None:
        self.services: list[Mapping[str, Any]] = []
        self.slices: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        self.any_slices = False
        self.ingresses: list[Mapping[str, Any]] = []
        self.workloads: list[_Workload] = []
        self.configmaps: dict[tuple[str, str], Mapping[str, Any]] = {}
        for o in _flatten(objects):
            kind = o.get("kind")
            if kind == "Service":
                self.services.append(o)
            elif kind == "EndpointSlice":
                self.any_slices = True
                svc = _m(_m(o, "metadata"), "labels").get(SERVICE_NAME_LABEL)
                if svc:
                    self.slices.setdefault((_ns(o), str(svc)), []).append(o)
            elif kind == "Ingress":
                self.ingresses.append(o)
            elif kind == "Pod":
                meta = _m(o, "metadata")
                self.workloads.append(
                    _Workload(ref(o), _ns(o), _m(meta, "labels"), annotations_of(o), _m(o, "spec"))
                )
            elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
                tmpl = _m(_m(o, "spec"), "template")
                ann = {**annotations_of(o), **annotations_of(tmpl)}
                labels = _m(_m(tmpl, "metadata"), "labels")
                self.workloads.append(_Workload(ref(o), _ns(o), labels, ann, _m(tmpl, "spec")))
            elif kind == "ConfigMap":
                self.configmaps[(_ns(o), _name(o))] = o
        self.by_name = {(_ns(s), _name(s)): s for s in self.services}

    def selected(self, svc: Mapping[str, Any]) -> list[_Workload]:
        sel = _m(svc, "spec").get("selector")
        if not isinstance(sel, Mapping) or not sel:
            return []
        ns = _ns(svc)
        return [
            w
            for w in self.workloads
            if w.namespace == ns and all(str(w.labels.get(k)) == str(v) for k, v in sel.items())
        ]

    def endpoints(self, svc: Mapping[str, Any]) -> list[tuple[Mapping[str, Any], int, Any]]:
        out = []
        for sl in self.slices.get((_ns(svc), _name(svc)), []):
            eps = sl.get("endpoints")
            for i, ep in enumerate(eps if isinstance(eps, list) else []):
                if isinstance(ep, Mapping):
                    out.append((sl, i, ep))
        return out


def _conditions(ep: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """(ready, serving, terminating); nil ready is ready, nil serving follows ready."""
    c = _m(ep, "conditions")
    ready = c.get("ready") is not False
    serving = ready if c.get("serving") is None else c.get("serving") is True
    return ready, serving, c.get("terminating") is True


def _expects_proxy(idx: _Index, svc: Mapping[str, Any]) -> tuple[bool, str] | None:
    """What the application expects, and the evidence (the heuristic in the module doc)."""
    own = annotations_of(svc).get(EXPECTS_PROXY)
    if own is not None:
        return own.lower() == "true", f"{ref(svc)} annotation {EXPECTS_PROXY}"
    wls = idx.selected(svc)
    for w in wls:
        if EXPECTS_PROXY in w.annotations:
            return w.annotations[EXPECTS_PROXY].lower() == "true", (
                f"{w.obj} annotation {EXPECTS_PROXY}"
            )
    for w in wls:
        for arg in _args(w):
            if arg.startswith("--configmap="):
                ns, _, name = arg.split("=", 1)[1].partition("/")
                if ns == "$(POD_NAMESPACE)":  # the downward-API form the charts use
                    ns = w.namespace
                cm = idx.configmaps.get((ns, name) if name else (w.namespace, ns))
                data = _m(cm, "data") if cm is not None else {}
                if "use-proxy-protocol" in data:
                    on = str(data["use-proxy-protocol"]).lower() == "true"
                    return on, f"{ref(cm or {})} data.use-proxy-protocol (named by {w.obj})"
    for w in wls:
        for arg in _args(w):
            if any(p in arg for p in _PROXY_ARGS):
                return True, f"{w.obj} container arg {arg!r}"
    return None


def _args(w: _Workload) -> Iterator[str]:
    for c in w.spec.get("containers") or []:
        if isinstance(c, Mapping):
            for a in list(c.get("args") or []) + list(c.get("command") or []):
                yield str(a)


def _grace(w: _Workload) -> int:
    g = w.spec.get("terminationGracePeriodSeconds")
    return int(g) if isinstance(g, int) else GRACE_DEFAULT_S


def _service_lb(svc: Mapping[str, Any]) -> AwsLb | None:
    try:
        return aws_lb_for_service(svc)
    except AwsAnnotationError:
        return None


def _backends(ing: Mapping[str, Any]) -> list[str]:
    spec = _m(ing, "spec")
    names: list[str] = []
    default = _m(_m(spec, "defaultBackend"), "service").get("name")
    if default:
        names.append(str(default))
    for rule in spec.get("rules") or []:
        for p in _m(rule, "http").get("paths") or [] if isinstance(rule, Mapping) else []:
            n = _m(_m(p, "backend"), "service").get("name") if isinstance(p, Mapping) else None
            if n and str(n) not in names:
                names.append(str(n))
    return names


def pitfalls(objects: Sequence[Any]) -> list[Pitfall]:
    """Every pitfall found across the objects, in the order of the objects."""
    idx = _Index(objects)
    out: list[Pitfall] = []
    for svc in idx.services:
        lb = _service_lb(svc)
        out += _etp(idx, svc, lb)
        if lb is not None:
            out += _instance_ipv6(idx, svc, lb)
            out += _dualstack_udp(svc, lb)
            out += _proxy(idx, svc, lb.proxy_protocol_v2, lb)
            out += _dereg_grace(idx, svc, lb, ref(svc))
            out += _aws_warnings(lb, out)
        out += _endpoints(idx, svc, lb)
    for ing in idx.ingresses:
        if not is_alb_ingress(ing):
            continue
        for name in _backends(ing):
            backend = idx.by_name.get((_ns(ing), name))
            if backend is None:
                continue
            try:
                lb = aws_lb_for_ingress(ing, backend)
            except AwsAnnotationError:
                continue
            if lb is None:
                continue
            out += _alb_instance_ipv6(ing, backend, lb)
            out += _proxy(idx, backend, False, lb)
            out += _dereg_grace(idx, backend, lb, ref(ing))
            out += _aws_warnings(lb, out)
    return _dedupe(out)


def _dedupe(found: list[Pitfall]) -> list[Pitfall]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for p in found:
        key = (p.code, p.obj, p.field)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _aws_warnings(lb: AwsLb, found: Sequence[Pitfall]) -> list[Pitfall]:
    taken = {(p.obj, p.field) for p in found}
    return [
        Pitfall("aws", w.obj, w.field, w.message, w.fix, w.source)
        for w in lb.warnings
        if (w.obj, w.field) not in taken
    ]


def _etp(idx: _Index, svc: Mapping[str, Any], lb: AwsLb | None) -> list[Pitfall]:
    spec = _m(svc, "spec")
    if spec.get("type") not in ("LoadBalancer", "NodePort"):
        return []
    etp = str(spec.get("externalTrafficPolicy") or "Cluster")
    fld = "spec.externalTrafficPolicy"
    name = ref(svc)
    if etp == "Local":
        if lb is not None and lb.target_type == "ip":
            if lb.preserve_client_ip or lb.proxy_protocol_v2:
                return []
            return [
                Pitfall(
                    "etp-local",
                    name,
                    fld,
                    "Local does not keep the client address here: with ip targets the NLB "
                    "sends to the pods directly, past kube-proxy, and with client IP "
                    "preservation off (the default for TCP ip targets) the pod sees the NLB's "
                    "private address",
                    f"set {SVC}aws-load-balancer-target-group-attributes: "
                    "preserve_client_ip.enabled=true, or PROXY v2",
                    S.NLB_IP_NO_CLIENT,
                )
            ]
        if lb is not None:
            return [
                Pitfall(
                    "etp-local",
                    name,
                    fld,
                    "Local keeps the source the load balancer gives, but with instance targets "
                    "an IPv6 client arrives as the load balancer's private IPv4 address (the "
                    "instance target group is IPv4); and nodes without a ready pod fail the "
                    "health check, so traffic follows where the pods run",
                    f"use {SVC}aws-load-balancer-nlb-target-type: ip with "
                    "preserve_client_ip.enabled=true to give the pod the IPv6 client",
                    S.PRESERVE_TABLE,
                )
            ]
        return [
            Pitfall(
                "etp-local",
                name,
                fld,
                "Local keeps the client address, but a node without a ready pod of this "
                "Service drops what it receives on the NodePort",
                "send traffic only to nodes that run a pod (the load balancer's health check "
                "on spec.healthCheckNodePort does that), or accept Cluster's SNAT",
                S.ETP_LOCAL,
            )
        ]
    instance = lb is not None and lb.target_type == "instance" and lb.kind is not LbKind.ALB
    if instance and lb is not None and not lb.proxy_protocol_v2:
        return [
            Pitfall(
                "etp-cluster-snat",
                name,
                fld,
                "Cluster (the default) with instance targets: kube-proxy SNATs the NodePort "
                "traffic to the node's address and may pass it to a pod on another node, so "
                "the pod sees the node, not the client",
                f"use {SVC}aws-load-balancer-nlb-target-type: ip, or externalTrafficPolicy: "
                "Local, or PROXY v2",
                S.NLB_INSTANCE_CLUSTER,
            )
        ]
    return []


def _families(idx: _Index, svc: Mapping[str, Any]) -> set[str]:
    fams = set(ip_families(svc))
    for sl in idx.slices.get((_ns(svc), _name(svc)), []):
        if sl.get("addressType") in ("IPv4", "IPv6"):
            fams.add(str(sl["addressType"]))
    return fams


def _instance_ipv6(idx: _Index, svc: Mapping[str, Any], lb: AwsLb) -> list[Pitfall]:
    if lb.kind is not LbKind.NLB or lb.target_type != "instance":
        return []
    if "IPv6" not in _families(idx, svc):
        return []
    return [
        Pitfall(
            "instance-ipv6",
            ref(svc),
            f"{SVC}aws-load-balancer-nlb-target-type",
            "instance targets with IPv6 pods: IPv6 target groups take IP targets only, and "
            "an instance target group is IPv4 (an IPv6 client arrives translated, as the "
            "load balancer's IPv4 address, if at all)",
            f"set {SVC}aws-load-balancer-nlb-target-type: ip and "
            f"{SVC}aws-load-balancer-ip-address-type: dualstack",
            S.IPV6_TG_IP_ONLY,
        )
    ]


def _dualstack_udp(svc: Mapping[str, Any], lb: AwsLb) -> list[Pitfall]:
    if lb.kind is not LbKind.NLB or lb.ip_address_type != "dualstack":
        return []
    if not any(p in ("UDP", "TCP_UDP") for p in lb.protocols):
        return []
    if lb.target_family == "ipv6":
        reason = (
            "UDP on a dualstack NLB with an IPv6 target group: AWS's NLB docs once took IPv6 "
            "target groups with TCP and TLS listeners only; AWS has since announced UDP for "
            "dualstack NLBs, so it depends on when and where the NLB was made"
        )
        fix = "check the UDP listener exists on the NLB (aws elbv2 describe-listeners)"
        src = S.DUALSTACK_UDP_OLD
    else:
        reason = (
            "UDP on a dualstack NLB with IPv4 pods: the NLB translates the IPv6 client's "
            "datagrams to IPv4 and the pod sees the NLB's private IPv4 address; client IP "
            "preservation, always on for UDP, has no effect on translated traffic"
        )
        fix = "serve UDP from IPv6 pods (spec.ipFamilies: [IPv6]) with ip targets"
        src = S.TRANSLATED
    return [
        Pitfall(
            "dualstack-udp", ref(svc), f"{SVC}aws-load-balancer-ip-address-type", reason, fix, src
        )
    ]


def _proxy(idx: _Index, svc: Mapping[str, Any], pp: bool, lb: AwsLb) -> list[Pitfall]:
    exp = _expects_proxy(idx, svc)
    if exp is None:
        return []
    expected, evidence = exp
    if expected and not pp:
        how = (
            "an ALB never sends one"
            if lb.kind is LbKind.ALB
            else "the load balancer sends none (no aws-load-balancer-proxy-protocol)"
        )
        fix = (
            "serve it behind an NLB with PROXY v2, or turn PROXY off in the application"
            if lb.kind is LbKind.ALB
            else f'set {SVC}aws-load-balancer-proxy-protocol: "*", or turn it off in the app'
        )
        fld = (
            "spec.ingressClassName (an ALB)"
            if lb.kind is LbKind.ALB
            else f"{SVC}aws-load-balancer-proxy-protocol (not set)"
        )
        return [
            Pitfall(
                "proxy-protocol-expected",
                lb.obj,
                fld,
                f"the application expects a PROXY protocol header ({evidence}) and {how}: "
                "it reads the first bytes of every connection as a bad header and drops it",
                fix,
                S.INGRESS_NGINX_PROXY,
            )
        ]
    if pp and not expected:
        return [
            Pitfall(
                "proxy-protocol-unexpected",
                lb.obj,
                f"{SVC}aws-load-balancer-proxy-protocol",
                f"the load balancer sends a PROXY v2 header and the application does not "
                f"expect one ({evidence}): the header reaches it as the start of the data "
                "(an HTTP server answers 400)",
                "turn PROXY protocol on in the application, or remove the annotation",
                S.PROXY_PROTOCOL,
            )
        ]
    return []


def _endpoints(idx: _Index, svc: Mapping[str, Any], lb: AwsLb | None) -> list[Pitfall]:
    spec = _m(svc, "spec")
    if spec.get("type") == "ExternalName" or not spec.get("selector") or not idx.any_slices:
        return []
    eps = idx.endpoints(svc)
    out: list[Pitfall] = []
    if not idx.slices.get((_ns(svc), _name(svc))):
        return [
            Pitfall(
                "no-ready-endpoints",
                ref(svc),
                "spec.selector",
                f"no EndpointSlice labelled {SERVICE_NAME_LABEL}={_name(svc)} in the input: "
                "the selector matches no pod, or its slices were not included",
                "check the selector against the pods' labels; include "
                "`kubectl get endpointslices -o yaml`",
                S.EPS_CONDITIONS,
            )
        ]
    ready = [e for e in eps if _conditions(e[2])[0]]
    if not ready:
        terminating = sum(1 for e in eps if _conditions(e[2])[2])
        out.append(
            Pitfall(
                "no-ready-endpoints",
                ref(svc),
                "EndpointSlice endpoints[].conditions.ready",
                f"{len(eps)} endpoint(s), none ready ({terminating} terminating): new "
                "connections have nowhere to go",
                "fix the pods' readiness (kubectl describe pod), or scale the workload up",
                S.EPS_CONDITIONS,
            )
        )
    dereg = lb.deregistration_delay_s if lb is not None else None
    for sl, i, ep in eps:
        _ready, serving, terminating = _conditions(ep)
        if not (terminating and serving):
            continue
        addrs = ", ".join(str(a) for a in ep.get("addresses") or [])
        behind = (
            f"; the AWS load balancer deregisters it and keeps its open connections for the "
            f"deregistration delay ({dereg} s)"
            if dereg is not None
            else ""
        )
        out.append(
            Pitfall(
                "terminating-serving",
                ref(sl),
                f"endpoints[{i}].conditions",
                f"{addrs} is terminating and still serving: kube-proxy gives it new "
                "connections only when no ready endpoint is left, but open connections go "
                f"on until the pod exits{behind}",
                "let the pod finish its open connections within terminationGracePeriodSeconds "
                "(a preStop sleep); v6lb k8s config makes it a drain backend",
                S.PROXY_TERMINATING,
            )
        )
    return out


def _dereg_grace(idx: _Index, svc: Mapping[str, Any], lb: AwsLb, owner: str) -> list[Pitfall]:
    if lb.target_type != "ip":
        return []
    wls = idx.selected(svc)
    if not wls:
        return []
    grace = min(_grace(w) for w in wls)
    if lb.deregistration_delay_s <= grace:
        return []
    short = min(wls, key=_grace)
    key = (
        f"{ALB}target-group-attributes"
        if lb.kind is LbKind.ALB
        else f"{SVC}aws-load-balancer-target-group-attributes"
    )
    set_here = "deregistration_delay.timeout_seconds" in lb.attributes
    return [
        Pitfall(
            "deregistration-vs-grace",
            owner,
            f"{key} deregistration_delay.timeout_seconds" + ("" if set_here else " (default 300)"),
            f"the target group keeps a deregistering pod's open connections for "
            f"{lb.deregistration_delay_s} s, but {short.obj} is killed "
            f"{grace} s after it starts terminating (terminationGracePeriodSeconds): "
            "connections still open then are reset",
            f"set deregistration_delay.timeout_seconds to at most {grace}, or raise "
            f"terminationGracePeriodSeconds above {lb.deregistration_delay_s}",
            S.DEREGISTRATION_DEFAULT,
        )
    ]


def _alb_instance_ipv6(
    ing: Mapping[str, Any], backend: Mapping[str, Any], lb: AwsLb
) -> list[Pitfall]:
    if lb.target_type != "instance" or ip_families(backend) != ("IPv6",):
        return []
    return [
        Pitfall(
            "alb-instance-ipv6",
            ref(ing),
            f"{ALB}target-type",
            f"target-type instance in front of {ref(backend)}, an IPv6-only Service: over IPv6 "
            "an ALB reaches IP targets only, and the nodes' NodePort for an IPv6-only "
            "Service does not answer the ALB's IPv4",
            f"set {ALB}target-type: ip and {ALB}ip-address-type: dualstack",
            S.EKS_IPV6_IP_TARGETS,
        )
    ]
