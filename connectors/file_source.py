"""File drop source: POS exports and other files dropped into a local folder.

A file is taken once it has not changed for ``stable_for`` (so a half-written export is never read),
claimed by an atomic rename into ``<inbox>/.processing`` plus an exclusive lock (so two router
processes never ingest it twice, and a file left behind by a crashed process is picked up again),
checked in a first streaming pass (a file that does not parse goes to ``errors`` with a
``.reason.txt`` beside it, nothing of it published), then streamed in chunks to the broker. Only when
the broker confirmed every chunk is the file moved to ``archive``. Memory stays flat whatever the
file size: neither pass holds more than one chunk of records.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO

from connectors.chunks import ChunkSink
from connectors.file_ingest import FileParsing, FileProgress, publish_file
from ops import metrics
from transforms.fixed_width import FixedLayout
from transforms.parsers import CsvDialect, FileFormatError

log = logging.getLogger(__name__)

PROCESSING_DIR = ".processing"


@dataclass(frozen=True)
class FileDropSettings:
    """A file route's source settings, resolved to absolute paths and seconds."""

    route: str
    inbox: Path
    pattern: str
    archive: Path
    errors: Path
    stable_for: float
    poll: float
    format: str
    records: str | None
    chunk_size: int
    csv: CsvDialect = field(default_factory=CsvDialect)
    fixed: FixedLayout | None = None


class FileOutcome(StrEnum):
    archived = "archived"
    rejected = "rejected"
    released = "released"


@dataclass(frozen=True)
class FileResult:
    """What happened to one dropped file."""

    name: str
    outcome: FileOutcome
    records: int = 0
    chunks: int = 0
    detail: str = ""
    moved_to: Path | None = None


RejectionHook = Callable[[FileDropSettings, Path, FileFormatError], None]


def _free_name(folder: Path, name: str) -> Path:
    """A path in ``folder`` for ``name`` that overwrites nothing (a re-dropped file keeps both)."""
    candidate = folder / name
    if not candidate.exists():
        return candidate
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    # The stamp goes before the extension so the file still matches the route's pattern.
    return folder / f"{candidate.stem}.{stamp}{candidate.suffix}"


def _move(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    destination = _free_name(folder, path.name)
    shutil.move(str(path), destination)
    return destination


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[IO[bytes] | None]:
    """Hold an exclusive lock on ``path`` for the block; yields None when another holder has it."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield handle
    finally:
        handle.close()


class FileDropSource:
    """Polls one route's inbox and publishes every stable file exactly as chunks of raw records."""

    def __init__(
        self,
        settings: FileDropSettings,
        sink: ChunkSink,
        *,
        on_rejected: RejectionHook | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._sink = sink
        self._on_rejected = on_rejected
        self._clock = clock
        self._processing = settings.inbox / PROCESSING_DIR
        self._parsing = FileParsing(
            settings.route,
            "file",
            settings.format,
            settings.records,
            settings.chunk_size,
            settings.csv,
            settings.fixed,
        )

    def _stable_files(self) -> list[Path]:
        now = self._clock()
        ready: list[tuple[float, str, Path]] = []
        for path in self.settings.inbox.glob(self.settings.pattern):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # claimed by another process between glob and stat
            if (
                path.is_file()
                and not path.name.startswith(".")
                and now - stat.st_mtime >= self.settings.stable_for
            ):
                ready.append((stat.st_mtime, path.name, path))
        return [path for _, _, path in sorted(ready)]

    def _claim(self, path: Path) -> Path | None:
        self._processing.mkdir(parents=True, exist_ok=True)
        claimed = self._processing / path.name
        if claimed.exists():
            return None  # a file of that name is in flight; take the new one after it finishes
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            return None  # another router process claimed it first
        return claimed

    def poll_once(self, stop: threading.Event | None = None) -> list[FileResult]:
        """Ingest every file that is ready now: first any orphaned claims, then the inbox in age order."""
        results: list[FileResult] = []
        orphans = sorted(self._processing.glob(self.settings.pattern)) if self._processing.is_dir() else []
        candidates = [(path, False) for path in orphans] + [(path, True) for path in self._stable_files()]
        for path, needs_claim in candidates:
            if stop is not None and stop.is_set():
                break
            claimed = self._claim(path) if needs_claim else path
            if claimed is None:
                continue
            with _exclusive(claimed) as lock:
                if lock is None or not claimed.exists():
                    continue  # another live process holds it (or finished it meanwhile)
                result = self._ingest(claimed)
                metrics.FILES_INGESTED.labels(route=self.settings.route, outcome=result.outcome).inc()
                results.append(result)
        return results

    def _ingest(self, claimed: Path) -> FileResult:
        settings = self.settings
        progress = FileProgress()
        try:
            publish_file(claimed, self._parsing, self._sink, progress)
        except FileFormatError as error:
            return self._reject(claimed, error)
        except Exception as error:
            # Not archived: the claim goes back to the inbox and the whole file is offered again.
            # Chunks already confirmed carry the same event ids next time, so nothing doubles downstream.
            released = _move(claimed, settings.inbox)
            log.warning(
                "file %s released back to the inbox after %d confirmed chunks: %s",
                claimed.name,
                progress.chunks,
                error,
                extra={"route": settings.route, "file": claimed.name},
            )
            return FileResult(
                claimed.name, FileOutcome.released, progress.records, progress.chunks, str(error), released
            )
        archived = _move(claimed, settings.archive)
        log.info(
            "file %s archived: %d records in %d chunks",
            claimed.name,
            progress.records,
            progress.chunks,
            extra={"route": settings.route, "file": claimed.name, "records": progress.records},
        )
        return FileResult(
            claimed.name, FileOutcome.archived, progress.records, progress.chunks, moved_to=archived
        )

    def _reject(self, claimed: Path, error: FileFormatError) -> FileResult:
        moved = _move(claimed, self.settings.errors)
        moved.with_name(moved.name + ".reason.txt").write_text(f"{error}\n", encoding="utf-8")
        log.error(
            "file %s rejected to %s: %s",
            claimed.name,
            self.settings.errors,
            error,
            extra={"route": self.settings.route, "file": claimed.name},
        )
        if self._on_rejected is not None:
            self._on_rejected(self.settings, moved, error)
        return FileResult(claimed.name, FileOutcome.rejected, detail=str(error), moved_to=moved)

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; a failing poll is logged and retried after the poll interval."""
        for folder in (self.settings.inbox, self.settings.archive, self.settings.errors):
            folder.mkdir(parents=True, exist_ok=True)
        up = metrics.SOURCE_UP.labels(route=self.settings.route)
        while not stop.is_set():
            try:
                self.poll_once(stop)
                up.set(1)
            except Exception:
                up.set(0)
                log.exception("file source of route %s failed a poll", self.settings.route)
            stop.wait(self.settings.poll)

    def close(self) -> None:
        """Nothing to release: every file is closed as soon as it is ingested."""
