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
