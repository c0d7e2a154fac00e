"""`v6lb maglev`: the quality of a Maglev table for N synthetic backends."""

from __future__ import annotations

import argparse
import sys

from v6lb.core.maglev import DEFAULT_TABLE_SIZE
from v6lb.errors import CommandLineError


def _add_maglev(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "maglev",
        help="build a Maglev table for N synthetic backends and report its quality",
        description="Build a Maglev lookup table for N backends [2001:db8::1]:80 ... and print "
        "its balance (entries owned / ideal share, max and min over backends), the "
        "disruption when K backends are removed and when one is added (entries that "
        "changed backend beyond those that had to), and the build time.",
    )
    p.add_argument("--backends", type=int, required=True, metavar="N", help="number of backends")
    p.add_argument(
        "--table-size",
        type=int,
        default=DEFAULT_TABLE_SIZE,
        metavar="M",
        help=f"table size, a prime (default {DEFAULT_TABLE_SIZE}, the kernel recipe's `mod 65537`)",
    )
    p.add_argument(
        "--remove",
        type=int,
        default=None,
        metavar="K",
        help="how many backends to remove for the removal figure, spread evenly "
        "(default 1; 0 with a single backend)",
    )
    p.set_defaults(func=_cmd_maglev)


def _cmd_maglev(args: argparse.Namespace) -> int:
    import ipaddress
    import time

    from v6lb.core.maglev import Maglev, backend_id, build_table, check_table_size, disruption

    n: int = args.backends
    size: int = args.table_size
    try:
        check_table_size(size)
    except ValueError as exc:
        raise CommandLineError(f"--table-size: {exc}") from None
    if n < 1:
        raise CommandLineError(f"--backends {n}: need at least 1 backend")
    if n > size:
        raise CommandLineError(
            f"--backends {n} is more than --table-size {size}: every backend needs a table entry"
        )
    remove: int = min(1, n - 1) if args.remove is None else args.remove
    if not 0 <= remove < n:
        raise CommandLineError(
            f"--remove {remove}: choose 0..{n - 1} (at least one backend must stay)"
        )
    base = int(ipaddress.IPv6Address("2001:db8::"))
    names = [backend_id(str(ipaddress.IPv6Address(base + i + 1)), 80) for i in range(n)]

    table = Maglev(names, size=size)
    runs = []
    for _ in range(3):  # the first build in a process also pays one-off warm-up costs
        start = time.perf_counter()
        build_table(names, size=size)
        runs.append((time.perf_counter() - start) * 1e3)
    build_ms = sorted(runs)[1]
    high, low = table.balance()
    out = [
        f"maglev: {n} backend{'s' if n != 1 else ''}, table size {size}",
        f"build: {build_ms:.1f} ms (median of 3)",
        f"balance: max/ideal {high:.4f}, min/ideal {low:.4f} "
        f"(ideal {size / n:.1f} entries per backend)",
    ]

    def moved(label: str, other: Maglev) -> str:
        d = disruption(table, other)
        return (
            f"{label}: {d.required_fraction:.2%} of entries had to move; "
            f"{d.excess_fraction:.2%} more moved ({d.excess} entries)"
        )

    if remove:
        gone = {i * n // remove for i in range(remove)}
        kept = [name for i, name in enumerate(names) if i not in gone]
        out.append(moved(f"remove {remove} of {n}", Maglev(kept, size=size)))
    else:
        out.append("remove: skipped (--remove 0)")
    added = backend_id(str(ipaddress.IPv6Address(base + n + 1)), 80)
    out.append(moved(f"add 1 to {n}", Maglev([*names, added], size=size)))
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_maglev(sub)
