"""``/metrics`` (lb.metrics): the families one status gives, and the daemon serving them.

No root: a status built in code for the families, and the daemon with a fake plane
(tests/test_daemon.py's) serving HTTP on [::1]. tests/test_metrics_root.py has
Prometheus itself scraping a real instance.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from test_daemon import FakePlane, _daemon, _file, _listener, _start, _wait
from v6lb.engines.daemon import Daemon
from v6lb.engines.metrics import StatusCollector, metric_families
from v6lb.engines.plane import RunError
from v6lb.model.config import load_config
from v6lb.model.status import InstanceStatus

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _text(status: InstanceStatus) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatusCollector(lambda: status))
    return generate_latest(reg).decode()


KERNEL_STATUS = {
    "instance": "lb0",
    "dataplane": "kernel",
    "reloads": 2,
    "map_updates": 3,
    "vips": [
        {
            "name": "web",
            "address": "2001:db8:f::80",
            "ports": [80],
            "mode": "nat",
            "counter": {"name": "v0_web", "packets": 60, "bytes": 4800},
            "icmp_errors": {"forwarded": 0, "translated": 2, "unmatched": 1},
            "backends": [
                {"address": "2001:db8:b::1", "port": 80, "health": "up", "slots": 5,
                 "transitions": 0, "active_flows": 4},
                {"address": "2001:db8:b::2", "port": None, "health": "down", "slots": 0,
                 "transitions": 1, "active_flows": 0},
            ],
            "traffic": {"in": {"name": "v0_web_in", "packets": 700, "bytes": 56000},
                        "out": {"name": "v0_web_out", "packets": 650, "bytes": 900000}},
            "new_flows": 60,
            "active_flows": 4,
        },
        {
            "name": "dsr",
            "address": "2001:db8:f::81",
            "ports": [80],
            "mode": "dsr-srv6",
            "counter": {"name": "v1_dsr", "packets": 10, "bytes": 1000},
            "backends": [],
            "traffic": {"in": {"name": "v1_dsr", "packets": 10, "bytes": 1000}},
        },
    ],
    "npt": [{"inside": "fd00:1::/48", "outside": "2001:db8:1::/48",
             "icmp_errors": {"translated": 4, "unmatched": 5}}],
    "forward": {"forward_denied": 7, "forward_unreachable": 1, "forward_allowed": 9},
    "conntrack": {"conntrack_max": 100, "conntrack": 20, "conntrack_full": 3},
    "bgp": {"asn": 65001, "bird_pid": 9, "bird_alive": True,
            "sessions": {"r1": {"proto": "BGP", "state": "up", "info": "Established"}},
            "announced": ["2001:db8:f::80/128"], "withdrawn": ["2001:db8:f::81/128"]},
    "proxy": {"engine": "haproxy", "state": "running", "vips": [
        {"name": "api", "address": "2001:db8:f::82", "ports": [8080], "mode": "proxy-l7",
         "connections": 5, "active": 1, "requests": 6, "bytes_in": 100, "bytes_out": 200,
         "errors": {"ereq": 1}, "responses": {"2xx": 4, "5xx": 2},
         "backends": [{"address": "2001:db8:b::3", "port": 9000, "health": "UP",
                       "connections": 5, "active": 1, "requests": 6,
                       "errors": {"econ": 2}, "responses": {"2xx": 4, "5xx": 1}}]},
    ]},
}  # fmt: skip


def test_one_status_gives_every_family_with_its_labels() -> None:
    s = _samples(_text(InstanceStatus.from_dict(KERNEL_STATUS)))
    web = {"vip": "web", "mode": "nat"}
    assert _value(s, "v6lb_vip_new_flows_total", **web) == 60
    assert _value(s, "v6lb_vip_active_flows", **web) == 4
    assert _value(s, "v6lb_vip_packets_total", **web, direction="in") == 700
    assert _value(s, "v6lb_vip_bytes_total", **web, direction="out") == 900000
    assert ("v6lb_vip_new_flows_total", frozenset({"vip": "dsr", "mode": "dsr-srv6"})) not in s
    dsr = {"vip": "dsr", "mode": "dsr-srv6", "direction": "in"}
    assert _value(s, "v6lb_vip_packets_total", **dsr) == 10
    assert _value(s, "v6lb_vip_bytes_total", **dsr) == 1000
    assert _value(s, "v6lb_vip_icmp_errors_total", **web, action="translated") == 2
    assert _value(s, "v6lb_vip_icmp_errors_total", **web, action="unmatched") == 1
    b1, b2 = "[2001:db8:b::1]:80", "2001:db8:b::2"
    assert _value(s, "v6lb_backend_up", **web, backend=b1) == 1
    assert _value(s, "v6lb_backend_up", **web, backend=b2) == 0
    assert _value(s, "v6lb_backend_health_transitions_total", **web, backend=b2) == 1
    assert _value(s, "v6lb_backend_maglev_slots", **web, backend=b1) == 5
    assert _value(s, "v6lb_backend_active_flows", **web, backend=b1) == 4
    assert ("v6lb_backend_new_flows_total", frozenset({**web, "backend": b1}.items())) not in s
    npt = {"inside": "fd00:1::/48", "outside": "2001:db8:1::/48"}
    assert _value(s, "v6lb_npt_icmp_errors_total", **npt, action="unmatched") == 5
    assert _value(s, "v6lb_drops_total", reason="forward_denied") == 7
    assert _value(s, "v6lb_drops_total", reason="conntrack_full") == 3
    assert _value(s, "v6lb_forward_allowed_packets_total") == 9
    assert _value(s, "v6lb_conntrack_entries") == 20
    assert _value(s, "v6lb_conntrack_max") == 100
    assert _value(s, "v6lb_reloads_total") == 2
    assert _value(s, "v6lb_map_updates_total") == 3
    assert _value(s, "v6lb_bgp_announced", prefix="2001:db8:f::80/128") == 1
    assert _value(s, "v6lb_bgp_announced", prefix="2001:db8:f::81/128") == 0
    assert _value(s, "v6lb_bgp_session_up", session="r1", proto="BGP") == 1
    assert _value(s, "v6lb_bgp_speaker_up") == 1
    api = {"vip": "api", "mode": "proxy-l7"}
    assert _value(s, "v6lb_proxy_requests_total", **api) == 6
    assert _value(s, "v6lb_proxy_connections_total", **api) == 5
    assert _value(s, "v6lb_proxy_active_connections", **api) == 1
    assert _value(s, "v6lb_proxy_bytes_total", **api, direction="out") == 200
    assert _value(s, "v6lb_proxy_errors_total", **api, reason="ereq") == 1
    b3 = {**api, "backend": "[2001:db8:b::3]:9000"}
    assert _value(s, "v6lb_backend_up", **b3) == 1
    assert _value(s, "v6lb_backend_connect_failures_total", **b3) == 2
    assert _value(s, "v6lb_proxy_backend_requests_total", **b3) == 6
    assert _value(s, "v6lb_proxy_responses_total", **api, **{"class": "5xx"}) == 2
    assert _value(s, "v6lb_proxy_backend_responses_total", **b3, **{"class": "2xx"}) == 4
    # HAProxy has no request-duration histogram: the family is not there
    assert not [k for k in s if k[0].startswith("v6lb_proxy_request_duration_seconds")]
    info = {"lb_instance": "lb0", "dataplane": "kernel", "proxy": "haproxy"}
    assert _value(s, "v6lb_instance_info", **info) == 1


def test_the_builtin_engines_latency_is_a_prometheus_histogram() -> None:
    buckets = [[0.001, 0], [0.01, 3], [0.1, 4], ["+Inf", 5]]
    proxy = {"engine": "builtin", "state": "running", "vips": [
        {"name": "web", "address": "2001:db8:f::82", "ports": [80], "mode": "proxy-l7",
         "connections": 1, "responses": {"2xx": 5},
         "latency": {"buckets": buckets, "sum": 1.25, "count": 5}, "backends": []},
    ]}  # fmt: skip
    d = {"instance": "lb0", "proxy": proxy}
    status = InstanceStatus.from_dict(d)
    assert status.to_dict() == d
    s = _samples(_text(status))
    web = {"vip": "web", "mode": "proxy-l7"}
    name = "v6lb_proxy_request_duration_seconds"
    assert _value(s, f"{name}_bucket", **web, le="0.01") == 3
    assert _value(s, f"{name}_bucket", **web, le="+Inf") == 5
    assert _value(s, f"{name}_count", **web) == 5
    assert _value(s, f"{name}_sum", **web) == 1.25
    # a latency the model refuses stays in the VIP's extra; the rest still exports
    bad = {**proxy["vips"][0], "latency": {"buckets": [[0.1, 1]], "sum": 0.1, "count": 1}}
    status = InstanceStatus.from_dict({"instance": "lb0", "proxy": {**proxy, "vips": [bad]}})
    s = _samples(_text(status))
    assert _value(s, "v6lb_proxy_responses_total", **web, **{"class": "2xx"}) == 5
    assert not [k for k in s if k[0].startswith(name)]


def test_the_python_planes_forwarder_counters_are_not_a_vips() -> None:
    web = {k: v for k, v in KERNEL_STATUS["vips"][0].items() if k != "traffic"}  # type: ignore[index]
    web["backends"] = [{**web["backends"][0], "new_flows": 3}]
    d = {
        "instance": "lb0",
        "dataplane": "python",
        "vips": [{**web, "counter": {"name": "python nat forwarded", "packets": 99, "bytes": 0},
                  "new_flows": 3}],
        "engine": {"nat": {"counters": {"forwarded": 99, "replies": 98, "drop.no_route": 4}},
                   "dsr": {"counters": {"forwarded": 1, "replies": 0}, "flow_cache": 3}},
    }  # fmt: skip
    s = _samples(_text(InstanceStatus.from_dict(d)))
    assert not [k for k in s if k[0] == "v6lb_vip_packets_total"]
    web_labels = {"vip": "web", "mode": "nat"}
    assert _value(s, "v6lb_vip_new_flows_total", **web_labels) == 3
    b1 = {**web_labels, "backend": "[2001:db8:b::1]:80"}
    assert _value(s, "v6lb_backend_new_flows_total", **b1) == 3
    assert _value(s, "v6lb_forwarder_packets_total", forwarder="nat", verdict="replies") == 98
    assert _value(s, "v6lb_drops_total", reason="no_route") == 4
    assert _value(s, "v6lb_flow_cache_entries", forwarder="dsr") == 3


def test_scrapes_share_one_snapshot_within_max_age() -> None:
    calls: list[int] = []

    def snap() -> InstanceStatus:
        calls.append(1)
        return InstanceStatus.from_dict(KERNEL_STATUS)

    c = StatusCollector(snap, max_age=60)
    for _ in range(3):
        list(c.collect())
    assert len(calls) == 1
    assert [f.name for f in metric_families(snap())][0] == "v6lb_instance"


def _free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


def _with_metrics(path: Path, port: int) -> None:
    data = yaml.safe_load(path.read_text())
    data["lb"]["metrics"] = f"[::1]:{port}"
    path.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize("threaded", [False, True], ids=["on-the-loop", "off-the-loop"])
def test_the_daemon_serves_metrics_and_counts_health_transitions(
    tmp_path: Path, threaded: bool
) -> None:
    a, b = _listener(), _listener()
    port = _free_port()
    path = _file(tmp_path / "lb.yaml", [a.getsockname()[1], b.getsockname()[1]], tmp_path / "s")
    _with_metrics(path, port)
    config = load_config(path)
    plane = FakePlane(config, [])
    if threaded:
        plane.threaded_status = True  # type: ignore[misc]
    daemon = _daemon(config, [plane], [])
    daemon.open_metrics()
    daemon.install()
    t, errors = _start(daemon)
    url = f"http://[::1]:{port}/metrics"
    try:
        b.close()  # the second backend falls
        _wait("the pool change", lambda: ("web", [True, False]) in plane.changes)
        daemon.metrics.collector.max_age = 0  # type: ignore[union-attr]
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        s = _samples(text)
        web = {"vip": "web", "mode": "nat"}
        down = {**web, "backend": f"[2001:db8:b::2]:{config.vips[0].backends[1].port}"}
        assert _value(s, "v6lb_backend_up", **down) == 0
        assert _value(s, "v6lb_backend_health_transitions_total", **down) == 1
        assert _value(s, "v6lb_vip_new_flows_total", **web) == 7  # the fake plane's figures
        assert _value(s, "v6lb_backend_active_flows", **down) == 0
        up = {**web, "backend": f"[2001:db8:b::1]:{config.vips[0].backends[0].port}"}
        assert _value(s, "v6lb_backend_active_flows", **up) == 2
        assert _value(s, "v6lb_map_updates_total") >= 1
        assert ("process_open_fds", frozenset()) in s
        # scrapes from several threads at once all get an answer
        got: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: got.append(urllib.request.urlopen(url, timeout=10).status)
            )
            for _ in range(4)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join(15)
        assert got == [200] * 4
    finally:
        daemon.request_stop()
        t.join(10)
        a.close()
    assert errors == [] and daemon.metrics is None
    with pytest.raises(OSError):  # closed with the instance
        urllib.request.urlopen(url, timeout=2)


def test_a_metrics_port_in_use_is_refused_before_install(tmp_path: Path) -> None:
    taken = socket.socket(socket.AF_INET6)
    taken.bind(("::1", 0))
    taken.listen(1)
    try:
        path = _file(tmp_path / "lb.yaml", [1], tmp_path / "s")
        _with_metrics(path, taken.getsockname()[1])
        config = load_config(path)
        calls: list[str] = []
        daemon: Daemon = _daemon(config, [FakePlane(config, calls)], [])
        with pytest.raises(RunError) as err:
            daemon.open_metrics()
        assert f"lb.metrics: cannot listen on [::1]:{taken.getsockname()[1]}" in str(err.value)
        assert "free port" in str(err.value)
        assert err.value.exit_code == 2
        assert calls == [] and not (tmp_path / "s").exists()
    finally:
        taken.close()


def test_a_scrape_without_a_snapshot_is_a_500_and_the_server_goes_on() -> None:
    from ipaddress import IPv6Address
    from urllib.error import HTTPError

    from v6lb.engines.metrics import MetricsServer
    from v6lb.model.config import MetricsListen

    answers = iter([TimeoutError("the loop gave no status in 5 s"), None])

    def snap() -> InstanceStatus:
        err = next(answers)
        if err is not None:
            raise err
        return InstanceStatus.from_dict(KERNEL_STATUS)

    server = MetricsServer(MetricsListen(IPv6Address("::1"), _free_port()), snap, max_age=0)
    server.start()
    url = f"http://[::1]:{server.port}/metrics"
    try:
        with pytest.raises(HTTPError) as err:
            urllib.request.urlopen(url, timeout=10)
        assert err.value.code == 500
        assert b"the loop gave no status in 5 s" in err.value.read()
        assert urllib.request.urlopen(url, timeout=10).status == 200
    finally:
        server.close()


@pytest.mark.parametrize(
    ("line", "want"),
    [
        (
            "tcp      6 431999 ESTABLISHED src=2001:db8:a::2 dst=2001:db8:f::80 sport=40000"
            " dport=80 src=2001:db8:b::10 dst=2001:db8:a::2 sport=8080 dport=40000 [ASSURED]"
            " mark=0 use=1",
            ("80", "2001:db8:b::10", "8080"),
        ),
        (  # nf_conntrack_acct on, a reply not seen yet
            "udp      17 29 src=2001:db8:a::2 dst=2001:db8:f::80 sport=5353 dport=53"
            " packets=1 bytes=60 [UNREPLIED] src=2001:db8:b::10 dst=2001:db8:5::1 sport=53"
            " dport=20000 packets=0 bytes=0 mark=0 use=1",
            ("53", "2001:db8:b::10", "53"),
        ),
    ],
)
def test_a_conntrack_line_names_the_vip_port_and_the_backend(
    line: str, want: tuple[str, str, str]
) -> None:
    from v6lb.engines.kernel.apply import _CT_TUPLES

    m = _CT_TUPLES.search(line)
    assert m is not None and m.groups() == want
