"""The SFTP source against a real OpenSSH sshd on loopback: claims, host keys, outages, archiving."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from connectors import sftp_claim
from connectors.chunks import SourceChunk
from connectors.drop_source import IngestOutcome
from connectors.file_ingest import FileParsing, Readiness, Refusal, refusal_of
from connectors.sftp_session import SftpEndpoint
from connectors.sftp_source import SftpSettings, SftpSource
from ops.metrics import REGISTRY
from tests.sftp_server import CLIENT_KEY_PASSPHRASE, SftpServer, generate_key, running_sftp_server
from transforms.parsers import FileFormatError

ASN = "SKU,STORE,QTY\nA-100,DC1,12\nB-200,DC1,4\nC-300,DC2,7\n"
LOGGER = "connectors.sftp_source"


@dataclass
class RecordingSink:
    """Stands in for the broker: keeps confirmed chunks, or raises from chunk number ``fail_at`` on."""

    chunks: list[SourceChunk] = field(default_factory=list)
    fail_at: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, chunk: SourceChunk) -> None:
        with self.lock:
            if self.fail_at is not None and len(self.chunks) + 1 >= self.fail_at:
                raise ConnectionError("broker unreachable")
            self.chunks.append(chunk)


class FakeClock:
    """A clock the test moves by hand, for the stability window."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sftp_server(tmp_path: Path) -> Iterator[SftpServer]:
    with running_sftp_server(tmp_path / "sshd") as server:
        yield server


@pytest.fixture
def supplier_dir(tmp_path: Path) -> Path:
    """The folder suppliers drop into: served by the SFTP server (same machine), inspected directly."""
    folder = tmp_path / "supplier" / "inbound"
    folder.mkdir(parents=True)
    return folder


def settings_for(server: SftpServer, inbox: Path, **overrides: Any) -> SftpSettings:
    """Source settings for ``inbox`` on ``server``; an override may name a login or parsing field too."""
    login: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port,
        "username": server.username,
        "known_hosts": server.known_hosts,
        "key_file": server.client_key,
        "key_passphrase": CLIENT_KEY_PASSPHRASE,
        "connect_timeout": 5.0,
        "io_timeout": 10.0,
    }
    parsing: dict[str, Any] = {"format": "csv", "records": "rows", "chunk_size": 2}
    values: dict[str, Any] = {
        "route": "supplier-asn",
        "remote_dir": str(inbox),
        "pattern": "*.csv",
        "archive": str(inbox.parent / "archive"),
        "poll": 0.05,
        "stable_for": 0.0,
        "reconnect_max": 0.2,
    }
    for key, value in overrides.items():
        (login if key in login or key == "password" else parsing if key in parsing else values)[key] = value
    endpoint = SftpEndpoint(**login)
    file_parsing = FileParsing(values["route"], "sftp", **parsing)
    return SftpSettings(endpoint=endpoint, parsing=file_parsing, **values)


def drop(server: SftpServer, inbox: Path, name: str, text: str = ASN) -> None:
    """Upload a file over SFTP as a supplier does."""
    with server.client() as client:
        client.putfo(io.BytesIO(text.encode()), str(inbox / name))


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.05)


def test_a_dropped_file_is_published_with_its_remote_name_then_archived(
    sftp_server: SftpServer, supplier_dir: Path, tmp_path: Path
) -> None:
    drop(sftp_server, supplier_dir, "asn-0001.csv")
    sink = RecordingSink()
    source = SftpSource(settings_for(sftp_server, supplier_dir), sink, staging_dir=tmp_path / "staging")
    try:
        [result] = source.poll_once()
    finally:
        source.close()

    assert (result.outcome, result.records, result.chunks) == (IngestOutcome.archived, 3, 2)
    assert [c.origin["file"] for c in sink.chunks] == ["asn-0001.csv", "asn-0001.csv"]
    assert all(c.system == "sftp" and c.route == "supplier-asn" for c in sink.chunks)
    assert [[r.number for r in c.records] for c in sink.chunks] == [[1, 2], [3]]
    assert sink.chunks[0].message_id.startswith("asn-0001.csv@")
    archived = supplier_dir.parent / "archive" / "asn-0001.csv"
    assert result.moved_to == str(archived) and archived.read_text() == ASN
    assert not (supplier_dir / "asn-0001.csv").exists()
    assert not list((supplier_dir / ".processing").iterdir())
    assert not list((tmp_path / "staging").iterdir()), "the local staging copy is removed"


def test_with_delete_the_remote_file_is_removed_after_publishing(
    sftp_server: SftpServer, supplier_dir: Path
) -> None:
    drop(sftp_server, supplier_dir, "receipt-7.csv")
    drop(sftp_server, supplier_dir, "notes.txt", "not for this route")
    sink = RecordingSink()
    source = SftpSource(settings_for(sftp_server, supplier_dir, archive=None, delete=True), sink)
    try:
        [result] = source.poll_once()
    finally:
        source.close()

    assert result.outcome is IngestOutcome.deleted and result.moved_to is None
    assert sum(len(c.records) for c in sink.chunks) == 3
    assert sorted(p.name for p in supplier_dir.iterdir()) == [".processing", "notes.txt"]
    assert not (supplier_dir.parent / "archive").exists()


def test_a_file_still_growing_is_taken_only_once_stable(sftp_server: SftpServer, supplier_dir: Path) -> None:
    clock = FakeClock(1_700_000_000.0)
    sink = RecordingSink()
    source = SftpSource(settings_for(sftp_server, supplier_dir, stable_for=5.0), sink, clock=clock)
    try:
        growing = str(supplier_dir / "asn-big.csv")
        with sftp_server.client() as supplier, supplier.open(growing, "w") as upload:
            upload.write("SKU,STORE,QTY\nA-100,DC1,12\n")
            upload.flush()
            assert source.poll_once() == [], "first sighting: not yet known to be stable"
            clock.now += 10
            upload.write("B-200,DC1,4\n")
            upload.flush()
            assert source.poll_once() == [], "its size changed since the last poll"
            clock.now += 3
            assert source.poll_once() == [], "unchanged for 3s only, stable_for is 5s"
            upload.write("C-300,DC2,7\n")
        clock.now += 6
        assert source.poll_once() == [], "the last write changed it again"
        assert sink.chunks == [] and (supplier_dir / "asn-big.csv").exists()
        clock.now += 6
        [result] = source.poll_once()
    finally:
        source.close()
    assert result.outcome is IngestOutcome.archived and result.records == 3


def _source_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The source's own log records: paramiko's may be captured too when an earlier test raised its level."""
    return [record for record in caplog.records if record.name == LOGGER]


def test_a_changed_host_key_is_refused_and_the_file_stays(
    sftp_server: SftpServer, supplier_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    drop(sftp_server, supplier_dir, "asn-0002.csv")
    impostor = generate_key(tmp_path / "other_host_key")
    known_hosts = tmp_path / "known_hosts_other"
    known_hosts.write_text(sftp_server.known_hosts_line(impostor), encoding="utf-8")
    sink = RecordingSink()
    settings = settings_for(sftp_server, supplier_dir, known_hosts=known_hosts, poll=1.0, reconnect_max=60.0)
    source = SftpSource(settings, sink)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert source.poll_once() == []
        assert source.next_poll_in == 1.0
        assert source.poll_once() == []
    source.close()

    refusal = _source_records(caplog)[0]
    assert refusal.levelno == logging.ERROR
    assert "CHANGED" in refusal.getMessage() and f"127.0.0.1:{sftp_server.port}" in refusal.getMessage()
    assert sftp_server.host_key_fingerprint in refusal.getMessage()
    assert source.next_poll_in == 2.0, "reconnect attempts back off"
    assert sink.chunks == [] and (supplier_dir / "asn-0002.csv").read_text() == ASN


def test_an_unknown_host_is_refused(
    sftp_server: SftpServer, supplier_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    drop(sftp_server, supplier_dir, "asn-0003.csv")
    known_hosts = tmp_path / "known_hosts_empty"
    known_hosts.write_text("", encoding="utf-8")
    source = SftpSource(settings_for(sftp_server, supplier_dir, known_hosts=known_hosts), RecordingSink())
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert source.poll_once() == []
    source.close()

    message = _source_records(caplog)[0].getMessage()
    assert "unknown" in message and f"127.0.0.1:{sftp_server.port}" in message
    assert sftp_server.host_key_fingerprint in message
    assert (supplier_dir / "asn-0003.csv").exists()


def _source_up(route: str) -> float | None:
    return REGISTRY.get_sample_value("router_source_up", {"route": route})


def test_the_source_survives_a_server_restart_and_ingests_afterwards(
    sftp_server: SftpServer, supplier_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = RecordingSink()
    source = SftpSource(settings_for(sftp_server, supplier_dir), sink)
    stop = threading.Event()
    runner = threading.Thread(target=source.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        runner.start()
        try:
            wait_until(lambda: "connected to SFTP server" in caplog.text)
            sftp_server.stop()
            wait_until(lambda: "cannot connect to SFTP server" in caplog.text)
            wait_until(lambda: _source_up("supplier-asn") == 0.0)  # what an operator's alert watches
            # The supplier's file lands while the router cannot reach the server.
            (supplier_dir / "asn-0004.csv").write_text(ASN, encoding="utf-8")
            time.sleep(0.3)
            assert runner.is_alive() and sink.chunks == []
            sftp_server.restart()
            wait_until(lambda: (supplier_dir.parent / "archive" / "asn-0004.csv").exists())
            wait_until(lambda: _source_up("supplier-asn") == 1.0)
        finally:
            stop.set()
            runner.join(10)
    assert not runner.is_alive(), "run() returns once stopped"
    assert sum(len(c.records) for c in sink.chunks) == 3
    assert "reconnected to SFTP server" in caplog.text


def test_an_unconfirmed_publish_releases_the_file_for_a_later_poll(
    sftp_server: SftpServer, supplier_dir: Path
) -> None:
    drop(sftp_server, supplier_dir, "asn-0005.csv")
    sink = RecordingSink(fail_at=2)
    source = SftpSource(settings_for(sftp_server, supplier_dir), sink)
    try:
        [first] = source.poll_once()
        assert first.outcome is IngestOutcome.released and first.chunks == 1
        assert "broker unreachable" in first.detail
        assert (supplier_dir / "asn-0005.csv").read_text() == ASN
        assert not (supplier_dir.parent / "archive").exists()

        sink.fail_at = None
        [second] = source.poll_once()
    finally:
        source.close()
    assert second.outcome is IngestOutcome.archived
    ids = [c.message_id for c in sink.chunks]
    assert ids[0] == ids[1], "the chunk confirmed before the failure is republished under the same id"
    assert len(ids) == 3


@pytest.mark.parametrize("broker_confirmed", [True, False], ids=["confirmed", "unconfirmed"])
def test_a_file_cut_off_by_a_lost_connection_is_settled_after_reconnecting(
    sftp_server: SftpServer, supplier_dir: Path, broker_confirmed: bool
) -> None:
    drop(sftp_server, supplier_dir, "asn-0007.csv")
    sink = RecordingSink()
    outage = threading.Event()

    def sink_while_the_server_dies(chunk: SourceChunk) -> None:
        if not outage.is_set():
            outage.set()
            sftp_server.stop()
            if not broker_confirmed:
                raise ConnectionError("broker unreachable")
        sink(chunk)

    source = SftpSource(settings_for(sftp_server, supplier_dir), sink_while_the_server_dies)
    try:
        assert source.poll_once() == [], "neither archiving nor releasing can reach the server"
        assert (supplier_dir / ".processing" / "asn-0007.csv").exists()
        sftp_server.start()
        results = source.poll_once()
    finally:
        source.close()

    archive = supplier_dir.parent / "archive"
    if broker_confirmed:
        assert [(r.outcome, r.records, r.chunks) for r in results] == [(IngestOutcome.archived, 3, 2)]
        assert len(sink.chunks) == 2, "a confirmed file is archived, not published again"
    else:
        assert [r.outcome for r in results] == [IngestOutcome.released, IngestOutcome.archived]
        assert sum(len(c.records) for c in sink.chunks) == 3
    assert (archive / "asn-0007.csv").read_text() == ASN
    assert not list((supplier_dir / ".processing").iterdir())


def test_an_unparseable_file_goes_to_errors_with_its_reason(
    sftp_server: SftpServer, supplier_dir: Path
) -> None:
    drop(sftp_server, supplier_dir, "asn-broken.csv", "SKU,SKU\n1,2\n")
    rejected: list[tuple[str, str]] = []
    sink = RecordingSink()
    source = SftpSource(
        settings_for(sftp_server, supplier_dir),
        sink,
        on_rejected=lambda settings, moved, error: rejected.append((moved, str(error))),
    )
    try:
        [result] = source.poll_once()
    finally:
        source.close()

    errors = supplier_dir / "errors"
    assert result.outcome is IngestOutcome.rejected and sink.chunks == []
    assert rejected == [(str(errors / "asn-broken.csv"), result.detail)]
    reason = (errors / "asn-broken.csv.reason.txt").read_text(encoding="utf-8")
    assert reason.startswith("asn-broken.csv") and "SKU" in reason
    assert (errors / "asn-broken.csv").read_text() == "SKU,SKU\n1,2\n"


def test_two_routers_polling_one_folder_ingest_each_file_once(
    sftp_server: SftpServer, supplier_dir: Path
) -> None:
    sink = RecordingSink()
    sources = [SftpSource(settings_for(sftp_server, supplier_dir, chunk_size=10), sink) for _ in range(2)]
    # Both are connected before the files land, so their polls overlap and race for every file.
    assert [source.poll_once() for source in sources] == [[], []]
    names = [f"asn-{n:03d}.csv" for n in range(16)]
    for name in names:
        (supplier_dir / name).write_text(ASN, encoding="utf-8")
    outcomes: list[list[Any]] = [[], []]
    threads = [
        threading.Thread(target=lambda i=i: outcomes[i].extend(sources[i].poll_once())) for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for source in sources:
        source.close()

    assert sorted(c.origin["file"] for c in sink.chunks) == names
    assert sorted(r.name for r in outcomes[0] + outcomes[1]) == names
    assert sorted(p.name for p in (supplier_dir.parent / "archive").iterdir()) == names


def test_a_claim_left_by_a_crashed_router_is_taken_again_once_its_lease_expires(
    sftp_server: SftpServer, supplier_dir: Path
) -> None:
    processing = supplier_dir / ".processing"
    processing.mkdir()
    (processing / "asn-orphan.csv").write_text(ASN, encoding="utf-8")
    (processing / "asn-in-flight.csv").write_text(ASN, encoding="utf-8")
    long_ago = time.time() - 3600
    os.utime(processing / "asn-orphan.csv", (long_ago, long_ago))
    sink = RecordingSink()
    source = SftpSource(settings_for(sftp_server, supplier_dir, claim_ttl=600.0), sink)
    try:
        [result] = source.poll_once()
    finally:
        source.close()

    assert result.name == "asn-orphan.csv" and result.outcome is IngestOutcome.archived
    assert {c.origin["file"] for c in sink.chunks} == {"asn-orphan.csv"}
    assert (processing / "asn-in-flight.csv").exists(), "a claim renewed within claim_ttl is a live router's"


def test_a_file_larger_than_the_download_window_arrives_byte_exact(
    sftp_server: SftpServer, supplier_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sftp_claim, "DOWNLOAD_WINDOW", 64 << 10)
    rows = "".join(f"SKU-{n:06d},DC{n % 7},{n % 50}\n" for n in range(12_000))
    drop(sftp_server, supplier_dir, "asn-large.csv", "SKU,STORE,QTY\n" + rows)
    sink = RecordingSink()
    source = SftpSource(settings_for(sftp_server, supplier_dir, chunk_size=5000), sink)
    try:
        [result] = source.poll_once()
    finally:
        source.close()
    assert result.outcome is IngestOutcome.archived and result.records == 12_000 and result.chunks == 3
    published = [record.data for chunk in sink.chunks for record in chunk.records]
    expected = [{"SKU": f"SKU-{n:06d}", "STORE": f"DC{n % 7}", "QTY": f"{n % 50}"} for n in range(12_000)]
    assert published == expected


def test_password_login_works(tmp_path: Path, supplier_dir: Path) -> None:
    with running_sftp_server(tmp_path / "sshd-password", password="Rcv-2024-dock!") as server:
        (supplier_dir / "asn-0006.csv").write_text(ASN, encoding="utf-8")
        settings = settings_for(
            server, supplier_dir, key_file=None, key_passphrase=None, password="Rcv-2024-dock!"
        )
        sink = RecordingSink()
        source = SftpSource(settings, sink)
        try:
            [result] = source.poll_once()
        finally:
            source.close()
    assert result.outcome is IngestOutcome.archived and len(sink.chunks) == 2
    assert "Rcv-2024-dock!" not in repr(settings)


def test_a_symbolic_link_on_the_server_is_moved_to_errors_unread(
    sftp_server: SftpServer, supplier_dir: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "passwd.csv"
    secret.write_text("SKU,STORE,QTY\nroot,x,0\n", encoding="utf-8")
    (supplier_dir / "asn-link.csv").symlink_to(secret)
    rejected: list[FileFormatError] = []
    sink = RecordingSink()
    source = SftpSource(
        settings_for(sftp_server, supplier_dir),
        sink,
        on_rejected=lambda settings, moved, error: rejected.append(error),
    )
    try:
        [result] = source.poll_once()
        assert source.poll_once() == []
    finally:
        source.close()

    errors = supplier_dir / "errors"
    assert result.outcome is IngestOutcome.rejected and sink.chunks == []
    assert (errors / "asn-link.csv").is_symlink() and os.readlink(errors / "asn-link.csv") == str(secret)
    assert [refusal_of(error) for error in rejected] == [Refusal.link]
    reason = (errors / "asn-link.csv.reason.txt").read_text(encoding="utf-8")
    assert "symbolic link" in reason and "root" not in reason
    assert secret.read_text(encoding="utf-8").endswith("root,x,0\n")


def test_with_a_marker_a_file_is_taken_only_once_its_marker_is_there_and_leaves_with_it(
    sftp_server: SftpServer, supplier_dir: Path
) -> None:
    ready = Readiness.parse({"marker": "{stem}.ok"})
    settings = settings_for(sftp_server, supplier_dir, pattern="*", ready=ready, stable_for=60.0)
    drop(sftp_server, supplier_dir, "asn-0100.csv")
    sink = RecordingSink()
    source = SftpSource(settings, sink)
    try:
        assert source.poll_once() == []
        drop(sftp_server, supplier_dir, "asn-0100.ok", "")
        [result] = source.poll_once()
    finally:
        source.close()
    assert (result.name, result.outcome, result.records) == ("asn-0100.csv", IngestOutcome.archived, 3)
    archived = sorted(p.name for p in (supplier_dir.parent / "archive").iterdir())
    assert archived == ["asn-0100.csv", "asn-0100.ok"]
    assert sorted(p.name for p in supplier_dir.iterdir()) == [".processing"]


def test_with_a_marker_and_delete_the_marker_is_deleted_too(
    sftp_server: SftpServer, supplier_dir: Path
) -> None:
    settings = settings_for(
        sftp_server, supplier_dir, ready=Readiness.parse("marker"), archive=None, delete=True
    )
    drop(sftp_server, supplier_dir, "asn-0101.csv")
    drop(sftp_server, supplier_dir, "asn-0101.csv.done", "")
    source = SftpSource(settings, RecordingSink())
    try:
        [result] = source.poll_once()
    finally:
        source.close()
    assert result.outcome is IngestOutcome.deleted
    assert sorted(p.name for p in supplier_dir.iterdir()) == [".processing"]


def test_with_rename_a_matching_file_is_taken_without_waiting(
    sftp_server: SftpServer, supplier_dir: Path
) -> None:
    settings = settings_for(sftp_server, supplier_dir, ready=Readiness.parse("rename"), stable_for=600.0)
    drop(sftp_server, supplier_dir, "asn-0102.csv.tmp")
    drop(sftp_server, supplier_dir, "asn-0102.csv")
    source = SftpSource(settings, RecordingSink())
    try:
        [result] = source.poll_once()
    finally:
        source.close()
    assert (result.name, result.outcome) == ("asn-0102.csv", IngestOutcome.archived)
    assert (supplier_dir / "asn-0102.csv.tmp").exists()


def test_rows_appended_to_a_claim_while_it_is_published_are_published_before_it_is_archived(
    sftp_server: SftpServer, supplier_dir: Path
) -> None:
    drop(sftp_server, supplier_dir, "asn-0103.csv")
    sink = RecordingSink()

    def appending_sink(chunk: SourceChunk) -> None:
        if not sink.chunks:  # the supplier's writer still holds the file it uploaded
            with (supplier_dir / ".processing" / "asn-0103.csv").open("a", encoding="utf-8") as writer:
                writer.write("D-400,DC3,9\n")
        sink(chunk)

    source = SftpSource(settings_for(sftp_server, supplier_dir), appending_sink)
    try:
        [result] = source.poll_once()
    finally:
        source.close()
    assert (result.outcome, result.records) == (IngestOutcome.archived, 4)
    assert [r.data["SKU"] for c in sink.chunks for r in c.records] == ["A-100", "B-200", "C-300", "D-400"]
    assert len({c.origin["sha256"] for c in sink.chunks}) == 1
    assert (supplier_dir.parent / "archive" / "asn-0103.csv").read_text().endswith("D-400,DC3,9\n")


def test_a_remote_name_that_is_not_utf8_goes_to_errors_and_the_other_files_flow(
    sftp_server: SftpServer, supplier_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with open(os.fsencode(supplier_dir) + b"/asn-\xff.csv", "wb") as handle:
        handle.write(ASN.encode())
    drop(sftp_server, supplier_dir, "asn-0104.csv")
    rejected: list[FileFormatError] = []
    sink = RecordingSink()
    source = SftpSource(
        settings_for(sftp_server, supplier_dir),
        sink,
        on_rejected=lambda settings, moved, error: rejected.append(error),
    )
    try:
        results = source.poll_once()
        assert source.poll_once() == []
    finally:
        source.close()

    assert sorted(r.outcome for r in results) == [IngestOutcome.archived, IngestOutcome.rejected]
    assert [c.origin["file"] for c in sink.chunks] == ["asn-0104.csv", "asn-0104.csv"]
    [error] = rejected
    assert refusal_of(error) is Refusal.file_name and "asn-\\xff.csv" in str(error)
    errors = os.fsencode(supplier_dir / "errors")
    assert os.path.exists(errors + b"/asn-\xff.csv")
    reason = (Path(os.fsdecode(errors + b"/asn-\xff.csv.reason.txt"))).read_text(encoding="utf-8")
    assert "not valid UTF-8" in reason
    # The logs show the name escaped: a raw one could not be written to a UTF-8 log at all.
    assert caplog.records and not any("\udcff" in record.getMessage() for record in caplog.records)
