"""Fixed-width exports: layouts, record types, header context, trailer counts and layout validation."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

import pytest

from router.config import ConfigError, load_config
from transforms.fixed_width import FixedLayout, LayoutError, compile_layout
from transforms.mapping import compile_mapping
from transforms.parsers import FileFormatError, RawRecord, iter_records

LAYOUT: dict[str, Any] = {
    "type": [1, 1],
    "record_types": {
        "H": {"role": "header", "fields": {"STORE": [2, 4], "DAY": [6, 8], "REGISTER": [14, 4]}},
        "D": {"fields": {"GTIN": [2, 14], "QTY": [16, 7], "SOLD_AT": [23, 14], "TXN": [37, 10]}},
        "T": {"role": "trailer", "count": "COUNT", "fields": {"COUNT": [2, 6]}},
    },
}

EXPORT = (
    "HS00120261124R002\r\n"
    "D04012345000016000000220261124091502T000104   \r\n"
    "\r\n"
    "D04012345000023000000120261124091733T000105\r\n"  # trailing blanks trimmed by the exporter
    "T000002\r\n"
    "HS00220261124R001\r\n"
    "D04012345000030000000420261124101010T000900   \r\n"
    "T000001\r\n"
)


def _records(content: str, layout: dict[str, Any] = LAYOUT) -> list[RawRecord]:
    fixed = compile_layout(layout)
    stream = io.BytesIO(content.encode(fixed.encoding))
    return list(iter_records(stream, "fixed", None, "eod.txt", fixed=fixed))


def test_detail_lines_are_records_with_the_fields_of_their_header() -> None:
    records = _records(EXPORT)
    assert [(r.number, r.line, r.error) for r in records] == [(1, 2, None), (2, 4, None), (3, 7, None)]
    assert records[0].data == {
        "GTIN": "04012345000016",
        "QTY": "0000002",
        "SOLD_AT": "20261124091502",
        "TXN": "T000104",
    }
    assert records[1].data["TXN"] == "T000105"
    assert records[0].document == {"STORE": "S001", "DAY": "20261124", "REGISTER": "R002"}
    assert records[0].document is records[1].document
    assert records[2].document["STORE"] == "S002", "a new header starts a new document"

    mapping = compile_mapping(
        {
            "type": "sale",
            "gtin": {"column": "GTIN"},
            "location": {"column": "STORE", "from": "document"},
            "quantity": {"column": "QTY", "as": "decimal"},
            "occurred_at": {"column": "SOLD_AT", "as": "datetime", "format": "%Y%m%d%H%M%S", "tz": "UTC"},
        },
        "fixed",
        {},
    )
    first = mapping.apply(records[0])
    assert first["location"] == "S001" and str(first["quantity"]) == "2"


def test_a_file_of_one_record_type_needs_no_type_code() -> None:
    records = _records("SKU-1    0003\nSKU-22   0010\n", {"fields": {"SKU": [1, 9], "QTY": [10, 4]}})
    assert [r.data for r in records] == [{"SKU": "SKU-1", "QTY": "0003"}, {"SKU": "SKU-22", "QTY": "0010"}]
    assert records[0].document is None


def test_an_unknown_record_type_is_a_dead_letter_and_the_other_lines_go_on() -> None:
    content = EXPORT.replace("D04012345000023", "X04012345000023")
    records = _records(content)
    assert records[0].error is None and records[2].error is None
    assert records[1].line == 4
    assert records[1].error == "column 1: record type 'X' is not in the layout (it has D, H, T)"
    assert records[1].data.startswith("X0401"), "the raw line is kept for the dead letter"


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        (EXPORT.replace("T000002", "T000003"), 5, "trailer 'T' counts 3 record(s) but 2 were read"),
        (EXPORT.rsplit("T000001", 1)[0], 7, "1 record(s) after the last trailer; the file may be cut short"),
        (EXPORT.replace("T000002", "T00000x"), 5, "count must be digits, not '00000x'"),
    ],
)
def test_a_trailer_that_does_not_match_refuses_the_whole_file_naming_its_line(
    content: str, line: int, reason: str
) -> None:
    with pytest.raises(FileFormatError) as caught:
        _records(content)
    assert caught.value.line == line and reason in caught.value.reason, str(caught.value)
    assert str(caught.value).startswith(f"eod.txt:{line}: ")


@pytest.mark.parametrize(
    ("layout", "where", "reason"),
    [
        ({"fields": {"A": [1, 5], "B": [5, 2]}}, ("fields", "B"), "columns 5-6 overlap A (columns 1-5)"),
        ({"fields": {"A": [0, 5]}}, ("fields", "A"), "1-based start column"),
        ({"type": [1, 1], "fields": {"A": [1, 1]}}, ("type",), "type applies only with record_types"),
        ({"record_types": {"D": {"fields": {"A": [2, 1]}}}}, ("type",), "record_types need type"),
        ({"type": [1, 2], "record_types": {"D": {"fields": {"A": [3, 1]}}}}, ("record_types", "D"), "has 1"),
        ({"type": [1, 1], "record_types": {"H": {"role": "header"}}}, ("record_types",), "no record type"),
        (
            {"type": [1, 1], "record_types": {"D": {"fields": {"A": [2, 1]}, "count": "A"}}},
            ("record_types", "D", "count"),
            "count applies to a trailer",
        ),
        (
            {
                "type": [1, 1],
                "record_types": {"D": {"fields": {"A": [2, 1]}}, "T": {"role": "trailer", "count": "N"}},
            },
            ("record_types", "T", "count"),
            "count names 'N'",
        ),
        ({"encoding": "klingon", "fields": {"A": [1, 1]}}, ("encoding",), "unknown encoding"),
    ],
)
def test_layout_problems_name_the_key(layout: dict[str, Any], where: tuple[str, ...], reason: str) -> None:
    with pytest.raises(LayoutError) as caught:
        compile_layout(layout)
    assert caught.value.where == where and reason in caught.value.reason, str(caught.value)


ROUTE = """\
version: 1
broker: {url: "memory://"}
targets:
  erp: {type: http, url: "http://127.0.0.1:9/movements"}
routes:
  - name: eod
    source: {type: file, path: inbox, pattern: "*.txt"}
    format: fixed
    fixed:
      type: [1, 1]
      record_types:
        H: {role: header, fields: {STORE: [2, 4]}}
        D:
          fields:
            GTIN: [2, 14]
            QTY: [15, 7]
        T: {role: trailer, count: COUNT, fields: {COUNT: [2, 6]}}
    map:
      type: sale
      gtin: {column: GTIN}
      location: {column: STORE, from: document}
      quantity: {column: QTY, as: decimal}
      occurred_at: "2026-11-24T00:00:00Z"
    deliver: [erp]
"""


def _problems(folder: Path, text: str) -> list[str]:
    path = folder / "routes.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    return [str(problem) for problem in caught.value.problems]


def test_validate_points_at_the_overlapping_field_with_file_line_and_column(tmp_path: Path) -> None:
    [problem] = _problems(tmp_path, ROUTE)
    assert "routes.yaml:16:18:" in problem and "columns 15-21 overlap GTIN (columns 2-15)" in problem, problem

    fixed = ROUTE.replace("QTY: [15, 7]", "QTY: [16, 7]")
    (tmp_path / "routes.yaml").write_text(fixed, encoding="utf-8")
    config = load_config(tmp_path / "routes.yaml", {})
    assert config.routes[0].fixed is not None

    problems = _problems(tmp_path, fixed.replace("role: header", "role: heading"))
    assert any(":12:" in p and "role" in p for p in problems), problems
    problems = _problems(tmp_path, fixed.replace("    format: fixed\n", "    format: csv\n"))
    assert any("fixed: applies to format: fixed, not format: csv" in p for p in problems), problems
    without = fixed.split("    fixed:\n")[0] + "    map:" + fixed.split("    map:")[1]
    problems = _problems(tmp_path, without)
    assert any(":8:" in p and "format: fixed needs a fixed: block" in p for p in problems), problems


def test_fixed_layout_is_a_plain_value() -> None:
    assert isinstance(compile_layout({"fields": {"A": [1, 2]}}), FixedLayout)


def test_from_document_where_the_route_has_no_document_is_refused_at_validate(tmp_path: Path) -> None:
    fixed = ROUTE.replace("QTY: [15, 7]", "QTY: [16, 7]")
    no_header = fixed.replace("        H: {role: header, fields: {STORE: [2, 4]}}\n", "")
    [problem] = _problems(tmp_path, no_header)
    assert (
        "routes.yaml:20:" in problem and "field 'location': from: document would always be empty" in problem
    )
    assert "no role: header" in problem

    csv = no_header.split("    fixed:\n")[0].replace("format: fixed", "format: csv") + (
        "    map:" + fixed.split("    map:")[1].replace("GTIN}", "SKU}")
    )
    [problem] = _problems(tmp_path, csv)
    assert "field 'location'" in problem and "its csv.preamble, and it has none" in problem, problem
    (tmp_path / "routes.yaml").write_text(
        csv.replace("    format: csv\n", "    format: csv\n    csv: {preamble: 1}\n"), encoding="utf-8"
    )
    assert load_config(tmp_path / "routes.yaml", {}).routes[0].csv is not None


def test_a_copybook_like_list_lays_fields_end_to_end_with_filler(tmp_path: Path) -> None:
    layout = {"fields": [{"SKU": 9}, {"FILLER": 2}, {"QTY": 4}]}
    records = _records("SKU-1    --0003\nSKU-22   --0010\n", layout)
    assert [r.data for r in records] == [{"SKU": "SKU-1", "QTY": "0003"}, {"SKU": "SKU-22", "QTY": "0010"}]
    with pytest.raises(LayoutError) as caught:
        compile_layout({"fields": [{"SKU": 9}, {"QTY": 0}]})
    assert caught.value.where == ("fields", 1) and "width of at least 1" in caught.value.reason

    copybook = ROUTE.replace(
        "          fields:\n            GTIN: [2, 14]\n            QTY: [15, 7]\n",
        "          fields:\n            - {TYPE: 1}\n            - {GTIN: 14}\n            - {QTY: 7}\n"
        "            - {GTIN: 2}\n",
    )
    [problem] = _problems(tmp_path, copybook)
    assert "routes.yaml:18:" in problem and "'GTIN' is laid out twice" in problem, problem
    (tmp_path / "routes.yaml").write_text(copybook.replace("            - {GTIN: 2}\n", ""), encoding="utf-8")
    route = load_config(tmp_path / "routes.yaml", {}).routes[0]
    assert route.fixed is not None
    [detail] = [kind for kind in compile_layout(route.fixed.layout()).types if kind.code == "D"]
    assert [(f.name, f.start, f.width) for f in detail.fields] == [
        ("TYPE", 1, 1),
        ("GTIN", 2, 14),
        ("QTY", 16, 7),
    ]
