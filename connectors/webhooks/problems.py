"""RFC 9457 problem details: the rejection a webhook request meets, its response and its schema."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse, Response

from transforms.interop_json import printable

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:retail-router:problem:"


class WebhookRejected(Exception):
    """A request the receiver refuses, carrying its problem details."""

    def __init__(
        self,
        status: int,
        kind: str,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


class ProblemResponse(JSONResponse):
    """An ``application/problem+json`` answer, ASCII-only so no echoed input can fail to encode."""

    media_type = PROBLEM_MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def problem_response(rejection: WebhookRejected, instance: str) -> Response:
    """The RFC 9457 problem+json response for a rejection."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + rejection.kind,
        "title": rejection.title,
        "status": rejection.status,
        "detail": rejection.detail,
        "instance": printable(instance),
    }
    if rejection.errors is not None:
        body["errors"] = rejection.errors
    return ProblemResponse(body, rejection.status, headers=rejection.headers)


def problem_schema() -> dict[str, Any]:
    """The JSON Schema of a problem+json body, as :func:`problem_response` writes it."""
    return {
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["path", "message"],
                    "properties": {
                        "path": {"type": "string"},
                        "message": {"type": "string"},
                        "keyword": {"type": "string"},
                    },
                },
            },
        },
    }
