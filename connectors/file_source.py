"""File drop source: POS exports and other files dropped into a local folder.

The claim → publish → settle sequence is :mod:`connectors.drop_source`'s; this module supplies the
local folder's operations: listing, claiming with a rename and a lock, watching a growing file, moving
(what a claimed file is and how it may grow is :mod:`connectors.file_claim`).

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
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from connectors.chunks import ChunkSink
from connectors.drop_source import (
    DropSource,
    IngestOutcome,
    IngestResult,
    Listed,
    RefusedUnread,
    sort_listing,
)
from connectors.file_claim import FileClaim, Signature, kept_identity
from connectors.file_ingest import (
    READ_FLAGS,
    FileParsing,
    FileRefused,
    Readiness,
    ReadySignal,
    link_refused,
    printable,
)
from transforms.parsers import FileFormatError

log = logging.getLogger(__name__)

PROCESSING_DIR = ".processing"
LONGEST_WATCH = 600.0
"""Seconds a claimed file that keeps growing is watched at most after it last grew."""


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


class FileDropSource(DropSource[FileDropSettings, Path, FileClaim, Path]):
    """Polls one route's inbox and publishes every complete file exactly as chunks of raw records."""

    def __init__(
        self,
        settings: FileDropSettings,
        sink: ChunkSink,
        *,
        on_rejected: Callable[[FileDropSettings, Path, FileFormatError], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(settings, sink, on_rejected=on_rejected, clock=clock)
        self._processing = settings.inbox / PROCESSING_DIR
        self._parsing = settings.parsing
        self._claims: dict[Path, FileClaim] = {}

    def _origin(self) -> str:
        return str(self.settings.inbox)

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

    def _ready_files(self) -> tuple[list[Path], list[tuple[Path, FileRefused]]]:
        """Files of the inbox complete by the route's ``ready`` signal, oldest first; and the links and
        names that are not UTF-8, to refuse unread."""
        settings = self.settings
        entries = self._matching(settings.inbox)
        names = set(os.listdir(settings.inbox)) if settings.ready.signal is ReadySignal.marker else set()
        now = self._clock()
        listing: list[Listed[Path]] = []
        for entry in entries:
            try:
                status = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # claimed by another process between listing and stat
            listing.append(Listed(Path(entry.path), entry.name, status.st_mode, status.st_mtime_ns))
        return sort_listing(
            listing, names, settings.ready, lambda entry: now - entry.mtime / 1e9 >= settings.stable_for
        )

    def _poll(self, stop: threading.Event | None) -> list[IngestResult[Path]]:
        """Claims being watched, then orphaned claims (left by a stopped process), then the inbox."""
        results = self._watch_claims()
        orphans = [
            Path(entry.path)
            for entry in sorted(self._matching(self._processing), key=lambda entry: entry.name)
            if Path(entry.path) not in self._claims
        ]
        ready, refused = self._ready_files()
        results.extend(self._refuse(path, refusal) for path, refusal in refused)
        self._take_each(orphans + ready, stop, results)
        return results

    def _rename_into_processing(self, path: Path) -> Path | None:
        self._processing.mkdir(parents=True, exist_ok=True)
        claimed = self._processing / path.name
        if os.path.lexists(claimed):
            return None  # a file of that name is in flight; take the new one after it finishes
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            return None  # another router process claimed it first
        return claimed

    def _claim(self, candidate: Path) -> FileClaim | None:
        """Rename an inbox file into .processing (an orphan is there already) and lock it; None when
        another process holds it."""
        orphan = candidate.parent == self._processing
        claimed = candidate if orphan else self._rename_into_processing(candidate)
        if claimed is None:
            return None
        try:
            handle = os.fdopen(os.open(claimed, READ_FLAGS), "rb")
        except FileNotFoundError:
            return None  # another process finished it meanwhile
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            # A link swapped in after the listing: move it aside, still unread.
            raise RefusedUnread(claimed, link_refused(claimed.name)) from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            status = os.fstat(handle.fileno())
            seen = Signature.of(status)
            if not stat.S_ISREG(status.st_mode) or seen != Signature.of(os.lstat(claimed)):
                handle.close()
                return None  # not a plain file, or another process finished it and a new one took its name
        except (BlockingIOError, FileNotFoundError):
            handle.close()
            return None  # another live process holds it
        return FileClaim(claimed, handle, seen, kept_identity(claimed), self.settings.watch, self._clock())

    def _publish(self, claim: FileClaim) -> bool:
        """Publish the claim; with ``stable`` it stays claimed and watched (False) until it stood still."""
        claim.advance(self._parsing, self._sink, final=claim.watch == 0)
        if claim.watch:
            self._claims[claim.path] = claim
            return False
        while (current := Signature.of(os.lstat(claim.path))) != claim.seen:
            claim.grew(current, self.settings.route)
            claim.advance(self._parsing, self._sink, final=True)
        return True

    def _watch_claims(self) -> list[IngestResult[Path]]:
        """Archive the published claims that stood still long enough; publish what was appended to others."""
        results: list[IngestResult[Path]] = []
        for claim in list(self._claims.values()):
            try:
                current = Signature.of(os.lstat(claim.path))
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
            try:
                if current != claim.seen:
                    claim.grew(current, self.settings.route)
                    claim.quiet_since = now
                    # A writer that paused longer than the window once may do so again: give it longer.
                    claim.watch = min(claim.watch * 2, LONGEST_WATCH)
                settled = now - claim.quiet_since >= claim.watch
                claim.advance(self._parsing, self._sink, final=settled)
            except FileFormatError as error:
                results.append(self._reject(claim, error))
                continue
            except Exception as error:
                log.warning(
                    "file %s: publishing what was appended failed, retrying next poll: %s",
                    printable(claim.name),
                    error,
                    extra={"route": self.settings.route, "file": printable(claim.name)},
                )
                continue
            if settled:
                results.append(self._settle(claim))
        return results

    def _forget(self, claim: FileClaim, *, identity: bool = True) -> None:
        self._claims.pop(claim.path, None)
        claim.handle.close()
        if identity:
            claim.drop_identity()

    def _move_marker(self, name: str, folder: Path) -> None:
        """Move a data file's marker along with it (archive or errors), when the route uses markers."""
        if self.settings.ready.signal is ReadySignal.marker:
            marker = self.settings.inbox / self.settings.ready.marker_for(name)
            with contextlib.suppress(FileNotFoundError):
                _move(marker, folder)

    def _finish(self, claim: FileClaim) -> tuple[IngestOutcome, Path]:
        archived = _move(claim.path, self.settings.archive)
        self._forget(claim)
        self._move_marker(claim.name, self.settings.archive)
        return IngestOutcome.archived, archived

    def _return(self, claim: FileClaim) -> Path:
        """Back to the inbox; the claim's identity stays beside where it was claimed."""
        released = _move(claim.path, self.settings.inbox)
        self._forget(claim, identity=False)
        return released

    def _let_go(self, claim: FileClaim) -> Path:
        self._forget(claim)
        return claim.path

    def _to_errors(self, place: Path, error: FileFormatError) -> Path:
        moved = _move(place, self.settings.errors)
        self._move_marker(place.name, self.settings.errors)
        moved.with_name(moved.name + ".reason.txt").write_text(f"{error}\n", encoding="utf-8")
        return moved

    def _prepare(self) -> None:
        for folder in (self.settings.inbox, self.settings.archive, self.settings.errors):
            folder.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Let go of the claims still watched: they stay in .processing, where the next start takes them."""
        for claim in list(self._claims.values()):
            self._forget(claim, identity=False)
