"""The router's Prometheus metrics, in one registry scraped at ``GET /metrics``.

Label discipline: labels name routes, targets, queues, stages and bounded outcome categories only.
They never carry a SKU, GTIN, location or event id (that would create a series per item and exhaust
Prometheus); ``reason`` is a short category from a fixed vocabulary (parse, validation, mapping, lookup,
http_4xx, retries_exhausted, ...), never an error message.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

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


class StateCounts(Protocol):
    """What the state gauges are counted from (the store): one grouped count per gauge."""

    def open_letters_by_route(self) -> Mapping[str, int]: ...

    def parked_keys_by_target(self) -> Mapping[str, int]: ...


class StateGauges(Collector):
    """``router_deadletters_open{route}`` and ``router_parked_keys{target}``, counted in the store when
    /metrics is scraped, so a letter discarded by the CLI or another process shows at the next scrape.

    Routes and targets the router runs show 0 when nothing is open. When the store fails during a
    scrape these two gauges have no samples in it (the rest of the scrape is served) and the failure is
    logged once, until a scrape succeeds again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: StateCounts | None = None
        self._routes: tuple[str, ...] = ()
        self._targets: tuple[str, ...] = ()
        self._failing = False

    def attach(self, counts: StateCounts, routes: Iterable[str], targets: Iterable[str]) -> None:
        """Count from ``counts`` from now on, reporting at least ``routes`` and ``targets``."""
        with self._lock:
            self._counts, self._routes, self._targets = counts, tuple(routes), tuple(targets)

    def detach(self, counts: StateCounts) -> None:
        """Stop counting from ``counts`` (if it is still the one attached)."""
        with self._lock:
            if self._counts is counts:
                self._counts, self._routes, self._targets = None, (), ()

    def describe(self) -> Iterable[GaugeMetricFamily]:
        """The two families, without reading the store (at registration)."""
        return self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Both gauges as the store has them now; without samples while the store fails or none is
        attached (as a labelled gauge nobody has set)."""
        families = self._families()
        with self._lock:
            counts, routes, targets = self._counts, self._routes, self._targets
        if counts is not None:
            self._count(counts, families, dict.fromkeys(routes, 0), dict.fromkeys(targets, 0))
        yield from families

    def _count(
        self,
        counts: StateCounts,
        families: tuple[GaugeMetricFamily, GaugeMetricFamily],
        open_letters: dict[str, int],
        parked_keys: dict[str, int],
    ) -> None:
        try:
            open_letters.update(counts.open_letters_by_route())
            parked_keys.update(counts.parked_keys_by_target())
        except Exception as error:  # a scrape must not fail because the store is away
            if not self._failing:
                log.warning("router_deadletters_open and router_parked_keys left out of /metrics: %s", error)
            self._failing = True
            return
        self._failing = False
        deadletters_open, parked = families
        for route, count in sorted(open_letters.items()):
            deadletters_open.add_metric([route], count)
        for target, count in sorted(parked_keys.items()):
            parked.add_metric([target], count)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "router_deadletters_open",
                "Dead letters waiting for an operator (status dead or parked).",
                labels=["route"],
            ),
            GaugeMetricFamily(
                "router_parked_keys",
                "Sequence keys held at a target behind a dead letter.",
                labels=["target"],
            ),
        )


STATE_GAUGES = StateGauges()
REGISTRY.register(STATE_GAUGES)


def render_latest() -> tuple[bytes, str]:
    """The scrape body in the Prometheus text format, and its content type, for ``GET /metrics``."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
