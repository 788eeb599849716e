"""The CSV record splitter: an optional ``KEY;VALUE`` preamble, a header row, rows, an optional trailer."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from transforms.lines import LineReader
from transforms.records import FileFormatError, RawRecord, check_trailer_count


@dataclass(frozen=True)
class CsvDialect:
    """How a route's CSV files are written: the field delimiter, the text encoding, the number of
    ``KEY;VALUE`` preamble lines before the column header, and the trailer row's key."""

    delimiter: str = ","
    encoding: str = "utf-8"
    preamble: int = 0
    trailer: str | None = None


def csv_records(
    stream: BinaryIO,
    name: str,
    *,
    csv_delimiter: str,
    encoding: str,
    csv_preamble: int = 0,
    csv_trailer: str | None = None,
    **_: Any,
) -> Iterator[RawRecord]:
    lines = LineReader(stream, name, encoding)
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


def _csv_header(columns: list[str], name: str, line: int) -> list[str]:
    seen: set[str] = set()
    for position, column in enumerate(columns, start=1):
        if not column:
            raise FileFormatError(name, line, None, f"CSV header column {position} is empty")
        if column in seen:
            raise FileFormatError(name, line, None, f"CSV header repeats column {column!r}")
        seen.add(column)
    return columns
