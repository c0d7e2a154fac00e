"""The mode table (v6lb.model.modes): the one place that declares each mode's facts."""

from __future__ import annotations

from v6lb.core import dsr
from v6lb.model.config import (
    DsrL2Options,
    NatOptions,
    ProxyL4Options,
    ProxyL7Options,
    TunnelOptions,
    VipMode,
)
from v6lb.model.modes import MODES, NAMES, Encap, Kind, Plane, facts, modes_where

ARCHITECTURE_ORDER = (
    "proxy-l4",
    "proxy-l7",
    "npt",
    "nat",
    "dsr-l2",
    "dsr-ip6ip6",
    "dsr-srv6",
    "anycast",
)


def test_the_table_covers_the_eight_names_in_architecture_order() -> None:
    assert NAMES == ARCHITECTURE_ORDER
    assert tuple(MODES) == ARCHITECTURE_ORDER
    assert all(MODES[n].name == n for n in NAMES)


def test_every_vip_mode_has_facts_and_the_vip_modes_are_the_enum() -> None:
    assert modes_where(vip=True) == tuple(m.value for m in VipMode)
    for m in VipMode:
        assert facts(m) is facts(m.value) is m.facts
        assert m.is_proxy is (m.facts.kind is Kind.PROXY)
        assert m.is_dsr is (m.facts.kind is Kind.DSR)
    assert not facts("npt").vip and not facts("anycast").vip


def test_derived_sets_equal_what_the_code_declared_before() -> None:
    assert modes_where(kind=Kind.PROXY) == ("proxy-l4", "proxy-l7")
    assert modes_where(kind=Kind.DSR) == ("dsr-l2", "dsr-ip6ip6", "dsr-srv6")
    assert modes_where(tunnels=True) == ("dsr-ip6ip6", "dsr-srv6")
    # nat + dsr-* = the VIP modes of the kernel and python planes (KERNEL_MODES, _MODES).
    for plane in Plane:
        assert modes_where(plane=plane, vip=True) == ("nat", "dsr-l2", "dsr-ip6ip6", "dsr-srv6")
    # lab diff and lab trace compare the L3 planes: nat, npt and dsr-*.
    assert set(modes_where(plane=Plane.PYTHON)) == {
        "nat",
        "npt",
        "dsr-l2",
        "dsr-ip6ip6",
        "dsr-srv6",
    }
    # v6lb run needs IPv6 forwarding for these (issue 20).
    assert modes_where(routed=True) == ("npt", "nat", "dsr-ip6ip6", "dsr-srv6")
    assert modes_where(proxy="haproxy") == ("proxy-l4", "proxy-l7")


def test_overhead_is_the_encapsulation_and_agrees_with_the_core() -> None:
    assert facts("dsr-ip6ip6").encap is Encap.IP6IP6
    assert facts("dsr-ip6ip6").overhead == 40
    assert facts("dsr-srv6").overhead == 40 + 8 + 16
    assert all(facts(n).overhead == 0 for n in modes_where(tunnels=False))
    for name in modes_where(kind=Kind.DSR):
        assert dsr.OVERHEAD[name] == facts(name).overhead


def test_options_classes_name_real_config_classes() -> None:
    classes = {
        c.__name__: c
        for c in (NatOptions, DsrL2Options, TunnelOptions, ProxyL4Options, ProxyL7Options)
    }
    for m in VipMode:
        assert m.facts.options in classes
    assert facts("npt").options is None and facts("anycast").options is None
