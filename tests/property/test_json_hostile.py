"""Hostile JSON and JSONL through the file path: deep nesting, lone surrogates, huge numbers, duplicate
keys, records that are not objects and fields of the wrong type. Every record is an event or a dead
letter, or the file is rejected with a reason."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from state import Store
from tests.property.harness import PROPERTY_SETTINGS, assert_accounted, ingest, make_route, rarely

STOCK_MAP = {
    "type": "stock.snapshot",
    "sku": {"path": "sku"},
    "location": {"path": "warehouse"},
    "quantity": {"path": "on_hand", "as": "decimal"},
    "occurred_at": {"path": "counted_at", "as": "datetime"},
    "alt_ids": {"lot": {"path": "lot", "as": "string"}},
}
SALE_MAP = {
    "type": "sale",
    "sku": {"path": "sku"},
    "location": {"path": "warehouse"},
    "quantity": {"path": "on_hand", "as": "decimal"},
    "occurred_at": {"path": "counted_at", "as": "datetime"},
    "line": {"path": "line", "as": "int"},
}

DEEP = 3000
HOSTILE_VALUES = [
    '"\\ud800"',
    '"a\\udfffb"',
    '"\\u0000"',
    '"\\ufeff"',
    "1" * 5000,
    "1e999999999",
    "-1E-999999999",
    "0." + "0" * 400 + "1",
    "NaN",
    "Infinity",
    "[" * DEEP + "]" * DEEP,
    '{"a":' * 70 + "1" + "}" * 70,
    '"' + "x" * 5000 + '"',
    "[]",
    "{}",
    "null",
    "true",
    '"2026-13-45T99:00:00Z"',
    '"2026-03-08T02:30:00"',
]

plain_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6) | st.decimals(allow_nan=False, places=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def plain(value: Any) -> str:
    return json.dumps(value, default=str)


values = st.one_of(plain_values.map(plain), st.sampled_from(HOSTILE_VALUES))


@st.composite
def record_texts(draw: st.DrawFn) -> str:
    """One record as JSON text: mostly a plausible stock count, with hostile values and keys mixed in."""
    fields = {
        "sku": plain(draw(st.from_regex(r"SKU-[A-Z0-9]{1,6}", fullmatch=True))),
        "warehouse": plain(draw(st.sampled_from(["DC1", "DC2"]))),
        "on_hand": draw(st.sampled_from(["12", "0", "3.50", '"7"', "-2"])),
        "counted_at": plain("2026-11-24T09:02:11+01:00"),
        "line": draw(st.sampled_from(["1", "2.0", '"3"'])),
        "lot": plain("L1"),
    }
    pairs = [(key, draw(values) if rarely(draw, 10) else value) for key, value in fields.items()]
    if rarely(draw):
        pairs.append((draw(st.sampled_from(list(fields))), draw(values)))  # a duplicate key
    if rarely(draw):
        return draw(values)  # not an object at all
    return "{" + ",".join(f"{json.dumps(key)}:{value}" for key, value in pairs) + "}"


def mutate(draw: st.DrawFn, text: str) -> str:
    if rarely(draw):
        at = draw(st.integers(min_value=0, max_value=len(text)))
        text = (
            text[:at]
            + draw(st.sampled_from([",", "}", "]", '"', "\\", "\n", "\ufeff", "{", "\x00"]))
            + text[at:]
        )
    return text


@st.composite
def jsonl_files(draw: st.DrawFn) -> bytes:
    lines = [mutate(draw, text) for text in draw(st.lists(record_texts(), max_size=7))]
    text = "\n".join(lines) + ("\n" if draw(st.booleans()) else "")
    return (("\ufeff" if rarely(draw) else "") + text).encode("utf-8", errors="surrogatepass")


@st.composite
def json_files(draw: st.DrawFn) -> bytes:
    records = draw(st.lists(record_texts(), max_size=6))
    array = "[" + ",\n".join(records) + "]"
    document = draw(
        st.sampled_from(
            [
                '{"events": %s}',
                '{"meta": {"n": 1}, "events": %s, "tail": [1, 2]}',
                '{"events": %s, "events": []}',
                "%s",
                '{"other": %s}',
            ]
        )
    )
    text = mutate(draw, document.replace("%s", array))
    return (("\ufeff" if rarely(draw) else "") + text).encode("utf-8", errors="surrogatepass")


@settings(PROPERTY_SETTINGS, max_examples=250)
@given(jsonl_files())
@example(b'{"sku": "\\ud800", "warehouse": "DC1", "on_hand": 1, "counted_at": "2026-11-24T09:02:11Z"}\n')
@example(("[" * DEEP + "]" * DEEP).encode())
@example(b'{"sku": "A", "warehouse": "DC1", "on_hand": 1e999999999, "line": 1e999999999}')
def test_every_jsonl_record_is_an_event_or_a_dead_letter_or_the_file_is_rejected_with_its_line(
    store: Store, content: bytes
) -> None:
    route = make_route("marketplace", "jsonl", None, SALE_MAP, ["sku", "location"])
    assert_accounted(ingest(content, route, store))


@settings(PROPERTY_SETTINGS, max_examples=250)
@given(json_files(), st.sampled_from(["events", "events[?sku != 'SKU-X']"]))
@example(b'{"events": [' + b"1" * 5000 + b"]}", "events")
@example(b'{"events": [{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}]}", "events")
@example(b'{"events": [{"sku": "\\ud800"}]}', "events")
def test_every_json_record_is_an_event_or_a_dead_letter_or_the_file_is_rejected(
    store: Store, content: bytes, records: str
) -> None:
    route = make_route("threepl", "json", records, STOCK_MAP, ["sku", "location"])
    assert_accounted(ingest(content, route, store), positioned=False)


@settings(PROPERTY_SETTINGS, max_examples=100)
@given(st.binary(max_size=200), st.sampled_from(["json", "jsonl"]))
def test_arbitrary_bytes_as_json_are_accounted_for(store: Store, content: bytes, fmt: str) -> None:
    route = make_route("threepl", fmt, "events" if fmt == "json" else None, STOCK_MAP, ["sku"])
    assert_accounted(ingest(content, route, store), positioned=fmt == "jsonl")
