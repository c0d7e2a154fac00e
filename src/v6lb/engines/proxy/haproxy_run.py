"""``--proxy haproxy``: render haproxy.cfg and run Debian's haproxy until told to stop.

HAProxy runs in master-worker mode (``haproxy -W``, :class:`Haproxy`): the
master (its pid never changes) re-executes itself on SIGUSR2, parses the config
file again and forks a new worker, which takes the listening sockets over from
the old one (``expose-fd listeners`` on the stats socket); the old worker stops
listening and finishes its established connections (at most ``hard-stop-after``).
Every runtime command goes through the master CLI (``-S``), addressed to a
worker by pid (``@!PID``): it answers during a reload and a soft stop too, when a
worker's own stats socket is closed.

The rendered config, the stats socket, the master CLI socket and an
``owner`` file (the pids of v6lb and of haproxy's master) live in a directory
``$TMPDIR/v6lb-haproxy-*``. A normal stop removes it; after a SIGKILL it stays
(and haproxy keeps running, orphaned: `v6lb lab down` finds and stops it by its
``-f``), and the next ``run_haproxy`` removes every such directory whose
recorded processes are all gone (:func:`reap_stale_dirs`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from v6lb.engines.control import recv_all
from v6lb.engines.procs import process_state
from v6lb.model.config import Config, ProxyL4Options, ProxyL7Options
from v6lb.render.haproxy import render_haproxy, tls_files

from .status import ProxyStatus, parse_haproxy_stat

__all__ = ["Haproxy", "HaproxyError", "check_config", "reap_stale_dirs", "run_haproxy"]

PREFIX = "v6lb-haproxy-"
OWNER = "owner"
# A directory without an owner file is left alone this long (it is being set up,
# or it is a `haproxy -c` check's, which removes it itself).
_GRACE = 120.0
_MAX_UNIX_PATH = 107
_RELOAD_TIMEOUT = 10.0  # seconds a new worker may take to serve (start, reload)
_CLI_TIMEOUT = 2.0


class HaproxyError(RuntimeError):
    """haproxy refused a config, a reload or a runtime command (the message says why)."""


def _binary() -> str:
    path = shutil.which("haproxy")
    if path is None:
        raise RuntimeError("--proxy haproxy needs haproxy on PATH (apt-get install haproxy)")
    return path


def check_config(text: str) -> tuple[bool, str]:
    """``haproxy -c`` on a rendered config: (valid, haproxy's output)."""
    with tempfile.TemporaryDirectory(prefix=PREFIX) as d:
        cfg = Path(d) / "haproxy.cfg"
        cfg.write_text(text)
        r = subprocess.run(
            [_binary(), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
        )
        return r.returncode == 0, r.stdout + r.stderr


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        state = process_state(pid)
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True  # cannot tell: keep its directory
    return state not in ("Z", "X")  # a zombie is gone, only not yet reaped


def _uses(directory: Path) -> bool:
    """Does any live process name ``directory`` on its command line (haproxy -f DIR/...)?"""
    needle = str(directory).encode() + b"/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def reap_stale_dirs(tmp: str | None = None, *, now: float | None = None) -> list[Path]:
    """Remove the ``v6lb-haproxy-*`` directories left by a killed run; the ones removed.

    Only directories (not symlinks) owned by this user, named with v6lb's prefix,
    are candidates. One is kept while any pid of its ``owner`` file is alive, while
    any process names it on its command line, or, without an owner file, for
    two minutes after its last change.
    """
    base = Path(tmp or tempfile.gettempdir())
    now = time.time() if now is None else now
    removed = []
    for d in sorted(base.glob(PREFIX + "*")):
        try:
            st = d.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue
        try:
            pids = [int(w) for w in (d / OWNER).read_text().split()]
        except FileNotFoundError:
            if now - st.st_mtime < _GRACE:
                continue
            pids = []
        except (OSError, ValueError):
            continue  # unreadable or not ours: leave it
        if any(_pid_alive(p) for p in pids) or _uses(d):
            continue
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
    return removed


@dataclass(frozen=True, slots=True)
class Processes:
    """The master CLI's ``show proc``: the current worker(s), the old ones, failed reloads."""

    master: int
    failed: int
    workers: tuple[int, ...]
    old: tuple[int, ...]

    @property
    def all_workers(self) -> tuple[int, ...]:
        return self.workers + self.old


def parse_show_proc(text: str) -> Processes:
    """The text of ``show proc`` (HAProxy 2.6: a master line, ``# workers``, ``# old workers``)."""
    master = failed = 0
    groups: dict[str, list[int]] = {"workers": [], "old workers": []}
    group = ""
    for line in text.splitlines():
        if line.startswith("#"):
            group = line.lstrip("#").strip()
            continue
        words = line.split()
        if len(words) < 2 or not words[0].isdigit():
            continue
        if words[1] == "master":
            master = int(words[0])
            m = re.search(r"\[failed: (\d+)\]", line)
            failed = int(m.group(1)) if m else 0
        elif words[1] == "worker" and group in groups:
            groups[group].append(int(words[0]))
    return Processes(master, failed, tuple(groups["workers"]), tuple(groups["old workers"]))


def cli(path: str, command: str, *, timeout: float = _CLI_TIMEOUT) -> str:
    """One command on an HAProxy CLI socket (master or stats); its whole answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)  # the master CLI answers, then closes
        return recv_all(s).decode("utf-8", "replace")
    finally:
        s.close()


class Haproxy:
    """One haproxy master (``-W``) and its workers, in a ``v6lb-haproxy-*`` directory.

    :meth:`start` and :meth:`reload` return once a worker on the new config answers;
    :meth:`command` runs a runtime API command on every worker (the current one must
    accept it); :meth:`soft_stop` is HAProxy's graceful stop; :meth:`close` ends it all.
    Thread-safe: the daemon's loop reloads and sends commands while another thread
    waits on the process.
    """

    def __init__(self) -> None:
        self.binary = _binary()
        with contextlib.suppress(OSError):
            reap_stale_dirs()
        self.dir = Path(tempfile.mkdtemp(prefix=PREFIX))
        (self.dir / OWNER).write_text(f"{os.getpid()}\n")
        self.cfg = self.dir / "haproxy.cfg"
        self.stats_socket = str(self.dir / "stats.sock")
        self.master_socket = str(self.dir / "master.sock")
        self.tls_dir = str(self.dir / "tls")  # the certificate lists (tls_texts)
        self.proc: subprocess.Popen[bytes] | None = None
        self.worker = 0  # the current worker's pid
        self.reloads = 0
        self._lock = threading.Lock()
        self._alerts: list[str] = []  # haproxy's [ALERT] lines since the last start/reload
        if len(self.master_socket) > _MAX_UNIX_PATH:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise HaproxyError(
                f"{self.master_socket} is too long for a Unix socket: set TMPDIR to a shorter"
                " directory (such as /tmp)"
            )

    def write_tls(self, files: dict[str, bytes]) -> None:
        """Write the certificate lists (keys inside: mode 0600) before haproxy loads them."""
        os.makedirs(self.tls_dir, mode=0o700, exist_ok=True)
        for path, data in files.items():
            tmp = f"{path}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)

    # --- the process --------------------------------------------------------

    def start(self, text: str, *, timeout: float = _RELOAD_TIMEOUT) -> int:
        """Check ``text``, start haproxy on it; the worker's pid once it serves."""
        ok, out = check_config(text)
        if not ok:
            raise HaproxyError(f"haproxy rejects the rendered config:\n{out}")
        self.cfg.write_text(text)
        self.proc = subprocess.Popen(
            [self.binary, "-W", "-db", "-S", f"{self.master_socket},mode,600", "-f", str(self.cfg)],
            stderr=subprocess.PIPE,
        )
        threading.Thread(target=self._relay, name="v6lb-haproxy-log", daemon=True).start()
        (self.dir / OWNER).write_text(f"{os.getpid()} {self.proc.pid}\n")
        self.worker = self._wait_worker((), 0, timeout)
        return self.worker

    def _relay(self) -> None:
        """haproxy's stderr to ours, line by line; its alerts kept for the error messages."""
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if "[ALERT]" in line:
                self._alerts = [*self._alerts[-9:], line.split(": ", 1)[-1].strip()]
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line + "\n")
                sys.stderr.flush()

    @property
    def pid(self) -> int:
        """The master's pid (the same across reloads)."""
        return self.proc.pid if self.proc is not None else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def processes(self) -> Processes:
        return parse_show_proc(cli(self.master_socket, "show proc"))

    def _wait_worker(self, old: tuple[int, ...], failed: int, timeout: float) -> int:
        """Wait for a current worker not in ``old`` that answers; its pid.

        Raises :class:`HaproxyError` if the master counts one more failed reload,
        exits, or no new worker answers within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        why = "no new worker"
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.returncode if self.proc is not None else None
                raise HaproxyError(f"haproxy exited (status {code}); its log is on stderr")
            try:
                procs = self.processes()
                if procs.failed > failed:
                    said = "; ".join(self._alerts) or "its log on stderr says why"
                    raise HaproxyError(
                        f"haproxy could not load the new config ({said});"
                        " the previous worker serves on"
                    )
                new = [p for p in procs.workers if p not in old]
                if new and _info(self.master_socket, new[0]).get("Pid") == str(new[0]):
                    return new[0]
            except OSError as exc:  # the master re-executes itself: its CLI comes back
                why = f"the master CLI: {exc}"
            time.sleep(0.05)
        raise HaproxyError(f"no new haproxy worker served within {timeout:g} s ({why})")

    def reload(self, text: str, *, timeout: float = _RELOAD_TIMEOUT) -> int:
        """Write ``text`` (checked before) and reload; the new worker's pid once it serves.

        On failure the previous file is written back (the master parses the file at
        every reload) and the previous worker serves on.
        """
        with self._lock:
            if not self.alive():
                raise HaproxyError("haproxy is not running")
            assert self.proc is not None
            before = self.processes()
            previous = self.cfg.read_text()
            self._alerts = []
            tmp = self.cfg.with_suffix(".new")
            tmp.write_text(text)
            tmp.replace(self.cfg)
            try:
                self.proc.send_signal(signal.SIGUSR2)
                self.worker = self._wait_worker(before.workers, before.failed, timeout)
            except BaseException:
                tmp.write_text(previous)
                tmp.replace(self.cfg)
                raise
            self.reloads += 1
            return self.worker

    def command(self, line: str) -> str:
        """A runtime API command on every worker; the current worker's answer.

        Old workers (finishing their connections after a reload) get it too, and their
        answer is ignored (their config may lack the server). Raises
        :class:`HaproxyError` when the current worker answers with an error.
        """
        with self._lock:
            procs = self.processes()
            answer = ""
            for pid in procs.all_workers:
                text = cli(self.master_socket, f"@!{pid} {line}").strip()
                if pid in procs.workers:
                    answer = text
            if answer:
                raise HaproxyError(f"haproxy refused `{line}`: {answer}")
            return answer

    def stat_rows(self, pid: int | None = None) -> list[dict[str, str]]:
        """``show stat`` of a worker (the current one by default)."""
        target = f"@!{pid}" if pid else "@1"
        return parse_haproxy_stat(cli(self.master_socket, f"{target} show stat"))

    def sessions(self, frontends: set[str]) -> int:
        """Client sessions open now on ``frontends``, summed over every worker, old ones too."""
        if not self.alive():
            return 0
        total = 0
        for pid in self.processes().all_workers:
            rows = self.stat_rows(pid)
            total += sum(
                int(r.get("scur") or 0)
                for r in rows
                if r.get("svname") == "FRONTEND" and r.get("pxname") in frontends
            )
        return total

    def soft_stop(self) -> None:
        """SIGUSR1 to the master: every worker stops listening (new connections are
        refused) and exits once its connections are done; then the master exits."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGUSR1)

    def wait(self, timeout: float | None = None) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> int | None:
        """Stop haproxy (SIGTERM to the master: every worker at once) and remove the directory."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            return self.proc.returncode if self.proc is not None else None
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def tls_texts(config: Config, tls_dir: str) -> dict[str, bytes]:
    """The files of every TLS VIP's certificate list (path: content), read from the
    config's certificate and key files now (:func:`.tls.check_tls` checked them)."""
    out: dict[str, bytes] = {}
    for vip in config.vips:
        if not isinstance(vip.options, ProxyL4Options | ProxyL7Options):
            continue
        if vip.options.tls is None:
            continue
        pems, crtlist, text = tls_files(vip, tls_dir)
        try:
            for pem, cert, key in pems:
                data = Path(cert).read_bytes()
                if key:
                    data = data.rstrip(b"\n") + b"\n" + Path(key).read_bytes()
                out[pem] = data
        except OSError as exc:
            raise HaproxyError(f"cannot read {exc.filename}: {exc.strerror}") from None
        out[crtlist] = text.encode()
    return out


def _info(master_socket: str, pid: int) -> dict[str, str]:
    """``show info`` of worker ``pid``, through the master CLI."""
    text = cli(master_socket, f"@!{pid} show info")
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def run_haproxy(
    config: Config,
    *,
    stop_event: threading.Event | None = None,
    poll: float = 0.2,
    status: ProxyStatus | None = None,
    on_start: Callable[[Haproxy], None] | None = None,
    **render: Any,
) -> dict[str, Any]:
    """Run haproxy on the rendered config until ``stop_event`` is set (or haproxy exits).

    ``on_start`` is called with the :class:`Haproxy` once its first worker serves.
    """
    hp = Haproxy()
    try:
        hp.write_tls(tls_texts(config, hp.tls_dir))
        text = render_haproxy(config, stats_socket=hp.stats_socket, tls_dir=hp.tls_dir, **render)
        hp.start(text)
        if status is not None:
            status.attach_haproxy(hp.stats_socket, hp.pid, master_socket=hp.master_socket)
        if on_start is not None:
            on_start(hp)
        try:
            while hp.alive():
                if stop_event is None:
                    hp.wait()
                elif stop_event.wait(poll):
                    break
        finally:
            if status is not None:
                status.detach()
        code = hp.close()
        return {"engine": "haproxy", "config": str(hp.cfg), "exit": code, "reloads": hp.reloads}
    finally:
        hp.close()
