"""The audit trail in the store (table ``audit_log``): appending who did what to which thing, listing
it, and verifying its hash chain (state.audit_chain keeps the chain itself)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from ops.secrets import redact_data
from state.audit_chain import AuditChain
from state.audit_verify import ChainReport, verify_trail
from state.engine import StoreEngine, default_actor, dump_document
from state.tables import AuditRow


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
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "detail": self.detail,
        }


class AuditTrail(StoreEngine):
    """Audit records, chained as they are written (every ``AuditRow`` added through this store's
    sessions, including the status changes of dead letters)."""

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        super().__init__(url, schema=schema)
        self._audit_chain = AuditChain(dump_document)
        self._audit_chain.install(self._sessions)

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
            return verify_trail(session)
