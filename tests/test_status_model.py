"""One typed status (model/status.py): the daemon builds it, the CLI reads it back.

The answer on the control socket is ``InstanceStatus(...).to_dict()``; reading any
answer and writing it again gives the same JSON, key order included, whatever a
plane added or a newer daemon sends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_cli_package import KERNEL, PROXY_ONLY, PYTHON
from test_daemon import FakePlane, FakeProxy, _file
from v6lb.engines.daemon import Daemon
from v6lb.engines.plane import PlaneStatus, Role, VipCounter
from v6lb.model.config import load_config
from v6lb.model.status import (
    BackendStatus,
    ConntrackLimits,
    Counter,
    IcmpErrors,
    InstanceStatus,
    KernelObjects,
    NptStatus,
    ProxySection,
    VipStatus,
)

RECORDED = [KERNEL, PYTHON, PROXY_ONLY]

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 70000)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


def _same_json(a: Any, b: Any) -> bool:
    return json.dumps(a) == json.dumps(b)  # key order included


def _mutate(data: st.DataObject, v: Any) -> Any:
    """``v`` with keys dropped, values replaced by any JSON, keys added, keys reordered."""
    if isinstance(v, list):
        return [_mutate(data, x) for x in v]
    if not isinstance(v, dict):
        return v
    out: dict[str, Any] = {}
    for k, x in v.items():
        action = data.draw(st.sampled_from(["keep", "keep", "keep", "drop", "replace"]))
        if action == "keep":
            out[k] = _mutate(data, x)
        elif action == "replace":
            out[k] = data.draw(JSON)
    if data.draw(st.booleans()):
        out[data.draw(st.text(max_size=6))] = data.draw(JSON)
    order = data.draw(st.permutations(list(out)))
    return {k: out[k] for k in order}


@pytest.mark.parametrize("answer", RECORDED, ids=["kernel", "python", "proxy-only"])
def test_recorded_answers_round_trip(answer: dict[str, Any]) -> None:
    st_ = InstanceStatus.from_dict(answer)
    assert _same_json(st_.to_dict(), answer)
    assert InstanceStatus.from_dict(st_.to_dict()) == st_


@settings(max_examples=50)
@given(st.sampled_from(RECORDED), st.data())
def test_any_variant_of_a_recorded_answer_round_trips(
    answer: dict[str, Any], data: st.DataObject
) -> None:
    """Dropped, odd, added or reordered keys at any depth: the same JSON comes back."""
    d = _mutate(data, answer)
    st_ = InstanceStatus.from_dict(d)
    assert _same_json(st_.to_dict(), d)
    assert InstanceStatus.from_dict(st_.to_dict()) == st_


@given(st.dictionaries(st.sampled_from([*KERNEL, *PYTHON, "x"]), JSON))
def test_any_json_object_round_trips(d: dict[str, Any]) -> None:
    assert _same_json(InstanceStatus.from_dict(d).to_dict(), d)


def test_built_in_code_writes_fields_in_order_and_leaves_out_unset_optionals() -> None:
    assert Counter(packets=1, bytes=2).to_dict() == {"packets": 1, "bytes": 2}
    assert list(Counter("c").to_dict()) == ["name", "packets", "bytes"]
    assert "error" not in KernelObjects().to_dict()
    assert KernelObjects(error="x").to_dict()["error"] == "x"
    assert ProxySection(engine="builtin").to_dict() == {
        "engine": "builtin",
        "state": None,
        "vips": [],
    }
    assert list(BackendStatus("fd00::1").to_dict()) == [
        "address",
        "port",
        "weight",
        "drain",
        "health",
        "probe",
        "successes",
        "failures",
        "slots",
        "enabled",
    ]
    vip = VipStatus("web", "2001:db8::1", extra={"x": 1}).to_dict()
    assert list(vip)[-3:] == ["counter", "backends", "x"]  # icmp_errors: None, left out
    assert list(VipStatus("w", icmp_errors=IcmpErrors()).to_dict())[-2:] == [
        "icmp_errors",
        "backends",
    ]
    assert NptStatus("fd01::/48", "2001:db8::/48").to_dict() == {
        "inside": "fd01::/48",
        "outside": "2001:db8::/48",
    }
    # given keys, exactly those, in that order
    assert InstanceStatus(instance="a", pid=1, keys=("pid", "instance")).to_dict() == {
        "pid": 1,
        "instance": "a",
    }


def test_an_incomplete_npt_pair_stays_raw() -> None:
    st_ = InstanceStatus.from_dict({"npt": [{"inside": "fd01::/48"}]})
    assert st_.npt == [] and st_.extra == {"npt": [{"inside": "fd01::/48"}]}


# --- the daemon builds it -------------------------------------------------------------

PYTHON_DETAILS = {
    "engine": {"nat": {"counters": {"forwarded": 3}}},
    "devices": [{"name": "lan", "rx": 4}],
    "kernel": {"error": "CalledProcessError: nft"},
    "forward": {"forward_denied": 1, "forward_unreachable": 0, "forward_allowed": 2},
    "conntrack": {"conntrack_max": 10, "conntrack": 0, "conntrack_full": 0},
}
PROXY_SECTION = {
    "engine": "fakeproxy",
    "state": "running",
    "vips": [{"name": "p", "address": "2001:db8::1", "ports": [80], "backends": []}],
    "fds": 3,
}


class PythonLike(FakePlane):
    def status(self) -> PlaneStatus:
        return PlaneStatus(
            counters={"web": VipCounter("python nat forwarded", 3, 0)},
            maps={"web": []},
            details=dict(PYTHON_DETAILS),
        )


class Proxy(FakeProxy):
    role: ClassVar[Role] = Role.PROXY

    def status(self) -> PlaneStatus:
        return PlaneStatus(sections={"proxy": PROXY_SECTION})


def test_the_daemon_answers_one_typed_status(tmp_path: Path) -> None:
    config = load_config(_file(tmp_path / "lb.yaml", [8080, 8081], tmp_path / "c.sock"))
    daemon = Daemon(config, [], path="lb.yaml", log=lambda line: None)
    daemon.attach([PythonLike(config, []), Proxy([])])
    status = daemon.status()
    assert isinstance(status, InstanceStatus)
    assert isinstance(status.kernel, KernelObjects) and status.kernel.error
    assert isinstance(status.conntrack, ConntrackLimits) and status.conntrack.conntrack_max == 10
    assert isinstance(status.proxy, ProxySection) and status.proxy.vips[0].name == "p"
    assert status.vips[0].counter == Counter("python nat forwarded", 3, 0)
    answer = daemon.answer()
    assert list(answer) == [
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
        "npt",
        *PYTHON_DETAILS,
        "events",
        "proxy",
    ]
    assert {k: answer[k] for k in PYTHON_DETAILS} == PYTHON_DETAILS
    assert answer["proxy"] == PROXY_SECTION
    (vip,) = answer["vips"]
    assert list(vip) == [
        "name",
        "address",
        "ports",
        "protocol",
        "mode",
        "table_size",
        "seed",
        "maps",
        "counter",
        "icmp_errors",
        "backends",
    ]
    assert vip["counter"] == {"name": "python nat forwarded", "packets": 3, "bytes": 0}
    assert _same_json(InstanceStatus.from_dict(answer).to_dict(), answer)


def test_a_proxy_only_answer(tmp_path: Path) -> None:
    config = load_config(_file(tmp_path / "lb.yaml", [8080], tmp_path / "c.sock"))
    daemon = Daemon(config, [], path="p.yaml", log=lambda line: None)
    daemon.attach([Proxy([])])
    answer = daemon.answer()
    assert answer == {
        "instance": "dmn",
        "pid": answer["pid"],
        "file": "p.yaml",
        "netns": None,
        "dataplane": None,
        "proxy_engine": "fakeproxy",
        "control_socket": str(tmp_path / "c.sock"),
        "uptime_s": answer["uptime_s"],
        "reloads": 0,  # haproxy reloads its proxy VIPs on SIGHUP
        "map_updates": 0,  # `v6lb ctl` on a proxy VIP
        "last_error": None,
        "vips": [],
        "npt": [],
        "skipped": [],
        "proxy": PROXY_SECTION,
    }
    assert list(answer)[-4:] == ["vips", "npt", "skipped", "proxy"]
    assert daemon.status().reloads == 0
