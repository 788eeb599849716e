"""Store schema migrations (Alembic) on SQLite and PostgreSQL: a new store gets exactly the declared
tables, a store created before migrations is adopted with its data, processes opening a store at once
upgrade it once, and `router store upgrade|current` report the revision."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import Connection, text

from router.cli import main
from state.engine import StoreEngine
from state.migrate import StoreNewerThanRouter, Upgrade, head_revision
from state.tables import StoreBase
from tests.conftest import StoreLocation

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def _raw(location: StoreLocation) -> Iterator[Connection]:
    """A connection to the test's database (its PostgreSQL schema created), outside any Store."""
    engine = StoreEngine(location.url, schema=location.schema)
    try:
        with engine._engine.begin() as connection:
            if location.schema is not None:
                connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{location.schema}"'))
            yield connection
    finally:
        engine.close()


def _schema_differences(location: StoreLocation) -> list[object]:
    with _raw(location) as connection:
        return list(compare_metadata(MigrationContext.configure(connection), StoreBase.metadata))


def test_a_new_store_gets_exactly_the_declared_tables_at_the_newest_revision(
    location: StoreLocation,
) -> None:
    with location.open() as store:
        assert store.upgrade == Upgrade(None, head_revision(), legacy=False)
        assert store.revision() == head_revision()

    assert _schema_differences(location) == []
    with location.open() as reopened:
        assert reopened.upgrade.before == reopened.upgrade.after == head_revision()


def test_a_store_created_before_migrations_is_stamped_with_its_data_kept(location: StoreLocation) -> None:
    created = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)
    with _raw(location) as connection:
        at = {"at": created if connection.dialect.name == "postgresql" else created.replace(tzinfo=None)}
        # What the router did before migrations: create_all on open, then plain rows.
        StoreBase.metadata.create_all(connection)
        connection.execute(
            text(
                "INSERT INTO dead_letters (route, stage, reason, detail, attempts, status, created_at, "
                "updated_at) VALUES ('pos-sales', 'transform', 'validation', 'qty not a number', 0, "
                "'dead', :at, :at)"
            ),
            at,
        )
        connection.execute(
            text(
                "INSERT INTO source_cursors (name, value, updated_at) VALUES ('rest-orders', 'page-7', :at)"
            ),
            at,
        )

    with location.open() as store:
        assert store.upgrade == Upgrade(None, head_revision(), legacy=True)
        assert "created before migrations" in str(store.upgrade)
        [letter] = store.list_dead_letters()
        assert (letter.route, letter.detail, letter.created_at) == ("pos-sales", "qty not a number", created)
        assert store.get_cursor("rest-orders") == "page-7"
        assert store.revision() == head_revision()

    assert _schema_differences(location) == []


def test_a_store_upgraded_by_a_newer_router_is_refused_not_touched(location: StoreLocation) -> None:
    location.open().close()
    with _raw(location) as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))

    with pytest.raises(StoreNewerThanRouter, match="revision 9999, which this router does not know"):
        location.open()
    with _raw(location) as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "9999"


_OPENER = textwrap.dedent(
    """
    import sys, time
    from state import Store

    time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
    with Store(sys.argv[1], schema=sys.argv[2] or None) as store:
        store.set_cursor(f"opener-{sys.argv[4]}", "ok")
    """
)


@pytest.mark.slow
def test_processes_opening_an_empty_store_at_once_upgrade_it_once(location: StoreLocation) -> None:
    start = time.time() + 2.0
    openers = [
        subprocess.Popen(
            [sys.executable, "-c", _OPENER, location.url, location.schema or "", str(start), str(n)],
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for n in range(3)
    ]
    for opener in openers:
        _, stderr = opener.communicate(timeout=60)
        assert opener.returncode == 0, stderr

    with location.open() as store:
        assert store.upgrade.before == head_revision()
        assert [store.get_cursor(f"opener-{n}") for n in range(3)] == ["ok", "ok", "ok"]
    assert _schema_differences(location) == []


def test_router_store_upgrade_prints_from_and_to_and_current_reads_without_changing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTER_STORE_URL", f"sqlite:///{tmp_path / 'router-state.db'}")
    config = str(REPO / "routes.yaml")
    runner = CliRunner()

    before = runner.invoke(main, ["store", "current", "-c", config])
    assert before.exit_code == 0, before.output
    assert f"store at no revision; newest {head_revision()}" in before.output
    with sqlite3.connect(tmp_path / "router-state.db") as untouched:
        assert untouched.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == []

    first = runner.invoke(main, ["store", "upgrade", "-c", config])
    assert first.exit_code == 0, first.output
    assert f"store empty → {head_revision()}" in first.output

    again = runner.invoke(main, ["store", "upgrade", "-c", config])
    assert again.exit_code == 0, again.output
    assert f"store {head_revision()} → {head_revision()} (already the newest)" in again.output

    after = runner.invoke(main, ["store", "current", "-c", config])
    assert after.exit_code == 0 and "up to date" in after.output, after.output
