"""The audit trail's hash chain on a real SQLite file and a real PostgreSQL database: `router audit
verify` (the real CLI, as a process) finds rows changed, deleted, swapped or inserted by raw SQL,
passes after a real CLI session, and the chain neither forks under concurrent writers (threads and
processes) nor breaks when a store from before the chain is upgraded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import JSON, Column, Engine, Integer, MetaData, String, Table, create_engine, text

from deadletter import NewDeadLetter
from state import Store, normalize_store_url
from state.audit_chain import ANCHOR_ACTION, GENESIS
from state.tables import UtcDateTime
from tests.integration.harness import write_config

PROCESS_TIMEOUT = 120


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store database: a SQLite file, or a PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_database"))


@pytest.fixture
def raw(store_url: str) -> Iterator[Engine]:
    """A plain engine on the store's database, for what an intruder with SQL access would do."""
    engine = create_engine(normalize_store_url(store_url))
    yield engine
    engine.dispose()


@pytest.fixture
def config(tmp_path: Path, store_url: str) -> Path:
    return write_config(
        tmp_path,
        broker_url="memory://",
        prefix="router",
        targets={"erp": "http://127.0.0.1:9"},
        store_url=store_url,
    )


def router(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `router` command line in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )


def verify(config: Path) -> tuple[int, dict[str, Any]]:
    done = router(config, "audit", "verify", "--json")
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def _five_records(store_url: str) -> list[int]:
    with Store(store_url) as store:
        return [
            store.audit("deadletter.discarded", f"deadletter:{n}", {"reason": f"reason {n}"}, actor=f"op{n}")
            for n in range(1, 6)
        ]


def _change_reason(raw: Engine, record: int) -> None:
    if raw.dialect.name == "sqlite":
        statement = (
            "UPDATE audit_log SET detail = json_set(detail, '$.reason', 'nothing to see') WHERE id = :id"
        )
    else:
        statement = (
            "UPDATE audit_log SET detail = jsonb_set(detail::jsonb, '{reason}', '\"nothing to see\"')::json "
            "WHERE id = :id"
        )
    with raw.begin() as connection:
        connection.execute(text(statement), {"id": record})


def _delete(raw: Engine, record: int) -> None:
    with raw.begin() as connection:
        connection.execute(text("DELETE FROM audit_log WHERE id = :id"), {"id": record})


def _swap(raw: Engine, first: int, second: int) -> None:
    with raw.begin() as connection:
        for old, new in ((first, -1), (second, first), (-1, second)):
            connection.execute(
                text("UPDATE audit_log SET id = :new WHERE id = :old"), {"old": old, "new": new}
            )


def _insert_unchained(raw: Engine, record: int) -> None:
    """A row as a router from before the chain (or a hand with SQL) writes it: no hashes."""
    with raw.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO audit_log (id, at, actor, action, subject, detail) "
                "VALUES (:id, :at, 'mallory', 'deadletter.discarded', 'deadletter:99', NULL)"
            ),
            {"id": record, "at": datetime.now(UTC).replace(tzinfo=None)},
        )


def test_an_untouched_trail_verifies(store_url: str, config: Path) -> None:
    _five_records(store_url)

    code, report = verify(config)
    human = router(config, "audit", "verify")

    assert code == 0 and report["intact"] and report["records"] == 5 and report["broken"] is None
    assert human.returncode == 0 and f"intact: 5 record(s), head {report['head_hash']}" in human.stdout


@pytest.mark.parametrize(
    ("tamper", "kind", "named", "actor", "says"),
    [
        pytest.param(
            lambda raw, ids: _change_reason(raw, ids[2]),
            "content_changed",
            2,
            "op3",
            "changed",
            id="reason-changed",
        ),
        pytest.param(
            lambda raw, ids: _delete(raw, ids[2]), "deleted", 3, "op4", "between #2 and #4", id="row-deleted"
        ),
        pytest.param(
            lambda raw, ids: _swap(raw, ids[2], ids[3]), "reordered", 2, "op4", "reordered", id="rows-swapped"
        ),
        pytest.param(
            lambda raw, ids: _delete(raw, ids[4]), "deleted", 3, "op4", "after #4", id="newest-deleted"
        ),
        pytest.param(
            lambda raw, ids: _insert_unchained(raw, ids[4] + 1),
            "inserted",
            5,
            "mallory",
            "no hash",
            id="row-inserted",
        ),
    ],
)
def test_verify_names_the_first_record_tampered_with_by_sql(
    store_url: str, raw: Engine, config: Path, tamper: Any, kind: str, named: int, actor: str, says: str
) -> None:
    ids = _five_records(store_url)
    tamper(raw, ids)

    code, report = verify(config)

    broken = report["broken"]
    expected_id = ids[named] if named < len(ids) else ids[-1] + 1
    assert code == 1 and not report["intact"]
    assert (broken["kind"], broken["id"], broken["actor"]) == (kind, expected_id, actor)
    assert says in broken["message"] and broken["at"]


def test_a_broken_trail_is_told_to_the_operator_with_the_record(
    store_url: str, raw: Engine, config: Path
) -> None:
    ids = _five_records(store_url)
    _delete(raw, ids[2])

    human = router(config, "audit", "verify")

    assert human.returncode == 1
    assert (
        f"BROKEN at record #{ids[3]} (" in human.stdout
        and "actor op4, action deadletter.discarded" in human.stdout
    )
    assert (
        f"deleted: the record it chains from is missing: deleted between #{ids[1]} and #{ids[3]}"
        in human.stdout
    )


@pytest.mark.slow
def test_a_real_cli_session_leaves_an_intact_chain(store_url: str, config: Path) -> None:
    with Store(store_url) as store:
        first, second, third = store.add_dead_letters(
            [
                NewDeadLetter(
                    route="pos-sales",
                    stage="delivery",
                    target="erp",
                    reason="http_4xx",
                    detail="HTTP 422 from erp: unknown item",
                    payload={"event_id": f"A-{n}", "sequence_key": f"K{n}"},
                    event_id=f"A-{n}",
                    sequence_key=f"K{n}",
                    attempts=1,
                )
                for n in range(3)
            ]
        )

    discarded = router(
        config, "deadletter", "discard", str(first), "--reason", "duplicate", "--actor", "carol"
    )
    replayed = router(config, "deadletter", "replay", str(second), str(third), "--actor", "dan")
    code, report = verify(config)

    assert discarded.returncode == 0, discarded.stderr
    assert replayed.returncode == 0, replayed.stderr
    assert code == 0 and report["records"] == 3, report


_APPENDER = textwrap.dedent(
    """
    import sys, threading, time
    from state import Store

    url, name, start, count = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    with Store(url) as store:
        def append(thread):
            for n in range(count):
                store.audit("test.append", f"{name}:{thread}:{n}", {"n": n}, actor=name)
        threads = [threading.Thread(target=append, args=(t,)) for t in range(2)]
        time.sleep(max(0.0, start - time.time()))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    """
)


def _appenders(url: str, names: list[str], count: int, start: float) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", _APPENDER, url, name, str(start), str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]


def _wait(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        _, errors = process.communicate(timeout=PROCESS_TIMEOUT)
        assert process.returncode == 0, errors


@pytest.mark.slow
def test_concurrent_writers_in_threads_and_processes_never_fork_the_chain(
    store_url: str, config: Path
) -> None:
    count = 15
    with Store(store_url) as store:
        letters = store.add_dead_letters(
            [
                NewDeadLetter(
                    route="pos-sales", stage="transform", reason="validation", detail="bad", payload={}
                )
                for _ in range(8)
            ]
        )
        start = datetime.now(UTC).timestamp() + 2.0
        processes = _appenders(store_url, ["proc-a", "proc-b"], count, start)

        def act(letter: int) -> None:
            for n in range(count):
                store.audit("test.append", f"thread:{letter}:{n}", {"n": n}, actor="threads")
            store.set_status(letter, "discarded", actor="threads", reason="concurrency test")

        threads = [threading.Thread(target=act, args=(letter,)) for letter in letters]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=PROCESS_TIMEOUT)
        _wait(processes)
        entries = store.list_audit()

    code, report = verify(config)

    assert len(entries) == 2 * 2 * count + len(letters) * (count + 1)
    assert code == 0 and report["records"] == len(entries), report


LEGACY = MetaData()
Table(
    "audit_log",
    LEGACY,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UtcDateTime),
    Column("actor", String(200)),
    Column("action", String(100)),
    Column("subject", String(300)),
    Column("detail", JSON(none_as_null=True)),
)


def _legacy_store(raw: Engine) -> None:
    """An audit_log as routers before the chain created it, with three rows in it."""
    LEGACY.create_all(raw)
    at = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)
    with raw.begin() as connection:
        for n in range(1, 4):
            connection.execute(
                LEGACY.tables["audit_log"]
                .insert()
                .values(
                    at=at + timedelta(minutes=n),
                    actor=f"old{n}",
                    action="deadletter.discarded",
                    subject=f"deadletter:{n}",
                    detail={"reason": f"legacy {n}", "amount": 1.5},
                )
            )


_OPENER = textwrap.dedent(
    """
    import sys, time
    from state import Store

    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    Store(sys.argv[1]).close()
    """
)


@pytest.mark.slow
def test_a_store_from_before_the_chain_is_upgraded_once_by_processes_opening_it_together(
    store_url: str, raw: Engine, config: Path
) -> None:
    _legacy_store(raw)
    start = datetime.now(UTC).timestamp() + 1.5
    openers = [
        subprocess.Popen(
            [sys.executable, "-c", _OPENER, store_url, str(start)], stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    _wait(openers)

    code, report = verify(config)
    with Store(store_url) as store:
        store.audit("deadletter.replayed", "deadletter:9", {"reason": "after the upgrade"}, actor="new")
        entries = store.list_audit()
        after = store.verify_audit()

    assert code == 0 and report["records"] == 4, report
    assert [(e.actor, e.action) for e in entries[:3]] == [
        (f"old{n}", "deadletter.discarded") for n in (1, 2, 3)
    ]
    anchor = entries[3]
    assert anchor.action == ANCHOR_ACTION and anchor.detail is not None
    assert (anchor.detail["records"], anchor.detail["first_id"], anchor.detail["last_id"]) == (3, 1, 3)
    assert after.intact and after.records == 5
    with raw.connect() as connection:
        first_prev = connection.execute(text("SELECT prev_hash FROM audit_log WHERE id = 1")).scalar_one()
    assert first_prev == GENESIS
    _change_reason(raw, 2)
    code, report = verify(config)
    assert code == 1 and (report["broken"]["kind"], report["broken"]["id"]) == ("content_changed", 2)
