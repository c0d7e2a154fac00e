"""The CLI a newcomer cannot trip over: the demo's short form, --mode with --failure,
the anycast hint, one "fix:" per error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from v6lb.cli import main
from v6lb.errors import UsageError
from v6lb.lab.plan import LabError
from v6lb.model.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_demo_leads_with_the_answer_in_80_columns(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "v6lb.cli", "demo", "--out", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert len(lines) <= 60, done.stdout
    assert max(len(line) for line in lines) <= 80, done.stdout
    text = done.stdout
    assert text.index("The question:") < text.index("dsr-ip6ip6") < text.index("Failure walk")
    for mode in ("proxy-l4", "proxy-l7", "npt", "nat", "dsr-l2", "dsr-srv6", "anycast"):
        assert any(line.startswith(mode + " ") for line in lines), mode
    for failure in ("backend-dies", "lb-instance-dies", "packet-too-big"):
        assert sum(line.startswith(failure) for line in lines) == 1, failure
    assert "pod-1a died: 1 flow moved, 2 others carried on" in text
    for f in ("report  out/report.html", "JSON    out/explain.json", "pcaps   out/pcaps/"):
        assert f in text
    out = tmp_path / "out"
    assert (out / "report.html").is_file() and (out / "explain.json").is_file()


def test_explain_honours_mode_with_failure(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--mode", "dsr-l2", "--failure", "backend-dies", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mode"] == "dsr-l2" and d["facts"]["vip_mode"] == "dsr-l2"
    assert d["facts"]["failure"] == "backend-dies"
    assert main(["explain", "--mode", "nat", "--failure", "packet-too-big"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: v6lb explain")
    assert "--failure packet-too-big cannot run under --mode nat" in err
    assert err.count("fix:") == 1


def test_anycast_without_bgp_says_add_a_bgp_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(ROOT / "examples/lab-modes.yaml"), "--mode", "anycast"]) == 2
    err = capsys.readouterr().err
    assert "add a bgp: section" in err and "VIP with mode anycast" not in err


@pytest.mark.parametrize(
    "err",
    [
        UsageError("x.yaml: vips[0].port: 0 is out of range; fix: use 1 to 65535", "fix it"),
        LabError(str(ConfigError("x.yaml", "vips", "bad", "use a list")), "fix the file"),
    ],
    ids=["usage", "lab"],
)
def test_one_fix_per_error(err: Exception) -> None:
    assert str(err).count("fix:") == 1, str(err)


def test_lab_exec_on_a_lab_that_is_not_up(capsys: pytest.CaptureFixture[str]) -> None:
    name = f"gone{os.getpid() % 100000}"
    assert main(["lab", "exec", "--name", name, "client", "--", "true"]) == 2
    err = capsys.readouterr().err
    assert f"lab {name!r} is not up" in err and "no node" not in err
    assert "v6lb lab up FILE --name NAME" in err


def test_a_failed_lab_trace_removes_its_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lab whose namespaces are gone: tcpdump cannot start, and the raw captures'
    directory goes with the error."""
    import tempfile

    from v6lb.lab.trace import run_trace

    root, tmp = tmp_path / "labs", tmp_path / "tmp"
    tmp.mkdir()
    (root / "ghost").mkdir(parents=True)
    state = {"phase": "up", "file": str(ROOT / "examples/lab-modes.yaml")}
    (root / "ghost" / "state.json").write_text(json.dumps(state))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with pytest.raises(LabError, match="tcpdump did not start"):
        run_trace("ghost", "nat", tmp_path / "out", root=root)
    assert list(tmp.iterdir()) == []
