"""Partner-facing routes through the real `router run`, the real RabbitMQ and loopback HTTP servers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.signatures import sign
from router.simulated import SimulatedTarget
from state import Store
from tests.integration.harness import RouterProcess, wait_until

pytestmark = pytest.mark.slow

COUNTED_AT = "2026-11-24T06:00:00+01:00"
SECRET = "whsec_cGFydG5lci1zdG9jay1zZWNyZXQtMTIzNDU2"
STOCK_CONTRACT = {
    "type": "object",
    "required": ["events"],
    "properties": {
        "events": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["sku", "warehouse", "on_hand", "counted_at"],
                "properties": {"on_hand": {"type": "number", "minimum": 0}},
            },
        }
    },
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config(folder: Path, broker: tuple[str, str], route: dict[str, Any], targets: dict[str, str]) -> Path:
    url, prefix = broker
    config = {
        "version": 1,
        "broker": {"url": url, "prefix": prefix},
        "store": {"url": f"sqlite:///{folder / 'state.db'}"},
        "http": {"listen": f"127.0.0.1:{_free_port()}"},
        "targets": {
            name: {
                "type": "http",
                "url": f"{base}/stock",
                "partitions": 2,
                "timeout": "5s",
                "retry": {"attempts": 20, "initial": "50ms", "max": "500ms", "max_age": "2m"},
            }
            for name, base in targets.items()
        },
        "routes": [route],
    }
    path = folder / "routes.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def _listen(config: Path) -> str:
    return "http://" + json.loads(config.read_text(encoding="utf-8"))["http"]["listen"]


@pytest.fixture
def broker(rabbitmq_url: str, rabbitmq_namespace: str) -> tuple[str, str]:
    return rabbitmq_url, rabbitmq_namespace


def _signed(webhook_id: str, body: bytes, *, secret: str = SECRET, age: int = 0) -> dict[str, str]:
    timestamp = str(int(time.time()) - age)
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": sign(secret, webhook_id, timestamp, body),
    }


def test_signed_webhook_reaches_the_target_once_and_every_rejection_is_precise(
    tmp_path: Path, broker: tuple[str, str]
) -> None:
    (tmp_path / "contract.json").write_text(json.dumps(STOCK_CONTRACT), encoding="utf-8")
    route = {
        "name": "threepl-stock",
        "source": {"type": "webhook", "secret": SECRET, "schema": "contract.json", "max_body": "4KiB"},
        "format": "json",
        "records": "events",
        "map": {
            "type": "stock.snapshot",
            "sku": {"path": "sku"},
            "location": {"path": "warehouse"},
            "quantity": {"path": "on_hand", "as": "decimal"},
            "occurred_at": {"path": "counted_at", "as": "datetime"},
        },
        "deliver": ["wms"],
    }
    payload = {
        "events": [
            {
                "sku": f"SKU-{n}",
                "warehouse": "DC1",
                "on_hand": 10.5 + n,
                "counted_at": "2026-11-24T06:00:00+01:00",
            }
            for n in range(3)
        ]
    }
    body = json.dumps(payload).encode()
    with SimulatedTarget("wms") as wms:
        config = _config(tmp_path, broker, route, {"wms": wms.url})
        base = _listen(config)
        with RouterProcess(config) as router, httpx.Client(base_url=base, timeout=10) as client:
            wait_until(lambda: _ready(client), 60, "the router's /readyz")
            accepted = client.post("/webhooks/threepl-stock", content=body, headers=_signed("msg_1", body))
            assert accepted.status_code == 202, accepted.text
            assert accepted.json()["message_id"] == "webhook:threepl-stock:msg_1"
            wait_until(lambda: len(wms.events) >= 3, 30, "3 snapshots at the WMS")

            again = client.post("/webhooks/threepl-stock", content=body, headers=_signed("msg_1", body))
            assert again.status_code == 200 and again.json()["duplicate"] is True

            forged = client.post(
                "/webhooks/threepl-stock",
                content=body,
                headers=_signed("msg_2", body, secret=SECRET[:-4] + "AAA="),
            )
            stale = client.post(
                "/webhooks/threepl-stock", content=body, headers=_signed("msg_3", body, age=3600)
            )
            broken = json.dumps({"events": [{"sku": "X"}]}).encode()
            invalid = client.post("/webhooks/threepl-stock", content=broken, headers=_signed("msg_4", broken))
            unknown = client.post("/webhooks/nobody", content=body, headers=_signed("msg_5", body))
            assert (forged.status_code, stale.status_code, invalid.status_code, unknown.status_code) == (
                401,
                401,
                422,
                404,
            )
            assert invalid.headers["content-type"].startswith("application/problem+json")
            assert "warehouse" in invalid.text and "on_hand" in invalid.text
            spec = client.get("/openapi.json").json()
            assert "/webhooks/threepl-stock" in spec["paths"]
            metrics = client.get("/metrics").text
            assert 'router_messages_received_total{route="threepl-stock"} 1.0' in metrics
            time.sleep(1.0)  # give a wrongly enqueued duplicate the time to show up
            assert router.terminate() == 0, router.output()

    assert len(wms.events) == 3
    first = wms.events[0]
    assert first["type"] == "stock.snapshot" and first["quantity_semantics"] == "absolute"
    assert first["quantity"] == "10.5" and first["occurred_at"] == COUNTED_AT
    assert wms.requests[0].headers["Idempotency-Key"] == first["event_id"]


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


class _OrdersApi:
    """A marketplace order API with cursor pages, on loopback."""

    def __init__(self, pages: dict[str, dict[str, Any]]) -> None:
        self.pages = pages
        self.requests: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests.append(self.path)
                cursor = self.path.partition("after=")[2] or "start"
                body = json.dumps(api.pages[cursor]).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> _OrdersApi:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _order(n: int) -> dict[str, Any]:
    return {"id": f"ORD-{n}", "sku": "SKU-1", "node": "DC1", "qty": n, "at": f"2026-11-24T10:0{n}:00Z"}


@pytest.fixture
def orders_api() -> Iterator[_OrdersApi]:
    pages = {
        "start": {"orders": [_order(1), _order(2)], "next": "p2"},
        "p2": {"orders": [_order(3)], "next": None},
    }
    with _OrdersApi(pages) as api:
        yield api


def test_rest_pages_reach_the_target_and_a_restart_resumes_without_duplicates(
    tmp_path: Path, broker: tuple[str, str], orders_api: _OrdersApi
) -> None:
    route = {
        "name": "marketplace-orders",
        "source": {
            "type": "rest",
            "url": f"{orders_api.url}/v1/orders",
            "poll": "200ms",
            "cursor": {"param": "after", "next": "next"},
            "id": "id",
        },
        "format": "json",
        "records": "orders",
        "map": {
            "type": "reservation",
            "status": "created",
            "order_id": {"path": "id"},
            "sku": {"path": "sku"},
            "location": {"path": "node"},
            "quantity": {"path": "qty", "as": "decimal"},
            "occurred_at": {"path": "at", "as": "datetime"},
        },
        "deliver": ["oms"],
    }
    with SimulatedTarget("oms") as oms:
        config = _config(tmp_path, broker, route, {"oms": oms.url})
        with RouterProcess(config) as router:
            wait_until(lambda: len(oms.events) >= 3, 60, "3 reservations at the OMS")
            assert router.terminate() == 0, router.output()
        orders_api.pages["p2"]["orders"].append(_order(4))
        with RouterProcess(config) as router:
            wait_until(lambda: len(oms.events) >= 4, 60, "the 4th reservation after the restart")
            time.sleep(1.0)  # a few more polls of the unchanged last page
            assert router.terminate() == 0, router.output()

    assert [event["order_id"] for event in oms.events] == ["ORD-1", "ORD-2", "ORD-3", "ORD-4"]
    assert len({event["event_id"] for event in oms.events}) == 4
    # Only the very first request starts from the beginning; every later one, also after the restart,
    # resumes at the stored cursor.
    assert "after=" not in orders_api.requests[0]
    assert all("after=p2" in path for path in orders_api.requests[1:]), orders_api.requests


ASN_XML = """<?xml version="1.0" encoding="UTF-8"?>
<DespatchAdvice number="ASN-77">
  <Line><AsnNumber>ASN-77</AsnNumber><Gtin>4006381333931</Gtin><ShipTo>DC1</ShipTo>
    <Quantity unit="CS">12</Quantity><DespatchedAt>2026-11-23T17:00:00+01:00</DespatchedAt></Line>
  <Line><AsnNumber>ASN-77</AsnNumber><Gtin>4006381333932</Gtin><ShipTo>DC1</ShipTo>
    <Quantity>3</Quantity><DespatchedAt>2026-11-23T17:00:00+01:00</DespatchedAt></Line>
  <Line><AsnNumber>ASN-77</AsnNumber><Gtin>9780201379624</Gtin><ShipTo>DC1</ShipTo>
    <Quantity>5</Quantity><DespatchedAt>2026-11-23T17:00:00+01:00</DespatchedAt></Line>
</DespatchAdvice>
"""


def test_supplier_asn_over_sftp_reaches_the_wms_and_is_archived_on_the_server(
    tmp_path: Path, broker: tuple[str, str]
) -> None:
    from tests.sftp_server import running_sftp_server

    outbound = tmp_path / "supplier" / "outbound"
    outbound.mkdir(parents=True)
    with running_sftp_server(tmp_path / "sshd") as server, SimulatedTarget("wms") as wms:
        route = {
            "name": "supplier-asn",
            "source": {
                "type": "sftp",
                **server.route_login(),
                "remote_dir": str(outbound),
                "pattern": "*.xml",
                "archive": str(outbound / "archive"),
                "poll": "200ms",
                "stable_for": "0s",
            },
            "format": "xml",
            "records": "/DespatchAdvice/Line",
            "map": {
                "type": "asn",
                "asn_id": {"xpath": "AsnNumber"},
                "gtin": {"xpath": "Gtin"},
                "location": {"xpath": "ShipTo"},
                "quantity": {"xpath": "Quantity", "as": "decimal"},
                "uom": {"xpath": "Quantity/@unit", "default": "EA"},
                "occurred_at": {"xpath": "DespatchedAt", "as": "datetime"},
            },
            "sequence_key": ["gtin", "location"],
            "deliver": ["wms"],
        }
        config = _config(tmp_path, broker, route, {"wms": wms.url})
        (outbound / "asn-77.xml").write_text(ASN_XML, encoding="utf-8")
        with RouterProcess(config) as router:
            wait_until(lambda: len(wms.events) >= 2, 60, "the ASN lines at the WMS")
            wait_until(
                lambda: (outbound / "archive" / "asn-77.xml").exists(), 30, "the file archived remotely"
            )
            assert router.terminate() == 0, router.output()

    # The second line's GTIN has a bad check digit: it is dead-lettered and the two good lines flow.
    assert sorted((e["gtin"], e["quantity"], e["uom"]) for e in wms.events) == [
        ("04006381333931", "12", "CS"),
        ("09780201379624", "5", "EA"),
    ]
    with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
        [letter] = store.list_dead_letters(route="supplier-asn")
    assert letter.stage == "transform" and "asn-77.xml" in letter.detail and "gtin" in letter.detail
    assert {e["source"]["file"] for e in wms.events} == {"asn-77.xml"}
    assert not list(outbound.glob("*.xml"))
