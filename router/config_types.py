"""Value types of routes.yaml: durations (`500ms`, `2s`, `1h`), sizes (`64KiB`) and rates (`100/s`)."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator

_DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>B|KB|KiB|MB|MiB|GB|GiB)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}
_RATE = re.compile(r"(?P<count>\d+)\s*/\s*(?P<unit>s|m|h|second|minute|hour)")
_RATE_UNITS = {"s": 1.0, "second": 1.0, "m": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds from ``500ms``, ``2s``, ``5m``, ``1h``, ``7d`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 500ms, 2s, 5m or 1h, not {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if match is None:
            raise ValueError(f"expected a duration like 500ms, 2s, 5m or 1h, not {str(value)!r}")
        seconds = float(match["number"]) * _DURATION_UNITS[match["unit"]]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a non-negative duration, not {value!r}")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from ``64KiB``, ``1MiB``, ``10MB`` or a bare number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.fullmatch(str(value).strip())
    if match is None or isinstance(value, bool):
        raise ValueError(f"expected a size like 64KiB, 1MiB or 500000 (bytes), not {str(value)!r}")
    return int(float(match["number"]) * _SIZE_UNITS[(match["unit"] or "b").lower()])


def parse_rate(value: Any) -> tuple[int, float]:
    """(requests, per seconds) from ``100/s``, ``600/m`` or ``1000/h``."""
    match = _RATE.fullmatch(str(value).strip())
    if match is None or int(match["count"]) < 1:
        raise ValueError(f"expected a rate like 100/s, 600/m or 1000/h, not {str(value)!r}")
    return int(match["count"]), _RATE_UNITS[match["unit"]]


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, written in routes.yaml as ``500ms``, ``2s``, ``1h``..."""

Size = Annotated[int, BeforeValidator(parse_size)]
"""Bytes, written in routes.yaml as ``64KiB``, ``1MiB``..."""

Rate = Annotated[tuple[int, float], BeforeValidator(parse_rate)]
"""(requests, per seconds), written in routes.yaml as ``100/s``."""
