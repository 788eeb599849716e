"""Partner webhook source: ``POST /webhooks/<route>`` receives signed JSON and publishes it as one chunk.

A request is answered 202 only after the intake (connectors.webhook_intake) had the broker confirm
the chunk and the id ledger record its ``webhook-id``; when the broker is unreachable the answer is
503 with Retry-After and nothing is remembered, so the partner's retry (same ``webhook-id``) is taken
in full. A ``webhook-id`` already accepted answers 200 and publishes nothing, or 409 when it comes
with a different body (a sender reusing ids would otherwise lose messages silently). Deliveries of
one id racing in on two processes may both publish; that is harmless because event ids derive from
the webhook id, so downstream deduplicates them. Every
rejection is an RFC 9457 ``application/problem+json`` body, counted in
``router_webhook_rejections_total``; what needs no body is checked before the body is read, and the
signature before the rate limit is spent. Bodies must be interoperable JSON (RFC 7493).
``GET /openapi.json`` describes the configured receivers.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from connectors.chunks import SourceChunk
from connectors.signatures import (
    DEFAULT_TOLERANCE,
    ID_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    SignatureScheme,
    check_headers,
    check_match,
    secret_key,
    signature_header,
    signs_timestamp,
)
from connectors.webhook_intake import Admission, IntakeUnavailable, Unavailable, WebhookIntake
from ops import metrics, tracing
from transforms.interop_json import MAX_DEPTH, JsonRefused, loads_interoperable, printable
from transforms.parsers import RawRecord, document_without

log = logging.getLogger(__name__)

SYSTEM = "webhook"
PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:retail-router:problem:"
BROKER_RETRY_AFTER = 5
"""Seconds a partner is asked to wait after a 503 (broker unreachable) before retrying."""
DEFAULT_BODY_TIMEOUT = 30.0
"""Seconds a client has to send the whole body once its headers arrived (slow senders hold resources)."""
DEFAULT_SIGNATURE_FAILURES = (20, 60.0)
"""Requests with invalid signatures one peer address may send per minute before it is refused unread."""
MAX_WEBHOOK_ID = 200
"""Longest webhook-id accepted: the id ledger keeps it (and the message id made of it) in bounded columns."""
UNKNOWN_ROUTE = "_unknown"
"""The ``route`` label of rejections of requests for no configured route (keeps the label bounded)."""
LISTENER_ROUTE = "_listener"
"""The ``route`` label of requests the listener refused before any route was chosen (no connection free)."""

WEBHOOK_PATH = "/webhooks/{route}"
"""The route template of every partner webhook (the ``http.route`` of its server span)."""
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@dataclass(frozen=True)
class WebhookSettings:
    """A webhook route's receiver settings; sizes in bytes, durations in seconds.

    ``schema`` is the loaded JSON Schema of the payload (None: any JSON); ``rate_limit`` is
    (requests, per seconds) or None; ``records`` is a JMESPath selecting the record list (None: the
    payload is one record, or a list of records if it is an array); ``signature_header`` overrides the
    scheme's header name (for ``sha256-prefixed`` partners such as GitHub-style senders);
    ``body_timeout`` bounds the time to receive the body; ``signature_failures`` is the allowance
    (failures, per seconds) of requests with invalid signatures one peer address may send.
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
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    signature_failures: tuple[int, float] = DEFAULT_SIGNATURE_FAILURES


class TokenBucket:
    """Allows ``count`` requests per ``seconds`` on average, with bursts up to ``count``."""

    def __init__(self, count: int, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = float(count)
        self._rate = count / seconds
        self._tokens = float(count)
        self._clock = clock
        self._updated = clock()

    def wait(self) -> float:
        """Seconds until a token will be available (0: one is available now); takes nothing."""
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self._rate

    def take(self) -> float:
        """Take a token and return 0, or return the seconds until one will be available."""
        wait = self.wait()
        if wait == 0.0:
            self._tokens -= 1.0
        return wait


class FailureAllowance:
    """Requests with invalid signatures allowed per peer address; a peer past it is refused unread.

    Kept apart from the route's rate limit, so strangers' bad requests never spend the partner's
    allowance. At most ``MAX_PEERS`` addresses are tracked (least recently failing forgotten first),
    so a flood from many addresses cannot grow memory without bound.
    """

    MAX_PEERS = 4096

    def __init__(self, count: int, seconds: float) -> None:
        self._count = count
        self._seconds = seconds
        self._peers: OrderedDict[str, TokenBucket] = OrderedDict()

    def wait(self, peer: str) -> float:
        """Seconds until ``peer`` may be heard again (0: now)."""
        bucket = self._peers.get(peer)
        return 0.0 if bucket is None else bucket.wait()

    def spend(self, peer: str) -> None:
        """Count one invalid request from ``peer``."""
        bucket = self._peers.pop(peer, None) or TokenBucket(self._count, self._seconds)
        bucket.take()
        self._peers[peer] = bucket
        if len(self._peers) > self.MAX_PEERS:
            self._peers.popitem(last=False)


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


def _malformed_request(detail: str) -> WebhookRejected:
    return WebhookRejected(400, "malformed-request", "Malformed request", detail)


def _check_framing(request: Request) -> None:
    """Refuse a body framed two ways: proxies may disagree on where it ends (request smuggling)."""
    if "transfer-encoding" in request.headers and "content-length" in request.headers:
        raise _malformed_request(
            "both Content-Length and Transfer-Encoding are set; send exactly one (RFC 9112 section 6.3)"
        )


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
            f"Content-Type {media_type[:80]!r} is not accepted; send application/json or application/*+json",
        )
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise WebhookRejected(
                415,
                "unsupported-media-type",
                "Unsupported media type",
                f"charset {charset[:40]!r} is not accepted; JSON is UTF-8",
            )


def _too_large(detail: str) -> WebhookRejected:
    return WebhookRejected(413, "payload-too-large", "Payload too large", detail)


async def _read_body(request: Request, max_body: int, timeout: float) -> bytes:
    """The request body, refused beyond ``max_body`` (by header or while streaming) or ``timeout`` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.isdigit():
            raise _malformed_request(f"Content-Length {declared[:40]!r} is not a number")
        # The length test first: int() of thousands of digits is slow, or refused outright.
        if len(declared.lstrip("0")) > len(str(max_body)) or int(declared) > max_body:
            raise _too_large(f"Content-Length {declared[:40]} exceeds the limit of {max_body} bytes")
    received = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for part in request.stream():
                # Keep at most one byte beyond the limit: enough to know it was exceeded.
                received += part[: max_body + 1 - len(received)]
                if len(received) > max_body:
                    raise _too_large(f"body exceeds the limit of {max_body} bytes")
    except TimeoutError:
        raise WebhookRejected(
            408,
            "request-timeout",
            "Request timeout",
            f"the body did not arrive within {timeout:g} s ({len(received)} bytes received); "
            "nothing was accepted",
        ) from None
    except ClientDisconnect:
        raise _malformed_request("client disconnected mid-body") from None
    request.state.body_read = True
    return bytes(received)


def _schema_errors(validator: Draft202012Validator, payload: Any) -> list[dict[str, str]]:
    errors = sorted(validator.iter_errors(payload), key=lambda error: (error.json_path, error.message))
    return [
        {"path": error.json_path, "message": error.message, "keyword": str(error.validator)}
        for error in errors
    ]


def _payload(body: bytes, *, exact_numbers: bool) -> Any:
    """The decoded payload; non-integer numbers are Decimal when ``exact_numbers`` (no float quantities)."""
    try:
        return loads_interoperable(body, exact=exact_numbers)
    except JsonRefused as refused:
        raise WebhookRejected(
            400,
            "malformed-json",
            "Malformed JSON",
            str(refused),
            errors=[
                {"path": issue.path, "message": issue.message, "keyword": str(issue.problem)}
                for issue in refused.issues
            ],
        ) from None


def _unavailable(kind: str, what: str) -> WebhookRejected:
    return WebhookRejected(
        503,
        kind,
        "Service unavailable",
        f"{what} could not be reached; nothing was accepted; retry with the same webhook-id",
        headers={"Retry-After": str(BROKER_RETRY_AFTER)},
    )


def _peer(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _retry_after(wait: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(wait)))}


class WebhookReceiver:
    """One route's receiver: checks a request in the documented order and publishes its records."""

    def __init__(self, settings: WebhookSettings, intake: WebhookIntake) -> None:
        self.settings = settings
        self._intake = intake
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
        self._failures = FailureAllowance(*settings.signature_failures)
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
        """Answer one request: 202 published, 200 already accepted, or a problem+json rejection.

        Everything that needs no body is checked before the body is read, and the signature before
        the rate limit is spent: only the partner's own requests use up its allowance.
        """
        settings = self.settings
        _check_media_type(request.headers.get("content-type"))
        webhook_id = request.headers.get(ID_HEADER)
        offered = self._signature_headers(request, webhook_id) if settings.secret is not None else []
        body = await _read_body(request, settings.max_body, settings.body_timeout)
        if settings.secret is not None:
            self._signature_match(request, body, offered, webhook_id)
        if self._bucket is not None and (wait := self._bucket.take()) > 0:
            raise WebhookRejected(
                429, "rate-limited", "Too many requests", self._rate_detail, headers=_retry_after(wait)
            )
        if not webhook_id:
            raise WebhookRejected(
                400,
                "missing-webhook-id",
                "Missing webhook-id",
                f"the {ID_HEADER} header is required (idempotency key)",
            )
        if len(webhook_id) > MAX_WEBHOOK_ID:
            raise _malformed_request(
                f"the {ID_HEADER} header has {len(webhook_id)} characters; at most {MAX_WEBHOOK_ID} are kept"
            )
        message_id = f"webhook:{settings.route}:{webhook_id}"
        records, document = self._records_of(body)
        chunk = SourceChunk(
            route=settings.route,
            system=SYSTEM,
            message_id=message_id,
            origin={"webhook_id": webhook_id},
            records=[
                RawRecord(number, None, record, document=document)
                for number, record in enumerate(records, start=1)
            ],
            # The intake's broker thread publishes it: the publish span joins this request's trace.
            trace=tracing.current_context(),
        )
        try:
            admission = await self._intake.admit(chunk, webhook_id, hashlib.sha256(body).hexdigest())
        except IntakeUnavailable as unavailable:
            kind = (
                "broker-unavailable" if unavailable.dependency is Unavailable.BROKER else "store-unavailable"
            )
            raise _unavailable(kind, f"the {unavailable.dependency.value}") from None
        if admission is Admission.DUPLICATE:
            return JSONResponse({"message_id": message_id, "duplicate": True}, 200)
        if admission is Admission.CONFLICT:
            # Answering 200 here would silently drop a new message whose sender reused an id.
            raise WebhookRejected(
                409,
                "webhook-id-reused",
                "webhook-id reused for different content",
                f"webhook-id {webhook_id!r} was already accepted with a different body; the earlier message "
                "stands. A retry must resend the same body; a new message needs a new webhook-id",
            )
        # DEBUG: at INFO this line alone cost 10% of the listener's CPU under load (bench/README.md).
        log.debug(
            "webhook %s on route %s accepted: %d records",
            webhook_id,
            settings.route,
            len(records),
            extra={"route": settings.route, "webhook_id": webhook_id, "records": len(records)},
        )
        return JSONResponse({"message_id": message_id, "records": len(records)}, 202)

    def _signature_headers(self, request: Request, webhook_id: str | None) -> list[bytes]:
        """The offered signatures, from headers alone: a peer over its failure allowance is not read."""
        peer = _peer(request)
        if (wait := self._failures.wait(peer)) > 0:
            count, seconds = self.settings.signature_failures
            raise WebhookRejected(
                429,
                "too-many-invalid-signatures",
                "Too many invalid signatures",
                f"more than {count} requests with invalid signatures per {seconds:g} s from {peer}; "
                "fix the signing before retrying",
                headers=_retry_after(wait),
            )
        try:
            return check_headers(
                webhook_id=webhook_id,
                timestamp=request.headers.get(TIMESTAMP_HEADER),
                signature=request.headers.get(self.signature_header),
                scheme=self._scheme,
                header=self.signature_header,
                tolerance=self.settings.tolerance,
            )
        except SignatureError as error:
            raise self._invalid_signature(peer, webhook_id, error) from None

    def _signature_match(
        self, request: Request, body: bytes, offered: list[bytes], webhook_id: str | None
    ) -> None:
        try:
            check_match(
                self.settings.secret or "",
                body,
                offered,
                webhook_id=webhook_id,
                timestamp=request.headers.get(TIMESTAMP_HEADER),
                scheme=self._scheme,
                header=self.signature_header,
            )
        except SignatureError as error:
            raise self._invalid_signature(_peer(request), webhook_id, error) from None

    def _invalid_signature(self, peer: str, webhook_id: str | None, error: SignatureError) -> WebhookRejected:
        self._failures.spend(peer)
        log.warning(
            "webhook on route %s from %s refused: %s",
            self.settings.route,
            peer,
            error,
            extra={"route": self.settings.route, "webhook_id": webhook_id},
        )
        return WebhookRejected(401, "invalid-signature", "Invalid signature", str(error))

    def _records_of(self, body: bytes) -> tuple[list[Any], Any]:
        """The payload's records, and the payload without them: what ``from: document`` reads."""
        payload = _payload(body, exact_numbers=True)
        if self._validator is not None and not self._validator.is_valid(payload):
            # Re-read with float numbers only to word the errors: "-1 is less than..." not "Decimal('-1')...".
            errors = _schema_errors(self._validator, _payload(body, exact_numbers=False))
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
            try:
                selected = self._records.search(payload)
            except JMESPathError as error:
                # A function in the path met a value of another type: the payload's shape is wrong.
                raise self._no_records(
                    f"records path {self.settings.records!r} fails on this payload: {error}"
                ) from None
            if selected is None:
                raise self._no_records(
                    f"records path {self.settings.records!r} selects nothing in the payload"
                )
        records = selected if isinstance(selected, list) else [selected]
        if not records:
            raise self._no_records("the payload holds no records")
        return records, None if self._records is None else document_without(payload, selected)

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
            _check_framing(request)
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
