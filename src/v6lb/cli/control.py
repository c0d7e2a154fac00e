"""`v6lb status` and `v6lb backend`: talk to a running instance, set up a DSR backend."""

from __future__ import annotations

import argparse
import sys

from v6lb.errors import CommandLineError


def _add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="ask a running `v6lb run` for its VIPs, backends, health and kernel objects",
        description="Connect to a running instance's control socket (--control-socket, or "
        "lb.control_socket of FILE, or /run/v6lb/lb0.sock) and print its VIPs, backends and "
        "their health, the kernel objects it installed and their packet counters.",
    )
    p.add_argument("file", metavar="FILE", nargs="?", help="config file naming the socket")
    p.add_argument("--control-socket", metavar="PATH", help="the instance's control socket")
    p.add_argument("--json", action="store_true", help="print the instance's JSON answer")
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from v6lb.engines.control import query
    from v6lb.model.config import load_config
    from v6lb.model.status import InstanceStatus
    from v6lb.render.status import status_text

    path = args.control_socket
    if path is None and args.file is not None:
        path = load_config(args.file).lb.control_socket
    st = query(path or "/run/v6lb/lb0.sock")  # no answer: a ControlError, exit 1
    if args.json:
        sys.stdout.write(json.dumps(st, indent=2) + "\n")
        return 0
    sys.stdout.write(status_text(InstanceStatus.from_dict(st)))
    return 0


def _add_backend(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "backend",
        help="set up (or --remove) a DSR backend host: VIP on lo, decap SID, advmss (root)",
        description="For the backend with --address in FILE: put each dsr-* VIP it serves on "
        "lo, add an End.DT6 decapsulation route that accepts only the LB's addresses (nft), and "
        "copy the default route(s) with the advmss the tunnel MTU requires. --remove deletes "
        "everything tagged with the file's instance.",
    )
    p.add_argument("file", metavar="FILE", help="the v6lb YAML config file")
    p.add_argument("--address", required=True, metavar="ADDR", help="this backend's address")
    p.add_argument("--dev", metavar="IF", help="interface the tunnelled packets arrive on")
    p.add_argument("--netns", metavar="NS", help="set up inside this named network namespace")
    p.add_argument("--remove", action="store_true", help="remove what a previous setup installed")
    p.set_defaults(func=_cmd_backend)


def _cmd_backend(args: argparse.Namespace) -> int:
    from ipaddress import AddressValueError, IPv6Address

    from v6lb.engines.kernel.backend import remove_backend, setup_backend
    from v6lb.engines.kernel.host import enter_netns
    from v6lb.model.config import load_config

    try:
        address = IPv6Address(args.address)
    except AddressValueError as exc:
        raise CommandLineError(
            f"--address {args.address!r} is not an IPv6 address: {exc}"
        ) from None
    config = load_config(args.file)
    if args.netns:
        enter_netns(args.netns)
    # a KernelError's exit code is v6lb.cli.exit_code's: 1 when the host refused the change
    done = (
        remove_backend(config)
        if args.remove
        else setup_backend(config, address, dev=args.dev, netns=args.netns)
    )
    verb = "removed" if args.remove else "installed"
    sys.stdout.write("".join(f"{verb}: {line}\n" for line in done) or f"{verb}: nothing\n")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_status(sub)
    _add_backend(sub)
