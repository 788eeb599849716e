"""Stage workers: the transform worker (ingress queues) and the delivery worker (partition queues).

Each worker runs in its own thread with its own broker connection. A message is acknowledged only
after everything it caused is safe: the transform worker acks an ingress chunk after its events were
confirmed on the delivery queues and its failures stored as dead letters; the delivery worker acks a
partition message after each of its events was delivered or dead-lettered. Anything unacknowledged
when a process dies or drains returns to its queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kombu.message import Message

from connectors.http_target import DeliveryOutcome, HttpTarget, batch_idempotency_key
from deadletter.store import NewDeadLetter, Store
from ops import metrics
from router.broker import BrokerSettings, Publisher, Topology, connect, decode_body
from router.consumer import BufferedConsumer, run_reconnecting
from router.pipeline import RoutePipeline
from transforms.render import PayloadRenderer

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 0.25


class TransformWorker:
    """Maps ingress chunks of the given routes into canonical events on the delivery queues."""

    def __init__(
        self,
        broker: BrokerSettings,
        pipelines: Mapping[str, RoutePipeline],
        store: Store,
        stop: threading.Event,
        *,
        prefetch: int = 4,
    ) -> None:
        self._broker = broker
        self._topology = Topology(broker)
        self._pipelines = pipelines
        self._store = store
        self._stop = stop
        self._prefetch = prefetch

    def run(self) -> None:
        run_reconnecting("transform worker", self._session, self._stop)

    def _session(self) -> None:
        with connect(self._broker) as connection:
            publisher = Publisher(connection, self._topology)
            queues = [self._topology.ingress_queue(route) for route in self._pipelines]
            consumer = BufferedConsumer(connection, queues, self._prefetch)
            try:
                while not self._stop.is_set():
                    for message in consumer.fetch(FETCH_TIMEOUT):
                        self.handle(message, publisher)
            finally:
                consumer.close()

    def handle(self, message: Message, publisher: Publisher) -> None:
        """Transform one chunk, publish its events, store its failures, then acknowledge it."""
        body = decode_body(message.body)
        route = body.get("route", "?")
        pipeline = self._pipelines.get(route)
        if pipeline is None:
            self._store.add_dead_letters(
                [NewDeadLetter(route=route, stage="transform", reason="unknown_route",
                               detail=f"no route named {route!r} in this configuration", payload=body)]
            )
            message.ack()
            return
        metrics.MESSAGES_RECEIVED.labels(route=route).inc()
        result = pipeline.transform(body)
        for (target, partition), events in result.batches.items():
            publisher.publish(
                self._topology.delivery_queue(target, partition),
                {"route": route, "target": target, "partition": partition, "events": events},
            )
            metrics.EVENTS_ROUTED.labels(route=route, target=target).inc(len(events))
        if result.failures:
            self._store.add_dead_letters(
                [
                    NewDeadLetter(
                        route=route,
                        stage="transform",
                        reason=failure.reason,
                        detail=failure.detail,
                        payload=failure.payload,
                        source_ref=failure.source_ref,
                        event_id=failure.event_id,
                    )
                    for failure in result.failures
                ]
            )
            for failure in result.failures:
                metrics.DEADLETTERS.labels(route=route, stage="transform", reason=failure.reason).inc()
            metrics.DEADLETTERS_OPEN.labels(route=route).set(self._store.count_open(route))
        metrics.EVENTS_TRANSFORMED.labels(route=route).inc(result.events)
        message.ack()


@dataclass(frozen=True)
class InboundBatch:
    """A partition message with its decoded events and when it arrived (for ``max_wait``)."""

    message: Message
    events: list[dict[str, Any]]
    received: float

    @classmethod
    def of(cls, message: Message) -> InboundBatch:
        return cls(message, decode_body(message.body)["events"], time.monotonic())


@dataclass(frozen=True)
class DeliverySettings:
    """How a target takes events: partitions to consume and micro-batch limits."""

    target: str
    partitions: int
    batch_max_events: int | None
    batch_max_wait: float
    prefetch: int = 4


def _lag_seconds(event: Mapping[str, Any], now: datetime) -> float | None:
    try:
        occurred = datetime.fromisoformat(event["occurred_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return max((now - occurred).total_seconds(), 0.0)


class DeliveryWorker:
    """Delivers a target's partition queues in order, one request per event or in micro-batches."""

    def __init__(
        self,
        broker: BrokerSettings,
        settings: DeliverySettings,
        target: HttpTarget,
        renderer: PayloadRenderer,
        store: Store,
        stop: threading.Event,
    ) -> None:
        self._broker = broker
        self._topology = Topology(broker)
        self.settings = settings
        self._target = target
        self._renderer = renderer
        self._store = store
        self._stop = stop

    def run(self) -> None:
        run_reconnecting(f"delivery worker for {self.settings.target}", self._session, self._stop)

    def _session(self) -> None:
        settings = self.settings
        with connect(self._broker) as connection:
            queues = self._topology.delivery_queues(settings.target, settings.partitions)
            consumer = BufferedConsumer(connection, queues, settings.prefetch)
            pending: list[InboundBatch] = []
            try:
                while not self._stop.is_set():
                    timeout = FETCH_TIMEOUT if not pending else 0.01
                    pending.extend(InboundBatch.of(message) for message in consumer.fetch(timeout))
                    if pending and self._should_flush(pending):
                        pending = self.deliver_messages(pending)
            finally:
                consumer.close()

    def _should_flush(self, pending: Sequence[InboundBatch]) -> bool:
        limit = self.settings.batch_max_events
        if limit is None:
            return True
        count = sum(len(item.events) for item in pending)
        return count >= limit or time.monotonic() - pending[0].received >= self.settings.batch_max_wait

    def deliver_messages(self, pending: Sequence[InboundBatch]) -> list[InboundBatch]:
        """Deliver all events of ``pending`` in order; ack each message once all its events are done.

        Returns the messages left unacknowledged because a drain interrupted delivery; they return
        to their queue when the consumer closes.
        """
        events: list[dict[str, Any]] = []
        ends: list[int] = []
        for item in pending:
            events.extend(item.events)
            ends.append(len(events))
        done = self._deliver_events(events)
        unacked: list[InboundBatch] = []
        for item, end in zip(pending, ends, strict=True):
            if end <= done:
                item.message.ack()
            else:
                unacked.append(item)
        return unacked

    def _deliver_events(self, events: Sequence[dict[str, Any]]) -> int:
        """Deliver events in order; returns how many were resolved before an interruption."""
        size = self.settings.batch_max_events or 1
        done = 0
        while done < len(events):
            group = events[done : done + size]
            if not self._deliver_group(group):
                return done
            done += len(group)
        return done

    def _deliver_group(self, group: Sequence[dict[str, Any]]) -> bool:
        """Deliver one request's worth of events; False when interrupted by a drain."""
        as_batch = self.settings.batch_max_events is not None
        payload, content_type = self._renderer.render(group, as_batch)
        key = batch_idempotency_key([e["event_id"] for e in group]) if as_batch else group[0]["event_id"]
        started = time.monotonic()
        result = self._target.deliver(payload, content_type, key, stop=self._stop)
        target = self.settings.target
        metrics.DELIVERY_SECONDS.labels(target=target).observe(time.monotonic() - started)
        if result.outcome is DeliveryOutcome.interrupted:
            return False
        if result.outcome is DeliveryOutcome.delivered:
            now = datetime.now(UTC)
            for event in group:
                metrics.EVENTS_DELIVERED.labels(route=event["source"]["route"], target=target).inc()
                lag = _lag_seconds(event, now)
                if lag is not None:
                    metrics.EVENT_LAG.labels(target=target).observe(lag)
            return True
        if result.outcome is DeliveryOutcome.permanent and len(group) > 1:
            # One bad event must not sink its neighbours: retry the batch one event at a time so
            # only the events the target really refuses are dead-lettered.
            return all(self._deliver_single(event) for event in group)
        self._dead_letter(group, result.reason, result.detail, result.attempts)
        return True

    def _deliver_single(self, event: dict[str, Any]) -> bool:
        payload, content_type = self._renderer.render([event], True)
        result = self._target.deliver(payload, content_type, event["event_id"], stop=self._stop)
        if result.outcome is DeliveryOutcome.interrupted:
            return False
        if result.outcome is DeliveryOutcome.delivered:
            metrics.EVENTS_DELIVERED.labels(route=event["source"]["route"], target=self.settings.target).inc()
        else:
            self._dead_letter([event], result.reason, result.detail, result.attempts)
        return True

    def _dead_letter(self, events: Sequence[dict[str, Any]], reason: str, detail: str, attempts: int) -> None:
        target = self.settings.target
        self._store.add_dead_letters(
            [
                NewDeadLetter(
                    route=event["source"]["route"],
                    stage="delivery",
                    target=target,
                    reason=reason,
                    detail=detail,
                    payload=event,
                    source_ref=event["source"],
                    event_id=event["event_id"],
                    sequence_key=event.get("sequence_key"),
                    attempts=attempts,
                )
                for event in events
            ]
        )
        routes = {event["source"]["route"] for event in events}
        for event in events:
            metrics.DEADLETTERS.labels(route=event["source"]["route"], stage="delivery", reason=reason).inc()
        for route in routes:
            metrics.DEADLETTERS_OPEN.labels(route=route).set(self._store.count_open(route))
        log.error(
            "%d event(s) dead-lettered at %s: %s",
            len(events),
            target,
            detail,
            extra={"target": target, "reason": reason},
        )
