"""Simulated ERP / WMS / OMS HTTP services on loopback, for `router demo` and the test suite.

Each one is a real HTTP server that records what it received (headers, decoded JSON body) and can
be scripted to misbehave the way real targets do: answer 503 to the first requests, or refuse with
422 the events a predicate picks, or answer 409 to a repeated Idempotency-Key; answer every request
after a latency, or fail requests a fault function picks (503, no answer before the client's timeout,
a connection reset). Connections are kept alive between requests (HTTP/1.1), like a real API's.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _QuietServer(ThreadingHTTPServer):
    """A threading HTTP server that takes a client hanging up on a kept-alive connection in its stride,
    with a listen backlog for a router opening a connection per partition at once."""

    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


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


class Fault(Enum):
    """A way a request fails, picked by :attr:`TargetBehaviour.fault`; none of them accepts the events."""

    UNAVAILABLE = "503"
    HANG = "no answer within the client's timeout"
    RESET = "connection reset"


@dataclass
class TargetBehaviour:
    """How a simulated target answers: ``latency`` seconds after each request, failing those ``fault``
    picks (a hang lasts ``hang`` seconds, then closes the connection unanswered)."""

    fail_first: int = 0
    reject: Callable[[Mapping[str, Any]], bool] | None = None
    status: int = 201
    latency: float = 0.0
    fault: Callable[[ReceivedRequest], Fault | None] | None = None
    hang: float = 2.0


@dataclass
class SimulatedTarget:
    """A loopback HTTP service that records every request; ``url`` is its base address."""

    name: str
    behaviour: TargetBehaviour = field(default_factory=TargetBehaviour)
    requests: list[ReceivedRequest] = field(default_factory=list)
    attempts: int = 0
    accepted: int = 0
    """Events accepted (2xx) so far: :attr:`events` without building the list."""
    in_flight: int = 0
    peak_in_flight: int = 0
    """The most requests it was answering at one moment."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        host, port = self._server.socket.getsockname()[:2]
        # Kept from the bind: the address stays readable once the server is closed.
        self._url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"sim-{self.name}", daemon=True
        )

    @property
    def url(self) -> str:
        return self._url

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
            self.accepted += len(request.events)
            return self.behaviour.status, {"accepted": len(request.events)}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        target = self
        behaviour = target.behaviour

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as two writes; with Nagle's algorithm the body waits for the
            # client's delayed ACK (~40 ms) on every kept-alive request, as no real ERP would.
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body: Any = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    body = raw.decode("utf-8", "replace")
                request = ReceivedRequest("POST", self.path, dict(self.headers.items()), body)
                with target._lock:
                    target.in_flight += 1
                    target.peak_in_flight = max(target.peak_in_flight, target.in_flight)
                try:
                    self._respond(request)
                finally:
                    with target._lock:
                        target.in_flight -= 1

            def _respond(self, request: ReceivedRequest) -> None:
                if behaviour.latency:
                    time.sleep(behaviour.latency)
                fault = behaviour.fault(request) if behaviour.fault is not None else None
                if fault is Fault.RESET:
                    # Linger 0: closing sends RST, as a crashed or overloaded server's kernel would.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault is Fault.HANG:
                    # The client gave up meanwhile; hang up without an answer it would not read.
                    time.sleep(behaviour.hang)
                    self.close_connection = True
                    return
                if fault is Fault.UNAVAILABLE:
                    status, answer = 503, {"title": fault.value}
                else:
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
