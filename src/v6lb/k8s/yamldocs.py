"""Kubernetes manifests' YAML, fast and within bounds: every document of a stream.

``kubectl get -o yaml`` output for a large cluster is tens of megabytes: PyYAML's
``safe_load_all``, even with libyaml's ``CSafeLoader``, composes a node per value and then
constructs it in Python, which takes over 15 s for 50,000 endpoints. This module builds
the Python values straight from libyaml's events (one pass, no nodes), about five times
faster, and keeps the limits of :mod:`v6lb.model.config_read`:

- **Nesting**: lists and mappings nest at most :data:`MAX_DEPTH` deep (kubectl prints
  about 12 levels).
- **Values**: at most ``max_values`` values in the whole stream.
- **Aliases** (``*name``): allowed, to a finished node only (no cycles); the value is
  shared, not copied, so an alias bomb costs nothing here, and manifests are read field
  by field, never flattened.
- **Keys**: a key given twice in one mapping is refused, as the API server does.
- **Scalars** resolve as YAML 1.1 does for what manifests hold: null, booleans,
  integers (decimal, ``0x``, ``0o``), floats; everything quoted or else is a string. An
  integer has at most 20 digits.

Errors are :class:`YamlError` (exit 2) with the source name, the line and the column.
Pure: text in, values out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Final

import yaml

from v6lb.errors import UsageError

try:
    from yaml._yaml import CParser

    _LIBYAML = True
except ImportError:  # PyYAML built without libyaml: the pure-Python parser, slower
    _LIBYAML = False

__all__ = ["MAX_DEPTH", "YamlError", "load_documents"]

MAX_DEPTH: Final = 32
_INT_DIGITS_MAX: Final = 20
_NULL: Final = frozenset({"", "~", "null", "Null", "NULL"})
_TRUE: Final = frozenset({"true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON"})
_FALSE: Final = frozenset({"false", "False", "FALSE", "no", "No", "NO", "off", "Off", "OFF"})
_INT_RE: Final = re.compile(r"[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0o?[0-7_]+)")
_FLOAT_RE: Final = re.compile(
    r"[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)


class YamlError(UsageError):
    """The text is not YAML that v6lb reads (exit 2): where, what, and how to fix it."""


def _plain(value: str) -> object:
    """A plain (unquoted) scalar's value."""
    if not value:
        return None
    if value[0] not in "0123456789-+.~nNtTfFyYoO":
        return value
    if value in _NULL:
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if _INT_RE.fullmatch(value):
        body = value.replace("_", "").lstrip("+-")
        if len(body) > _INT_DIGITS_MAX:
            return value
        sign = -1 if value.startswith("-") else 1
        if body.startswith("0x"):
            return sign * int(body[2:], 16)
        if body.startswith("0o"):
            return sign * int(body[2:], 8)
        if body != "0" and body.startswith("0"):
            return sign * int(body, 8)
        return sign * int(body)
    if len(value) <= 40 and _FLOAT_RE.fullmatch(value):
        low = value.lower().lstrip("+")
        if low.endswith("inf"):
            return float("-inf") if low.startswith("-") else float("inf")
        if low.endswith("nan"):
            return float("nan")
        return float(value.replace("_", ""))
    return value


def load_documents(text: str, source: str, *, max_values: int) -> Iterator[tuple[int, Any]]:
    """Each document of ``text``: (its first line, 1-based; its value). Raise YamlError."""
    try:
        yield from _build(text, source, max_values)
    except yaml.MarkedYAMLError as exc:
        mark: Any = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise YamlError(
            f"{source}: {where}not YAML: {problem}",
            "correct the YAML there (indentation, a missing ':' or an unclosed quote),"
            " or give the output of `kubectl get ... -o yaml`",
        ) from None
    except yaml.YAMLError as exc:
        raise YamlError(f"{source}: not YAML: {exc}", "save the file as UTF-8 YAML") from None


def _events(text: str) -> Iterator[Any]:
    if not _LIBYAML:
        yield from yaml.parse(text, Loader=yaml.SafeLoader)
        return
    parser = CParser(text)
    try:
        get = parser.get_event
        while True:
            event = get()
            if event is None:
                return
            yield event
    finally:
        parser.dispose()


def _build(text: str, source: str, max_values: int) -> Iterator[tuple[int, Any]]:
    scalar_t, map_t, seq_t = yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent
    map_end, seq_end, alias_t = yaml.MappingEndEvent, yaml.SequenceEndEvent, yaml.AliasEvent
    doc_start, doc_end = yaml.DocumentStartEvent, yaml.DocumentEndEvent
    # the open containers: [container, pending key or _NOKEY, anchor, key lines]
    stack: list[list[Any]] = []
    anchors: dict[str, Any] = {}
    values = 0
    first_line = 1
    root: Any = None

    def fail(event: Any, problem: str, fix: str) -> YamlError:
        m = event.start_mark
        return YamlError(f"{source}: line {m.line + 1}, column {m.column + 1}: {problem}", fix)

    for event in _events(text):
        kind = type(event)
        if first_line == 0:  # a document's first line is its first value's, after any ---
            first_line = event.start_mark.line + 1
        if kind is scalar_t:
            value: Any = _plain(event.value) if event.implicit[0] else event.value
            values += 1
        elif kind is map_t or kind is seq_t:
            values += 1
            if len(stack) >= MAX_DEPTH:
                raise fail(
                    event,
                    f"lists and mappings nest more than {MAX_DEPTH} levels deep",
                    "flatten the structure: Kubernetes objects need about 12 levels",
                )
            stack.append([{} if kind is map_t else [], _NOKEY, event.anchor, {}])
            continue
        elif kind is map_end or kind is seq_end:
            value, _, anchor, _ = stack.pop()
            if anchor is not None:
                anchors[anchor] = value
            _add(stack, value, event, fail) if stack else None
            if not stack:
                root = value
            continue
        elif kind is alias_t:
            if event.anchor not in anchors:
                raise fail(
                    event,
                    f"the alias *{event.anchor} names no finished anchor (&{event.anchor})",
                    "define the anchor before the alias, outside the value that uses it",
                )
            value = anchors[event.anchor]
            values += 1
        elif kind is doc_start:
            first_line = 0
            anchors.clear()
            root = None
            continue
        elif kind is doc_end:
            yield first_line, root
            continue
        else:  # stream start and end
            continue
        if values > max_values:
            raise fail(
                event,
                f"the input holds more than {max_values} values",
                "give fewer objects per file, or split the file",
            )
        if kind is scalar_t and event.anchor is not None:
            anchors[event.anchor] = value
        if stack:
            _add(stack, value, event, fail)
        else:
            root = value


class _NoKey:
    __slots__ = ()


_NOKEY: Final = _NoKey()


def _add(stack: list[list[Any]], value: Any, event: Any, fail: Any) -> None:
    top = stack[-1]
    container = top[0]
    if type(container) is list:
        container.append(value)
        return
    key = top[1]
    if key is _NOKEY:
        try:
            hash(value)
        except TypeError:
            raise fail(
                event, "a mapping key is a list or a mapping", "use a string as the key"
            ) from None
        if value in container:
            first = top[3].get(value, 0)
            raise fail(
                event,
                f"the key {value!r} is given twice in one mapping (first on line {first})",
                "keep one of the two",
            )
        top[1] = value
        top[3][value] = event.start_mark.line + 1
        return
    container[key] = value
    top[1] = _NOKEY
