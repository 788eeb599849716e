"""Reading one REST route's pages: the authenticated GET, retries within a poll, size bounds, exact JSON.

408, 429, 5xx, timeouts and connection failures are retried within the poll with capped backoff that
honours Retry-After (one that outlives the poll holds off the next poll too); other statuses wait for
the next poll. An error response is logged by an excerpt of its body, a page larger than
``max_page_bytes`` is refused before it is all read, and a page decodes to interoperable JSON with exact
numbers. Which page to read and what to publish of it is :mod:`connectors.rest_source`'s.
"""

from __future__ import annotations

import codecs
import logging
import re
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx

from connectors.http_target import USER_AGENT, interruptible_sleep
from connectors.retry import parse_http_date, parse_retry_after
from ops.secrets import redact, register_http_credentials
from transforms.interop_json import JsonRefused, loads_interoperable

if TYPE_CHECKING:
    from connectors.rest_settings import RestPollSettings

log = logging.getLogger(__name__)

EXCERPT_CHARS = 300
# Only this much of an error response is read: enough for the excerpt, the rest is dropped.
MAX_ERROR_BODY_BYTES = 64 * 1024
_WHITESPACE = re.compile(r"\s+")
_RETRYABLE_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class PollFailed(Exception):
    """The poll cannot go on; the message says what failed, where and what was expected."""


class PollInterrupted(Exception):
    """A shutdown cut a retry wait short."""


class _Attempt(NamedTuple):
    """One request's result: the page body on success, else what failed and whether to retry."""

    body: bytes | None
    detail: str
    retryable: bool
    retry_after: float | None


class PageReader:
    """GETs the pages of one REST route's API with the route's headers and auth."""

    def __init__(self, settings: RestPollSettings, client: httpx.Client | None = None) -> None:
        self.settings = settings
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=settings.timeout)
        self.url = httpx.URL(settings.url).copy_with(fragment=None)
        self._auth = httpx.BasicAuth(*settings.basic) if settings.basic else None
        self._headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **settings.headers}
        if settings.bearer:
            self._headers["Authorization"] = f"Bearer {settings.bearer}"
        # An API may echo the request (URL, headers) in its error body; secrets must not reach the logs.
        register_http_credentials(settings.url, settings.headers, settings.bearer, settings.basic)
        self.resume_at = 0.0
        """The monotonic time the next poll must not start before (a Retry-After that outlived a poll)."""

    def document(self, cursor: str | None, label: str, stop: threading.Event | None) -> Any:
        """The page at ``cursor`` (None: the first page) as JSON; raises PollFailed or PollInterrupted."""
        return self._decode(self._fetch(cursor, label, stop), label)

    def close(self) -> None:
        """Close the connection pool, unless the client was handed in by the caller."""
        if self._owns_client:
            self._client.close()

    def _fetch(self, cursor: str | None, label: str, stop: threading.Event | None) -> bytes:
        """The page's body, retrying 408/429/5xx and transport failures with backoff within the poll."""
        policy = self.settings.retry
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            outcome = self._attempt(cursor, label)
            if outcome.body is not None:
                return outcome.body
            if not outcome.retryable:
                raise PollFailed(f"{outcome.detail}; trying again at the next poll")
            remaining = policy.max_age - (time.monotonic() - started)
            retry_after = outcome.retry_after or 0.0
            if attempt >= policy.attempts or remaining <= 0 or retry_after > remaining:
                # The server's Retry-After outlives this poll: the next one must not come before it.
                self.resume_at = time.monotonic() + retry_after
                raise PollFailed(
                    f"{outcome.detail}; gave up after {attempt} attempt(s), trying again at the next poll"
                    + (f" (not before {retry_after:g}s, as Retry-After asks)" if retry_after else "")
                )
            wait = policy.delay(attempt, outcome.retry_after, remaining=remaining)
            log.warning(
                "rest source of route %s: %s; retrying in %.2fs (attempt %d of %d)",
                self.settings.route,
                redact(outcome.detail),
                wait,
                attempt,
                policy.attempts,
                extra={"route": self.settings.route},
            )
            if interruptible_sleep(wait, stop):
                raise PollInterrupted

    def _attempt(self, cursor: str | None, label: str) -> _Attempt:
        url = self.url
        if cursor is not None and self.settings.cursor_param is not None:
            url = url.copy_set_param(self.settings.cursor_param, cursor)
        timeout = self.settings.timeout
        try:
            request = self._client.build_request("GET", url, headers=self._headers, timeout=timeout)
            response = self._client.send(request, auth=self._auth, stream=True)
            try:
                if response.is_success:
                    return _Attempt(self._read_page(response, label), "", False, None)
                excerpt = self._read_excerpt(response)
            finally:
                response.close()
        except httpx.TimeoutException:
            return _Attempt(None, f"GET {label} timed out after {timeout:g}s", True, None)
        except _RETRYABLE_TRANSPORT as error:
            return _Attempt(None, f"GET {label} failed: {type(error).__name__}: {error}", True, None)
        except httpx.HTTPError as error:
            return _Attempt(None, f"GET {label} failed: {type(error).__name__}: {error}", False, None)
        status = response.status_code
        detail = f"GET {label} answered HTTP {status}{self._hint(response)}"
        if excerpt:
            detail += f": {excerpt}"
        if status in (408, 429) or 500 <= status < 600:
            server_now = parse_http_date(response.headers.get("Date"))
            retry_after = parse_retry_after(response.headers.get("Retry-After"), server_now)
            return _Attempt(None, detail, True, retry_after)
        return _Attempt(None, detail, False, None)

    def _hint(self, response: httpx.Response) -> str:
        if response.status_code in (401, 403):
            return " (check the route's auth)"
        if response.is_redirect:
            return f" (redirect to {response.headers.get('Location', '?')}; set the url to the new address)"
        return ""

    def _read_page(self, response: httpx.Response, label: str) -> bytes:
        limit = self.settings.max_page_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PollFailed(f"page {label} is {declared} bytes, more than max_page_bytes ({limit})")
        body = bytearray()
        for part in response.iter_bytes():
            body += part
            if len(body) > limit:
                raise PollFailed(f"page {label} is larger than max_page_bytes ({limit})")
        return bytes(body)

    def _read_excerpt(self, response: httpx.Response) -> str:
        body = bytearray()
        for part in response.iter_bytes():
            body += part
            if len(body) >= MAX_ERROR_BODY_BYTES:
                break
        text = _WHITESPACE.sub(" ", body.decode(response.encoding or "utf-8", errors="replace")).strip()
        return text if len(text) <= EXCERPT_CHARS else f"{text[:EXCERPT_CHARS]}..."

    def _decode(self, body: bytes, label: str) -> Any:
        """The page as interoperable JSON with exact numbers: non-integers become Decimal, never float.

        A page other systems would read differently (a lone surrogate, a duplicate key, a number beyond
        a double, nesting too deep to walk) fails the poll with every problem named, instead of
        failing later when its records are published.
        """
        try:
            return loads_interoperable(body.removeprefix(codecs.BOM_UTF8))
        except JsonRefused as refused:
            raise PollFailed(f"page {label} is not valid JSON: {refused}") from None
