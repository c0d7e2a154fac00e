"""The failure names: one set for `v6lb explain --failure` and the lab (`lab failover`, `lab trace`).

Each failure runs in the simulator (``explain``, ``demo``), in the anycast lab
(``lab failover``, ``lab trace --mode anycast``), or in both. The lab's older names
(``kill-instance``, ``site-backends``, ``site-uplink``) are still accepted as
deprecated aliases; :func:`resolve` maps one to its name and says which name a
command does not run, and where it does run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from v6lb.errors import UsageError

__all__ = ["FAILURES", "LAB", "SIM", "Failure", "aliases_note", "names", "resolve"]

Where = Literal["sim", "lab"]
SIM: Final = "sim"
LAB: Final = "lab"


@dataclass(frozen=True, slots=True)
class Failure:
    name: str
    what: str
    sim_mode: str | None  # the mode the simulator runs it under by default; None: lab only
    lab: bool  # the anycast lab runs it
    aliases: tuple[str, ...] = ()


FAILURES: Final = (
    Failure("backend-dies", "one backend dies under traffic: conntrack and Maglev", "nat", False),
    Failure(
        "lb-instance-dies",
        "one LB instance dies (its process group killed in the lab)",
        "anycast",
        True,
        ("kill-instance",),
    ),
    Failure(
        "site-lbs-die",
        "every LB instance of the primary site dies: the upstream moves to the backup site",
        None,
        True,
    ),
    Failure(
        "site-backends-die",
        "every backend of the primary site dies: the site withdraws the VIP",
        None,
        True,
        ("site-backends",),
    ),
    Failure(
        "site-uplink-down",
        "the primary site router's uplink goes down: only BFD notices upstream",
        None,
        True,
        ("site-uplink",),
    ),
    Failure(
        "packet-too-big",
        "a Packet Too Big inbound and on the reply path of a tunnel VIP",
        "dsr-ip6ip6",
        False,
    ),
)
"""Every failure, in the order the help and the demo show them."""

_BY_NAME: Final = {f.name: f for f in FAILURES} | {a: f for f in FAILURES for a in f.aliases}
_COMMAND: Final = {SIM: "v6lb explain --failure", LAB: "v6lb lab failover FILE --failure"}


def _runs(f: Failure, where: Where) -> bool:
    return f.sim_mode is not None if where == SIM else f.lab


def names(where: Where) -> list[str]:
    """The failure names ``where`` (the simulator or the lab) runs."""
    return [f.name for f in FAILURES if _runs(f, where)]


def aliases_note(where: Where) -> str:
    """The deprecated aliases ``where`` still takes, for a help text ('' when none)."""
    old = [f"{a} = {f.name}" for f in FAILURES if _runs(f, where) for a in f.aliases]
    return f"; old names, deprecated: {', '.join(old)}" if old else ""


def resolve(name: str, where: Where) -> Failure:
    """The failure ``name`` (or an old alias) means, if ``where`` runs it; else a usage error."""
    f = _BY_NAME.get(name)
    if f is None:
        raise UsageError(f"unknown failure {name!r}", f"use one of: {', '.join(names(where))}")
    if not _runs(f, where):
        other: Where = LAB if where == SIM else SIM
        raise UsageError(
            f"failure {f.name} runs only in the {'lab' if other == LAB else 'simulator'}"
            f" ({_COMMAND[other]} {f.name})",
            f"here use one of: {', '.join(names(where))}",
        )
    return f


def one_line(name: str, facts: dict[str, object]) -> str:
    """A failure walk-through's outcome in one short line, from the simulator's facts."""
    if name == "backend-dies":
        flows = facts.get("flows")
        flows = flows if isinstance(flows, list) else []
        hit = [f for f in flows if f.get("on_dead_backend")]
        kept = [f for f in flows if not f.get("on_dead_backend") and f.get("same_connection")]
        others = len(flows) - len(hit)
        carried = f"{others} others" if len(kept) == others else f"{len(kept)} of {others} others"
        return f"{facts.get('dead_node')} died: {len(hit)} flow moved, {carried} carried on"
    if name == "lb-instance-dies":
        if not facts.get("same_connection"):
            return f"{facts.get('lb_before')} died: the connection was lost"
        other = "" if facts.get("same_backend") else " (another backend)"
        return f"{facts.get('lb_before')} died: {facts.get('lb_after')} took over, same connection{other}"
    if name == "packet-too-big":
        answered = "answered" if facts.get("completed") else "not answered"
        return f"PTB from {facts.get('ptb_by')} (MTU {facts.get('ptb_mtu')}): client resent, {answered}"
    summary = facts.get("summary")
    return summary.split(". ")[0] if isinstance(summary, str) else ""
