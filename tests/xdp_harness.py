"""The XDP program against the Python core: one config, the core's verdict, the program's.

Used by tests/test_xdp_dsr.py and tests/test_xdp_modes.py (root). :data:`XCONFIG` is the
DSR golden config (tests/dsr_fixtures.py) plus a dsr-l2 VIP with four backends, the
two npt pairs of tests/npt_fixtures.py and a /44-/40 pair, so one loaded program
serves every mode.
:class:`Core` runs a frame through ``DsrForwarder`` or ``NptForwarder`` as the python
plane would steer it (a VIP address: dsr; else by npt prefix: engines/python/steer.py);
:func:`expected` turns the core's verdict into the program's verdict, counters and
bytes, with the deliberate differences of docs/dataplane-xdp.md spelled out one by one;
:func:`check` runs the frame through the program by BPF_PROG_TEST_RUN and compares.
"""

from __future__ import annotations

import copy
from typing import Any

import dsr_fixtures as fx
import npt_fixtures as nfx
from v6lb.core.dsr import DsrForwarder
from v6lb.core.nptv6 import NptForwarder
from v6lb.core.verdict import (
    DROP,
    FORWARD,
    FORWARD_L2,
    FORWARD_MANY,
    PORT_INSIDE,
    PORT_OUTSIDE,
    REPLY,
    Verdict,
)
from v6lb.engines.xdp.program import XdpProgram
from v6lb.model.config import Config, parse_config
from v6lb.model.pools import dsr_forwarder, npt_forwarder
from v6lb.wire import build
from v6lb.wire.ipv6 import PacketInfo, parse
from v6lb.wire.reasons import Reason

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 0, 1, 2, 3, 4
MAC_IN_DST = bytes.fromhex("02000000aa01")  # the LB's own (the frame was sent to it)
MAC_IN_SRC = bytes.fromhex("02000000bb02")  # the router that sent it
ETH = MAC_IN_DST + MAC_IN_SRC + b"\x86\xdd"
A = build.a16

VIPL2M = "2001:db8:100::92"  # dsr-l2, four backends
BEL2M = [f"fd00:12::{i}" for i in range(11, 15)]
MACL2M = [f"02:00:00:00:12:{i}" for i in range(11, 15)]
INSIDE44 = "fd00:30::/44"  # prefixes not on a byte boundary, of two lengths (RFC 6296 §3.1)
OUTSIDE40 = "2001:db8:3000::/40"


def _xconfig() -> dict[str, Any]:
    data: dict[str, Any] = copy.deepcopy(fx.CONFIG)
    # the program's Packet Too Big bucket runs on real time, the core's on ``now`` (a
    # second per packet): a burst no test exhausts (test_xdp_modes tests the limit)
    data["lb"]["icmp_error_burst"] = 100_000
    data["vips"].append(
        {
            "name": "l2-multi",
            "address": VIPL2M,
            "ports": [443, 8443],
            "mode": "dsr-l2",
            "backends": [{"address": a, "mac": m} for a, m in zip(BEL2M, MACL2M, strict=True)],
        }
    )
    data["npt"] = [
        {"inside": nfx.INSIDE, "outside": nfx.OUTSIDE},
        {"inside": nfx.INSIDE64, "outside": nfx.OUTSIDE64},
        {"inside": INSIDE44, "outside": OUTSIDE40},
    ]
    return data


XCONFIG_DATA = _xconfig()
XCONFIG: Config = parse_config(copy.deepcopy(XCONFIG_DATA), "xdp.yaml")
VIP_MODES = {v.address.packed: str(v.mode) for v in XCONFIG.vips}


class Core:
    """The core's forwarders; ``now`` advances a second per packet (no rate limiting)."""

    def __init__(self) -> None:
        self.dsr: DsrForwarder = dsr_forwarder(XCONFIG)
        self.npt: NptForwarder = npt_forwarder(XCONFIG)
        self.now = 0.0

    def npt_port(self, raw: bytes) -> int | None:
        """The port the python plane would read ``raw`` from (its npt rules), or None.

        ``to OUTSIDE`` first (PORT_OUTSIDE); ``from INSIDE`` except ``to INSIDE``
        (PORT_INSIDE); the program decides the same way, by address.
        """
        ms = self.npt.mappings
        if any(m.matches_outside(raw, 24) for m in ms):
            return PORT_OUTSIDE
        if any(m.matches_inside(raw, 24) for m in ms):
            return None
        if any(m.matches_inside(raw, 8) for m in ms):
            return PORT_INSIDE
        return None

    def process(
        self, fwd: DsrForwarder | NptForwarder, raw: bytes, port: int
    ) -> tuple[Verdict, int]:
        """The verdict and the drop reason counted with it (-1: none)."""
        if isinstance(fwd, DsrForwarder):
            fwd.clear_flows()
        before = list(fwd.counters.drops)
        self.now += 1.0
        v = fwd.process(bytearray(raw), port, self.now)
        after = fwd.counters.drops
        reason = next((r for r, n in enumerate(before) if n != after[r]), -1)
        return v, reason


def icmp_error(raw: bytes) -> bool:
    info = PacketInfo()
    return (
        parse(raw, info) == 0 and info.frag_off < 0 and info.proto == 58 and raw[info.l4_off] < 128
    )


_STACK = {int(Reason.HOP_LIMIT_EXCEEDED): "pass-hop-limit"}


def expected(core: Core, raw: bytes) -> tuple[int, dict[str, int], bytes | None]:
    """(XDP verdict, the counters it bumps, the output frame for XDP_TX).

    The deliberate differences (docs/dataplane-xdp.md), in the program's order:
    not an IPv6 header of 40 bytes and version 6, or neither to a VIP address nor
    claimed by an npt prefix: the host's own traffic, passed (the core, on its TUN,
    drops it). Time Exceeded and outer fragmentation: passed for the stack (the core
    builds them; a DROP for hop limit is an error RFC 4443 forbids). Packet Too Big:
    built by the program, the core's bytes, sent back (tx-too-big). npt's no-mapping
    and no-adjustable-word: dropped, counted, without the core's ICMPv6 error. Every
    other drop of the core is the program's drop, with the same reason. Sent frames:
    the core's bytes after the Ethernet header; tunnels, npt and Packet Too Big swap
    the MACs, dsr-l2 writes the backend's MAC with the LB's as the source.
    """
    if len(raw) < 40 or raw[0] >> 4 != 6:
        return XDP_PASS, {"pass-not-ipv6": 1}, None
    dst = raw[24:40]
    if dst in VIP_MODES:
        (action, arg, data), reason = core.process(core.dsr, raw, PORT_OUTSIDE)
        icmp = {"icmp-forwarded": 1} if icmp_error(raw) else {}
        if action == FORWARD:
            return XDP_TX, {"tx": 1, **icmp}, MAC_IN_SRC + MAC_IN_DST + b"\x86\xdd" + bytes(data)
        if action == FORWARD_L2:
            if len(data) != 6:
                return XDP_PASS, {"pass-no-mac": 1}, None
            return XDP_TX, {"tx-l2": 1, **icmp}, bytes(data) + MAC_IN_DST + b"\x86\xdd" + raw
        if action == FORWARD_MANY:
            return XDP_PASS, {"pass-too-big": 1}, None
        if action == REPLY and reason == Reason.TOO_BIG:
            return XDP_TX, {"tx-too-big": 1}, MAC_IN_SRC + MAC_IN_DST + b"\x86\xdd" + bytes(data)
        why = reason if action == REPLY else arg
        if why in _STACK:
            return XDP_PASS, {_STACK[why]: 1}, None
        assert action == DROP, (action, Reason(why))
        return XDP_DROP, {Reason(arg).label: 1}, None
    port = core.npt_port(raw)
    if port is None:
        return XDP_PASS, {"pass-not-vip": 1}, None
    (action, arg, data), reason = core.process(core.npt, raw, port)
    if action == FORWARD:
        return XDP_TX, {"tx-npt": 1}, MAC_IN_SRC + MAC_IN_DST + b"\x86\xdd" + bytes(data)
    why = reason if action == REPLY else arg
    if why in _STACK:
        return XDP_PASS, {_STACK[why]: 1}, None
    return XDP_DROP, {Reason(why).label: 1}, None


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def check(prog: XdpProgram, core: Core, raw: bytes) -> int:
    """Run ``raw`` through both; assert the program did what :func:`expected` says."""
    want, counters, out = expected(core, raw)
    before = prog.counters()
    r = prog.run(ETH + raw)
    got = delta(before, prog.counters())
    assert (r.retval, got) == (want, counters), raw.hex()[:400]
    if want == XDP_TX:
        assert r.data == out, raw.hex()[:400]
    else:
        assert r.data == ETH + raw, "passed or dropped frames are untouched"
    return want
