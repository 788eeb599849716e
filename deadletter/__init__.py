"""Dead letters as a domain: what a failed record or event is, its stages and statuses, and the errors
of moving it; the store keeping them is ``state``."""

from deadletter.models import (
    OPEN_STATUSES,
    STAGES,
    STATUSES,
    DeadLetter,
    DeadLetterNotFound,
    DeadLetterStage,
    DeadLetterStateError,
    DeadLetterStatus,
    LetterFilters,
    NewDeadLetter,
    StatusChange,
)

__all__ = [
    "OPEN_STATUSES",
    "STAGES",
    "STATUSES",
    "DeadLetter",
    "DeadLetterNotFound",
    "DeadLetterStage",
    "DeadLetterStateError",
    "DeadLetterStatus",
    "LetterFilters",
    "NewDeadLetter",
    "StatusChange",
]
