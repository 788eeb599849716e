"""Document context: line records read their header (XML ancestors, JSON head, CSV preamble/trailer)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.chunks import SourceChunk
from router.config import ConfigError, load_config
from router.ingress import chunk_message
from router.messages import IngressChunk, decode_chunk, encode_body
from router.pipeline import DeliveryRule, RoutePipeline
from router.replay import record_message
from tests.integration.harness import write_config
from transforms.mapping import compile_mapping
from transforms.parsers import FileFormatError, RawRecord, iter_records
from transforms.xml_records import MAX_HEADER_ELEMENTS

DESADV = b"""<?xml version="1.0" encoding="UTF-8"?>
<DespatchAdvice number="ASN-0042">
  <ShipTo gln="0614141000012">Store S001</ShipTo>
  <Dates shipped="2026-11-24T06:30:00Z"/>
  <Package sscc="340123450000000017">
    <Line><GTIN>04012345000016</GTIN><Qty>24</Qty></Line>
    <Line><GTIN>04012345000023</GTIN><Qty>12</Qty></Line>
  </Package>
  <Package sscc="340123450000000024">
    <Note>fragile</Note>
    <Line><GTIN>04012345000030</GTIN><Qty>6</Qty></Line>
  </Package>
  <Totals lines="3"/>
</DespatchAdvice>
"""

XML_MAP = {
    "type": "asn",
    "gtin": {"xpath": "GTIN"},
    "quantity": {"xpath": "Qty", "as": "decimal"},
    "location": {"xpath": "/DespatchAdvice/ShipTo/@gln"},
    "occurred_at": {"xpath": "../../Dates/@shipped", "as": "datetime"},
    "asn_id": {"xpath": "ancestor::DespatchAdvice/@number"},
}


def _records(content: bytes, fmt: str, records: str | None = None, **options: Any) -> list[RawRecord]:
    return list(iter_records(io.BytesIO(content), fmt, records, "in.dat", **options))  # type: ignore[arg-type]


def _travelled(records: list[RawRecord]) -> IngressChunk:
    """The ingress message of a chunk, through JSON as the broker carries it."""
    chunk = SourceChunk("asn", "file", "in.dat@x#1", {"file": "in.dat"}, records)
    return decode_chunk(encode_body(chunk_message(chunk)))


def test_xml_lines_read_the_header_by_climbing_ancestors_and_absolute_paths() -> None:
    records = _records(DESADV, "xml", "//Line")
    mapping = compile_mapping({**XML_MAP, "sscc": {"xpath": "../@sscc"}}, "xml", {})
    mapped = [mapping.apply(record) for record in records]
    assert [m["gtin"] for m in mapped] == ["04012345000016", "04012345000023", "04012345000030"]
    assert {m["location"] for m in mapped} == {"0614141000012"}
    assert {m["asn_id"] for m in mapped} == {"ASN-0042"}
    assert [m["sscc"] for m in mapped] == ["340123450000000017"] * 2 + ["340123450000000024"]
    assert mapped[0]["occurred_at"] == datetime(2026, 11, 24, 6, 30, tzinfo=UTC)


def test_xml_context_keeps_only_the_header_not_siblings_already_emitted_nor_the_trailer() -> None:
    records = _records(DESADV, "xml", "//Line")
    assert records[0].document is records[1].document, "lines under one header share one context"
    last = records[2].document["xml"]
    assert "04012345000016" not in last and "340123450000000017" not in last
    assert "<Note>fragile</Note>" in last and "ShipTo" in last
    assert "Totals" not in last
    mapping = compile_mapping({"lines": {"xpath": "/DespatchAdvice/Totals/@lines"}}, "xml", {})
    assert mapping.apply(records[2]) == {}, "the trailer comes after the records: not readable"


def test_from_document_reads_the_document_root_in_every_format() -> None:
    [xml] = _records(DESADV, "xml", "/DespatchAdvice/Package/Line")[:1]
    mapping = compile_mapping({"asn": {"xpath": "@number", "from": "document"}}, "xml", {})
    assert mapping.apply(xml) == {"asn": "ASN-0042"}

    document = (
        b'{"header": {"asn": "ASN-7", "ship_to": "S001"}, "lines": [{"gtin": "1"}, {"gtin": "2"}], "n": 2}'
    )
    json_map = compile_mapping(
        {"asn": {"path": "header.asn", "from": "document"}, "sku": {"path": "gtin"}}, "json", {}
    )
    for records in (_records(document, "json", "lines"), _records(document, "json", "lines[?gtin]")):
        assert [json_map.apply(record) for record in records] == [
            {"asn": "ASN-7", "sku": "1"},
            {"asn": "ASN-7", "sku": "2"},
        ]
    [streamed] = _records(document, "json", "lines")[:1]
    assert streamed.document == {"header": {"asn": "ASN-7", "ship_to": "S001"}}, "no lines, no trailer"

    csv = b"STORE;S001\nEXPORTED;2026-11-24\nSKU;QTY\nA;1\nB;2\nTOTAL;2\n"
    records = _records(csv, "csv", csv_delimiter=";", csv_preamble=2, csv_trailer="TOTAL")
    csv_map = compile_mapping(
        {"store": {"column": "STORE", "from": "document"}, "sku": {"column": "SKU"}}, "csv", {}
    )
    assert [csv_map.apply(record) for record in records] == [
        {"store": "S001", "sku": "A"},
        {"store": "S001", "sku": "B"},
    ]
    assert [record.line for record in records] == [4, 5]


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        (b"STORE;S001\nSKU;QTY\nA;1\nTOTAL;3\n", 4, "trailer 'TOTAL' counts 3 record(s) but 1 were read"),
        (b"STORE;S001\nSKU;QTY\nA;1\n", 3, "ends without its trailer row 'TOTAL'"),
        (b"STORE;S001\nSKU;QTY\nA;1\nTOTAL;1\nB;2\n", 5, "row after the trailer 'TOTAL' of line 4"),
        (b"STORE;S001;extra\nSKU;QTY\n", 1, "preamble line must be KEY;VALUE; found 3 field(s)"),
        (b"STORE;S001\nSKU;QTY\nA;1\nTOTAL;one\n", 4, "count must be digits, not 'one'"),
    ],
)
def test_csv_preamble_and_trailer_problems_refuse_the_file_naming_the_line(
    content: bytes, line: int, reason: str
) -> None:
    with pytest.raises(FileFormatError) as caught:
        _records(content, "csv", csv_delimiter=";", csv_preamble=1, csv_trailer="TOTAL")
    assert caught.value.line == line and reason in caught.value.reason, str(caught.value)


def test_the_header_travels_once_per_chunk_and_lines_map_after_the_broker_round_trip() -> None:
    records = _records(DESADV, "xml", "//Line")
    message = _travelled(records)
    assert len(message.documents or []) == 2, "one context per distinct header, not one per line"
    assert [record.doc for record in message.records] == [0, 0, 1]
    pipeline = RoutePipeline(
        "asn", compile_mapping(XML_MAP, "xml", {}), ["gtin", "location"], [DeliveryRule("wms", 1)]
    )
    result = pipeline.transform(message)
    assert not result.failures, [failure.detail for failure in result.failures]
    assert [event["location"] for event in result.accepted] == ["0614141000012"] * 3


def test_a_failed_line_keeps_its_header_so_a_replay_maps_it_again() -> None:
    broken = DESADV.replace(b"<Qty>12</Qty>", b"<Qty>twelve</Qty>")
    pipeline = RoutePipeline(
        "asn", compile_mapping(XML_MAP, "xml", {}), ["gtin", "location"], [DeliveryRule("wms", 1)]
    )
    [failure] = pipeline.transform(_travelled(_records(broken, "xml", "//Line"))).failures
    assert "line 7 (record 2)" in failure.detail and "field 'quantity'" in failure.detail
    assert "ShipTo" in failure.source_ref["document"]["xml"]

    class Letter:
        stage = "transform"
        route = "asn"
        id = 1
        event_id = failure.event_id
        source_ref = failure.source_ref
        payload = failure.payload.replace("twelve", "12")

    replayed = pipeline.transform(record_message(Letter()))  # type: ignore[arg-type]
    assert not replayed.failures and replayed.accepted[0]["location"] == "0614141000012"
    assert replayed.accepted[0]["event_id"] == failure.event_id


def test_a_header_too_large_to_keep_refuses_the_file_instead_of_filling_memory() -> None:
    """Children before the first record are kept as header; a wrong records path must not keep them all."""
    many = b"<Export>" + b"<Row><SKU>A</SKU></Row>" * (MAX_HEADER_ELEMENTS + 1) + b"</Export>"
    with pytest.raises(FileFormatError) as caught:
        _records(many, "xml", "//Line")
    assert "<Export> has more than 10000 child elements before its first record" in caught.value.reason
    assert "'//Line'" in caught.value.reason
    after = b"<Export><Line/>" + b"<Row/>" * (MAX_HEADER_ELEMENTS + 1) + b"<Line/></Export>"
    assert len(_records(after, "xml", "//Line")) == 2, "what follows a record is dropped, not kept"


def test_from_document_on_jsonl_is_refused_at_compile_time() -> None:
    with pytest.raises(ValueError, match="a jsonl line is a whole document"):
        compile_mapping({"asn": {"path": "asn", "from": "document"}}, "jsonl", {})
    with pytest.raises(ValueError, match="from must be record or document"):
        compile_mapping({"asn": {"path": "asn", "from": "header"}}, "json", {})


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        (
            {"format": "x12", "records": "HL:I", "source": {"type": "file", "path": "in"}},
            "an EDI record carries its header in itself",
        ),
        ({"format": "json", "source": {"type": "file", "path": "in"}}, "a json file's records are the whole"),
        (
            {"format": "json", "source": {"type": "rest", "url": "http://127.0.0.1:9/items", "poll": "1m"}},
            "a REST page is not kept with its records",
        ),
    ],
)
def test_validate_refuses_from_document_where_records_have_no_document(
    tmp_path: Path, route: dict[str, Any], reason: str
) -> None:
    path = write_config(tmp_path, broker_url="memory://", prefix="x", targets={"erp": "http://127.0.0.1:9"})
    document = json.loads(path.read_text())
    document["routes"] = [
        {
            "name": "no-document",
            **route,
            "map": {"type": "sale", "sku": {"path": "sku", "from": "document"}},
            "deliver": ["erp"],
        }
    ]
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=reason):
        load_config(path)
