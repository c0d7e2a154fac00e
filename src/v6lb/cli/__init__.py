"""The `v6lb` command line: one small module per command group.

Each module parses its arguments, calls the library and prints; it registers its
sub-commands with ``add_parsers``. Handlers return the process exit code. Every
error a handler lets through is reported here, once, as ``v6lb: error: MESSAGE``
(with its fix), and its exit code is decided here: 2 when the command line or the
config is wrong (:class:`~v6lb.errors.UsageError`), 1 when a valid request failed
on this host (:class:`~v6lb.errors.RuntimeFailure`). See :func:`exit_code`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from v6lb import __version__
from v6lb.cli import check, control, explain, lab, maglev, npt, run
from v6lb.errors import EXIT_RUNTIME, EXIT_USAGE, UsageError, V6lbError

__all__ = ["UsageError", "build_parser", "exit_code", "main"]

Handler = Callable[[argparse.Namespace], int]

# the order of `v6lb --help`
_GROUPS = (explain, npt, check, maglev, run, control, lab)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="v6lb",
        description="IPv6 load balancer and network lab: proxy, npt, nat, dsr, anycast.",
    )
    parser.add_argument("--version", action="version", version=f"v6lb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.add_parsers(sub)
    return parser


def exit_code(exc: BaseException) -> int | None:
    """The exit code for an error a command raised; None: not one v6lb reports (a bug).

    :class:`V6lbError` carries its own (``ConfigError`` is a usage error,
    ``ControlError`` a runtime failure). The lower layers' errors that do not derive
    from it yet are mapped here, and only here.
    """
    if isinstance(exc, V6lbError):
        return exc.exit_code
    from v6lb.engines.control import ControlError
    from v6lb.engines.kernel.apply import ApplyError, KernelError, MissingFeatureError
    from v6lb.lab.plan import LabError

    if isinstance(exc, (ApplyError, MissingFeatureError, ControlError)):
        return EXIT_RUNTIME  # the host refused a valid change; no instance answered
    if isinstance(exc, (KernelError, LabError)):
        return EXIT_USAGE  # not root, a tool missing, a bad name: nothing was changed
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except BrokenPipeError:
        return 0
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        sys.stderr.write(f"v6lb: error: {exc}\n")
        return code
