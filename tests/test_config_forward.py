"""``lb.forward_allow`` and the ``lb.conntrack_max`` minimum (no root): what ``check`` accepts."""

from __future__ import annotations

from ipaddress import IPv6Network

import pytest

from v6lb.model.config import CONNTRACK_MIN, ConfigError, ForwardAllow, parse_config

ANY = IPv6Network("::/0")


def lb(**fields: object) -> dict[str, object]:
    return {"lb": fields}


def test_a_prefix_allows_both_ways_and_a_pair_one_way() -> None:
    c = parse_config(
        lb(forward_allow=["fd00:20::/64", {"from": "fd00:21::/64", "to": "2001:db8::/32"}]),
        "x.yaml",
    )
    net = IPv6Network("fd00:20::/64")
    assert c.lb.forward_allow == (
        ForwardAllow(ANY, net),
        ForwardAllow(net, ANY),
        ForwardAllow(IPv6Network("fd00:21::/64"), IPv6Network("2001:db8::/32")),
    )
    assert parse_config({}, "x.yaml").lb.forward_allow == ()
    assert parse_config(lb(forward_allow=[{"to": "fd00::/8"}]), "x.yaml").lb.forward_allow == (
        ForwardAllow(ANY, IPv6Network("fd00::/8")),
    )


@pytest.mark.parametrize(
    ("value", "where", "fix"),
    [
        ("fd00:20::/64", "lb.forward_allow", "write a YAML list"),
        (["fd00:20::1"], "lb.forward_allow[0]", "add one, for example fd00:20::1/64"),
        ([{}], "lb.forward_allow[0]", "write {from: PREFIX, to: PREFIX}"),
        ([{"form": "fd00::/8"}], "lb.forward_allow[0].form", "did you mean `from`?"),
        ([{"to": "fd00::1/8"}], "lb.forward_allow[0].to", "use the prefix itself: fd00::/8"),
    ],
)
def test_bad_entries_name_the_field_and_the_fix(value: object, where: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(lb(forward_allow=value), "x.yaml")
    text = str(err.value)
    assert f"x.yaml: {where}:" in text and fix in text, text


def test_conntrack_max_has_a_floor() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(lb(conntrack_max=1), "x.yaml")
    assert "lb.conntrack_max: 1 is out of range" in str(err.value)
    assert f"from {CONNTRACK_MIN} to" in str(err.value)
    assert parse_config(lb(conntrack_max=CONNTRACK_MIN), "x.yaml").lb.conntrack_max == 16
