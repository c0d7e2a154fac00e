"""The config file model (v6lb.model.config) and `v6lb check`."""

from __future__ import annotations

import copy
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from v6lb.cli import main
from v6lb.model.bgp import BgpSection, BgpSettings
from v6lb.model.config import (
    Backend,
    ConfigError,
    DsrL2Options,
    HealthCheck,
    HealthType,
    NatOptions,
    NptPair,
    Protocol,
    ProxyL4Options,
    ProxyL7Options,
    ProxyProtocol,
    Scheduler,
    Timeouts,
    TunnelOptions,
    VipMode,
    load_config,
    parse_config,
)
from v6lb.model.config_summary import summarize

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "basic.yaml"
LB = {"addresses": ["2001:db8:0:1::2"]}


def be(address: str, **kw: Any) -> dict[str, Any]:
    return {"address": address, **kw}


def vip(mode: str = "nat", **kw: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "web",
        "address": "2001:db8:0:10::80",
        "ports": [443],
        "mode": mode,
        "backends": [be("2001:db8:0:20::1"), be("2001:db8:0:20::2")],
    }
    data.update(kw)
    return data


def cfg(*vips: dict[str, Any], **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"lb": LB, "vips": list(vips)}
    data.update(sections)
    return data


def npt(inside: str, outside: str) -> dict[str, str]:
    return {"inside": inside, "outside": outside}


def reject(data: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "x.yaml")
    return info.value


# --- rejections: (data, field path, part of the message, part of the fix) -----------

REJECTIONS = [
    # proxy-l4 relay (docs/proxy.md, "Kernel relay")
    pytest.param(
        cfg(vip("proxy-l4", relay="bpf")),
        "vips[0].relay",
        "'bpf' is not one of the choices",
        "user, kernel",
        id="relay-unknown",
    ),
    pytest.param(
        cfg(
            vip(
                "proxy-l4",
                relay="kernel",
                tls={"certificates": [{"cert": "a.pem", "key": "a.key"}]},
            )
        ),
        "vips[0].relay",
        "cannot splice a TLS-terminated connection",
        "remove relay",
        id="relay-kernel-tls",
    ),
    # addresses
    pytest.param(
        cfg(vip(address="192.0.2.1")),
        "vips[0].address",
        "192.0.2.1 is an IPv4 address",
        "IPv6-only",
        id="vip-ipv4",
    ),
    pytest.param(
        cfg(vip(backends=[be("::ffff:192.0.2.7")])),
        "vips[0].backends[0].address",
        "IPv4-mapped",
        "native IPv6 address",
        id="backend-ipv4-mapped",
    ),
    pytest.param(
        cfg(vip(address="web.example")),
        "vips[0].address",
        "is not an IPv6 address",
        "2001:db8::10",
        id="vip-not-an-address",
    ),
    pytest.param(
        cfg(vip(address="2001:db8::80/64")),
        "vips[0].address",
        "is a prefix, not an address",
        "2001:db8::80",
        id="vip-prefix",
    ),
    pytest.param(
        cfg(vip(address="ff02::1")),
        "vips[0].address",
        "a multicast address",
        "unicast",
        id="vip-multicast",
    ),
    pytest.param(
        cfg(vip(address="::")),
        "vips[0].address",
        "the unspecified address",
        "unicast",
        id="vip-unspecified",
    ),
    pytest.param(
        cfg(vip(address="::1")),
        "vips[0].address",
        "the loopback address",
        "unicast",
        id="vip-loopback",
    ),
    pytest.param(
        cfg(vip(backends=[be("::1")])),
        "vips[0].backends[0].address",
        "loopback address, which cannot be a backend address in mode nat",
        "unicast",
        id="nat-backend-loopback",
    ),
    pytest.param(
        cfg(vip(address="fe80::1")),
        "vips[0].address",
        "link-local",
        "global or unique-local",
        id="vip-link-local",
    ),
    pytest.param(
        cfg(
            vip(), vip(name="api", address="2001:db8:0:10::81", backends=[be("2001:db8:0:10::80")])
        ),
        "vips[1].backends[0].address",
        "is the address of VIP vips[0] (web)",
        "real server's own address",
        id="backend-is-a-vip",
    ),
    pytest.param(
        cfg(vip(backends=[be("2001:db8:0:10::80")])),
        "vips[0].backends[0].address",
        "is the address of VIP vips[0]",
        "not a VIP",
        id="backend-is-its-own-vip",
    ),
    # VIP:port
    pytest.param(
        cfg(vip(ports=[80, 443]), vip(name="web2", ports=[443])),
        "vips[1].ports[0]",
        "[2001:db8:0:10::80]:443/tcp is already served by vips[0] (web)",
        "another port or address",
        id="duplicate-vip-port",
    ),
    pytest.param(
        cfg(vip(), vip(address="2001:db8:0:10::81")),
        "vips[1].name",
        "'web' is already used by vips[0]",
        "its own name",
        id="duplicate-vip-name",
    ),
    pytest.param(
        cfg(vip(ports=[0])), "vips[0].ports[0]", "0 is out of range", "from 1 to 65535", id="port-0"
    ),
    pytest.param(
        cfg(vip(ports=[443, 443])), "vips[0].ports[1]", "listed twice", "once", id="port-twice"
    ),
    pytest.param(cfg(vip(ports=[])), "vips[0].ports", "empty", "at least one port", id="no-ports"),
    # weights and backends
    pytest.param(
        cfg(vip(backends=[be("2001:db8:0:20::1", weight=-1)])),
        "vips[0].backends[0].weight",
        "-1 is out of range",
        "use an integer weight from 0 to 1000",
        id="weight-negative",
    ),
    pytest.param(
        cfg(vip(backends=[be("2001:db8:0:20::1", weight=True)])),
        "vips[0].backends[0].weight",
        "the boolean true is not an integer",
        "use an integer weight from 0 to 1000",
        id="weight-bool",
    ),
    pytest.param(
        cfg(vip(backends=[])),
        "vips[0].backends",
        "the backend list is empty",
        "at least one backend",
        id="no-backends",
    ),
    pytest.param(
        cfg(vip(backends=[be("2001:db8:0:20::1", weight=0), be("2001:db8:0:20::2", weight=0)])),
        "vips[0].backends",
        "every backend has weight 0",
        "drain: true",
        id="all-weight-0",
    ),
    pytest.param(
        cfg(vip(backends=[be("2001:db8:0:20::1"), be("2001:db8:0:20::1")])),
        "vips[0].backends[1]",
        "the same backend as backends[0]",
        "once",
        id="backend-twice",
    ),
    pytest.param(
        cfg(vip("dsr-l2", backends=[be("2001:db8:0:20::1", port=8443)])),
        "vips[0].backends[0].port",
        "must equal the VIP port: DSR rewrites nothing",
        "remove `port`",
        id="dsr-port-differs",
    ),
    pytest.param(
        cfg(vip("dsr-l2", backends=[be("2001:db8:0:20::1", mac="03:00:00:00:00:01")])),
        "vips[0].backends[0].mac",
        "not a unicast MAC",
        "02:00:00:00:00:01",
        id="mac-multicast",
    ),
    # options that do not fit the mode
    pytest.param(
        cfg(vip("proxy-l4", snat="2001:db8:0:1::2")),
        "vips[0].snat",
        "option `snat` does not fit mode proxy-l4",
        "mode nat only",
        id="snat-on-proxy",
    ),
    pytest.param(
        cfg(vip("dsr-l2", mtu=9000)),
        "vips[0].mtu",
        "option `mtu` does not fit mode dsr-l2",
        "dsr-ip6ip6 and dsr-srv6",
        id="mtu-on-dsr-l2",
    ),
    pytest.param(
        cfg(vip("nat", proxy_protocol="v2")),
        "vips[0].proxy_protocol",
        "does not fit mode nat",
        "proxy-l4",
        id="proxy-protocol-on-nat",
    ),
    pytest.param(
        cfg(vip("proxy-l4", forwarded_headers=True)),
        "vips[0].forwarded_headers",
        "does not fit mode proxy-l4",
        "proxy-l7",
        id="forwarded-on-l4",
    ),
    pytest.param(
        cfg(vip("nat", backends=[be("2001:db8:0:20::1", mac="02:00:00:00:00:01")])),
        "vips[0].backends[0].mac",
        "option `mac` does not fit mode nat",
        "only dsr-l2 backends",
        id="mac-on-nat",
    ),
    pytest.param(
        cfg(vip("dsr-ip6ip6", backends=[be("2001:db8:0:20::1", sid="fd00::1")])),
        "vips[0].backends[0].sid",
        "option `sid` does not fit mode dsr-ip6ip6",
        "only dsr-srv6 backends",
        id="sid-on-ip6ip6",
    ),
    pytest.param(
        cfg(vip("nat", snat_ports="1024-2047")),
        "vips[0].snat_ports",
        "without snat",
        "add `snat:`",
        id="snat-ports-alone",
    ),
    pytest.param(
        cfg(vip("nat", snat="2001:db8:0:1::2", snat_ports="2000-1000")),
        "vips[0].snat_ports",
        "not a range",
        "1024-65535",
        id="snat-ports-reversed",
    ),
    pytest.param(
        cfg(vip("proxy-l7", protocol="udp")),
        "vips[0].protocol",
        "HTTP over TCP only",
        "proxy-l4",
        id="l7-udp",
    ),
    pytest.param(
        cfg(vip("proxy-l4", dual_stack="2001:db8::1")),
        "vips[0].dual_stack",
        "is not an IPv4 address",
        "192.0.2.10",
        id="dual-stack-not-ipv4",
    ),
    pytest.param(
        cfg(vip("proxy-l7", trusted_sources=["2001:db8:100::1/56"])),
        "vips[0].trusted_sources[0]",
        "host bits set",
        "2001:db8:100::/56",
        id="trusted-host-bits",
    ),
    pytest.param(
        cfg(vip("proxy-l4", timeouts={"connect": 0})),
        "vips[0].timeouts.connect",
        "0 is out of range",
        "seconds",
        id="timeout-zero",
    ),
    pytest.param(
        cfg(vip("dsr-srv6", mtu=1200)),
        "vips[0].mtu",
        "1200 is out of range",
        "MTU from 1280",
        id="mtu-below-1280",
    ),
    pytest.param(
        {"vips": [vip("dsr-ip6ip6")]},
        "vips[0].tunnel_source",
        "needs an outer source address",
        "lb.addresses",
        id="no-tunnel-source",
    ),
    # schedulers
    pytest.param(
        cfg(vip("nat", scheduler="round-robin")),
        "vips[0].scheduler",
        "mode nat cannot honour scheduler round-robin",
        "without sharing state",
        id="nat-round-robin",
    ),
    pytest.param(
        cfg(vip("dsr-srv6", scheduler="least-connections")),
        "vips[0].scheduler",
        "mode dsr-srv6 cannot honour",
        "scheduler: maglev",
        id="dsr-least-connections",
    ),
    pytest.param(
        cfg(vip("nat", table_size=65536)),
        "vips[0].table_size",
        "65536 is not prime",
        "65537",
        id="table-not-prime",
    ),
    pytest.param(
        cfg(vip("proxy-l4", scheduler="round-robin", table_size=65537)),
        "vips[0].table_size",
        "applies to scheduler maglev only",
        "scheduler: maglev",
        id="table-size-round-robin",
    ),
    pytest.param(
        cfg(vip("nat", table_size=3, backends=[be(f"2001:db8:0:20::{i}") for i in range(1, 6)])),
        "vips[0].table_size",
        "cannot hold 5 backends",
        "100 times",
        id="table-too-small",
    ),
    # modes
    pytest.param(
        cfg(vip("npt")), "vips[0].mode", "npt is not a VIP mode", "`npt:` section", id="mode-npt"
    ),
    pytest.param(
        cfg(vip("anycast")),
        "vips[0].mode",
        "anycast is not a VIP mode",
        "`bgp:`",
        id="mode-anycast",
    ),
    pytest.param(
        cfg(vip("proxy_l4")),
        "vips[0].mode",
        "the string 'proxy_l4' is not one of the choices",
        "did you mean `proxy-l4`?",
        id="mode-typo",
    ),
    # health
    pytest.param(
        cfg(vip(health={"interval": 1, "timeout": 1})),
        "vips[0].health.timeout",
        "not shorter than the interval",
        "below the interval",
        id="health-timeout-not-below-interval",
    ),
    pytest.param(
        cfg(vip(health={"rise": 0})),
        "vips[0].health.rise",
        "0 is out of range",
        "from 1 to 100",
        id="health-rise-0",
    ),
    pytest.param(
        cfg(vip(health={"fall": 0})),
        "vips[0].health.fall",
        "0 is out of range",
        "from 1 to 100",
        id="health-fall-0",
    ),
    pytest.param(
        cfg(vip(health={"type": "tcp", "path": "/healthz"})),
        "vips[0].health.path",
        "applies to health type http only",
        "type: http",
        id="health-path-on-tcp",
    ),
    pytest.param(
        cfg(vip(health={"type": "none", "interval": 5})),
        "vips[0].health.interval",
        "does nothing with health type none",
        "type: tcp",
        id="health-none-with-interval",
    ),
    pytest.param(
        cfg(vip(health={"type": "http", "path": "healthz"})),
        "vips[0].health.path",
        "not an HTTP request path",
        "/healthz",
        id="health-path-relative",
    ),
    pytest.param(
        cfg(vip(health={"type": "http", "path": '/health"z'})),
        "vips[0].health.path",
        "not an HTTP request path",
        "%22",
        id="health-path-quote",
    ),
    pytest.param(
        cfg(vip(health={"type": "http", "path": "/h z"})),
        "vips[0].health.path",
        "not an HTTP request path",
        "%20",
        id="health-path-space",
    ),
    # npt
    pytest.param(
        cfg(npt=[npt("10.0.0.0/8", "2001:db8:1::/48")]),
        "npt[0].inside",
        "is an IPv4 prefix",
        "IPv6-only",
        id="npt-ipv4",
    ),
    pytest.param(
        cfg(npt=[npt("fd00:1:2::1/48", "2001:db8:1::/48")]),
        "npt[0].inside",
        "has host bits set",
        "fd00:1:2::/48",
        id="npt-host-bits",
    ),
    pytest.param(
        cfg(npt=[npt("fd00:1:2::/48", "2001:db8:1:0:1::/80")]),
        "npt[0].outside",
        "longer than /64",
        "/64 or shorter",
        id="npt-longer-than-64",
    ),
    pytest.param(
        cfg(
            npt=[npt("fd00:1:2::/48", "2001:db8:1::/48"), npt("fd00:1:2:3::/64", "2001:db8:2::/48")]
        ),
        "npt[1].inside",
        "fd00:1:2:3::/64 overlaps npt[0].inside fd00:1:2::/48",
        "do not overlap",
        id="npt-inside-overlap",
    ),
    pytest.param(
        cfg(npt=[npt("fd00:1:2::/48", "2001:db8:1::/48"), npt("fd00:1:3::/48", "2001:db8:1::/48")]),
        "npt[1].outside",
        "overlaps npt[0].outside",
        "do not overlap",
        id="npt-outside-overlap",
    ),
    pytest.param(
        cfg(
            npt=[npt("fd00:1:2::/48", "2001:db8:1::/48"), npt("2001:db8:1::/48", "2001:db8:2::/48")]
        ),
        "npt[1].inside",
        "overlaps npt[0].outside",
        "translated twice",
        id="npt-inside-is-an-outside",
    ),
    pytest.param(
        cfg(npt=[{"inside": "fd00:1:2::/48"}]),
        "npt[0].outside",
        "`outside` is required",
        "add `outside:",
        id="npt-missing-outside",
    ),
    pytest.param(
        cfg(vip(address="2001:db8:1::80"), npt=[npt("fd00:1:2::/48", "2001:db8:1::/48")]),
        "vips[0].address",
        "lies inside npt[0].outside 2001:db8:1::/48",
        "move the VIP out of the NPT prefixes",
        id="vip-inside-npt-outside",
    ),
    pytest.param(
        cfg(vip(address="fd00:1:2::80"), npt=[npt("fd00:1:2::/48", "2001:db8:1::/48")]),
        "vips[0].address",
        "lies inside npt[0].inside",
        "move the VIP out",
        id="vip-inside-npt-inside",
    ),
    # structure, unknown keys, lb
    pytest.param(
        {"vipz": []}, "vipz", "unknown section `vipz`", "did you mean `vips`?", id="section-typo"
    ),
    pytest.param(
        {"frontends": []},
        "frontends",
        "unknown section",
        "vips, npt, lb, topology, bgp",
        id="section-unknown",
    ),
    pytest.param(
        cfg(vip(protocl="tcp")),
        "vips[0].protocl",
        "unknown key `protocl`",
        "did you mean `protocol`?",
        id="vip-key-typo",
    ),
    pytest.param(
        cfg(vip(backends=[be("2001:db8:0:20::1", wieght=2)])),
        "vips[0].backends[0].wieght",
        "unknown key",
        "did you mean `weight`?",
        id="backend-key-typo",
    ),
    pytest.param(
        {"vips": None}, "vips", "`vips` has no value", "remove the line", id="section-empty"
    ),
    pytest.param(None, "(top level)", "the file is empty", "vips, npt", id="file-empty"),
    pytest.param(["vips"], "(top level)", "must be a mapping", "key: value", id="file-a-list"),
    pytest.param(
        {"vips": {"name": "web"}}, "vips", "is not a list", "- name: web", id="vips-not-a-list"
    ),
    pytest.param(
        cfg(vip(name=None)), "vips[0].name", "has no value", "give `name` a value", id="null-key"
    ),
    pytest.param(
        {"lb": {"instance": "a-very-long-name"}},
        "lb.instance",
        "not a valid instance name",
        "1 to 10 characters",
        id="lb-instance-long",
    ),
    pytest.param(
        {"lb": {"control_socket": "v6lb.sock"}},
        "lb.control_socket",
        "not usable as a Unix socket path",
        "absolute path",
        id="lb-socket-relative",
    ),
    pytest.param(
        {"lb": {"metrics": "2001:db8::2:9105"}},
        "lb.metrics",
        "not an address and port",
        "IPv6 address in brackets",
        id="lb-metrics-no-brackets",
    ),
    pytest.param(
        {"lb": {"metrics": "[2001:db8::2]:0"}},
        "lb.metrics",
        "port 0 is out of range",
        "from 1 to 65535",
        id="lb-metrics-port-zero",
    ),
    pytest.param(
        {"lb": {"metrics": "[2001:db8::2]:65536"}},
        "lb.metrics",
        "port 65536 is out of range",
        "from 1 to 65535",
        id="lb-metrics-port-big",
    ),
    pytest.param(
        {"lb": {"metrics": "[192.0.2.2]:9105"}},
        "lb.metrics",
        "IPv4 address",
        "IPv6-only",
        id="lb-metrics-ipv4",
    ),
    pytest.param(
        {"lb": {"metrics": "[fe80::1]:9105"}},
        "lb.metrics",
        "link-local",
        "unique-local",
        id="lb-metrics-link-local",
    ),
    pytest.param(
        {"lb": {"metrics": 9105}},
        "lb.metrics",
        "is not a non-empty string",
        "[2001:db8::2]:9105",
        id="lb-metrics-number",
    ),
    pytest.param(
        {"lb": {"flow_hash_seed": 1 << 32}},
        "lb.flow_hash_seed",
        "4294967296 is out of range",
        "from 0 to 4294967295",
        id="lb-seed-too-big",
    ),
    pytest.param(
        {"lb": {"interfaces": ["a-very-long-ifname0"]}},
        "lb.interfaces[0]",
        "not a valid Linux interface name",
        "1 to 15 characters",
        id="lb-ifname-long",
    ),
    pytest.param(
        {"lb": {"addresses": ["192.0.2.2"]}},
        "lb.addresses[0]",
        "IPv4 address",
        "IPv6-only",
        id="lb-address-ipv4",
    ),
    pytest.param(
        {"topology": ["node"]},
        "topology",
        "must be a mapping",
        "key: value",
        id="topology-not-a-mapping",
    ),
]


@pytest.mark.parametrize(("data", "path", "message", "fix"), REJECTIONS)
def test_rejects(data: object, path: str, message: str, fix: str) -> None:
    err = reject(data)
    assert err.file == "x.yaml"
    assert err.path == path
    assert message in err.message
    assert fix in err.fix
    assert str(err) == f"x.yaml: {path}: {err.message}; fix: {err.fix}"


def test_error_reads_file_path_message_fix() -> None:
    data = cfg(vip(), vip(name="api", address="2001:db8:0:10::81"))
    data["vips"][1]["backends"][0]["weight"] = 5000
    assert str(reject(data)) == (
        "x.yaml: vips[1].backends[0].weight: 5000 is out of range;"
        " fix: use an integer weight from 0 to 1000"
    )


def test_lb_metrics_reads_address_and_port() -> None:
    lb = parse_config({"lb": {"metrics": "[2001:db8::2]:9105"}}).lb
    assert lb.metrics is not None
    assert (str(lb.metrics.address), lb.metrics.port) == ("2001:db8::2", 9105)
    assert str(lb.metrics) == "[2001:db8::2]:9105"
    assert parse_config({"lb": {"instance": "x"}}).lb.metrics is None


def test_udp_and_tcp_may_share_address_and_port() -> None:
    config = parse_config(cfg(vip(), vip(name="web-udp", protocol="udp")))
    assert [v.protocol for v in config.vips] == [Protocol.TCP, Protocol.UDP]


def test_validation_does_not_change_its_input() -> None:
    data = cfg(vip("proxy-l4", timeouts={"idle": 30}), npt=[npt("fd00:1::/48", "2001:db8:1::/48")])
    before = copy.deepcopy(data)
    parse_config(data)
    assert data == before
    bad = cfg(vip(ports=[0]))
    before = copy.deepcopy(bad)
    reject(bad)
    assert bad == before


# --- what a valid file turns into ---------------------------------------------------


def test_defaults_per_mode() -> None:
    config = parse_config(
        cfg(
            vip("nat", name="a", address="2001:db8:0:10::1"),
            vip("proxy-l4", name="b", address="2001:db8:0:10::2"),
            vip("proxy-l7", name="c", address="2001:db8:0:10::3"),
            vip("dsr-l2", name="d", address="2001:db8:0:10::4"),
            vip("dsr-ip6ip6", name="e", address="2001:db8:0:10::5"),
            vip("dsr-srv6", name="f", address="2001:db8:0:10::6"),
            vip("nat", name="g", address="2001:db8:0:10::7", protocol="udp"),
        )
    )
    a, b, c, d, e, f, g = config.vips
    assert (a.scheduler, a.table_size) == (Scheduler.MAGLEV, 65537)
    assert (b.scheduler, b.table_size) == (Scheduler.ROUND_ROBIN, None)
    assert c.scheduler is Scheduler.ROUND_ROBIN
    assert a.options == NatOptions(snat=None, snat_ports=(1024, 65535))
    assert b.options == ProxyL4Options(
        proxy_protocol=ProxyProtocol.NONE,
        trusted_proxy_sources=(),
        timeouts=Timeouts(connect=5.0, idle=300.0, total=None),
        dual_stack=None,
    )
    assert c.options == ProxyL7Options(
        forwarded_headers=True,
        trusted_sources=(),
        max_request_bytes=None,
        max_header_bytes=65536,
        timeouts=Timeouts(connect=5.0, idle=60.0),
    )
    assert d.options == DsrL2Options()
    assert e.options == TunnelOptions(tunnel_source=IPv6Address("2001:db8:0:1::2"), mtu=1500)
    assert f.backends[0].sid == IPv6Address("2001:db8:0:20::1")
    assert e.backends[0].sid is None
    assert a.health == HealthCheck(HealthType.TCP, 2.0, 1.0, 2, 3, None, None)
    assert g.health.type is HealthType.NONE  # no generic UDP probe
    assert a.backends[0] == Backend(IPv6Address("2001:db8:0:20::1"), None, 1, False, None, None)
    assert config.lb.control_socket == "/run/v6lb/lb0.sock"
    assert config.lb.flow_hash_seed == 0


def test_explicit_values_are_kept() -> None:
    data = cfg(
        vip(
            "proxy-l7",
            ports=[80, 8080],
            scheduler="least-connections",
            forwarded_headers=False,
            trusted_sources=["2001:db8:100::/56"],
            max_request_bytes=0,
            timeouts={"connect": 2.5, "idle": 30, "total": 600},
            dual_stack="192.0.2.10",
            health={"type": "http", "path": "/up", "interval": 0.5, "rise": 1, "fall": 5},
            backends=[be("2001:db8:0:20::1", port=8000, weight=1000, drain=True), be("::1")],
        ),
        vip(
            "dsr-srv6",
            name="v",
            address="2001:db8:0:10::90",
            table_size=251,
            tunnel_source="2001:db8:0:1::99",
            mtu=9000,
            backends=[
                be("2001:db8:0:50::1", sid="fd00:50::100", port=443, weight=0),
                be("fd00::2"),
            ],
        ),
        npt=[npt("fd00:1:2::/48", "2001:db8:1::/48")],
        lb={
            "instance": "edge-1",
            "addresses": ["2001:db8:0:1::2"],
            "interfaces": ["eth0"],
            "flow_hash_seed": 0x5EED,
        },
        bgp={"asn": 64512},
    )
    config = parse_config(data)
    web, v = config.vips
    assert web.ports == (80, 8080)
    assert web.options == ProxyL7Options(
        forwarded_headers=False,
        trusted_sources=(IPv6Network("2001:db8:100::/56"),),
        max_request_bytes=0,
        max_header_bytes=65536,
        timeouts=Timeouts(2.5, 30.0, 600.0),
        dual_stack=IPv4Address("192.0.2.10"),
    )
    assert web.health == HealthCheck(HealthType.HTTP, 0.5, 0.25, 1, 5, "/up", None)
    assert web.backends == (
        Backend(IPv6Address("2001:db8:0:20::1"), 8000, 1000, True),
        Backend(IPv6Address("::1")),
    )
    assert v.table_size == 251
    assert v.options == TunnelOptions(IPv6Address("2001:db8:0:1::99"), 9000)
    assert v.backends[0].sid == IPv6Address("fd00:50::100")
    assert v.backends[0].port == 443
    assert config.npt == (NptPair(IPv6Network("fd00:1:2::/48"), IPv6Network("2001:db8:1::/48")),)
    assert config.lb.instance == "edge-1"
    assert config.lb.control_socket == "/run/v6lb/edge-1.sock"
    assert config.lb.flow_hash_seed == 0x5EED
    assert config.topology is None  # a typed topology: tests/test_topology.py
    assert config.bgp == BgpSection(BgpSettings(asn=64512))
    assert config.vip("v") is v


def test_file_round_trip(tmp_path: Path) -> None:
    data = cfg(
        vip("nat", snat="2001:db8:0:1::/120", snat_ports="2000-2999"),
        npt=[npt("fd00:1:2::/48", "2001:db8:1::/48")],
    )
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    loaded = load_config(path)
    assert loaded == parse_config(data, str(path))
    assert loaded.vips[0].options == NatOptions(IPv6Network("2001:db8:0:1::/120"), (2000, 2999))
    assert loaded.source == str(path)


def test_example_loads() -> None:
    config = load_config(EXAMPLE)
    assert {v.mode for v in config.vips} == set(VipMode)
    assert config.npt == (NptPair(IPv6Network("fd00:1:2::/48"), IPv6Network("2001:db8:1::/48")),)
    documentation = IPv6Network("2001:db8::/32")
    ula = IPv6Network("fd00::/8")
    addresses = [v.address for v in config.vips] + [
        b.address for v in config.vips for b in v.backends
    ]
    assert all(a in documentation or a in ula for a in addresses)
    summary = summarize(config)
    assert "vip web: [2001:db8:0:10::80]:80,443/tcp mode proxy-l4" in summary
    assert "npt fd00:1:2::/48 <-> 2001:db8:1::/48" in summary
    assert "backend [2001:db8:0:20::12]:8080 weight 1, draining (existing flows only)" in summary


# --- YAML text --------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "vips:\n  - name: web\n    address: [2001:db8::1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path.startswith("line 4,")
    assert "YAML syntax error" in info.value.message
    assert "unclosed quote or bracket" in info.value.fix


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "lb:\n  instance: a\n  instance: b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == "line 3, column 3"
    assert "duplicate key 'instance' (first given on line 2)" in info.value.message
    assert "keep one" in info.value.fix


def test_unquoted_address_read_as_a_number(tmp_path: Path) -> None:
    # YAML 1.1 reads colon-separated small numbers as base 60.
    text = "vips:\n  - name: web\n    mode: nat\n    address: 2001:10:20:30:40:50:0:1\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.path == "vips[0].address"
    assert "put the value in quotes" in info.value.fix


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "cannot read the file" in info.value.message
    assert "check the file name" in info.value.fix


# --- v6lb check -----------------------------------------------------------------------


def test_check_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # every health setting is honoured: no warning
    assert out.startswith(f"{EXAMPLE}: valid\nlb lb1: addresses 2001:db8:0:1::2;")
    assert "vip dns: [2001:db8:0:10::53]:53/udp mode nat, scheduler maglev (table 65537)" in out
    assert "  options: SNAT to 2001:db8:0:1::2 ports 1024-65535" in out
    assert "  health: http GET /healthz expecting 200-399 every 5 s, timeout 2 s" in out
    assert "video-srv6" in out and "sid fd00:50::1:100" in out


def test_check_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = cfg(vip(backends=[be("2001:db8:0:20::1", weight=5000)]))
    path = write(tmp_path, yaml.safe_dump(data))
    assert main(["check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"v6lb: error: {path}: vips[0].backends[0].weight: 5000 is out of range;"
        " fix: use an integer weight from 0 to 1000\n"
    )


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope.yaml")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"v6lb: error: {tmp_path / 'nope.yaml'}: cannot read the file:")
