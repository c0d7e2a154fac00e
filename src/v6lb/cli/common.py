"""What several command groups share: the scenario loader, the mode picker, the console."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from v6lb import MODES
from v6lb.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from v6lb.engines.sim.scenario import ScenarioResult
    from v6lb.model.config import Config
    from v6lb.model.explain import Explanation
    from v6lb.model.topology import Topology

__all__ = [
    "FAILURES",
    "UsageError",
    "default_scenario",
    "load_scenario",
    "pick_modes",
    "run_mode",
    "wide_console",
]


def default_scenario() -> Path:
    """The embedded default: the IPv6 Kubernetes-style scenario shipped with v6lb."""
    return Path(__file__).resolve().parent.parent / "data" / "eks-ipv6.yaml"


FAILURES = {
    "backend-dies": "nat",
    "lb-instance-dies": "anycast",
    "packet-too-big": "dsr-ip6ip6",
}


def load_scenario(path: str | None) -> tuple[Config, Topology]:
    from v6lb.model.config import load_topology

    file = Path(path) if path else default_scenario()
    if not file.is_file():
        raise UsageError(f"{file}: no such file")
    return load_topology(file)


def run_mode(
    config: Config, topo: Topology, mode: str, failure: str | None = None
) -> tuple[Explanation, ScenarioResult]:
    from v6lb.engines.sim.scenario import run_scenario
    from v6lb.model.explain import explain

    res = run_scenario(config, topo, mode, failure=failure)
    return explain(res.mode, res.hops, res.facts, res.nodes), res


def pick_modes(config: Config, wanted: str | None) -> list[str]:
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


def wide_console() -> Console:
    """A console at least 160 columns wide: the hop tables need it."""
    from rich.console import Console

    return Console(width=max(160, Console().width), emoji=False, highlight=False)
