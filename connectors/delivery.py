"""Transport-neutral delivery: what every target promises the delivery worker, and retry in place.

A target knows how to make one attempt (an HTTP request, a file write, an SFTP upload) and classify it
as an :class:`AttemptResult`; :class:`RetryInPlace` turns attempts into one :class:`DeliveryResult`
with backoff and jitter, ``Retry-After``, ``max_age``, the target's circuit breaker and interruption
by a drain, so no transport carries its own copy of the retry rules.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple, Protocol

from connectors.circuit import CircuitBreaker
from connectors.retry import RetryPolicy

log = logging.getLogger(__name__)

AttemptHook = Callable[["AttemptLabel", float], None]
"""Called after each attempt with its outcome label and duration in seconds (the attempts metric)."""
InterruptibleSleep = Callable[[float, threading.Event | None], bool]
Attempt = Callable[[], "AttemptResult"]


class AttemptKind(StrEnum):
    """What one attempt came to."""

    success = "success"
    permanent = "permanent"
    """Refused for good: retrying cannot help."""
    retry = "retry"
    """Failed in a way worth another try."""


class AttemptLabel(StrEnum):
    """The ``outcome`` label of ``router_delivery_attempts_total``: the attempt's kind, or ``error`` for a
    failure without an HTTP answer."""

    success = "success"
    permanent = "permanent"
    retry = "retry"
    error = "error"


class DeliveryOutcome(StrEnum):
    """How a delivery ended."""

    delivered = "delivered"
    permanent = "permanent"
    retries_exhausted = "retries_exhausted"
    interrupted = "interrupted"


@dataclass(frozen=True)
class DeliveryResult:
    """The end of a delivery: ``detail`` is for the dead letter, ``reason`` a bounded metrics label."""

    outcome: DeliveryOutcome
    attempts: int
    status: int | None
    detail: str
    reason: str


class AttemptResult(NamedTuple):
    """One attempt's result: its kind, the HTTP status if any, a readable detail and Retry-After.

    ``reason`` labels a permanent failure for metrics and dead letters; when None it is derived from
    the HTTP status (``http_4xx``) or, without one, ``transport``.
    """

    kind: AttemptKind
    status: int | None
    detail: str
    retry_after: float | None = None
    reason: str | None = None


class TargetSettings(Protocol):
    """What the delivery worker reads of any target's settings: ``timeout`` bounds one attempt, which is
    what the worker allows for the attempt in flight when it must give a broker delivery up."""

    @property
    def name(self) -> str: ...

    @property
    def retry(self) -> RetryPolicy: ...

    @property
    def timeout(self) -> float: ...


class DeliveryTarget(Protocol):
    """A target the delivery worker can send rendered payloads to: HTTP, file or SFTP."""

    @property
    def settings(self) -> TargetSettings: ...

    def deliver(
        self,
        payload: bytes,
        content_type: str,
        idempotency_key: str,
        *,
        stop: threading.Event | None = None,
        deadline: float | None = None,
    ) -> DeliveryResult:
        """Deliver until done, refused for good, out of attempts, ``max_age`` or ``deadline`` (the
        monotonic time after which no attempt may start), or interrupted."""
        ...

    def close(self) -> None:
        """Release connections and other resources held between deliveries."""
        ...


def batch_idempotency_key(event_ids: Sequence[str]) -> str:
    """The Idempotency-Key of a micro-batch: stable for the same events in the same order."""
    if not event_ids:
        raise ValueError("a batch idempotency key needs at least one event id")
    digest = hashlib.sha256("\n".join(event_ids).encode("utf-8")).hexdigest()
    return f"batch-{digest[:32]}"


def interruptible_sleep(seconds: float, stop: threading.Event | None) -> bool:
    """Wait ``seconds`` or until ``stop`` is set; True when the wait was cut short by ``stop``."""
    if stop is None:
        time.sleep(seconds)
        return False
    return stop.wait(seconds)


def attempt_label(result: AttemptResult) -> AttemptLabel:
    """The attempts metric's outcome label: the kind, or ``error`` for a failure without an HTTP answer."""
    if result.status is None and result.kind is not AttemptKind.success:
        return AttemptLabel.error
    return AttemptLabel(result.kind.value)


def permanent_reason(result: AttemptResult) -> str:
    """The bounded reason label of a permanent failure."""
    if result.reason is not None:
        return result.reason
    return "transport" if result.status is None else f"http_{result.status // 100}xx"


class RetryInPlace:
    """Drives one target's attempts until a delivery ends, holding the message in hand (order per key).

    A plain loop rather than tenacity: each wait depends on the last attempt's Retry-After and on the
    max_age left, must end early on ``stop`` with its own outcome, and max_age runs on the injectable
    clock; tenacity would need exceptions for control flow and its own timing for that.
    """

    def __init__(
        self,
        target: str,
        policy: RetryPolicy,
        circuit: CircuitBreaker,
        *,
        sleep: InterruptibleSleep = interruptible_sleep,
        clock: Callable[[], float] = time.monotonic,
        on_attempt: AttemptHook | None = None,
    ) -> None:
        self.target = target
        self.policy = policy
        self.circuit = circuit
        self._sleep = sleep
        self._clock = clock
        self._on_attempt = on_attempt

    def deliver(
        self, attempt: Attempt, stop: threading.Event | None = None, deadline: float | None = None
    ) -> DeliveryResult:
        """Call ``attempt`` until success, a permanent failure, attempts or max_age run out, or ``stop``.

        ``deadline`` (on this retrier's clock) is the latest moment an attempt may start: the delivery
        worker's bound that keeps a retry from outliving the broker's consumer timeout. Past it a
        failed attempt ends the delivery as ``max_age``, like running out of ``max_age`` itself.
        On ``interrupted`` the caller leaves the message unacknowledged so it returns to its queue.
        """
        policy = self.policy
        started = self._clock()
        attempts = 0
        last: AttemptResult | None = None
        while True:
            if stop is not None and stop.is_set():
                return _interrupted(attempts, last)
            hold = min(self.circuit.wait_time(), self._until(deadline))
            # A fresh delivery while the circuit is open waits for the trial instead of calling the target.
            if attempts == 0 and hold > 0 and self._sleep(min(hold, policy.max_age), stop):
                return _interrupted(attempts, last)
            attempts += 1
            last = self._timed(attempt)
            self.circuit.record(target_failed=last.kind is AttemptKind.retry)
            if last.kind is AttemptKind.success:
                return DeliveryResult(
                    DeliveryOutcome.delivered, attempts, last.status, last.detail, "delivered"
                )
            if last.kind is AttemptKind.permanent:
                return DeliveryResult(
                    DeliveryOutcome.permanent, attempts, last.status, last.detail, permanent_reason(last)
                )
            if attempts >= policy.attempts:
                why = f"retries exhausted after {attempts} attempts"
                return _gave_up(attempts, last, why, "retries_exhausted")
            elapsed = self._clock() - started
            remaining = policy.max_age - elapsed
            if remaining <= 0:
                why = f"gave up after {elapsed:.1f}s (max_age {policy.max_age:g}s) and {attempts} attempts"
                return _gave_up(attempts, last, why, "max_age")
            until_deadline = self._until(deadline)
            if until_deadline <= 0:
                why = (
                    f"gave up after {elapsed:.1f}s and {attempts} attempts: the message was held as long as "
                    "the broker's consumer timeout allows"
                )
                return _gave_up(attempts, last, why, "max_age")
            wait = policy.delay(attempts, last.retry_after)
            wait = min(max(wait, self.circuit.wait_time()), remaining, until_deadline)
            log.warning(
                "delivery to %s failed (attempt %d of %d): %s; retrying in %.2fs",
                self.target,
                attempts,
                policy.attempts,
                last.detail,
                wait,
                extra={"target": self.target},
            )
            if self._sleep(wait, stop):
                return _interrupted(attempts, last)

    def _until(self, deadline: float | None) -> float:
        return math.inf if deadline is None else deadline - self._clock()

    def _timed(self, attempt: Attempt) -> AttemptResult:
        started = time.monotonic()
        result = attempt()
        if self._on_attempt is not None:
            self._on_attempt(attempt_label(result), time.monotonic() - started)
        return result


def _gave_up(attempts: int, last: AttemptResult, why: str, reason: str) -> DeliveryResult:
    """Retries exhausted: ``why`` names the bound that ran out, ``reason`` is its metrics label."""
    detail = f"{why}; last: {last.detail}"
    return DeliveryResult(DeliveryOutcome.retries_exhausted, attempts, last.status, detail, reason)


def _interrupted(attempts: int, last: AttemptResult | None) -> DeliveryResult:
    if last is None:
        detail = "interrupted by shutdown before the first attempt"
    else:
        detail = f"interrupted by shutdown after {attempts} attempt(s); last: {last.detail}"
    status = last.status if last is not None else None
    return DeliveryResult(DeliveryOutcome.interrupted, attempts, status, detail, "interrupted")
