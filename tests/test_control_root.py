"""Bad control-socket input against a real `v6lb run --dataplane python`: forwarding goes on.

The python plane answers its control socket in the loop that forwards packets,
so this is where a control-plane failure would touch forwarding. One LB
namespace runs the file of tests/test_dataplane_python.py (a nat VIP and an npt
pair); UDP echoes go from the inside host through NPT to the outside before,
during and after the attacks: 2 KB of ``[``, 10 MB of junk, random bytes, and
20 silent clients held open while ``status`` is asked (answered within 1 s).
The plane's own ``npt`` counter must grow by two per echo (before this fix the
plane exited on the deep JSON; the kernel then routed the echoes untranslated),
the instance must still be alive, and SIGTERM must still clean up (exit 0).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from netns_helpers import batch, link, nsx
from test_dataplane_python import (
    INSIDE_HOST,
    OUTSIDE_HOST,
    SENDER,
    SINK,
    V6LB,
    lab_file,
    namespaces,
    wait_for,
)
from v6lb.engines.control import query


def echo(ns: str, sock: str, n: int = 3) -> list[list[str]]:
    """``n`` UDP echoes through NPT; each must pass through the python plane both ways."""
    before = query(sock)["engine"]["npt"]["counters"]["forwarded"]
    out = nsx(ns, sys.executable, "-c", SENDER, INSIDE_HOST, OUTSIDE_HOST, "echo", str(n))
    answers: list[list[str]] = json.loads(out)
    assert query(sock)["engine"]["npt"]["counters"]["forwarded"] - before == 2 * n
    return answers


def send(path: str, payload: bytes) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3.0)
    s.connect(path)
    out = b""
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    s.close()
    return out


@pytest.mark.root
def test_python_plane_survives_control_attacks(tmp_path: Path) -> None:
    sock = f"/tmp/v6lb-cr-{os.getpid()}.sock"
    instance = f"cr{os.getpid() % 100000}"
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(lab_file(instance, sock)))
    with namespaces("client", "lb", "backend") as ns:
        c, lb, b = ns["client"], ns["lb"], ns["backend"]
        link(c, "c0", lb, "l0")
        link(lb, "l1", b, "b0")
        nsx(lb, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        batch(
            c, f"address add {OUTSIDE_HOST}/64 dev c0 nodad", "route add default via 2001:db8:a::1"
        )
        batch(
            lb,
            "address add 2001:db8:a::1/64 dev l0 nodad",
            "address add 2001:db8:b::1/64 dev l1 nodad",
            "address add fd00:b::1/64 dev l1 nodad",
        )
        batch(b, f"address add {INSIDE_HOST}/64 dev b0 nodad", "route add default via fd00:b::1")
        procs: list[subprocess.Popen[str]] = []
        try:
            sink = subprocess.Popen(
                ["ip", "netns", "exec", c, sys.executable, "-c", SINK, OUTSIDE_HOST],
                stdout=subprocess.DEVNULL,
                text=True,
            )
            procs.append(sink)
            run = subprocess.Popen(
                [V6LB, "run", str(path), "--dataplane", "python", "--netns", lb],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(run)
            wait_for("the control socket", lambda: query(sock))
            wait_for("npt forwarding", lambda: len(echo(b, sock)) == 3)

            # deep JSON: an error answer, not an exit
            answer = json.loads(send(sock, b"[" * 2048 + b"\n"))
            assert answer == {"error": "the request nests deeper than 8"}
            # 10 MB of junk and 50 random requests (seeded)
            out = send(sock, b"x" * (10 << 20))
            assert not out or json.loads(out) == {"error": "the request is over 4096 bytes"}
            rnd = random.Random(4)
            for _ in range(50):
                out = send(sock, rnd.randbytes(rnd.choice([1, 100, 3000, 5000])))
                assert not out or isinstance(json.loads(out), dict)
            assert run.poll() is None, run.communicate()
            assert len(echo(b, sock)) == 3  # forwarding after the attacks

            # 20 silent clients held open: status and forwarding go on meanwhile
            silent = []
            for _ in range(20):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sock)
                silent.append(s)
            t = time.monotonic()
            st = query(sock, timeout=5.0)
            took = time.monotonic() - t
            assert took < 1.0, took
            assert st["control"]["request_too_deep"] == 1
            assert st["control"]["open_clients"] == 21  # the silent ones and this one
            t = time.monotonic()
            assert echo(b, sock) == [[OUTSIDE_HOST, f"re:echo {i}"] for i in range(3)]
            print(f"status in {took * 1000:.0f} ms, 3 echoes in {time.monotonic() - t:.2f} s")
            time.sleep(1.5)  # their second passes: the instance closed them
            for s in silent:
                s.settimeout(1.0)
                assert s.recv(10) == b""
                s.close()
            assert query(sock)["control"]["client_timeout"] >= 20
            assert run.poll() is None

            run.send_signal(signal.SIGTERM)
            assert run.wait(timeout=30) == 0
            _, err = run.communicate()
            assert "Traceback" not in err, err
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
