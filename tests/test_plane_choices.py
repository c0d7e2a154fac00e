"""The mode table may name a plane that is not registered; users are offered registered ones only.

model/modes.py lists ``xdp`` for npt and the dsr-* modes, and engines/planes.py registers
it. Every user-facing choice, help text and refusal that names planes reads the registry,
so a plane is offered with its package plus one ``register(...)`` line, and nowhere
without that line (checked here by taking xdp's line out).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from v6lb.cli import build_parser, main
from v6lb.engines import planes
from v6lb.engines.daemon import RunOptions, prepare
from v6lb.engines.plane import RunError
from v6lb.engines.planes import Role, names, served_modes, serving
from v6lb.model.modes import MODES, NAMES, Plane, facts

NAMED = {str(p) for m in MODES.values() for p in m.planes}  # every plane the table names


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _parsers(sub)
    return out


def _user_texts() -> list[str]:
    """Every description, help text and choice of the command line."""
    texts: list[str] = []
    for p in _parsers(build_parser()):
        texts += [p.description or "", p.format_help()]
        for action in p._actions:
            texts += [action.help or "", *(str(c) for c in action.choices or ())]
    return texts


def _nat_file(path: Path) -> str:
    vip = {
        "name": "web",
        "address": "2001:db8:f::80",
        "ports": [80],
        "mode": "nat",
        "backends": [{"address": "2001:db8:b::1", "port": 8080}],
    }
    path.write_text(yaml.safe_dump({"lb": {"instance": "pc"}, "vips": [vip]}))
    return str(path)


def test_the_table_names_xdp_for_npt_and_the_dsr_modes_only() -> None:
    want = ["npt", "dsr-l2", "dsr-ip6ip6", "dsr-srv6"]
    assert [m for m in NAMES if Plane.XDP in facts(m).planes] == want
    assert Plane.XDP not in facts("nat").planes


def test_a_plane_the_table_names_but_nobody_registered_is_offered_nowhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "xdp" in NAMED and "xdp" in names(Role.DATAPLANE)
    word = re.compile(r"\bxdp\b")
    assert [t for t in _user_texts() if word.search(t)]  # registered: offered
    monkeypatch.delitem(planes._PLANES, "xdp")
    assert [t for t in _user_texts() if word.search(t)] == []
    for mode in NAMES:
        assert "xdp" not in serving(mode)


def test_every_plane_the_table_names_is_registered_or_absent_from_every_choice() -> None:
    offered = {
        str(c)
        for p in _parsers(build_parser())
        for a in p._actions
        if a.dest in ("dataplane", "proxy")
        for c in a.choices or ()
    }
    registered = set(names(Role.DATAPLANE)) | set(names(Role.PROXY))
    assert offered == registered
    assert all(p in registered or p not in offered for p in NAMED)


@pytest.mark.parametrize("argv", [["run", "F"], ["lab", "up", "F"]])
def test_dataplane_xdp_is_a_choice_only_while_registered(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = build_parser().parse_args([*argv, "--dataplane", "xdp"])
    assert args.dataplane == "xdp"
    monkeypatch.delitem(planes._PLANES, "xdp")
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--dataplane", "xdp"])
    assert exit_.value.code == 2
    assert "argument --dataplane: invalid choice: 'xdp'" in capsys.readouterr().err


def test_the_refusals_name_only_registered_planes_that_serve_the_mode() -> None:
    assert serving("dsr-srv6") == ("kernel", "python", "xdp")
    assert serving("npt") == ("kernel", "python", "xdp")
    assert serving("nat") == ("kernel", "python")
    assert serving("proxy-l4", Role.PROXY) == ("builtin", "haproxy")


def test_nat_on_xdp_is_refused_naming_the_planes_that_serve_it(tmp_path: Path) -> None:
    assert "nat" not in served_modes("xdp")
    with pytest.raises(RunError) as refused:
        prepare(RunOptions(_nat_file(tmp_path / "nat.yaml"), dataplane="xdp"))
    assert "vips.web: mode nat is not served by --dataplane xdp" in str(refused.value)
    assert refused.value.fix == "use a data plane that serves it: kernel, python"
