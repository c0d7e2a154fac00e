"""The explanation tables (rich): one mode hop by hop, and the modes side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from v6lb.model.explain import Explanation

__all__ = [
    "print_comparison",
    "print_demo_short",
    "print_explanation",
    "print_short_comparison",
]


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

    from v6lb.model.modes import MODES

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
        if e.mode in MODES and MODES[e.mode].is_proxy:  # a proxy opens a new connection
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


def _short_state(lb_state: str) -> str:
    """``conntrack: 3 entries: ...`` -> ``conntrack``; ``flow cache (LRU, x): ...`` -> ``flow cache``."""
    head = lb_state.split(":", 1)[0].split(" (", 1)[0]
    return "connections" if head == "proxy connections" else head


def _short_nat(mode: str, nat66_at_lb: bool, nat_kind: str) -> str:
    from v6lb.model.modes import MODES

    if mode in MODES and MODES[mode].is_proxy:
        return "no (proxy)"
    if not nat66_at_lb:
        return "no"
    if "prefix" in nat_kind:
        return "NPT"
    return "DNAT+SNAT" if "source" in nat_kind else "DNAT"


def _short_via(how: str) -> str:
    """``the socket's peer address`` -> ``peer address``; ``PROXY v2 header`` -> ``PROXY v2``."""
    how = how.removeprefix("the ").removeprefix("socket's ").split(" (", 1)[0]
    return how.removesuffix(" header")


def print_short_comparison(console: Console, exps: Sequence[Explanation]) -> None:
    """The modes side by side in short cells that fit an 80-column terminal; the long
    answers are in `v6lb explain` and the report."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        header_style="bold",
        pad_edge=False,
        padding=(0, 1, 0, 0),
    )
    for col in ("mode", "NAT66 at LB", "backend saw", "via LB", "LB state", "client via"):
        t.add_column(col, no_wrap=True)
    for e in exps:
        a = e.answers
        cells = (
            e.mode,
            _short_nat(e.mode, a.nat66_at_lb, a.nat_kind),
            a.backend_saw_source,
            "yes" if a.reply_via_lb else "no",
            _short_state(a.lb_state),
            _short_via(a.client_address_reaches_app),
        )
        t.add_row(*(Text(c) for c in cells))
    console.print(t)


_QUESTION = (
    "a client on the internet reaches a service in a private IPv6 cluster through a load"
    " balancer with a public VIP. For each way the LB can work: did NAT66 happen at the LB,"
    " what source did the backend see, does the reply cross the LB, what state does the LB"
    " keep, and how does the client's address reach the application?"
)


def print_demo_short(
    console: Console,
    exps: list[Explanation],
    fails: list[tuple[str, str, str]],
    wrote: tuple[Path, Path, Path, int],
) -> None:
    """The answer first: the question, the modes side by side, the failures, the files."""
    from rich.table import Table
    from rich.text import Text

    console.print(Text("The question: ", style="bold") + Text(_QUESTION))
    console.print()
    print_short_comparison(console, exps)
    console.print()
    console.print(Text("Failure walk-throughs", style="bold"))
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(no_wrap=True)
    t.add_column(no_wrap=True)
    t.add_column()
    for failure, mode, what in fails:
        t.add_row(Text(failure), Text(mode), Text(what))
    console.print(t)
    console.print()
    report, facts, pcaps, n = wrote
    console.print(
        Text("Written", style="bold") + Text(" (the report has every hop of every mode):")
    )
    for what, path, note in (
        ("report", report, ""),
        ("JSON  ", facts, " (the same facts, for scripts)"),
        ("pcaps ", pcaps, f"/ ({n} files, one per link per run)"),
    ):  # a path is not wrapped: it stays one line to copy
        console.print(Text(f"  {what}  {path}{note}"), soft_wrap=True)
    console.print()
    console.print(
        Text(
            "More: v6lb demo --all-hops (every hop here); v6lb explain --mode MODE;"
            " v6lb explain --failure FAILURE; v6lb demo --npt-only"
        )
    )
