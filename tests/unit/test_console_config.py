"""The console's configuration: salted scrypt password hashes, and routes.yaml refusing unsafe settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from router.cli import main
from router.config import ConfigError, load_config
from router.console.passwords import PasswordHash, hash_password, verify_password
from tests.integration.harness import write_config


def test_a_hash_verifies_its_password_only_and_is_salted() -> None:
    first, second = hash_password("correct horse"), hash_password("correct horse")
    assert first.startswith("scrypt$n=16384,r=8,p=1$") and first != second
    assert verify_password("correct horse", first) and verify_password("correct horse", second)
    assert not verify_password("correct hors", first)
    assert not verify_password("correct horse", "plain-text-password")


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        ("hunter22", "not a password hash"),
        ("scrypt$n=1000,r=8,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==", "out of range"),
        ("scrypt$n=16384,r=8,p=1$AA==$AAAAAAAAAAAAAAAAAAAAAA==", "too short"),
    ],
)
def test_a_malformed_hash_is_refused_saying_what_is_expected(encoded: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        PasswordHash.parse(encoded)


def test_hash_password_prints_a_hash_for_console_users() -> None:
    result = CliRunner().invoke(main, ["console", "hash-password", "--password-stdin"], input="s3cret pw\n")
    assert result.exit_code == 0, result.output
    assert verify_password("s3cret pw", result.output.strip())
    assert "s3cret" not in result.output


def test_routes_yaml_refuses_a_plain_password_under_console_users(tmp_path: Path) -> None:
    path = write_config(tmp_path, broker_url="memory://", prefix="x", targets={"erp": "http://127.0.0.1:9"})
    document = json.loads(path.read_text())
    document["console"] = {"users": {"alice": "hunter22"}}
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert "console.users" in message and "alice" in message and "hash-password" in message
    assert "hunter22" not in message


def test_a_trusted_proxy_header_is_refused_on_the_partners_listener(tmp_path: Path) -> None:
    path = write_config(tmp_path, broker_url="memory://", prefix="x", targets={"erp": "http://127.0.0.1:9"})
    document = json.loads(path.read_text())
    document["console"] = {"trusted_header": "X-Remote-User"}
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=r"a trusted proxy header needs http\.console_listen"):
        load_config(path)
    document["http"] = {"console_listen": "127.0.0.1:8081"}
    path.write_text(json.dumps(document))
    assert load_config(path).console.trusted_header == "X-Remote-User"


def test_several_http_workers_need_one_session_secret_for_the_console(tmp_path: Path) -> None:
    path = write_config(tmp_path, broker_url="memory://", prefix="x", targets={"erp": "http://127.0.0.1:9"})
    document = json.loads(path.read_text())
    document["console"] = {"users": {"alice": hash_password("correct horse")}}
    document["http"] = {**document["http"], "workers": 2}
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=r"http\.workers 2 with the console needs console\.session_secret"):
        load_config(path)
    document["console"]["session_secret"] = "a-long-random-secret-from-the-environment"
    path.write_text(json.dumps(document))
    assert load_config(path).http.workers == 2
