"""The transform stage as a pure function: a chunk of raw records in, canonical events out.

For each record: map the fields declared in the route, validate into a canonical event (which fixes
its deterministic id, source reference and sequence key), apply the route filter and choose the
targets whose `when` matches. A record that fails any step becomes a dead letter naming its file,
line, record number, field and reason; the other records go on. Broker I/O lives in the workers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from canonical.events import parse_event
from canonical.ids import derive_event_id, partition_for, sequence_key_for
from transforms.filters import EventPredicate, FilterError
from transforms.mapping import MappingError, RecordMapping
from transforms.parsers import RawRecord

PLACEHOLDER_KEY = "pending"


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
        """A failure whose detail starts with where the record came from (file, line, record).

        The record's document context (its header) is kept with the source so a replay maps it again.
        """
        if record.document is not None:
            source_ref = {**source_ref, "document": record.document}
        return cls(reason, f"{describe_position(source_ref)}: {detail}", record.data, source_ref, event_id)


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
    """Human form of a record's origin: ``pos-001.csv line 14 (record 13)``."""
    parts = [str(source_ref.get("file") or source_ref.get("message_id") or "message")]
    if source_ref.get("line") is not None:
        parts.append(f"line {source_ref['line']}")
    parts.append(f"(record {source_ref.get('record')})")
    return " ".join(parts)


def validation_detail(error: ValidationError) -> str:
    """A pydantic error as ``field 'x': message; ...`` for dead letters and edit refusals."""
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "event"
        problems.append(f"field '{where}': {item['msg']}")
    return "; ".join(problems)


@dataclass(frozen=True)
class RoutePipeline:
    """A route's compiled transform: mapping, filter, sequence key and delivery rules."""

    route: str
    mapping: RecordMapping
    sequence_fields: Sequence[str]
    rules: Sequence[DeliveryRule]
    filter: EventPredicate | None = None

    def transform(self, message: Mapping[str, Any], *, now: datetime | None = None) -> TransformResult:
        """Turn one ingress message (a chunk of raw records) into routed events and failures."""
        recorded_at = (now or datetime.now(UTC)).isoformat()
        origin: Mapping[str, Any] = message.get("origin", {})
        result = TransformResult()
        documents: Sequence[Any] = message.get("documents", ())
        for raw in message["records"]:
            record = RawRecord(
                number=raw["n"],
                line=raw.get("line"),
                data=raw.get("data"),
                error=raw.get("error"),
                document=documents[raw["doc"]] if "doc" in raw else None,
            )
            source_ref = {
                "route": self.route,
                "system": message["system"],
                "message_id": message["message_id"],
                "record": record.number,
                "file": origin.get("file"),
                "line": record.line,
            }
            identity = raw.get("id", record.number)
            # A replayed dead letter carries the id its record had, so the target sees the same event.
            event_id = raw.get("event_id") or derive_event_id(
                self.route, message["system"], *origin.values(), identity
            )
            event = self._event(record, source_ref, event_id, recorded_at, result)
            if event is not None:
                self._route(event, record, source_ref, result)
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
        result.accepted.append(event)
        for rule in rules:
            refusal = rule.refusal(event)
            if refusal is not None:
                fail("accepts", refusal)
                continue
            partition = partition_for(event["sequence_key"], rule.partitions)
            result.batches.setdefault((rule.target, partition), []).append(event)

    def _event(
        self,
        record: RawRecord,
        source_ref: dict[str, Any],
        event_id: str,
        recorded_at: str,
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
