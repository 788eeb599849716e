"""Forgetting history once the retention is over, as two jobs: the delivered-events journal (what
`router replay` re-sends and the ledger deduplicates by) and the accepted webhook ids (what answers a
partner's redelivery with 200 instead of publishing it again)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from state import Store

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 300.0
"""Seconds between two runs of each pruning job."""


def prune_journal(store: Store, retention: float) -> int:
    """Forget deliveries older than ``retention`` seconds (every target's); returns the rows removed."""
    return _prune("journal row(s)", store.prune_journal, retention)


def prune_webhook_ids(store: Store, retention: float) -> int:
    """Forget accepted webhook ids older than ``retention`` seconds; returns the rows removed."""
    return _prune("webhook id(s)", store.prune_webhook_ids, retention)


def _prune(what: str, prune: Callable[[datetime], int], retention: float) -> int:
    cutoff = datetime.now(UTC) - timedelta(seconds=retention)
    pruned = prune(cutoff)
    if pruned:
        log.info("pruned %d %s older than %s", pruned, what, cutoff.isoformat())
    return pruned


class PeriodicJob:
    """A housekeeping job that a loop ticking more often runs at most once every ``interval`` seconds."""

    def __init__(self, interval: float, job: Callable[[], object]) -> None:
        self._interval = interval
        self._job = job
        self._next = 0.0

    def run_if_due(self) -> None:
        if time.monotonic() >= self._next:
            self._job()
            self._next = time.monotonic() + self._interval
