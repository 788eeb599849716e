"""Failover on a three-node RabbitMQ cluster started by the ``rabbit_cluster`` fixture.

``broker.url`` lists the three nodes. Nodes are stopped one at a time, so that a majority of every
quorum queue's replicas is always up (a quorum queue with two of three members down takes no messages,
by design): node 1 is killed mid-stream and booted again, then node 2's application is stopped. Nothing
may be lost, no key reordered, and the router must carry on through the surviving nodes.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.broker import BrokerSettings, Publisher, Topology, connect
from router.consumer import BufferedConsumer
from router.simulated import SimulatedTarget
from state import Store
from tests.integration.harness import (
    RouterProcess,
    in_order_per_key,
    wait_until,
    write_config,
    write_pos_file,
)
from tests.rabbit_cluster import RabbitCluster

# One xdist worker runs every test here: the cluster listens on fixed ports and is started once.
pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture
def cluster(rabbit_cluster: RabbitCluster) -> Iterator[tuple[RabbitCluster, str]]:
    """The session's cluster with a queue prefix of this test; every node is back and the prefix's
    queues are gone afterwards."""
    prefix = f"c{uuid.uuid4().hex[:10]}"
    try:
        yield rabbit_cluster, prefix
    finally:
        rabbit_cluster.heal()
        rabbit_cluster.delete_queues(prefix)


def _unique(target: SimulatedTarget) -> int:
    return len({event["event_id"] for event in target.events})


def test_confirmed_publishes_go_through_the_next_node_when_theirs_stops(
    cluster: tuple[RabbitCluster, str],
) -> None:
    nodes, prefix = cluster
    settings = BrokerSettings(url=";".join(nodes.urls), prefix=prefix, confirm_timeout=10)
    topology = Topology(settings)
    queue = topology.ingress_queue("pos")
    confirmed: list[int] = []
    with connect(settings) as connection:
        topology.declare(connection, [queue])
        assert sorted(nodes.queues(prefix)[queue.name]) == [node.name for node in nodes.nodes]
        publisher = Publisher(connection, topology)

        def publish_all() -> None:
            for n in range(600):
                publisher.publish(queue, {"n": n})
                confirmed.append(n)

        thread = threading.Thread(target=publish_all)
        thread.start()
        wait_until(lambda: len(confirmed) >= 100, 30, "100 confirmed publishes")
        nodes.stop_app(nodes.nodes[0])  # the node the publisher is connected to
        thread.join(60)
        assert not thread.is_alive() and confirmed == list(range(600))

    seen: set[int] = set()
    with connect(settings) as connection:
        consumer = BufferedConsumer(connection, [queue], prefetch=100)
        deadline = time.monotonic() + 30
        while len(seen) < 600 and time.monotonic() < deadline:
            for message in consumer.fetch(0.5):
                seen.add(json.loads(message.body)["n"])
                message.ack()
        consumer.close()
    assert seen == set(range(600))


def test_router_rides_out_a_killed_node_then_a_stopped_one_without_loss_or_reordering(
    tmp_path: Path, cluster: tuple[RabbitCluster, str]
) -> None:
    nodes, prefix = cluster
    first, second, _ = nodes.nodes
    with SimulatedTarget("erp") as erp:
        config = write_config(
            tmp_path, broker_url=nodes.urls, prefix=prefix, targets={"erp": erp.url}, chunk_size=50
        )
        write_pos_file(tmp_path / "pos-0201.csv", 3000).rename(tmp_path / "inbox" / "pos-0201.csv")
        with RouterProcess(config) as router:
            wait_until(lambda: len(erp.events) >= 200, 60, "200 events before node 1 goes")
            nodes.kill(first)
            at_kill = len(erp.events)
            write_pos_file(tmp_path / "pos-0202.csv", 1000).rename(tmp_path / "inbox" / "pos-0202.csv")
            wait_until(lambda: len(erp.events) >= at_kill + 500, 60, "delivery through the surviving nodes")
            nodes.restart(first)
            nodes.stop_app(second)
            write_pos_file(tmp_path / "pos-0203.csv", 1000).rename(tmp_path / "inbox" / "pos-0203.csv")
            wait_until(lambda: _unique(erp) >= 5000, 90, "all 5000 events with node 2 stopped")
            assert router.terminate() == 0, router.output()
        log = router.output()

    assert _unique(erp) == 5000 and in_order_per_key(erp.events)
    assert "lost its broker session" in log
    assert sorted(path.name for path in (tmp_path / "archive").iterdir()) == [
        "pos-0201.csv",
        "pos-0202.csv",
        "pos-0203.csv",
    ]
    with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
        assert store.list_dead_letters() == []
    assert set(nodes.queues(prefix)) and all(len(members) == 3 for members in nodes.queues(prefix).values())
