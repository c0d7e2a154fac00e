"""The simulator: every mode's hops carry the expected addresses at every link, and are valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from v6lb.core.proxyproto import SIGNATURE
from v6lb.engines.sim import MODES, ScenarioResult, modes_available, run_scenario
from v6lb.model.config import Config
from v6lb.model.hops import Hop
from v6lb.model.topology import Topology, load_topology

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "eks-ipv6.yaml"
CLIENT = "2001:db8:ffff::100"
LB_A1_IN = "fd00:10::a1"
LB_A1_OUT = "2001:db8:a::10"
PODS_A = {"fd00:10:0:1::a", "fd00:10:0:2::a", "fd00:10:0:3::a"}
PODS_B = {"fd00:10:0:1::b", "fd00:10:0:2::b", "fd00:10:0:3::b"}
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
    assert inside and all(p.dst.addr == backend and p.dst.port == 80 for p in inside)
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
    assert f"=> [{backend}]:80" in str(f["lb_state"])


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
    assert backend in PODS_A
    tunnelled = [h.pkt for h in on(r, "private") if h.sender == "lb-a1"]
    assert tunnelled
    for p in tunnelled:
        assert p.proto == proto and (p.src.addr, p.dst.addr) == (LB_A1_IN, backend)
        assert p.inner is not None
        assert (p.inner.src.addr, p.inner.dst.addr, p.inner.dst.port) == (CLIENT, vip, 80)
    if mode == "dsr-srv6":
        assert tunnelled[0].segments == (backend,)
    replies = [h for h in r.hops if h.pkt.src.addr == vip and h.pkt.dst.addr == CLIENT]
    assert replies and not any(h.sender in LBS or h.receiver in LBS for h in replies)
    assert [h.link for h in replies if h.leg == "reply"] == [
        "pods-" + backend[10],
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
