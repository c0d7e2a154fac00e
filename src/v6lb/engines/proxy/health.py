"""Active health checks for the proxy VIPs, driving the core's :class:`HealthSet`.

TCP probes reuse :class:`v6lb.engines.probe.Prober` (non-blocking connects)
by registering its sockets with the event loop; HTTP probes send the check's
request (``method``, ``path``, ``host``) and parse the answer with the same
h11 reader as the daemon (:class:`v6lb.engines.probe.HttpAnswer`): an expected
status passes (``expect``, 200-399 by default). Each state change
is applied to the VIP's :class:`BackendPool` at once (``set_up``), which
rebuilds the Maglev table and the eligibility every scheduler uses.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Mapping
from ipaddress import IPv6Address
from typing import Any

from v6lb.core.health import HealthSet
from v6lb.engines.probe import HttpAnswer, Prober, http_request
from v6lb.model.config import HealthCheck, HealthType
from v6lb.model.pools import health_monitor

from .runtime import VipRuntime

__all__ = ["HealthChecker", "health_set_for", "http_probe"]

_RECV = 4096


def health_set_for(check: HealthCheck, backends: int, now: float) -> HealthSet[int]:
    hs: HealthSet[int] = HealthSet()
    for i in range(backends):
        hs.add(i, health_monitor(check, now))
    return hs


class _LoopSelector(selectors.BaseSelector):
    """Just enough of a selector for :class:`TcpProber`: writability via the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ready: Callable[[Any], None]) -> None:
        self._loop = loop
        self._ready = ready
        self._keys: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        self._loop.add_writer(fd, self._ready, key)
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj.fileno()
        self._loop.remove_writer(fd)
        return self._keys.pop(fd)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        raise NotImplementedError("the event loop selects")

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return {k.fileobj: k for k in self._keys.values()}


async def http_probe(host: str, port: int, check: HealthCheck) -> bool:
    """The check's request; True when h11 reads an expected status within ``check.timeout``.

    The timeout covers the whole exchange; at most :data:`HTTP_HEAD_MAX` bytes are
    read (the status line and headers), never the body.
    """
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(http_request(check, IPv6Address(host), port))
            answer = HttpAnswer(check, check.method)
            while True:
                verdict = answer.feed(await reader.read(_RECV))
                if verdict is not None:
                    return verdict
    except (OSError, TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()


class HealthChecker:
    """One task probing every probed backend of every VIP."""

    def __init__(self, runtimes: list[VipRuntime]) -> None:
        self.runtimes = runtimes
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._prober = Prober(_LoopSelector(self._loop, self._tcp_ready))
        self._tcp_owner: dict[tuple[int, int], VipRuntime] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def retarget(self, runtimes: list[VipRuntime]) -> None:
        """A reload: probe these runtimes from now on (probes in flight end harmlessly)."""
        self.runtimes = runtimes
        self._wake.set()

    def _apply(self, rt: VipRuntime, index: int) -> None:
        rt.pool.set_up(index, rt.health.keeps_existing_flows(index))
        if not rt.pool.is_up(index):
            for up in list(rt.idle[index]):  # pooled connections to a dead backend
                if up.t is not None:
                    up.t.close()
            rt.idle[index].clear()
        self._wake.set()

    def _result(self, rt: VipRuntime, index: int, ok: bool, probe: int) -> None:
        if rt.health.probe_result(index, ok, self._loop.time(), probe):
            self._apply(rt, index)
        self._wake.set()

    def _tcp_ready(self, key: selectors.SelectorKey) -> None:
        done = self._prober.handle(key)
        if done is None:
            return
        k, probe, ok = done
        assert isinstance(k, tuple)
        rt = self._tcp_owner.pop(k, None)
        if rt is not None:
            self._result(rt, k[1], ok, probe)

    def _start(self, rt: VipRuntime, index: int, now: float) -> None:
        probe = rt.health.start_probe(index, now)
        check = rt.vip.health
        host = rt.hosts[index]
        port = check.port or rt.ports[index] or rt.vip.ports[0]
        if check.type is HealthType.HTTP:
            coro = http_probe(host, port, check)
            task = self._loop.create_task(coro)
            self._tasks.add(task)

            def done(t: asyncio.Task[bool]) -> None:
                self._tasks.discard(t)
                if not t.cancelled():
                    self._result(rt, index, bool(t.result()), probe)

            task.add_done_callback(done)
            return
        key = (id(rt), index)
        self._tcp_owner[key] = rt
        ok = self._prober.start(key, probe, IPv6Address(host), port)
        if ok is not None:
            self._tcp_owner.pop(key, None)
            self._result(rt, index, ok, probe)

    async def run(self) -> None:
        try:
            while True:
                now = self._loop.time()
                wake: float | None = None
                for rt in self.runtimes:
                    hs = rt.health
                    if hs.handle_timer(now):
                        for i in range(len(rt.pool)):
                            self._apply(rt, i)
                    for i in range(len(rt.pool)):
                        mon = hs.monitor(i)
                        if mon is not None and not mon.probe_in_flight:
                            self._prober_cancel(rt, i)
                    for i in hs.due(now):
                        self._start(rt, i, now)
                    t = hs.next_timer()
                    if t is not None:
                        wake = t if wake is None else min(wake, t)
                self._wake.clear()
                delay = 3600.0 if wake is None else max(0.0, wake - self._loop.time())
                # asyncio.timeout, not wait_for: on CPython 3.11 wait_for loses a
                # cancel() that lands while the event is being set (its inner task
                # finishes first), and ProxyServer.stop() then awaits this loop forever
                # (seen once in 950 tests on a loaded machine).
                try:
                    async with asyncio.timeout(delay + 0.001):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            self._prober.close()
            for task in list(self._tasks):
                task.cancel()

    def _prober_cancel(self, rt: VipRuntime, index: int) -> None:
        key = (id(rt), index)
        if key in self._tcp_owner:
            self._tcp_owner.pop(key)
            self._prober.cancel(key)
