"""`v6lb lab diff`: a lab trace against the simulator, link by link.

:func:`diff_trace` replays each client port a trace captured in the simulator
(:func:`~v6lb.engines.sim.scenario.seed_for_client_port` picks the seed that gives
the same port) and compares, per link, the tuples the simulator predicts with those
captured (:mod:`v6lb.model.diff`). The result says what to print; the CLI prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from v6lb.engines.sim.scenario import run_scenario, seed_for_client_port
from v6lb.errors import UsageError
from v6lb.lab.netns import resolve_name
from v6lb.lab.trace import TRACE_FILE, default_location, load_trace, run_trace, trace_hops
from v6lb.model.config import load_topology
from v6lb.model.diff import Difference, Snat, Tuple4, compare, link_tuples
from v6lb.model.modes import MODES

__all__ = ["SimDiff", "diff_trace"]


@dataclass(slots=True)
class SimDiff:
    """What the simulator predicted and the lab captured, per link, and their differences."""

    name: str
    mode: str
    where: Path  # the trace directory
    lab_ports: dict[int, str]  # captured client port -> its label (C1, C2, ...)
    same_ports: bool  # the simulator used the captured ports themselves
    predicted: dict[str, set[Tuple4]]
    captured: dict[str, set[Tuple4]]
    diffs: list[Difference]


def diff_trace(
    name: str | None,
    mode: str,
    trace_dir: Path | None = None,
    *,
    say: Callable[[str], None] = print,
) -> SimDiff:
    """Compare the trace in ``trace_dir`` (default: the lab's trace of ``mode``, taken now
    if there is none; ``say`` tells so) with the simulator's prediction."""
    if mode in MODES and MODES[mode].is_proxy:
        raise UsageError(
            f"lab diff does not compare {mode} yet: the proxy's backend connection has"
            " its own ephemeral port and scheduler state, which the simulator does not replay;"
            f" use `v6lb lab trace --mode {mode}` and `v6lb explain --mode {mode}`"
        )
    name = resolve_name(name, None)
    where, prefix = (trace_dir, "") if trace_dir else default_location(name, mode)
    if not (where / f"{prefix}{TRACE_FILE}").exists() and not trace_dir:
        say(f"no trace of {mode} yet: tracing into {where}/{prefix}*")
        run_trace(name, mode, where, prefix=prefix)
    trace = load_trace(where, prefix)
    meta = trace.meta
    if meta["mode"] != mode:
        raise UsageError(f"{where} is a trace of {meta['mode']}, not {mode}")
    file = Path(meta["file"])
    if not file.is_file():
        raise UsageError(f"{file}: no such file")
    config, topo = load_topology(file)
    snat = Snat(*meta["snat"]) if meta.get("snat") else None
    client = meta["client"]
    lab_ports = {p: f"C{k}" for k, p in enumerate(meta["client_ports"], 1)}
    lbs = {n.name for n in topo.lbs()}
    captured = link_tuples(
        trace_hops(trace), client=client, client_ports=lab_ports, snat=snat, lbs=lbs
    )
    predicted: dict[str, set[Tuple4]] = {}
    same = True
    asked = {int(r["client_port"]): r for r in meta.get("requests", [])}
    for port, label in lab_ports.items():
        req = asked.get(port, {})
        size = int(req.get("bytes", 5))
        res = run_scenario(
            config,
            topo,
            mode,
            seed=seed_for_client_port(port),
            body=(bytes(range(256)) * (size // 256 + 1))[:size],
            path=str(req.get("path", "")),
            npt_target=(meta.get("npt") or {}).get("outside"),
        )
        first = next(h for h in res.hops if h.pkt.innermost.src.addr == client)
        sim_port = first.pkt.innermost.src.port or 0
        same = same and sim_port == port
        for link, tuples in link_tuples(
            res.hops, client=client, client_ports={sim_port: label}, snat=snat, lbs=lbs
        ).items():
            predicted.setdefault(link, set()).update(tuples)
    diffs = compare(predicted, captured, pcap_sizes=trace.packets)
    return SimDiff(name, mode, where, lab_ports, same, predicted, captured, diffs)
