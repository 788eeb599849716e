"""Streaming record splitters: CSV, XML, JSON and JSONL records, their line numbers and their errors."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

from transforms.json_records import MAX_JSON_DEPTH
from transforms.parsers import (
    FileFormatError,
    RawRecord,
    check_file,
    check_records_path,
    iter_records,
)
from transforms.records import MAX_REASON_CHARS


def _records(content: bytes, fmt: str, records: str | None = None, name: str = "in.dat") -> list[RawRecord]:
    return list(iter_records(io.BytesIO(content), fmt, records, name))  # type: ignore[arg-type]


def _file_error(
    content: bytes, fmt: str, records: str | None = None, name: str = "in.dat"
) -> FileFormatError:
    with pytest.raises(FileFormatError) as caught:
        _records(content, fmt, records, name)
    return caught.value


def _rss() -> int:
    """The process's resident set size in bytes (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# CSV


def test_csv_with_bom_quoted_newline_and_blank_lines_reports_the_line_each_row_starts_on() -> None:
    content = (
        b"\xef\xbb\xbfSKU,STORE,QTY,NOTE\r\n"
        b"A-1,S001,2,plain\r\n"
        b'A-2,S001,1,"two\r\nlines"\r\n'
        b"\r\n"
        b"  A-3 , S002 , 5 ,\r\n"
    )
    records = _records(content, "csv", "rows", "pos-001.csv")

    assert [(r.number, r.line) for r in records] == [(1, 2), (2, 3), (3, 6)]
    assert records[0].data == {"SKU": "A-1", "STORE": "S001", "QTY": "2", "NOTE": "plain"}
    assert records[1].data["NOTE"] == "two\r\nlines"
    assert records[2].data == {"SKU": "A-3", "STORE": "S002", "QTY": "5", "NOTE": ""}
    assert all(r.error is None for r in records)


def test_a_row_with_the_wrong_field_count_is_a_record_error_and_the_file_goes_on() -> None:
    content = b"SKU,STORE,QTY,SOLD_AT\nA,S1,1,2026-11-24\nB,S1,2,2026-11-24,extra\nC,S2,3,2026-11-24\n"
    records = _records(content, "csv")

    assert [r.number for r in records] == [1, 2, 3]
    bad = records[1]
    assert bad.error == "row has 5 fields; header has 4"
    assert bad.line == 3
    assert bad.data == "B,S1,2,2026-11-24,extra\n"
    assert records[2].data["SKU"] == "C" and records[2].error is None


def test_a_repeated_header_column_is_a_file_error_naming_file_and_line() -> None:
    error = _file_error(b"SKU,QTY,SKU\nA,1,A\n", "csv", name="pos-001.csv")
    assert str(error) == "pos-001.csv:1: CSV header repeats column 'SKU'"
    assert (error.name, error.line, error.column) == ("pos-001.csv", 1, None)


def test_an_empty_header_column_or_no_header_at_all_is_a_file_error() -> None:
    assert str(_file_error(b"SKU,,QTY\n", "csv", name="a.csv")) == "a.csv:1: CSV header column 2 is empty"
    assert "no header row" in str(_file_error(b"\n\n", "csv", name="b.csv"))


def test_invalid_utf8_is_a_file_error_naming_the_line() -> None:
    error = _file_error(b"SKU,QTY\nA,1\nB\xff,2\n", "csv", name="pos.csv")
    assert error.line == 3
    assert str(error).startswith("pos.csv:3: invalid utf-8 byte 0xff")


def test_a_quote_that_never_closes_is_a_file_error_at_the_row_it_opened() -> None:
    error = _file_error(b'SKU,QTY\nA,1\nB,"2\nC,3\n', "csv")
    assert error.line == 3
    assert "never closed" in error.reason


def test_a_semicolon_delimited_latin1_export_can_be_read() -> None:
    stream = io.BytesIO("SKU;NAME\nA;Caf\xe9\n".encode("latin-1"))
    records = list(iter_records(stream, "csv", None, "x.csv", csv_delimiter=";", encoding="latin-1"))
    assert records[0].data == {"SKU": "A", "NAME": "Caf\xe9"}


def test_check_file_counts_records_including_bad_ones_and_refuses_broken_files(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_bytes(b"SKU,QTY\nA,1\nB,2,3\nC,3\n")
    assert check_file(good, "csv", "rows") == 3

    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"SKU,SKU\nA,1\n")
    with pytest.raises(FileFormatError, match=r"broken\.csv:1"):
        check_file(broken, "csv", "rows")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set size from /proc")
def test_a_large_csv_streams_in_flat_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    block = "".join(
        f'SKU-{n:08d},STORE-0042,"Blue widget, large",12.50,2026-11-24 10:15:00\n' for n in range(10_000)
    )
    with path.open("w", encoding="utf-8") as handle:
        handle.write("SKU,STORE,NAME,QTY,SOLD_AT\n")
        for _ in range(50_000_000 // len(block)):
            handle.write(block)
    started = time.monotonic()
    baseline = peak = _rss()
    count = 0
    with path.open("rb") as stream:
        for record in iter_records(stream, "csv", "rows", path.name):
            count += 1
            if count % 20_000 == 0:
                peak = max(peak, _rss())
                assert record.error is None
    assert count == (50_000_000 // len(block)) * 10_000
    assert peak - baseline < 30 * 1024 * 1024
    assert time.monotonic() - started < 10


# XML

ASN = b"""<?xml version="1.0" encoding="UTF-8"?>
<ASN xmlns="urn:example:asn">
  <Header><Number>ASN-77</Number></Header>
  <Lines>
    <Line no="1"><Sku>A-1</Sku><Qty>10</Qty></Line>
    <Line no="2">
      <Sku>A-2</Sku><Qty>4.5</Qty>
    </Line>
  </Lines>
</ASN>
"""


@pytest.mark.parametrize("path", ["/ASN/Lines/Line", "//Line", "Lines/Line", "//Lines/Line", "/ASN//Line"])
def test_xml_records_stream_by_element_path_with_their_start_lines(path: str) -> None:
    records = _records(ASN, "xml", path, "asn.xml")

    assert [(r.number, r.line) for r in records] == [(1, 5), (2, 6)]
    assert "<Sku>A-1</Sku>" in records[0].data
    assert records[1].data.startswith("<Line")
    assert records[1].data.rstrip().endswith("</Line>")


def test_an_xml_path_that_selects_nothing_yields_no_records() -> None:
    assert _records(ASN, "xml", "/ASN/Line") == []


@pytest.mark.parametrize("path", ["//Line[@no='1']", "/ASN/Lines/Line/text()", "Line | Other", "//", "a///b"])
def test_xpath_outside_the_streaming_subset_is_refused_up_front(path: str) -> None:
    with pytest.raises(ValueError, match="streaming XPath subset"):
        iter_records(io.BytesIO(ASN), "xml", path, "asn.xml")
    with pytest.raises(ValueError, match="streaming XPath subset"):
        check_records_path("xml", path)


def test_an_external_entity_is_not_resolved(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE", encoding="utf-8")
    document = (
        f'<?xml version="1.0"?>\n<!DOCTYPE ASN [<!ENTITY xxe SYSTEM "{secret.as_uri()}">]>\n'
        "<ASN><Line><Sku>&xxe;</Sku></Line><Line><Sku>B</Sku></Line></ASN>\n"
    ).encode()
    records = _records(document, "xml", "//Line", "asn.xml")

    assert all("TOP-SECRET-VALUE" not in r.data for r in records)
    assert records[0].error is not None and "&xxe;" in records[0].error
    assert records[1].error is None


def test_xml_syntax_error_is_a_file_error_with_line_and_column() -> None:
    content = b"<ASN>\n  <Line><Sku>A</Sku></Line>\n  <Line><Sku>B</Line>\n</ASN>\n"
    error = _file_error(content, "xml", "//Line", "asn.xml")

    assert error.line == 3
    assert error.column is not None
    assert str(error).startswith(f"asn.xml:3:{error.column}: XML syntax error: ")
    assert "mismatch" in error.reason


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set size from /proc")
def test_a_large_xml_file_streams_in_flat_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.xml"
    block = b"".join(
        b"<Line no='%d'><Sku>S%d</Sku><Qty>1.5</Qty><Note>%s</Note></Line>\n" % (n, n, b"x" * 60)
        for n in range(10_000)
    )
    repeats = 20_000_000 // len(block)
    with path.open("wb") as handle:
        handle.write(b"<ASN><Header/><Lines>\n")
        for _ in range(repeats):
            handle.write(block)
        handle.write(b"</Lines></ASN>\n")

    baseline = peak = _rss()
    count = 0
    with path.open("rb") as stream:
        for _record in iter_records(stream, "xml", "/ASN/Lines/Line", path.name):
            count += 1
            if count % 20_000 == 0:
                peak = max(peak, _rss())
    assert count == repeats * 10_000
    assert peak - baseline < 30 * 1024 * 1024


# JSON and JSONL


def test_json_records_at_a_dotted_path_stream_with_decimal_numbers() -> None:
    content = b'{"meta": {"page": 1}, "data": {"items": [{"sku": "A", "qty": 1.50}, {"sku": "B", "qty": 2}]}}'
    records = _records(content, "json", "data.items[*]", "page.json")

    assert [r.data for r in records] == [{"sku": "A", "qty": Decimal("1.50")}, {"sku": "B", "qty": 2}]
    assert [(r.number, r.line) for r in records] == [(1, None), (2, None)]
    assert not any(isinstance(r.data["qty"], float) for r in records)


def test_a_top_level_json_array_with_bom_is_the_record_list() -> None:
    records = _records(b'\xef\xbb\xbf[{"sku": "A"}, {"sku": "B", "qty": 0.1}]', "json", None)
    assert [r.data for r in records] == [{"sku": "A"}, {"sku": "B", "qty": Decimal("0.1")}]


def test_a_json_records_path_that_is_not_a_list_is_a_file_error() -> None:
    error = _file_error(b'{"data": {"items": {"sku": "A"}}}', "json", "data.items", "page.json")
    assert str(error) == "page.json: records 'data.items' is an object; expected a list"
    missing = _file_error(b'{"data": {}}', "json", "data.items", "page.json")
    assert str(missing) == "page.json: records 'data.items' is not in the document; expected a list"


def test_a_general_jmespath_loads_the_document_and_filters_records() -> None:
    content = b'{"items": [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 5.5}, {"sku": "C", "qty": 9}]}'
    records = _records(content, "json", "items[?qty > `2`]")
    assert [r.data["sku"] for r in records] == ["B", "C"]
    assert records[0].data["qty"] == Decimal("5.5")


def test_json_syntax_errors_are_file_errors() -> None:
    assert "JSON syntax error" in str(_file_error(b'{"items": [1, 2}', "json", "items", "p.json"))
    loaded = _file_error(b'{"items": [1,\n 2}', "json", "items[?@ > `1`]", "p.json")
    assert (loaded.line, loaded.column) == (2, 3)


def test_a_bad_jsonl_line_is_a_record_error_and_the_rest_still_arrive() -> None:
    content = (
        b'{"sku": "A", "qty": 1.25}\n\n{"sku": "B", qty: 2}\n[1, 2]\n{"sku": "C", "qty": NaN}\n{"sku": "D"}\n'
    )
    records = _records(content, "jsonl", None, "feed.jsonl")

    assert [(r.number, r.line) for r in records] == [(1, 1), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert records[0].data == {"sku": "A", "qty": Decimal("1.25")}
    assert records[1].error is not None and records[1].error.startswith("line is not valid JSON")
    assert records[1].data == '{"sku": "B", qty: 2}'
    assert records[2].error == "line is a JSON array; expected an object"
    assert records[3].error is not None and "NaN" in records[3].error
    assert records[4].data == {"sku": "D"} and records[4].error is None


def test_unknown_formats_and_bad_record_paths_are_refused_before_reading() -> None:
    with pytest.raises(ValueError, match="unknown format 'yaml'"):
        iter_records(io.BytesIO(b""), "yaml", None, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a valid JMESPath"):
        check_records_path("json", "items[")
    with pytest.raises(ValueError, match="records for csv"):
        check_records_path("csv", "//Line")


# Found by the property tests in tests/property (hostile input must never crash, hang or kill the router).


def test_a_lone_surrogate_is_a_record_error_whose_payload_can_be_stored_as_utf8() -> None:
    jsonl = _records(b'{"sku": "\\ud800"}\n{"sku": "B"}\n', "jsonl", None, "feed.jsonl")
    streamed = _records(b'{"items": [{"sku": "a\\udfff"}, {"sku": "B"}]}', "json", "items", "p.json")
    loaded = _records(b'[{"sku": "\\ud800"}, {"sku": "B"}]', "json", "[?sku]", "p.json")

    for bad, good in (jsonl, streamed, loaded):
        assert bad.error is not None and "lone UTF-16 surrogate" in bad.error
        json.dumps(bad.data, ensure_ascii=False, default=str).encode("utf-8")
        assert good.error is None and good.data == {"sku": "B"}
    assert jsonl[0].data == '{"sku": "\\ud800"}'
    assert streamed[0].data == {"sku": "a\\udfff"}, "the C backend turned the surrogate into '?'"


def test_json_nested_deeper_than_the_limit_is_refused_without_recursing() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    records = _records(deep + b'\n{"sku": "B"}\n', "jsonl", None, "feed.jsonl")
    assert records[0].error == f"line nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"
    assert records[1].data == {"sku": "B"}
    deepest, too_deep = (
        (b'{"a":' * n + b"1" + b"}" * n + b"\n") for n in (MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1)
    )
    assert _records(deepest, "jsonl")[0].error is None
    assert _records(too_deep, "jsonl")[0].error is not None

    started = time.monotonic()
    streamed = _file_error(b'{"items": [{"a": ' + deep + b"}]}", "json", "items", "p.json")
    assert time.monotonic() - started < 5, "ijson spells out the path of every level: quadratic"
    assert "deeper than" in streamed.reason
    assert "deeper than" in _file_error(b"[" + deep + b"]", "json", "[?@]", "p.json").reason


def test_an_integer_of_more_than_4300_digits_refuses_the_json_file_instead_of_crashing() -> None:
    # ijson's C backend dies with a segmentation fault here.
    error = _file_error(b'{"items": [' + b"1" * 5000 + b"]}", "json", "items", "p.json")
    assert error.reason.startswith("JSON syntax error") and len(error.reason) <= MAX_REASON_CHARS
    assert _records(b'{"qty": ' + b"1" * 5000 + b"}\n", "jsonl")[0].error is not None


def test_an_undefined_entity_is_rejected_with_its_name_line_and_column() -> None:
    error = _file_error(b'<ASN>\n<Line ref="&lol9;"><Sku>A</Sku></Line>\n</ASN>', "xml", "//Line", "asn.xml")

    assert (error.line, error.column) == (2, 18)
    assert error.reason == "XML syntax error: Entity 'lol9' not defined"


def test_a_long_reason_is_cut_in_the_middle() -> None:
    reason = "field 'sku': '" + "x" * 10_000 + "' is not a decimal"
    cut = FileFormatError("f.csv", 2, None, reason).reason

    assert len(cut) == MAX_REASON_CHARS
    assert cut.startswith("field 'sku': 'xxx") and cut.endswith("' is not a decimal")
    assert "characters cut" in cut
