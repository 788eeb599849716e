"""SFTP source: suppliers drop ASN and receipt files on an SFTP server and the router takes them from there.

A remote file is taken once it is complete by the route's ``ready`` signal: ``stable`` (size and mtime
the same for ``stable_for`` across polls), ``marker`` (its marker file, ``{name}.done``, is listed) or
``rename`` (its name matches ``pattern`` at all). It is claimed by an atomic rename into
``<remote_dir>/.processing`` (two routers never ingest it twice), downloaded streamed to a local
staging file (byte count checked against the server's), published with
:func:`connectors.file_ingest.publish_file`, and moved to ``archive`` (or deleted, with its marker)
only after the broker confirmed every chunk. Bytes appended to the claim while it was published are
downloaded again and their records published after the others, under the same file identity, before
the file is moved on. A file that does not parse goes to ``errors`` with a ``.reason.txt`` beside it;
a broken transfer or an unconfirmed publish renames the claim back so a later poll takes it again.

Links are never followed: the listing is lstat (OpenSSH reads directories with lstat), a symbolic
link matching the pattern is renamed into ``errors`` as it is, unread, and a claim is checked with
lstat before it is opened. A name that is not UTF-8 goes to ``errors`` too: no message can carry it.

Claim lease: the claimed file's mtime on the server is its lease. The claimer stamps it with its own
clock just before the rename and re-stamps it every quarter of ``claim_ttl`` while it downloads and
publishes. A router that finds a claim not renewed for ``claim_ttl`` takes its owner for dead (crashed
or cut off) and renames the file back into ``remote_dir``, where it is claimed like a new file. This
keeps all claim state on the server, so no router needs to know the others; routers sharing a folder
need clocks that agree to well within ``claim_ttl``, and an owner stalled longer than that may see its
file ingested again, which only republishes chunks with the same event ids.
"""

from __future__ import annotations

import fnmatch
import logging
import posixpath
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path, PurePosixPath

import paramiko
from paramiko.sftp import CMD_CLOSE, CMD_HANDLE, CMD_NAME, CMD_OPENDIR, CMD_READDIR, SFTPError

from connectors.chunks import ChunkSink, SourceChunk
from connectors.file_ingest import (
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
from connectors.file_source import PROCESSING_DIR
from connectors.sftp_session import SERVER_ERRORS, SftpEndpoint, SftpSession, describe, is_refusal
from ops import metrics
from transforms.parsers import FileFormatError

log = logging.getLogger(__name__)
# Bytes requested ahead while downloading: bounds the memory a download holds, yet hides the latency.
DOWNLOAD_WINDOW = 4 << 20
READ_REQUEST = 32 << 10


@dataclass(frozen=True)
class SftpSettings:
    """An sftp route's source settings: the server and login, remote folders, timings in seconds.

    Built from the route's validated configuration (router.assembly), which `router validate` checked:
    exactly one of ``archive`` and ``delete``, folders apart from ``remote_dir``, positive timings.
    """

    route: str
    endpoint: SftpEndpoint
    remote_dir: str
    parsing: FileParsing
    pattern: str = "*"
    archive: str | None = None
    delete: bool = False
    errors: str | None = None
    poll: float = 5.0
    stable_for: float = 2.0
    claim_ttl: float = 600.0
    reconnect_max: float = 60.0
    ready: Readiness = field(default_factory=Readiness)

    @property
    def address(self) -> str:
        """``host:port`` of the server, as logs and errors name it."""
        return self.endpoint.address

    @property
    def processing_dir(self) -> str:
        """The remote folder claimed files are renamed into while a router ingests them."""
        return posixpath.join(self.remote_dir, PROCESSING_DIR)

    @property
    def errors_dir(self) -> str:
        """The remote folder files that do not parse are moved to (default ``<remote_dir>/errors``)."""
        return self.errors or posixpath.join(self.remote_dir, "errors")


class SftpOutcome(StrEnum):
    archived = "archived"
    deleted = "deleted"
    rejected = "rejected"
    released = "released"


@dataclass(frozen=True)
class SftpResult:
    """What happened to one remote file; ``moved_to`` is its remote path afterwards (None once deleted)."""

    name: str
    outcome: SftpOutcome
    records: int = 0
    chunks: int = 0
    detail: str = ""
    moved_to: str | None = None


SftpRejectionHook = Callable[[SftpSettings, str, FileFormatError], None]
"""Called with the settings, the remote path in ``errors`` and the parse error; records a dead letter."""


class TransferIncomplete(OSError):
    """A download did not yield exactly the bytes the server reported for the file."""


class _ClaimLease:
    """Keeps a claim alive by re-stamping the claimed file's mtime on the server as work goes on."""

    def __init__(
        self,
        sftp: paramiko.SFTPClient,
        claim: str,
        stamped: float,
        settings: SftpSettings,
        clock: Callable[[], float],
    ) -> None:
        self._sftp = sftp
        self._claim = claim
        self._renewed = stamped
        self._every = settings.claim_ttl / 4
        self._clock = clock

    def renew_if_due(self) -> None:
        """Re-stamp the lease when a quarter of claim_ttl passed since the last stamp."""
        now = self._clock()
        if now - self._renewed >= self._every:
            self._sftp.utime(self._claim, (int(now), int(now)))
            self._renewed = now

    def renewing(self, sink: ChunkSink) -> ChunkSink:
        """``sink``, renewing the lease after each confirmed chunk (publishing a big file takes a while)."""

        def publish(chunk: SourceChunk) -> None:
            sink(chunk)
            self.renew_if_due()

        return publish


@dataclass(frozen=True)
class _Sighting:
    signature: tuple[int | None, int | None]
    since: float


@dataclass
class _Unsettled:
    progress: FileProgress = field(default_factory=FileProgress)
    confirmed: bool = False
    size: int = 0
    """Bytes of the claim whose records the broker confirmed."""


def _stamped(name: str) -> str:
    """``name`` with a UTC timestamp before its extension, so it still matches the route's pattern."""
    path = PurePosixPath(name)
    return f"{path.stem}.{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}{path.suffix}"


def _wire(path: str) -> bytes:
    """A path as the server spells it: a name listed with bytes that are not UTF-8 keeps them."""
    return path.encode("utf-8", "surrogateescape")


def _listdir(sftp: paramiko.SFTPClient, folder: str) -> list[paramiko.SFTPAttributes]:
    """The entries of ``folder`` with lstat attributes, like ``listdir_attr``, but a name that is not
    UTF-8 comes back with its bytes as surrogate escapes instead of failing the whole listing (which
    would stop every file of the route behind one badly named file)."""
    # paramiko's listdir_attr decodes names strictly and has no bytes variant, so this is its loop
    # (the same requests and attribute parsing) with a lenient decode.
    kind, message = sftp._request(CMD_OPENDIR, _wire(folder))
    if kind != CMD_HANDLE:
        raise SFTPError(f"listing {folder}: expected a handle from the server")
    handle = message.get_binary()
    entries: list[paramiko.SFTPAttributes] = []
    try:
        while True:
            try:
                kind, message = sftp._request(CMD_READDIR, handle)
            except EOFError:
                return entries
            if kind != CMD_NAME:
                raise SFTPError(f"listing {folder}: expected names from the server")
            for _ in range(message.get_int()):
                name = message.get_string().decode("utf-8", "surrogateescape")
                long_name = message.get_string().decode("utf-8", "replace")
                attributes = paramiko.SFTPAttributes._from_msg(message, name, long_name)
                if name not in (".", ".."):
                    entries.append(attributes)
    finally:
        sftp._request(CMD_CLOSE, handle)


def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.lstat(_wire(path))
    except FileNotFoundError:
        return False
    return True


def _ensure_dir(sftp: paramiko.SFTPClient, folder: str) -> None:
    """Create ``folder`` and its missing parents on the server (``mkdir -p``)."""
    if _exists(sftp, folder):
        return
    parent = posixpath.dirname(folder.rstrip("/"))
    if parent and parent != folder:
        _ensure_dir(sftp, parent)
    try:
        sftp.mkdir(folder)
    except OSError:
        sftp.stat(folder)  # another router created it meanwhile; raises when it really could not be made


def _move(sftp: paramiko.SFTPClient, source: str, folder: str, name: str) -> str:
    """Rename ``source`` into ``folder`` as ``name`` without overwriting anything; returns the new path."""
    _ensure_dir(sftp, folder)
    target = posixpath.join(folder, name)
    if _exists(sftp, target):
        target = posixpath.join(folder, _stamped(name))
    sftp.rename(_wire(source), _wire(target))
    return target


class SftpSource:
    """Polls one route's remote folder and publishes every stable file exactly once as chunks of records."""

    def __init__(
        self,
        settings: SftpSettings,
        sink: ChunkSink,
        *,
        on_rejected: SftpRejectionHook | None = None,
        clock: Callable[[], float] = time.time,
        staging_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self._sink = sink
        self._on_rejected = on_rejected
        self._clock = clock
        self._staging_dir = staging_dir
        if staging_dir is not None:
            staging_dir.mkdir(parents=True, exist_ok=True)
        self._parsing = settings.parsing
        self._connection = SftpSession(settings.endpoint)
        self._failures = 0
        self._sightings: dict[str, _Sighting] = {}
        # Claims this router holds but has not yet moved on: one a lost connection cut off is settled
        # first after reconnecting (finished when every chunk was confirmed, released otherwise).
        self._unsettled: dict[str, _Unsettled] = {}

    @property
    def next_poll_in(self) -> float:
        """Seconds until the next poll: the poll interval, or a doubling backoff while the server fails."""
        if self._failures == 0:
            return self.settings.poll
        ceiling = max(self.settings.reconnect_max, self.settings.poll)
        return min(ceiling, self.settings.poll * 2 ** (self._failures - 1))

    def poll_once(self, stop: threading.Event | None = None) -> list[SftpResult]:
        """Ingest every remote file that is ready now; a server problem is logged and ends the poll early."""
        results: list[SftpResult] = []
        sftp = self._session()
        if sftp is None:
            return results
        try:
            results.extend(self._settle_unsettled(sftp))
            self._return_expired_claims(sftp)
            ready, refused = self._ready_names(sftp)
            for name, refusal in refused:
                source = posixpath.join(self.settings.remote_dir, name)
                results.append(self._reject(sftp, source, name, refusal))
            if ready:
                _ensure_dir(sftp, self.settings.processing_dir)
            for name in ready:
                if stop is not None and stop.is_set():
                    break
                result = self._take(sftp, name)
                if result is not None:
                    results.append(result)
        except SERVER_ERRORS as error:
            self._failures += 1
            log.warning(
                "route %s: SFTP poll of %s on %s failed after %d files: %s; reconnecting in %.1fs",
                self.settings.route, self.settings.remote_dir, self.settings.address, len(results),
                describe(error), self.next_poll_in,
                extra={"route": self.settings.route},
            )
            self._connection.close()
        else:
            self._failures = 0
        for result in results:
            metrics.FILES_INGESTED.labels(route=self.settings.route, outcome=result.outcome).inc()
        return results

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; server trouble never ends it, it reconnects with capped backoff."""
        up = metrics.SOURCE_UP.labels(route=self.settings.route)
        try:
            while not stop.is_set():
                try:
                    self.poll_once(stop)
                    up.set(0 if self._failures else 1)
                except Exception:
                    up.set(0)
                    log.exception("route %s: SFTP source failed a poll", self.settings.route)
                stop.wait(self.next_poll_in)
        finally:
            self.close()

    def close(self) -> None:
        """Close the SFTP session and its SSH connection."""
        self._connection.close()

    def _session(self) -> paramiko.SFTPClient | None:
        """The open SFTP session, connecting when there is none; None (logged) when that fails."""
        sftp = self._connection.session()
        if sftp is not None:
            return sftp
        settings = self.settings
        try:
            sftp = self._connection.connect()
        except SERVER_ERRORS as error:
            self._failures += 1
            log.log(
                logging.ERROR if is_refusal(error) else logging.WARNING,
                "route %s: cannot connect to SFTP server %s (attempt %d): %s; next attempt in %.1fs",
                settings.route, settings.address, self._failures, describe(error),
                self.next_poll_in,
                extra={"route": settings.route},
            )
            return None
        if self._failures:
            log.info("route %s: reconnected to SFTP server %s after %d failed attempts",
                     settings.route, settings.address, self._failures, extra={"route": settings.route})
        else:
            log.info("route %s: connected to SFTP server %s as %s",
                     settings.route, settings.address, settings.endpoint.username,
                     extra={"route": settings.route})
        return sftp

    def _named(self, name: str) -> bool:
        return not name.startswith(".") and fnmatch.fnmatchcase(name, self.settings.pattern)

    def _matches(self, entry: paramiko.SFTPAttributes) -> bool:
        return self._named(entry.filename) and stat.S_ISREG(entry.st_mode or 0)

    def _ready_names(self, sftp: paramiko.SFTPClient) -> tuple[list[str], list[tuple[str, FileRefused]]]:
        """Names of complete files by the route's ``ready`` signal, oldest first; and the entries to
        refuse unread (links, names that are not UTF-8)."""
        ready = self.settings.ready
        now = self._clock()
        entries = _listdir(sftp, self.settings.remote_dir)
        names = {entry.filename for entry in entries}
        markers = {ready.marker_for(name) for name in names} if ready.signal is ReadySignal.marker else set()
        sightings: dict[str, _Sighting] = {}
        complete: list[tuple[int, str]] = []
        refused: list[tuple[str, FileRefused]] = []
        for entry in entries:
            name = entry.filename
            if self._named(name) and stat.S_ISLNK(entry.st_mode or 0):
                refused.append((name, link_refused(name)))
            elif self._named(name) and not is_utf8(name):
                refused.append((name, name_refused(name)))
            elif name in markers or not self._matches(entry):
                continue
            elif self._complete(entry, names, now, sightings):
                complete.append((entry.st_mtime or 0, name))
        self._sightings = sightings
        return [name for _, name in sorted(complete)], refused

    def _complete(
        self, entry: paramiko.SFTPAttributes, names: set[str], now: float, sightings: dict[str, _Sighting]
    ) -> bool:
        """Whether a plain file is complete by the route's ``ready`` signal; notes how long it stood still."""
        ready = self.settings.ready
        if ready.signal is ReadySignal.marker:
            return ready.marker_for(entry.filename) in names
        if ready.signal is ReadySignal.rename:
            return True
        signature = (entry.st_size, entry.st_mtime)
        previous = self._sightings.get(entry.filename)
        since = previous.since if previous is not None and previous.signature == signature else now
        sightings[entry.filename] = _Sighting(signature, since)
        return now - since >= self.settings.stable_for

    def _return_expired_claims(self, sftp: paramiko.SFTPClient) -> None:
        """Rename claims whose lease ran out (their router died mid-file) back into remote_dir."""
        settings = self.settings
        try:
            entries = _listdir(sftp, settings.processing_dir)
        except FileNotFoundError:
            return
        now = self._clock()
        for entry in entries:
            claim = posixpath.join(settings.processing_dir, entry.filename)
            idle = now - (entry.st_mtime or 0)
            if not self._matches(entry) or claim in self._unsettled or idle < settings.claim_ttl:
                continue
            log.warning(
                "route %s: claim on %s expired (not renewed for %.0fs, claim_ttl %.0fs), its router stopped "
                "mid-file; returning it to %s",
                settings.route, entry.filename, idle, settings.claim_ttl, settings.remote_dir,
                extra={"route": settings.route, "file": entry.filename},
            )
            try:
                _move(sftp, claim, settings.remote_dir, entry.filename)
            except FileNotFoundError:
                continue  # another router returned it first

    def _claim(self, sftp: paramiko.SFTPClient, name: str) -> tuple[str, float] | None:
        """Rename ``name`` into the processing folder; None when another router got it first."""
        source = posixpath.join(self.settings.remote_dir, name)
        claim = posixpath.join(self.settings.processing_dir, name)
        stamp = self._clock()
        try:
            if stat.S_ISLNK(sftp.lstat(source).st_mode or 0):
                return None  # became a link since the listing: refused next poll, never stamped through
            # Stamp first: a claim must never show up in .processing already looking expired.
            sftp.utime(source, (int(stamp), int(stamp)))
            sftp.rename(source, claim)
        except OSError as error:
            if not self._connection.connected:
                raise
            # Gone: another router claimed it. Otherwise a file of that name is still in flight (or the
            # server forbids the rename): the file stays and is offered again next poll.
            if not isinstance(error, FileNotFoundError):
                log.info("route %s: %s not claimed this poll: %s", self.settings.route, name, error,
                         extra={"route": self.settings.route, "file": name})
            return None
        return claim, stamp

    def _take(self, sftp: paramiko.SFTPClient, name: str) -> SftpResult | None:
        claimed = self._claim(sftp, name)
        if claimed is None:
            return None
        claim, stamp = claimed
        self._sightings.pop(name, None)
        unsettled = self._unsettled[claim] = _Unsettled()
        progress = unsettled.progress
        lease = _ClaimLease(sftp, claim, stamp, self.settings, self._clock)
        with tempfile.TemporaryDirectory(prefix="sftp-", dir=self._staging_dir) as staging:
            # The staging copy keeps the remote name, so parse errors name the file the supplier sent.
            local = Path(staging) / name
            try:
                unsettled.size = size = self._download(sftp, claim, local, lease)
                publish_file(local, self._parsing, lease.renewing(self._sink), progress, name=name, size=size)
                unsettled.confirmed = True
                self._publish_appended(sftp, claim, local, lease, unsettled)
            except FileFormatError as error:
                return self._reject(sftp, claim, name, error)
            except Exception as error:
                return self._release(sftp, claim, name, progress, error)
        return self._finish(sftp, claim, name, progress)

    def _publish_appended(
        self,
        sftp: paramiko.SFTPClient,
        claim: str,
        local: Path,
        lease: _ClaimLease,
        unsettled: _Unsettled,
    ) -> None:
        """Publish what a writer appended to the claim while it was published, until it stops growing."""
        name, progress, size = local.name, unsettled.progress, unsettled.size
        while (grown := sftp.lstat(claim).st_size or 0) != size:
            if grown < size:
                raise changed_refused(name, progress.published, f"it was truncated ({size} -> {grown} bytes)")
            log.warning(
                "route %s: %s grew after it was taken (%d -> %d bytes); publishing what was appended",
                self.settings.route, name, size, grown,
                extra={"route": self.settings.route, "file": name},
            )
            size = self._download(sftp, claim, local, lease)
            if file_sha256(local, progress.size) != progress.sha256:
                raise changed_refused(name, progress.published, "its beginning was rewritten")
            publish_file(local, self._parsing, lease.renewing(self._sink), progress, name=name, size=size)
            unsettled.size = size

    def _download(self, sftp: paramiko.SFTPClient, claim: str, local: Path, lease: _ClaimLease) -> int:
        """Stream ``claim`` into ``local`` window by window; returns its size, raises unless all arrived."""
        attributes = sftp.lstat(claim)
        if stat.S_ISLNK(attributes.st_mode or 0):
            raise link_refused(posixpath.basename(claim))
        expected = attributes.st_size or 0
        received = 0
        with sftp.open(claim, "rb") as remote, local.open("wb") as staged:
            for window in range(0, expected, DOWNLOAD_WINDOW):
                end = min(window + DOWNLOAD_WINDOW, expected)
                blocks = [(at, min(READ_REQUEST, end - at)) for at in range(window, end, READ_REQUEST)]
                for block in remote.readv(blocks):
                    staged.write(block)
                    received += len(block)
                lease.renew_if_due()
        # A size that moved means someone still writes to the file: it must not be ingested half-done.
        final = sftp.lstat(claim).st_size or 0
        if received != expected or final != expected:
            raise TransferIncomplete(
                f"download of {claim} from {self.settings.address} incomplete: received {received} bytes, "
                f"the server reported {expected} before and {final} after the transfer"
            )
        return expected

    def _finish(self, sftp: paramiko.SFTPClient, claim: str, name: str, progress: FileProgress) -> SftpResult:
        """Archive or delete a claim whose every chunk the broker confirmed."""
        settings = self.settings
        moved: str | None = None
        if settings.archive:
            moved = _move(sftp, claim, settings.archive, name)
            outcome = SftpOutcome.archived
        else:
            sftp.remove(claim)
            outcome = SftpOutcome.deleted
        del self._unsettled[claim]
        self._move_marker(sftp, name, settings.archive)
        log.info(
            "route %s: %s from %s %s: %d records in %d chunks",
            settings.route, name, settings.address, outcome.value, progress.records, progress.chunks,
            extra={"route": settings.route, "file": name, "records": progress.records},
        )
        return SftpResult(name, outcome, progress.records, progress.chunks, moved_to=moved)

    def _release(
        self, sftp: paramiko.SFTPClient, claim: str, name: str, progress: FileProgress, error: Exception
    ) -> SftpResult:
        """Rename a claim back into remote_dir: not every chunk was confirmed, so a later poll retries it."""
        settings = self.settings
        log.warning(
            "route %s: %s not ingested (%d chunks confirmed): %s; releasing it back to %s",
            settings.route, name, progress.chunks, describe(error), settings.remote_dir,
            extra={"route": settings.route, "file": name},
        )
        moved = _move(sftp, claim, settings.remote_dir, name)
        del self._unsettled[claim]
        return SftpResult(name, SftpOutcome.released, progress.records, progress.chunks, str(error), moved)

    def _move_marker(self, sftp: paramiko.SFTPClient, name: str, folder: str | None) -> None:
        """Move a data file's marker along with it (or delete it with it), when the route uses markers."""
        ready = self.settings.ready
        if ready.signal is not ReadySignal.marker:
            return
        marker = posixpath.join(self.settings.remote_dir, ready.marker_for(name))
        try:
            if folder:
                _move(sftp, marker, folder, ready.marker_for(name))
            else:
                sftp.remove(_wire(marker))
        except FileNotFoundError:
            return

    def _reject(self, sftp: paramiko.SFTPClient, claim: str, name: str, error: FileFormatError) -> SftpResult:
        """Move a file (a claim, or an entry refused unread) to errors with its reason beside it."""
        settings = self.settings
        moved = _move(sftp, claim, settings.errors_dir, name)
        self._unsettled.pop(claim, None)
        self._move_marker(sftp, name, settings.errors_dir)
        with sftp.open(_wire(f"{moved}.reason.txt"), "w") as reason:
            reason.write(f"{error}\n")
        log.error(
            "route %s: %s from %s rejected to %s: %s",
            settings.route, printable(name), settings.address, settings.errors_dir, error,
            extra={"route": settings.route, "file": printable(name)},
        )
        if self._on_rejected is not None:
            self._on_rejected(settings, moved, error)
        return SftpResult(name, SftpOutcome.rejected, detail=str(error), moved_to=moved)

    def _settle_unsettled(self, sftp: paramiko.SFTPClient) -> list[SftpResult]:
        """Finish or release the claims a lost connection cut off, now that the server is back."""
        results: list[SftpResult] = []
        for claim, unsettled in list(self._unsettled.items()):
            name = posixpath.basename(claim)
            if not _exists(sftp, claim):
                log.warning("route %s: claim %s was taken over by another router while disconnected",
                            self.settings.route, claim, extra={"route": self.settings.route, "file": name})
                del self._unsettled[claim]
            elif unsettled.confirmed and (sftp.lstat(claim).st_size or 0) != unsettled.size:
                # Appended to while the connection was down: what is not published must not be archived.
                what = "it grew while the server was away"
                lost = changed_refused(name, unsettled.progress.published, what)
                results.append(self._reject(sftp, claim, name, lost))
            elif unsettled.confirmed:
                results.append(self._finish(sftp, claim, name, unsettled.progress))
            else:
                lost = ConnectionError(f"the connection to {self.settings.address} was lost mid-file")
                results.append(self._release(sftp, claim, name, unsettled.progress, lost))
        return results
