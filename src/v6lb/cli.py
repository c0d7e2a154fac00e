"""The `v6lb` command line: argument parsing and output formatting only.

Each sub-command has one ``_add_<name>`` function that registers its parser and
one ``_cmd_<name>`` handler. Handlers return the process exit code. Exit code 2
means the caller's input was wrong (bad prefix, bad file); the message names it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from v6lb import MODES

if TYPE_CHECKING:
    from rich.console import Console

    from v6lb.core.nptv6 import NptMapping
    from v6lb.engines.sim.scenario import ScenarioResult
    from v6lb.model.config import Config
    from v6lb.model.explain import Explanation
    from v6lb.model.topology import Topology

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """The caller's input is wrong; printed as ``v6lb: error: ...`` with exit code 2."""


# --- demo ------------------------------------------------------------------


def _default_scenario() -> Path:
    """The embedded default: the IPv6 Kubernetes-style scenario shipped with v6lb."""
    return Path(__file__).resolve().parent / "data" / "eks-ipv6.yaml"


FAILURES = {
    "backend-dies": "nat",
    "lb-instance-dies": "anycast",
    "packet-too-big": "dsr-ip6ip6",
}


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the scenario under every mode: tables, pcaps and an HTML report",
        description="Simulate the IPv6 cluster scenario (client, router, LB with a public VIP, "
        "private nodes and pods) under every mode, print each hop and the answers, compare "
        "the modes, run the failure walk-throughs, and write pcaps and report.html.",
    )
    p.add_argument(
        "--topology", metavar="FILE", help="scenario file (default: the built-in eks-ipv6)"
    )
    p.add_argument(
        "--out", metavar="DIR", default="demo-out", help="output folder (default: demo-out)"
    )
    p.add_argument(
        "--npt-only", action="store_true", help="print only the NPTv6 arithmetic walk-through"
    )
    p.set_defaults(func=_cmd_demo)


def _add_explain(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "explain",
        help="hop-by-hop explanation of one mode (or all) in the simulator",
        description="Run the scenario in the simulator and print, hop by hop, the link, the "
        "source and destination [address]:port and what changed, then answer: did NAT66 happen "
        "at the LB, what source did the backend see, does the reply cross the LB, what state "
        "does the LB keep, how does the client's address reach the application.",
    )
    p.add_argument("--mode", help="one of: " + ", ".join(MODES) + " (default: all)")
    p.add_argument(
        "--topology", metavar="FILE", help="scenario file (default: the built-in eks-ipv6)"
    )
    p.add_argument("--failure", choices=sorted(FAILURES), help="run a failure walk-through instead")
    p.add_argument("--json", action="store_true", help="print the same facts as JSON")
    p.add_argument(
        "--all-hops",
        action="store_true",
        help="show every packet (default: the first packet of each leg in each direction)",
    )
    p.set_defaults(func=_cmd_explain)


def _load_scenario(path: str | None) -> tuple[Config, Topology]:
    from v6lb.model.config import ConfigError
    from v6lb.model.topology import load_topology

    file = Path(path) if path else _default_scenario()
    if not file.is_file():
        raise UsageError(f"{file}: no such file")
    try:
        return load_topology(file)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _run(
    config: Config, topo: Topology, mode: str, failure: str | None = None
) -> tuple[Explanation, ScenarioResult]:
    from v6lb.engines.sim.scenario import run_scenario
    from v6lb.model.explain import explain

    res = run_scenario(config, topo, mode, failure=failure)
    return explain(res.mode, res.hops, res.facts, res.nodes), res


def _modes(config: Config, wanted: str | None) -> list[str]:
    from v6lb.engines.sim.scenario import modes_available

    avail = modes_available(config)
    if wanted is None:
        return avail
    if wanted not in MODES:
        raise UsageError(f"unknown mode {wanted!r}; choose one of: {', '.join(MODES)}")
    if wanted not in avail:
        raise UsageError(
            f"mode {wanted!r} is not configured in this file (it has: {', '.join(avail)}); "
            f"add a VIP with mode {wanted} (or an npt: section, or a bgp: section for anycast)"
        )
    return [wanted]


def _cmd_explain(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    config, topo = _load_scenario(args.topology)
    if args.failure:
        exps = [_run(config, topo, FAILURES[args.failure], args.failure)[0]]
    else:
        exps = [_run(config, topo, m)[0] for m in _modes(config, args.mode)]
    if args.json:
        out = [e.to_dict() for e in exps]
        sys.stdout.write(json.dumps(out[0] if len(out) == 1 else out, indent=2, default=str) + "\n")
        return 0
    console = Console(width=max(160, Console().width), emoji=False, highlight=False)
    for e in exps:
        print_explanation(console, e, max_rows=10_000, compact=not args.all_hops)
    if len(exps) > 1:
        print_comparison(console, exps)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from v6lb.model.walkthrough import npt_walkthrough
    from v6lb.render.report import render_report

    if args.npt_only:
        sys.stdout.write(npt_walkthrough())
        return 0
    config, topo = _load_scenario(args.topology)
    out = Path(args.out)
    console = Console(width=max(160, Console().width), emoji=False, highlight=False)
    console.print(f"[bold]v6lb demo[/bold]: {args.topology or 'built-in scenario eks-ipv6'}\n")
    exps: list[Explanation] = []
    fails: list[Explanation] = []
    pcap_files: list[Path] = []

    def save(tag: str, res: ScenarioResult) -> None:
        folder = out / "pcaps" / tag
        folder.mkdir(parents=True, exist_ok=True)
        for link, data in sorted(res.pcaps.items()):
            if len(data) <= 24:  # a file header and no packet: the link carried nothing here
                continue
            f = folder / f"{link}.pcap"
            f.write_bytes(data)
            pcap_files.append(f)

    for mode in _modes(config, None):
        e, res = _run(config, topo, mode)
        exps.append(e)
        save(mode, res)
        print_explanation(console, e, max_rows=40)
    print_comparison(console, exps)
    console.print()
    console.rule("[bold]Failure walk-throughs[/bold]")
    for failure, mode in FAILURES.items():
        if mode not in _modes(config, None):
            continue
        e, res = _run(config, topo, mode, failure)
        e.title = f"{failure}: {e.title}"
        fails.append(e)
        save(f"failure-{failure}", res)
        summary = res.facts.get("summary")
        print_explanation(console, e, max_rows=30)
        if isinstance(summary, str):
            console.print(f"[bold]What the client experienced:[/bold] {summary}\n")
    if npt_pairs := config.npt:
        console.rule("[bold]NPTv6 arithmetic[/bold]")
        p = npt_pairs[0]
        console.print(npt_walkthrough(str(p.inside), str(p.outside)), markup=False, highlight=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.html").write_text(render_report(exps, failures=fails), encoding="utf-8")
    (out / "explain.json").write_text(
        json.dumps([e.to_dict() for e in exps + fails], indent=2, default=str), encoding="utf-8"
    )
    console.print(
        f"wrote {out / 'report.html'}, {out / 'explain.json'} and {len(pcap_files)} pcaps under {out / 'pcaps'}"
    )
    return 0


# --- npt ---------------------------------------------------------------------


def _add_npt(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("npt", help="NPTv6 (RFC 6296) prefix translation tools")
    nsub = p.add_subparsers(dest="npt_command", required=True, metavar="ACTION")
    m = nsub.add_parser(
        "map",
        help="translate addresses (arguments, or one per line on stdin)",
        description="Translate addresses inside->outside (or outside->inside with --reverse). "
        "Prints one line per address: the translated address, or 'drop: REASON'.",
    )
    m.add_argument(
        "--inside", required=True, help="inside (private) prefix, e.g. fd01:203:405::/48"
    )
    m.add_argument("--outside", required=True, help="outside (public) prefix, e.g. 2001:db8:1::/48")
    m.add_argument("--reverse", action="store_true", help="translate outside -> inside")
    m.add_argument("addresses", nargs="*", metavar="ADDRESS")
    m.set_defaults(func=_cmd_npt_map)
    k = nsub.add_parser(
        "packet",
        help="translate every packet of a pcap/pcapng file and write a pcap",
        description="Translate each IPv6 packet of a capture through NPTv6 and write a pcap "
        "(nanosecond timestamps, same link type) that Wireshark/tshark read with valid checksums.",
    )
    k.add_argument("--inside", required=True)
    k.add_argument("--outside", required=True)
    k.add_argument(
        "--direction",
        choices=("auto", "out", "in"),
        default="auto",
        help="out: translate sources in the inside prefix; in: destinations in the outside "
        "prefix; auto (default): per packet",
    )
    k.add_argument("input", help="input capture (pcap or pcapng)")
    k.add_argument("output", help="output pcap")
    k.set_defaults(func=_cmd_npt_packet)


def _mapping(args: argparse.Namespace) -> NptMapping:
    from v6lb.core.nptv6 import NptMapping, NptPrefixError

    try:
        return NptMapping(args.inside, args.outside)
    except NptPrefixError as exc:
        raise UsageError(f"invalid NPT prefix: {exc}") from None


def _cmd_npt_map(args: argparse.Namespace) -> int:
    import ipaddress

    from v6lb.wire.reasons import Reason

    mapping = _mapping(args)
    inputs: Iterable[str] = args.addresses if args.addresses else sys.stdin
    write = sys.stdout.write
    translate = mapping.translate
    reverse = args.reverse
    out: list[str] = []
    for raw in inputs:
        text = raw.strip()
        if not text:
            continue
        try:
            addr = ipaddress.IPv6Address(text)
        except ValueError:
            out.append(f"drop: not-an-ipv6-address ({text})\n")
            continue
        res = translate(addr, reverse)
        if isinstance(res, Reason):
            out.append(f"drop: {res.label}\n")
        else:
            out.append(f"{res}\n")
        if len(out) >= 4096:
            write("".join(out))
            out.clear()
    write("".join(out))
    return 0


def _cmd_npt_packet(args: argparse.Namespace) -> int:
    from pathlib import Path

    from v6lb.engines.offline import translate_file
    from v6lb.wire.pcap import PcapError

    mapping = _mapping(args)
    src = Path(args.input)
    if not src.is_file():
        raise UsageError(f"{src}: no such capture file")
    try:
        stats = translate_file(src, Path(args.output), mapping, args.direction)
    except PcapError as exc:
        raise UsageError(f"{src}: {exc}") from None
    sys.stderr.write(f"{stats.summary()}; wrote {args.output}\n")
    return 0


# --- check -------------------------------------------------------------------


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check",
        help="validate a config file and show what it would set up",
        description="Validate every section of FILE (vips, npt, lb, topology, bgp) and print "
        "a summary. Exit 0 if valid; exit 2 with FILE: FIELD: PROBLEM; fix: FIX otherwise. "
        "Changes nothing.",
    )
    p.add_argument("file", metavar="FILE", help="the v6lb YAML config file")
    p.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    from v6lb.model.bgp import parse_bgp
    from v6lb.model.config import ConfigError, load_config
    from v6lb.model.topology import parse_topology

    try:
        config = load_config(args.file)
        topo = parse_topology(config) if config.topology is not None else None
        bgp = parse_bgp(config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    sys.stdout.write(f"{args.file}: valid\n{config.summary()}")
    if topo is not None:
        roles: dict[str, int] = {}
        for n in topo.nodes:
            roles[n.role] = roles.get(n.role, 0) + 1
        sys.stdout.write(
            f"topology: {len(topo.nodes)} nodes ("
            + ", ".join(f"{k} {v}" for k, v in sorted(roles.items()))
            + f"), {len(topo.links)} links: "
            + ", ".join(f"{lk.name} {lk.subnet} mtu {lk.mtu}" for lk in topo.links)
            + "\n"
        )
    if config.bgp is not None and topo is not None:
        sys.stdout.write(f"bgp: {len(topo.announcements)} announcements\n")
    if bgp is not None:
        sys.stdout.write(
            f"bgp: AS {bgp.asn}, {len(bgp.neighbours)} neighbours, hold {bgp.hold} s, "
            f"keepalive {bgp.keepalive} s, BFD "
            + (
                f"{bgp.bfd.interval * 1000:g} ms x {bgp.bfd.multiplier}"
                if bgp.bfd.enabled
                else "off"
            )
            + "\n"
        )
    return 0


# --- maglev ------------------------------------------------------------------


def _add_maglev(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "maglev",
        help="build a Maglev table for N synthetic backends and report its quality",
        description="Build a Maglev lookup table for N backends [2001:db8::1]:80 ... and print "
        "its balance (entries owned / ideal share, max and min over backends), the "
        "disruption when K backends are removed and when one is added (entries that "
        "changed backend beyond those that had to), and the build time.",
    )
    p.add_argument("--backends", type=int, required=True, metavar="N", help="number of backends")
    p.add_argument(
        "--table-size",
        type=int,
        default=65537,
        metavar="M",
        help="table size, a prime (default 65537, the kernel recipe's `mod 65537`)",
    )
    p.add_argument(
        "--remove",
        type=int,
        default=None,
        metavar="K",
        help="how many backends to remove for the removal figure, spread evenly "
        "(default 1; 0 with a single backend)",
    )
    p.set_defaults(func=_cmd_maglev)


def _cmd_maglev(args: argparse.Namespace) -> int:
    import ipaddress
    import time

    from v6lb.core.maglev import Maglev, backend_id, build_table, check_table_size, disruption

    n: int = args.backends
    size: int = args.table_size
    try:
        check_table_size(size)
    except ValueError as exc:
        raise UsageError(f"--table-size: {exc}") from None
    if n < 1:
        raise UsageError(f"--backends {n}: need at least 1 backend")
    if n > size:
        raise UsageError(
            f"--backends {n} is more than --table-size {size}: every backend needs a table entry"
        )
    remove: int = min(1, n - 1) if args.remove is None else args.remove
    if not 0 <= remove < n:
        raise UsageError(f"--remove {remove}: choose 0..{n - 1} (at least one backend must stay)")
    base = int(ipaddress.IPv6Address("2001:db8::"))
    names = [backend_id(str(ipaddress.IPv6Address(base + i + 1)), 80) for i in range(n)]

    table = Maglev(names, size=size)
    runs = []
    for _ in range(3):  # the first build in a process also pays one-off warm-up costs
        start = time.perf_counter()
        build_table(names, size=size)
        runs.append((time.perf_counter() - start) * 1e3)
    build_ms = sorted(runs)[1]
    high, low = table.balance()
    out = [
        f"maglev: {n} backend{'s' if n != 1 else ''}, table size {size}",
        f"build: {build_ms:.1f} ms (median of 3)",
        f"balance: max/ideal {high:.4f}, min/ideal {low:.4f} "
        f"(ideal {size / n:.1f} entries per backend)",
    ]

    def moved(label: str, other: Maglev) -> str:
        d = disruption(table, other)
        return (
            f"{label}: {d.required_fraction:.2%} of entries had to move; "
            f"{d.excess_fraction:.2%} more moved ({d.excess} entries)"
        )

    if remove:
        gone = {i * n // remove for i in range(remove)}
        kept = [name for i, name in enumerate(names) if i not in gone]
        out.append(moved(f"remove {remove} of {n}", Maglev(kept, size=size)))
    else:
        out.append("remove: skipped (--remove 0)")
    added = backend_id(str(ipaddress.IPv6Address(base + n + 1)), 80)
    out.append(moved(f"add 1 to {n}", Maglev([*names, added], size=size)))
    sys.stdout.write("\n".join(out) + "\n")
    return 0


# --- explanation output (rich tables) -----------------------------------------


def print_explanation(
    console: Console, exp: Explanation, *, max_rows: int = 60, compact: bool = True
) -> None:
    """One mode: the hop-by-hop table, then the five answers.

    ``compact`` shows the first packet of each leg in each direction (and every
    drop); the other packets of a leg take the same path with the same changes.
    """
    from rich.table import Table
    from rich.text import Text

    from v6lb.model.explain import answer_lines, key_rows

    console.rule(f"[bold]{exp.mode}[/bold]: {exp.title}")
    t = Table(show_lines=False, header_style="bold", expand=False, pad_edge=False)
    t.add_column("#", justify="right", style="dim")
    t.add_column("leg", style="cyan")
    t.add_column("link")
    t.add_column("hop")
    t.add_column("source")
    t.add_column("destination")
    t.add_column("packet")
    t.add_column("what changed here, and why")
    rows = key_rows(exp.rows) if compact else exp.rows
    shown = rows if len(rows) <= max_rows else rows[:max_rows]
    for r in shown:
        # Text() cells: addresses in brackets must not be read as rich markup or emoji codes.
        change = Text(f"DROPPED: {r.dropped}", style="red") if r.dropped else Text(r.change)
        t.add_row(
            str(r.seq),
            Text(r.leg),
            Text(r.link),
            Text(f"{r.sender} → {r.receiver}"),
            Text(r.src),
            Text(r.dst),
            Text(f"{r.proto} {r.detail}".strip()),
            change,
        )
    console.print(t)
    hidden = len(exp.rows) - len(shown)
    if hidden:
        console.print(
            f"[dim]{hidden} more hops of the same legs are not shown "
            "(v6lb explain --all-hops, --json, or the HTML report have them all)[/dim]"
        )
    a = Table(show_header=False, box=None, pad_edge=False)
    a.add_column(style="bold")
    a.add_column()
    for q, ans in answer_lines(exp.answers):
        a.add_row(Text(q), Text(ans))
    console.print(a)
    console.print()


def print_comparison(console: Console, exps: Sequence[Explanation]) -> None:
    """The modes side by side."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title="The modes side by side", header_style="bold", show_lines=True)
    for col in (
        "mode",
        "NAT66 at the LB?",
        "backend saw",
        "reply via LB?",
        "LB state per flow",
        "client address reaches the app",
    ):
        t.add_column(col)
    for e in exps:
        a = e.answers
        nat = a.nat_kind if a.nat66_at_lb else "no"
        if a.nat_kind.startswith("new"):
            nat = "no (new connection)"
        cells = (
            e.mode,
            nat,
            a.backend_saw_source,
            "yes" if a.reply_via_lb else "no",
            a.lb_state,
            a.client_address_reaches_app,
        )
        # Text() cells: "[addr]:port" must not be read as rich markup.
        t.add_row(*(Text(c) for c in cells))
    console.print(t)


# --- run, status, backend ------------------------------------------------------


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run the load balancer on this host (root): nat, npt, dsr-* and proxy-* VIPs",
        description="Check FILE and the host, install the instance's nftables, ip6tables and "
        "routes atomically, then probe the backends and keep the Maglev maps in line with their "
        "health. SIGHUP reloads FILE (a bad file changes nothing); SIGTERM/SIGINT remove what "
        "was installed and exit 0. proxy-* VIPs are served by the proxy engine (--proxy "
        "builtin|haproxy, default builtin); one control socket answers `v6lb status` for all of "
        "them. Exit 2 when a check fails; nothing is installed.",
    )
    p.add_argument("file", metavar="FILE", help="the v6lb YAML config file")
    p.add_argument(
        "--dataplane",
        choices=["kernel", "python"],
        default="kernel",
        help="L3/L4 data plane: kernel (nftables/ip6tables/seg6, the default) or python "
        "(the v6lb core on TUN devices: npt, nat, dsr-ip6ip6, dsr-srv6)",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="python data plane: log one line per packet decision (rate-limited)",
    )
    p.add_argument(
        "--proxy",
        choices=["builtin", "haproxy"],
        default=None,
        help="proxy engine for proxy-l4/proxy-l7 VIPs: builtin (asyncio, the default) or haproxy",
    )
    p.add_argument("--instance", metavar="NAME", help="override lb.instance (the ownership tag)")
    p.add_argument("--netns", metavar="NS", help="run inside this named network namespace")
    p.add_argument(
        "--control-socket", metavar="PATH", help="override lb.control_socket (AF_UNIX path)"
    )
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from v6lb.engines.limits import raise_nofile
    from v6lb.model.config import ConfigError, control_socket_problem, load_config

    if args.control_socket is not None:
        problem = control_socket_problem(args.control_socket, args.instance or "lb0")
        if problem is not None:
            raise UsageError(f"--control-socket: {problem[0]}; fix: {problem[1]}")
    # every engine: systemd's default soft limit of 1024 held 502 proxied connections
    before, after = raise_nofile()
    if after != before:
        sys.stderr.write(
            f"v6lb run: descriptor limit (RLIMIT_NOFILE) raised from {before} to {after}\n"
        )
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        raise UsageError(f"{exc}; `v6lb check {args.file}` shows every problem") from None
    has_proxy = any(v.mode.is_proxy for v in config.vips)
    has_l3 = bool(config.npt) or any(not v.mode.is_proxy for v in config.vips)
    if args.proxy is not None and not has_proxy:
        raise UsageError(
            f"--proxy {args.proxy} needs a proxy-l4 or proxy-l7 VIP, and {args.file} has none; "
            "--proxy chooses the proxy engine, --dataplane the L3/L4 data plane"
        )
    if not has_proxy:
        return _run_l3(args)
    return _run_with_proxies(args, config, has_l3)


def _run_with_proxies(args: argparse.Namespace, config: Config, has_l3: bool) -> int:
    """Serve the proxy VIPs (builtin or haproxy), alongside the L3/L4 data plane if any.

    One control socket answers for the whole instance: the L3/L4 data plane's
    when there is one (the proxy VIPs are added to its status answer as the
    ``proxy`` section), else the proxy engine's own (docs/run.md).
    """
    import dataclasses
    import signal
    import threading

    from v6lb.engines.control import ControlError
    from v6lb.engines.kernel import KernelError
    from v6lb.engines.kernel.host import enter_netns
    from v6lb.engines.proxy.run import run_proxies

    stop = threading.Event()
    engine = args.proxy or "builtin"
    failure: list[BaseException] = []
    if args.netns:
        # setns(2) is per thread: enter before the proxy thread starts, so both the
        # proxy and the L3/L4 data plane live in the namespace.
        try:
            enter_netns(args.netns)
        except KernelError as exc:
            raise UsageError(str(exc)) from None
    from v6lb.engines.kernel.host import host_links

    here = host_links().addresses
    for vip in config.vips:
        if vip.mode.is_proxy and vip.address not in here:
            raise UsageError(
                f"{args.file}: vips.{vip.name}.address: {vip.address} is not assigned to any "
                "interface of this host, so the proxy cannot receive its traffic; fix: add it "
                f"(ip -6 address add {vip.address}/128 dev lo) or fix the address"
            )
    lb = config.lb
    if args.instance is not None:  # as `run --dataplane kernel` applies them
        if lb.control_socket == f"/run/v6lb/{lb.instance}.sock":
            lb = dataclasses.replace(lb, control_socket=f"/run/v6lb/{args.instance}.sock")
        lb = dataclasses.replace(lb, instance=args.instance)
    if args.control_socket is not None:
        lb = dataclasses.replace(lb, control_socket=args.control_socket)
    config = dataclasses.replace(config, lb=lb)

    def proxies() -> None:
        try:
            run_proxies(
                config,
                engine=engine,
                stop=stop,
                file=args.file,
                netns=args.netns,
                own_control=not has_l3,
            )
        except ControlError as exc:
            failure.append(UsageError(str(exc)))
            stop.set()
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
            stop.set()

    if not has_l3:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        proxies()
        if failure:
            if isinstance(failure[0], UsageError):
                raise failure[0]
            raise UsageError(f"proxy engine {engine}: {failure[0]}")
        return 0
    thread = threading.Thread(target=proxies, name="v6lb-proxy", daemon=True)
    thread.start()
    try:
        code = _run_l3(args)
    finally:
        stop.set()
        thread.join(10)
    if failure:
        raise UsageError(f"proxy engine {engine}: {failure[0]}")
    return code


def _run_l3(args: argparse.Namespace) -> int:
    from v6lb.engines.control import ControlError
    from v6lb.engines.kernel import ApplyError, KernelError, MissingFeatureError
    from v6lb.engines.kernel.run import Runner, prepare

    if args.trace:
        import os

        os.environ["V6LB_TRACE"] = "1"  # read by the python data plane
    try:
        prepared = prepare(
            args.file,
            dataplane=args.dataplane,
            instance=args.instance,
            netns=args.netns,
            control_socket=args.control_socket,
        )
        runner = Runner(
            prepared,
            args.file,
            netns=args.netns,
            overrides={"instance": args.instance, "control_socket": args.control_socket},
        )
        runner.install()
    except (ApplyError, MissingFeatureError) as exc:
        sys.stderr.write(f"v6lb: error: {exc}\n")
        return 1
    except KernelError as exc:
        raise UsageError(str(exc)) from None
    except ControlError as exc:
        raise UsageError(str(exc)) from None
    return runner.serve()


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
    from rich.console import Console

    from v6lb.lab.netns import resolve_name
    from v6lb.lab.trace import explain_trace, run_trace

    name = resolve_name(args.name, None)
    trace = run_trace(name, args.mode, Path(args.out) if args.out else None)
    exp = explain_trace(trace)
    if args.json:
        sys.stdout.write(exp.to_json() + "\n")
        return 0
    console = Console(width=max(160, Console().width), emoji=False, highlight=False)
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
    config, topo = _load_scenario(meta["file"])
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


# --- registry ----------------------------------------------------------------

_ADDERS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_demo,
    _add_explain,
    _add_npt,
    _add_check,
    _add_maglev,
    _add_run,
    _add_status,
    _add_backend,
    _add_lab,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="v6lb",
        description="IPv6 load balancer and network lab: proxy, npt, nat, dsr, anycast.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _ADDERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except UsageError as exc:
        sys.stderr.write(f"v6lb: error: {exc}\n")
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
