"""A REST route's source settings: where to poll, how to authenticate, page and identify records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from connectors.retry import RetryPolicy

POLL_LEASE_TTL = 30.0
"""Seconds a route's poll lease lasts unless renewed (every third of it while the poller runs): a
router that crashed holds its routes this long at most."""


def _default_retry() -> RetryPolicy:
    """In-poll retries of one page: a few, capped; the next poll is the retry after that."""
    return RetryPolicy(attempts=5, initial=1.0, max_delay=30.0, max_age=120.0)


@dataclass(frozen=True)
class RestPollSettings:
    """One REST route's source: where to poll, how to authenticate, page and identify records.

    ``records`` finds the record list in a page (default: the page itself); ``cursor_param`` and
    ``cursor_next`` (both or neither) name the query parameter that selects a page and the JMESPath
    to the next page's cursor; ``record_id`` is the JMESPath to a record's own id. Durations are seconds.
    Built from the route's configuration, which `router validate` checked (router.config).
    """

    route: str
    url: str
    records: str | None
    chunk_size: int
    poll: float = 30.0
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    bearer: str | None = field(default=None, repr=False)
    basic: tuple[str, str] | None = field(default=None, repr=False)
    cursor_param: str | None = None
    cursor_next: str | None = None
    record_id: str | None = None
    timeout: float = 30.0
    max_pages_per_poll: int = 1000
    max_page_bytes: int = 32 * 1024 * 1024
    retry: RetryPolicy = field(default_factory=_default_retry)
    lease_ttl: float = POLL_LEASE_TTL
