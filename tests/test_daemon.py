"""The daemon of `v6lb run` with fake planes: in-process, no root.

A fake plane is a real :class:`~v6lb.engines.plane.Plane` that records what the
daemon asks of it. A file cannot name [::1] as a backend, so the probe targets
are pointed at TCP listeners on [::1] after the daemon built them; a closed
listener makes its backend fail its probes.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from ipaddress import IPv6Address
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from v6lb.core.backends import BackendPool
from v6lb.engines import planes
from v6lb.engines.control import query
from v6lb.engines.daemon import Daemon
from v6lb.engines.plane import Plane, PlaneContext, PlaneStatus, Role, RunError, Staged, VipCounter
from v6lb.errors import UsageError
from v6lb.model.config import Config, load_config
from v6lb.model.pools import pools_for

VIP = "2001:db8:f::80"


def _file(path: Path, ports: list[int], sock: Path, *, interval: float = 0.2) -> Path:
    """One nat VIP ``web``, a backend 2001:db8:b::N per port."""
    data = {
        "lb": {"instance": "dmn", "control_socket": str(sock)},
        "vips": [
            {
                "name": "web",
                "address": VIP,
                "ports": [80],
                "mode": "nat",
                "health": {
                    "type": "tcp",
                    "interval": interval,
                    "timeout": 0.1,
                    "rise": 1,
                    "fall": 1,
                },
                "backends": [
                    {"address": f"2001:db8:b::{i + 1}", "port": p} for i, p in enumerate(ports)
                ],
            }
        ],
    }
    path.write_text(yaml.safe_dump(data))
    return path


class FakePlane(Plane):
    """A data plane that records every call into ``calls``.

    It stands in for the kernel plane: the daemon asks the mode table what it serves.
    """

    name = "kernel"
    role: ClassVar[Role] = Role.DATAPLANE

    def __init__(self, config: Config, calls: list[str], *, tag: str = "fake") -> None:
        self.config = config
        self.calls = calls
        self.tag = tag
        self._pools = pools_for(config)
        self.refuse_commit = False
        self.changes: list[tuple[str, list[bool]]] = []

    @classmethod
    def open(cls, config: Config, ctx: PlaneContext) -> FakePlane:
        return cls(config, [])

    def pools(self) -> Mapping[str, BackendPool]:
        return self._pools

    def install(self) -> str:
        self.calls.append(f"{self.tag} install")
        return f"{self.tag} installed"

    def apply_pool_change(self, vip: str, pool: BackendPool) -> str:
        self.changes.append((vip, [pool.is_up(i) for i in range(len(pool))]))
        return "applied"

    def stage(self, config: Config) -> Staged:
        self.calls.append(f"{self.tag} stage")
        pools = pools_for(config)

        def commit() -> str:
            if self.refuse_commit:
                raise RunError("the fake plane refuses", "let it")
            self.config, self._pools = config, pools
            self.calls.append(f"{self.tag} commit")
            return f": {len(pools)} VIP(s)"

        return Staged(pools, commit)

    def status(self) -> PlaneStatus:
        return PlaneStatus(
            counters={"web": VipCounter("fake web", 7, 70)},
            new_flows={"web": 7},
            backend_active_flows={"web": [2, 0]},
            maps={"web": ["fake_map"]},
            details={"fake": {"tag": self.tag}},
        )

    def teardown(self) -> list[str]:
        self.calls.append(f"{self.tag} teardown")
        return [f"{self.tag} state"]


class FakeProxy(Plane):
    """A proxy-like plane: no pools, a ``proxy`` section."""

    name = "fakeproxy"
    role: ClassVar[Role] = Role.PROXY

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def install(self) -> str:
        self.calls.append("proxy install")
        return ""

    def status(self) -> PlaneStatus:
        return PlaneStatus(sections={"proxy": {"engine": "fakeproxy", "state": "running"}})

    def teardown(self) -> list[str]:
        self.calls.append("proxy teardown")
        return []


def _listener() -> socket.socket:
    s = socket.socket(socket.AF_INET6)
    s.bind(("::1", 0))
    s.listen(16)
    return s


def _start(daemon: Daemon) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            daemon.serve(signals=False)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def _wait(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _daemon(config: Config, planes_: list[Plane], lines: list[str]) -> Daemon:
    daemon = Daemon(config, [], path=config.source, log=lines.append)
    daemon.attach(planes_)
    for target in daemon.health.targets.values():
        target.address = IPv6Address("::1")  # the listener of that port
    return daemon


def test_install_order_status_of_two_planes_and_teardown(tmp_path: Path) -> None:
    a, b = _listener(), _listener()
    try:
        sock = tmp_path / "c.sock"
        config = load_config(
            _file(tmp_path / "lb.yaml", [a.getsockname()[1], b.getsockname()[1]], sock)
        )
        calls: list[str] = []
        lines: list[str] = []
        plane = FakePlane(config, calls)
        daemon = _daemon(config, [plane, FakeProxy(calls)], lines)
        daemon.install()
        assert calls == ["fake install", "proxy install"]
        assert lines[-1].endswith(f"fake installed; control socket {sock}")
        t, errors = _start(daemon)
        try:
            st = query(str(sock))
            assert list(st)[:12] == [
                "instance",
                "pid",
                "file",
                "netns",
                "dataplane",
                "control_socket",
                "uptime_s",
                "reloads",
                "map_updates",
                "last_error",
                "skipped",
                "vips",
            ]
            assert list(st)[-5:] == ["npt", "fake", "events", "proxy", "control"]
            assert (st["instance"], st["dataplane"], st["pid"]) == ("dmn", "kernel", os.getpid())
            assert st["fake"] == {"tag": "fake"}
            assert st["proxy"] == {"engine": "fakeproxy", "state": "running"}
            (vip,) = st["vips"]
            assert vip["maps"] == ["fake_map"]
            assert vip["counter"] == {"name": "fake web", "packets": 7, "bytes": 70}
            assert [x["health"] for x in vip["backends"]] == ["up", "up"]
            assert sum(x["slots"] for x in vip["backends"]) == vip["table_size"]
            assert vip["backends"][0]["probe"] == f"tcp [::1]:{a.getsockname()[1]}"
        finally:
            daemon.request_stop()
            t.join(10)
        assert errors == [] and not t.is_alive()
        assert calls[-2:] == ["proxy teardown", "fake teardown"]  # the last installed first
        assert "v6lb run [dmn]: removed fake state" in lines
        assert lines[-1] == "v6lb run [dmn]: stopped"
        assert not sock.exists()
    finally:
        a.close()
        b.close()


def test_a_dead_backend_reaches_apply_pool_change(tmp_path: Path) -> None:
    a, b = _listener(), _listener()
    dead_port = b.getsockname()[1]
    sock = tmp_path / "c.sock"
    config = load_config(_file(tmp_path / "lb.yaml", [a.getsockname()[1], dead_port], sock))
    lines: list[str] = []
    plane = FakePlane(config, [])
    daemon = _daemon(config, [plane], lines)
    daemon.install()
    t, errors = _start(daemon)
    try:
        b.close()  # refused from now on: the second backend falls
        _wait("the pool change", lambda: ("web", [True, False]) in plane.changes)
        assert plane.pools()["web"].is_up(0) and not plane.pools()["web"].is_up(1)
        st = query(str(sock))
        assert st["map_updates"] >= 1
        assert [x["health"] for x in st["vips"][0]["backends"]] == ["up", "down"]
        assert any("web: 2001:db8:b::2 down; applied" in line for line in lines)
    finally:
        daemon.request_stop()
        t.join(10)
        a.close()
    assert errors == []


def test_reload_success_and_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    a = _listener()
    try:
        sock = tmp_path / "c.sock"
        path = _file(tmp_path / "lb.yaml", [a.getsockname()[1]], sock)
        config = load_config(path)
        calls: list[str] = []
        lines: list[str] = []
        plane = FakePlane(config, calls)
        daemon = _daemon(config, [plane], lines)
        daemon.install()
        running = daemon.config

        path.write_text("vips: [{name: x}]\n")  # does not load
        assert daemon.reload() is False
        assert daemon.config is running and daemon.reloads == 0
        assert daemon.last_error is not None
        assert daemon.last_error.startswith("reload failed, still running the previous config")
        assert "stage" not in " ".join(calls)  # a file that does not load reaches no plane

        _file(path, [a.getsockname()[1], a.getsockname()[1] + 1], sock)
        plane.refuse_commit = True  # the plane refuses to apply: nothing changes either
        assert daemon.reload() is False
        assert daemon.config is running and "the fake plane refuses" in (daemon.last_error or "")
        assert len(daemon.health.pools["web"]) == 1

        plane.refuse_commit = False
        assert daemon.reload() is True
        assert daemon.reloads == 1 and daemon.last_error is None
        assert len(daemon.config.vips[0].backends) == 2
        assert daemon.health.pools["web"] is plane.pools()["web"]
        assert lines[-1] == f"v6lb run [dmn]: reloaded {path}: 1 VIP(s)"
        assert calls[-2:] == ["fake stage", "fake commit"]
    finally:
        daemon.teardown()
        a.close()


def test_sigterm_tears_down(tmp_path: Path) -> None:
    """In the main thread, with the process's signal handlers: SIGHUP reloads, SIGTERM stops."""
    a = _listener()
    try:
        sock = tmp_path / "c.sock"
        path = _file(tmp_path / "lb.yaml", [a.getsockname()[1]], sock)
        config = load_config(path)
        calls: list[str] = []
        lines: list[str] = []
        daemon = _daemon(config, [FakePlane(config, calls)], lines)
        daemon.install()
        pid = os.getpid()

        def signals() -> None:
            time.sleep(0.3)
            os.kill(pid, signal.SIGHUP)
            time.sleep(0.3)
            os.kill(pid, signal.SIGTERM)

        threading.Thread(target=signals, daemon=True).start()
        before = signal.getsignal(signal.SIGTERM)
        assert daemon.serve() == 0
        assert signal.getsignal(signal.SIGTERM) is before  # handlers given back
        assert daemon.reloads == 1
        assert calls == ["fake install", "fake stage", "fake commit", "fake teardown"]
        assert "v6lb run [dmn]: SIGTERM: removing what this instance installed" in lines
        assert not sock.exists()
    finally:
        a.close()


def test_a_plane_failure_on_its_thread_ends_the_instance(tmp_path: Path) -> None:
    config = load_config(_file(tmp_path / "lb.yaml", [9], tmp_path / "c.sock"))
    calls: list[str] = []
    daemon = _daemon(config, [FakePlane(config, calls)], [])
    daemon.install()
    t, errors = _start(daemon)
    threading.Thread(target=daemon.request_stop, args=(RuntimeError("engine died"),)).start()
    t.join(10)
    assert not t.is_alive() and calls[-1] == "fake teardown"
    assert [str(e) for e in errors] == ["engine died"]


class NewPlane(FakePlane):
    name = "newplane"


def test_a_new_plane_registers_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planes, "_PLANES", dict(planes._PLANES))
    planes.register("newplane", Role.DATAPLANE, __name__, "NewPlane")  # the one line
    assert planes.plane_class("newplane") is NewPlane
    assert planes.names(Role.DATAPLANE) == ("kernel", "python", "xdp", "newplane")
    assert planes.names(Role.PROXY) == ("builtin", "haproxy")
    planes.register("other", Role.DATAPLANE, __name__, "NewPlane")  # its name is "newplane"
    with pytest.raises(TypeError):
        planes.plane_class("other")


def test_the_registry_and_the_mode_table_agree() -> None:
    assert planes.names(Role.DATAPLANE)[:2] == ("kernel", "python")
    for name in ("kernel", "python", "xdp", "builtin", "haproxy"):
        cls = planes.plane_class(name)
        assert cls.name == name and cls.role is planes._PLANES[name].role
    assert set(planes.served_modes("kernel")) >= {"npt", "nat", "dsr-l2", "dsr-ip6ip6", "dsr-srv6"}
    assert planes.served_modes("xdp") == ("npt", "dsr-l2", "dsr-ip6ip6", "dsr-srv6")
    assert planes.served_modes("builtin") == ("proxy-l4", "proxy-l7")


class DrainingPlane(FakePlane):
    """A data plane with a BGP announcement and ``busy`` packets in flight until cleared."""

    def __init__(self, config: Config, calls: list[str]) -> None:
        super().__init__(config, calls)
        self.busy = 3

    def withdraw(self) -> str:
        self.calls.append("withdraw")
        return "bgp: withdrew 2001:db8:f::80/128"

    def in_flight(self) -> int:
        return self.busy


class QuiescingProxy(FakeProxy):
    def __init__(self, calls: list[str]) -> None:
        super().__init__(calls)
        self.open = 2

    def quiesce(self) -> str:
        self.calls.append("quiesce")
        return "fakeproxy: listeners closed"

    def in_flight(self) -> int:
        return self.open


def test_graceful_stop_withdraws_settles_quiesces_and_waits(tmp_path: Path) -> None:
    """--drain-timeout: withdraw, then (after the settle) quiesce, then wait for 0 in flight."""
    a = _listener()
    try:
        path = _file(tmp_path / "lb.yaml", [a.getsockname()[1]], tmp_path / "c.sock")
        config = load_config(path)
        calls: list[str] = []
        lines: list[str] = []
        plane, proxy = DrainingPlane(config, calls), QuiescingProxy(calls)
        daemon = Daemon(config, [], path=str(path), log=lines.append, drain_timeout=4.0)
        daemon.attach([plane, proxy])
        for target in daemon.health.targets.values():
            target.address = IPv6Address("::1")
        daemon.install()
        t, errors = _start(daemon)
        t0 = time.monotonic()
        daemon._signals.append(signal.SIGTERM)  # as the handler does (the loop polls)
        _wait("the withdraw", lambda: "withdraw" in calls)
        time.sleep(0.3)
        assert "quiesce" not in calls  # the settle: the routers move the flows first
        _wait("the quiesce", lambda: "quiesce" in calls, 3)
        assert time.monotonic() - t0 >= 0.9
        time.sleep(0.3)
        assert t.is_alive() and "fake teardown" not in calls  # 5 in flight
        plane.busy = 0
        time.sleep(0.3)
        assert t.is_alive()  # the proxy's 2 connections
        proxy.open = 0
        t.join(5)
        assert not t.is_alive() and not errors
        assert calls[-3:] == ["quiesce", "proxy teardown", "fake teardown"]
        text = "\n".join(lines)
        assert "SIGTERM: stopping gracefully (--drain-timeout 4s); bgp: withdrew" in text
        assert "fakeproxy: listeners closed" in text and "drained in" in text
    finally:
        a.close()


def test_graceful_stop_ends_at_the_timeout_and_a_second_signal_stops_at_once(
    tmp_path: Path,
) -> None:
    a = _listener()
    try:
        path = _file(tmp_path / "lb.yaml", [a.getsockname()[1]], tmp_path / "c.sock")
        config = load_config(path)
        for second in (False, True):
            calls: list[str] = []
            lines: list[str] = []
            plane = DrainingPlane(config, calls)
            daemon = Daemon(config, [], path=str(path), log=lines.append, drain_timeout=1.5)
            daemon.attach([plane])
            for target in daemon.health.targets.values():
                target.address = IPv6Address("::1")
            daemon.install()
            t, errors = _start(daemon)
            t0 = time.monotonic()
            daemon._signals.append(signal.SIGTERM)
            if second:
                _wait("the withdraw", lambda c=calls: "withdraw" in c)
                daemon._signals.append(signal.SIGINT)
            t.join(5)
            took = time.monotonic() - t0
            assert not t.is_alive() and not errors
            text = "\n".join(lines)
            if second:
                assert took < 1.0, took
                assert "SIGINT: removing what this instance installed" in text
            else:
                assert 1.4 < took < 3.0, took
                assert "--drain-timeout 1.5s reached with kernel 3 still in flight" in text
    finally:
        a.close()


def test_drain_timeout_refuses_a_negative_number(tmp_path: Path) -> None:
    path = _file(tmp_path / "lb.yaml", [80], tmp_path / "c.sock")
    with pytest.raises(UsageError, match="--drain-timeout -1"):
        Daemon(load_config(path), [], path=str(path), drain_timeout=-1)
