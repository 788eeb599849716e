"""Hostile XML through the file path: entity bombs and external entities (never expanded, never read),
DTDs, declared encodings that lie, deep nesting, namespaces and CDATA. Every record is an event or a
dead letter, or the file is rejected with its line."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from state import Store
from tests.property.harness import (
    PROPERTY_SETTINGS,
    Outcome,
    assert_accounted,
    ingest,
    make_route,
    rarely,
)

ASN_MAP = {
    "type": "asn",
    "asn_id": {"xpath": "AsnNumber"},
    "gtin": {"xpath": "Gtin"},
    "location": {"xpath": "ShipTo"},
    "quantity": {"xpath": "Quantity", "as": "decimal"},
    "uom": {"xpath": "Quantity/@unit", "default": "EA"},
    "occurred_at": {"xpath": "DespatchedAt", "as": "datetime"},
}
SECRET_MARKER = "PROPERTY-XXE-SECRET-7f3a"
SECRET = Path(tempfile.gettempdir()) / f"property-xxe-secret-{os.getpid()}.txt"
"""A local file no entity may ever pull into an event, a dead letter or a rejection reason (one per
process: test processes running side by side each create and remove their own)."""

LAUGHS = "".join(
    f'<!ENTITY lol{level} "{f"&lol{level - 1};" * 10 if level else "lol"}">' for level in range(10)
)
DTDS = [
    "",
    f"<!DOCTYPE DespatchAdvice [{LAUGHS}]>",
    f'<!DOCTYPE DespatchAdvice [<!ENTITY xxe SYSTEM "{SECRET.as_uri()}">]>',
    f'<!DOCTYPE DespatchAdvice [<!ENTITY % p SYSTEM "{SECRET.as_uri()}"> %p;]>',
    f'<!DOCTYPE DespatchAdvice SYSTEM "{SECRET.as_uri()}">',
    '<!DOCTYPE DespatchAdvice [<!ENTITY net SYSTEM "http://127.0.0.1:9/x">]>',
    '<!DOCTYPE DespatchAdvice [<!ATTLIST Quantity unit CDATA "KGM">]>',
]
ENTITY_REFS = ["&lol9;", "&xxe;", "&net;", "&undefined;", "&amp;", "&#x41;", "&#0;", "&#xD800;"]
DEEP = "<a>" * 300 + "x" + "</a>" * 300
ROOTS = [
    ("<DespatchAdvice>", "</DespatchAdvice>", ""),
    ('<DespatchAdvice xmlns="urn:x">', "</DespatchAdvice>", ""),
    ('<d:DespatchAdvice xmlns:d="urn:d">', "</d:DespatchAdvice>", "d:"),
]
ENCODINGS = ["utf-8", "iso-8859-1", "utf-16"]


@pytest.fixture(scope="module", autouse=True)
def secret_file() -> Iterator[Path]:
    SECRET.write_text(f"{SECRET_MARKER}\n", encoding="utf-8")
    yield SECRET
    SECRET.unlink(missing_ok=True)


gtins = st.sampled_from(["0614141000012", "00614141000029", "4006381333931"])
plain_values = {
    "AsnNumber": st.from_regex(r"ASN-[0-9]{1,5}", fullmatch=True),
    "Gtin": gtins,
    "ShipTo": st.sampled_from(["DC1", "0614141000012"]),
    "Quantity": st.decimals(min_value=0, max_value=999, places=1).map(str),
    "DespatchedAt": st.sampled_from(["2026-11-24T09:02:11Z", "2026-07-01T18:30:00-04:00"]),
}
hostile_values = st.one_of(
    st.sampled_from(ENTITY_REFS),
    st.sampled_from([DEEP, "<![CDATA[12]]>", "<![CDATA[<b>&lol9;</b>]]>", "<!-- c -->7", "<?pi x?>3"]),
    st.sampled_from(["1e999999999", "9" * 5000, "", "  ", "-1", "é", "\x00", "]]>", "<", "&"]),
    st.text(max_size=5).map(lambda text: text.replace("<", "&lt;").replace("&", "&amp;")),
)


@st.composite
def xml_files(draw: st.DrawFn) -> bytes:
    open_root, close_root, prefix = draw(st.sampled_from(ROOTS)) if rarely(draw) else ROOTS[0]
    lines = []
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        children = []
        for tag, strategy in plain_values.items():
            value = draw(hostile_values) if rarely(draw, 12) else draw(strategy)
            unit = ' unit="KGM"' if tag == "Quantity" and draw(st.booleans()) else ""
            if value.startswith("<![CDATA[") or not rarely(draw, 10):
                children.append(f"<{prefix}{tag}{unit}>{value}</{prefix}{tag}>")
            else:
                children.append(f"<{prefix}{tag}{unit}><![CDATA[{value}]]></{prefix}{tag}>")
        attribute = f' ref="{draw(st.sampled_from(ENTITY_REFS))}"' if rarely(draw, 10) else ""
        lines.append(f"<{prefix}Line{attribute}>{''.join(children)}</{prefix}Line>")
    dtd = draw(st.sampled_from(DTDS)) if rarely(draw, 2) else ""
    encoding = draw(st.sampled_from(ENCODINGS))
    declared = draw(st.sampled_from([*ENCODINGS, "klingon", None])) if rarely(draw) else encoding
    declaration = f'<?xml version="1.0" encoding="{declared}"?>' if declared else ""
    text = "\n".join([declaration, dtd, open_root, *lines, close_root])
    if rarely(draw, 10):
        at = draw(st.integers(min_value=0, max_value=len(text)))
        text = text[:at] + draw(st.sampled_from(["<", "&", "]]>", "\x00", "</Line>", "\ufeff"])) + text[at:]
    return text.encode(encoding, errors="replace")


def assert_nothing_expanded_or_read(content: bytes, outcome: Outcome) -> None:
    """No external entity was read and no entity bomb went off: the output is no bigger than the input
    could explain."""
    output = json.dumps(
        [
            str(outcome.rejected or ""),
            outcome.events,
            [(failure.detail, failure.payload) for failure in outcome.failures],
        ],
        default=str,
    )
    assert SECRET_MARKER not in output
    assert len(output) < 20 * len(content) + 20_000


@settings(PROPERTY_SETTINGS, max_examples=200)
@given(xml_files(), st.sampled_from(["/DespatchAdvice/Line", "//Line"]))
@example(
    f"<!DOCTYPE DespatchAdvice [{LAUGHS}]><DespatchAdvice><Line><Gtin>&lol9;</Gtin></Line>"
    '<Line ref="&lol9;"><Gtin>1</Gtin></Line></DespatchAdvice>'.encode(),
    "//Line",
)
@example(
    f'<!DOCTYPE DespatchAdvice [<!ENTITY xxe SYSTEM "{SECRET.as_uri()}">]><DespatchAdvice>'
    '<Line ref="&xxe;"><Gtin>&xxe;</Gtin></Line></DespatchAdvice>'.encode(),
    "//Line",
)
def test_every_xml_record_is_an_event_or_a_dead_letter_and_no_entity_is_expanded(
    store: Store, content: bytes, records: str
) -> None:
    route = make_route("asn", "xml", records, ASN_MAP, ["gtin", "location"])
    outcome = ingest(content, route, store)
    assert_accounted(outcome)
    assert_nothing_expanded_or_read(content, outcome)


@settings(PROPERTY_SETTINGS, max_examples=100)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_as_xml_are_accounted_for(store: Store, content: bytes) -> None:
    route = make_route("asn", "xml", "//Line", ASN_MAP, ["gtin", "location"])
    assert_accounted(ingest(content, route, store))
