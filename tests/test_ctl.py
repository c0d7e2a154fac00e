"""`v6lb ctl` without root: its checks, the daemon's ``ctl`` handler on a fake plane, the CLI.

The daemon is the real :class:`~v6lb.engines.daemon.Daemon` with the fake data plane
of tests/test_daemon.py (it records every ``apply_pool_change``), its real control
socket in tmp_path and the real `v6lb` command line (:func:`v6lb.cli.main`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml

from test_daemon import FakePlane, _daemon, _start
from v6lb.cli import main
from v6lb.core.backends import BackendPool, BackendSpec
from v6lb.engines.control import ControlError, ControlServer, query
from v6lb.engines.ctl import CtlRefused, Override, find_backend, weight_problem
from v6lb.engines.daemon import control_gid
from v6lb.model.config import Config, ConfigError, load_config
from v6lb.model.config_dump import dump


def _config(tmp_path: Path, *, drain2: bool = False, weight1: int = 1) -> Config:
    """VIP ``web`` (nat, no probes) with backends 2001:db8:b::1 and ::2, and VIP ``px``."""
    data = {
        "lb": {"instance": "ctl", "control_socket": str(tmp_path / "c.sock")},
        "vips": [
            {
                "name": "web",
                "address": "2001:db8:f::80",
                "ports": [80],
                "mode": "nat",
                "health": {"type": "none"},
                "backends": [
                    {"address": "2001:db8:b::1", "port": 8080, "weight": weight1},
                    {"address": "2001:db8:b::2", "port": 8080, "drain": drain2},
                ],
            },
        ],
    }
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_weight_checks() -> None:
    assert weight_problem(1) is None and weight_problem(255) is None
    assert "drain" in (weight_problem(0) or "")
    assert "negative" in (weight_problem(-3) or "")
    assert "above 255" in (weight_problem(256) or "")
    assert "not an integer" in (weight_problem("7") or "")
    assert "not an integer" in (weight_problem(True) or "")


def test_find_backend_by_address_or_address_and_port(tmp_path: Path) -> None:
    vip = _config(tmp_path).vip("web")
    pool = BackendPool([BackendSpec.of(b.address, 8080) for b in vip.backends])
    assert find_backend(vip, pool, "2001:db8:b::2") == 1
    assert find_backend(vip, pool, "[2001:db8:b::2]:8080") == 1
    with pytest.raises(CtlRefused, match=r"VIP web has no backend 2001:db8:b::9; its backends"):
        find_backend(vip, pool, "2001:db8:b::9")
    with pytest.raises(CtlRefused, match="no backend"):
        find_backend(vip, pool, "[2001:db8:b::2]:81")
    with pytest.raises(CtlRefused, match="not an IPv6 address"):
        find_backend(vip, pool, "web1")


def test_handler_applies_at_once_and_reload_keeps_it(tmp_path: Path) -> None:
    config = _config(tmp_path)
    lines: list[str] = []
    plane = FakePlane(config, [])
    daemon = _daemon(config, [plane], lines)
    pool = plane.pools()["web"]
    full = pool.size

    answer = daemon.ctl({"action": "drain", "vip": "web", "backend": "2001:db8:b::1"})
    assert answer["drain"] is True and answer["applied"] == "applied"
    assert answer["override"] == "drain (file: no drain)"
    assert pool.table.count(0) == 0 and pool.table.count(1) == full  # at once, in the pool
    assert len(plane.changes) == 1 and daemon.map_updates == 1
    assert lines[-1].endswith("ctl drain web [2001:db8:b::1]:8080: applied")

    b = daemon.status().vips[0].backends
    assert (b[0].drain, b[0].slots, b[0].override) == (True, 0, "drain (file: no drain)")
    assert (b[1].drain, b[1].override) == (False, None)

    # the last backend that takes new flows: allowed, with a warning
    answer = daemon.ctl({"action": "disable", "vip": "web", "backend": "[2001:db8:b::2]:8080"})
    assert "no backend of VIP web takes new flows" in answer["warning"]
    assert not pool.any_eligible and not pool.keeps_existing(1)

    answer = daemon.ctl({"action": "weight", "vip": "web", "backend": "2001:db8:b::2", "weight": 9})
    assert answer["weight"] == 9 and pool.weight(1) == 9
    daemon.ctl({"action": "enable", "vip": "web", "backend": "2001:db8:b::2"})
    assert pool.is_enabled(1) and pool.table.count(1) == full
    assert daemon.overrides_ctl == {
        ("web", "2001:db8:b::1", 8080): Override(drain=True),
        ("web", "2001:db8:b::2", 8080): Override(weight=9),  # enable is the file's value
    }

    # a reload applies the overrides on top of the new file and says so
    _config(tmp_path, weight1=3)
    assert daemon.reload() is True
    new = plane.pools()["web"]
    assert new is not pool and new.is_draining(0) and new.weight(0) == 3 and new.weight(1) == 9
    assert new.table.count(0) == 0
    assert lines[-1].endswith(
        ": 1 VIP(s); ctl overrides the file: web [2001:db8:b::1]:8080 drain (file: no drain);"
        " web [2001:db8:b::2]:8080 weight 9 (file: 1)"
    )
    # a file that now says the same ends that override
    data = yaml.safe_load((tmp_path / "lb.yaml").read_text())
    data["vips"][0]["backends"][0]["drain"] = True
    (tmp_path / "lb.yaml").write_text(yaml.safe_dump(data))
    assert daemon.reload() is True
    assert (
        "ctl overrides dropped: web [2001:db8:b::1]:8080 (the file now says the same)"
        in (lines[-1])
    )
    assert list(daemon.overrides_ctl) == [("web", "2001:db8:b::2", 8080)]


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ({"action": "drain", "vip": "nope", "backend": "2001:db8:b::1"}, "no VIP named 'nope'"),
        ({"action": "drain", "vip": "web", "backend": "2001:db8:b::7"}, "has no backend"),
        ({"action": "weight", "vip": "web", "backend": "2001:db8:b::1", "weight": 0}, "weight 0"),
        ({"action": "weight", "vip": "web", "backend": "2001:db8:b::1", "weight": -1}, "negative"),
        ({"action": "weight", "vip": "web", "backend": "2001:db8:b::1", "weight": 256}, "above"),
        ({"action": "weight", "vip": "web", "backend": "2001:db8:b::1"}, "not an integer"),
        ({"action": "stop", "vip": "web", "backend": "2001:db8:b::1"}, "action 'stop'"),
        ({"action": "drain", "vip": "web"}, "backend is missing"),
    ],
)
def test_handler_refusals_change_nothing(tmp_path: Path, request_: dict, error: str) -> None:
    config = _config(tmp_path)
    plane = FakePlane(config, [])
    daemon = _daemon(config, [plane], [])
    answer = daemon.ctl(request_)
    assert answer["exit"] == 2 and error in answer["error"], answer
    assert plane.changes == [] and daemon.overrides_ctl == {}


def test_cli_over_the_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, drain2=True)
    plane = FakePlane(config, [])
    daemon = _daemon(config, [plane], [])
    daemon.install()
    t, errors = _start(daemon)
    sock = str(tmp_path / "c.sock")
    try:
        assert main(["ctl", "undrain", "web", "2001:db8:b::2", "--control-socket", sock]) == 0
        out = capsys.readouterr().out
        assert out == (
            "web [2001:db8:b::2]:8080: weight 1; applied; override: undrain (file: drain)\n"
        )
        st = query(sock)
        assert st["vips"][0]["backends"][1]["drain"] is False
        assert st["vips"][0]["backends"][1]["override"] == "undrain (file: drain)"
        assert st["control"]["answered"] >= 1

        assert main(["ctl", "drain", "api", "2001:db8:b::2", "--control-socket", sock]) == 2
        assert "no VIP named 'api'" in capsys.readouterr().err
        assert main(["ctl", "drain", "web", "2001:db8:b::2", "--file", config.source]) == 0
        assert "the file's values" in capsys.readouterr().out
        for n, text in (("0", "weight 0 is refused"), ("-4", "negative"), ("300", "above 255")):
            assert main(["ctl", "weight", "web", "2001:db8:b::1", n, "--control-socket", "/x"]) == 2
            assert text in capsys.readouterr().err
        assert (
            main(["ctl", "weight", "web", "2001:db8:b::1", "--json", "--control-socket", sock]) == 2
        )
        assert "needs N" in capsys.readouterr().err
    finally:
        daemon.request_stop()
        t.join(10)
    assert errors == []


def test_another_uid_may_read_status_but_not_ctl(tmp_path: Path) -> None:
    """The refusal itself (the root test runs a real client as another uid)."""
    calls: list[dict] = []
    server = ControlServer(
        str(tmp_path / "c.sock"),
        {"status": lambda r: {"ok": 1}, "ctl": lambda r: calls.append(dict(r)) or {}},
        mutating=("ctl",),
    )
    server.owners = frozenset({4242})  # as if the instance ran as uid 4242: we are another
    stop = threading.Event()
    thread = server.serve_thread(stop)
    try:
        assert query(server.path)["ok"] == 1
        answer = query(server.path, "ctl", args={"action": "drain"})
        assert answer["exit"] == 1 and "refused for uid" in answer["error"], answer
        assert calls == [] and query(server.path)["control"]["peer_refused"] == 1
        assert json.dumps(answer)
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_control_group_is_checked_and_dumped(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lb\.control_group"):
        _load(tmp_path, {"control_group": "no spaces"})
    config = _load(tmp_path, {"control_group": "0"})
    assert config.lb.control_group == "0" and control_gid("0") == 0
    assert "control_group: '0'" in dump(config)
    with pytest.raises(ControlError, match="lb.control_group: no group 'v6lb-nosuch'"):
        control_gid("v6lb-nosuch")


def _load(tmp_path: Path, lb: dict) -> Config:
    _config(tmp_path)
    data = yaml.safe_load((tmp_path / "lb.yaml").read_text())
    data["lb"].update(lb)
    (tmp_path / "lb.yaml").write_text(yaml.safe_dump(data))
    return load_config(tmp_path / "lb.yaml")
