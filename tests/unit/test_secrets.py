"""Secrets are known values: what the configuration declares secret is masked wherever it appears."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path
from urllib.parse import quote

import pytest

from ops.logging import configure_logging
from ops.secrets import SECRETS, redact
from router.config import load_config

# "@" and "/" are the characters that used to end the masked part of a URL password early.
AWKWARD_PASSWORD = "p@ss/w0rd:9"
QUERY_TOKEN = "qt-5e1f0c7d9b2a"
HEADER_KEY = "hk-0a9b8c7d6e5f"
BASIC_USER = "erp-basic-user"


@pytest.mark.parametrize(
    ("text", "secret", "kept"),
    [
        ("broker amqp://router:p@ss/w0rd@mq:5672// refused", "ss/w0rd", "amqp://router:***@mq:5672//"),
        (f"store postgresql://router:{quote('p@ss/w')}@db/x", "ss", "postgresql://router:***@db/x"),
        ("GET http://api/orders?access_token=AbC123xyz&page=2", "AbC123xyz", "orders?access_token=***"),
        ("echoed: access_token=AbC123xyz", "AbC123xyz", "access_token=***"),
        ("Authorization: Basic dXNlcjpwQHNzL3cwcmQ=", "dXNlcjpw", "Authorization: Basic ***"),
        ('{"authorization": "Digest username=x"}', "username=x", '"authorization": "Digest ***"'),
        ("X-Api-Key: k-7781", "k-7781", "X-Api-Key: ***"),
    ],
)
def test_credentials_are_masked_by_their_shape(text: str, secret: str, kept: str) -> None:
    redacted = redact(text)

    assert secret not in redacted, redacted
    assert kept in redacted


def test_masking_stays_fast_on_long_unbroken_text() -> None:
    blob = "A" * 200_000 + "token" * 1000

    assert redact(blob) == blob


def _config_with_secrets(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(
        """\
version: 1
store: {url: "sqlite:///state.db"}
targets:
  erp:
    type: http
    url: "http://127.0.0.1:9/inventory?access_token=${QUERY_TOKEN}"
    headers: {X-Api-Key: "${HEADER_KEY}", X-Trace: plain-value-1}
    auth: {basic: {username: erp-basic-user, password: "${BASIC_PASSWORD}"}}
routes:
  - name: pos-sales
    source: {type: file, path: inbox}
    format: csv
    map: {type: sale, sku: {column: SKU}, location: {column: STORE}, quantity: {column: QTY}}
    deliver: [erp]
""",
        encoding="utf-8",
    )
    return path


def test_secrets_in_the_configuration_are_known_values_once_it_is_loaded(tmp_path: Path) -> None:
    env = {"QUERY_TOKEN": QUERY_TOKEN, "HEADER_KEY": HEADER_KEY, "BASIC_PASSWORD": AWKWARD_PASSWORD}
    load_config(_config_with_secrets(tmp_path), env)
    basic = base64.b64encode(f"{BASIC_USER}:{AWKWARD_PASSWORD}".encode()).decode()

    # Bare, as a target echoing them would: no URL, no "key=" around them.
    secrets = (QUERY_TOKEN, HEADER_KEY, AWKWARD_PASSWORD, quote(AWKWARD_PASSWORD, safe=""), basic)
    redacted = redact("got " + " / ".join(secrets))

    for secret in secrets:
        assert secret not in redacted, redacted
    assert redacted.count("***") == 5
    # Ordinary headers and the user name (an identifier, not a credential) stay readable.
    assert redact("plain-value-1 and erp-basic-user") == "plain-value-1 and erp-basic-user"


def test_known_secrets_never_reach_a_log_handler(tmp_path: Path) -> None:
    load_config(
        _config_with_secrets(tmp_path),
        {"QUERY_TOKEN": QUERY_TOKEN, "HEADER_KEY": HEADER_KEY, "BASIC_PASSWORD": AWKWARD_PASSWORD},
    )
    output = io.StringIO()
    # A handler a library set up on its own logger gets the filter too.
    library_output = io.StringIO()
    library = logging.getLogger("some.library")
    library.addHandler(logging.StreamHandler(library_output))
    library.propagate = False
    try:
        configure_logging("INFO", json=True, stream=output)
        logging.getLogger("router.delivery_worker").error("target said: bad key %s", HEADER_KEY)
        library.error("password was %s", AWKWARD_PASSWORD)
    finally:
        library.handlers.clear()
        library.propagate = True

    [line] = [json.loads(text) for text in output.getvalue().splitlines()]
    assert line["msg"] == "target said: bad key ***"
    assert AWKWARD_PASSWORD not in library_output.getvalue() and "***" in library_output.getvalue()


def test_short_values_are_not_masked_everywhere() -> None:
    SECRETS.add("abc")

    assert redact("abc def") == "abc def"


def test_ordinary_query_values_of_a_configured_url_stay_readable_outside_it() -> None:
    SECRETS.add_url("https://api.example/orders?status=shipped&api_key=ak-90817263")

    assert redact("order shipped, key ak-90817263") == "order shipped, key ***"
    assert (
        redact("GET https://api.example/orders?status=shipped") == "GET https://api.example/orders?status=***"
    )


def test_each_password_of_a_broker_failover_list_is_a_known_secret() -> None:
    SECRETS.add_url("amqp://router:node-one-pw@mq1:5672//;amqp://router:node-two-pw@mq2:5672//")

    assert redact("auth failed for node-one-pw, then node-two-pw") == "auth failed for ***, then ***"
