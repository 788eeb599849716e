"""EDI loops into records: which loop is one record, and each record with its enclosing loops and header."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from transforms.edi_segments import SEGMENT_TAG, EdiError, Segment

HL_LEVEL_NAMES = {"S": "shipment", "O": "order", "T": "tare", "P": "pack", "I": "item"}

_HL_SPEC = re.compile(r"HL:([A-Za-z0-9]{1,2})")


@dataclass(frozen=True)
class LoopSpec:
    """Which loop is one record: an HL level code, or trigger tags from outermost to the record's own."""

    hl_level: str | None = None
    tags: tuple[str, ...] = ()


def compile_loop_spec(fmt: str, records: str | None) -> LoopSpec:
    """Parse a route's ``records`` for an EDI format; raises ValueError saying what is expected."""
    example = "HL:I (the 856's item loops) or LIN" if fmt == "x12" else "CPS/LIN (DESADV) or LIN (INVRPT)"
    if not records or not records.strip():
        raise ValueError(f"records is required for {fmt}: the loop that is one record, e.g. {example}")
    text = records.strip()
    hl = _HL_SPEC.fullmatch(text)
    if hl is not None:
        if fmt != "x12":
            raise ValueError(f"records {records!r}: HL loops are X12; for edifact give tags, e.g. {example}")
        return LoopSpec(hl_level=hl.group(1).upper())
    tags = tuple(part.strip() for part in text.split("/"))
    for tag in tags:
        if not SEGMENT_TAG.fullmatch(tag) or tag == "HL":
            raise ValueError(
                f"records {records!r} must be HL:<level code> or segment tags joined by '/', e.g. {example}"
            )
    if len(set(tags)) != len(tags):
        raise ValueError(f"records {records!r} repeats a tag")
    return LoopSpec(tags=tags)


Segments = dict[str, list[dict[str, Any]]]


def add_segment(segments: Segments, segment: Segment) -> None:
    """Append ``segment`` as a mapping sees it under its tag."""
    segments.setdefault(segment.tag, []).append(segment.as_dict())


@dataclass
class _Loop:
    name: str
    key: str
    segments: Segments
    is_record: bool
    start: int


class LoopBuilder:
    """Groups a transaction's segments into records (own loop + enclosing loops + header)."""

    def __init__(self, spec: LoopSpec, summary_tags: frozenset[str]) -> None:
        self._spec = spec
        self._summary_tags = summary_tags
        self._header: Segments = {}
        self._stack: list[_Loop] = []
        self._in_summary = False
        self.items: list[tuple[int, dict[str, Any]]] = []
        """(first segment position, record body) of each completed record, in order."""
        self.hl_segments = 0
        self.lin_segments = 0

    def add(self, segment: Segment) -> None:
        """Take the next segment of the transaction (not its header or trailer); raises EdiError."""
        if segment.tag == "HL":
            self.hl_segments += 1
        elif segment.tag == "LIN":
            self.lin_segments += 1
        if self._in_summary:
            return
        if segment.tag in self._summary_tags:
            self._emit()
            self._stack.clear()
            self._in_summary = True
            return
        if self._spec.hl_level is not None and segment.tag == "HL":
            self._open_hl(segment)
        elif segment.tag in self._spec.tags:
            self._open_tag(segment)
        elif self._stack:
            add_segment(self._stack[-1].segments, segment)
        else:
            add_segment(self._header, segment)

    def close(self) -> None:
        """The transaction ended: its last record is complete."""
        self._emit()
        self._stack.clear()

    def _open_hl(self, segment: Segment) -> None:
        self._emit()
        hl_id, parent, code = segment.value(1), segment.value(2), segment.value(3)
        if not hl_id:
            raise EdiError(segment, "HL01 (the loop's id) is empty")
        if parent:
            while self._stack and self._stack[-1].key != parent:
                self._stack.pop()
            if not self._stack:
                raise EdiError(
                    segment, f"HL02 parent {parent!r} is not an enclosing HL loop (HL loops go parent first)"
                )
        else:
            self._stack.clear()
        name = HL_LEVEL_NAMES.get(code, f"hl_{code.lower()}")
        self._stack.append(_Loop(name, hl_id, {}, code == self._spec.hl_level, segment.position))
        add_segment(self._stack[-1].segments, segment)

    def _open_tag(self, segment: Segment) -> None:
        self._emit()
        level = self._spec.tags.index(segment.tag)
        while self._stack and self._spec.tags.index(self._stack[-1].key) >= level:
            self._stack.pop()
        is_record = level == len(self._spec.tags) - 1
        self._stack.append(_Loop(segment.tag.lower(), segment.tag, {}, is_record, segment.position))
        add_segment(self._stack[-1].segments, segment)

    def _emit(self) -> None:
        if not self._stack or not self._stack[-1].is_record:
            return
        own = self._stack[-1]
        body: dict[str, Any] = dict(own.segments)
        body["header"] = self._header
        for loop in self._stack[:-1]:
            body[loop.name] = loop.segments
        self.items.append((own.start, body))
        # The record is complete: a later segment must not be added to it.
        own.is_record = False
        own.segments = {}


def envelope_segments(segments: Iterable[Segment]) -> dict[str, list[dict[str, Any]]]:
    """Envelope segments as the mapping sees them under ``envelope``."""
    result: Segments = {}
    for segment in segments:
        add_segment(result, segment)
    return result
