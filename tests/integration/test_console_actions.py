"""The console's listing and bulk actions over real HTTP: paging through thousands of dead letters by id,
filters, a bulk replay that previews before it changes anything, and history replay to a restored target
(previewed, then re-sent through the real RabbitMQ), each audited with the operator's name."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deadletter import NewDeadLetter
from router.broker import Topology, connect, queue_depth
from router.console.passwords import hash_password
from router.history_replay import HistoryReplayer
from state import Store
from tests.integration.console_harness import (
    PASSWORD,
    Running,
    add_letter,
    console_config,
    csrf_of,
    letter_status,
    signed_in,
)

USERS = {"users": {"alice": hash_password(PASSWORD)}}


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    router = Running(console_config(tmp_path, USERS))
    try:
        yield router
    finally:
        router.stop()


def _many(folder: Path, count: int) -> None:
    with Store(f"sqlite:///{folder / 'state.db'}") as store:
        store.add_dead_letters(
            [
                NewDeadLetter(
                    route="pos-sales",
                    stage="delivery",
                    reason="http_4xx" if n % 2 else "timeout",
                    detail=f"HTTP 422 number {n}",
                    payload={"event_id": f"e-{n}", "sequence_key": f"k-{n % 7}"},
                    target="erp",
                    event_id=f"e-{n}",
                    sequence_key=f"k-{n % 7}",
                )
                for n in range(count)
            ]
        )


def _ids(page: str) -> list[int]:
    return [int(found) for found in re.findall(r'href="/console/letters/(\d+)"', page)]


def test_thousands_of_letters_page_by_id_and_filter(running: Running, tmp_path: Path) -> None:
    _many(tmp_path, 2500)
    with signed_in(running) as client:
        first = client.get("/console/letters")
        assert "2500 matching" in first.text and _ids(first.text) == list(range(1, 51))
        seen = _ids(first.text)
        query = re.search(r'href="/console/letters\?([^"]*after=\d+[^"]*)"', first.text)
        while query:
            page = client.get(f"/console/letters?{query.group(1).replace('&amp;', '&')}")
            assert page.status_code == 200
            seen += _ids(page.text)
            query = re.search(r'href="/console/letters\?([^"]*after=\d+[^"]*)"', page.text)
        assert seen == list(range(1, 2501))

        narrowed = client.get("/console/letters", params={"key": "k-3", "reason": "timeout"})
        assert "178 matching" in narrowed.text
        bad = client.get("/console/letters", params={"since": "yesterday"})
        assert bad.status_code == 400 and "not an ISO 8601 time" in bad.text


def test_a_bulk_replay_previews_then_replays_the_filtered_letters_as_the_operator(
    running: Running, tmp_path: Path
) -> None:
    kept = add_letter(tmp_path, sequence_key="other", event_id="e-9", payload={"event_id": "e-9"})
    chosen = [
        add_letter(tmp_path, sequence_key="k-1", event_id=f"e-{n}", payload={"event_id": f"e-{n}"})
        for n in range(3)
    ]
    with signed_in(running) as client:
        token = csrf_of(client.get("/console/letters", params={"key": "k-1"}))
        headers = {"Origin": running.console_url}
        preview = client.post("/console/letters/replay", data={"csrf": token, "key": "k-1"}, headers=headers)
        assert preview.status_code == 200 and "Replay 3 dead letters?" in preview.text
        assert [letter_status(tmp_path, n) for n in chosen] == ["dead"] * 3
        unfiltered = client.post("/console/letters/replay", data={"csrf": token}, headers=headers)
        assert unfiltered.status_code == 400 and "at least one filter" in unfiltered.text
        done = client.post(
            "/console/letters/replay",
            data={"csrf": token, "key": "k-1", "confirm": "yes", "why": "item master fixed"},
            headers=headers,
        )
        assert done.status_code == 200 and "replayed 3" in done.text
    assert [letter_status(tmp_path, n) for n in chosen] == ["parked"] * 3
    assert letter_status(tmp_path, kept) == "dead"
    with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
        entries = [entry for n in chosen for entry in store.list_audit(f"deadletter:{n}")]
    assert {entry.actor for entry in entries} == {"alice"}
    assert {entry.detail["reason"] for entry in entries if entry.detail} == {"item master fixed"}


def test_history_replay_previews_then_resends_to_the_restored_target(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    router = Running(console_config(tmp_path, USERS, broker_url=rabbitmq_url, prefix=rabbitmq_namespace))
    start = datetime.now(UTC) - timedelta(minutes=1)
    events = [
        {"event_id": f"e-{n}", "sequence_key": f"k-{n % 2}", "occurred_at": "2026-11-24T09:00:00Z"}
        for n in range(5)
    ]
    try:
        with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
            store.record_deliveries("erp", events)
        with signed_in(router) as client:
            token = csrf_of(client.get("/console/history"))
            form = {"csrf": token, "target": "erp", "since": start.isoformat(), "key": ""}
            headers = {"Origin": router.console_url}
            preview = client.post("/console/history", data=form, headers=headers)
            assert preview.status_code == 200 and "5 event(s) would be re-sent" in preview.text
            missing = client.post("/console/history", data={**form, "since": ""}, headers=headers)
            assert missing.status_code == 400 and "since is required" in missing.text
            done = client.post("/console/history", data={**form, "confirm": "yes"}, headers=headers)
            assert done.status_code == 200 and "re-sent 5 event(s) to erp" in done.text
        config = router.runtime.config
        topology = Topology(router.runtime.broker)
        with connect(router.runtime.broker) as connection:
            queued = [
                queue_depth(connection, queue)
                for queue in topology.delivery_queues("erp", config.targets["erp"].partitions)
            ]
        assert sum(depth or 0 for depth in queued) >= 1
        with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
            [entry] = store.list_audit("target:erp")
            assert HistoryReplayer(config, store, "x").history("erp", since=start) != []
        assert entry.actor == "alice" and entry.detail and entry.detail["events"] == 5
    finally:
        router.stop()
