"""What X12 and EDIFACT share: segments, one record per item loop with its context, control checks.

A route's ``records`` says which loop is one record: ``HL:I`` (X12 hierarchical loops whose HL03 level
code is I, with their HL02 parents as context) or trigger tags from the outermost group to the record's
own, such as ``CPS/LIN`` (a CPS starts a group, a LIN inside it starts a record). A record is a
JSON-like dict mapped with ``{path: ...}``:

- the record loop's own segments at the top, each tag a list of segments (``LIN[0].e3``);
- ``header``: the transaction's segments before its first loop (``header.BSN[0].e2``);
- its enclosing loops by name (``shipment``, ``order``, ``tare``, ``pack`` for HL levels S, O, T, P,
  ``hl_<code>`` for other levels, the lower-case tag such as ``cps`` for trigger tags);
- ``envelope``: the interchange, group and transaction headers (``envelope.GS[0].e4``) and the record's
  identity: ``sender``, ``receiver``, ``interchange``, ``group``, ``transaction``, ``type``, ``line``
  (its ordinal in the transaction) and ``segment`` (the position of its first segment in the file).

A segment is a dict: ``e1`` is its first element (its first component when composite), ``e1_2`` the
second component of the first element, and ``r1`` the list of repetitions when the element repeats.
Empty elements are left out. Segments after the loops (X12 CTT, EDIFACT UNS/CNT) are summary: they end
the last record and are checked, not mapped. Memory holds one transaction's records at a time: they
are released when its trailer confirms the control number and counts, or all marked with the problem.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from transforms.records import FileFormatError, RawRecord, Splitter

EDI_FORMATS: tuple[str, ...] = ("x12", "edifact")

MAX_SEGMENT_CHARS = 1 << 20
"""Longest segment read; beyond it the file is refused rather than buffered (a missing terminator)."""

READ_BLOCK = 1 << 16

LEADING_SPACE = "\r\n\t "
"""Line breaks and spaces before a segment, skipped: many partners end every segment with a line break."""

UTF8_BOM = "\xef\xbb\xbf"
"""A UTF-8 byte order mark as read in Latin-1."""

HL_LEVEL_NAMES = {"S": "shipment", "O": "order", "T": "tare", "P": "pack", "I": "item"}

_TAG = re.compile(r"[A-Z][A-Z0-9]{1,2}")
_HL_SPEC = re.compile(r"HL:([A-Za-z0-9]{1,2})")

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
        """The segment as a mapping sees it (see the module docstring)."""
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


def file_error(name: str, error: EdiError) -> FileFormatError:
    """The file-level rejection for an envelope problem, naming the segment."""
    return FileFormatError(name, None, None, str(error))


def check_delimiters(service: Segment, declared: dict[str, str], spaces: Collection[str]) -> None:
    """Refuse delimiters (role to character) that are letters, digits, ``spaces`` or not distinct."""
    for role, char in declared.items():
        if char.isalnum() or char in spaces:
            raise EdiError(service, f"the {role} is {char!r}; a delimiter cannot be a letter, digit or space")
    if len(set(declared.values())) != len(declared):
        raise EdiError(service, f"the {service.tag}'s delimiters are not distinct: {declared}")


def check_tag(tag: str, position: int) -> None:
    """Refuse anything that is not a segment tag (two or three upper-case letters or digits)."""
    if not _TAG.fullmatch(tag):
        shown = tag if len(tag) <= 20 else tag[:20] + "..."
        raise EdiError(None, f"segment {position}: {shown!r} is not a segment tag")


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
        if not _TAG.fullmatch(tag) or tag == "HL":
            raise ValueError(
                f"records {records!r} must be HL:<level code> or segment tags joined by '/', e.g. {example}"
            )
    if len(set(tags)) != len(tags):
        raise ValueError(f"records {records!r} repeats a tag")
    return LoopSpec(tags=tags)


Segments = dict[str, list[dict[str, Any]]]


def _add(segments: Segments, segment: Segment) -> None:
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
            _add(self._stack[-1].segments, segment)
        else:
            _add(self._header, segment)

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
        _add(self._stack[-1].segments, segment)

    def _open_tag(self, segment: Segment) -> None:
        self._emit()
        level = self._spec.tags.index(segment.tag)
        while self._stack and self._spec.tags.index(self._stack[-1].key) >= level:
            self._stack.pop()
        is_record = level == len(self._spec.tags) - 1
        self._stack.append(_Loop(segment.tag.lower(), segment.tag, {}, is_record, segment.position))
        _add(self._stack[-1].segments, segment)

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


def same_control(declared: str, expected: str) -> bool:
    """Control numbers match as text or, when both are numbers, by value (000123 and 123)."""
    if declared == expected:
        return True
    return declared.isdigit() and expected.isdigit() and int(declared) == int(expected)


def check_envelope_trailer(
    trailer: Segment, header: Segment, control: tuple[int, str], what: str, counted: int
) -> None:
    """An interchange or group trailer's count of ``what`` (its element 1) and control number (element 2)
    against the header's ``control`` element (index, name in messages; "" names none); raises EdiError."""
    declared = count_value(trailer, 1, f"number of {what}")
    if declared != counted:
        raise EdiError(trailer, f"{trailer.tag}01 says {declared} {what}, counted {counted}")
    index, name = control
    found, expected = trailer.value(2), header.value(index)
    if not same_control(found, expected):
        named = f"{header.label}'s {name} " if name else f"{header.label}'s "
        raise EdiError(trailer, f"{trailer.tag}02 {found!r} does not match {named}{expected!r}")


def count_value(segment: Segment, index: int, what: str, component: int = 1) -> int:
    """A count element as an int; raises EdiError naming the element when it is not a number."""
    text = segment.value(index, component)
    if not text.isdigit():
        element = f"{segment.tag}{index:02d}" + (f"-{component}" if component > 1 else "")
        raise EdiError(segment, f"{element} ({what}) is {text!r}, not a number")
    return int(text)


@dataclass
class Transaction:
    """One X12 transaction set or EDIFACT message being read: its records wait for its trailer."""

    start: Segment
    control: str
    kind: str
    envelope: dict[str, Any]
    builder: LoopBuilder
    segments: int = 1
    problems: list[str] = field(default_factory=list)

    def add(self, segment: Segment) -> None:
        """A segment inside the transaction: counted, then grouped (a loop problem is remembered)."""
        self.segments += 1
        if self.problems:
            return
        try:
            self.builder.add(segment)
        except EdiError as error:
            self.problems.append(str(error))

    def check_trailer(self, trailer: Segment, what: str, count_index: int, control_index: int) -> None:
        """Check the trailer's segment count and control number against what was read."""
        self.segments += 1
        start_tag = self.start.tag
        try:
            declared = count_value(trailer, count_index, "number of segments")
            if declared != self.segments:
                self.problems.append(
                    f"{trailer.label}: {trailer.tag}{count_index:02d} says {declared} segments, "
                    f"counted {self.segments} from {start_tag} to {trailer.tag}"
                )
        except EdiError as error:
            self.problems.append(str(error))
        control = trailer.value(control_index)
        if not same_control(control, self.control):
            self.problems.append(
                f"{trailer.label}: {trailer.tag}{control_index:02d} {control!r} does not match "
                f"{self.start.label}'s {what} {self.control!r}"
            )

    def check_line_count(self, segment: Segment, element: tuple[int, int], counted: int, what: str) -> None:
        """A summary count (CTT01, CNT01-2) against the loops counted; a mismatch is a problem."""
        try:
            declared = count_value(segment, element[0], what, element[1])
        except EdiError as error:
            self.problems.append(str(error))
            return
        if declared != counted:
            self.problems.append(f"{segment.label}: says {declared} {what}, counted {counted}")

    def records(self, first_number: int) -> Iterator[RawRecord]:
        """The transaction's records, numbered on from ``first_number``; all refused if it has a problem."""
        self.builder.close()
        problem = "; ".join(self.problems) if self.problems else None
        if problem is not None:
            problem += (
                f"; every record of {self.kind} {self.control!r} ({self.start.label}) is refused with it"
            )
        for line, (position, body) in enumerate(self.builder.items, start=1):
            body["envelope"] = {**self.envelope, "line": line, "segment": position}
            yield RawRecord(first_number + line - 1, None, body, problem)


@dataclass
class TransactionReader:
    """What the X12 and EDIFACT envelope readers share: the open transaction and the records read."""

    spec: LoopSpec
    transaction: Transaction | None = None
    records: int = 0

    def open_transaction(
        self, start: Segment, control: str, kind: str, envelope: dict[str, Any], summary_tags: frozenset[str]
    ) -> None:
        """Start reading a transaction (X12 ST, EDIFACT UNH) whose records wait for its trailer."""
        self.transaction = Transaction(start, control, kind, envelope, LoopBuilder(self.spec, summary_tags))

    def add_to_transaction(self, segment: Segment, outside: str) -> Transaction:
        """A segment that is not part of the envelope: added to the open transaction, else EdiError."""
        if self.transaction is None:
            raise EdiError(segment, f"is outside {outside}")
        self.transaction.add(segment)
        return self.transaction

    def close_transaction(self, trailer: Segment, opener: str, control_name: str) -> Iterator[RawRecord]:
        """The trailer (SE, UNT) checked against what was read, then the transaction's records."""
        if self.transaction is None:
            raise EdiError(trailer, f"{trailer.tag} out of place: no {opener} is open")
        transaction, self.transaction = self.transaction, None
        transaction.check_trailer(trailer, control_name, 1, 2)
        for record in transaction.records(self.records + 1):
            self.records += 1
            yield record


class EnvelopeReader(Protocol):
    """An X12 or EDIFACT reader of one file: its records, or EdiError for a broken envelope."""

    def read(self, stream: BinaryIO) -> Iterator[RawRecord]: ...


def edi_splitter(fmt: str, records: str | None, reader: Callable[[LoopSpec], EnvelopeReader]) -> Splitter:
    """The record splitter of an EDI format for a route's ``records``; raises ValueError for a bad one."""
    spec = compile_loop_spec(fmt, records)

    def split(stream: BinaryIO, name: str, **_: Any) -> Iterator[RawRecord]:
        try:
            yield from reader(spec).read(stream)
        except EdiError as error:
            raise file_error(name, error) from None

    return split


def record_identity(data: Any) -> str | None:
    """An EDI record's stable identity: sender, receiver, interchange, transaction and line."""
    if not isinstance(data, dict) or not isinstance(data.get("envelope"), dict):
        return None
    envelope = data["envelope"]
    parts = ("sender", "receiver", "interchange", "transaction", "line")
    return "/".join(str(envelope.get(part, "")) for part in parts)


def record_segment(data: Any) -> int | None:
    """Where an EDI record starts in its file (its first segment's position), for error messages."""
    envelope = data.get("envelope") if isinstance(data, dict) else None
    segment = envelope.get("segment") if isinstance(envelope, dict) else None
    return segment if isinstance(segment, int) and not isinstance(segment, bool) and segment > 0 else None


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


def envelope_segments(segments: Iterable[Segment]) -> dict[str, list[dict[str, Any]]]:
    """Envelope segments as the mapping sees them under ``envelope``."""
    result: Segments = {}
    for segment in segments:
        _add(result, segment)
    return result
