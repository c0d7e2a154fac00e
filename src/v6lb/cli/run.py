"""`v6lb run FILE`: the load balancer on this host."""

from __future__ import annotations

import argparse
import sys

from v6lb.cli.common import add_plane_options
from v6lb.engines.planes import Role, names
from v6lb.errors import CommandLineError, V6lbError


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run the load balancer on this host (root): nat, npt, dsr-* and proxy-* VIPs",
        description="Check FILE and the host, install the instance's nftables, ip6tables and "
        "routes atomically, then probe the backends and keep the Maglev maps in line with their "
        "health. SIGHUP reloads FILE (a bad file changes nothing); SIGTERM/SIGINT remove what "
        "was installed and exit 0. proxy-* VIPs are served by the proxy engine (--proxy "
        f"{'|'.join(names(Role.PROXY))}, default builtin); one control socket answers `v6lb "
        "status` for all of them. Exit 2 when a check fails; nothing is installed.",
    )
    p.add_argument("file", metavar="FILE", help="the v6lb YAML config file")
    add_plane_options(p, dataplane_help="L3/L4 data plane")
    p.add_argument(
        "--trace",
        action="store_true",
        help="python data plane: log one line per packet decision (rate-limited)",
    )
    p.add_argument("--instance", metavar="NAME", help="override lb.instance (the ownership tag)")
    p.add_argument("--netns", metavar="NS", help="run inside this named network namespace")
    p.add_argument(
        "--control-socket", metavar="PATH", help="override lb.control_socket (AF_UNIX path)"
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="stderr log: text lines `v6lb run [<instance>]: ...` (default), or one JSON object"
        " per line (time, instance, level, message and the event's fields), also for the"
        " error that ends the process",
    )
    p.add_argument(
        "--drain-timeout",
        metavar="S",
        type=_seconds,
        default=0.0,
        help="SIGTERM/SIGINT stops gracefully: withdraw the BGP announcements first, then stop"
        " accepting new proxy connections, let the open ones finish, and remove the kernel"
        " state when nothing is in flight or after S seconds (default 0: at once;"
        " docs/operations.md)",
    )
    p.set_defaults(func=_cmd_run)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 3600")
    return value


def _cmd_run(args: argparse.Namespace) -> int:
    if args.log_format != "json":
        return _run(args)
    from v6lb.engines.daemon import log_record

    try:
        return _run(args)
    except V6lbError as exc:  # the one error line, as JSON too (main() would print text)
        message = exc.message if exc.fix else str(exc)
        record = log_record(
            args.instance, message, level="error", exit_code=exc.exit_code, fix=exc.fix or None
        )
        sys.stderr.write(record + "\n")
        return exc.exit_code


def _run(args: argparse.Namespace) -> int:
    import os

    from v6lb.engines.daemon import RunOptions, log_record, run_instance
    from v6lb.engines.limits import raise_nofile
    from v6lb.model.config import control_socket_problem

    if args.control_socket is not None:
        problem = control_socket_problem(args.control_socket, args.instance or "lb0")
        if problem is not None:
            raise CommandLineError(f"--control-socket: {problem[0]}; fix: {problem[1]}")
    # every engine: systemd's default soft limit of 1024 held 502 proxied connections
    before, after = raise_nofile()
    if after != before:
        text = f"descriptor limit (RLIMIT_NOFILE) raised from {before} to {after}"
        if args.log_format == "json":
            line = log_record(args.instance, text, nofile_before=before, nofile_after=after)
        else:
            line = f"v6lb run: {text}"
        sys.stderr.write(line + "\n")
    options = RunOptions(
        path=args.file,
        dataplane=args.dataplane,
        proxy=args.proxy,
        instance=args.instance,
        netns=args.netns,
        control_socket=args.control_socket,
        # docs/dataplane-python.md: V6LB_TRACE=1 in the environment does what --trace does
        trace=args.trace or os.environ.get("V6LB_TRACE", "") not in ("", "0"),
        log_format=args.log_format,
        drain_timeout=args.drain_timeout,
    )
    return run_instance(options)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_run(sub)
