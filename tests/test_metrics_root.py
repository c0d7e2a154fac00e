"""Prometheus itself scrapes `v6lb run` in a namespace; a taken metrics port refuses a start.

* The builtin proxy: one namespace, a proxy-l7 VIP, one http.server backend, the
  instance's ``lb.metrics`` and Debian's prometheus scraping it every second. After N
  curl requests through the VIP, a query over Prometheus's HTTP API returns N.
* The kernel plane: client — LB — backend namespaces, a nat VIP and a dsr-ip6ip6 VIP.
  After N curl requests through the nat VIP, M datagrams to the DSR VIP and one
  connection left open, Prometheus has exactly N + 1 new flows, one active flow (on
  its backend), packets both ways of at least the TCP exchange's count, and M packets
  to the DSR VIP.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

from netns_helpers import batch, client_behind, link, namespaces, nat_lab_file, nsx

VIP = "2001:db8:78::80"
LB = "2001:db8:78::2"
BACKEND = "2001:db8:78::1"
METRICS = f"[{LB}]:9105"
PROM = f"[{LB}]:9190"
N = 7


def _config(instance: str, port: int, sock: Path) -> str:
    return f"""
lb: {{instance: {instance}, control_socket: "{sock}", metrics: "{METRICS}"}}
vips:
  - name: web
    address: "{VIP}"
    ports: [{port}]
    mode: proxy-l7
    health: {{type: none}}
    backends: [{{address: "{BACKEND}", port: 9000}}]
"""


def _ns(name: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", name, *cmd]


def prometheus(ns: str, tmp_path: Path, listen: str) -> subprocess.Popen[str]:
    """Debian's prometheus in ``ns``, on ``tmp_path / "prom.yml"``, its data in tmp_path."""
    return subprocess.Popen(
        _ns(ns, "prometheus", f"--config.file={tmp_path / 'prom.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={listen}"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def curl_n(ns: str, url: str, n: int, lb: subprocess.Popen[str]) -> None:
    """``n`` answered GETs of ``url`` from ``ns``; a failed one (the instance still
    starting) is retried, while ``lb`` runs, for 20 s at most."""
    served = 0
    deadline = time.monotonic() + 20
    while served < n and time.monotonic() < deadline:
        r = subprocess.run(
            _ns(ns, "curl", "-sg", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", url),
            capture_output=True,
            text=True,
        )
        if r.stdout == "200":
            served += 1
        else:
            assert lb.poll() is None, lb.stderr.read() if lb.stderr else ""
            time.sleep(0.2)
    assert served == n, f"{served} of {n} requests answered"


def _query(ns: str, promql: str, prom: str = PROM) -> list[dict[str, object]]:
    url = f"http://{prom}/api/v1/query?query={urllib.parse.quote(promql)}"
    r = subprocess.run(
        _ns(ns, "curl", "-sg", "--max-time", "3", url), capture_output=True, text=True
    )
    if r.returncode != 0 or not r.stdout:
        return []
    answer = json.loads(r.stdout)
    return list(answer.get("data", {}).get("result", []))


@pytest.mark.root
def test_prometheus_scrapes_the_request_count(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "needs root (CI runs as root)"
    assert shutil.which("prometheus"), "Debian's prometheus is needed (make test installs it)"
    ns = f"v6lb-m-{os.getpid()}"
    procs: list[subprocess.Popen[str]] = []
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(_config("mtr", 8080, tmp_path / "a.sock"))
    (tmp_path / "prom.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        f"scrape_configs:\n  - job_name: v6lb\n    static_configs: [{{targets: ['{METRICS}']}}]\n"
    )
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(_ns(ns, "ip", "link", "set", "lo", "up"), check=True)
        for a in (VIP, LB, BACKEND):
            subprocess.run(
                _ns(ns, "ip", "-6", "addr", "add", f"{a}/128", "dev", "lo", "nodad"), check=True
            )
        procs.append(subprocess.Popen(
            _ns(ns, sys.executable, "-m", "http.server", "--bind", BACKEND, "9000"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        ))  # fmt: skip
        lb = subprocess.Popen(
            [sys.executable, "-m", "v6lb.cli", "run", str(cfg), "--netns", ns],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(lb)
        procs.append(prometheus(ns, tmp_path, PROM))

        curl_n(ns, f"http://[{VIP}]:8080/", N, lb)  # retried: the listener comes up

        # a second instance on the same metrics port refuses to start, installing nothing
        other = tmp_path / "other.yaml"
        other.write_text(_config("mtr2", 8081, tmp_path / "b.sock"))
        r = subprocess.run(
            [sys.executable, "-m", "v6lb.cli", "run", str(other), "--netns", ns],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert f"lb.metrics: cannot listen on {METRICS}: Address already in use" in r.stderr
        assert not (tmp_path / "b.sock").exists()
        listening = subprocess.run(_ns(ns, "ss", "-Hltn"), capture_output=True, text=True).stdout
        assert ":8081" not in listening

        want = 'v6lb_proxy_requests_total{vip="web",mode="proxy-l7",job="v6lb"}'
        value = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            result = _query(ns, want)
            if result:
                value = float(result[0]["value"][1])  # type: ignore[index]
                if value == N:
                    break
            time.sleep(0.5)
        assert value == N, f"Prometheus has {value} for {want}"
        up = _query(ns, 'v6lb_backend_up{vip="web"}')
        assert [float(x["value"][1]) for x in up] == [1.0]  # type: ignore[index]
        for query in (
            'v6lb_proxy_responses_total{vip="web",class="2xx"}',
            'v6lb_proxy_request_duration_seconds_count{vip="web"}',
        ):
            got = [float(x["value"][1]) for x in _query(ns, query)]  # type: ignore[index]
            assert got == [float(N)], (query, got)

        lb.send_signal(signal.SIGTERM)
        assert lb.wait(15) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        subprocess.run(["ip", "netns", "del", ns], check=False)


# --- the kernel plane ------------------------------------------------------------------

K_LB = "2001:db8:a::1"
K_CLIENT = "2001:db8:a::2"
K_NAT = "2001:db8:f::80"
K_DSR = "2001:db8:f::90"
K_BACKEND = "2001:db8:b::10"
K_METRICS = f"[{K_LB}]:9105"
K_PROM = f"[{K_LB}]:9190"
M = 9  # datagrams to the DSR VIP

HOLD = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 80))
print("open", flush=True)
time.sleep(60)
"""


def _value(ns: str, promql: str) -> float | None:
    result = _query(ns, promql, K_PROM)
    return float(result[0]["value"][1]) if result else None  # type: ignore[index]


@pytest.mark.root
def test_prometheus_scrapes_the_kernel_plane(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "needs root (CI runs as root)"
    assert shutil.which("prometheus"), "Debian's prometheus is needed (make test installs it)"
    assert shutil.which("conntrack"), "the active flows need conntrack (make test installs it)"
    data = nat_lab_file("mtk", str(tmp_path / "k.sock"), metrics=K_METRICS)
    data["vips"][0]["backends"] = [{"address": K_BACKEND}]
    data["vips"].append(
        {
            "name": "dns",
            "address": K_DSR,
            "ports": [53],
            "protocol": "udp",
            "mode": "dsr-ip6ip6",
            "health": {"type": "none"},
            "backends": [{"address": K_BACKEND}],
        }
    )
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(yaml.safe_dump(data))
    (tmp_path / "prom.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        f"scrape_configs:\n  - job_name: v6lb\n    static_configs: [{{targets: ['{K_METRICS}']}}]\n"
    )
    procs: list[subprocess.Popen[str]] = []
    with namespaces("client", "lb", "backend", tag="mk") as ns:
        c, lbns, b = ns["client"], ns["lb"], ns["backend"]
        try:
            client_behind(c, lbns, "2001:db8:c::/64")
            link(lbns, "l1", b, "b0")
            batch(lbns, "address add 2001:db8:b::1/64 dev l1 nodad")
            batch(
                b, f"address add {K_BACKEND}/64 dev b0 nodad", "route add default via 2001:db8:b::1"
            )
            procs.append(subprocess.Popen(
                _ns(b, sys.executable, "-m", "http.server", "--bind", K_BACKEND, "80"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
            ))  # fmt: skip
            lb = subprocess.Popen(
                [sys.executable, "-m", "v6lb.cli", "run", str(cfg), "--dataplane", "kernel",
                 "--netns", lbns],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            procs.append(lb)
            procs.append(prometheus(lbns, tmp_path, K_PROM))

            curl_n(c, f"http://[{K_NAT}]/", N, lb)  # retried: no flow is made before the rules
            # M datagrams to the DSR VIP (the backend drops them: no decapsulation set up)
            nsx(c, sys.executable, "-c",
                "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
                f"for i in range({M}): s.sendto(b'q', ('{K_DSR}', 53))")  # fmt: skip
            hold = subprocess.Popen(
                _ns(c, sys.executable, "-c", HOLD, K_NAT),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            procs.append(hold)
            assert hold.stdout is not None and hold.stdout.readline() == "open\n"

            want = {
                'v6lb_vip_new_flows_total{vip="web",mode="nat"}': N + 1,
                'v6lb_vip_active_flows{vip="web"}': 1,
                f'v6lb_backend_active_flows{{vip="web",backend="{K_BACKEND}"}}': 1,
                'v6lb_vip_packets_total{vip="dns",mode="dsr-ip6ip6",direction="in"}': M,
                # per backend: where the plane picks it (dsr: the mark; nat: after DNAT)
                f'v6lb_backend_packets_total{{vip="dns",backend="{K_BACKEND}"}}': M,
                f'v6lb_backend_bytes_total{{vip="dns",backend="{K_BACKEND}"}}': M * 49,
            }
            # every curl: SYN, ACK, the request, FIN, the last ACK in; SYN-ACK, the response,
            # FIN out; the held connection: SYN, ACK in, SYN-ACK out
            at_least = {
                'v6lb_vip_packets_total{vip="web",direction="in"}': 5 * N + 2,
                'v6lb_vip_packets_total{vip="web",direction="out"}': 3 * N + 1,
                'v6lb_vip_bytes_total{vip="web",direction="in"}': (5 * N + 2) * 60,
                f'v6lb_backend_packets_total{{vip="web",backend="{K_BACKEND}"}}': 5 * N + 2,
            }
            got: dict[str, float | None] = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                got = {q: _value(lbns, q) for q in [*want, *at_least]}
                if all(got[q] == v for q, v in want.items()) and all(
                    (got[q] or 0) >= v for q, v in at_least.items()
                ):
                    break
                time.sleep(0.5)
            assert all(got[q] == v for q, v in want.items()), got
            assert all((got[q] or 0) >= v for q, v in at_least.items()), got

            lb.send_signal(signal.SIGTERM)
            assert lb.wait(15) == 0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(5)
