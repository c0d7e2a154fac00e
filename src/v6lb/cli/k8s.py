"""`v6lb k8s ...`: Kubernetes manifests (files or stdin) in; a v6lb config out.

``v6lb k8s config FILE... | -`` reads what ``kubectl get svc,ingress,endpointslices -A -o
yaml`` prints and writes a v6lb config that serves the same Services (README.md).
This module reads the files and stdin and writes the output; :mod:`v6lb.k8s` is pure.
"""

from __future__ import annotations

import argparse
import sys
from ipaddress import IPv6Address
from pathlib import Path
from typing import TYPE_CHECKING, Final

from v6lb.errors import CommandLineError, UsageError

if TYPE_CHECKING:
    from v6lb.k8s.manifests import Manifests

__all__ = ["add_parsers", "read_manifests"]

# the input limit: kubectl's output for a large cluster is tens of megabytes
MAX_INPUT_BYTES: Final = 256 * 1024 * 1024
# The topology is checked here up to the lab's size (250 nodes); a larger one (a pod per
# node: thousands) is written unchecked, with a warning: its check walks every VIP's path.
CHECK_TOPOLOGY_NODES: Final = 250


def _add_config(ksub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = ksub.add_parser(
        "config",
        help="write a v6lb config that serves the same Services as the manifests",
        description="Read Kubernetes manifests (Services, EndpointSlices, Ingresses, Pods, "
        "Deployments: files, or - for stdin, as `kubectl get ... -o yaml` prints them) and "
        "write a v6lb config: a VIP per port of each LoadBalancer Service and per backend of "
        "each ALB Ingress, backends from the ready IPv6 endpoints (terminating ones drain), "
        "the mode that keeps what the AWS load balancer gave, and a topology for `v6lb lab "
        "up`. Exit 0 (warnings on stderr), or 2 naming the object and field.",
    )
    p.add_argument("files", metavar="FILE", nargs="+", help="manifest files, or - for stdin")
    p.add_argument("-o", "--output", metavar="OUT", help="write here (default: stdout)")
    p.add_argument(
        "--vip",
        metavar="NS/NAME=ADDR",
        action="append",
        default=[],
        help="the VIP address of Service or Ingress NS/NAME (NS/INGRESS/SERVICE for one "
        "backend of an Ingress); default: its status IPv6 address, else one of "
        "2001:db8:a:100::/64",
    )
    p.add_argument(
        "--prefer",
        choices=("dsr",),
        help="dsr: dsr-ip6ip6 instead of nat where the pod sees the client and no port is "
        "rewritten",
    )
    p.set_defaults(func=_cmd_config)


# `v6lb k8s explain` goes here: an _add_explain(ksub) next to _add_config(ksub).


def read_manifests(files: list[str]) -> Manifests:
    """Read every FILE (``-``: stdin, once) and parse the manifests."""
    from v6lb.k8s.manifests import load_manifests

    texts: list[tuple[str, str]] = []
    for name in files:
        if name == "-":
            if any(src == "<stdin>" for src, _ in texts):
                raise CommandLineError("- (stdin) is given twice; give it once")
            data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
            source = "<stdin>"
        else:
            try:
                with open(name, "rb") as fh:
                    data = fh.read(MAX_INPUT_BYTES + 1)
            except OSError as exc:
                raise UsageError(
                    f"{name}: cannot read: {exc.strerror or exc}",
                    "check the file name, or give - to read stdin",
                ) from None
            source = name
        if len(data) > MAX_INPUT_BYTES:
            raise UsageError(
                f"{source}: more than {MAX_INPUT_BYTES} bytes", "split the manifests in files"
            )
        try:
            texts.append((source, data.decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"{source}: not UTF-8 text ({exc.reason})", "give YAML manifests as UTF-8"
            ) from None
    return load_manifests(texts)


def _overrides(items: list[str]) -> dict[str, IPv6Address]:
    out: dict[str, IPv6Address] = {}
    for item in items:
        key, eq, addr = item.partition("=")
        parts = key.split("/")
        if not eq or len(parts) not in (2, 3) or not all(parts):
            raise CommandLineError(
                f"--vip {item!r}: write NAMESPACE/NAME=ADDRESS, e.g. default/web=2001:db8:a:100::80"
            )
        try:
            address = IPv6Address(addr.strip("[]"))
        except ValueError:
            raise CommandLineError(f"--vip {item!r}: {addr!r} is not an IPv6 address") from None
        if key in out:
            raise CommandLineError(f"--vip {key} is given twice; give it once")
        out[key] = address
    return out


def _cmd_config(args: argparse.Namespace) -> int:
    from v6lb.k8s.derive import derive_config
    from v6lb.k8s.emit import to_yaml
    from v6lb.model.config import parse_config
    from v6lb.model.schema import ConfigError

    overrides = _overrides(args.vip)
    manifests = read_manifests(args.files)
    derived = derive_config(manifests, vips=overrides, prefer=args.prefer)
    out = args.output or "<stdout>"
    data = derived.data
    if derived.topology_nodes > CHECK_TOPOLOGY_NODES:
        data = {k: v for k, v in data.items() if k != "topology"}
        sys.stderr.write(
            f"warning: the topology has {derived.topology_nodes} nodes: written, not checked"
            f" (the lab runs at most {CHECK_TOPOLOGY_NODES}); the VIPs are checked\n"
        )
    try:  # the file must pass `v6lb check`: a failure here is v6lb's bug, said so
        parse_config(data, out)
    except ConfigError as exc:
        raise UsageError(
            f"the derived config does not pass its own check: {exc}",
            "change the manifests or --vip as the message says; if it names no input, report"
            " it as a v6lb bug",
        ) from None
    text = to_yaml(derived, ["stdin" if f == "-" else f for f in args.files])
    for n in derived.notes:
        sys.stderr.write(f"note: {n}\n")
    for w in derived.warnings:
        sys.stderr.write(f"warning: {w}\n")
    if args.output:
        try:
            Path(args.output).write_text(text)
        except OSError as exc:
            raise UsageError(
                f"{args.output}: cannot write: {exc.strerror or exc}", "give a writable path"
            ) from None
        vips = derived.data["vips"]
        assert isinstance(vips, list)
        sys.stderr.write(
            f"wrote {args.output}: {len(vips)} VIPs, {derived.topology_nodes} topology nodes\n"
        )
    else:
        sys.stdout.write(text)
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "k8s",
        help="Kubernetes manifests in: a v6lb config out",
        description="Work on Kubernetes manifests (files or stdin; no API server).",
    )
    ksub = p.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")
    _add_config(ksub)
