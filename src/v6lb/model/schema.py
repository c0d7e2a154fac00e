"""Typed readers for the config file: every failure names the file, the field path and a fix.

Section parsers read YAML-decoded data (dicts, lists, str, int, float, bool,
None) through :class:`Fields`, which knows where it is (``vips[1].backends[0]``),
so that an error can say so. The ``config`` module uses these for ``vips:``,
``npt:`` and ``lb:``; the ``topology:`` and ``bgp:`` parsers are meant to use them
too, so every section reports errors the same way.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Final

from v6lb.errors import UsageError

__all__ = [
    "unicast_list",
    "MISSING",
    "QUOTE_MAX",
    "ConfigError",
    "Fields",
    "Where",
    "as_choice",
    "as_int",
    "as_ipv4_address",
    "as_ipv6_address",
    "as_ipv6_prefix",
    "as_list",
    "as_number",
    "as_str",
    "clip",
    "describe",
    "did_you_mean",
    "quote",
    "require_unicast",
    "shown",
    "ticked",
]

_EXAMPLE_ADDRESS: Final = "2001:db8::10"

QUOTE_MAX: Final = 80
"""At most this many characters of a value the user wrote appear in an error."""
_PART_MAX: Final = 600  # the safety net for a whole message or fix


def shown(text: str) -> str:
    """``text`` as written, cut to :data:`QUOTE_MAX` characters with its length said."""
    if len(text) <= QUOTE_MAX:
        return text
    return f"{text[:QUOTE_MAX]}... ({len(text)} characters)"


def quote(text: str, most: int = QUOTE_MAX) -> str:
    """``repr(text)`` cut to about :data:`QUOTE_MAX` characters: how errors quote a value.

    Every error that echoes a string from the file goes through here (or
    :func:`shown`), so a 50 MB string makes a 150-character message, not a
    50 MB one.
    """
    head = repr(text[: most + 1])
    if len(text) <= most and len(head) <= most + 2:
        return head
    return f"{head[:most]}... ({len(text)} characters)"


def clip(text: str, most: int = _PART_MAX) -> str:
    """``text`` with its middle cut out if longer than ``most``: the net under every message."""
    if len(text) <= most:
        return text
    keep = most // 2
    return f"{text[:keep]} ... ({len(text) - 2 * keep} characters cut) ... {text[-keep:]}"


def _number(value: int | float) -> str:
    # str() of an int over 4300 digits raises ValueError; parse_config can be
    # handed any int by a caller, not only what the YAML reader let through.
    if isinstance(value, int) and value.bit_length() > 200:
        return f"a number of about {int(value.bit_length() * 0.30103)} digits"
    return str(value)


class ConfigError(UsageError):
    """The config file is wrong: in which file, at which field, what, and how to fix it.

    ``str(err)`` reads ``FILE: PATH: MESSAGE; fix: FIX``, for example
    ``x.yaml: vips[1].backends[0].weight: 5000 is out of range; fix: use an
    integer weight from 0 to 1000``. ``path`` is empty for errors about the whole
    file (it cannot be read); for YAML syntax errors it is ``line L, column C``.
    """

    def __init__(self, file: str, path: str, message: str, fix: str) -> None:
        path, message, fix = clip(path), clip(message), clip(fix)
        super().__init__(message, fix)
        self.args = (file, path, message, fix)
        self.file = file
        self.path = path

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}: " if self.path else f"{self.file}: "
        return f"{where}{self.message}; fix: {self.fix}"


@dataclass(frozen=True, slots=True)
class Where:
    """A position in the config: the file and the field path inside it."""

    file: str
    path: str = ""

    def key(self, name: str) -> Where:
        if len(name) > QUOTE_MAX or not name.isprintable():
            # A key from the file, not from the schema: the error message quotes more of it.
            name = quote(name, 24)
        return Where(self.file, f"{self.path}.{name}" if self.path else name)

    def index(self, i: int) -> Where:
        return Where(self.file, f"{self.path}[{i}]")

    def error(self, message: str, fix: str) -> ConfigError:
        return ConfigError(self.file, self.path or "(top level)", message, fix)


def describe(value: object) -> str:
    """How a YAML value reads in an error message."""
    if value is None:
        return "an empty value (null)"
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int | float):
        return f"the number {_number(value)}"
    if isinstance(value, str):
        return f"the string {quote(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def did_you_mean(word: str, choices: Sequence[str]) -> str | None:
    """The closest of ``choices`` to a misspelt ``word``, if one is close."""
    if len(word) > 2 * max((len(c) for c in choices), default=0) + 10:
        return None  # no near miss, and difflib is slow on long strings
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def as_int(value: object, where: Where, *, lo: int, hi: int, noun: str) -> int:
    """An integer from ``lo`` to ``hi`` (YAML booleans are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(
            f"{describe(value)} is not an integer", f"use an integer {noun} from {lo} to {hi}"
        )
    if not lo <= value <= hi:
        raise where.error(
            f"{_number(value)} is out of range", f"use an integer {noun} from {lo} to {hi}"
        )
    return value


def as_number(value: object, where: Where, *, lo: float, hi: float, noun: str) -> float:
    """A finite number strictly above ``lo`` and at most ``hi`` (seconds, mostly)."""
    fix = f"use a number of {noun} above {lo:g} and at most {hi:g}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise where.error(f"{describe(value)} is not a number", fix)
    if not math.isfinite(value) or not lo < value <= hi:
        raise where.error(f"{_number(value)} is out of range", fix)
    return float(value)


def as_str(value: object, where: Where, *, example: str) -> str:
    if not isinstance(value, str) or not value:
        raise where.error(f"{describe(value)} is not a non-empty string", f"write it as {example}")
    return value


def as_list(value: object, where: Where, *, example: str) -> list[object]:
    if not isinstance(value, list):
        raise where.error(
            f"{describe(value)} is not a list", f"write a YAML list, for example {example}"
        )
    return value


def _number_fix(value: object) -> str | None:
    # YAML 1.1 reads 2001:10:20:30:40:50:0:1 (and MACs like 10:20:30:40:50:55) as
    # base-60 integers; say so rather than "not an address".
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "put the value in quotes: YAML reads some colon-separated digits as a number"
    return None


def as_ipv6_address(value: object, where: Where) -> IPv6Address:
    """A plain IPv6 address: not IPv4, not IPv4-mapped, no zone, no prefix length."""
    fix = f"write an IPv6 address, for example {_EXAMPLE_ADDRESS}"
    if not isinstance(value, str):
        raise where.error(f"{describe(value)} is not an IPv6 address", _number_fix(value) or fix)
    text = value.strip()
    if "/" in text:
        raise where.error(
            f"{shown(text)} is a prefix, not an address",
            f"drop the prefix length: {shown(text.split('/')[0])}",
        )
    try:
        addr = IPv6Address(text)
    except ValueError:
        try:
            IPv4Address(text)
        except ValueError:
            raise where.error(f"{quote(text)} is not an IPv6 address", fix) from None
        raise where.error(
            f"{text} is an IPv4 address", f"v6lb is IPv6-only: {fix.replace('write', 'use')}"
        ) from None
    if addr.ipv4_mapped is not None:
        raise where.error(
            f"{text} is an IPv4-mapped address (::ffff:a.b.c.d), which carries IPv4",
            f"v6lb is IPv6-only: use a native IPv6 address, for example {_EXAMPLE_ADDRESS}",
        )
    if addr.scope_id is not None:
        raise where.error(
            f"{text} has a zone (%{addr.scope_id})",
            "use a global or unique-local address, without %zone",
        )
    return addr


def require_unicast(
    addr: IPv6Address, where: Where, *, what: str, allow_loopback: bool = False
) -> IPv6Address:
    """Refuse addresses that cannot name one reachable node."""
    problem = None
    if addr.is_unspecified:
        problem = "the unspecified address"
    elif addr.is_multicast:
        problem = "a multicast address"
    elif addr.is_loopback and not allow_loopback:
        problem = "the loopback address"
    elif addr.is_link_local:
        problem = "a link-local address"
    if problem is not None:
        raise where.error(
            f"{addr} is {problem}, which cannot be {what}",
            f"use a global or unique-local (fd00::/8) unicast address, for example {_EXAMPLE_ADDRESS}",
        )
    return addr


def as_ipv6_prefix(value: object, where: Where, *, max_len: int = 128) -> IPv6Network:
    """An IPv6 prefix written ``ADDRESS/LEN``, with no host bits set."""
    fix = "write an IPv6 prefix, for example 2001:db8:1::/48"
    if not isinstance(value, str):
        raise where.error(f"{describe(value)} is not an IPv6 prefix", fix)
    text = value.strip()
    if "/" not in text:
        raise where.error(
            f"{shown(text)} has no prefix length", f"add one, for example {shown(text)}/64"
        )
    try:
        net = IPv6Network(text)
    except ValueError:
        try:
            loose = IPv6Network(text, strict=False)
        except ValueError:
            try:
                IPv4Network(text, strict=False)
            except ValueError:
                raise where.error(f"{quote(text)} is not an IPv6 prefix", fix) from None
            raise where.error(f"{text} is an IPv4 prefix", f"v6lb is IPv6-only: {fix}") from None
        raise where.error(
            f"{text} has host bits set", f"use the prefix itself: {loose.with_prefixlen}"
        ) from None
    if net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
        raise where.error(f"{text} is IPv4-mapped (::ffff:0:0/96)", f"v6lb is IPv6-only: {fix}")
    if net.prefixlen > max_len:
        raise where.error(
            f"{text} is longer than /{max_len}", f"use a prefix of /{max_len} or shorter"
        )
    return net


def as_ipv4_address(value: object, where: Where) -> IPv4Address:
    fix = "write an IPv4 address, for example 192.0.2.10"
    if not isinstance(value, str):
        raise where.error(f"{describe(value)} is not an IPv4 address", fix)
    try:
        addr = IPv4Address(value.strip())
    except ValueError:
        raise where.error(f"{quote(value)} is not an IPv4 address", fix) from None
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or addr.is_link_local:
        raise where.error(f"{addr} is not a unicast address one can listen on", fix)
    return addr


class _Missing:
    __slots__ = ()


MISSING: Final = _Missing()


class Fields:
    """One YAML mapping being read: each accessor validates one key.

    A key given as ``null`` (``weight:`` with nothing after it) is an error, not
    the default: a half-written line should not pass silently.
    """

    __slots__ = ("where", "_data", "_what")

    def __init__(self, value: object, where: Where, what: str) -> None:
        if not isinstance(value, dict):
            raise where.error(
                f"{what} must be a mapping (key: value lines), not {describe(value)}",
                f"write {what} as `key: value` lines",
            )
        for key in value:
            if not isinstance(key, str):
                raise where.error(
                    f"a key in {what} is {describe(key)}, not a name",
                    "use a lower-case name as the key",
                )
        self.where = where
        self._data: dict[str, object] = value
        self._what = what

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def as_dict(self) -> dict[str, object]:
        """A shallow copy, for sections kept raw."""
        return dict(self._data)

    def has(self, name: str) -> bool:
        return name in self._data

    def at(self, name: str) -> Where:
        return self.where.key(name)

    def reject_unknown(self, allowed: Sequence[str], kind: str = "key") -> None:
        """Fail on the first key not in ``allowed``, suggesting the closest one."""
        for key in self._data:
            if key not in allowed:
                hint = did_you_mean(key, allowed)
                if hint is not None:
                    fix = f"did you mean `{hint}`?"
                else:
                    fix = f"remove it; the known {kind}s here are: {', '.join(allowed)}"
                raise self.at(key).error(f"unknown {kind} {ticked(key)} in {self._what}", fix)

    def get(self, name: str) -> object:
        """The value of ``name``, or ``MISSING``; a null value is an error."""
        if name not in self._data:
            return MISSING
        value = self._data[name]
        if value is None:
            raise self.at(name).error(
                f"`{name}` has no value", f"give `{name}` a value or remove the line"
            )
        return value

    def required(self, name: str, example: str) -> object:
        value = self.get(name)
        if isinstance(value, _Missing):
            raise self.at(name).error(
                f"`{name}` is required in {self._what}", f"add `{name}: {example}`"
            )
        return value

    def integer(self, name: str, default: int, *, lo: int, hi: int, noun: str) -> int:
        value = self.get(name)
        if isinstance(value, _Missing):
            return default
        return as_int(value, self.at(name), lo=lo, hi=hi, noun=noun)

    def seconds(self, name: str, default: float, *, lo: float = 0.0, hi: float) -> float:
        value = self.get(name)
        if isinstance(value, _Missing):
            return default
        return as_number(value, self.at(name), lo=lo, hi=hi, noun="seconds")

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name)
        if isinstance(value, _Missing):
            return default
        if not isinstance(value, bool):
            raise self.at(name).error(
                f"{describe(value)} is not true or false", "use true or false"
            )
        return value

    def choice(self, name: str, choices: Sequence[str], default: str) -> str:
        value = self.get(name)
        if isinstance(value, _Missing):
            return default
        return as_choice(value, self.at(name), choices)

    def string(self, name: str, default: str, *, example: str) -> str:
        value = self.get(name)
        if isinstance(value, _Missing):
            return default
        return as_str(value, self.at(name), example=example)


def unicast_list(f: Fields, key: str, *, example: str, what: str) -> tuple[IPv6Address, ...]:
    """``key``: a list of distinct unicast IPv6 addresses (empty when absent)."""
    found: list[IPv6Address] = []
    if not f.has(key):
        return ()
    w = f.at(key)
    for i, item in enumerate(as_list(f.get(key), w, example=example)):
        addr = require_unicast(as_ipv6_address(item, w.index(i)), w.index(i), what=what)
        if addr in found:
            raise w.index(i).error(f"{addr} is listed twice", "list each address once")
        found.append(addr)
    return tuple(found)


def ticked(name: str) -> str:
    """A key as errors show it: `name`, or quoted and cut when it is long or odd."""
    if len(name) <= QUOTE_MAX and name.isprintable() and "`" not in name:
        return f"`{name}`"
    return quote(name)


def as_choice(value: object, where: Where, choices: Sequence[str]) -> str:
    """One of ``choices``, with a "did you mean" for a near miss."""
    if isinstance(value, str) and value in choices:
        return value
    hint = did_you_mean(value, choices) if isinstance(value, str) else None
    fix = f"use one of: {', '.join(choices)}"
    if hint is not None:
        fix = f"did you mean `{hint}`? ({fix})"
    raise where.error(f"{describe(value)} is not one of the choices", fix)
