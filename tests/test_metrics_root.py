"""Prometheus itself scrapes `v6lb run` in a namespace; a taken metrics port refuses a start.

One namespace: a proxy-l7 VIP of the builtin proxy, one http.server backend, the
instance's ``lb.metrics`` and Debian's prometheus scraping it every second. After N
curl requests through the VIP, a query over Prometheus's HTTP API returns N.
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


def _query(ns: str, promql: str) -> list[dict[str, object]]:
    url = f"http://{PROM}/api/v1/query?query={urllib.parse.quote(promql)}"
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
        procs.append(subprocess.Popen(
            _ns(ns, "prometheus", f"--config.file={tmp_path / 'prom.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={PROM}"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        ))  # fmt: skip

        served = 0
        deadline = time.monotonic() + 20
        while served < N and time.monotonic() < deadline:
            r = subprocess.run(
                _ns(ns, "curl", "-sg", "-o", "/dev/null", "-w", "%{http_code}",
                    "--max-time", "3", f"http://[{VIP}]:8080/"),
                capture_output=True, text=True,
            )  # fmt: skip
            if r.stdout == "200":
                served += 1
            else:
                time.sleep(0.2)  # the proxy's listener is not up yet
        assert served == N, f"{served} of {N} requests answered"

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
