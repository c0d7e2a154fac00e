"""The LB node: the real core forwarders for npt, nat and dsr-*, and a proxy for proxy-*.

Each LB node runs the forwarders of the VIPs it serves (``serves:`` in the
topology), built from the same config the real LB reads: :class:`NatForwarder`,
:class:`DsrForwarder` and :class:`NptForwarder`, driven through their one
interface ``process(buf, port, now) -> (action, arg, data)``. Links listed in
``inside:`` are :data:`PORT_INSIDE`, the others :data:`PORT_OUTSIDE`. The
simulator performs the verdicts: forward (routed by the node's FIB), hand a
frame to a MAC on the inside link (dsr-l2), send the ICMPv6 error, or record
the drop with the forwarder's reason.

``proxy-l4``/``proxy-l7`` VIPs are local addresses of the LB: its TCP stack
terminates the client's connection and opens a second one, from the LB's
inside address, to the backend the VIP's Maglev pool picks for the client's
flow. L4 sends a PROXY v2 header first (when the VIP asks for it); L7 adds
``X-Forwarded-For`` and ``Forwarded`` to every request.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field

from v6lb.core import forwarded, proxyproto
from v6lb.core.conntrack import ORIG, Conn, State
from v6lb.core.conntrack import REPLY as CT_REPLY
from v6lb.core.dsr import DsrForwarder
from v6lb.core.nat66 import NatForwarder
from v6lb.core.nptv6 import NptForwarder
from v6lb.core.verdict import (
    DROP,
    FORWARD,
    FORWARD_L2,
    FORWARD_MANY,
    PORT_INSIDE,
    PORT_OUTSIDE,
    REPLY,
)
from v6lb.engines.sim.apps import parse_head
from v6lb.engines.sim.host import FIN, SYN, TcpConn, TcpState
from v6lb.engines.sim.network import Network
from v6lb.engines.sim.node import SimNode, icmp_error_note
from v6lb.model.config import (
    Config,
    ProxyL4Options,
    ProxyProtocol,
    TunnelOptions,
    Vip,
    VipMode,
)
from v6lb.model.modes import Kind, facts
from v6lb.model.pools import dsr_forwarder, nat_forwarder, npt_forwarder, pool_for
from v6lb.model.topology import NPT, Node
from v6lb.wire.constants import (
    ICMP6_DST_UNREACH,
    ICMP6_PACKET_TOO_BIG,
    ICMP6_PARAM_PROB,
    ICMP6_TIME_EXCEEDED,
    NH_ICMPV6,
    NH_TCP,
    NH_UDP,
    TCP_ACK,
)
from v6lb.wire.reasons import Reason

__all__ = ["LbNode", "ProxyFlow"]

_REPLY_REASON = {
    ICMP6_PACKET_TOO_BIG: Reason.TOO_BIG.label,
    ICMP6_TIME_EXCEEDED: Reason.HOP_LIMIT_EXCEEDED.label,
    ICMP6_DST_UNREACH: Reason.NPT_NO_MAPPING.label,
    ICMP6_PARAM_PROB: Reason.NPT_NO_ADJUSTABLE_WORD.label,
}


_NOT_NAT = (Reason.NO_MATCH, Reason.ICMP_ERROR_UNMATCHED)


def _a(b: bytes) -> str:
    return str(ipaddress.IPv6Address(b))


@dataclass
class ProxyFlow:
    """One client connection through a proxy VIP and the LB's connection to the backend."""

    vip: str
    mode: str
    client: str
    client_port: int
    backend: str
    backend_port: int
    lb_source: str
    lb_port: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    closed: bool = False
    _queue: list[bytes] = field(default_factory=list)
    _buf: bytes = b""


class _Proxy:
    """One proxy VIP on one LB node."""

    def __init__(self, lb: LbNode, vip: Vip, seed: int) -> None:
        self.lb = lb
        self.vip = vip
        self.pool = pool_for(vip, seed)
        self.flows: list[ProxyFlow] = []
        for port in vip.ports:
            lb.stack.listen(port, self._accept, addr=vip.address.packed, describe=_client_side)

    def _accept(self, client: TcpConn) -> None:
        i = self.pool.pick_flow(client.remote, client.local, client.rport, client.lport)
        if i < 0:
            client.abort("no backend", send_rst=True)
            return
        baddr = self.pool.addresses[i]
        bport = self.pool.ports[i]
        src = self.lb.source_for(baddr)
        flow = ProxyFlow(
            self.vip.name,
            str(self.vip.mode),
            _a(client.remote),
            client.rport,
            _a(baddr),
            bport,
            _a(src),
        )
        self.flows.append(flow)
        l7 = self.vip.mode is VipMode.PROXY_L7
        who = self.lb.net.label(baddr)
        peer = f"[{flow.client}]:{flow.client_port}"

        def describe(b: TcpConn, flags: int, data: bytes) -> str:
            """What the LB's segments on the backend connection are for."""
            if flags & SYN:
                return f"LB opens its own connection to {who} (scheduler maglev)"
            if data.startswith(proxyproto.SIGNATURE):
                return f"request prefixed with a PROXY v2 header carrying {peer}"
            if data and l7:
                return _forwarded_note(data) or "request bytes relayed from the client connection"
            if data:
                return "request bytes relayed from the client connection"
            if flags & FIN:
                if b.state == TcpState.LAST_ACK:
                    return "backend closed: LB closes its backend connection too"
                return "client closed: LB closes its backend connection"
            return ""

        backend = self.lb.stack.connect(baddr, bport, src=src, describe=describe)
        flow.lb_port = backend.lport
        opts = self.vip.options
        if isinstance(opts, ProxyL4Options) and opts.proxy_protocol is ProxyProtocol.V2:
            flow._queue.append(
                proxyproto.encode_proxy(
                    ipaddress.IPv6Address(client.remote),
                    ipaddress.IPv6Address(client.local),
                    client.rport,
                    client.lport,
                )
            )

        def up(c: TcpConn, data: bytes) -> None:
            if l7:
                flow._buf += data
                data = self._rewrite(flow, client)
            if not data:
                return
            flow.bytes_up += len(data)
            if backend.state == "established":
                backend.send(data)
            else:
                flow._queue.append(data)

        def connected(b: TcpConn) -> None:
            if flow._queue:
                b.send(b"".join(flow._queue))  # one write: the PROXY header with the request
            flow._queue.clear()

        def down(b: TcpConn, data: bytes) -> None:
            flow.bytes_down += len(data)
            if client.close_reason is None:
                client.send(data)

        def client_closed(c: TcpConn) -> None:
            backend.close()
            c.close()

        def backend_closed(b: TcpConn) -> None:
            b.close()
            client.close()

        def gone(_: TcpConn, reason: str) -> None:
            flow.closed = True
            if reason != "closed":
                client.abort(reason, send_rst=True)

        client.on_data = up
        client.on_peer_close = client_closed
        backend.on_established = connected
        backend.on_data = down
        backend.on_peer_close = backend_closed
        backend.on_closed = gone

    def _rewrite(self, flow: ProxyFlow, client: TcpConn) -> bytes:
        """Whole requests from the buffer, each with the client added to the forwarding headers."""
        out = b""
        while True:
            head = parse_head(flow._buf)
            if head is None:
                return out
            start, headers, hlen = head
            n = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            if len(flow._buf) < hlen + n:
                return out
            body = flow._buf[hlen : hlen + n]
            flow._buf = flow._buf[hlen + n :]
            xff = next((v for k, v in headers if k.lower() == "x-forwarded-for"), None)
            fwd = next((v for k, v in headers if k.lower() == "forwarded"), None)
            keep = [(k, v) for k, v in headers if k.lower() not in ("x-forwarded-for", "forwarded")]
            peer = ipaddress.IPv6Address(client.remote)
            element = forwarded.forwarded_element(
                peer,
                for_port=client.rport,
                by=ipaddress.IPv6Address(client.local),
                by_port=client.lport,
                proto="http",
            )
            keep.append(("X-Forwarded-For", forwarded.x_forwarded_for(xff, peer)))
            keep.append(("Forwarded", forwarded.append(fwd, element)))
            text = start + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in keep) + "\r\n"
            out += text.encode("latin-1") + body


def _client_side(conn: TcpConn, flags: int, data: bytes) -> str:
    """What the LB's segments on a client connection of a proxy VIP are for."""
    if flags & SYN and flags & TCP_ACK:
        return "LB answers on the VIP itself: the proxy terminates the client's TCP"
    if data:
        return "response relayed from the backend connection"
    if flags & FIN:
        if conn.state == TcpState.LAST_ACK:
            return "client closed: LB closes the client connection too"
        return "backend closed: LB closes the client connection"
    return ""


def _forwarded_note(data: bytes) -> str:
    """The forwarding headers an L7 proxy added to the request in ``data``, or ""."""
    head = parse_head(data)
    if head is None:
        return ""
    headers = head[1]
    xff = next((v for k, v in headers if k.lower() == "x-forwarded-for"), None)
    fwd = next((v for k, v in headers if k.lower() == "forwarded"), None)
    if xff is None or fwd is None:
        return ""
    last = fwd.split(",")[-1]
    for_part = next((p.strip() for p in last.split(";") if p.strip().startswith("for=")), last)
    return f"HTTP request with X-Forwarded-For: {xff} and Forwarded: {for_part}"


class LbNode(SimNode):
    """An LB instance. Not a transit router: what no forwarder claims is dropped (no-match)."""

    forwarding = False

    def __init__(
        self,
        net: Network,
        spec: Node,
        index: int,
        config: Config,
        macs: dict[str, bytes],
        lb_sources: list[bytes],
    ) -> None:
        super().__init__(net, spec, index)
        self.inside = set(spec.inside)
        out_links = [lk for lk in self.ifaces if lk not in self.inside] or list(self.ifaces)
        in_links = [lk for lk in self.ifaces if lk in self.inside] or list(self.ifaces)
        self.outside_addr = self.ifaces[out_links[0]][0]
        self.inside_addr = self.ifaces[in_links[0]][0]
        served = [v for v in config.vips if v.name in spec.serves]
        vips = []
        for v in served:
            if (
                isinstance(v.options, TunnelOptions)
                and v.options.tunnel_source.packed not in self.local
            ):
                # Each instance encapsulates from its own inside address.
                opts = dataclasses.replace(
                    v.options, tunnel_source=ipaddress.IPv6Address(self.inside_addr)
                )
                v = dataclasses.replace(v, options=opts)
            vips.append(v)
        lb = dataclasses.replace(
            config.lb,
            instance=self.name[:10],
            addresses=(
                ipaddress.IPv6Address(self.outside_addr),
                ipaddress.IPv6Address(self.inside_addr),
            ),
        )
        sub = dataclasses.replace(config, vips=tuple(vips), lb=lb)
        self.config = sub
        self.modes = {v.address.packed: str(v.mode) for v in vips}
        self.nat: NatForwarder | None = None
        self.dsr: DsrForwarder | None = None
        self.npt: NptForwarder | None = None
        if any(v.mode is VipMode.NAT for v in vips):
            self.nat = nat_forwarder(sub)
        if any(v.mode.is_dsr for v in vips):
            self.dsr = dsr_forwarder(sub, macs=macs)
        if NPT in spec.serves and config.npt:
            self.npt = npt_forwarder(config, self.outside_addr)
        self.proxies: dict[str, _Proxy] = {}
        for v in vips:
            if v.mode.is_proxy:
                self.add_loopback(v.address.packed)
                self.proxies[v.name] = _Proxy(self, v, config.lb.flow_hash_seed)
        self.nat_vips = {v.address.packed for v in vips if v.mode is VipMode.NAT}
        self.dsr_vips = {v.address.packed for v in vips if v.mode.is_dsr}
        self.backends = {b.address.packed for v in vips for b in v.backends}
        self.handled: list[tuple[float, str, str]] = []  # (time, forwarder, summary)

    # --- which forwarder -------------------------------------------------------------

    def _port(self, data: bytearray, link: str) -> int:
        if self.inside:
            return PORT_INSIDE if link in self.inside else PORT_OUTSIDE
        # One-armed: the direction follows the source.
        src = bytes(data[8:24])
        if src in self.backends or (
            self.npt is not None and any(m.matches_inside(data, 8) for m in self.npt.mappings)
        ):
            return PORT_INSIDE
        return PORT_OUTSIDE

    def receive(self, data: bytearray, link: str, sender: str, pid: int, leg: str) -> None:
        dst = bytes(data[24:40])
        if dst in self.local:
            self.deliver(data, link, sender, pid, leg)
            return
        port = self._port(data, link)
        orig = bytes(data)  # the forwarders rewrite in place
        ct = self._ct_probe(orig, port)
        dsr_new = self.dsr.counters.extra.get("dsr.flows_new", 0) if self.dsr is not None else 0
        if dst in self.dsr_vips and self.dsr is not None:
            name = self.modes[dst]
            verdict = self.dsr.process(data, port, self.now)
        elif dst in self.nat_vips and self.nat is not None:
            name = "nat"
            verdict = self.nat.process(data, port, self.now)
        elif port == PORT_INSIDE and self.nat is not None:
            name = "nat"
            verdict = self.nat.process(data, port, self.now)
            # Not a NAT flow (nor an error about one): the NPT's, if it has the prefix.
            if verdict[0] == DROP and verdict[1] in _NOT_NAT and self.npt is not None:
                name = "npt"
                verdict = self.npt.process(data, port, self.now)
        elif self.npt is not None:
            name = "npt"
            verdict = self.npt.process(data, port, self.now)
        else:
            self.net.drop(self.name, link, sender, data, pid, leg, Reason.NO_MATCH.label)
            return
        action, arg, out = verdict
        fresh = False  # dsr: the packet's flow was not in the flow cache
        if facts(name).is_dsr:
            assert self.dsr is not None
            fresh = self.dsr.counters.extra.get("dsr.flows_new", 0) > dsr_new
        if action == FORWARD:
            assert isinstance(out, bytearray)
            if name == "nat":
                note = self._nat_note(orig, ct)
            elif name == "npt":
                note = self._npt_note(orig, port)
            else:
                note = self._dsr_note(orig, name, fresh, bytes(out[24:40]))
            self.handled.append((self.now, name, note))
            # A translator's own error (Packet Too Big for the next link) is about the packet
            # as it arrived and goes back to its sender: the backend, for a reply. Linux does
            # the same: the forward path checks the MTU before POSTROUTING restores the VIP
            # (nat) or maps the source prefix (npt), and conntrack translates the quote of an
            # error about a DNAT'ed packet back to what the client sent.
            about = orig if facts(name).kind in (Kind.NAT, Kind.TRANSLATE) else None
            self.route_out(out, pid, leg, ingress=link, sender=sender, note=note, invoking=about)
        elif action == FORWARD_MANY:
            assert isinstance(out, list)
            for i, frag in enumerate(out):
                note = (
                    f"outer fragment {i + 1} of {len(out)}: with its encapsulation the packet"
                    " exceeds the tunnel MTU, but it fits 1280 bytes (RFC 2473 §7.1)"
                )
                self.route_out(frag, pid, leg, ingress=link, sender=sender, note=note)
        elif action == FORWARD_L2:
            assert isinstance(out, bytes | bytearray)
            self._to_mac(data, bytes(out), pid, leg, name, link, sender, fresh)
        elif action == REPLY:
            assert isinstance(out, bytearray | bytes)
            t = out[40] if len(out) > 40 else 0
            code = out[41] if len(out) > 41 else 0
            param = int.from_bytes(out[44:48], "big") if len(out) >= 48 else 0
            reason = _REPLY_REASON.get(t, "icmp-error-sent")
            self.net.drop(self.name, link, sender, data, pid, leg, reason, f"{self.name} {name}")
            if t == ICMP6_PACKET_TOO_BIG and facts(name).is_dsr:
                why = (
                    f"the {len(orig)}-byte packet does not fit the tunnel once encapsulated:"
                    f" Packet Too Big (MTU {param}) to the source (RFC 2473 §7.1)"
                )
            else:
                why = icmp_error_note(t, code, param)
            self.originate(out, "error", note=f"{name}: {why}")
        else:
            label = Reason(arg).label if isinstance(arg, int) else str(arg)
            self.net.drop(self.name, link, sender, data, pid, leg, label, f"{self.name} {name}")

    def _to_mac(
        self,
        data: bytearray,
        l2: bytes,
        pid: int,
        leg: str,
        name: str,
        link: str,
        sender: str,
        fresh: bool,
    ) -> None:
        for lk in self.inside or set(self.ifaces):
            for end in self.net.topology.link(lk).endpoints:
                node = self.net.nodes.get(end.node)
                if node is None or node is self:
                    continue
                if node.macs.get(lk) == l2 or l2 in node.ifaces.get(lk, []):
                    mac = ":".join(f"{b:02x}" for b in node.macs[lk])
                    if fresh:
                        note = f"flow cache miss: jhash+Maglev picked {node.name}; "
                    else:
                        note = f"flow cache hit: {node.name}; "
                    note += f"frame to its MAC {mac}, packet unchanged"
                    self.handled.append((self.now, name, note))
                    self.send_on_link(lk, node.name, data, pid, leg, note)
                    return
        self.net.drop(self.name, link, sender, data, pid, leg, "address-unreachable")

    # --- notes: why the forwarder did what it did ----------------------------------------

    def _ct_probe(self, data: bytes, port: int) -> tuple[int, int, bytes, Conn | None] | None:
        """(direction, proto, key, entry before) of a TCP/UDP packet for the NAT, else None."""
        if self.nat is None or len(data) < 44 or data[6] not in (NH_TCP, NH_UDP):
            return None
        direction = CT_REPLY if port == PORT_INSIDE else ORIG
        key = data[8:40] + data[40:44]
        return direction, data[6], key, self.nat.conntrack.tables[direction][data[6]].get(key)

    def _nat_note(self, data: bytes, ct: tuple[int, int, bytes, Conn | None] | None) -> str:
        if ct is None or self.nat is None:
            if len(data) > 40 and data[6] == NH_ICMPV6 and data[40] < 128:
                return "ICMPv6 error about a tracked flow: the quoted packet is translated too"
            return "conntrack"
        direction, proto, key, before = ct
        conn = self.nat.conntrack.tables[direction][proto].get(key)
        if conn is None:
            return "conntrack: the flow's last packet (entry removed)"
        state = State(conn.state).label
        label = self.net.label
        if direction == ORIG:
            if conn is before:
                return f"conntrack hit ({state})"
            b = conn.rw_orig[16:32]
            note = f"conntrack: new flow, Maglev picked {label(b)} ({_a(b)})"
            if conn.rw_orig[:16] != conn.key_orig[:16]:
                note += f"; source NAT to {_a(conn.rw_orig[:16])}"
            return note
        restored = f"source restored to {label(conn.rw_reply[:16])}"
        if conn.rw_reply[16:32] != conn.key_reply[16:32]:
            restored += f", destination to {label(conn.rw_reply[16:32])}"
        return f"conntrack reply tuple ({state}): {restored}"

    def _npt_note(self, data: bytes, port: int) -> str:
        src = ipaddress.IPv6Address(data[8:24])
        dst = ipaddress.IPv6Address(data[24:40])
        for m in self.npt.mappings if self.npt is not None else []:
            if port == PORT_OUTSIDE and dst in m.outside:
                return f"RFC 6296: prefix {m.outside} -> {m.inside}, checksum-neutral"
            if port == PORT_INSIDE and src in m.inside:
                return f"RFC 6296: prefix {m.inside} -> {m.outside}, checksum-neutral"
        return "RFC 6296 prefix translation, checksum-neutral"

    def _dsr_note(self, data: bytes, mode: str, fresh: bool, target: bytes) -> str:
        who = self.net.label(target)
        if len(data) > 40 and data[6] == NH_ICMPV6 and data[40] < 128:
            return f"ICMPv6 error about a flow of {who}: passed on to that backend"
        if fresh:
            return f"flow cache miss: jhash+Maglev picked {who}; {facts(mode).encap.sent}"
        return f"flow cache hit: {who}"

    # --- state, for the explanation ----------------------------------------------------

    def state_summary(self, mode: str) -> str:
        """What this instance holds per flow, read from the real forwarder."""
        if mode == "nat" and self.nat is not None:
            flows = list(self.nat.flows())
            lines = []
            for c in flows:
                k = c.key_orig
                lines.append(
                    f"[{_a(k[:16])}]:{int.from_bytes(k[32:34], 'big')} -> "
                    f"[{_a(k[16:32])}]:{int.from_bytes(k[34:36], 'big')} => "
                    f"[{_a(c.rw_orig[16:32])}]:{int.from_bytes(c.rw_orig[34:36], 'big')}"
                    f" ({State(c.state).label})"
                )
            return f"conntrack: {len(flows)} entr{'y' if len(flows) == 1 else 'ies'}" + (
                ": " + "; ".join(lines) if lines else ""
            )
        if facts(mode).is_dsr and self.dsr is not None:
            n = self.dsr.flows
            return (
                f"flow cache (LRU, {mode}): {n} entr{'y' if n == 1 else 'ies'}: flow -> backend only;"
                " no connection state, any instance with the same backends picks the same one (Maglev)"
            )
        if mode == "npt":
            return "none: stateless prefix translation (RFC 6296), nothing per flow"
        if facts(mode).is_proxy:
            proxied = [f for p in self.proxies.values() for f in p.flows if f.mode == mode]
            return (
                f"proxy connections: {len(proxied)} client connection(s), each with its own"
                " backend connection (two TCP connections per flow, full socket state)"
            )
        return "none"
