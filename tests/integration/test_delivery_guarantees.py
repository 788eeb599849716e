"""Delivery guarantees under faults, with the real `router run`, the real RabbitMQ and real HTTP targets:
a target down for a while, a target refusing one key, kill -9 and restart, two processes on one config,
and a broker restart mid-stream. Order per key holds and nothing is lost in every case.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from router.deadletter_cli import deadletter
from router.simulated import SimulatedTarget, TargetBehaviour
from state import Store
from tests.integration.harness import (
    RouterProcess,
    in_order_per_key,
    wait_until,
    write_config,
    write_pos_file,
)

pytestmark = pytest.mark.slow

FAST_CIRCUIT = {"failures": 3, "cooldown": "300ms"}
PATIENT = {"attempts": 1000, "initial": "20ms", "max": "200ms", "max_age": "5m"}


@pytest.fixture
def broker(rabbitmq_url: str, rabbitmq_namespace: str) -> tuple[str, str]:
    return rabbitmq_url, rabbitmq_namespace


def _store(folder: Path, url: str | None = None) -> Store:
    return Store(url or f"sqlite:///{folder / 'state.db'}")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The router's store for a test: SQLite in the test folder, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_database"))


def _unique(target: SimulatedTarget) -> set[str]:
    return {event["event_id"] for event in target.events}


def test_target_down_for_a_while_then_back_gets_everything_in_order(
    tmp_path: Path, broker: tuple[str, str]
) -> None:
    url, prefix = broker
    with SimulatedTarget("erp", TargetBehaviour(fail_first=40)) as erp:
        config = write_config(
            tmp_path,
            broker_url=url,
            prefix=prefix,
            targets={"erp": erp.url},
            batch={"erp": 50},
            retry=PATIENT,
            circuit_breaker=FAST_CIRCUIT,
        )
        write_pos_file(tmp_path / "inbox" / "pos-0100.csv", 500)
        with RouterProcess(config) as router:
            wait_until(lambda: len(_unique(erp)) >= 500, 90, "500 events after the ERP came back")
            assert router.terminate() == 0, router.output()

    assert erp.attempts > 40
    assert len(erp.events) == 500 and in_order_per_key(erp.events)
    with _store(tmp_path) as store:
        assert store.list_dead_letters() == []


def test_a_refused_key_is_parked_the_rest_flows_and_replay_delivers_it_in_order(
    tmp_path: Path, broker: tuple[str, str], store_url: str
) -> None:
    url, prefix = broker
    refuse = TargetBehaviour(reject=lambda event: event.get("transaction_id") == "T0000010")
    with SimulatedTarget("erp", refuse) as erp:
        config = write_config(
            tmp_path, broker_url=url, prefix=prefix, targets={"erp": erp.url}, store_url=store_url
        )
        write_pos_file(tmp_path / "inbox" / "pos-0101.csv", 300)  # rows 10, 121 and 232 share a key
        with RouterProcess(config) as router, _store(tmp_path, store_url) as store:
            wait_until(lambda: len(erp.events) >= 297, 60, "every event of the other keys")
            wait_until(lambda: len(store.list_dead_letters(status="parked")) == 2, 30, "2 events parked")
            [dead] = store.list_dead_letters(status="dead")
            key = dead.sequence_key
            assert dead.payload["transaction_id"] == "T0000010" and "HTTP 422" in dead.detail
            assert [event for event in erp.events if event["sequence_key"] == key] == []

            erp.behaviour.reject = None  # the ERP's item master is fixed
            replay = CliRunner().invoke(
                deadletter, ["replay", "--target", "erp", "--reason", "item created", "-c", str(config)]
            )
            assert replay.exit_code == 0, replay.output
            wait_until(lambda: len(erp.events) >= 300, 30, "the parked key released")
            assert router.terminate() == 0, router.output()
            statuses = [letter.status for letter in store.list_dead_letters()]

    assert len(_unique(erp)) == 300 == len(erp.events)
    released = [event["transaction_id"] for event in erp.events if event["sequence_key"] == key]
    assert released == ["T0000010", "T0000121", "T0000232"]
    assert in_order_per_key(erp.events)
    assert statuses == ["replayed", "replayed", "replayed"]


def test_kill_9_mid_stream_and_a_restart_lose_nothing_and_keep_order(
    tmp_path: Path, broker: tuple[str, str]
) -> None:
    url, prefix = broker
    with SimulatedTarget("erp") as erp:
        config = write_config(
            tmp_path, broker_url=url, prefix=prefix, targets={"erp": erp.url}, chunk_size=100
        )
        write_pos_file(tmp_path / "inbox" / "pos-0102.csv", 2000)
        with RouterProcess(config) as router:
            wait_until(lambda: len(erp.events) >= 300, 60, "the stream under way")
            router.kill()
        assert len(_unique(erp)) < 2000, "the stream finished before the kill; make the file larger"
        with RouterProcess(config) as router:
            wait_until(lambda: len(_unique(erp)) >= 2000, 90, "all 2,000 events after the restart")
            assert router.terminate() == 0, router.output()

    assert len(_unique(erp)) == 2000
    # Duplicates only from the crash window: at most the prefetched, unacknowledged messages.
    assert len(erp.events) - 2000 <= 4 * 4
    assert in_order_per_key(erp.events)


def test_two_processes_on_one_config_ingest_each_file_once_in_order(
    tmp_path: Path, broker: tuple[str, str], store_url: str
) -> None:
    url, prefix = broker
    with SimulatedTarget("erp") as erp:
        config = write_config(
            tmp_path,
            broker_url=url,
            prefix=prefix,
            targets={"erp": erp.url},
            chunk_size=100,
            store_url=store_url,
        )
        for n in range(3):
            write_pos_file(tmp_path / "inbox" / f"pos-02{n}.csv", 300)
        with RouterProcess(config) as first, RouterProcess(config) as second:
            wait_until(lambda: len(_unique(erp)) >= 900, 90, "900 events from 3 files")
            assert first.terminate() == 0, first.output()
            assert second.terminate() == 0, second.output()

    assert len(erp.events) == 900 == len(_unique(erp))
    assert sorted(p.name for p in (tmp_path / "archive").iterdir()) == [
        "pos-020.csv",
        "pos-021.csv",
        "pos-022.csv",
    ]
    assert in_order_per_key(erp.events)


def test_a_broker_restart_mid_stream_loses_nothing(
    tmp_path: Path, broker: tuple[str, str], restartable_rabbitmq: None
) -> None:
    url, prefix = broker
    with SimulatedTarget("erp") as erp:
        config = write_config(
            tmp_path, broker_url=url, prefix=prefix, targets={"erp": erp.url}, chunk_size=100
        )
        write_pos_file(tmp_path / "inbox" / "pos-0103.csv", 3000)
        with RouterProcess(config) as router:
            wait_until(lambda: len(erp.events) >= 200, 60, "the stream under way")
            subprocess.run(["rabbitmqctl", "stop_app"], capture_output=True, timeout=120, check=True)
            assert len(_unique(erp)) < 3000, "the stream ended before the broker stopped; use a larger file"
            subprocess.run(["rabbitmqctl", "start_app"], capture_output=True, timeout=120, check=True)
            wait_until(lambda: len(_unique(erp)) >= 3000, 120, "all 3,000 events after the broker restart")
            assert router.terminate() == 0, router.output()

    assert len(_unique(erp)) == 3000
    assert in_order_per_key(erp.events)
