"""A bug or an unexpected failure in the transform code costs one record, kept as a replayable dead
letter, not the chunk: shown in-process (the mapping code is patched to fail) on the real RabbitMQ, with
a real HTTP target, and replayed with the CLI once the code is fixed. A store that cannot take a chunk's
failures for a moment gets the chunk again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from deadletter import DeadLetter
from router.config import load_config
from router.deadletter_cli import deadletter
from router.runtime import RouterRuntime
from router.simulated import SimulatedTarget
from state import Store, StoreUnavailable
from tests.integration.harness import wait_until, write_config, write_pos_file
from transforms.mapping import RecordMapping
from transforms.parsers import RawRecord

pytestmark = pytest.mark.slow

BUG_SKU = "SKU-BUG"


def _letters(folder: Path) -> list[DeadLetter]:
    with Store(f"sqlite:///{folder / 'state.db'}") as store:
        return store.list_dead_letters()


def test_a_record_the_transform_fails_on_is_replayable_and_replay_delivers_it_once_fixed(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = True
    original = RecordMapping.apply

    def apply(mapping: RecordMapping, record: RawRecord) -> dict[str, Any]:
        if broken and record.data["SKU"] == BUG_SKU:
            raise RuntimeError("stores service timed out")
        return original(mapping, record)

    monkeypatch.setattr(RecordMapping, "apply", apply)
    with SimulatedTarget("erp") as erp:
        config = write_config(
            tmp_path, broker_url=rabbitmq_url, prefix=rabbitmq_namespace, targets={"erp": erp.url}
        )
        write_pos_file(tmp_path / "inbox" / "sales.csv", 6, bad={3: {"SKU": BUG_SKU}})
        runtime = RouterRuntime(load_config(config))
        runtime.start()
        try:
            wait_until(lambda: len(erp.events) >= 5, 60, "the chunk's five other records delivered")
            wait_until(lambda: len(_letters(tmp_path)) == 1, 30, "the failed record dead-lettered")
            [letter] = _letters(tmp_path)
            assert (letter.stage, letter.reason, letter.status) == ("transform", "transform_error", "dead")
            assert letter.detail == (
                "sales.csv line 4 (record 3): the transform failed unexpectedly: "
                "RuntimeError: stores service timed out"
            )
            assert letter.payload["SKU"] == BUG_SKU and letter.event_id
            broken = False

            replayed = CliRunner().invoke(deadletter, ["replay", str(letter.id), "-c", str(config)])

            assert replayed.exit_code == 0, replayed.output
            wait_until(
                lambda: letter.event_id in {event["event_id"] for event in erp.events},
                60,
                "the replayed record delivered with its original event id",
            )
        finally:
            runtime.stop()

    assert sorted(event["transaction_id"] for event in erp.events) == [f"T{n:07d}" for n in range(1, 7)]
    [after] = _letters(tmp_path)
    assert after.status == "replayed"


def test_a_store_hiccup_while_keeping_a_chunks_failures_is_retried_not_lost(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hiccups = 1
    original = Store.add_dead_letters

    def add_dead_letters(store: Store, items: Any) -> list[int]:
        nonlocal hiccups
        if hiccups:
            hiccups -= 1
            raise StoreUnavailable("store sqlite:///state.db unreachable: disk I/O error")
        return original(store, items)

    monkeypatch.setattr(Store, "add_dead_letters", add_dead_letters)
    with SimulatedTarget("erp") as erp:
        config = write_config(
            tmp_path, broker_url=rabbitmq_url, prefix=rabbitmq_namespace, targets={"erp": erp.url}
        )
        write_pos_file(tmp_path / "inbox" / "sales.csv", 6, bad={2: {"QTY": "lots"}})
        runtime = RouterRuntime(load_config(config))
        runtime.start()
        try:
            wait_until(lambda: len(_letters(tmp_path)) == 1, 60, "the bad record kept once the store is back")
            wait_until(lambda: len({e["event_id"] for e in erp.events}) == 5, 60, "the five good records")
        finally:
            runtime.stop()

    assert hiccups == 0
    [letter] = _letters(tmp_path)
    assert (letter.reason, letter.payload["QTY"]) == ("mapping", "lots")
    # The chunk's events were published again with it; the delivered-events ledger sent each once.
    assert len(erp.events) == 5
