"""`v6lb run`, `v6lb status` and `v6lb backend` as a user runs them, in private namespaces.

The root test starts ``v6lb run FILE --netns LB`` as a subprocess for a ``nat``
VIP with three real TCP backends (one process each, answering with their own
address), then checks with real connections from a client namespace:

* every connection reaches :meth:`BackendPool.pick_flow`'s backend;
* ``v6lb status --json`` lists the VIP, three healthy backends, the kernel
  objects and non-zero counters;
* a killed backend is seen down by the probes, new connections avoid it, and
  connections already open to the other backends stay on them;
* SIGHUP with a broken file keeps the running config; SIGTERM exits 0 and
  leaves no table behind.

The bad-input tests run ``v6lb.cli.main`` in-process (root and tools faked
with monkeypatch) or, where a namespace is needed, as a subprocess.
Namespaces are named ``v6lb-r-<pid>-<n>`` and deleted in ``finally``.
Addresses: 2001:db8::/32 and fd00::/8 only.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
import yaml

import netns_helpers
from netns_helpers import (
    NAT_LAB_BACKENDS,
    NAT_LAB_VIP,
    batch,
    client_behind,
    link,
    nat_lab_file,
    nsx,
    sh,
)
from v6lb import cli
from v6lb.engines.control import ControlError, query
from v6lb.model.config import load_config
from v6lb.model.pools import pool_for

V6LB = str(Path(sys.executable).parent / "v6lb")

VIP = NAT_LAB_VIP
BACKENDS = NAT_LAB_BACKENDS
CLIENTS = IPv6Network("2001:db8:c::/64")


def namespaces(*roles: str) -> AbstractContextManager[dict[str, str]]:
    return netns_helpers.namespaces(*roles, tag="r")


# A backend: greets with "ADDR PORT PEER PEERPORT", then answers every line with ADDR.
SERVER = r"""
import selectors, socket, sys
addr = sys.argv[1]
sel = selectors.DefaultSelector()
ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((addr, 80))
ls.listen(1024)
sel.register(ls, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        try:
            if s is ls:
                c, peer = ls.accept()
                c.sendall(f"{addr} 80 {peer[0]} {peer[1]}\n".encode())
                sel.register(c, selectors.EVENT_READ)
            elif s.recv(256):
                s.sendall(f"{addr}\n".encode())
            else:
                sel.unregister(s)
                s.close()
        except OSError:
            if s is not ls:
                sel.unregister(s)
                s.close()
"""

# Short flows: connect, read the greeting, close. Long flows (argv[1] == "hold"): keep them
# open, print the greetings, wait for a line on stdin, then ask each flow again.
CLIENT = r"""
import json, socket, sys
hold = len(sys.argv) > 1 and sys.argv[1] == "hold"
flows = json.loads(sys.stdin.readline())
out, socks = [], []
def line(s):
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            break
        data += chunk
    return data.decode().split()
for src, dst, dport in flows:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(3.0)
    s.bind((src, 0))
    sport = s.getsockname()[1]
    try:
        s.connect((dst, dport))
        out.append([src, sport, dst, dport, line(s), None])
    except OSError as exc:
        out.append([src, sport, dst, dport, None, type(exc).__name__])
    if hold:
        socks.append(s)
    else:
        s.close()
print(json.dumps(out), flush=True)
if hold:
    sys.stdin.readline()
    again = []
    for s in socks:
        try:
            s.sendall(b"again\n")
            again.append(line(s) or None)
        except OSError as exc:
            again.append(type(exc).__name__)
    print(json.dumps(again), flush=True)
"""


def lab_file(tmp: Path, *, instance: str, sock: str, **lb: Any) -> dict[str, Any]:
    health = {"interval": 0.4, "timeout": 0.2, "rise": 1, "fall": 2}
    return nat_lab_file(instance, sock, health=health, **lb)


def write(path: Path, data: object) -> None:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    return netns_helpers.wait_for(what, fn, timeout, (ControlError, AssertionError))


def status(sock: str) -> dict[str, Any]:
    out = sh(V6LB, "status", "--control-socket", sock, "--json")
    result: dict[str, Any] = json.loads(out)
    return result


def connect(client_ns: str, flows: list[tuple[str, str, int]]) -> list[list[Any]]:
    out = nsx(client_ns, sys.executable, "-c", CLIENT, stdin=json.dumps(flows) + "\n")
    result: list[list[Any]] = json.loads(out)
    return result


def flows(rng: random.Random, n: int) -> list[tuple[str, str, int]]:
    return [(str(CLIENTS[rng.getrandbits(64)]), VIP, 80) for _ in range(n)]


def predicted(pool: Any, src: str, sport: int) -> str:
    i = pool.pick_flow(IPv6Address(src).packed, IPv6Address(VIP).packed, sport, 80)
    return str(IPv6Address(pool.addresses[i]))


@pytest.mark.root
def test_run_status_health_reload_and_stop(tmp_path: Path) -> None:
    sock = f"/tmp/v6lb-r-{os.getpid()}.sock"
    instance = f"r{os.getpid() % 100000}"
    path = tmp_path / "lb.yaml"
    write(path, lab_file(tmp_path, instance=instance, sock=sock))
    config = load_config(path)
    pool = pool_for(config.vips[0], config.lb.flow_hash_seed)
    procs: list[subprocess.Popen[str]] = []
    with namespaces("client", "lb", "backend") as ns:
        c, lb, b = ns["client"], ns["lb"], ns["backend"]
        client_behind(c, lb, CLIENTS)
        link(lb, "l1", b, "b0")
        batch(lb, "address add 2001:db8:b::1/64 dev l1 nodad")
        batch(
            b,
            *(f"address add {a}/64 dev b0 nodad" for a in BACKENDS),
            "route add default via 2001:db8:b::1",
        )
        servers = []
        run: subprocess.Popen[str] | None = None
        try:
            for addr in BACKENDS:
                p = subprocess.Popen(
                    ["ip", "netns", "exec", b, sys.executable, "-c", SERVER, addr],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                procs.append(p)
                servers.append(p)
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            run = subprocess.Popen(
                [V6LB, "run", str(path), "--netns", lb],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(run)
            wait_for("the control socket", lambda: query(sock))
            st = status(sock)
            assert st["instance"] == instance and st["netns"] == lb

            # 1. every real connection reaches the core's choice
            results = connect(c, flows(random.Random(5), 60))
            seen: dict[str, int] = {}
            for src, sport, _dst, _dport, reply, error in results:
                assert reply is not None, error
                assert reply[0] == predicted(pool, src, sport), (src, sport, reply)
                assert (reply[2], int(reply[3])) == (src, sport)  # no SNAT: the client itself
                seen[reply[0]] = seen.get(reply[0], 0) + 1
            assert sorted(seen) == sorted(BACKENDS), seen
            print(f"run: 60 of 60 flows on the predicted backend, spread {seen}")

            # 2. status: the VIP, three healthy backends, kernel objects, counters
            st = status(sock)
            (web,) = st["vips"]
            assert (web["name"], web["address"], web["mode"]) == ("web", VIP, "nat")
            assert [x["health"] for x in web["backends"]] == ["up", "up", "up"]
            assert web["counter"]["packets"] >= 60
            k = st["kernel"]
            assert k["nft_tables"] == [f"ip6 v6lb_{instance}"]
            assert any("nat_pre" in ch for ch in k["nft_chains"])
            assert any(m.endswith("v0_web") for m in k["nft_maps"])
            assert k["nft_counters"]["v0_web"]["packets"] >= 60
            text = sh(V6LB, "status", "--control-socket", sock)
            assert "VIP web nat" in text and text.count(" UP ") == 3

            # 3. long-lived flows, then a backend dies
            held = subprocess.Popen(
                ["ip", "netns", "exec", c, sys.executable, "-c", CLIENT, "hold"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(held)
            assert held.stdin is not None and held.stdout is not None
            held.stdin.write(json.dumps(flows(random.Random(6), 30)) + "\n")
            held.stdin.flush()
            before = json.loads(held.stdout.readline())
            assert all(r[4] is not None for r in before), before
            dead = BACKENDS[0]
            updates = query(sock)["map_updates"]
            servers[0].kill()
            servers[0].wait(timeout=10)
            t0 = time.monotonic()
            wait_for(  # down, and the map refilled without it (the refill comes second)
                "the dead backend to be seen down",
                lambda: (
                    (st := query(sock))["vips"][0]["backends"][0]["health"] == "down"
                    and st["map_updates"] > updates
                ),
            )
            print(f"run: backend down after {time.monotonic() - t0:.2f} s (seen by status)")
            print("\n".join(status(sock)["events"]))
            st = status(sock)
            assert [x["health"] for x in st["vips"][0]["backends"]] == ["down", "up", "up"]
            assert st["vips"][0]["backends"][0]["slots"] == 0 and st["map_updates"] >= 1
            pool.set_up(0, False)
            for src, sport, _d, _p, reply, error in connect(c, flows(random.Random(7), 40)):
                assert reply is not None, error
                assert reply[0] != dead and reply[0] == predicted(pool, src, sport)
            held.stdin.write("go\n")
            held.stdin.flush()
            again = json.loads(held.stdout.readline())
            kept = 0
            for first, second in zip(before, again, strict=True):
                if first[4][0] != dead:
                    assert second == [first[4][0]], (first, second)  # same backend as before
                    kept += 1
            assert kept > 0
            held.stdin.close()
            held.wait(timeout=10)
            print(f"run: {kept} open flows to live backends kept their backend")

            # 4. SIGHUP with a broken file: still running, same config
            write(path, "vips: [this is: not: valid\n")
            run.send_signal(signal.SIGHUP)
            wait_for("the reload error", lambda: query(sock)["last_error"])
            st = status(sock)
            assert run.poll() is None and st["reloads"] == 0
            assert "reload failed" in st["last_error"] and len(st["vips"]) == 1
            results = connect(c, flows(random.Random(8), 10))
            assert all(r[4] is not None and r[4][0] != dead for r in results)
            # ...and a good file reloads, keeping the dead backend down
            write(path, lab_file(tmp_path, instance=instance, sock=sock))
            run.send_signal(signal.SIGHUP)
            wait_for("the reload", lambda: query(sock)["reloads"] == 1)
            st = status(sock)
            assert st["last_error"] is None
            assert st["vips"][0]["backends"][0]["health"] == "down"

            # 5. SIGTERM: exit 0, nothing left
            run.send_signal(signal.SIGTERM)
            _, err = run.communicate(timeout=20)
            assert run.returncode == 0, err
            assert "removed nft table ip6 v6lb_" in err
            assert nsx(lb, "nft", "list", "tables").strip() == ""
            assert not os.path.exists(sock)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        p.kill()
            if os.path.exists(sock):
                os.unlink(sock)


# --- bad input ---------------------------------------------------------------------


def good_file(tmp_path: Path, **lb: Any) -> Path:
    path = tmp_path / "lb.yaml"
    data = lab_file(tmp_path, instance="rbad", sock=str(tmp_path / "c.sock"))
    data["lb"].update(lb)
    write(path, data)
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_run_refuses_without_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, err = run_cli(["run", str(good_file(tmp_path))], capsys)
    assert code == 2
    assert "needs root" in err and "sudo v6lb run" in err


def test_run_names_the_missing_tool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code, err = run_cli(["run", str(good_file(tmp_path))], capsys)
    assert code == 2
    assert "`nft` is not installed" in err and "apt-get install nftables" in err


def test_run_python_dataplane_checks_before_installing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The python data plane makes the same checks first: not root -> exit 2, nothing done."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, err = run_cli(["run", str(good_file(tmp_path)), "--dataplane", "python"], capsys)
    assert code == 2 and "root" in err


def test_run_refuses_a_bad_file_and_a_proxy_only_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    bad = tmp_path / "bad.yaml"
    write(bad, "vips: [{name: x}]\n")
    code, err = run_cli(["run", str(bad)], capsys)
    assert code == 2 and "bad.yaml" in err and "v6lb check" in err
    proxy = tmp_path / "proxy.yaml"
    write(
        proxy,
        {
            "vips": [
                {
                    "name": "p",
                    "address": VIP,
                    "ports": [80],
                    "mode": "proxy-l4",
                    "backends": [{"address": BACKENDS[0]}],
                }
            ]
        },
    )
    # A proxy-only file runs the proxy engine, after the same host check: the VIP
    # must be an address of this host.
    code, err = run_cli(["run", str(proxy)], capsys)
    assert code == 2 and "is not assigned to any interface of this host" in err


def test_run_refuses_a_missing_interface_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    path = good_file(tmp_path, interfaces=["v6lbnope0"], addresses=[])
    code, err = run_cli(["run", str(path)], capsys)
    assert code == 2 and "no interface 'v6lbnope0'" in err and "lb.interfaces" in err
    assert not (tmp_path / "c.sock").exists()


@pytest.mark.root
def test_run_checks_the_host_before_installing(tmp_path: Path) -> None:
    with namespaces("lb") as ns:
        lb = ns["lb"]
        for lb_fields, needle in (
            ({"interfaces": ["lo", "nope9"]}, "no interface 'nope9'"),
            ({"interfaces": [], "addresses": ["2001:db8:a::99"]}, "2001:db8:a::99 is not assigned"),
        ):
            path = good_file(tmp_path, **lb_fields)
            r = subprocess.run(
                [V6LB, "run", str(path), "--netns", lb],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 2, r.stderr
            assert needle in r.stderr
            assert nsx(lb, "nft", "list", "tables").strip() == ""
            assert not (tmp_path / "c.sock").exists()
        # a fresh namespace does not route IPv6: a nat file is refused before anything is
        # installed, with the fix for that namespace (every request timed out before)
        path = good_file(tmp_path, interfaces=[], addresses=[])
        r = subprocess.run(
            [V6LB, "run", str(path), "--netns", lb], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 2, r.stderr
        assert f"IPv6 forwarding is off in network namespace {lb}: nat, npt and the" in r.stderr
        assert f"fix: ip netns exec {lb} sysctl -w net.ipv6.conf.all.forwarding=1" in r.stderr
        assert nsx(lb, "nft", "list", "tables").strip() == ""
        assert not (tmp_path / "c.sock").exists()
        r = subprocess.run(
            [V6LB, "run", str(path), "--netns", "v6lb-r-nonexistent"],
            text=True,
            capture_output=True,
            timeout=60,
        )
        assert r.returncode == 2 and "no network namespace named" in r.stderr


@pytest.mark.root
def test_backend_setup_and_remove(tmp_path: Path) -> None:
    data = {
        "lb": {"instance": "rbe", "addresses": ["2001:db8:1::1"]},
        "vips": [
            {
                "name": "srv6",
                "address": "2001:db8:f::92",
                "ports": [443],
                "mode": "dsr-srv6",
                "tunnel_source": "2001:db8:1::1",
                "backends": [{"address": "2001:db8:1::20", "sid": "fd00:50::1:100"}],
            }
        ],
    }
    path = tmp_path / "be.yaml"
    write(path, data)
    with namespaces("be", "peer") as ns:
        be = ns["be"]
        link(be, "e0", ns["peer"], "p0")
        batch(
            be, "address add 2001:db8:1::20/64 dev e0 nodad", "route add default via 2001:db8:1::1"
        )
        out = sh(
            V6LB, "backend", str(path), "--address", "2001:db8:1::20", "--dev", "e0", "--netns", be
        )
        assert "installed: VIP 2001:db8:f::92/128 on lo" in out
        assert "2001:db8:f::92/128" in nsx(be, "ip", "-6", "address", "show", "dev", "lo")
        routes = nsx(be, "ip", "-6", "route", "show", "table", "all", "proto", "0x76")
        assert "fd00:50::1:100" in routes and "End.DT6" in routes and "advmss 1376" in routes
        assert "table ip6 v6lb_rbe" in nsx(be, "nft", "list", "tables")
        out = sh(
            V6LB, "backend", str(path), "--address", "2001:db8:1::20", "--netns", be, "--remove"
        )
        assert "removed:" in out
        assert nsx(be, "nft", "list", "tables").strip() == ""
        assert "2001:db8:f::92" not in nsx(be, "ip", "-6", "address", "show", "dev", "lo")
        assert nsx(be, "ip", "-6", "route", "show", "table", "all", "proto", "0x76").strip() == ""
