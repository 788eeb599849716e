"""Simulated ERP / WMS / OMS HTTP services on loopback, for `router demo` and the test suite.

Each one is a real HTTP server that records what it received (headers, decoded JSON body) and can
be scripted to misbehave the way real targets do: answer 503 to the first requests, or refuse with
422 the events a predicate picks, or answer 409 to a repeated Idempotency-Key.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the target saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any

    @property
    def events(self) -> list[dict[str, Any]]:
        """The events in the body: a JSON array (batch) or one object."""
        if isinstance(self.body, list):
            return self.body
        return [self.body] if isinstance(self.body, dict) else []


@dataclass
class TargetBehaviour:
    """How a simulated target answers."""

    fail_first: int = 0
    reject: Callable[[Mapping[str, Any]], bool] | None = None
    status: int = 201


@dataclass
class SimulatedTarget:
    """A loopback HTTP service that records every request; ``url`` is its base address."""

    name: str
    behaviour: TargetBehaviour = field(default_factory=TargetBehaviour)
    requests: list[ReceivedRequest] = field(default_factory=list)
    attempts: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"sim-{self.name}", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> SimulatedTarget:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> SimulatedTarget:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event accepted (2xx), in arrival order."""
        with self._lock:
            return [event for request in self.requests for event in request.events]

    def _answer(self, request: ReceivedRequest) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.attempts += 1
            if self.attempts <= self.behaviour.fail_first:
                return 503, {"title": "temporarily unavailable"}
            reject = self.behaviour.reject
            refused = [e.get("event_id") for e in request.events if reject is not None and reject(e)]
            if refused:
                return 422, {"title": "unprocessable event", "event_ids": refused}
            self.requests.append(request)
            return self.behaviour.status, {"accepted": len(request.events)}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body: Any = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    body = raw.decode("utf-8", "replace")
                request = ReceivedRequest("POST", self.path, dict(self.headers.items()), body)
                status, answer = target._answer(request)
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_PUT = do_POST

            def log_message(self, *_: Any) -> None:  # keep the demo's output readable
                return

        return Handler
