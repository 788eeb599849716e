"""Retrying in place never outlives RabbitMQ's consumer timeout: on the real broker, with a real HTTP
target on loopback that keeps failing and a real SQLite store, a partition message whose events would
retry for longer than the consumer timeout is settled (dead letters, reason max_age) and acked first."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from connectors.circuit import CircuitSettings
from connectors.http_target import HttpTarget, HttpTargetSettings
from connectors.retry import RetryPolicy
from router.broker import BrokerSettings, Topology, open_publisher, queue_depth, retry_budget
from router.delivery_worker import DeliverySettings, DeliveryWorker
from router.simulated import SimulatedTarget, TargetBehaviour
from state import Store
from tests.integration.harness import wait_until
from transforms.render import PayloadRenderer

pytestmark = pytest.mark.slow

CONSUMER_TIMEOUT = 8.0
REQUEST_TIMEOUT = 0.5
MAX_AGE = 3.0  # each event alone fits the consumer timeout; five of them in one message do not


def sale(key: str) -> dict[str, Any]:
    return {
        "event_id": f"{key}-1",
        "type": "sale",
        "sequence_key": key,
        "sku": key,
        "location": "S001",
        "quantity": "1",
        "occurred_at": "2026-11-24T09:00:00+00:00",
        "source": {"route": "pos-sales", "system": "pos", "message_id": "m-1", "record": 1},
    }


@pytest.fixture
def down() -> Iterator[SimulatedTarget]:
    with SimulatedTarget("erp", TargetBehaviour(fail_first=10**9)) as target:
        yield target


def test_a_message_is_settled_and_acked_before_the_consumer_timeout(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str, down: SimulatedTarget
) -> None:
    broker = BrokerSettings(url=rabbitmq_url, prefix=rabbitmq_namespace, consumer_timeout=CONSUMER_TIMEOUT)
    topology = Topology(broker)
    queue = topology.delivery_queue("erp", 0)
    client = HttpTarget(
        HttpTargetSettings(
            name="erp",
            url=f"{down.url}/inventory",
            timeout=REQUEST_TIMEOUT,
            retry=RetryPolicy(attempts=10_000, initial=0.05, max_delay=0.2, max_age=MAX_AGE),
            circuit=CircuitSettings(failures=10_000, cooldown=0.1),
        )
    )
    assert MAX_AGE < retry_budget(CONSUMER_TIMEOUT, REQUEST_TIMEOUT) < 5 * MAX_AGE
    settings = DeliverySettings(target="erp", partitions=1, batch_max_events=None, batch_max_wait=0.05)
    stop = threading.Event()
    with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
        worker = DeliveryWorker(broker, settings, client, PayloadRenderer(), store, stop)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            published = time.monotonic()
            with open_publisher(broker, topology) as sink:
                events = [sale(f"K{n}") for n in range(5)]
                sink.publish(queue, {"route": "pos-sales", "target": "erp", "partition": 0, "events": events})
            wait_until(
                lambda: len(store.list_dead_letters(target="erp")) == 5, 3 * CONSUMER_TIMEOUT, "five letters"
            )
            settled = time.monotonic() - published
        finally:
            stop.set()
            thread.join(30)
            client.close()
        letters = store.list_dead_letters(target="erp")

    assert settled < CONSUMER_TIMEOUT, f"the message was held {settled:.1f}s"
    assert [(letter.event_id, letter.status, letter.reason) for letter in letters] == [
        (f"K{n}-1", "dead", "max_age") for n in range(5)
    ]
    assert "max_age 3s" in letters[0].detail  # the first event ran out of its own max_age
    # Later events were cut short by the deadline, or not sent at all once it had passed.
    assert any("consumer timeout" in letter.detail and letter.attempts >= 1 for letter in letters[1:])
    assert "not sent" in letters[4].detail and letters[4].attempts == 0
    with Connection(rabbitmq_url) as connection:  # acked: nothing went back to the queue on close
        assert queue_depth(connection, queue) == 0
    assert _declared_consumer_timeout(queue.name) == str(round(CONSUMER_TIMEOUT * 1000))


def _declared_consumer_timeout(name: str) -> str | None:
    """The queue's x-consumer-timeout argument as the broker lists it."""
    listing = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name", "arguments"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for line in listing.stdout.splitlines():
        if line.startswith(name + "\t"):
            marker = '{"x-consumer-timeout",'
            if marker in line:
                return line.split(marker, 1)[1].split("}", 1)[0].strip()
    return None
