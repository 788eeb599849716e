"""One trace from a partner's signed webhook request to the target's request: the router in-process on
the real RabbitMQ, real loopback HTTP targets recording the ``traceparent`` they got, and the spans read
from an in-memory exporter."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from connectors.signatures import sign
from ops import tracing
from router.config import load_config
from router.runtime import RouterRuntime
from router.simulated import ReceivedRequest, SimulatedTarget
from tests.integration.harness import wait_until

pytestmark = pytest.mark.slow

SECRET = "whsec_cGFydG5lci1zdG9jay1zZWNyZXQtMTIzNDU2"
ROUTE = "threepl-stock"
# Two partner traces, as their own tracing would start them: trace id, the partner's span id.
PARTNER_TRACES = [
    ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
    ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config(folder: Path, url: str, prefix: str, wms: str, erp: str) -> Path:
    """A signed webhook route delivering to ``wms`` one event per request and to ``erp`` in micro-batches
    long enough to gather both partner requests."""
    target = {
        "type": "http",
        "partitions": 1,
        "timeout": "5s",
        "retry": {"attempts": 5, "initial": "50ms", "max": "500ms", "max_age": "1m"},
    }
    config = {
        "version": 1,
        "broker": {"url": url, "prefix": prefix},
        "store": {"url": f"sqlite:///{folder / 'state.db'}"},
        "http": {"listen": f"127.0.0.1:{_free_port()}"},
        "targets": {
            "wms": {**target, "url": f"{wms}/stock"},
            "erp": {**target, "url": f"{erp}/stock", "batch": {"max_events": 50, "max_wait": "3s"}},
        },
        "routes": [
            {
                "name": ROUTE,
                "source": {"type": "webhook", "secret": SECRET},
                "format": "json",
                "records": "events",
                "map": {
                    "type": "stock.snapshot",
                    "sku": {"path": "sku"},
                    "location": {"path": "warehouse"},
                    "quantity": {"path": "on_hand", "as": "decimal"},
                    "occurred_at": {"path": "counted_at", "as": "datetime"},
                },
                "deliver": ["wms", "erp"],
            }
        ],
    }
    path = folder / "routes.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    tracing.install(memory)
    try:
        yield memory
    finally:
        tracing.shutdown()


def _signed(webhook_id: str, body: bytes, trace_id: str, span_id: str) -> dict[str, str]:
    timestamp = str(int(time.time()))
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": sign(SECRET, webhook_id, timestamp, body),
        "traceparent": f"00-{trace_id}-{span_id}-01",
        "tracestate": "partner=3pl",
    }


def _header(request: ReceivedRequest, name: str) -> str:
    return next(value for key, value in request.headers.items() if key.lower() == name)


def _hex(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def _parent_of(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    [parent] = [other for other in spans if other.context and other.context.span_id == span.parent.span_id]
    return parent


def _deliveries(spans: Sequence[ReadableSpan], queue: str) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is SpanKind.CONSUMER and s.name == f"process {queue}"]


def test_a_partners_trace_runs_from_its_webhook_request_to_the_targets_request(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str, exporter: InMemorySpanExporter
) -> None:
    prefix = rabbitmq_namespace
    with SimulatedTarget("wms") as wms, SimulatedTarget("erp") as erp:
        runtime = RouterRuntime(load_config(_config(tmp_path, rabbitmq_url, prefix, wms.url, erp.url)))
        runtime.start()
        try:
            assert runtime.listener is not None
            base = f"http://127.0.0.1:{runtime.listener.port}"
            with httpx.Client(base_url=base, timeout=10) as client:
                for n, (trace_id, span_id) in enumerate(PARTNER_TRACES):
                    payload = {
                        "events": [
                            {
                                "sku": f"SKU-{n}",
                                "warehouse": "DC1",
                                "on_hand": 5,
                                "counted_at": "2026-11-24T06:00:00Z",
                            }
                        ]
                    }
                    body = json.dumps(payload).encode()
                    answer = client.post(
                        f"/webhooks/{ROUTE}",
                        content=body,
                        headers=_signed(f"msg_{n}", body, trace_id, span_id),
                    )
                    assert answer.status_code == 202, answer.text
            wait_until(
                lambda: len(wms.events) == 2 and len(erp.events) == 2, 30, "both events at both targets"
            )
            wait_until(
                lambda: len(_deliveries(exporter.get_finished_spans(), f"{prefix}.deliver.wms.0")) == 2,
                10,
                "the wms delivery spans ended",
            )
        finally:
            runtime.stop()

    spans = exporter.get_finished_spans()
    partner_trace, partner_span = PARTNER_TRACES[0]
    # The target saw a traceparent of the partner's trace, naming the router's request span.
    [request] = [r for r in wms.requests if r.events[0]["sku"] == "SKU-0"]
    version, seen_trace, seen_parent, _ = _header(request, "traceparent").split("-")
    assert (version, seen_trace) == ("00", partner_trace)
    assert _header(request, "tracestate") == "partner=3pl"
    [client_span] = [
        s for s in spans if s.kind is SpanKind.CLIENT and _hex(s) == (partner_trace, seen_parent)
    ]

    # Walk up from the target's request to the partner's span: one trace, in the documented order.
    deliver = _parent_of(client_span, spans)
    published = _parent_of(deliver, spans)
    transform = _parent_of(published, spans)
    ingress = _parent_of(transform, spans)
    server = _parent_of(ingress, spans)
    chain = [server, ingress, transform, published, deliver, client_span]
    assert [(s.kind, s.name) for s in chain] == [
        (SpanKind.SERVER, "POST /webhooks/{route}"),
        (SpanKind.PRODUCER, f"publish {prefix}.ingress.{ROUTE}"),
        (SpanKind.CONSUMER, f"process {prefix}.ingress.{ROUTE}"),
        (SpanKind.PRODUCER, f"publish {prefix}.deliver.wms.0"),
        (SpanKind.CONSUMER, f"process {prefix}.deliver.wms.0"),
        (SpanKind.CLIENT, "POST"),
    ]
    assert {_hex(s)[0] for s in chain} == {partner_trace}
    assert server.parent is not None and f"{server.parent.span_id:016x}" == partner_span

    # Semantic conventions.
    assert server.attributes is not None and client_span.attributes is not None
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.response.status_code"] == 202
    assert server.attributes["url.full"] == f"{base}/webhooks/{ROUTE}"
    assert client_span.attributes["http.request.method"] == "POST"
    assert client_span.attributes["url.full"] == f"{wms.url}/stock"
    assert client_span.attributes["http.response.status_code"] == 201
    for span, operation, queue in [
        (ingress, "publish", f"{prefix}.ingress.{ROUTE}"),
        (transform, "process", f"{prefix}.ingress.{ROUTE}"),
        (published, "publish", f"{prefix}.deliver.wms.0"),
        (deliver, "process", f"{prefix}.deliver.wms.0"),
    ]:
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.operation"] == operation
        assert span.attributes["messaging.destination.name"] == queue
    assert ingress.attributes is not None and transform.attributes is not None
    assert ingress.attributes["messaging.message.id"] == f"webhook:{ROUTE}:msg_0"
    assert transform.attributes["messaging.message.id"] == f"webhook:{ROUTE}:msg_0"

    # The erp got both partners' events in one request: its span links to each event's message context.
    [batch_request] = erp.requests
    assert {event["sku"] for event in batch_request.events} == {"SKU-0", "SKU-1"}
    [batch] = _deliveries(spans, f"{prefix}.deliver.erp.0")
    erp_publishes = {
        _hex(s): s
        for s in spans
        if s.kind is SpanKind.PRODUCER and s.name == f"publish {prefix}.deliver.erp.0"
    }
    linked = {(f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}") for link in batch.links}
    assert linked == set(erp_publishes) and {trace for trace, _ in linked} == {t for t, _ in PARTNER_TRACES}
    assert batch.attributes is not None and batch.attributes["messaging.batch.message_count"] == 2
    [batch_client] = [s for s in spans if s.kind is SpanKind.CLIENT and _parent_of(s, spans) is batch]
    assert _header(batch_request, "traceparent").split("-")[1:3] == list(_hex(batch_client))


def test_an_otlp_endpoint_gets_the_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "router-under-test")
    try:
        assert tracing.configure_from_environment()
        with tracing.source_span("ingest", "pos-sales", {"file.name": "sales.csv"}):
            pass
        tracing.shutdown()  # flushes the batch, as at exit
    finally:
        tracing.shutdown()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    [(path, body)] = received
    assert path == "/v1/traces"
    export = ExportTraceServiceRequest.FromString(body)
    [resource] = export.resource_spans
    service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
    assert service == "router-under-test"
    assert [span.name for scope in resource.scope_spans for span in scope.spans] == ["ingest pos-sales"]
