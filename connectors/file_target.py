"""File delivery target: writes each request's rendered payload as one file in a local folder.

A reader of the folder never sees a partial file: the payload goes to a hidden temporary name in the
same folder, is flushed and fsynced, renamed over the final name with ``os.replace`` and the folder is
fsynced, so the file is complete and durable once the delivery counts as done. A failed write removes
its temporary file.

File names come from the target's ``filename`` pattern (see :class:`FilenamePattern`). Only
``{target}``, ``{key}`` and ``{ext}`` are deterministic: with a pattern made of those alone, a
redelivery after a crash overwrites the file it wrote before instead of adding a second one; with
``{date}`` or ``{time}`` a redelivery on a later day or second writes a new file.

Errors a retry can cure (folder missing, e.g. a share not mounted yet; disk full; I/O errors) are
retried in place; errors only an operator can cure are permanent, like an HTTP 401/403 or 4xx: the
dead letter says what to fix and a replay sends the events again (see ``_PERMANENT_ERRNOS``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import string
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, Generic, Protocol, TypeVar

from connectors.circuit import CircuitBreaker, CircuitSettings
from connectors.delivery import (
    AttemptHook,
    AttemptKind,
    AttemptResult,
    DeliveryOutcome,
    DeliveryResult,
    InterruptibleSleep,
    RetryInPlace,
    interruptible_sleep,
)
from connectors.retry import RetryPolicy

DEFAULT_FILENAME = "{target}-{key}.{ext}"
PLACEHOLDERS = ("target", "key", "ext", "date", "time")
DATE_FORMAT = "%Y%m%d"
TIME_FORMAT = "%H%M%S"
EXTENSIONS = {
    "application/json": "json",
    "application/xml": "xml",
    "text/xml": "xml",
    "text/csv": "csv",
}
UNKNOWN_EXTENSION = "bin"
# A local write is not cut off by a timeout; this is what the delivery worker allows for one attempt
# when it bounds a retry by the broker's consumer timeout.
WRITE_ALLOWANCE = 30.0

# Errors a retry within max_age cannot cure: permissions (as root-owned folders after a deploy), a
# read-only filesystem (mounted so, or remounted after disk errors: it needs fsck), a configured folder
# that is a file, a name that is a folder or too long or invalid for the filesystem, a payload too
# large for it. Everything else (ENOENT for a missing folder, ENOSPC, EDQUOT, EIO, ESTALE, ...) is retried.
_PERMANENT_ERRNOS: dict[int, str] = {
    errno.EACCES: "check the folder's permissions for the router's user",
    errno.EPERM: "check the folder's permissions for the router's user",
    errno.EROFS: "the filesystem is read-only",
    errno.ENOTDIR: "the folder path is not a folder",
    errno.EISDIR: "a folder already has the file's name",
    errno.ENAMETOOLONG: "shorten the filename pattern",
    errno.EINVAL: "the filesystem does not allow this file name",
    errno.ELOOP: "the folder path has a symbolic link loop",
    errno.EFBIG: "the payload is larger than the filesystem or a size limit allows",
}


class UnsafeFilename(ValueError):
    """A rendered file name would not name a plain visible file inside the target's folder."""


def extension_for(content_type: str) -> str:
    """The ``{ext}`` of a payload: json, xml or csv from its media type (``bin`` for anything else)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type in EXTENSIONS:
        return EXTENSIONS[media_type]
    suffix = media_type.rpartition("+")[2]
    return suffix if suffix in ("json", "xml") else UNKNOWN_EXTENSION


def temporary_name(name: str) -> str:
    """A hidden, unique name for a file while it is written: readers that skip dot-files ignore it."""
    return f".{name}.{secrets.token_hex(4)}.part"


def _check_name(name: str) -> None:
    if "/" in name or "\\" in name or "\0" in name:
        raise UnsafeFilename(f"file name {name!r} would leave the target's folder (it has a path separator)")
    if name.startswith("."):
        raise UnsafeFilename(f"file name {name!r} starts with a dot, reserved for files being written")


class FilenamePattern:
    """A target's ``filename`` pattern, checked once: placeholders {target}, {key}, {ext}, {date}, {time}.

    ``{key}`` is required so two requests never share a name (one would silently replace the other).
    ``{date}`` (YYYYMMDD) and ``{time}`` (HHMMSS) are UTC, taken when the delivery began.
    """

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        try:
            parts = list(string.Formatter().parse(pattern))
        except ValueError as error:
            raise ValueError(f"`filename` pattern {pattern!r} is malformed: {error}") from None
        used = set()
        for _, placeholder, spec, conversion in parts:
            if placeholder is None:
                continue
            if placeholder not in PLACEHOLDERS:
                allowed = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                raise ValueError(
                    f"`filename` pattern {pattern!r} has unknown placeholder {{{placeholder}}}; "
                    f"expected one of {allowed}"
                )
            if spec or conversion:
                raise ValueError(
                    f"`filename` pattern {pattern!r}: placeholder {{{placeholder}}} takes no format "
                    "spec or conversion"
                )
            used.add(placeholder)
        if "key" not in used:
            raise ValueError(
                f"`filename` pattern {pattern!r} must contain {{key}}, so every request gets a file of "
                "its own and a redelivery replaces the file it wrote before"
            )
        literal_text = "".join(literal for literal, _, _, _ in parts)
        try:
            _check_name(literal_text)
        except UnsafeFilename:
            raise ValueError(
                f"`filename` pattern {pattern!r} must name a file inside the folder: no '/', '\\' or NUL, "
                "and no leading dot"
            ) from None

    def render(self, *, target: str, key: str, content_type: str, began: datetime) -> str:
        """The file name for one request; raises UnsafeFilename when its values make it leave the folder."""
        when = began.astimezone(UTC)
        name = self.pattern.format(
            target=target,
            key=key,
            ext=extension_for(content_type),
            date=when.strftime(DATE_FORMAT),
            time=when.strftime(TIME_FORMAT),
        )
        _check_name(name)
        return name


@dataclass(frozen=True)
class FileTargetSettings:
    """One file target: the local folder files are written to and how they are named and retried.

    ``filename`` was checked by `router validate` (router.config); :class:`FilenamePattern` raises
    ValueError for a pattern that was not."""

    name: str
    folder: Path
    filename: str = DEFAULT_FILENAME
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    circuit: CircuitSettings = field(default_factory=CircuitSettings)

    @property
    def timeout(self) -> float:
        """The allowance for one write within the broker's consumer timeout (writes are not cut off)."""
        return WRITE_ALLOWANCE


def utc_now() -> datetime:
    """The current time in UTC: what ``{date}`` and ``{time}`` are taken from by default."""
    return datetime.now(UTC)


class WritingSettings(Protocol):
    """What every file-writing target's settings have."""

    @property
    def name(self) -> str: ...
    @property
    def filename(self) -> str: ...
    @property
    def retry(self) -> RetryPolicy: ...
    @property
    def circuit(self) -> CircuitSettings: ...


Settings = TypeVar("Settings", bound=WritingSettings)


class FileWritingTarget(ABC, Generic[Settings]):
    """What file and SFTP targets share: naming each request's file and retrying its write in place.

    ``sleep``, ``clock`` and ``now`` are injectable so tests need not wait; ``on_attempt`` counts attempts.
    """

    # How details name this kind of target, e.g. "file target erp: ...".
    kind: ClassVar[str]

    def __init__(
        self,
        settings: Settings,
        *,
        sleep: InterruptibleSleep = interruptible_sleep,
        clock: Callable[[], float] = time.monotonic,
        on_attempt: AttemptHook | None = None,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self.settings = settings
        self._name = settings.name
        self._pattern = FilenamePattern(settings.filename)
        self._now = now
        self.circuit = CircuitBreaker(settings.name, settings.circuit, clock=clock)
        self._retrying = RetryInPlace(
            settings.name, settings.retry, self.circuit, sleep=sleep, clock=clock, on_attempt=on_attempt
        )

    def deliver(
        self,
        payload: bytes,
        content_type: str,
        idempotency_key: str,
        *,
        stop: threading.Event | None = None,
        deadline: float | None = None,
    ) -> DeliveryResult:
        """Write ``payload`` as one file, retrying in place, until done, refused for good, out of attempts
        or ``max_age``, no attempt after ``deadline``, or interrupted by ``stop`` (then the message returns
        to its queue)."""
        try:
            name = self._pattern.render(
                target=self._name, key=idempotency_key, content_type=content_type, began=self._now()
            )
        except UnsafeFilename as error:
            detail = f"{self._where}: {error} (Idempotency-Key {idempotency_key!r})"
            return DeliveryResult(DeliveryOutcome.permanent, 0, None, detail, "filename")
        return self._retrying.deliver(lambda: self.write_once(name, payload), stop, deadline)

    @property
    def _where(self) -> str:
        """How details and logs name this target, e.g. ``file target wms``."""
        return f"{self.kind} {self._name}"

    @abstractmethod
    def close(self) -> None:
        """Release what is held between deliveries."""

    @abstractmethod
    def write_once(self, name: str, payload: bytes) -> AttemptResult:
        """Make one attempt to store ``payload`` under ``name`` atomically; never raises for I/O errors."""


class FileTarget(FileWritingTarget[FileTargetSettings]):
    """Delivers payloads as files in a local folder, written atomically and retried in place."""

    kind = "file target"

    def write_once(self, name: str, payload: bytes) -> AttemptResult:
        """Write ``payload`` to a hidden temporary file, fsync it, rename it to ``name``, fsync the folder."""
        folder = self.settings.folder
        final = folder / name
        temporary = folder / temporary_name(name)
        try:
            with temporary.open("xb") as staged:
                staged.write(payload)
                staged.flush()
                os.fsync(staged.fileno())
            os.replace(temporary, final)
            _fsync_folder(folder)
        except OSError as error:
            _remove_quietly(temporary)
            return self._failure(final, error)
        detail = f"{self._where}: wrote {len(payload)} bytes to {final}"
        return AttemptResult(AttemptKind.success, None, detail)

    def close(self) -> None:
        """Nothing to release: every write opens and closes its own file."""

    def _failure(self, final: Path, error: OSError) -> AttemptResult:
        folder = self.settings.folder
        code = error.errno or 0
        what = f"{self._where}: cannot write {final}: {error.strerror or error}"
        if code in errno.errorcode:
            what += f" ({errno.errorcode[code]})"
        if code == errno.ENOENT and not folder.is_dir():
            return AttemptResult(
                AttemptKind.retry, None, f"{what}; the folder {folder} does not exist (not mounted?)"
            )
        hint = _PERMANENT_ERRNOS.get(code)
        if hint is not None:
            return AttemptResult(AttemptKind.permanent, None, f"{what}; {hint}", reason="file_error")
        return AttemptResult(AttemptKind.retry, None, what)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable: the folder entry must reach the disk, not only the file's data."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        # Some filesystems (several network ones) cannot sync a folder; the file itself was synced.
        if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(descriptor)


def _remove_quietly(path: Path) -> None:
    """Remove a temporary file after a failed write; gone already (with its folder, say) is fine."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
