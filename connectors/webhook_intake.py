"""Grouped intake of accepted webhooks: one ledger lookup, one confirm window, one ledger write per group.

Requests enqueue their chunk and await a future; one intake thread takes every request waiting at
that moment as a group, looks their webhook ids up in one query, publishes the new ones with
pipelined confirms, records them in one transaction, then settles the futures. Nothing is
answered "accepted" before the broker confirmed it: a failed group fails every request of it and
records no id, so each partner's retry (same webhook-id) is taken in full. A group forms from the
requests that arrived while the previous one was in flight, so an idle receiver adds no delay.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from connectors.chunks import SourceChunk
from deadletter.store import AcceptedWebhook

log = logging.getLogger(__name__)

MAX_GROUP = 1000
"""Most requests published under one confirm window (RabbitMQ confirms them in a few replies)."""

WebhookKey = tuple[str, str]
"""(route, webhook-id)."""

GroupPublisher = Callable[[Sequence[SourceChunk]], None]
"""Publishes chunks durably; returns once the broker confirmed all of them, raises otherwise."""


class WebhookIdLedger(Protocol):
    """Remembers accepted webhook ids per route, so a redelivery is answered without republishing."""

    def webhook_bodies(self, keys: Collection[WebhookKey]) -> dict[WebhookKey, str]:
        """The SHA-256 (hex) of the body accepted under each known key of ``keys``."""
        ...

    def remember_webhooks(self, accepted: Sequence[AcceptedWebhook]) -> None:
        """Record every id of ``accepted`` (in one transaction); a known id stays as it was."""
        ...


class Admission(enum.Enum):
    """What became of a webhook handed to the intake."""

    ACCEPTED = "accepted"
    """Published and confirmed now: 202."""
    DUPLICATE = "duplicate"
    """This id was accepted before with the same body; nothing was published: 200."""
    CONFLICT = "conflict"
    """This id was accepted before with another body; nothing was published: 409."""


class Unavailable(enum.Enum):
    """Which dependency kept a webhook from being accepted."""

    BROKER = "broker"
    STORE = "state store"


class IntakeUnavailable(Exception):
    """The webhook was not accepted because ``dependency`` failed; nothing of it was recorded."""

    def __init__(self, dependency: Unavailable) -> None:
        super().__init__(f"the {dependency.value} could not be reached")
        self.dependency = dependency


@dataclass
class _Pending:
    chunk: SourceChunk
    webhook_id: str
    body_sha256: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Admission]
    outcome: Admission | Unavailable | None = field(default=None)

    @property
    def key(self) -> WebhookKey:
        return (self.chunk.route, self.webhook_id)


_STOP = object()


class WebhookIntake:
    """The grouping intake; ``admit`` may be awaited from any event loop, the work runs in one thread."""

    def __init__(
        self, publish: GroupPublisher, ledger: WebhookIdLedger, *, max_group: int = MAX_GROUP
    ) -> None:
        self._publish = publish
        self._ledger = ledger
        self._max_group = max_group
        self._queue: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="webhook-intake", daemon=True)
        self._started = False
        self._lock = threading.Lock()

    async def admit(self, chunk: SourceChunk, webhook_id: str, body_sha256: str) -> Admission:
        """Publish ``chunk`` unless its webhook id is known; raises IntakeUnavailable when not accepted."""
        self._ensure_started()
        loop = asyncio.get_running_loop()
        pending = _Pending(chunk, webhook_id, body_sha256, loop, loop.create_future())
        self._queue.put(pending)
        return await pending.future

    def _ensure_started(self) -> None:
        if not self._started:
            with self._lock:
                if not self._started:
                    self._thread.start()
                    self._started = True

    def close(self, timeout: float = 30.0) -> None:
        """Finish the groups in hand, then stop the intake thread."""
        if self._started:
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            group = [first]
            stopping = False
            while len(group) < self._max_group:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stopping = True
                    break
                group.append(more)
            pending = [item for item in group if isinstance(item, _Pending)]
            try:
                self._handle(pending)
            except Exception:  # a fault here must not leave requests waiting forever
                log.exception("webhook intake failed on a group of %d", len(pending))
                for item in pending:
                    item.outcome = item.outcome or Unavailable.STORE
            self._settle(pending)
            if stopping:
                return

    def _handle(self, group: Sequence[_Pending]) -> None:
        """Decide every request of ``group``: look up, publish the new ones, record them (sets outcomes)."""
        try:
            known = self._ledger.webhook_bodies({item.key for item in group})
        except Exception as error:
            log.warning("webhook intake: state store unavailable for %d requests: %s", len(group), error)
            for item in group:
                item.outcome = Unavailable.STORE
            return
        new: dict[WebhookKey, _Pending] = {}
        repeats: list[_Pending] = []
        for item in group:
            if item.key in known:
                item.outcome = (
                    Admission.DUPLICATE if known[item.key] == item.body_sha256 else Admission.CONFLICT
                )
            elif item.key in new:
                # The same id twice in one group: published once, the other answered like a redelivery.
                repeats.append(item)
            else:
                new[item.key] = item
        fresh = list(new.values())
        try:
            self._publish([item.chunk for item in fresh])
        except Exception as error:
            log.warning("webhook intake: %d requests not accepted, broker unavailable: %s", len(fresh), error)
            for item in (*fresh, *repeats):
                item.outcome = Unavailable.BROKER
            return
        for item in fresh:
            item.outcome = Admission.ACCEPTED
        for item in repeats:
            first = new[item.key]
            item.outcome = (
                Admission.DUPLICATE if first.body_sha256 == item.body_sha256 else Admission.CONFLICT
            )
        try:
            self._ledger.remember_webhooks(
                [
                    AcceptedWebhook(
                        item.chunk.route, item.webhook_id, item.chunk.message_id, item.body_sha256
                    )
                    for item in fresh
                ]
            )
        except Exception:
            # The broker has them, so 202 is true; a redelivery republishes the same event ids (deduplicated).
            log.exception("webhook intake: %d webhooks published but not recorded as seen", len(fresh))

    @staticmethod
    def _settle(group: Sequence[_Pending]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        for item in group:
            by_loop.setdefault(item.loop, []).append(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:  # the loop closed (server stopped): nobody waits for these any more
                log.debug("webhook intake: %d answers for a closed event loop dropped", len(items))


def _redelivery(accepted_sha256: str, item: _Pending) -> Admission:
    """A known id's answer: the same body is a redelivery, another body a reused id."""
    return Admission.DUPLICATE if accepted_sha256 == item.body_sha256 else Admission.CONFLICT


def _resolve(items: Sequence[_Pending]) -> None:
    for item in items:
        if item.future.done():
            continue  # the request was cancelled (client gone)
        if isinstance(item.outcome, Admission):
            item.future.set_result(item.outcome)
        else:
            item.future.set_exception(IntakeUnavailable(item.outcome or Unavailable.STORE))
