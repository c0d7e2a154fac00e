"""`v6lb check FILE`: validate every section and print what it would set up."""

from __future__ import annotations

import argparse
import sys


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check",
        help="validate a config file and show what it would set up",
        description="Validate every section of FILE (vips, npt, lb, topology, bgp) and print "
        "a summary; the certificate and key files of TLS VIPs are read and matched. Exit 0 if valid; exit 2 with FILE: FIELD: PROBLEM; fix: FIX otherwise. "
        "Changes nothing.",
    )
    p.add_argument("file", metavar="FILE", help="the v6lb YAML config file")
    p.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    from v6lb.engines.proxy.tls import check_tls
    from v6lb.model.config import load_config
    from v6lb.model.config_summary import summarize
    from v6lb.model.end_points import end_point_warnings

    config = load_config(args.file)  # a ConfigError is a usage error: exit 2
    check_tls(config)  # the certificate and key files: readable, PEM, matching
    topo, bgp = config.topology, config.bgp_speaker
    sys.stdout.write(f"{args.file}: valid\n{summarize(config)}")
    if topo is not None:
        roles: dict[str, int] = {}
        for n in topo.nodes:
            roles[n.role] = roles.get(n.role, 0) + 1
        sys.stdout.write(
            f"topology: {len(topo.nodes)} nodes ("
            + ", ".join(f"{k} {v}" for k, v in sorted(roles.items()))
            + f"), {len(topo.links)} links: "
            + ", ".join(f"{lk.name} {lk.subnet} mtu {lk.mtu}" for lk in topo.links)
            + "\n"
        )
    if config.bgp is not None and topo is not None:
        sys.stdout.write(f"bgp: {len(topo.announcements)} announcements\n")
    if bgp is not None:
        sys.stdout.write(
            f"bgp: AS {bgp.asn}, {len(bgp.neighbours)} neighbours, hold {bgp.hold} s, "
            f"keepalive {bgp.keepalive} s, BFD "
            + (
                f"{bgp.bfd.interval * 1000:g} ms x {bgp.bfd.multiplier}"
                if bgp.bfd.enabled
                else "off"
            )
            + "\n"
        )
    for line in end_point_warnings(config):
        sys.stderr.write(f"warning: {line}\n")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_check(sub)
