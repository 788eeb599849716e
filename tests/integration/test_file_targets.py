"""File and SFTP targets through the real `router run`: each request's batch lands as one complete file."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from router.simulated import SimulatedTarget
from tests.integration.harness import RouterProcess, wait_until, write_config, write_pos_file

pytestmark = pytest.mark.slow


def _retarget(config: Path, name: str, target: dict[str, Any]) -> None:
    """Replace the harness's HTTP target ``name`` by another kind, keeping its retry policy."""
    document = json.loads(config.read_text(encoding="utf-8"))
    document["targets"][name] = {**target, "retry": document["targets"][name]["retry"], "partitions": 2}
    config.write_text(json.dumps(document), encoding="utf-8")


def _rows(files: list[Path]) -> list[dict[str, str]]:
    return [row for path in files for row in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))]


def test_a_file_target_gets_complete_csv_batches_named_by_their_idempotency_key(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    with SimulatedTarget("unused") as unused:
        config = write_config(tmp_path, broker_url="memory://", prefix="router", targets={"wms": unused.url})
    _retarget(
        config,
        "wms",
        {
            "type": "file",
            "path": "outbox",
            "format": "csv",
            "body": {"event": "event_id", "sku": "sku", "store": "location", "qty": "quantity"},
            "batch": {"max_events": 100, "max_wait": "100ms"},
        },
    )
    write_pos_file(tmp_path / "inbox" / "pos-0300.csv", 300)
    with RouterProcess(config) as router:
        wait_until(lambda: len(_rows(sorted(outbox.glob("*.csv")))) >= 300, 60, "300 rows in the outbox")
        assert router.terminate() == 0, router.output()

    files = sorted(outbox.iterdir())
    assert files and all(f.name.startswith("wms-batch-") and f.suffix == ".csv" for f in files), files
    rows = _rows(files)
    assert len(rows) == 300 == len({row["event"] for row in rows})
    assert list(rows[0]) == ["event", "sku", "store", "qty"]


def test_an_sftp_target_gets_json_batches_on_the_server(tmp_path: Path) -> None:
    from tests.sftp_server import running_sftp_server

    inbound = tmp_path / "partner" / "inbound"
    inbound.mkdir(parents=True)
    with running_sftp_server(tmp_path / "sshd") as server, SimulatedTarget("unused") as unused:
        config = write_config(tmp_path, broker_url="memory://", prefix="router", targets={"edi": unused.url})
        _retarget(
            config,
            "edi",
            {
                "type": "sftp",
                **server.route_login(),
                "remote_dir": str(inbound),
                "filename": "stock-{key}.{ext}",
                "batch": {"max_events": 50, "max_wait": "100ms"},
                "timeout": "5s",
            },
        )
        write_pos_file(tmp_path / "inbox" / "pos-0120.csv", 120)

        def events() -> list[dict[str, Any]]:
            return [e for path in inbound.glob("stock-*.json") for e in json.loads(path.read_text())]

        with RouterProcess(config) as router:
            wait_until(lambda: len(events()) >= 120, 60, "120 events in files on the SFTP server")
            assert router.terminate() == 0, router.output()

    assert len({event["event_id"] for event in events()}) == 120
    assert not [path for path in inbound.iterdir() if path.name.startswith(".")], (
        "a temporary upload was left"
    )


def test_formula_text_reaches_a_csv_file_target_neutralised_and_numbers_unchanged(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    with SimulatedTarget("unused") as unused:
        config = write_config(tmp_path, broker_url="memory://", prefix="router", targets={"wms": unused.url})
    _retarget(
        config,
        "wms",
        {
            "type": "file",
            "path": "outbox",
            "format": "csv",
            "body": {"txn": "transaction_id", "qty": "quantity"},
        },
    )
    formula = "=cmd|' /C calc'!A0"
    write_pos_file(tmp_path / "inbox" / "pos-0002.csv", 2, bad={1: {"TXN": formula}, 2: {"TXN": "@SUM(1+1)"}})
    with RouterProcess(config) as router:
        wait_until(lambda: len(_rows(sorted(outbox.glob("*.csv")))) >= 2, 60, "2 rows in the outbox")
        assert router.terminate() == 0, router.output()

    files = sorted(outbox.glob("*.csv"))
    rows = sorted(_rows(files), key=lambda row: row["txn"])
    assert rows == [{"txn": "'=cmd|' /C calc'!A0", "qty": "2"}, {"txn": "'@SUM(1+1)", "qty": "3"}]
    assert any("\"'=cmd|' /C calc'!A0\"" in path.read_text(encoding="utf-8") for path in files)
