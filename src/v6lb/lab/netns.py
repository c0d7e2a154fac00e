"""`v6lb lab up|down|status|exec`: build a :class:`~v6lb.lab.plan.LabPlan` in namespaces.

``up`` writes ``<labdir>/state.json`` before it creates anything, so ``down``
(by file or by ``--name``) can always find what to remove; ``down`` also removes
every namespace whose name starts with ``v6lb-<name>-``, so it works after a
crash or a lost lab dir, and it is idempotent.

Processes are started in their own session, with their output in
``<labdir>/<node>.<kind>.log``: ``v6lb run`` on each LB node (``--netns``,
``--instance``, ``--control-socket <labdir>/<node>.sock``), ``v6lb backend`` on
each DSR backend, :mod:`v6lb.lab.httpd` on every node holding a kernel-mode
backend address, and nginx (:mod:`v6lb.lab.nginx`) on every node backing a
proxy VIP; an LB node with proxy VIPs gets them on ``lo`` and ``run --proxy
ENGINE``. ``down`` sends SIGTERM to the ``run`` processes first (they remove
their nft tables, ip6tables rules and routes), then stops the rest, kills
whatever is left in the namespaces, and deletes the namespaces (which deletes
their veths and bridges). The lab creates nothing in the host's namespace.

:func:`build_network` creates only a plan's network (namespaces, links, addresses,
routes), for a lab that starts its own processes (:mod:`v6lb.lab.failover`);
``down`` removes it the same way.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

from v6lb.engines.control import ControlError, query
from v6lb.engines.planes import Role, names
from v6lb.engines.procs import process_state
from v6lb.lab import nginx
from v6lb.lab.plan import (
    LAB_ROOT,
    LabError,
    LabPlan,
    check_name,
    lab_namespace,
    plan_lab,
    switch_namespace,
)
from v6lb.model.config import ConfigError, load_topology
from v6lb.model.config_dump import dump

__all__ = [
    "build_network",
    "lab_down",
    "lab_exec",
    "lab_status",
    "lab_up",
    "list_labs",
    "load_plan",
    "resolve_name",
    "restore_routes",
    "switch_namespace",
]

_V6LB = [sys.executable, "-m", "v6lb.cli"]


def _sh(
    *argv: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    if check and r.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {(r.stderr or r.stdout).strip()}")
    return r


def _batch(ns: str, lines: Sequence[str], *, family: str = "") -> None:
    if not lines:
        return
    argv = ["ip", "-n", ns, *([family] if family else []), "-batch", "-"]
    _sh(*argv, stdin="\n".join(lines) + "\n")


def _netns_list() -> list[str]:
    r = _sh("ip", "-j", "netns", "list", check=False)
    try:
        return [str(x["name"]) for x in json.loads(r.stdout or "[]")]
    except (ValueError, KeyError, TypeError):
        return []


def _write_state(plan: LabPlan, processes: list[dict[str, Any]], phase: str) -> None:
    state = {
        "name": plan.name,
        "file": str(plan.file),
        "phase": phase,
        "created": time.time(),
        "switch_ns": plan.switch_ns,
        "proxy": plan.proxy_engine,
        "dataplane": plan.dataplane,
        "nodes": {
            n.name: {
                "type": str(n.type),
                "role": n.role,
                "netns": plan.namespaces[n.name],
                "interfaces": {i.link: i.name for i in plan.ifaces if i.node == n.name},
                "addresses": [str(a) for a in plan.topo.addresses(n.name)],
            }
            for n in plan.topo.nodes
        },
        "lbs": {
            node: {
                "instance": plan.lb_instances[node],
                "socket": str(plan.socket(node)),  # every `v6lb run` opens one
                "proxy": plan.proxy_engine if _proxy_listeners(plan, node) else None,
                "listeners": [f"[{a}]:{p}" for a, p in _proxy_listeners(plan, node)],
            }
            for node in plan.lb_configs
        },
        "nginx": {
            s.node: {
                "address": str(s.address),
                "proxy_protocol_ports": list(s.proxy_protocol_ports),
                "http_ports": list(s.http_ports),
                "access_log": str(nginx.files(plan.labdir, s.node).access_log),
                "error_log": str(nginx.files(plan.labdir, s.node).error_log),
            }
            for s in nginx.plan_nginx(plan)
        },
        "processes": processes,
    }
    tmp = plan.labdir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(plan.labdir / "state.json")


def _proxy_listeners(plan: LabPlan, node: str) -> list[tuple[IPv6Address, int]]:
    """The (VIP, port) pairs the proxy engine listens on, on this LB node."""
    names = {v.name for v in plan.lb_configs[node].vips}
    return [
        (v.address, port)
        for v in plan.config.vips
        if v.name in names and v.mode.is_proxy
        for port in v.ports
    ]


def _listening(ns: str) -> set[tuple[IPv6Address, int]]:
    """The TCP (address, port) pairs in LISTEN in namespace ``ns`` (from ``ss``)."""
    r = _sh("ip", "netns", "exec", ns, "ss", "-H", "-l", "-t", "-n", "-6", check=False)
    out: set[tuple[IPv6Address, int]] = set()
    for line in r.stdout.splitlines():
        cols = line.split()
        if len(cols) < 4 or ":" not in cols[3]:
            continue
        host, _, port = cols[3].rpartition(":")
        try:
            out.add((IPv6Address(host.strip("[]").split("%")[0]), int(port)))
        except ValueError:
            continue
    return out


def load_plan(path: str, name: str, *, root: Path = LAB_ROOT) -> LabPlan:
    try:
        config, topo = load_topology(path)
    except ConfigError as exc:
        raise LabError(str(exc), f"fix the file; `v6lb check {path}` shows every problem") from None
    return plan_lab(config, topo, name, root=root)


def lab_up(
    path: str,
    name: str,
    *,
    proxy: str | None = None,
    dataplane: str = "kernel",
    root: Path = LAB_ROOT,
    log: Any = sys.stderr,
) -> dict[str, Any]:
    """Build the lab; on any failure remove what was built and raise :class:`LabError`.

    ``proxy`` is the engine for proxy-* VIPs (a registered proxy plane, default ``builtin``);
    ``dataplane`` the L3/L4 data plane of the LB nodes (a registered one, default ``kernel``).
    """
    if os.geteuid() != 0:
        raise LabError("`v6lb lab up` needs root (network namespaces)", "run it with sudo")
    proxies, dataplanes = names(Role.PROXY), names(Role.DATAPLANE)
    if proxy is not None and proxy not in proxies:
        raise LabError(
            f"--proxy is {' or '.join(proxies)}, not {proxy!r}", f"use --proxy {proxies[0]}"
        )
    plan = load_plan(path, name, root=root)
    plan.proxy_engine = proxy or "builtin"
    if dataplane not in dataplanes:
        raise LabError(
            f"--dataplane is {' or '.join(dataplanes)}, not {dataplane!r}",
            f"use --dataplane {dataplanes[0]}",
        )
    plan.dataplane = dataplane
    if proxy is not None and not any(_proxy_listeners(plan, n) for n in plan.lb_configs):
        raise LabError(
            f"--proxy {proxy} needs a proxy-l4 or proxy-l7 VIP served by an LB node, and {path}"
            " has none",
            "drop --proxy (it chooses the proxy engine; the kernel modes need none)",
        )
    nginx.plan_nginx(plan)  # refuses port clashes before anything is created
    _refuse_existing(plan)
    plan.labdir.mkdir(parents=True, exist_ok=True)
    processes: list[dict[str, Any]] = []
    _write_state(plan, processes, "building")
    try:
        _build(plan)
        log.write(f"lab {name}: {len(plan.namespaces)} namespaces, {len(plan.bridges)} links\n")
        if plan.dataplane == "xdp":
            _xdp_peers(plan, log)
        _start(plan, processes, log)
        _write_state(plan, processes, "up")
    except BaseException:
        _write_state(plan, processes, "failed")
        lab_down(name, root=root, log=log)
        raise
    state: dict[str, Any] = json.loads((plan.labdir / "state.json").read_text())
    return state


def _xdp_peers(plan: LabPlan, log: Any) -> None:
    """What native XDP on the lab's veths needs (docs/dataplane-xdp.md, "veth").

    The XDP_PASS program on the bridge port of each LB's XDP interface
    (``lb.interfaces[0]``) and of its dsr-l2 egress link if that is another: a native
    XDP_TX or redirect to a veth reaches the peer only while the peer has an XDP
    program; the port goes with the switch namespace. And TX checksum offload off on the
    other nodes (:mod:`v6lb.lab.offload`).
    """
    from v6lb.engines.kernel.run import dsr_l2_links
    from v6lb.engines.xdp.run import attach_pass
    from v6lb.lab.offload import tx_checksum_off

    for node, ns in plan.namespaces.items():  # full checksums from every sender
        if node not in plan.lb_configs:
            tx_checksum_off(ns, [i.name for i in plan.ifaces if i.node == node])
    for node, derived in plan.lb_configs.items():
        if not derived.lb.interfaces:
            continue
        l2 = dsr_l2_links(derived)
        xdp = dict.fromkeys([derived.lb.interfaces[0], *(l2[1:] if l2 else ())])
        for i in plan.ifaces:
            if i.node == node and i.name in xdp:
                attach_pass(i.port, plan.switch_ns)
                log.write(
                    f"lab {plan.name}: {node}: XDP_PASS program on {i.port}, {i.name}'s peer\n"
                )


def _refuse_existing(plan: LabPlan) -> None:
    name = plan.name
    if (plan.labdir / "state.json").exists() or any(
        ns.startswith(f"v6lb-{name}-") for ns in _netns_list()
    ):
        raise LabError(
            f"a lab named {name!r} already exists",
            f"remove it with `v6lb lab down --name {name}`, or give another --name",
        )


def build_network(plan: LabPlan) -> None:
    """Create the plan's namespaces, bridges, veths, addresses and routes; start nothing.

    For a lab that runs its own processes (:mod:`v6lb.lab.failover`). ``state.json``
    is written first, so :func:`lab_down` removes everything afterwards, also after a
    crash; when building fails, what was built is removed before the error is raised.
    """
    _refuse_existing(plan)
    plan.labdir.mkdir(parents=True, exist_ok=True)
    _write_state(plan, [], "building")
    try:
        _build(plan)
    except BaseException:
        lab_down(plan.name, root=plan.labdir.parent, log=io.StringIO())
        raise
    _write_state(plan, [], "up")


def restore_routes(plan: LabPlan, node: str) -> None:
    """Add ``node``'s planned routes again (the kernel drops a route with its link's carrier)."""
    _batch(plan.namespaces[node], [f"route replace {r}" for r in plan.routes[node]], family="-6")


def _build(plan: LabPlan) -> None:
    sw = plan.switch_ns
    for ns in [sw, *plan.namespaces.values()]:
        _sh("ip", "netns", "add", ns)
    _sh(
        "ip", "netns", "exec", sw, "sysctl", "-q", "-w",
        "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
    )  # fmt: skip
    for node, ns in plan.namespaces.items():
        sysctls = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        fwd = "1" if node in plan.forwarding else "0"
        sysctls.append(f"net.ipv6.conf.all.forwarding={fwd}")
        sysctls += plan.sysctls.get(node, [])
        _sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", *sysctls)
    lines = ["link set lo up"]
    for br, mtu in plan.bridges.values():
        lines.append(
            f"link add {br} mtu {mtu} type bridge stp_state 0 forward_delay 0 mcast_snooping 0"
        )
        lines.append(f"link set {br} up")
    for i in plan.ifaces:
        br = plan.bridges[i.link][0]
        lines.append(
            f"link add {i.port} mtu {i.mtu} type veth peer name {i.name} address {i.mac}"
            f" mtu {i.mtu} netns {plan.namespaces[i.node]}"
        )
        lines.append(f"link set {i.port} master {br} up")
    _batch(sw, lines)
    for node, ns in plan.namespaces.items():
        lines = ["link set lo up"]
        for i in plan.ifaces:
            if i.node != node:
                continue
            lines.append(f"link set {i.name} up")
            lines += [f"addr add {a}/{i.prefixlen} dev {i.name} nodad" for a in i.addresses]
        lines += [f"addr add {a}/128 dev lo" for a in plan.loopbacks.get(node, ())]
        _batch(ns, lines)
        _batch(ns, [f"route replace {r}" for r in plan.routes[node]], family="-6")


def _spawn(
    plan: LabPlan, processes: list[dict[str, Any]], node: str, kind: str, argv: list[str]
) -> subprocess.Popen[bytes]:
    logfile = plan.labdir / f"{node}.{kind}.log"
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    processes.append(
        {"node": node, "kind": kind, "pid": proc.pid, "argv": argv, "log": str(logfile)}
    )
    _write_state(plan, processes, "building")
    return proc


def _wait(what: str, ok: Any, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise LabError(f"{what} exited with {proc.returncode}:\n{tail}", f"see {log}")
        time.sleep(0.05)
    raise LabError(f"{what} did not come up within {timeout:.0f} s", f"see {log}")


def _start(plan: LabPlan, processes: list[dict[str, Any]], log: Any) -> None:
    for node, address, instance in plan.dsr_backends:
        assert plan.backend_config is not None
        derived = replace(
            plan.backend_config, lb=replace(plan.backend_config.lb, instance=instance)
        )
        bfile = plan.labdir / f"{instance}.yaml"
        bfile.write_text(dump(derived))
        r = _sh(
            *_V6LB, "backend", str(bfile), "--address", str(address),
            "--netns", plan.namespaces[node], check=False,
        )  # fmt: skip
        if r.returncode != 0:
            raise LabError(f"`v6lb backend` on {node} ({address}) failed: {r.stderr.strip()}")
        log.write(f"lab {plan.name}: {node}: DSR backend {address} (instance {instance})\n")
    servers = []
    for s in plan.servers:
        ready = plan.labdir / f"{s.node}.httpd.ready"
        ready.unlink(missing_ok=True)
        argv = ["ip", "netns", "exec", plan.namespaces[s.node], sys.executable]
        argv += ["-m", "v6lb.lab.httpd", "--node", s.node, "--address", str(s.address)]
        argv += [a for p in s.ports for a in ("--port", str(p))] + ["--ready", str(ready)]
        servers.append((s, ready, _spawn(plan, processes, s.node, "httpd", argv)))
    webs = []
    for site in nginx.plan_nginx(plan):
        f = nginx.files(plan.labdir, site.node)
        f.prefix.mkdir(parents=True, exist_ok=True)
        f.conf.write_text(nginx.render_conf(site, f))
        argv = nginx.argv(plan.namespaces[site.node], f)
        webs.append((site, f, _spawn(plan, processes, site.node, "nginx", argv)))
    runs = []
    for node, derived in plan.lb_configs.items():
        cfile = plan.labdir / f"{node}.yaml"
        cfile.write_text(dump(derived))
        argv = [*_V6LB, "run", str(cfile), "--netns", plan.namespaces[node]]
        argv += ["--instance", plan.lb_instances[node], "--control-socket", str(plan.socket(node))]
        if _proxy_listeners(plan, node):
            argv += ["--proxy", plan.proxy_engine]
        if plan.dataplane != "kernel":
            argv += ["--dataplane", plan.dataplane]
        runs.append((node, _spawn(plan, processes, node, "run", argv)))
    for s, ready, proc in servers:
        _wait(f"httpd on {s.node}", ready.exists, proc, plan.labdir / f"{s.node}.httpd.log", 15)
        log.write(f"lab {plan.name}: {s.node}: HTTP server on ports {list(s.ports)}\n")
    for site, f, proc in webs:  # nginx writes its pid file once every port is bound
        _wait(
            f"nginx on {site.node}", f.pid.exists, proc, plan.labdir / f"{site.node}.nginx.log", 15
        )
        log.write(
            f"lab {plan.name}: {site.node}: nginx on [{site.address}], PROXY v2 ports"
            f" {list(site.proxy_protocol_ports)}, HTTP ports {list(site.http_ports)}\n"
        )
    for node, proc in runs:
        sock = str(plan.socket(node))
        want = set(_proxy_listeners(plan, node))
        ns = plan.namespaces[node]

        def serving(sock: str = sock, want: set[Any] = want, ns: str = ns) -> bool:
            if want and not want <= _listening(ns):
                return False
            try:  # every instance answers on its control socket, proxy-only ones too
                query(sock, timeout=5)
            except (ControlError, OSError):
                return False
            return True

        _wait(f"v6lb run on {node}", serving, proc, plan.labdir / f"{node}.run.log", 60)
        what = f", proxy {plan.proxy_engine} on {len(want)} VIP port(s)" if want else ""
        log.write(f"lab {plan.name}: {node}: v6lb run (instance {plan.lb_instances[node]}{what})\n")


# --- down ----------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        return process_state(pid) != "Z"
    except OSError:
        return False


def _ours(proc: dict[str, Any]) -> bool:
    """Is the pid still the process the lab started (not a reused pid)?"""
    try:
        cmd = Path(f"/proc/{proc['pid']}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    got = [c.decode(errors="replace") for c in cmd if c]
    argv = [str(a) for a in proc["argv"]]
    if proc.get("kind") == "nginx" and "-c" in argv:  # nginx rewrites its command line
        return nginx.is_master(got, argv[argv.index("-c") + 1])
    if argv[:3] == ["ip", "netns", "exec"]:  # `ip netns exec NS` execs the program itself
        return got in (argv, argv[4:])
    return got == argv


def _stop(pids: list[int], sig: int, timeout: float) -> list[int]:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    left = pids
    while left and time.monotonic() < deadline:
        for pid in left:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        left = [p for p in left if _alive(p)]
        if left:
            time.sleep(0.05)
    return left


def _haproxy_tempdirs(pids: list[int]) -> list[Path]:
    """The temp dirs of the haproxy processes among ``pids`` (``-f <tmp>/v6lb-haproxy-*/...``)."""
    out: list[Path] = []
    tmp = Path(tempfile.gettempdir())
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not argv or Path(argv[0]).name != "haproxy" or "-f" not in argv[:-1]:
            continue
        d = Path(argv[argv.index("-f") + 1]).parent
        if d.parent == tmp and d.name.startswith("v6lb-haproxy-") and d not in out:
            out.append(d)
    return out


def _read_state(name: str, root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / name / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def lab_down(name: str, *, root: Path = LAB_ROOT, log: Any = sys.stderr) -> list[str]:
    """Remove everything of lab ``name``; what was removed (empty when nothing was left)."""
    check_name(name)
    done: list[str] = []
    state = _read_state(name, root)
    procs = [p for p in (state or {}).get("processes", []) if _ours(p)]
    runs = [p["pid"] for p in procs if p["kind"] == "run"]
    if runs:  # SIGTERM: each `v6lb run` removes what it installed, then exits
        left = _stop(runs, signal.SIGTERM, 20)
        _stop(left, signal.SIGKILL, 5)
        done += [f"stopped v6lb run (pid {p})" for p in runs]
    others = [p["pid"] for p in procs if p["kind"] != "run"]
    if others:
        _stop(_stop(others, signal.SIGTERM, 5), signal.SIGKILL, 5)
        done += [
            f"stopped {p['kind']} on {p['node']} (pid {p['pid']})"
            for p in procs
            if p["kind"] != "run"
        ]
    mine = [ns for ns in _netns_list() if ns.startswith(f"v6lb-{name}-")]
    for ns in mine:  # anything still running inside keeps the namespace alive
        r = _sh("ip", "netns", "pids", ns, check=False)
        pids = [int(p) for p in r.stdout.split() if p.isdigit()]
        if pids:
            temps = _haproxy_tempdirs(pids)
            _stop(pids, signal.SIGKILL, 5)
            done.append(f"killed {len(pids)} process(es) left in {ns}")
            for d in temps:  # `v6lb run --proxy haproxy` was killed before it removed it
                shutil.rmtree(d, ignore_errors=True)
                done.append(f"removed {d}")
    for ns in mine:
        _sh("ip", "netns", "del", ns, check=False)
        done.append(f"deleted namespace {ns}")
    done += _unpin(mine)
    labdir = root / name
    if labdir.exists():
        shutil.rmtree(labdir, ignore_errors=True)  # traces may add subfolders
        done.append(f"removed {labdir}")
    for line in done:
        log.write(f"lab {name}: {line}\n")
    return done


def _unpin(namespaces: Sequence[str]) -> list[str]:
    """Remove what an xdp plane of the lab left pinned (its `v6lb run` was killed).

    Its directories carry the namespace in their tag (``v6lb-<instance>_<netns>_<gen>``,
    :func:`v6lb.engines.xdp.run.pin_tag`); their link goes with them.
    """
    from v6lb.engines.xdp.program import BPFFS

    done: list[str] = []
    if not namespaces or not BPFFS.is_dir():
        return done
    for d in sorted(BPFFS.glob("v6lb-*")):
        if d.is_dir() and any(f"_{ns}_" in d.name for ns in namespaces):
            shutil.rmtree(d, ignore_errors=True)
            done.append(f"unpinned {d}")
    return done


# --- status and exec -----------------------------------------------------------


def list_labs(root: Path = LAB_ROOT) -> list[str]:
    names = (
        {p.name for p in root.iterdir() if (p / "state.json").exists()} if root.exists() else set()
    )
    for ns in _netns_list():
        if ns.startswith("v6lb-") and ns.endswith("--sw"):
            names.add(ns[len("v6lb-") : -len("--sw")])
    return sorted(names)


def resolve_name(name: str | None, file: str | None, *, root: Path = LAB_ROOT) -> str:
    """The lab a command means: ``--name``, else the file's default name, else the only lab."""
    from v6lb.lab.plan import default_name

    if name is not None:
        return check_name(name)
    if file is not None:
        return default_name(file)
    labs = list_labs(root)
    if len(labs) == 1:
        return labs[0]
    if not labs:
        raise LabError("no lab is up", "start one with `v6lb lab up FILE`")
    raise LabError(f"several labs are up ({', '.join(labs)})", "say which with --name NAME")


def lab_status(name: str, *, root: Path = LAB_ROOT) -> dict[str, Any]:
    """Nodes (namespace present?), processes (alive?) and each LB's `v6lb status` summary."""
    state = _read_state(name, root)
    if state is None:
        leftovers = [ns for ns in _netns_list() if ns.startswith(f"v6lb-{name}-")]
        if not leftovers:
            raise LabError(f"no lab named {name!r}", "list the labs with `v6lb lab status`")
        return {"name": name, "phase": "unknown (no state.json)", "leftover_netns": leftovers}
    present = set(_netns_list())
    for info in state["nodes"].values():
        info["netns_present"] = info["netns"] in present
    for p in state["processes"]:
        p["alive"] = _ours(p) and _alive(p["pid"])
    for node, lb in state.get("lbs", {}).items():
        if lb.get("socket") is None:  # a lab's state from before proxy-only LBs had one
            ns = state["nodes"].get(node, {}).get("netns", "")
            up = {f"[{a}]:{p}" for a, p in _listening(ns)} if ns in present else set()
            seen = [f"{x} {'listening' if x in up else 'NOT listening'}" for x in lb["listeners"]]
            lb["status"] = {
                "error": f"no control socket: proxy VIPs only ({lb.get('proxy')} engine);"
                f" {', '.join(seen)}"
            }
            continue
        try:
            st = query(lb["socket"], timeout=5)
        except (ControlError, OSError) as exc:
            lb["status"] = {"error": str(exc)}
            continue
        proxy = st.get("proxy") or {}
        lb["status"] = {
            "instance": st.get("instance"),
            "dataplane": st.get("dataplane"),
            "proxy_engine": proxy.get("engine"),
            "proxy_vips": [
                {
                    "name": v.get("name"),
                    "mode": v.get("mode"),
                    "address": v.get("address"),
                    "ports": v.get("ports", []),
                    "connections": v.get("connections"),
                }
                for v in proxy.get("vips", [])
            ],
            "uptime_s": st.get("uptime_s"),
            "last_error": st.get("last_error"),
            "vips": [
                {
                    "name": v["name"],
                    "mode": v["mode"],
                    "address": v["address"],
                    "packets": v["counter"]["packets"],
                    "icmp_errors": v.get("icmp_errors"),
                    "backends": {b["address"]: b["health"] for b in v["backends"]},
                }
                for v in st.get("vips", [])
            ],
            "npt": st.get("npt", []),
        }
    return state


def lab_exec(name: str, node: str, cmd: Sequence[str], *, root: Path = LAB_ROOT) -> int:
    """Run ``cmd`` in ``node``'s namespace with this terminal; its exit code."""
    state = _read_state(name, root)
    if state is None and not any(ns.startswith(f"v6lb-{name}-") for ns in _netns_list()):
        labs = list_labs(root)
        raise LabError(
            f"lab {name!r} is not up"
            + (f" (labs up: {', '.join(labs)})" if labs else " (no lab is up)"),
            "start it with `v6lb lab up FILE --name NAME`; `v6lb lab status` lists the labs",
        )
    ns = (
        state["nodes"][node]["netns"]
        if state is not None and node in state.get("nodes", {})
        else lab_namespace(name, node)
    )
    if ns not in _netns_list():
        nodes = ", ".join(sorted((state or {}).get("nodes", {}))) or "none"
        raise LabError(
            f"lab {name!r} has no node {node!r} (nodes: {nodes})", "name a node of the lab"
        )
    if not cmd:
        raise LabError("no command given", f"v6lb lab exec {node} -- CMD ARGS...")
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=False).returncode
