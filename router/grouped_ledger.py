"""The delivered-events ledger as the delivery worker writes it: many partition threads, few commits."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from state import Store


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
