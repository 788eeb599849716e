"""`router replay` to a restored target while live traffic flows, on the real RabbitMQ with a real HTTP
target on loopback and a real SQLite store: the target must end on the newest stock level per key."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from canonical.ids import partition_for
from connectors.http_target import HttpTarget, HttpTargetSettings
from connectors.retry import RetryPolicy
from router.broker import BrokerSettings, Topology, open_publisher
from router.delivery_worker import DeliverySettings, DeliveryWorker
from router.history_cli import replay_history
from router.history_replay import newest_last
from router.simulated import SimulatedTarget
from state import JournalEntry, Store
from tests.integration.harness import wait_until, write_config
from transforms.render import PayloadRenderer

pytestmark = pytest.mark.slow

PARTITIONS = 4
KEYS = [f"SKU-{n}|S001" for n in range(6)]
T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


def snapshot(key: str, minute: int) -> dict[str, Any]:
    """A stock level counted at T0 + ``minute``; the quantity is the minute, so a level names its count."""
    return {
        "event_id": f"{key}@{minute}",
        "type": "stock.snapshot",
        "sequence_key": key,
        "sku": key.split("|")[0],
        "location": "S001",
        "quantity": str(minute),
        "quantity_semantics": "absolute",
        "occurred_at": (T0 + timedelta(minutes=minute)).isoformat(),
        "source": {"route": "threepl-stock", "system": "3pl", "message_id": f"m-{minute}"},
    }


@dataclass
class Live:
    """Publishes like the transform stage: one message per partition, newer levels each round."""

    broker: BrokerSettings
    minute: int = 0

    def publish_round(self) -> None:
        self.minute += 1
        topology = Topology(self.broker)
        per_partition: dict[int, list[dict[str, Any]]] = {}
        for key in KEYS:
            per_partition.setdefault(partition_for(key, PARTITIONS), []).append(snapshot(key, self.minute))
        with open_publisher(self.broker, topology) as sink:
            for partition, events in per_partition.items():
                sink.publish(
                    topology.delivery_queue("wms", partition),
                    {"route": "threepl-stock", "target": "wms", "partition": partition, "events": events},
                )


@pytest.fixture
def wms() -> Iterator[SimulatedTarget]:
    with SimulatedTarget("wms") as target:
        yield target


def _levels(target: SimulatedTarget) -> dict[str, str]:
    """The level each key ends on at the target: the quantity of the last snapshot it applied."""
    return {event["sequence_key"]: event["quantity"] for event in target.events}


def _settle(target: SimulatedTarget, quiet: float = 1.5, bound: float = 60.0) -> None:
    """Wait until the target has received nothing new for ``quiet`` seconds (at most ``bound``)."""
    deadline = time.monotonic() + bound
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len(target.events)
        if count != seen:
            seen, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)
    raise AssertionError(f"the target kept receiving events for {bound:.0f}s")


def _rollbacks(target: SimulatedTarget) -> list[str]:
    """Each time the target applied a level older than one it had applied before for the key."""
    applied: dict[str, int] = {}
    found = []
    for event in target.events:
        key, minute = event["sequence_key"], int(event["quantity"])
        if minute < applied.get(key, 0):
            found.append(f"{key}: {applied[key]} -> {minute}")
        applied[key] = max(minute, applied.get(key, 0))
    return found


def test_a_replay_during_live_traffic_leaves_every_key_on_its_newest_level(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str, wms: SimulatedTarget
) -> None:
    config = write_config(
        tmp_path, broker_url=rabbitmq_url, prefix=rabbitmq_namespace, targets={"wms": wms.url}
    )
    broker = BrokerSettings(url=rabbitmq_url, prefix=rabbitmq_namespace)
    stop = threading.Event()
    client = HttpTarget(
        HttpTargetSettings(
            name="wms", url=f"{wms.url}/inventory", timeout=5, retry=RetryPolicy(attempts=3, initial=0.01)
        )
    )
    settings = DeliverySettings(
        target="wms", partitions=PARTITIONS, batch_max_events=None, batch_max_wait=0.05
    )
    live = Live(broker)
    with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
        worker = DeliveryWorker(broker, settings, client, PayloadRenderer(), store, stop)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            since = datetime.now(UTC) - timedelta(seconds=1)
            for _ in range(5):
                live.publish_round()
            wait_until(lambda: len(wms.events) == 5 * len(KEYS), 30, "the first five levels of every key")
            wms.requests.clear()  # the WMS is restored from a backup that has none of them

            publishing = threading.Event()

            def keep_publishing() -> None:
                while not publishing.is_set() and live.minute < 200:
                    live.publish_round()
                    time.sleep(0.02)

            flowing = threading.Thread(target=keep_publishing, daemon=True)
            flowing.start()
            time.sleep(0.5)
            replayed = CliRunner().invoke(
                replay_history,
                ["--target", "wms", "--since", since.isoformat(), "-c", str(config)],
                catch_exceptions=False,
            )
            publishing.set()  # the replay's messages may now be the last ones queued
            flowing.join(30)
            newest = str(live.minute)
            _settle(wms)

            assert replayed.exit_code == 0, replayed.output
            assert _levels(wms) == dict.fromkeys(KEYS, newest)
            assert _rollbacks(wms) == []
        finally:
            stop.set()
            thread.join(30)
            client.close()


def _entry(n: int, key: str, minute: int, kind: str = "stock.snapshot") -> JournalEntry:
    occurred = T0 + timedelta(minutes=minute)
    return JournalEntry(
        id=n,
        target="wms",
        event_id=f"{key}@{minute}:{kind}",
        sequence_key=key,
        occurred_at=occurred,
        delivered_at=T0,
        event={"type": kind, "event_id": f"{key}@{minute}:{kind}"},
    )


def test_the_replay_leaves_out_superseded_levels_and_ends_each_key_on_its_newest() -> None:
    window = [_entry(1, "A", 1), _entry(2, "A", 2, "sale"), _entry(3, "A", 3), _entry(4, "B", 1)]
    newest = {"A": _entry(9, "A", 5), "B": _entry(4, "B", 1)}

    kept = [entry.event_id for entry in newest_last(window, newest)]

    assert kept == ["A@2:sale", "B@1:stock.snapshot", "A@5:stock.snapshot"]
