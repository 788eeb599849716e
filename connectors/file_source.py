"""File drop source: POS exports and other files dropped into a local folder.

A file is taken once it is complete by the route's ``ready`` signal: ``stable`` (size and mtime
unchanged for ``stable_for``), ``marker`` (its marker file, ``{name}.done``, exists) or ``rename``
(its name matches ``pattern`` at all: writers use another name until done). It is claimed by an
atomic rename into ``<inbox>/.processing`` plus an exclusive lock (so two router processes never
ingest it twice, and a file left behind by a crashed process is picked up again), checked in a first
streaming pass (a file that does not parse goes to ``errors`` with a ``.reason.txt`` beside it,
nothing of it published), then streamed in chunks to the broker. Only when the broker confirmed every
chunk is the file moved to ``archive``. Memory stays flat whatever the file size.

Nothing a writer appends is lost to the archive. ``stable`` only guesses that the writer is done, so
a claimed file is watched after publishing: it is archived once it stood still for another
``stable_for`` (doubled each time it grew, up to :data:`LONGEST_WATCH`), and rows appended meanwhile are
published after the others, in order, as part of the same file. While watched, only complete lines of
a CSV or JSON Lines file are published, so a row the writer is half-way through is never taken
truncated. The file's identity (part of every event id) is the hash of the bytes first published; it
is kept beside the claim, so a restart or a release re-publishes the same events, never new ones. A
file replaced or truncated after part of it was published goes to ``errors`` (reason ``changed``).

Sources never follow a link or leave their folder: entries are listed with lstat, files opened with
O_NOFOLLOW. A symbolic link matching the pattern is moved to ``errors`` as it is (the link, never what
it points to; reason ``link``), and so is a file whose name is not UTF-8 (reason ``file_name``), which
no message could carry.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO

from connectors.chunks import ChunkSink
from connectors.file_ingest import (
    READ_FLAGS,
    FileParsing,
    FileProgress,
    FileRefused,
    Readiness,
    ReadySignal,
    changed_refused,
    file_sha256,
    is_utf8,
    link_refused,
    name_refused,
    printable,
    publish_file,
)
from ops import metrics
from transforms.parsers import FileFormatError

log = logging.getLogger(__name__)

PROCESSING_DIR = ".processing"
LONGEST_WATCH = 600.0
"""Seconds a claimed file that keeps growing is watched at most after it last grew."""
_LINE_FORMATS = frozenset({"csv", "jsonl"})
_TAIL_BLOCK = 1 << 16


@dataclass(frozen=True)
class FileDropSettings:
    """A file route's source settings, resolved to absolute paths and seconds."""

    route: str
    inbox: Path
    archive: Path
    errors: Path
    parsing: FileParsing
    pattern: str = "*"
    stable_for: float = 1.0
    poll: float = 1.0
    ready: Readiness = field(default_factory=Readiness)

    @property
    def watch(self) -> float:
        """Seconds a published file must stand still before it is archived (0: archive at once)."""
        return self.stable_for if self.ready.waits else 0.0


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


@dataclass(frozen=True)
class _Signature:
    """What says a file changed: which file it is (device, inode), its size and its mtime."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> _Signature:
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)

    def appended_to(self, earlier: _Signature) -> bool:
        """Whether this is the same file as ``earlier``, at least as long (so only appended to)."""
        return (self.device, self.inode) == (earlier.device, earlier.inode) and self.size >= earlier.size


@dataclass
class _Claim:
    """A file this process claimed and holds locked until it is archived, rejected or released."""

    path: Path
    handle: IO[bytes]
    seen: _Signature
    progress: FileProgress
    watch: float
    quiet_since: float
    published_to: int = 0
    published_sha256: str = ""
    """Hash of the bytes published so far: a change to them is a rewrite, not an append."""

    @property
    def name(self) -> str:
        return self.path.name


def _free_name(folder: Path, name: str) -> Path:
    """A path in ``folder`` for ``name`` that overwrites nothing (a re-dropped file keeps both)."""
    candidate = folder / name
    if not os.path.lexists(candidate):
        return candidate
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    # The stamp goes before the extension so the file still matches the route's pattern.
    return folder / f"{candidate.stem}.{stamp}{candidate.suffix}"


def _move(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    destination = _free_name(folder, path.name)
    # shutil.move renames when it can, which moves a symbolic link itself, never what it points to.
    shutil.move(str(path), destination)
    return destination


def _sidecar(claimed: Path) -> Path:
    """Where a claim's identity is kept: hidden beside it, so no pattern takes it for a data file."""
    return claimed.with_name(f".{claimed.name}.ingest")


def _complete_lines(handle: IO[bytes], size: int) -> int:
    """The length of the file's first ``size`` bytes up to and including its last newline."""
    end = size
    while end > 0:
        start = max(0, end - _TAIL_BLOCK)
        block = os.pread(handle.fileno(), end - start, start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


class FileDropSource:
    """Polls one route's inbox and publishes every complete file exactly as chunks of raw records."""

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
        self._parsing = settings.parsing
        self._claims: dict[Path, _Claim] = {}

    def _matching(self, folder: Path) -> list[os.DirEntry[str]]:
        """Entries of ``folder`` matching the pattern, hidden ones left out (no link is followed)."""
        try:
            with os.scandir(folder) as entries:
                return [
                    entry
                    for entry in entries
                    if not entry.name.startswith(".")
                    and fnmatch.fnmatchcase(entry.name, self.settings.pattern)
                ]
        except FileNotFoundError:
            return []

    def _ready_files(self) -> tuple[list[Path], list[FileResult]]:
        """Files of the inbox complete by the route's ``ready`` signal, oldest first; links and names
        that are not UTF-8 are refused on the way (moved to errors, unread)."""
        settings = self.settings
        ready = settings.ready
        entries = self._matching(settings.inbox)
        names = set(os.listdir(settings.inbox)) if ready.signal is ReadySignal.marker else set()
        markers = {ready.marker_for(name) for name in names} if names else set()
        now = self._clock()
        refused: list[FileResult] = []
        found: list[tuple[int, str, Path]] = []
        for entry in entries:
            path = Path(entry.path)
            try:
                status = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # claimed by another process between listing and stat
            if stat.S_ISLNK(status.st_mode):
                refused.append(self._reject(path, link_refused(entry.name)))
            elif not is_utf8(entry.name):
                refused.append(self._reject(path, name_refused(entry.name)))
            elif (
                stat.S_ISREG(status.st_mode)
                and entry.name not in markers
                and self._complete(entry, status, names, now)
            ):
                found.append((status.st_mtime_ns, entry.name, path))
        return [path for _, _, path in sorted(found)], refused

    def _complete(self, entry: os.DirEntry[str], status: os.stat_result, names: set[str], now: float) -> bool:
        """Whether a plain file of the inbox is complete by the route's ``ready`` signal."""
        ready = self.settings.ready
        if ready.signal is ReadySignal.marker:
            return ready.marker_for(entry.name) in names
        if ready.signal is ReadySignal.stable:
            return now - status.st_mtime >= self.settings.stable_for
        return True

    def _claim(self, path: Path) -> Path | None:
        self._processing.mkdir(parents=True, exist_ok=True)
        claimed = self._processing / path.name
        if os.path.lexists(claimed):
            return None  # a file of that name is in flight; take the new one after it finishes
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            return None  # another router process claimed it first
        return claimed

    def poll_once(self, stop: threading.Event | None = None) -> list[FileResult]:
        """Ingest every file that is ready now: claims being watched, then orphaned claims, then the inbox."""
        results = self._watch_claims()
        orphans = [
            Path(entry.path)
            for entry in sorted(self._matching(self._processing), key=lambda entry: entry.name)
            if Path(entry.path) not in self._claims
        ]
        ready, refused = self._ready_files()
        results.extend(refused)
        candidates = [(path, False) for path in orphans] + [(path, True) for path in ready]
        for path, needs_claim in candidates:
            if stop is not None and stop.is_set():
                break
            claimed = self._claim(path) if needs_claim else path
            if claimed is None:
                continue
            result = self._take(claimed)
            if result is not None:
                results.append(result)
        for result in results:
            metrics.FILES_INGESTED.labels(route=self.settings.route, outcome=result.outcome).inc()
        return results

    def _take(self, claimed: Path) -> FileResult | None:
        """Lock and publish a claimed file; None when another process holds it or it is still watched."""
        try:
            handle = os.fdopen(os.open(claimed, READ_FLAGS), "rb")
        except FileNotFoundError:
            return None  # another process finished it meanwhile
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            # A link swapped in after the listing: move it aside, still unread.
            return self._reject(claimed, link_refused(claimed.name))
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            status = os.fstat(handle.fileno())
            seen = _Signature.of(status)
            if not stat.S_ISREG(status.st_mode) or seen != _Signature.of(os.lstat(claimed)):
                handle.close()
                return None  # not a plain file, or another process finished it and a new one took its name
        except (BlockingIOError, FileNotFoundError):
            handle.close()
            return None  # another live process holds it
        claim = _Claim(claimed, handle, seen, self._identity(claimed), self.settings.watch, self._clock())
        return self._ingest(claim)

    def _identity(self, claimed: Path) -> FileProgress:
        """The identity a claim was first published under (kept beside it), or a fresh one."""
        try:
            kept = json.loads(_sidecar(claimed).read_text(encoding="utf-8"))
            size, sha256 = int(kept["size"]), str(kept["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return FileProgress()
        if os.lstat(claimed).st_size < size or file_sha256(claimed, size) != sha256:
            return FileProgress()  # another file of the same name: its own identity
        return FileProgress(sha256=sha256, size=size)

    def _ingest(self, claim: _Claim) -> FileResult | None:
        try:
            rejected = self._advance(claim, final=claim.watch == 0)
            while rejected is None and claim.watch == 0:
                current = _Signature.of(os.lstat(claim.path))
                if current == claim.seen:
                    return self._archive(claim)
                rejected = self._grew(claim, current) or self._advance(claim, final=True)
        except Exception as error:
            return self._release(claim, error)
        if rejected is not None:
            return rejected
        self._claims[claim.path] = claim
        return None

    def _advance(self, claim: _Claim, *, final: bool) -> FileResult | None:
        """Publish what the file holds beyond what was published; while it may grow, complete lines only."""
        size = claim.seen.size
        end = (
            size
            if final or self._parsing.format not in _LINE_FORMATS
            else _complete_lines(claim.handle, size)
        )
        if end <= claim.published_to and not (final and size == 0):
            return None
        progress = claim.progress
        if not progress.sha256:
            progress.sha256, progress.size = file_sha256(claim.path, end), end
            self._keep_identity(claim)
        try:
            publish_file(claim.path, self._parsing, self._sink, progress, size=end)
        except FileFormatError as error:
            return self._reject(claim.path, error, claim)
        claim.published_to = end
        claim.published_sha256 = progress.sha256 if end == progress.size else file_sha256(claim.path, end)
        return None

    def _keep_identity(self, claim: _Claim) -> None:
        sidecar = _sidecar(claim.path)
        staged = sidecar.with_name(sidecar.name + ".tmp")
        staged.write_text(json.dumps({"size": claim.progress.size, "sha256": claim.progress.sha256}), "utf-8")
        os.replace(staged, sidecar)

    def _grew(self, claim: _Claim, current: _Signature) -> FileResult | None:
        """Note that a claimed file changed; a change other than an append rejects it."""
        rewritten = claim.published_to > 0 and (
            file_sha256(claim.path, claim.published_to) != claim.published_sha256
        )
        if not current.appended_to(claim.seen) or rewritten:
            return self._changed(
                claim,
                f"it was replaced, truncated or rewritten ({claim.seen.size} -> {current.size} bytes)",
            )
        log.warning(
            "file %s grew after it was taken (%d -> %d bytes); publishing what was appended",
            printable(claim.name),
            claim.seen.size,
            current.size,
            extra={"route": self.settings.route, "file": printable(claim.name)},
        )
        claim.seen = current
        return None

    def _watch_claims(self) -> list[FileResult]:
        """Archive the published claims that stood still long enough; publish what was appended to others."""
        results: list[FileResult] = []
        for claim in list(self._claims.values()):
            try:
                current = _Signature.of(os.lstat(claim.path))
            except FileNotFoundError:
                log.error(
                    "file %s vanished from %s while it was watched; %d records of it were published",
                    printable(claim.name),
                    self._processing,
                    claim.progress.published,
                    extra={"route": self.settings.route, "file": printable(claim.name)},
                )
                self._forget(claim)
                continue
            now = self._clock()
            if current != claim.seen:
                rejected = self._grew(claim, current)
                if rejected is not None:
                    results.append(rejected)
                    continue
                claim.quiet_since = now
                # A writer that paused longer than the window once may do so again: give it longer.
                claim.watch = min(claim.watch * 2, LONGEST_WATCH)
            settled = now - claim.quiet_since >= claim.watch
            try:
                rejected = self._advance(claim, final=settled)
            except Exception as error:
                log.warning(
                    "file %s: publishing what was appended failed, retrying next poll: %s",
                    printable(claim.name),
                    error,
                    extra={"route": self.settings.route, "file": printable(claim.name)},
                )
                continue
            if rejected is not None:
                results.append(rejected)
            elif settled:
                results.append(self._archive(claim))
        return results

    def _forget(self, claim: _Claim, *, identity: bool = True) -> None:
        self._claims.pop(claim.path, None)
        claim.handle.close()
        if identity:
            _sidecar(claim.path).unlink(missing_ok=True)

    def _move_marker(self, name: str, folder: Path) -> None:
        """Move a data file's marker along with it (archive or errors), when the route uses markers."""
        if self.settings.ready.signal is ReadySignal.marker:
            marker = self.settings.inbox / self.settings.ready.marker_for(name)
            with contextlib.suppress(FileNotFoundError):
                _move(marker, folder)

    def _archive(self, claim: _Claim) -> FileResult:
        settings = self.settings
        progress = claim.progress
        archived = _move(claim.path, settings.archive)
        self._forget(claim)
        self._move_marker(claim.name, settings.archive)
        log.info(
            "file %s archived: %d records in %d chunks",
            printable(claim.name),
            progress.published,
            progress.chunks,
            extra={"route": settings.route, "file": printable(claim.name), "records": progress.published},
        )
        return FileResult(
            claim.name, FileOutcome.archived, progress.published, progress.chunks, moved_to=archived
        )

    def _release(self, claim: _Claim, error: Exception) -> FileResult:
        """Not archived: the claim goes back to the inbox and the whole file is offered again.

        Its identity stays beside the claim, so chunks already confirmed carry the same event ids next
        time and nothing doubles downstream.
        """
        progress = claim.progress
        released = _move(claim.path, self.settings.inbox)
        self._forget(claim, identity=False)
        log.warning(
            "file %s released back to the inbox after %d confirmed chunks: %s",
            printable(claim.name),
            progress.chunks,
            error,
            extra={"route": self.settings.route, "file": printable(claim.name)},
        )
        return FileResult(
            claim.name, FileOutcome.released, progress.published, progress.chunks, str(error), released
        )

    def _changed(self, claim: _Claim, what: str) -> FileResult:
        error = changed_refused(printable(claim.name), claim.progress.published, what)
        return self._reject(claim.path, error, claim)

    def _reject(self, path: Path, error: FileFormatError, claim: _Claim | None = None) -> FileResult:
        if claim is not None:
            self._forget(claim)
            if claim.progress.published and not isinstance(error, FileRefused):
                error = FileFormatError(
                    error.name,
                    error.line,
                    error.column,
                    f"{error.reason} (it changed after it was taken: records 1-{claim.progress.published} "
                    "were published before)",
                )
        moved = _move(path, self.settings.errors)
        self._move_marker(path.name, self.settings.errors)
        moved.with_name(moved.name + ".reason.txt").write_text(f"{error}\n", encoding="utf-8")
        log.error(
            "file %s rejected to %s: %s",
            printable(path.name),
            self.settings.errors,
            error,
            extra={"route": self.settings.route, "file": printable(path.name)},
        )
        if self._on_rejected is not None:
            self._on_rejected(self.settings, moved, error)
        return FileResult(path.name, FileOutcome.rejected, detail=str(error), moved_to=moved)

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; a failing poll is logged and retried after the poll interval."""
        for folder in (self.settings.inbox, self.settings.archive, self.settings.errors):
            folder.mkdir(parents=True, exist_ok=True)
        up = metrics.SOURCE_UP.labels(route=self.settings.route)
        try:
            while not stop.is_set():
                try:
                    self.poll_once(stop)
                    up.set(1)
                except Exception:
                    up.set(0)
                    log.exception("file source of route %s failed a poll", self.settings.route)
                stop.wait(self.settings.poll)
        finally:
            self.close()

    def close(self) -> None:
        """Let go of the claims still watched: they stay in .processing, where the next start takes them."""
        for claim in list(self._claims.values()):
            self._forget(claim, identity=False)
