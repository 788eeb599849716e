"""HTTP delivery target: posts rendered events to an ERP / WMS / OMS endpoint and retries in place.

Every request carries ``Idempotency-Key`` so a retry after a lost response is applied once at the
target. 2xx and 409 (already applied) are success; 400/404/422 and other 4xx are permanent; 408, 429,
5xx and transport failures are retried with backoff that honours ``Retry-After``, until the attempts
or ``max_age`` run out or a drain interrupts the wait. A circuit breaker holds attempts off a target
that keeps failing, for its cooldown, without giving up the message in hand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import httpx

from connectors.circuit import CircuitBreaker, CircuitSettings
from connectors.delivery import (
    AttemptHook,
    AttemptKind,
    AttemptResult,
    DeliveryOutcome,
    DeliveryResult,
    InterruptibleSleep,
    RetryInPlace,
    batch_idempotency_key,
    interruptible_sleep,
)
from connectors.retry import RetryPolicy, parse_http_date, parse_retry_after
from ops import tracing
from ops.secrets import redact, register_http_credentials

# Delivery types live in connectors.delivery; they stay importable from here for HTTP callers.
__all__ = [
    "AttemptResult",
    "DeliveryOutcome",
    "DeliveryResult",
    "HttpTarget",
    "HttpTargetSettings",
    "batch_idempotency_key",
    "classify",
    "interruptible_sleep",
]

USER_AGENT = "retail-inventory-router/0.1"
DETAIL_BODY_CHARS = 2000
# Error bodies beyond this are not read: the rest is dropped with the connection, not buffered.
MAX_BODY_BYTES = 64 * 1024

# Transport failures, most specific first: the label says what went wrong, the flag whether a
# retry can help. A timeout is retryable because the Idempotency-Key makes a repeat harmless even
# when the target did apply the request before the answer was lost.
_TRANSPORT_FAILURES: tuple[tuple[type[Exception], str, bool], ...] = (
    (httpx.ConnectTimeout, "connect timeout", True),
    (httpx.ReadTimeout, "read timeout", True),
    (httpx.WriteTimeout, "write timeout", True),
    (httpx.PoolTimeout, "connection pool timeout", True),
    (httpx.ConnectError, "connect error", True),
    (httpx.RemoteProtocolError, "protocol error", True),
    (httpx.ProxyError, "proxy error", True),
    (httpx.NetworkError, "network error", True),
    (httpx.UnsupportedProtocol, "unsupported URL scheme", False),
    (httpx.LocalProtocolError, "invalid request", False),
    (httpx.InvalidURL, "invalid URL", False),
)
_CAUGHT = tuple(failure for failure, _, _ in _TRANSPORT_FAILURES)


@dataclass(frozen=True)
class HttpTargetSettings:
    """One HTTP target: where and how to send, with what auth, timeout, retry policy and batch size;
    ``connections`` keep-alive connections are pooled (one per request the router has in flight)."""

    name: str
    url: str
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict)
    bearer: str | None = field(default=None, repr=False)
    basic: tuple[str, str] | None = field(default=None, repr=False)
    timeout: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    batch_max_events: int | None = None
    circuit: CircuitSettings = field(default_factory=CircuitSettings)
    connections: int = 8


def classify(status: int) -> AttemptKind:
    """Whether an HTTP status means delivered, refused for good, or worth another try."""
    if 200 <= status < 300 or status == 409:
        return AttemptKind.success
    if status in (408, 429) or 500 <= status < 600:
        return AttemptKind.retry
    return AttemptKind.permanent


class HttpTarget:
    """Delivers payloads to one HTTP target over a pooled keep-alive connection, retrying in place."""

    def __init__(
        self,
        settings: HttpTargetSettings,
        *,
        client: httpx.Client | None = None,
        sleep: InterruptibleSleep = interruptible_sleep,
        clock: Callable[[], float] = time.monotonic,
        on_attempt: AttemptHook | None = None,
    ) -> None:
        self.settings = settings
        self._owns_client = client is None
        if client is None:
            limits = httpx.Limits(
                max_connections=settings.connections, max_keepalive_connections=settings.connections
            )
            client = httpx.Client(timeout=settings.timeout, limits=limits)
        self._client = client
        self._auth = httpx.BasicAuth(*settings.basic) if settings.basic else None
        self._base_headers = {"User-Agent": USER_AGENT, **settings.headers}
        if settings.bearer:
            self._base_headers["Authorization"] = f"Bearer {settings.bearer}"
        # A target may echo the request (URL, headers) in its error body; what it echoes must not reach
        # a dead letter or a log.
        register_http_credentials(settings.url, settings.headers, settings.bearer, settings.basic)
        self.circuit = CircuitBreaker(settings.name, settings.circuit, clock=clock)
        self._retrying = RetryInPlace(
            settings.name, settings.retry, self.circuit, sleep=sleep, clock=clock, on_attempt=on_attempt
        )

    def send_once(self, payload: bytes, content_type: str, idempotency_key: str) -> AttemptResult:
        """Make one request and classify its result; never raises for HTTP or transport failures."""
        name = self.settings.name
        headers = {**self._base_headers, "Content-Type": content_type, "Idempotency-Key": idempotency_key}
        method = self.settings.method.upper()
        with tracing.client_span(method, self.settings.url, headers) as span:
            try:
                response, body = self._exchange(method, payload, headers)
            except _CAUGHT as error:
                span.failed(type(error).__name__)
                label, retryable = _describe_transport_failure(error)
                if label.endswith("timeout"):
                    label = f"{label} after {self.settings.timeout:g}s"
                message = str(error)
                detail = redact(f"{label} from {name}" + (f": {message}" if message else ""))
                return AttemptResult(
                    AttemptKind.retry if retryable else AttemptKind.permanent, None, detail, None
                )
            span.status(response.status_code)
        status = response.status_code
        kind = classify(status)
        hint = " (check the target's auth)" if status in (401, 403) else ""
        text = body.decode(response.encoding or "utf-8", errors="replace").strip()[:DETAIL_BODY_CHARS]
        detail = redact(f"HTTP {status} from {name}{hint}" + (f": {text}" if text else ""))
        retry_after = None
        if kind == "retry":
            server_now = parse_http_date(response.headers.get("Date"))
            retry_after = parse_retry_after(response.headers.get("Retry-After"), server_now)
        return AttemptResult(kind, status, detail, retry_after)

    def _exchange(self, method: str, payload: bytes, headers: dict[str, str]) -> tuple[httpx.Response, bytes]:
        """One request and its (capped) response body; raises httpx's transport errors."""
        request = self._client.build_request(
            method, self.settings.url, content=payload, headers=headers, timeout=self.settings.timeout
        )
        response = self._client.send(request, auth=self._auth, stream=True)
        try:
            return response, _read_capped(response.iter_bytes())
        finally:
            response.close()

    def deliver(
        self,
        payload: bytes,
        content_type: str,
        idempotency_key: str,
        *,
        stop: threading.Event | None = None,
        deadline: float | None = None,
    ) -> DeliveryResult:
        """Send until delivered, refused for good, out of attempts or ``max_age``, no attempt after
        ``deadline``, or interrupted by ``stop``.

        On ``interrupted`` the caller leaves the message unacknowledged so it returns to its queue.
        """
        return self._retrying.deliver(
            lambda: self.send_once(payload, content_type, idempotency_key), stop, deadline
        )

    def close(self) -> None:
        """Close the connection pool, unless the client was handed in by the caller."""
        if self._owns_client:
            self._client.close()


def _read_capped(chunks: Iterable[bytes]) -> bytes:
    """The response body up to MAX_BODY_BYTES; reading it whole keeps the connection reusable."""
    body = bytearray()
    for chunk in chunks:
        body += chunk
        if len(body) >= MAX_BODY_BYTES:
            break
    return bytes(body)


def _describe_transport_failure(error: Exception) -> tuple[str, bool]:
    """What a caught transport failure was, and whether a retry can help."""
    return next(
        (label, retryable) for failure, label, retryable in _TRANSPORT_FAILURES if isinstance(error, failure)
    )
