"""The `v6lb` command line: argument parsing and output formatting only.

Each sub-command has one ``_add_<name>`` function that registers its parser and
one ``_cmd_<name>`` handler. Handlers return the process exit code. Exit code 2
means the caller's input was wrong (bad prefix, bad file); the message names it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from v6lb.core.nptv6 import NptMapping
    from v6lb.model.explain import Explanation

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """The caller's input is wrong; printed as ``v6lb: error: ...`` with exit code 2."""


# --- demo ------------------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="walk through an example, hop by hop")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from v6lb.model.walkthrough import npt_walkthrough

    sys.stdout.write(npt_walkthrough())
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
    from v6lb.model.config import ConfigError, load_config

    try:
        config = load_config(args.file)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    sys.stdout.write(f"{args.file}: valid\n{config.summary()}")
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


def print_explanation(console: Console, exp: Explanation, *, max_rows: int = 60) -> None:
    """One mode: the hop-by-hop table, then the five answers."""
    from rich.table import Table

    from v6lb.model.explain import answer_lines

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
    rows = exp.rows
    shown = rows if len(rows) <= max_rows else rows[:max_rows]
    for r in shown:
        change = f"[red]DROPPED: {r.dropped}[/red]" if r.dropped else r.change
        t.add_row(
            str(r.seq),
            r.leg,
            r.link,
            f"{r.sender} → {r.receiver}",
            r.src,
            r.dst,
            f"{r.proto} {r.detail}".strip(),
            change,
        )
    console.print(t)
    if len(rows) > len(shown):
        console.print(f"[dim]... {len(rows) - len(shown)} more hops (use --json for all)[/dim]")
    a = Table(show_header=False, box=None, pad_edge=False)
    a.add_column(style="bold")
    a.add_column()
    for q, ans in answer_lines(exp.answers):
        a.add_row(q, ans)
    console.print(a)
    console.print()


def print_comparison(console: Console, exps: Sequence[Explanation]) -> None:
    """The modes side by side."""
    from rich.table import Table

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
        t.add_row(
            e.mode,
            a.nat_kind
            if a.nat66_at_lb
            else ("no (new connection)" if a.nat_kind.startswith("new") else "no"),
            a.backend_saw_source,
            "yes" if a.reply_via_lb else "no",
            a.lb_state,
            a.client_address_reaches_app,
        )
    console.print(t)


# --- registry ----------------------------------------------------------------

_ADDERS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_demo,
    _add_npt,
    _add_check,
    _add_maglev,
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
