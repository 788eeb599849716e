"""The HTTP delivery target against a real loopback server: classification, retries, Retry-After,
max_age, drain interruption, headers and auth, and the retry policy's backoff arithmetic."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from connectors.http_target import (
    DeliveryOutcome,
    HttpTarget,
    HttpTargetSettings,
    batch_idempotency_key,
    classify,
)
from connectors.retry import RetryPolicy, parse_retry_after

FAST = RetryPolicy(attempts=5, initial=0.01, max_delay=0.02, max_age=30.0)
PAYLOAD = b'{"event_id": "ev-1", "sku": "SKU-1", "quantity": "2"}'


@dataclass(frozen=True)
class Reply:
    """One scripted answer: a status with headers and body, or a stall, or a dropped connection."""

    status: int = 201
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    stall: float = 0.0
    hang_up: bool = False


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    at: float
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int


class ScriptedServer:
    """A loopback HTTP/1.1 server answering from a script; the last reply repeats once the script ends."""

    def __init__(self, script: list[Reply]) -> None:
        self.script = list(script)
        self.seen: list[Seen] = []
        self.request_arrived = threading.Event()
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with owner._lock:
                    owner.seen.append(
                        Seen(
                            time.monotonic(),
                            self.command,
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            self.client_address[1],
                        )
                    )
                    reply = owner.script.pop(0) if len(owner.script) > 1 else owner.script[0]
                owner.request_arrived.set()
                if reply.hang_up:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if reply.stall:
                    time.sleep(reply.stall)
                encoded = reply.body.encode()
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(encoded)))
                    self.end_headers()
                    self.wfile.write(encoded)
                except OSError:
                    self.close_connection = True  # the client gave up (timeout) before the answer

            do_PUT = do_POST

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/inventory/movements"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _settings(url: str, retry: RetryPolicy = FAST, **overrides: object) -> HttpTargetSettings:
    values: dict[str, object] = {"name": "erp", "url": url, "timeout": 2.0, "retry": retry}
    values.update(overrides)
    return HttpTargetSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def attempts_log() -> list[str]:
    return []


@pytest.fixture
def make_target(attempts_log: list[str]) -> Iterator[object]:
    targets: list[HttpTarget] = []

    def build(settings: HttpTargetSettings) -> HttpTarget:
        target = HttpTarget(settings, on_attempt=lambda outcome, seconds: attempts_log.append(outcome))
        targets.append(target)
        return target

    yield build
    for target in targets:
        target.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_retries_503_then_delivers_with_the_same_key_headers_and_one_connection(make_target, attempts_log):
    with ScriptedServer([Reply(503), Reply(503), Reply(201)]) as server:
        target = make_target(_settings(server.url, headers={"X-Tenant": "store-eu"}))
        result = target.deliver(PAYLOAD, "application/json", "ev-1")

    assert result.outcome is DeliveryOutcome.delivered
    assert (result.attempts, result.status) == (3, 201)
    assert attempts_log == ["retry", "retry", "success"]
    assert [seen.headers["idempotency-key"] for seen in server.seen] == ["ev-1"] * 3
    first = server.seen[0]
    assert (first.method, first.path, first.body) == ("POST", "/inventory/movements", PAYLOAD)
    assert first.headers["content-type"] == "application/json"
    assert first.headers["user-agent"] == "retail-inventory-router/0.1"
    assert first.headers["x-tenant"] == "store-eu"
    # Keep-alive: the retries reuse the pooled connection instead of reconnecting each time.
    assert len({seen.client_port for seen in server.seen}) == 1


def test_409_already_applied_counts_as_delivered(make_target):
    with ScriptedServer([Reply(409, "duplicate Idempotency-Key")]) as server:
        result = make_target(_settings(server.url)).deliver(PAYLOAD, "application/json", "ev-1")
    assert (result.outcome, result.attempts) == (DeliveryOutcome.delivered, 1)


def test_422_is_permanent_at_once_with_the_targets_explanation(make_target, attempts_log):
    problem = json.dumps({"errors": [{"field": "quantity", "message": "must be an integer"}]})
    with ScriptedServer([Reply(422, problem, {"Content-Type": "application/json"})]) as server:
        result = make_target(_settings(server.url)).deliver(PAYLOAD, "application/json", "ev-1")

    assert result.outcome is DeliveryOutcome.permanent
    assert (result.attempts, result.status, result.reason) == (1, 422, "http_4xx")
    assert result.detail == f"HTTP 422 from erp: {problem}"
    assert attempts_log == ["permanent"]
    assert len(server.seen) == 1


def test_a_huge_error_body_is_cut_to_2000_characters_in_the_detail(make_target):
    with ScriptedServer([Reply(400, "x" * 100_000)]) as server:
        result = make_target(_settings(server.url)).deliver(PAYLOAD, "application/json", "ev-1")
    assert result.detail == "HTTP 400 from erp: " + "x" * 2000


def test_bearer_token_is_sent_but_never_shown_even_when_the_target_echoes_it(make_target):
    token = "s3cr3t-erp-token"
    with ScriptedServer([Reply(401, f"invalid token Bearer {token}")]) as server:
        target = make_target(_settings(server.url, bearer=token))
        result = target.deliver(PAYLOAD, "application/json", "ev-1")

    assert server.seen[0].headers["authorization"] == f"Bearer {token}"
    assert result.outcome is DeliveryOutcome.permanent
    assert "check the target's auth" in result.detail
    assert token not in result.detail
    assert token not in repr(target.settings)


def test_basic_auth_reaches_the_target(make_target):
    with ScriptedServer([Reply(201)]) as server:
        target = make_target(_settings(server.url, basic=("router", "pa55word"), method="PUT"))
        result = target.deliver(PAYLOAD, "application/xml", "ev-1")

    expected = base64.b64encode(b"router:pa55word").decode()
    assert result.outcome is DeliveryOutcome.delivered
    assert server.seen[0].method == "PUT"
    assert server.seen[0].headers["authorization"] == f"Basic {expected}"


def test_retry_after_from_a_429_is_honoured(make_target):
    with ScriptedServer([Reply(429, headers={"Retry-After": "1"}), Reply(201)]) as server:
        result = make_target(_settings(server.url)).deliver(PAYLOAD, "application/json", "ev-1")

    assert (result.outcome, result.attempts) == (DeliveryOutcome.delivered, 2)
    gap = server.seen[1].at - server.seen[0].at
    assert 0.95 <= gap < 2.0


def test_retryable_failures_end_as_retries_exhausted_after_the_configured_attempts(make_target):
    with ScriptedServer([Reply(500, "database is locked")]) as server:
        policy = RetryPolicy(attempts=3, initial=0.01, max_delay=0.01, max_age=30.0)
        result = make_target(_settings(server.url, policy)).deliver(PAYLOAD, "application/json", "ev-1")

    assert result.outcome is DeliveryOutcome.retries_exhausted
    assert (result.attempts, result.status, result.reason) == (3, 500, "retries_exhausted")
    assert "HTTP 500 from erp: database is locked" in result.detail
    assert len(server.seen) == 3


def test_max_age_stops_retrying_before_the_attempts_run_out(make_target):
    policy = RetryPolicy(attempts=1000, initial=0.05, max_delay=0.05, max_age=0.3)
    with ScriptedServer([Reply(503)]) as server:
        started = time.monotonic()
        result = make_target(_settings(server.url, policy)).deliver(PAYLOAD, "application/json", "ev-1")
        took = time.monotonic() - started

    assert result.outcome is DeliveryOutcome.retries_exhausted
    assert result.reason == "max_age"
    assert 2 <= result.attempts < 1000
    assert took < 1.5


def test_a_retry_after_beyond_max_age_is_cut_to_the_time_left(make_target):
    policy = RetryPolicy(attempts=10, initial=0.01, max_delay=0.01, max_age=0.4)
    with ScriptedServer([Reply(503, headers={"Retry-After": "3600"})]) as server:
        started = time.monotonic()
        result = make_target(_settings(server.url, policy)).deliver(PAYLOAD, "application/json", "ev-1")
        took = time.monotonic() - started

    assert (result.reason, result.attempts) == ("max_age", 2)
    assert took < 1.5


def test_a_dropped_connection_is_retried(make_target, attempts_log):
    with ScriptedServer([Reply(hang_up=True), Reply(201)]) as server:
        result = make_target(_settings(server.url)).deliver(PAYLOAD, "application/json", "ev-1")

    assert (result.outcome, result.attempts) == (DeliveryOutcome.delivered, 2)
    assert attempts_log == ["error", "success"]


def test_a_read_timeout_is_retried_with_the_same_idempotency_key(make_target, attempts_log):
    with ScriptedServer([Reply(stall=0.5), Reply(201)]) as server:
        target = make_target(_settings(server.url, timeout=0.15))
        result = target.deliver(PAYLOAD, "application/json", "ev-1")

    assert (result.outcome, result.attempts) == (DeliveryOutcome.delivered, 2)
    assert attempts_log == ["error", "success"]
    assert [seen.headers["idempotency-key"] for seen in server.seen] == ["ev-1", "ev-1"]


def test_a_refused_connection_is_retried_and_reported(make_target):
    url = f"http://127.0.0.1:{_free_port()}/inventory"
    policy = RetryPolicy(attempts=2, initial=0.01, max_delay=0.01, max_age=30.0)
    result = make_target(_settings(url, policy)).deliver(PAYLOAD, "application/json", "ev-1")

    assert result.outcome is DeliveryOutcome.retries_exhausted
    assert (result.attempts, result.status) == (2, None)
    assert "connect error from erp" in result.detail


def test_an_unsupported_url_scheme_is_permanent(make_target):
    result = make_target(_settings("ftp://127.0.0.1/inventory")).deliver(PAYLOAD, "application/json", "ev-1")
    assert (result.outcome, result.attempts, result.reason) == (DeliveryOutcome.permanent, 1, "transport")
    assert "unsupported URL scheme" in result.detail


def test_stop_interrupts_a_long_retry_wait_promptly(make_target):
    stop = threading.Event()
    results = []
    with ScriptedServer([Reply(503, headers={"Retry-After": "30"})]) as server:
        target = make_target(_settings(server.url))
        worker = threading.Thread(
            target=lambda: results.append(target.deliver(PAYLOAD, "application/json", "ev-1", stop=stop))
        )
        worker.start()
        assert server.request_arrived.wait(2.0)
        time.sleep(0.05)
        stopped_at = time.monotonic()
        stop.set()
        worker.join(2.0)

    assert not worker.is_alive()
    assert time.monotonic() - stopped_at < 0.5
    [result] = results
    assert (result.outcome, result.attempts, result.status) == (DeliveryOutcome.interrupted, 1, 503)
    assert len(server.seen) == 1


def test_a_set_stop_means_no_request_is_made(make_target):
    stop = threading.Event()
    stop.set()
    with ScriptedServer([Reply(201)]) as server:
        result = make_target(_settings(server.url)).deliver(PAYLOAD, "application/json", "ev-1", stop=stop)
    assert (result.outcome, result.attempts) == (DeliveryOutcome.interrupted, 0)
    assert server.seen == []


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, "success"),
        (204, "success"),
        (409, "success"),
        (400, "permanent"),
        (401, "permanent"),
        (404, "permanent"),
        (410, "permanent"),
        (422, "permanent"),
        (301, "permanent"),
        (408, "retry"),
        (429, "retry"),
        (500, "retry"),
        (503, "retry"),
    ],
)
def test_classify_follows_the_delivery_semantics(status, kind):
    assert classify(status) == kind


def test_batch_idempotency_key_is_stable_and_depends_on_the_events_and_their_order():
    key = batch_idempotency_key(["ev-1", "ev-2"])
    assert key == batch_idempotency_key(["ev-1", "ev-2"])
    assert key.startswith("batch-") and len(key) == len("batch-") + 32
    assert key != batch_idempotency_key(["ev-2", "ev-1"])
    assert key != batch_idempotency_key(["ev-1"])
    with pytest.raises(ValueError, match="at least one event id"):
        batch_idempotency_key([])


def test_backoff_grows_exponentially_within_max_delay_with_jitter():
    policy = RetryPolicy(attempts=10, initial=0.5, max_delay=4.0, max_age=3600.0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [policy.delay(attempt, None) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # full jitter spreads over the whole range
        assert len(set(delays)) > 1


def test_retry_after_is_a_floor_and_time_left_a_ceiling():
    policy = RetryPolicy(attempts=10, initial=0.5, max_delay=4.0, max_age=3600.0)
    assert all(policy.delay(1, 7.0) == 7.0 for _ in range(20))
    assert policy.delay(1, 120.0, remaining=30.0) == 30.0
    assert policy.delay(8, None, remaining=0.25) <= 0.25


def test_retry_policy_refuses_nonsense():
    with pytest.raises(ValueError, match="attempts must be at least 1, got 0"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="max_age must be a non-negative number of seconds"):
        RetryPolicy(max_age=-1.0)


def test_parse_retry_after_reads_seconds_and_http_dates():
    now = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now) == 90.0
    assert parse_retry_after("Fri, 01 Mar 2024 11:00:00 GMT", now) == 0.0
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("-5", now) is None
