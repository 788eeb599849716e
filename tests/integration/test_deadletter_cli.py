"""`router deadletter ...` and `router replay` against a real SQLite store and, where they publish, the
real RabbitMQ (the messages they put on the queues are read back and checked)."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from kombu import Connection, Queue

from canonical.ids import partition_for
from deadletter import NewDeadLetter
from router.assembly import build_pipelines
from router.broker import BrokerSettings, Topology
from router.config import load_config
from router.deadletter_cli import deadletter
from router.history_cli import replay_history
from router.messages import REPLAY_HEADER, decode_chunk
from router.pipeline import RoutePipeline
from state import Store
from tests.integration.harness import write_config


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path, broker_url="memory://", prefix="router", targets={"erp": "http://127.0.0.1:9"}
    )


@pytest.fixture
def rabbit_config(tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str) -> Path:
    return write_config(
        tmp_path, broker_url=rabbitmq_url, prefix=rabbitmq_namespace, targets={"erp": "http://127.0.0.1:9"}
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(f"sqlite:///{tmp_path / 'state.db'}") as opened:
        yield opened


def run(command: Any, config: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(command, [*args, "-c", str(config)], env=env, catch_exceptions=False)


def _delivery(key: str, n: int, status: str = "dead") -> NewDeadLetter:
    event = {"event_id": f"{key}-{n}", "sequence_key": key, "type": "sale", "source": {"route": "pos-sales"}}
    return NewDeadLetter(
        route="pos-sales",
        stage="delivery",
        target="erp",
        reason="parked" if status == "parked" else "http_4xx",
        detail="HTTP 422 from erp: unknown item" if status == "dead" else "waiting",
        payload=event,
        event_id=event["event_id"],
        sequence_key=key,
        attempts=1,
        status=status,  # type: ignore[arg-type]
    )


def _bad_record(store: Store, config: Path, qty: str = "abc") -> int:
    """A real transform failure of the route, as the transform worker stores it."""
    loaded = load_config(config)
    pipeline: RoutePipeline = build_pipelines(loaded, loaded.routes)["pos-sales"]
    message = {
        "route": "pos-sales",
        "system": "pos",
        "message_id": "m-7",
        "origin": {"file": "pos-0007.csv", "sha256": "f00d"},
        "records": [
            {
                "n": 4,
                "line": 5,
                "data": {
                    "TXN": "T4",
                    "SKU": "SKU-4",
                    "STORE": "S001",
                    "QTY": qty,
                    "SOLD_AT": "2026-11-24 09:00:00",
                },
            }
        ],
    }
    [failure] = pipeline.transform(decode_chunk(message)).failures
    [letter_id] = store.add_dead_letters(
        [
            NewDeadLetter(
                route="pos-sales",
                stage="transform",
                reason=failure.reason,
                detail=failure.detail,
                payload=failure.payload,
                source_ref=failure.source_ref,
                event_id=failure.event_id,
            )
        ]
    )
    return letter_id


def _drain(url: str, queue: Queue, count: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Read ``count`` messages from a router queue (each wait bounded), as (headers, body)."""
    got = []
    with Connection(url) as connection:
        simple = connection.SimpleQueue(queue)
        try:
            for _ in range(count):
                message = simple.get(timeout=10)
                got.append((message.headers, json.loads(message.body)))
                message.ack()
        finally:
            simple.close()
    return got


def _topology(url: str, prefix: str) -> Topology:
    return Topology(BrokerSettings(url=url, prefix=prefix))


def test_list_filters_and_prints_json_or_a_table(store: Store, config: Path) -> None:
    dead, parked = store.add_dead_letters([_delivery("A", 1), _delivery("A", 2, "parked")])
    store.add_dead_letter(
        route="pos-sales", stage="ingress", reason="parse", detail="bad.csv: no header", payload=None
    )

    listed = run(deadletter, config, "list", "--json", "--target", "erp")
    table = run(deadletter, config, "list", "--status", "parked")
    window = run(
        deadletter, config, "list", "--json", "--since", (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    )

    assert listed.exit_code == 0, listed.output
    documents = json.loads(listed.output)
    assert [d["id"] for d in documents] == [dead, parked]
    needed = {"id", "route", "stage", "target", "reason", "attempts", "status", "sequence_key", "created_at"}
    assert needed <= set(documents[0]) and documents[0]["status"] == "dead"
    assert table.exit_code == 0 and "parked" in table.output and "HTTP 422" not in table.output
    assert json.loads(window.output) == []


def test_a_time_without_timezone_is_refused_with_an_example(config: Path) -> None:
    result = run(deadletter, config, "list", "--since", "2026-11-24T09:00")

    assert result.exit_code == 2
    assert "'2026-11-24T09:00' has no timezone" in result.output and "2026-11-24T09:00Z" in result.output


def test_show_gives_payload_and_history(store: Store, config: Path) -> None:
    letter_id = store.add_dead_letters([_delivery("A", 1)])[0]
    store.set_status(letter_id, "discarded", actor="bob", reason="test sale")

    shown = run(deadletter, config, "show", str(letter_id), "--json")
    human = run(deadletter, config, "show", str(letter_id))
    missing = run(deadletter, config, "show", "999")

    document = json.loads(shown.output)
    assert document["payload"]["event_id"] == "A-1" and document["detail"].startswith("HTTP 422")
    assert [(h["actor"], h["detail"]["reason"]) for h in document["history"]] == [("bob", "test sale")]
    assert human.exit_code == 0 and "A-1" in human.output and "bob" in human.output
    assert missing.exit_code == 2 and "dead letter 999 does not exist" in missing.output


def test_discard_needs_a_reason_and_is_audited(store: Store, config: Path) -> None:
    letter_id = store.add_dead_letters([_delivery("A", 1)])[0]

    refused = run(deadletter, config, "discard", str(letter_id))
    done = run(
        deadletter, config, "discard", str(letter_id), "--reason", "duplicate sale", "--actor", "carol"
    )
    again = run(deadletter, config, "discard", str(letter_id), "--reason", "x")

    assert refused.exit_code == 2 and "--reason" in refused.output
    assert done.exit_code == 0, done.output
    [entry] = store.list_audit(f"deadletter:{letter_id}")
    assert (entry.actor, entry.detail) == (
        "carol",
        {"from": "dead", "to": "discarded", "reason": "duplicate sale"},
    )
    assert again.exit_code == 1 and "already discarded" in again.output


def test_replay_by_filter_parks_dead_delivery_letters_and_dry_run_changes_nothing(
    store: Store, config: Path
) -> None:
    a1, a2, b1 = store.add_dead_letters([_delivery("A", 1), _delivery("A", 2, "parked"), _delivery("B", 1)])

    nothing = run(deadletter, config, "replay")
    preview = run(deadletter, config, "replay", "--target", "erp", "--dry-run", "--json")
    assert [letter.status for letter in store.list_dead_letters()] == ["dead", "parked", "dead"]
    replayed = run(deadletter, config, "replay", "--target", "erp", "--reason", "ERP fixed", "--actor", "dan")

    assert nothing.exit_code == 2 and "give dead letter IDs or at least one filter" in nothing.output
    assert [d["id"] for d in json.loads(preview.output)] == [a1, b1]
    assert replayed.exit_code == 0, replayed.output
    assert f"replayed 2: {a1}, {b1}" in replayed.output
    assert [letter.status for letter in store.list_dead_letters()] == ["parked", "parked", "parked"]
    assert store.list_audit(f"deadletter:{a1}")[0].actor == "dan"
    parked_again = run(deadletter, config, "replay", str(a2))
    assert parked_again.exit_code == 1 and "parked behind an earlier dead letter" in parked_again.output


def test_replaying_a_failed_record_sends_it_through_the_transform_with_its_event_id(
    store: Store, rabbit_config: Path, rabbitmq_url: str, rabbitmq_namespace: str, tmp_path: Path
) -> None:
    letter_id = _bad_record(store, rabbit_config)
    original = store.get_dead_letter(letter_id)
    assert original is not None and original.event_id
    editor = (
        f'{shlex.quote(sys.executable)} -c "import sys, pathlib; p = pathlib.Path(sys.argv[1]); '
        f"p.write_text(p.read_text().replace('abc', '3'))\""
    )

    still_bad = run(
        deadletter, rabbit_config, "edit", str(letter_id), env={"EDITOR": editor.replace("'3'", "'x'")}
    )
    edited = run(
        deadletter, rabbit_config, "edit", str(letter_id), "--reason", "QTY typo", env={"EDITOR": editor}
    )

    assert (
        still_bad.exit_code == 2 and "quantity" in still_bad.output and "nothing changed" in still_bad.output
    )
    assert edited.exit_code == 0, edited.output
    ingress = _topology(rabbitmq_url, rabbitmq_namespace).ingress_queue("pos-sales")
    [(headers, body)] = _drain(rabbitmq_url, ingress, 1)
    assert headers["replay_of"] == letter_id
    loaded = load_config(rabbit_config)
    result = build_pipelines(loaded, loaded.routes)["pos-sales"].transform(decode_chunk(body))
    [event] = result.accepted
    assert event["event_id"] == original.event_id and event["quantity"] == "3"
    assert event["source"]["file"] == "pos-0007.csv" and event["source"]["line"] == 5
    letter = store.get_dead_letter(letter_id)
    assert letter is not None and letter.status == "replayed" and letter.payload["QTY"] == "3"
    assert [e.action for e in store.list_audit(f"deadletter:{letter_id}")] == [
        "deadletter.edited",
        "deadletter.replayed",
    ]


def test_replaying_a_rejected_file_returns_it_to_the_inbox(
    store: Store, config: Path, tmp_path: Path
) -> None:
    rejected = tmp_path / "errors" / "pos-0009.csv"
    rejected.write_text("TXN,SKU,STORE,QTY,SOLD_AT\n", encoding="utf-8")
    rejected.with_name("pos-0009.csv.reason.txt").write_text("fixed now\n", encoding="utf-8")
    letter_id = store.add_dead_letter(
        route="pos-sales",
        stage="ingress",
        reason="parse",
        detail="no header",
        payload={"file": str(rejected)},
    )

    result = run(deadletter, config, "replay", str(letter_id))
    again = run(deadletter, config, "replay", "--stage", "ingress", "--route", "pos-sales")

    assert result.exit_code == 0, result.output
    assert (tmp_path / "inbox" / "pos-0009.csv").exists() and not rejected.exists()
    assert not rejected.with_name("pos-0009.csv.reason.txt").exists()
    assert again.exit_code == 0 and "no dead letters match; nothing replayed" in again.output


def test_router_replay_resends_the_journal_in_order_to_the_partition_queues(
    store: Store, rabbit_config: Path, rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    events = [{"event_id": f"A-{n}", "sequence_key": "A", "type": "sale"} for n in range(1, 4)]
    store.record_deliveries("erp", events)
    store.record_deliveries("erp", [{"event_id": "B-1", "sequence_key": "B", "type": "sale"}])

    dry = run(replay_history, rabbit_config, "--target", "erp", "--since", since.isoformat(), "--dry-run")
    sent = run(
        replay_history,
        rabbit_config,
        "--target",
        "erp",
        "--since",
        since.isoformat(),
        "--key",
        "A",
        "--actor",
        "erin",
        "--json",
    )
    unknown = run(replay_history, rabbit_config, "--target", "crm", "--since", since.isoformat())

    assert dry.exit_code == 0 and "would re-send 4 event(s) to erp" in dry.output
    assert json.loads(sent.output) == {"target": "erp", "dry_run": False, "events": 3}
    assert unknown.exit_code == 2 and "no target named 'crm'" in unknown.output
    queue = _topology(rabbitmq_url, rabbitmq_namespace).delivery_queue("erp", partition_for("A", 4))
    [(headers, body)] = _drain(rabbitmq_url, queue, 1)
    assert headers[REPLAY_HEADER] is True
    assert [event["event_id"] for event in body["events"]] == ["A-1", "A-2", "A-3"]
    [entry] = store.list_audit("target:erp")
    assert entry.actor == "erin" and entry.detail is not None and entry.detail["events"] == 3


HOSTILE = "[/bold] \x1b[2J\x1b]0;owned\x07 [red]red[/red] \u202egnp.exe \x9b31m:thumbs_up:"


def test_markup_and_escape_sequences_in_data_are_shown_not_obeyed(store: Store, config: Path) -> None:
    letter_id = store.add_dead_letter(
        route="pos-sales",
        stage="delivery",
        target="erp",
        reason="http_4xx",
        detail=f"HTTP 422 from erp: {HOSTILE}\nsecond line",
        payload={"sku": HOSTILE, "event_id": "E-1"},
        source_ref={"file": HOSTILE},
        event_id="E-1",
        sequence_key=f"key {HOSTILE}",
        attempts=1,
    )
    store.set_status(letter_id, "discarded", actor=f"mallory {HOSTILE}", reason=HOSTILE)
    wide = {"COLUMNS": "400"}

    listed = run(deadletter, config, "list", env=wide)
    shown = run(deadletter, config, "show", str(letter_id), env=wide)
    as_json = run(deadletter, config, "show", str(letter_id), "--json")
    listed_json = run(deadletter, config, "list", "--json")

    for result in (listed, shown):
        assert result.exit_code == 0, result.output
        assert not any(char in result.output for char in "\x1b\x07\x9b\u202e"), repr(result.output)
        assert "[/bold]" in result.output and "[red]red[/red]" in result.output
        assert "\\x1b[2J" in result.output and "\\u202e" in result.output and ":thumbs_up:" in result.output
    assert "second line" in shown.output and "mallory" in shown.output
    document = json.loads(as_json.output)
    assert document["detail"] == f"HTTP 422 from erp: {HOSTILE}\nsecond line"
    assert document["payload"]["sku"] == HOSTILE and document["history"][0]["actor"] == f"mallory {HOSTILE}"
    assert json.loads(listed_json.output)[0]["sequence_key"] == f"key {HOSTILE}"


def test_a_filtered_dry_run_lists_what_would_be_replayed(store: Store, config: Path) -> None:
    a1, _ = store.add_dead_letters([_delivery("A", 1), _delivery("A", 2, "parked")])

    preview = run(deadletter, config, "replay", "--route", "pos-sales", "--dry-run", env={"COLUMNS": "200"})

    assert preview.exit_code == 0, preview.output
    assert "would replay 1 dead letter(s)" in preview.output and "A" in preview.output
    assert [letter.status for letter in store.list_dead_letters()] == ["dead", "parked"]
    assert store.list_audit(f"deadletter:{a1}") == []


def test_replays_that_would_publish_to_the_commands_own_memory_broker_are_refused(
    store: Store, config: Path, tmp_path: Path
) -> None:
    delivery = store.add_dead_letters([_delivery("A", 1)])[0]
    record = _bad_record(store, config)
    store.record_deliveries("erp", [{"event_id": "A-0", "sequence_key": "A", "type": "sale"}])
    since = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    opened = tmp_path / "editor-opened"
    editor = f"{shlex.quote(sys.executable)} -c \"import pathlib; pathlib.Path('{opened}').touch()\""

    by_id = run(deadletter, config, "replay", str(record))
    by_filter = run(deadletter, config, "replay", "--route", "pos-sales")
    dry = run(deadletter, config, "replay", "--route", "pos-sales", "--dry-run", "--json")
    edited = run(deadletter, config, "edit", str(record), env={"EDITOR": editor})
    history = run(replay_history, config, "--target", "erp", "--since", since)
    history_dry = run(replay_history, config, "--target", "erp", "--since", since, "--dry-run")

    for refused in (by_id, by_filter, edited, history):
        assert refused.exit_code == 2, refused.output
        assert "memory://" in refused.output and "amqp://" in refused.output
    assert "nothing replayed" in by_id.output and f"dead letter {record}" in by_id.output
    assert not opened.exists()
    # Nothing moved: not the record, and not the delivery letter the filter also matched.
    assert [store.get_dead_letter(i).status for i in (delivery, record)] == ["dead", "dead"]  # type: ignore[union-attr]
    assert store.list_audit() == []
    assert dry.exit_code == 0 and {d["id"] for d in json.loads(dry.output)} == {delivery, record}
    assert history_dry.exit_code == 0 and "would re-send 1 event(s) to erp" in history_dry.output


@pytest.mark.parametrize(
    ("reason", "advice"),
    [("link", "symbolic link, never read"), ("file_name", "not UTF-8"), ("changed", "new event ids")],
)
def test_a_refused_file_that_going_back_would_not_fix_stays_in_errors_with_advice(
    store: Store, config: Path, tmp_path: Path, reason: str, advice: str
) -> None:
    refused = tmp_path / "errors" / "pos-0010.csv"
    refused.write_text("TXN,SKU,STORE,QTY,SOLD_AT\n", encoding="utf-8")
    letter_id = store.add_dead_letter(
        route="pos-sales", stage="ingress", reason=reason, detail="refused", payload={"file": str(refused)}
    )

    result = run(deadletter, config, "replay", str(letter_id))

    assert refused.exists() and not (tmp_path / "inbox" / "pos-0010.csv").exists()
    assert advice in result.output, result.output
    assert store.get_dead_letter(letter_id).status == "dead"
