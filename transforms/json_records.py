"""The JSON and JSONL record splitters: strict, interoperable values, streamed where the path allows."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from copy import deepcopy
from decimal import Decimal
from typing import Any, BinaryIO

import ijson
import jmespath
from jmespath.exceptions import JMESPathError

from transforms.lines import LineReader
from transforms.records import FileFormatError, RawRecord, Splitter

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects in a JSON document or JSONL line. Deeper input is refused:
it is no inventory record, and Python's JSON encoder and decoder recurse once per level."""

_SIMPLE_JSON_PATH = re.compile(r"(?:@|(?P<dotted>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*))?(?:\[\*\])?")
_SURROGATE = re.compile("[\ud800-\udfff]")

# The C backend (yajl2_c) crashes the process on an integer of more than 4300 digits (it mishandles
# Python's int() error) and turns lone surrogates into "?"; the pure-Python one refuses the first and
# keeps the second, exactly like the json module does for JSONL.
_IJSON = ijson.get_backend("python")
# That backend hands over the events of a whole read at once, at a cost that grows with the square
# of the nesting: small reads let a too-deep document be refused after a few KiB, not minutes.
_IJSON_READ_BYTES = 4096


def _reject_json_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not a number JSON allows")


def loads_json(text: str, *, exact: bool = True) -> Any:
    """Strict JSON: NaN and Infinity refused (ValueError); with ``exact``, non-integers are Decimal."""
    if exact:
        return json.loads(text, parse_float=Decimal, parse_constant=_reject_json_constant)
    return json.loads(text, parse_constant=_reject_json_constant)


def jsonl_records(stream: BinaryIO, name: str, *, encoding: str, **_: Any) -> Iterator[RawRecord]:
    lines = LineReader(stream, name, encoding)
    number = 0
    for text in lines:
        lines.pending.clear()
        stripped = text.strip()
        if not stripped:
            continue
        number += 1
        try:
            value = loads_json(stripped)
        except json.JSONDecodeError as error:
            yield RawRecord(
                number, lines.line, stripped, f"line is not valid JSON: {error.msg} at column {error.colno}"
            )
            continue
        except ValueError as error:
            yield RawRecord(number, lines.line, stripped, f"line is not valid JSON: {error}")
            continue
        except RecursionError:
            yield RawRecord(number, lines.line, stripped, f"line {_TOO_DEEP}")
            continue
        problem = _json_problem(value)
        if problem is not None:
            yield RawRecord(number, lines.line, stripped, f"line {problem}")
            continue
        if not isinstance(value, dict):
            yield RawRecord(
                number,
                lines.line,
                stripped,
                f"line is {_with_article('JSON ' + _json_kind(value))}; expected an object",
            )
            continue
        yield RawRecord(number, lines.line, value)


_TOO_DEEP = f"nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"


def _json_problem(value: Any) -> str | None:
    """Why a decoded JSON value cannot travel on as a record, or None: too deep (whatever else is wrong),
    or text that is not Unicode."""
    problem = None
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                return _TOO_DEEP
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
        elif problem is None and isinstance(item, str) and (surrogate := _SURROGATE.search(item)):
            problem = _lone_surrogate(surrogate.group())
    return problem


def _lone_surrogate(char: str) -> str:
    return (
        f"holds the lone UTF-16 surrogate \\u{ord(char):04x}, which is not a Unicode character "
        "(a \\uXXXX escape pair cut in half?)"
    )


def _escape_surrogates(value: Any) -> Any:
    """``value`` with each lone surrogate written as its \\uXXXX escape, so it can be stored as UTF-8."""
    if isinstance(value, str):
        return _SURROGATE.sub(lambda found: f"\\u{ord(found.group()):04x}", value)
    if isinstance(value, list):
        return [_escape_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_escape_surrogates(key): _escape_surrogates(item) for key, item in value.items()}
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def _with_article(kind: str) -> str:
    return kind if kind == "null" else f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _ijson_reason(error: Exception) -> str:
    """What an ijson error says, without the context excerpt and the positions it holds."""
    reason = error.args[0] if error.args else ""
    if isinstance(reason, UnicodeDecodeError):
        return f"invalid UTF-8 byte 0x{reason.object[reason.start]:02x}"
    if isinstance(error, json.JSONDecodeError):
        # Raised for a bad escape inside a string, with a position within that string only.
        return f"string with {error.msg[0].lower()}{error.msg[1:]}"
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    lines = str(reason).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(error).__name__


class _SkipBom:
    """A read() view of a byte stream without its UTF-8 byte order mark."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._head: bytes | None = None

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        if self._head is None:
            head = self._stream.read(3)
            self._head = head[3:] if head.startswith(codecs.BOM_UTF8) else head
        if self._head:
            head, self._head = self._head, b""
            rest = self._stream.read(-1 if size < 0 else max(size - len(head), 0))
            return head + rest
        return self._stream.read(size)


_ITEM_END_EVENTS = frozenset({"end_map", "end_array", "string", "number", "boolean", "null"})
_EVENT_KINDS = {
    "start_map": "object",
    "string": "string",
    "number": "number",
    "boolean": "boolean",
    "null": "null",
}


def _json_streamed(stream: BinaryIO, name: str, expression: str, prefix: str) -> Iterator[RawRecord]:
    """Records of the array at ``prefix`` (an ijson prefix), read with ijson; numbers stay Decimal."""
    item_prefix = f"{prefix}.item" if prefix else "item"
    found = in_array = False
    builder: ijson.ObjectBuilder | None = None
    problem: str | None = None
    number = depth = 0
    # What precedes the array is the records' document (their header); what follows is not kept.
    head: ijson.ObjectBuilder | None = ijson.ObjectBuilder() if prefix else None
    document: Any = None
    try:
        for path, event, value in _IJSON.parse(_SkipBom(stream), use_float=False, buf_size=_IJSON_READ_BYTES):
            if event in ("start_map", "start_array"):
                depth += 1
                if depth > MAX_JSON_DEPTH:
                    # ijson spells out the path of every event, so going on would cost depth squared.
                    raise FileFormatError(name, None, None, f"JSON document {_TOO_DEEP}")
            elif event in ("end_map", "end_array"):
                depth -= 1
            if not in_array:
                if path == prefix and not found:
                    found = True
                    if event != "start_array":
                        kind = _with_article(_EVENT_KINDS.get(event, event))
                        raise FileFormatError(
                            name, None, None, f"records {expression!r} is {kind}; expected a list"
                        )
                    in_array = True
                    document = deepcopy(head.value) if head is not None else None
                    head = None
                elif head is not None:
                    head.event(event, value)
                continue
            if path == prefix and event == "end_array":
                in_array = False
                continue
            if builder is None:
                builder = ijson.ObjectBuilder()
            if problem is None and isinstance(value, str) and (surrogate := _SURROGATE.search(value)):
                problem = f"record {_lone_surrogate(surrogate.group())}"
            builder.event(event, value)
            if path == item_prefix and event in _ITEM_END_EVENTS:
                number += 1
                if problem is None:
                    yield RawRecord(number, None, builder.value, document=document)
                else:
                    yield RawRecord(number, None, _escape_surrogates(builder.value), problem, document)
                builder = None
                problem = None
    except (ijson.JSONError, json.JSONDecodeError) as error:
        raise FileFormatError(name, None, None, f"JSON syntax error: {_ijson_reason(error)}") from None
    if not found:
        raise FileFormatError(
            name, None, None, f"records {expression!r} is not in the document; expected a list"
        )


def _json_loaded(stream: BinaryIO, name: str, expression: str, compiled: Any) -> Iterator[RawRecord]:
    """Records found by a general JMESPath: the whole document is loaded, so memory grows with it."""
    content = stream.read()
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = content.count(b"\n", 0, error.start) + 1
        raise FileFormatError(name, line, None, f"invalid UTF-8 byte 0x{content[error.start]:02x}") from None
    try:
        document = loads_json(text)
    except json.JSONDecodeError as error:
        raise FileFormatError(name, error.lineno, error.colno, f"JSON syntax error: {error.msg}") from None
    except ValueError as error:
        raise FileFormatError(name, None, None, f"JSON syntax error: {error}") from None
    except RecursionError:
        raise FileFormatError(name, None, None, f"JSON document {_TOO_DEEP}") from None
    problem = _json_problem(document)
    if problem == _TOO_DEEP:
        raise FileFormatError(name, None, None, f"JSON document {problem}")
    found = compiled.search(document)
    if not isinstance(found, list):
        kind = "not in the document" if found is None else _with_article(_json_kind(found))
        raise FileFormatError(name, None, None, f"records {expression!r} is {kind}; expected a list")
    context = document_without(document, found)
    for number, value in enumerate(found, start=1):
        problem = _json_problem(value)
        if problem is None:
            yield RawRecord(number, None, value, document=context)
        else:
            yield RawRecord(number, None, _escape_surrogates(value), f"record {problem}", context)


def document_without(document: Any, records: Any) -> Any:
    """``document`` without the ``records`` list itself: what the records' ``from: document`` reads.

    A projection builds a new list that is not in the document; the document is then kept whole.
    """
    if document is records:
        return None
    if isinstance(document, dict):
        return {
            key: document_without(value, records) for key, value in document.items() if value is not records
        }
    if isinstance(document, list):
        return [document_without(value, records) for value in document if value is not records]
    return document


def compile_json_path(records: str | None) -> Splitter:
    """The splitter of the JSON records at ``records`` (a JMESPath; ValueError when it is not one)."""
    expression = (records or "@").strip()
    try:
        compiled = jmespath.compile(expression)
    except JMESPathError as error:
        raise ValueError(f"records {expression!r} is not a valid JMESPath expression: {error}") from None
    simple = _SIMPLE_JSON_PATH.fullmatch(expression)
    if simple is not None:
        prefix = simple.group("dotted") or ""
        return lambda stream, name, **_: _json_streamed(stream, name, expression, prefix)
    return lambda stream, name, **_: _json_loaded(stream, name, expression, compiled)
