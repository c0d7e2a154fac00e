"""`v6lb explain` and `v6lb demo` on the built-in scenario: the answers each mode must give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from v6lb.cli import main

CLIENT = "2001:db8:ffff::100"


def _explain(mode: str, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, object]:
    assert main(["explain", "--mode", mode, "--json", *extra]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data, dict)
    return data


def test_nat_is_stateful_destination_nat(capsys: pytest.CaptureFixture[str]) -> None:
    d = _explain("nat", capsys)
    a = d["answers"]
    assert isinstance(a, dict)
    assert a["nat66_at_lb"] is True and a["nat_kind"] == "stateful destination NAT"
    assert a["backend_saw_source"] == CLIENT
    assert a["reply_via_lb"] is True
    assert "conntrack" in a["lb_state"]
    hops = d["hops"]
    assert isinstance(hops, list)
    private = [h for h in hops if h["link"] == "private" and h["sender"] == "lb-a1"]
    assert private and private[0]["src"].startswith(f"[{CLIENT}]:")
    assert private[0]["dst"].startswith("[fd00:10:0:")


def test_npt_is_stateless_prefix_translation(capsys: pytest.CaptureFixture[str]) -> None:
    a = _explain("npt", capsys)["answers"]
    assert isinstance(a, dict)
    assert a["nat66_at_lb"] is True and a["nat_kind"] == "stateless prefix translation"
    assert "none" in a["lb_state"]


@pytest.mark.parametrize("mode", ["dsr-l2", "dsr-ip6ip6", "dsr-srv6"])
def test_dsr_has_no_nat_and_reply_bypasses_the_lb(
    mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _explain(mode, capsys)
    a = d["answers"]
    assert isinstance(a, dict)
    assert a["nat66_at_lb"] is False and a["nat_kind"] == "none"
    assert a["reply_via_lb"] is False
    assert a["backend_saw_source"] == CLIENT
    hops = d["hops"]
    assert isinstance(hops, list)
    replies = [h for h in hops if h["client_bound"]]
    assert replies and all("lb" not in h["sender"] and "lb" not in h["receiver"] for h in replies)
    if mode != "dsr-l2":
        enc = [h for h in hops if h["sender"] == "lb-a1" and h["link"] == "private"]
        assert enc and enc[0]["proto"] == ("srv6" if mode == "dsr-srv6" else "ipv6-in-ipv6")


@pytest.mark.parametrize(("mode", "header"), [("proxy-l4", "PROXY v2"), ("proxy-l7", "Forwarded")])
def test_proxy_is_a_new_connection_with_the_client_in_a_header(
    mode: str, header: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _explain(mode, capsys)
    a = d["answers"]
    assert isinstance(a, dict)
    assert a["nat66_at_lb"] is False and a["nat_kind"] == "new connection (proxy)"
    assert a["backend_saw_source"] == "fd00:10::a1"  # the LB's inside address
    assert header in a["client_address_reaches_app"]
    facts = d["facts"]
    assert isinstance(facts, dict) and facts["app_saw_client"] == CLIENT


def test_failure_walkthrough_json(capsys: pytest.CaptureFixture[str]) -> None:
    d = _explain("nat", capsys, "--failure", "backend-dies")
    facts = d["facts"]
    assert isinstance(facts, dict) and "summary" in facts


def test_explain_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--mode", "bogus"]) == 2
    assert "unknown mode 'bogus'" in capsys.readouterr().err
    assert main(["explain", "--topology", str(tmp_path / "none.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("vips: []\ntopology:\n  nodes:\n    x: {type: spaceship}\n  links: []\n")
    assert main(["explain", "--topology", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "topology.nodes.x.type" in err and "fix:" in err


def test_demo_writes_report_pcaps_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for mode in (
        "proxy-l4",
        "proxy-l7",
        "npt",
        "nat",
        "dsr-l2",
        "dsr-ip6ip6",
        "dsr-srv6",
        "anycast",
    ):
        assert mode in text
    assert "The modes side by side" in text and "Failure walk-throughs" in text
    html = (out / "report.html").read_text()
    assert html.count("<svg") >= 8 + 3
    pcaps = sorted((out / "pcaps").rglob("*.pcap"))
    assert len(pcaps) > 40 and all(p.stat().st_size > 24 for p in pcaps)
    data = json.loads((out / "explain.json").read_text())
    assert {d["mode"] for d in data} >= {"nat", "npt", "dsr-srv6", "proxy-l7"}


def test_check_validates_the_topology(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "examples/eks-ipv6.yaml"]) == 0
    out = capsys.readouterr().out
    assert "topology: 15 nodes" in out and "bgp: 2 announcements" in out
