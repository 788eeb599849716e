"""Verifying the audit trail's hash chain: reading it back in id order and naming the first break.

How the chain is written, and what a record's hash covers, is :mod:`state.audit_chain`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from state.audit_chain import GENESIS, HEAD_ID, hash_of
from state.tables import AuditChainRow, AuditRow

VERIFY_BATCH = 500


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


def verify_trail(session: Session) -> ChainReport:
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
            and hash_of(row, row.prev_hash) == row.hash,
        )
        for row in session.scalars(
            select(AuditRow).order_by(AuditRow.id).execution_options(yield_per=VERIFY_BATCH)
        )
    ]
    return ChainReport(records=len(links), head_hash=head, broken=find_break(links, head))
