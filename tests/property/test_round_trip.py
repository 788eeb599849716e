"""Valid rows, written as any of the four formats, become exactly the events they describe: the
hostile-input properties could otherwise pass by dead-lettering everything."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from state import Store
from tests.property.harness import PROPERTY_SETTINGS, ingest, make_route
from transforms.mapping import SELECTOR_FOR_FORMAT
from transforms.parsers import CsvDialect

COLUMNS = {"sku": "SKU", "location": "STORE", "quantity": "QTY", "occurred_at": "SOLD_AT", "line": "LINE"}

text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Co", "Cn", "Zl", "Zp"]),
    min_size=1,
    max_size=12,
).filter(lambda value: value == value.strip() and not value.isdigit())
rows = st.fixed_dictionaries(
    {
        "sku": text,
        "location": text,
        "quantity": st.decimals(min_value=0, max_value=10**9, places=3),
        "occurred_at": st.datetimes(
            min_value=datetime(2000, 1, 1),
            max_value=datetime(2100, 1, 1),
            timezones=st.integers(min_value=-12 * 4, max_value=14 * 4).map(
                lambda quarters: timezone(timedelta(minutes=15 * quarters))
            ),
        ),
        "line": st.integers(min_value=1, max_value=10**6),
    }
)


def route_map(fmt: str) -> dict[str, Any]:
    selector = SELECTOR_FOR_FORMAT[fmt]
    return {
        "type": "sale",
        "sku": {selector: COLUMNS["sku"]},
        "location": {selector: COLUMNS["location"]},
        "quantity": {selector: COLUMNS["quantity"], "as": "decimal"},
        "occurred_at": {selector: COLUMNS["occurred_at"], "as": "datetime"},
        "line": {selector: COLUMNS["line"], "as": "int"},
    }


def as_text(row: dict[str, Any]) -> dict[str, str]:
    return {
        COLUMNS[key]: value.isoformat() if isinstance(value, datetime) else str(value)
        for key, value in row.items()
    }


def json_object(row: dict[str, Any], numbers: bool) -> str:
    """A row as a JSON object; quantity and line as JSON numbers or as strings (partners send both)."""
    members = [
        f"{json.dumps(name)}: {value if numbers and name in ('QTY', 'LINE') else json.dumps(value)}"
        for name, value in as_text(row).items()
    ]
    return "{" + ", ".join(members) + "}"


def render(fmt: str, records: list[dict[str, Any]], delimiter: str, bom: bool, numbers: bool) -> bytes:
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, list(COLUMNS.values()), delimiter=delimiter, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(as_text(row) for row in records)
        text = buffer.getvalue()
    elif fmt == "xml":
        root = etree.Element("DespatchAdvice")
        for row in records:
            line = etree.SubElement(root, "Line")
            for tag, value in as_text(row).items():
                etree.SubElement(line, tag).text = value
        text = etree.tostring(root, encoding="unicode")
    else:
        objects = [json_object(row, numbers) for row in records]
        text = "\n".join(objects) + "\n" if fmt == "jsonl" else '{"events": [' + ",\n".join(objects) + "]}"
    return (("\ufeff" if bom else "") + text).encode("utf-8")


@settings(PROPERTY_SETTINGS, max_examples=150)
@given(
    st.sampled_from(["csv", "jsonl", "json", "xml"]),
    st.lists(rows, min_size=1, max_size=7),
    st.sampled_from([",", ";", "\t", "|"]),
    st.booleans(),
    st.booleans(),
)
def test_valid_rows_become_events_with_the_same_values_in_every_format(
    store: Store, fmt: str, records: list[dict[str, Any]], delimiter: str, bom: bool, numbers: bool
) -> None:
    route = make_route(
        "round-trip",
        fmt,
        {"csv": "rows", "xml": "//Line", "json": "events"}.get(fmt),
        route_map(fmt),
        ["sku", "location"],
        CsvDialect(delimiter),
    )
    outcome = ingest(render(fmt, records, delimiter, bom, numbers), route, store)

    assert outcome.rejected is None and not outcome.failures, outcome.rejected or outcome.failures[0].detail
    assert len(outcome.events) == len(records)
    for number, (row, event) in enumerate(zip(records, outcome.events, strict=True), start=1):
        assert event["source"]["record"] == number
        assert (event["sku"], event["location"], event["line"]) == (row["sku"], row["location"], row["line"])
        assert Decimal(event["quantity"]) == row["quantity"]
        occurred_at = datetime.fromisoformat(event["occurred_at"])
        assert occurred_at == row["occurred_at"]
        assert occurred_at.utcoffset() == row["occurred_at"].utcoffset()
