"""Parking: a key with an open dead letter at a target waits behind it, and goes on in order once fixed.

When an event is dead-lettered at a target its key is blocked there: the key's later events become
``parked`` letters instead of being sent, so a target never applies them out of order. Once the blocking
letter is replayed or discarded, :class:`ParkedKeyRelease` sends the key's parked events in order, under
a lease so that two processes never send the same one; an event refused again becomes the key's dead
letter and the key stays parked.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from connectors.delivery import DeliveryOutcome, DeliveryResult
from deadletter import DeadLetter, NewDeadLetter
from ops import metrics
from router.sequencing import SequenceGuard
from state import HeldLease, Store

log = logging.getLogger(__name__)

PARKED: Final = "parked"
"""Reason and status of an event waiting behind its key's dead letter."""
RELEASE_ACTOR = "router"
RELEASE_LEASE_TTL = 30.0
"""Seconds a parked-key release lease lasts unless renewed (every third of it while the key is released):
a process that crashed mid-release holds the key this long at most."""

SendEvents = Callable[[Sequence[dict[str, Any]], threading.Event], DeliveryResult]
"""Sends one request's worth of events to the target, retried in place until done or the event is set."""
CountDelivered = Callable[[Sequence[Mapping[str, Any]]], None]


def delivery_letter(
    target: str, event: Mapping[str, Any], reason: str, detail: str, attempts: int = 0
) -> NewDeadLetter:
    """The letter of an event that failed at (or parks at) ``target``."""
    return NewDeadLetter(
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
        status=PARKED if reason == PARKED else "dead",
    )


def _parked_letter(target: str, event: Mapping[str, Any]) -> NewDeadLetter:
    detail = (
        f"waiting at {target} behind an open dead letter of key {event.get('sequence_key')!r}; "
        "replay or discard that letter to release it"
    )
    return delivery_letter(target, event, PARKED, detail)


def park(store: Store, target: str, events: Sequence[Mapping[str, Any]]) -> None:
    """Keep ``events`` as parked letters behind their keys' open dead letters."""
    if not events:
        return
    store.add_dead_letters([_parked_letter(target, event) for event in events])
    log.warning(
        "%d event(s) parked at %s behind an open dead letter of their key",
        len(events),
        target,
        extra={"target": target, "reason": PARKED},
    )


def dead_letter(
    store: Store,
    target: str,
    guard: SequenceGuard,
    events: Sequence[Mapping[str, Any]],
    result: DeliveryResult,
) -> None:
    """Dead-letter the first event of each key with the target's answer; its later events in ``events``
    park behind it, and so do the key's events still to come in this pass (``guard``)."""
    letters = []
    for event in events:
        if guard.is_blocked(event):
            letters.append(_parked_letter(target, event))
            continue
        letters.append(delivery_letter(target, event, result.reason, result.detail, result.attempts))
        route = event["source"]["route"]
        metrics.DEADLETTERS.labels(route=route, stage="delivery", reason=result.reason).inc()
        guard.block(event)
    store.add_dead_letters(letters)
    log.error(
        "%d event(s) dead-lettered at %s: %s",
        len(events),
        target,
        result.detail,
        extra={"target": target, "reason": result.reason},
    )


class ParkedKeyRelease:
    """Releases, in order, the parked events of a target's keys whose dead letter was replayed or
    discarded; called periodically from the delivery worker's housekeeping."""

    def __init__(
        self,
        store: Store,
        target: str,
        *,
        batch_size: int,
        lease_ttl: float,
        holder: str,
        stop: threading.Event,
        send: SendEvents,
        delivered: CountDelivered,
    ) -> None:
        self._store = store
        self._target = target
        self._batch_size = batch_size
        self._lease_ttl = lease_ttl
        self._holder = holder
        self._stop = stop
        self._send = send
        self._delivered = delivered

    def release_all(self) -> None:
        """Deliver, in order, the parked events of every key whose dead letter was replayed or discarded."""
        for key in self._store.releasable_keys(self._target):
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
        target = self._target
        lease = HeldLease.take(
            self._store, f"release:{target}", key, self._holder, self._lease_ttl, stop=self._stop
        )
        if lease is None:
            return
        size = self._batch_size
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
            for letter in letters:
                self._store.complete_release(letter.id, self._target, letter.payload, actor=RELEASE_ACTOR)
                released.append(letter.payload)
            self._delivered([letter.payload for letter in letters])
            return True
        if result.outcome is DeliveryOutcome.permanent and len(letters) > 1:
            return all(self._release_group([letter], released, stop) for letter in letters)
        if result.outcome is not DeliveryOutcome.interrupted:
            self._fail_release(letters[0], result)
        return False

    def _fail_release(self, letter: DeadLetter, result: DeliveryResult) -> None:
        """A released event failed again: it becomes the key's dead letter and the key stays parked."""
        target = self._target
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
