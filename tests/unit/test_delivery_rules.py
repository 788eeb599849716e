"""Delivery rules of the delivery worker: effectively-once, parking and release in order, stale snapshots,
history replay, and the circuit breaker. Real parts: the embedded kombu broker, a real HTTP target on
loopback and a real SQLite store (the store's PostgreSQL behaviour is covered in test_store.py).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from canonical.ids import partition_for
from connectors.circuit import CircuitBreaker, CircuitSettings
from connectors.delivery import AttemptKind, AttemptResult, RetryInPlace
from connectors.http_target import DeliveryOutcome, HttpTarget, HttpTargetSettings
from connectors.retry import RetryPolicy
from ops import metrics
from router.broker import BrokerSettings, Topology, open_publisher
from router.delivery_worker import DeliverySettings, DeliveryWorker
from router.messages import REPLAY_HEADER
from router.parking import PARKED, delivery_letter
from router.simulated import SimulatedTarget, TargetBehaviour
from state import Store
from tests.integration.harness import wait_until
from transforms.render import PayloadRenderer

PARTITIONS = 2
ROUTE = "pos-sales"
T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


def sale(key: str, n: int, **fields: Any) -> dict[str, Any]:
    """A canonical-shaped sale event; ``n`` orders the events of a key."""
    return {
        "event_id": f"{key}-{n}",
        "type": "sale",
        "sequence_key": key,
        "sku": key,
        "location": "S001",
        "quantity": "1",
        "occurred_at": (T0 + timedelta(minutes=n)).isoformat(),
        "source": {"route": ROUTE, "system": "pos", "message_id": "m-1", "record": n},
        **fields,
    }


def snapshot(key: str, n: int, minute: int) -> dict[str, Any]:
    return sale(key, n, type="stock.snapshot", occurred_at=(T0 + timedelta(minutes=minute)).isoformat())


@dataclass
class Rig:
    """A running delivery worker for target ``erp`` and what it talks to."""

    target: SimulatedTarget
    store: Store
    broker: BrokerSettings
    worker: DeliveryWorker

    def publish(self, events: list[dict[str, Any]], *, replay: bool = False) -> None:
        """Publish like the transform stage: one message per partition, events in order."""
        topology = Topology(self.broker)
        per_partition: dict[int, list[dict[str, Any]]] = {}
        for event in events:
            per_partition.setdefault(partition_for(event["sequence_key"], PARTITIONS), []).append(event)
        with open_publisher(self.broker, topology) as sink:
            for partition, batch in per_partition.items():
                sink.publish(
                    topology.delivery_queue("erp", partition),
                    {"route": ROUTE, "target": "erp", "partition": partition, "events": batch},
                    headers={REPLAY_HEADER: True} if replay else None,
                )

    def received(self, key: str | None = None) -> list[str]:
        return [e["event_id"] for e in self.target.events if key is None or e["sequence_key"] == key]


def _start(tmp_path: Path, behaviour: TargetBehaviour, batch: int | None) -> Iterator[Rig]:
    broker = BrokerSettings(url="memory://", prefix=f"t{uuid.uuid4().hex[:8]}")
    stop = threading.Event()
    with SimulatedTarget("erp", behaviour) as target, Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
        client = HttpTarget(
            HttpTargetSettings(
                name="erp",
                url=f"{target.url}/inventory",
                timeout=5,
                retry=RetryPolicy(attempts=3, initial=0.01, max_delay=0.05, max_age=10),
            )
        )
        settings = DeliverySettings(
            target="erp",
            partitions=PARTITIONS,
            batch_max_events=batch,
            batch_max_wait=0.05,
            release_interval=0.1,
        )
        worker = DeliveryWorker(broker, settings, client, PayloadRenderer(), store, stop)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            yield Rig(target, store, broker, worker)
        finally:
            stop.set()
            thread.join(10)
            client.close()


@pytest.fixture(params=[None, 10], ids=["single", "batched"])
def rejecting(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Rig, set[str]]]:
    """A rig whose target refuses (422) the event ids in the returned set, one event or micro-batches."""
    refused: set[str] = set()
    behaviour = TargetBehaviour(reject=lambda event: event.get("event_id") in refused)
    for rig in _start(tmp_path, behaviour, request.param):
        yield rig, refused


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from _start(tmp_path, TargetBehaviour(), None)


def _letters(store: Store, status: str) -> list[str]:
    return [letter.event_id or "" for letter in store.list_dead_letters(target="erp", status=status)]  # type: ignore[arg-type]


def _interleaved(keys: list[str], count: int) -> list[dict[str, Any]]:
    return [sale(key, n) for n in range(1, count + 1) for key in keys]


def test_a_redelivered_or_reingested_event_is_not_sent_again(rig: Rig) -> None:
    first = _interleaved(["A", "B"], 3)
    rig.publish(first)
    wait_until(lambda: len(rig.received()) == 6, 10, "6 events at the ERP")

    rig.publish([*first, sale("A", 4)])  # the same file ingested again, plus one new event
    wait_until(lambda: "A-4" in rig.received(), 10, "the new event")
    time.sleep(0.2)

    assert sorted(rig.received()) == sorted([e["event_id"] for e in first] + ["A-4"])
    assert [r.headers["Idempotency-Key"] for r in rig.target.requests] == [
        r.body["event_id"] for r in rig.target.requests
    ]


def test_a_refused_event_parks_its_key_and_replay_after_the_fix_delivers_it_in_order(
    rejecting: tuple[Rig, set[str]],
) -> None:
    rig, refused = rejecting
    refused.add("A-2")
    rig.publish(_interleaved(["A", "B"], 4))
    wait_until(lambda: len(rig.received("B")) == 4, 10, "every B event")
    wait_until(lambda: len(_letters(rig.store, "parked")) == 2, 10, "A-3 and A-4 parked")
    rig.publish([sale("A", 5), sale("B", 5)])
    wait_until(lambda: "B-5" in rig.received(), 10, "B-5")
    wait_until(lambda: len(_letters(rig.store, "parked")) == 3, 10, "A-5 parked too")

    assert rig.received("A") == ["A-1"]
    [dead] = rig.store.list_dead_letters(target="erp", status="dead")
    assert (dead.event_id, dead.reason, dead.sequence_key) == ("A-2", "http_4xx", "A")
    assert "HTTP 422 from erp" in dead.detail and dead.payload["event_id"] == "A-2"
    assert _letters(rig.store, "parked") == ["A-3", "A-4", "A-5"]
    assert rig.store.parked_keys_by_target() == {"erp": 1}

    refused.clear()
    assert rig.store.reopen_parked([dead.id], actor="alice", reason="ERP item master fixed") == [dead.id]
    wait_until(lambda: len(rig.received("A")) == 5, 10, "the parked A events")

    assert rig.received("A") == ["A-1", "A-2", "A-3", "A-4", "A-5"]
    if rig.worker.settings.batch_max_events:
        # Released in the target's micro-batches, not one request per parked event.
        released = ["A-2", "A-3", "A-4", "A-5"]
        assert any([event["event_id"] for event in r.events] == released for r in rig.target.requests)
    # The target answers before the worker records the release: wait for the store, not the target.
    wait_until(lambda: len(_letters(rig.store, "replayed")) == 4, 10, "the released letters recorded")
    assert _letters(rig.store, "replayed") == ["A-2", "A-3", "A-4", "A-5"]
    assert rig.store.count_open() == 0
    rig.publish([sale("A", 6)])
    wait_until(lambda: "A-6" in rig.received(), 10, "A-6 flowing again")
    wait_until(lambda: rig.store.parked_keys_by_target().get("erp", 0) == 0, 5, "no parked key")


def test_discarding_the_dead_letter_releases_the_events_behind_it(rig: Rig) -> None:
    dead_id = rig.store.add_dead_letter(
        route=ROUTE,
        stage="delivery",
        target="erp",
        reason="http_4xx",
        detail="HTTP 422",
        payload=sale("A", 1),
        event_id="A-1",
        sequence_key="A",
    )
    rig.publish([sale("A", 2), sale("A", 3), sale("B", 1)])
    # The parked letters are stored before the rest of the batch goes out: wait for both.
    wait_until(
        lambda: len(_letters(rig.store, "parked")) == 2 and "B-1" in rig.received(),
        10,
        "A-2 and A-3 parked, B-1 delivered",
    )
    assert rig.received() == ["B-1"]

    rig.store.set_status(dead_id, "discarded", actor="bob", reason="test sale, never happened")
    wait_until(lambda: len(rig.received("A")) == 2, 10, "A-2 and A-3 released")

    assert rig.received("A") == ["A-2", "A-3"]


def test_a_parked_event_refused_again_becomes_the_dead_letter_and_the_key_stays_parked(
    rejecting: tuple[Rig, set[str]],
) -> None:
    rig, refused = rejecting
    refused.update({"A-1", "A-2"})
    rig.publish([sale("A", 1), sale("A", 2), sale("A", 3)])
    wait_until(lambda: len(_letters(rig.store, "parked")) == 2, 10, "A-2 and A-3 parked")
    [dead] = rig.store.list_dead_letters(target="erp", status="dead")

    refused.discard("A-1")
    rig.store.reopen_parked([dead.id], actor="alice", reason="A-1 fixed")
    wait_until(lambda: _letters(rig.store, "dead") == ["A-2"], 10, "A-2 dead at the head of the key")
    time.sleep(0.3)

    assert rig.received("A") == ["A-1"]
    assert _letters(rig.store, "parked") == ["A-3"]
    [again] = rig.store.list_dead_letters(target="erp", status="dead")
    assert again.attempts >= 1 and "HTTP 422" in again.detail
    assert [entry.actor for entry in rig.store.list_audit(f"deadletter:{again.id}")] == ["router"]


def test_an_older_stock_snapshot_is_skipped_and_counted(rig: Rig) -> None:
    stale = metrics.EVENTS_STALE.labels(target="erp")
    before = stale._value.get()
    rig.publish([snapshot("A", 1, minute=10), snapshot("A", 2, minute=5), snapshot("A", 3, minute=20)])
    wait_until(lambda: len(rig.received()) == 2, 10, "two snapshots")
    rig.publish([snapshot("A", 4, minute=15), snapshot("A", 5, minute=30)])  # the marks are in the store
    wait_until(lambda: "A-5" in rig.received(), 10, "the newest snapshot")
    time.sleep(0.2)

    assert rig.received() == ["A-1", "A-3", "A-5"]
    assert stale._value.get() - before == 2


def test_a_history_replay_resends_delivered_events_with_the_same_ids(rig: Rig) -> None:
    events = [snapshot("A", 1, minute=1), snapshot("A", 2, minute=2), sale("B", 1)]
    rig.publish(events)
    since = T0 - timedelta(days=3650)
    # The target answers before the worker records the delivery: wait for the journal, not the target.
    wait_until(lambda: len(rig.store.journal("erp", since=since)) == 3, 10, "3 events journalled")
    journal = rig.store.journal("erp", since=since)

    rig.publish([entry.event for entry in journal], replay=True)
    wait_until(lambda: len(rig.received()) == 5, 10, "2 events re-sent")
    time.sleep(0.2)

    assert sorted(rig.received()[3:]) == ["A-2", "B-1"]
    # A-1 is older than the level applied since: replayed or not, it would roll stock back.
    assert rig.received("A")[2:] == ["A-2"]
    assert len(rig.store.journal("erp", since=T0 - timedelta(days=3650))) == 3


def test_the_circuit_opens_after_failures_and_holds_attempts_for_the_cooldown() -> None:
    with SimulatedTarget("wms", TargetBehaviour(fail_first=4)) as down:
        client = HttpTarget(
            HttpTargetSettings(
                name="wms",
                url=down.url,
                retry=RetryPolicy(attempts=50, initial=0.001, max_delay=0.001, max_age=30),
                circuit=CircuitSettings(failures=2, cooldown=0.4),
            )
        )
        seen_open: list[float] = []

        def watch_gauge() -> None:
            for _ in range(20):
                seen_open.append(metrics.CIRCUIT_OPEN.labels(target="wms")._value.get())
                time.sleep(0.05)

        watcher = threading.Thread(target=watch_gauge, daemon=True)
        started = time.monotonic()
        watcher.start()
        result = client.deliver(b"{}", "application/json", "ev-1")
        took = time.monotonic() - started
        watcher.join(5)
        client.close()

    # 2 failures open it; trials 3 and 4 fail and re-open it; trial 5 succeeds: 3 cooldowns waited.
    assert (result.outcome, result.attempts, down.attempts) == (DeliveryOutcome.delivered, 5, 5)
    assert took >= 3 * 0.4
    assert 1 in seen_open
    assert metrics.CIRCUIT_OPEN.labels(target="wms")._value.get() == 0


def test_a_refusal_does_not_count_against_the_circuit() -> None:
    now = [0.0]
    breaker = CircuitBreaker("oms", CircuitSettings(failures=2, cooldown=10), clock=lambda: now[0])

    breaker.record(target_failed=True)
    breaker.record(target_failed=False)  # a 422: the target is up
    breaker.record(target_failed=True)
    assert breaker.wait_time() == 0 and not breaker.is_open

    breaker.record(target_failed=True)
    assert breaker.is_open and breaker.wait_time() == 10
    now[0] = 4.0
    assert breaker.wait_time() == 6
    now[0] = 10.0
    assert breaker.wait_time() == 0 and breaker.is_open  # the trial is due


def test_bad_circuit_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="failures must be at least 1, got 0"):
        CircuitSettings(failures=0)
    with pytest.raises(ValueError, match="cooldown must be a non-negative number of seconds"):
        CircuitSettings(cooldown=-1)


def test_no_attempt_starts_after_the_deadline_and_the_delivery_ends_as_max_age() -> None:
    """Retry in place bounded by the broker's consumer timeout: a clock that only moves when it waits."""
    now = [0.0]
    started: list[float] = []

    def sleep(seconds: float, _: threading.Event | None) -> bool:
        now[0] += seconds
        return False

    def attempt() -> AttemptResult:
        started.append(now[0])
        now[0] += 1.0  # each failing attempt takes a second
        return AttemptResult(AttemptKind.retry, 503, "HTTP 503 from erp")

    policy = RetryPolicy(attempts=1000, initial=2.0, max_delay=2.0, max_age=600.0)
    circuit = CircuitBreaker("erp", CircuitSettings(failures=1000, cooldown=1.0), clock=lambda: now[0])
    retrying = RetryInPlace("erp", policy, circuit, sleep=sleep, clock=lambda: now[0])

    result = retrying.deliver(attempt, deadline=30.0)

    assert result.outcome is DeliveryOutcome.retries_exhausted and result.reason == "max_age"
    assert max(started) <= 30.0 and now[0] <= 31.0  # well within max_age: the deadline came first
    assert "held as long as the broker's consumer timeout allows" in result.detail


def test_a_release_that_loses_its_lease_stops_before_the_next_request(tmp_path: Path) -> None:
    """Another process took the key (this one's lease ran out): the parked events left stay parked for it."""

    def slow(_: Any) -> bool:
        time.sleep(0.2)  # each request takes a while; the release outlasts several renewals
        return False

    with (
        SimulatedTarget("erp", TargetBehaviour(reject=slow)) as target,
        Store(f"sqlite:///{tmp_path / 'state.db'}") as store,
    ):
        client = HttpTarget(HttpTargetSettings(name="erp", url=f"{target.url}/inventory", timeout=5))
        settings = DeliverySettings(
            target="erp", partitions=1, batch_max_events=None, batch_max_wait=0.05, lease_ttl=0.6
        )
        broker = BrokerSettings(url="memory://", prefix=f"t{uuid.uuid4().hex[:8]}")
        worker = DeliveryWorker(broker, settings, client, PayloadRenderer(), store, threading.Event())
        letters = [sale("A", n) for n in range(1, 21)]
        store.add_dead_letters([delivery_letter("erp", event, PARKED, "waiting") for event in letters])
        releasing = threading.Thread(target=worker.release.release_all, daemon=True)
        releasing.start()
        wait_until(lambda: len(target.events) >= 2, 10, "the release under way")
        store.free_lease("release:erp", "A", worker.assignment.holder)  # its lease ran out and ...
        assert store.claim_lease("release:erp", "A", "another-router", 60)  # ... another router took it
        releasing.join(10)
        client.close()

        sent = [event["event_id"] for event in target.events]
        assert not releasing.is_alive() and 2 <= len(sent) < 10
        assert sent == [f"A-{n}" for n in range(1, len(sent) + 1)]
        assert _letters(store, "parked") == [f"A-{n}" for n in range(len(sent) + 1, 21)]
        assert _letters(store, "dead") == []
