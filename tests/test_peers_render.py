"""``lb.peers`` (the second chance): its config errors and its nft text, no root.

tests/test_graceful_proxy_lab.py (proxy VIPs) and tests/test_graceful_lab.py (nat VIPs)
run it in namespaces.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from v6lb.model.config import ConfigError, parse_config
from v6lb.render.nftables import render_nft
from v6lb.render.peers import render_peers

BASE: dict[str, Any] = {
    "lb": {
        "instance": "p1",
        "addresses": ["2001:db8:1::2"],
        "peers": {"interface": "up0", "addresses": ["2001:db8:1::3"]},
    },
    "vips": [
        {
            "name": "web",
            "address": "2001:db8:f::90",
            "ports": [80, 443],
            "mode": "proxy-l7",
            "backends": [{"address": "2001:db8:1::10"}],
        },
        {
            "name": "db",
            "address": "2001:db8:f::83",
            "ports": [5432],
            "mode": "nat",
            "snat": "2001:db8:1::2",
            "backends": [{"address": "2001:db8:1::10"}],
        },
    ],
}


def test_proxy_table_and_nat_chains() -> None:
    config = parse_config(copy.deepcopy(BASE), "p.yaml")
    proxy = render_peers(config)
    assert proxy.startswith("# v6lb:p1: the proxies' second chance")
    assert "table ip6 v6lb_p1_peers {" in proxy
    assert "{ 2001:db8:f::90 . 80, 2001:db8:f::90 . 443 } ct state new" in proxy
    assert "ct state invalid tcp flags & (fin | rst) != 0 jump second_chance" in proxy
    assert "dup to 2001:db8:1::3 device up0" in proxy
    assert "5432" not in proxy and "hoplimit set 64" not in proxy  # nat is the kernel's
    kernel = render_nft(config)
    assert "{ 2001:db8:f::83 . 5432 } ct state new tcp flags & syn == 0 jump" in kernel
    # a peer's copy of a nat flow of ours is forwarded: it needs a hop limit again
    assert "ip6 hoplimit 0 ip6 daddr . tcp dport { 2001:db8:f::83 . 5432 } ip6 hoplimit" in kernel
    assert "2001:db8:f::90" not in kernel.split("chain peers_pre")[1].split("}")[0]


def test_without_peers_nothing() -> None:
    data = copy.deepcopy(BASE)
    del data["lb"]["peers"]
    config = parse_config(data, "p.yaml")
    assert render_peers(config) == ""
    assert "second_chance" not in render_nft(config)


@pytest.mark.parametrize(
    ("peers", "vips", "match"),
    [
        ({"interface": "up0"}, None, "needs the other instances' addresses"),
        ({"interface": "up0", "addresses": []}, None, "the list of peers is empty"),
        ({"interface": "a/b", "addresses": ["2001:db8:1::3"]}, None, "valid Linux interface"),
        ({"interface": "up0", "addresses": ["2001:db8:1::2"]}, None, "one of lb.addresses"),
        (
            {"interface": "up0", "addresses": ["2001:db8:1::3"]},
            [
                {
                    "name": "dsr",
                    "address": "2001:db8:f::80",
                    "ports": [80],
                    "mode": "dsr-srv6",
                    "backends": [{"address": "2001:db8:1::10"}],
                }
            ],
            "no proxy-l4, proxy-l7 or nat VIP over TCP",
        ),
    ],
)
def test_errors_name_the_field(peers: dict[str, Any], vips: Any, match: str) -> None:
    data = copy.deepcopy(BASE)
    data["lb"]["peers"] = peers
    if vips is not None:
        data["vips"] = vips
    with pytest.raises(ConfigError, match=match) as info:
        parse_config(data, "p.yaml")
    assert "lb.peers" in str(info.value)
