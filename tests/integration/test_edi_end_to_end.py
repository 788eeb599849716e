"""An X12 856 file through the real `router run` on RabbitMQ into canonical asn events at a target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.simulated import SimulatedTarget
from state import Store
from tests.integration.harness import RouterProcess, wait_until, write_config

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]

SAMPLE = Path(__file__).parents[1] / "routes" / "edi" / "asn-856.x12"

X12_ROUTE = {
    "name": "supplier-asn-x12",
    "source": {
        "type": "file",
        "path": "inbox",
        "pattern": "*.x12",
        "stable_for": "0s",
        "poll": "100ms",
        "archive": "archive",
        "errors": "errors",
    },
    "format": "x12",
    "records": "HL:I",
    "map": {
        "type": "asn",
        "asn_id": {"path": "header.BSN[0].e2"},
        "po_id": {"path": "order.PRF[0].e1"},
        "line": {"path": "LIN[0].e1", "as": "int"},
        "gtin": {"path": "LIN[0].e3"},
        "location": {"path": "shipment.N1[?e1=='ST'] | [0].e4"},
        "supplier": {"path": "envelope.sender"},
        "quantity": {"path": "SN1[0].e2", "as": "decimal"},
        "occurred_at": {
            "path": "join('', [header.BSN[0].e3, header.BSN[0].e4])",
            "as": "datetime",
            "format": "%Y%m%d%H%M",
            "tz": "America/New_York",
        },
    },
    "sequence_key": ["gtin", "location"],
    "deliver": ["wms"],
}


def test_an_856_becomes_asn_events_a_resend_deduplicates_and_a_bad_envelope_is_rejected(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    with SimulatedTarget("wms") as wms:
        config = write_config(
            tmp_path, broker_url=rabbitmq_url, prefix=rabbitmq_namespace, targets={"wms": wms.url}
        )
        document = json.loads(config.read_text(encoding="utf-8"))
        document["routes"] = [X12_ROUTE]
        config.write_text(json.dumps(document), encoding="utf-8")
        sample = SAMPLE.read_bytes()
        (tmp_path / "inbox" / "asn-0001.x12").write_bytes(sample)
        (tmp_path / "inbox" / "broken.x12").write_bytes(
            sample.replace(b"IEA*1*000004711", b"IEA*1*000004799")
        )
        with RouterProcess(config) as router:
            wait_until(lambda: len(wms.events) >= 3, 60, "the 856's three item lines at the WMS")
            wait_until(lambda: (tmp_path / "errors" / "broken.x12").exists(), 30, "broken.x12 in errors/")
            # The same interchange again under another name: same event ids, so nothing new is sent.
            (tmp_path / "inbox" / "asn-0001-resent.x12").write_bytes(sample)
            wait_until(
                lambda: (tmp_path / "archive" / "asn-0001-resent.x12").exists(), 30, "the resend archived"
            )
            assert router.terminate() == 0, router.output()

    events = sorted(wms.events, key=lambda event: event["line"])
    assert len(events) == 3 and len({event["event_id"] for event in events}) == 3
    first = events[0]
    assert first["type"] == "asn" and first["asn_id"] == "ASN-77310" and first["po_id"] == "PO-90017"
    assert first["gtin"] == "00012345678905" and first["location"] == "0614141000036"
    assert first["quantity"] == "24" and first["supplier"] == "ZZ:ACMESUPPLY"
    assert first["occurred_at"] == "2026-11-30T09:15:00-05:00"
    assert first["source"] == {
        "route": "supplier-asn-x12",
        "system": "file",
        "message_id": first["source"]["message_id"],
        "record": 1,
        "file": "asn-0001.x12",
        "segment": 17,
    }
    assert [event["quantity"] for event in events] == ["24", "12", "6"]
    reason = (tmp_path / "errors" / "broken.x12.reason.txt").read_text(encoding="utf-8")
    assert "broken.x12: segment 32 (IEA): IEA02 '000004799' does not match segment 1 (ISA)'s ISA13" in reason
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        letters = store.list_dead_letters()
    finally:
        store.close()
    assert [letter.stage for letter in letters] == ["ingress"] and "segment 32 (IEA)" in letters[0].detail
