"""`v6lb k8s config`: manifests in (tests/data/k8s/), a config out that `v6lb check` takes.

The manifests are our own, written as `kubectl get -o yaml` prints them (a List, with
uid, resourceVersion, ownerReferences) and as people write them (several documents).
Every bad input of issue 17 exits 2 with the object and the field named, or, for what
only deserves a warning, exits 0 and says so on stderr.
"""

from __future__ import annotations

import io
import sys
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from v6lb.cli import main
from v6lb.k8s.derive import (
    LbBehaviour,
    choose_mode,
    derive_config,
    resolve_backends,
    service_behaviour_from,
)
from v6lb.k8s.manifests import ManifestError, load_manifests
from v6lb.k8s.yamldocs import YamlError, load_documents
from v6lb.model.config import load_config, parse_config

DATA = Path(__file__).resolve().parent / "data" / "k8s"
CLUSTER = DATA / "echo-cluster.yaml"
VARIANTS = DATA / "variants.yaml"


def manifests(*paths: Path) -> Any:
    return load_manifests([(str(p), p.read_text()) for p in paths])


def run(capsys: pytest.CaptureFixture[str], *argv: str, stdin: str = "") -> tuple[int, str, str]:
    old = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()))
    try:
        code = main(["k8s", "config", *argv])
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    return code, out, err


def test_kubectl_list_is_read_with_kubernetes_defaults() -> None:
    m = manifests(CLUSTER)
    assert [s.ref.key for s in m.services] == [
        "web/echo-nlb",
        "web/echo-direct",
        "web/echo-pp",
        "web/echoserver",
    ]
    nlb = m.service("web", "echo-nlb")
    assert nlb is not None and nlb.type == "LoadBalancer" and nlb.ip_families == ("IPv6",)
    assert nlb.ports[0].target_port == "http" and nlb.ports[0].node_port == 31380
    assert nlb.annotations["service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval"] == (
        "10"
    )
    (ing,) = m.ingresses
    assert ing.ingress_class == "alb" and [str(b) for _, b in ing.backends()] == ["echoserver:80"]
    (sl,) = m.slices_of(m.service("web", "echoserver"))
    old = sl.endpoints[-1]
    assert (old.ready, old.serving, old.terminating) == (False, True, True)
    assert old.pod_name == "echoserver-7f9c6b8d5-old01" and old.zone == "us-west-2b"
    # absent conditions: ready (so serving) and not terminating (discovery/v1 API reference)
    v = manifests(VARIANTS)
    (six,) = [s for s in v.slices if s.address_type == "IPv6"]
    first, second = six.endpoints
    assert (first.ready, first.serving, first.terminating) == (True, True, False)
    assert (second.ready, second.serving, second.terminating) == (False, False, False)
    assert [str(n) for n in v.notes] == [
        "input: 1 object(s) of kind ConfigMap skipped: v6lb reads Service, EndpointSlice,"
        " Ingress, Pod, Deployment"
    ]


def test_echo_cluster_config_modes_ports_drain_and_health() -> None:
    d = derive_config(manifests(CLUSTER))
    config = parse_config(d.data, "derived")  # what `v6lb check` runs, topology included
    vips = {v.name: v for v in config.vips}
    nat, pp, l7 = (
        vips["web-echo-nlb-http"],
        vips["web-echo-pp-http"],
        vips["web-echoserver-echoserver-http"],
    )
    # preserve_client_ip.enabled=true: nat; named targetPort http -> the slice's 8080
    assert nat.mode == "nat" and {b.port for b in nat.backends} == {8080}
    assert (nat.health.type, nat.health.path, nat.health.interval) == ("http", "/healthz", 10.0)
    assert pp.mode == "proxy-l4" and pp.options.proxy_protocol == "v2"  # type: ignore[union-attr]
    assert {b.port for b in pp.backends} == {8081}
    assert l7.mode == "proxy-l7" and l7.options.forwarded_headers  # type: ignore[union-attr]
    assert [(str(b.address), b.drain) for b in l7.backends] == [
        ("2001:db8:10:1:a1b2::d", False),
        ("2001:db8:10:2:c3d4::f", False),
        ("2001:db8:10:2:c3d4::11", True),  # terminating but serving: drain
    ]
    # allocated in (namespace, name) order; each pod on its node's /80, at its own address
    assert [str(v.address) for v in config.vips] == [f"2001:db8:a:100::{i}" for i in (1, 2, 3, 4)]
    topo = config.topology
    assert topo is not None
    pods = topo.link("pods-1")
    assert pods.subnet == IPv6Network("2001:db8:10:1:a1b2::/80")
    assert topo.owner("2001:db8:10:1:a1b2::5") == "echo-nlb-6d5f7b9c4-x7k2p"
    assert topo.node("echo-nlb-6d5f7b9c4-x7k2p").on_node == "ip-10-0-1-23"
    assert "Service web/echo-nlb spec.ports[0]" in d.comments["web-echo-nlb-http"]


def test_cli_writes_a_file_check_accepts_and_reads_stdin(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "v6lb.yaml"
    code, _, err = run(capsys, str(CLUSTER), str(VARIANTS), "-o", str(out))
    assert code == 0, err
    assert "wrote" in err and "5 VIPs" in err
    assert "warning: EndpointSlice shop/shop-v4" in err and "addressType: IPv4" in err
    assert "note: input: 1 object(s) of kind ConfigMap skipped" in err
    config = load_config(out)  # `v6lb check` accepts it
    shop = config.vip("shop-shop-web")
    # status ip kept; instance targets: the target group is IPv4, so the pod sees the
    # NLB's address, not the IPv6 client's, even with externalTrafficPolicy Local
    # (proxy-l4); the named targetPort `web` resolved through the Deployment
    assert shop.address == IPv6Address("2001:db8:a:200::80") and shop.mode == "proxy-l4"
    assert [(str(b.address), b.port) for b in shop.backends] == [("2001:db8:10:3:e5f6::20", 8000)]
    assert "# Service shop/shop spec.ports[0]" in out.read_text()
    code, text, err = run(
        capsys, "-", "--vip", "web/echo-pp=2001:db8:a:100::80", stdin=CLUSTER.read_text()
    )
    assert code == 0 and "from stdin" in text, err
    assert parse_config(__import__("yaml").safe_load(text)).vip("web-echo-pp-http").address == (
        IPv6Address("2001:db8:a:100::80")
    )


def test_prefer_dsr_only_where_no_port_is_rewritten() -> None:
    d = derive_config(manifests(CLUSTER), prefer="dsr")
    modes = {v["name"]: v["mode"] for v in d.data["vips"]}  # type: ignore[attr-defined]
    assert modes["web-echo-nlb-http"] == "nat"  # 80 -> 8080: DSR rewrites no port
    assert "DSR cannot" in d.comments["web-echo-nlb-http"]
    preserve = (
        "metadata:\n  name: web\n  namespace: app\n  annotations:\n"
        "    service.beta.kubernetes.io/aws-load-balancer-type: external\n"
        "    service.beta.kubernetes.io/aws-load-balancer-nlb-target-type: ip\n"
        "    service.beta.kubernetes.io/aws-load-balancer-ip-address-type: dualstack\n"
        "    service.beta.kubernetes.io/aws-load-balancer-target-group-attributes:"
        " preserve_client_ip.enabled=true"
    )
    text = svc("80").replace("metadata: {name: web, namespace: app}", preserve)
    text = text.replace("  type: LoadBalancer\n", "  type: LoadBalancer\n  ipFamilies: [IPv6]\n")
    text += "---\n" + eps()
    config = parse_config(derive_config(load_manifests([("t", text)]), prefer="dsr").data)
    vip = config.vip("app-web-http")
    assert vip.mode == "dsr-ip6ip6" and [b.port for b in vip.backends] == [None]


@pytest.mark.parametrize(
    ("behaviour", "mode", "options"),
    [
        (LbBehaviour("alb", "ip", False, False), "proxy-l7", {"forwarded_headers": True}),
        (LbBehaviour("nlb", "ip", True, False), "proxy-l4", {"proxy_protocol": "v2"}),
        (LbBehaviour("nlb", "ip", False, True), "nat", {}),
        (LbBehaviour("nlb", "ip", False, False), "proxy-l4", {}),
    ],
)
def test_choose_mode_keeps_what_the_pod_saw(
    behaviour: LbBehaviour, mode: str, options: dict[str, object]
) -> None:
    got, opts, why = choose_mode(behaviour, rewrites_port=True)
    assert (got, opts) == (mode, options) and why


def test_nlb_defaults_ip_tcp_off_udp_on_instance_translated() -> None:
    """From v6lb.k8s.aws's rules: ip targets keep the client for UDP only by default; an
    instance target group is IPv4, so an IPv6 client reaches the pod from the NLB's IPv4
    address even with externalTrafficPolicy Local."""
    m = manifests(CLUSTER)
    nlb_behaviour = service_behaviour_from(m)
    pp = m.service("web", "echo-pp")
    assert pp is not None
    assert not nlb_behaviour(pp, pp.ports[0]).pod_sees_client  # ip targets, TCP: off
    udp = type(pp.ports[0])("dns", "UDP", 53, 53)
    assert nlb_behaviour(pp, udp).pod_sees_client  # ip targets, UDP: on
    v = manifests(VARIANTS)
    shop = v.service("shop", "shop")
    assert shop is not None
    b = service_behaviour_from(v)(shop, shop.ports[0])
    assert b.target_type == "instance" and not b.pod_sees_client, b
    assert "IPv4" in b.why, b.why


SVC = """apiVersion: v1
kind: Service
metadata: {name: web, namespace: app}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: PORT}]
"""
SLICE = """apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: app, labels: {kubernetes.io/service-name: NAME}}
addressType: TYPE
endpoints: [{addresses: ["ADDR"], nodeName: n1, targetRef: {kind: Pod, name: web-1}}]
"""


def svc(port: str = "8080") -> str:
    return SVC.replace("PORT", port)


def eps(name: str = "web", kind: str = "IPv6", addr: str = "2001:db8:10:1::5") -> str:
    return SLICE.replace("NAME", name).replace("TYPE", kind).replace("ADDR", addr)


POD = """apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: app, labels: {app: LABEL}}
spec:
  nodeName: n1
  containers: [{name: web, ports: [{name: http, containerPort: 8443}]}]
status: {podIPs: [{ip: "2001:db8:10:1::5"}]}
"""

BAD = {
    "not-yaml": ("kind: Service\nmetadata: {name: [\n", "line 3", "not YAML"),
    "not-kubernetes": ("vips: []\n", "not a Kubernetes object", "apiVersion"),
    "ipv4-only": (
        svc() + "---\n" + eps(kind="IPv4", addr="10.0.0.5"),
        "EndpointSlice app/web-abc",
        "addressType: IPv4: Service app/web has only IPv4 endpoints",
    ),
    "named-port": (svc("web") + "---\n" + eps(), "Service app/web", "spec.ports[0].targetPort"),
    "ingress-class": (
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: i\n"
        "  annotations: {kubernetes.io/ingress.class: nginx}\nspec:\n  ingressClassName: alb\n"
        "  defaultBackend: {service: {name: web, port: {number: 80}}}\n",
        "Ingress default/i",
        "spec.ingressClassName: 'alb' conflicts",
    ),
    "ingress-port": (
        svc() + "---\n" + eps() + "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\n"
        "metadata: {name: i, namespace: app}\nspec:\n  ingressClassName: alb\n"
        "  defaultBackend: {service: {name: web, port: {number: 8443}}}\n",
        "Ingress app/i",
        "spec.defaultBackend.service.port.number: Service app/web has no port 8443",
    ),
    "bad-port": (svc("99999"), "Service app/web", "spec.ports[0].targetPort: 99999 is not"),
    "endpoint-address": (svc() + "---\n" + eps(addr="10.0.0.5"), "EndpointSlice app/web-abc",
                         "endpoints[0].addresses[0]: 10.0.0.5 is not an IPv6 address"),
    "twice": (svc() + "---\n" + svc(), "Service app/web", "the same Service is given twice"),
    "duplicate-key": ("apiVersion: v1\nkind: Service\nkind: Pod\n", "line 3", "given twice"),
    "nothing": (svc(), "nothing to serve", "no ready IPv6 endpoint"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_naming_object_and_field(
    capsys: pytest.CaptureFixture[str], case: str
) -> None:
    text, obj, field = BAD[case]
    code, out, err = run(capsys, "-", stdin=text)
    assert code == 2 and out == "", err
    assert err.startswith("v6lb: error: ") and obj in err and field in err and "fix: " in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "warning"),
    [
        (  # the selector matches no Pod given (the slice still has an endpoint)
            svc() + "---\n" + eps() + "---\n" + POD.replace("LABEL", "other"),
            "Service app/web (<stdin>, line 1): spec.selector: app=web matches none of the 1"
            " Pod(s)",
        ),
        (  # an EndpointSlice for a Service not in the input
            svc() + "---\n" + eps() + "---\n" + eps("gone").replace("web-abc", "gone-1"),
            'EndpointSlice app/gone-1 (<stdin>, line 15): metadata.labels["kubernetes.io/'
            'service-name"]: Service app/gone is not in the input: skipped',
        ),
    ],
)
def test_warnings_exit_0(capsys: pytest.CaptureFixture[str], text: str, warning: str) -> None:
    code, out, err = run(capsys, "-", stdin=text)
    assert code == 0 and "vips:" in out, err
    assert f"warning: {warning}" in err


def test_named_target_port_through_the_pod_and_unknown_vip(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = svc("http") + "---\n" + eps() + "---\n" + POD.replace("LABEL", "web")
    m = load_manifests([("t", text)])
    svc_ = m.service("app", "web")
    assert [b.port for b in resolve_backends(m, svc_, svc_.ports[0], [])] == [8443]
    code, _, err = run(capsys, "-", "--vip", "app/nope=2001:db8:a:100::9", stdin=text)
    assert code == 2 and "--vip app/nope: no LoadBalancer Service or ALB Ingress" in err
    code, _, err = run(capsys, "-", "--vip", "app/web=10.0.0.1", stdin=text)
    assert code == 2 and "is not an IPv6 address" in err


def test_pods_sharing_a_80_across_nodes_get_tighter_links() -> None:
    text = (
        svc()
        + "---\n"
        + eps()
        + "---\n"
        + eps("web")
        .replace("web-abc", "web-def")
        .replace("nodeName: n1", "nodeName: n2")
        .replace("2001:db8:10:1::5", "2001:db8:10:1::1:7")
    )
    d = derive_config(load_manifests([("t", text)]))
    topo = parse_config(d.data, "t").topology
    assert topo is not None
    nets = sorted(str(lk.subnet) for lk in topo.links if lk.name.startswith("pods-"))
    assert nets == ["2001:db8:10:1::/120", "2001:db8:10:1::1:0/120"]


def test_yaml_reader_limits() -> None:
    docs = list(load_documents("a: 1\n---\nb: [x, 0x10, 010, 1.5, ~, yes]\n", "s", max_values=99))
    assert docs == [(1, {"a": 1}), (3, {"b": ["x", 16, 8, 1.5, None, True]})]
    with pytest.raises(YamlError, match="nest more than 32"):
        list(load_documents("[" * 40 + "]" * 40, "s", max_values=999))
    with pytest.raises(YamlError, match="more than 5 values"):
        list(load_documents("[1, 2, 3, 4, 5, 6]", "s", max_values=5))
    with pytest.raises(YamlError, match="names no finished anchor"):
        list(load_documents("a: &x [1, *x]", "s", max_values=99))
    shared = list(load_documents("a: &x {k: v}\nb: *x\n", "s", max_values=99))[0][1]
    assert shared["a"] is shared["b"]
    with pytest.raises(ManifestError, match="holds no Kubernetes object"):
        load_manifests([("empty", "---\n")])


MIXED = """apiVersion: v1
kind: Service
metadata:
  name: dns
  namespace: app
  annotations:
    service.beta.kubernetes.io/aws-load-balancer-type: external
    service.beta.kubernetes.io/aws-load-balancer-nlb-target-type: ip
    service.beta.kubernetes.io/aws-load-balancer-proxy-protocol: "*"
spec:
  type: LoadBalancer
  ports: [{name: dns, port: 53, protocol: UDP}, {name: tcp, port: 53, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: app, labels: {kubernetes.io/service-name: dns}}
addressType: IPv6
ports: [{name: dns, port: 5353, protocol: UDP}, {name: tcp, port: 5353, protocol: TCP}]
endpoints: [{addresses: ["fd00:77::5"]}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: i
  namespace: app
  annotations: {alb.ingress.kubernetes.io/listen-ports: '[{"HTTP": 8080}, {"HTTPS": 443}]'}
spec:
  ingressClassName: alb
  defaultBackend: {service: {name: dns, port: {name: tcp}}}
"""


def test_udp_and_tcp_ports_of_one_service_and_alb_listen_ports() -> None:
    d = derive_config(load_manifests([("t", MIXED)]))
    config = parse_config(d.data, "t")
    udp, tcp, alb = config.vips
    # one address per Service; the endpoint without nodeName sits on the synthetic node-0
    assert udp.address == tcp.address and (udp.protocol, tcp.protocol) == ("udp", "tcp")
    assert udp.backends[0].port == 5353 and alb.ports == (8080,) and alb.mode == "proxy-l7"
    assert config.topology is not None and config.topology.node("node-0").role == "node"
    assert any("HTTPS listener(s) [443] not served" in str(n) for n in d.notes)


def test_mutated_manifests_give_a_message_never_a_traceback() -> None:
    """Fields of the kubectl List set to values of the wrong type or range, 1-3 at a time:
    each run ends in a config `v6lb check` accepts, or a V6lbError (exit 2)."""
    import copy
    import random

    import yaml

    from v6lb.errors import V6lbError

    base = yaml.safe_load(CLUSTER.read_text())
    values: list[object] = [None, 0, 70000, "", "x", [], {}, [1], {"a": 1}, True, 1.5]
    values += ["fd00::1", "10.0.0.1", "http", "2001:db8:a:100::5"]

    def paths(o: object, p: tuple[object, ...] = ()) -> Any:
        if p:
            yield p
        items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()
        for k, v in items:
            yield from paths(v, (*p, k))

    every = list(paths(base))
    rng = random.Random(17)
    outcomes = {"config": 0, "error": 0}
    for _ in range(100):
        doc = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            *parents, last = rng.choice(every)
            cur: Any = doc
            try:
                for k in parents:
                    cur = cur[k]
                cur[last] = rng.choice(values)
            except (KeyError, IndexError, TypeError):
                pass  # an earlier mutation replaced a parent
        try:
            d = derive_config(load_manifests([("m", yaml.safe_dump(doc))]), prefer="dsr")
        except V6lbError:
            outcomes["error"] += 1
            continue
        parse_config(d.data, "derived")
        outcomes["config"] += 1
    assert outcomes["config"] > 10 and outcomes["error"] > 10, outcomes
