"""nginx backends for the lab's ``proxy-l4``/``proxy-l7`` VIPs (Debian's nginx).

Each pod that backs a proxy VIP runs its own nginx master (``daemon off``, one
worker) with every file in the lab dir: ``<labdir>/<node>.nginx.conf``, the prefix
``<labdir>/<node>.nginx/`` (pid, lock and temp dirs), ``<node>.nginx.access.log``
and ``<node>.nginx.error.log``. It listens on the pod's backend address only:
``proxy_protocol`` on the ports a ``proxy-l4`` VIP with ``proxy_protocol: v2``
sends to, plain HTTP on the others. The access log is one JSON object per
request (``escape=json``) with ``$remote_addr``, ``$proxy_protocol_addr``,
``$http_x_forwarded_for``, ``$http_forwarded`` and the rest of
:data:`LOG_FIELDS`; every answer is a small JSON document naming the node, with
the ``request_id`` that finds its log line.

:func:`plan_nginx` and :func:`render_conf` are pure; :mod:`v6lb.lab.netns` starts
and stops the processes (and :func:`is_master` tells it a pid is still ours).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any, Final

from v6lb.lab.plan import LabError, LabPlan
from v6lb.model.config import ProxyL4Options, ProxyProtocol

__all__ = [
    "LOG_FIELDS",
    "NginxFiles",
    "NginxSite",
    "argv",
    "files",
    "is_master",
    "plan_nginx",
    "read_access_log",
    "render_conf",
]

# JSON key -> nginx variable, in the access log
LOG_FIELDS: Final = {
    "time": "$time_iso8601",
    "msec": "$msec",
    "request_id": "$request_id",
    "remote_addr": "$remote_addr",
    "remote_port": "$remote_port",
    "server_addr": "$server_addr",
    "server_port": "$server_port",
    "proxy_protocol_addr": "$proxy_protocol_addr",
    "proxy_protocol_port": "$proxy_protocol_port",
    "x_forwarded_for": "$http_x_forwarded_for",
    "x_forwarded_proto": "$http_x_forwarded_proto",
    "forwarded": "$http_forwarded",
    "method": "$request_method",
    "uri": "$request_uri",
    "status": "$status",
    "request_length": "$request_length",
    "user_agent": "$http_user_agent",
}


@dataclass(frozen=True, slots=True)
class NginxSite:
    """One nginx on one pod: its backend address and the ports it listens on."""

    node: str
    address: IPv6Address
    proxy_protocol_ports: tuple[int, ...]  # `listen ... proxy_protocol`
    http_ports: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NginxFiles:
    conf: Path
    prefix: Path
    pid: Path
    access_log: Path
    error_log: Path


def files(labdir: Path, node: str) -> NginxFiles:
    prefix = labdir / f"{node}.nginx"
    return NginxFiles(
        conf=labdir / f"{node}.nginx.conf",
        prefix=prefix,
        pid=prefix / "nginx.pid",
        access_log=labdir / f"{node}.nginx.access.log",
        error_log=labdir / f"{node}.nginx.error.log",
    )


def plan_nginx(plan: LabPlan) -> list[NginxSite]:
    """One site per (pod, backend address) of the proxy VIPs the lab's LB nodes serve."""
    served = {v.name for c in plan.lb_configs.values() for v in c.vips}
    want: dict[tuple[str, IPv6Address], dict[int, tuple[bool, str]]] = {}
    for vip in plan.config.vips:
        if vip.name not in served or not vip.mode.is_proxy:
            continue
        pp = (
            isinstance(vip.options, ProxyL4Options)
            and vip.options.proxy_protocol is ProxyProtocol.V2
        )
        for b in vip.backends:
            node = plan.topo.owner(b.address)
            if node is None:
                continue  # not in the lab's topology: nothing to start
            ports = want.setdefault((node, b.address), {})
            for port in [b.port] if b.port else vip.ports:
                seen = ports.get(port)
                if seen is not None and seen[0] != pp:
                    raise LabError(
                        f"vips.{vip.name}: backend [{b.address}]:{port} would need nginx to"
                        f" speak PROXY v2 for one VIP and plain HTTP for {seen[1]}",
                        "give the backends of the two VIPs different ports",
                    )
                ports[port] = (pp, vip.name)
    httpd = {s.node: set(s.ports) for s in plan.servers}
    sites: list[NginxSite] = []
    nodes: set[str] = set()
    for (node, address), ports in want.items():
        clash = sorted(set(ports) & httpd.get(node, set()))
        if clash:
            raise LabError(
                f"{node}: port(s) {clash} are served both by the lab's HTTP server (a kernel-mode"
                " VIP's backend) and by nginx (a proxy VIP's backend)",
                "give the proxy VIP's backends their own `port:`",
            )
        if node in nodes:
            raise LabError(
                f"{node}: backs proxy VIPs on two addresses; the lab runs one nginx per node",
                "use one backend address per node for the proxy VIPs",
            )
        nodes.add(node)
        sites.append(
            NginxSite(
                node,
                address,
                tuple(sorted(p for p, (pp, _) in ports.items() if pp)),
                tuple(sorted(p for p, (pp, _) in ports.items() if not pp)),
            )
        )
    return sites


def _q(value: str) -> str:
    """An nginx single-quoted string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def render_conf(site: NginxSite, f: NginxFiles) -> str:
    """The whole nginx.conf of one pod (every path inside the lab dir)."""
    log = "{" + ",".join(f'"{k}":"{v}"' for k, v in LOG_FIELDS.items()) + "}"
    answer = (
        f'{{"node":"{site.node}","server":"{site.address}",'
        '"local":["$server_addr",$server_port],"peer":["$remote_addr",$remote_port],'
        '"proxy_protocol_addr":"$proxy_protocol_addr","request_id":"$request_id"}\n'
    )
    listens = [
        f"        listen [{site.address}]:{p} proxy_protocol;" for p in site.proxy_protocol_ports
    ]
    listens += [f"        listen [{site.address}]:{p};" for p in site.http_ports]
    temp = "\n".join(
        f"    {kind}_temp_path {f.prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
# generated by `v6lb lab up` for {site.node}; removed by `v6lb lab down`
daemon off;
master_process on;
worker_processes 1;
user root;
pid {f.pid};
lock_file {f.prefix / "nginx.lock"};
error_log {f.error_log} notice;

events {{
    worker_connections 1024;
}}

http {{
    log_format v6lb escape=json {_q(log)};
    access_log {f.access_log} v6lb;
{temp}
    server_tokens off;
    keepalive_timeout 30s;

    server {{
{chr(10).join(listens)}
        location / {{
            default_type application/json;
            return 200 {_q(answer)};
        }}
    }}
}}
"""


def argv(netns: str, f: NginxFiles) -> list[str]:
    """Run nginx in ``netns`` in the foreground (the lab's process record keeps this argv)."""
    return ["ip", "netns", "exec", netns, "nginx", "-p", f"{f.prefix}/", "-c", str(f.conf)]


def is_master(cmdline: Sequence[str], f: NginxFiles | str) -> bool:
    """Is this /proc cmdline the nginx master of these files? (nginx rewrites its title.)"""
    conf = str(f.conf if isinstance(f, NginxFiles) else f)
    title = " ".join(cmdline)
    return title.startswith("nginx: master process") and conf in title


def read_access_log(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of an access log (a missing file has none; a torn last line is skipped)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out
