"""The audit trail's hash chain: each record carries the hash of the one before it, so a record changed,
deleted, inserted or moved by hand (raw SQL on the store) is found by ``router audit verify``.

A record's hash is SHA-256 over the canonical JSON (sorted keys, no spaces, UTF-8) of its ``at``,
``actor``, ``action``, ``subject`` and ``detail`` plus ``prev_hash``; the first record chains from
``GENESIS``. The id is left out on purpose: ids are the order verify walks, so a moved record shows
as moved rather than as changed. The head of the chain (the last hash) lives in the one-row table
``audit_chain``; every append first updates that row, which on PostgreSQL locks it until commit and
on SQLite takes the database's write lock, so two writers never chain from the same head. Records
are chained as the session flushes them, so they must be added as ``AuditRow`` objects
(``session.add``); a Core INSERT bypasses the chain and verify reports its row as inserted.

Rows written before the chain existed are chained once, in id order, when a chain-aware router first
opens the store (the "anchor", itself recorded as an ``audit.anchored`` record): from then on they are
protected, but what happened to them before that moment cannot be known. Reading the chain back and
naming its first break is :mod:`state.audit_verify`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, event, inspect, select, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, UOWTransaction, sessionmaker

from state.tables import AuditChainRow, AuditRow

GENESIS = hashlib.sha256(b"router audit trail genesis").hexdigest()
HEAD_ID = 1
ANCHOR_ACTION = "audit.anchored"
CHAIN_COLUMNS = ("prev_hash", "hash")


class AuditChainError(RuntimeError):
    """The audit trail cannot be appended to without breaking its chain (e.g. its head row is gone)."""


def record_hash(*, at: datetime, actor: str, action: str, subject: str, detail: Any, prev_hash: str) -> str:
    """SHA-256 (hex) of a record's canonical serialisation chained to ``prev_hash``."""
    if at.tzinfo is None:
        raise ValueError(f"audit time {at.isoformat()} has no timezone; the chain hashes UTC instants")
    canonical = json.dumps(
        {
            "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
            "actor": actor,
            "action": action,
            "subject": subject,
            "detail": detail,
            "prev_hash": prev_hash,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def hash_of(row: AuditRow, prev_hash: str) -> str:
    """The hash a stored record should carry when chained from ``prev_hash``."""
    return record_hash(
        at=row.at,
        actor=row.actor,
        action=row.action,
        subject=row.subject,
        detail=row.detail,
        prev_hash=prev_hash,
    )


def add_chain_columns(connection: Connection) -> None:
    """Give an ``audit_log`` created before the chain its ``prev_hash`` and ``hash`` columns.

    Two processes may open an old store at once: PostgreSQL's ``ADD COLUMN IF NOT EXISTS`` waits for
    the other's lock and then does nothing; SQLite has no such clause, so its "duplicate column" error
    is the sign the other process won.
    """
    present = {column["name"] for column in inspect(connection).get_columns(AuditRow.__tablename__)}
    for name in CHAIN_COLUMNS:
        if name in present:
            continue
        if connection.dialect.name == "postgresql":
            connection.execute(
                text(f"ALTER TABLE {AuditRow.__tablename__} ADD COLUMN IF NOT EXISTS {name} VARCHAR(64)")
            )
            continue
        try:
            connection.execute(text(f"ALTER TABLE {AuditRow.__tablename__} ADD COLUMN {name} VARCHAR(64)"))
        except OperationalError as error:
            if "duplicate column" not in str(error.orig).lower():
                raise


class AuditChain:
    """Keeps the hash chain of one store: chains new audit rows as they are flushed, anchors rows from
    before the chain, and verifies the trail."""

    def __init__(self, dumps: Callable[[Any], str]) -> None:
        """``dumps`` is the store's JSON serialiser: a detail is hashed exactly as it will be read back."""
        self._dumps = dumps

    def install(self, sessions: sessionmaker[Session]) -> None:
        """Chain every ``AuditRow`` added through ``sessions``, whichever store method adds it."""
        event.listen(sessions, "before_flush", self._chain_new_rows)

    def _chain_new_rows(self, session: Session, _context: UOWTransaction, _instances: object) -> None:
        rows = [instance for instance in session.new if isinstance(instance, AuditRow)]
        if not rows:
            return
        # Flush inserts them in the order they were added, so they get ids in that order too.
        # Every pending row has an insert order; the type allows None for persistent ones.
        rows.sort(key=lambda row: inspect(row).insert_order or 0)
        head = self._lock_head(session)
        for row in rows:
            row.detail = json.loads(self._dumps(row.detail)) if row.detail is not None else None
            row.prev_hash = head
            row.hash = head = hash_of(row, head)
        session.execute(update(AuditChainRow).where(AuditChainRow.id == HEAD_ID).values(last_hash=head))

    @staticmethod
    def _lock_head(session: Session) -> str:
        """Lock the chain head for the rest of the transaction and return the last hash."""
        # An UPDATE, not SELECT ... FOR UPDATE: SQLite has no row locks, and a write is what takes its
        # database lock (the driver opens the transaction before the first write).
        session.execute(
            update(AuditChainRow).where(AuditChainRow.id == HEAD_ID).values(last_hash=AuditChainRow.last_hash)
        )
        head = session.scalar(select(AuditChainRow.last_hash).where(AuditChainRow.id == HEAD_ID))
        if head is None:
            raise AuditChainError(
                f"the audit chain head (table {AuditChainRow.__tablename__}) is missing; nothing is "
                "appended to the trail until it is restored (run `router audit verify`)"
            )
        return head

    def start(self, session: Session, actor: str) -> int:
        """Create the chain head on a store's first open, chaining rows from before the chain; returns
        how many such rows were anchored (0 when the chain already existed or there were none)."""
        insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else postgresql_insert
        created = session.connection().execute(
            insert(AuditChainRow)
            .values(id=HEAD_ID, last_hash=GENESIS, started_at=datetime.now(UTC))
            .on_conflict_do_nothing()
            .returning(AuditChainRow.id)
        )
        if created.first() is None:
            return 0
        legacy = list(session.scalars(select(AuditRow).where(AuditRow.hash.is_(None)).order_by(AuditRow.id)))
        head = GENESIS
        for row in legacy:
            row.prev_hash = head
            row.hash = head = hash_of(row, head)
        if not legacy:
            return 0
        session.execute(update(AuditChainRow).where(AuditChainRow.id == HEAD_ID).values(last_hash=head))
        session.add(
            AuditRow(
                at=datetime.now(UTC),
                actor=actor,
                action=ANCHOR_ACTION,
                subject=f"audit:{legacy[0].id}-{legacy[-1].id}",
                detail={
                    "records": len(legacy),
                    "first_id": legacy[0].id,
                    "last_id": legacy[-1].id,
                    "reason": "written before the hash chain; chained as found on this first open",
                },
            )
        )
        return len(legacy)
