"""The broker layer against the real RabbitMQ: queue arguments, confirms, single-active-consumer."""

from __future__ import annotations

import json
import time

import pytest
from kombu import Connection

from router.broker import (
    BrokerSettings,
    BrokerTopologyMismatch,
    BrokerUnavailable,
    Publisher,
    Topology,
    connect,
    queue_depth,
)
from router.consumer import BufferedConsumer


def _settings(url: str, prefix: str, queue_type: str = "quorum") -> BrokerSettings:
    return BrokerSettings(url=url, queue_type=queue_type, prefix=prefix, confirm_timeout=10)


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_published_messages_are_durable_and_confirmed(
    rabbitmq_url: str, rabbitmq_namespace: str, queue_type: str
) -> None:
    settings = _settings(rabbitmq_url, rabbitmq_namespace, queue_type)
    topology = Topology(settings)
    queue = topology.delivery_queue("erp", 3)
    with connect(settings) as connection:
        topology.declare(connection, [queue])
        Publisher(connection, topology).publish(queue, {"events": [{"quantity": "1.50"}]})
        assert queue_depth(connection, queue) == 1
    # A fresh connection sees the queue's arguments as declared: durable, typed, single-active-consumer.
    with Connection(rabbitmq_url) as plain:
        channel = plain.channel()
        with pytest.raises(plain.channel_errors):
            # Redeclaring with different arguments is refused: proof the broker holds ours.
            channel.queue_declare(queue.name, durable=True, arguments={"x-queue-type": "stream"})


def test_single_active_consumer_gives_a_partition_to_one_consumer_at_a_time(
    rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    settings = _settings(rabbitmq_url, rabbitmq_namespace)
    topology = Topology(settings)
    queue = topology.delivery_queue("wms", 0)
    with connect(settings) as first, connect(settings) as second:
        topology.declare(first, [queue])
        active = BufferedConsumer(first, [queue], prefetch=10)
        standby = BufferedConsumer(second, [queue], prefetch=10)
        publisher = Publisher(first, topology)
        for n in range(20):
            publisher.publish(queue, {"n": n})
        got_active, got_standby = [], []
        deadline = time.monotonic() + 10
        while len(got_active) + len(got_standby) < 20 and time.monotonic() < deadline:
            for message in active.fetch(0.2):
                got_active.append(message.body)
                message.ack()
            for message in standby.fetch(0.05):
                got_standby.append(message.body)
                message.ack()
        assert got_standby == []
        assert [json.loads(body)["n"] for body in got_active] == list(range(20))
        active.close()
        standby.close()


def test_publish_to_an_unreachable_broker_raises_promptly() -> None:
    settings = BrokerSettings(url="amqp://guest:guest@127.0.0.1:1//", confirm_timeout=2)
    topology = Topology(settings)
    started = time.monotonic()
    with connect(settings) as connection, pytest.raises(BrokerUnavailable, match=r"router\.ingress\.pos"):
        Publisher(connection, topology).publish(topology.ingress_queue("pos"), {"records": []})
    assert time.monotonic() - started < 15


def test_a_queue_declared_with_other_settings_says_how_to_fix_it(
    rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    classic = Topology(_settings(rabbitmq_url, rabbitmq_namespace, "classic"))
    quorum = Topology(_settings(rabbitmq_url, rabbitmq_namespace, "quorum"))
    with connect(classic.settings) as connection:
        classic.declare(connection, [classic.ingress_queue("pos-sales")])
    with connect(quorum.settings) as connection, pytest.raises(BrokerTopologyMismatch) as caught:
        quorum.declare(connection, [quorum.ingress_queue("pos-sales")])
    assert "x-queue-type" in str(caught.value) and "broker.queue_type" in str(caught.value)


def test_every_connection_tries_each_url_of_the_list_in_turn(
    rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    # Two nodes that refuse, then the live one: kombu alone gives up after the second URL.
    dead = ["amqp://guest:guest@127.0.0.1:1//", "amqp://guest:guest@127.0.0.1:2//"]
    settings = _settings(";".join([*dead, rabbitmq_url]), rabbitmq_namespace)
    topology = Topology(settings)
    queue = topology.delivery_queue("erp", 0)
    with connect(settings) as connection:
        topology.declare(connection, [queue])
    with connect(settings) as connection:
        Publisher(connection, topology).publish(queue, {"n": 1})
    with connect(settings) as connection:
        consumer = BufferedConsumer(connection, [queue], prefetch=1)
        [message] = consumer.fetch(5)
        assert json.loads(message.body) == {"n": 1}
        message.ack()
        consumer.close()
