"""Parking in the store: a key with an open (dead or parked) letter at a target is blocked there, the
events behind it are stored as parked letters, and once nothing dead holds the key they are released
in order: delivered and marked replayed, or made the key's new dead letter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, exists, func, select

from deadletter.models import OPEN_STATUSES, DeadLetter
from ops.secrets import redact
from state.engine import chunks
from state.ledger import record_deliveries_in
from state.letters import LetterStore, letter_of
from state.tables import DeadLetterRow


class ParkingStore(LetterStore):
    """Parked keys and the release of the letters parked behind them."""

    def count_parked_keys(self, target: str) -> int:
        """How many keys are blocked at ``target`` (``router status``)."""
        query = select(func.count(func.distinct(DeadLetterRow.sequence_key))).where(
            DeadLetterRow.target == target, DeadLetterRow.status.in_(OPEN_STATUSES)
        )
        with self._transaction() as session:
            return int(session.scalar(query) or 0)

    def parked_keys_by_target(self) -> dict[str, int]:
        """Blocked keys per target, in one grouped count (the ``router_parked_keys`` gauge)."""
        query = (
            select(DeadLetterRow.target, func.count(func.distinct(DeadLetterRow.sequence_key)))
            .where(DeadLetterRow.status.in_(OPEN_STATUSES), DeadLetterRow.target.is_not(None))
            .group_by(DeadLetterRow.target)
        )
        with self._transaction() as session:
            return {target: int(count) for target, count in session.execute(query) if target is not None}

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
                letter_of(row)
                for row in session.scalars(query.order_by(DeadLetterRow.id).limit(limit))
            ]

    def complete_release(self, id: int, target: str, event: Mapping[str, Any], *, actor: str) -> None:
        """A parked letter was delivered: record the delivery and mark it replayed, in one transaction."""
        now = datetime.now(UTC)
        with self._transaction() as session:
            row = self._locked_letter(session, id)
            record_deliveries_in(session, target, [event])
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
            for chunk in chunks(list(ids)):
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
