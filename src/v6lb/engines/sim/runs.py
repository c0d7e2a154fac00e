"""The simulator runs behind `v6lb explain` and `v6lb demo`.

Load a scenario file (or the built-in one), choose the modes it configures, run one
mode (or a failure walk-through) and explain it hop by hop, and write what the demo
leaves behind: one pcap per link that carried packets, ``report.html`` and
``explain.json``. The CLI only parses its arguments and prints.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from v6lb.engines.sim.scenario import ScenarioResult, modes_available, run_scenario
from v6lb.errors import UsageError
from v6lb.model.config import Config, load_topology
from v6lb.model.explain import Explanation, explain
from v6lb.model.failures import FAILURES
from v6lb.model.modes import NAMES
from v6lb.model.topology import Topology
from v6lb.render.report import render_report

__all__ = [
    "FAILURE_MODES",
    "default_scenario",
    "explain_run",
    "load_scenario",
    "pick_modes",
    "save_pcaps",
    "write_report",
]

FAILURE_MODES: Final = {f.name: f.sim_mode for f in FAILURES if f.sim_mode is not None}
"""Each failure walk-through the simulator runs and the mode it runs under by default
(:data:`v6lb.model.failures.FAILURES`: one set of names with the lab)."""

_EMPTY_PCAP: Final = 24  # a file header and no packet: the link carried nothing


def default_scenario() -> Path:
    """The embedded default: the IPv6 Kubernetes-style scenario shipped with v6lb."""
    return Path(__file__).resolve().parents[2] / "data" / "eks-ipv6.yaml"


def load_scenario(path: str | None) -> tuple[Config, Topology]:
    """The config and topology of ``path`` (None: the built-in scenario)."""
    file = Path(path) if path else default_scenario()
    if not file.is_file():
        raise UsageError(f"{file}: no such file")
    return load_topology(file)


def pick_modes(config: Config, wanted: str | None) -> list[str]:
    """``[wanted]``, or every mode the file configures; a usage error names what is missing."""
    avail = modes_available(config)
    if wanted is None:
        return avail
    if wanted not in NAMES:
        raise UsageError(f"unknown mode {wanted!r}; choose one of: {', '.join(NAMES)}")
    if wanted not in avail:
        if wanted == "anycast":  # not a VIP mode: a dsr-* VIP inside a prefix bgp: announces
            fix = (
                "add a bgp: section that announces a prefix holding one of its VIPs"
                " (see examples/anycast-sites.yaml and docs/anycast.md)"
            )
        elif wanted == "npt":
            fix = "add an npt: section (inside and outside prefix pairs)"
        else:
            fix = f"add a VIP with mode {wanted}"
        raise UsageError(
            f"mode {wanted!r} is not configured in this file (it has: {', '.join(avail)})", fix
        )
    return [wanted]


def explain_run(
    config: Config, topo: Topology, mode: str, failure: str | None = None
) -> tuple[Explanation, ScenarioResult]:
    """Run ``mode`` (under ``failure``) in the simulator and explain it."""
    res = run_scenario(config, topo, mode, failure=failure)
    return explain(res.mode, res.hops, res.facts, res.nodes), res


def save_pcaps(folder: Path, res: ScenarioResult) -> list[Path]:
    """One pcap per link that carried a packet, under ``folder``; the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for link, data in sorted(res.pcaps.items()):
        if len(data) <= _EMPTY_PCAP:
            continue
        f = folder / f"{link}.pcap"
        f.write_bytes(data)
        written.append(f)
    return written


def write_report(
    out: Path, exps: Sequence[Explanation], fails: Sequence[Explanation]
) -> tuple[Path, Path]:
    """``report.html`` and ``explain.json`` (every mode, then every failure) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    report, facts = out / "report.html", out / "explain.json"
    report.write_text(render_report(list(exps), failures=list(fails)), encoding="utf-8")
    facts.write_text(
        json.dumps([e.to_dict() for e in [*exps, *fails]], indent=2, default=str), encoding="utf-8"
    )
    return report, facts
