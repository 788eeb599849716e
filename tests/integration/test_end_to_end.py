"""The real `router run` process, the real RabbitMQ (and memory://), real HTTP targets on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from router.simulated import SimulatedTarget, TargetBehaviour
from state import Store
from tests.integration.harness import RouterProcess, wait_until, write_config, write_pos_file

pytestmark = pytest.mark.slow


@pytest.fixture(params=["rabbitmq", "memory"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(broker URL, queue prefix) for both transports; RabbitMQ queues are removed afterwards."""
    if request.param == "memory":
        return "memory://", "router"
    prefix = request.getfixturevalue("rabbitmq_namespace")
    return request.getfixturevalue("rabbitmq_url"), prefix


def _dead_letters(config_dir: Path) -> list:
    store = Store(f"sqlite:///{config_dir / 'state.db'}")
    try:
        return store.list_dead_letters()
    finally:
        store.close()


def test_pos_file_reaches_every_target_once_in_order_and_is_archived(
    tmp_path: Path, broker: tuple[str, str]
) -> None:
    url, prefix = broker
    with SimulatedTarget("erp") as erp, SimulatedTarget("wms") as wms:
        config = write_config(
            tmp_path,
            broker_url=url,
            prefix=prefix,
            targets={"erp": erp.url, "wms": wms.url},
            batch={"erp": 200},
            chunk_size=250,
        )
        write_pos_file(tmp_path / "inbox" / "pos-0001.csv", 1000)
        with RouterProcess(config) as router:
            wait_until(
                lambda: len(erp.events) >= 1000 and len(wms.events) >= 1000, 90, "1,000 events at each target"
            )
            assert router.terminate() == 0, router.output()

    assert [p.name for p in (tmp_path / "archive").iterdir()] == ["pos-0001.csv"]
    assert not list((tmp_path / "inbox").glob("*.csv"))
    for target in (erp, wms):
        ids = [event["event_id"] for event in target.events]
        assert len(ids) == 1000 and len(set(ids)) == 1000, f"{target.name} got duplicates or gaps"
        assert all("Idempotency-Key" in request.headers for request in target.requests)
    # One event per request at the WMS: the key is the event id itself.
    assert [r.headers["Idempotency-Key"] for r in wms.requests] == [r.body["event_id"] for r in wms.requests]
    # The ERP takes micro-batches.
    assert len(erp.requests) < 1000 and max(len(r.events) for r in erp.requests) <= 200
    # Partitions deliver in parallel, so pick the file's first row by its transaction rather than by arrival.
    first = next(event for event in wms.events if event["transaction_id"] == "T0000001")
    assert first["type"] == "sale" and first["quantity"] == "2" and first["location"] == "0614141000029"
    assert first["occurred_at"].endswith("-05:00")  # the route's America/New_York zone, offset kept
    # Order per sequence key: each key's sales arrive in the file's transaction order.
    for target in (erp, wms):
        per_key: dict[str, list[str]] = defaultdict(list)
        for event in target.events:
            per_key[event["sequence_key"]].append(event["transaction_id"])
        assert all(txns == sorted(txns) for txns in per_key.values()), f"{target.name} reordered a key"


def test_bad_rows_are_dead_lettered_with_their_line_and_the_rest_flow(
    tmp_path: Path, broker: tuple[str, str]
) -> None:
    url, prefix = broker
    with SimulatedTarget("erp") as erp:
        config = write_config(
            tmp_path, broker_url=url, prefix=prefix, targets={"erp": erp.url}, batch={"erp": 100}
        )
        write_pos_file(
            tmp_path / "inbox" / "pos-0002.csv", 300, bad={10: {"QTY": "ten"}, 20: {"STORE": "S999"}}
        )
        with RouterProcess(config) as router:
            wait_until(lambda: len(erp.events) >= 298, 60, "298 good events at the ERP")
            wait_until(lambda: len(_dead_letters(tmp_path)) >= 2, 30, "2 dead letters")
            assert router.terminate() == 0, router.output()

    assert len(erp.events) == 298
    letters = sorted(_dead_letters(tmp_path), key=lambda letter: letter.id)
    assert [(letter.stage, letter.reason) for letter in letters] == [
        ("transform", "mapping"),
        ("transform", "lookup"),
    ]
    assert "pos-0002.csv line 11 (record 10)" in letters[0].detail and "quantity" in letters[0].detail
    assert "S999" in letters[1].detail and "line 21" in letters[1].detail
    assert letters[0].payload["QTY"] == "ten"  # the raw record is kept for an edit and a replay


def test_unparseable_file_goes_to_errors_with_its_reason_and_nothing_is_sent(tmp_path: Path) -> None:
    with SimulatedTarget("erp") as erp:
        config = write_config(tmp_path, broker_url="memory://", prefix="router", targets={"erp": erp.url})
        (tmp_path / "inbox" / "broken.csv").write_text("SKU,SKU,QTY\nA,B,1\n", encoding="utf-8")
        write_pos_file(tmp_path / "inbox" / "good.csv", 5)
        with RouterProcess(config) as router:
            wait_until(lambda: len(erp.events) >= 5, 30, "the good file's events")
            wait_until(
                lambda: (tmp_path / "errors" / "broken.csv").exists(), 30, "the broken file in errors/"
            )
            assert router.terminate() == 0, router.output()

    reason = (tmp_path / "errors" / "broken.csv.reason.txt").read_text(encoding="utf-8")
    assert "broken.csv" in reason and "SKU" in reason
    assert {e["source"]["file"] for e in erp.events} == {"good.csv"}
    assert [letter.stage for letter in _dead_letters(tmp_path)] == ["ingress"]


def test_sigterm_while_a_target_is_down_loses_nothing(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    down = SimulatedTarget("erp", TargetBehaviour(fail_first=10**9)).start()
    patient = {"attempts": 10_000, "initial": "50ms", "max": "200ms", "max_age": "25m"}
    config = write_config(
        tmp_path,
        broker_url=rabbitmq_url,
        prefix=rabbitmq_namespace,
        targets={"erp": down.url},
        batch={"erp": 50},
        retry=patient,
    )
    write_pos_file(tmp_path / "inbox" / "pos-0003.csv", 200)
    with RouterProcess(config) as router:
        wait_until(lambda: down.attempts >= 3, 30, "the router retrying the down ERP")
        wait_until(lambda: (tmp_path / "archive" / "pos-0003.csv").exists(), 30, "the file archived")
        assert router.terminate(timeout=30) == 0, router.output()
    down.stop()
    assert down.events == []

    # The ERP is back on another address; the events waited in RabbitMQ and now arrive, all of them.
    with SimulatedTarget("erp") as erp:
        write_config(
            tmp_path,
            broker_url=rabbitmq_url,
            prefix=rabbitmq_namespace,
            targets={"erp": erp.url},
            batch={"erp": 50},
        )
        with RouterProcess(config) as router:
            wait_until(lambda: len(erp.events) >= 200, 60, "200 events after the restart")
            assert router.terminate() == 0, router.output()
    assert len({e["event_id"] for e in erp.events}) == 200
    assert _dead_letters(tmp_path) == []


def test_validate_reports_every_problem_with_its_position(tmp_path: Path) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text(
        "version: 1\n"
        "targets:\n"
        "  erp:\n"
        "    type: http\n"
        "    url: http://127.0.0.1:9/x\n"
        "    timeout: soon\n"
        "routes:\n"
        "  - name: pos\n"
        "    source: {type: file, path: in, patern: '*.csv'}\n"
        "    format: csv\n"
        "    map: {type: sale, sku: {column: SKU}, location: {column: S}, quantity: {column: Q}}\n"
        "    deliver: [eprr]\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "router.cli", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"{config}:6:") and "duration" in line for line in lines), lines
    assert any(
        line.startswith(f"{config}:9:") and "patern" in line and "pattern" in line for line in lines
    ), lines
    assert any(line.startswith(f"{config}:12:") and "eprr" in line and "erp" in line for line in lines), lines


def test_a_store_opened_while_running_maps_once_its_code_is_in_the_lookup_and_the_letter_replays(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    with SimulatedTarget("erp") as erp:
        config = write_config(
            tmp_path, broker_url=rabbitmq_url, prefix=rabbitmq_namespace, targets={"erp": erp.url}
        )
        document = json.loads(config.read_text(encoding="utf-8"))
        document["lookups"]["stores"]["refresh"] = "200ms"
        config.write_text(json.dumps(document), encoding="utf-8")
        write_pos_file(tmp_path / "inbox" / "pos-0050.csv", 5, bad={3: {"STORE": "S004"}})
        with RouterProcess(config) as router:
            wait_until(
                lambda: len(erp.events) >= 4 and len(_dead_letters(tmp_path)) == 1, 60, "4 events, 1 letter"
            )
            [letter] = _dead_letters(tmp_path)
            assert letter.reason == "lookup" and "S004" in letter.detail

            with (tmp_path / "stores.csv").open("a", encoding="utf-8") as stores:
                stores.write("S004,0614141000043\n")  # the new store's GLN; no restart
            time.sleep(1.0)  # a few lookup refresh intervals
            replay = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "router.cli",
                    "deadletter",
                    "replay",
                    str(letter.id),
                    "-c",
                    str(config),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert replay.returncode == 0, replay.stdout + replay.stderr
            wait_until(lambda: len(erp.events) >= 5, 30, "the replayed sale")
            assert router.terminate() == 0, router.output()

    replayed = next(event for event in erp.events if event["transaction_id"] == "T0000003")
    assert replayed["location"] == "0614141000043" and replayed["event_id"] == letter.event_id
    assert [letter.status for letter in _dead_letters(tmp_path)] == ["replayed"]
