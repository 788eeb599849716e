"""The file delivery target on a real local folder: atomic files, naming, idempotent redelivery,
transient versus permanent write failures, drain interruption and no temporary files left behind."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.delivery import DeliveryOutcome
from connectors.file_target import FileTarget, FileTargetSettings
from connectors.retry import RetryPolicy

FAST = RetryPolicy(attempts=5, initial=0.01, max_delay=0.02, max_age=30.0)
PAYLOAD = b'[{"event_id": "ev-1", "sku": "SKU-1", "quantity": "2"}]'
JSON = "application/json"


def target_for(folder: Path, **overrides: object) -> FileTarget:
    options: dict[str, object] = {"retry": FAST}
    hooks = {key: overrides.pop(key) for key in ("on_attempt", "now") if key in overrides}
    options.update(overrides)
    return FileTarget(FileTargetSettings("wms", folder, **options), **hooks)  # type: ignore[arg-type]


def listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_a_payload_becomes_one_file_named_by_the_default_pattern(tmp_path: Path) -> None:
    result = target_for(tmp_path).deliver(PAYLOAD, JSON, "ev-1")

    assert (result.outcome, result.attempts, result.reason) == (DeliveryOutcome.delivered, 1, "delivered")
    assert listing(tmp_path) == ["wms-ev-1.json"]
    assert (tmp_path / "wms-ev-1.json").read_bytes() == PAYLOAD
    assert str(tmp_path / "wms-ev-1.json") in result.detail


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [("text/csv; charset=utf-8", "wms-batch-1.csv"), ("application/xml", "wms-batch-1.xml")],
)
def test_the_extension_follows_the_rendered_format(tmp_path: Path, content_type: str, expected: str) -> None:
    target_for(tmp_path).deliver(b"SKU,QTY\nA,1\n", content_type, "batch-1")
    assert listing(tmp_path) == [expected]


def test_date_and_time_are_utc_of_the_delivery(tmp_path: Path) -> None:
    began = datetime(2026, 11, 24, 23, 59, 7, tzinfo=UTC).astimezone()
    target = target_for(tmp_path, filename="INV_{date}_{time}_{key}.{ext}", now=lambda: began)
    target.deliver(PAYLOAD, JSON, "ev-9")
    assert listing(tmp_path) == ["INV_20261124_235907_ev-9.json"]


def test_redelivering_the_same_key_replaces_the_file_instead_of_adding_one(tmp_path: Path) -> None:
    target = target_for(tmp_path)
    target.deliver(b"first rendering", JSON, "ev-1")
    again = target.deliver(b"second rendering", JSON, "ev-1")

    assert again.outcome is DeliveryOutcome.delivered
    assert listing(tmp_path) == ["wms-ev-1.json"]
    assert (tmp_path / "wms-ev-1.json").read_bytes() == b"second rendering"


def test_a_reader_polling_the_folder_never_sees_a_partial_file(tmp_path: Path) -> None:
    payload = os.urandom(4 << 20)
    partial: list[tuple[str, int]] = []
    done = threading.Event()

    def watch() -> None:
        # A partner's poller: it skips dot-files, as the hidden temporary name expects.
        while not done.is_set():
            for entry in os.scandir(tmp_path):
                if entry.name.startswith("."):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    size = entry.stat().st_size
                    if size != len(payload):
                        partial.append((entry.name, size))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    target = target_for(tmp_path)
    try:
        results = [target.deliver(payload, JSON, f"ev-{n}") for n in range(6)]
    finally:
        done.set()
        watcher.join(5)

    assert all(result.outcome is DeliveryOutcome.delivered for result in results)
    assert partial == []
    assert listing(tmp_path) == [f"wms-ev-{n}.json" for n in range(6)]
    assert all((tmp_path / f"wms-ev-{n}.json").read_bytes() == payload for n in range(6))


def test_a_folder_that_appears_after_the_first_attempt_is_retried_into(tmp_path: Path) -> None:
    share = tmp_path / "wms-share"
    outcomes: list[str] = []

    def mount_after_first_failure(outcome: str, seconds: float) -> None:
        outcomes.append(outcome)
        share.mkdir(exist_ok=True)

    result = target_for(share, on_attempt=mount_after_first_failure).deliver(PAYLOAD, JSON, "ev-1")

    assert (result.outcome, result.attempts) == (DeliveryOutcome.delivered, 2)
    assert outcomes == ["error", "success"]
    assert listing(share) == ["wms-ev-1.json"]


def test_a_folder_that_never_appears_exhausts_the_retries_with_a_clear_detail(tmp_path: Path) -> None:
    share = tmp_path / "not-mounted"
    policy = RetryPolicy(attempts=3, initial=0.01, max_delay=0.01, max_age=30.0)
    result = target_for(share, retry=policy).deliver(PAYLOAD, JSON, "ev-1")

    assert (result.outcome, result.attempts, result.reason) == (
        DeliveryOutcome.retries_exhausted,
        3,
        "retries_exhausted",
    )
    assert f"the folder {share} does not exist" in result.detail
    assert listing(tmp_path) == []


def test_a_key_that_would_leave_the_folder_is_permanent_and_writes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "outbound"
    folder.mkdir()
    result = target_for(folder).deliver(PAYLOAD, JSON, "../../etc/cron.d/x")

    assert (result.outcome, result.attempts, result.reason) == (DeliveryOutcome.permanent, 0, "filename")
    assert "would leave the target's folder" in result.detail and "../../etc/cron.d/x" in result.detail
    assert listing(tmp_path) == ["outbound"] and listing(folder) == []


def test_a_folder_in_the_way_of_the_file_is_permanent_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "wms-ev-1.json").mkdir()
    outcomes: list[str] = []
    result = target_for(tmp_path, on_attempt=lambda outcome, _: outcomes.append(outcome)).deliver(
        PAYLOAD, JSON, "ev-1"
    )

    assert (result.outcome, result.attempts, result.reason) == (DeliveryOutcome.permanent, 1, "file_error")
    assert "EISDIR" in result.detail and "a folder already has the file's name" in result.detail
    assert outcomes == ["error"]
    assert listing(tmp_path) == ["wms-ev-1.json"]


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with EFBIG (as on a filesystem that cannot hold the file)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_write_failing_midway_leaves_neither_a_partial_file_nor_a_temporary_one(tmp_path: Path) -> None:
    target_for(tmp_path).deliver(b"the old, complete file", JSON, "ev-1")
    with file_size_limit(64 << 10):
        result = target_for(tmp_path).deliver(b"x" * (256 << 10), JSON, "ev-1")

    assert (result.outcome, result.attempts) == (DeliveryOutcome.permanent, 1)
    assert "EFBIG" in result.detail
    assert listing(tmp_path) == ["wms-ev-1.json"]
    assert (tmp_path / "wms-ev-1.json").read_bytes() == b"the old, complete file"


def test_stop_interrupts_the_wait_between_attempts_promptly(tmp_path: Path) -> None:
    stop = threading.Event()
    attempted = threading.Event()
    results = []
    slow = RetryPolicy(attempts=5, initial=30.0, max_delay=30.0, max_age=600.0)
    target = target_for(tmp_path / "missing", retry=slow, on_attempt=lambda outcome, _: attempted.set())
    worker = threading.Thread(target=lambda: results.append(target.deliver(PAYLOAD, JSON, "ev-1", stop=stop)))
    worker.start()
    assert attempted.wait(5)
    # The full-jitter wait may be short by chance; what matters is that it never outlives the stop.
    stopped_at = time.monotonic()
    stop.set()
    worker.join(5)

    assert not worker.is_alive() and time.monotonic() - stopped_at < 1.0
    [result] = results
    assert result.outcome is DeliveryOutcome.interrupted
    assert "interrupted by shutdown after" in result.detail
