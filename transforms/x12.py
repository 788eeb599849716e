"""ANSI X12 interchanges (856 ship notice, 846 inventory advice, ...) as records, one transaction at a time.

The delimiters come from the fixed-length ISA segment: the element separator is its 4th character, the
repetition separator ISA11 (from version 00402), the component separator ISA16 and the segment
terminator the character after it. The envelope is checked as it is read: ISA13/IEA02 and IEA01 (the
group count), GS06/GE02 and GE01 (the transaction count), ST02/SE02 and SE01 (the segment count), and
CTT01 (the HL count of an 856, the LIN count otherwise). A broken envelope rejects the file naming the
segment; a transaction whose trailer or loops disagree has each of its records dead-lettered with the
reason, and the other transactions go on. No X12 library fit: pyx12 reads HIPAA maps only, badx12 is
unmaintained since 2018, so this is a small reader of the envelope and the loops.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from transforms import edi, edi_segments
from transforms.edi_loops import envelope_segments
from transforms.edi_segments import EdiError, Segment
from transforms.records import RawRecord, Splitter

ISA_LENGTH = 106
"""The ISA segment is fixed-length: 105 characters and its terminator."""

SUMMARY_TAGS = frozenset({"CTT"})
CHARSET = "utf-8"


@dataclass(frozen=True)
class Delimiters:
    """The separators an interchange declares in its ISA."""

    element: str
    component: str
    repetition: str | None
    segment: str


def read_delimiters(head: str) -> Delimiters:
    """The delimiters of the ISA at the start of ``head``; raises EdiError naming what is wrong."""
    isa = Segment("ISA", (), 1)
    if not head.startswith("ISA"):
        raise EdiError(isa, f"an X12 interchange starts with ISA, not {head[:3]!r}")
    if len(head) < ISA_LENGTH:
        raise EdiError(isa, f"the ISA is {ISA_LENGTH} characters long; the file has only {len(head)}")
    element = head[3]
    fields = head[: ISA_LENGTH - 1].split(element)
    if len(fields) != 17 or len(fields[16]) != 1:
        raise EdiError(
            isa,
            f"ISA is not the fixed {ISA_LENGTH} characters with 16 elements separated by {element!r} "
            f"(found {len(fields) - 1} separators in the first {ISA_LENGTH - 1} characters)",
        )
    component, segment = fields[16], head[ISA_LENGTH - 1]
    repetition = fields[11] if fields[12] >= "00402" and not fields[11].isalnum() else None
    declared = {"element separator": element, "component separator ISA16": component, "terminator": segment}
    if repetition is not None:
        declared["repetition separator ISA11"] = repetition
    # Only a space is refused: a line break is a common X12 segment terminator.
    edi_segments.check_delimiters(isa, declared, frozenset(" "))
    return Delimiters(element, component, repetition, segment)


def splitter(records: str | None) -> Splitter:
    """The record splitter for a route's ``records`` (``HL:I``, ``LIN``, ...); raises ValueError."""
    return edi.edi_splitter("x12", records, _Reader)


def _segment_texts(stream: BinaryIO) -> Iterator[tuple[str, Delimiters]]:
    """Segment texts split on the ISA's terminator, leading line breaks dropped."""
    blocks = edi_segments.read_blocks(stream)
    head = edi_segments.read_head(blocks, ISA_LENGTH + len(edi_segments.UTF8_BOM) + 16)
    delimiters = read_delimiters(head)
    terminator = delimiters.segment
    buffer = head
    position = 0
    while True:
        *complete, buffer = buffer.split(terminator)
        for text in complete:
            text = text.lstrip(edi_segments.LEADING_SPACE)
            if text:
                position += 1
                yield text, delimiters
        if len(buffer) > edi_segments.MAX_SEGMENT_CHARS:
            raise EdiError(
                None,
                f"segment {position + 1}: longer than {edi_segments.MAX_SEGMENT_CHARS} characters "
                f"without {terminator!r}",
            )
        block = next(blocks, None)
        if block is None:
            break
        buffer += block
    if buffer.strip(edi_segments.LEADING_SPACE):
        raise EdiError(
            None,
            f"segment {position + 1}: the file ends inside a segment ({buffer.strip()[:20]!r} has no "
            f"terminator {terminator!r})",
        )


def parse_segment(text: str, position: int, delimiters: Delimiters) -> Segment:
    """One segment's text as a Segment; raises EdiError when its tag or its bytes are wrong."""
    tag, _, _ = text.partition(delimiters.element)
    edi_segments.check_tag(tag, position)
    text = edi_segments.decode_text(text, CHARSET, f"segment {position} ({tag})")
    parts = text.split(delimiters.element)[1:]
    if tag == "ISA":
        # ISA11 and ISA16 are the delimiters themselves: its elements are never split further.
        return Segment(tag, tuple(((part,),) for part in parts), position)
    elements = []
    for part in parts:
        repetitions = part.split(delimiters.repetition) if delimiters.repetition else [part]
        elements.append(tuple(tuple(repetition.split(delimiters.component)) for repetition in repetitions))
    return Segment(tag, tuple(elements), position)


@dataclass
class _Interchange:
    isa: Segment
    groups: int = 0


@dataclass
class _Group:
    gs: Segment
    transactions: int = 0


@dataclass
class _Reader(edi.TransactionReader):
    """The envelope state machine: which of ISA, GS, ST is open, and what each has counted."""

    interchange: _Interchange | None = None
    group: _Group | None = None

    def read(self, stream: BinaryIO) -> Iterator[RawRecord]:
        position = 0
        for text, delimiters in _segment_texts(stream):
            position += 1
            segment = parse_segment(text, position, delimiters)
            yield from self._segment(segment)
        self._finish(position)

    def _segment(self, segment: Segment) -> Iterator[RawRecord]:
        tag = segment.tag
        if tag == "ISA":
            self._open_interchange(segment)
        elif tag == "IEA":
            self._close_interchange(segment)
        elif tag == "GS":
            self._open_group(segment)
        elif tag == "GE":
            self._close_group(segment)
        elif tag == "ST":
            self._open_transaction(segment)
        elif tag == "SE":
            yield from self.close_transaction(segment, "ST", "ST02")
        else:
            transaction = self.add_to_transaction(segment, "a transaction set (ST ... SE)")
            if tag == "CTT":
                builder = transaction.builder
                counted = builder.hl_segments if builder.hl_segments else builder.lin_segments
                what = "HL loops" if builder.hl_segments else "LIN line items"
                transaction.check_line_count(segment, (1, 1), counted, what)

    def _open_interchange(self, segment: Segment) -> None:
        if self.interchange is not None:
            raise EdiError(segment, f"a new ISA before the IEA of {self.interchange.isa.label}")
        self.interchange = _Interchange(segment)

    def _close_interchange(self, segment: Segment) -> None:
        interchange = self._between_groups(segment)
        groups = interchange.groups
        edi.check_envelope_trailer(segment, interchange.isa, (13, "ISA13"), "functional groups", groups)
        self.interchange = None

    def _open_group(self, segment: Segment) -> None:
        self._between_groups(segment).groups += 1
        self.group = _Group(segment)

    def _close_group(self, segment: Segment) -> None:
        group = self._between_transactions(segment)
        edi.check_envelope_trailer(segment, group.gs, (6, "GS06"), "transaction sets", group.transactions)
        self.group = None

    def _between_groups(self, segment: Segment) -> _Interchange:
        """The open interchange, for a segment that stands outside its groups (IEA, GS); else EdiError."""
        if self.interchange is None or self.group is not None:
            open_part = (
                "no ISA is open"
                if self.interchange is None or self.group is None
                else f"{self.group.gs.label} has no GE"
            )
            raise EdiError(segment, f"{segment.tag} out of place: {open_part}")
        return self.interchange

    def _between_transactions(self, segment: Segment) -> _Group:
        """The open group, for a segment that stands outside its transactions (GE, ST); else EdiError."""
        if self.group is None or self.transaction is not None:
            open_part = (
                "no GS is open"
                if self.group is None or self.transaction is None
                else f"{self.transaction.start.label} has no SE"
            )
            raise EdiError(segment, f"{segment.tag} out of place: {open_part}")
        return self.group

    def _open_transaction(self, segment: Segment) -> None:
        group = self._between_transactions(segment)
        assert self.interchange is not None
        isa, gs = self.interchange.isa, group.gs
        envelope: dict[str, Any] = {
            **envelope_segments((isa, gs, segment)),
            "sender": f"{isa.value(5).strip()}:{isa.value(6).strip()}",
            "receiver": f"{isa.value(7).strip()}:{isa.value(8).strip()}",
            "interchange": isa.value(13),
            "group": gs.value(6),
            "transaction": segment.value(2),
            "type": segment.value(1),
        }
        group.transactions += 1
        self.open_transaction(segment, segment.value(2), "transaction set", envelope, SUMMARY_TAGS)

    def _finish(self, segments: int) -> None:
        at_end = f"the file ends after segment {segments}"
        if self.transaction is not None:
            raise EdiError(self.transaction.start, f"this transaction set has no SE: {at_end}")
        if self.group is not None:
            raise EdiError(self.group.gs, f"this functional group has no GE: {at_end}")
        if self.interchange is not None:
            raise EdiError(self.interchange.isa, f"this interchange has no IEA: {at_end}")
