"""Dead letters in the store (table ``dead_letters``): adding, reading, listing and counting them,
moving their status under a lock (the row on PostgreSQL, the database's write lock on SQLite, so two
actors never both move one) and editing payloads; parking is state.parking."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Unpack

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from deadletter.models import (
    OPEN_STATUSES,
    STAGES,
    STATUSES,
    DeadLetter,
    DeadLetterNotFound,
    DeadLetterStage,
    DeadLetterStateError,
    DeadLetterStatus,
    LetterFilters,
    NewDeadLetter,
    StatusChange,
)
from ops.secrets import redact
from state.engine import StoreEngine, aware, default_actor
from state.tables import AuditRow, DeadLetterRow


def letter_of(row: DeadLetterRow) -> DeadLetter:
    """Copy an ORM row into an immutable value."""
    return DeadLetter(
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


class LetterStore(StoreEngine):
    """Dead letters; every status change is audited."""

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
            return letter_of(row) if row is not None else None

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
            return [letter_of(row) for row in session.scalars(query)]

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
            conditions.append(DeadLetterRow.created_at >= aware("since", since))
        if until is not None:
            conditions.append(DeadLetterRow.created_at < aware("until", until))
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
            yield letter_of(row)

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
            return letter_of(row)

    def open_letters_by_route(self) -> dict[str, int]:
        """Open letters (dead or parked) per route, in one grouped count (the ``router_deadletters_open``
        gauge, read when /metrics is scraped)."""
        query = (
            select(DeadLetterRow.route, func.count())
            .where(DeadLetterRow.status.in_(OPEN_STATUSES))
            .group_by(DeadLetterRow.route)
        )
        with self._transaction() as session:
            return {route: int(count) for route, count in session.execute(query)}
