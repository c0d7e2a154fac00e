"""`v6lb npt map` and `v6lb npt packet`: NPTv6 (RFC 6296) on addresses and captures."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from v6lb.errors import CommandLineError, UsageError

if TYPE_CHECKING:
    from v6lb.core.nptv6 import NptMapping


def _add_npt(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("npt", help="NPTv6 (RFC 6296) prefix translation tools")
    nsub = p.add_subparsers(dest="npt_command", required=True, metavar="ACTION")
    m = nsub.add_parser(
        "map",
        help="translate addresses (arguments, or one per line on stdin)",
        description="Translate addresses inside->outside (or outside->inside with --reverse). "
        "Prints one line per address: the translated address, or 'drop: REASON'.",
    )
    m.add_argument(
        "--inside", required=True, help="inside (private) prefix, e.g. fd01:203:405::/48"
    )
    m.add_argument("--outside", required=True, help="outside (public) prefix, e.g. 2001:db8:1::/48")
    m.add_argument("--reverse", action="store_true", help="translate outside -> inside")
    m.add_argument("addresses", nargs="*", metavar="ADDRESS")
    m.set_defaults(func=_cmd_npt_map)
    k = nsub.add_parser(
        "packet",
        help="translate every packet of a pcap/pcapng file and write a pcap",
        description="Translate each IPv6 packet of a capture through NPTv6 and write a pcap "
        "(nanosecond timestamps, same link type) that Wireshark/tshark read with valid checksums.",
    )
    k.add_argument("--inside", required=True)
    k.add_argument("--outside", required=True)
    k.add_argument(
        "--direction",
        choices=("auto", "out", "in"),
        default="auto",
        help="out: translate sources in the inside prefix; in: destinations in the outside "
        "prefix; auto (default): per packet",
    )
    k.add_argument("input", help="input capture (pcap or pcapng)")
    k.add_argument("output", help="output pcap")
    k.set_defaults(func=_cmd_npt_packet)


def _mapping(args: argparse.Namespace) -> NptMapping:
    from v6lb.core.nptv6 import NptMapping, NptPrefixError

    try:
        return NptMapping(args.inside, args.outside)
    except NptPrefixError as exc:
        raise CommandLineError(f"invalid NPT prefix: {exc}") from None


def _cmd_npt_map(args: argparse.Namespace) -> int:
    import ipaddress

    from v6lb.wire.reasons import Reason

    mapping = _mapping(args)
    inputs: Iterable[str] = args.addresses if args.addresses else sys.stdin
    write = sys.stdout.write
    translate = mapping.translate
    reverse = args.reverse
    out: list[str] = []
    for raw in inputs:
        text = raw.strip()
        if not text:
            continue
        try:
            addr = ipaddress.IPv6Address(text)
        except ValueError:
            out.append(f"drop: not-an-ipv6-address ({text})\n")
            continue
        res = translate(addr, reverse)
        if isinstance(res, Reason):
            out.append(f"drop: {res.label}\n")
        else:
            out.append(f"{res}\n")
        if len(out) >= 4096:
            write("".join(out))
            out.clear()
    write("".join(out))
    return 0


def _cmd_npt_packet(args: argparse.Namespace) -> int:
    from pathlib import Path

    from v6lb.engines.offline import translate_file
    from v6lb.wire.pcap import PcapError

    mapping = _mapping(args)
    src = Path(args.input)
    if not src.is_file():
        raise UsageError(f"{src}: no such capture file")
    try:
        stats = translate_file(src, Path(args.output), mapping, args.direction)
    except PcapError as exc:
        raise UsageError(f"{src}: {exc}") from None
    sys.stderr.write(f"{stats.summary()}; wrote {args.output}\n")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_npt(sub)
