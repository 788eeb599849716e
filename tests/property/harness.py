"""The path a dropped file takes, in-process: check pass, chunking, the broker's JSON, the transform,
and the dead-letter store; plus the accounting invariant every hostile file must keep."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import event as note_kind
from hypothesis import strategies as st

from connectors.chunks import SourceChunk
from connectors.file_ingest import FileParsing, FileProgress, publish_file
from router.ingress import chunk_message
from router.messages import PartitionBatch, decode_batch, decode_chunk, encode_body
from router.pipeline import DeliveryRule, RecordFailure, RoutePipeline
from state import Store
from transforms.filters import EventPredicate
from transforms.lookups import Lookup
from transforms.mapping import compile_mapping
from transforms.parsers import CsvDialect, FileFormatError
from transforms.records import MAX_REASON_CHARS

PROPERTY_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
"""Derandomized (the same examples on every run, so CI never meets a new one) and no deadline (the
shared CI machine is slow); each test sets its own max_examples to keep the suite near 30 s."""

CHUNK_SIZE = 3
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
WHOLE_FILE_REASONS = ("CSV file has no header row", "XML syntax error: no element found")
"""Rejections about the file as a whole (nothing in it), which have no line to name."""
RECORD_REASONS = {"parse", "mapping", "lookup", "validation", "filter"}


def rarely(draw: st.DrawFn, one_in: int = 5) -> bool:
    """True about once in ``one_in`` draws: most of a file stays plausible, so the hostile parts sit
    among records that do become events."""
    return draw(st.integers(min_value=1, max_value=one_in)) == 1


@dataclass(frozen=True)
class Route:
    """A route under test: how its files are parsed and its compiled transform."""

    parsing: FileParsing
    pipeline: RoutePipeline
    suffix: str


def make_route(
    name: str,
    fmt: str,
    records: str | None,
    mapping: dict[str, Any],
    sequence_key: list[str],
    csv: CsvDialect | None = None,
    lookups: Mapping[str, Lookup] | None = None,
) -> Route:
    """A route like those in routes.yaml, delivering to two partitioned targets, one of them only
    when a condition on the event holds."""
    parsing = FileParsing(name, "file", fmt, records, CHUNK_SIZE, csv or CsvDialect())
    pipeline = RoutePipeline(
        route=name,
        mapping=compile_mapping(mapping, fmt, lookups or {}),
        sequence_fields=sequence_key,
        rules=[DeliveryRule("erp", 4), DeliveryRule("wms", 2, EventPredicate("to_number(quantity) > `1`"))],
    )
    return Route(parsing, pipeline, fmt)


@dataclass
class Outcome:
    """What became of one file: rejected whole, or its records as events and dead letters."""

    name: str
    rejected: FileFormatError | None = None
    records: int = 0
    chunked: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    failures: list[RecordFailure] = field(default_factory=list)


def ingest(content: bytes, route: Route, store: Store, name: str | None = None) -> Outcome:
    """Drop ``content`` as a file of ``route`` and follow it to events and stored dead letters."""
    name = name or f"hostile.{route.suffix}"
    outcome = Outcome(name)
    chunks: list[SourceChunk] = []
    with tempfile.TemporaryDirectory(prefix="property-") as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        try:
            progress = publish_file(path, route.parsing, chunks.append, FileProgress(), name=name)
        except FileFormatError as error:
            assert not chunks, "a rejected file must not have published anything"
            outcome.rejected = error
            return outcome
    outcome.records = progress.records
    for chunk in chunks:
        # The chunk crosses the broker as JSON; the worker transforms what it decodes.
        body = decode_chunk(encode_body(chunk_message(chunk)))
        outcome.chunked.extend(record.n for record in body.records)
        result = route.pipeline.transform(body, now=NOW)
        for (target, partition), events in result.batches.items():
            decode_batch(encode_body(PartitionBatch(target=target, partition=partition, events=events)))
        outcome.events.extend(result.accepted)
        outcome.failures.extend(result.failures)
        letters = [failure.letter(route.parsing.route) for failure in result.failures]
        assert len(store.add_dead_letters(letters)) == len(letters)
    return outcome


def assert_accounted(outcome: Outcome, *, positioned: bool = True) -> None:
    """Rejected with a reason naming the file (and, when ``positioned``, the line), or every record
    read is exactly one event or one dead letter with a short, non-empty reason."""
    if outcome.rejected is not None:
        error = outcome.rejected
        note_kind("file rejected")
        assert error.name == outcome.name
        assert error.reason.strip(), "a rejection must say why"
        assert len(error.reason) <= MAX_REASON_CHARS, f"rejection reason is {len(error.reason)} characters"
        assert str(error).startswith(outcome.name)
        if positioned and not any(whole in error.reason for whole in WHOLE_FILE_REASONS):
            assert error.line is not None, f"rejection without a line: {error}"
        return
    note_kind(
        f"records: {'some events' if outcome.events else 'no events'}, "
        f"{'some dead letters' if outcome.failures else 'no dead letters'}"
    )
    assert outcome.chunked == list(range(1, outcome.records + 1)), "records lost or reordered in chunking"
    seen = Counter(event["source"]["record"] for event in outcome.events)
    seen.update(failure.source_ref["record"] for failure in outcome.failures)
    assert seen == Counter(range(1, outcome.records + 1)), f"records not accounted once: {seen}"
    for failure in outcome.failures:
        assert failure.reason in RECORD_REASONS
        assert failure.detail.startswith(outcome.name), failure.detail
        assert len(failure.detail) <= MAX_REASON_CHARS, f"detail is {len(failure.detail)} characters"
    for event in outcome.events:
        assert event["source"]["file"] == outcome.name
