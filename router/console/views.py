"""How the console shows things: the Jinja environment, pretty JSON, payload diffs and target gauges."""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any

import jinja2

from ops import metrics

HERE = Path(__file__).parent
"""The console package's folder: its templates and static assets."""


def pretty(value: Any) -> str:
    """``value`` as indented JSON with sorted keys, as the console shows payloads."""
    # ensure_ascii escapes C1 controls and bidi marks, so hostile text cannot reorder what is shown.
    return json.dumps(value, indent=2, ensure_ascii=True, sort_keys=True, default=str)


def payload_diff(old: Any, new: Any) -> list[str]:
    """The unified diff of two payloads as shown in the console (pretty JSON, sorted keys)."""
    lines = difflib.unified_diff(
        pretty(old).splitlines(), pretty(new).splitlines(), "before", "after", lineterm=""
    )
    return list(lines)[2:]


def templates() -> jinja2.Environment:
    """The autoescaping template environment of the console's pages."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters["pretty"] = pretty
    environment.filters["utc"] = lambda moment: "-" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S}"
    environment.filters["cell"] = lambda value: "-" if value is None or value == "" else value
    return environment


def lag_p95(target: str) -> str:
    """The 95th percentile of event lag at ``target`` seen by this process, as a bucket's bound."""
    buckets: list[tuple[float, float]] = []
    for family in metrics.REGISTRY.collect():
        if family.name != "router_event_lag_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("target") == target:
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return "-"
    bound = next(bound for bound, count in buckets if count >= 0.95 * total)
    if math.isinf(bound):
        return f"> {_duration(buckets[-2][0])}"
    return f"≤ {_duration(bound)}"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def circuit(target: str) -> str:
    """Whether the circuit breaker of ``target`` is open in this process (unknown before its first call)."""
    state = metrics.REGISTRY.get_sample_value("router_circuit_open", {"target": target})
    return "unknown" if state is None else ("open" if state else "closed")
