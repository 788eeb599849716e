"""The router's persistent state: one engine (state.engine), the tables (state.tables), their
migrations (state.migrate, state/migrations), and one module per concern: dead letters (letters),
delivered-events ledger and journal (ledger), leases, source cursors, webhook ids and the audit trail,
and parking (letters held behind an open one), composed into ``Store``."""

from state.audit import AuditEntry
from state.engine import StoreUnavailable, default_actor, normalize_store_url
from state.leases import HeldLease, lease_holder
from state.ledger import DeliveryState, JournalEntry, occurred_at_of
from state.store import Store
from state.webhook_ids import AcceptedWebhook

__all__ = [
    "AcceptedWebhook",
    "AuditEntry",
    "DeliveryState",
    "HeldLease",
    "JournalEntry",
    "Store",
    "StoreUnavailable",
    "default_actor",
    "lease_holder",
    "normalize_store_url",
    "occurred_at_of",
]
