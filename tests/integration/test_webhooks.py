"""Partner webhooks against a real uvicorn server on loopback: acceptance and every rejection status."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import select
import socket
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from connectors.chunks import SourceChunk
from connectors.signatures import sign
from connectors.webhooks.intake import WebhookIntake
from connectors.webhooks.routes import LISTENER_ROUTE, webhook_routes
from connectors.webhooks.settings import WebhookSettings
from ops.metrics import REGISTRY
from router.config import HttpConfig
from router.http_server import HttpListener
from router.ingress import chunk_message
from router.messages import encode_body
from state import AcceptedWebhook

SECRET = "whsec_c3RvY2stZXZlbnRzLXNlY3JldC0xMjM0NQ=="
STOCK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["events"],
    "properties": {
        "events": {
            "type": "array",
            "items": {"$ref": "#/$defs/stock_event"},
        }
    },
    "$defs": {
        "stock_event": {
            "type": "object",
            "required": ["sku", "store", "qty"],
            "properties": {
                "sku": {"type": "string", "minLength": 1},
                "store": {"type": "string"},
                "qty": {"type": "number", "minimum": 0},
            },
        }
    },
}


@dataclass
class RecordingSink:
    """Stands in for the broker: serialises and keeps chunks as the broker would, or fails while ``down``."""

    chunks: list[SourceChunk] = field(default_factory=list)
    down: bool = False

    def __call__(self, chunks: Sequence[SourceChunk]) -> None:
        if self.down:
            raise ConnectionError("broker unreachable")
        for chunk in chunks:
            encode_body(chunk_message(chunk))
        self.chunks.extend(chunks)


@dataclass
class MemoryLedger:
    """In-memory webhook-id ledger."""

    bodies: dict[tuple[str, str], str] = field(default_factory=dict)

    def webhook_bodies(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], str]:
        return {key: self.bodies[key] for key in keys if key in self.bodies}

    def remember_webhooks(self, accepted: Sequence[AcceptedWebhook]) -> None:
        for webhook in accepted:
            self.bodies.setdefault((webhook.route, webhook.webhook_id), webhook.body_sha256)

    def accepted(self, route: str, webhook_id: str) -> str | None:
        return self.bodies.get((route, webhook_id))


@dataclass
class Receiver:
    url: str
    sink: RecordingSink
    ledger: MemoryLedger
    client: httpx.Client


RECEIVERS = {
    "partner-stock": WebhookSettings(
        route="partner-stock",
        secret=SECRET,
        schema=STOCK_SCHEMA,
        max_body=1024,
        rate_limit=None,
        tolerance=300.0,
        records="events",
    ),
    "partner-orders": WebhookSettings(
        route="partner-orders",
        secret=SECRET,
        schema=None,
        max_body=4096,
        rate_limit=None,
        tolerance=300.0,
        records=None,
    ),
    "partner-throttled": WebhookSettings(
        route="partner-throttled",
        secret=SECRET,
        schema=None,
        max_body=1024,
        rate_limit=(2, 60.0),
        tolerance=300.0,
        records=None,
    ),
    "partner-limited": WebhookSettings(
        route="partner-limited",
        secret=SECRET,
        schema=None,
        max_body=1024,
        rate_limit=(2, 60.0),
        signature_failures=(3, 60.0),
    ),
    "partner-slow": WebhookSettings(
        route="partner-slow", secret=SECRET, schema=None, max_body=1024, rate_limit=None, body_timeout=1.0
    ),
    "misconfigured": WebhookSettings(
        route="misconfigured",
        secret=None,
        # A reference to nowhere passes the schema check but fails at validation: a fault of the setup.
        schema={"type": "object", "properties": {"sku": {"$ref": "urn:retail-router:nowhere"}}},
        max_body=1024,
        rate_limit=None,
    ),
    "legacy-hex": WebhookSettings(
        route="legacy-hex",
        secret="raw-shared-secret",
        schema=None,
        max_body=1024,
        rate_limit=None,
        tolerance=300.0,
        records=None,
        signature="hex",
    ),
}


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, RecordingSink, MemoryLedger]]:
    sink = RecordingSink()
    ledger = MemoryLedger()
    intake = WebhookIntake(sink, ledger)
    app = Starlette(routes=webhook_routes(RECEIVERS, intake))
    # h11 hands a doubly framed request to the app, so this server tests the receiver's own framing
    # check; the router's listener (httptools) refuses such a request in its parser already.
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", http="h11")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uvicorn_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = uvicorn_server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", sink, ledger
    uvicorn_server.should_exit = True
    thread.join(5)
    intake.close()


@pytest.fixture
def receiver(server: tuple[str, RecordingSink, MemoryLedger]) -> Iterator[Receiver]:
    url, sink, ledger = server
    sink.chunks.clear()
    sink.down = False
    with httpx.Client(base_url=url, timeout=5) as client:
        yield Receiver(url, sink, ledger, client)


_ids = iter(range(1, 1_000_000))


def signed_headers(
    body: bytes, *, webhook_id: str | None = None, timestamp: int | None = None, secret: str = SECRET
) -> dict[str, str]:
    webhook_id = webhook_id or f"msg_{next(_ids)}_{time.time_ns()}"
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, webhook_id, timestamp, body),
    }


def stock_body(*events: dict[str, Any]) -> bytes:
    return json.dumps({"events": list(events)}).encode()


def assert_problem(response: httpx.Response, status: int, detail_part: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status
    assert problem["type"] and problem["title"]
    assert detail_part in problem["detail"]
    return problem


def test_signed_delivery_is_accepted_after_the_sink_confirmed(receiver: Receiver) -> None:
    body = stock_body(
        {"sku": "SKU-1", "store": "S001", "qty": 2.50}, {"sku": "SKU-2", "store": "S002", "qty": 7}
    )
    headers = signed_headers(body, webhook_id="msg_accept_1")

    response = receiver.client.post("/webhooks/partner-stock", content=body, headers=headers)

    assert response.status_code == 202
    assert response.json() == {"message_id": "webhook:partner-stock:msg_accept_1", "records": 2}
    [chunk] = receiver.sink.chunks
    assert chunk.route == "partner-stock"
    assert chunk.system == "webhook"
    assert chunk.message_id == "webhook:partner-stock:msg_accept_1"
    assert chunk.origin == {"webhook_id": "msg_accept_1"}
    assert [(record.number, record.line) for record in chunk.records] == [(1, None), (2, None)]
    assert chunk.records[0].data == {"sku": "SKU-1", "store": "S001", "qty": Decimal("2.50")}
    assert receiver.ledger.accepted("partner-stock", "msg_accept_1") == hashlib.sha256(body).hexdigest()


def test_records_carry_the_payload_around_them_for_from_document(receiver: Receiver) -> None:
    body = json.dumps(
        {
            "warehouse": "DC1",
            "counted_at": "2026-11-24T06:00:00Z",
            "events": [{"sku": "A", "store": "S1", "qty": 1}],
        }
    ).encode()
    response = receiver.client.post("/webhooks/partner-stock", content=body, headers=signed_headers(body))
    assert response.status_code == 202, response.text
    [chunk] = receiver.sink.chunks
    assert chunk.records[0].document == {"warehouse": "DC1", "counted_at": "2026-11-24T06:00:00Z"}


def test_repeated_webhook_id_answers_200_and_publishes_nothing(receiver: Receiver) -> None:
    body = stock_body({"sku": "SKU-1", "store": "S001", "qty": 1})
    headers = signed_headers(body, webhook_id="msg_repeat")
    assert receiver.client.post("/webhooks/partner-stock", content=body, headers=headers).status_code == 202

    again = receiver.client.post(
        "/webhooks/partner-stock", content=body, headers=signed_headers(body, webhook_id="msg_repeat")
    )

    assert again.status_code == 200
    assert again.json()["message_id"] == "webhook:partner-stock:msg_repeat"
    assert len(receiver.sink.chunks) == 1


def test_a_webhook_id_reused_for_other_content_is_a_conflict_not_a_silent_drop(receiver: Receiver) -> None:
    first = stock_body({"sku": "SKU-1", "store": "S001", "qty": 1})
    second = stock_body({"sku": "SKU-2", "store": "S001", "qty": 7})
    accepted = receiver.client.post(
        "/webhooks/partner-stock", content=first, headers=signed_headers(first, webhook_id="msg_reused")
    )
    assert accepted.status_code == 202

    reused = receiver.client.post(
        "/webhooks/partner-stock", content=second, headers=signed_headers(second, webhook_id="msg_reused")
    )

    assert_problem(reused, 409, "different body")
    assert len(receiver.sink.chunks) == 1


def test_payload_without_records_path_is_one_record_or_an_array_of_records(receiver: Receiver) -> None:
    single = json.dumps({"order": "A1"}).encode()
    several = json.dumps([{"order": "A2"}, {"order": "A3"}]).encode()
    assert (
        receiver.client.post(
            "/webhooks/partner-orders", content=single, headers=signed_headers(single)
        ).status_code
        == 202
    )
    assert (
        receiver.client.post(
            "/webhooks/partner-orders", content=several, headers=signed_headers(several)
        ).status_code
        == 202
    )
    assert [[record.data for record in chunk.records] for chunk in receiver.sink.chunks] == [
        [{"order": "A1"}],
        [{"order": "A2"}, {"order": "A3"}],
    ]


def test_several_signatures_in_the_header_any_match_passes(receiver: Receiver) -> None:
    body = stock_body({"sku": "SKU-1", "store": "S001", "qty": 1})
    headers = signed_headers(body)
    stale_key = sign("whsec_b2xkLWtleQ==", headers["webhook-id"], headers["webhook-timestamp"], body)
    headers["webhook-signature"] = f"{stale_key} {headers['webhook-signature']}"

    assert receiver.client.post("/webhooks/partner-stock", content=body, headers=headers).status_code == 202


def test_hex_variant_route_accepts_hex_digests(receiver: Receiver) -> None:
    body = b'{"sku": "SKU-9", "qty": 3}'
    headers = signed_headers(body, secret="raw-shared-secret")
    headers["webhook-signature"] = sign(
        "raw-shared-secret", headers["webhook-id"], headers["webhook-timestamp"], body, "hex"
    )
    assert receiver.client.post("/webhooks/legacy-hex", content=body, headers=headers).status_code == 202

    headers["webhook-signature"] = sign(
        "wrong", headers["webhook-id"], headers["webhook-timestamp"], body, "hex"
    )
    assert_problem(
        receiver.client.post("/webhooks/legacy-hex", content=body, headers=headers), 401, "matches"
    )


def test_bad_signature_is_401_and_publishes_nothing(receiver: Receiver) -> None:
    body = stock_body({"sku": "SKU-1", "store": "S001", "qty": 1})
    headers = signed_headers(body, secret="whsec_d3Jvbmcta2V5")

    response = receiver.client.post("/webhooks/partner-stock", content=body, headers=headers)

    problem = assert_problem(response, 401, "none of the 1 signature in webhook-signature matches")
    expected = signed_headers(
        body, webhook_id=headers["webhook-id"], timestamp=int(headers["webhook-timestamp"])
    )
    assert expected["webhook-signature"].removeprefix("v1,") not in response.text
    assert problem["type"].endswith("invalid-signature")
    assert receiver.sink.chunks == []


def test_stale_timestamp_is_401_saying_by_how_much(receiver: Receiver) -> None:
    body = stock_body({"sku": "SKU-1", "store": "S001", "qty": 1})
    headers = signed_headers(body, timestamp=int(time.time()) - 3600)

    response = receiver.client.post("/webhooks/partner-stock", content=body, headers=headers)

    assert_problem(response, 401, "s old, beyond the tolerance of 300 s")


def test_missing_signature_is_401(receiver: Receiver) -> None:
    body = stock_body({"sku": "SKU-1", "store": "S001", "qty": 1})
    headers = signed_headers(body)
    del headers["webhook-signature"]
    assert_problem(
        receiver.client.post("/webhooks/partner-stock", content=body, headers=headers), 401, "missing"
    )


def test_unknown_route_is_404_and_wrong_method_is_405(receiver: Receiver) -> None:
    assert_problem(receiver.client.post("/webhooks/nobody", content=b"{}"), 404, "'nobody'")
    response = receiver.client.get("/webhooks/partner-stock")
    assert_problem(response, 405, "GET is not allowed")
    assert response.headers["allow"] == "POST"


def test_body_over_max_body_by_content_length_is_413(receiver: Receiver) -> None:
    body = stock_body(*[{"sku": f"SKU-{n}", "store": "S001", "qty": 1} for n in range(100)])
    assert len(body) > 1024

    response = receiver.client.post("/webhooks/partner-stock", content=body, headers=signed_headers(body))

    assert_problem(response, 413, f"Content-Length {len(body)} exceeds the limit of 1024 bytes")


def test_streamed_body_without_content_length_over_max_body_is_413(receiver: Receiver) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"events": ['
        for _ in range(50):
            yield b'{"sku": "SKU-1", "store": "S001", "qty": 1},'

    request = receiver.client.build_request(
        "POST", "/webhooks/partner-stock", content=chunks(), headers=signed_headers(b"")
    )
    assert "content-length" not in request.headers
    response = receiver.client.send(request)

    assert_problem(response, 413, "body exceeds the limit of 1024 bytes")
    assert receiver.sink.chunks == []


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/xml", "application/json; charset=latin-1"]
)
def test_wrong_media_type_is_415(receiver: Receiver, content_type: str) -> None:
    body = stock_body({"sku": "SKU-1", "store": "S001", "qty": 1})
    headers = signed_headers(body) | {"content-type": content_type}
    assert_problem(
        receiver.client.post("/webhooks/partner-stock", content=body, headers=headers), 415, "not accepted"
    )


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "application/vnd.partner.stock+json"]
)
def test_json_media_type_variants_are_accepted(receiver: Receiver, content_type: str) -> None:
    body = stock_body({"sku": "SKU-1", "store": "S001", "qty": 1})
    headers = signed_headers(body) | {"content-type": content_type}
    assert receiver.client.post("/webhooks/partner-stock", content=body, headers=headers).status_code == 202


def test_malformed_json_is_400_with_the_position(receiver: Receiver) -> None:
    body = b'{"events": [\n  {"sku": "SKU-1",, "qty": 1}]}'
    response = receiver.client.post("/webhooks/partner-stock", content=body, headers=signed_headers(body))
    assert_problem(response, 400, "line 2 column 19")


def test_schema_violations_are_422_listing_every_error_with_its_path(receiver: Receiver) -> None:
    body = stock_body({"sku": "", "store": "S001", "qty": -1}, {"store": "S002", "qty": "two"})

    response = receiver.client.post("/webhooks/partner-stock", content=body, headers=signed_headers(body))

    problem = assert_problem(response, 422, "4 schema violations")
    assert [(error["path"], error["keyword"]) for error in problem["errors"]] == [
        ("$.events[0].qty", "minimum"),
        ("$.events[0].sku", "minLength"),
        ("$.events[1]", "required"),
        ("$.events[1].qty", "type"),
    ]
    assert problem["errors"][0]["message"] == "-1 is less than the minimum of 0"
    assert receiver.sink.chunks == []


def test_rate_limit_answers_429_with_retry_after(receiver: Receiver) -> None:
    statuses = []
    for _ in range(3):
        body = b'{"order": "R1"}'
        response = receiver.client.post(
            "/webhooks/partner-throttled", content=body, headers=signed_headers(body)
        )
        statuses.append(response.status_code)
    assert statuses == [202, 202, 429]
    assert_problem(response, 429, "2 requests per 60 s")
    assert 1 <= int(response.headers["retry-after"]) <= 30


def test_broker_down_is_503_and_the_retry_with_the_same_id_is_accepted(receiver: Receiver) -> None:
    body = stock_body({"sku": "SKU-1", "store": "S001", "qty": 1})
    receiver.sink.down = True

    refused = receiver.client.post(
        "/webhooks/partner-stock", content=body, headers=signed_headers(body, webhook_id="msg_503")
    )

    assert_problem(refused, 503, "nothing was accepted")
    assert int(refused.headers["retry-after"]) > 0
    assert receiver.ledger.accepted("partner-stock", "msg_503") is None

    receiver.sink.down = False
    retried = receiver.client.post(
        "/webhooks/partner-stock", content=body, headers=signed_headers(body, webhook_id="msg_503")
    )

    assert retried.status_code == 202
    assert [chunk.message_id for chunk in receiver.sink.chunks] == ["webhook:partner-stock:msg_503"]


def test_openapi_document_describes_every_route_and_status(receiver: Receiver) -> None:
    document = receiver.client.get("/openapi.json").json()

    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {f"/webhooks/{name}" for name in RECEIVERS}
    stock = document["paths"]["/webhooks/partner-stock"]["post"]
    assert {parameter["name"] for parameter in stock["parameters"]} == {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
    payload_schema = stock["requestBody"]["content"]["application/json"]["schema"]
    assert payload_schema["$defs"] == STOCK_SCHEMA["$defs"] and payload_schema["$id"]
    assert set(stock["responses"]) == {
        "200",
        "202",
        "400",
        "401",
        "408",
        "409",
        "413",
        "415",
        "422",
        "429",
        "503",
    }
    assert "429" in document["paths"]["/webhooks/partner-throttled"]["post"]["responses"]
    for operation in (path["post"] for path in document["paths"].values()):
        assert operation["operationId"]
        for status, response in operation["responses"].items():
            assert response["description"]
            if int(status) >= 400:
                assert response["content"]["application/problem+json"]["schema"] == {
                    "$ref": "#/components/schemas/Problem"
                }
    for reference in ("Problem", "Accepted", "Duplicate"):
        assert reference in document["components"]["schemas"]


def rejections(route: str, status: int) -> float:
    value = REGISTRY.get_sample_value(
        "router_webhook_rejections_total", {"route": route, "status": str(status)}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("body", "path", "keyword", "message"),
    [
        (
            b'{"events": [{"sku": "\\ud800", "store": "S001", "qty": 1}]}',
            "$.events[0].sku",
            "lone-surrogate",
            "\\ud800",
        ),
        (b'{"events": [], "\\udfff": 1}', "$['\\udfff']", "lone-surrogate", "the key"),
        (
            b'{"events": [{"sku": "A", "sku": "B", "store": "S001", "qty": 1}]}',
            "$.events[0].sku",
            "duplicate-key",
            "'sku'",
        ),
        (
            b'{"events": [{"sku": "A", "store": "S001", "qty": 1e400}]}',
            "$.events[0].qty",
            "number-range",
            "1e400",
        ),
        (
            b'{"events": [{"sku": "A", "store": "S001", "qty": -' + b"9" * 400 + b"}]}",
            "$.events[0].qty",
            "number-range",
            "range",
        ),
        (b'{"events": [{"sku": "A", "store": "S001", "qty": NaN}]}', "$.events[0].qty", "non-finite", "NaN"),
        (
            b'{"events": [{"sku": "A", "store": "S001", "qty": Infinity}]}',
            "$.events[0].qty",
            "non-finite",
            "Infinity",
        ),
        (b'{"events": ' + b"[" * 990 + b"]" * 990 + b"}", "$", "max-depth", "deeper than 64 levels"),
    ],
)
def test_json_other_systems_would_misread_is_400_naming_the_path_and_nothing_is_enqueued(
    receiver: Receiver, body: bytes, path: str, keyword: str, message: str
) -> None:
    response = receiver.client.post("/webhooks/partner-orders", content=body, headers=signed_headers(body))

    problem = assert_problem(response, 400, path)
    [error] = problem["errors"]
    assert (error["path"], error["keyword"]) == (path, keyword)
    assert message in error["message"]
    assert receiver.sink.chunks == []


def test_every_rejection_is_counted_by_route_and_status_with_unknown_routes_under_one_label(
    receiver: Receiver,
) -> None:
    before = rejections("partner-stock", 400), rejections("_unknown", 404)
    body = b'{"events": [{"sku": "\\ud800"}]}'

    receiver.client.post("/webhooks/partner-stock", content=body, headers=signed_headers(body))
    receiver.client.post("/webhooks/no-such-route-1", content=body)
    receiver.client.post("/webhooks/no-such-route-2", content=body)

    assert (rejections("partner-stock", 400), rejections("_unknown", 404)) == (before[0] + 1, before[1] + 2)
    assert (
        REGISTRY.get_sample_value(
            "router_webhook_rejections_total", {"route": "no-such-route-1", "status": "404"}
        )
        is None
    )


def test_unsigned_traffic_does_not_spend_the_partners_rate_limit(receiver: Receiver) -> None:
    body = b'{"order": "L1"}'
    forged = signed_headers(body, secret="whsec_d3Jvbmcta2V5")
    unsigned = {"content-type": "application/json", "webhook-id": "msg_unsigned"}
    with httpx.Client(
        base_url=receiver.url, timeout=5, transport=httpx.HTTPTransport(local_address="127.0.0.3")
    ) as stranger:
        refused = [stranger.post("/webhooks/partner-limited", content=body, headers=forged).status_code]
        refused.append(stranger.post("/webhooks/partner-limited", content=body, headers=unsigned).status_code)

    accepted = [
        receiver.client.post(
            "/webhooks/partner-limited", content=body, headers=signed_headers(body)
        ).status_code
        for _ in range(2)
    ]

    assert refused == [401, 401]
    assert accepted == [202, 202]


def test_a_peer_sending_bad_signatures_is_refused_unread_while_the_partner_is_served(
    receiver: Receiver,
) -> None:
    body = b'{"order": "G1"}'
    with httpx.Client(
        base_url=receiver.url, timeout=5, transport=httpx.HTTPTransport(local_address="127.0.0.2")
    ) as attacker:
        statuses = [
            attacker.post(
                "/webhooks/partner-limited",
                content=body,
                headers=signed_headers(body, secret="whsec_d3Jvbmcta2V5"),
            ).status_code
            for _ in range(4)
        ]
        refused = attacker.post("/webhooks/partner-limited", content=body, headers=signed_headers(body))

    assert statuses == [401, 401, 401, 429]
    problem = assert_problem(refused, 429, "invalid signatures")
    assert refused.headers["connection"] == "close"
    assert int(refused.headers["retry-after"]) >= 1
    partner = receiver.client.post("/webhooks/partner-limited", content=body, headers=signed_headers(body))
    assert partner.status_code in (202, 429), partner.text
    assert problem["type"].endswith("too-many-invalid-signatures")


def raw_request(url: str, request: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are (no client would frame a request twice) and read the answer to the end."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def doubly_framed_request(body: bytes) -> bytes:
    """A signed request whose body is framed by both Content-Length and Transfer-Encoding."""
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return (
        b"POST /webhooks/partner-orders HTTP/1.1\r\nHost: router\r\n"
        + b"".join(f"{name}: {value}\r\n".encode() for name, value in signed_headers(body).items())
        + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(chunked)
        + chunked
    )


def test_content_length_together_with_transfer_encoding_is_refused_400(receiver: Receiver) -> None:
    answer = raw_request(receiver.url, doubly_framed_request(b'{"order": "S1"}'))

    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"content-type: application/problem+json" in head.lower()
    assert b"connection: close" in head.lower()
    assert b"Content-Length and Transfer-Encoding" in payload
    assert receiver.sink.chunks == []


def test_a_body_slower_than_the_body_timeout_is_408_and_nothing_is_enqueued(receiver: Receiver) -> None:
    body = b'{"order": "T1"}'

    def slowly() -> Iterator[bytes]:
        yield body[:5]
        time.sleep(1.6)
        yield body[5:]

    request = receiver.client.build_request(
        "POST", "/webhooks/partner-slow", content=slowly(), headers=signed_headers(body)
    )
    started = time.monotonic()
    try:
        response = receiver.client.send(request)
    except httpx.TransportError:
        pytest.fail("the receiver closed without answering")

    assert_problem(response, 408, "did not arrive within 1 s")
    assert time.monotonic() - started < 3
    assert receiver.sink.chunks == []


def test_a_fault_of_the_router_is_a_problem_json_500_never_plain_text(receiver: Receiver) -> None:
    body = b'{"sku": "A"}'
    response = receiver.client.post(
        "/webhooks/misconfigured",
        content=body,
        headers={"content-type": "application/json", "webhook-id": "m1"},
    )

    problem = assert_problem(response, 500, "nothing was accepted")
    assert problem["type"].endswith("internal-error")


@pytest.fixture
def guarded_listener() -> Iterator[tuple[HttpListener, RecordingSink]]:
    """The router's own listener, with small limits so slow clients hit them within seconds."""
    sink = RecordingSink()
    # The body deadline is the receiver's (http.body_timeout reaches it through the route's settings).
    settings = dataclasses.replace(RECEIVERS["partner-orders"], body_timeout=1.0)
    intake = WebhookIntake(sink, MemoryLedger())
    app = Starlette(routes=webhook_routes({"partner-orders": settings}, intake))
    listener = HttpListener(
        app, "127.0.0.1", 0, HttpConfig(max_connections=50, header_timeout="1s", keep_alive="1s")
    )
    listener.start()
    yield listener, sink
    listener.stop()
    intake.close()


def closed_by_server(connections: list[socket.socket], within: float) -> list[socket.socket]:
    """The connections the server closed (EOF or reset) within ``within`` seconds."""
    deadline = time.monotonic() + within
    waiting, closed = list(connections), []
    while waiting and time.monotonic() < deadline:
        readable, _, _ = select.select(waiting, [], [], max(0.0, deadline - time.monotonic()))
        for connection in readable:
            try:
                data = connection.recv(4096)
            except ConnectionError:
                data = b""
            if not data:
                waiting.remove(connection)
                closed.append(connection)
    return closed


@pytest.mark.slow
def test_slow_clients_are_cut_off_and_connections_beyond_the_limit_get_a_problem_503(
    guarded_listener: tuple[HttpListener, RecordingSink],
) -> None:
    listener, sink = guarded_listener
    url = f"http://127.0.0.1:{listener.port}"
    body = b'{"order": "SL1"}'
    slow: list[socket.socket] = []
    try:
        for number in range(120):
            connection = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
            if number % 3 == 0:
                connection.sendall(
                    b"POST /webhooks/partner-orders HTTP/1.1\r\nHost: router\r\n"
                )  # never ends
            elif number % 3 == 1:
                headers = signed_headers(body)
                connection.sendall(  # complete headers, half the body, to a route that reads it
                    b"POST /webhooks/partner-orders HTTP/1.1\r\nHost: router\r\nContent-Length: 100\r\n"
                    + b"".join(f"{name}: {value}\r\n".encode() for name, value in headers.items())
                    + b"\r\n{"
                )
            slow.append(connection)  # the rest send nothing at all
        with httpx.Client(base_url=url, timeout=5) as client:
            refused = client.post("/webhooks/partner-orders", content=body, headers=signed_headers(body))

            closed = closed_by_server(slow, within=5.0)

            assert_problem(refused, 503, "already serves 50 connections")
            assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
            assert len(closed) == len(slow)
            deadline = time.monotonic() + 5
            while listener.open_connections and time.monotonic() < deadline:
                time.sleep(0.05)
            assert listener.open_connections == 0
            accepted = client.post("/webhooks/partner-orders", content=body, headers=signed_headers(body))
        assert accepted.status_code == 202, accepted.text
        assert [chunk.records[0].data for chunk in sink.chunks] == [{"order": "SL1"}]
        assert rejections(LISTENER_ROUTE, 503) >= 1
    finally:
        for connection in slow:
            connection.close()


@pytest.mark.slow
def test_a_second_request_trickled_on_a_kept_alive_connection_is_cut_off(
    guarded_listener: tuple[HttpListener, RecordingSink],
) -> None:
    listener, _ = guarded_listener
    body = b'{"order": "KA1"}'
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as connection:
        connection.sendall(
            b"POST /webhooks/partner-orders HTTP/1.1\r\nHost: router\r\nContent-Length: %d\r\n" % len(body)
            + b"".join(f"{name}: {value}\r\n".encode() for name, value in signed_headers(body).items())
            + b"\r\n"
            + body
        )
        assert connection.recv(4096).startswith(b"HTTP/1.1 202 ")
        started = time.monotonic()
        for piece in (b"POST /webhooks/", b"partner-orders HTTP/1.1\r\n", b"Host: router\r\n"):
            connection.sendall(piece)
            time.sleep(0.4)

        assert closed_by_server([connection], within=3.0) == [connection]
        assert time.monotonic() - started < 3.0


def test_the_listener_answers_a_request_its_parser_refuses_with_a_problem_400_and_closes(
    guarded_listener: tuple[HttpListener, RecordingSink],
) -> None:
    listener, sink = guarded_listener

    answer = raw_request(f"http://127.0.0.1:{listener.port}", doubly_framed_request(b'{"order": "S2"}'))

    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"content-type: application/problem+json" in head.lower()
    assert b"connection: close" in head.lower()
    problem = json.loads(payload)
    assert (
        problem["type"].endswith("malformed-request")
        and "Content-Length or Transfer-Encoding" in problem["detail"]
    )
    assert sink.chunks == []


def test_a_webhook_id_longer_than_the_ledger_keeps_is_400(receiver: Receiver) -> None:
    body = b'{"order": "W1"}'
    webhook_id = "m" * 201

    response = receiver.client.post(
        "/webhooks/partner-orders", content=body, headers=signed_headers(body, webhook_id=webhook_id)
    )

    assert_problem(response, 400, "201 characters; at most 200")
    assert receiver.sink.chunks == []


def test_an_unfinished_request_head_over_max_header_size_is_refused_400_by_the_http_layer(
    guarded_listener: tuple[HttpListener, RecordingSink],
) -> None:
    listener, sink = guarded_listener
    head = b"POST /webhooks/partner-orders HTTP/1.1\r\nHost: router\r\nX-Padding: "
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as connection:
        connection.sendall(head + b"a" * (HttpConfig().max_header_size + 1024))  # and no end of the head

        answer = connection.recv(4096)

        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert closed_by_server([connection], within=2.0) == [connection]
    assert sink.chunks == []
