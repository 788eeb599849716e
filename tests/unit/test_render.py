"""Outbound payloads: JSON objects and arrays, XML documents and CSV files, shaped by a target's body."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from lxml import etree

from transforms.render import PayloadRenderer, RenderError, render_events

EVENTS: list[dict[str, Any]] = [
    {
        "event_id": "ev-1",
        "type": "sale",
        "sku": "A-1",
        "location": "S001",
        "quantity": "2.50",
        "biz_transactions": [{"type": "order", "id": "T1"}, {"type": "inv", "id": "I7"}],
        "source": {"route": "pos-sales", "record": 1},
        "disposition": None,
    },
    {"event_id": "ev-2", "type": "sale", "sku": "B & C", "location": "S002", "quantity": "-1"},
]

BODY = {"itemCode": "sku", "warehouse": "location", "qty": "quantity", "orders": "biz_transactions[].id"}


def test_json_single_event_is_one_object_shaped_by_body() -> None:
    payload, content_type = PayloadRenderer(body=BODY, fmt="json").render(EVENTS[:1], as_batch=False)
    assert content_type == "application/json"
    assert json.loads(payload) == {
        "itemCode": "A-1",
        "warehouse": "S001",
        "qty": "2.50",
        "orders": ["T1", "I7"],
    }


def test_json_batch_is_an_array_of_whole_events_without_body() -> None:
    payload, _ = render_events(EVENTS, body=None, fmt="json", as_batch=True)
    assert json.loads(payload) == EVENTS


def test_json_bytes_are_compact_utf8_with_exact_decimals_and_offsets() -> None:
    event = {
        "sku": 'Café \u2028"x"\n',
        "quantity": Decimal("2.50"),
        "at": datetime(2026, 11, 24, 10, 15, tzinfo=timezone(timedelta(hours=-5))),
        "line": 2**70,
    }
    payload, _ = render_events([event], body=None, fmt="json", as_batch=False)
    as_text = {**event, "quantity": "2.50", "at": "2026-11-24T10:15:00-05:00"}
    assert payload == json.dumps(as_text, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def test_a_single_event_payload_refuses_several_events() -> None:
    with pytest.raises(ValueError, match="exactly one event, got 2"):
        PayloadRenderer().render(EVENTS, as_batch=False)


def test_xml_has_root_one_element_per_event_nested_and_repeated_children() -> None:
    renderer = PayloadRenderer(fmt="xml", xml_root="Movements", xml_element="Movement")
    payload, content_type = renderer.render(EVENTS, as_batch=True)

    assert content_type == "application/xml"
    assert payload.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    root = etree.fromstring(payload)
    assert root.tag == "Movements"
    movements = root.findall("Movement")
    assert len(movements) == 2
    first = movements[0]
    assert first.findtext("sku") == "A-1"
    assert [t.findtext("id") for t in first.findall("biz_transactions")] == ["T1", "I7"]
    assert first.findtext("source/route") == "pos-sales"
    assert first.find("disposition") is None
    assert movements[1].findtext("sku") == "B & C"


def test_xml_with_body_uses_the_body_fields_as_children() -> None:
    payload, _ = PayloadRenderer(body=BODY, fmt="xml").render(EVENTS[:1], as_batch=False)
    event = etree.fromstring(payload).find("event")
    assert [child.tag for child in event] == ["itemCode", "warehouse", "qty", "orders", "orders"]


def test_xml_names_are_checked_when_the_renderer_is_built() -> None:
    with pytest.raises(ValueError, match="xml body field 'item code' is not a usable XML element name"):
        PayloadRenderer(body={"item code": "sku"}, fmt="xml")


def test_csv_has_a_header_and_one_row_per_event_with_nested_values_as_json() -> None:
    payload, content_type = PayloadRenderer(body=BODY, fmt="csv").render(EVENTS, as_batch=True)

    assert content_type == "text/csv; charset=utf-8"
    rows = list(csv.reader(io.StringIO(payload.decode("utf-8"))))
    assert rows == [
        ["itemCode", "warehouse", "qty", "orders"],
        ["A-1", "S001", "2.50", '["T1","I7"]'],
        ["B & C", "S002", "-1", ""],
    ]


def test_csv_without_body_uses_every_field_in_first_seen_order() -> None:
    payload, _ = PayloadRenderer(fmt="csv").render(EVENTS, as_batch=True)
    rows = list(csv.DictReader(io.StringIO(payload.decode("utf-8"))))
    assert list(rows[0]) == list(EVENTS[0])
    assert rows[1]["biz_transactions"] == "" and rows[0]["source"] == '{"route":"pos-sales","record":1}'


def test_bad_body_expressions_and_formats_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match=r"body field 'qty': 'quantity\[' is not valid JMESPath"):
        PayloadRenderer(body={"qty": "quantity["})
    with pytest.raises(ValueError, match="unknown payload format 'yaml'"):
        PayloadRenderer(fmt="yaml")  # type: ignore[arg-type]


def test_an_event_the_body_cannot_shape_is_a_render_error_naming_it() -> None:
    renderer = PayloadRenderer(body={"code": "abs(sku)"})  # abs() of a string fails at run time

    with pytest.raises(RenderError, match="ev-2") as caught:
        renderer.render(EVENTS[1:], as_batch=True)
    assert "abs" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
        ("+1+1", "'+1+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1:A9)", "'@SUM(A1:A9)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("\uff1dcmd", "'\uff1dcmd"),
        ("-", "'-"),
        ("a=b", "a=b"),
        ("-5", "-5"),
        ("+3.5", "+3.5"),
        ("-1.25e3", "-1.25e3"),
    ],
)
def test_csv_text_that_a_spreadsheet_would_run_as_a_formula_is_neutralised(value: str, cell: str) -> None:
    payload, _ = PayloadRenderer(body={"note": "note"}, fmt="csv").render([{"note": value}], as_batch=True)

    [header, row] = list(csv.reader(io.StringIO(payload.decode("utf-8"), newline="")))
    assert header == ["note"] and row == [cell]
    # OWASP: a neutralised cell is also quoted, so the quote prefix cannot be split off.
    assert (f'"{cell}"' in payload.decode("utf-8")) == (cell != value)


def test_csv_numbers_are_never_altered() -> None:
    events = [{"qty": Decimal("-5"), "n": -3, "x": -0.5, "flag": True}]
    payload, _ = PayloadRenderer(fmt="csv").render(events, as_batch=True)

    assert payload.decode("utf-8") == "qty,n,x,flag\r\n-5,-3,-0.5,true\r\n"


def test_csv_output_of_ordinary_values_is_what_the_csv_module_writes() -> None:
    rows = [["a", 'say "hi"', "x,y", "line\nbreak", ""], [""]]
    expected = io.StringIO()
    csv.writer(expected).writerows(rows)

    payload, _ = PayloadRenderer(fmt="csv").render([dict(zip("abcde", rows[0], strict=True))], as_batch=True)
    single, _ = PayloadRenderer(body={"a": "a"}, fmt="csv").render([{"a": ""}], as_batch=True)

    assert payload.decode("utf-8").split("\r\n", 1)[1] == expected.getvalue().split("\r\n", 1)[0] + "\r\n"
    assert single.decode("utf-8") == 'a\r\n""\r\n'
