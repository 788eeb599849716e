"""Header+lines files through the real `router run` and RabbitMQ: an XML despatch advice whose lines
read their header, and a fixed-width export whose trailer is checked, delivered to loopback HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from router.simulated import SimulatedTarget
from state import Store
from tests.integration.harness import STORES, RouterProcess, wait_until

pytestmark = pytest.mark.slow

GTINS = ["04012345000016", "04012345000023", "04012345000030", "04012345000047", "04012345000054"]


def _despatch_advice(number: str, packages: int, lines_per_package: int, *, bad_line: int) -> str:
    """A DESADV-shaped document: header once, then packages of lines; line ``bad_line`` has no GTIN."""
    parts = [
        f'<DespatchAdvice number="{number}">',
        '  <Supplier gln="4012345000009"/>',
        '  <ShipTo gln="0614141000029"/>',
        '  <Dates shipped="2026-11-24T06:30:00+01:00" expected="2026-11-25T08:00:00-05:00"/>',
    ]
    line = 0
    for package in range(1, packages + 1):
        parts.append(f'  <Package sscc="3401234500000{package:05d}">')
        for _ in range(lines_per_package):
            line += 1
            gtin = "" if line == bad_line else f"<GTIN>{GTINS[line % len(GTINS)]}</GTIN>"
            parts.append(f'    <Line no="{line}">{gtin}<Qty>{line}</Qty></Line>')
        parts.append("  </Package>")
    parts.append(f'  <Summary lines="{line}"/>')
    parts.append("</DespatchAdvice>")
    return "\n".join(parts) + "\n"


def _config(folder: Path, url: str, prefix: str, wms: str) -> Path:
    (folder / "stores.csv").write_text(
        "store_code,gln\n" + "".join(f"{code},{gln}\n" for code, gln in STORES.items()), encoding="utf-8"
    )

    def source(name: str, pattern: str) -> dict[str, Any]:
        for sub in ("inbox", "archive", "errors"):
            (folder / name / sub).mkdir(parents=True, exist_ok=True)
        return {
            "type": "file",
            "path": f"{name}/inbox",
            "pattern": pattern,
            "stable_for": "0s",
            "poll": "100ms",
            "archive": f"{name}/archive",
            "errors": f"{name}/errors",
        }

    config = {
        "version": 1,
        "broker": {"url": url, "prefix": prefix},
        "store": {"url": f"sqlite:///{folder / 'state.db'}"},
        "http": {"listen": "127.0.0.1:0", "enabled": False},
        "lookups": {"stores": {"file": "stores.csv", "key": "store_code", "value": "gln"}},
        "targets": {
            "wms": {
                "type": "http",
                "url": f"{wms}/stock-events",
                "partitions": 2,
                "timeout": "5s",
                "retry": {"attempts": 20, "initial": "50ms", "max": "500ms", "max_age": "2m"},
            }
        },
        "routes": [
            {
                "name": "supplier-asn",
                "source": source("asn", "*.xml"),
                "format": "xml",
                "records": "//Package/Line",
                "chunk_size": 4,  # several chunks, so the header crosses the broker more than once
                "map": {
                    "type": "asn",
                    "asn_id": {"xpath": "ancestor::DespatchAdvice/@number"},
                    "supplier": {"xpath": "/DespatchAdvice/Supplier/@gln"},
                    "location": {"xpath": "/DespatchAdvice/ShipTo/@gln"},
                    "occurred_at": {"xpath": "../../Dates/@shipped", "as": "datetime"},
                    "expected_at": {"xpath": "/DespatchAdvice/Dates/@expected", "as": "datetime"},
                    "correlation_id": {"xpath": "../@sscc"},
                    "line": {"xpath": "@no", "as": "int"},
                    "gtin": {"xpath": "GTIN"},
                    "quantity": {"xpath": "Qty", "as": "decimal"},
                },
                "sequence_key": ["gtin", "location"],
                "deliver": ["wms"],
            },
            {
                "name": "legacy-pos",
                "source": source("eod", "*.txt"),
                "format": "fixed",
                "fixed": {
                    "type": [1, 1],
                    "record_types": {
                        "H": {"role": "header", "fields": {"STORE": [2, 4]}},
                        "D": {"fields": {"GTIN": [2, 14], "QTY": [16, 4]}},
                        "T": {"role": "trailer", "count": "N", "fields": {"N": [2, 4]}},
                    },
                },
                "map": {
                    "type": "sale",
                    "gtin": {"column": "GTIN"},
                    "location": {"column": "STORE", "from": "document", "lookup": "stores"},
                    "quantity": {"column": "QTY", "as": "decimal"},
                    "occurred_at": "2026-11-24T21:00:00-05:00",
                },
                "sequence_key": ["gtin", "location"],
                "deliver": ["wms"],
            },
        ],
    }
    path = folder / "routes.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def test_header_and_lines_files_map_into_canonical_events_through_rabbitmq(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    with SimulatedTarget("wms") as wms:
        config = _config(tmp_path, rabbitmq_url, rabbitmq_namespace, wms.url)
        asn = _despatch_advice("ASN-9001", packages=3, lines_per_package=4, bad_line=6)
        (tmp_path / "asn" / "inbox" / "desadv-9001.xml").write_text(asn, encoding="utf-8")
        eod = "HS003\nD040123450000160002\nD040123450000230005\nT0002\n"
        (tmp_path / "eod" / "inbox" / "eod-ok.txt").write_text(eod, encoding="cp1252")
        (tmp_path / "eod" / "inbox" / "eod-cut.txt").write_text(
            eod.replace("T0002", "T0003"), encoding="cp1252"
        )
        with RouterProcess(config) as router:
            wait_until(lambda: len(wms.events) >= 13, 90, "11 ASN lines and 2 sales at the WMS")
            wait_until(
                lambda: (tmp_path / "eod" / "errors" / "eod-cut.txt").exists(), 30, "the bad file refused"
            )
            assert router.terminate() == 0, router.output()

    lines = sorted((e for e in wms.events if e["type"] == "asn"), key=lambda e: e["line"])
    assert [e["line"] for e in lines] == [n for n in range(1, 13) if n != 6]
    assert {(e["asn_id"], e["location"], e["supplier"]) for e in lines} == {
        ("ASN-9001", "0614141000029", "4012345000009")
    }
    assert {e["occurred_at"] for e in lines} == {"2026-11-24T06:30:00+01:00"}
    assert {e["expected_at"] for e in lines} == {"2026-11-25T08:00:00-05:00"}
    assert [e["correlation_id"][-1] for e in lines] == ["1"] * 4 + ["2"] * 3 + ["3"] * 4
    assert all(e["source"]["file"] == "desadv-9001.xml" for e in lines)

    sales = [e for e in wms.events if e["type"] == "sale"]
    assert sorted((e["gtin"], e["quantity"], e["location"]) for e in sales) == [
        ("04012345000016", "2", "0614141000036"),
        ("04012345000023", "5", "0614141000036"),
    ]
    assert {e["source"]["file"] for e in sales} == {"eod-ok.txt"}, "nothing of the refused file is sent"

    with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
        letters = store.list_dead_letters()
    by_route = {letter.route: letter for letter in letters}
    assert len(letters) == 2, [(letter.route, letter.detail) for letter in letters]
    line = by_route["supplier-asn"]
    assert line.stage == "transform" and "desadv-9001.xml line 13 (record 6)" in line.detail
    assert "gtin" in line.detail
    assert 'sscc="340123450000000002"' in line.source_ref["document"]["xml"], "the header is kept for replay"
    refused = by_route["legacy-pos"]
    assert "eod-cut.txt:4" in refused.detail and "counts 3 record(s) but 2 were read" in refused.detail
