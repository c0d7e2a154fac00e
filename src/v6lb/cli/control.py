"""`v6lb status` and `v6lb backend`: talk to a running instance, set up a DSR backend."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from v6lb.errors import UsageError


def _add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="ask a running `v6lb run` for its VIPs, backends, health and kernel objects",
        description="Connect to a running instance's control socket (--control-socket, or "
        "lb.control_socket of FILE, or /run/v6lb/lb0.sock) and print its VIPs, backends and "
        "their health, the kernel objects it installed and their packet counters.",
    )
    p.add_argument("file", metavar="FILE", nargs="?", help="config file naming the socket")
    p.add_argument("--control-socket", metavar="PATH", help="the instance's control socket")
    p.add_argument("--json", action="store_true", help="print the instance's JSON answer")
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from v6lb.engines.control import ControlError, query
    from v6lb.model.config import ConfigError, load_config

    path = args.control_socket
    if path is None and args.file is not None:
        try:
            path = load_config(args.file).lb.control_socket
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    path = path or "/run/v6lb/lb0.sock"
    try:
        st = query(path)
    except ControlError as exc:
        sys.stderr.write(f"v6lb: error: {exc}\n")
        return 1
    if args.json:
        sys.stdout.write(json.dumps(st, indent=2) + "\n")
        return 0
    proxy = st.get("proxy") or {}
    engines = [f"{st['dataplane']} data plane"] if st.get("dataplane") else []
    if proxy:
        engines.append(f"proxy engine {proxy.get('engine')}")
    out = [
        f"instance {st.get('instance')} (pid {st.get('pid')}, {', '.join(engines)},"
        f" netns {st.get('netns') or '-'}) file {st.get('file')}",
    ]
    if st.get("dataplane"):
        out.append(
            f"up {st.get('uptime_s')} s, reloads {st.get('reloads')},"
            f" map updates {st.get('map_updates')}, last error: {st.get('last_error') or 'none'}"
        )
    else:
        out.append(f"up {st.get('uptime_s')} s")
    for vip in st.get("vips", []):
        c = vip["counter"]
        out.append(
            f"VIP {vip['name']} {vip['mode']} [{vip['address']}]:{','.join(map(str, vip['ports']))}"
            f"/{vip['protocol']}  counter {c['name']}: {c['packets']} packets {c['bytes']} bytes"
        )
        for b in vip["backends"]:
            port = f":{b['port']}" if b["port"] else ""
            out.append(
                f"  [{b['address']}]{port} weight {b['weight']}{' drain' if b['drain'] else ''}"
                f"  {b['health'].upper()}  {b['slots']} slots  probe {b['probe']}"
            )
    for pair in st.get("npt", []):
        out.append(f"NPT {pair['inside']} <-> {pair['outside']}")
    fwd, ct = st.get("forward"), st.get("conntrack") or {}
    if fwd:  # docs/nat.md "Not an open relay"
        out.append(
            "forward filter: "
            + ", ".join(f"{k.removeprefix('forward_')} {v}" for k, v in fwd.items())
        )
    if ct.get("conntrack") is not None or ct.get("conntrack_full"):
        live = ct.get("conntrack")
        out.append(
            f"conntrack: {'?' if live is None else live} of {ct.get('conntrack_max')} nat flows,"
            f" {ct.get('conntrack_full')} new flows dropped at the bound"
        )
    out += _proxy_status_lines(proxy)
    served = {v.get("name") for v in proxy.get("vips", [])}
    for line in st.get("skipped", []):
        if line.split(" ", 1)[0] not in served:  # skipped by the kernel, run by the proxy
            out.append(f"skipped: {line}")
    k = st.get("kernel", {})
    if k:
        out.append("kernel objects:")
    for key in ("nft_tables", "nft_chains", "nft_maps", "ip6tables_rules", "routes", "rules"):
        for item in k.get(key, []):
            out.append(f"  {key.removesuffix('s').replace('_', ' ')}: {item}")
    for name, c in k.get("nft_counters", {}).items():
        out.append(f"  nft counter {name}: {c['packets']} packets {c['bytes']} bytes")
    bgp = st.get("bgp")
    if bgp:
        alive = "running" if bgp.get("bird_alive") else "NOT running"
        out.append(f"bgp: AS {bgp.get('asn')}, bird {alive} (pid {bgp.get('bird_pid')})")
        out.append("  announced: " + (", ".join(bgp.get("announced", [])) or "none"))
        out.append("  withdrawn: " + (", ".join(bgp.get("withdrawn", [])) or "none"))
        for name, sess in bgp.get("sessions", {}).items():
            out.append(f"  {sess.get('proto')} {name}: {sess.get('state')} {sess.get('info')}")
    sync = st.get("conntrack_sync")
    if sync:
        alive = "running" if sync.get("running") else "NOT running"
        out.append(
            f"conntrack sync: conntrackd {alive} (pid {sync.get('pid')}),"
            f" [{sync.get('address')}] -> [{sync.get('peer')}]:{sync.get('port')}"
            f" on {sync.get('interface')}, last error: {sync.get('last_error') or 'none'}"
        )
        s = sync.get("stats") or {}
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
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def _proxy_status_lines(proxy: dict[str, Any]) -> list[str]:
    """The ``proxy`` section of a status answer, one VIP and its backends per block."""
    out: list[str] = []
    if not proxy:
        return out
    if proxy.get("state") != "running":
        out.append(f"proxy engine {proxy.get('engine')}: {proxy.get('state')}")
    if proxy.get("error"):
        out.append(f"proxy engine error: {proxy['error']}")
    theirs = " (HAProxy's counters)" if proxy.get("engine") == "haproxy" else ""

    def errors(d: dict[str, Any]) -> str:
        e = d.get("errors") or {}
        return ", ".join(f"{k} {n}" for k, n in sorted(e.items())) or "none"

    for vip in proxy.get("vips", []):
        ports = ",".join(map(str, vip.get("ports", [])))
        out.append(
            f"VIP {vip['name']} {vip['mode']} [{vip['address']}]:{ports}/{vip.get('protocol')}"
            f"  scheduler {vip.get('scheduler')}"
        )
        l7 = vip.get("mode") == "proxy-l7"
        if "connections" in vip:
            requests = f" requests {vip['requests']}," if l7 else ""
            out.append(
                f"  connections {vip['connections']} (active {vip['active']}),{requests}"
                f" bytes in {vip['bytes_in']} out {vip['bytes_out']}{theirs}"
            )
            out.append(f"  refused/errors: {errors(vip)}")
            if vip.get("interim"):  # l7 1xx responses (docs/proxy.md)
                out.append(f"  1xx responses: {errors({'errors': vip['interim']})}")
        for b in vip.get("backends", []):
            port = f":{b['port']}" if b.get("port") else ""
            line = (
                f"  [{b['address']}]{port} weight {b['weight']}{' drain' if b['drain'] else ''}"
                f"  {str(b.get('health')).upper()}  probe {b.get('probe')}"
            )
            if "connections" in b:
                line += f"  active {b.get('active')}  connections {b['connections']}"
                if l7 and "requests" in b:
                    line += f"  requests {b['requests']}"
                line += f"  errors: {errors(b)}"
            out.append(line)
    return out


def _add_backend(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "backend",
        help="set up (or --remove) a DSR backend host: VIP on lo, decap SID, advmss (root)",
        description="For the backend with --address in FILE: put each dsr-* VIP it serves on "
        "lo, add an End.DT6 decapsulation route that accepts only the LB's addresses (nft), and "
        "copy the default route(s) with the advmss the tunnel MTU requires. --remove deletes "
        "everything tagged with the file's instance.",
    )
    p.add_argument("file", metavar="FILE", help="the v6lb YAML config file")
    p.add_argument("--address", required=True, metavar="ADDR", help="this backend's address")
    p.add_argument("--dev", metavar="IF", help="interface the tunnelled packets arrive on")
    p.add_argument("--netns", metavar="NS", help="set up inside this named network namespace")
    p.add_argument("--remove", action="store_true", help="remove what a previous setup installed")
    p.set_defaults(func=_cmd_backend)


def _cmd_backend(args: argparse.Namespace) -> int:
    from ipaddress import AddressValueError, IPv6Address

    from v6lb.engines.kernel import ApplyError, KernelError, MissingFeatureError
    from v6lb.engines.kernel.backend import remove_backend, setup_backend
    from v6lb.engines.kernel.host import enter_netns
    from v6lb.model.config import ConfigError, load_config

    try:
        address = IPv6Address(args.address)
    except AddressValueError as exc:
        raise UsageError(f"--address {args.address!r} is not an IPv6 address: {exc}") from None
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        if args.netns:
            enter_netns(args.netns)
        done = (
            remove_backend(config) if args.remove else setup_backend(config, address, dev=args.dev)
        )
    except (ApplyError, MissingFeatureError) as exc:
        sys.stderr.write(f"v6lb: error: {exc}\n")
        return 1
    except KernelError as exc:
        raise UsageError(str(exc)) from None
    verb = "removed" if args.remove else "installed"
    sys.stdout.write("".join(f"{verb}: {line}\n" for line in done) or f"{verb}: nothing\n")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_status(sub)
    _add_backend(sub)
