"""Tracing is off unless an OTLP endpoint is configured, and log lines name the span they were written in."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from connectors.chunks import SourceChunk
from connectors.file_ingest import FileParsing, FileProgress, publish_file
from ops import tracing
from ops.logging import ConsoleFormatter, JsonLineFormatter, RedactingFilter

PARTNER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    tracing.install(memory)
    try:
        yield memory
    finally:
        tracing.shutdown()


def test_with_no_endpoint_configured_nothing_is_installed_and_nothing_travels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in tracing.ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "router")

    assert tracing.configure_from_environment() is False

    assert not tracing.enabled()
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    with tracing.publish_span("router.ingress.pos", {"message_id": "m1"}) as headers:
        assert headers == {"message_id": "m1"}
    outgoing: dict[str, str] = {}
    with tracing.client_span("POST", "http://127.0.0.1/stock", outgoing):
        pass
    assert outgoing == {}


def _log_line(formatter: logging.Formatter) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("tests.tracing")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("chunk %s refused", "c1")
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_a_log_line_within_a_span_carries_its_trace_and_span_id(exporter: InMemorySpanExporter) -> None:
    assert "trace_id" not in json.loads(_log_line(JsonLineFormatter()))
    with tracing.source_span("ingest", "pos-sales", {"file.name": "sales.csv"}):
        line = json.loads(_log_line(JsonLineFormatter()))
        console = _log_line(ConsoleFormatter())
    [span] = exporter.get_finished_spans()
    assert span.context is not None
    assert line["trace_id"] == f"{span.context.trace_id:032x}"
    assert line["span_id"] == f"{span.context.span_id:016x}"
    assert f"trace_id={line['trace_id']}" in console


def test_a_target_request_continues_the_trace_without_the_urls_secrets(
    exporter: InMemorySpanExporter,
) -> None:
    outgoing: dict[str, str] = {}
    with (
        tracing.server_span(
            "POST", "/webhooks/{route}", "http://127.0.0.1/webhooks/a", {"TraceParent": PARTNER}
        ),
        tracing.client_span("POST", "https://erp:hunter22@erp.example/stock?token=abc123", outgoing) as span,
    ):
        span.status(503)
    client, server = exporter.get_finished_spans()
    assert client.context is not None and client.attributes is not None
    assert outgoing["traceparent"] == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{client.context.span_id:016x}-01"
    assert "hunter22" not in str(client.attributes["url.full"]) and "abc123" not in str(
        client.attributes["url.full"]
    )
    assert client.attributes["http.response.status_code"] == 503
    assert not client.status.is_ok
    assert server.parent is not None and f"{server.parent.span_id:016x}" == "00f067aa0ba902b7"


def _message(queue: str, headers: dict[str, str]) -> SimpleNamespace:
    return SimpleNamespace(headers=headers, delivery_info={"routing_key": queue})


def test_a_micro_batch_links_to_each_message_its_events_came_in(exporter: InMemorySpanExporter) -> None:
    noted = tracing.EventContexts()
    first = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    noted.note(
        _message("router.deliver.erp.0", {"traceparent": PARTNER}), [{"event_id": "a"}, {"event_id": "b"}]
    )
    noted.note(_message("router.deliver.erp.1", {"traceparent": first}), [{"event_id": "c"}])
    noted.note(_message("router.deliver.erp.1", {}), [{"event_id": "d"}])

    with tracing.deliver_span("erp", [{"event_id": e} for e in "abcd"], noted):
        pass

    [span] = exporter.get_finished_spans()
    assert span.parent is None, "events of two traces: the batch starts its own"
    links = {
        (f"{link.context.span_id:016x}", (link.attributes or {}).get("messaging.batch.message_count"))
        for link in span.links
    }
    assert links == {("00f067aa0ba902b7", 2), ("b7ad6b7169203331", 1)}
    assert span.attributes is not None
    assert span.attributes["messaging.batch.message_count"] == 4
    assert span.attributes["messaging.destination.template"] == "router.deliver.erp.{partition}"


def test_each_file_is_the_root_of_the_trace_its_chunks_travel_in(
    exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    path = tmp_path / "sales.csv"
    path.write_text("SKU,QTY\n" + "".join(f"A{n},1\n" for n in range(5)), encoding="utf-8")
    published: list[dict[str, str]] = []

    def sink(_: SourceChunk) -> None:
        with tracing.publish_span("router.ingress.pos-sales", {}) as headers:
            published.append(headers)

    publish_file(path, FileParsing("pos-sales", "file", "csv", None, 2), sink, FileProgress())

    *publishes, ingest = exporter.get_finished_spans()
    assert ingest.name == "ingest pos-sales" and ingest.parent is None
    assert ingest.attributes is not None and ingest.attributes["file.name"] == "sales.csv"
    assert len(publishes) == len(published) == 3
    assert all(
        span.parent is not None and span.parent.span_id == ingest.context.span_id for span in publishes
    )
    assert {headers["traceparent"].split("-")[1] for headers in published} == {
        f"{ingest.context.trace_id:032x}"
    }


def test_a_malformed_partner_traceparent_starts_a_new_trace(exporter: InMemorySpanExporter) -> None:
    with tracing.server_span(
        "POST", "/webhooks/{route}", "http://127.0.0.1/webhooks/a", {"traceparent": "00-zz"}
    ):
        pass

    [span] = exporter.get_finished_spans()
    assert span.parent is None and span.context is not None and span.context.is_valid
