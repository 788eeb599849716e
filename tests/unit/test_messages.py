"""The wire contracts: ingress chunks and partition batches decode typed, old ones too, bad ones say why."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from connectors.chunks import SourceChunk
from router.ingress import chunk_message
from router.messages import (
    CHUNK_VERSION,
    MalformedMessage,
    PartitionBatch,
    decode_batch,
    decode_chunk,
    encode_body,
)
from transforms.parsers import RawRecord

HEADER = {"asn": "ASN-1"}
# Bodies exactly as the release before versions wrote them (router/ingress.py, router/workers.py).
UNVERSIONED_CHUNK = (
    b'{"route":"asn","system":"file","message_id":"a.xml@ab#1","origin":{"file":"a.xml","sha256":"ab"},'
    b'"chunk":1,"records":[{"n":1,"line":3,"data":"<Line/>","id":"x-1","doc":0},'
    b'{"n":2,"data":null,"error":"bad line"}],"id_origin":{},"documents":[{"asn":"ASN-1"}]}'
)
UNVERSIONED_BATCH = (
    b'{"route":"pos","target":"erp","partition":3,"events":[{"event_id":"e1","quantity":"1.50",'
    b'"source":{"route":"pos","record":1}}]}'
)


def test_a_chunk_crosses_the_wire_typed_with_its_version_and_exact_decimals() -> None:
    records = [
        RawRecord(1, 2, {"QTY": Decimal("1.50")}, document=HEADER),
        RawRecord(2, 3, {"QTY": "2"}, error="short line", document=HEADER),
    ]
    chunk = SourceChunk("asn", "file", "a@x#1", {"file": "a"}, records, record_ids=["r1", "r2"], id_origin={})

    body = encode_body(chunk_message(chunk))
    message = decode_chunk(body)

    assert json.loads(body)["version"] == CHUNK_VERSION
    assert (message.route, message.system, message.message_id, message.origin) == (
        "asn",
        "file",
        "a@x#1",
        {"file": "a"},
    )
    assert [record.data for record in message.records] == [{"QTY": "1.50"}, {"QTY": "2"}]
    assert [record.error for record in message.records] == [None, "short line"]
    assert message.identity_origin == {} and message.documents == [HEADER]
    assert [message.document_of(record) for record in message.records] == [HEADER, HEADER]
    assert [record.id for record in message.records] == ["r1", "r2"]


def test_a_chunk_without_id_origin_or_documents_leaves_them_out_and_uses_its_origin() -> None:
    chunk = SourceChunk("pos", "file", "p@x#1", {"file": "p", "sha256": "x"}, [RawRecord(1, 2, {"A": "1"})])

    body = json.loads(encode_body(chunk_message(chunk)))

    assert "id_origin" not in body and "documents" not in body
    assert decode_chunk(encode_body(body)).identity_origin == {"file": "p", "sha256": "x"}


def test_messages_already_queued_by_the_release_before_versions_read_as_version_1() -> None:
    chunk = decode_chunk(UNVERSIONED_CHUNK)
    batch = decode_batch(UNVERSIONED_BATCH)

    assert chunk.version == 1 and batch.version == 1
    assert [record.n for record in chunk.records] == [1, 2]
    assert chunk.document_of(chunk.records[0]) == HEADER and chunk.document_of(chunk.records[1]) is None
    assert chunk.records[1].error == "bad line" and chunk.identity_origin == {}
    assert (batch.route, batch.target, batch.partition) == ("pos", "erp", 3)
    assert batch.events[0]["quantity"] == "1.50"


def test_a_batch_crosses_the_wire_with_its_version() -> None:
    events = [{"event_id": "e1", "source": {"route": "pos"}, "quantity": Decimal("2.0")}]
    body = encode_body(PartitionBatch(target="erp", partition=0, events=events))

    assert json.loads(body) == {
        "target": "erp",
        "partition": 0,
        "events": [{"event_id": "e1", "source": {"route": "pos"}, "quantity": "2.0"}],
        "version": 1,
    }
    assert decode_batch(body).events[0]["quantity"] == "2.0"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"\x00 not json", "malformed"),
        ([1, 2], "Expected `object`, got `array`"),
        ({"route": "pos", "system": "file"}, "missing required field `message_id`"),
        ({"route": "pos", "system": "file", "message_id": "m", "records": {}}, r"at `\$.records`"),
        ({"route": "pos", "system": "file", "message_id": "m", "records": [{"data": {}}]}, "field `n`"),
        ({"route": "pos", "system": "file", "message_id": "m", "origin": "x", "records": []}, r"\$.origin"),
        (
            {"route": "p", "system": "f", "message_id": "m", "records": [{"n": 1, "doc": 0}]},
            "names document 0",
        ),
        ({"route": "p", "system": "f", "message_id": "m", "records": [], "version": 2}, "unknown version 2"),
        ({"route": 1, "system": "f", "message_id": "m", "records": {}, "version": 9}, "unknown version 9"),
    ],
)
def test_only_a_message_that_is_not_a_chunk_is_malformed(body: Any, problem: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(MalformedMessage, match=problem) as raised:
        decode_chunk(raw)
    assert str(raised.value).startswith("ingress chunk: ")


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"events": [{"sku": "no id"}]}, "missing required field `target`"),
        ({"target": "erp", "partition": 0, "events": [{"sku": "no id"}]}, "event 1 has no 'event_id'"),
        ({"target": "erp", "partition": 0, "events": [{"event_id": "e"}]}, "event 1 has no 'source'"),
        ({"target": "erp", "partition": 0, "events": [], "version": 2}, "unknown version 2"),
    ],
)
def test_only_a_message_that_is_not_a_batch_of_events_is_malformed(body: Any, problem: str) -> None:
    with pytest.raises(MalformedMessage, match=problem) as raised:
        decode_batch(json.dumps(body).encode())
    assert str(raised.value).startswith("partition batch: ")
