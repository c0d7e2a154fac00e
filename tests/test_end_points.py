"""`v6lb check` warns about tunnel end points (and SIDs) assigned on their backends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from v6lb.model.config import load_config
from v6lb.model.end_points import end_point_warnings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
V6LB = str(Path(sys.executable).parent / "v6lb")


def _vip(name: str, n: int, mode: str, backends: list[dict[str, str]]) -> dict[str, object]:
    return {
        "name": name,
        "address": f"2001:db8:e::{n}",
        "ports": [80],
        "mode": mode,
        "backends": backends,
    }


def _site(tmp_path: Path) -> Path:
    pods = [{"address": "fd00:e::10"}, {"address": "fd00:e::11"}]
    data = {
        "lb": {"instance": "ep", "addresses": ["fd00:e::1"]},
        "vips": [
            _vip("web-nat", 1, "nat", pods),
            # the nat VIP connects to fd00:e::10, so that backend holds it: no end point
            _vip(
                "web-tun", 2, "dsr-ip6ip6", [{"address": "fd00:e::10"}, {"address": "fd00:f::11"}]
            ),
            # SIDs of their own: fine; a SID left out is the address, held by the backend
            _vip("web-sr", 3, "dsr-srv6", [{"address": "fd00:e::10", "sid": "fd00:f::10"}]),
            _vip("web-sr2", 4, "dsr-srv6", [{"address": "fd00:e::11"}]),
            _vip("web-l2", 5, "dsr-l2", [{"address": "fd00:e::12", "mac": "02:00:00:00:00:12"}]),
        ],
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_end_points_a_backend_holds_are_named_with_the_fix(tmp_path: Path) -> None:
    path = _site(tmp_path)
    warnings = end_point_warnings(load_config(path))
    assert len(warnings) == 2, warnings
    tun, sr2 = warnings
    assert tun.startswith(f"{path}: vips[1] (web-tun, dsr-ip6ip6): the tunnel end points"), tun
    assert "fd00:e::10 (nat VIP web-nat connects to it)" in tun
    assert "fd00:f::11" not in tun
    assert "fix: give each backend another address of its own" in tun
    assert sr2.startswith(f"{path}: vips[3] (web-sr2, dsr-srv6): the tunnel SIDs fd00:e::11"), sr2
    assert "fix: give each backend a `sid:` of its own, on no interface" in sr2


def test_check_prints_them_as_warnings_and_still_passes(tmp_path: Path) -> None:
    r = subprocess.run([V6LB, "check", str(_site(tmp_path))], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and all(x.startswith("warning: ") for x in lines), r.stderr


def test_the_lab_examples_keep_their_end_points_off_the_interfaces() -> None:
    # lab-modes.yaml: SIDs outside the pods' subnet, ip6ip6 ends on their loopback:
    for name in ("lab-modes.yaml", "lab-pmtu.yaml", "basic.yaml", "anycast.yaml"):
        assert end_point_warnings(load_config(EXAMPLES / name)) == [], name
