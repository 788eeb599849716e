"""Publishing a complete local file as chunks of raw records: shared by the file and SFTP sources.

Two streaming passes: the first hashes the content and checks the whole file parses (so a broken
file is rejected before anything of it is published), the second publishes chunks of at most
``chunk_size`` records. Memory holds one chunk at a time whatever the file size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.chunks import ChunkSink, SourceChunk, batched
from transforms.fixed_width import FixedLayout
from transforms.parsers import CsvDialect, check_file, iter_records

HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class FileParsing:
    """How a route's files are read: route name, source system, format, record path, chunk size, for
    CSV the dialect (delimiter, encoding, preamble, trailer), for fixed-width the layout."""

    route: str
    system: str
    format: str
    records: str | None
    chunk_size: int
    csv: CsvDialect = field(default_factory=CsvDialect)
    fixed: FixedLayout | None = None

    @property
    def encoding(self) -> str:
        """The text encoding of the route's files (CSV/JSONL: ``csv.encoding``; fixed: the layout's)."""
        return self.fixed.encoding if self.fixed is not None else self.csv.encoding

    def options(self) -> dict[str, Any]:
        """The format options :func:`transforms.parsers.iter_records` takes."""
        return {
            "csv_delimiter": self.csv.delimiter,
            "encoding": self.csv.encoding,
            "csv_preamble": self.csv.preamble,
            "csv_trailer": self.csv.trailer,
            "fixed": self.fixed,
        }


@dataclass
class FileProgress:
    """Filled in as a file is published, so a caller knows how far it got when publishing failed."""

    sha256: str = ""
    records: int = 0
    chunks: int = 0


def file_sha256(path: Path) -> str:
    """Content hash of a file, read in blocks; part of every event id derived from the file."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def publish_file(
    path: Path, parsing: FileParsing, sink: ChunkSink, progress: FileProgress, *, name: str | None = None
) -> FileProgress:
    """Check, then publish ``path`` chunk by chunk; every chunk is confirmed when this returns.

    ``name`` is the file's name as the upstream knows it (defaults to the local name). Raises
    :class:`transforms.parsers.FileFormatError` before publishing anything when the file does not
    parse, and whatever the sink raises when the broker does not confirm.
    """
    name = name or path.name
    progress.sha256 = file_sha256(path)
    dialect = parsing.options()
    progress.records = check_file(path, parsing.format, parsing.records, **dialect)
    with path.open("rb") as stream:
        records = iter_records(stream, parsing.format, parsing.records, name, **dialect)
        for number, batch in enumerate(batched(records, parsing.chunk_size), start=1):
            sink(
                SourceChunk(
                    route=parsing.route,
                    system=parsing.system,
                    message_id=f"{name}@{progress.sha256[:16]}#{number}",
                    origin={"file": name, "sha256": progress.sha256},
                    records=batch,
                    chunk=number,
                )
            )
            progress.chunks = number
    return progress
