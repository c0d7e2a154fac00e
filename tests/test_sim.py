"""The simulator: every mode's hops carry the expected addresses at every link, and are valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from v6lb.core.proxyproto import SIGNATURE
from v6lb.engines.sim import MODES, ScenarioResult, modes_available, run_scenario
from v6lb.model.config import Config, load_topology
from v6lb.model.hops import Hop
from v6lb.model.topology import Topology

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "eks-ipv6.yaml"
CLIENT = "2001:db8:ffff::100"
LB_A1_IN = "fd00:10::a1"
LB_A1_OUT = "2001:db8:a::10"
PODS_A = {"fd00:10:0:1::a", "fd00:10:0:2::a", "fd00:10:0:3::a"}
PODS_B = {"fd00:10:0:1::b", "fd00:10:0:2::b", "fd00:10:0:3::b"}
# The tunnel end points of pod-Na: on its lo (address ::a, SID ::6), routed to it by the LBs.
TUNNEL_ENDS = {"fd00:10:0:e1::a", "fd00:10:0:e2::a", "fd00:10:0:e3::a"}
NODES = {"fd00:10::11", "fd00:10::12", "fd00:10::13"}
LBS = {"lb-a1", "lb-a2", "lb-b1"}


@pytest.fixture(scope="session")
def eks() -> tuple[Config, Topology]:
    return load_topology(EXAMPLE)


@pytest.fixture(scope="session")
def results(eks: tuple[Config, Topology]) -> dict[str, ScenarioResult]:
    config, topo = eks
    return {mode: run_scenario(config, topo, mode) for mode in MODES}


def on(r: ScenarioResult, link: str, leg: str | None = None) -> list[Hop]:
    return [
        h for h in r.hops if h.link == link and h.dropped is None and (leg is None or h.leg == leg)
    ]


def test_modes_available(eks: tuple[Config, Topology]) -> None:
    assert modes_available(eks[0]) == list(MODES)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_completes_without_drops(results: dict[str, ScenarioResult], mode: str) -> None:
    r = results[mode]
    assert r.facts["response"] is not None and str(r.facts["response"]).startswith("HTTP/1.1 200")
    assert [h for h in r.hops if h.dropped] == []
    assert r.facts["client"] == CLIENT
    assert r.nodes["client"] == "client" and r.nodes["lb-a1"] == "lb"
    assert r.nodes["node1"] == "node" and r.nodes["pod-1a"] == "pod" and r.nodes["igw"] == "router"
    times = [h.time for h in r.hops]
    assert times == sorted(times)


def test_nat_rewrites_destination_only_and_reply_returns_via_lb(
    results: dict[str, ScenarioResult],
) -> None:
    r = results["nat"]
    vip = "2001:db8:a:100::82"
    backend = r.facts["backend"]
    assert backend in PODS_A
    syn = on(r, "internet", "handshake")[0].pkt
    assert (syn.src.addr, syn.dst.addr, syn.dst.port) == (CLIENT, vip, 80)
    inside = [h.pkt for h in on(r, "private") if h.sender == "lb-a1"]
    # ...to the backend's port (8081: port 80 of the pods is left to npt)
    assert inside and all(p.dst.addr == backend and p.dst.port == 8081 for p in inside)
    assert all(p.src.addr == CLIENT and p.src.port == syn.src.port for p in inside)  # no SNAT
    back = [h.pkt for h in on(r, "private") if h.receiver == "lb-a1"]
    assert back and all((p.src.addr, p.dst.addr) == (backend, CLIENT) for p in back)
    out = [h.pkt for h in on(r, "public") if h.sender == "lb-a1"]
    assert out and all((p.src.addr, p.src.port, p.dst.addr) == (vip, 80, CLIENT) for p in out)
    f = r.facts
    assert f["backend_saw_source"] == CLIENT and f["app_saw_client"] == CLIENT
    assert f["reply_via_lb"] is True
    assert "stateful destination NAT" in str(f["translation"])
    assert str(f["lb_state"]).startswith("conntrack: 1 entry")
    assert f"=> [{backend}]:8081" in str(f["lb_state"])


def test_npt_rewrites_the_backend_prefix_statelessly(results: dict[str, ScenarioResult]) -> None:
    r = results["npt"]
    f = r.facts
    mapped = str(f["chosen_record"])
    inside = str(f["backend"])
    assert mapped.startswith("2001:db8:10:") and inside.startswith("fd00:10:0:")
    assert mapped.endswith(inside.rsplit(":", 1)[1])  # same interface identifier
    assert len(f["aaaa_records"]) == 6
    syn = on(r, "internet")[0].pkt
    assert (syn.src.addr, syn.dst.addr) == (CLIENT, mapped)
    to_pod = [h.pkt for h in on(r, "private") if h.sender == "lb-a1"]
    assert to_pod and all((p.src.addr, p.dst.addr) == (CLIENT, inside) for p in to_pod)
    reply = [h.pkt for h in on(r, "public") if h.sender == "lb-a1"]
    assert reply and all((p.src.addr, p.dst.addr) == (mapped, CLIENT) for p in reply)
    assert f["backend_saw_source"] == CLIENT
    assert "stateless" in str(f["translation"]) and "nothing per flow" in str(f["lb_state"])
    assert "AAAA" in str(f["balancing"]) and "TTL" in str(f["balancing"])


@pytest.mark.parametrize(("mode", "proto"), [("dsr-ip6ip6", "ipv6-in-ipv6"), ("dsr-srv6", "srv6")])
def test_dsr_tunnels_keep_the_inner_packet_and_bypass_the_lb_on_reply(
    results: dict[str, ScenarioResult], mode: str, proto: str
) -> None:
    r = results[mode]
    vip = {"dsr-ip6ip6": "2001:db8:a:100::84", "dsr-srv6": "2001:db8:a:100::85"}[mode]
    backend = r.facts["backend"]
    assert backend in TUNNEL_ENDS
    end = backend[:-1] + "6" if mode == "dsr-srv6" else backend  # the SID, or the address
    tunnelled = [h.pkt for h in on(r, "private") if h.sender == "lb-a1"]
    assert tunnelled
    for p in tunnelled:
        assert p.proto == proto and (p.src.addr, p.dst.addr) == (LB_A1_IN, end)
        assert p.inner is not None
        assert (p.inner.src.addr, p.inner.dst.addr, p.inner.dst.port) == (CLIENT, vip, 80)
    if mode == "dsr-srv6":
        assert tunnelled[0].segments == (end,)
    replies = [h for h in r.hops if h.pkt.src.addr == vip and h.pkt.dst.addr == CLIENT]
    assert replies and not any(h.sender in LBS or h.receiver in LBS for h in replies)
    assert [h.link for h in replies if h.leg == "response"] == [
        "pods-" + backend[11],  # fd00:10:0:eN::a is pod-Na's, on pods-N
        "private",
        "transit-a",
        "internet",
    ]
    f = r.facts
    assert f["reply_via_lb"] is False
    assert f["backend_saw_source"] == CLIENT and f["backend_saw_destination"] == vip
    assert "no NAT" in str(f["translation"]) and "flow cache" in str(f["lb_state"])


def test_dsr_l2_hands_the_unchanged_packet_to_a_node(results: dict[str, ScenarioResult]) -> None:
    r = results["dsr-l2"]
    vip = "2001:db8:a:100::83"
    assert r.facts["backend"] in NODES
    arriving = [h.pkt for h in on(r, "public") if h.receiver == "lb-a1"]
    handed = [h.pkt for h in on(r, "private") if h.sender == "lb-a1"]
    assert handed and len(handed) == len(arriving)
    for a, b in zip(arriving, handed, strict=True):
        assert (b.src, b.dst) == (a.src, a.dst) and b.dst.addr == vip
        assert b.hop_limit == a.hop_limit  # L2 DSR does not route
    assert r.facts["reply_via_lb"] is False


def test_proxy_l4_two_connections_and_proxy_v2(results: dict[str, ScenarioResult]) -> None:
    r = results["proxy-l4"]
    vip = "2001:db8:a:100::80"
    f = r.facts
    backend = f["backend"]
    assert backend in PODS_A
    client_side = {(h.pkt.src.addr, h.pkt.dst.addr) for h in on(r, "internet")}
    assert client_side == {(CLIENT, vip), (vip, CLIENT)}
    backend_side = {(h.pkt.src.addr, h.pkt.dst.addr) for h in on(r, "private")}
    assert backend_side == {(LB_A1_IN, backend), (backend, LB_A1_IN)}
    first_data = next(
        h for h in on(r, "private") if h.sender == "lb-a1" and "bytes" in h.pkt.detail
    )
    payload = first_data.data[60:]
    assert payload.startswith(SIGNATURE) and payload[12:14] == b"\x21\x21"
    assert f["backend_saw_source"] == LB_A1_IN
    assert f["app_saw_client"] == CLIENT and f["client_address_via"] == "PROXY v2 header"
    assert f["proxy_v2"] == f"[{CLIENT}]:{on(r, 'internet')[0].pkt.src.port}"
    assert f["reply_via_lb"] is True and "two TCP connections" in str(f["lb_state"])


def test_proxy_l7_forwarded_headers(results: dict[str, ScenarioResult]) -> None:
    r = results["proxy-l7"]
    f = r.facts
    port = on(r, "internet")[0].pkt.src.port
    assert f["backend"] in PODS_B
    assert f["backend_saw_source"] == LB_A1_IN
    assert f["x_forwarded_for"] == CLIENT
    assert str(f["forwarded"]).startswith(f'for="[{CLIENT}]:{port}";by="[2001:db8:a:100::81]:80"')
    assert f["app_saw_client"] == CLIENT
    assert f["client_address_via"] == "Forwarded header (RFC 7239)"
    request = next(h for h in on(r, "private") if h.sender == "lb-a1" and "bytes" in h.pkt.detail)
    assert b"X-Forwarded-For: " + CLIENT.encode() in request.data


def test_anycast_ecmp_instances_agree_and_site_failover(results: dict[str, ScenarioResult]) -> None:
    f = results["anycast"].facts
    flows = f["flows"]
    assert isinstance(flows, list) and {fl["lb_node"] for fl in flows} == {"lb-a1", "lb-a2"}
    assert f["maglev_agree"] is True
    for fl in flows:
        assert set(fl["picks_by_instance"].values()) == {fl["backend"]}
    assert f["site"] == "primary" and f["site_after_failure"] == "backup"
    assert f["lb_after_site_failure"] == "lb-b1"
    assert str(f["response_after_site_failure"]).startswith("HTTP/1.1 200")
    assert any("via lb-b1" in line for line in f["routes_after"])
    assert f["reply_via_lb"] is False


def test_runs_are_deterministic(eks: tuple[Config, Topology]) -> None:
    a = run_scenario(*eks, "nat", seed=3)
    b = run_scenario(*eks, "nat", seed=3)
    c = run_scenario(*eks, "nat", seed=4)
    assert [(h.time, h.link, h.data) for h in a.hops] == [(h.time, h.link, h.data) for h in b.hops]
    assert a.pcaps == b.pcaps
    assert a.hops[0].pkt.src.port != c.hops[0].pkt.src.port


def test_bad_arguments(eks: tuple[Config, Topology]) -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        run_scenario(*eks, "bogus")
    with pytest.raises(ValueError, match="unknown failure"):
        run_scenario(*eks, "nat", failure="meteor")
    with pytest.raises(ValueError, match="tunnel mode"):
        run_scenario(*eks, "nat", failure="packet-too-big")
    with pytest.raises(ValueError, match="2 LB instances"):
        run_scenario(*eks, "nat", failure="lb-instance-dies")


# --- what the hop records say: legs and notes --------------------------------------------


def _first(r: ScenarioResult, leg: str, sender: str) -> Hop:
    return next(h for h in r.hops if h.leg == leg and h.sender == sender and h.dropped is None)


def test_tcp_legs_name_what_each_segment_is_for(results: dict[str, ScenarioResult]) -> None:
    for r in results.values():
        for h in r.hops:
            p = h.pkt.innermost
            if p.proto != "tcp" or h.leg in ("reset", "error"):
                continue
            flags = p.detail.split("]")[0]
            data = "bytes" in p.detail
            if "S" in flags:
                assert h.leg == "handshake", h
            elif "F" in flags:
                assert h.leg == "close", h
            elif data:
                assert h.leg in ("request", "response"), h
            elif h.leg != "handshake":  # the ACK that completes the handshake
                assert h.leg == "ack", h
    nat = results["nat"]
    assert _first(nat, "request", "client").pkt.src.addr == CLIENT
    response = _first(nat, "response", "lb-a1").pkt
    assert response.dst.addr == CLIENT and "bytes" in response.detail


def test_the_compact_view_shows_the_response_crossing_the_lb(
    results: dict[str, ScenarioResult],
) -> None:
    from v6lb.model.explain import explain, key_rows

    r = results["nat"]
    rows = key_rows(explain("nat", r.hops, r.facts, r.nodes).rows)
    shown = {(row.leg, row.sender, row.detail.split(" ")[0]) for row in rows}
    assert ("handshake", "client", "[S]") in shown and ("handshake", "lb-a1", "[SA]") in shown
    assert ("request", "lb-a1", "[AP]") in shown and ("response", "lb-a1", "[AP]") in shown
    assert ("close", "client", "[AF]") in shown and ("close", "lb-a1", "[AF]") in shown
    lb_response = next(row for row in rows if row.leg == "response" and row.sender == "lb-a1")
    assert "bytes" in lb_response.detail and "source restored to the VIP" in lb_response.change


def test_nat_notes_say_why(results: dict[str, ScenarioResult]) -> None:
    r = results["nat"]
    backend = str(r.facts["backend"])
    pod = str(r.facts["backend_node"])
    assert _first(r, "handshake", "client").note == "client opens TCP to the VIP"
    syn = _first(r, "handshake", "lb-a1")
    assert syn.note == f"conntrack: new flow, Maglev picked {pod} ({backend})"
    assert _first(r, "request", "lb-a1").note == "conntrack hit (established)"
    assert _first(r, "response", "lb-a1").note == (
        "conntrack reply tuple (established): source restored to the VIP"
    )
    assert _first(r, "request", "isp").note == "static route 2001:db8:a::/48 via igw"


def test_dsr_npt_and_anycast_notes(results: dict[str, ScenarioResult]) -> None:
    srv6 = results["dsr-srv6"]
    pod = srv6.facts["backend_node"]
    assert _first(srv6, "handshake", "lb-a1").note == (
        f"flow cache miss: jhash+Maglev picked {pod}; encapsulated to its SID"
    )
    assert _first(srv6, "request", "lb-a1").note == f"flow cache hit: {pod}"
    assert "straight to the client (VIP on lo)" in _first(srv6, "response", str(pod)).note
    npt = results["npt"]
    assert _first(npt, "handshake", "lb-a1").note == (
        "RFC 6296: prefix 2001:db8:10::/48 -> fd00:10::/48, checksum-neutral"
    )
    assert _first(npt, "response", "lb-a1").note == (
        "RFC 6296: prefix fd00:10::/48 -> 2001:db8:10::/48, checksum-neutral"
    )
    anycast = results["anycast"]
    assert "ECMP picked lb-a" in _first(anycast, "handshake", "igw").note


def test_proxy_notes_describe_the_backend_connection(results: dict[str, ScenarioResult]) -> None:
    for mode in ("proxy-l4", "proxy-l7"):
        r = results[mode]
        port = on(r, "internet")[0].pkt.src.port
        to_backend = [h for h in on(r, "private") if h.sender == "lb-a1"]
        syn = next(h for h in to_backend if h.leg == "handshake")
        assert (
            syn.note
            == f"LB opens its own connection to {r.facts['backend_node']} (scheduler maglev)"
        )
        request = next(h for h in to_backend if h.leg == "request")
        if mode == "proxy-l4":
            assert (
                request.note
                == f"request prefixed with a PROXY v2 header carrying [{CLIENT}]:{port}"
            )
        else:
            assert request.note == (
                f"HTTP request with X-Forwarded-For: {CLIENT} and"
                f' Forwarded: for="[{CLIENT}]:{port}"'
            )
        response = _first(r, "response", "lb-a1")
        assert response.pkt.dst.addr == CLIENT
        assert response.note == "response relayed from the backend connection"
