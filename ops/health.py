"""Liveness, readiness and metrics endpoints for the router's single HTTP listener."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ops.metrics import render_latest

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], None]
"""Returns when a dependency answers; raises with a short explanation when it does not."""


def ops_routes(checks: Mapping[str, ReadinessCheck]) -> list[BaseRoute]:
    """``GET /healthz`` (the process serves), ``GET /readyz`` (every check passes), ``GET /metrics``."""

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        results: dict[str, str] = {}
        for name, check in checks.items():
            try:
                check()
                results[name] = "ok"
            except Exception as error:
                log.warning("readiness check %s failed: %s", name, error)
                results[name] = f"unavailable: {error}"
        ready = all(value == "ok" for value in results.values())
        return JSONResponse({"ready": ready, "checks": results}, status_code=200 if ready else 503)

    async def metrics(_: Request) -> Response:
        payload, content_type = render_latest()
        return Response(payload, media_type=content_type)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
