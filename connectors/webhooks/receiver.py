"""One webhook route's receiver: checks a request in the documented order and publishes its records."""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from connectors.chunks import SourceChunk
from connectors.signatures import (
    ID_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    SignatureScheme,
    check_headers,
    check_match,
    secret_key,
    signature_header,
)
from connectors.webhooks.intake import Admission, IntakeUnavailable, Unavailable, WebhookIntake
from connectors.webhooks.problems import WebhookRejected
from connectors.webhooks.rate_limit import FailureAllowance, TokenBucket
from connectors.webhooks.request import check_media_type, malformed_request, read_body
from connectors.webhooks.settings import WebhookSettings
from ops import tracing
from transforms.interop_json import JsonRefused, loads_interoperable
from transforms.json_records import document_without
from transforms.records import RawRecord

log = logging.getLogger(__name__)

SYSTEM = "webhook"
BROKER_RETRY_AFTER = 5
"""Seconds a partner is asked to wait after a 503 (broker unreachable) before retrying."""
MAX_WEBHOOK_ID = 200
"""Longest webhook-id accepted: the id ledger keeps it (and the message id made of it) in bounded columns."""


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
        check_media_type(request.headers.get("content-type"))
        webhook_id = request.headers.get(ID_HEADER)
        offered = self._signature_headers(request, webhook_id) if settings.secret is not None else []
        body = await read_body(request, settings.max_body, settings.body_timeout)
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
            raise malformed_request(
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
