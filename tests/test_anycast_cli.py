"""`v6lb lab failover` and `v6lb lab trace --mode anycast` refuse bad arguments before building anything."""

from __future__ import annotations

import pytest

from v6lb.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lab", "failover", "examples/anycast-sites.yaml", "--rounds", "0"], "must be positive"),
        (["lab", "trace", "--mode", "anycast"], "--mode anycast examples/anycast-sites.yaml"),
        (["lab", "failover", "x.yaml", "--name", "No-Such"], "lab name 'No-Such' is not valid"),
        (["lab", "trace", "--mode", "anycast", "x.yaml", "--name", "a-b"], "is not valid"),
        (["lab", "trace", "x.yaml", "--file", "y.yaml", "--mode", "nat"], "give one"),
    ],
)
def test_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lab", "failover", "f.yaml", "--failure", "meteor"], "use one of: lb-instance-dies,"),
        (
            ["lab", "failover", "f.yaml", "--failure", "packet-too-big"],
            "runs only in the simulator (v6lb explain --failure packet-too-big)",
        ),
        (["lab", "trace", "--mode", "anycast", "f.yaml", "--failure", "boom"], "site-uplink-down"),
        (
            ["explain", "--failure", "site-backends"],
            "site-backends-die runs only in the lab (v6lb lab failover FILE",
        ),
        (["lab", "diff", "--mode", "anycast"], "invalid choice: 'anycast'"),
    ],
)
def test_failure_names_and_modes_are_checked(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One set of failure names: each command takes those it runs and names where the
    others run; a usage error prints the subcommand's usage."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err, err
    assert err.startswith(f"usage: v6lb {' '.join(argv[:2]) if argv[0] == 'lab' else argv[0]}")


def test_old_failure_names_are_aliases() -> None:
    from v6lb.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["lab", "failover", "f.yaml", "--failure", "kill-instance"])
    assert args.failure == ["lb-instance-dies"]
    for old, new in (("site-backends", "site-backends-die"), ("site-uplink", "site-uplink-down")):
        args = parser.parse_args(["lab", "trace", "--mode", "anycast", "f", "--failure", old])
        assert args.failure == new
    assert parser.parse_args(["explain", "--failure", "kill-instance"]).failure == (
        "lb-instance-dies"
    )


def test_help_names_the_old_failure_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["lab", "failover", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "old names, deprecated: kill-instance = lb-instance-dies" in out


def test_the_layouts_and_the_failures_they_refuse() -> None:
    """eks-ipv6.yaml's layout: igw over lb-a1/lb-a2, lb-b1 direct with isp, the pods shared;
    the site failures that cannot reach a working backup there are refused, saying why."""
    from pathlib import Path

    from v6lb.lab.failover import FAILURES, _load, refusal, runnable

    examples = Path(__file__).resolve().parent.parent / "examples"
    _config, topo, lay = _load(examples / "eks-ipv6.yaml")
    primary, backup = lay.sites
    assert (lay.client, lay.upstream, str(lay.vip.address)) == (
        "client",
        "isp",
        "2001:db8:a:1a0::1",
    )
    assert (primary.router, primary.lan, primary.uplink, primary.lbs) == (
        "igw", "public", "transit-a", ["lb-a1", "lb-a2"]
    )  # fmt: skip
    assert (backup.router, backup.lan, backup.uplink, backup.lbs) == (
        "isp", "transit-b", None, ["lb-b1"]
    )  # fmt: skip
    assert primary.backends == backup.backends == ["pod-1a", "pod-2a", "pod-3a"]
    assert runnable(examples / "eks-ipv6.yaml") == ["lb-instance-dies", "site-lbs-die"]
    refused = {
        f: refusal(topo, lay.sites, lay.client, lay.vip.address, f)
        for f in ("site-backends-die", "site-uplink-down")
    }
    assert "share their backends (pod-1a, pod-2a, pod-3a)" in str(refused["site-backends-die"])
    assert "through igw's uplink transit-a" in str(refused["site-uplink-down"])
    assert all("site-lbs-die" in (e.fix or "") for e in refused.values() if e is not None)
    assert runnable(examples / "anycast-sites.yaml") == list(FAILURES)
