"""Schema migrations of the store (Alembic, scripts in state/migrations): which revision a store is at,
and upgrading it to the newest, safely when several processes open one store at the same moment."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

log = logging.getLogger(__name__)
# Alembic tells at INFO which dialect it talks to on every open; the store logs the upgrades it makes.
logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)

MIGRATIONS = Path(__file__).parent / "migrations"
UPGRADE_ATTEMPTS = 5
# A table every store has had since the first router: its presence without ``alembic_version`` marks a
# store created before migrations.
LEGACY_MARKER_TABLE = "dead_letters"
# Alembic keeps the running migration in module globals (``alembic.context``), so the threads of one
# process upgrade one at a time; processes are kept apart by the database (see ``_upgrade``).
_ALEMBIC = threading.Lock()


@dataclass(frozen=True)
class Upgrade:
    """What an upgrade did: the revision before (None for a new or pre-migration store) and after."""

    before: str | None
    after: str
    legacy: bool = False

    def __str__(self) -> str:
        before = "created before migrations" if self.legacy else self.before or "empty"
        return f"{before} → {self.after}"


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


class StoreNewerThanRouter(RuntimeError):
    """The store was upgraded by a newer router: this one does not know its schema."""


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


@cache
def head_revision() -> str:
    """The newest revision of the migrations shipped with this router."""
    head = _scripts().get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS}")
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the store is at; None when it has no ``alembic_version`` table yet."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade_to_head(engine: Engine, schema: str | None, lock: AbstractContextManager[Any]) -> Upgrade:
    """Bring the store to the newest revision (creating it when empty, adopting one from before
    migrations); when another process does the same at the same moment, look again."""
    for attempt in range(1, UPGRADE_ATTEMPTS + 1):
        try:
            with lock, engine.begin() as connection:
                return _upgrade(connection, schema)
        except (OperationalError, ProgrammingError, IntegrityError) as error:
            if attempt == UPGRADE_ATTEMPTS or not lost_creation_race(error):
                raise
            time.sleep(0.05 * attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _upgrade(connection: Connection, schema: str | None) -> Upgrade:
    if schema is not None:
        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    if connection.dialect.name == "postgresql":
        # Processes upgrading one schema wait for each other here (until commit) instead of racing.
        connection.execute(
            text("SELECT pg_advisory_xact_lock(hashtext('router store'), hashtext(current_schema()))")
        )
    before = current_revision(connection)
    head = head_revision()
    legacy = before is None and inspect(connection).has_table(LEGACY_MARKER_TABLE)
    if before is not None and before != head and before not in _known_revisions():
        raise StoreNewerThanRouter(
            f"the store is at schema revision {before}, which this router does not know (its newest is "
            f"{head}): a newer router upgraded it; run that version"
        )
    if before != head:
        with _ALEMBIC:
            command.upgrade(_config(connection), "head")
        log.info("store schema upgraded: %s", Upgrade(before, head, legacy))
    return Upgrade(before, head, legacy)


@cache
def _known_revisions() -> frozenset[str]:
    return frozenset(script.revision for script in _scripts().walk_revisions())


def lost_creation_race(error: OperationalError | ProgrammingError | IntegrityError) -> bool:
    """True when creating tables failed because another process created the same thing first."""
    message = str(error.orig).lower()
    return any(
        sign in message
        for sign in ("already exists", "duplicate key", "database is locked", "unique constraint failed")
    )


def revision_of(engine: Engine) -> str | None:
    """The revision a store is at, read without changing anything (None: empty or from before migrations)."""
    with engine.connect() as connection:
        return current_revision(connection)
