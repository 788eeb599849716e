"""OpenTelemetry tracing of one movement from a partner's request, a REST page or a file to the target.

Off unless configured: :func:`configure_from_environment` installs an OTLP/HTTP exporter only when
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set; otherwise every
hook here returns at once without touching OpenTelemetry, so an unconfigured router pays nothing.

The W3C ``traceparent``/``tracestate`` of the span that published a message travels in its AMQP
headers. A partition message carries the events of one ingress chunk, so that context is each of its
events' context; the delivery worker notes it per event (:class:`EventContexts`) because one
micro-batch request mixes events of several messages, and its span links to each of their contexts.
Span names, kinds and attributes follow the messaging and HTTP semantic conventions.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode

from ops.secrets import redact

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
DEFAULT_SERVICE_NAME = "inventory-router"
MESSAGING_SYSTEM = "rabbitmq"
TRACE_HEADERS = ("traceparent", "tracestate")
MAX_NOTED_EVENTS = 65536
"""Event contexts a delivery worker remembers; the oldest are forgotten first (their links are lost)."""


@dataclass
class _Installed:
    provider: TracerProvider
    tracer: trace.Tracer


_installed: _Installed | None = None


def enabled() -> bool:
    """Whether spans are recorded in this process."""
    return _installed is not None


def configure_from_environment() -> bool:
    """Install the OTLP/HTTP exporter when an OTLP endpoint is configured; True when tracing is on.

    The exporter reads its endpoint, headers and timeout from the standard ``OTEL_EXPORTER_OTLP_*``
    variables and the service name from ``OTEL_SERVICE_NAME``.
    """
    if not any(os.environ.get(name) for name in ENDPOINT_VARIABLES):
        return False
    # Imported here: the exporter pulls in protobuf, which an unconfigured router never needs.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    install(OTLPSpanExporter(), batch=True, service_name=os.environ.get("OTEL_SERVICE_NAME"))
    atexit.register(shutdown)
    return True


def install(
    exporter: SpanExporter, *, batch: bool = False, service_name: str | None = None
) -> TracerProvider:
    """Record spans to ``exporter`` (batched in the background, or one by one as tests want them)."""
    global _installed
    shutdown()
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name or DEFAULT_SERVICE_NAME})
    )
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    _installed = _Installed(provider, provider.get_tracer("retail-inventory-router"))
    return provider


def shutdown() -> None:
    """Flush and stop the exporter; tracing is off afterwards."""
    global _installed
    installed, _installed = _installed, None
    if installed is not None:
        installed.provider.shutdown()


def current_ids() -> tuple[str, str] | None:
    """The active span's trace and span id (hex) for log lines, or None outside a span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


class HttpSpan:
    """An HTTP span in progress: what the caller learns once the response is in."""

    def __init__(self, span: Span | None) -> None:
        self._span = span

    def status(self, code: int) -> None:
        """Record the response status; 5xx marks a server span failed, any 4xx or 5xx a client span."""
        if self._span is None:
            return
        self._span.set_attribute("http.response.status_code", code)
        kind = getattr(self._span, "kind", SpanKind.INTERNAL)
        if code >= 500 or (code >= 400 and kind is SpanKind.CLIENT):
            self._span.set_status(Status(StatusCode.ERROR))
            self._span.set_attribute("error.type", str(code))

    def failed(self, error_type: str) -> None:
        """Record a request that got no response (a transport failure)."""
        if self._span is not None:
            self._span.set_status(Status(StatusCode.ERROR))
            self._span.set_attribute("error.type", error_type)


_NO_HTTP_SPAN = HttpSpan(None)


def _parent(carrier: Mapping[str, Any] | None) -> Context | None:
    """The context a ``traceparent`` in ``carrier`` names (header names in any case), else None."""
    if not carrier:
        return None
    headers = {
        str(name).lower(): value for name, value in carrier.items() if str(name).lower() in TRACE_HEADERS
    }
    if "traceparent" not in headers:
        return None
    return propagate.extract({name: str(value) for name, value in headers.items()})


@contextmanager
def server_span(method: str, route: str, url: str, headers: Mapping[str, str]) -> Iterator[HttpSpan]:
    """A SERVER span for a partner's request, child of the ``traceparent`` it sent, if any."""
    if _installed is None:
        yield _NO_HTTP_SPAN
        return
    attributes = {
        "http.request.method": method,
        "http.route": route,
        "url.full": redact(url),
    }
    with _installed.tracer.start_as_current_span(
        f"{method} {route}", context=_parent(headers), kind=SpanKind.SERVER, attributes=attributes
    ) as span:
        yield HttpSpan(span)


@contextmanager
def client_span(method: str, url: str, headers: MutableMapping[str, str]) -> Iterator[HttpSpan]:
    """A CLIENT span for one request to a target; puts its ``traceparent`` in ``headers``."""
    if _installed is None:
        yield _NO_HTTP_SPAN
        return
    attributes = {"http.request.method": method, "url.full": redact(url)}
    with _installed.tracer.start_as_current_span(method, kind=SpanKind.CLIENT, attributes=attributes) as span:
        propagate.inject(headers)
        yield HttpSpan(span)


@contextmanager
def source_span(name: str, route: str, attributes: Mapping[str, Any]) -> Iterator[None]:
    """An INTERNAL span for a unit a source publishes (a REST page, a file): the root of its trace."""
    if _installed is None:
        yield
        return
    with _installed.tracer.start_as_current_span(
        f"{name} {route}", attributes={"router.route": route, **attributes}
    ):
        yield


def _messaging(operation: str, destination: str, message_id: str | None) -> dict[str, Any]:
    attributes = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation": operation,
        "messaging.destination.name": destination,
        "messaging.rabbitmq.destination.routing_key": destination,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    return attributes


def current_context() -> Context | None:
    """The active trace context, for work another thread publishes on this one's behalf (None: off)."""
    return None if _installed is None else context_api.get_current()


@contextmanager
def publish_span(
    destination: str, headers: Mapping[str, Any] | None, parent: Context | None = None
) -> Iterator[dict[str, Any]]:
    """A PRODUCER span for one publish to ``destination``, child of ``parent`` (default: the active
    span); yields ``headers`` plus its trace context."""
    carrier = dict(headers or {})
    if _installed is None:
        yield carrier
        return
    message_id = carrier.get("message_id")
    with _installed.tracer.start_as_current_span(
        f"publish {destination}",
        context=parent,
        kind=SpanKind.PRODUCER,
        attributes=_messaging("publish", destination, message_id if isinstance(message_id, str) else None),
    ):
        propagate.inject(carrier)
        yield carrier


def _queue_of(message: Any) -> str:
    return str((getattr(message, "delivery_info", None) or {}).get("routing_key", ""))


@contextmanager
def process_span(message: Any) -> Iterator[None]:
    """A CONSUMER span for handling one broker message, child of the span that published it."""
    if _installed is None:
        yield
        return
    headers = getattr(message, "headers", None) or {}
    destination = _queue_of(message)
    message_id = headers.get("message_id")
    with _installed.tracer.start_as_current_span(
        f"process {destination}",
        context=_parent(headers),
        kind=SpanKind.CONSUMER,
        attributes=_messaging("process", destination, message_id if isinstance(message_id, str) else None),
    ):
        yield


class EventContexts:
    """Each event's trace context (that of the message it arrived in) and queue, by event id.

    Shared by a target's partition threads, so every change is made under a lock.
    """

    def __init__(self, limit: int = MAX_NOTED_EVENTS) -> None:
        self._limit = limit
        self._events: OrderedDict[str, tuple[SpanContext, str]] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, message: Any, events: Iterable[Mapping[str, Any]]) -> None:
        """Remember the context the message ``events`` came in carries, for the span that delivers them."""
        if _installed is None:
            return
        parent = _parent(getattr(message, "headers", None))
        if parent is None:
            return
        context = trace.get_current_span(parent).get_span_context()
        queue = _queue_of(message)
        with self._lock:
            for event in events:
                self._events[event["event_id"]] = (context, queue)
                self._events.move_to_end(event["event_id"])
            while len(self._events) > self._limit:
                self._events.popitem(last=False)

    def of(self, events: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[SpanContext, int]], list[str]]:
        """The distinct contexts of ``events`` with how many events each carries, and their queues."""
        # Keyed by ids: a SpanContext with a tracestate is not hashable.
        contexts: dict[tuple[int, int], tuple[SpanContext, int]] = {}
        queues: list[str] = []
        with self._lock:
            noted_events = [self._events.get(event["event_id"]) for event in events]
        for noted in noted_events:
            if noted is None:
                continue
            context, queue = noted
            key = (context.trace_id, context.span_id)
            contexts[key] = (context, contexts[key][1] + 1 if key in contexts else 1)
            if queue not in queues:
                queues.append(queue)
        return list(contexts.values()), queues


@contextmanager
def deliver_span(target: str, events: Sequence[Mapping[str, Any]], noted: EventContexts) -> Iterator[None]:
    """A CONSUMER span for delivering ``events`` to ``target`` in one request (retries included).

    It links to the context of every message its events came in; when those all belong to one trace,
    it is also the first one's child, so a single movement reads as one trace from request to target.
    """
    if _installed is None:
        yield
        return
    contexts, queues = noted.of(events)
    links = [Link(context, {"messaging.batch.message_count": count}) for context, count in contexts]
    # An empty context, not the current one: a batch of several traces starts a trace of its own.
    parent = Context()
    if contexts and len({context.trace_id for context, _ in contexts}) == 1:
        parent = trace.set_span_in_context(NonRecordingSpan(contexts[0][0]))
    attributes: dict[str, Any] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation": "process",
        "messaging.batch.message_count": len(events),
        "router.target": target,
    }
    if len(queues) == 1:
        name = attributes["messaging.destination.name"] = queues[0]
    else:
        # Events of several partitions (or parked ones, read from the store) in one request.
        name = target
        if queues:
            attributes["messaging.destination.template"] = queues[0].rsplit(".", 1)[0] + ".{partition}"
    with _installed.tracer.start_as_current_span(
        f"process {name}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes, links=links
    ):
        yield
