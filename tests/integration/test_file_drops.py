"""Hard file drops against the real `router run`: a writer that pauses, links, names no message can carry."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from router.simulated import SimulatedTarget
from state import Store
from tests.integration.harness import STORES, RouterProcess, wait_until, write_config, write_pos_file

pytestmark = pytest.mark.slow

STABLE_FOR = 0.5
PAUSES = (0.1, 0.6, 1.2)
"""The writer's pauses after the router took the file: the later ones longer than stable_for, each
shorter than the watch window then (stable_for, doubled each time the file grew), so the test does
not depend on how fast the router polls."""


def _row(n: int) -> dict[str, str]:
    stores = list(STORES)
    return {
        "TXN": f"T{n:07d}",
        "SKU": "SKU-001",  # one key, so the target must see the rows in file order
        "STORE": stores[0],
        "QTY": str(n),
        "SOLD_AT": f"2026-11-24 09:00:{n:02d}",
    }


def _with_source(config: Path, **source: Any) -> None:
    document = json.loads(config.read_text(encoding="utf-8"))
    document["routes"][0]["source"].update(source)
    config.write_text(json.dumps(document, indent=2), encoding="utf-8")


def test_rows_a_pausing_writer_appends_after_the_file_was_taken_all_reach_the_target_in_order(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    with SimulatedTarget("erp") as erp:
        config = write_config(
            tmp_path, broker_url=rabbitmq_url, prefix=rabbitmq_namespace, targets={"erp": erp.url}
        )
        _with_source(config, stable_for=f"{int(STABLE_FOR * 1000)}ms")
        with RouterProcess(config) as router:
            # The writer starts once the router polls, or it could finish before the router first looks.
            wait_until(lambda: "router running" in router.output(), 60, "the router to start")
            path = tmp_path / "inbox" / "pos-grow.csv"
            with path.open("w", newline="", encoding="utf-8") as handle:  # held open, as a POS export is
                writer = csv.DictWriter(handle, ["TXN", "SKU", "STORE", "QTY", "SOLD_AT"])
                writer.writeheader()
                writer.writerows([_row(1), _row(2)])
                handle.flush()
                wait_until(lambda: not path.exists(), 30, "the router to take the file while it is written")
                for batch, pause in enumerate(PAUSES):
                    time.sleep(pause)
                    writer.writerows([_row(3 + 2 * batch), _row(4 + 2 * batch)])
                    handle.flush()
            wait_until(lambda: len(erp.events) >= 8, 60, "all 8 rows at the ERP")
            wait_until(lambda: (tmp_path / "archive" / "pos-grow.csv").exists(), 30, "the file archived")
            assert router.terminate() == 0, router.output()

    transactions = [event["transaction_id"] for event in erp.events]
    assert transactions == [f"T{n:07d}" for n in range(1, 9)], transactions
    assert len({event["event_id"] for event in erp.events}) == 8
    assert "grew after it was taken" in router.output()
    assert "archived: 8 records" in router.output()
    archived = (tmp_path / "archive" / "pos-grow.csv").read_text(encoding="utf-8").splitlines()
    assert len(archived) == 9


def test_a_link_and_a_name_that_is_not_utf8_end_in_errors_with_a_dead_letter_each_and_nothing_leaks(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n", encoding="utf-8")
    with SimulatedTarget("erp") as erp:
        config = write_config(tmp_path, broker_url="memory://", prefix="router", targets={"erp": erp.url})
        (tmp_path / "inbox" / "x.csv").symlink_to(secret)
        write_pos_file(Path(os.fsdecode(os.fsencode(tmp_path / "inbox") + b"/\xff-sales.csv")), 3)
        write_pos_file(tmp_path / "inbox" / "good.csv", 2)
        with RouterProcess(config) as router:
            wait_until(lambda: len(erp.events) >= 2, 30, "the good file's events")
            wait_until(lambda: len(_letters(tmp_path)) >= 2, 30, "two dead letters")
            time.sleep(0.5)  # a few more polls: a refused entry must not come back
            assert router.terminate() == 0, router.output()

    letters = {letter.reason: letter for letter in _letters(tmp_path)}
    assert sorted(letters) == ["file_name", "link"] and len(_letters(tmp_path)) == 2
    assert "x.csv" in letters["link"].detail and "symbolic link" in letters["link"].detail
    assert "\\xff-sales.csv" in letters["file_name"].detail
    assert all("root:" not in letter.detail + json.dumps(letter.payload) for letter in letters.values())
    assert (tmp_path / "errors" / "x.csv").is_symlink()
    assert os.path.exists(os.fsencode(tmp_path / "errors") + b"/\xff-sales.csv")
    assert {event["source"]["file"] for event in erp.events} == {"good.csv"}
    assert "root:" not in router.output()


def _letters(folder: Path) -> list:
    store = Store(f"sqlite:///{folder / 'state.db'}")
    try:
        return store.list_dead_letters()
    finally:
        store.close()
