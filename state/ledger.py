"""The delivered-events ledger and journal, and snapshot marks: which events each target accepted
(so a redelivery is skipped), their bodies for ``router replay``, and the newest stock.snapshot applied
per key (the stale guard). One query per batch, never one per event."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, delete, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from deadletter.models import OPEN_STATUSES
from state.engine import StoreEngine, aware, chunks, rows_changed
from state.tables import DeadLetterRow, DeliveredEventRow, SnapshotMarkRow

SNAPSHOT_TYPE = "stock.snapshot"


def occurred_at_of(event: Mapping[str, Any]) -> datetime | None:
    """An event's ``occurred_at`` as an aware datetime; None when missing, malformed or without offset."""
    try:
        occurred = datetime.fromisoformat(event["occurred_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return occurred if occurred.tzinfo is not None else None


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


def record_deliveries_in(session: Session, target: str, events: Sequence[Mapping[str, Any]]) -> None:
    """Within ``session``'s transaction: ledger and journal rows, and snapshot marks moved forward only."""
    insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else postgresql_insert
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
    session.execute(insert(DeliveredEventRow).on_conflict_do_nothing(), rows)
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
    statement = insert(SnapshotMarkRow)
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


class LedgerStore(StoreEngine):
    """Tables ``delivered_events`` (ledger and journal in one row) and ``snapshot_marks``."""

    def delivery_state(self, target: str, events: Sequence[Mapping[str, Any]]) -> DeliveryState:
        """What the store knows about a batch of events bound for ``target``, in one transaction."""
        ids = list(dict.fromkeys(e["event_id"] for e in events))
        keys = list(dict.fromkeys(e["sequence_key"] for e in events if e.get("sequence_key") is not None))
        state = DeliveryState()
        with self._transaction() as session:
            for chunk in chunks(ids):
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
            for chunk in chunks(keys):
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
                record_deliveries_in(session, target, events)


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
            .where(DeliveredEventRow.delivered_at >= aware("since", since))
            .order_by(DeliveredEventRow.id)
        )
        if until is not None:
            query = query.where(DeliveredEventRow.delivered_at < aware("until", until))
        if sequence_key is not None:
            query = query.where(DeliveredEventRow.sequence_key == sequence_key)
        with self._transaction() as session:
            return [_journal_entry(row) for row in session.scalars(query)]

    def newest_snapshots(self, target: str, sequence_keys: Collection[str]) -> dict[str, JournalEntry]:
        """Per key, the journal entry of the newest stock.snapshot applied at ``target`` (its snapshot
        mark); keys whose mark's event left the journal are absent."""
        found: dict[str, JournalEntry] = {}
        with self._transaction() as session:
            for chunk in chunks(list(dict.fromkeys(sequence_keys))):
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
        cutoff = aware("before", before)
        with self._transaction() as session:
            result = session.execute(delete(DeliveredEventRow).where(DeliveredEventRow.delivered_at < cutoff))
            return rows_changed(result)


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

