"""`v6lb run` and its conntrackd (``lb.conntrack_sync``): start, death, restart, reload, stop.

Two instances, s1 and s2, each in its own namespace, joined by a veth ``sync0``; no
BGP, no traffic (tests/test_anycast_sync.py measures the flows). Checks:

* both run side by side, each with its conntrackd and its own files next to its own
  control socket; they exchange sync packets (``conntrackd -s`` through ``status``);
* SIGKILL of s1's ``v6lb run`` alone: its conntrackd dies with it (PDEATHSIG) and
  leaves its lock file behind; a new ``v6lb run`` starts anyway (the stale lock goes);
* SIGHUP after changing ``lb.conntrack_sync.port``: conntrackd is restarted on the new
  port (another pid, ``restarts`` 1); SIGHUP with the file unchanged keeps the pid;
* a missing sync address: ``run`` exits 2 naming ``lb.conntrack_sync.address`` and its
  fix, and leaves no nft table;
* SIGTERM: exit 0, conntrackd gone, its directory removed; the log warned that
  ``nf_conntrack_tcp_be_liberal`` is 0 (a fresh namespace's default).

Namespaces ``v6lb-cs-<pid>-<n>``, removed in ``finally`` (tests/netns_helpers.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import netns_helpers
from netns_helpers import batch, nsx
from v6lb.engines.control import ControlError, query

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(
        shutil.which("conntrackd") is None, reason="needs conntrackd (apt-get install conntrackd)"
    ),
]

V6LB = str(Path(sys.executable).parent / "v6lb")
SYNC = {"s1": "fd00:99::1", "s2": "fd00:99::2"}
PEER = {"s1": "s2", "s2": "s1"}


def config(tmp: Path, role: str, port: int = 3780) -> tuple[Path, str]:
    sock = str(tmp / f"{role}.sock")
    data: dict[str, Any] = {
        "lb": {
            "instance": role,
            "addresses": ["2001:db8:1::2"],
            "interfaces": ["up0"],
            "control_socket": sock,
            "conntrack_sync": {
                "interface": "sync0",
                "address": SYNC[role],
                "peer": SYNC[PEER[role]],
                "port": port,
            },
        },
        "vips": [
            {
                "name": "web",
                "address": "2001:db8:f::80",
                "ports": [80],
                "mode": "nat",
                "table_size": 251,  # a small map: each start and stop is quicker
                "health": {"type": "none"},
                "backends": [{"address": "2001:db8:1::10"}],
            }
        ],
    }
    path = tmp / f"{role}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, sock


def wait_for(what: str, fn: Any, timeout: float = 10.0, step: float = 0.05) -> Any:
    return netns_helpers.wait_for(
        what, fn, timeout, (ControlError, AssertionError, KeyError, TypeError), step
    )


def start(path: Path, ns: str, role: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [V6LB, "run", str(path), "--netns", ns, "--instance", role],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def sync_status(sock: str) -> dict[str, Any]:
    st: dict[str, Any] = query(sock)["conntrack_sync"]
    return st


def gone(pid: int) -> bool:
    try:
        return "conntrackd" not in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return True


def test_conntrackd_lifecycle() -> None:
    tmp = Path(f"/tmp/v6lb-cs-{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    procs: list[subprocess.Popen[str]] = []
    try:
        with netns_helpers.namespaces("s1", "s2", tag="cs") as ns:
            netns_helpers.link(ns["s1"], "sync0", ns["s2"], "sync0")
            for role in ns:
                # the LB's own link: a veth whose peer stays in the namespace (no dummy module)
                nsx(ns[role], "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1")
                batch(
                    ns[role],
                    "link set up0 up",
                    "link set up1 up",
                    "address add 2001:db8:1::2/64 dev up0 nodad",
                    f"address add {SYNC[role]}/64 dev sync0 nodad",
                )
                nsx(ns[role], "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")  # nat is routed
            files = {role: config(tmp, role) for role in ns}
            lbs = {role: start(files[role][0], ns[role], role) for role in ns}
            procs += lbs.values()
            for role in ns:
                wait_for(f"{role}'s conntrackd", lambda r=role: sync_status(files[r][1])["running"])
            st = {role: sync_status(files[role][1]) for role in ns}
            assert st["s1"]["pid"] != st["s2"]["pid"]
            assert st["s1"]["tcp_be_liberal"] == 0, st  # a fresh namespace: the default
            for role in ns:  # each in its own directory, next to its own control socket
                d = Path(f"{files[role][1]}.conntrackd")
                assert st[role]["config"] == str(d / "conntrackd.conf")
                assert (d / "conntrackd.ctl").is_socket() and (d / "conntrackd.lock").exists()
            wait_for(
                "sync packets both ways",
                lambda: all(
                    sync_status(files[r][1])["stats"].get("packets_received", 0) > 0 for r in ns
                ),
            )

            # SIGKILL of `v6lb run` alone: conntrackd dies too, its lock file stays
            old = st["s1"]["pid"]
            lbs["s1"].send_signal(signal.SIGKILL)
            lbs["s1"].wait(timeout=10)
            wait_for("s1's conntrackd to die with it", lambda: gone(old), 5)
            lock = Path(f"{files['s1'][1]}.conntrackd/conntrackd.lock")
            assert lock.exists()  # what a new conntrackd would refuse to start over
            lbs["s1"] = start(files["s1"][0], ns["s1"], "s1")
            procs.append(lbs["s1"])
            wait_for("s1 again", lambda: sync_status(files["s1"][1])["running"])
            first = sync_status(files["s1"][1])
            assert first["pid"] != old and first["restarts"] == 0, first

            # SIGHUP: unchanged file, same conntrackd; a new port, a new conntrackd
            lbs["s1"].send_signal(signal.SIGHUP)
            time.sleep(1.0)
            assert sync_status(files["s1"][1])["pid"] == first["pid"]
            config(tmp, "s1", port=3781)
            lbs["s1"].send_signal(signal.SIGHUP)
            wait_for("the restart", lambda: sync_status(files["s1"][1])["restarts"] == 1)
            again = sync_status(files["s1"][1])
            assert again["running"] and again["port"] == 3781 and again["pid"] != first["pid"]
            assert gone(first["pid"])

            # SIGTERM: conntrackd stopped, its directory removed
            for role in ns:
                pid = sync_status(files[role][1])["pid"]
                lbs[role].send_signal(signal.SIGTERM)
                _, err = lbs[role].communicate(timeout=20)
                assert lbs[role].returncode == 0, err
                assert f"conntrack sync: conntrackd {pid} stopped" in err, err
                assert "net.netfilter.nf_conntrack_tcp_be_liberal is 0 here" in err, err
                assert gone(pid)
                assert not Path(f"{files[role][1]}.conntrackd").exists()

            # a sync address that is not on the link: refused before anything is installed
            batch(ns["s1"], f"address del {SYNC['s1']}/64 dev sync0")
            r = subprocess.run(
                [V6LB, "run", str(files["s1"][0]), "--netns", ns["s1"], "--instance", "s1"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 2, r.stderr
            assert "lb.conntrack_sync.address: fd00:99::1 is not assigned to sync0" in r.stderr
            assert "ip -6 addr add fd00:99::1/64 dev sync0 nodad" in r.stderr, r.stderr
            assert nsx(ns["s1"], "nft", "list", "tables").strip() == ""
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
