"""`v6lb lab up|down|status|exec|trace|failover|diff`: the namespace lab."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from v6lb.cli.common import load_scenario, wide_console
from v6lb.cli.tables import print_explanation
from v6lb.errors import UsageError


def _add_lab(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lab",
        help="build the file's topology in network namespaces and run v6lb in it (root)",
        description="`up` builds one namespace per topology node (v6lb-NAME-NODE), one bridge "
        "per link, addresses, routes and forwarding; runs `v6lb run` on the LB nodes, `v6lb "
        "backend` on DSR backends and an HTTP server on every backend. `down` removes all of "
        "it (idempotent). `status` shows nodes, processes and each LB's status. `exec NODE -- "
        "CMD` runs CMD in a node's namespace. See docs/lab.md.",
    )
    lsub = p.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    up = lsub.add_parser("up", help="build the lab from FILE's topology: section")
    up.add_argument("file", metavar="FILE", help="the v6lb YAML config file (with topology:)")
    up.add_argument(
        "--dataplane", choices=["kernel", "python"], default="kernel", help="default kernel"
    )
    up.add_argument(
        "--proxy",
        choices=["builtin", "haproxy"],
        default=None,
        help="proxy engine for the proxy-l4/proxy-l7 VIPs (default builtin)",
    )
    up.add_argument("--name", help="lab name, [a-z0-9]{1,12} (default: from FILE's name)")
    up.set_defaults(func=_cmd_lab)
    down = lsub.add_parser("down", help="remove a lab: processes, namespaces, links (idempotent)")
    down.add_argument("file", metavar="FILE", nargs="?", help="the file the lab was built from")
    down.add_argument("--name", help="lab name (default: from FILE's name)")
    down.set_defaults(func=_cmd_lab)
    st = lsub.add_parser("status", help="nodes, processes, and each LB's `v6lb status`")
    st.add_argument("file", metavar="FILE", nargs="?", help="the file the lab was built from")
    st.add_argument("--name", help="lab name (default: FILE's, or the only lab up)")
    st.add_argument("--json", action="store_true", help="print the lab's state as JSON")
    st.set_defaults(func=_cmd_lab)
    ex = lsub.add_parser("exec", help="run a command in a node's namespace: exec NODE -- CMD")
    ex.add_argument("--name", help="lab name (default: the only lab up)")
    ex.add_argument("node", metavar="NODE")
    ex.add_argument("cmd", metavar="CMD", nargs=argparse.REMAINDER)
    ex.set_defaults(func=_cmd_lab)
    tr = lsub.add_parser(
        "trace",
        help="capture every link while the client sends real requests to a mode's VIP",
        description="Runs tcpdump on every bridge port of the lab (one pcap per link), sends a "
        "GET and a POST larger than the path MTU with curl from the client to the VIP of "
        "--mode, then prints the hop table and answers of `v6lb explain` built from the "
        "captures. See docs/lab.md.",
    )
    tr.add_argument("--name", help="lab name (default: the only lab up)")
    tr.add_argument(
        "--mode",
        required=True,
        help="nat, npt, dsr-l2, dsr-ip6ip6, dsr-srv6, proxy-l4, proxy-l7, or anycast (with --file)",
    )
    tr.add_argument("--file", metavar="FILE", help="--mode anycast: the two-site file to build")
    tr.add_argument(
        "--failure",
        default="none",
        help="--mode anycast: none, kill-instance, site-backends or site-uplink (default none)",
    )
    tr.add_argument("--out", metavar="DIR", help="where the pcaps go (default: the lab dir)")
    tr.add_argument("--json", action="store_true", help="print the explanation as JSON")
    tr.add_argument("--all-hops", action="store_true", help="show every captured packet")
    tr.set_defaults(func=_cmd_lab)
    fo = lsub.add_parser(
        "failover",
        help="build FILE's two-site anycast lab and measure failures under traffic (root)",
        description="Builds the topology of FILE (upstream router, site routers with BIRD, "
        "LB instances running `v6lb run` with BGP+BFD, backends) in namespaces, runs each "
        "--failure under continuous traffic (long-lived connections plus a new one every "
        "100 ms), repairs it, and prints the table of docs/anycast.md. Removes the lab after.",
    )
    fo.add_argument("file", metavar="FILE", help="for example examples/anycast-sites.yaml")
    fo.add_argument(
        "--failure",
        action="append",
        choices=["kill-instance", "site-backends", "site-uplink", "all"],
        help="repeat for several (default: all)",
    )
    fo.add_argument("--rounds", type=int, default=1, help="runs of each failure (default 1)")
    fo.add_argument("--flows", type=int, default=30, help="long-lived connections (default 30)")
    fo.add_argument(
        "--after", type=float, default=3.0, help="seconds of traffic after each failure"
    )
    fo.add_argument("--json", action="store_true", help="print every figure as JSON")
    fo.set_defaults(func=_cmd_lab)
    df = lsub.add_parser(
        "diff",
        help="compare a lab trace with the simulator, link by link; exit 1 on a difference",
        description="Replays the captured client ports in the simulator and compares, per "
        "link, the (source, destination, ports) of every packet it predicts with those "
        "captured. Uses the trace in --from (default: the lab dir's trace of --mode, taken "
        "now if there is none). Exit 1 when they differ or a pcap is missing or empty.",
    )
    df.add_argument("--name", help="lab name (default: the only lab up)")
    df.add_argument("--mode", required=True, help="nat, npt, dsr-l2, dsr-ip6ip6 or dsr-srv6")
    df.add_argument("--from", dest="trace_dir", metavar="DIR", help="a `lab trace --out` dir")
    df.set_defaults(func=_cmd_lab)


def _cmd_lab(args: argparse.Namespace) -> int:
    import json

    from v6lb.lab.netns import lab_down, lab_exec, lab_status, lab_up, list_labs, resolve_name
    from v6lb.lab.plan import LabError

    try:
        if args.lab_command == "up":
            name = resolve_name(args.name, args.file)
            state = lab_up(args.file, name, proxy=args.proxy, dataplane=args.dataplane)
            lbs = ", ".join(state.get("lbs", {})) or "none"
            sys.stdout.write(
                f"lab {name} is up: {len(state['nodes'])} nodes, LB nodes: {lbs}\n"
                f"  v6lb lab exec --name {name} NODE -- CMD;  v6lb lab down --name {name}\n"
            )
            return 0
        if args.lab_command == "down":
            if args.file is None and args.name is None:
                raise UsageError("say which lab: v6lb lab down FILE, or --name NAME")
            name = resolve_name(args.name, args.file)
            done = lab_down(name)
            sys.stdout.write(f"lab {name}: " + ("removed" if done else "nothing to remove") + "\n")
            return 0
        if args.lab_command == "status":
            if args.file is None and args.name is None and len(list_labs()) != 1:
                labs = list_labs()
                sys.stdout.write(("labs: " + ", ".join(labs) if labs else "no lab is up") + "\n")
                return 0
            st = lab_status(resolve_name(args.name, args.file))
            if args.json:
                sys.stdout.write(json.dumps(st, indent=2) + "\n")
                return 0
            sys.stdout.write(_lab_status_text(st))
            return 0
        if args.lab_command == "trace" and args.mode == "anycast":
            from v6lb.lab.anycast_trace import lab_trace_anycast

            return lab_trace_anycast(args)
        if args.lab_command == "failover":
            from v6lb.lab.failover import lab_failover

            return lab_failover(args)
        if args.lab_command == "trace":
            return _lab_trace(args)
        if args.lab_command == "diff":
            return _lab_diff(args)
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        return lab_exec(resolve_name(args.name, None), args.node, cmd)
    except LabError as exc:
        raise UsageError(str(exc)) from None


def _lab_trace(args: argparse.Namespace) -> int:
    from v6lb.lab.netns import resolve_name
    from v6lb.lab.trace import explain_trace, run_trace

    name = resolve_name(args.name, None)
    trace = run_trace(name, args.mode, Path(args.out) if args.out else None)
    exp = explain_trace(trace)
    if args.json:
        sys.stdout.write(exp.to_json() + "\n")
        return 0
    console = wide_console()
    print_explanation(console, exp, max_rows=10_000, compact=not args.all_hops)
    for link, fname in trace.meta["links"].items():
        n = trace.packets.get(link, -1)
        sys.stdout.write(f"pcap {trace.dir / fname}: {n} packets (link {link})\n")
    return 0


def _lab_diff(args: argparse.Namespace) -> int:
    from v6lb.engines.sim.scenario import run_scenario
    from v6lb.lab.netns import resolve_name
    from v6lb.lab.trace import TRACE_FILE, default_location, load_trace, run_trace, trace_hops
    from v6lb.model.diff import Snat, Tuple4, compare, link_tuples

    if args.mode in ("proxy-l4", "proxy-l7"):
        raise UsageError(
            f"lab diff does not compare {args.mode} yet: the proxy's backend connection has"
            " its own ephemeral port and scheduler state, which the simulator does not replay;"
            f" use `v6lb lab trace --mode {args.mode}` and `v6lb explain --mode {args.mode}`"
        )
    name = resolve_name(args.name, None)
    where, prefix = (
        (Path(args.trace_dir), "") if args.trace_dir else default_location(name, args.mode)
    )
    if not (where / f"{prefix}{TRACE_FILE}").exists() and not args.trace_dir:
        sys.stdout.write(f"no trace of {args.mode} yet: tracing into {where}/{prefix}*\n")
        run_trace(name, args.mode, where, prefix=prefix)
    trace = load_trace(where, prefix)
    meta = trace.meta
    if meta["mode"] != args.mode:
        raise UsageError(f"{where} is a trace of {meta['mode']}, not {args.mode}")
    config, topo = load_scenario(meta["file"])
    snat = Snat(*meta["snat"]) if meta.get("snat") else None
    client = meta["client"]
    lab_ports = {p: f"C{k}" for k, p in enumerate(meta["client_ports"], 1)}
    captured = link_tuples(trace_hops(trace), client=client, client_ports=lab_ports, snat=snat)
    predicted: dict[str, set[Tuple4]] = {}
    inverse = pow(7919, -1, 20000)  # the simulator's client port is 40000 + seed*7919 % 20000
    same = True
    for port, label in lab_ports.items():
        seed = ((port - 40000) * inverse) % 20000 or 20000
        res = run_scenario(config, topo, args.mode, seed=seed)
        first = next(h for h in res.hops if h.pkt.innermost.src.addr == client)
        sim_port = first.pkt.innermost.src.port or 0
        same = same and sim_port == port
        for link, tuples in link_tuples(
            res.hops, client=client, client_ports={sim_port: label}, snat=snat
        ).items():
            predicted.setdefault(link, set()).update(tuples)
    diffs = compare(predicted, captured, pcap_sizes=trace.packets)
    labels = ", ".join(f"{lbl} = {p}" for p, lbl in lab_ports.items())
    how = f"the same client ports, {labels}" if same else f"client ports normalised: {labels}"
    sys.stdout.write(
        f"lab {name} {args.mode}: {sum(len(t) for t in captured.values())} captured tuples on"
        f" {len(captured)} links vs {sum(len(t) for t in predicted.values())} predicted on"
        f" {len(predicted)} links ({how}; trace {where})\n"
    )
    for link in sorted(set(predicted) | set(captured)):
        for t in sorted(predicted.get(link, set()) & captured.get(link, set())):
            sys.stdout.write(f"  same  {link}: {t}\n")
    for d in diffs:
        sys.stdout.write(f"  DIFF  {d}\n")
    sys.stdout.write(("no differences" if not diffs else f"{len(diffs)} difference(s)") + "\n")
    return 1 if diffs else 0


def _lab_status_text(st: dict[str, object]) -> str:
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
                    f" {health}"
                )
            for pair in s.get("npt", []):
                out.append(f"    NPT {pair['inside']} <-> {pair['outside']}")
    leftovers = st.get("leftover_netns")
    if isinstance(leftovers, list):
        out += [f"  leftover namespace {ns}" for ns in leftovers]
    return "\n".join(out) + "\n"


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_lab(sub)
