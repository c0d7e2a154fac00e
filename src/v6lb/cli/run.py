"""`v6lb run FILE`: the load balancer on this host."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from v6lb.errors import UsageError

if TYPE_CHECKING:
    from v6lb.model.config import Config


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run the load balancer on this host (root): nat, npt, dsr-* and proxy-* VIPs",
        description="Check FILE and the host, install the instance's nftables, ip6tables and "
        "routes atomically, then probe the backends and keep the Maglev maps in line with their "
        "health. SIGHUP reloads FILE (a bad file changes nothing); SIGTERM/SIGINT remove what "
        "was installed and exit 0. proxy-* VIPs are served by the proxy engine (--proxy "
        "builtin|haproxy, default builtin); one control socket answers `v6lb status` for all of "
        "them. Exit 2 when a check fails; nothing is installed.",
    )
    p.add_argument("file", metavar="FILE", help="the v6lb YAML config file")
    p.add_argument(
        "--dataplane",
        choices=["kernel", "python"],
        default="kernel",
        help="L3/L4 data plane: kernel (nftables/ip6tables/seg6, the default) or python "
        "(the v6lb core on TUN devices: npt, nat, dsr-ip6ip6, dsr-srv6)",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="python data plane: log one line per packet decision (rate-limited)",
    )
    p.add_argument(
        "--proxy",
        choices=["builtin", "haproxy"],
        default=None,
        help="proxy engine for proxy-l4/proxy-l7 VIPs: builtin (asyncio, the default) or haproxy",
    )
    p.add_argument("--instance", metavar="NAME", help="override lb.instance (the ownership tag)")
    p.add_argument("--netns", metavar="NS", help="run inside this named network namespace")
    p.add_argument(
        "--control-socket", metavar="PATH", help="override lb.control_socket (AF_UNIX path)"
    )
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from v6lb.engines.limits import raise_nofile
    from v6lb.model.config import ConfigError, control_socket_problem, load_config

    if args.control_socket is not None:
        problem = control_socket_problem(args.control_socket, args.instance or "lb0")
        if problem is not None:
            raise UsageError(f"--control-socket: {problem[0]}; fix: {problem[1]}")
    # every engine: systemd's default soft limit of 1024 held 502 proxied connections
    before, after = raise_nofile()
    if after != before:
        sys.stderr.write(
            f"v6lb run: descriptor limit (RLIMIT_NOFILE) raised from {before} to {after}\n"
        )
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        raise UsageError(f"{exc}; `v6lb check {args.file}` shows every problem") from None
    has_proxy = any(v.mode.is_proxy for v in config.vips)
    has_l3 = bool(config.npt) or any(not v.mode.is_proxy for v in config.vips)
    if args.proxy is not None and not has_proxy:
        raise UsageError(
            f"--proxy {args.proxy} needs a proxy-l4 or proxy-l7 VIP, and {args.file} has none; "
            "--proxy chooses the proxy engine, --dataplane the L3/L4 data plane"
        )
    if not has_proxy:
        return _run_l3(args)
    return _run_with_proxies(args, config, has_l3)


def _run_with_proxies(args: argparse.Namespace, config: Config, has_l3: bool) -> int:
    """Serve the proxy VIPs (builtin or haproxy), alongside the L3/L4 data plane if any.

    One control socket answers for the whole instance: the L3/L4 data plane's
    when there is one (the proxy VIPs are added to its status answer as the
    ``proxy`` section), else the proxy engine's own (docs/run.md).
    """
    import dataclasses
    import signal
    import threading

    from v6lb.engines.control import ControlError
    from v6lb.engines.kernel import KernelError
    from v6lb.engines.kernel.host import enter_netns
    from v6lb.engines.proxy.run import run_proxies

    stop = threading.Event()
    engine = args.proxy or "builtin"
    failure: list[BaseException] = []
    if args.netns:
        # setns(2) is per thread: enter before the proxy thread starts, so both the
        # proxy and the L3/L4 data plane live in the namespace.
        try:
            enter_netns(args.netns)
        except KernelError as exc:
            raise UsageError(str(exc)) from None
    from v6lb.engines.kernel.host import host_links

    here = host_links().addresses
    for vip in config.vips:
        if vip.mode.is_proxy and vip.address not in here:
            raise UsageError(
                f"{args.file}: vips.{vip.name}.address: {vip.address} is not assigned to any "
                "interface of this host, so the proxy cannot receive its traffic; fix: add it "
                f"(ip -6 address add {vip.address}/128 dev lo) or fix the address"
            )
    lb = config.lb
    if args.instance is not None:  # as `run --dataplane kernel` applies them
        if lb.control_socket == f"/run/v6lb/{lb.instance}.sock":
            lb = dataclasses.replace(lb, control_socket=f"/run/v6lb/{args.instance}.sock")
        lb = dataclasses.replace(lb, instance=args.instance)
    if args.control_socket is not None:
        lb = dataclasses.replace(lb, control_socket=args.control_socket)
    config = dataclasses.replace(config, lb=lb)

    def proxies() -> None:
        try:
            run_proxies(
                config,
                engine=engine,
                stop=stop,
                file=args.file,
                netns=args.netns,
                own_control=not has_l3,
            )
        except ControlError as exc:
            failure.append(UsageError(str(exc)))
            stop.set()
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
            stop.set()

    if not has_l3:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        proxies()
        if failure:
            if isinstance(failure[0], UsageError):
                raise failure[0]
            raise UsageError(f"proxy engine {engine}: {failure[0]}")
        return 0
    thread = threading.Thread(target=proxies, name="v6lb-proxy", daemon=True)
    thread.start()
    try:
        code = _run_l3(args)
    finally:
        stop.set()
        thread.join(10)
    if failure:
        raise UsageError(f"proxy engine {engine}: {failure[0]}")
    return code


def _run_l3(args: argparse.Namespace) -> int:
    from v6lb.engines.control import ControlError
    from v6lb.engines.kernel import ApplyError, KernelError, MissingFeatureError
    from v6lb.engines.kernel.run import Runner, prepare

    if args.trace:
        import os

        os.environ["V6LB_TRACE"] = "1"  # read by the python data plane
    try:
        prepared = prepare(
            args.file,
            dataplane=args.dataplane,
            instance=args.instance,
            netns=args.netns,
            control_socket=args.control_socket,
        )
        runner = Runner(
            prepared,
            args.file,
            netns=args.netns,
            overrides={"instance": args.instance, "control_socket": args.control_socket},
        )
        runner.install()
    except (ApplyError, MissingFeatureError) as exc:
        sys.stderr.write(f"v6lb: error: {exc}\n")
        return 1
    except KernelError as exc:
        raise UsageError(str(exc)) from None
    except ControlError as exc:
        raise UsageError(str(exc)) from None
    return runner.serve()


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_run(sub)
