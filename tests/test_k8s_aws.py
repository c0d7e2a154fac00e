"""The AWS load balancer's rules and the pitfalls, on manifests as kubectl prints them.

Each rule and default of v6lb.k8s.aws is checked on the manifests in tests/data/k8s/aws/
and on small Services built here; each pitfall has a file of its own in
tests/data/k8s/aws/pitfalls/ that raises exactly that pitfall, and the clean manifests
raise none.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from v6lb.errors import EXIT_USAGE
from v6lb.k8s import sources as S
from v6lb.k8s.aws import (
    ALB,
    SVC,
    AwsAnnotationError,
    AwsLb,
    Controller,
    LbKind,
    aws_lb_for_ingress,
    aws_lb_for_service,
)
from v6lb.k8s.pitfalls import EXPECTS_PROXY, pitfalls
from v6lb.k8s.sources import Source

DATA = Path(__file__).parent / "data" / "k8s" / "aws"


def load(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        out += doc["items"] if doc.get("kind") == "List" else [doc]
    return out


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def service(ann: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "LoadBalancer",
        "ipFamilies": ["IPv6"],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        "selector": {"app": "web"},
    }
    base.update(spec)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "annotations": ann or {}},
        "spec": base,
    }


CONTROLLER_V6 = {
    SVC + "aws-load-balancer-type": "external",
    SVC + "aws-load-balancer-scheme": "internet-facing",
    SVC + "aws-load-balancer-ip-address-type": "dualstack",
}


def nlb(extra: dict[str, str] | None = None, **spec: Any) -> AwsLb:
    lb = aws_lb_for_service(service({**CONTROLLER_V6, **(extra or {})}, **spec))
    assert lb is not None
    return lb


def ingress(ann: dict[str, str] | None = None, cls: str | None = "alb") -> dict[str, Any]:
    spec: dict[str, Any] = {
        "rules": [
            {
                "http": {
                    "paths": [
                        {
                            "path": "/",
                            "pathType": "Prefix",
                            "backend": {"service": {"name": "web", "port": {"number": 80}}},
                        }
                    ]
                }
            }
        ]
    }
    if cls is not None:
        spec["ingressClassName"] = cls
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": "web", "namespace": "shop", "annotations": ann or {}},
        "spec": spec,
    }


# --- the clean example manifests -------------------------------------------------------------


def test_echoserver_alb_ip_target_is_proxy_l7_with_forwarded_headers() -> None:
    objs = load(DATA / "echoserver-alb-ip.yaml")
    lb = aws_lb_for_ingress(
        find(objs, "Ingress", "echoserver"), find(objs, "Service", "echoserver")
    )
    assert lb is not None
    assert (lb.obj, lb.kind, lb.controller) == (
        "Ingress echoserver/echoserver",
        LbKind.ALB,
        Controller.LBC,
    )
    assert (lb.target_type, lb.scheme, lb.ip_address_type, lb.target_family) == (
        "ip",
        "internet-facing",
        "dualstack",
        "ipv6",
    )
    assert lb.deregistration_delay_s == 20 and lb.warnings == ()
    hc = lb.health_check
    assert (hc.protocol, hc.port, hc.path, hc.interval_s, hc.timeout_s) == (
        "HTTP",
        "traffic-port",
        "/healthz",
        15,
        5,
    )
    assert (hc.healthy_threshold, hc.unhealthy_threshold, hc.success_codes) == (2, 2, "200")
    p = lb.ipv6_client
    assert p.reachable and not p.nat66_at_lb and p.reply_via_lb
    assert (p.v6lb_mode, p.forwarded_headers, p.proxy_protocol) == ("proxy-l7", True, "none")
    assert p.pod_sees_source == "a private IPv6 address of the ALB"
    assert "X-Forwarded-For" in p.client_address_reaches_app
    assert S.ALB_XFF in p.sources and S.ALB_STATE in p.sources
    assert lb.rule("target type").origin == ALB + "target-type"
    assert lb.rule("target family").source is S.TG_FAMILY


def test_game_2048_nlb_ip_preserving_the_client_is_nat() -> None:
    objs = load(DATA / "game-2048-nlb-ip.yaml")
    lb = aws_lb_for_service(find(objs, "Service", "service-2048"))
    assert lb is not None and lb.kind is LbKind.NLB and lb.controller is Controller.LBC
    assert lb.rule("controller").origin == "spec.loadBalancerClass"
    assert (lb.target_type, lb.preserve_client_ip, lb.proxy_protocol_v2) == ("ip", True, False)
    assert lb.deregistration_delay_s == 30
    hc = lb.health_check
    assert (hc.protocol, hc.path, hc.interval_s, hc.healthy_threshold) == ("HTTP", "/", 5, 3)
    assert hc.success_codes == "200-399"
    p = lb.ipv6_client
    assert p.reachable and p.nat66_at_lb and p.reply_via_lb and p.v6lb_mode == "nat"
    assert p.nat_kind.startswith("stateful destination NAT")
    assert p.pod_sees_source.startswith("the client's IPv6 address")
    assert "350 s" in p.lb_state and "not documented by AWS" in p.lb_state
    assert S.NLB_INTERNALS in p.sources and S.PRESERVE_TABLE in p.sources


def test_dualstack_service_gets_an_ipv6_target_group_and_the_nlb_address() -> None:
    objs = load(DATA / "nlb-ip-dualstack.yaml")
    lb = aws_lb_for_service(find(objs, "Service", "web"))
    assert lb is not None
    assert lb.rule("controller").origin == SVC + "aws-load-balancer-type"
    assert lb.target_family == "ipv6"  # IPv6 among the families: the controller's rule
    preserve = lb.rule("preserve client IP")
    assert (preserve.value, preserve.origin, preserve.source) == (
        "False",
        "default",
        S.PRESERVE_DEFAULT,
    )
    p = lb.ipv6_client
    assert (p.v6lb_mode, p.proxy_protocol, p.nat66_at_lb) == ("proxy-l4", "none", True)
    assert p.pod_sees_source == "a private IPv6 address of the NLB"
    assert p.client_address_reaches_app == "it does not reach the application"


def test_proxy_v2_nlb_is_proxy_l4_v2() -> None:
    objs = load(DATA / "nlb-proxy-v2.yaml")
    lb = aws_lb_for_service(find(objs, "Service", "tcp-echo"))
    assert lb is not None and lb.proxy_protocol_v2
    assert lb.rule("proxy protocol v2").origin == SVC + "aws-load-balancer-proxy-protocol"
    p = lb.ipv6_client
    assert (p.v6lb_mode, p.proxy_protocol) == ("proxy-l4", "v2")
    assert "PROXY v2 header" in p.client_address_reaches_app


@pytest.mark.parametrize(
    "name",
    [
        "echoserver-alb-ip.yaml",
        "game-2048-nlb-ip.yaml",
        "nlb-ip-dualstack.yaml",
        "nlb-proxy-v2.yaml",
    ],
)
def test_clean_manifests_raise_no_pitfall(name: str) -> None:
    assert pitfalls(load(DATA / name)) == []


# --- defaults and rules on small Services -------------------------------------------------------


def test_load_balancer_class_defaults() -> None:
    lb = aws_lb_for_service(service(loadBalancerClass="service.k8s.aws/nlb", ipFamilies=["IPv4"]))
    assert lb is not None and lb.controller is Controller.LBC
    assert lb.rule("target type").source is S.TARGET_TYPE_CLASS
    assert (lb.target_type, lb.scheme, lb.ip_address_type) == ("instance", "internal", "ipv4")
    assert lb.preserve_client_ip  # instance target groups preserve by default
    assert lb.deregistration_delay_s == 300
    assert lb.rule("deregistration delay").source is S.DEREGISTRATION_DEFAULT
    hc = lb.health_check
    assert (hc.protocol, hc.port, hc.path, hc.interval_s, hc.timeout_s) == (
        "TCP",
        "traffic-port",
        None,
        10,
        10,
    )
    assert (hc.healthy_threshold, hc.unhealthy_threshold, hc.success_codes) == (3, 3, None)
    fields = {w.field for w in lb.warnings}
    assert fields == {SVC + "aws-load-balancer-scheme", SVC + "aws-load-balancer-ip-address-type"}
    p = lb.ipv6_client
    assert not p.reachable and p.v6lb_mode == "proxy-l4"
    assert p.pod_sees_source.startswith("the node's own address")


def test_external_without_target_type_defaults_to_instance_and_local_health_check() -> None:
    lb = nlb(ipFamilies=["IPv4"], externalTrafficPolicy="Local")
    assert lb.target_type == "instance"
    assert lb.rule("target type").source is S.TARGET_TYPE_DEFAULT
    assert (lb.health_check.protocol, lb.health_check.port) == ("HTTP", "healthCheckNodePort")
    assert lb.health_check.path == "/"
    p = lb.ipv6_client
    assert p.reachable and not p.nat66_at_lb
    assert p.pod_sees_source.startswith("a private IPv4 address of the NLB")
    assert p.nat_kind.startswith("IPv6-to-IPv4 translation")


def test_ipv4_pods_behind_a_dualstack_nlb_are_translated() -> None:
    lb = nlb(
        {
            SVC + "aws-load-balancer-nlb-target-type": "ip",
            SVC + "aws-load-balancer-target-group-attributes": "preserve_client_ip.enabled=true",
        },
        ipFamilies=["IPv4"],
    )
    p = lb.ipv6_client
    assert lb.target_family == "ipv4" and not p.nat66_at_lb
    assert p.pod_sees_source == "a private IPv4 address of the NLB"  # preservation has no effect
    assert S.TRANSLATED in p.sources and p.v6lb_mode == "proxy-l4"


def test_nlb_ip_legacy_type_ignores_the_target_type_annotation() -> None:
    lb = aws_lb_for_service(
        service(
            {
                SVC + "aws-load-balancer-type": "nlb-ip",
                SVC + "aws-load-balancer-nlb-target-type": "instance",
                SVC + "aws-load-balancer-scheme": "internet-facing",
                SVC + "aws-load-balancer-ip-address-type": "dualstack",
            }
        )
    )
    assert lb is not None and lb.target_type == "ip"
    assert lb.rule("target type").source is S.NLB_IP_COMPAT
    assert [w.field for w in lb.warnings] == [SVC + "aws-load-balancer-nlb-target-type"]


def test_udp_ip_targets_preserve_the_client_by_default() -> None:
    lb = nlb(
        {SVC + "aws-load-balancer-nlb-target-type": "ip"},
        ports=[{"port": 53, "protocol": "UDP", "targetPort": 53}],
    )
    assert lb.protocols == ("UDP",) and lb.preserve_client_ip
    assert lb.ipv6_client.v6lb_mode == "nat"


def test_deprecated_internal_annotation_and_its_conflict() -> None:
    lb = aws_lb_for_service(
        service(
            {
                SVC + "aws-load-balancer-type": "external",
                SVC + "aws-load-balancer-internal": "false",
            },
            ipFamilies=["IPv4"],
        )
    )
    assert lb is not None and lb.scheme == "internet-facing"
    assert lb.rule("scheme").source is S.NLB_INTERNAL_DEPRECATED
    lb = nlb({SVC + "aws-load-balancer-internal": "true"})  # scheme internet-facing wins
    assert lb.scheme == "internet-facing"
    assert SVC + "aws-load-balancer-internal" in {w.field for w in lb.warnings}


def test_proxy_annotation_wins_over_the_attribute_with_a_warning() -> None:
    lb = nlb(
        {
            SVC + "aws-load-balancer-nlb-target-type": "ip",
            SVC + "aws-load-balancer-proxy-protocol": "*",
            SVC + "aws-load-balancer-target-group-attributes": "proxy_protocol_v2.enabled=false",
        }
    )
    assert lb.proxy_protocol_v2
    assert [w.source for w in lb.warnings] == [S.PROXY_PROTOCOL]


def test_proxy_v2_with_client_ip_preservation_is_not_a_conflict() -> None:
    lb = nlb(
        {
            SVC + "aws-load-balancer-nlb-target-type": "ip",
            SVC
            + "aws-load-balancer-target-group-attributes": "preserve_client_ip.enabled=true,proxy_protocol_v2.enabled=true",
        }
    )
    assert lb.warnings == () and lb.preserve_client_ip and lb.proxy_protocol_v2
    p = lb.ipv6_client
    assert (p.v6lb_mode, p.proxy_protocol) == ("proxy-l4", "v2")
    assert p.pod_sees_source.startswith("the client's IPv6 address")
    assert S.PROXY_AND_PRESERVE in p.sources and not S.PROXY_AND_PRESERVE.found


def test_proxy_v2_with_instance_targets_and_local_warns() -> None:
    lb = nlb(
        {SVC + "aws-load-balancer-proxy-protocol": "*"},
        ipFamilies=["IPv4"],
        externalTrafficPolicy="Local",
    )
    assert S.PROXY_LOCAL_INSTANCE in {w.source for w in lb.warnings}


def test_in_tree_load_balancers_are_ipv4_only() -> None:
    clb = aws_lb_for_service(service())
    assert clb is not None
    assert (clb.kind, clb.controller, clb.target_type) == (
        LbKind.CLASSIC,
        Controller.IN_TREE,
        "instance",
    )
    assert not clb.ipv6_client.reachable and clb.rule("ip address type").source is S.CLB_IPV4_ONLY
    assert clb.scheme == "internet-facing" and len(clb.warnings) == 1
    tree_nlb = aws_lb_for_service(service({SVC + "aws-load-balancer-type": "nlb"}))
    assert tree_nlb is not None and tree_nlb.kind is LbKind.NLB
    assert tree_nlb.controller is Controller.IN_TREE and not tree_nlb.ipv6_client.reachable
    assert "no source found" in tree_nlb.rule("ip address type").source.quote


@pytest.mark.parametrize(
    "obj",
    [
        service(type="ClusterIP"),
        service(type="NodePort"),
        service(loadBalancerClass="example.com/metallb"),
    ],
)
def test_services_no_aws_load_balancer_serves(obj: dict[str, Any]) -> None:
    assert aws_lb_for_service(obj) is None


def test_ingress_class_and_defaults() -> None:
    assert aws_lb_for_ingress(ingress(cls="nginx")) is None
    assert aws_lb_for_ingress(ingress(cls=None)) is None
    old = ingress(cls=None)
    old["metadata"]["annotations"]["kubernetes.io/ingress.class"] = "alb"
    lb = aws_lb_for_ingress(old)
    assert lb is not None
    assert (lb.target_type, lb.scheme, lb.ip_address_type, lb.target_family) == (
        "instance",
        "internal",
        "ipv4",
        "ipv4",
    )
    assert not lb.ipv6_client.reachable and len(lb.warnings) == 2
    assert lb.ipv6_client.pod_sees_source.startswith("the node's own address")
    assert lb.ipv6_client.v6lb_mode == "proxy-l7"


def test_tcp_health_check_with_local_warns() -> None:
    lb = nlb(
        {
            SVC + "aws-load-balancer-nlb-target-type": "ip",
            SVC + "aws-load-balancer-healthcheck-protocol": "tcp",
        },
        externalTrafficPolicy="Local",
    )
    assert lb.health_check.protocol == "TCP"
    assert [w.field for w in lb.warnings] == [SVC + "aws-load-balancer-healthcheck-protocol"]


def test_backend_service_annotation_wins_over_the_ingress() -> None:
    backend = service({ALB + "target-type": "ip"}, type="ClusterIP")
    lb = aws_lb_for_ingress(
        ingress(
            {
                ALB + "target-type": "instance",
                ALB + "scheme": "internet-facing",
                ALB + "ip-address-type": "dualstack-without-public-ipv4",
            }
        ),
        backend,
    )
    assert lb is not None and lb.target_type == "ip"
    assert lb.rule("target type").source is S.ALB_SERVICE_PRIORITY
    assert lb.ip_address_type == "dualstack-without-public-ipv4" and lb.ipv6_client.reachable


def test_ingress_warnings_proxy_annotation_and_internal_without_public_ipv4() -> None:
    lb = aws_lb_for_ingress(
        ingress(
            {
                SVC + "aws-load-balancer-proxy-protocol": "*",
                ALB + "ip-address-type": "dualstack-without-public-ipv4",
            }
        )
    )
    assert lb is not None and not lb.proxy_protocol_v2
    sources = {w.source for w in lb.warnings}
    assert {S.ALB_XFF, S.ALB_DUALSTACK_NO_PUBLIC} <= sources


# --- bad annotations: exit 2, naming the object and the annotation ----------------------------


BAD_SERVICES = [
    ({SVC + "aws-load-balancer-nlb-target-type": "foo"}, {}, "aws-load-balancer-nlb-target-type"),
    ({SVC + "aws-load-balancer-scheme": "public"}, {}, "aws-load-balancer-scheme"),
    (
        {SVC + "aws-load-balancer-ip-address-type": "dualstack-without-public-ipv4"},
        {},
        "aws-load-balancer-ip-address-type",
    ),
    ({SVC + "aws-load-balancer-proxy-protocol": "true"}, {}, "aws-load-balancer-proxy-protocol"),
    (
        {SVC + "aws-load-balancer-target-group-attributes": "preserve_client_ip.enabled"},
        {},
        "aws-load-balancer-target-group-attributes",
    ),
    (
        {
            SVC
            + "aws-load-balancer-target-group-attributes": "deregistration_delay.timeout_seconds=4000"
        },
        {},
        "deregistration_delay.timeout_seconds",
    ),
    (
        {
            SVC + "aws-load-balancer-nlb-target-type": "ip",
            SVC + "aws-load-balancer-target-group-attributes": "preserve_client_ip.enabled=false",
        },
        {"ports": [{"port": 53, "protocol": "UDP"}]},
        "preserve_client_ip.enabled",
    ),
    ({SVC + "aws-load-balancer-ip-address-type": "ipv4"}, {}, "aws-load-balancer-ip-address-type"),
    ({SVC + "aws-load-balancer-type": "alb"}, {}, "aws-load-balancer-type"),
    (
        {SVC + "aws-load-balancer-healthcheck-interval": "ten"},
        {},
        "aws-load-balancer-healthcheck-interval",
    ),
    ({}, {"allocateLoadBalancerNodePorts": False}, "spec.allocateLoadBalancerNodePorts"),
]


@pytest.mark.parametrize(("ann", "spec", "key"), BAD_SERVICES)
def test_bad_service_annotations(ann: dict[str, str], spec: dict[str, Any], key: str) -> None:
    with pytest.raises(AwsAnnotationError) as e:
        aws_lb_for_service(service({**CONTROLLER_V6, **ann}, **spec))
    text = str(e.value)
    assert text.startswith("Service shop/web: ") and key in text and "fix: " in text
    assert e.value.exit_code == EXIT_USAGE


BAD_INGRESSES = [
    (
        {ALB + "target-group-attributes": "proxy_protocol_v2.enabled=true"},
        None,
        "proxy_protocol_v2.enabled",
    ),
    (
        {ALB + "target-group-attributes": "preserve_client_ip.enabled=true"},
        None,
        "preserve_client_ip.enabled",
    ),
    ({ALB + "target-type": "pod"}, None, "target-type"),
    ({ALB + "ip-address-type": "ipv6"}, None, "ip-address-type"),
    ({}, service(type="ClusterIP"), "target-type"),  # instance targets need a NodePort
    ({ALB + "target-type": "ip"}, service(type="ClusterIP"), "ip-address-type"),  # IPv6, ipv4 ALB
    ({ALB + "healthcheck-interval-seconds": "1"}, None, "healthcheck-interval-seconds"),
]


@pytest.mark.parametrize(("ann", "backend", "key"), BAD_INGRESSES)
def test_bad_ingress_annotations(
    ann: dict[str, str], backend: dict[str, Any] | None, key: str
) -> None:
    with pytest.raises(AwsAnnotationError) as e:
        aws_lb_for_ingress(ingress(ann), backend)
    assert str(e.value).startswith("Ingress shop/web: ") and key in str(e.value)


# --- pitfalls ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((DATA / "pitfalls").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_pitfall_names_the_object_field_reason_fix_and_source(path: Path) -> None:
    found = pitfalls(load(path))
    assert found
    for p in found:
        assert p.obj.split(" ")[0] in ("Service", "Ingress", "EndpointSlice")
        assert "/" in p.obj and p.field and p.reason and p.fix
        assert p.source.found or "no source" in p.source.quote or "not documented" in p.source.quote


def test_pitfall_codes_per_file() -> None:
    want = {
        "alb-instance-ipv6": "alb-instance-ipv6",
        "deregistration-vs-grace": "deregistration-vs-grace",
        "dualstack-udp": "dualstack-udp",
        "etp-cluster-snat": "etp-cluster-snat",
        "etp-local": "etp-local",
        "instance-ipv6": "instance-ipv6",
        "no-ready-endpoints": "no-ready-endpoints",
        "proxy-expected": "proxy-protocol-expected",
        "proxy-unexpected": "proxy-protocol-unexpected",
        "terminating-serving": "terminating-serving",
    }
    got = {p.stem: [f.code for f in pitfalls(load(p))] for p in (DATA / "pitfalls").glob("*")}
    assert got == {k: [v] for k, v in want.items()}


def test_pitfall_details() -> None:
    term = pitfalls(load(DATA / "pitfalls" / "terminating-serving.yaml"))[0]
    assert (
        term.obj == "EndpointSlice shop/checkout-q2w3e" and term.field == "endpoints[0].conditions"
    )
    assert "2001:db8:60:1::11" in term.reason and "(20 s)" in term.reason
    grace = pitfalls(load(DATA / "pitfalls" / "deregistration-vs-grace.yaml"))[0]
    assert "(default 300)" in grace.field and "at most 30" in grace.fix
    expected = pitfalls(load(DATA / "pitfalls" / "proxy-expected.yaml"))[0]
    assert "ConfigMap ingress-nginx/ingress-nginx-controller" in expected.reason
    # the IPv6 Service's instance targets: one pitfall, not also the aws warning it repeats
    inst = pitfalls(load(DATA / "pitfalls" / "instance-ipv6.yaml"))
    assert [p.source for p in inst] == [S.IPV6_TG_IP_ONLY]


def test_alb_never_sends_proxy_protocol() -> None:
    objs = load(DATA / "echoserver-alb-ip.yaml")
    dep = find(objs, "Deployment", "echoserver")
    dep["spec"]["template"]["metadata"]["annotations"] = {EXPECTS_PROXY: "true"}
    found = pitfalls(objs)
    assert [(p.code, p.obj) for p in found] == [
        ("proxy-protocol-expected", "Ingress echoserver/echoserver")
    ]
    assert "an ALB never sends one" in found[0].reason


def test_no_slice_for_a_service_when_others_have_slices() -> None:
    objs = load(DATA / "game-2048-nlb-ip.yaml")
    other = copy.deepcopy(find(objs, "Service", "service-2048"))
    other["metadata"]["name"] = "orphan"
    found = pitfalls([*objs, other])
    assert [(p.code, p.obj, p.field) for p in found] == [
        ("no-ready-endpoints", "Service game-2048/orphan", "spec.selector")
    ]


def test_pitfalls_never_raise_on_bad_input() -> None:
    bad = service({SVC + "aws-load-balancer-nlb-target-type": "foo"})
    junk: list[Any] = [
        None,
        3,
        "x",
        {"kind": "Service"},
        {"items": [{"kind": "Pod"}]},
        bad,
        {"kind": "EndpointSlice", "endpoints": "nope"},
        {"kind": "Ingress", "spec": {"ingressClassName": "alb", "rules": [None]}},
    ]
    assert isinstance(pitfalls(junk), list)


def test_every_source_is_a_url_or_says_none_was_found() -> None:
    for name in dir(S):
        src = getattr(S, name)
        if isinstance(src, Source):
            if src.found:
                assert src.url.startswith("https://") and src.quote, name
            else:
                assert "no source" in src.quote or "not documented" in src.quote, name
