"""File descriptors: the process limit, and the share of it the proxy may spend on connections.

``v6lb run`` raises its soft ``RLIMIT_NOFILE`` to the hard limit before
anything else (:func:`raise_nofile`): systemd starts services with a soft
limit of 1024, which held 502 proxied connections.

A proxied connection holds two descriptors (client and backend), so the proxy
derives how many it may hold from the limit (:func:`connection_budget`) and
refuses the ones over it (counted ``over_fd_limit``) instead of meeting EMFILE
in ``accept``, where the event loop, not v6lb, decides what happens (see
docs/proxy.md, "File descriptors").
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

__all__ = ["FdBudget", "connection_budget", "nofile", "open_fds", "raise_nofile"]

# Descriptors kept free besides the ones open at start and the listeners: control
# clients (at most 32), health probes, the event loop's own, a data plane's TUNs and
# probes, log files, haproxy's pipes.
SPARE = 96


_UNLIMITED = 1 << 31  # RLIM_INFINITY (-1 here) as a count; Linux never reports it for NOFILE


def nofile() -> tuple[int, int]:
    """The (soft, hard) ``RLIMIT_NOFILE`` of this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    return (_UNLIMITED if soft == inf else int(soft)), (_UNLIMITED if hard == inf else int(hard))


def raise_nofile() -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard one; the (before, after) soft limits.

    A hard limit of RLIM_INFINITY is taken as ``/proc/sys/fs/nr_open`` (the kernel's
    ceiling for one process). A refusal leaves the limit as it was.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            return soft, soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, target
    return soft, soft


def open_fds() -> int:
    """How many descriptors this process has open now (-1 when /proc is not there)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used
    except OSError:
        return -1


@dataclass(frozen=True, slots=True)
class FdBudget:
    """How the proxy spends the descriptor limit.

    ``connections`` client connections (two descriptors each), ``backlog`` per
    listener (connections the loop may accept in one burst before the proxy sees
    them, each holding a descriptor), and ``reserve`` for everything else.
    """

    limit: int
    in_use: int
    listeners: int
    backlog: int
    reserve: int
    connections: int
    wanted: int

    @property
    def short(self) -> bool:
        """True when ``max_connections`` over every proxy VIP does not fit."""
        return self.connections < self.wanted

    def warning(self) -> str:
        return (
            f"file descriptors: the soft limit is {self.limit}; {self.in_use} are open,"
            f" {self.listeners} listener(s) with a backlog of {self.backlog} and a reserve of"
            f" {SPARE} leave room for {self.connections} proxied connections (2 descriptors"
            f" each), not the {self.wanted} that max_connections allows over the proxy VIPs;"
            f" connections over {self.connections} are refused and counted as over_fd_limit."
            " Fix: raise the limit (LimitNOFILE= in the systemd unit, ulimit -n) or lower"
            " max_connections"
        )


def connection_budget(
    limit: int, in_use: int, listeners: int, backlog: int, wanted: int, backends: int = 0
) -> FdBudget:
    """Split ``limit`` descriptors: what is open, the listeners and their bursts, a reserve.

    The accept burst of each listener is at most its backlog; when descriptors are
    short the backlog shrinks so bursts take at most a quarter of what is free.
    """
    listeners = max(1, listeners)
    free = max(0, limit - in_use - listeners - SPARE - backends)
    backlog = max(8, min(backlog, free // (4 * listeners)))
    reserve = in_use + listeners * (1 + backlog) + SPARE + backends
    connections = max(0, (limit - reserve) // 2)
    return FdBudget(
        limit=limit,
        in_use=in_use,
        listeners=listeners,
        backlog=backlog,
        reserve=reserve,
        connections=min(connections, wanted),
        wanted=wanted,
    )
