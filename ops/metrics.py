"""The router's Prometheus metrics, in one registry scraped at ``GET /metrics``.

Label discipline: labels name routes, targets, queues, stages and bounded outcome categories only.
They never carry a SKU, GTIN, location or event id (that would create a series per item and exhaust
Prometheus); ``reason`` is a short category from a fixed vocabulary (parse, validation, mapping, lookup,
http_4xx, retries_exhausted, ...), never an error message.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The *_created series would double the scrape size, and rate() already copes with counter resets.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)
"""All router metrics; separate from prometheus-client's default registry so imports cannot collide."""

DELIVERY_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
EVENT_LAG_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 43200.0, 86400.0)

MESSAGES_RECEIVED = Counter(
    "router_messages_received",
    "Ingress messages (file chunks, webhook bodies, REST pages) taken in by the transform stage.",
    ["route"],
    registry=REGISTRY,
)
EVENTS_TRANSFORMED = Counter(
    "router_events_transformed",
    "Records turned into valid canonical events.",
    ["route"],
    registry=REGISTRY,
)
EVENTS_ROUTED = Counter(
    "router_events_routed",
    "Canonical events published to a target's delivery queues.",
    ["route", "target"],
    registry=REGISTRY,
)
EVENTS_DELIVERED = Counter(
    "router_events_delivered",
    "Events the target accepted (2xx or 409).",
    ["route", "target"],
    registry=REGISTRY,
)
DELIVERY_ATTEMPTS = Counter(
    "router_delivery_attempts",
    "Requests to a target by outcome (delivered, retried, permanent, ...).",
    ["target", "outcome"],
    registry=REGISTRY,
)
DELIVERY_SECONDS = Histogram(
    "router_delivery_seconds",
    "Time to deliver one request's worth of events to a target, retries included.",
    ["target"],
    buckets=DELIVERY_SECONDS_BUCKETS,
    registry=REGISTRY,
)
EVENT_LAG = Histogram(
    "router_event_lag_seconds",
    "Delivered-at minus occurred-at of each event: how far behind the target is.",
    ["target"],
    buckets=EVENT_LAG_BUCKETS,
    registry=REGISTRY,
)
DEADLETTERS = Counter(
    "router_deadletters",
    "Records and events dead-lettered, by stage and reason category.",
    ["route", "stage", "reason"],
    registry=REGISTRY,
)
DEADLETTERS_OPEN = Gauge(
    "router_deadletters_open",
    "Dead letters waiting for an operator (status dead or parked).",
    ["route"],
    registry=REGISTRY,
)
PARKED_KEYS = Gauge(
    "router_parked_keys",
    "Sequence keys held at a target behind a dead letter.",
    ["target"],
    registry=REGISTRY,
)
EVENTS_STALE = Counter(
    "router_events_stale",
    "Stock snapshots skipped because a newer one was already applied at the target.",
    ["target"],
    registry=REGISTRY,
)
EVENTS_DUPLICATE = Counter(
    "router_events_duplicate",
    "Events not sent again because the target already has them (a re-ingested file, a redelivery).",
    ["target"],
    registry=REGISTRY,
)
SOURCE_UP = Gauge(
    "router_source_up",
    "1 while a polling source's last poll worked (folder, SFTP server or REST API reachable), else 0.",
    ["route"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "router_queue_depth",
    "Messages ready in a broker queue.",
    ["queue"],
    registry=REGISTRY,
)
CIRCUIT_OPEN = Gauge(
    "router_circuit_open",
    "1 while deliveries to the target are paused by its circuit breaker, else 0.",
    ["target"],
    registry=REGISTRY,
)
FILES_INGESTED = Counter(
    "router_files_ingested",
    "Source files handled, by outcome (archived, deleted, rejected, or released to be retried).",
    ["route", "outcome"],
    registry=REGISTRY,
)

WEBHOOK_REJECTIONS = Counter(
    "router_webhook_rejections",
    "Webhook requests refused, by route (a configured route, or _unknown / _listener) and HTTP status.",
    ["route", "status"],
    registry=REGISTRY,
)


def render_latest() -> tuple[bytes, str]:
    """The scrape body in the Prometheus text format, and its content type, for ``GET /metrics``."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
