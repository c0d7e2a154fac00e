"""What several command groups share: the wide console of the hop tables, the plane help."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from v6lb.engines.planes import Role, names, served_modes, summary

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["add_plane_options", "planes_help", "wide_console"]


def wide_console() -> Console:
    """A console at least 160 columns wide: the hop tables need it."""
    from rich.console import Console

    return Console(width=max(160, Console().width), emoji=False, highlight=False)


def planes_help(role: Role) -> str:
    """The registered planes of ``role``: each with what it is made of and the modes it serves."""
    return "; ".join(f"{n} ({summary(n)}: {', '.join(served_modes(n))})" for n in names(role))


def add_plane_options(p: argparse.ArgumentParser, *, dataplane_help: str) -> None:
    """``--dataplane`` and ``--proxy``: the registered planes, as `run` and `lab up` take them."""
    p.add_argument(
        "--dataplane",
        choices=names(Role.DATAPLANE),
        default="kernel",
        help=f"{dataplane_help}, default kernel: {planes_help(Role.DATAPLANE)}",
    )
    p.add_argument(
        "--proxy",
        choices=names(Role.PROXY),
        default=None,
        help=f"proxy engine of the proxy VIPs, default builtin: {planes_help(Role.PROXY)}",
    )
