"""Failures and drops: what the client experiences, and that no packet vanishes silently."""

from __future__ import annotations

import copy
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest
import yaml

from v6lb.engines.sim import run_scenario
from v6lb.engines.sim.scenario import Sim
from v6lb.model.config import Config, load_topology, parse_config
from v6lb.model.topology import Topology, require_topology
from v6lb.wire import build

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "eks-ipv6.yaml"
CLIENT = "2001:db8:ffff::100"


@pytest.fixture(scope="module")
def eks() -> tuple[Config, Topology]:
    return load_topology(EXAMPLE)


@pytest.mark.parametrize("mode", ["nat", "dsr-ip6ip6"])
def test_backend_dies_moves_only_its_flows(eks: tuple[Config, Topology], mode: str) -> None:
    r = run_scenario(*eks, mode, failure="backend-dies")
    f = r.facts
    dead = f["dead_backend"]
    # nat reaches the pods at their interface address, dsr-ip6ip6 tunnels to their lo's
    pre = "fd00:10:0:" if mode == "nat" else "fd00:10:0:e"
    assert f["dead_node"] == {f"{pre}{n}::a": f"pod-{n}a" for n in "123"}[str(dead)]
    flows = f["flows"]
    assert isinstance(flows, list)
    assert {fl["backend_before"] for fl in flows} == {f"{pre}{n}::a" for n in "123"}
    for fl in flows:
        assert fl["completed"], fl
        if fl["on_dead_backend"]:
            # The client's retry lands on another backend, on a new connection.
            assert fl["backend_after"] != dead and not fl["same_connection"]
        else:
            # Established NAT flows to the other backends carry on, untouched.
            assert fl["backend_after"] == fl["backend_before"] and fl["same_connection"]
    assert f["established_flows_survived"] is True and f["dead_backend_flows_moved"] is True
    # Maglev moves the dead backend's flows and, its disruption being minimal but not zero,
    # at most a few others (the dsr-ip6ip6 table moves 2 of 4000 here).
    others = f["maglev_moved_other_flows"]
    assert f["maglev_moved"] == f["maglev_dead_backend_flows"] + others
    assert others <= f["maglev_sample_flows"] // 200
    assert (others == 0) is f["maglev_moved_only_dead_backend_flows"]
    assert 0 < f["maglev_moved"] < f["maglev_sample_flows"]
    drops = {(h.receiver, h.dropped) for h in r.hops if h.dropped}
    if mode == "nat":
        # The NAT forgets the dead backend's flows and says why it drops their packets.
        assert ("lb-a1", "no-backend") in drops and ("pod-1a", "node-down") in drops
        assert "closed: timeout" in " ".join(map(str, f["client_events"]))
    else:
        # DSR re-picks the flow; the new backend knows no such connection and resets it.
        assert any(d == "no-socket" for _, d in drops)
        assert "closed: reset" in " ".join(map(str, f["client_events"]))


def test_lb_instance_dies_flow_continues_on_the_other(eks: tuple[Config, Topology]) -> None:
    r = run_scenario(*eks, "anycast", failure="lb-instance-dies")
    f = r.facts
    assert {f["lb_before"], f["lb_after"]} == {"lb-a1", "lb-a2"}
    assert f["backend_before"] == f["backend_after"] and f["same_backend"] is True
    assert f["same_connection"] is True and f["completed"] is True
    assert f["dropped_at_dead_instance"] == 1 and f["retransmits"] == 1
    (lost,) = [h for h in r.hops if h.dropped == "node-down"]
    assert lost.receiver == f["lb_before"] and lost.pkt.src.addr == CLIENT


@pytest.mark.parametrize("mode", ["dsr-ip6ip6", "dsr-srv6", "anycast"])
def test_packet_too_big_client_retries_smaller(eks: tuple[Config, Topology], mode: str) -> None:
    r = run_scenario(*eks, mode, failure="packet-too-big")
    f = r.facts
    overhead = 40 if mode != "dsr-srv6" else 64
    assert f["ptb_mtu"] == 1500 - overhead
    assert f["ptb_to"] == CLIENT and f["client_path_mtu"] == 1500 - overhead
    assert f["first_packet_size"] == 1500
    assert f["retry_packet_size"] == 1500 - overhead
    assert f["completed"] is True and str(f["response"]).startswith("HTTP/1.1 200")
    assert f["ptb_by"] in ("lb-a1", "lb-a2") and "the LB (" in str(f["inbound_summary"])
    reply = f["reply_path"]
    assert isinstance(reply, dict)
    inbound = [h for h in r.hops if h.time < reply["started_at"]]
    too_big = [h for h in inbound if h.dropped == "too-big"]
    assert too_big and all(
        h.receiver in ("lb-a1", "lb-a2") and len(h.data) == 1500 for h in too_big
    )
    # The reply path: the file has no smaller link there, so the walk-through lowers one
    # (and says so); igw's Packet Too Big goes to the VIP, an LB instance passes it on
    # in the flow's tunnel to the backend that sent the segment, which resends smaller.
    assert (reply["link"], reply["link_mtu"], reply["lowered_from"]) == ("transit-a", 1280, 1500)
    assert reply["router"] == "igw" and reply["ptb_to"] == f["vip"]
    assert reply["ptb_lb"] in ("lb-a1", "lb-a2") and reply["reached_the_flows_backend"] is True
    assert str(reply["passed_on"]).startswith(
        "in the flow's " + ("srv6" if mode == "dsr-srv6" else "ipv6-in-ipv6") + " tunnel"
    )
    assert (reply["first_segment_size"], reply["resent_segment_size"]) == (1500, 1280)
    assert reply["backend_path_mtu"] == 1280 and reply["completed"] is True
    assert "lowered from 1500 for this walk-through" in str(f["summary"])
    later = [h for h in r.hops if h.time >= reply["started_at"] and h.dropped == "too-big"]
    assert later and {h.receiver for h in later} == {"igw"}
    engines = f["engines"]
    assert isinstance(engines, list)
    assert [e["engine"] for e in engines][:4] == ["kernel", "python", "simulator", "proxy"]
    assert {"where", "why"} <= set(f["cannot_work"][0])  # type: ignore[index]


def _sim(data: dict[str, Any] | None = None) -> Sim:
    raw = data if data is not None else yaml.safe_load(EXAMPLE.read_text())
    config = parse_config(raw, "t.yaml")
    return Sim(config, require_topology(config))


def test_hop_limit_exceeded_is_a_drop_with_time_exceeded() -> None:
    sim = _sim()
    client = sim.node("client")
    client.originate(
        build.udp(CLIENT, "2001:db8:a:100::82", 5000, 80, b"x", hop_limit=2), "request"
    )
    sim.run_until(lambda: False, limit=1.0)
    (drop,) = [h for h in sim.net.hops if h.dropped]
    assert (drop.receiver, drop.dropped, drop.link) == ("igw", "hop-limit-exceeded", "transit-a")
    back = [h.pkt for h in sim.net.hops if h.receiver == "client"]
    assert back and back[0].detail == "time exceeded" and back[0].src.addr == "2001:db8:fffe:a::2"


def test_no_route_is_a_drop_with_destination_unreachable() -> None:
    sim = _sim()
    sim.node("client").originate(build.udp(CLIENT, "2001:db8:dead::1", 5000, 53, b"?"), "request")
    sim.run_until(lambda: False, limit=1.0)
    (drop,) = [h for h in sim.net.hops if h.dropped]
    assert (drop.receiver, drop.dropped) == ("isp", "no-route")
    back = [h.pkt for h in sim.net.hops if h.receiver == "client"]
    assert back and back[0].detail == "destination unreachable"


def test_lb_drops_what_no_forwarder_claims() -> None:
    sim = _sim()
    # Routed to lb-a1 (the VIP prefix) but no VIP: v6lb is not an open relay.
    sim.node("client").originate(build.udp(CLIENT, "2001:db8:a:100::99", 5000, 53, b"?"), "request")
    sim.run_until(lambda: False, limit=1.0)
    assert [(h.receiver, h.dropped) for h in sim.net.hops if h.dropped] == [("lb-a1", "no-match")]


def test_udp_through_npt_and_port_unreachable() -> None:
    sim = _sim()
    got: list[tuple[str, int, bytes]] = []
    pod = sim.node("pod-2a")
    pod.stack.udp_bind(53, lambda s, sp, d, dp, p: got.append((str(IPv6Address(s)), sp, p)))
    lb = sim.lbs()[0]
    assert lb.npt is not None
    mapped = lb.npt.mappings[0].translate("fd00:10:0:2::a")
    assert isinstance(mapped, IPv6Address)
    client = sim.node("client")
    client.stack.udp_send(mapped.packed, 53, b"query", sport=5353)
    client.stack.udp_send(mapped.packed, 54, b"nobody", sport=5353)
    sim.run_until(lambda: False, limit=1.0)
    assert got == [(CLIENT, 5353, b"query")]
    assert [(h.receiver, h.dropped) for h in sim.net.hops if h.dropped] == [
        ("pod-2a", "no-listener")
    ]
    unreach = [h for h in sim.net.hops if h.receiver == "client"]
    # The error leaves the pod from its inside address and NPT maps it (and its quote) out.
    assert unreach and unreach[0].pkt.src.addr == str(mapped)
    assert unreach[0].pkt.detail == "destination unreachable code 4"


def test_router_packet_too_big_and_tcp_path_mtu() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    for lk in raw["topology"]["links"]:
        if lk["name"] == "transit-a":
            lk["mtu"] = 1280
    sim = _sim(copy.deepcopy(raw))
    from v6lb.engines.sim.apps import HttpClient

    http = HttpClient(
        sim.node("client"), IPv6Address("2001:db8:a:100::82").packed, 80, [b"y" * 4000]
    )
    http.start()
    sim.run_until(lambda: http.done)
    assert http.responses and "served by" in http.responses[0]
    drops = [h for h in sim.net.hops if h.dropped]
    assert drops and all((h.receiver, h.dropped) == ("isp", "too-big") for h in drops)
    ptb = [
        h.pkt for h in sim.net.hops if h.receiver == "client" and "packet too big" in h.pkt.detail
    ]
    assert (
        ptb and ptb[0].detail == "packet too big mtu 1280" and ptb[0].src.addr == "2001:db8:ffff::1"
    )
    assert http.conns[0].stack.pmtu[IPv6Address("2001:db8:a:100::82").packed] == 1280
    sizes = {h.pkt.length for h in sim.net.hops if h.link == "transit-a"}
    assert max(sizes) == 1280
