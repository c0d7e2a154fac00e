"""The lab on the xdp data plane equals the simulator, link by link, for its four modes.

``examples/lab-xdp.yaml`` (a one-armed LB behind a router) goes up once with
``--dataplane xdp``; ``v6lb lab diff --mode M`` for npt, dsr-l2, dsr-ip6ip6 and dsr-srv6
traces three client flows each (every link captured) and finds no difference from the
simulator's prediction. The LB ran the program natively on its link and transmitted the
traced packets (its status counters: encapsulated, MAC-rewritten and translated). A
packet longer than the tunnel MTU is answered by the program with a Packet Too Big;
nothing reaches the forward filter. The LB's ``v6lb run`` is then killed (no teardown of its own): ``v6lb lab down``
leaves nothing pinned under /sys/fs/bpf.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from v6lb.engines.xdp.run import pin_dirs, pin_tag

pytestmark = [pytest.mark.root]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lab-xdp.yaml"
V6LB = [sys.executable, "-m", "v6lb.cli"]
VIP = "2001:db8:100::82"  # the dsr-ip6ip6 VIP, tunnel MTU 1500


def _v6lb(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*V6LB, *argv], capture_output=True, text=True, timeout=timeout)


def wait_for_status(sock: str, ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        st: dict[str, Any] = json.loads(_v6lb("status", "--json", "--control-socket", sock).stdout)
        if ok(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def test_lab_xdp_diff_is_empty_for_its_four_modes() -> None:
    name = f"xl{os.getpid() % 100000}"
    tag = pin_tag("lb", f"v6lb-{name}-lb")
    try:
        up = _v6lb("lab", "up", str(EXAMPLE), "--dataplane", "xdp", "--name", name, timeout=180)
        assert up.returncode == 0, up.stderr
        assert "XDP_PASS program on" in up.stderr
        for mode in ("npt", "dsr-l2", "dsr-ip6ip6", "dsr-srv6"):
            r = _v6lb("lab", "diff", "--name", name, "--mode", mode)
            assert r.returncode == 0 and "no differences" in r.stdout, (mode, r.stdout, r.stderr)
            assert r.stdout.count("  same  ") >= 6, r.stdout  # the flows were captured
        st = json.loads(_v6lb("lab", "status", "--name", name, "--json").stdout)
        assert st["dataplane"] == "xdp" and st["lbs"]["lb"]["status"]["dataplane"] == "xdp"
        sock = st["lbs"]["lb"]["socket"]
        lb = json.loads(_v6lb("status", "--json", "--control-socket", sock).stdout)
        assert lb["xdp"]["mode"] == "native" and lb["xdp"]["interface"] == "v6lb-edge"
        counters = lb["xdp"]["counters"]
        assert counters["tx"] >= 12, lb["xdp"]  # the tunnel modes' handshakes at least
        assert counters["tx-l2"] >= 6 and counters["tx-npt"] >= 12, lb["xdp"]  # both ways
        # Longer than the tunnel MTU: the program answers with a Packet Too Big itself
        # (XDP_TX back to the sender), as the core does.
        send = (
            "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 58);"
            f" s.sendto(bytes([128, 0, 0, 0, 0, 1, 0, 1]) + bytes(1432), ({VIP!r}, 0))"
        )
        r = _v6lb("lab", "exec", "--name", name, "rtr", "--", "python3", "-c", send)
        assert r.returncode == 0, r.stderr
        after = wait_for_status(sock, lambda s: s["xdp"]["counters"].get("tx-too-big", 0) >= 1)
        assert after["xdp"]["counters"]["tx-too-big"] == 1, after["xdp"]
        assert after["forward"]["forward_denied"] == 0, after["forward"]
        (pinned,) = pin_dirs(tag)
        assert (pinned / "link").exists()
        # killed: it cannot remove what it pinned; lab down does
        run = next(p for p in st["processes"] if p["kind"] == "run")
        os.kill(run["pid"], signal.SIGKILL)
    finally:
        down = _v6lb("lab", "down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert f"unpinned /sys/fs/bpf/v6lb-{tag}_0" in down.stderr, down.stderr
    assert not pin_dirs(tag)
