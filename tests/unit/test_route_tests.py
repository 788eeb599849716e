"""`router test`: a route's mapping run on fixtures, compared with the expected canonical events."""

from __future__ import annotations

import textwrap
from pathlib import Path

from click.testing import CliRunner

from router.cli import main

CONFIG = """\
version: 1
lookups:
  stores: {file: stores.csv, key: code, value: gln}
targets:
  erp: {type: http, url: "http://127.0.0.1:9/m"}
routes:
  - name: eu-pos
    source: {type: file, path: inbox}
    format: csv
    csv: {delimiter: ";", encoding: cp1252}
    map:
      type: sale
      sku: {column: ARTIKEL}
      location: {column: FILIALE, lookup: stores}
      quantity: {column: MENGE, as: decimal}
      occurred_at: {column: ZEIT, as: datetime, format: "%d.%m.%Y %H:%M", tz: Europe/Berlin}
    deliver: [erp]
"""

TESTS = """\
route: eu-pos
cases:
  - name: a semicolon export in Windows-1252 with day-first times
    input:
      content: |
        ARTIKEL;FILIALE;MENGE;ZEIT
        CRÈME-50ML;F01;2;24.11.2026 09:15
    expect:
      - {sku: CRÈME-50ML, location: "0614141000012", quantity: 2, occurred_at: "2026-11-24T09:15:00+01:00"}
  - name: a wrong expectation is reported field by field
    input:
      content: |
        ARTIKEL;FILIALE;MENGE;ZEIT
        A;F01;3;24.11.2026 10:00
        B;F99;1;24.11.2026 10:05
    expect:
      - {sku: A, quantity: 4}
    expect_deadletters: 0
"""


def test_route_tests_pass_and_fail_with_a_readable_diff(tmp_path: Path) -> None:
    (tmp_path / "stores.csv").write_text("code,gln\nF01,0614141000012\n", encoding="utf-8")
    (tmp_path / "routes.yaml").write_text(CONFIG, encoding="utf-8")
    cases = tmp_path / "tests" / "routes"
    cases.mkdir(parents=True)
    (cases / "eu-pos.yaml").write_text(textwrap.dedent(TESTS), encoding="utf-8")

    result = CliRunner().invoke(main, ["test", "-c", str(tmp_path / "routes.yaml")])

    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("PASS") and "Windows-1252" in line for line in lines), result.output
    assert "event 1: quantity: expected 4, got '3'" in result.output
    assert "expected 0 dead letter(s), got 1" in result.output and "F99" in result.output
    assert lines[-1] == "1 passed, 1 failed"


def test_the_shipped_route_tests_pass_on_the_shipped_configuration() -> None:
    """tests/routes/ covers the sample routes: CSV, a header+lines ASN in XML and a fixed-width export."""
    repo = Path(__file__).resolve().parents[2]
    result = CliRunner().invoke(main, ["test", "--config", str(repo / "routes.yaml")])
    assert result.exit_code == 0, result.output
    for route in ("pos-sales", "supplier-asn", "legacy-pos"):
        assert f"routes/{route}.yaml" in result.output, result.output
