"""Retry policy for deliveries: exponential backoff with full jitter that honours a target's Retry-After."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

_DELTA_SECONDS = re.compile(r"\d+")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a delivery is retried in place (all durations in seconds)."""

    attempts: int = 10
    initial: float = 0.5
    max_delay: float = 60.0
    max_age: float = 1500.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be at least 1, got {self.attempts}")
        for name in ("initial", "max_delay", "max_age"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"retry {name} must be a non-negative number of seconds, got {value!r}")

    def delay(self, attempt: int, retry_after: float | None, *, remaining: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based) before the next one.

        Full jitter spreads retries of many workers hitting the same recovering target; a server's
        Retry-After is a floor, and ``remaining`` (time left before ``max_age``) caps the whole wait.
        """
        ceiling = min(self.max_delay, self.initial * 2 ** max(attempt - 1, 0))
        wait = random.uniform(0, ceiling)
        if retry_after is not None:
            wait = max(wait, retry_after)
        if remaining is not None:
            wait = min(wait, max(remaining, 0.0))
        return wait


def parse_retry_after(header: str | None, now: datetime | None = None) -> float | None:
    """Seconds a Retry-After header asks to wait (delta-seconds or HTTP-date); None when absent or invalid.

    ``now`` is the moment the date is measured from: best the response's own Date header, so a target
    whose clock is off does not skew the wait; the local clock otherwise.
    """
    if header is None:
        return None
    value = header.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    when = parse_http_date(value)
    if when is None:
        return None
    reference = now if now is not None else datetime.now(UTC)
    return max((when - reference).total_seconds(), 0.0)


def parse_http_date(value: str | None) -> datetime | None:
    """An HTTP-date (e.g. a Date or Retry-After header) as an aware UTC datetime; None if malformed."""
    if value is None:
        return None
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    # HTTP-dates are always GMT; the "-0000" zone parses as naive.
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
