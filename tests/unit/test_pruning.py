"""History is forgotten after the retention by two jobs: the journal, and the accepted webhook ids."""

from __future__ import annotations

from pathlib import Path

from router.pruning import PeriodicJob, prune_journal, prune_webhook_ids
from state import AcceptedWebhook, Store

KEYS = [("partner-stock", "msg_1")]
EVENT = {"event_id": "e1", "sequence_key": "A", "type": "sale", "occurred_at": "2026-11-24T09:00:00+00:00"}


def test_the_journal_and_the_webhook_ids_are_pruned_each_by_its_own_job(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
        store.record_deliveries("erp", [EVENT])
        store.remember_webhooks([AcceptedWebhook("partner-stock", "msg_1", "m-1", "a" * 64)])

        assert prune_journal(store, retention=3600) == 0 and prune_webhook_ids(store, retention=3600) == 0
        assert prune_journal(store, retention=-1) == 1
        assert store.delivery_state("erp", [EVENT]).delivered == set()
        assert store.webhook_bodies(KEYS) == {("partner-stock", "msg_1"): "a" * 64}
        assert prune_webhook_ids(store, retention=-1) == 1
        assert store.webhook_bodies(KEYS) == {}


def test_a_periodic_job_runs_at_once_then_once_per_interval() -> None:
    runs: list[int] = []
    job = PeriodicJob(3600, lambda: runs.append(1))

    job.run_if_due()
    job.run_if_due()

    assert runs == [1]
