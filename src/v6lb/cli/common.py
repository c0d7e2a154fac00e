"""What several command groups share: the wide console of the hop tables, the plane help."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from v6lb.engines.planes import Role, names, served_modes, summary
from v6lb.errors import UsageError
from v6lb.model.failures import Where, resolve

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "add_plane_options",
    "failure_arg",
    "planes_help",
    "terminal_console",
    "wide_console",
]


def wide_console() -> Console:
    """A console at least 160 columns wide: the hop tables need it."""
    from rich.console import Console

    return Console(width=max(160, Console().width), emoji=False, highlight=False)


def terminal_console() -> Console:
    """A console as wide as the terminal (``COLUMNS``, else the terminal, else 80)."""
    import shutil

    from rich.console import Console

    return Console(width=shutil.get_terminal_size((80, 24)).columns, emoji=False, highlight=False)


def failure_arg(where: Where) -> Callable[[str], str]:
    """An argparse ``type`` for ``--failure``: a failure name ``where`` runs, or an old alias
    (with a deprecation note on stderr); anything else is a usage error naming the choices."""

    def failure(value: str) -> str:
        try:
            f = resolve(value, where)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if value != f.name:
            sys.stderr.write(
                f"v6lb: note: failure {value!r} is now called {f.name!r};"
                " the old name still works but is deprecated\n"
            )
        return f.name

    return failure


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
