"""UN/EDIFACT interchanges (DESADV despatch advice, INVRPT inventory report, ...) as records.

Tokenised by pydifact (MIT, maintained) fed one character at a time, so a large interchange is not
loaded whole (pydifact tokenises in pure Python: a few hundred KB a second, ample for despatch
advices and stock reports of a few MB). The service string advice UNA, when present, sets the
delimiters and the release character (``?`` by default, a space meaning none), otherwise the
defaults ``:+.? '`` apply. The text is decoded in the character set the UNB syntax identifier names
(UNOA..UNOK, UNOW, UNOY). Checked as read: UNB0020/UNZ02 and UNZ01 (messages, or groups when UNG is
used), UNG/UNE, UNH01/UNT02 and UNT01 (the segment count), and CNT+2 (the number of LIN line items).
A broken envelope rejects the file naming the segment; a message whose trailer or count disagrees
has each of its records dead-lettered.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any, BinaryIO

from pydifact.control.characters import Characters
from pydifact.exceptions import EDISyntaxError
from pydifact.parser import Parser, TokenIterator
from pydifact.tokenizer import Tokenizer

from transforms import edi, edi_segments
from transforms.edi_loops import envelope_segments
from transforms.edi_segments import EdiError, Segment
from transforms.records import RawRecord, Splitter

SUMMARY_TAGS = frozenset({"UNS", "CNT"})
LINE_ITEM_COUNT = "2"
"""CNT qualifier 6069 = 2: the number of line items in the message."""

NO_RELEASE = "\u0100"
"""Stands in for "no release character": text read as Latin-1 never contains it."""

CHARSETS = {
    "UNOA": "ascii",
    "UNOB": "ascii",
    "UNOC": "latin-1",
    "UNOD": "iso8859-2",
    "UNOE": "iso8859-5",
    "UNOF": "iso8859-7",
    "UNOG": "iso8859-3",
    "UNOH": "iso8859-4",
    "UNOI": "iso8859-6",
    "UNOJ": "iso8859-8",
    "UNOK": "iso8859-9",
    "UNOW": "utf-8",
    "UNOY": "utf-8",
}


def read_service_string(head: str) -> tuple[Characters, bool]:
    """The delimiters from a UNA at the start of ``head`` (or the defaults) and whether UNA was there."""
    if not head.startswith("UNA"):
        return Characters(), False
    una = Segment("UNA", (), 1)
    if len(head) < 9:
        raise EdiError(una, "UNA must give six service characters (e.g. UNA:+.? ')")
    component, element, _decimal, release, _reserved, terminator = tuple(head[3:9])
    declared = {"component separator": component, "element separator": element, "terminator": terminator}
    if release != " ":
        declared["release character"] = release
    edi_segments.check_delimiters(una, declared, edi_segments.LEADING_SPACE)
    characters = Characters.from_str(head[:9])
    if release == " ":
        characters.escape_character = NO_RELEASE
    return characters, True


def splitter(records: str | None) -> Splitter:
    """The record splitter for a route's ``records`` (``CPS/LIN``, ``LIN``, ...); raises ValueError."""
    return edi.edi_splitter("edifact", records, _Reader)


def _guarded(characters: Iterator[str], terminator: str, reader: _Reader) -> Iterator[str]:
    """The file's characters, refusing a segment that runs past MAX_SEGMENT_CHARS (no terminator)."""
    since_terminator = 0
    for char in characters:
        since_terminator = 0 if char == terminator else since_terminator + 1
        if since_terminator > edi_segments.MAX_SEGMENT_CHARS:
            raise EdiError(
                None,
                f"segment {reader.position + 1}: longer than {edi_segments.MAX_SEGMENT_CHARS} characters "
                f"without the terminator {terminator!r}",
            )
        yield char


@dataclass
class _Reader(edi.TransactionReader):
    """The envelope state machine: which of UNB, UNG, UNH is open, and what each has counted."""

    charset: str = "ascii"
    unb: Segment | None = None
    messages_or_groups: int = 0
    ung: Segment | None = None
    group_messages: int = 0
    uses_groups: bool = False
    position: int = 0

    def read(self, stream: BinaryIO) -> Iterator[RawRecord]:
        blocks = edi_segments.read_blocks(stream)
        head = edi_segments.read_head(blocks, 32)
        characters, has_una = read_service_string(head)
        if has_una:
            self.position = 1
            head = head[9:].lstrip(edi_segments.LEADING_SPACE)
        text = _guarded(chain(head, chain.from_iterable(blocks)), characters.segment_terminator, self)
        # pydifact types the message as str but only iterates it, so the text streams in.
        tokens = TokenIterator(Tokenizer().get_tokens(text, characters))  # type: ignore[arg-type]
        raw_segments = Parser().convert_tokens_to_raw_segments(tokens)
        try:
            for raw in raw_segments:
                self.position += 1
                yield from self._segment(self._parse(raw))
        except EDISyntaxError as error:
            raise EdiError(None, f"segment {self.position + 1}: {error}") from None
        self._finish()

    def _parse(self, raw: list[Any]) -> Segment:
        tag = raw[0] if raw else ""
        if not isinstance(tag, str):
            raise EdiError(None, f"segment {self.position}: {':'.join(tag)!r} is not a segment tag")
        edi_segments.check_tag(tag, self.position)
        if tag == "UNB" and len(raw) > 1:
            syntax = raw[1] if isinstance(raw[1], str) else raw[1][0]
            if syntax not in CHARSETS:
                known = ", ".join(CHARSETS)
                raise EdiError(
                    Segment(tag, (), self.position),
                    f"syntax identifier {syntax!r} is not one the router reads ({known})",
                )
            self.charset = CHARSETS[syntax]
        label = f"segment {self.position} ({tag})"
        elements = []
        for element in raw[1:]:
            components = [element] if isinstance(element, str) else element
            elements.append(
                (tuple(edi_segments.decode_text(part, self.charset, label) for part in components),)
            )
        return Segment(tag, tuple(elements), self.position)

    def _segment(self, segment: Segment) -> Iterator[RawRecord]:
        tag = segment.tag
        if tag == "UNA":
            raise EdiError(segment, "UNA may only be the first segment of the file")
        if tag == "UNB":
            self._open_interchange(segment)
        elif tag == "UNZ":
            self._close_interchange(segment)
        elif tag == "UNG":
            self._open_group(segment)
        elif tag == "UNE":
            self._close_group(segment)
        elif tag == "UNH":
            self._open_message(segment)
        elif tag == "UNT":
            yield from self.close_transaction(segment, "UNH", "message reference UNH01")
        else:
            transaction = self.add_to_transaction(segment, "a message (UNH ... UNT)")
            if tag == "CNT" and segment.value(1) == LINE_ITEM_COUNT:
                counted = transaction.builder.lin_segments
                transaction.check_line_count(segment, (1, 2), counted, "LIN line items")

    def _open_interchange(self, segment: Segment) -> None:
        if self.unb is not None:
            raise EdiError(segment, f"a new UNB before the UNZ of {self.unb.label}")
        self.unb, self.messages_or_groups, self.uses_groups = segment, 0, False

    def _close_interchange(self, segment: Segment) -> None:
        if self.unb is None or self.ung is not None or self.transaction is not None:
            raise EdiError(segment, f"UNZ out of place: {self._open_part()}")
        what = "functional groups" if self.uses_groups else "messages"
        edi.check_envelope_trailer(segment, self.unb, (5, "control reference"), what, self.messages_or_groups)
        self.unb = None

    def _open_group(self, segment: Segment) -> None:
        if self.unb is None or self.ung is not None or self.transaction is not None:
            raise EdiError(segment, f"UNG out of place: {self._open_part()}")
        if self.messages_or_groups and not self.uses_groups:
            raise EdiError(segment, "UNG after messages outside groups: an interchange uses groups or not")
        self.ung, self.group_messages, self.uses_groups = segment, 0, True
        self.messages_or_groups += 1

    def _close_group(self, segment: Segment) -> None:
        if self.ung is None or self.transaction is not None:
            raise EdiError(segment, f"UNE out of place: {self._open_part()}")
        edi.check_envelope_trailer(segment, self.ung, (5, ""), "messages", self.group_messages)
        self.ung = None

    def _open_message(self, segment: Segment) -> None:
        if self.unb is None or self.transaction is not None:
            raise EdiError(segment, f"UNH out of place: {self._open_part()}")
        if self.uses_groups and self.ung is None:
            raise EdiError(segment, "UNH outside a group in an interchange that uses groups (UNG ... UNE)")
        if self.ung is not None:
            self.group_messages += 1
        else:
            self.messages_or_groups += 1
        service = [self.unb, *([self.ung] if self.ung else []), segment]
        envelope: dict[str, Any] = {
            **envelope_segments(service),
            "sender": self.unb.value(2),
            "receiver": self.unb.value(3),
            "interchange": self.unb.value(5),
            "group": self.ung.value(5) if self.ung else None,
            "transaction": segment.value(1),
            "type": segment.value(2),
        }
        self.open_transaction(segment, segment.value(1), "message", envelope, SUMMARY_TAGS)

    def _open_part(self) -> str:
        if self.transaction is not None:
            return f"{self.transaction.start.label} has no UNT"
        if self.ung is not None:
            return f"{self.ung.label} has no UNE"
        if self.unb is not None:
            return f"{self.unb.label} has no UNZ"
        return "no UNB is open"

    def _finish(self) -> None:
        if self.unb is None and self.position == 0:
            raise EdiError(None, "the file has no segments; an EDIFACT interchange starts with UNA or UNB")
        if self.unb is not None:
            raise EdiError(None, f"the file ends after segment {self.position}: {self._open_part()}")
