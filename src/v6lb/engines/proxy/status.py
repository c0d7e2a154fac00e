"""The proxy engine's part of `v6lb status`, answered from the control socket's thread.

:class:`ProxyStatus` is handed to :func:`~.server.serve`, which points it at the
running engine:

- builtin: the :class:`~.server.ProxyServer`. Its counters belong to the event
  loop, so the snapshot is taken ON the loop (``call_soon_threadsafe``) and the
  control thread waits for it; the loop itself never blocks on a client.
- haproxy: ``show stat`` of the current worker, through the master CLI
  (``@1 show stat``; it answers during reloads and a soft stop, when the stats
  socket may not), or HAProxy's stats socket (``stats socket`` in the rendered
  haproxy.cfg) when no master CLI is given. It gives health per server, current
  sessions and HAProxy's own counters, mapped onto the same fields as the builtin
  engine's where they mean the same thing (``errors`` then carries HAProxy's
  counter names); ``responses`` counts HTTP responses by class (``hrsp_*``). A
  backend's ``weight``, ``drain`` and ``enabled`` are v6lb's (the pools, with
  `v6lb ctl`'s overrides); ``haproxy_weight``/``haproxy_status`` are HAProxy's.

Before the engine is ready (or after it stopped), the VIPs are listed from the
config with ``"state": "starting"`` (or ``"stopped"``) and no counters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import csv
import io
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from v6lb.core.backends import BackendPool
from v6lb.engines.control import recv_all
from v6lb.model.config import Config, Vip, VipMode
from v6lb.render.haproxy import (
    backend_name,
    frontend_name,
    server_backends,
    server_name,
    sni_backends,
)

__all__ = ["BuiltinEngine", "ProxyStatus", "haproxy_stat", "parse_haproxy_stat"]

_ANSWER_TIMEOUT = 5.0


class BuiltinEngine(Protocol):
    """What the status reads of the builtin engine (:class:`~.server.ProxyServer`)."""

    def status(self) -> list[dict[str, Any]]: ...

    def fd_status(self) -> dict[str, Any]: ...

    def relay_status(self) -> dict[str, int] | None: ...


class ProxyStatus:
    """Thread-safe ``section()`` for the ``proxy`` key of a status answer."""

    def __init__(self, config: Config, engine: str) -> None:
        self.config = config
        self.engine = engine
        self.vips = [v for v in config.vips if v.mode.is_proxy]
        self._lock = threading.Lock()
        self._state = "starting"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._server: BuiltinEngine | None = None
        self._stats_socket: str | None = None
        self._master_socket: str | None = None
        self._pid: int | None = None
        self._pools: Mapping[str, BackendPool] = {}  # haproxy: v6lb's state of the backends

    # --- pointed at the engine by serve()/run_haproxy() ------------------------

    def attach_builtin(self, server: BuiltinEngine) -> None:
        """Call on the server's loop, once it listens."""
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            self._server = server
            self._state = "running"

    def attach_haproxy(
        self, stats_socket: str, pid: int, *, master_socket: str | None = None
    ) -> None:
        """``pid``: haproxy's master (the same across reloads); ``master_socket``: its CLI."""
        with self._lock:
            self._stats_socket = stats_socket
            self._master_socket = master_socket
            self._pid = pid
            self._state = "running"

    def reconfigure(self, config: Config) -> None:
        """A reload: the VIPs listed before the engine answers (or after it stopped)."""
        with self._lock:
            self.config = config
            self.vips = [v for v in config.vips if v.mode.is_proxy]

    def set_haproxy_config(self, config: Config, pools: Mapping[str, BackendPool]) -> None:
        """haproxy: the running config (after a reload) and its pools (`v6lb ctl`'s state)."""
        with self._lock:
            self.config = config
            self.vips = [v for v in config.vips if v.mode.is_proxy]
            self._pools = pools

    def detach(self) -> None:
        with self._lock:
            self._loop = self._server = None
            self._stats_socket = self._pid = None
            self._state = "stopped"

    # --- the answer ---------------------------------------------------------

    def section(self) -> dict[str, Any]:
        with self._lock:
            state, loop, server = self._state, self._loop, self._server
            stats_socket, pid, loop_thread = self._stats_socket, self._pid, self._loop_thread
            master, vips, pools = self._master_socket, self.vips, self._pools
        out: dict[str, Any] = {"engine": self.engine, "state": state}
        if loop is not None and server is not None:
            out["vips"] = self._on_loop(loop, loop_thread, server)
            out["fds"] = server.fd_status()  # plain integers: safe to read from this thread
            relay = server.relay_status()  # the same
            if relay is not None:
                out["kernel_relay"] = relay
        elif stats_socket is not None:
            out["haproxy_pid"] = pid
            out["stats_socket"] = stats_socket
            if master is not None:
                out["master_socket"] = master
            path = master or stats_socket
            try:
                rows = haproxy_stat(path, master=master is not None)
            except OSError as exc:
                out["error"] = f"HAProxy's CLI socket {path} does not answer: {exc}"
                rows = []
            out["vips"] = _haproxy_vips(vips, rows, pools)
        else:
            out["vips"] = [_config_vip(v) for v in vips]
        return out

    __call__ = section

    @staticmethod
    def _on_loop(
        loop: asyncio.AbstractEventLoop, loop_thread: int | None, server: BuiltinEngine
    ) -> list[dict[str, Any]]:
        if threading.get_ident() == loop_thread:
            return server.status()
        fut: concurrent.futures.Future[list[dict[str, Any]]] = concurrent.futures.Future()

        def take() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(server.status())
                except BaseException as exc:
                    fut.set_exception(exc)

        loop.call_soon_threadsafe(take)
        try:
            return fut.result(_ANSWER_TIMEOUT)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(
                f"the proxy engine's loop did not answer within {_ANSWER_TIMEOUT:g} s"
            ) from None


def _config_vip(vip: Vip) -> dict[str, Any]:
    return {
        "name": vip.name,
        "address": str(vip.address),
        "ports": list(vip.ports),
        "protocol": "tcp",
        "mode": str(vip.mode),
        "scheduler": str(vip.scheduler),
        "backends": [
            {
                "address": str(b.address),
                "port": b.port,
                "weight": b.weight,
                "drain": b.drain,
                "enabled": True,
                "health": "unknown",
                "probe": str(vip.health.type),
            }
            for b in vip.backends
        ],
    }


# --- HAProxy -------------------------------------------------------------------


def haproxy_stat(path: str, *, timeout: float = 2.0, master: bool = False) -> list[dict[str, str]]:
    """``show stat`` on HAProxy's stats socket, one dict per CSV row.

    ``master``: ``path`` is the master CLI; the current worker answers (``@1``).
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(b"@1 show stat\n" if master else b"show stat\n")
        s.shutdown(socket.SHUT_WR)  # the master CLI answers, then closes
        data = recv_all(s)
    finally:
        s.close()
    return parse_haproxy_stat(data.decode("utf-8", "replace"))


def parse_haproxy_stat(text: str) -> list[dict[str, str]]:
    """The CSV of ``show stat`` (its header line starts with ``# ``)."""
    text = text.lstrip()
    if text.startswith("# "):
        text = text[2:]
    return [dict(row) for row in csv.DictReader(io.StringIO(text)) if row.get("pxname")]


# HAProxy's counters that count refusals and errors (docs: "9.1. CSV format"), and the
# ssl stats module's failed handshakes (TLS VIPs).
_HAPROXY_ERRORS = (
    "ereq", "dreq", "dcon", "dses", "econ", "eresp", "dresp", "wretr", "wredis",
    "ssl_failed_handshake",
)  # fmt: skip


def _int(row: Mapping[str, str], key: str) -> int:
    try:
        return int(row.get(key) or 0)
    except ValueError:
        return 0


def _health(status: str) -> str:
    """HAProxy's server status (``UP``, ``UP 1/3``, ``DOWN``, ``NOLB``, ``MAINT``, ``no check``)."""
    word = status.split(" ", 1)[0].upper()
    if word in ("UP", "NOLB", "NO", "DRAIN"):  # "no check": not probed, counts as up
        return "up"
    if word == "DOWN":
        return "down"
    return status.lower() or "unknown"


_RESPONSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")


def _responses(rows: Sequence[Mapping[str, str]]) -> dict[str, int]:
    """HTTP responses by class, from HAProxy's ``hrsp_*`` counters."""
    return {k: sum(_int(r, f"hrsp_{k}") for r in rows) for k in _RESPONSES}


def _avg_s(row: Mapping[str, str], key: str) -> float | None:
    """HAProxy's average time over the last 1024 requests (ms) as seconds, if it has one."""
    value = row.get(key)
    return round(int(value) / 1000, 6) if value and value.isdigit() else None


def _haproxy_vips(
    vips: list[Vip],
    rows: list[dict[str, str]],
    pools: Mapping[str, BackendPool] | None = None,
) -> list[dict[str, Any]]:
    by_key = {(r["pxname"], r["svname"]): r for r in rows}
    out = []
    for vip in vips:
        d = _config_vip(vip)
        http = vip.mode is VipMode.PROXY_L7
        fronts = [by_key.get((frontend_name(vip.name, port), "FRONTEND"), {}) for port in vip.ports]
        for key, col in (
            ("connections", "stot"),
            ("active", "scur"),
            ("requests", "req_tot"),
            ("bytes_in", "bin"),
            ("bytes_out", "bout"),
        ):
            d[key] = sum(_int(f, col) for f in fronts)
        back = by_key.get((backend_name(vip.name), "BACKEND"), {})
        backs = [back] + [by_key.get((n, "BACKEND"), {}) for n, _ in sni_backends(vip)]
        errors = {k: sum(_int(r, k) for r in [*fronts, *backs]) for k in _HAPROXY_ERRORS}
        d["errors"] = {k: n for k, n in errors.items() if n}
        if http:
            d["responses"] = _responses(fronts)
            if (avg := _avg_s(back, "ttime")) is not None:
                d["response_time_avg_s"] = avg
        d["counters_from"] = "haproxy"
        pool = (pools or {}).get(vip.name)
        for i, b in enumerate(d["backends"]):
            if pool is not None and i < len(pool):
                b["weight"] = pool.weight(i)
                b["drain"] = pool.is_draining(i)
                b["enabled"] = pool.is_enabled(i)
            else:
                b["enabled"] = True
            row = by_key.get((backend_name(vip.name), server_name(i)))
            if row is None:
                continue
            # TLS passthrough: the same server in its SNI routes' backends carries the traffic
            twins = [by_key.get((n, server_name(i)), {}) for n in server_backends(vip, i)]
            b["health"] = _health(row.get("status", ""))
            b["haproxy_status"] = row.get("status", "")
            b["haproxy_weight"] = _int(row, "weight")
            b["active"] = sum(_int(r, "scur") for r in twins)
            b["connections"] = sum(_int(r, "stot") for r in twins)
            b["bytes_in"] = sum(_int(r, "bin") for r in twins)
            b["bytes_out"] = sum(_int(r, "bout") for r in twins)
            b["failures"] = _int(row, "chkfail")
            errs = {k: _int(row, k) for k in ("econ", "eresp", "wretr", "wredis")}
            b["errors"] = {k: n for k, n in errs.items() if n}
            if http:
                b["responses"] = _responses([row])
                if (avg := _avg_s(row, "ttime")) is not None:
                    b["response_time_avg_s"] = avg
        out.append(d)
    return out
