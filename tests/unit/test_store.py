"""The dead-letter store on SQLite and on the real PostgreSQL: dead letters, audit, cursors, concurrency."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from deadletter import DeadLetterNotFound, DeadLetterStateError, NewDeadLetter
from state import AcceptedWebhook, Store, StoreUnavailable, normalize_store_url
from tests.conftest import StoreLocation


@pytest.fixture
def store(location: StoreLocation) -> Iterator[Store]:
    with location.open() as opened:
        yield opened


def _transform_failure(route: str = "pos-sales", line: int = 14, **overrides: object) -> NewDeadLetter:
    fields: dict[str, object] = {
        "route": route,
        "stage": "transform",
        "reason": "validation",
        "detail": f"pos-001.csv line {line} (record {line - 1}): field 'quantity': 'abc' is not a decimal",
        "payload": {"SKU": "A-1", "STORE": "S01", "QTY": "abc"},
        "source_ref": {"file": "pos-001.csv", "line": line, "record": line - 1, "message_id": "m-1"},
    }
    fields.update(overrides)
    return NewDeadLetter(**fields)  # type: ignore[arg-type]


def test_transform_failure_keeps_raw_record_and_position(store: Store) -> None:
    letter_id = store.add_dead_letter(
        route="pos-sales",
        stage="transform",
        reason="validation",
        detail="pos-001.csv line 14 (record 13): field 'quantity': 'abc' is not a decimal",
        payload={"SKU": "A-1", "STORE": "S01", "QTY": "abc"},
        source_ref={"file": "pos-001.csv", "line": 14, "record": 13, "message_id": "m-1"},
        event_id="ev-13",
    )

    letter = store.get_dead_letter(letter_id)

    assert letter is not None
    assert (letter.route, letter.stage, letter.reason, letter.status) == (
        "pos-sales",
        "transform",
        "validation",
        "dead",
    )
    assert list(letter.payload) == ["SKU", "STORE", "QTY"]  # column order survives for editing
    assert letter.payload["QTY"] == "abc"
    assert letter.source_ref == {"file": "pos-001.csv", "line": 14, "record": 13, "message_id": "m-1"}
    assert letter.event_id == "ev-13"
    assert letter.created_at.tzinfo is not None and letter.created_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - letter.created_at) < timedelta(minutes=1)


def test_delivery_failure_stores_the_canonical_event_with_decimals_as_text(store: Store) -> None:
    occurred = datetime(2024, 5, 1, tzinfo=UTC)
    event = {"event_id": "ev-1", "quantity": Decimal("2.500"), "occurred_at": occurred}
    letter_id = store.add_dead_letter(
        route="pos-sales",
        stage="delivery",
        target="erp",
        reason="http_4xx",
        detail="erp answered 422: quantity must be positive",
        payload=event,
        event_id="ev-1",
        sequence_key="A-1|S01",
        attempts=1,
    )

    letter = store.get_dead_letter(letter_id)

    assert letter is not None
    assert letter.payload == {"event_id": "ev-1", "quantity": "2.500", "occurred_at": occurred.isoformat()}
    assert (letter.target, letter.sequence_key, letter.attempts) == ("erp", "A-1|S01", 1)


def test_to_dict_gives_the_deadletter_list_json_fields(store: Store) -> None:
    [letter_id] = store.add_dead_letters([_transform_failure()])
    letter = store.get_dead_letter(letter_id)
    assert letter is not None

    document = json.loads(json.dumps(letter.to_dict()))

    listed = {"id", "route", "stage", "target", "reason", "attempts", "status", "sequence_key", "created_at"}
    assert listed | {"detail", "payload", "source_ref", "event_id"} <= set(document)
    assert document["id"] == letter_id and document["status"] == "dead" and document["target"] is None
    assert datetime.fromisoformat(document["created_at"]) == letter.created_at


def test_a_chunk_of_bad_records_is_stored_in_order(store: Store) -> None:
    ids = store.add_dead_letters([_transform_failure(line=n) for n in (3, 7, 9)])

    letters = store.list_dead_letters()

    assert len(set(ids)) == 3
    assert [letter.id for letter in letters] == ids
    assert [letter.source_ref["line"] for letter in letters if letter.source_ref] == [3, 7, 9]
    assert store.add_dead_letters([]) == []


def test_list_filters_by_route_target_stage_status_and_limit(store: Store) -> None:
    pos = store.add_dead_letter(**_fields(_transform_failure("pos-sales")))
    supplier = store.add_dead_letter(**_fields(_transform_failure("supplier-asn")))
    erp = store.add_dead_letter(
        route="pos-sales",
        stage="delivery",
        target="erp",
        reason="retries_exhausted",
        detail="503",
        payload={},
    )
    wms = store.add_dead_letter(
        route="pos-sales", stage="delivery", target="wms", reason="http_4xx", detail="400", payload={}
    )
    store.set_status(wms, "discarded", actor="ops", reason="duplicate")

    def ids(**filters: object) -> list[int]:
        return [letter.id for letter in store.list_dead_letters(**filters)]  # type: ignore[arg-type]

    assert ids(route="pos-sales") == [pos, erp, wms]
    assert ids(route="supplier-asn") == [supplier]
    assert ids(target="erp") == [erp]
    assert ids(stage="transform") == [pos, supplier]
    assert ids(status="discarded") == [wms]
    assert ids(route="pos-sales", status="dead", stage="delivery") == [erp]
    assert ids(limit=2) == [pos, supplier]


def _fields(letter: NewDeadLetter) -> dict[str, object]:
    return {name: getattr(letter, name) for name in letter.__dataclass_fields__}


def test_list_by_time_window_and_refuses_naive_times(store: Store) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    [letter_id] = store.add_dead_letters([_transform_failure()])
    after = datetime.now(UTC) + timedelta(seconds=1)

    assert [letter.id for letter in store.list_dead_letters(since=before, until=after)] == [letter_id]
    assert store.list_dead_letters(since=after) == []
    assert store.list_dead_letters(until=before) == []
    with pytest.raises(ValueError, match=r"since .* has no timezone"):
        store.list_dead_letters(since=datetime(2024, 1, 1))


def test_listing_and_counting_refuse_an_unknown_filter_or_status(store: Store) -> None:
    with pytest.raises(TypeError, match="unknown dead-letter filter rout"):
        store.list_dead_letters(rout="orders")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unknown dead-letter filter rout"):
        store.count_dead_letters(rout="orders")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="status 'gone' is not one of"):
        store.count_dead_letters(status="gone")  # type: ignore[typeddict-item]


def test_count_open_counts_dead_and_parked_only(store: Store) -> None:
    ids = store.add_dead_letters([_transform_failure("pos-sales", line=n) for n in range(2, 6)])
    other = store.add_dead_letter(**_fields(_transform_failure("supplier-asn")))
    store.set_status(ids[1], "parked", actor="router", reason="key parked behind an earlier dead letter")
    store.set_status(ids[2], "replayed", actor="ops", reason="fixed quantity")
    store.set_status(ids[3], "discarded", actor="ops", reason="test data")

    assert store.count_open("pos-sales") == 2
    assert store.count_open("supplier-asn") == 1
    assert store.count_open() == 3
    assert store.count_open("no-such-route") == 0
    store.set_status(other, "discarded", actor="ops", reason="test data")
    assert store.count_open() == 2


def test_set_status_records_who_did_it_and_why(store: Store) -> None:
    [letter_id] = store.add_dead_letters([_transform_failure()])

    store.set_status(letter_id, "replayed", actor="alice", reason="quantity corrected to 3")

    letter = store.get_dead_letter(letter_id)
    assert letter is not None and letter.status == "replayed"
    assert letter.updated_at >= letter.created_at
    [entry] = store.list_audit(f"deadletter:{letter_id}")
    assert entry.actor == "alice"
    assert entry.subject == f"deadletter:{letter_id}"
    assert entry.detail == {"from": "dead", "to": "replayed", "reason": "quantity corrected to 3"}
    assert entry.to_dict()["action"] == entry.action


def test_set_status_refuses_unknown_ids_and_statuses(store: Store) -> None:
    [letter_id] = store.add_dead_letters([_transform_failure()])

    with pytest.raises(DeadLetterNotFound, match="dead letter 999999 does not exist"):
        store.set_status(999999, "discarded", actor="ops", reason="x")
    with pytest.raises(ValueError, match="'lost' is not one of dead, parked, replayed, discarded"):
        store.set_status(letter_id, "lost", actor="ops", reason="x")  # type: ignore[arg-type]
    assert store.list_audit() == []


def test_bad_dead_letter_fields_are_refused_with_route_and_value() -> None:
    with pytest.raises(ValueError, match="route 'pos-sales': stage 'mapping' is not one of"):
        _transform_failure(stage="mapping")
    with pytest.raises(ValueError, match="reason is empty"):
        _transform_failure(reason="")


def test_audit_defaults_the_actor_to_the_login_user(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "night-operator")

    entry_id = store.audit("replay", "target:erp", {"since": "2024-05-01T00:00:00Z", "events": 12})
    store.audit("discard", "deadletter:4", None, actor="bob")

    first, second = store.list_audit()
    assert (first.id, first.actor, first.action, first.subject) == (
        entry_id,
        "night-operator",
        "replay",
        "target:erp",
    )
    assert first.detail == {"since": "2024-05-01T00:00:00Z", "events": 12}
    assert (second.actor, second.detail) == ("bob", None)
    assert [entry.subject for entry in store.list_audit("deadletter:4")] == ["deadletter:4"]


def test_cursor_is_upserted_and_survives_a_restart(location: StoreLocation) -> None:
    with location.open() as store:
        assert store.get_cursor("rest-orders") is None
        store.set_cursor("rest-orders", "page-1")
        store.set_cursor("rest-orders", "page-2")
        store.set_cursor("rest-stock", "abc")

    with location.open() as reopened:
        assert reopened.get_cursor("rest-orders") == "page-2"
        assert reopened.get_cursor("rest-stock") == "abc"


def test_processes_starting_together_and_threads_writing_at_once(location: StoreLocation) -> None:
    openers = 4
    start_together = threading.Barrier(openers)
    stores: list[Store] = []
    errors: list[BaseException] = []
    ids: list[int] = []
    guard = threading.Lock()

    def open_store() -> None:
        start_together.wait()
        try:
            opened = location.open()
            with guard:
                stores.append(opened)
        except BaseException as error:
            errors.append(error)

    def write(store: Store, worker: int) -> None:
        try:
            for chunk in range(5):
                batch = [_transform_failure(f"route-{worker}", line=chunk * 10 + n + 2) for n in range(5)]
                new_ids = store.add_dead_letters(batch)
                with guard:
                    ids.extend(new_ids)
        except BaseException as error:
            errors.append(error)

    _run_threads([threading.Thread(target=open_store) for _ in range(openers)])
    try:
        assert errors == []
        _run_threads([threading.Thread(target=write, args=(stores[n], n)) for n in range(openers)])
        assert errors == []
        assert len(set(ids)) == 100
        assert stores[0].count_open() == 100
        assert stores[1].count_open("route-3") == 25
    finally:
        for opened in stores:
            opened.close()


def _run_threads(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_ingress_dead_letter_may_have_no_payload(store: Store) -> None:
    letter_id = store.add_dead_letter(
        route="pos-sales", stage="ingress", reason="parse", detail="pos-002.csv: not UTF-8", payload=None
    )

    letter = store.get_dead_letter(letter_id)

    assert letter is not None and letter.payload is None and letter.source_ref is None


def test_in_memory_store_is_one_database_for_every_thread() -> None:
    with Store("sqlite://") as store:
        _run_threads(
            [
                threading.Thread(target=lambda n=n: store.add_dead_letters([_transform_failure(line=n + 2)]))
                for n in range(8)
            ]
        )

        assert store.count_open() == 8
        store.ping()


def test_ping_answers_on_a_healthy_store(store: Store) -> None:
    store.ping()


def test_plain_postgresql_urls_use_the_psycopg_driver() -> None:
    assert normalize_store_url("postgresql://postgres@127.0.0.1:5432/test").drivername == "postgresql+psycopg"
    assert normalize_store_url("postgres://db/inventory").drivername == "postgresql+psycopg"
    assert normalize_store_url("sqlite:///state.db").drivername == "sqlite"


def test_unsupported_or_malformed_urls_are_refused_without_the_password() -> None:
    with pytest.raises(ValueError, match="uses 'mysql'") as unsupported:
        normalize_store_url("mysql://app:hunter2@db/inventory")
    with pytest.raises(ValueError, match="is not a database URL") as malformed:
        normalize_store_url("app:hunter2@db")
    assert "hunter2" not in str(unsupported.value) + str(malformed.value)


def test_unreachable_postgresql_is_reported_without_the_password() -> None:
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:1/test unreachable") as raised:
        Store("postgresql://postgres:hunter2@127.0.0.1:1/test")
    assert "hunter2" not in str(raised.value)


def test_schema_is_refused_for_sqlite_and_must_be_an_identifier(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PostgreSQL only"):
        Store(f"sqlite:///{tmp_path / 'state.db'}", schema="tenant_a")
    with pytest.raises(ValueError, match="not a plain SQL identifier"):
        Store("postgresql://postgres@127.0.0.1:1/test", schema="x; DROP TABLE dead_letters")


def _event(event_id: str, key: str, minute: int, kind: str = "sale") -> dict[str, object]:
    occurred = datetime(2026, 11, 24, 9, minute, tzinfo=UTC).isoformat()
    return {"event_id": event_id, "sequence_key": key, "type": kind, "occurred_at": occurred}


def test_deliveries_are_a_ledger_and_a_journal_per_target(store: Store) -> None:
    start = datetime.now(UTC) - timedelta(seconds=1)
    store.record_deliveries("erp", [_event("e1", "A", 1), _event("e2", "B", 2)])
    store.record_deliveries("erp", [_event("e1", "A", 1), _event("e3", "A", 3)])  # e1 re-sent
    store.record_deliveries("wms", [_event("e1", "A", 1)])

    state = store.delivery_state("erp", [_event("e1", "A", 1), _event("e4", "A", 4), _event("e2", "B", 2)])

    assert state.delivered == {"e1", "e2"}
    assert [entry.event_id for entry in store.journal("erp", since=start)] == ["e1", "e2", "e3"]
    assert [entry.event_id for entry in store.journal("erp", since=start, sequence_key="A")] == ["e1", "e3"]
    assert store.journal("erp", since=datetime.now(UTC) + timedelta(seconds=1)) == []
    [entry] = store.journal("wms", since=start, until=datetime.now(UTC) + timedelta(seconds=1))
    assert entry.event["occurred_at"] == "2026-11-24T09:01:00+00:00"
    assert entry.occurred_at == datetime(2026, 11, 24, 9, 1, tzinfo=UTC)


def test_history_and_webhook_ids_are_pruned_after_the_retention(store: Store) -> None:
    store.record_deliveries("erp", [_event("e1", "A", 1)])
    store.remember_webhooks([AcceptedWebhook("partner-stock", "msg_1", "m-1", "a" * 64)])
    # A redelivery records nothing new.
    store.remember_webhooks([AcceptedWebhook("partner-stock", "msg_1", "m-1", "b" * 64)])

    keys = [("partner-stock", "msg_1"), ("other-route", "msg_1")]
    assert store.webhook_bodies(keys) == {("partner-stock", "msg_1"): "a" * 64}
    assert store.prune_journal(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert store.prune_webhook_ids(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert store.prune_journal(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert store.delivery_state("erp", [_event("e1", "A", 1)]).delivered == set()
    assert store.webhook_bodies(keys) == {("partner-stock", "msg_1"): "a" * 64}, "a job of its own"
    assert store.prune_webhook_ids(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert store.webhook_bodies(keys) == {}


def test_webhook_ids_of_a_group_are_recorded_and_looked_up_together(store: Store) -> None:
    # More ids than one query chunk holds, some known before, one repeated in the group itself.
    store.remember_webhooks([AcceptedWebhook("partner-stock", "msg_0", "m-0", "0" * 64)])
    group = [AcceptedWebhook("partner-stock", f"msg_{n}", f"m-{n}", f"{n % 10}" * 64) for n in range(1200)]

    store.remember_webhooks([*group, group[5]])

    found = store.webhook_bodies([("partner-stock", f"msg_{n}") for n in range(1300)])
    assert len(found) == 1200
    assert found[("partner-stock", "msg_0")] == "0" * 64
    assert found[("partner-stock", "msg_1199")] == "9" * 64


def test_snapshot_marks_only_move_forward(store: Store) -> None:
    store.record_deliveries("erp", [_event("s1", "A", 10, "stock.snapshot"), _event("x", "B", 50)])
    store.record_deliveries("erp", [_event("s2", "A", 5, "stock.snapshot")])  # an older one re-sent

    marks = store.delivery_state("erp", [_event("s3", "A", 1), _event("y", "B", 1)]).snapshot_marks

    assert marks == {"A": datetime(2026, 11, 24, 9, 10, tzinfo=UTC)}
    store.record_deliveries("erp", [_event("s4", "A", 30, "stock.snapshot")])
    assert store.delivery_state("erp", [_event("s4", "A", 30)]).snapshot_marks["A"].minute == 30


def test_the_newest_snapshot_per_key_comes_from_the_journal_of_its_target(store: Store) -> None:
    store.record_deliveries(
        "erp", [_event("s1", "A", 10, "stock.snapshot"), _event("s2", "A", 20, "stock.snapshot")]
    )
    store.record_deliveries("erp", [_event("b1", "B", 5, "stock.snapshot"), _event("x", "C", 50)])
    store.record_deliveries("wms", [_event("w1", "A", 40, "stock.snapshot")])

    newest = store.newest_snapshots("erp", ["A", "B", "C", "D"])

    assert {key: entry.event_id for key, entry in newest.items()} == {"A": "s2", "B": "b1"}
    assert newest["A"].event["event_id"] == "s2" and newest["A"].occurred_at is not None
    assert newest["A"].occurred_at.minute == 20


def _delivery_letter(key: str, event_id: str, status: str = "dead", target: str = "erp") -> NewDeadLetter:
    return NewDeadLetter(
        route="pos-sales",
        stage="delivery",
        target=target,
        reason="parked" if status == "parked" else "http_4xx",
        detail="HTTP 422 from erp",
        payload={"event_id": event_id},
        event_id=event_id,
        sequence_key=key,
        status=status,  # type: ignore[arg-type]
    )


def test_parking_blocks_a_key_until_its_dead_letter_is_resolved(store: Store) -> None:
    dead, parked_a, parked_b = store.add_dead_letters(
        [
            _delivery_letter("A", "a1"),
            _delivery_letter("A", "a2", "parked"),
            _delivery_letter("B", "b2", "parked"),
        ]
    )
    store.add_dead_letters([_delivery_letter("C", "c1", target="wms")])

    state = store.delivery_state("erp", [_event("a3", "A", 3), _event("a2", "A", 2), _event("c2", "C", 2)])
    assert state.blocked == {"A"} and state.lettered == {"a2"}
    assert store.count_parked_keys("erp") == 2 and store.count_parked_keys("wms") == 1
    assert store.releasable_keys("erp") == ["B"]  # A is held by its dead letter
    assert store.releasable_letters("erp", "A") == []
    store.add_dead_letters([_delivery_letter("B", "b1")])
    assert store.releasable_keys("erp") == []

    assert store.reopen_parked([dead], actor="alice", reason="fixed") == [dead]
    assert store.reopen_parked([dead], actor="alice", reason="again") == []
    assert store.releasable_keys("erp") == ["A"]
    assert [letter.id for letter in store.releasable_letters("erp", "A")] == [dead, parked_a]
    store.complete_release(dead, "erp", {"event_id": "a1", "sequence_key": "A"}, actor="router")
    store.fail_release(parked_a, reason="http_4xx", detail="HTTP 422 again", attempts=1, actor="router")

    assert store.get_dead_letter(dead).status == "replayed"  # type: ignore[union-attr]
    failed = store.get_dead_letter(parked_a)
    assert failed is not None and (failed.status, failed.detail, failed.attempts) == (
        "dead",
        "HTTP 422 again",
        1,
    )
    assert store.delivery_state("erp", [_event("a1", "A", 1)]).delivered == {"a1"}
    assert store.get_dead_letter(parked_b).status == "parked"  # type: ignore[union-attr]


def test_a_letter_discarded_while_the_router_released_it_stays_discarded(store: Store) -> None:
    delivered, refused = store.add_dead_letters(
        [_delivery_letter("A", "a1", "parked"), _delivery_letter("A", "a2", "parked")]
    )
    store.set_status(delivered, "discarded", actor="alice", reason="booked by hand", only_from=("parked",))
    store.set_status(refused, "discarded", actor="alice", reason="booked by hand", only_from=("parked",))

    store.complete_release(delivered, "erp", {"event_id": "a1", "sequence_key": "A"}, actor="router")
    store.fail_release(refused, reason="http_4xx", detail="HTTP 422", attempts=1, actor="router")

    for letter_id in (delivered, refused):
        assert store.status_change(letter_id).status == "discarded"
        assert [entry.actor for entry in store.list_audit(f"deadletter:{letter_id}")] == ["alice"]
    assert store.delivery_state("erp", [_event("a1", "A", 1)]).delivered == {"a1"}


def test_one_holder_at_a_time_releases_a_key_and_an_expired_lease_is_taken_over(store: Store) -> None:
    assert store.claim_lease("release:erp", "A", "host-1", ttl=60)
    assert store.claim_lease("release:erp", "A", "host-1", ttl=60)  # renewing
    assert not store.claim_lease("release:erp", "A", "host-2", ttl=60)
    assert store.claim_lease("release:erp", "B", "host-2", ttl=60)
    store.free_lease("release:erp", "A", "host-2")  # not its lease: nothing happens
    assert not store.claim_lease("release:erp", "A", "host-2", ttl=60)
    store.free_lease("release:erp", "A", "host-1")
    assert store.claim_lease("release:erp", "A", "host-2", ttl=0)
    time.sleep(0.01)
    assert store.claim_lease("release:erp", "A", "host-3", ttl=60)  # host-2 died: its lease ran out


def test_status_moves_can_require_a_starting_status(store: Store) -> None:
    [letter_id] = store.add_dead_letters([_transform_failure()])
    store.set_status(letter_id, "discarded", actor="ops", reason="test data", only_from=("dead",))

    with pytest.raises(
        DeadLetterStateError,
        match=rf"dead letter {letter_id} is discarded \(by ops at 20\d\d-.* UTC\); it can become replayed",
    ) as refused:
        store.set_status(letter_id, "replayed", actor="ops", reason="x", only_from=("dead",))
    assert (refused.value.change.status, refused.value.change.actor) == ("discarded", "ops")
    assert store.status_change(letter_id) == refused.value.change


def test_a_status_move_is_undone_when_the_work_it_stands_for_fails(store: Store) -> None:
    [letter_id] = store.add_dead_letters([_transform_failure()])

    with (
        pytest.raises(OSError, match="broker gone"),
        store.changing_status(letter_id, "replayed", actor="ops", reason="x", only_from=("dead",)),
    ):
        raise OSError("broker gone")

    assert store.status_change(letter_id).status == "dead"
    assert store.list_audit(f"deadletter:{letter_id}") == []


def test_an_edited_payload_is_audited_with_old_and_new(store: Store) -> None:
    [letter_id] = store.add_dead_letters([_transform_failure()])

    edited = store.update_payload(
        letter_id, {"SKU": "A-1", "STORE": "S01", "QTY": "3"}, actor="carol", reason="typo"
    )

    assert edited.payload["QTY"] == "3"
    [entry] = store.list_audit(f"deadletter:{letter_id}")
    assert (entry.actor, entry.action) == ("carol", "deadletter.edited")
    assert entry.detail is not None and entry.detail["old_payload"]["QTY"] == "abc"
    assert entry.detail["new_payload"]["QTY"] == "3" and entry.detail["reason"] == "typo"
    store.set_status(letter_id, "discarded", actor="carol", reason="gave up")
    with pytest.raises(DeadLetterStateError, match="only a dead or parked letter can be edited"):
        store.update_payload(letter_id, {}, actor="carol", reason="late")


def test_a_new_letter_is_dead_or_parked_only() -> None:
    with pytest.raises(ValueError, match="a new letter is dead or parked, not 'replayed'"):
        _transform_failure(status="replayed")
