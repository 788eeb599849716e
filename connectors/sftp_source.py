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

A claim is leased on the server (its mtime, renewed while it is worked on); the lease, and how a claim
is downloaded, are :mod:`connectors.sftp_claim`.
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
from pathlib import Path

import paramiko

from connectors.chunks import ChunkSink
from connectors.drop_source import DropSource, IngestOutcome, IngestResult, Listed, sort_listing
from connectors.file_ingest import (
    FileParsing,
    FileRefused,
    Readiness,
    ReadySignal,
    changed_refused,
    file_sha256,
    printable,
    publish_file,
)
from connectors.file_source import PROCESSING_DIR
from connectors.sftp_claim import ClaimLease, RemoteClaim, download
from connectors.sftp_folder import ensure_dir, exists, list_folder, move_into, wire
from connectors.sftp_session import SERVER_ERRORS, SftpEndpoint, SftpSession, describe, is_refusal
from transforms.parsers import FileFormatError

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class _Sighting:
    signature: tuple[int | None, int | None]
    since: float


class SftpSource(DropSource[SftpSettings, str, RemoteClaim, str]):
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
        self._unsettled: dict[str, RemoteClaim] = {}

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
                ensure_dir(sftp, self.settings.processing_dir)
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
        now = self._clock()
        entries = list_folder(sftp, self.settings.remote_dir)
        listing = [
            Listed(entry.filename, entry.filename, entry.st_mode or 0, entry.st_mtime or 0)
            for entry in entries
            if self._named(entry.filename)
        ]
        attributes = {entry.filename: entry for entry in entries}
        sightings: dict[str, _Sighting] = {}

        def stood_still(entry: Listed[str]) -> bool:
            """Whether the file's size and mtime stayed the same for ``stable_for``; notes since when."""
            listed = attributes[entry.name]
            signature = (listed.st_size, listed.st_mtime)
            previous = self._sightings.get(entry.name)
            since = previous.since if previous is not None and previous.signature == signature else now
            sightings[entry.name] = _Sighting(signature, since)
            return now - since >= self.settings.stable_for

        ready = sort_listing(listing, {entry.filename for entry in entries}, self.settings.ready, stood_still)
        self._sightings = sightings
        return ready

    def _return_expired_claims(self, sftp: paramiko.SFTPClient) -> None:
        """Rename claims whose lease ran out (their router died mid-file) back into remote_dir."""
        settings = self.settings
        try:
            entries = list_folder(sftp, settings.processing_dir)
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
                settings.route, printable(entry.filename), idle, settings.claim_ttl, settings.remote_dir,
                extra={"route": settings.route, "file": printable(entry.filename)},
            )
            try:
                move_into(sftp, claim, settings.remote_dir, entry.filename)
            except FileNotFoundError:
                continue  # another router returned it first

    def _claim(self, name: str) -> RemoteClaim | None:
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
                shown = printable(name)
                log.info("route %s: %s not claimed this poll: %s", self.settings.route, shown, error,
                         extra={"route": self.settings.route, "file": shown})
            return None
        self._sightings.pop(name, None)
        lease = ClaimLease(sftp, path, stamp, self.settings.claim_ttl, self._clock)
        claim = self._unsettled[path] = RemoteClaim(path, name, lease)
        return claim

    def _publish(self, claim: RemoteClaim) -> bool:
        """Download the claim to a staging file and publish it, then what was appended meanwhile."""
        sftp = self._server()
        with tempfile.TemporaryDirectory(prefix="sftp-", dir=self._staging_dir) as staging:
            # The staging copy keeps the remote name, so parse errors name the file the supplier sent.
            local = Path(staging) / claim.name
            claim.size = size = download(sftp, claim.path, local, claim.lease, self.settings.address)
            sink = claim.lease.renewing(self._sink)
            publish_file(local, self._parsing, sink, claim.progress, name=claim.name, size=size)
            claim.confirmed = True
            self._publish_appended(sftp, claim, local)
        return True

    def _publish_appended(self, sftp: paramiko.SFTPClient, claim: RemoteClaim, local: Path) -> None:
        """Publish what a writer appended to the claim while it was published, until it stops growing."""
        name, progress, size, lease = local.name, claim.progress, claim.size, claim.lease
        while (grown := sftp.lstat(claim.path).st_size or 0) != size:
            if grown < size:
                raise changed_refused(name, progress.published, f"it was truncated ({size} -> {grown} bytes)")
            log.warning(
                "route %s: %s grew after it was taken (%d -> %d bytes); publishing what was appended",
                self.settings.route, printable(name), size, grown,
                extra={"route": self.settings.route, "file": printable(name)},
            )
            size = download(sftp, claim.path, local, lease, self.settings.address)
            if file_sha256(local, progress.size) != progress.sha256:
                raise changed_refused(name, progress.published, "its beginning was rewritten")
            publish_file(local, self._parsing, lease.renewing(self._sink), progress, name=name, size=size)
            claim.size = size

    def _finish(self, claim: RemoteClaim) -> tuple[IngestOutcome, str | None]:
        sftp = self._server()
        archive = self.settings.archive
        if archive:
            moved: str | None = move_into(sftp, claim.path, archive, claim.name)
        else:
            sftp.remove(claim.path)
            moved = None
        del self._unsettled[claim.path]
        self._move_marker(sftp, claim.name, archive)
        return (IngestOutcome.archived if archive else IngestOutcome.deleted), moved

    def _return(self, claim: RemoteClaim) -> str:
        """Rename the claim back into remote_dir."""
        moved = move_into(self._server(), claim.path, self.settings.remote_dir, claim.name)
        del self._unsettled[claim.path]
        return moved

    def _let_go(self, claim: RemoteClaim) -> str:
        return claim.path  # still unsettled until it is in errors: a lost connection settles it later

    def _to_errors(self, place: str, error: FileFormatError) -> str:
        sftp = self._server()
        errors, name = self.settings.errors_dir, posixpath.basename(place)
        moved = move_into(sftp, place, errors, name)
        self._unsettled.pop(place, None)
        self._move_marker(sftp, name, errors)
        with sftp.open(wire(f"{moved}.reason.txt"), "w") as reason:
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
                move_into(sftp, marker, folder, ready.marker_for(name))
            else:
                sftp.remove(wire(marker))
        except FileNotFoundError:
            return

    def _settle_unsettled(self, sftp: paramiko.SFTPClient) -> list[IngestResult[str]]:
        """Finish or release the claims a lost connection cut off, now that the server is back."""
        results: list[IngestResult[str]] = []
        for path, claim in list(self._unsettled.items()):
            if not exists(sftp, path):
                log.warning("route %s: claim %s was taken over by another router while disconnected",
                            self.settings.route, printable(path),
                            extra={"route": self.settings.route, "file": printable(claim.name)})
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
