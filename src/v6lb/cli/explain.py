"""`v6lb explain` and `v6lb demo`: the scenario in the simulator, hop by hop."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from v6lb import MODES
from v6lb.cli.common import failure_arg, one_file, terminal_console, wide_console
from v6lb.cli.tables import print_comparison, print_demo_short, print_explanation
from v6lb.engines.sim.runs import (
    FAILURE_MODES,
    explain_run,
    load_scenario,
    pick_modes,
    save_pcaps,
    write_report,
)
from v6lb.errors import CommandLineError
from v6lb.model.failures import SIM, aliases_note, names, one_line

if TYPE_CHECKING:
    from rich.console import Console

    from v6lb.model.explain import Explanation


def _add_file(p: argparse.ArgumentParser) -> None:
    """FILE, as `check`, `run` and `lab up` take it; ``--topology FILE`` is the older spelling."""
    p.add_argument(
        "file", metavar="FILE", nargs="?", help="scenario file (default: the built-in eks-ipv6)"
    )
    p.add_argument("--topology", metavar="FILE", help="the same as FILE (an alias)")


def scenario_file(args: argparse.Namespace) -> str | None:
    """The file named by FILE or ``--topology`` (None: the built-in scenario)."""
    return one_file(args.file, args.topology, "--topology")


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the scenario under every mode: tables, pcaps and an HTML report",
        description="Simulate the IPv6 cluster scenario (client, router, LB with a public VIP, "
        "private nodes and pods) under every mode, print each hop and the answers, compare "
        "the modes, run the failure walk-throughs, and write pcaps and report.html.",
    )
    _add_file(p)
    p.add_argument(
        "--out", metavar="DIR", default="demo-out", help="output folder (default: demo-out)"
    )
    p.add_argument(
        "--npt-only", action="store_true", help="print only the NPTv6 arithmetic walk-through"
    )
    p.add_argument(
        "--all-hops",
        action="store_true",
        help="the long form: every mode's hop table and answers, each failure walk-through"
        " and the NPTv6 arithmetic (default: the answer in about 60 lines)",
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
    p.add_argument("--mode", choices=MODES, help="the mode to explain (default: every mode)")
    _add_file(p)
    p.add_argument(
        "--failure",
        type=failure_arg(SIM),
        metavar="FAILURE",
        help=f"run a failure walk-through instead: {', '.join(names(SIM))} (under --mode, default"
        f" {', '.join(f'{k}: {v}' for k, v in FAILURE_MODES.items())}){aliases_note(SIM)}",
    )
    p.add_argument("--json", action="store_true", help="print the same facts as JSON")
    p.add_argument(
        "--all-hops",
        action="store_true",
        help="show every packet (default: the first packet of each leg in each direction)",
    )
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    import json

    file = scenario_file(args)
    config, topo = load_scenario(file)
    if args.failure:
        mode = pick_modes(config, args.mode or FAILURE_MODES[args.failure])[0]
        try:
            exps = [explain_run(config, topo, mode, args.failure)[0]]
        except ValueError as exc:  # the simulator refuses this mode for this failure
            raise CommandLineError(
                f"--failure {args.failure} cannot run under --mode {mode}: {exc}",
                f"drop --mode (it defaults to {FAILURE_MODES[args.failure]}) or pick another",
            ) from None
    else:
        exps = [explain_run(config, topo, m)[0] for m in pick_modes(config, args.mode)]
    if args.json:
        out = [e.to_dict() for e in exps]
        sys.stdout.write(json.dumps(out[0] if len(out) == 1 else out, indent=2, default=str) + "\n")
        return 0
    console = wide_console()
    for e in exps:
        print_explanation(console, e, max_rows=10_000, compact=not args.all_hops)
        if args.failure:
            _print_failure(console, e)
    if len(exps) > 1:
        print_comparison(console, exps)
    return 0


def _print_failure(console: Console, e: Explanation) -> None:
    """A failure walk-through's own facts: what happened and, for packet-too-big, how each
    engine handles it and where it cannot work."""
    from rich.text import Text

    def say(text: str, style: str = "") -> None:
        console.print(Text(text, style=style))

    f = e.facts
    summary = f.get("summary")
    if isinstance(summary, str):
        say("What happened:", "bold")
        for part in summary.split(" Reply path: "):
            say(f"  {part}" if part.startswith("Inbound") else f"  Reply path: {part}")
    engines = f.get("engines")
    if isinstance(engines, list):
        say("How each engine passes a Packet Too Big for the VIP on:", "bold")
        for n in engines:
            say(f"  {n['engine']} ({n['run']}): {n['how']}.")
            for i, shape in enumerate(n.get("quote_shapes") or [], 1):
                say(f"      quote shape {i}: {shape}")
            for key in ("dropped", "limit"):
                if n.get(key):
                    say(f"      {key}: {n[key]}")
            counters = n.get("counters") or {}
            if counters:
                say("      counters: " + "; ".join(f"{k} ({v})" for k, v in counters.items()))
    cannot = f.get("cannot_work")
    if isinstance(cannot, list):
        say("Where it cannot work, whatever the LB does:", "bold")
        for c in cannot:
            say(f"  - {c['where']}: {c['why']}")
    console.print()


def _cmd_demo(args: argparse.Namespace) -> int:
    from v6lb.model.walkthrough import npt_walkthrough

    if args.npt_only:
        sys.stdout.write(npt_walkthrough())
        return 0
    file = scenario_file(args)
    config, topo = load_scenario(file)
    out = Path(args.out)
    long_form = bool(args.all_hops)
    console = wide_console() if long_form else terminal_console()
    console.print(f"[bold]v6lb demo[/bold]: {file or 'built-in scenario eks-ipv6'}\n")
    exps: list[Explanation] = []
    fails: list[Explanation] = []
    lines: list[tuple[str, str, str]] = []  # failure, mode, what happened
    pcap_files: list[Path] = []

    modes = pick_modes(config, None)
    for mode in modes:
        e, res = explain_run(config, topo, mode)
        exps.append(e)
        pcap_files += save_pcaps(out / "pcaps" / mode, res)
        if long_form:
            print_explanation(console, e, max_rows=40)
    if long_form:
        print_comparison(console, exps)
        console.print()
        console.rule("[bold]Failure walk-throughs[/bold]")
    for failure, mode in FAILURE_MODES.items():
        if mode not in modes:
            continue
        e, res = explain_run(config, topo, mode, failure)
        e.title = f"{failure}: {e.title}"
        fails.append(e)
        pcap_files += save_pcaps(out / "pcaps" / f"failure-{failure}", res)
        lines.append((failure, mode, one_line(failure, res.facts)))
        summary = res.facts.get("summary")
        if long_form:
            print_explanation(console, e, max_rows=30)
            if isinstance(summary, str):
                console.print(f"[bold]What the client experienced:[/bold] {summary}\n")
    if long_form and (npt_pairs := config.npt):
        console.rule("[bold]NPTv6 arithmetic[/bold]")
        p = npt_pairs[0]
        console.print(npt_walkthrough(str(p.inside), str(p.outside)), markup=False, highlight=False)
    report, facts = write_report(out, exps, fails)
    if long_form:
        console.print(f"wrote {report}, {facts} and {len(pcap_files)} pcaps under {out / 'pcaps'}")
        return 0
    with console.capture() as cap:  # rich pads tables to the width: strip that
        print_demo_short(console, exps, lines, (report, facts, out / "pcaps", len(pcap_files)))
    sys.stdout.write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_demo(sub)
    _add_explain(sub)
