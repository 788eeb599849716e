"""REST polling source: pulls inventory records from marketplace and SaaS APIs, page after page.

Cursor semantics. Each route keeps one state in the store (JSON under ``rest:<route>``): the cursor
of the page to read next (none: the first page, requested without the cursor parameter) and the ids of
that page's records already published. A poll requests that page, publishes the records not published
yet (a chunk at a time, saving the state as soon as the broker confirmed each chunk), then evaluates
``next``: a new cursor moves the state to that page, with nothing of it published yet. When ``next``
is null (or empty, or the cursor just read) the source stays on that last page: every poll reads it
again and publishes only records that appeared on it since, so records an API appends to its last
page are picked up and an unchanged page publishes nothing. A restart resumes from the stored state;
a change of the route's URL starts again from the first page.

Failures (HTTP, a malformed page, an unconfirmed publish) end the poll and leave the state as it was
last confirmed; the next poll starts from there (how a page is read and retried within a poll is
:mod:`connectors.rest_pages`). Records published twice carry the same event ids, so nothing doubles
downstream.

Record identity: ``record_id`` (JMESPath) picks a record's own id; without it the id is a hash of the
record's canonical JSON, so the same content always has the same id. ``origin`` holds only the URL
without its query, so event ids depend on the route, the system, that URL and the record id alone.
A chunk's message id names its page and first record (``<url>?<param>=<cursor>#<record number>``):
a chunk published again after a failure keeps its id, records appended later get new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx
import jmespath
from jmespath.parser import ParsedResult

from connectors.chunks import ChunkSink, SourceChunk, batched
from connectors.rest_pages import PageReader, PollFailed, PollInterrupted
from connectors.rest_settings import RestPollSettings
from ops import metrics, tracing
from ops.secrets import redact
from state import HeldLease, Store, lease_holder
from transforms.parsers import RawRecord

if TYPE_CHECKING:
    from prometheus_client import Gauge

log = logging.getLogger(__name__)

SYSTEM = "rest"
POLL_LEASE_SCOPE = "poll"
def _compile(expression: str | None) -> ParsedResult | None:
    """The compiled JMESPath of a setting (checked by `router validate`), or None when it is not set."""
    return jmespath.compile(expression) if expression is not None else None


@dataclass(frozen=True)
class PollResult:
    """What one poll did: pages read, records and chunks published, and why it ended.

    ``caught_up`` is True when the poll reached the last page; False when it stopped early (an error,
    a shutdown, or ``max_pages_per_poll``). ``error`` says what failed, as logged.
    """

    pages: int
    records: int
    chunks: int
    caught_up: bool
    error: str | None = None


@dataclass(frozen=True)
class _PageState:
    """Where the route is: the cursor of the page read next, and the ids published from that page."""

    url: str
    cursor: str | None
    published: tuple[str, ...] = ()

    def dumps(self) -> str:
        return json.dumps({"url": self.url, "cursor": self.cursor, "published": list(self.published)})


@dataclass
class _Progress:
    """Counters of one poll, kept when it ends early."""

    pages: int = 0
    records: int = 0
    chunks: int = 0


def _canonical_json(value: Any) -> str:
    # Decimals keep their exact digits, so the same page always hashes the same.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_id(record: Any) -> str:
    """The identity of a record without an id of its own: a hash of its canonical JSON content."""
    return hashlib.sha256(_canonical_json(record).encode("utf-8")).hexdigest()[:32]


def _short(value: Any) -> str:
    text = _canonical_json(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


IdentifiedRecord = tuple[RawRecord, str]
"""A record and its identity (its own id, or its content hash)."""


def _unpublished(identified: list[IdentifiedRecord], published: list[str]) -> list[IdentifiedRecord]:
    """The records whose ids are not published yet, each id once, in page order."""
    seen = set(published)
    fresh: list[IdentifiedRecord] = []
    for record, identity in identified:
        if identity not in seen:
            seen.add(identity)
            fresh.append((record, identity))
    return fresh


def _cursor_text(value: Any) -> str | None:
    """A ``next`` value as a cursor: None at the end, else its text; raises ValueError for other shapes."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"gave {_short(value)}; expected a string, a number or null")


class RestPollSource:
    """Polls one route's REST API and publishes new records as chunks, resuming from the stored cursor."""

    def __init__(
        self, settings: RestPollSettings, sink: ChunkSink, store: Store, *, client: httpx.Client | None = None
    ) -> None:
        self.settings = settings
        self._sink = sink
        self._store = store
        self._pages = PageReader(settings, client)
        self._records = _compile(settings.records)
        self._next = _compile(settings.cursor_next)
        self._record_id = _compile(settings.record_id)
        self._origin_url = str(self._pages.url.copy_with(query=None))
        self._cursor_name = f"rest:{settings.route}"

    def poll_once(self, stop: threading.Event | None = None) -> PollResult:
        """Read pages from the stored cursor until the last one, publishing records not published yet.

        HTTP, page and broker failures are logged and reported in the result, never raised; only a
        failing store raises.
        """
        progress = _Progress()
        try:
            caught_up = self._follow_pages(progress, stop)
        except PollInterrupted:
            caught_up = False
        except PollFailed as failure:
            detail = redact(str(failure))
            route = self.settings.route
            log.error("rest source of route %s: %s", route, detail, extra={"route": route})
            return PollResult(progress.pages, progress.records, progress.chunks, False, detail)
        return PollResult(progress.pages, progress.records, progress.chunks, caught_up)

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; after an error the next poll comes at the poll interval.

        Several router processes may run the same route: a lease in the store lets one poll at a time.
        The poller renews it in the background while it runs; the others stand by, trying to take it
        every poll interval, and take over once it is given up (a drain) or runs out (a crash). A
        poller that loses its lease stops before the next page or chunk, so pages are not fetched twice.
        """
        route = self.settings.route
        up = metrics.SOURCE_UP.labels(route=route)
        holder = lease_holder()
        while not stop.is_set():
            try:
                lease = HeldLease.take(
                    self._store, POLL_LEASE_SCOPE, route, holder, self.settings.lease_ttl, stop=stop
                )
            except Exception:
                up.set(0)
                log.exception("rest source of route %s could not take its poll lease", route)
                lease = None
            if lease is None:
                stop.wait(self.settings.poll)
                continue
            with lease:
                self._poll_while_held(lease, up)

    def _poll_while_held(self, lease: HeldLease, up: Gauge) -> None:
        route = self.settings.route
        while lease.held:
            behind = False
            try:
                result = self.poll_once(lease.cancel)
                up.set(1 if result.error is None else 0)
                # Stopped at max_pages_per_poll with records still coming: go on at once. An API that
                # hands out new cursors on empty pages waits for the next poll instead.
                behind = result.error is None and not result.caught_up and result.records > 0
            except Exception:
                up.set(0)
                log.exception("rest source of route %s failed a poll", route)
            # A server's Retry-After holds even when the poll interval is shorter.
            wait = 0.0 if behind else self.settings.poll
            lease.cancel.wait(max(wait, self._pages.resume_at - time.monotonic()))

    def close(self) -> None:
        """Close the connection pool, unless the client was handed in by the caller."""
        self._pages.close()

    def _follow_pages(self, progress: _Progress, stop: threading.Event | None) -> bool:
        state = self._load_state()
        while progress.pages < self.settings.max_pages_per_poll:
            if stop is not None and stop.is_set():
                return False
            label = self._page_label(state.cursor)
            # A span per page: the root of the trace its records' events follow to the targets.
            with tracing.source_span("poll", self.settings.route, {"url.full": redact(label)}):
                document = self._pages.document(state.cursor, label, stop)
                records = self._records_of(document, label)
                following = self._next_cursor(document, label)
                progress.pages += 1
                identified = list(self._identified(records))
                published = list(state.published)
                fresh = _unpublished(identified, published)
                for number, batch in enumerate(batched(fresh, self.settings.chunk_size), start=1):
                    if stop is not None and stop.is_set():
                        return False  # a drain, or the poll lease lost: another poller may have this page
                    self._publish(label, number, batch)
                    published += [identity for _, identity in batch]
                    state = self._save(state, _PageState(state.url, state.cursor, tuple(published)))
                    progress.records += len(batch)
                    progress.chunks += 1
                if following is None or following == state.cursor:
                    # Staying on the last page: remember exactly its ids, so the state never outgrows a page.
                    page_ids = tuple(dict.fromkeys(identity for _, identity in identified))
                    self._save(state, _PageState(state.url, state.cursor, page_ids))
                    return True
                state = self._save(state, _PageState(state.url, following))
        return False

    def _identified(self, records: list[Any]) -> Iterator[IdentifiedRecord]:
        """Each record with its identity; a record lacking its configured id is flagged for a dead letter."""
        for number, data in enumerate(records, start=1):
            if self._record_id is None:
                yield RawRecord(number, None, data), content_id(data)
                continue
            value = self._record_id.search(data)
            if value is None or value == "":
                error = f"record id {self.settings.record_id!r} is missing (null or empty) in record {number}"
                yield RawRecord(number, None, data, error), content_id(data)
            elif isinstance(value, str):
                yield RawRecord(number, None, data), value
            elif isinstance(value, int | Decimal) and not isinstance(value, bool):
                yield RawRecord(number, None, data), str(value)
            else:
                yield RawRecord(number, None, data), _canonical_json(value)

    def _publish(self, label: str, number: int, batch: list[IdentifiedRecord]) -> None:
        first = batch[0][0].number
        chunk = SourceChunk(
            route=self.settings.route,
            system=SYSTEM,
            message_id=f"{label}#{first}",
            origin={"url": self._origin_url},
            records=[record for record, _ in batch],
            chunk=number,
            record_ids=[identity for _, identity in batch],
        )
        try:
            self._sink(chunk)
        except Exception as error:
            raise PollFailed(
                f"broker did not confirm chunk {chunk.message_id} ({len(batch)} records): {error}; "
                "the cursor stays, the next poll publishes the page again"
            ) from error

    def _load_state(self) -> _PageState:
        stored = self._store.get_cursor(self._cursor_name)
        if stored is None:
            return _PageState(self._origin_url, None)
        try:
            document = json.loads(stored)
            state = _PageState(document["url"], document["cursor"], tuple(document["published"]))
            if not isinstance(state.url, str) or not isinstance(state.cursor, str | None):
                raise TypeError("url or cursor is not a string")
            if not all(isinstance(identity, str) for identity in state.published):
                raise TypeError("published holds a non-string id")
        except (ValueError, KeyError, TypeError) as error:
            raise PollFailed(
                f"stored cursor {self._cursor_name!r} is not a REST source state ({error}): {stored[:80]!r}; "
                'expected JSON {"url": ..., "cursor": ..., "published": [...]}'
            ) from None
        if state.url != self._origin_url:
            log.warning(
                "rest source of route %s: url changed from %s to %s; starting from the first page",
                self.settings.route,
                state.url,
                self._origin_url,
                extra={"route": self.settings.route},
            )
            return _PageState(self._origin_url, None)
        return state

    def _save(self, saved: _PageState, state: _PageState) -> _PageState:
        if state != saved:
            self._store.set_cursor(self._cursor_name, state.dumps())
        return state

    def _page_label(self, cursor: str | None) -> str:
        """The page as logs and message ids name it: the URL without its query, plus the cursor."""
        if cursor is None:
            return self._origin_url
        return f"{self._origin_url}?{self.settings.cursor_param}={cursor}"

    def _records_of(self, document: Any, label: str) -> list[Any]:
        found = document if self._records is None else self._records.search(document)
        if isinstance(found, list):
            return found
        where = "the page" if self.settings.records is None else f"records {self.settings.records!r}"
        shape = "nothing" if found is None else _short(found)
        raise PollFailed(f"page {label}: {where} gave {shape}; expected a list of records")

    def _next_cursor(self, document: Any, label: str) -> str | None:
        if self._next is None:
            return None
        try:
            return _cursor_text(self._next.search(document))
        except ValueError as error:
            raise PollFailed(f"page {label}: cursor next {self.settings.cursor_next!r} {error}") from None
