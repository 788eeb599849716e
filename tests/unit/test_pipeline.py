"""The transform stage as a pure function: a chunk of raw records in, routed events and failures out."""

from __future__ import annotations

from typing import Any

import pytest

from router.messages import IngressChunk, decode_chunk
from router.pipeline import DeliveryRule, RoutePipeline, chunk_failures
from transforms.filters import EventPredicate
from transforms.mapping import RecordMapping, compile_mapping
from transforms.records import MAX_REASON_CHARS, RawRecord

MAP = {
    "type": "sale",
    "sku": {"column": "SKU"},
    "location": {"column": "STORE"},
    "quantity": {"column": "QTY", "as": "decimal"},
    "occurred_at": {"column": "AT", "as": "datetime", "tz": "Europe/Paris"},
}


def _message(*rows: dict[str, str]) -> IngressChunk:
    return decode_chunk(
        {
            "route": "pos",
            "system": "file",
            "message_id": "pos.csv@abc#1",
            "origin": {"file": "pos.csv", "sha256": "abc"},
            "records": [{"n": n, "line": n + 1, "data": row} for n, row in enumerate(rows, start=1)],
        }
    )


def _row(sku: str, qty: str = "1") -> dict[str, str]:
    return {"SKU": sku, "STORE": "S1", "QTY": qty, "AT": "2026-11-24 10:00:00"}


def _pipeline(filter: str | None = None, when: str | None = None) -> RoutePipeline:
    return RoutePipeline(
        route="pos",
        mapping=compile_mapping(MAP, "csv", {}),
        sequence_fields=["sku", "location"],
        rules=[
            DeliveryRule("erp", 4),
            DeliveryRule("oms", 2, EventPredicate(when) if when else None),
        ],
        filter=EventPredicate(filter) if filter else None,
    )


def test_events_are_routed_per_rule_and_partition_and_ids_are_stable() -> None:
    pipeline = _pipeline(when="to_number(quantity) > `1`")
    first = pipeline.transform(_message(_row("A"), _row("B", "3")))
    again = pipeline.transform(_message(_row("A"), _row("B", "3")))

    assert [event["sku"] for event in first.accepted] == ["A", "B"]
    assert [e["event_id"] for e in first.accepted] == [e["event_id"] for e in again.accepted]
    routed = {(target, event["sku"]) for (target, _), events in first.batches.items() for event in events}
    assert routed == {("erp", "A"), ("erp", "B"), ("oms", "B")}
    assert first.accepted[0]["occurred_at"] == "2026-11-24T10:00:00+01:00"


def test_a_condition_that_fails_on_one_event_dead_letters_that_record_and_the_rest_go_on() -> None:
    # abs() of a string is a JMESPath type error: only SKUs that look like numbers pass.
    pipeline = _pipeline(filter="abs(to_number(sku) || sku) > `0`")

    result = pipeline.transform(_message(_row("12"), _row("LETTERS"), _row("7")))

    assert [event["sku"] for event in result.accepted] == ["12", "7"]
    [failure] = result.failures
    assert failure.reason == "filter" and "pos.csv line 3 (record 2)" in failure.detail
    assert failure.payload == _row("LETTERS")


def test_a_level_is_not_sent_to_a_movements_only_target_when_the_type_is_mapped_per_record() -> None:
    spec = {**MAP, "type": {"column": "KIND"}}
    pipeline = RoutePipeline(
        route="pos",
        mapping=compile_mapping(spec, "csv", {}),
        sequence_fields=["sku", "location"],
        rules=[DeliveryRule("erp", 4, accepts=frozenset({"delta"})), DeliveryRule("wms", 2)],
    )

    result = pipeline.transform(
        _message({**_row("A"), "KIND": "sale"}, {**_row("B"), "KIND": "stock.snapshot"})
    )

    routed = sorted(
        (target, event["sku"]) for (target, _), events in result.batches.items() for event in events
    )
    assert routed == [("erp", "A"), ("wms", "A"), ("wms", "B")]
    [failure] = result.failures
    assert failure.reason == "accepts" and "'erp' accepts only delta" in failure.detail


def test_a_huge_value_is_cut_in_the_dead_letter_detail_and_kept_whole_in_the_payload() -> None:
    # Found by tests/property: a 5000-character field was echoed whole into the detail.
    row = _row("A", "9" * 5000 + "x")

    [failure] = _pipeline().transform(_message(row)).failures

    assert failure.reason == "mapping" and len(failure.detail) <= MAX_REASON_CHARS
    assert failure.detail.startswith("pos.csv line 2 (record 1): field 'quantity': '999")
    assert failure.detail.endswith("x' is not a decimal")
    assert failure.payload == row


def test_a_record_the_mapping_code_fails_on_is_a_replayable_failure_and_the_rest_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = RecordMapping.apply

    def apply(mapping: RecordMapping, record: RawRecord) -> dict[str, Any]:
        if record.data["SKU"] == "BUG":
            raise RuntimeError("stores service timed out")
        return original(mapping, record)

    pipeline = _pipeline()
    healthy = pipeline.transform(_message(_row("A"), _row("BUG"), _row("C")))
    monkeypatch.setattr(RecordMapping, "apply", apply)

    result = pipeline.transform(_message(_row("A"), _row("BUG"), _row("C")))

    assert [event["sku"] for event in result.accepted] == ["A", "C"]
    [failure] = result.failures
    assert failure.reason == "transform_error" and failure.payload == _row("BUG")
    assert failure.detail == (
        "pos.csv line 3 (record 2): the transform failed unexpectedly: RuntimeError: stores service timed out"
    )
    # The same id the record gets when the transform works: a replay delivers the same event.
    assert failure.event_id == healthy.accepted[1]["event_id"]


def test_a_chunk_that_fails_as_a_whole_keeps_every_record_with_its_id() -> None:
    message = _message(_row("A"), _row("B"))

    failures = chunk_failures("pos", message, KeyError("boom"))

    expected = [event["event_id"] for event in _pipeline().transform(message).accepted]
    assert [f.event_id for f in failures] == expected
    assert [f.payload for f in failures] == [_row("A"), _row("B")]
    assert {f.reason for f in failures} == {"transform_error"} and "KeyError: 'boom'" in failures[0].detail
