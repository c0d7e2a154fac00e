"""`v6lb lab trace`: capture every link of a running lab while the client makes real requests.

One ``tcpdump -Q in`` runs on every bridge port in the switch namespace (the
frames each node sends on the link), ``--immediate-mode -U``, IPv6 only. The
client then runs ``curl`` through the lab (a GET, and a POST larger than the path
MTU) to the VIP of the mode (``npt``: to an inside host's mapped address, and that
host's own connection out, :mod:`v6lb.lab.npt_trace`), from ports it picks in
40000-59999. The captures are stopped and merged into one pcap per link,
``<out>/<link>.pcap`` (Ethernet, nanosecond timestamps), and ``<out>/trace.json`` records what was done: the VIP,
the client's address and ports, the answers of the HTTP servers, the lab's MACs
and each link's addresses. :func:`trace_hops` turns a trace directory back into
:class:`~v6lb.model.hops.Hop` records (:mod:`v6lb.model.capture`), and
:func:`explain_trace` into the same explanation ``v6lb explain`` prints.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from v6lb.engines.procs import process_state
from v6lb.lab.curl import curl
from v6lb.lab.npt_trace import Listener, npt_facts, npt_target, outbound_request
from v6lb.lab.plan import LAB_ROOT, LabError, LabPlan
from v6lb.lab.proxy_trace import PROXY_MODES, annotate, attach_backend_logs, proxy_facts
from v6lb.model.capture import hops_from_pcaps
from v6lb.model.config import NatOptions
from v6lb.model.explain import Explanation, explain
from v6lb.model.hops import Hop
from v6lb.model.modes import modes_where
from v6lb.model.topology import NodeType
from v6lb.wire.pcap import LINKTYPE_ETHERNET, PcapError, Record, read, write

__all__ = [
    "MODES",
    "TRACE_FILE",
    "Trace",
    "default_location",
    "explain_trace",
    "load_trace",
    "run_trace",
    "trace_hops",
]

MODES: Final = modes_where(test=lambda m: bool(m.engines))  # every mode an engine serves
TRACE_FILE: Final = "trace.json"
POST_BYTES: Final = 100_000
LARGE_GET_BYTES: Final = 20_000
"""The response size the third request asks for (``GET /?bytes=N``): many full-size reply
segments, so a smaller link on the way back makes a router send Packet Too Big."""
_LB_STATE: Final = {
    "nat": "a conntrack entry per flow (nf_conntrack in the LB's kernel: the DNAT and its reverse)",
    "dsr": "nothing per flow: nft hashes the 5-tuple into the VIP's Maglev map on every packet",
}


@dataclass(slots=True)
class Trace:
    """A trace directory: its metadata and, per link, the pcap bytes (absent: missing file)."""

    dir: Path
    meta: dict[str, Any]
    pcaps: dict[str, bytes]
    packets: dict[str, int]  # link -> IPv6 frames in its pcap; -1: missing or unreadable


def default_location(name: str, mode: str, root: Path = LAB_ROOT) -> tuple[Path, str]:
    """Where a trace goes without ``--out``: flat files ``trace-<mode>.*`` in the lab dir.

    Flat, so that ``lab down`` (which removes the lab dir's files) removes them too.
    """
    return root / name, f"trace-{mode}."


def _state(name: str, root: Path) -> dict[str, Any]:
    path = root / name / "state.json"
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        raise LabError(
            f"no lab named {name!r} is up (no {path})", "start it with `v6lb lab up FILE`"
        ) from None
    if state.get("phase") != "up":
        raise LabError(f"lab {name!r} is {state.get('phase')}, not up", "run `v6lb lab up` again")
    return state


def _plan(name: str, root: Path) -> LabPlan:
    from v6lb.lab.netns import load_plan

    state = _state(name, root)
    return load_plan(str(state["file"]), name, root=root)


def _client(plan: LabPlan) -> str:
    for n in plan.topo.nodes:
        if n.role == "client":
            return n.name
    raise LabError("the topology has no node with role client", "give one node `role: client`")


def _lanes(plan: LabPlan) -> dict[str, str]:
    out = {}
    for n in plan.topo.nodes:
        if n.type is NodeType.LB:
            out[n.name] = "lb"
        elif n.role == "client":
            out[n.name] = "client"
        elif n.type is NodeType.ROUTER:
            out[n.name] = "router"
        else:
            out[n.name] = "pod"
    return out


def _start_capture(sw: str, port: str, path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    err = path.with_suffix(".err")
    argv = ["ip", "netns", "exec", sw, "tcpdump", "-i", port, "-Q", "in", "--immediate-mode"]
    # -B: a 16 MiB ring (libpcap's default is 2 MiB): a tcpdump kept from the CPU on a
    # busy machine while the trace's POST streams past would drop what does not fit
    argv += ["-U", "-B", "16384", "-Z", "root", "-w", str(path), "ip6"]
    with err.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=fh)
    return proc, err


def _waiting(pid: int) -> bool:
    """Whether process ``pid`` sleeps (blocked in poll: nothing left to read), or is gone.

    A tcpdump with a packet in its ring has been woken: runnable (R) until it has run,
    however long a busy machine keeps it from the CPU.
    """
    try:
        return process_state(pid) in ("S", "Z", "X")
    except OSError:
        return True


def settle(
    files: list[Path],
    quiet: float = 0.3,
    limit: float = 3.0,
    pids: Sequence[int] = (),
) -> None:
    """Wait until every capture file (tcpdump -U writes each packet) stops growing for
    ``quiet`` seconds, and each capture process in ``pids`` sleeps, at most ``limit``:
    SIGINT ends tcpdump without reading what its socket still holds, which on a busy
    machine can be the whole of a short exchange. A tcpdump kept from the CPU leaves
    its file unchanged too; it is not asleep."""
    deadline = time.monotonic() + limit
    sizes: list[int] = []
    while time.monotonic() < deadline:
        now = [f.stat().st_size if f.exists() else 0 for f in files]
        if now == sizes and all(_waiting(p) for p in pids):
            return
        sizes = now
        time.sleep(quiet)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_trace(
    name: str,
    mode: str,
    out: Path | None = None,
    *,
    prefix: str = "",
    root: Path = LAB_ROOT,
    ports: tuple[int, ...] = (),
) -> Trace:
    """Capture every link while the client sends a GET and a large POST to ``mode``'s VIP.

    ``ports``: the client ports of the GET and the POST (default: random ones).
    """
    if mode not in MODES:
        raise LabError(
            f"lab trace runs the modes {', '.join(MODES)}, not {mode!r}",
            "pick one of those with --mode",
        )
    plan = _plan(name, root)
    npt = npt_target(plan) if mode == "npt" else None  # no VIP: the server's mapped address
    vip = next((v for v in plan.config.vips if str(v.mode) == mode), None)
    if npt is not None:
        dest, dport, dname = npt.outside, 80, f"npt {npt.pair[0]} <-> {npt.pair[1]}"
    elif vip is not None:
        dest, dport, dname = vip.address, vip.ports[0], vip.name
    else:
        raise LabError(f"the lab's file has no VIP in mode {mode}", "add one, or pick another mode")
    client = _client(plan)
    caddr = str(plan.topo.addresses(client)[0])
    if out is None:
        out, prefix = default_location(name, mode, root)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{prefix}*.pcap"):
        old.unlink()
    raw = Path(tempfile.mkdtemp(prefix="v6lb-trace-"))
    try:  # a failed trace removes its raw captures too
        procs: list[subprocess.Popen[bytes]] = []
        started: list[tuple[str, Path, Path]] = []  # link, pcap, stderr
        listener = Listener(plan, client, caddr, plan.labdir) if npt is not None else None
        outbound: dict[str, Any] | None = None
        try:
            for i in plan.ifaces:
                proc, err = _start_capture(plan.switch_ns, i.port, raw / f"{i.port}.pcap")
                procs.append(proc)
                started.append((i.link, raw / f"{i.port}.pcap", err))
            deadline = time.monotonic() + 10
            for (_, _, err), proc in zip(started, procs, strict=True):
                while b"listening on" not in err.read_bytes():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise LabError(f"tcpdump did not start: {err.read_text().strip()}")
                    time.sleep(0.05)
            url = f"http://[{dest}]:{dport}/"
            ns = plan.namespaces[client]
            requests = []
            for k, (method, query, body) in enumerate(_requests(large=mode not in PROXY_MODES)):
                _forget_path_mtus(plan)
                port, answer, text = curl(ns, url + query, body, ports[k] if k < len(ports) else 0)
                if answer is None:
                    raise LabError(f"{method} {url}{query}: the answer is not JSON: {text!r}")
                pad = answer.pop("pad", None)
                requests.append(
                    {
                        "method": method,
                        "path": "/" + query,
                        "client_port": port,
                        "bytes": len(body or b""),
                        "response_bytes": len(
                            json.dumps(answer if pad is None else {**answer, "pad": pad})
                        )
                        + 1,
                        "answer": answer,
                    }
                )
            if npt is not None:  # and the inside host's own connection out, to the client
                outbound = outbound_request(plan, npt, caddr)
            settle([pcap for _, pcap, _ in started], pids=[p.pid for p in procs])  # last ACKs
        finally:
            _stop(procs)
            if listener is not None:
                listener.close()
        initiators: list[list[Any]] = []
        if mode in PROXY_MODES:  # the LB's own connection to the pod: found from nginx's log
            pods = [n.name for n in plan.topo.nodes if n.name not in plan.lb_configs]
            initiators = attach_backend_logs(plan.labdir, pods, requests)
        if outbound is not None:
            initiators = [[outbound["source"], outbound["source_port"]]]
        links: dict[str, str] = {}
        for lk in plan.topo.links:
            records: list[Record] = []
            for link, path, _ in started:
                if link == lk.name and path.exists():
                    records += list(read(path.read_bytes()))
            records.sort(key=lambda r: r.ts_ns)
            fname = f"{prefix}{lk.name}.pcap"
            (out / fname).write_bytes(write(records, LINKTYPE_ETHERNET))
            links[lk.name] = fname
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    snat = None
    if vip is not None and isinstance(vip.options, NatOptions) and vip.options.snat is not None:
        snat = [str(vip.options.snat), *vip.options.snat_ports]
    meta = {
        "lab": name,
        "file": str(plan.file),
        "mode": mode,
        "vip": str(dest),
        "vip_name": dname,
        "vip_port": dport,
        "client_node": client,
        "client": caddr,
        "client_ports": [r["client_port"] for r in requests],
        "requests": requests,
        "links": links,
        "macs": {i.mac: i.node for i in plan.ifaces},
        "endpoints": {
            lk.name: {str(a): att.node for att in lk.endpoints for a in att.addresses}
            for lk in plan.topo.links
        },
        "nodes": _lanes(plan),
        "snat": snat,
        "npt": None
        if npt is None
        else {
            "inside": str(npt.inside),
            "outside": str(npt.outside),
            "pair": list(npt.pair),
            "records": npt.records,
        },
        "outbound": outbound,
        "initiators": initiators,
        "proxy_engine": _state(name, root).get("proxy") if mode in PROXY_MODES else None,
        "time": time.time(),
    }
    (out / f"{prefix}{TRACE_FILE}").write_text(json.dumps(meta, indent=2) + "\n")
    return load_trace(out, prefix)


def _forget_path_mtus(plan: LabPlan) -> None:
    """Flush every node's cached routes (the path MTUs learnt from Packet Too Big).

    Each request then starts as the simulator's replay of it does, from nothing
    learnt: a client that still knew a path MTU of 1280 for the VIP would
    advertise MSS 1220 and the backend's replies would fit, and a backend that
    knew it for the client would never send a full-size segment (nor advertise a
    full MSS). The kernel keeps them 10 minutes (``net.ipv6.route.mtu_expires``).
    """
    for ns in plan.namespaces.values():
        subprocess.run(
            ["ip", "-n", ns, "-6", "route", "flush", "cache", "table", "all"],
            capture_output=True,
            check=False,
            timeout=10,
        )


def _requests(*, large: bool = True) -> list[tuple[str, str, bytes | None]]:
    """(method, query, body) of each request a trace makes, in order.

    A GET; a POST larger than any path MTU (the client's own segments meet the
    smaller link); with ``large``, a GET of a large response (the backend's
    full-size reply segments meet it, so a router sends Packet Too Big to the
    address they come from: the VIP, or the mapped address, which the LB must
    pass on). The proxy labs' nginx answers every request with the same short
    JSON, so a proxy trace makes the first two only.
    """
    out: list[tuple[str, str, bytes | None]] = [
        ("GET", "", None),
        ("POST", "", bytes(range(256)) * (POST_BYTES // 256)),
    ]
    if large:
        out.append(("GET", f"?bytes={LARGE_GET_BYTES}", None))
    return out


def load_trace(directory: Path, prefix: str = "") -> Trace:
    """A trace written by :func:`run_trace`; missing or unreadable pcaps count -1."""
    try:
        meta: dict[str, Any] = json.loads((directory / f"{prefix}{TRACE_FILE}").read_text())
    except (OSError, ValueError):
        raise LabError(
            f"{directory} has no readable {TRACE_FILE}", "run `v6lb lab trace --out DIR` first"
        ) from None
    pcaps: dict[str, bytes] = {}
    packets: dict[str, int] = {}
    for link, fname in meta.get("links", {}).items():
        path = directory / fname
        try:
            data = path.read_bytes()
            packets[link] = sum(1 for _ in read(data))
            pcaps[link] = data
        except (OSError, PcapError):
            packets[link] = -1
    return Trace(directory, meta, pcaps, packets)


def trace_hops(trace: Trace) -> list[Hop]:
    """The hops of the traced connections, matched across links."""
    m = trace.meta
    return hops_from_pcaps(
        trace.pcaps,
        macs=m["macs"],
        endpoints=m["endpoints"],
        client=m["client"],
        client_ports=m["client_ports"],
        initiators=[(str(a), int(p)) for a, p in m.get("initiators") or []],
    )


def explain_trace(trace: Trace, hops: list[Hop] | None = None) -> Explanation:
    """The explanation ``v6lb explain`` prints, from the captured hops and the servers' answers."""
    m = trace.meta
    hops = trace_hops(trace) if hops is None else hops
    client = m["client"]
    answer = next((r["answer"] for r in m["requests"] if r.get("answer")), None) or {}
    peer = answer.get("peer") or [None]
    local = answer.get("local") or [None]
    nodes: dict[str, str] = m["nodes"]
    lbs = {n for n, lane in nodes.items() if lane == "lb"}
    reply_via_lb = any(  # ICMPv6 errors are not replies, also not one passed on in a tunnel
        (h.sender in lbs or h.receiver in lbs)
        and h.pkt.error is None
        and h.pkt.carried.proto != "icmpv6"
        and h.pkt.carried.dst.addr == client
        for h in hops
    )
    mode = m["mode"]
    facts: dict[str, object] = {
        "vip": m["vip"],
        "vip_name": m["vip_name"],
        "vip_mode": mode,
        "client": client,
        "client_ports": m["client_ports"],
        "backend": answer.get("server"),
        "backend_node": answer.get("node"),
        "backend_saw_source": peer[0],
        "backend_saw_destination": local[0],
        "reply_via_lb": reply_via_lb,
        "lb_state": _LB_STATE["nat" if mode == "nat" else "dsr"],
        "responses": [r["answer"] for r in m["requests"]],
        "source": "lab capture",
    }
    if mode == "npt":
        facts = npt_facts(m, hops, reply_via_lb)
    if mode in PROXY_MODES:
        facts = proxy_facts(m, hops, reply_via_lb)
        annotate(hops, m, nodes)
    return explain(mode, hops, facts, nodes)
