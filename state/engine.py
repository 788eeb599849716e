"""The store's database connection: URL normalisation, engine creation (SQLite's concurrency pragmas,
a PostgreSQL schema), one session and transaction per call, ping and close, ``StoreUnavailable``.

``StoreEngine`` is the base every per-concern store class (letters, ledger, leases, ...) builds on; a
``StoreEngine`` is shared by the worker threads of a process, and several processes share a database.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import date, datetime
from datetime import time as time_of_day
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast
from uuid import UUID

import orjson
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, CursorResult, Result, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from ops.secrets import redact
from state.migrate import revision_of
from state.tables import DeadLetterRow

SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10
# Rows per IN (...) list: well under SQLite's and PostgreSQL's bound-parameter limits.
QUERY_CHUNK = 500
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class StoreUnavailable(RuntimeError):
    """The store's database could not be opened or reached."""


def redacted_url(url: URL) -> str:
    """The URL as it may be printed: SQLAlchemy hides the password only; a query may carry one too
    (``?password=``, ``sslpassword``)."""
    return redact(url.render_as_string(hide_password=True))


def normalize_store_url(url: str) -> URL:
    """Parse a store URL, sending plain ``postgresql://`` (and ``postgres://``) to the psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise ValueError(
            f"store url {url.split('@')[-1]!r} is not a database URL; expected sqlite:///PATH or "
            "postgresql://USER@HOST:PORT/DATABASE"
        ) from error
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"store url {redacted_url(parsed)!r} uses {parsed.get_backend_name()!r}; "
            "the store supports sqlite:///PATH and postgresql://USER@HOST:PORT/DATABASE"
        )
    return parsed


def default_actor() -> str:
    """Who is acting when no one is named: ``$USER``, else the login name, else ``unknown``."""
    user = os.environ.get("USER")
    if user:
        return user
    try:
        return getpass.getuser()
    except OSError:
        return "unknown"


def _json_default(value: object) -> Any:
    """JSON form of the values records and events carry beyond plain JSON types."""
    if isinstance(value, Decimal | UUID | Path):
        return str(value)
    if isinstance(value, datetime | date | time_of_day):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    # A dead letter must be stored even when its payload holds something unexpected: losing the
    # record is worse than keeping its text form, which is what an operator needs to fix it.
    return str(value)


def dump_document(document: Any) -> str:
    """The JSON text the store keeps for a payload, event or audit detail."""
    return json.dumps(document, default=_json_default, ensure_ascii=False)


def dump_document_text(document: Any) -> str:
    """``dump_document`` through orjson, for the hot paths: compact, the same document when read back.

    What orjson refuses (integers beyond 64 bits, non-text keys, very deep nesting) goes through
    ``dump_document``, so nothing the store took before is refused.
    """
    try:
        return orjson.dumps(document, default=_json_default, option=orjson.OPT_PASSTHROUGH_DATETIME).decode()
    except orjson.JSONEncodeError:
        return dump_document(document)


def chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """``values`` in slices small enough for one ``IN (...)`` list."""
    for start in range(0, len(values), QUERY_CHUNK):
        yield values[start : start + QUERY_CHUNK]


def aware(name: str, moment: datetime) -> datetime:
    """Refuse a naive bound: which instant it means depends on a zone nobody stated."""
    if moment.tzinfo is None:
        raise ValueError(f"{name} {moment.isoformat()} has no timezone; give an offset, e.g. +00:00")
    return moment


def rows_changed(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE run through ``Session.execute`` changed.

    The session returns a ``CursorResult`` for DML but types it as ``Result``, so it is narrowed here.
    """
    return int(cast(CursorResult[Any], result).rowcount or 0)


def _enable_sqlite_concurrency(dbapi_connection: Any, _: Any) -> None:
    """WAL lets readers and one writer work at once; the busy timeout makes writers wait, not fail."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


class StoreEngine:
    """One SQL database (SQLite or PostgreSQL, optionally one PostgreSQL ``schema``), safe for many
    threads: every call opens its own session and transaction."""

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        self.url = normalize_store_url(url)
        self.schema = schema
        self._lock: AbstractContextManager[Any] = nullcontext()
        self._engine = self._create_engine()
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)

    def _create_engine(self) -> Engine:
        if self.url.get_backend_name() == "sqlite":
            return self._create_sqlite_engine()
        if self.schema is not None and not _SCHEMA_NAME.fullmatch(self.schema):
            raise ValueError(f"schema {self.schema!r} is not a plain SQL identifier (letters, digits, _)")
        connect_args: dict[str, Any] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
        if self.schema is not None:
            connect_args["options"] = f"-csearch_path={self.schema}"
        return create_engine(
            self.url, pool_pre_ping=True, connect_args=connect_args, json_serializer=dump_document
        )

    def _create_sqlite_engine(self) -> Engine:
        if self.schema is not None:
            raise ValueError(
                f"schema {self.schema!r} applies to PostgreSQL only, not to {redacted_url(self.url)}"
            )
        database = self.url.database
        if database in (None, "", ":memory:"):
            # One in-memory database exists per connection, so every thread must share the one
            # connection, and the lock keeps their transactions from interleaving on it.
            self._lock = threading.RLock()
            return create_engine(
                self.url,
                poolclass=StaticPool,
                connect_args={"check_same_thread": False},
                json_serializer=dump_document,
            )
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            self.url,
            pool_pre_ping=True,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            json_serializer=dump_document,
        )
        event.listen(engine, "connect", _enable_sqlite_concurrency)
        return engine

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._lock, self._sessions.begin() as session:
            yield session

    def _insert(self, table: Any) -> Any:
        """The dialect's INSERT, which has ``on_conflict_do_nothing`` / ``on_conflict_do_update``."""
        insert = sqlite_insert if self._engine.dialect.name == "sqlite" else postgresql_insert
        return insert(table)

    def ping(self) -> None:
        """Return when the database answers; raise ``StoreUnavailable`` saying why when it does not."""
        try:
            with self._lock, self._engine.connect() as connection:
                connection.execute(select(DeadLetterRow.id).limit(1))
        except DBAPIError as error:
            raise StoreUnavailable(f"store {redacted_url(self.url)} unreachable: {error.orig}") from error

    def revision(self) -> str | None:
        """The schema revision the database is at, read without upgrading it (None: not migrated yet)."""
        try:
            return revision_of(self._engine)
        except DBAPIError as error:
            raise StoreUnavailable(f"store {redacted_url(self.url)} unreachable: {error.orig}") from error

    def close(self) -> None:
        """Release every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({redacted_url(self.url)!r})"
