"""The store on SQLite (default) or PostgreSQL: dead letters and parking, audit trail, source cursors,
the delivered-events ledger and journal, snapshot marks and webhook ids.

A ``Store`` is shared by the worker threads of a process and by several processes: every call opens
its own session and transaction, SQLite runs in WAL mode with a busy timeout, and tables are created
on open in a way that tolerates two processes starting at the same moment. A dead letter's status is
checked and changed under a lock (the row on PostgreSQL, the database's write lock on SQLite), so two
actors never both move it.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypedDict, Unpack, get_args
from uuid import UUID, uuid4

from sqlalchemy import Engine, and_, create_engine, delete, event, exists, func, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from deadletter.audit import AuditChain, ChainReport, add_chain_columns
from deadletter.models import (
    AuditRow,
    DeadLetterRow,
    DeliveredEventRow,
    LeaseRow,
    SnapshotMarkRow,
    SourceCursorRow,
    StoreBase,
    WebhookIdRow,
)
from ops.secrets import redact, redact_data

DeadLetterStage = Literal["ingress", "transform", "delivery"]
DeadLetterStatus = Literal["dead", "parked", "replayed", "discarded"]
STAGES: tuple[str, ...] = get_args(DeadLetterStage)
STATUSES: tuple[str, ...] = get_args(DeadLetterStatus)
OPEN_STATUSES: tuple[str, ...] = ("dead", "parked")
NEW_STATUSES: tuple[str, ...] = OPEN_STATUSES
SNAPSHOT_TYPE = "stock.snapshot"
# Rows per IN (...) list: well under SQLite's and PostgreSQL's bound-parameter limits.
QUERY_CHUNK = 500

SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10
CREATE_TABLES_ATTEMPTS = 5
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class StoreUnavailable(RuntimeError):
    """The store's database could not be opened or reached."""


class DeadLetterNotFound(LookupError):
    """No dead letter has the id that was asked for."""


@dataclass(frozen=True)
class StatusChange:
    """A dead letter's status and who set it when (from the audit trail; None for a letter as stored)."""

    status: str
    actor: str | None = None
    at: datetime | None = None

    @property
    def by(self) -> str:
        """``by alice at 2026-11-24 09:00:00 UTC``, or empty when the trail does not say."""
        if self.actor is None or self.at is None:
            return ""
        return f"by {self.actor} at {self.at:%Y-%m-%d %H:%M:%S} UTC"

    def __str__(self) -> str:
        return f"{self.status} {self.by}".strip()


class DeadLetterStateError(ValueError):
    """A dead letter is not in a status that allows the action asked for (e.g. replaying a discarded one).

    ``change`` says which status it has and who set it when, so an operator who lost a race to another
    learns who acted meanwhile.
    """

    def __init__(self, message: str, *, letter_id: int, change: StatusChange) -> None:
        super().__init__(message)
        self.letter_id = letter_id
        self.change = change


def _redacted(url: URL) -> str:
    # SQLAlchemy hides the password only; a query may carry one too (``?password=``, ``sslpassword``).
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
            f"store url {_redacted(parsed)!r} uses {parsed.get_backend_name()!r}; "
            "the store supports sqlite:///PATH and postgresql://USER@HOST:PORT/DATABASE"
        )
    return parsed


def lease_holder() -> str:
    """Who this process is when it holds a lease: host, process id and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex[:8]}"


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


def _dumps(document: Any) -> str:
    return json.dumps(document, default=_json_default, ensure_ascii=False)


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def occurred_at_of(event: Mapping[str, Any]) -> datetime | None:
    """An event's ``occurred_at`` as an aware datetime; None when missing, malformed or without offset."""
    try:
        occurred = datetime.fromisoformat(event["occurred_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return occurred if occurred.tzinfo is not None else None


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), QUERY_CHUNK):
        yield values[start : start + QUERY_CHUNK]


def _aware(name: str, moment: datetime) -> datetime:
    """Refuse a naive bound: which instant it means depends on a zone nobody stated."""
    if moment.tzinfo is None:
        raise ValueError(f"{name} {moment.isoformat()} has no timezone; give an offset, e.g. +00:00")
    return moment


class LetterFilters(TypedDict, total=False):
    """What dead letters are listed and counted by: each filter given must match (``since`` <=
    created_at < ``until``); None or absent matches every letter."""

    route: str | None
    target: str | None
    status: DeadLetterStatus | None
    stage: DeadLetterStage | None
    reason: str | None
    since: datetime | None
    until: datetime | None
    sequence_key: str | None


@dataclass(frozen=True, kw_only=True)
class NewDeadLetter:
    """A dead letter about to be stored; see ``Store.add_dead_letter`` for what each field holds."""

    route: str
    stage: DeadLetterStage
    reason: str
    detail: str
    payload: Any
    source_ref: Mapping[str, Any] | None = None
    target: str | None = None
    event_id: str | None = None
    sequence_key: str | None = None
    attempts: int = 0
    status: DeadLetterStatus = "dead"

    def __post_init__(self) -> None:
        if self.status not in NEW_STATUSES:
            raise ValueError(
                f"dead letter for route {self.route!r}: a new letter is {' or '.join(NEW_STATUSES)}, "
                f"not {self.status!r}"
            )
        if self.stage not in STAGES:
            raise ValueError(
                f"dead letter for route {self.route!r}: stage {self.stage!r} "
                f"is not one of {', '.join(STAGES)}"
            )
        if not self.reason:
            raise ValueError(f"dead letter for route {self.route!r}: reason is empty; give a short category")
        if self.attempts < 0:
            raise ValueError(f"dead letter for route {self.route!r}: attempts {self.attempts} is negative")


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """A stored dead letter, detached from the database (safe to pass between threads)."""

    id: int
    route: str
    stage: str
    target: str | None
    reason: str
    detail: str
    payload: Any
    source_ref: dict[str, Any] | None
    event_id: str | None
    sequence_key: str | None
    attempts: int
    status: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: DeadLetterRow) -> DeadLetter:
        """Copy an ORM row into an immutable value."""
        return cls(
            id=row.id,
            route=row.route,
            stage=row.stage,
            target=row.target,
            reason=row.reason,
            detail=row.detail,
            payload=row.payload,
            source_ref=row.source_ref,
            event_id=row.event_id,
            sequence_key=row.sequence_key,
            attempts=row.attempts,
            status=row.status,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``router deadletter list --json`` / ``show``."""
        return {
            "id": self.id,
            "route": self.route,
            "stage": self.stage,
            "target": self.target,
            "reason": self.reason,
            "attempts": self.attempts,
            "status": self.status,
            "sequence_key": self.sequence_key,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "event_id": self.event_id,
            "detail": self.detail,
            "source_ref": self.source_ref,
            "payload": self.payload,
        }


@dataclass
class DeliveryState:
    """For a batch bound for one target: ids already delivered there, ids with an open letter there,
    keys blocked there by an open letter, and the newest applied stock.snapshot time per key."""

    delivered: set[str] = field(default_factory=set)
    lettered: set[str] = field(default_factory=set)
    blocked: set[str] = field(default_factory=set)
    snapshot_marks: dict[str, datetime] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class JournalEntry:
    """An event as it was delivered to a target, kept for ``router replay`` until the retention ends."""

    id: int
    target: str
    event_id: str
    sequence_key: str | None
    occurred_at: datetime | None
    delivered_at: datetime
    event: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class AuditEntry:
    """One line of the audit trail: who did what to which thing, and the particulars."""

    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``--json`` output."""
        return {
            "id": self.id,
            "at": _iso(self.at),
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "detail": self.detail,
        }


def _enable_sqlite_concurrency(dbapi_connection: Any, _: Any) -> None:
    """WAL lets readers and one writer work at once; the busy timeout makes writers wait, not fail."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


class Store:
    """Dead letters, audit trail and source cursors in one SQL database, safe for many threads."""

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        """Open (and on first use create) the store at ``url``; ``schema`` picks a PostgreSQL schema."""
        self.url = normalize_store_url(url)
        self.schema = schema
        self._lock: AbstractContextManager[Any] = nullcontext()
        self._engine = self._create_engine()
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._audit_chain = AuditChain(_dumps)
        self._audit_chain.install(self._sessions)
        try:
            self._create_tables()
            with self._transaction() as session:
                self._audit_chain.start(session, default_actor())
        except OperationalError as error:
            self._engine.dispose()
            raise StoreUnavailable(f"store {_redacted(self.url)} unreachable: {error.orig}") from error
        except BaseException:
            self._engine.dispose()
            raise

    def _create_engine(self) -> Engine:
        if self.url.get_backend_name() == "sqlite":
            return self._create_sqlite_engine()
        if self.schema is not None and not _SCHEMA_NAME.fullmatch(self.schema):
            raise ValueError(f"schema {self.schema!r} is not a plain SQL identifier (letters, digits, _)")
        connect_args: dict[str, Any] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
        if self.schema is not None:
            connect_args["options"] = f"-csearch_path={self.schema}"
        return create_engine(self.url, pool_pre_ping=True, connect_args=connect_args, json_serializer=_dumps)

    def _create_sqlite_engine(self) -> Engine:
        if self.schema is not None:
            raise ValueError(
                f"schema {self.schema!r} applies to PostgreSQL only, not to {_redacted(self.url)}"
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
                json_serializer=_dumps,
            )
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            self.url,
            pool_pre_ping=True,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            json_serializer=_dumps,
        )
        event.listen(engine, "connect", _enable_sqlite_concurrency)
        return engine

    def _create_tables(self) -> None:
        """Create missing tables; when another process creates them at the same moment, look again."""
        for attempt in range(1, CREATE_TABLES_ATTEMPTS + 1):
            try:
                with self._lock, self._engine.begin() as connection:
                    if self.schema is not None:
                        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
                    StoreBase.metadata.create_all(connection)
                    add_chain_columns(connection)
                return
            except (OperationalError, ProgrammingError, IntegrityError) as error:
                if attempt == CREATE_TABLES_ATTEMPTS or not _lost_creation_race(error):
                    raise
                time.sleep(0.05 * attempt)

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._lock, self._sessions.begin() as session:
            yield session

    def ping(self) -> None:
        """Return when the database answers; raise ``StoreUnavailable`` saying why when it does not."""
        try:
            with self._lock, self._engine.connect() as connection:
                connection.execute(select(DeadLetterRow.id).limit(1))
        except DBAPIError as error:
            raise StoreUnavailable(f"store {_redacted(self.url)} unreachable: {error.orig}") from error

    def close(self) -> None:
        """Release every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({_redacted(self.url)!r})"

    def add_dead_letter(
        self,
        *,
        route: str,
        stage: DeadLetterStage,
        reason: str,
        detail: str,
        payload: Any,
        source_ref: Mapping[str, Any] | None = None,
        target: str | None = None,
        event_id: str | None = None,
        sequence_key: str | None = None,
        attempts: int = 0,
        status: DeadLetterStatus = "dead",
    ) -> int:
        """Store one dead letter (status ``dead``, or ``parked`` behind another) and return its id.

        ``reason`` is a short category (parse, validation, mapping, lookup, http_4xx, retries_exhausted);
        ``detail`` the full message; ``payload`` the raw record (transform) or canonical event (delivery).
        """
        letter = NewDeadLetter(
            route=route,
            stage=stage,
            reason=reason,
            detail=detail,
            payload=payload,
            source_ref=source_ref,
            target=target,
            event_id=event_id,
            sequence_key=sequence_key,
            attempts=attempts,
            status=status,
        )
        return self.add_dead_letters([letter])[0]

    def add_dead_letters(self, items: Sequence[NewDeadLetter]) -> list[int]:
        """Store a chunk's dead letters in one transaction; their ids in the order given."""
        if not items:
            return []
        now = datetime.now(UTC)
        rows = [
            DeadLetterRow(
                route=item.route,
                stage=item.stage,
                target=item.target,
                reason=redact(item.reason),
                detail=redact(item.detail),
                payload=item.payload,
                source_ref=dict(item.source_ref) if item.source_ref is not None else None,
                event_id=item.event_id,
                sequence_key=item.sequence_key,
                attempts=item.attempts,
                status=item.status,
                created_at=now,
                updated_at=now,
            )
            for item in items
        ]
        with self._transaction() as session:
            session.add_all(rows)
            session.flush()
            return [row.id for row in rows]

    def get_dead_letter(self, id: int) -> DeadLetter | None:
        """The dead letter with this id, or None."""
        with self._transaction() as session:
            row = session.get(DeadLetterRow, id)
            return DeadLetter.from_row(row) if row is not None else None

    def list_dead_letters(
        self,
        *,
        after_id: int | None = None,
        newest_first: bool = False,
        limit: int = 1000,
        **filters: Unpack[LetterFilters],
    ) -> list[DeadLetter]:
        """Dead letters oldest first (or newest first), matching every filter given (LetterFilters);
        ``after_id`` pages on: only letters past that id in this order."""
        conditions = self._letter_conditions(filters)
        if after_id is not None:
            conditions.append(DeadLetterRow.id < after_id if newest_first else DeadLetterRow.id > after_id)
        order = DeadLetterRow.id.desc() if newest_first else DeadLetterRow.id
        query = select(DeadLetterRow).where(*conditions).order_by(order).limit(limit)
        with self._transaction() as session:
            return [DeadLetter.from_row(row) for row in session.scalars(query)]

    def count_dead_letters(self, **filters: Unpack[LetterFilters]) -> int:
        """How many dead letters match the filters of :meth:`list_dead_letters` (paging aside)."""
        query = select(func.count()).select_from(DeadLetterRow).where(*self._letter_conditions(filters))
        with self._transaction() as session:
            return int(session.scalar(query) or 0)

    @staticmethod
    def _letter_conditions(filters: LetterFilters) -> list[Any]:
        unknown = filters.keys() - LetterFilters.__annotations__.keys()
        if unknown:
            raise TypeError(f"unknown dead-letter filter {', '.join(sorted(unknown))}")
        status, stage = filters.get("status"), filters.get("stage")
        since, until = filters.get("since"), filters.get("until")
        if status is not None and status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        if stage is not None and stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
        columns = {
            DeadLetterRow.route: filters.get("route"),
            DeadLetterRow.target: filters.get("target"),
            DeadLetterRow.status: status,
            DeadLetterRow.stage: stage,
            DeadLetterRow.reason: filters.get("reason"),
            DeadLetterRow.sequence_key: filters.get("sequence_key"),
        }
        conditions: list[Any] = [column == value for column, value in columns.items() if value is not None]
        if since is not None:
            conditions.append(DeadLetterRow.created_at >= _aware("since", since))
        if until is not None:
            conditions.append(DeadLetterRow.created_at < _aware("until", until))
        return conditions

    def count_open(self, route: str | None = None) -> int:
        """How many dead letters still need an operator (status dead or parked), for one route or all."""
        query = select(func.count()).select_from(DeadLetterRow).where(DeadLetterRow.status.in_(OPEN_STATUSES))
        if route is not None:
            query = query.where(DeadLetterRow.route == route)
        with self._transaction() as session:
            return int(session.scalar(query) or 0)

    def set_status(
        self,
        id: int,
        status: DeadLetterStatus,
        *,
        actor: str | None = None,
        reason: str,
        only_from: Collection[str] | None = None,
    ) -> DeadLetter:
        """Move a dead letter to ``status`` and record who did it and why in the audit trail.

        With ``only_from`` the move happens only from those statuses, checked and made in one locked
        transaction, so of an operator and a running router (or two operators) acting on one letter at
        once exactly one moves it; the other gets DeadLetterStateError.
        """
        with self.changing_status(
            id, status, actor=actor, reason=reason, only_from=STATUSES if only_from is None else only_from
        ) as letter:
            return letter

    @contextmanager
    def changing_status(
        self,
        id: int,
        status: DeadLetterStatus,
        *,
        actor: str | None = None,
        reason: str,
        only_from: Collection[str],
    ) -> Iterator[DeadLetter]:
        """Move a dead letter from one of ``only_from`` to ``status``, committing only after the body ran.

        The letter stays locked while the body does what the move stands for (publish a record, move a
        file): a second caller waits and then gets DeadLetterStateError, so the work is done once; an
        error in the body rolls the move back and the letter stays as it was.
        """
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        now = datetime.now(UTC)
        with self._transaction() as session:
            row = self._locked_letter(session, id)
            if row.status not in only_from:
                raise self._state_error(
                    session, row, f"it can become {status} only from {' or '.join(only_from)}"
                )
            previous = row.status
            row.status = status
            row.updated_at = now
            session.add(self._status_audit(row, previous, actor, reason, now))
            session.flush()
            yield DeadLetter.from_row(row)

    def _lock_for_update(self, session: Session) -> None:
        """Make this transaction's reads of the letters it changes atomic with the change.

        PostgreSQL locks the rows read ``FOR UPDATE``; SQLite ignores that clause, so there the
        transaction takes the database's write lock before it reads (``BEGIN IMMEDIATE``): a concurrent
        writer waits (busy timeout) and then reads the outcome instead of overwriting it.
        """
        if self._engine.dialect.name != "sqlite":
            return
        connection = session.connection()
        dbapi_connection: Any = connection.connection.dbapi_connection
        if not dbapi_connection.in_transaction:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    def _locked_letter(self, session: Session, id: int) -> DeadLetterRow:
        self._lock_for_update(session)
        row = session.get(DeadLetterRow, id, with_for_update=True)
        if row is None:
            raise DeadLetterNotFound(f"dead letter {id} does not exist")
        return row

    @staticmethod
    def _last_change(session: Session, row: DeadLetterRow) -> StatusChange:
        entry = session.scalars(
            select(AuditRow)
            .where(AuditRow.subject == f"deadletter:{row.id}", AuditRow.action == f"deadletter.{row.status}")
            .order_by(AuditRow.id.desc())
            .limit(1)
        ).first()
        if entry is None:
            return StatusChange(row.status)
        return StatusChange(row.status, entry.actor, entry.at)

    def _state_error(self, session: Session, row: DeadLetterRow, allowed: str) -> DeadLetterStateError:
        change = self._last_change(session, row)
        by = f" ({change.by})" if change.by else ""
        return DeadLetterStateError(
            f"dead letter {row.id} is {row.status}{by}; {allowed}", letter_id=row.id, change=change
        )

    @staticmethod
    def _status_audit(
        row: DeadLetterRow, previous: str, actor: str | None, reason: str, now: datetime
    ) -> AuditRow:
        return AuditRow(
            at=now,
            actor=actor or default_actor(),
            action=f"deadletter.{row.status}",
            subject=f"deadletter:{row.id}",
            detail={"from": previous, "to": row.status, "reason": redact(reason)},
        )

    def status_change(self, id: int) -> StatusChange:
        """A letter's status and who set it when, e.g. to tell an operator who acted on it meanwhile."""
        with self._transaction() as session:
            row = session.get(DeadLetterRow, id)
            if row is None:
                raise DeadLetterNotFound(f"dead letter {id} does not exist")
            return self._last_change(session, row)

    def update_payload(
        self,
        id: int,
        payload: Any,
        *,
        actor: str | None = None,
        reason: str,
        only_from: Collection[str] = OPEN_STATUSES,
    ) -> DeadLetter:
        """Replace the payload of a letter in one of ``only_from`` (an operator's fix), auditing the old
        and new payload; DeadLetterStateError when it is in another status."""
        now = datetime.now(UTC)
        with self._transaction() as session:
            row = self._locked_letter(session, id)
            if row.status not in only_from:
                raise self._state_error(session, row, f"only a {' or '.join(only_from)} letter can be edited")
            previous = row.payload
            row.payload = payload
            row.updated_at = now
            session.add(
                AuditRow(
                    at=now,
                    actor=actor or default_actor(),
                    action="deadletter.edited",
                    subject=f"deadletter:{id}",
                    detail={"reason": redact(reason), "old_payload": previous, "new_payload": payload},
                )
            )
            return DeadLetter.from_row(row)

    def audit(
        self, action: str, subject: str, detail: Mapping[str, Any] | None, actor: str | None = None
    ) -> int:
        """Append to the audit trail (e.g. ``audit("replay", "target:erp", {...})``); returns the entry id."""
        row = AuditRow(
            at=datetime.now(UTC),
            actor=actor or default_actor(),
            action=action,
            subject=subject,
            detail=redact_data(dict(detail)) if detail is not None else None,
        )
        with self._transaction() as session:
            session.add(row)
            session.flush()
            return row.id

    def list_audit(self, subject: str | None = None) -> list[AuditEntry]:
        """The audit trail oldest first, for one subject (``deadletter:12``) or everything."""
        query = select(AuditRow).order_by(AuditRow.id)
        if subject is not None:
            query = query.where(AuditRow.subject == subject)
        with self._transaction() as session:
            return [
                AuditEntry(
                    id=r.id, at=r.at, actor=r.actor, action=r.action, subject=r.subject, detail=r.detail
                )
                for r in session.scalars(query)
            ]

    def verify_audit(self) -> ChainReport:
        """Check the audit trail's hash chain (``router audit verify``); names the first broken record."""
        with self._transaction() as session:
            return self._audit_chain.verify(session)

    def get_cursor(self, name: str) -> str | None:
        """The last position a polling source saved under ``name``, or None before its first run."""
        with self._transaction() as session:
            row = session.get(SourceCursorRow, name)
            return row.value if row is not None else None

    def set_cursor(self, name: str, value: str) -> None:
        """Save (insert or replace) a polling source's position."""
        values = {"name": name, "value": value, "updated_at": datetime.now(UTC)}
        statement = self._insert(SourceCursorRow).values(**values)
        statement = statement.on_conflict_do_update(
            index_elements=[SourceCursorRow.name],
            set_={"value": statement.excluded.value, "updated_at": statement.excluded.updated_at},
        )
        with self._transaction() as session:
            session.execute(statement)

    def _insert(self, table: type[StoreBase]) -> Any:
        """The dialect's INSERT, which has ``on_conflict_do_nothing`` / ``on_conflict_do_update``."""
        insert = sqlite_insert if self._engine.dialect.name == "sqlite" else postgresql_insert
        return insert(table)

    # Delivery: ledger, journal and stale guard. One query per batch, never one per event.

    def delivery_state(self, target: str, events: Sequence[Mapping[str, Any]]) -> DeliveryState:
        """What the store knows about a batch of events bound for ``target``, in one transaction."""
        ids = list(dict.fromkeys(e["event_id"] for e in events))
        keys = list(dict.fromkeys(e["sequence_key"] for e in events if e.get("sequence_key") is not None))
        state = DeliveryState()
        with self._transaction() as session:
            for chunk in _chunks(ids):
                state.delivered.update(
                    session.scalars(
                        select(DeliveredEventRow.event_id).where(
                            DeliveredEventRow.target == target, DeliveredEventRow.event_id.in_(chunk)
                        )
                    )
                )
                state.lettered.update(
                    session.scalars(
                        select(DeadLetterRow.event_id).where(
                            DeadLetterRow.target == target,
                            DeadLetterRow.event_id.in_(chunk),
                            DeadLetterRow.status.in_(OPEN_STATUSES),
                        )
                    )
                )
            for chunk in _chunks(keys):
                state.blocked.update(
                    session.scalars(
                        select(DeadLetterRow.sequence_key)
                        .where(
                            DeadLetterRow.target == target,
                            DeadLetterRow.sequence_key.in_(chunk),
                            DeadLetterRow.status.in_(OPEN_STATUSES),
                        )
                        .distinct()
                    )
                )
                marks = session.execute(
                    select(SnapshotMarkRow.sequence_key, SnapshotMarkRow.occurred_at).where(
                        SnapshotMarkRow.target == target, SnapshotMarkRow.sequence_key.in_(chunk)
                    )
                )
                state.snapshot_marks.update((key, occurred) for key, occurred in marks)
        return state

    def record_deliveries(self, target: str, events: Sequence[Mapping[str, Any]]) -> None:
        """Record events the target accepted: ledger and journal, and snapshot marks moved forward only."""
        if events:
            with self._transaction() as session:
                self._record_deliveries(session, target, events)

    def _record_deliveries(self, session: Session, target: str, events: Sequence[Mapping[str, Any]]) -> None:
        now = datetime.now(UTC)
        rows = [
            {
                "target": target,
                "event_id": event["event_id"],
                "sequence_key": event.get("sequence_key"),
                "occurred_at": occurred_at_of(event),
                "delivered_at": now,
                "event": dict(event),
            }
            for event in events
        ]
        # A re-sent event (history replay, a crash before the ack) keeps its first journal place.
        session.execute(self._insert(DeliveredEventRow).on_conflict_do_nothing(), rows)
        newest: dict[str, tuple[datetime, str]] = {}
        for delivered in events:
            occurred = occurred_at_of(delivered)
            key = delivered.get("sequence_key")
            if delivered.get("type") != SNAPSHOT_TYPE or occurred is None or key is None:
                continue
            if key not in newest or newest[key][0] < occurred:
                newest[key] = (occurred, delivered["event_id"])
        if not newest:
            return
        statement = self._insert(SnapshotMarkRow)
        statement = statement.on_conflict_do_update(
            index_elements=[SnapshotMarkRow.target, SnapshotMarkRow.sequence_key],
            set_={"occurred_at": statement.excluded.occurred_at, "event_id": statement.excluded.event_id},
            where=SnapshotMarkRow.occurred_at < statement.excluded.occurred_at,
        )
        session.execute(
            statement,
            [
                {"target": target, "sequence_key": key, "occurred_at": occurred, "event_id": event_id}
                for key, (occurred, event_id) in newest.items()
            ],
        )

    def journal(
        self,
        target: str,
        *,
        since: datetime,
        until: datetime | None = None,
        sequence_key: str | None = None,
    ) -> list[JournalEntry]:
        """Events delivered to ``target`` with ``since`` <= delivered_at < ``until``, in delivery order."""
        query = (
            select(DeliveredEventRow)
            .where(DeliveredEventRow.target == target)
            .where(DeliveredEventRow.delivered_at >= _aware("since", since))
            .order_by(DeliveredEventRow.id)
        )
        if until is not None:
            query = query.where(DeliveredEventRow.delivered_at < _aware("until", until))
        if sequence_key is not None:
            query = query.where(DeliveredEventRow.sequence_key == sequence_key)
        with self._transaction() as session:
            return [_journal_entry(row) for row in session.scalars(query)]

    def newest_snapshots(self, target: str, sequence_keys: Collection[str]) -> dict[str, JournalEntry]:
        """Per key, the journal entry of the newest stock.snapshot applied at ``target`` (its snapshot
        mark); keys whose mark's event left the journal are absent."""
        found: dict[str, JournalEntry] = {}
        with self._transaction() as session:
            for chunk in _chunks(list(dict.fromkeys(sequence_keys))):
                rows = session.scalars(
                    select(DeliveredEventRow)
                    .join(
                        SnapshotMarkRow,
                        and_(
                            SnapshotMarkRow.target == DeliveredEventRow.target,
                            SnapshotMarkRow.event_id == DeliveredEventRow.event_id,
                        ),
                    )
                    .where(SnapshotMarkRow.target == target, SnapshotMarkRow.sequence_key.in_(chunk))
                )
                for row in rows:
                    if row.sequence_key is not None:
                        found[row.sequence_key] = _journal_entry(row)
        return found

    def prune_journal(self, before: datetime) -> int:
        """Forget deliveries older than ``before`` (journal retention); rows removed."""
        cutoff = _aware("before", before)
        with self._transaction() as session:
            journal = session.execute(
                delete(DeliveredEventRow).where(DeliveredEventRow.delivered_at < cutoff)
            )
            return int(journal.rowcount or 0)

    def prune_webhook_ids(self, before: datetime) -> int:
        """Forget webhook ids accepted before ``before`` (journal retention); rows removed."""
        cutoff = _aware("before", before)
        with self._transaction() as session:
            webhooks = session.execute(delete(WebhookIdRow).where(WebhookIdRow.at < cutoff))
            return int(webhooks.rowcount or 0)

    # Parking: a key with an open letter at a target is blocked there until the letter is resolved.

    def count_parked_keys(self, target: str) -> int:
        """How many keys are blocked at ``target`` (the ``router_parked_keys`` gauge)."""
        query = select(func.count(func.distinct(DeadLetterRow.sequence_key))).where(
            DeadLetterRow.target == target, DeadLetterRow.status.in_(OPEN_STATUSES)
        )
        with self._transaction() as session:
            return int(session.scalar(query) or 0)

    def releasable_keys(self, target: str) -> list[str]:
        """Keys at ``target`` whose letters are all parked: nothing dead holds them any more."""
        dead = DeadLetterRow.__table__.alias("dead")
        still_dead = exists().where(
            and_(
                dead.c.target == DeadLetterRow.target,
                dead.c.sequence_key == DeadLetterRow.sequence_key,
                dead.c.status == "dead",
            )
        )
        query = (
            select(DeadLetterRow.sequence_key, func.min(DeadLetterRow.id))
            .where(DeadLetterRow.target == target, DeadLetterRow.status == "parked", ~still_dead)
            .group_by(DeadLetterRow.sequence_key)
            .order_by(func.min(DeadLetterRow.id))
        )
        with self._transaction() as session:
            return [key for key, _ in session.execute(query) if key is not None]

    def releasable_letters(self, target: str, sequence_key: str, limit: int = 100) -> list[DeadLetter]:
        """The parked letters of one key at ``target``, oldest first (the order they must go in); none
        while a dead letter still holds the key."""
        base = (DeadLetterRow.target == target, DeadLetterRow.sequence_key == sequence_key)
        with self._transaction() as session:
            if session.scalar(select(DeadLetterRow.id).where(*base, DeadLetterRow.status == "dead").limit(1)):
                return []
            query = select(DeadLetterRow).where(*base, DeadLetterRow.status == "parked")
            return [
                DeadLetter.from_row(row)
                for row in session.scalars(query.order_by(DeadLetterRow.id).limit(limit))
            ]

    def claim_lease(self, scope: str, name: str, holder: str, ttl: float) -> bool:
        """Take (or renew) lease ``scope``/``name`` for ``ttl`` seconds; False while another holder has it."""
        now = datetime.now(UTC)
        statement = self._insert(LeaseRow).values(
            scope=scope, name=name, holder=holder, expires_at=now + timedelta(seconds=ttl)
        )
        statement = statement.on_conflict_do_update(
            index_elements=[LeaseRow.scope, LeaseRow.name],
            set_={"holder": statement.excluded.holder, "expires_at": statement.excluded.expires_at},
            where=(LeaseRow.holder == holder) | (LeaseRow.expires_at < now),
        )
        with self._transaction() as session:
            session.execute(statement)
            current = session.scalar(
                select(LeaseRow.holder).where(LeaseRow.scope == scope, LeaseRow.name == name)
            )
            return current == holder

    def renew_lease(self, scope: str, name: str, holder: str, ttl: float) -> bool:
        """Extend lease ``scope``/``name`` by ``ttl`` seconds from now, only while ``holder`` has it and it
        has not expired; False when it was lost (another holder may have taken it since)."""
        now = datetime.now(UTC)
        statement = (
            update(LeaseRow)
            .where(
                LeaseRow.scope == scope,
                LeaseRow.name == name,
                LeaseRow.holder == holder,
                LeaseRow.expires_at >= now,
            )
            .values(expires_at=now + timedelta(seconds=ttl))
        )
        with self._transaction() as session:
            return int(session.execute(statement).rowcount or 0) == 1

    def live_leases(self, scope: str) -> dict[str, str]:
        """The unexpired leases of ``scope``: name -> holder."""
        now = datetime.now(UTC)
        with self._transaction() as session:
            rows = session.execute(
                select(LeaseRow.name, LeaseRow.holder).where(
                    LeaseRow.scope == scope, LeaseRow.expires_at >= now
                )
            )
            return {name: holder for name, holder in rows}

    def free_lease(self, scope: str, name: str, holder: str) -> None:
        """Give up a lease (only if still ours)."""
        with self._transaction() as session:
            session.execute(
                delete(LeaseRow).where(
                    LeaseRow.scope == scope, LeaseRow.name == name, LeaseRow.holder == holder
                )
            )

    def complete_release(self, id: int, target: str, event: Mapping[str, Any], *, actor: str) -> None:
        """A parked letter was delivered: record the delivery and mark it replayed, in one transaction."""
        now = datetime.now(UTC)
        with self._transaction() as session:
            row = self._locked_letter(session, id)
            self._record_deliveries(session, target, [event])
            # An operator may have discarded the letter while it was on its way; the delivery stands.
            if row.status == "parked":
                row.status, row.updated_at = "replayed", now
                session.add(self._status_audit(row, "parked", actor, f"delivered to {target}", now))

    def fail_release(self, id: int, *, reason: str, detail: str, attempts: int, actor: str) -> None:
        """A parked letter failed for good: it becomes the key's dead letter, with the target's answer."""
        now = datetime.now(UTC)
        with self._transaction() as session:
            row = self._locked_letter(session, id)
            previous = row.status
            # An operator discarded it while it was on its way: that decision stands.
            if previous != "parked":
                return
            row.status, row.reason, row.detail, row.updated_at = "dead", redact(reason), redact(detail), now
            row.attempts += attempts
            session.add(self._status_audit(row, previous, actor, f"{reason}: {detail}", now))

    def reopen_parked(self, ids: Sequence[int], *, actor: str, reason: str) -> list[int]:
        """Park dead delivery letters again so the running router delivers them; returns the ids moved."""
        now = datetime.now(UTC)
        moved: list[int] = []
        with self._transaction() as session:
            self._lock_for_update(session)
            for chunk in _chunks(list(ids)):
                rows = session.scalars(
                    select(DeadLetterRow)
                    .where(
                        DeadLetterRow.id.in_(chunk),
                        DeadLetterRow.status == "dead",
                        DeadLetterRow.stage == "delivery",
                    )
                    .with_for_update()
                )
                for row in rows:
                    row.status, row.updated_at = "parked", now
                    session.add(self._status_audit(row, "dead", actor, reason, now))
                    moved.append(row.id)
        return moved

    # Webhooks: the ids a partner already delivered, per route (connectors.webhook_intake.WebhookIdLedger).

    def webhook_bodies(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """The body hash accepted under each known (route, webhook_id) of ``keys``, unknown ones absent."""
        found: dict[tuple[str, str], str] = {}
        if not keys:
            return found
        # Table columns, not ORM attributes: a plain query skips the ORM's per-call compile state,
        # which the webhook intake would otherwise pay on every group.
        table = WebhookIdRow.__table__.c
        with self._transaction() as session:
            connection = session.connection()
            for chunk in _chunks(list(keys)):
                rows = connection.execute(
                    select(table.route, table.webhook_id, table.body_sha256).where(
                        tuple_(table.route, table.webhook_id).in_(chunk)
                    )
                )
                found.update(((route, webhook_id), sha) for route, webhook_id, sha in rows)
        return found

    def remember_webhooks(self, accepted: Sequence[AcceptedWebhook]) -> None:
        """Record accepted webhook ids in one transaction; an id recorded already is left as it was."""
        if not accepted:
            return
        now = datetime.now(UTC)
        rows = [
            {
                "route": webhook.route,
                "webhook_id": webhook.webhook_id,
                "message_id": webhook.message_id,
                "body_sha256": webhook.body_sha256,
                "at": now,
            }
            for webhook in accepted
        ]
        # One executemany of a cached statement: a multi-row VALUES would be compiled anew for every group.
        statement = self._insert(WebhookIdRow.__table__).on_conflict_do_nothing()
        with self._transaction() as session:
            session.connection().execute(statement, rows)


@dataclass(frozen=True)
class AcceptedWebhook:
    """A webhook id the broker confirmed, as the ledger keeps it."""

    route: str
    webhook_id: str
    message_id: str
    body_sha256: str


def _journal_entry(row: DeliveredEventRow) -> JournalEntry:
    return JournalEntry(
        id=row.id,
        target=row.target,
        event_id=row.event_id,
        sequence_key=row.sequence_key,
        occurred_at=row.occurred_at,
        delivered_at=row.delivered_at,
        event=row.event,
    )


def _lost_creation_race(error: OperationalError | ProgrammingError | IntegrityError) -> bool:
    """True when creating tables failed because another process created the same thing first."""
    message = str(error.orig).lower()
    return "already exists" in message or "duplicate key" in message or "database is locked" in message
