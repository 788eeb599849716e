"""What every console response and form passes: security headers, a bounded body, a plain refusal."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "/console"
"""Where the console is mounted on its listener."""
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}
NO_STORE = {"cache-control": "no-store"}


class SecurityHeaders:
    """Adds the console's security headers to every response, and no-store to all but static assets."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        static = str(scope.get("path", "")).startswith(f"{PREFIX}/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = {**SECURITY_HEADERS, **({} if static else NO_STORE)}
                headers = [(k, v) for k, v in message.get("headers", []) if k.decode("latin-1") not in extra]
                headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def bounded(request: Request, limit: int) -> bool:
    """Whether the request says its body's length and it is within ``limit`` (read before any form)."""
    length = request.headers.get("content-length", "")
    return length.isdigit() and int(length) <= limit


def refused(message: str, status: int) -> Response:
    """A plain-text refusal: for requests that never reach a page (no session, a forged form)."""
    return PlainTextResponse(f"{status} refused: {message}\n", status_code=status)
