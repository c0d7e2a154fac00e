"""Run BIRD 2 in a network namespace and drive it through ``birdc``.

Each :class:`Bird` has its own config file, control socket and pid file in
``workdir`` (never the Debian service's /run/bird), so several speakers and
routers run side by side, one per namespace, and the packaged ``bird``
service is never involved. The control socket is a path in the file system:
``birdc`` reaches it from any namespace.

    bird = start_bird("lb1", conf_text, workdir, netns="v6lb-lb1")
    bird.withdraw(IPv6Network("2001:db8:a::1/128"))   # birdc disable v6lb_...
    bird.announce(IPv6Network("2001:db8:a::1/128"))   # birdc enable v6lb_...
    bird.protocols()                                  # {"up": ProtocolState(...)}
    bird.stop()                                       # birdc down, then SIGKILL if needed
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv6Network
from pathlib import Path

from v6lb.render.bird import static_name

__all__ = [
    "Bird",
    "BirdError",
    "BirdMissingError",
    "ProtocolState",
    "birdc_run",
    "die_with",
    "parse_protocols",
    "require_bird",
    "set_l4_ecmp_hash",
    "start_bird",
]

INSTALL_HINT = "install BIRD 2: apt-get install bird2"


class BirdError(RuntimeError):
    """bird refused its config, did not come up, or birdc failed."""


class BirdMissingError(BirdError):
    """bird or birdc is not installed."""


def require_bird() -> tuple[str, str]:
    """The paths of ``bird`` and ``birdc``, or :class:`BirdMissingError` naming the package."""
    bird, birdc = shutil.which("bird"), shutil.which("birdc")
    if bird is None or birdc is None:
        missing = "bird" if bird is None else "birdc"
        raise BirdMissingError(f"`{missing}` is not on PATH; {INSTALL_HINT}")
    return bird, birdc


def set_l4_ecmp_hash(netns: str | None = None) -> None:
    """``net.ipv6.fib_multipath_hash_policy=1`` (5-tuple) where a router spreads VIP flows.

    Under the default policy 0 the hash includes the IPv6 flow label, which
    TCP changes after a retransmission timeout: the flow would move to another
    LB instance (docs/anycast.md).
    """
    argv = ["sysctl", "-qw", "net.ipv6.fib_multipath_hash_policy=1"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise BirdError(f"cannot set the L4 multipath hash: {res.stderr.strip()}")


PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL when the thread that started it exits.

    ``PR_SET_PDEATHSIG`` survives ``execve`` (``ip netns exec`` execs bird in
    turn), so a bird started by ``v6lb run`` cannot outlive it and keep
    announcing a VIP for an LB that is gone: a SIGKILLed ``v6lb run`` takes its
    bird with it, the kernel closes bird's TCP sessions and the routers
    withdraw at once. If the parent died before the prctl, exit at once.
    """

    def preexec() -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


@dataclass(frozen=True, slots=True)
class ProtocolState:
    name: str
    proto: str  # BGP, Static, BFD, Kernel, Device
    state: str  # up, down, start
    info: str  # BGP: Established, Idle, Active, Connect, ...

    @property
    def established(self) -> bool:
        return self.state == "up" and self.info.startswith("Established")


def parse_protocols(text: str) -> dict[str, ProtocolState]:
    """``birdc show protocols`` output -> name -> state."""
    out: dict[str, ProtocolState] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[0] in ("Name", "BIRD") or line.startswith(" "):
            continue
        # Name Proto Table State Since Info; Table is "---" or a name; Since is 1-2 words
        name, proto, _table, state = parts[:4]
        info = " ".join(parts[6:]) if len(parts) > 6 and ":" in parts[5] else " ".join(parts[5:])
        out[name] = ProtocolState(name, proto, state, info)
    return out


def birdc_run(socket: str | Path, *args: str, timeout: float = 5.0) -> str:
    _, birdc = require_bird()
    try:
        res = subprocess.run(
            [birdc, "-s", str(socket), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BirdError(f"birdc {' '.join(args)}: no answer in {timeout} s") from None
    if res.returncode != 0 or "Unable to connect" in res.stdout:
        raise BirdError(f"birdc {' '.join(args)} failed: {(res.stdout + res.stderr).strip()}")
    return res.stdout


@dataclass
class Bird:
    name: str
    netns: str | None
    config: Path
    socket: Path
    pidfile: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def birdc(self, *args: str, timeout: float = 5.0) -> str:
        return birdc_run(self.socket, *args, timeout=timeout)

    def announce(self, prefix: IPv6Network) -> None:
        self._switch("enable", prefix)

    def withdraw(self, prefix: IPv6Network) -> None:
        self._switch("disable", prefix)

    def _switch(self, verb: str, prefix: IPv6Network) -> None:
        out = self.birdc(verb, static_name(prefix))
        if "syntax error" in out or "No protocols match" in out:
            raise BirdError(f"{self.name}: {prefix} is not in the rendered config ({out.strip()})")

    def protocols(self) -> dict[str, ProtocolState]:
        return parse_protocols(self.birdc("show", "protocols"))

    def wait_established(self, names: list[str] | None = None, timeout: float = 20.0) -> None:
        """Until every BGP session (or those in ``names``) is Established."""
        deadline = time.monotonic() + timeout
        last: dict[str, ProtocolState] = {}
        while time.monotonic() < deadline:
            if not self.alive():
                raise BirdError(f"{self.name}: bird exited; log: {self.tail_log()}")
            last = self.protocols()
            want = [p for p in last.values() if p.proto == "BGP" and (not names or p.name in names)]
            if want and all(p.established for p in want):
                return
            time.sleep(0.1)
        raise BirdError(f"{self.name}: sessions not established in {timeout} s: {last}")

    def tail_log(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL: a crash; the kernel still closes its TCP sessions)."""
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(timeout=5)

    def stop(self, timeout: float = 3.0) -> None:
        """``birdc down`` (sessions closed with a Cease), then SIGKILL if it lingers. Idempotent."""
        if not self.alive():
            return
        assert self.proc is not None
        try:
            self.birdc("down", timeout=timeout)
        except BirdError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def start_bird(
    name: str,
    config_text: str,
    workdir: str | Path,
    *,
    netns: str | None = None,
    timeout: float = 5.0,
    die_with_parent: bool = True,
) -> Bird:
    """Check ``config_text`` (``bird -p``), then run bird in the foreground in ``netns``.

    Returns once the control socket answers. Files: ``workdir/NAME.conf``,
    ``.ctl``, ``.pid`` and ``.log`` (bird's stderr). With ``die_with_parent``
    (the default) bird is SIGKILLed by the kernel when the calling thread
    exits, however it exits (``PR_SET_PDEATHSIG``): call it from the thread
    that lives as long as bird should, the main thread of ``v6lb run``.
    """
    bird_bin, _ = require_bird()
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    b = Bird(
        name, netns, wd / f"{name}.conf", wd / f"{name}.ctl", wd / f"{name}.pid", wd / f"{name}.log"
    )
    if len(str(b.socket)) > 100:
        raise BirdError(f"control socket path {b.socket} is too long; use a shorter workdir")
    b.config.write_text(config_text)
    check = subprocess.run(
        [bird_bin, "-p", "-c", str(b.config)], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        raise BirdError(
            f"{name}: bird rejected {b.config}: {(check.stderr or check.stdout).strip()}"
        )
    argv = [bird_bin, "-f", "-c", str(b.config), "-s", str(b.socket), "-P", str(b.pidfile)]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]  # exec: the child's pid is bird's
    with b.log.open("ab") as log:
        b.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=die_with(os.getpid()) if die_with_parent else None,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not b.alive():
            raise BirdError(f"{name}: bird exited at start; log: {b.tail_log()}")
        if b.socket.exists():
            try:
                b.birdc("show", "status", timeout=1.0)
                return b
            except BirdError:
                pass
        time.sleep(0.05)
    b.stop()
    raise BirdError(f"{name}: bird's control socket did not answer in {timeout} s")
