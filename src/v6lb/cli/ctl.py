"""`v6lb ctl`: drain, undrain, enable, disable or re-weight a backend of a running instance."""

from __future__ import annotations

import argparse
import sys

from v6lb.errors import CommandLineError, UsageError


def _add_ctl(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ctl",
        help="drain|undrain|enable|disable|weight a backend of a running instance, at once",
        description="Change a backend of a running `v6lb run` over its control socket: "
        "drain (no new flows, existing ones stay), undrain, disable (no flows at all, as if "
        "down), enable, weight N (1-255). It takes effect at once, shows in `v6lb status`, "
        "and is applied again on top of the file at every reload (SIGHUP) until the file says "
        "the same; a restart forgets it. Only the instance's user (root) may change it.",
    )
    p.add_argument("action", choices=("drain", "undrain", "enable", "disable", "weight"))
    p.add_argument("vip", metavar="VIP", help="the VIP's name in the file")
    p.add_argument("backend", metavar="BACKEND", help="ADDRESS or [ADDRESS]:PORT")
    p.add_argument("weight", metavar="N", nargs="?", help="the weight (weight only): 1-255")
    p.add_argument("--file", metavar="FILE", help="config file naming the socket")
    p.add_argument("--control-socket", metavar="PATH", help="the instance's control socket")
    p.add_argument("--json", action="store_true", help="print the instance's JSON answer")
    p.set_defaults(func=_cmd_ctl)


def _weight(args: argparse.Namespace) -> int | None:
    from v6lb.engines.ctl import weight_problem

    if args.action != "weight":
        if args.weight is not None:
            raise CommandLineError(
                f"`v6lb ctl {args.action}` takes no N (only `v6lb ctl weight` does)"
            )
        return None
    if args.weight is None:
        raise CommandLineError("`v6lb ctl weight VIP BACKEND N` needs N: a weight from 1 to 255")
    try:
        n = int(args.weight)
    except ValueError:
        raise CommandLineError(f"weight {args.weight!r} is not an integer: give 1 to 255") from None
    problem = weight_problem(n)
    if problem is not None:
        raise CommandLineError(problem)
    return n


def _cmd_ctl(args: argparse.Namespace) -> int:
    import json

    from v6lb.engines.control import ControlError, query
    from v6lb.model.config import load_config

    weight = _weight(args)  # a wrong N fails here, before any socket
    path = args.control_socket
    if path is None and args.file is not None:
        path = load_config(args.file).lb.control_socket
    request = {"action": args.action, "vip": args.vip, "backend": args.backend}
    if weight is not None:
        request["weight"] = weight
    answer = query(path or "/run/v6lb/lb0.sock", "ctl", args=request)
    if "error" in answer:
        message = str(answer["error"])
        if answer.get("exit") == 2:
            raise UsageError(message)
        raise ControlError(message)
    if args.json:
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    else:
        state = [f"weight {answer.get('weight')}"]
        if answer.get("drain"):
            state.append("draining")
        if answer.get("enabled") is False:
            state.append("disabled")
        override = answer.get("override")
        sys.stdout.write(
            f"{answer.get('vip')} {answer.get('backend')}: {', '.join(state)};"
            f" {answer.get('applied')}"
            + (f"; override: {override}" if override else "; the file's values")
            + "\n"
        )
    if "warning" in answer:
        sys.stderr.write(f"v6lb: warning: {answer['warning']}\n")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_ctl(sub)
