"""The transform stage as a pure function: a chunk of raw records in, canonical events out.

For each record: map the fields declared in the route, validate into a canonical event (which fixes
its deterministic id, source reference and sequence key), apply the route filter and choose the
targets whose `when` matches. A record that fails any step becomes a dead letter naming its file,
line, record number, field and reason; the other records go on. So does a record the transform code
itself fails on (a bug, an unexpected error): reason ``transform_error`` with the exception, replayable
once fixed. Only a message that is not a chunk of records at all is unreadable (``router.messages``).
Broker I/O lives in the workers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from canonical.events import parse_event
from canonical.ids import derive_event_id, partition_for, sequence_key_for
from deadletter import NewDeadLetter
from router.messages import ChunkRecord, IngressChunk
from transforms.edi import EDI_FORMATS, record_segment
from transforms.filters import EventPredicate, FilterError
from transforms.mapping import MappingError, RecordMapping
from transforms.parsers import RawRecord, shorten

PLACEHOLDER_KEY = "pending"
TRANSFORM_ERROR = "transform_error"
"""Dead-letter reason of a record the transform code failed on unexpectedly; replay it once fixed."""


@dataclass(frozen=True)
class DeliveryRule:
    """A target a route delivers to, with its optional JMESPath condition on the canonical event."""

    target: str
    partitions: int
    when: EventPredicate | None = None
    accepts: frozenset[str] | None = None
    """The quantity semantics the target takes (``delta``, ``absolute``); None: both."""

    def refusal(self, event: Mapping[str, Any]) -> str | None:
        """Why the target must not get ``event`` (a level sent to a movements-only target), or None.

        Only reachable when a route maps the event type per record; `router validate` checks the rest.
        """
        semantics = event.get("quantity_semantics")
        if self.accepts is None or semantics in self.accepts:
            return None
        return (
            f"target {self.target!r} accepts only {' and '.join(sorted(self.accepts))} quantities, not this "
            f"{event.get('type')} ({semantics}); the route's other targets got it"
        )


@dataclass(frozen=True)
class RecordFailure:
    """A record that could not become a canonical event, with everything a dead letter needs."""

    reason: str
    detail: str
    payload: Any
    source_ref: dict[str, Any]
    event_id: str

    @classmethod
    def of(
        cls, reason: str, detail: str, record: RawRecord, source_ref: dict[str, Any], event_id: str
    ) -> RecordFailure:
        """A failure whose detail starts with where the record came from (file, line, record); a huge
        value quoted in the detail is cut, the record itself stays whole in the payload. The record's
        document context (its header) is kept with the source so a replay maps it again."""
        if record.document is not None:
            source_ref = {**source_ref, "document": record.document}
        detail = shorten(f"{describe_position(source_ref)}: {detail}")
        return cls(reason, detail, record.data, source_ref, event_id)

    def letter(self, route: str) -> NewDeadLetter:
        """The transform-stage dead letter that keeps this failure for an operator to fix and replay."""
        return NewDeadLetter(
            route=route,
            stage="transform",
            reason=self.reason,
            detail=self.detail,
            payload=self.payload,
            source_ref=self.source_ref,
            event_id=self.event_id,
        )


@dataclass
class TransformResult:
    """What one chunk produced: events grouped per delivery queue, in record order, and failures.

    ``accepted`` holds every event that passed the filter, in record order, whichever targets it goes to.
    """

    batches: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    failures: list[RecordFailure] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    filtered: int = 0

    @property
    def events(self) -> int:
        return len(self.accepted)


def describe_position(source_ref: Mapping[str, Any]) -> str:
    """Human form of a record's origin: ``pos.csv line 14 (record 13)``, ``a.x12 segment 17 (record 1)``."""
    parts = [str(source_ref.get("file") or source_ref.get("message_id") or "message")]
    if source_ref.get("line") is not None:
        parts.append(f"line {source_ref['line']}")
    if source_ref.get("segment") is not None:
        parts.append(f"segment {source_ref['segment']}")
    parts.append(f"(record {source_ref.get('record')})")
    return " ".join(parts)


def validation_detail(error: ValidationError) -> str:
    """A pydantic error as ``field 'x': message; ...`` for dead letters and edit refusals."""
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "event"
        problems.append(f"field '{where}': {item['msg']}")
    return "; ".join(problems)


def _source_ref(route: str, message: IngressChunk, raw: ChunkRecord, *, edi: bool = False) -> dict[str, Any]:
    source_ref = {
        "route": route,
        "system": message.system,
        "message_id": message.message_id,
        "record": raw.n,
        "file": message.origin.get("file"),
        "line": raw.line,
    }
    if edi:
        source_ref["segment"] = record_segment(raw.data)
    return source_ref


def _event_id(route: str, message: IngressChunk, raw: ChunkRecord) -> str:
    # A replayed dead letter carries the id its record had, so the target sees the same event.
    # ``id_origin`` is what of the origin makes ids unique; EDI records carry a complete identity of
    # their own, so their chunks name none and a resent interchange keeps its ids.
    return raw.event_id or derive_event_id(
        route, message.system, *message.identity_origin.values(), raw.n if raw.id is None else raw.id
    )


def _raw_record(message: IngressChunk, raw: ChunkRecord) -> RawRecord:
    return RawRecord(
        number=raw.n, line=raw.line, data=raw.data, error=raw.error, document=message.document_of(raw)
    )


def _unexpected(error: Exception) -> str:
    return f"the transform failed unexpectedly: {type(error).__name__}: {error}"


def chunk_failures(
    route: str, message: IngressChunk, error: Exception, *, edi: bool = False
) -> list[RecordFailure]:
    """Every record of a checked chunk as a replayable ``transform_error`` failure: what the worker keeps
    when the transform fails on the chunk as a whole (``edi``: the records are EDI, name their segment)."""
    failures = []
    for raw in message.records:
        source_ref = _source_ref(route, message, raw, edi=edi)
        event_id = _event_id(route, message, raw)
        record = _raw_record(message, raw)
        failures.append(RecordFailure.of(TRANSFORM_ERROR, _unexpected(error), record, source_ref, event_id))
    return failures


@dataclass(frozen=True)
class RoutePipeline:
    """A route's compiled transform: mapping, filter, sequence key and delivery rules."""

    route: str
    mapping: RecordMapping
    sequence_fields: Sequence[str]
    rules: Sequence[DeliveryRule]
    filter: EventPredicate | None = None

    def transform(self, message: IngressChunk, *, now: datetime | None = None) -> TransformResult:
        """Turn one ingress chunk of raw records into routed events and failures."""
        # One datetime for the chunk: pydantic takes it as it is, where ISO text was parsed per event.
        recorded_at = now or datetime.now(UTC)
        result = TransformResult()
        for raw in message.records:
            record = _raw_record(message, raw)
            source_ref = _source_ref(self.route, message, raw, edi=self.mapping.format in EDI_FORMATS)
            event_id = _event_id(self.route, message, raw)
            try:
                event = self._event(record, source_ref, event_id, recorded_at, result)
                if event is not None:
                    self._route(event, record, source_ref, result)
            except Exception as error:
                # Mapping code failing (a bug, a lookup raising) is about this record: keep it as a
                # replayable letter with what went wrong, and let the chunk's other records go on.
                result.failures.append(
                    RecordFailure.of(TRANSFORM_ERROR, _unexpected(error), record, source_ref, event_id)
                )
        return result

    def _route(
        self, event: dict[str, Any], record: RawRecord, source_ref: dict[str, Any], result: TransformResult
    ) -> None:
        """Apply the filter and the delivery rules: the event goes to its targets' partition queues."""

        def fail(reason: str, detail: str) -> None:
            result.failures.append(RecordFailure.of(reason, detail, record, source_ref, event["event_id"]))

        try:
            if self.filter is not None and not self.filter.matches(event):
                result.filtered += 1
                return
            rules = [rule for rule in self.rules if rule.when is None or rule.when.matches(event)]
        except FilterError as error:
            # A condition that cannot be evaluated on this event must not stop the whole chunk.
            fail("filter", str(error))
            return
        # Decide everything before changing the result: an error half-way leaves no trace of the event.
        refusals = [(rule, rule.refusal(event)) for rule in rules]
        queues = [
            (rule.target, partition_for(event["sequence_key"], rule.partitions))
            for rule, refusal in refusals
            if refusal is None
        ]
        result.accepted.append(event)
        for _, refusal in refusals:
            if refusal is not None:
                fail("accepts", refusal)
        for queue in queues:
            result.batches.setdefault(queue, []).append(event)

    def _event(
        self,
        record: RawRecord,
        source_ref: dict[str, Any],
        event_id: str,
        recorded_at: datetime,
        result: TransformResult,
    ) -> dict[str, Any] | None:
        def fail(reason: str, detail: str) -> None:
            result.failures.append(RecordFailure.of(reason, detail, record, source_ref, event_id))

        if record.error is not None:
            fail("parse", record.error)
            return None
        try:
            fields = self.mapping.apply(record)
        except MappingError as error:
            fail(error.category, str(error))
            return None
        candidate = {
            **{name: value for name, value in fields.items() if value is not None},
            "event_id": event_id,
            "source": {key: value for key, value in source_ref.items() if value is not None},
            "recorded_at": recorded_at,
            "sequence_key": PLACEHOLDER_KEY,
        }
        try:
            event = parse_event(candidate).model_dump(mode="json", exclude_none=True)
            event["sequence_key"] = sequence_key_for(event, self.sequence_fields)
        except ValidationError as error:
            fail("validation", validation_detail(error))
            return None
        except ValueError as error:
            fail("validation", str(error))
            return None
        return event
