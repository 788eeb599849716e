"""The delivered-events ledger and journal, and snapshot marks: which events each target accepted
(so a redelivery is skipped), their bodies for ``router replay``, and the newest stock.snapshot applied
per key (the stale guard). One query per batch, never one per event."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BindParameter,
    CompoundSelect,
    Dialect,
    and_,
    bindparam,
    delete,
    literal,
    null,
    select,
    union_all,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from deadletter.models import OPEN_STATUSES
from state.engine import QUERY_CHUNK, StoreEngine, aware, chunks, dump_document_text, rows_changed
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
    connection = session.connection()
    ledger = _ledger_insert(connection.dialect)
    delivered_at = ledger.store_time(datetime.now(UTC))
    # A re-sent event (history replay, a crash before the ack) keeps its first journal place.
    connection.exec_driver_sql(
        ledger.sql,
        [
            (
                target,
                event["event_id"],
                event.get("sequence_key"),
                ledger.store_time(occurred_at_of(event)),
                delivered_at,
                dump_document_text(dict(event)),
            )
            for event in events
        ],
    )
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
    insert = sqlite_insert if connection.dialect.name == "sqlite" else postgresql_insert
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


@dataclass(frozen=True)
class _LedgerInsert:
    """The ledger's INSERT for one dialect as driver SQL, and how that dialect stores a timestamp.

    Sent straight to the driver as one executemany: the ORM's bulk insert built and processed every
    row's parameters in Python, which cost more than the database's own work. The SQL and the
    timestamp text are those SQLAlchemy would send for the same rows.
    """

    sql: str
    store_time: Callable[[datetime | None], Any]


_LEDGER_INSERTS: dict[str, _LedgerInsert] = {}


def _ledger_insert(dialect: Dialect) -> _LedgerInsert:
    found = _LEDGER_INSERTS.get(dialect.name)
    if found is not None:
        return found
    columns = DeliveredEventRow.__table__.c
    names = ("target", "event_id", "sequence_key", "occurred_at", "delivered_at", "event")
    # psycopg binds text as of unknown type; the JSON column takes it with an explicit cast.
    values = "?, ?, ?, ?, ?, ?" if dialect.name == "sqlite" else "%s, %s, %s, %s, %s, %s::json"
    sql = (
        f"INSERT INTO {DeliveredEventRow.__tablename__} ({', '.join(names)}) VALUES ({values}) "
        "ON CONFLICT DO NOTHING"
    )
    store_time = columns.occurred_at.type.dialect_impl(dialect).bind_processor(dialect) or _unchanged
    return _LEDGER_INSERTS.setdefault(dialect.name, _LedgerInsert(sql, store_time))


def _unchanged(value: Any) -> Any:
    return value


class _Known(StrEnum):
    """What a row of the delivery-state query says about an event id or a sequence key."""

    mark = "m"
    delivered = "d"
    lettered = "l"
    blocked = "b"


def _delivery_state_query() -> CompoundSelect[str, str, datetime | None]:
    """Everything ``delivery_state`` reads, as one UNION ALL of (kind, id or key, snapshot time).

    Plain Core on the tables with expanding IN lists, so SQLAlchemy compiles it once and caches it;
    the snapshot marks come first, because a UNION's column types are those of its first SELECT.
    """
    delivered, letters = DeliveredEventRow.__table__, DeadLetterRow.__table__
    marks = SnapshotMarkRow.__table__
    target: BindParameter[str] = bindparam("target")
    ids: BindParameter[list[str]] = bindparam("ids", expanding=True)
    keys: BindParameter[list[str]] = bindparam("keys", expanding=True)
    no_time = null().label("occurred_at")
    open_letters = letters.c.status.in_(OPEN_STATUSES)
    return union_all(
        select(literal(_Known.mark.value).label("kind"), marks.c.sequence_key, marks.c.occurred_at).where(
            marks.c.target == target, marks.c.sequence_key.in_(keys)
        ),
        select(literal(_Known.delivered.value), delivered.c.event_id, no_time).where(
            delivered.c.target == target, delivered.c.event_id.in_(ids)
        ),
        select(literal(_Known.lettered.value), letters.c.event_id, no_time).where(
            letters.c.target == target, letters.c.event_id.in_(ids), open_letters
        ),
        select(literal(_Known.blocked.value), letters.c.sequence_key, no_time).where(
            letters.c.target == target, letters.c.sequence_key.in_(keys), open_letters
        ),
    )


_DELIVERY_STATE = _delivery_state_query()


class LedgerStore(StoreEngine):
    """Tables ``delivered_events`` (ledger and journal in one row) and ``snapshot_marks``."""

    def delivery_state(self, target: str, events: Sequence[Mapping[str, Any]]) -> DeliveryState:
        """What the store knows about a batch of events bound for ``target``, in one query per
        ``QUERY_CHUNK`` events."""
        ids = list(dict.fromkeys(e["event_id"] for e in events))
        keys = list(dict.fromkeys(e["sequence_key"] for e in events if e.get("sequence_key") is not None))
        state = DeliveryState()
        found: dict[str, set[str]] = {
            _Known.delivered: state.delivered,
            _Known.lettered: state.lettered,
            _Known.blocked: state.blocked,
        }
        with self._transaction() as session:
            connection = session.connection()
            for start in range(0, max(len(ids), len(keys), 1), QUERY_CHUNK):
                parameters = {
                    "target": target,
                    "ids": ids[start : start + QUERY_CHUNK],
                    "keys": keys[start : start + QUERY_CHUNK],
                }
                for kind, value, occurred in connection.execute(_DELIVERY_STATE, parameters):
                    if kind == _Known.mark:
                        assert occurred is not None  # snapshot_marks.occurred_at is NOT NULL
                        state.snapshot_marks[value] = occurred
                    else:
                        found[kind].add(value)
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

