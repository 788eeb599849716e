"""EDI segments as read from a file: text blocks in Latin-1, tags, delimiters, values and errors."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

MAX_SEGMENT_CHARS = 1 << 20
"""Longest segment read; beyond it the file is refused rather than buffered (a missing terminator)."""

READ_BLOCK = 1 << 16

LEADING_SPACE = "\r\n\t "
"""Line breaks and spaces before a segment, skipped: many partners end every segment with a line break."""

UTF8_BOM = "\xef\xbb\xbf"
"""A UTF-8 byte order mark as read in Latin-1."""

SEGMENT_TAG = re.compile(r"[A-Z][A-Z0-9]{1,2}")
"""Two or three upper-case letters or digits, the first a letter."""

Element = tuple[tuple[str, ...], ...]
"""One data element: its repetitions, each a tuple of components."""


@dataclass(frozen=True)
class Segment:
    """One segment with its 1-based position in the file, where error messages point."""

    tag: str
    elements: tuple[Element, ...]
    position: int

    @property
    def label(self) -> str:
        """How messages name the segment: ``segment 37 (SE)``."""
        return f"segment {self.position} ({self.tag})"

    def value(self, index: int, component: int = 1) -> str:
        """Element ``index`` (1-based), component ``component`` of its first repetition; "" if absent."""
        if index > len(self.elements) or not self.elements[index - 1]:
            return ""
        components = self.elements[index - 1][0]
        return components[component - 1] if component <= len(components) else ""

    def as_dict(self) -> dict[str, Any]:
        """The segment as a mapping sees it (see transforms.edi)."""
        result: dict[str, Any] = {}
        for index, repetitions in enumerate(self.elements, start=1):
            if not repetitions:
                continue
            first = repetitions[0]
            if first and first[0]:
                result[f"e{index}"] = first[0]
            if len(first) > 1:
                for number, component in enumerate(first, start=1):
                    if component:
                        result[f"e{index}_{number}"] = component
            if len(repetitions) > 1:
                result[f"r{index}"] = [list(repetition) for repetition in repetitions]
        return result


class EdiError(Exception):
    """A problem at one segment; ``str()`` names it: ``segment 37 (SE): SE01 says 35 segments, ...``."""

    def __init__(self, segment: Segment | None, reason: str) -> None:
        self.segment = segment
        self.reason = reason
        super().__init__(segment, reason)

    def __str__(self) -> str:
        return f"{self.segment.label}: {self.reason}" if self.segment is not None else self.reason


def check_delimiters(service: Segment, declared: dict[str, str], spaces: Collection[str]) -> None:
    """Refuse delimiters (role to character) that are letters, digits, ``spaces`` or not distinct."""
    for role, char in declared.items():
        if char.isalnum() or char in spaces:
            raise EdiError(service, f"the {role} is {char!r}; a delimiter cannot be a letter, digit or space")
    if len(set(declared.values())) != len(declared):
        raise EdiError(service, f"the {service.tag}'s delimiters are not distinct: {declared}")


def check_tag(tag: str, position: int) -> None:
    """Refuse anything that is not a segment tag (two or three upper-case letters or digits)."""
    if not SEGMENT_TAG.fullmatch(tag):
        shown = tag if len(tag) <= 20 else tag[:20] + "..."
        raise EdiError(None, f"segment {position}: {shown!r} is not a segment tag")


def read_blocks(stream: Any) -> Iterator[str]:
    """The stream as text blocks; Latin-1 maps every byte to one character, so no delimiter is lost
    and multi-byte text is decoded later, element by element, in the interchange's character set."""
    while block := stream.read(READ_BLOCK):
        yield block.decode("latin-1")


def read_head(blocks: Iterator[str], length: int) -> str:
    """At least ``length`` characters from the start of the file (fewer if it is shorter), without a
    byte order mark or leading line breaks; the blocks after them stay in ``blocks``."""
    head = ""
    for block in blocks:
        head += block
        if len(head) >= length:
            break
    return head.removeprefix(UTF8_BOM).lstrip(LEADING_SPACE)


def decode_text(text: str, charset: str, segment_label: str) -> str:
    """Re-decode a Latin-1-read value in the interchange's character set; raises EdiError if it is not."""
    if charset == "latin-1":
        return text
    try:
        return text.encode("latin-1").decode(charset)
    except UnicodeDecodeError as error:
        bad = text.encode("latin-1")[error.start : error.start + 1].hex()
        raise EdiError(None, f"{segment_label}: byte 0x{bad} is not valid {charset}") from None
