"""`router status`: what an operator sees of queues, dead letters and parked keys on the real RabbitMQ."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deadletter import NewDeadLetter
from state import Store
from tests.integration.harness import RouterProcess, wait_until, write_config, write_pos_file

pytestmark = pytest.mark.slow


def _status(config: Path) -> tuple[int, dict[str, Any], str]:
    result = subprocess.run(
        [sys.executable, "-m", "router.cli", "status", "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, json.loads(result.stdout), result.stderr


def test_status_shows_queued_events_open_dead_letters_and_parked_keys(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    config = write_config(
        tmp_path, broker_url=rabbitmq_url, prefix=rabbitmq_namespace, targets={"erp": "http://127.0.0.1:9"}
    )
    write_pos_file(tmp_path / "inbox" / "pos-0040.csv", 40, bad={7: {"QTY": "seven"}})
    # No delivery stage: the 39 good events wait in the ERP's partition queues.
    with RouterProcess(config, "--only", "sources", "--only", "transform") as router:
        wait_until(lambda: (tmp_path / "archive" / "pos-0040.csv").exists(), 60, "the file archived")
        wait_until(lambda: _status(config)[1]["targets"][0]["queue_depth"] == 4, 30, "4 partition messages")
        assert router.terminate() == 0, router.output()
    with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
        parked = {
            "route": "pos-sales",
            "stage": "delivery",
            "target": "erp",
            "payload": {},
            "detail": "waiting",
        }
        store.add_dead_letters(
            [NewDeadLetter(**parked, reason="parked", sequence_key="SKU-001|S1", status="parked")]
        )

    code, report, _ = _status(config)

    assert code == 0 and report["errors"] == []
    [route] = report["routes"]
    assert (route["name"], route["ingress_depth"], route["deadletters_open"]) == ("pos-sales", 0, 2)
    [erp] = report["targets"]
    assert (erp["name"], erp["partitions"], erp["queue_depth"], erp["parked_keys"]) == ("erp", 4, 4, 1)


def test_status_with_the_broker_unreachable_says_so_without_the_password_and_exits_1(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        broker_url="amqp://router:s3cret@127.0.0.1:1//",
        prefix="router",
        targets={"erp": "http://x"},
    )

    code, report, _ = _status(config)

    assert code == 1
    assert any("unreachable" in error for error in report["errors"]), report
    assert "s3cret" not in json.dumps(report) and report["broker"] == "amqp://router:***@127.0.0.1:1//"


def test_status_reaches_the_broker_through_any_node_of_the_list_and_masks_each_password(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    dead = ["amqp://router:first-s3cret@127.0.0.1:1//", "amqp://router:second-s3cret@127.0.0.1:2//"]
    config = write_config(
        tmp_path,
        broker_url=[*dead, rabbitmq_url],
        prefix=rabbitmq_namespace,
        targets={"erp": "http://127.0.0.1:9"},
    )

    code, report, _ = _status(config)

    assert code == 0 and report["errors"] == [], report
    assert "s3cret" not in json.dumps(report)
    assert report["broker"].startswith(
        "amqp://router:***@127.0.0.1:1//, amqp://router:***@127.0.0.1:2//, amqp://"
    )
