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
from v6lb.core.backends import BackendPool, BackendSpec
from v6lb.core.conntrack import State
from v6lb.core.dsr import DsrForwarder
from v6lb.core.maglev import DEFAULT_TABLE_SIZE
from v6lb.core.nat66 import NatForwarder
from v6lb.core.nptv6 import NptForwarder, NptMapping
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
from v6lb.engines.sim.host import TcpConn
from v6lb.engines.sim.network import Network
from v6lb.engines.sim.node import SimNode
from v6lb.model.config import (
    Config,
    ProxyL4Options,
    ProxyProtocol,
    TunnelOptions,
    Vip,
    VipMode,
)
from v6lb.model.hops import view
from v6lb.model.topology import NPT, Node
from v6lb.wire.constants import (
    ICMP6_DST_UNREACH,
    ICMP6_PACKET_TOO_BIG,
    ICMP6_PARAM_PROB,
    ICMP6_TIME_EXCEEDED,
)
from v6lb.wire.reasons import Reason

__all__ = ["LbNode", "ProxyFlow"]

_REPLY_REASON = {
    ICMP6_PACKET_TOO_BIG: Reason.TOO_BIG.label,
    ICMP6_TIME_EXCEEDED: Reason.HOP_LIMIT_EXCEEDED.label,
    ICMP6_DST_UNREACH: Reason.NPT_NO_MAPPING.label,
    ICMP6_PARAM_PROB: Reason.NPT_NO_ADJUSTABLE_WORD.label,
}


_WHY = {
    "nat": "conntrack entry (stateful); ",
    "npt": "prefix mapping, no state (RFC 6296); ",
    "dsr-ip6ip6": "backend picked by Maglev, cached in the flow LRU; ",
    "dsr-srv6": "backend picked by Maglev, cached in the flow LRU; ",
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
        specs = [
            BackendSpec(b.address.packed, b.port or vip.ports[0], b.weight, b.drain)
            for b in vip.backends
        ]
        self.pool = BackendPool(specs, table_size=vip.table_size or DEFAULT_TABLE_SIZE, seed=seed)
        self.flows: list[ProxyFlow] = []
        for port in vip.ports:
            lb.stack.listen(port, self._accept, addr=vip.address.packed)

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
        backend = self.lb.stack.connect(baddr, bport, src=src)
        flow.lb_port = backend.lport
        l7 = self.vip.mode is VipMode.PROXY_L7
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
            for chunk in flow._queue:
                b.send(chunk)
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
            self.nat = NatForwarder.from_config(sub)
        if any(v.mode.is_dsr for v in vips):
            self.dsr = DsrForwarder.from_config(sub, macs=macs)
        if NPT in spec.serves and config.npt:
            self.npt = NptForwarder(
                [NptMapping(p.inside, p.outside) for p in config.npt],
                self.outside_addr,
                icmp_rate=float(config.lb.icmp_error_rate),
                icmp_burst=float(config.lb.icmp_error_burst),
            )
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
        before = view(data)
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
        if action == FORWARD:
            assert isinstance(out, bytearray)
            note = f"{self.name} {name}: {_WHY.get(name, '')}{_change(before, out)}"
            self.handled.append((self.now, name, note))
            self.route_out(out, pid, leg, ingress=link, sender=sender, note=note)
        elif action == FORWARD_MANY:
            assert isinstance(out, list)
            for i, frag in enumerate(out):
                note = f"{self.name} {name}: outer fragment {i + 1} of {len(out)}"
                self.route_out(frag, pid, leg, ingress=link, sender=sender, note=note)
        elif action == FORWARD_L2:
            assert isinstance(out, bytes | bytearray)
            self._to_mac(data, bytes(out), pid, leg, name, link, sender)
        elif action == REPLY:
            assert isinstance(out, bytearray | bytes)
            t = out[40] if len(out) > 40 else 0
            reason = _REPLY_REASON.get(t, "icmp-error-sent")
            self.net.drop(self.name, link, sender, data, pid, leg, reason, f"{self.name} {name}")
            self.originate(out, "error", note=f"{self.name} {name}: ICMPv6 error to the source")
        else:
            label = Reason(arg).label if isinstance(arg, int) else str(arg)
            self.net.drop(self.name, link, sender, data, pid, leg, label, f"{self.name} {name}")

    def _to_mac(
        self, data: bytearray, l2: bytes, pid: int, leg: str, name: str, link: str, sender: str
    ) -> None:
        for lk in self.inside or set(self.ifaces):
            for end in self.net.topology.link(lk).endpoints:
                node = self.net.nodes.get(end.node)
                if node is None or node is self:
                    continue
                if node.macs.get(lk) == l2 or l2 in node.ifaces.get(lk, []):
                    mac = ":".join(f"{b:02x}" for b in node.macs[lk])
                    note = f"{self.name} {name}: frame to {node.name} ({mac}), packet unchanged"
                    self.handled.append((self.now, name, note))
                    self.send_on_link(lk, node.name, data, pid, leg, note)
                    return
        self.net.drop(self.name, link, sender, data, pid, leg, "address-unreachable")

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
        if mode.startswith("dsr") and self.dsr is not None:
            n = self.dsr.flows
            return (
                f"flow cache (LRU, {mode}): {n} entr{'y' if n == 1 else 'ies'}: flow -> backend only;"
                " no connection state, any instance with the same backends picks the same one (Maglev)"
            )
        if mode == "npt":
            return "none: stateless prefix translation (RFC 6296), nothing per flow"
        if mode.startswith("proxy"):
            proxied = [f for p in self.proxies.values() for f in p.flows if f.mode == mode]
            return (
                f"proxy connections: {len(proxied)} client connection(s), each with its own"
                " backend connection (two TCP connections per flow, full socket state)"
            )
        return "none"


def _change(before: object, after: bytearray) -> str:
    """What a forwarder changed, in words (outer addresses, ports, encapsulation)."""
    from v6lb.model.hops import PacketView

    assert isinstance(before, PacketView)
    a = view(after)
    if a.inner is not None and before.inner is None:
        kind = "SRv6 (SRH)" if a.proto == "srv6" else "IPv6-in-IPv6"
        return f"encapsulated in {kind} {a.src} -> {a.dst}; inner packet unchanged"
    parts = []
    if before.src != a.src:
        parts.append(f"source {before.src} -> {a.src}")
    if before.dst != a.dst:
        parts.append(f"destination {before.dst} -> {a.dst}")
    if before.hop_limit != a.hop_limit:
        parts.append(f"hop limit {before.hop_limit} -> {a.hop_limit}")
    return "; ".join(parts) or "forwarded unchanged"
