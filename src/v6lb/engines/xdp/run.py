"""`v6lb run --dataplane xdp`: the XDP program as a plane of the daemon.

:class:`XdpPlane` checks everything before it attaches anything
(:meth:`XdpPlane.open`): the compiled object (``make xdp``), the kernel's BPF
features, the interface, the maps' limits and the placement each mode needs: a tunnel
backend and an npt pair's inside prefix routed back out of that interface (the program
sends with ``XDP_TX``, to the router that delivered the packet), a dsr-l2 backend on the
dsr-l2 egress link with a MAC (its ``mac:``, else learned from the neighbour table as
the python plane learns it, and followed while it runs). :meth:`~XdpPlane.install`
loads the program, pins it and its maps under ``/sys/fs/bpf/v6lb-<tag>_<gen>/``,
fills the maps from the plane's pools and attaches it to ``lb.interfaces[0]`` as a
BPF link (native mode; generic, with a warning, when the driver has none), pinned
beside the maps. A health or ``ctl`` change swaps the VIP's whole Maglev table
(:meth:`~v6lb.engines.xdp.program.XdpProgram.set_table`); a reload loads a new
generation and replaces the link's program in one step (``BPF_LINK_UPDATE``).
Teardown detaches the link and removes the pinned directory; a leftover of a run
that did not stop cleanly is found by its tag and removed at the next install (and
by ``v6lb lab down``). docs/dataplane-xdp.md describes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from v6lb.core.backends import BackendPool
from v6lb.core.dsr import DsrService
from v6lb.core.nptv6 import NptMapping
from v6lb.engines.kernel.apply import (
    KernelError,
    apply_nft,
    limits_status,
    neighbour_macs,
    nft_counters,
    nft_json,
    remove,
    require_root,
    require_tools,
    run_tool,
)
from v6lb.engines.kernel.host import check_lb_host, require_ipv6_forwarding
from v6lb.engines.kernel.run import PROBE_ROUTE_CHECK, dsr_l2_links
from v6lb.engines.l2facts import l2_facts
from v6lb.engines.plane import Plane, PlaneContext, PlaneStatus, Role, RunError, Staged
from v6lb.engines.xdp.bpf import (
    BPF_F_INNER_MAP,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_SKB_MODE,
    BpfError,
    Map,
    link_detach,
    link_update,
    obj_pin,
    xdp_link_create,
)
from v6lb.engines.xdp.program import (
    BPFFS,
    OBJECT,
    XdpProgram,
    map_entries,
    npt_entries,
    served,
    table_values,
)
from v6lb.model.config import Config, VipMode
from v6lb.model.pools import dsr_services
from v6lb.model.status import IcmpErrors
from v6lb.render.nftables import render_forward_nft

__all__ = ["PASS_OBJECT", "XdpPlane", "attach_pass", "pin_dirs", "pin_tag"]

PASS_OBJECT: Final = OBJECT.with_name("v6lb_xdp_pass.o")
"""``make xdp``'s XDP_PASS program (pass.c), for the peer of a veth (see :func:`attach_pass`)."""

_QUIET_WINDOW: Final = 0.5  # seconds: a graceful stop ends after one without a packet


def pin_tag(instance: str, netns: str | None) -> str:
    """The tag of an instance's pinned directories: bpffs is one per host, not per netns.

    ``<instance>`` or ``<instance>_<netns>`` (bpffs refuses a '.' in a name).
    """
    return f"{instance}_{re.sub(r'[^A-Za-z0-9_-]', '_', netns)}" if netns else instance


def pin_dirs(tag: str, root: Path = BPFFS) -> list[Path]:
    """Every generation's directory of ``tag`` under ``root`` (``v6lb-<tag>_<gen>``)."""
    if not root.is_dir():
        return []
    head = f"v6lb-{tag}_"
    return sorted(p for p in root.glob(f"{head}*") if p.name[len(head) :].isdigit() and p.is_dir())


def attach_pass(ifname: str, netns: str | None) -> None:
    """Attach the XDP_PASS program to ``ifname`` (native), so a veth peer takes XDP_TX frames.

    A native ``XDP_TX`` (or redirect) on a veth hands the frame to the peer's XDP
    receive queue, which exists only while the peer has an XDP program (or GRO, which
    this kernel's ``ETHTOOL_SGRO`` did not enable for it): without one the frame is
    dropped. The program goes with the interface.
    """
    argv = ["ip", "link", "set", "dev", ifname, "xdpdrv", "obj", str(PASS_OBJECT), "sec", "xdp"]
    r = run_tool(argv, netns=netns)
    if r.returncode != 0:
        raise RunError(
            f"attaching the XDP_PASS program to {ifname} failed: {r.stderr.strip()}",
            "build it with `make xdp`",
        )


def _layout(services: list[DsrService]) -> dict[str, tuple[int, int]]:
    """VIP name -> (its index in the maps, its first backend's global index)."""
    out: dict[str, tuple[int, int]] = {}
    base = 0
    for i, s in enumerate(served(services)):
        out[s.name] = (i, base)
        base += len(s.pool)
    return out


def _check_maps(config: Config, services: list[DsrService]) -> None:
    try:
        map_entries(services)
        npt_entries([NptMapping(p.inside, p.outside) for p in config.npt])
    except ValueError as exc:
        raise RunError(
            f"{config.source}: {exc}",
            "split the VIPs and npt pairs over more instances, or use --dataplane kernel",
        ) from None


class XdpPlane(Plane):
    """The XDP data plane of one instance: the program, its maps, its link."""

    name = "xdp"
    role = Role.DATAPLANE

    def __init__(
        self,
        config: Config,
        ctx: PlaneContext,
        ifname: str,
        macs: Mapping[str, bytes] | None = None,
    ) -> None:
        self.config = config
        self.ctx = ctx
        self.ifname = ifname
        self.tag = pin_tag(config.lb.instance, ctx.netns)
        self.macs = dict(macs or {})  # dsr-l2 backends' MACs learned (no `mac:` in the file)
        self.services = dsr_services(config, self.macs)
        self._next_neigh = 0.0
        self.layout = _layout(self.services)
        self.gen = 0
        self.program: XdpProgram | None = None
        self.link_fd = -1
        self.mode = ""  # native or generic, once attached
        self.carried: dict[str, int] = {}  # counters of the generations a reload replaced
        self.carried_icmp: dict[str, tuple[int, int]] = {}  # theirs, by VIP name and "npt<i>"
        self._filter = False  # the forward filter (nft table v6lb_<instance>) may be there
        self._flight: tuple[float, int, int] | None = None

    # --- checks -------------------------------------------------------------------

    @classmethod
    def preflight(cls, config: Config) -> None:
        require_root()
        require_tools("bpftool", "ip", "nft")
        if not OBJECT.is_file():
            raise RunError(
                f"the XDP program {OBJECT} is not built",
                "build it with `make xdp` (clang, from Debian)",
            )

    @classmethod
    def open(cls, config: Config, ctx: PlaneContext) -> XdpPlane:
        """The host checks, the kernel's features, the maps' limits; nothing attached."""
        check_lb_host(config)
        if not config.lb.interfaces:
            raise RunError(
                f"{config.source}: the xdp data plane needs the interface to attach to",
                "name it first in lb.interfaces (the link the VIPs' packets arrive on)",
            )
        ifname = config.lb.interfaces[0]
        require_ipv6_forwarding(
            ctx.netns,
            "the stack would not answer a VIP packet at hop limit 1 with Time Exceeded",
        )
        _check_kernel()
        plane = cls(config, ctx, ifname, _learned_macs(config, ifname))
        _check_maps(config, plane.services)
        _check_routes(config, plane.services, ifname)
        if _driver(ifname) == "veth":
            ctx.log(
                f"{ifname} is a veth: its XDP_TX frames reach the peer only when the peer"
                ' has an XDP program too (docs/dataplane-xdp.md, "veth")'
            )
        return plane

    def pools(self) -> Mapping[str, BackendPool]:
        return {s.name: s.pool for s in served(self.services)}

    # --- install / remove ---------------------------------------------------------

    def install(self) -> str:
        """Forward filter, load, pin, fill, attach; on failure nothing stays behind."""
        for old in pin_dirs(self.tag):
            self.ctx.warn(
                f"found {old} of an earlier run of instance {self.config.lb.instance} (it was"
                " not stopped cleanly); removing it"
            )
            shutil.rmtree(old, ignore_errors=True)  # its pinned link goes: detached
        try:
            for item in remove(self.config.lb.instance):
                self.ctx.warn(f"removed leftover {item}")
            self._filter = True
            apply_nft(render_forward_nft(self.config, (), plane=self.name))
            self.program = self._load(self.config, self.services)
            self.link_fd, self.mode = self._attach(self.program)
            obj_pin(self.link_fd, str(self.program.dir / "link"))
        except BaseException:
            self.teardown()
            raise
        return (
            f"xdp program attached to {self.ifname} ({self.mode}), {len(self.layout)} VIP(s),"
            f" pinned under {self.program.dir}"
        )

    def _load(self, config: Config, services: list[DsrService]) -> XdpProgram:
        try:
            program = XdpProgram(f"{self.tag}_{self.gen}")
        except FileNotFoundError as exc:
            raise RunError(str(exc), "build it with `make xdp`") from None
        except Exception as exc:  # bpftool: the verifier's or libbpf's refusal; bpffs
            detail = (getattr(exc, "stderr", "") or str(exc)).strip()
            raise RunError(
                f"loading the XDP program failed: {detail}",
                f"check that `bpftool prog load {OBJECT} /sys/fs/bpf/x` works here",
            ) from exc
        try:
            program.fill(config, services)
            egress = _l2_egress(config, self.ifname)
            if egress is not None:
                program.set_l2_egress(*egress)
        except BaseException:
            program.close()
            raise
        return program

    def _attach(self, program: XdpProgram) -> tuple[int, str]:
        ifindex = socket.if_nametoindex(self.ifname)
        try:
            return xdp_link_create(program.prog_fd, ifindex, XDP_FLAGS_DRV_MODE), "native"
        except BpfError as native:
            try:
                fd = xdp_link_create(program.prog_fd, ifindex, XDP_FLAGS_SKB_MODE)
            except BpfError as exc:
                raise RunError(
                    f"attaching the XDP program to {self.ifname} failed: {exc}",
                    "is another XDP program attached there? (ip link show dev"
                    f" {self.ifname}; detach it with ip link set dev {self.ifname} xdp off)",
                ) from None
            self.ctx.warn(
                f"{self.ifname}: no native XDP ({native.strerror}): attached in generic"
                " (skb) mode, which runs after the kernel built the skb and is slower"
            )
            return fd, "generic"

    def teardown(self) -> list[str]:
        removed: list[str] = []
        if self.link_fd >= 0:
            try:
                link_detach(self.link_fd)
            except BpfError:
                pass  # the interface is gone: so is the attachment
            os.close(self.link_fd)
            self.link_fd = -1
            removed.append(f"xdp program on {self.ifname} ({self.mode})")
        if self.program is not None:
            where = str(self.program.dir)
            self.program.close()
            self.program = None
            removed.append(f"pinned {where}")
        if self._filter:
            removed += remove(self.config.lb.instance)
            self._filter = False
        return removed

    # --- changes ------------------------------------------------------------------

    def apply_pool_change(self, vip: str, pool: BackendPool) -> str:
        """Build the VIP's new table whole, then swap it in (one map-in-map update)."""
        if self.program is None:
            raise RunError("the xdp plane is not installed", "restart `v6lb run`")
        index, base = self.layout[vip]
        try:
            self.program.set_table(index, table_values(pool, base))
        except BpfError as exc:
            raise RunError(
                f"table swap of {vip} failed: {exc}", "see the log; retried on the next change"
            ) from None
        return f"table swapped ({len(pool)} backends, one map-in-map update)"

    def stage(self, config: Config) -> Staged:
        """A reload: a new generation of the program and maps; the link switches to it."""
        check_lb_host(config)
        if tuple(config.lb.interfaces[:1]) != (self.ifname,):
            raise RunError(
                f"{config.source}: lb.interfaces[0] changed from {self.ifname}",
                "restart `v6lb run` to attach to another interface",
            )
        macs = _learned_macs(config, self.ifname)
        services = dsr_services(config, macs)
        _check_maps(config, services)
        _check_routes(config, services, self.ifname)

        def commit() -> str:
            old = self.program
            assert old is not None
            self.gen += 1
            try:
                new = self._load(config, services)  # the pools as the daemon marked them
            except BaseException:
                self.gen -= 1
                raise
            try:
                link_update(self.link_fd, new.prog_fd)
                obj_pin(self.link_fd, str(new.dir / "link"))
                apply_nft(render_forward_nft(config, (), plane=self.name))
            except BaseException:
                try:  # back to the running program if the switch was made
                    link_update(self.link_fd, old.prog_fd)
                except BpfError:
                    pass
                self.gen -= 1
                new.close()
                raise
            for k, n in old.counters().items():
                self.carried[k] = self.carried.get(k, 0) + n
            for k, (a, b) in self._icmp(old).items():
                was = self.carried_icmp.get(k, (0, 0))
                self.carried_icmp[k] = (was[0] + a, was[1] + b)
            old.close()
            self.program, self.config, self.services = new, config, services
            self.macs = macs
            self.layout = _layout(services)
            return f": {len(self.layout)} VIP(s), program generation {self.gen}"

        return Staged({s.name: s.pool for s in served(services)}, commit)

    def tick(self, now: float) -> float | None:
        """Follow the learned dsr-l2 MACs: a changed neighbour entry rewrites its backends'."""
        if not any(_learned(self.config)) or self.program is None:
            return None
        if now >= self._next_neigh:
            self._next_neigh = now + PROBE_ROUTE_CHECK
            self._refresh_macs()
        return self._next_neigh

    def _refresh_macs(self) -> None:
        assert self.program is not None
        wanted = {str(a) for a, _ in _learned(self.config)}
        changed = {a: m for a, m in neighbour_macs(wanted).items() if self.macs.get(a) != m}
        if not changed:
            return  # an entry gone (or FAILED) keeps the MAC last learned
        for addr, index in _learned(self.config, self.layout):
            mac = changed.get(str(addr))
            if mac is not None:
                self.program.set_l2_mac(index, mac)
        for addr, mac in sorted(changed.items()):
            old = self.macs.get(addr)
            self.macs[addr] = mac
            self.ctx.log(
                f"dsr-l2 backend {addr}: MAC {_mac_text(old) if old else 'unknown'}"
                f" -> {_mac_text(mac)} (neighbour table)"
            )

    # --- status -------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """The program's per-CPU counters summed, with those of replaced generations."""
        out = dict(self.carried)
        if self.program is not None:
            for k, n in self.program.counters().items():
                out[k] = out.get(k, 0) + n
        return out

    def _icmp(self, program: XdpProgram) -> dict[str, tuple[int, int]]:
        """ICMPv6 errors of ``program``: by VIP name and by ``npt<i>`` (the config's pairs)."""
        vips, pairs = program.icmp_counts()
        out = {name: vips[index] for name, (index, _) in self.layout.items()}
        out.update((f"npt{i}", pairs[i]) for i in range(len(self.config.npt)))
        return out

    def status(self) -> PlaneStatus:
        counts = self.counters()
        names = set(_pass_names())
        engine: dict[str, Any] = {"forwarded": counts.get("tx", 0), "replies": 0}
        for k, n in sorted(counts.items()):
            if k == "tx":
                continue
            engine[f"pass.{k.removeprefix('pass-')}" if k in names else f"drop.{k}"] = n
        try:
            counted = nft_counters(self.config.lb.instance)
        except KernelError:  # a status request must never stop the data plane
            counted = None
        out = PlaneStatus()
        icmp = dict(self.carried_icmp)
        if self.program is not None:
            for k, (a, b) in self._icmp(self.program).items():
                was = icmp.get(k, (0, 0))
                icmp[k] = (was[0] + a, was[1] + b)
        out.icmp = {
            name: IcmpErrors(forwarded=a, unmatched=b)
            for name, (a, b) in icmp.items()
            if name in self.layout
        }
        for i in range(len(self.config.npt)):
            translated, unmatched = icmp.get(f"npt{i}", (0, 0))
            out.npt_icmp.append(IcmpErrors(translated=translated, unmatched=unmatched))
        out.details = {
            "xdp": {
                "interface": self.ifname,
                "mode": self.mode,
                "pinned": str(self.program.dir) if self.program else None,
                "generation": self.gen,
                "counters": counts,
            },
            "engine": {"xdp": {"counters": engine}},
        }
        if counted is not None:  # the forward filter's counters (docs/nat.md)
            out.details["forward"] = limits_status(self.config, counted, count=None)["forward"]
        return out

    def in_flight(self) -> int:
        """A graceful stop: packets the program handled since the last look."""
        now = time.monotonic()
        last = self._flight
        if last is not None and now - last[0] < _QUIET_WINDOW:
            return last[2]
        host = ("pass-not-ipv6", "pass-not-vip")  # the host's own traffic (ND ...)
        total = sum(n for k, n in self.counters().items() if k not in host)
        busy = 1 if last is None else total - last[1]
        self._flight = (now, total, busy)
        return busy


_KERNEL_FIX: Final = "the xdp data plane needs Linux 5.10 or later with BPF (CONFIG_BPF_SYSCALL)"


def _pass_names() -> list[str]:
    from v6lb.engines.xdp.program import counter_names

    return [n for n in counter_names().values() if n.startswith("pass-")]


def _check_kernel() -> None:
    """bpf(2) as this process, and the map-in-map tables (BPF_F_INNER_MAP, Linux 5.10)."""
    try:
        Map.create_array("v6lb_probe", 4, 1, BPF_F_INNER_MAP).close()
    except BpfError as exc:
        raise RunError(f"this kernel refuses the XDP program's maps: {exc}", _KERNEL_FIX) from None


def _driver(ifname: str) -> str:
    try:
        return os.path.basename(os.readlink(f"/sys/class/net/{ifname}/device/driver"))
    except OSError:
        pass
    r = run_tool(["ip", "-d", "-j", "link", "show", "dev", ifname], netns=None)
    try:
        info = json.loads(r.stdout or "[]")[0].get("linkinfo", {})
    except (ValueError, IndexError, AttributeError):
        return ""
    return str(info.get("info_kind", ""))


def _mac_text(mac: bytes) -> str:
    return mac.hex(":")


def _learned(
    config: Config, layout: Mapping[str, tuple[int, int]] | None = None
) -> list[tuple[Any, int]]:
    """The dsr-l2 backends without ``mac:``: (address, global backend index in ``layout``)."""
    out = []
    for v in config.vips:
        if v.mode is not VipMode.DSR_L2:
            continue
        base = layout[v.name][1] if layout is not None and v.name in layout else -1
        for j, b in enumerate(v.backends):
            if b.mac is None:
                out.append((b.address, base + j if base >= 0 else -1))
    return out


def _learned_macs(config: Config, ifname: str) -> dict[str, bytes]:
    """The dsr-l2 backends' MACs from the neighbour table (the python plane's way).

    Also checks the dsr-l2 placement: every backend on the egress link (:func:`_route`).
    """
    l2 = dsr_l2_links(config)
    if l2 is None:
        return {}
    egress = l2[1]
    for v in config.vips:
        if v.mode is not VipMode.DSR_L2:
            continue
        for k, b in enumerate(v.backends):
            dev, via = _route(str(b.address))
            if dev != egress or via:
                raise RunError(
                    f"{config.source}: vips.{v.name}.backends[{k}]: the xdp data plane hands"
                    f" dsr-l2 frames to {b.address} on {egress} (the dsr-l2 egress link:"
                    " lb.interfaces[1], or [0] when the LB is one-armed), but this host"
                    f" routes {b.address} {f'via {via} ' if via else ''}on {dev or 'nothing'}",
                    f"put the backend on {egress}'s link, or name its link second in lb.interfaces",
                )
    if not any(_learned(config)):
        return {}
    facts = l2_facts(config)
    return dict(facts.macs) if facts is not None else {}


def _l2_egress(config: Config, ifname: str) -> tuple[int, bytes] | None:
    """dsr-l2's egress (ifindex, MAC) when it is not ``ifname`` (else XDP_TX: None)."""
    l2 = dsr_l2_links(config)
    if l2 is None or l2[1] == ifname:
        return None
    links = nft_json(run_tool(["ip", "-j", "link", "show", "dev", l2[1]], netns=None))
    mac = str(links[0].get("address") or "") if links else ""
    if not mac:
        raise RunError(
            f"{config.source}: lb.interfaces: {l2[1]} has no link-layer address here",
            "name the dsr-l2 egress link (an Ethernet device) in lb.interfaces",
        )
    return socket.if_nametoindex(l2[1]), bytes.fromhex(mac.replace(":", ""))


def _route(addr: str) -> tuple[str | None, str | None]:
    """(device, gateway) of this host's route to ``addr`` (None, None: no route)."""
    r = run_tool(["ip", "-6", "-j", "route", "get", addr], netns=None)
    try:
        route = json.loads(r.stdout or "[]")[0]
        return route.get("dev"), route.get("gateway")
    except (ValueError, IndexError, AttributeError):
        return None, None


def _check_routes(config: Config, services: list[DsrService], ifname: str) -> None:
    """Tunnels and npt inside prefixes are routed out of ``ifname`` (XDP_TX sends there).

    A tunnel's outer destination: out of ``ifname``. An npt pair's inside prefix: via a
    router on ``ifname`` (the inside hosts' packets must come from a router too: the
    program sends the translated packet back to the MAC it came from).
    """
    for i, pair in enumerate(config.npt):
        inside = str(pair.inside.network_address)
        dev, via = _route(inside)
        if dev != ifname or not via:
            raise RunError(
                f"{config.source}: npt[{i}].inside: the xdp data plane sends a translated"
                f" packet back out of {ifname} (XDP_TX, to the router that delivered it), so"
                f" both prefixes must be behind a router there, but this host routes"
                f" {pair.inside} {f'via {via} ' if via else ''}on {dev or 'nothing'}",
                f"route {pair.inside} via a router on {ifname} (the one-armed placement,"
                " docs/dataplane-xdp.md), or use --dataplane kernel",
            )
    seen: set[bytes] = set()
    for s in served(services):
        if s.mode == str(VipMode.DSR_L2):
            continue  # the backends' MACs: _learned_macs
        for target in s.targets:
            if target in seen:
                continue
            seen.add(target)
            addr = socket.inet_ntop(socket.AF_INET6, target)
            dev, _ = _route(addr)
            if dev != ifname:
                raise RunError(
                    f"{config.source}: vips.{s.name}: the xdp data plane sends the tunnel to"
                    f" {addr} back out of {ifname} (XDP_TX, to the router that delivered the"
                    f" packet), but this host routes {addr} via {dev or 'nothing'}",
                    f"route {addr} via a router on {ifname} (the one-armed DSR placement),"
                    " or use --dataplane kernel",
                )
