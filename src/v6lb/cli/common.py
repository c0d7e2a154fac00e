"""What several command groups share: the wide console of the hop tables, the plane help."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from v6lb.engines.planes import Role, names, served_modes, summary
from v6lb.errors import CommandLineError, UsageError
from v6lb.model import failures
from v6lb.model.failures import LAB, Where, aliases_note, resolve

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "add_lab_failure",
    "add_plane_options",
    "failure_arg",
    "one_file",
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


def one_file(file: str | None, alias: str | None, option: str) -> str | None:
    """FILE, or the same given by ``option`` (an older spelling); both at once: a usage error."""
    if file is not None and alias is not None and file != alias:
        raise CommandLineError(f"FILE ({file}) and {option} ({alias}) both name the file; give one")
    return file if file is not None else alias


def failure_arg(where: Where, *, also: str = "") -> Callable[[str], str]:
    """An argparse ``type`` for ``--failure``: a failure name ``where`` runs, an old alias
    (with a deprecation note on stderr), or ``also`` (``none``, ``all``); anything else is
    a usage error naming the choices."""

    def failure(value: str) -> str:
        if also and value == also:
            return value
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


def add_lab_failure(p: argparse.ArgumentParser, also: str, head: str, **kw: str) -> None:
    """``--failure`` of the anycast lab (`lab failover`, `lab trace --mode anycast`)."""
    p.add_argument(
        "--failure",
        type=failure_arg(LAB, also=also),
        metavar="FAILURE",
        help=f"{head} one of: {', '.join(failures.names(LAB))}{aliases_note(LAB)}",
        **kw,  # type: ignore[arg-type]
    )


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
