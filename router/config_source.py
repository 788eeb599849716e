"""Reading routes.yaml: YAML with positions, `${VAR}` interpolation, and problems as `FILE:LINE:COL: message`.

The configuration is read with ruamel.yaml so that every key and value keeps its line and column; the
models in :mod:`router.config` then validate plain Python data, and any problem found there is
reported at the position of the key or value it concerns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.nodes import MappingNode, Node, SequenceNode

from ops.secrets import SECRETS

ConfigPath = tuple[str | int, ...]

MAX_EXPANDED_VALUES = 100_000
"""Values a configuration may hold once YAML aliases are expanded; real ones hold a few thousand."""
_YAML_TAG_PREFIX = "tag:yaml.org,2002:"
_PLAIN_TAGS = frozenset(
    _YAML_TAG_PREFIX + name
    for name in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "merge")
)

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


@dataclass(frozen=True, order=True)
class ConfigProblem:
    """One problem in a configuration file, at a 1-based line and column."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every problem found, in file order."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


@dataclass(frozen=True)
class Position:
    """Where a key and its value start (1-based)."""

    key_line: int
    key_column: int
    value_line: int
    value_column: int


@dataclass
class ConfigDocument:
    """A parsed, interpolated configuration: plain data plus the position of every key and item."""

    file: str
    data: Any
    positions: dict[ConfigPath, Position] = field(default_factory=dict)
    problems: list[ConfigProblem] = field(default_factory=list)

    def problem(self, path: ConfigPath, message: str, *, at_key: bool = False) -> None:
        """Record a problem at ``path``: its value (or key), else the nearest enclosing entry found.

        Known secrets in the message are masked: a problem may quote the value it is about.
        """
        line, column = self.locate(path, at_key=at_key)
        self.problems.append(ConfigProblem(self.file, line, column, SECRETS.mask(message)))

    def locate(self, path: ConfigPath, *, at_key: bool = False) -> tuple[int, int]:
        for depth in range(len(path), 0, -1):
            position = self.positions.get(tuple(path[:depth]))
            if position is not None:
                exact = depth == len(path)
                if exact and not at_key:
                    return position.value_line, position.value_column
                return position.key_line, position.key_column
        return 1, 1


def interpolate(text: str, env: Mapping[str, str], missing: list[str]) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` (default when unset or empty); ``$$`` is a literal ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name")
        value = env.get(name)
        if value:
            return value
        default = match.group("default")
        if default is not None:
            return default
        if value is None:
            missing.append(name)
        return ""

    return _VARIABLE.sub(replace, text)


def read_document(path: Path, env: Mapping[str, str]) -> ConfigDocument:
    """Parse ``path`` into a :class:`ConfigDocument`; YAML syntax errors become problems."""
    document = ConfigDocument(str(path), None)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        document.problems.append(ConfigProblem(str(path), 1, 1, "configuration file not found"))
        return document
    except (OSError, UnicodeDecodeError) as error:
        document.problems.append(ConfigProblem(str(path), 1, 1, f"cannot read the configuration: {error}"))
        return document
    try:
        # The node graph is checked before anything is built from it: an alias bomb composes into a
        # few nodes but expands into billions of values, and tags beyond plain YAML must not construct.
        refused = _refuse_unusual_nodes(YAML(typ="rt").compose(text))
        if refused is not None:
            node, message = refused
            mark = node.start_mark
            document.problems.append(ConfigProblem(str(path), mark.line + 1, mark.column + 1, message))
            return document
        tree = YAML(typ="rt").load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        reason = " ".join(part for part in (error.context, error.problem) if part)
        document.problems.append(ConfigProblem(str(path), line, column, f"YAML syntax: {reason}"))
        return document
    except RecursionError:
        document.problems.append(
            ConfigProblem(str(path), 1, 1, "YAML nests too deeply to read; routes.yaml needs a few levels")
        )
        return document
    document.data = _plain(tree, (), document, env)
    return document


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def _refuse_unusual_nodes(root: Node | None) -> tuple[Node, str] | None:
    """The first node that cannot be used, and why: a tag beyond plain YAML, a recursive alias, or
    aliases that expand the document beyond MAX_EXPANDED_VALUES.

    Each node is visited once (aliases share nodes), so the check is as fast as the text is long.
    """
    expanded: dict[int, int] = {}
    ancestors: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)] if root is not None else []
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            ancestors.discard(key)
            expanded[key] = 1 + sum(expanded[id(child)] for child in _children(node))
            if expanded[key] > MAX_EXPANDED_VALUES:
                return node, (
                    f"YAML aliases expand this document beyond {MAX_EXPANDED_VALUES} values "
                    "(an alias bomb?); a configuration needs far fewer: write the values out "
                    "or nest fewer aliases"
                )
            continue
        if key in expanded:
            continue
        if key in ancestors:
            return node, "a YAML alias refers to a value that contains it; write the value out"
        tag = str(node.tag)
        if tag not in _PLAIN_TAGS:
            shown = tag.replace(_YAML_TAG_PREFIX, "!!")
            return node, (
                f"YAML tag {shown} is not allowed; routes.yaml is plain YAML "
                "(mappings, lists, strings, numbers, booleans, null, dates)"
            )
        ancestors.add(key)
        stack.append((node, True))
        # Reversed, so that the first problem in file order is the one reported.
        stack.extend((child, False) for child in reversed(_children(node)))
    return None


def _plain(node: Any, path: ConfigPath, document: ConfigDocument, env: Mapping[str, str]) -> Any:
    """Copy the ruamel tree into plain Python values, recording positions and interpolating strings."""
    if isinstance(node, CommentedMap):
        result: dict[Any, Any] = {}
        for key, value in node.items():
            # A key merged in with ``<<: *anchor`` has no position of its own: it takes the mapping's.
            key_line, key_column, value_line, value_column = node.lc.data.get(
                key, (node.lc.line, node.lc.col, node.lc.line, node.lc.col)
            )
            document.positions[(*path, key)] = Position(
                key_line + 1, key_column + 1, value_line + 1, value_column + 1
            )
            result[str(key) if isinstance(key, str) else key] = _plain(value, (*path, key), document, env)
        return result
    if isinstance(node, CommentedSeq):
        items = []
        for index, value in enumerate(node):
            line, column = node.lc.data[index]
            document.positions[(*path, index)] = Position(line + 1, column + 1, line + 1, column + 1)
            items.append(_plain(value, (*path, index), document, env))
        return items
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, datetime | date):
        return node.isoformat()
    if isinstance(node, str):
        missing: list[str] = []
        value = interpolate(str(node), env, missing)
        for name in missing:
            document.problem(
                path, f"environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
            )
        return value
    return node
