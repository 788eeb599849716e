"""A circuit breaker per delivery target: after N failed attempts in a row, stop calling it for a while.

Retry in place stays head-of-line (order per key holds), but while the circuit is open every attempt
waits for the cooldown instead of hammering a target that is down; then one trial request decides:
success closes the circuit, failure opens it for another cooldown.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ops import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CircuitSettings:
    """``failures`` consecutive failed attempts open the circuit for ``cooldown`` seconds."""

    failures: int = 5
    cooldown: float = 30.0

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise ValueError(f"circuit_breaker failures must be at least 1, got {self.failures}")
        if not math.isfinite(self.cooldown) or self.cooldown < 0:
            raise ValueError(
                f"circuit_breaker cooldown must be a non-negative number of seconds, got {self.cooldown!r}"
            )


class CircuitBreaker:
    """Counts consecutive failed attempts at one target and says how long to hold off the next one."""

    def __init__(
        self, target: str, settings: CircuitSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.target = target
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until: float | None = None
        metrics.CIRCUIT_OPEN.labels(target=target).set(0)

    @property
    def is_open(self) -> bool:
        """True from the moment the circuit opened until a trial request succeeds."""
        return self._open_until is not None

    def wait_time(self) -> float:
        """Seconds to hold off before the next attempt: 0 when closed or when the trial is due."""
        with self._lock:
            if self._open_until is None:
                return 0.0
            return max(self._open_until - self._clock(), 0.0)

    def record(self, *, target_failed: bool) -> None:
        """Count one attempt: ``target_failed`` for 5xx/408/429/transport errors, not for a 4xx refusal."""
        with self._lock:
            if not target_failed:
                if self._open_until is not None:
                    log.info(
                        "circuit to %s closed: the target answers again",
                        self.target,
                        extra={"target": self.target},
                    )
                    metrics.CIRCUIT_OPEN.labels(target=self.target).set(0)
                self._failures = 0
                self._open_until = None
                return
            self._failures += 1
            if self._open_until is None and self._failures < self.settings.failures:
                return
            if self._open_until is None:
                log.warning(
                    "circuit to %s opened after %d failed attempts in a row; holding deliveries for %gs",
                    self.target,
                    self._failures,
                    self.settings.cooldown,
                    extra={"target": self.target},
                )
                metrics.CIRCUIT_OPEN.labels(target=self.target).set(1)
            # A failed trial opens it again for a full cooldown.
            self._open_until = self._clock() + self.settings.cooldown
