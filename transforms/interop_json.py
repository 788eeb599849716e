"""Interoperable JSON (RFC 7493, I-JSON) for outside documents: refuse what systems would read differently.

``json.loads`` accepts documents that other systems read differently or cannot store: lone UTF-16
surrogates (``"\\ud800"``, not encodable as UTF-8), duplicate object keys (which one wins?), numbers
beyond the range of a double (``1e400`` becomes infinity elsewhere), ``NaN``/``Infinity`` literals
(not JSON at all) and nesting deep enough to exhaust a recursive parser. :func:`loads_interoperable`
refuses all of them with the JSON path and what is wrong, before anything downstream sees the value.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects accepted; real payloads stay far below, recursion limits above."""

MAX_PROBLEMS = 20
"""At most this many problems are reported for one document; the first ones are enough to fix it."""

_DOUBLE_MAX = Decimal(repr(sys.float_info.max))
# An integer literal this long is beyond any double, and int() of it would be needlessly slow.
_LONGEST_INTEGER = len(str(int(sys.float_info.max))) + 1
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A complete string literal, or one bracket outside strings: enough to measure nesting without parsing.
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class JsonProblem(StrEnum):
    """What makes a document unacceptable; the value is the ``keyword`` reported to the sender."""

    ENCODING = "encoding"
    SYNTAX = "syntax"
    DEPTH = "max-depth"
    DUPLICATE_KEY = "duplicate-key"
    LONE_SURROGATE = "lone-surrogate"
    NUMBER_RANGE = "number-range"
    NON_FINITE = "non-finite"


@dataclass(frozen=True)
class JsonIssue:
    """One problem in a document: where (a JSON path such as ``$.events[3].qty``) and what."""

    problem: JsonProblem
    path: str
    message: str


class JsonRefused(ValueError):
    """The document is not interoperable JSON; ``issues`` lists what is wrong (at most MAX_PROBLEMS)."""

    def __init__(self, issues: list[JsonIssue]) -> None:
        first = issues[0]
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        super().__init__(f"{first.path}: {first.message}{more}")
        self.issues = issues

    @property
    def problem(self) -> JsonProblem:
        """The kind of the first problem found."""
        return self.issues[0].problem


class _Pairs(list[tuple[str, Any]]):
    """An object's members in document order, so duplicate keys survive until they are reported."""


@dataclass(frozen=True)
class _Unrepresentable:
    """A number literal that cannot be kept: beyond a double's range, or NaN/Infinity."""

    literal: str
    problem: JsonProblem


def _parse_int(literal: str) -> int | _Unrepresentable:
    digits = literal.lstrip("-")
    if len(digits) > _LONGEST_INTEGER or Decimal(literal).copy_abs() > _DOUBLE_MAX:
        return _Unrepresentable(literal, JsonProblem.NUMBER_RANGE)
    return int(literal)


def _parse_float(literal: str) -> Decimal | _Unrepresentable:
    value = Decimal(literal)
    if value.copy_abs() > _DOUBLE_MAX:
        return _Unrepresentable(literal, JsonProblem.NUMBER_RANGE)
    return value


def _parse_constant(literal: str) -> _Unrepresentable:
    return _Unrepresentable(literal, JsonProblem.NON_FINITE)


def printable(text: str) -> str:
    """``text`` with lone surrogates escaped (``\\ud800``), so it can be written in a UTF-8 answer."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _member_path(path: str, key: str) -> str:
    if _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}"
    escaped = printable(key.replace("\\", "\\\\").replace("'", "\\'"))
    return f"{path}['{escaped}']"


def _lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in ``text``, or None when it encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def _position(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"line {line} column {column} (char {offset})"


def _check_depth(text: str, max_depth: int) -> None:
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        bracket = match.group()
        if bracket in "[{":
            depth += 1
            if depth > max_depth:
                where = _position(text, match.start())
                raise JsonRefused(
                    [
                        JsonIssue(
                            JsonProblem.DEPTH,
                            "$",
                            f"arrays and objects nest deeper than {max_depth} levels at {where}",
                        )
                    ]
                )
        elif bracket in "]}":
            depth -= 1


class _Checker:
    """Walks a parsed document: reports every problem (up to MAX_PROBLEMS) and builds the plain value."""

    def __init__(self, exact: bool) -> None:
        self.exact = exact
        self.issues: list[JsonIssue] = []

    def report(self, problem: JsonProblem, path: str, message: str) -> None:
        if len(self.issues) < MAX_PROBLEMS:
            self.issues.append(JsonIssue(problem, path, message))

    def string(self, text: str, path: str, what: str) -> None:
        index = _lone_surrogate(text)
        if index is not None:
            self.report(
                JsonProblem.LONE_SURROGATE,
                path,
                f"{what} holds a lone UTF-16 surrogate \\u{ord(text[index]):04x} at character {index}; "
                "a surrogate must be half of a pair (it cannot be written as UTF-8)",
            )

    def value(self, node: Any, path: str) -> Any:
        if isinstance(node, _Pairs):
            return dict(self.members(node, path))
        if isinstance(node, list):
            return [self.value(item, f"{path}[{index}]") for index, item in enumerate(node)]
        if isinstance(node, str):
            self.string(node, path, "the string")
            return node
        if isinstance(node, _Unrepresentable):
            if node.problem is JsonProblem.NON_FINITE:
                message = f"{node.literal} is not a JSON number; JSON has no NaN or Infinity"
            else:
                shown = node.literal if len(node.literal) <= 40 else node.literal[:37] + "..."
                message = f"the number {shown} is beyond the range of a double (about 1.8e308)"
            self.report(node.problem, path, message)
            return None
        if isinstance(node, Decimal) and not self.exact:
            return float(node)
        return node

    def members(self, pairs: _Pairs, path: str) -> Iterator[tuple[str, Any]]:
        seen: set[str] = set()
        for key, item in pairs:
            member = _member_path(path, key)
            self.string(key, member, "the key")
            if key in seen:
                self.report(
                    JsonProblem.DUPLICATE_KEY,
                    member,
                    f"the key {printable(key)!r} appears more than once in this object; send each key once",
                )
                continue
            seen.add(key)
            yield key, self.value(item, member)


def loads_interoperable(body: bytes, *, exact: bool = True, max_depth: int = MAX_DEPTH) -> Any:
    """Decode a UTF-8 JSON document, or raise JsonRefused naming every problem's path.

    With ``exact``, non-integer numbers are Decimal (quantities are never rounded through a float).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise JsonRefused(
            [JsonIssue(JsonProblem.ENCODING, "$", f"not UTF-8: invalid byte at offset {error.start}")]
        ) from None
    _check_depth(text, max_depth)
    try:
        parsed = json.loads(
            text,
            object_pairs_hook=_Pairs,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except json.JSONDecodeError as error:
        raise JsonRefused(
            [
                JsonIssue(
                    JsonProblem.SYNTAX,
                    "$",
                    f"line {error.lineno} column {error.colno} (char {error.pos}): {error.msg}",
                )
            ]
        ) from None
    checker = _Checker(exact)
    value = checker.value(parsed, "$")
    if checker.issues:
        raise JsonRefused(checker.issues)
    return value
