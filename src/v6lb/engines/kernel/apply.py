"""Load rendered text into the kernel, one subsystem at a time, each atomically.

* nftables: ``nft -f -`` is one transaction; a failing file changes nothing.
* ip6tables: ``ip6tables-save -c``, :func:`v6lb.render.ip6tables.splice`, then one
  ``ip6tables-restore -c`` of whole tables; on failure the saved text is restored.
* routes: the instance's tagged routes, rules, ``lo`` addresses and neighbour
  entries (the dsr-l2 probes' next hops) are removed,
  the batch is run with ``ip -6 -batch -`` (it stops at the first error); on
  failure they are removed again and the previous batch, if given, reloaded.

:func:`apply` chains the three and rolls the earlier ones back when a later one
fails. :func:`remove` deletes exactly what carries the instance's tag. Every
function takes ``netns``: run the tools inside that named network namespace
(``ip netns exec``), for the lab and the tests.

Errors are :class:`KernelError` subclasses whose text says what failed and
the command that fixes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import ClassVar, Final

from v6lb.core.backends import BackendPool
from v6lb.errors import EXIT_RUNTIME, UsageError
from v6lb.model.config import Config
from v6lb.render.ip6tables import (
    empty_tables,
    render_config_npt,
    splice,
    tagged_rules,
    tagged_tables,
)
from v6lb.render.nftables import (
    CONNTRACK_FULL,
    FORWARD_COUNTERS,
    NAT_UNSYNCED,
    L2Ports,
    render_nft,
    render_remove,
    table_name,
)
from v6lb.render.routes import (
    ROUTE_PROTO,
    TAG_SPAN,
    gateway_table,
    instance_tag,
    render_lb_routes,
)

APT_PACKAGES: Final = {
    "nft": "nftables",
    "ip": "iproute2",
    "ip6tables": "iptables",
    "ip6tables-save": "iptables",
    "ip6tables-restore": "iptables",
}
_TIMEOUT: Final = 60.0


class KernelError(UsageError, RuntimeError):
    """A kernel change could not be made; ``fix`` is what to do about it.

    A usage error (exit 2) by default: not root, a tool missing, a host that does not
    fit the file; nothing was changed. The kernel refusing a valid change is a runtime
    failure (exit 1): :class:`ApplyError`, :class:`MissingFeatureError`.
    """

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message, fix)

    def __str__(self) -> str:
        if "fix: " in self.message:  # one fix: a wrapped error keeps its own
            return self.message
        return f"{self.message}\n  fix: {self.fix}"


class NotRootError(KernelError):
    pass


class MissingToolError(KernelError):
    pass


class MissingFeatureError(KernelError):
    exit_code: ClassVar[int] = EXIT_RUNTIME


class ApplyError(KernelError):
    exit_code: ClassVar[int] = EXIT_RUNTIME


# --- preconditions -----------------------------------------------------------------


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError(
            "changing the kernel's nftables, ip6tables and routes needs root",
            "run it as root, for example: sudo v6lb run FILE",
        )


def require_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            package = APT_PACKAGES.get(tool, tool)
            raise MissingToolError(
                f"the program `{tool}` is not installed (or not on PATH)",
                f"apt-get install {package}",
            )


def run_tool(
    argv: Sequence[str], *, netns: str | None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    require_tools(argv[0])
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    return subprocess.run(
        full, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT, check=False
    )


def _last_lines(text: str, n: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _classify(tool: str, stderr: str) -> KernelError:
    """Turn a tool's complaint into an error that names the fix."""
    err = _last_lines(stderr)
    if "Operation not permitted" in stderr or "Permission denied" in stderr:
        return NotRootError(f"{tool} was refused: {err}", "run it as root")
    feature_hints = (
        ("Operation not supported", "the kernel lacks a feature the rules need"),
        ("not supported, missing kernel module", "the kernel lacks an ip6tables extension"),
        ("do you need to insmod", "the kernel lacks an ip6tables table"),
        ("Unknown device type", "the kernel lacks a device type"),
        (
            "Could not process rule: No such file or directory",
            "the kernel lacks an nft feature (or the ruleset names an object it lacks)",
        ),
    )
    for needle, what in feature_hints:
        if needle in stderr:
            return MissingFeatureError(
                f"{what} ({tool}: {err})",
                "load the module (modprobe nft_chain_nat nft_hash nft_fwd_netdev ip6t_NPT"
                " ip6table_raw ip6table_mangle), or use a kernel built with nf_tables NAT,"
                " nft jhash/fwd, ip6t_NPT and CONFIG_IPV6_SEG6_LWTUNNEL",
            )
    return ApplyError(
        f"{tool} rejected the change, nothing of it was kept: {err}",
        "check the file with `v6lb check`; if it passes, report this as a v6lb bug",
    )


# --- nftables ----------------------------------------------------------------------


def apply_nft(text: str, *, netns: str | None = None) -> None:
    """Load an ``nft -f`` file as one transaction (all or nothing)."""
    r = run_tool(["nft", "-f", "-"], netns=netns, stdin=text)
    if r.returncode != 0:
        raise _classify("nft", r.stderr)


def nft_tables(instance: str, *, netns: str | None = None) -> list[str]:
    """``family name`` of each nft table the instance owns right now (every one has chains).

    Read from ``nft -t list chains`` (a few ms): ``nft list tables`` fills nft's whole
    cache, set elements included, and takes 9 s here with four 65537-slot maps loaded
    (measured on the 2-core lab VM under load); that made a stop take seconds.
    """
    r = run_tool(["nft", "-t", "list", "chains"], netns=netns)
    if r.returncode != 0:
        raise _classify("nft", r.stderr)
    name = table_name(instance)
    return [
        f"{m.group(1)} {name}"
        for m in re.finditer(r"^table (\S+) (\S+) \{", r.stdout, re.MULTILINE)
        if m.group(2) == name
    ]


def nft_counters(instance: str, *, netns: str | None = None) -> dict[str, tuple[int, int]]:
    """Named counters of the instance's tables: name -> (packets, bytes)."""
    r = run_tool(["nft", "-j", "list", "counters"], netns=netns)
    if r.returncode != 0:
        raise _classify("nft", r.stderr)
    name = table_name(instance)
    out: dict[str, tuple[int, int]] = {}
    for item in json.loads(r.stdout or '{"nftables": []}')["nftables"]:
        c = item.get("counter")
        if c and c["table"] == name:
            # the same name in the ip6 and netdev tables (the python plane's rings): summed
            p, b = out.get(c["name"], (0, 0))
            out[c["name"]] = (p + int(c["packets"]), b + int(c["bytes"]))
    return out


CtKey = tuple[str, IPv6Address, int, IPv6Address | None, int | None]
"""A nat flow's (protocol, VIP address, VIP port, backend address, backend port)."""

# the original tuple's destination port, then the reply tuple's source and source port
_CT_TUPLES: Final = re.compile(r" dport=(\d+) (?:\S+ )*?src=(\S+) dst=\S+ sport=(\d+)")


@dataclass(frozen=True, slots=True)
class CtFlows:
    """The live conntrack entries of the nat VIP addresses: how many, and by :data:`CtKey`
    (TCP and UDP only: an ICMPv6 echo entry counts in ``total`` alone)."""

    total: int
    by_key: dict[CtKey, int]


def conntrack_flows(
    addresses: Sequence[IPv6Address], *, netns: str | None = None, tcp_state: str | None = None
) -> CtFlows | None:
    """Live conntrack entries whose original destination is one of ``addresses``.

    What the ``ct count`` of ``lb.conntrack_max`` counts: TIME_WAIT and CLOSE
    entries are left out, as nf_conncount does. ``tcp_state`` (``ESTABLISHED``...):
    only TCP entries in that state. None without the ``conntrack`` tool (apt-get
    install conntrack) or when it fails.
    """
    if not addresses or shutil.which("conntrack") is None:
        return None
    total = 0
    raw: dict[tuple[str, IPv6Address, str, str, str], int] = {}
    only = ["-p", "tcp", "--state", tcp_state] if tcp_state else []
    for address in addresses:
        argv = ["conntrack", "-L", "-f", "ipv6", *only, "--orig-dst", str(address)]
        r = run_tool(argv, netns=netns)
        if r.returncode != 0:
            return None
        for line in r.stdout.splitlines():
            if not line or line.startswith("conntrack") or " TIME_WAIT " in line:
                continue
            if " CLOSE " in line:
                continue
            total += 1
            m = _CT_TUPLES.search(line)
            if m is not None:
                vport, backend, bport = m.groups()
                key = (line.split(None, 1)[0], address, vport, backend, bport)
                raw[key] = raw.get(key, 0) + 1
    by_key: dict[CtKey, int] = {}
    for (proto, address, vport, backend, bport), n in raw.items():
        try:
            baddr: IPv6Address | None = IPv6Address(backend)
        except ValueError:
            baddr = None
        key = (proto, address, int(vport), baddr, int(bport))
        by_key[key] = by_key.get(key, 0) + n
    return CtFlows(total, by_key)


def limits_status(
    config: Config,
    counters: Mapping[str, tuple[int, int]],
    *,
    count: int | None,
) -> dict[str, object]:
    """The ``forward`` and ``conntrack`` blocks of ``v6lb status``, the same for both planes.

    ``counters``: the instance's named nft counters (name -> packets, bytes);
    ``count``: the live nat flows (None when unknown). ``conntrack_full`` is
    the new flows dropped at ``lb.conntrack_max`` (the kernel's named counter,
    or the core's ``conntrack-full`` drops); with ``lb.conntrack_sync``,
    ``nat_unsynced`` the first mid-stream packets of untracked nat flows dropped
    (docs/anycast.md).
    """
    forward = {name: counters.get(name, (0, 0))[0] for name in FORWARD_COUNTERS}
    conntrack: dict[str, object] = {
        "conntrack_max": config.lb.conntrack_max,
        "conntrack": count,
        "conntrack_full": counters.get(CONNTRACK_FULL, (0, 0))[0],
    }
    if config.lb.conntrack_sync is not None:
        conntrack["nat_unsynced"] = counters.get(NAT_UNSYNCED, (0, 0))[0]
    return {"forward": forward, "conntrack": conntrack}


# --- ip6tables ---------------------------------------------------------------------


def _ip6tables_save(netns: str | None) -> str:
    r = run_tool(["ip6tables-save", "-c"], netns=netns)
    if r.returncode != 0:
        raise _classify("ip6tables-save", r.stderr)
    return r.stdout


def apply_ip6tables(rules: str, instance: str, *, netns: str | None = None) -> None:
    """Replace the instance's ip6tables rules by ``rules`` (``render_npt`` text, or "")."""
    saved = _ip6tables_save(netns)
    if not rules.strip() and not tagged_rules(saved, instance):
        return  # nothing of ours before or after: leave the tables alone
    new = splice(saved, instance, rules)
    r = run_tool(["ip6tables-restore", "-c"], netns=netns, stdin=new)
    if r.returncode == 0:
        return
    error = _classify("ip6tables-restore", r.stderr)
    if saved.strip():
        back = run_tool(["ip6tables-restore", "-c"], netns=netns, stdin=saved)
        if back.returncode != 0:
            raise ApplyError(
                f"{error.message}; restoring the saved rules failed too: {_last_lines(back.stderr)}",
                "inspect `ip6tables-save`; remove v6lb's rules with `v6lb run` stopped",
            ) from error
    raise error


# --- routes ------------------------------------------------------------------------


def in_instance_block(table: object, instance: str) -> bool:
    base = instance_tag(instance)
    return isinstance(table, str) and table.isdigit() and base <= int(table) < base + TAG_SPAN


def nft_json(r: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    # Duplicate keys happen (a seg6local route's "table" twice); json keeps the last,
    # which is the route's own table.
    data = json.loads(r.stdout or "[]")
    return data if isinstance(data, list) else []


def neighbour_macs(wanted: set[str], *, netns: str | None = None) -> dict[str, bytes]:
    """The neighbour table's MACs of the ``wanted`` IPv6 addresses (entries not FAILED)."""
    macs: dict[str, bytes] = {}
    for entry in nft_json(run_tool(["ip", "-6", "-j", "neigh", "show"], netns=netns)):
        dst, lladdr = str(entry.get("dst", "")), str(entry.get("lladdr") or "")
        state = entry.get("state")
        if lladdr and dst in wanted and not (isinstance(state, list) and "FAILED" in state):
            macs[dst] = bytes.fromhex(lladdr.replace(":", ""))
    return macs


def _route_cleanup(instance: str, netns: str | None) -> list[str]:
    """Batch lines that delete the instance's rules, tables, lo addresses and neighbours."""
    lines: list[str] = []
    rules = nft_json(run_tool(["ip", "-6", "-j", "rule", "show"], netns=netns))
    for rule in rules:
        if str(rule.get("protocol")) in ("118", hex(ROUTE_PROTO)) and in_instance_block(
            rule.get("table"), instance
        ):
            lines.append(f"rule del pref {rule['priority']} table {rule['table']}")
    routes = nft_json(
        run_tool(["ip", "-6", "-j", "route", "show", "table", "all", "proto", "0x76"], netns=netns)
    )
    for table in dict.fromkeys(str(route.get("table")) for route in routes):
        if in_instance_block(table, instance):
            lines.append(f"route flush table {table}")
    links = nft_json(run_tool(["ip", "-6", "-j", "address", "show", "dev", "lo"], netns=netns))
    tag = instance_tag(instance)
    for link in links:
        infos = link.get("addr_info")
        for info in infos if isinstance(infos, list) else []:
            if info.get("metric") == tag:
                lines.append(f"address del {info['local']}/{info['prefixlen']} dev lo")
    # the dsr-l2 probes' made-up next hops: proto 0x76, the address ends in a table number
    for entry in nft_json(run_tool(["ip", "-6", "-j", "neigh", "show"], netns=netns)):
        if str(entry.get("protocol")) not in ("118", hex(ROUTE_PROTO)):
            continue
        try:
            number = gateway_table(IPv6Address(str(entry.get("dst"))))
        except ValueError:
            continue
        if number is not None and in_instance_block(str(number), instance):
            lines.append(f"neigh del {entry['dst']} dev {entry['dev']}")
    return lines


def _batch(text: str, netns: str | None) -> subprocess.CompletedProcess[str]:
    return run_tool(["ip", "-6", "-batch", "-"], netns=netns, stdin=text)


def remove_routes(instance: str, *, netns: str | None = None) -> list[str]:
    lines = _route_cleanup(instance, netns)
    if lines:
        r = _batch("\n".join(lines) + "\n", netns)
        if r.returncode != 0:
            raise _classify("ip", r.stderr)
    return lines


_RULE_ADD = re.compile(r"^rule add .* lookup (\d+) pref (\d+) ")


def refresh_routes(batch: str, instance: str, *, netns: str | None = None) -> None:
    """Load ``batch`` again over the instance's routes, without removing them first.

    For a reload that renders the same routes: :func:`apply_routes` removes everything
    and loads it again, and for that moment a VIP's packets find no tunnel route (a
    client's SYN then got an ICMPv6 error in the graceful-stop lab). Every line of the
    batch but ``rule add`` replaces in place (``route replace``, ``neigh replace``,
    ``address replace``, ``sr tunsrc set``); a rule the kernel already has (same table
    and preference) is left out, a missing one is added. So what someone deleted by
    hand comes back, and nothing is ever missing.
    """
    have = {
        (str(r.get("table")), str(r.get("priority")))
        for r in nft_json(run_tool(["ip", "-6", "-j", "rule", "show"], netns=netns))
        if str(r.get("protocol")) in ("118", hex(ROUTE_PROTO))
        and in_instance_block(r.get("table"), instance)
    }
    lines = []
    for line in batch.splitlines():
        m = _RULE_ADD.match(line)
        if m is None or (m.group(1), m.group(2)) not in have:
            lines.append(line)
    r = _batch("\n".join(lines) + "\n", netns)
    if r.returncode != 0:
        raise _classify("ip", r.stderr)


def apply_routes(
    batch: str, instance: str, *, netns: str | None = None, previous: str | None = None
) -> None:
    """Replace the instance's routes, rules and lo addresses by ``batch``.

    On failure the instance's state is removed again and ``previous`` (the
    batch that was loaded before) is loaded back.
    """
    remove_routes(instance, netns=netns)
    if not batch.strip():
        return
    r = _batch(batch, netns)
    if r.returncode == 0:
        return
    error = _classify("ip", r.stderr)
    remove_routes(instance, netns=netns)
    if previous:
        back = _batch(previous, netns)
        if back.returncode != 0:
            raise ApplyError(
                f"{error.message}; reloading the previous routes failed too: {_last_lines(back.stderr)}",
                f"remove v6lb's routes (proto {ROUTE_PROTO:#x}) and start again",
            ) from error
    raise error


# --- everything --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rendered:
    """What one instance puts in the kernel, as text: nft file, ip6tables-restore text, ip batch."""

    nft: str = ""
    ip6tables: str = ""
    routes: str = ""


def render_lb(
    config: Config,
    *,
    pools: Mapping[str, BackendPool] | None = None,
    l2: L2Ports | None = None,
    backend_macs: Mapping[IPv6Address, str] | None = None,
    dev: str | None = None,
) -> Rendered:
    """Render the LB's kernel state for ``config`` (pure; nothing is applied)."""
    return Rendered(
        nft=render_nft(config, pools=pools, l2=l2, backend_macs=backend_macs),
        ip6tables=render_config_npt(config),
        routes=render_lb_routes(config, dev=dev, l2_dev=l2.egress if l2 is not None else None),
    )


def apply(
    new: Rendered,
    instance: str,
    *,
    previous: Rendered | None = None,
    netns: str | None = None,
    keep_nft: bool = False,
) -> None:
    """Apply nft, then ip6tables, then routes; if one fails, put the earlier ones back.

    ``previous`` is what was applied before; None means nothing was, so a
    failure removes everything of the instance. ``keep_nft``: the kernel's nft tables
    already hold ``new.nft`` (a reload that changes nothing there): they are left as
    they are, with their counters and dynamic sets.
    """
    require_root()
    if not keep_nft:
        apply_nft(new.nft or render_remove(instance), netns=netns)
    try:
        apply_ip6tables(new.ip6tables, instance, netns=netns)
        try:
            if previous is not None and previous.routes == new.routes and new.routes.strip():
                refresh_routes(new.routes, instance, netns=netns)
            else:
                apply_routes(
                    new.routes,
                    instance,
                    netns=netns,
                    previous=previous.routes if previous else None,
                )
        except KernelError:
            if previous is not None:
                apply_ip6tables(previous.ip6tables, instance, netns=netns)
            raise
    except KernelError:
        if previous is None:
            remove(instance, netns=netns)
        elif not keep_nft:
            apply_nft(previous.nft or render_remove(instance), netns=netns)
        raise


def _remove_ip6tables(instance: str, netns: str | None) -> list[str]:
    if shutil.which("ip6tables-save") is None:
        return []
    saved = _ip6tables_save(netns)
    tagged = tagged_rules(saved, instance)
    if not tagged:
        return []
    apply_ip6tables("", instance, netns=netns)
    removed = [f"ip6tables {line}" for line in tagged]
    # ip6tables-nft leaves the emptied tables behind as nft tables: delete the ones
    # that held our rules and now do nothing at all (legacy tables cannot be deleted).
    if "nf_tables" in run_tool(["ip6tables", "-V"], netns=netns).stdout:
        ours = set(tagged_tables(saved, instance))
        for table in empty_tables(_ip6tables_save(netns)):
            if table in ours:
                apply_nft(f"delete table ip6 {table}\n", netns=netns)
                removed.append(f"nft table ip6 {table} (emptied)")
    return removed


def leftovers(instance: str, *, netns: str | None = None) -> list[str]:
    """What carries the instance's tag in the kernel now, before it installs anything.

    Non-empty at start means an earlier run of the instance was not stopped cleanly
    (SIGKILL, a crash, a reboot-less restart by systemd's ``Restart=on-failure``):
    :func:`apply` replaces all of it (nft in the same transaction, the tagged
    ip6tables rules in the same restore, the tagged routes first), so one copy stays.
    """
    found = [f"nft table {t}" for t in nft_tables(instance, netns=netns)]
    if shutil.which("ip6tables-save") is not None:
        rules = tagged_rules(_ip6tables_save(netns), instance)
        if rules:
            found.append(f"{len(rules)} ip6tables rule(s)")
    lines = _route_cleanup(instance, netns)
    for kind, what in (("rule del", "ip rule(s)"), ("route flush", "route table(s)")):
        n = sum(line.startswith(kind) for line in lines)
        if n:
            found.append(f"{n} {what}")
    n = sum(line.startswith("address del") for line in lines)
    if n:
        found.append(f"{n} lo address(es)")
    n = sum(line.startswith("neigh del") for line in lines)
    if n:
        found.append(f"{n} neighbour entr(y/ies) (dsr-l2 probe next hops)")
    return found


def remove(instance: str, *, netns: str | None = None) -> list[str]:
    """Delete everything tagged with ``instance``; return what was removed, for the log."""
    require_root()
    removed = [f"nft table {t}" for t in nft_tables(instance, netns=netns)]
    apply_nft(render_remove(instance), netns=netns)
    removed += _remove_ip6tables(instance, netns)
    removed += remove_routes(instance, netns=netns)
    return removed
