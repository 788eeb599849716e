"""The delivery worker: a target's partition queues, delivered in order per key, with retries in place.

A partition message is acknowledged only after each of its events was delivered, skipped (already
delivered, stale snapshot: :mod:`router.sequencing`), dead-lettered or parked (:mod:`router.parking`).
Anything unacknowledged when a process dies or drains returns to its queue.

Retrying in place never outlives the broker's patience: the messages in hand are acked before RabbitMQ's
consumer timeout (``broker.consumer_timeout``) would close the channel. No attempt starts later than
:func:`router.broker.retry_budget` after the oldest was sent; an event still failing then, and the
events after it in those messages, become dead letters (reason ``max_age``) and park their keys.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kombu.message import Message

from connectors.delivery import DeliveryOutcome, DeliveryResult, DeliveryTarget, batch_idempotency_key
from deadletter import NewDeadLetter
from ops import metrics, tracing
from router import parking
from router.broker import BrokerSettings, Topology, connect, retry_budget
from router.consumer import FETCH_TIMEOUT, BufferedConsumer
from router.grouped_ledger import GroupedLedger
from router.messages import MALFORMED_MESSAGE, MalformedMessage, readable_body
from router.parking import RELEASE_LEASE_TTL, ParkedKeyRelease
from router.partitions import ASSIGNMENT_TTL, PartitionAssignment, PartitionConsumer
from router.pruning import PRUNE_INTERVAL, PeriodicJob, prune_journal, prune_webhook_ids
from router.sequencing import InboundBatch, SequenceGuard, Verdict, flush_due
from state import Store, lease_holder, occurred_at_of
from transforms.render import PayloadRenderer, RenderError

log = logging.getLogger(__name__)

HOUSEKEEPING_TICK = 0.25
"""Longest wait between looks at the housekeeping (parked keys, journal) of a target."""


@dataclass(frozen=True)
class DeliverySettings:
    """How a target takes events: partitions to consume, requests in flight at once (default: one per
    partition), micro-batch limits, messages each partition's consumer holds (``prefetch``), how often
    parked keys are looked at, how long delivered events stay in the journal (seconds), and how long a
    process's hold on a partition lasts unless renewed (``assignment_ttl``)."""

    target: str
    partitions: int
    batch_max_events: int | None
    batch_max_wait: float
    prefetch: int = 4
    journal_retention: float = 7 * 86400.0
    release_interval: float = 1.0
    lease_ttl: float = RELEASE_LEASE_TTL
    max_in_flight: int | None = None
    assignment_ttl: float = ASSIGNMENT_TTL

    @property
    def in_flight_limit(self) -> int:
        return self.max_in_flight or self.partitions


def _lag_seconds(event: Mapping[str, Any], now: datetime) -> float | None:
    occurred = occurred_at_of(event)
    return None if occurred is None else max((now - occurred).total_seconds(), 0.0)


@dataclass
class _BatchRun:
    """One pass over a batch: the verdicts so far, the events waiting to be parked, and when (``deadline``)
    or on what (``stop``) sending ends."""

    guard: SequenceGuard
    deadline: float | None = None
    stop: threading.Event | None = None
    parked: list[dict[str, Any]] = field(default_factory=list)


class DeliveryWorker:
    """Delivers a target's partition queues: each partition this process holds has its own consumer
    thread, so up to ``max_in_flight`` requests (one event or a micro-batch each) are in flight at once,
    while each partition is delivered in order, one request at a time.

    The delivery methods keep no state between calls but the ``_BatchRun`` they pass along, so the
    partition threads share them safely; the target's client, circuit breaker, store and metrics are
    thread-safe. Which partitions this process holds is decided with the other processes on the same
    configuration (:class:`router.partitions.PartitionAssignment`).
    """

    def __init__(
        self,
        broker: BrokerSettings,
        settings: DeliverySettings,
        target: DeliveryTarget,
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
        holder = lease_holder()
        self._retry_budget = retry_budget(broker.consumer_timeout, target.settings.timeout)
        self._in_flight = threading.BoundedSemaphore(settings.in_flight_limit)
        self._ledger = GroupedLedger(store, settings.target)
        self._traces = tracing.EventContexts()
        self.release = ParkedKeyRelease(
            store,
            settings.target,
            batch_size=settings.batch_max_events or 1,
            lease_ttl=settings.lease_ttl,
            holder=holder,
            stop=stop,
            send=self._send,
            delivered=self._count_delivered,
        )
        retention = settings.journal_retention
        self._housekeeping = [
            PeriodicJob(settings.release_interval, self.release.release_all),
            PeriodicJob(PRUNE_INTERVAL, lambda: prune_journal(store, retention)),
            PeriodicJob(PRUNE_INTERVAL, lambda: prune_webhook_ids(store, retention)),
        ]
        self.assignment = PartitionAssignment(
            store,
            settings.target,
            settings.partitions,
            self._start_partition,
            stop,
            holder=holder,
            ttl=settings.assignment_ttl,
        )

    def run(self) -> None:
        """Consume the partitions this process holds until the drain, doing the target's housekeeping
        (parked-key release, pruning) in this thread."""
        with self.assignment:
            while not self._stop.is_set():
                self.housekeeping()
                self._stop.wait(min(self.settings.release_interval, HOUSEKEEPING_TICK))

    def housekeeping(self) -> None:
        """When due: release keys whose dead letter was resolved, prune the journal and the webhook ids."""
        for job in self._housekeeping:
            job.run_if_due()

    def _start_partition(self, partition: int, cancel: threading.Event) -> PartitionConsumer:
        consumer = PartitionConsumer(self.settings.target, partition, self.consume_partition, cancel)
        consumer.start()
        return consumer

    def consume_partition(self, partition: int, cancel: threading.Event, handover: threading.Event) -> None:
        """One broker session on one partition queue, until ``cancel`` (drain, lost hold: retries are cut
        short and unacknowledged messages return to the queue) or ``handover`` (another process takes the
        partition: the messages in hand are delivered and acked first; what the broker sent beyond them
        returns to the queue when the channel closes)."""
        settings = self.settings
        with connect(self._broker) as connection:
            queue = self._topology.delivery_queue(settings.target, partition)
            consumer = BufferedConsumer(connection, [queue], settings.prefetch)
            pending: list[InboundBatch] = []
            try:
                while not cancel.is_set() and not handover.is_set():
                    timeout = FETCH_TIMEOUT if not pending else 0.01
                    for message in consumer.fetch(timeout):
                        inbound = self._inbound(message, consumer.sent_after)
                        if inbound is not None:
                            self._traces.note(message, inbound.events)
                            pending.append(inbound)
                    if pending and flush_due(pending, settings.batch_max_events, settings.batch_max_wait):
                        pending = self.deliver_messages(pending, cancel)
                if pending and not cancel.is_set():
                    self.deliver_messages(pending, cancel)
            finally:
                consumer.close()

    def _inbound(self, message: Message, held_since: float) -> InboundBatch | None:
        """The message's events; a message that is not a batch of events becomes a dead letter (acked)."""
        try:
            return InboundBatch.of(message, held_since)
        except MalformedMessage as error:
            target = self.settings.target
            detail = f"partition message for {target} is not a batch of events: {error}"
            letter = NewDeadLetter(
                route="?",
                stage="delivery",
                target=target,
                reason=MALFORMED_MESSAGE,
                detail=detail,
                payload=readable_body(message.body),
            )
            self._store.add_dead_letters([letter])
            metrics.DEADLETTERS.labels(route="?", stage="delivery", reason=MALFORMED_MESSAGE).inc()
            log.error("%s", detail, extra={"target": target, "reason": MALFORMED_MESSAGE})
            message.ack()
            return None

    def deliver_messages(
        self, pending: Sequence[InboundBatch], stop: threading.Event | None = None
    ) -> list[InboundBatch]:
        """Deliver all events of ``pending`` in order; ack each message once all its events are resolved.

        Returns the messages left unacknowledged because ``stop`` (default: the drain) interrupted
        delivery; they return to their queue when the consumer closes.
        """
        events: list[tuple[dict[str, Any], bool]] = []
        ends: list[int] = []
        for item in pending:
            events.extend((event, item.replay) for event in item.events)
            ends.append(len(events))
        deadline = None
        if not self._broker.is_memory:
            deadline = min(item.held_since for item in pending) + self._retry_budget
        done = self._deliver_events(events, deadline, stop or self._stop)
        unacked: list[InboundBatch] = []
        for item, end in zip(pending, ends, strict=True):
            if end <= done:
                item.message.ack()
            else:
                unacked.append(item)
        return unacked

    def _deliver_events(
        self, events: Sequence[tuple[dict[str, Any], bool]], deadline: float | None, stop: threading.Event
    ) -> int:
        """Resolve events in order, starting no attempt after ``deadline``; returns how many were resolved
        before ``stop`` interrupted."""
        target = self.settings.target
        state = self._store.delivery_state(target, [event for event, _ in events])
        run = _BatchRun(SequenceGuard(state), deadline, stop)
        size = self.settings.batch_max_events or 1
        group: list[dict[str, Any]] = []
        group_start = 0
        duplicates = 0
        for index, (event, replay) in enumerate(events):
            verdict = run.guard.verdict(event, replay)
            if verdict is Verdict.park:
                run.parked.append(event)
            elif verdict is Verdict.stale:
                metrics.EVENTS_STALE.labels(target=target).inc()
            elif verdict is Verdict.duplicate:
                duplicates += 1
            elif verdict is Verdict.send:
                if not group:
                    group_start = index
                group.append(event)
            if len(group) == size:
                if not self._flush(run, group):
                    return group_start
                group = []
        if group and not self._flush(run, group):
            return group_start
        self._park(run)
        if duplicates:
            metrics.EVENTS_DUPLICATE.labels(target=target).inc(duplicates)
            log.info("%d event(s) already delivered to %s were not sent again", duplicates, target)
        return len(events)

    def _flush(self, run: _BatchRun, group: list[dict[str, Any]]) -> bool:
        """Store the parking decided so far, then deliver ``group``; False when a drain interrupted it."""
        self._park(run)
        return self._deliver_group(run, group)

    def _park(self, run: _BatchRun) -> None:
        parking.park(self._store, self.settings.target, run.parked)
        run.parked = []

    def _send(
        self,
        group: Sequence[dict[str, Any]],
        stop: threading.Event | None = None,
        *,
        deadline: float | None = None,
    ) -> DeliveryResult:
        """One request's worth of events to the target, retried in place until done, ``deadline`` (no
        attempt starts after it) or ``stop`` (default: the worker's drain). It waits for one of the
        target's ``max_in_flight`` slots first, and keeps it while the request is retried."""
        stop = stop or self._stop
        as_batch = self.settings.batch_max_events is not None
        try:
            payload, content_type = self._renderer.render(group, as_batch)
        except RenderError as error:
            # Like a 422 from the target: this event can never be sent as configured; retrying won't help.
            return DeliveryResult(DeliveryOutcome.permanent, 0, None, str(error), "render")
        key = batch_idempotency_key([e["event_id"] for e in group]) if as_batch else group[0]["event_id"]
        while not self._in_flight.acquire(timeout=FETCH_TIMEOUT):
            if stop.is_set():
                return DeliveryResult(DeliveryOutcome.interrupted, 0, None, "drained", "interrupted")
        try:
            started = time.monotonic()
            with tracing.deliver_span(self.settings.target, group, self._traces):
                result = self._target.deliver(payload, content_type, key, stop=stop, deadline=deadline)
        finally:
            self._in_flight.release()
        metrics.DELIVERY_SECONDS.labels(target=self.settings.target).observe(time.monotonic() - started)
        return result

    def _send_in_time(self, run: _BatchRun, group: Sequence[dict[str, Any]]) -> DeliveryResult:
        """``_send`` within the run's deadline; once it passed, nothing is sent: the messages in hand
        were held as long as the broker allows, so their remaining events are given up (dead letters,
        reason ``max_age``) for the operator to replay, rather than the broker closing the channel."""
        if run.deadline is None or time.monotonic() < run.deadline:
            return self._send(group, run.stop, deadline=run.deadline)
        detail = (
            "not sent: the queue message holding it was held as long as the broker's consumer timeout "
            f"({self._broker.consumer_timeout:g}s) allows while earlier events were retried; "
            "replay it once the target answers"
        )
        return DeliveryResult(DeliveryOutcome.retries_exhausted, 0, None, detail, "max_age")

    def _deliver_group(self, run: _BatchRun, group: Sequence[dict[str, Any]]) -> bool:
        """Deliver one request's worth of events; False when interrupted by a drain."""
        result = self._send_in_time(run, group)
        if result.outcome is DeliveryOutcome.interrupted:
            return False
        if result.outcome is DeliveryOutcome.delivered:
            self._delivered(group)
            return True
        target = self.settings.target
        if result.outcome is DeliveryOutcome.permanent and len(group) > 1:
            # One bad event must not sink its neighbours: retry the batch one event at a time so
            # only the events the target really refuses are dead-lettered.
            for event in group:
                if run.guard.is_blocked(event):
                    run.parked.append(event)
                    continue
                single = self._send_in_time(run, [event])
                if single.outcome is DeliveryOutcome.interrupted:
                    return False
                if single.outcome is DeliveryOutcome.delivered:
                    self._delivered([event])
                else:
                    parking.dead_letter(self._store, target, run.guard, [event], single)
            self._park(run)
            return True
        parking.dead_letter(self._store, target, run.guard, group, result)
        return True

    def _delivered(self, events: Sequence[dict[str, Any]]) -> None:
        self._ledger.record(events)
        self._count_delivered(events)

    def _count_delivered(self, events: Sequence[Mapping[str, Any]]) -> None:
        target = self.settings.target
        now = datetime.now(UTC)
        # Each labelled child looked up once per request, not once per event: the lookup cost more
        # than the counting.
        routes = Counter(event["source"]["route"] for event in events)
        for route, count in routes.items():
            metrics.EVENTS_DELIVERED.labels(route=route, target=target).inc(count)
        event_lag = metrics.EVENT_LAG.labels(target=target)
        for event in events:
            lag = _lag_seconds(event, now)
            if lag is not None:
                event_lag.observe(lag)
