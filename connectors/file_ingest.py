"""Publishing a complete local file as chunks of raw records: shared by the file and SFTP sources.

Two streaming passes: the first hashes the content and checks the whole file parses and can be carried
by the broker (so a broken file is rejected before anything of it is published), the second publishes
chunks of at most ``chunk_size`` records. Memory holds one chunk at a time whatever the file size.

Also here, because both sources need them: when a dropped file counts as complete (:class:`Readiness`),
why a whole file is refused (:class:`Refusal`), and how a file name that is not UTF-8 is shown.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

from connectors.chunks import ChunkSink, PipelinedSink, SourceChunk, batched
from ops import tracing
from transforms.edi import EDI_FORMATS, record_identity
from transforms.fixed_width import FixedLayout
from transforms.parsers import CsvDialect, FileFormatError, RawRecord, RecordFormat, iter_records

HASH_BLOCK = 1 << 20
DEFAULT_MARKER = "{name}.done"
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
"""How source files are opened: never through a symbolic link (ELOOP), never blocking on a FIFO."""


class ReadySignal(StrEnum):
    """How a source tells that a dropped file is complete."""

    stable = "stable"
    """Size and mtime unchanged for ``stable_for``: a guess, wrong for a writer that pauses longer."""
    marker = "marker"
    """A marker file (``{name}.done``) exists: the writer creates it once the file is complete."""
    rename = "rename"
    """The name matches ``pattern``: the writer uses another name until done, then renames."""


@dataclass(frozen=True)
class Readiness:
    """A route's ``source.ready``: the signal, and for ``marker`` the marker's name template."""

    signal: ReadySignal = ReadySignal.stable
    marker: str = DEFAULT_MARKER

    @classmethod
    def parse(cls, value: object) -> Readiness:
        """Read ``stable``, ``rename``, ``marker``, ``{marker: TEMPLATE}`` or a bare ``TEMPLATE``."""
        if isinstance(value, dict) and set(value) == {"marker"}:
            return cls(ReadySignal.marker, _marker_template(value["marker"]))
        if isinstance(value, str) and value in ReadySignal.__members__:
            return cls(ReadySignal(value))
        if isinstance(value, str) and "{" in value:
            return cls(ReadySignal.marker, _marker_template(value))
        raise ValueError(
            f'ready must be stable, rename, marker or {{marker: "{DEFAULT_MARKER}"}}, not {value!r}'
        )

    def marker_for(self, name: str) -> str:
        """The marker file's name for the data file ``name``."""
        return self.marker.format(name=name, stem=os.path.splitext(name)[0])

    @property
    def waits(self) -> bool:
        """Whether completeness is only guessed from the file standing still (``stable``)."""
        return self.signal is ReadySignal.stable


def _marker_template(template: object) -> str:
    if not isinstance(template, str) or not template:
        raise ValueError(f"ready.marker must be a file name template such as {DEFAULT_MARKER!r}")
    if "/" in template or "\\" in template:
        raise ValueError(f"ready.marker {template!r} must be a name in the same folder, without '/'")
    try:
        example = template.format(name="a.csv", stem="a")
    except (KeyError, IndexError, ValueError):
        raise ValueError(
            f"ready.marker {template!r} may only use {{name}} (the file's name) and {{stem}} (without "
            "its extension)"
        ) from None
    if example == template:
        raise ValueError(f"ready.marker {template!r} must contain {{name}} or {{stem}}")
    if example in ("a.csv", "a", ".", ".."):
        raise ValueError(f"ready.marker {template!r} must name another file than the data file")
    return template


class Refusal(StrEnum):
    """Why a whole file went to the errors folder: the dead letter's reason category."""

    parse = "parse"
    link = "link"
    file_name = "file_name"
    changed = "changed"


class FileRefused(FileFormatError):
    """A file refused as a whole for another reason than its syntax; ``refusal`` says which."""

    def __init__(
        self, name: str, line: int | None, column: int | None, reason: str, refusal: Refusal
    ) -> None:
        super().__init__(name, line, column, reason)
        self.refusal = refusal


def link_refused(name: str) -> FileRefused:
    """The refusal of a symbolic link found where a file was expected."""
    what = "is a symbolic link; links are never followed"
    return FileRefused(printable(name), None, None, what, Refusal.link)


def name_refused(name: str) -> FileRefused:
    """The refusal of a file whose name (as the OS or server gave it) is not UTF-8."""
    what = "the file name is not valid UTF-8, so no message can carry it; rename it"
    return FileRefused(printable(name), None, None, what, Refusal.file_name)


def changed_refused(name: str, published: int, what: str) -> FileRefused:
    """The refusal of a file that changed otherwise than by appending after part of it was published."""
    return FileRefused(
        name,
        None,
        None,
        f"the file changed after it was taken: {what}; records 1-{published} of it were published, the "
        "rest not. Ask its writer for a ready signal (marker or rename), then for the rest",
        Refusal.changed,
    )


def refusal_of(error: FileFormatError) -> Refusal:
    """The reason category of a file's rejection."""
    return error.refusal if isinstance(error, FileRefused) else Refusal.parse


def printable(name: str) -> str:
    """``name`` fit for logs, dead letters and the broker: bytes that are not UTF-8 shown as ``\\xff``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
    """Whether a file name (as the OS gave it) is valid UTF-8, so it can travel in messages."""
    return printable(name) == name


@dataclass(frozen=True)
class FileParsing:
    """How a route's files are read: route name, source system, format, record path, chunk size, for
    CSV the dialect (delimiter, encoding, preamble, trailer), for fixed-width the layout."""

    route: str
    system: str
    format: RecordFormat
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
    """Filled in as a file is published, so a caller knows how far it got when publishing failed.

    ``sha256`` is the file's identity (part of every event id): the hash of its first ``size`` bytes
    when it was first published. ``records`` is how many the last check found, ``published`` how many
    the broker confirmed, in ``chunks`` chunks.
    """

    sha256: str = ""
    size: int | None = None
    records: int = 0
    published: int = 0
    chunks: int = 0


class _Prefix(io.RawIOBase):
    """The first ``limit`` bytes of a binary file."""

    def __init__(self, raw: io.BufferedReader, limit: int) -> None:
        self._raw = raw
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[: self._left]
        count = self._raw.readinto(view)
        self._left -= count
        return count

    def close(self) -> None:
        self._raw.close()
        super().close()


@contextlib.contextmanager
def open_prefix(path: Path, size: int | None = None) -> Iterator[BinaryIO]:
    """Open ``path`` for reading, never through a symbolic link; only its first ``size`` bytes if given."""
    raw = os.fdopen(os.open(path, READ_FLAGS), "rb")
    stream: BinaryIO = raw if size is None else io.BufferedReader(_Prefix(raw, size))
    with stream:
        yield stream


def file_sha256(path: Path, size: int | None = None) -> str:
    """Content hash of a file (or of its first ``size`` bytes), read in blocks; part of every event id."""
    digest = hashlib.sha256()
    with open_prefix(path, size) as stream:
        while block := stream.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _unencodable(value: Any, where: str = "the record") -> str | None:
    """Where ``value`` holds text UTF-8 cannot carry (a lone surrogate), or None when it is all fine."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            return f"{where} holds {value[error.start]!a}, which UTF-8 cannot encode"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _unencodable(str(key), f"a field name in {where}") or _unencodable(item, f"field {key!r}")
            if found:
                return found
    if isinstance(value, list):
        for position, item in enumerate(value):
            found = _unencodable(item, f"item {position} of {where}")
            if found:
                return found
    return None


def _check_carried(records: list[RawRecord], name: str) -> None:
    """Refuse records the broker could not carry: their JSON must encode as UTF-8.

    One encoding per batch keeps the check cheap; the record at fault is looked for only on failure.
    """
    # Records under one header share its object: each header is encoded once, not once per record.
    documents = {id(record.document): record.document for record in records if record.document is not None}
    try:
        json.dumps(
            [[record.data for record in records], list(documents.values())], ensure_ascii=False, default=str
        ).encode("utf-8")
    except UnicodeEncodeError:
        for record in records:
            where = _unencodable(record.data) or _unencodable(record.document, "the record's document")
            if where is not None:
                raise FileFormatError(
                    name, record.line, None, f"record {record.number}: {where}; the file cannot be published"
                ) from None
        raise FileFormatError(
            name, None, None, "text UTF-8 cannot encode; the file cannot be published"
        ) from None


def _check(path: Path, parsing: FileParsing, name: str, size: int | None, checked: int) -> int:
    """Read the file once: the number of records, or FileFormatError when it cannot all be published."""
    dialect = parsing.options()
    count = 0
    with open_prefix(path, size) as stream:
        records = iter_records(stream, parsing.format, parsing.records, name, **dialect)
        for batch in batched(records, parsing.chunk_size):
            count += len(batch)
            if count > checked:
                _check_carried(batch, name)
    return count


def publish_file(
    path: Path,
    parsing: FileParsing,
    sink: ChunkSink,
    progress: FileProgress,
    *,
    name: str | None = None,
    size: int | None = None,
) -> FileProgress:
    """Check, then publish ``path`` chunk by chunk; every chunk is confirmed when this returns.

    ``name`` is the file's name as the upstream knows it (defaults to the local name); ``size`` reads
    only the first bytes (a file its writer may still append to). A ``progress`` from an earlier call
    on a shorter prefix of the same file continues it: the file keeps the identity it was first
    published under and only the records after those already confirmed are published. Raises
    :class:`transforms.parsers.FileFormatError` before publishing anything when the file does not
    parse or cannot be carried, and whatever the sink raises when the broker does not confirm.
    """
    name = name or path.name
    with tracing.source_span("ingest", parsing.route, {"file.name": name}):
        return _publish_file(path, parsing, sink, progress, name, size)


def _publish_file(
    path: Path, parsing: FileParsing, sink: ChunkSink, progress: FileProgress, name: str, size: int | None
) -> FileProgress:
    if not progress.sha256:
        progress.sha256 = file_sha256(path, size)
        progress.size = size
    progress.records = _check(path, parsing, name, size, progress.published)
    dialect = parsing.options()
    edi = parsing.format in EDI_FORMATS

    def confirmed(chunk: SourceChunk) -> None:
        progress.chunks = chunk.chunk
        progress.published += len(chunk.records)

    # A pipelined sink keeps a few chunks unconfirmed while the file is read on; progress counts only
    # the confirmed ones, so a file released half-way resumes after them.
    window = sink if isinstance(sink, PipelinedSink) else None
    with open_prefix(path, size) as stream:
        records = iter_records(stream, parsing.format, parsing.records, name, **dialect)
        for number, batch in enumerate(
            batched(islice(records, progress.published, None), parsing.chunk_size), progress.chunks + 1
        ):
            chunk = SourceChunk(
                route=parsing.route,
                system=parsing.system,
                message_id=f"{name}@{progress.sha256[:16]}#{number}",
                origin={"file": name, "sha256": progress.sha256},
                records=batch,
                chunk=number,
                record_ids=_edi_identities(batch, progress.sha256) if edi else None,
                # An EDI record is identified by its interchange control number, transaction and
                # line: the same interchange sent again under another file name is the same events.
                id_origin={} if edi else None,
            )
            if window is not None:
                window.send(chunk, confirmed)
            else:
                sink(chunk)
                confirmed(chunk)
    if window is not None:
        window.flush()
    return progress


def _edi_identities(batch: list[RawRecord], sha256: str) -> list[str]:
    """Each EDI record's interchange identity; the content hash stands in should one lack its envelope."""
    return [record_identity(record.data) or f"{sha256}#{record.number}" for record in batch]
