"""``dump(config)`` writes YAML that ``parse_config`` reads back into an equal Config.

A property test draws valid files (every VIP mode with its options, npt pairs, every
lb: key, a topology and a bgp: section), parses them, dumps and parses again; every
example file round-trips too. Defaults stay out of the dump.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from v6lb.model.config import Config, load_config, parse_config
from v6lb.model.config_dump import dump

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
MODES = ["nat", "dsr-l2", "dsr-ip6ip6", "dsr-srv6", "proxy-l4", "proxy-l7"]
SECONDS = [0.25, 0.5, 1, 2.0, 3.5, 30, 600]


def round_trip(config: Config) -> Config:
    text = dump(config)
    return parse_config(yaml.safe_load(text), config.source)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_round_trips(path: Path) -> None:
    first = load_config(path)
    again = round_trip(first)
    assert again == first
    assert again.topology == first.topology and again.bgp == first.bgp  # (compared above too)


def test_defaults_stay_out() -> None:
    config = parse_config(
        {
            "vips": [
                {
                    "name": "web",
                    "address": "2001:db8:100::1",
                    "ports": [80],
                    "mode": "nat",
                    "backends": [{"address": "2001:db8:200::2"}],
                }
            ]
        },
        "t.yaml",
    )
    assert yaml.safe_load(dump(config)) == {
        "vips": [
            {
                "name": "web",
                "address": "2001:db8:100::1",
                "ports": [80],
                "protocol": "tcp",
                "mode": "nat",
                "backends": [{"address": "2001:db8:200::2"}],
            }
        ]
    }
    assert dump(Config("t.yaml")) == "{}\n"
    assert round_trip(Config("t.yaml")) == Config("t.yaml")


def test_derived_file_changes_only_what_was_replaced() -> None:
    """The labs' way: dataclasses.replace on the typed config, then dump."""
    config = load_config(EXAMPLES[0].parent / "lab-modes.yaml")
    lb = replace(config.lb, instance="n1", addresses=(IPv6Address("fd00:20::1"),))
    derived = replace(config, lb=lb, topology=None, bgp=None)
    again = round_trip(derived)
    assert again == derived
    assert again.lb.control_socket == "/run/v6lb/lab.sock"  # kept: replace named no socket
    assert again.vips == config.vips  # the tunnel sources stayed as they were


# --- the property ------------------------------------------------------------------


def _timeouts(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.sets(st.sampled_from(["connect", "idle", "total"])))
    return {k: draw(st.sampled_from(SECONDS)) for k in sorted(keys)}


def _prefixes(draw: st.DrawFn) -> list[str]:
    return draw(st.lists(st.sampled_from(["2001:db8:e::/48", "fd00:7::/64", "::/0"]), unique=True))


@st.composite
def _vip(draw: st.DrawFn, i: int, lb_addresses: list[str]) -> dict[str, Any]:
    mode = draw(st.sampled_from(MODES))
    proxy = mode.startswith("proxy")
    dsr = mode.startswith("dsr")
    ports = draw(st.lists(st.integers(1, 65535), min_size=1, max_size=3, unique=True))
    v: dict[str, Any] = {"name": f"v{i}", "address": f"2001:db8:100::{i + 1:x}", "ports": ports}
    if mode != "proxy-l7" and draw(st.booleans()):
        v["protocol"] = draw(st.sampled_from(["tcp", "udp"]))
    v["mode"] = mode
    if proxy and draw(st.booleans()):
        v["scheduler"] = draw(st.sampled_from(["maglev", "round-robin", "least-connections"]))
    if (not proxy or v.get("scheduler") == "maglev") and draw(st.booleans()):
        v["table_size"] = draw(st.sampled_from([251, 1009, 65537]))
    backends = []
    for j in draw(st.lists(st.integers(2, 40), min_size=1, max_size=4, unique=True)):
        b: dict[str, Any] = {"address": f"2001:db8:200::{j:x}"}
        if not dsr and draw(st.booleans()):
            b["port"] = draw(st.integers(1, 65535))
        if draw(st.booleans()):
            b["weight"] = draw(st.integers(0 if backends else 1, 1000))
        if draw(st.booleans()):
            b["drain"] = draw(st.booleans())
        if mode == "dsr-l2" and draw(st.booleans()):
            b["mac"] = f"02:00:00:00:00:{j:02x}"
        if mode == "dsr-srv6" and draw(st.booleans()):
            b["sid"] = draw(st.sampled_from([b["address"], f"fd00:50::{j:x}"]))
        backends.append(b)
    v["backends"] = backends
    kind = draw(st.sampled_from([None, "tcp", "http", "none"]))
    if kind == "none":
        v["health"] = {"type": "none"}
    elif kind is not None:
        h: dict[str, Any] = {"type": kind}
        interval = draw(st.sampled_from([0.5, 1, 2.0, 3.5]))
        if draw(st.booleans()):
            h["interval"] = interval
        if draw(st.booleans()):
            h["timeout"] = draw(st.sampled_from([t for t in (0.1, 0.2, 0.25) if t < interval]))
        for key in ("rise", "fall"):
            if draw(st.booleans()):
                h[key] = draw(st.integers(1, 100))
        if kind == "http" and draw(st.booleans()):
            h["path"] = draw(st.sampled_from(["/", "/healthz", "/a/b?c=1"]))
        if kind == "http" and draw(st.booleans()):
            h["method"] = draw(st.sampled_from(["GET", "HEAD"]))
            h["host"] = draw(st.sampled_from(["api.example.com", "[2001:db8::1]:8080"]))
            h["expect"] = draw(st.sampled_from([200, "200-299", [200, "301-302"], ["200-399"]]))
        if draw(st.booleans()):
            h["port"] = draw(st.integers(1, 65535))
        v["health"] = h
    if mode == "nat" and draw(st.booleans()):
        v["snat"] = draw(st.sampled_from(["2001:db8:300::1", "2001:db8:300::/120"]))
        if draw(st.booleans()):
            lo = draw(st.integers(1, 65535))
            v["snat_ports"] = f"{lo}-{draw(st.integers(lo, 65535))}"
    if mode in ("dsr-ip6ip6", "dsr-srv6"):
        if not lb_addresses or draw(st.booleans()):
            v["tunnel_source"] = draw(st.sampled_from(["fd00:20::1", *lb_addresses]))
        if draw(st.booleans()):
            v["mtu"] = draw(st.integers(1280, 65535))
    if proxy:
        if mode == "proxy-l4":
            if draw(st.booleans()):
                v["proxy_protocol"] = draw(st.sampled_from(["none", "v2"]))
            if draw(st.booleans()):
                v["trusted_proxy_sources"] = _prefixes(draw)
        else:
            if draw(st.booleans()):
                v["forwarded_headers"] = draw(st.booleans())
            if draw(st.booleans()):
                v["trusted_sources"] = _prefixes(draw)
            if draw(st.booleans()):
                v["max_request_bytes"] = draw(st.integers(0, 1 << 40))
            if draw(st.booleans()):
                v["max_header_bytes"] = draw(st.integers(1024, 1 << 20))
        if draw(st.booleans()):
            v["timeouts"] = _timeouts(draw)
        if draw(st.booleans()):
            v["dual_stack"] = "192.0.2.10"
        if draw(st.booleans()):
            v["max_connections_per_source"] = draw(st.integers(0, 1_000_000))
    return v


@st.composite
def _lb(draw: st.DrawFn, addresses: list[str], nat: bool) -> dict[str, Any]:
    lb: dict[str, Any] = {}
    if draw(st.booleans()):
        lb["instance"] = draw(st.sampled_from(["lb0", "edge-1", "x"]))
    if addresses:
        lb["addresses"] = addresses
    if draw(st.booleans()):
        lb["interfaces"] = draw(st.lists(st.sampled_from(["eth0", "eth1", "v6lb-x"]), unique=True))
    if draw(st.booleans()):
        lb["control_socket"] = draw(st.sampled_from(["/run/v6lb/lb0.sock", "/tmp/a.sock"]))
    bounds = {
        "flow_hash_seed": (0, 0xFFFF_FFFF),
        "conntrack_max": (16, 1 << 26),
        "flow_cache_size": (1, 1 << 26),
        "icmp_error_rate": (0, 1_000_000),
        "icmp_error_burst": (1, 1_000_000),
    }
    for key, (lo, hi) in bounds.items():
        if draw(st.booleans()):
            lb[key] = draw(st.integers(lo, hi))
    if draw(st.booleans()):
        lb["metrics"] = draw(st.sampled_from(["[::]:9105", "[2001:db8::2]:1", "[::1]:65535"]))
    if draw(st.booleans()):
        lb["forward_allow"] = draw(
            st.lists(
                st.one_of(
                    st.sampled_from(["fd00:20::/64", "2001:db8:e::/48"]),
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "from": st.sampled_from(["fd00:20::/64", "::/0"]),
                            "to": st.sampled_from(["2001:db8:e::/48", "::/0"]),
                        },
                    ).filter(bool),
                ),
                max_size=4,
            )
        )
    if nat and draw(st.booleans()):
        sync: dict[str, Any] = {
            "interface": "v6lb-sync0",
            "address": "fd00:99::1",
            "peer": "fd00:99::2",
        }
        if draw(st.booleans()):
            sync["port"] = draw(st.integers(1, 65535))
        lb["conntrack_sync"] = sync
    return lb


@st.composite
def _bgp(draw: st.DrawFn, vips: int) -> dict[str, Any]:
    bgp: dict[str, Any] = {}
    if draw(st.booleans()):
        bgp["asn"] = draw(st.sampled_from([64512, 65001, 4_200_000_000]))
        if draw(st.booleans()):
            bgp["router_id"] = draw(st.sampled_from(["192.0.2.11", "10.0.0.1"]))
        hold = draw(st.sampled_from([0, 3, 9, 90]))
        if hold != 3 or draw(st.booleans()):
            bgp["hold"] = hold
        if draw(st.booleans()):
            bgp["keepalive"] = draw(st.integers(1, max(1, hold // 3)))
        bgp_bfd = draw(
            st.sampled_from(
                [None, False, True, {"interval": 0.5}, {"enabled": False, "multiplier": 5}, {}]
            )
        )
        if bgp_bfd is not None:
            bgp["bfd"] = bgp_bfd
        if draw(st.booleans()):
            bgp["med"] = draw(st.integers(0, 4_294_967_295))
        neighbours = []
        for k in range(draw(st.integers(0, 2))):
            n: dict[str, Any] = {"address": f"2001:db8:fffe::{k + 1}", "asn": 65000 + k}
            if draw(st.booleans()):
                n["name"] = draw(st.sampled_from([f"peer{k}", f"up{k}"]))
            if draw(st.booleans()):
                n["interface"] = "up0"
            if draw(st.booleans()):
                n["local_pref"] = draw(st.integers(0, 1000))
            neighbours.append(n)
        if neighbours:
            bgp["neighbours"] = neighbours
    if vips and (draw(st.booleans()) or not bgp):
        bgp["announcements"] = [
            {"prefix": "2001:db8:100::/64", "site": "primary", "cost": draw(st.integers(0, 100))}
        ]
    return bgp


def _topology(draw: st.DrawFn, data: dict[str, Any]) -> dict[str, Any]:
    """client -- rtr -- lb -- one backend node per backend address (the `pods` link)."""
    addresses = sorted(
        {b["address"] for v in data.get("vips", []) for b in v["backends"]},
        key=IPv6Address,
    )
    lb: dict[str, Any] = {"type": "lb", "site": "primary", "inside": ["pods"]}
    names = [v["name"] for v in data.get("vips", [])] + (["npt"] if "npt" in data else [])
    if draw(st.booleans()):
        lb["serves"] = draw(st.permutations(names))
    if draw(st.booleans()):
        lb["routes"] = [{"prefix": "default", "via": "2001:db8:2::1"}]
    if draw(st.booleans()):
        lb["labels"] = ["zone-a"]
    nodes: dict[str, Any] = {
        "client": {"type": "host", "role": "client"},
        "rtr": {
            "type": "router",
            "routes": [{"prefix": "2001:db8:100::/64", "via": "2001:db8:2::10"}],
        },
        "lb": lb,
    }
    pods: dict[str, Any] = {"lb": "2001:db8:200::1"}
    for k, address in enumerate(addresses):
        nodes[f"be{k}"] = {"type": "backend", "role": draw(st.sampled_from(["backend", "pod"]))}
        pods[f"be{k}"] = address
    edge: dict[str, Any] = {"name": "edge", "subnet": "2001:db8:2::/64"}
    if draw(st.booleans()):
        edge["mtu"] = draw(st.integers(1280, 9000))
    if draw(st.booleans()):
        edge["delay"] = draw(st.sampled_from([0.001, 0.005, 0.02]))
    if draw(st.booleans()):
        edge["cost"] = draw(st.integers(1, 10))
    edge["endpoints"] = {"rtr": "2001:db8:2::1", "lb": ["2001:db8:2::10", "2001:db8:2::11"]}
    links = [
        {
            "name": "net",
            "subnet": "2001:db8:1::/64",
            "endpoints": {"client": "2001:db8:1::100", "rtr": "2001:db8:1::1"},
        },
        edge,
        {"name": "pods", "subnet": "2001:db8:200::/64", "endpoints": pods},
    ]
    return {"nodes": nodes, "links": links}


@st.composite
def config_data(draw: st.DrawFn) -> dict[str, Any]:
    lb_addresses = draw(
        st.lists(st.sampled_from(["2001:db8:2::10", "fd00:20::1", "2001:db8:9::1"]), unique=True)
    )
    data: dict[str, Any] = {}
    vips = [draw(_vip(i, lb_addresses)) for i in range(draw(st.integers(0, 4)))]
    if vips:
        data["vips"] = vips
    if draw(st.booleans()):
        count = draw(st.integers(1, 2))
        data["npt"] = [
            {"inside": f"fd00:{k + 1:x}::/48", "outside": f"2001:db8:{k + 10:x}::/48"}
            for k in range(count)
        ]
    lb = draw(_lb(lb_addresses, any(v["mode"] == "nat" for v in vips)))
    if lb:
        data["lb"] = lb
    if draw(st.booleans()):
        data["bgp"] = draw(_bgp(len(vips)))
    if vips and draw(st.booleans()):
        data["topology"] = _topology(draw, data)
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_data())
def test_dump_then_parse_gives_an_equal_config(data: dict[str, Any]) -> None:
    config = parse_config(data, "t.yaml")  # every drawn file is valid
    text = dump(config)
    again = parse_config(yaml.safe_load(text), "t.yaml")
    assert again == config, text
    assert dump(again) == text  # and the dump is stable
