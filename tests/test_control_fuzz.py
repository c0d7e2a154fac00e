"""The control socket under bad input: it answers or closes, never stops, never blocks its loop.

A :class:`ControlServer` is served the way the python data plane serves it: in
the selector of a loop that also "forwards" (a UDP echo on the same selector).
Each attack runs while a UDP exchange goes on every 20 ms; the exchange must
never wait more than 100 ms and ``status`` must stay answerable within 1 s.
"""

from __future__ import annotations

import json
import random
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from v6lb.engines.control import (
    MAX_DEPTH,
    ControlError,
    ControlServer,
    json_depth,
    query,
)


class Loop:
    """A selector loop with a control server and a UDP echo ("forwarding") in it."""

    def __init__(self, path: str, handlers: Mapping[str, Any], **kw: Any) -> None:
        self.logged: list[str] = []
        self.server = ControlServer(path, handlers, log=self.logged.append, **kw)
        self.udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.udp.bind(("::1", 0))
        self.udp.setblocking(False)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[BaseException] = []

    def _run(self) -> None:
        try:
            with selectors.DefaultSelector() as sel:
                self.server.register(sel)
                sel.register(self.udp, selectors.EVENT_READ, "udp")
                while not self.stop.is_set():
                    for key, _ in sel.select(0.05):
                        if key.data == "udp":
                            data, peer = self.udp.recvfrom(2048)
                            self.udp.sendto(data, peer)
                        elif isinstance(key.data, ControlServer):
                            key.data.handle(key)
                    self.server.expire()
        except BaseException as exc:  # the test fails on any
            self.errors.append(exc)


@contextmanager
def running(tmp_path: Path, handlers: Mapping[str, Any] | None = None, **kw: Any) -> Iterator[Loop]:
    handlers = handlers or {"status": lambda r: {"ok": 1}}
    loop = Loop(str(tmp_path / "c.sock"), handlers, **kw)
    loop.thread.start()
    try:
        yield loop
    finally:
        loop.stop.set()
        loop.thread.join(5)
        loop.server.close()
    assert not loop.errors, loop.errors
    assert not loop.thread.is_alive()


@contextmanager
def forwarding(loop: Loop) -> Iterator[list[float]]:
    """A UDP exchange with the loop every 20 ms; yields the round-trip times."""
    rtts: list[float] = []
    stop = threading.Event()
    first = threading.Event()  # the body starts once the exchange is running

    def run() -> None:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.settimeout(2.0)
        port = loop.udp.getsockname()[1]
        while not stop.is_set():
            t = time.monotonic()
            s.sendto(b"ping", ("::1", port))
            try:
                assert s.recv(16) == b"ping"
                rtts.append(time.monotonic() - t)
            except TimeoutError:
                rtts.append(99.0)
            first.set()
            time.sleep(0.02)
        s.close()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    # On a busy machine (two test workers on two cores) a short body could end before the
    # thread's first exchange, and then nothing would have been measured.
    try:
        assert first.wait(5), "the UDP exchange did not start"
        yield rtts
    finally:
        stop.set()
        th.join(5)
    assert rtts, "no UDP exchange took place"
    assert max(rtts) < 0.1, f"forwarding waited {max(rtts):.3f} s"


def ask(path: str, payload: bytes, timeout: float = 3.0) -> bytes:
    """Send ``payload`` (ignoring a reset while sending) and read what comes back."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    out = b""
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    try:
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    s.close()
    return out


def status_ok(path: str) -> float:
    """``status`` answers ``ok`` (plus the control counters); the seconds it took."""
    t = time.monotonic()
    answer = query(path, timeout=5.0)
    took = time.monotonic() - t
    assert answer["ok"] == 1 and isinstance(answer["control"], dict), answer
    return took


def test_json_depth_skips_strings() -> None:
    assert json_depth(b'{"cmd": "status"}') == 1
    assert json_depth(b"[[[]]]") == 3
    assert json_depth(b'{"a": "[[[[[[[[[[[[[\\"[[["}') == 1
    assert json_depth(b"[" * 2048) == 2048


def test_deep_json_is_an_error_answer_and_the_server_goes_on(tmp_path: Path) -> None:
    with running(tmp_path) as loop, forwarding(loop):
        path = loop.server.path
        answer = json.loads(ask(path, b"[" * 2048 + b"\n"))
        assert answer == {"error": f"the request nests deeper than {MAX_DEPTH}"}
        # 8 deep is still parsed (and then refused as not an object with a command)
        answer = json.loads(ask(path, b"[" * 8 + b"]" * 8 + b"\n"))
        assert answer["error"].startswith("unknown command None")
        assert status_ok(path) < 1.0
        stats = query(path)["control"]
        assert stats["request_too_deep"] == 1 and stats["unknown_command"] == 1
    assert any("request_too_deep" in line for line in loop.logged)


def test_handler_exceptions_are_answers(tmp_path: Path) -> None:
    def boom(request: Mapping[str, Any]) -> Mapping[str, Any]:
        raise RecursionError("deep inside")

    def bad(request: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"x": object()}

    with running(tmp_path, {"status": lambda r: {"ok": 1}, "boom": boom, "bad": bad}) as loop:
        path = loop.server.path
        assert query(path, "boom") == {"error": "boom failed: RecursionError: deep inside"}
        assert query(path, "bad")["error"].startswith("the answer could not be encoded")
        assert status_ok(path) < 1.0
        assert query(path)["control"]["handler_error"] == 1


def test_random_bytes(tmp_path: Path) -> None:
    """300 random requests (seeded): each is answered with a JSON object or closed."""
    rnd = random.Random(21)
    with running(tmp_path) as loop, forwarding(loop):
        path = loop.server.path
        for _ in range(300):
            n = rnd.choice([0, 1, 5, 50, 500, 4000, 4096, 4097, 6000])
            alphabet = rnd.choice([b'[]{}":,\\ \n', bytes(range(256)), b"[{"])
            payload = bytes(rnd.choice(alphabet) for _ in range(n))
            out = ask(path, payload)
            if out:
                assert isinstance(json.loads(out), dict), out[:100]
        assert status_ok(path) < 1.0


def test_huge_input_is_cut(tmp_path: Path) -> None:
    with running(tmp_path) as loop, forwarding(loop):
        path = loop.server.path
        t = time.monotonic()
        out = ask(path, b"x" * (10 << 20))
        assert time.monotonic() - t < 1.0
        if out:  # it may be reset while still sending
            assert json.loads(out) == {"error": "the request is over 4096 bytes"}
        assert status_ok(path) < 1.0
        assert query(path)["control"]["request_too_large"] == 1


def test_slow_client_is_cut_after_1s_and_others_are_served(tmp_path: Path) -> None:
    with running(tmp_path) as loop, forwarding(loop):
        path = loop.server.path
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        t = time.monotonic()
        cut = None
        for b in b'{"cmd": "status"}\n':
            try:
                s.send(bytes([b]))
            except OSError:
                cut = time.monotonic() - t
                break
            assert status_ok(path) < 0.5  # others are served meanwhile
            time.sleep(0.1)
        if cut is None:  # the server closed: the next read says so
            s.settimeout(2.0)
            assert s.recv(100) == b""
            cut = time.monotonic() - t
        s.close()
        assert 0.9 < cut < 1.6, cut
        assert query(path)["control"]["client_timeout"] == 1


def test_twenty_silent_clients_do_not_delay_status(tmp_path: Path) -> None:
    with running(tmp_path) as loop, forwarding(loop):
        path = loop.server.path
        silent = []
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            silent.append(s)
        took = status_ok(path)
        assert took < 1.0, took
        time.sleep(1.3)  # their deadline passes: all are closed
        for s in silent:
            s.settimeout(1.0)
            assert s.recv(10) == b""
            s.close()
        assert query(path)["control"]["client_timeout"] == 20


def test_forty_silent_clients_evict_the_oldest(tmp_path: Path) -> None:
    with running(tmp_path) as loop:
        path = loop.server.path
        silent = []
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            silent.append(s)
        assert status_ok(path) < 1.0
        assert query(path)["control"]["evicted"] >= 8
        for s in silent:
            s.close()


def test_threaded_handlers_do_not_block_and_are_bounded(tmp_path: Path) -> None:
    slow = threading.Event()

    def status(request: Mapping[str, Any]) -> Mapping[str, Any]:
        if slow.is_set():
            time.sleep(0.5)
        return {"ok": 1}

    with running(tmp_path, {"status": status}, threaded=True) as loop, forwarding(loop):
        path = loop.server.path
        slow.set()
        answers: list[Any] = []

        def one() -> None:
            try:
                answers.append(query(path, timeout=5.0))
            except ControlError as exc:
                answers.append(exc)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        ok = [a for a in answers if isinstance(a, dict) and a.get("ok") == 1]
        busy = [a for a in answers if isinstance(a, dict) and "busy" in a.get("error", "")]
        assert len(ok) == 4 and len(busy) == 2, answers
        slow.clear()
        assert status_ok(path) < 1.0


def test_query_turns_every_socket_error_into_control_error(tmp_path: Path) -> None:
    # a listener that never accepts, with its queue full: connect gets EAGAIN
    path = str(tmp_path / "full.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(0)
    fill = []
    for _ in range(4):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            pass
        fill.append(s)
    t = time.monotonic()
    with pytest.raises(ControlError, match="did not answer within 0.5 s"):
        query(path, timeout=0.5)
    assert time.monotonic() - t < 1.5
    for s in fill:
        s.close()
    lsock.close()


def test_query_refuses_a_hostile_answer_without_a_traceback(tmp_path: Path) -> None:
    path = str(tmp_path / "evil.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)

    def serve() -> None:
        c, _ = lsock.accept()
        c.recv(100)
        c.sendall(b"[" * 100_000)
        c.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    with pytest.raises(ControlError, match="is not JSON"):
        query(path, timeout=2.0)
    th.join(5)
    lsock.close()


EMFILE_SERVER = r"""
import os, resource, sys, time, threading
from v6lb.engines.control import ControlServer
stop = threading.Event()
srv = ControlServer(sys.argv[1], {"status": lambda r: {"ok": 1}})
srv.serve_thread(stop)
hog = []
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
try:
    while True:
        hog.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
print("full", flush=True)
sys.stdin.readline()
for fd in hog:
    os.close(fd)
print("freed", flush=True)
sys.stdin.readline()
stop.set()
srv.close()
"""


def test_accept_survives_emfile(tmp_path: Path) -> None:
    path = str(tmp_path / "e.sock")
    p = subprocess.Popen(
        [sys.executable, "-c", EMFILE_SERVER, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline() == "full\n"
        for _ in range(3):  # every client is told, and the listener is drained each time
            answer = query(path, timeout=2.0)
            assert answer == {
                "error": "the instance is out of file descriptors (Too many open files)"
            }
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline() == "freed\n"
        answer = query(path, timeout=2.0)
        assert answer["ok"] == 1 and answer["control"]["fd_exhausted"] == 3, answer
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
