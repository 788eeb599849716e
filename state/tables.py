"""Tables of the store (SQLAlchemy 2 typed ORM): dead letters, audit trail and its chain head, source
cursors, the delivered-events ledger and journal, snapshot marks, release leases on parked keys and
webhook ids.

Each concern has its own table; state/migrations creates and changes them (Alembic), so a change to a
table here comes with a new revision there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Dialect, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend; SQLite keeps no offset, so it stores naive UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Refuse naive times (their zone is a guess) and store the UTC instant."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"timestamp {value.isoformat()} has no timezone; the store needs aware times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Hand back aware UTC times whatever the backend returned."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Plain JSON rather than PostgreSQL's JSONB: JSON keeps the document as written, so a raw CSV row
# shows its columns in file order when an operator inspects or edits it.
JsonDocument = JSON(none_as_null=True)


class StoreBase(DeclarativeBase):
    """Declarative base of every table the store creates."""


class DeadLetterRow(StoreBase):
    """A record or event that could not go on: where it failed, why, and its payload for replay."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        Index("ix_dead_letters_route_status", "route", "status"),
        Index("ix_dead_letters_target_key_status", "target", "sequence_key", "status"),
        Index("ix_dead_letters_created_at", "created_at"),
        Index("ix_dead_letters_event_id", "event_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    route: Mapped[str] = mapped_column(String(200))
    stage: Mapped[str] = mapped_column(String(20))
    target: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(String(100))
    detail: Mapped[str] = mapped_column(Text)
    payload: Mapped[Any] = mapped_column(JsonDocument, nullable=True)
    source_ref: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
    event_id: Mapped[str | None] = mapped_column(String(200))
    sequence_key: Mapped[str | None] = mapped_column(String(500))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AuditRow(StoreBase):
    """One operator or system action on something the router keeps, e.g. discarding a dead letter."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_subject", "subject"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    subject: Mapped[str] = mapped_column(String(300))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
    # The hash chain (state.audit_chain): None only on rows of a store from before the chain, until
    # the store is opened by a router that chains them.
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64))


class AuditChainRow(StoreBase):
    """The head of the audit hash chain: one row, locked by every append so the chain cannot fork."""

    __tablename__ = "audit_chain"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_hash: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SourceCursorRow(StoreBase):
    """Where a polling source got to (a REST page cursor, a last-seen marker), so a restart resumes."""

    __tablename__ = "source_cursors"

    name: Mapped[str] = mapped_column(String(300), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class DeliveredEventRow(StoreBase):
    """An event a target accepted: the effectively-once ledger and, with its body, the replay journal.

    One row serves both purposes so a delivery costs one insert; ``(target, event_id)`` is unique, so
    a redelivered or re-ingested event is recognised, and a history replay does not journal it twice.
    Rows older than the journal retention are pruned; beyond it the target's Idempotency-Key still holds.
    """

    __tablename__ = "delivered_events"
    __table_args__ = (
        UniqueConstraint("target", "event_id", name="uq_delivered_events_target_event"),
        Index("ix_delivered_events_target_delivered_at", "target", "delivered_at"),
        Index("ix_delivered_events_delivered_at", "delivered_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target: Mapped[str] = mapped_column(String(200))
    event_id: Mapped[str] = mapped_column(String(200))
    sequence_key: Mapped[str | None] = mapped_column(String(500))
    occurred_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    delivered_at: Mapped[datetime] = mapped_column(UtcDateTime)
    event: Mapped[Any] = mapped_column(JsonDocument)


class SnapshotMarkRow(StoreBase):
    """The occurred_at of the newest stock.snapshot applied per key at a target (the stale guard)."""

    __tablename__ = "snapshot_marks"

    target: Mapped[str] = mapped_column(String(200), primary_key=True)
    sequence_key: Mapped[str] = mapped_column(String(500), primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime)
    event_id: Mapped[str] = mapped_column(String(200))


class LeaseRow(StoreBase):
    """A named lease: which process does a job that only one may do at a time, until when.

    Scopes in use: ``release:<target>`` (name: a parked sequence key being released), ``poll``
    (name: a REST route being polled), ``members:<target>`` (name: a process delivering to the
    target, its heartbeat) and ``partition:<target>`` (name: a partition number, held by the process
    consuming it).
    """

    __tablename__ = "leases"

    scope: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(500), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


class WebhookIdRow(StoreBase):
    """A partner webhook-id accepted on a route, so a redelivery is answered without republishing."""

    __tablename__ = "webhook_ids"
    __table_args__ = (Index("ix_webhook_ids_at", "at"),)

    route: Mapped[str] = mapped_column(String(200), primary_key=True)
    webhook_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(300))
    body_sha256: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UtcDateTime)
