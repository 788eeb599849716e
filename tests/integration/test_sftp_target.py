"""The SFTP delivery target against a real OpenSSH sshd on loopback: upload and rename, host-key pinning,
a server restart between deliveries, password login and settings checks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.delivery import DeliveryOutcome, DeliveryResult
from connectors.retry import RetryPolicy
from connectors.sftp_session import SftpEndpoint
from connectors.sftp_target import SftpTarget, SftpTargetSettings
from tests.sftp_server import (
    CLIENT_KEY_PASSPHRASE,
    SftpServer,
    generate_key,
    require_sshd,
    running_sftp_server,
)

FAST = RetryPolicy(attempts=40, initial=0.05, max_delay=0.2, max_age=30.0)
ADVICE = b"<inventoryAdvice><item sku='A-100' store='DC1' onHand='12'/></inventoryAdvice>"
XML = "application/xml"


@pytest.fixture
def sftp_server(tmp_path: Path) -> Iterator[SftpServer]:
    with running_sftp_server(tmp_path / "sshd") as server:
        yield server


@pytest.fixture
def partner_dir(tmp_path: Path) -> Path:
    """The partner's inbound folder: served by the SFTP server (same machine), inspected directly."""
    folder = tmp_path / "partner" / "inbound"
    folder.mkdir(parents=True)
    return folder


def settings_for(server: SftpServer, remote_dir: Path, **overrides: Any) -> SftpTargetSettings:
    """Target settings for ``remote_dir`` on ``server``; an override may name a login field too."""
    login: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port,
        "username": server.username,
        "known_hosts": server.known_hosts,
        "key_file": server.client_key,
        "key_passphrase": CLIENT_KEY_PASSPHRASE,
        "connect_timeout": 5.0,
        "io_timeout": 5.0,
    }
    values: dict[str, Any] = {"name": "marketplace", "remote_dir": str(remote_dir), "retry": FAST}
    for key, value in overrides.items():
        (login if key in login or key == "password" else values)[key] = value
    return SftpTargetSettings(endpoint=SftpEndpoint(**login), **values)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.005)


def sftp_sessions(server: SftpServer) -> int:
    """How many SFTP sessions the server started (one per login), from its log."""
    return server.log_file.read_text(errors="replace").count("Starting session: subsystem 'sftp'")


def test_payloads_are_uploaded_then_renamed_over_one_kept_connection(
    sftp_server: SftpServer, partner_dir: Path
) -> None:
    target = SftpTarget(settings_for(sftp_server, partner_dir, filename="846_{key}.{ext}"))
    try:
        first = target.deliver(ADVICE, XML, "ev-1")
        second = target.deliver(b"<inventoryAdvice/>", XML, "batch-7f3a")
        again = target.deliver(b"<inventoryAdvice redelivered='1'/>", XML, "ev-1")
    finally:
        target.close()

    assert [r.outcome for r in (first, second, again)] == [DeliveryOutcome.delivered] * 3
    assert f"127.0.0.1:{sftp_server.port}:{partner_dir / '846_ev-1.xml'}" in first.detail
    # No temporary upload is left; the redelivery replaced the file it wrote before.
    assert sorted(p.name for p in partner_dir.iterdir()) == ["846_batch-7f3a.xml", "846_ev-1.xml"]
    assert (partner_dir / "846_ev-1.xml").read_bytes() == b"<inventoryAdvice redelivered='1'/>"
    assert (partner_dir / "846_batch-7f3a.xml").read_bytes() == b"<inventoryAdvice/>"
    assert sftp_sessions(sftp_server) == 1, "the connection is kept between deliveries"


class ServerDenyingPosixRename(SftpServer):
    """An sshd whose SFTP server refuses the posix-rename extension, as some locked-down servers do."""

    def _write_config(self) -> Path:
        config = super()._write_config()
        text = config.read_text(encoding="utf-8")
        config.write_text(text.replace("internal-sftp", "internal-sftp -P posix-rename"), encoding="utf-8")
        return config


def test_without_posix_rename_the_file_is_replaced_by_remove_and_rename(
    partner_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_sshd()
    folder = tmp_path / "sshd-no-posix-rename"
    folder.mkdir()
    server = ServerDenyingPosixRename(folder)
    server.start()
    target = SftpTarget(settings_for(server, partner_dir))
    try:
        with caplog.at_level(logging.WARNING, logger="connectors.sftp_target"):
            results = [target.deliver(body, XML, "ev-1") for body in (b"<first/>", b"<second/>", b"<third/>")]
    finally:
        target.close()
        server.stop()

    assert [(r.outcome, r.attempts) for r in results] == [(DeliveryOutcome.delivered, 1)] * 3
    assert [p.name for p in partner_dir.iterdir()] == ["marketplace-ev-1.xml"]
    assert (partner_dir / "marketplace-ev-1.xml").read_bytes() == b"<third/>"
    assert len([r for r in caplog.records if "refuses posix-rename" in r.getMessage()]) == 1


def test_an_unknown_host_key_is_refused_for_good_with_its_fingerprint(
    sftp_server: SftpServer, partner_dir: Path, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts_empty"
    known_hosts.write_text("", encoding="utf-8")
    target = SftpTarget(settings_for(sftp_server, partner_dir, known_hosts=known_hosts))
    result = target.deliver(ADVICE, XML, "ev-1")
    target.close()

    assert (result.outcome, result.attempts, result.reason) == (DeliveryOutcome.permanent, 1, "sftp_login")
    assert "unknown" in result.detail and f"127.0.0.1:{sftp_server.port}" in result.detail
    assert sftp_server.host_key_fingerprint in result.detail
    assert list(partner_dir.iterdir()) == []


def test_a_changed_host_key_is_refused_for_good_naming_both_keys(
    sftp_server: SftpServer, partner_dir: Path, tmp_path: Path
) -> None:
    impostor = generate_key(tmp_path / "other_host_key")
    known_hosts = tmp_path / "known_hosts_other"
    known_hosts.write_text(sftp_server.known_hosts_line(impostor), encoding="utf-8")
    target = SftpTarget(settings_for(sftp_server, partner_dir, known_hosts=known_hosts))
    result = target.deliver(ADVICE, XML, "ev-1")
    target.close()

    assert (result.outcome, result.reason) == (DeliveryOutcome.permanent, "sftp_login")
    assert "CHANGED" in result.detail and sftp_server.host_key_fingerprint in result.detail
    assert list(partner_dir.iterdir()) == []


def test_a_server_restart_between_deliveries_is_retried_until_it_is_back(
    sftp_server: SftpServer, partner_dir: Path
) -> None:
    failed_once = threading.Event()
    outcomes: list[str] = []

    def record(outcome: str, seconds: float) -> None:
        outcomes.append(outcome)
        if outcome == "error":
            failed_once.set()

    target = SftpTarget(settings_for(sftp_server, partner_dir), on_attempt=record)
    results: list[DeliveryResult] = []
    try:
        assert target.deliver(ADVICE, XML, "ev-1").outcome is DeliveryOutcome.delivered
        sftp_server.stop()
        sender = threading.Thread(target=lambda: results.append(target.deliver(ADVICE, XML, "ev-2")))
        sender.start()
        assert failed_once.wait(10), "the delivery attempted while the server was down"
        sftp_server.start()
        sender.join(15)
    finally:
        target.close()

    assert not sender.is_alive()
    [second] = results
    assert second.outcome is DeliveryOutcome.delivered and second.attempts >= 2
    assert outcomes[0] == "success" and outcomes[-1] == "success" and "error" in outcomes
    assert sorted(p.name for p in partner_dir.iterdir()) == ["marketplace-ev-1.xml", "marketplace-ev-2.xml"]
    assert sftp_sessions(sftp_server) == 2, "one login before the restart, one after"


PASSWORD = "Outb0und-846!"


def test_an_upload_cut_off_by_the_server_leaves_no_temporary_file_once_redelivered(
    sftp_server: SftpServer, partner_dir: Path
) -> None:
    big = bytes(range(256)) * (96 << 12)  # 24 MiB: the upload is still running when the server dies
    results: list[DeliveryResult] = []
    target = SftpTarget(settings_for(sftp_server, partner_dir))
    sender = threading.Thread(target=lambda: results.append(target.deliver(big, XML, "batch-big")))
    try:
        sender.start()
        wait_until(lambda: any(p.name.startswith(".") for p in partner_dir.iterdir()))
        sftp_server.restart()
        sender.join(30)
    finally:
        target.close()

    assert not sender.is_alive()
    [result] = results
    assert result.outcome is DeliveryOutcome.delivered and result.attempts >= 2
    assert [p.name for p in partner_dir.iterdir()] == ["marketplace-batch-big.xml"]
    assert (partner_dir / "marketplace-batch-big.xml").read_bytes() == big


def test_password_login_delivers(tmp_path: Path, partner_dir: Path) -> None:
    with running_sftp_server(tmp_path / "sshd-password", password=PASSWORD) as server:
        settings = settings_for(server, partner_dir, key_file=None, key_passphrase=None, password=PASSWORD)
        target = SftpTarget(settings)
        try:
            result = target.deliver(ADVICE, XML, "ev-1")
        finally:
            target.close()
    assert result.outcome is DeliveryOutcome.delivered
    assert (partner_dir / "marketplace-ev-1.xml").read_bytes() == ADVICE
    assert PASSWORD not in repr(settings)


def test_a_wrong_password_is_refused_for_good(tmp_path: Path, partner_dir: Path) -> None:
    with running_sftp_server(tmp_path / "sshd-password", password=PASSWORD) as server:
        settings = settings_for(server, partner_dir, key_file=None, key_passphrase=None, password="guess")
        target = SftpTarget(settings)
        result = target.deliver(ADVICE, XML, "ev-1")
        target.close()
    assert (result.outcome, result.attempts, result.reason) == (DeliveryOutcome.permanent, 1, "sftp_login")
    assert "Authentication failed" in result.detail and "guess" not in result.detail
