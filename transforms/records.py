"""What every record splitter yields and raises: raw records, file-level errors and trailer counts."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

MAX_REASON_CHARS = 2000
"""Longest reason kept for a file or a record: a huge field quoted in a message is cut in the middle."""

_COUNT = re.compile(r"[0-9]+")


def shorten(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut in the middle to at most ``limit`` characters, keeping how it starts and ends."""
    if len(text) <= limit:
        return text
    marker = f" ... [{len(text) - limit} characters cut] ... "
    head = (limit - len(marker)) * 2 // 3
    return text[:head] + marker + text[len(text) - (limit - len(marker) - head) :]


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


def check_trailer_count(count: str, read: int, name: str, line: int, what: str) -> None:
    """A trailer's record count must match the records read before it, or the whole file is refused."""
    if not _COUNT.fullmatch(count):
        raise FileFormatError(name, line, None, f"trailer {what!r} count must be digits, not {count!r}")
    if int(count) != read:
        raise FileFormatError(
            name, line, None, f"trailer {what!r} counts {int(count)} record(s) but {read} were read"
        )


Splitter = Callable[..., Iterator[RawRecord]]
"""A compiled record splitter: ``(stream, name, **format options)`` to the file's records."""
