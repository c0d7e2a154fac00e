"""The `v6lb` command line: one small module per command group.

Each module parses its arguments, calls the library and prints; it registers its
sub-commands with ``add_parsers``. Handlers return the process exit code; an error
they raise is printed once here as ``v6lb: error: ...`` (exit 2: the input is wrong).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from v6lb.cli import check, control, explain, lab, maglev, npt, run
from v6lb.errors import UsageError

__all__ = ["UsageError", "build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]

# the order of `v6lb --help`
_GROUPS = (explain, npt, check, maglev, run, control, lab)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="v6lb",
        description="IPv6 load balancer and network lab: proxy, npt, nat, dsr, anycast.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except UsageError as exc:
        sys.stderr.write(f"v6lb: error: {exc}\n")
        return 2
    except BrokenPipeError:
        return 0
