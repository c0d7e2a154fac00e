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
from v6lb.cli import check, control, ctl, explain, k8s, lab, maglev, npt, run
from v6lb.errors import CommandLineError, UsageError, V6lbError

__all__ = ["UsageError", "build_parser", "exit_code", "main"]

Handler = Callable[[argparse.Namespace], int]

# the order of `v6lb --help`
_GROUPS = (explain, npt, check, maglev, run, control, ctl, lab, k8s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="v6lb",
        description="IPv6 load balancer and network lab: proxy, npt, nat, dsr, anycast.",
    )
    parser.add_argument("--version", action="version", version=f"v6lb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.add_parsers(sub)
    _remember_usage(parser)
    return parser


def _remember_usage(parser: argparse.ArgumentParser) -> None:
    """Every (sub-)command parser leaves its usage in the namespace (``_usage``): the
    innermost one parsed wins, and :func:`main` prints it with a command-line error."""
    parser.set_defaults(_usage=parser.format_usage)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                _remember_usage(p)


def exit_code(exc: BaseException) -> int | None:
    """The exit code for an error a command raised; None: not one v6lb reports (a bug).

    Every error v6lb reports derives from :class:`~v6lb.errors.V6lbError` and carries
    its own code (``ConfigError``, ``KernelError`` and ``LabError`` are usage errors;
    ``ControlError``, ``ApplyError`` and ``MissingFeatureError`` runtime failures).
    """
    return exc.exit_code if isinstance(exc, V6lbError) else None


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
        if isinstance(exc, CommandLineError):  # the command line is wrong: show how it goes
            sys.stderr.write(args._usage())
        sys.stderr.write(f"v6lb: error: {exc}\n")
        return code
