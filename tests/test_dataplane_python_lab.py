"""The lab on the Python data plane matches the kernel data plane, hop by hop.

``examples/lab-modes.yaml`` (one VIP per L3/L4 mode and an ``npt:`` pair) is
brought up with ``--dataplane kernel``, each mode is traced (every link
captured while the client makes a GET and a 100 kB POST), the lab goes down,
and the same is done with ``--dataplane python``, from the same client ports
(:func:`v6lb.lab.dataplane_diff.run_differential`). For every mode:

* the captured TCP hops of the traced flows are the same: link, sender and
  receiver, innermost addresses and ports, tunnel outer addresses; so each flow
  reached the same backend by the same path (and it was captured at all);
* the same node answered each request;
* the python lab's LB ran the Python data plane, and its forwarders counted
  the traced packets (the traffic did pass through Python).

The CLI takes the flag: ``v6lb lab up FILE --dataplane python`` (checked by
``lab status --json``); with the engine SIGSTOPped a request to the nat VIP
times out, and after SIGCONT it is answered again. An unknown data plane is
refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from v6lb.lab.dataplane_diff import MODES, compare, run_differential

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lab-modes.yaml"
V6LB = str(Path(sys.executable).parent / "v6lb")


def _netns() -> list[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
    return [x["name"] for x in json.loads(out or "[]")]


def test_lab_up_refuses_an_unknown_dataplane() -> None:
    r = subprocess.run(
        [V6LB, "lab", "up", str(EXAMPLE), "--dataplane", "dpdk", "--name", "x"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--dataplane" in r.stderr and "python" in r.stderr, r.stderr


@pytest.mark.root
def test_lab_python_dataplane_matches_kernel_hop_by_hop(tmp_path: Path) -> None:
    if shutil.which("tcpdump") is None or shutil.which("curl") is None:
        pytest.fail("the lab trace needs tcpdump and curl (make install-lab-tools)")
    name = f"dp{os.getpid() % 100000}"
    lines: list[str] = []
    try:
        outcomes = run_differential(str(EXAMPLE), name, tmp_path, log=lines.append)
    finally:
        subprocess.run([V6LB, "lab", "down", "--name", name], capture_output=True, timeout=120)
        assert not [ns for ns in _netns() if ns.startswith(f"v6lb-{name}-")]
    assert [o.mode for o in outcomes] == list(MODES)
    for o in outcomes:
        print(f"{o.mode}: {len(o.hops['kernel'])} hops the same; {o.answers['python']}")
        assert not o.differences, (o.mode, o.differences)
        assert len(o.hops["kernel"]) >= 6, (o.mode, o.hops)  # both legs of two flows, and more
        assert all("answered by None" not in a for a in o.answers["python"]), o.answers
    # Each data plane really ran: the python lab's LB says so, and counted the packets.
    (kernel,) = outcomes[0].engines["kernel"].values()
    (python,) = outcomes[0].engines["python"].values()
    assert kernel["dataplane"] == "kernel" and python["dataplane"] == "python"
    counters = {kind: e["counters"] for kind, e in python["engine"].items()}
    assert set(counters) == {"nat", "npt", "dsr"}, counters
    for kind, c in counters.items():
        assert c["forwarded"] >= 20, (kind, c)  # two requests, one of them 100 kB
    # The comparison is not vacuous: two different modes do differ.
    by_mode = {o.mode: o for o in outcomes}
    nat, l2 = by_mode["nat"], by_mode["dsr-l2"]
    assert nat.mode == "nat" and l2.mode == "dsr-l2"
    assert nat.hops["kernel"] != l2.hops["python"]
    assert any("traced from client ports" in line for line in lines), lines


@pytest.mark.root
def test_lab_up_python_flag_reaches_v6lb_run() -> None:
    name = f"dq{os.getpid() % 100000}"
    try:
        r = subprocess.run(
            [V6LB, "lab", "up", str(EXAMPLE), "--dataplane", "python", "--name", name],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0, r.stderr
        st = json.loads(
            subprocess.run(
                [V6LB, "lab", "status", "--name", name, "--json"],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
        )
        assert st["dataplane"] == "python"
        run = next(p for p in st["processes"] if p["kind"] == "run")
        assert run["argv"][-2:] == ["--dataplane", "python"], run["argv"]
        assert st["lbs"]["lb"]["status"]["dataplane"] == "python"
        # The VIP's packets pass through the engine: stopped, no answer; resumed, answers.
        url = "http://[2001:db8:100::80]:80/"  # the nat VIP of the example

        def curl() -> int:
            argv = ["ip", "netns", "exec", f"v6lb-{name}-client", "curl", "-6", "-s", "-m", "2"]
            return subprocess.run([*argv, url], capture_output=True, timeout=30).returncode

        assert curl() == 0
        os.kill(run["pid"], signal.SIGSTOP)
        try:
            assert curl() == 28  # curl: operation timed out
        finally:
            os.kill(run["pid"], signal.SIGCONT)
        assert curl() == 0
        # What the engine wrote out (to a pod, dst fd00:20::*) is notrack: the core
        # tracked it, the kernel's conntrack holds no second entry for it.
        ct = subprocess.run(
            ["ip", "netns", "exec", f"v6lb-{name}-lb", "conntrack", "-L", "-f", "ipv6"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ct.returncode == 0, ct.stderr
        # (the LB's own health checks to the pods are tracked: their source is the LB's)
        relayed = [
            line
            for line in ct.stdout.splitlines()
            if re.search(r"src=2001:db8:\S+ dst=fd00:20::", line)
        ]
        assert not relayed, ct.stdout
    finally:
        subprocess.run([V6LB, "lab", "down", "--name", name], capture_output=True, timeout=120)
    assert not [ns for ns in _netns() if ns.startswith(f"v6lb-{name}-")]


def test_compare_names_every_difference(tmp_path: Path) -> None:
    """:func:`compare` on two hand-made traces: a moved hop and another answer are reported."""
    from v6lb.lab.trace import Trace

    def trace(node: str) -> Trace:
        meta = {
            "client_ports": [40001],
            "requests": [{"method": "GET", "answer": {"node": node, "server": "x"}}],
            "macs": {},
            "endpoints": {},
            "client": "2001:db8:1::100",
        }
        return Trace(tmp_path, meta, {}, {"net": 0})

    same = compare("nat", ("kernel", trace("be1")), ("python", trace("be1")))
    assert same.differences == ["kernel: no TCP hop of the traced flows was captured"]
    other = compare("nat", ("kernel", trace("be1")), ("python", trace("be2")))
    assert any(d.startswith("answers: kernel") and "be2" in d for d in other.differences)
