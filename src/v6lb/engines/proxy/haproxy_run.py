"""``--proxy haproxy``: render haproxy.cfg and run Debian's haproxy until told to stop.

The rendered config, HAProxy's stats socket (for `v6lb status`) and an
``owner`` file (the pids of v6lb and of its haproxy) live in a directory
``$TMPDIR/v6lb-haproxy-*``. A normal stop removes it; after a SIGKILL it stays
(and haproxy keeps running, orphaned: `v6lb lab down` finds and stops it by its
``-f``), and the next ``run_haproxy`` removes every such directory whose
recorded processes are all gone (:func:`reap_stale_dirs`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from v6lb.model.config import Config
from v6lb.render.haproxy import render_haproxy

from .status import ProxyStatus

__all__ = ["check_config", "reap_stale_dirs", "run_haproxy"]

PREFIX = "v6lb-haproxy-"
OWNER = "owner"
# A directory without an owner file is left alone this long (it is being set up,
# or it is a `haproxy -c` check's, which removes it itself).
_GRACE = 120.0
_MAX_UNIX_PATH = 107


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
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
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


def run_haproxy(
    config: Config,
    *,
    stop_event: threading.Event | None = None,
    poll: float = 0.2,
    status: ProxyStatus | None = None,
    on_start: Callable[[int], None] | None = None,
    **render: Any,
) -> dict[str, Any]:
    """Run haproxy in the foreground on the rendered config until ``stop_event`` is set.

    ``on_start`` is called with haproxy's pid once it has been started.
    """
    binary = _binary()
    with contextlib.suppress(OSError):
        reap_stale_dirs()
    d = Path(tempfile.mkdtemp(prefix=PREFIX))
    try:
        (d / OWNER).write_text(f"{os.getpid()}\n")
        sock = str(d / "stats.sock")
        if len(sock) > _MAX_UNIX_PATH:
            sock = ""  # $TMPDIR too long for an AF_UNIX path: no stats in `v6lb status`
        text = render_haproxy(config, stats_socket=sock or None, **render)
        ok, out = check_config(text)
        if not ok:
            raise RuntimeError(f"haproxy rejects the rendered config:\n{out}")
        cfg = d / "haproxy.cfg"
        cfg.write_text(text)
        proc = subprocess.Popen([binary, "-db", "-f", str(cfg)])
        (d / OWNER).write_text(f"{os.getpid()} {proc.pid}\n")
        if status is not None and sock:
            status.attach_haproxy(sock, proc.pid)
        if on_start is not None:
            on_start(proc.pid)
        try:
            while proc.poll() is None:
                if stop_event is not None and stop_event.wait(poll):
                    break
                if stop_event is None:
                    proc.wait()
        finally:
            if status is not None:
                status.detach()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        return {"engine": "haproxy", "config": str(cfg), "exit": proc.returncode}
    finally:
        shutil.rmtree(d, ignore_errors=True)
