"""The dead-letter store: failed records and events, parking, replay, audit."""

from deadletter.store import (
    AuditEntry,
    DeadLetter,
    DeadLetterNotFound,
    DeadLetterStage,
    DeadLetterStatus,
    NewDeadLetter,
    Store,
    StoreUnavailable,
)

__all__ = [
    "AuditEntry",
    "DeadLetter",
    "DeadLetterNotFound",
    "DeadLetterStage",
    "DeadLetterStatus",
    "NewDeadLetter",
    "Store",
    "StoreUnavailable",
]
