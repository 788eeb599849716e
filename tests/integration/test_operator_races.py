"""Two operators acting on one dead letter at the same moment, as two real `router` CLI processes on one
SQLite or PostgreSQL store (and the real RabbitMQ where a replay publishes): exactly one wins, the other
is told who changed the letter meanwhile, and nothing is published twice or overwritten."""

from __future__ import annotations

import json
import multiprocessing
import shlex
import sys
import traceback
from collections.abc import Iterator, Sequence
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from deadletter import NewDeadLetter
from router.broker import BrokerSettings, Topology
from state import Store
from tests.integration.harness import write_config

pytestmark = pytest.mark.slow

ROUNDS = 25
ROUND_TIMEOUT = 60.0

Outcome = tuple[int, str, str]
"""What one CLI run gave: exit code, its output (stdout and stderr), and a traceback if one escaped."""


def _operator(
    index: int, config: str, rounds: Sequence[Sequence[str]], barrier: Barrier, results: Any
) -> None:
    """One operator's process: each round waits for the other operator, then runs its command."""
    from click.testing import CliRunner

    from router.cli import main

    outcomes: list[Outcome] = []
    for arguments in rounds:
        barrier.wait(ROUND_TIMEOUT)
        result = CliRunner().invoke(main, [*arguments, "-c", config])
        escaped = ""
        if result.exc_info is not None and not isinstance(result.exc_info[1], SystemExit):
            escaped = "".join(traceback.format_exception(*result.exc_info))
        outcomes.append((result.exit_code, result.output, escaped))
    results.put((index, outcomes))


def _race(config: Path, first: list[list[str]], second: list[list[str]]) -> list[tuple[Outcome, Outcome]]:
    """Run two operators' rounds in two processes, round by round at the same moment; their outcomes."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    processes = [
        context.Process(target=_operator, args=(index, str(config), rounds, barrier, results))
        for index, rounds in enumerate((first, second))
    ]
    for process in processes:
        process.start()
    try:
        collected = dict(results.get(timeout=ROUND_TIMEOUT * 3) for _ in processes)
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
    return list(zip(collected[0], collected[1], strict=True))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_database"))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store(store_url) as opened:
        yield opened


def _delivery_letter(n: int) -> NewDeadLetter:
    event = {"event_id": f"K{n}-1", "sequence_key": f"K{n}", "type": "sale", "source": {"route": "pos-sales"}}
    return NewDeadLetter(
        route="pos-sales",
        stage="delivery",
        target="erp",
        reason="http_4xx",
        detail="HTTP 422 from erp",
        payload=event,
        event_id=event["event_id"],
        sequence_key=event["sequence_key"],
        attempts=1,
    )


def _record_letter(n: int) -> NewDeadLetter:
    record = {"TXN": f"T{n}", "SKU": "SKU-1", "STORE": "S001", "QTY": "1", "SOLD_AT": "2026-11-24 09:00:00"}
    return NewDeadLetter(
        route="pos-sales",
        stage="transform",
        reason="lookup",
        detail="store code not found",
        payload=record,
        source_ref={"route": "pos-sales", "system": "pos", "message_id": f"m-{n}", "record": 1, "line": 2},
        event_id=f"record-{n}",
    )


def _assert_told(outcomes: tuple[Outcome, Outcome], letter_id: int) -> list[int]:
    """No traceback escaped, and an operator who did not act was told plainly why; who succeeded."""
    for _, output, escaped in outcomes:
        assert not escaped and "Traceback" not in output, output + escaped
    for code, output, _ in outcomes:
        assert code in (0, 1), outcomes
        if code == 1:
            assert f"dead letter {letter_id} not" in output, output
            assert "meanwhile" in output or "already" in output, output
    return [index for index, (code, _, _) in enumerate(outcomes) if code == 0]


def test_discard_and_replay_of_one_letter_at_once_exactly_one_wins(
    tmp_path: Path, store: Store, store_url: str
) -> None:
    config = write_config(
        tmp_path,
        broker_url="memory://",
        prefix="router",
        targets={"erp": "http://127.0.0.1:9"},
        store_url=store_url,
    )
    ids = store.add_dead_letters([_delivery_letter(n) for n in range(ROUNDS)])

    outcomes = _race(
        config,
        [["deadletter", "discard", str(i), "--reason", "duplicate", "--actor", "alice"] for i in ids],
        [["deadletter", "replay", str(i), "--actor", "bob"] for i in ids],
    )

    raced = 0
    for letter_id, pair in zip(ids, outcomes, strict=True):
        winners = _assert_told(pair, letter_id)
        history = store.list_audit(f"deadletter:{letter_id}")
        # Each move starts from where the previous one left the letter: nothing was overwritten.
        moves = [(entry.actor, entry.detail["from"], entry.detail["to"]) for entry in history if entry.detail]
        assert [source for _, source, _ in moves] == ["dead", *(to for _, _, to in moves[:-1])], moves
        letter = store.get_dead_letter(letter_id)
        assert letter is not None and letter.status == moves[-1][2], (moves, letter.status)
        if len(winners) == 2:
            # Not a race: alice read the letter after bob's replay and discarded what she saw, parked.
            assert moves == [("bob", "dead", "parked"), ("alice", "parked", "discarded")], moves
            continue
        assert len(winners) == 1 and len(moves) == 1, (pair, moves)
        assert moves[0][0] == ("alice", "bob")[winners[0]]
        raced += "meanwhile" in pair[1 - winners[0]][1]
    # In some rounds the loser read the letter while it was still dead: the race was real.
    assert raced > 0, "no round raced; the test did not exercise concurrency"


def test_two_replays_of_one_failed_record_at_once_publish_it_once(
    tmp_path: Path, store: Store, store_url: str, rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    config = write_config(
        tmp_path,
        broker_url=rabbitmq_url,
        prefix=rabbitmq_namespace,
        targets={"erp": "http://127.0.0.1:9"},
        store_url=store_url,
    )
    ids = store.add_dead_letters([_record_letter(n) for n in range(ROUNDS)])

    outcomes = _race(
        config,
        [["deadletter", "replay", str(i), "--actor", "alice"] for i in ids],
        [["deadletter", "replay", str(i), "--actor", "bob"] for i in ids],
    )

    for letter_id, pair in zip(ids, outcomes, strict=True):
        assert len(_assert_told(pair, letter_id)) == 1, pair
        letter = store.get_dead_letter(letter_id)
        assert letter is not None and letter.status == "replayed"
        assert len(store.list_audit(f"deadletter:{letter_id}")) == 1
    assert sorted(_replayed_records(rabbitmq_url, rabbitmq_namespace)) == sorted(ids)


def test_an_edit_and_a_discard_of_one_failed_record_at_once_never_both_take_effect(
    tmp_path: Path,
    store: Store,
    store_url: str,
    rabbitmq_url: str,
    rabbitmq_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = write_config(
        tmp_path,
        broker_url=rabbitmq_url,
        prefix=rabbitmq_namespace,
        targets={"erp": "http://127.0.0.1:9"},
        store_url=store_url,
    )
    ids = store.add_dead_letters([_record_letter(n) for n in range(ROUNDS)])
    monkeypatch.setenv(
        "EDITOR",
        f'{shlex.quote(sys.executable)} -c "import sys, pathlib; p = pathlib.Path(sys.argv[1]); '
        f"p.write_text(p.read_text().replace('SKU-1', 'SKU-2'))\"",
    )

    outcomes = _race(
        config,
        [["deadletter", "edit", str(i), "--actor", "alice"] for i in ids],
        [["deadletter", "discard", str(i), "--reason", "duplicate", "--actor", "bob"] for i in ids],
    )

    published = _replayed_records(rabbitmq_url, rabbitmq_namespace)
    for letter_id, (edit, discard) in zip(ids, outcomes, strict=True):
        for code, output, escaped in (edit, discard):
            assert code in (0, 1) and not escaped and "Traceback" not in output, (edit, discard)
        letter = store.get_dead_letter(letter_id)
        assert letter is not None
        if letter.status == "replayed":
            # alice's edit won: her record went out once, and bob was told.
            assert (edit[0], discard[0]) == (0, 1) and published.count(letter_id) == 1, (edit, discard)
            assert letter.payload["SKU"] == "SKU-2"
            assert "meanwhile" in discard[1] or "already" in discard[1], discard
        else:
            # bob's discard won, before alice's edit was saved or before it was replayed: nothing published.
            assert letter.status == "discarded" and (edit[0], discard[0]) == (1, 0), (edit, discard)
            assert letter_id not in published and "discarded by bob" in edit[1], edit


def _replayed_records(url: str, prefix: str) -> list[int]:
    """The letter ids of the records replays put on the route's ingress queue (which is emptied)."""
    queue = Topology(BrokerSettings(url=url, prefix=prefix)).ingress_queue("pos-sales")
    published: list[int] = []
    with Connection(url) as connection:
        simple = connection.SimpleQueue(queue)
        try:
            while True:
                try:
                    message = simple.get(timeout=2)
                except simple.Empty:
                    break
                published.append(message.headers["replay_of"])
                assert json.loads(message.body)["records"][0]["event_id"].startswith("record-")
                message.ack()
        finally:
            simple.close()
    return published
