"""Reading the config file's YAML, within bounds: size, nesting, values, numbers.

PyYAML's pure-Python loader has no limits of its own, so a broken or hostile
file could take minutes and gigabytes, or end in a traceback. This module sets
the limits that docs/config.md lists and turns each breach into a
:class:`ConfigError` (exit 2 from every command) before the cost is paid:

- **Size.** At most ``V6LB_MAX_CONFIG_BYTES`` bytes (default 16 MiB). A regular
  file is measured with ``fstat`` before it is read; anything else (a pipe,
  ``/dev/stdin``) is read up to the limit plus one byte, and no further.
- **Nesting.** Lists and mappings nest at most :data:`MAX_DEPTH` deep. The
  composer counts while it composes, so a file of 10,000 ``[`` stops at level 33
  instead of overflowing Python's stack.
- **Values.** At most one value (scalar, list or mapping) per
  :data:`BYTES_PER_VALUE` bytes of the size limit, counting each use of an alias
  as a copy of what it names: an alias bomb is refused after one pass over the
  composed nodes, before anything is constructed. An alias inside the node it
  names (a cycle) is refused too.
- **Numbers.** An integer has at most :data:`INT_DIGITS_MAX` digits (``0x``,
  ``0b`` and octal forms up to 64 bits) and a float at most
  :data:`FLOAT_CHARS_MAX` characters, checked before conversion.

It also refuses a key given twice in one mapping, which plain YAML keeps the last of.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Final, Protocol

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from v6lb.model.schema import QUOTE_MAX, ConfigError, clip, quote

try:
    from yaml._yaml import CParser

    _LIBYAML = True
except ImportError:  # PyYAML built without libyaml: the pure-Python parser, slower
    _LIBYAML = False

__all__ = [
    "BYTES_PER_VALUE",
    "DEFAULT_MAX_CONFIG_BYTES",
    "FLOAT_CHARS_MAX",
    "INT_DIGITS_MAX",
    "MAX_CONFIG_BYTES_ENV",
    "MAX_DEPTH",
    "max_config_bytes",
    "read_config_text",
    "read_yaml",
]

DEFAULT_MAX_CONFIG_BYTES: Final = 16 * 1024 * 1024
MAX_CONFIG_BYTES_ENV: Final = "V6LB_MAX_CONFIG_BYTES"
_MAX_CONFIG_BYTES_CEILING: Final = 1 << 30
MAX_DEPTH: Final = 32
BYTES_PER_VALUE: Final = 32
INT_DIGITS_MAX: Final = 20
FLOAT_CHARS_MAX: Final = 40
# 0x, 0b and YAML 1.1 octal (a leading 0): as many digits as 64 bits take.
_PREFIXED_DIGITS_MAX: Final = {"0x": 16, "0b": 64, "0": 22}


def max_config_bytes(file: str) -> int:
    """The size limit: ``V6LB_MAX_CONFIG_BYTES`` if set, else 16 MiB."""
    raw = os.environ.get(MAX_CONFIG_BYTES_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_MAX_CONFIG_BYTES
    text = raw.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 10) or not (
        1 <= int(text) <= _MAX_CONFIG_BYTES_CEILING
    ):
        raise ConfigError(
            file,
            "",
            f"the environment variable {MAX_CONFIG_BYTES_ENV}={quote(raw)} is not a byte count",
            f"set it to a whole number of bytes from 1 to {_MAX_CONFIG_BYTES_CEILING} (1 GiB),"
            f" or unset it for the default {DEFAULT_MAX_CONFIG_BYTES} (16 MiB)",
        )
    return int(text)


def _too_big(file: str, size: str, limit: int) -> ConfigError:
    return ConfigError(
        file,
        "",
        f"the file is {size}, more than the limit of {limit} bytes",
        f"shorten it, or raise the limit: {MAX_CONFIG_BYTES_ENV}=BYTES (default"
        f" {DEFAULT_MAX_CONFIG_BYTES}, 16 MiB)",
    )


def read_config_text(path: str | Path, limit: int) -> str:
    """The file as text, refused unread when it is over ``limit`` bytes."""
    file = str(path)
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if stat.S_ISREG(st.st_mode) and st.st_size > limit:
                raise _too_big(file, f"{st.st_size} bytes", limit)
            data = fh.read(limit + 1)  # a pipe or a device says its size only by running over
    except OSError as exc:
        raise ConfigError(
            file,
            "",
            f"cannot read the file: {exc.strerror or exc}",
            "check the file name and that it is readable",
        ) from None
    if len(data) > limit:
        raise _too_big(file, f"more than {limit} bytes", limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            file, "", f"the file is not UTF-8 text ({exc.reason})", "save it as UTF-8"
        ) from None


def read_yaml(path: str | Path, *, max_bytes: int | None = None) -> Any:
    """Read and decode a config file's YAML within the limits; raise :class:`ConfigError`.

    Like ``yaml.safe_load``, the result is whatever the file holds (``Any``).
    """
    file = str(path)
    limit = max_config_bytes(file) if max_bytes is None else max_bytes
    return parse_yaml(read_config_text(path, limit), file, max_values=limit // BYTES_PER_VALUE)


def parse_yaml(text: str, file: str, *, max_values: int) -> Any:
    """Decode YAML ``text`` (one document) within the limits; raise :class:`ConfigError`."""
    loader: _Loader | None = None
    try:
        # PyYAML's reader refuses control characters here, before any parsing.
        loader = (_FastLoader if _LIBYAML else _Loader)(text, file, max(max_values, 1))
        return loader.get_single_data()
    except yaml.reader.ReaderError as exc:
        pos = exc.position
        where = (
            f"line {text.count(chr(10), 0, pos) + 1}, column {pos - text.rfind(chr(10), 0, pos)}"
        )
        raise ConfigError(
            file,
            where,
            f"the file holds the control character #x{exc.character:04x}, which YAML does not allow",
            'remove it; in a double-quoted string it may be written as an escape, such as "\\x01"',
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = _at(mark)
        problem = clip(" ".join(p for p in (exc.context, exc.problem) if p), 2 * QUOTE_MAX)
        if problem.startswith("duplicate key"):
            raise ConfigError(file, where, problem, "keep one of the two") from None
        unknown_tag = "could not determine a constructor for the tag "
        if exc.problem and exc.problem.startswith(unknown_tag):
            tag = exc.problem.removeprefix(unknown_tag).strip("'")
            raise ConfigError(
                file,
                where,
                f"unknown YAML tag {quote(tag, QUOTE_MAX // 2)}",
                "remove the tag: v6lb reads plain YAML values (strings, numbers, lists, mappings)",
            ) from None
        if "maximum nesting depth" in problem:  # libyaml's own limit (1000 levels) came first
            raise _too_deep(file, mark) from None
        raise ConfigError(
            file,
            where,
            f"YAML syntax error: {problem}",
            "correct the YAML there (indentation, a missing ':' or an unclosed quote or bracket)",
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            file, "", f"YAML error: {clip(str(exc))}", "save the file as plain UTF-8 YAML"
        ) from None
    finally:
        if loader is not None:
            loader.dispose()


def _too_deep(file: str, mark: _Mark | None, how: str = "") -> ConfigError:
    return ConfigError(
        file,
        _at(mark),
        f"lists and mappings nest more than {MAX_DEPTH} levels deep{how}",
        f"flatten the structure: v6lb sections need fewer than 10 levels, and at most"
        f" {MAX_DEPTH} are read",
    )


class _Mark(Protocol):
    """Where an event starts: PyYAML's and libyaml's marks both have these."""

    line: int
    column: int


def _at(mark: _Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader with the limits above, and no key given twice in one mapping."""

    def __init__(self, text: str, file: str, max_values: int) -> None:
        super().__init__(text)
        self.file = file
        self.max_values = max_values
        self.depth = 0
        self.values = 0

    def next_mark(self) -> _Mark | None:
        mark: _Mark | None = self.current_event.start_mark  # set by check_event
        return mark

    def limit(self, mark: _Mark | None, message: str, fix: str) -> ConfigError:
        return ConfigError(self.file, _at(mark), message, fix)

    def too_deep(self, mark: _Mark | None, how: str = "") -> ConfigError:
        return _too_deep(self.file, mark, how)

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        # The composer recurses once per level: count the levels here, so that
        # deep nesting is refused before it can exhaust Python's stack.
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        nests = self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent)
        mark = self.next_mark()
        self.values += 1
        if self.values > self.max_values:
            raise self.limit(
                mark,
                f"the file holds more than {self.max_values} values",
                f"shorten it, or raise {MAX_CONFIG_BYTES_ENV}: it allows one value"
                f" per {BYTES_PER_VALUE} bytes",
            )
        if nests:
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.too_deep(mark)
        try:
            return super().compose_node(parent, index)
        finally:
            if nests:
                self.depth -= 1

    def get_single_node(self) -> Node | None:
        node: Node | None = super().get_single_node()
        if node is not None:
            self.check_aliases(node)
        return node

    def check_aliases(self, root: Node) -> None:
        """Refuse what aliases expand to: too many values, too deep, or a cycle.

        One pass over the composed nodes, each shared node once (iterative: no
        recursion), computing for each node how many values and how many levels
        it stands for once every alias in it is written out.
        """
        cap = self.max_values
        values: dict[int, int] = {}
        height: dict[int, int] = {}
        on_path: set[int] = set()
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:
            node, finished = stack.pop()
            key = id(node)
            kids = _children(node)
            if finished:
                on_path.discard(key)
                values[key] = min(cap + 1, 1 + sum(values[id(k)] for k in kids))
                nests = isinstance(node, SequenceNode | MappingNode)
                height[key] = 1 + max((height[id(k)] for k in kids), default=0) if nests else 0
                if values[key] > cap:
                    raise self.limit(
                        node.start_mark,
                        f"aliases (*name) expand this to more than {cap} values",
                        "write the values out, or use fewer aliases of aliases"
                        " (this is how an alias bomb looks)",
                    )
                if height[key] > MAX_DEPTH:
                    raise self.too_deep(node.start_mark, " once aliases (*name) are expanded")
                continue
            if key in values:
                continue
            if key in on_path:
                raise self.limit(
                    node.start_mark,
                    "an alias (*name) refers to a list or mapping that contains it",
                    "remove the alias: a config cannot contain itself",
                )
            on_path.add(key)
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in values)


class _FastLoader(_Loader):
    """:class:`_Loader` with its events from libyaml: about five times faster.

    Scanning and parsing are most of PyYAML's time, and libyaml does them in C
    with explicit stacks (no recursion); composing, the limits and constructing
    stay in Python, as above.
    """

    def __init__(self, text: str, file: str, max_values: int) -> None:
        super().__init__(text, file, max_values)
        self.events = CParser(text)

    def check_event(self, *choices: object) -> bool:
        return self.events.check_event(*choices)

    def peek_event(self) -> yaml.Event | None:
        return self.events.peek_event()

    def get_event(self) -> yaml.Event | None:
        return self.events.get_event()

    def next_mark(self) -> _Mark | None:
        event = self.events.peek_event()
        return event.start_mark if event is not None else None

    def dispose(self) -> None:
        self.events.dispose()
        super().dispose()


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _construct_mapping(loader: _Loader, node: MappingNode) -> dict[object, object]:
    seen: dict[object, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if first is not None:
            shown = quote(key) if isinstance(key, str) else clip(repr(key))
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {shown} (first given on line {first + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    mapping: dict[object, object] = loader.construct_mapping(node, deep=True)
    return mapping


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    body = text.replace("_", "").lstrip("+-")
    most, digits = INT_DIGITS_MAX, body.replace(":", "")  # decimal, or base 60 (1:30)
    for prefix in ("0x", "0b", "0"):
        if body.startswith(prefix) and body != "0":
            most, digits = _PREFIXED_DIGITS_MAX[prefix], body[len(prefix) :]
            break
    if len(digits) > most:
        raise loader.limit(
            node.start_mark,
            f"an integer of {len(digits)} digits is too long",
            f"write integers with at most {most} digits: no v6lb setting takes a larger one",
        )
    try:
        value: int = loader.construct_yaml_int(node)
    except ValueError:  # 0x_ and the like match YAML's integer pattern
        raise loader.limit(
            node.start_mark, f"{quote(text)} is not a number", "write the digits"
        ) from None
    return value


def _construct_float(loader: _Loader, node: yaml.ScalarNode) -> float:
    text = str(loader.construct_scalar(node))
    if len(text) > FLOAT_CHARS_MAX:
        raise loader.limit(
            node.start_mark,
            f"a number of {len(text)} characters is too long",
            f"write numbers with at most {FLOAT_CHARS_MAX} characters",
        )
    try:
        value: float = loader.construct_yaml_float(node)
    except ValueError:
        raise loader.limit(
            node.start_mark, f"{quote(text)} is not a number", "write the digits"
        ) from None
    return value


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
