"""Golden tests of the kernel renderers (render/nftables, render/ip6tables, render/routes).

No root: text in, text out. ``V6LB_UPDATE_GOLDEN=1 pytest tests/test_render_golden.py``
rewrites the files under tests/golden/ (review the diff before committing).
The root tests in tests/test_kernel_nat.py load the same renderers' output
into real kernels.
"""

from __future__ import annotations

import copy
import os
import re
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

import pytest

from v6lb.model.config import Config, NptPair, parse_config
from v6lb.model.pools import dsr_forwarder, nat_forwarder, pool_for
from v6lb.render.ip6tables import is_tagged, render_config_npt, render_npt, splice, tagged_rules
from v6lb.render.nftables import (
    L2Ports,
    map_names,
    nat_maps,
    render_backend_nft,
    render_forward_nft,
    render_map_update,
    render_nft,
    render_remove,
    unserved_counters,
    vip_object_name,
    vip_prefixes,
)
from v6lb.render.routes import (
    ROUTE_PROTO,
    TAG_SPAN,
    RenderError,
    ReturnRoute,
    advmss,
    gateway_table,
    instance_tag,
    l2_probe_targets,
    render_backend_routes,
    render_lb_routes,
    tunnel_targets,
)

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("V6LB_UPDATE_GOLDEN") == "1"
SMALL = 13  # a prime table size keeps the golden files readable

NAT_FILE = {
    "lb": {"instance": "g1", "flow_hash_seed": 0x5EED, "addresses": ["2001:db8:0:1::2"]},
    "vips": [
        {
            "name": "web",
            "address": "2001:db8:0:10::80",
            "ports": [80, 443],
            "mode": "nat",
            "table_size": SMALL,
            "backends": [
                {"address": "2001:db8:0:20::1", "weight": 2},
                {"address": "2001:db8:0:20::2"},
                {"address": "2001:db8:0:20::3"},
            ],
        },
        {
            "name": "api",
            "address": "2001:db8:0:10::81",
            "ports": [443],
            "mode": "nat",
            "table_size": SMALL,
            "snat": "2001:db8:0:1::2",
            "snat_ports": "20000-29999",
            "backends": [
                {"address": "2001:db8:0:20::11", "port": 8443},
                {"address": "2001:db8:0:20::12", "port": 8443},
            ],
        },
        {
            "name": "dns",
            "address": "2001:db8:0:10::80",
            "ports": [53],
            "protocol": "udp",
            "mode": "nat",
            "table_size": SMALL,
            "snat": "2001:db8:0:1::100/120",
            "backends": [{"address": "2001:db8:0:30::1"}, {"address": "2001:db8:0:30::2"}],
        },
        {
            "name": "mixed",
            "address": "2001:db8:0:10::82",
            "ports": [80, 8080],
            "mode": "nat",
            "table_size": SMALL,
            "backends": [
                {"address": "2001:db8:0:20::21", "port": 9000},
                {"address": "2001:db8:0:20::22"},
            ],
        },
        {
            "name": "drained",
            "address": "2001:db8:0:10::83",
            "ports": [80],
            "mode": "nat",
            "table_size": SMALL,
            "backends": [{"address": "2001:db8:0:20::31", "drain": True}],
        },
        {
            "name": "proxy",
            "address": "2001:db8:0:10::82",
            "ports": [443],
            "mode": "proxy-l4",
            "backends": [{"address": "2001:db8:0:20::41"}],
        },
    ],
}

DSR_FILE = {
    "lb": {
        "instance": "g2",
        "flow_hash_seed": 0xDEADBEEF,
        "addresses": ["2001:db8:0:1::2"],
        "interfaces": ["eth0", "eth1"],
    },
    "vips": [
        {
            "name": "video-l2",
            "address": "2001:db8:0:10::90",
            "ports": [443],
            "mode": "dsr-l2",
            "table_size": SMALL,
            "backends": [
                {"address": "2001:db8:0:1::21", "mac": "02:00:00:00:00:21"},
                {"address": "2001:db8:0:1::22", "mac": "02:00:00:00:00:22"},
                {"address": "2001:db8:0:1::23"},
            ],
        },
        {
            "name": "video-tunnel",
            "address": "2001:db8:0:10::91",
            "ports": [443],
            "mode": "dsr-ip6ip6",
            "table_size": SMALL,
            "mtu": 1500,
            "backends": [{"address": "2001:db8:0:40::1"}, {"address": "2001:db8:0:40::2"}],
        },
        {
            "name": "video-srv6",
            "address": "2001:db8:0:10::92",
            "ports": [443, 8443],
            "mode": "dsr-srv6",
            "table_size": SMALL,
            "mtu": 9000,
            "backends": [
                {"address": "2001:db8:0:40::1", "sid": "fd00:50::1:100"},
                {"address": "2001:db8:0:50::2", "sid": "fd00:50::2:100", "weight": 3},
            ],
        },
    ],
}

NPT_FILE = {
    "lb": {"instance": "g3"},
    "npt": [
        {"inside": "fd00:1:2::/48", "outside": "2001:db8:1::/48"},
        {"inside": "fd00:9:9:9::/64", "outside": "2001:db8:2:40::/64"},
    ],
}

L2 = L2Ports(ingress="eth0", egress="eth1", egress_mac="02:00:00:00:00:01")
MACS = {IPv6Address("2001:db8:0:1::23"): "02:00:00:00:00:23"}


def config(data: dict[str, object], name: str) -> Config:
    return parse_config(data, f"{name}.yaml")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with V6LB_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from the golden file"


# --- golden files ------------------------------------------------------------------


def test_golden_nat_nft() -> None:
    check_golden("nat.nft", render_nft(config(NAT_FILE, "nat")))


def test_golden_dsr_nft() -> None:
    check_golden("dsr.nft", render_nft(config(DSR_FILE, "dsr"), l2=L2, backend_macs=MACS))


def test_golden_dsr_lb_routes() -> None:
    check_golden("dsr-lb.batch", render_lb_routes(config(DSR_FILE, "dsr")))


def test_golden_dsr_backend() -> None:
    c = config(DSR_FILE, "dsr")
    backend = IPv6Address("2001:db8:0:40::1")  # behind both tunnel VIPs
    ret = [
        ReturnRoute(None, IPv6Address("fe80::1"), "eth0"),
        ReturnRoute(IPv6Network("2001:db8:100::/48"), None, "eth1"),
        # source-specific: the VIPs' replies skip the LB (kept, with its `from`)
        ReturnRoute(None, IPv6Address("fe80::fe"), "eth0", IPv6Network("2001:db8:0:10::/64"), 512),
        # multipath, for the VIPs' sources too: options before the nexthops
        ReturnRoute(
            IPv6Network("2001:db8:f00::/40"),
            None,
            "",
            IPv6Network("2001:db8::/32"),
            nexthops=((IPv6Address("fe80::2"), "eth0", 1), (IPv6Address("fe80::3"), "eth1", 3)),
        ),
        # another source's route: packets from the VIPs never take it, so it is left out
        ReturnRoute(None, IPv6Address("fe80::9"), "eth1", IPv6Network("fd00:99::/64")),
    ]
    check_golden(
        "dsr-backend.batch", render_backend_routes(c, backend, decap_dev="eth0", return_routes=ret)
    )
    check_golden("dsr-backend.nft", render_backend_nft(c, backend))


NPT_NAT_FILE = {
    "lb": {"instance": "g3", "interfaces": ["eth0", "eth1"]},
    "vips": [  # a nat VIP whose backends lie in the npt inside prefix (eks-ipv6.yaml)
        {
            "name": "web",
            "address": "2001:db8:0:10::82",
            "ports": [80, 443],
            "mode": "nat",
            "backends": [{"address": "fd00:1:2:1::a"}, {"address": "fd00:1:2:2::a", "port": 8080}],
        }
    ],
    "npt": NPT_FILE["npt"][:1],
}


def test_golden_npt() -> None:
    """Prefixes only (no outside interface known); and on eth0 with a nat VIP's replies."""
    c = config(NPT_FILE, "npt")
    check_golden("npt.rules", render_npt(c.npt, c.lb.instance))
    check_golden("npt-outside.rules", render_config_npt(config(NPT_NAT_FILE, "npt-nat")))


FORWARD_FILE = {
    "lb": {
        "instance": "g4",
        "conntrack_max": 5000,
        "forward_allow": ["fd00:77::/64", {"from": "2001:db8:0:20::/64", "to": "2001:db8:99::/48"}],
    },
    "vips": [dict(NAT_FILE["vips"][0], name="web")],  # type: ignore[index]
    "npt": NPT_FILE["npt"],
}
PYTHON_TUNS = ("v6lb-g4-no", "v6lb-g4-ni", "v6lb-g4-po", "v6lb-g4-pi")


def test_golden_forward_filters() -> None:
    """The forward filter of both planes: nat + npt + lb.forward_allow; npt alone."""
    c = config(FORWARD_FILE, "forward")
    check_golden("forward-kernel.nft", render_nft(c))
    check_golden("forward-python.nft", render_forward_nft(c, PYTHON_TUNS))
    check_golden("forward-npt-only.nft", render_nft(config(NPT_FILE, "npt")))


def test_forward_filter_rules_carry_the_tag_and_end_in_a_counted_drop() -> None:
    c = config(FORWARD_FILE, "forward")
    for text in (render_nft(c), render_forward_nft(c, PYTHON_TUNS)):
        chain = text.split("\tchain forward {\n", 1)[1].split("\n\t}", 1)[0].splitlines()[1:]
        assert all('comment "v6lb:g4' in rule for rule in chain), chain
        assert chain[0].strip().startswith("ct state established,related accept")
        assert chain[-1].strip().startswith('counter name "forward_denied" drop')
        assert "ct count" not in text or "ct count over 5000" in text
        for line in text.splitlines():
            assert not ADDRESS_THEN_BRACE.search(line), line
    assert vip_prefixes(c) == [IPv6Network("2001:db8:0:10::/64")]


def test_golden_remove_and_map_update() -> None:
    c = config(NAT_FILE, "nat")
    pool = pool_for(c.vip("web"), c.lb.flow_hash_seed)
    pool.set_up(0, False)
    check_golden("nat-update.nft", render_map_update(c, "web", pool))
    check_golden("remove.nft", render_remove("g1"))


# --- properties of the nft text ----------------------------------------------------

ADDRESS_THEN_BRACE = re.compile(r"[0-9a-fA-F]:[0-9a-fA-F:.]*\s*\}")


def elements(text: str, map_name: str) -> dict[int, str]:
    """Parse the elements of one map out of rendered text."""
    block = re.search(rf"\tmap {map_name} \{{\n(.*?)\n\t\}}", text, re.S)
    assert block, map_name
    out = {}
    for m in re.finditer(r"^\t\t\t(\d+) : (.+),$", block.group(1), re.M):
        out[int(m[1])] = m[2]
    return out


@pytest.mark.parametrize("data", [NAT_FILE, DSR_FILE], ids=["nat", "dsr"])
def test_no_address_is_followed_by_a_brace(data: dict[str, object]) -> None:
    text = render_nft(config(data, "x"), l2=L2, backend_macs=MACS)
    for line in text.splitlines():
        assert not ADDRESS_THEN_BRACE.search(line), line


def test_default_size_maps_follow_the_python_table() -> None:
    data = {**NAT_FILE, "vips": [dict(NAT_FILE["vips"][0], table_size=65537)]}  # type: ignore[index]
    c = config(data, "big")
    text = render_nft(c)
    pool = pool_for(c.vips[0], c.lb.flow_hash_seed)
    got = elements(text, "v0_web")
    assert len(got) == 65537 == pool.size
    addresses = [str(b.address) for b in c.vips[0].backends]
    assert all(got[slot] == addresses[b] for slot, b in enumerate(pool.table))
    assert "mod 65537 seed 0x5eed dnat ip6 to meta mark map @v0_web" in text


def test_pools_equal_the_python_data_planes() -> None:
    """The renderer's Maglev tables are the very tables the core's forwarders use."""
    nat = config(NAT_FILE, "nat")
    fwd = nat_forwarder(nat)
    for svc in {id(s): s for s in fwd._vips.values()}.values():
        vip = nat.vip(svc.name)
        assert pool_for(vip, nat.lb.flow_hash_seed).table == svc.pool.table, vip.name
    dsr = config(DSR_FILE, "dsr")
    dfwd = dsr_forwarder(dsr, macs={"2001:db8:0:1::23": bytes(6)})
    for vip in dsr.vips:
        assert pool_for(vip, dsr.lb.flow_hash_seed).table == dfwd.pool(vip.name).table


def test_rules_and_objects_carry_the_tag() -> None:
    text = render_nft(config(DSR_FILE, "dsr"), l2=L2, backend_macs=MACS)
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(("ip6 ", "ct ")):
            assert 'comment "v6lb:g2' in s, s
    assert "table ip6 v6lb_g2 {" in text and "table netdev v6lb_g2 {" in text
    assert text.count('comment "v6lb:g2"') == 2


def test_nat_maps_per_port_when_ports_are_mixed() -> None:
    c = config(NAT_FILE, "nat")
    assert [m.name for m in nat_maps(c, c.vip("web"))] == ["v0_web"]
    api = nat_maps(c, c.vip("api"))
    assert api[0].with_port and api[0].values == (
        "2001:db8:0:20::11 . 8443",
        "2001:db8:0:20::12 . 8443",
    )
    mixed = nat_maps(c, c.vip("mixed"))
    assert [(m.name, m.ports) for m in mixed] == [
        ("v3_mixed_p80", (80,)),
        ("v3_mixed_p8080", (8080,)),
    ]
    assert mixed[1].values == ("2001:db8:0:20::21 . 9000", "2001:db8:0:20::22 . 8080")
    assert map_names(c, c.vip("mixed")) == ["v3_mixed_p80", "v3_mixed_p8080"]


def test_guard_allows_every_vip_at_an_address_and_drops_the_rest() -> None:
    c = config(NAT_FILE, "nat")
    text = render_nft(c)
    assert unserved_counters(c)[IPv6Address("2001:db8:0:10::80")] == "v0_web_unserved"
    assert "!= { tcp . 80, tcp . 443, udp . 53 }" in text  # web and dns share an address
    assert "!= { tcp . 80, tcp . 443, tcp . 8080 }" in text  # mixed, and the proxy's 443
    assert "no eligible backend" in text  # "drained": every backend drains
    assert "2001:db8:0:20::41" not in text  # proxy VIPs are not the kernel's


def test_snat_forms() -> None:
    text = render_nft(config(NAT_FILE, "nat"))
    assert "snat ip6 to [2001:db8:0:1::2]:20000-29999" in text
    # a pool skips the Subnet-Router anycast address, as the Python core does
    assert "snat ip6 to [2001:db8:0:1::101]-[2001:db8:0:1::1ff]:1024-65535 persistent" in text


def test_map_update_refills_every_map_of_the_vip() -> None:
    c = config(NAT_FILE, "nat")
    pool = pool_for(c.vip("mixed"), c.lb.flow_hash_seed)
    text = render_map_update(c, "mixed", pool)
    assert text.count("flush map ip6 v6lb_g1 v3_mixed_p") == 2
    assert text.count("\t0 : ") == 2
    pool.set_drain(0, True)
    pool.set_drain(1, True)
    assert "add element" not in render_map_update(c, "mixed", pool)


def test_a_drain_renders_the_keep_map_the_moved_slots_and_carries_them_in_updates() -> None:
    """TCP DSR: <map>_keep and <map>_moved are filled only while a backend drains."""
    c = config(DSR_FILE, "dsr")
    for vip, family in (("video-srv6", "ip6"), ("video-l2", "netdev")):
        pool = pool_for(c.vip(vip), c.lb.flow_hash_seed)
        name = vip_object_name(c, c.vip(vip))
        table = f"{family} v6lb_g2"
        text = render_nft(c, pools={vip: pool}, l2=L2, backend_macs=MACS)
        assert f"goto {name}_pick" in text and f"set {name}_new {{" in text
        assert not elements(text, f"{name}_keep")  # nothing drains: empty, no cost
        update = render_map_update(c, vip, pool, backend_macs=MACS)
        assert f"flush map {table} {name}_keep" in update
        assert f"add element {table} {name}_keep" not in update
        assert f"flush set {table} {name}_moved" in update
        assert f"add element {table} {name}_moved" not in update
        assert f"{name}_new" not in update  # the flows since the drain stay
        pool.set_drain(0, True)
        update = render_map_update(c, vip, pool, backend_macs=MACS)
        keep = update.split(f"add element {table} {name}_keep {{\n", 1)[1].split("}", 1)[0]
        assert keep.count(" : ") == pool.size
        moved = update.split(f"add element {table} {name}_moved {{\n", 1)[1].split("}", 1)[0]
        assert [int(x.strip(" \t,")) for x in moved.splitlines()] == pool.moved
        text = render_nft(c, pools={vip: pool}, l2=L2, backend_macs=MACS)
        assert len(elements(text, f"{name}_keep")) == pool.size
    # a UDP DSR VIP has no SYN to tell a new flow: it keeps the plain rule, no drain sets
    data = copy.deepcopy(DSR_FILE)
    vips = data["vips"]
    assert isinstance(vips, list)
    next(v for v in vips if v["name"] == "video-srv6")["protocol"] = "udp"
    cu = config(data, "dsr-udp")
    name = vip_object_name(cu, cu.vip("video-srv6"))
    text = render_nft(cu, l2=L2, backend_macs=MACS)
    assert f"meta mark set meta mark map @{name} accept" in text
    assert f"{name}_pick" not in text and f"{name}_new" not in text
    update = render_map_update(
        cu, "video-srv6", pool_for(cu.vip("video-srv6"), cu.lb.flow_hash_seed)
    )
    assert f"flush map ip6 v6lb_g2 {name}\n" in update and "_keep" not in update


def test_dsr_l2_needs_the_host_facts() -> None:
    c = config(DSR_FILE, "dsr")
    with pytest.raises(RenderError, match="ingress and egress"):
        render_nft(c)
    with pytest.raises(RenderError, match="no MAC for backend 2001:db8:0:1::23"):
        render_nft(c, l2=L2)


# --- routes ------------------------------------------------------------------------


def test_instance_tags_are_in_the_v6lb_block() -> None:
    for name in ("lb0", "lb1", "g2", "a-very-lo"):
        tag = instance_tag(name)
        assert tag >> 24 == ROUTE_PROTO and tag % TAG_SPAN == 0
    assert instance_tag("lb0") != instance_tag("lb1")


def test_tunnel_marks_are_the_tables() -> None:
    c = config(DSR_FILE, "dsr")
    targets = tunnel_targets(c)
    assert [(t.vip.name, t.backend_index) for t in targets] == [
        ("video-tunnel", 0),
        ("video-tunnel", 1),
        ("video-srv6", 0),
        ("video-srv6", 1),
    ]
    base = instance_tag("g2")
    assert [t.table for t in targets] == [base + 1, base + 2, base + 3, base + 4]
    assert str(targets[2].target) == "fd00:50::1:100"  # the SID, not the address
    text = render_nft(c, l2=L2, backend_macs=MACS)
    got = elements(text, "v2_video_srv6")
    pool = pool_for(c.vip("video-srv6"), c.lb.flow_hash_seed)
    assert all(int(got[s], 16) == targets[2 + b].mark for s, b in enumerate(pool.table))
    lb = render_lb_routes(c)
    assert "mode encap.red segs 2001:db8:0:40::1 dev eth0" in lb
    assert "mode encap segs fd00:50::2:100 dev eth0" in lb
    # 4 tunnel pairs (route, rule) and 2 dsr-l2 probe pairs (neighbour, route, rule)
    assert lb.count(f"proto {ROUTE_PROTO:#x}") == 4 * 2 + 2 * 3
    probes = l2_probe_targets(c)
    assert [(p.vip.name, p.backend_index, p.table) for p in probes] == [
        ("video-l2", 0, base + 5),
        ("video-l2", 1, base + 6),
    ]
    assert [gateway_table(p.gateway) for p in probes] == [base + 5, base + 6]
    assert gateway_table(IPv6Address("fe80::1")) is None
    assert f"via {probes[1].gateway} dev eth1 table {base + 6}" in lb


def test_advmss_leaves_room_for_the_tunnel() -> None:
    c = config(DSR_FILE, "dsr")
    assert advmss(c.vip("video-tunnel")) == 1500 - 40 - 20 - 40
    assert advmss(c.vip("video-srv6")) == 9000 - 40 - 20 - 64


def test_tunnel_sources_must_agree() -> None:
    data = {**DSR_FILE, "vips": [*DSR_FILE["vips"]]}  # type: ignore[list-item]
    data["vips"][1] = dict(data["vips"][1], tunnel_source="2001:db8:0:1::9")  # type: ignore[index]
    with pytest.raises(RenderError, match="one seg6 tunnel source"):
        render_lb_routes(config(data, "x"))


def test_backend_of_nothing_is_refused() -> None:
    with pytest.raises(RenderError, match="not a backend"):
        render_backend_routes(
            config(DSR_FILE, "dsr"), IPv6Address("2001:db8::99"), decap_dev="eth0"
        )


# --- ip6tables ---------------------------------------------------------------------

SAVED = """# Generated by ip6tables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [10:800]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
[5:400] -A FORWARD -i eth0 -j ACCEPT
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
[1:80] -A PREROUTING -d 2001:db8:7::/48 -m comment --comment "v6lb:g3" -j DNPT --src-pfx 2001:db8:7::/48 --dst-pfx fd00:7::/48
[2:160] -A POSTROUTING -m comment --comment "v6lb:other" -j ACCEPT
[3:240] -A POSTROUTING -m comment --comment "v6lb:g3x" -j ACCEPT
COMMIT
"""


def test_npt_rules_carry_the_tag_and_notrack() -> None:
    c = config(NPT_FILE, "npt")
    text = render_npt(c.npt, "g3")
    rules = [line for line in text.splitlines() if line.startswith("-A")]
    assert len(rules) == 8 and all(is_tagged(r, "g3") for r in rules)
    assert sum("CT --notrack" in r for r in rules) == 4
    assert render_npt((), "g3") == ""


def test_splice_replaces_only_the_instance_rules() -> None:
    ours = render_npt((NptPair(IPv6Network("fd00:1::/48"), IPv6Network("2001:db8:1::/48")),), "g3")
    out = splice(SAVED, "g3", ours)
    assert "2001:db8:7::/48" not in out  # the old rule of g3 is gone
    assert '"v6lb:other"' in out and '"v6lb:g3x"' in out  # similar tags are not ours
    assert "[5:400] -A FORWARD -i eth0 -j ACCEPT" in out and ":FORWARD DROP [0:0]" in out
    assert out.count("*raw") == 1 and ":PREROUTING ACCEPT [0:0]" in out
    assert len(tagged_rules(out, "g3")) == 4
    assert splice(out, "g3", ours) == out  # idempotent
    removed = splice(out, "g3", "")
    assert tagged_rules(removed, "g3") == [] and len(tagged_rules(removed, "other")) == 1
    assert splice("", "g3", "") == ""


def test_icmp_error_counts_read_the_rendered_counters() -> None:
    from v6lb.model.status import IcmpErrors
    from v6lb.render.nftables import icmp_error_counts

    dsr = config(DSR_FILE, "dsr")
    text = render_nft(dsr, l2=L2, backend_macs=MACS)
    names = {line.split()[1] for line in text.splitlines() if line.strip().startswith("counter v")}
    assert {"v0_video_l2_icmp", "v1_video_tunnel_icmp", "v1_video_tunnel_icmp_unmatched"} <= names
    vips, npt = icmp_error_counts(
        dsr, {"v1_video_tunnel_icmp": 5, "v1_video_tunnel_icmp_unmatched": 2}
    )
    assert vips["video-tunnel"] == IcmpErrors(forwarded=5, unmatched=2)
    assert vips["video-l2"] == IcmpErrors() and npt == []
    nat = config(NAT_FILE, "nat")
    vips, _ = icmp_error_counts(nat, {"v0_web_icmp": 3, "v0_web_icmp_unmatched": 1})
    assert vips["web"] == IcmpErrors(translated=3, unmatched=1)
    _, npt = icmp_error_counts(config(NPT_FILE, "npt"), {"npt1_icmp": 4, "npt1_icmp_unmatched": 6})
    assert npt == [IcmpErrors(), IcmpErrors(translated=4, unmatched=6)]
