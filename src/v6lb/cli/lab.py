"""`v6lb lab up|down|status|exec|trace|failover|diff`: the namespace lab."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from v6lb.cli.common import add_lab_failure, add_plane_options, one_file, wide_console
from v6lb.cli.tables import print_explanation
from v6lb.errors import CommandLineError
from v6lb.model.modes import modes_where


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
    add_plane_options(up, dataplane_help="L3/L4 data plane of the LB nodes")
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
    tr.add_argument("file", metavar="FILE", nargs="?", help="--mode anycast: the file to build")
    tr.add_argument("--file", dest="file_opt", metavar="FILE", help="the same as FILE (an alias)")
    tr.add_argument("--name", help="lab name (default: FILE's, the only lab up; anycast: fo<pid>)")
    tr.add_argument(
        "--mode",
        required=True,
        choices=[*modes_where(test=lambda m: bool(m.engines)), "anycast"],
        help="the mode whose VIP to trace; anycast builds FILE's two-site lab",
    )
    add_lab_failure(tr, "none", "--mode anycast: none (default) or", default="none")
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
        "100 ms), repairs it, and prints the table of docs/anycast.md. Removes the lab after. "
        "A failure FILE's layout cannot run is refused (all: skipped), saying why.",
    )
    fo.add_argument(
        "file", metavar="FILE", help="examples/anycast-sites.yaml or examples/eks-ipv6.yaml"
    )
    add_lab_failure(fo, "all", "repeat for several; all (default) or", action="append")
    fo.add_argument("--name", help="lab name, [a-z0-9]{1,12} (default: fo<pid>)")
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
    df.add_argument("file", metavar="FILE", nargs="?", help="the file the lab was built from")
    df.add_argument("--name", help="lab name (default: FILE's, or the only lab up)")
    df.add_argument(
        "--mode",
        required=True,
        choices=modes_where(test=lambda m: bool(m.engines)),
        help="the mode whose trace to compare (the proxies' are refused, with why)",
    )
    df.add_argument("--from", dest="trace_dir", metavar="DIR", help="a `lab trace --out` dir")
    df.set_defaults(func=_cmd_lab)


def _cmd_lab(args: argparse.Namespace) -> int:
    # a LabError (no such lab, bad name, not root) is a usage error: v6lb.cli.exit_code
    if args.lab_command == "trace" and args.mode == "anycast":
        from v6lb.lab.anycast_trace import lab_trace_anycast

        return lab_trace_anycast(
            one_file(args.file, args.file_opt, "--file"),
            failure=args.failure,
            as_json=args.json,
            name=args.name,
        )
    if args.lab_command == "failover":
        from v6lb.lab.failover import lab_failover

        return lab_failover(
            args.file,
            failures=args.failure or (),
            rounds=args.rounds,
            flows=args.flows,
            after_s=args.after,
            as_json=args.json,
            name=args.name,
        )
    action: Callable[[argparse.Namespace], int] = _ACTIONS[args.lab_command]
    return action(args)


def _lab_up(args: argparse.Namespace) -> int:
    from v6lb.lab.netns import lab_up, resolve_name

    name = resolve_name(args.name, args.file)
    state = lab_up(args.file, name, proxy=args.proxy, dataplane=args.dataplane)
    lbs = ", ".join(state.get("lbs", {})) or "none"
    sys.stdout.write(
        f"lab {name} is up: {len(state['nodes'])} nodes, LB nodes: {lbs}\n"
        f"  v6lb lab exec --name {name} NODE -- CMD;  v6lb lab down --name {name}\n"
    )
    return 0


def _lab_down(args: argparse.Namespace) -> int:
    from v6lb.lab.netns import lab_down, resolve_name

    if args.file is None and args.name is None:
        raise CommandLineError("say which lab: v6lb lab down FILE, or --name NAME")
    name = resolve_name(args.name, args.file)
    done = lab_down(name)
    sys.stdout.write(f"lab {name}: " + ("removed" if done else "nothing to remove") + "\n")
    return 0


def _lab_status(args: argparse.Namespace) -> int:
    import json

    from v6lb.lab.netns import lab_status, list_labs, resolve_name
    from v6lb.render.status import lab_status_text

    if args.file is None and args.name is None and len(list_labs()) != 1:
        labs = list_labs()
        sys.stdout.write(("labs: " + ", ".join(labs) if labs else "no lab is up") + "\n")
        return 0
    st = lab_status(resolve_name(args.name, args.file))
    if args.json:
        sys.stdout.write(json.dumps(st, indent=2) + "\n")
        return 0
    sys.stdout.write(lab_status_text(st))
    return 0


def _lab_exec(args: argparse.Namespace) -> int:
    from v6lb.lab.netns import lab_exec, resolve_name

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return lab_exec(resolve_name(args.name, None), args.node, cmd)


def _lab_trace(args: argparse.Namespace) -> int:
    from v6lb.lab.netns import resolve_name
    from v6lb.lab.trace import explain_trace, run_trace

    name = resolve_name(args.name, one_file(args.file, args.file_opt, "--file"))
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
    from v6lb.lab.sim_diff import diff_trace

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")

    from v6lb.lab.plan import default_name

    name = args.name if args.name or args.file is None else default_name(args.file)
    r = diff_trace(name, args.mode, Path(args.trace_dir) if args.trace_dir else None, say=say)
    labels = ", ".join(f"{lbl} = {p}" for p, lbl in r.lab_ports.items())
    how = (
        f"the same client ports, {labels}" if r.same_ports else f"client ports normalised: {labels}"
    )
    captured, predicted = r.captured, r.predicted
    say(
        f"lab {r.name} {r.mode}: {sum(len(t) for t in captured.values())} captured tuples on"
        f" {len(captured)} links vs {sum(len(t) for t in predicted.values())} predicted on"
        f" {len(predicted)} links ({how}; trace {r.where})"
    )
    for link in sorted(set(predicted) | set(captured)):
        for t in sorted(predicted.get(link, set()) & captured.get(link, set())):
            say(f"  same  {link}: {t}")
    for d in r.diffs:
        say(f"  DIFF  {d}")
    say("no differences" if not r.diffs else f"{len(r.diffs)} difference(s)")
    return 1 if r.diffs else 0


_ACTIONS = {
    "up": _lab_up,
    "down": _lab_down,
    "status": _lab_status,
    "exec": _lab_exec,
    "trace": _lab_trace,
    "diff": _lab_diff,
}


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_lab(sub)
