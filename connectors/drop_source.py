"""The claim/ingest protocol the file and SFTP sources share: ready → claim → publish → settle.

A drop source lists the files complete by its route's ``ready`` signal and claims each by an atomic
rename (two routers never take the same file), publishes its records, then settles it: archived (or
deleted) once the broker confirmed every chunk, rejected to the errors folder with its reason beside
it when it cannot be published, released for a later poll when publishing failed. This module is that
sequence, which listed files are ready (:func:`sort_listing`), its outcomes, logs, metrics and poll
loop; each source supplies only its filesystem operations (:mod:`connectors.file_source` a local
folder, :mod:`connectors.sftp_source` a folder on an SFTP server).
"""

from __future__ import annotations

import logging
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from connectors.chunks import ChunkSink
from connectors.file_ingest import (
    FileProgress,
    FileRefused,
    Readiness,
    ReadySignal,
    is_utf8,
    link_refused,
    name_refused,
    printable,
)
from ops import metrics
from transforms.parsers import FileFormatError


class IngestOutcome(StrEnum):
    """What became of one dropped file (the ``outcome`` label of ``router_files_ingested_total``)."""

    archived = "archived"
    deleted = "deleted"
    rejected = "rejected"
    released = "released"


Place = TypeVar("Place", Path, str)
"""Where a file lies: a local path, or a path on the SFTP server."""


@dataclass(frozen=True)
class IngestResult(Generic[Place]):
    """What happened to one dropped file; ``moved_to`` is where it lies afterwards (None once deleted)."""

    name: str
    outcome: IngestOutcome
    records: int = 0
    chunks: int = 0
    detail: str = ""
    moved_to: Place | None = None


@dataclass(frozen=True)
class Listed(Generic[Place]):
    """One entry of a drop folder as listed with lstat (a link is never followed)."""

    place: Place
    name: str
    mode: int
    mtime: int | float
    """Orders the ready files, oldest first."""


def sort_listing(
    listing: Iterable[Listed[Place]],
    names: set[str],
    ready: Readiness,
    stood_still: Callable[[Listed[Place]], bool],
) -> tuple[list[Place], list[tuple[Place, FileRefused]]]:
    """The plain files of a listing complete by the route's ``ready`` signal, oldest first; and the
    links and names that are not UTF-8, to refuse unread.

    ``listing`` holds the entries matching the route's pattern, ``names`` every name in the folder (where
    markers are looked for); ``stood_still`` says whether a file is complete by ``stable``.
    """
    marker = ready.signal is ReadySignal.marker
    markers = {ready.marker_for(name) for name in names} if marker else set()

    def complete(entry: Listed[Place]) -> bool:
        if marker:
            return ready.marker_for(entry.name) in names
        return ready.signal is ReadySignal.rename or stood_still(entry)

    refused: list[tuple[Place, FileRefused]] = []
    found: list[Listed[Place]] = []
    for entry in listing:
        if stat.S_ISLNK(entry.mode):
            refused.append((entry.place, link_refused(entry.name)))
        elif not is_utf8(entry.name):
            refused.append((entry.place, name_refused(entry.name)))
        elif stat.S_ISREG(entry.mode) and entry.name not in markers and complete(entry):
            found.append(entry)
    return [entry.place for entry in sorted(found, key=lambda entry: (entry.mtime, entry.name))], refused


class Claim(Protocol):
    """A file a source claimed: its name as the upstream spelled it, and how far publishing got."""

    @property
    def name(self) -> str: ...
    @property
    def progress(self) -> FileProgress: ...


class DropSettings(Protocol):
    """What the shared driver reads of a source's settings."""

    @property
    def route(self) -> str: ...
    @property
    def poll(self) -> float: ...


Settings = TypeVar("Settings", bound=DropSettings)
Candidate = TypeVar("Candidate")
ClaimT = TypeVar("ClaimT", bound=Claim)


RejectionHook = Callable[[Settings, Place, FileFormatError], None]
"""Called with a source's settings, where a rejected file now lies and why: it records a dead letter."""


class RefusedUnread(Exception, Generic[Place]):
    """A claimed entry turned out not to be a readable file (a link swapped in): moved aside unread."""

    def __init__(self, place: Place, refusal: FileRefused) -> None:
        super().__init__(str(refusal))
        self.place: Place = place
        self.refusal = refusal


class DropSource(ABC, Generic[Settings, Candidate, ClaimT, Place]):
    """Polls one route's drop folder and settles every complete file: the shared driver.

    ``on_rejected`` is called with the settings, where the rejected file now lies and why; it records
    the dead letter.
    """

    def __init__(
        self,
        settings: Settings,
        sink: ChunkSink,
        *,
        on_rejected: RejectionHook[Settings, Place] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._sink = sink
        self._on_rejected: RejectionHook[Settings, Place] | None = on_rejected
        self._clock = clock
        self._log = logging.getLogger(type(self).__module__)

    # What each source supplies: its filesystem operations.

    @abstractmethod
    def _poll(self, stop: threading.Event | None) -> list[IngestResult[Place]]:
        """One poll: list what is ready and settle it (with :meth:`_take_each`)."""

    @abstractmethod
    def _claim(self, candidate: Candidate) -> ClaimT | None:
        """Take a ready file; None when another router has it. Raises :class:`RefusedUnread`."""

    @abstractmethod
    def _publish(self, claim: ClaimT) -> bool:
        """Publish the claim's records; False when it stays claimed (watched) for a later poll."""

    @abstractmethod
    def _finish(self, claim: ClaimT) -> tuple[IngestOutcome, Place | None]:
        """Archive or delete a claim whose every chunk the broker confirmed."""

    @abstractmethod
    def _return(self, claim: ClaimT) -> Place:
        """Put a claim back where ready files are listed, so a later poll offers it again."""

    @abstractmethod
    def _let_go(self, claim: ClaimT) -> Place:
        """Forget a claim that is being rejected; returns where it lies."""

    @abstractmethod
    def _to_errors(self, place: Place, error: FileFormatError) -> Place:
        """Move the file at ``place`` (and its marker) to the errors folder, its reason beside it."""

    @abstractmethod
    def _origin(self) -> str:
        """Where the files come from, as logs name it (a folder, an SFTP server)."""

    # The shared sequence.

    @property
    def next_poll_in(self) -> float:
        """Seconds until the next poll."""
        return self.settings.poll

    @property
    def healthy(self) -> bool:
        """Whether the last poll reached the files (``router_source_up``)."""
        return True

    def poll_once(self, stop: threading.Event | None = None) -> list[IngestResult[Place]]:
        """Settle every file that is ready now; counts each outcome."""
        results = self._poll(stop)
        for result in results:
            metrics.FILES_INGESTED.labels(route=self.settings.route, outcome=result.outcome).inc()
        return results

    def _take_each(
        self,
        candidates: Iterable[Candidate],
        stop: threading.Event | None,
        results: list[IngestResult[Place]],
    ) -> None:
        """Claim, publish and settle each candidate in turn, until ``stop`` is set."""
        for candidate in candidates:
            if stop is not None and stop.is_set():
                break
            result = self._take(candidate)
            if result is not None:
                results.append(result)

    def _take(self, candidate: Candidate) -> IngestResult[Place] | None:
        try:
            claim = self._claim(candidate)
        except RefusedUnread as refused:
            return self._refuse(refused.place, refused.refusal)
        if claim is None:
            return None
        try:
            done = self._publish(claim)
        except FileFormatError as error:
            return self._reject(claim, error)
        except Exception as error:
            return self._release(claim, error)
        return self._settle(claim) if done else None

    def _settle(self, claim: ClaimT) -> IngestResult[Place]:
        """Archive or delete a claim whose every chunk the broker confirmed."""
        outcome, moved = self._finish(claim)
        progress, name = claim.progress, printable(claim.name)
        self._log.info(
            "route %s: file %s from %s %s: %d records in %d chunks",
            self.settings.route, name, self._origin(), outcome.value, progress.published, progress.chunks,
            extra={"route": self.settings.route, "file": name, "records": progress.published},
        )
        return IngestResult(claim.name, outcome, progress.published, progress.chunks, moved_to=moved)

    def _release(self, claim: ClaimT, error: Exception) -> IngestResult[Place]:
        """Not every chunk was confirmed: the claim goes back and the whole file is offered again.

        Its identity is kept, so chunks already confirmed carry the same event ids next time and nothing
        doubles downstream.
        """
        progress = claim.progress
        self._log.warning(
            "route %s: file %s released back to %s after %d confirmed chunks: %s",
            self.settings.route, printable(claim.name), self._origin(), progress.chunks,
            str(error) or type(error).__name__,
            extra={"route": self.settings.route, "file": printable(claim.name)},
        )
        moved = self._return(claim)
        return IngestResult(
            claim.name, IngestOutcome.released, progress.published, progress.chunks, str(error), moved
        )

    def _reject(self, claim: ClaimT, error: FileFormatError) -> IngestResult[Place]:
        """A claimed file that cannot be published goes to errors; the dead letter says what was not."""
        published = claim.progress.published
        if published and not isinstance(error, FileRefused):
            error = FileFormatError(
                error.name,
                error.line,
                error.column,
                f"{error.reason} (it changed after it was taken: records 1-{published} were published "
                "before)",
            )
        return self._refuse(self._let_go(claim), error, claim.name)

    def _refuse(self, place: Place, error: FileFormatError, name: str | None = None) -> IngestResult[Place]:
        """Move the file at ``place`` to errors with its reason and report it (a dead letter)."""
        name = name if name is not None else Path(place).name
        moved = self._to_errors(place, error)
        self._log.error(
            "route %s: file %s from %s rejected to %s: %s",
            self.settings.route, printable(name), self._origin(), printable(str(moved)), error,
            extra={"route": self.settings.route, "file": printable(name)},
        )
        if self._on_rejected is not None:
            self._on_rejected(self.settings, moved, error)
        return IngestResult(name, IngestOutcome.rejected, detail=str(error), moved_to=moved)

    def _prepare(self) -> None:
        """Ready what the source needs before its first poll (nothing unless a source says otherwise)."""

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; a failing poll is logged and retried after :attr:`next_poll_in`."""
        self._prepare()
        up = metrics.SOURCE_UP.labels(route=self.settings.route)
        try:
            while not stop.is_set():
                try:
                    self.poll_once(stop)
                    up.set(1 if self.healthy else 0)
                except Exception:
                    up.set(0)
                    self._log.exception("route %s: the source failed a poll", self.settings.route)
                stop.wait(self.next_poll_in)
        finally:
            self.close()

    @abstractmethod
    def close(self) -> None:
        """Let go of what the source holds (claims being watched, the server connection)."""
