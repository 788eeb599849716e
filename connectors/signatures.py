"""Webhook signature verification: the Standard Webhooks scheme and the two variants partners commonly send.

Schemes (a webhook route picks one with ``signature``):
- ``standard``: ``webhook-signature: v1,<base64 HMAC-SHA256>`` over
  ``"{webhook-id}.{webhook-timestamp}.{body}"``; several space-separated entries may be sent (key
  rotation) and any match passes.
- ``hex``: the same signed content and header, the digest in lowercase hex (``<hex>`` or ``v1,<hex>``).
- ``sha256-prefixed``: GitHub style, ``sha256=<hex HMAC-SHA256 of the body only>`` in a configurable header
  (default ``x-hub-signature-256``); no timestamp is signed, so no tolerance applies.

A secret ``whsec_<base64>`` is base64-decoded to the key; any other secret is used as its raw UTF-8 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from enum import StrEnum

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE = 300.0
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
STANDARD_SIGNATURE_HEADER = "webhook-signature"
PREFIXED_SIGNATURE_HEADER = "x-hub-signature-256"
# ASCII digits, at most 15: int() would also take "1_0", " 10", non-ASCII digits or 4,000 digits.
_TIMESTAMP = re.compile(r"[0-9]{1,15}")


class SignatureScheme(StrEnum):
    """How a route's partner signs its requests."""

    standard = "standard"
    hex = "hex"
    sha256_prefixed = "sha256-prefixed"


class SignatureError(Exception):
    """A request's signature cannot be accepted; the message says what failed, never the expected value."""


def secret_key(secret: str) -> bytes:
    """The HMAC key of a configured secret; raises ValueError for a ``whsec_`` secret that is not base64."""
    if not secret.startswith(SECRET_PREFIX):
        return secret.encode("utf-8")
    try:
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error as error:
        raise ValueError(
            f"webhook secret starts with {SECRET_PREFIX!r} but the rest is not base64: {error}"
        ) from None


def signature_header(scheme: str, override: str | None = None) -> str:
    """The (lowercase) header carrying the signature for ``scheme``, unless the route names another."""
    if override:
        return override.lower()
    if SignatureScheme(scheme) is SignatureScheme.sha256_prefixed:
        return PREFIXED_SIGNATURE_HEADER
    return STANDARD_SIGNATURE_HEADER


def signs_timestamp(scheme: str) -> bool:
    """Whether ``scheme`` signs ``webhook-id`` and ``webhook-timestamp`` (and so checks the timestamp)."""
    return SignatureScheme(scheme) is not SignatureScheme.sha256_prefixed


def _digest(key: bytes, scheme: SignatureScheme, webhook_id: str, timestamp: str, body: bytes) -> bytes:
    if scheme is SignatureScheme.sha256_prefixed:
        content = body
    else:
        content = f"{webhook_id}.{timestamp}.".encode() + body
    return hmac.new(key, content, hashlib.sha256).digest()


def sign(secret: str, webhook_id: str, timestamp: int | str, body: bytes, scheme: str = "standard") -> str:
    """The signature header value a partner sends for ``body`` (for partners' code and for tests)."""
    chosen = SignatureScheme(scheme)
    digest = _digest(secret_key(secret), chosen, webhook_id, str(timestamp), body)
    if chosen is SignatureScheme.standard:
        return "v1," + base64.b64encode(digest).decode("ascii")
    if chosen is SignatureScheme.hex:
        return digest.hex()
    return "sha256=" + digest.hex()


def _check_timestamp(timestamp: str | None, tolerance: float, now: float) -> None:
    if not timestamp:
        raise SignatureError(f"missing {TIMESTAMP_HEADER} header")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise SignatureError(
            f"{TIMESTAMP_HEADER} {timestamp[:40]!r} is not an integer number of seconds since the epoch"
        )
    sent_at = int(timestamp)
    skew = now - sent_at
    if skew > tolerance:
        raise SignatureError(
            f"{TIMESTAMP_HEADER} is {skew:.0f} s old, beyond the tolerance of {tolerance:.0f} s"
        )
    if -skew > tolerance:
        raise SignatureError(
            f"{TIMESTAMP_HEADER} is {-skew:.0f} s in the future, beyond the tolerance of {tolerance:.0f} s"
        )


def _candidates(scheme: SignatureScheme, header: str, value: str) -> list[bytes]:
    """The signatures offered in the header, decoded; entries of other versions are skipped."""
    offered: list[bytes] = []
    for entry in value.split():
        if scheme is SignatureScheme.standard:
            version, _, encoded = entry.partition(",")
            if version != "v1":
                continue
            try:
                decoded = base64.b64decode(encoded, validate=True)
            except binascii.Error:
                continue
            # Only the canonical encoding counts: with its spare low bits set, one signature could be
            # written several ways, and a flipped character would still verify.
            if base64.b64encode(decoded).decode("ascii") == encoded:
                offered.append(decoded)
        else:
            prefix = "sha256=" if scheme is SignatureScheme.sha256_prefixed else "v1,"
            if scheme is SignatureScheme.sha256_prefixed and not entry.startswith(prefix):
                continue
            try:
                offered.append(bytes.fromhex(entry.removeprefix(prefix)))
            except ValueError:
                continue
    if not offered:
        expected = {
            SignatureScheme.standard: "'v1,<base64>'",
            SignatureScheme.hex: "'<hex>' or 'v1,<hex>'",
            SignatureScheme.sha256_prefixed: "'sha256=<hex>'",
        }[scheme]
        raise SignatureError(f"{header} holds no well-formed signature; expected {expected}")
    return offered


def check_headers(
    *,
    webhook_id: str | None,
    timestamp: str | None,
    signature: str | None,
    scheme: str = "standard",
    header: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> list[bytes]:
    """The signatures offered, once the headers are present, well-formed and fresh; else SignatureError.

    Needs neither the secret nor the body, so a request can be refused before its body is read.
    ``header`` names the signature header in messages (the scheme's default when None); ``now`` is
    the server clock in epoch seconds (the current time when None).
    """
    chosen = SignatureScheme(scheme)
    header_name = signature_header(chosen, header)
    if not signature:
        raise SignatureError(f"missing {header_name} header")
    if signs_timestamp(chosen):
        if not webhook_id:
            raise SignatureError(f"missing {ID_HEADER} header")
        _check_timestamp(timestamp, tolerance, time.time() if now is None else now)
    return _candidates(chosen, header_name, signature)


def check_match(
    secret: str,
    body: bytes,
    offered: list[bytes],
    *,
    webhook_id: str | None,
    timestamp: str | None,
    scheme: str = "standard",
    header: str | None = None,
) -> None:
    """Accept when one of the ``offered`` signatures (from :func:`check_headers`) signs this request."""
    chosen = SignatureScheme(scheme)
    expected = _digest(secret_key(secret), chosen, webhook_id or "", timestamp or "", body)
    # Every candidate is compared, matched or not, so timing does not reveal which entry was close.
    matched = [hmac.compare_digest(expected, candidate) for candidate in offered]
    if not any(matched):
        count = len(offered)
        raise SignatureError(
            f"none of the {count} signature{'s' if count != 1 else ''} in "
            f"{signature_header(chosen, header)} matches the request body signed with this route's secret"
        )

