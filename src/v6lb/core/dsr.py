"""Direct server return: ``dsr-l2``, ``dsr-ip6ip6`` and ``dsr-srv6`` as one sans-IO forwarder.

The LB sees only the client-to-VIP direction. It picks a backend per flow and
hands the packet over without rewriting it; the backend holds the VIP on its
loopback and answers the client directly. docs/dsr.md is the written policy;
in short:

- ``dsr-ip6ip6``: RFC 2473 IPv6-in-IPv6 (next header 41, 40 bytes), outer
  destination = the backend's address. Linux seg6 ``encap.red`` with one SID.
- ``dsr-srv6``: outer header + RFC 8754 SRH with one segment (the backend's
  SID, segments left 0), outer destination = the SID; 64 bytes. Linux seg6 ``encap``.
- ``dsr-l2``: ``(FORWARD_L2, PORT_INSIDE, mac)``, packet untouched, hop limit
  untouched (L2 DSR does not route).
- Outer header (RFC 6438): version, traffic class and flow label copied from
  the inner packet; an inner label of 0 is replaced by 20 bits of the flow
  hash so ECMP between LB and backends can spread. Outer hop limit 64. Outer
  source = the VIP's ``tunnel_source``.
- Routed modes decrement the inner hop limit; at 1 or 0 the client gets
  Time Exceeded instead.
- Flows: first packet -> jhash + Maglev pick -> bounded LRU (Katran-style).
  Cached flows keep their backend while it is up (draining included); a
  backend that is down loses its flows, which are picked again.
- Flow key: TCP/UDP use the 4-tuple; every fragment (first or later) and
  every packet without a TCP/UDP header (RFC 7045: unknown headers are
  forwarded) uses the 3-tuple (src, dst, next header).
- MTU (RFC 2473 §7.1): an inner packet longer than ``mtu - overhead`` is, if
  it is at most 1280 bytes, encapsulated and the OUTER packet fragmented;
  otherwise answered with Packet Too Big carrying ``max(mtu - overhead, 1280)``.
- An ICMPv6 error for the VIP (Packet Too Big from a router on the client
  path, quoting VIP -> client) goes to the backend that owns the quoted flow.
- Pinned flows (:meth:`DsrForwarder.pin`): the LB's own health probe of one
  backend goes to that backend whatever its health, through the same
  encapsulation or MAC rewrite as client flows (docs/dsr.md).

Hot path (:meth:`DsrForwarder.process`): a cached TCP/UDP flow without
extension headers costs one ``struct`` read for the key, one LRU lookup and
one concatenation of a per-backend outer-header template with the packet;
the payload length, flow label and inner hop limit are patched in the copy.
The input buffer is never modified.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from typing import Final

from v6lb.core.backends import BackendPool
from v6lb.core.flowhash import flow_hash, flow_hash3
from v6lb.core.icmperr import IcmpErrorSource
from v6lb.core.verdict import (
    DROP,
    FORWARD,
    FORWARD_L2,
    FORWARD_MANY,
    PORT_INSIDE,
    Counters,
    Verdict,
)
from v6lb.wire.constants import (
    ICMP6_PACKET_TOO_BIG,
    ICMP6_TIME_EXCEEDED,
    IPV6_HDR_LEN,
    MIN_MTU,
    NH_DSTOPTS,
    NH_FRAGMENT,
    NH_HOPOPTS,
    NH_ICMPV6,
    NH_IPV6,
    NH_ROUTING,
    NH_TCP,
    NH_UDP,
    OFF_HLIM,
    RT_SRH,
    TE_HOP_LIMIT,
)
from v6lb.wire.encap import Encap
from v6lb.wire.ipv6 import PacketInfo, parse
from v6lb.wire.reasons import Reason

__all__ = [
    "DsrForwarder",
    "DsrService",
    "ENCAP",
    "MODE_IP6IP6",
    "MODE_L2",
    "MODE_SRV6",
    "OUTER_HOP_LIMIT",
    "OVERHEAD",
    "outer_header",
]

MODE_L2: Final = "dsr-l2"
MODE_IP6IP6: Final = "dsr-ip6ip6"
MODE_SRV6: Final = "dsr-srv6"

ENCAP: Final = {MODE_L2: Encap.NONE, MODE_IP6IP6: Encap.IP6IP6, MODE_SRV6: Encap.SRV6}
"""Each mode's encapsulation (the mode table names the same: tests/test_modes.py)."""

OVERHEAD: Final = {mode: e.overhead for mode, e in ENCAP.items()}
"""Bytes each mode adds in front of the client's packet (declared by :class:`Encap`)."""

OUTER_HOP_LIMIT: Final = 64
"""Hop limit of the outer header: set like a host would (RFC 2473 §6.3), not copied."""

DEFAULT_MTU: Final = 1500

# Word 0 (version, traffic class, flow label), payload length, next header, hop
# limit and src . dst . sport . dport of a packet without extension headers, in
# one call: (next header, those 36 bytes) is the LRU key of a TCP/UDP flow.
_HDR_UNPACK: Final = struct.Struct("!IHBB36s").unpack_from
_WORD0_PACK: Final = struct.Struct("!IH").pack_into
_WORD0_UNPACK: Final = struct.Struct("!I").unpack_from
_FRAG: Final = struct.Struct("!BBHI")
_FRAG_ID_MUL: Final = 0x9E3779B1  # odd, so the ids are a bijection of a counter

PIN_GRACE: Final = 60.0
"""Seconds a replaced pin still steers its flow: Linux's TIME_WAIT (``TCP_TIMEWAIT_LEN``).

A probe's connection outlives its probe: closed with an answer unread or arriving
late (a busy server greets after the close), the kernel sends a RST; a FIN may be
retransmitted, then ACKed from TIME_WAIT. Those packets must still reach the probed
backend, and never enter the flow cache as a client flow."""
PIN_RETIRED: Final = 16
"""At most this many replaced pins kept per probed backend (the oldest go first)."""
_Pin = tuple["DsrService", int]  # a pinned flow's VIP and backend index

_NO_MATCH: Final = int(Reason.NO_MATCH)
_NO_BACKEND: Final = int(Reason.NO_BACKEND)
_HOP_LIMIT: Final = int(Reason.HOP_LIMIT_EXCEEDED)
_TOO_BIG: Final = int(Reason.TOO_BIG)
_QUOTE_BAD: Final = int(Reason.ICMP_ERROR_QUOTE_BAD)
_UNMATCHED: Final = int(Reason.ICMP_ERROR_UNMATCHED)

# An LRU entry: (pool, pool generation when checked, backend index, outer
# template or None for dsr-l2, largest inner packet that fits, flow label for
# unlabelled packets, link-layer target for dsr-l2, template length - 40,
# offset of the inner hop limit in the output).
Entry = tuple[
    BackendPool, int, int, bytearray | None, int, int, bytes | None, int, int, "DsrService"
]
FlowKey = tuple[int, bytes]


def outer_header(mode: str, source: bytes, target: bytes) -> bytearray:
    """The outer header(s) of ``mode`` to ``target``, payload length and flow label 0.

    ``dsr-ip6ip6``: IPv6, next header 41, destination ``target`` (RFC 2473).
    ``dsr-srv6``: IPv6, next header 43, destination ``target``, then an
    RFC 8754 SRH with Segment List [target], Segments Left 0, Last Entry 0,
    next header 41: what Linux seg6 ``mode encap`` with one SID sends.
    """
    if len(source) != 16 or len(target) != 16:
        raise ValueError("outer addresses are 16 bytes")
    if mode == MODE_IP6IP6:
        nh = NH_IPV6
        srh = b""
    elif mode == MODE_SRV6:
        nh = NH_ROUTING
        srh = struct.pack("!BBBBBBH", NH_IPV6, 2, RT_SRH, 0, 0, 0, 0) + target
    else:
        raise ValueError(f"mode {mode!r} has no outer header")
    return bytearray(struct.pack("!IHBB", 6 << 28, 0, nh, OUTER_HOP_LIMIT) + source + target + srh)


def _flow_label(h: int) -> int:
    # RFC 6437 §3: a label should be uniformly distributed; 0 means "no label".
    return (h & 0xFFFFF) or 1


class DsrService:
    """One DSR VIP as the forwarder sees it: address, ports, protocol, mode and backends.

    ``targets`` are the outer destinations per backend (the SID for
    ``dsr-srv6``; default the backend addresses). ``macs`` are the link-layer
    addresses per backend for ``dsr-l2`` (6 bytes, or None: then the verdict
    carries the backend's 16-byte IPv6 address, for the adapter to resolve by
    neighbour discovery).
    """

    __slots__ = (
        "name",
        "address",
        "ports",
        "proto",
        "mode",
        "routed",
        "pool",
        "tunnel_source",
        "mtu",
        "targets",
        "macs",
        "overhead",
        "limit",
        "nh_offset",
        "icmp_forwarded",
        "icmp_unmatched",
        "packets",
        "bytes",
        "_templates",
    )

    def __init__(
        self,
        name: str,
        address: bytes,
        ports: Sequence[int],
        proto: int,
        mode: str,
        pool: BackendPool,
        *,
        tunnel_source: bytes | None = None,
        mtu: int = DEFAULT_MTU,
        targets: Sequence[bytes] | None = None,
        macs: Sequence[bytes | None] | None = None,
    ) -> None:
        if mode not in OVERHEAD:
            raise ValueError(f"{name}: mode {mode!r} is not a DSR mode")
        if len(address) != 16:
            raise ValueError(f"{name}: a VIP address is 16 bytes")
        if proto not in (NH_TCP, NH_UDP):
            raise ValueError(f"{name}: protocol {proto} is neither TCP (6) nor UDP (17)")
        if not ports:
            raise ValueError(f"{name}: a VIP has at least one port")
        self.name = name
        self.address = bytes(address)
        self.ports = frozenset(ports)
        self.proto = proto
        self.mode = mode
        # Read per packet: a bool, so the hot path does not compare mode strings
        # (the config adapter passes an equal string, not the MODE_L2 object itself).
        self.routed = ENCAP[mode] is not Encap.NONE
        self.pool = pool
        self.mtu = mtu
        self.overhead = OVERHEAD[mode]
        self.limit = mtu - self.overhead
        self.tunnel_source = tunnel_source
        n = len(pool)
        self.targets = list(targets) if targets is not None else list(pool.addresses)
        self.macs: list[bytes | None] = list(macs) if macs is not None else [None] * n
        if len(self.targets) != n or len(self.macs) != n:
            raise ValueError(f"{name}: one target and one MAC (or None) per backend")
        for mac in self.macs:
            if mac is not None and len(mac) != 6:
                raise ValueError(f"{name}: a MAC address is 6 bytes")
        self._templates: list[bytearray | None] = [None] * n
        self.nh_offset = 0
        # ICMPv6 errors for the VIP: passed on to the quoted flow's backend; dropped
        # because they quote no flow of the address's VIPs (counted on its first VIP).
        self.icmp_forwarded = 0
        self.icmp_unmatched = 0
        # the clients' packets (and their bytes) sent on to a backend: this VIP's own
        # counter, as the kernel plane's per-VIP nft counter (the probes' not counted)
        self.packets = 0
        self.bytes = 0
        if self.routed:
            if tunnel_source is None or len(tunnel_source) != 16:
                raise ValueError(f"{name}: mode {mode} needs a 16-byte tunnel source")
            if mtu < MIN_MTU:
                raise ValueError(f"{name}: the path MTU to the backends is at least {MIN_MTU}")
            self._templates = [outer_header(mode, tunnel_source, t) for t in self.targets]
            # Where the last unfragmentable header names its successor (41 -> 44).
            self.nh_offset = 6 if mode == MODE_IP6IP6 else IPV6_HDR_LEN

    def __repr__(self) -> str:
        return (
            f"DsrService({self.name!r}, [{ipaddress.IPv6Address(self.address)}]:"
            f"{sorted(self.ports)}, {self.mode}, {len(self.pool)} backends)"
        )

    def entry(self, index: int, h: int) -> Entry:
        """The LRU entry for a flow of hash ``h`` steered to backend ``index``."""
        tmpl = self._templates[index]
        if tmpl is None:
            mac = self.macs[index]
            l2 = mac if mac is not None else self.pool.addresses[index]
            return (self.pool, self.pool.generation, index, None, 0, 0, l2, 0, 0, self)
        n = len(tmpl)
        return (
            self.pool,
            self.pool.generation,
            index,
            tmpl,
            self.limit,
            _flow_label(h),
            None,
            n - IPV6_HDR_LEN,
            n + OFF_HLIM,
            self,
        )


def _encap(buf: bytearray, e: Entry) -> bytearray:
    """Template + packet, with the outer word 0, payload length and inner hop limit patched.

    Word 0 is the inner one (version 6, traffic class, flow label: RFC 6438
    §4 copies the label), with the flow's derived label if the inner is 0.
    """
    tmpl = e[3]
    assert tmpl is not None
    out = tmpl + buf
    w0 = _WORD0_UNPACK(buf)[0]
    if not w0 & 0xFFFFF:
        w0 |= e[5]
    _WORD0_PACK(out, 0, w0, len(buf) + e[7])
    out[e[8]] = buf[OFF_HLIM] - 1
    return out


def _match(services: list[DsrService], proto: int, dport: int) -> DsrService | None:
    for s in services:
        if s.proto == proto and dport in s.ports:
            return s
    return None


def _default(services: list[DsrService], proto: int) -> DsrService | None:
    """The VIP that takes port-less packets (fragments, other protocols) of this address."""
    if proto in (NH_TCP, NH_UDP):
        for s in services:
            if s.proto == proto:
                return s
        return None
    return services[0]


class DsrForwarder:
    """The DSR modes as a forwarder: (packet, ingress port, now) -> verdict.

    Packets for a VIP are steered to a backend whatever port they arrive on
    (an LB is often one-armed); its errors go back out of the ingress port.
    Packets for anything else are dropped as ``no-match``: not an open relay.
    """

    def __init__(
        self,
        services: Sequence[DsrService],
        icmp_source: bytes,
        *,
        flow_cache_size: int = 65_536,
        icmp_rate: float = 100.0,
        icmp_burst: float = 20.0,
        frag_id_salt: int = 0,
    ) -> None:
        if not services:
            raise ValueError("a DSR forwarder needs at least one VIP")
        if flow_cache_size < 1:
            raise ValueError("the flow cache holds at least one flow")
        self.services = list(services)
        self._by_addr: dict[bytes, list[DsrService]] = {}
        names: set[str] = set()
        for s in self.services:
            if s.name in names:
                raise ValueError(f"two DSR VIPs are named {s.name!r}")
            names.add(s.name)
            self._by_addr.setdefault(s.address, []).append(s)
        self.icmp = IcmpErrorSource(icmp_source, icmp_rate, icmp_burst)
        self.counters = Counters()
        self.flow_cache_size = flow_cache_size
        self._lru: OrderedDict[FlowKey, Entry] = OrderedDict()
        self._info = PacketInfo()
        # health probes through the data path: flow -> (VIP, backend), and by owner
        self._pins: dict[FlowKey, _Pin] = {}
        self._pin_of: dict[Hashable, tuple[FlowKey, _Pin]] = {}
        # replaced pins still in their grace: owner -> (key, its pin, replaced at)
        self._retired: dict[Hashable, deque[tuple[FlowKey, _Pin, float]]] = {}

        self._frag_seq = 0
        self._frag_salt = frag_id_salt & 0xFFFFFFFF

    # --- configuration ---------------------------------------------------------

    def service(self, name: str) -> DsrService:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    def pool(self, name: str) -> BackendPool:
        """The backend pool of VIP ``name``: call ``set_up``/``set_drain``/``set_weight`` on it."""
        return self.service(name).pool

    @property
    def flows(self) -> int:
        """Number of flows in the LRU."""
        return len(self._lru)

    def clear_flows(self) -> None:
        """Forget every cached flow: their next packets are hashed on the current tables."""
        self._lru.clear()

    def backend_for(
        self, src: bytes, dst: bytes, sport: int, dport: int, proto: int = NH_TCP
    ) -> tuple[str, int] | None:
        """(VIP name, backend index) a TCP/UDP packet of this flow would go to now.

        Like Katran's simulator: nothing is sent and the LRU is not changed.
        None if the flow matches no VIP or no backend is eligible.
        """
        svc = _match(self._by_addr.get(bytes(dst), []), proto, dport)
        if svc is None:
            return None
        key = (proto, bytes(src) + bytes(dst) + struct.pack("!HH", sport, dport))
        e = self._lru.get(key)
        pool = svc.pool
        if e is not None and (e[1] == pool.generation or pool.keeps_existing(e[2])):
            return svc.name, e[2]
        idx = pool.pick(flow_hash(src, dst, sport, dport, pool.seed))
        return None if idx < 0 else (svc.name, idx)

    def pin(
        self,
        owner: Hashable,
        name: str,
        index: int,
        src: bytes,
        sport: int,
        dport: int,
        proto: int = NH_TCP,
        now: float = 0.0,
    ) -> None:
        """Steer the flow ``src:sport -> VIP name:dport`` to backend ``index``, up or not.

        For the LB's own health probe of that backend (docs/dsr.md, "Health checks
        through the data path"): its packets take the backend's encapsulation or
        MAC rewrite exactly as a client flow there, but its health, weight and drain
        are not looked at, and ``dport`` need not be a VIP port. ``owner`` (the
        probed backend) holds one current pin: a new pin (at time ``now``) replaces its
        previous one, which still steers the late packets of its flow for
        :data:`PIN_GRACE` seconds (at most :data:`PIN_RETIRED` of them per owner).
        Pinned flows never enter the LRU.
        """
        svc = self.service(name)
        if not 0 <= index < len(svc.pool):
            raise ValueError(f"{name} has no backend {index}")
        key = (proto, bytes(src) + svc.address + struct.pack("!HH", sport, dport))
        pins = self._pins
        old = self._pin_of.pop(owner, None)
        retired = self._retired.setdefault(owner, deque())
        if old is not None:
            retired.append((*old, now))
        while retired and (len(retired) > PIN_RETIRED or now - retired[0][2] > PIN_GRACE):
            k, pinned, _ = retired.popleft()
            if pins.get(k) is pinned:  # not pinned again since (a reused port)
                del pins[k]
        self._lru.pop(key, None)
        pin = pins[key] = (svc, index)
        self._pin_of[owner] = (key, pin)

    def unpin(self, owner: Hashable) -> None:
        """Forget every pin of ``owner``, its replaced ones too (the backend is gone)."""
        pins = self._pins
        current = self._pin_of.pop(owner, None)
        for k, pinned, *_ in [*self._retired.pop(owner, ()), *([current] if current else [])]:
            if pins.get(k) is pinned:
                del pins[k]

    @property
    def pins(self) -> int:
        """The current pins: one per probed backend (replaced ones in their grace apart)."""
        return len(self._pin_of)

    # --- the data path -----------------------------------------------------------

    def process(self, buf: bytearray, port: int, now: float) -> Verdict:
        # Fast path: a cached TCP/UDP flow, no extension headers, fits the MTU.
        # It checks inline what the general path would; anything else goes there.
        n = len(buf)
        if n >= 48:
            w0, plen, nh, hl, k = _HDR_UNPACK(buf)
            if w0 >> 28 == 6 and plen + 40 == n and ((nh == 6 and n >= 60) or nh == 17):
                key = (nh, k)
                lru = self._lru
                e = lru.get(key)
                if e is not None:
                    pool, gen, _, tmpl, limit, label, l2, ext, hoff, svc = e
                    if pool.generation == gen:
                        if tmpl is None:
                            lru.move_to_end(key)
                            self.counters.forwarded += 1
                            svc.packets += 1
                            svc.bytes += n
                            return (FORWARD_L2, PORT_INSIDE, l2)
                        if hl > 1 and n <= limit:
                            lru.move_to_end(key)
                            svc.packets += 1
                            svc.bytes += n
                            out = tmpl + buf
                            if not w0 & 0xFFFFF:
                                w0 |= label
                            _WORD0_PACK(out, 0, w0, n + ext)
                            out[hoff] = hl - 1
                            self.counters.forwarded += 1
                            return (FORWARD, PORT_INSIDE, out)
        return self._process(buf, port, now)

    def _drop(self, reason: int) -> Verdict:
        self.counters.drops[reason] += 1
        return (DROP, reason, None)

    def _process(self, buf: bytearray, port: int, now: float) -> Verdict:
        info = self._info
        rc = parse(buf, info)
        if rc:
            return self._drop(rc)
        dst = bytes(buf[24:40])
        services = self._by_addr.get(dst)
        if services is None:
            return self._drop(_NO_MATCH)
        src = bytes(buf[8:24])
        proto = info.proto
        l4 = info.l4_off
        if info.frag_off >= 0:
            # Every fragment, first or later, on the 3-tuple: only the first
            # carries ports, and all of them must reach the same backend.
            svc = _default(services, proto)
            if svc is None or (
                not info.later_fragment
                and (proto in (NH_TCP, NH_UDP))
                and _match(services, proto, (buf[l4 + 2] << 8) | buf[l4 + 3]) is None
            ):
                return self._drop(_NO_MATCH)
            return self._steer(buf, port, now, svc, (proto, src + dst), src, dst, proto, -1, -1)
        if proto in (NH_TCP, NH_UDP):
            sport = (buf[l4] << 8) | buf[l4 + 1]
            dport = (buf[l4 + 2] << 8) | buf[l4 + 3]
            key = (proto, src + dst + bytes(buf[l4 : l4 + 4]))
            if self._pins:
                pinned = self._pins.get(key)
                if pinned is not None:
                    svc, idx = pinned
                    e = svc.entry(idx, flow_hash(src, dst, sport, dport, svc.pool.seed))
                    return self._hand_over(buf, port, now, svc, e, probe=True)
            svc = _match(services, proto, dport)
            if svc is None:
                return self._drop(_NO_MATCH)
            return self._steer(buf, port, now, svc, key, src, dst, proto, sport, dport)
        if proto == NH_ICMPV6 and buf[l4] < 128:
            return self._icmp_error(buf, port, now, services, dst)
        # RFC 7045: whatever else (ICMPv6 informational, ESP, an unknown upper
        # layer) is forwarded, on the 3-tuple.
        svc = services[0]
        return self._steer(buf, port, now, svc, (proto, src + dst), src, dst, proto, -1, -1)

    def _icmp_error(
        self, buf: bytearray, port: int, now: float, services: list[DsrService], vip: bytes
    ) -> Verdict:
        """An ICMPv6 error for the VIP goes to the backend that owns the quoted flow.

        The quote is a packet the backend sent as the VIP (src = VIP, dst =
        client); reversed, it names the client's flow. The LRU is consulted
        but not filled, so forged errors cannot evict real flows.

        The quote is read in the shapes the kernel data plane reads at fixed
        offsets, so both planes (and every instance) agree on every error:
        TCP/UDP right after the quoted header, or after one Fragment header
        (offset 0: the 4-tuple; a later fragment: the 3-tuple, for the
        address's first VIP of that protocol), or after one 8-byte Hop-by-Hop
        or Destination Options header, with both ports quoted. Anything else
        (a longer chain, another upper layer, a quote cut before the client
        port) is dropped and counted as unmatched on the address's first VIP.
        """
        q = self._info.l4_off + 8
        n = len(buf)
        if n - q < IPV6_HDR_LEN:
            return self._unmatched(services, _QUOTE_BAD)
        if bytes(buf[q + 8 : q + 24]) != vip:
            return self._unmatched(services, _UNMATCHED)
        client = bytes(buf[q + 24 : q + 40])
        nh = buf[q + 6]
        ql4 = q + IPV6_HDR_LEN
        if nh in (NH_FRAGMENT, NH_HOPOPTS, NH_DSTOPTS):
            if n < ql4 + 8:
                return self._unmatched(services, _QUOTE_BAD)
            qp = buf[ql4]
            if nh == NH_FRAGMENT:
                if ((buf[ql4 + 2] << 8) | buf[ql4 + 3]) >> 3:  # a later fragment: no ports
                    svc = _default(services, qp)
                    if svc is None or qp not in (NH_TCP, NH_UDP):
                        return self._unmatched(services, _UNMATCHED)
                    key = (qp, client + vip)
                    return self._forwarded(
                        svc, self._steer(buf, port, now, svc, key, client, vip, qp, -1, -1, False)
                    )
            elif buf[ql4 + 1]:  # options longer than 8 bytes
                return self._unmatched(services, _UNMATCHED)
            ql4 += 8
        else:
            qp = nh
        if qp not in (NH_TCP, NH_UDP):
            return self._unmatched(services, _UNMATCHED)
        if ql4 + 4 > n:
            return self._unmatched(services, _QUOTE_BAD)
        vport = (buf[ql4] << 8) | buf[ql4 + 1]
        cport = (buf[ql4 + 2] << 8) | buf[ql4 + 3]
        svc = _match(services, qp, vport)
        if svc is None:
            return self._unmatched(services, _UNMATCHED)
        key = (qp, client + vip + bytes(buf[ql4 + 2 : ql4 + 4]) + bytes(buf[ql4 : ql4 + 2]))
        return self._forwarded(
            svc, self._steer(buf, port, now, svc, key, client, vip, qp, cport, vport, False)
        )

    def _unmatched(self, services: list[DsrService], reason: int) -> Verdict:
        services[0].icmp_unmatched += 1
        return self._drop(reason)

    @staticmethod
    def _forwarded(svc: DsrService, verdict: Verdict) -> Verdict:
        if verdict[0] in (FORWARD, FORWARD_L2, FORWARD_MANY):
            svc.icmp_forwarded += 1
        return verdict

    def _steer(
        self,
        buf: bytearray,
        port: int,
        now: float,
        svc: DsrService,
        key: FlowKey,
        src: bytes,
        dst: bytes,
        proto: int,
        sport: int,
        dport: int,
        cache: bool = True,
    ) -> Verdict:
        """Find or pick the flow's backend, then hand the packet over."""
        routed = svc.routed
        if routed and buf[OFF_HLIM] <= 1:
            return self._error(buf, _HOP_LIMIT, ICMP6_TIME_EXCEEDED, TE_HOP_LIMIT, 0, port, now)
        lru = self._lru
        pool = svc.pool
        e = lru.get(key)
        if e is not None:
            if e[1] != pool.generation:
                if pool.keeps_existing(e[2]):
                    # Up (draining or not): the flow stays where it is.
                    e = (pool, pool.generation, *e[2:])
                    lru[key] = e
                else:
                    # Down: the flow is lost and picked again.
                    del lru[key]
                    e = None
            if e is not None:
                lru.move_to_end(key)
        if e is None:
            if sport >= 0:
                h = flow_hash(src, dst, sport, dport, pool.seed)
            else:
                h = flow_hash3(src, dst, proto, pool.seed)
            idx = pool.pick(h)
            if idx < 0:
                return self._drop(_NO_BACKEND)
            e = svc.entry(idx, h)
            if cache:
                lru[key] = e
                self.counters.bump("dsr.flows_new")
                if len(lru) > self.flow_cache_size:
                    lru.popitem(last=False)
                    self.counters.bump("dsr.flows_evicted")
        return self._hand_over(buf, port, now, svc, e)

    def _hand_over(
        self, buf: bytearray, port: int, now: float, svc: DsrService, e: Entry, probe: bool = False
    ) -> Verdict:
        """Send the packet to the backend of entry ``e``: MAC rewrite, or encapsulated.

        A pinned probe's packet is counted as ``dsr.probe_packets``, not ``forwarded``:
        the forwarded count is the clients' traffic (as the kernel plane's VIP counter,
        which the LB's own probes never cross).
        """
        routed = svc.routed
        if routed and buf[OFF_HLIM] <= 1:
            return self._error(buf, _HOP_LIMIT, ICMP6_TIME_EXCEEDED, TE_HOP_LIMIT, 0, port, now)
        if not routed:
            self._count(probe, svc, len(buf))
            return (FORWARD_L2, PORT_INSIDE, e[6])
        n = len(buf)
        if n <= e[4]:
            self._count(probe, svc, len(buf))
            return (FORWARD, PORT_INSIDE, _encap(buf, e))
        if n <= MIN_MTU:
            # RFC 2473 §7.1 (a): fits the IPv6 minimum MTU, so the tunnel
            # fragments the outer packet instead of asking for less than 1280.
            self._count(probe, svc, len(buf))
            self.counters.bump("dsr.outer_fragmented")
            return (FORWARD_MANY, PORT_INSIDE, self._fragment(buf, e, svc))
        # RFC 2473 §7.1 (b): Packet Too Big with the tunnel MTU, never below 1280.
        mtu = max(e[4], MIN_MTU)
        return self._error(buf, _TOO_BIG, ICMP6_PACKET_TOO_BIG, 0, mtu, port, now)

    def _count(self, probe: bool, svc: DsrService, n: int) -> None:
        if probe:
            self.counters.bump("dsr.probe_packets")
        else:
            self.counters.forwarded += 1
            svc.packets += 1
            svc.bytes += n

    def _fragment(self, buf: bytearray, e: Entry, svc: DsrService) -> list[bytearray]:
        """RFC 8200 §4.5: the outer header (and SRH) repeated, a Fragment header, a slice."""
        whole = _encap(buf, e)
        hlen = len(whole) - len(buf)
        unfrag = whole[:hlen]
        unfrag[svc.nh_offset] = NH_FRAGMENT
        data = memoryview(whole)[hlen:]
        step = (svc.mtu - hlen - 8) & ~7
        self._frag_seq += 1
        ident = (self._frag_seq * _FRAG_ID_MUL + self._frag_salt) & 0xFFFFFFFF
        frags: list[bytearray] = []
        total = len(data)
        for off in range(0, total, step):
            piece = data[off : off + step]
            more = off + step < total
            f = bytearray(unfrag)
            plen = hlen - IPV6_HDR_LEN + 8 + len(piece)
            f[4] = plen >> 8
            f[5] = plen & 0xFF
            f += _FRAG.pack(NH_IPV6, 0, off | more, ident)
            f += piece
            frags.append(f)
        return frags

    def _error(
        self, buf: bytearray, reason: int, t: int, c: int, p: int, port: int, now: float
    ) -> Verdict:
        return self.icmp.answer(self.counters, buf, reason, t, c, p, port, now)
