"""The OpenAPI 3.1 description of the configured webhook receivers (``GET /openapi.json``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from connectors.signatures import ID_HEADER, TIMESTAMP_HEADER, signs_timestamp
from connectors.webhooks.problems import PROBLEM_MEDIA_TYPE, problem_schema
from connectors.webhooks.receiver import MAX_WEBHOOK_ID, WebhookReceiver
from connectors.webhooks.settings import WebhookSettings
from transforms.interop_json import MAX_DEPTH


def _payload_schema(settings: WebhookSettings) -> dict[str, Any]:
    if settings.schema is None:
        return {}
    schema = copy.deepcopy(settings.schema)
    # Its own $id keeps the schema's internal "#/$defs/..." references pointing into itself, not the document.
    schema.setdefault("$id", f"urn:retail-router:webhook:{settings.route}:payload")
    return schema


def _operation(receiver: WebhookReceiver) -> dict[str, Any]:
    settings = receiver.settings

    def problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
        response: dict[str, Any] = {
            "description": description,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        if headers:
            response["headers"] = headers
        return response

    retry_after = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
    parameters: list[dict[str, Any]] = [
        {
            "name": ID_HEADER,
            "in": "header",
            "required": True,
            "description": "Unique id of this message; a redelivery reuses it (idempotency key).",
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_WEBHOOK_ID},
        }
    ]
    responses: dict[str, Any] = {
        "200": {
            "description": "This webhook-id was already accepted; nothing was enqueued again.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Duplicate"}}},
        },
        "202": {
            "description": "Accepted: the message is stored durably in the broker.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
        },
        "400": problem(
            "Not interoperable JSON (RFC 7493: bad UTF-8 or syntax, a lone surrogate, a duplicate key, "
            f"a number beyond a double, NaN/Infinity, nesting over {MAX_DEPTH}; errors names each path), "
            "a missing webhook-id header, or a body framed by both Content-Length and Transfer-Encoding."
        ),
        "408": problem(f"The body did not arrive within {settings.body_timeout:g} s; nothing was accepted."),
        "409": problem("This webhook-id was already accepted with a different body; use a new webhook-id."),
    }
    if settings.secret is not None:
        if signs_timestamp(settings.signature):
            parameters.append(
                {
                    "name": TIMESTAMP_HEADER,
                    "in": "header",
                    "required": True,
                    "description": (
                        f"Unix seconds when signed; accepted within {settings.tolerance:g} s of server time."
                    ),
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                }
            )
        parameters.append(
            {
                "name": receiver.signature_header,
                "in": "header",
                "required": True,
                "description": f"HMAC-SHA256 signature, scheme {settings.signature!r} (docs/webhooks.md).",
                "schema": {"type": "string"},
            }
        )
        responses["401"] = problem("Missing, stale or non-matching signature.")
    responses["413"] = problem(f"Body larger than {settings.max_body} bytes.")
    responses["415"] = problem("Content-Type is not application/json (or application/*+json).")
    responses["422"] = problem(
        "The payload violates the route's JSON Schema; every violation is listed in errors."
    )
    limits = []
    if settings.rate_limit is not None:
        count, seconds = settings.rate_limit
        limits.append(f"More than {count} requests per {seconds:g} s")
    if settings.secret is not None:
        count, seconds = settings.signature_failures
        limits.append(
            f"more than {count} requests with invalid signatures per {seconds:g} s from one address"
        )
    if limits:
        responses["429"] = problem(f"{'; or '.join(limits)}; retry after Retry-After.", retry_after)
    responses["503"] = problem(
        "The broker or the state store is unreachable; nothing was accepted; retry after Retry-After.",
        retry_after,
    )
    return {
        "operationId": f"webhook_{settings.route}",
        "summary": f"Deliver a message to route {settings.route}",
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _payload_schema(settings)}},
        },
        "responses": responses,
    }


def openapi_document(receivers: Mapping[str, WebhookReceiver]) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the webhook endpoints, one path per configured route."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Retail inventory router: partner webhooks",
            "version": "1",
            "description": "Signed partner webhooks (Standard Webhooks); see docs/webhooks.md.",
        },
        "paths": {
            f"/webhooks/{name}": {"post": _operation(receiver)}
            for name, receiver in sorted(receivers.items())
        },
        "components": {
            "schemas": {
                "Problem": problem_schema(),
                "Accepted": {
                    "type": "object",
                    "required": ["message_id"],
                    "properties": {"message_id": {"type": "string"}, "records": {"type": "integer"}},
                },
                "Duplicate": {
                    "type": "object",
                    "required": ["message_id"],
                    "properties": {"message_id": {"type": "string"}, "duplicate": {"type": "boolean"}},
                },
            },
            "headers": {
                "RetryAfter": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer"},
                }
            },
        },
    }
