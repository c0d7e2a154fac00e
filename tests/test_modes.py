"""The mode table (v6lb.model.modes): the one place that declares each mode's facts."""

from __future__ import annotations

import ast
from pathlib import Path

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
    for plane in (Plane.KERNEL, Plane.PYTHON):
        assert modes_where(plane=plane, vip=True) == ("nat", "dsr-l2", "dsr-ip6ip6", "dsr-srv6")
    # The xdp plane serves npt and every DSR mode, never nat (it keeps no connection state).
    assert modes_where(plane=Plane.XDP) == ("npt", "dsr-l2", "dsr-ip6ip6", "dsr-srv6")
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
    # The core names each DSR mode's encapsulation (it may not read the table): the same
    # member, so the bytes are declared once, by wire/encap.py.
    assert tuple(dsr.ENCAP) == modes_where(kind=Kind.DSR)
    for name in modes_where(kind=Kind.DSR):
        assert dsr.ENCAP[name] is facts(name).encap
        assert dsr.OVERHEAD[name] == facts(name).overhead


def test_options_classes_name_real_config_classes() -> None:
    classes = {
        c.__name__: c
        for c in (NatOptions, DsrL2Options, TunnelOptions, ProxyL4Options, ProxyL7Options)
    }
    for m in VipMode:
        assert m.facts.options in classes
    assert facts("npt").options is None and facts("anycast").options is None


# --- no module but the table declares a subset of modes ----------------------------------

SRC = Path(__file__).resolve().parents[1] / "src" / "v6lb"
TABLE = SRC / "model" / "modes.py"
MEMBERS = {m.name for m in VipMode}
# Forwarder kinds that happen to share a mode's name: not a subset of modes.
NOT_MODES = {"side.kind in ('npt', 'nat')"}  # engines/python/run.py: the TUN offload choice


def _is_mode(node: ast.expr) -> bool:
    """A mode name literal, ``VipMode.X`` or ``VipMode.X.value``."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value in NAMES
    if isinstance(node, ast.Attribute) and node.attr == "value":
        node = node.value
    return (
        isinstance(node, ast.Attribute)
        and node.attr in MEMBERS
        and isinstance(node.value, ast.Name)
        and node.value.id == "VipMode"
    )


def _mode_prefix(node: ast.expr) -> str | None:
    """A string literal that starts a mode name ("dsr", "proxy-", ...), if ``node`` is one."""
    items = node.elts if isinstance(node, ast.Tuple) else [node]
    for item in items:
        if isinstance(item, ast.Constant) and isinstance(item.value, str):
            s = item.value
            if len(s) >= 3 and any(n.startswith(s) for n in NAMES):
                return s
    return None


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = {
        id(c)
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare) and ast.unparse(node) in NOT_MODES
        for c in node.comparators
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set) and id(node) not in skip:
            modes = [e for e in node.elts if _is_mode(e)]
            if len(modes) >= 2:
                out.append(f"line {node.lineno}: a collection of {len(modes)} modes")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "startswith"
            and node.args
            and (prefix := _mode_prefix(node.args[0])) is not None
        ):
            out.append(f"line {node.lineno}: .startswith({prefix!r}) dispatches on a mode name")
    return out


def test_no_module_but_the_table_declares_a_mode_subset_or_dispatches_on_a_prefix() -> None:
    bad = {
        str(f.relative_to(SRC)): v
        for f in sorted(SRC.rglob("*.py"))
        if f != TABLE and (v := _violations(f))
    }
    assert bad == {}, "read the subset from v6lb.model.modes (modes_where, facts) instead"


def test_the_static_check_catches_what_it_should(tmp_path: Path) -> None:
    code = (
        "A = (VipMode.NAT, VipMode.DSR_L2)\n"
        "B = {'dsr-l2', 'dsr-srv6'}\n"
        "C = [VipMode.NAT.value, 'npt']\n"
        "D = mode.startswith('dsr')\n"
        "E = mode.startswith(('proxy-', 'x'))\n"
        "OK = (VipMode.NAT, 'source'); OK2 = c.startswith('source'); OK3 = ('nat',)\n"
        "OK4 = side.kind in ('npt', 'nat')\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(code)
    assert [v.split(":")[0] for v in _violations(path)] == [f"line {i}" for i in range(1, 6)]
