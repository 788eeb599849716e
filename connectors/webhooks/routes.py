"""The Starlette routes of the webhook source: every configured receiver and its OpenAPI document."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from connectors.webhooks.intake import WebhookIntake
from connectors.webhooks.openapi import openapi_document
from connectors.webhooks.problems import WebhookRejected, problem_response
from connectors.webhooks.receiver import WebhookReceiver
from connectors.webhooks.request import check_framing
from connectors.webhooks.settings import WebhookSettings
from ops import metrics, tracing
from transforms.interop_json import printable

log = logging.getLogger(__name__)

UNKNOWN_ROUTE = "_unknown"
"""The ``route`` label of rejections of requests for no configured route (keeps the label bounded)."""
LISTENER_ROUTE = "_listener"
"""The ``route`` label of requests the listener refused before any route was chosen (no connection free)."""

WEBHOOK_PATH = "/webhooks/{route}"
"""The route template of every partner webhook (the ``http.route`` of its server span)."""
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def webhook_routes(receivers: Mapping[str, WebhookSettings], intake: WebhookIntake) -> list[BaseRoute]:
    """Starlette routes for ``POST /webhooks/{route}`` and ``GET /openapi.json``.

    Raises ValueError for a route whose schema, records path or secret is unusable.
    """
    by_route = {name: WebhookReceiver(settings, intake) for name, settings in receivers.items()}
    document = openapi_document(by_route)

    async def webhook(request: Request) -> Response:
        # The partner's traceparent, if it sent one, makes this request part of its trace.
        with tracing.server_span(request.method, WEBHOOK_PATH, str(request.url), request.headers) as span:
            response = await answer(request)
            span.status(response.status_code)
            return response

    async def answer(request: Request) -> Response:
        name = request.path_params["route"]
        receiver = by_route.get(name)
        try:
            check_framing(request)
            if receiver is None:
                raise WebhookRejected(
                    404, "unknown-route", "Unknown route", f"no webhook route named {printable(name)[:80]!r}"
                )
            if request.method != "POST":
                raise WebhookRejected(
                    405,
                    "method-not-allowed",
                    "Method not allowed",
                    f"{request.method} is not allowed; webhooks are delivered with POST",
                    headers={"Allow": "POST"},
                )
            return await receiver.receive(request)
        except WebhookRejected as rejection:
            refused = rejection
        except Exception:
            # Every input-caused refusal is a WebhookRejected; reaching here is a fault of the router.
            log.exception("webhook request to %s failed", request.url.path)
            refused = WebhookRejected(
                500,
                "internal-error",
                "Internal error",
                "the router failed to handle this request; nothing was accepted; retry with the same "
                "webhook-id",
            )
        metrics.WEBHOOK_REJECTIONS.labels(
            route=name if receiver is not None else UNKNOWN_ROUTE, status=str(refused.status)
        ).inc()
        response = problem_response(refused, request.url.path)
        if not getattr(request.state, "body_read", False):
            # The unread body would have to be received and discarded; closing is cheaper and leaves no
            # doubt about where a doubly framed body ends.
            response.headers["Connection"] = "close"
        return response

    async def openapi(_: Request) -> Response:
        return JSONResponse(document)

    return [
        Route(WEBHOOK_PATH, webhook, methods=_ALL_METHODS),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
