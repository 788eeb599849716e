"""Streaming record splitters: turn a CSV, XML, JSON, JSONL or EDI file into raw records one at a time.

Memory stays flat whatever the file size: CSV and JSONL are read line by line, XML with lxml's
iterparse (each record element is cleared once yielded), JSON with ijson for simple record paths,
X12 and EDIFACT segment by segment (transforms.x12, transforms.edifact) one transaction at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

from transforms import edifact, x12
from transforms.csv_records import CsvDialect, csv_records
from transforms.fixed_width import FixedLayout
from transforms.json_records import compile_json_path, jsonl_records
from transforms.lines import LineReader, check_line_encoding, numbered
from transforms.records import FileFormatError, RawRecord, Splitter, shorten
from transforms.xml_records import compile_xml_splitter

__all__ = [
    "FORMATS",
    "CsvDialect",
    "FileFormatError",
    "RawRecord",
    "RecordFormat",
    "check_file",
    "check_records_path",
    "iter_records",
    "shorten",
]

RecordFormat = Literal["csv", "xml", "json", "jsonl", "fixed", "x12", "edifact"]
FORMATS: tuple[str, ...] = ("csv", "xml", "json", "jsonl", "fixed", "x12", "edifact")


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
        check_line_encoding(encoding)
    if fmt == "csv" and (len(csv_delimiter) != 1 or csv_delimiter in '"\r\n'):
        raise ValueError(
            f"csv delimiter must be one character other than a quote or newline, not {csv_delimiter!r}"
        )
    if fmt == "csv" and csv_preamble < 0:
        raise ValueError(f"csv preamble must be a number of lines (0 or more), not {csv_preamble}")
    if fmt == "fixed":
        if fixed is None:
            raise ValueError("format fixed needs a fixed: layout (fields or record_types)")
        check_line_encoding(fixed.encoding)
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


def _compile_splitter(fmt: str, records: str | None) -> Splitter:
    if fmt == "csv":
        if records not in (None, "rows"):
            raise ValueError(f"records for csv must be 'rows' (or omitted), not {records!r}")
        return csv_records
    if fmt == "jsonl":
        if records not in (None, "@", "rows"):
            raise ValueError(
                f"records does not apply to jsonl (each line is one record); omit it, not {records!r}"
            )
        return jsonl_records
    if fmt == "xml":
        return compile_xml_splitter(records)
    if fmt == "json":
        return compile_json_path(records)
    if fmt == "fixed":
        if records is not None:
            raise ValueError("records does not apply to fixed (detail lines are the records); omit it")
        return _fixed_records
    if fmt == "x12":
        return x12.splitter(records)
    if fmt == "edifact":
        return edifact.splitter(records)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _fixed_records(stream: BinaryIO, name: str, *, fixed: FixedLayout, **_: Any) -> Iterator[RawRecord]:
    return fixed.records(numbered(LineReader(stream, name, fixed.encoding)), name)
