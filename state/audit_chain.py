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
protected, but what happened to them before that moment cannot be known.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
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
VERIFY_BATCH = 500


class AuditChainError(RuntimeError):
    """The audit trail cannot be appended to without breaking its chain (e.g. its head row is gone)."""


class BreakKind(Enum):
    """How the chain is broken at the first bad record."""

    CONTENT_CHANGED = "content_changed"
    DELETED = "deleted"
    INSERTED = "inserted"
    REORDERED = "reordered"


@dataclass(frozen=True, kw_only=True)
class ChainLink:
    """One audit record as verify sees it: where it sits, its links, and whether its fields still hash
    to its stored hash."""

    id: int
    at: datetime
    actor: str
    action: str
    prev_hash: str | None
    hash: str | None
    content_ok: bool


@dataclass(frozen=True, kw_only=True)
class ChainBreak:
    """The first broken record: which one (None when the damage is after the last record) and why."""

    kind: BreakKind
    message: str
    record: ChainLink | None

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``router audit verify --json``."""
        record = self.record
        return {
            "kind": self.kind.value,
            "message": self.message,
            "id": record.id if record else None,
            "at": record.at.isoformat() if record else None,
            "actor": record.actor if record else None,
            "action": record.action if record else None,
        }


@dataclass(frozen=True, kw_only=True)
class ChainReport:
    """What ``router audit verify`` found: how many records, the head hash, and the first break if any."""

    records: int
    head_hash: str | None
    broken: ChainBreak | None

    @property
    def intact(self) -> bool:
        """True when every record is unchanged and in place and the head names the last one."""
        return self.broken is None

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``router audit verify --json``."""
        return {
            "intact": self.intact,
            "records": self.records,
            "head_hash": self.head_hash,
            "broken": self.broken.to_dict() if self.broken else None,
        }


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


def _hash_of(row: AuditRow, prev_hash: str) -> str:
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


def find_break(links: Sequence[ChainLink], head_hash: str | None) -> ChainBreak | None:
    """The first place the chain ``links`` (in id order) is broken, or None when it is intact.

    ``head_hash`` is the head as read before the records, so records appended after it was read are
    accepted when they chain on.
    """
    by_hash = {link.hash: index for index, link in enumerate(links) if link.hash is not None}
    expected = GENESIS
    for index, link in enumerate(links):
        if link.hash is None:
            return ChainBreak(
                kind=BreakKind.INSERTED,
                record=link,
                message="it has no hash: it was written outside the chain (by SQL, or by a router "
                "older than the chain after this store was upgraded)",
            )
        if not link.content_ok:
            return ChainBreak(
                kind=BreakKind.CONTENT_CHANGED,
                record=link,
                message="its fields no longer match its hash: it was changed after it was written",
            )
        if link.prev_hash != expected:
            return _broken_link(links, index, expected, by_hash)
        expected = link.hash
    if head_hash is None:
        return ChainBreak(
            kind=BreakKind.DELETED,
            record=None,
            message=f"the chain head (table {AuditChainRow.__tablename__}) is missing",
        )
    if head_hash != expected and head_hash not in by_hash:
        last = links[-1] if links else None
        after = f"after #{last.id}" if last else "(all of them)"
        return ChainBreak(
            kind=BreakKind.DELETED,
            record=last,
            message=f"the newest record(s) {after} were deleted: the chain head names a record that "
            "no longer exists",
        )
    return None


def _broken_link(
    links: Sequence[ChainLink], index: int, expected: str, by_hash: dict[str, int]
) -> ChainBreak:
    """Say why ``links[index]`` does not chain from the record before it."""
    link = links[index]
    before = f"#{links[index - 1].id}" if index else "the start of the trail"
    source = by_hash.get(link.prev_hash) if link.prev_hash is not None else None
    if source is None:
        following = links[index + 1] if index + 1 < len(links) else None
        if following is not None and following.prev_hash == expected:
            return ChainBreak(
                kind=BreakKind.INSERTED,
                record=link,
                message=f"it chains from no existing record and #{following.id} chains past it from "
                f"{before}: it was inserted",
            )
        return ChainBreak(
            kind=BreakKind.DELETED,
            record=link,
            message=f"the record it chains from is missing: deleted between {before} and #{link.id}",
        )
    if source < index - 1:
        inserted = links[source + 1]
        return ChainBreak(
            kind=BreakKind.INSERTED,
            record=inserted,
            message=f"#{link.id} chains from #{links[source].id}, so #{inserted.id} to "
            f"#{links[index - 1].id} sit between them outside the chain: inserted",
        )
    return ChainBreak(
        kind=BreakKind.REORDERED,
        record=link,
        message=f"it chains from #{links[source].id}, which comes after it: records were reordered",
    )


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
            row.hash = head = _hash_of(row, head)
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
            row.hash = head = _hash_of(row, head)
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

    def verify(self, session: Session) -> ChainReport:
        """Walk the whole trail in id order and report the first broken record."""
        head = session.scalar(select(AuditChainRow.last_hash).where(AuditChainRow.id == HEAD_ID))
        links = [
            ChainLink(
                id=row.id,
                at=row.at,
                actor=row.actor,
                action=row.action,
                prev_hash=row.prev_hash,
                hash=row.hash,
                content_ok=row.hash is not None
                and row.prev_hash is not None
                and _hash_of(row, row.prev_hash) == row.hash,
            )
            for row in session.scalars(
                select(AuditRow).order_by(AuditRow.id).execution_options(yield_per=VERIFY_BATCH)
            )
        ]
        return ChainReport(records=len(links), head_hash=head, broken=find_break(links, head))
