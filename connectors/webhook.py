"""Partner webhook source: ``POST /webhooks/<route>`` receives signed JSON and publishes it as one chunk.

A request is answered 202 only after the sink returned, i.e. after the broker confirmed the chunk;
when the broker is unreachable the answer is 503 with Retry-After and nothing is remembered, so the
partner's retry (same ``webhook-id``) is taken in full. A ``webhook-id`` already accepted answers 200
and publishes nothing, or 409 when it comes with a different body (a sender reusing ids would
otherwise lose messages silently). Two concurrent deliveries of one id may both publish; that is
harmless because event ids derive from the webhook id, so downstream deduplicates them. Every
rejection is an RFC 9457 ``application/problem+json`` body. ``GET /openapi.json`` describes the
configured receivers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import jmespath
from jmespath.exceptions import JMESPathError
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from connectors.chunks import ChunkSink, SourceChunk
from connectors.signatures import (
    DEFAULT_TOLERANCE,
    ID_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    SignatureScheme,
    secret_key,
    signature_header,
    signs_timestamp,
    verify,
)
from transforms.parsers import RawRecord, loads_json

log = logging.getLogger(__name__)

SYSTEM = "webhook"
PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:retail-router:problem:"
BROKER_RETRY_AFTER = 5
"""Seconds a partner is asked to wait after a 503 (broker unreachable) before retrying."""

_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@dataclass(frozen=True)
class WebhookSettings:
    """A webhook route's receiver settings; sizes in bytes, durations in seconds.

    ``schema`` is the loaded JSON Schema of the payload (None: any JSON); ``rate_limit`` is
    (requests, per seconds) or None; ``records`` is a JMESPath selecting the record list (None: the
    payload is one record, or a list of records if it is an array); ``signature_header`` overrides the
    scheme's header name (for ``sha256-prefixed`` partners such as GitHub-style senders).
    """

    route: str
    secret: str | None
    schema: dict[str, Any] | None
    max_body: int
    rate_limit: tuple[int, float] | None
    tolerance: float = DEFAULT_TOLERANCE
    records: str | None = None
    signature: str = "standard"
    signature_header: str | None = None


class WebhookIdLedger(Protocol):
    """Remembers accepted webhook ids per route, so a redelivery is answered without republishing."""

    def accepted(self, route: str, webhook_id: str) -> str | None:
        """The SHA-256 (hex) of the body accepted under ``webhook_id`` on ``route``, or None."""
        ...

    def remember(self, route: str, webhook_id: str, message_id: str, body_sha256: str) -> None:
        """Record ``webhook_id`` as accepted on ``route`` (published as ``message_id``) and its body hash."""
        ...


class TokenBucket:
    """Allows ``count`` requests per ``seconds`` on average, with bursts up to ``count``."""

    def __init__(self, count: int, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = float(count)
        self._rate = count / seconds
        self._tokens = float(count)
        self._clock = clock
        self._updated = clock()

    def take(self) -> float:
        """Take a token and return 0, or return the seconds until one will be available."""
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate


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


def problem_response(rejection: WebhookRejected, instance: str) -> Response:
    """The RFC 9457 problem+json response for a rejection."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + rejection.kind,
        "title": rejection.title,
        "status": rejection.status,
        "detail": rejection.detail,
        "instance": instance,
    }
    if rejection.errors is not None:
        body["errors"] = rejection.errors
    return JSONResponse(body, rejection.status, headers=rejection.headers, media_type=PROBLEM_MEDIA_TYPE)


def _check_media_type(content_type: str | None) -> None:
    if not content_type:
        raise WebhookRejected(
            415, "unsupported-media-type", "Unsupported media type", "missing Content-Type header"
        )
    media_type, *parameters = (part.strip() for part in content_type.split(";"))
    main, _, subtype = media_type.lower().partition("/")
    if main != "application" or not (subtype == "json" or subtype.endswith("+json")):
        raise WebhookRejected(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            f"Content-Type {media_type!r} is not accepted; send application/json or application/*+json",
        )
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise WebhookRejected(
                415,
                "unsupported-media-type",
                "Unsupported media type",
                f"charset {charset!r} is not accepted; JSON is UTF-8",
            )


def _too_large(detail: str) -> WebhookRejected:
    return WebhookRejected(413, "payload-too-large", "Payload too large", detail)


async def _read_body(request: Request, max_body: int) -> bytes:
    """The request body, refused once it is known to exceed ``max_body`` (by header or while streaming)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise WebhookRejected(
                400,
                "malformed-request",
                "Malformed request",
                f"Content-Length {declared[:40]!r} is not a number",
            ) from None
        if length > max_body:
            raise _too_large(f"Content-Length {length} exceeds the limit of {max_body} bytes")
    received = bytearray()
    try:
        async for part in request.stream():
            # Keep at most one byte beyond the limit: enough to know it was exceeded.
            received += part[: max_body + 1 - len(received)]
            if len(received) > max_body:
                raise _too_large(f"body exceeds the limit of {max_body} bytes")
    except ClientDisconnect:
        raise WebhookRejected(
            400, "malformed-request", "Malformed request", "client disconnected mid-body"
        ) from None
    return bytes(received)


def _parse_json(body: bytes, *, exact_numbers: bool) -> Any:
    """The decoded payload; non-integer numbers are Decimal when ``exact_numbers`` (no float quantities)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise WebhookRejected(
            400,
            "malformed-json",
            "Malformed JSON",
            f"body is not UTF-8: invalid byte at offset {error.start}",
        ) from None
    try:
        return loads_json(text, exact=exact_numbers)
    except json.JSONDecodeError as error:
        raise WebhookRejected(
            400,
            "malformed-json",
            "Malformed JSON",
            f"line {error.lineno} column {error.colno} (char {error.pos}): {error.msg}",
        ) from None
    except ValueError as error:
        raise WebhookRejected(400, "malformed-json", "Malformed JSON", str(error)) from None


def _schema_errors(validator: Draft202012Validator, payload: Any) -> list[dict[str, str]]:
    errors = sorted(validator.iter_errors(payload), key=lambda error: (error.json_path, error.message))
    return [
        {"path": error.json_path, "message": error.message, "keyword": str(error.validator)}
        for error in errors
    ]


class WebhookReceiver:
    """One route's receiver: checks a request in the documented order and publishes its records."""

    def __init__(self, settings: WebhookSettings, sink: ChunkSink, ledger: WebhookIdLedger) -> None:
        self.settings = settings
        self._sink = sink
        self._ledger = ledger
        self._scheme = SignatureScheme(settings.signature)
        self.signature_header = signature_header(self._scheme, settings.signature_header)
        if settings.secret is not None:
            secret_key(settings.secret)  # a malformed whsec_ secret fails at start, not on the first request
        self._bucket: TokenBucket | None = None
        self._rate_detail = ""
        if settings.rate_limit is not None:
            count, seconds = settings.rate_limit
            self._bucket = TokenBucket(count, seconds)
            self._rate_detail = f"route {settings.route!r} accepts {count} requests per {seconds:g} s"
        self._validator: Draft202012Validator | None = None
        if settings.schema is not None:
            try:
                Draft202012Validator.check_schema(settings.schema)
            except SchemaError as error:
                raise ValueError(
                    f"webhook route {settings.route!r}: schema is not a valid JSON Schema: {error.message}"
                ) from None
            self._validator = Draft202012Validator(settings.schema)
        try:
            self._records = jmespath.compile(settings.records) if settings.records else None
        except JMESPathError as error:
            raise ValueError(
                f"webhook route {settings.route!r}: records {settings.records!r}: {error}"
            ) from None

    async def receive(self, request: Request) -> Response:
        """Answer one request: 202 published, 200 already accepted, or a problem+json rejection."""
        settings = self.settings
        if self._bucket is not None and (wait := self._bucket.take()) > 0:
            raise WebhookRejected(
                429,
                "rate-limited",
                "Too many requests",
                self._rate_detail,
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        _check_media_type(request.headers.get("content-type"))
        body = await _read_body(request, settings.max_body)
        webhook_id = request.headers.get(ID_HEADER)
        if settings.secret is not None:
            self._verify(request, body, webhook_id)
        if not webhook_id:
            raise WebhookRejected(
                400,
                "missing-webhook-id",
                "Missing webhook-id",
                f"the {ID_HEADER} header is required (idempotency key)",
            )
        message_id = f"webhook:{settings.route}:{webhook_id}"
        body_sha256 = hashlib.sha256(body).hexdigest()
        accepted = await run_in_threadpool(self._ledger.accepted, settings.route, webhook_id)
        if accepted == body_sha256:
            return JSONResponse({"message_id": message_id, "duplicate": True}, 200)
        if accepted is not None:
            # Answering 200 here would silently drop a new message whose sender reused an id.
            raise WebhookRejected(
                409,
                "webhook-id-reused",
                "webhook-id reused for different content",
                f"webhook-id {webhook_id!r} was already accepted with a different body; the earlier message "
                "stands. A retry must resend the same body; a new message needs a new webhook-id",
            )
        records = self._records_of(body)
        chunk = SourceChunk(
            route=settings.route,
            system=SYSTEM,
            message_id=message_id,
            origin={"webhook_id": webhook_id},
            records=[RawRecord(number, None, record) for number, record in enumerate(records, start=1)],
        )
        try:
            await run_in_threadpool(self._sink, chunk)
        except Exception as error:
            log.warning(
                "webhook %s on route %s not accepted, broker unavailable: %s",
                webhook_id,
                settings.route,
                error,
                extra={"route": settings.route, "webhook_id": webhook_id},
            )
            raise WebhookRejected(
                503,
                "broker-unavailable",
                "Service unavailable",
                "the broker could not store it; nothing was accepted; retry with the same webhook-id",
                headers={"Retry-After": str(BROKER_RETRY_AFTER)},
            ) from None
        try:
            await run_in_threadpool(
                self._ledger.remember, settings.route, webhook_id, message_id, body_sha256
            )
        except Exception:
            # The broker has it, so 202 is true; a redelivery republishes the same event ids (deduplicated).
            log.exception(
                "webhook %s on route %s published but not recorded as seen", webhook_id, settings.route
            )
        log.info(
            "webhook %s on route %s accepted: %d records",
            webhook_id,
            settings.route,
            len(records),
            extra={"route": settings.route, "webhook_id": webhook_id, "records": len(records)},
        )
        return JSONResponse({"message_id": message_id, "records": len(records)}, 202)

    def _verify(self, request: Request, body: bytes, webhook_id: str | None) -> None:
        try:
            verify(
                self.settings.secret or "",
                body,
                webhook_id=webhook_id,
                timestamp=request.headers.get(TIMESTAMP_HEADER),
                signature=request.headers.get(self.signature_header),
                scheme=self._scheme,
                header=self.signature_header,
                tolerance=self.settings.tolerance,
            )
        except SignatureError as error:
            log.warning(
                "webhook on route %s refused: %s",
                self.settings.route,
                error,
                extra={"route": self.settings.route, "webhook_id": webhook_id},
            )
            raise WebhookRejected(401, "invalid-signature", "Invalid signature", str(error)) from None

    def _records_of(self, body: bytes) -> list[Any]:
        payload = _parse_json(body, exact_numbers=True)
        if self._validator is not None and not self._validator.is_valid(payload):
            # Re-read with float numbers only to word the errors: "-1 is less than..." not "Decimal('-1')...".
            errors = _schema_errors(self._validator, _parse_json(body, exact_numbers=False))
            count = len(errors)
            raise WebhookRejected(
                422,
                "contract-violation",
                "Payload violates the route's contract",
                f"{count} schema violation{'s' if count != 1 else ''}; see errors",
                errors=errors,
            )
        if self._records is None:
            selected = payload
        else:
            selected = self._records.search(payload)
            if selected is None:
                raise self._no_records(
                    f"records path {self.settings.records!r} selects nothing in the payload"
                )
        records = selected if isinstance(selected, list) else [selected]
        if not records:
            raise self._no_records("the payload holds no records")
        return records

    def _no_records(self, detail: str) -> WebhookRejected:
        return WebhookRejected(
            422,
            "contract-violation",
            "Payload violates the route's contract",
            detail,
            errors=[{"path": "$", "message": detail, "keyword": "records"}],
        )


def _problem_schema() -> dict[str, Any]:
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
            "schema": {"type": "string", "minLength": 1},
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
        "400": problem("Malformed JSON, or a missing webhook-id header."),
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
    if settings.rate_limit is not None:
        count, seconds = settings.rate_limit
        responses["429"] = problem(
            f"More than {count} requests per {seconds:g} s; retry after Retry-After.", retry_after
        )
    responses["503"] = problem(
        "The broker is unreachable; nothing was accepted; retry after Retry-After.", retry_after
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
                "Problem": _problem_schema(),
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


def webhook_routes(
    receivers: Mapping[str, WebhookSettings], sink: ChunkSink, ledger: WebhookIdLedger
) -> list[BaseRoute]:
    """Starlette routes for ``POST /webhooks/{route}`` and ``GET /openapi.json``.

    Raises ValueError for a route whose schema, records path or secret is unusable.
    """
    by_route = {name: WebhookReceiver(settings, sink, ledger) for name, settings in receivers.items()}
    document = openapi_document(by_route)

    async def webhook(request: Request) -> Response:
        name = request.path_params["route"]
        try:
            receiver = by_route.get(name)
            if receiver is None:
                raise WebhookRejected(
                    404, "unknown-route", "Unknown route", f"no webhook route named {name!r}"
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
            return problem_response(rejection, request.url.path)

    async def openapi(_: Request) -> Response:
        return JSONResponse(document)

    return [
        Route("/webhooks/{route}", webhook, methods=_ALL_METHODS),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
