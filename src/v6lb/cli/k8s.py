"""`v6lb k8s ...`: Kubernetes manifests (files or stdin) in; an explanation or a config out.

``v6lb k8s config FILE... | -`` reads what ``kubectl get svc,ingress,endpointslices -A -o
yaml`` prints and writes a v6lb config that serves the same Services; ``v6lb k8s explain``
says what the AWS load balancer does with them, and shows it in the simulator
(docs/kubernetes.md).
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


def _add_explain(ksub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = ksub.add_parser(
        "explain",
        help="what the AWS load balancer does with a client's IPv6 packet, per Service and"
        " Ingress, shown hop by hop in the simulator",
        description="Read Kubernetes manifests (files, or - for stdin, as `kubectl get "
        "svc,ingress,endpointslices -A -o yaml` prints them). For every port of each "
        "LoadBalancer Service and every backend of each ALB Ingress: the AWS load balancer "
        "its annotations make (each setting with the annotation or default that decides "
        "it, and its source), the five answers of `v6lb explain` as AWS documents them, "
        "then the v6lb mode that keeps the same property run in the simulator on a topology "
        "made from the manifests (client, internet gateway, the LB in a public subnet, the "
        "nodes and the pods at their real addresses): its hop table and answers. Then the "
        "pitfalls found, each naming the object, the field and the fix. Exit 0 (warnings "
        "on stderr), or 2 naming the object and field.",
    )
    p.add_argument("files", metavar="FILE", nargs="+", help="manifest files, or - for stdin")
    p.add_argument(
        "--only",
        metavar="NS/NAME",
        action="append",
        default=[],
        help="explain only this Service or Ingress (repeat for more)",
    )
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.add_argument(
        "--all-hops",
        action="store_true",
        help="show every packet (default: the first packet of each leg in each direction)",
    )
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    import json

    from v6lb.cli.k8s_tables import print_k8s_explain
    from v6lb.engines.sim.runs import explain_run
    from v6lb.k8s.derive import derive_config
    from v6lb.k8s.explain import plan_dict, plan_explain
    from v6lb.model.config import parse_config

    manifests = read_manifests(args.files)
    derived = derive_config(manifests, allow_empty=True, with_pitfalls=False)
    plan = plan_explain(manifests, derived, args.only)
    if args.only and not plan.exposures:
        known = {e.origin.split()[1] for e in plan_explain(manifests, derived).exposures}
        raise UsageError(
            f"--only {', '.join(args.only)}: no LoadBalancer Service or ALB Ingress of that name",
            "name one of: " + (", ".join(sorted(known)) or "(none in the input)"),
        )
    if derived.topology_nodes > CHECK_TOPOLOGY_NODES:
        raise UsageError(
            f"the cluster makes a topology of {derived.topology_nodes} nodes; the simulator"
            f" runs at most {CHECK_TOPOLOGY_NODES}",
            "give the manifests of fewer Services (and their EndpointSlices)",
        )
    runs = []
    for e in plan.exposures:
        exp = None
        if e.data is not None and e.mode is not None:
            config = parse_config(e.data, f"{e.vip} (derived)")
            assert config.topology is not None
            exp = explain_run(config, config.topology, e.mode)[0]
        runs.append((e, exp))
    for n in derived.notes:
        sys.stderr.write(f"note: {n}\n")
    for w in derived.warnings:
        sys.stderr.write(f"warning: {w}\n")
    if args.json:
        out = plan_dict(plan, [exp.to_dict() if exp else None for _, exp in runs])
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
    else:
        print_k8s_explain(runs, plan.other_pitfalls, compact=not args.all_hops)
    return 0


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
        help="Kubernetes manifests in: what the AWS load balancer does, and a v6lb config",
        description="Work on Kubernetes manifests (files or stdin; no API server).",
    )
    ksub = p.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")
    _add_config(ksub)
    _add_explain(ksub)
