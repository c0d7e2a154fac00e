"""`v6lb lab trace --mode npt`: the NPT server reached at its mapped address, and its own connection out.

NPT is not a VIP (docs/architecture.md): the client connects to the mapped (outside)
address of a host inside an ``npt:`` pair, which the LB's kernel translates
statelessly (ip6tables DNPT/SNPT). The trace adds a second connection the other
way: the inside host opens one to a listener on the client, and must arrive
from its mapped address. Its (inside address, port) is an *initiator* of
:func:`v6lb.model.capture.hops_from_frames`, so its packets are kept in the hop
table next to the client's.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any, Final

from v6lb.core.nptv6 import NptMapping
from v6lb.lab.curl import curl
from v6lb.lab.plan import LabError, LabPlan
from v6lb.model.hops import Hop

__all__ = ["LISTEN_PORT", "NptTarget", "npt_facts", "npt_target", "outbound_request", "Listener"]

LISTEN_PORT: Final = 8080  # the client's listener for the inside host's own connection
_LB_STATE: Final = "none: stateless prefix translation (RFC 6296), nothing per flow"
_BALANCING: Final = (
    "NPTv6 maps the whole inside prefix 1:1 onto the outside prefix and balances nothing;"
    " balancing comes from DNS: one AAAA record per backend (its mapped address), and each"
    " client picks one."
)


@dataclass(frozen=True, slots=True)
class NptTarget:
    """The inside host the trace talks to, and its mapped (outside) address."""

    node: str
    inside: IPv6Address
    outside: IPv6Address
    pair: tuple[str, str]  # (inside prefix, outside prefix)
    records: dict[str, str]  # every served inside host: mapped address -> inside address


def npt_target(plan: LabPlan) -> NptTarget:
    """The first lab HTTP server inside an ``npt:`` pair the lab's LBs translate."""
    if not any(c.npt for c in plan.lb_configs.values()):
        raise LabError(
            "no LB node of the lab translates the file's npt: pairs",
            "add an npt: pair and `serves: [npt]` on an LB node (examples/lab-modes.yaml)",
        )
    found: list[tuple[str, IPv6Address, IPv6Address, tuple[str, str]]] = []
    for pair in plan.config.npt:
        mapping = NptMapping(pair.inside, pair.outside)
        for server in plan.servers:
            if server.address not in pair.inside:
                continue
            outside = mapping.translate(server.address)
            if isinstance(outside, IPv6Address):  # else an RFC 6296 0xFFFF case: not mapped
                found.append(
                    (server.node, server.address, outside, (str(pair.inside), str(pair.outside)))
                )
    if not found:
        raise LabError(
            "no lab HTTP server lies inside an npt: inside prefix",
            "give a host (type host or backend) an address inside the pair's inside prefix",
        )
    node, inside, outside, prefixes = found[0]
    records = {str(o): str(i) for _, i, o, _ in found}
    return NptTarget(node, inside, outside, prefixes, records)


class Listener:
    """``v6lb.lab.httpd`` on the client node, for the inside host's own connection."""

    def __init__(self, plan: LabPlan, node: str, address: str, labdir: Path) -> None:
        self.ready = labdir / f"npt-listener-{node}.ready"
        self.ready.unlink(missing_ok=True)
        argv = ["ip", "netns", "exec", plan.namespaces[node], sys.executable, "-m"]
        argv += ["v6lb.lab.httpd", "--node", node, "--address", address]
        argv += ["--port", str(LISTEN_PORT), "--ready", str(self.ready)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 15
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.close()
                raise LabError(
                    f"the listener on {node} port {LISTEN_PORT} did not start: {err.strip()}",
                    f"free port {LISTEN_PORT} in the {node} namespace",
                )
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.ready.unlink(missing_ok=True)


def outbound_request(plan: LabPlan, target: NptTarget, client: str) -> dict[str, Any]:
    """The inside host's own GET to the client's listener, from a port in 40000-59999."""
    ns = plan.namespaces[target.node]
    url = f"http://[{client}]:{LISTEN_PORT}/"
    port, answer, _ = curl(ns, url, None)
    if answer is None:
        raise LabError(f"GET {url} from {target.node}: the answer is not JSON")
    return {
        "node": target.node,
        "source": str(target.inside),
        "source_port": port,
        "expected_source": str(target.outside),
        "answer": answer,
    }


def npt_facts(m: dict[str, Any], hops: list[Hop], reply_via_lb: bool) -> dict[str, object]:
    """The facts of an npt trace, as the simulator's npt walk-through names them."""
    answer = next((r["answer"] for r in m["requests"] if r.get("answer")), None) or {}
    peer = answer.get("peer") or [None]
    local = answer.get("local") or [None]
    npt = m["npt"]
    out = m.get("outbound") or {}
    seen_out = ((out.get("answer") or {}).get("peer") or [None])[0]
    mapped_out = [
        h
        for h in hops
        if h.pkt.proto == "tcp"
        and h.pkt.src.addr == npt["outside"]
        and h.pkt.src.port == out.get("source_port")
    ]
    return {
        "vip": npt["outside"],
        "vip_name": None,
        "vip_mode": "npt",
        "client": m["client"],
        "client_ports": m["client_ports"],
        "backend": npt["inside"],
        "backend_node": answer.get("node"),
        "backend_saw_source": peer[0],
        "backend_saw_destination": local[0],
        "client_address_via": "the socket's peer address",
        "reply_via_lb": reply_via_lb,
        "lb_state": _LB_STATE,
        "responses": [r["answer"] for r in m["requests"]],
        "aaaa_records": sorted(npt["records"]),
        "mapped_to": npt["records"],
        "chosen_record": npt["outside"],
        "prefixes": npt["pair"],
        "balancing": _BALANCING,
        "outbound": {
            "from": f"{out.get('node')} [{out.get('source')}]:{out.get('source_port')}",
            "client_saw_source": seen_out,
            "expected_source": out.get("expected_source"),
            "translated": seen_out == out.get("expected_source"),
            "hops_from_mapped_address": len(mapped_out),
        },
        "source": "lab capture",
    }
