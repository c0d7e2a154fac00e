"""The lab on the xdp data plane equals the simulator, link by link, for both tunnel modes.

``examples/lab-xdp.yaml`` (a one-armed LB behind a router) goes up with ``--dataplane
xdp``; ``v6lb lab diff --mode dsr-ip6ip6`` and ``--mode dsr-srv6`` trace three client
flows each (every link captured) and find no difference from the simulator's
prediction. The LB ran the program natively on its link and transmitted the traced
packets (its status counters). The LB's ``v6lb run`` is then killed (no teardown of its
own): ``v6lb lab down`` leaves nothing pinned under /sys/fs/bpf.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from v6lb.engines.xdp.run import pin_dirs, pin_tag

pytestmark = [pytest.mark.root]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lab-xdp.yaml"
V6LB = [sys.executable, "-m", "v6lb.cli"]


def _v6lb(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*V6LB, *argv], capture_output=True, text=True, timeout=timeout)


def test_lab_xdp_diff_is_empty_for_both_tunnel_modes() -> None:
    name = f"xl{os.getpid() % 100000}"
    tag = pin_tag("lb", f"v6lb-{name}-lb")
    try:
        up = _v6lb("lab", "up", str(EXAMPLE), "--dataplane", "xdp", "--name", name, timeout=180)
        assert up.returncode == 0, up.stderr
        assert "XDP_PASS program on" in up.stderr
        for mode in ("dsr-ip6ip6", "dsr-srv6"):
            r = _v6lb("lab", "diff", "--name", name, "--mode", mode)
            assert r.returncode == 0 and "no differences" in r.stdout, (mode, r.stdout, r.stderr)
            assert r.stdout.count("  same  ") >= 6, r.stdout  # the flows were captured
        st = json.loads(_v6lb("lab", "status", "--name", name, "--json").stdout)
        assert st["dataplane"] == "xdp" and st["lbs"]["lb"]["status"]["dataplane"] == "xdp"
        sock = st["lbs"]["lb"]["socket"]
        lb = json.loads(_v6lb("status", "--json", "--control-socket", sock).stdout)
        assert lb["xdp"]["mode"] == "native" and lb["xdp"]["interface"] == "v6lb-edge"
        assert lb["xdp"]["counters"]["tx"] >= 12, lb["xdp"]  # both modes' handshakes at least
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
