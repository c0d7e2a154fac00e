"""The deterministic in-process IPv6 network simulator (an engine: it may import model/core/wire).

``run_scenario(config, topology, mode)`` is the public entry; see :mod:`.scenario`.
"""

from v6lb.engines.sim.scenario import (
    FAILURES,
    MODES,
    ScenarioResult,
    modes_available,
    run_scenario,
)

__all__ = ["FAILURES", "MODES", "ScenarioResult", "modes_available", "run_scenario"]
