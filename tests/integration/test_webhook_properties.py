"""Property-based tests of the webhook edge: hostile requests against the router's listener on loopback.

Whatever arrives, the receiver answers 2xx or a problem+json 4xx with a reason, never a 5xx; every
202 is one message in the ingress queue of the embedded memory:// broker, and nothing else is.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from connectors.signatures import sign
from connectors.webhooks.intake import WebhookIntake
from connectors.webhooks.routes import webhook_routes
from connectors.webhooks.settings import WebhookSettings
from router.broker import BrokerSettings, Topology, connect
from router.http_server import HttpListener
from router.ingress import IngressGroupPublisher
from tests.integration.test_webhooks import SECRET, MemoryLedger

ROUTE = "partner-fuzz"
STOCK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["events"],
    "properties": {"events": {"type": "array", "items": {"type": "object", "required": ["sku"]}}},
}
RECEIVERS = {
    ROUTE: WebhookSettings(
        route=ROUTE,
        secret=SECRET,
        schema=None,
        max_body=4096,
        rate_limit=None,
        # Generated bad signatures must not lock the test client out: that bound is tested elsewhere.
        signature_failures=(1_000_000, 1.0),
    ),
    "partner-fuzz-schema": WebhookSettings(
        route="partner-fuzz-schema",
        secret=SECRET,
        schema=STOCK_SCHEMA,
        max_body=4096,
        rate_limit=None,
        records="events",
        signature_failures=(1_000_000, 1.0),
    ),
}


@dataclass
class Edge:
    client: httpx.Client
    broker: BrokerSettings
    topology: Topology

    def enqueued(self, route: str) -> list[dict[str, Any]]:
        """Every message waiting in the route's ingress queue, taken off it."""
        messages = []
        with connect(self.broker) as connection:
            queue = self.topology.ingress_queue(route)(connection.default_channel)
            queue.declare()
            while (message := queue.get(no_ack=True)) is not None:
                messages.append(json.loads(message.body))
        return messages


@pytest.fixture(scope="module")
def edge() -> Iterator[Edge]:
    broker = BrokerSettings(url="memory://", prefix=f"fuzz{uuid.uuid4().hex[:8]}")
    publisher = IngressGroupPublisher(broker)
    intake = WebhookIntake(publisher, MemoryLedger())
    listener = HttpListener(Starlette(routes=webhook_routes(RECEIVERS, intake)), "127.0.0.1", 0)
    listener.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{listener.port}", timeout=10) as client:
            yield Edge(client, broker, Topology(broker))
    finally:
        listener.stop()
        intake.close()
        publisher.close()


# JSON texts that json.loads accepts but other systems misread, spliced into otherwise valid documents.
HOSTILE_FRAGMENTS = [
    '"\\ud800"',
    '"\\udfff\\ud800"',
    '{"a": 1, "a": 2}',
    "1e400",
    "-1e999",
    "9" * 400,
    "NaN",
    "-Infinity",
    "[" * 100 + "]" * 100,
    '{"x": ' * 70 + "0" + "}" * 70,
    '"\\u0000"',
    "1E-400",
    "[]",
    "{}",
]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "spliced", "broken-utf8", "truncated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    document = json.dumps(draw(json_values)).encode()
    if kind == "spliced":
        fragment = draw(st.sampled_from(HOSTILE_FRAGMENTS))
        return b'{"events": [{"sku": "A", "qty": %s}]}' % fragment.encode()
    if kind == "broken-utf8":
        at = draw(st.integers(0, len(document)))
        return (
            document[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]))
            + document[at:]
        )
    return document[: draw(st.integers(0, max(0, len(document) - 1)))]


header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(
    str.strip
)


@dataclass(frozen=True)
class HeaderPlan:
    """Drawn header choices; the timestamp is relative, so examples replay the same on a later clock."""

    webhook_id: str
    timestamp: int | str
    signature: str
    content_type: str
    dropped: str | None

    def build(self, body: bytes) -> dict[str, str]:
        timestamp = (
            str(int(time.time()) + self.timestamp) if isinstance(self.timestamp, int) else self.timestamp
        )
        if self.signature == "valid":
            signature = sign(SECRET, self.webhook_id, timestamp, body) if timestamp else ""
        elif self.signature == "other-body":
            signature = sign(SECRET, self.webhook_id, timestamp, body + b" ") if timestamp else ""
        else:
            signature = self.signature
        headers = {
            "content-type": self.content_type,
            "webhook-id": self.webhook_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": signature,
        }
        return {name: value for name, value in headers.items() if name != self.dropped and value}


header_plans = st.builds(
    HeaderPlan,
    webhook_id=st.one_of(*[st.uuids().map(lambda value: f"msg_{value.hex}")] * 3, header_text),
    timestamp=st.sampled_from(["near"] * 5 + ["far", "text", "huge"]).flatmap(
        lambda kind: {
            "near": st.integers(-250, 250),
            "far": st.integers(-900, 900),
            "text": header_text,
            "huge": st.just("9" * 40),
        }[kind]
    ),
    signature=st.sampled_from(["valid"] * 8 + ["other-body", "text", "v1-text"]).flatmap(
        lambda kind: {"text": header_text, "v1-text": header_text.map(lambda text: "v1," + text)}.get(
            kind, st.just(kind)
        )
    ),
    content_type=st.sampled_from(
        [*["application/json"] * 6, "application/x+json; charset=utf-8", "text/plain", ""]
    ),
    dropped=st.sampled_from([*[None] * 9, "webhook-id", "webhook-timestamp", "webhook-signature"]),
)


def assert_answer_is_sound(edge: Edge, route: str, response: httpx.Response) -> None:
    """2xx or a problem+json 4xx with a reason; a 202 is exactly one message, anything else none."""
    enqueued = edge.enqueued(route)
    event(f"{response.status_code} {response.json().get('type', '') if response.content else ''}")
    assert response.status_code in (200, 202) or 400 <= response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["status"] == response.status_code
        assert problem["type"].startswith("urn:retail-router:problem:") and problem["title"]
        assert problem["detail"]
    if response.status_code == 202:
        assert [message["message_id"] for message in enqueued] == [response.json()["message_id"]]
        assert len(enqueued[0]["records"]) == response.json()["records"]
    else:
        assert enqueued == []


@settings(max_examples=150, deadline=None)
@given(data=st.data(), route=st.sampled_from([ROUTE, ROUTE, ROUTE, "partner-fuzz-schema", "nobody"]))
def test_hostile_requests_get_2xx_or_a_problem_4xx_and_only_202_enqueues(
    edge: Edge, data: st.DataObject, route: str
) -> None:
    body = data.draw(hostile_bodies(), label="body")
    headers = data.draw(header_plans, label="headers").build(body)

    response = edge.client.post(f"/webhooks/{route}", content=body, headers=headers)

    assert_answer_is_sound(edge, route, response)


@settings(max_examples=60, deadline=None)
@given(payload=json_values)
def test_signed_valid_json_is_accepted_and_enqueued_once(edge: Edge, payload: Any) -> None:
    webhook_id = f"msg_{uuid.uuid4().hex}"  # fresh per run: a replayed example is a new message
    body = json.dumps(payload).encode()
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(SECRET, webhook_id, timestamp, body),
    }

    response = edge.client.post(f"/webhooks/{ROUTE}", content=body, headers=headers)

    assert_answer_is_sound(edge, ROUTE, response)
    if payload == []:
        assert response.status_code == 422  # no records: nothing to accept
    else:
        assert response.status_code == 202, response.text
        again = edge.client.post(f"/webhooks/{ROUTE}", content=body, headers=headers)
        assert again.status_code == 200
        assert edge.enqueued(ROUTE) == []
