"""``ip6tables-restore`` text for ``npt`` (RFC 6296 through ip6tables' SNPT/DNPT targets).

Pure: prefix pairs in, text out, plus :func:`splice`, which edits the text of
``ip6tables-save`` so that a whole-table restore replaces the instance's rules
and keeps everybody else's (the engine's atomic apply and remove).

nft 1.0.6 has no NPT statement, so NPT goes through the ``mangle`` table::

    -A PREROUTING  -d OUTSIDE -j DNPT --src-pfx OUTSIDE --dst-pfx INSIDE
    -A POSTROUTING -s INSIDE  -j SNPT --src-pfx INSIDE  --dst-pfx OUTSIDE

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

from v6lb.model.config import NptPair

__all__ = [
    "comment_tag",
    "empty_tables",
    "is_tagged",
    "render_npt",
    "splice",
    "tagged_rules",
    "tagged_tables",
]


def comment_tag(instance: str) -> str:
    return f"v6lb:{instance}"


def render_npt(pairs: Sequence[NptPair], instance: str) -> str:
    """The instance's NPT rules as ``ip6tables-restore`` input (tables raw and mangle).

    Alone, with ``--noflush``, it appends the rules; :func:`splice` merges it
    into a saved ruleset for a whole-table restore. Empty text without pairs.
    """
    if not pairs:
        return ""
    c = f'-m comment --comment "{comment_tag(instance)}"'
    raw: list[str] = []
    mangle: list[str] = []
    for p in pairs:
        raw.append(f"-A PREROUTING -s {p.inside} {c} -j CT --notrack")
        raw.append(f"-A PREROUTING -d {p.outside} {c} -j CT --notrack")
        mangle.append(
            f"-A PREROUTING -d {p.outside} {c} -j DNPT --src-pfx {p.outside} --dst-pfx {p.inside}"
        )
        mangle.append(
            f"-A POSTROUTING -s {p.inside} {c} -j SNPT --src-pfx {p.inside} --dst-pfx {p.outside}"
        )
    lines = [f"# {comment_tag(instance)}: npt; load with: ip6tables-restore --noflush FILE"]
    for table, rules in (("raw", raw), ("mangle", mangle)):
        lines.append(f"*{table}")
        chains = dict.fromkeys(r.split()[1] for r in rules)
        lines += [f":{chain} ACCEPT [0:0]" for chain in chains]
        lines += rules
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


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
