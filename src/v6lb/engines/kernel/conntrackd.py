"""``lb.conntrack_sync`` for `v6lb run`: one conntrackd per instance, dying with it.

When the file has ``lb.conntrack_sync``, :class:`ConntrackSyncer` renders
conntrackd.conf (:func:`v6lb.render.conntrackd.render_conntrackd`) into
``<lb.control_socket>.conntrackd/`` and starts ``conntrackd -C FILE`` in the
foreground as a child of `v6lb run`, in the same network namespace, after the
data plane is applied and before bird announces anything:

* started with ``PR_SET_PDEATHSIG`` (:func:`v6lb.engines.bird.die_with`): a
  SIGKILLed `v6lb run` takes its conntrackd with it;
* its UNIX socket, lock file and log are in the instance's own directory, so two
  instances (in two namespaces of one host) never collide; a lock file left by a
  killed conntrackd of the same instance is removed first (after asking that
  socket whether a conntrackd still answers there, and stopping it if so);
* the run loop calls :meth:`ConntrackSyncer.check` once a second: if conntrackd
  exited, that is logged (once) and shown in ``status``; forwarding goes on;
* after each start, ``conntrackd -B`` sends the peer every entry this kernel already
  holds (flows opened while no conntrackd ran here); ``StartupResync`` asks the peer
  for its entries;
* SIGHUP re-renders the file and restarts conntrackd only when the text changed or it
  is not running (the entries it injected stay in the kernel);
* SIGTERM/SIGINT stop it (SIGTERM, then SIGKILL) and remove its directory.

``status()`` reports the process and the figures of ``conntrackd -s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from v6lb.engines.bird import die_with
from v6lb.engines.kernel.apply import KernelError, run_tool
from v6lb.model.config import Config
from v6lb.model.conntrack_sync import ConntrackSync
from v6lb.render.conntrackd import CTL_NAME, render_conntrackd

__all__ = ["CHECK_INTERVAL", "ConntrackSyncer", "SyncError", "parse_stats", "tcp_be_liberal"]

CHECK_INTERVAL: Final = 1.0
BE_LIBERAL: Final = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"
_SUN_PATH_MAX: Final = 107
INSTALL_HINT: Final = "apt-get install conntrackd"


class SyncError(KernelError):
    """conntrackd cannot run: missing, its link is not there, or it does not start."""


def tcp_be_liberal() -> int | None:
    """``net.netfilter.nf_conntrack_tcp_be_liberal`` in this namespace; None if unreadable."""
    try:
        with open(BE_LIBERAL) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def parse_stats(text: str) -> dict[str, Any]:
    """The figures of ``conntrackd -s`` that tell whether the sync works."""
    out: dict[str, Any] = {}
    section = ""
    for line in text.splitlines():
        if line and not line.startswith((" ", "\t")) and line.rstrip().endswith(":"):
            section = line.strip().rstrip(":")
            continue
        nums = [int(n) for n in re.findall(r"\b\d+\b", line)]
        if section == "external inject" and line.startswith("connections"):
            kind = line.split()[1].rstrip(":")  # created, updated, destroyed
            out.setdefault("injected", {})[kind] = {"ok": nums[0], "failed": nums[1]}
        elif section.startswith("UDP traffic") and "Pckts sent" in line:
            out["packets_sent"], out["packets_received"] = nums[0], nums[1]
        elif section.startswith("UDP traffic") and "Error send" in line:
            out["errors_send"], out["errors_received"] = nums[0], nums[1]
        elif section == "message tracking" and "Lost msgs" in line:
            out["malformed"], out["lost"] = nums[0], nums[1]
    return out


class ConntrackSyncer:
    """The conntrackd of one `v6lb run` instance."""

    def __init__(
        self, config: Config, sync: ConntrackSync, binary: str, log: Callable[[str], None]
    ) -> None:
        self.sync = sync
        self.source = config.source
        self.binary = binary
        self.log = log
        self.workdir = Path(f"{config.lb.control_socket}.conntrackd")
        self.conf = self.workdir / "conntrackd.conf"
        self.ctl = self.workdir / CTL_NAME
        self.lock = self.workdir / "conntrackd.lock"
        self.logfile = self.workdir / "conntrackd.log"
        self.text = render_conntrackd(config, str(self.workdir))
        self.proc: subprocess.Popen[bytes] | None = None
        self.last_error: str | None = None
        self.restarts = 0
        self._next_check = 0.0
        self._gone_logged = False

    @classmethod
    def create(
        cls, config: Config, instance: str, log: Callable[[str], None]
    ) -> ConntrackSyncer | None:
        """A syncer for ``config``'s ``lb.conntrack_sync``, or None without one."""
        sync = config.lb.conntrack_sync
        if sync is None:
            return None
        binary = shutil.which("conntrackd")
        if binary is None:
            raise SyncError(
                f"{config.source}: lb.conntrack_sync needs conntrackd, which is not on PATH",
                INSTALL_HINT,
            )
        ctl = f"{config.lb.control_socket}.conntrackd/{CTL_NAME}"
        if len(ctl.encode()) > _SUN_PATH_MAX:
            raise SyncError(
                f"{config.source}: conntrackd's socket {ctl} would be longer than"
                f" {_SUN_PATH_MAX} bytes",
                "use a shorter lb.control_socket (conntrackd's files go next to it)",
            )
        return cls(config, sync, binary, log)

    # --- start / stop -------------------------------------------------------------

    def _check_link(self) -> None:
        """The sync interface exists in this namespace and holds ``address``."""
        s = self.sync
        r = run_tool(["ip", "-6", "-j", "addr", "show", "dev", s.interface], netns=None)
        if r.returncode != 0:
            raise SyncError(
                f"{self.source}: lb.conntrack_sync.interface: {s.interface} does not exist here",
                f"create the dedicated link {s.interface} (a veth, a VLAN or a NIC) first",
            )
        have = {a.get("local") for link in json.loads(r.stdout or "[]") for a in link["addr_info"]}
        if str(s.address) not in have:
            raise SyncError(
                f"{self.source}: lb.conntrack_sync.address: {s.address} is not assigned to"
                f" {s.interface}",
                f"ip -6 addr add {s.address}/64 dev {s.interface} nodad",
            )

    def _ask(self, *args: str, timeout: float = 2.0) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(
                [self.binary, "-C", str(self.conf), *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None

    def _clear_stale(self) -> None:
        """A conntrackd of an earlier run of this instance: stop it; remove its lock file."""
        if not self.conf.exists():
            return
        if self.ctl.exists():
            r = self._ask("-s", "runtime", timeout=1.0)
            if r is not None and r.returncode == 0:
                self.log("conntrack sync: stopping a conntrackd left behind by an earlier run")
                self._ask("-k", timeout=2.0)
                time.sleep(0.2)
        with contextlib.suppress(OSError):
            self.lock.unlink()
        with contextlib.suppress(OSError):
            self.ctl.unlink()

    def start(self, timeout: float = 5.0) -> None:
        """Start conntrackd; returns once its socket answers, or raises :class:`SyncError`."""
        self._check_link()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._clear_stale()
        self.conf.write_text(self.text)
        with self.logfile.open("ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-C", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # the same lines go to LogFile
                stderr=out,
                preexec_fn=die_with(os.getpid()),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                raise SyncError(
                    f"conntrackd exited at start (code {code}): {self.tail_log()}",
                    f"check lb.conntrack_sync and {self.logfile}",
                )
            if self.ctl.exists():
                r = self._ask("-s", "runtime", timeout=1.0)
                if r is not None and r.returncode == 0:
                    s = self.sync
                    # send the peer every entry this kernel already has: flows opened while
                    # no conntrackd ran here (a restart, a reload) reach it too
                    bulk = self._ask("-B", timeout=2.0)
                    sent = "sent" if bulk is not None and bulk.returncode == 0 else "FAILED"
                    self.log(
                        f"conntrack sync: conntrackd {self.proc.pid} started (FTFW over UDP"
                        f" [{s.address}]:{s.port} -> [{s.peer}]:{s.port} on {s.interface});"
                        f" bulk send of this kernel's entries to the peer {sent}"
                    )
                    if tcp_be_liberal() == 0:
                        self.log(
                            "conntrack sync: net.netfilter.nf_conntrack_tcp_be_liberal is 0"
                            " here, so a flow that ECMP moves between two live instances"
                            " (an instance announced again, a BGP/BFD flap) stalls: the"
                            " instance that owns its SNAT address sees only the replies;"
                            " set it to 1 (docs/anycast.md)"
                        )
                    return
            time.sleep(0.05)
        self.stop()
        raise SyncError(
            f"conntrackd's socket {self.ctl} did not answer in {timeout} s",
            f"see {self.logfile}",
        )

    def tail_log(self, n: int = 3) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (conntrackd removes its lock and socket), then SIGKILL; remove its files."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            self.log(f"conntrack sync: conntrackd {proc.pid} stopped")
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- the loop ---------------------------------------------------------------

    def check(self, now: float) -> None:
        """Log (once) that conntrackd exited; at most once per CHECK_INTERVAL."""
        if now < self._next_check or self.proc is None:
            return
        self._next_check = now + CHECK_INTERVAL
        code = self.proc.poll()
        if code is not None and not self._gone_logged:
            self._gone_logged = True
            self.last_error = (
                f"conntrack sync: conntrackd {self.proc.pid} exited with {code}; flows are no"
                f" longer replicated to {self.sync.peer}; log: {self.tail_log()}"
            )
            self.log(self.last_error)

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: restart conntrackd if its rendered file changed."""
        sync = config.lb.conntrack_sync
        if sync is None:
            self.log("conntrack sync: lb.conntrack_sync is gone; it takes effect at the next start")
            return
        text = render_conntrackd(config, str(self.workdir))
        if text == self.text and self.alive():
            return
        old = (self.sync, self.text)
        self.stop()
        self.sync, self.text = sync, text
        try:
            self.start()
        except SyncError as exc:
            self.last_error = f"conntrack sync: restart failed: {exc.message}"
            self.log(self.last_error)
            self.sync, self.text = old
            return
        self.restarts += 1
        self._gone_logged = False

    def status(self) -> dict[str, Any]:
        s = self.sync
        stats: dict[str, Any] = {}
        if self.alive():
            r = self._ask("-s", timeout=2.0)
            if r is not None and r.returncode == 0:
                stats = parse_stats(r.stdout)
            else:
                stats = {"error": "conntrackd -s did not answer"}
        return {
            "running": self.alive(),
            "pid": self.proc.pid if self.proc is not None else None,
            "interface": s.interface,
            "address": str(s.address),
            "peer": str(s.peer),
            "port": s.port,
            "peer_snat": [str(a) for a in s.peer_snat],
            "tcp_be_liberal": tcp_be_liberal(),
            "config": str(self.conf),
            "stats": stats,
            "restarts": self.restarts,
            "last_error": self.last_error,
        }
