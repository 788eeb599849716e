"""Dead letters as a domain: a letter's stages and statuses, a new letter about to be stored, a stored
one, the filters letters are listed by, and the errors of a status change that is not allowed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypedDict, get_args

DeadLetterStage = Literal["ingress", "transform", "delivery"]
DeadLetterStatus = Literal["dead", "parked", "replayed", "discarded"]
STAGES: tuple[str, ...] = get_args(DeadLetterStage)
STATUSES: tuple[str, ...] = get_args(DeadLetterStatus)
OPEN_STATUSES: tuple[str, ...] = ("dead", "parked")
NEW_STATUSES: tuple[str, ...] = OPEN_STATUSES


class DeadLetterNotFound(LookupError):
    """No dead letter has the id that was asked for."""


@dataclass(frozen=True)
class StatusChange:
    """A dead letter's status and who set it when (from the audit trail; None for a letter as stored)."""

    status: str
    actor: str | None = None
    at: datetime | None = None

    @property
    def by(self) -> str:
        """``by alice at 2026-11-24 09:00:00 UTC``, or empty when the trail does not say."""
        if self.actor is None or self.at is None:
            return ""
        return f"by {self.actor} at {self.at:%Y-%m-%d %H:%M:%S} UTC"

    def __str__(self) -> str:
        return f"{self.status} {self.by}".strip()


class DeadLetterStateError(ValueError):
    """A dead letter is not in a status that allows the action asked for (e.g. replaying a discarded one).

    ``change`` says which status it has and who set it when, so an operator who lost a race to another
    learns who acted meanwhile.
    """

    def __init__(self, message: str, *, letter_id: int, change: StatusChange) -> None:
        super().__init__(message)
        self.letter_id = letter_id
        self.change = change


class LetterFilters(TypedDict, total=False):
    """What dead letters are listed and counted by: each filter given must match (``since`` <=
    created_at < ``until``); None or absent matches every letter."""

    route: str | None
    target: str | None
    status: DeadLetterStatus | None
    stage: DeadLetterStage | None
    reason: str | None
    since: datetime | None
    until: datetime | None
    sequence_key: str | None


@dataclass(frozen=True, kw_only=True)
class NewDeadLetter:
    """A dead letter about to be stored; see ``Store.add_dead_letter`` for what each field holds."""

    route: str
    stage: DeadLetterStage
    reason: str
    detail: str
    payload: Any
    source_ref: Mapping[str, Any] | None = None
    target: str | None = None
    event_id: str | None = None
    sequence_key: str | None = None
    attempts: int = 0
    status: DeadLetterStatus = "dead"

    def __post_init__(self) -> None:
        if self.status not in NEW_STATUSES:
            raise ValueError(
                f"dead letter for route {self.route!r}: a new letter is {' or '.join(NEW_STATUSES)}, "
                f"not {self.status!r}"
            )
        if self.stage not in STAGES:
            raise ValueError(
                f"dead letter for route {self.route!r}: stage {self.stage!r} "
                f"is not one of {', '.join(STAGES)}"
            )
        if not self.reason:
            raise ValueError(f"dead letter for route {self.route!r}: reason is empty; give a short category")
        if self.attempts < 0:
            raise ValueError(f"dead letter for route {self.route!r}: attempts {self.attempts} is negative")


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """A stored dead letter, detached from the database (safe to pass between threads)."""

    id: int
    route: str
    stage: str
    target: str | None
    reason: str
    detail: str
    payload: Any
    source_ref: dict[str, Any] | None
    event_id: str | None
    sequence_key: str | None
    attempts: int
    status: str
    created_at: datetime
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``router deadletter list --json`` / ``show``."""
        return {
            "id": self.id,
            "route": self.route,
            "stage": self.stage,
            "target": self.target,
            "reason": self.reason,
            "attempts": self.attempts,
            "status": self.status,
            "sequence_key": self.sequence_key,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "event_id": self.event_id,
            "detail": self.detail,
            "source_ref": self.source_ref,
            "payload": self.payload,
        }
