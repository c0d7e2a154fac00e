"""The text of `v6lb status` and `v6lb lab status` (pure: typed status in, lines out).

:func:`status_lines` renders a :class:`~v6lb.model.status.InstanceStatus` (the
instance, its L3 VIPs and backends, NPT pairs, the forward filter and conntrack
bounds, the proxy engine's VIPs, the kernel objects, BGP and conntrack sync).
:func:`lab_status_text` renders the summary `v6lb lab status` builds from each LB's
answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from v6lb.model.status import IcmpErrors, InstanceStatus, ProxySection

__all__ = ["lab_status_text", "proxy_status_lines", "status_lines", "status_text"]


def status_text(st: InstanceStatus) -> str:
    """What `v6lb status` prints."""
    return "\n".join(status_lines(st)) + "\n"


def status_lines(st: InstanceStatus) -> list[str]:
    proxy = st.proxy
    engines = [f"{st.dataplane} data plane"] if st.dataplane else []
    if proxy is not None:
        engines.append(f"proxy engine {proxy.engine}")
    out = [
        f"instance {st.instance} (pid {st.pid}, {', '.join(engines)},"
        f" netns {st.netns or '-'}) file {st.file}",
    ]
    if st.dataplane:
        out.append(
            f"up {st.uptime_s} s, reloads {st.reloads},"
            f" map updates {st.map_updates}, last error: {st.last_error or 'none'}"
        )
    else:
        out.append(f"up {st.uptime_s} s")
    for vip in st.vips:
        c = vip.counter
        out.append(
            f"VIP {vip.name} {vip.mode} [{vip.address}]:{','.join(map(str, vip.ports))}"
            f"/{vip.protocol}  counter {c.name}: {c.packets} packets {c.bytes} bytes"
        )
        # dsr: the one direction is the counter above
        counted = {d: t for d, t in (vip.traffic or {}).items() if t.name != c.name}
        traffic = [f"{d} {t.packets} packets {t.bytes} bytes" for d, t in counted.items()]
        flows = _flows(vip.new_flows, vip.active_flows)
        if traffic or flows:
            shown = (f"traffic: {', '.join(traffic)}" if traffic else "", flows)
            out.append("  " + "; ".join(x for x in shown if x))
        if vip.icmp_errors is not None:
            out.append(f"  ICMPv6 errors: {_icmp(vip.icmp_errors)}")
        for b in vip.backends:
            port = f":{b.port}" if b.port else ""
            flows = _flows(b.new_flows, b.active_flows)
            if b.packets is not None:
                flows = "; ".join(x for x in (flows, f"{b.packets} packets sent") if x)
            out.append(
                f"  [{b.address}]{port} weight {b.weight}{' drain' if b.drain else ''}"
                f"{'' if b.enabled else ' DISABLED'}"
                f"  {b.health.upper()}  {b.slots} slots  probe {b.probe}"
                + (f"  {flows}" if flows else "")
                + (f"  ctl: {b.override}" if b.override else "")
            )
    for pair in st.npt:
        icmp = f"  ICMPv6 errors: {_icmp(pair.icmp_errors)}" if pair.icmp_errors else ""
        out.append(f"NPT {pair.inside} <-> {pair.outside}{icmp}")
    if st.forward:  # docs/nat.md "Not an open relay"
        out.append(
            "forward filter: "
            + ", ".join(f"{k.removeprefix('forward_')} {v}" for k, v in st.forward.items())
        )
    ct = st.conntrack
    if ct is not None and (ct.conntrack is not None or ct.conntrack_full):
        live = ct.conntrack
        out.append(
            f"conntrack: {'?' if live is None else live} of {ct.conntrack_max} nat flows,"
            f" {ct.conntrack_full} new flows dropped at the bound"
            + (
                f", {ct.nat_unsynced} mid-stream packets held for the peer's sync"
                if ct.nat_unsynced is not None
                else ""
            )
        )
    out += proxy_status_lines(proxy)
    served = {v.name for v in proxy.vips} if proxy is not None else set()
    for line in st.skipped:
        if line.split(" ", 1)[0] not in served:  # skipped by the kernel, run by the proxy
            out.append(f"skipped: {line}")
    xdp = st.extra.get("xdp")
    if isinstance(xdp, dict):  # the xdp plane: its attachment, its per-CPU counters summed
        out.append(
            f"xdp: program on {xdp.get('interface')} ({xdp.get('mode')}),"
            f" generation {xdp.get('generation')}, pinned {xdp.get('pinned')}"
        )
        counts = xdp.get("counters") or {}
        out.append(
            "  counters: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none yet")
        )
    k = st.kernel
    if k is not None:
        out.append("kernel objects:")
        for key in k.LISTS:
            for item in getattr(k, key):
                out.append(f"  {key.removesuffix('s').replace('_', ' ')}: {item}")
        for name, counter in k.nft_counters.items():
            out.append(f"  nft counter {name}: {counter.packets} packets {counter.bytes} bytes")
    bgp = st.bgp
    if bgp is not None:
        alive = "running" if bgp.bird_alive else "NOT running"
        out.append(f"bgp: AS {bgp.asn}, bird {alive} (pid {bgp.bird_pid})")
        out.append("  announced: " + (", ".join(bgp.announced) or "none"))
        out.append("  withdrawn: " + (", ".join(bgp.withdrawn) or "none"))
        for name, sess in bgp.sessions.items():
            out.append(f"  {sess.proto} {name}: {sess.state} {sess.info}")
    sync = st.conntrack_sync
    if sync is not None:
        alive = "running" if sync.running else "NOT running"
        out.append(
            f"conntrack sync: conntrackd {alive} (pid {sync.pid}),"
            f" [{sync.address}] -> [{sync.peer}]:{sync.port}"
            f" on {sync.interface}, last error: {sync.last_error or 'none'}"
        )
        s = sync.stats
        inj = s.get("injected") or {}
        if inj:
            out.append(
                "  injected from the peer: "
                + ", ".join(f"{k} {v['ok']} (failed {v['failed']})" for k, v in inj.items())
            )
        if "packets_sent" in s:
            out.append(
                f"  sync packets sent {s['packets_sent']}, received {s['packets_received']},"
                f" lost {s.get('lost')}"
            )
    return out


def _flows(new: int | None, active: int | None) -> str:
    """``flows: N new, M active`` with the figures the plane gave ('' for none)."""
    parts = [f"{n} {what}" for n, what in ((new, "new"), (active, "active")) if n is not None]
    return f"flows: {', '.join(parts)}" if parts else ""


def _icmp(e: IcmpErrors) -> str:
    return f"forwarded {e.forwarded}, translated {e.translated}, unmatched {e.unmatched}"


def _lab_icmp(e: Any) -> str:
    return f"; ICMPv6 errors {_icmp(IcmpErrors.from_dict(e))}" if isinstance(e, Mapping) else ""


def _errors(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"


def proxy_status_lines(proxy: ProxySection | None) -> list[str]:
    """The ``proxy`` section of a status answer, one VIP and its backends per block."""
    out: list[str] = []
    if proxy is None:
        return out
    if proxy.state != "running":
        out.append(f"proxy engine {proxy.engine}: {proxy.state}")
    if proxy.error:
        out.append(f"proxy engine error: {proxy.error}")
    theirs = " (HAProxy's counters)" if proxy.engine == "haproxy" else ""
    for vip in proxy.vips:
        ports = ",".join(map(str, vip.ports))
        out.append(
            f"VIP {vip.name} {vip.mode} [{vip.address}]:{ports}/{vip.protocol}"
            f"  scheduler {vip.scheduler}"
        )
        l7 = vip.mode == "proxy-l7"
        if vip.counted:
            requests = f" requests {vip.requests}," if l7 else ""
            out.append(
                f"  connections {vip.connections} (active {vip.active}),{requests}"
                f" bytes in {vip.bytes_in} out {vip.bytes_out}{theirs}"
            )
            out.append(f"  refused/errors: {_errors(vip.errors)}")
            if vip.interim:  # l7 1xx responses (docs/proxy.md)
                out.append(f"  1xx responses: {_errors(vip.interim)}")
            sent = {k: n for k, n in vip.responses.items() if n}
            if sent:  # l7 responses by class
                out.append(f"  responses: {_errors(sent)}")
        for b in vip.backends:
            port = f":{b.port}" if b.port else ""
            line = (
                f"  [{b.address}]{port} weight {b.weight}{' drain' if b.drain else ''}"
                f"{'' if b.enabled else ' DISABLED'}  {str(b.health).upper()}  probe {b.probe}"
            )
            if b.counted:
                line += f"  active {b.active}  connections {b.connections}"
                if l7 and b.requests is not None:
                    line += f"  requests {b.requests}"
                line += f"  errors: {_errors(b.errors)}"
            out.append(line)
    return out


def lab_status_text(st: Mapping[str, Any]) -> str:
    """What `v6lb lab status` prints: nodes, processes, each LB's summary, leftovers."""
    out = [f"lab {st.get('name')} ({st.get('phase')}) from {st.get('file')}"]
    nodes = st.get("nodes")
    if isinstance(nodes, dict):
        for node, info in nodes.items():
            ok = "ok" if info.get("netns_present") else "MISSING"
            addrs = ", ".join(info.get("addresses", []))
            out.append(
                f"  node {node} ({info.get('role')}) netns {info.get('netns')} {ok}  {addrs}"
            )
    procs = st.get("processes")
    if isinstance(procs, list):
        for p in procs:
            alive = "alive" if p.get("alive") else "DEAD"
            out.append(
                f"  process {p['kind']} on {p['node']} pid {p['pid']} {alive}  log {p['log']}"
            )
    lbs = st.get("lbs")
    if isinstance(lbs, dict):
        for node, lb in lbs.items():
            s = lb.get("status", {})
            if "error" in s:
                out.append(f"  LB {node}: status unavailable: {s['error']}")
                continue
            out.append(f"  LB {node}: instance {s.get('instance')}, up {s.get('uptime_s')} s")
            for v in s.get("vips", []):
                health = ", ".join(f"{a} {h}" for a, h in v["backends"].items())
                out.append(
                    f"    VIP {v['name']} {v['mode']} {v['address']}: {v['packets']} packets;"
                    f" {health}{_lab_icmp(v.get('icmp_errors'))}"
                )
            for v in s.get("proxy_vips", []):
                ports = ",".join(str(p) for p in v.get("ports", []))
                out.append(
                    f"    VIP {v['name']} {v['mode']} [{v['address']}]:{ports}"
                    f" ({s.get('proxy_engine')}): {v.get('connections')} connections"
                )
            for pair in s.get("npt", []):
                out.append(
                    f"    NPT {pair['inside']} <-> {pair['outside']}"
                    f"{_lab_icmp(pair.get('icmp_errors'))}"
                )
    leftovers = st.get("leftover_netns")
    if isinstance(leftovers, list):
        out += [f"  leftover namespace {ns}" for ns in leftovers]
    return "\n".join(out) + "\n"
