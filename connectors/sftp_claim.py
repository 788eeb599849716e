"""A file an SFTP source claimed on the server: its lease, what of it was confirmed, its download.

Claim lease: the claimed file's mtime on the server is its lease. The claimer stamps it with its own
clock just before the rename and re-stamps it every quarter of ``claim_ttl`` while it downloads and
publishes. A router that finds a claim not renewed for ``claim_ttl`` takes its owner for dead (crashed
or cut off) and renames the file back into ``remote_dir``, where it is claimed like a new file. This
keeps all claim state on the server, so no router needs to know the others; routers sharing a folder
need clocks that agree to well within ``claim_ttl``, and an owner stalled longer than that may see its
file ingested again, which only republishes chunks with the same event ids.
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from connectors.chunks import ChunkSink, SourceChunk
from connectors.file_ingest import FileProgress, link_refused

# Bytes requested ahead while downloading: bounds the memory a download holds, yet hides the latency.
DOWNLOAD_WINDOW = 4 << 20
READ_REQUEST = 32 << 10


class TransferIncomplete(OSError):
    """A download did not yield exactly the bytes the server reported for the file."""


class ClaimLease:
    """Keeps a claim alive by re-stamping the claimed file's mtime on the server as work goes on."""

    def __init__(
        self,
        sftp: paramiko.SFTPClient,
        claim: str,
        stamped: float,
        ttl: float,
        clock: Callable[[], float],
    ) -> None:
        self._sftp = sftp
        self._claim = claim
        self._renewed = stamped
        self._every = ttl / 4
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


@dataclass
class RemoteClaim:
    """A file this router renamed into the processing folder and has not yet moved on."""

    path: str
    name: str
    lease: ClaimLease
    progress: FileProgress = field(default_factory=FileProgress)
    confirmed: bool = False
    size: int = 0
    """Bytes of the claim whose records the broker confirmed."""


def download(sftp: paramiko.SFTPClient, claim: str, local: Path, lease: ClaimLease, address: str) -> int:
    """Stream ``claim`` from the server at ``address`` into ``local`` window by window, renewing its lease;
    returns its size, raises unless all arrived."""
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
            f"download of {claim} from {address} incomplete: received {received} bytes, "
            f"the server reported {expected} before and {final} after the transfer"
        )
    return expected
