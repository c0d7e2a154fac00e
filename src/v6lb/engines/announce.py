"""BGP announcements for `v6lb run`: one BIRD speaker per instance, driven by health.

When the file has a ``bgp:`` section with an ``asn`` (``Config.bgp_speaker``), the
daemon (:mod:`v6lb.engines.daemon`, one per instance, whatever its planes) owns an
:class:`Announcer`: it renders the speaker config (:func:`v6lb.render.bird.render_speaker`)
with one /128 per VIP address, of every plane (kernel, python, proxy), and each ``npt:``
pair's outside prefix, and starts BIRD (:func:`v6lb.engines.bird.start_bird`) as a child
of `v6lb run`, in the same network namespace. Then:

* :meth:`Announcer.sync` announces each VIP address that has at least one VIP serving
  (a backend that takes new flows, :meth:`v6lb.engines.plane.Plane.serving`;
  ``birdc enable``) and withdraws it when none is left (``birdc disable``); the daemon
  calls it after every health or ``ctl`` change (the proxies' own health view at the
  self-check, once a second), so rise/fall damps flapping; an ``npt:`` outside prefix
  has no backends: it is announced while the LB's own check passes (below), as the
  SNAT prefixes of ``lb.conntrack_sync`` are;
* :meth:`Announcer.reconfigure` (SIGHUP) rewrites the config and runs ``birdc configure``;
* :meth:`Announcer.stop` (SIGTERM/SIGINT) withdraws every prefix, then ``birdc down``;
* :meth:`Announcer.check` is the LB's own check, run from the loop at most once a
  second: every nft table the instance had installed when bird started must still be
  in the kernel. When one is gone (someone ran ``nft flush ruleset``, or another tool
  replaced the ruleset) the instance no longer forwards the VIPs, so every prefix is
  withdrawn, whatever the backends' health, until the tables are back (a SIGHUP
  reload re-applies them);
* bird is started with ``PR_SET_PDEATHSIG`` (:func:`v6lb.engines.bird.start_bird`), so
  a SIGKILLed `v6lb run` takes its bird with it and the routers withdraw at once.

BIRD's files live in ``<control socket>.bird/`` (config, control socket, pid file, log),
removed again at a clean stop. A bird left running by a crashed `v6lb run` of the same
instance (found by its pid file) is killed before the new one starts. A failing ``birdc``
is logged and retried at the next sync; the data plane keeps forwarding.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Callable, Mapping
from ipaddress import IPv6Network
from pathlib import Path
from typing import Any

from v6lb.engines.bird import Bird, BirdError, require_bird, start_bird
from v6lb.engines.kernel.apply import KernelError, nft_tables
from v6lb.model.bgp import BgpSettings
from v6lb.model.config import Config, NatOptions
from v6lb.render.bird import SpeakerRoute, render_speaker

__all__ = [
    "SELF_CHECK_INTERVAL",
    "STANDBY_MED_STEP",
    "AnnounceError",
    "Announcer",
    "installed_tables",
    "npt_prefixes",
    "snat_routes",
    "vip_prefixes",
]

SELF_CHECK_INTERVAL = 1.0  # seconds between two runs of the LB's own check
STANDBY_MED_STEP = 1000  # added to the MED of a peer's SNAT address announced as standby


class AnnounceError(KernelError):
    """The speaker cannot be set up: bird missing, config refused, bird not starting."""


def vip_prefixes(config: Config) -> dict[IPv6Network, list[str]]:
    """Each VIP address (every plane's: kernel, python, proxy) as a /128, with its VIPs' names."""
    out: dict[IPv6Network, list[str]] = {}
    for vip in config.vips:
        out.setdefault(IPv6Network(f"{vip.address}/128"), []).append(vip.name)
    return out


def npt_prefixes(config: Config) -> list[IPv6Network]:
    """Each ``npt:`` pair's outside prefix: the kernel plane translates what reaches it.

    Announced while the LB's own check passes (npt has no backends to be healthy), so the
    routers send the outside prefix to every instance that translates it; NPTv6 keeps no
    state, so any of them translates a flow alike. The replies come back from the inside
    prefix, and their route to an instance is the site's to make (docs/anycast.md, "npt
    behind anycast").
    """
    return list(dict.fromkeys(p.outside for p in config.npt))


def snat_routes(config: Config, settings: BgpSettings) -> dict[IPv6Network, int | None]:
    """With ``lb.conntrack_sync``: the SNAT prefixes to announce, with their MED (None: bgp.med).

    This instance's own nat ``snat`` prefixes with the speaker's MED, and the peer's
    (``lb.conntrack_sync.peer_snat``) as /128s with a MED STANDBY_MED_STEP higher: the
    router sends the peer's replies to the peer while it announces them, and here once
    it is gone, where conntrackd has already put the peer's flows into the kernel.
    Without ``lb.conntrack_sync`` nothing: SNAT addresses are then not announced.
    """
    sync = config.lb.conntrack_sync
    if sync is None:
        return {}
    out: dict[IPv6Network, int | None] = {}
    for vip in config.vips:
        opts = vip.options
        if isinstance(opts, NatOptions) and opts.snat is not None:
            out[opts.snat] = None
    standby = min((settings.med or 0) + STANDBY_MED_STEP, 0xFFFF_FFFF)
    for addr in sync.peer_snat:
        out.setdefault(IPv6Network(f"{addr}/128"), standby)
    return out


def installed_tables(instance: str) -> set[str] | None:
    """The instance's nft tables in this namespace (``"ip6 v6lb_lb1"``); None if nft fails."""
    try:
        return set(nft_tables(instance))
    except KernelError:
        return None


class Announcer:
    """The BIRD speaker of one `v6lb run` instance."""

    def __init__(
        self,
        config: Config,
        settings: BgpSettings,
        instance: str,
        workdir: Path,
        log: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.instance = instance
        self.workdir = workdir
        self.log = log
        self.prefixes = vip_prefixes(config)
        self.snat = snat_routes(config, settings)  # announced while the self-check passes
        self.npt = npt_prefixes(config)  # so are the npt outside prefixes
        self.announced: dict[IPv6Network, bool] = dict.fromkeys(
            [*self.prefixes, *self.snat, *self.npt], False
        )
        self.bird: Bird | None = None
        self.last_error: str | None = None
        self.changes = 0
        self.expected_tables: set[str] = set()
        self.self_problem: str | None = None  # why the LB's own check fails; None: it passes
        self._next_check = 0.0
        self._bird_gone_logged = False
        self.sessions: dict[str, tuple[str, str]] = {}  # BGP session -> (state, info)
        self.leaving = False  # a graceful stop withdrew everything: nothing is announced again

    @classmethod
    def create(cls, config: Config, instance: str, log: Callable[[str], None]) -> Announcer | None:
        """An announcer for ``config``'s ``bgp:`` speaker, or None if it has none."""
        settings = config.bgp_speaker  # load_config has checked the section
        if settings is None:
            return None
        if not settings.neighbours:
            raise AnnounceError(
                f"{config.source}: bgp: has an asn but no neighbours to announce the VIPs to",
                "add bgp.neighbours: [{address: ROUTER, asn: ASN, interface: IF}]",
            )
        try:
            require_bird()
        except BirdError as exc:
            raise AnnounceError(str(exc), "apt-get install bird2") from None
        workdir = Path(f"{config.lb.control_socket}.bird")
        return cls(config, settings, instance, workdir, log)

    def _render(self, up: Mapping[IPv6Network, bool]) -> str:
        routes = [SpeakerRoute(p, up=up.get(p, False)) for p in self.prefixes]
        routes += [SpeakerRoute(p, med=m, up=up.get(p, False)) for p, m in self.snat.items()]
        seen = {r.prefix for r in routes}
        routes += [SpeakerRoute(p, up=up.get(p, False)) for p in self.npt if p not in seen]
        return render_speaker(self.instance, self.settings, routes)

    def _kill_stale(self) -> None:
        pidfile = self.workdir / f"{self.instance}.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            return
        if comm == "bird":
            self.log(f"bgp: killing bird {pid} left behind by an earlier run")
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def start(self, serving: Mapping[str, bool]) -> None:
        """Start bird; the VIPs ``serving`` (by name) are announced from the start."""
        self.expected_tables = installed_tables(self.instance) or set()
        up = self._wanted(serving)
        self._kill_stale()
        try:
            self.bird = start_bird(self.instance, self._render(up), self.workdir)
        except BirdError as exc:
            raise AnnounceError(str(exc), "check the bgp: section and bird's log") from None
        self.announced = dict(up)
        peers = ", ".join(f"{n.name} {n.address} AS {n.asn}" for n in self.settings.neighbours)
        self.log(
            f"bgp: bird {self.bird.pid} started (AS {self.settings.asn}, peers {peers}); "
            f"announced: {self._listed(True)}; withdrawn: {self._listed(False)}"
        )

    def _listed(self, state: bool) -> str:
        return ", ".join(str(p) for p, a in self.announced.items() if a is state) or "none"

    def _wanted(self, serving: Mapping[str, bool]) -> dict[IPv6Network, bool]:
        healthy = self.self_problem is None and not self.leaving
        want = {
            p: healthy and any(serving.get(n, False) for n in names)
            for p, names in self.prefixes.items()
        }
        for p in [*self.snat, *self.npt]:
            want.setdefault(p, healthy)
        return want

    def _watch_sessions(self, bird: Bird) -> None:
        """Log every change of a BGP session's state (a peer that sends garbage, or drops).

        Nothing else follows from it: the data plane keeps forwarding with what it has,
        and bird reconnects by itself (connect retry 2 s, error wait 1-4 s).
        """
        try:
            now = {p.name: (p.state, p.info) for p in bird.protocols().values() if p.proto == "BGP"}
        except BirdError as exc:
            now = {"birdc": ("error", str(exc))}
        for name, (state, info) in now.items():
            old = self.sessions.get(name)
            if old is not None and old != (state, info):
                self.log(f"bgp: session {name}: {old[0]} {old[1]} -> {state} {info}".rstrip())
        self.sessions = now

    def _own_problem(self) -> str | None:
        present = installed_tables(self.instance)
        if present is None:
            return None  # nft itself failed: not evidence that the data plane is gone
        missing = sorted(self.expected_tables - present)
        if missing:
            return f"nft table {', '.join(missing)} is gone: this instance no longer forwards"
        return None

    def check(self, now: float, serving: Callable[[], Mapping[str, bool]]) -> float | None:
        """The LB's own check (at most once per SELF_CHECK_INTERVAL); withdraw everything on failure.

        Then :meth:`sync` with ``serving()`` (the planes that check their backends
        themselves change it without telling). When the next check is due, or None.
        """
        bird = self.bird
        if bird is None:
            return None
        if now < self._next_check:
            return self._next_check
        self._next_check = now + SELF_CHECK_INTERVAL
        self._check(serving)
        return self._next_check

    def _check(self, serving: Callable[[], Mapping[str, bool]]) -> None:
        bird = self.bird
        assert bird is not None
        if not bird.alive():
            if not self._bird_gone_logged:
                self._bird_gone_logged = True
                self.last_error = (
                    f"bgp: bird {bird.pid} exited (its sessions closed, so the routers have "
                    f"withdrawn this instance); log: {bird.tail_log(3)}"
                )
                self.log(self.last_error)
            return
        self._watch_sessions(bird)
        problem = self._own_problem()
        if problem == self.self_problem:
            self.sync(serving())
            return
        self.self_problem = problem
        if problem is not None:
            self.last_error = f"bgp: self-check failed: {problem}; withdrawing every prefix"
            self.log(self.last_error)
        else:
            self.log(
                "bgp: self-check passes again; announcing the VIPs with a healthy backend"
                + (" and the npt outside prefixes" if self.npt else "")
            )
        self.sync(serving())

    def sync(self, serving: Mapping[str, bool], *, withdraw_only: bool = False) -> None:
        """Announce or withdraw each VIP address to match ``serving`` (VIP name -> bool).

        ``withdraw_only``: the run loop calls it so before it refills a map that has lost
        its last backend (a 65537-slot map takes about a second to refill on a loaded
        host), so the routers stop sending at once; announcing waits for the refill.
        """
        bird = self.bird
        if bird is None:
            return
        for prefix, want in self._wanted(serving).items():
            if self.announced.get(prefix) is want or (want and withdraw_only):
                continue
            try:
                (bird.announce if want else bird.withdraw)(prefix)
            except BirdError as exc:
                self.last_error = f"bgp: {'announce' if want else 'withdraw'} {prefix}: {exc}"
                self.log(self.last_error)
                continue
            self.announced[prefix] = want
            self.changes += 1
            why = "a backend is up" if want else "no backend is up"
            if prefix in self.snat and prefix not in self.prefixes:
                why = "SNAT address" if self.snat[prefix] is None else "peer's SNAT, standby"
            elif prefix in self.npt and prefix not in self.prefixes:
                why = "npt outside prefix"
            if not want and self.self_problem is not None:
                why = "the self-check fails"
            self.log(f"bgp: {'announced' if want else 'withdrew'} {prefix} ({why})")

    def withdraw_all(self) -> list[IPv6Network]:
        """A graceful stop: withdraw every prefix for good (bird and its sessions stay up).

        The routers move new flows to the other instances at once, while this one
        still forwards what reaches it; :meth:`stop` ends bird later. The prefixes
        withdrawn now.
        """
        self.leaving = True
        bird = self.bird
        done: list[IPv6Network] = []
        for prefix, up in self.announced.items():
            if not up or bird is None:
                continue
            try:
                bird.withdraw(prefix)
            except BirdError as exc:
                self.last_error = f"bgp: withdraw {prefix}: {exc}"
                self.log(self.last_error)
                continue
            self.announced[prefix] = False
            self.changes += 1
            done.append(prefix)
        return done

    def reconfigure(self, config: Config, serving: Mapping[str, bool]) -> None:
        """SIGHUP: the VIPs or bgp: settings may have changed; ``birdc configure``."""
        settings = config.bgp_speaker  # load_config has checked the section
        if settings is None or self.bird is None:
            self.log("bgp: the bgp: section is gone; it takes effect at the next start")
            return
        self.settings, self.prefixes = settings, vip_prefixes(config)
        self.snat = snat_routes(config, settings)
        self.npt = npt_prefixes(config)
        self.expected_tables = installed_tables(self.instance) or self.expected_tables
        self.self_problem = None  # the reload has just applied the data plane again
        up = self._wanted(serving)
        try:
            self.bird.config.write_text(self._render(up))
            out = self.bird.birdc("configure")
        except (OSError, BirdError) as exc:
            self.last_error = f"bgp: birdc configure failed: {exc}"
            self.log(self.last_error)
            return
        self.announced = dict(up)
        self.log(f"bgp: reconfigured ({out.strip().splitlines()[-1] if out.strip() else 'ok'})")

    def stop(self) -> None:
        """Withdraw every prefix, then ``birdc down``; remove bird's files. Idempotent."""
        bird, self.bird = self.bird, None
        if bird is None:
            return
        for prefix, up in self.announced.items():
            if up and bird.alive():
                try:
                    bird.withdraw(prefix)
                    self.log(f"bgp: withdrew {prefix} (shutting down)")
                except BirdError as exc:
                    self.log(f"bgp: withdraw {prefix} at shutdown failed: {exc}")
            self.announced[prefix] = False
        bird.stop()
        self.log(f"bgp: bird {bird.pid} stopped")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        bird = self.bird
        sessions: dict[str, dict[str, str]] = {}
        if bird is not None and bird.alive():
            try:
                for p in bird.protocols().values():
                    if p.proto in ("BGP", "BFD"):
                        sessions[p.name] = {"proto": p.proto, "state": p.state, "info": p.info}
            except BirdError as exc:
                sessions["error"] = {"proto": "", "state": "", "info": str(exc)}
        return {
            "asn": self.settings.asn,
            "bird_pid": bird.pid if bird is not None else None,
            "bird_alive": bird is not None and bird.alive(),
            "neighbours": [
                {"name": n.name, "address": str(n.address), "asn": n.asn}
                for n in self.settings.neighbours
            ],
            "sessions": sessions,
            "announced": [str(p) for p, a in self.announced.items() if a],
            "withdrawn": [str(p) for p, a in self.announced.items() if not a],
            "changes": self.changes,
            "self_check": {
                "ok": self.self_problem is None,
                "problem": self.self_problem,
                "tables": sorted(self.expected_tables),
            },
            "last_error": self.last_error,
        }
