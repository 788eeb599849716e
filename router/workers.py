"""Stage workers: the transform worker (ingress queues) and the delivery worker (partition queues).

Each worker runs in its own thread with its own broker connection. A message is acknowledged only
after everything it caused is safe: the transform worker acks an ingress chunk after its events were
confirmed on the delivery queues and its failures stored as dead letters; the delivery worker acks a
partition message after each of its events was delivered, skipped (already delivered, stale snapshot),
dead-lettered or parked. Anything unacknowledged when a process dies or drains returns to its queue.

Delivery rules per target: an event recorded as delivered is not sent again (effectively-once) unless a
history replay re-sends it; a stock.snapshot older than the newest applied for its key is skipped,
replayed or not; a key with an open dead letter is parked (later events wait as ``parked`` letters)
until the letter is replayed or discarded, when the worker releases the key's parked events in order.

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
from datetime import UTC, datetime, timedelta
from typing import Any

from kombu.message import Message

from connectors.delivery import DeliveryOutcome, DeliveryResult, DeliveryTarget, batch_idempotency_key
from deadletter import DeadLetter, NewDeadLetter
from ops import metrics, tracing
from router.broker import BrokerSettings, Publisher, Topology, connect, decode_body, retry_budget
from router.consumer import BufferedConsumer, run_reconnecting
from router.partitions import ASSIGNMENT_TTL, PartitionAssignment
from router.pipeline import RoutePipeline, TransformResult, check_chunk, chunk_failures
from state import DeliveryState, HeldLease, Store, lease_holder, occurred_at_of
from transforms.edi import EDI_FORMATS
from transforms.lookups import Lookup, LookupTableError
from transforms.render import PayloadRenderer, RenderError

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 0.25
HOUSEKEEPING_TICK = 0.25
"""Longest wait between looks at the housekeeping (parked keys, journal) of a target."""
MALFORMED_MESSAGE = "malformed_message"
"""Dead-letter reason of a whole queue message the router cannot read: kept to inspect, not to replay."""
# Set by `router replay` on re-sent journal events: they bypass the ledger, which would otherwise refuse
# exactly the events a restored target needs again. They do not bypass the stale guard: a replayed
# snapshot older than one applied since (live traffic goes on during a replay) would roll stock back.
REPLAY_HEADER = "x-router-replay"
RELEASE_ACTOR = "router"
PRUNE_INTERVAL = 300.0
RELEASE_LEASE_TTL = 30.0
"""Seconds a parked-key release lease lasts unless renewed (every third of it while the key is released):
a process that crashed mid-release holds the key this long at most."""
SNAPSHOT_TYPE = "stock.snapshot"


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
            publisher = Publisher(connection, self._topology)
            queues = [self._topology.ingress_queue(route) for route in self._pipelines]
            consumer = BufferedConsumer(connection, queues, self._prefetch)
            try:
                while not self._stop.is_set():
                    for message in consumer.fetch(FETCH_TIMEOUT):
                        with tracing.process_span(message):
                            self.handle(message, publisher)
                    self.refresh_lookups()
            finally:
                consumer.close()

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

    def handle(self, message: Message, publisher: Publisher) -> None:
        """Transform one chunk, publish its events, store its failures, then acknowledge it.

        When the store cannot take the failures the message stays unacknowledged and comes back (the
        events it published again are recognised as delivered by the targets' ledger).
        """
        try:
            body = check_chunk(decode_body(message.body))
        except ValueError as error:
            detail = f"ingress message is not a chunk of records: {error}"
            self._reject(message, "?", MALFORMED_MESSAGE, detail)
            return
        route = body["route"]
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
            log.exception("transform of %s failed as a whole", body["message_id"], extra={"route": route})
            edi = pipeline.mapping.format in EDI_FORMATS
            result = TransformResult(failures=chunk_failures(route, body, error, edi=edi))
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
            reasons = Counter(failure.reason for failure in result.failures)
            log.warning(
                "%d record(s) of %s dead-lettered (%s); first: %s",
                len(result.failures),
                body.get("message_id"),
                ", ".join(f"{reason}: {count}" for reason, count in sorted(reasons.items())),
                result.failures[0].detail,
                extra={"route": route, "reason": result.failures[0].reason},
            )
        metrics.EVENTS_TRANSFORMED.labels(route=route).inc(result.events)
        message.ack()

    def _reject(self, message: Message, route: str, reason: str, detail: str) -> None:
        """Keep a whole ingress message that cannot be handled as a dead letter, then acknowledge it."""
        letter = NewDeadLetter(
            route=route, stage="transform", reason=reason, detail=detail, payload=_raw_text(message)
        )
        self._store.add_dead_letters([letter])
        metrics.DEADLETTERS.labels(route=route, stage="transform", reason=reason).inc()
        log.error("ingress message dead-lettered (%s): %s", reason, detail, extra={"route": route})
        message.ack()


def _raw_text(message: Message) -> Any:
    """A message body as text, for a dead letter an operator can read."""
    return message.body.decode("utf-8", "replace") if isinstance(message.body, bytes) else message.body


@dataclass(frozen=True)
class InboundBatch:
    """A partition message with its decoded events, when it arrived (for ``max_wait``), a moment before
    the broker sent it (its consumer timeout runs from then), and whether it is a history replay."""

    message: Message
    events: list[dict[str, Any]]
    received: float
    held_since: float
    replay: bool = False

    @classmethod
    def of(cls, message: Message, held_since: float) -> InboundBatch:
        """Decode a partition message; raises ValueError when it is not a list of routed events."""
        replay = bool((message.headers or {}).get(REPLAY_HEADER))
        events = decode_body(message.body)["events"]
        for event in events:
            if not isinstance(event.get("event_id"), str) or not isinstance(event["source"]["route"], str):
                raise ValueError("an event lacks its event_id or source route")
        return cls(message, events, time.monotonic(), held_since, replay)


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
    """One pass over a batch: what the store said about it and the decisions taken so far."""

    state: DeliveryState
    deadline: float | None = None
    stop: threading.Event | None = None
    parked: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0

    def verdict(self, event: Mapping[str, Any], replay: bool) -> str:
        """send, skip (delivered before, or already lettered here), park, or stale."""
        state = self.state
        event_id, key = event["event_id"], event.get("sequence_key")
        if event_id in state.delivered and not replay:
            self.duplicates += 1
            return "skip"
        if event_id in state.lettered:
            return "skip"
        if key is not None and key in state.blocked:
            return "park"
        occurred = occurred_at_of(event)
        if event.get("type") == SNAPSHOT_TYPE and key is not None and occurred is not None:
            newest = state.snapshot_marks.get(key)
            if newest is not None and occurred < newest:
                return "stale"
            if newest is None or occurred > newest:
                state.snapshot_marks[key] = occurred
        # A re-ingested copy later in the same batch is a duplicate of this one.
        state.delivered.add(event_id)
        return "send"


@dataclass
class _Recording:
    events: Sequence[Mapping[str, Any]]
    done: bool = False
    error: Exception | None = None


class GroupedLedger:
    """Records what a target accepted for all its partition threads, in shared transactions.

    A partition thread records each request's events once the target accepted them, before it sends
    the next request (so a crash re-sends at most the one request per partition that was accepted and
    not yet recorded). The first thread finding nobody writing writes everything recorded so far, by
    every thread, in one transaction; the others wait for it, so one commit's flush to disk serves
    many requests instead of each request waiting for its own.
    """

    def __init__(self, store: Store, target: str) -> None:
        self._store = store
        self._target = target
        self._changed = threading.Condition()
        self._queued: list[_Recording] = []
        self._writing = False

    def record(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Return once ``events`` are stored; raise what the store raised for them."""
        mine = _Recording(events)
        with self._changed:
            self._queued.append(mine)
        while not mine.done:
            with self._changed:
                while self._writing and not mine.done:
                    self._changed.wait()
                if mine.done:
                    break
                self._writing = True
                group, self._queued = self._queued, []
            self._write(group)
        if mine.error is not None:
            raise mine.error

    def _write(self, group: list[_Recording]) -> None:
        error: Exception | None = None
        try:
            self._store.record_deliveries(self._target, [event for item in group for event in item.events])
        except Exception as failure:  # each waiter whose events were in the group gets the failure
            error = failure
        with self._changed:
            for item in group:
                item.done, item.error = True, error
            self._writing = False
            self._changed.notify_all()


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
        self._holder = lease_holder()
        self._retry_budget = retry_budget(broker.consumer_timeout, target.settings.timeout)
        self._in_flight = threading.BoundedSemaphore(settings.in_flight_limit)
        self._ledger = GroupedLedger(store, settings.target)
        self._next_release = 0.0
        self._next_prune = 0.0
        self._traces = tracing.EventContexts()
        self.assignment = PartitionAssignment(
            store,
            settings.target,
            settings.partitions,
            self._start_partition,
            stop,
            holder=self._holder,
            ttl=settings.assignment_ttl,
        )

    def run(self) -> None:
        """Consume the partitions this process holds until the drain, doing the target's housekeeping
        (parked-key release, journal pruning) in this thread."""
        with self.assignment:
            while not self._stop.is_set():
                self.housekeeping()
                self._stop.wait(min(self.settings.release_interval, HOUSEKEEPING_TICK))

    def _start_partition(self, partition: int, cancel: threading.Event) -> PartitionConsumer:
        consumer = PartitionConsumer(self, partition, cancel)
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
                    if pending and self._should_flush(pending):
                        pending = self.deliver_messages(pending, cancel)
                if pending and not cancel.is_set():
                    self.deliver_messages(pending, cancel)
            finally:
                consumer.close()

    def _inbound(self, message: Message, held_since: float) -> InboundBatch | None:
        """The message's events; a message that is not a batch of events becomes a dead letter (acked)."""
        try:
            return InboundBatch.of(message, held_since)
        except (ValueError, KeyError, TypeError) as error:
            target = self.settings.target
            detail = f"partition message for {target} is not a batch of events: {error!r}"
            letter = NewDeadLetter(
                route="?",
                stage="delivery",
                target=target,
                reason=MALFORMED_MESSAGE,
                detail=detail,
                payload=_raw_text(message),
            )
            self._store.add_dead_letters([letter])
            metrics.DEADLETTERS.labels(route="?", stage="delivery", reason=MALFORMED_MESSAGE).inc()
            log.error("%s", detail, extra={"target": target, "reason": MALFORMED_MESSAGE})
            message.ack()
            return None

    def _should_flush(self, pending: Sequence[InboundBatch]) -> bool:
        limit = self.settings.batch_max_events
        if limit is None:
            return True
        count = sum(len(item.events) for item in pending)
        return count >= limit or time.monotonic() - pending[0].received >= self.settings.batch_max_wait

    def housekeeping(self) -> None:
        """When due: release keys whose dead letter was resolved, and prune the journal."""
        now = time.monotonic()
        if now >= self._next_release:
            self.release_parked()
            self._next_release = time.monotonic() + self.settings.release_interval
        if now >= self._next_prune:
            cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.journal_retention)
            pruned = self._store.prune_history(cutoff)
            if pruned:
                log.info("pruned %d journal and webhook-id rows older than %s", pruned, cutoff.isoformat())
            self._next_prune = now + PRUNE_INTERVAL

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
        run = _BatchRun(self._store.delivery_state(target, [event for event, _ in events]), deadline, stop)
        size = self.settings.batch_max_events or 1
        group: list[dict[str, Any]] = []
        group_start = 0
        for index, (event, replay) in enumerate(events):
            verdict = run.verdict(event, replay)
            if verdict == "park":
                run.parked.append(event)
            elif verdict == "stale":
                metrics.EVENTS_STALE.labels(target=target).inc()
            elif verdict == "send":
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
        if run.duplicates:
            metrics.EVENTS_DUPLICATE.labels(target=target).inc(run.duplicates)
            log.info("%d event(s) already delivered to %s were not sent again", run.duplicates, target)
        return len(events)

    def _flush(self, run: _BatchRun, group: list[dict[str, Any]]) -> bool:
        """Store the parking decided so far, then deliver ``group``; False when a drain interrupted it."""
        self._park(run)
        return self._deliver_group(run, group)

    def _park(self, run: _BatchRun) -> None:
        if not run.parked:
            return
        target = self.settings.target
        self._store.add_dead_letters(
            [self._letter(event, "parked", _parked_detail(event, target)) for event in run.parked]
        )
        log.warning(
            "%d event(s) parked at %s behind an open dead letter of their key",
            len(run.parked),
            target,
            extra={"target": target, "reason": "parked"},
        )
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
        if result.outcome is DeliveryOutcome.permanent and len(group) > 1:
            # One bad event must not sink its neighbours: retry the batch one event at a time so
            # only the events the target really refuses are dead-lettered.
            for event in group:
                if event.get("sequence_key") in run.state.blocked:
                    run.parked.append(event)
                    continue
                single = self._send_in_time(run, [event])
                if single.outcome is DeliveryOutcome.interrupted:
                    return False
                if single.outcome is DeliveryOutcome.delivered:
                    self._delivered([event])
                else:
                    self._dead_letter(run, [event], single)
            self._park(run)
            return True
        self._dead_letter(run, group, result)
        return True

    def _delivered(self, events: Sequence[dict[str, Any]]) -> None:
        self._ledger.record(events)
        self._count_delivered(events)

    def _count_delivered(self, events: Sequence[Mapping[str, Any]]) -> None:
        target = self.settings.target
        now = datetime.now(UTC)
        for event in events:
            metrics.EVENTS_DELIVERED.labels(route=event["source"]["route"], target=target).inc()
            lag = _lag_seconds(event, now)
            if lag is not None:
                metrics.EVENT_LAG.labels(target=target).observe(lag)

    def _letter(self, event: Mapping[str, Any], reason: str, detail: str, attempts: int = 0) -> NewDeadLetter:
        return NewDeadLetter(
            route=event["source"]["route"],
            stage="delivery",
            target=self.settings.target,
            reason=reason,
            detail=detail,
            payload=event,
            source_ref=event["source"],
            event_id=event["event_id"],
            sequence_key=event.get("sequence_key"),
            attempts=attempts,
            status="parked" if reason == "parked" else "dead",
        )

    def _dead_letter(self, run: _BatchRun, events: Sequence[dict[str, Any]], result: DeliveryResult) -> None:
        """Dead-letter the first event of each key; its later events in ``events`` park behind it."""
        target = self.settings.target
        letters = []
        for event in events:
            key = event.get("sequence_key")
            if key is not None and key in run.state.blocked:
                letters.append(self._letter(event, "parked", _parked_detail(event, target)))
                continue
            letters.append(self._letter(event, result.reason, result.detail, result.attempts))
            metrics.DEADLETTERS.labels(
                route=event["source"]["route"], stage="delivery", reason=result.reason
            ).inc()
            if key is not None:
                run.state.blocked.add(key)
        self._store.add_dead_letters(letters)
        log.error(
            "%d event(s) dead-lettered at %s: %s",
            len(events),
            target,
            result.detail,
            extra={"target": target, "reason": result.reason},
        )

    def release_parked(self) -> None:
        """Deliver, in order, the parked events of every key whose dead letter was replayed or discarded."""
        target = self.settings.target
        for key in self._store.releasable_keys(target):
            if self._stop.is_set():
                return
            self._release_key(key)

    def _release_key(self, key: str) -> None:
        """Release one key under a lease, so two processes never send the same parked event.

        The lease is renewed in the background while the key's events go out; when it is lost (another
        process may have the key now) or the worker drains, the release stops before the next request,
        and a retry in progress ends at once. Parked events go in the target's micro-batches; a batch the
        target refuses is retried one event at a time, so only the event it really refuses becomes the
        key's dead letter again.
        """
        target = self.settings.target
        lease = HeldLease.take(
            self._store, f"release:{target}", key, self._holder, self.settings.lease_ttl, stop=self._stop
        )
        if lease is None:
            return
        size = self.settings.batch_max_events or 1
        released: list[dict[str, Any]] = []
        with lease:
            try:
                while lease.held:
                    letters = self._store.releasable_letters(target, key, limit=max(size, 100))
                    if not letters:
                        return
                    for start in range(0, len(letters), size):
                        group = letters[start : start + size]
                        if not lease.held or not self._release_group(group, released, lease.cancel):
                            return
            finally:
                if released:
                    log.info("released %d parked event(s) of one key at %s", len(released), target)

    def _release_group(
        self, letters: Sequence[DeadLetter], released: list[dict[str, Any]], stop: threading.Event
    ) -> bool:
        """Send parked letters as one request; False when the key must stop (refused again, the lease
        lost, or a drain)."""
        result = self._send([letter.payload for letter in letters], stop)
        if result.outcome is DeliveryOutcome.delivered:
            target = self.settings.target
            for letter in letters:
                self._store.complete_release(letter.id, target, letter.payload, actor=RELEASE_ACTOR)
                released.append(letter.payload)
            self._count_delivered([letter.payload for letter in letters])
            return True
        if result.outcome is DeliveryOutcome.permanent and len(letters) > 1:
            return all(self._release_group([letter], released, stop) for letter in letters)
        if result.outcome is not DeliveryOutcome.interrupted:
            self._fail_release(letters[0], result)
        return False

    def _fail_release(self, letter: DeadLetter, result: DeliveryResult) -> None:
        """A released event failed again: it becomes the key's dead letter and the key stays parked."""
        target = self.settings.target
        self._store.fail_release(
            letter.id,
            reason=result.reason,
            detail=result.detail,
            attempts=result.attempts,
            actor=RELEASE_ACTOR,
        )
        metrics.DEADLETTERS.labels(route=letter.route, stage="delivery", reason=result.reason).inc()
        log.error(
            "parked event %s failed again at %s; key stays parked: %s",
            letter.event_id,
            target,
            result.detail,
            extra={"target": target, "reason": result.reason},
        )


def _parked_detail(event: Mapping[str, Any], target: str) -> str:
    return (
        f"waiting at {target} behind an open dead letter of key {event.get('sequence_key')!r}; "
        "replay or discard that letter to release it"
    )


class PartitionConsumer:
    """The thread that consumes one partition of a target for :class:`DeliveryWorker`, reconnecting
    when the broker goes away, until cancelled or handed over."""

    def __init__(self, worker: DeliveryWorker, partition: int, cancel: threading.Event) -> None:
        self.partition = partition
        self._worker = worker
        self._cancel = cancel
        self._handover = threading.Event()
        self._ended = threading.Event()
        """Set once the handover is done: the messages in hand were delivered and the consumer closed."""
        name = f"deliver-{worker.settings.target}-{partition}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        name = f"delivery of {self._worker.settings.target} partition {self.partition}"
        run_reconnecting(name, self._session, self._cancel, until=self._ended.is_set)

    def _session(self) -> None:
        self._worker.consume_partition(self.partition, self._cancel, self._handover)
        if self._handover.is_set():
            self._ended.set()

    def hand_over(self) -> None:
        """Finish the messages in hand, then stop: another process is to take the partition."""
        self._handover.set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
