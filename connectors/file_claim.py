"""A local file a drop source claimed: its lock, what of it was published, and how it may grow.

A claim is published up to what it holds now; while it may still grow (``stable``), only complete
lines of a CSV or JSON Lines file, so a row the writer is half-way through is never taken truncated.
What is appended later is published after it, under the same identity; a change other than an append
refuses the file. The identity (the hash of the bytes first published) is kept in a hidden sidecar
beside the claim, so a restart or a release re-publishes the same events, never new ones.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from connectors.chunks import ChunkSink
from connectors.file_ingest import (
    FileParsing,
    FileProgress,
    changed_refused,
    file_sha256,
    printable,
    publish_file,
)

log = logging.getLogger(__name__)

_LINE_FORMATS = frozenset({"csv", "jsonl"})
_TAIL_BLOCK = 1 << 16


@dataclass(frozen=True)
class Signature:
    """What says a file changed: which file it is (device, inode), its size and its mtime."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> Signature:
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)

    def appended_to(self, earlier: Signature) -> bool:
        """Whether this is the same file as ``earlier``, at least as long (so only appended to)."""
        return (self.device, self.inode) == (earlier.device, earlier.inode) and self.size >= earlier.size


@dataclass
class FileClaim:
    """A file this process claimed and holds locked until it is archived, rejected or released."""

    path: Path
    handle: IO[bytes]
    seen: Signature
    progress: FileProgress
    watch: float
    quiet_since: float
    published_to: int = 0
    published_sha256: str = ""
    """Hash of the bytes published so far: a change to them is a rewrite, not an append."""

    @property
    def name(self) -> str:
        return self.path.name

    def advance(self, parsing: FileParsing, sink: ChunkSink, *, final: bool) -> None:
        """Publish what the file holds beyond what was published; while it may grow, complete lines only."""
        size = self.seen.size
        whole = final or parsing.format not in _LINE_FORMATS
        end = size if whole else _complete_lines(self.handle, size)
        if end <= self.published_to and not (final and size == 0):
            return
        progress = self.progress
        if not progress.sha256:
            progress.sha256, progress.size = file_sha256(self.path, end), end
            self._keep_identity()
        publish_file(self.path, parsing, sink, progress, size=end)
        self.published_to = end
        self.published_sha256 = progress.sha256 if end == progress.size else file_sha256(self.path, end)

    def _keep_identity(self) -> None:
        kept = _sidecar(self.path)
        staged = kept.with_name(kept.name + ".tmp")
        staged.write_text(json.dumps({"size": self.progress.size, "sha256": self.progress.sha256}), "utf-8")
        os.replace(staged, kept)

    def grew(self, current: Signature, route: str) -> None:
        """Note that a claimed file changed; raises FileRefused for a change other than an append."""
        rewritten = self.published_to > 0 and (
            file_sha256(self.path, self.published_to) != self.published_sha256
        )
        if not current.appended_to(self.seen) or rewritten:
            what = f"it was replaced, truncated or rewritten ({self.seen.size} -> {current.size} bytes)"
            raise changed_refused(printable(self.name), self.progress.published, what)
        log.warning(
            "file %s grew after it was taken (%d -> %d bytes); publishing what was appended",
            printable(self.name),
            self.seen.size,
            current.size,
            extra={"route": route, "file": printable(self.name)},
        )
        self.seen = current

    def drop_identity(self) -> None:
        """Forget the identity kept beside the claim (it was archived or rejected)."""
        _sidecar(self.path).unlink(missing_ok=True)


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


def kept_identity(claimed: Path) -> FileProgress:
    """The identity a claim was first published under (kept beside it), or a fresh one."""
    try:
        kept = json.loads(_sidecar(claimed).read_text(encoding="utf-8"))
        size, sha256 = int(kept["size"]), str(kept["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return FileProgress()
    if os.lstat(claimed).st_size < size or file_sha256(claimed, size) != sha256:
        return FileProgress()  # another file of the same name: its own identity
    return FileProgress(sha256=sha256, size=size)
