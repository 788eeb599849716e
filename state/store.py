"""The store: the router's whole persistent state in one SQL database (SQLite by default, PostgreSQL
in production), composed of one class per concern over a shared engine.

A ``Store`` is shared by the worker threads of a process and by several processes. Opening one brings
its schema to the newest migration (state.migrate), tolerating two processes doing so at once.
"""

from __future__ import annotations

from sqlalchemy.exc import OperationalError

from state.audit import AuditTrail
from state.cursors import CursorStore
from state.engine import StoreUnavailable, default_actor, redacted_url
from state.leases import LeaseStore
from state.ledger import LedgerStore
from state.migrate import Upgrade, upgrade_to_head
from state.parking import ParkingStore
from state.webhook_ids import WebhookIdStore


class Store(ParkingStore, LedgerStore, LeaseStore, CursorStore, WebhookIdStore, AuditTrail):
    """Dead letters, ledger and journal, leases, source cursors, webhook ids and the audit trail in one
    SQL database, safe for many threads."""

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        """Open the store at ``url`` (``schema`` picks a PostgreSQL schema), upgrading it to the newest
        migration; ``upgrade`` says what that did."""
        super().__init__(url, schema=schema)
        try:
            self.upgrade: Upgrade = upgrade_to_head(self._engine, self.schema, self._lock)
            with self._transaction() as session:
                self._audit_chain.start(session, default_actor())
        except OperationalError as error:
            self._engine.dispose()
            raise StoreUnavailable(f"store {redacted_url(self.url)} unreachable: {error.orig}") from error
        except BaseException:
            self._engine.dispose()
            raise
