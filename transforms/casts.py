"""Typed conversion of mapped field values: decimals (never via float), integers, dates and times."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

CAST_TYPES: tuple[str, ...] = ("string", "decimal", "int", "datetime", "date", "bool")

MAX_INT_DIGITS = 4300
"""Python's own limit for turning text into an int; a longer integer is no count of anything."""

_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:[,' ]\d{3})+(?:\.\d*)?")
_DATE_ONLY = re.compile(r"\d{4}-?\d{2}-?\d{2}")
DATE_ONLY_MAX_LENGTH = len("2026-11-24")
_TRUE = frozenset({"true", "yes", "y", "1"})
_FALSE = frozenset({"false", "no", "n", "0"})

Caster = Callable[[Any], Any]
_FIXED_OFFSETS: dict[timedelta, timezone] = {}
"""One fixed-offset zone per offset seen (a few per route), not one per datetime cast."""


class CastError(ValueError):
    """A value does not have the form its field's ``as`` asks for; the message names both."""


def make_caster(as_: str, *, tz: str | None = None, fmt: str | None = None) -> Caster:
    """Compile a cast once per field; raises ValueError for an unknown type or time zone name."""
    zone = _zone(tz) if tz else None
    if as_ == "string":
        return _to_string
    if as_ == "decimal":
        return _to_decimal
    if as_ == "int":
        return _to_int
    if as_ == "bool":
        return _to_bool
    if as_ == "datetime":
        return lambda value: _to_datetime(value, zone, tz, fmt)
    if as_ == "date":
        return lambda value: _to_date(value, fmt)
    raise ValueError(f"unknown type {as_!r}; expected one of {', '.join(CAST_TYPES)}")


def cast_value(value: Any, as_: str, *, tz: str | None, fmt: str | None) -> Any:
    """Convert one value to ``as_``; raises CastError naming the value and the expected form."""
    return make_caster(as_, tz=tz, fmt=fmt)(value)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}; expected an IANA name such as America/New_York"
        ) from None


def _scalar_text(value: Any, expected: str) -> str:
    if isinstance(value, str):
        return value.strip()
    raise CastError(f"{value!r} is not {expected}")


def _to_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | Decimal | float):
        return str(value)
    raise CastError(f"{value!r} is not a string (expected a single value, not a {type(value).__name__})")


def _to_decimal(value: Any) -> Decimal:
    if isinstance(value, Decimal) and value.is_finite():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        # Only reachable from non-JSON sources; repr is the shortest exact round trip of the float.
        return Decimal(repr(value))
    text = _scalar_text(value, "a decimal")
    if _DECIMAL.fullmatch(text):
        return Decimal(text)
    if _THOUSANDS.fullmatch(text):
        raise CastError(
            f"{text!r} is not a decimal: thousands separators are not accepted (expected e.g. 1234.50)"
        )
    raise CastError(f"{text!r} is not a decimal")


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, Decimal | float):
        exact = Decimal(value)
        if not exact.is_finite() or exact != exact.to_integral_value():
            raise CastError(f"'{value}' is not an integer")
        if exact.adjusted() >= MAX_INT_DIGITS:
            raise CastError(f"'{value}' is not an integer: it has more than {MAX_INT_DIGITS} digits")
        return int(exact)
    text = _scalar_text(value, "an integer")
    if not _INTEGER.fullmatch(text):
        raise CastError(f"{text!r} is not an integer")
    if len(text.lstrip("+-")) > MAX_INT_DIGITS:
        raise CastError(f"{text!r} is not an integer: it has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = _scalar_text(value, "a boolean (expected true/false, yes/no or 1/0)")
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise CastError(f"{text!r} is not a boolean (expected true/false, yes/no or 1/0)")


def _to_datetime(value: Any, zone: ZoneInfo | None, tz: str | None, fmt: str | None) -> datetime:
    if isinstance(value, datetime):
        parsed = value
        shown = value.isoformat()
    else:
        shown = _scalar_text(value, "a datetime")
        parsed = _parse_datetime(shown, fmt)
    if parsed.tzinfo is not None and parsed.utcoffset() is not None:
        return parsed
    if zone is None:
        raise CastError(f"naive datetime {shown!r} and no tz given for the field")
    return _attach_zone(parsed, zone, tz or "", shown)


def _parse_datetime(text: str, fmt: str | None) -> datetime:
    if fmt:
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            raise CastError(f"{text!r} does not match the datetime format {fmt!r}") from None
    if len(text) <= DATE_ONLY_MAX_LENGTH and _DATE_ONLY.fullmatch(text):
        raise CastError(f"{text!r} is a date without a time; expected an ISO 8601 date and time")
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise CastError(f"{text!r} is not an ISO 8601 datetime (e.g. 2026-11-24T10:15:00-05:00)") from None


def _attach_zone(naive: datetime, zone: ZoneInfo, tz: str, shown: str) -> datetime:
    """Give a wall-clock time the offset ``zone`` had then; an ambiguous time takes the first one."""
    local = naive.replace(tzinfo=zone, fold=0)
    offset = local.utcoffset() or timedelta(0)
    # The same instant read back in the zone has another offset exactly when the wall-clock time
    # does not exist there (it comes back shifted by the daylight saving jump).
    if local.astimezone(UTC).astimezone(zone).utcoffset() != offset:
        raise CastError(
            f"{shown!r} does not exist in {tz} (the clocks skipped it at a daylight saving change)"
        )
    fixed = _FIXED_OFFSETS.get(offset)
    if fixed is None:
        fixed = _FIXED_OFFSETS.setdefault(offset, timezone(offset))
    return local.replace(tzinfo=fixed)


def _to_date(value: Any, fmt: str | None) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    text = _scalar_text(value, "a date")
    if fmt:
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            raise CastError(f"{text!r} does not match the date format {fmt!r}") from None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise CastError(f"{text!r} is not an ISO 8601 date (e.g. 2026-11-24)") from None
