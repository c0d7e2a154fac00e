"""`v6lb status` for the proxy VIPs: the control socket of `v6lb run` with proxy VIPs.

* No root: the daemon of `v6lb run` with the builtin proxy plane (what ``run``
  runs for a proxy-only file) serves proxy-l4 and proxy-l7 VIPs on [::1] in a thread
  of this process, with a real HTTP backend on [::1]; `v6lb status` runs as a
  subprocess and must count exactly the connections and requests made. (The
  config validator refuses ::1 as a VIP address, so a file cannot name it;
  the VIPs are built in-process as in tests/test_proxy_*.py.)
* Root: `v6lb run FILE --netns LB` as a subprocess, with a proxy-only file and
  with a file mixing a ``nat`` VIP (kernel) and proxy VIPs: ONE socket answers
  for both.
* HAProxy (when installed, root): the stats socket feeds `v6lb status`; the
  temp directory left by a SIGKILLed run is removed by the next run.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

import netns_helpers
from netns_helpers import namespaces, nsx
from test_proxy_fixtures import l4_vip, l7_vip
from v6lb import cli
from v6lb.engines.control import ControlError, query
from v6lb.engines.daemon import Daemon
from v6lb.engines.metrics import metric_families
from v6lb.engines.proxy.haproxy_run import OWNER, PREFIX, reap_stale_dirs
from v6lb.engines.proxy.run import BuiltinProxyPlane
from v6lb.engines.proxy.status import parse_haproxy_stat
from v6lb.model.config import Config, LbSettings
from v6lb.model.status import InstanceStatus

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"hello from the backend\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


@pytest.fixture
def backend() -> Iterator[int]:
    """A real HTTP/1.1 backend on [::1]; its port."""
    srv = _V6Server(("::1", 0), _Hello)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield int(srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()


def status(sock: str, *, as_json: bool = True) -> Any:
    """`v6lb status` as a user runs it (a subprocess)."""
    argv = [sys.executable, "-m", "v6lb.cli", "status", "--control-socket", sock]
    r = subprocess.run(
        argv + (["--json"] if as_json else []),
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout) if as_json else r.stdout


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 20.0) -> Any:
    return netns_helpers.wait_for(what, fn, timeout, (ControlError, AssertionError, KeyError))


def get(host: str, port: int, n: int = 1) -> list[bytes]:
    """``n`` GETs on one connection (keep-alive); the bodies."""
    c = http.client.HTTPConnection(host, port, timeout=10)
    try:
        out = []
        for _ in range(n):
            c.request("GET", "/")
            r = c.getresponse()
            out.append(r.read())
            assert r.status == 200, (r.status, out[-1])
        return out
    finally:
        c.close()


def by_name(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in st["proxy"]["vips"]}


def quiet(sock: str, names: tuple[str, ...]) -> Callable[[], dict[str, Any]]:
    """A status in which no connection of these VIPs is still open (closes are async)."""

    def check() -> dict[str, Any]:
        st = status(sock)
        vips = by_name(st)
        assert all(vips[n]["active"] == 0 for n in names), {n: vips[n]["active"] for n in names}
        return st

    return check


# --- no root: builtin engine, proxy-only --------------------------------------------------


def proxy_daemon(config: Config) -> Daemon:
    """The instance `v6lb run` makes of a proxy-only file, in this process (no host check)."""
    daemon = Daemon(config, [], path=config.source)
    daemon.attach([BuiltinProxyPlane(config, daemon.context())])
    return daemon


def test_status_of_a_proxy_only_run_counts_what_was_done(tmp_path: Path, backend: int) -> None:
    sock = str(tmp_path / "ctl.sock")
    closed = socket.socket(socket.AF_INET6)
    closed.bind(("::1", 0))  # bound, never listening: connections to it are refused
    dead_port = closed.getsockname()[1]
    try:
        dead = l7_vip([dead_port], name="dead")
        config = Config(
            source=str(tmp_path / "p.yaml"),
            vips=(l4_vip([backend], name="tcp", pp=False), l7_vip([backend], name="web"), dead),
            lb=LbSettings(instance="pst", control_socket=sock),
        )
        daemon = proxy_daemon(config)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                daemon.run(signals=False)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        try:
            st = wait_for("the proxy engine", lambda: status(sock)["proxy"]["state"] == "running")
            st = status(sock)
            assert st["instance"] == "pst" and st["dataplane"] is None
            vips = by_name(st)
            assert set(vips) == {"tcp", "web", "dead"}
            port = {n: v["ports"][0] for n, v in vips.items()}
            assert all(p > 0 for p in port.values()), port  # the bound ports, not 0

            # 3 connections through proxy-l4; 2 connections with 5 requests through proxy-l7
            for _ in range(3):
                assert get("::1", port["tcp"]) == [b"hello from the backend\n"]
            assert len(get("::1", port["web"], 3) + get("::1", port["web"], 2)) == 5
            c = http.client.HTTPConnection("::1", port["dead"], timeout=10)
            c.request("GET", "/")
            assert c.getresponse().status == 502
            c.close()

            st = wait_for("the connections to close", quiet(sock, ("tcp", "web", "dead")))
            vips = by_name(st)
            tcp, web, dead_st = vips["tcp"], vips["web"], vips["dead"]
            assert (tcp["mode"], tcp["scheduler"]) == ("proxy-l4", "round-robin")
            assert tcp["connections"] == 3 and tcp["errors"] == {}
            assert web["mode"] == "proxy-l7"
            assert (web["connections"], web["requests"]) == (2, 5)
            assert dead_st["errors"] == {"connect_failed": 1}
            (b,) = web["backends"]
            assert (b["address"], b["port"], b["health"], b["weight"], b["drain"]) == (
                "::1",
                backend,
                "up",
                1,
                False,
            )
            assert (b["requests"], b["active"]) == (5, 0)
            assert 1 <= b["connections"] <= 2  # upstream connections; idle ones are reused
            (tb,) = tcp["backends"]
            assert tb["connections"] == 3 and tb["bytes_out"] > 0
            assert "responses" not in tcp and "latency" not in tcp  # HTTP's only
            # responses by class (the proxy's own 502 too), and the request durations
            assert web["responses"] == {
                "1xx": 0,
                "2xx": 5,
                "3xx": 0,
                "4xx": 0,
                "5xx": 0,
                "other": 0,
            }
            assert b["responses"]["2xx"] == 5 and b["enabled"] is True
            assert dead_st["responses"]["5xx"] == 1
            assert dead_st["backends"][0]["responses"]["5xx"] == 0  # no backend answered
            lat = web["latency"]
            assert lat["count"] == 5 and lat["buckets"][-1] == ["+Inf", 5] and lat["sum"] > 0
            assert [le for le, _ in lat["buckets"][:3]] == [0.001, 0.0025, 0.005]
            counts = [n for _, n in lat["buckets"]]
            assert counts == sorted(counts)  # cumulative
            model = InstanceStatus.from_dict(st)
            assert model.to_dict() == st
            samples = {
                (x.name, tuple(sorted(x.labels.items()))): x.value
                for fam in metric_families(model)
                for x in fam.samples
            }
            wl = (("mode", "proxy-l7"), ("vip", "web"))
            assert samples[("v6lb_proxy_responses_total", (("class", "2xx"), *wl))] == 5
            dl = (("class", "5xx"), ("mode", "proxy-l7"), ("vip", "dead"))
            assert samples[("v6lb_proxy_responses_total", dl)] == 1
            bl = (("backend", f"[::1]:{backend}"), ("class", "2xx"), *wl)
            assert samples[("v6lb_proxy_backend_responses_total", bl)] == 5
            assert samples[("v6lb_proxy_request_duration_seconds_count", wl)] == 5
            assert (
                samples[("v6lb_proxy_request_duration_seconds_bucket", (("le", "+Inf"), *wl))] == 5
            )

            text = status(sock, as_json=False)
            print(text)
            assert "proxy engine builtin" in text
            assert f"VIP web proxy-l7 [::1]:{port['web']}/tcp  scheduler round-robin" in text
            assert "connections 2 (active 0), requests 5" in text
            assert "refused/errors: connect_failed 1" in text
            assert "  responses: 2xx 5\n" in text and "  responses: 5xx 1\n" in text
            assert f"[::1]:{backend} weight 1  UP" in text
            assert "kernel objects" not in text
        finally:
            daemon.request_stop()
            t.join(20)
        assert not t.is_alive() and errors == []
        assert not os.path.exists(sock)  # the socket goes with the instance
    finally:
        closed.close()


def test_the_socket_of_a_live_instance_is_not_taken_over(tmp_path: Path) -> None:
    sock = str(tmp_path / "ctl.sock")
    other = socket.socket(socket.AF_UNIX)
    other.bind(sock)
    other.listen(1)
    try:
        config = Config(
            source="p.yaml", vips=(l4_vip([9], pp=False),), lb=LbSettings(control_socket=sock)
        )
        with pytest.raises(ControlError, match="another instance already answers"):
            proxy_daemon(config).install()
    finally:
        other.close()


def test_status_without_a_listener_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "none.sock")
    assert cli.main(["status", "--control-socket", missing]) == 1
    assert "no control socket at" in capsys.readouterr().err
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))  # the file of a socket nobody listens on (a crashed instance)
    s.close()
    assert cli.main(["status", "--control-socket", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "nothing answers on" in err and "stale socket" in err


# --- HAProxy: stats parsing and the temp directory --------------------------------------

STAT = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,"
    "wretr,wredis,status,weight,act,bck,chkfail,req_tot,\n"
    "v6lb_web_80,FRONTEND,,,1,2,4096,7,700,900,0,0,1,,,,,OPEN,,,,,9,\n"
    "v6lb_web,b0,0,0,1,2,,7,700,900,,0,,0,0,0,0,UP,1,1,0,0,,\n"
    "v6lb_web,b1,0,0,0,0,,0,0,0,,0,,3,0,0,0,DOWN 1/2,1,1,0,4,,\n"
    "v6lb_web,BACKEND,0,0,1,2,410,7,700,900,0,0,,3,0,0,0,UP,1,1,0,,,\n"
)


def test_haproxy_stat_csv_is_parsed_by_header() -> None:
    rows = parse_haproxy_stat(STAT)
    assert [(r["pxname"], r["svname"]) for r in rows][:2] == [
        ("v6lb_web_80", "FRONTEND"),
        ("v6lb_web", "b0"),
    ]
    assert rows[2]["status"] == "DOWN 1/2" and rows[2]["chkfail"] == "4"


def _owned_dir(base: Path, pids: list[int] | None, age: float = 0.0) -> Path:
    d = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))
    (d / "haproxy.cfg").write_text("global\n")
    if pids is not None:
        (d / OWNER).write_text(" ".join(map(str, pids)) + "\n")
    if age:
        t = time.time() - age
        os.utime(d, (t, t))
    return d


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # reaped: gone (reuse within the test is very unlikely, and only keeps a dir)


def test_stale_haproxy_dirs_are_reaped_and_live_ones_kept(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _owned_dir(tmp_path, [_dead_pid(), _dead_pid()])
        alive = _owned_dir(tmp_path, [_dead_pid(), live.pid])  # haproxy still running
        fresh = _owned_dir(tmp_path, None)  # being set up: no owner file yet
        old = _owned_dir(tmp_path, None, age=3600)  # a killed `haproxy -c` check's
        named = _owned_dir(tmp_path, [_dead_pid()])
        user = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)", f"{named}/haproxy.cfg"]
        )
        # until it has exec'd, /proc shows the forked pytest's command line, not the path
        cmdline = Path(f"/proc/{user.pid}/cmdline")
        deadline = time.monotonic() + 10
        while str(named).encode() not in cmdline.read_bytes():
            assert time.monotonic() < deadline, "the process naming the dir did not start"
            time.sleep(0.01)
        other = tmp_path / "not-v6lb-haproxy-x"
        other.mkdir()
        link = tmp_path / (PREFIX + "link")
        link.symlink_to(other)
        try:
            removed = reap_stale_dirs(str(tmp_path))
        finally:
            user.kill()
            user.wait()
        assert sorted(removed) == sorted([dead, old])
        assert alive.is_dir() and fresh.is_dir() and named.is_dir() and other.is_dir()
        assert link.is_symlink()
        assert reap_stale_dirs(str(tmp_path)) == [named]  # its user is gone now
    finally:
        live.kill()
        live.wait()


# --- root: `v6lb run` as a subprocess, proxy-only and mixed with a kernel VIP --------------

VIP = "2001:db8:77::80"
BACKEND = "2001:db8:77::1"
NAT_VIP = "2001:db8:f::80"

BACKEND_PROG = textwrap.dedent(
    """
    import http.server, socket, sys
    class S(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6
        daemon_threads = True
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            body = b"hello from the backend\\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    s = S((sys.argv[1], int(sys.argv[2])), H)
    print("ready", flush=True)
    s.serve_forever()
    """
)

CLIENT_PROG = textwrap.dedent(
    """
    import http.client, sys
    host, port, conns, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    for _ in range(conns):
        c = http.client.HTTPConnection(host, port, timeout=10)
        for _ in range(per):
            c.request("GET", "/")
            r = c.getresponse()
            assert r.status == 200 and r.read() == b"hello from the backend\\n", r.status
        c.close()
    print("ok", flush=True)
    """
)


def _proxy_vips() -> list[dict[str, Any]]:
    common = {"address": VIP, "health": {"type": "tcp", "interval": 0.5, "timeout": 0.25}}
    return [
        {
            **common,
            "name": "tcp",
            "ports": [8080],
            "mode": "proxy-l4",
            "backends": [{"address": BACKEND, "port": 9000}],
        },
        {
            **common,
            "name": "web",
            "ports": [8081],
            "mode": "proxy-l7",
            "scheduler": "least-connections",
            "backends": [{"address": BACKEND, "port": 9000, "weight": 5}],
        },
    ]


def _run_and_check(
    tmp_path: Path, data: dict[str, Any], extra: list[str], check: Callable[[dict[str, Any]], None]
) -> str:
    sock = data["lb"]["control_socket"]
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(yaml.safe_dump(data))
    procs: list[subprocess.Popen[str]] = []
    with namespaces("lb", "nat", tag="ps") as ns:
        lb = ns["lb"]
        nsx(lb, "ip", "-6", "address", "add", f"{VIP}/128", "dev", "lo")
        nsx(lb, "ip", "-6", "address", "add", f"{BACKEND}/128", "dev", "lo")
        if "mixed" in data["lb"]["instance"]:
            from netns_helpers import batch, link

            link(lb, "l0", ns["nat"], "n0")
            batch(lb, "address add 2001:db8:a::1/64 dev l0 nodad")
            batch(ns["nat"], "address add 2001:db8:a::10/64 dev n0 nodad")
            nsx(lb, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")  # the nat VIP is routed
        try:
            be = subprocess.Popen(
                ["ip", "netns", "exec", lb, sys.executable, "-c", BACKEND_PROG, BACKEND, "9000"],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(be)
            assert be.stdout is not None and be.stdout.readline().strip() == "ready"
            run = subprocess.Popen(
                [sys.executable, "-m", "v6lb.cli", "run", str(cfg), "--netns", lb, *extra],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=ENV,
            )
            procs.append(run)
            wait_for("the control socket", lambda: query(sock))

            def healthy() -> bool:
                vips = by_name(status(sock))
                return all(b["health"] == "up" for v in vips.values() for b in v["backends"])

            wait_for("healthy backends", healthy)
            for port, conns, per in ((8080, 3, 1), (8081, 2, 3)):
                out = nsx(
                    lb, sys.executable, "-c", CLIENT_PROG, VIP, str(port), str(conns), str(per)
                )
                assert out.strip() == "ok"
            st = wait_for("the connections to close", quiet(sock, ("tcp", "web")))
            vips = by_name(st)
            assert vips["tcp"]["connections"] == 3
            assert (vips["web"]["connections"], vips["web"]["requests"]) == (2, 6)
            check(st)
            text = status(sock, as_json=False)
            print(text)
            run.send_signal(signal.SIGTERM)
            out, err = run.communicate(timeout=30)
            assert run.returncode == 0, err
            assert not os.path.exists(sock)
            return text
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)  # only left behind when the run was killed


@pytest.mark.root
def test_run_proxy_only_file_serves_status(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "needs root (CI runs as root)"
    sock = f"/tmp/v6lb-ps-{os.getpid()}.sock"
    data = {"lb": {"instance": "pso", "control_socket": sock}, "vips": _proxy_vips()}

    def check(st: dict[str, Any]) -> None:
        assert st["dataplane"] is None and st["proxy"]["engine"] == "builtin"
        (b,) = by_name(st)["web"]["backends"]
        assert (b["weight"], b["requests"]) == (5, 6)

    text = _run_and_check(tmp_path, data, ["--proxy", "builtin"], check)
    assert f"VIP tcp proxy-l4 [{VIP}]:8080/tcp" in text
    assert "connections 3 (active 0)" in text


@pytest.mark.root
def test_run_mixed_file_answers_for_kernel_and_proxy_vips_on_one_socket(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "needs root (CI runs as root)"
    sock = f"/tmp/v6lb-ps-{os.getpid()}.sock"
    data = {
        "lb": {
            "instance": f"mixed{os.getpid() % 1000}",
            "control_socket": sock,
            "interfaces": ["l0"],
            "addresses": ["2001:db8:a::1"],
        },
        "vips": [
            *_proxy_vips(),
            {
                "name": "nat",
                "address": NAT_VIP,
                "ports": [80],
                "mode": "nat",
                "health": {"type": "none"},
                "backends": [{"address": "2001:db8:a::10"}],
            },
        ],
    }

    def check(st: dict[str, Any]) -> None:
        assert st["dataplane"] == "kernel"
        assert [v["name"] for v in st["vips"]] == ["nat"]  # the kernel's
        assert set(by_name(st)) == {"tcp", "web"}  # the proxy engine's, same answer
        assert st["kernel"]["nft_tables"]

    text = _run_and_check(tmp_path, data, [], check)
    assert "kernel data plane, proxy engine builtin" in text
    assert "VIP nat nat" in text and "VIP web proxy-l7" in text
    assert "skipped: web" not in text  # the kernel skips it, the proxy engine serves it


@pytest.mark.root
@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_run_haproxy_status_and_no_leftovers_after_sigkill(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "needs root (CI runs as root)"
    sock = f"/tmp/v6lb-ps-{os.getpid()}.sock"
    data = {"lb": {"instance": "psh", "control_socket": sock}, "vips": _proxy_vips()}
    before = set(Path(tempfile.gettempdir()).glob(PREFIX + "*"))

    def check(st: dict[str, Any]) -> None:
        assert st["proxy"]["engine"] == "haproxy" and st["proxy"]["haproxy_pid"] > 0
        web = by_name(st)["web"]
        assert web["counters_from"] == "haproxy" and web["requests"] == 6
        (b,) = web["backends"]
        assert b["health"] == "up" and b["haproxy_status"].startswith("UP")

    text = _run_and_check(tmp_path, data, ["--proxy", "haproxy"], check)
    assert "(HAProxy's counters)" in text
    assert set(Path(tempfile.gettempdir()).glob(PREFIX + "*")) <= before  # SIGTERM: removed

    # SIGKILL: haproxy outlives v6lb (orphaned), so its directory is kept; once haproxy
    # is gone too, the next run removes the directory.
    cfg = tmp_path / "lb.yaml"
    with namespaces("lb", tag="ph") as ns:
        nsx(ns["lb"], "ip", "-6", "address", "add", f"{VIP}/128", "dev", "lo")
        argv = [sys.executable, "-m", "v6lb.cli", "run", str(cfg), "--netns", ns["lb"]]
        run = subprocess.Popen([*argv, "--proxy", "haproxy"], env=ENV, stderr=subprocess.PIPE)
        haproxy = 0
        try:
            wait_for("haproxy", lambda: query(sock)["proxy"]["state"] == "running")
            left = set(Path(tempfile.gettempdir()).glob(PREFIX + "*")) - before
            assert len(left) == 1
            (d,) = left
            v6lb_pid, haproxy = (int(p) for p in (d / OWNER).read_text().split())
            assert v6lb_pid == run.pid
            run.kill()
            run.wait()
            assert not _gone(haproxy)
            assert d not in reap_stale_dirs() and d.is_dir()  # its haproxy still runs
            os.kill(haproxy, signal.SIGTERM)
            wait_for("haproxy to stop", lambda: _gone(haproxy))
            assert d in reap_stale_dirs()  # what the next `v6lb run --proxy haproxy` does first
            assert not d.exists()
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
            if haproxy and not _gone(haproxy):
                os.kill(haproxy, signal.SIGKILL)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)  # left by the SIGKILL


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # dead, not yet reaped by its new parent
