"""Physical lines of a line-based file (CSV, JSONL, fixed-width), decoded with their numbers."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from typing import BinaryIO

from transforms.records import FileFormatError

MAX_LINE_BYTES = 16 * 1024 * 1024
"""Longest physical line read from CSV/JSONL; beyond it the file is refused rather than buffered."""


def check_line_encoding(encoding: str) -> None:
    """Raise ValueError for an encoding lines cannot be split in before decoding."""
    try:
        codec = codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}") from None
    # Lines are split on b"\n" before decoding, which is only sound for ASCII-compatible encodings.
    if codec.encode('\n,;"')[0] != b'\n,;"':
        raise ValueError(f"encoding {encoding!r} is not ASCII-compatible; CSV/JSONL files must be")


class LineReader:
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


def numbered(lines: LineReader) -> Iterator[tuple[int, str]]:
    """Each line with its number, for formats whose records are one line each."""
    for text in lines:
        lines.pending.clear()  # only CSV needs a record's raw lines back
        yield lines.line, text
