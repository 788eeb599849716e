"""Webhook signature verification: Standard Webhooks interop, rotation, tolerance and the partner variants."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from connectors.signatures import (
    SignatureError,
    check_headers,
    check_match,
    secret_key,
    sign,
)

# The published example of the Standard Webhooks specification, so partners' libraries interoperate.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def verify(secret: str, body: bytes, **request: Any) -> None:
    """Both steps of the receiver: the headers (``check_headers``' arguments), then the body."""
    offered = check_headers(**request)
    check_match(
        secret,
        body,
        offered,
        webhook_id=request["webhook_id"],
        timestamp=request["timestamp"],
        scheme=request.get("scheme", "standard"),
        header=request.get("header"),
    )


def check(signature: str | None, **overrides: object) -> None:
    arguments: dict[str, object] = {
        "webhook_id": SPEC_ID,
        "timestamp": str(SPEC_TIMESTAMP),
        "signature": signature,
        "now": SPEC_TIMESTAMP + 10,
    }
    arguments.update(overrides)
    body = arguments.pop("body", SPEC_BODY)
    secret = arguments.pop("secret", SPEC_SECRET)
    verify(secret, body, **arguments)  # type: ignore[arg-type]


def test_sign_reproduces_the_standard_webhooks_example() -> None:
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE
    check(SPEC_SIGNATURE)


def test_any_of_several_signatures_passes_for_key_rotation() -> None:
    old = sign("whsec_" + "b2xkLXNlY3JldA==", SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    check(f"v2,ignored {old} {SPEC_SIGNATURE}")


def test_tampered_body_is_refused_without_revealing_the_expected_signature() -> None:
    with pytest.raises(SignatureError) as caught:
        check(SPEC_SIGNATURE, body=b'{"test": 1}')
    message = str(caught.value)
    assert "none of the 1 signature in webhook-signature matches" in message
    assert SPEC_SIGNATURE.removeprefix("v1,") not in message


def test_a_signature_written_with_its_spare_base64_bits_set_is_refused() -> None:
    # "...1OF=" decodes to the same bytes as the spec's "...1OE=": only the canonical form counts.
    variant = SPEC_SIGNATURE[:-2] + "F="
    assert base64.b64decode(variant[3:]) == base64.b64decode(SPEC_SIGNATURE[3:])
    with pytest.raises(SignatureError, match="no well-formed signature"):
        check(variant)


def test_signature_of_another_message_id_does_not_verify() -> None:
    with pytest.raises(SignatureError, match="matches"):
        check(SPEC_SIGNATURE, webhook_id="msg_other")


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (SPEC_TIMESTAMP + 412, "is 412 s old, beyond the tolerance of 300 s"),
        (SPEC_TIMESTAMP - 400, "is 400 s in the future, beyond the tolerance of 300 s"),
    ],
)
def test_timestamps_outside_the_tolerance_are_stale(now: int, expected: str) -> None:
    with pytest.raises(SignatureError, match=expected):
        check(SPEC_SIGNATURE, now=now)


def test_tolerance_is_configurable() -> None:
    check(SPEC_SIGNATURE, now=SPEC_TIMESTAMP + 412, tolerance=600.0)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"signature": None}, "missing webhook-signature header"),
        ({"webhook_id": None}, "missing webhook-id header"),
        ({"timestamp": None}, "missing webhook-timestamp header"),
        ({"timestamp": "yesterday"}, "'yesterday' is not an integer number of seconds"),
        ({"signature": "v1,not base64!"}, "holds no well-formed signature; expected 'v1,<base64>'"),
    ],
)
def test_missing_or_malformed_headers_say_which(overrides: dict[str, object], expected: str) -> None:
    arguments: dict[str, object] = {"signature": SPEC_SIGNATURE, **overrides}
    signature = arguments.pop("signature")
    with pytest.raises(SignatureError, match=expected):
        check(signature, **arguments)  # type: ignore[arg-type]


def test_hex_variant_signs_the_same_content_in_hex() -> None:
    signature = sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY, "hex")
    assert signature == bytes.fromhex(signature).hex()
    check(signature, scheme="hex")
    check("v1," + signature, scheme="hex")
    with pytest.raises(SignatureError, match="matches"):
        check(signature, scheme="hex", body=b"{}")


def test_sha256_prefixed_variant_signs_the_body_only_in_its_own_header() -> None:
    signature = sign("plain-secret", "", 0, SPEC_BODY, "sha256-prefixed")
    assert signature.startswith("sha256=")
    verify(
        "plain-secret",
        SPEC_BODY,
        webhook_id=None,
        timestamp=None,
        signature=signature,
        scheme="sha256-prefixed",
    )
    with pytest.raises(SignatureError, match="in x-hub-signature-256 matches"):
        verify(
            "other", SPEC_BODY, webhook_id=None, timestamp=None, signature=signature, scheme="sha256-prefixed"
        )
    with pytest.raises(SignatureError, match="missing x-partner-sig header"):
        verify(
            "plain-secret",
            SPEC_BODY,
            webhook_id=None,
            timestamp=None,
            signature=None,
            scheme="sha256-prefixed",
            header="X-Partner-Sig",
        )


def test_secret_without_prefix_is_used_as_raw_bytes() -> None:
    assert secret_key("s3cret") == b"s3cret"
    assert secret_key("whsec_czNjcmV0") == b"s3cret"


def test_whsec_secret_that_is_not_base64_is_refused() -> None:
    with pytest.raises(ValueError, match="not base64"):
        secret_key("whsec_***")


def _flip(text: str, position: int, bit: int) -> str:
    """``text`` (ASCII) with one of the low seven bits of one character inverted, so it stays ASCII."""
    index = position % len(text)
    return text[:index] + chr(ord(text[index]) ^ (1 << bit)) + text[index + 1 :]


ascii_text = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)


@settings(max_examples=300)
@given(
    key=st.binary(min_size=1, max_size=64),
    webhook_id=ascii_text,
    body=st.binary(min_size=1, max_size=200),
    skew=st.integers(-300, 300),
    scheme=st.sampled_from(["standard", "hex", "sha256-prefixed"]),
    part=st.sampled_from(["webhook_id", "timestamp", "body", "signature"]),
    position=st.integers(0, 10_000),
    bit=st.integers(0, 6),
)
def test_valid_signatures_verify_and_any_bit_flip_is_refused_with_a_signature_error(
    key: bytes,
    webhook_id: str,
    body: bytes,
    skew: int,
    scheme: str,
    part: str,
    position: int,
    bit: int,
) -> None:
    secret = "whsec_" + base64.b64encode(key).decode()
    timestamp = "1700000000"
    signature = sign(secret, webhook_id, timestamp, body, scheme)
    request = {"webhook_id": webhook_id, "timestamp": timestamp, "signature": signature, "body": body}
    verify(
        secret,
        body,
        webhook_id=webhook_id,
        timestamp=timestamp,
        signature=signature,
        scheme=scheme,
        now=1700000000 + skew,
    )

    if part == "body":
        index = position % len(body)
        request["body"] = body[:index] + bytes([body[index] ^ (1 << bit)]) + body[index + 1 :]
    else:
        assume(part == "signature" or scheme != "sha256-prefixed")  # that scheme signs the body only
        request[part] = _flip(str(request[part]), position, bit)
        # Hex digests are case-insensitive: a flipped case bit is the same signature.
        assume(part != "signature" or scheme == "standard" or request[part].lower() != signature.lower())

    with pytest.raises(SignatureError):
        verify(
            secret,
            bytes(request["body"]),  # type: ignore[arg-type]
            webhook_id=str(request["webhook_id"]),
            timestamp=str(request["timestamp"]),
            signature=str(request["signature"]),
            scheme=scheme,
            now=1700000000 + skew,
        )
