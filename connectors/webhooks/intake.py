"""Grouped intake of accepted webhooks: one ledger lookup, one confirm window, one ledger write per group.

Requests enqueue their chunk and await a future. The broker thread takes every request waiting at
that moment as a group, looks their webhook ids up in one query and publishes the new ones with
pipelined confirms; the ledger thread records confirmed groups in one transaction, then settles
their futures, while the broker thread already publishes the next group. Nothing is answered
"accepted" before the broker confirmed it and its id is committed, so after a crash a retry of any
202 finds its id: a failed group fails every request of it and records no id, so each partner's
retry (same webhook-id) is taken in full. A group forms from the requests that arrived while the
previous one was in flight, so an idle receiver adds no delay.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from connectors.chunks import SourceChunk
from state import AcceptedWebhook

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
        self._incoming: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        self._confirmed: queue.SimpleQueue[list[_Pending] | object] = queue.SimpleQueue()
        # Ids the broker confirmed whose ledger rows are not committed yet: a redelivery arriving
        # meanwhile must find them, or it would be published twice.
        self._unrecorded: dict[WebhookKey, str] = {}
        self._unrecorded_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._publish_groups, name="webhook-intake-broker", daemon=True),
            threading.Thread(target=self._record_groups, name="webhook-intake-ledger", daemon=True),
        ]
        self._started = False
        self._start_lock = threading.Lock()

    async def admit(self, chunk: SourceChunk, webhook_id: str, body_sha256: str) -> Admission:
        """Publish ``chunk`` unless its webhook id is known; raises IntakeUnavailable when not accepted."""
        self._ensure_started()
        loop = asyncio.get_running_loop()
        pending = _Pending(chunk, webhook_id, body_sha256, loop, loop.create_future())
        self._incoming.put(pending)
        return await pending.future

    def _ensure_started(self) -> None:
        if not self._started:
            with self._start_lock:
                if not self._started:
                    for thread in self._threads:
                        thread.start()
                    self._started = True

    def close(self, timeout: float = 30.0) -> None:
        """Answer the requests in hand, then stop the intake threads."""
        if self._started:
            self._incoming.put(_STOP)
            for thread in self._threads:
                thread.join(timeout)

    def _publish_groups(self) -> None:
        """The broker stage: take what waits as a group, publish its new ids under one confirm window.

        While the ledger stage commits one group, this one publishes the next.
        """
        stopping = False
        while not stopping:
            group, stopping = _take(self._incoming, self._max_group)
            if not group:
                continue
            try:
                confirmed = self._publish_group(group)
            except Exception:  # a fault here must not leave requests waiting forever
                log.exception("webhook intake failed on a group of %d", len(group))
                confirmed = []
                for item in group:
                    item.outcome = item.outcome or Unavailable.STORE
            waiting = {id(item) for item in confirmed}
            # Known ids and failures are answered now; the published ones once their ledger rows are in.
            _settle([item for item in group if id(item) not in waiting])
            if confirmed:
                self._confirmed.put(confirmed)
        self._confirmed.put(_STOP)

    def _publish_group(self, group: Sequence[_Pending]) -> list[_Pending]:
        """Decide ``group``: known ids get their answer; new ones are published. Returns the published."""
        keys = {item.key for item in group}
        with self._unrecorded_lock:
            # Taken before the query: an id leaves this map only once its ledger row is committed.
            known = {key: self._unrecorded[key] for key in keys if key in self._unrecorded}
        try:
            known.update(self._ledger.webhook_bodies(keys - known.keys()))
        except Exception as error:
            log.warning("webhook intake: state store unavailable for %d requests: %s", len(group), error)
            for item in group:
                item.outcome = Unavailable.STORE
            return []
        first_of: dict[WebhookKey, _Pending] = {}
        for item in group:
            if item.key in known:
                item.outcome = _redelivery(known[item.key], item)
            else:
                # The same id twice in one group is published once; the others wait for its outcome.
                first_of.setdefault(item.key, item)
        published = [item for item in group if item.outcome is None]
        fresh = list(first_of.values())
        if not fresh:
            return []
        try:
            self._publish([item.chunk for item in fresh])
        except Exception as error:
            log.warning("webhook intake: %d requests not accepted, broker unavailable: %s", len(fresh), error)
            for item in published:
                item.outcome = Unavailable.BROKER
            return []
        with self._unrecorded_lock:
            self._unrecorded.update((item.key, item.body_sha256) for item in fresh)
        for item in published:
            first = first_of[item.key]
            item.outcome = Admission.ACCEPTED if item is first else _redelivery(first.body_sha256, item)
        return published

    def _record_groups(self) -> None:
        """The ledger stage: record every confirmed group waiting in one transaction, then answer them."""
        stopping = False
        while not stopping:
            groups, stopping = _take(self._confirmed, self._max_group)
            confirmed = [item for group in groups for item in group]
            accepted = [item for item in confirmed if item.outcome is Admission.ACCEPTED]
            try:
                self._ledger.remember_webhooks(
                    [
                        AcceptedWebhook(
                            item.chunk.route, item.webhook_id, item.chunk.message_id, item.body_sha256
                        )
                        for item in accepted
                    ]
                )
            except Exception:
                # The broker has them, so 202 is true; a redelivery republishes the same event ids,
                # which downstream deduplicates.
                log.exception("webhook intake: %d webhooks published but not recorded as seen", len(accepted))
            with self._unrecorded_lock:
                for item in accepted:
                    self._unrecorded.pop(item.key, None)
            _settle(confirmed)


def _take(source: queue.SimpleQueue[Any], most: int) -> tuple[list[Any], bool]:
    """Block for one item of ``source``, then take what else waits there, up to ``most``.

    Returns the items and whether the stop mark was among them (nothing after it is taken).
    """
    items: list[Any] = []
    first = source.get()
    while first is not _STOP:
        items.append(first)
        if len(items) >= most:
            return items, False
        try:
            first = source.get_nowait()
        except queue.Empty:
            return items, False
    return items, True


def _settle(items: Sequence[_Pending]) -> None:
    """Answer decided requests on their event loops (one wake-up per loop, not per request)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
    for item in items:
        by_loop.setdefault(item.loop, []).append(item)
    for loop, waiting in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, waiting)
        except RuntimeError:  # the loop closed (server stopped): nobody waits for these any more
            log.debug("webhook intake: %d answers for a closed event loop dropped", len(waiting))


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
