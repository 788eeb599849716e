"""Hostile CSV through the file path: odd delimiters, quotes, NULs, CRs, BOMs, huge fields, ragged rows
and bytes that are not the declared encoding. Every record is an event or a dead letter, or the file
is rejected with its line."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from state import Store
from tests.property.harness import PROPERTY_SETTINGS, assert_accounted, ingest, make_route, rarely
from transforms.lookups import Lookup
from transforms.parsers import CsvDialect

POS_MAP = {
    "type": "sale",
    "sku": {"column": "SKU"},
    "location": {"column": "STORE", "lookup": "stores"},
    "quantity": {"column": "QTY", "as": "decimal"},
    "occurred_at": {"column": "SOLD_AT", "as": "datetime", "tz": "America/New_York"},
    "transaction_id": {"column": "TXN"},
    "line": {"column": "LINE", "as": "int"},
}
STORES = {
    "stores": Lookup("stores", {"S001": "0614141000012", "S002": "0614141000029"}, key_column="store_code")
}
COLUMNS = ["TXN", "LINE", "SKU", "STORE", "QTY", "SOLD_AT"]
DELIMITERS = [",", ";", "\t", "|"]
ENCODINGS = ["utf-8", "cp1252", "latin-1"]

HUGE = "x" * 140_000  # beyond the csv module's default field limit of 131072 characters
fields = st.one_of(
    st.sampled_from(
        ["", "S001", "SKU-1", "2", "-1", "1.5", "1e9999", "1,234.50", "two", "2026-11-24 09:02:11"]
    ),
    st.sampled_from(
        ["2026-03-08 02:30:00", "2026-11-24T09:02:11+01:00", "99999999999999999999", "1E+999999"]
    ),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
    st.text(alphabet='",;|\t\r\n\x00\ufeff\\ ab', max_size=8),
    st.sampled_from([HUGE, "9" * 5000, "y" * 5000]),
)


valid_rows = st.fixed_dictionaries(
    {
        "TXN": st.from_regex(r"T[0-9]{1,6}", fullmatch=True),
        "LINE": st.integers(min_value=1, max_value=99).map(str),
        "SKU": st.from_regex(r"SKU-[A-Z0-9]{1,8}", fullmatch=True),
        "STORE": st.sampled_from(["S001", "S002"]),
        "QTY": st.decimals(min_value=0, max_value=10_000, places=2).map(str),
        "SOLD_AT": st.sampled_from(["2026-11-24 09:02:11", "2026-07-01 18:30:00"]),
    }
)


@st.composite
def csv_rows(draw: st.DrawFn, columns: list[str]) -> list[str]:
    """A plausible row with some fields replaced by hostile ones, and sometimes ragged."""
    row = draw(valid_rows)
    values = [row.get(column, "") for column in columns]
    for index in range(len(values)):
        if rarely(draw, 10):
            values[index] = draw(fields)
    if rarely(draw):
        values = values[: draw(st.integers(min_value=0, max_value=len(values)))]
    if rarely(draw):
        values += draw(st.lists(fields, min_size=1, max_size=3))
    return values


@st.composite
def csv_files(draw: st.DrawFn) -> tuple[bytes, str, str]:
    """(content, delimiter the route expects, encoding the route expects)."""
    delimiter = draw(st.sampled_from(DELIMITERS))
    encoding = draw(st.sampled_from(ENCODINGS))
    written_with = draw(st.sampled_from(DELIMITERS)) if rarely(draw) else delimiter
    written_in = draw(st.sampled_from(ENCODINGS)) if rarely(draw) else encoding
    header = draw(st.lists(fields, max_size=8)) if rarely(draw) else draw(st.permutations(COLUMNS))
    rows = draw(st.lists(csv_rows(header), max_size=8))
    quoting = draw(st.sampled_from(["minimal", "all", "none"]))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"])) if rarely(draw) else "\n"

    def render(value: str) -> str:
        needs_quotes = any(char in value for char in (written_with, '"', "\r", "\n"))
        if quoting == "all" or (quoting == "minimal" and needs_quotes):
            return '"' + value.replace('"', '""') + '"'
        return value

    text = newline.join(written_with.join(render(value) for value in row) for row in [header, *rows])
    text += newline if draw(st.booleans()) else ""
    text = ("\ufeff" + text) if rarely(draw) else text
    content = text.encode(written_in, errors="replace")
    if rarely(draw):
        at = draw(st.integers(min_value=0, max_value=len(content)))
        content = content[:at] + draw(st.binary(min_size=1, max_size=4)) + content[at:]
    return content, delimiter, encoding


@settings(PROPERTY_SETTINGS, max_examples=250)
@given(csv_files())
@example((b'TXN,LINE,SKU,STORE,QTY,SOLD_AT\n"T1",1,A,S1,2,2026-11-24 09:02:11\n', ",", "utf-8"))
def test_every_csv_record_is_an_event_or_a_dead_letter_or_the_file_is_rejected_with_its_line(
    store: Store, case: tuple[bytes, str, str]
) -> None:
    content, delimiter, encoding = case
    route = make_route(
        "pos", "csv", "rows", POS_MAP, ["sku", "location"], CsvDialect(delimiter, encoding), STORES
    )
    assert_accounted(ingest(content, route, store))


@settings(PROPERTY_SETTINGS, max_examples=150)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_as_csv_are_accounted_for(store: Store, content: bytes) -> None:
    route = make_route("pos", "csv", "rows", POS_MAP, ["sku", "location"], lookups=STORES)
    assert_accounted(ingest(content, route, store))
