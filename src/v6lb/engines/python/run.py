"""`v6lb run FILE --dataplane python`: the core's forwarders on real packets through TUN.

:class:`PythonPlane` is a plane of the daemon (:mod:`v6lb.engines.daemon`). It
makes the same checks as the kernel data plane before it installs anything,
then creates the TUN devices, the routing tables and the ``ip -6 rule``s of
:func:`~v6lb.engines.python.steer.plan`. The daemon's selector loop calls it
when a TUN device is readable: each device is drained in batches by a loop per
forwarder kind (one ``readv`` per packet into one preallocated buffer, written
back from preallocated memoryviews; npt and nat with TUN offloads, RPS on every
TUN; ``dsr-l2`` frames out by AF_PACKET). The daemon's health probes take dead
backends out of the forwarders' own :class:`~v6lb.core.backends.BackendPool`
(:meth:`PythonPlane.pools`). A reload keeps the state of every forwarder whose
part of the file did not change.

Tracing (``trace`` in the :class:`~v6lb.engines.plane.PlaneContext`: ``v6lb run
--trace``) logs one line per packet decision, at most :data:`TRACE_RATE` lines
per second; without it the loop logs nothing.
"""

from __future__ import annotations

import ipaddress
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from v6lb.core.backends import BackendPool
from v6lb.core.dsr import DsrForwarder
from v6lb.core.verdict import (
    ACTION_NAMES,
    DROP,
    FORWARD,
    FORWARD_L2,
    FORWARD_MANY,
    PORT_INSIDE,
    PORT_OUTSIDE,
    REPLY,
)
from v6lb.engines.kernel.apply import (
    apply_nft,
    in_instance_block,
    limits_status,
    nft_counters,
    nft_json,
    remove,
    require_root,
    require_tools,
    run_tool,
)
from v6lb.engines.kernel.host import check_lb_host, require_ipv6_forwarding
from v6lb.engines.kernel.run import RUN_TOOLS
from v6lb.engines.l2facts import L2Facts, l2_facts
from v6lb.engines.plane import (
    Plane,
    PlaneContext,
    PlaneStatus,
    Ready,
    Role,
    RunError,
    Staged,
    VipCounter,
)
from v6lb.engines.probe import ProbeRoute
from v6lb.engines.python.ring import BLOCK_PKTS, ETH_HLEN, FRAME3, TX_HDR, RxRing, TxRing
from v6lb.engines.python.steer import Side, Steering, inject_macs, inject_names, plan
from v6lb.engines.python.tun import VNET_HDR_LEN, open_tun
from v6lb.model.config import Config, VipMode
from v6lb.model.pools import dsr_forwarder, nat_forwarder, npt_forwarder
from v6lb.model.status import IcmpErrors
from v6lb.render.nftables import render_forward_nft, render_ring_steer
from v6lb.render.routes import ROUTE_PROTO
from v6lb.wire.checksum import fill_l4_checksum
from v6lb.wire.constants import NH_TCP, NH_UDP
from v6lb.wire.reasons import Reason

__all__ = ["BATCH", "IO_MODES", "TRACE_RATE", "PythonPlane", "build_forwarders", "rps_mask"]

BATCH: Final = 256
"""Packets read from one device before the loop looks at the others again."""
BLOCKS: Final = 4
"""Receive-ring blocks read from one device before the loop looks at the others again."""
IO_MODES: Final = ("ring", "tun")
"""``V6LB_PYTHON_IO``: AF_PACKET rings on the LB's links (the default), or TUN devices."""
TX_BATCH: Final = 256
"""Packets written to the transmit ring before the loop hands them to the kernel."""
TRACE_RATE: Final = 20.0
_DSR: Final = tuple(m for m in VipMode if m.is_dsr)
_ETH_P_IPV6: Final = b"\x86\xdd"
_BUF: Final = 65536
_VIEWS: Final = 2048
"""Packets up to this size are written from a preallocated memoryview of the read buffer."""
_NPT_CACHE_MAX: Final = 65536
_QUIET_WINDOW: Final = 0.5  # seconds: a graceful stop ends after one without a packet
# NPT fast path: version byte, payload length, next header, hop limit and the
# first 8 bytes of the source (from inside) or destination (from outside).
_NPT_SRC: Final = struct.Struct("!B3xHBBQ")
_NPT_DST: Final = struct.Struct("!B3xHBB16xQ")
_HL_SRC: Final = struct.Struct("!BQ")
_Q: Final = struct.Struct("!Q")
_CSUM_AT: Final = struct.Struct("=HH")  # virtio-net header: csum_start, csum_offset (host order)
_HDR_LEN: Final = struct.Struct("=H")
"""A transmit slot's virtio-net ``hdr_len``: the whole frame, so the kernel copies the
packet out of the slot at once. Otherwise the skb keeps pointing into the slot, which
the kernel hands back when the receiving stack orphans the skb (at once, on the
inject veth), and the next packet written there overwrites one still on its way."""


def build_forwarders(config: Config, macs: Mapping[str, bytes] | None = None) -> dict[str, Any]:
    """One forwarder per kind present: ``nat``, ``npt``, ``dsr`` (every DSR mode).

    ``macs``: the ``dsr-l2`` backends' MACs learned from the neighbour table
    (backend address as text -> 6 bytes), for backends without ``mac:``.
    """
    out: dict[str, Any] = {}
    if any(v.mode is VipMode.NAT for v in config.vips):
        # The kernel already decrements the hop limit on the way into the TUN
        # (and answers hop limit 1 there); the loop gives that one back.
        out["nat"] = nat_forwarder(config, decrement_hop_limit=False)
    if config.npt:
        out["npt"] = npt_forwarder(config, decrement_hop_limit=False)  # as nat's, above
    if any(v.mode in _DSR for v in config.vips):
        out["dsr"] = dsr_forwarder(config, macs=macs)
    return out


class _Port:
    """The loop's view of one TUN device (plain attributes: read in the hot loop)."""

    __slots__ = (
        "side", "fd", "fwd", "outs", "rx", "errors", "cache", "hdr", "vecs", "wvecs", "ring",
        "ring_drops",
    )  # fmt: skip

    def __init__(
        self,
        side: Side,
        fd: int,
        fwd: Any,
        buf: bytearray,
        vnet: bool = False,
        ring: RxRing | None = None,
    ) -> None:
        self.side = side
        self.ring = ring  # V6LB_PYTHON_IO=ring: the TAP device's receive ring (fd: its socket)
        self.ring_drops = 0  # frames the kernel found no room for in the ring
        self.fd = fd
        self.fwd = fwd
        self.outs: tuple[int, int] = (fd, fd)
        self.rx = 0
        self.errors = 0
        self.cache: dict[int, int] = {}  # npt: first 8 address bytes -> translated
        # With offloads (vnet) a virtio-net header comes before each packet: it is
        # read into ``hdr`` and written back in front of the packet it came with.
        self.hdr: bytearray | None = bytearray(VNET_HDR_LEN) if vnet else None
        self.vecs: list[bytearray] = [self.hdr, buf] if self.hdr is not None else [buf]
        self.wvecs: list[Any] = [self.hdr, b""]


class L2Egress:
    """``dsr-l2`` frames out of the egress link: an AF_PACKET socket, one header per MAC.

    The VIP's packets come from the TUN (the kernel routed them there); the
    frame keeps the packet as it is (hop limit given back) and only gets the
    backend's MAC as destination and the egress link's as source.
    """

    def __init__(self, facts: L2Facts) -> None:
        self.facts = facts
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # sends only
        try:
            self.sock.bind((facts.egress, 0))
        except OSError as exc:
            self.sock.close()
            raise RunError(
                f"cannot open an AF_PACKET socket on {facts.egress}: {exc.strerror}",
                "check lb.interfaces (the dsr-l2 egress link is the second, or the only one)",
            ) from None
        self._hdrs: dict[bytes, bytes] = {}

    def send(self, l2: bytes, pkt: bytearray) -> bool:
        """Send ``pkt`` to MAC ``l2``; False when ``l2`` is an unresolved backend address."""
        hdr = self._hdrs.get(l2)
        if hdr is None:
            if len(l2) != 6:
                return False
            hdr = self._hdrs[l2] = l2 + self.facts.mac + _ETH_P_IPV6
        self.sock.sendmsg([hdr, pkt])
        return True

    def close(self) -> None:
        self.sock.close()


class PythonPlane(Plane):
    """The Python data plane of one instance: TUN devices, steering rules, the core's forwarders."""

    name = "python"
    role = Role.DATAPLANE

    def __init__(
        self,
        config: Config,
        ctx: PlaneContext | None = None,
        *,
        l2: L2Facts | None = None,
        io: str = "tun",
    ) -> None:
        self.config = config
        self.io = io
        # TUN: the kernel took a hop on the way in, the loops give it back (see _drain_npt)
        self._give = 1 if io == "tun" else 0
        self.tx: TxRing | None = None  # ring: the engine end of the inject veth pair
        self.links: list[str] = []  # ring: the devices this plane made (deleted on teardown)
        self._inject_mac = ""  # ring: the kernel end's MAC, every frame's destination
        self.ctx = ctx or PlaneContext(path=config.source)
        self.trace = self.ctx.trace
        self.instance = config.lb.instance
        self._emit = self.ctx.emit
        self.l2_facts = l2
        self.l2: L2Egress | None = None
        self.forwarders = build_forwarders(config, l2.macs if l2 else None)
        self.steering: Steering = plan(config)
        self.ports: list[_Port] = []
        self._flight: tuple[float, int, int] | None = None  # in_flight(): (when, packets, delta)
        self._buf = bytearray(_BUF)
        self._mv = memoryview(self._buf)
        self._views = [self._mv[:i] for i in range(_VIEWS + 1)]
        self._no_hdr = bytes(VNET_HDR_LEN)  # for packets v6lb made (ICMPv6 errors, fragments)
        self._next_expire = 0.0
        self._trace_tokens = TRACE_RATE
        self._trace_at = time.monotonic()
        self._trace_skipped = 0

    @classmethod
    def preflight(cls, config: Config) -> None:
        if config.lb.conntrack_sync is not None:
            raise RunError(
                f"{config.source}: lb.conntrack_sync needs --dataplane kernel: conntrackd"
                " replicates the kernel's conntrack table, and the python data plane keeps its"
                " flows in its own process",
                "run it with --dataplane kernel, or remove lb.conntrack_sync",
            )
        require_root()
        require_tools(*RUN_TOOLS)

    @classmethod
    def open(cls, config: Config, ctx: PlaneContext) -> PythonPlane:
        """The same host checks as the kernel data plane, and the TUN's; nothing installed."""
        check_lb_host(config)
        l2 = l2_facts(config)
        require_ipv6_forwarding(
            ctx.netns, "the kernel would not route packets into and out of the TUNs"
        )
        io = os.environ.get("V6LB_PYTHON_IO") or ("ring" if config.lb.interfaces else "tun")
        if io not in IO_MODES:
            raise RunError(
                f"V6LB_PYTHON_IO={io!r} is not one of {', '.join(IO_MODES)}",
                "unset it (the default: ring with lb.interfaces, else tun) or name one of them",
            )
        if io == "ring" and not config.lb.interfaces:
            raise RunError(
                f"{config.source}: lb.interfaces is empty: V6LB_PYTHON_IO=ring steers the"
                " packets on ingress of those links",
                "list the links the traffic arrives on in lb.interfaces, or use V6LB_PYTHON_IO=tun",
            )
        if io == "tun" and not os.path.exists("/dev/net/tun"):
            raise RunError("/dev/net/tun is missing", "modprobe tun")
        return cls(config, ctx, l2=l2, io=io)

    def pools(self) -> Mapping[str, BackendPool]:
        """The forwarders' own pools: a health change goes straight into them."""
        return _pools(self.forwarders)

    def probe_route(self, config: Config, vip: str, index: int) -> ProbeRoute | None:
        """Every DSR backend: to the VIP, with the probe's flow pinned to that backend.

        The steering rule ``to VIP/128`` takes the probe into the dsr TUN like a
        client's packet; the forwarder finds its flow pinned (:meth:`DsrForwarder.pin`,
        set by the prober before the first packet) and encapsulates it to the backend,
        or sends it to the backend's MAC (dsr-l2), as it does a client flow there. The
        probe leaves from ``lb.addresses[0]`` (else the kernel's choice); the backend
        answers from the VIP on its ``lo`` straight to that address. A backend without
        the VIP on ``lo`` (or without decapsulation) fails the probe.
        """
        v = config.vip(vip)
        if not v.mode.is_dsr:
            return None
        source = config.lb.addresses[0] if config.lb.addresses else None
        proto = NH_TCP  # the probes are TCP (tcp connect or http)
        probe_port = v.health.port or v.backends[index].port or v.ports[0]  # as the daemon's

        def pin(address: ipaddress.IPv6Address, port: int) -> None:
            dsr = self.forwarders.get("dsr")
            if dsr is not None:  # after a reload, the current forwarder (same VIP names)
                owner = (vip, index)
                try:
                    dsr.pin(
                        owner, vip, index, address.packed, port, probe_port, proto, time.monotonic()
                    )
                except (KeyError, ValueError):
                    dsr.unpin(owner)

        return ProbeRoute(v.address, 0, source, f"python {v.mode} pinned flow", pin)

    # --- install / remove -------------------------------------------------------

    def install(self) -> str:
        """Remove leftovers, create the TUNs, rules and routes."""
        log = self.ctx.log
        try:
            for item in remove(self.instance):
                self.ctx.warn(f"removed leftover {item}")
            by_kind: dict[str, dict[int, _Port]] = {}
            if self.io == "ring":
                self._install_inject()
            for side in self.steering.sides:
                vnet = side.kind in ("npt", "nat")  # offloads: 64 KB TCP packets
                if self.io == "ring":
                    port = self._ring_port(side, vnet)
                    self.ports.append(port)
                    continue
                try:
                    fd = open_tun(side.name, offload=vnet)
                except OSError as exc:
                    raise RunError(
                        f"cannot create TUN device {side.name}: {exc.strerror}",
                        "is another instance with this name running? is /dev/net/tun there?",
                    ) from None
                port = _Port(side, fd, self.forwarders[side.kind], self._buf, vnet)
                self.ports.append(port)
                by_kind.setdefault(side.kind, {})[side.port] = port
                _ip("link", "set", "dev", side.name, "addrgenmode", "none")
                _ip("link", "set", "dev", side.name, "up")
            for group in by_kind.values():
                fds = {p: port.fd for p, port in group.items()}
                outs = (fds.get(0, fds.get(1, -1)), fds.get(1, fds.get(0, -1)))
                for port in group.values():
                    port.outs = outs
            if self.l2_facts is not None:
                self.l2 = L2Egress(self.l2_facts)
            rps = [p.side.name for p in self.ports] if self.io == "tun" else self.links[:1]
            spread = _spread_rps(rps, self.ctx.netns)
            if spread:
                log(spread)
            r = run_tool(["ip", "-6", "-batch", "-"], netns=None, stdin=self.steering.batch())
            if r.returncode != 0:
                raise RunError(
                    f"installing the steering rules failed: {r.stderr.strip()}",
                    "check that the kernel has policy routing (ip -6 rule) and TUN",
                )
            # Not an open relay: what the host routes around the TUNs is v6lb's policy.
            apply_nft(self._nft(self.config, self.steering))
        except BaseException:
            for item in self.teardown():
                log(f"removed {item}")
            raise
        how = (
            f"AF_PACKET rings, steered on ingress of {', '.join(self.config.lb.interfaces)}"
            if self.io == "ring"
            else "TUN"
        )
        return (
            f"python data plane ({how}): {', '.join(self.steering.names())} for"
            f" {', '.join(sorted(self.forwarders))}"
        )

    def _nft(self, config: Config, steering: Steering) -> str:
        """The forward filter, and with rings the netdev steering (one transaction)."""
        if self.io == "tun":
            return render_forward_nft(config, steering.names())
        names = steering.names() + self.links[:1]  # what the inject link's kernel end routes
        sides = [(s.name, s.matches) for s in steering.sides]
        return render_forward_nft(config, names) + render_ring_steer(
            config, config.lb.interfaces, sides, self._inject_mac
        )

    def _install_inject(self) -> None:
        """The veth pair the loop writes into (its TX ring) and the kernel routes from."""
        kernel, engine = inject_names(self.instance)
        kmac, emac = inject_macs(self.instance)
        # a leftover of a SIGKILL (its peer goes with it)
        if run_tool(["ip", "link", "del", "dev", kernel], netns=None).returncode == 0:
            self.ctx.warn(f"removed leftover link {kernel}")
        _ip("link", "add", engine, "address", emac, "type", "veth", "peer", "name", kernel,
            "address", kmac)  # fmt: skip
        self.links += [kernel, engine]
        for name in (kernel, engine):
            _ip("link", "set", "dev", name, "addrgenmode", "none")
            _ip("link", "set", "dev", name, "up")
        macs = [bytes.fromhex(m.replace(":", "")) for m in (kmac, emac)]
        self.tx = TxRing(engine, macs[0], macs[1], vnet=True)
        self._inject_mac = kmac

    def _ring_port(self, side: Side, vnet: bool) -> _Port:
        """A TAP device for ``side``: nftables ``fwd``s its packets there, a ring reads them.

        The ring is an ``ETH_P_ALL`` tap on the device: it gets a copy of each frame
        the device is given to send. The engine never reads the TAP's own queue
        (one packet long), so the TAP drops the frame then, and the kernel never
        routes it. Like a TUN the device goes with the process. The ip rules still
        route into it what the netdev chain does not see (the LB's own probes,
        links not in ``lb.interfaces``): ARP off, it needs no neighbour. Without
        offloads (dsr) the kernel completes checksums and segments before the
        ring sees a packet.
        """
        try:
            fd = open_tun(side.name, offload=vnet, tap=True)
        except OSError as exc:
            raise RunError(
                f"cannot create TAP device {side.name}: {exc.strerror}",
                "is another instance with this name running? is /dev/net/tun there?",
            ) from None
        try:
            # the inject link's MAC: a frame routed here by the ip rules (no neighbour,
            # ARP off: to the device's own address) goes on with the right destination
            for args in (
                ("addrgenmode", "none"),
                ("arp", "off"),
                ("txqueuelen", "1"),
                ("address", self._inject_mac),
                ("up",),
            ):
                _ip("link", "set", "dev", side.name, *args)
            ring = RxRing(side.name, vnet=vnet)
        except OSError as exc:
            os.close(fd)
            raise RunError(
                f"cannot open a receive ring on {side.name}: {exc.strerror}",
                "the kernel needs AF_PACKET with PACKET_MMAP (TPACKET_V3); or V6LB_PYTHON_IO=tun",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        port = _Port(side, ring.fileno(), self.forwarders[side.kind], self._buf, vnet, ring)
        port.outs = (fd, fd)  # the TAP's fd: only kept open (closed on teardown)
        return port

    def in_flight(self) -> int:
        """A graceful stop: packets read since the last look (at most every _QUIET_WINDOW s).

        The plane keeps forwarding until a window passes without a packet, or the
        drain timeout ends it (it announces nothing, so traffic stops when whatever
        sends it elsewhere, a router or an orchestrator, does).
        """
        now = time.monotonic()
        last = self._flight
        if last is not None and now - last[0] < _QUIET_WINDOW:
            return last[2]
        total = sum(p.rx for p in self.ports)
        busy = 1 if last is None else total - last[1]
        self._flight = (now, total, busy)
        return busy

    def teardown(self) -> list[str]:
        for port in self.ports:
            if port.ring is not None:
                port.ring.close()
            try:
                os.close(port.outs[0] if port.ring is not None else port.fd)  # the device goes too
            except OSError:
                pass
            self.ctx.log(f"removed {'TAP' if port.ring else 'TUN'} {port.side.name}")
        self.ports = []
        if self.tx is not None:
            self.tx.close()
            self.tx = None
        removed = remove(self.instance)  # the netdev chain first: nothing fwd-ed to a gone link
        if self.links:  # the inject veth pair (its peer goes with it)
            run_tool(["ip", "link", "del", "dev", self.links[0]], netns=None)
            removed.append(f"link {self.links[0]}")
        self.links = []
        if self.l2 is not None:
            self.l2.close()
            self.l2 = None
        return removed

    # --- the loop ----------------------------------------------------------------

    def watch(self, selector: selectors.BaseSelector) -> None:
        for port in self.ports:
            selector.register(port.fd, selectors.EVENT_READ, Ready(self._ready(port)))

    def _ready(self, port: _Port) -> Callable[[], None]:
        """What the daemon's loop calls when ``port`` is readable: the loop for its kind."""

        def ready() -> None:
            if port.ring is not None:
                self._ring_ready(port, time.monotonic())
            elif self.trace:
                self._drain_traced(port, time.monotonic())
            elif port.side.kind == "nat":
                self._drain_nat(port, time.monotonic())
            elif port.side.kind == "npt" and port.fwd.first8_determines:
                self._drain_npt(port, time.monotonic())
            else:
                self._drain(port, time.monotonic())

        return ready

    def tick(self, now: float) -> float | None:
        """Once a second: expire nat flows."""
        if now >= self._next_expire:
            self._next_expire = now + 1.0
            nat = self.forwarders.get("nat")
            if nat is not None:
                nat.expire(now, 4096)
        return self._next_expire

    def apply_pool_change(self, vip: str, pool: BackendPool) -> str:
        """The pool is the forwarder's own: its Maglev table is already rebuilt."""
        return f"table rebuilt ({len(pool)} backends)"

    # --- reload ------------------------------------------------------------------

    def stage(self, config: Config) -> Staged:
        """Check and build the new file's forwarders; :meth:`Staged.commit` applies them.

        The set of devices (nat, npt, dsr) must stay the same. A forwarder
        whose part of the file did not change is kept with its state (conntrack,
        flow cache, health); a changed one starts afresh.
        """
        l2 = l2_facts(config)
        check_lb_host(config)
        if self.io == "ring" and not config.lb.interfaces:
            raise RunError(
                f"{config.source}: lb.interfaces is empty, and the rings steer on ingress of"
                " those links",
                "keep lb.interfaces, or restart `v6lb run` with V6LB_PYTHON_IO=tun",
            )
        steering = plan(config)
        if [(s.kind, s.port) for s in steering.sides] != [
            (s.kind, s.port) for s in self.steering.sides
        ]:
            raise RunError(
                "the new file adds or removes a kind of forwarder (nat, npt, dsr)",
                "restart `v6lb run` for that change",
            )
        forwarders = build_forwarders(config, l2.macs if l2 else None)
        for kind in forwarders:
            if _part(self.config, kind) == _part(config, kind):
                forwarders[kind] = self.forwarders[kind]  # unchanged: keep its state

        def commit() -> str:
            apply_nft(self._nft(config, steering))
            lines = _steering_diff(self.steering, steering)
            if lines:
                r = run_tool(["ip", "-6", "-batch", "-"], netns=None, stdin=lines)
                if r.returncode != 0:
                    apply_nft(self._nft(self.config, self.steering))
                    raise RunError(f"updating the steering rules failed: {r.stderr.strip()}", "")
            kept = sorted(k for k in forwarders if forwarders[k] is self.forwarders.get(k))
            self.config, self.steering, self.forwarders = config, steering, forwarders
            if l2 != self.l2_facts:
                if self.l2 is not None:
                    self.l2.close()
                self.l2 = L2Egress(l2) if l2 is not None else None
                self.l2_facts = l2
            for port in self.ports:
                if port.fwd is not forwarders[port.side.kind]:
                    port.fwd = forwarders[port.side.kind]
                    port.cache.clear()
            return f"; kept the state of: {', '.join(kept) or 'none'}"

        return Staged(_pools(forwarders), commit)

    # The hot loops. Each reads one packet per readv into the one preallocated
    # buffer, handles it in place and writes it from a preallocated memoryview
    # of that buffer: no object per packet on the fast paths. The kernel has
    # already decremented the hop limit on the way into the TUN (and answered a
    # hop limit of 1 there); the loops give that one back, as the kernel
    # decrements it again on the way out.

    def _drain_npt(self, port: _Port, now: float) -> None:
        """npt, one /48-or-shorter mapping: a cache of what the core made of an address."""
        fd = port.fd
        buf = self._buf
        vecs = port.vecs
        skip = VNET_HDR_LEN if port.hdr is not None else 0
        wvecs = port.wvecs
        views = self._views
        mv = self._mv
        readv = os.readv
        write = os.write
        writev = os.writev
        cache = port.cache
        get = cache.get
        inside = port.side.port == PORT_INSIDE
        hdr = _NPT_SRC if inside else _NPT_DST
        out_fd = port.outs[PORT_OUTSIDE if inside else PORT_INSIDE]
        n_rx = n_fwd = 0
        for _ in range(BATCH):
            try:
                n = readv(fd, vecs) - skip
            except BlockingIOError:
                break
            n_rx += 1
            if n >= 60:
                v, plen, nh, hl, key = hdr.unpack_from(buf)
                if plen + 40 == n and (nh == 6 or nh == 17) and v >> 4 == 6:
                    new = get(key)
                    if new is not None:
                        if hl < 255:
                            hl += 1
                        if inside:
                            _HL_SRC.pack_into(buf, 7, hl, new)
                        else:
                            buf[7] = hl
                            _Q.pack_into(buf, 24, new)
                        try:
                            if skip:
                                wvecs[1] = views[n] if n <= _VIEWS else mv[:n]
                                writev(out_fd, wvecs)
                            else:
                                write(out_fd, views[n])
                        except OSError:
                            port.errors += 1
                        n_fwd += 1
                        continue
                    pkt = self._slow(port, n, now)
                    if pkt is not None:  # forwarded by the core: remember the translation
                        if len(cache) >= _NPT_CACHE_MAX:
                            cache.clear()
                        cache[key] = _Q.unpack_from(pkt, 8 if inside else 24)[0]
                    continue
            self._slow(port, n, now)
        port.rx += n_rx
        if n_fwd:
            port.fwd.counters.forwarded += n_fwd

    def _drain_nat(self, port: _Port, now: float) -> None:
        """nat: the core's fast path on the read buffer, its general path on a copy."""
        fd = port.fd
        buf = self._buf
        vecs = port.vecs
        hdr = port.hdr
        skip = VNET_HDR_LEN if hdr is not None else 0
        wvecs = port.wvecs
        views = self._views
        mv = self._mv
        readv = os.readv
        write = os.write
        writev = os.writev
        fast = port.fwd.fast
        outs = port.outs
        in_port = port.side.port
        n_rx = 0
        for _ in range(BATCH):
            try:
                n = readv(fd, vecs) - skip
            except BlockingIOError:
                break
            n_rx += 1
            if n >= 48:
                hl = buf[7]
                if hl < 255:
                    buf[7] = hl + 1
                # NEEDS_CSUM: the checksum field holds the pseudo-header sum only
                out = fast(buf, n, in_port, now, hdr[0] & 1 if hdr is not None else 0)
                view = views[n] if n <= _VIEWS else mv[:n]
                if out >= 0:
                    try:
                        if skip:
                            wvecs[1] = view
                            writev(outs[out], wvecs)
                        else:
                            write(outs[out], view)
                    except OSError:
                        port.errors += 1
                    continue
                self._general(port, self._own_checksum(port, bytearray(view)), now)
                continue
            self._slow(port, n, now)
        port.rx += n_rx

    # The ring loops (V6LB_PYTHON_IO=ring). A ready device's receive ring is read
    # block by block, without a system call. On the fast paths each packet is
    # copied once, from its receive slot into the next transmit slot, and
    # rewritten there in place; the transmit slots go to the kernel with one
    # ``send`` per TX_BATCH packets and one at the end. Nothing took a hop on the
    # way in (the netdev chain stole the packet before the kernel routed it), so
    # nothing is given back; the kernel takes the one hop when it routes the
    # packet on from the inject link. The general path copies the packet out of
    # the ring, as the TUN loops do.

    def _ring_ready(self, port: _Port, now: float) -> None:
        if self.trace or port.side.kind == "dsr":
            self._ring_any(port, now)
        elif port.side.kind == "nat":
            self._ring_nat(port, now)
        elif port.fwd.first8_determines:
            self._ring_npt(port, now)
        else:
            self._ring_any(port, now)

    def _ring_npt(self, port: _Port, now: float) -> None:
        """npt on rings: the first-8-byte cache of :meth:`_drain_npt`, slot to slot."""
        rx, tx = port.ring, self.tx
        assert rx is not None and tx is not None
        rmap, rmv, tmap, tmv = rx.map, rx.mv, tx.map, tx.mv
        frame, nslots, data, room, extra = tx.frame, tx.frames, tx.data, tx.room, tx.extra
        vat = data - ETH_HLEN - VNET_HDR_LEN
        frame3, pack_tx, pkts = FRAME3.unpack_from, TX_HDR.pack_into, BLOCK_PKTS.unpack_from
        copy_all = _HDR_LEN.pack_into
        cache = port.cache
        get = cache.get
        inside = port.side.port == PORT_INSIDE
        hdr = _NPT_SRC if inside else _NPT_DST
        addr_at = 8 if inside else 24
        put = _Q.pack_into
        slot, pending = tx.slot, tx.pending
        n_rx = n_fwd = 0
        for _ in range(BLOCKS):
            blk = rx.ready()
            if blk < 0:
                break
            num, pos = pkts(rmap, blk + 12)
            pos += blk
            n_rx += num
            for _ in range(num):
                nxt, snap, ln, mac, net = frame3(rmap, pos)
                at = pos + net
                n = snap + mac - net
                vh = pos + mac - VNET_HDR_LEN
                pos += nxt
                if snap < ln:  # larger than a block: cannot happen with 128 KB blocks
                    port.errors += 1
                    continue
                if n >= 60 and net - mac == ETH_HLEN:
                    _, plen, nh, _, key = hdr.unpack_from(rmap, at)
                    if plen + 40 == n and (nh == 6 or nh == 17) and rmap[at] >> 4 == 6:
                        new = get(key)
                        if new is not None and n > room:  # a 64 KB TCP packet (offloads)
                            put(rmap, at + addr_at, new)  # in the receive slot: no copy
                            tx.slot, tx.pending = slot, pending
                            tx.send_big(rmv[vh : vh + VNET_HDR_LEN], rmv[at : at + n])
                            slot, pending = tx.slot, tx.pending
                            n_fwd += 1
                            continue
                        if new is not None:
                            s = slot * frame
                            if tmv[s]:  # the kernel still has this slot
                                tx.slot, tx.pending = slot, pending
                                ok = self._tx_room()
                                pending = tx.pending
                                if not ok:
                                    port.errors += 1
                                    continue
                            d = s + data
                            # one copy: virtio-net header, Ethernet header (to the inject
                            # link's MAC already: the nft rule or the TAP's address), packet
                            tmv[s + vat : d + n] = rmv[vh : at + n]
                            copy_all(tmap, s + vat + 2, n + ETH_HLEN)
                            put(tmap, d + addr_at, new)
                            pack_tx(tmap, s, 1, n + extra)
                            slot += 1
                            if slot == nslots:
                                slot = 0
                            pending += 1
                            if pending >= TX_BATCH:
                                tx.pending = pending
                                tx.flush()
                                pending = 0
                            n_fwd += 1
                            continue
                        tx.slot, tx.pending = slot, pending
                        pkt = self._ring_slow(port, rmv[at : at + n], rmv[vh : vh + 10], now)
                        slot, pending = tx.slot, tx.pending
                        if pkt is not None:  # forwarded by the core: remember the translation
                            if len(cache) >= _NPT_CACHE_MAX:
                                cache.clear()
                            cache[key] = _Q.unpack_from(pkt, addr_at)[0]
                        continue
                tx.slot, tx.pending = slot, pending
                self._ring_slow(port, rmv[at : at + n], rmv[vh : vh + 10], now)
                slot, pending = tx.slot, tx.pending
            rx.release(blk)
        tx.slot, tx.pending = slot, pending
        tx.flush()
        port.rx += n_rx
        if n_fwd:
            port.fwd.counters.forwarded += n_fwd

    def _ring_nat(self, port: _Port, now: float) -> None:
        """nat on rings: the core's ``fast`` on the transmit slot, its general path on a copy."""
        rx, tx = port.ring, self.tx
        assert rx is not None and tx is not None
        rmap, rmv, tmap, tmv = rx.map, rx.mv, tx.map, tx.mv
        frame, nslots, data, room, extra = tx.frame, tx.frames, tx.data, tx.room, tx.extra
        vat = data - ETH_HLEN - VNET_HDR_LEN
        frame3, pack_tx, pkts = FRAME3.unpack_from, TX_HDR.pack_into, BLOCK_PKTS.unpack_from
        copy_all = _HDR_LEN.pack_into
        fast = port.fwd.fast
        in_port = port.side.port
        slot, pending = tx.slot, tx.pending
        n_rx = 0
        for _ in range(BLOCKS):
            blk = rx.ready()
            if blk < 0:
                break
            num, pos = pkts(rmap, blk + 12)
            pos += blk
            n_rx += num
            for _ in range(num):
                nxt, snap, ln, mac, net = frame3(rmap, pos)
                at = pos + net
                n = snap + mac - net
                vh = pos + mac - VNET_HDR_LEN
                pos += nxt
                if snap < ln:
                    port.errors += 1
                    continue
                if n > room and net - mac == ETH_HLEN:  # 64 KB TCP (offloads): in the ring
                    big = rmv[at : at + n]
                    if fast(big, n, in_port, now, rmap[vh] & 1) >= 0:
                        tx.slot, tx.pending = slot, pending
                        tx.send_big(rmv[vh : vh + VNET_HDR_LEN], big)
                        slot, pending = tx.slot, tx.pending
                        continue
                elif n >= 48 and net - mac == ETH_HLEN:
                    s = slot * frame
                    if tmv[s]:
                        tx.slot, tx.pending = slot, pending
                        ok = self._tx_room()
                        pending = tx.pending
                        if not ok:
                            port.errors += 1
                            continue
                    d = s + data
                    tmv[s + vat : d + n] = rmv[vh : at + n]  # as in _ring_npt: one copy
                    # NEEDS_CSUM: the checksum field holds the pseudo-header sum only
                    if fast(tmv[d : d + n], n, in_port, now, rmap[vh] & 1) >= 0:
                        copy_all(tmap, s + vat + 2, n + ETH_HLEN)
                        pack_tx(tmap, s, 1, n + extra)
                        slot += 1
                        if slot == nslots:
                            slot = 0
                        pending += 1
                        if pending >= TX_BATCH:
                            tx.pending = pending
                            tx.flush()
                            pending = 0
                        continue
                tx.slot, tx.pending = slot, pending
                self._ring_slow(port, rmv[at : at + n], rmv[vh : vh + 10], now)
                slot, pending = tx.slot, tx.pending
            rx.release(blk)
        tx.slot, tx.pending = slot, pending
        tx.flush()
        port.rx += n_rx

    def _ring_any(self, port: _Port, now: float) -> None:
        """Any forwarder on rings (and tracing): ``process`` on a copy of each packet."""
        rx, tx = port.ring, self.tx
        assert rx is not None and tx is not None
        rmap, rmv = rx.map, rx.mv
        n_rx = 0
        for _ in range(BLOCKS):
            blk = rx.ready()
            if blk < 0:
                break
            num, pos = BLOCK_PKTS.unpack_from(rmap, blk + 12)
            pos += blk
            n_rx += num
            for _ in range(num):
                nxt, snap, ln, mac, net = FRAME3.unpack_from(rmap, pos)
                at, n, vh = pos + net, snap + mac - net, pos + mac - VNET_HDR_LEN
                pos += nxt
                if snap < ln:
                    port.errors += 1
                    continue
                if self.trace:
                    pkt = bytearray(rmv[at : at + n])
                    if port.hdr is not None:
                        port.hdr[:] = rmv[vh : vh + VNET_HDR_LEN]
                    self._own_checksum(port, pkt)
                    head = _describe(pkt)
                    action, arg, out = port.fwd.process(pkt, port.side.port, now)
                    self._trace_line(port, head, action, arg, out)
                    self._send(port, pkt, action, arg, out)
                else:
                    self._ring_slow(port, rmv[at : at + n], rmv[vh : vh + VNET_HDR_LEN], now)
            rx.release(blk)
        tx.flush()
        port.rx += n_rx

    def _ring_slow(
        self, port: _Port, view: memoryview, vh: memoryview, now: float
    ) -> bytearray | None:
        """A packet of a receive ring (and its virtio-net header) through ``process``.

        Bytes past the payload length (an Ethernet minimum frame's padding) are cut
        off first, as the kernel's IPv6 input does; a payload length past the end is
        the core's to judge (``length-mismatch``).
        """
        if port.hdr is not None:
            port.hdr[:] = vh
        n = len(view)
        if n > 40 and (plen := (view[4] << 8) | view[5]) and plen + 40 < n:
            view = view[: plen + 40]
        return self._general(port, self._own_checksum(port, bytearray(view)), now)

    def _tx_room(self) -> bool:
        """The next transmit slot is still the kernel's: hand it the pending ones, look again."""
        tx = self.tx
        assert tx is not None
        tx.flush()
        return not tx.map[tx.slot * tx.frame]

    def _tx_put(self, hdr: bytearray | bytes | None, pkt: bytearray | bytes) -> bool:
        """One packet into the next transmit slot (or, too big for one, a ``sendmsg``)."""
        tx = self.tx
        assert tx is not None
        n = len(pkt)
        if n > tx.room:
            tx.send_big(hdr, pkt)
            return True
        s = tx.slot * tx.frame
        if tx.map[s] and not self._tx_room():
            return False
        d = s + tx.data
        tx.mv[d : d + n] = pkt
        tx.mv[d - ETH_HLEN : d] = tx.eth  # the fast paths leave the frame's own header there
        tx.mv[d - ETH_HLEN - VNET_HDR_LEN : d - ETH_HLEN] = hdr if hdr is not None else self._no_hdr
        _HDR_LEN.pack_into(tx.map, d - ETH_HLEN - VNET_HDR_LEN + 2, n + ETH_HLEN)
        TX_HDR.pack_into(tx.map, s, 1, n + tx.extra)
        tx.slot = (tx.slot + 1) % tx.frames
        tx.pending += 1
        if tx.pending >= TX_BATCH:
            tx.flush()
        return True

    def _own_checksum(self, port: _Port, pkt: bytearray) -> bytearray:
        """nat's general path needs a full transport checksum: complete a NEEDS_CSUM one.

        The virtio-net header then says so no more (flag and offsets cleared),
        and is written back in front of the packet as it is. A 64 KB TCP packet
        stays one: the kernel fills in the checksum of each segment when it
        segments it. From a ring, ``csum_start`` counts the Ethernet header too.
        """
        hdr = port.hdr
        if hdr is None or not hdr[0] & 1 or port.side.kind != "nat":
            return pkt
        start, off = _CSUM_AT.unpack_from(hdr, 6)
        if port.ring is not None:
            start -= ETH_HLEN
        nh = NH_TCP if off == 16 else NH_UDP if off == 6 else 0
        if nh and start + off + 2 <= len(pkt):
            fill_l4_checksum(pkt, start, nh)
        hdr[0] &= 0xFE
        _CSUM_AT.pack_into(hdr, 6, 0, 0)
        return pkt

    def _drain(self, port: _Port, now: float) -> None:
        """Any forwarder: its ``process`` on a copy of each packet."""
        fd = port.fd
        vecs = port.vecs
        skip = VNET_HDR_LEN if port.hdr is not None else 0
        readv = os.readv
        slow = self._slow
        n_rx = 0
        for _ in range(BATCH):
            try:
                n = readv(fd, vecs) - skip
            except BlockingIOError:
                break
            n_rx += 1
            slow(port, n, now)
        port.rx += n_rx

    def _slow(self, port: _Port, n: int, now: float) -> bytearray | None:
        """The packet ``buf[:n]`` as it came from the TUN, through ``process``."""
        pkt = bytearray(self._views[n]) if n <= _VIEWS else self._buf[:n]
        if n >= 40 and pkt[7] < 255:
            pkt[7] += 1
        return self._general(port, self._own_checksum(port, pkt), now)

    def _general(self, port: _Port, pkt: bytearray, now: float) -> bytearray | None:
        """``process`` and send the verdict; the packet if it was forwarded as it is."""
        action, arg, data = port.fwd.process(pkt, port.side.port, now)
        self._send(port, pkt, action, arg, data)
        return pkt if action == FORWARD and data is pkt else None

    def _send(self, port: _Port, pkt: bytearray, action: int, arg: int, data: Any) -> None:
        try:
            if self.tx is not None and action != FORWARD_L2:  # rings: the kernel routes it
                ok = True
                if action == FORWARD and data is pkt:
                    ok = self._tx_put(port.hdr, data)
                elif action in (FORWARD, REPLY):
                    ok = self._tx_put(None, data)
                elif action == FORWARD_MANY:
                    for frag in data:
                        ok = self._tx_put(None, frag) and ok
                if not ok:
                    port.errors += 1
            elif port.hdr is not None:  # offloads: a virtio-net header first
                if action == FORWARD and data is pkt:
                    os.writev(port.outs[arg], [port.hdr, data])
                elif action in (FORWARD, REPLY):
                    os.writev(port.outs[arg], [self._no_hdr, data])
                elif action == FORWARD_MANY:
                    for frag in data:
                        os.writev(port.outs[arg], [self._no_hdr, frag])
            elif action in (FORWARD, REPLY):
                os.write(port.outs[arg], data)
            elif action == FORWARD_MANY:
                for frag in data:
                    os.write(port.outs[arg], frag)
            elif action == FORWARD_L2:
                l2 = self.l2
                if l2 is None or not l2.send(data, pkt):
                    port.errors += 1  # no egress link, or no MAC for the backend
        except OSError:
            port.errors += 1

    def _drain_traced(self, port: _Port, now: float) -> None:
        """The general loop with a rate-limited trace line per decision (off the fast path)."""
        for _ in range(BATCH):
            try:
                n = os.readv(port.fd, port.vecs) - (0 if port.hdr is None else VNET_HDR_LEN)
            except BlockingIOError:
                break
            port.rx += 1
            pkt = bytearray(self._views[n]) if n <= _VIEWS else self._buf[:n]
            if n >= 40 and pkt[7] < 255:
                pkt[7] += 1
            self._own_checksum(port, pkt)
            head = _describe(pkt)
            action, arg, data = port.fwd.process(pkt, port.side.port, now)
            self._trace_line(port, head, action, arg, data)
            self._send(port, pkt, action, arg, data)

    def _trace_line(self, port: _Port, head: str, action: int, arg: int, data: Any) -> None:
        now = time.monotonic()
        self._trace_tokens = min(
            TRACE_RATE, self._trace_tokens + (now - self._trace_at) * TRACE_RATE
        )
        self._trace_at = now
        if self._trace_tokens < 1.0:
            self._trace_skipped += 1
            return
        self._trace_tokens -= 1.0
        if action == DROP:
            what = f"drop {Reason(arg).label}"
        elif action in (FORWARD, REPLY):
            what = f"{ACTION_NAMES[action]} -> port {arg}: {_describe(data)}"
        else:
            what = f"{ACTION_NAMES[action]} -> port {arg}"
        skipped = f" ({self._trace_skipped} lines skipped)" if self._trace_skipped else ""
        self._trace_skipped = 0
        self._emit(f"v6lb trace [{port.side.name}]: {head} => {what}{skipped}")

    # --- status ------------------------------------------------------------------

    def status(self) -> PlaneStatus:
        config = self.config
        engine: dict[str, Any] = {}
        for kind, fwd in self.forwarders.items():
            info: dict[str, Any] = {"counters": fwd.counters.snapshot()}
            if kind == "nat":
                info["conntrack"] = len(fwd.conntrack)
                info["conntrack_max"] = config.lb.conntrack_max
                info["conntrack_by_state"] = fwd.conntrack.count_by_state()
            if kind == "dsr":
                info["flow_cache"] = fwd.flows
                info["flow_cache_max"] = config.lb.flow_cache_size
            engine[kind] = info
        devices = [
            {
                "name": p.side.name,
                "kind": p.side.kind,
                "port": p.side.port,
                "rx": p.rx,
                "write_errors": p.errors,
                "table": p.side.table,
            }
            for p in self.ports
        ]
        for p, dev in zip(self.ports, devices, strict=True):
            if p.ring is not None:
                p.ring_drops += p.ring.dropped()[1]  # the kernel resets its count on each read
                dev["ring_drops"] = p.ring_drops

        out = PlaneStatus()
        pools = _pools(self.forwarders)
        dsr = self.forwarders.get("dsr")
        dsr_vips = {svc.name: svc for svc in dsr.services} if isinstance(dsr, DsrForwarder) else {}
        nat_fwd = self.forwarders.get("nat")
        nat_vips = {svc.name: svc for svc in nat_fwd.services} if nat_fwd is not None else {}
        for vip in config.vips:
            if vip.name not in pools:
                continue
            kind = str(vip.mode.facts.forwarder)
            if (svc := dsr_vips.get(vip.name)) is not None:  # each DSR VIP counts its own
                c = VipCounter("python dsr forwarded", svc.packets, svc.bytes)
                out.counters[vip.name] = c
                out.traffic[vip.name] = {"in": c}
                continue
            if (nsvc := nat_vips.get(vip.name)) is not None:  # each nat VIP counts its own
                (p_in, b_in), (p_out, b_out) = nsvc.traffic_in, nsvc.traffic_out
                out.counters[vip.name] = VipCounter(
                    "python nat forwarded", p_in + p_out, b_in + b_out
                )
                out.traffic[vip.name] = {
                    "in": VipCounter("python nat in", p_in, b_in),
                    "out": VipCounter("python nat out", p_out, b_out),
                }
                continue
            snap = self.forwarders[kind].counters.snapshot()
            out.counters[vip.name] = VipCounter(f"python {kind} forwarded", snap["forwarded"], 0)
        if "nat" in self.forwarders:  # the core counts new and live flows per VIP and backend
            for svc in self.forwarders["nat"].services:
                if svc.name in pools:
                    out.new_flows[svc.name] = svc.new_flows
                    out.active_flows[svc.name] = svc.active_flows
                    out.backend_new_flows[svc.name] = list(svc.backend_new_flows)
                    out.backend_active_flows[svc.name] = list(svc.backend_active_flows)
        out.icmp, out.npt_icmp = _icmp_errors(self.forwarders)
        try:
            kernel = _kernel_objects(self.instance)
            counters = nft_counters(self.instance)
        except Exception as exc:  # a status request must never stop the data plane
            kernel = {"error": f"{type(exc).__name__}: {exc}"}
            counters = {}
        nat = self.forwarders.get("nat")
        if nat is not None:
            full = nat.counters.drops[Reason.CONNTRACK_FULL]
            counters["conntrack_full"] = (full, 0)
        limits = limits_status(config, counters, count=len(nat.conntrack) if nat else None)
        out.details = {"engine": engine, "devices": devices, "kernel": kernel, **limits}
        out.details["io"] = {"mode": self.io}
        if self.tx is not None:  # the ring I/O's inject link
            out.details["io"] |= {"inject": self.links[0], "send_errors": self.tx.errors}
        return out


def rps_mask(cpus: set[int] | frozenset[int]) -> str:
    """``rps_cpus`` text for a set of CPUs: hex, in comma-separated 32-bit groups."""
    bits = sum(1 << c for c in cpus)
    groups = []
    while True:
        groups.append(f"{bits & 0xFFFFFFFF:08x}")
        bits >>= 32
        if not bits:
            break
    return ",".join(reversed(groups))


def _spread_rps(devices: list[str], netns: str | None) -> str | None:
    """Receive Packet Steering on the TUNs over the CPUs this process may use.

    What the loop writes into a TUN is received there: without RPS the kernel
    routes it on, and delivers it to any local socket, inside the ``write``
    call, on the engine's CPU. With RPS that work goes to the backlog of a CPU
    picked by the flow hash (per flow, so in order), often another one, and the
    loop returns to reading sooner. A failure here only costs speed: it is
    logged, not fatal. One CPU: nothing to spread.
    """
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2 or not devices:
        return None
    mask = rps_mask(cpus)
    script = "; ".join(f"echo {mask} > /sys/class/net/{d}/queues/rx-0/rps_cpus" for d in devices)
    # sysfs shows the devices of the namespace it was mounted in: `ip netns exec`
    # mounts the engine's one (this process entered the namespace with setns only).
    r = run_tool(["sh", "-c", script], netns=netns)
    if r.returncode != 0:
        return f"RPS not set on the TUNs (the loop does the routing itself): {r.stderr.strip()}"
    return f"RPS on {', '.join(devices)}: CPUs {mask}"


def _icmp_errors(forwarders: Mapping[str, Any]) -> tuple[dict[str, IcmpErrors], list[IcmpErrors]]:
    """The core's ICMPv6 error counts: per VIP name, and per npt pair."""
    vips: dict[str, IcmpErrors] = {}
    if "nat" in forwarders:
        for svc in forwarders["nat"].services:
            vips[svc.name] = IcmpErrors(
                translated=svc.icmp_translated, unmatched=svc.icmp_unmatched
            )
    if "dsr" in forwarders:
        for svc in forwarders["dsr"].services:
            vips[svc.name] = IcmpErrors(forwarded=svc.icmp_forwarded, unmatched=svc.icmp_unmatched)
    npt = forwarders.get("npt")
    pairs = (
        [
            IcmpErrors(translated=t, unmatched=u)
            for t, u in zip(npt.icmp_translated, npt.icmp_unmatched, strict=True)
        ]
        if npt is not None
        else []
    )
    return vips, pairs


def _pools(forwarders: Mapping[str, Any]) -> dict[str, BackendPool]:
    """The forwarders' own pools by VIP name: health changes go straight into them."""
    return {
        svc.name: svc.pool
        for kind in ("nat", "dsr")
        if kind in forwarders
        for svc in forwarders[kind].services
    }


def _part(config: Config, kind: str) -> Any:
    """What a forwarder of ``kind`` is built from: unchanged means its state can be kept."""
    if kind == "npt":
        return (config.lb, config.npt)
    modes = (VipMode.NAT,) if kind == "nat" else _DSR
    return (config.lb, [v for v in config.vips if v.mode in modes])


def _steering_diff(old: Steering, new: Steering) -> str:
    """``ip -6 -batch`` text: the new routes and rules, then the old ones that went away."""
    old_lines = [x for s in old.sides for x in (*s.routes, *s.rules)]
    new_lines = [x for s in new.sides for x in (*s.routes, *s.rules)]
    add = [x for x in new_lines if x not in old_lines]
    add.sort(key=lambda x: not x.startswith("route"))
    gone = [x.replace(" add ", " del ", 1) for x in old_lines if x not in new_lines]
    gone.sort(key=lambda x: x.startswith("route"))
    return "".join(f"{x}\n" for x in add + gone)


def _describe(buf: bytearray) -> str:
    if len(buf) < 40:
        return f"{len(buf)} bytes (truncated)"
    src = ipaddress.IPv6Address(bytes(buf[8:24]))
    dst = ipaddress.IPv6Address(bytes(buf[24:40]))
    nh = buf[6]
    if nh in (6, 17) and len(buf) >= 44:
        sp = (buf[40] << 8) | buf[41]
        dp = (buf[42] << 8) | buf[43]
        return f"{'tcp' if nh == 6 else 'udp'} [{src}]:{sp} > [{dst}]:{dp} hlim {buf[7]}"
    return f"nh {nh} {src} > {dst} hlim {buf[7]} len {len(buf)}"


def _ip(*argv: str) -> None:
    r = run_tool(["ip", *argv], netns=None)
    if r.returncode != 0:
        raise RunError(f"ip {' '.join(argv)} failed: {r.stderr.strip()}", "check TUN support")


def _kernel_objects(instance: str) -> dict[str, Any]:
    """The instance's routes and rules, read back from the kernel."""
    routes = [
        f"{r.get('type', '')} {r.get('dst')} dev {r.get('dev', '-')} table {r.get('table')}".strip()
        for r in nft_json(
            run_tool(
                ["ip", "-6", "-j", "route", "show", "table", "all", "proto", "0x76"], netns=None
            )
        )
        if in_instance_block(str(r.get("table")), instance)
    ]
    rules = []
    for r in nft_json(run_tool(["ip", "-6", "-j", "rule", "show"], netns=None)):
        if str(r.get("protocol")) in ("118", hex(ROUTE_PROTO)) and in_instance_block(
            r.get("table"), instance
        ):
            match = " ".join(
                f"{k} {r[k]}" + (f"/{r.get(k + 'len', 128)}" if k in ("src", "dst") else "")
                for k in ("src", "dst", "ipproto", "sport")
                if k in r and r[k] != "all"
            )
            rules.append(f"pref {r.get('priority')} {match or 'all'} lookup {r.get('table')}")
    return {"routes": routes, "rules": rules}
