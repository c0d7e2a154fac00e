"""``ip6tables-restore`` text for ``npt`` (RFC 6296 through ip6tables' SNPT/DNPT targets).

Pure: prefix pairs in, text out, plus :func:`splice`, which edits the text of
``ip6tables-save`` so that a whole-table restore replaces the instance's rules
and keeps everybody else's (the engine's atomic apply and remove).

nft 1.0.6 has no NPT statement, so NPT goes through the ``mangle`` table::

    -A PREROUTING  -i OUT -d OUTSIDE           -j DNPT --src-pfx OUTSIDE --dst-pfx INSIDE
    -A POSTROUTING -o OUT -s INSIDE ! -d INSIDE -j SNPT --src-pfx INSIDE  --dst-pfx OUTSIDE

(``OUT``: the outside interface, ``lb.interfaces[0]``, when the file lists two or more),
so the LB's own traffic to inside hosts (a proxy's connections, tunnels, probes) keeps
its inside source;

and, as iptables-extensions(8) requires for the translated flows, ``raw``
NOTRACK rules for both directions (``-j CT --notrack``), so conntrack (and a
``nat`` VIP's NAT on the same box) never sees them. Every rule carries
``-m comment --comment v6lb:<instance>``.

The kernel's ip6t_NPT translates a /48's subnet 0xFFFF, which RFC 6296 §3.2
forbids and the Python translator refuses; the rules cannot express that
exception. Outside prefixes must be routed to the translator (or answered by
``proxy_ndp``): that is the network's job, not these rules' (with ``bgp:``, the kernel
plane's speaker announces them: :func:`v6lb.engines.announce.npt_prefixes`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv6Address

from v6lb.model.config import Config, NptPair, VipMode

__all__ = [
    "comment_tag",
    "empty_tables",
    "is_tagged",
    "nat_replies",
    "npt_outside_interfaces",
    "render_config_npt",
    "render_npt",
    "splice",
    "tagged_rules",
    "tagged_tables",
]


def comment_tag(instance: str) -> str:
    return f"v6lb:{instance}"


def npt_outside_interfaces(config: Config) -> tuple[str, ...]:
    """The LB's outside interfaces, where NPT applies: ``lb.interfaces[0]`` of two or more.

    ``lb.interfaces`` is ``[outside (ingress), inside (egress), ...]``; with none or one
    (one-armed) the interfaces cannot tell the sides apart, and the rules use the
    prefixes only.
    """
    ifs = config.lb.interfaces
    return ifs[:1] if len(ifs) >= 2 else ()


def nat_replies(config: Config) -> list[tuple[IPv6Address, str, int]]:
    """(backend, protocol, port) of the ``nat`` VIPs whose backends lie in an npt inside prefix.

    Their replies must stay tracked: conntrack gives them the VIP back as their source.
    """
    out: dict[tuple[IPv6Address, str, int], None] = {}
    for vip in config.vips:
        if vip.mode is not VipMode.NAT:
            continue
        for b in vip.backends:
            if any(b.address in p.inside for p in config.npt):
                for port in [b.port] if b.port else vip.ports:
                    out[(b.address, str(vip.protocol), port)] = None
    return list(out)


def render_npt(
    pairs: Sequence[NptPair],
    instance: str,
    *,
    outside: Sequence[str] = (),
    tracked: Sequence[tuple[IPv6Address, str, int]] = (),
) -> str:
    """The instance's NPT rules as ``ip6tables-restore`` input (tables raw and mangle).

    NPT applies at the border only: packets between inside addresses (the LB's own
    connections to inside hosts, tunnels and probes among them) are never translated
    (``! -d INSIDE``), and with ``outside`` interfaces, SNPT applies only to packets
    leaving by one of them and DNPT only to packets arriving on one. ``tracked``:
    replies of ``nat`` VIPs from backends inside a prefix (:func:`nat_replies`), which
    the raw table lets conntrack see (``-j ACCEPT`` before the NOTRACK rules), so it gives
    them the VIP back as their source.

    Alone, with ``--noflush``, it appends the rules; :func:`splice` merges it
    into a saved ruleset for a whole-table restore. Empty text without pairs.
    """
    if not pairs:
        return ""
    c = f'-m comment --comment "{comment_tag(instance)}"'
    ins = [f"-i {i} " for i in outside] or [""]
    outs = [f"-o {i} " for i in outside] or [""]
    raw = [
        f"-A PREROUTING -s {a}/128 -p {proto} --sport {port} {c} -j ACCEPT"
        for a, proto, port in tracked
    ]
    mangle: list[str] = []
    for p in pairs:
        raw.append(f"-A PREROUTING -s {p.inside} {c} -j CT --notrack")
        raw += [f"-A PREROUTING {i}-d {p.outside} {c} -j CT --notrack" for i in ins]
        mangle += [
            f"-A PREROUTING {i}-d {p.outside} {c}"
            f" -j DNPT --src-pfx {p.outside} --dst-pfx {p.inside}"
            for i in ins
        ]
        mangle += [
            f"-A POSTROUTING {o}-s {p.inside} ! -d {p.inside} {c}"
            f" -j SNPT --src-pfx {p.inside} --dst-pfx {p.outside}"
            for o in outs
        ]
    lines = [f"# {comment_tag(instance)}: npt; load with: ip6tables-restore --noflush FILE"]
    for table, rules in (("raw", raw), ("mangle", mangle)):
        lines.append(f"*{table}")
        chains = dict.fromkeys(r.split()[1] for r in rules)
        lines += [f":{chain} ACCEPT [0:0]" for chain in chains]
        lines += rules
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_config_npt(config: Config) -> str:
    """:func:`render_npt` for a whole file: its outside interface and its nat VIPs' replies."""
    return render_npt(
        config.npt,
        config.lb.instance,
        outside=npt_outside_interfaces(config),
        tracked=nat_replies(config),
    )


# --- merging into ip6tables-save output ------------------------------------------


def is_tagged(line: str, instance: str) -> bool:
    """Does this rule line carry the instance's comment (quoted or not)?"""
    tag = re.escape(comment_tag(instance))
    return re.search(rf'--comment (?:"{tag}"|{tag})(?=\s|$)', line) is not None


def tagged_rules(saved: str, instance: str) -> list[str]:
    """The rule lines of ``saved`` that carry the instance's tag."""
    return [line for line in saved.splitlines() if is_tagged(line, instance)]


@dataclass(slots=True)
class _Table:
    name: str
    chains: list[str] = field(default_factory=list)  # ":NAME POLICY [p:b]" lines
    rules: list[str] = field(default_factory=list)

    def chain_names(self) -> list[str]:
        return [c[1:].split()[0] for c in self.chains]


def _parse(text: str) -> list[_Table]:
    tables: list[_Table] = []
    current: _Table | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = _Table(line[1:])
            tables.append(current)
        elif current is None:
            raise ValueError(f"ip6tables text: {line!r} outside a table")
        elif line == "COMMIT":
            current = None
        elif line.startswith(":"):
            current.chains.append(line)
        else:
            current.rules.append(line)
    return tables


def tagged_tables(saved: str, instance: str) -> list[str]:
    """The tables of ``saved`` that hold at least one of the instance's rules."""
    return [t.name for t in _parse(saved) if any(is_tagged(r, instance) for r in t.rules)]


def empty_tables(saved: str) -> list[str]:
    """Tables that do nothing: no rules, no user chains, every policy ACCEPT.

    With ip6tables' nf_tables backend such a table is only an empty nft table
    left behind, which ``remove`` may delete when it emptied it.
    """
    return [
        t.name
        for t in _parse(saved)
        if not t.rules and all(c.split()[1] == "ACCEPT" for c in t.chains)
    ]


def splice(saved: str, instance: str, ours: str) -> str:
    """``saved`` (``ip6tables-save [-c]`` output) without the instance's rules, plus ``ours``.

    The result, given to ``ip6tables-restore`` (``-c`` if saved with ``-c``),
    replaces every table it names in one go: the instance's old rules go,
    the new ones are appended to their chains, everybody else's stay as they
    were. A table of ``ours`` that ``saved`` lacks is added.
    """
    tables = _parse(saved)
    for t in tables:
        t.rules = [r for r in t.rules if not is_tagged(r, instance)]
    by_name = {t.name: t for t in tables}
    for new in _parse(ours):
        if new.name not in by_name:
            by_name[new.name] = _Table(new.name)
            tables.append(by_name[new.name])
        t = by_name[new.name]
        have = set(t.chain_names())
        for chain in new.chains:
            if chain[1:].split()[0] not in have:
                t.chains.append(chain)
        t.rules += new.rules
    lines: list[str] = []
    for t in tables:
        lines.append(f"*{t.name}")
        lines += t.chains
        lines += t.rules
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""
