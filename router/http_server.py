"""The router's one HTTP listener (webhooks, /metrics, /healthz, /readyz), served by uvicorn in a thread."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from starlette.applications import Starlette

log = logging.getLogger(__name__)


class HttpListener:
    """Runs an ASGI app on host:port in a background thread until stopped."""

    def __init__(self, app: Starlette, host: str, port: int) -> None:
        # log_config=None: uvicorn's records go through the root logger's redacting handler instead
        # of handlers of its own that would print them unredacted.
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off", log_config=None
        )
        self._server = uvicorn.Server(config)
        # Run off the main thread: uvicorn then leaves SIGTERM to the router, which drains first.
        self._thread = threading.Thread(target=self._server.run, name="http-listener", daemon=True)

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        servers = getattr(self._server, "servers", None) or []
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self._server.config.port

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
