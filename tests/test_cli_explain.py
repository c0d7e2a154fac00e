"""`v6lb explain` and `v6lb demo` on the built-in scenario: the answers each mode must give."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--mode", "bogus"])
    assert exc.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
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
    assert main(["demo", "--all-hops", "--out", str(out)]) == 0
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


# --- packet-too-big: the inbound and the reply-path walk-throughs -----------------------


def _ptb(capsys: pytest.CaptureFixture[str], *file: str) -> dict[str, Any]:
    assert main(["explain", *file, "--failure", "packet-too-big", "--json"]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def test_packet_too_big_reply_path_lowered_when_the_file_has_no_small_link(
    capsys: pytest.CaptureFixture[str],
) -> None:
    d = _ptb(capsys)
    f = d["facts"]
    reply = f["reply_path"]
    assert reply["lowered_from"] == 1500 and reply["link_mtu"] == 1280
    assert "lowered from 1500 for this walk-through" in f["summary"]
    # the router's error: to the VIP, then from the LB to the flow's backend, one packet
    errors = [h for h in d["hops"] if h["leg"] == "error" and "mtu 1280" in h["detail"]]
    first = [h for h in errors if h["packet_id"] == errors[0]["packet_id"]]
    assert [(h["sender"], h["receiver"]) for h in first][:2] == [
        ("igw", "lb-a1"),
        ("lb-a1", "node2"),
    ]
    assert first[-1]["receiver"] == reply["backend_node"] == reply["delivered_to"]
    assert any(h["follows_error"] and h["sender"] == reply["backend_node"] for h in d["hops"])
    engines = {e["engine"]: e for e in f["engines"]}
    assert set(engines) >= {"kernel", "python", "simulator", "proxy"}
    kernel = engines["kernel"]
    assert len(kernel["quote_shapes"]) == 4 and "unmatched" in kernel["dropped"]
    assert set(kernel["counters"]) == {"v4_web_ip6ip6_icmp", "v4_web_ip6ip6_icmp_unmatched"}
    assert "socket" in engines["proxy"]["how"] and "the core" in engines["simulator"]["how"]
    cannot = " ".join(c["where"] for c in f["cannot_work"])
    for setup in ("stateful firewall", "ICMPv6 filtered on the backend", "ECMP router"):
        assert setup in cannot


def test_packet_too_big_on_a_file_with_a_small_link_on_the_reply_path(
    capsys: pytest.CaptureFixture[str],
) -> None:
    f = _ptb(capsys, "examples/lab-pmtu.yaml")["facts"]
    reply = f["reply_path"]
    assert (reply["link"], reply["router"], reply["lowered_from"]) == ("wan", "rtr", None)
    assert reply["ptb_way"][:1] == ["rtr -> lb on edge"] and reply["completed"] is True
    assert reply["resent_segment_size"] == 1280 and "for this walk-through" not in f["summary"]
    # the inbound part is honest about who answered: isp, before the LB
    assert f["ptb_by"] == "isp" and "router isp answered" in f["inbound_summary"]


def test_packet_too_big_text_names_engines_and_limits(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--failure", "packet-too-big"]) == 0
    out = capsys.readouterr().out
    for text in (
        "What happened:",
        "Reply path: pod-",
        "How each engine passes a Packet Too Big for the VIP on:",
        "kernel (v6lb run --dataplane kernel)",
        "v4_web_ip6ip6_icmp_unmatched",
        "Where it cannot work, whatever the LB does:",
    ):
        assert text in out, text


def test_packet_too_big_engine_notes_are_what_the_code_does() -> None:
    """The counters named exist in the rendered kernel rules; the core forwards an error
    quoting the VIP's flow and drops (as unmatched) one whose quote has two headers."""
    from ipaddress import IPv6Address

    from v6lb.core.verdict import DROP, FORWARD
    from v6lb.engines.sim.pmtu import engine_notes
    from v6lb.model.config import load_topology
    from v6lb.model.pools import dsr_forwarder
    from v6lb.render.nftables import L2Ports, render_nft
    from v6lb.wire import build
    from v6lb.wire.reasons import Reason

    config, _ = load_topology(Path("examples/lab-pmtu.yaml"))
    vip = next(v for v in config.vips if v.name == "web-srv6")
    notes = {n["engine"]: n for n in engine_notes(config, vip)}
    macs = {b.address: "02:00:00:00:00:0a" for v in config.vips for b in v.backends}
    nft = render_nft(config, l2=L2Ports("eth0", "eth1", "02:00:00:00:00:01"), backend_macs=macs)
    counters = notes["kernel"]["counters"]
    assert isinstance(counters, dict)
    for name in counters:
        assert f'counter name "{name}"' in nft, name
    assert "seg6" in str(notes["kernel"]["how"])
    fwd = dsr_forwarder(config)
    seg = bytes(build.tcp(vip.address, CLIENT, 80, 45000, flags=0x18, payload=b"x" * 1400))
    ptb = build.icmpv6_error("2001:db8:2::1", vip.address, 2, 0, seg, 1280)
    action, _, _ = fwd.process(ptb, 1, 0.0)
    assert action == FORWARD
    two = build.ipv6(
        vip.address,
        IPv6Address(CLIENT),
        6,
        bytes(build.tcp(vip.address, CLIENT, 80, 45000))[40:],
        ext=[build.hbh(), build.dstopts()],
    )
    action, reason, _ = fwd.process(
        build.icmpv6_error("2001:db8:2::1", vip.address, 2, 0, two, 1280), 1, 0.0
    )
    assert (action, reason) == (DROP, Reason.ICMP_ERROR_UNMATCHED)
