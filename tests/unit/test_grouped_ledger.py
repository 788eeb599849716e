"""The grouped delivery ledger: partition threads recording at once share transactions, and each
returns only once its own events are stored. Real SQLite store."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from router.grouped_ledger import GroupedLedger
from state import Store

THREADS = 16
PER_THREAD = 20


class CountingStore(Store):
    """A real store that counts its ledger transactions and can be told to fail the next one."""

    transactions = 0
    fail_next = False

    def record_deliveries(self, target: str, events: Sequence[Mapping[str, Any]]) -> None:
        self.transactions += 1
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("store away")
        super().record_deliveries(target, events)


def event(thread: int, n: int) -> dict[str, Any]:
    return {
        "event_id": f"{thread}-{n}",
        "type": "sale",
        "sequence_key": f"K{thread}",
        "occurred_at": "2026-11-28T09:00:00+00:00",
        "source": {"route": "pos-sales"},
    }


def test_threads_recording_at_once_share_transactions_and_each_event_is_stored(tmp_path: Path) -> None:
    with CountingStore(f"sqlite:///{tmp_path / 'state.db'}") as store:
        ledger = GroupedLedger(store, "erp")
        start = threading.Barrier(THREADS)

        def record(thread: int) -> None:
            start.wait()
            for n in range(PER_THREAD):
                ledger.record([event(thread, n)])
                # Returned: this event is stored, whoever wrote it.
                assert f"{thread}-{n}" in store.delivery_state("erp", [event(thread, n)]).delivered

        threads = [threading.Thread(target=record, args=(t,)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

        everything = [event(t, n) for t in range(THREADS) for n in range(PER_THREAD)]
        assert len(store.delivery_state("erp", everything).delivered) == THREADS * PER_THREAD
        assert store.transactions < THREADS * PER_THREAD


def test_a_store_failure_reaches_the_caller_whose_events_were_not_stored(tmp_path: Path) -> None:
    with CountingStore(f"sqlite:///{tmp_path / 'state.db'}") as store:
        ledger = GroupedLedger(store, "erp")
        store.fail_next = True
        with pytest.raises(RuntimeError, match="store away"):
            ledger.record([event(0, 0)])
        ledger.record([event(0, 1)])
        assert store.delivery_state("erp", [event(0, 0), event(0, 1)]).delivered == {"0-1"}
