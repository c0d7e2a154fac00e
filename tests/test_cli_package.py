"""The cli/ package (issue 13 item 5): thin modules, one error root, --version, FILE,
and the status renderer over typed status objects."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from v6lb import __version__
from v6lb.cli import main
from v6lb.model.status import InstanceStatus
from v6lb.render.status import status_text

CLI = Path(__file__).resolve().parents[1] / "src" / "v6lb" / "cli"
SCENARIO = Path(__file__).resolve().parents[1] / "src" / "v6lb" / "data" / "eks-ipv6.yaml"
MAX_LINES = 250
NO_ORCHESTRATION = {"subprocess", "socket", "selectors", "threading", "pyroute2", "signal"}


# --- thin modules --------------------------------------------------------------------


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _modules() -> list[Any]:
    return [pytest.param(p, id=p.name) for p in sorted(CLI.glob("*.py"))]


@pytest.mark.parametrize("path", _modules())
def test_cli_modules_are_small_and_orchestrate_nothing(path: Path) -> None:
    """Parse arguments, call the library, print: no processes, sockets, threads or signals."""
    assert len(path.read_text().splitlines()) < MAX_LINES
    assert _imported(path) & NO_ORCHESTRATION == set()


# --- --version -------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"v6lb {__version__}\n"


# --- FILE for explain and demo, --topology an alias ----------------------------------------


def test_explain_takes_file_positionally_or_as_topology(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["explain", "--mode", "npt", "--json", str(SCENARIO)]) == 0
    positional = json.loads(capsys.readouterr().out)
    assert main(["explain", "--mode", "npt", "--json", "--topology", str(SCENARIO)]) == 0
    assert json.loads(capsys.readouterr().out) == positional
    assert positional["mode"] == "npt"


@pytest.mark.parametrize("command", ["explain", "demo"])
def test_file_and_topology_together_is_a_usage_error(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.yaml"
    assert main([command, str(SCENARIO), "--topology", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: v6lb {command} ") and "\nv6lb: error: " in err
    assert "FILE" in err and "--topology" in err and str(other) in err


@pytest.mark.parametrize("command", ["explain", "demo"])
def test_positional_file_is_read(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"
    assert main([command, str(missing)]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err


# --- exit codes: 2 usage/config, 1 runtime -------------------------------------------------


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("vips: 3\n")
    for argv in (["check", str(bad)], ["status", str(bad)], ["explain", str(bad)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"v6lb: error: {bad}: ") and "fix: " in err


def test_unanswered_control_socket_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "nobody.sock"
    assert main(["status", "--control-socket", str(sock)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("v6lb: error: ") and str(sock) in err


# --- the status renderer: recorded answers, their text, and back to the same JSON --------

KERNEL = {
    "instance": "lb0",
    "pid": 4242,
    "file": "examples/nat.yaml",
    "netns": None,
    "dataplane": "kernel",
    "control_socket": "/run/v6lb/lb0.sock",
    "uptime_s": 12.5,
    "reloads": 1,
    "map_updates": 3,
    "last_error": None,
    "skipped": ["web proxy-l7: served by the proxy engine", "other npt: x"],
    "vips": [
        {
            "name": "api",
            "address": "2001:db8:100::10",
            "ports": [80, 443],
            "protocol": "tcp",
            "mode": "nat",
            "table_size": 65537,
            "seed": 7,
            "maps": ["ip6 v6lb-lb0 api_map"],
            "counter": {"name": "api_pkts", "packets": 10, "bytes": 900},
            "backends": [
                {
                    "address": "fd00:10::1",
                    "port": 8080,
                    "weight": 1,
                    "drain": False,
                    "health": "up",
                    "probe": "tcp [fd00:10::1]:8080",
                    "successes": 3,
                    "failures": 0,
                    "slots": 32769,
                    "active_flows": 3,
                },
                {
                    "address": "fd00:10::2",
                    "port": None,
                    "weight": 2,
                    "drain": True,
                    "health": "down",
                    "probe": "none",
                    "successes": None,
                    "failures": None,
                    "slots": 0,
                    "active_flows": 0,
                },
            ],
            "traffic": {
                "in": {"name": "api_in", "packets": 40, "bytes": 3000},
                "out": {"name": "api_out", "packets": 30, "bytes": 9000},
            },
            "new_flows": 10,
            "active_flows": 3,
        }
    ],
    "npt": [{"inside": "fd01::/48", "outside": "2001:db8:1::/48"}],
    "kernel": {
        "nft_tables": ["ip6 v6lb-lb0"],
        "nft_chains": ["ip6 v6lb-lb0 pre (hook prerouting, priority -100)"],
        "nft_maps": ["ip6 v6lb-lb0 api_map"],
        "ip6tables_rules": ["-A x"],
        "routes": ["r1"],
        "rules": [],
        "nft_counters": {"api_pkts": {"packets": 10, "bytes": 900}},
    },
    "forward": {"forward_accepted": 5, "forward_dropped": 1},
    "conntrack": {"conntrack_max": 1000, "conntrack": None, "conntrack_full": 2},
    "bgp": {
        "asn": 65001,
        "bird_pid": 99,
        "bird_alive": True,
        "neighbours": [],
        "sessions": {"up1": {"proto": "BGP", "state": "up", "info": "Established"}},
        "announced": ["2001:db8:100::/48"],
        "withdrawn": [],
        "changes": 1,
        "self_check": {"ok": True, "problem": None, "tables": []},
        "last_error": None,
    },
    "conntrack_sync": {
        "running": False,
        "pid": None,
        "interface": "eth1",
        "address": "fd00::1",
        "peer": "fd00::2",
        "port": 3780,
        "peer_snat": [],
        "tcp_be_liberal": True,
        "config": "/x",
        "stats": {
            "injected": {"new": {"ok": 3, "failed": 1}},
            "packets_sent": 5,
            "packets_received": 4,
            "lost": 0,
        },
        "restarts": 0,
        "last_error": "gone",
    },
    "events": ["e1"],
    "proxy": {
        "engine": "builtin",
        "state": "running",
        "vips": [
            {
                "name": "web",
                "address": "2001:db8:100::20",
                "ports": [80],
                "protocol": "tcp",
                "mode": "proxy-l7",
                "scheduler": "maglev",
                "connections": 7,
                "active": 1,
                "requests": 9,
                "bytes_in": 100,
                "bytes_out": 2000,
                "errors": {"refused": 1, "bad_request": 2},
                "interim": {"100": 2},
                "backends": [
                    {
                        "address": "fd00:20::1",
                        "port": 8080,
                        "weight": 1,
                        "drain": False,
                        "health": "up",
                        "probe": "http",
                        "active": 1,
                        "connections": 7,
                        "requests": 9,
                        "errors": {},
                    }
                ],
            }
        ],
        "fds": {"open": 10},
    },
}
PYTHON = {
    "instance": "lb1",
    "pid": 1,
    "file": "f.yaml",
    "netns": "v6lb-x-lb",
    "dataplane": "python",
    "control_socket": "/run/v6lb/lb1.sock",
    "uptime_s": 1.0,
    "reloads": 0,
    "map_updates": 0,
    "last_error": "reload failed",
    "skipped": [],
    "vips": [],
    "npt": [],
    "engine": {"nat": {"counters": {}}},
    "devices": [{"name": "tun0"}],
    "kernel": {"error": "OSError: boom"},
    "forward": {},
    "conntrack": {"conntrack_max": 10, "conntrack": 0, "conntrack_full": 0},
    "events": [],
}
PROXY_ONLY = {
    "instance": "lb2",
    "pid": 2,
    "file": "p.yaml",
    "netns": None,
    "dataplane": None,
    "proxy_engine": "haproxy",
    "control_socket": "/run/v6lb/lb2.sock",
    "uptime_s": 3.25,
    "vips": [],
    "npt": [],
    "skipped": [],
    "proxy": {
        "engine": "haproxy",
        "state": "starting",
        "error": "HAProxy's stats socket /x does not answer: no",
        "haproxy_pid": 5,
        "stats_socket": "/x",
        "vips": [
            {
                "name": "tcp",
                "address": "2001:db8::1",
                "ports": [443],
                "protocol": "tcp",
                "mode": "proxy-l4",
                "scheduler": "roundrobin",
                "backends": [
                    {
                        "address": "fd00::5",
                        "port": 443,
                        "weight": 3,
                        "drain": False,
                        "health": "unknown",
                        "probe": "tcp",
                    }
                ],
            }
        ],
    },
}


KERNEL_TEXT = (
    "instance lb0 (pid 4242, kernel data plane, proxy engine builtin, netns -) file examples/nat.yaml\n"
    "up 12.5 s, reloads 1, map updates 3, last error: none\n"
    "VIP api nat [2001:db8:100::10]:80,443/tcp  counter api_pkts: 10 packets 900 bytes\n"
    "  traffic: in 40 packets 3000 bytes, out 30 packets 9000 bytes; flows: 10 new, 3 active\n"
    "  [fd00:10::1]:8080 weight 1  UP  32769 slots  probe tcp [fd00:10::1]:8080"
    "  flows: 3 active\n"
    "  [fd00:10::2] weight 2 drain  DOWN  0 slots  probe none  flows: 0 active\n"
    "NPT fd01::/48 <-> 2001:db8:1::/48\n"
    "forward filter: accepted 5, dropped 1\n"
    "conntrack: ? of 1000 nat flows, 2 new flows dropped at the bound\n"
    "VIP web proxy-l7 [2001:db8:100::20]:80/tcp  scheduler maglev\n"
    "  connections 7 (active 1), requests 9, bytes in 100 out 2000\n"
    "  refused/errors: bad_request 2, refused 1\n"
    "  1xx responses: 100 2\n"
    "  [fd00:20::1]:8080 weight 1  UP  probe http  active 1  connections 7  requests 9  errors: none\n"
    "skipped: other npt: x\n"
    "kernel objects:\n"
    "  nft table: ip6 v6lb-lb0\n"
    "  nft chain: ip6 v6lb-lb0 pre (hook prerouting, priority -100)\n"
    "  nft map: ip6 v6lb-lb0 api_map\n"
    "  ip6tables rule: -A x\n"
    "  route: r1\n"
    "  nft counter api_pkts: 10 packets 900 bytes\n"
    "bgp: AS 65001, bird running (pid 99)\n"
    "  announced: 2001:db8:100::/48\n"
    "  withdrawn: none\n"
    "  BGP up1: up Established\n"
    "conntrack sync: conntrackd NOT running (pid None), [fd00::1] -> [fd00::2]:3780 on eth1, last error: gone\n"
    "  injected from the peer: new 3 (failed 1)\n"
    "  sync packets sent 5, received 4, lost 0\n"
)
PYTHON_TEXT = (
    "instance lb1 (pid 1, python data plane, netns v6lb-x-lb) file f.yaml\n"
    "up 1.0 s, reloads 0, map updates 0, last error: reload failed\n"
    "conntrack: 0 of 10 nat flows, 0 new flows dropped at the bound\n"
    "kernel objects:\n"
)
PROXY_ONLY_TEXT = (
    "instance lb2 (pid 2, proxy engine haproxy, netns -) file p.yaml\n"
    "up 3.25 s\n"
    "proxy engine haproxy: starting\n"
    "proxy engine error: HAProxy's stats socket /x does not answer: no\n"
    "VIP tcp proxy-l4 [2001:db8::1]:443/tcp  scheduler roundrobin\n"
    "  [fd00::5]:443 weight 3  UNKNOWN  probe tcp\n"
)


@pytest.mark.parametrize(
    ("answer", "text"),
    [(KERNEL, KERNEL_TEXT), (PYTHON, PYTHON_TEXT), (PROXY_ONLY, PROXY_ONLY_TEXT)],
    ids=["kernel+proxy+bgp+sync", "python", "proxy-only"],
)
def test_status_text(answer: dict[str, Any], text: str) -> None:
    assert status_text(InstanceStatus.from_dict(answer)) == text


@pytest.mark.parametrize("answer", [KERNEL, PYTHON, PROXY_ONLY], ids=["kernel", "python", "proxy"])
def test_status_round_trips_to_the_same_json(answer: dict[str, Any]) -> None:
    """Same keys, same order, same values: the daemon may build its answer from these types."""
    again = InstanceStatus.from_dict(answer).to_dict()
    assert json.dumps(again) == json.dumps(answer)


def test_status_tolerates_absent_and_odd_sections() -> None:
    st = InstanceStatus.from_dict({"instance": "lb9", "kernel": {}, "bgp": None, "proxy": {}})
    assert st.kernel is None and st.bgp is None and st.proxy is None and st.vips == []
    assert status_text(st) == "instance lb9 (pid None, , netns -) file None\nup None s\n"
    assert st.to_dict() == {"instance": "lb9", "kernel": {}, "bgp": None, "proxy": {}}
