"""The failover lab's agents (v6lb.lab.agents) on loopback, without namespaces or root.

greet_server greets each connection with its name and the client's port and answers each
question with its name; traffic's short mode, long mode (flows and new connections until
a line on stdin) and its error accounting (a backend that closes, one that answers with
another name) are what :func:`v6lb.lab.failover.measure` reads, so the JSON keys are
checked too.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from v6lb.lab.agents import greet_server, traffic

pytestmark = pytest.mark.skipif(not socket.has_ipv6, reason="needs IPv6 loopback")

FLOW_KEYS = {"sport", "backend", "asked", "max_rtt", "err", "err_t", "wrong"}
NEW_KEYS = {"t0", "t1", "sport", "backend", "err"}


@contextmanager
def greeter(me: str) -> Iterator[tuple[int, Callable[[], None]]]:
    """greet_server.serve on [::1]:<free port> in a thread, and a function that kills it.

    Killing it (at the latest on exit) closes its connections and its listener.
    """
    ls = greet_server.listen(0, "::1")
    stop = threading.Event()
    t = threading.Thread(
        target=greet_server.serve, args=(me, ls), kwargs={"stop": stop}, daemon=True
    )
    t.start()

    def kill() -> None:
        stop.set()
        t.join(5)
        ls.close()

    try:
        yield ls.getsockname()[1], kill
    finally:
        kill()


def test_greet_server_greets_and_answers() -> None:
    with greeter("be1") as (port, _):
        s = socket.create_connection(("::1", port), timeout=5)
        assert traffic.read_line(s) == ["be1", str(s.getsockname()[1])]
        s.sendall(b"ping\n")
        assert traffic.read_line(s) == ["be1"]
        s.close()
        # a second client after the first has gone
        assert traffic.attempt("::1", port).backend == "be1"


def test_attempt_records_a_refused_connection() -> None:
    ls = greet_server.listen(0, "::1")
    port = ls.getsockname()[1]
    ls.close()  # nothing listens there now
    a = traffic.attempt("::1", port)
    assert a.err == "ConnectionRefusedError" and a.backend is None and a.sport
    assert a.t1 >= a.t0


def test_short_mode_json() -> None:
    with greeter("be1") as (port, _):
        out = io.StringIO()
        assert traffic.main(["::1", str(port), "0"], stdout=out) == 0
    got = json.loads(out.getvalue())
    assert len(got) == traffic.SHORT_COUNT
    assert all(set(a) == NEW_KEYS and a["err"] is None and a["backend"] == "be1" for a in got)
    assert len({a["sport"] for a in got}) == len(got)


def test_long_mode_until_a_line_on_stdin() -> None:
    r, w = os.pipe()
    with greeter("be1") as (port, _), open(r) as stdin, open(w, "w") as wfile:
        out = io.StringIO()
        timer = threading.Timer(0.6, lambda: (wfile.write("stop\n"), wfile.flush()))
        timer.start()
        assert traffic.main(["::1", str(port), "3"], stdin=stdin, stdout=out) == 0
        timer.join()
    first, last = out.getvalue().splitlines()
    opened = json.loads(first)
    assert len(opened) == 3 and all(b == "be1" for _, b in opened)
    result = json.loads(last)
    assert [f["sport"] for f in result["flows"]] == [p for p, _ in opened]
    for f in result["flows"]:
        assert set(f) == FLOW_KEYS
        assert f["asked"] >= 3 and f["wrong"] == 0 and f["err"] is None, f
    news = result["new"]
    assert len(news) >= 3 and all(set(n) == NEW_KEYS and n["backend"] == "be1" for n in news)
    assert [n["t0"] for n in news] == sorted(n["t0"] for n in news)


def test_a_backend_that_goes_away_ends_its_flows() -> None:
    with greeter("be1") as (port, kill):
        t = traffic.Traffic("::1", port, 2, interval=0.02)
        t.start()
        time.sleep(0.2)
        t_kill = time.monotonic()
        kill()  # the server closes every connection (the flows read EOF) and stops listening
        time.sleep(0.2)
        result = t.stop(grace=0.1)
        t.close()
    for f in result["flows"]:
        # EOF (ConnectionError), or a reset when a question crossed the close
        assert f["err"] in ("ConnectionError", "ConnectionResetError", "BrokenPipeError"), f
        assert f["err_t"] >= t_kill, f
        assert f["asked"] >= 1
    assert any(n["err"] == "ConnectionRefusedError" for n in result["new"] if n["t0"] > t_kill)


def test_an_answer_from_another_backend_counts_as_wrong() -> None:
    ls = greet_server.listen(0, "::1")
    port = ls.getsockname()[1]

    def moved_backend() -> None:  # greets as be1, then answers as be2 (the flow moved)
        c, peer = ls.accept()
        c.sendall(f"be1 {peer[1]}\n".encode())
        while c.recv(256):
            c.sendall(b"be2\n")
        c.close()

    t = threading.Thread(target=moved_backend, daemon=True)
    t.start()
    f = traffic.Flow.open("::1", port)
    assert f.backend == "be1"
    f.ask()
    f.ask()
    assert (f.asked, f.wrong, f.err) == (2, 2, None)
    f.sock.close()
    t.join(5)
    ls.close()


def test_modules_run_as_the_lab_runs_them() -> None:
    """`python -m` for both, as the lab starts them in a namespace (here on loopback)."""
    probe = greet_server.listen(0, "::1")
    port = probe.getsockname()[1]
    probe.close()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    srv = subprocess.Popen(
        [sys.executable, "-m", "v6lb.lab.agents.greet_server", "be9", str(port)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        r = subprocess.run(
            [sys.executable, "-m", "v6lb.lab.agents.traffic", "::1", str(port), "0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert len(got) == traffic.SHORT_COUNT and {a["backend"] for a in got} == {"be9"}
    finally:
        srv.kill()
        srv.wait(timeout=10)


def test_usage_errors() -> None:
    assert traffic.main(["::1", "80"]) == 2
    assert greet_server.main(["be1"]) == 2
