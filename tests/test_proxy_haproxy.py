"""Golden tests of render/haproxy.py (no haproxy needed); ``haproxy -c`` when it is installed.

``V6LB_UPDATE_GOLDEN=1 pytest tests/test_proxy_haproxy.py`` rewrites tests/golden/haproxy_*.cfg.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from v6lb.model.config import parse_config
from v6lb.render.haproxy import render_haproxy, scaled_weights

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("V6LB_UPDATE_GOLDEN") == "1"

L4 = {
    "vips": [
        {
            "name": "tcp",
            "address": "2001:db8:0:10::443",
            "ports": [443, 8443],
            "mode": "proxy-l4",
            "scheduler": "least-connections",
            "proxy_protocol": "v2",
            "trusted_proxy_sources": ["2001:db8:ff::/48"],
            "timeouts": {"connect": 3, "idle": 120, "total": 3600},
            "max_connections_per_source": 20,
            "health": {"type": "tcp", "interval": 2, "timeout": 0.5, "rise": 2, "fall": 3},
            "backends": [
                {"address": "2001:db8:0:20::1", "port": 8443, "weight": 1000},
                {"address": "2001:db8:0:20::2", "port": 8443, "weight": 10},
                {"address": "2001:db8:0:20::3", "drain": True},
            ],
        }
    ]
}
L7 = {
    "vips": [
        {
            "name": "web",
            "address": "2001:db8:0:10::80",
            "ports": [80],
            "mode": "proxy-l7",
            "scheduler": "round-robin",
            "trusted_sources": ["2001:db8:100::/56"],
            "dual_stack": "192.0.2.80",
            "max_header_bytes": 32768,
            "max_request_bytes": 1048576,
            "max_connections_per_source": 5,
            "timeouts": {"connect": 2, "idle": 30.5},
            "health": {"type": "http", "path": "/healthz", "interval": 5, "port": 8081},
            "backends": [
                {"address": "2001:db8:0:20::1", "port": 8080},
                {"address": "2001:db8:0:20::2", "port": 8080, "weight": 3},
            ],
        },
        {
            "name": "api",
            "address": "2001:db8:0:10::81",
            "ports": [8080],
            "mode": "proxy-l7",
            "scheduler": "maglev",
            "health": {"type": "none"},
            "backends": [{"address": "2001:db8:0:21::1"}],
        },
    ]
}
TLS = {
    "vips": [
        {
            "name": "shop",
            "address": "2001:db8:0:10::443",
            "ports": [443],
            "mode": "proxy-l7",
            "trusted_sources": ["2001:db8:100::/56"],
            "dual_stack": "192.0.2.43",
            "health": {"type": "none"},
            "backends": [{"address": "2001:db8:0:20::1", "port": 8080}],
            "tls": {
                "certificates": [
                    {"cert": "/etc/v6lb/www.crt", "key": "/etc/v6lb/www.key"},
                    {"cert": "api.crt", "key": "api.key", "names": ["api.example.com"]},
                ],
                "min_version": "1.3",
                "unknown_sni": "refuse",
                "client_ca": "/etc/v6lb/clients.pem",
            },
        },
        {
            "name": "stream",
            "address": "2001:db8:0:10::444",
            "ports": [443],
            "mode": "proxy-l4",
            "proxy_protocol": "v2",
            "health": {"type": "none"},
            "backends": [{"address": "2001:db8:0:20::2", "port": 9000}],
            "tls": {"certificates": [{"cert": "/etc/v6lb/www.crt", "key": "/etc/v6lb/www.key"}]},
        },
    ]
}
SNI = {  # TLS passthrough by SNI (docs/proxy.md): a default pool, and a refusing VIP
    "vips": [
        {
            "name": "pass",
            "address": "2001:db8:0:10::445",
            "ports": [443],
            "mode": "proxy-l4",
            "proxy_protocol": "v2",
            "timeouts": {"connect": 4},
            "health": {"type": "tcp", "interval": 2},
            "backends": [
                {"address": "2001:db8:0:20::a", "port": 8443},
                {"address": "2001:db8:0:20::b", "port": 8443, "weight": 3},
                {"address": "2001:db8:0:20::c", "port": 8443, "drain": True},
            ],
            "sni_routes": [
                {"names": ["shop.example.com"], "backends": ["2001:db8:0:20::a"]},
                {"names": ["*.example.com", "example.org"], "backends": ["2001:db8:0:20::b"]},
            ],
        },
        {
            "name": "strict",
            "address": "2001:db8:0:10::446",
            "ports": [443],
            "mode": "proxy-l4",
            "scheduler": "maglev",
            "health": {"type": "none"},
            "backends": [{"address": "2001:db8:0:20::d", "port": 8443}],
            "sni_routes": [{"names": ["*.example.net"], "backends": ["2001:db8:0:20::d"]}],
            "unknown_sni": "refuse",
        },
    ]
}
CASES = {"haproxy_l4.cfg": L4, "haproxy_l7.cfg": L7, "haproxy_sni.cfg": SNI}
GOLDEN_ONLY = {"haproxy_tls.cfg": TLS}  # haproxy -c needs the certificate files: the lab test


@pytest.mark.parametrize("name", sorted({**CASES, **GOLDEN_ONLY}))
def test_golden(name: str) -> None:
    data = {**CASES, **GOLDEN_ONLY}[name]
    text = render_haproxy(parse_config(data, file=f"{name}.yaml"))
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert text == path.read_text()


def test_forwarded_quotes_ipv6_in_brackets() -> None:
    text = render_haproxy(parse_config(L7, file="x.yaml"))
    assert 'for=\\"[%[src]]:%[src_port]\\";proto=http' in text
    assert "option forwarded" not in text  # HAProxy 2.6 lacks it
    assert "http-request del-header Forwarded unless v6lb_trusted" in text


def test_per_source_limit_is_a_shared_stick_table() -> None:
    text = render_haproxy(parse_config(L4, file="x.yaml"))
    track = "    tcp-request connection track-sc0 src table v6lb_tcp_sources\n"
    reject = "    tcp-request connection reject if { sc_conn_cur(0) gt 20 }\n"
    assert text.count(track + reject) == 2  # both ports' frontends, one table
    assert text.count("stick-table type ipv6 size 100k expire 60s store conn_cur") == 1
    assert "sc_conn_cur" not in render_haproxy(parse_config(L7, file="x.yaml")).split("api")[1]


def test_weights_scale_into_haproxy_range() -> None:
    assert scaled_weights([1000, 10, 0]) == [256, 3, 0]
    assert scaled_weights([1000, 1]) == [256, 1]
    assert scaled_weights([5, 1]) == [5, 1]


@pytest.mark.tool
@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
@pytest.mark.parametrize("name", sorted(CASES))
def test_haproxy_accepts_the_config(name: str) -> None:
    from v6lb.engines.proxy.haproxy_run import check_config

    ok, out = check_config(render_haproxy(parse_config(CASES[name], file=f"{name}.yaml")))
    assert ok, out


def test_pools_carry_ctl_state_into_the_render() -> None:
    """A reload renders the pools (`v6lb ctl`'s overrides applied), not the file's values."""
    from v6lb.model.modes import Kind, modes_where
    from v6lb.model.pools import pools_for

    config = parse_config(L7, file="x.yaml")
    pools = pools_for(config, modes_where(kind=Kind.PROXY))
    pools["web"].set_drain(0, True)
    pools["web"].set_weight(1, 7)
    pools["api"].set_enabled(0, False)
    text = render_haproxy(config, pools=pools)
    assert "    server b0 [2001:db8:0:20::1]:8080 weight 0 check" in text
    assert "    server b1 [2001:db8:0:20::2]:8080 weight 7 check" in text
    assert "    server b0 [2001:db8:0:21::1] weight 1 disabled\n" in text
    assert render_haproxy(config, pools=pools_for(config, modes_where(kind=Kind.PROXY))) == (
        render_haproxy(config)
    )


def test_show_proc_and_responses_by_class() -> None:
    from v6lb.engines.proxy.haproxy_run import parse_show_proc
    from v6lb.engines.proxy.status import _haproxy_vips

    procs = parse_show_proc(
        "#<PID>          <type>          <reloads>       <uptime>        <version>\n"
        "8587            master          2 [failed: 1]   0d00h00m11s     2.6.12\n"
        "# workers\n"
        "8908            worker          0               0d00h00m01s     2.6.12\n"
        "# old workers\n"
        "8592            worker          1               0d00h00m09s     2.6.12\n"
        "# programs\n\n"
    )
    assert (procs.master, procs.failed, procs.workers, procs.old) == (8587, 1, (8908,), (8592,))
    config = parse_config(L7, file="x.yaml")
    rows = [
        {"pxname": "v6lb_web_80", "svname": "FRONTEND", "hrsp_2xx": "5", "hrsp_5xx": "1"},
        {"pxname": "v6lb_web", "svname": "b1", "status": "DRAIN", "hrsp_2xx": "2", "ttime": "12"},
        {"pxname": "v6lb_web", "svname": "BACKEND", "ttime": "9"},
    ]
    web, api = _haproxy_vips([v for v in config.vips], rows)
    assert web["responses"] == {"1xx": 0, "2xx": 5, "3xx": 0, "4xx": 0, "5xx": 1, "other": 0}
    assert web["response_time_avg_s"] == 0.009
    b1 = web["backends"][1]
    assert (b1["health"], b1["enabled"], b1["response_time_avg_s"]) == ("up", True, 0.012)
    assert b1["responses"]["2xx"] == 2
    assert api["responses"]["2xx"] == 0 and "responses" not in api["backends"][0]
