"""The file drop source: stability guard, claims, archive-after-confirm, errors folder, release."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from connectors.chunks import SourceChunk
from connectors.file_source import FileDropSettings, FileDropSource, FileOutcome
from router.broker import decode_body, encode_body
from router.ingress import chunk_message


def _settings(root: Path, *, stable_for: float = 0.0, chunk_size: int = 2) -> FileDropSettings:
    return FileDropSettings(
        route="pos-sales",
        inbox=root / "inbox",
        pattern="*.csv",
        archive=root / "archive",
        errors=root / "errors",
        stable_for=stable_for,
        poll=0.05,
        format="csv",
        records="rows",
        chunk_size=chunk_size,
    )


def _drop(root: Path, name: str, text: str, *, age: float = 60.0) -> Path:
    inbox = root / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    path = inbox / name
    path.write_text(text, encoding="utf-8")
    past = time.time() - age
    os.utime(path, (past, past))
    return path


SALES = "SKU,STORE,QTY\nA,S1,1\nB,S1,2\nC,S2,3\n"


def test_a_stable_file_is_published_in_chunks_then_archived(tmp_path: Path) -> None:
    chunks: list[SourceChunk] = []
    _drop(tmp_path, "pos-1.csv", SALES)
    results = FileDropSource(_settings(tmp_path), chunks.append).poll_once()

    assert [(r.name, r.outcome, r.records, r.chunks) for r in results] == [
        ("pos-1.csv", FileOutcome.archived, 3, 2)
    ]
    assert [[r.number for r in c.records] for c in chunks] == [[1, 2], [3]]
    assert [r.line for r in chunks[1].records] == [4]
    assert chunks[0].origin["file"] == "pos-1.csv" and len(chunks[0].origin["sha256"]) == 64
    assert (tmp_path / "archive" / "pos-1.csv").read_text(encoding="utf-8") == SALES
    assert not (tmp_path / "inbox" / "pos-1.csv").exists()


def test_a_file_still_being_written_waits_for_stable_for(tmp_path: Path) -> None:
    chunks: list[SourceChunk] = []
    _drop(tmp_path, "pos-2.csv", SALES, age=0.0)
    source = FileDropSource(_settings(tmp_path, stable_for=30.0), chunks.append)
    assert source.poll_once() == []
    assert (tmp_path / "inbox" / "pos-2.csv").exists() and chunks == []


def test_an_unparseable_file_goes_to_errors_with_its_reason_and_nothing_is_published(tmp_path: Path) -> None:
    chunks: list[SourceChunk] = []
    rejected: list[str] = []
    _drop(tmp_path, "dup.csv", "SKU,SKU\n1,2\n")
    source = FileDropSource(
        _settings(tmp_path), chunks.append, on_rejected=lambda s, p, e: rejected.append(p.name)
    )
    [result] = source.poll_once()

    assert result.outcome is FileOutcome.rejected and chunks == []
    assert rejected == ["dup.csv"]
    reason = (tmp_path / "errors" / "dup.csv.reason.txt").read_text(encoding="utf-8")
    assert "dup.csv" in reason and "SKU" in reason


def test_a_file_whose_publish_fails_returns_to_the_inbox_and_is_taken_again(tmp_path: Path) -> None:
    _drop(tmp_path, "pos-3.csv", SALES)
    calls = {"n": 0}

    def flaky_sink(chunk: SourceChunk) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("broker unreachable")

    source = FileDropSource(_settings(tmp_path), flaky_sink)
    [first] = source.poll_once()
    assert first.outcome is FileOutcome.released and first.chunks == 1
    assert (tmp_path / "inbox" / "pos-3.csv").exists()

    retried: list[SourceChunk] = []
    source = FileDropSource(_settings(tmp_path), retried.append)
    [second] = source.poll_once()
    assert second.outcome is FileOutcome.archived
    assert next(c.message_id for c in retried).startswith("pos-3.csv@")


def test_an_orphaned_claim_from_a_dead_process_is_ingested(tmp_path: Path) -> None:
    processing = tmp_path / "inbox" / ".processing"
    processing.mkdir(parents=True)
    (processing / "pos-4.csv").write_text(SALES, encoding="utf-8")
    chunks: list[SourceChunk] = []
    [result] = FileDropSource(_settings(tmp_path), chunks.append).poll_once()
    assert result.outcome is FileOutcome.archived and sum(len(c.records) for c in chunks) == 3


def test_two_sources_on_one_inbox_ingest_each_file_once(tmp_path: Path) -> None:
    for n in range(20):
        _drop(tmp_path, f"pos-{n:02d}.csv", SALES)
    seen: list[str] = []
    lock = threading.Lock()

    def sink(chunk: SourceChunk) -> None:
        with lock:
            seen.append(chunk.message_id)

    sources = [FileDropSource(_settings(tmp_path, chunk_size=10), sink) for _ in range(2)]
    threads = [threading.Thread(target=s.poll_once) for s in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(seen) == 20 and len(set(seen)) == 20
    assert len(list((tmp_path / "archive").glob("*.csv"))) == 20


@pytest.mark.parametrize("name", ["notes.txt", ".hidden.csv"])
def test_files_outside_the_pattern_are_left_alone(tmp_path: Path, name: str) -> None:
    _drop(tmp_path, name, SALES)
    assert FileDropSource(_settings(tmp_path), lambda c: None).poll_once() == []
    assert (tmp_path / "inbox" / name).exists()


def test_a_jsonl_file_with_a_lone_surrogate_and_deep_nesting_is_archived_not_retried_forever(
    tmp_path: Path,
) -> None:
    # Found by tests/property: the surrogate made the broker's JSON encoding fail and the nesting raised
    # RecursionError, so the file went back to the inbox on every poll and was never ingested.
    published: list[bytes] = []
    settings = replace(_settings(tmp_path), pattern="*.jsonl", format="jsonl", records=None)
    _drop(tmp_path, "feed.jsonl", '{"sku": "\\ud800"}\n' + "[" * 50_000 + "]" * 50_000 + '\n{"sku": "B"}\n')

    def sink(chunk: SourceChunk) -> None:
        published.append(encode_body(chunk_message(chunk)))

    [result] = FileDropSource(settings, sink).poll_once()

    assert (result.outcome, result.records) == (FileOutcome.archived, 3)
    records = [record for body in published for record in decode_body(body)["records"]]
    assert [record.get("error", "")[:20] for record in records] == [
        "line holds the lone ",
        "line nests arrays an",
        "",
    ]
