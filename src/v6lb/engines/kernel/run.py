"""`v6lb run --dataplane kernel`: install an instance, keep its maps healthy, remove it on exit.

:func:`prepare` does every check that can fail before anything is installed
(root, tools, the file, the host's interfaces and addresses, rendering), and
:class:`Runner` then applies the instance atomically and runs one loop:

* a :class:`~v6lb.engines.control.ControlServer` answering ``status``;
* TCP-connect probes (:class:`~v6lb.engines.probe.TcpProber`) driving one
  :class:`~v6lb.core.health.HealthSet` per VIP with ``time.monotonic()``; when
  a backend changes state its VIP's Maglev map(s) are refilled in one nft
  transaction (:func:`~v6lb.render.nftables.render_map_update`); conntrack
  keeps existing ``nat`` flows on their backend;
* SIGHUP reloads the file: a file that fails to load, check or apply leaves
  the running configuration in place (apply rolls back) and is logged;
* SIGTERM/SIGINT remove exactly what carries the instance's tag, then exit 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import selectors
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from types import FrameType
from typing import Any, Final

from v6lb.core.backends import BackendPool
from v6lb.core.health import HealthMonitor, HealthSet, HealthState
from v6lb.engines.control import ControlServer
from v6lb.engines.kernel.announce import Announcer
from v6lb.engines.kernel.apply import (
    KernelError,
    Rendered,
    apply,
    apply_nft,
    conntrack_count,
    in_instance_block,
    limits_status,
    nft_json,
    remove,
    render_lb,
    require_root,
    require_tools,
    run_tool,
)
from v6lb.engines.kernel.conntrackd import ConntrackSyncer
from v6lb.engines.kernel.host import (
    HostError,
    Links,
    check_lb_host,
    enter_netns,
    require_ipv6_forwarding,
)
from v6lb.engines.probe import ProbeTag, TcpProber, drive_health, health_deadline
from v6lb.model.config import Config, ConfigError, HealthType, VipMode, load_config
from v6lb.render.ip6tables import tagged_rules
from v6lb.render.nftables import (
    KERNEL_MODES,
    L2Ports,
    RenderError,
    maglev_pool,
    map_names,
    render_map_update,
    table_name,
    vip_counter,
)
from v6lb.render.routes import ROUTE_PROTO

__all__ = ["Prepared", "RunError", "Runner", "load_for_run", "prepare"]

RUN_TOOLS: Final = ("nft", "ip", "ip6tables", "ip6tables-save", "ip6tables-restore")
_INSTANCE_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,9}")
_EVENTS: Final = 50


class RunError(KernelError):
    """`run` refuses to start: the message says why, ``fix`` what to do."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A checked, rendered configuration that :class:`Runner` can install."""

    config: Config
    links: Links
    skipped: tuple[str, ...]  # VIPs this command does not serve (proxy-*), with the reason
    rendered: Rendered
    pools: dict[str, BackendPool]


def load_for_run(
    path: str, *, instance: str | None = None, control_socket: str | None = None
) -> tuple[Config, tuple[str, ...]]:
    """Load the file for `run`; the command-line overrides; the proxy VIPs it skips."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise RunError(str(exc), f"fix the file; `v6lb check {path}` shows every problem") from None
    lb = config.lb
    if instance is not None:
        if not _INSTANCE_RE.fullmatch(instance):
            raise RunError(
                f"--instance {instance!r} is not a valid instance name",
                "use 1 to 10 characters of a-z, 0-9 and '-', starting with a letter or digit",
            )
        if lb.control_socket == f"/run/v6lb/{lb.instance}.sock":
            lb = dataclasses.replace(lb, control_socket=f"/run/v6lb/{instance}.sock")
        lb = dataclasses.replace(lb, instance=instance)
    if control_socket is not None:
        lb = dataclasses.replace(lb, control_socket=control_socket)
    config = dataclasses.replace(config, lb=lb)
    skipped = tuple(
        f"{v.name} ({v.mode}): proxy VIPs are served by the proxy engine"
        " (--proxy builtin|haproxy), not by `v6lb run --dataplane kernel`"
        for v in config.vips
        if v.mode.is_proxy
    )
    if not any(v.mode in KERNEL_MODES for v in config.vips) and not config.npt:
        raise RunError(
            f"{path} has nothing for the kernel data plane (no nat/dsr-* VIP, no npt: pair)",
            "add a nat, dsr-l2, dsr-ip6ip6 or dsr-srv6 VIP or an npt: pair; proxy-l4/proxy-l7"
            " VIPs are run by the proxy engine (--proxy builtin|haproxy)",
        )
    return config, skipped


def dsr_l2_links(config: Config) -> tuple[str, str] | None:
    """(ingress, egress) of the ``dsr-l2`` VIPs, for both data planes; None without one.

    The egress link is ``lb.interfaces[1]``, or the only one when the LB is one-armed.
    """
    if not any(v.mode is VipMode.DSR_L2 for v in config.vips):
        return None
    ifs = config.lb.interfaces
    if not ifs:
        raise RunError(
            f"{config.source}: dsr-l2 needs the LB's interfaces",
            "list them in lb.interfaces: [INGRESS, EGRESS] (one name if it is one-armed)",
        )
    return ifs[0], ifs[1] if len(ifs) > 1 else ifs[0]


def _l2_ports(config: Config, links: Links) -> L2Ports | None:
    l2 = dsr_l2_links(config)
    if l2 is None:
        return None
    ingress, egress = l2
    return L2Ports(ingress=ingress, egress=egress, egress_mac=links.macs[egress])


def render_for(config: Config, links: Links, pools: Mapping[str, BackendPool]) -> Rendered:
    try:
        return render_lb(config, pools=pools, l2=_l2_ports(config, links))
    except RenderError as exc:
        raise RunError(f"{config.source}: {exc}", "fix the file or the host, then retry") from None


def fresh_pools(config: Config) -> dict[str, BackendPool]:
    return {
        v.name: maglev_pool(v, config.lb.flow_hash_seed)
        for v in config.vips
        if v.mode in KERNEL_MODES
    }


def prepare(
    path: str,
    *,
    dataplane: str = "kernel",
    instance: str | None = None,
    netns: str | None = None,
    control_socket: str | None = None,
) -> Prepared:
    """Every check `run` makes before it installs anything; raises :class:`KernelError`."""
    if dataplane == "python":
        try:
            sync = load_config(path).lb.conntrack_sync
        except ConfigError:
            sync = None  # the python plane reports the file's problems itself
        if sync is not None:
            raise RunError(
                f"{path}: lb.conntrack_sync needs --dataplane kernel: conntrackd replicates"
                " the kernel's conntrack table, and the python data plane keeps its flows in"
                " its own process",
                "run it with --dataplane kernel, or remove lb.conntrack_sync",
            )
        # The Python TUN data plane checks, installs and serves on its own; it
        # raises RunError before installing anything, and exits with its code.
        from v6lb.engines.python.run import run_python

        raise SystemExit(
            run_python(path, instance=instance, netns=netns, control_socket=control_socket)
        )
    if dataplane != "kernel":
        raise RunError(
            f"--dataplane {dataplane} is not known",
            "use --dataplane kernel (the default) or python",
        )
    require_root()
    require_tools(*RUN_TOOLS)
    config, skipped = load_for_run(path, instance=instance, control_socket=control_socket)
    if netns is not None:
        enter_netns(netns)
    links = check_lb_host(config)
    if config.npt or any(
        not v.mode.is_proxy and v.mode is not VipMode.DSR_L2 for v in config.vips
    ):  # dsr-l2 leaves by a netdev `fwd`, the proxies by their own sockets
        require_ipv6_forwarding(
            netns, "nat, npt and the tunnel DSR modes are routed, so every request would be lost"
        )
    pools = fresh_pools(config)
    rendered = render_for(config, links, pools)
    return Prepared(config, links, skipped, rendered, pools)


# --- the running instance ---------------------------------------------------------


@dataclass(slots=True)
class _Target:
    vip: str
    index: int
    address: IPv6Address
    port: int


@dataclass(slots=True)
class _State:
    config: Config
    links: Links
    pools: dict[str, BackendPool]
    health: dict[str, HealthSet[int]]
    targets: dict[tuple[str, int], _Target] = field(default_factory=dict)


def _health_state(
    config: Config,
    pools: Mapping[str, BackendPool],
    now: float,
    was_down: set[tuple[str, str, int | None]],
) -> _State:
    """Monitors for every probed backend; a backend known down stays down until it rises."""
    health: dict[str, HealthSet[int]] = {}
    targets: dict[tuple[str, int], _Target] = {}
    for vip in config.vips:
        if vip.mode not in KERNEL_MODES:
            continue
        hs: HealthSet[int] = HealthSet()
        n = len(vip.backends)
        for i, b in enumerate(vip.backends):
            down = (vip.name, str(b.address), b.port) in was_down
            monitor = None
            if vip.health.type is not HealthType.NONE:
                h = vip.health
                monitor = HealthMonitor(
                    interval=h.interval,
                    timeout=h.timeout,
                    rise=h.rise,
                    fall=h.fall,
                    now=now,
                    up=not down,
                    first_probe_at=now + h.interval * i / n / 2,  # spread the probes out
                )
                port = h.port or b.port or vip.ports[0]
                targets[(vip.name, i)] = _Target(vip.name, i, b.address, port)
            hs.add(i, monitor, weight=b.weight, drain=b.drain)
            if down:
                pools[vip.name].set_up(i, False)
        health[vip.name] = hs
    return _State(config, Links({}, {}), dict(pools), health, targets)


class Runner:
    """One installed instance and its loop (call :meth:`install`, then :meth:`serve`)."""

    def __init__(
        self,
        prepared: Prepared,
        path: str,
        *,
        netns: str | None = None,
        overrides: Mapping[str, str | None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.netns = netns
        self.overrides = dict(overrides or {})
        self.skipped = prepared.skipped
        self._log_out = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.events: deque[str] = deque(maxlen=_EVENTS)
        self.instance = prepared.config.lb.instance
        self.started = time.time()
        self.reloads = 0
        self.map_updates = 0
        self.last_error: str | None = None
        self.state = _health_state(prepared.config, prepared.pools, time.monotonic(), set())
        self.state.links = prepared.links
        self.rendered = prepared.rendered
        self.sel = selectors.DefaultSelector()
        self.prober = TcpProber(self.sel)
        self.control: ControlServer | None = None
        self._signals: list[int] = []
        self._stop = False
        self._wake_r, self._wake_w = socket.socketpair()
        # bgp: the BIRD speaker that announces the healthy VIPs (docs/anycast.md)
        self.announcer = Announcer.create(prepared.config, self.instance, self.log)
        # lb.conntrack_sync: the conntrackd that replicates NAT flows (docs/anycast.md)
        self.syncer = ConntrackSyncer.create(prepared.config, self.instance, self.log)

    def log(self, message: str) -> None:
        now = time.time()
        line = (
            f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d} {message}"
        )
        self.events.append(line)
        self._log_out(f"v6lb run [{self.instance}]: {message}")

    # --- install / remove -------------------------------------------------------

    def install(self) -> None:
        """Open the control socket, then apply; on failure nothing stays behind."""
        config = self.state.config
        # threaded: a status reads the kernel's objects back (``nft list``: 1-3 s with four
        # 65537-entry maps loaded); answered in the loop, it would hold the probes up.
        self.control = ControlServer(
            config.lb.control_socket, {"status": self.status}, log=self.log, threaded=True
        )
        try:
            apply(self.rendered, self.instance)
        except BaseException:
            self.control.close()
            self.control = None
            raise
        if self.syncer is not None:  # syncing before the VIPs are announced
            try:
                self.syncer.start()
            except BaseException:
                self.teardown()
                raise
        if self.announcer is not None:
            try:
                self.announcer.start(self.state.pools)
            except BaseException:
                self.announcer = None
                self.teardown()
                raise
        self.control.register(self.sel)
        for line in self.skipped:
            self.log(f"skipped VIP {line}")
        self.log(
            f"installed {len(self.state.pools)} VIP(s) and {len(config.npt)} npt pair(s)"
            f" from {self.path}; control socket {config.lb.control_socket}"
        )

    def teardown(self) -> list[str]:
        if self.announcer is not None:
            self.announcer.stop()  # withdraw first: routers stop sending before the maps go
        if self.syncer is not None:
            self.syncer.stop()
        self.prober.close()
        if self.control is not None:
            self.control.close(self.sel)
            self.control = None
        removed = remove(self.instance)
        for item in removed:
            self.log(f"removed {item}")
        return removed

    # --- the loop ----------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT; remove what was installed; the exit code."""
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        old_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        old = {
            s: signal.signal(s, self._on_signal)
            for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
        }
        try:
            while not self._stop:
                self._tick()
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
            self.teardown()
            self.log("stopped")
        return 0

    def _tick(self) -> None:
        st = self.state
        now = time.monotonic()
        changed = drive_health(st.health, st.targets, self.prober, now)
        if changed:
            self._sync(changed)
        if self.announcer is not None:
            self.announcer.check(now, st.pools)  # the LB's own check (docs/anycast.md)
        if self.syncer is not None:
            self.syncer.check(now)
        timeout = max(0.0, health_deadline(st.health, now) - time.monotonic())
        changed = set()
        for sk, _ in self.sel.select(timeout):
            data = sk.data
            if isinstance(data, ProbeTag):
                key, pid, ok = self.prober.handle(sk)
                assert isinstance(key, tuple)
                owner = st.health.get(key[0])
                if (
                    owner is not None
                    and key[1] in owner
                    and owner.probe_result(key[1], ok, time.monotonic(), pid)
                ):
                    changed.add(key[0])
            elif data == "wake":
                try:
                    while self._wake_r.recv(512):
                        pass
                except BlockingIOError:
                    pass
            elif isinstance(data, ControlServer):
                data.handle(sk)  # never blocks or raises (engines/control.py)
        if self.control is not None:
            self.control.expire()
        if changed:
            self._sync(changed)
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self.reload()
            else:
                self.log(f"{signal.Signals(signum).name}: removing what this instance installed")
                self._stop = True

    def _sync(self, vips: set[str]) -> None:
        """Bring the pools in line with health; refill each changed VIP's map in one transaction."""
        st = self.state
        for name in sorted(vips):
            hs, pool = st.health[name], st.pools[name]
            moved = [i for i in range(len(pool)) if pool.set_up(i, hs.state(i) is HealthState.UP)]
            if not moved:
                continue
            vip = st.config.vip(name)
            states = ", ".join(f"{vip.backends[i].address} {hs.state(i)}" for i in moved)
            if self.announcer is not None and not pool.any_eligible:
                self.announcer.sync(st.pools, withdraw_only=True)  # before the slow refill
            try:
                apply_nft(render_map_update(st.config, name, pool))
            except KernelError as exc:
                self.last_error = f"map update of {name} failed: {exc.message}"
                self.log(self.last_error)
                continue
            self.map_updates += 1
            self.log(f"{name}: {states}; map refilled ({len(pool)} backends, one transaction)")
        if self.announcer is not None:
            self.announcer.sync(st.pools)

    # --- reload ------------------------------------------------------------------

    def reload(self) -> bool:
        """SIGHUP: load, check and apply the file again; on any failure keep what runs."""
        old = self.state
        try:
            config, skipped = load_for_run(
                self.path,
                instance=self.overrides.get("instance"),
                control_socket=self.overrides.get("control_socket"),
            )
            if config.lb.instance != self.instance:
                raise RunError(
                    f"the instance name changed ({self.instance} -> {config.lb.instance})",
                    "stop this instance and start the new one",
                )
            links = check_lb_host(config)
            down = {
                (name, str(vip.backends[i].address), vip.backends[i].port)
                for name, hs in old.health.items()
                for vip in [old.config.vip(name)]
                for i in range(len(vip.backends))
                if hs.state(i) is HealthState.DOWN
            }
            pools = fresh_pools(config)
            new = _health_state(config, pools, time.monotonic(), down)
            new.links = links
            rendered = render_for(config, links, new.pools)
            apply(rendered, self.instance, previous=self.rendered)
        except (KernelError, OSError) as exc:
            text = exc.message if isinstance(exc, KernelError) else str(exc)
            self.last_error = f"reload failed, still running the previous config: {text}"
            self.log(self.last_error)
            return False
        self.prober.close()
        self.state, self.rendered, self.skipped = new, rendered, skipped
        self.reloads += 1
        self.last_error = None
        if config.lb.control_socket != old.config.lb.control_socket:
            self.log("lb.control_socket changed: it takes effect at the next start")
        self.log(f"reloaded {self.path}: {len(new.pools)} VIP(s)")
        if self.announcer is not None:
            self.announcer.reconfigure(config, new.pools)
        if self.syncer is not None:
            self.syncer.reconfigure(config)
        return True

    # --- status ------------------------------------------------------------------

    def status(self, request: Mapping[str, Any] | None = None) -> dict[str, Any]:
        st = self.state
        config = st.config
        kernel = kernel_objects(self.instance)
        counters = {name: (c["packets"], c["bytes"]) for name, c in kernel["nft_counters"].items()}
        nat_addresses = list(dict.fromkeys(v.address for v in config.vips if v.mode is VipMode.NAT))
        limits = limits_status(config, counters, count=conntrack_count(nat_addresses))
        vips = []
        for vip in config.vips:
            if vip.mode not in KERNEL_MODES:
                continue
            hs, pool = st.health[vip.name], st.pools[vip.name]
            backends = []
            for i, b in enumerate(vip.backends):
                monitor = hs.monitor(i)
                target = st.targets.get((vip.name, i))
                backends.append(
                    {
                        "address": str(b.address),
                        "port": b.port,
                        "weight": b.weight,
                        "drain": b.drain,
                        "health": str(hs.state(i)),
                        "probe": f"tcp [{target.address}]:{target.port}" if target else "none",
                        "successes": monitor.successes if monitor else None,
                        "failures": monitor.failures if monitor else None,
                        "slots": pool.table.count(i),
                    }
                )
            cname = vip_counter(config, vip)
            packets, nbytes = counters.get(cname, (0, 0))
            vips.append(
                {
                    "name": vip.name,
                    "address": str(vip.address),
                    "ports": list(vip.ports),
                    "protocol": str(vip.protocol),
                    "mode": str(vip.mode),
                    "table_size": pool.size,
                    "seed": pool.seed,
                    "maps": map_names(config, vip),
                    "counter": {"name": cname, "packets": packets, "bytes": nbytes},
                    "backends": backends,
                }
            )
        return {
            "instance": self.instance,
            "pid": os.getpid(),
            "file": self.path,
            "netns": self.netns,
            "dataplane": "kernel",
            "control_socket": config.lb.control_socket,
            "uptime_s": round(time.time() - self.started, 3),
            "reloads": self.reloads,
            "map_updates": self.map_updates,
            "last_error": self.last_error,
            "skipped": list(self.skipped),
            "vips": vips,
            "npt": [{"inside": str(p.inside), "outside": str(p.outside)} for p in config.npt],
            "kernel": kernel,
            **limits,
            "bgp": self.announcer.status() if self.announcer is not None else None,
            "conntrack_sync": self.syncer.status() if self.syncer is not None else None,
            "events": list(self.events),
        }


def kernel_objects(instance: str) -> dict[str, Any]:
    """What the instance has in the kernel now, read back from the kernel (not from memory).

    One terse ``nft -j -t list table`` per family gives tables, chains, maps and
    counters (each nft call costs about 0.4 s with a 65537-element map loaded).
    """
    name = table_name(instance)
    tables: list[str] = []
    chains: list[str] = []
    maps: list[str] = []
    counters: dict[str, tuple[int, int]] = {}
    for family in ("ip6", "netdev"):
        r = run_tool(["nft", "-j", "-t", "list", "table", family, name], netns=None)
        if r.returncode != 0:
            continue
        tables.append(f"{family} {name}")
        for item in json.loads(r.stdout or '{"nftables": []}')["nftables"]:
            if "chain" in item:
                c = item["chain"]
                hook = f" (hook {c['hook']}, priority {c['prio']})" if "hook" in c else ""
                chains.append(f"{family} {name} {c['name']}{hook}")
            elif "map" in item:
                maps.append(f"{family} {name} {item['map']['name']}")
            elif "counter" in item:
                c = item["counter"]
                counters[c["name"]] = (int(c["packets"]), int(c["bytes"]))
    ip6t = run_tool(["ip6tables-save", "-c"], netns=None)
    rules6 = tagged_rules(ip6t.stdout, instance) if ip6t.returncode == 0 else []
    routes = [
        _route_text(r)
        for r in nft_json(
            run_tool(
                ["ip", "-6", "-j", "route", "show", "table", "all", "proto", "0x76"], netns=None
            )
        )
        if in_instance_block(str(r.get("table")), instance)
    ]
    rules = [
        f"pref {r.get('priority')} {_rule_match(r)} lookup {r.get('table')}"
        for r in nft_json(run_tool(["ip", "-6", "-j", "rule", "show"], netns=None))
        if str(r.get("protocol")) in ("118", hex(ROUTE_PROTO))
        and in_instance_block(r.get("table"), instance)
    ]
    return {
        "nft_tables": tables,
        "nft_chains": chains,
        "nft_maps": maps,
        "nft_counters": {k: {"packets": p, "bytes": b} for k, (p, b) in sorted(counters.items())},
        "ip6tables_rules": rules6,
        "routes": routes,
        "rules": rules,
    }


def _route_text(r: Mapping[str, object]) -> str:
    parts = [str(r.get("dst"))]
    encap = r.get("encap")
    if encap:
        parts.append(f"encap {encap}")
    for key in ("gateway", "dev", "table"):
        if r.get(key):
            parts.append(f"{key if key != 'gateway' else 'via'} {r[key]}")
    return " ".join(parts)


def _rule_match(r: Mapping[str, object]) -> str:
    if "fwmark" in r:
        return f"fwmark {r['fwmark']}"
    if "dst" in r:
        return f"to {r['dst']}/{r.get('dstlen', 128)}"
    if "src" in r:
        return f"from {r['src']}/{r.get('srclen', 128)}"
    return "all"


__all__ += ["HostError", "kernel_objects"]
