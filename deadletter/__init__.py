"""The dead-letter store: failed records and events, parking, replay, audit."""

from deadletter.store import (
    AuditEntry,
    DeadLetter,
    DeadLetterNotFound,
    DeadLetterStage,
    DeadLetterStateError,
    DeadLetterStatus,
    DeliveryState,
    JournalEntry,
    NewDeadLetter,
    StatusChange,
    Store,
    StoreUnavailable,
)

__all__ = [
    "AuditEntry",
    "DeadLetter",
    "DeadLetterNotFound",
    "DeadLetterStage",
    "DeadLetterStateError",
    "DeadLetterStatus",
    "DeliveryState",
    "JournalEntry",
    "NewDeadLetter",
    "StatusChange",
    "Store",
    "StoreUnavailable",
]
