"""The two L3/L4 data planes in the lab, side by side: the same requests, hop by hop.

:func:`run_differential` brings a lab up with the first data plane (``kernel``),
traces each mode (:func:`v6lb.lab.trace.run_trace`: every link captured while
the client makes a GET, a large POST and a GET of a large response), takes it down, and does the same
with the second (``python``), whose traces reuse the first one's client ports.
Same file, same lab, same flows: every hop must then be the same.

:func:`hop_set` reduces a trace to what must match: per captured TCP packet of
the traced flows, the link, the sending and the receiving node, the innermost
addresses and ports, and the outer addresses of a tunnel. Ports the traced
flows chose (the client's, the NPT inside host's own connection out) become
labels, so the NPT host's random port compares too. The backend each flow
went to is in there (the packets on the pods' link name it) and, again, in the
HTTP answers (which node answered each request), which :func:`compare` also
checks. ICMPv6 is left out (also an error an LB passes on in a tunnel, which
quotes a TCP packet): the kernel and the Python data plane are free to send
their own errors from different source addresses. ``v6lb lab diff`` compares
the errors with the simulator, each LB's own by its node.

``python -m v6lb.lab.dataplane_diff FILE [--modes nat,npt]`` runs it (root).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from v6lb.engines.control import query
from v6lb.lab.netns import lab_down, lab_up
from v6lb.lab.plan import LabError
from v6lb.lab.trace import Trace, run_trace, trace_hops
from v6lb.model.modes import Plane, modes_where

__all__ = ["MODES", "Outcome", "compare", "hop_set", "main", "run_differential"]

MODES: Final = modes_where(plane=Plane.PYTHON)  # the modes both L3 data planes serve

HopKey = tuple[str, str, str, str]  # link, sender -> receiver, innermost tuple, outer header


@dataclass(slots=True)
class Outcome:
    """One mode on both data planes: what each saw, and every difference."""

    mode: str
    ports: list[int]
    hops: dict[str, set[HopKey]] = field(default_factory=dict)  # data plane -> hops
    answers: dict[str, list[str]] = field(default_factory=dict)  # data plane -> answering node
    differences: list[str] = field(default_factory=list)
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)  # data plane -> LB -> status


def _labels(meta: dict[str, Any]) -> dict[int, str]:
    labels = {int(p): f"C{k}" for k, p in enumerate(meta["client_ports"], 1)}
    out = meta.get("outbound")
    if out:
        labels[int(out["source_port"])] = "O1"
    return labels


def hop_set(trace: Trace) -> set[HopKey]:
    """The TCP hops of the traced flows, client-chosen ports replaced by labels."""
    labels = _labels(trace.meta)
    keys: set[HopKey] = set()
    for h in trace_hops(trace):
        p = h.pkt
        i = p.innermost
        if h.dropped is not None or i.proto != "tcp" or p.error is not None:
            continue  # ICMPv6 errors too, also one an LB passes on in a tunnel
        if i.src.port not in labels and i.dst.port not in labels:
            continue

        def port(n: int | None) -> str:
            return "-" if n is None else labels.get(n, str(n))

        flow = f"[{i.src.addr}]:{port(i.src.port)} -> [{i.dst.addr}]:{port(i.dst.port)}"
        outer = f"{p.proto} {p.src.addr} -> {p.dst.addr}" if p.encapsulated else ""
        keys.add((h.link, f"{h.sender} -> {h.receiver}", flow, outer))
    return keys


def _answers(trace: Trace) -> list[str]:
    out = []
    for r in trace.meta["requests"]:
        a = r.get("answer") or {}
        out.append(f"{r['method']} answered by {a.get('node')} ({a.get('server')})")
    return out


def compare(mode: str, first: tuple[str, Trace], second: tuple[str, Trace]) -> Outcome:
    """Every difference between two traces of one mode (empty ``differences``: the same)."""
    (a_name, a), (b_name, b) = first, second
    out = Outcome(mode, [int(p) for p in a.meta["client_ports"]])
    for name, t in (first, second):
        out.hops[name] = hop_set(t)
        out.answers[name] = _answers(t)
    if [int(p) for p in b.meta["client_ports"]] != out.ports:
        out.differences.append(f"client ports {out.ports} vs {b.meta['client_ports']}")
    for name, t in (first, second):
        empty = sorted(link for link, n in t.packets.items() if n < 0)
        if empty:
            out.differences.append(f"{name}: no pcap for {', '.join(empty)}")
    ha, hb = out.hops[a_name], out.hops[b_name]
    if not ha:
        out.differences.append(f"{a_name}: no TCP hop of the traced flows was captured")
    for key in sorted(ha - hb):
        out.differences.append(f"only with {a_name}: {' '.join(x for x in key if x)}")
    for key in sorted(hb - ha):
        out.differences.append(f"only with {b_name}: {' '.join(x for x in key if x)}")
    if out.answers[a_name] != out.answers[b_name]:
        out.differences.append(
            f"answers: {a_name} {out.answers[a_name]} vs {b_name} {out.answers[b_name]}"
        )
    return out


def run_differential(
    path: str,
    name: str,
    out: Path,
    *,
    modes: Sequence[str] = MODES,
    dataplanes: tuple[str, str] = ("kernel", "python"),
    log: Callable[[str], None] | None = None,
) -> list[Outcome]:
    """Trace ``modes`` with both data planes in turn (lab ``name`` from ``path``); compare.

    The lab is taken down after each data plane, also on failure. A trace of
    the second data plane repeats the first one's client ports.
    """
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    traces: dict[str, dict[str, Trace]] = {}
    engines: dict[str, dict[str, Any]] = {}
    for dp in dataplanes:
        state = lab_up(path, name, dataplane=dp, log=_Writer(say))
        try:
            traces[dp] = {}
            for mode in modes:
                first = traces[dataplanes[0]].get(mode)
                ports = tuple(int(p) for p in first.meta["client_ports"]) if first else ()
                traces[dp][mode] = run_trace(name, mode, out / dp / mode, ports=ports)
                say(
                    f"{dp} {mode}: traced from client ports {traces[dp][mode].meta['client_ports']}"
                )
            engines[dp] = {
                node: query(lb["socket"]) for node, lb in state["lbs"].items() if lb.get("socket")
            }
        finally:
            lab_down(name, log=_Writer(say))
    a, b = dataplanes
    outcomes = [compare(m, (a, traces[a][m]), (b, traces[b][m])) for m in modes]
    for o in outcomes:
        o.engines = engines
    return outcomes


class _Writer:
    """A ``write``-able that hands whole lines to ``say`` (the lab's log argument)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.say(line)
        return len(text)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m v6lb.lab.dataplane_diff", description=__doc__.splitlines()[0]
    )
    ap.add_argument("file", metavar="FILE", help="a lab file, e.g. examples/lab-modes.yaml")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated (default: all)")
    ap.add_argument("--name", default=f"dd{os.getpid() % 100000}", help="the lab's name")
    ap.add_argument("--out", metavar="DIR", help="keep the traces here")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="v6lb-dpdiff-"))
    try:
        outcomes = run_differential(args.file, args.name, out, modes=args.modes.split(","))
    except LabError as exc:
        print(f"v6lb: error: {exc}", file=sys.stderr)
        return 2
    bad = 0
    for o in outcomes:
        n = len(next(iter(o.hops.values())))
        verdict = "same" if not o.differences else f"{len(o.differences)} difference(s)"
        print(f"{o.mode}: {n} hops, client ports {o.ports}: {verdict}")
        for line in next(iter(o.answers.values())):
            print(f"  {line}")
        for d in o.differences:
            print(f"  DIFF {d}")
        bad += bool(o.differences)
    print(f"traces in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
