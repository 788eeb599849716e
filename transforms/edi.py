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

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from transforms.edi_loops import LoopBuilder, LoopSpec, compile_loop_spec
from transforms.edi_segments import EdiError, Segment
from transforms.records import FileFormatError, RawRecord, Splitter

EDI_FORMATS: tuple[str, ...] = ("x12", "edifact")


def file_error(name: str, error: EdiError) -> FileFormatError:
    """The file-level rejection for an envelope problem, naming the segment."""
    return FileFormatError(name, None, None, str(error))


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
