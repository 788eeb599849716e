"""The transform worker: ingress chunks of its routes become canonical events on the partition queues.

A chunk is acknowledged only after everything it caused is safe: its events confirmed on the delivery
queues and its failed records stored as dead letters. A message that is not a chunk (or names a route
this configuration lacks) is kept whole as a dead letter and acknowledged, so it never blocks the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack

from kombu.message import Message

from deadletter import NewDeadLetter
from ops import metrics, tracing
from router.broker import BrokerSettings, Topology, connect
from router.confirms import ConfirmWindow, Outgoing
from router.consumer import FETCH_TIMEOUT, BufferedConsumer, run_reconnecting
from router.messages import (
    MALFORMED_MESSAGE,
    MalformedMessage,
    PartitionBatch,
    decode_chunk,
    encode_body,
    readable_body,
)
from router.pipeline import RoutePipeline, TransformResult, chunk_failures
from state import Store
from transforms.edi import EDI_FORMATS
from transforms.lookups import Lookup, LookupTableError

log = logging.getLogger(__name__)


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
        lookups: Sequence[Lookup] = (),
        lookup_refresh: float = 10.0,
    ) -> None:
        self._broker = broker
        self._topology = Topology(broker)
        self._pipelines = pipelines
        self._store = store
        self._stop = stop
        self._prefetch = prefetch
        self._lookups = lookups
        self._lookup_refresh = lookup_refresh
        self._next_lookup_check = time.monotonic() + lookup_refresh

    def run(self) -> None:
        run_reconnecting("transform worker", self._session, self._stop)

    def _session(self) -> None:
        with connect(self._broker) as connection:
            window = ConfirmWindow(self._broker, self._topology)
            queues = [self._topology.ingress_queue(route) for route in self._pipelines]
            consumer = BufferedConsumer(connection, queues, self._prefetch)
            try:
                while not self._stop.is_set():
                    for message in consumer.fetch(FETCH_TIMEOUT):
                        with tracing.process_span(message):
                            self.handle(message, window)
                    self.refresh_lookups()
            finally:
                consumer.close()
                window.close()

    def refresh_lookups(self) -> None:
        """When due, reload the lookup tables whose file changed; a file that no longer loads is reported
        and the table in use stays."""
        if time.monotonic() < self._next_lookup_check:
            return
        self._next_lookup_check = time.monotonic() + self._lookup_refresh
        for lookup in self._lookups:
            try:
                if lookup.refresh():
                    log.info("lookup %s reloaded: %d entries", lookup.name, len(lookup))
            except LookupTableError as error:
                log.error("lookup %s not reloaded; the table in use stays: %s", lookup.name, error)

    def handle(self, message: Message, window: ConfirmWindow) -> None:
        """Transform one chunk, publish its events, store its failures, then acknowledge it.

        The chunk's partition batches are published together and their confirms awaited together: one
        broker round trip per chunk, not one per partition. When a batch is not confirmed, or the store
        cannot take the failures, the message stays unacknowledged and comes back (the events it
        published again are recognised as delivered by the targets' ledger).
        """
        try:
            body = decode_chunk(message.body)
        except MalformedMessage as error:
            detail = f"ingress message is not a chunk of records: {error}"
            self._reject(message, "?", MALFORMED_MESSAGE, detail)
            return
        route = body.route
        pipeline = self._pipelines.get(route)
        if pipeline is None:
            self._reject(message, route, "unknown_route", f"no route named {route!r} in this configuration")
            return
        metrics.MESSAGES_RECEIVED.labels(route=route).inc()
        try:
            result = pipeline.transform(body)
        except Exception as error:
            # Records fail one by one inside the transform; should it still fail as a whole, a redelivery
            # would fail again and hold up the route's queue, so every record becomes a replayable letter.
            log.exception("transform of %s failed as a whole", body.message_id, extra={"route": route})
            edi = pipeline.mapping.format in EDI_FORMATS
            result = TransformResult(failures=chunk_failures(route, body, error, edi=edi))
        self._publish(window, route, result)
        if result.failures:
            self._store.add_dead_letters([failure.letter(route) for failure in result.failures])
            for failure in result.failures:
                metrics.DEADLETTERS.labels(route=route, stage="transform", reason=failure.reason).inc()
            reasons = Counter(failure.reason for failure in result.failures)
            log.warning(
                "%d record(s) of %s dead-lettered (%s); first: %s",
                len(result.failures),
                body.message_id,
                ", ".join(f"{reason}: {count}" for reason, count in sorted(reasons.items())),
                result.failures[0].detail,
                extra={"route": route, "reason": result.failures[0].reason},
            )
        metrics.EVENTS_TRANSFORMED.labels(route=route).inc(result.events)
        message.ack()

    def _publish(self, window: ConfirmWindow, route: str, result: TransformResult) -> None:
        """Every partition batch of a chunk under one confirm window; returns once all were confirmed."""
        outside = tracing.current_context()
        with ExitStack() as spans:
            outgoing = []
            for (target, partition), events in result.batches.items():
                queue = self._topology.delivery_queue(target, partition)
                headers = spans.enter_context(tracing.publish_span(queue.name, None, outside))
                batch = PartitionBatch(target=target, partition=partition, events=events, route=route)
                outgoing.append(Outgoing(queue, encode_body(batch), headers))
            window.publish(outgoing)
        for (target, _), events in result.batches.items():
            metrics.EVENTS_ROUTED.labels(route=route, target=target).inc(len(events))

    def _reject(self, message: Message, route: str, reason: str, detail: str) -> None:
        """Keep a whole ingress message that cannot be handled as a dead letter, then acknowledge it."""
        letter = NewDeadLetter(
            route=route, stage="transform", reason=reason, detail=detail, payload=readable_body(message.body)
        )
        self._store.add_dead_letters([letter])
        metrics.DEADLETTERS.labels(route=route, stage="transform", reason=reason).inc()
        log.error("ingress message dead-lettered (%s): %s", reason, detail, extra={"route": route})
        message.ack()
