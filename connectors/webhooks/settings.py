"""A webhook route's receiver settings, as the configuration gives them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from connectors.signatures import DEFAULT_TOLERANCE

DEFAULT_BODY_TIMEOUT = 30.0
"""Seconds a client has to send the whole body once its headers arrived (slow senders hold resources)."""
DEFAULT_SIGNATURE_FAILURES = (20, 60.0)
"""Requests with invalid signatures one peer address may send per minute before it is refused unread."""


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
