"""SFTP source: suppliers drop ASN and receipt files on an SFTP server and the router takes them from there.

The claim → publish → settle sequence is :mod:`connectors.drop_source`'s; this module supplies the
server's operations: listing, claiming with a rename and a lease, downloading, moving.

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
from pathlib import Path, PurePosixPath

import paramiko
from paramiko.sftp import CMD_CLOSE, CMD_HANDLE, CMD_NAME, CMD_OPENDIR, CMD_READDIR, SFTPError

from connectors.chunks import ChunkSink, SourceChunk
from connectors.drop_source import DropSource, IngestOutcome, IngestResult
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
    publish_file,
)
from connectors.file_source import PROCESSING_DIR
from connectors.sftp_session import SERVER_ERRORS, SftpEndpoint, SftpSession, describe, is_refusal
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
class _RemoteClaim:
    """A file this router renamed into the processing folder and has not yet moved on."""

    path: str
    name: str
    lease: _ClaimLease
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
    kind, message = sftp._request(CMD_OPENDIR, _wire(folder))  # type: ignore[attr-defined]
    if kind != CMD_HANDLE:
        raise SFTPError(f"listing {folder}: expected a handle from the server")
    handle = message.get_binary()
    entries: list[paramiko.SFTPAttributes] = []
    try:
        while True:
            try:
                kind, message = sftp._request(CMD_READDIR, handle)  # type: ignore[attr-defined]
            except EOFError:
                return entries
            if kind != CMD_NAME:
                raise SFTPError(f"listing {folder}: expected names from the server")
            for _ in range(message.get_int()):
                name = message.get_string().decode("utf-8", "surrogateescape")
                long_name = message.get_string().decode("utf-8", "replace")
                attributes = paramiko.SFTPAttributes._from_msg(message, name, long_name)  # type: ignore[attr-defined]
                if name not in (".", ".."):
                    entries.append(attributes)
    finally:
        sftp._request(CMD_CLOSE, handle)  # type: ignore[attr-defined]


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


class SftpSource(DropSource[SftpSettings, str, _RemoteClaim, str]):
    """Polls one route's remote folder and publishes every stable file exactly once as chunks of records."""

    def __init__(
        self,
        settings: SftpSettings,
        sink: ChunkSink,
        *,
        on_rejected: Callable[[SftpSettings, str, FileFormatError], None] | None = None,
        clock: Callable[[], float] = time.time,
        staging_dir: Path | None = None,
    ) -> None:
        super().__init__(settings, sink, on_rejected=on_rejected, clock=clock)
        self._staging_dir = staging_dir
        if staging_dir is not None:
            staging_dir.mkdir(parents=True, exist_ok=True)
        self._parsing = settings.parsing
        self._connection = SftpSession(settings.endpoint)
        self._failures = 0
        self._sightings: dict[str, _Sighting] = {}
        # Claims this router holds but has not yet moved on: one a lost connection cut off is settled
        # first after reconnecting (finished when every chunk was confirmed, released otherwise).
        self._unsettled: dict[str, _RemoteClaim] = {}

    @property
    def next_poll_in(self) -> float:
        """Seconds until the next poll: the poll interval, or a doubling backoff while the server fails."""
        if self._failures == 0:
            return self.settings.poll
        ceiling = max(self.settings.reconnect_max, self.settings.poll)
        return min(ceiling, self.settings.poll * 2.0 ** (self._failures - 1))

    @property
    def healthy(self) -> bool:
        return self._failures == 0

    def _origin(self) -> str:
        return self.settings.address

    def _poll(self, stop: threading.Event | None) -> list[IngestResult[str]]:
        """Claims a lost connection cut off, expired claims, then the ready files; a server problem is
        logged and ends the poll early."""
        results: list[IngestResult[str]] = []
        sftp = self._session()
        if sftp is None:
            return results
        try:
            results.extend(self._settle_unsettled(sftp))
            self._return_expired_claims(sftp)
            ready, refused = self._ready_names(sftp)
            for name, refusal in refused:
                results.append(self._refuse(posixpath.join(self.settings.remote_dir, name), refusal, name))
            if ready:
                _ensure_dir(sftp, self.settings.processing_dir)
            self._take_each(ready, stop, results)
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
        return results

    def close(self) -> None:
        """Close the SFTP session and its SSH connection."""
        self._connection.close()

    def _server(self) -> paramiko.SFTPClient:
        """The session of the poll under way; a connection lost meanwhile ends the poll (a server error)."""
        sftp = self._connection.session()
        if sftp is None:
            raise ConnectionResetError(f"the connection to {self.settings.address} was lost")
        return sftp

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

    def _claim(self, name: str) -> _RemoteClaim | None:
        """Rename ``name`` into the processing folder; None when another router got it first."""
        sftp = self._server()
        source = posixpath.join(self.settings.remote_dir, name)
        path = posixpath.join(self.settings.processing_dir, name)
        stamp = self._clock()
        try:
            if stat.S_ISLNK(sftp.lstat(source).st_mode or 0):
                return None  # became a link since the listing: refused next poll, never stamped through
            # Stamp first: a claim must never show up in .processing already looking expired.
            sftp.utime(source, (int(stamp), int(stamp)))
            sftp.rename(source, path)
        except OSError as error:
            if not self._connection.connected:
                raise
            # Gone: another router claimed it. Otherwise a file of that name is still in flight (or the
            # server forbids the rename): the file stays and is offered again next poll.
            if not isinstance(error, FileNotFoundError):
                log.info("route %s: %s not claimed this poll: %s", self.settings.route, name, error,
                         extra={"route": self.settings.route, "file": name})
            return None
        self._sightings.pop(name, None)
        lease = _ClaimLease(sftp, path, stamp, self.settings, self._clock)
        claim = self._unsettled[path] = _RemoteClaim(path, name, lease)
        return claim

    def _publish(self, claim: _RemoteClaim) -> bool:
        """Download the claim to a staging file and publish it, then what was appended meanwhile."""
        sftp = self._server()
        with tempfile.TemporaryDirectory(prefix="sftp-", dir=self._staging_dir) as staging:
            # The staging copy keeps the remote name, so parse errors name the file the supplier sent.
            local = Path(staging) / claim.name
            claim.size = size = self._download(sftp, claim.path, local, claim.lease)
            sink = claim.lease.renewing(self._sink)
            publish_file(local, self._parsing, sink, claim.progress, name=claim.name, size=size)
            claim.confirmed = True
            self._publish_appended(sftp, claim, local)
        return True

    def _publish_appended(self, sftp: paramiko.SFTPClient, claim: _RemoteClaim, local: Path) -> None:
        """Publish what a writer appended to the claim while it was published, until it stops growing."""
        name, progress, size, lease = local.name, claim.progress, claim.size, claim.lease
        while (grown := sftp.lstat(claim.path).st_size or 0) != size:
            if grown < size:
                raise changed_refused(name, progress.published, f"it was truncated ({size} -> {grown} bytes)")
            log.warning(
                "route %s: %s grew after it was taken (%d -> %d bytes); publishing what was appended",
                self.settings.route, name, size, grown,
                extra={"route": self.settings.route, "file": name},
            )
            size = self._download(sftp, claim.path, local, lease)
            if file_sha256(local, progress.size) != progress.sha256:
                raise changed_refused(name, progress.published, "its beginning was rewritten")
            publish_file(local, self._parsing, lease.renewing(self._sink), progress, name=name, size=size)
            claim.size = size

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

    def _finish(self, claim: _RemoteClaim) -> tuple[IngestOutcome, str | None]:
        sftp = self._server()
        archive = self.settings.archive
        if archive:
            moved: str | None = _move(sftp, claim.path, archive, claim.name)
        else:
            sftp.remove(claim.path)
            moved = None
        del self._unsettled[claim.path]
        self._move_marker(sftp, claim.name, archive)
        return (IngestOutcome.archived if archive else IngestOutcome.deleted), moved

    def _return(self, claim: _RemoteClaim) -> str:
        """Rename the claim back into remote_dir."""
        moved = _move(self._server(), claim.path, self.settings.remote_dir, claim.name)
        del self._unsettled[claim.path]
        return moved

    def _let_go(self, claim: _RemoteClaim) -> str:
        return claim.path  # still unsettled until it is in errors: a lost connection settles it later

    def _to_errors(self, place: str, error: FileFormatError) -> str:
        sftp = self._server()
        errors, name = self.settings.errors_dir, posixpath.basename(place)
        moved = _move(sftp, place, errors, name)
        self._unsettled.pop(place, None)
        self._move_marker(sftp, name, errors)
        with sftp.open(_wire(f"{moved}.reason.txt"), "w") as reason:
            reason.write(f"{error}\n")
        return moved

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

    def _settle_unsettled(self, sftp: paramiko.SFTPClient) -> list[IngestResult[str]]:
        """Finish or release the claims a lost connection cut off, now that the server is back."""
        results: list[IngestResult[str]] = []
        for path, claim in list(self._unsettled.items()):
            if not _exists(sftp, path):
                log.warning("route %s: claim %s was taken over by another router while disconnected",
                            self.settings.route, path,
                            extra={"route": self.settings.route, "file": claim.name})
                del self._unsettled[path]
            elif claim.confirmed and (sftp.lstat(path).st_size or 0) != claim.size:
                # Appended to while the connection was down: what is not published must not be archived.
                what = "it grew while the server was away"
                grown = changed_refused(claim.name, claim.progress.published, what)
                results.append(self._reject(claim, grown))
            elif claim.confirmed:
                results.append(self._settle(claim))
            else:
                lost = ConnectionError(f"the connection to {self.settings.address} was lost mid-file")
                results.append(self._release(claim, lost))
        return results
