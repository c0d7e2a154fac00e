"""docs/run.md, "A real host in three namespaces", run exactly as written.

The section's ``sh root`` blocks are taken from the markdown, in order, and run in one bash
(as a reader types them into one shell), with ``-e`` so that any command that fails stops
it, and the venv's bin first on PATH (``v6lb``). The curls must get the backend's page
through each of the three VIPs (nat, dsr-ip6ip6, proxy-l7). Whatever happens, the
namespaces the section names are deleted afterwards, with the processes still in them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl"),
]

DOC = Path(__file__).resolve().parent.parent / "docs" / "run.md"
HEADING = "## A real host in three namespaces"
ANSWER = "hello from the backend"
WORKDIR = Path("/tmp/v6lb-qs")


def section(text: str) -> str:
    start = text.index(f"\n{HEADING}\n")
    end = text.find("\n## ", start + len(HEADING) + 1)
    return text[start : end if end >= 0 else len(text)]


def root_blocks(text: str) -> list[str]:
    """The bodies of the ```sh root fenced blocks, in order."""
    return re.findall(r"^```sh root\n(.*?)^```$", text, flags=re.M | re.S)


def _netns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def _cleanup(names: list[str]) -> None:
    """Stop what the section started in its namespaces (by pid), then delete them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for ns in names for p in _netns_pids(ns)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for ns in names for p in _netns_pids(ns)]
            time.sleep(0.1)
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    shutil.rmtree(WORKDIR, ignore_errors=True)


def test_the_real_host_quick_start_runs_as_written(tmp_path: Path) -> None:
    text = section(DOC.read_text())
    blocks = root_blocks(text)
    assert len(blocks) >= 6, f"expected the setup, the three modes and the clean-up: {blocks}"
    names = sorted(set(re.findall(r"\bv6lb-qs-[a-z]+\b", text)))
    assert names == ["v6lb-qs-be", "v6lb-qs-client", "v6lb-qs-lb"], names
    script = "".join(f"echo '== block {i + 1}' >&2\n{b}" for i, b in enumerate(blocks))
    for mode in ("mode: nat", "mode: dsr-ip6ip6", "mode: proxy-l7"):
        assert mode in script, mode
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    taken = [ns for ns in names if re.search(rf"^{ns}\b", existing, flags=re.M)]
    assert not taken, f"namespaces {taken} exist already (a quick start in progress?)"
    assert not WORKDIR.exists(), f"{WORKDIR} exists already (a quick start in progress?)"
    (tmp_path / "quickstart.sh").write_text(script)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    logs = ""
    try:
        with out.open("w") as o, err.open("w") as e:
            # files, not pipes: a background process left behind by a failure must not
            # hold the test's pipe open
            r = subprocess.run(
                ["bash", "-e", "-x", str(tmp_path / "quickstart.sh")],
                stdout=o,
                stderr=e,
                stdin=subprocess.DEVNULL,
                env=env,
                timeout=120,
                cwd=tmp_path,
            )
        # what the section's own clean-up left (before ours)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left_dir = WORKDIR.exists()
        if r.returncode != 0:
            logs = "".join(f"\n--- {p}\n{p.read_text()}" for p in sorted(WORKDIR.glob("*.log")))
    finally:
        _cleanup(names)
    stdout, stderr = out.read_text(), err.read_text()
    assert r.returncode == 0, f"exit {r.returncode}\n{stdout[-3000:]}\n{stderr[-4000:]}{logs}"
    assert stdout.count(ANSWER) == 3, stdout  # nat, dsr-ip6ip6, proxy-l7
    assert "UP" in stdout  # `v6lb status` of the nat VIP: its backend
    # the section's own clean-up removed everything
    assert not any(re.search(rf"^{ns}\b", left, flags=re.M) for ns in names), left
    assert not left_dir, f"the clean-up left {WORKDIR}"
