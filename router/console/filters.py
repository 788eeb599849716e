"""The dead-letter filters an operator types on the console's letters page or bulk replay form."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from deadletter import STAGES, STATUSES

FILTERS = ("route", "target", "stage", "reason", "status", "key", "since", "until")
"""The dead-letter filters a page or a bulk replay takes (``key`` is the sequence key)."""


class BadFilter(ValueError):
    """A filter value an operator typed that cannot be used (an unknown stage, a malformed time)."""


@dataclass(frozen=True)
class LetterFilter:
    """The dead-letter filters of a page or a bulk replay, as typed (``values``) and as the store wants."""

    values: dict[str, str]

    @classmethod
    def read(cls, source: Mapping[str, Any]) -> LetterFilter:
        return cls(
            {name: str(source[name]).strip() for name in FILTERS if str(source.get(name) or "").strip()}
        )

    def store_filters(self) -> dict[str, Any]:
        """Keyword arguments for Store.list_dead_letters; BadFilter for a value it cannot take."""
        given: dict[str, Any] = dict(self.values)
        if "stage" in given and given["stage"] not in STAGES:
            raise BadFilter(f"stage {given['stage']!r} is not one of {', '.join(STAGES)}")
        if "status" in given and given["status"] not in STATUSES:
            raise BadFilter(f"status {given['status']!r} is not one of {', '.join(STATUSES)}")
        if "key" in given:
            given["sequence_key"] = given.pop("key")
        for name in ("since", "until"):
            if name in given:
                given[name] = parse_time(name, given[name])
        return given

    def query(self, **extra: Any) -> str:
        return urlencode({**self.values, **{k: v for k, v in extra.items() if v is not None}})


def parse_time(name: str, value: str) -> datetime:
    """An ISO 8601 time typed in a form; without an offset it is taken as UTC (the console shows UTC)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise BadFilter(f"{name} {value!r} is not an ISO 8601 time such as 2026-11-24T09:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
