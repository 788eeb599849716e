"""Every partition in flight, and processes that share them: order per key on the real RabbitMQ.

The delivery worker runs against a loopback HTTP target that answers slowly and fails at random (503s,
no answer before the timeout, connection resets); two real `router run` processes share a target's
partitions, and killing one hands its partitions to the other with nothing lost and no key reordered.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from canonical.ids import partition_for
from connectors.circuit import CircuitSettings
from connectors.http_target import HttpTarget, HttpTargetSettings
from connectors.retry import RetryPolicy
from router.broker import BrokerSettings, Topology, open_publisher
from router.delivery_worker import DeliverySettings, DeliveryWorker
from router.simulated import Fault, ReceivedRequest, SimulatedTarget, TargetBehaviour
from state import Store
from tests.integration.harness import (
    RouterProcess,
    in_order_per_key,
    wait_until,
    write_config,
    write_pos_file,
)
from transforms.render import PayloadRenderer

pytestmark = pytest.mark.slow

PARTITIONS = 16
FAULT_SHARES = ((Fault.UNAVAILABLE, 0.08), (Fault.HANG, 0.11), (Fault.RESET, 0.14))
"""Each fault with the cumulative share of requests that get it: 8% 503s, 3% hangs, 3% resets."""
T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


def sale(key: str, n: int) -> dict[str, Any]:
    """A canonical-shaped sale; ``n`` orders the events of a key."""
    return {
        "event_id": f"{key}-{n}",
        "type": "sale",
        "sequence_key": key,
        "sku": key,
        "location": "S001",
        "quantity": "1",
        "occurred_at": (T0 + timedelta(seconds=n)).isoformat(),
        "transaction_id": f"T{n:07d}",
        "source": {"route": "pos-sales", "system": "pos", "message_id": "m", "record": n},
    }


def publish(broker: BrokerSettings, events: list[dict[str, Any]], chunk: int = 160) -> None:
    """Publish like the transform stage: each chunk as one message per partition, events in order."""
    topology = Topology(broker)
    with open_publisher(broker, topology) as sink:
        for start in range(0, len(events), chunk):
            per_partition: dict[int, list[dict[str, Any]]] = {}
            for event in events[start : start + chunk]:
                per_partition.setdefault(partition_for(event["sequence_key"], PARTITIONS), []).append(event)
            for partition, batch in per_partition.items():
                body = {"route": "pos-sales", "target": "erp", "partition": partition, "events": batch}
                sink.publish(topology.delivery_queue("erp", partition), body)


def first_seen_in_order(events: list[dict[str, Any]]) -> bool:
    seen: set[str] = set()
    last: dict[str, int] = {}
    for event in events:
        if event["event_id"] in seen:
            continue
        seen.add(event["event_id"])
        n = event["source"]["record"]
        if n < last.get(event["sequence_key"], -1):
            return False
        last[event["sequence_key"]] = n
    return True


class Rig:
    """A delivery worker for target ``erp`` (16 partitions) on the real RabbitMQ, run in a thread."""

    def __init__(
        self, tmp_path: Path, url: str, prefix: str, target: SimulatedTarget, **settings: Any
    ) -> None:
        self.broker = BrokerSettings(url=url, prefix=prefix)
        self.stop = threading.Event()
        self.store = Store(f"sqlite:///{tmp_path / 'state.db'}")
        self.client = HttpTarget(
            HttpTargetSettings(
                name="erp",
                url=f"{target.url}/inventory",
                timeout=0.3,
                retry=RetryPolicy(attempts=1000, initial=0.01, max_delay=0.1, max_age=120),
                circuit=CircuitSettings(failures=1000, cooldown=0.05),
                connections=PARTITIONS,
            )
        )
        delivery = DeliverySettings(
            target="erp", partitions=PARTITIONS, batch_max_events=None, batch_max_wait=0.05, **settings
        )
        self.worker = DeliveryWorker(
            self.broker, delivery, self.client, PayloadRenderer(), self.store, self.stop
        )
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self) -> Rig:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(60)
        self.client.close()
        self.store.close()


@pytest.fixture
def rig_factory(tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str) -> Iterator[Any]:
    def make(target: SimulatedTarget, **settings: Any) -> Rig:
        return Rig(tmp_path, rabbitmq_url, rabbitmq_namespace, target, **settings)

    yield make


def test_sixteen_partitions_in_flight_keep_order_per_key_against_a_slow_failing_target(
    rig_factory: Any,
) -> None:
    chaos = random.Random(8)
    lock = threading.Lock()
    faults: list[Fault] = []

    def fault(_: ReceivedRequest) -> Fault | None:
        with lock:
            roll = chaos.random()
            picked = next((f for f, below in FAULT_SHARES if roll < below), None)
            if picked is not None:
                faults.append(picked)
        return picked

    behaviour = TargetBehaviour(latency=0.02, fault=fault, hang=0.5)
    keys = [f"SKU-{k:03d}|S001" for k in range(160)]
    events = [sale(key, n) for n in range(8) for key in keys]
    with SimulatedTarget("erp", behaviour) as erp, rig_factory(erp) as rig:
        publish(rig.broker, events)
        wait_until(lambda: len({e["event_id"] for e in erp.events}) == len(events), 240, "every event")

    assert {e["event_id"] for e in erp.events} == {e["event_id"] for e in events}
    assert first_seen_in_order(erp.events)
    assert erp.peak_in_flight >= PARTITIONS // 2, f"at most {erp.peak_in_flight} requests were in flight"
    assert set(faults) == set(Fault) and len(faults) > 50, "the target failed too rarely to test anything"


def test_a_key_retrying_in_place_holds_back_only_its_own_partition(rig_factory: Any) -> None:
    stuck_key = "SKU-STUCK|S001"
    stuck_partition = partition_for(stuck_key, PARTITIONS)
    answering = threading.Event()

    def fault(request: ReceivedRequest) -> Fault | None:
        stuck = any(e.get("sequence_key") == stuck_key for e in request.events)
        return Fault.UNAVAILABLE if stuck and not answering.is_set() else None

    others = [f"SKU-{k:03d}|S001" for k in range(200)]
    others = [key for key in others if partition_for(key, PARTITIONS) != stuck_partition]
    events = [sale(stuck_key, 0), *[sale(key, n) for n in range(3) for key in others]]
    with SimulatedTarget("erp", TargetBehaviour(fault=fault)) as erp, rig_factory(erp) as rig:
        publish(rig.broker, events, chunk=len(events))
        # Only the stuck key's own partition waits: every other event arrives while it is refused.
        wait_until(lambda: len(erp.events) == len(events) - 1, 60, "every other partition's events")
        assert stuck_key not in {e["sequence_key"] for e in erp.events}
        answering.set()
        wait_until(lambda: len(erp.events) == len(events), 30, "the stuck key once the target answers")

    assert first_seen_in_order(erp.events)


def test_max_in_flight_bounds_the_requests_at_once(rig_factory: Any) -> None:
    keys = [f"SKU-{k:03d}|S001" for k in range(64)]
    events = [sale(key, n) for n in range(3) for key in keys]
    with (
        SimulatedTarget("erp", TargetBehaviour(latency=0.05)) as erp,
        rig_factory(erp, max_in_flight=3) as rig,
    ):
        publish(rig.broker, events)
        wait_until(lambda: len(erp.events) == len(events), 60, "every event")

    assert 2 <= erp.peak_in_flight <= 3
    assert first_seen_in_order(erp.events)


def _status(config: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "router.cli", "status", "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def _holders(config: Path) -> dict[int, list[int]]:
    """Process id -> the partitions it holds, as `router status --json` reports them."""
    [target] = _status(config)["targets"]
    return {int(holder.split(":")[1]): partitions for holder, partitions in target["holders"].items()}


def test_a_second_process_takes_half_the_partitions_and_the_first_takes_them_back_when_it_is_killed(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    rows = 4000
    # The target answers slowly so the stream is still under way when the second process joins and dies.
    with SimulatedTarget("erp", TargetBehaviour(latency=0.02)) as erp:
        config = write_config(
            tmp_path,
            broker_url=rabbitmq_url,
            prefix=rabbitmq_namespace,
            targets={"erp": erp.url},
            chunk_size=100,
        )
        document = json.loads(config.read_text(encoding="utf-8"))
        document["targets"]["erp"]["partitions"] = 8
        config.write_text(json.dumps(document), encoding="utf-8")
        delivery = ("--only", "delivery")

        def unique() -> int:
            return len({e["event_id"] for e in erp.events})

        with (
            RouterProcess(config, "--only", "sources", "--only", "transform"),
            RouterProcess(config, *delivery) as first,
        ):
            wait_until(lambda: _holders(config) == {first.process.pid: list(range(8))}, 60, "one holder")
            write_pos_file(tmp_path / "inbox" / "pos-0800.csv", rows)
            wait_until(lambda: unique() >= 200, 120, "the stream under way")
            with RouterProcess(config, *delivery) as second:
                # The first hands its four highest partitions over, each once its messages in hand
                # are delivered and acknowledged.
                split = {first.process.pid: [0, 1, 2, 3], second.process.pid: [4, 5, 6, 7]}
                wait_until(lambda: _holders(config) == split, 60, "four partitions each")
                at_split = unique()
                wait_until(lambda: unique() >= at_split + 100, 60, "both delivering")
                second.kill()
            assert unique() < rows, "the stream ended before the kill; slow the target down"
            # Its leases run out (10 s) and the first takes its partitions back, unacknowledged
            # messages first.
            wait_until(lambda: _holders(config) == {first.process.pid: list(range(8))}, 60, "the survivor")
            wait_until(lambda: unique() >= rows, 240, f"all {rows} events")
            assert first.terminate() == 0, first.output()

    assert unique() == rows
    assert in_order_per_key(erp.events)
