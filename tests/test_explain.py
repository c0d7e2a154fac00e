"""The explain builder works from observed packets alone: it diffs hops of one packet."""

from __future__ import annotations

import json

from v6lb.model.explain import answer_lines, explain
from v6lb.model.hops import Hop, view
from v6lb.wire import build

CLIENT, VIP, BACKEND, LB = "2001:db8:ff::10", "2001:db8:100::80", "fd00:10::11", "2001:db8:100::2"
NODES = {"client": "client", "rtr": "router", "lb1": "lb", "node1": "node", "pod1": "pod"}


def _nat_hops() -> list[Hop]:
    syn = build.tcp(CLIENT, VIP, 40000, 80, flags=0x02, hop_limit=63)
    dnat = build.tcp(CLIENT, BACKEND, 40000, 8080, flags=0x02, hop_limit=62)
    rep = build.tcp(BACKEND, CLIENT, 8080, 40000, flags=0x12, hop_limit=64)
    rep2 = build.tcp(VIP, CLIENT, 80, 40000, flags=0x12, hop_limit=63)
    return [
        Hop(1, 0.0, "inet", "rtr", "lb1", bytes(syn), packet_id=1, leg="request"),
        Hop(
            2,
            0.001,
            "private",
            "lb1",
            "pod1",
            bytes(dnat),
            packet_id=1,
            leg="request",
            note="DNAT by conntrack",
        ),
        Hop(3, 0.002, "private", "pod1", "lb1", bytes(rep), packet_id=2, leg="reply"),
        Hop(4, 0.003, "inet", "lb1", "rtr", bytes(rep2), packet_id=2, leg="reply"),
        Hop(
            5,
            0.004,
            "inet",
            "rtr",
            "lb1",
            bytes(build.udp(CLIENT, VIP, 1, 9)),
            packet_id=3,
            leg="stray",
            dropped="no-match",
        ),
    ]


def test_nat_changes_are_found_by_diffing() -> None:
    facts = {
        "client": CLIENT,
        "backend_saw_source": CLIENT,
        "reply_via_lb": True,
        "lb_state": "1 conntrack entry",
    }
    e = explain("nat", _nat_hops(), facts, NODES)
    assert e.answers.nat66_at_lb
    assert e.answers.nat_kind == "stateful destination NAT"
    assert e.answers.changed_at_lb == [
        f"destination {VIP} -> {BACKEND}",
        "destination port 80 -> 8080",
    ]
    r = e.rows
    assert (r[0].src, r[0].dst) == (f"[{CLIENT}]:40000", f"[{VIP}]:80")
    assert (
        r[1].change
        == f"destination {VIP} -> {BACKEND}; destination port 80 -> 8080; hop limit 63 -> 62 (DNAT by conntrack)"
    )
    assert r[3].change.startswith(f"source {BACKEND} -> {VIP}; source port 8080 -> 80")
    assert r[4].dropped == "no-match"
    d = json.loads(e.to_json())
    assert d["answers"]["nat_kind"] == "stateful destination NAT" and len(d["hops"]) == 5
    lines = dict(answer_lines(e.answers))
    assert lines["Does the reply go back through the LB?"] == "yes"
    assert lines["How does the client's address reach the application?"].startswith(
        "it is the packet's source"
    )


def test_dsr_encapsulation_is_not_nat() -> None:
    inner = build.tcp(CLIENT, VIP, 40000, 80, flags=0x02, hop_limit=63)
    outer = build.ipv6(LB, BACKEND, 41, inner, hop_limit=64)
    hops = [
        Hop(1, 0.0, "inet", "rtr", "lb1", bytes(inner), packet_id=1, leg="request"),
        Hop(2, 0.001, "private", "lb1", "node1", bytes(outer), packet_id=1, leg="request"),
    ]
    facts = {
        "client": CLIENT,
        "backend_saw_source": CLIENT,
        "reply_via_lb": False,
        "lb_state": "flow cache entry",
    }
    e = explain("dsr-ip6ip6", hops, facts, NODES)
    assert not e.answers.nat66_at_lb and e.answers.nat_kind == "none"
    assert e.rows[1].change.startswith(f"encapsulated in IPv6-in-IPv6: outer {LB} -> {BACKEND}")
    assert e.rows[1].proto == "ipv6-in-ipv6"
    assert view(outer).innermost.dst.addr == VIP


def test_npt_is_stateless_prefix_translation() -> None:
    a = build.tcp("fd01:203:405:1::1234", "2001:db8:ffff::80", 1, 443, hop_limit=64)
    b = build.tcp("2001:db8:1:d550::1234", "2001:db8:ffff::80", 1, 443, hop_limit=63)
    hops = [
        Hop(1, 0.0, "private", "pod1", "lb1", bytes(a), packet_id=1),
        Hop(2, 0.0, "inet", "lb1", "rtr", bytes(b), packet_id=1),
    ]
    e = explain(
        "npt",
        hops,
        {"client": "fd01:203:405:1::1234", "backend_saw_source": "2001:db8:1:d550::1234"},
        NODES,
    )
    assert e.answers.nat66_at_lb and e.answers.nat_kind == "stateless prefix translation"
    assert e.answers.changed_at_lb == ["source fd01:203:405:1::1234 -> 2001:db8:1:d550::1234"]
