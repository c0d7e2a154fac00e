"""`v6lb lab failover` and `v6lb lab trace --mode anycast` refuse bad arguments before building anything."""

from __future__ import annotations

import pytest

from v6lb.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lab", "failover", "examples/anycast-sites.yaml", "--rounds", "0"], "must be positive"),
        (["lab", "trace", "--mode", "anycast"], "--file examples/anycast-sites.yaml"),
        (
            ["lab", "trace", "--mode", "anycast", "--file", "x.yaml", "--failure", "boom"],
            "use none or one of: kill-instance, site-backends, site-uplink",
        ),
    ],
)
def test_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_failover_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["lab", "failover", "examples/anycast-sites.yaml", "--failure", "meteor"])
    assert "kill-instance" in capsys.readouterr().err
