"""Poison input never wedges a queue: it becomes a dead letter and the messages behind it flow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from kombu import Connection

from router.broker import BrokerSettings, Topology
from router.deadletter_cli import deadletter
from router.simulated import SimulatedTarget
from state import Store
from tests.integration.harness import RouterProcess, wait_until, write_config, write_pos_file

pytestmark = pytest.mark.slow


def _letters(folder: Path) -> list:
    with Store(f"sqlite:///{folder / 'state.db'}") as store:
        return store.list_dead_letters()


def test_garbage_on_the_ingress_and_partition_queues_is_dead_lettered_and_the_rest_flows(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    topology = Topology(BrokerSettings(url=rabbitmq_url, prefix=rabbitmq_namespace))
    with SimulatedTarget("erp") as erp:
        config = write_config(
            tmp_path, broker_url=rabbitmq_url, prefix=rabbitmq_namespace, targets={"erp": erp.url}
        )
        with RouterProcess(config) as router:
            wait_until(lambda: "router running" in router.output(), 60, "the router to start")
            with Connection(rabbitmq_url) as connection:
                producer = connection.Producer()
                for queue, body in (
                    (topology.ingress_queue("pos-sales"), b"\x00 not json"),
                    (topology.ingress_queue("pos-sales"), json.dumps({"route": "pos-sales"}).encode()),
                    (topology.delivery_queue("erp", 0), json.dumps({"events": [{"sku": "no id"}]}).encode()),
                ):
                    producer.publish(
                        body, routing_key=queue.name, exchange=topology.exchange, declare=[queue]
                    )
            write_pos_file(tmp_path / "inbox" / "after-the-garbage.csv", 20)
            wait_until(lambda: len(erp.events) >= 20, 60, "the good file's 20 events behind the garbage")
            wait_until(lambda: len(_letters(tmp_path)) >= 3, 30, "3 dead letters")
            assert router.terminate() == 0, router.output()

    letters = sorted(_letters(tmp_path), key=lambda letter: letter.id)
    assert sorted((letter.stage, letter.reason) for letter in letters) == [
        ("delivery", "malformed_message"),
        ("transform", "malformed_message"),
        ("transform", "malformed_message"),
    ]
    assert any("not json" in str(letter.payload) for letter in letters)
    assert len({event["event_id"] for event in erp.events}) == 20
    # There is nothing to replay in a message the router did not write: the operator is told to discard it.
    replay = CliRunner().invoke(deadletter, ["replay", str(letters[0].id), "-c", str(config)])
    assert replay.exit_code == 1 and "could not read" in replay.output and "discard" in replay.output
    assert _letters(tmp_path)[0].status == "dead"


def test_an_event_the_target_body_cannot_shape_is_dead_lettered_and_its_neighbours_delivered(
    tmp_path: Path,
) -> None:
    with SimulatedTarget("oms") as oms:
        config = write_config(tmp_path, broker_url="memory://", prefix="router", targets={"oms": oms.url})
        document = json.loads(config.read_text(encoding="utf-8"))
        # abs() of a SKU that is not a number is a JMESPath type error at delivery time.
        document["targets"]["oms"]["body"] = {"item": "abs(to_number(sku) || sku)", "id": "event_id"}
        document["routes"][0]["map"]["sku"] = {"column": "SKU"}
        config.write_text(json.dumps(document), encoding="utf-8")
        (tmp_path / "inbox" / "mixed.csv").write_text(
            "TXN,SKU,STORE,QTY,SOLD_AT\n"
            "T1,100,S001,1,2026-11-24 09:00:00\n"
            "T2,LETTERS,S002,1,2026-11-24 09:01:00\n"
            "T3,300,S003,1,2026-11-24 09:02:00\n",
            encoding="utf-8",
        )
        with RouterProcess(config) as router:
            wait_until(lambda: len(oms.events) >= 2, 60, "the two renderable events")
            wait_until(lambda: len(_letters(tmp_path)) >= 1, 30, "the unrenderable one dead-lettered")
            assert router.terminate() == 0, router.output()

    assert sorted(event["item"] for event in oms.events) == [100, 300]
    [letter] = _letters(tmp_path)
    assert (letter.stage, letter.target, letter.reason) == ("delivery", "oms", "render")
    assert letter.payload["sku"] == "LETTERS" and "abs" in letter.detail
