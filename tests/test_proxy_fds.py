"""The builtin proxy at its descriptor limit: refusals are counted, status answers, it recovers.

`v6lb run` runs in a private namespace with ``RLIMIT_NOFILE`` soft = hard = 256
and the default ``max_connections`` (10,000, far over what 256 descriptors
hold). A client opens 200 connections to a proxy-l4 VIP whose backend echoes:
the proxy must hold exactly the connections its budget allows
(``fds.connection_cap`` in status), refuse every other one at once and count
it (``over_fd_limit``), keep answering ``status``, never meet EMFILE, and
serve new clients at once after the held ones close. A second test starts it
with soft 256 / hard 4096 and reads /proc/PID/limits: it runs with 4096.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import netns_helpers
from netns_helpers import nsx
from v6lb.engines.control import ControlError, query

V6LB = str(Path(sys.executable).parent / "v6lb")
VIP = "2001:db8:77::80"
BACKEND = "2001:db8:77::1"

# Echoes every byte; holds any number of connections.
ECHO = textwrap.dedent(
    f"""
    import selectors, socket
    ls = socket.socket(socket.AF_INET6)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("{BACKEND}", 9000)); ls.listen(1024); ls.setblocking(False)
    sel = selectors.DefaultSelector(); sel.register(ls, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.fileobj is ls:
                c, _ = ls.accept(); sel.register(c, selectors.EVENT_READ)
            else:
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b""
                if data:
                    key.fileobj.send(data)
                else:
                    sel.unregister(key.fileobj); key.fileobj.close()
    """
)

# Open N connections and hold those that echo; after a line on stdin, close them and
# open 20 new ones after another line. Prints [held, refused], "closed", and the count of
# new ones that echoed.
CLIENT = textwrap.dedent(
    f"""
    import json, socket, sys
    def one():
        s = socket.socket(socket.AF_INET6); s.settimeout(2)
        try:
            s.connect(("{VIP}", 8080)); s.sendall(b"hi")
            if s.recv(2) == b"hi":
                return s
        except OSError:
            pass
        s.close()
    held = []
    refused = 0
    for _ in range(int(sys.argv[1])):
        s = one()
        if s is None:
            refused += 1
        else:
            held.append(s)
    print(json.dumps([len(held), refused]), flush=True)
    sys.stdin.readline()
    for s in held:
        s.close()
    print("closed", flush=True)
    sys.stdin.readline()
    ok = 0
    for _ in range(20):
        s = one()
        if s is not None:
            ok += 1; s.close()
    print(ok, flush=True)
    """
)


def config(sock: str) -> str:
    return textwrap.dedent(
        f"""
        lb: {{instance: fd{os.getpid() % 10000}, control_socket: {sock}}}
        vips:
          - name: tcp
            address: "{VIP}"
            ports: [8080]
            mode: proxy-l4
            health: {{type: none}}
            backends: [{{address: "{BACKEND}", port: 9000}}]
        """
    )


def _limit(soft: int, hard: int) -> Callable[[], None]:
    def set_it() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return set_it


@contextmanager
def proxy(tmp_path: Path, soft: int, hard: int, log: list[str]) -> Iterator[tuple[str, str, Any]]:
    """A namespace with the echo backend and `v6lb run` under the given limits; its stderr
    goes to ``log`` when it has stopped."""
    sock = str(tmp_path / "c.sock")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(config(sock))
    procs: list[subprocess.Popen[str]] = []
    with netns_helpers.namespaces("px", tag="fd") as names:
        ns = names["px"]
        for a in (VIP, BACKEND):
            nsx(ns, "ip", "-6", "address", "add", f"{a}/128", "dev", "lo", "nodad")
        try:
            echo = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", ECHO],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(echo)
            assert echo.stdout is not None and echo.stdout.readline() == "ready\n"
            run = subprocess.Popen(
                ["ip", "netns", "exec", ns, V6LB, "run", str(cfg)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=_limit(soft, hard),
            )
            procs.append(run)
            netns_helpers.wait_for(
                "the proxy",
                lambda: query(sock)["proxy"]["state"] == "running" or None,
                15,
                (ControlError, OSError, KeyError),
            )
            yield ns, sock, run
            run.send_signal(signal.SIGTERM)
            assert run.wait(20) == 0
            _, err = run.communicate()
            assert "Traceback" not in err, err
            log.append(err)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)


@pytest.mark.root
def test_over_the_fd_budget_is_refused_counted_and_recovers(tmp_path: Path) -> None:
    log: list[str] = []
    with proxy(tmp_path, 256, 256, log) as (ns, sock, run):
        fds = query(sock)["proxy"]["fds"]
        assert fds["limit"] == 256 and fds["wanted"] == 10_000
        cap = fds["connection_cap"]
        assert 20 <= cap < 128, fds  # two descriptors per connection, and a reserve
        client = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, "200"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert client.stdout is not None and client.stdin is not None
            held, refused = json.loads(client.stdout.readline())
            assert (held, refused) == (cap, 200 - cap)
            st = query(sock, timeout=2.0)  # the control socket still answers
            (vip,) = st["proxy"]["vips"]
            assert vip["connections"] == 200 and vip["active"] == cap
            assert vip["errors"] == {"over_fd_limit": 200 - cap}
            fds = st["proxy"]["fds"]
            assert fds["connections_open"] == cap and fds["accept_errors"] == 0
            assert fds["open"] < 256 - 32, fds  # never near EMFILE
            client.stdin.write("\n")
            client.stdin.flush()
            assert client.stdout.readline() == "closed\n"
            t = time.monotonic()
            netns_helpers.wait_for(
                "the closes to reach the proxy",
                lambda: query(sock)["proxy"]["fds"]["connections_open"] == 0 or None,
                1.0,
                (ControlError,),
            )
            print(f"{cap} held, {200 - cap} refused; all closed in {time.monotonic() - t:.3f} s")
            client.stdin.write("\n")
            client.stdin.flush()
            assert client.stdout.readline() == "20\n"  # new clients succeed at once
            client.wait(10)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        st = query(sock)
        assert st["proxy"]["vips"][0]["errors"] == {"over_fd_limit": 200 - cap}
        assert st["proxy"]["vips"][0]["connections"] == 220
    (err,) = log
    assert "descriptor limit" not in err  # soft = hard: nothing to raise
    assert "file descriptors: the soft limit is 256" in err
    assert f"leave room for {cap} proxied connections" in err
    assert "not the 10000 that max_connections allows" in err
    assert "Fix: raise the limit (LimitNOFILE= in the systemd unit, ulimit -n)" in err


@pytest.mark.root
def test_run_raises_the_soft_fd_limit_to_the_hard_one(tmp_path: Path) -> None:
    log: list[str] = []
    with proxy(tmp_path, 256, 4096, log) as (_ns, sock, run):
        limits = Path(f"/proc/{run.pid}/limits").read_text()
        (line,) = [x for x in limits.splitlines() if x.startswith("Max open files")]
        assert line.split()[3:5] == ["4096", "4096"], line
        assert query(sock)["proxy"]["fds"]["limit"] == 4096
    (err,) = log
    assert "v6lb run: descriptor limit (RLIMIT_NOFILE) raised from 256 to 4096" in err
