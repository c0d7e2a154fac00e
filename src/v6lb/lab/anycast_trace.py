"""`v6lb lab trace --mode anycast`: which site and instance carried each flow, before and after a failure.

It builds the two-site lab of the file (:func:`v6lb.lab.failover.build`: the layout of
examples/anycast-sites.yaml or of examples/eks-ipv6.yaml, whose backup instance peers with
the upstream directly and whose sites share the pods as backends), opens
long-lived TCP connections from the client to the VIP, reads the routers'
routes to the VIP, and attributes every flow to the LB instance that received its
packets (each LB namespace counts the client source ports it sees in a small nft
set). Then it makes one failure (:data:`v6lb.lab.failover.FAILURES`, or none),
under the same traffic, and shows for each flow where it went afterwards and how
it ended, plus where the new connections opened after the failure went. The
measurement is :func:`v6lb.lab.failover.measure`, the same as ``v6lb lab failover``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from v6lb.lab.failover import Figures, Lab, build, measure

__all__ = ["AnycastTrace", "format_anycast_trace", "lab_trace_anycast", "run_anycast_trace"]


@dataclass
class AnycastTrace:
    file: str
    vip: str
    failure: str | None
    sites: dict[str, dict[str, Any]]  # site -> {"router", "cost", "instances"}
    instance_site: dict[str, str]
    routes_before: dict[str, list[str]]  # router -> next hops (as node names)
    routes_after: dict[str, list[str]]
    figures: Figures

    def to_json(self) -> str:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "figures"}
        d["figures"] = self.figures.as_dict()
        return json.dumps(d, indent=2)


def _routes(lab: Lab) -> dict[str, list[str]]:
    owner: dict[str, str] = {}
    for lk in lab.topo.links:
        for a in lk.endpoints:
            for x in a.addresses:
                owner[str(x)] = a.node
    out = {}
    for r in dict.fromkeys([lab.upstream, *(s.router for s in lab.sites)]):
        out[r] = sorted(owner.get(h, h) for h in lab.nexthops(r))
    return out


def run_anycast_trace(
    path: str | Path,
    failure: str | None,
    *,
    flows: int = 8,
    after_s: float = 2.0,
    log: Callable[[str], None] = lambda _m: None,
    name: str | None = None,
) -> AnycastTrace:
    """Build the lab of ``path`` (named ``name``, default ``fo<pid>``), trace ``flows``
    flows through ``failure`` (None: no failure)."""
    with build(path, log=log, name=name, failures=[failure] if failure else []) as lab:
        sites = {
            s.name: {
                "router": s.router,
                "cost": s.cost,
                "instances": list(s.lbs),
                "direct": s.direct,  # the instances peer with the upstream (the router)
            }
            for s in lab.sites
        }
        instance_site = {lb: s.name for s in lab.sites for lb in s.lbs}
        before = _routes(lab)
        fig = measure(lab, failure or "none", flows=flows, after_s=after_s)
        after = _routes(lab)
        return AnycastTrace(
            str(path), str(lab.vip), failure, sites, instance_site, before, after, fig
        )


def _where(t: AnycastTrace, lbs: list[str] | str | None) -> str:
    if lbs is None or lbs == []:
        return "–"
    if isinstance(lbs, str):
        lbs = [lbs]
    return " + ".join(f"{t.instance_site.get(lb, '?')}/{lb}" for lb in lbs)


def format_anycast_trace(t: AnycastTrace) -> str:
    f = t.figures
    out = [f"anycast trace of {t.file}: VIP {t.vip}"]
    for name, s in t.sites.items():
        router = (
            f"instances peer with the upstream {s['router']} directly, MED {s['cost']}"
            if s.get("direct")
            else f"router {s['router']}, MED {s['cost']} upstream"
        )
        out.append(f"  site {name}: {router}, instances {', '.join(s['instances'])}")
    out.append("routes to the VIP before" + (" the failure:" if t.failure else ":"))
    out += [f"  {r}: via {', '.join(h) or 'nothing'}" for r, h in t.routes_before.items()]
    if t.failure:
        out.append(f"failure: {t.failure} ({f.target}) at t = 0")
        out.append("routes to the VIP after the failure:")
        out += [f"  {r}: via {', '.join(h) or 'nothing'}" for r, h in t.routes_after.items()]
        conv = "not within 10 s" if f.route_s is None else f"{f.route_s:.3f} s"
        ok = "never" if f.recovery_s is None else f"{f.recovery_s:.3f} s"
        out.append(f"  routers converged after {conv}; new connections succeed again after {ok}")
    out.append("")
    out.append(
        "long-lived flows (client port -> backend): the site/instance that carried it before;"
        + (" every instance that saw it after t = 0; how it ended" if t.failure else " after")
    )
    out.append(f"  {'port':>6}  {'backend':<16} {'before':<18} {'after':<34} outcome (worst stall)")
    for p in f.per_flow:
        if p["before"] is None and "t_s" in p:
            continue
        out.append(
            f"  {p['sport']:>6}  {p['backend'] or '–':<16} {_where(t, p['before']):<18}"
            f" {_where(t, p['after']):<34} {p['outcome']} ({p['max_stall_s']:.3f} s)"
        )
    news = [p for p in f.per_flow if "t_s" in p and p["t_s"] >= 0]
    if news:
        out.append("")
        out.append("new connections opened after t = 0:")
        by: dict[str, list[str]] = {}
        for p in news:
            key = _where(t, p["after"][-1:] if p["after"] else None)
            by.setdefault(key, []).append(f"{p['outcome']} {p['backend'] or ''}".strip())
        for where, items in sorted(by.items()):
            counts: dict[str, int] = {}
            for i in items:
                counts[i] = counts.get(i, 0) + 1
            out.append(
                f"  via {where}: {len(items)} ("
                + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                + ")"
            )
    out.append("")
    out.append(
        f"flows carried before: {_counts(f.carriers_before)}; after: {_counts(f.carriers_after)};"
        f" surviving flows moved to another instance: {f.flows_moved}"
    )
    return "\n".join(out) + "\n"


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def lab_trace_anycast(
    file: str | None,
    *,
    failure: str | None = None,
    as_json: bool = False,
    name: str | None = None,
) -> int:
    """`v6lb lab trace --mode anycast FILE [--failure F] [--name NAME] [--json]`."""
    import sys

    from v6lb.lab.failover import FAILURES
    from v6lb.lab.plan import LabError, check_name

    if not file:
        raise LabError(
            "--mode anycast builds its own two-site lab from a file",
            "give it: v6lb lab trace --mode anycast examples/anycast-sites.yaml",
        )
    if name is not None:
        check_name(name)
    given = failure
    failure = None if given in (None, "none") else given
    if failure is not None and failure not in FAILURES:
        raise LabError(f"unknown --failure {given!r}", f"use none or one of: {', '.join(FAILURES)}")

    def log(msg: str) -> None:
        sys.stderr.write(f"v6lb lab trace: {msg}\n")

    t = run_anycast_trace(file, failure, log=log, name=name)
    sys.stdout.write(t.to_json() + "\n" if as_json else format_anycast_trace(t))
    return 0
