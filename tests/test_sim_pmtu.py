"""Path MTU discovery on the reply path, in the simulator (no root).

``examples/lab-pmtu.yaml``: the WAN link (MTU 1280) is on the way back from every
backend. A large answer (``GET /?bytes=N``) makes rtr send Packet Too Big for the
backend's first full-size segment to the reply's source: the VIP (dsr-*, nat) or
the mapped address (npt). The LB passes it on to the backend that owns the quoted
flow, which resends smaller segments, and the answer arrives whole. These are
the hops ``v6lb lab diff`` compares with a lab capture.

``examples/lab-modes.yaml``: the LB itself is the router before the smaller link
(edge, MTU 1400) for nat replies; its own error goes straight back to the backend,
quoting the segment as the backend sent it (what Linux does, and the lab shows).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from v6lb.engines.sim.scenario import run_scenario
from v6lb.model.config import Config, load_topology
from v6lb.model.topology import Topology

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CLIENT = "2001:db8:1::100"
BIG = "/?bytes=20000"


@pytest.fixture(scope="module")
def pmtu() -> tuple[Config, Topology]:
    return load_topology(EXAMPLES / "lab-pmtu.yaml")


# mode -> (the address rtr's PTB goes to, the link it reaches the backend on, outer protocol)
_WAY = {
    "dsr-srv6": ("2001:db8:100::81", "pods", "srv6"),
    "dsr-ip6ip6": ("2001:db8:100::82", "pods", "ipv6-in-ipv6"),
    "dsr-l2": ("2001:db8:100::83", "pods", "icmpv6"),
    "nat": ("2001:db8:100::80", "pods", "icmpv6"),
    "npt": ("2001:db8:21:0:cf47::5", "npt-lan", "icmpv6"),
}


@pytest.mark.parametrize("mode", sorted(_WAY))
def test_router_ptb_reaches_the_backend_which_resends_smaller(
    pmtu: tuple[Config, Topology], mode: str
) -> None:
    to, link, proto = _WAY[mode]
    r = run_scenario(*pmtu, mode, body=b"", path=BIG)
    (response,) = r.facts["responses"]
    assert isinstance(response, str) and "Content-Length: 20000" in response
    backend = r.facts["backend_node"]
    errors = [h for h in r.hops if h.pkt.error is not None and not h.dropped]
    first = errors[0]
    assert (first.link, first.sender, first.receiver) == ("edge", "rtr", "lb")
    assert first.pkt.detail == "packet too big mtu 1280" and first.pkt.dst.addr == to
    on = [h for h in errors if h.packet_id == first.packet_id]
    assert [(h.link, h.sender, h.receiver) for h in on] == [
        ("edge", "rtr", "lb"),
        (link, "lb", backend),
    ]
    assert on[1].pkt.proto == proto
    quote = on[1].pkt.error.inner if on[1].pkt.error else None
    assert quote is not None and quote.dst.addr == CLIENT
    # the backend's data: full-size segments dropped at rtr, then none over 1280 on the WAN
    dropped = [h for h in r.hops if h.dropped == "too-big"]
    assert dropped and {h.receiver for h in dropped} == {"rtr"}
    wan = [h.pkt.length for h in r.hops if h.link == "wan" and h.pkt.dst.addr == CLIENT]
    assert wan and max(wan) <= 1280
    assert any(h.note.startswith(f"{backend} ") and "resent in 1220-byte" in h.note for h in r.hops)


def test_lb_own_packet_too_big_goes_to_the_backend() -> None:
    r = run_scenario(*load_topology(EXAMPLES / "lab-modes.yaml"), "nat", body=b"", path=BIG)
    assert r.facts["responses"]
    errors = [h for h in r.hops if h.pkt.error is not None and not h.dropped]
    assert errors and all(
        (h.sender, h.link, h.pkt.src.addr) == ("lb", "pods", "fd00:20::1") for h in errors
    )
    backend = r.facts["backend"]
    for h in errors:
        err = h.pkt.error
        assert err is not None and err.inner is not None
        assert (h.pkt.dst.addr, err.inner.src.addr) == (backend, backend)  # as it arrived
        assert err.detail == "packet too big mtu 1400"
