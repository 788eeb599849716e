"""Streaming record splitters: turn a CSV, XML, JSON, JSONL or EDI file into raw records one at a time.

Memory stays flat whatever the file size: CSV and JSONL are read line by line, XML with lxml's
iterparse (each record element is cleared once yielded), JSON with ijson for simple record paths,
X12 and EDIFACT segment by segment (transforms.x12, transforms.edifact) one transaction at a time.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import ijson
import jmespath
from jmespath.exceptions import JMESPathError
from lxml import etree

if TYPE_CHECKING:
    from transforms.fixed_width import FixedLayout

RecordFormat = Literal["csv", "xml", "json", "jsonl", "fixed", "x12", "edifact"]
FORMATS: tuple[str, ...] = ("csv", "xml", "json", "jsonl", "fixed", "x12", "edifact")

MAX_LINE_BYTES = 16 * 1024 * 1024
"""Longest physical line read from CSV/JSONL; beyond it the file is refused rather than buffered."""
MAX_HEADER_ELEMENTS = 10_000
"""Most child elements an XML element may have before its first record: they are kept in memory as
the records' header, so a document with more (usually a wrong ``records``) is refused instead."""

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects in a JSON document or JSONL line. Deeper input is refused:
it is no inventory record, and Python's JSON encoder and decoder recurse once per level."""

MAX_REASON_CHARS = 2000
"""Longest reason kept for a file or a record: a huge field quoted in a message is cut in the middle."""

_XML_STEP = re.compile(r"\*|[A-Za-z_][\w.\-]*")
_SIMPLE_JSON_PATH = re.compile(r"(?:@|(?P<dotted>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*))?(?:\[\*\])?")
_LIBXML_POSITION = re.compile(r", line \d+, column \d+$")
_SURROGATE = re.compile("[\ud800-\udfff]")

# The C backend (yajl2_c) crashes the process on an integer of more than 4300 digits (it mishandles
# Python's int() error) and turns lone surrogates into "?"; the pure-Python one refuses the first and
# keeps the second, exactly like the json module does for JSONL.
_IJSON = ijson.get_backend("python")
# That backend hands over the events of a whole read at once, at a cost that grows with the square
# of the nesting: small reads let a too-deep document be refused after a few KiB, not minutes.
_IJSON_READ_BYTES = 4096


def shorten(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut in the middle to at most ``limit`` characters, keeping how it starts and ends."""
    if len(text) <= limit:
        return text
    marker = f" ... [{len(text) - limit} characters cut] ... "
    head = (limit - len(marker)) * 2 // 3
    return text[:head] + marker + text[len(text) - (limit - len(marker) - head) :]
_COUNT = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class RawRecord:
    """One record split from an upstream message, before mapping.

    ``number`` is 1-based within the file; ``line`` is where the record starts (None for JSON).
    ``data`` is a column->value dict (CSV, fixed-width), the decoded object (JSON/JSONL) or the record
    element as an XML string (XML). ``error`` is a record-level problem; such a record still arrives
    so the caller can dead-letter it and go on, and its ``data`` is then the raw text as found in the
    file.
    """

    number: int
    line: int | None
    data: Any
    error: str | None = None
    document: Any = None
    """What the record's mapping may read of the document around it (``from: document``, XPath
    ``..``): the header fields before it, never the siblings already emitted. None when the format
    has no document around its records. Records under the same header share one object."""


@dataclass(frozen=True)
class CsvDialect:
    """How a route's CSV files are written: the field delimiter, the text encoding, the number of
    ``KEY;VALUE`` preamble lines before the column header, and the trailer row's key."""

    delimiter: str = ","
    encoding: str = "utf-8"
    preamble: int = 0
    trailer: str | None = None


class FileFormatError(Exception):
    """The file as a whole cannot be parsed, so none of it may be ingested."""

    def __init__(self, name: str, line: int | None, column: int | None, reason: str) -> None:
        self.name = name
        self.line = line
        self.column = column
        self.reason = shorten(reason)
        super().__init__(name, line, column, self.reason)

    def __str__(self) -> str:
        position = self.name
        if self.line is not None:
            position += f":{self.line}"
            if self.column is not None:
                position += f":{self.column}"
        return f"{position}: {self.reason}"


def check_records_path(fmt: str, records: str | None) -> None:
    """Raise ValueError when ``records`` is not a usable record path for ``fmt`` (for config checks)."""
    _compile_splitter(fmt, records)


def iter_records(
    stream: BinaryIO,
    fmt: RecordFormat,
    records: str | None,
    name: str,
    *,
    csv_delimiter: str = ",",
    encoding: str = "utf-8",
    csv_preamble: int = 0,
    csv_trailer: str | None = None,
    fixed: FixedLayout | None = None,
) -> Iterator[RawRecord]:
    """Stream the records of one file; ``name`` is used in error messages.

    Raises ValueError at once for an unusable ``fmt``/``records``/``encoding``; raises
    FileFormatError while iterating when the file itself is broken. ``encoding`` applies to CSV and
    JSONL (XML declares its own; JSON must be UTF-8; a fixed layout names its own). A UTF-8 byte
    order mark is always skipped. ``csv_preamble``/``csv_trailer`` and ``fixed`` are described at
    :class:`CsvDialect` and :mod:`transforms.fixed_width`.
    """
    splitter = _compile_splitter(fmt, records)
    if fmt in ("csv", "jsonl"):
        _check_line_encoding(encoding)
    if fmt == "csv" and (len(csv_delimiter) != 1 or csv_delimiter in '"\r\n'):
        raise ValueError(
            f"csv delimiter must be one character other than a quote or newline, not {csv_delimiter!r}"
        )
    if fmt == "csv" and csv_preamble < 0:
        raise ValueError(f"csv preamble must be a number of lines (0 or more), not {csv_preamble}")
    if fmt == "fixed":
        if fixed is None:
            raise ValueError("format fixed needs a fixed: layout (fields or record_types)")
        _check_line_encoding(fixed.encoding)
    return splitter(
        stream,
        name,
        csv_delimiter=csv_delimiter,
        encoding=encoding,
        csv_preamble=csv_preamble,
        csv_trailer=csv_trailer,
        fixed=fixed,
    )


def check_file(path: Path, fmt: RecordFormat, records: str | None, **options: Any) -> int:
    """Read the whole file once and return its record count; raises FileFormatError if it is broken.

    A file source runs this before publishing anything, so a broken file is never half-ingested.
    Records with record-level errors count: they are dead-lettered later, one by one.
    """
    count = 0
    with path.open("rb") as stream:
        for _ in iter_records(stream, fmt, records, path.name, **options):
            count += 1
    return count


Splitter = Callable[..., Iterator[RawRecord]]


def _compile_splitter(fmt: str, records: str | None) -> Splitter:
    if fmt == "csv":
        if records not in (None, "rows"):
            raise ValueError(f"records for csv must be 'rows' (or omitted), not {records!r}")
        return _csv_records
    if fmt == "jsonl":
        if records not in (None, "@", "rows"):
            raise ValueError(
                f"records does not apply to jsonl (each line is one record); omit it, not {records!r}"
            )
        return _jsonl_records
    if fmt == "xml":
        if not records:
            raise ValueError("records is required for xml: an element path such as /ASN/Line or //Line")
        path_matches = _compile_xml_path(records)
        return lambda stream, name, **_: _xml_records(stream, name, records, path_matches)
    if fmt == "json":
        return _compile_json_path(records)
    if fmt == "fixed":
        if records is not None:
            raise ValueError("records does not apply to fixed (detail lines are the records); omit it")
        return _fixed_records
    if fmt in ("x12", "edifact"):
        # Imported here: the EDI readers build on this module's RawRecord and FileFormatError.
        from transforms import edifact, x12

        return (x12 if fmt == "x12" else edifact).splitter(records)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _fixed_records(stream: BinaryIO, name: str, *, fixed: FixedLayout, **_: Any) -> Iterator[RawRecord]:
    return fixed.records(_numbered(_LineReader(stream, name, fixed.encoding)), name)


def _numbered(lines: _LineReader) -> Iterator[tuple[int, str]]:
    for text in lines:
        lines.pending.clear()  # only CSV needs a record's raw lines back
        yield lines.line, text


def _check_line_encoding(encoding: str) -> None:
    try:
        codec = codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}") from None
    # Lines are split on b"\n" before decoding, which is only sound for ASCII-compatible encodings.
    if codec.encode('\n,;"')[0] != b'\n,;"':
        raise ValueError(f"encoding {encoding!r} is not ASCII-compatible; CSV/JSONL files must be")


class _LineReader:
    """Yields decoded physical lines with their numbers, keeping the lines of the current record."""

    def __init__(self, stream: BinaryIO, name: str, encoding: str) -> None:
        self._stream = stream
        self._name = name
        codec_name = codecs.lookup(encoding).name
        self._first_encoding = "utf-8-sig" if codec_name in ("utf-8", "utf-8-sig") else codec_name
        self._encoding = "utf-8" if codec_name == "utf-8-sig" else codec_name
        self.line = 0
        self.exhausted = False
        self.pending: list[str] = []

    def __iter__(self) -> Iterator[str]:
        while raw := self._stream.readline(MAX_LINE_BYTES + 1):
            self.line += 1
            if len(raw) > MAX_LINE_BYTES:
                raise FileFormatError(
                    self._name, self.line, None, f"line is longer than {MAX_LINE_BYTES} bytes"
                )
            encoding = self._first_encoding if self.line == 1 else self._encoding
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as error:
                bad = raw[error.start : error.start + 1].hex()
                raise FileFormatError(
                    self._name,
                    self.line,
                    None,
                    f"invalid {self._encoding} byte 0x{bad} at byte {error.start + 1} of the line",
                ) from None
            self.pending.append(text)
            yield text
        self.exhausted = True


def _csv_records(
    stream: BinaryIO,
    name: str,
    *,
    csv_delimiter: str,
    encoding: str,
    csv_preamble: int = 0,
    csv_trailer: str | None = None,
    **_: Any,
) -> Iterator[RawRecord]:
    lines = _LineReader(stream, name, encoding)
    reader = csv.reader(lines, delimiter=csv_delimiter, strict=True)
    header: list[str] | None = None
    document: dict[str, str] | None = {} if csv_preamble else None
    trailer_line: int | None = None
    number = 0
    while True:
        start = lines.line + 1
        lines.pending.clear()
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            if lines.exhausted:
                raise FileFormatError(
                    name, start, None, f"CSV quoted field is never closed ({error})"
                ) from None
            if header is None:
                raise FileFormatError(name, start, None, f"CSV header row is malformed: {error}") from None
            number += 1
            yield RawRecord(number, start, "".join(lines.pending), f"row is malformed CSV: {error}")
            continue
        values = [value.strip() for value in row]
        if not any(values):
            continue
        if trailer_line is not None:
            raise FileFormatError(
                name, start, None, f"row after the trailer {csv_trailer!r} of line {trailer_line}"
            )
        if document is not None and len(document) < csv_preamble:
            _preamble_entry(document, values, name, start, csv_delimiter)
            continue
        if header is None:
            header = _csv_header(values, name, start)
            continue
        if csv_trailer is not None and values[0] == csv_trailer:
            if len(values) != 2:
                raise FileFormatError(
                    name,
                    start,
                    None,
                    f"trailer must be {csv_trailer}{csv_delimiter}COUNT; found {len(values)} fields",
                )
            check_trailer_count(values[1], number, name, start, csv_trailer)
            trailer_line = start
            continue
        number += 1
        if len(values) != len(header):
            error_text = f"row has {len(values)} fields; header has {len(header)}"
            yield RawRecord(number, start, "".join(lines.pending), error_text, document)
            continue
        yield RawRecord(number, start, dict(zip(header, values, strict=True)), document=document)
    if header is None:
        raise FileFormatError(name, None, None, "CSV file has no header row")
    if csv_trailer is not None and trailer_line is None:
        raise FileFormatError(
            name,
            lines.line,
            None,
            f"CSV file ends without its trailer row {csv_trailer!r}; it may be cut short",
        )


def _preamble_entry(
    document: dict[str, str], values: list[str], name: str, line: int, delimiter: str
) -> None:
    """One ``KEY;VALUE`` line of a CSV preamble (the store id, export date before the column header)."""
    if len(values) != 2 or not values[0]:
        raise FileFormatError(
            name, line, None, f"preamble line must be KEY{delimiter}VALUE; found {len(values)} field(s)"
        )
    if values[0] in document:
        raise FileFormatError(name, line, None, f"preamble repeats the key {values[0]!r}")
    document[values[0]] = values[1]


def check_trailer_count(count: str, read: int, name: str, line: int, what: str) -> None:
    """A trailer's record count must match the records read before it, or the whole file is refused."""
    if not _COUNT.fullmatch(count):
        raise FileFormatError(name, line, None, f"trailer {what!r} count must be digits, not {count!r}")
    if int(count) != read:
        raise FileFormatError(
            name, line, None, f"trailer {what!r} counts {int(count)} record(s) but {read} were read"
        )


def _csv_header(columns: list[str], name: str, line: int) -> list[str]:
    seen: set[str] = set()
    for position, column in enumerate(columns, start=1):
        if not column:
            raise FileFormatError(name, line, None, f"CSV header column {position} is empty")
        if column in seen:
            raise FileFormatError(name, line, None, f"CSV header repeats column {column!r}")
        seen.add(column)
    return columns


def _reject_json_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not a number JSON allows")


def loads_json(text: str, *, exact: bool = True) -> Any:
    """Strict JSON: NaN and Infinity refused (ValueError); with ``exact``, non-integers are Decimal."""
    if exact:
        return json.loads(text, parse_float=Decimal, parse_constant=_reject_json_constant)
    return json.loads(text, parse_constant=_reject_json_constant)


def _jsonl_records(stream: BinaryIO, name: str, *, encoding: str, **_: Any) -> Iterator[RawRecord]:
    lines = _LineReader(stream, name, encoding)
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


def _compile_json_path(records: str | None) -> Splitter:
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


XmlPathMatcher = Callable[[tuple[str, ...]], bool]


def _compile_xml_path(records: str) -> XmlPathMatcher:
    """Compile the streaming XPath subset: element names joined by / or //, optionally absolute."""
    text = records.strip()
    unsupported = (
        f"records {records!r} is outside the streaming XPath subset: element names joined by '/' or '//', "
        "optionally starting with '/' or '//' (e.g. /ASN/Line, //Line, Lines/Line); '*' matches any element"
    )
    if text.startswith("//"):
        body, descendant, steps = text[2:], True, []
    elif text.startswith("/"):
        body, descendant, steps = text[1:], False, []
    else:
        # Like lxml's ElementTree.xpath, a relative path starts at the root element.
        body, descendant, steps = text, False, [(False, "*")]
    for part in body.split("/"):
        if part == "":
            if descendant:
                raise ValueError(unsupported)
            descendant = True
            continue
        if not _XML_STEP.fullmatch(part):
            raise ValueError(unsupported)
        steps.append((descendant, part))
        descendant = False
    if descendant or not body:
        raise ValueError(unsupported)
    compiled_steps = tuple(steps)

    @lru_cache(maxsize=1024)
    def matches(path: tuple[str, ...]) -> bool:
        return _path_matches(compiled_steps, path, 0, 0)

    return matches


def _path_matches(steps: tuple[tuple[bool, str], ...], path: tuple[str, ...], step: int, depth: int) -> bool:
    if step == len(steps):
        return depth == len(path)
    descendant, tag = steps[step]
    candidates = range(depth, len(path)) if descendant else range(depth, min(depth + 1, len(path)))
    return any((tag in ("*", path[at])) and _path_matches(steps, path, step + 1, at + 1) for at in candidates)


def safe_xml_parser() -> etree.XMLParser:
    """An lxml parser that expands no entities, loads no DTD and touches no network (XXE-safe)."""
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def _local_name(tag: str) -> str:
    return tag.rpartition("}")[2]


@dataclass
class _OpenElement:
    """An element whose end is not yet parsed: its place in the path and whether records started in it."""

    serial: int
    record: bool
    holds_records: bool = False
    kept: int = 0


def _xml_records(stream: BinaryIO, name: str, records: str, matches: XmlPathMatcher) -> Iterator[RawRecord]:
    """Records of the elements ``matches`` accepts, each with its ancestors' own content as context.

    An ancestor keeps the children that ended before its first record (its header: ShipTo, dates);
    a subtree that held records, and whatever ends after records started, is dropped once parsed,
    so memory holds the header and one record whatever the number of lines.
    """
    events = etree.iterparse(
        stream,
        events=("start", "end"),
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
    )
    path: list[str] = []
    stack: list[_OpenElement] = []
    open_records = 0
    number = serial = 0
    documents = _XmlDocuments()
    try:
        for event, element in events:
            if event == "start":
                path.append(_local_name(element.tag))
                serial += 1
                stack.append(_OpenElement(serial, matches(tuple(path))))
                open_records += stack[-1].record
                continue
            path.pop()
            state = stack.pop()
            if state.record:
                open_records -= 1
                number += 1
                for ancestor in stack:
                    ancestor.holds_records = True
                yield _xml_record(element, number, documents.context(element, stack))
            if open_records == 0:
                parent = element.getparent()
                if parent is None:
                    continue
                # A header child stays readable by the records that follow it; the rest is done with.
                if state.record or state.holds_records or stack[-1].holds_records:
                    parent.remove(element)
                    continue
                stack[-1].kept += 1
                if stack[-1].kept > MAX_HEADER_ELEMENTS:
                    raise FileFormatError(
                        name,
                        element.sourceline,
                        None,
                        f"<{path[-1]}> has more than {MAX_HEADER_ELEMENTS} child elements before its "
                        f"first record, all kept as the records' header (is records {records!r} right?)",
                    )
    except etree.XMLSyntaxError as error:
        # The parser's own log holds the first fatal error with its position; the exception sometimes
        # says only "no element found" (an undefined entity, for one).
        first = next(iter(events.error_log), None)
        if first is not None:
            line, column, message = first.line, first.column, first.message
        else:
            (line, column), message = error.position, _LIBXML_POSITION.sub("", error.msg or str(error))
        raise FileFormatError(name, line or None, column or None, f"XML syntax error: {message}") from None


class _XmlDocuments:
    """The document context of XML records: a trimmed copy of the ancestor chain, made once per header.

    Consecutive records under the same ancestors with the same header share one context object, so
    a chunk carries it once (see router.ingress).
    """

    def __init__(self) -> None:
        self._key: tuple[tuple[int, int], ...] = ()
        self._context: dict[str, Any] | None = None

    def context(self, element: Any, stack: list[_OpenElement]) -> dict[str, Any] | None:
        ancestors = list(element.iterancestors())[::-1]
        if not ancestors:
            return None
        chain = [*ancestors[1:], element]
        # The header of each ancestor is every child before the chain; later siblings may be parsed
        # ahead by lxml and are not part of the document yet.
        heads = [ancestor.index(child) for ancestor, child in zip(ancestors, chain, strict=True)]
        key = tuple(zip((state.serial for state in stack), heads, strict=True))
        if key != self._key or self._context is None:
            self._key = key
            self._context = {"xml": _trimmed_chain(ancestors, heads), "depth": len(ancestors)}
        return self._context


def _trimmed_chain(ancestors: list[Any], heads: list[int]) -> str:
    """The ancestors as one XML document: each with its attributes, text and header children only."""
    top: Any = None
    parent: Any = None
    for ancestor, head in zip(ancestors, heads, strict=True):
        copy = (
            etree.Element(ancestor.tag, attrib=dict(ancestor.attrib), nsmap=ancestor.nsmap)
            if parent is None
            else etree.SubElement(parent, ancestor.tag, attrib=dict(ancestor.attrib), nsmap=ancestor.nsmap)
        )
        copy.text = ancestor.text
        for child in ancestor[:head]:
            copy.append(deepcopy(child))
        top = copy if top is None else top
        parent = copy
    return etree.tostring(top, encoding="unicode")


def _xml_record(element: Any, number: int, document: dict[str, Any] | None) -> RawRecord:
    text = etree.tostring(element, encoding="unicode", with_tail=False)
    entity = next(element.iter(etree.Entity), None)
    if entity is not None:
        reason = f"record uses the entity {entity.text}, which is not expanded (DTD entities are disabled)"
        return RawRecord(number, element.sourceline, text, reason)
    return RawRecord(number, element.sourceline, text, document=document)
