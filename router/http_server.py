"""The router's one HTTP listener (webhooks, /metrics, /healthz, /readyz), served by uvicorn in a thread.

It runs on uvicorn's httptools parser and the uvloop event loop: h11 and asyncio cost about 8% more
CPU per webhook. uvicorn alone lets a client hold a connection forever by sending its headers, or
the rest of a body nobody reads, a byte at a time; it buffers a request head without bound; and it
answers connections beyond its limit, and requests its parser refuses, in plain text. The
listener's protocol closes a connection whose client has kept it waiting longer than
``http.header_timeout``, refuses an unfinished head beyond ``http.max_header_size``, and answers
requests on connections beyond ``http.max_connections`` with a problem+json 503 and requests the
parser refuses (such as a body framed by both Content-Length and Transfer-Encoding) with a
problem+json 400; the webhook receiver bounds the body read itself (``http.body_timeout``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import ClassVar

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from connectors.webhooks.problems import WebhookRejected, problem_response
from connectors.webhooks.routes import LISTENER_ROUTE
from ops import metrics
from router.config import HttpConfig

log = logging.getLogger(__name__)

OVER_CAPACITY_RETRY_AFTER = 1
"""Seconds a client refused for lack of connections is asked to wait: slots free up quickly."""


def _over_capacity(limit: int) -> ASGIApp:
    """The app answering every request on a connection beyond ``limit``: 503, then the connection closes."""

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        if str(scope.get("path", "")).startswith("/webhooks/"):
            metrics.WEBHOOK_REJECTIONS.labels(route=LISTENER_ROUTE, status="503").inc()
        rejection = WebhookRejected(
            503,
            "over-capacity",
            "Service unavailable",
            f"the router already serves {limit} connections; nothing was accepted; retry after Retry-After",
            headers={"Retry-After": str(OVER_CAPACITY_RETRY_AFTER), "Connection": "close"},
        )
        await problem_response(rejection, str(scope.get("path", "")))(scope, receive, send)

    return refuse


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline on the client, a bound on connections and on the
    unfinished request head (``limits``), and problem+json for requests the parser refuses."""

    limits: ClassVar[HttpConfig] = HttpConfig()

    # uvicorn's own signature, which takes a narrower transport than asyncio's BaseProtocol.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._client_deadline: asyncio.TimerHandle | None = None
        self._head_pending = False
        self._head_bytes = 0
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.app = _over_capacity(self.limits.max_connections)
        self._watch_client()

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_head():
            self._head_bytes += len(data)
        super().data_received(data)
        if self._head_pending and self._head_bytes > self.limits.max_header_size:
            self.send_400_response(
                f"the request head exceeds {self.limits.max_header_size} bytes without ending"
            )
            return
        self._watch_client()

    def on_message_begin(self) -> None:
        self._head_pending = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_pending = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A request the HTTP layer cannot take: problem+json 400, then the connection closes."""
        rejection = WebhookRejected(
            400,
            "malformed-request",
            "Malformed request",
            f"{msg}; nothing was accepted. Send one well-formed HTTP/1.1 request "
            "(one of Content-Length or Transfer-Encoding, headers within the limit)",
            headers={"Connection": "close"},
        )
        response = problem_response(rejection, self.url.decode("latin-1") if self.url else "")
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in response.raw_headers]
        self.transport.write(b"".join([*head, b"\r\n", response.body]))
        self.transport.close()

    def _waiting_for_head(self) -> bool:
        return self._head_pending or self.cycle is None or self.cycle.response_complete

    def _waiting_for_client(self) -> bool:
        """Whether the connection waits on the client alone: for a request head, or an unread body."""
        return self._waiting_for_head()

    def _watch_client(self) -> None:
        if self.transport.is_closing() or not self._waiting_for_client():
            self._cancel_deadline()
        elif self._client_deadline is None:
            # Armed once per wait, not per byte: a client trickling data does not extend it.
            self._client_deadline = self.loop.call_later(self.limits.header_timeout, self._client_too_slow)

    def _cancel_deadline(self) -> None:
        if self._client_deadline is not None:
            self._client_deadline.cancel()
            self._client_deadline = None

    def _client_too_slow(self) -> None:
        self._client_deadline = None
        if self._waiting_for_client() and not self.transport.is_closing():
            log.debug("closing a connection idle or incomplete for %g s", self.limits.header_timeout)
            self.transport.close()


def _shared_socket(host: str, port: int) -> socket.socket:
    """A listening socket other processes may bind too; the kernel spreads connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listening.bind((host, port))
    listening.listen(2048)
    listening.set_inheritable(False)
    return listening


class HttpListener:
    """Runs an ASGI app on host:port in a background thread until stopped, within ``limits``."""

    def __init__(self, app: Starlette, host: str, port: int, limits: HttpConfig | None = None) -> None:
        limits = limits or HttpConfig()
        protocol = type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            # None: uvicorn logs through the root logger's redacting handler, not unredacted ones of its own.
            log_config=None,
            access_log=False,
            lifespan="off",
            http=protocol,
            loop="uvloop",
            timeout_keep_alive=max(1, round(limits.keep_alive)),
        )
        self._server = uvicorn.Server(config)
        # Several processes (http.workers) share the port: each binds it with SO_REUSEPORT.
        sockets = [_shared_socket(host, port)] if limits.workers > 1 else None
        # Run off the main thread: uvicorn then leaves SIGTERM to the router, which drains first.
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": sockets}, name="http-listener", daemon=True
        )

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        servers = getattr(self._server, "servers", None) or []
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self._server.config.port

    @property
    def open_connections(self) -> int:
        """Client connections currently open."""
        return len(self._server.server_state.connections)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"HTTP listener could not start on {self._server.config.host}:{self._server.config.port}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
