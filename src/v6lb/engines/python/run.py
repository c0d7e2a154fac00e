"""`v6lb run FILE --dataplane python`: the core's forwarders on real packets through TUN.

:func:`run_python` makes the same checks as the kernel data plane before it
installs anything, then :class:`PythonRunner` creates the TUN devices, the
routing tables and the ``ip -6 rule``s of :func:`~v6lb.engines.python.steer.plan`
and runs one selector loop: the TUN devices (drained in batches, one ``readv``
per packet into a preallocated ``bytearray``), the TCP health probes
(:class:`~v6lb.engines.probe.TcpProber` driving the core's
:class:`~v6lb.core.health.HealthSet`, which takes dead backends out of the
forwarders' own :class:`~v6lb.core.backends.BackendPool`), the control socket
(``status``), and the signals (SIGHUP: reload the file, keeping the running
config if the new one fails; SIGTERM/SIGINT: remove everything tagged and exit 0).

Tracing (``V6LB_TRACE=1``, or ``trace=True``) logs one line per packet
decision, at most :data:`TRACE_RATE` lines per second; without it the loop
logs nothing.
"""

from __future__ import annotations

import ipaddress
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, Final

from v6lb.core.backends import BackendPool
from v6lb.core.dsr import DsrForwarder
from v6lb.core.health import HealthState
from v6lb.core.nat66 import NatForwarder
from v6lb.core.nptv6 import NptForwarder, NptMapping
from v6lb.core.verdict import (
    ACTION_NAMES,
    DROP,
    FORWARD,
    FORWARD_L2,
    FORWARD_MANY,
    REPLY,
)
from v6lb.engines.control import ControlServer
from v6lb.engines.kernel.apply import (
    KernelError,
    in_instance_block,
    nft_json,
    remove,
    require_root,
    require_tools,
    run_tool,
)
from v6lb.engines.kernel.host import check_lb_host, enter_netns
from v6lb.engines.kernel.run import RunError, _health_state, _State, load_for_run
from v6lb.engines.probe import ProbeTag, TcpProber, drive_health, health_deadline
from v6lb.engines.python.steer import Side, Steering, plan
from v6lb.engines.python.tun import open_tun
from v6lb.model.config import Config, VipMode
from v6lb.render.routes import ROUTE_PROTO
from v6lb.wire.reasons import Reason

__all__ = ["BATCH", "TRACE_RATE", "PythonRunner", "build_forwarders", "run_python"]

BATCH: Final = 256
"""Packets read from one device before the loop looks at the others again."""
TRACE_RATE: Final = 20.0
_TOOLS: Final = ("nft", "ip", "ip6tables", "ip6tables-save", "ip6tables-restore")
_MODES: Final = (VipMode.NAT, VipMode.DSR_IP6IP6, VipMode.DSR_SRV6)
_EVENTS: Final = 50
_SPARE: Final = 65536


def build_forwarders(config: Config) -> dict[str, Any]:
    """One forwarder per kind present: ``nat``, ``npt``, ``dsr`` (tunnel modes)."""
    lb = config.lb
    out: dict[str, Any] = {}
    if any(v.mode is VipMode.NAT for v in config.vips):
        # The kernel already decrements the hop limit on the way into the TUN
        # (and answers hop limit 1 there); the loop gives that one back.
        out["nat"] = NatForwarder.from_config(config, decrement_hop_limit=False)
    if config.npt:
        src = lb.addresses[0] if lb.addresses else config.npt[0].outside.network_address
        out["npt"] = NptForwarder(
            [NptMapping(p.inside, p.outside) for p in config.npt],
            src.packed,
            icmp_rate=float(lb.icmp_error_rate),
            icmp_burst=float(lb.icmp_error_burst),
            decrement_hop_limit=False,
        )
    if any(v.mode in (VipMode.DSR_IP6IP6, VipMode.DSR_SRV6) for v in config.vips):
        out["dsr"] = DsrForwarder.from_config(config)  # dsr-l2 is refused before this
    return out


class _Port:
    """The loop's view of one TUN device (plain attributes: read in the hot loop)."""

    __slots__ = ("side", "fd", "process", "outs", "pkt", "vecs", "rx", "errors")

    def __init__(self, side: Side, fd: int, process: Callable[..., Any], spare: bytearray) -> None:
        self.side = side
        self.fd = fd
        self.process = process
        self.outs: tuple[int, int] = (fd, fd)
        self.pkt = bytearray(1500)
        self.vecs = [self.pkt, spare]
        self.rx = 0
        self.errors = 0


class PythonRunner:
    """One installed Python data plane: call :meth:`install`, then :meth:`serve`."""

    def __init__(
        self,
        config: Config,
        path: str,
        *,
        skipped: tuple[str, ...] = (),
        netns: str | None = None,
        trace: bool = False,
        overrides: Mapping[str, str | None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.path = path
        self.netns = netns
        self.skipped = skipped
        self.overrides = dict(overrides or {})
        self.reloads = 0
        self.health_changes = 0
        self.last_error: str | None = None
        self.trace = trace
        self.instance = config.lb.instance
        self._log_out = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.events: deque[str] = deque(maxlen=_EVENTS)
        self.started = time.time()
        self.forwarders = build_forwarders(config)
        self.steering: Steering = plan(config)
        self.state: _State = _health_state(config, _pools(self.forwarders), time.monotonic(), set())
        self.sel = selectors.DefaultSelector()
        self.prober = TcpProber(self.sel)
        self.ports: list[_Port] = []
        self.control: ControlServer | None = None
        self._spare = bytearray(_SPARE)
        self._signals: list[int] = []
        self._stop = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._trace_tokens = TRACE_RATE
        self._trace_at = time.monotonic()
        self._trace_skipped = 0

    def log(self, message: str) -> None:
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now))
        self.events.append(f"{stamp}.{int(now % 1 * 1000):03d} {message}")
        self._log_out(f"v6lb run [{self.instance}]: {message}")

    # --- install / remove -------------------------------------------------------

    def install(self) -> None:
        """Open the control socket, remove leftovers, create the TUNs, rules and routes."""
        self.control = ControlServer(self.config.lb.control_socket, {"status": self.status})
        try:
            for item in remove(self.instance):
                self.log(f"removed leftover {item}")
            by_kind: dict[str, dict[int, _Port]] = {}
            for side in self.steering.sides:
                try:
                    fd = open_tun(side.name)
                except OSError as exc:
                    raise RunError(
                        f"cannot create TUN device {side.name}: {exc.strerror}",
                        "is another instance with this name running? is /dev/net/tun there?",
                    ) from None
                port = _Port(side, fd, self.forwarders[side.kind].process, self._spare)
                self.ports.append(port)
                by_kind.setdefault(side.kind, {})[side.port] = port
                _ip("link", "set", "dev", side.name, "addrgenmode", "none")
                _ip("link", "set", "dev", side.name, "up")
            for group in by_kind.values():
                fds = {p: port.fd for p, port in group.items()}
                outs = (fds.get(0, fds.get(1, -1)), fds.get(1, fds.get(0, -1)))
                for port in group.values():
                    port.outs = outs
            r = run_tool(["ip", "-6", "-batch", "-"], netns=None, stdin=self.steering.batch())
            if r.returncode != 0:
                raise RunError(
                    f"installing the steering rules failed: {r.stderr.strip()}",
                    "check that the kernel has policy routing (ip -6 rule) and TUN",
                )
        except BaseException:
            self.teardown()
            raise
        for line in self.skipped:
            self.log(f"skipped VIP {line}")
        self.log(
            f"python data plane: {', '.join(self.steering.names())} for"
            f" {', '.join(sorted(self.forwarders))}; control socket {self.config.lb.control_socket}"
        )

    def teardown(self) -> list[str]:
        self.prober.close()
        for port in self.ports:
            try:
                os.close(port.fd)  # the TUN device goes with its fd
            except OSError:
                pass
            self.log(f"removed TUN {port.side.name}")
        self.ports = []
        removed: list[str] = []
        try:
            removed = remove(self.instance)
        finally:
            if self.control is not None:
                self.control.close()
                self.control = None
        for item in removed:
            self.log(f"removed {item}")
        return removed

    # --- the loop ----------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT (SIGHUP reloads); remove what was installed; the exit code."""
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        old_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        old = {
            s: signal.signal(s, self._on_signal)
            for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
        }
        sel = self.sel
        try:
            for port in self.ports:
                sel.register(port.fd, selectors.EVENT_READ, port)
            assert self.control is not None
            self.control.register(sel)
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            drain = self._drain_traced if self.trace else self._drain
            next_expire = time.monotonic() + 1.0
            while not self._stop:
                timeout = self._probe_tick()
                changed: set[str] = set()
                for sk, _ in sel.select(timeout):
                    data = sk.data
                    if type(data) is _Port:
                        drain(data, time.monotonic())
                    elif isinstance(data, ProbeTag):
                        changed |= self._probe_done(sk)
                    elif isinstance(data, ControlServer):
                        data.handle()
                    elif data == "wake":
                        try:
                            while self._wake_r.recv(512):
                                pass
                        except BlockingIOError:
                            pass
                if changed:
                    self._sync(changed)
                now = time.monotonic()
                if now >= next_expire:
                    next_expire = now + 1.0
                    nat = self.forwarders.get("nat")
                    if nat is not None:
                        nat.expire(now, 4096)
                while self._signals:
                    signum = self._signals.pop(0)
                    if signum == signal.SIGHUP:
                        self.reload()
                        continue
                    self.log(
                        f"{signal.Signals(signum).name}: removing what this instance installed"
                    )
                    self._stop = True
        finally:
            self.sel.close()
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
            self.teardown()
            self.log("stopped")
        return 0

    # --- health ------------------------------------------------------------------

    def _probe_tick(self) -> float:
        """Start the probes that are due, handle the monitors' timers; the select timeout."""
        st = self.state
        now = time.monotonic()
        changed = drive_health(st.health, st.targets, self.prober, now)
        if changed:
            self._sync(changed)
        return max(0.0, health_deadline(st.health, now) - time.monotonic())

    def _probe_done(self, sk: selectors.SelectorKey) -> set[str]:
        key, pid, ok = self.prober.handle(sk)
        assert isinstance(key, tuple)
        owner = self.state.health.get(key[0])
        if (
            owner is not None
            and key[1] in owner
            and owner.probe_result(key[1], ok, time.monotonic(), pid)
        ):
            return {key[0]}
        return set()

    def _sync(self, vips: set[str]) -> None:
        """Bring the forwarders' pools in line with health (their Maglev tables are rebuilt)."""
        st = self.state
        for name in sorted(vips):
            hs, pool = st.health[name], st.pools[name]
            moved = [i for i in range(len(pool)) if pool.set_up(i, hs.state(i) is HealthState.UP)]
            if not moved:
                continue
            self.health_changes += 1
            vip = st.config.vip(name)
            states = ", ".join(f"{vip.backends[i].address} {hs.state(i)}" for i in moved)
            self.log(f"{name}: {states}; table rebuilt ({len(pool)} backends)")

    # --- reload ------------------------------------------------------------------

    def reload(self) -> bool:
        """SIGHUP: load, check and apply the file again; on any failure keep what runs.

        The set of devices (nat, npt, dsr) must stay the same. A forwarder
        whose part of the file did not change is kept with its state (conntrack,
        flow cache, health); a changed one starts afresh. Backends that are
        down stay down until their probes see them rise.
        """
        old = self.state
        try:
            config, skipped = load_for_run(
                self.path,
                instance=self.overrides.get("instance"),
                control_socket=self.overrides.get("control_socket"),
            )
            _refuse_l2(config, self.path)
            if config.lb.instance != self.instance:
                raise RunError(
                    f"the instance name changed ({self.instance} -> {config.lb.instance})",
                    "stop this instance and start the new one",
                )
            check_lb_host(config)
            steering = plan(config)
            if [(s.kind, s.port) for s in steering.sides] != [
                (s.kind, s.port) for s in self.steering.sides
            ]:
                raise RunError(
                    "the new file adds or removes a kind of forwarder (nat, npt, dsr)",
                    "restart `v6lb run` for that change",
                )
            forwarders = build_forwarders(config)
            for kind in forwarders:
                if _part(self.config, kind) == _part(config, kind):
                    forwarders[kind] = self.forwarders[kind]  # unchanged: keep its state
            down = {
                (name, str(vip.backends[i].address), vip.backends[i].port)
                for name, hs in old.health.items()
                for vip in [old.config.vip(name)]
                for i in range(len(vip.backends))
                if hs.state(i) is HealthState.DOWN
            }
            new = _health_state(config, _pools(forwarders), time.monotonic(), down)
            lines = _steering_diff(self.steering, steering)
            if lines:
                r = run_tool(["ip", "-6", "-batch", "-"], netns=None, stdin=lines)
                if r.returncode != 0:
                    raise RunError(f"updating the steering rules failed: {r.stderr.strip()}", "")
        except (KernelError, OSError, ValueError) as exc:
            text = exc.message if isinstance(exc, KernelError) else str(exc)
            self.last_error = f"reload failed, still running the previous config: {text}"
            self.log(self.last_error)
            return False
        self.prober.close()
        kept = sorted(k for k in forwarders if forwarders[k] is self.forwarders.get(k))
        self.config, self.skipped, self.steering = config, skipped, steering
        self.forwarders, self.state = forwarders, new
        for port in self.ports:
            port.process = forwarders[port.side.kind].process
        self.reloads += 1
        self.last_error = None
        self.log(f"reloaded {self.path}; kept the state of: {', '.join(kept) or 'none'}")
        return True

    def _drain(self, port: _Port, now: float) -> None:
        """The hot loop: up to BATCH packets from one device, each read once, rewritten in place."""
        fd = port.fd
        pkt = port.pkt
        vecs = port.vecs
        spare = self._spare
        process = port.process
        outs = port.outs
        readv = os.readv
        write = os.write
        in_port = port.side.port
        n_rx = 0
        for _ in range(BATCH):
            try:
                n = readv(fd, vecs)
            except BlockingIOError:
                break
            n_rx += 1
            size = len(pkt)
            if n != size:
                if n < size:
                    del pkt[n:]
                else:
                    pkt += spare
                    del pkt[n:]
            if n >= 40 and pkt[7] < 255:
                pkt[7] += 1  # give back the kernel's decrement on the way into the TUN
            action, arg, data = process(pkt, in_port, now)
            try:
                if action == FORWARD:
                    write(outs[arg], data)
                elif action == DROP:
                    pass
                elif action == REPLY:
                    write(outs[arg], data)
                elif action == FORWARD_MANY:
                    for frag in data:
                        write(outs[arg], frag)
                elif action == FORWARD_L2:
                    port.errors += 1  # no L2 port on a TUN (dsr-l2 is not served here)
            except OSError:
                port.errors += 1
        port.rx += n_rx

    def _drain_traced(self, port: _Port, now: float) -> None:
        """The hot loop with a rate-limited trace line per decision (off the fast path)."""
        pkt = port.pkt
        outs = port.outs
        for _ in range(BATCH):
            try:
                n = os.readv(port.fd, port.vecs)
            except BlockingIOError:
                break
            port.rx += 1
            if n < len(pkt):
                del pkt[n:]
            elif n > len(pkt):
                pkt += self._spare
                del pkt[n:]
            if n >= 40 and pkt[7] < 255:
                pkt[7] += 1
            head = _describe(pkt)
            action, arg, data = port.process(pkt, port.side.port, now)
            self._trace_line(port, head, action, arg, data)
            try:
                if action in (FORWARD, REPLY):
                    os.write(outs[arg], data)
                elif action == FORWARD_MANY:
                    for frag in data:
                        os.write(outs[arg], frag)
                elif action == FORWARD_L2:
                    port.errors += 1
            except OSError:
                port.errors += 1

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
        self._log_out(f"v6lb trace [{port.side.name}]: {head} => {what}{skipped}")

    # --- status ------------------------------------------------------------------

    def status(self, request: Mapping[str, Any] | None = None) -> dict[str, Any]:
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
        vips = []
        st = self.state
        for vip in config.vips:
            if vip.mode not in _MODES:
                continue
            kind = "nat" if vip.mode is VipMode.NAT else "dsr"
            fwd = self.forwarders[kind]
            pool = st.pools[vip.name]
            hs = st.health[vip.name]
            snap = fwd.counters.snapshot()
            vips.append(
                {
                    "name": vip.name,
                    "address": str(vip.address),
                    "ports": list(vip.ports),
                    "protocol": str(vip.protocol),
                    "mode": str(vip.mode),
                    "table_size": pool.size,
                    "seed": pool.seed,
                    "maps": [],
                    "counter": {
                        "name": f"python {kind} forwarded",
                        "packets": snap["forwarded"],
                        "bytes": 0,
                    },
                    "backends": [
                        {
                            "address": str(b.address),
                            "port": b.port,
                            "weight": b.weight,
                            "drain": b.drain,
                            "health": str(hs.state(i)),
                            "probe": f"tcp [{t.address}]:{t.port}" if t else "none",
                            "successes": m.successes if m else None,
                            "failures": m.failures if m else None,
                            "slots": pool.table.count(i),
                        }
                        for i, b in enumerate(vip.backends)
                        for t in [st.targets.get((vip.name, i))]
                        for m in [hs.monitor(i)]
                    ],
                }
            )
        try:
            kernel = _kernel_objects(self.instance)
        except Exception as exc:  # a status request must never stop the data plane
            kernel = {"error": f"{type(exc).__name__}: {exc}"}
        return {
            "instance": self.instance,
            "pid": os.getpid(),
            "file": self.path,
            "netns": self.netns,
            "dataplane": "python",
            "control_socket": config.lb.control_socket,
            "uptime_s": round(time.time() - self.started, 3),
            "reloads": self.reloads,
            "map_updates": self.health_changes,
            "last_error": self.last_error,
            "skipped": list(self.skipped),
            "vips": vips,
            "npt": [{"inside": str(p.inside), "outside": str(p.outside)} for p in config.npt],
            "engine": engine,
            "devices": devices,
            "kernel": kernel,
            "events": list(self.events),
        }


def _refuse_l2(config: Config, path: str) -> None:
    if any(v.mode is VipMode.DSR_L2 for v in config.vips):
        raise RunError(
            f"{path}: --dataplane python does not serve dsr-l2 VIPs yet (it needs TAP/AF_PACKET)",
            "use --dataplane kernel for dsr-l2, or move the VIP to dsr-ip6ip6/dsr-srv6",
        )


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
    modes = (VipMode.NAT,) if kind == "nat" else (VipMode.DSR_IP6IP6, VipMode.DSR_SRV6)
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


def run_python(
    path: str,
    *,
    instance: str | None = None,
    netns: str | None = None,
    control_socket: str | None = None,
    trace: bool | None = None,
) -> int:
    """Check, install, serve until SIGTERM/SIGINT, remove; the exit code.

    Raises :class:`RunError` (a ``KernelError``) when a check fails, before
    anything is installed.
    """
    require_root()
    require_tools(*_TOOLS)
    config, skipped = load_for_run(path, instance=instance, control_socket=control_socket)
    _refuse_l2(config, path)
    if netns is not None:
        enter_netns(netns)
    check_lb_host(config)
    try:
        with open("/proc/sys/net/ipv6/conf/all/forwarding") as f:
            forwarding = f.read().strip() == "1"
    except OSError:
        forwarding = False
    if not forwarding:
        raise RunError(
            "IPv6 forwarding is off: the kernel would not route packets into and out of the TUNs",
            "sysctl -w net.ipv6.conf.all.forwarding=1",
        )
    if not os.path.exists("/dev/net/tun"):
        raise RunError("/dev/net/tun is missing", "modprobe tun")
    if trace is None:
        trace = os.environ.get("V6LB_TRACE", "") not in ("", "0")
    runner = PythonRunner(
        config,
        path,
        skipped=skipped,
        netns=netns,
        trace=trace,
        overrides={"instance": instance, "control_socket": control_socket},
    )
    runner.install()
    return runner.serve()
