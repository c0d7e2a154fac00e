"""The topology: section: the example loads, routing is computed, bad input names field and fix."""

from __future__ import annotations

import copy
from collections.abc import Callable
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest
import yaml

from v6lb.model.config import load_topology, parse_config
from v6lb.model.schema import ConfigError
from v6lb.model.topology import (
    NodeType,
    Topology,
    compute_fib,
    lookup,
    neighbour,
    require_topology,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "eks-ipv6.yaml"
ANYCAST = IPv6Address("2001:db8:a:1a0::1")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    data = yaml.safe_load(EXAMPLE.read_text())
    assert isinstance(data, dict)
    return data


def _parse(data: dict[str, Any]) -> Topology:
    return require_topology(parse_config(data, "t.yaml"))


def test_example_loads() -> None:
    config, topo = load_topology(EXAMPLE)
    kinds = {n.name: n.type for n in topo.nodes}
    assert kinds["client"] is NodeType.HOST
    assert kinds["lb-a1"] is NodeType.LB
    assert [n.name for n in topo.nodes if n.role == "node"] == ["node1", "node2", "node3"]
    assert sum(1 for n in topo.nodes if n.role == "pod") == 6
    assert topo.owner("fd00:10:0:2::a") == "pod-2a"
    assert topo.node("pod-2a").on_node == "node2"
    assert topo.link("private").mtu == 1500
    assert {n.site for n in topo.lbs()} == {"primary", "backup"}
    # A host with one router on its only link gets a default route through it.
    (route,) = topo.node("client").routes
    assert str(route.prefix) == "::/0" and route.via == IPv6Address("2001:db8:ffff::1")
    assert {v.name for v in config.vips} <= set(topo.node("lb-a1").serves)


def test_anycast_routes_pick_lowest_cost_and_ecmp() -> None:
    _, topo = load_topology(EXAMPLE)
    fib = compute_fib(topo)
    igw = lookup(fib["igw"], ANYCAST, None)
    assert igw is not None and igw.origin == "bgp"
    assert [neighbour(topo, h, ANYCAST) for h in igw.nexthops] == ["lb-a1", "lb-a2"]
    isp = lookup(fib["isp"], ANYCAST, None)
    assert isp is not None and [neighbour(topo, h, ANYCAST) for h in isp.nexthops] == ["igw"]
    assert isp.metric == 12  # two hops + cost 10
    # One instance down: ECMP shrinks to the other.
    igw1 = lookup(compute_fib(topo, {"lb-a1"})["igw"], ANYCAST, None)
    assert igw1 is not None and [neighbour(topo, h, ANYCAST) for h in igw1.nexthops] == ["lb-a2"]
    # The whole primary site down: recomputed from the backup site's announcement.
    after = compute_fib(topo, {"lb-a1", "lb-a2"})
    isp2 = lookup(after["isp"], ANYCAST, None)
    assert isp2 is not None and isp2.metric == 101
    assert [neighbour(topo, h, ANYCAST) for h in isp2.nexthops] == ["lb-b1"]


def test_source_specific_route_wins_for_vip_sourced_replies() -> None:
    _, topo = load_topology(EXAMPLE)
    fib = compute_fib(topo)["node1"]
    client = IPv6Address("2001:db8:ffff::100")
    plain = lookup(fib, client, IPv6Address("fd00:10:0:1::a"))
    from_vip = lookup(fib, client, IPv6Address("2001:db8:a:100::84"))
    assert plain is not None and plain.nexthops[0].via == IPv6Address("fd00:10::a1")
    assert from_vip is not None and from_vip.nexthops[0].via == IPv6Address("fd00:10::1")


def _node(d: dict[str, Any], name: str) -> dict[str, Any]:
    node = d["topology"]["nodes"][name]
    assert isinstance(node, dict)
    return node


def _link(d: dict[str, Any], name: str) -> dict[str, Any]:
    return next(lk for lk in d["topology"]["links"] if lk["name"] == name)


def _unknown_type(d: dict[str, Any]) -> None:
    d["topology"]["nodes"]["isp"] = {"type": "switch"}


def _missing_node(d: dict[str, Any]) -> None:
    _link(d, "internet")["endpoints"]["ghost"] = "2001:db8:ffff::9"


def _overlap(d: dict[str, Any]) -> None:
    _link(d, "pods-3")["subnet"] = "fd00:10::/60"
    _link(d, "pods-3")["endpoints"] = {"node3": "fd00:10::f3", "pod-3a": "fd00:10::3a"}


def _outside_subnet(d: dict[str, Any]) -> None:
    _link(d, "public")["endpoints"]["lb-a2"] = "2001:db8:b::11"


def _vip_not_served(d: dict[str, Any]) -> None:
    _node(d, "lb-a1")["serves"] = ["web-l4", "web-l7", "web-l2", "web-ip6ip6", "web-srv6", "npt"]
    _node(d, "lb-a2")["serves"] = ["web-anycast"]


def _vip_not_routed(d: dict[str, Any]) -> None:
    _node(d, "isp")["routes"] = [{"prefix": "2001:db8:10::/48", "via": "2001:db8:fffe:a::2"}]


def _backend_nowhere(d: dict[str, Any]) -> None:
    d["vips"][2]["backends"][0]["address"] = "fd00:10:0:9::a"


def _via_off_link(d: dict[str, Any]) -> None:
    _node(d, "igw")["routes"][0]["via"] = "2001:db8:ffff::1"


def _bgp_unknown_site(d: dict[str, Any]) -> None:
    d["bgp"]["announcements"][1]["site"] = "mars"


def _dsr_l2_off_link(d: dict[str, Any]) -> None:
    d["vips"][3]["backends"][0]["address"] = "fd00:10:0:1::b"


def _no_topology(d: dict[str, Any]) -> None:
    del d["topology"]


def _lb_without_inside(d: dict[str, Any]) -> None:
    del _node(d, "lb-b1")["inside"]


def _lb_key_on_router(d: dict[str, Any]) -> None:
    _node(d, "isp")["site"] = "primary"


def _unknown_key(d: dict[str, Any]) -> None:
    _node(d, "pod-1a")["no_such_key"] = 1


CASES: list[tuple[str, Callable[[dict[str, Any]], None], str, str, str]] = [
    (
        "unknown node type",
        _unknown_type,
        "topology.nodes.isp.type",
        "not one of",
        "host, router, lb, backend",
    ),
    (
        "link to a missing node",
        _missing_node,
        "topology.links[0].endpoints.ghost",
        "not in topology.nodes",
        "add `ghost`",
    ),
    ("overlapping prefixes", _overlap, "topology.links[8].subnet", "overlaps", "non-overlapping"),
    (
        "address outside its subnet",
        _outside_subnet,
        "topology.links[3].endpoints.lb-a2",
        "outside the subnet",
        "inside 2001:db8:a::/64",
    ),
    ("VIP served by no LB", _vip_not_served, "vips[2]", "served by no LB node", "serves:"),
    (
        "VIP not routed",
        _vip_not_routed,
        "vips[0].address",
        "not routed",
        "topology.nodes.isp.routes",
    ),
    (
        "backend on no node",
        _backend_nowhere,
        "vips[2].backends[0].address",
        "on no node",
        "give a backend",
    ),
    (
        "next hop not on a link",
        _via_off_link,
        "topology.nodes.igw.routes[0].via",
        "not on any link",
        "neighbour",
    ),
    (
        "bgp site of no LB",
        _bgp_unknown_site,
        "bgp.announcements[1].site",
        "no LB node has site",
        "primary",
    ),
    (
        "dsr-l2 backend off the LB's link",
        _dsr_l2_off_link,
        "vips[3].backends[0].address",
        "shares no link",
        "inside link",
    ),
    ("no topology section", _no_topology, "topology", "no `topology:` section", "add one"),
    (
        "two-armed LB without inside",
        _lb_without_inside,
        "topology.nodes.lb-b1",
        "none is marked inside",
        "inside: [LINK]",
    ),
    ("lb key on a router", _lb_key_on_router, "topology.nodes.isp.site", "type lb", "remove it"),
    (
        "unknown node key",
        _unknown_key,
        "topology.nodes.pod-1a.no_such_key",
        "unknown key",
        "known keys",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "path", "message", "fix"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_topology_names_field_and_fix(
    raw: dict[str, Any],
    mutate: Callable[[dict[str, Any]], None],
    path: str,
    message: str,
    fix: str,
) -> None:
    data = copy.deepcopy(raw)
    mutate(data)
    with pytest.raises(ConfigError) as info:
        _parse(data)
    err = info.value
    assert err.file == "t.yaml"
    assert err.path == path, str(err)
    assert message in err.message, str(err)
    assert fix in err.fix, str(err)


def test_default_route_needs_a_single_router(raw: dict[str, Any]) -> None:
    data = copy.deepcopy(raw)
    topo = _parse(data)
    assert topo.node("pod-1a").routes[0].via == IPv6Address("fd00:10:0:1::1")
    assert topo.node("node1").routes  # routers keep exactly what they list
