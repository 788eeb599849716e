"""Checks on a webhook request before its payload is read: framing, media type, body size and time."""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request

from connectors.webhooks.problems import WebhookRejected


def malformed_request(detail: str) -> WebhookRejected:
    """A 400 rejection of a request the HTTP layer cannot take as it stands."""
    return WebhookRejected(400, "malformed-request", "Malformed request", detail)


def check_framing(request: Request) -> None:
    """Refuse a body framed two ways: proxies may disagree on where it ends (request smuggling)."""
    if "transfer-encoding" in request.headers and "content-length" in request.headers:
        raise malformed_request(
            "both Content-Length and Transfer-Encoding are set; send exactly one (RFC 9112 section 6.3)"
        )


def check_media_type(content_type: str | None) -> None:
    """Refuse a body that is not declared as UTF-8 JSON."""
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


async def read_body(request: Request, max_body: int, timeout: float) -> bytes:
    """The request body, refused beyond ``max_body`` (by header or while streaming) or ``timeout`` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.isdigit():
            raise malformed_request(f"Content-Length {declared[:40]!r} is not a number")
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
        raise malformed_request("client disconnected mid-body") from None
    request.state.body_read = True
    return bytes(received)
