"""The service unit (contrib/systemd/v6lb@.service), crash-restart, and `--log-format json`.

* ``systemd-analyze verify`` on the unit, rendered with this venv's ``v6lb`` in place
  of /usr/local/bin/v6lb (verify checks that the ExecStart binary exists and runs
  offline: this machine need not run systemd as PID 1); the ExecStart command line
  is one `v6lb run` accepts; ``make install-unit DESTDIR=...`` installs it.
* ``--log-format json``: one JSON object per line (time, instance, level, message and
  the event's fields), also for the error that ends ``run``.
* Crash-restart (root): ``v6lb run`` runs the way the unit runs it (only the unit's
  capabilities, no new privileges, JSON logs) in a fresh namespace, with a nat VIP,
  a dsr-ip6ip6 VIP and an npt pair, beside the state of another instance. SIGKILL
  leaves its state; a second start finds it, says so, and ends with exactly one copy
  of every nft table, chain and rule, ip6tables rule, ip rule and route it owns (the
  same as the clean start); SIGTERM then removes all of it, and the other instance's
  state is untouched throughout.

Namespaces are ``v6lb-u-<pid>-<n>``, deleted in ``finally``. Addresses: 2001:db8::/32
and fd00::/8 only.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

import netns_helpers
from netns_helpers import batch, nsx, sh
from v6lb import cli
from v6lb.engines.control import ControlError, query
from v6lb.engines.daemon import Daemon, log_record
from v6lb.engines.kernel.apply import apply, render_lb
from v6lb.model.config import load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "systemd" / "v6lb@.service"
V6LB = str(Path(sys.executable).parent / "v6lb")
INSTALLED = "/usr/local/bin/v6lb"


def unit_settings() -> dict[str, list[str]]:
    """Key -> values of the unit's [Service] section (comments left out)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def exec_start(instance: str) -> list[str]:
    (line,) = unit_settings()["ExecStart"]
    return shlex.split(line.replace("%i", instance))


# --- the unit --------------------------------------------------------------------


@pytest.mark.tool
def test_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify, on the unit as shipped but for the path of v6lb."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} run " in text
    unit = tmp_path / "v6lb@lb0.service"  # an instance of the template
    unit.write_text(text.replace(INSTALLED, V6LB))
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    # verify is meaningful: a binary that does not exist, or an unknown key, is reported
    unit.write_text(text.replace(INSTALLED, str(tmp_path / "nothing")).replace("KillSignal", "X"))
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert "is not executable" in r.stderr and "Unknown key 'X'" in r.stderr


def test_unit_settings_and_exec_start() -> None:
    s = unit_settings()
    assert s["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RuntimeDirectory": "v6lb",
        "ReadWritePaths": "/run/v6lb",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "ExecReload": "/bin/kill -HUP $MAINPID",
    }.items():
        assert s[key] == [value], key
    argv = exec_start("lb0")
    assert argv[:2] == [INSTALLED, "run"]
    args = cli.build_parser().parse_args(argv[1:])  # a command line `v6lb run` accepts
    assert (args.file, args.instance, args.log_format) == ("/etc/v6lb/lb0.yaml", "lb0", "json")
    assert args.dataplane == "kernel" and args.netns is None  # no --netns: no CAP_SYS_ADMIN


def test_make_install_unit(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "install-unit", f"DESTDIR={tmp_path}", f"V6LB_BIN={V6LB}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "etc/systemd/system/v6lb@.service").read_text() == UNIT.read_text()
    assert (tmp_path / "etc/v6lb").is_dir()
    assert os.readlink(tmp_path / "usr/local/bin/v6lb") == V6LB


# --- --log-format json -----------------------------------------------------------


def test_log_record() -> None:
    line = log_record("lb0", "hello", level="warning", now=0.25, vip="web", level_x=None)
    assert json.loads(line) == {
        "time": "1970-01-01T00:00:00.250Z",
        "instance": "lb0",
        "level": "warning",
        "message": "hello",
        "vip": "web",
    }
    # a field never replaces a fixed key
    record = json.loads(log_record("lb0", "m", message="other", time=1, instance="x"))
    assert (record["message"], record["instance"], record["time"][:2]) == ("m", "lb0", "20")


def test_daemon_json_log(tmp_path: Path) -> None:
    path = tmp_path / "lb.yaml"
    data = {
        "lb": {"instance": "js", "control_socket": str(tmp_path / "c.sock")},
        "vips": [
            {
                "name": "web",
                "address": "2001:db8:f::80",
                "ports": [80],
                "mode": "nat",
                "health": {"type": "none"},
                "backends": [{"address": "2001:db8:b::10"}],
            }
        ],
    }
    path.write_text(yaml.safe_dump(data))
    lines: list[str] = []
    daemon = Daemon(load_config(path), [], path=str(path), log=lines.append, log_format="json")
    daemon.log("installed", control_socket="c.sock")
    daemon.context().warn("left over")
    daemon.context().emit("trace line")
    path.write_text("vips: [")
    assert not daemon.reload()
    records = [json.loads(line) for line in lines]
    assert [(r["instance"], r["level"]) for r in records] == [
        ("js", "info"),
        ("js", "warning"),
        ("js", "debug"),
        ("js", "error"),
    ]
    assert records[0]["control_socket"] == "c.sock"
    assert records[3]["message"].startswith("reload failed, still running the previous config")
    assert records[3]["file"] == str(path)
    # the status keeps the text of the last events
    assert daemon.events[-1].endswith(records[3]["message"])


def test_run_error_is_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", str(tmp_path / "missing.yaml"), "--log-format", "json"])
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in err]
    assert records[-1]["level"] == "error" and records[-1]["exit_code"] == 2
    assert "missing.yaml" in records[-1]["message"]
    assert all(set(r) >= {"time", "instance", "level", "message"} for r in records)


# --- crash-restart (root) --------------------------------------------------------

INSTANCE = "crt"
OTHER = "oth"  # another instance in the same namespace: its state must stay as it is


def _config(instance: str, sock: str, n: int) -> dict[str, Any]:
    vips = [
        {
            "name": "web",
            "address": f"2001:db8:f{n}::80",
            "ports": [80],
            "mode": "nat",
            "table_size": 251,
            "health": {"type": "none"},
            "backends": [{"address": f"2001:db8:b::1{n}"}, {"address": f"2001:db8:b::2{n}"}],
        },
        {
            "name": "tun",
            "address": f"2001:db8:f{n}::81",
            "ports": [80],
            "mode": "dsr-ip6ip6",
            "table_size": 251,
            "health": {"type": "none"},
            "backends": [{"address": f"fd00:b6::{n}1"}, {"address": f"fd00:b6::{n}2"}],
        },
    ]
    return {
        "lb": {
            "instance": instance,
            "interfaces": ["l0", "l1"],
            "addresses": ["2001:db8:a::1"],
            "control_socket": sock,
        },
        "vips": vips if n == 0 else vips[1:],
        "npt": [{"inside": f"fd00:1:{n}::/48", "outside": f"2001:db8:1{n}::/48"}],
    }


def snapshot(ns: str) -> dict[str, Counter[str]]:
    """The namespace's kernel state as multisets: a duplicate shows as a count of 2."""
    ruleset = json.loads(nsx(ns, "nft", "-s", "-j", "list", "ruleset"))["nftables"]
    state: dict[str, Counter[str]] = {k: Counter() for k in ("tables", "chains", "rules")}
    for item in ruleset:
        if "table" in item:
            t = item["table"]
            state["tables"][f"{t['family']} {t['name']}"] += 1
        elif "chain" in item:
            c = item["chain"]
            # ip6tables-nft restores whole tables: an empty built-in chain is not owned
            if c["table"].startswith("v6lb_") or any(
                "rule" in i and i["rule"]["chain"] == c["name"] and i["rule"]["table"] == c["table"]
                for i in ruleset
            ):
                state["chains"][f"{c['family']} {c['table']} {c['name']}"] += 1
        elif "rule" in item:
            r = item["rule"]
            expr = json.dumps(r["expr"], sort_keys=True)
            state["rules"][
                f"{r['family']} {r['table']} {r['chain']} {expr} {r.get('comment')}"
            ] += 1
    state["ip6tables"] = Counter(
        line for line in nsx(ns, "ip6tables-save").splitlines() if line.startswith("-A ")
    )
    state["ip rules"] = Counter(sh("ip", "-n", ns, "-6", "rule", "show").splitlines())
    # link-local routes come and go with the veths' address generation: never v6lb's
    routes = sh("ip", "-n", ns, "-6", "route", "show", "table", "all").splitlines()
    state["routes"] = Counter(line for line in routes if "fe80:" not in line)
    state["lo"] = Counter(sh("ip", "-n", ns, "-6", "address", "show", "dev", "lo").splitlines())
    return state


_FWD_DEV = re.compile(r'\{"fwd": \{"dev": "[^"]*"\}\}')


def _no_fwd_dev(state: dict[str, Counter[str]]) -> dict[str, Counter[str]]:
    """The snapshot without nft ``fwd`` targets: once the python plane's TAPs went with
    the process, its netdev chain names them by their former index."""
    rules = Counter({_FWD_DEV.sub('{"fwd": "-"}', k): n for k, n in state["rules"].items()})
    return state | {"rules": rules}


def owned(state: dict[str, Counter[str]], instance: str) -> int:
    """How many objects of the snapshot carry the instance's tag (nft and ip6tables)."""
    tag = f"v6lb:{instance}"
    return sum(
        n
        for kind in ("tables", "chains", "rules", "ip6tables")
        for key, n in state[kind].items()
        if f"v6lb_{instance}" in key or tag in key
    )


def start(ns: str, path: Path, log: Path, dataplane: str) -> subprocess.Popen[bytes]:
    """`v6lb run` as the unit runs it: its bounding set, no new privileges, JSON logs."""
    caps = unit_settings()["CapabilityBoundingSet"][0].lower().replace("cap_", "+").split()
    argv = [V6LB, *exec_start(INSTANCE)[1:]]
    argv[argv.index(f"/etc/v6lb/{INSTANCE}.yaml")] = str(path)
    argv += ["--dataplane", dataplane]
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                *("ip", "netns", "exec", ns, "setpriv", "--no-new-privs"),
                *("--bounding-set", ",".join(["-all", *caps]), "--inh-caps", "-all"),
                *argv,
            ],
            stdout=out,
            stderr=out,
        )


def wait_ready(sock: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if query(sock).get("instance") == INSTANCE:
                return
        except ControlError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"v6lb run did not answer on {sock}: {log.read_text()}")


@pytest.mark.root
@pytest.mark.parametrize("dataplane", ["kernel", "python"])
def test_crash_restart_leaves_one_copy(tmp_path: Path, dataplane: str) -> None:
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv is missing: apt-get install util-linux")
    sock = f"/tmp/v6lb-u-{os.getpid()}.sock"
    path = tmp_path / "crt.yaml"
    path.write_text(yaml.safe_dump(_config(INSTANCE, sock, 0)))
    other = tmp_path / "oth.yaml"
    other.write_text(yaml.safe_dump(_config(OTHER, f"{sock}.other", 1)))
    log = tmp_path / "run.log"
    procs: list[subprocess.Popen[bytes]] = []
    with netns_helpers.namespaces("lb", tag="u") as names:
        ns = names["lb"]
        try:
            nsx(ns, "ip", "link", "add", "l0", "type", "veth", "peer", "name", "l1")
            batch(
                ns,
                "link set l0 up",
                "link set l1 up",
                "address add 2001:db8:a::1/64 dev l0 nodad",
                "address add 2001:db8:b::1/64 dev l1 nodad",
            )
            nsx(ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
            apply(render_lb(load_config(other)), OTHER, netns=ns)
            before = snapshot(ns)
            assert owned(before, OTHER) > 0 and owned(before, INSTANCE) == 0

            procs.append(start(ns, path, log, dataplane))
            wait_ready(sock, procs[-1], log)
            clean = snapshot(ns)
            assert owned(clean, INSTANCE) > 0
            procs[-1].send_signal(signal.SIGKILL)  # no cleanup runs
            procs[-1].wait(10)
            crashed = snapshot(ns)
            if dataplane == "python":  # the TUNs went with the process, and their routes
                assert crashed["routes"] < clean["routes"]
                crashed["routes"] = clean["routes"]
            assert _no_fwd_dev(crashed) == _no_fwd_dev(clean)  # everything else stayed behind
            assert os.path.exists(sock)  # and so did the socket

            mark = len(log.read_text().splitlines())
            procs.append(start(ns, path, log, dataplane))
            wait_ready(sock, procs[-1], log)
            restarted = snapshot(ns)
            for kind, objects in restarted.items():
                dups = {k: n for k, n in objects.items() if n > 1}
                assert not dups, f"{kind}: {dups}"
                assert objects == clean[kind], kind
            records = [json.loads(line) for line in log.read_text().splitlines()[mark:]]
            warnings = [r["message"] for r in records if r["level"] == "warning"]
            if dataplane == "kernel":  # one line, before apply replaces it
                (found,) = warnings
                assert found.startswith("found the state of an earlier run of instance crt")
                assert found.endswith(
                    f"nft table ip6 v6lb_{INSTANCE}, 4 ip6tables rule(s), 2 ip rule(s),"
                    " 2 route table(s); replacing it"
                )
            else:  # the python plane removes the leftovers first, one line each
                assert f"removed leftover nft table ip6 v6lb_{INSTANCE}" in warnings
                assert len(warnings) > 4, warnings

            procs[-1].send_signal(signal.SIGTERM)
            assert procs[-1].wait(30) == 0, log.read_text()
            after = snapshot(ns)
            assert owned(after, INSTANCE) == 0
            for kind in ("rules", "ip6tables", "ip rules", "routes", "lo"):
                assert after[kind] == before[kind], kind  # the other instance's, untouched
            stop = [json.loads(line) for line in log.read_text().splitlines()[-20:]]
            assert stop[-1]["message"] == "stopped"
            assert any(r.get("removed") == f"nft table ip6 v6lb_{INSTANCE}" for r in stop)
            assert not os.path.exists(sock)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
            if os.path.exists(sock):
                os.unlink(sock)
