"""`v6lb lab trace --mode proxy-l4|proxy-l7`: what the nginx backends saw, and the answers.

A proxy terminates the client's TCP connection on the VIP and opens its own to
the backend, so a trace holds two TCP connections per request: client -> VIP,
and LB -> pod. The second one carries neither the client's address nor its
port, so :func:`attach_backend_logs` finds it from the backend's side: the nginx
answer names its ``request_id``, and the pod's access log line for that id gives
the LB's source address and port (``$remote_addr``, ``$remote_port``), which
become the trace's ``initiators`` (kept by :mod:`v6lb.model.capture`). The same
line gives what the application learnt of the client: ``$proxy_protocol_addr``
(PROXY v2) or ``X-Forwarded-For``/``Forwarded``. :func:`proxy_facts` turns it into
the facts :func:`v6lb.model.explain.explain` answers from, as the simulator does
for ``v6lb explain --mode proxy-l4``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

from v6lb.core import forwarded, proxyproto
from v6lb.lab import nginx
from v6lb.model.hops import Hop
from v6lb.model.modes import Kind, modes_where

__all__ = ["PROXY_MODES", "annotate", "attach_backend_logs", "connections", "proxy_facts"]

PROXY_MODES: Final = modes_where(kind=Kind.PROXY)


def attach_backend_logs(
    labdir: Path, nodes: list[str], requests: list[dict[str, Any]], timeout: float = 3.0
) -> list[list[Any]]:
    """Add ``backend_log`` (the nginx access log line) to each request; the LB's (addr, port)s.

    nginx writes the line once the response is sent, so this waits up to ``timeout``.
    """
    wanted = {
        str(r["answer"].get("request_id")): r
        for r in requests
        if isinstance(r.get("answer"), dict) and r["answer"].get("request_id")
    }
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while True:
        for node in nodes:
            for line in nginx.read_access_log(nginx.files(labdir, node).access_log):
                rid = str(line.get("request_id", ""))
                if rid in wanted:
                    found[rid] = {"node": node, **line}
        if len(found) == len(wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    initiators: list[list[Any]] = []
    for rid, req in wanted.items():
        got = found.get(rid)
        req["backend_log"] = got
        if got is not None and str(got.get("remote_port", "")).isdigit():
            end = [got["remote_addr"], int(got["remote_port"])]
            if end not in initiators:
                initiators.append(end)
    return initiators


def connections(hops: list[Hop]) -> list[str]:
    """The TCP connections in the capture, in order of first packet, each named once.

    A connection whose SYN was captured is "opened"; one that was already open (a
    proxy-l7 backend connection kept in the pool from an earlier request) is "reused".
    """
    order: list[frozenset[str]] = []
    named: dict[frozenset[str], str] = {}
    for h in hops:
        p = h.pkt.innermost
        if p.proto != "tcp":
            continue
        a, b = f"[{p.src.addr}]:{p.src.port}", f"[{p.dst.addr}]:{p.dst.port}"
        key = frozenset((a, b))
        flags = p.detail[1:].split("]")[0] if p.detail.startswith("[") else ""
        if key not in named:
            order.append(key)
            how = "opened" if "S" in flags and "A" not in flags else "reused"
            named[key] = f"{a} -> {b} on link {h.link} ({how})"
    return [named[k] for k in order]


def _payload(data: bytes) -> bytes:
    """The TCP payload of a plain IPv6/TCP packet (b"" for anything else)."""
    if len(data) < 60 or data[6] != 6:
        return b""
    end = 40 + int.from_bytes(data[4:6], "big")
    return data[40 + (data[52] >> 4) * 4 : end]


def annotate(hops: list[Hop], meta: dict[str, Any], nodes: dict[str, str]) -> None:
    """Say what the LB did on the first hop of each packet it sent (``Hop.note``), in place."""
    lbs = {n for n, lane in nodes.items() if lane == "lb"}
    client = meta["client"]
    seen: set[int] = set()
    for h in hops:
        first = h.packet_id not in seen
        seen.add(h.packet_id)
        if not first or h.sender not in lbs or h.pkt.proto != "tcp":
            continue
        flags = h.pkt.detail[1:].split("]")[0] if h.pkt.detail.startswith("[") else ""
        data = _payload(h.data)
        if h.pkt.dst.addr == client:
            if "S" in flags:
                h.note = "LB answers on the VIP itself: the proxy terminates the client's TCP"
            elif data:
                h.note = "response relayed from the backend connection"
            elif "F" in flags:
                h.note = "LB closes the client connection"
            continue
        if "S" in flags:
            h.note = f"LB opens its own connection to {h.receiver}, from its own address"
        elif data.startswith(proxyproto.SIGNATURE):
            try:
                got = proxyproto.decode(data)
            except proxyproto.ProxyProtocolError as exc:
                h.note = f"request prefixed with a malformed PROXY v2 header ({exc})"
                continue
            hdr = got[0] if got is not None else None
            who = f"[{hdr.src}]:{hdr.src_port}" if hdr is not None and hdr.src else "?"
            h.note = f"request prefixed with a PROXY v2 header carrying {who}"
        elif b"\r\nx-forwarded-for:" in data.lower() or b"\r\nforwarded:" in data.lower():
            h.note = "request relayed with X-Forwarded-For and Forwarded added"
        elif data:
            h.note = "request bytes relayed from the client connection"
        elif "F" in flags:
            h.note = "LB closes its backend connection"


def _learnt(mode: str, line: dict[str, Any]) -> tuple[str | None, str]:
    """(client address the application learnt, how) from one access log line."""
    lb = f"the TCP source it saw is the LB's {line.get('remote_addr')}"
    if mode == "proxy-l4":
        addr = line.get("proxy_protocol_addr") or None
        if addr is None:
            return None, f"not at all: no PROXY v2 header reached nginx; {lb}"
        port = line.get("proxy_protocol_port")
        return addr, (
            f"PROXY v2 header: nginx read $proxy_protocol_addr {addr}"
            f" (port {port}) before the request; {lb}"
        )
    fwd = str(line.get("forwarded") or "")
    xff = str(line.get("x_forwarded_for") or "")
    addr = None
    try:
        for el in forwarded.parse_forwarded(fwd) if fwd else []:
            node = forwarded.parse_node(el["for"]) if "for" in el else None
            if node is not None and node.address is not None:
                addr = str(node.address)
                break
        if addr is None and xff:
            hops = forwarded.parse_x_forwarded_for(xff)
            addr = str(hops[0]) if hops else None
    except forwarded.ForwardedError as exc:
        return None, f"a malformed forwarding header reached nginx ({exc}); {lb}"
    if not fwd and not xff:
        return None, f"not at all: no forwarding header reached nginx; {lb}"
    proto = line.get("x_forwarded_proto") or "-"
    return addr, (
        f"forwarding headers added by the LB: X-Forwarded-For: {xff or '-'};"
        f" Forwarded: {fwd or '-'}; X-Forwarded-Proto: {proto}; {lb}"
    )


def proxy_facts(meta: dict[str, Any], hops: list[Hop], reply_via_lb: bool) -> dict[str, object]:
    """The facts of a proxy trace, in the simulator's keys (``v6lb explain --mode proxy-*``)."""
    mode = meta["mode"]
    line = next((r["backend_log"] for r in meta["requests"] if r.get("backend_log")), None) or {}
    answer = next((r["answer"] for r in meta["requests"] if r.get("answer")), None) or {}
    app, how = _learnt(mode, line) if line else (None, "unknown: no nginx log line was found")
    engine = meta.get("proxy_engine") or "builtin"
    conns = connections(hops)
    return {
        "vip": meta["vip"],
        "vip_name": meta["vip_name"],
        "vip_mode": mode,
        "client": meta["client"],
        "client_ports": meta["client_ports"],
        "backend": answer.get("server"),
        "backend_node": answer.get("node"),
        "backend_saw_source": line.get("remote_addr") or (answer.get("peer") or [None])[0],
        "backend_saw_destination": line.get("server_addr"),
        "app_saw_client": app,
        "client_address_via": how,
        "proxy_v2": (
            f"[{line['proxy_protocol_addr']}]:{line.get('proxy_protocol_port')}"
            if line.get("proxy_protocol_addr")
            else None
        ),
        "x_forwarded_for": line.get("x_forwarded_for") or None,
        "forwarded": line.get("forwarded") or None,
        "reply_via_lb": reply_via_lb,
        "lb_state": (
            f"proxy connections ({engine} engine): each client connection ends on the VIP and"
            " the LB opens its own connection to the backend (two TCP connections, full socket"
            f" state, no NAT66 or conntrack entry); captured: {len(conns)} connection(s)"
        ),
        "connections": conns,
        "proxy_engine": engine,
        "backend_logs": [r.get("backend_log") for r in meta["requests"]],
        "responses": [r["answer"] for r in meta["requests"]],
        "translation": "no NAT: a new TCP connection from the LB to the backend; the client's"
        " address travels in " + ("the PROXY v2 header" if mode == "proxy-l4" else "headers"),
        "source": "lab capture",
    }
